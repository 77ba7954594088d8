//! Retry policy: given how an attempt ended, decide whether to try again and after how long.
//! Pure: time and randomness are arguments.
//!
//! Safety follows RFC 9110 §9.2.2: idempotent methods retry on every configured condition; POST
//! and PATCH (and any method not known to be idempotent) only when the attempt provably never
//! reached the application (the connection failed before the request was sent) — unless
//! rollsafe enforces the request's idempotency key, which makes a repeat harmless.

use crate::config::error::ConfigError;
use serde::Deserialize;
use std::cell::RefCell;
use std::rc::Rc;

/// `retry` config section.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included (1 = never retry).
    #[serde(default = "default_attempts")]
    #[cfg_attr(test, schemars(range(min = 1, max = 10)))]
    pub attempts: u32,
    /// Which attempt outcomes are retried.
    #[serde(default = "default_conditions")]
    pub on: Vec<Condition>,
    /// Requests rollsafe owns and retries, by method (default: all). A request of another
    /// method passes to the host's own proxying, and its own retries (Envoy's route
    /// `retry_policy`, Kong's `retries`), after one header read — unless an idempotency key
    /// applies to it: keyed requests are always rollsafe's.
    #[serde(default = "all_methods")]
    pub methods: Vec<crate::method::Method>,
    /// Timeout of one attempt (connect, send, wait for the answer), ms.
    #[serde(default = "default_per_try_timeout")]
    #[cfg_attr(test, schemars(range(min = 1, max = 300000)))]
    pub per_try_timeout_ms: u64,
    /// Budget for the whole exchange, attempts and waits together, ms.
    #[serde(default = "default_deadline")]
    #[cfg_attr(test, schemars(range(min = 1, max = 600000)))]
    pub deadline_ms: u64,
    #[serde(default)]
    pub backoff: BackoffConfig,
    /// Wait at least what an upstream `Retry-After` asks (up to `max_retry_after_ms`) where the
    /// host can wait; where it cannot (Kong), the final answer keeps the header for the client.
    #[serde(default = "yes")]
    pub respect_retry_after: bool,
    /// Longest upstream `Retry-After` waited out, ms.
    #[serde(default = "default_max_retry_after")]
    #[cfg_attr(test, schemars(range(max = 60000)))]
    pub max_retry_after_ms: u64,
    #[serde(default)]
    pub budget: BudgetConfig,
    /// Largest request body rollsafe holds to replay it, bytes.
    #[serde(default = "default_max_body")]
    #[cfg_attr(test, schemars(range(min = 0, max = 16777216)))]
    pub max_body_bytes: u64,
    /// A body over `max_body_bytes`, or one the host did not hand over (Kong spills bodies
    /// larger than `client_body_buffer_size` to a file): `stream` sends it to the application
    /// once, never retried, with its idempotency key still protecting it; `pass-through` the
    /// same without the key; `reject` answers 413 problem+json. All are logged and counted.
    #[serde(default)]
    pub body_too_large: BodyTooLarge,
    /// Where attempts rollsafe sends itself go: on Kong `host:port` (e.g. a Kubernetes Service
    /// DNS name; required there), on Envoy a cluster name (default: the cluster the route chose).
    #[cfg_attr(test, schemars(length(min = 1)))]
    #[serde(default)]
    pub target: Option<String>,
    /// How the exchange is driven: `auto` picks by host (`dispatch` on Kong, `native` on Envoy).
    #[serde(default)]
    pub exchange: ExchangeMode,
    /// Response header that reports how many attempts were made (off when absent).
    #[serde(default)]
    pub attempt_count_header: Option<String>,
}

impl RetryConfig {
    /// What an exchange owned only for idempotency uses: one attempt, the defaults otherwise.
    pub fn single_attempt() -> RetryConfig {
        RetryConfig {
            attempts: 1,
            on: default_conditions(),
            methods: all_methods(),
            per_try_timeout_ms: default_per_try_timeout(),
            // One attempt: a keyed write waits for its answer this long (as for one attempt
            // before keyed writes waited to the deadline).
            deadline_ms: default_per_try_timeout(),
            backoff: BackoffConfig::default(),
            respect_retry_after: true,
            max_retry_after_ms: default_max_retry_after(),
            budget: BudgetConfig::default(),
            max_body_bytes: default_max_body(),
            body_too_large: BodyTooLarge::default(),
            target: None,
            exchange: ExchangeMode::default(),
            attempt_count_header: None,
        }
    }
}

