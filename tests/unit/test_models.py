"""The task model and its state machine: the TRANSITIONS table, pinned pair by pair."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest

from sdasync import models
from sdasync.backends.base import check_transition
from sdasync.models import (
    MUTABLE_FIELDS,
    TERMINAL,
    TRANSITIONS,
    Api,
    AttemptRecord,
    EngineHealth,
    Outcome,
    Task,
    TaskError,
    TaskProgress,
    TaskStatus,
    can_transition,
    plain_field,
)

Q, R, S, F, C = (TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.SUCCEEDED, TaskStatus.FAILED,
                 TaskStatus.CANCELLED)

#: Written out by hand so that any change to models.TRANSITIONS has to be made twice, on purpose.
ALLOWED = {
    (Q, Q),  # the sweeper re-sent a stranded task's message and says so in its history
    (Q, R), (Q, C), (Q, F),
    (R, R), (R, Q), (R, S), (R, F), (R, C),
    (F, Q),  # an operator's redrive of a dead-lettered task
}
ALL_PAIRS = list(itertools.product(TaskStatus, repeat=2))


@pytest.mark.parametrize(("src", "dst"), ALL_PAIRS, ids=[f"{s}->{d}" for s, d in ALL_PAIRS])
def test_every_pair_is_allowed_or_refused_as_designed(src: TaskStatus, dst: TaskStatus) -> None:
    allowed = (src, dst) in ALLOWED

    assert can_transition(src, dst) is allowed
    assert (dst in TRANSITIONS[src]) is allowed
    if allowed:
        check_transition({src}, dst)
    else:
        with pytest.raises(ValueError, match="not allowed"):
            check_transition({src}, dst)


def test_the_table_names_every_status_and_nothing_else() -> None:
    assert set(TRANSITIONS) == set(TaskStatus)
    assert all(targets <= set(TaskStatus) for targets in TRANSITIONS.values())


@pytest.mark.parametrize("status", [S, C])
def test_succeeded_and_cancelled_have_no_exit(status: TaskStatus) -> None:
    assert status.is_terminal
    assert TRANSITIONS[status] == frozenset()
    assert not any(can_transition(status, dst) for dst in TaskStatus)


def test_failed_is_terminal_but_for_a_redrive_back_to_queued() -> None:
    assert F.is_terminal
    assert TRANSITIONS[F] == frozenset({Q})
    with pytest.raises(ValueError, match="not allowed"):
        check_transition({F}, R)  # a redrive re-queues; only a worker's claim makes it run


def test_terminal_means_succeeded_failed_or_cancelled() -> None:
    assert {S, F, C} == TERMINAL
    assert not Q.is_terminal
    assert not R.is_terminal


def test_every_non_terminal_state_can_reach_a_terminal_one() -> None:
    for status in set(TaskStatus) - TERMINAL:
        assert TRANSITIONS[status] & TERMINAL, status


def test_check_transition_needs_every_expected_status_to_allow_it() -> None:
    check_transition({Q, R}, C)
    with pytest.raises(ValueError, match="not allowed"):
        check_transition({Q, R}, S)  # queued -> succeeded is not allowed
    with pytest.raises(ValueError, match="at least one"):
        check_transition(set(), R)


def test_statuses_are_their_wire_strings() -> None:
    assert [str(s) for s in TaskStatus] == ["queued", "running", "succeeded", "failed", "cancelled"]
    assert TaskStatus("running") is R


def test_only_two_engine_routes_exist() -> None:
    assert {str(a) for a in Api} == {"/sdapi/v1/txt2img", "/sdapi/v1/img2img"}
    assert (Api.TXT2IMG.kind, Api.IMG2IMG.kind) == ("txt2img", "img2img")
    with pytest.raises(ValueError, match="options"):
        Api("/sdapi/v1/options")


def test_task_error_round_trips_through_a_dict() -> None:
    error = TaskError(code="engine_timeout", message="no answer")
    assert TaskError.from_dict(error.to_dict()) == error


def test_new_task_starts_queued_at_the_given_time() -> None:
    task = Task.new(Api.TXT2IMG, {"prompt": "a cat"}, now=123.5)

    assert (task.status, task.created_at, task.updated_at, task.attempts) == (Q, 123.5, 123.5, 0)
    assert (task.images, task.error, task.worker, task.extra) == ((), None, None, {})
    assert (task.lease_until, task.history) == (None, ())


def test_with_changes_touches_only_mutable_fields() -> None:
    task = Task.new(Api.TXT2IMG, {}, now=1.0)

    moved = task.with_changes(R, {"attempts": 1, "worker": "w1"}, now=2.0)

    assert (moved.status, moved.attempts, moved.worker, moved.updated_at, moved.created_at) == (R, 1, "w1", 2.0, 1.0)
    with pytest.raises(ValueError, match="mutable"):
        task.with_changes(R, {"payload": {}}, now=2.0)


def test_lease_and_history_are_mutable() -> None:
    record = {"attempt": 1, "worker": "w1", "started_at": 2.0, "ended_at": 3.5, "outcome": "retried",
              "error": {"code": "engine_unavailable", "message": "down"}}
    task = Task.new(Api.TXT2IMG, {}, now=1.0).with_changes(R, {"lease_until": 62.0}, now=2.0)

    moved = task.with_changes(Q, {"lease_until": None, "history": (record,)}, now=3.5)

    assert {"lease_until", "history"} <= MUTABLE_FIELDS
    retried = AttemptRecord(attempt=1, worker="w1", started_at=2.0, ended_at=3.5, outcome=Outcome.RETRIED,
                            error=TaskError("engine_unavailable", "down"))
    assert (task.lease_until, moved.lease_until, moved.history) == (62.0, None, (retried,))


RECORD = AttemptRecord(attempt=2, worker="host-1", started_at=10.5, ended_at=12.25, outcome=Outcome.LOST)


def test_an_attempt_record_round_trips_through_snake_case() -> None:
    failed = AttemptRecord(attempt=3, worker=None, started_at=None, ended_at=4.0, outcome=Outcome.FAILED,
                           error=TaskError("engine_rejected", "no"))
    for record in (RECORD, failed):
        data = record.to_dict()
        assert AttemptRecord.from_dict(data) == record
        assert type(data["outcome"]) is str
    assert RECORD.to_dict() == {"attempt": 2, "worker": "host-1", "started_at": 10.5, "ended_at": 12.25,
                                "outcome": "lost", "error": None}


def test_an_attempt_record_reads_the_camel_case_that_older_versions_stored() -> None:
    legacy = {"attempt": 2, "worker": "host-1", "startedAt": 10.5, "endedAt": 12.25, "outcome": "lost", "error": None}
    assert AttemptRecord.from_dict(legacy) == RECORD
    # As DynamoDB gives integral numbers back: ints where floats went in.
    assert AttemptRecord.from_dict({**legacy, "startedAt": 10, "attempt": 2.0}).started_at == 10.0


def test_tasks_coerce_history_and_progress_from_plain_data() -> None:
    task = Task(task_id="t", api=Api.TXT2IMG, payload={}, history=[RECORD.to_dict(), RECORD],  # type: ignore[arg-type]
                progress={"fraction": 0.5, "step": 2, "steps": 4, "etaSeconds": 1.5})  # type: ignore[arg-type]

    assert task.history == (RECORD, RECORD)
    assert task.progress == TaskProgress(fraction=0.5, step=2, steps=4, eta_s=1.5)
    assert plain_field("history", task.history) == [RECORD.to_dict(), RECORD.to_dict()]
    assert plain_field("progress", task.progress) == {"fraction": 0.5, "step": 2, "steps": 4, "eta_s": 1.5}
    assert plain_field("progress", None) is None
    assert Task(task_id="t", api=Api.TXT2IMG, payload={}, progress={}).progress == TaskProgress()  # type: ignore[arg-type]


@pytest.mark.parametrize("history", [(), [], ({"attempt": 1, "outcome": "retried"},),
                                     [{"attempt": 1, "outcome": "redriven"}, RECORD]])
def test_history_records_are_attempt_records(history: Any) -> None:
    records = models.history_records(history)

    assert len(records) == len(history)
    assert all(type(r) is AttemptRecord for r in records)


@pytest.mark.parametrize("history", ["attempts", b"x", {"attempt": 1}, [1], [None], ({"attempt": 1}, "x"), 5, None,
                                     [{"attempt": 1}], [{"outcome": "lost"}], [{"attempt": 1, "outcome": "won"}],
                                     [{"attempt": "one", "outcome": "lost"}], [{"attempt": True, "outcome": "lost"}],
                                     [{"attempt": 1, "outcome": "lost", "error": "boom"}]])
def test_history_of_the_wrong_shape_is_refused(history: Any) -> None:
    with pytest.raises(ValueError, match="history must be"):
        models.history_records(history)
    with pytest.raises(ValueError, match="history must be"):
        Task(task_id="t", api=Api.TXT2IMG, payload={}, history=history)


@pytest.mark.parametrize("progress", ["half", [0.5], {"fraction": "half"}, {"step": None}])
def test_progress_of_the_wrong_shape_is_refused(progress: Any) -> None:
    with pytest.raises(ValueError, match="progress must be"):
        plain_field("progress", progress)


def test_outcome_strings_are_stable() -> None:
    # Stored in every task's history: renaming one would orphan what is already written.
    assert [str(o) for o in Outcome] == ["succeeded", "failed", "retried", "released", "cancelled", "lost",
                                         "redriven", "requeued"]
    assert Outcome("lost") is Outcome.LOST


def test_engine_health_round_trips_through_a_dict() -> None:
    health = EngineHealth(ok=False, detail="CUDA lost", loaded=True, restart=True, model="m", extra={"device": "cuda"})
    assert EngineHealth.from_dict(health.to_dict()) == health
    assert EngineHealth(ok=True).to_dict() == {"ok": True}


def test_mutable_fields_are_task_fields_but_not_identity_or_status() -> None:
    fields = set(Task.__dataclass_fields__)
    assert fields >= MUTABLE_FIELDS
    assert not MUTABLE_FIELDS & {"task_id", "api", "payload", "status", "created_at", "updated_at"}


def test_task_ids_are_url_safe_and_sort_by_creation_time() -> None:
    ids = [models.new_task_id() for _ in range(50)]

    assert len(set(ids)) == 50
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    prefixes = [i[:12] for i in ids]
    assert prefixes == sorted(prefixes)
