"""URL scheme -> implementation: unknown schemes and parameters fail fast and say what is valid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sdasync.backends import registry
from sdasync.backends.local.files import FileBlobStore
from sdasync.backends.registry import REGISTRY, open_backend, resolve, scheme_of
from sdasync.backends.sqlite.queue import SqliteQueue
from sdasync.backends.sqlite.store import SqliteTaskStore
from sdasync.errors import ConfigError

BUILT_IN = [(role, scheme) for role, schemes in sorted(REGISTRY.items()) for scheme, (_, extra) in
            sorted(schemes.items()) if extra is None]


@pytest.mark.parametrize(("role", "url", "cls"), [
    ("queue", "sqlite:///data/sdasync.db", SqliteQueue),
    ("store", "sqlite:///data/sdasync.db", SqliteTaskStore),
    ("blobs", "file:///data/results", FileBlobStore),
    ("queue", "SQLite:///data/sdasync.db", SqliteQueue),  # schemes are case-insensitive, as in RFC 3986
])
def test_urls_select_their_implementation(role: str, url: str, cls: type) -> None:
    assert resolve(role, url) is cls


@pytest.mark.parametrize(("role", "url", "valid"), [
    ("queue", "redis://localhost/0", "sqlite://, sqs://"),
    ("store", "postgres://db/tasks", "dynamodb://, sqlite://"),
    ("blobs", "gs://bucket/prefix", "file://, s3://"),
    ("engine", "comfy://127.0.0.1:8188", "diffusers://, fake://, webui+http://, webui+https://"),
])
def test_an_unknown_scheme_lists_the_valid_ones(role: str, url: str, valid: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown {role} URL scheme .*valid: {valid.replace('+', '[+]')}$"):
        resolve(role, url)


@pytest.mark.parametrize("url", ["data/sdasync.db", "", "sqlite:data.db"])
def test_something_that_is_not_a_url_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="not a URL"):
        scheme_of(url)


@pytest.mark.parametrize(("role", "url", "valid"), [
    ("queue", "sqlite:///q.db?visibility=30", "max_receives, name, poll_interval, visibility_timeout"),
    ("store", "sqlite:///q.db?table=tasks", "none"),
    ("blobs", "file:///results?public=1", "none"),
])
def test_an_unknown_parameter_lists_the_valid_ones(role: str, url: str, valid: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown parameter .* valid: {valid}$"):
        open_backend(role, url)


def test_opening_a_backend_only_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    queue = open_backend("queue", "sqlite:///data/sdasync.db?name=jobs&max_receives=4")
    store = open_backend("store", "sqlite:///data/sdasync.db", clock=lambda: 42.0)
    blobs = open_backend("blobs", "file:///data/results")

    assert (queue.name, queue.max_receives, queue.path) == ("jobs", 4, Path("data/sdasync.db"))
    assert store.path == Path("data/sdasync.db")
    assert blobs.root == Path("data/results")
    assert list(tmp_path.iterdir()) == []  # nothing was created or opened


@pytest.mark.parametrize(("role", "scheme"), BUILT_IN, ids=[f"{r}-{s}" for r, s in BUILT_IN])
def test_every_built_in_target_imports_and_looks_like_a_backend(role: str, scheme: str) -> None:
    cls = resolve(role, f"{scheme}:///x")

    assert callable(getattr(cls, "from_url", None))
    assert isinstance(cls.capabilities, frozenset)


def test_a_missing_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REGISTRY["engine"], "ghost", ("sdasync_no_such_module.engine:GhostEngine", "ghost"))

    with pytest.raises(ConfigError, match=r"ghost:// needs sdasync_no_such_module: pip install 'sdasync\[ghost\]'"):
        registry.resolve("engine", "ghost://model")


def test_a_broken_built_in_module_is_not_disguised_as_a_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REGISTRY["queue"], "broken", ("sdasync_no_such_module.queue:BrokenQueue", None))

    with pytest.raises(ImportError):
        registry.resolve("queue", "broken:///x")


def test_a_missing_sdasync_module_is_not_a_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REGISTRY["queue"], "ghostq", ("sdasync.backends.no_such_module:GhostQueue", "aws"))

    with pytest.raises(ImportError):
        registry.resolve("queue", "ghostq://x")


def test_the_embedded_default_needs_no_boto3(tmp_path: Path) -> None:
    script = f"""
import sys
sys.modules["boto3"] = None  # importing it now raises ImportError, as if it were not installed
sys.modules["botocore"] = None
import subprocess
import sys
from pathlib import Path
from sdasync.config import Settings
from sdasync.errors import ConfigError
from sdasync.service import TaskService, open_backends
from sdasync.backends.registry import open_backend
with open_backends(Settings(data_dir=Path({str(tmp_path)!r}))) as backends:
    task = TaskService(backends).submit({{"api": "/sdapi/v1/txt2img", "payload": {{"prompt": "x"}}}})
    assert backends.store.get(task.task_id).status == "queued"
try:
    open_backend("queue", "sqs://sd-tasks").depth()
except ConfigError as exc:
    print(exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "pip install 'sdasync[aws]'" in done.stdout


def test_the_store_front_door_hands_every_store_the_retention() -> None:
    from sdasync.backends.registry import open_store

    sqlite = open_store("sqlite:///data/sdasync.db", retention_days=7)
    assert isinstance(sqlite, SqliteTaskStore) and sqlite.retention_days == 7
    assert isinstance(open_store("sqlite:///data/sdasync.db"), SqliteTaskStore)
    pytest.importorskip("boto3")
    from sdasync.backends.aws.dynamodb import DynamoTaskStore

    dynamo = open_store("dynamodb://sd_tasks", retention_days=7)
    assert isinstance(dynamo, DynamoTaskStore) and dynamo.retention_s == 7 * 86400
