"""Idempotency keys through a real Envoy (2 worker threads), with both exchange drivers."""

import collections
import concurrent.futures
import http.client
import json
import time

import pytest

from tests.e2e.harness import rss_kib, wait_for

DRIVERS = ["native", "dispatch"]


def config(driver: str, idem: dict | None = None, **retry) -> dict:
    r = {"exchange": driver, "backoff": {"base_ms": 10, "max_ms": 20}}
    r.update(retry)
    return {"retry": r, "idempotency": idem or {}}


def post(envoy, key, body, auth="Bearer alice", path="/orders", timeout=30, extra=None):
    headers = {"content-type": "application/json", "authorization": auth, **(extra or {})}
    if key is not None:
        headers["idempotency-key"] = key
    return envoy.request("POST", path, body, headers, timeout=timeout)


@pytest.fixture(params=DRIVERS)
def driver(request):
    return request.param


def test_same_key_twice_writes_once_and_replays(harness, driver):
    pod = harness.pod("a1", "a")
    envoy = harness.envoy(config(driver), {"group-a": [pod]})
    first = post(envoy, '"order-1"', '{"sku": 1}')
    second = post(envoy, '"order-1"', '{"sku": 1}')
    assert first.status == 201
    assert second.status == first.status
    assert second.body == first.body
    assert second.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert second.headers["content-type"] == first.headers["content-type"]
    assert len(pod.ledger()) == 1
    # The key reached the application unchanged, so it can deduplicate too.
    assert pod.ledger()[0]["idempotency_key"] == '"order-1"'


def test_fifty_concurrent_duplicates_write_once(harness, driver):
    pod = harness.pod("a1", "a")
    envoy = harness.envoy(config(driver), {"group-a": [pod]})
    pod.script({"delay_ms": 300, "count": 1, "commit": True, "status": 201})
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda _: post(envoy, '"burst"', '{"sku": 9}'), range(50)))
    statuses = sorted(r.status for r in results)
    assert len(pod.ledger()) == 1, statuses
    assert set(statuses) <= {201, 409}, statuses
    assert statuses.count(201) >= 1
    for r in results:
        if r.status == 409:
            assert r.headers["content-type"] == "application/problem+json"
            assert int(r.headers["retry-after"]) >= 1
        elif r.headers.get("idempotent-replayed") != "true":
            assert r.json()["committed"] is True


def test_same_key_different_request_is_422(harness, driver):
    """Decided once the body is whole (no upstream is contacted): method, path and query,
    caller scope, the whole body, and the client's Content-Digest when it sends one."""
    pod = harness.pod("a1", "a")
    envoy = harness.envoy(config(driver), {"group-a": [pod]})
    digest = {"content-digest": "sha-256=:one:"}
    assert post(envoy, '"k-422"', '{"sku": 1}', extra=digest).status == 201
    for path, body, extra in [("/orders", '{"sku": 22}', digest),
                              ("/orders?x=1", '{"sku": 1}', digest),
                              ("/orders", '{"sku": 2}', {"content-digest": "sha-256=:two:"})]:
        r = post(envoy, '"k-422"', body, path=path, extra=extra)
        assert r.status == 422, (path, body, r)
        assert r.json()["type"] == "urn:problem-type:rollsafe:idempotency-key-reused"
    assert len(pod.ledger()) == 1
    assert len(pod.attempts()) == 1, "a 422 reaches no upstream"


def test_same_key_with_another_body_of_the_same_length_is_422(harness, driver):
    """A client bug, or two clients that made up the same key: a payment of 4 must not get the
    receipt of a payment of 3. Compared on the whole body, not its length."""
    pod = harness.pod("a1", "a")
    gw = harness.envoy(config(driver), {"group-a": [pod]})
    first = post(gw, '"pay-1"', '{"sku":3}')
    assert first.status == 201, first
    ledger = pod.ledger()
    r = post(gw, '"pay-1"', '{"sku":4}')
    assert r.status == 422, r
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "urn:problem-type:rollsafe:idempotency-key-reused"
    assert "idempotent-replayed" not in r.headers
    time.sleep(0.2)
    assert pod.ledger() == ledger
    assert len(pod.attempts()) == 1, "the 422 reached no upstream"
    # The original body still replays.
    again = post(gw, '"pay-1"', '{"sku":3}')
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.body == first.body


