"""The outbox dispatcher against a real SqliteTaskStore and a real receiver on 127.0.0.1."""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from helpers import wait_until
from sdasync.backends.sqlite.store import SqliteTaskStore
from sdasync.config import Settings, settings_from
from sdasync.errors import BackendError
from sdasync.models import Api, Task, TaskStatus
from sdasync.outbox import Event, Outbox, OutboxState, WebhookSpec, completed_outbox
from sdasync.urls import url_for_path
from sdasync.webhooks import lambda_handler, signing
from sdasync.webhooks.command import add_parser, run
from sdasync.webhooks.direct import DirectEvents
from sdasync.webhooks.dispatcher import Dispatcher, Render, SecretFor
from webhook_receiver import WebhookReceiver

LOCAL = frozenset({"127.0.0.1"})
TENANT_SECRET = signing.new_secret()
FALLBACK_SECRET = signing.new_secret()


class Clock:
    """Real time plus an offset the test moves: timestamps stay within the receiver's five minutes."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def secret_for(tenant: str) -> str | None:
    return {"acme": TENANT_SECRET, "": FALLBACK_SECRET}.get(tenant)


def render(task: Task) -> Mapping[str, object]:
    return {"taskId": task.task_id, "status": str(task.status), "images": list(task.images)}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteTaskStore]:
    with SqliteTaskStore(path=tmp_path / "sdasync.db") as opened:
        yield opened


def finished(store: SqliteTaskStore, url: str, *, tenant: str = "acme", now: float | None = None,
             events: frozenset[Event] = frozenset(Event)) -> Task:
    """A task that ran and succeeded, its outbox set by the write that finished it (as the worker does)."""
    task = Task.new(Api.TXT2IMG, {"prompt": "a lighthouse"}, tenant=tenant,
                    extra={"webhook": WebhookSpec(url, events).to_dict()})
    store.create(task)
    store.transition(task.task_id, expected={TaskStatus.QUEUED}, to=TaskStatus.RUNNING, changes={"attempts": 1})
    outbox = completed_outbox(task.extra, now=time.time() if now is None else now)
    return store.transition(task.task_id, expected={TaskStatus.RUNNING}, to=TaskStatus.SUCCEEDED,
                            changes={"outbox": outbox, "images": [f"{task.task_id}/0.png"]})


def dispatcher(store: SqliteTaskStore, clock: Clock, **kwargs: object) -> Dispatcher:
    options: dict[str, object] = {"secret_for": secret_for, "render": render, "allow": LOCAL,
                                  "connect_timeout_s": 2.0, "read_timeout_s": 2.0, "clock": clock,
                                  "rng": random.Random(7), **kwargs}
    return Dispatcher(store, **options)  # type: ignore[arg-type]


def outbox_of(store: SqliteTaskStore, task_id: str) -> Outbox:
    outbox = store.get(task_id).outbox
    assert outbox is not None
    return outbox


def test_500_twice_then_200_is_one_event_with_three_signed_deliveries(store: SqliteTaskStore) -> None:
    clock = Clock()
    with WebhookReceiver(secret=TENANT_SECRET) as receiver:
        receiver.fail(2)
        task = finished(store, receiver.url)
        sender = dispatcher(store, clock)
        assert sender.run_once() == 1
        assert outbox_of(store, task.task_id).state is OutboxState.PENDING
        assert sender.run_once() == 0  # backing off: not due yet
        for _ in range(2):
            clock.offset += 11  # past the longest backoff of the first two tries (5 s, then 10 s)
            assert sender.run_once() == 1
        clock.offset += 3600
        assert sender.run_once() == 0  # delivered: out of the due index for good
        got = receiver.received
    assert [r.answered for r in got] == [500, 500, 200]
    event_ids = {r.headers["webhook-id"] for r in got}
    assert event_ids == {task.outbox.event_id}  # type: ignore[union-attr]
    assert all(r.valid for r in got)  # the independent verifier, with the tenant's secret
    assert len({r.headers["webhook-timestamp"] for r in got}) == 3  # each try signed at its own time
    body = json.loads(got[-1].body)
    assert body["type"] == "task.completed" and body["timestamp"].endswith("Z")
    assert body["data"] == {"taskId": task.task_id, "status": "succeeded", "images": [f"{task.task_id}/0.png"]}
    assert len({r.body for r in got}) == 1  # the same event each time
    outbox = outbox_of(store, task.task_id)
    assert outbox.state is OutboxState.DELIVERED and outbox.due_at is None
    assert [(a.status, a.error) for a in outbox.attempts] == [(500, "HTTP 500"), (500, "HTTP 500"), (200, None)]
    assert outbox.version == 6  # three claims, three records
    assert store.due_outbox(before=clock() + 10**6) == []
    assert store.get(task.task_id).status is TaskStatus.SUCCEEDED


def test_keyless_tasks_are_signed_with_the_server_wide_secret(store: SqliteTaskStore) -> None:
    with WebhookReceiver(secret=FALLBACK_SECRET) as receiver:
        task = finished(store, receiver.url, tenant="")
        assert dispatcher(store, Clock()).run_once() == 1
        (got,) = receiver.received
    assert got.valid is True
    assert outbox_of(store, task.task_id).state is OutboxState.DELIVERED


def test_no_secret_means_nothing_is_sent_and_the_try_is_retried(store: SqliteTaskStore) -> None:
    with WebhookReceiver() as receiver:
        task = finished(store, receiver.url, tenant="nobody")
        assert dispatcher(store, Clock()).run_once() == 1
        assert receiver.received == []
    outbox = outbox_of(store, task.task_id)
    assert outbox.state is OutboxState.PENDING and outbox.due_at is not None
    assert outbox.attempts[0].error == "no signing secret for the tenant"


def test_a_render_that_fails_is_a_failed_try_not_a_lost_event(store: SqliteTaskStore) -> None:
    def broken(task: Task) -> Mapping[str, object]:
        raise BackendError("results store down")

    with WebhookReceiver() as receiver:
        task = finished(store, receiver.url)
        assert dispatcher(store, Clock(), render=broken).run_once() == 1
        assert receiver.received == []
    attempt = outbox_of(store, task.task_id).attempts[0]
    assert attempt.status is None and attempt.error == "could not prepare the event: backend_unavailable"


def test_an_event_is_abandoned_after_the_retry_period(store: SqliteTaskStore) -> None:
    clock = Clock()
    with WebhookReceiver() as receiver:
        receiver.fail(10)
        task = finished(store, receiver.url, now=clock())
        sender = dispatcher(store, clock, retry_for_s=60.0)
        assert sender.run_once() == 1
        clock.offset += 61
        assert sender.run_once() == 1
        clock.offset += 3600
        assert sender.run_once() == 0
        assert len(receiver.received) == 2
    outbox = outbox_of(store, task.task_id)
    assert outbox.state is OutboxState.ABANDONED and outbox.due_at is None and len(outbox.attempts) == 2


def test_a_claimed_event_is_left_alone_by_a_second_dispatcher_until_its_lease_passes(
        store: SqliteTaskStore) -> None:
    clock = Clock()
    with WebhookReceiver() as receiver:
        receiver.hang()
        task = finished(store, receiver.url)
        first = dispatcher(store, clock, read_timeout_s=30.0)
        thread = threading.Thread(target=first.run_once, daemon=True)
        thread.start()
        receiver.wait_for(1)
        claimed = outbox_of(store, task.task_id)
        assert claimed.version == 1 and claimed.attempts == () and claimed.due_at is not None
        assert dispatcher(store, clock).run_once() == 0  # not due: the first one's lease holds it
        receiver.release()
        thread.join(10)
        assert not thread.is_alive()
    outbox = outbox_of(store, task.task_id)
    assert outbox.state is OutboxState.DELIVERED and len(outbox.attempts) == 1 and len(receiver.received) == 1


def test_a_task_not_subscribed_to_completed_owes_nothing(store: SqliteTaskStore) -> None:
    with WebhookReceiver() as receiver:
        task = finished(store, receiver.url, events=frozenset({Event.START}))
        assert task.outbox is None
        assert dispatcher(store, Clock()).run_once() == 0
        assert receiver.received == []


def test_backoff_is_full_jitter_over_a_doubling_capped_window(store: SqliteTaskStore) -> None:
    sender = dispatcher(store, Clock(), backoff_base_s=5.0, backoff_cap_s=3600.0)
    for tries, window in [(1, 5.0), (2, 10.0), (3, 20.0), (10, 2560.0), (11, 3600.0), (40, 3600.0)]:
        draws = [sender.backoff(tries) for _ in range(200)]
        assert all(0.0 <= d <= window for d in draws)
        assert max(draws) > window * 0.8  # the whole window is used, not a fixed delay


def test_run_delivers_until_stopped(store: SqliteTaskStore) -> None:
    with WebhookReceiver(secret=TENANT_SECRET) as receiver:
        tasks = [finished(store, receiver.url) for _ in range(5)]
        stop = threading.Event()
        thread = threading.Thread(target=dispatcher(store, Clock()).run, args=(stop, 0.05), daemon=True)
        thread.start()
        try:
            wait_until(lambda: all(outbox_of(store, t.task_id).state is OutboxState.DELIVERED for t in tasks),
                       timeout=10)
        finally:
            stop.set()
            thread.join(5)
        assert not thread.is_alive()
        assert len(receiver.received) == 5 and all(r.valid for r in receiver.received)
        assert {r.headers["webhook-id"] for r in receiver.received} == {t.outbox.event_id for t in tasks}  # type: ignore[union-attr]


# -- killed at any point: a dispatcher process SIGKILLed mid-try

KILLED_DISPATCHER = textwrap.dedent("""
    import os, signal, sys
    from sdasync.backends.sqlite.store import SqliteTaskStore
    from sdasync.webhooks.dispatcher import Dispatcher

    path, secret, point = sys.argv[1:4]

    def die(task_id):
        os.kill(os.getpid(), signal.SIGKILL)

    with SqliteTaskStore(path=path) as store:
        Dispatcher(store, secret_for=lambda tenant: secret, render=lambda t: {"taskId": t.task_id},
                   allow=frozenset({"127.0.0.1"}), connect_timeout_s=2, read_timeout_s=60, lease_s=30,
                   after_send=die if point == "after_send" else None).run_once()
