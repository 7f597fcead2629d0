"""The Queue contract (SQS semantics), run against every backend in ``backends.QUEUE_FACTORIES``.

Visibility timeouts are whole seconds (SQS accepts nothing finer); with an injected clock they pass instantly.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, cast

import pytest

from helpers import wait_until
from sdasync.backends.base import Message, Queue, QueueDepth
from sdasync.backends.sqlite.queue import SqliteQueue
from sdasync.errors import BackendError, ConfigError, ReceiptInvalid

from .backends import MAX_RECEIVES, FakeClock

VT = 1  # a short visibility timeout, in seconds
LONG = 60  # a visibility timeout no test outlives


def receive_one(queue: Queue, *, visibility_timeout_s: float = VT, timeout: float = 5.0) -> Message:
    """The next message, waiting for it with a deadline (real-time backends make it visible a little late)."""
    messages = wait_until(lambda: queue.receive(visibility_timeout_s=visibility_timeout_s), timeout=timeout)
    assert len(messages) == 1
    return messages[0]


def requires(queue: Queue, capability: str) -> None:
    if capability not in queue.capabilities:
        pytest.skip(f"backend lacks capability {capability!r}")


# dead_letters() and redrive() are beyond the Queue Protocol: a backend with capability "redrive" has them.
def dead_letters(queue: Queue) -> list[Any]:
    result: list[Any] = cast(Any, queue).dead_letters()
    return result


def redrive(queue: Queue, message_ids: Collection[str] | None = None) -> int:
    moved: int = cast(Any, queue).redrive(message_ids)
    return moved


def test_implements_the_protocol(queue: Queue) -> None:
    assert isinstance(queue, Queue)
    assert isinstance(queue.capabilities, frozenset)
    assert queue.__enter__() is queue


def test_send_receive_ack_round_trip(queue: Queue, clock: FakeClock) -> None:
    message_id = queue.send("task-1")

    message = receive_one(queue)

    assert (message.message_id, message.body, message.receive_count) == (message_id, "task-1", 1)
    assert message.receipt
    queue.ack(message.receipt)
    assert queue.depth() == QueueDepth(visible=0, in_flight=0, delayed=0)
    clock.advance(VT + 0.5)
    assert queue.receive() == []


def test_unacked_message_reappears_with_a_new_receipt(queue: Queue, clock: FakeClock) -> None:
    queue.send("task-1")
    first = receive_one(queue)
    assert queue.receive() == []  # hidden while in flight

    clock.advance(VT + 0.5)
    second = receive_one(queue)

    assert second.message_id == first.message_id
    assert second.receive_count == 2
    assert second.receipt != first.receipt


def test_extend_keeps_the_message_hidden_past_its_first_timeout(queue: Queue, clock: FakeClock) -> None:
    queue.send("task-1")
    message = receive_one(queue)
    queue.extend(message.receipt, timeout_s=3)

    clock.advance(VT + 0.5)
    assert queue.receive() == []
    assert queue.depth().in_flight == 1

    clock.advance(2)
    again = receive_one(queue)
    assert (again.message_id, again.receive_count) == (message.message_id, 2)


def test_nack_without_delay_makes_the_message_visible_now(queue: Queue) -> None:
    queue.send("task-1")
    message = receive_one(queue, visibility_timeout_s=LONG)

    queue.nack(message.receipt)

    again = receive_one(queue)
    assert (again.message_id, again.receive_count) == (message.message_id, 2)


def test_nack_with_delay_keeps_the_message_in_flight_until_then(queue: Queue, clock: FakeClock) -> None:
    queue.send("task-1")
    message = receive_one(queue, visibility_timeout_s=LONG)

    queue.nack(message.receipt, delay_s=2)

    assert queue.receive() == []
    assert queue.depth() == QueueDepth(visible=0, in_flight=1, delayed=0)
    clock.advance(2.5)
    assert receive_one(queue).message_id == message.message_id


def test_stale_receipts_are_refused(queue: Queue, clock: FakeClock) -> None:
    queue.send("task-1")
    stale = receive_one(queue).receipt
    clock.advance(VT + 0.5)
    current = receive_one(queue, visibility_timeout_s=LONG).receipt

    with pytest.raises(ReceiptInvalid):
        queue.extend(stale, timeout_s=LONG)
    with pytest.raises(ReceiptInvalid):
        queue.nack(stale)
    if "dead_letter" in queue.capabilities:
        with pytest.raises(ReceiptInvalid):
            queue.dead_letter(stale, reason="stale")
    queue.extend(current, timeout_s=LONG)  # the current delivery is untouched by all that
    queue.ack(stale)  # never an error (SQS may still delete the message; the SQLite queue does nothing)


def test_receipts_of_deleted_messages_are_refused(queue: Queue) -> None:
    queue.send("task-1")
    receipt = receive_one(queue).receipt
    queue.ack(receipt)

    with pytest.raises(ReceiptInvalid):
        queue.extend(receipt, timeout_s=LONG)
    with pytest.raises(ReceiptInvalid):
        queue.nack(receipt)
    queue.ack(receipt)  # acking twice is harmless


def test_delayed_message_is_hidden_and_counted_as_delayed(queue: Queue, clock: FakeClock) -> None:
    requires(queue, "delay")
    message_id = queue.send("later", delay_s=2)

    assert queue.receive() == []
    assert queue.depth() == QueueDepth(visible=0, in_flight=0, delayed=1)

    clock.advance(2.5)
    assert receive_one(queue, visibility_timeout_s=LONG).message_id == message_id
    assert queue.depth() == QueueDepth(visible=0, in_flight=1, delayed=0)


def test_depth_counts_visible_in_flight_and_delayed(queue: Queue) -> None:
    for i in range(3):
        queue.send(f"task-{i}")
    receive_one(queue, visibility_timeout_s=LONG)
    expected_delayed = 0
    if "delay" in queue.capabilities:
        queue.send("later", delay_s=LONG)
        expected_delayed = 1

    assert queue.depth() == QueueDepth(visible=2, in_flight=1, delayed=expected_delayed)


def test_message_received_max_receives_times_is_dead_lettered(queue: Queue, clock: FakeClock) -> None:
    message_id = queue.send("poison")
    for count in range(1, MAX_RECEIVES + 1):
        message = receive_one(queue)
        assert (message.message_id, message.receive_count) == (message_id, count)
        clock.advance(VT + 0.5)

    assert queue.receive(wait_s=0.2) == []
    assert queue.depth() == QueueDepth(visible=0, in_flight=0, delayed=0)
    if "redrive" in queue.capabilities:
        [dead] = wait_until(lambda: dead_letters(queue))
        assert (dead.message_id, dead.body, dead.receive_count) == (message_id, "poison", MAX_RECEIVES)


def test_dead_letter_moves_the_message_now(queue: Queue) -> None:
    requires(queue, "dead_letter")
    ids = {queue.send("bad"), queue.send("good")}
    message = receive_one(queue, visibility_timeout_s=LONG)  # either: SQS standard queues are unordered
    message_id = message.message_id
    (other_id,) = ids - {message_id}

    queue.dead_letter(message.receipt, reason="payload rejected")

    assert queue.depth() == QueueDepth(visible=1, in_flight=0, delayed=0)
    assert receive_one(queue, visibility_timeout_s=LONG).message_id == other_id
    with pytest.raises(ReceiptInvalid):
        queue.extend(message.receipt, timeout_s=LONG)
    if "redrive" in queue.capabilities:
        [dead] = dead_letters(queue)
        assert (dead.message_id, dead.reason, dead.receive_count) == (message_id, "payload rejected", 1)


def test_redrive_returns_dead_letters_with_a_fresh_receive_count(queue: Queue) -> None:
    requires(queue, "redrive")
    ids = [queue.send(f"task-{i}") for i in range(2)]
    for _ in ids:
        queue.dead_letter(receive_one(queue, visibility_timeout_s=LONG).receipt, reason="test")
    assert queue.depth() == QueueDepth(visible=0, in_flight=0, delayed=0)

    assert redrive(queue, [ids[1], "no-such-message"]) == 1
    again = receive_one(queue, visibility_timeout_s=LONG)
    assert (again.message_id, again.receive_count) == (ids[1], 1)
    assert [d.message_id for d in dead_letters(queue)] == [ids[0]]

    assert redrive(queue) == 1
    assert receive_one(queue, visibility_timeout_s=LONG).message_id == ids[0]
    assert dead_letters(queue) == []


def test_receive_waits_and_returns_as_soon_as_a_message_arrives(open_queue: Callable[[], Queue]) -> None:
    receiver, sender = open_queue(), open_queue()
    timer = threading.Timer(0.3, sender.send, args=("late",))
    started = time.monotonic()
    timer.start()
    try:
        messages = receiver.receive(wait_s=10, visibility_timeout_s=LONG)
    finally:
        timer.cancel()
    elapsed = time.monotonic() - started

    assert [m.body for m in messages] == ["late"]
    assert elapsed < 5, f"receive waited {elapsed:.2f} s for a message sent after 0.3 s"


def test_receive_with_nothing_to_take_waits_out_its_wait_time(queue: Queue) -> None:
    started = time.monotonic()
    assert queue.receive(wait_s=0.5) == []
    assert 0.45 <= time.monotonic() - started < 5


def test_batch_receive_returns_distinct_messages(queue: Queue) -> None:
    sent = {queue.send(f"task-{i}") for i in range(5)}

    first = queue.receive(max_messages=3, visibility_timeout_s=LONG)
    assert 1 <= len(first) <= 3
    got = [m.message_id for m in first]

    def take_more() -> bool:
        got.extend(m.message_id for m in queue.receive(max_messages=10, visibility_timeout_s=LONG))
        return len(got) >= len(sent)

    wait_until(take_more)

    assert sorted(got) == sorted(sent)  # every message once, none twice
    assert queue.depth() == QueueDepth(visible=0, in_flight=5, delayed=0)


_RECEIVER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    tests_dir, kind, directory, ready, go = sys.argv[1:]
    sys.path.insert(0, tests_dir)
    from contract.backends import QUEUE_FACTORIES, FakeClock
    with QUEUE_FACTORIES[kind](Path(directory), FakeClock()) as queue:
        Path(ready).touch()
        deadline = time.monotonic() + 30
        while not Path(go).exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        received = []
        while time.monotonic() < deadline:
            messages = queue.receive(max_messages=2, visibility_timeout_s=60)
            if not messages:
                if queue.depth().visible == 0:
                    break
                continue
            for message in messages:
                received.append([message.message_id, message.receive_count])
                time.sleep(0.002)  # the "work": without it one process can drain the queue before others start
                queue.ack(message.receipt)
        print(json.dumps(received))
""")


