//! The request flow, written against the [`Host`] seam. The proxy-wasm contexts in `proxy`
//! forward every callback here; native tests drive the same code with a fake host.

use super::exchange::{classify_native, Exchange, Routed, Step};
use super::headers::HeaderBlock;
use super::{Host, HostKind, Level, Metric};
use crate::maintenance::{self, Decision, RequestFacts, RetryAfterFormat};
use crate::plan::{self, Plan, ServiceTarget};
use crate::problem::{self, Problem};
use crate::retry::Outcome;
use crate::routing::{self, KeySource, Missing};
use crate::service;
use std::rc::Rc;

/// What the filter does with a callback: let the stream go on, or hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    Pause,
}

/// Parses and compiles the configuration; on error logs `rollsafe: <path>: <reason>` once and
/// returns `None` so the root context can refuse the configuration.
pub fn configure(host: &impl Host, bytes: &[u8], kind: HostKind) -> Option<Plan> {
    match plan::load(bytes, kind) {
        Ok(plan) => {
            host.log(
                Level::Info,
                if plan.is_pass_through() {
                    "rollsafe: configured; no capability enabled, requests pass through"
                } else {
                    "rollsafe: configured"
                },
            );
            Some(plan)
        }
        Err(e) => {
            host.log(Level::Error, &format!("rollsafe: {e}"));
            None
        }
    }
}

/// Per-request state.
pub struct Request {
    plan: Rc<Plan>,
    /// Set once rollsafe answered locally: that reply passes back through this filter's own
    /// response callbacks on both hosts and must be left alone.
    answered_locally: bool,
    /// The upstream exchange, when rollsafe owns it (retries configured).
    exchange: Option<Box<Exchange>>,
    /// A maintenance window opens soon: the response announces it.
    notice: Option<Rc<str>>,
    /// The group a hashed request went to, when no exchange tracks it.
    routed: Option<usize>,
}

impl From<Step> for Verdict {
    fn from(s: Step) -> Verdict {
        match s {
            Step::Continue => Verdict::Continue,
            Step::Pause => Verdict::Pause,
        }
    }
}

impl Request {
    pub fn new(plan: Rc<Plan>) -> Self {
        Request {
            plan,
            answered_locally: false,
            exchange: None,
            notice: None,
            routed: None,
        }
    }

