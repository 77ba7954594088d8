//! Idempotency-Key header values (one or several, split at newlines): a key comes out only
//! when it is one value of 1 to 255 printable ASCII characters.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rollsafe::idempotency::parse_key;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let values: Vec<&str> = text.split('\n').collect();
    if let Ok(key) = parse_key(&values) {
        assert_eq!(values.len(), 1, "a repeated header yields no key");
        assert!((1..=255).contains(&key.len()), "{key:?}");
        assert!(key.bytes().all(|b| (0x20..0x7f).contains(&b)), "{key:?}");
    }
});