""")


def run_killed(store_path: Path, point: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", KILLED_DISPATCHER, str(store_path), TENANT_SECRET, point],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_a_dispatcher_killed_between_claim_and_record_loses_nothing(store: SqliteTaskStore, tmp_path: Path
                                                                    ) -> None:
    clock = Clock()
    with WebhookReceiver(secret=TENANT_SECRET) as receiver:
        receiver.hang()  # the first try is in flight, claimed and unrecorded, when the process dies
        task = finished(store, receiver.url)
        process = run_killed(tmp_path / "sdasync.db", "hang")
        try:
            receiver.wait_for(1, timeout=30)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
        assert process.returncode == -signal.SIGKILL
        claimed = outbox_of(store, task.task_id)
        assert claimed.version == 1 and claimed.attempts == () and claimed.state is OutboxState.PENDING
        successor = dispatcher(store, clock)
        assert successor.run_once() == 0  # the dead one's lease still holds the event
        clock.offset += 31
        assert successor.run_once() == 1
        got = receiver.received
    assert len(got) == 2 and got[1].answered == 200 and all(r.valid for r in got)
    assert got[0].headers["webhook-id"] == got[1].headers["webhook-id"] == task.outbox.event_id  # type: ignore[union-attr]
    outbox = outbox_of(store, task.task_id)
    assert outbox.state is OutboxState.DELIVERED and [a.status for a in outbox.attempts] == [200]


def test_a_dispatcher_killed_after_sending_before_recording_sends_again_with_the_same_id(
        store: SqliteTaskStore, tmp_path: Path) -> None:
    clock = Clock()
    with WebhookReceiver(secret=TENANT_SECRET) as receiver:
        task = finished(store, receiver.url)
        process = run_killed(tmp_path / "sdasync.db", "after_send")
        output = process.communicate(timeout=60)[0]
        assert process.returncode == -signal.SIGKILL, output.decode(errors="replace")
        (delivered,) = receiver.received
        assert delivered.answered == 200  # it arrived, but nobody wrote that down
        assert outbox_of(store, task.task_id).attempts == ()
        clock.offset += 31
        assert dispatcher(store, clock).run_once() == 1
        again = receiver.received[1]
    assert again.headers["webhook-id"] == delivered.headers["webhook-id"] == task.outbox.event_id  # type: ignore[union-attr]
    assert again.valid is True
    assert outbox_of(store, task.task_id).state is OutboxState.DELIVERED


# -- the worker's direct start and progress events


def running(url: str, events: frozenset[Event] = frozenset(Event)) -> Task:
    return Task(task_id="t-direct", api=Api.TXT2IMG, payload={}, status=TaskStatus.RUNNING, tenant="acme",
                extra={"webhook": WebhookSpec(url, events).to_dict()})


def test_start_and_rate_limited_progress_are_signed_each_with_its_own_id() -> None:
    clock = Clock()
    with WebhookReceiver(secret=TENANT_SECRET) as receiver:
        events = DirectEvents(secret_for=secret_for, allow=LOCAL, connect_timeout_s=2, read_timeout_s=2,
                              progress_every_s=3.0, clock=clock)
        task = running(receiver.url)
        events.start(task)
        for step in range(1, 11):  # ten reports within a second: one event
            events.progress(task, step / 20, step, 20)
        clock.offset += 3.5
        events.progress(task, 0.75, 15, 20)
        events.close(timeout_s=10)
        got = receiver.received
    bodies = [json.loads(r.body) for r in got]
    assert [b["type"] for b in bodies] == ["task.start", "task.progress", "task.progress"]
    assert bodies[0]["data"] == {"taskId": "t-direct", "status": "running", "progress": None}
    assert [b["data"]["progress"] for b in bodies[1:]] == [{"fraction": 0.05, "step": 1, "steps": 20},
                                                         {"fraction": 0.75, "step": 15, "steps": 20}]
    assert len({r.headers["webhook-id"] for r in got}) == 3 and all(r.valid for r in got)
    assert events.sent == 3 and events.dropped == 0


def test_direct_events_follow_the_subscription() -> None:
    with WebhookReceiver() as receiver:
        events = DirectEvents(secret_for=secret_for, allow=LOCAL, connect_timeout_s=2, read_timeout_s=2)
        task = running(receiver.url, frozenset({Event.COMPLETED, Event.PROGRESS}))
        events.start(task)
        events.progress(task, 0.5, 10, 20)
        events.start(Task(task_id="t-none", api=Api.TXT2IMG, payload={}))  # no webhook at all
        events.close(timeout_s=10)
        got = receiver.received
    assert [json.loads(r.body)["type"] for r in got] == ["task.progress"]


def test_a_hanging_receiver_never_blocks_the_worker() -> None:
    with WebhookReceiver() as receiver:
        receiver.hang(100)
        events = DirectEvents(secret_for=secret_for, allow=LOCAL, connect_timeout_s=2, read_timeout_s=30,
                              max_queued=2)
        task = running(receiver.url)
        started = time.monotonic()
        for _ in range(20):
            events.start(task)
        offered = time.monotonic() - started
        receiver.wait_for(1)
        assert offered < 0.5
        assert events.dropped >= 17  # one in flight, two queued, the rest dropped
        started = time.monotonic()
        events.close(timeout_s=0.5)
        assert time.monotonic() - started < 2.0


# -- the entry points: the command and the Lambda handler


def test_the_command_parses_its_settings_and_runs_one_pass(store: SqliteTaskStore, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="sdasync")
    def settings_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", type=Path, default=None)
        p.add_argument("--webhook-allow", default=None)
        p.add_argument("--webhook-timeout", type=float, default=None)

    add_parser(parser.add_subparsers(dest="command"), options=[settings_options])
    with WebhookReceiver(secret=TENANT_SECRET) as receiver:
        task = finished(store, receiver.url)
        args = parser.parse_args(["webhooks", "--once", "--data-dir", str(tmp_path), "--webhook-allow",
                                  "127.0.0.1, 10.0.0.0/8", "--webhook-timeout", "3"])
        settings = settings_from(vars(args), environ={})
        assert settings.webhook_allow == frozenset({"127.0.0.1", "10.0.0.0/8"}) and settings.webhook_timeout == 3
        assert run(args, settings, render=render, secret_for=secret_for) == 0
        assert len(receiver.received) == 1 and receiver.received[0].valid
    assert json.loads(capsys.readouterr().out) == {"sent": 1}
    assert outbox_of(store, task.task_id).state is OutboxState.DELIVERED


def test_the_lambda_handler_delivers_with_the_deployment_wiring(store: SqliteTaskStore, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lambda_handler, "_dispatcher", None)
    monkeypatch.setattr(lambda_handler, "WIRING", lambda_handler.WIRING)
    monkeypatch.setenv("SDASYNC_STORE", url_for_path("sqlite", tmp_path / "sdasync.db"))
    monkeypatch.setenv("SDASYNC_WEBHOOK_ALLOW", "127.0.0.1")
    monkeypatch.setenv("SDASYNC_DATA_DIR", str(tmp_path))
    # The default wiring (sdasync.trust) opens what the environment names; nothing is due yet.
    assert lambda_handler.handler({}, None) == {"sent": 0, "passes": 1}
    monkeypatch.setattr(lambda_handler, "_dispatcher", None)
    wired: list[str] = []

    def wiring(settings: Settings, opened: object) -> tuple[Render, SecretFor]:
        wired.append(settings.store_url)
        return render, secret_for

    lambda_handler.configure(wiring)
    with WebhookReceiver(secret=TENANT_SECRET) as receiver:
        task = finished(store, receiver.url)
        assert lambda_handler.handler({}, None) == {"sent": 1, "passes": 1}
        assert lambda_handler.handler({}, None) == {"sent": 0, "passes": 1}  # warm: the same dispatcher
        assert len(receiver.received) == 1 and receiver.received[0].valid
    assert len(wired) == 1
    assert outbox_of(store, task.task_id).state is OutboxState.DELIVERED


def test_a_render_bug_is_logged_counted_and_eventually_abandoned(store: SqliteTaskStore) -> None:
    def buggy(task: Task) -> Mapping[str, object]:
        raise KeyError("images")

    clock = Clock()
    with WebhookReceiver() as receiver:
        task = finished(store, receiver.url, now=clock())
        sender = dispatcher(store, clock, render=buggy, retry_for_s=10.0)
        assert sender.run_once() == 1
        clock.offset += 11
        assert sender.run_once() == 1
        assert receiver.received == []
    outbox = outbox_of(store, task.task_id)
    assert [a.error for a in outbox.attempts] == ["could not prepare the event"] * 2
    assert outbox.state is OutboxState.ABANDONED
