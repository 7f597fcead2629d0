from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from sdasync.webhooks import signing
from webhook_receiver import standard_webhooks_valid

# The worked example of the Standard Webhooks specification: a fixed secret, id, timestamp and body, and the
# signature the spec's reference libraries produce for them.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_specification_example_signs_as_published() -> None:
    assert signing.sign(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY) == SPEC_SIGNATURE
    headers = signing.headers(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY)
    assert headers == {"webhook-id": SPEC_ID, "webhook-timestamp": str(SPEC_TS), "webhook-signature": SPEC_SIGNATURE}
    assert signing.verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TS + 10)


def test_a_new_secret_signs_what_an_independent_verifier_accepts() -> None:
    secret = signing.new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    assert secret != signing.new_secret()
    body = b'{"type":"task.completed"}'
    headers = signing.headers(secret, "msg_abc", 1_700_000_000, body)
    assert standard_webhooks_valid(secret, headers, body, now=1_700_000_100)
    # computed by hand, as a receiver in any language would
    mac = hmac.new(base64.b64decode(secret[6:]), b"msg_abc.1700000000." + body, hashlib.sha256).digest()
    assert headers["webhook-signature"] == "v1," + base64.b64encode(mac).decode()


def test_verify_refuses_tampering_other_secrets_and_old_timestamps() -> None:
    secret, other = signing.new_secret(), signing.new_secret()
    body = b'{"a":1}'
    headers = signing.headers(secret, "msg_1", 1_000_000, body)
    assert signing.verify(secret, headers, body, now=1_000_000)
    assert not signing.verify(other, headers, body, now=1_000_000)
    assert not signing.verify(secret, headers, b'{"a":2}', now=1_000_000)
    assert not signing.verify(secret, {**headers, "webhook-id": "msg_2"}, body, now=1_000_000)
    assert not signing.verify(secret, headers, body, now=1_000_000 + signing.TOLERANCE_S + 1)
    assert not signing.verify(secret, headers, body, now=1_000_000 - signing.TOLERANCE_S - 1)
    assert not signing.verify(secret, {**headers, "webhook-timestamp": "soon"}, body, now=1_000_000)
    assert not signing.verify(secret, {}, body, now=1_000_000)
    # header names in any case, as proxies rewrite them
    assert signing.verify(secret, {k.upper(): v for k, v in headers.items()}, body, now=1_000_000)


def test_rotation_signs_with_every_secret_and_either_verifies() -> None:
    old, new = signing.new_secret(), signing.new_secret()
    headers = signing.headers([old, new], "msg_r", 50, b"{}")
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        assert signing.verify(secret, headers, b"{}", now=50)
        assert standard_webhooks_valid(secret, headers, b"{}", now=50)


@pytest.mark.parametrize("secret", ["whsec_", "whsec_not base64!", ""])
def test_malformed_secrets_are_refused(secret: str) -> None:
    with pytest.raises(ValueError, match="base64"):
        signing.sign(secret, "msg_1", 1, b"{}")


@pytest.mark.parametrize("msg_id", ["", "msg.1", "msg 1", "msg,1"])
def test_ids_that_would_make_the_signed_content_ambiguous_are_refused(msg_id: str) -> None:
    with pytest.raises(ValueError, match="webhook id"):
        signing.sign(signing.new_secret(), msg_id, 1, b"{}")
