//! The upstream exchange rollsafe owns: attempts, retries and the final answer.
//!
//! One interface, two drivers (HOSTS.md "What follows"):
//! - **dispatch** (Kong's host; Envoy on request): the whole body is read in the body callback,
//!   every attempt is a `dispatch_http_call`, each retry is dispatched at once from the call
//!   response (the context always has a call pending, or Kong resumes the request to
//!   `proxy_pass`), and the final answer goes out with `send_http_response`.
//! - **native** (Envoy): a request without a body goes to the route's upstream as attempt 1 and
//!   streams; the response headers decide; a retry pauses the response, waits its backoff on
//!   the root context's tick, dispatches, and answers with `send_http_response`. A request with
//!   a body is held whole first and every attempt is dispatched (still with real backoff):
//!   Envoy stops handing a filter the request body once its router has answered, so a body
//!   still in flight when a connection is refused could never be replayed.
//!
//! Both hosts' failure signals become one [`Outcome`]; the retry decision is `retry::Policy`'s.

use super::{header as find, CallResponse, Host, HostShared, Level, Metric};
use crate::idempotency::{self, Claim, KeyError, Stored};
use crate::plan::{HostKind, Plan};
use crate::problem::{self, Problem};
use crate::retry::{self, BodyTooLarge, Decision, GiveUp, Outcome, Policy, Report};
use std::rc::Rc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Dispatch,
    Native,
}

/// What the exchange wants the host to do with the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Continue,
    Pause,
}

/// An upstream answer kept as the possible final answer.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus
/// `content-length`, which the host recomputes for the bytes it actually sends.
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
    )
}

/// The pod group a hashed request was routed to.
#[derive(Debug, Clone)]
pub struct Routed {
    pub key_hash: u64,
    pub group: usize,
    /// Pinned by `missing_key: group:<name>`: no failover.
    pub fixed: bool,
    /// Groups this exchange already failed on.
    pub tried: Vec<usize>,
}

/// The request's idempotency key, once validated.
struct Idem {
    /// Caller scope and key: what the store is keyed by.
    key: String,
    scope: String,
    /// The claimed slot, while this request owns the key.
    slot: Option<u32>,
}

pub struct Exchange {
    plan: Rc<Plan>,
    idem: Option<Idem>,
    routed: Option<Routed>,
    /// Where dispatched attempts go: `retry.target`, or on Envoy the route's cluster.
    target: Option<String>,
    /// The request headers as the host gave them (pseudo headers included).
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    declared_len: Option<u64>,
    started_ms: u64,
    /// Attempts sent so far.
    attempt: u32,
    pending: Option<u32>,
    /// A wake-up for the scheduler to file, taken once.
    wake_at: Option<u64>,
    /// The next attempt is due at this time (backoff).
    retry_at: Option<u64>,
    /// rollsafe sends every attempt itself (`dispatch`, and `native` for a request with a
    /// body); otherwise attempt 1 is the route's own and streams.
    owns_all: bool,
    /// Backoffs are real waits (Envoy's root tick); false where the host cannot wait (Kong).
    can_wait: bool,
    /// The whole request body is held (or there is none).
    body_done: bool,
    next_timeout_ms: u64,
    last: Option<Answer>,
    last_outcome: Option<Outcome>,
    /// rollsafe answered the request itself; its reply passes back through the response
    /// callbacks and must be left alone.
    pub answered: bool,
    /// Envoy: the route's own upstream (or its router, after a refused connection) answered a
    /// request rollsafe owns, and that response is held. The final answer then rewrites it in
    /// place: a second local reply would never reach the client.
    route_held: Option<RouteHeld>,
    /// The body that replaces the held response's body when it passes.
    rewrite_body: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy)]
struct RouteHeld {
    end_of_stream: bool,
}

