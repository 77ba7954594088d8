//! The upstream exchange rollsafe owns: attempts, retries and the final answer.
//!
//! One attempt is always exactly one upstream request, received whole; a client's request
//! never produces a second, parallel copy. Two drivers (HOSTS.md "What follows"):
//! - **native** (Envoy, [`native`]): attempt 1 is the route's own request. A body is held in
//!   the filter until it is whole, then released to the route in one piece (a copy is kept for
//!   retries). The response headers decide: a retryable failure pauses the response, waits its
//!   backoff on the root context's tick and dispatches the next attempt; a final answer streams
//!   to the client (buffered first when it completes an idempotency record).
//! - **dispatch** (Kong's host; on Envoy, requests without a body on request, [`dispatch`]):
//!   every attempt is a `dispatch_http_call` from the request phase, each retry dispatched at
//!   once from the previous answer (the context always has a call pending, or Kong resumes the
//!   request to `proxy_pass`); the final answer goes out with `send_http_response`. After a
//!   failed call Kong's host allows no buffer to be taken: a retry with a body is then carried
//!   by Kong's own `proxy_pass`, and a final answer goes out without a body.
//!
//! The key is decided before either driver runs ([`super::key`]). Both hosts' failure signals
//! become one [`Outcome`]; whether to retry is `retry::Policy`'s decision.

mod answer;
mod dispatch;
mod keyed;
mod native;
mod routed;
mod streamed;

pub use native::classify_native;

use super::headers::HeaderBlock;
use super::key::{self, Gate, Key};
use super::reply::Reply;
use super::{Host, Level, Metric, Warning};
use crate::plan::{Driver, HostKind, Plan};
use crate::retry::{BodyTooLarge, Decision, GiveUp, Outcome, Policy, Report};
use std::rc::Rc;

/// Tells the application that an earlier attempt of this request's key may have executed (its
/// claim ran out of lease with the outcome unknown).
pub const IN_DOUBT_HEADER: &str = "idempotency-in-doubt";

/// What the exchange wants the host to do with the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Continue,
    Pause,
}

/// Where the exchange is: what it waits for, or that it is over. One at a time.
enum Phase {
    /// The request is arriving: its body is held in the filter until whole.
    Receiving,
    /// The shared store was asked for the key's claim (the call's token); the request is held.
    Claiming(u32, Key),
    /// An attempt is out.
    Attempt(Carrier),
    /// Waiting out a backoff (Envoy's root tick) until the next attempt is due.
    Backoff { at: u64 },
    /// The final answer is due from the root's next tick (Envoy: the route's answer is held at
    /// its headers and replaced).
    Answering,
    /// The route's final answer is buffered on its way to the client, to complete the key's
    /// record (native driver).
    Storing(native::Storing),
    /// The key's record was sent to the shared store (the call's token); then this.
    Settling(u32, Then),
    /// Over: rollsafe answered (its reply passes back through the response callbacks and must
    /// be left alone), or the upstream's answer is on its way through.
    Done,
}

/// What carries an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carrier {
    /// rollsafe's own `dispatch_http_call` (the call's token).
    Call(u32),
    /// The route's own request (native attempt 1).
    Route,
    /// Kong's `proxy_pass` (see `hand_to_proxy_pass`): its answer is final.
    ProxyPass,
}

/// What comes after the key's record is written.
enum Then {
    /// Send this answer.
    Reply(Reply),
    /// Let the held response go on (Envoy's native driver).
    Resume,
}

/// An upstream answer kept as the possible final answer.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    headers: HeaderBlock,
    body: Vec<u8>,
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

