"""`make bench`: every path rollsafe takes, each beside its reference, measured in one run.

Every variant is its own Envoy (1 worker thread). Idle variants answer a GET from a
direct_response route, so no upstream process competes for the 2 cores while the filter chain
still runs both ways; the exchange variants proxy a 1 KiB POST to the test pod.

Two measures:
- **Load** (wrk, loopback, -c8): rps, p50, p99, and Envoy's CPU time per request (scheduler
  accounting for all its threads). Variants are interleaved round by round so machine noise
  hits them alike; medians over rounds. Only ratios and differences within one run count.
- **Instructions** (valgrind's callgrind, counting only while a fixed sequence of requests
  runs, one at a time): Envoy's instructions per request. Repeatable to a fraction of a
  percent whatever else the machine does, so small differences show.

The references: no filter; the no-op wasm filter (`bench/probe`, built here: a proxy-wasm
filter whose callbacks only return); the same fixture reading one request header (the host's
price for one read); Envoy's own `retry_policy`; Envoy's `direct_response`.

Writes bench/RESULTS.md. Environment: BENCH_ROUNDS (default 7), BENCH_SECONDS (2),
BENCH_CALLGRIND_REQUESTS (200; 0 skips callgrind), BENCH_STORE_KEYS (1,000,000; 0 skips the
store run), BENCH_VARIANTS (extra idle variants as JSON: {"name": {config}}), BENCH_ONLY (a
comma-separated list of variants to run, with their references; RESULTS.md is not written).
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.harness import ROOT, Harness, request, wrk_until

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "7"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "2"))
CG_REQUESTS = int(os.environ.get("BENCH_CALLGRIND_REQUESTS", "200"))
STORE_KEYS = int(os.environ.get("BENCH_STORE_KEYS", "1000000"))
PROBE = ROOT / "target" / "wasm32-wasip1" / "release" / "rollsafe_probe.wasm"
RESULTS = ROOT / "bench" / "RESULTS.md"

MAINTENANCE = {
    "windows": [
        {"start": "2099-01-01T00:00:00Z", "end": "2099-01-01T02:00:00Z"},
        {"rrule": "FREQ=WEEKLY;BYDAY=SA,SU", "start_time": "02:00", "duration_s": 60},
    ],
    "methods": ["POST", "PUT", "PATCH", "DELETE"],
    "allow_paths": ["/healthz", "/status/*"],
    "bypass_token_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
}
RETRY = {"attempts": 3, "backoff": {"base_ms": 25, "max_ms": 500}}
GROUPS = [{"name": "a", "target": "bench"}, {"name": "b", "target": "bench"}]
CONFIGURED = {
    "maintenance": MAINTENANCE,
    "retry": RETRY,
    "idempotency": {"max_entries": 1024},
    "routing": {"groups": GROUPS},
}
# The route retries Envoy itself would do for the same three attempts.
ENVOY_RETRY = {"retry_on": "5xx,reset,connect-failure", "num_retries": 2}

KIB = "x" * 1024


def post_script(key: str | None = None, new_key: bool = False, path: str = "/bench") -> str:
    """A wrk script: POST with a 1 KiB body; a fixed Idempotency-Key, a new one per request,
    or none."""
    s = f'wrk.method = "POST"\nwrk.path = "{path}"\nwrk.body = "{KIB}"\n' \
        'wrk.headers["Content-Type"] = "application/json"\n'
    if key:
        s += f"wrk.headers[\"Idempotency-Key\"] = '\"{key}\"'\n"
    if new_key:
        s += ('n = 0\nrequest = function()\n  n = n + 1\n  return wrk.format(nil, nil, '
              '{["Idempotency-Key"] = "k" .. tostring(os.time()) .. "-" .. n}, nil)\nend\n')
    return s


GET_USER = 'wrk.headers["User-Id"] = "u-1234"\n'


@dataclass
class Variant:
    name: str
    what: str
    ref: str | None  # the variant this one is compared with
    envoy: dict  # Harness.envoy keyword arguments, config first
    script: str | None = None  # wrk script (None: a plain GET)
    goal: str | None = None  # "idle" (≤ +3 µs CPU), "p50" (≤ 1.5x), "rps" (≥ 0.9x)
    prepare: object = None  # called with the running Envoy before measuring
    # callgrind: (method, path, headers, body) of the fixed request; None: not counted
    fixed: tuple | None = ("GET", "/bench", {}, None)
    rps: list = field(default_factory=list)
    cpu: list = field(default_factory=list)
    p50: list = field(default_factory=list)
    p99: list = field(default_factory=list)
    # p50 one request at a time (wrk -c1): the path's own latency, not queueing behind the
    # other connections on a saturated worker. Measured for the p50 goal and its reference.
    p50_c1: list = field(default_factory=list)
    instr: float | None = None


def variants(pod_clusters) -> list[Variant]:
    idle = {"concurrency": 1, "direct_response": True}
    proxied = {"concurrency": 1}
    post_fixed = ("POST", "/bench", {"content-type": "application/json"}, KIB.encode())

    def held(envoy) -> None:
        """A request under the key the 409 variant uses, kept in flight at the pod."""
        def run():
            try:
                request("127.0.0.1", envoy.port, "POST", "/held", body=KIB.encode(),
                        headers={"idempotency-key": '"held"', "content-type": "application/json"},
                        timeout=3600)
            except OSError:
                pass
        threading.Thread(target=run, daemon=True).start()
        time.sleep(0.3)

    def stored(envoy) -> None:
        r = request("127.0.0.1", envoy.port, "POST", "/bench", body=KIB.encode(),
                    headers={"idempotency-key": '"bench-replay"', "content-type": "application/json"})
        assert r.status == 200, r

    long_lease = {"retry": {"attempts": 1, "per_try_timeout_ms": 300_000},
                  "idempotency": {"max_entries": 1024, "lease_ms": 600_000}}
    out = [
        Variant("bare", "no wasm filter", None, dict(config={}, wasm=None, **idle)),
        Variant("noop", "no-op wasm filter (bench/probe)", "bare", dict(config="", wasm=PROBE, **idle)),
        Variant("one_read", "no-op filter reading one request header", "noop",
                dict(config="method", wasm=PROBE, **idle)),
        Variant("map_read", "no-op filter reading the whole request header map", "noop",
                dict(config="headers", wasm=PROBE, **idle)),
        Variant("property_read", "no-op filter reading a property (xds.route_name)", "noop",
                dict(config="property", wasm=PROBE, **idle)),
        Variant("shared_read", "no-op filter reading 1 KiB of shared data", "noop",
                dict(config="shared", wasm=PROBE, **idle)),
        Variant("empty", "rollsafe, empty config", "noop", dict(config={}, **idle), goal="idle"),
        Variant("maintenance", "maintenance alone, outside its windows", "noop",
                dict(config={"maintenance": MAINTENANCE}, **idle), goal="idle"),
        Variant("maint_notice", "maintenance with notice_s, outside the notice period", "noop",
                dict(config={"maintenance": {**MAINTENANCE, "notice_s": 60}}, **idle),
                goal="idle"),
        Variant("maint_schedule", "maintenance with a schedule_path, another path asked", "noop",
                dict(config={"maintenance": {**MAINTENANCE,
                                             "schedule_path": "/.well-known/maintenance"}},
                     **idle), goal="idle"),
        Variant("retry", "retry alone, first attempt answers", "noop",
                dict(config={"retry": RETRY}, **idle), goal="idle"),
        Variant("idempotency", "idempotency alone, GET (takes no key)", "noop",
                dict(config={"idempotency": {"max_entries": 1024}}, **idle), goal="idle"),
        Variant("routing", "routing alone, GET (not hashed by default)", "noop",
                dict(config={"routing": {"groups": GROUPS}}, **idle), goal="idle"),
        Variant("configured", "all four configured, none triggered", "noop",
                dict(config=CONFIGURED, **idle), goal="idle"),
        Variant("routing_hashed", "routing hashes a user id to a group", "noop",
                dict(config={"routing": {"groups": GROUPS, "methods": ["GET"]}}, **idle),
                script=GET_USER, fixed=("GET", "/bench", {"user-id": "u-1234"}, None)),
        Variant("maint_503", "maintenance window open: 503 + problem", "bare",
                dict(config={"maintenance": {"windows": [
                    {"start": "2000-01-01T00:00:00Z", "end": "2099-01-01T00:00:00Z"}]}}, **idle)),
        Variant("conflict_409", "keyed POST while its key is in flight: 409", "direct_1k",
                dict(config=long_lease, **proxied), script=post_script("held", path="/held"),
                prepare=held,
                fixed=("POST", "/held", {"idempotency-key": '"held"', "content-type": "application/json"},
                       KIB.encode())),
        Variant("plain_1k", "POST 1 KiB proxied, no filter", None, dict(config={}, wasm=None, **proxied),
                script=post_script(), fixed=post_fixed),
        Variant("envoy_retry_1k", "POST 1 KiB, Envoy's own retry_policy (3 attempts)", "plain_1k",
                dict(config={}, wasm=None, retry_policy=ENVOY_RETRY, **proxied),
                script=post_script(), fixed=post_fixed),
        Variant("owned_1k", "keyed POST 1 KiB, rollsafe owns the exchange, first try answers",
                "plain_1k", dict(config={"retry": RETRY, "idempotency": {"max_entries": 65536}}, **proxied),
                script=post_script(new_key=True), goal="p50",
                fixed=lambda i: ("POST", "/bench", {"idempotency-key": f'"cg-{i}"',
                                                    "content-type": "application/json"}, KIB.encode())),
        Variant("direct_1k", "Envoy's direct_response, 1 KiB", None,
                dict(config={}, wasm=None, concurrency=1, direct_response=KIB),
                script=post_script("bench-replay"), fixed=post_fixed),
        Variant("direct_1k_noop", "direct_response, 1 KiB, behind the no-op wasm filter", "direct_1k",
                dict(config="", wasm=PROBE, concurrency=1, direct_response=KIB),
                script=post_script("bench-replay"), fixed=post_fixed),
        Variant("replay_1k", "replay of a stored 1 KiB response", "direct_1k",
                dict(config={"idempotency": {"max_entries": 65536}}, **proxied),
                script=post_script("bench-replay"), goal="rps", prepare=stored,
                fixed=("POST", "/bench", {"idempotency-key": '"bench-replay"',
                                          "content-type": "application/json"}, KIB.encode())),
        # What any filter must do to replay, done by the no-op filter: read the key (one
        # header; the whole map, to see the rest of the request too) and answer with the stored
        # 1 KiB itself. The bound of what a replay can reach on this host.
        Variant("reply_floor_1k", "no-op filter reading one header and answering 1 KiB itself",
                "direct_1k", dict(config="method,reply", wasm=PROBE, concurrency=1,
                                  direct_response=KIB),
                script=post_script("bench-replay"), fixed=post_fixed),
        Variant("reply_floor_map_1k", "no-op filter reading the header map and answering 1 KiB",
                "direct_1k", dict(config="headers,reply", wasm=PROBE, concurrency=1,
                                  direct_response=KIB),
                script=post_script("bench-replay"), fixed=post_fixed),
    ]
    for name, cfg in json.loads(os.environ.get("BENCH_VARIANTS", "{}")).items():
        out.append(Variant(name, "extra (BENCH_VARIANTS)", "noop", dict(config=cfg, **idle)))
    only = [n for n in os.environ.get("BENCH_ONLY", "").split(",") if n]
    if only:  # investigations: these variants and their references
        keep = set(only) | {v.ref for v in out if v.name in only and v.ref}
        if "replay_1k" in only:
            keep |= {"direct_1k_noop", "reply_floor_1k", "reply_floor_map_1k"}
        out = [v for v in out if v.name in keep]
    return out


def start(harness, v: Variant, clusters, **extra):
    kw = dict(v.envoy)
    cfg = kw.pop("config")
    return harness.envoy(cfg, clusters, **kw, **extra)


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


def wrk(port: int, script: str | None, connections: int = 8) -> dict:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{SECONDS}s", "--latency",
            f"http://127.0.0.1:{port}/bench"]
    if script:
        path = f"/tmp/rollsafe-bench-{abs(hash(script))}.lua"
        Path(path).write_text(script)
        args[1:1] = ["-s", path]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    n = re.search(r"(\d+) requests in", out)
    p50 = re.search(r"50%\s+(\S+)", out)
    p99 = re.search(r"99%\s+(\S+)", out)
    if not (n and p50 and p99):
        raise RuntimeError(out)
    return {"n": int(n.group(1)), "p50": _ms(p50.group(1)), "p99": _ms(p99.group(1))}


def load(harness, vs: list[Variant], clusters) -> None:
    envoys = {v.name: start(harness, v, clusters) for v in vs}
    unloaded = {v.name for v in vs if v.goal == "p50"} | {v.ref for v in vs if v.goal == "p50"}
    for v in vs:
        if v.prepare:
            v.prepare(envoys[v.name])
        wrk(envoys[v.name].port, v.script)  # warm up: connections, VM, JIT
    for r in range(ROUNDS):
        for v in vs:
            e = envoys[v.name]
            if v.prepare and r:
                v.prepare(e)  # the 409's held request ends at its 300 s timeout
            before = e.cpu_ns()
            res = wrk(e.port, v.script)
            v.cpu.append((e.cpu_ns() - before) / res["n"] / 1000)
            v.rps.append(res["n"] / SECONDS)
            v.p50.append(res["p50"])
            v.p99.append(res["p99"])
            if v.name in unloaded:
                v.p50_c1.append(wrk(e.port, v.script, connections=1)["p50"])
        print(f"round {r + 1}/{ROUNDS}: " + ", ".join(
            f"{v.name} {v.cpu[-1]:.0f}" for v in vs) + " µs/req", flush=True)
    for e in envoys.values():
        e.stop()


def _send(conn_box: list, port: int, fixed, i: int) -> None:
    method, path, headers, body = fixed(i) if callable(fixed) else fixed
    for _ in range(2):
        if conn_box[0] is None:
            conn_box[0] = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn_box[0].request(method, path, body=body, headers=headers)
            r = conn_box[0].getresponse()
            r.read()
            if r.getheader("connection", "").lower() == "close":
                conn_box[0].close()
                conn_box[0] = None
            return
        except (OSError, http.client.HTTPException):
            conn_box[0].close()
            conn_box[0] = None
    raise RuntimeError(f"{method} {path}: no answer")


def callgrind(harness, v: Variant, clusters) -> float:
    """Envoy's instructions per request for `v.fixed`, counted by callgrind only while the
    requests run (start-up and warm-up are not instrumented)."""
    out = harness.dir / f"callgrind-{v.name}.out"
    e = start(harness, v, clusters, wrapper=[
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--smc-check=all-non-file",
        f"--callgrind-out-file={out}"])
    try:
        if v.prepare:
            v.prepare(e)
        box = [None]
        for i in range(50):
            _send(box, e.port, v.fixed, i)
        subprocess.run(["callgrind_control", "-i", "on", str(e.proc.pid)], check=True,
                       capture_output=True)
        for i in range(CG_REQUESTS):
            _send(box, e.port, v.fixed, 1000 + i)
        subprocess.run(["callgrind_control", "-i", "off", str(e.proc.pid)], check=True,
                       capture_output=True)
        subprocess.run(["callgrind_control", "-d", str(e.proc.pid)], check=True,
                       capture_output=True)
    finally:
        e.stop()
    total = 0
    for f in harness.dir.glob(f"callgrind-{v.name}.out*"):
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total / CG_REQUESTS


def store_run(harness, clusters) -> str:
    """STORE_KEYS distinct keys through a store sized for 10,000: refusals, evictions,
    Envoy's memory, and whether the most recent keys still replay."""
    envoy = harness.envoy({"idempotency": {"max_entries": 10_000}}, clusters, concurrency=1,
                          direct_response=KIB)
    path = "/tmp/rollsafe-bench-store.lua"
    Path(path).write_text('wrk.method = "POST"\nn = 0\nrequest = function()\n  n = n + 1\n'
                          '  return wrk.format(nil, nil, {["Idempotency-Key"] = "s" .. '
                          'tostring(os.time()) .. "-" .. n}, nil)\nend\n')
    t0 = time.monotonic()
    sent, refused, rss = wrk_until(envoy.port, path, STORE_KEYS, envoy.proc.pid, seconds=5,
                                   path="/bench")
    stats = envoy.stats()
    request("127.0.0.1", envoy.port, "POST", "/bench", headers={"idempotency-key": "recent"})
    replay = request("127.0.0.1", envoy.port, "POST", "/bench", headers={"idempotency-key": "recent"})
    envoy.stop()
    return (f"{sent:,} distinct keys through 10,000 slots in {time.monotonic() - t0:.0f} s: "
            f"{refused} refused, {stats.get('wasmcustom.rollsafe_idempotency_evicted', 0):,} "
            f"evicted, Envoy private memory {rss[min(1, len(rss) - 1)]:,} KiB after warm-up → "
            f"{rss[-1]:,} KiB, most recent key replayed: "
            f"{replay.headers.get('idempotent-replayed') == 'true'}")


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    out = subprocess.run([str(Path(sys.executable).parent / "envoy"), "--version"],
                         capture_output=True, text=True).stdout
    m = re.search(r"/(\d+\.\d+\.\d+)/", out)
    version = m.group(1) if m else "?"
    return (f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Envoy {version}, "
            f"wrk -t1 -c8 on loopback, {ROUNDS} rounds × {SECONDS} s, 1 Envoy worker; "
            f"dist/rollsafe.wasm {(ROOT / 'dist' / 'rollsafe.wasm').stat().st_size:,} bytes")


