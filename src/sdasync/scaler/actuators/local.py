"""Workers as ``sdasync worker`` processes on this machine: a laptop or one GPU box that scales to zero.

URL: ``local://?max=N`` (``max`` default 1: more than one worker per GPU rarely helps, and each loads its own
model). Keyword arguments: ``worker_args`` (the worker's command line after ``sdasync worker``: ``serve``
passes its resolved backend options) or a ready ``supervisor`` (serve's own, so ``/healthz`` follows it).

Built on ``WorkerSupervisor.resize``: scale-out starts processes; scale-in sends the newest extra workers one
SIGTERM each, and they finish (or hand back) their task before exiting. ``capacity()`` counts live workers as
running, and workers asked for but not alive (a crashed one awaiting its restart) as pending. Draining workers
count as neither: they take no new tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

from sdasync.backends.urls import query_params
from sdasync.errors import ConfigError
from sdasync.supervisor import WorkerSupervisor

URL_PARAMS: dict[str, type[Any]] = {"max": int}


class LocalScaler:
    capabilities = frozenset({"drain", "local"})

    def __init__(self, *, max: int = 1, worker_args: Sequence[str] = (),
                 supervisor: WorkerSupervisor | None = None, drain_timeout_s: float = 90.0) -> None:
        if max < 0:
            raise ConfigError(f"local:// max must be >= 0, not {max}")
        self.max = max
        self.supervisor = supervisor or WorkerSupervisor(worker_args, 0, drain_timeout_s=drain_timeout_s)
        #: A supervisor passed in is started and stopped by its owner (serve); one made here is ours.
        self._owns_supervisor = supervisor is None
        self._started = supervisor is not None

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Self:
        return cls(**query_params(url, URL_PARAMS), **kwargs)

    def capacity(self) -> tuple[int, int]:
        running = self.supervisor.alive()
        return running, max(0, self.supervisor.count - running)

    def set_desired(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"desired capacity must be >= 0, not {n}")
        if not self._started:
            self.supervisor.start()
            self._started = True
        self.supervisor.resize(min(n, self.max))

    def close(self) -> None:
        if self._owns_supervisor and self._started:
            self.supervisor.stop()
            self._started = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
