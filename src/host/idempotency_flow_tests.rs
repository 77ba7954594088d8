//! Keyed requests through the flow with a fake host (Envoy's shared-data CAS rules).

use super::fake::FakeHost;
use super::flow::{configure, Request, Verdict};
use super::{HostKind, HostShared, Metric};
use std::rc::Rc;

fn plan(host: &FakeHost, cfg: &str) -> Rc<crate::plan::Plan> {
    let plan = configure(host, cfg.as_bytes(), HostKind::Envoy).expect("config");
    if let Some(ip) = &plan.idempotency {
        crate::idempotency::create_slots(&HostShared(host), ip.slots);
    }
    Rc::new(plan)
}

const CFG: &str =
    r#"{"retry":{"exchange":"dispatch","target":"a"},"idempotency":{"max_response_bytes":8}}"#;

/// A keyed POST up to its first dispatch (or local answer).
fn keyed(host: &FakeHost, plan: &Rc<crate::plan::Plan>, key: &str, body: &[u8]) -> Request {
    let mut req = Request::new(Rc::clone(plan));
    let len = body.len().to_string();
    host.set_request(&[
        (":method", "POST"),
        (":path", "/orders"),
        ("content-length", &len),
        ("idempotency-key", key),
        ("authorization", "Bearer a"),
    ]);
    assert_eq!(req.on_request_headers(host, false), Verdict::Continue);
    host.set_body(body);
    req.on_request_body(host, body.len(), true);
    req
}

#[test]
fn completed_key_is_replayed_and_a_changed_body_is_422() {
    let host = FakeHost::at(1_000);
    let plan = plan(&host, CFG);
    let mut first = keyed(&host, &plan, "\"k\"", b"{}");
    host.answer_call(
        &[
            (":status", "201"),
            ("content-type", "application/json"),
            ("x-other", "no"),
        ],
        "{\"id\":1}",
    );
    first.on_call_response(&host, host.last_token(), 8);
    assert_eq!(host.counted(Metric::IdemStored), 1);

    keyed(&host, &plan, "\"k\"", b"{}");
    let sent = host.responses();
    let replay = sent.last().unwrap();
    assert_eq!(replay.status, 201);
    assert_eq!(replay.body, b"{\"id\":1}");
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.header("content-type"), Some("application/json"));
    assert_eq!(
        replay.header("x-other"),
        None,
        "only the replay headers are stored"
    );
    assert_eq!(
        host.dispatches().len(),
        1,
        "a replay never reaches the upstream"
    );

    keyed(&host, &plan, "\"k\"", b"{\"x\":2}");
    assert_eq!(host.responses().last().unwrap().status, 422);
}

#[test]
fn key_in_flight_is_409_with_retry_after_from_the_lease() {
    let host = FakeHost::at(1_000);
    let plan = plan(&host, CFG);
    let _running = keyed(&host, &plan, "\"k\"", b"{}");
    host.now.set(1_500);
    keyed(&host, &plan, "\"k\"", b"{}");
    let r = host.responses().last().unwrap().clone();
    assert_eq!(r.status, 409);
    assert_eq!(
        r.header("retry-after"),
        Some("30"),
        "29.5 s of lease left, rounded up"
    );
}

#[test]
fn a_5xx_releases_the_key_and_a_large_answer_is_stored_without_its_body() {
    let host = FakeHost::at(1_000);
    let plan = plan(&host, CFG);
    let mut req = keyed(&host, &plan, "\"k\"", b"{}");
    host.answer_call(&[(":status", "500")], "boom");
    req.on_call_response(&host, host.last_token(), 4);
    assert_eq!(host.counted(Metric::IdemReleased), 1);

    let mut again = keyed(&host, &plan, "\"k\"", b"{}");
    assert_eq!(host.dispatches().len(), 2, "released: the retry runs");
    host.answer_call(&[(":status", "200")], "a body longer than eight bytes");
    again.on_call_response(&host, host.last_token(), 30);

    keyed(&host, &plan, "\"k\"", b"{}");
    let replay = host.responses().last().unwrap().clone();
    assert_eq!(replay.status, 200);
    assert!(replay.body.is_empty());
    assert_eq!(replay.header("idempotent-replay-body"), Some("omitted"));
}

#[test]
fn a_keyed_post_is_retried_after_a_503_because_the_key_is_enforced() {
    let host = FakeHost::at(1_000);
    let plan = plan(
        &host,
        r#"{"retry":{"exchange":"dispatch","target":"a"},"idempotency":{}}"#,
    );
    let mut req = keyed(&host, &plan, "k", b"{}");
    host.answer_call(&[(":status", "503")], "draining");
    req.on_call_response(&host, host.last_token(), 8);
    assert_eq!(host.dispatches().len(), 2);
    assert_eq!(
        host.dispatches()[1].header("idempotency-key"),
        Some("k"),
        "forwarded unchanged"
    );
}

#[test]
fn bad_keys_are_400_and_nothing_is_sent() {
    let host = FakeHost::at(1_000);
    let plan = plan(
        &host,
        r#"{"retry":{"exchange":"dispatch","target":"a"},"idempotency":{"required":true}}"#,
    );
    let mut req = Request::new(Rc::clone(&plan));
    host.set_request(&[
        (":method", "POST"),
        (":path", "/o"),
        ("idempotency-key", "a"),
        ("Idempotency-Key", "b"),
    ]);
    assert_eq!(req.on_request_headers(&host, true), Verdict::Pause);
    let mut req = Request::new(plan);
    host.set_request(&[(":method", "PATCH"), (":path", "/o")]);
    assert_eq!(req.on_request_headers(&host, true), Verdict::Pause);
    assert!(host.responses().iter().all(|r| r.status == 400));
    assert_eq!(host.responses().len(), 2);
    assert!(host.dispatches().is_empty());
    assert_eq!(host.counted(Metric::IdemBadKey), 2);
}

#[test]
fn with_idempotency_alone_unkeyed_methods_pass_without_an_exchange() {
    let host = FakeHost::at(1_000);
    let plan = plan(&host, r#"{"idempotency":{}}"#);
    let mut req = Request::new(plan);
    host.set_request(&[(":method", "GET"), (":path", "/orders")]);
    assert_eq!(req.on_request_headers(&host, true), Verdict::Continue);
    assert_eq!(host.header_reads(), 1, "only :method is read");
    assert!(host.dispatches().is_empty());
}
