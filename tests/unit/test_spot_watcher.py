"""The spot watcher (simpsons/spot.py) against a real HTTP server on 127.0.0.1 standing in for
EC2's instance metadata service, with IMDSv2's rules: a session token from a PUT, required on
every GET (401 without it or once it has expired), 404 at spot/instance-action until a notice.

The drain itself is in test_spot.py, on a real Ray cluster.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone

import pytest
from fake_imds import NOTICE_TIME, FakeImds

from simpsons.cluster import free_port
from simpsons.spot import InstanceMetadata, deadline_of, watch


@pytest.fixture
def imds():
    with FakeImds() as server:
        yield server


def test_no_notice_means_no_drain_and_every_read_carries_the_session_token(imds):
    notices = []
    assert watch(InstanceMetadata(imds.url), lambda *n: notices.append(n), poll_s=0.01, polls=3) is False
    assert notices == []
    puts = [r for r in imds.requests if r[0] == "PUT"]
    gets = [r for r in imds.requests if r[0] == "GET"]
    assert len(puts) == 1 and puts[0][2]["X-aws-ec2-metadata-token-ttl-seconds"] == "21600"  # one token, reused
    assert len(gets) == 3 and all(r[2]["X-aws-ec2-metadata-token"] == "token-0" for r in gets)


def test_a_notice_calls_on_notice_once_with_its_deadline(imds):
    notices = []
    imds.notice = {"action": "terminate", "time": NOTICE_TIME}
    assert watch(InstanceMetadata(imds.url), lambda *n: notices.append(n), poll_s=0.01, polls=5) is True
    deadline = datetime(2026, 12, 6, 18, 22, tzinfo=timezone.utc).timestamp()
    assert notices == [(deadline, {"action": "terminate", "time": NOTICE_TIME})]
    assert len([r for r in imds.requests if r[0] == "GET"]) == 1  # it stops polling at the notice


def test_a_notice_posted_while_watching_is_seen_at_the_next_poll(imds):
    notices = []
    worker = threading.Thread(target=watch, args=(InstanceMetadata(imds.url), lambda *n: notices.append(n), 0.05))
    worker.start()
    time.sleep(0.3)
    assert notices == []
    imds.notice = {"action": "stop", "time": NOTICE_TIME}
    worker.join(5)
    assert not worker.is_alive() and len(notices) == 1 and notices[0][1]["action"] == "stop"


def test_an_expired_token_is_replaced(imds):
    metadata = InstanceMetadata(imds.url)
    assert metadata.spot_action() is None
    imds.tokens.append("rotated")  # the watcher's token-0 is no longer valid: 401
    imds.notice = {"action": "terminate", "time": NOTICE_TIME}
    assert metadata.spot_action() == imds.notice
    assert [r[0] for r in imds.requests] == ["PUT", "GET", "GET", "PUT", "GET"]


def test_an_unreachable_metadata_service_is_logged_and_polled_again(caplog):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="simpsons.spot"):
        assert watch(InstanceMetadata(url, timeout=1), lambda *n: None, poll_s=0.01, polls=2) is False
    assert time.monotonic() - started < 10
    assert sum("Could not read the spot notice" in r.message for r in caplog.records) == 2


def test_the_endpoint_follows_botos_environment_variable(monkeypatch, imds):
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url + "/")
    assert InstanceMetadata().url == imds.url
    assert deadline_of({"time": "1970-01-01T00:02:00Z"}) == 120.0
