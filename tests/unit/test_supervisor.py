from __future__ import annotations

import itertools
from typing import Any

from sdasync.supervisor import WorkerSupervisor

PIDS = itertools.count(1000)


class FakeProcess:
    def __init__(self) -> None:
        self.pid = next(PIDS)
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return None

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)


def supervisor(count: int) -> tuple[WorkerSupervisor, list[Any]]:
    sup = WorkerSupervisor([], 0)
    made: list[Any] = []

    def spawn() -> Any:
        made.append(FakeProcess())
        return made[-1]

    sup._spawn = spawn  # type: ignore[method-assign]
    sup.resize(count)
    return sup, made


def test_scale_in_drains_idle_workers_before_busy_ones() -> None:
    sup, made = supervisor(3)
    newest_busy = made[2]
    sup.busy_pids = lambda: {newest_busy.pid}
    sup.resize(1)
    assert newest_busy.signals == []  # kept: it holds a task
    assert [p.signals != [] for p in made] == [True, True, False]
    assert sup.processes == [newest_busy]
    assert len(sup.draining) == 2


def test_without_busy_information_the_newest_go_first() -> None:
    sup, made = supervisor(3)
    sup.resize(2)
    assert [p.signals != [] for p in made] == [False, False, True]
