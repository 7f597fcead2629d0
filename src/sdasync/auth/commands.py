"""``sdasync keys``: create, list and revoke API keys, and rotate a tenant's webhook secret (``add_parser`` and
``run`` for the CLI).

Keys and webhook secrets are printed once, when made, and never again: only a key's hash is stored, and the
webhook secret only sealed. ``list`` shows ids, tenants and limits, never a key or a hash.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from sdasync.auth.keys import LOCAL_TENANT, ApiKey, KeyRing, check_key_tenant, check_limits
from sdasync.auth.secretbox import open_secret_box
from sdasync.auth.tenants import ROTATION_OVERLAP_S, Tenants
from sdasync.backends.records import RecordStore
from sdasync.config import Settings
from sdasync.errors import ConfigError, SdasyncError
from sdasync.timefmt import iso

SHOWN_ONCE = "Store it now: it is shown only this once."


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``keys`` to ``subparsers`` (what ``ArgumentParser.add_subparsers()`` returned)."""
    keys: argparse.ArgumentParser = subparsers.add_parser(
        "keys", help="API keys and tenants: create, list, revoke, rotate-secret",
        description="API keys (each for one tenant, with its limits) and the tenants' webhook signing secrets, "
                    "kept in the task store.")
    sub = keys.add_subparsers(dest="keys_command", required=True)
    create = sub.add_parser("create", help="make a key for a tenant (and the tenant, if new); prints it once")
    create.add_argument("--tenant", required=True, help="the tenant's name: a-z, 0-9, '_', '-' (up to 63)")
    create.add_argument("--rate", type=float, help="submits per second, refilled continuously (default: no limit)")
    # dest: ``burst`` is the worker's setting (exit when the queue is empty), which settings_from would take.
    create.add_argument("--burst", type=int, dest="bucket_size",
                        help="submits at once after a quiet spell (default: the rate, rounded up)")
    create.add_argument("--max-active", type=int, help="the tenant's tasks running at once (default: no cap)")
    create.add_argument("--max-queued", type=int, help="the tenant's tasks waiting in the queue (default: no cap)")
    create.add_argument("--admin", action="store_true", help="an operator key: sees every tenant's tasks")
    create.add_argument("--json", action="store_true", help="print JSON")
    _store_options(create)
    listing = sub.add_parser("list", help="every key: id, tenant, limits, created and revoked times")
    listing.add_argument("--json", action="store_true", help="print JSON")
    _store_options(listing)
    revoke = sub.add_parser("revoke", help="revoke a key, at once for every API process")
    revoke.add_argument("key_id", help="the key's id, as 'keys list' shows it")
    _store_options(revoke)
    rotate = sub.add_parser("rotate-secret", help="give a tenant a new webhook signing secret; prints it once")
    rotate.add_argument("--tenant", required=True, help="the tenant's name")
    rotate.add_argument("--overlap", type=float, default=ROTATION_OVERLAP_S / 3600, metavar="HOURS",
                        help="hours the old secret keeps signing beside the new one (default 24; 0 = stop now)")
    _store_options(rotate)
    return keys


def _store_options(parser: argparse.ArgumentParser) -> None:
    """Where the keys live, also after the subcommand (``keys list --store URL``). ``SUPPRESS``: an option not
    given here leaves what ``keys --store URL`` (cli.py's location options) set; neither given, the settings
    (and SDASYNC_* variables) decide."""
    parser.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS,
                        help="embedded data directory (default ./data) [SDASYNC_DATA_DIR]")
    parser.add_argument("--store", default=argparse.SUPPRESS,
                        help="task store URL, where keys and tenants live (default sqlite:///<data-dir>/sdasync.db) "
                             "[SDASYNC_STORE]")
    parser.add_argument("--secrets", default=argparse.SUPPRESS,
                        help="what seals webhook secrets: file:///<path> (default <data-dir>/secrets/master.key) or "
                             "kms://<key>?region=<r> [SDASYNC_SECRETS]")


