//! The host layer: everything that talks to a proxy-wasm host lives here and only translates.
//!
//! `flow` holds the per-request logic written against the [`Host`] trait, so native tests can
//! drive it with a fake host; `proxy` implements [`Host`] with proxy-wasm hostcalls and wires the
//! SDK's root and HTTP contexts to `flow`.

mod abi;
pub mod exchange;
pub mod flow;
pub mod headers;
pub mod key;
pub mod proxy;
pub mod reply;
pub mod scheduler;

#[cfg(test)]
pub mod fake;
#[cfg(test)]
mod idempotency_flow_tests;
#[cfg(test)]
mod profile_tests;
#[cfg(test)]
mod retry_flow_tests;
#[cfg(test)]
mod shared_store_flow_tests;

/// Log levels the flow uses (mapped to the host's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

/// Counters rollsafe exports (Envoy: `wasmcustom.rollsafe_*` in `/stats`; Kong exports them too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    MaintenanceRejected,
    MaintenanceBypassed,
    /// Every upstream attempt of an exchange rollsafe owns.
    Attempts,
    Retry502,
    Retry503,
    Retry504,
    RetryConnectFailure,
    RetryReset,
    RetryTimeout,
    RetryBudgetExhausted,
    RetryDeadlineExceeded,
    /// A retryable failure not retried: attempts used up, or unsafe to repeat.
    RetryGaveUp,
    BodyTooLarge,
    /// Envoy: the route's upstream had been sent the headers of a request whose body rollsafe
    /// never released to it (a body refused mid-stream; the dispatch driver), and that stream
    /// was reset.
    RouteRequestAborted,
    IdemReplayed,
    IdemInFlight,
    IdemMismatch,
    IdemBadKey,
    IdemStored,
    IdemReleased,
    IdemStoreFull,
    /// The oldest completed record of a key's probe window made room for a new key.
    IdemEvicted,
    /// The shared store (Redis through Webdis) gave no usable answer: down, slow, or an error.
    IdemStoreUnavailable,
    /// `when_unavailable: fail-open`: a keyed request ran unprotected.
    IdemFailOpen,
    /// A keyed request answered (replay or 422) from this node's cache of the shared store's
    /// completed records, with no call to Redis.
    IdemCacheHit,
    /// A keyed write ended with its outcome unknown (sent, no answer): the key is held.
    IdemOutcomeUnknown,
    /// A keyed request claimed a key whose earlier claim ran out of lease unsettled.
    IdemInDoubt,
    RoutingMissingKey,
    RoutingFailover,
    RoutingGroupDown,
}

impl Metric {
    pub const ALL: [Metric; 30] = [
        Metric::MaintenanceRejected,
        Metric::MaintenanceBypassed,
        Metric::Attempts,
        Metric::Retry502,
        Metric::Retry503,
        Metric::Retry504,
        Metric::RetryConnectFailure,
        Metric::RetryReset,
        Metric::RetryTimeout,
        Metric::RetryBudgetExhausted,
        Metric::RetryDeadlineExceeded,
        Metric::RetryGaveUp,
        Metric::BodyTooLarge,
        Metric::RouteRequestAborted,
        Metric::IdemReplayed,
        Metric::IdemInFlight,
        Metric::IdemMismatch,
        Metric::IdemBadKey,
        Metric::IdemStored,
        Metric::IdemReleased,
        Metric::IdemStoreFull,
        Metric::IdemEvicted,
        Metric::IdemStoreUnavailable,
        Metric::IdemFailOpen,
        Metric::IdemCacheHit,
        Metric::IdemOutcomeUnknown,
        Metric::IdemInDoubt,
        Metric::RoutingMissingKey,
        Metric::RoutingFailover,
        Metric::RoutingGroupDown,
    ];

