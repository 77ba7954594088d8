//! Bench fixture (not shipped; its shared-data keys are under `rollsafe/`, the namespace of
//! the zone Kong's host gives rollsafe): a filter whose every callback returns `Continue` after the
//! hostcalls its configuration lists, comma-separated, on request headers:
//!   `clock`    get the current time
//!   `method`   read `:method`
//!   `headers`  read the whole request header map (the SDK's `get_map`)
//!   `property` read the `xds.route_name` property
//!   `shared`   read a 1 KiB shared-data value
//!   `full`     (with `shared`) fill [`ENTRIES`] entries of 1 KiB at configure time and read a
//!              new one each request: the same read in a zone that holds a full store
//!   `index`    read a 160-byte shared-data value (a store's index: which entry holds a key)
//!   `metric`   increment a counter (once for each time the word is listed)
//!   `timeout`  set a request header (Envoy's `x-envoy-upstream-rq-timeout-ms`)
//!   `reply`    answer with a local 200 and a 1 KiB body (`send_http_response`)
//!   `hashes`   compute the hashes rollsafe's persisted formats pin for a keyed request of
//!              1 KiB (src/idempotency/key.rs): SipHash-1-3 (128 bits) over method, path,
//!              digest, length and body (the fingerprint), and over the scope's parts (the
//!              tag of the caller's scope digest, whose SHA-256 is computed once per
//!              caller); pure computation, no hostcall
//! and on the way, what a keyed write or a replay cannot do without (the floors `make bench`
//! compares rollsafe's paths with):
//!   `body`     hold the request body until it is whole and read it once (`reply` then
//!              answers from the body callback)
//!   `store`    keep the answer: read the response's header map, hold its body until it is
//!              whole, read it, and write both (1 KiB and more) to the request's entry of
//!              shared data
//!   `claim`    (with `body`) once the body is whole, read the request's entry of shared data
//!              and write a small record to it under its cas: the claim a keyed write records
//!              before it goes on
//!   `cas`      (Kong's host, with `claim` and `store`) write the answer under the cas the
//!              claim's write left (Kong's host adds one per write), as a store that keeps
//!              track of it can, instead of reading the entry again
//!   `complete` (with `claim` and `store`) keep the answer as a store that indexes its keys
//!              does: in an entry of its own (one of [`ENTRIES`] more), then a 96-byte record
//!              written to the claim's entry, under the cas the claim's write left with `cas`,
//!              else after reading the entry again for it
//!   `dispatch=<target>`  send the whole request body to `<target>` (`dispatch_http_call`)
//!              and answer with the reply's status and body
//!   `close`    (Kong's host, with `dispatch`) close the client's connection from its 32nd
//!              request on, as rollsafe does after a call (src/reconnect.rs)
//!   `forward`  (with `dispatch`) send the request's own headers along (the map read once,
//!              hop-by-hop ones dropped) and answer with the reply's headers, as a filter
//!              carrying the attempt itself must; with `store`, the reply's body is also
//!              written to shared data
//!   `webdis=<target>`  (with `store`, and `body` or `dispatch`) what a keyed write on the
//!              shared store cannot do without: one Webdis call (a `SET` of 100 bytes) before
//!              the request goes on (or is dispatched), and another (a `SET` of the 1 KiB
//!              answer) before the answer does
//! The empty configuration is the no-op filter: the cost of a wasm filter that does nothing.
//!
//! A request's entry (`claim`, `store`) is one of [`ENTRIES`] shared-data keys, a new one for
//! each request in turn: a store of keyed answers keeps one per key, and on Kong's host every
//! shared-data call walks a tree of all the zone's entries (ngx_wasm_module's key-value store
//! is a red-black tree), so a floor that kept every answer under one key would not pay what
//! keeping `max_entries` answers costs there.

use proxy_wasm::hostcalls;
// `hashes`: rollsafe's own SipHash-1-3, the same source.
#[path = "../../../src/idempotency/sip.rs"]
mod sip;
// rollsafe's allocator, the same source: a floor allocates as rollsafe does.
#[path = "../../../src/pool.rs"]
mod pool;
#[cfg(target_arch = "wasm32")]
#[global_allocator]
static POOL: pool::Pool = pool::Pool::new();
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType, MetricType};
use sip::Sip13;
use std::cell::Cell;
use std::rc::Rc;

/// Entries the floor's store cycles through: rollsafe's default `idempotency.max_entries`.
const ENTRIES: u32 = 16_384;

thread_local! {
    /// The next request's entry.
    static NEXT: Cell<u32> = const { Cell::new(0) };
}

/// The shared-data key of a new request's entry.
fn next_entry() -> String {
    let i = NEXT.with(|n| {
        let i = n.get();
        n.set((i + 1) % ENTRIES);
        i
    });
    format!("rollsafe/probe/e/{i}")
}

