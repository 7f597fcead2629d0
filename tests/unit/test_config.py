from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sdasync.cli import build_parser
from sdasync.config import LOCAL_SCALER_DEFAULTS, Settings, settings_from
from sdasync.errors import ConfigError
from sdasync.scaler.lambda_handler import config_from_env
from sdasync.scaler.types import PolicyConfig

SRC = Path(__file__).resolve().parents[2] / "src" / "sdasync"
#: The only modules that may read the process environment: the entry points.
ENTRY_POINTS = {"cli.py", "api/lambda_handler.py", "scaler/lambda_handler.py", "webhooks/lambda_handler.py"}


def test_defaults_derive_from_the_data_dir() -> None:
    settings = settings_from({}, environ={})
    assert settings.queue_url == "sqlite:///data/sdasync.db"
    assert settings.store_url == "sqlite:///data/sdasync.db"
    assert settings.blobs_url == "file:///data/results"
    assert settings.payloads_url == "file:///data/requests"
    assert settings.engine == "diffusers://tiny"
    absolute = settings_from({"data_dir": Path("/srv/sd")}, environ={})
    assert absolute.queue_url == "sqlite:////srv/sd/sdasync.db"
    assert absolute.blobs_url == "file:////srv/sd/results"


def test_payloads_never_live_under_the_results() -> None:
    s3 = Settings(blobs="s3://bucket/results")
    assert s3.payloads_url == "s3://bucket/requests"
    assert Settings(payloads="s3://private/p").payloads_url == "s3://private/p"


@pytest.mark.parametrize(("blobs", "payloads"), [
    ("s3://bucket", None), ("s3://bucket/requests", None), ("s3://bucket/results", "s3://bucket/results/requests"),
    ("file:///data/results", "file:///data/results/requests"),
])
def test_payloads_inside_the_results_are_refused(blobs: str, payloads: str | None) -> None:
    with pytest.raises(ConfigError, match="inside the results"):
        settings_from({"blobs": blobs, "payloads": payloads}, environ={})


def test_environment_fills_what_options_leave_out() -> None:
    env = {"SDASYNC_VISIBILITY_TIMEOUT": "120", "SDASYNC_QUEUE": "sqlite:///q.db", "SDASYNC_MAX_STEPS": "50",
           "SDASYNC_ALLOW_SCRIPTS": "true", "SDASYNC_OVERRIDE_SETTINGS_ALLOWLIST": "sd_vae, CLIP_stop_at_last_layers",
           "SDASYNC_TRUSTED_HOSTS": "api.example.com,example.com", "SDASYNC_MAX_WORKERS": "4"}
    settings = settings_from({"queue": "sqlite:///explicit.db"}, environ=env)
    assert settings.visibility_timeout == 120.0
    assert settings.queue_url == "sqlite:///explicit.db"
    assert settings.limits.max_steps == 50
    assert settings.limits.allow_scripts is True
    assert settings.limits.override_settings_allowlist == {"sd_vae", "CLIP_stop_at_last_layers"}
    assert settings.trusted_hosts == {"api.example.com", "example.com"}
    assert settings.scaler.max_workers == 4


def test_settings_built_in_code_read_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDASYNC_PORT", "9999")
    assert Settings().port == 8080


def test_cli_options_reach_settings() -> None:
    args = build_parser().parse_args(["worker", "--visibility-timeout", "30", "--max-attempts", "5",
                                      "--data-dir", "/tmp/x", "--burst", "--drain-timeout", "12"])
    settings = settings_from(vars(args), environ={})
    assert (settings.visibility_timeout, settings.max_attempts, settings.data_dir) == (30.0, 5, Path("/tmp/x"))
    assert settings.burst is True
    assert settings.drain_timeout == 12.0
    serve = build_parser().parse_args(["serve", "--max-width", "1024", "--allow-scripts", "--retention-days", "2"])
    served = settings_from(vars(serve), environ={})
    assert served.limits.max_width == 1024
    assert served.limits.allow_scripts is True
    assert served.retention_s == 2 * 86400


def test_serve_has_the_documented_drain_timeout() -> None:
    args = build_parser().parse_args(["serve"])
    assert settings_from(vars(args), environ={}).drain_timeout == 90.0


@pytest.mark.parametrize(("env", "message"), [
    ({"SDASYNC_PORT": "eighty"}, "SDASYNC_PORT"),
    ({"SDASYNC_MAX_ATTEMPTS": "0"}, "max_attempts"),
    ({"SDASYNC_ALLOW_SCRIPTS": "maybe"}, "SDASYNC_ALLOW_SCRIPTS"),
    ({"SDASYNC_MIN_WORKERS": "-1"}, "SDASYNC_MIN_WORKERS"),
])
def test_bad_settings_fail_fast(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from({}, environ=env)


def test_worker_options_read_the_environment() -> None:
    args = build_parser().parse_args(["worker"])
    settings = settings_from(vars(args), environ={"SDASYNC_MAX_TASKS": "7", "SDASYNC_BURST": "1"})
    assert settings.max_tasks == 7
    assert settings.burst is True


def test_scaler_cli_and_lambda_read_the_same_names() -> None:
    env = {"SDASYNC_MIN_WORKERS": "1", "SDASYNC_MAX_WORKERS": "6", "SDASYNC_BACKLOG_PER_WORKER": "3"}
    args = build_parser().parse_args(["scaler", "--queue", "sqs://q", "--fleet", "asg://g"])
    from_cli = settings_from(vars(args), environ=env).scaler.policy()
    assert from_cli == config_from_env(env)
    assert (from_cli.min_workers, from_cli.max_workers, from_cli.backlog_per_worker) == (1, 6, 3)
    short = build_parser().parse_args(["scaler", "--min", "2", "--max", "5"])
    assert settings_from(vars(short), environ={}).scaler.policy().max_workers == 5


def test_scaler_defaults_are_the_policys() -> None:
    assert settings_from({}, environ={}).scaler.policy() == PolicyConfig()


def test_serve_sizes_a_local_fleet_with_its_own_defaults_below_the_environment() -> None:
    args = vars(build_parser().parse_args(["serve", "--autoscale"]))
    local = settings_from(args, environ={}, defaults=LOCAL_SCALER_DEFAULTS)
    assert local.scaler.max_workers == 1
    assert settings_from(args, environ={"SDASYNC_MAX_WORKERS": "3"},
                         defaults=LOCAL_SCALER_DEFAULTS).scaler.max_workers == 3


def test_only_entry_points_read_the_environment() -> None:
    readers = []
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in {"environ", "getenv"} and \
                    isinstance(node.value, ast.Name) and node.value.id == "os" and relative not in ENTRY_POINTS:
                readers.append(f"{relative}:{node.lineno}")
    assert readers == []
