"""Chaos: a rolling restart of every pod (SIGTERM, then SIGKILL mid-request) under keyed writes.

rollsafe's promise, end to end through Envoy and the real .wasm: no write lost, none executed
twice, no client sees a 5xx, and no pod ever sees a request whose body did not arrive whole
(the harness fixture fails the test on any aborted request).
"""

from tests.e2e import rolling

# Idempotency, retries and routing together, as a team running writes through a gateway
# in front of three pod groups would configure them.
CHAOS_CONFIG = {
    "idempotency": {},
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
    assert len(verdict.writes) >= 300, "the clients kept writing through the run"
    assert verdict.restarts == 12
    assert verdict.kills_mid_request >= 3, "SIGKILL landed mid-request"
    assert not verdict.failed, [(w.key, w.statuses, w.errors) for w in verdict.failed[:5]]
    assert not verdict.saw_5xx, [(w.key, w.statuses) for w in verdict.saw_5xx[:5]]
    assert not verdict.lost, verdict.lost[:5]
    assert not verdict.doubled, verdict.doubled[:5]
    assert verdict.aborted == 0
    assert verdict.stats.get("wasmcustom.rollsafe_route_request_aborted", 0) == 0
