"""Every error sdasync raises, in one tree.

::

    SdasyncError                      internal_error        500
     +-- ConfigError                  config_error          500  a bad URL, an unknown scheme, a missing extra
     +-- RequestError                 invalid_request       422  a client's request is refused (names the field)
     |    +-- PayloadTooLarge         payload_too_large     413
     |    +-- UnsupportedMediaType    unsupported_media_type 415 the body is not JSON in UTF-8
     +-- Unauthorized                 unauthorized          401  no API key, or one that is unknown or revoked
     +-- LimitExceeded                (the limit's name)    429  a quota or the queue's depth; retry_after_s says when
     +-- TaskNotFound                 task_not_found        404
     +-- TaskConflict                 conflict              409  a compare-and-set lost (status or attempt moved on)
     +-- RecordConflict               conflict              409  a record's compare-and-set lost (keys, quotas, outbox)
     +-- BlobNotFound                 blob_not_found        404
     +-- ReceiptInvalid               receipt_invalid       409  a queue receipt is no longer the current delivery
     +-- MetadataUnavailable          metadata_unavailable  500  no EC2 instance metadata here (IMDSv2)
     +-- MetadataError                metadata_error        500  instance metadata answered unexpectedly
     +-- BackendError  (retryable)    backend_unavailable   503  queue, store or blob store failed
     |    +-- BackendRefused          backend_refused       500  the backend refused the call itself (not retryable)
     +-- UnexpectedError  (retryable) internal_error        500  an engine or library raised something unforeseen
     +-- EngineError                  engine_error          502
          +-- EngineUnavailable  (retryable)   engine_unavailable   cannot connect, 5xx, not ready
          +-- EngineTimeout      (retryable)   engine_timeout       no answer in time
          +-- EngineRejected                   engine_rejected      the engine refuses this request (4xx)
          +-- GenerationCancelled              cancelled            a cancel was observed mid-generation

Third-party exceptions are translated to these once, at the adapter boundary, with ``raise ... from``. The worker
decides to retry by reading ``retryable``; the HTTP API maps ``http_status`` and ``code`` to its answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for the annotation: every module imports errors, so it stays free of runtime imports
    from sdasync.backends.records import Record
    from sdasync.models import Task


class SdasyncError(Exception):
    code = "internal_error"
    http_status = 500
    retryable = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ConfigError(SdasyncError):
    code = "config_error"


class RequestError(SdasyncError):
    code = "invalid_request"
    http_status = 422

    def __init__(self, message: str, *, field: str | None = None, **details: Any) -> None:
        super().__init__(message, **details)
        self.field = field


class PayloadTooLarge(RequestError):
    code = "payload_too_large"
    http_status = 413


class UnsupportedMediaType(RequestError):
    code = "unsupported_media_type"
    http_status = 415


class Unauthorized(SdasyncError):
    """Every route but /healthz answers this one way, whatever is wrong with the key: no oracle."""

    code = "unauthorized"
    http_status = 401


class LimitExceeded(SdasyncError):
    """Over a quota (``code`` names it: ``rate_limited``, ``max_queued``, ``max_active``, ``queue_full``)."""

    http_status = 429

    def __init__(self, message: str, *, code: str, retry_after_s: float, **details: Any) -> None:
        super().__init__(message, **details)
        self.code = code
        #: Seconds after which a retry may succeed (the Retry-After header, rounded up).
        self.retry_after_s = retry_after_s


class TaskNotFound(SdasyncError):
    code = "task_not_found"
    http_status = 404


class TaskConflict(SdasyncError):
    code = "conflict"
    http_status = 409

    def __init__(self, message: str, *, current: Task | None = None, **details: Any) -> None:
        super().__init__(message, **details)
        #: The task as it is now, when the backend could tell, else None.
        self.current: Task | None = current


class RecordConflict(SdasyncError):
    code = "conflict"
    http_status = 409

    def __init__(self, message: str, *, current: Record | None = None, **details: Any) -> None:
        super().__init__(message, **details)
        #: The record as it is now (None: absent), when the backend could tell.
        self.current: Record | None = current


class BlobNotFound(SdasyncError):
    code = "blob_not_found"
    http_status = 404


class ReceiptInvalid(SdasyncError):
    code = "receipt_invalid"
    http_status = 409


class MetadataUnavailable(SdasyncError):
    """Nothing answers at the instance metadata address (or it refuses tokens): most likely not on EC2."""

    code = "metadata_unavailable"


class MetadataError(SdasyncError):
    """Instance metadata answered, but not as documented."""

    code = "metadata_error"


class BackendError(SdasyncError):
    code = "backend_unavailable"
    http_status = 503
    retryable = True


class BackendRefused(BackendError):
    """The backend understood the call and refuses it (a validation error, an item too large): no retry helps."""

    code = "backend_refused"
    http_status = 500
    retryable = False


class UnexpectedError(SdasyncError):
    """An exception nobody translated (an engine bug, a library error). Retried: it may not happen again."""

    retryable = True


class EngineError(SdasyncError):
    code = "engine_error"
    http_status = 502


class EngineUnavailable(EngineError):
    code = "engine_unavailable"
    retryable = True


class EngineTimeout(EngineError):
    code = "engine_timeout"
    retryable = True


class EngineRejected(EngineError):
    code = "engine_rejected"


class GenerationCancelled(EngineError):
    code = "cancelled"
