"""One Settings object, built only at entry points (the CLI, the Lambda handlers) and passed down.

Every setting can come from a command-line option or from an environment variable named after it:
``--visibility-timeout`` <-> ``SDASYNC_VISIBILITY_TIMEOUT``. Options win over the environment, the environment
over a command's own defaults (``serve --autoscale`` sizes a local fleet differently from ``sdasync scaler``), and
those over the defaults below, which are the only ones. ``settings_from`` is the one place the environment is
read; ``Settings(...)`` itself reads nothing, so code and tests that build one get exactly what they pass.
pydantic-settings parses the variables, and pydantic's rules are the one way booleans are spelled
(``1/0``, ``true/false``, ``yes/no``, ``on/off``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from sdasync.errors import ConfigError
from sdasync.scaler.types import PolicyConfig
from sdasync.urls import url_for_path

ENV_PREFIX = "SDASYNC_"


def _comma_set(value: object) -> object:
    if isinstance(value, str):
        return frozenset(part.strip() for part in value.split(",") if part.strip())
    return value


CommaSet = Annotated[frozenset[str], NoDecode]


class _Section(BaseSettings):
    """A group of settings. Reads nothing by itself: ``settings_from`` hands it the environment it was given."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid", case_sensitive=False)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


class Limits(_Section):
    """What a request may ask for. Everything beyond is refused with a 4xx naming the field."""

    max_width: int = Field(default=2048, ge=64)
    max_height: int = Field(default=2048, ge=64)
    #: width x height x images of one task: 8 images of 1024x1024, or 2 of 2048x2048.
    max_total_pixels: int = Field(default=8 * 1024 * 1024, ge=1)
    min_steps: int = Field(default=1, ge=1)
    max_steps: int = Field(default=150, ge=1)
    #: batch_size x n_iter
    max_images: int = Field(default=8, ge=1)
    max_prompt_chars: int = Field(default=10_000, ge=1)
    max_body_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    allow_scripts: bool = False
    override_settings_allowlist: CommaSet = frozenset({"CLIP_stop_at_last_layers"})

    _split = field_validator("override_settings_allowlist", mode="before")(_comma_set)


_POLICY = PolicyConfig()


class ScalerSettings(_Section):
    """How ``sdasync scaler``, its Lambda and ``serve --autoscale`` size a fleet to the queue. The defaults are the
    policy's own (scaler/types.py), so the two never disagree."""

    #: What the scaler resizes: ``spotfleet://<id>``, ``asg://<group>``, ``local://?max=N``.
    fleet: str | None = None
    min_workers: int = Field(default=_POLICY.min_workers, ge=0)
    max_workers: int = Field(default=_POLICY.max_workers, ge=1)
    #: Queued + running tasks per worker before another starts.
    backlog_per_worker: int = Field(default=_POLICY.backlog_per_worker, ge=1)
    #: Seconds without work before idle workers go (busy ones never do).
    scale_in_cooldown: float = Field(default=_POLICY.scale_in_cooldown_s, ge=0)
    #: Seconds between decisions.
    scale_interval: float = Field(default=30.0, gt=0)
    #: Seconds a task should wait at most.
    target_wait: float = Field(default=_POLICY.target_wait_s, gt=0)
    #: Mean seconds per task, if known: sizes the fleet for the wait target.
    service_time: float | None = Field(default=_POLICY.service_time_s, gt=0)
    #: Seconds from launch to a ready worker.
    boot_time: float = Field(default=_POLICY.boot_time_s, ge=0)
    #: Most workers added per decision.
    max_scale_out_step: int | None = Field(default=_POLICY.max_scale_out_step, ge=1)

    def policy(self, *, min_workers: int | None = None) -> PolicyConfig:
        if self.min_workers > self.max_workers:
            raise ConfigError(f"need min_workers <= max_workers, got {self.min_workers} > {self.max_workers}")
        return PolicyConfig(min_workers=self.min_workers if min_workers is None else min_workers,
                            max_workers=self.max_workers, backlog_per_worker=self.backlog_per_worker,
                            scale_in_cooldown_s=self.scale_in_cooldown, target_wait_s=self.target_wait,
                            service_time_s=self.service_time, max_scale_out_step=self.max_scale_out_step,
                            boot_time_s=self.boot_time)


#: ``serve --autoscale`` runs workers on this machine: one at first, and it decides quickly.
LOCAL_SCALER_DEFAULTS: Mapping[str, object] = {"max_workers": 1, "backlog_per_worker": 1, "scale_interval": 2.0}