def us_per_instruction(vs: list[Variant]) -> float | None:
    """Envoy CPU time per instruction in this run: the median slope of CPU time over
    instruction count between each variant and its reference, where the difference is large
    enough (≥ 40,000 instructions) to stand out of the CPU measure's noise. It turns the
    steady instruction counts of small differences (the idle costs) into microseconds."""
    by = {v.name: v for v in vs}
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    slopes = []
    for v in vs:
        ref = by.get(v.ref) if v.ref else None
        if ref and v.instr and ref.instr and abs(v.instr - ref.instr) >= 40_000:
            slopes.append((med(v.cpu) - med(ref.cpu)) / (v.instr - ref.instr))
    return statistics.median(slopes) if slopes else None


def verdicts(vs: list[Variant]) -> list[str]:
    by = {v.name: v for v in vs}
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    rate = us_per_instruction(vs)
    lines = []
    for v in vs:
        ref = by.get(v.ref) if v.ref else None
        if v.goal == "idle" and ref:
            d = med(v.cpu) - med(ref.cpu)
            di = (v.instr - ref.instr) if v.instr and ref.instr else None
            if di is not None and rate:
                # Judged on the instruction count, which small differences do not drown in.
                us = di * rate
                why = f": {REASONS[v.name]}" if us > 3 and v.name in REASONS else ""
                lines.append(f"| {v.name} idle cost | ≤ +3 µs CPU over the no-op filter | "
                             f"{di:+,.0f} instructions ≈ {us:+.1f} µs (CPU median {d:+.1f} µs) | "
                             f"{'met' if us <= 3 else 'not met' + why} |")
            else:
                lines.append(f"| {v.name} idle cost | ≤ +3 µs CPU over the no-op filter | "
                             f"{d:+.1f} µs | {'met' if d <= 3 else 'not met'} |")
        elif v.goal == "p50" and ref:
            r = med(v.p50_c1) / med(ref.p50_c1)
            r8 = med(v.p50) / med(ref.p50)
            lines.append(f"| {v.name} p50 | ≤ 1.5× plain proxying | {r:.2f}× one request at a time "
                         f"({med(v.p50_c1):.2f} vs {med(ref.p50_c1):.2f} ms); {r8:.2f}× at 8 "
                         f"connections, where it is the CPU ratio ({med(v.p50):.2f} vs "
                         f"{med(ref.p50):.2f} ms) | {'met' if r <= 1.5 else 'not met'} |")
        elif v.goal == "rps" and ref:
            r = med(v.rps) / med(ref.rps)
            # A saturated worker's throughput is the inverse of its CPU per request, which is
            # steadier here than wrk's count (wrk shares the 2 cores).
            by_cpu = lambda x: med(ref.cpu) / med(x.cpu)  # noqa: E731
            floor = by.get("direct_1k_noop")
            extra = (f"; the no-op wasm filter alone in front of direct_response: "
                     f"{med(floor.rps) / med(ref.rps):.2f}× (by CPU {by_cpu(floor):.2f}×), and the "
                     f"replay against that: {med(v.rps) / med(floor.rps):.2f}×" if floor else "")
            least = [(by[n], what) for n, what in [
                ("reply_floor_1k", "one header read"), ("reply_floor_map_1k", "the header map")]
                if n in by]
            if least:
                extra += "; the no-op filter doing only what a replay must — " + ", ".join(
                    f"{what} and a 1 KiB local answer: {med(f.rps) / med(ref.rps):.2f}× "
                    f"(by CPU {by_cpu(f):.2f}×)" for f, what in least)
            why = f": {REASONS[v.name]}" if r < 0.9 and v.name in REASONS else ""
            lines.append(f"| {v.name} throughput | ≥ 0.9× direct_response | {r:.2f}× "
                         f"({med(v.rps):,.0f} vs {med(ref.rps):,.0f} rps; by Envoy CPU per "
                         f"request {by_cpu(v):.2f}×){extra} | "
                         f"{'met' if r >= 0.9 else 'not met' + why} |")
    return lines


