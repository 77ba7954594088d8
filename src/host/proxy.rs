//! proxy-wasm binding: implements [`Host`] with hostcalls and forwards the SDK's callbacks to
//! `flow`. Only hostcalls that return a `Result` are used (the SDK's `Context` convenience
//! methods unwrap host errors, and a panic traps the whole VM), and only calls both hosts
//! implement (HOSTS.md: Kong traps on `proxy_get_log_level`, `proxy_done`, …).

use super::flow::{self, Request, Verdict};
use super::scheduler::{Later, Scheduler, Shared};
use super::{
    CallResponse, Host, HostKind, HostShared, Level, Metric, PropertyPath, SetError, Warning,
};
use crate::plan::Plan;
use crate::warnings::Repeats;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{
    Action, BufferType, ContextType, LogLevel, MapType, MetricType, StreamType,
};
use std::cell::{Cell, RefCell};
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::time::Duration;

/// Header bytes as text; bytes that are not UTF-8 read as U+FFFD.
fn lossy(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Tick period for root-driven backoffs (native driver, Envoy only).
const TICK: Duration = Duration::from_millis(10);

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
    /// Metrics whose increment the host refused, logged once each (a bit per `Metric::ALL`).
    metric_refused: Rc<Cell<u64>>,
    seed: Rc<Cell<u64>>,
    /// The root's: calls sent on its next tick.
    scheduler: Rc<Scheduler>,
    /// Warnings written and held back on this worker.
    repeats: Rc<RefCell<Repeats>>,
}

impl ProxyHost {
    fn with_metrics(scheduler: Rc<Scheduler>) -> Self {
        let ids = Metric::ALL
            .iter()
            .map(
                |m| match super::abi::define_metric(MetricType::Counter, m.name()) {
                    Ok(id) => Some(id),
                    Err(status) => {
                        // Once per metric and configuration: nothing counts it from here on.
                        let _ = super::abi::log(
                            LogLevel::Error,
                            &format!(
                                "rollsafe: metric {} refused by the host (define: {status:?}); it is not counted",
                                m.name()
                            ),
                        );
                        None
                    }
                },
            )
            .collect();
        ProxyHost {
            metric_ids: Rc::new(ids),
            metric_refused: Rc::new(Cell::new(0)),
            seed: Rc::new(Cell::new(
                std::hash::RandomState::new().build_hasher().finish(),
            )),
            scheduler,
            repeats: Rc::default(),
        }
    }
}

impl Host for ProxyHost {
    // (Small enough now to be inlined at its 30 callers, at 600 bytes of the .wasm.)
    #[inline(never)]
    fn now_ms(&self) -> u64 {
        super::abi::current_time_ns().map_or(0, |ns| ns / 1_000_000)
    }

    fn random(&self) -> u64 {
        // splitmix64 over a per-VM seed from the host's entropy: jitter needs spread, not secrecy.
        let s = self.seed.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        self.seed.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn request_header(&self, name: &str) -> Option<String> {
        super::abi::header_map_value(MapType::HttpRequestHeaders, name).map(lossy)
    }

    fn request_header_block(&self) -> super::headers::HeaderBlock {
        super::headers::HeaderBlock::from_raw(
            super::abi::header_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default(),
        )
    }

    fn response_header_block(&self) -> super::headers::HeaderBlock {
        super::headers::HeaderBlock::from_raw(
            super::abi::header_map_bytes(MapType::HttpResponseHeaders).unwrap_or_default(),
        )
    }

    fn set_request_header(&self, name: &str, value: &str) {
        let _ = super::abi::replace_header(MapType::HttpRequestHeaders, name, value);
    }

    fn remove_request_header(&self, name: &str) {
        let _ = super::abi::remove_header(MapType::HttpRequestHeaders, name);
    }

    fn set_property(&self, path: PropertyPath, value: &[u8]) {
        // Not the SDK's wrapper: it panics when the host refuses (see `abi`).
        if let Err(status) = super::abi::set_property(path.bytes(), value) {
            self.log(
                Level::Debug,
                &format!(
                    "rollsafe: set_property {} refused: {status:?}",
                    path.dotted()
                ),
            );
        }
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        super::abi::buffer(BufferType::HttpRequestBody, 0, size)
    }

    fn response_header(&self, name: &str) -> Option<String> {
        super::abi::header_map_value(MapType::HttpResponseHeaders, name).map(lossy)
    }

    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        super::abi::buffer(BufferType::HttpResponseBody, 0, size)
    }

