"""Result images as files under one directory, served by the API itself at ``/results/{key}``.

URL: ``file:///path/to/results`` (three slashes: relative to the working directory; four: absolute). No query
parameters.

Keys are relative paths like ``<taskId>/0.png``. Anything that could name a file outside the root is refused with
RequestError (field ``key``): empty keys or segments, absolute paths, ``.`` or ``..`` segments, backslashes, NUL,
and paths that a symlink inside the root would lead outside it. Writes are atomic (a temporary file in the same
directory, then ``os.replace``), so a reader sees the old image or the new one, never half of one.

``expire(before)`` deletes every file last written before a time: the janitor's sweep for blobs no task refers
to any more (a payload stored for a submit whose send failed, a crash's leftover temporary file). It treats
everything under the root as this store's, so the root must be a directory of its own.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote, urlsplit

from sdasync.backends.keys import check_key
from sdasync.errors import BackendError, BlobNotFound, RequestError
from sdasync.urls import path_from_url, query_params

#: Prefix of in-progress writes; a crash can leave one behind, never a truncated image under a real key.
_TMP_PREFIX = ".tmp-"


class FileBlobStore:
    """Blobs as files under ``root``; see the module docstring for the URL and key rules."""

    capabilities: frozenset[str] = frozenset({"served_by_api"})

    def __init__(self, *, root: str | Path, fsync: bool = True) -> None:
        self.root = Path(root)
        #: Flush each file to disk before it replaces the old one: a power loss then leaves old or new, not empty.
        self.fsync = fsync

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Self:
        """Parse ``url`` (creates nothing); ``kwargs`` go to the constructor."""
        query_params(url, {})
        return cls(root=path_from_url(url), **kwargs)

    def path(self, key: str) -> Path:
        """The file for ``key``, which may not exist. Raises RequestError for an unsafe key."""
        check_key(key)
        path = self.root / key
        # The checks above stop lexical escapes; resolve() also follows symlinks that point outside the root.
        try:
            inside = path.resolve().is_relative_to(self.root.resolve())
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
            raise RequestError(f"blob key {key!r} cannot be resolved: {exc}", field="key") from exc
        if not inside:
            raise RequestError(f"blob key {key!r} leads outside the blob root", field="key")
        return path

    def put(self, key: str, data: bytes, *, content_type: str = "image/png") -> None:
        # content_type is implied by the key's suffix when the API serves the file.
        path = self.path(key)
        try:
            self._write_atomically(path, data)
        except (IsADirectoryError, NotADirectoryError, FileExistsError) as exc:
            # e.g. "a/b" when "a" is a file: the key conflicts with another, retrying will not help.
            raise RequestError(f"blob key {key!r} conflicts with an existing path: {exc}", field="key") from exc
        except OSError as exc:
            raise BackendError(f"cannot write blob {key!r} under {self.root}: {exc}") from exc

    def _write_atomically(self, path: Path, data: bytes) -> None:
        for tries_left in reversed(range(3)):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX)
                break
            except FileNotFoundError:
                # A concurrent delete() removed the (then empty) directory between mkdir and mkstemp: make it again.
                if not tries_left:
                    raise
        try:
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(data)
                if self.fsync:
                    tmp.flush()
                    os.fsync(tmp.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise

    def get(self, key: str) -> bytes:
        path = self.path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise BlobNotFound(f"blob {key!r} not found") from exc
        except OSError as exc:
            raise BackendError(f"cannot read blob {key!r} under {self.root}: {exc}") from exc

    def url(self, key: str, *, base_url: str) -> str:
        self.path(key)
        parts = urlsplit(base_url)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError(f"base_url must be an absolute http(s) URL, not {base_url!r}")
        return f"{base_url.rstrip('/')}/results/{quote(key, safe='/')}"

    def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            path.unlink(missing_ok=True)
        except IsADirectoryError:
            return  # a directory is not a blob: there is no blob to delete
        except OSError as exc:
            raise BackendError(f"cannot delete blob {key!r} under {self.root}: {exc}") from exc
        # Remove directories the delete left empty (a task's folder), up to but not including the root.
        root = self.root.resolve()
        parent = path.parent
        while parent.resolve() != root and parent.resolve().is_relative_to(root):
            try:
                parent.rmdir()
            except OSError:
                break  # not empty (or already gone): stop
            parent = parent.parent

    def expire(self, before: float) -> int:
        """Delete every file under the root last modified before ``before`` (epoch seconds), and the directories
        that leaves empty; returns how many files went. A temporary file being written is fresh, so it is kept;
        one older than ``before`` is a crash's leftover and goes too. Symlinks are never followed or removed.
        Raises BackendError when the root cannot be read."""
        if not self.root.exists():
            return 0
        removed = 0
        try:
            # Bottom-up, so a directory is looked at after its files are gone.
            for dirpath, dirnames, filenames in os.walk(self.root, topdown=False, onerror=_raise):
                for name in filenames:
                    removed += _remove_if_older(os.path.join(dirpath, name), before)
                for name in dirnames:
                    with contextlib.suppress(OSError):  # not empty, a symlink, or just refilled by a put
                        os.rmdir(os.path.join(dirpath, name))
        except OSError as exc:
            raise BackendError(f"cannot expire blobs under {self.root}: {exc}") from exc
        return removed

    def close(self) -> None:
        """Nothing to release; present for the BlobStore Protocol."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _raise(exc: OSError) -> None:
    raise exc


def _remove_if_older(path: str, before: float) -> int:
    """1 if the regular file at ``path`` was older than ``before`` and is gone now, else 0."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_mtime >= before:
            return 0
        os.unlink(path)
    except FileNotFoundError:
        return 0  # deleted meanwhile (a concurrent delete or expire): nothing left to do
    return 1
