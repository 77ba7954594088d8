"""Idempotency across gateway nodes: two gateways (two Envoy processes, or two Kong hosts under
ROLLSAFE_GATEWAY=kong) share one Redis through Webdis (`idempotency.store: redis`)."""

import collections
import concurrent.futures
import itertools
import os
import signal
import time

import pytest

from tests.e2e.harness import wait_for
from tests.e2e.test_idempotency import post


def shared(when_unavailable="fail-closed", cache=True, **idem) -> dict:
    return {
        "retry": {"backoff": {"base_ms": 10, "max_ms": 20}},
        "idempotency": {
            "store": "redis",
            "redis": {"target": "webdis", "when_unavailable": when_unavailable,
                      "cache": cache, "timeout_ms": 500},
            **idem,
        },
    }


def two_nodes(harness, cfg, pods=None, **kw):
    store = harness.shared_store()
    pods = pods or [harness.pod("a1", "a")]
    clusters = {"svc": pods, "webdis": [store]}
    a = harness.envoy(cfg, clusters, default_cluster="svc", **kw)
    b = harness.envoy(cfg, clusters, default_cluster="svc", **kw)
    return store, pods, a, b


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
def test_a_key_used_on_one_node_replays_on_the_other(harness, cache):
    store, [pod], a, b = two_nodes(harness, shared(cache=cache))
    first = post(a, '"order-1"', '{"sku": 1}')
    assert first.status == 201, first
    second = post(b, '"order-1"', '{"sku": 1}')
    assert second.status == 201, second
    assert second.headers.get("idempotent-replayed") == "true"
    assert second.body == first.body
    assert second.headers["content-type"] == first.headers["content-type"]
    # Same node again: from its cache when it keeps one, from Redis otherwise.
    third = post(a, '"order-1"', '{"sku": 1}')
    assert third.headers.get("idempotent-replayed") == "true"
    assert len(pod.ledger()) == 1
    # A different request under the same key, on either node: 422.
    assert post(b, '"order-1"', '{"sku": 22}').status == 422
    assert post(a, '"order-1"', '{"sku": 22}').status == 422
    assert len(pod.ledger()) == 1
    # The record is Redis's, under the prefix, with the TTL of a completed record.
    keys = store.command("KEYS", "rollsafe:*")["KEYS"]
    assert len(keys) == 1, keys
    ttl = store.command("PTTL", keys[0])["PTTL"]
    assert 86_000_000 < ttl <= 86_400_000, ttl
    if a.has_stats:
        assert a.stats().get("wasmcustom.rollsafe_idempotency_cache_hits", 0) == (2 if cache else 0)  # the replay, the 422


def test_a_write_sent_again_to_the_other_node_right_after_its_answer_is_replayed(harness):
    """The record is complete before the answer leaves: a client that re-sends at once to
    another gateway node (its retry after a lost answer) gets the replay, never a 409."""
    store, [pod], a, b = two_nodes(harness, shared())

    def pair(i):
        body = '{"sku": %d}' % i
        first = post(a, f'"again-{i}"', body)
        again = post(b, f'"again-{i}"', body)
        return first, again

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        pairs = list(pool.map(pair, range(500)))
    firsts = collections.Counter(f.status for f, _ in pairs)
    agains = collections.Counter((r.status, r.headers.get("idempotent-replayed")) for _, r in pairs)
    assert firsts == {201: 500}, firsts
    assert agains == {(201, "true"): 500}, agains
    assert all(r.body == f.body for f, r in pairs)
    assert len(pod.ledger()) == 500


def test_fifty_concurrent_duplicates_across_two_nodes_write_once(harness):
    pod = harness.pod("a1", "a")
    store, _, a, b = two_nodes(harness, shared(), pods=[pod])
    pod.script({"delay_ms": 400, "count": 1, "commit": True, "status": 201})
    nodes = itertools.cycle([a, b])
    targets = [next(nodes) for _ in range(50)]
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda n: post(n, '"burst"', '{"sku": 9}'), targets))
    statuses = sorted(r.status for r in results)
    assert len(pod.ledger()) == 1, statuses
    assert set(statuses) <= {201, 409}, statuses
    for r in results:
        if r.status == 409:
            assert r.problem()["type"].endswith("idempotency-key-in-flight")
            assert int(r.headers["retry-after"]) >= 1
    # Afterwards both nodes replay the one result.
    for node in (a, b):
        again = post(node, '"burst"', '{"sku": 9}')
        assert again.status == 201 and again.headers.get("idempotent-replayed") == "true"
    assert len(pod.ledger()) == 1


