"""A rolling restart under load, as Kubernetes does it, and the ledger's verdict.

Clients send keyed POSTs (each logical write its own Idempotency-Key and a user id) for the whole
run and behave as well-behaved clients do: on 409 they wait `Retry-After` and send the same key
again, on a 5xx or a connection error they send the same key again. Meanwhile every pod is
restarted one by one with SIGTERM (drain: stop accepting, finish in-flight requests with
`Connection: close`, close idle keep-alive connections, exit), then again with SIGKILL while it
is in the middle of requests. Used by the chaos test and by `make run`'s demo.
"""

from __future__ import annotations

import http.client
import json
import random
import statistics
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from tests.e2e.harness import Pod


@dataclass
class Write:
    key: str
    user: str
    statuses: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    final: int | None = None
    latency_ms: float = 0.0
    # Sent again after its answer (as a client that lost it would), and whether that was a
    # replay of the same answer.
    resent: bool = False
    replayed: bool = False
    # 5xx answers that said the write's outcome is unknown (sent, no answer: rollsafe does not
    # send it again; the key is held, then the next try goes marked in doubt).
    unknown: int = 0
    # Answered from the application's own records after a try marked in doubt.
    from_records: bool = False


@dataclass
class Verdict:
    writes: list[Write]
    restarts: int
    kills_mid_request: int
    ledger_counts: Counter
    # Second commits of a key whose first commit was made by a pod that was SIGKILLed before it
    # could answer: the app committed, then died before answering, so rollsafe's retry ran it
    # again. Only an app that honours the forwarded key covers that (README, "the guarantee").
    crash_window: list[str]
    attempts: int
    aborted: int
    stats: dict

    @property
    def failed(self) -> list[Write]:
        return [w for w in self.writes if w.final is None or not 200 <= w.final < 300]

    @property
    def not_replayed(self) -> list[Write]:
        return [w for w in self.writes if w.resent and not w.replayed]

    @property
    def saw_5xx(self) -> list[Write]:
        """Writes that saw a 5xx other than "outcome unknown"."""
        return [w for w in self.writes if sum(s >= 500 for s in w.statuses) > w.unknown]

    @property
    def unknown(self) -> list[Write]:
        return [w for w in self.writes if w.unknown]

    @property
    def lost(self) -> list[str]:
        return [w.key for w in self.writes if self.ledger_counts[w.key] == 0]

    @property
    def doubled(self) -> list[str]:
        return [k for k, n in self.ledger_counts.items() if n > 1 and k not in self.crash_window]

    def summary(self) -> str:
        lat = sorted(w.latency_ms for w in self.writes if w.final)
        p = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: 0.0)
        seen = Counter(s for w in self.writes for s in w.statuses)
        retries = {k.removeprefix("wasmcustom.rollsafe_retries_"): v for k, v in self.stats.items()
                   if k.startswith("wasmcustom.rollsafe_retries_") and v}
        return "\n".join([
            f"logical writes      {len(self.writes)} ({len(self.failed)} not 2xx, "
            f"{len(self.saw_5xx)} saw another 5xx, {len(self.unknown)} saw 'outcome unknown', "
            f"{sum(w.from_records for w in self.writes)} answered from the app's records)",
            f"ledger              {sum(1 for w in self.writes if self.ledger_counts[w.key] == 1)} "
            f"exactly once, {len(self.lost)} lost, {len(self.doubled)} doubled, "
            f"{len(self.crash_window)} doubled in the app's crash window",
            f"attempts at pods    {self.attempts} ({self.aborted} aborted)",
            f"rollsafe retries    {retries or 'none'}",
            f"resent by clients   {sum(w.resent for w in self.writes)} "
            f"({len(self.not_replayed)} not replayed)",
            f"replays             {self.stats.get('wasmcustom.rollsafe_idempotency_replays', 0)}"
            f"   409s: {seen.get(409, 0)} seen by clients",
            f"client statuses     {dict(sorted(seen.items()))}",
            f"restarts            {self.restarts} ({self.kills_mid_request} SIGKILLs mid-request)",
            f"latency             p50 {p(0.50):.1f} ms, p99 {p(0.99):.1f} ms",
        ])


def _send(port: int, path: str, w: Write, body: bytes, timeout: float = 30) -> tuple[int | None, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={
            "content-type": "application/json", "idempotency-key": f'"{w.key}"',
            "user-id": w.user})
        r = conn.getresponse()
        data = r.read()
        headers = {k.lower(): v for k, v in r.getheaders()}
        # (Kong's host, answering from a failed call's callback, carries the problem in a
        # header.)
        problem = data + headers.get("x-rollsafe-problem", "").encode()
        if r.status >= 500 and b"upstream-outcome-unknown" in problem:
            w.unknown += 1
        if r.status == 200 and b'"duplicate_of"' in data:
            w.from_records = True
        return r.status, headers
    finally:
        conn.close()


