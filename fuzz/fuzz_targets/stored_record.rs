//! Shared-data values as the store reads them back (another worker's, a corrupted one, a
//! colliding key's on Kong): decoded or refused, never a panic; what decodes re-encodes to
//! the same record.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rollsafe::idempotency::{decode, decode_response, encode, encode_response};

fuzz_target!(|data: &[u8]| {
    if let Some(rec) = decode(data) {
        let again = decode(&encode(&rec)).expect("a record re-encodes");
        assert_eq!(format!("{again:?}"), format!("{rec:?}"));
    }
    if let Some((owner, stored)) = decode_response(data) {
        let (o, s) = decode_response(&encode_response(owner, &stored)).expect("re-encodes");
        assert_eq!(o, owner);
        assert_eq!(s, stored);
    }
});
