"""The BlobStore contract, run against every backend in ``backends.BLOB_FACTORIES``."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from sdasync.backends.base import BlobStore
from sdasync.backends.local.files import FileBlobStore
from sdasync.errors import BlobNotFound, ConfigError, RequestError

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
UNSAFE_KEYS = ["../x", "/etc/passwd", "a/../../b", "a\\b", "", "a//b", "a/./b", "..", "a/", "x\x00y", "//x"]


def test_implements_the_protocol(blobs: BlobStore) -> None:
    assert isinstance(blobs, BlobStore)
    assert isinstance(blobs.capabilities, frozenset)
    assert blobs.__enter__() is blobs


def test_put_then_get_round_trips_bytes(blobs: BlobStore) -> None:
    blobs.put("task-1/0.png", PNG)
    blobs.put("task-1/empty.bin", b"", content_type="application/octet-stream")

    assert blobs.get("task-1/0.png") == PNG
    assert blobs.get("task-1/empty.bin") == b""


def test_put_overwrites(blobs: BlobStore) -> None:
    blobs.put("task-1/0.png", b"old")
    blobs.put("task-1/0.png", b"new")

    assert blobs.get("task-1/0.png") == b"new"


def test_delete_removes_and_tolerates_missing_keys(blobs: BlobStore) -> None:
    blobs.put("task-1/0.png", PNG)
    blobs.put("task-1/1.png", PNG)

    blobs.delete("task-1/0.png")
    blobs.delete("task-1/0.png")
    blobs.delete("never/written.png")

    with pytest.raises(BlobNotFound):
        blobs.get("task-1/0.png")
    assert blobs.get("task-1/1.png") == PNG
    blobs.delete("task-1/1.png")
    blobs.put("task-1/0.png", b"again")  # the task's folder may have gone with its last file
    assert blobs.get("task-1/0.png") == b"again"


def test_get_of_a_missing_key_raises_not_found(blobs: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        blobs.get("no-such-task/0.png")
    blobs.put("task-1/0.png", PNG)
    with pytest.raises(BlobNotFound):
        blobs.get("task-1")  # a prefix is not a blob


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_unsafe_keys_are_refused(blobs: BlobStore, key: str) -> None:
    with pytest.raises(RequestError) as caught:
        blobs.put(key, PNG)
    assert caught.value.field == "key"
    with pytest.raises(RequestError):
        blobs.get(key)


def test_url_is_absolute_http(blobs: BlobStore) -> None:
    blobs.put("task-1/0 final.png", PNG)

    url = blobs.url("task-1/0 final.png", base_url="http://127.0.0.1:8080/")

    parts = urlsplit(url)
    assert parts.scheme in {"http", "https"}
    assert parts.netloc
    assert " " not in url
    if "served_by_api" in blobs.capabilities:
        assert url == "http://127.0.0.1:8080/results/task-1/0%20final.png"


# Specific to FileBlobStore ---------------------------------------------------------------------------------------


def test_file_store_refuses_keys_that_a_symlink_leads_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "results"
    root.mkdir()
    (root / "escape").symlink_to(outside)
    blobs = FileBlobStore(root=root)

    with pytest.raises(RequestError):
        blobs.put("escape/x.png", PNG)
    with pytest.raises(RequestError):
        blobs.get("escape/x.png")
    assert list(outside.iterdir()) == []


def test_file_store_writes_atomically_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    blobs = FileBlobStore(root=tmp_path / "results")
    blobs.put("t/0.png", b"one")
    blobs.put("t/0.png", b"two")

    assert sorted(os.listdir(tmp_path / "results" / "t")) == ["0.png"]
    assert blobs.path("t/0.png") == tmp_path / "results" / "t" / "0.png"
    assert blobs.path("t/0.png").read_bytes() == b"two"


def test_file_store_reports_a_key_that_collides_with_a_file(tmp_path: Path) -> None:
    blobs = FileBlobStore(root=tmp_path / "results")
    blobs.put("t", b"file")

    with pytest.raises(RequestError):
        blobs.put("t/0.png", PNG)


def test_file_store_from_url_parses_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    relative = FileBlobStore.from_url("file:///data/results")
    absolute = FileBlobStore.from_url(f"file:///{tmp_path}/abs")

    assert relative.root == Path("data/results")
    assert absolute.root == tmp_path / "abs"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="valid: none"):
        FileBlobStore.from_url("file:///data/results?bucket=x")


def test_file_store_url_needs_an_http_base(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="http"):
        FileBlobStore(root=tmp_path).url("t/0.png", base_url="/relative")
