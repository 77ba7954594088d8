//! Bench fixture (not shipped; its shared-data keys are under `rollsafe/`, the namespace of
//! the zone Kong's host gives rollsafe): a filter whose every callback returns `Continue` after the
//! hostcalls its configuration lists, comma-separated, on request headers:
//!   `clock`    get the current time
//!   `method`   read `:method`
//!   `headers`  read the whole request header map (the SDK's `get_map`)
//!   `property` read the `xds.route_name` property
//!   `shared`   read a 1 KiB shared-data value
//!   `reply`    answer with a local 200 and a 1 KiB body (`send_http_response`)
//! and on the way, what a keyed write or a replay cannot do without (the floors `make bench`
//! compares rollsafe's paths with):
//!   `body`     hold the request body until it is whole and read it once (`reply` then
//!              answers from the body callback)
//!   `store`    hold the response body until it is whole, read it, and write it (1 KiB and
//!              more) to shared data
//!   `claim`    (with `body`) once the body is whole, read a small shared-data record and
//!              write it back under its cas: the claim a keyed write records before it goes on
//!   `dispatch=<target>`  send the whole request body to `<target>` (`dispatch_http_call`)
//!              and answer with the reply's status and body
//!   `close`    (Kong's host, with `dispatch`) close the client's connection from its 32nd
//!              request on, as rollsafe does after a call (src/reconnect.rs)
//!   `forward`  (with `dispatch`) send the request's own headers along (the map read once,
//!              hop-by-hop ones dropped) and answer with the reply's headers, as a filter
//!              carrying the attempt itself must; with `store`, the reply's body is also
//!              written to shared data
//!   `webdis=<target>`  (Envoy, with `body` and `store`) what a keyed write on the shared store
//!              cannot do without: one Webdis call (a `SET` of 100 bytes) before the request
//!              goes on, and another (a `SET` of the 1 KiB answer) before the answer does
//! The empty configuration is the no-op filter: the cost of a wasm filter that does nothing.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};
use std::rc::Rc;

#[derive(Default, Clone)]
struct Calls {
    clock: bool,
    method: bool,
    headers: bool,
    property: bool,
    shared: bool,
    reply: bool,
    body: bool,
    store: bool,
    claim: bool,
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
                "reply" => calls.reply = true,
                "body" => calls.body = true,
                "store" => calls.store = true,
                "claim" => calls.claim = true,
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
        self.calls = Rc::new(calls);
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http(Rc::clone(&self.calls), 0, Webdis::None)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The calls to make, the body's size once read (`body`, `dispatch`), and which Webdis call
/// is awaited (`webdis`).
struct Http(Rc<Calls>, usize, Webdis);

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
        let sent = self.dispatch_http_call(
            target,
            headers,
            Some(command),
            vec![],
            std::time::Duration::from_secs(30),
        );
        if sent.is_err() {
            let _ = hostcalls::send_http_response(502, vec![], None);
        }
        self.2 = awaited;
        Action::Pause
    }
}

impl Context for Http {
    fn on_http_call_response(&mut self, _: u32, _: usize, body_size: usize, _: usize) {
        match std::mem::replace(&mut self.2, Webdis::None) {
            Webdis::Claim => {
                let _ = hostcalls::resume_http_request();
                return;
            }
            Webdis::Settle => {
                let _ = hostcalls::resume_http_response();
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
        if self.0.store {
            let _ = hostcalls::set_shared_data("rollsafe/probe/stored", Some(&body), None);
        }
        let reply_headers = if self.0.forward {
            hostcalls::get_map(MapType::HttpCallResponseHeaders).unwrap_or_default()
        } else {
            vec![]
        };
        let mut headers: Vec<(&str, &str)> = reply_headers
            .iter()
            .filter(|(k, _)| !k.starts_with(':') && !hop_by_hop(k))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let requests = self
            .0
            .close
            .then(|| hostcalls::get_property(vec!["ngx", "connection_requests"]))
            .and_then(|r| r.ok().flatten())
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| v.parse::<u64>().ok());
        if requests.is_some_and(|n| n >= 32) {
            headers.push(("connection", "close"));
        }
        let _ = hostcalls::send_http_response(status, headers, Some(&body));
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
        let c = Rc::clone(&self.0);
        if !(c.body || c.dispatch.is_some()) {
            return Action::Continue;
        }
        let Some(body) = whole(BufferType::HttpRequestBody, size, end_of_stream) else {
            return Action::Pause;
        };
        self.1 = body.len();
        if c.claim {
            let (_, cas) = hostcalls::get_shared_data("rollsafe/probe/claim").unwrap_or_default();
            let _ = hostcalls::set_shared_data("rollsafe/probe/claim", Some(&[b'c'; 96]), cas);
        }
        if let Some(target) = &c.dispatch {
            let len = body.len().to_string();
            let own = if c.forward {
                hostcalls::get_map(MapType::HttpRequestHeaders).unwrap_or_default()
            } else {
                vec![]
            };
            let mut headers = vec![
                (":method", "POST"),
                (":path", "/bench"),
                (":authority", target.as_str()),
                ("content-length", len.as_str()),
            ];
            headers.extend(
                own.iter()
                    .filter(|(k, _)| !k.starts_with(':') && !hop_by_hop(k))
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            );
            // (Through the Context trait, which files the token so the answer comes back here.)
            let sent = self.dispatch_http_call(
                target,
                headers,
                Some(&body),
                vec![],
                std::time::Duration::from_secs(30),
            );
            if sent.is_err() {
                let _ = hostcalls::send_http_response(502, vec![], None);
            }
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

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !self.0.store {
            return Action::Continue;
        }
        let Some(body) = whole(BufferType::HttpResponseBody, size, end_of_stream) else {
            return Action::Pause;
        };
        let _ = hostcalls::set_shared_data("rollsafe/probe/stored", Some(&body), None);
        let c = Rc::clone(&self.0);
        if let Some(target) = &c.webdis {
            let command = [&b"SET/rollsafe-probe-done/"[..], &[b'x'; 1024]].concat();
            return self.webdis(target, &command, Webdis::Settle);
        }
        Action::Continue
    }

    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let c = Rc::clone(&self.0);
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
        if c.shared {
            let _ = hostcalls::get_shared_data("rollsafe/probe/1k");
        }
        if c.reply && !c.body {
            let _ = hostcalls::send_http_response(200, vec![], Some(&[b'x'; 1024]));
            return Action::Pause;
        }
        Action::Continue
    }
}