fn default_attempts() -> u32 {
    3
}
fn default_conditions() -> Vec<Condition> {
    Condition::ALL.to_vec()
}
fn default_per_try_timeout() -> u64 {
    5_000
}
fn default_deadline() -> u64 {
    15_000
}
fn default_max_retry_after() -> u64 {
    5_000
}
fn default_max_body() -> u64 {
    1 << 20
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub enum Condition {
    #[serde(rename = "502")]
    Status502,
    #[serde(rename = "503")]
    Status503,
    #[serde(rename = "504")]
    Status504,
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    #[serde(rename = "reset")]
    Reset,
    #[serde(rename = "timeout")]
    Timeout,
}

impl Condition {
    pub const ALL: [Condition; 6] = [
        Condition::Status502,
        Condition::Status503,
        Condition::Status504,
        Condition::ConnectFailure,
        Condition::Reset,
        Condition::Timeout,
    ];
}

/// Full-jitter exponential backoff: retry n waits `min_ms + uniform[0, min(max_ms, base_ms·2^n))`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    #[serde(default = "default_base")]
    #[cfg_attr(test, schemars(range(min = 1, max = 60000)))]
    pub base_ms: u64,
    #[serde(default = "default_cap")]
    #[cfg_attr(test, schemars(range(min = 1, max = 60000)))]
    pub max_ms: u64,
    /// A floor under every wait, ms (Kubernetes takes a moment to drop a terminating pod from
    /// a Service's endpoints).
    #[serde(default)]
    #[cfg_attr(test, schemars(range(max = 60000)))]
    pub min_ms: u64,
}

fn default_base() -> u64 {
    25
}
fn default_cap() -> u64 {
    1_000
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base_ms: default_base(),
            max_ms: default_cap(),
            min_ms: 0,
        }
    }
}

/// Retry budget (Finagle/Linkerd style): over the last `window_s` seconds, retries may not
/// exceed `ratio` × requests + `min_per_s` × `window_s`. Kept per worker.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    #[serde(default = "default_ratio")]
    #[cfg_attr(test, schemars(range(min = 0.0, max = 10.0)))]
    pub ratio: f64,
    #[serde(default = "default_min_per_s")]
    #[cfg_attr(test, schemars(range(max = 100000)))]
    pub min_per_s: u32,
    #[serde(default = "default_window")]
    #[cfg_attr(test, schemars(range(min = 1, max = 60)))]
    pub window_s: u32,
}

fn all_methods() -> Vec<crate::method::Method> {
    use crate::method::Method::*;
    vec![GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS]
}