def test_write_replay_422_409_and_a_get_share_one_keep_alive_connection(harness, driver):
    """Answers given after the body was read keep the client's connection: no reconnect (and
    no TLS handshake, in production) after a replay, a 422 or a 409. (A 400 for a bad key is
    answered after the body too, but Envoy closes the connection after any 400 it answers
    itself: README.)"""
    pod = harness.pod("a1", "a")
    gw = harness.envoy(config(driver, {"required": True}), {"group-a": [pod]})
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    conn.connect()
    local = conn.sock.getsockname()
    base = {"content-type": "application/json", "authorization": "Bearer alice"}

    def send(method, path, body=None, **headers):
        conn.request(method, path, body=body, headers={**base, **headers})
        r = conn.getresponse()
        data = r.read()
        assert conn.sock is not None and conn.sock.getsockname() == local, \
            f"{method} {path} {r.status}: the connection was closed"
        assert not r.will_close, (method, path, r.status, r.getheaders())
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), data

    status, _, first = send("POST", "/orders", '{"sku":3}', **{"idempotency-key": '"ka-1"'})
    assert status == 201
    status, headers, body = send("POST", "/orders", '{"sku":3}', **{"idempotency-key": '"ka-1"'})
    assert (status, headers.get("idempotent-replayed"), body) == (201, "true", first)
    status, headers, _ = send("POST", "/orders", '{"sku":4}', **{"idempotency-key": '"ka-1"'})
    assert status == 422
    # A key in flight: its first request is held by the pod on another connection.
    pod.script({"delay_ms": 1500, "count": 1, "commit": True, "status": 201})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post, gw, '"ka-2"', '{"sku":6}')
        wait_for(lambda: len(pod.attempts()) >= 2, 5, "the slow write at the pod")
        status, headers, _ = send("POST", "/orders", '{"sku":6}', **{"idempotency-key": '"ka-2"'})
        assert status == 409
        assert slow.result().status == 201
    status, _, _ = send("GET", "/orders/1")
    assert status == 200
    # The 400 comes once the body was read, on both hosts.
    conn.request("POST", "/orders", body='{"sku":5}', headers=base)
    r = conn.getresponse()
    assert r.status == 400
    assert json.loads(r.read())["type"] == "urn:problem-type:rollsafe:idempotency-key-invalid"
    conn.close()
    assert len(pod.ledger()) == 2


def test_kong_closes_a_connection_whose_requests_made_calls_after_32_requests(harness):
    """Kong's host keeps what each `dispatch_http_call` allocates until the client's connection
    closes (src/reconnect.rs), so on Kong an answer to a request that made a call closes a
    connection that has carried 32 requests; the client's next write opens a new one. On Envoy
    (no such retention) the connection stays open. Every write runs once either way."""
    pod = harness.pod("a1", "a")
    gw = harness.envoy(config("dispatch"), {"group-a": [pod]})
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    closes = []
    for n in range(1, 41):
        conn.request("POST", "/orders", body=f'{{"n":{n}}}',
                     headers={"content-type": "application/json",
                              "idempotency-key": f'"conn-{n}"'})
        r = conn.getresponse()
        r.read()
        assert r.status == 201, (n, r.status)
        if r.will_close:
            closes.append(n)
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    conn.close()
    expected = [32] if gw.kind == "kong" else []
    assert closes == expected, closes
    assert len(pod.ledger()) == 40


