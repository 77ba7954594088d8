//! Envoy's native driver: attempt 1 is the route's own request, and the response phase decides.
//!
//! The request headers go on at once (pausing them would stop the body too), so the router
//! starts the route's upstream request with the headers; the body is held in the filter until
//! it is whole and then released to the route in one piece. The route's answer either ends the
//! exchange — streamed to the client, buffered first when it completes an idempotency record —
//! or, when it is a retryable failure, is held while the next attempt is dispatched.

use super::{Carrier, Exchange, Phase, Step, Then};
use crate::host::key::Final;
use crate::host::{
    Host, HostKind, Level, Metric, NGX_UPSTREAM_CONNECT_TIME, NGX_UPSTREAM_HEADER_TIME,
    RESPONSE_CODE_DETAILS,
};
use crate::retry::{self, Outcome, Policy};
use std::borrow::Cow;
use std::rc::Rc;

/// The route's final answer, buffered so that it completes the key's record.
pub(super) struct Storing {
    status: u16,
    headers: Vec<(Cow<'static, str>, Cow<'static, str>)>,
}

impl Exchange {
    /// Attempt 1 is the route's own request: it starts with the headers and is complete once
    /// the held body is released to it.
    ///
    /// `now`: the clock as this callback read it already, if it did (each read is a hostcall).
    pub(super) fn begin_route_attempt(
        &mut self,
        policy: &Policy,
        host: &impl Host,
        now: Option<u64>,
    ) {
        self.route_started = true;
        self.attempt = 1;
        self.phase = Phase::Attempt(Carrier::Route);
        if self.body_done {
            self.route_complete = true;
            // The exchange begins now if its held body kept it from beginning at its headers
            // (its deadline and the retry budget count from here); only a key has a lease to
            // cover.
            let now = (self.key.is_some() || self.started_ms.is_none())
                .then(|| now.unwrap_or_else(|| host.now_ms()));
            if let Some(now) = now {
                self.started_at(policy, now);
                if self.key.is_some() {
                    self.cover_lease(policy, host, now);
                }
            }
            self.attempt_sent(host);
            if let (Some(now), true) = (now, self.key_enforced()) {
                self.renew_lease(host, now);
            }
        }
    }

    /// Response headers from the route's upstream (or a local reply passing back).
    pub fn on_response_headers(
        &mut self,
        policy: &Policy,
        host: &impl Host,
        end_of_stream: bool,
    ) -> Step {
        match self.phase {
            Phase::Done => return Step::Continue,
            Phase::Attempt(Carrier::ProxyPass) => {
                return self.proxied_answered(policy, host, end_of_stream)
            }
            Phase::Claiming(..) => {
                // The route answered while the key's claim was still asked (no buffer filter
                // after rollsafe, or a streamed body): nothing of the body reached it. The
                // claim is released should it land, and the answer passes.
                if let (Phase::Claiming(_, mut k), Some(ip)) = (
                    std::mem::replace(&mut self.phase, Phase::Done),
                    self.plan.idempotency.as_ref(),
                ) {
                    k.client_gone(ip, host);
                }
                host.count(Metric::RetryGaveUp);
                return Step::Continue;
            }
            _ => {}
        }
        // The route answered; a retry, if any, is rollsafe's own (bounded by its timeouts).
        self.renew_at = None;
        if !self.body_done {
            // The route answered before the request body was whole (Envoy's router gave up on
            // the route, say every pod refused), and no more of the body will come: nothing can
            // be replayed and nothing ran, so the key is released and the answer passes.
            self.phase = Phase::Done;
            self.settle_key(host, None, false);
            host.count(Metric::RetryGaveUp);
            host.log(
                Level::Info,
                &format!(
                    "rollsafe: {} {}: the route answered before the request body was whole; passed through",
                    self.method(),
                    self.path()
                ),
            );
            return Step::Continue;
        }
        self.route_answered(policy, host, end_of_stream)
    }

    /// The answer of an attempt Kong's `proxy_pass` carried: final (Kong's host cannot act on
    /// a response but to let it through), stored under the key on its way to the client.
    fn proxied_answered(&mut self, policy: &Policy, host: &impl Host, end_of_stream: bool) -> Step {
        // The map in one read: under a key the answer's headers are kept with its record, and a
        // read of each header kept cost as much as the map. (Without a key this is a retry after
        // a failed call, rare enough to read the map for `:status` alone.)
        let block = host.response_header_block();
        let status = block
            .get(":status")
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        let outcome = proxied_outcome(host, status);
        self.last_outcome = Some(outcome);
        self.note_outcome(host, outcome);
        if let Some(h) = &policy.attempt_count_header {
            host.set_response_header(h, &self.attempt.to_string());
        }
        if self.closes_connection(host) {
            host.set_response_header("connection", "close");
        }
        if self.outcome_unknown() {
            // nginx answered itself after the write was sent: it may be executing. The key is
            // held (Kong's host cannot replace an answer here; nginx's 502/504 goes on).
            self.phase = super::Phase::Done;
            self.hold_key_unknown(host);
            return Step::Continue;
        }
        self.keep_route_answer(host, status, Some(&block), end_of_stream)
    }

