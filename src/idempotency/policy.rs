//! The `idempotency` section: its config type and what it compiles to.

use crate::config::error::ConfigError;
use serde::Deserialize;

/// `idempotency` config section.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// Request header carrying the key.
    #[serde(default = "default_header")]
    #[cfg_attr(test, schemars(regex(pattern = r"^[A-Za-z0-9_-]+$")))]
    pub header: String,
    /// Methods the key applies to.
    #[serde(default = "default_methods")]
    pub methods: Vec<crate::method::Method>,
    /// A request of those methods without a key gets 400.
    #[serde(default)]
    pub required: bool,
    /// How long a completed result is replayed, seconds.
    #[serde(default = "default_ttl")]
    #[cfg_attr(test, schemars(range(min = 1, max = 604800)))]
    pub ttl_s: u64,
    /// How long a claim in flight holds the key before another try may run, ms.
    #[serde(default = "default_lease")]
    #[cfg_attr(test, schemars(range(min = 100, max = 600000)))]
    pub lease_ms: u64,
    /// What separates callers: `route` and `header:<name>` (hashed). Default: the route and the
    /// `Authorization` header, so one client cannot read another's result.
    #[serde(default = "default_scope")]
    #[cfg_attr(
        test,
        schemars(inner(regex(pattern = r"^(route|header:[!#$%&'*+.^_`|~0-9A-Za-z-]+)$")))
    )]
    pub scope: Vec<String>,
    /// Largest response body stored for replay, bytes.
    #[serde(default = "default_max_response")]
    #[cfg_attr(test, schemars(range(max = 1048576)))]
    pub max_response_bytes: u64,
    /// Records kept per node (slots created at configure time).
    #[serde(default = "default_max_entries")]
    #[cfg_attr(test, schemars(range(min = 16, max = 1000000)))]
    pub max_entries: u32,
    /// Statuses whose results are stored and replayed: classes (`2xx`) or exact codes.
    #[serde(default = "default_store_statuses")]
    #[cfg_attr(test, schemars(inner(regex(pattern = r"^([1-5]xx|[1-5][0-9][0-9])$"))))]
    pub store_statuses: Vec<String>,
    /// Statuses never stored even when their class is (the client should simply retry).
    #[serde(default = "default_skip_statuses")]
    pub skip_statuses: Vec<u16>,
    /// Response headers replayed besides the defaults (content-type, location, etag,
    /// cache-control).
    #[serde(default)]
    pub replay_headers: Vec<String>,
    /// The store has no free slot: `reject` (503 + `Retry-After`) or `pass-through` (forward the
    /// request unprotected). Logged and counted either way.
    #[serde(default)]
    pub when_full: WhenFull,
    /// Where records live: `local` (this node's shared data; every gateway node on its own)
    /// or `redis` (one store for the whole fleet, through Webdis; see `redis`).
    #[serde(default)]
    pub store: StoreKind,
    /// The shared store, with `store: redis`. `max_entries` then sizes this node's cache of
    /// completed records.
    #[serde(default)]
    pub redis: Option<crate::shared_store::RedisConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    #[default]
    Local,
    Redis,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    #[default]
    Reject,
    PassThrough,
}

fn default_header() -> String {
    "Idempotency-Key".into()
}
fn default_methods() -> Vec<crate::method::Method> {
    use crate::method::Method;
    vec![Method::POST, Method::PATCH]
}
fn default_ttl() -> u64 {
    86_400
}
fn default_lease() -> u64 {
    30_000
}
fn default_scope() -> Vec<String> {
    vec!["route".into(), "header:authorization".into()]
}
fn default_max_response() -> u64 {
    64 * 1024
}
fn default_max_entries() -> u32 {
    16_384
}
fn default_store_statuses() -> Vec<String> {
    vec!["2xx".into(), "4xx".into()]
}
fn default_skip_statuses() -> Vec<u16> {
    vec![408, 409, 425, 429]
}

/// Where a part of the caller scope comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopePart {
    Route,
    Header(String),
}

/// The compiled section.
#[derive(Debug)]
pub struct Policy {
    pub header: String,
    methods: u8,
    pub required: bool,
    pub ttl_ms: u64,
    pub lease_ms: u64,
    pub scope: Vec<ScopePart>,
    /// The scope is the default one (the host may add to it: Kong's consumers).
    pub default_scope: bool,
    pub max_response_bytes: usize,
    pub slots: u32,
    store_classes: Vec<u16>,
    store_exact: Vec<u16>,
    skip: Vec<u16>,
    pub replay_headers: Vec<String>,
    pub when_full: WhenFull,
    /// The route's name when the host names none for a request (Envoy: the filter's root
    /// id), read once at configure time.
    pub route_fallback: Option<String>,
    /// The fleet-wide store (`store: redis`); `None`: the node-local one.
    pub shared: Option<crate::shared_store::Redis>,
    /// The scope digests of the callers seen lately (not configuration: a memo).
    pub scopes: std::cell::RefCell<super::ScopeMemo>,
}

