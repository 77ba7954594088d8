"""A keyed write that may still be executing is never sent again (README, "Exactly once").

The pod behaves like an application: it commits every write it receives whole, even after its
client went away, and answers a try marked `Idempotency-In-Doubt` from its own records (as an
application with a unique constraint on the key would). Both hosts: the dispatch driver on
Kong's host, the native one (the route's own request) and the dispatch one on Envoy.
"""

import concurrent.futures
import time

import pytest

from tests.e2e.harness import wait_for
from tests.e2e.test_idempotency import post

DRIVERS = ["native", "dispatch"]


def config(driver, lease_ms=None, **retry) -> dict:
    r = {"exchange": driver, "attempts": 3, "per_try_timeout_ms": 1000, "deadline_ms": 6000,
         "backoff": {"base_ms": 10, "max_ms": 20}}
    r.update(retry)
    idem = {"lease_ms": lease_ms} if lease_ms else {}
    return {"retry": r, "idempotency": idem}


def in_doubt_attempts(pod):
    return [a for a in pod.attempts() if a["headers"].get("idempotency-in-doubt") == "true"]


@pytest.fixture(params=DRIVERS)
def driver(request):
    return request.param


def test_a_first_attempt_slower_than_the_per_try_timeout_runs_once(harness, driver):
    """1.5 s of work, a 1 s per-try timeout: the write is not sent again while it runs, and the
    client gets the application's answer."""
    pod = harness.pod("a1", "a")
    gw = harness.envoy(config(driver), {"svc": [pod]})
    pod.script({"delay_ms": 1500})
    r = post(gw, '"slow-1"', '{"sku": 1}')
    assert r.status == 201, r
    assert r.json()["committed"] is True
    time.sleep(0.3)
    assert len(pod.ledger()) == 1
    assert len(pod.attempts()) == 1, "sent once"


def test_a_503_then_a_slow_retry_runs_once(harness, driver):
    """A draining pod's 503 is an answer (the application is done with that attempt), so the
    write goes again; the retry then takes longer than the per-try timeout and is waited for."""
    pod = harness.pod("a1", "a")
    gw = harness.envoy(config(driver), {"svc": [pod]})
    pod.script({"status": 503, "body": "draining"}, {"delay_ms": 1500})
    r = post(gw, '"slow-2"', '{"sku": 2}')
    assert r.status == 201, r
    time.sleep(0.3)
    assert len(pod.ledger()) == 1
    assert len(pod.attempts()) == 2


def test_a_write_whose_connection_broke_after_it_was_sent_is_held_then_in_doubt(harness, driver):
    """The pod commits, then its connection resets before the answer: rollsafe cannot know the
    write ran, so it does not send it again. The client gets 502 "outcome unknown", its retries
    get 409 while the key is held, and the first try after the lease reaches the application
    marked in doubt, which answers it from its records: one commit."""
    pod = harness.pod("a1", "a")
    gw = harness.envoy(config(driver, lease_ms=2000, deadline_ms=2000), {"svc": [pod]})
    pod.script({"reset": True, "commit": True})
    first = post(gw, '"broke-1"', '{"sku": 3}')
    assert first.status == 502, first
    problem = first.problem()
    assert problem["type"] == "urn:problem-type:rollsafe:upstream-outcome-unknown"
    assert int(first.headers["retry-after"]) == 2
    assert len(pod.attempts()) == 1, "not sent again"
    held = post(gw, '"broke-1"', '{"sku": 3}')
    assert held.status == 409, held
    time.sleep(2.2)
    later = post(gw, '"broke-1"', '{"sku": 3}')
    assert later.status == 200, later
    assert later.json()["duplicate_of"]["idempotency_key"] == '"broke-1"'
    assert len(in_doubt_attempts(pod)) == 1
    assert len(pod.ledger()) == 1
    if gw.has_stats:
        stats = gw.stats()
        assert stats["wasmcustom.rollsafe_idempotency_outcome_unknown"] == 1
        assert stats["wasmcustom.rollsafe_idempotency_in_doubt"] == 1


def test_past_the_deadline_the_outcome_is_unknown_and_no_second_execution_starts(harness, driver):
    """The application takes 3 s, longer than the deadline and the lease (2 s): the client gets
    504 "outcome unknown"; the key stays held for a lease from then, and the try after it is in
    doubt, so the application (still finishing the first) answers it from its records."""
    pod = harness.pod("a1", "a")
    gw = harness.envoy(config(driver, lease_ms=2000, deadline_ms=2000), {"svc": [pod]})
    pod.script({"delay_ms": 3000})
    started = time.monotonic()
    first = post(gw, '"late-1"', '{"sku": 4}')
    assert first.status == 504, first
    assert first.problem()["type"] == "urn:problem-type:rollsafe:upstream-outcome-unknown"
    assert time.monotonic() - started < 2.9, "answered at the deadline"
    assert post(gw, '"late-1"', '{"sku": 4}').status == 409
    wait_for(lambda: len(pod.ledger()) == 1, 5, "the first execution's commit")
    time.sleep(max(0.0, started + 4.3 - time.monotonic()))
    later = post(gw, '"late-1"', '{"sku": 4}')
    assert later.status == 200, later
    assert "duplicate_of" in later.json()
    assert len(pod.ledger()) == 1, "one execution"
    assert len(in_doubt_attempts(pod)) == 1


