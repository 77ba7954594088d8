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

Kong's host (an nginx with Kong's ngx_wasm_module, named by KONG_WASM_NGINX) runs its own
variants in the same rounds when KONG_WASM_NGINX is set: nginx's own proxying (upstream
keep-alive, as Kong's default pool) with no filter and with the no-op filter, and rollsafe's
paths there; its CPU is the workers' (/proc), and callgrind counts Envoy only: on Kong's host
`perf` samples the worker instead (when it runs here), with Wasmtime's perfmap naming the wasm
code (a build of the same .wasm that keeps its function names). The shared store
(Redis behind Webdis) is measured on both hosts beside the node-local one, with the Redis
commands each request costs.

Writes bench/RESULTS.md. Environment: BENCH_ROUNDS (default 7), BENCH_SECONDS (2),
BENCH_CALLGRIND_REQUESTS (200; 0 skips callgrind), BENCH_FILL (49,152: requests a path that
takes a new key per request is warmed up with, so its store is measured full),
BENCH_STORE_KEYS (1,000,000; 0 skips the store run), BENCH_VARIANTS (extra idle variants as
JSON: {"name": {config}}), BENCH_ONLY (a comma-separated list of variants to run, with their
references; RESULTS.md is not written).
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.harness import KONG_WASM_NGINX, ROOT, Envoy, Harness, Kong, request, wrk_until

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "7"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "2"))
CG_REQUESTS = int(os.environ.get("BENCH_CALLGRIND_REQUESTS", "200"))
# Requests before counting starts: V8 compiles a module's functions quickly first and again,
# optimised, once they are hot; counting starts after that.
CG_WARMUP = int(os.environ.get("BENCH_CALLGRIND_WARMUP", "50"))
STORE_KEYS = int(os.environ.get("BENCH_STORE_KEYS", "1000000"))
PROBE = ROOT / "target" / "wasm32-wasip1" / "release" / "rollsafe_probe.wasm"
RESULTS = ROOT / "bench" / "RESULTS.md"
# The .wasm with its function names (make bench builds it): perf names rollsafe's wasm code.
NAMED = ROOT / "target" / "rollsafe_named.wasm"
# The same .wasm built for speed (opt-level 2 rather than "z"; Makefile).
SPEED = ROOT / "target" / "rollsafe_speed.wasm"
PERF = shutil.which("perf")

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
KIB = "x" * 1024
# 16,384 slots (the default), sized as the README sizes a store: with 1 KiB answers they fit
# Kong's 64 MiB zone, and a run's keyed writes go on evicting the oldest completions. (65,536
# did not fit: once the zone was full it refused claims, answered 503 store full.)
OWNED = {"retry": RETRY, "idempotency": {"max_entries": 16384}}
# The shared store: Redis behind Webdis, the cluster `store`.
REDIS = {"store": "redis", "redis": {"target": "store", "cache": True}}


def owned(cache: bool) -> dict:
    return {"retry": RETRY, "idempotency": {"max_entries": 16384, **REDIS,
                                            "redis": {**REDIS["redis"], "cache": cache}}}


_keys = iter(range(1 << 62))
RUN = time.time_ns()


def keyed_fixed(i: int) -> tuple:
    """A keyed POST under a key never used before (the shared store outlives each gateway)."""
    return ("POST", "/bench", {"idempotency-key": f'"cg-{RUN}-{next(_keys)}"',
                               "content-type": "application/json"}, KIB.encode())


replay_fixed = ("POST", "/bench", {"idempotency-key": '"bench-replay"',
                                   "content-type": "application/json"}, KIB.encode())

# The same, rollsafe owning writes only: reads go to the gateway's own proxying and retries.
WRITES = ["POST", "PUT", "PATCH", "DELETE"]
CONFIGURED_WRITES = {**CONFIGURED, "retry": {**RETRY, "methods": WRITES}}

# The route retries Envoy itself would do for the same three attempts.
ENVOY_RETRY = {"retry_on": "5xx,reset,connect-failure", "num_retries": 2}



# A wrk script that sends a new key per request starts with this line.
NEW_KEYS = "n = 0"
# Requests a new-key path is warmed up with: three times the store's 16,384 slots, which
# leaves hardly a bucket with a free way.
FILL = int(os.environ.get("BENCH_FILL", "49152"))


def post_script(key: str | None = None, new_key: bool = False, path: str = "/bench") -> str:
    """A wrk script: POST with a 1 KiB body; a fixed Idempotency-Key, a new one per request,
    or none."""
    s = f'wrk.method = "POST"\nwrk.path = "{path}"\nwrk.body = "{KIB}"\n' \
        'wrk.headers["Content-Type"] = "application/json"\n'
    if key:
        s += f"wrk.headers[\"Idempotency-Key\"] = '\"{key}\"'\n"
    if new_key:
        s += (NEW_KEYS + '\nrequest = function()\n  n = n + 1\n  return wrk.format(nil, nil, '
              '{["Idempotency-Key"] = "k" .. tostring(os.time()) .. "-" .. n}, nil)\nend\n')
    return s


GET_USER = 'wrk.headers["User-Id"] = "u-1234"\n'


