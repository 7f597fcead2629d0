"""The IMDSv2 client and its users (SpotInterruptionWatcher, the instance id for scale-in protection) against an
IMDSv2-only metadata server on loopback (tests/imds_server.py)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from helpers import free_port, wait_until
from imds_server import INSTANCE_ACTION_PATH, REBALANCE_PATH, ImdsTestServer
from sdasync.errors import ConfigError, MetadataUnavailable
from sdasync.imds import ImdsClient
from sdasync.scaler.actuators.asg import instance_id_from_imds
from sdasync.worker.interruption import SpotInterruptionWatcher

INTERVAL_S = 0.1


class Notices:
    """The on_notice callback: records each call and lets a test wait for the first."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.arrived = threading.Event()

    def __call__(self, kind: str, detail: dict[str, Any]) -> None:
        self.calls.append((kind, detail))
        self.arrived.set()


@pytest.fixture
def imds() -> Iterator[ImdsTestServer]:
    with ImdsTestServer() as server:
        yield server


@pytest.fixture
def notices() -> Notices:
    return Notices()


@pytest.fixture
def watcher(imds: ImdsTestServer, notices: Notices) -> Iterator[SpotInterruptionWatcher]:
    watch = SpotInterruptionWatcher(notices, base_url=imds.url, interval_s=INTERVAL_S)
    yield watch
    watch.stop()


def action_reads(imds: ImdsTestServer) -> int:
    return imds.count(f"GET {INSTANCE_ACTION_PATH}")


def test_spot_interruption_is_seen_within_an_interval(
    imds: ImdsTestServer, notices: Notices, watcher: SpotInterruptionWatcher
) -> None:
    watcher.start()
    wait_until(lambda: action_reads(imds) >= 2)  # polling, and nothing to report yet
    assert notices.calls == []
    imds.set_instance_action("terminate", "2026-11-25T12:00:00Z")
    noticed_at = time.monotonic()
    assert notices.arrived.wait(INTERVAL_S + 2.0)
    assert time.monotonic() - noticed_at < INTERVAL_S + 1.0
    assert notices.calls == [("spot-interruption", {"action": "terminate", "time": "2026-11-25T12:00:00Z"})]
    assert watcher.notice == notices.calls[0]
    assert imds.count("unauthorized") == 0  # every read carried a token


def test_rebalance_recommendation_is_seen(
    imds: ImdsTestServer, notices: Notices, watcher: SpotInterruptionWatcher
) -> None:
    watcher.start()
    wait_until(lambda: imds.count(f"GET {REBALANCE_PATH}") >= 1)
    imds.set_rebalance("2026-11-25T11:58:00Z")
    assert notices.arrived.wait(INTERVAL_S + 2.0)
    assert notices.calls == [("rebalance-recommendation", {"noticeTime": "2026-11-25T11:58:00Z"})]


def test_an_interruption_wins_over_a_rebalance(
    imds: ImdsTestServer, notices: Notices, watcher: SpotInterruptionWatcher
) -> None:
    imds.set_rebalance()
    imds.set_instance_action("stop")
    watcher.start()
    assert notices.arrived.wait(2.0)
    assert [kind for kind, _ in notices.calls] == ["spot-interruption"]


def test_on_notice_is_called_once_and_the_watcher_stops(
    imds: ImdsTestServer, notices: Notices, watcher: SpotInterruptionWatcher
) -> None:
    imds.set_instance_action()
    watcher.start()
    assert notices.arrived.wait(2.0)
    wait_until(lambda: not watcher.running)
    reads = action_reads(imds)
    imds.set_rebalance()
    watcher.stop()
    assert len(notices.calls) == 1
    assert action_reads(imds) == reads  # the thread is gone: no more polling


def test_the_token_is_reused_across_polls_and_refreshed_after_a_401(
    imds: ImdsTestServer, watcher: SpotInterruptionWatcher
) -> None:
    watcher.start()
    wait_until(lambda: action_reads(imds) >= 5)
    assert imds.count("token") == 1
    assert imds.token_ttls == ["21600"]
    imds.revoke_tokens()  # as an IMDS restart would
    reads = action_reads(imds)
    wait_until(lambda: action_reads(imds) >= reads + 3)
    assert imds.count("token") == 2
    assert imds.count("unauthorized") == 1  # one refused read, then a fresh token and a retry that worked
    assert watcher.available is True


def test_the_token_is_renewed_before_its_ttl(imds: ImdsTestServer, notices: Notices) -> None:
    with SpotInterruptionWatcher(notices, base_url=imds.url, interval_s=INTERVAL_S, token_ttl_s=1) as watcher:
        wait_until(lambda: imds.count("token") >= 3, timeout=5)
        assert watcher.running
    assert imds.token_ttls[0] == "1"
    assert imds.count("unauthorized") == 0  # renewed before IMDS would have refused it


