//! A scriptable in-memory host for native flow tests.

use super::headers::HeaderBlock;
use super::{header, CallResponse, Host, Level, Metric, PropertyPath, SetError, Warning};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// A local reply the flow sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Sent {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[derive(Default)]
pub struct FakeHost {
    pub now: Cell<u64>,
    request: RefCell<Vec<(String, String)>>,
    sent: RefCell<Vec<Sent>>,
    logs: RefCell<Vec<(Level, String)>>,
    metrics: RefCell<Vec<Metric>>,
    header_reads: Cell<usize>,
    /// Request headers the flow set.
    pub set_request_headers: RefCell<Vec<(String, String)>>,
    pub response_headers: RefCell<Vec<(String, String)>>,
    pub request_body: RefCell<Vec<u8>>,
    pub response_body: RefCell<Vec<u8>>,
    pub properties: RefCell<Vec<(String, Vec<u8>)>>,
    /// Every dispatch: (token, target, headers, body, timeout).
    pub dispatched: RefCell<Vec<Dispatched>>,
    /// The call response the next `call_response` returns.
    pub call: RefCell<CallResponse>,
    pub dispatch_fails: Cell<bool>,
    pub effective: Cell<Option<u32>>,
    pub rng: Cell<u64>,
    /// Shared data with Envoy's CAS rules (cas 0 = no check; absent keys inserted).
    pub shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    /// Calls handed to the root for its next tick.
    pub later: RefCell<Vec<Dispatched>>,
    pub resumed_requests: Cell<usize>,
    pub resumed_responses: Cell<usize>,
    /// Every hostcall the flow made, by kind (the bench's profile of each path).
    pub calls: RefCell<std::collections::BTreeMap<&'static str, usize>>,
    repeats: RefCell<crate::warnings::Repeats>,
}

#[derive(Debug, Clone)]
pub struct Dispatched {
    pub token: u32,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
}

impl Dispatched {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

impl FakeHost {
    pub fn at(now_ms: u64) -> Self {
        let h = FakeHost::default();
        h.now.set(now_ms);
        h
    }

    pub fn set_request(&self, headers: &[(&str, &str)]) {
        *self.request.borrow_mut() = owned(headers);
    }

    pub fn responses(&self) -> Vec<Sent> {
        self.sent.borrow().clone()
    }

    pub fn set_body(&self, body: &[u8]) {
        *self.request_body.borrow_mut() = body.to_vec();
    }

    pub fn set_response(&self, headers: &[(&str, &str)]) {
        *self.response_headers.borrow_mut() = owned(headers);
    }

    pub fn set_property(&self, path: &str, value: &str) {
        self.properties
            .borrow_mut()
            .push((path.to_string(), value.as_bytes().to_vec()));
    }

    /// The answer the next delivered call response carries.
    pub fn answer_call(&self, headers: &[(&str, &str)], body: &str) {
        *self.call.borrow_mut() = CallResponse {
            headers: HeaderBlock::from_raw(super::headers::serialize(headers)),
            body: body.as_bytes().to_vec(),
        };
    }

    pub fn dispatches(&self) -> Vec<Dispatched> {
        self.dispatched.borrow().clone()
    }

    pub fn last_token(&self) -> u32 {
        self.dispatched
            .borrow()
            .last()
            .map(|d| d.token)
            .unwrap_or(0)
    }

    pub fn counted(&self, metric: Metric) -> usize {
        self.metrics
            .borrow()
            .iter()
            .filter(|m| **m == metric)
            .count()
    }

    /// How many request headers the flow has read: the cost of a request that triggers nothing.
    /// The request's headers as they stand now (what the flow set included); not a read.
    pub fn request_headers(&self) -> Vec<(String, String)> {
        self.request.borrow().clone()
    }

    pub fn header_reads(&self) -> usize {
        self.header_reads.get()
    }

    pub fn logs_at(&self, level: Level) -> Vec<String> {
        self.logs
            .borrow()
            .iter()
            .filter(|(l, _)| *l == level)
            .map(|(_, m)| m.clone())
            .collect()
    }
}

impl FakeHost {
    fn hit(&self, kind: &'static str) {
        *self.calls.borrow_mut().entry(kind).or_default() += 1;
    }
}

impl Host for FakeHost {
    fn now_ms(&self) -> u64 {
        self.hit("clock");
        self.now.get()
    }

    fn random(&self) -> u64 {
        self.hit("random");
        self.rng.get()
    }

    fn request_header_block(&self) -> HeaderBlock {
        self.hit("request header map");
        self.header_reads.set(self.header_reads.get() + 1);
        HeaderBlock::from_pairs(&self.request.borrow())
    }

    fn set_request_header(&self, name: &str, value: &str) {
        self.hit("set request header");
        self.set_request_headers
            .borrow_mut()
            .push((name.to_string(), value.to_string()));
        // As on a real host, the request's header map now carries it.
        let mut request = self.request.borrow_mut();
        request.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        request.push((name.to_string(), value.to_string()));
    }

