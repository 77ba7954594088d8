"""`make bench`: what rollsafe costs Envoy per request, measured side by side in one run.

Variants (each its own Envoy, 1 worker thread, answering from a direct_response route so no
upstream process competes for the 2 cores; the filter chain still runs both ways):
  bare        no wasm filter
  noop        rollsafe with an empty config (the proxy-wasm floor: VM call per callback)
  configured  rollsafe with every capability configured but nothing triggered
  maint_only  a maintenance window configured, outside it
Keyed POSTs with a 1 KiB body, answered with 1 KiB:
  direct_1k   no wasm filter, Envoy's own direct_response (the reference for a replay)
  proxy_1k    rollsafe with an empty config, proxied to the test pod (the reference for a claim)
  claim_1k    idempotency, proxied: every request a new key (claimed, sent, its answer stored)
  replay_1k   idempotency: every request the same key (the first stored from the pod, the rest
              answered from the store at header time, no upstream)

Load: wrk on loopback. The measure is Envoy's CPU time per request (scheduler accounting for all
its threads), not wall-clock latency, and the variants are interleaved round by round so machine
noise hits them alike. Reported: medians over rounds and the differences between variants.
Then the store: BENCH_STORE_KEYS (default 1,000,000) distinct keys through 10,000 slots —
refusals, evictions, Envoy's private memory, and whether the most recent key still replays.
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

from tests.e2e.harness import Harness

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "9"))
SECONDS = 2

CONFIGURED = {
    "maintenance": {
        "windows": [
            {"start": "2099-01-01T00:00:00Z", "end": "2099-01-01T02:00:00Z"},
            {"rrule": "FREQ=WEEKLY;BYDAY=SA,SU", "start_time": "02:00", "duration_s": 60},
        ],
        "methods": ["POST", "PUT", "PATCH", "DELETE"],
        "allow_paths": ["/healthz", "/status/*"],
        "bypass_token_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    },
    "retry": {"attempts": 3, "backoff": {"base_ms": 25, "max_ms": 500}},
    "idempotency": {"max_entries": 1024},
    "routing": {"groups": [{"name": "a", "target": "bench"}, {"name": "b", "target": "bench"}]},
}


KIB = "x" * 1024
# wrk scripts: a keyed POST with a 1 KiB body; the same key every time, or a new one.
SAME_KEY = f"""wrk.method = "POST"
wrk.body = "{KIB}"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Idempotency-Key"] = '"bench-replay"'
"""
NEW_KEY = SAME_KEY.replace("""wrk.headers["Idempotency-Key"] = '"bench-replay"'
""", "") + """n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, {["Idempotency-Key"] = "k" .. tostring(os.time()) .. "-" .. n}, nil)
end
"""


def wrk(port: int, script: str | None = None) -> int:
    args = ["wrk", "-t1", "-c8", f"-d{SECONDS}s", f"http://127.0.0.1:{port}/bench"]
    if script:
        path = f"/tmp/rollsafe-bench-{abs(hash(script))}.lua"
        with open(path, "w") as f:
            f.write(script)
        args[1:1] = ["-s", path]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    m = re.search(r"(\d+) requests in", out)
    if not m:
        raise RuntimeError(out)
    return int(m.group(1))


STORE_KEYS = int(os.environ.get("BENCH_STORE_KEYS", "1000000"))
# Bodiless keyed POSTs, a new key each: claimed, answered by direct_response, stored.
NEW_KEY_NO_BODY = """wrk.method = "POST"
n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, {["Idempotency-Key"] = "s" .. tostring(os.time()) .. "-" .. n}, nil)
end
"""


def store_run(harness, clusters) -> None:
    """BENCH_STORE_KEYS distinct keys through a store sized for 10,000: refusals, evictions,
    Envoy's memory, and whether the most recent keys still replay."""
    from tests.e2e.harness import request, rss_kib
    envoy = harness.envoy({"idempotency": {"max_entries": 10_000}}, clusters, concurrency=1,
                          direct_response="x" * 1024)
    path = "/tmp/rollsafe-bench-store.lua"
    with open(path, "w") as f:
        f.write(NEW_KEY_NO_BODY)
    sent = refused = 0
    rss = []
    t0 = time.monotonic()
    while sent < STORE_KEYS:
        out = subprocess.run(["wrk", "-t1", "-c8", "-d5s", "-s", path,
                              f"http://127.0.0.1:{envoy.port}/bench"],
                             capture_output=True, text=True, check=True).stdout
        sent += int(re.search(r"(\d+) requests in", out).group(1))
        m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        refused += int(m.group(1)) if m else 0
        rss.append(rss_kib(envoy.proc.pid))
    stats = envoy.stats()
    request("127.0.0.1", envoy.port, "POST", "/bench", headers={"idempotency-key": "recent"})
    replay = request("127.0.0.1", envoy.port, "POST", "/bench", headers={"idempotency-key": "recent"})
    print(f"\nStore: {sent:,} distinct keys through 10,000 slots in {time.monotonic() - t0:.0f} s: "
          f"{refused} refused, {stats.get('wasmcustom.rollsafe_idempotency_evicted', 0):,} evicted, "
          f"Envoy private memory {rss[min(1, len(rss) - 1)]:,} KiB after warm-up -> {rss[-1]:,} KiB, "
          f"most recent key replayed: {replay.headers.get('idempotent-replayed') == 'true'}")