#[derive(Default, Clone)]
struct Calls {
    clock: bool,
    method: bool,
    headers: bool,
    property: bool,
    shared: bool,
    full: bool,
    index: bool,
    metric: Option<u32>,
    metrics: u32,
    timeout: bool,
    reply: bool,
    hashes: bool,
    body: bool,
    store: bool,
    claim: bool,
    cas: bool,
    complete: bool,
    dispatch: Option<String>,
    close: bool,
    forward: bool,
    webdis: Option<String>,
}

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| Box::new(Root::default()));
}}

#[derive(Default)]
struct Root {
    calls: Rc<Calls>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let cfg = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let cfg = String::from_utf8_lossy(&cfg);
        let mut calls = Calls::default();
        for word in cfg.split(',').map(str::trim) {
            match word {
                "clock" => calls.clock = true,
                "method" => calls.method = true,
                "headers" => calls.headers = true,
                "property" => calls.property = true,
                "shared" => calls.shared = true,
                "full" => calls.full = true,
                "index" => calls.index = true,
                "metric" => {
                    if calls.metric.is_none() {
                        calls.metric =
                            hostcalls::define_metric(MetricType::Counter, "probe_requests").ok();
                    }
                    calls.metrics += 1;
                }
                "timeout" => calls.timeout = true,
                "reply" => calls.reply = true,
                "hashes" => calls.hashes = true,
                "body" => calls.body = true,
                "store" => calls.store = true,
                "claim" => calls.claim = true,
                "cas" => calls.cas = true,
                "complete" => calls.complete = true,
                "close" => calls.close = true,
                "forward" => calls.forward = true,
                w if w.starts_with("dispatch=") => {
                    calls.dispatch = Some(w.trim_start_matches("dispatch=").to_string())
                }
                w if w.starts_with("webdis=") => {
                    calls.webdis = Some(w.trim_start_matches("webdis=").to_string())
                }
                _ => {}
            }
        }
        if calls.shared {
            let _ = hostcalls::set_shared_data("rollsafe/probe/1k", Some(&[b'x'; 1024]), None);
        }
        if calls.index {
            let _ = hostcalls::set_shared_data("rollsafe/probe/index", Some(&[b'i'; 160]), None);
        }
        if calls.full {
            for _ in 0..ENTRIES {
                let _ = hostcalls::set_shared_data(&next_entry(), Some(&[b'x'; 1024]), None);
            }
        }
        self.calls = Rc::new(calls);
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            calls: Rc::clone(&self.calls),
            webdis: Webdis::None,
            entry: None,
            answer_headers: Vec::new(),
            body: Vec::new(),
            reply: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    /// The calls to make.
    calls: Rc<Calls>,
    /// Which Webdis call is awaited (`webdis`).
    webdis: Webdis,
    /// The request's entry of shared data and the cas to write the answer under (`None`:
    /// whatever is there, where the host allows it).
    entry: Option<(String, Option<u32>)>,
    /// The answer's headers, serialized (`store`).
    answer_headers: Vec<u8>,
    /// The request body, held while the Webdis claim is awaited (`dispatch` with `webdis`).
    body: Vec<u8>,
    /// The reply to a dispatched attempt, held while the Webdis settle is awaited.
    reply: Option<Reply>,
}

/// A dispatched attempt's reply: its status, headers and body.
type Reply = (u32, Vec<(String, String)>, Vec<u8>);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Webdis {
    None,
    /// Before the request goes on.
    Claim,
    /// Before the answer goes on.
    Settle,
}

impl Http {
    /// One Webdis command (`POST /`, the command as the body), the stream held until it answers.
    fn webdis(&mut self, target: &str, command: &[u8], awaited: Webdis) -> Action {
        let headers = vec![
            (":method", "POST"),
            (":path", "/"),
            (":authority", target),
            ("content-type", "text/plain"),
        ];
        self.call(target, headers, command);
        self.webdis = awaited;
        Action::Pause
    }

    /// Sends a call (through the Context trait, which files the token so the answer comes back
    /// here); one the host refuses is answered 502.
    fn call(&mut self, target: &str, headers: Vec<(&str, &str)>, body: &[u8]) {
        let sent = self.dispatch_http_call(
            target,
            headers,
            Some(body),
            vec![],
            std::time::Duration::from_secs(30),
        );
        if sent.is_err() {
            let _ = hostcalls::send_http_response(502, vec![], None);
        }
    }

    /// Records the claim in a new entry: reads it, and writes a small record under its cas.
    fn claim(&mut self) {
        let key = next_entry();
        let (_, cas) = hostcalls::get_shared_data(&key).unwrap_or_default();
        let written = hostcalls::set_shared_data(&key, Some(&[b'c'; 96]), cas).is_ok();
        let answer_cas = (self.calls.cas && written).then(|| cas.unwrap_or(0) + 1);
        self.entry = Some((key, answer_cas));
    }

