"""What ``sdasync dlq`` prints and writes: rows like the API's JSON, and the redrive marker in the history."""

from __future__ import annotations

import json
from pathlib import Path

from sdasync import dlq
from sdasync.backends.base import DeadLetter
from sdasync.config import Settings
from sdasync.models import Api, Outcome, Task, TaskError, TaskStatus
from sdasync.service import open_backends
from sdasync.timefmt import iso

DEAD_AT = 1_796_155_200.0  # 2026-12-01T20:00:00Z


def test_iso_is_utc_with_milliseconds() -> None:
    assert iso(DEAD_AT) == "2026-12-01T20:00:00.000Z"
    assert iso(DEAD_AT + 0.25) == "2026-12-01T20:00:00.250Z"
    assert iso(None) is None


def test_a_row_names_its_counter_and_prints_iso_times() -> None:
    letter = DeadLetter(message_id="m1", body="t1", receive_count=3, reason="engine_rejected", dead_at=DEAD_AT)

    row = dlq.dead_letter_json(letter, "failed")

    assert row == {"taskId": "t1", "status": "failed", "reason": "engine_rejected", "deliveries": 3,
                   "deadAt": "2026-12-01T20:00:00.000Z", "messageId": "m1"}
    assert json.loads(json.dumps(row)) == row  # what the CLI prints is plain JSON
    assert "deliveries" in (dlq.list_dead.__doc__ or "")


def test_list_and_redrive_on_the_embedded_backends(tmp_path: Path) -> None:
    with open_backends(Settings(data_dir=tmp_path)) as backends:
        task = Task.new(Api.TXT2IMG, {"prompt": "x"})
        backends.queue.send(task.task_id)
        backends.store.create(task)
        failed = backends.store.transition(task.task_id, expected={TaskStatus.QUEUED}, to=TaskStatus.FAILED,
                                           changes={"error": TaskError("engine_rejected", "no"), "finished_at": 1.0})
        # A worker moves a failed task's message to the dead-letter queue.
        [delivery] = backends.queue.receive()
        backends.queue.dead_letter(delivery.receipt, reason="engine_rejected")

        [row] = dlq.list_dead(backends)
        assert (row["taskId"], row["status"], row["deliveries"]) == (task.task_id, "failed", delivery.receive_count)
        assert isinstance(row["deadAt"], str) and row["deadAt"].endswith("Z")

        assert dlq.redrive(backends) == [{"taskId": task.task_id, "result": "requeued"}]
        redriven = backends.store.get(task.task_id)
        assert redriven.status is TaskStatus.QUEUED and len(redriven.history) == len(failed.history) + 1
        marker = redriven.history[-1]
        assert marker.outcome is Outcome.REDRIVEN and marker.worker is None and marker.started_at is None
        assert marker.to_dict().keys() == {"attempt", "worker", "started_at", "ended_at", "outcome", "error"}
        assert dlq.list_dead(backends) == []