def test_same_key_other_caller_runs_separately(harness, driver):
    pod = harness.pod("a1", "a")
    envoy = harness.envoy(config(driver), {"group-a": [pod]})
    assert post(envoy, '"shared"', '{"sku": 1}', auth="Bearer alice").status == 201
    r = post(envoy, '"shared"', '{"sku": 1}', auth="Bearer bob")
    assert r.status == 201
    assert "idempotent-replayed" not in r.headers
    assert len(pod.ledger()) == 2


def test_consumers_of_kong_never_share_a_replay(harness, driver):
    """Kong's auth plugins identify consumers without an Authorization header (key-auth's
    apikey; the X-Consumer-ID / X-Credential-Identifier they add upstream, which the filter
    chain sees). On Kong the default scope includes them; on Envoy it is route + Authorization."""
    pod = harness.pod("a1", "a")
    envoy = harness.envoy(config(driver), {"group-a": [pod]})
    first = post(envoy, '"k-consumer"', '{"sku": 1}', auth="", extra={"x-consumer-id": "alice"})
    other = post(envoy, '"k-consumer"', '{"sku": 1}', auth="", extra={"x-consumer-id": "bob"})
    assert first.status == other.status == 201
    if envoy.kind == "kong":
        assert "idempotent-replayed" not in other.headers
        assert len(pod.ledger()) == 2
    else:
        assert other.headers["idempotent-replayed"] == "true"
        assert len(pod.ledger()) == 1


def test_upstream_500_releases_the_key_and_the_retry_runs_once(harness, driver):
    pod = harness.pod("a1", "a")
    envoy = harness.envoy(config(driver), {"group-a": [pod]})
    pod.script({"status": 500, "body": "boom"})
    assert post(envoy, '"k-500"', '{"sku": 5}').status == 500
    r = post(envoy, '"k-500"', '{"sku": 5}')
    assert r.status == 201
    assert "idempotent-replayed" not in r.headers
    assert len(pod.ledger()) == 1
    # Now completed: replayed from here on.
    assert post(envoy, '"k-500"', '{"sku": 5}').headers["idempotent-replayed"] == "true"


def test_a_key_stays_in_flight_while_its_exchange_can_still_answer(harness, driver):
    """A stalled pod: the key's lease outlives the exchange, so a second execution never starts
    beside the first (the client's tries get 409 until the answer, then the replay)."""
    pod = harness.pod("a1", "a")
    cfg = config(driver, {"lease_ms": 6000}, per_try_timeout_ms=5000, deadline_ms=6000)
    envoy = harness.envoy(cfg, {"group-a": [pod]})
    pod.script({"delay_ms": 2500, "status": 201, "commit": True})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stalled = pool.submit(post, envoy, '"k-stall"', '{"sku": 7}')
        time.sleep(0.3)
        assert post(envoy, '"k-stall"', '{"sku": 7}').status == 409
        time.sleep(1.3)  # past where a 1 s lease would have run out
        assert post(envoy, '"k-stall"', '{"sku": 7}').status == 409
        assert stalled.result().status == 201
    again = post(envoy, '"k-stall"', '{"sku": 7}')
    assert again.status == 201 and again.headers["idempotent-replayed"] == "true"
    assert len(pod.ledger()) == 1


def test_a_lease_shorter_than_the_exchange_is_refused(harness, driver):
    # A keyed write's attempt waits up to the deadline: the lease must cover it.
    cfg = config(driver, {"lease_ms": 1000}, per_try_timeout_ms=1000, attempts=1,
                 deadline_ms=2500)
    envoy = harness.envoy(cfg, {"group-a": [harness.pod("a1", "a")]}, start=False)
    envoy.start(wait_ready=False)
    log = envoy.wait_refused()
    assert "rollsafe: idempotency.lease_ms: must cover the longest exchange (2500 ms" in log


