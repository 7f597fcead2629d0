"""The moto launcher's middleware holds DynamoDB and SQS calls to one at a time, lets everything else run
concurrently, and answers a long poll as soon as another SQS call makes a message available."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from moto_serial import SerializeDynamoDBAndSqs


class Recorder:
    """A WSGI app that records how many calls run at once; a ReceiveMessage answers what ``inbox`` holds."""

    def __init__(self, hold_s: float = 0.05) -> None:
        self.hold_s = hold_s
        self.running = 0
        self.most = 0
        self.lock = threading.Lock()
        self.inbox: list[str] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(self.hold_s)  # the work a call does, long enough for calls to overlap if they may
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        body = b"{}"
        if target == "AmazonSQS.SendMessage":
            self.inbox.append("m")
        elif target == "AmazonSQS.ReceiveMessage":
            body = json.dumps({"Messages": [{"Body": m} for m in self.inbox]} if self.inbox else {}).encode()
            self.inbox.clear()
        with self.lock:
            self.running -= 1
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]


def call(app: SerializeDynamoDBAndSqs, target: str | None, body: dict[str, Any] | None = None) -> bytes:
    data = json.dumps(body or {}).encode()
    environ: dict[str, Any] = {"REQUEST_METHOD": "POST", "wsgi.input": io.BytesIO(data),
                               "CONTENT_LENGTH": str(len(data))}
    if target:
        environ["HTTP_X_AMZ_TARGET"] = target
    return b"".join(app(environ, lambda *_: None))


def concurrently(app: SerializeDynamoDBAndSqs, target: str | None, n: int = 8) -> None:
    threads = [threading.Thread(target=call, args=(app, target)) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)


def test_dynamodb_and_sqs_calls_run_one_at_a_time() -> None:
    for target in ("DynamoDB_20120810.UpdateItem", "AmazonSQS.DeleteMessage"):
        inner = Recorder()
        concurrently(SerializeDynamoDBAndSqs(inner), target)
        assert inner.most == 1, target


def test_other_calls_run_concurrently() -> None:
    inner = Recorder(hold_s=0.5)
    concurrently(SerializeDynamoDBAndSqs(inner), None)
    assert inner.most > 1


def test_a_long_poll_answers_when_another_call_sends_a_message() -> None:
    inner = Recorder(hold_s=0.0)
    app = SerializeDynamoDBAndSqs(inner)
    answers: list[bytes] = []
    poller = threading.Thread(target=lambda: answers.append(
        call(app, "AmazonSQS.ReceiveMessage", {"QueueUrl": "q", "WaitTimeSeconds": 20})))
    start = time.monotonic()
    poller.start()
    # The poll waits outside the lock: a send gets through while it waits, and ends it.
    call(app, "AmazonSQS.SendMessage", {"QueueUrl": "q", "MessageBody": "m"})
    poller.join(timeout=20)
    assert not poller.is_alive()
    assert json.loads(answers[0])["Messages"] == [{"Body": "m"}]
    assert time.monotonic() - start < 15
