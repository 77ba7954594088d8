//! Keyed requests on the shared store through the flow: two fake hosts (two gateway nodes)
//! against one fake Redis behind a fake Webdis that runs the two scripts' semantics. What the
//! real Redis and Webdis do is the e2e suite's (`tests/e2e/test_shared_store.py`); this pins
//! the flow: what is held, what is dispatched, what is answered.

use super::fake::{Dispatched, FakeHost};
use super::flow::{Request, Verdict};
use super::headers::HeaderBlock;
use super::{HostKind, Level, Metric};
use crate::shared_store::{CLAIM_SCRIPT, SETTLE_SCRIPT};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A value and when it expires (ms).
type Entry = (Vec<u8>, u64);

/// Redis as the scripts see it.
#[derive(Default)]
struct Redis {
    data: RefCell<HashMap<Vec<u8>, Entry>>,
    down: std::cell::Cell<bool>,
}

fn unpercent(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            out.push(
                u8::from_str_radix(std::str::from_utf8(&s[i + 1..i + 3]).unwrap(), 16).unwrap(),
            );
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

impl Redis {
    /// Webdis's answer to one call: (HTTP status, body).
    fn answer(&self, call: &Dispatched, now: u64) -> (u16, Vec<u8>) {
        if self.down.get() {
            return (503, Vec::new());
        }
        let cmd = call.body.strip_suffix(b".raw").unwrap();
        let p: Vec<Vec<u8>> = cmd.split(|&b| b == b'/').map(unpercent).collect();
        assert_eq!(p[0], b"EVAL");
        let mut data = self.data.borrow_mut();
        data.retain(|_, (_, exp)| *exp > now);
        let key = p[3].clone();
        let reply: Vec<u8> = if p[1] == CLAIM_SCRIPT.as_bytes() {
            let deadline: u64 = std::str::from_utf8(&p[6]).unwrap().parse().unwrap();
            match data.get(&key) {
                _ if now > deadline => b"T".to_vec(),
                None => {
                    let lease: u64 = std::str::from_utf8(&p[5]).unwrap().parse().unwrap();
                    let memory: u64 = std::str::from_utf8(&p[7]).unwrap().parse().unwrap();
                    let mut marker = key.clone();
                    marker.push(b'~');
                    let doubt = data.contains_key(&marker);
                    data.insert(marker, (b"1".to_vec(), now + memory));
                    data.insert(key, (p[4].clone(), now + lease));
                    if doubt {
                        b"D".to_vec()
                    } else {
                        b"C".to_vec()
                    }
                }
                Some((v, exp)) => {
                    let mut r = format!("H{} ", exp - now).into_bytes();
                    r.extend_from_slice(v);
                    r
                }
            }
        } else if p[1] == SETTLE_SCRIPT.as_bytes() {
            match data.get(&key) {
                Some((v, _)) if v.get(..17) == Some(&p[4][..]) => {
                    let ms: u64 = std::str::from_utf8(&p[6]).unwrap().parse().unwrap();
                    if &p[5][..] != b"E" {
                        let mut marker = key.clone();
                        marker.push(b'~');
                        data.remove(&marker);
                    }
                    match &p[5][..] {
                        b"D" => {
                            data.remove(&key);
                        }
                        b"E" => {
                            let e = data.get_mut(&key).unwrap();
                            e.1 = e.1.max(now + ms);
                        }
                        _ => {
                            data.insert(key, (p[7].clone(), now + ms));
                        }
                    }
                    b"K".to_vec()
                }
                _ => b"L".to_vec(),
            }
        } else {
            panic!("unknown script");
        };
        let mut body = format!("${}\r\n", reply.len()).into_bytes();
        body.extend_from_slice(&reply);
        body.extend_from_slice(b"\r\n");
        (200, body)
    }
}

/// A plan on the shared store; `redis`: more of the `redis` section.
fn plan(host: &FakeHost, kind: HostKind, redis: &str) -> Rc<crate::plan::Plan> {
    let retry = match kind {
        HostKind::Kong => r#"{"target":"orders:80"}"#,
        HostKind::Envoy => r#"{"backoff":{"base_ms":1,"max_ms":1}}"#,
    };
    let cfg = format!(
        r#"{{"retry":{retry},"idempotency":{{"store":"redis","redis":{{"target":"webdis"{redis}}}}}}}"#
    );
    super::fake::plan(host, kind, &cfg)
}

fn post(host: &FakeHost, key: &str, body: &[u8]) {
    let len = body.len().to_string();
    host.set_request(&[
        (":method", "POST"),
        (":path", "/orders"),
        ("content-length", &len),
        ("idempotency-key", key),
    ]);
    host.set_body(body);
}

/// A keyed POST whose whole body arrived: its headers go on (the key waits for the body), and
/// the body callback decides. Returns the request and that callback's verdict.
fn arrive(host: &FakeHost, plan: &Rc<crate::plan::Plan>) -> (Request, Verdict) {
    let mut req = Request::new(Rc::clone(plan));
    assert_eq!(
        req.on_request_headers(host, false),
        Verdict::Continue,
        "the key waits for the body"
    );
    let size = host.request_body.borrow().len();
    let verdict = req.on_request_body(host, size, true);
    (req, verdict)
}

/// Delivers Webdis's answer to the call the request waits for.
fn webdis(host: &FakeHost, redis: &Redis, req: &mut Request) {
    let token = req.pending_call().expect("a call to Webdis");
    let call = host
        .dispatches()
        .into_iter()
        .find(|d| d.token == token)
        .unwrap();
    assert_eq!(call.target, "webdis");
    let (status, body) = redis.answer(&call, host.now.get());
    let size = body.len();
    *host.call.borrow_mut() = super::CallResponse {
        headers: HeaderBlock::from_raw(super::headers::serialize(&[(
            ":status",
            &status.to_string(),
        )])),
        body,
    };
    req.on_call_response(host, token, size);
}

/// One keyed POST on Envoy's native driver, answered 201 by the route.
fn envoy_write(host: &FakeHost, redis: &Redis, plan: &Rc<crate::plan::Plan>, key: &str) -> Request {
    post(host, key, b"{}");
    let (mut req, verdict) = arrive(host, plan);
    assert_eq!(
        verdict,
        Verdict::Pause,
        "the whole body is held for the claim"
    );
    assert_eq!(host.resumed_requests.get(), 0);
    webdis(host, redis, &mut req);
    assert_eq!(
        host.resumed_requests.get(),
        1,
        "claimed: the body goes on to the route"
    );
    host.set_response(&[(":status", "201"), ("content-type", "application/json")]);
    *host.response_body.borrow_mut() = b"{\"id\":1}".to_vec();
    assert_eq!(req.on_response_headers(host, false), Verdict::Continue);
    assert_eq!(
        req.on_response_body(host, 8, true),
        Verdict::Pause,
        "the answer waits for its record"
    );
    webdis(host, redis, &mut req);
    assert_eq!(host.resumed_responses.get(), 1);
    assert_eq!(host.counted(Metric::IdemStored), 1);
    req
}

#[test]
fn a_key_completed_on_one_node_is_replayed_on_another_and_then_from_its_cache() {
    let redis = Redis::default();
    let a = FakeHost::at(1_000);
    let b = FakeHost::at(1_000);
    let plan_a = plan(&a, HostKind::Envoy, "");
    let plan_b = plan(&b, HostKind::Envoy, "");
    envoy_write(&a, &redis, &plan_a, "k");

    post(&b, "k", b"{}");
    let (mut req, verdict) = arrive(&b, &plan_b);
    assert_eq!(verdict, Verdict::Pause);
    webdis(&b, &redis, &mut req);
    assert_eq!(b.resumed_requests.get(), 0, "never reaches the route");
    let replay = b.responses().last().cloned().unwrap();
    assert_eq!((replay.status, &replay.body[..]), (201, &b"{\"id\":1}"[..]));
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));

    // Node B now holds the completed record itself: no call at all.
    let calls = b.dispatches().len();
    assert_eq!(arrive(&b, &plan_b).1, Verdict::Pause);
    assert_eq!(b.dispatches().len(), calls);
    assert_eq!(b.responses().last().unwrap().status, 201);
    assert_eq!(b.counted(Metric::IdemCacheHit), 1);
    // So does node A, from its own completion.
    post(&a, "k", b"{}");
    let calls = a.dispatches().len();
    arrive(&a, &plan_a);
    assert_eq!(a.dispatches().len(), calls);
    assert_eq!(a.responses().last().unwrap().status, 201);
}

