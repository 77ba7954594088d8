//! A body too large to hold (over `retry.max_body_bytes`, or one Kong's host spilled to a file
//! and never handed over) streams to the application once (`retry.body_too_large: stream`, the
//! default): never replayed, so never retried, but its idempotency key still protects it —
//! decided on the request's facts without the body (its declared length and any
//! `Content-Digest`), claimed before it goes, completed by its answer.

use super::{Exchange, Step};
use crate::host::key::{self, Gate, Key};
use crate::host::{Host, HostKind, Level, Warning};
use crate::plan::Driver;
use crate::retry::Policy;
use std::rc::Rc;

impl Exchange {
    /// The body is too large to hold: its key is decided now, and it goes once.
    pub(super) fn stream_once(
        mut self: Box<Self>,
        policy: &Policy,
        host: &impl Host,
        why: &str,
    ) -> (Option<Box<Exchange>>, Step) {
        crate::host::log_limited(host, Level::Info, Warning::BodyTooLarge, &|| {
            format!(
                "rollsafe: {} {}: request body {why}; streamed to the application once, not retried",
                self.method(),
                self.path()
            )
        });
        self.streaming = true;
        self.body = Vec::new();
        let plan = Rc::clone(&self.plan);
        let keyed = plan
            .idempotency
            .as_ref()
            .filter(|ip| self.key_at_body || ip.applies_to(self.method()));
        if let (Some(ip), None) = (keyed, self.key.as_ref()) {
            self.key_at_body = false;
            let body = key::Body::Streamed(self.declared_len);
            let now = host.now_ms();
            match key::gate(ip, plan.host, host, &self.block, &self.method, body, now) {
                Gate::Unkeyed => {}
                Gate::Claimed(k) => self.took_key(host, Some(k)),
                Gate::Answer(reply) => {
                    self.send_reply(host, &reply);
                    return (Some(self), Step::Pause);
                }
                Gate::Ask(k, command) => {
                    let step = self.ask(policy, host, k, &command);
                    return (Some(self), step);
                }
            }
        }
        let step = self.carry_streamed(policy, host, false);
        (Some(self), step)
    }

    /// The one attempt of a streamed body: the route's own request on Envoy, Kong's
    /// `proxy_pass` on Kong's host (a dispatch cannot carry a body the filter does not hold).
    /// `resume`: the request was held for the key's claim.
    pub(super) fn carry_streamed(
        &mut self,
        policy: &Policy,
        host: &impl Host,
        resume: bool,
    ) -> Step {
        self.body_done = true;
        let in_doubt = self.key.as_ref().is_some_and(Key::in_doubt);
        match self.plan.host {
            HostKind::Envoy => {
                // Taken while the headers are still held (decided at them, or paused for the
                // claim); a chunked body that outgrew the limit later keeps the route's own.
                if self.keyed_write() {
                    let deadline = policy.deadline_ms.to_string();
                    host.set_request_header("x-envoy-upstream-rq-timeout-ms", &deadline);
                }
                if in_doubt {
                    host.set_request_header(super::IN_DOUBT_HEADER, "true");
                }
                self.driver = Driver::Native;
                self.begin_route_attempt(policy, host, None);
                if resume {
                    host.resume_request();
                }
                Step::Continue
            }
            HostKind::Kong => {
                self.cover_lease(policy, host, host.now_ms());
                self.hand_to_proxy_pass(host, "a body too large to hold");
                Step::Continue
            }
        }
    }
}
