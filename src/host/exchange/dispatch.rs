//! Attempts rollsafe sends itself (`dispatch_http_call`): every attempt of the dispatch driver,
//! and the retries of the native one. An attempt carries the whole held body; its answer (or
//! the host's word that there was none) becomes an [`Outcome`].

use super::{Answer, Carrier, Exchange, Phase, Step, IN_DOUBT_HEADER};
use crate::host::headers::{name_is, passes_on, HeaderBlock};
use crate::host::{CallResponse, Host, HostKind, Level, Metric};
use crate::plan::ServiceTarget;
use crate::retry::{self, Outcome, Policy};
use crate::warnings::Warning;
use std::rc::Rc;

impl Exchange {
    /// `now`: the clock as this callback read it already, if it did (each read is a hostcall).
    pub(super) fn send_attempt(&mut self, policy: &Policy, host: &impl Host, now: Option<u64>) {
        if self.attempt == 0 {
            let now = now.unwrap_or_else(|| host.now_ms());
            self.cover_lease(policy, host, now);
            let elapsed = now.saturating_sub(self.started_at(policy, now));
            let remaining = policy.deadline_ms.saturating_sub(elapsed).max(1);
            self.next_timeout_ms =
                policy.attempt_timeout_ms(self.method(), self.key_enforced(), remaining);
        }
        self.reroute(host);
        if self.target.is_none() && self.plan.host == HostKind::Kong {
            // No target rollsafe can dispatch to (the route's Service could not be read):
            // Kong's own proxying carries the request, its key still enforced, unretried.
            self.hand_to_proxy_pass(host, "no attempt target");
            return;
        }
        if self.target.is_none() {
            self.target = route_cluster(host);
        }
        let target = self.target.as_deref().unwrap_or_default();
        let group = self
            .plan
            .routing
            .as_ref()
            .map(|rp| rp.group_header.as_str());
        // Only rollsafe names a group or says a try is in doubt (its own `headers`).
        let skip = |k: &[u8]| group.is_some_and(|g| name_is(k, g)) || name_is(k, IN_DOUBT_HEADER);
        let mut lossy = HeaderBlock::default();
        let headers = forward_headers(&self.block, &self.method, skip, &self.headers, &mut lossy);
        match host.dispatch(target, headers, &self.body, self.next_timeout_ms) {
            Ok(token) => {
                self.attempt += 1;
                self.dispatched = true;
                self.phase = Phase::Attempt(Carrier::Call(token));
                host.count(Metric::Attempts);
                self.attempt_sent(host);
            }
            Err(e) => {
                crate::host::log_limited(host, Level::Error, Warning::CallRefused, &|| {
                    format!("rollsafe: cannot send an attempt to {target:?}: {e}")
                });
                self.last_outcome = Some(Outcome::ConnectFailure);
                self.answer(policy, host);
            }
        }
    }

