"""Chaos: a rolling restart of every pod (SIGTERM, then SIGKILL mid-request) under keyed writes.

rollsafe's promise, end to end through Envoy and the real .wasm: no write lost, none executed
twice, no client sees a 5xx but "outcome unknown" where a pod died holding its write (the key
is then held, and the try after the lease goes marked in doubt, answered from the app's
records), and no pod ever sees a request whose body did not arrive whole (the harness fixture
fails the test on any aborted request).
"""

import collections
import copy

from tests.e2e import rolling

# Idempotency, retries and routing together, as a team running writes through a gateway
# in front of three pod groups would configure them.
CHAOS_CONFIG = {
    # Held this long after a write's outcome became unknown (at least the deadline).
    "idempotency": {"lease_ms": 10000},
    "retry": {
        "attempts": 4,
        "per_try_timeout_ms": 3000,
        "deadline_ms": 10000,
        # Kubernetes needs a moment to take a terminating pod out of a Service's endpoints.
        "backoff": {"base_ms": 25, "max_ms": 200, "min_ms": 50},
    },
    "routing": {
        "groups": [{"name": g, "target": f"group-{g}"} for g in "abc"],
    },
}


def start(harness, work_ms: int = 20):
    groups = {f"group-{g}": harness.group(g, 2, work_ms=work_ms) for g in "abc"}
    envoy = harness.envoy(CHAOS_CONFIG, groups)
    return [p for pods in groups.values() for p in pods], envoy


def test_rolling_restart_loses_no_write_and_runs_none_twice(harness):
    pods, envoy = start(harness)
    verdict = rolling.run(envoy.port, pods, envoy.stats, clients=6, log=print)
    print("\n" + verdict.summary())
    check(verdict)


def test_rolling_restart_with_two_gateway_nodes_on_the_shared_store(harness):
    """The same run with two gateway nodes sharing one Redis: every retry of a client lands on
    the other node, so only the shared store can tell a retry from a new write."""
    cfg = copy.deepcopy(CHAOS_CONFIG)
    cfg["idempotency"] = {"store": "redis", "lease_ms": 10000,
                          "redis": {"target": "webdis", "timeout_ms": 500}}
    store = harness.shared_store()
    groups = {f"group-{g}": harness.group(g, 2, work_ms=20) for g in "abc"}
    clusters = {**groups, "webdis": [store]}
    nodes = [harness.envoy(cfg, clusters, default_cluster="group-a") for _ in range(2)]
    pods = [p for ps in groups.values() for p in ps]

    def stats():
        total = collections.Counter()
        for n in nodes:
            total.update(n.stats())
        return dict(total)

    # A fifth of the writes are sent again after their answer, on the other node.
    verdict = rolling.run([n.port for n in nodes], pods, stats, clients=6, resend=0.2, log=print)
    print("\n" + verdict.summary())
    check(verdict)
    assert sum(w.resent for w in verdict.writes) >= 50
    assert not verdict.not_replayed, [(w.key, w.statuses) for w in verdict.not_replayed[:5]]
    if nodes[0].has_stats:
        assert verdict.stats.get("wasmcustom.rollsafe_idempotency_store_unavailable", 0) == 0


def check(verdict):
    assert len(verdict.writes) >= 300, "the clients kept writing through the run"
    assert verdict.restarts == 12
    assert verdict.kills_mid_request >= 3, "SIGKILL landed mid-request"
    assert not verdict.failed, [(w.key, w.statuses, w.errors) for w in verdict.failed[:5]]
    assert not verdict.saw_5xx, [(w.key, w.statuses) for w in verdict.saw_5xx[:5]]
    # "Outcome unknown" only where a pod may have had the write: at most one per request a
    # SIGKILL cut short, or a reset while a pod drained.
    assert len(verdict.unknown) <= verdict.kills_mid_request * 4 + 4, \
        [(w.key, w.statuses) for w in verdict.unknown[:5]]
    assert not verdict.lost, verdict.lost[:5]
    assert not verdict.doubled, verdict.doubled[:5]
    assert not verdict.crash_window, "in doubt, the app answers from its records"
    assert verdict.aborted == 0
    assert verdict.stats.get("wasmcustom.rollsafe_route_request_aborted", 0) == 0
