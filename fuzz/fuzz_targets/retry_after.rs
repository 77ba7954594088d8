//! `Retry-After` values against any clock: delta-seconds or an HTTP-date, never a panic,
//! never an overflow.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rollsafe::retry::parse_retry_after;

fuzz_target!(|data: &[u8]| {
    let (now, text) = match data.split_first_chunk::<8>() {
        Some((now, rest)) => (u64::from_le_bytes(*now), rest),
        None => (0, data),
    };
    let value = String::from_utf8_lossy(text);
    if let Some(ms) = parse_retry_after(&value, now) {
        let v = value.trim();
        if v.bytes().all(|b| b.is_ascii_digit()) {
            assert!(ms % 1000 == 0 || ms == u64::MAX);
        }
    }
});
