"""`make run`: Envoy with rollsafe in front of three demo pod groups (two pods each).

First the headline: keyed POSTs in a loop while every pod is restarted (SIGTERM, then SIGKILL
mid-request), ending with the ledger's verdict. Then it listens on 127.0.0.1:$ROLLSAFE_PORT
(default 10000) until Ctrl-C, and stops every process.
Routes: /a… → group-a, /b… → group-b, /c… → group-c, anything else → group-a.
The filter config is tests/e2e/demo.json (every capability rollsafe has, switched on).
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

from tests.e2e import rolling
from tests.e2e.harness import ROOT, Harness

PORT = int(os.environ.get("ROLLSAFE_PORT", "10000"))


def main() -> int:
    run_dir = ROOT / ".run"
    run_dir.mkdir(exist_ok=True)
    for old in run_dir.glob("*"):
        old.unlink()
    harness = Harness(run_dir)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        # Each request takes the pods 20 ms, as a real write would: a SIGKILL lands mid-request.
        groups = {f"group-{g}": harness.group(g, 2, work_ms=20) for g in "abc"}
        config = json.loads((ROOT / "tests" / "e2e" / "demo.json").read_text())
        # The demo's maintenance window is "the next 15 minutes" so writes outside the
        # allowlisted /a and /b prefixes show the 503 right away.
        now = int(time.time())
        fmt = "%Y-%m-%dT%H:%M:%SZ"
        config["maintenance"]["windows"] = [{
            "start": time.strftime(fmt, time.gmtime(now)),
            "end": time.strftime(fmt, time.gmtime(now + 900))}]
        envoy = harness.envoy(config, groups, port=PORT,
                              routes=[("/a", "group-a"), ("/b", "group-b"), ("/c", "group-c")])
        base = f"http://127.0.0.1:{PORT}"
        headline(envoy, [p for pods in groups.values() for p in pods])
        print(f"\nrollsafe is running in Envoy on {base} (admin: http://127.0.0.1:{envoy.admin_port})")
        for name, pods in groups.items():
            print(f"  {name}: " + ", ".join(f"{p.name}@{p.address}" for p in pods))
        print(f"""
Try:
  curl -i {base}/a/orders
  curl -i -X POST {base}/b/orders -H 'content-type: application/json' -d '{{"sku": 42}}'
  curl -i -X POST {base}/b/orders -H 'user-id: alice' -H 'Idempotency-Key: "k1"' -d '{{"sku": 1}}'
      # same user -> same group (x-pod-group); repeat it -> Idempotent-Replayed: true
  curl -i -X POST {base}/c/orders -d '{{}}'     # maintenance window: 503 + Retry-After + problem+json
  curl -i {base}/c/orders                      # reads pass during the window
  curl -i -X POST {base}/c/orders -d '{{}}' -H 'x-maintenance-bypass: demo'   # operator bypass
  curl -s 'http://127.0.0.1:{envoy.admin_port}/stats?filter=wasm'

Filter config: tests/e2e/demo.json   Logs, attempt logs and ledgers: {run_dir}
Ctrl-C stops everything.""")
        sys.stdout.flush()
        while not stop:
            if envoy.proc.poll() is not None:
                print(f"envoy exited ({envoy.proc.returncode}); see {envoy.log_path}")
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        harness.close()
        print("\nstopped Envoy and the demo pods")
    return 0


def headline(envoy, pods) -> None:
    """Keyed writes through a rolling restart of every pod, and what the ledgers say."""
    print("\nRolling restart: 4 clients send keyed POSTs (each its own Idempotency-Key, a user id)")
    print("while every pod is drained with SIGTERM and restarted, then SIGKILLed mid-request:\n")
    verdict = rolling.run(envoy.port, pods, envoy.stats, clients=4, path="/b/orders",
                          log=lambda m: print("  " + m))
    print("\n" + "\n".join("  " + line for line in verdict.summary().splitlines()))
    if verdict.failed or verdict.lost or verdict.doubled or verdict.aborted:
        print("\nVerdict: PROMISE BROKEN - see the figures above and the logs in .run/")
    else:
        print(f"\nVerdict: {len(verdict.writes)} writes, nothing lost, nothing doubled, "
              f"no client saw a 5xx, no pod saw a partial request.")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
