"""API keys, tenants and their sealed webhook secrets on real stores; the ``keys`` command; the KMS box on moto."""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdasync.auth import commands
from sdasync.auth.keys import KIND, UNAUTHORIZED_MESSAGE, KeyRing, hash_key, presented_key
from sdasync.auth.secretbox import FileSecretBox, open_secret_box
from sdasync.auth.tenants import CACHE_S, Tenants
from sdasync.backends.sqlite.store import SqliteTaskStore
from sdasync.config import settings_from
from sdasync.errors import ConfigError, RequestError, SdasyncError, Unauthorized
from sdasync.urls import url_for_path

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "sdasync.db"


@pytest.fixture
def store(db: Path) -> Iterator[SqliteTaskStore]:
    with SqliteTaskStore(path=db) as opened:
        yield opened


class Ticker:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_key_verifies_and_only_its_hash_is_stored(store: SqliteTaskStore) -> None:
    ring = KeyRing(store, clock=Ticker())
    key, made = ring.create("acme", rate=2.5, burst=4, max_active=2, max_queued=10)
    assert key.startswith(f"sda_{made.key_id}_")
    assert len(key) >= len("sda_") + 12 + 1 + 43  # 32 random bytes are 43 characters of URL-safe base64
    assert all(c.isalnum() or c in "-_" for c in key)
    assert ring.verify(key) == made
    assert (made.tenant, made.rate, made.burst, made.max_active, made.max_queued) == ("acme", 2.5, 4, 2, 10)
    assert made.created_at == 1_800_000_000.0 and made.revoked_at is None and not made.admin
    record = store.get_record(KIND, made.key_id)
    assert record is not None
    assert record.data["hash"] == hash_key(key)
    assert key not in json.dumps(record.data)
    second, other = ring.create("acme")
    assert other.key_id != made.key_id and second != key
    assert ring.verify(second).rate is None


def test_every_wrong_key_gets_the_same_answer(store: SqliteTaskStore) -> None:
    ring = KeyRing(store)
    key, made = ring.create("acme")
    wrong_secret = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    unknown_id = "sda_" + "0" * 12 + key[len("sda_") + 12:]
    for presented in (None, "", "sda_", "Bearer " + key, key + "x", wrong_secret, unknown_id, "x" * 5000,
                      key.replace("sda_", "sdb_"), "sda_" + made.key_id + "_"):
        with pytest.raises(Unauthorized) as refused:
            ring.verify(presented)
        assert refused.value.message == UNAUTHORIZED_MESSAGE
        assert refused.value.http_status == 401
    ring.revoke(made.key_id)
    with pytest.raises(Unauthorized) as revoked:
        ring.verify(key)
    assert revoked.value.message == UNAUTHORIZED_MESSAGE


def test_a_revoke_from_another_process_is_effective_at_once(db: Path, store: SqliteTaskStore) -> None:
    api = KeyRing(store)
    key, made = api.create("acme")
    assert api.verify(key).key_id == made.key_id
    with SqliteTaskStore(path=db) as other_handle:
        revoked = KeyRing(other_handle).revoke(made.key_id)
    assert revoked.revoked_at is not None
    with pytest.raises(Unauthorized):
        api.verify(key)  # the very next call, on the first handle: no cache anywhere
    again = api.revoke(made.key_id)
    assert again.revoked_at == revoked.revoked_at, "revoking twice keeps the first time"
    assert [k.revoked_at for k in api.list()] == [revoked.revoked_at]


def test_list_revoke_and_the_refusals_of_create(store: SqliteTaskStore) -> None:
    ticker = Ticker()
    ring = KeyRing(store, clock=ticker)
    made = []
    for tenant in ("beta", "acme", "acme"):
        made.append(ring.create(tenant, admin=tenant == "beta")[1])
        ticker.now += 1
    assert [k.key_id for k in ring.list()] == [k.key_id for k in made], "oldest first"
    assert ring.list()[0].admin
    with pytest.raises(RequestError, match="no API key has the id") as unknown:
        ring.revoke("feedfeedfeed")
    assert unknown.value.field == "key_id"
    with pytest.raises(RequestError):
        ring.revoke("../../etc")
    for tenant in ("", "Acme", "-acme", "a" * 64, "a b", "acme#1", "é"):
        with pytest.raises(RequestError, match="not a valid name") as bad:
            ring.create(tenant)
        assert bad.value.field == "tenant"
    for limits, field in (({"rate": 0}, "rate"), ({"rate": float("nan")}, "rate"), ({"rate": True}, "rate"),
                          ({"max_active": 0}, "max_active"), ({"max_queued": -1}, "max_queued"),
                          ({"rate": 1.0, "burst": 0}, "burst"), ({"burst": 3}, "burst")):
        with pytest.raises(RequestError) as refused:
            ring.create("acme", **limits)
        assert refused.value.field == field
    assert len(ring.list()) == 3, "a refused create makes nothing"