    /// Attempt 1's answer: retry (its response held meanwhile) or let it through.
    fn route_answered(&mut self, policy: &Policy, host: &impl Host, end_of_stream: bool) -> Step {
        // Under a key the answer's headers are kept with its record: the map in one read
        // then; otherwise only `:status` (and `retry-after` on a failure).
        let block = self.key_enforced().then(|| host.response_header_block());
        let header = |name: &str| match &block {
            Some(b) => b.get(name).map(str::to_string),
            None => host.response_header(name),
        };
        let status = header(":status")
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        // Only a 5xx can be one Envoy made up after a failure: read details then only. (And
        // for a streamed body: the buffer filter's own 413 for a body over its bound.)
        let failed = status >= 500 || status == 0;
        if self.streaming && !failed {
            let details = host.property(RESPONSE_CODE_DETAILS);
            if details.is_some_and(|d| d != b"via_upstream") {
                // Envoy answered itself: the application never had it, so the key is freed.
                self.phase = super::Phase::Done;
                self.settle_key(host, None, false);
                return Step::Continue;
            }
        }
        let details = failed
            .then(|| host.property(RESPONSE_CODE_DETAILS))
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let outcome = classify_native(status, details.as_deref());
        if failed {
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
        let retry_after = failed
            .then(|| header("retry-after"))
            .flatten()
            .and_then(|v| retry::parse_retry_after(&v, host.now_ms()));
        match self.after_attempt(policy, host, outcome, retry_after) {
            Some((wait_ms, timeout_ms)) => {
                self.schedule(policy, host, wait_ms, timeout_ms);
                Step::Pause
            }
            None if self.outcome_unknown() => {
                // Envoy's made-up answer is held and replaced by rollsafe's, from the root's
                // next tick: the key stays held (now, should the client leave before), and the
                // client is told the outcome is unknown.
                self.hold_key_unknown(host);
                self.phase = Phase::Answering;
                self.wake_at = Some(host.now_ms());
                Step::Pause
            }
            None => {
                if let Some(h) = &policy.attempt_count_header {
                    host.set_response_header(h, &self.attempt.to_string());
                }
                self.keep_route_answer(host, status, block.as_ref(), end_of_stream)
            }
        }
    }

    /// The route's answer is final. Under a key, a storable answer completes the record (its
    /// body buffered on the way through), any other releases it.
    fn keep_route_answer(
        &mut self,
        host: &impl Host,
        status: u16,
        block: Option<&crate::host::headers::HeaderBlock>,
        end_of_stream: bool,
    ) -> Step {
        self.phase = Phase::Done;
        if !self.key_enforced() {
            return Step::Continue;
        }
        let plan = Rc::clone(&self.plan);
        let Some(ip) = plan.idempotency.as_ref() else {
            return Step::Continue;
        };
        if !ip.stores(status) {
            return self.settle_in_response(host, None);
        }
        let headers: Vec<(Cow<'static, str>, Cow<'static, str>)> = ip
            .replay_headers
            .iter()
            .filter_map(|h| {
                let v = match block {
                    Some(b) => b.get(h).map(str::to_string),
                    None => host.response_header(h),
                };
                v.map(|v| (Cow::Owned(h.clone()), Cow::Owned(v)))
            })
            .collect();
        if end_of_stream {
            let done = Final {
                status,
                headers,
                body: Some(&[]),
            };
            self.settle_in_response(host, Some(done))
        } else {
            self.phase = Phase::Storing(Storing { status, headers });
            Step::Continue
        }
    }

    /// Settles the key from the response phase. On Envoy the response waits for a shared
    /// store's acknowledgement (a retry on any node then finds the record); Kong's host allows
    /// no call from here, so its write goes out from the root.
    fn settle_in_response(&mut self, host: &impl Host, answer: Option<Final<'_>>) -> Step {
        let hold = self.plan.host == HostKind::Envoy;
        match self.settle_key(host, answer, hold) {
            Some(token) => {
                self.phase = Phase::Settling(token, Then::Resume);
                Step::Pause
            }
            None => Step::Continue,
        }
    }

    /// Response body: buffered while it completes a record (up to `max_response_bytes`).
    pub fn on_response_body(&mut self, host: &impl Host, size: usize, end_of_stream: bool) -> Step {
        if !matches!(self.phase, Phase::Storing(_)) {
            return Step::Continue;
        }
        if let Phase::Storing(storing) = std::mem::replace(&mut self.phase, Phase::Done) {
            let max = self
                .plan
                .idempotency
                .as_ref()
                .map_or(0, |ip| ip.max_response_bytes);
            if !end_of_stream && size <= max {
                self.phase = Phase::Storing(storing);
                return Step::Pause;
            }
            // Too large to keep: the record completes without its body, the rest streams.
            let body = (size <= max).then(|| host.response_body(size)).flatten();
            let Storing { status, headers } = storing;
            let done = Final {
                status,
                headers,
                body: body.as_deref(),
            };
            return self.settle_in_response(host, Some(done));
        }
        Step::Continue
    }
}

/// An answer Kong's `proxy_pass` carried: nginx's own 502/504 after a failure, or the upstream's.
/// nginx's variables tell them apart: no response header from the upstream
/// (`upstream_header_time` is `-`) after a connection was made (`upstream_connect_time` is a
/// time) means the request was sent and not answered.
fn proxied_outcome(host: &impl Host, status: u16) -> Outcome {
    if !matches!(status, 502 | 504) {
        return Outcome::Status(status);
    }
    let var = |path| {
        host.property(path)
            .map(|v| String::from_utf8_lossy(&v).trim().to_string())
    };
    // (Several upstreams tried: the last one's value is last.)
    let last =
        |v: Option<String>| v.and_then(|v| v.rsplit(',').next().map(|s| s.trim().to_string()));
    let connected = last(var(NGX_UPSTREAM_CONNECT_TIME)).is_some_and(|t| t != "-" && !t.is_empty());
    let answered = last(var(NGX_UPSTREAM_HEADER_TIME)).is_some_and(|t| t != "-" && !t.is_empty());
    match (connected, answered) {
        (_, true) => Outcome::Status(status),
        (true, false) if status == 504 => Outcome::Timeout,
        (true, false) => Outcome::Reset,
        (false, false) => Outcome::ConnectFailure,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoys_code_details_tell_real_answers_from_made_up_ones() {
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
}
