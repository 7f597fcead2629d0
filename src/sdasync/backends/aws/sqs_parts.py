"""Pieces of the SQS queue that need no client: receipts, message attributes, dead-letter records, SQS's whole
seconds. See ``sqs.py`` for why receipts carry more than SQS's handle."""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from sdasync.awsclient import error_code, translate_errors
from sdasync.backends.base import DeadLetter
from sdasync.errors import ReceiptInvalid

#: Message attributes that keep a message's identity and history across its copies.
ID_ATTRIBUTE, REASON_ATTRIBUTE, COUNT_ATTRIBUTE = "SdasyncMessageId", "SdasyncReason", "SdasyncReceiveCount"

_RECEIPT_PREFIX = "sdasync1."
_RECEIPT_CODES = frozenset({"ReceiptHandleIsInvalid", "MessageNotInflight",
                            "AWS.SimpleQueueService.MessageNotInflight"})


class _Receipt(NamedTuple):
    handle: str
    message_id: str
    receive_count: int
    body: str


@contextmanager
def _receipt_errors(action: str) -> Iterator[None]:
    """translate_errors, with the codes that mean a stale, expired or malformed receipt as ReceiptInvalid."""
    with translate_errors(action):
        try:
            yield
        except Exception as exc:
            code = error_code(exc)
            message = str(getattr(exc, "response", {}).get("Error", {}).get("Message", "")).lower()
            # Real SQS answers InvalidParameterValue "... for parameter ReceiptHandle is invalid" for handles
            # superseded by a later delivery or expired; other InvalidParameterValues are the caller's mistake.
            if code in _RECEIPT_CODES or (code == "InvalidParameterValue" and "receipt" in message):
                raise ReceiptInvalid(f"{action}: the receipt is not the message's current delivery ({code})") from exc
            raise


def _encode(receipt: _Receipt) -> str:
    payload = json.dumps(list(receipt), separators=(",", ":")).encode()
    return _RECEIPT_PREFIX + base64.urlsafe_b64encode(payload).decode("ascii")


def _decode(receipt: str) -> _Receipt:
    if not isinstance(receipt, str) or not receipt.startswith(_RECEIPT_PREFIX):
        raise ReceiptInvalid("not a receipt of an SqsQueue")
    try:
        handle, message_id, receive_count, body = json.loads(base64.urlsafe_b64decode(receipt[len(_RECEIPT_PREFIX):]))
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise ReceiptInvalid("malformed SqsQueue receipt") from exc
    decoded = _Receipt(handle, message_id, receive_count, body)
    if [type(field) for field in decoded] != [str, str, int, str]:
        raise ReceiptInvalid("malformed SqsQueue receipt")
    return decoded


def _dead_letter_of(raw: dict[str, Any], max_receives: int) -> DeadLetter:
    count = _attribute(raw, COUNT_ATTRIBUTE)
    if count is None or not count.isdigit():
        # Moved by SQS's redrive policy, which does so on the receive after maxReceiveCount: received that often.
        receive_count, reason = max_receives, f"received {max_receives} times (maxReceiveCount={max_receives})"
    else:
        receive_count, reason = int(count), _attribute(raw, REASON_ATTRIBUTE) or ""
    return DeadLetter(message_id=_attribute(raw, ID_ATTRIBUTE) or raw["MessageId"], body=raw["Body"],
                      receive_count=receive_count, reason=reason,
                      dead_at=int(raw.get("Attributes", {}).get("SentTimestamp", 0)) / 1000)


def _attribute(raw: dict[str, Any], name: str) -> str | None:
    value = raw.get("MessageAttributes", {}).get(name, {}).get("StringValue")
    return None if value is None else str(value)


def _string(value: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": value}


def _whole_seconds(name: str, value: float, maximum: int) -> int:
    """``value`` rounded up to SQS's whole seconds (never earlier than asked). Raises ValueError out of range."""
    if value < 0:
        raise ValueError(f"{name} must be >= 0, not {value}")
    seconds = math.ceil(value)
    if seconds > maximum:
        raise ValueError(f"{name} must be at most {maximum} s (SQS's limit), not {value}")
    return seconds