# Why a goal is missed, when it is: the host's price for the hostcalls each path cannot do
# without (each priced by the probe variants in the same run, see `prices`).
REASONS = {
    "retry": "a retry replays the request's headers, and Envoy shows a filter none in the response "
             "phase, so the header map is copied at request time; the answer's `:status` is read on "
             "the way back: map_read + one_read",
    "configured": "the same header-map copy and `:status` read as `retry`; that one copy also serves "
                  "routing and keys",
    "routing": "`:method` (only writes are hashed) and a lookup for a client-supplied group header, "
               "which is absent: one_read + an absent lookup",
    "idempotency": "one lookup of the key header (absent on these GETs)",
    "maintenance": "one clock read",
    "maint_notice": "one clock read; the notice is one more comparison outside its period",
    "maint_schedule": "one clock read and the `:path` and `:method` reads that tell the schedule "
                      "path from the rest",
    "replay_1k": "out of reach of any filter here: the no-op filter doing only what a replay must "
                 "(reply_floor_1k, reply_floor_map_1k) is below 0.9× too, the price of Envoy's "
                 "local-reply path; beside it, rollsafe's work: with keys "
                 "alone, a lookup of the key header first (what lets unkeyed requests pass after "
                 "one lookup), the header map, the route's name (a property), the key's index "
                 "record and the 1 KiB stored response (shared data), SHA-256 of the scope and of "
                 "the fingerprint, the metric, and the local reply",
}