def test_the_key_a_request_presents() -> None:
    assert presented_key({"Authorization": "Bearer sda_x"}) == "sda_x"
    assert presented_key({"authorization": "bearer  sda_x "}) == "sda_x"
    assert presented_key({"X-API-Key": "sda_y"}) == "sda_y"
    assert presented_key({"x-api-key": " sda_y"}) == "sda_y"
    assert presented_key({"AUTHORIZATION": "Bearer sda_x", "X-Api-Key": "sda_y"}) == "sda_x"
    assert presented_key({"Authorization": "Basic dXNlcjpwYXNz", "X-API-Key": "sda_y"}) == "sda_y"
    assert presented_key({"Authorization": "Basic dXNlcjpwYXNz"}) is None
    assert presented_key({"Authorization": "Bearer "}) is None
    assert presented_key({"Content-Type": "application/json"}) is None


def test_a_tenant_gets_one_sealed_secret_shown_once(db: Path, store: SqliteTaskStore, tmp_path: Path) -> None:
    box = FileSecretBox(tmp_path / "secrets" / "master.key")
    tenants = Tenants(store, box)
    secret = tenants.ensure("acme")
    assert secret is not None and secret.startswith("whsec_")
    assert len(base64.b64decode(secret[len("whsec_"):])) == 32
    assert tenants.ensure("acme") is None
    with SqliteTaskStore(path=db) as other_handle:
        assert Tenants(other_handle, FileSecretBox(tmp_path / "secrets" / "master.key")).ensure("acme") is None
        assert Tenants(other_handle, box).webhook_secret("acme") == secret
    record = store.get_record("tenant", "acme")
    assert record is not None and secret not in json.dumps(record.data)
    assert tenants.webhook_secret("acme") == secret
    assert tenants.webhook_secret("nobody") is None and tenants.webhook_secret("Not Valid") is None
    with pytest.raises(RequestError, match="no tenant 'nobody'"):
        tenants.rotate_secret("nobody")
    with pytest.raises(ConfigError, match="does not open"):
        Tenants(store, FileSecretBox(tmp_path / "other.key")).webhook_secret("acme")


def test_a_rotated_secret_reaches_other_processes_within_the_cache_time(store: SqliteTaskStore,
                                                                        tmp_path: Path) -> None:
    box = FileSecretBox(tmp_path / "master.key")
    ticks = Ticker(100.0)
    sender = Tenants(store, box, monotonic=ticks)
    old = Tenants(store, box).ensure("acme")
    assert sender.webhook_secret("acme") == old
    new = Tenants(store, box).rotate_secret("acme")
    assert new != old and new.startswith("whsec_")
    assert sender.webhook_secret("acme") == old, "cached for a few seconds"
    ticks.now += CACHE_S + 0.01
    assert sender.webhook_secret("acme") == new
    assert sender.rotate_secret("acme") != new
    assert sender.webhook_secret("acme") not in (old, new), "a rotation here is seen here at once"



def test_after_a_rotation_the_old_secret_signs_too_for_the_overlap(store: SqliteTaskStore, tmp_path: Path) -> None:
    from sdasync.webhooks import signing
    from webhook_receiver import standard_webhooks_valid

    box = FileSecretBox(tmp_path / "master.key")
    wall = Ticker(1_000_000.0)
    tenants = Tenants(store, box, clock=wall, monotonic=wall)
    old = tenants.ensure("acme")
    assert old is not None
    new = tenants.rotate_secret("acme", overlap_s=3600)
    assert tenants.webhook_secrets("acme") == [new, old]
    body = b'{"type":"task.completed"}'
    headers = signing.headers(tenants.webhook_secrets("acme"), "msg_1", int(time.time()), body)
    # A receiver still on the old secret and one already on the new both verify the same delivery.
    assert standard_webhooks_valid(old, headers, body) and standard_webhooks_valid(new, headers, body)
    wall.now += 3600 + CACHE_S
    assert tenants.webhook_secrets("acme") == [new], "the old secret stops signing when the overlap ends"
    newest = tenants.rotate_secret("acme", overlap_s=0)
    wall.now += CACHE_S + 0.01
    assert tenants.webhook_secrets("acme") == [newest]
    with pytest.raises(RequestError):
        tenants.rotate_secret("acme", overlap_s=-1)


