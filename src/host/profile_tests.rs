//! The hostcalls each benched path makes, by kind: `make bench` prices each kind with the
//! no-op filter on the real host and so splits a path's cost into the host's share and
//! rollsafe's own (bench/RESULTS.md, "Where the instructions go").
//!
//! `profile_paths` prints one JSON object per path (`cargo test --lib profile_paths --
//! --ignored --nocapture`); `hostcall_counts_stay_as_profiled` keeps the counts the profile
//! rests on from growing unnoticed.

use super::fake::{plan, FakeHost};
use super::flow::{Request, Verdict};
use super::HostKind;
use std::collections::BTreeMap;
use std::rc::Rc;

const KIB: [u8; 1024] = [b'x'; 1024];

/// The configs the bench runs (tests/e2e/bench.py), for the paths below.
const CONFIGURED_ENVOY: &str = r#"{"maintenance":{"windows":[{"start":"2099-01-01T00:00:00Z","end":"2099-01-01T02:00:00Z"}],"methods":["POST","PUT","PATCH","DELETE"]},"retry":{"attempts":3,"backoff":{"base_ms":25,"max_ms":500}},"idempotency":{"max_entries":1024},"routing":{"groups":[{"name":"a","target":"bench"},{"name":"b","target":"bench"}]}}"#;
const CONFIGURED_WRITES_ENVOY: &str = r#"{"maintenance":{"windows":[{"start":"2099-01-01T00:00:00Z","end":"2099-01-01T02:00:00Z"}],"methods":["POST","PUT","PATCH","DELETE"]},"retry":{"attempts":3,"backoff":{"base_ms":25,"max_ms":500},"methods":["POST","PUT","PATCH","DELETE"]},"idempotency":{"max_entries":1024},"routing":{"groups":[{"name":"a","target":"bench"},{"name":"b","target":"bench"}]}}"#;
const OWNED_ENVOY: &str = r#"{"retry":{"attempts":3,"backoff":{"base_ms":25,"max_ms":500}},"idempotency":{"max_entries":65536}}"#;
const OWNED_KONG: &str =
    r#"{"retry":{"attempts":3,"target":"bench:80"},"idempotency":{"max_entries":65536}}"#;
const KEYS_ONLY: &str = r#"{"idempotency":{"max_entries":65536}}"#;

type Calls = BTreeMap<&'static str, usize>;

fn taken(host: &FakeHost) -> Calls {
    std::mem::take(&mut *host.calls.borrow_mut())
}

/// A keyed POST of 1 KiB: headers, then its body.
fn keyed_post(host: &FakeHost, req: &mut Request, key: &str) -> Verdict {
    host.set_request(&[
        (":method", "POST"),
        (":path", "/bench"),
        (":authority", "bench"),
        ("content-type", "application/json"),
        ("content-length", "1024"),
        ("idempotency-key", key),
    ]);
    host.set_body(&KIB);
    if req.on_request_headers(host, false) == Verdict::Pause {
        return Verdict::Pause;
    }
    req.on_request_body(host, KIB.len(), true)
}

/// The upstream's 200 with 1 KiB: the route's response (Envoy) or the call's answer (Kong).
fn answered(host: &FakeHost, req: &mut Request) {
    let headers = [(":status", "200"), ("content-type", "application/json")];
    if req.pending_call().is_some() {
        host.answer_call(&headers, std::str::from_utf8(&KIB).unwrap_or_default());
        req.on_call_response(host, host.last_token(), KIB.len());
    } else {
        host.set_response(&headers);
        *host.response_body.borrow_mut() = KIB.to_vec();
        if req.on_response_headers(host, false) == Verdict::Continue {
            req.on_response_body(host, KIB.len(), true);
        }
    }
    req.on_done(host);
}

/// Each benched path once (the keyed ones after a warm-up request of the same kind, not
/// counted): its hostcalls by kind.
fn paths() -> Vec<(&'static str, Calls)> {
    let mut out = Vec::new();

    // configured: all four configured, a GET that triggers nothing; configured_writes: the
    // same with `retry.methods` writes only.
    for (name, cfg) in [
        ("configured", CONFIGURED_ENVOY),
        ("configured_writes", CONFIGURED_WRITES_ENVOY),
    ] {
        let host = FakeHost::at(1_000_000);
        let p = plan(&host, HostKind::Envoy, cfg);
        taken(&host);
        host.set_request(&[(":method", "GET"), (":path", "/bench"), (":authority", "b")]);
        let mut req = Request::new(Rc::clone(&p));
        req.on_request_headers(&host, true);
        host.set_response(&[(":status", "200")]);
        req.on_response_headers(&host, false);
        req.on_done(&host);
        out.push((name, taken(&host)));
    }

    for (name, kind, cfg) in [
        ("owned_1k", HostKind::Envoy, OWNED_ENVOY),
        ("kong_owned_1k", HostKind::Kong, OWNED_KONG),
    ] {
        let host = FakeHost::at(1_000_000);
        let p = plan(&host, kind, cfg);
        for i in 0..2 {
            taken(&host);
            let mut req = Request::new(Rc::clone(&p));
            keyed_post(&host, &mut req, &format!("\"k{i}\""));
            answered(&host, &mut req);
        }
        out.push((name, taken(&host)));
    }

    for (name, kind, cfg) in [
        ("replay_1k", HostKind::Envoy, KEYS_ONLY),
        ("kong_replay_1k", HostKind::Kong, OWNED_KONG),
    ] {
        let host = FakeHost::at(1_000_000);
        let p = plan(&host, kind, cfg);
        let mut first = Request::new(Rc::clone(&p));
        keyed_post(&host, &mut first, "\"bench-replay\"");
        answered(&host, &mut first);
        let answers = host.responses().len();
        for _ in 0..2 {
            taken(&host);
            let mut req = Request::new(Rc::clone(&p));
            keyed_post(&host, &mut req, "\"bench-replay\"");
            req.on_response_headers(&host, false);
            req.on_done(&host);
        }
        assert_eq!(host.responses().len(), answers + 2, "{name}: two replays");
        out.push((name, taken(&host)));
    }
    out
}

