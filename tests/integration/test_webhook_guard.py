"""The SSRF guard at submit (check_url) and at send (the sender), against real sockets on 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from sdasync.errors import RequestError
from sdasync.outbox import DeliveryAttempt
from sdasync.webhooks import signing
from sdasync.webhooks.guard import check_url, vetted_addresses, why_not_public
from sdasync.webhooks.sender import send
from webhook_receiver import WebhookReceiver

LOCAL = frozenset({"127.0.0.1"})


@pytest.mark.parametrize(("url", "reason"), [
    ("https://127.0.0.1/hook", "loopback"),
    ("https://[::1]/hook", "loopback"),
    ("https://169.254.169.254/latest/meta-data/", "metadata"),
    ("https://[fd00:ec2::254]/latest/meta-data/", "metadata"),
    ("https://169.254.10.1/", "link-local"),
    ("https://[fe80::1]/", "link-local"),
    ("https://10.1.2.3/", "private"),
    ("https://172.16.0.1/", "private"),
    ("https://192.168.1.1/", "private"),
    ("https://[fc00::1]/", "private"),
    ("https://[fd12:3456::1]/", "private"),
    ("https://100.64.0.1/", "shared address space"),
    ("https://224.0.0.1/", "multicast"),
    ("https://[ff02::1]/", "multicast"),
    ("https://0.0.0.0/", "unspecified"),
    ("https://[::]/", "unspecified"),
    ("https://240.0.0.1/", "private"),  # Python counts 240/4 (reserved) among its private ranges
    ("https://[::ffff:127.0.0.1]/", "loopback address (written as IPv6)"),
    ("https://[::ffff:169.254.169.254]/", "metadata"),
    ("https://[::ffff:10.0.0.1]/", "private address (written as IPv6)"),
    ("https://[2002:7f00:1::]/", "loopback address (written as IPv6)"),  # 6to4 of 127.0.0.1
    ("https://[64:ff9b::a9fe:a9fe]/", "metadata"),  # NAT64 of 169.254.169.254
    ("https://localhost/hook", "localhost is not a reachable public address"),
])
def test_addresses_that_are_not_public_are_refused_at_submit(url: str, reason: str) -> None:
    with pytest.raises(RequestError) as caught:
        check_url(url, frozenset())
    assert caught.value.field == "webhook"
    assert reason in caught.value.message
    assert caught.value.http_status == 422


@pytest.mark.parametrize(("url", "reason"), [
    ("http://93.184.215.14/hook", "only https"),
    ("ftp://93.184.215.14/hook", "only https"),
    ("file:///etc/passwd", "only https"),
    ("https://user:pw@93.184.215.14/hook", "credentials"),
    ("https://token@93.184.215.14/hook", "credentials"),
    ("https://93.184.215.14/" + "a" * 2100, "longer than"),
    ("https://93.184.215.14/a b", "whitespace"),
    ("https://93.184.215.14/a\r\nX-Injected: 1", "whitespace"),
    ("https:///hook", "no host"),
    ("https://93.184.215.14:99999/", "malformed"),
    ("", "empty"),
    ("https://no-such-host.invalid/hook", "no-such-host.invalid is not a reachable public address"),
])
def test_malformed_or_unsafe_urls_are_refused_and_name_the_field(url: str, reason: str) -> None:
    with pytest.raises(RequestError) as caught:
        check_url(url, frozenset())
    assert caught.value.field == "webhook" and reason in caught.value.message


def test_public_addresses_pass_and_the_allowlist_opens_hosts_addresses_and_networks() -> None:
    check_url("https://93.184.215.14/hook?x=1", frozenset())
    check_url("https://[2606:4700::1111]/hook", frozenset())
    # an address, a network holding it, a name: each opens exactly what it names, http included
    check_url("http://127.0.0.1:8000/hook", LOCAL)
    check_url("https://10.1.2.3/", frozenset({"10.0.0.0/8"}))
    check_url("http://10.1.2.3/", frozenset({"10.0.0.0/8"}))
    check_url("http://localhost:9/hook", frozenset({"localhost"}))
    with pytest.raises(RequestError, match="private"):
        check_url("https://10.1.2.3/", frozenset({"192.168.0.0/16"}))
    with pytest.raises(RequestError, match="only https"):
        check_url("http://127.0.0.2/", LOCAL)


def test_a_name_is_refused_when_any_of_its_addresses_is_not_public() -> None:
    # localhost resolves to 127.0.0.1 (and often ::1): allowing one of its addresses is not enough when the other
    # is refused, since the resolver could hand out either
    found = [ipaddress.ip_address(i[4][0]) for i in socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)]
    assert vetted_addresses("localhost", 80, frozenset(str(a) for a in found)) == list(dict.fromkeys(found))
    if len(set(found)) > 1:
        with pytest.raises(RequestError, match="loopback"):
            vetted_addresses("localhost", 80, frozenset({str(found[0])}))


def test_public_and_special_addresses_are_told_apart() -> None:
    assert why_not_public(ipaddress.ip_address("93.184.215.14")) is None
    assert why_not_public(ipaddress.ip_address("2606:4700::1111")) is None
    assert why_not_public(ipaddress.ip_address("::ffff:93.184.215.14")) is None
    assert why_not_public(ipaddress.ip_address("192.0.2.1")) is not None  # documentation range


# -- at send time, with real sockets


def _send(url: str, allow: frozenset[str], body: bytes = b'{"type":"task.completed"}',
          secret: str | None = None, read_timeout_s: float = 5.0) -> tuple[float, DeliveryAttempt]:
    secret = secret or signing.new_secret()
    started = time.monotonic()
    attempt = send(url, headers=signing.headers(secret, "msg_test", int(time.time()), body), body=body,
                   allow=allow, connect_timeout_s=2.0, read_timeout_s=read_timeout_s)
    return time.monotonic() - started, attempt


def test_a_signed_post_reaches_an_allowed_receiver() -> None:
    secret = signing.new_secret()
    body = json.dumps({"type": "task.completed", "data": {"taskId": "t1"}}).encode()
    with WebhookReceiver(secret=secret) as receiver:
        _, attempt = _send(receiver.url, LOCAL, body=body, secret=secret)
        (got,) = receiver.wait_for(1)
    assert attempt.status == 200 and attempt.error is None
    assert got.method == "POST" and got.path == "/hook" and got.body == body and got.valid is True
    assert got.headers["content-type"] == "application/json" and got.headers["webhook-id"] == "msg_test"


def test_a_receiver_on_a_refused_address_is_never_connected_to() -> None:
    with WebhookReceiver() as receiver:
        _, attempt = _send(receiver.url, frozenset())  # plain http to a host the operator did not allow
        _, by_https = _send(receiver.url.replace("http://", "https://"), frozenset())
        _, by_name = _send(f"https://localhost:{receiver.port}/hook", frozenset())
        assert receiver.received == []
    assert attempt.status is None and "only https" in str(attempt.error)
    assert by_https.status is None and "loopback" in str(by_https.error)
    # A name's message is the same whether it resolves privately or not at all: no map of internal names.
    assert by_name.status is None and "not a reachable public address" in str(by_name.error)
    assert "127.0.0.1" not in str(by_name.error)


def test_the_metadata_address_is_refused_without_a_connection() -> None:
    elapsed, attempt = _send("https://169.254.169.254/latest/meta-data/iam/", frozenset())
    assert attempt.status is None and "metadata" in str(attempt.error)
    assert elapsed < 1.0  # refused by the guard, not by a connect timeout


def test_a_redirect_to_a_private_address_is_not_followed() -> None:
    # The private target: a second receiver on 127.0.0.2, which the allowlist does not name.
    with WebhookReceiver() as receiver, WebhookReceiver(host="127.0.0.2") as private:
        receiver.redirect(private.url)
        receiver.redirect("http://169.254.169.254/latest/meta-data/", status=307)
        _, first = _send(receiver.url, LOCAL)
        _, second = _send(receiver.url, LOCAL)
        receiver.wait_for(2)
        assert private.received == []
    assert first.status == 302 and first.error == "redirect not followed"
    assert second.status == 307 and second.error == "redirect not followed"


def test_failures_are_attempts_not_exceptions() -> None:
    with WebhookReceiver() as receiver:
        receiver.fail(1, status=500)
        receiver.fail(1, status=404)
        _, five = _send(receiver.url, LOCAL)
        _, four = _send(receiver.url, LOCAL)
    assert (five.status, five.error) == (500, "HTTP 500")
    assert (four.status, four.error) == (404, "HTTP 404")
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    _, refused = _send(f"http://127.0.0.1:{port}/hook", LOCAL)
    assert refused.status is None and refused.error == "connection refused"


def test_a_hanging_receiver_costs_at_most_the_deadline() -> None:
    with WebhookReceiver() as receiver:
        receiver.hang()
        elapsed, attempt = _send(receiver.url, LOCAL, read_timeout_s=0.5)
    assert attempt.status is None and attempt.error == "timed out"
    assert elapsed < 2.5


def test_a_receiver_dripping_its_answer_is_cut_off_at_the_overall_deadline() -> None:
    # Each byte arrives within the read timeout, so only the overall deadline ends the try.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    stop = threading.Event()

    def drip() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
                if stop.wait(0.1):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    try:
        elapsed, attempt = _send(f"http://127.0.0.1:{server.getsockname()[1]}/hook", LOCAL, read_timeout_s=1.0)
    finally:
        stop.set()
        thread.join(5)
        server.close()
    assert attempt.status is None and attempt.error == "timed out"
    assert elapsed < 4.0


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_connects_to_the_vetted_address_and_checks_the_certificate_for_the_name(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    cert, key = _self_signed(tmp_path, "localhost")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    body = b'{"type":"task.completed"}'
    headers = signing.headers(signing.new_secret(), "msg_tls", int(time.time()), body)
    with WebhookReceiver(tls=server_tls) as receiver:
        def post(url: str, allow: frozenset[str], context: ssl.SSLContext | None) -> DeliveryAttempt:
            return send(url, headers=headers, body=body, allow=allow, connect_timeout_s=2, read_timeout_s=5,
                        tls_context=context)

        by_name = post(f"https://localhost:{receiver.port}/hook", frozenset({"localhost"}), trusting)
        by_address = post(f"https://127.0.0.1:{receiver.port}/hook", LOCAL, trusting)
        untrusted = post(f"https://localhost:{receiver.port}/hook", frozenset({"localhost"}), None)
        got = receiver.received
    assert (by_name.status, by_name.error) == (200, None)
    assert len(got) == 1 and got[0].headers["host"] == f"localhost:{receiver.port}" and got[0].body == body
    # the certificate names localhost, not the address connected to: SNI and the check use the URL's name
    assert by_address.status is None and by_address.error == "TLS certificate not valid for the host"
    assert untrusted.status is None and untrusted.error == "TLS certificate not valid for the host"


def test_site_local_ipv6_and_non_ascii_paths_are_refused() -> None:
    with pytest.raises(RequestError) as site_local:
        check_url("https://[fec0::1]/hook", frozenset())
    assert "site-local" in site_local.value.message
    with pytest.raises(RequestError) as non_ascii:
        check_url("http://127.0.0.1:9/hook/\u00e9", frozenset({"127.0.0.1"}))
    assert non_ascii.value.field == "webhook" and "ASCII" in non_ascii.value.message