fn default_ratio() -> f64 {
    0.2
}
fn default_min_per_s() -> u32 {
    10
}
fn default_window() -> u32 {
    10
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ratio: default_ratio(),
            min_per_s: default_min_per_s(),
            window_s: default_window(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum BodyTooLarge {
    #[default]
    Stream,
    PassThrough,
    Reject,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum ExchangeMode {
    #[default]
    Auto,
    Dispatch,
    Native,
}

/// How one attempt ended, in one vocabulary for both hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this status.
    Status(u16),
    /// The connection failed before the request was sent: it never reached the application.
    ConnectFailure,
    /// The connection broke after the request may have been sent.
    Reset,
    /// No answer within the per-try timeout.
    Timeout,
}

impl Outcome {
    fn condition(self) -> Option<Condition> {
        match self {
            Outcome::Status(502) => Some(Condition::Status502),
            Outcome::Status(503) => Some(Condition::Status503),
            Outcome::Status(504) => Some(Condition::Status504),
            Outcome::Status(_) => None,
            Outcome::ConnectFailure => Some(Condition::ConnectFailure),
            Outcome::Reset => Some(Condition::Reset),
            Outcome::Timeout => Some(Condition::Timeout),
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Outcome::Status(502) => "502",
            Outcome::Status(503) => "503",
            Outcome::Status(504) => "504",
            Outcome::Status(_) => "status",
            Outcome::ConnectFailure => "connect-failure",
            Outcome::Reset => "reset",
            Outcome::Timeout => "timeout",
        }
    }
}

/// Why no further attempt is made although the outcome was a retryable failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// POST/PATCH that may have reached the application, without an enforced idempotency key.
    Unsafe,
    /// A keyed write that was sent and got no answer (a reset, or no answer before the
    /// deadline): the application may still be executing it, so it is not sent again.
    MayBeExecuting,
    Attempts,
    Budget,
    Deadline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The outcome is the final answer (success, or a failure not configured for retries).
    Done,
    /// Try again after `wait_ms`, with `timeout_ms` for that attempt.
    Retry { wait_ms: u64, timeout_ms: u64 },
    /// A retryable failure that is not retried.
    GiveUp(GiveUp),
}

/// The facts of the attempt that just ended.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// 1-based number of the attempt that just ended.
    pub attempt: u32,
    pub outcome: Outcome,
    /// The upstream's `Retry-After`, already converted to ms.
    pub retry_after_ms: Option<u64>,
    /// Time since the exchange started, ms.
    pub elapsed_ms: u64,
}

/// The compiled `retry` section plus the worker's budget.
#[derive(Debug)]
pub struct Policy {
    pub attempts: u32,
    conditions: u8,
    /// `retry.methods` as a set ([`crate::method::mask`]); methods outside the ones a config
    /// can name are owned only when every nameable one is.
    methods: u8,
    pub per_try_timeout_ms: u64,
    pub deadline_ms: u64,
    backoff: BackoffConfig,
    respect_retry_after: bool,
    max_retry_after_ms: u64,
    pub max_body_bytes: u64,
    pub body_too_large: BodyTooLarge,
    /// (Shared with each exchange that sends there: no copy per request.)
    pub target: Option<Rc<str>>,
    pub exchange: ExchangeMode,
    pub attempt_count_header: Option<String>,
    budget: RefCell<Budget>,
}

impl Policy {
    /// Whether every method is rollsafe's (the default): then the method need not be known
    /// before the request's headers are read whole.
    pub fn owns_every_method(&self) -> bool {
        self.methods == crate::method::EVERY
    }

    /// Whether rollsafe owns a request of `method` for its retries (`retry.methods`).
    pub fn owns(&self, method: &str) -> bool {
        match crate::method::mask(method) {
            0 => self.owns_every_method(),
            bit => self.methods & bit != 0,
        }
    }
}

/// Methods whose repetition has the same effect as one request (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

