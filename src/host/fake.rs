//! A scriptable in-memory host for native flow tests.

use super::{Host, Level, Metric};
use std::cell::{Cell, RefCell};

/// A local reply the flow sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Sent {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

#[derive(Default)]
pub struct FakeHost {
    pub now: Cell<u64>,
    request: RefCell<Vec<(String, String)>>,
    sent: RefCell<Vec<Sent>>,
    logs: RefCell<Vec<(Level, String)>>,
    metrics: RefCell<Vec<Metric>>,
    header_reads: Cell<usize>,
}

impl FakeHost {
    pub fn at(now_ms: u64) -> Self {
        let h = FakeHost::default();
        h.now.set(now_ms);
        h
    }

    pub fn set_request(&self, headers: &[(&str, &str)]) {
        *self.request.borrow_mut() = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    pub fn responses(&self) -> Vec<Sent> {
        self.sent.borrow().clone()
    }

    pub fn counted(&self, metric: Metric) -> usize {
        self.metrics
            .borrow()
            .iter()
            .filter(|m| **m == metric)
            .count()
    }

    /// How many request headers the flow has read: the cost of a request that triggers nothing.
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

impl Host for FakeHost {
    fn now_ms(&self) -> u64 {
        self.now.get()
    }

    fn request_header(&self, name: &str) -> Option<String> {
        self.header_reads.set(self.header_reads.get() + 1);
        self.request
            .borrow()
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    fn send_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        self.sent.borrow_mut().push(Sent {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.to_vec(),
        });
    }

    fn log(&self, level: Level, message: &str) {
        self.logs.borrow_mut().push((level, message.to_string()));
    }

    fn count(&self, metric: Metric) {
        self.metrics.borrow_mut().push(metric);
    }
}