def test_a_gateway_killed_mid_write_leaves_the_key_held_then_in_doubt(harness):
    """Two gateway nodes on one Redis. Node A dies (SIGKILL) while the application is still
    executing its write; the client's retry on node B gets 409 until the lease ends, then goes
    to the application marked in doubt, which answers it from its records."""
    from tests.e2e.test_shared_store import two_nodes
    cfg = {"retry": {"per_try_timeout_ms": 1000, "deadline_ms": 3000,
                     "backoff": {"base_ms": 10, "max_ms": 20}},
           "idempotency": {"store": "redis", "lease_ms": 3000,
                           "redis": {"target": "webdis", "timeout_ms": 500}}}
    store, [pod], a, b = two_nodes(harness, cfg)
    pod.script({"delay_ms": 1500})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        lost = pool.submit(post, a, '"node-1"', '{"sku": 5}')
        wait_for(lambda: len(pod.attempts()) == 1, 5, "the write at the pod")
        a.kill()
        try:
            lost.result()
        except OSError:
            pass  # the client's connection died with node A
    claimed_at = time.monotonic()
    r = post(b, '"node-1"', '{"sku": 5}')
    assert r.status == 409, r
    wait_for(lambda: len(pod.ledger()) == 1, 5, "the first execution's commit")
    time.sleep(max(0.0, claimed_at + 3.2 - time.monotonic()))
    later = post(b, '"node-1"', '{"sku": 5}')
    assert later.status == 200, later
    assert "duplicate_of" in later.json()
    assert len(in_doubt_attempts(pod)) == 1
    assert len(pod.ledger()) == 1


def curl_post(gw, path, key, body_path, timeout=120):
    """An upload as a client sends one: curl, which stops sending and reads an answer that comes
    early (and sends `Expect: 100-continue` for large bodies)."""
    import json
    import subprocess
    out = subprocess.run(
        ["curl", "-sS", "--max-time", str(timeout), "-o", "-",
         "-w", "\n@@status@@%{http_code}@@headers@@%{header_json}",
         "-H", f"idempotency-key: {key}", "-H", "content-type: application/octet-stream",
         "-H", "authorization: Bearer alice",
         "--data-binary", f"@{body_path}", f"http://127.0.0.1:{gw.port}{path}"],
        capture_output=True, check=False)
    assert out.returncode == 0, (out.returncode, out.stderr[-500:])
    text = out.stdout.decode(errors="replace")
    body, rest = text.rsplit("\n@@status@@", 1)
    status, headers = rest.split("@@headers@@", 1)
    headers = {k.lower(): v[0] for k, v in json.loads(headers).items()}
    return int(status), headers, body


@pytest.mark.parametrize("size", [8 << 20, 50_000_000], ids=["8MiB", "50MB"])
def test_a_large_keyed_upload_reaches_the_pod_whole_once_and_a_resend_is_replayed(harness, size,
                                                                                  tmp_path):
    """Over retry.max_body_bytes (1 MiB by default) a keyed upload is streamed to the application
    once (`body_too_large: stream`, the default), its key claimed before it goes: the pod gets
    it whole, once; a re-send is replayed, never run again, and never reset. Kong's host spills
    it to a file and proxy_pass carries it; on Envoy its route leaves the buffer filter off
    (README, "Large uploads")."""
    import hashlib
    import json
    pod = harness.pod("a1", "a")
    gw = harness.envoy({"retry": {"backoff": {"base_ms": 10, "max_ms": 20}}, "idempotency": {}},
                       {"svc": [pod]}, unbuffered=["/uploads"])
    body = (b"rollsafe-upload-" * (size // 16 + 1))[:size]
    path = tmp_path / "upload.bin"
    path.write_bytes(body)
    sha = hashlib.sha256(body).hexdigest()
    status, headers, text = curl_post(gw, "/uploads/1", '"upload-1"', path)
    assert status == 201, (status, text[:300])
    answer = json.loads(text)
    assert answer["body_sha256"] == sha and answer["committed"] is True
    [attempt] = pod.attempts()
    assert attempt["body_len"] == size, "whole"
    status, headers, again = curl_post(gw, "/uploads/1", '"upload-1"', path)
    assert status == 201, (status, again[:300])
    assert headers.get("idempotent-replayed") == "true"
    assert json.loads(again) == answer
    assert len(pod.ledger()) == 1, "once"
    assert len(pod.attempts()) == 1


def test_a_retry_that_breaks_after_the_commit_is_held_not_run_again(harness, driver):
    """A draining pod's empty 503 (an answer: the write goes again), then the retry's pod commits
    and its connection breaks before the answer. On Kong's host that retry is carried by Kong's
    proxy_pass and nginx answers the failure itself (502): rollsafe tells it from the
    application's by nginx's upstream timings and holds the key. Either way the client's re-send
    is not run again: 409 while the key is held, then the try in doubt answered from records."""
    pod = harness.pod("a1", "a")
    gw = harness.envoy(config(driver, lease_ms=2000, deadline_ms=2000), {"svc": [pod]})
    pod.script({"status": 503, "body": ""}, {"reset": True, "commit": True})
    first = post(gw, '"retry-broke"', '{"sku": 6}')
    assert first.status == 502, first
    assert len(pod.attempts()) == 2
    again = post(gw, '"retry-broke"', '{"sku": 6}')
    assert again.status == 409, again
    time.sleep(2.2)
    later = post(gw, '"retry-broke"', '{"sku": 6}')
    assert later.status == 200 and "duplicate_of" in later.json(), later
    assert len(pod.ledger()) == 1
