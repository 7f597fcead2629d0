"""Standard Webhooks signatures: what a receiver checks with any Standard Webhooks library.

A secret is ``whsec_`` and the base64 of 32 random bytes; those bytes are the HMAC key. Each delivery carries
``webhook-id`` (the same on every retry of one event), ``webhook-timestamp`` (integer epoch seconds of this try)
and ``webhook-signature``: space-separated ``v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>``, one per
secret, so a tenant rotating its secret can be signed for with the old and the new one at once. Receivers refuse
timestamps more than ``TOLERANCE_S`` from their clock, which bounds how long a captured delivery can be replayed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets as _random
import time
from collections.abc import Mapping, Sequence

SECRET_PREFIX = "whsec_"  # noqa: S105 (the scheme's prefix, not a secret)
#: How far a delivery's timestamp may be from the receiver's clock (the scheme's recommended five minutes).
TOLERANCE_S = 300
_KEY_BYTES = 32


def new_secret() -> str:
    """A fresh signing secret, ``whsec_`` and base64 of 256 random bits."""
    return SECRET_PREFIX + base64.b64encode(_random.token_bytes(_KEY_BYTES)).decode("ascii")


def _key(secret: str) -> bytes:
    """The HMAC key of ``secret`` (with or without its ``whsec_`` prefix). Raises ValueError for a bad one."""
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("a webhook secret is 'whsec_' and base64") from exc
    if not key:
        raise ValueError("a webhook secret is 'whsec_' and base64")
    return key


def _signed_content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + body


def sign(secret: str | Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64>`` for each secret, space-separated. Raises ValueError for a
    malformed secret, or for an id holding a '.' or a space (it would make the signed content ambiguous)."""
    if not msg_id or any(c in msg_id for c in ". ,"):
        raise ValueError("a webhook id may not be empty or hold '.', ' ' or ','")
    keys = [secret] if isinstance(secret, str) else list(secret)
    if not keys:
        raise ValueError("no webhook secret to sign with")
    content = _signed_content(msg_id, int(timestamp), body)
    return " ".join("v1," + base64.b64encode(hmac.new(_key(s), content, hashlib.sha256).digest()).decode("ascii")
                    for s in keys)


def headers(secret: str | Sequence[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of one try."""
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(timestamp)),
            "webhook-signature": sign(secret, msg_id, timestamp, body)}


def verify(secret: str, request_headers: Mapping[str, str], body: bytes, *, now: float | None = None,
           tolerance_s: float = TOLERANCE_S) -> bool:
    """Whether a delivery (its headers, any case, and its raw body) is signed by ``secret`` and recent. What a
    receiver does; sdasync uses it in its docs and its own checks."""
    lowered = {k.lower(): v for k, v in request_headers.items()}
    msg_id = lowered.get("webhook-id", "")
    stamp = lowered.get("webhook-timestamp", "")
    if not msg_id or not stamp.isdigit():
        return False
    clock = time.time() if now is None else now
    if abs(clock - int(stamp)) > tolerance_s:
        return False
    try:
        expected = sign(secret, msg_id, int(stamp), body).removeprefix("v1,")
    except ValueError:
        return False
    for candidate in lowered.get("webhook-signature", "").split():
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected.encode()):
            return True
    return False