impl Policy {
    pub fn compile(cfg: &RetryConfig, at: &str) -> Result<Policy, ConfigError> {
        let err = |field: &str, reason: String| ConfigError::new(format!("{at}.{field}"), reason);
        if !(1..=10).contains(&cfg.attempts) {
            return Err(err(
                "attempts",
                format!("must be 1..=10, got {}", cfg.attempts),
            ));
        }
        if !(1..=300_000).contains(&cfg.per_try_timeout_ms) {
            let got = cfg.per_try_timeout_ms;
            return Err(err(
                "per_try_timeout_ms",
                format!("must be 1..=300000, got {got}"),
            ));
        }
        if !(1..=600_000).contains(&cfg.deadline_ms) {
            return Err(err(
                "deadline_ms",
                format!("must be 1..=600000, got {}", cfg.deadline_ms),
            ));
        }
        let b = &cfg.backoff;
        if !(1..=60_000).contains(&b.base_ms) {
            return Err(err(
                "backoff.base_ms",
                format!("must be 1..=60000, got {}", b.base_ms),
            ));
        }
        if !(1..=60_000).contains(&b.max_ms) || b.max_ms < b.base_ms {
            return Err(err(
                "backoff.max_ms",
                format!("must be base_ms..=60000, got {}", b.max_ms),
            ));
        }
        if b.min_ms > 60_000 {
            return Err(err(
                "backoff.min_ms",
                format!("must be 0..=60000, got {}", b.min_ms),
            ));
        }
        if cfg.max_retry_after_ms > 60_000 {
            let got = cfg.max_retry_after_ms;
            return Err(err(
                "max_retry_after_ms",
                format!("must be 0..=60000, got {got}"),
            ));
        }
        let bc = &cfg.budget;
        if !(0.0..=10.0).contains(&bc.ratio) {
            return Err(err(
                "budget.ratio",
                format!("must be 0..=10, got {}", bc.ratio),
            ));
        }
        if bc.min_per_s > 100_000 {
            return Err(err(
                "budget.min_per_s",
                format!("must be 0..=100000, got {}", bc.min_per_s),
            ));
        }
        if !(1..=60).contains(&bc.window_s) {
            return Err(err(
                "budget.window_s",
                format!("must be 1..=60, got {}", bc.window_s),
            ));
        }
        if cfg.max_body_bytes > 16 << 20 {
            let got = cfg.max_body_bytes;
            return Err(err(
                "max_body_bytes",
                format!("must be 0..=16777216, got {got}"),
            ));
        }
        if cfg.target.as_deref() == Some("") {
            return Err(err(
                "target",
                "must name the upstream (Envoy cluster, Kong host:port)".into(),
            ));
        }
        if let Some(h) = &cfg.attempt_count_header {
            if h.is_empty()
                || !h
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            {
                return Err(err(
                    "attempt_count_header",
                    format!("not a valid header name: {h:?}"),
                ));
            }
        }
        if cfg.methods.is_empty() {
            return Err(err(
                "methods",
                "must name at least one method (leave it out for all)".into(),
            ));
        }
        let conditions = cfg.on.iter().fold(0u8, |acc, c| acc | (1 << (*c as u8)));
        Ok(Policy {
            attempts: cfg.attempts,
            conditions,
            methods: crate::method::set(&cfg.methods),
            per_try_timeout_ms: cfg.per_try_timeout_ms,
            deadline_ms: cfg.deadline_ms,
            backoff: cfg.backoff.clone(),
            respect_retry_after: cfg.respect_retry_after,
            max_retry_after_ms: cfg.max_retry_after_ms,
            max_body_bytes: cfg.max_body_bytes,
            body_too_large: cfg.body_too_large,
            target: cfg.target.as_deref().map(Rc::from),
            exchange: cfg.exchange,
            attempt_count_header: cfg
                .attempt_count_header
                .as_ref()
                .map(|h| h.to_ascii_lowercase()),
            budget: RefCell::new(Budget::new(&cfg.budget)),
        })
    }

    /// Whether this outcome is one the config retries.
    pub fn retries(&self, outcome: Outcome) -> bool {
        outcome
            .condition()
            .is_some_and(|c| self.conditions & (1 << (c as u8)) != 0)
    }

    /// The longest an exchange can take from its first attempt to its answer: every attempt's
    /// timeout and every wait between them, cut at the deadline (which bounds attempts after
    /// the first, and every wait).
    pub fn longest_exchange_ms(&self) -> u64 {
        let n = u64::from(self.attempts);
        let b = &self.backoff;
        let wait = if self.respect_retry_after {
            (b.min_ms + b.max_ms).max(self.max_retry_after_ms)
        } else {
            b.min_ms + b.max_ms
        };
        let unbounded = n * self.per_try_timeout_ms + (n - 1) * wait;
        unbounded.min(self.first_timeout_ms().max(self.deadline_ms))
    }

    /// How long an attempt may take with `remaining` ms left to the deadline. A keyed write's
    /// attempt is not cut at the per-try timeout: once sent, "no answer yet" is no reason for
    /// another attempt while the application may still be executing it, so it waits up to the
    /// deadline. Idempotent requests (and unkeyed ones, which are not retried after sending
    /// anyway) keep the per-try bound.
    pub fn attempt_timeout_ms(&self, method: &str, key_enforced: bool, remaining: u64) -> u64 {
        if key_enforced && !is_idempotent(method) {
            remaining
        } else {
            self.per_try_timeout_ms.min(remaining)
        }
    }

