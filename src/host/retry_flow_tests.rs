//! The exchange drivers driven natively through the flow with a fake host.

use super::fake::FakeHost;
use super::flow::{configure, Request, Verdict};
use super::scheduler::Scheduler;
use super::{HostKind, Level, Metric};
use std::cell::RefCell;
use std::rc::Rc;

fn request(host: &FakeHost, kind: HostKind, retry: &str) -> Request {
    configured(host, kind, &format!(r#"{{"retry": {retry}}}"#))
}

/// A request under a whole configuration.
fn configured(host: &FakeHost, kind: HostKind, cfg: &str) -> Request {
    Request::new(Rc::new(
        configure(host, cfg.as_bytes(), kind).expect("config"),
    ))
}

/// A write with a body, taken through request headers and the whole body.
fn send_with_body(host: &FakeHost, req: &mut Request, method: &str, path: &str, body: &[u8]) {
    keyed_write(host, req, method, path, None, body);
}

/// A write with a body (and an idempotency key, when given), taken through request headers and
/// the whole body; the body callback's verdict.
fn keyed_write(
    host: &FakeHost,
    req: &mut Request,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &[u8],
) -> Verdict {
    let len = body.len().to_string();
    let mut headers = vec![
        (":method", method),
        (":path", path),
        ("content-length", &len),
    ];
    if let Some(k) = key {
        headers.push(("idempotency-key", k));
    }
    host.set_request(&headers);
    assert_eq!(req.on_request_headers(host, false), Verdict::Continue);
    host.set_body(body);
    req.on_request_body(host, body.len(), true)
}

const DISPATCH: &str =
    r#"{"target":"group-a","exchange":"dispatch","attempt_count_header":"x-attempts"}"#;
const NATIVE: &str =
    r#"{"target":"group-a","exchange":"native","backoff":{"base_ms":10,"max_ms":10,"min_ms":100}}"#;

#[test]
fn dispatch_get_retries_at_once_and_answers_with_the_last_upstream_answer() {
    let host = FakeHost::at(1_000);
    let mut req = request(&host, HostKind::Envoy, DISPATCH);
    host.set_request(&[
        (":method", "GET"),
        (":path", "/a?b=1"),
        (":authority", "api"),
        ("x-trace", "t1"),
    ]);
    // No body: the first attempt goes out from request headers, which stay paused.
    assert_eq!(req.on_request_headers(&host, true), Verdict::Pause);
    let d = host.dispatches();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].target, "group-a");
    assert_eq!(d[0].header(":path"), Some("/a?b=1"));
    assert_eq!(d[0].header(":authority"), Some("api"));
    assert_eq!(d[0].header("x-trace"), Some("t1"));
    assert_eq!(d[0].timeout_ms, 5_000);

    host.answer_call(&[(":status", "503"), ("retry-after", "2")], "busy");
    req.on_call_response(&host, host.last_token(), 4);
    // Immediate re-dispatch, no wait on this driver.
    assert_eq!(host.dispatches().len(), 2);
    assert!(host.responses().is_empty());

    host.answer_call(
        &[
            (":status", "200"),
            ("content-type", "text/plain"),
            ("connection", "keep-alive"),
            ("content-length", "2"),
        ],
        "ok",
    );
    req.on_call_response(&host, host.last_token(), 2);
    let sent = host.responses();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].status, 200);
    assert_eq!(sent[0].body, b"ok");
    assert_eq!(sent[0].header("content-type"), Some("text/plain"));
    assert_eq!(
        sent[0].header("connection"),
        None,
        "hop-by-hop headers are not copied"
    );
    assert_eq!(sent[0].header("content-length"), None);
    assert_eq!(sent[0].header("x-attempts"), Some("2"));
    assert_eq!(
        host.counted(Metric::Attempts),
        2,
        "attempts rollsafe sent itself"
    );
    assert_eq!(host.counted(Metric::Retry503), 1);
    // The local reply passes back through the response callback untouched.
    assert_eq!(req.on_response_headers(&host, false), Verdict::Continue);
}

#[test]
fn dispatch_exhausted_attempts_keep_the_upstreams_retry_after() {
    let host = FakeHost::at(1_000);
    let mut req = request(
        &host,
        HostKind::Kong,
        r#"{"target":"orders:8080","attempts":2}"#,
    );
    host.set_request(&[(":method", "GET"), (":path", "/")]);
    // Kong: no end_of_stream, no body framing: no body.
    assert_eq!(req.on_request_headers(&host, false), Verdict::Pause);
    for _ in 0..2 {
        host.answer_call(&[(":status", "503"), ("retry-after", "2")], "busy");
        req.on_call_response(&host, host.last_token(), 4);
    }
    assert_eq!(host.dispatches().len(), 2);
    let sent = host.responses();
    assert_eq!(sent[0].status, 503);
    assert_eq!(sent[0].header("retry-after"), Some("2"));
    assert_eq!(host.counted(Metric::RetryGaveUp), 1);
}

