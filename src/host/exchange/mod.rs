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

mod dispatch;
mod native;

pub use native::classify_native;

use super::headers::HeaderBlock;
use super::key::{self, Final, Gate, Key};
use super::reply::Reply;
use super::{header as find, Host, Level, Metric};
use crate::plan::{Driver, HostKind, Plan};
use crate::retry::{BodyTooLarge, Decision, GiveUp, Outcome, Policy, Report};
use std::rc::Rc;

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

pub struct Exchange {
    plan: Rc<Plan>,
    driver: Driver,
    key: Option<Key>,
    routed: Option<Routed>,
    /// Where dispatched attempts go: the group's target, `retry.target`, or on Envoy the
    /// route's cluster.
    target: Option<String>,
    /// The request's method, read once.
    method: String,
    /// The request headers as the host gave them (pseudo headers included), kept because a
    /// retry replays them and Envoy shows no request headers in the response phase. Looked
    /// up in place; turned into `headers` only when a retry or a key needs them.
    block: Option<HeaderBlock>,
    /// The headers a dispatched attempt carries (see `replay_headers`); until then, only
    /// what rollsafe adds (the group header).
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    declared_len: Option<u64>,
    has_body: bool,
    /// The whole request body is held (or there is none).
    body_done: bool,
    started_ms: u64,
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
        now: u64,
        routed: Option<Routed>,
    ) -> (Option<Exchange>, Step) {
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
        let mut ex = Exchange {
            plan: Rc::clone(plan),
            driver,
            key: None,
            routed,
            target: group_target.or_else(|| policy.target.clone()),
            method,
            block: Some(all),
            headers: Vec::new(),
            body: Vec::new(),
            declared_len,
            has_body,
            body_done: !has_body,
            started_ms: now,
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
        };
        if declared_len.is_some_and(|n| n > policy.max_body_bytes) {
            return ex.body_too_large(policy, host, "larger than retry.max_body_bytes");
        }
        let mut ask = None;
        ex.key_at_body = keyed && has_body;
        if let (Some(ip), Some(block), false) = (
            plan.idempotency.as_ref().filter(|_| keyed),
            &ex.block,
            has_body,
        ) {
            // No body: the key is decided now.
            match key::gate(ip, plan.host, host, block, &[], now) {
                Gate::Unkeyed => {}
                Gate::Claimed(k) => ex.key = Some(k),
                Gate::Answer(reply) => {
                    ex.send_reply(host, &reply);
                    return (Some(ex), Step::Pause);
                }
                Gate::Ask(k, command) => ask = Some((k, command)),
            }
        }
        policy.note_request(now);
        ex.name_group(host);
        if let Some((k, command)) = ask {
            // Held at its headers until the claim is answered.
            let step = ex.ask(policy, host, k, &command);
            return (Some(ex), step);
        }
        match driver {
            Driver::Dispatch if !has_body => {
                ex.send_attempt(policy, host);
                (Some(ex), Step::Pause)
            }
            // Pausing request headers would starve the filter of the body on both hosts.
            // (Kong's host: proxy_pass is not contacted while the filter holds the body.)
            Driver::Dispatch => (Some(ex), Step::Continue),
            Driver::Native => {
                // A keyed body's attempt starts once its key is decided.
                if !ex.key_at_body {
                    ex.begin_route_attempt(policy, host);
                }
                (Some(ex), Step::Continue)
            }
        }
    }

    fn method(&self) -> &str {
        &self.method
    }

    /// Sends the shared store the key's claim; the request stays held until its answer.
    fn ask(&mut self, policy: &Policy, host: &impl Host, k: Key, command: &[u8]) -> Step {
        let plan = Rc::clone(&self.plan);
        let Some(redis) = plan.idempotency.as_ref().and_then(|ip| ip.shared.as_ref()) else {
            return Step::Continue;
        };
        match key::send(redis, host, command) {
            Some(token) => {
                self.phase = Phase::Claiming(token, k);
                Step::Pause
            }
            None => self.claim_answered(policy, host, k, None, &[]),
        }
    }

    /// The shared store answered the claim (`status: None`: it did not): run the request, or
    /// answer it.
    fn claim_answered(
        &mut self,
        policy: &Policy,
        host: &impl Host,
        k: Key,
        status: Option<u16>,
        body: &[u8],
    ) -> Step {
        let plan = Rc::clone(&self.plan);
        let Some(ip) = plan.idempotency.as_ref() else {
            return Step::Continue;
        };
        match key::claimed(k, ip, host, status, body, self.path()) {
            Ok(k) => self.key = k,
            Err(reply) => {
                self.send_reply(host, &reply);
                return Step::Pause;
            }
        }
        match self.driver {
            Driver::Native => {
                // Only now do the headers (and then the body) go on to the route.
                self.begin_route_attempt(policy, host);
                host.resume_request();
                Step::Continue
            }
            Driver::Dispatch if self.buffers_unsafe && !self.body.is_empty() => {
                self.hand_to_proxy_pass(host, "the idempotency store's failed call");
                Step::Continue
            }
            Driver::Dispatch => {
                self.send_attempt(policy, host);
                Step::Pause
            }
        }
    }

    /// An answer from the shared store: `true` when it was one this exchange waits for.
    fn on_store_answer(
        &mut self,
        policy: &Policy,
        host: &impl Host,
        token: u32,
        body_size: usize,
    ) -> bool {
        let waits =
            matches!(&self.phase, Phase::Claiming(t, _) | Phase::Settling(t, _) if *t == token);
        if !waits {
            return false;
        }
        let phase = std::mem::replace(&mut self.phase, Phase::Receiving);
        let resp = host.call_response(body_size);
        let status = key::status_of(&resp);
        // Kong's host: after a failed call nothing may take a buffer (see `on_call_response`),
        // and the same holds after an answer without a body (Webdis's 503 while Redis is
        // down): a local answer with a body sent from this callback left nginx writing a
        // zero-size buffer and the client's connection closed unanswered.
        self.buffers_unsafe =
            self.plan.host == HostKind::Kong && (status.is_none() || resp.body.is_empty());
        match phase {
            Phase::Claiming(_, k) => {
                self.claim_answered(policy, host, k, status, &resp.body);
            }
            Phase::Settling(_, then) => {
                let plan = Rc::clone(&self.plan);
                if let (Some(ip), Some(k)) = (plan.idempotency.as_ref(), self.key.as_mut()) {
                    k.settled(ip, host, status, &resp.body);
                }
                self.then(host, then);
            }
            other => self.phase = other,
        }
        self.buffers_unsafe = false;
        true
    }

    fn then(&mut self, host: &impl Host, then: Then) {
        match then {
            Then::Reply(reply) => self.send_reply(host, &reply),
            Then::Resume => {
                self.phase = Phase::Done;
                host.resume_response();
            }
        }
    }

    fn path(&self) -> &str {
        self.block
            .as_ref()
            .and_then(|b| b.get(":path"))
            .or_else(|| find(&self.headers, ":path"))
            .unwrap_or("/")
    }

    /// The request's headers as a dispatched attempt replays them, built from the block the
    /// first time: the client's own group header never passes (only rollsafe names groups).
    fn replay_headers(&mut self) -> &mut Vec<(String, String)> {
        if let Some(block) = self.block.take() {
            let plan = Rc::clone(&self.plan);
            let group = plan.routing.as_ref().map(|rp| rp.group_header.as_str());
            let mut all: Vec<(String, String)> = block
                .iter()
                .filter(|(k, _)| group.is_none_or(|g| !k.eq_ignore_ascii_case(g)))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            all.append(&mut self.headers);
            self.headers = all;
        }
        &mut self.headers
    }

    fn key_enforced(&self) -> bool {
        self.key.as_ref().is_some_and(Key::enforced)
    }

    /// The first attempt starts: the key's lease must outlast anything the exchange can still
    /// do (written only when the body took long enough to eat into it).
    fn cover_lease(&mut self, policy: &Policy, host: &impl Host) {
        let plan = Rc::clone(&self.plan);
        if let (Some(ip), Some(k)) = (plan.idempotency.as_ref(), self.key.as_mut()) {
            k.cover(ip, host, host.now_ms() + policy.longest_exchange_ms());
        }
    }

    /// Completes or releases the key with the exchange's final answer (`None`: no answer that
    /// may be stored). With `hold` and the shared store, what follows waits for the store's
    /// acknowledgement (so that a retry on any node finds the record): the call's token is
    /// returned, for [`Exchange::then_after`]. Without, the write goes out from the root.
    fn settle_key(
        &mut self,
        host: &impl Host,
        answer: Option<Final<'_>>,
        hold: bool,
    ) -> Option<u32> {
        let plan = Rc::clone(&self.plan);
        let (Some(ip), Some(k)) = (plan.idempotency.as_ref(), self.key.as_mut()) else {
            return None;
        };
        // Kong's host, after a failed call: a dispatch with a body could share its buffer.
        let hold = hold && !self.buffers_unsafe;
        // `None`: written already (the node-local store), or sent from the root.
        let command = k.settle(ip, host, answer, hold)?;
        let redis = ip.shared.as_ref()?;
        let token = key::send(redis, host, &command);
        if token.is_none() {
            k.settled(ip, host, None, &[]);
        }
        token
    }

    /// `then` now, or once the shared store acknowledged the record (`waiting`: its call).
    fn then_after(&mut self, host: &impl Host, waiting: Option<u32>, then: Then) {
        match waiting {
            Some(token) => self.phase = Phase::Settling(token, then),
            None => self.then(host, then),
        }
    }

    /// The body is too large to hold (or the host did not hand it over): the configured
    /// behaviour, logged and counted. A key already claimed is released: nothing ran.
    fn body_too_large(
        mut self,
        policy: &Policy,
        host: &impl Host,
        why: &str,
    ) -> (Option<Exchange>, Step) {
        host.count(Metric::BodyTooLarge);
        self.settle_key(host, None, false);
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
        if matches!(self.phase, Phase::Done) {
            return (Some(self), Step::Pause);
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
        if self.declared_len.is_some_and(|n| n != body.len() as u64) {
            // Kong spills bodies over client_body_buffer_size to a file and hands the filter
            // nothing: never treat that as an empty body.
            return self.body_too_large(policy, host, "was not handed over by the host");
        }
        self.body = body;
        self.body_done = true;
        if self.key_at_body {
            if let Some(step) = self.decide_key(policy, host) {
                return (Some(self), step);
            }
        }
        match self.driver {
            Driver::Dispatch => {
                self.send_attempt(policy, host);
                (Some(self), Step::Pause)
            }
            Driver::Native => {
                self.begin_route_attempt(policy, host);
                (Some(self), Step::Continue)
            }
        }
    }

    /// An attempt ended (a dispatched attempt's answer, or the route's own attempt's response
    /// headers): note it, and ask the policy. Returns the wait and the next attempt's timeout
    /// when retrying.
    fn after_attempt(
        &mut self,
        policy: &Policy,
        host: &impl Host,
        outcome: Outcome,
        retry_after_ms: Option<u64>,
    ) -> Option<(u64, u64)> {
        self.last_outcome = Some(outcome);
        self.note_outcome(host, outcome);
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
        if wait_ms == 0 {
            self.send_attempt(policy, host);
        } else {
            self.phase = Phase::Backoff { at: now + wait_ms };
            self.wake_at = Some(now + wait_ms);
        }
    }

    /// The backoff wait is over (root tick): send the next attempt.
    pub fn on_wake(&mut self, policy: &Policy, host: &impl Host) {
        let now = host.now_ms();
        match self.phase {
            Phase::Backoff { at } if now >= at => self.send_attempt(policy, host),
            Phase::Attempt(Carrier::Route) if self.renew_at.is_some_and(|at| now >= at) => {
                self.renew_lease(host)
            }
            _ => {}
        }
    }

    /// The route's attempt (or the buffering of its answer) is still going: a key's lease must
    /// not run out under it. Renewed when half of it is left, as long as the attempt lasts.
    fn renew_lease(&mut self, host: &impl Host) {
        self.renew_at = None;
        let plan = Rc::clone(&self.plan);
        let (Some(ip), Some(k)) = (plan.idempotency.as_ref(), self.key.as_mut()) else {
            return;
        };
        let now = host.now_ms();
        if k.lease_until()
            .is_some_and(|until| until <= now + ip.lease_ms / 2)
        {
            k.cover(ip, host, now + ip.lease_ms);
        }
        if let Some(until) = k.lease_until() {
            self.renew_at = Some(until.saturating_sub(ip.lease_ms / 2).max(now + 1));
            self.wake_at = self.renew_at;
        }
    }

    /// When the exchange wants to be woken (native driver backoff), taken once.
    pub fn take_wake(&mut self) -> Option<u64> {
        self.wake_at.take()
    }

    /// Where the request's key stands (tests: the lifecycle as the flow drives it).
    #[cfg(test)]
    pub fn key_phase(&self) -> Option<crate::idempotency::lifecycle::Phase> {
        match &self.phase {
            Phase::Claiming(_, k) => Some(k.phase()),
            _ => self.key.as_ref().map(Key::phase),
        }
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

    /// The client went away: the key's lifecycle decides (a claim being asked is released
    /// should it land, one whose request never reached an upstream whole is released, one whose
    /// attempt did stays claimed until its lease ends: the application may be executing it).
    pub fn on_client_gone(&mut self, host: &impl Host) {
        let plan = Rc::clone(&self.plan);
        let Some(ip) = plan.idempotency.as_ref() else {
            return;
        };
        if let Phase::Claiming(_, k) = &mut self.phase {
            k.client_gone(ip, host);
            return;
        }
        if let Some(k) = self.key.as_mut() {
            k.client_gone(ip, host);
        }
    }

    /// An attempt reached the upstream whole: the key's lifecycle notes it.
    pub(super) fn attempt_sent(&mut self, host: &impl Host) {
        let plan = Rc::clone(&self.plan);
        if let (Some(ip), Some(k)) = (plan.idempotency.as_ref(), self.key.as_mut()) {
            k.sent(ip, host);
        }
    }

    /// The body is whole: the key of a request with a body is decided now. `None`: no answer
    /// and nothing asked, the exchange goes on; else what the stream does meanwhile.
    fn decide_key(&mut self, policy: &Policy, host: &impl Host) -> Option<Step> {
        self.key_at_body = false;
        let plan = Rc::clone(&self.plan);
        let (ip, block) = (plan.idempotency.as_ref()?, self.block.as_ref()?);
        match key::gate(ip, plan.host, host, block, &self.body, host.now_ms()) {
            Gate::Unkeyed => None,
            Gate::Claimed(k) => {
                self.key = Some(k);
                None
            }
            Gate::Answer(reply) => {
                // Answered after the whole body was read: the client's connection stays open.
                // (On Envoy without the buffer filter after rollsafe, the route's upstream got
                // the headers and now sees a reset: README.)
                self.send_reply(host, &reply);
                Some(Step::Pause)
            }
            Gate::Ask(k, command) => Some(self.ask(policy, host, k, &command)),
        }
    }

    /// Names the routed group. The native driver's attempt 1 is the route's own request, so it
    /// is pointed at the group (header, and `kong.service.target` on Kong); dispatched attempts
    /// carry the header in any case (a retry replays these headers).
    fn name_group(&mut self, host: &impl Host) {
        let plan = Rc::clone(&self.plan);
        let (Some(rp), Some(r)) = (plan.routing.as_ref(), self.routed.as_ref()) else {
            return;
        };
        let Some(g) = rp.groups.get(r.group) else {
            return;
        };
        self.headers.push((rp.group_header.clone(), g.name.clone()));
        if self.driver == Driver::Native {
            super::name_group(host, plan.host, &rp.group_header, &g.name, &g.target);
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
            for (k, v) in self.replay_headers().iter_mut() {
                if k.eq_ignore_ascii_case(&rp.group_header) {
                    *v = g.name.clone();
                }
            }
        }
    }

    /// Sends the final answer: the last upstream answer, or a problem when there is none.
    fn answer(&mut self, policy: &Policy, host: &impl Host) {
        let last = self.last.take();
        let done = last.as_ref().map(|a| Final {
            status: a.status,
            headers: &a.headers,
            body: Some(&a.body),
        });
        // The answer goes out once its record is written.
        let waiting = self.settle_key(host, done, true);
        let reply = self.final_reply(policy, last);
        self.then_after(host, waiting, Then::Reply(reply));
    }

    fn final_reply(&self, policy: &Policy, last: Option<Answer>) -> Reply {
        match last {
            Some(a) => {
                let mut headers: Vec<(String, String)> = a
                    .headers
                    .into_iter()
                    .filter(|(k, _)| !k.starts_with(':') && !is_hop_by_hop(k))
                    .collect();
                if let Some(h) = &policy.attempt_count_header {
                    headers.push((h.clone(), self.attempt.to_string()));
                }
                Reply {
                    status: u32::from(a.status),
                    headers,
                    body: a.body,
                }
            }
            None => self.no_answer_problem(policy),
        }
    }

    /// 504 (timeouts, deadline) or 502 (connection failures) when no upstream ever answered.
    fn no_answer_problem(&self, policy: &Policy) -> Reply {
        let (status, kind, title) = match self.last_outcome {
            Some(Outcome::Timeout) | None => (504, "upstream-timeout", "Upstream timed out"),
            Some(_) => (502, "upstream-unreachable", "Upstream unreachable"),
        };
        let detail = format!(
            "No answer from the upstream after {} attempt(s); last failure: {}.",
            self.attempt,
            self.last_outcome.map_or("none", |o| o.reason())
        );
        let mut ext = serde_json::Map::new();
        ext.insert("attempts".into(), self.attempt.into());
        let mut reply = Reply::problem_with(status, kind, title, detail, self.path(), None, ext);
        if let Some(h) = &policy.attempt_count_header {
            reply.headers.push((h.clone(), self.attempt.to_string()));
        }
        reply
    }

    /// Answers locally (the client gets this; no upstream is contacted by it).
    fn send_reply(&mut self, host: &impl Host, reply: &Reply) {
        self.phase = Phase::Done;
        let status = reply.status;
        if self.attempt > 0 {
            // (Header-time answers — replays, 409, 422 — are counted, not logged: they are
            // the hot path of a retrying client.)
            host.log(
                Level::Debug,
                &format!(
                    "rollsafe: {} {}: answer {status} after {} attempt(s)",
                    self.method(),
                    self.path(),
                    self.attempt,
                ),
            );
        }
        if self.route_started && self.has_body && !self.route_complete {
            // Envoy's router sent the route's upstream the headers of a request whose body
            // rollsafe never released: that stream is reset now.
            host.count(Metric::RouteRequestAborted);
        }
        if self.buffers_unsafe && !reply.body.is_empty() {
            // The body would share a buffer the failed call frees after this callback: the
            // problem travels in a header instead (a stored answer is replayed whole later).
            let mut headers = reply.header_refs();
            let problem = String::from_utf8_lossy(&reply.body).into_owned();
            let is_problem = headers
                .iter()
                .any(|(k, v)| *k == "content-type" && *v == crate::problem::CONTENT_TYPE);
            headers.push(if is_problem {
                ("x-rollsafe-problem", problem.as_str())
            } else {
                (
                    "x-rollsafe-body",
                    "omitted: Kong's host cannot send it from here",
                )
            });
            host.send_response(status, &headers, &[]);
            return;
        }
        host.send_response(status, &reply.header_refs(), &reply.body);
    }
}
