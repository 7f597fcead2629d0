"""Small helpers shared by the test suites: wait on a condition with a deadline, pick a free port.

``tests/`` is on ``sys.path`` while pytest runs (``tests/conftest.py`` puts it there), so import as
``from helpers import wait_until, free_port``.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
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


#: Ports are drawn from below the kernel's ephemeral range (see ``_ephemeral_range``): the OS gives those to
#: outgoing connections (every HTTP client in the suite), so a port picked there can be taken between being
#: picked and being bound by the server under test. Ports already handed out in this process are never reused.
_PORT_FLOOR = 20000
_handed_out: set[int] = set()
_random = random.Random()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now, outside the ephemeral range where possible, and not handed out
    before by this process. Another process can still take it before the caller binds it; that is rare here."""
    low, _ = _ephemeral_range()
    if low - _PORT_FLOOR >= 1000:
        for _ in range(200):
            port = _random.randrange(_PORT_FLOOR, low)
            if port not in _handed_out and _bindable(host, port):
                _handed_out.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
    _handed_out.add(chosen)
    return chosen
