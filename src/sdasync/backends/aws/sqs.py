"""Tasks on an Amazon SQS standard queue, with a dead-letter queue that SQS's redrive policy fills.

URL: ``sqs://<queue name>`` (in the credentials' account and region) or ``sqs://sqs.<region>.amazonaws.com/
<account>/<name>`` (a queue URL without its ``https://``; the region defaults to the host's).

Query parameters:

``region``
    AWS region; otherwise the URL's host, then the standard chain (``AWS_REGION``, shared config, ...).
``max_receives`` (default 10, 1..1000)
    The redrive policy's maxReceiveCount that ``ensure()`` sets: SQS moves a message to the dead-letter queue
    instead of delivering it a ``max_receives + 1``-th time. From the first ``receive`` on, the attribute
    ``max_receives`` reports the queue's actual policy.
``visibility_timeout`` (seconds, default 30)
    For ``receive`` calls that name none, and the queue's VisibilityTimeout set by ``ensure()``.
``wait`` (seconds, default 20, 0..20)
    The longest single long poll; ``receive(wait_s=...)`` polls again until ``wait_s`` has passed. 0 turns long
    polling off (a short poll a second while waiting).

AWS quirks absorbed here:

- SQS counts whole seconds: delays, visibility timeouts and waits are rounded up (a message never shows up earlier
  than asked). More than SQS allows (delay > 900 s, visibility > 12 h) is a ValueError. ``receive`` returns at
  most 10 messages, SQS's batch limit.
- Receipts are opaque strings carrying the SQS receipt handle plus the message's id, receive count and body, so
  ``dead_letter()`` can copy the body to the dead-letter queue from any process.
- SQS refuses to change visibility through a handle superseded by a later delivery; moto does not. This object
  also remembers the latest handle of each message it delivered, refuses older ones (ReceiptInvalid) and skips
  ``ack`` for them (SQS may honour an old handle's delete).
- ``dead_letter()`` and ``redrive()`` re-send the body as a new SQS message; the message id survives in the
  attribute ``SdasyncMessageId``. Both send before they delete: a crash in between duplicates, never loses.
- ``dead_letters()`` and ``redrive()`` read the dead-letter queue by receiving with a 30 s visibility timeout and
  give back what they leave at once; meanwhile other readers of that queue miss those messages.

``ensure()`` creates both queues (``<name>-dlq`` keeps messages 14 days, the queue 4) and sets the attributes
above; run twice it changes nothing. The dead-letter queue is found through the queue's RedrivePolicy, so queues
made by other tooling work too.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Collection
from typing import Any, Self
from urllib.parse import urlsplit

from sdasync.awsclient import aws_client, error_code, translate_errors
from sdasync.backends.aws.sqs_parts import (
    COUNT_ATTRIBUTE,
    ID_ATTRIBUTE,
    REASON_ATTRIBUTE,
    _attribute,
    _dead_letter_of,
    _decode,
    _encode,
    _Receipt,
    _receipt_errors,
    _string,
    _whole_seconds,
)
from sdasync.backends.base import DeadLetter, Message, QueueDepth
from sdasync.errors import BackendError, ConfigError, ReceiptInvalid
from sdasync.urls import query_params

log = logging.getLogger(__name__)

URL_PARAMS: dict[str, type[Any]] = {"region": str, "max_receives": int, "visibility_timeout": float, "wait": float}

MAX_DELAY_S, MAX_VISIBILITY_S, MAX_WAIT_S, MAX_BATCH = 900, 43_200, 20, 10
QUEUE_RETENTION_S, DLQ_RETENTION_S = 4 * 86_400, 14 * 86_400


#: How long dead_letters() / redrive() hide what they read; a crash mid-way gives it back this much later.
_PEEK_VISIBILITY_S = 30
#: Reads of the dead-letter queue long-poll: a short poll samples only some SQS servers and can miss messages.
_DLQ_WAIT_S = 1
#: Messages whose latest receipt this object remembers (a worker has a handful in flight).
_TRACKED = 10_000
_EXISTS_CODES = frozenset({"QueueAlreadyExists", "QueueNameExists", "AWS.SimpleQueueService.QueueNameExists"})
#: 80 characters at most, less the "-dlq" suffix; FIFO queues (".fifo") are not supported.
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,76}$")
_REGION_HOST = re.compile(r"^sqs\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?$")


class SqsQueue:
    """A Queue on SQS; see the module docstring for the URL, its parameters and the AWS quirks."""

    capabilities: frozenset[str] = frozenset({"dead_letter", "delay", "redrive", "long_poll", "batch"})

    def __init__(self, *, queue: str, region: str | None = None, max_receives: int = 10,
                 visibility_timeout: float = 30, wait_s: float = 20, client: Any = None) -> None:
        self.queue_url: str | None = None
        if queue.startswith("https://"):
            parts = urlsplit(queue)
            segments = parts.path.strip("/").split("/")
            if not parts.netloc or len(segments) != 2 or not all(segments) or parts.query:
                raise ConfigError(f"SQS queue URL {queue!r} must look like https://<host>/<account>/<name>")
            self.queue_url, queue = queue, segments[1]
            host = _REGION_HOST.match(parts.netloc)
            region = region or (host.group(1) if host else None)
        if not _QUEUE_NAME.match(queue):
            raise ConfigError(f"SQS queue name {queue!r}: 1..76 letters, digits, '-' or '_' (no FIFO queues)")
        if not 1 <= max_receives <= 1000:
            raise ConfigError(f"sqs queue: max_receives must be 1..1000, not {max_receives}")
        if not 0 <= visibility_timeout <= MAX_VISIBILITY_S:
            raise ConfigError(f"sqs queue: visibility_timeout must be 0..{MAX_VISIBILITY_S}, not {visibility_timeout}")
        if not 0 <= wait_s <= MAX_WAIT_S:
            raise ConfigError(f"sqs queue: wait must be 0..{MAX_WAIT_S} seconds, not {wait_s}")
        self.name = queue
        self.region = region
        self.max_receives = max_receives
        self.visibility_timeout = visibility_timeout
        self.wait_s = math.ceil(wait_s)
        # Nothing below is resolved until first use: building the object (and from_url) touches no network.
        self._client = client
        self._owns_client = client is None
        self._dlq: tuple[str, int] | None = None  # (URL, maxReceiveCount)
        self._policy_read = False
        self._lock = threading.Lock()
        self._latest: OrderedDict[str, str] = OrderedDict()  # message id -> receipt handle of its last delivery
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Self:
        """Parse ``url`` (opens nothing). ``kwargs`` (e.g. ``client``) override the URL's parameters."""
        params = query_params(url, URL_PARAMS)
        parts = urlsplit(url)
        if parts.scheme != "sqs" or not parts.netloc:
            raise ConfigError(f"{url!r}: expected sqs://<queue name> or sqs://sqs.<region>.amazonaws.com/<acct>/<name>")
        queue = f"https://{parts.netloc}{parts.path}" if parts.path.strip("/") else parts.netloc
        if "wait" in params:
            params["wait_s"] = params.pop("wait")
        return cls(queue=queue, **{**params, **kwargs})

    def _sqs(self) -> Any:
        with self._lock:
            if self._closed:
                raise BackendError(f"sqs queue {self.name!r} is closed")
            if self._client is None:
                self._client = aws_client("sqs", region=self.region)
            return self._client

    def _url(self) -> str:
        if self.queue_url is None:
            with translate_errors(f"find SQS queue {self.name!r}"):
                self.queue_url = str(self._sqs().get_queue_url(QueueName=self.name)["QueueUrl"])
        return self.queue_url

    def _dead_letter_queue(self) -> tuple[str, int]:
        """The dead-letter queue's URL and maxReceiveCount. Raises ConfigError if the queue has none."""
        if self._dlq is None:
            self._read_redrive_policy()
            if self._dlq is None:
                raise ConfigError(f"SQS queue {self.name!r} has no RedrivePolicy: run `sdasync aws bootstrap`")
        return self._dlq

    def _read_redrive_policy(self) -> None:
        """Find the dead-letter queue and the maxReceiveCount SQS enforces, which ``max_receives`` then reports:
        a queue made by other tooling may not have the count this object was configured with."""
        with translate_errors(f"read the redrive policy of SQS queue {self.name!r}"):
            sqs = self._sqs()
            attributes = sqs.get_queue_attributes(QueueUrl=self._url(), AttributeNames=["RedrivePolicy"])
            policy = json.loads(attributes.get("Attributes", {}).get("RedrivePolicy") or "{}")
            if policy:
                _, _, _, _, account, dlq_name = str(policy["deadLetterTargetArn"]).split(":", 5)  # an SQS ARN
                url = sqs.get_queue_url(QueueName=dlq_name, QueueOwnerAWSAccountId=account)["QueueUrl"]
                self._dlq = (str(url), int(policy["maxReceiveCount"]))
                self.max_receives = self._dlq[1]
        self._policy_read = True

    def ensure(self) -> None:
        """Create the queue and its dead-letter queue ``<name>-dlq`` where missing, and set their attributes to
        what this object names (VisibilityTimeout, RedrivePolicy with ``max_receives``, retention 4 days on the
        queue and 14 on the dead-letter queue). Idempotent. Raises ConfigError, BackendError."""
        dlq_url = self._create_queue(f"{self.name}-dlq", {"MessageRetentionPeriod": str(DLQ_RETENTION_S)})
        with translate_errors(f"read the ARN of SQS queue {self.name}-dlq"):
            attributes = self._sqs().get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])
        policy = {"deadLetterTargetArn": attributes["Attributes"]["QueueArn"], "maxReceiveCount": self.max_receives}
        url = self._create_queue(self.name, {
            "VisibilityTimeout": str(math.ceil(self.visibility_timeout)),
            "MessageRetentionPeriod": str(QUEUE_RETENTION_S),
            "RedrivePolicy": json.dumps(policy, separators=(",", ":")),
        })
        self.queue_url = self.queue_url or url
        self._dlq, self._policy_read = (dlq_url, self.max_receives), True

    def _create_queue(self, name: str, attributes: dict[str, str]) -> str:
        sqs = self._sqs()
        with translate_errors(f"create SQS queue {name!r}"):
            try:
                return str(sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"])
            except Exception as exc:
                if error_code(exc) not in _EXISTS_CODES:
                    raise
            # CreateQueue refuses to change an existing queue's attributes; SetQueueAttributes does.
            url = str(sqs.get_queue_url(QueueName=name)["QueueUrl"])
            sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)
            return url

    # The Queue Protocol ---------------------------------------------------------------------------------------

    def send(self, body: str, *, delay_s: float = 0) -> str:
        delay = _whole_seconds("delay_s", delay_s, MAX_DELAY_S)
        with translate_errors(f"send to SQS queue {self.name!r}"):
            response = self._sqs().send_message(QueueUrl=self._url(), MessageBody=body, DelaySeconds=delay)
        return str(response["MessageId"])

    def receive(self, *, max_messages: int = 1, wait_s: float = 0, visibility_timeout_s: float | None = None
                ) -> list[Message]:
        if max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, not {max_messages}")
        timeout = _whole_seconds("visibility_timeout_s", self.visibility_timeout if visibility_timeout_s is None
                                 else visibility_timeout_s, MAX_VISIBILITY_S)
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            poll = min(self.wait_s, math.ceil(max(0.0, deadline - time.monotonic())))
            try:
                if not self._policy_read:
                    self._read_redrive_policy()  # before the first delivery: callers then read SQS's max_receives
                messages = self._receive_once(min(max_messages, MAX_BATCH), poll, timeout)
            except BackendError:
                if self._closed:
                    return []  # closed under a waiting receive (a worker shutting down)
                raise
            remaining = deadline - time.monotonic()
            if messages or self._closed or remaining <= 0:
                return messages
            if poll == 0:
                time.sleep(min(remaining, 1.0))

    def _receive_raw(self, queue_url: str, max_messages: int, wait_s: int, timeout: int, system_attribute: str,
                     attributes: list[str]) -> list[dict[str, Any]]:
        with translate_errors(f"receive from SQS queue {queue_url.rsplit('/', 1)[-1]!r}"):
            response = self._sqs().receive_message(
                QueueUrl=queue_url, MaxNumberOfMessages=max_messages, WaitTimeSeconds=wait_s,
                VisibilityTimeout=timeout, MessageSystemAttributeNames=[system_attribute],
                MessageAttributeNames=attributes)
        messages: list[dict[str, Any]] = response.get("Messages", [])
        return messages

    def _receive_once(self, max_messages: int, wait_s: int, timeout: int) -> list[Message]:
        delivered = []
        for raw in self._receive_raw(self._url(), max_messages, wait_s, timeout, "ApproximateReceiveCount",
                                     [ID_ATTRIBUTE]):
            receipt = _Receipt(handle=raw["ReceiptHandle"],
                               message_id=_attribute(raw, ID_ATTRIBUTE) or raw["MessageId"],
                               receive_count=int(raw.get("Attributes", {}).get("ApproximateReceiveCount", 1)),
                               body=raw["Body"])
            self._remember(receipt)
            delivered.append(Message(message_id=receipt.message_id, body=receipt.body, receipt=_encode(receipt),
                                     receive_count=receipt.receive_count))
        return delivered

    def ack(self, receipt: str) -> None:
        try:
            current = self._current(receipt)
            with _receipt_errors(f"delete a message from SQS queue {self.name!r}"):
                self._sqs().delete_message(QueueUrl=self._url(), ReceiptHandle=current.handle)
            self._forget(current)
        except ReceiptInvalid as exc:
            log.debug("ack ignored: %s", exc)  # superseded, expired or malformed: someone else's, or gone

    def nack(self, receipt: str, *, delay_s: float = 0) -> None:
        self._change_visibility(receipt, _whole_seconds("delay_s", delay_s, MAX_VISIBILITY_S))

    def extend(self, receipt: str, *, timeout_s: float) -> None:
        self._change_visibility(receipt, _whole_seconds("timeout_s", timeout_s, MAX_VISIBILITY_S))

    def _change_visibility(self, receipt: str, seconds: int) -> None:
        current = self._current(receipt)
        with _receipt_errors(f"change the visibility of a message of SQS queue {self.name!r}"):
            self._sqs().change_message_visibility(QueueUrl=self._url(), ReceiptHandle=current.handle,
                                                  VisibilityTimeout=seconds)

    def dead_letter(self, receipt: str, *, reason: str = "") -> None:
        current = self._current(receipt)
        dlq_url, _ = self._dead_letter_queue()
        sqs = self._sqs()
        action = f"dead-letter a message of SQS queue {self.name!r}"
        with _receipt_errors(action):
            # Hiding it first proves the receipt current (else ReceiptInvalid, nothing copied) and keeps the message
            # from another worker while the copy is made.
            sqs.change_message_visibility(QueueUrl=self._url(), ReceiptHandle=current.handle,
                                          VisibilityTimeout=max(_PEEK_VISIBILITY_S, math.ceil(self.visibility_timeout)))
        attributes = {ID_ATTRIBUTE: _string(current.message_id),
                      COUNT_ATTRIBUTE: {"DataType": "Number", "StringValue": str(current.receive_count)}}
        if reason:  # SQS refuses empty attribute values
            attributes[REASON_ATTRIBUTE] = _string(reason[:1000])
        with translate_errors(action):
            sqs.send_message(QueueUrl=dlq_url, MessageBody=current.body, MessageAttributes=attributes)
        with _receipt_errors(action):
            sqs.delete_message(QueueUrl=self._url(), ReceiptHandle=current.handle)
        self._forget(current)

    def depth(self) -> QueueDepth:
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                 "ApproximateNumberOfMessagesDelayed"]
        with translate_errors(f"read the depth of SQS queue {self.name!r}"):
            attributes = self._sqs().get_queue_attributes(QueueUrl=self._url(), AttributeNames=names)["Attributes"]
        visible, in_flight, delayed = (int(attributes.get(name, 0)) for name in names)
        return QueueDepth(visible=visible, in_flight=in_flight, delayed=delayed)

    # Beyond the Queue Protocol: inspecting and redriving dead letters (capability "redrive") -------------------

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Up to ``limit`` messages of the dead-letter queue, oldest first, left in place. ``dead_at`` is when
        ``dead_letter()`` moved a message, or its original send time when SQS's redrive policy did (SQS keeps it).
        Raises ConfigError without a dead-letter queue, BackendError."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit}")
        dlq_url, max_receives = self._dead_letter_queue()
        found: dict[str, DeadLetter] = {}
        taken: list[str] = []
        try:
            while len(found) < limit:
                batch = self._receive_dead(dlq_url, min(MAX_BATCH, limit - len(found)))
                if not batch:
                    break
                for raw in batch:
                    taken.append(raw["ReceiptHandle"])
                    found.setdefault(raw["MessageId"], _dead_letter_of(raw, max_receives))
        finally:
            self._give_back(dlq_url, taken)
        return sorted(found.values(), key=lambda d: (d.dead_at, d.message_id))[:limit]

    def redrive(self, message_ids: Collection[str] | None = None) -> int:
        """Move dead letters (all, or those named) back to the queue as new messages (receive count 1, same
        message id). Returns how many moved; ids that are not dead letters are ignored. Raises ConfigError,
        BackendError."""
        if isinstance(message_ids, str):
            raise TypeError("message_ids must be a collection of ids, not one string")
        wanted = None if message_ids is None else set(message_ids)
        if wanted is not None and not wanted:
            return 0
        dlq_url, _ = self._dead_letter_queue()
        sqs, url = self._sqs(), self._url()
        moved: list[str] = []
        skipped: list[str] = []
        try:
            while wanted is None or not wanted <= set(moved):
                batch = self._receive_dead(dlq_url, MAX_BATCH)
                if not batch:
                    break
                for raw in batch:
                    message_id = _attribute(raw, ID_ATTRIBUTE) or raw["MessageId"]
                    if wanted is not None and message_id not in wanted:
                        skipped.append(raw["ReceiptHandle"])
                        continue
                    with translate_errors(f"redrive a dead letter to SQS queue {self.name!r}"):
                        # Send, then delete: a crash in between leaves a duplicate, never a loss.
                        sqs.send_message(QueueUrl=url, MessageBody=raw["Body"],
                                         MessageAttributes={ID_ATTRIBUTE: _string(message_id)})
                        sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=raw["ReceiptHandle"])
                    moved.append(message_id)
        finally:
            self._give_back(dlq_url, skipped)
        return len(moved)

    def _receive_dead(self, dlq_url: str, max_messages: int) -> list[dict[str, Any]]:
        return self._receive_raw(dlq_url, max_messages, _DLQ_WAIT_S, _PEEK_VISIBILITY_S, "SentTimestamp",
                                 [ID_ATTRIBUTE, REASON_ATTRIBUTE, COUNT_ATTRIBUTE])

    def _give_back(self, queue_url: str, handles: list[str]) -> None:
        """Make messages read from ``queue_url`` visible again now."""
        for start in range(0, len(handles), MAX_BATCH):
            entries = [{"Id": str(i), "ReceiptHandle": handle, "VisibilityTimeout": 0}
                       for i, handle in enumerate(handles[start:start + MAX_BATCH])]
            with translate_errors(f"give back dead letters of SQS queue {self.name!r}"):
                # Entries that fail stay hidden until the peek's visibility timeout ends: harmless.
                self._sqs().change_message_visibility_batch(QueueUrl=queue_url, Entries=entries)

    def _remember(self, receipt: _Receipt) -> None:
        with self._lock:
            self._latest[receipt.message_id] = receipt.handle
            self._latest.move_to_end(receipt.message_id)
            while len(self._latest) > _TRACKED:
                self._latest.popitem(last=False)

    def _current(self, receipt: str) -> _Receipt:
        """The decoded receipt; ReceiptInvalid if malformed or if this object has since delivered the message
        again (SQS itself refuses such a handle; emulators may not)."""
        decoded = _decode(receipt)
        with self._lock:
            latest = self._latest.get(decoded.message_id)
        if latest is not None and latest != decoded.handle:
            raise ReceiptInvalid(f"queue {self.name!r}: the message was delivered again since this receipt")
        return decoded

    def _forget(self, receipt: _Receipt) -> None:
        with self._lock:
            if self._latest.get(receipt.message_id) == receipt.handle:
                del self._latest[receipt.message_id]

    def close(self) -> None:
        """Release the client. A receive waiting in a long poll returns (with nothing) when the poll ends."""
        with self._lock:
            self._closed = True
            client = self._client if self._owns_client else None  # an injected client is the caller's
            if self._owns_client:
                self._client = None
        if client is not None:
            client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
