//! Shared-data values as the store reads them back (another worker's, a corrupted one, a
//! colliding key's on Kong): decoded or refused, never a panic; what decodes re-encodes to
//! the same record, and a stored response read back makes the same response again.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rollsafe::idempotency::{decode, encode, Stored};

fuzz_target!(|data: &[u8]| {
    if let Some(rec) = decode(data) {
        let again = decode(&encode(&rec)).expect("a record re-encodes");
        assert_eq!(format!("{again:?}"), format!("{rec:?}"));
    }
    if let Some(stored) = Stored::from_bytes(data.to_vec()) {
        let headers: Vec<(&str, &str)> = stored.headers().collect();
        assert_eq!(headers.len(), stored.header_count());
        let body = (!stored.body_omitted()).then(|| stored.body());
        let again = Stored::new(stored.owner(), stored.status(), &headers, body);
        assert_eq!(again.owner(), stored.owner());
        assert_eq!(again.status(), stored.status());
        assert_eq!(again.body_omitted(), stored.body_omitted());
        assert_eq!(again.headers().collect::<Vec<_>>(), headers);
        assert_eq!(again.body(), body.unwrap_or_default());
        let tagged = stored.as_owned_by(stored.owner() ^ 1);
        let back = Stored::from_bytes(tagged.into_owned()).expect("retagged reads back");
        assert_eq!(back.owner(), stored.owner() ^ 1);
        assert_eq!(back, stored);
    }
});
