"""One webhook try: POST a signed body to a vetted address, never follow a redirect, never raise for the network.

The host is resolved and vetted again for every try (``guard.vetted_addresses``) and the connection goes to a
vetted address itself, with the name kept for the Host header, TLS SNI and the certificate check; so a name
that resolved to a public address at submit and to 127.0.0.1 now is refused now. A 3xx is a failed try: the
guard never sees where a redirect points, so it is never followed. At most ``MAX_BODY_BYTES`` of an answer are
read, and a watchdog closes the socket when the whole try outlasts its deadline (a receiver dripping a byte a
second would otherwise hold the dispatcher for as long as it likes).
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from sdasync import __version__
from sdasync.errors import RequestError
from sdasync.outbox import DeliveryAttempt
from sdasync.webhooks.guard import Allowlist, IPAddress, parse_url, vetted_addresses

log = logging.getLogger("sdasync.webhooks")

MAX_BODY_BYTES = 4096
USER_AGENT = f"sdasync-webhooks/{__version__}"


#: Addresses of one host tried per delivery: a name resolving to a hundred dead addresses costs no more.
MAX_ADDRESSES = 4


def _connect(addresses: Sequence[IPAddress], port: int, timeout_s: float) -> socket.socket:
    """A TCP connection to the first vetted address that answers, all of them within ``timeout_s`` together:
    the try's watchdog cannot reach a socket that is still connecting, so this bounds itself."""
    last: OSError | None = None
    deadline = time.monotonic() + timeout_s
    for address in addresses[:MAX_ADDRESSES]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("connect timed out")
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(remaining)
            sock.connect((str(address), port))
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last if last is not None else OSError("no address to connect to")


class _VettedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, addresses: Sequence[IPAddress], *, connect_timeout_s: float,
                 read_timeout_s: float) -> None:
        super().__init__(host, port, timeout=read_timeout_s)
        self._addresses = list(addresses)
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        #: The TCP socket as soon as it is connected, before TLS: the watchdog shuts it down to end a handshake
        #: that a receiver drips out byte by byte.
        self.raw: socket.socket | None = None

    def _tcp(self) -> socket.socket:
        sock = _connect(self._addresses, self.port, self._connect_timeout_s)
        sock.settimeout(self._read_timeout_s)
        self.raw = sock
        return sock

    def connect(self) -> None:
        self.sock = self._tcp()


class _VettedHTTPSConnection(_VettedHTTPConnection):
    def __init__(self, host: str, port: int, addresses: Sequence[IPAddress], *, connect_timeout_s: float,
                 read_timeout_s: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, addresses, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s)
        self._context = context

    def connect(self) -> None:
        # SNI and the certificate's name are the URL's host, not the address connected to.
        self.sock = self._context.wrap_socket(self._tcp(), server_hostname=self.host)


def _failure(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "TLS certificate not valid for the host"
    if isinstance(exc, ssl.SSLError):
        return "TLS handshake failed"
    if isinstance(exc, http.client.HTTPException):
        return "not a valid HTTP response"
    if isinstance(exc, ConnectionError):
        return "connection closed by the receiver"
    return f"connection failed ({type(exc).__name__})"


def send(url: str, *, headers: Mapping[str, str], body: bytes, allow: Allowlist | frozenset[str],
         connect_timeout_s: float, read_timeout_s: float, clock: Callable[[], float] = time.time,
         tls_context: ssl.SSLContext | None = None) -> DeliveryAttempt:
    """POST ``body`` (JSON) to ``url`` once. A 2xx is delivered; anything else, or no answer, is an attempt with
    ``error`` set. The whole try takes at most ``connect_timeout_s + read_timeout_s``."""
    started = clock()
    rules = allow if isinstance(allow, Allowlist) else Allowlist.parse(allow)
    try:
        target = parse_url(url, rules)
        addresses = vetted_addresses(target.host, target.port, rules)
    except RequestError as exc:
        return DeliveryAttempt(at=started, status=None, error=exc.message)
    conn: _VettedHTTPConnection
    if target.scheme == "https":
        conn = _VettedHTTPSConnection(target.host, target.port, addresses, connect_timeout_s=connect_timeout_s,
                                      read_timeout_s=read_timeout_s,
                                      context=tls_context or ssl.create_default_context())
    else:
        conn = _VettedHTTPConnection(target.host, target.port, addresses, connect_timeout_s=connect_timeout_s,
                                     read_timeout_s=read_timeout_s)
    expired = threading.Event()

    def _expire() -> None:
        expired.set()
        for sock in (conn.sock, conn.raw):
            if sock is not None:
                with contextlib.suppress(OSError):  # already closed: the try ended meanwhile
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read; close() alone would not

    watchdog = threading.Timer(connect_timeout_s + read_timeout_s, _expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.request("POST", target.target, body=body,
                     headers={**headers, "Content-Type": "application/json", "User-Agent": USER_AGENT,
                              "Connection": "close"})
        response = conn.getresponse()
        response.read(MAX_BODY_BYTES)
        status = response.status
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return DeliveryAttempt(at=started, status=None, error="timed out" if expired.is_set() else _failure(exc))
    finally:
        watchdog.cancel()
        conn.close()
    if expired.is_set():  # the watchdog's shutdown reads as the end of the headers: not an answer
        return DeliveryAttempt(at=started, status=None, error="timed out")
    if 200 <= status < 300:
        return DeliveryAttempt(at=started, status=status)
    if 300 <= status < 400:
        return DeliveryAttempt(at=started, status=status, error="redirect not followed")
    return DeliveryAttempt(at=started, status=status, error=f"HTTP {status}")