    pub fn on_request_headers(&mut self, host: &impl Host, end_of_stream: bool) -> Verdict {
        if self.plan.is_pass_through() {
            return Verdict::Continue;
        }
        // Every hostcall that returns data costs the host a call into the VM: read only what
        // the configured capabilities need, once.
        let mut clock = None;
        let mut now = || *clock.get_or_insert_with(|| host.now_ms());
        let plan = Rc::clone(&self.plan);
        if let Some(policy) = &plan.maintenance {
            // Outside a window this is one clock read and a comparison: nothing else is read.
            let now = now();
            if let Some(schedule) = &policy.announce.schedule_path {
                // (Answered during a window too.)
                if self.is_schedule_request(host, schedule) {
                    self.reply_schedule(host, policy, now);
                    return Verdict::Pause;
                }
            }
            if let Some(start) = policy.next_start(now) {
                self.notice = policy
                    .announce
                    .notice(now, start, || policy.span_end(start));
            }
            if let Some(until) = policy.active(now) {
                let method = host.request_header(":method").unwrap_or_default();
                let path = host.request_header(":path").unwrap_or_default();
                let token = host.request_header(&policy.bypass_header);
                let facts = RequestFacts {
                    method: &method,
                    path: &path,
                    bypass_token: token.as_deref(),
                };
                match policy.decide(until, &facts) {
                    Decision::Reject { until } => {
                        host.count(Metric::MaintenanceRejected);
                        self.reply_maintenance(host, policy.retry_after, now, until, &path);
                        return Verdict::Pause;
                    }
                    Decision::Bypassed => host.count(Metric::MaintenanceBypassed),
                    Decision::Allowed | Decision::Pass => {}
                }
            }
            if plan.only_maintenance() {
                return Verdict::Continue;
            }
        }
        // Keys alone (no retry section, no routing): a request without a key, where keys are
        // optional, is none of rollsafe's business — one lookup that finds nothing.
        let optional_key = match (
            plan.exchange_for_keys_only,
            &plan.routing,
            &plan.idempotency,
        ) {
            (true, None, Some(ip)) if !ip.required => Some(ip.header.as_str()),
            _ => None,
        };
        // A request with a body on Envoy is most likely a keyed write: its key is looked up in
        // the header map the exchange reads anyway (one hostcall rather than two).
        let key_in_map = plan.host == HostKind::Envoy && !end_of_stream;
        if let (Some(name), false) = (optional_key, key_in_map) {
            if host.request_header(name).is_none() {
                return Verdict::Continue;
            }
        }
        let keyed_method = |method: &str| {
            plan.idempotency
                .as_ref()
                .is_some_and(|ip| ip.applies_to(method))
        };
        // `retry.methods`: a request rollsafe does not own, and that no key applies to, is the
        // host's own to proxy (and retry) after one header read — and, with routing, a lookup
        // of the group header when routing does not hash its method. (A request with a body on
        // Envoy is most likely an owned write, whose map is read below anyway.)
        if let Some((policy, _)) = &plan.retry {
            if !policy.owns_every_method() && !key_in_map {
                let method = host.request_header(":method").unwrap_or_default();
                if !policy.owns(&method) && !keyed_method(&method) {
                    match &plan.routing {
                        None => return Verdict::Continue,
                        Some(rp) if !rp.hashes(&method) => {
                            // Routing picks no group for it; it only drops a client's own.
                            let one_by_one = Headers { host, all: None };
                            let _ = self.route(rp, &one_by_one, &method, false, &mut now);
                            return Verdict::Continue;
                        }
                        Some(_) => {}
                    }
                }
            }
        }
        // An exchange keeps the whole header map for its retries (Envoy shows none in the
        // response phase): one read then serves routing and keys too.
        let headers = Headers {
            host,
            all: plan.retry.is_some().then(|| host.request_header_block()),
        };
        if let (Some(name), true) = (optional_key, key_in_map) {
            if headers
                .all
                .as_ref()
                .is_some_and(|b| b.get_bytes(name).is_none())
            {
                return Verdict::Continue;
            }
        }
        let method = if plan.routing.is_some() || plan.retry.is_some() {
            headers.get(":method").unwrap_or_default()
        } else {
            String::new()
        };
        let owned = plan
            .retry
            .as_ref()
            .is_some_and(|(policy, _)| policy.owns(&method) || keyed_method(&method));
        let routed = match &plan.routing {
            Some(rp) => match self.route(rp, &headers, &method, owned, &mut now) {
                Ok(r) => r,
                Err(v) => return v,
            },
            None => None,
        };
        // On Kong an exchange needs somewhere to send attempts: `retry.target`, the group, or
        // the route's Service.
        let service_target = (plan.target_from_service && routed.is_none())
            .then(|| self.service_target(host))
            .flatten();
        // (Without a usable Service the exchange still enforces keys: Kong's proxying carries
        // its one attempt.)
        let has_target = plan.host == HostKind::Envoy
            || routed.is_some()
            || plan.target_from_service
            || plan.retry.as_ref().is_some_and(|(p, _)| p.target.is_some());
        let needs_exchange =
            owned && has_target && (!plan.exchange_for_keys_only || keyed_method(&method));
        if let (Some((policy, driver)), true) = (&plan.retry, needs_exchange) {
            let all = headers.all.unwrap_or_default();
            let (exchange, step) = Exchange::start(
                &plan,
                policy,
                *driver,
                host,
                all,
                method,
                end_of_stream,
                &mut now,
                routed,
                service_target,
            );
            self.exchange = exchange;
            return step.into();
        }
        self.routed = routed.map(|r| r.group);
        Verdict::Continue
    }

