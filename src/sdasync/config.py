"""One Settings object, built only at entry points (CLI, Lambda handler) and passed down.

Every setting can come from a command-line option or from an environment variable named after it:
``--visibility-timeout`` <-> ``SDASYNC_VISIBILITY_TIMEOUT``. Options win over the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sdasync.errors import ConfigError
from sdasync.urls import url_for_path

ENV_PREFIX = "SDASYNC_"


@dataclass(frozen=True)
class Limits:
    """What a request may ask for. Everything beyond is refused with a 4xx naming the field."""

    max_width: int = 2048
    max_height: int = 2048
    #: width x height x images of one task: 8 images of 1024x1024, or 2 of 2048x2048.
    max_total_pixels: int = 8 * 1024 * 1024
    min_steps: int = 1
    max_steps: int = 150
    #: batch_size x n_iter
    max_images: int = 8
    max_prompt_chars: int = 10_000
    max_body_bytes: int = 20 * 1024 * 1024
    allow_scripts: bool = False
    override_settings_allowlist: frozenset[str] = frozenset({"CLIP_stop_at_last_layers"})


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("data")
    queue: str | None = None
    store: str | None = None
    blobs: str | None = None
    engine: str = "diffusers://tiny"
    host: str = "127.0.0.1"
    port: int = 8080
    #: The API's public address, when it differs from what requests show (a proxy in front); else taken from the
    #: request.
    public_url: str | None = None
    visibility_timeout: float = 60.0
    max_attempts: int = 3
    #: Payloads larger than this many JSON bytes are kept in the payload store, not in the task record.
    inline_payload_max: int = 64 * 1024
    #: Where large request payloads live: never under the results, which a CDN may serve. Default: a sibling of
    #: the results (``file:///<data-dir>/requests``; for ``s3://bucket/prefix``, ``s3://bucket/requests``).
    payloads: str | None = None
    #: Tasks, their stored payloads and their images are deleted this many days after they finish.
    retention_days: float = 30.0
    #: A task still ``queued`` this many seconds after its last change has its message sent again.
    requeue_after: float = 3600.0
    #: Seconds between two runs of the sweeper and the janitor inside ``serve`` / ``api`` (0 turns them off).
    sweep_interval: float = 60.0
    #: After SIGTERM, seconds a worker's current task may still run before it is handed back.
    drain_timeout: float = 90.0
    #: Host names image URLs may be built from (the request's Host header). None: the bind address, localhost,
    #: 127.0.0.1 and ::1, and the host of ``public_url``.
    trusted_hosts: frozenset[str] | None = None
    #: Seconds a client may take to send its request headers, and its body.
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    #: Connections still sending their request, beyond which new connections are refused.
    max_incomplete_requests: int = 64
    #: Instance metadata (IMDSv2) base URL, for spot notices and the instance id; None: EC2's own address.
    imds_url: str | None = None
    #: This machine's EC2 instance id, when known without asking IMDS.
    instance_id: str | None = None
    #: Fault injection for the fault suite: ``point:probability,...`` (see worker/faults.py) and its seed.
    faults: str = ""
    fault_errors: str = ""
    fault_seed: str = ""
    #: The API Gateway stage or base path the Lambda handler strips from paths.
    api_base_path: str = "/"
    limits: Limits = field(default_factory=Limits)

    @property
    def queue_url(self) -> str:
        return self.queue or url_for_path("sqlite", self.data_dir / "sdasync.db")

    @property
    def store_url(self) -> str:
        return self.store or url_for_path("sqlite", self.data_dir / "sdasync.db")

    @property
    def blobs_url(self) -> str:
        return self.blobs or url_for_path("file", self.data_dir / "results")

    @property
    def payloads_url(self) -> str:
        if self.payloads:
            return self.payloads
        blobs = self.blobs_url
        if blobs.startswith("s3://"):
            from urllib.parse import urlsplit

            return f"s3://{urlsplit(blobs).netloc}/requests"
        return url_for_path("file", self.data_dir / "requests")

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"


def _convert(name: str, raw: str, kind: type[Any]) -> Any:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(raw)
            return lowered in {"1", "true", "yes", "on"}
        if kind is frozenset:
            return frozenset(part.strip() for part in raw.split(",") if part.strip())
        return kind(raw)
    except ValueError as exc:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}") from exc


_TYPES: dict[str, type[Any]] = {
    "data_dir": Path, "queue": str, "store": str, "blobs": str, "engine": str, "host": str, "port": int,
    "public_url": str, "visibility_timeout": float, "max_attempts": int, "inline_payload_max": int,
}


def env_value(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    return env.get(ENV_PREFIX + name.upper())


def settings_from(options: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from parsed options (None = not given), falling back to SDASYNC_* variables, then defaults."""
    values: dict[str, Any] = {}
    for f in fields(Settings):
        if f.name == "limits":
            continue
        values_from = options.get(f.name)
        if values_from is None:
            raw = env_value(f.name, environ)
            values_from = None if raw is None else _convert(f.name, raw, _TYPES[f.name])
        if values_from is not None:
            values[f.name] = values_from
    limit_values: dict[str, Any] = {}
    for f in fields(Limits):
        given = options.get(f.name)
        if given is None:
            raw = env_value(f.name, environ)
            kind = frozenset if f.name == "override_settings_allowlist" else type(getattr(Limits(), f.name))
            given = None if raw is None else _convert(f.name, raw, kind)
        if given is not None:
            limit_values[f.name] = given
    settings = Settings(**values, limits=Limits(**limit_values))
    _check(settings)
    return settings


def _check(settings: Settings) -> None:
    if settings.max_attempts < 1:
        raise ConfigError("max_attempts must be at least 1")
    if not 1024 <= settings.inline_payload_max <= 256 * 1024:
        raise ConfigError("inline_payload_max must be between 1024 and 262144 bytes (a DynamoDB item holds 400 KB)")
    if settings.visibility_timeout < 1:
        raise ConfigError("visibility_timeout must be at least 1 second")
    lim = settings.limits
    for name in ("max_width", "max_height", "max_total_pixels", "max_steps", "max_images", "max_prompt_chars",
                 "max_body_bytes"):
        if getattr(lim, name) < 1:
            raise ConfigError(f"{name} must be positive")