#[test]
fn dispatch_post_with_body_is_held_whole_and_not_retried_after_it_may_have_arrived() {
    let host = FakeHost::at(1_000);
    let mut req = request(&host, HostKind::Kong, r#"{"target":"orders:80"}"#);
    host.set_request(&[
        (":method", "POST"),
        (":path", "/orders"),
        ("content-length", "11"),
    ]);
    assert_eq!(req.on_request_headers(&host, false), Verdict::Continue);
    host.set_body(b"hello world");
    assert_eq!(req.on_request_body(&host, 5, false), Verdict::Pause);
    assert!(host.dispatches().is_empty());
    assert_eq!(req.on_request_body(&host, 11, true), Verdict::Pause);
    assert_eq!(host.dispatches()[0].body, b"hello world");
    host.answer_call(&[(":status", "503")], "busy");
    req.on_call_response(&host, host.last_token(), 4);
    assert_eq!(
        host.dispatches().len(),
        1,
        "POST is not retried after a 503"
    );
    assert_eq!(host.responses()[0].status, 503);
}

#[test]
fn native_post_is_retried_with_its_body_when_the_connection_was_refused() {
    let host = FakeHost::at(1_000);
    let mut req = request(&host, HostKind::Envoy, NATIVE);
    send_with_body(&host, &mut req, "POST", "/orders", b"{}");
    host.set_response(&[(":status", "503")]);
    host.set_property(
        "response.code_details",
        "upstream_reset_before_response_started{remote_connection_failure}",
    );
    assert_eq!(req.on_response_headers(&host, false), Verdict::Pause);
    let wake = req.take_wake().expect("backoff");
    host.now.set(wake);
    req.on_wake(&host);
    assert_eq!(host.dispatches()[0].body, b"{}");
    host.answer_call(&[(":status", "201")], "made");
    req.on_call_response(&host, host.last_token(), 4);
    assert_eq!(host.responses()[0].status, 201);
    assert_eq!(host.counted(Metric::RetryConnectFailure), 1);
}

#[test]
fn kong_body_not_handed_over_is_never_treated_as_empty() {
    let host = FakeHost::at(1_000);
    let cfg = r#"{"target":"orders:8080","body_too_large":"reject"}"#;
    let mut req = request(&host, HostKind::Kong, cfg);
    host.set_request(&[
        (":method", "PUT"),
        (":path", "/orders/1"),
        ("content-length", "20000"),
    ]);
    assert_eq!(req.on_request_headers(&host, false), Verdict::Continue);
    // nginx spilled the body to a file: the filter gets nothing.
    assert_eq!(req.on_request_body(&host, 0, true), Verdict::Pause);
    assert!(host.dispatches().is_empty());
    let sent = host.responses();
    assert_eq!(sent[0].status, 413);
    assert_eq!(
        sent[0].header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(host.counted(Metric::BodyTooLarge), 1);
}

#[test]
fn body_over_the_limit_can_pass_through_unprotected() {
    let host = FakeHost::at(1_000);
    let cfg = r#"{"target":"t","exchange":"dispatch","max_body_bytes":4,"body_too_large":"pass-through"}"#;
    let mut req = request(&host, HostKind::Envoy, cfg);
    host.set_request(&[
        (":method", "PUT"),
        (":path", "/x"),
        ("transfer-encoding", "chunked"),
    ]);
    assert_eq!(req.on_request_headers(&host, false), Verdict::Continue);
    assert_eq!(req.on_request_body(&host, 10, false), Verdict::Continue);
    assert_eq!(req.on_response_headers(&host, false), Verdict::Continue);
    assert!(host.dispatches().is_empty() && host.responses().is_empty());
}

#[test]
fn bodies_over_the_limit_are_counted_each_and_logged_once_a_period() {
    // A client sending oversized bodies as fast as it can: each is answered as configured and
    // counted, but writes one line a period, whichever way the route takes them.
    for (mode, level) in [
        ("reject", Level::Warn),
        ("pass-through", Level::Warn),
        ("stream", Level::Info),
    ] {
        for kind in [HostKind::Envoy, HostKind::Kong] {
            let host = FakeHost::at(1_000);
            let cfg = format!(
                r#"{{"target":"orders:8080","max_body_bytes":1000,"body_too_large":"{mode}"}}"#
            );
            let oversized = |at: u64| {
                host.now.set(at);
                let mut req = request(&host, kind, &cfg);
                host.set_request(&[
                    (":method", "PUT"),
                    (":path", "/orders/1"),
                    ("content-length", "20000"),
                ]);
                if req.on_request_headers(&host, false) == Verdict::Continue {
                    req.on_request_body(&host, 0, true);
                }
            };
            let lines = || {
                host.logs_at(level)
                    .into_iter()
                    .filter(|m| m.contains("request body"))
                    .collect::<Vec<_>>()
            };
            for i in 0..4 {
                oversized(1_000 + i);
            }
            assert_eq!(host.counted(Metric::BodyTooLarge), 4, "{mode} {kind:?}");
            if mode == "reject" {
                assert_eq!(host.responses().len(), 4, "{mode} {kind:?}: four 413s");
            }
            assert_eq!(lines().len(), 1, "{mode} {kind:?}: {:?}", lines());
            oversized(1_000 + crate::warnings::PERIOD_MS);
            let lines = lines();
            assert_eq!(lines.len(), 2, "{mode} {kind:?}: {lines:?}");
            assert!(
                lines[1].ends_with("(3 more like it not logged since the last)"),
                "{mode} {kind:?}: {lines:?}"
            );
        }
    }
}

#[test]
fn dispatch_failures_without_an_answer_end_in_a_problem() {
    let host = FakeHost::at(1_000);
    let mut req = request(&host, HostKind::Kong, r#"{"target":"orders:8080"}"#);
    host.set_request(&[(":method", "GET"), (":path", "/slow")]);
    req.on_request_headers(&host, false);
    for _ in 0..3 {
        host.answer_call(&[(":dispatch_status", "timeout")], "");
        req.on_call_response(&host, host.last_token(), 0);
    }
    let sent = host.responses();
    assert_eq!(sent[0].status, 504);
    // Kong's host: answered from a failed call's callback, so the problem is in a header.
    let problem: serde_json::Value =
        serde_json::from_str(sent[0].header("x-rollsafe-problem").unwrap()).unwrap();
    assert_eq!(problem["attempts"], 3);
    assert_eq!(host.counted(Metric::RetryTimeout), 2);
}

#[test]
fn native_retry_waits_its_backoff_then_answers_from_the_dispatched_attempt() {
    let host = FakeHost::at(1_000);
    let mut req = request(&host, HostKind::Envoy, NATIVE);
    host.set_request(&[
        (":method", "DELETE"),
        (":path", "/orders/1"),
        (":authority", "api"),
    ]);
    assert_eq!(req.on_request_headers(&host, true), Verdict::Continue);
    assert!(
        host.set_request_headers.borrow().is_empty(),
        "nothing written per request"
    );
    host.set_response(&[(":status", "503")]);
    host.set_property("response.code_details", "via_upstream");
    assert_eq!(req.on_response_headers(&host, false), Verdict::Pause);
    let wake = req.take_wake().expect("a backoff is scheduled");
    assert!(
        (1_100..1_110).contains(&wake),
        "min 100 ms + jitter under 10 ms: {wake}"
    );
    assert!(
        host.dispatches().is_empty(),
        "nothing is sent before the backoff ends"
    );

    host.now.set(wake);
    req.on_wake(&host);
    let d = host.dispatches();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].header(":method"), Some("DELETE"));
    assert_eq!(d[0].header(":path"), Some("/orders/1"));
    assert_eq!(d[0].header(":authority"), Some("api"));
    host.answer_call(&[(":status", "200")], "done");
    req.on_call_response(&host, req.pending_call().unwrap(), 4);
    assert_eq!(host.responses()[0].status, 200);
    assert_eq!(host.responses()[0].body, b"done");
}

#[test]
fn native_success_passes_through_without_any_call() {
    let host = FakeHost::at(1_000);
    let mut req = request(&host, HostKind::Envoy, NATIVE);
    host.set_request(&[(":method", "GET"), (":path", "/")]);
    assert_eq!(req.on_request_headers(&host, true), Verdict::Continue);
    host.set_response(&[(":status", "200")]);
    assert_eq!(req.on_response_headers(&host, false), Verdict::Continue);
    assert!(host.dispatches().is_empty() && host.responses().is_empty());
    assert_eq!(
        host.header_reads(),
        1,
        "one read of the header map, kept for a retry and used for every header-time decision"
    );
}

#[test]
fn native_is_refused_on_kongs_host() {
    let host = FakeHost::default();
    let cfg = r#"{"retry":{"target":"t","exchange":"native"}}"#;
    assert!(configure(&host, cfg.as_bytes(), HostKind::Kong).is_none());
    assert!(host.logs_at(super::Level::Error)[0].starts_with("rollsafe: retry.exchange: native"));
}

#[test]
fn a_client_that_goes_away_mid_exchange_leaves_nothing_behind() {
    let host = FakeHost::at(1_000);
    let scheduler = Scheduler::default();
    let req = Rc::new(RefCell::new(request(&host, HostKind::Envoy, NATIVE)));
    host.set_request(&[(":method", "GET"), (":path", "/")]);
    req.borrow_mut().on_request_headers(&host, true);
    host.set_response(&[(":status", "502")]);
    assert_eq!(
        req.borrow_mut().on_response_headers(&host, false),
        Verdict::Pause
    );
    scheduler.track(7, &req, false);
    assert_eq!(scheduler.len(), 1);

    // Backoff over: the root dispatches for the request; the call is routed back by token.
    let due = scheduler.due(5_000);
    assert_eq!(due.len(), 1);
    let (id, r) = &due[0];
    assert_eq!(*id, 7);
    r.borrow_mut().on_wake(&host);
    scheduler.track(7, r, true);
    drop(due);
    let token = host.last_token();

    // The client disconnects: the SDK drops the context.
    drop(req);
    assert!(
        scheduler.take_call(token).is_none(),
        "a late answer finds nobody"
    );
    assert!(scheduler.due(10_000).is_empty());
    assert!(scheduler.is_empty());
    assert!(host.responses().is_empty());
}

#[test]
fn stale_or_duplicate_call_answers_are_ignored() {
    let host = FakeHost::at(1_000);
    let mut req = request(&host, HostKind::Envoy, DISPATCH);
    host.set_request(&[(":method", "GET"), (":path", "/")]);
    req.on_request_headers(&host, true);
    host.answer_call(&[(":status", "200")], "ok");
    req.on_call_response(&host, 9_999, 2);
    assert!(host.responses().is_empty());
    let token = host.last_token();
    req.on_call_response(&host, token, 2);
    req.on_call_response(&host, token, 2);
    assert_eq!(host.responses().len(), 1);
}

#[test]
fn native_request_with_a_body_goes_to_the_route_whole_and_retries_are_dispatched() {
    let host = FakeHost::at(1_000);
    let mut req = request(&host, HostKind::Envoy, NATIVE);
    host.set_request(&[(":method", "PUT"), (":path", "/p"), ("content-length", "4")]);
    // The headers go on (the route's request starts); the body is held until it is whole and
    // then released in one piece: the upstream never sees part of it.
    assert_eq!(req.on_request_headers(&host, false), Verdict::Continue);
    host.set_body(b"da");
    assert_eq!(req.on_request_body(&host, 2, false), Verdict::Pause);
    host.set_body(b"data");
    assert_eq!(req.on_request_body(&host, 4, true), Verdict::Continue);
    assert!(
        host.dispatches().is_empty(),
        "attempt 1 is the route's own request"
    );
    // The route's pod was draining: its 503 is held, and the retry waits its backoff.
    host.set_response(&[(":status", "503")]);
    host.set_property("response.code_details", "via_upstream");
    assert_eq!(req.on_response_headers(&host, false), Verdict::Pause);
    let wake = req.take_wake().expect("backoff");
    assert!(wake >= 1_100);
    host.now.set(wake - 1);
    req.on_wake(&host);
    assert!(host.dispatches().is_empty(), "not before the backoff ends");
    host.now.set(wake);
    req.on_wake(&host);
    let d = host.dispatches();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].body, b"data", "the retry carries the held copy");
    host.answer_call(&[(":status", "200")], "ok");
    req.on_call_response(&host, host.last_token(), 2);
    assert_eq!(host.responses()[0].status, 200);
    assert_eq!(host.counted(Metric::RouteRequestAborted), 0);
}