#[test]
fn a_key_in_flight_on_one_node_is_409_on_the_other() {
    let redis = Redis::default();
    let a = FakeHost::at(1_000);
    let b = FakeHost::at(1_000);
    let plan_a = plan(&a, HostKind::Envoy, "");
    let plan_b = plan(&b, HostKind::Envoy, "");
    post(&a, "k", b"{}");
    let (mut first, _) = arrive(&a, &plan_a);
    webdis(&a, &redis, &mut first);
    post(&b, "k", b"{}");
    let (mut second, _) = arrive(&b, &plan_b);
    webdis(&b, &redis, &mut second);
    let r = b.responses().last().cloned().unwrap();
    assert_eq!(r.status, 409);
    assert_eq!(
        r.header("retry-after"),
        Some("30"),
        "the lease left, rounded up"
    );
    // A different body under the key: 422 wins.
    post(&b, "k", b"{\"x\":1}");
    let (mut third, _) = arrive(&b, &plan_b);
    webdis(&b, &redis, &mut third);
    assert_eq!(b.responses().last().unwrap().status, 422);
    // And a body of the same length with other content.
    post(&b, "k", b"[]");
    let (mut fourth, _) = arrive(&b, &plan_b);
    webdis(&b, &redis, &mut fourth);
    assert_eq!(b.responses().last().unwrap().status, 422);
}