@dataclass
class Variant:
    name: str
    what: str
    ref: str | None  # the variant this one is compared with
    envoy: dict  # the gateway's keyword arguments (Envoy or Kong), config first
    script: str | None = None  # wrk script (None: a plain GET)
    # "idle" (≤ +3 µs CPU over the no-op filter), "owned" (≤ 1.3× plain proxying's CPU, or
    # ≤ 1.1× `floor`'s), "replay" (≥ 0.95× `floor`, the no-op filter answering the same
    # bytes), "store" (p50 ≤ `ref`'s + two Webdis round trips)
    goal: str | None = None
    prepare: object = None  # called with the running Envoy before measuring
    # callgrind: (method, path, headers, body) of the fixed request; None: not counted
    fixed: tuple | None = ("GET", "/bench", {}, None)
    host: str = "envoy"  # or "kong" (Kong's host)
    # What the no-op filter does of this path's unavoidable part (a variant's name).
    floor: str | None = None
    # The no-op filter making the hostcalls rollsafe's design makes on this path (a variant's
    # name): what is left is rollsafe's own code.
    design: str | None = None
    # The shared store: Redis commands per request are counted.
    store: bool = False
    # Its answers are refusals (409, 503): not 2xx by design.
    refuses: bool = False
    rps: list = field(default_factory=list)
    cpu: list = field(default_factory=list)
    p50: list = field(default_factory=list)
    p99: list = field(default_factory=list)
    # p50 one request at a time (wrk -c1): the path's own latency, not queueing behind the
    # other connections on a saturated worker. Measured for the p50 goal and its reference.
    p50_c1: list = field(default_factory=list)
    instr: float | None = None
    round_trips: float | None = None
    # Kong's host: where its worker's CPU went (`kong_profile`).
    perf: dict | None = None


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
        # (Under callgrind the gateway's first calls are slow enough to outlast the shared
        # store's timeout, before its warm-up: a 503 then is tried again.)
        for _ in range(5):
            r = request("127.0.0.1", envoy.port, "POST", "/bench", body=KIB.encode(),
                        headers={"idempotency-key": '"bench-replay"',
                                 "content-type": "application/json"})
            if r.status != 503:
                break
            time.sleep(1)
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
        # Not a hostcall: what a keyed request's persisted formats cost to compute, whoever
        # computes them (the fingerprint over a 1 KiB body, the store key).
        Variant("hashes", "no-op filter computing a keyed request's hashes: SipHash-1-3 over 1 KiB "
                "and the request's parts (the fingerprint rollsafe's records pin) and over the "
                "scope's parts (the caller's tag in rollsafe's memo of scope digests)", "noop",
                dict(config="hashes", wasm=PROBE, **idle)),
        Variant("shared_read", "no-op filter reading 1 KiB of shared data", "noop",
                dict(config="shared", wasm=PROBE, **idle)),
        Variant("shared_read_full", "no-op filter reading 1 KiB of shared data among 16,384 "
                "entries (a full store), a new one each request", "noop",
                dict(config="shared,full", wasm=PROBE, **idle)),
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
        Variant("configured_writes", "all four configured, `retry.methods` writes only: a GET",
                "noop", dict(config=CONFIGURED_WRITES, **idle), goal="idle"),
        Variant("routing_hashed", "routing hashes a user id to a group", "noop",
                dict(config={"routing": {"groups": GROUPS, "methods": ["GET"]}}, **idle),
                script=GET_USER, fixed=("GET", "/bench", {"user-id": "u-1234"}, None)),
        Variant("maint_503", "maintenance window open: 503 + problem", "bare",
                dict(config={"maintenance": {"windows": [
                    {"start": "2000-01-01T00:00:00Z", "end": "2099-01-01T00:00:00Z"}]}}, **idle),
                refuses=True),
        Variant("conflict_409", "keyed POST while its key is in flight: 409", "direct_1k",
                dict(config=long_lease, **proxied), script=post_script("held", path="/held"),
                prepare=held, refuses=True,
                fixed=("POST", "/held", {"idempotency-key": '"held"', "content-type": "application/json"},
                       KIB.encode())),
        Variant("plain_1k", "POST 1 KiB proxied, no filter", None, dict(config={}, wasm=None, **proxied),
                script=post_script(), fixed=post_fixed),
        Variant("envoy_retry_1k", "POST 1 KiB, Envoy's own retry_policy (3 attempts)", "plain_1k",
                dict(config={}, wasm=None, retry_policy=ENVOY_RETRY, **proxied),
                script=post_script(), fixed=post_fixed),
        Variant("owned_1k", "keyed POST 1 KiB, rollsafe owns the exchange, first try answers",
                "plain_1k", dict(config=OWNED, **proxied),
                script=post_script(new_key=True), goal="owned", floor="owned_floor_1k",
                design="owned_design_1k", fixed=keyed_fixed),
        # What any filter must do to own a keyed write on Envoy (the route carries attempt 1,
        # the buffer filter after it): read the key, hold the body until whole and read it,
        # record the claim in shared data (read the key's entry and write a small record to
        # it) before the request goes on, read the answer's headers, hold its body and write
        # both to the entry. A store keeps one entry per key: each request takes a new one of
        # 16,384 (rollsafe's default max_entries), so the zone holds what a full store holds.
        Variant("owned_floor_1k", "no-op filter reading one header, holding and reading the "
                "body, recording a claim in a new one of 16,384 shared-data entries and storing "
                "the answer (headers, 1 KiB body) there",
                "plain_1k", dict(config="method,body,claim,store", wasm=PROBE, **proxied),
                script=post_script(new_key=True), fixed=keyed_fixed),
        # The calls rollsafe's owned write makes (src/host/profile_tests.rs), made by the no-op
        # filter: the floor's, with the header map for the one header (the key, method, path,
        # scope and digest; a retry sends the headers again), the route's name (scope), a
        # clock read, the timeout header a keyed write sets before its body is decided, a
        # counter, and the answer kept in an entry of its own with the index record beside it
        # (the bucket read again: Envoy numbers shared-data writes across keys); and the hashes
        # the persisted formats pin (the fingerprint), which every keyed request computes.
        Variant("owned_design_1k", "no-op filter making an owned write's calls: the header map, "
                "the route's name, a clock read, a request header set, a counter, the body, a "
                "claim recorded in a new one of 16,384 entries, the answer (headers, 1 KiB body) "
                "stored in an entry of its own and the claim's entry read again and rewritten; "
                "and the fingerprint's hashes",
                "plain_1k", dict(config="clock,headers,property,timeout,metric,body,claim,store,"
                                 "complete,hashes", wasm=PROBE, **proxied),
                script=post_script(new_key=True), fixed=keyed_fixed),
        # What building for size costs: the same paths with the .wasm built at opt-level 2.
        Variant("owned_1k_speed", "owned_1k, the .wasm built for speed (opt-level 2)", "owned_1k",
                dict(config=OWNED, wasm=SPEED, **proxied), script=post_script(new_key=True),
                fixed=keyed_fixed),
        Variant("owned_redis_1k", "keyed POST 1 KiB on the shared store (Redis via Webdis)",
                "owned_1k", dict(config=owned(cache=True), **proxied),
                script=post_script(new_key=True), goal="store", floor="owned_redis_floor_1k",
                store=True, fixed=keyed_fixed),
        # What a keyed write on the shared store cannot do without beyond the local floor: a
        # Webdis call before the request goes on and another before the answer does.
        Variant("owned_redis_floor_1k", "owned_floor_1k's answer stored without its claim, with a "
                "Webdis SET (100 bytes) before the request goes on and another (the 1 KiB answer) "
                "before the answer does",
                "owned_floor_1k", dict(config="method,body,store,webdis=store", wasm=PROBE,
                                       **proxied),
                script=post_script(new_key=True), fixed=keyed_fixed),
        Variant("direct_1k", "Envoy's direct_response, 1 KiB", None,
                dict(config={}, wasm=None, concurrency=1, direct_response=KIB),
                script=post_script("bench-replay"), fixed=post_fixed),
        Variant("direct_1k_noop", "direct_response, 1 KiB, behind the no-op wasm filter", "direct_1k",
                dict(config="", wasm=PROBE, concurrency=1, direct_response=KIB),
                script=post_script("bench-replay"), fixed=post_fixed),
        Variant("replay_1k", "replay of a stored 1 KiB response", "direct_1k",
                dict(config={"idempotency": {"max_entries": 65536}}, **proxied),
                script=post_script("bench-replay"), goal="replay", floor="replay_floor_1k",
                design="replay_design_1k", prepare=stored, fixed=replay_fixed),
        Variant("replay_1k_speed", "replay_1k, the .wasm built for speed (opt-level 2)",
                "replay_1k", dict(config={"idempotency": {"max_entries": 65536}}, wasm=SPEED,
                                  **proxied),
                script=post_script("bench-replay"), prepare=stored, fixed=replay_fixed),
        # What any filter must do to replay a keyed POST: read the key, hold the body until
        # whole and read it (the fingerprint covers it), read the stored 1 KiB, answer.
        Variant("replay_floor_1k", "no-op filter reading one header, the body and 1 KiB of shared "
                "data, answering 1 KiB itself", "direct_1k",
                dict(config="method,body,shared,reply", wasm=PROBE, **proxied),
                script=post_script("bench-replay"), fixed=replay_fixed),
        # The calls rollsafe's replay makes (src/host/profile_tests.rs), made by the no-op
        # filter: the header map (key, method, path, scope, digest), the route's name (scope),
        # a clock read, the timeout header a keyed write sets before its body is decided, the
        # body, the key's index record and the stored answer from shared data, a counter; and
        # the fingerprint's hashes (a replay compares the request's with the stored one's).
        Variant("replay_design_1k", "no-op filter making a replay's calls: the header map, the "
                "route's name, a clock read, a request header set, the body, 160 bytes and 1 KiB "
                "of shared data, a counter, the fingerprint's hashes; answering 1 KiB itself",
                "direct_1k",
                dict(config="clock,headers,property,timeout,body,index,shared,metric,hashes,reply",
                     wasm=PROBE, **proxied),
                script=post_script("bench-replay"), fixed=replay_fixed),
        Variant("replay_redis_1k", "replay from the shared store (no node cache)", "replay_1k",
                dict(config={"idempotency": {"max_entries": 65536, **REDIS, "redis": {
                    **REDIS["redis"], "cache": False}}}, **proxied),
                script=post_script("bench-replay"), prepare=stored, store=True, fixed=replay_fixed),
        Variant("replay_cache_1k", "replay from the node cache beside the shared store",
                "replay_1k", dict(config={"idempotency": {"max_entries": 65536, **REDIS}}, **proxied),
                script=post_script("bench-replay"), prepare=stored, store=True, fixed=replay_fixed),
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
    if KONG_WASM_NGINX:
        out += kong_variants(pod_clusters, held, stored)
    check_counted(out)
    for name, cfg in json.loads(os.environ.get("BENCH_VARIANTS", "{}")).items():
        out.append(Variant(name, "extra (BENCH_VARIANTS)", "noop", dict(config=cfg, **idle)))
    only = [n for n in os.environ.get("BENCH_ONLY", "").split(",") if n]
    if only:  # investigations: these variants and their references
        keep = set(only) | {v.ref for v in out if v.name in only and v.ref}
        keep |= {v.floor for v in out if v.name in only and v.floor}
        keep |= {v.design for v in out if v.name in only and v.design}
        if "replay_1k" in only:
            keep |= {"direct_1k_noop", "reply_floor_1k", "reply_floor_map_1k"}
        out = [v for v in out if v.name in keep]
    return out


def counted_shape(v: Variant) -> tuple:
    """What callgrind counts of a variant: its request's method and body length."""
    fixed = v.fixed(0) if callable(v.fixed) else v.fixed
    return (fixed[0], len(fixed[3] or b"")) if fixed else None


def check_counted(out: list[Variant]) -> None:
    """A variant's instructions are compared with its reference's, floor's and design's: all of
    them must count the same kind of request (a floor that counted a GET beside a keyed POST
    once made a verdict's ratio meaningless)."""
    by_name = {v.name: v for v in out}
    for v in out:
        for other in filter(None, (v.ref, v.floor, v.design)):
            o = by_name.get(other)
            if o and None not in (counted_shape(v), counted_shape(o)) \
                    and counted_shape(v) != counted_shape(o):
                raise ValueError(f"{v.name} counts {counted_shape(v)} but {o.name}, which it "
                                 f"is compared with, counts {counted_shape(o)}")