#[test]
fn on_envoy_a_request_with_a_body_is_never_copied_beside_the_routes_own() {
    // `exchange: dispatch` on Envoy: the route's request has started with the headers, so a
    // request with a body goes to the route whole (a dispatched copy beside it could run too).
    let host = FakeHost::at(1_000);
    let mut req = request(&host, HostKind::Envoy, DISPATCH);
    host.set_request(&[
        (":method", "POST"),
        (":path", "/p"),
        ("content-length", "2"),
    ]);
    assert_eq!(req.on_request_headers(&host, false), Verdict::Continue);
    host.set_body(b"{}");
    assert_eq!(req.on_request_body(&host, 2, true), Verdict::Continue);
    assert!(host.dispatches().is_empty());
    host.set_response(&[(":status", "201")]);
    assert_eq!(req.on_response_headers(&host, false), Verdict::Continue);
    assert!(host.responses().is_empty());
}

#[test]
fn route_answering_before_the_body_is_whole_passes_through_instead_of_hanging() {
    let host = FakeHost::at(1_000);
    let mut req = request(&host, HostKind::Envoy, NATIVE);
    host.set_request(&[
        (":method", "POST"),
        (":path", "/p"),
        ("content-length", "4"),
    ]);
    req.on_request_headers(&host, false);
    // Envoy's router gave up on the route (every pod refused) before the body arrived.
    assert_eq!(req.on_response_headers(&host, false), Verdict::Continue);
    assert!(host.dispatches().is_empty() && host.responses().is_empty());
    assert_eq!(host.counted(Metric::RetryGaveUp), 1);
}