def prices(vs: list[Variant]) -> list[str]:
    by = {v.name: v for v in vs}
    noop = by.get("noop")
    rows = []
    for name, what in [("one_read", "one request header"), ("map_read", "the request header map"),
                       ("property_read", "an absent property (xds.route_name)"),
                       ("shared_read", "1 KiB of shared data")]:
        v = by.get(name)
        if v and noop and v.instr and noop.instr:
            rows.append(f"| {what} | {v.instr - noop.instr:+,.0f} |")
    return (["| hostcall (the no-op filter doing only this) | instructions per request |",
             "|---|---:|"] + rows) if rows else []


def report(vs: list[Variant], store: str | None) -> str:
    by = {v.name: v for v in vs}
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    rows = ["| variant | what | rps | p50 ms | p99 ms | Envoy CPU µs/req | vs reference | "
            "instructions/req | vs reference |",
            "|---|---|---:|---:|---:|---:|---|---:|---|"]
    for v in vs:
        ref = by.get(v.ref) if v.ref else None
        vs_ref = (f"{med(v.cpu) - med(ref.cpu):+.1f} µs vs {ref.name}, "
                  f"{med(v.rps) / med(ref.rps):.2f}× rps, {med(v.p50) / med(ref.p50):.2f}× p50"
                  if ref else "reference")
        instr = f"{v.instr:,.0f}" if v.instr else "–"
        vs_instr = (f"{v.instr - ref.instr:+,.0f} vs {ref.name}"
                    if ref and v.instr and ref.instr else "–")
        rows.append(f"| {v.name} | {v.what} | {med(v.rps):,.0f} | {med(v.p50):.2f} | "
                    f"{med(v.p99):.2f} | {med(v.cpu):.1f} | {vs_ref} | {instr} | {vs_instr} |")
    goals = ["| goal | target | measured | verdict |", "|---|---|---|---|"] + verdicts(vs)
    rate = us_per_instruction(vs)
    calibration = (f"Instructions become microseconds at this run's own rate, "
                   f"{rate * 1000:.2f} µs of Envoy CPU per 1,000 instructions (the median slope of "
                   f"CPU time over instructions between each variant and its reference, where they "
                   f"differ by 40,000 instructions or more)." if rate else "")
    text = [
        "# rollsafe benchmark results",
        "",
        f"Written by `make bench` on {datetime.date.today().isoformat()}: {machine()}.",
        "Only ratios and differences within this one run mean anything: the machine is shared "
        "and noisy. Instructions are counted by callgrind over a fixed sequence of "
        f"{CG_REQUESTS} requests sent one at a time, and repeat to a fraction of a percent.",
        "",
        "## Goals",
        "",
        *goals,
        "",
        calibration,
        "",
        "## The host's price per hostcall",
        "",
        "Envoy calls back into the VM to allocate the copy of anything a hostcall returns; a "
        "lookup that finds nothing costs less. Measured with the no-op filter (`bench/probe`):",
        "",
        *prices(vs),
        "",
        "## Every path beside its reference",
        "",
        *rows,
    ]
    if store:
        text += ["", "## The store under a million keys", "", store]
    return "\n".join(text) + "\n"