    /// Writes the answer, its headers and body, to the request's entry (a new one without a
    /// claim); with `complete`, to an entry of its own and then the claim's record.
    fn store(&mut self, body: &[u8]) {
        let (key, cas) = self.entry.take().unwrap_or_else(|| (next_entry(), None));
        let value = [&self.answer_headers[..], body].concat();
        if !self.calls.complete {
            let _ = hostcalls::set_shared_data(&key, Some(&value), cas);
            return;
        }
        let _ = hostcalls::set_shared_data(&format!("{key}/r"), Some(&value), None);
        let cas = cas.or_else(|| hostcalls::get_shared_data(&key).ok().and_then(|(_, c)| c));
        let _ = hostcalls::set_shared_data(&key, Some(&[b'd'; 96]), cas);
    }

    /// Sends the whole request body to the `dispatch` target, the request's headers along
    /// with `forward` (the answer comes back in `on_http_call_response`).
    fn attempt(&mut self, body: &[u8]) {
        let calls = Rc::clone(&self.calls);
        let Some(target) = calls.dispatch.as_deref() else {
            return;
        };
        let len = body.len().to_string();
        let own = if calls.forward {
            hostcalls::get_map(MapType::HttpRequestHeaders).unwrap_or_default()
        } else {
            vec![]
        };
        let mut headers = vec![
            (":method", "POST"),
            (":path", "/bench"),
            (":authority", target),
            ("content-length", len.as_str()),
        ];
        headers.extend(
            own.iter()
                .filter(|(k, _)| !k.starts_with(':') && !hop_by_hop(k))
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        self.call(target, headers, body);
    }

    /// Answers with a dispatched attempt's reply: its status, its headers but the
    /// connection's, and its body (closing the client's connection from its 32nd request on
    /// with `close`).
    fn answer(&self, status: u32, reply_headers: &[(String, String)], body: &[u8]) {
        let mut headers: Vec<(&str, &str)> = reply_headers
            .iter()
            .filter(|(k, _)| !k.starts_with(':') && !hop_by_hop(k))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let requests = self
            .calls
            .close
            .then(|| hostcalls::get_property(vec!["ngx", "connection_requests"]))
            .and_then(|r| r.ok().flatten())
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| v.parse::<u64>().ok());
        if requests.is_some_and(|n| n >= 32) {
            headers.push(("connection", "close"));
        }
        let _ = hostcalls::send_http_response(status, headers, Some(body));
    }
}

extern "C" {
    fn proxy_get_header_map_pairs(map: u32, data: *mut *mut u8, size: *mut usize) -> u32;
}

/// A header map as the host serializes it (what a store keeps, read without parsing).
fn map_bytes(map: MapType) -> Vec<u8> {
    let (mut data, mut size) = (std::ptr::null_mut(), 0);
    // SAFETY: valid out-pointers; the host fills a buffer from `proxy_on_memory_allocate`
    // (the SDK's `Vec::with_capacity(size)`, forgotten), taken back as that Vec.
    match unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) } {
        0 if !data.is_null() => unsafe { Vec::from_raw_parts(data, size, size) },
        _ => Vec::new(),
    }
}

impl Context for Http {
    fn on_http_call_response(&mut self, _: u32, _: usize, body_size: usize, _: usize) {
        match std::mem::replace(&mut self.webdis, Webdis::None) {
            Webdis::Claim if self.calls.dispatch.is_some() => {
                let body = std::mem::take(&mut self.body);
                self.attempt(&body);
                return;
            }
            Webdis::Claim => {
                let _ = hostcalls::resume_http_request();
                return;
            }
            Webdis::Settle => {
                match self.reply.take() {
                    Some((status, headers, body)) => self.answer(status, &headers, &body),
                    None => {
                        let _ = hostcalls::resume_http_response();
                    }
                }
                return;
            }
            Webdis::None => {}
        }
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(502);
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let reply_headers = if self.calls.forward {
            hostcalls::get_map(MapType::HttpCallResponseHeaders).unwrap_or_default()
        } else {
            vec![]
        };
        if self.calls.store {
            for (k, v) in &reply_headers {
                self.answer_headers
                    .extend([k.as_bytes(), b": ", v.as_bytes(), b"\n"].concat());
            }
            self.store(&body);
        }
        let c = Rc::clone(&self.calls);
        if let Some(target) = &c.webdis {
            self.reply = Some((status, reply_headers, body));
            let command = [&b"SET/rollsafe-probe-done/"[..], &[b'x'; 1024]].concat();
            self.webdis(target, &command, Webdis::Settle);
            return;
        }
        self.answer(status, &reply_headers, &body);
    }
}