class Settings(_Section):
    # -- where things are
    data_dir: Path = Path("data")
    queue: str | None = None
    store: str | None = None
    blobs: str | None = None
    #: Where large request payloads live: never under the results, which a CDN may serve. Default: a sibling of
    #: the results (``file:///<data-dir>/requests``; for ``s3://bucket/prefix``, ``s3://bucket/requests``).
    payloads: str | None = None
    engine: str = "diffusers://tiny"
    #: Where the diffusers engine caches converted models; None: ``~/.cache``.
    cache_dir: Path | None = None
    log_level: str = "INFO"
    # -- tasks
    visibility_timeout: float = Field(default=60.0, ge=1)
    max_attempts: int = Field(default=3, ge=1)
    #: Payloads larger than this many JSON bytes are kept in the payload store, not in the task record (a
    #: DynamoDB item holds 400 KB).
    inline_payload_max: int = Field(default=64 * 1024, ge=1024, le=256 * 1024)
    #: Tasks, their stored payloads and their images are deleted this many days after they finish.
    retention_days: float = Field(default=30.0, gt=0)
    #: A task still ``queued`` this many seconds after its last change has its message sent again.
    requeue_after: float = Field(default=3600.0, gt=0)
    #: Seconds between two runs of the sweeper and the janitor inside ``serve`` / ``api`` (0 turns them off).
    sweep_interval: float = Field(default=60.0, ge=0)
    # -- the HTTP API
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    #: The API's public address, when it differs from what requests show (a proxy in front).
    public_url: str | None = None
    #: Host names image URLs may be built from (the request's Host header). None: the bind address, localhost,
    #: 127.0.0.1 and ::1, and the host of ``public_url``.
    trusted_hosts: CommaSet | None = None
    #: Seconds a client may take to send its request headers, and its body.
    header_timeout: float = Field(default=10.0, gt=0)
    body_timeout: float = Field(default=30.0, gt=0)
    #: Connections still sending their request, beyond which new connections are refused.
    max_incomplete_requests: int = Field(default=64, ge=1)
    #: The API Gateway stage or base path the Lambda handler strips from paths.
    api_base_path: str = "/"
    # -- trust (see docs/security.md)
    #: Require an API key on every route but /healthz. None: on unless the API listens on loopback only (always
    #: on under Lambda).
    auth: bool | None = None
    #: Seconds an image URL of the embedded blob store stays valid.
    url_ttl: float = Field(default=3600.0, gt=0)
    #: The secret that signs image URLs, shared by every API process; None: one generated into
    #: ``<data-dir>/secrets/url.key``.
    url_secret: str | None = Field(default=None, min_length=32)
    #: What encrypts webhook secrets at rest: ``file:///path/to/key`` (made on first use, mode 0600; default
    #: ``<data-dir>/secrets/master.key``) or ``kms://<key id or alias>?region=<region>``.
    secrets: str | None = None
    #: Submissions are refused (429 ``queue_full``) while this many messages wait in the queue.
    max_queue_depth: int | None = Field(default=None, ge=1)
    #: Seconds after submission by which every task must be finished, else it ends ``cancelled`` (``deadline``).
    max_task_age: float | None = Field(default=None, gt=0)
    #: Seconds an Idempotency-Key is remembered.
    idempotency_ttl: float = Field(default=86400.0, gt=0)
    #: Hosts, addresses or networks (``10.0.0.0/8``) webhooks may reach despite the SSRF guard, and over http.
    webhook_allow: CommaSet = frozenset()
    #: Seconds a webhook receiver has to connect, and to answer.
    webhook_timeout: float = Field(default=10.0, gt=0)
    #: Seconds a ``completed`` event is retried before it is abandoned (at least 24 h by default).
    webhook_retry_for: float = Field(default=86400.0, gt=0)
    # -- serve
    #: Worker processes beside the API.
    workers: int = Field(default=1, ge=0)
    #: Start with no workers and grow to ``max_workers`` with the queue, back to zero when it drains.
    autoscale: bool = False
    # -- workers
    #: After SIGTERM, seconds a worker's current task may still run before it is handed back.
    drain_timeout: float = Field(default=90.0, ge=0)
    #: Seconds a generation may take before it is interrupted and retried; None derives it from the request.
    generation_timeout: float | None = Field(default=None, gt=0)
    #: Exit when the queue is empty / after this many tasks / after this many idle seconds.
    burst: bool = False
    max_tasks: int | None = Field(default=None, ge=1)
    max_idle: float | None = Field(default=None, ge=0)
    #: Poll instance metadata for spot interruption and rebalance notices, and drain on one.
    watch_spot: bool = False
    #: Auto Scaling group whose scale-in protection a busy worker holds for its instance.
    asg_protect: str | None = None
    #: Instance metadata (IMDSv2) base URL; None: EC2's own address.
    imds_url: str | None = None
    #: This machine's EC2 instance id, when known without asking IMDS.
    instance_id: str | None = None
    #: Fault injection for the fault suite (see worker/faults.py) and its seed.
    faults: str = ""
    fault_errors: str = ""
    fault_seed: str = ""
    # -- the client commands (submit, status, cancel)
    api_url: str = "http://127.0.0.1:8080"
    #: The API key the client commands send (``Authorization: Bearer``).
    api_key: str | None = None
    #: Seconds ``submit --wait`` waits for a task.
    wait_timeout: float = Field(default=600.0, gt=0)
    # -- sections
    limits: Limits = Field(default_factory=lambda: Limits())
    scaler: ScalerSettings = Field(default_factory=lambda: ScalerSettings())

    SECTIONS: ClassVar[Mapping[str, type[_Section]]] = {"limits": Limits, "scaler": ScalerSettings}

    _split = field_validator("trusted_hosts", "webhook_allow", mode="before")(_comma_set)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _payloads_never_served(self) -> Settings:
        results, payloads = urlsplit(self.blobs_url), urlsplit(self.payloads_url)
        if results.scheme != payloads.scheme or results.netloc != payloads.netloc:
            return self
        inner, outer = payloads.path.strip("/"), results.path.strip("/")
        if not outer or inner == outer or inner.startswith(outer + "/"):
            raise ValueError(f"payloads {self.payloads_url} would sit inside the results {self.blobs_url}, which a "
                             f"CDN may serve: give the results a prefix (s3://bucket/results) or --payloads a place "
                             f"of its own")
        return self

    @model_validator(mode="after")
    def _events_outlive_their_retries(self) -> Settings:
        # A finished task is deleted after the retention: its completed event must be delivered or abandoned first.
        if self.webhook_retry_for > self.retention_s:
            raise ValueError(f"--webhook-retry-for {self.webhook_retry_for:g} s is longer than --retention-days "
                             f"{self.retention_days:g}: a task would be deleted while its webhook is still retried")
        return self

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
            # Same bucket and region, outside the results prefix; a CDN in front of the results never serves it.
            region = dict(parse_qsl(urlsplit(blobs).query)).get("region")
            return f"s3://{urlsplit(blobs).netloc}/requests" + (f"?region={region}" if region else "")
        return url_for_path("file", self.data_dir / "requests")

    @property
    def secrets_url(self) -> str:
        return self.secrets or url_for_path("file", self.data_dir / "secrets" / "master.key")

    @property
    def url_secret_path(self) -> Path:
        return self.data_dir / "secrets" / "url.key"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def retention_s(self) -> float:
        return self.retention_days * 86400.0