    fn remove_request_header(&self, name: &str) {
        self.hit("remove request header");
        self.request
            .borrow_mut()
            .retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }

    fn set_property(&self, path: PropertyPath, value: &[u8]) {
        self.hit("set property");
        self.properties
            .borrow_mut()
            .push((path.dotted(), value.to_vec()));
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        self.hit("request body");
        let body = self.request_body.borrow();
        Some(
            body.get(..size.min(body.len()))
                .unwrap_or_default()
                .to_vec(),
        )
    }

    fn response_header(&self, name: &str) -> Option<String> {
        self.hit("response header");
        header(&self.response_headers.borrow(), name).map(str::to_string)
    }

    fn response_header_block(&self) -> HeaderBlock {
        self.hit("response header map");
        HeaderBlock::from_pairs(&self.response_headers.borrow())
    }

    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        self.hit("response body");
        let body = self.response_body.borrow();
        Some(body.get(..size.min(body.len()))?.to_vec())
    }

    fn set_response_header(&self, name: &str, value: &str) {
        self.hit("set response header");
        self.response_headers
            .borrow_mut()
            .push((name.to_string(), value.to_string()));
    }

    fn property(&self, path: PropertyPath) -> Option<Vec<u8>> {
        self.hit("property");
        let key = path.dotted();
        self.properties
            .borrow()
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }

    fn dispatch(
        &self,
        target: &str,
        headers: Vec<(&str, &str)>,
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, String> {
        self.hit("dispatch");
        if self.dispatch_fails.get() {
            return Err("BadArgument".into());
        }
        let token = self.dispatched.borrow().len() as u32 + 100;
        self.dispatched.borrow_mut().push(Dispatched {
            token,
            target: target.to_string(),
            headers: owned(&headers),
            body: body.to_vec(),
            timeout_ms,
        });
        Ok(token)
    }

    fn dispatch_later(
        &self,
        target: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
        timeout_ms: u64,
    ) {
        self.hit("dispatch (from the root's tick)");
        self.later.borrow_mut().push(Dispatched {
            token: 0,
            target: target.to_string(),
            headers: owned(headers),
            body,
            timeout_ms,
        });
    }

    fn resume_request(&self) {
        self.hit("resume");
        self.resumed_requests.set(self.resumed_requests.get() + 1);
    }

    fn resume_response(&self) {
        self.hit("resume");
        self.resumed_responses.set(self.resumed_responses.get() + 1);
    }

    fn call_response(&self, body_size: usize) -> CallResponse {
        self.hit("call response");
        let mut c = self.call.borrow().clone();
        c.body.truncate(body_size);
        c
    }

    fn shared_get(&self, key: &[u8]) -> Option<(Vec<u8>, u32)> {
        self.hit("shared data read");
        self.shared
            .borrow()
            .get(&*String::from_utf8_lossy(key))
            .cloned()
    }

    fn shared_set(&self, key: &[u8], value: &[u8], cas: u32) -> Result<(), SetError> {
        self.hit("shared data write");
        let mut m = self.shared.borrow_mut();
        let key = String::from_utf8_lossy(key).into_owned();
        let current = m.get(&key).map(|(_, c)| *c);
        if matches!(current, Some(c) if cas != 0 && cas != c) {
            return Err(SetError::CasMismatch);
        }
        m.insert(key, (value.to_vec(), current.unwrap_or(0) + 1));
        Ok(())
    }

    fn set_effective_context(&self, id: u32) -> bool {
        self.hit("set effective context");
        self.effective.set(Some(id));
        true
    }

    fn request_header(&self, name: &str) -> Option<String> {
        self.header_reads.set(self.header_reads.get() + 1);
        let found = header(&self.request.borrow(), name).map(str::to_string);
        self.hit(if found.is_some() {
            "request header"
        } else {
            "request header (absent)"
        });
        found
    }

    fn send_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        self.hit("local reply");
        self.sent.borrow_mut().push(Sent {
            status,
            headers: owned(headers),
            body: body.to_vec(),
        });
    }

    fn log(&self, level: Level, message: &str) {
        self.hit("log");
        self.logs.borrow_mut().push((level, message.to_string()));
    }

    fn admit_warning(&self, warning: Warning) -> Option<u64> {
        self.repeats.borrow_mut().admit(warning, self.now.get())
    }

    fn count(&self, metric: Metric) {
        self.hit("metric increment");
        self.metrics.borrow_mut().push(metric);
    }
}

/// A configured plan with the idempotency slots created, as the root context does at configure
/// time (flow tests).
pub fn plan(host: &FakeHost, kind: super::HostKind, cfg: &str) -> std::rc::Rc<crate::plan::Plan> {
    let plan = super::flow::configure(host, cfg.as_bytes(), kind).expect("config");
    if let Some(ip) = &plan.idempotency {
        crate::idempotency::create_slots(&super::HostShared(host, kind), ip.slots);
    }
    std::rc::Rc::new(plan)
}
