//! The exchange's side of the key's lifecycle: deciding the key once the body is whole, asking
//! the shared store and waiting for its word, and feeding the lifecycle what the exchange does
//! (an attempt sent whole, the final answer, the client gone).

use super::{Exchange, Phase, Step, Then};
use crate::host::key::{self, Final, Gate, Key};
use crate::host::{Host, HostKind};
use crate::plan::Driver;
use crate::retry::Policy;
use std::rc::Rc;

impl Exchange {
    /// Sends the shared store the key's claim; the request stays held until its answer.
    pub(super) fn ask(
        &mut self,
        policy: &Policy,
        host: &impl Host,
        k: Key,
        command: &[u8],
    ) -> Step {
        let plan = Rc::clone(&self.plan);
        let Some(redis) = plan.idempotency.as_ref().and_then(|ip| ip.shared.as_ref()) else {
            return Step::Continue;
        };
        match key::send(redis, host, command) {
            Some(token) => {
                self.dispatched = true;
                self.phase = Phase::Claiming(token, k);
                Step::Pause
            }
            None => self.claim_answered(policy, host, k, None, &[]),
        }
    }

    /// The shared store answered the claim (`status: None`: it did not): run the request, or
    /// answer it.
    pub(super) fn claim_answered(
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
            Ok(k) => self.took_key(host, k),
            Err(reply) => {
                self.send_reply(host, &reply);
                return Step::Pause;
            }
        }
        if self.streaming {
            return self.carry_streamed(policy, host, true);
        }
        match self.driver {
            Driver::Native => {
                // Only now do the headers (and then the body) go on to the route.
                self.begin_route_attempt(policy, host, None);
                host.resume_request();
                Step::Continue
            }
            Driver::Dispatch if self.buffers_unsafe && !self.body.is_empty() => {
                self.hand_to_proxy_pass(host, "the idempotency store's failed call");
                Step::Continue
            }
            Driver::Dispatch => {
                self.send_attempt(policy, host, None);
                self.held_for_attempt()
            }
        }
    }

    /// An answer from the shared store: `true` when it was one this exchange waits for.
    pub(super) fn on_store_answer(
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

    pub(super) fn then(&mut self, host: &impl Host, then: Then) {
        match then {
            Then::Reply(reply) => self.send_reply(host, &reply),
            Then::Resume => {
                self.phase = Phase::Done;
                host.resume_response();
            }
        }
    }

    /// The key is this request's (or it runs unprotected: `None`). A try in doubt says so to the
    /// application, on the route's own request and on every dispatched attempt.
    pub(super) fn took_key(&mut self, host: &impl Host, k: Option<Key>) {
        let in_doubt = k.as_ref().is_some_and(Key::in_doubt);
        self.key = k;
        if in_doubt {
            self.headers
                .push((super::IN_DOUBT_HEADER.to_string(), "true".to_string()));
            if self.driver == Driver::Native && self.has_body {
                // Envoy takes no header change once the headers went on, and a keyed body is
                // decided after that: this try is rollsafe's own attempt instead, its body
                // held from the route (which, behind the buffer filter, has seen nothing).
                self.driver = Driver::Dispatch;
            } else if self.driver == Driver::Native {
                host.set_request_header(super::IN_DOUBT_HEADER, "true");
            }
        }
    }

    pub(super) fn key_enforced(&self) -> bool {
        self.key.as_ref().is_some_and(Key::enforced)
    }

    /// A write (not idempotent) whose key this request holds: its attempts wait for their
    /// answer up to the deadline, and one sent and unanswered is never sent again.
    pub(super) fn keyed_write(&self) -> bool {
        self.key_enforced() && !crate::retry::is_idempotent(self.method())
    }

    /// The last attempt of a keyed write was sent and got no answer (a reset, or none before
    /// the deadline): whether the application executed it is unknown.
    pub(super) fn outcome_unknown(&self) -> bool {
        self.keyed_write()
            && matches!(
                self.last_outcome,
                Some(crate::retry::Outcome::Reset | crate::retry::Outcome::Timeout)
            )
    }

    /// The key stays held for a lease from now: the application may still be executing it.
    pub(super) fn hold_key_unknown(&mut self, host: &impl Host) {
        let plan = Rc::clone(&self.plan);
        if let (Some(ip), Some(k)) = (plan.idempotency.as_ref(), self.key.as_mut()) {
            k.unknown(ip, host);
        }
    }

    /// The first attempt starts (`now`): the key's lease must outlast anything the exchange can
    /// still do (written only when the body took long enough to eat into it).
    pub(super) fn cover_lease(&mut self, policy: &Policy, host: &impl Host, now: u64) {
        let plan = Rc::clone(&self.plan);
        let mut until = now + policy.longest_exchange_ms();
        if self.keyed_write() {
            // Its attempts wait for their answer up to the deadline.
            until = until.max(self.started_at(policy, now) + policy.deadline_ms);
        }
        if let (Some(ip), Some(k)) = (plan.idempotency.as_ref(), self.key.as_mut()) {
            k.cover(ip, host, until);
        }
    }

    /// Completes or releases the key with the exchange's final answer (`None`: no answer that
    /// may be stored). With `hold` and the shared store, what follows waits for the store's
    /// acknowledgement (so that a retry on any node finds the record): the call's token is
    /// returned, for [`Exchange::then_after`]. Without, the write goes out from the root.
    pub(super) fn settle_key(
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
        match token {
            Some(_) => self.dispatched = true,
            None => k.settled(ip, host, None, &[]),
        }
        token
    }

    /// `then` now, or once the shared store acknowledged the record (`waiting`: its call).
    pub(super) fn then_after(&mut self, host: &impl Host, waiting: Option<u32>, then: Then) {
        match waiting {
            Some(token) => self.phase = Phase::Settling(token, then),
            None => self.then(host, then),
        }
    }

    /// The route's attempt (or the buffering of its answer) is still going at `now`: a key's
    /// lease must not run out under it. Renewed when half of it is left, as long as the attempt
    /// lasts.
    pub(super) fn renew_lease(&mut self, host: &impl Host, now: u64) {
        self.renew_at = None;
        let plan = Rc::clone(&self.plan);
        let (Some(ip), Some(k)) = (plan.idempotency.as_ref(), self.key.as_mut()) else {
            return;
        };
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

    /// Where the request's key stands (tests: the lifecycle as the flow drives it).
    #[cfg(test)]
    pub fn key_phase(&self) -> Option<crate::idempotency::lifecycle::Phase> {
        match &self.phase {
            Phase::Claiming(_, k) => Some(k.phase()),
            _ => self.key.as_ref().map(Key::phase),
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

    /// The body is whole (at `now`): the key of a request with a body is decided now. `None`:
    /// no answer and nothing asked, the exchange goes on; else what the stream does meanwhile.
    pub(super) fn decide_key(
        &mut self,
        policy: &Policy,
        host: &impl Host,
        now: u64,
    ) -> Option<Step> {
        self.key_at_body = false;
        let plan = Rc::clone(&self.plan);
        let ip = plan.idempotency.as_ref()?;
        let body = key::Body::Whole(&self.body);
        match key::gate(ip, plan.host, host, &self.block, &self.method, body, now) {
            Gate::Unkeyed => None,
            Gate::Claimed(k) => {
                self.took_key(host, Some(k));
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
}