# -- the command

def keys_cli(data_dir: Path, *argv: str) -> tuple[int, str]:
    """``sdasync keys ...`` through ``add_parser`` and ``run``, as cli.py calls them, with main's error rule."""
    parser = argparse.ArgumentParser(prog="sdasync")
    commands.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["keys", *argv])
    settings = settings_from(vars(args), {"SDASYNC_DATA_DIR": str(data_dir)})
    out = io.StringIO()
    try:
        return commands.run(args, settings, out=out), out.getvalue()
    except SdasyncError as exc:
        return 2, exc.message


def test_the_keys_command(tmp_path: Path) -> None:
    data = tmp_path / "data"
    code, text = keys_cli(data, "create", "--tenant", "acme", "--rate", "2", "--burst", "5", "--max-queued", "3")
    assert code == 0, text
    lines = dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("Store"))
    key, secret = lines["api key"].strip(), lines["webhook secret"].strip()
    assert key.startswith("sda_") and secret.startswith("whsec_")
    assert "neither the key nor the webhook secret is shown again" in text
    with SqliteTaskStore(path=data / "sdasync.db") as store:
        made = KeyRing(store).verify(key)
        assert (made.tenant, made.rate, made.burst, made.max_queued) == ("acme", 2.0, 5, 3)
        box = open_secret_box(url_for_path("file", data / "secrets" / "master.key"))
        assert Tenants(store, box).webhook_secret("acme") == secret

    code, text = keys_cli(data, "create", "--tenant", "acme", "--json", "--admin")
    assert code == 0
    doc = json.loads(text)
    assert doc["tenant"] == "acme" and doc["admin"] is True and "webhook_secret" not in doc
    assert doc["key"].startswith("sda_") and doc["created_at"].endswith("Z")

    code, text = keys_cli(data, "list")
    assert code == 0 and made.key_id in text and doc["key_id"] in text and "rate=2 burst=5 max_queued=3" in text
    code, listed = keys_cli(data, "list", "--json")
    rows = json.loads(listed)
    assert [r["key_id"] for r in rows] == [made.key_id, doc["key_id"]]
    for shown in (text, listed):
        assert key not in shown and doc["key"] not in shown and hash_key(key) not in shown and "whsec_" not in shown

    code, text = keys_cli(data, "revoke", made.key_id)
    assert code == 0 and f"revoked {made.key_id} (tenant acme)" in text
    assert json.loads(keys_cli(data, "list", "--json")[1])[0]["revoked_at"].endswith("Z")
    assert keys_cli(data, "revoke", "feedfeedfeed")[0] == 2

    code, text = keys_cli(data, "rotate-secret", "--tenant", "acme")
    assert code == 0
    rotated = text.split("webhook secret:", 1)[1].split()[0]
    assert rotated.startswith("whsec_") and rotated != secret
    assert keys_cli(data, "rotate-secret", "--tenant", "nobody") == (
        2, "there is no tenant 'nobody': 'sdasync keys create --tenant nobody' makes it")
    assert keys_cli(data, "create", "--tenant", "Bad Name")[0] == 2


def test_a_refused_create_makes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert keys_cli(data, "create", "--tenant", "acme", "--max-queued", "0")[0] == 2
    assert keys_cli(data, "create", "--tenant", "Bad Name")[0] == 2
    key_file = data / "secrets" / "master.key"
    key_file.parent.mkdir(parents=True)
    key_file.write_bytes(b"k" * 32)
    key_file.chmod(0o644)
    code, message = keys_cli(data, "create", "--tenant", "acme")
    assert code == 2 and "chmod 600" in message, "a secrets box that cannot seal makes neither tenant nor key"
    assert json.loads(keys_cli(data, "list", "--json")[1]) == []