    fn set_response_header(&self, name: &str, value: &str) {
        let _ = super::abi::replace_header(MapType::HttpResponseHeaders, name, value);
    }

    fn property(&self, path: PropertyPath) -> Option<Vec<u8>> {
        super::abi::property(path.bytes())
    }

    fn dispatch(
        &self,
        target: &str,
        headers: Vec<(&str, &str)>,
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, String> {
        let body = (!body.is_empty()).then_some(body);
        hostcalls::dispatch_http_call(
            target,
            headers,
            body,
            vec![],
            Duration::from_millis(timeout_ms),
        )
        .map_err(|e| format!("{e:?}"))
    }

    fn dispatch_later(
        &self,
        target: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
        timeout_ms: u64,
    ) {
        let call = Later {
            target: target.to_string(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body,
            timeout_ms,
        };
        if !self.scheduler.send_later(call) {
            super::log_limited(self, Level::Warn, Warning::CallDropped, &|| {
                format!("rollsafe: too many calls waiting for {target:?}; one dropped")
            });
        }
    }

    fn resume_request(&self) {
        let _ = super::abi::continue_stream(StreamType::HttpRequest);
    }

    fn resume_response(&self) {
        let _ = super::abi::continue_stream(StreamType::HttpResponse);
    }

    fn call_response(&self, body_size: usize) -> CallResponse {
        CallResponse {
            headers: super::headers::HeaderBlock::from_raw(
                super::abi::header_map_bytes(MapType::HttpCallResponseHeaders).unwrap_or_default(),
            ),
            body: super::abi::buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .unwrap_or_default(),
        }
    }

    fn send_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        let headers = super::headers::serialize(headers);
        if let Err(e) = super::abi::send_local_response(status, &headers, body) {
            self.log(
                Level::Error,
                &format!("rollsafe: local reply {status} failed: {e:?}"),
            );
        }
    }

    fn set_effective_context(&self, id: u32) -> bool {
        super::abi::set_effective_context(id).is_ok()
    }

    fn log(&self, level: Level, message: &str) {
        let level = match level {
            Level::Error => LogLevel::Error,
            Level::Warn => LogLevel::Warn,
            Level::Info => LogLevel::Info,
            Level::Debug => LogLevel::Debug,
        };
        let _ = super::abi::log(level, message);
    }

    fn shared_get(&self, key: &[u8]) -> Option<(Vec<u8>, u32)> {
        // An empty value may come back as no data: the key still exists while it has a cas.
        super::abi::shared_data(key).filter(|(data, cas)| !data.is_empty() || *cas != 0)
    }

    fn shared_set(&self, key: &[u8], value: &[u8], cas: u32) -> Result<(), SetError> {
        match super::abi::set_shared_data(key, value, cas) {
            Ok(()) => Ok(()),
            Err(proxy_wasm::types::Status::CasMismatch) => Err(SetError::CasMismatch),
            Err(_) => Err(SetError::Refused),
        }
    }

    fn admit_warning(&self, warning: Warning) -> Option<u64> {
        let now = self.now_ms();
        self.repeats.try_borrow_mut().ok()?.admit(warning, now)
    }

    fn count(&self, metric: Metric) {
        let index = metric.index();
        if let Some(Some(id)) = self.metric_ids.get(index) {
            if let Err(status) = super::abi::increment_metric(*id, 1) {
                // Logged once per metric (per worker): a refused counter must not go unnoticed,
                // nor flood the log.
                let bit = 1u64 << (index % 64);
                if self.metric_refused.get() & bit == 0 {
                    self.metric_refused.set(self.metric_refused.get() | bit);
                    self.log(
                        Level::Error,
                        &format!(
                            "rollsafe: metric {} refused by the host (increment: {status:?})",
                            metric.name()
                        ),
                    );
                }
            }
        }
    }
}

#[derive(Default)]
struct Root {
    plan: Option<Rc<Plan>>,
    host: Rc<ProxyHost>,
    scheduler: Rc<Scheduler>,
}

/// Starts the root's tick when a wake-up was filed, stops it when none is left (only where the
/// plan waits on it: Kong's host traps on a second non-zero period). Envoy applies a period set
/// from an HTTP context to that context's root.
fn switch_tick(scheduler: &Scheduler) {
    if let Some(on) = scheduler.tick_change() {
        let period = if on { TICK } else { Duration::ZERO };
        if hostcalls::set_tick_period(period).is_err() {
            scheduler.tick_refused(on);
        }
    }
}

/// Kong's host answers `plugin_vm_id` as not implemented; Envoy always has one.
fn detect_host() -> HostKind {
    match hostcalls::get_property(vec!["plugin_vm_id"]) {
        Ok(Some(_)) => HostKind::Envoy,
        _ => HostKind::Kong,
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let Some((context_id, request)) = self.scheduler.take_call(token) else {
            return;
        };
        if !self.host.set_effective_context(context_id) {
            return;
        }
        if let Ok(mut req) = request.try_borrow_mut() {
            req.on_call_response(&*self.host, token, body_size);
        }
        self.scheduler.track(context_id, &request, true);
        switch_tick(&self.scheduler);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let kind = detect_host();
        match flow::configure(&*self.host, &bytes, kind) {
            Some(mut plan) => {
                if let Some(ip) = plan
                    .idempotency
                    .as_mut()
                    .filter(|_| kind == HostKind::Envoy)
                {
                    ip.route_fallback = super::abi::property(super::PLUGIN_ROOT_ID.bytes())
                        .and_then(|v| String::from_utf8(v).ok())
                        .filter(|v| !v.is_empty());
                }
                self.scheduler.allow_tick(plan.needs_tick());
                if kind == HostKind::Kong && plan.sends_later() {
                    // Kong's host takes one tick period per root for good (a second one
                    // traps): set once, it sends the calls nobody waits for.
                    let _ = hostcalls::set_tick_period(TICK);
                }
                self.host = Rc::new(ProxyHost::with_metrics(Rc::clone(&self.scheduler)));
                if let Some(idem) = &plan.idempotency {
                    crate::idempotency::create_slots(&HostShared(&*self.host, kind), idem.slots);
                }
                self.plan = Some(Rc::new(plan));
                true
            }
            None => false,
        }
    }

    fn on_tick(&mut self) {
        for call in self.scheduler.take_later() {
            let headers: Vec<(&str, &str)> = call
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            if let Err(e) = self
                .host
                .dispatch(&call.target, headers, &call.body, call.timeout_ms)
            {
                self.host.log(
                    Level::Warn,
                    &format!("rollsafe: cannot call {:?}: {e}", call.target),
                );
            }
        }
        for (context_id, request) in self.scheduler.due(self.host.now_ms()) {
            if !self.host.set_effective_context(context_id) {
                continue;
            }
            if let Ok(mut req) = request.try_borrow_mut() {
                req.on_wake(&*self.host);
            }
            self.scheduler.track(context_id, &request, true);
        }
        switch_tick(&self.scheduler);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // The SDK panics on `None`; a host that keeps a refused filter running gets a
        // pass-through context rather than a trap.
        let plan = self.plan.clone().unwrap_or_default();
        Some(Box::new(Http {
            id: context_id,
            request: Rc::new(RefCell::new(Request::new(plan))),
            host: Rc::clone(&self.host),
            scheduler: Rc::clone(&self.scheduler),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    id: u32,
    request: Shared,
    /// The root's, shared: one count to take rather than one per field.
    host: Rc<ProxyHost>,
    scheduler: Rc<Scheduler>,
}

fn action(v: Verdict) -> Action {
    match v {
        Verdict::Continue => Action::Continue,
        Verdict::Pause => Action::Pause,
    }
}

impl Http {
    fn run(&self, f: impl FnOnce(&mut Request, &ProxyHost) -> Verdict) -> Action {
        let (verdict, schedules) = match self.request.try_borrow_mut() {
            Ok(mut req) => (f(&mut req, &self.host), req.may_schedule()),
            Err(_) => (Verdict::Continue, true),
        };
        // Calls dispatched from this context come back to it; only backoffs need the root.
        // (A request rollsafe does not own files nothing: most requests skip both.)
        if schedules {
            self.scheduler.track(self.id, &self.request, false);
            switch_tick(&self.scheduler);
        }
        action(verdict)
    }
}

impl Context for Http {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        self.run(|req, host| {
            req.on_call_response(host, token, body_size);
            Verdict::Continue
        });
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.run(|req, host| req.on_request_headers(host, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.run(|req, host| req.on_request_body(host, body_size, end_of_stream))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.run(|req, host| req.on_response_headers(host, end_of_stream))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.run(|req, host| req.on_response_body(host, body_size, end_of_stream))
    }

    fn on_log(&mut self) {
        let schedules = match self.request.try_borrow_mut() {
            Ok(mut req) => {
                req.on_done(&*self.host);
                req.may_schedule()
            }
            Err(_) => true,
        };
        if schedules {
            switch_tick(&self.scheduler);
        }
    }
}