#[test]
fn on_kong_the_claim_waits_for_the_whole_body_then_the_attempt_is_dispatched() {
    let redis = Redis::default();
    let host = FakeHost::at(1_000);
    let plan = plan(&host, HostKind::Kong, "");
    post(&host, "k", b"{}");
    let mut req = Request::new(Rc::clone(&plan));
    assert_eq!(
        req.on_request_headers(&host, false),
        Verdict::Continue,
        "pausing here would starve the filter of the body"
    );
    assert!(host.dispatches().is_empty());
    assert_eq!(req.on_request_body(&host, 2, true), Verdict::Pause);
    assert_eq!(host.dispatches().len(), 1, "the claim");
    webdis(&host, &redis, &mut req);
    let attempt = host.dispatches().last().cloned().unwrap();
    assert_eq!(attempt.target, "orders:80");
    assert_eq!(attempt.body, b"{}");
    host.answer_call(&[(":status", "201")], "made");
    req.on_call_response(&host, attempt.token, 4);
    assert!(
        host.responses().is_empty(),
        "the answer waits for its record"
    );
    webdis(&host, &redis, &mut req);
    assert_eq!(host.responses().last().unwrap().status, 201);
    assert_eq!(host.counted(Metric::IdemStored), 1);
}

#[test]
fn an_unavailable_store_fails_closed_or_open_as_configured() {
    let redis = Redis::default();
    redis.down.set(true);
    for kind in [HostKind::Envoy, HostKind::Kong] {
        for open in [false, true] {
            let host = FakeHost::at(1_000);
            let extra = if open {
                r#","when_unavailable":"fail-open""#
            } else {
                ""
            };
            let plan = plan(&host, kind, extra);
            post(&host, "k", b"");
            let mut req = Request::new(Rc::clone(&plan));
            req.on_request_headers(&host, true);
            webdis(&host, &redis, &mut req);
            assert_eq!(host.counted(Metric::IdemStoreUnavailable), 1);
            // Reached an upstream: the route (Envoy's native driver) or a dispatched attempt.
            let reached = host.resumed_requests.get() + host.dispatches().len() - 1;
            if open {
                assert!(host.responses().is_empty(), "{kind:?}");
                assert_eq!(host.counted(Metric::IdemFailOpen), 1);
                assert_eq!(reached, 1, "{kind:?}: run once, unprotected");
            } else {
                let r = host.responses().last().cloned().unwrap();
                assert_eq!(r.status, 503, "{kind:?}");
                assert_eq!(r.header("retry-after"), Some("1"));
                assert_eq!(reached, 0, "{kind:?}: no upstream contact");
                assert!(
                    host.later.borrow().is_empty(),
                    "Webdis said the claim did not land"
                );
            }
        }
    }
}