def run(args: argparse.Namespace, settings: Settings, *, out: TextIO | None = None) -> int:
    """Run ``sdasync keys <command>``; returns 0. Raises SdasyncError (RequestError for a bad tenant, limit or
    unknown key id; ConfigError, BackendError), which the CLI prints and turns into exit status 2."""
    stream = out or sys.stdout
    from sdasync.backends.registry import open_store

    store = open_store(settings.store_url, retention_days=settings.retention_days)
    try:
        if not isinstance(store, RecordStore):
            raise ConfigError(f"the task store {settings.store_url} keeps no records, so no keys")
        ring = KeyRing(store)
        command = args.keys_command
        if command == "create":
            return _create(args, ring, Tenants(store, open_secret_box(settings.secrets_url)), stream)
        if command == "list":
            _list(ring.list(), as_json=args.json, out=stream)
            return 0
        if command == "revoke":
            key = ring.revoke(args.key_id)
            print(f"revoked {key.key_id} (tenant {key.tenant}) at {iso(key.revoked_at)}", file=stream)
            return 0
        if command == "rotate-secret":
            tenants = Tenants(store, open_secret_box(settings.secrets_url))
            if args.tenant == LOCAL_TENANT:
                tenants.ensure(LOCAL_TENANT)  # made by the first key-less webhook; here if none was sent yet
            secret = tenants.rotate_secret(args.tenant, overlap_s=args.overlap * 3600)
            print(f"webhook secret: {secret}", file=stream)
            if args.overlap > 0:
                print(f"{SHOWN_ONCE} For {args.overlap:g} h every event carries a signature by the old secret too: "
                      f"move the receivers to this one within that time.", file=stream)
            else:
                print(f"{SHOWN_ONCE} Receivers verifying with the old secret fail from now on.", file=stream)
            return 0
        raise ConfigError(f"unknown keys command {command!r}")
    finally:
        store.close()


def _create(args: argparse.Namespace, ring: KeyRing, tenants: Tenants, out: TextIO) -> int:
    limits = {"rate": args.rate, "burst": args.bucket_size, "max_active": args.max_active,
              "max_queued": args.max_queued}
    # Checked first, so a refused name or limit makes nothing. Then the tenant, so a secrets box that cannot seal
    # (a bad key file, no KMS access) makes no key either; then the key.
    check_key_tenant(args.tenant)
    check_limits(**limits)
    webhook_secret = tenants.ensure(args.tenant)
    try:
        secret, key = ring.create(args.tenant, admin=args.admin, **limits)
    except SdasyncError:
        if webhook_secret is not None:  # the tenant was made: its secret is shown now or never
            print(f"tenant {args.tenant} was made, but not its key. Its webhook secret: {webhook_secret}",
                  file=out)
        raise
    if args.json:
        doc: dict[str, Any] = {"key": secret, **_key_doc(key)}
        if webhook_secret is not None:
            doc["webhook_secret"] = webhook_secret
        print(json.dumps(doc, indent=2), file=out)
        what = "key and the tenant's webhook secret are" if webhook_secret else "key is"
        print(f"The {what} shown only this once.", file=sys.stderr)
        return 0
    print(f"key id:         {key.key_id}", file=out)
    print(f"tenant:         {key.tenant}{' (new)' if webhook_secret else ''}", file=out)
    print(f"limits:         {_limits_text(key)}", file=out)
    print(f"api key:        {secret}", file=out)
    if webhook_secret is not None:
        print(f"webhook secret: {webhook_secret}", file=out)
        print("Store both now: neither the key nor the webhook secret is shown again.", file=out)
    else:
        print(f"Store the key now: it is not shown again. (Tenant {key.tenant} exists; its webhook secret is "
              f"unchanged: 'sdasync keys rotate-secret --tenant {key.tenant}' makes a new one.)", file=out)
    return 0


def _key_doc(key: ApiKey) -> dict[str, Any]:
    return {"key_id": key.key_id, "tenant": key.tenant, "admin": key.admin, "rate": key.rate, "burst": key.burst,
            "max_active": key.max_active, "max_queued": key.max_queued, "created_at": iso(key.created_at),
            "revoked_at": iso(key.revoked_at)}


def _limits_text(key: ApiKey) -> str:
    parts = [f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
             for name, value in (("rate", key.rate), ("burst", key.burst), ("max_active", key.max_active),
                                 ("max_queued", key.max_queued)) if value is not None]
    if key.admin:
        parts.insert(0, "admin")
    return " ".join(parts) or "none"


def _list(keys: list[ApiKey], *, as_json: bool, out: TextIO) -> None:
    if as_json:
        print(json.dumps([_key_doc(key) for key in keys], indent=2), file=out)
        return
    rows = [("KEY ID", "TENANT", "LIMITS", "CREATED", "REVOKED")]
    rows += [(key.key_id, key.tenant, _limits_text(key), iso(key.created_at) or "", iso(key.revoked_at) or "-")
             for key in keys]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=out)
