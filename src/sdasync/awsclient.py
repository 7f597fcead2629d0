"""boto3 clients with explicit timeouts and retries, and the one place botocore errors become sdasync errors.

Region and credentials come from the standard AWS chain (environment, shared config, instance role); a backend
URL's ``region`` parameter overrides the region. ``AWS_ENDPOINT_URL`` (and the per-service variables such as
``AWS_ENDPOINT_URL_SQS``) are honoured by boto3 itself, which is how the tests reach a moto_server.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Imported at module level: the registry turns a missing boto3 into "pip install 'sdasync[aws]'" when it imports
# an AWS backend module, which imports this one.
import boto3
from botocore import exceptions as bex
from botocore.config import Config

from sdasync.errors import BackendError, BackendRefused, ConfigError, SdasyncError

#: Error codes that mean "try again": throttling, capacity, transient server trouble.
RETRYABLE_CODES = frozenset({
    "ThrottlingException", "Throttling", "ThrottledException", "RequestThrottled", "RequestThrottledException",
    "ProvisionedThroughputExceededException", "RequestLimitExceeded", "TooManyRequestsException",
    "SlowDown", "ServiceUnavailable", "InternalError", "InternalServerError", "InternalFailure",
    "RequestTimeout", "RequestTimeoutException", "TransactionInProgressException", "LimitExceededException",
    "KMS.ThrottlingException", "OverLimit",
})
#: Error codes that mean the configuration is wrong: retrying will not help.
CONFIG_CODES = frozenset({
    "AccessDenied", "AccessDeniedException", "UnrecognizedClientException", "InvalidClientTokenId",
    "SignatureDoesNotMatch", "ExpiredToken", "ExpiredTokenException", "AWS.SimpleQueueService.NonExistentQueue",
    "QueueDoesNotExist", "ResourceNotFoundException", "NoSuchBucket", "InvalidAccessKeyId",
})


def aws_client(service: str, *, region: str | None = None, connect_timeout_s: float = 5.0,
               read_timeout_s: float = 30.0, retry_mode: str | None = None, max_attempts: int = 5,
               **config: Any) -> Any:
    """A boto3 client. ``read_timeout_s`` must exceed any long-poll wait (SQS waits up to 20 s).

    Retries use botocore's ``standard`` mode unless ``retry_mode`` says otherwise (``adaptive``), which backs off
    with jitter on throttling and transient errors before sdasync ever sees them. ``config`` adds botocore Config
    options (S3's ``signature_version``, say)."""
    retries: Any = {"mode": retry_mode or "standard", "max_attempts": max_attempts}
    botocore_config = Config(
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        retries=retries,
        user_agent_extra="sdasync",
        **config,
    )
    with translate_errors(f"create {service} client"):
        return boto3.session.Session().client(service, region_name=region, config=botocore_config)  # type: ignore[call-overload]


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


@contextmanager
def translate_errors(action: str) -> Iterator[None]:
    """Turn botocore exceptions raised inside the block into BackendError (retryable) or ConfigError.

    Backends catch the specific codes they handle (a failed condition, a stale receipt) inside the block first."""
    try:
        yield
    except SdasyncError:
        raise
    except (bex.NoRegionError, bex.NoCredentialsError, bex.PartialCredentialsError) as exc:
        raise ConfigError(f"{action}: {exc} (set AWS_REGION/AWS_DEFAULT_REGION and credentials, or add "
                          f"?region= to the URL)") from exc
    except bex.ClientError as exc:
        code = error_code(exc)
        message = f"{action}: {code}: {exc}"
        if code in CONFIG_CODES:
            raise ConfigError(message) from exc
        if code in RETRYABLE_CODES or _status(exc) >= 500:
            raise BackendError(message) from exc
        raise BackendRefused(message) from exc
    except (bex.EndpointConnectionError, bex.ConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError,
            bex.HTTPClientError) as exc:
        raise BackendError(f"{action}: {exc}") from exc
    except bex.BotoCoreError as exc:
        raise BackendError(f"{action}: {exc}") from exc


def _status(exc: BaseException) -> int:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return 0


class LazyClient:
    """A boto3 client made on first use (so ``from_url`` and constructors stay offline), closed by ``close()`` only
    when it was made here: an injected client belongs to the caller."""

    def __init__(self, service: str, *, region: str | None = None, client: Any = None) -> None:
        self.service = service
        self.region = region
        self._client = client
        self._owns = client is None

    def get(self) -> Any:
        if self._client is None:
            self._client = aws_client(self.service, region=self.region)
        return self._client

    def close(self) -> None:
        if self._client is not None and self._owns:
            self._client.close()
            self._client = None