    /// Timeout of the first attempt.
    pub fn first_timeout_ms(&self) -> u64 {
        self.per_try_timeout_ms.min(self.deadline_ms)
    }

    /// Counts a request into the budget's base (call once per owned exchange).
    pub fn note_request(&self, now_ms: u64) {
        if let Ok(mut b) = self.budget.try_borrow_mut() {
            b.note_request(now_ms);
        }
    }

    /// The full-jitter wait before retry number `retry` (1 = the first retry).
    pub fn backoff_ms(&self, retry: u32, random: u64) -> u64 {
        let b = &self.backoff;
        let ceiling = b
            .base_ms
            .saturating_mul(1u64 << retry.min(32))
            .min(b.max_ms)
            .max(1);
        b.min_ms + random % ceiling
    }

    /// What to do after an attempt. `can_wait` is false on hosts that cannot delay an attempt
    /// (Kong): retries are then immediate and `Retry-After` is left to the client.
    pub fn decide(
        &self,
        method: &str,
        key_enforced: bool,
        r: &Report,
        can_wait: bool,
        now_ms: u64,
        random: u64,
    ) -> Decision {
        if !self.retries(r.outcome) {
            return Decision::Done;
        }
        // Only an outcome that shows the application is done with the attempt, or never had
        // it, lets a write go again: a refused connection, or an answer (a keyed write's 5xx).
        // A reset or no answer after a keyed write was sent says neither.
        let safe = match r.outcome {
            Outcome::ConnectFailure => true,
            _ if is_idempotent(method) => true,
            Outcome::Status(_) => key_enforced,
            Outcome::Reset | Outcome::Timeout => false,
        };
        if !safe {
            return Decision::GiveUp(if key_enforced {
                GiveUp::MayBeExecuting
            } else {
                GiveUp::Unsafe
            });
        }
        if r.attempt >= self.attempts {
            return Decision::GiveUp(GiveUp::Attempts);
        }
        let mut wait_ms = 0;
        if can_wait {
            wait_ms = self.backoff_ms(r.attempt, random);
            if self.respect_retry_after {
                if let Some(ra) = r.retry_after_ms {
                    wait_ms = wait_ms.max(ra.min(self.max_retry_after_ms));
                }
            }
        }
        let remaining = self.deadline_ms.saturating_sub(r.elapsed_ms);
        if wait_ms >= remaining {
            return Decision::GiveUp(GiveUp::Deadline);
        }
        let timeout_ms = self.attempt_timeout_ms(method, key_enforced, remaining - wait_ms);
        let allowed = match self.budget.try_borrow_mut() {
            Ok(mut b) => b.try_withdraw(now_ms),
            Err(_) => false,
        };
        if !allowed {
            return Decision::GiveUp(GiveUp::Budget);
        }
        Decision::Retry {
            wait_ms,
            timeout_ms,
        }
    }
}

/// Sliding-window retry budget in one-second buckets.
#[derive(Debug)]
pub struct Budget {
    ratio: f64,
    floor: f64,
    buckets: Vec<(u32, u32)>,
    head_s: u64,
}

impl Budget {
    pub fn new(cfg: &BudgetConfig) -> Budget {
        let window = cfg.window_s.max(1);
        Budget {
            ratio: cfg.ratio,
            floor: f64::from(cfg.min_per_s) * f64::from(window),
            buckets: vec![(0, 0); window as usize],
            head_s: 0,
        }
    }

    fn advance(&mut self, now_ms: u64) -> usize {
        let now_s = now_ms / 1000;
        let len = self.buckets.len() as u64;
        if now_s > self.head_s {
            let stale = (now_s - self.head_s).min(len);
            for i in 1..=stale {
                if let Some(b) = self.buckets.get_mut(((self.head_s + i) % len) as usize) {
                    *b = (0, 0);
                }
            }
            self.head_s = now_s;
        }
        (self.head_s % len) as usize
    }