def _client(ports: list[int], path: str, n: int, stop: threading.Event, out: list[Write],
            users: int, resend: float):
    rng = random.Random(n)
    # With several gateway nodes a client's tries go round them (a load balancer in front of
    # the fleet, or a client's own retry landing elsewhere): a retry is on another node.
    node = rng.randrange(len(ports))

    def until_final(w: Write, body: bytes, give_up: float):
        nonlocal node
        while time.monotonic() < give_up:
            port = ports[node]
            node = (node + 1) % len(ports)
            try:
                status, headers = _send(port, path, w, body)
            except OSError as e:
                w.errors.append(type(e).__name__)
                time.sleep(0.05)
                continue
            w.statuses.append(status)
            if status == 409:
                time.sleep(min(float(headers.get("retry-after", "1")), 1.0))
                continue
            if status >= 500:
                time.sleep(0.05)
                continue
            return status, headers
        return None, {}

    while not stop.is_set():
        w = Write(key=str(uuid.uuid4()), user=f"user-{rng.randrange(users)}")
        body = json.dumps({"client": n, "key": w.key, "sku": rng.randrange(1000)}).encode()
        start = time.monotonic()
        w.final, _ = until_final(w, body, start + 60)
        w.latency_ms = (time.monotonic() - start) * 1000
        if w.final is not None and rng.random() < resend:
            # A client that lost the answer sends the write again (on the next node).
            w.resent = True
            status, headers = until_final(w, body, time.monotonic() + 60)
            w.replayed = status == w.final and headers.get("idempotent-replayed") == "true"
        out.append(w)
        time.sleep(rng.uniform(0, 0.01))


def _in_flight(pod: Pod) -> int:
    try:
        return pod.health()["in_flight"]
    except OSError:
        return 0


def run(envoy_port: int | list[int], pods: list[Pod], stats, clients: int = 6, users: int = 60,
        warmup_s: float = 1.0, settle_s: float = 0.5, path: str = "/orders",
        resend: float = 0.0, log=lambda msg: None) -> Verdict:
    """Runs the load and the restarts against one gateway port, or several gateway nodes' ports
    (each client's tries then go round them); `stats()` reads the gateway's counters at the
    end."""
    ports = envoy_port if isinstance(envoy_port, list) else [envoy_port]
    stop = threading.Event()
    writes: list[Write] = []
    threads = [threading.Thread(target=_client, args=(ports, path, n, stop, writes, users, resend),
                                daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    restarts = kills_mid = 0
    # Requests a SIGKILL cut short: (pod, pid, seq).
    killed: set[tuple[str, int, int]] = set()
    try:
        time.sleep(warmup_s)
        for pod in pods:
            log(f"SIGTERM {pod.name} (drain), restart")
            pod.stop()
            pod.start()
            restarts += 1
            time.sleep(settle_s)
        for pod in pods:
            deadline = time.monotonic() + 2
            while _in_flight(pod) <= 0 and time.monotonic() < deadline:
                time.sleep(0.003)
            pid = pod.proc.pid
            pod.kill()
            ran = {a["seq"] for a in pod.attempts() if a.get("pid") == pid}
            unanswered = ran - {a["seq"] for a in pod.answers() if a.get("pid") == pid}
            kills_mid += bool(unanswered)
            killed |= {(pod.name, pid, s) for s in unanswered}
            log(f"SIGKILL {pod.name} with {len(unanswered)} request(s) in flight, restart")
            pod.start()
            restarts += 1
            time.sleep(settle_s)
        time.sleep(warmup_s)
    finally:
        stop.set()
        for t in threads:
            t.join(90)
    ledger = [(p.name, e) for p in pods for e in p.ledger()]
    counts = Counter(json.loads(e["body"])["key"] for _, e in ledger if e.get("body"))
    first: dict[str, tuple[str, int, int]] = {}
    crash = []
    for name, e in sorted(ledger, key=lambda x: x[1]["ts_ms"]):
        key = json.loads(e["body"])["key"]
        if key in first:
            if first[key] in killed:
                crash.append(key)
        else:
            first[key] = (name, e.get("pid", 0), e["seq"])
    return Verdict(
        writes=writes, restarts=restarts, kills_mid_request=kills_mid, ledger_counts=counts,
        crash_window=crash, attempts=sum(len(p.attempts()) for p in pods),
        aborted=sum(len(p.aborted()) for p in pods), stats=stats())