def main() -> int:
    if not shutil.which("wrk"):
        print("wrk is missing (apt-get install wrk)", file=sys.stderr)
        return 1
    harness = Harness()
    try:
        pod = harness.pod("bench1", "bench")
        clusters = {"bench": [pod]}
        opts = {"concurrency": 1, "direct_response": True}
        opts_1k = {"concurrency": 1, "direct_response": KIB}
        proxied = {"concurrency": 1}
        # The pod answers every request with 1 KiB, as the direct_response route does.
        pod.script({"status": 200, "body": KIB, "count": 10_000_000})
        idem = {"idempotency": {"max_entries": 65536}}
        variants = {
            "bare": harness.envoy({}, clusters, wasm=None, **opts),
            "noop": harness.envoy({}, clusters, **opts),
            "configured": harness.envoy(CONFIGURED, clusters, **opts),
            "maint_only": harness.envoy({"maintenance": CONFIGURED["maintenance"]}, clusters, **opts),
            "direct_1k": harness.envoy({}, clusters, wasm=None, **opts_1k),
            "proxy_1k": harness.envoy({}, clusters, **proxied),
            "claim_1k": harness.envoy(idem, clusters, **proxied),
            "replay_1k": harness.envoy(idem, clusters, **proxied),
        }
        scripts = {"direct_1k": SAME_KEY, "proxy_1k": SAME_KEY, "claim_1k": NEW_KEY,
                   "replay_1k": SAME_KEY}
        # Extra variants for investigations: BENCH_VARIANTS='{"name": {config}, ...}'
        for name, cfg in json.loads(os.environ.get("BENCH_VARIANTS", "{}")).items():
            variants[name] = harness.envoy(cfg, clusters, **opts)
        for name, envoy in variants.items():  # warm up: connections, VM, JIT, the stored key
            wrk(envoy.port, scripts.get(name))
        us_per_req: dict[str, list[float]] = {k: [] for k in variants}
        rps: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(ROUNDS):
            for name, envoy in variants.items():
                before = envoy.cpu_ns()
                n = wrk(envoy.port, scripts.get(name))
                used = envoy.cpu_ns() - before
                us_per_req[name].append(used / n / 1000)
                rps[name].append(n / SECONDS)
            print(f"round {r + 1}: " + ", ".join(
                f"{k} {v[-1]:.1f} µs" for k, v in us_per_req.items()), flush=True)
        med = {k: statistics.median(v) for k, v in us_per_req.items()}
        print("\nEnvoy CPU per request (median of rounds, 1 worker, loopback, direct_response):")
        for k in variants:
            print(f"  {k:<11} {med[k]:6.1f} µs   ({statistics.median(rps[k]):.0f} req/s)"
                  f"   {med[k] - med['noop']:+.1f} µs vs noop")
        print(f"  noop - bare          = {med['noop'] - med['bare']:+.1f} µs  (the proxy-wasm floor)")
        print(f"  configured - noop    = {med['configured'] - med['noop']:+.1f} µs  (target: ≤ 3 µs)")
        print(f"  configured / bare    = {med['configured'] / med['bare']:.2f}x")
        rps_med = {k: statistics.median(v) for k, v in rps.items()}
        print(f"  claim_1k - proxy_1k  = {med['claim_1k'] - med['proxy_1k']:+.1f} µs  (a claim, the body held, the answer stored)")
        print(f"  replay_1k - direct_1k = {med['replay_1k'] - med['direct_1k']:+.1f} µs  (a replay vs Envoy's direct_response)")
        print(f"  replay throughput    = {rps_med['replay_1k'] / rps_med['direct_1k']:.2f}x direct_response (target: ≥ 0.9x)")
        print(json.dumps({"median_us": med}))
        if STORE_KEYS:
            store_run(harness, clusters)
    finally:
        harness.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
