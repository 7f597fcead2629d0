"""The ``RecordStore`` half of the SQLite task store: table ``records`` in the same file as ``tasks``.

One row per (kind, key); ``data`` is compact JSON text (so ``1.0`` reads back a float), ``version`` the
compare-and-set counter, ``expires_at`` (NULL: kept until deleted) the moment from which the row reads as absent.
Every condition is in the statement itself, never in a read before it: a create is one ``INSERT ... ON CONFLICT DO
UPDATE ... WHERE <the row there has expired>``, a replace one ``UPDATE ... WHERE version = ?``, each checked by its
row count inside a ``BEGIN IMMEDIATE`` transaction that reads the row back for the conflict's ``current``.

SQLite has no TTL, so each write also deletes up to ``PRUNE_BATCH`` rows that expired (through a partial index of
the rows that expire at all): rate buckets and idempotency keys then do not pile up, and no write pays for more
than a bounded cleanup.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from typing import Any

from sdasync.backends.cursor import decode_cursor, encode_cursor
from sdasync.backends.records import Record, RecordPage, check_expiry, check_record_key, encode_data
from sdasync.errors import RecordConflict, RequestError

SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS records (
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        data TEXT NOT NULL,          -- JSON object
        version INTEGER NOT NULL,
        expires_at REAL,             -- epoch seconds; NULL: never
        PRIMARY KEY (kind, key)
    )
    """,
    # The pruning DELETE walks this from its oldest entry; rows that never expire are not in it.
    "CREATE INDEX IF NOT EXISTS records_expiry ON records (expires_at) WHERE expires_at IS NOT NULL",
)

#: Expired rows deleted by one write, at most.
PRUNE_BATCH = 100
MAX_LIMIT = 1000
_LIVE = "(expires_at IS NULL OR expires_at > ?)"
_SELECT = "SELECT kind, key, data, version, expires_at FROM records"

CREATE = ("INSERT INTO records (kind, key, data, version, expires_at) VALUES (?, ?, ?, 1, ?)"
          " ON CONFLICT (kind, key) DO UPDATE SET data = excluded.data, version = 1,"
          " expires_at = excluded.expires_at"
          " WHERE records.expires_at IS NOT NULL AND records.expires_at <= ?")
REPLACE = (f"UPDATE records SET data = ?, version = version + 1, expires_at = ?"
           f" WHERE kind = ? AND key = ? AND version = ? AND {_LIVE}")
PRUNE = ("DELETE FROM records WHERE rowid IN"
         " (SELECT rowid FROM records WHERE expires_at IS NOT NULL AND expires_at <= ? ORDER BY expires_at LIMIT ?)")


def fetch(conn: sqlite3.Connection, kind: str, key: str, now: float) -> Record | None:
    row = conn.execute(f"{_SELECT} WHERE kind = ? AND key = ? AND {_LIVE}", (kind, key, now)).fetchone()
    return None if row is None else _decode(row)


def put(conn: sqlite3.Connection, kind: str, key: str, data: Mapping[str, Any], *, version: int | None,
        expires_at: float | None, now: float) -> Record:
    """Create or replace, in the caller's write transaction. Raises RecordConflict, ValueError."""
    check_record_key(kind, key)
    text = encode_data(data)
    expiry = check_expiry(expires_at)
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise ValueError("version must be a positive integer or None")
    conn.execute(PRUNE, (now, PRUNE_BATCH))
    if version is None:
        written = conn.execute(CREATE, (kind, key, text, expiry, now)).rowcount
    else:
        written = conn.execute(REPLACE, (text, expiry, kind, key, version, now)).rowcount
    current = fetch(conn, kind, key, now)
    if not written or current is None:
        wanted = "absent" if version is None else f"at version {version}"
        found = "absent" if current is None else f"at version {current.version}"
        raise RecordConflict(f"record {kind}/{key} is {found}, expected {wanted}", current=current)
    return current


def delete(conn: sqlite3.Connection, kind: str, key: str, *, version: int | None, now: float) -> bool:
    check_record_key(kind, key)
    sql = f"DELETE FROM records WHERE kind = ? AND key = ? AND {_LIVE}"
    params: list[Any] = [kind, key, now]
    if version is not None:
        sql += " AND version = ?"
        params.append(version)
    deleted = conn.execute(sql, params).rowcount > 0
    conn.execute(PRUNE, (now, PRUNE_BATCH))
    return deleted


def list_page(conn: sqlite3.Connection, kind: str, *, limit: int, cursor: str | None, now: float) -> RecordPage:
    check_record_key(kind, "x")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be an integer in 1..{MAX_LIMIT}")
    sql = f"{_SELECT} WHERE kind = ? AND {_LIVE}"
    params: list[Any] = [kind, now]
    if cursor is not None:
        sql += " AND key > ?"
        params.append(_decode_cursor(cursor, kind))
    sql += " ORDER BY key LIMIT ?"
    params.append(limit + 1)  # one more than asked tells whether a next page exists
    rows = conn.execute(sql, params).fetchall()
    records = [_decode(row) for row in rows[:limit]]
    next_cursor = encode_cursor({"k": kind, "a": records[-1].key}) if len(rows) > limit else None
    return RecordPage(records=records, next_cursor=next_cursor)


def _decode_cursor(cursor: str, kind: str) -> str:
    cursor_kind, after = decode_cursor(cursor, ("k", "a"))
    if cursor_kind != kind or not isinstance(after, str):
        # A cursor of another kind's listing would start this one at an arbitrary key.
        raise RequestError("invalid cursor (or one from a listing of another kind)", field="cursor")
    return after


def _decode(row: tuple[Any, ...]) -> Record:
    kind, key, data, version, expires_at = row
    return Record(kind=kind, key=key, data=json.loads(data), version=version, expires_at=expires_at)