impl Exchange {
    /// Called from request headers. `None`: the exchange is not owned (pass through).
    pub fn start(
        plan: &Rc<Plan>,
        policy: &Policy,
        driver: Driver,
        host: &impl Host,
        end_of_stream: bool,
        now: u64,
        routed: Option<Routed>,
    ) -> (Option<Exchange>, Step) {
        let kind = plan.host;
        let group_target = routed.as_ref().and_then(|r| {
            plan.routing
                .as_ref()
                .and_then(|rp| rp.groups.get(r.group))
                .map(|g| g.target.clone())
        });
        // Kept as the host gave it: a retry needs the request (Envoy does not show request
        // headers in the response phase); most requests never retry, so nothing is parsed now.
        let all = host.request_headers();
        let declared_len = find(&all, "content-length").and_then(|v| v.trim().parse::<u64>().ok());
        let chunked = find(&all, "transfer-encoding").is_some();
        // Kong never reports end_of_stream on request headers: decide from the framing there.
        let has_body = match kind {
            HostKind::Envoy => !end_of_stream,
            HostKind::Kong => declared_len.is_some_and(|n| n > 0) || chunked,
        };
        let mut ex = Exchange {
            plan: Rc::clone(plan),
            idem: None,
            routed,
            target: group_target.or_else(|| policy.target.clone()),
            headers: all,
            body: Vec::new(),
            declared_len,
            started_ms: now,
            attempt: 0,
            pending: None,
            wake_at: None,
            retry_at: None,
            owns_all: driver == Driver::Dispatch || has_body,
            can_wait: driver == Driver::Native,
            body_done: !has_body,
            next_timeout_ms: policy.first_timeout_ms(),
            last: None,
            last_outcome: None,
            answered: false,
            route_held: None,
            rewrite_body: None,
        };
        if let Some(ip) = plan
            .idempotency
            .as_ref()
            .filter(|ip| ip.applies_to(ex.method()))
        {
            let values: Vec<&str> = ex
                .headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(&ip.header))
                .map(|(_, v)| v.as_str())
                .collect();
            match idempotency::parse_key(&values) {
                Ok(key) => {
                    let scope = ex.scope_id(ip, host);
                    ex.idem = Some(Idem {
                        key: format!("{scope}:{key}"),
                        scope,
                        slot: None,
                    });
                    // Every attempt of a keyed request is rollsafe's: a duplicate or a refused
                    // request must never reach the application.
                    ex.owns_all = true;
                }
                Err(KeyError::Missing) if !ip.required => {}
                Err(e) => {
                    host.count(Metric::IdemBadKey);
                    let detail = match e {
                        KeyError::Missing => format!("This request needs an {} header.", ip.header),
                        KeyError::Repeated => {
                            format!("The {} header appears more than once.", ip.header)
                        }
                        KeyError::Invalid(why) => {
                            format!("The {} header is invalid: {why}.", ip.header)
                        }
                    };
                    ex.problem(
                        host,
                        400,
                        "idempotency-key-invalid",
                        "Invalid idempotency key",
                        detail,
                        None,
                    );
                    return (Some(ex), Step::Pause);
                }
            }
        }
        if declared_len.is_some_and(|n| n > policy.max_body_bytes) {
            return ex.body_too_large(policy, host, "larger than retry.max_body_bytes");
        }
        policy.note_request(now);
        ex.name_group(host);
        match ex.owns_all {
            true if !has_body => {
                ex.send_attempt(policy, host);
                (Some(ex), Step::Pause)
            }
            // Pausing request headers would starve the filter of the body on both hosts.
            true => (Some(ex), Step::Continue),
            false => {
                // Attempt 1 is the route's own request; Envoy's route config bounds it (its
                // `timeout`) and retries what never reached the application (its
                // `retry_policy`) — see the README's Envoy section. Nothing is written per
                // request here: this path is the one almost every request takes.
                ex.attempt = 1;
                (Some(ex), Step::Continue)
            }
        }
    }

    /// The caller scope: route and hashed headers, as configured.
    fn scope_id(&self, ip: &idempotency::Policy, host: &impl Host) -> String {
        let route = ip
            .scope
            .contains(&idempotency::ScopePart::Route)
            .then(|| {
                [
                    &["xds", "route_name"][..],
                    &["kong", "route_id"][..],
                    &["plugin_root_id"][..],
                ]
                .iter()
                .find_map(|path| host.property(path).filter(|v| !v.is_empty()))
                .map(|v| String::from_utf8_lossy(&v).into_owned())
            })
            .flatten();
        let parts: Vec<Option<&str>> = ip
            .scope
            .iter()
            .map(|p| match p {
                idempotency::ScopePart::Route => route.as_deref(),
                idempotency::ScopePart::Header(name) => find(&self.headers, name),
            })
            .collect();
        idempotency::scope_id(&parts)
    }

    /// Answers with a problem document (and optional `Retry-After`).
    fn problem(
        &mut self,
        host: &impl Host,
        status: u32,
        kind: &str,
        title: &str,
        detail: String,
        retry_after_s: Option<u64>,
    ) {
        self.answered = true;
        let path = self.path().to_string();
        let body = Problem {
            kind,
            title,
            status,
            detail,
            instance: Some(&path),
            extensions: Default::default(),
        }
        .to_json();
        let ra = retry_after_s.map(|s| s.to_string());
        let mut headers = vec![("content-type", problem::CONTENT_TYPE)];
        if let Some(ra) = &ra {
            headers.push(("retry-after", ra));
        }
        self.deliver(host, status, &headers, body);
    }

    fn method(&self) -> &str {
        find(&self.headers, ":method").unwrap_or("GET")
    }

    fn path(&self) -> &str {
        find(&self.headers, ":path").unwrap_or("/")
    }

    /// The body is too large to hold (or the host did not hand it over): the configured
    /// behaviour, logged and counted.
    fn body_too_large(
        mut self,
        policy: &Policy,
        host: &impl Host,
        why: &str,
    ) -> (Option<Exchange>, Step) {
        host.count(Metric::BodyTooLarge);
        match policy.body_too_large {
            BodyTooLarge::Reject => {
                host.log(
                    Level::Warn,
                    &format!(
                        "rollsafe: {} {}: request body {why}; answered 413",
                        self.method(),
                        self.path()
                    ),
                );
                let body = Problem {
                    kind: "body-too-large",
                    title: "Request body too large for safe retries",
                    status: 413,
                    detail: format!(
                        "The request body is {why} ({} bytes at most), so it cannot be replayed safely.",
                        policy.max_body_bytes
                    ),
                    instance: Some(self.path()),
                    extensions: Default::default(),
                }
                .to_json();
                self.answered = true;
                host.send_response(413, &[("content-type", problem::CONTENT_TYPE)], &body);
                (Some(self), Step::Pause)
            }
            BodyTooLarge::PassThrough => {
                host.log(
                    Level::Warn,
                    &format!(
                        "rollsafe: {} {}: request body {why}; forwarded once without retries",
                        self.method(),
                        self.path()
                    ),
                );
                (None, Step::Continue)
            }
        }
    }

    /// Request body callback. Returns `None` when the exchange gives up ownership.
    pub fn on_request_body(
        mut self,
        policy: &Policy,
        host: &impl Host,
        size: usize,
        end_of_stream: bool,
    ) -> (Option<Exchange>, Step) {
        if self.answered {
            return (Some(self), Step::Pause);
        }
        if !self.owns_all {
            // Native attempt 1 streams; nothing to hold.
            return (Some(self), Step::Continue);
        }
        // Envoy keeps the paused body buffered and reports its whole size each time. A body
        // must be whole before any attempt: once Envoy's router has answered (say, a refused
        // connection), it hands the filter no more of the body, so it could never be replayed.
        if size as u64 > policy.max_body_bytes {
            return self.body_too_large(policy, host, "larger than retry.max_body_bytes");
        }
        if !end_of_stream {
            return (Some(self), Step::Pause);
        }
        let body = host.request_body(size).unwrap_or_default();
        if self.declared_len.is_some_and(|n| n != body.len() as u64) {
            // Kong spills bodies over client_body_buffer_size to a file and hands the filter
            // nothing: never treat that as an empty body.
            return self.body_too_large(policy, host, "was not handed over by the host");
        }
        self.body = body;
        self.body_done = true;
        self.send_attempt(policy, host);
        (Some(self), Step::Pause)
    }

    /// Response headers from the route's upstream (or a local reply passing back).
    pub fn on_response_headers(
        &mut self,
        policy: &Policy,
        host: &impl Host,
        end_of_stream: bool,
    ) -> Step {
        if self.answered {
            return Step::Continue;
        }
        match self.owns_all {
            // The route's upstream only ever saw headers; its early answer must not leak.
            true if !self.body_done => {
                // The route answered before the body was whole, and no more of it will come:
                // nothing can be replayed, so its answer goes to the client as it is.
                self.answered = true;
                host.count(Metric::RetryGaveUp);
                host.log(
                    Level::Info,
                    &format!(
                        "rollsafe: {} {}: the route answered before the request body was whole; passed through",
                        self.method(), self.path()
                    ),
                );
                Step::Continue
            }
            true => {
                self.route_held = Some(RouteHeld { end_of_stream });
                Step::Pause
            }
            false => {
                let status = host
                    .response_header(":status")
                    .and_then(|s| s.parse::<u16>().ok())
                    .unwrap_or(0);
                // Only a 5xx can be one Envoy made up after a failure: read details then only.
                let details = (status >= 500 || status == 0)
                    .then(|| host.property(&["response", "code_details"]))
                    .flatten()
                    .map(|b| String::from_utf8_lossy(&b).into_owned());
                let outcome = classify_native(status, details.as_deref());
                if status >= 500 || status == 0 {
                    host.log(
                        Level::Debug,
                        &format!(
                            "rollsafe: {} {}: attempt {} ended {status} ({}): {outcome:?}",
                            self.method(),
                            self.path(),
                            self.attempt,
                            details.as_deref().unwrap_or("-")
                        ),
                    );
                }
                let retry_after = host
                    .response_header("retry-after")
                    .and_then(|v| retry::parse_retry_after(&v, host.now_ms()));
                self.last_outcome = Some(outcome);
                self.note_outcome(host, outcome);
                match self.decide(policy, host, outcome, retry_after) {
                    Some((wait_ms, timeout_ms)) => {
                        self.schedule(policy, host, wait_ms, timeout_ms);
                        Step::Pause
                    }
                    None => {
                        if let Some(h) = &policy.attempt_count_header {
                            host.set_response_header(h, &self.attempt.to_string());
                        }
                        Step::Continue
                    }
                }
            }
        }
    }

    /// The held route response's body passing after a rewrite: replaced by the final answer.
    pub fn on_response_body(&mut self, host: &impl Host, size: usize, end_of_stream: bool) -> Step {
        if self.rewrite_body.is_none() {
            return Step::Continue;
        }
        if !end_of_stream {
            return Step::Pause;
        }
        if let Some(body) = self.rewrite_body.take() {
            host.replace_response_body(size, &body);
        }
        Step::Continue
    }

    /// The answer to a dispatched attempt.
    pub fn on_call_response(
        &mut self,
        policy: &Policy,
        host: &impl Host,
        token: u32,
        body_size: usize,
    ) {
        if self.pending != Some(token) || self.answered {
            return;
        }
        self.pending = None;
        let resp = host.call_response(body_size);
        let (outcome, answer) = classify_call(resp);
        host.log(
            Level::Debug,
            &format!(
                "rollsafe: {} {}: attempt {}: {outcome:?}",
                self.method(),
                self.path(),
                self.attempt
            ),
        );
        let retry_after = answer
            .as_ref()
            .and_then(|a| find(&a.headers, "retry-after"))
            .and_then(|v| retry::parse_retry_after(v, host.now_ms()));
        self.last_outcome = Some(outcome);
        self.note_outcome(host, outcome);
        if answer.is_some() {
            self.last = answer;
        }
        match self.decide(policy, host, outcome, retry_after) {
            Some((wait_ms, timeout_ms)) => self.schedule(policy, host, wait_ms, timeout_ms),
            None => self.answer(policy, host),
        }
    }

    /// The backoff wait is over (root tick): send the next attempt.
    pub fn on_wake(&mut self, policy: &Policy, host: &impl Host) {
        if self.answered || self.pending.is_some() {
            return;
        }
        if self.retry_at.is_some_and(|at| host.now_ms() >= at) {
            self.send_attempt(policy, host);
        }
    }

    /// When the exchange wants to be woken (native driver backoff), taken once.
    pub fn take_wake(&mut self) -> Option<u64> {
        self.wake_at.take()
    }

    pub fn pending(&self) -> Option<u32> {
        self.pending
    }

    /// Asks the policy; returns the wait and the next attempt's timeout when retrying.
    fn decide(
        &mut self,
        policy: &Policy,
        host: &impl Host,
        outcome: Outcome,
        retry_after_ms: Option<u64>,
    ) -> Option<(u64, u64)> {
        if !policy.retries(outcome) {
            return None;
        }
        let now = host.now_ms();
        let report = Report {
            attempt: self.attempt,
            outcome,
            retry_after_ms,
            elapsed_ms: now.saturating_sub(self.started_ms),
        };
        let key_enforced = self.idem.as_ref().is_some_and(|i| i.slot.is_some());
        match policy.decide(
            self.method(),
            key_enforced,
            &report,
            self.can_wait,
            now,
            host.random(),
        ) {
            Decision::Done => None,
            Decision::Retry {
                wait_ms,
                timeout_ms,
            } => {
                host.count(match outcome {
                    Outcome::Status(502) => Metric::Retry502,
                    Outcome::Status(503) => Metric::Retry503,
                    Outcome::Status(504) => Metric::Retry504,
                    Outcome::ConnectFailure => Metric::RetryConnectFailure,
                    Outcome::Reset => Metric::RetryReset,
                    Outcome::Timeout | Outcome::Status(_) => Metric::RetryTimeout,
                });
                Some((wait_ms, timeout_ms))
            }
            Decision::GiveUp(why) => {
                host.count(match why {
                    GiveUp::Budget => Metric::RetryBudgetExhausted,
                    GiveUp::Deadline => Metric::RetryDeadlineExceeded,
                    GiveUp::Unsafe | GiveUp::Attempts => Metric::RetryGaveUp,
                });
                if why == GiveUp::Unsafe {
                    host.log(
                        Level::Info,
                        &format!(
                            "rollsafe: {} {}: {} after the request may have reached the application; not retried (RFC 9110 9.2.2)",
                            self.method(),
                            self.path(),
                            outcome.reason()
                        ),
                    );
                }
                None
            }
        }
    }

    fn schedule(&mut self, policy: &Policy, host: &impl Host, wait_ms: u64, timeout_ms: u64) {
        let now = host.now_ms();
        self.next_timeout_ms = timeout_ms;
        self.retry_at = Some(now + wait_ms);
        if wait_ms == 0 {
            self.send_attempt(policy, host);
        } else {
            self.wake_at = self.retry_at;
        }
    }

    fn send_attempt(&mut self, policy: &Policy, host: &impl Host) {
        if !self.claim_key(host) {
            return;
        }
        self.reroute(host);
        if self.target.is_none() {
            self.target = route_cluster(host);
        }
        let target = self.target.clone().unwrap_or_default();
        let forward = forward_headers(&self.headers);
        let headers: Vec<(&str, &str)> = forward
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        match host.dispatch(&target, &headers, &self.body, self.next_timeout_ms) {
            Ok(token) => {
                self.attempt += 1;
                self.pending = Some(token);
                self.retry_at = None;
                host.count(Metric::Attempts);
            }
            Err(e) => {
                host.log(
                    Level::Error,
                    &format!("rollsafe: cannot send an attempt to {target:?}: {e}"),
                );
                self.last_outcome = Some(Outcome::ConnectFailure);
                self.answer(policy, host);
            }
        }
    }

    /// Names the routed group: on rollsafe's own attempts only when it sends every attempt
    /// (the live request then goes to the route's normal target, which holds the stream while
    /// the body is held — a dead group's cluster would make Envoy's router answer before the
    /// body is whole); on the live request when it is attempt 1.
    fn name_group(&mut self, host: &impl Host) {
        let plan = Rc::clone(&self.plan);
        let (Some(rp), Some(r)) = (plan.routing.as_ref(), self.routed.as_ref()) else {
            return;
        };
        let Some(g) = rp.groups.get(r.group) else {
            return;
        };
        // Dispatched attempts carry it in any case (a retry replays these headers).
        self.headers.push((rp.group_header.clone(), g.name.clone()));
        if !self.owns_all {
            super::flow::name_group(host, plan.host, &rp.group_header, &g.name, &g.target);
        }
    }

    /// Group health: a failed attempt counts against its group; a good one clears it.
    fn note_outcome(&mut self, host: &impl Host, outcome: Outcome) {
        let plan = Rc::clone(&self.plan);
        let (Some(rp), Some(r)) = (plan.routing.as_ref(), self.routed.as_mut()) else {
            return;
        };
        let failed = match outcome {
            Outcome::Status(s) => s >= 500,
            Outcome::ConnectFailure | Outcome::Reset | Outcome::Timeout => true,
        };
        if failed {
            if rp.failed(r.group, host.now_ms()) {
                host.count(Metric::RoutingGroupDown);
                let name = rp.groups.get(r.group).map_or("?", |g| g.name.as_str());
                host.log(Level::Warn, &format!("rollsafe: group {name} marked down"));
            }
            r.tried.push(r.group);
        } else {
            rp.succeeded(r.group);
        }
    }

    /// A retry of a routed request goes to the key's next group that is up and untried.
    fn reroute(&mut self, host: &impl Host) {
        let plan = Rc::clone(&self.plan);
        let (Some(rp), Some(r)) = (plan.routing.as_ref(), self.routed.as_mut()) else {
            return;
        };
        if r.fixed || r.tried.is_empty() {
            return;
        }
        let next = rp.pick(r.key_hash, host.now_ms(), &r.tried);
        if next == r.group {
            return;
        }
        host.count(Metric::RoutingFailover);
        r.group = next;
        if let Some(g) = rp.groups.get(next) {
            self.target = Some(g.target.clone());
            for (k, v) in self.headers.iter_mut() {
                if k.eq_ignore_ascii_case(&rp.group_header) {
                    *v = g.name.clone();
                }
            }
        }
    }

    /// Before the first attempt of a keyed request: claim the key, or answer from the store.
    /// Returns whether the attempt may go out.
    fn claim_key(&mut self, host: &impl Host) -> bool {
        let plan = Rc::clone(&self.plan);
        let (Some(ip), Some(idem)) = (plan.idempotency.as_ref(), self.idem.as_ref()) else {
            return true;
        };
        if idem.slot.is_some() {
            return true;
        }
        let fp = idempotency::fingerprint(self.method(), self.path(), &idem.scope, &self.body);
        let now = host.now_ms();
        let key = idem.key.clone();
        match idempotency::claim(&HostShared(host), ip.slots, &key, &fp, now, ip.lease_ms) {
            Claim::Claimed { slot } => {
                if let Some(i) = self.idem.as_mut() {
                    i.slot = Some(slot);
                }
                true
            }
            Claim::InFlight {
                same: true,
                retry_after_ms,
            } => {
                host.count(Metric::IdemInFlight);
                let detail =
                    "A request with this idempotency key is still being processed.".to_string();
                let secs = retry_after_ms.div_ceil(1000).max(1);
                self.problem(
                    host,
                    409,
                    "idempotency-key-in-flight",
                    "Request in progress",
                    detail,
                    Some(secs),
                );
                false
            }
            Claim::InFlight { same: false, .. } | Claim::Done { same: false, .. } => {
                host.count(Metric::IdemMismatch);
                let detail = "This idempotency key was used with a different request.".to_string();
                self.problem(
                    host,
                    422,
                    "idempotency-key-reused",
                    "Idempotency key reused",
                    detail,
                    None,
                );
                false
            }
            Claim::Done { same: true, stored } => {
                host.count(Metric::IdemReplayed);
                self.answered = true;
                let mut headers: Vec<(&str, &str)> = stored
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                headers.push(("idempotent-replayed", "true"));
                if stored.body_omitted {
                    headers.push(("idempotent-replay-body", "omitted"));
                }
                self.deliver(host, u32::from(stored.status), &headers, stored.body);
                false
            }
            Claim::Full => {
                host.count(Metric::IdemStoreFull);
                host.log(Level::Warn, "rollsafe: idempotency store full");
                match ip.when_full {
                    idempotency::WhenFull::Reject => {
                        let detail =
                            "The idempotency store is full; try again shortly.".to_string();
                        self.problem(
                            host,
                            503,
                            "idempotency-store-full",
                            "Idempotency store full",
                            detail,
                            Some(1),
                        );
                        false
                    }
                    idempotency::WhenFull::PassThrough => {
                        // Unprotected: the request runs once, under the plain retry rules.
                        self.idem = None;
                        true
                    }
                }
            }
        }
    }

    /// Completes the claimed record with a storable answer, or releases it so the client's
    /// next try runs.
    fn settle_key(&mut self, host: &impl Host, answer: Option<&Answer>) {
        let plan = Rc::clone(&self.plan);
        let (Some(ip), Some(idem)) = (plan.idempotency.as_ref(), self.idem.as_mut()) else {
            return;
        };
        let Some(slot) = idem.slot.take() else {
            return;
        };
        let done = answer.filter(|a| ip.stores(a.status)).map(|a| {
            let keep = a.body.len() <= ip.max_response_bytes;
            let stored = Stored {
                status: a.status,
                headers: a
                    .headers
                    .iter()
                    .filter(|(k, _)| ip.replay_headers.iter().any(|h| k.eq_ignore_ascii_case(h)))
                    .cloned()
                    .collect(),
                body: if keep { a.body.clone() } else { Vec::new() },
                body_omitted: !keep,
            };
            (stored, host.now_ms() + ip.ttl_ms)
        });
        let stored = done.is_some();
        if idempotency::finish(&HostShared(host), slot, &idem.key, done) {
            host.count(if stored {
                Metric::IdemStored
            } else {
                Metric::IdemReleased
            });
        }
    }

    /// Sends the final answer: the last upstream answer, or a problem when there is none.
    fn answer(&mut self, policy: &Policy, host: &impl Host) {
        let last = self.last.take();
        self.settle_key(host, last.as_ref());
        self.last = last;
        self.answered = true;
        let attempts = self.attempt.to_string();
        let count_header = policy.attempt_count_header.as_deref();
        if let Some(a) = self.last.take() {
            let mut headers: Vec<(&str, &str)> = a
                .headers
                .iter()
                .filter(|(k, _)| !k.starts_with(':') && !is_hop_by_hop(k))
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            if let Some(h) = count_header {
                headers.push((h, &attempts));
            }
            self.deliver(host, u32::from(a.status), &headers, a.body.clone());
            return;
        }
        let (status, kind, title) = match self.last_outcome {
            Some(Outcome::Timeout) | None => (504, "upstream-timeout", "Upstream timed out"),
            Some(_) => (502, "upstream-unreachable", "Upstream unreachable"),
        };
        let mut ext = serde_json::Map::new();
        ext.insert("attempts".into(), self.attempt.into());
        let body = Problem {
            kind,
            title,
            status,
            detail: format!(
                "No answer from the upstream after {} attempt(s); last failure: {}.",
                self.attempt,
                self.last_outcome.map_or("none", |o| o.reason())
            ),
            instance: Some(self.path()),
            extensions: ext,
        }
        .to_json();
        let mut headers = vec![("content-type", problem::CONTENT_TYPE)];
        if let Some(h) = count_header {
            headers.push((h, &attempts));
        }
        self.deliver(host, status, &headers, body);
    }

    /// A local reply, or — when the route's own response is held — that response rewritten.
    fn deliver(&mut self, host: &impl Host, status: u32, headers: &[(&str, &str)], body: Vec<u8>) {
        host.log(
            Level::Debug,
            &format!(
                "rollsafe: {} {}: answer {status} after {} attempt(s){}",
                self.method(),
                self.path(),
                self.attempt,
                if self.route_held.is_some() {
                    " (rewriting the held route response)"
                } else {
                    ""
                }
            ),
        );
        match self.route_held {
            None => host.send_response(status, headers, &body),
            Some(held) => {
                if held.end_of_stream && !body.is_empty() {
                    host.log(
                        Level::Warn,
                        &format!(
                            "rollsafe: {} {}: held response had no body; answer body dropped",
                            self.method(),
                            self.path()
                        ),
                    );
                }
                let len = if held.end_of_stream { 0 } else { body.len() };
                let len = len.to_string();
                let mut all = headers.to_vec();
                all.push(("content-length", &len));
                if !held.end_of_stream {
                    self.rewrite_body = Some(body);
                }
                host.rewrite_response(status, &all);
            }
        }
    }
}

