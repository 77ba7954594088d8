//! When rollsafe asks a client to open a new connection (Kong's host).
//!
//! ngx_wasm_module allocates a `dispatch_http_call`'s buffers — the request it sends, the
//! reader of its answer — from the *client connection's* pool, which nginx frees only when
//! that connection closes. nginx's own frees on that pool walk its list of large allocations,
//! which every call lengthens: on a keep-alive connection each dispatched request costs more
//! than the one before and holds its buffers until the client goes (measured on one
//! connection-reusing client: at 1,000 requests a connection — nginx's default; Kong ≥ 3.6's is
//! 10,000 — over half the worker's CPU was that walk, and a keyed write took twice as long as
//! at 32). So a response to a request that made a call carries `Connection: close` once its
//! connection has carried [`CALLS_CONNECTION_REQUESTS`] requests: the client's next request
//! opens a new connection, and what the calls held is freed with the old one.

/// Requests a connection may carry before a response that follows a call closes it.
pub const CALLS_CONNECTION_REQUESTS: u64 = 32;

/// Whether the response to a request that made a call closes the client's connection, from
/// nginx's count of requests on the connection so far (this one included) as the host gave it
/// (`None`, or not a count: left open).
pub fn close_connection(connection_requests: Option<&[u8]>) -> bool {
    connection_requests
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n >= CALLS_CONNECTION_REQUESTS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_closes_once_it_carried_its_quota() {
        for (requests, close) in [
            (Some(&b"32"[..]), true),
            (Some(&b"1000"[..]), true),
            (Some(&b"31"[..]), false),
            (Some(&b"1"[..]), false),
            (None, false),
            (Some(&b""[..]), false),
            (Some(&b"-"[..]), false),
            (Some(&b"\xff"[..]), false),
        ] {
            assert_eq!(close_connection(requests), close, "{requests:?}");
        }
    }
}