impl Policy {
    pub fn compile(cfg: &IdempotencyConfig, at: &str) -> Result<Policy, ConfigError> {
        let err = |field: &str, reason: String| ConfigError::new(format!("{at}.{field}"), reason);
        let header = cfg.header.to_ascii_lowercase();
        if header.is_empty()
            || !header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(err(
                "header",
                format!("not a valid header name: {:?}", cfg.header),
            ));
        }
        if !(1..=604_800).contains(&cfg.ttl_s) {
            return Err(err(
                "ttl_s",
                format!("must be 1..=604800, got {}", cfg.ttl_s),
            ));
        }
        if !(100..=600_000).contains(&cfg.lease_ms) {
            return Err(err(
                "lease_ms",
                format!("must be 100..=600000, got {}", cfg.lease_ms),
            ));
        }
        if cfg.max_response_bytes > 1 << 20 {
            let got = cfg.max_response_bytes;
            return Err(err(
                "max_response_bytes",
                format!("must be 0..=1048576, got {got}"),
            ));
        }
        if !(16..=1_000_000).contains(&cfg.max_entries) {
            return Err(err(
                "max_entries",
                format!("must be 16..=1000000, got {}", cfg.max_entries),
            ));
        }
        let mut scope = Vec::new();
        for (i, s) in cfg.scope.iter().enumerate() {
            scope.push(match s.split_once(':') {
                None if s == "route" => ScopePart::Route,
                Some(("header", name)) if !name.is_empty() => {
                    ScopePart::Header(name.to_ascii_lowercase())
                }
                _ => {
                    return Err(err(
                        &format!("scope[{i}]"),
                        format!("must be \"route\" or \"header:<name>\", got {s:?}"),
                    ))
                }
            });
        }
        let shared = match (cfg.store, &cfg.redis) {
            (StoreKind::Redis, Some(r)) => Some(crate::shared_store::Redis::compile(
                r,
                &format!("{at}.redis"),
            )?),
            (StoreKind::Redis, None) => {
                return Err(err(
                    "redis",
                    "required with store: redis (at least its target: where Webdis listens)".into(),
                ))
            }
            (StoreKind::Local, Some(_)) => {
                return Err(err(
                    "store",
                    "must be redis when a redis section is given (it is local by default)".into(),
                ))
            }
            (StoreKind::Local, None) => None,
        };
        // Without the cache, the shared store keeps nothing on the node.
        let slots = match &shared {
            Some(r) if !r.cache => 0,
            _ => cfg.max_entries,
        };
        let (mut store_classes, mut store_exact) = (Vec::new(), Vec::new());
        for (i, s) in cfg.store_statuses.iter().enumerate() {
            let bad = || {
                err(
                    &format!("store_statuses[{i}]"),
                    format!("must be like \"2xx\" or \"201\", got {s:?}"),
                )
            };
            match s.strip_suffix("xx") {
                Some(c) => store_classes.push(
                    c.parse::<u16>()
                        .ok()
                        .filter(|c| (1..=5).contains(c))
                        .ok_or_else(bad)?,
                ),
                None => store_exact.push(
                    s.parse::<u16>()
                        .ok()
                        .filter(|c| (100..=599).contains(c))
                        .ok_or_else(bad)?,
                ),
            }
        }
        Ok(Policy {
            header,
            methods: crate::method::set(&cfg.methods),
            required: cfg.required,
            ttl_ms: cfg.ttl_s * 1000,
            lease_ms: cfg.lease_ms,
            scope,
            default_scope: cfg.scope == default_scope(),
            max_response_bytes: cfg.max_response_bytes as usize,
            slots,
            store_classes,
            store_exact,
            skip: cfg.skip_statuses.clone(),
            replay_headers: ["content-type", "location", "etag", "cache-control"]
                .iter()
                .map(|s| s.to_string())
                .chain(cfg.replay_headers.iter().map(|h| h.to_ascii_lowercase()))
                .collect(),
            when_full: cfg.when_full,
            route_fallback: None,
            shared,
            scopes: Default::default(),
        })
    }

    pub fn applies_to(&self, method: &str) -> bool {
        crate::method::mask(method) & self.methods != 0
    }

    /// Whether keys apply to a method that is not idempotent (RFC 9110 §9.2.2): its attempts
    /// are then never cut short while the application may be executing them.
    pub fn keys_writes(&self) -> bool {
        ["POST", "PATCH"]
            .iter()
            .any(|m| self.applies_to(m) && !crate::retry::is_idempotent(m))
    }

    /// Whether a final answer with this status completes the record (else it is released).
    pub fn stores(&self, status: u16) -> bool {
        !self.skip.contains(&status)
            && (self.store_exact.contains(&status) || self.store_classes.contains(&(status / 100)))
    }
}
