//! Webdis's answers to the shared store's calls as rollsafe reads them (a Redis with other
//! data under the prefix, a proxy in between, a truncated body): a claim outcome, or
//! "unavailable", never a panic; a value that reads back re-encodes to the same record.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rollsafe::idempotency::{fingerprint, Facts};
use rollsafe::shared_store::{read_claim, read_settle, read_value, value};

fuzz_target!(|data: &[u8]| {
    let facts = Facts {
        fingerprint: fingerprint("POST", "/orders", "", b"{}"),
        body_len: Some(2),
    };
    let _ = read_claim(Some(200), data, "scope:k", &facts);
    let _ = read_settle(Some(200), data);
    if let Some((rec, stored)) = read_value(data) {
        let again = read_value(&value(&rec, stored.as_ref())).expect("a value re-encodes");
        assert_eq!(again, (rec, stored));
    }
});
