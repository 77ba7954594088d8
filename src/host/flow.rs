//! The request flow, written against the [`Host`] seam. The proxy-wasm contexts in `proxy`
//! forward every callback here; native tests drive the same code with a fake host.

use super::{Host, Level};
use crate::config::{self, Config};
use std::rc::Rc;

/// What the filter does with a callback: let the stream go on, or hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    Pause,
}

/// Everything built once at configure time and shared by the worker's HTTP contexts.
#[derive(Debug, Default)]
pub struct Plan {
    pub config: Config,
}

impl Plan {
    /// True when no capability is configured: requests pass without rollsafe looking at them.
    pub fn is_pass_through(&self) -> bool {
        true
    }
}

/// Parses and compiles the configuration; on error logs `rollsafe: <path>: <reason>` once and
/// returns `None` so the root context can refuse the configuration.
pub fn configure(host: &impl Host, bytes: &[u8]) -> Option<Plan> {
    match config::parse(bytes) {
        Ok(config) => {
            let plan = Plan { config };
            host.log(
                Level::Info,
                if plan.is_pass_through() {
                    "rollsafe: configured; no capability enabled, requests pass through"
                } else {
                    "rollsafe: configured"
                },
            );
            Some(plan)
        }
        Err(e) => {
            host.log(Level::Error, &format!("rollsafe: {e}"));
            None
        }
    }
}

/// Per-request state.
pub struct Request {
    plan: Rc<Plan>,
    /// Set once rollsafe answered locally: that reply passes back through this filter's own
    /// response callbacks on both hosts and must be left alone.
    answered_locally: bool,
}

impl Request {
    pub fn new(plan: Rc<Plan>) -> Self {
        Request {
            plan,
            answered_locally: false,
        }
    }

    pub fn on_request_headers(&mut self, _host: &impl Host, _end_of_stream: bool) -> Verdict {
        if self.plan.is_pass_through() {
            return Verdict::Continue;
        }
        Verdict::Continue
    }

    pub fn on_response_headers(&mut self, _host: &impl Host) -> Verdict {
        if self.answered_locally {
            return Verdict::Continue;
        }
        Verdict::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;

    #[test]
    fn invalid_config_is_refused_with_its_field_path_logged() {
        let host = FakeHost::default();
        assert!(configure(&host, br#"{"bogus": 1}"#).is_none());
        let errors = host.logs_at(Level::Error);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("rollsafe: "), "{errors:?}");
        assert!(errors[0].contains("bogus"), "{errors:?}");
    }

    #[test]
    fn empty_config_passes_requests_through_untouched() {
        let host = FakeHost::default();
        let plan = Rc::new(configure(&host, b"").unwrap());
        let mut req = Request::new(plan);
        host.set_request(&[(":method", "POST"), (":path", "/orders")]);
        assert_eq!(req.on_request_headers(&host, false), Verdict::Continue);
        assert_eq!(req.on_response_headers(&host), Verdict::Continue);
        assert!(host.responses().is_empty());
    }
}
