from __future__ import annotations

from pathlib import Path

import pytest

from sdasync.cli import build_parser
from sdasync.config import settings_from
from sdasync.errors import ConfigError


def test_defaults_derive_from_the_data_dir() -> None:
    settings = settings_from({}, environ={})
    assert settings.queue_url == "sqlite:///data/sdasync.db"
    assert settings.store_url == "sqlite:///data/sdasync.db"
    assert settings.blobs_url == "file:///data/results"
    assert settings.engine == "diffusers://tiny"
    absolute = settings_from({"data_dir": Path("/srv/sd")}, environ={})
    assert absolute.queue_url == "sqlite:////srv/sd/sdasync.db"
    assert absolute.blobs_url == "file:////srv/sd/results"


def test_environment_fills_what_options_leave_out() -> None:
    env = {"SDASYNC_VISIBILITY_TIMEOUT": "120", "SDASYNC_QUEUE": "sqlite:///q.db", "SDASYNC_MAX_STEPS": "50",
           "SDASYNC_ALLOW_SCRIPTS": "true", "SDASYNC_OVERRIDE_SETTINGS_ALLOWLIST": "sd_vae, CLIP_stop_at_last_layers"}
    settings = settings_from({"queue": "sqlite:///explicit.db"}, environ=env)
    assert settings.visibility_timeout == 120.0
    assert settings.queue_url == "sqlite:///explicit.db"
    assert settings.limits.max_steps == 50
    assert settings.limits.allow_scripts is True
    assert settings.limits.override_settings_allowlist == {"sd_vae", "CLIP_stop_at_last_layers"}


def test_cli_options_reach_settings() -> None:
    args = build_parser().parse_args(["worker", "--visibility-timeout", "30", "--max-attempts", "5",
                                      "--data-dir", "/tmp/x", "--burst"])
    settings = settings_from(vars(args), environ={})
    assert (settings.visibility_timeout, settings.max_attempts, settings.data_dir) == (30.0, 5, Path("/tmp/x"))
    assert args.burst is True
    serve = build_parser().parse_args(["serve", "--max-width", "1024", "--allow-scripts"])
    limits = settings_from(vars(serve), environ={}).limits
    assert limits.max_width == 1024
    assert limits.allow_scripts is True


@pytest.mark.parametrize(("env", "message"), [
    ({"SDASYNC_PORT": "eighty"}, "SDASYNC_PORT"),
    ({"SDASYNC_MAX_ATTEMPTS": "0"}, "max_attempts"),
    ({"SDASYNC_ALLOW_SCRIPTS": "maybe"}, "SDASYNC_ALLOW_SCRIPTS"),
])
def test_bad_settings_fail_fast(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from({}, environ=env)


def test_worker_flags_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDASYNC_MAX_TASKS", "7")
    monkeypatch.setenv("SDASYNC_BURST", "1")
    args = build_parser().parse_args(["worker"])
    assert args.max_tasks == 7
    assert args.burst is True