pub struct Exchange {
    plan: Rc<Plan>,
    driver: Driver,
    key: Option<Key>,
    routed: Option<Routed>,
    /// Where dispatched attempts go: the group's target, `retry.target`, on Kong the route's
    /// Service, or on Envoy the route's cluster.
    target: Option<Rc<str>>,
    /// The target is the route's Service's (Kong, `kong.router.service`).
    from_service: bool,
    /// The request's method, read once.
    method: String,
    /// The request headers as the host gave them (pseudo headers included), kept because a
    /// retry replays them and Envoy shows no request headers in the response phase. Looked
    /// up in place, and borrowed by a dispatched attempt (`dispatch::forward_headers`).
    block: HeaderBlock,
    /// What rollsafe adds to a dispatched attempt's headers (the group, in doubt); the
    /// client's come from `block` (see `dispatch::forward_headers`).
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    declared_len: Option<u64>,
    has_body: bool,
    /// The whole request body is held (or there is none).
    body_done: bool,
    /// When the exchange began, as its deadline counts: at the request's headers, or, for one
    /// that holds the body before any attempt, once it goes on to its first attempt (a replay
    /// or a refusal then reads the clock only once: [`Exchange::started_at`]).
    started_ms: Option<u64>,
    /// Attempts so far (the route's own attempt 1 included).
    attempt: u32,
    phase: Phase,
    /// A wake-up for the scheduler to file, taken once.
    wake_at: Option<u64>,
    /// Backoffs are real waits (Envoy's root tick); false where the host cannot wait (Kong).
    can_wait: bool,
    next_timeout_ms: u64,
    last: Option<Answer>,
    last_outcome: Option<Outcome>,
    /// Envoy: the request headers went on, so the route's upstream request has started.
    route_started: bool,
    /// The route's request has its whole body (native attempt 1).
    route_complete: bool,
    /// Kong's host, inside the callback of a failed call: nothing may take a buffer (see
    /// `on_call_response`), so a local answer goes out without a body.
    buffers_unsafe: bool,
    /// Native: when to renew the key's lease while the route's attempt is still out (its
    /// bound is the route's timeout, which rollsafe cannot see).
    renew_at: Option<u64>,
    /// A keyed request with a body: its key is decided once the body is whole (the
    /// fingerprint covers the body; nothing reaches an upstream before then on either host).
    key_at_body: bool,
    /// The body is too large to hold: it streams to the application once and is never
    /// replayed (`retry.body_too_large: stream`).
    streaming: bool,
    /// This request made a `dispatch_http_call` (an attempt, or a call to the shared store):
    /// on Kong's host its answer may close the client's connection (`crate::reconnect`).
    dispatched: bool,
}