def test_the_server_refuses_reads_without_a_token(imds: ImdsTestServer) -> None:
    url = f"{imds.url}{INSTANCE_ACTION_PATH}"
    with httpx.Client(trust_env=False) as client:
        assert client.get(url).status_code == 401
        assert client.get(url, headers={"X-aws-ec2-metadata-token": "made-up"}).status_code == 401
        assert client.put(f"{imds.url}/latest/api/token").status_code == 400  # the TTL header is required
        ttl = {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
        forwarded = {**ttl, "X-Forwarded-For": "1.2.3.4"}  # IMDS refuses tokens to requests that went via a proxy
        assert client.put(f"{imds.url}/latest/api/token", headers=forwarded).status_code == 403
        token = client.put(f"{imds.url}/latest/api/token", headers=ttl).text
        assert client.get(url, headers={"X-aws-ec2-metadata-token": token}).status_code == 404
    assert imds.count("unauthorized") == 2


def test_unreachable_imds_is_logged_once_never_raises_and_stops_fast(
    notices: Notices, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sdasync.worker.interruption")
    base_url = f"http://127.0.0.1:{free_port()}"
    watcher = SpotInterruptionWatcher(notices, base_url=base_url, interval_s=INTERVAL_S, unavailable_interval_s=0.02)
    watcher.start()
    wait_until(lambda: watcher.checks >= 5)
    assert watcher.running
    assert watcher.available is False
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 0.5
    assert not watcher.running
    records = [r for r in caplog.records if r.name == "sdasync.worker.interruption"]
    assert [r.levelno for r in records] == [logging.INFO]
    assert "unavailable" in records[0].getMessage()
    assert notices.calls == []


def test_off_ec2_the_watcher_backs_off_and_stop_does_not_wait_for_it(notices: Notices) -> None:
    watcher = SpotInterruptionWatcher(notices, base_url=f"http://127.0.0.1:{free_port()}", interval_s=INTERVAL_S)
    assert watcher.unavailable_interval_s == 60
    watcher.start()
    wait_until(lambda: watcher.available is False)
    assert watcher.checks == 1  # and the next check is a minute away
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 0.5


def test_a_failing_callback_does_not_escape(imds: ImdsTestServer, caplog: pytest.LogCaptureFixture) -> None:
    def explode(kind: str, detail: dict[str, Any]) -> None:
        raise RuntimeError("callback bug")

    imds.set_instance_action()
    with SpotInterruptionWatcher(explode, base_url=imds.url, interval_s=INTERVAL_S) as watcher:
        wait_until(lambda: watcher.notice is not None and not watcher.running)
    assert any("on_notice raised" in r.getMessage() for r in caplog.records)


def test_base_url_is_an_argument_never_the_environment(monkeypatch: pytest.MonkeyPatch, notices: Notices) -> None:
    # The worker's entry point reads SDASYNC_IMDS_URL into Settings and passes it; nothing deeper reads it.
    monkeypatch.setenv("SDASYNC_IMDS_URL", "http://127.0.0.1:1/")
    assert SpotInterruptionWatcher(notices).base_url == "http://169.254.169.254"
    assert SpotInterruptionWatcher(notices, base_url="http://x:8/").base_url == "http://x:8"


def test_the_imds_client_reads_documents_with_a_token(imds: ImdsTestServer) -> None:
    imds.set_rebalance("2026-11-25T11:58:00Z")
    with ImdsClient(imds.url, token_ttl_s=60) as client:
        assert json.loads(client.get(REBALANCE_PATH) or "") == {"noticeTime": "2026-11-25T11:58:00Z"}
        assert client.get(INSTANCE_ACTION_PATH) is None  # 404: no notice
    assert imds.token_ttls == ["60"] and imds.count("token") == 1  # one token for both reads
    with pytest.raises(MetadataUnavailable), ImdsClient(f"http://127.0.0.1:{free_port()}") as nothing:
        nothing.get(REBALANCE_PATH)
    with pytest.raises(ValueError, match="token_ttl_s must be"):
        ImdsClient(imds.url, token_ttl_s=0)


def test_instance_id_comes_from_settings_or_imds(imds: ImdsTestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}"
    assert instance_id_from_imds(base_url=unreachable, instance_id="i-0123456789") == "i-0123456789"
    monkeypatch.setenv("SDASYNC_INSTANCE_ID", "i-from-the-environment")  # read by the entry point, not here
    with pytest.raises(ConfigError, match=r"did not answer.*SDASYNC_INSTANCE_ID"):
        instance_id_from_imds(base_url=unreachable)
    with pytest.raises(ConfigError, match="has none"):
        instance_id_from_imds(base_url=imds.url)  # IMDS answers, with a token, but knows no instance id
    assert imds.count("token") == 1 and imds.count("GET /latest/meta-data/instance-id") == 1  # authorized


def test_context_manager_starts_and_stops(imds: ImdsTestServer, notices: Notices) -> None:
    with SpotInterruptionWatcher(notices, base_url=imds.url, interval_s=INTERVAL_S) as watcher:
        assert watcher.running
        wait_until(lambda: watcher.available is True)
    assert not watcher.running


@pytest.mark.parametrize("kwargs", [{"interval_s": 0}, {"unavailable_interval_s": -1}, {"token_ttl_s": 21601}])
def test_bad_settings_fail_fast(notices: Notices, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        SpotInterruptionWatcher(notices, base_url="http://127.0.0.1:1", **kwargs)