    /// Its place in [`Metric::ALL`] (declared in the same order: a test holds them so).
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Metric::MaintenanceRejected => "rollsafe_maintenance_rejected",
            Metric::MaintenanceBypassed => "rollsafe_maintenance_bypassed",
            Metric::Attempts => "rollsafe_attempts",
            Metric::Retry502 => "rollsafe_retries_502",
            Metric::Retry503 => "rollsafe_retries_503",
            Metric::Retry504 => "rollsafe_retries_504",
            Metric::RetryConnectFailure => "rollsafe_retries_connect_failure",
            Metric::RetryReset => "rollsafe_retries_reset",
            Metric::RetryTimeout => "rollsafe_retries_timeout",
            Metric::RetryBudgetExhausted => "rollsafe_retry_budget_exhausted",
            Metric::RetryDeadlineExceeded => "rollsafe_retry_deadline_exceeded",
            Metric::RetryGaveUp => "rollsafe_retry_gave_up",
            Metric::BodyTooLarge => "rollsafe_body_too_large",
            Metric::RouteRequestAborted => "rollsafe_route_request_aborted",
            Metric::IdemReplayed => "rollsafe_idempotency_replays",
            Metric::IdemInFlight => "rollsafe_idempotency_409",
            Metric::IdemMismatch => "rollsafe_idempotency_422",
            Metric::IdemBadKey => "rollsafe_idempotency_400",
            Metric::IdemStored => "rollsafe_idempotency_stored",
            Metric::IdemReleased => "rollsafe_idempotency_released",
            Metric::IdemStoreFull => "rollsafe_idempotency_store_full",
            Metric::IdemEvicted => "rollsafe_idempotency_evicted",
            Metric::IdemStoreUnavailable => "rollsafe_idempotency_store_unavailable",
            Metric::IdemFailOpen => "rollsafe_idempotency_fail_open",
            Metric::IdemCacheHit => "rollsafe_idempotency_cache_hits",
            Metric::IdemOutcomeUnknown => "rollsafe_idempotency_outcome_unknown",
            Metric::IdemInDoubt => "rollsafe_idempotency_in_doubt",
            Metric::RoutingMissingKey => "rollsafe_routing_missing_key",
            Metric::RoutingFailover => "rollsafe_routing_failover",
            Metric::RoutingGroupDown => "rollsafe_routing_group_down",
        }
    }
}

pub use crate::plan::HostKind;

/// A header's value by case-insensitive name.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| headers::name_is(k, name))
        .map(|(_, v)| v.as_str())
}

/// The answer to a `dispatch` as the host delivered it.
#[derive(Debug, Clone, Default)]
pub struct CallResponse {
    /// As the host serialised them: an answer's headers are looked up and the kept ones
    /// copied, not each one made a `String` first.
    pub headers: headers::HeaderBlock,
    pub body: Vec<u8>,
}

/// What the flow needs from the host. Every call is infallible from the flow's point of view:
/// host errors are absorbed (and logged) by the implementation, never turned into a trap.
pub trait Host {
    /// Wall-clock time, milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
    /// A random number (backoff jitter).
    fn random(&self) -> u64;
    /// One request header (`:method`, `:path` and the other pseudo headers included).
    fn request_header(&self, name: &str) -> Option<String>;
    /// All request headers, pseudo headers included, as one block (lookups allocate nothing).
    fn request_header_block(&self) -> headers::HeaderBlock;
    fn set_request_header(&self, name: &str, value: &str);
    fn remove_request_header(&self, name: &str);
    /// Sets a host property (Kong: `kong.service.target`).
    fn set_property(&self, path: PropertyPath, value: &[u8]);
    /// `size` bytes of the request body as the host holds it now.
    fn request_body(&self, size: usize) -> Option<Vec<u8>>;
    fn response_header(&self, name: &str) -> Option<String>;
    /// The whole response header map in one hostcall (cheaper than two single reads).
    fn response_header_block(&self) -> headers::HeaderBlock;
    /// `size` bytes of the response body as the host holds it now.
    fn response_body(&self, size: usize) -> Option<Vec<u8>>;
    fn set_response_header(&self, name: &str, value: &str);
    /// A host property (`response.code_details`).
    fn property(&self, path: PropertyPath) -> Option<Vec<u8>>;
    /// Sends a request of rollsafe's own; the answer arrives as a call response with the token.
    /// (The headers by value: the SDK's call takes them so.)
    fn dispatch(
        &self,
        target: &str,
        headers: Vec<(&str, &str)>,
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, String>;
    /// A call nobody waits for (a lease extended, a key released after the client left): the
    /// root context sends it on its next tick, so it outlives the request and goes out from
    /// phases where a request may not dispatch (Kong's response and log phases).
    fn dispatch_later(
        &self,
        target: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
        timeout_ms: u64,
    );
    /// Lets a request held at its headers go on (Envoy: its body then reaches the filter).
    fn resume_request(&self);
    /// Lets a held response go on.
    fn resume_response(&self);
    /// Headers and body of the call response being delivered.
    fn call_response(&self, body_size: usize) -> CallResponse;
    /// Answers the request locally; the upstream is not contacted.
    fn send_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8]);
    /// Makes the HTTP context `id` the one later calls act on (root-driven retries, Envoy).
    fn set_effective_context(&self, id: u32) -> bool;
    fn log(&self, level: Level, message: &str);
    /// Whether a line of this kind is written now ([`crate::warnings::Repeats`], kept per filter
    /// instance on each worker): `Some(n)` with `n` held back since the last.
    fn admit_warning(&self, warning: Warning) -> Option<u64>;
    fn count(&self, metric: Metric);
    /// Shared data (all workers of the node): value and CAS token.
    fn shared_get(&self, key: &[u8]) -> Option<(Vec<u8>, u32)>;
    fn shared_set(&self, key: &[u8], value: &[u8], cas: u32) -> Result<(), SetError>;
}