def kong_variants(clusters, held, stored) -> list[Variant]:
    """Kong's host: nginx's own proxying with upstream keep-alive (Kong's default) is the
    reference; every variant is one nginx with one worker."""
    pod = clusters["bench"][0].address
    k = {"concurrency": 1, "keepalive": 64}
    post = ("POST", "/bench", {"content-type": "application/json"}, KIB.encode())
    return [
        Variant("kong_bare", "Kong's host: GET proxied, no filter", None,
                dict(config={}, wasm=None, **k), host="kong"),
        Variant("kong_noop", "Kong's host: GET, the no-op wasm filter", "kong_bare",
                dict(config="", wasm=PROBE, **k), host="kong"),
        # The host's price for one hostcall of each kind (CPU: no instruction counts here).
        *[Variant(f"kong_{name}", f"Kong's host: GET, the no-op filter {what}", "kong_noop",
                  dict(config=cfg, wasm=PROBE, **k), host="kong")
          for name, what, cfg in [("one_read", "reading one request header", "method"),
                                  ("map_read", "reading the request header map", "headers"),
                                  ("property_read", "reading a property (xds.route_name)",
                                   "property"),
                                  ("hashes", "computing a keyed request's hashes (SipHash-1-3 "
                                   "of 1 KiB and of the scope)", "hashes"),
                                  ("shared_read", "reading 1 KiB of shared data", "shared"),
                                  ("shared_read_full", "reading 1 KiB of shared data among "
                                   "16,384 entries (a full store), a new one each request",
                                   "shared,full")]],
        Variant("kong_empty", "Kong's host: rollsafe, empty config", "kong_noop",
                dict(config={}, **k), goal="idle", host="kong"),
        Variant("kong_maintenance", "Kong's host: maintenance alone, outside its windows",
                "kong_noop", dict(config={"maintenance": MAINTENANCE}, **k), goal="idle",
                host="kong"),
        Variant("kong_idempotency", "Kong's host: idempotency alone, GET (takes no key)",
                "kong_noop", dict(config={"idempotency": {"max_entries": 1024}}, fill_target=False,
                                  **k), goal="idle", host="kong"),
        # (retry.target: as Kong gives rollsafe the route's Service, which bare nginx has not.)
        Variant("kong_configured", "Kong's host: all four configured, a GET", "kong_noop",
                dict(config={**CONFIGURED, "retry": {**RETRY, "target": "bench"}}, **k),
                goal="idle", host="kong"),
        Variant("kong_configured_writes", "Kong's host: all four configured, `retry.methods` "
                "writes only: a GET", "kong_noop",
                dict(config={**CONFIGURED_WRITES, "retry": {**CONFIGURED_WRITES["retry"],
                                                             "target": "bench"}}, **k),
                goal="idle", host="kong"),
        Variant("kong_plain_1k", "Kong's host: POST 1 KiB proxied, upstream keep-alive, no filter",
                None, dict(config={}, wasm=None, **k), script=post_script(), host="kong",
                fixed=post),
        Variant("kong_plain_close_1k", "Kong's host: POST 1 KiB proxied, a new upstream "
                "connection each (what a dispatch does)", "kong_plain_1k",
                dict(config={}, wasm=None, concurrency=1), script=post_script(), host="kong",
                fixed=post),
        Variant("kong_owned_1k", "Kong's host: keyed POST 1 KiB, rollsafe owns the exchange "
                "(dispatch), first try answers", "kong_plain_1k", dict(config=OWNED, **k),
                script=post_script(new_key=True), goal="owned", floor="kong_dispatch_floor_1k",
                design="kong_owned_design_1k", host="kong", fixed=keyed_fixed),
        # The floor of the dispatch design: what Envoy's owned floor does (read the key, hold
        # and read the body, record the claim, store the 1 KiB answer), with the attempt carried
        # by dispatch_http_call: the request's headers sent along and the reply's given back,
        # as any filter carrying the attempt itself must, and the client's connection closed
        # from its 32nd request on as rollsafe does after a call (src/reconnect.rs); and the
        # same keeping the connection (Kong's host holds each call's buffers until the
        # client's connection closes).
        Variant("kong_dispatch_floor_1k", "Kong's host: no-op filter reading one header, "
                "holding the body, recording a claim in a new one of 16,384 shared-data entries, "
                "dispatching the body with the request's headers, storing the reply (headers, "
                "1 KiB body) there under the cas the claim left and answering with it (a "
                "connection closed after 32 requests)", "kong_plain_1k",
                dict(config=f"method,claim,cas,dispatch={pod},forward,store,close", wasm=PROBE,
                     **k),
                script=post_script(new_key=True), host="kong", fixed=keyed_fixed),
        Variant("kong_owned_1k_speed", "Kong's host: kong_owned_1k, the .wasm built for speed "
                "(opt-level 2)", "kong_owned_1k", dict(config=OWNED, wasm=SPEED, **k),
                script=post_script(new_key=True), host="kong", fixed=keyed_fixed),
        # The calls rollsafe's owned write makes on Kong's host, made by the no-op filter: the
        # dispatch floor's (whose header map, read to send along, also holds the key), with the
        # route's id, a clock read, two counters, and the answer kept in an entry of its own
        # with the index record beside it, written under the cas the claim's write left; and
        # the fingerprint's hashes.
        Variant("kong_owned_design_1k", "Kong's host: no-op filter making an owned write's "
                "calls: the dispatch floor's with the header map for the one header, a property, "
                "a clock read, two counters, the answer stored in an entry of its own and the "
                "claim's entry rewritten under the cas its write left; and the fingerprint's "
                "hashes", "kong_plain_1k",
                dict(config=f"clock,property,metric,metric,claim,cas,complete,dispatch={pod},"
                            "forward,store,close,hashes", wasm=PROBE, **k),
                script=post_script(new_key=True), host="kong", fixed=keyed_fixed),
        Variant("kong_dispatch_kept_1k", "Kong's host: the dispatch floor keeping the client's "
                "connection (up to keepalive_requests 10000)", "kong_dispatch_floor_1k",
                dict(config=f"method,claim,cas,dispatch={pod},forward,store", wasm=PROBE, **k),
                script=post_script(new_key=True), host="kong", fixed=keyed_fixed),
        # The floor of the other design (attempt 1 carried by proxy_pass): read the key, hold
        # and read the body, record the claim, store the answer in shared data; nginx proxies.
        Variant("kong_proxy_floor_1k", "Kong's host: no-op filter reading one header, holding "
                "and reading the body, recording a claim in a new one of 16,384 entries, storing "
                "the answer (headers, 1 KiB body) there; proxy_pass carries it", "kong_plain_1k",
                dict(config="method,body,claim,cas,store", wasm=PROBE, **k),
                script=post_script(new_key=True), host="kong", fixed=keyed_fixed),
        # The other design, run by rollsafe itself: with no target to dispatch to, Kong's own
        # proxy_pass carries the keyed write (claimed at the body's end, stored from the
        # response), with no retries by rollsafe.
        Variant("kong_proxied_1k", "Kong's host: keyed POST 1 KiB, attempt 1 carried by "
                "proxy_pass (no retries)", "kong_plain_1k",
                dict(config=OWNED, fill_target=False, **k), script=post_script(new_key=True),
                host="kong", fixed=keyed_fixed),
        Variant("kong_owned_redis_1k", "Kong's host: keyed POST 1 KiB on the shared store",
                "kong_owned_1k", dict(config=owned(cache=True), **k),
                script=post_script(new_key=True), goal="store",
                floor="kong_owned_redis_floor_1k", store=True, host="kong", fixed=keyed_fixed),
        # As on Envoy: what a keyed write on the shared store cannot do without beyond the
        # local floor, a Webdis call before the attempt is dispatched and another before the
        # answer goes back (`store` is the harness's address of the shared store).
        Variant("kong_owned_redis_floor_1k", "Kong's host: kong_dispatch_floor_1k's answer "
                "stored without its claim, with a Webdis SET (100 bytes) before the attempt is "
                "dispatched and another (the 1 KiB answer) before the answer goes back",
                "kong_dispatch_floor_1k",
                dict(config=f"method,dispatch={pod},forward,store,close,webdis=store",
                     wasm=PROBE, **k),
                script=post_script(new_key=True), host="kong", fixed=keyed_fixed),
        Variant("kong_replay_1k", "Kong's host: replay of a stored 1 KiB response",
                "kong_plain_1k", dict(config=OWNED, **k), script=post_script("bench-replay"),
                goal="replay", floor="kong_replay_floor_1k", design="kong_replay_design_1k",
                prepare=stored, host="kong", fixed=replay_fixed),
        Variant("kong_replay_1k_speed", "Kong's host: kong_replay_1k, the .wasm built for speed "
                "(opt-level 2)", "kong_replay_1k", dict(config=OWNED, wasm=SPEED, **k),
                script=post_script("bench-replay"), prepare=stored, host="kong",
                fixed=replay_fixed),
        Variant("kong_replay_floor_1k", "Kong's host: no-op filter reading one header, the body "
                "and 1 KiB of shared data, answering 1 KiB itself", "kong_plain_1k",
                dict(config="method,body,shared,reply", wasm=PROBE, **k),
                script=post_script("bench-replay"), host="kong", fixed=replay_fixed),
        Variant("kong_replay_design_1k", "Kong's host: no-op filter making a replay's calls: the "
                "header map, a property, a clock read, the body, 160 bytes and 1 KiB of shared "
                "data, a counter, the fingerprint's hashes; answering 1 KiB itself",
                "kong_plain_1k",
                dict(config="clock,headers,property,body,index,shared,metric,hashes,reply",
                     wasm=PROBE, **k),
                script=post_script("bench-replay"), host="kong", fixed=replay_fixed),
        Variant("kong_replay_redis_1k", "Kong's host: replay from the shared store (no node "
                "cache)", "kong_replay_1k", dict(config=owned(cache=False), **k),
                script=post_script("bench-replay"), prepare=stored, store=True, host="kong",
                fixed=replay_fixed),
        Variant("kong_replay_cache_1k", "Kong's host: replay from the node cache beside the "
                "shared store", "kong_replay_1k", dict(config=owned(cache=True), **k),
                script=post_script("bench-replay"), prepare=stored, store=True, host="kong",
                fixed=replay_fixed),
    ]