#[test]
fn without_a_target_envoy_attempts_follow_the_routes_cluster() {
    let host = FakeHost::at(1_000);
    let mut req = request(&host, HostKind::Envoy, r#"{"exchange":"dispatch"}"#);
    host.set_property("xds.cluster_name", "group-b");
    host.set_request(&[(":method", "GET"), (":path", "/b/1")]);
    req.on_request_headers(&host, true);
    assert_eq!(host.dispatches()[0].target, "group-b");
}

const SERVICE: &str = r#"{"id":"9a1","name":"orders","protocol":"http","host":"orders.shop.svc.cluster.local","port":8080,"connect_timeout":60000,"read_timeout":60000,"write_timeout":60000,"retries":5}"#;

/// A GET through a fresh request of `req`'s plan: whether rollsafe owned it (dispatched).
fn get(host: &FakeHost, plan: &Rc<crate::plan::Plan>) -> Verdict {
    let mut req = Request::new(Rc::clone(plan));
    host.set_request(&[(":method", "GET"), (":path", "/orders/1")]);
    req.on_request_headers(host, true)
}

#[test]
fn on_kong_attempts_go_to_the_routes_service_when_no_target_is_given() {
    let host = FakeHost::at(1_000);
    let plan = Rc::new(configure(&host, br#"{"retry":{}}"#, HostKind::Kong).expect("config"));
    host.set_property("kong.router.service", SERVICE);
    assert_eq!(get(&host, &plan), Verdict::Pause, "owned");
    assert_eq!(
        host.dispatches()[0].target,
        "orders.shop.svc.cluster.local:8080"
    );
    // Read once per filter instance, kept.
    host.properties.borrow_mut().clear();
    get(&host, &plan);
    assert_eq!(
        host.dispatches()[1].target,
        "orders.shop.svc.cluster.local:8080"
    );
    assert!(host.logs_at(super::Level::Info).iter().any(|l| l.contains(
        "attempts go to the route's Service orders at orders.shop.svc.cluster.local:8080"
    )));
    // An explicit retry.target wins; the property is not even read.
    let host = FakeHost::at(1_000);
    host.set_property("kong.router.service", SERVICE);
    let plan = Rc::new(
        configure(
            &host,
            br#"{"retry":{"target":"orders-v2:9000"}}"#,
            HostKind::Kong,
        )
        .unwrap(),
    );
    get(&host, &plan);
    assert_eq!(host.dispatches()[0].target, "orders-v2:9000");
    assert!(!plan.target_from_service);
}

#[test]
fn on_kong_a_service_that_cannot_be_a_target_is_logged_once_and_kongs_proxying_carries_it() {
    let absent = None;
    let https = Some(r#"{"name":"pay","protocol":"https","host":"pay","port":443}"#);
    for (value, says) in [(absent, "Kong 3.4 and 3.5 do not"), (https, "speaks https")] {
        let host = FakeHost::at(1_000);
        let plan = Rc::new(configure(&host, br#"{"retry":{}}"#, HostKind::Kong).unwrap());
        if let Some(v) = value {
            host.set_property("kong.router.service", v);
        }
        for _ in 0..3 {
            assert_eq!(
                get(&host, &plan),
                Verdict::Continue,
                "{says}: to Kong, unowned"
            );
        }
        assert!(host.dispatches().is_empty());
        let errors = host.logs_at(super::Level::Error);
        assert_eq!(errors.len(), 1, "once: {errors:?}");
        assert!(errors[0].contains(says), "{errors:?}");
    }
}

#[test]
fn on_kong_a_service_naming_an_upstream_entity_hands_the_request_to_kong_then_the_route() {
    // Kong's Upstream entities are names only Kong's balancer resolves: the dispatch fails with
    // a resolver failure (nothing sent), Kong's own proxying carries this request (to the
    // Service, so no target is set), and the route's later requests pass unowned.
    let host = FakeHost::at(1_000);
    let plan = Rc::new(configure(&host, br#"{"retry":{}}"#, HostKind::Kong).unwrap());
    host.set_property(
        "kong.router.service",
        r#"{"name":"orders","protocol":"http","host":"orders-upstream","port":80}"#,
    );
    let mut req = Request::new(Rc::clone(&plan));
    host.set_request(&[(":method", "GET"), (":path", "/orders/1")]);
    assert_eq!(req.on_request_headers(&host, true), Verdict::Pause);
    host.answer_call(&[(":dispatch_status", "resolver failure")], "");
    req.on_call_response(&host, host.last_token(), 0);
    assert_eq!(req.pending_call(), None, "nothing pending: Kong proxies it");
    assert!(host.responses().is_empty());
    assert!(!host
        .properties
        .borrow()
        .iter()
        .any(|(k, _)| k == "kong.service.target"));
    assert_eq!(get(&host, &plan), Verdict::Continue);
    assert_eq!(host.dispatches().len(), 1);
    let errors = host.logs_at(super::Level::Error);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("Kong Upstream"), "{errors:?}");
}

#[test]
fn on_kong_a_services_read_timeout_shorter_than_the_deadline_is_logged() {
    let host = FakeHost::at(1_000);
    let plan =
        Rc::new(configure(&host, br#"{"retry":{"deadline_ms":6000}}"#, HostKind::Kong).unwrap());
    host.set_property(
        "kong.router.service",
        r#"{"name":"orders","host":"orders","port":80,"read_timeout":2000}"#,
    );
    get(&host, &plan);
    get(&host, &plan);
    let warns = host.logs_at(super::Level::Warn);
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(warns[0].contains("read_timeout 2000 ms"), "{warns:?}");
}

#[test]
fn a_routed_native_request_goes_to_its_group_and_its_retry_to_the_next_group() {
    let host = FakeHost::at(1_000);
    let cfg = r#"{"retry":{"exchange":"native","backoff":{"base_ms":1,"max_ms":1}},"idempotency":{},"routing":{"groups":[{"name":"a","target":"ca"},{"name":"b","target":"cb"}]}}"#;
    let plan = super::fake::plan(&host, HostKind::Envoy, cfg);
    let mut req = Request::new(Rc::clone(&plan));
    host.set_request(&[
        (":method", "POST"),
        (":path", "/o"),
        ("content-length", "2"),
        ("user-id", "u1"),
        ("idempotency-key", "k"),
    ]);
    assert_eq!(req.on_request_headers(&host, false), Verdict::Continue);
    let group = host
        .set_request_headers
        .borrow()
        .iter()
        .find(|(k, _)| k == "x-rollsafe-group")
        .map(|(_, v)| v.clone())
        .expect("the live request names its group (the route per group picks its cluster)");
    host.set_body(b"{}");
    assert_eq!(req.on_request_body(&host, 2, true), Verdict::Continue);
    host.set_response(&[(":status", "503")]);
    // A refused connection: the write never reached the group, so it fails over.
    host.set_property(
        "response.code_details",
        "upstream_reset_before_response_started{remote_connection_failure}",
    );
    assert_eq!(req.on_response_headers(&host, false), Verdict::Pause);
    if let Some(wake) = req.take_wake() {
        host.now.set(wake);
        req.on_wake(&host);
    }
    let d = &host.dispatches()[0];
    let other = if group == "a" { "b" } else { "a" };
    assert_eq!(d.header("x-rollsafe-group"), Some(other));
    assert_eq!(d.target, format!("c{other}"));
    assert_eq!(host.counted(Metric::RoutingFailover), 1);
}

#[test]
fn a_client_supplied_group_header_is_dropped() {
    let host = FakeHost::at(1_000);
    let cfg = r#"{"routing":{"groups":[{"name":"a","target":"ca"}]}}"#;
    let mut req = configured(&host, HostKind::Envoy, cfg);
    host.set_request(&[
        (":method", "GET"),
        (":path", "/"),
        ("x-rollsafe-group", "a"),
    ]);
    assert_eq!(req.on_request_headers(&host, true), Verdict::Continue);
    assert!(host
        .request_headers()
        .iter()
        .all(|(k, _)| k != "x-rollsafe-group"));
}

#[test]
fn kong_after_a_failed_call_or_an_empty_answer_takes_no_buffer_a_body_retry_goes_to_proxy_pass() {
    // ngx_wasm_module frees a failed call's buffers only after its callback: a dispatch with
    // a body from there spun the worker, a local answer with a body lost the client. An answer
    // without a body (a draining pod's empty 503) spun it the same way.
    // (A keyed write whose connection broke is not sent again at all: see
    // `a_keyed_write_sent_and_unanswered_is_never_sent_again`.)
    for (method, answer) in [
        ("PUT", [(":dispatch_status", "broken connection")]),
        ("POST", [(":status", "503")]),
    ] {
        let host = FakeHost::at(1_000);
        let cfg = r#"{"retry":{"target":"orders:80"},"idempotency":{"methods":["POST","PUT"]}}"#;
        let plan = super::fake::plan(&host, HostKind::Kong, cfg);
        let mut req = Request::new(Rc::clone(&plan));
        host.set_request(&[
            (":method", method),
            (":path", "/orders"),
            ("content-length", "2"),
            ("idempotency-key", "k"),
        ]);
        assert_eq!(req.on_request_headers(&host, false), Verdict::Continue);
        host.set_body(b"{}");
        assert_eq!(req.on_request_body(&host, 2, true), Verdict::Pause);
        host.answer_call(&answer, "");
        req.on_call_response(&host, host.last_token(), 0);
        assert_eq!(
            host.dispatches().len(),
            1,
            "{answer:?}: no dispatch with a body from that callback"
        );
        assert!(host.responses().is_empty());
        assert_eq!(
            req.pending_call(),
            None,
            "nothing pending: Kong resumes to proxy_pass"
        );
        assert!(host
            .properties
            .borrow()
            .iter()
            .any(|(k, v)| k == "kong.service.target" && v == b"orders:80"));
        // proxy_pass's answer is final and completes the key on its way through.
        host.set_response(&[(":status", "201")]);
        *host.response_body.borrow_mut() = b"made".to_vec();
        assert_eq!(req.on_response_headers(&host, false), Verdict::Continue);
        assert_eq!(req.on_response_body(&host, 4, true), Verdict::Continue);
        assert_eq!(host.counted(Metric::IdemStored), 1);
    }
}

#[test]
fn kong_final_answer_after_a_failed_call_has_no_body_and_a_problem_header() {
    let host = FakeHost::at(1_000);
    let mut req = request(
        &host,
        HostKind::Kong,
        r#"{"target":"orders:80","attempts":1}"#,
    );
    host.set_request(&[(":method", "GET"), (":path", "/slow")]);
    assert_eq!(req.on_request_headers(&host, false), Verdict::Pause);
    host.answer_call(&[(":dispatch_status", "timeout")], "");
    req.on_call_response(&host, host.last_token(), 0);
    let sent = host.responses();
    assert_eq!(sent[0].status, 504);
    assert!(sent[0].body.is_empty());
    let problem: serde_json::Value =
        serde_json::from_str(sent[0].header("x-rollsafe-problem").unwrap()).unwrap();
    assert_eq!(
        problem["type"],
        "urn:problem-type:rollsafe:upstream-timeout"
    );
}

#[test]
fn kong_needs_no_target_when_routing_names_the_destinations() {
    let host = FakeHost::at(1_000);
    let cfg = r#"{"retry":{},"routing":{"groups":[{"name":"a","target":"orders-a:80"}]}}"#;
    let plan = Rc::new(configure(&host, cfg.as_bytes(), HostKind::Kong).expect("accepted"));
    // A write is hashed to its group and dispatched there.
    let mut write = Request::new(Rc::clone(&plan));
    host.set_request(&[(":method", "DELETE"), (":path", "/o/1"), ("user-id", "u1")]);
    assert_eq!(write.on_request_headers(&host, false), Verdict::Pause);
    assert_eq!(host.dispatches()[0].target, "orders-a:80");
    // A read routing does not hash has no destination of rollsafe's: Kong proxies it.
    let mut read = Request::new(plan);
    host.set_request(&[(":method", "GET"), (":path", "/o/1")]);
    assert_eq!(read.on_request_headers(&host, false), Verdict::Continue);
    assert_eq!(host.dispatches().len(), 1);
}

#[test]
fn a_routed_request_reads_its_headers_once_and_its_retry_names_the_next_group() {
    let host = FakeHost::at(1_000);
    let cfg = r#"{"retry":{"backoff":{"base_ms":1,"max_ms":1}},"routing":{"groups":[{"name":"a","target":"ca"},{"name":"b","target":"cb"}]}}"#;
    let mut req = configured(&host, HostKind::Envoy, cfg);
    host.set_request(&[
        (":method", "DELETE"),
        (":path", "/o/1"),
        ("user-id", "u1"),
        ("x-trace", "t"),
        ("x-rollsafe-group", "chosen-by-the-client"),
    ]);
    assert_eq!(req.on_request_headers(&host, true), Verdict::Continue);
    assert_eq!(host.header_reads(), 1, "one read of the header map");
    let group = host
        .request_headers()
        .iter()
        .find(|(k, _)| k == "x-rollsafe-group")
        .map(|(_, v)| v.clone())
        .expect("the route's request names its group");
    host.set_response(&[(":status", "503")]);
    host.set_property("response.code_details", "via_upstream");
    assert_eq!(req.on_response_headers(&host, false), Verdict::Pause);
    if let Some(wake) = req.take_wake() {
        host.now.set(wake);
        req.on_wake(&host);
    }
    let d = &host.dispatches()[0];
    let other = if group == "a" { "b" } else { "a" };
    assert_eq!(d.target, format!("c{other}"));
    assert_eq!(d.header("x-rollsafe-group"), Some(other));
    assert_eq!(d.header("x-trace"), Some("t"));
    assert_eq!(d.header(":method"), Some("DELETE"));
    assert_eq!(
        d.headers
            .iter()
            .filter(|(k, _)| k == "x-rollsafe-group")
            .count(),
        1
    );
}

#[test]
fn a_body_limit_over_envoys_buffer_is_refused_on_envoy_only() {
    let host = FakeHost::default();
    let cfg = br#"{"retry":{"target":"orders:80","max_body_bytes":2097152}}"#;
    assert!(configure(&host, cfg, HostKind::Envoy).is_none());
    assert!(host.logs_at(super::Level::Error)[0]
        .starts_with("rollsafe: retry.max_body_bytes: at most 1048576 on Envoy"));
    // Kong's host holds what client_body_buffer_size allows (the operator sizes it).
    assert!(configure(&host, cfg, HostKind::Kong).is_some());
}

#[test]
fn a_keyed_write_sent_and_unanswered_is_never_sent_again() {
    // Kong: a broken connection or a timeout after the write was dispatched; Envoy: the route's
    // attempt reset after sending, or no answer before the deadline. The application may still
    // be executing it: 502/504 "outcome unknown", the key held for a lease, no second attempt.
    let kong: [&[(&str, &str)]; 2] = [
        &[(":dispatch_status", "broken connection")],
        &[(":dispatch_status", "timeout")],
    ];
    for (failure, status) in kong.into_iter().zip([502, 504]) {
        let host = FakeHost::at(1_000);
        let cfg = r#"{"retry":{"target":"orders:80","per_try_timeout_ms":1000,"deadline_ms":6000},"idempotency":{"lease_ms":6000}}"#;
        let plan = super::fake::plan(&host, HostKind::Kong, cfg);
        let mut req = Request::new(Rc::clone(&plan));
        keyed_write(&host, &mut req, "POST", "/orders", Some("k"), b"{}");
        assert_eq!(
            host.dispatches()[0].timeout_ms,
            6_000,
            "a keyed write waits up to the deadline, not the per-try timeout"
        );
        host.now.set(7_000);
        host.answer_call(failure, "");
        req.on_call_response(&host, host.last_token(), 0);
        assert_eq!(host.dispatches().len(), 1, "{failure:?}: never sent again");
        let r = host.responses().last().cloned().unwrap();
        assert_eq!(r.status, status);
        let problem: serde_json::Value =
            serde_json::from_str(r.header("x-rollsafe-problem").unwrap()).unwrap();
        assert_eq!(
            problem["type"],
            "urn:problem-type:rollsafe:upstream-outcome-unknown"
        );
        assert_eq!(r.header("retry-after"), Some("6"));
        assert_eq!(host.counted(Metric::IdemOutcomeUnknown), 1);
        assert_eq!(host.counted(Metric::IdemReleased), 0, "the key is held");
        // The client's retry within the lease: 409, nothing sent.
        host.now.set(9_000);
        let mut again = Request::new(Rc::clone(&plan));
        again.on_request_headers(&host, false);
        again.on_request_body(&host, 2, true);
        assert_eq!(host.responses().last().unwrap().status, 409);
        assert_eq!(host.dispatches().len(), 1);
    }
    // Envoy's native driver: the route's attempt reset after the write was sent.
    let host = FakeHost::at(1_000);
    let cfg =
        r#"{"retry":{"exchange":"native","backoff":{"base_ms":1,"max_ms":1}},"idempotency":{}}"#;
    let plan = super::fake::plan(&host, HostKind::Envoy, cfg);
    let mut req = Request::new(Rc::clone(&plan));
    assert_eq!(
        keyed_write(&host, &mut req, "POST", "/o", Some("k"), b"{}"),
        Verdict::Continue
    );
    assert!(
        host.set_request_headers
            .borrow()
            .iter()
            .any(|(k, v)| k == "x-envoy-upstream-rq-timeout-ms" && v == "15000"),
        "the route's attempt waits up to the deadline"
    );
    host.set_response(&[(":status", "503")]);
    host.set_property(
        "response.code_details",
        "upstream_reset_before_response_started{connection_termination}",
    );
    assert_eq!(req.on_response_headers(&host, false), Verdict::Pause);
    let wake = req.take_wake().expect("the answer is due from the root");
    host.now.set(wake);
    req.on_wake(&host);
    assert!(host.dispatches().is_empty(), "never sent again");
    assert_eq!(host.responses().last().unwrap().status, 502);
    assert_eq!(host.counted(Metric::IdemOutcomeUnknown), 1);
}

#[test]
fn a_keyed_body_too_large_to_hold_streams_once_with_its_key_on_both_hosts() {
    // Kong: nginx spilled it (the filter gets nothing), proxy_pass carries it. Envoy: its
    // declared length is over max_body_bytes, the route's own request carries it, unheld.
    for kind in [HostKind::Kong, HostKind::Envoy] {
        let host = FakeHost::at(1_000);
        let cfg = r#"{"retry":{"target":"orders:8080","max_body_bytes":1000},"idempotency":{}}"#;
        let plan = super::fake::plan(&host, kind, cfg);
        let upload = |host: &FakeHost| {
            let mut req = Request::new(Rc::clone(&plan));
            host.set_request(&[
                (":method", "POST"),
                (":path", "/uploads"),
                ("content-length", "20000"),
                ("idempotency-key", "up-1"),
            ]);
            let at_headers = req.on_request_headers(host, false);
            let verdict = match kind {
                HostKind::Kong => {
                    assert_eq!(at_headers, Verdict::Continue);
                    req.on_request_body(host, 0, true)
                }
                HostKind::Envoy => at_headers,
            };
            (req, verdict)
        };
        let (mut req, verdict) = upload(&host);
        assert_eq!(verdict, Verdict::Continue, "{kind:?}: it goes on, once");
        assert!(
            host.dispatches().is_empty(),
            "{kind:?}: no copy of it is held"
        );
        assert!(host.responses().is_empty());
        if kind == HostKind::Kong {
            assert!(host
                .properties
                .borrow()
                .iter()
                .any(|(k, v)| k == "kong.service.target" && v == b"orders:8080"));
        } else {
            // The body streams: every chunk goes on as it comes.
            assert_eq!(req.on_request_body(&host, 4096, false), Verdict::Continue);
        }
        // The same key meanwhile: 409.
        upload(&host);
        assert_eq!(host.responses().last().unwrap().status, 409, "{kind:?}");
        // Its answer completes the key; a re-send is replayed.
        host.set_response(&[(":status", "201"), ("content-type", "application/json")]);
        *host.response_body.borrow_mut() = b"{\"id\":7}".to_vec();
        assert_eq!(req.on_response_headers(&host, false), Verdict::Continue);
        req.on_response_body(&host, 8, true);
        assert_eq!(host.counted(Metric::IdemStored), 1, "{kind:?}");
        upload(&host);
        let replay = host.responses().last().cloned().unwrap();
        assert_eq!((replay.status, &replay.body[..]), (201, &b"{\"id\":7}"[..]));
        assert_eq!(replay.header("idempotent-replayed"), Some("true"));
        assert!(host.dispatches().is_empty());
    }
}

/// `retry.methods`: a method rollsafe does not own goes to the host's proxying after one header
/// read (no exchange: no dispatch, no retry); a listed method, or one a key applies to, is owned.
#[test]
fn methods_not_listed_pass_to_the_host_after_one_read_and_keyed_ones_stay_owned() {
    for kind in [HostKind::Kong, HostKind::Envoy] {
        let cfg = r#"{"retry":{"target":"orders:80","methods":["POST"],
                              "attempt_count_header":"x-attempts"},
                      "idempotency":{"methods":["PATCH"]}}"#;
        let host = FakeHost::at(1_000);
        let mut get = configured(&host, kind, cfg);
        host.set_request(&[(":method", "GET"), (":path", "/orders")]);
        assert_eq!(get.on_request_headers(&host, true), Verdict::Continue);
        assert_eq!(host.header_reads(), 1, "{kind:?}: one read");
        assert!(host.dispatches().is_empty(), "{kind:?}");
        // Its answer, a 503, is the host's to retry or pass: rollsafe leaves it alone.
        host.set_response(&[(":status", "503")]);
        assert_eq!(get.on_response_headers(&host, true), Verdict::Continue);
        assert!(
            host.dispatches().is_empty() && host.responses().is_empty(),
            "{kind:?}"
        );
        assert_eq!(host.counted(Metric::Attempts), 0, "{kind:?}");

        for method in ["POST", "PATCH"] {
            let host = FakeHost::at(1_000);
            let mut owned = Request::new(super::fake::plan(&host, kind, cfg));
            let key = (method == "PATCH").then_some("\"k\"");
            keyed_write(&host, &mut owned, method, "/orders", key, b"{}");
            let started = match kind {
                HostKind::Kong => !host.dispatches().is_empty(),
                HostKind::Envoy => {
                    // The route's attempt, whose answer rollsafe reports on.
                    host.set_response(&[(":status", "200")]);
                    owned.on_response_headers(&host, true);
                    super::header(&host.response_headers.borrow(), "x-attempts") == Some("1")
                }
            };
            assert!(started, "{kind:?} {method}: owned by rollsafe");
        }
    }
}

/// `retry.methods` with routing: a GET routing does not hash is the host's after `:method`
/// and the group header's lookup (no header map), and a client's own group header is dropped.
#[test]
fn methods_not_listed_and_not_hashed_pass_with_a_clients_group_dropped() {
    for kind in [HostKind::Kong, HostKind::Envoy] {
        let cfg = r#"{"retry":{"target":"orders:80","methods":["POST"]},
                      "routing":{"groups":[{"name":"a","target":"pods-a:80"},
                                           {"name":"b","target":"pods-b:80"}]}}"#;
        let host = FakeHost::at(1_000);
        let mut get = configured(&host, kind, cfg);
        host.set_request(&[
            (":method", "GET"),
            (":path", "/orders"),
            ("x-rollsafe-group", "b"),
        ]);
        assert_eq!(get.on_request_headers(&host, true), Verdict::Continue);
        assert_eq!(
            host.header_reads(),
            2,
            "{kind:?}: :method and the group header"
        );
        assert_eq!(
            host.calls.borrow().get("request header map"),
            None,
            "{kind:?}"
        );
        assert!(
            !host
                .request_headers()
                .iter()
                .any(|(k, _)| k == "x-rollsafe-group"),
            "{kind:?}: the client's group is dropped"
        );
        assert!(host.dispatches().is_empty(), "{kind:?}");
    }
}

#[test]
fn an_empty_methods_list_is_refused_naming_the_field() {
    let host = FakeHost::at(0);
    assert!(configure(&host, br#"{"retry":{"methods":[]}}"#, HostKind::Envoy).is_none());
    assert!(host
        .logs_at(super::Level::Error)
        .iter()
        .any(|l| l.contains("retry.methods")));
}

/// Kong's host keeps a call's buffers until the client's connection closes
/// (`crate::reconnect`): an answer to a request that made a call closes a connection that
/// carried its quota; nothing else reads the count or closes.
#[test]
fn on_kong_a_dispatched_answer_closes_a_connection_that_carried_its_quota() {
    let cfg = r#"{"retry":{"target":"orders:80"},"idempotency":{}}"#;
    for (requests, close) in [("31", false), ("32", true), ("900", true)] {
        let host = FakeHost::at(1_000);
        host.set_property("ngx.connection_requests", requests);
        let plan = super::fake::plan(&host, HostKind::Kong, cfg);
        let mut req = Request::new(Rc::clone(&plan));
        let key = Some("\"k1\"");
        assert_eq!(
            keyed_write(&host, &mut req, "POST", "/orders", key, b"{}"),
            Verdict::Pause
        );
        host.answer_call(&[(":status", "201")], "made");
        req.on_call_response(&host, host.last_token(), 4);
        let sent = host.responses();
        let answer = sent.last().expect("answered");
        assert_eq!(answer.status, 201);
        assert_eq!(
            answer.header("connection") == Some("close"),
            close,
            "{requests}"
        );
        // The replay of that answer made no call: the connection stays open.
        let mut again = Request::new(Rc::clone(&plan));
        keyed_write(&host, &mut again, "POST", "/orders", key, b"{}");
        let replay = host.responses().pop().expect("replayed");
        assert_eq!((replay.status, replay.header("connection")), (201, None));
    }
    // Envoy never reads the count.
    let host = FakeHost::at(1_000);
    host.set_property("ngx.connection_requests", "900");
    let mut req = request(&host, HostKind::Envoy, DISPATCH);
    host.set_request(&[(":method", "GET"), (":path", "/a")]);
    req.on_request_headers(&host, true);
    host.answer_call(&[(":status", "200")], "ok");
    req.on_call_response(&host, host.last_token(), 2);
    assert_eq!(
        host.responses()
            .last()
            .and_then(|s| s.header("connection").map(str::to_string)),
        None
    );
    assert_eq!(host.calls.borrow().get("property"), None);
}

#[test]
fn an_answer_header_that_is_not_text_is_passed_on_lossily_with_the_others() {
    let host = FakeHost::at(1_000);
    let mut req = request(&host, HostKind::Envoy, DISPATCH);
    host.set_request(&[(":method", "GET"), (":path", "/a"), (":authority", "api")]);
    assert_eq!(req.on_request_headers(&host, true), Verdict::Pause);
    // (The host's block as is: a value that is no UTF-8 cannot be given as text.)
    let mut raw = super::headers::serialize(&[
        (":status", "200"),
        ("content-type", "text/plain"),
        ("x-name", "?"),
        ("transfer-encoding", "chunked"),
    ]);
    let at = raw.iter().position(|&b| b == b'?').expect("the value");
    raw[at] = 0xff;
    host.call.borrow_mut().headers = super::headers::HeaderBlock::from_raw(raw);
    host.call.borrow_mut().body = b"ok".to_vec();
    req.on_call_response(&host, host.last_token(), 2);
    let sent = host.responses();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].status, 200);
    let names: Vec<&str> = sent[0].headers.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["content-type", "x-name", "x-attempts"]);
    assert_eq!(sent[0].header("x-name"), Some("\u{fffd}"));
    assert_eq!(sent[0].header("content-type"), Some("text/plain"));
    assert_eq!(sent[0].body, b"ok");
}

#[test]
fn attempts_the_host_refuses_are_answered_each_and_logged_once_a_period() {
    let host = FakeHost::at(1_000);
    host.dispatch_fails.set(true);
    let refused = |host: &FakeHost| {
        host.logs_at(Level::Error)
            .into_iter()
            .filter(|l| l.contains("cannot send an attempt"))
            .collect::<Vec<_>>()
    };
    for i in 0..3 {
        let mut req = request(&host, HostKind::Envoy, DISPATCH);
        host.set_request(&[(":method", "GET"), (":path", "/a"), (":authority", "api")]);
        assert_eq!(req.on_request_headers(&host, true), Verdict::Pause);
        let sent = host.responses();
        assert_eq!(sent.len(), i + 1, "request {i} is answered");
        assert_eq!(sent[i].status, 502);
    }
    // A misconfigured route fails every request: one line a period, not one a request.
    assert_eq!(refused(&host).len(), 1);
    host.now.set(1_000 + crate::warnings::PERIOD_MS);
    let mut req = request(&host, HostKind::Envoy, DISPATCH);
    host.set_request(&[(":method", "GET"), (":path", "/a"), (":authority", "api")]);
    req.on_request_headers(&host, true);
    let lines = refused(&host);
    assert_eq!(lines.len(), 2);
    assert!(
        lines[1].ends_with("(2 more like it not logged since the last)"),
        "{}",
        lines[1]
    );
}

#[test]
fn the_deadline_counts_from_the_held_body_not_from_the_upload() {
    // (Kong's driver: its first attempt is dispatched once the body is whole.) A body that
    // takes 4 s to arrive does not eat into a 6 s deadline: rollsafe's attempts have not begun.
    for key in [None, Some("k")] {
        let host = FakeHost::at(1_000);
        let cfg = r#"{"retry":{"target":"orders:80","per_try_timeout_ms":5000,"deadline_ms":6000},"idempotency":{"lease_ms":6000}}"#;
        let plan = super::fake::plan(&host, HostKind::Kong, cfg);
        let mut req = Request::new(Rc::clone(&plan));
        let mut headers = vec![
            (":method", "POST"),
            (":path", "/orders"),
            ("content-length", "2"),
        ];
        if let Some(k) = key {
            headers.push(("idempotency-key", k));
        }
        host.set_request(&headers);
        assert_eq!(req.on_request_headers(&host, false), Verdict::Continue);
        host.now.set(5_000);
        host.set_body(b"{}");
        req.on_request_body(&host, 2, true);
        let want = if key.is_some() { 6_000 } else { 5_000 };
        assert_eq!(host.dispatches()[0].timeout_ms, want, "key {key:?}");
    }
}

#[test]
fn on_envoy_a_held_body_starts_the_deadline_when_the_route_gets_it() {
    // A keyed PUT (a key without a lease to stretch to the deadline) and a POST whose claim
    // failed open (no key at all): their bodies are held until whole, so the exchange begins
    // when the route is given the body (t=5 s). Its first attempt fails at 7.5 s, 2.5 s into a
    // 2 s deadline: no retry. (Begun only at the attempt's end, it would see no time gone and
    // retry.)
    let cases = [
        (
            "PUT",
            r#"{"retry":{"exchange":"native","per_try_timeout_ms":2000,"deadline_ms":2000},"idempotency":{"methods":["PUT"],"lease_ms":2000}}"#,
        ),
        (
            "POST",
            r#"{"retry":{"exchange":"native","per_try_timeout_ms":2000,"deadline_ms":2000},"idempotency":{"lease_ms":2000,"store":"redis","redis":{"target":"webdis:7379","when_unavailable":"fail-open"}}}"#,
        ),
    ];
    for (method, cfg) in cases {
        let host = FakeHost::at(1_000);
        let plan = super::fake::plan(&host, HostKind::Envoy, cfg);
        let mut req = Request::new(Rc::clone(&plan));
        host.set_request(&[
            (":method", method),
            (":path", "/orders/1"),
            ("content-length", "2"),
            ("idempotency-key", "\"k\""),
        ]);
        assert_eq!(req.on_request_headers(&host, false), Verdict::Continue);
        host.now.set(5_000);
        host.set_body(b"{}");
        req.on_request_body(&host, 2, true);
        if let Some(token) = req.pending_call() {
            // The shared store's claim: unavailable, so the request runs unprotected.
            host.answer_call(&[(":status", "503")], "");
            req.on_call_response(&host, token, 0);
        }
        // (A refused connection: a retry is safe for any method, so only the deadline stops it.)
        host.now.set(7_500);
        host.set_response(&[(":status", "503")]);
        host.set_property(
            "response.code_details",
            "upstream_reset_before_response_started{remote_connection_failure}",
        );
        assert_eq!(
            req.on_response_headers(&host, false),
            Verdict::Continue,
            "{method}: the route's answer is the last"
        );
        assert_eq!(host.counted(Metric::RetryConnectFailure), 0, "{method}");
        assert_eq!(host.counted(Metric::RetryDeadlineExceeded), 1, "{method}");
    }
}