/// Writes a line that every request may raise while something is degraded, as
/// [`crate::warnings`] admits it; the message is built only when it is written.
pub fn log_limited(
    host: &impl Host,
    level: Level,
    warning: Warning,
    // (Not generic: one copy in the .wasm for all its callers.)
    message: &dyn Fn() -> String,
) {
    if let Some(held_back) = host.admit_warning(warning) {
        let mut message = message();
        if held_back > 0 {
            message.push_str(&format!(
                " ({held_back} more like it not logged since the last)"
            ));
        }
        host.log(level, &message);
    }
}

/// Points the host's own proxying of this request at a group: the group header (seen by the
/// upstream; an Envoy route matches it) and, on Kong, `kong.service.target`.
pub fn name_group(host: &impl Host, kind: HostKind, header: &str, name: &str, target: &str) {
    host.set_request_header(header, name);
    if kind == HostKind::Kong {
        host.set_property(KONG_SERVICE_TARGET, target.as_bytes());
    }
}

pub use crate::idempotency::SetError;

/// A host property's path as the ABI takes it, its parts joined by NUL where it is written
/// ([`property_path!`]): a keyed request reads one or two, and joining the parts on each read
/// was an allocation and a copy per part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PropertyPath(&'static str);

impl PropertyPath {
    /// (`property_path!` joins the parts; this takes them joined.)
    pub const fn joined(path: &'static str) -> PropertyPath {
        PropertyPath(path)
    }

    /// The path as the ABI takes it.
    pub fn bytes(self) -> &'static [u8] {
        self.0.as_bytes()
    }

    /// The path with dots, as logs (and the fake host) name it.
    pub fn dotted(self) -> String {
        self.0.replace('\0', ".")
    }
}

/// A [`PropertyPath`] from its parts: `property_path!("response", "code_details")`.
macro_rules! property_path {
    ($first:literal $(, $rest:literal)*) => {
        $crate::host::PropertyPath::joined(concat!($first $(, "\0", $rest)*))
    };
}

/// The properties rollsafe reads or sets.
pub const ROUTE_NAME: PropertyPath = property_path!("xds", "route_name");
pub const KONG_ROUTE_ID: PropertyPath = property_path!("kong", "route_id");
pub const KONG_ROUTER_SERVICE: PropertyPath = property_path!("kong", "router", "service");
pub const KONG_SERVICE_TARGET: PropertyPath = property_path!("kong", "service", "target");
pub const RESPONSE_CODE_DETAILS: PropertyPath = property_path!("response", "code_details");
pub const CLUSTER_NAME: PropertyPath = property_path!("xds", "cluster_name");
pub const CLUSTER_NAME_OLD: PropertyPath = property_path!("cluster_name");
pub const PLUGIN_ROOT_ID: PropertyPath = property_path!("plugin_root_id");
pub const NGX_CONNECTION_REQUESTS: PropertyPath = property_path!("ngx", "connection_requests");
pub const NGX_UPSTREAM_CONNECT_TIME: PropertyPath = property_path!("ngx", "upstream_connect_time");
pub const NGX_UPSTREAM_HEADER_TIME: PropertyPath = property_path!("ngx", "upstream_header_time");

#[cfg(test)]
mod property_path_tests {
    #[test]
    fn paths_are_nul_separated_like_the_sdks() {
        assert_eq!(
            property_path!("kong", "service", "target").bytes(),
            b"kong\0service\0target"
        );
        assert_eq!(super::PLUGIN_ROOT_ID.bytes(), b"plugin_root_id");
        assert_eq!(super::KONG_SERVICE_TARGET.dotted(), "kong.service.target");
    }
}
pub use crate::warnings::Warning;

/// The host's shared data as the idempotency store sees it, with the host's write rules.
pub struct HostShared<'a, H: Host>(pub &'a H, pub HostKind);

impl<H: Host> crate::idempotency::Shared for HostShared<'_, H> {
    fn get(&self, key: &[u8]) -> Option<(Vec<u8>, u32)> {
        self.0.shared_get(key)
    }
    fn set(&self, key: &[u8], value: &[u8], cas: u32) -> Result<(), SetError> {
        self.0.shared_set(key, value, cas)
    }
    fn cas_after_write(&self, cas: u32) -> Option<u32> {
        match self.1 {
            // ngx_wasm_module counts each key's writes: one more per write.
            HostKind::Kong => Some(cas.wrapping_add(1)),
            // Envoy numbers writes across every key (and worker).
            HostKind::Envoy => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Metric;

    #[test]
    fn metrics_are_listed_in_their_declared_order() {
        for (i, m) in Metric::ALL.iter().enumerate() {
            assert_eq!(m.index(), i, "{m:?}");
        }
    }
}