    /// The route's Service as the attempt target (Kong, no `retry.target`): read from
    /// `kong.router.service` at the first request and kept; what cannot be a target is logged
    /// once, and Kong's own proxying then carries the route's requests (keys still enforced).
    fn service_target(&self, host: &impl Host) -> Option<Rc<str>> {
        let mut cache = self.plan.service.try_borrow_mut().ok()?;
        match &*cache {
            ServiceTarget::Ready(t) => return Some(t.clone()),
            ServiceTarget::Unusable => return None,
            ServiceTarget::Unread => {}
        }
        let value = host.property(super::KONG_ROUTER_SERVICE);
        match service::from_property(value.as_deref()) {
            Ok(svc) => {
                host.log(
                    Level::Info,
                    &format!(
                        "rollsafe: attempts go to the route's Service {} at {} (kong.router.service)",
                        svc.name, svc.target
                    ),
                );
                if let Some((policy, _)) = &self.plan.retry {
                    if let Some(why) =
                        svc.timeouts_disagree(policy.per_try_timeout_ms, policy.deadline_ms)
                    {
                        host.log(Level::Warn, &format!("rollsafe: {why}"));
                    }
                }
                let target = Rc::from(svc.target);
                *cache = ServiceTarget::Ready(Rc::clone(&target));
                Some(target)
            }
            Err(why) => {
                host.log(
                    Level::Error,
                    &format!(
                        "rollsafe: no attempt target: {}; Kong's proxying carries this route's requests (keys enforced, no retries)",
                        why.reason()
                    ),
                );
                *cache = ServiceTarget::Unusable;
                None
            }
        }
    }

    /// Picks the pod group of a hashed request and names it for the host: a request header
    /// (seen by the upstream; an Envoy route matches it to the group's cluster) and, on Kong,
    /// `kong.service.target`. `Err` when the request was answered (missing key, `reject`).
    fn route<H: Host>(
        &mut self,
        rp: &routing::Policy,
        headers: &Headers<'_, H>,
        method: &str,
        owned: bool,
        now: &mut impl FnMut() -> u64,
    ) -> Result<Option<Routed>, Verdict> {
        let host = headers.host;
        // Only rollsafe names groups: a client must not pick its own. (Read first: on Envoy a
        // removal also clears the route cache, and the header is nearly always absent.)
        if headers.get(&rp.group_header).is_some() {
            host.remove_request_header(&rp.group_header);
        }
        if !rp.hashes(method) {
            return Ok(None);
        }
        let key = rp.key.iter().find_map(|src| match src {
            KeySource::Header(name) => headers.get(name).filter(|v| !v.is_empty()),
            KeySource::Cookie(name) => headers
                .get("cookie")
                .and_then(|c| routing::cookie(&c, name).map(str::to_string))
                .filter(|v| !v.is_empty()),
        });
        let (key_hash, fixed) = match key {
            Some(k) => (routing::hash_key(k.as_bytes()), None),
            None => {
                host.count(Metric::RoutingMissingKey);
                match rp.missing {
                    Missing::Reject => {
                        let path = headers.get(":path").unwrap_or_default();
                        let body = Problem {
                            kind: "routing-key-missing",
                            title: "Missing routing key",
                            status: 400,
                            detail: "This request needs a user key to be routed (routing.key)."
                                .into(),
                            instance: Some(&path),
                            extensions: Default::default(),
                        }
                        .to_json();
                        self.answered_locally = true;
                        host.send_response(400, &[("content-type", problem::CONTENT_TYPE)], &body);
                        return Err(Verdict::Pause);
                    }
                    // Evenly over the groups: never everything to one group by accident.
                    Missing::Spread => (host.random(), None),
                    Missing::Group(g) => (0, Some(g)),
                }
            }
        };
        let group = fixed.unwrap_or_else(|| rp.pick(key_hash, now(), &[]));
        let Some(g) = rp.groups.get(group) else {
            return Ok(None);
        };
        if !owned {
            // Nothing owns this request: the host's own proxying goes to the group.
            super::name_group(host, self.plan.host, &rp.group_header, &g.name, &g.target);
        }
        Ok(Some(Routed {
            key_hash,
            group,
            fixed: fixed.is_some(),
            tried: Vec::new(),
        }))
    }

    pub fn on_request_body(
        &mut self,
        host: &impl Host,
        size: usize,
        end_of_stream: bool,
    ) -> Verdict {
        let (Some((policy, _)), Some(exchange)) = (&self.plan.retry, self.exchange.take()) else {
            return Verdict::Continue;
        };
        let (exchange, step) = exchange.on_request_body(policy, host, size, end_of_stream);
        self.exchange = exchange;
        step.into()
    }

