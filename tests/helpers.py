"""Small helpers shared by the test suites: wait on a condition with a deadline, pick a free port.

``tests/`` is on ``sys.path`` while pytest runs (``tests/conftest.py`` puts it there), so import as
``from helpers import wait_until, free_port``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.01, message: str = "") -> T:
    """Call ``predicate`` until it returns something truthy and return that; fail the test after ``timeout``
    seconds. Polls quickly at first and backs off to ``interval * 10`` so slow conditions cost little CPU."""
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(message or f"condition not met within {timeout} s: {predicate!r}")
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, interval * 10)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (the OS picks it; a race with other processes is
    possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
