"""The Engine Protocol: what a worker needs from whatever draws the images."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, Self, runtime_checkable

from sdasync.models import Api, EngineHealth


@dataclass(frozen=True)
class Progress:
    step: int
    steps: int
    #: Seconds left, if the engine can tell.
    eta_s: float | None = None

    @property
    def fraction(self) -> float:
        return 0.0 if self.steps <= 0 else min(1.0, self.step / self.steps)


@dataclass(frozen=True)
class GenerationRequest:
    task_id: str
    api: Api
    #: WebUI fields, already validated and with defaults filled in by the service.
    payload: dict[str, Any]
    #: Called from the generating thread or an engine's polling thread, possibly often; must be cheap.
    on_progress: Callable[[Progress], None] | None = None
    #: Polled by the engine between steps; True stops the generation with GenerationCancelled.
    is_cancelled: Callable[[], bool] | None = None
    #: Seconds from the start of ``generate`` after which the engine stops and raises EngineTimeout (retryable);
    #: None means no deadline beyond the engine's own timeouts. ``engines.deadline.default_deadline_s`` derives one.
    deadline_s: float | None = None


@dataclass(frozen=True)
class GenerationResult:
    #: PNG bytes, one per image, in order.
    images: list[bytes]
    #: Generation info in the WebUI's shape: seed, all_seeds, infotexts, sampler_name, steps, width, height,
    #: sd_model_name, ...
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    capabilities: frozenset[str]

    def setup(self, stop: threading.Event | None = None) -> None:
        """Load the model or wait until the remote engine is ready. Called once before the first generate. A wait
        ends promptly once ``stop`` is set (the worker was asked to stop): EngineUnavailable. Logs what it waits
        for. Raises EngineUnavailable, ConfigError."""
        ...

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Raises EngineUnavailable / EngineTimeout (retryable), EngineRejected (the request cannot be served),
        GenerationCancelled."""
        ...

    def health(self) -> EngineHealth:
        """What the engine says of itself, without raising; cheap enough for a heartbeat."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...