/// The cluster Envoy's route chose for this request.
fn route_cluster(host: &impl Host) -> Option<String> {
    [&["xds", "cluster_name"][..], &["cluster_name"][..]]
        .iter()
        .find_map(|path| host.property(path))
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|s| !s.is_empty())
}

/// The request headers rollsafe sends on a dispatched attempt.
fn forward_headers(all: &[(String, String)]) -> Vec<(String, String)> {
    let authority = find(all, ":authority")
        .or_else(|| find(all, "host"))
        .unwrap_or("localhost");
    let mut out = vec![
        (
            ":method".to_string(),
            find(all, ":method").unwrap_or("GET").to_string(),
        ),
        (
            ":path".to_string(),
            find(all, ":path").unwrap_or("/").to_string(),
        ),
        (":authority".to_string(), authority.to_string()),
        (
            ":scheme".to_string(),
            find(all, ":scheme").unwrap_or("http").to_string(),
        ),
    ];
    out.extend(
        all.iter()
            .filter(|(k, _)| !k.starts_with(':') && !is_hop_by_hop(k) && k != "host")
            .cloned(),
    );
    out
}

/// Envoy's router: `response.code_details` tells a real upstream answer (`via_upstream`) from
/// one Envoy made up after a connection failure, a reset or a timeout.
pub fn classify_native(status: u16, details: Option<&str>) -> Outcome {
    let Some(d) = details else {
        return Outcome::Status(status);
    };
    if d == "via_upstream" {
        Outcome::Status(status)
    } else if d.contains("connection_failure") || d.contains("no_healthy_upstream") {
        Outcome::ConnectFailure
    } else if d.contains("timeout") {
        Outcome::Timeout
    } else if d.contains("upstream_reset") {
        Outcome::Reset
    } else {
        Outcome::Status(status)
    }
}