/// Headers that describe one connection, not the message (and `content-length`, which the
/// host sets for what it sends). Kong's host gives names as the client spelled them.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name.to_ascii_lowercase().as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
            | "host"
    )
}

/// What a keyed POST of `body` to `/bench` on route `bench` without credentials hashes, as
/// rollsafe hashes it (src/idempotency/key.rs): the fingerprint, and the tag that finds the
/// caller's scope digest in its memo (the scope's SHA-256 is computed once per caller, not per
/// request).
fn keyed_hashes(body: &[u8]) -> ([u8; 16], [u8; 16]) {
    let mut sip = Sip13::new(0x726f_6c6c_7361_6665, 0x626f_6479_2d66_7031);
    for part in [&b"POST"[..], b"/bench", b""] {
        sip.write(&(part.len() as u32).to_be_bytes());
        sip.write(part);
    }
    sip.write(&(body.len() as u64).to_be_bytes());
    sip.write(body);
    let mut tag = Sip13::new(0x5eed, 0xcafe);
    for part in [&b"bench"[..], b""] {
        tag.write(&(part.len() as u32).to_be_bytes());
        tag.write(part);
    }
    (sip.finish128(), tag.finish128())
}

/// A body, read once it is whole (`None` until then: the stream is held).
fn whole(buffer: BufferType, size: usize, end_of_stream: bool) -> Option<Vec<u8>> {
    end_of_stream.then(|| {
        hostcalls::get_buffer(buffer, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default()
    })
}

impl HttpContext for Http {
    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let c = Rc::clone(&self.calls);
        if !(c.body || c.dispatch.is_some()) {
            return Action::Continue;
        }
        let Some(body) = whole(BufferType::HttpRequestBody, size, end_of_stream) else {
            return Action::Pause;
        };
        if c.claim {
            self.claim();
        }
        if c.dispatch.is_some() {
            if let Some(target) = &c.webdis {
                self.body = body;
                let command = [&b"SET/rollsafe-probe-claim/"[..], &[b'x'; 100]].concat();
                return self.webdis(target, &command, Webdis::Claim);
            }
            self.attempt(&body);
            return Action::Pause;
        }
        if c.reply {
            let _ = hostcalls::send_http_response(200, vec![], Some(&[b'x'; 1024]));
            return Action::Pause;
        }
        if let Some(target) = &c.webdis {
            let command = [&b"SET/rollsafe-probe-claim/"[..], &[b'x'; 100]].concat();
            return self.webdis(target, &command, Webdis::Claim);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        // (A dispatched attempt's answer was stored from its call; this is the local reply.)
        if self.calls.store && self.calls.dispatch.is_none() {
            self.answer_headers = map_bytes(MapType::HttpResponseHeaders);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        // (A dispatched attempt's answer was stored from its call; this is the local reply.)
        if !self.calls.store || self.calls.dispatch.is_some() {
            return Action::Continue;
        }
        let Some(body) = whole(BufferType::HttpResponseBody, size, end_of_stream) else {
            return Action::Pause;
        };
        self.store(&body);
        let c = Rc::clone(&self.calls);
        if let Some(target) = &c.webdis {
            let command = [&b"SET/rollsafe-probe-done/"[..], &[b'x'; 1024]].concat();
            return self.webdis(target, &command, Webdis::Settle);
        }
        Action::Continue
    }

    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let c = Rc::clone(&self.calls);
        if c.clock {
            let _ = hostcalls::get_current_time();
        }
        if c.method {
            let _ = hostcalls::get_map_value(MapType::HttpRequestHeaders, ":method");
        }
        if c.headers {
            let _ = hostcalls::get_map(MapType::HttpRequestHeaders);
        }
        if c.property {
            let _ = hostcalls::get_property(vec!["xds", "route_name"]);
        }
        if c.index {
            let _ = hostcalls::get_shared_data("rollsafe/probe/index");
        }
        if let Some(id) = c.metric {
            for _ in 0..c.metrics {
                let _ = hostcalls::increment_metric(id, 1);
            }
        }
        if c.timeout {
            let _ = hostcalls::set_map_value(
                MapType::HttpRequestHeaders,
                "x-envoy-upstream-rq-timeout-ms",
                Some("60000"),
            );
        }
        if c.hashes {
            std::hint::black_box(keyed_hashes(std::hint::black_box(&[b'x'; 1024])));
        }
        if c.shared && c.full {
            let _ = hostcalls::get_shared_data(&next_entry());
        } else if c.shared {
            let _ = hostcalls::get_shared_data("rollsafe/probe/1k");
        }
        if c.reply && !c.body {
            let _ = hostcalls::send_http_response(200, vec![], Some(&[b'x'; 1024]));
            return Action::Pause;
        }
        Action::Continue
    }
}
