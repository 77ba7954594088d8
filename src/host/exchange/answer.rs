//! The final answer: the last upstream answer (hop-by-hop headers dropped), or a problem when no
//! upstream answered; sent once the key's record is written.

use super::{Answer, Exchange, Phase, Then};
use crate::host::headers::name_is;
use crate::host::key::Final;
use crate::host::reply::Reply;
use crate::host::{Host, HostKind, Level, Metric};
use crate::retry::{Outcome, Policy};

impl Exchange {
    /// Sends the final answer: the last upstream answer, or a problem when there is none.
    pub(super) fn answer(&mut self, policy: &Policy, host: &impl Host) {
        if self.outcome_unknown() {
            self.answer_unknown(policy, host);
            return;
        }
        let last = self.last.take();
        // (Copied only when a record will keep them.)
        let kept = match (&last, &self.plan.idempotency) {
            (Some(a), Some(ip)) if self.key_enforced() && ip.stores(a.status) => a
                .headers
                .texts_where(|k| ip.replay_headers.iter().any(|h| name_is(k, h))),
            _ => Vec::new(),
        };
        let done = last.as_ref().map(|a| Final {
            status: a.status,
            headers: kept,
            body: Some(&a.body),
        });
        // The answer goes out once its record is written.
        let waiting = self.settle_key(host, done, true);
        let reply = self.final_reply(policy, last);
        self.then_after(host, waiting, Then::Reply(reply));
    }

    pub(super) fn final_reply(&self, policy: &Policy, last: Option<Answer>) -> Reply {
        match last {
            Some(a) => {
                let headers = match &policy.attempt_count_header {
                    Some(h) => vec![(h.clone(), self.attempt.to_string())],
                    None => Vec::new(),
                };
                Reply {
                    status: u32::from(a.status),
                    passed: a.headers,
                    headers,
                    fixed: &[],
                    body: a.body,
                    stored: None,
                }
            }
            None => self.no_answer_problem(policy),
        }
    }

    /// A keyed write sent and unanswered: its key held for a lease from now, and the client told
    /// the outcome is unknown.
    pub(super) fn answer_unknown(&mut self, policy: &Policy, host: &impl Host) {
        self.hold_key_unknown(host);
        let reply = self.unknown_problem(policy);
        self.send_reply(host, &reply);
    }

    /// A keyed write sent and unanswered: 504 (no answer before the deadline) or 502 (the
    /// connection broke), saying the outcome is unknown and when the same key may be retried.
    fn unknown_problem(&self, policy: &Policy) -> Reply {
        let (status, how) = match self.last_outcome {
            Some(Outcome::Reset) => (502, "the connection to the upstream broke"),
            _ => (504, "no answer came before the deadline"),
        };
        let lease_s = self
            .plan
            .idempotency
            .as_ref()
            .map_or(1, |ip| ip.lease_ms.div_ceil(1000).max(1));
        let detail = format!(
            "The request was sent to the upstream and {how}: it may have been executed. It was \
             not sent again. Retry with the same Idempotency-Key after {lease_s} s: the key is \
             held until then, and the retry is marked as in doubt."
        );
        let mut ext = serde_json::Map::new();
        ext.insert("attempts".into(), self.attempt.into());
        ext.insert("outcome".into(), "unknown".into());
        let mut reply = Reply::problem_with(
            status,
            "upstream-outcome-unknown",
            "Outcome unknown",
            detail,
            self.path(),
            Some(lease_s),
            ext,
        );
        if let Some(h) = &policy.attempt_count_header {
            reply.headers.push((h.clone(), self.attempt.to_string()));
        }
        reply
    }

    /// 504 (timeouts, deadline) or 502 (connection failures) when no upstream ever answered.
    pub(super) fn no_answer_problem(&self, policy: &Policy) -> Reply {
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
    pub(super) fn send_reply(&mut self, host: &impl Host, reply: &Reply) {
        self.phase = Phase::Done;
        let status = reply.status;
        if self.attempt > 1 {
            // (Answers after one attempt — and header-time answers: replays, 409, 422 — are
            // counted, not logged: they are the hot path.)
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
        let mut lossy = Vec::new();
        let mut headers = reply.header_refs(2, &mut lossy);
        if self.closes_connection(host) {
            headers.push(("connection", "close"));
        }
        if self.buffers_unsafe && !reply.body().is_empty() {
            // The body would share a buffer the failed call frees after this callback: the
            // problem travels in a header instead (a stored answer is replayed whole later).
            let problem = String::from_utf8_lossy(reply.body()).into_owned();
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
        host.send_response(status, &headers, reply.body());
    }

    /// Kong's host: whether the answer to this request closes the client's connection (see
    /// `crate::reconnect`; the count is read only after a call).
    pub(super) fn closes_connection(&self, host: &impl Host) -> bool {
        self.plan.host == HostKind::Kong
            && self.dispatched
            && crate::reconnect::close_connection(
                host.property(crate::host::NGX_CONNECTION_REQUESTS)
                    .as_deref(),
            )
    }
}
