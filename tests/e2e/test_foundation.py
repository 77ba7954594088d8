"""The filter in a real Envoy: transparent when nothing is configured; bad config refused."""

import hashlib
import json
import time

import pytest


def test_request_passes_through_unchanged(harness):
    pod = harness.pod("a1", "a")
    envoy = harness.envoy({}, {"group-a": [pod]})

    body = b"x" * 100_000
    r = envoy.request("POST", "/orders?tag=1", body,
                      {"content-type": "application/octet-stream", "x-custom": "kept"})
    assert r.status == 201, r
    echo = r.json()
    assert echo["path"] == "/orders?tag=1"
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echo["headers"]["x-custom"] == "kept"
    assert r.headers["x-pod"] == "a1"
    assert len(pod.ledger()) == 1

    # A scripted upstream answer reaches the client byte for byte.
    pod.script({"status": 418, "headers": [["x-teapot", "short and stout"],
                                           ["content-type", "text/plain"]],
                "body": "I'm a teapot"})
    r = envoy.request("GET", "/brew")
    assert r.status == 418
    assert r.headers["x-teapot"] == "short and stout"
    assert r.headers["content-type"] == "text/plain"
    assert r.body == b"I'm a teapot"
    assert len(pod.attempts()) == 2


def test_config_given_as_json_string_is_accepted(harness):
    pod = harness.pod("a1", "a")
    envoy = harness.envoy(json.dumps(json.dumps({})), {"group-a": [pod]})
    assert envoy.request("GET", "/").status == 200
    assert "rollsafe: configured" in envoy.log()


@pytest.mark.parametrize("config, field", [
    ({"bogus": 1}, "bogus"),
    ("{not json", "config"),
    ({"retry": {"attempts": 0}}, "retry.attempts: must be 1..=10, got 0"),
    ({"maintenance": {"windows": [{"rrule": "FREQ=HOURLY", "start_time": "02:00", "duration_s": 60}]}},
     "maintenance.windows[0].rrule: FREQ must be DAILY or WEEKLY"),
])
def test_invalid_config_is_refused_and_the_log_names_the_field(harness, config, field):
    pod = harness.pod("a1", "a")
    envoy = harness.envoy(config, {"group-a": [pod]}, start=False)
    envoy.start(wait_ready=False)
    log = envoy.wait_refused()
    lines = [line for line in log.splitlines() if "rollsafe: " in line and "error" in line.lower()]
    assert any(f"rollsafe: {field}" in line for line in lines), log[-3000:]
    # The filter never runs with a refused configuration: Envoy does not start; Kong's host
    # serves nothing with it (its workers exit). No request reaches the pod either way.
    with pytest.raises(OSError):
        envoy.request("GET", "/", timeout=2)
    assert pod.attempts() == []


def test_pod_drains_on_sigterm_and_dies_on_sigkill(harness):
    """The harness's rolling-update tools: a drained pod finishes what it has, then refuses."""
    import concurrent.futures
    import socket

    from tests.e2e.harness import request

    pod = harness.pod("a1", "a")
    pod.script({"delay_ms": 800, "status": 201, "commit": True})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(request, pod.ip, pod.port, "POST", "/orders", "in-flight")
        time.sleep(0.3)
        assert pod.stop() == 0  # SIGTERM: waits for the in-flight request, then exits 0
        assert slow.result().status == 201
    assert [w["body"] for w in pod.ledger()] == ["in-flight"]
    with pytest.raises(OSError):
        socket.create_connection((pod.ip, pod.port), timeout=0.5).close()
    pod.start()
    assert request(pod.ip, pod.port, "GET", "/x").status == 200
    pod.kill()
    assert pod.proc.returncode == -9
