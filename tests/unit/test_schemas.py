"""The HTTP JSON of a task's history and progress is camelCase whatever shape the record comes in."""

from __future__ import annotations

from typing import Any

import pytest

from sdasync.api.schemas import HistoryEntry, ProgressInfo, error_json, history_json, progress_json
from sdasync.models import AttemptRecord, Outcome, TaskError, TaskProgress

EXPECTED_HISTORY = {"attempt": 2, "worker": "gpu-1", "startedAt": "2023-11-14T22:13:20.000Z",
                    "endedAt": "2023-11-14T22:13:25.500Z", "outcome": "retried",
                    "error": {"code": "engine_timeout", "message": "slow"}}


@pytest.mark.parametrize("record", [
    AttemptRecord(attempt=2, worker="gpu-1", started_at=1_700_000_000.0, ended_at=1_700_000_005.5,
                  outcome=Outcome.RETRIED, error=TaskError("engine_timeout", "slow")),
    {"attempt": 2, "worker": "gpu-1", "started_at": 1_700_000_000.0, "ended_at": 1_700_000_005.5,
     "outcome": "retried", "error": {"code": "engine_timeout", "message": "slow"}},
    {"attempt": 2, "worker": "gpu-1", "startedAt": 1_700_000_000, "endedAt": 1_700_000_005.5,
     "outcome": "retried", "error": {"code": "engine_timeout", "message": "slow"}},
])
def test_history_entries_render_camel_case(record: Any) -> None:
    rendered = history_json(record)
    assert rendered == EXPECTED_HISTORY
    HistoryEntry.model_validate(rendered)


@pytest.mark.parametrize("progress", [
    TaskProgress(fraction=0.5, step=10, steps=20, eta_s=3.0),
    {"fraction": 0.5, "step": 10, "steps": 20, "eta_s": 3.0},
    {"fraction": 0.5, "step": 10, "steps": 20, "etaSeconds": 3.0},
])
def test_progress_renders_camel_case(progress: Any) -> None:
    rendered = progress_json(progress)
    assert rendered == {"fraction": 0.5, "step": 10, "steps": 20, "etaSeconds": 3.0}
    ProgressInfo.model_validate(rendered)
    assert progress_json(None) is None


def test_error_json_never_carries_an_unencodable_string() -> None:
    body = error_json("invalid_request", "payload.\ud800 is bad", "payload.\ud800")
    assert body["error"]["field"] == "payload.\\ud800"
    body["error"]["message"].encode("utf-8")
