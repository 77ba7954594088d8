//! rollsafe: a proxy-wasm filter that keeps API traffic correct while the services behind the
//! gateway roll, drain and upgrade.
//!
//! Layout (see README): pure decision modules (`config`, …) that never touch `proxy_wasm`, and
//! the `host` layer that translates between a proxy-wasm host and those decisions.
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod announce;
pub mod bytes;
pub mod config;
pub mod dates;
pub mod host;
pub mod idempotency;
pub mod maintenance;
pub mod method;
pub mod plan;
mod pool;
pub mod problem;
pub mod reconnect;
pub mod retry;
pub mod routing;
pub mod service;
pub mod shared_store;
pub mod warnings;

#[cfg(target_arch = "wasm32")]
#[global_allocator]
static POOL: pool::Pool = pool::Pool::new();

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    host::proxy::install();
}}