def start(harness, v: Variant, clusters, **extra):
    kw = dict(v.envoy)
    cfg = kw.pop("config")
    if v.host == "kong":
        g = Kong(harness, cfg, clusters, log_level="notice", **kw, **extra)
    else:
        g = Envoy(harness, cfg, clusters, log_level="info", **kw, **extra)
    harness.gateways.append(g)
    return g.start()


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


def wrk(port: int, script: str | None, connections: int = 8, url: str | None = None) -> dict:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{SECONDS}s", "--latency",
            url or f"http://127.0.0.1:{port}/bench"]
    if script:
        path = f"/tmp/rollsafe-bench-{abs(hash(script))}.lua"
        Path(path).write_text(script)
        args[1:1] = ["-s", path]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    n = re.search(r"(\d+) requests in", out)
    # (Anchored to the distribution's own lines: the thread stats end in a percentage too,
    # and "95.50%" followed by the next line's first word once read as a p50 of nan.)
    p50 = re.search(r"^\s*50%\s+(\S+)\s*$", out, re.M)
    p99 = re.search(r"^\s*99%\s+(\S+)\s*$", out, re.M)
    if not (n and p50 and p99):
        raise RuntimeError(out)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {"n": int(n.group(1)), "p50": _ms(p50.group(1)), "p99": _ms(p99.group(1)),
            "bad": int(bad.group(1)) if bad else 0}


def warm(port: int, script: str | None) -> None:
    """Warms a gateway up (connections, VM, JIT), and a path that takes a new key per request
    until its store is full: measured in its steady state. Until then a claim adds a record to
    a bucket, so the bucket outgrows its value (on Kong's host that write reallocates it in the
    zone, a delete and an insert in its tree), and the zone's pages are touched for the first
    time; the floors, which cycle through their entries in order, are past that sooner."""
    n = wrk(port, script)["n"]
    while script and NEW_KEYS in script and n < FILL:
        n += wrk(port, script)["n"]


def load(harness, vs: list[Variant], clusters, store=None) -> list[float]:
    """Every variant under wrk, round by round. Returns one Webdis round trip's p50 (a write,
    one connection) per round when the shared store runs."""
    gateways = {v.name: start(harness, v, clusters) for v in vs}
    by = {v.name: v for v in vs}
    unloaded = {v.name for v in vs if v.goal == "store"} | {
        w for v in vs if v.goal == "store" for w in (v.ref, v.floor) if w in by}
    rtt = []
    for v in vs:
        if v.prepare:
            v.prepare(gateways[v.name])
        warm(gateways[v.name].port, v.script)
    for r in range(ROUNDS):
        for v in vs:
            g = gateways[v.name]
            if v.prepare and r:
                v.prepare(g)  # the 409's held request ends at its 300 s timeout
            before = g.cpu_ns()
            res = wrk(g.port, v.script)
            if not res["n"]:
                raise RuntimeError(f"{v.name}: no request answered:\n{g.log()[-3000:]}")
            # A path measured on failures (a floor whose calls fail) would mean nothing.
            if res["bad"] and not v.refuses:
                raise RuntimeError(f"{v.name}: {res['bad']} answers were not 2xx:\n"
                                   f"{g.log()[-3000:]}")
            v.cpu.append((g.cpu_ns() - before) / res["n"] / 1000)
            v.rps.append(res["n"] / SECONDS)
            v.p50.append(res["p50"])
            v.p99.append(res["p99"])
            if v.name in unloaded:
                one = wrk(g.port, v.script, connections=1)
                # (wrk prints no latency it can parse when nothing was answered in the
                # window: a stalled round is left out and said, not made a median of nan.)
                if one["p50"] == one["p50"]:
                    v.p50_c1.append(one["p50"])
                else:
                    print(f"{v.name}: no answer one at a time in round {r + 1}", flush=True)
        if store:
            rtt.append(wrk(0, None, connections=1,
                           url=f"http://{store.address}/SET/rollsafe-bench-rtt/x")["p50"])
        print(f"round {r + 1}/{ROUNDS}: " + ", ".join(
            f"{v.name} {v.cpu[-1]:.0f}" for v in vs) + " µs/req", flush=True)
    for g in gateways.values():
        g.stop()
    return rtt


def round_trips(harness, v: Variant, clusters, store, n: int = 100) -> float:
    """Calls to Webdis per request of `v`: every call rollsafe makes is one EVAL, so Redis's
    count of EVALs is the count of round trips."""
    g = start(harness, v, clusters)

    def evals() -> int:
        info = store.command("INFO", "commandstats")["INFO"]
        # Webdis splits INFO into a dict whose first key keeps the section's title
        # ("# Commandstats\r\ncmdstat_eval" when EVAL is listed first), or gives it as text.
        if isinstance(info, dict):
            info = "\n".join(f"{k}:{v}" for k, v in info.items())
        m = re.search(r"cmdstat_eval:calls=(\d+)", info if isinstance(info, str) else "")
        if m is None:
            raise RuntimeError(f"Redis's INFO commandstats counts no EVAL: {info!r}")
        return int(m.group(1))
    try:
        if v.prepare:
            v.prepare(g)
        box = [None]
        for i in range(10):
            _send(box, g.port, v.fixed, i)
        before = evals()
        for i in range(n):
            _send(box, g.port, v.fixed, 100 + i)
        return (evals() - before) / n
    finally:
        g.stop()


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
    """The gateway's instructions per request for `v.fixed`, counted by callgrind only while
    the requests run (start-up and warm-up are not instrumented): Envoy's, or on Kong's host
    its one worker's (nginx forks it under callgrind; Wasmtime's compiled code runs there as
    V8's does in Envoy)."""
    out = harness.dir / f"callgrind-{v.name}.out"
    wrapper = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--smc-check=all-non-file"]
    if v.host == "kong":
        # (callgrind_control reaches a forked worker only when valgrind follows children; a
        # file per process.)
        wrapper += ["--trace-children=yes", f"--callgrind-out-file={out}.%p"]
    else:
        wrapper += [f"--callgrind-out-file={out}"]
    e = start(harness, v, clusters, wrapper=wrapper)
    try:
        if v.prepare:
            v.prepare(e)
        box = [None]
        for i in range(CG_WARMUP):
            _send(box, e.port, v.fixed, i)
        pid = str(e.proc.pid)
        if v.host == "kong":
            pid = subprocess.check_output(["pgrep", "-P", pid], text=True).split()[0]

        def control(*args: str) -> None:
            subprocess.run(["callgrind_control", *args, pid], check=True, capture_output=True)
        control("-i", "on")
        for i in range(CG_REQUESTS):
            _send(box, e.port, v.fixed, CG_WARMUP + i)
        control("-i", "off")
        control("-d")
    finally:
        e.stop()
    total = 0
    for f in harness.dir.glob(f"callgrind-{v.name}.out*"):
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total / CG_REQUESTS


def _demangled(symbols: list[str]) -> list[str]:
    """Rust symbols as source names (binutils' c++filt reads both Rust manglings; this perf
    does not always demangle what Wasmtime's perfmap names)."""
    if not symbols or not shutil.which("c++filt"):
        return symbols
    out = subprocess.run(["c++filt"], input="\n".join(symbols), capture_output=True, text=True)
    names = out.stdout.splitlines()
    return names if out.returncode == 0 and len(names) == len(symbols) else symbols


