//! The compiled configuration: everything decided once at configure time (parsed schedules,
//! lookup tables, the exchange driver) so that requests only compare and look up.

use crate::config::{self, Config, ConfigError};
use crate::retry::ExchangeMode;
use crate::{idempotency, maintenance, retry, routing};
use std::cell::RefCell;
use std::rc::Rc;

/// Which proxy-wasm host runs the filter; detected once at configure time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostKind {
    #[default]
    Envoy,
    /// Kong's ngx_wasm_module.
    Kong,
}

/// Envoy's default `per_connection_buffer_limit_bytes`: the most of a held body it buffers.
pub const ENVOY_BUFFER_LIMIT: u64 = 1 << 20;

/// How an exchange rollsafe owns is carried (HOSTS.md "What follows").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// Every attempt is rollsafe's own `dispatch_http_call` (Kong's host; Envoy on request).
    Dispatch,
    /// Attempt 1 is the route's own request; retries are dispatched (Envoy).
    Native,
}

#[derive(Debug, Default)]
pub struct Plan {
    pub host: HostKind,
    pub maintenance: Option<maintenance::Policy>,
    /// The retry policy and the driver that carries the exchange.
    pub retry: Option<(retry::Policy, Driver)>,
    pub idempotency: Option<idempotency::Policy>,
    pub routing: Option<routing::Policy>,
    /// The exchange exists only for idempotency (no `retry` section): requests whose method
    /// takes no key pass without one.
    pub exchange_for_keys_only: bool,
    /// Kong's host with neither `retry.target` nor `routing`: attempts go to the route's
    /// Service (`kong.router.service`, Kong 3.6+), read at the first request and kept.
    pub target_from_service: bool,
    pub service: RefCell<ServiceTarget>,
}

/// The route's Service as the attempt target (`Plan::target_from_service`). A filter instance
/// belongs to one route or Service, and Kong makes a new one when its configuration changes,
/// so what is read once holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum ServiceTarget {
    #[default]
    Unread,
    Ready(Rc<str>),
    /// Logged once; Kong's own proxying carries the route's requests, keys still enforced.
    Unusable,
}

impl Plan {
    pub fn compile(cfg: &Config, host: HostKind) -> Result<Plan, ConfigError> {
        let idem = cfg
            .idempotency
            .as_ref()
            .map(|i| idempotency::Policy::compile(i, "idempotency"))
            .transpose()?;
        // Idempotency owns the exchange too: without a retry section, one attempt.
        let single = retry::RetryConfig::single_attempt();
        let retry_cfg = cfg.retry.as_ref().or(idem.as_ref().map(|_| &single));
        let retry = match retry_cfg {
            None => None,
            Some(r) => {
                let policy = retry::Policy::compile(r, "retry")?;
                // Envoy holds at most its buffer limit of a paused body (per_connection_buffer_
                // limit_bytes, 1 MiB by default) and then answers 413 itself — after the
                // route's upstream got the headers: a cut-off request at the application.
                // A declared length over max_body_bytes is refused before that.
                if host == HostKind::Envoy && policy.max_body_bytes > ENVOY_BUFFER_LIMIT {
                    return Err(ConfigError::new(
                        "retry.max_body_bytes",
                        format!(
                            "at most {ENVOY_BUFFER_LIMIT} on Envoy (its default buffer limit): \
                             a larger body overflows Envoy's buffer while rollsafe holds it, \
                             and the route's upstream is left with a request cut off; got {}",
                            policy.max_body_bytes
                        ),
                    ));
                }
                let driver = match (policy.exchange, host) {
                    (ExchangeMode::Dispatch, _) | (ExchangeMode::Auto, HostKind::Kong) => {
                        Driver::Dispatch
                    }
                    (ExchangeMode::Native, HostKind::Kong) => {
                        return Err(ConfigError::new(
                            "retry.exchange",
                            "native is not possible on Kong's host (it cannot hold or retry a \
                             response); use auto or dispatch",
                        ))
                    }
                    (ExchangeMode::Native | ExchangeMode::Auto, HostKind::Envoy) => Driver::Native,
                };
                Some((policy, driver))
            }
        };
        if let (Some(ip), Some((policy, _))) = (&idem, &retry) {
            // A lease that ends while its exchange can still produce an answer lets a second
            // execution start beside the first.
            // A keyed write's attempt waits for its answer up to the deadline.
            let (longest, why) = if ip.keys_writes() {
                (
                    policy.deadline_ms,
                    "a keyed write's attempts wait for their answer up to retry.deadline_ms",
                )
            } else {
                (
                    policy.longest_exchange_ms(),
                    "retry.attempts × per_try_timeout_ms plus the waits between them, at most \
                     retry.deadline_ms",
                )
            };
            if ip.lease_ms < longest {
                return Err(ConfigError::new(
                    "idempotency.lease_ms",
                    format!(
                        "must cover the longest exchange ({longest} ms: {why}), got {}",
                        ip.lease_ms
                    ),
                ));
            }
        }
        let idem = idem.map(|mut ip| {
            if host == HostKind::Kong && ip.default_scope {
                // Kong's auth plugins tell consumers apart without an Authorization header
                // (key-auth's apikey, or the X-Consumer-ID / X-Credential-Identifier they add
                // upstream, which the filter chain sees): two consumers never share a replay.
                ip.scope.extend(
                    ["x-consumer-id", "x-credential-identifier", "apikey"]
                        .map(|h| idempotency::ScopePart::Header(h.into())),
                );
            }
            ip
        });
        Ok(Plan {
            host,
            maintenance: cfg
                .maintenance
                .as_ref()
                .map(|m| maintenance::Policy::compile(m, "maintenance"))
                .transpose()?,
            exchange_for_keys_only: cfg.retry.is_none() && retry.is_some(),
            target_from_service: host == HostKind::Kong
                && cfg.routing.is_none()
                && retry.as_ref().is_some_and(|(p, _)| p.target.is_none()),
            service: RefCell::default(),
            retry,
            idempotency: idem,
            routing: cfg
                .routing
                .as_ref()
                .map(|r| routing::Policy::compile(r, "routing"))
                .transpose()?,
        })
    }

    /// True when no capability is configured: requests pass without rollsafe looking at them.
    pub fn is_pass_through(&self) -> bool {
        self.maintenance.is_none()
            && self.retry.is_none()
            && self.idempotency.is_none()
            && self.routing.is_none()
    }

    /// True when nothing but maintenance is configured: a request outside its windows is then
    /// none of rollsafe's business past that check.
    pub fn only_maintenance(&self) -> bool {
        self.retry.is_none() && self.idempotency.is_none() && self.routing.is_none()
    }

    /// Whether requests hand the root calls to send on its tick (the shared store's writes
    /// nobody waits for).
    pub fn sends_later(&self) -> bool {
        self.idempotency
            .as_ref()
            .is_some_and(|ip| ip.shared.is_some())
    }

    /// Whether any exchange may wait a backoff on the root context's tick: on Envoy every
    /// request with a body takes the native driver, whatever `retry.exchange` says.
    pub fn needs_tick(&self) -> bool {
        self.retry.is_some() && self.host == HostKind::Envoy
    }
}

/// Parses, validates and compiles configuration bytes, exactly as `on_configure` does.
pub fn load(bytes: &[u8], host: HostKind) -> Result<Plan, ConfigError> {
    Plan::compile(&config::parse(bytes)?, host)
}