#[test]
fn an_outage_is_counted_for_every_request_and_logged_once_a_period() {
    let redis = Redis::default();
    redis.down.set(true);
    for kind in [HostKind::Envoy, HostKind::Kong] {
        let host = FakeHost::at(1_000);
        let plan = plan(&host, kind, r#","when_unavailable":"fail-open""#);
        let lines = |what: &str| {
            host.logs_at(Level::Warn)
                .into_iter()
                .filter(|m| m.contains(what))
                .collect::<Vec<_>>()
        };
        let request = |at: u64| {
            host.now.set(at);
            post(&host, "k", b"");
            let mut req = Request::new(Rc::clone(&plan));
            req.on_request_headers(&host, true);
            webdis(&host, &redis, &mut req);
        };
        for i in 0..5 {
            request(1_000 + i);
        }
        assert_eq!(host.counted(Metric::IdemStoreUnavailable), 5, "{kind:?}");
        assert_eq!(host.counted(Metric::IdemFailOpen), 5, "{kind:?}");
        let down = lines("idempotency store unavailable");
        assert_eq!(
            down.len(),
            1,
            "{kind:?}: one line for five requests: {down:?}"
        );
        assert!(!down[0].contains("more like it"), "{kind:?}: {down:?}");
        assert_eq!(lines("runs unprotected").len(), 1, "{kind:?}");
        // A period later the next is written, with the four held back.
        request(1_000 + crate::warnings::PERIOD_MS);
        let down = lines("idempotency store unavailable");
        assert_eq!(down.len(), 2, "{kind:?}: {down:?}");
        assert!(
            down[1].ends_with("(4 more like it not logged since the last)"),
            "{kind:?}: {down:?}"
        );
        assert_eq!(host.counted(Metric::IdemFailOpen), 6, "{kind:?}");
    }
}

#[test]
fn a_claim_that_timed_out_is_refused_should_it_land_late_and_released_besides() {
    let redis = Redis::default();
    let host = FakeHost::at(1_000);
    let plan = plan(&host, HostKind::Envoy, "");
    post(&host, "k", b"{}");
    let (mut req, _) = arrive(&host, &plan);
    let claim = host.dispatches().last().cloned().unwrap();
    host.answer_call(&[(":dispatch_status", "timeout")], "");
    req.on_call_response(&host, claim.token, 0);
    assert_eq!(host.responses().last().unwrap().status, 503);
    assert_eq!(
        host.later.borrow().len(),
        1,
        "the release, should the claim land"
    );
    // Webdis runs the queued claim long after: past its deadline, it does not land.
    assert_eq!(redis.answer(&claim, 1_000 + 250 + 1_001).1, b"$1\r\nT\r\n");
    assert!(redis.data.borrow().is_empty());
}

#[test]
fn a_client_that_leaves_while_the_claim_is_asked_releases_it_from_the_root() {
    let host = FakeHost::at(1_000);
    let plan = plan(&host, HostKind::Envoy, "");
    post(&host, "k", b"{}");
    let (mut req, _) = arrive(&host, &plan);
    req.on_done(&host);
    let later = host.later.borrow();
    assert_eq!(later.len(), 1);
    let release = String::from_utf8_lossy(&later[0].body).into_owned();
    assert!(release.starts_with("EVAL/"), "{release}");
    assert!(
        release.contains("/D/0//0.raw"),
        "a release by this owner: {release}"
    );
}

#[test]
fn a_gateway_that_died_with_a_write_in_flight_leaves_the_key_held_then_in_doubt() {
    let redis = Redis::default();
    let a = FakeHost::at(1_000);
    let b = FakeHost::at(1_000);
    let plan_a = plan(&a, HostKind::Envoy, "");
    let plan_b = plan(&b, HostKind::Envoy, "");
    // Node A claims and sends the write, then dies: nothing of it is settled.
    post(&a, "k", b"{}");
    let (mut first, _) = arrive(&a, &plan_a);
    webdis(&a, &redis, &mut first);
    assert_eq!(a.resumed_requests.get(), 1);
    drop(first);
    // The client's retry on node B within the lease: 409.
    b.now.set(10_000);
    post(&b, "k", b"{}");
    let (mut second, _) = arrive(&b, &plan_b);
    webdis(&b, &redis, &mut second);
    assert_eq!(b.responses().last().unwrap().status, 409);
    // After the lease: it runs, in doubt, and says so to the application.
    b.now.set(1_000 + 30_000 + 1);
    post(&b, "k", b"{}");
    let (mut third, _) = arrive(&b, &plan_b);
    webdis(&b, &redis, &mut third);
    // Its own attempt, dispatched with the header (the route's request saw nothing).
    assert_eq!(b.resumed_requests.get(), 0);
    let attempt = b.dispatches().last().cloned().unwrap();
    assert_ne!(attempt.target, "webdis");
    assert_eq!(attempt.header("idempotency-in-doubt"), Some("true"));
    assert_eq!(attempt.body, b"{}");
    assert_eq!(b.counted(Metric::IdemInDoubt), 1);
}

#[test]
fn a_route_that_answers_while_the_claim_is_asked_releases_the_claim_should_it_land() {
    // Envoy without the buffer filter: the router may answer (say, every pod refused) while
    // rollsafe still asks the store for the key; nothing of the body reached it.
    let host = FakeHost::at(1_000);
    let plan = plan(&host, HostKind::Envoy, "");
    post(&host, "k", b"{}");
    let (mut req, verdict) = arrive(&host, &plan);
    assert_eq!(verdict, Verdict::Pause, "claim asked");
    host.set_response(&[(":status", "503")]);
    assert_eq!(req.on_response_headers(&host, false), Verdict::Continue);
    assert_eq!(
        req.pending_call(),
        None,
        "the claim's answer is no longer awaited"
    );
    let later = host.later.borrow();
    assert_eq!(later.len(), 1, "the claim is released should it land");
    assert!(String::from_utf8_lossy(&later[0].body).contains("/D/"));
    assert!(
        host.dispatches().iter().all(|d| d.target == "webdis"),
        "no attempt"
    );
}

#[test]
fn store_calls_the_host_refuses_are_logged_once_a_period() {
    for kind in [HostKind::Envoy, HostKind::Kong] {
        let host = FakeHost::at(1_000);
        host.dispatch_fails.set(true);
        let plan = plan(&host, kind, r#","when_unavailable":"fail-open""#);
        for i in 0..5 {
            host.now.set(1_000 + i);
            post(&host, "k", b"");
            let mut req = Request::new(Rc::clone(&plan));
            req.on_request_headers(&host, true);
            assert!(
                req.pending_call().is_none(),
                "{kind:?}: nothing to wait for"
            );
        }
        assert_eq!(host.counted(Metric::IdemFailOpen), 5, "{kind:?}");
        let refused: Vec<String> = host
            .logs_at(Level::Error)
            .into_iter()
            .filter(|m| m.contains("cannot call the idempotency store"))
            .collect();
        assert_eq!(
            refused.len(),
            1,
            "{kind:?}: one line for five requests: {refused:?}"
        );
    }
}