def kong_profile(harness, v: Variant, clusters) -> dict | None:
    """Where Kong's worker spends its CPU on variant `v`: perf's samples (cpu-clock) while wrk
    runs it, by where they fell (kernel, nginx and ngx_wasm_module, Wasmtime's calls into and
    out of the VM, the wasm code, libc), and the wasm functions that took most. `None` when perf
    cannot sample here or the host wrote no perfmap (a Wasmtime without its profiling
    feature)."""
    kw = dict(v.envoy)
    cfg = kw.pop("config")
    if "wasm" not in kw and NAMED.exists():
        kw["wasm"] = NAMED
    g = Kong(harness, cfg, clusters, log_level="notice",
             wasm_extra="wasmtime { flag profiler perfmap; }", **kw)
    harness.gateways.append(g)
    g.start()
    data = harness.dir / f"perf-{v.name}.data"
    maps = []
    try:
        if v.prepare:
            v.prepare(g)
        warm(g.port, v.script)
        master = int((g.dir / "nginx.pid").read_text())
        worker = int(subprocess.check_output(["pgrep", "-P", str(master)]).split()[0])
        # (Wasmtime compiled the module in the master, whose map the worker's code is.)
        perfmap = Path(f"/tmp/perf-{master}.map")
        if not perfmap.exists():
            return None
        maps = [perfmap, Path(f"/tmp/perf-{worker}.map")]
        shutil.copy(perfmap, maps[1])
        rec = subprocess.Popen([PERF, "record", "-e", "cpu-clock", "-F", "2999", "-p",
                                str(worker), "-o", str(data)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        wrk(g.port, v.script)
        rec.send_signal(signal.SIGINT)
        rec.wait(timeout=60)
        out = subprocess.run([PERF, "report", "-i", str(data), "--no-children", "--sort",
                              "dso,sym", "--stdio", "-g", "none", "-t", "|"],
                             capture_output=True, text=True, timeout=300).stdout
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    finally:
        g.stop()
        for m in maps:
            m.unlink(missing_ok=True)
    split: dict[str, float] = {}
    wasm: list[tuple[float, str]] = []
    for line in out.splitlines():
        f = line.split("|")
        m = re.match(r"\[(.)\]\s+(.*)", f[2].strip()) if len(f) >= 3 else None
        if not m or not f[0].strip().endswith("%"):
            continue
        pct, dso, kind, sym = float(f[0].strip()[:-1]), f[1].strip(), m.group(1), m.group(2)
        if dso.startswith("[JIT]"):
            where = "wasm code"
            wasm.append((pct, sym))
        elif kind == "k":
            where = "kernel"
        elif dso == "nginx" and ("wasmtime" in sym or "cranelift" in sym or
                                 sym.startswith(("wasm_", "<wasmtime"))):
            where = "Wasmtime"
        elif dso == "nginx":
            where = "nginx and ngx_wasm_module"
        else:
            where = "libc and the rest"
        split[where] = split.get(where, 0.0) + pct
    wasm = [(pct, re.sub(r"::h[0-9a-f]{16}$|\[[0-9a-f]{16}\]", "", sym))
            for pct, sym in zip([p for p, _ in wasm], _demangled([s for _, s in wasm]))]
    total = sum(split.values())
    if not total:
        return None
    return {"split": {k: 100 * x / total for k, x in split.items()},
            "wasm": [(100 * p / total, s) for p, s in sorted(wasm, reverse=True)[:8]]}


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


def wasm_size() -> int:
    return (ROOT / "dist" / "rollsafe.wasm").stat().st_size


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
            f"dist/rollsafe.wasm {wasm_size():,} bytes, built from {SOURCE or source_commit()}")


# The source as the run starts, when `make bench` has just built the .wasm from it: an edit
# made while the run goes on is not in what it measures.
SOURCE: str | None = None


def source_commit() -> str:
    """The commit the .wasm was built from, so that the results say which code they measure
    (and when the code had changed since)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        head = git("rev-parse", "--short=7", "HEAD")
        changed = git("status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock")
    except (OSError, subprocess.CalledProcessError):
        return "an unknown commit (no git here)"
    return f"commit {head}" + (" with uncommitted changes to its source" if changed else "")


def us_per_instruction(vs: list[Variant]) -> float | None:
    """Envoy CPU time per instruction in this run: the median slope of CPU time over
    instruction count between each variant and its reference, where the difference is large
    enough (≥ 40,000 instructions) to stand out of the CPU measure's noise. It turns the
    steady instruction counts of small differences (the idle costs) into microseconds."""
    by = {v.name: v for v in vs}
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    slopes = []
    # (Envoy's alone: on Kong's host a dispatch's connection is kernel work, in the CPU time
    # and not in the instructions, which would make the slope no rate at all.)
    for v in (v for v in vs if v.host == "envoy"):
        ref = by.get(v.ref) if v.ref else None
        if ref and v.instr and ref.instr and abs(v.instr - ref.instr) >= 40_000:
            slopes.append((med(v.cpu) - med(ref.cpu)) / (v.instr - ref.instr))
    return statistics.median(slopes) if slopes else None


def costs(v: Variant, floor: Variant, design: Variant) -> tuple[float, float, str]:
    """The design floor's cost over the floor's and `v`'s over the design floor's: by
    instructions where all three were counted, else by median CPU per request."""
    if v.instr and floor.instr and design.instr:
        return design.instr / floor.instr, v.instr / design.instr, "instructions"
    med = statistics.median
    return med(design.cpu) / med(floor.cpu), med(v.cpu) / med(design.cpu), "CPU"


def verdicts(vs: list[Variant], rtt: list[float]) -> list[str]:
    by = {v.name: v for v in vs}
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    rate = us_per_instruction(vs)
    lines = []
    for v in vs:
        ref = by.get(v.ref) if v.ref else None
        floor = by.get(v.floor) if v.floor else None
        where = "Kong's host" if v.host == "kong" else "Envoy"
        why = f": {REASONS[v.name]}" if v.name in REASONS else ""
        if v.goal == "idle" and ref:
            d = med(v.cpu) - med(ref.cpu)
            di = (v.instr - ref.instr) if v.instr and ref.instr else None
            if di is not None and rate and v.host == "envoy":
                # Judged on the instruction count, which small differences do not drown in.
                us = di * rate
                lines.append(f"| {where} | {v.name} idle cost | ≤ +3 µs CPU over the no-op filter | "
                             f"{di:+,.0f} instructions ≈ {us:+.1f} µs (CPU median {d:+.1f} µs) | "
                             f"{'met' if us <= 3 else 'not met' + why} |")
            else:
                # (Kong's host: by CPU, with its instructions beside it, which this run has no
                # rate for; see `us_per_instruction`.)
                counted = (f"{di:+,.0f} instructions" if di is not None
                           else "no instruction count on this host")
                lines.append(f"| {where} | {v.name} idle cost | ≤ +3 µs CPU over the no-op filter | "
                             f"CPU median {d:+.1f} µs ({counted}) | "
                             f"{'met' if d <= 3 else 'not met' + why} |")
        elif v.goal == "owned" and ref:
            r = med(v.cpu) / med(ref.cpu)
            text = (f"{r:.2f}× by CPU ({med(v.cpu):.0f} vs {med(ref.cpu):.0f} µs/req), "
                    f"{med(v.rps) / med(ref.rps):.2f}× rps")
            if v.instr and ref.instr:
                text += f", {v.instr / ref.instr:.2f}× by instructions"
            verdict = "met" if r <= 1.3 else "not met"
            if floor and r > 1.3:
                fr = med(floor.cpu) / med(ref.cpu)
                vr = med(v.cpu) / med(floor.cpu)
                text += (f"; the floor ({floor.name}: the no-op filter doing only the unavoidable "
                         f"part) is {fr:.2f}× plain proxying, and rollsafe {vr:.2f}× the floor")
                if v.instr and floor.instr:
                    text += f" ({v.instr / floor.instr:.2f}× by instructions)"
                design = by.get(v.design) if v.design else None
                if design and vr > 1.1:
                    dr, dv, unit = costs(v, floor, design)
                    text += (f"; the no-op filter making the calls an owned write makes in "
                             f"rollsafe's design ({design.name}) is {dr:.2f}× the floor by {unit}, "
                             f"and rollsafe {dv:.2f}× of that")
                verdict = (f"not met; floor {'reached (≤ 1.1×)' if vr <= 1.1 else 'not reached'}"
                           + why)
            lines.append(f"| {where} | {v.name} CPU | ≤ 1.3× plain proxying (else ≤ 1.1× the "
                         f"floor) | {text} | {verdict} |")
        elif v.goal == "replay" and floor:
            r = med(v.rps) / med(floor.rps)
            by_cpu = med(floor.cpu) / med(v.cpu)
            text = (f"{r:.2f}× rps ({med(v.rps):,.0f} vs {med(floor.rps):,.0f}), {by_cpu:.2f}× by "
                    f"CPU per request")
            if v.instr and floor.instr:
                text += f", {floor.instr / v.instr:.2f}× by instructions"
            ok = by_cpu >= 0.95 if not (v.instr and floor.instr) else floor.instr / v.instr >= 0.95
            design = by.get(v.design) if v.design else None
            if design and not ok:
                # (Here as speed: the floor's cost over the design's, the design's over rollsafe's.)
                dc, vc, unit = costs(v, floor, design)
                dr, vr = 1 / dc, 1 / vc
                text += (f"; the no-op filter making the calls a replay makes in rollsafe's design "
                         f"({design.name}) reaches {dr:.2f}× by {unit}, and rollsafe {vr:.2f}× of "
                         f"that")
            lines.append(f"| {where} | {v.name} | ≥ 0.95× the no-op filter answering the same bytes "
                         f"({floor.name}) | {text} | {'met' if ok else 'not met' + why} |")
        elif v.goal == "store" and ref and rtt:
            one = med(rtt)
            bound = med(ref.p50_c1) + 2 * one
            text = (f"{med(v.p50_c1):.2f} ms vs {med(ref.p50_c1):.2f} + 2 × {one:.2f} = "
                    f"{bound:.2f} ms (one request at a time; {v.round_trips or 0:.1f} Webdis "
                    f"calls per request)")
            verdict = "met" if med(v.p50_c1) <= bound else "not met" + why
            if floor and floor.p50_c1 and med(v.p50_c1) > bound:
                fl = med(floor.p50_c1)
                vr = med(v.p50_c1) / fl
                text += (f"; the floor ({floor.name}: the no-op filter making the same two Webdis "
                         f"calls, plain SETs) is {fl:.2f} ms, and rollsafe {vr:.2f}× the floor")
                verdict = (f"not met; floor {'above' if fl > bound else 'within'} the goal, "
                           f"{'reached (≤ 1.1×)' if vr <= 1.1 else 'not reached'}" + why)
            lines.append(f"| {where} | {v.name} p50 | ≤ the local store's p50 + two Webdis round "
                         f"trips | {text} | {verdict} |")
    size = wasm_size()
    lines.append(f"| both | .wasm size | ≤ 400 KB after wasm-opt | {size:,} bytes{speed_note(by)} | "
                 f"{'met' if size <= 400_000 else 'not met'} |")
    return lines


def speed_note(by: dict) -> str:
    """What building for size costs: the `_speed` variants (opt-level 2) beside their paths."""
    parts = []
    for name in ("owned_1k", "replay_1k", "kong_owned_1k", "kong_replay_1k"):
        v, fast = by.get(name), by.get(f"{name}_speed")
        if not (v and fast):
            continue
        if v.instr and fast.instr:
            parts.append(f"{name} {fast.instr / v.instr - 1:+.1%} instructions")
        elif v.cpu and fast.cpu:
            d = statistics.median(fast.cpu) / statistics.median(v.cpu) - 1
            parts.append(f"{name} {d:+.1%} CPU")
    if not parts or not SPEED.exists():
        return ""
    return (f"; built for speed (opt-level 2, not \"z\") it would be {SPEED.stat().st_size:,} "
            f"bytes, and the paths would cost: {', '.join(parts)} (the `_speed` variants)")


# Why a goal is missed, when it is: the host's price for the hostcalls each path cannot do
# without (each priced by the probe variants in the same run, see `prices`).
REASONS = {
    "retry": "a retry replays the request's headers, and Envoy shows a filter none in the response "
             "phase, so the header map is copied at request time; the answer's `:status` is read on "
             "the way back: the floor is map_read + one_read",
    "configured": "the same header-map copy and `:status` read as `retry`; that one copy also serves "
                  "routing and keys",
    "routing": "`:method` (only writes are hashed) and a lookup for a client-supplied group header, "
               "which is absent: one_read + an absent lookup",
    "idempotency": "one lookup of the key header (absent on these GETs)",
    "kong_idempotency": "one lookup of the key header (absent on these GETs), as on Envoy "
                        "(`idempotency`); judged on Kong's host by the CPU median, within a "
                        "microsecond of the no-op filter's noise",
    "maintenance": "one clock read",
    "kong_maintenance": "one clock read, as on Envoy (`maintenance`); judged on Kong's host by "
                        "the CPU median, whose noise between runs is a few microseconds",
    "maint_notice": "one clock read; the notice is one more comparison outside its period",
    "maint_schedule": "one clock read and the `:path` read that tells the schedule path from the "
                      "rest (`:method` is read only on the schedule path): the floor is one_read "
                      "and the clock",
    "kong_configured": "with `retry` owning every method, every request is an exchange rollsafe owns "
                       "on Kong's host, and a GET's attempt is a dispatch (kong_dispatch_floor_1k); "
                       "`retry.methods` leaves reads to Kong (kong_configured_writes)",
    "configured_writes": "one clock read, `:method` (one_read) and the lookup of a client-supplied "
                         "group header, which is absent: the same floor as `routing`",
    "kong_configured_writes": "one clock read, `:method` and the group header's lookup",
    "kong_empty": "the price of any filter instance with a configuration on Kong's host (noisy: "
                  "CPU only, within a few µs of the no-op filter)",
    "owned_1k": "beside the floor, the calls rollsafe's design makes that the floor does not "
                "(owned_design_1k): the header map, the route's name, the timeout header, the "
                "counter, and the completion's read and second write (the index record beside "
                "the response; Envoy numbers shared-data writes across keys, so the bucket is "
                "read again), and the fingerprint's SipHash over the body, which its persisted "
                "formats pin (`hashes`); the rest is rollsafe's own wasm code: the bucket's records, the "
                "stored response's encoding, allocation (\"Where the instructions go\")",
    "kong_owned_1k": "every attempt on Kong's host is a dispatch_http_call on a new upstream "
                     "connection, so the floor alone (the no-op filter recording a claim, "
                     "dispatching the body with the request's headers, storing the reply and "
                     "answering with it, closing the client's connection after 32 requests as "
                     "rollsafe does) is far above plain "
                     "proxying, and the host keeps each call's buffers until the client's "
                     "connection closes (kong_dispatch_kept_1k); beside the floor, the calls rollsafe's "
                     "design makes that the floor does not (kong_owned_design_1k): the route's "
                     "id, the completion's second write (the index record beside the response, "
                     "which keeps the response's cas so that it is written without being read), "
                     "the counters, the fingerprint its persisted formats pin (kong_hashes); every "
                     "shared-data call walks a tree of the zone's entries "
                     "(kong_shared_read_full); the rest is rollsafe's own wasm code (the bucket's "
                     "records and the answer's copies, allocation: \"Kong's host: where the "
                     "worker's CPU goes\"), which costs more CPU per instruction than the "
                     "host's own code. Carrying attempt 1 by proxy_pass "
                     "(kong_proxied_1k, kong_proxy_floor_1k) is cheaper but leaves rollsafe no "
                     "retry of a keyed write on Kong's host",
    "replay_1k": "the calls a replay makes here cost more than the floor's: the header map (the "
                 "key, method, path, scope and digest), the route's name, the timeout header a "
                 "keyed write sets before its body is decided (Envoy's router does not take it "
                 "from the body callback), the key's index record beside the answer, the counter, "
                 "and the fingerprint its persisted formats pin (replay_design_1k); the rest is "
                 "rollsafe's own code: the stored response's checks as it is read back (it is "
                 "replayed in place), allocation",
    "kong_replay_1k": "the calls a replay makes here cost more than the floor's: the header map, the "
                      "route's id, the key's index record beside the answer, the counter, the "
                      "fingerprint its persisted formats pin (kong_replay_design_1k); the rest is "
                      "rollsafe's own code: the stored response's checks as it is read back (it "
                      "is replayed in place), allocation",
    "owned_redis_1k": "each Webdis call is a dispatch_http_call, and a keyed write makes two (claim, "
                      "completion), each an EVAL that Redis appends to its file before answering; "
                      "through the gateway's dispatch two calls take longer than two round trips "
                      "measured from a client (the floor)",
    "kong_owned_redis_1k": "as on Envoy, each Webdis call is a dispatch_http_call (on Kong's host "
                           "a new connection each, to a keep-alive proxy in front of Webdis) and "
                           "each command an EVAL Redis appends to its file; the floor makes the "
                           "same two calls as plain SETs around the dispatch floor's attempt",
}


def prices(vs: list[Variant]) -> list[str]:
    by = {v.name: v for v in vs}
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    noop, knoop = by.get("noop"), by.get("kong_noop")
    rows = []
    for name, what in [("one_read", "one request header"), ("map_read", "the request header map"),
                       ("property_read", "an absent property (xds.route_name)"),
                       ("hashes", "no hostcall: the hashes a keyed request's persisted formats "
                        "pin (SipHash-1-3 over a 1 KiB body and the request's parts: the "
                        "fingerprint; over the scope's parts: the caller's tag, whose scope "
                        "SHA-256 is computed once per caller)"),
                       ("shared_read", "1 KiB of shared data"),
                       ("shared_read_full", "1 KiB of shared data, a new one of 16,384 entries "
                        "each request (a full store; Kong's host walks a tree of them)")]:
        v, kv = by.get(name), by.get(f"kong_{name}")
        envoy = (f"{v.instr - noop.instr:+,.0f}" if v and noop and v.instr and noop.instr else "–")
        kong = (f"{med(kv.cpu) - med(knoop.cpu):+.1f}" if kv and knoop else "–")
        kong_instr = (f"{kv.instr - knoop.instr:+,.0f}"
                      if kv and knoop and kv.instr and knoop.instr else "–")
        rows.append(f"| {what} | {envoy} | {kong_instr} | {kong} |")
    return (["| hostcall (the no-op filter doing only this) | Envoy instructions per request | "
             "Kong's host instructions per request | Kong's host CPU µs per request (noisy) |",
             "|---|---:|---:|---:|"] + rows)


def profile() -> list[dict]:
    """The hostcalls each path makes, by kind: src/host/profile_tests.rs through the fake
    host, which records every call."""
    out = subprocess.run(["cargo", "test", "-q", "--profile", "fasttest", "--lib", "profile_paths",
                          "--", "--ignored", "--nocapture"], cwd=ROOT, capture_output=True,
                         text=True)
    return [json.loads(line.split(" ", 1)[1]) for line in out.stdout.splitlines()
            if line.startswith("PROFILE ")]


# The probe variant that prices one hostcall kind (its instructions over the no-op filter's).
PRICED = {"request header": "one_read", "request header map": "map_read",
          "property": "property_read", "shared data read": "shared_read",
          "hashes (no hostcall)": "hashes"}
# Paths whose request is keyed: they compute the hashes their formats pin once.
KEYED_PATHS = {"owned_1k", "kong_owned_1k", "replay_1k", "kong_replay_1k"}


def split(directory: Path, name: str) -> dict | None:
    """Envoy's instructions per request of a variant by where they ran: Envoy's binary, the
    wasm code V8 compiled (rollsafe's, or the probe's), other code in anonymous memory (Envoy
    without a filter runs some too: remapped text, V8's builtins) and libc. From callgrind's
    per-function totals: Envoy's binary is stripped, and compiled wasm runs from anonymous
    memory high in the address space."""
    files = sorted(directory.glob(f"callgrind-{name}.out*"))
    if not files:
        return None
    parts: dict[str, int] = {}
    for f in files:
        out = subprocess.run(["callgrind_annotate", "--threshold=100", str(f)],
                             capture_output=True, text=True).stdout
        rows = out.split("file:function", 1)[-1].splitlines()
        for line in rows:
            m = re.match(r"\s*([\d,]+) .*?\S+:(\S+) \[(.*?)\]", line)
            if not m:
                continue
            n, fn, obj = int(m.group(1).replace(",", "")), m.group(2).split("'")[0], m.group(3)
            if obj == "???":
                try:
                    where = "wasm code" if int(fn, 16) > 1 << 32 else "anonymous"
                except ValueError:
                    where = "anonymous"
            elif obj.endswith("envoy"):
                where = "Envoy"
            elif "libc" in obj:
                where = "libc"
            else:
                where = "other"
            parts[where] = parts.get(where, 0) + n
    return {k: v / CG_REQUESTS for k, v in parts.items()}


def split_rows(directory: Path) -> list[str]:
    names = ["plain_1k", "owned_floor_1k", "owned_design_1k", "owned_1k", "replay_floor_1k",
             "replay_design_1k", "replay_1k", "noop", "configured"]
    rows = ["| variant | Envoy's binary | wasm code (compiled by V8) | other anonymous code | libc "
            "| all |",
            "|---|---:|---:|---:|---:|---:|"]
    for name in names:
        sp = split(directory, name)
        if sp:
            rows.append(f"| {name} | {sp.get('Envoy', 0):,.0f} | {sp.get('wasm code', 0):,.0f} | "
                        f"{sp.get('anonymous', 0):,.0f} | {sp.get('libc', 0):,.0f} | "
                        f"{sum(sp.values()):,.0f} |")
    return rows if len(rows) > 2 else []


def profile_rows(vs: list[Variant], paths: list[dict]) -> list[str]:
    by = {v.name: v for v in vs}

    def prices(prefix: str) -> dict:
        """Each kind's price on one host: its probe variant over its no-op filter."""
        noop = by.get(f"{prefix}noop")
        return {kind: by[prefix + n].instr - noop.instr for kind, n in PRICED.items()
                if noop and noop.instr and prefix + n in by and by[prefix + n].instr}
    price = {"": prices(""), "kong_": prices("kong_")}
    rows = ["| path | hostcalls per request, by kind (and a keyed request's hashes) | priced "
            "(the host's instructions) | path's "
            "instructions over its reference | the rest: rollsafe's own code and unpriced calls |",
            "|---|---|---:|---:|---:|"]
    refs = {"configured": "noop", "configured_writes": "noop", "owned_1k": "plain_1k",
            "replay_1k": "direct_1k", "kong_owned_1k": "kong_plain_1k"}
    for p in paths:
        # (One request each: the profile leaves a keyed path's warm-up request out.)
        name, calls = p["path"], dict(p["hostcalls"])
        if name in KEYED_PATHS:
            calls["hashes (no hostcall)"] = 1
        kinds = ", ".join(f"{k} {n:g}" for k, n in sorted(calls.items()))
        host = "kong_" if name.startswith("kong_") else ""
        priced = sum(price[host].get(k, 0) * n for k, n in calls.items())
        v, ref = by.get(name), by.get(refs.get(name, ""))
        over = (v.instr - ref.instr) if v and ref and v.instr and ref.instr else None
        rest = f"{over - priced:+,.0f}" if over is not None else "–"
        rows.append(f"| {name} | {kinds} | {priced:,.0f} | "
                    f"{f'{over:+,.0f}' if over is not None else '–'} | {rest} |")
    return rows


def table(vs: list[Variant], host: str) -> list[str]:
    by = {v.name: v for v in vs}
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    cpu = "Envoy CPU" if host == "envoy" else "nginx CPU"
    rows = [f"| variant | what | rps | p50 ms | p99 ms | {cpu} µs/req | vs reference | "
            "instructions/req | vs reference |",
            "|---|---|---:|---:|---:|---:|---|---:|---|"]
    for v in vs:
        if v.host != host:
            continue
        ref = by.get(v.ref) if v.ref else None
        vs_ref = (f"{med(v.cpu) - med(ref.cpu):+.1f} µs vs {ref.name}, "
                  f"{med(v.cpu) / med(ref.cpu):.2f}× CPU, "
                  f"{med(v.rps) / med(ref.rps):.2f}× rps, {med(v.p50) / med(ref.p50):.2f}× p50"
                  if ref else "reference")
        instr = f"{v.instr:,.0f}" if v.instr else "–"
        vs_instr = (f"{v.instr - ref.instr:+,.0f} vs {ref.name}"
                    if ref and v.instr and ref.instr else "–")
        rows.append(f"| {v.name} | {v.what} | {med(v.rps):,.0f} | {med(v.p50):.2f} | "
                    f"{med(v.p99):.2f} | {med(v.cpu):.1f} | {vs_ref} | {instr} | {vs_instr} |")
    return rows


def report(vs: list[Variant], store: str | None, rtt: list[float], paths: list[dict],
           directory: Path | None = None) -> str:
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    goals = (["| host | goal | target | measured | verdict |", "|---|---|---|---|---|"]
             + verdicts(vs, rtt))
    rate = us_per_instruction(vs)
    calibration = (f"Instructions become microseconds at this run's own rate, "
                   f"{rate * 1000:.2f} µs of Envoy CPU per 1,000 instructions (the median slope of "
                   f"CPU time over instructions between each variant and its reference, where they "
                   f"differ by 40,000 instructions or more)." if rate else "")
    kong = any(v.host == "kong" for v in vs)
    by = {v.name: v for v in vs}
    # The shared store's paths, each keyed write followed by its floor (two Webdis SETs).
    stores = [w for v in vs if v.store
              for w in (v, by.get(v.floor) if v.goal == "store" else None) if w]
    text = [
        "# rollsafe benchmark results",
        "",
        f"Written by `make bench` on {datetime.date.today().isoformat()}: {machine()}.",
        ("Kong's host: " + kong_machine() + "." if kong else
         "Kong's host: SKIPPED (KONG_WASM_NGINX was not set)."),
        "Only ratios and differences within this one run mean anything: the machine is shared "
        "and noisy. Instructions are counted by callgrind (Envoy's process"
        + (", and on Kong's host its worker's" if any(v.instr for v in vs if v.host == "kong")
           else ", Envoy only in this run") +
        "; user space only, so not a dispatch's connection in the kernel) over a fixed "
        f"sequence of {CG_REQUESTS} requests sent one at a time, and repeat to a fraction of a "
        "percent.",
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
        "## Where the instructions go",
        "",
        "Hostcalls per request of each path, by kind, as the fake host records them "
        "(src/host/profile_tests.rs), priced with the probe's measures above; the rest is "
        "rollsafe's own work in the VM (hashing, encoding, copies) and the calls not priced here.",
        "",
        *profile_rows(vs, paths),
        "",
        "And by where they ran (callgrind's totals per object; per request):",
        "",
        *(split_rows(directory) if directory else []),
        "",
        "## Envoy: every path beside its reference",
        "",
        *table(vs, "envoy"),
    ]
    if kong:
        text += ["", "## Kong's host: every path beside its reference", "", *table(vs, "kong")]
        text += kong_profile_rows(vs)
    if stores:
        text += ["", "## The shared store", "",
                 f"Redis behind Webdis on loopback (Redis appends every write to its file with "
                 f"`appendfsync always`). One Webdis round trip (a SET, one connection, p50 of "
                 f"each round): {med(rtt):.2f} ms.", "",
                 "| variant | Webdis calls per request | p50 one at a time ms | p50 at 8 "
                 "connections ms | CPU µs/req |", "|---|---:|---:|---:|---:|"]
        def cell(x: float | None) -> str:
            return "–" if x is None else f"{x:.2f}"

        for v in stores:
            c1 = med(v.p50_c1) if v.p50_c1 else None
            calls = "2 (the floor's SETs)" if not v.store else cell(v.round_trips)
            text.append(f"| {v.name} | {calls} | {cell(c1)} | "
                        f"{med(v.p50):.2f} | {med(v.cpu):.1f} |")
    if store:
        text += ["", "## The store under a million keys", "", store]
    return "\n".join(text) + "\n"


KONG_PROFILED = ["kong_plain_1k", "kong_dispatch_floor_1k", "kong_owned_1k",
                 "kong_replay_floor_1k", "kong_replay_1k"]
KONG_WHERE = ["kernel", "nginx and ngx_wasm_module", "Wasmtime", "wasm code", "libc and the rest"]


def kong_profile_rows(vs: list[Variant]) -> list[str]:
    profiled = [v for v in vs if v.perf]
    if not profiled:
        return ["", "(Kong's host was not profiled: `perf` could not sample here.)"]
    rows = ["", "## Kong's host: where the worker's CPU goes", "",
            "perf's samples of the worker (cpu-clock) while wrk runs the variant, by where they "
            "fell; Wasmtime is its calls into and out of the VM (hostcalls), the wasm code is "
            "rollsafe's (or the probe's) as Wasmtime compiled it. Shares of the worker's CPU; "
            "the kernel's is mostly loopback networking.", "",
            "| variant | " + " | ".join(KONG_WHERE) + " |",
            "|---|" + "---:|" * len(KONG_WHERE)]
    for v in profiled:
        rows.append(f"| {v.name} | " + " | ".join(
            f"{v.perf['split'].get(k, 0.0):.1f}%" for k in KONG_WHERE) + " |")
    for v in profiled:
        if v.name in ("kong_owned_1k", "kong_replay_1k") and v.perf["wasm"]:
            rows += ["", f"rollsafe's wasm functions that took most on {v.name} (share of the "
                     "worker's CPU): " + "; ".join(
                         f"`{sym}` {pct:.1f}%" for pct, sym in v.perf["wasm"]) + "."]
    return rows


def kong_machine() -> str:
    out = subprocess.run([KONG_WASM_NGINX, "-v"], capture_output=True, text=True).stderr
    m = re.search(r"nginx/(\S+)", out)
    return (f"nginx {m.group(1) if m else '?'} with Kong's ngx_wasm_module (KONG_WASM_NGINX), one "
            f"worker, upstream keep-alive 64, CPU of the master and its worker from /proc")


README = ROOT / "README.md"
README_START, README_END = "<!-- make bench: start -->", "<!-- make bench: end -->"


def readme_block(text: str) -> None:
    """The README's performance summary is this run's: its header line and goals."""
    readme = README.read_text()
    if README_START not in readme or README_END not in readme:
        return
    lines = text.splitlines()
    goals = lines[lines.index("## Goals") + 2:]
    goals = goals[:goals.index("")]
    block = "\n".join([README_START, "", lines[2], lines[3], "", *goals, "", README_END])
    head, rest = readme.split(README_START, 1)
    README.write_text(head + block + rest.split(README_END, 1)[1])


def main() -> int:
    if os.environ.get("BENCH_REPORT"):
        # Writes RESULTS.md again from a run's bench.json (BENCH_REPORT: its directory).
        return report_again(Path(os.environ["BENCH_REPORT"]))
    for tool in ("wrk", "valgrind"):
        if not shutil.which(tool):
            print(f"{tool} is missing (make bench installs it)", file=sys.stderr)
            return 1
    if not PROBE.exists():
        print(f"{PROBE} is missing (make bench builds it)", file=sys.stderr)
        return 1
    global SOURCE  # noqa: PLW0603
    SOURCE = source_commit()
    if not KONG_WASM_NGINX:
        print("Kong's host: SKIPPED (set KONG_WASM_NGINX to an nginx built with ngx_wasm_module)",
              flush=True)
    harness = Harness(Path(os.environ["BENCH_DIR"]) if os.environ.get("BENCH_DIR") else None)
    # The gateways, pods, Redis and Webdis run in sessions of their own, so a signal to the
    # run's process group does not reach them: a run stopped by SIGTERM or SIGHUP unwinds
    # through `finally` below, as Ctrl-C does, and leaves nothing listening.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    try:
        pod = harness.pod("bench1", "bench")
        # The pod answers every request with 1 KiB, as the direct_response route does; /held
        # requests it keeps for an hour (the 409 variant's key in flight).
        pod.script({"status": 200, "delay_ms": 3_600_000, "path_prefix": "/held", "count": 100},
                   {"status": 200, "body": KIB, "count": 100_000_000})
        clusters = {"bench": [pod]}
        vs = variants(clusters)
        store = None
        if any(v.store for v in vs):
            store = harness.shared_store()
            clusters["store"] = [store]
        rtt = load(harness, vs, clusters, store)
        for v in vs:
            if v.store and v.fixed:
                v.round_trips = round_trips(harness, v, clusters, store)
                print(f"{v.name}: {v.round_trips:.2f} Webdis calls/request", flush=True)
        if CG_REQUESTS:
            # Two at a time: counts do not depend on what else runs.
            from concurrent.futures import ThreadPoolExecutor

            def count(v: Variant) -> None:
                v.instr = callgrind(harness, v, clusters)
                print(f"callgrind {v.name}: {v.instr:,.0f} instructions/request", flush=True)
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(count, [v for v in vs if v.fixed]))
        if KONG_WASM_NGINX and PERF:
            for v in vs:
                if v.name in KONG_PROFILED:
                    v.perf = kong_profile(harness, v, clusters)
                    print(f"perf {v.name}: {'done' if v.perf else 'no samples'}", flush=True)
        paths = profile()
        million = store_run(harness, clusters) if STORE_KEYS else None
        raw = {v.name: {"rps": v.rps, "cpu_us": v.cpu, "p50_ms": v.p50, "p99_ms": v.p99,
                        "p50_c1_ms": v.p50_c1, "instructions": v.instr,
                        "redis_commands": v.round_trips, "perf": v.perf} for v in vs}
        raw["webdis_rtt_ms"] = rtt
        raw["profile"] = paths
        raw["million"] = million
        raw["machine"] = machine()
        raw["wasm_size"] = wasm_size()
        raw["kong_machine"] = kong_machine() if KONG_WASM_NGINX else None
        (harness.dir / "bench.json").write_text(json.dumps(raw))
        print(f"raw figures: {harness.dir / 'bench.json'}")
        text = report(vs, million, rtt, paths, harness.dir)
        print("\n" + text)
        if not os.environ.get("BENCH_ONLY"):
            RESULTS.parent.mkdir(exist_ok=True)
            RESULTS.write_text(text)
            readme_block(text)
            print(f"written to {RESULTS.relative_to(ROOT)} and the README's summary")
    finally:
        harness.close()
    return 0


def report_again(directory: Path) -> int:
    raw = json.loads((directory / "bench.json").read_text())
    global machine, kong_machine, wasm_size  # noqa: PLW0603 (the run's, not this machine's now)
    machine = lambda: raw["machine"]  # noqa: E731
    # (A run from before wasm_size was recorded: read back from its machine line.)
    recorded = raw.get("wasm_size") or int(re.sub(
        ",", "", re.search(r"rollsafe\.wasm ([\d,]+) bytes", raw["machine"]).group(1)))
    wasm_size = lambda: recorded  # noqa: E731
    kong_machine = lambda: re.sub(  # noqa: E731 (no machine's paths in the results)
        r"^nginx \(.*?\)", "nginx 1.25.3 with Kong's ngx_wasm_module (KONG_WASM_NGINX)",
        raw["kong_machine"] or "")

    class Pod:  # the variants need only an address to be described
        address = "pod"
    every = variants({"bench": [Pod()]})
    if not KONG_WASM_NGINX:  # (the run's Kong variants, whatever this shell says)
        every += kong_variants({"bench": [Pod()]}, None, None)
    vs = [v for v in every if v.name in raw]
    for v in vs:
        r = raw[v.name]
        v.rps, v.cpu, v.p50, v.p99, v.p50_c1 = (r["rps"], r["cpu_us"], r["p50_ms"], r["p99_ms"],
                                                r["p50_c1_ms"])
        v.instr, v.round_trips = r["instructions"], r["redis_commands"]
        v.perf = r.get("perf")
    text = report(vs, raw["million"], raw["webdis_rtt_ms"], raw["profile"], directory)
    RESULTS.write_text(text)
    readme_block(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