def test_the_store_may_be_named_after_the_subcommand(tmp_path: Path) -> None:
    url = url_for_path("sqlite", tmp_path / "elsewhere.db")
    assert keys_cli(tmp_path / "data", "create", "--tenant", "acme", "--store", url)[0] == 0
    assert keys_cli(tmp_path / "data", "list", "--store", url)[1].count("acme") == 1
    assert keys_cli(tmp_path / "data", "list")[1].count("acme") == 0


def keys_is_a_subcommand() -> bool:
    from sdasync.cli import build_parser

    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return any("keys" in a.choices for a in actions)


def test_sdasync_keys_as_a_process(tmp_path: Path) -> None:
    if not keys_is_a_subcommand():
        pytest.skip("cli.py does not wire 'keys' yet")
    env = {**os.environ, "SDASYNC_DATA_DIR": str(tmp_path / "data")}

    def sdasync(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sdasync", "keys", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120, check=False)

    created = sdasync("create", "--tenant", "acme", "--json")
    assert created.returncode == 0, created.stderr
    doc = json.loads(created.stdout)
    assert doc["webhook_secret"].startswith("whsec_") and "shown only this once" in created.stderr
    listed = sdasync("list")
    assert listed.returncode == 0 and doc["key_id"] in listed.stdout and doc["key"] not in listed.stdout
    assert sdasync("revoke", doc["key_id"]).returncode == 0
    unknown = sdasync("revoke", "feedfeedfeed")
    assert unknown.returncode == 2 and "no API key has the id" in unknown.stderr
    with SqliteTaskStore(path=tmp_path / "data" / "sdasync.db") as store, pytest.raises(Unauthorized):
        KeyRing(store).verify(doc["key"])


# -- the KMS box, on moto

@pytest.fixture
def kms(aws_endpoint: str) -> Iterator[Any]:
    pytest.importorskip("boto3")
    from sdasync.awsclient import aws_client

    client = aws_client("kms")
    yield client
    client.close()


def test_the_kms_box_seals_with_data_keys_and_caches_them(kms: Any, store: SqliteTaskStore) -> None:
    from sdasync.auth.secretbox import KmsSecretBox

    key_id = kms.create_key(Description="sdasync test")["KeyMetadata"]["KeyId"]
    alias = f"alias/sdasync-{uuid.uuid4().hex[:8]}"
    kms.create_alias(AliasName=alias, TargetKeyId=key_id)
    box = open_secret_box(f"kms://{alias}?region=us-east-1")
    assert isinstance(box, KmsSecretBox)
    sealed = box.seal(b"whsec_kms")
    assert sealed.startswith("v1:kms:") and len(sealed.split(":")) == 4 and "whsec_kms" not in sealed

    reader = KmsSecretBox(key_id)  # another process, naming the key by id
    calls: list[str] = []
    reader._client.get().meta.events.register("before-call.kms.*", lambda model, **_: calls.append(model.name))
    assert reader.open(sealed) == b"whsec_kms"
    assert reader.open(sealed) == b"whsec_kms"
    assert calls == ["Decrypt"], "the data key is decrypted once, then kept"

    head, _, body = sealed.rpartition(":")
    flipped = body[:-2] + ("AA" if not body.endswith("AA") else "BB")
    with pytest.raises(ConfigError, match="does not open"):
        reader.open(f"{head}:{flipped}")
    with pytest.raises(ConfigError):
        reader.open("v1:kms:bm90IGEga2V5:" + body)  # an encrypted data key KMS never made

    tenants = Tenants(store, box)
    secret = tenants.ensure("acme")
    assert secret is not None and Tenants(store, reader).webhook_secret("acme") == secret
    record = store.get_record("tenant", "acme")
    assert record is not None and str(record.data["secret"]).startswith("v1:kms:")
    box_close = getattr(box, "close", None)
    if box_close is not None:
        box_close()
    reader.close()


def test_an_unknown_kms_key_is_a_config_error(kms: Any) -> None:
    box = open_secret_box(f"kms://alias/missing-{uuid.uuid4().hex[:8]}")
    with pytest.raises(ConfigError, match="NotFoundException"):
        box.seal(b"x")