    pub fn on_response_headers(&mut self, host: &impl Host, end_of_stream: bool) -> Verdict {
        if self.answered_locally {
            return Verdict::Continue;
        }
        if let Some(notice) = &self.notice {
            host.set_response_header(crate::announce::NOTICE_HEADER, notice);
        }
        match (&self.plan.retry, &mut self.exchange) {
            (Some((policy, _)), Some(exchange)) => exchange
                .on_response_headers(policy, host, end_of_stream)
                .into(),
            _ => {
                self.note_routed_answer(host);
                Verdict::Continue
            }
        }
    }

    /// Without an exchange, the route's answer still tells the group's health.
    fn note_routed_answer(&mut self, host: &impl Host) {
        let (Some(rp), Some(group)) = (&self.plan.routing, self.routed) else {
            return;
        };
        let status = host
            .response_header(":status")
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        let outcome = if status >= 500 || status == 0 {
            let details = host
                .property(super::RESPONSE_CODE_DETAILS)
                .map(|b| String::from_utf8_lossy(&b).into_owned());
            classify_native(status, details.as_deref())
        } else {
            Outcome::Status(status)
        };
        match outcome {
            Outcome::Status(s) if s < 500 => rp.succeeded(group),
            _ => {
                if rp.failed(group, host.now_ms()) {
                    host.count(Metric::RoutingGroupDown);
                }
            }
        }
    }

    pub fn on_response_body(
        &mut self,
        host: &impl Host,
        size: usize,
        end_of_stream: bool,
    ) -> Verdict {
        match &mut self.exchange {
            Some(exchange) => exchange.on_response_body(host, size, end_of_stream).into(),
            None => Verdict::Continue,
        }
    }

    /// The answer to a call this request dispatched (delivered to it or, for root-driven
    /// retries, to the root context).
    pub fn on_call_response(&mut self, host: &impl Host, token: u32, body_size: usize) {
        if let (Some((policy, _)), Some(exchange)) = (&self.plan.retry, &mut self.exchange) {
            exchange.on_call_response(policy, host, token, body_size);
        }
    }

    /// The request is over (the host logs it): the client may have gone away mid-exchange.
    pub fn on_done(&mut self, host: &impl Host) {
        if let Some(exchange) = &mut self.exchange {
            exchange.on_client_gone(host);
        }
    }

    /// A scheduled backoff ended.
    pub fn on_wake(&mut self, host: &impl Host) {
        if let (Some((policy, _)), Some(exchange)) = (&self.plan.retry, &mut self.exchange) {
            exchange.on_wake(policy, host);
        }
    }

    /// When to wake this request (a backoff was scheduled); taken once.
    pub fn take_wake(&mut self) -> Option<u64> {
        self.exchange.as_mut().and_then(|e| e.take_wake())
    }

    /// Where the request's key stands in its lifecycle (tests).
    #[cfg(test)]
    pub fn key_phase(&self) -> Option<crate::idempotency::lifecycle::Phase> {
        self.exchange.as_ref().and_then(|e| e.key_phase())
    }

    /// Whether this request may have filed a wake-up or a call for the root's tick: only an
    /// exchange does (its backoffs, its key's writes to the shared store).
    pub fn may_schedule(&self) -> bool {
        self.exchange.is_some()
    }

    /// The token of the call this request waits for.
    pub fn pending_call(&self) -> Option<u32> {
        self.exchange.as_ref().and_then(|e| e.pending())
    }

    /// A GET or HEAD of the schedule path (query ignored).
    fn is_schedule_request(&self, host: &impl Host, schedule: &str) -> bool {
        let path = host.request_header(":path").unwrap_or_default();
        // (The path, then nothing or a query: no search through the path for a `?`.)
        path.starts_with(schedule)
            && matches!(path.as_bytes().get(schedule.len()), None | Some(b'?'))
            && matches!(
                host.request_header(":method").as_deref(),
                Some("GET" | "HEAD")
            )
    }

    /// The coming windows as JSON, answered by rollsafe itself.
    fn reply_schedule(&mut self, host: &impl Host, policy: &maintenance::Policy, now: u64) {
        let (doc, max_age) = policy
            .announce
            .schedule(now, || policy.upcoming(now, crate::announce::SCHEDULE_LEN));
        let cache = format!("public, max-age={max_age}");
        self.answered_locally = true;
        host.send_response(
            200,
            &[
                ("content-type", "application/json"),
                ("cache-control", &cache),
            ],
            &doc,
        );
    }

