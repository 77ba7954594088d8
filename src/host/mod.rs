//! The host layer: everything that talks to a proxy-wasm host lives here and only translates.
//!
//! `flow` holds the per-request logic written against the [`Host`] trait, so native tests can
//! drive it with a fake host; `proxy` implements [`Host`] with proxy-wasm hostcalls and wires the
//! SDK's root and HTTP contexts to `flow`.

pub mod flow;
pub mod proxy;

#[cfg(test)]
pub mod fake;

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
}

impl Metric {
    pub const ALL: [Metric; 2] = [Metric::MaintenanceRejected, Metric::MaintenanceBypassed];

    pub fn name(self) -> &'static str {
        match self {
            Metric::MaintenanceRejected => "rollsafe_maintenance_rejected",
            Metric::MaintenanceBypassed => "rollsafe_maintenance_bypassed",
        }
    }
}

/// What the flow needs from the host. Every call is infallible from the flow's point of view:
/// host errors are absorbed (and logged) by the implementation, never turned into a trap.
pub trait Host {
    /// Wall-clock time, milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
    /// One request header (`:method`, `:path` and the other pseudo headers included).
    fn request_header(&self, name: &str) -> Option<String>;
    /// Answers the request locally; the upstream is not contacted.
    fn send_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8]);
    fn log(&self, level: Level, message: &str);
    fn count(&self, metric: Metric);
}