@pytest.mark.timeout(120)
def test_receivers_in_several_processes_never_share_a_message(
        queue: Queue, queue_kind: str, backend_dir: Path, tmp_path: Path) -> None:
    sent = {queue.send(f"task-{i}") for i in range(100)}
    tests_dir = Path(__file__).resolve().parents[1]
    go = tmp_path / "go"
    readies = [tmp_path / f"ready-{n}" for n in range(4)]
    workers = [
        subprocess.Popen([sys.executable, "-c", _RECEIVER, str(tests_dir), queue_kind, str(backend_dir), str(ready),
                          str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for ready in readies
    ]
    try:
        # Start them together so that they really compete for the same rows.
        wait_until(lambda: all(r.exists() or w.poll() is not None for r, w in zip(readies, workers, strict=True)),
                   timeout=60)
        go.touch()
        outputs = [w.communicate(timeout=60) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    for w, (_, err) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, err

    received = [entry for out, _ in outputs for entry in json.loads(out)]
    ids = [message_id for message_id, _ in received]
    assert len(ids) == len(set(ids)), "a message was delivered twice while invisible"
    assert set(ids) == sent
    assert all(count == 1 for _, count in received)
    assert sum(1 for out, _ in outputs if json.loads(out)) >= 2, "only one process got messages: no contention"
    assert queue.depth() == QueueDepth(visible=0, in_flight=0, delayed=0)


# Specific to SqliteQueue ------------------------------------------------------------------------------------------


def _sqlite_queue(path: Path, clock: FakeClock, **kwargs: Any) -> SqliteQueue:
    return SqliteQueue(path=path, max_receives=MAX_RECEIVES, poll_interval=0.02, clock=clock, **kwargs)


def test_sqlite_queue_ignores_a_stale_ack(tmp_path: Path, clock: FakeClock) -> None:
    with _sqlite_queue(tmp_path / "q.db", clock) as queue:
        queue.send("task-1")
        stale = receive_one(queue).receipt
        clock.advance(VT + 0.5)
        current = receive_one(queue, visibility_timeout_s=LONG).receipt

        queue.ack(stale)

        assert queue.depth() == QueueDepth(visible=0, in_flight=1, delayed=0)
        queue.ack(current)
        assert queue.depth() == QueueDepth(visible=0, in_flight=0, delayed=0)


def test_sqlite_queue_from_url_parses_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    queue = SqliteQueue.from_url("sqlite:///data/q.db?name=jobs&max_receives=2&visibility_timeout=1.5"
                                 "&poll_interval=0.1")

    assert (queue.path, queue.name, queue.max_receives, queue.visibility_timeout, queue.poll_interval) == (
        Path("data/q.db"), "jobs", 2, 1.5, 0.1)
    assert SqliteQueue.from_url(f"sqlite:///{tmp_path}/abs.db").path == tmp_path / "abs.db"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="valid: max_receives, name, poll_interval, visibility_timeout"):
        SqliteQueue.from_url("sqlite:///q.db?visibility=3")
    with pytest.raises(ConfigError, match="max_receives"):
        SqliteQueue.from_url("sqlite:///q.db?max_receives=0")
    with pytest.raises(ConfigError):
        SqliteQueue.from_url("sqlite:///q.db?poll_interval=soon")
    with pytest.raises(ConfigError):
        SqliteQueue.from_url("sqlite://host/q.db")


def test_sqlite_named_queues_share_a_file_independently(tmp_path: Path, clock: FakeClock) -> None:
    with _sqlite_queue(tmp_path / "q.db", clock, name="a") as a, \
            _sqlite_queue(tmp_path / "q.db", clock, name="b") as b:
        a.send("for-a")
        b.send("for-b")
        b.dead_letter(b.receive(visibility_timeout_s=LONG)[0].receipt)

        assert a.depth() == QueueDepth(visible=1, in_flight=0, delayed=0)
        assert b.depth() == QueueDepth(visible=0, in_flight=0, delayed=0)
        assert a.dead_letters() == []
        assert [d.body for d in b.dead_letters()] == ["for-b"]
        assert [m.body for m in a.receive()] == ["for-a"]


def test_sqlite_queue_keeps_messages_across_handles(tmp_path: Path, clock: FakeClock) -> None:
    with _sqlite_queue(tmp_path / "q.db", clock) as queue:
        message_id = queue.send("task-1")
    with _sqlite_queue(tmp_path / "q.db", clock) as queue:
        assert [m.message_id for m in queue.receive()] == [message_id]


def test_sqlite_queue_with_zero_visibility_timeout_delivers_each_message_once_per_receive(
        tmp_path: Path, clock: FakeClock) -> None:
    with _sqlite_queue(tmp_path / "q.db", clock) as queue:
        sent = {queue.send(f"task-{i}") for i in range(3)}

        batch = queue.receive(max_messages=10, visibility_timeout_s=0)

        assert sorted(m.message_id for m in batch) == sorted(sent)
        assert queue.depth().visible == 3  # a zero timeout leaves them visible, as in SQS


def test_sqlite_batch_receive_dead_letters_on_the_way_and_still_fills_the_batch(
        tmp_path: Path, clock: FakeClock) -> None:
    with _sqlite_queue(tmp_path / "q.db", clock) as queue:
        poison = queue.send("poison")
        for _ in range(MAX_RECEIVES):
            receive_one(queue)
            clock.advance(VT + 0.5)
        good = [queue.send(f"task-{i}") for i in range(2)]

        batch = queue.receive(max_messages=2, visibility_timeout_s=0)

        assert [m.message_id for m in batch] == good
        assert [d.message_id for d in queue.dead_letters()] == [poison]


def test_sqlite_dead_letter_records_time_and_reason(tmp_path: Path, clock: FakeClock) -> None:
    with _sqlite_queue(tmp_path / "q.db", clock) as queue:
        queue.send("poison")
        for _ in range(MAX_RECEIVES):
            receive_one(queue)
            clock.advance(VT + 0.5)
        assert queue.receive() == []

        [dead] = queue.dead_letters()
        assert dead.dead_at == clock()
        assert f"max_receives={MAX_RECEIVES}" in dead.reason
        with pytest.raises(TypeError):
            queue.redrive("not-a-list")


def test_sqlite_queue_close_ends_a_waiting_receive(tmp_path: Path, clock: FakeClock) -> None:
    queue = _sqlite_queue(tmp_path / "q.db", clock)
    queue.depth()  # opened
    result: list[list[Message]] = []
    receiver = threading.Thread(target=lambda: result.append(queue.receive(wait_s=30)))
    receiver.start()
    wait_until(lambda: receiver.is_alive())
    queue.close()
    receiver.join(timeout=5)

    assert not receiver.is_alive()
    assert result == [[]]
    with pytest.raises(BackendError, match="closed"):
        queue.send("after close")


def test_sqlite_queue_refuses_bad_arguments(tmp_path: Path, clock: FakeClock) -> None:
    with _sqlite_queue(tmp_path / "q.db", clock) as queue:
        with pytest.raises(ValueError, match="delay_s"):
            queue.send("x", delay_s=-1)
        with pytest.raises(ValueError, match="max_messages"):
            queue.receive(max_messages=0)
        with pytest.raises(ValueError, match="visibility_timeout_s"):
            queue.receive(visibility_timeout_s=-1)


def test_sqlite_errors_become_backend_errors(tmp_path: Path, clock: FakeClock) -> None:
    with _sqlite_queue(tmp_path, clock) as queue, pytest.raises(BackendError) as caught:  # a directory
        queue.send("x")
    assert isinstance(caught.value.__cause__, sqlite3.Error)
    assert caught.value.retryable
