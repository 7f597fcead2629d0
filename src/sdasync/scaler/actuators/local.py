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

from sdasync.errors import ConfigError
from sdasync.supervisor import WorkerSupervisor
from sdasync.urls import query_params

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
        # Draining workers still hold their GPU memory until they exit: they count against the cap.
        self.supervisor.resize(max(0, min(n, self.max - self.supervisor.draining_count())))

    def close(self) -> None:
        if self._owns_supervisor and self._started:
            self.supervisor.stop()
            self._started = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def running_worker_pids(store: Any) -> set[int]:
    """Pids of this host's workers that hold a running task, read from the task store (a worker's id is
    ``<hostname>-<pid>``): scale-in drains idle workers before busy ones."""
    import socket

    from sdasync.models import TaskStatus

    prefix = f"{socket.gethostname()}-"
    pids = set()
    for task in store.list(status=TaskStatus.RUNNING, limit=1000).tasks:
        if task.worker and task.worker.startswith(prefix) and task.worker[len(prefix):].isdigit():
            pids.add(int(task.worker[len(prefix):]))
    return pids
