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
    // Read in place, the same headers as read lossily when the block is text.
    let mut refs = Vec::new();
    block.push_texts_where(&mut refs, |_| true);
    if block.is_text() && refs.len() == pairs.len() {
        let refs: Vec<(String, String)> = refs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(refs, pairs);
    }
    if let Some((k, _)) = pairs.first() {
        let (first, _) = block.value_and_more(k);
        assert!(first.is_some() || k.contains('\u{fffd}'));
    }
    let again = HeaderBlock::from_pairs(&pairs);
    assert_eq!(again.to_pairs(), pairs);
});