def test_a_lease_that_ran_out_cannot_be_completed_over_a_newer_claim(harness):
    """The owner check is the server's: a claim whose lease expired while its request still ran
    is taken by the next try; the first owner's late completion must not overwrite it."""
    pod = harness.pod("a1", "a")
    cfg = shared(lease_ms=1000)
    cfg["retry"].update({"attempts": 1, "per_try_timeout_ms": 900, "deadline_ms": 1000})
    store, _, a, b = two_nodes(harness, cfg, pods=[pod])
    key = '"slow"'
    pod.script({"delay_ms": 700, "count": 1, "commit": True, "status": 201})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(post, a, key, "{}")
        # Expire the first claim by hand (as if its lease had run out), then claim again.
        time.sleep(0.3)
        # (Beside the record, the claim's memory: the record's key with `~` appended.)
        [rkey] = [k for k in store.command("KEYS", "rollsafe:*")["KEYS"] if not k.endswith("~")]
        store.command("DEL", rkey)
        second = pool.submit(post, b, key, "{}")
        first = slow.result()
        second = second.result()
    assert first.status == 201
    # The deleted record let the second run (the test's doing), marked in doubt since the first
    # claim was never settled: the pod answered it from its records after the first committed.
    assert second.status == 200 and "duplicate_of" in second.json(), second
    assert len(pod.ledger()) == 1
    # The record is the second request's, completed: the first one's late write was refused.
    third = post(a, key, "{}")
    assert third.headers.get("idempotent-replayed") == "true"
    assert third.body == second.body, (third.body, first.body, second.body)


def test_redis_down_fails_closed_then_everything_recovers_with_nothing_lost(harness):
    pod = harness.pod("a1", "a")
    store, _, a, b = two_nodes(harness, shared(cache=False), pods=[pod])
    done = post(a, '"before"', '{"sku": 1}')
    assert done.status == 201
    store.stop_redis()
    seen = len(pod.attempts())
    for node in (a, b):
        r = post(node, '"during"', '{"sku": 2}')
        assert r.status == 503, r
        assert r.headers.get("retry-after") == "1"
        problem = r.problem() if node.kind == "envoy" else None
        if problem:
            assert problem["type"].endswith("idempotency-store-unavailable")
    assert len(pod.attempts()) == seen, "no upstream contact while the store is down"
    # Requests without a key are none of the store's business.
    assert a.request("GET", "/orders").status == 200
    store.start_redis()
    wait_for(store.recovered, 10, "webdis reaches redis again on every connection")
    # The key completed before the outage still replays (Redis kept it), on both nodes.
    for node in (a, b):
        r = post(node, '"before"', '{"sku": 1}')
        assert r.headers.get("idempotent-replayed") == "true", r
    # The refused write now runs, once.
    assert post(b, '"during"', '{"sku": 2}').status == 201
    assert post(a, '"during"', '{"sku": 2}').headers.get("idempotent-replayed") == "true"
    bodies = [e["idempotency_key"] for e in pod.ledger()]
    assert bodies == ['"before"', '"during"'], bodies
    if a.has_stats:
        assert a.stats().get("wasmcustom.rollsafe_idempotency_store_unavailable", 0) >= 1


def test_webdis_down_fails_open_when_configured(harness):
    pod = harness.pod("a1", "a")
    store, _, a, b = two_nodes(harness, shared(when_unavailable="fail-open"), pods=[pod])
    store.webdis.terminate()
    store.webdis.wait(10)
    r = post(a, '"open"', '{"sku": 3}')
    assert r.status == 201, r
    assert "idempotent-replayed" not in r.headers
    assert len(pod.ledger()) == 1, "ran once, unprotected"
    if a.has_stats:
        assert a.stats().get("wasmcustom.rollsafe_idempotency_fail_open", 0) == 1



def test_an_outage_is_counted_for_every_request_and_logged_once_a_period(harness):
    """Webdis down, fail-open, a dozen keyed writes: every one runs and (where the gateway has
    stats) is counted, but each worker writes the outage's warning once in its period, not a
    line per request."""
    pod = harness.pod("a1", "a")
    store, _, a, _ = two_nodes(harness, shared(when_unavailable="fail-open"), pods=[pod])
    store.webdis.terminate()
    store.webdis.wait(10)
    for i in range(12):
        assert post(a, f'"outage-{i}"', '{"sku": 4}').status == 201
    assert len(pod.ledger()) == 12, "each ran once, unprotected"
    workers = getattr(a, "concurrency", None) or a.workers
    log = a.log()
    for what in ("idempotency store unavailable", "idempotency key not held"):
        lines = [line for line in log.splitlines() if f"rollsafe: {what}" in line]
        assert 1 <= len(lines) <= workers, (what, lines)
    if a.has_stats:
        assert a.stats().get("wasmcustom.rollsafe_idempotency_fail_open", 0) == 12


