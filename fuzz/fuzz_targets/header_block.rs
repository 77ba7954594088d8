//! A header map as a host serialises it — or anything else in its place: lookups and the
//! pairs a retry replays and an answer passes on never panic, and a well-formed block
//! round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rollsafe::host::headers::HeaderBlock;

fuzz_target!(|data: &[u8]| {
    let block = HeaderBlock::from_raw(data.to_vec());
    let pairs = block.to_pairs();
    for (k, _) in &pairs {
        assert!(block.get_bytes(k).is_some() || k.contains('\u{fffd}'));
    }
    let _ = block.get(":method");
    // What an answer passes on reads the same whether the block is text or read lossily.
    if let Some(passed) = block.passed_on(0) {
        let passed: Vec<(String, String)> = passed
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(passed, block.pairs_where(rollsafe::host::headers::passes_on));
    }
    let again = HeaderBlock::from_pairs(&pairs);
    assert_eq!(again.to_pairs(), pairs);
});
