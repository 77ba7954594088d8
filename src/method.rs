//! HTTP methods as the config names them, and method sets as bit masks (one AND per request).

use serde::Deserialize;

/// HTTP methods, upper case as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
pub enum Method {
    GET,
    HEAD,
    POST,
    PUT,
    PATCH,
    DELETE,
    OPTIONS,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::GET => "GET",
            Method::HEAD => "HEAD",
            Method::POST => "POST",
            Method::PUT => "PUT",
            Method::PATCH => "PATCH",
            Method::DELETE => "DELETE",
            Method::OPTIONS => "OPTIONS",
        }
    }
}

/// The bit of a method in a set; 0 for methods outside the ones a config can name (CONNECT,
/// TRACE, extensions), so they are in no set.
pub fn mask(method: &str) -> u8 {
    let m = match method {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        "POST" => Method::POST,
        "PUT" => Method::PUT,
        "PATCH" => Method::PATCH,
        "DELETE" => Method::DELETE,
        "OPTIONS" => Method::OPTIONS,
        _ => return 0,
    };
    1 << (m as u8)
}

/// The set of every method a config can name (OPTIONS is the last).
pub const EVERY: u8 = (1 << (Method::OPTIONS as u8 + 1)) - 1;

/// The set of the configured methods.
pub fn set(methods: &[Method]) -> u8 {
    methods.iter().fold(0, |acc, m| acc | (1 << (*m as u8)))
}