/// A dispatched attempt's answer. Kong reports failures as no headers plus `:dispatch_status`;
/// Envoy synthesizes 503/504 answers whose bodies say what failed.
fn classify_call(resp: CallResponse) -> (Outcome, Option<Answer>) {
    let status = find(&resp.headers, ":status").and_then(|s| s.trim().parse::<u16>().ok());
    let Some(status) = status else {
        let outcome = match find(&resp.headers, ":dispatch_status") {
            Some("timeout") => Outcome::Timeout,
            // Nothing was sent to the application yet.
            Some("resolver failure") | Some("tls handshake failure") => Outcome::ConnectFailure,
            // "broken connection" covers refused connections and resets after sending alike:
            // the request may have reached the application.
            _ => Outcome::Reset,
        };
        return (outcome, None);
    };
    // Envoy's own answers after a failure carry these bodies (an Envoy sidecar in the pod says
    // the same when the application container is gone — equally never reached).
    let text = resp
        .body
        .get(..resp.body.len().min(512))
        .unwrap_or_default();
    let text = String::from_utf8_lossy(text);
    if text.starts_with("upstream connect error or disconnect/reset before headers") {
        return if text.contains("connection failure") || text.contains("Connection refused") {
            (Outcome::ConnectFailure, None)
        } else {
            (Outcome::Reset, None)
        };
    }
    if status == 503 && text.starts_with("no healthy upstream") {
        return (Outcome::ConnectFailure, None);
    }
    if status == 504 && text.starts_with("upstream request timeout") {
        return (Outcome::Timeout, None);
    }
    let answer = Answer {
        status,
        headers: resp.headers,
        body: resp.body,
    };
    (Outcome::Status(status), Some(answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(headers: &[(&str, &str)], body: &str) -> CallResponse {
        CallResponse {
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn both_hosts_failure_signals_become_one_outcome() {
        let cases = [
            (resp(&[(":dispatch_status", "timeout")], ""), Outcome::Timeout),
            (resp(&[(":dispatch_status", "broken connection")], ""), Outcome::Reset),
            (resp(&[(":dispatch_status", "resolver failure")], ""), Outcome::ConnectFailure),
            (resp(&[], ""), Outcome::Reset),
            (
                resp(
                    &[(":status", "503"), ("content-type", "text/plain")],
                    "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure, transport failure reason: delayed connect error: Connection refused",
                ),
                Outcome::ConnectFailure,
            ),
            (
                resp(
                    &[(":status", "503")],
                    "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
                ),
                Outcome::Reset,
            ),
            (resp(&[(":status", "504")], "upstream request timeout"), Outcome::Timeout),
            (resp(&[(":status", "503")], "no healthy upstream"), Outcome::ConnectFailure),
            (resp(&[(":status", "503"), ("date", "x")], "busy"), Outcome::Status(503)),
            (resp(&[(":status", "201"), ("server", "pod")], "{}"), Outcome::Status(201)),
        ];
        for (r, want) in cases {
            assert_eq!(classify_call(r).0, want);
        }
        assert_eq!(
            classify_native(503, Some("via_upstream")),
            Outcome::Status(503)
        );
        assert_eq!(
            classify_native(
                503,
                Some("upstream_reset_before_response_started{remote_connection_failure}")
            ),
            Outcome::ConnectFailure
        );
        assert_eq!(
            classify_native(
                503,
                Some("upstream_reset_before_response_started{connection_termination}")
            ),
            Outcome::Reset
        );
        assert_eq!(
            classify_native(504, Some("upstream_response_timeout")),
            Outcome::Timeout
        );
        assert_eq!(classify_native(200, None), Outcome::Status(200));
    }

    #[test]
    fn forwarded_headers_drop_hop_by_hop_and_keep_the_request() {
        let all: Vec<(String, String)> = [
            (":method", "POST"),
            (":path", "/orders?x=1"),
            ("host", "api.example"),
            ("connection", "keep-alive"),
            ("content-length", "2"),
            ("idempotency-key", "\"k1\""),
            ("transfer-encoding", "chunked"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let f = forward_headers(&all);
        let names: Vec<&str> = f.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                ":method",
                ":path",
                ":authority",
                ":scheme",
                "idempotency-key"
            ]
        );
        assert_eq!(find(&f, ":authority"), Some("api.example"));
    }
}