/// `PROFILE_REPEAT` (default 1).
fn repeat() -> usize {
    std::env::var("PROFILE_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// Runs the paths `PROFILE_REPEAT` times (default once): under callgrind, a native profile of
/// rollsafe's own code on each path (hashing, encoding, copies), which the host's JIT hides.
#[test]
#[ignore = "prints the profile for make bench"]
fn profile_paths() {
    let repeat = repeat();
    for _ in 1..repeat {
        std::hint::black_box(paths());
    }
    for (name, calls) in paths() {
        let calls: BTreeMap<String, usize> =
            calls.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        println!(
            "PROFILE {}",
            serde_json::json!({"path": name, "hostcalls": calls})
        );
    }
}

/// What each path costs the host, as profiled: a change that adds hostcalls to a path shows
/// here (and in bench/RESULTS.md) rather than only in a slower run.
#[test]
fn hostcall_counts_stay_as_profiled() {
    let total = |c: &Calls, kinds: &[&str]| -> usize {
        kinds.iter().map(|k| c.get(k).copied().unwrap_or(0)).sum()
    };
    for (name, calls) in paths() {
        let reads = total(
            &calls,
            &[
                "request header",
                "request header (absent)",
                "request header map",
            ],
        );
        let shared = total(&calls, &["shared data read", "shared data write"]);
        let clock = total(&calls, &["clock"]);
        // Clock reads: one per callback that needs the time, at most.
        let (max_reads, max_shared, max_clock) = match name {
            "configured" => (1, 0, 1),
            // `:method` and the group header's lookup; no map.
            "configured_writes" => (2, 0, 1),
            // The completion reads the bucket again (Envoy numbers writes across all keys).
            // Clock: the headers, the body (the key's decision and the attempt's lease), the
            // completion.
            "owned_1k" => (1, 5, 3),
            // The completion writes the bucket its claim kept (Kong's host counts each key's
            // writes) and the response under the cas the bucket keeps for it: the claim's read
            // and three writes.
            "kong_owned_1k" => (1, 4, 3),
            "replay_1k" | "kong_replay_1k" => (2, 2, 2),
            _ => (usize::MAX, usize::MAX, usize::MAX),
        };
        assert!(
            reads <= max_reads,
            "{name}: {reads} header reads: {calls:?}"
        );
        assert!(
            shared <= max_shared,
            "{name}: {shared} shared-data calls: {calls:?}"
        );
        assert!(clock <= max_clock, "{name}: {clock} clock reads: {calls:?}");
    }
}

/// One path `PROFILE_REPEAT` times on one plan (`PROFILE_PATH`: `replay`, the default, `owned`,
/// `kong_owned` or `configured_writes`), for callgrind with `--toggle-collect=*one_request*`:
/// rollsafe's own code per request, natively and without the plan's set-up (the host's JIT
/// hides it in `make bench`).
#[test]
#[ignore = "a profiling loop, run under callgrind"]
fn profile_loop() {
    let repeat = repeat();
    let path = std::env::var("PROFILE_PATH").unwrap_or_default();
    let path = match path.as_str() {
        "owned" => Path::Owned,
        "kong_owned" => Path::KongOwned,
        "configured_writes" => Path::Idle,
        _ => Path::Replay,
    };
    let host = FakeHost::at(1_000_000);
    let (kind, cfg) = match path {
        Path::Owned => (HostKind::Envoy, OWNED_ENVOY),
        Path::KongOwned => (HostKind::Kong, OWNED_KONG),
        Path::Replay => (HostKind::Envoy, KEYS_ONLY),
        Path::Idle => (HostKind::Envoy, CONFIGURED_WRITES_ENVOY),
    };
    let p = plan(&host, kind, cfg);
    let mut first = Request::new(Rc::clone(&p));
    keyed_post(&host, &mut first, "\"bench-replay\"");
    answered(&host, &mut first);
    for i in 0..repeat {
        one_request(&host, &p, path, i);
        host.calls.borrow_mut().clear();
    }
}

#[derive(Clone, Copy)]
enum Path {
    Owned,
    KongOwned,
    Replay,
    Idle,
}

#[inline(never)]
fn one_request(host: &FakeHost, p: &Rc<crate::plan::Plan>, path: Path, i: usize) {
    let mut req = Request::new(Rc::clone(p));
    match path {
        Path::Owned | Path::KongOwned => {
            keyed_post(host, &mut req, &format!("\"k{i}\""));
            answered(host, &mut req);
        }
        Path::Replay => {
            keyed_post(host, &mut req, "\"bench-replay\"");
            req.on_response_headers(host, false);
            req.on_done(host);
        }
        Path::Idle => {
            host.set_request(&[(":method", "GET"), (":path", "/bench"), (":authority", "b")]);
            req.on_request_headers(host, true);
            host.set_response(&[(":status", "200")]);
            req.on_response_headers(host, false);
            req.on_done(host);
        }
    }
}