def main() -> int:
    for tool in ("wrk", "valgrind"):
        if not shutil.which(tool):
            print(f"{tool} is missing (make bench installs it)", file=sys.stderr)
            return 1
    if not PROBE.exists():
        print(f"{PROBE} is missing (make bench builds it)", file=sys.stderr)
        return 1
    harness = Harness()
    try:
        pod = harness.pod("bench1", "bench")
        # The pod answers every request with 1 KiB, as the direct_response route does; /held
        # requests it keeps for an hour (the 409 variant's key in flight).
        pod.script({"status": 200, "delay_ms": 3_600_000, "path_prefix": "/held", "count": 100},
                   {"status": 200, "body": KIB, "count": 100_000_000})
        clusters = {"bench": [pod]}
        vs = variants(clusters)
        load(harness, vs, clusters)
        if CG_REQUESTS:
            # Two at a time: counts do not depend on what else runs.
            from concurrent.futures import ThreadPoolExecutor

            def count(v: Variant) -> None:
                v.instr = callgrind(harness, v, clusters)
                print(f"callgrind {v.name}: {v.instr:,.0f} instructions/request", flush=True)
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(count, [v for v in vs if v.fixed]))
        store = store_run(harness, clusters) if STORE_KEYS else None
        raw = {v.name: {"rps": v.rps, "cpu_us": v.cpu, "p50_ms": v.p50, "p99_ms": v.p99,
                        "p50_c1_ms": v.p50_c1, "instructions": v.instr} for v in vs}
        (harness.dir / "bench.json").write_text(json.dumps(raw))
        text = report(vs, store)
        print("\n" + text)
        if not os.environ.get("BENCH_ONLY"):
            RESULTS.parent.mkdir(exist_ok=True)
            RESULTS.write_text(text)
            print(f"written to {RESULTS.relative_to(ROOT)}")
    finally:
        harness.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