def test_keyed_post_answered_503_after_the_pod_read_it_is_retried_once(harness, driver):
    pod = harness.pod("a1", "a")
    envoy = harness.envoy(config(driver, attempts=3), {"group-a": [pod]})
    pod.script({"status": 503})
    r = post(envoy, '"k-503"', '{"sku": 3}')
    assert r.status == 201
    assert len(pod.attempts()) == 2
    assert len(pod.ledger()) == 1


def test_malformed_keys_are_400_problems(harness, driver):
    pod = harness.pod("a1", "a")
    envoy = harness.envoy(config(driver, {"required": True}), {"group-a": [pod]})
    for key in [None, '"unterminated', "has space", '"' + "k" * 300 + '"']:
        r = post(envoy, key, "{}")
        assert r.status == 400, (key, r)
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"] == "urn:problem-type:rollsafe:idempotency-key-invalid"
    r = envoy.request("POST", "/orders", "{}", {"idempotency-key": "a", "Idempotency-Key": "b"})
    assert r.status == 400
    assert pod.attempts() == []
    # GET is not a keyed method: no key needed.
    assert envoy.request("GET", "/orders").status == 200


def burst(port, keys, body=b"{}"):
    """Keyed POSTs on one keep-alive connection; the statuses."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out = []
    for k in keys:
        conn.request("POST", "/o", body, {"idempotency-key": f"key-{k}"})
        resp = conn.getresponse()
        resp.read()
        out.append(resp.status)
        if resp.getheader("connection") == "close":
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.close()
    return out


def test_fifty_thousand_keys_through_a_store_for_five_thousand_are_never_refused(harness):
    """The store is a bounded cache: old completed records make room, nothing is turned away,
    memory stays flat, and the most recent keys still replay."""
    pod = harness.pod("a1", "a")
    cfg = config("native", {"max_entries": 5000, "ttl_s": 3600})
    envoy = harness.envoy(cfg, {"group-a": [pod]})
    n, warm_n = 50_000, 10_000
    statuses = collections.Counter()

    def keys(lo, hi):
        # 8 clients at once, as the rest of the run: the warm-up meets the same concurrency
        # (Kong's host sizes its per-request instances by it once).
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            chunks = [range(s, min(s + 1250, hi)) for s in range(lo, hi, 1250)]
            for out in pool.map(lambda c: burst(envoy.port, c), chunks):
                statuses.update(out)

    keys(0, warm_n)
    before = rss_kib(envoy.proc.pid)
    keys(warm_n, n)
    after = rss_kib(envoy.proc.pid)
    assert statuses == {201: n}, statuses
    assert len(pod.ledger()) == n
    assert after - before < 20_000, f"RSS grew {after - before} KiB"
    # The most recent keys are still there: replayed, not run again. (Most recent by completion,
    # as the pod committed them: eight clients finish their key ranges at different times, and
    # a key's slot window evicts its oldest completion.)
    recent = [int(e["idempotency_key"].removeprefix("key-")) for e in pod.ledger()[-20:]]
    assert burst(envoy.port, recent) == [201] * 20
    assert len(pod.ledger()) == n
    if envoy.has_stats:
        stats = envoy.stats()
        assert stats["wasmcustom.rollsafe_idempotency_evicted"] >= n - 5000 - 500, stats
        assert stats.get("wasmcustom.rollsafe_idempotency_store_full", 0) == 0
        assert stats["wasmcustom.rollsafe_idempotency_replays"] == 20


def sweep(port, n):
    """Keyed POSTs `key-0` … on one keep-alive connection: per key its status and, for a 201,
    whether it was a replay, for a 503 its problem type."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out = []
    for k in range(n):
        conn.request("POST", "/o", b"{}", {"idempotency-key": f"key-{k}"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status == 503:
            out.append((503, json.loads(body).get("type")))
        else:
            out.append((resp.status, resp.getheader("idempotent-replayed")))
        if resp.getheader("connection") == "close":
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.close()
    return out


@pytest.mark.kong_only("Envoy's shared data has no size bound to outgrow")
def test_a_zone_too_small_for_the_store_refuses_keys_and_runs_none_twice(harness):
    """Kong's host: a `rollsafe` shm zone smaller than the store needs evicts (`slru`, its
    default), index records among what it drops. A key whose record was dropped is refused as
    `when_full` (a 503 problem) and a replay whose answer was dropped gets 409: degraded and
    counted, never a key run twice (README, sizing)."""
    pod = harness.pod("a1", "a")
    pod.script({"status": 201, "body": "x" * 1024, "count": 100_000, "commit": True})
    # 4,096 slots of 1 KiB answers need ~6 MiB.
    gw = harness.envoy(config("dispatch", {"max_entries": 4096}), {"group-a": [pod]}, zone="1m")
    full = "urn:problem-type:rollsafe:idempotency-store-full"
    first = sweep(gw.port, 3000)
    assert set(first) <= {(201, None), (503, full)}, collections.Counter(first)
    assert len(pod.ledger()) == first.count((201, None))
    again = sweep(gw.port, 3000)
    assert set(again) <= {(201, "true"), (201, None), (409, None), (503, full)}, \
        collections.Counter(again)
    # (The premise: the zone could not keep every answer.)
    assert again.count((201, "true")) < len(again)
    runs = collections.Counter(e["idempotency_key"] for e in pod.ledger())
    assert max(runs.values()) == 1, [k for k, n in runs.items() if n > 1][:5]
    # A key that ran before is replayed or refused, never run again.
    assert all(not (a == (201, None) and b == (201, None)) for a, b in zip(first, again))


def test_a_store_full_of_requests_in_flight_answers_when_full_and_recovers(harness):
    pod = harness.pod("a1", "a")
    envoy = harness.envoy(config("native", {"max_entries": 16}), {"group-a": [pod]})
    pod.script({"delay_ms": 1500, "count": 100, "commit": True, "status": 201})
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        results = list(pool.map(lambda i: post(envoy, f'"slow-{i}"', "{}"), range(40)))
    statuses = collections.Counter(r.status for r in results)
    assert set(statuses) == {201, 503}, statuses
    assert statuses[201] <= 16, "no more in flight than slots"
    full = next(r for r in results if r.status == 503)
    assert full.json()["type"] == "urn:problem-type:rollsafe:idempotency-store-full"
    assert full.headers["retry-after"] == "1"
    # Once they have finished, new keys are taken again (the finished ones make room).
    pod.clear_script()
    requests_ok = [post(envoy, f'"after-{i}"', "{}").status for i in range(20)]
    assert requests_ok == [201] * 20


@pytest.mark.envoy_only("the buffer filter is Envoy's; Kong's host never proxies before the "
                        "filter has the whole body")
def test_without_the_buffer_filter_a_refusal_aborts_the_routes_request_and_runs_nothing(harness):
    """The README's "what changes" without Envoy's buffer filter after rollsafe: keys are still
    decided on the whole body, but the route's upstream got the headers, so each refusal of a
    request with a body leaves it a request that never completes — never a second execution."""
    harness.allow_aborted = True
    pod = harness.pod("a1", "a")
    gw = harness.envoy(config("native"), {"group-a": [pod]}, buffer=False)
    first = post(gw, '"nb-1"', '{"sku":3}')
    assert first.status == 201
    replay = post(gw, '"nb-1"', '{"sku":3}')
    assert replay.headers.get("idempotent-replayed") == "true"
    assert post(gw, '"nb-1"', '{"sku":4}').status == 422
    time.sleep(0.3)
    assert len(pod.ledger()) == 1
    # Each refusal may leave the pod a request cut off after its headers (unless Envoy reset it
    # before its connection was up): seen, never executed.
    aborted = pod.aborted()
    assert 1 <= len(aborted) <= 2, aborted
    assert all(a["body_len"] < a["declared_len"] for a in aborted), aborted
