"""The file secret box: round trips, tampering, the key file's mode, and the URLs that pick a box.

The KMS box runs against moto in tests/integration/test_keys.py.
"""

from __future__ import annotations

import base64
import os
import stat
import threading
from pathlib import Path

import pytest

from sdasync.auth.secretbox import FileSecretBox, KmsSecretBox, SecretBox, open_secret_box
from sdasync.errors import ConfigError
from sdasync.urls import url_for_path


def box_at(path: Path) -> SecretBox:
    return open_secret_box(url_for_path("file", path))


def test_a_round_trip_through_a_new_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "secrets" / "master.key"
    box = box_at(key_file)
    assert not key_file.exists(), "opening the box makes nothing until it is used"
    sealed = box.seal(b"whsec_abc")
    assert sealed.startswith("v1:file:")
    assert "whsec_abc" not in sealed
    assert box.open(sealed) == b"whsec_abc"
    # Another box on the same file (another process) opens it too; two seals of one secret differ (fresh nonces).
    assert box_at(key_file).open(sealed) == b"whsec_abc"
    assert box.seal(b"whsec_abc") != sealed


def test_the_key_file_is_private_from_its_first_instant(tmp_path: Path) -> None:
    key_file = tmp_path / "secrets" / "master.key"
    old = os.umask(0)  # even with a umask that lets everything through
    try:
        box_at(key_file).seal(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert len(key_file.read_bytes()) == 32
    assert [p.name for p in key_file.parent.iterdir()] == ["master.key"], "no temporary file is left behind"


def test_a_key_file_others_can_read_is_refused_with_the_fix(tmp_path: Path) -> None:
    key_file = tmp_path / "master.key"
    sealed = box_at(key_file).seal(b"secret")
    key_file.chmod(0o644)
    with pytest.raises(ConfigError, match=r"mode 0644.*chmod 600") as refused:
        box_at(key_file).open(sealed)
    assert str(key_file) in refused.value.message
    key_file.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        box_at(key_file).seal(b"x")
    key_file.chmod(0o600)
    assert box_at(key_file).open(sealed) == b"secret"


def test_a_key_file_of_the_wrong_size_or_kind_is_refused(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    fd = os.open(short, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"too short")
    os.close(fd)
    with pytest.raises(ConfigError, match="holds 9 bytes"):
        box_at(short).seal(b"x")
    directory = tmp_path / "dir.key"
    directory.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        box_at(directory).seal(b"x")


def test_tampering_and_other_keys_are_detected(tmp_path: Path) -> None:
    box = box_at(tmp_path / "a.key")
    sealed = box.seal(b"the secret")
    version, kind, body = sealed.split(":")
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    for index in (0, 12, len(raw) - 1):  # the nonce, the ciphertext, the tag
        altered = bytearray(raw)
        altered[index] ^= 0x01
        forged = f"{version}:{kind}:{base64.urlsafe_b64encode(bytes(altered)).decode().rstrip('=')}"
        with pytest.raises(ConfigError, match="does not open"):
            box.open(forged)
    with pytest.raises(ConfigError, match="does not open"):
        box_at(tmp_path / "b.key").open(sealed)
    for bad in ("v2:file:" + body, "v1:kms:" + body, body, "v1:file:" + body + ":x", "v1:file:***"):
        with pytest.raises(ConfigError):
            box.open(bad)
    assert box.open(sealed) == b"the secret"


def test_processes_racing_to_make_the_key_file_agree_on_one_key(tmp_path: Path) -> None:
    key_file = tmp_path / "secrets" / "master.key"
    barrier = threading.Barrier(8)
    sealed: list[str] = []
    errors: list[BaseException] = []

    def make() -> None:
        try:
            box = FileSecretBox(key_file)
            barrier.wait(timeout=10)
            sealed.append(box.seal(b"same"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert len(sealed) == 8
    reader = FileSecretBox(key_file)
    assert {reader.open(s) for s in sealed} == {b"same"}


def test_urls_pick_the_box(tmp_path: Path) -> None:
    assert isinstance(open_secret_box(url_for_path("file", tmp_path / "k")), FileSecretBox)
    alias = open_secret_box("kms://alias/sdasync?region=eu-west-1")
    assert isinstance(alias, KmsSecretBox)
    assert alias.key_id == "alias/sdasync"
    arn = open_secret_box("kms://arn:aws:kms:us-east-1:123456789012:key/1234abcd")
    assert isinstance(arn, KmsSecretBox)
    assert arn.key_id == "arn:aws:kms:us-east-1:123456789012:key/1234abcd"
    for bad, message in (("kms://?region=x", "names no KMS key"), ("kms://k?color=red", "unknown parameter"),
                         ("vault://x", "file:// .* or kms://"), (url_for_path("file", tmp_path) + "?mode=1",
                                                                  "unknown parameter")):
        with pytest.raises(ConfigError, match=message):
            open_secret_box(bad)