def test_a_store_that_stops_answering_costs_at_most_its_timeout(harness):
    """Redis frozen (SIGSTOP): Webdis holds the call; rollsafe gives up at `timeout_ms` and
    answers as configured, without waiting on. The claim it gave up on, run late, does not
    hold the key: the client's next try runs."""
    pod = harness.pod("a1", "a")
    store, _, a, _ = two_nodes(harness, shared(), pods=[pod])
    assert post(a, '"warm"', "{}").status == 201
    os.kill(store.redis.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        r = post(a, '"frozen"', "{}", timeout=10)
        waited = time.monotonic() - started
        # Webdis still holds the claim; when Redis runs it, it is past its deadline (timeout
        # plus a second of clock skew) and does not land.
        time.sleep(max(0.0, 2.0 - waited))
    finally:
        os.kill(store.redis.pid, signal.SIGCONT)
    assert r.status == 503, r
    # timeout_ms is 500: the answer comes after it, not after the client's own 10 s.
    assert waited < 3, waited
    assert len(pod.ledger()) == 1
    wait_for(store.recovered, 10, "webdis reaches redis again on every connection")
    assert post(a, '"frozen"', "{}").status == 201
    assert len(pod.ledger()) == 2


@pytest.mark.parametrize("failure", ["close", "reset"])
def test_a_write_whose_pod_dropped_it_is_held_on_every_node_then_runs_once(harness, failure):
    """The pod drops a keyed write's connection after reading it (a terminating pod): whether it
    ran is unknown, so it is not sent again. Node A answers "outcome unknown"; the client's
    retries on node B get 409 while the key is held, then the try in doubt runs (nothing had
    committed), and both nodes replay it."""
    pod = harness.pod("a1", "a")
    cfg = shared()
    cfg["retry"].update({"attempts": 2, "per_try_timeout_ms": 1000, "deadline_ms": 2000})
    cfg["idempotency"]["lease_ms"] = 2000
    store, _, a, b = two_nodes(harness, cfg, pods=[pod])
    pod.script({failure: True})
    first = post(a, '"dropped"', '{"sku": 5}')
    assert first.status == 502, first
    assert first.problem()["type"].endswith("upstream-outcome-unknown")
    assert pod.ledger() == []
    statuses = []

    def ran_on_b():
        r = post(b, '"dropped"', '{"sku": 5}')
        statuses.append(r.status)
        return r.status == 201

    wait_for(ran_on_b, 5, "node B runs the write once the key's lease ended", interval=0.2)
    assert set(statuses) <= {201, 409}, statuses
    assert [a["headers"].get("idempotency-in-doubt") for a in pod.attempts()] == [None, "true"]
    assert post(a, '"dropped"', '{"sku": 5}').headers.get("idempotent-replayed") == "true"
    assert len(pod.ledger()) == 1


def test_a_large_body_waits_for_the_claim_and_reaches_the_pod_whole(harness):
    """On Envoy the request is held at its headers while the claim is asked, so its body is
    held too (under flow control): once claimed, the pod gets all of it, once."""
    pod = harness.pod("a1", "a")
    cfg = shared()
    cfg["retry"]["max_body_bytes"] = 1 << 20
    store, _, a, b = two_nodes(harness, cfg, pods=[pod])
    body = '{"blob": "' + "x" * (900 * 1024) + '"}'
    r = post(a, '"large"', body, timeout=20)
    assert r.status == 201, r
    [entry] = pod.ledger()
    assert entry["body_len"] == len(body)
    again = post(b, '"large"', body, timeout=20)
    assert again.headers.get("idempotent-replayed") == "true"
    assert len(pod.ledger()) == 1


def test_a_large_upload_streamed_on_one_node_is_replayed_by_the_other(harness, tmp_path):
    """An 8 MiB keyed upload, over retry.max_body_bytes: its claim is asked before it goes
    (Envoy: held at its headers; Kong's host: once nginx has the body in its file), it streams
    to the pod once, and the other node replays it."""
    import hashlib
    import json
    from tests.e2e.test_exactly_once import curl_post
    cfg = shared()
    store, [pod], a, b = two_nodes(harness, cfg, unbuffered=["/uploads"])
    body = (b"shared-upload-" * (8 << 20))[: 8 << 20]
    path = tmp_path / "upload.bin"
    path.write_bytes(body)
    status, _, text = curl_post(a, "/uploads/2", '"upload-2"', path)
    assert status == 201, (status, text[:300])
    assert json.loads(text)["body_sha256"] == hashlib.sha256(body).hexdigest()
    status, headers, again = curl_post(b, "/uploads/2", '"upload-2"', path)
    assert status == 201, (status, again[:300])
    assert headers.get("idempotent-replayed") == "true"
    assert json.loads(again) == json.loads(text)
    assert len(pod.ledger()) == 1