    fn reply_maintenance(
        &mut self,
        host: &impl Host,
        format: RetryAfterFormat,
        now: u64,
        until: u64,
        path: &str,
    ) {
        let seconds = until.saturating_sub(now).div_ceil(1000).max(1);
        let retry_after = match format {
            RetryAfterFormat::Delta => seconds.to_string(),
            RetryAfterFormat::HttpDate => crate::dates::http_date(until.div_ceil(1000)),
        };
        let end = maintenance::format_utc(until);
        let mut ext = serde_json::Map::new();
        ext.insert("maintenance_until".into(), end.clone().into());
        ext.insert("retry_after_s".into(), seconds.into());
        let body = Problem {
            kind: "maintenance",
            title: "Service under maintenance",
            status: 503,
            detail: format!("Planned maintenance until {end}; retry after {seconds} s."),
            instance: Some(path),
            extensions: ext,
        }
        .to_json();
        self.answered_locally = true;
        host.send_response(
            503,
            &[
                ("content-type", problem::CONTENT_TYPE),
                ("retry-after", &retry_after),
                ("cache-control", "no-store"),
            ],
            &body,
        );
    }
}

/// The request's headers for the header-time decisions: the whole map when an exchange will
/// keep it anyway (one hostcall), else one read per header asked for.
struct Headers<'h, H: Host> {
    host: &'h H,
    all: Option<HeaderBlock>,
}

