"""Keeps a delivery hidden while its task runs, so a long generation is never handed to a second worker."""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from sdasync.backends.base import Queue
from sdasync.errors import ReceiptInvalid, SdasyncError

log = logging.getLogger(__name__)


class Heartbeat:
    """Extends the message's visibility every third of the timeout, from a background thread.

    A third leaves two missed beats of slack before the message reappears. If the receipt goes stale (the message
    was redelivered after all), ``lost`` is set and beats stop: the task's attempt number already fences this
    worker's writes.
    """

    def __init__(self, queue: Queue, receipt: str, *, visibility_timeout_s: float) -> None:
        self.queue = queue
        self.receipt = receipt
        self.timeout_s = visibility_timeout_s
        self.interval_s = visibility_timeout_s / 3
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sdasync-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout_s)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.queue.extend(self.receipt, timeout_s=self.timeout_s)
            except ReceiptInvalid:
                log.warning("lease lost: the message was redelivered to another worker")
                self.lost.set()
                return
            except SdasyncError as exc:
                # Transient: the next beat may succeed before the visibility timeout runs out.
                log.warning("heartbeat failed: %s", exc)
