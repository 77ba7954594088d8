"""Every kind of event rollsafe counts, provoked on one gateway per capability, on both hosts.

On Envoy the counters are read back from its stats. On Kong's host there is no stats endpoint
in a bare nginx (Kong 3.9 exports them through its Prometheus plugin), so what is checked there
is that the host took every counter: rollsafe logs a refused define or increment once at error
level, and the harness fails any test whose gateway logged one (tests/conftest.py) — this test
makes sure the counters below were actually incremented on both hosts first.
"""

import concurrent.futures
import hashlib
import time
from datetime import datetime, timezone

from tests.e2e.test_idempotency import post


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_every_event_is_counted_and_no_host_refuses_a_counter(harness):
    counted = {}
    # Maintenance: a window open now, a write turned away, one let through by the bypass.
    now = time.time()
    maint = harness.envoy({"maintenance": {
        "windows": [{"start": rfc3339(now - 60), "end": rfc3339(now + 3600)}],
        "methods": ["POST"],
        "bypass_token_sha256": hashlib.sha256(b"token").hexdigest()}},
        {"svc": [harness.pod("m1", "m")]})
    assert maint.request("POST", "/orders", "{}").status == 503
    assert maint.request("POST", "/orders", "{}", {"x-maintenance-bypass": "token"}).status == 201
    counted[maint] = ["maintenance_rejected", "maintenance_bypassed"]

    # Retries and keys.
    pod = harness.pod("a1", "a")
    cfg = {"retry": {"attempts": 3, "per_try_timeout_ms": 1000, "deadline_ms": 4000,
                     "max_body_bytes": 1000, "body_too_large": "reject",
                     "backoff": {"base_ms": 10, "max_ms": 20}},
           "idempotency": {"lease_ms": 4000}}
    gw = harness.envoy(cfg, {"svc": [pod]})
    for status in (502, 503, 504):
        pod.script({"status": status, "body": "x"})
        assert gw.request("GET", "/orders/1").status == 200
    pod.script({"status": 503, "body": "x"})
    assert gw.request("POST", "/unkeyed", "{}").status == 503  # not retried: gave up
    assert gw.request("PUT", "/big", b"x" * 5000).status == 413
    assert post(gw, '"c-1"', '{"sku": 1}').status == 201
    assert post(gw, '"c-1"', '{"sku": 1}').headers.get("idempotent-replayed") == "true"
    assert post(gw, '"c-1"', '{"sku": 2}').status == 422
    assert post(gw, "has space", '{"sku": 3}').status == 400
    pod.script({"status": 500, "body": "boom"})
    assert post(gw, '"c-2"', '{"sku": 4}').status == 500  # released
    pod.script({"delay_ms": 800})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post, gw, '"c-3"', '{"sku": 5}')
        time.sleep(0.3)
        assert post(gw, '"c-3"', '{"sku": 5}').status == 409
        assert slow.result().status == 201
    counted[gw] = ["attempts" if gw.kind == "kong" else "retries_503", "retries_502",
                   "retries_503", "retries_504", "retry_gave_up", "body_too_large",
                   "idempotency_replays", "idempotency_422", "idempotency_400",
                   "idempotency_stored", "idempotency_released", "idempotency_409"]

    # Routing: a write without a user key, then one whose group is down.
    groups = {"group-a": [harness.pod("r1", "ra")], "group-b": [harness.pod("r2", "rb")]}
    rgw = harness.envoy({"routing": {"groups": [{"name": "a", "target": "group-a"},
                                                {"name": "b", "target": "group-b"}]}}, groups)
    assert rgw.request("POST", "/orders", "{}").status == 400
    counted[rgw] = ["routing_missing_key"]

    for g, names in counted.items():
        if g.has_stats:
            stats = g.stats()
            missing = [n for n in names if stats.get(f"wasmcustom.rollsafe_{n}", 0) < 1]
            assert not missing, (missing, stats)
    assert not harness.refused_metrics()
