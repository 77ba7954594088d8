//! proxy-wasm binding: implements [`Host`] with hostcalls and forwards the SDK's callbacks to
//! `flow`. Only hostcalls that return a `Result` are used (the SDK's `Context` convenience
//! methods unwrap host errors, and a panic traps the whole VM), and only calls both hosts
//! implement (HOSTS.md: Kong traps on `proxy_get_log_level`, `proxy_done`, …).

use super::flow::{self, Request, Verdict};
use super::{Host, Level, Metric};
use crate::plan::Plan;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use std::rc::Rc;
use std::time::UNIX_EPOCH;

/// Registers the root context factory; called once from `_initialize`.
pub fn install() {
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(Root::default()));
}

/// The hostcall-backed [`Host`]. Holds the metric ids defined at configure time (a metric the
/// host refused to define is skipped, never fatal).
#[derive(Default, Clone)]
pub struct ProxyHost {
    metric_ids: Rc<Vec<Option<u32>>>,
}

impl ProxyHost {
    fn with_metrics() -> Self {
        let ids = Metric::ALL
            .iter()
            .map(|m| hostcalls::define_metric(MetricType::Counter, m.name()).ok())
            .collect();
        ProxyHost {
            metric_ids: Rc::new(ids),
        }
    }
}

impl Host for ProxyHost {
    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    fn request_header(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
    }

    fn send_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        if let Err(e) = hostcalls::send_http_response(status, headers.to_vec(), Some(body)) {
            self.log(
                Level::Error,
                &format!("rollsafe: local reply {status} failed: {e:?}"),
            );
        }
    }

    fn log(&self, level: Level, message: &str) {
        let level = match level {
            Level::Error => LogLevel::Error,
            Level::Warn => LogLevel::Warn,
            Level::Info => LogLevel::Info,
            Level::Debug => LogLevel::Debug,
        };
        let _ = hostcalls::log(level, message);
    }

    fn count(&self, metric: Metric) {
        let index = Metric::ALL.iter().position(|m| *m == metric);
        if let Some(Some(id)) = index.and_then(|i| self.metric_ids.get(i)) {
            let _ = hostcalls::increment_metric(*id, 1);
        }
    }
}

#[derive(Default)]
struct Root {
    plan: Option<Rc<Plan>>,
    host: ProxyHost,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default();
        match flow::configure(&self.host, &bytes) {
            Some(plan) => {
                self.plan = Some(Rc::new(plan));
                self.host = ProxyHost::with_metrics();
                true
            }
            None => false,
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // The SDK panics on `None`; a host that keeps a refused filter running gets a
        // pass-through context rather than a trap.
        let plan = self.plan.clone().unwrap_or_default();
        Some(Box::new(Http {
            request: Request::new(plan),
            host: self.host.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    request: Request,
    host: ProxyHost,
}

impl Context for Http {}

fn action(v: Verdict) -> Action {
    match v {
        Verdict::Continue => Action::Continue,
        Verdict::Pause => Action::Pause,
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(self.request.on_request_headers(&self.host, end_of_stream))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        action(self.request.on_response_headers(&self.host))
    }
}