impl<H: Host> Headers<'_, H> {
    fn get(&self, name: &str) -> Option<String> {
        match &self.all {
            Some(all) => all.get(name).map(str::to_string),
            None => self.host.request_header(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;

    #[test]
    fn invalid_config_is_refused_with_its_field_path_logged() {
        let host = FakeHost::default();
        assert!(configure(&host, br#"{"bogus": 1}"#, HostKind::Envoy).is_none());
        let errors = host.logs_at(Level::Error);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("rollsafe: "), "{errors:?}");
        assert!(errors[0].contains("bogus"), "{errors:?}");
    }

    #[test]
    fn semantic_config_errors_are_logged_with_the_field_path() {
        let host = FakeHost::default();
        let cfg = br#"{"maintenance":{"windows":[{"start":"2026-12-05T04:00:00Z","end":"2026-12-05T02:00:00Z"}]}}"#;
        assert!(configure(&host, cfg, HostKind::Envoy).is_none());
        assert_eq!(
            host.logs_at(Level::Error),
            vec![
                "rollsafe: maintenance.windows[0].end: must be after start (2026-12-05T04:00:00Z)"
            ]
        );
    }

    #[test]
    fn empty_config_passes_requests_through_untouched() {
        let host = FakeHost::default();
        let plan = Rc::new(configure(&host, b"", HostKind::Envoy).unwrap());
        let mut req = Request::new(plan);
        host.set_request(&[(":method", "POST"), (":path", "/orders")]);
        assert_eq!(req.on_request_headers(&host, false), Verdict::Continue);
        assert_eq!(req.on_response_headers(&host, false), Verdict::Continue);
        assert!(host.responses().is_empty());
    }

    const WINDOW: &str = r#"{"maintenance":{"windows":[{"start":"2026-12-05T02:00:00Z","end":"2026-12-05T04:00:00Z"}],
        "allow_paths":["/healthz"],
        "bypass_token_sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}}"#;

    fn at(s: &str) -> u64 {
        maintenance::parse_utc(s).unwrap()
    }

    #[test]
    fn inside_a_window_a_request_gets_503_with_retry_after_and_a_problem() {
        let host = FakeHost::at(at("2026-12-05T03:59:58Z") + 500);
        let plan = Rc::new(configure(&host, WINDOW.as_bytes(), HostKind::Envoy).unwrap());
        host.set_request(&[(":method", "POST"), (":path", "/orders?x=1")]);
        let mut req = Request::new(plan);
        assert_eq!(req.on_request_headers(&host, false), Verdict::Pause);
        let sent = host.responses();
        assert_eq!(sent.len(), 1);
        let r = &sent[0];
        assert_eq!(r.status, 503);
        assert_eq!(r.header("retry-after"), Some("2")); // 1.5 s rounded up
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        let doc = r.json();
        assert_eq!(doc["status"], 503);
        assert_eq!(doc["maintenance_until"], "2026-12-05T04:00:00Z");
        assert_eq!(doc["instance"], "/orders");
        // The local reply comes back through the response callback untouched.
        assert_eq!(req.on_response_headers(&host, false), Verdict::Continue);
        assert_eq!(host.counted(Metric::MaintenanceRejected), 1);
    }

    #[test]
    fn outside_a_window_nothing_is_read_from_the_request() {
        let host = FakeHost::at(at("2026-12-05T04:00:00Z"));
        let plan = Rc::new(configure(&host, WINDOW.as_bytes(), HostKind::Envoy).unwrap());
        let mut req = Request::new(plan);
        assert_eq!(req.on_request_headers(&host, false), Verdict::Continue);
        assert_eq!(host.header_reads(), 0);
        assert!(host.responses().is_empty());
    }

    #[test]
    fn the_schedule_path_is_answered_with_or_without_a_query_and_nothing_else_is() {
        let cfg = r#"{"maintenance":{"windows":[{"start":"2026-12-05T02:00:00Z","end":"2026-12-05T04:00:00Z"}],
            "schedule_path":"/.well-known/maintenance"}}"#;
        let host = FakeHost::at(at("2026-12-05T01:00:00Z"));
        let plan = Rc::new(configure(&host, cfg.as_bytes(), HostKind::Envoy).unwrap());
        for (method, path, answered) in [
            ("GET", "/.well-known/maintenance", true),
            ("HEAD", "/.well-known/maintenance", true),
            ("GET", "/.well-known/maintenance?format=json", true),
            ("GET", "/.well-known/maintenance?", true),
            ("POST", "/.well-known/maintenance", false),
            ("GET", "/.well-known/maintenancex", false),
            ("GET", "/.well-known/maintenance/", false),
            ("GET", "/.well-known/maint", false),
            ("GET", "/.well-known", false),
            ("GET", "/", false),
            ("GET", "", false),
        ] {
            let before = host.responses().len();
            host.set_request(&[(":method", method), (":path", path)]);
            let verdict = Request::new(plan.clone()).on_request_headers(&host, true);
            let sent = host.responses();
            assert_eq!(
                sent.len() - before,
                usize::from(answered),
                "{method} {path}"
            );
            assert_eq!(verdict == Verdict::Pause, answered, "{method} {path}");
            if answered {
                let r = &sent[before];
                assert_eq!(r.status, 200, "{method} {path}");
                assert_eq!(r.header("content-type"), Some("application/json"));
                assert_eq!(r.json()["windows"][0]["active"], false, "{method} {path}");
            }
        }
    }

    #[test]
    fn allowlisted_path_and_bypass_token_pass_during_a_window() {
        let host = FakeHost::at(at("2026-12-05T03:00:00Z"));
        let plan = Rc::new(configure(&host, WINDOW.as_bytes(), HostKind::Envoy).unwrap());
        host.set_request(&[(":method", "POST"), (":path", "/healthz")]);
        assert_eq!(
            Request::new(plan.clone()).on_request_headers(&host, true),
            Verdict::Continue
        );
        host.set_request(&[
            (":method", "POST"),
            (":path", "/orders"),
            ("x-maintenance-bypass", "test"),
        ]);
        assert_eq!(
            Request::new(plan.clone()).on_request_headers(&host, true),
            Verdict::Continue
        );
        assert_eq!(host.counted(Metric::MaintenanceBypassed), 1);
        host.set_request(&[
            (":method", "POST"),
            (":path", "/orders"),
            ("x-maintenance-bypass", "nope"),
        ]);
        assert_eq!(
            Request::new(plan).on_request_headers(&host, true),
            Verdict::Pause
        );
        assert!(host.responses().len() == 1);
    }

    #[test]
    fn http_date_retry_after() {
        let cfg = r#"{"maintenance":{"windows":[{"start":"2026-12-05T02:00:00Z","end":"2026-12-05T04:00:00Z"}],"retry_after":"http-date"}}"#;
        let host = FakeHost::at(at("2026-12-05T03:00:00Z"));
        let plan = Rc::new(configure(&host, cfg.as_bytes(), HostKind::Envoy).unwrap());
        host.set_request(&[(":method", "GET"), (":path", "/")]);
        Request::new(plan).on_request_headers(&host, true);
        assert_eq!(
            host.responses()[0].header("retry-after"),
            Some("Sat, 05 Dec 2026 04:00:00 GMT")
        );
    }
}