    pub fn note_request(&mut self, now_ms: u64) {
        let i = self.advance(now_ms);
        if let Some(b) = self.buckets.get_mut(i) {
            b.0 = b.0.saturating_add(1);
        }
    }

    pub fn try_withdraw(&mut self, now_ms: u64) -> bool {
        let i = self.advance(now_ms);
        let (requests, retries) = self.buckets.iter().fold((0u64, 0u64), |(a, b), (r, t)| {
            (a + u64::from(*r), b + u64::from(*t))
        });
        let allowed = self.ratio * requests as f64 + self.floor;
        if (retries + 1) as f64 > allowed {
            return false;
        }
        if let Some(b) = self.buckets.get_mut(i) {
            b.1 = b.1.saturating_add(1);
        }
        true
    }
}

/// `Retry-After` as ms from now: delta-seconds or an HTTP-date; `None` for anything else.
pub fn parse_retry_after(value: &str, now_ms: u64) -> Option<u64> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v.parse::<u64>().ok().map(|s| s.saturating_mul(1000));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    let at_ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64;
    Some(at_ms.saturating_sub(now_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: &str) -> Policy {
        let cfg: RetryConfig = serde_json::from_str(json).unwrap();
        Policy::compile(&cfg, "retry").unwrap()
    }

    #[test]
    fn every_method_is_the_default_set_and_the_default_owns_every_method() {
        assert_eq!(crate::method::set(&all_methods()), crate::method::EVERY);
        assert!(policy("{}").owns_every_method());
        assert!(
            policy(r#"{"methods":["GET","HEAD","POST","PUT","PATCH","DELETE","OPTIONS"]}"#)
                .owns_every_method()
        );
        assert!(!policy(r#"{"methods":["POST","PUT","PATCH","DELETE"]}"#).owns_every_method());
    }

    fn report(attempt: u32, outcome: Outcome) -> Report {
        Report {
            attempt,
            outcome,
            retry_after_ms: None,
            elapsed_ms: 0,
        }
    }

    #[test]
    fn backoff_is_full_jitter_within_bounds() {
        let p = policy(r#"{"target":"t","backoff":{"base_ms":25,"max_ms":1000,"min_ms":5}}"#);
        for retry in 1..12 {
            let ceiling = (25u64 << retry).min(1000);
            assert_eq!(p.backoff_ms(retry, 0), 5, "lowest draw is the floor");
            assert_eq!(
                p.backoff_ms(retry, ceiling - 1),
                5 + ceiling - 1,
                "highest draw"
            );
            assert_eq!(
                p.backoff_ms(retry, ceiling),
                5,
                "wraps: uniform over [0, ceiling)"
            );
            for r in [1u64, 77, 123_456_789, u64::MAX] {
                assert!(p.backoff_ms(retry, r) < 5 + ceiling);
            }
        }
        assert_eq!(p.backoff_ms(60, u64::MAX - 1) - 5, (u64::MAX - 1) % 1000);
    }

    #[test]
    fn safety_table_for_every_method_condition_and_key() {
        let p = policy(r#"{"target":"t","attempts":5}"#);
        let outcomes = [
            Outcome::Status(502),
            Outcome::Status(503),
            Outcome::Status(504),
            Outcome::ConnectFailure,
            Outcome::Reset,
            Outcome::Timeout,
        ];
        for method in [
            "GET", "HEAD", "OPTIONS", "PUT", "DELETE", "POST", "PATCH", "PROPFIND",
        ] {
            for outcome in outcomes {
                for key in [false, true] {
                    let d = p.decide(method, key, &report(1, outcome), false, 0, 0);
                    let idempotent =
                        matches!(method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE");
                    let answered = matches!(outcome, Outcome::Status(_));
                    let safe =
                        idempotent || outcome == Outcome::ConnectFailure || (key && answered);
                    if safe {
                        assert!(
                            matches!(d, Decision::Retry { .. }),
                            "{method} {outcome:?} key={key}: {d:?}"
                        );
                    } else if key {
                        // A keyed write sent and unanswered may still be executing.
                        assert_eq!(
                            d,
                            Decision::GiveUp(GiveUp::MayBeExecuting),
                            "{method} {outcome:?}"
                        );
                    } else {
                        assert_eq!(
                            d,
                            Decision::GiveUp(GiveUp::Unsafe),
                            "{method} {outcome:?} key={key}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_keyed_writes_attempt_waits_to_the_deadline_an_idempotent_one_to_the_per_try_timeout() {
        let p = policy(r#"{"target":"t","per_try_timeout_ms":1000,"deadline_ms":6000}"#);
        assert_eq!(p.attempt_timeout_ms("POST", true, 5_000), 5_000);
        assert_eq!(p.attempt_timeout_ms("PATCH", true, 6_000), 6_000);
        assert_eq!(p.attempt_timeout_ms("GET", true, 5_000), 1_000);
        assert_eq!(p.attempt_timeout_ms("POST", false, 5_000), 1_000);
        assert_eq!(p.attempt_timeout_ms("PUT", false, 400), 400);
        // The retry after a keyed write's 503 gets what is left of the deadline.
        let d = p.decide("POST", true, &report(1, Outcome::Status(503)), false, 0, 0);
        assert!(
            matches!(d, Decision::Retry { timeout_ms, .. } if timeout_ms > 1_000),
            "{d:?}"
        );
    }

    #[test]
    fn success_and_unconfigured_conditions_are_final() {
        let p = policy(r#"{"target":"t","on":["503"]}"#);
        for o in [
            Outcome::Status(200),
            Outcome::Status(500),
            Outcome::Status(502),
            Outcome::Reset,
        ] {
            assert_eq!(
                p.decide("GET", false, &report(1, o), true, 0, 0),
                Decision::Done
            );
        }
        assert!(matches!(
            p.decide("GET", false, &report(1, Outcome::Status(503)), true, 0, 0),
            Decision::Retry { .. }
        ));
    }

    #[test]
    fn attempts_include_the_first() {
        let p = policy(r#"{"target":"t","attempts":3}"#);
        assert!(matches!(
            p.decide("GET", false, &report(2, Outcome::Status(503)), false, 0, 0),
            Decision::Retry { .. }
        ));
        assert_eq!(
            p.decide("GET", false, &report(3, Outcome::Status(503)), false, 0, 0),
            Decision::GiveUp(GiveUp::Attempts)
        );
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap_only_where_the_host_can_wait() {
        let p = policy(
            r#"{"target":"t","max_retry_after_ms":3000,"backoff":{"base_ms":1,"max_ms":1}}"#,
        );
        let mut r = report(1, Outcome::Status(503));
        r.retry_after_ms = Some(2000);
        assert_eq!(
            p.decide("GET", false, &r, true, 0, 0),
            Decision::Retry {
                wait_ms: 2000,
                timeout_ms: 5000
            }
        );
        r.retry_after_ms = Some(10_000);
        assert_eq!(
            p.decide("GET", false, &r, true, 0, 0),
            Decision::Retry {
                wait_ms: 3000,
                timeout_ms: 5000
            }
        );
        assert_eq!(
            p.decide("GET", false, &r, false, 0, 0),
            Decision::Retry {
                wait_ms: 0,
                timeout_ms: 5000
            }
        );
        let ignore = policy(
            r#"{"target":"t","respect_retry_after":false,"backoff":{"base_ms":1,"max_ms":1}}"#,
        );
        assert_eq!(
            ignore.decide("GET", false, &r, true, 0, 0),
            Decision::Retry {
                wait_ms: 0,
                timeout_ms: 5000
            }
        );
    }

    #[test]
    fn deadline_covers_attempts_and_waits() {
        let p = policy(
            r#"{"target":"t","attempts":10,"deadline_ms":1000,"per_try_timeout_ms":400,"backoff":{"base_ms":100,"max_ms":100,"min_ms":100}}"#,
        );
        let mut r = report(1, Outcome::Timeout);
        r.elapsed_ms = 400;
        // 600 ms left, 100..199 ms wait, then at most 400 ms for the attempt.
        assert_eq!(
            p.decide("GET", false, &r, true, 0, 0),
            Decision::Retry {
                wait_ms: 100,
                timeout_ms: 400
            }
        );
        r.elapsed_ms = 800;
        assert_eq!(
            p.decide("GET", false, &r, true, 0, 0),
            Decision::Retry {
                wait_ms: 100,
                timeout_ms: 100
            }
        );
        r.elapsed_ms = 900;
        assert_eq!(
            p.decide("GET", false, &r, true, 0, 0),
            Decision::GiveUp(GiveUp::Deadline)
        );
        r.elapsed_ms = 5000;
        assert_eq!(
            p.decide("GET", false, &r, false, 0, 0),
            Decision::GiveUp(GiveUp::Deadline)
        );
    }

    #[test]
    fn budget_allows_ratio_of_requests_plus_a_floor_per_window() {
        let mut b = Budget::new(&BudgetConfig {
            ratio: 0.2,
            min_per_s: 1,
            window_s: 10,
        });
        let t0 = 1_000_000;
        for _ in 0..100 {
            b.note_request(t0);
        }
        // 0.2 * 100 + 1 * 10 = 30 retries in the window.
        let granted = (0..50).filter(|_| b.try_withdraw(t0 + 500)).count();
        assert_eq!(granted, 30);
        // Nine seconds on, still the same window.
        assert!(!b.try_withdraw(t0 + 9_000));
        // Past the window the old requests and retries have aged out: only the floor remains.
        let granted = (0..50).filter(|_| b.try_withdraw(t0 + 10_500)).count();
        assert_eq!(granted, 10);
    }

    #[test]
    fn budget_exhaustion_stops_retries() {
        let p = policy(
            r#"{"target":"t","attempts":10,"budget":{"ratio":0,"min_per_s":1,"window_s":2}}"#,
        );
        let d = |now| {
            p.decide(
                "GET",
                false,
                &report(1, Outcome::Status(502)),
                false,
                now,
                0,
            )
        };
        assert!(matches!(d(0), Decision::Retry { .. }));
        assert!(matches!(d(1), Decision::Retry { .. }));
        assert_eq!(d(2), Decision::GiveUp(GiveUp::Budget));
    }

    #[test]
    fn retry_after_parsing() {
        let now = 1_700_000_000_000;
        assert_eq!(parse_retry_after("2", now), Some(2000));
        assert_eq!(parse_retry_after(" 120 ", now), Some(120_000));
        assert_eq!(
            parse_retry_after("Tue, 14 Nov 2023 22:13:30 GMT", now),
            Some(10_000)
        );
        assert_eq!(
            parse_retry_after("Tue, 14 Nov 2023 22:13:00 GMT", now),
            Some(0)
        );
        for garbage in [
            "",
            "-1",
            "1.5",
            "soon",
            "Tue, 14 Nov 2023",
            "99999999999999999999999",
        ] {
            assert_eq!(parse_retry_after(garbage, now), None, "{garbage:?}");
        }
    }

    #[test]
    fn config_errors_name_the_field() {
        let cases = [
            (
                r#"{"target":"t","attempts":0}"#,
                "retry.attempts",
                "must be 1..=10, got 0",
            ),
            (
                r#"{"target":"t","attempts":11}"#,
                "retry.attempts",
                "must be 1..=10, got 11",
            ),
            (r#"{"target":""}"#, "retry.target", "must name"),
            (
                r#"{"target":"t","backoff":{"base_ms":100,"max_ms":50}}"#,
                "retry.backoff.max_ms",
                "",
            ),
            (
                r#"{"target":"t","budget":{"ratio":-1}}"#,
                "retry.budget.ratio",
                "",
            ),
            (r#"{"target":"t","deadline_ms":0}"#, "retry.deadline_ms", ""),
            (
                r#"{"target":"t","attempt_count_header":"x y"}"#,
                "retry.attempt_count_header",
                "",
            ),
        ];
        for (json, path, reason) in cases {
            let cfg: RetryConfig = serde_json::from_str(json).unwrap();
            let e = Policy::compile(&cfg, "retry").unwrap_err();
            assert_eq!(e.path, path, "{json}");
            assert!(e.reason.contains(reason), "{e}");
        }
    }
}
