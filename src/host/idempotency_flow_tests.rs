//! Keyed requests through the flow with a fake host, on both drivers: Kong's (every attempt
//! dispatched) and Envoy's native one (attempt 1 is the route's own request, which starts when
//! rollsafe lets the whole body go on to the buffer filter and the router). "Reaches an
//! upstream" means exactly that: a body that continues on Envoy, or a dispatch.

use super::fake::FakeHost;
use super::flow::{configure, Request, Verdict};
use super::{HostKind, Level, Metric};
use std::rc::Rc;

use super::fake::plan;

/// Both drivers with the same idempotency section.
fn drivers(idem: &str) -> [(HostKind, String); 2] {
    [
        (
            HostKind::Kong,
            format!(r#"{{"retry":{{"target":"orders:80"}},"idempotency":{idem}}}"#),
        ),
        (
            HostKind::Envoy,
            format!(r#"{{"retry":{{"backoff":{{"base_ms":1,"max_ms":1}}}},"idempotency":{idem}}}"#),
        ),
    ]
}

struct Sent {
    req: Request,
    /// Whether the request reached an upstream (a route request started, or a dispatch).
    upstream: bool,
}

/// A keyed POST through request headers and, when they go on, its whole body.
fn keyed(
    host: &FakeHost,
    plan: &Rc<crate::plan::Plan>,
    path: &str,
    key: &str,
    body: &[u8],
) -> Sent {
    let mut req = Request::new(Rc::clone(plan));
    let len = body.len().to_string();
    host.set_request(&[
        (":method", "POST"),
        (":path", path),
        ("content-length", &len),
        ("idempotency-key", key),
        ("authorization", "Bearer a"),
    ]);
    let dispatched = host.dispatches().len();
    let verdict = req.on_request_headers(host, false);
    let mut upstream = false;
    if verdict == Verdict::Continue {
        // The key is decided once the body is whole; on Envoy the body going on is what
        // starts the route's request (the buffer filter after rollsafe holds it until then).
        host.set_body(body);
        let body_verdict = req.on_request_body(host, body.len(), true);
        upstream = plan.host == HostKind::Envoy && body_verdict == Verdict::Continue;
    }
    upstream |= host.dispatches().len() > dispatched;
    Sent { req, upstream }
}

/// The upstream answers the attempt in flight: the call response on Kong, the route's
/// response on Envoy. (`x-other` is no header a replay repeats.)
fn upstream_answers(host: &FakeHost, sent: &mut Sent, status: &str, body: &str) {
    let headers = [
        (":status", status),
        ("content-type", "application/json"),
        ("x-other", "o"),
    ];
    if sent.req.pending_call().is_some() {
        host.answer_call(&headers, body);
        sent.req
            .on_call_response(host, host.last_token(), body.len());
    } else {
        host.set_response(&headers);
        *host.response_body.borrow_mut() = body.as_bytes().to_vec();
        if sent.req.on_response_headers(host, false) == Verdict::Continue {
            sent.req.on_response_body(host, body.len(), true);
        }
    }
}

#[test]
fn a_completed_key_is_replayed_or_422_once_the_body_is_whole_without_reaching_an_upstream() {
    for (kind, cfg) in drivers(r#"{"max_response_bytes":64}"#) {
        let host = FakeHost::at(1_000);
        let plan = plan(&host, kind, &cfg);
        let mut first = keyed(&host, &plan, "/orders", "\"k\"", b"{}");
        assert!(first.upstream, "{kind:?}");
        upstream_answers(&host, &mut first, "201", "{\"id\":1}");
        assert_eq!(host.counted(Metric::IdemStored), 1, "{kind:?}");
        if kind == HostKind::Kong {
            // (Envoy's route answers the client itself.)
            let answer = host.responses().last().cloned().unwrap();
            assert_eq!(
                answer.header("x-other"),
                Some("o"),
                "the answer is passed on"
            );
        }
        let dispatched = host.dispatches().len();

        let again = keyed(&host, &plan, "/orders", "\"k\"", b"{}");
        assert!(!again.upstream, "{kind:?}: a replay reaches no upstream");
        let replay = host.responses().last().cloned().unwrap();
        assert_eq!(replay.status, 201);
        assert_eq!(replay.body, b"{\"id\":1}");
        assert_eq!(replay.header("idempotent-replayed"), Some("true"));
        assert_eq!(replay.header("content-type"), Some("application/json"));
        assert_eq!(
            replay.header("x-other"),
            None,
            "{kind:?}: only replay_headers are kept"
        );

        // Another body (of the same length too), another path: 422.
        for (path, body) in [
            ("/orders", &b"{\"x\":2}"[..]),
            ("/orders", &b"[]"[..]),
            ("/other", &b"{}"[..]),
        ] {
            let other = keyed(&host, &plan, path, "\"k\"", body);
            assert!(!other.upstream, "{kind:?}: a 422 reaches no upstream");
            assert_eq!(
                host.responses().last().unwrap().status,
                422,
                "{kind:?} {path}"
            );
        }
        assert_eq!(host.dispatches().len(), dispatched, "{kind:?}");
        assert_eq!(host.counted(Metric::IdemReplayed), 1);
        assert_eq!(host.counted(Metric::IdemMismatch), 3);
    }
}

#[test]
fn a_key_in_flight_is_409_with_retry_after_from_the_lease_and_reaches_no_upstream() {
    for (kind, cfg) in drivers("{}") {
        let host = FakeHost::at(1_000);
        let plan = plan(&host, kind, &cfg);
        let running = keyed(&host, &plan, "/orders", "\"k\"", b"{}");
        assert!(running.upstream);
        host.now.set(1_500);
        let dup = keyed(&host, &plan, "/orders", "\"k\"", b"{}");
        assert!(!dup.upstream, "{kind:?}: a duplicate reaches no upstream");
        let r = host.responses().last().unwrap().clone();
        assert_eq!(r.status, 409);
        assert_eq!(
            r.header("retry-after"),
            Some("30"),
            "29.5 s of lease left, rounded up"
        );
        // A different request under a key in flight: 422 wins over 409.
        keyed(&host, &plan, "/orders", "\"k\"", b"{\"x\":1}");
        assert_eq!(host.responses().last().unwrap().status, 422);
    }
}

#[test]
fn a_5xx_releases_the_key_and_a_large_answer_is_stored_without_its_body() {
    for (kind, cfg) in drivers(r#"{"max_response_bytes":8}"#) {
        let host = FakeHost::at(1_000);
        let plan = plan(&host, kind, &cfg);
        let mut req = keyed(&host, &plan, "/orders", "\"k\"", b"{}");
        upstream_answers(&host, &mut req, "500", "boom");
        assert_eq!(host.counted(Metric::IdemReleased), 1, "{kind:?}");

        let mut again = keyed(&host, &plan, "/orders", "\"k\"", b"{}");
        assert!(
            again.upstream,
            "{kind:?}: released, so the client's next try runs"
        );
        upstream_answers(&host, &mut again, "200", "a body longer than eight bytes");

        let replayed = keyed(&host, &plan, "/orders", "\"k\"", b"{}");
        assert!(!replayed.upstream);
        let replay = host.responses().last().unwrap().clone();
        assert_eq!(replay.status, 200);
        assert!(replay.body.is_empty());
        assert_eq!(replay.header("idempotent-replay-body"), Some("omitted"));
    }
}

#[test]
fn a_keyed_post_is_retried_after_a_503_because_the_key_is_enforced() {
    for (kind, cfg) in drivers("{}") {
        let host = FakeHost::at(1_000);
        let plan = plan(&host, kind, &cfg);
        let mut req = keyed(&host, &plan, "/orders", "k", b"{}");
        upstream_answers(&host, &mut req, "503", "draining");
        if let Some(at) = req.req.take_wake() {
            host.now.set(at);
            req.req.on_wake(&host);
        }
        let d = host.dispatches();
        let retry = d.last().expect("a retry was dispatched");
        assert_eq!(
            retry.header("idempotency-key"),
            Some("k"),
            "forwarded unchanged"
        );
        assert_eq!(retry.body, b"{}", "with the whole body");
        host.answer_call(&[(":status", "201")], "made");
        req.req.on_call_response(&host, host.last_token(), 4);
        assert_eq!(host.responses().last().unwrap().status, 201, "{kind:?}");
        assert_eq!(host.counted(Metric::IdemStored), 1);
    }
}

#[test]
fn bad_keys_are_400_and_reach_no_upstream() {
    for (kind, cfg) in drivers(r#"{"required":true}"#) {
        let host = FakeHost::at(1_000);
        let plan = plan(&host, kind, &cfg);
        let mut req = Request::new(Rc::clone(&plan));
        host.set_request(&[
            (":method", "POST"),
            (":path", "/o"),
            ("content-length", "2"),
            ("idempotency-key", "a"),
            ("Idempotency-Key", "b"),
        ]);
        // Decided once the body is whole, so the answer keeps the client's connection.
        assert_eq!(req.on_request_headers(&host, false), Verdict::Continue);
        host.set_body(b"{}");
        assert_eq!(req.on_request_body(&host, 2, true), Verdict::Pause);
        let mut req = Request::new(plan);
        host.set_request(&[
            (":method", "PATCH"),
            (":path", "/o"),
            ("content-length", "2"),
        ]);
        assert_eq!(req.on_request_headers(&host, false), Verdict::Continue);
        assert_eq!(req.on_request_body(&host, 2, true), Verdict::Pause);
        assert!(host.responses().iter().all(|r| r.status == 400));
        assert_eq!(host.responses().len(), 2);
        assert!(host.dispatches().is_empty());
        assert_eq!(host.counted(Metric::IdemBadKey), 2);
    }
}

#[test]
fn a_stale_owners_completion_is_refused() {
    // lease 2 s covers the exchange (one attempt of at most 1 s).
    let cfg = r#"{"retry":{"attempts":1,"per_try_timeout_ms":1000,"deadline_ms":1000},"idempotency":{"lease_ms":2000}}"#;
    let host = FakeHost::at(1_000);
    let plan = plan(&host, HostKind::Envoy, cfg);
    host.rng.set(1); // each request draws its owner token
    let mut stale = keyed(&host, &plan, "/orders", "k", b"{}");
    host.rng.set(2);
    // The first holder stalls past its lease (its host lost it); the client's retry claims.
    host.now.set(3_500);
    let mut fresh = keyed(&host, &plan, "/orders", "k", b"{}");
    assert!(fresh.upstream, "the lease ran out, so the next try runs");
    upstream_answers(&host, &mut stale, "201", "stale");
    assert_eq!(
        host.counted(Metric::IdemStored),
        0,
        "the stale owner wrote nothing"
    );
    assert!(host
        .logs_at(Level::Warn)
        .iter()
        .any(|l| l.contains("no longer held")));
    upstream_answers(&host, &mut fresh, "201", "fresh");
    assert_eq!(host.counted(Metric::IdemStored), 1);
    keyed(&host, &plan, "/orders", "k", b"{}");
    assert_eq!(host.responses().last().unwrap().body, b"fresh");
}

#[test]
fn a_lease_shorter_than_the_exchange_is_refused_at_configure_time() {
    let host = FakeHost::default();
    let cfg = r#"{"retry":{"attempts":2,"per_try_timeout_ms":2000,"deadline_ms":3000},"idempotency":{"lease_ms":1000}}"#;
    assert!(configure(&host, cfg.as_bytes(), HostKind::Envoy).is_none());
    let err = &host.logs_at(Level::Error)[0];
    assert!(
        err.starts_with("rollsafe: idempotency.lease_ms: must cover the longest exchange (3000 ms"),
        "{err}"
    );
    // Idempotency alone: one attempt of the default 5 s.
    assert!(configure(
        &host,
        br#"{"idempotency":{"lease_ms":1000}}"#,
        HostKind::Envoy
    )
    .is_none());
    assert!(configure(
        &host,
        br#"{"idempotency":{"lease_ms":5000}}"#,
        HostKind::Envoy
    )
    .is_some());
}

#[test]
fn a_client_gone_before_its_body_was_whole_leaves_the_key_free() {
    let (kind, cfg) = drivers("{}")[1].clone();
    let host = FakeHost::at(1_000);
    let plan = plan(&host, kind, &cfg);
    let mut req = Request::new(Rc::clone(&plan));
    host.set_request(&[
        (":method", "POST"),
        (":path", "/orders"),
        ("content-length", "4"),
        ("idempotency-key", "k"),
    ]);
    assert_eq!(req.on_request_headers(&host, false), Verdict::Continue);
    host.set_body(b"da");
    assert_eq!(req.on_request_body(&host, 2, false), Verdict::Pause);
    req.on_done(&host);
    // The key is decided once the body is whole: nothing was claimed, so nothing holds it.
    assert_eq!(host.counted(Metric::IdemReleased), 0);
    // A request that reached the application keeps its key until the lease ends.
    let mut whole = keyed(&host, &plan, "/orders", "k", b"data");
    assert!(whole.upstream);
    whole.req.on_done(&host);
    assert!(!keyed(&host, &plan, "/orders", "k", b"data").upstream);
    assert_eq!(host.responses().last().unwrap().status, 409);
}

/// Kong's host with no attempt target (no `retry.target`, no usable Service): nginx's
/// `proxy_pass` carries the keyed write, and its answer is kept from the response phase, the
/// headers a replay repeats read from the answer's map at once.
#[test]
fn on_kong_without_a_target_proxy_pass_carries_the_write_and_its_answer_is_replayed() {
    let host = FakeHost::at(1_000);
    let plan = plan(&host, HostKind::Kong, r#"{"retry":{},"idempotency":{}}"#);
    let mut first = keyed(&host, &plan, "/orders", "\"k\"", b"{}");
    assert!(host.dispatches().is_empty(), "nothing to dispatch to");
    assert!(
        host.responses().is_empty(),
        "the write goes on to proxy_pass"
    );
    host.calls.borrow_mut().clear();
    host.set_response(&[
        (":status", "201"),
        ("content-type", "application/json"),
        ("location", "/orders/1"),
        ("x-other", "o"),
    ]);
    *host.response_body.borrow_mut() = b"{\"id\":1}".to_vec();
    assert_eq!(
        first.req.on_response_headers(&host, false),
        Verdict::Continue
    );
    assert_eq!(
        first.req.on_response_body(&host, 8, true),
        Verdict::Continue
    );
    {
        let calls = host.calls.borrow();
        assert_eq!(calls.get("response header map"), Some(&1), "{calls:?}");
        assert_eq!(calls.get("response header"), None, "{calls:?}");
    }
    assert_eq!(host.counted(Metric::IdemStored), 1);
    assert!(
        host.logs_at(Level::Info)
            .iter()
            .all(|l| !l.contains("carried by proxy_pass")),
        "a first attempt is not logged"
    );

    let again = keyed(&host, &plan, "/orders", "\"k\"", b"{}");
    assert!(!again.upstream);
    let replay = host.responses().last().cloned().unwrap();
    assert_eq!(replay.status, 201);
    assert_eq!(replay.body, b"{\"id\":1}");
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.header("content-type"), Some("application/json"));
    assert_eq!(replay.header("location"), Some("/orders/1"));
    assert_eq!(
        replay.header("x-other"),
        None,
        "only replay_headers are kept"
    );
}

#[test]
fn with_idempotency_alone_unkeyed_methods_pass_without_an_exchange() {
    let host = FakeHost::at(1_000);
    let plan = plan(&host, HostKind::Envoy, r#"{"idempotency":{}}"#);
    let mut req = Request::new(plan);
    host.set_request(&[(":method", "GET"), (":path", "/orders")]);
    assert_eq!(req.on_request_headers(&host, true), Verdict::Continue);
    assert_eq!(host.header_reads(), 1, "only :method is read");
    assert!(host.dispatches().is_empty());
}

#[test]
fn on_kong_the_default_scope_separates_consumers() {
    // Kong's auth plugins identify consumers without an Authorization header.
    let (kind, cfg) = drivers("{}")[0].clone();
    let host = FakeHost::at(1_000);
    let plan = plan(&host, kind, &cfg);
    let send = |consumer: &str| {
        let mut req = Request::new(Rc::clone(&plan));
        host.set_request(&[
            (":method", "POST"),
            (":path", "/orders"),
            ("content-length", "2"),
            ("idempotency-key", "k"),
            ("x-consumer-id", consumer),
        ]);
        let dispatched = host.dispatches().len();
        if req.on_request_headers(&host, false) == Verdict::Continue {
            host.set_body(b"{}");
            req.on_request_body(&host, 2, true);
        }
        host.answer_call(&[(":status", "201")], "made");
        req.on_call_response(&host, host.last_token(), 4);
        host.dispatches().len() > dispatched
    };
    assert!(send("alice"));
    assert!(send("bob"), "another consumer's key is its own");
    assert!(!send("alice"), "alice's repeat is replayed");
    // Envoy keeps the configured default (route and Authorization).
    let envoy = configure(&host, br#"{"idempotency":{}}"#, HostKind::Envoy).unwrap();
    assert_eq!(envoy.idempotency.unwrap().scope.len(), 2);
}

#[test]
fn on_envoy_the_lease_is_renewed_while_the_routes_attempt_is_out() {
    // The route's own attempt is bounded by the route's timeout, which rollsafe cannot see:
    // while it is out, the lease is renewed on the root tick, so no second execution starts.
    let (kind, cfg) = drivers(r#"{"lease_ms":20000}"#)[1].clone();
    let host = FakeHost::at(1_000);
    let plan = plan(&host, kind, &cfg);
    host.rng.set(1);
    let mut slow = keyed(&host, &plan, "/orders", "k", b"{}");
    assert!(slow.upstream);
    let wake = slow.req.take_wake().expect("a renewal is scheduled");
    assert_eq!(wake, 1_000 + 10_000, "when half the lease is left");
    host.now.set(wake);
    slow.req.on_wake(&host);
    let next = slow.req.take_wake().expect("and the next one");
    assert!(next > wake);
    // Past the first lease's end, the key is still held: a duplicate gets 409.
    host.now.set(25_000);
    host.rng.set(2);
    assert!(!keyed(&host, &plan, "/orders", "k", b"{}").upstream);
    assert_eq!(host.responses().last().unwrap().status, 409);
    // Once the route answers, renewals stop and the answer completes the key.
    upstream_answers(&host, &mut slow, "201", "made");
    host.now.set(next);
    slow.req.on_wake(&host);
    assert_eq!(slow.req.take_wake(), None);
    assert_eq!(host.counted(Metric::IdemStored), 1);
}

#[test]
fn with_keys_alone_a_request_without_a_key_is_left_alone_after_one_lookup() {
    let host = FakeHost::at(1_000);
    let plan = plan(&host, HostKind::Envoy, r#"{"idempotency":{}}"#);
    let mut req = Request::new(Rc::clone(&plan));
    host.set_request(&[
        (":method", "POST"),
        (":path", "/o"),
        ("content-length", "2"),
    ]);
    assert_eq!(req.on_request_headers(&host, false), Verdict::Continue);
    assert_eq!(host.header_reads(), 1, "one lookup of the key header");
    // The body is not held: it streams to the route.
    host.set_body(b"{}");
    assert_eq!(req.on_request_body(&host, 2, true), Verdict::Continue);
    assert!(host.dispatches().is_empty() && host.responses().is_empty());
    // With a key, the key is claimed and its answer stored as before.
    let mut sent = keyed(&host, &plan, "/o", "\"k\"", b"{}");
    assert!(sent.upstream);
    upstream_answers(&host, &mut sent, "201", "{}");
    assert_eq!(host.counted(Metric::IdemStored), 1);
}

#[test]
fn the_flow_drives_the_key_through_its_lifecycle_on_both_drivers() {
    use crate::idempotency::lifecycle::Phase;
    for (kind, cfg) in drivers("{}") {
        let host = FakeHost::at(1_000);
        let plan = plan(&host, kind, &cfg);
        // Headers only: nothing is decided before the body is whole.
        let mut req = Request::new(Rc::clone(&plan));
        host.set_request(&[
            (":method", "POST"),
            (":path", "/orders"),
            ("content-length", "2"),
            ("idempotency-key", "\"life\""),
            ("authorization", "Bearer a"),
        ]);
        assert_eq!(req.on_request_headers(&host, false), Verdict::Continue);
        assert_eq!(req.key_phase(), None, "{kind:?}: no key before the body");
        host.set_body(b"{}");
        req.on_request_body(&host, 2, true);
        assert_eq!(
            req.key_phase(),
            Some(Phase::Sent),
            "{kind:?}: claimed, then sent whole"
        );
        let mut sent = Sent {
            req,
            upstream: true,
        };
        upstream_answers(&host, &mut sent, "201", "{}");
        assert_eq!(sent.req.key_phase(), Some(Phase::Completed), "{kind:?}");

        // The same again: refused with the replay, its own key never held.
        let again = keyed(&host, &plan, "/orders", "\"life\"", b"{}");
        assert_eq!(
            again.req.key_phase(),
            None,
            "{kind:?}: a replay holds no key"
        );
        assert_eq!(host.responses().last().unwrap().status, 201);

        // A 5xx releases; a client gone after its attempt was sent leaves the key to its lease.
        let mut failing = keyed(&host, &plan, "/orders", "\"life-2\"", b"{}");
        upstream_answers(&host, &mut failing, "500", "no");
        assert_eq!(failing.req.key_phase(), Some(Phase::Released), "{kind:?}");
        let mut gone = keyed(&host, &plan, "/orders", "\"life-3\"", b"{}");
        gone.req.on_done(&host);
        assert_eq!(gone.req.key_phase(), Some(Phase::LeftToLease), "{kind:?}");
    }
}

/// The in-doubt header on the last attempt: a try in doubt with a body is dispatched on both
/// hosts (Envoy takes no header change once the request headers went on).
fn carries_in_doubt(host: &FakeHost) -> bool {
    host.dispatches()
        .last()
        .is_some_and(|d| d.header("idempotency-in-doubt") == Some("true"))
}

#[test]
fn a_key_left_to_its_lease_is_in_doubt_on_the_next_try_and_says_so() {
    for (kind, cfg) in drivers(r#"{"lease_ms":30000}"#) {
        let host = FakeHost::at(1_000);
        let plan = plan(&host, kind, &cfg);
        // Sent whole, then the client went away: the application may be executing it.
        let mut gone = keyed(&host, &plan, "/orders", "\"doubt\"", b"{}");
        assert!(gone.upstream);
        gone.req.on_done(&host);
        // Within the lease: 409.
        host.now.set(20_000);
        let held = keyed(&host, &plan, "/orders", "\"doubt\"", b"{}");
        assert!(!held.upstream, "{kind:?}");
        assert_eq!(host.responses().last().unwrap().status, 409);
        // After it: the next try runs, and tells the application it is in doubt.
        host.now.set(1_000 + 30_000 + 15_000 + 1);
        *host.set_request_headers.borrow_mut() = vec![];
        let next = keyed(&host, &plan, "/orders", "\"doubt\"", b"{}");
        assert!(next.upstream, "{kind:?}");
        assert!(carries_in_doubt(&host), "{kind:?}");
        assert_eq!(host.counted(Metric::IdemInDoubt), 1, "{kind:?}");
        // A key that was released (a 5xx: nothing ran) is not in doubt.
        let mut failed = keyed(&host, &plan, "/orders", "\"plain\"", b"{}");
        upstream_answers(&host, &mut failed, "500", "no");
        let before = host.dispatches().len();
        keyed(&host, &plan, "/orders", "\"plain\"", b"{}");
        assert!(
            host.dispatches()[before..]
                .iter()
                .all(|d| d.header("idempotency-in-doubt").is_none()),
            "{kind:?}"
        );
        assert_eq!(host.counted(Metric::IdemInDoubt), 1, "{kind:?}");
    }
}
