//! Idempotency keys (IETF draft-ietf-httpapi-idempotency-key-header, Stripe-style replay):
//! key parsing, request fingerprints, and the node-local store's claim protocol. Pure: time is
//! an argument and shared data is a trait the host layer implements with proxy-wasm's. (The
//! store shared by several gateway nodes is the `shared_store` module; both answer with a [`Claim`].)
//!
//! The node-local store is a fixed table of `max_entries` slots whose keys are created at
//! configure time (and, beside the shared store, caches its completed records).
//! A claim is a compare-and-swap on an existing slot — exclusive on both hosts (HOSTS.md: on
//! Envoy "absent, so set" lets two workers win). A request key maps to a short probe sequence
//! of slots; the full key is stored inside the record and compared, since Kong's shm tells keys
//! apart by CRC32 only. Memory is bounded by the slot count and the largest stored response.
//!
//! Parts, each named for what it decides: [`policy`] (the compiled section), [`key`] (the key
//! header and the request's fingerprint), [`record`] (what a record holds, as bytes), [`store`]
//! (the node-local store's claim protocol), [`lifecycle`] (the key's states, events and the
//! effects each transition asks for) and `sip` (the fingerprint's hash).

pub mod key;
pub mod lifecycle;
pub mod policy;
pub mod record;
mod sip;
pub mod store;

pub use key::{
    fingerprint, fingerprint_streamed, parse_key, store_key, Facts, KeyError, ScopeMemo,
};
pub use policy::{IdempotencyConfig, Policy, ScopePart, StoreKind, WhenFull};
pub use record::{decode, encode, Record, State, Stored};
pub use store::{
    cache, cached, claim, create_slots, settle, Claim, Kept, SetError, Settle, Shared,
};

#[cfg(test)]
mod tests;
