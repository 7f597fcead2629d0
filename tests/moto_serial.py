"""moto's server with DynamoDB and SQS requests served one at a time: the moto the tests start (``aws_server.py``).

Why: DynamoDB applies a conditional write atomically, so of eight concurrent ``UpdateItem`` calls with the same
``ConditionExpression`` exactly one succeeds; SQS never hands one message to two receivers while it is
invisible, and never loses a message or a delete. Plain ``moto_server`` handles each request on its own thread,
and its backends are not thread-safe: a condition is checked and an item written as two Python steps, two
concurrent ``ReceiveMessage`` calls can both take the same message, and two ``DeleteMessage`` calls each rebuild
the queue's message list from the same old one, so one delete (or a concurrent send) is undone. On a loaded
machine the contract tests then measure moto rather than sdasync. Running DynamoDB requests under one lock and
SQS requests under another gives moto the atomicity AWS has; the tests' clients still race, the locks only order
their requests inside moto.

An SQS long poll (``ReceiveMessage`` with ``WaitTimeSeconds``) must not hold the SQS lock while it waits, or
nothing could be sent to end it. It is served as short polls (``WaitTimeSeconds: 0``), each under the lock,
waiting between them, outside the lock, until another SQS request completes or ``POLL_S`` passes (messages also
become visible by themselves when a visibility timeout or a delay ends), and answered when a poll finds messages
or the wait is over. Every other service (S3, EC2, Auto Scaling, ``/moto-api/``) runs concurrently, as before.

Run as a script (it is not a test module)::

    python tests/moto_serial.py --host 127.0.0.1 --port 0 --port-file moto.port

With ``--port 0`` the OS picks a free port while the socket is bound, so there is no window in which another
process can take it; the bound port is written to ``--port-file`` once the server accepts connections.
``MOTO_CALL_RESET_API`` and the other ``MOTO_*`` variables are read by moto from the environment as usual, and
``/moto-api/`` answers as on ``moto_server``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

#: botocore sends every DynamoDB operation (awsJson 1.0) as a POST with this target prefix, and SQS (awsJson
#: 1.0 since 2023) with the other; SQS requests in the older query protocol carry no target and are not ordered.
DYNAMODB_TARGET_PREFIX = "DynamoDB_20120810."
SQS_TARGET_PREFIX = "AmazonSQS."
SQS_RECEIVE = "AmazonSQS.ReceiveMessage"
#: Longest pause between two short polls of a long poll when no SQS request comes to wake it.
POLL_S = 0.05
#: SQS's own bounds on WaitTimeSeconds; outside them moto answers the error at once, so the request goes as is.
MAX_WAIT_S = 20


@dataclass
class Response:
    """One WSGI response, produced whole (so that it is produced inside the lock) and replayed later."""

    status: str = "500 INTERNAL SERVER ERROR"
    headers: list[tuple[str, str]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: OptExcInfo | None = None) -> Callable[[bytes], object]:
        self.status, self.headers = status, list(headers)
        return self.chunks.append

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


def call_whole(app: WSGIApplication, environ: WSGIEnvironment) -> Response:
    response = Response()
    result = app(environ, response.start_response)
    try:
        response.chunks.extend(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return response


def with_body(environ: WSGIEnvironment, body: bytes) -> WSGIEnvironment:
    # A fresh copy per call: the app reads the input stream and may cache things in the environ.
    return {**environ, "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body))}


def read_body(environ: WSGIEnvironment) -> bytes:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    data: bytes = environ["wsgi.input"].read(length) if length > 0 else b""
    return data


class SerializeDynamoDBAndSqs:
    """WSGI middleware: DynamoDB requests one at a time, SQS requests one at a time (long polls as short polls),
    everything else straight through."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app
        self.dynamodb = threading.Lock()
        self.sqs = threading.Condition()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        target = str(environ.get("HTTP_X_AMZ_TARGET", ""))
        if target.startswith(DYNAMODB_TARGET_PREFIX):
            with self.dynamodb:
                response = call_whole(self.app, environ)
        elif target == SQS_RECEIVE:
            response = self._receive(environ)
        elif target.startswith(SQS_TARGET_PREFIX):
            with self.sqs:
                response = call_whole(self.app, environ)
                # A send, a nack or a visibility change may be what a waiting long poll waits for.
                self.sqs.notify_all()
        else:
            return self.app(environ, start_response)
        start_response(response.status, response.headers)
        return [response.body]

    def _receive(self, environ: WSGIEnvironment) -> Response:
        body = read_body(environ)
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        wait = request.get("WaitTimeSeconds") if isinstance(request, dict) else None
        if not isinstance(wait, int) or isinstance(wait, bool) or not 0 < wait <= MAX_WAIT_S:
            # No wait asked for (or an invalid one, which moto refuses at once): one call under the lock. A queue
            # whose default wait is set would hold the lock here; sdasync always passes WaitTimeSeconds.
            with self.sqs:
                return call_whole(self.app, with_body(environ, body))
        short_poll = json.dumps({**request, "WaitTimeSeconds": 0}).encode()
        deadline = time.monotonic() + wait
        with self.sqs:
            while True:
                response = call_whole(self.app, with_body(environ, short_poll))
                remaining = deadline - time.monotonic()
                if not _empty_receive(response) or remaining <= 0:
                    return response
                self.sqs.wait(timeout=min(POLL_S, remaining))


def _empty_receive(response: Response) -> bool:
    """A successful ReceiveMessage answer that holds no message (errors are answered as they are)."""
    if not response.status.startswith("200"):
        return False
    try:
        answer = json.loads(response.body or b"{}")
    except ValueError:
        return False
    return isinstance(answer, dict) and not answer.get("Messages")


def build_app() -> WSGIApplication:
    # Imported here so that ``--help`` and the module's import stay cheap; moto's import takes seconds.
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    return SerializeDynamoDBAndSqs(DomainDispatcherApplication(create_backend_app))


def write_port_file(path: Path, port: int) -> None:
    # Written whole and renamed into place, so a reader never sees a half-written number.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(f"{port}\n")
    partial.replace(path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=0, help="0: let the OS pick a free port")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    args = parser.parse_args(argv)

    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import make_server

    server = make_server(args.host, args.port, build_app(), threaded=True, request_handler=MotoRequestHandler)
    port = server.socket.getsockname()[1]
    # moto builds some URLs (Lambda, CloudFormation) from MOTO_PORT, as moto_server sets it.
    os.environ.setdefault("MOTO_PORT", str(port))

    def stop(signum: int, frame: FrameType | None) -> None:
        # serve_forever runs in this (main) thread, so the exception unwinds it; handler threads are daemons.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.port_file is not None:
        write_port_file(args.port_file, port)
    print(f"moto_serial: serving on http://{args.host}:{port}, DynamoDB and SQS serialized", file=sys.stderr,
          flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