impl Exchange {
    /// Called from request headers. `None`: the exchange is not owned (pass through).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        plan: &Rc<Plan>,
        policy: &Policy,
        driver: Driver,
        host: &impl Host,
        all: HeaderBlock,
        method: String,
        end_of_stream: bool,
        now: &mut impl FnMut() -> u64,
        routed: Option<Routed>,
        service_target: Option<Rc<str>>,
    ) -> (Option<Box<Exchange>>, Step) {
        let group_target = routed.as_ref().and_then(|r| {
            plan.routing
                .as_ref()
                .and_then(|rp| rp.groups.get(r.group))
                .map(|g| g.target.clone())
        });
        // (Both hosts always send `:method`; read as GET if one did not.)
        let method = if method.is_empty() {
            "GET".to_string()
        } else {
            method
        };
        let keyed = plan
            .idempotency
            .as_ref()
            .is_some_and(|ip| ip.applies_to(&method));
        let declared_len = all
            .get("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        let chunked = all.get("transfer-encoding").is_some();
        // Kong never reports end_of_stream on request headers: decide from the framing there.
        let has_body = match plan.host {
            HostKind::Envoy => !end_of_stream,
            HostKind::Kong => declared_len.is_some_and(|n| n > 0) || chunked,
        };
        // On Envoy the route's request starts with the headers whatever the driver; dispatching
        // a request with a body beside it would leave that request holding the body, which
        // Envoy has been seen to release to the route after rollsafe's own answer — a second
        // execution. So there attempt 1 of such a request is always the route's own.
        let driver = match (plan.host, has_body) {
            (HostKind::Envoy, true) => Driver::Native,
            _ => driver,
        };
        let mut ex = Box::new(Exchange {
            plan: Rc::clone(plan),
            driver,
            key: None,
            routed,
            from_service: group_target.is_none()
                && policy.target.is_none()
                && service_target.is_some(),
            target: group_target
                .or_else(|| policy.target.clone())
                .or(service_target),
            method,
            block: all,
            headers: Vec::new(),
            body: Vec::new(),
            declared_len,
            has_body,
            body_done: !has_body,
            started_ms: None,
            attempt: 0,
            phase: Phase::Receiving,
            wake_at: None,
            can_wait: driver == Driver::Native,
            next_timeout_ms: policy.first_timeout_ms(),
            last: None,
            last_outcome: None,
            route_started: false,
            route_complete: false,
            buffers_unsafe: false,
            renew_at: None,
            key_at_body: false,
            streaming: false,
            dispatched: false,
        });
        if keyed && ex.block.get(IN_DOUBT_HEADER).is_some() {
            // Only rollsafe says a try is in doubt (dispatched attempts drop it too).
            host.remove_request_header(IN_DOUBT_HEADER);
        }
        let mut ask = None;
        // (A request without its key, where keys are optional, is decided like any other.)
        ex.key_at_body = keyed
            && has_body
            && plan.idempotency.as_ref().is_some_and(|ip| {
                // (As bytes: a key that is not UTF-8 is there too, and refused with a 400.)
                ip.required || ex.block.get_bytes(&ip.header).is_some()
            });
        if let (Some(ip), false) = (plan.idempotency.as_ref().filter(|_| keyed), has_body) {
            // No body: the key is decided now.
            let body = key::Body::Whole(&[]);
            match key::gate(ip, plan.host, host, &ex.block, &ex.method, body, now()) {
                Gate::Unkeyed => {}
                Gate::Claimed(k) => ex.took_key(host, Some(k)),
                Gate::Answer(reply) => {
                    ex.send_reply(host, &reply);
                    return (Some(ex), Step::Pause);
                }
                Gate::Ask(k, command) => ask = Some((k, command)),
            }
        }
        // (Held first, its body decides whether it goes on at all: the clock waits for that.)
        let holds_body_first = has_body && (driver == Driver::Dispatch || ex.key_at_body);
        if !holds_body_first {
            ex.started_at(policy, now());
        }
        ex.name_group(host);
        // (Kong's host streams from the body callback, which comes once nginx has the body,
        // spilled or not: its headers cannot be held for a claim.)
        let streams_later =
            plan.host == HostKind::Kong && policy.body_too_large == BodyTooLarge::Stream;
        if declared_len.is_some_and(|n| n > policy.max_body_bytes) && !streams_later {
            return ex.body_too_large(policy, host, "larger than retry.max_body_bytes");
        }
        if let Some((k, command)) = ask {
            // Held at its headers until the claim is answered.
            let step = ex.ask(policy, host, k, &command);
            return (Some(ex), step);
        }
        match driver {
            Driver::Dispatch if !has_body => {
                ex.send_attempt(policy, host, Some(now()));
                let step = ex.held_for_attempt();
                (Some(ex), step)
            }
            // Pausing request headers would starve the filter of the body on both hosts.
            // (Kong's host: proxy_pass is not contacted while the filter holds the body.)
            Driver::Dispatch => (Some(ex), Step::Continue),
            Driver::Native => {
                if ex.key_at_body {
                    // A keyed write's attempt is not cut at the route's per-try timeout: it
                    // waits for its answer up to the deadline. The router reads this header
                    // with the request's headers, so it is set now, before the key is decided
                    // (a write that then runs unkeyed is not retried after sending anyway).
                    // Set from the body callback instead, behind the buffer filter, Envoy 1.40
                    // cut the attempt at the per-try timeout all the same (measured with
                    // test_exactly_once.py's slow first attempt): replays and 409s pay for it.
                    if !crate::retry::is_idempotent(&ex.method) {
                        let deadline = policy.deadline_ms.to_string();
                        host.set_request_header("x-envoy-upstream-rq-timeout-ms", &deadline);
                    }
                } else {
                    ex.begin_route_attempt(policy, host, Some(now()));
                }
                (Some(ex), Step::Continue)
            }
        }
    }

    /// When the exchange began (`now` if not yet: it begins now, and counts into the retry
    /// budget's base; one answered before it begins, a replay or a refusal, does not).
    pub(super) fn started_at(&mut self, policy: &Policy, now: u64) -> u64 {
        *self.started_ms.get_or_insert_with(|| {
            policy.note_request(now);
            now
        })
    }

    pub(super) fn method(&self) -> &str {
        &self.method
    }

    pub(super) fn path(&self) -> &str {
        self.block.get(":path").unwrap_or("/")
    }

    /// The body is too large to hold (or the host did not hand it over): the configured
    /// behaviour, logged and counted. A key already claimed is released: nothing ran.
    pub(super) fn body_too_large(
        mut self: Box<Self>,
        policy: &Policy,
        host: &impl Host,
        why: &str,
    ) -> (Option<Box<Exchange>>, Step) {
        host.count(Metric::BodyTooLarge);
        self.settle_key(host, None, false);
        match policy.body_too_large {
            BodyTooLarge::Reject => {
                super::log_limited(host, Level::Warn, Warning::BodyTooLarge, &|| {
                    format!(
                        "rollsafe: {} {}: request body {why}; answered 413",
                        self.method(),
                        self.path()
                    )
                });
                let detail = format!(
                    "The request body is {why} ({} bytes at most), so it cannot be replayed safely.",
                    policy.max_body_bytes
                );
                let reply = Reply::problem(
                    413,
                    "body-too-large",
                    "Request body too large for safe retries",
                    detail,
                    self.path(),
                    None,
                );
                self.send_reply(host, &reply);
                (Some(self), Step::Pause)
            }
            BodyTooLarge::Stream => self.stream_once(policy, host, why),
            BodyTooLarge::PassThrough => {
                super::log_limited(host, Level::Warn, Warning::BodyTooLarge, &|| {
                    format!(
                        "rollsafe: {} {}: request body {why}; forwarded once without retries",
                        self.method(),
                        self.path()
                    )
                });
                (None, Step::Continue)
            }
        }
    }

    /// Request body callback. Returns `None` when the exchange gives up ownership.
    pub fn on_request_body(
        mut self: Box<Self>,
        policy: &Policy,
        host: &impl Host,
        size: usize,
        end_of_stream: bool,
    ) -> (Option<Box<Exchange>>, Step) {
        if matches!(self.phase, Phase::Done) {
            return (Some(self), Step::Pause);
        }
        if self.streaming {
            // Decided already: held while its claim is asked, then it streams on.
            let step = match self.phase {
                Phase::Claiming(..) => Step::Pause,
                _ => Step::Continue,
            };
            return (Some(self), step);
        }
        if self.body_done {
            return (Some(self), Step::Continue);
        }
        // Held until whole: an upstream never sees a partial body, and once Envoy's router has
        // answered (say, a refused connection) it hands the filter no more of the body, so a
        // body still in flight could never be replayed. Envoy keeps the held body buffered and
        // reports its whole size each time.
        if size as u64 > policy.max_body_bytes {
            return self.body_too_large(policy, host, "larger than retry.max_body_bytes");
        }
        if !end_of_stream {
            return (Some(self), Step::Pause);
        }
        let body = host.request_body(size).unwrap_or_default();
        // (A chunked body Kong spilled arrives as nothing at all.)
        let spilled = body.is_empty() && self.has_body && self.plan.host == HostKind::Kong;
        if spilled || self.declared_len.is_some_and(|n| n != body.len() as u64) {
            // Kong spills bodies over client_body_buffer_size to a file and hands the filter
            // nothing: never treat that as an empty body.
            return self.body_too_large(policy, host, "was not handed over by the host");
        }
        self.body = body;
        self.body_done = true;
        // (One clock read serves the key's decision and the lease its attempt starts.)
        let mut now = None;
        if self.key_at_body {
            let at = host.now_ms();
            now = Some(at);
            if let Some(step) = self.decide_key(policy, host, at) {
                return (Some(self), step);
            }
        }
        match self.driver {
            Driver::Dispatch => {
                self.send_attempt(policy, host, now);
                let step = self.held_for_attempt();
                (Some(self), step)
            }
            Driver::Native => {
                self.begin_route_attempt(policy, host, now);
                (Some(self), Step::Continue)
            }
        }
    }

    /// An attempt ended (a dispatched attempt's answer, or the route's own attempt's response
    /// headers): note it, and ask the policy. Returns the wait and the next attempt's timeout
    /// when retrying.
    pub(super) fn after_attempt(
        &mut self,
        policy: &Policy,
        host: &impl Host,
        outcome: Outcome,
        retry_after_ms: Option<u64>,
    ) -> Option<(u64, u64)> {
        self.last_outcome = Some(outcome);
        self.note_outcome(host, outcome);
        if !policy.retries(outcome) || self.streaming {
            // (A streamed body was never held: nothing to send again.)
            return None;
        }
        let now = host.now_ms();
        let report = Report {
            attempt: self.attempt,
            outcome,
            retry_after_ms,
            elapsed_ms: now.saturating_sub(self.started_at(policy, now)),
        };
        match policy.decide(
            self.method(),
            self.key_enforced(),
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
                    GiveUp::Unsafe | GiveUp::Attempts | GiveUp::MayBeExecuting => {
                        Metric::RetryGaveUp
                    }
                });
                if why == GiveUp::MayBeExecuting {
                    host.log(
                        Level::Info,
                        &format!(
                            "rollsafe: {} {}: {} after the write was sent: it may still be executing, so it is not sent again",
                            self.method(),
                            self.path(),
                            outcome.reason()
                        ),
                    );
                }
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

    pub(super) fn schedule(
        &mut self,
        policy: &Policy,
        host: &impl Host,
        wait_ms: u64,
        timeout_ms: u64,
    ) {
        let now = host.now_ms();
        self.next_timeout_ms = timeout_ms;
        if wait_ms == 0 {
            self.send_attempt(policy, host, Some(now));
        } else {
            self.phase = Phase::Backoff { at: now + wait_ms };
            self.wake_at = Some(now + wait_ms);
        }
    }

    /// The backoff wait is over (root tick): send the next attempt.
    pub fn on_wake(&mut self, policy: &Policy, host: &impl Host) {
        let now = host.now_ms();
        match self.phase {
            Phase::Backoff { at } if now >= at => self.send_attempt(policy, host, Some(now)),
            Phase::Answering => self.answer_unknown(policy, host),
            Phase::Attempt(Carrier::Route) if self.renew_at.is_some_and(|at| now >= at) => {
                self.renew_lease(host, now)
            }
            _ => {}
        }
    }

    /// When the exchange wants to be woken (native driver backoff), taken once.
    pub fn take_wake(&mut self) -> Option<u64> {
        self.wake_at.take()
    }

    /// The call this exchange waits for: an attempt, or the shared store.
    pub fn pending(&self) -> Option<u32> {
        match self.phase {
            Phase::Attempt(Carrier::Call(t)) | Phase::Claiming(t, _) | Phase::Settling(t, _) => {
                Some(t)
            }
            _ => None,
        }
    }
}
