//! Bench fixture (not shipped): a filter whose every callback returns `Continue` after the
//! hostcalls its configuration lists, comma-separated, on request headers:
//!   `clock`    get the current time
//!   `method`   read `:method`
//!   `headers`  read the whole request header map (the SDK's `get_map`)
//!   `property` read the `xds.route_name` property
//!   `shared`   read a 1 KiB shared-data value
//!   `reply`    answer with a local 200 and a 1 KiB body (`send_http_response`)
//! The empty configuration is the no-op filter: the cost of a wasm filter that does nothing.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};
use std::rc::Rc;

#[derive(Default, Clone, Copy)]
struct Calls {
    clock: bool,
    method: bool,
    headers: bool,
    property: bool,
    shared: bool,
    reply: bool,
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
                _ => {}
            }
        }
        if calls.shared {
            let _ = hostcalls::set_shared_data("probe/1k", Some(&[b'x'; 1024]), None);
        }
        self.calls = Rc::new(calls);
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http(Rc::clone(&self.calls))))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http(Rc<Calls>);

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let c = *self.0;
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
            let _ = hostcalls::get_shared_data("probe/1k");
        }
        if c.reply {
            let _ = hostcalls::send_http_response(200, vec![], Some(&[b'x'; 1024]));
            return Action::Pause;
        }
        Action::Continue
    }
}
