"""Result images in an Amazon S3 bucket, opened by browsers through presigned URLs or a CDN in front of it.

URL: ``s3://<bucket>/<prefix>?region=eu-west-1&cdn=https://dxxxx.cloudfront.net&expires=3600``

Query parameters:

``region``
    The bucket's region; otherwise the standard chain (``AWS_REGION``, shared config, ...).
``cdn``
    Base URL of a CDN (CloudFront with Origin Access Control) whose root maps to the bucket's root. ``url()`` then
    answers ``<cdn>/<prefix>/<key>``, unsigned. An ``https://`` (or ``http://``) URL without query.
``expires`` (seconds, default 3600, 1..604800)
    Lifetime of presigned URLs (SigV4 allows 7 days at most; temporary credentials end them sooner).

Keys follow the file store's rules (relative paths like ``<taskId>/0.png``; empty, ``.`` or ``..`` segments,
absolute paths, backslashes and NUL are refused with RequestError). The object key is ``<prefix>/<key>``.

Without a CDN, ``url()`` mints a presigned GET URL at call time. Store keys, never URLs: a stored one expires.
Presigning is local (a signature over the request, no call to S3). The bucket stays private: ``ensure()`` creates
it where missing, blocks all public access and sets SSE-S3 default encryption; run twice it changes nothing.

Retention: given ``retention_days`` (the service's one retention setting, a ``from_url`` keyword, not a URL
parameter), ``ensure()`` (``sdasync aws bootstrap``) also puts a lifecycle rule on the bucket that expires objects
under ``<prefix>/`` that many days (rounded up; S3 counts whole days from each object's creation) after they were
written. The rule has its own ID (``sdasync-expire:<prefix>``), so the other rules of the bucket, and the rules
of other prefixes sharing it (results and payloads), are kept; run twice, it changes nothing. The store has the
capability ``expires`` (the janitor then leaves its blobs alone) once it knows the bucket has that rule: after
``ensure()``, or after ``check_lifecycle()`` found it (one GetBucketLifecycleConfiguration; opening the store
makes no call). Until then, or when the check fails, it claims nothing, so blobs are deleted explicitly: claiming
it wrongly would keep them forever.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import threading
from typing import Any, Self
from urllib.parse import quote, unquote, urlsplit

from sdasync.awsclient import aws_client, error_code, translate_errors
from sdasync.backends.keys import check_key
from sdasync.errors import BackendError, BlobNotFound, ConfigError, RequestError, SdasyncError
from sdasync.urls import query_params

URL_PARAMS: dict[str, type[Any]] = {"region": str, "cdn": str, "expires": int}

MAX_EXPIRES_S = 7 * 86_400
#: Results live under deterministic keys that a retried attempt may overwrite before the task succeeds, so caches
#: keep them a day, not forever.
IMAGE_CACHE_CONTROL = "public, max-age=86400"

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_NO_LIFECYCLE_CODES = frozenset({"NoSuchLifecycleConfiguration"})
RULE_ID_PREFIX = "sdasync-expire:"

log = logging.getLogger(__name__)


class S3BlobStore:
    """Blobs as S3 objects; see the module docstring for the URL, its parameters and the key rules."""

    capabilities: frozenset[str]

    def __init__(self, *, bucket: str, prefix: str = "", region: str | None = None, cdn: str | None = None,
                 expires_s: int = 3600, retention_days: float | None = None, client: Any = None) -> None:
        if not _BUCKET.match(bucket) or ".." in bucket or _is_ip_address(bucket):
            raise ConfigError(f"S3 bucket name {bucket!r}: 3..63 lowercase letters, digits, '.' or '-'")
        prefix = prefix.strip("/")
        if prefix:
            try:
                check_key(prefix)
            except RequestError as exc:
                raise ConfigError(f"S3 prefix {prefix!r}: {exc.message}") from exc
        if cdn is not None:
            parts = urlsplit(cdn)
            if parts.scheme not in {"http", "https"} or not parts.netloc or parts.query or parts.fragment:
                raise ConfigError(f"cdn must be an http(s) URL without query, not {cdn!r}")
            cdn = cdn.rstrip("/")
        if not 1 <= expires_s <= MAX_EXPIRES_S:
            raise ConfigError(f"s3 blobs: expires must be 1..{MAX_EXPIRES_S} seconds, not {expires_s}")
        if retention_days is not None and not retention_days > 0:
            raise ConfigError(f"retention_days must be positive, not {retention_days!r}")
        self.bucket = bucket
        self.prefix = prefix
        self.region = region
        self.cdn = cdn
        self.expires_s = expires_s
        self.retention_days = retention_days
        self._static_capabilities = frozenset({"presigned_url", "cdn"} if cdn else {"presigned_url"})
        #: ``expires`` joins once ``ensure()`` set the lifecycle rule or ``check_lifecycle()`` found it.
        self.capabilities = self._static_capabilities
        # The client is made on first use: building the object (and from_url) touches no network.
        self._client = client
        self._owns_client = client is None
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Self:
        """Parse ``url`` (opens nothing). ``kwargs`` (e.g. ``client``) override the URL's parameters."""
        params = query_params(url, URL_PARAMS)
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ConfigError(f"{url!r}: expected s3://<bucket>/<prefix>")
        if "expires" in params:
            params["expires_s"] = params.pop("expires")
        return cls(bucket=parts.netloc, prefix=unquote(parts.path), **{**params, **kwargs})

    def check_lifecycle(self) -> bool:
        """Look the bucket's lifecycle rules up and add ``expires`` to ``capabilities`` when they hold this store's
        rule (with the store's retention, when it has one); returns whether they do. Never raises: a failed
        lookup counts as no rule, so blobs are then deleted explicitly."""
        expires = self._has_lifecycle_rule()
        self._set_expires(expires)
        return expires

    def _set_expires(self, expires: bool) -> None:
        self.capabilities = (self._static_capabilities | {"expires"}) if expires else self._static_capabilities

    @property
    def lifecycle_rule_id(self) -> str:
        return RULE_ID_PREFIX + (self.prefix or "*")

    def lifecycle_rule(self, retention_days: float) -> dict[str, Any]:
        """The lifecycle rule that expires this store's objects after ``retention_days``."""
        return {"ID": self.lifecycle_rule_id, "Status": "Enabled",
                "Filter": {"Prefix": f"{self.prefix}/" if self.prefix else ""},
                "Expiration": {"Days": max(1, math.ceil(retention_days))}}

    def _s3(self) -> Any:
        with self._lock:
            if self._closed:
                raise BackendError(f"s3 blobs {self.bucket!r} is closed")
            if self._client is None:
                # SigV4 for presigned URLs: botocore would otherwise presign with the deprecated SigV2 in
                # us-east-1, and virtual-hosted addressing gives regional hosts outside it.
                self._client = aws_client("s3", region=self.region, signature_version="s3v4",
                                          s3={"addressing_style": "virtual"})
            return self._client

    def object_key(self, key: str) -> str:
        """The S3 key of blob ``key``. Raises RequestError for an unsafe key."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def ensure(self) -> None:
        """Create the bucket if missing, block all public access, encrypt by default (SSE-S3). Idempotent.
        Raises ConfigError (e.g. the name belongs to another account), BackendError."""
        s3 = self._s3()
        region = self.region or s3.meta.region_name
        with translate_errors(f"create S3 bucket {self.bucket!r}"):
            try:
                if region in (None, "us-east-1"):
                    s3.create_bucket(Bucket=self.bucket)  # us-east-1 refuses a LocationConstraint naming itself
                else:
                    s3.create_bucket(Bucket=self.bucket, CreateBucketConfiguration={"LocationConstraint": region})
            except Exception as exc:
                code = error_code(exc)
                if code == "BucketAlreadyExists":
                    raise ConfigError(f"S3 bucket name {self.bucket!r} is taken by another account") from exc
                if code != "BucketAlreadyOwnedByYou":  # ours already (us-east-1 answers 200 instead)
                    raise
            s3.put_public_access_block(Bucket=self.bucket, PublicAccessBlockConfiguration={
                "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
                "RestrictPublicBuckets": True})
            s3.put_bucket_encryption(Bucket=self.bucket, ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
        if self.retention_days is not None:
            self._ensure_lifecycle(self.retention_days)

    def _ensure_lifecycle(self, retention_days: float) -> None:
        """Put this store's expiry rule among the bucket's lifecycle rules, keeping every other rule. A no-op when
        the rule is there as wanted. (PutBucketLifecycleConfiguration replaces the whole set, hence the merge.)"""
        s3 = self._s3()
        wanted = self.lifecycle_rule(retention_days)
        with translate_errors(f"set the lifecycle of S3 bucket {self.bucket!r}"):
            rules = self._lifecycle_rules()
            ours = [rule for rule in rules if rule.get("ID") == wanted["ID"]]
            if not (len(ours) == 1 and _same_rule(ours[0], wanted)):
                others = [rule for rule in rules if rule.get("ID") != wanted["ID"]]
                s3.put_bucket_lifecycle_configuration(Bucket=self.bucket,
                                                      LifecycleConfiguration={"Rules": [*others, wanted]})
        self._set_expires(True)

    def _lifecycle_rules(self) -> list[dict[str, Any]]:
        """The bucket's lifecycle rules; none when it has no configuration. Call inside translate_errors."""
        try:
            response = self._s3().get_bucket_lifecycle_configuration(Bucket=self.bucket)
        except Exception as exc:
            if error_code(exc) in _NO_LIFECYCLE_CODES:
                return []
            raise
        return [dict(rule) for rule in response.get("Rules", [])]

    def _has_lifecycle_rule(self) -> bool:
        try:
            with translate_errors(f"read the lifecycle of S3 bucket {self.bucket!r}"):
                rules = self._lifecycle_rules()
        except SdasyncError as exc:
            # Claiming "expires" wrongly would leave blobs forever; not claiming it costs explicit deletes.
            log.info("s3 blobs %s: lifecycle not checked (%s); blobs are deleted explicitly", self.bucket, exc)
            return False
        for rule in rules:
            if rule.get("ID") == self.lifecycle_rule_id and rule.get("Status") == "Enabled":
                return self.retention_days is None or _same_rule(rule, self.lifecycle_rule(self.retention_days))
        return False

    def put(self, key: str, data: bytes, *, content_type: str = "image/png") -> None:
        object_key = self.object_key(key)
        extra = {"CacheControl": IMAGE_CACHE_CONTROL} if content_type.startswith("image/") else {}
        with translate_errors(f"put s3://{self.bucket}/{object_key}"):
            self._s3().put_object(Bucket=self.bucket, Key=object_key, Body=data, ContentType=content_type, **extra)

    def get(self, key: str) -> bytes:
        object_key = self.object_key(key)
        with translate_errors(f"get s3://{self.bucket}/{object_key}"):
            try:
                response = self._s3().get_object(Bucket=self.bucket, Key=object_key)
            except Exception as exc:
                if error_code(exc) in _NOT_FOUND_CODES:
                    raise BlobNotFound(f"blob {key!r} not found") from exc
                raise
            body = response["Body"]
            try:
                data: bytes = body.read()  # inside the block: a connection lost mid-body is a BackendError too
            finally:
                body.close()
        return data

    def url(self, key: str, *, base_url: str) -> str:
        """A CDN URL when ``cdn`` is set, else a presigned GET URL valid ``expires_s`` seconds from now.
        ``base_url`` is not used: S3 serves the blobs, not the API."""
        object_key = self.object_key(key)
        if self.cdn:
            return f"{self.cdn}/{quote(object_key, safe='/')}"
        with translate_errors(f"presign s3://{self.bucket}/{object_key}"):
            url = self._s3().generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": object_key},
                                                    ExpiresIn=self.expires_s)
        return str(url)

    def delete(self, key: str) -> None:
        object_key = self.object_key(key)
        # DeleteObject succeeds for a missing key: nothing to catch.
        with translate_errors(f"delete s3://{self.bucket}/{object_key}"):
            self._s3().delete_object(Bucket=self.bucket, Key=object_key)

    def close(self) -> None:
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


def _same_rule(have: dict[str, Any], want: dict[str, Any]) -> bool:
    """Whether a rule as S3 returns it does what ``want`` asks (S3 may add or reorder fields)."""
    def prefix(rule: dict[str, Any]) -> str:
        return str((rule.get("Filter") or {}).get("Prefix", rule.get("Prefix", "")))

    return (have.get("Status") == want["Status"] and prefix(have) == prefix(want)
            and (have.get("Expiration") or {}).get("Days") == want["Expiration"]["Days"])


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