    /// The answer to a dispatched attempt.
    pub fn on_call_response(
        &mut self,
        policy: &Policy,
        host: &impl Host,
        token: u32,
        body_size: usize,
    ) {
        if self.on_store_answer(policy, host, token, body_size) {
            return;
        }
        if !matches!(self.phase, Phase::Attempt(Carrier::Call(t)) if t == token) {
            return;
        }
        let resp = host.call_response(body_size);
        let unresolved =
            self.from_service && resp.headers.get(":dispatch_status") == Some("resolver failure");
        let (outcome, answer) = classify_call(resp);
        if unresolved {
            // The Service's host is no DNS name: a Kong Upstream entity's name, which only
            // Kong's own balancer resolves. Nothing was sent, so Kong's proxying carries it.
            self.service_unusable(host);
            self.hand_to_proxy_pass(host, "the route's Service host did not resolve");
            return;
        }
        // Failed attempts are logged, as the route's are (`native`): an answered one is the
        // hot path, and its line would cost every write a formatted message.
        if !matches!(outcome, Outcome::Status(s) if s < 500) {
            host.log(
                Level::Debug,
                &format!(
                    "rollsafe: {} {}: attempt {}: {outcome:?}",
                    self.method(),
                    self.path(),
                    self.attempt
                ),
            );
        }
        // Kong's host tears a failed call down only after this callback returns, and anything
        // that takes a buffer before then — a dispatch with a body, a local answer with a body
        // — can share a buffer the failed call still holds: the worker then loops sending
        // empty buffers, or the client's connection closes unanswered (ngx_wasm_module
        // 9136e463; HOSTS.md). An answer without a body does the same (a draining pod's empty
        // 503, then a retry with the request's body: the worker spun, 2.6 million log lines
        // in 8 s). Here nothing takes a buffer.
        self.buffers_unsafe =
            self.plan.host == HostKind::Kong && answer.as_ref().is_none_or(|a| a.body.is_empty());
        let retry_after = answer
            .as_ref()
            .and_then(|a| a.headers.get("retry-after"))
            .and_then(|v| retry::parse_retry_after(v, host.now_ms()));
        if answer.is_some() {
            self.last = answer;
        }
        match self.after_attempt(policy, host, outcome, retry_after) {
            Some(_) if self.buffers_unsafe && !self.body.is_empty() => {
                self.hand_to_proxy_pass(host, outcome.reason())
            }
            Some((wait_ms, timeout_ms)) => self.schedule(policy, host, wait_ms, timeout_ms),
            None => self.answer(policy, host),
        }
        self.buffers_unsafe = false;
    }

    /// Kong's host, after a failed call: the retry of a request with a body is carried by
    /// nginx's own `proxy_pass` (the request resumes to it once this callback returns with
    /// nothing pending; `kong.service.target` names the attempt's target). Its answer is final:
    /// Kong's host cannot act on a response but to let it through (and store it).
    pub(super) fn hand_to_proxy_pass(&mut self, host: &impl Host, after: &str) {
        self.reroute(host);
        let plan = std::rc::Rc::clone(&self.plan);
        let group = plan
            .routing
            .as_ref()
            .zip(self.routed.as_ref())
            .and_then(|(rp, r)| rp.groups.get(r.group).map(|g| (rp, g)));
        match (group, &self.target) {
            // The group's header and target, as for any request Kong proxies to a group.
            (Some((rp, g)), _) => {
                crate::host::name_group(host, plan.host, &rp.group_header, &g.name, &g.target)
            }
            // (The route's Service is where Kong proxies anyway, Upstream entities included.)
            (None, Some(target)) if !self.from_service => {
                host.set_property(crate::host::KONG_SERVICE_TARGET, target.as_bytes())
            }
            (None, _) => {}
        }
        if self
            .key
            .as_ref()
            .is_some_and(crate::host::key::Key::in_doubt)
        {
            // (The request nginx proxies is the client's: the header goes on it.)
            host.set_request_header(super::IN_DOUBT_HEADER, "true");
        }
        self.attempt += 1;
        self.phase = Phase::Attempt(Carrier::ProxyPass);
        self.attempt_sent(host);
        // (Logged when it is a retry: on a route without an attempt target every keyed write's
        // first attempt is carried so.)
        if self.attempt > 1 {
            host.log(
                Level::Info,
                &format!(
                    "rollsafe: {} {}: attempt {} after {} carried by proxy_pass",
                    self.method(),
                    self.path(),
                    self.attempt,
                    after
                ),
            );
        }
    }
}

impl Exchange {
    /// The route's Service cannot be dispatched to (its host names a Kong Upstream entity, which
    /// only Kong's balancer resolves): logged once, and the route's requests pass to Kong's own
    /// proxying (keys still enforced, no retries) from now on.
    fn service_unusable(&mut self, host: &impl Host) {
        if let Ok(mut cache) = self.plan.service.try_borrow_mut() {
            if *cache != ServiceTarget::Unusable {
                host.log(
                    Level::Error,
                    &format!(
                        "rollsafe: the route's Service host {:?} does not resolve (a Kong Upstream \
                         entity's name?): rollsafe cannot send attempts there; set retry.target \
                         to a DNS host:port. Kong's proxying carries this route's requests now (keys enforced, no retries)",
                        self.target.as_deref().unwrap_or("")
                    ),
                );
                *cache = ServiceTarget::Unusable;
            }
        }
    }
}