class _MappingEnv(EnvSettingsSource):
    """pydantic-settings' environment source over a mapping we are given, not the process's own environment."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls, case_sensitive=False, env_prefix=ENV_PREFIX, env_ignore_empty=True)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, False, True, None)


def settings_from(options: Mapping[str, Any], environ: Mapping[str, str], *,
                  defaults: Mapping[str, object] | None = None) -> Settings:
    """Build Settings from parsed options (None = not given), then ``environ``'s SDASYNC_* variables, then a
    command's ``defaults``, then the field defaults. Keys that name no setting (a command's own arguments) are
    ignored. Raises ConfigError naming the option or variable at fault."""
    given = {k: v for k, v in options.items() if v is not None}
    base = dict(defaults or {})
    sections: dict[str, _Section] = {}
    for name, section in Settings.SECTIONS.items():
        sections[name] = _build(section, given, environ, base)
    settings = _build(Settings, given, environ, base, **sections)
    assert isinstance(settings, Settings)
    return settings


def _build(model: type[_Section], given: Mapping[str, object], environ: Mapping[str, str],
           defaults: Mapping[str, object], **fixed: object) -> _Section:
    names = set(model.model_fields) - set(fixed)
    from_env = {k: v for k, v in _MappingEnv(model, environ)().items() if k in names}
    values = {**{k: v for k, v in defaults.items() if k in names}, **from_env,
              **{k: v for k, v in given.items() if k in names}, **fixed}
    try:
        return model(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        if not error["loc"]:  # a rule across fields: its message says it all
            raise ConfigError(str(error["msg"]).removeprefix("Value error, ")) from None
        name = str(error["loc"][0])
        if name in given:
            source = f"--{name.replace('_', '-')} {given[name]!r}"
        elif name in from_env:
            source = f"{ENV_PREFIX}{name.upper()}={from_env[name]!r}"
        else:
            source = name
        raise ConfigError(f"{source}: {error['msg']} ({name})") from None