impl Exchange {
    /// What the request does once an attempt is under way: held while rollsafe's own call is
    /// out; on its way when Kong's `proxy_pass` carries it (nothing pending, so Kong resumes it).
    pub(super) fn held_for_attempt(&self) -> Step {
        match self.phase {
            Phase::Attempt(Carrier::ProxyPass) => Step::Continue,
            _ => Step::Pause,
        }
    }
}

/// The cluster Envoy's route chose for this request.
fn route_cluster(host: &impl Host) -> Option<Rc<str>> {
    [crate::host::CLUSTER_NAME, crate::host::CLUSTER_NAME_OLD]
        .into_iter()
        .find_map(|path| host.property(path))
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|s| !s.is_empty())
        .map(Rc::from)
}

/// The request headers rollsafe sends on a dispatched attempt: the request line's parts (the
/// method as the exchange read it), the client's headers (not the connection's, not `host`,
/// none that `skip` names), then rollsafe's own (`own`). Read in place from a block that is text throughout, as a request's
/// is but for obs-text: one list made and no header copied; else from a lossy copy kept in
/// `lossy`.
fn forward_headers<'a>(
    block: &'a HeaderBlock,
    method: &'a str,
    skip: impl Fn(&[u8]) -> bool,
    own: &'a [(String, String)],
    lossy: &'a mut HeaderBlock,
) -> Vec<(&'a str, &'a str)> {
    let block = if block.is_text() {
        block
    } else {
        *lossy = HeaderBlock::from_pairs(&block.to_pairs());
        lossy
    };
    let find = |name| block.get(name);
    // (A name `skip` takes is not the client's to give: `host` may be a group header's name;
    // pseudo-headers cannot.)
    let authority = find(":authority")
        .or_else(|| find("host").filter(|_| !skip(b"host")))
        .unwrap_or("localhost");
    let mut out = Vec::with_capacity(4 + block.entry_count() + own.len());
    out.extend([
        (":method", method),
        (":path", find(":path").unwrap_or("/")),
        (":authority", authority),
        (":scheme", find(":scheme").unwrap_or("http")),
    ]);
    let sent = |k: &[u8]| passes_on(k) && !name_is(k, "host");
    block.push_texts_where(&mut out, |k| sent(k) && !skip(k));
    // (Rollsafe's own too: a group header named like one of the connection's is not sent.)
    out.extend(
        own.iter()
            .filter(|(k, _)| sent(k.as_bytes()))
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    out
}

/// A dispatched attempt's answer. Kong reports failures as no headers plus `:dispatch_status`;
/// Envoy synthesizes 503/504 answers whose bodies say what failed.
fn classify_call(resp: CallResponse) -> (Outcome, Option<Answer>) {
    let status = resp
        .headers
        .get(":status")
        .and_then(|s| s.trim().parse::<u16>().ok());
    let Some(status) = status else {
        let outcome = match resp.headers.get(":dispatch_status") {
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
    // (Compared as bytes: an application's body is not decoded on every answer.)
    let text = resp
        .body
        .get(..resp.body.len().min(512))
        .unwrap_or_default();
    if text.starts_with(b"upstream connect error or disconnect/reset before headers") {
        let text = String::from_utf8_lossy(text);
        return if text.contains("connection failure") || text.contains("Connection refused") {
            (Outcome::ConnectFailure, None)
        } else {
            (Outcome::Reset, None)
        };
    }
    if status == 503 && text.starts_with(b"no healthy upstream") {
        return (Outcome::ConnectFailure, None);
    }
    if status == 504 && text.starts_with(b"upstream request timeout") {
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
    use crate::host::headers::HeaderBlock;

    fn resp(headers: &[(&str, &str)], body: &str) -> CallResponse {
        CallResponse {
            headers: HeaderBlock::from_raw(crate::host::headers::serialize(headers)),
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
    }

    /// A block as the host gives it: `(name, value)` pairs in the ABI's format, bytes and all.
    fn block(pairs: &[(&[u8], &[u8])]) -> HeaderBlock {
        let mut raw = (pairs.len() as u32).to_le_bytes().to_vec();
        for (k, v) in pairs {
            raw.extend((k.len() as u32).to_le_bytes());
            raw.extend((v.len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            raw.extend_from_slice(k);
            raw.push(0);
            raw.extend_from_slice(v);
            raw.push(0);
        }
        HeaderBlock::from_raw(raw)
    }

    #[test]
    fn forwarded_headers_drop_hop_by_hop_in_any_case_and_keep_the_request_then_rollsafes() {
        // (Kong's host gives names as the client spelled them.) The same headers read in place
        // from a block that is text, and lossily from one with a value that is not.
        for odd in [&b"v"[..], b"\xff"] {
            let client = block(&[
                (b":method", b"POST"),
                (b":path", b"/orders?x=1"),
                (b"Host", b"api.example"),
                (b"Connection", b"keep-alive"),
                (b"Content-Length", b"2"),
                (b"idempotency-key", b"\"k1\""),
                (b"Transfer-Encoding", b"chunked"),
                (b"X-Group", b"z"),
                (b"Idempotency-In-Doubt", b"true"),
                (b"x-odd", odd),
            ]);
            assert_eq!(client.is_text(), odd == b"v");
            let own = [("x-group".to_string(), "a".to_string())];
            let skip = |k: &[u8]| name_is(k, "x-group") || name_is(k, IN_DOUBT_HEADER);
            let mut lossy = HeaderBlock::default();
            let f = forward_headers(&client, "POST", skip, &own, &mut lossy);
            let odd_text = String::from_utf8_lossy(odd);
            assert_eq!(
                f,
                [
                    (":method", "POST"),
                    (":path", "/orders?x=1"),
                    (":authority", "api.example"),
                    (":scheme", "http"),
                    ("idempotency-key", "\"k1\""),
                    ("x-odd", odd_text.as_ref()),
                    ("x-group", "a"),
                ],
                "a missing pseudo-header has its default; the client's group and in-doubt \
                 headers never pass, rollsafe's own come last"
            );
        }

        // `:authority` wins over `host`; of a repeated pseudo-header, the first.
        let client = block(&[
            (b"host", b"h"),
            (b":authority", b"a"),
            (b":path", b"/1"),
            (b":path", b"/2"),
            (b":scheme", b"https"),
        ]);
        let mut lossy = HeaderBlock::default();
        let f = forward_headers(&client, "GET", |_| false, &[], &mut lossy);
        assert_eq!(
            f,
            [
                (":method", "GET"),
                (":path", "/1"),
                (":authority", "a"),
                (":scheme", "https")
            ]
        );
        let empty = HeaderBlock::default();
        let f = forward_headers(&empty, "GET", |_| false, &[], &mut lossy);
        assert_eq!(f[2], (":authority", "localhost"));

        // A name rollsafe keeps for itself is not taken from the client even for the request
        // line, and rollsafe's own headers are not sent under a connection's name either (a
        // group header may be configured so).
        let client = block(&[(b"host", b"h"), (b"x", b"1")]);
        let own = [
            ("host".to_string(), "a".to_string()),
            ("Connection".to_string(), "b".to_string()),
            ("x-mine".to_string(), "c".to_string()),
        ];
        let f = forward_headers(&client, "GET", |k| name_is(k, "host"), &own, &mut lossy);
        assert_eq!(
            f,
            [
                (":method", "GET"),
                (":path", "/"),
                (":authority", "localhost"),
                (":scheme", "http"),
                ("x", "1"),
                ("x-mine", "c")
            ]
        );
    }
}
