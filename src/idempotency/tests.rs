use super::record::BucketBytes;
use super::*;
use std::cell::RefCell;
use std::collections::HashMap;

/// Shared data with each host's CAS rules (HOSTS.md): on Kong a write succeeds only when the
/// given cas equals the stored one (absent = 0); on Envoy cas 0 means "no check" and an
/// absent key is inserted whatever the cas.
type Interleaved = Box<dyn FnOnce(&FakeShared)>;
/// Shared data by key name: the value and its cas.
type Entries = HashMap<Vec<u8>, (Vec<u8>, u32)>;

struct FakeShared {
    kong: bool,
    map: RefCell<Entries>,
    /// Runs once just before the next write: another worker's interleaved write.
    interleave: RefCell<Option<Interleaved>>,
    capacity: usize,
    /// Reads of bucket values, as a host would count them.
    bucket_reads: std::cell::Cell<usize>,
    /// Reads of stored responses.
    response_reads: std::cell::Cell<usize>,
}

impl FakeShared {
    fn new(kong: bool) -> Self {
        FakeShared {
            kong,
            map: RefCell::default(),
            interleave: RefCell::new(None),
            capacity: usize::MAX,
            bucket_reads: std::cell::Cell::new(0),
            response_reads: std::cell::Cell::new(0),
        }
    }
    fn raw_set(&self, key: &[u8], value: &[u8]) {
        let mut m = self.map.borrow_mut();
        let cas = m.get(key).map_or(0, |(_, c)| *c) + 1;
        m.insert(key.to_vec(), (value.to_vec(), cas));
    }
}

impl Shared for FakeShared {
    fn get(&self, key: &[u8]) -> Option<(Vec<u8>, u32)> {
        if key.starts_with(b"rollsafe/idem/b") {
            self.bucket_reads.set(self.bucket_reads.get() + 1);
        }
        if key.ends_with(b"/r") {
            self.response_reads.set(self.response_reads.get() + 1);
        }
        self.map.borrow().get(key).cloned()
    }
    fn set(&self, key: &[u8], value: &[u8], cas: u32) -> Result<(), SetError> {
        let interleaved = self.interleave.borrow_mut().take();
        if let Some(f) = interleaved {
            f(self);
        }
        if value.len() > self.capacity {
            return Err(SetError::Refused);
        }
        let current = self.map.borrow().get(key).map(|(_, c)| *c);
        let ok = match (self.kong, current) {
            (true, None) => cas == 0,
            (true, Some(c)) => cas == c,
            (false, None) => true,
            (false, Some(c)) => cas == 0 || cas == c,
        };
        if !ok {
            return Err(SetError::CasMismatch);
        }
        self.raw_set(key, value);
        Ok(())
    }
    fn cas_after_write(&self, cas: u32) -> Option<u32> {
        self.kong.then_some(cas + 1)
    }
}

/// A settle with nothing kept from the claim (the bucket is read, as on Envoy).
fn settle(s: &FakeShared, slot: u32, key: &str, owner: u64, settle: &Settle) -> bool {
    store::settle(s, slot, key, owner, settle, &mut None)
}

fn stored(status: u16, body: &str) -> Stored {
    Stored::new(
        OWNER,
        status,
        &[("content-type", "text/plain")],
        Some(body.as_bytes()),
    )
}

const FP: Facts = Facts {
    fingerprint: [7; 32],
    body_len: Some(2),
};
const OTHER: Facts = Facts {
    fingerprint: [8; 32],
    body_len: Some(2),
};
const OWNER: u64 = 0xA11CE;

fn done(stored: Stored, expires_ms: u64) -> Settle {
    Settle::Complete { stored, expires_ms }
}

#[test]
fn state_machine_claim_in_flight_done_expired() {
    for kong in [true, false] {
        let s = FakeShared::new(kong);
        create_slots(&s, 64);
        let Claim::Claimed { slot, .. } = claim(&s, 64, "k1", &FP, OWNER, 1_000, 30_000) else {
            panic!()
        };
        assert_eq!(
            claim(&s, 64, "k1", &FP, OWNER, 2_000, 30_000),
            Claim::InFlight {
                same: true,
                retry_after_ms: 29_000
            }
        );
        assert_eq!(
            claim(&s, 64, "k1", &OTHER, OWNER, 2_000, 30_000),
            Claim::InFlight {
                same: false,
                retry_after_ms: 29_000
            }
        );
        assert!(settle(
            &s,
            slot,
            "k1",
            OWNER,
            &done(stored(201, "made"), 100_000)
        ));
        assert_eq!(
            claim(&s, 64, "k1", &FP, OWNER, 3_000, 30_000),
            Claim::Done {
                same: true,
                stored: stored(201, "made")
            }
        );
        assert!(matches!(
            claim(&s, 64, "k1", &OTHER, OWNER, 3_000, 30_000),
            Claim::Done { same: false, .. }
        ));
        // After the TTL the key is free again.
        assert!(matches!(
            claim(&s, 64, "k1", &FP, OWNER, 100_000, 30_000),
            Claim::Claimed { .. }
        ));
    }
}

#[test]
fn released_claims_and_expired_leases_let_the_next_try_run() {
    let s = FakeShared::new(true);
    create_slots(&s, 16);
    let Claim::Claimed { slot, .. } = claim(&s, 16, "k", &FP, OWNER, 0, 1_000) else {
        panic!()
    };
    assert!(settle(&s, slot, "k", OWNER, &Settle::Release));
    assert!(matches!(
        claim(&s, 16, "k", &FP, OWNER, 1, 1_000),
        Claim::Claimed { .. }
    ));
    // A crashed or stalled holder: the lease runs out.
    assert!(matches!(
        claim(&s, 16, "k", &FP, OWNER, 500, 1_000),
        Claim::InFlight { .. }
    ));
    assert!(matches!(
        claim(&s, 16, "k", &FP, OWNER, 1_001, 1_000),
        Claim::Claimed { .. }
    ));
}

#[test]
fn two_workers_racing_for_one_key_cannot_both_win_on_either_host() {
    for kong in [true, false] {
        let s = FakeShared::new(kong);
        create_slots(&s, 16);
        // Worker B claims between worker A's read and A's write.
        *s.interleave.borrow_mut() = Some(Box::new(|s: &FakeShared| {
            assert!(matches!(
                claim(s, 16, "k", &FP, OWNER, 0, 1_000),
                Claim::Claimed { .. }
            ));
        }));
        assert!(
            matches!(
                claim(&s, 16, "k", &FP, OWNER, 0, 1_000),
                Claim::InFlight { same: true, .. }
            ),
            "kong={kong}"
        );
    }
}

#[test]
fn slots_that_were_never_created_are_not_claimed_absent_so_set() {
    // Without pre-created slots there is nothing to CAS against: report full rather than
    // risk Envoy's non-exclusive first insert.
    let s = FakeShared::new(false);
    assert_eq!(claim(&s, 16, "k", &FP, OWNER, 0, 1_000), Claim::Full);
}

#[test]
fn a_window_of_requests_in_flight_is_full_and_completed_records_are_evicted_oldest_first() {
    let s = FakeShared::new(true);
    create_slots(&s, 16);
    // Requests in flight are never evicted: once every slot holds one, new keys are full.
    let mut held = Vec::new();
    for i in 0..200 {
        if let Claim::Claimed { slot, evicted, .. } =
            claim(&s, 16, &format!("k{i}"), &FP, OWNER, 0, 60_000)
        {
            assert!(!evicted);
            held.push((slot, format!("k{i}")));
        }
    }
    assert_eq!(held.len(), 16);
    assert_eq!(claim(&s, 16, "late", &FP, OWNER, 0, 60_000), Claim::Full);
    // Completed ones make room, the oldest completion first.
    for (n, (slot, key)) in held.iter().enumerate() {
        let expires = 100_000 + n as u64;
        assert!(settle(
            &s,
            *slot,
            key,
            OWNER,
            &done(stored(201, key), expires)
        ));
    }
    let Claim::Claimed {
        evicted: true,
        slot: late,
        ..
    } = claim(&s, 16, "late", &FP, OWNER, 1, 60_000)
    else {
        panic!("a completed record makes room")
    };
    // In the late key's bucket, the oldest completion was the one evicted; the rest replay.
    let bucket: Vec<&(u32, String)> = held
        .iter()
        .filter(|(slot, _)| slot / store::WAYS == late / store::WAYS)
        .collect();
    assert_eq!(bucket.len(), store::WAYS as usize);
    for (n, (_, key)) in bucket.iter().enumerate() {
        assert_eq!(store::cached(&s, 16, key, 2).is_some(), n > 0, "{key}");
    }
    assert!(
        s.map.borrow().len() <= 32,
        "an index and a response per slot at most"
    );
}

#[test]
fn a_million_keys_through_ten_thousand_slots_are_never_refused_and_memory_stays_flat() {
    let s = FakeShared::new(false);
    let slots = 10_000;
    create_slots(&s, slots);
    let n: u64 = if cfg!(debug_assertions) {
        200_000
    } else {
        1_000_000
    };
    let (mut evicted, mut sizes) = (0u64, Vec::new());
    for i in 0..n {
        let key = format!("key-{i}");
        let Claim::Claimed {
            slot, evicted: e, ..
        } = claim(&s, slots, &key, &FP, i, i, 30_000)
        else {
            panic!("key {i} refused")
        };
        evicted += u64::from(e);
        let body = format!("{{\"id\":{i}}}");
        assert!(settle(
            &s,
            slot,
            &key,
            i,
            &done(stored(201, &body), i + 86_400_000)
        ));
        if i % (n / 10) == n / 10 - 1 {
            sizes.push(s.map.borrow().values().map(|(v, _)| v.len()).sum::<usize>());
        }
    }
    assert!(
        evicted >= n - u64::from(slots),
        "evictions counted: {evicted}"
    );
    // Memory after warm-up: flat (two keys a slot at most; bytes grow only with the digits
    // of the keys and bodies this test makes).
    let (first, last) = (sizes[1], *sizes.last().unwrap());
    assert!(last <= first + first / 20, "grew from {first} to {last}");
    assert!(s.map.borrow().len() <= 2 * slots as usize);
    // The most recent keys still replay.
    for i in n - 100..n {
        let Claim::Done {
            same: true,
            stored: got,
        } = claim(&s, slots, &format!("key-{i}"), &FP, 0, n, 30_000)
        else {
            panic!("key {i} no longer replays")
        };
        assert_eq!(got.body(), format!("{{\"id\":{i}}}").into_bytes());
    }
}

#[test]
fn crc_colliding_or_foreign_slot_contents_are_told_apart_by_the_full_key() {
    let s = FakeShared::new(true);
    create_slots(&s, 16);
    let Claim::Claimed { slot, .. } = claim(&s, 16, "a", &FP, OWNER, 0, 60_000) else {
        panic!()
    };
    // Another key landing on the same slot never reads "a"'s record as its own.
    assert!(!settle(&s, slot, "b", OWNER, &Settle::Release));
    // Foreign bytes in a bucket are free slots.
    for b in (0..store::buckets(16)).filter(|b| *b != slot / store::WAYS) {
        s.raw_set(&store::bucket_key(b), b"garbage");
    }
    for key in ["b", "c", "d"] {
        assert!(matches!(
            claim(&s, 16, key, &FP, OWNER, 0, 60_000),
            Claim::Claimed { .. }
        ));
    }
    assert!(matches!(
        claim(&s, 16, "a", &FP, OWNER, 0, 60_000),
        Claim::InFlight { .. }
    ));
}

#[test]
fn refused_writes_degrade_to_full() {
    let mut s = FakeShared::new(true);
    create_slots(&s, 16);
    let Claim::Claimed { slot, .. } = claim(&s, 16, "k", &FP, OWNER, 0, 60_000) else {
        panic!()
    };
    s.capacity = 100;
    assert!(!settle(
        &s,
        slot,
        "k",
        OWNER,
        &done(stored(200, &"x".repeat(1000)), 99)
    ));
    assert!(matches!(
        claim(&s, 16, "k", &FP, OWNER, 1, 60_000),
        Claim::Claimed { .. } | Claim::Full
    ));
}

#[test]
fn records_round_trip_and_garbage_is_not_a_record() {
    let rec = Record {
        key: "k".into(),
        facts: FP,
        owner: OWNER,
        expires_ms: 42,
        state: State::Done,
    };
    assert_eq!(decode(&encode(&rec)), Some(rec.clone()));
    let bytes = encode(&rec);
    for cut in 0..bytes.len() {
        assert_eq!(decode(&bytes[..cut]), None);
    }
    assert_eq!(decode(b""), None);
    let resp = stored(201, "b").as_owned_by(OWNER).into_owned();
    let back = Stored::from_bytes(resp.clone()).expect("a stored response reads back");
    assert_eq!(back, stored(201, "b"));
    assert_eq!(
        (
            back.owner(),
            back.status(),
            back.body(),
            back.body_omitted()
        ),
        (OWNER, 201, b"b".as_slice(), false)
    );
    assert_eq!(
        back.headers().collect::<Vec<_>>(),
        [("content-type", "text/plain")]
    );
    for cut in 0..resp.len() {
        assert_eq!(Stored::from_bytes(resp[..cut].to_vec()), None);
    }
    let mut longer = resp.clone();
    longer.push(0);
    assert_eq!(Stored::from_bytes(longer), None, "a byte past the body");
    assert_eq!(decode(&resp), None, "a response is not an index record");
}

#[test]
fn key_parsing() {
    assert_eq!(
        parse_key(&["\"8e03978e-40d5-43e8-bc93-6894a57f9324\""]).unwrap(),
        "8e03978e-40d5-43e8-bc93-6894a57f9324"
    );
    assert_eq!(parse_key(&["abc-123"]).unwrap(), "abc-123");
    assert_eq!(
        parse_key(&["\"with space and \\\"quote\\\"\""]).unwrap(),
        "with space and \"quote\""
    );
    assert_eq!(parse_key(&[&"k".repeat(255)]).unwrap().len(), 255);
    // Every visible character is a bare key's; every printable one but `"` and `\` a quoted
    // key's, taken as it is.
    let visible: String = ('!'..='~').collect();
    assert_eq!(parse_key(&[&visible]).unwrap(), visible);
    let printable: String = (' '..='~').filter(|c| !matches!(c, '"' | '\\')).collect();
    let quoted = format!("\"{printable}\"");
    assert!(matches!(parse_key(&[&quoted]), Ok(std::borrow::Cow::Borrowed(k)) if k == printable));
    assert_eq!(parse_key::<&str>(&[]), Err(KeyError::Missing));
    assert_eq!(parse_key(&["a", "b"]), Err(KeyError::Repeated));
    for bad in [
        "",
        "\"\"",
        "\"open",
        "has space",
        "\"bad\\escape\"",
        "caf\u{e9}",
        "\"a\"b\"",
        "tab\there",
        "del\u{7f}",
        "\"del\u{7f} in a string\"",
        "\"caf\u{e9} in a string\"",
    ] {
        assert!(
            matches!(parse_key(&[bad]), Err(KeyError::Invalid(_))),
            "{bad:?}"
        );
    }
    assert!(parse_key(&[&"k".repeat(256)]).is_err());
}

/// The names of buckets and responses are persisted too: the workers of a Kong reload share
/// the zone, old and new.
#[test]
fn shared_data_names_are_the_persisted_format() {
    assert_eq!(&*store::bucket_key(0), b"rollsafe/idem/b0");
    assert_eq!(&*store::bucket_key(12_345), b"rollsafe/idem/b12345");
    assert_eq!(&*store::response_key(7), b"rollsafe/idem/7/r");
    assert_eq!(
        &*store::response_key(u32::MAX),
        b"rollsafe/idem/4294967295/r"
    );
}

/// The store key is persisted (Redis keys, node-local records): gateways of two versions
/// sharing a store during an upgrade must name a key alike, so its bytes are pinned here
/// (computed apart: the first 16 bytes of SHA-256 over each part, length-prefixed).
#[test]
fn store_keys_are_the_persisted_format() {
    assert_eq!(
        store_key([Some(&b"route-1"[..]), None], "k1"),
        "feef1aa487561850a7aba8ea9aa8aaa7:k1"
    );
    assert_eq!(
        store_key(
            [Some(&b"route-1"[..]), Some(&b"\xffcred\x80"[..])],
            "order 7"
        ),
        "6a932e0c4162472ca7d9fc3356089957:order 7"
    );
}

/// The memo of scope digests changes no store key: callers met again (a hit), callers whose
/// tag falls to a way another holds (300 callers in 64 ways), absent and empty parts.
#[test]
fn the_scope_memo_gives_the_store_keys_the_scope_gives() {
    let mut memo = ScopeMemo::new();
    let creds: Vec<Vec<u8>> = (0..300u32)
        .map(|i| format!("Bearer {i}").into_bytes())
        .collect();
    for round in 0..3 {
        for (i, c) in creds.iter().enumerate() {
            let parts = [Some(&b"route-1"[..]), (i % 7 != 0).then_some(c.as_slice())];
            let key = format!("k{round}-{i}");
            assert_eq!(memo.store_key(parts, &key), store_key(parts, &key));
        }
    }
    // An absent part and an empty one are the same caller, as in the scope's format.
    let absent = [Some(&b"r"[..]), None];
    let empty = [Some(&b"r"[..]), Some(&b""[..])];
    assert_eq!(memo.store_key(absent, "k"), memo.store_key(empty, "k"));
    assert_ne!(
        memo.store_key([Some(&b"ab"[..]), Some(&b""[..])], "k"),
        memo.store_key([Some(&b"a"[..]), Some(&b"b"[..])], "k"),
        "parts do not blur"
    );
}

/// Fingerprints are persisted (records, the shared store, between gateway versions): these
/// are SipHash-1-3-128 over the length-prefixed parts, computed apart from this crate (a
/// Python reference of SipHash), then 16 zero bytes.
#[test]
fn fingerprints_are_the_persisted_format() {
    let hex = |f: [u8; 32]| f.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!(
        hex(fingerprint("POST", "/o?x=1", "", b"{\"sku\":3}")),
        "506f6befdd641c96db9928ebbe0dceae00000000000000000000000000000000"
    );
    assert_eq!(
        hex(fingerprint_streamed("PUT", "/o/7", "sha-256=:x:")),
        "66017529d92f7e47b45f58f102f5ff7100000000000000000000000000000000"
    );
    // A streamed body's fingerprint never equals a held one's, even an empty body's.
    assert_ne!(
        fingerprint_streamed("PUT", "/o/7", ""),
        fingerprint("PUT", "/o/7", "", b"")
    );
}

#[test]
fn fingerprint_covers_method_path_and_digest_and_facts_compare_the_length() {
    let base = fingerprint("POST", "/o?x=1", "", b"{\"sku\":3}");
    assert_ne!(base, fingerprint("PATCH", "/o?x=1", "", b"{\"sku\":3}"));
    // A body of the same length with other content is another request.
    assert_ne!(base, fingerprint("POST", "/o?x=1", "", b"{\"sku\":4}"));
    assert_ne!(base, fingerprint("POST", "/o?x=2", "", b"{\"sku\":3}"));
    assert_ne!(
        base,
        fingerprint("POST", "/o?x=1", "sha-256=:x:", b"{\"sku\":3}")
    );
    assert_ne!(
        fingerprint("POST", "/ab", "", b""),
        fingerprint("POST", "/a", "b", b"")
    );
    let facts = |body_len| Facts {
        fingerprint: base,
        body_len,
    };
    assert!(facts(Some(2)).same_as(&facts(Some(2))));
    assert!(!facts(Some(2)).same_as(&facts(Some(3))));
    assert!(
        facts(None).same_as(&facts(Some(3))),
        "chunked: length unknown"
    );
    assert!(!FP.same_as(&OTHER));
}

#[test]
fn a_stale_owner_can_neither_complete_nor_release_a_newer_claim() {
    let s = FakeShared::new(true);
    create_slots(&s, 16);
    let Claim::Claimed { slot, .. } = claim(&s, 16, "k", &FP, OWNER, 0, 1_000) else {
        panic!()
    };
    // The lease runs out while the first holder is still busy; a second try claims.
    let Claim::Claimed { slot: again, .. } = claim(&s, 16, "k", &FP, 2, 1_500, 1_000) else {
        panic!()
    };
    assert_eq!(slot, again);
    assert!(!settle(
        &s,
        slot,
        "k",
        OWNER,
        &done(stored(201, "old"), 9_000)
    ));
    assert!(!settle(&s, slot, "k", OWNER, &Settle::Release));
    assert!(!settle(
        &s,
        slot,
        "k",
        OWNER,
        &Settle::Extend { expires_ms: 9_000 }
    ));
    assert!(matches!(
        claim(&s, 16, "k", &FP, 3, 1_600, 1_000),
        Claim::InFlight {
            same: true,
            retry_after_ms: 900
        }
    ));
    // The newer owner extends and completes its own claim.
    assert!(settle(
        &s,
        slot,
        "k",
        2,
        &Settle::Extend { expires_ms: 5_000 }
    ));
    assert!(matches!(
        claim(&s, 16, "k", &FP, 3, 2_600, 1_000),
        Claim::InFlight {
            retry_after_ms: 2_400,
            ..
        }
    ));
    assert!(settle(&s, slot, "k", 2, &done(stored(201, "new"), 9_000)));
    assert_eq!(
        claim(&s, 16, "k", &FP, 3, 3_000, 1_000),
        Claim::Done {
            same: true,
            stored: stored(201, "new")
        }
    );
}

#[test]
fn stored_statuses() {
    let cfg: IdempotencyConfig = serde_json::from_str("{}").unwrap();
    let p = Policy::compile(&cfg, "idempotency").unwrap();
    for (status, stored) in [
        (200, true),
        (201, true),
        (400, true),
        (404, true),
        (422, true),
        (408, false),
        (409, false),
        (425, false),
        (429, false),
        (500, false),
        (503, false),
        (302, false),
    ] {
        assert_eq!(p.stores(status), stored, "{status}");
    }
    assert!(p.applies_to("POST") && p.applies_to("PATCH") && !p.applies_to("PUT"));
}

#[test]
fn config_errors_name_the_field() {
    for (json, field) in [
        (r#"{"scope":["cookie:x"]}"#, "idempotency.scope[0]"),
        (
            r#"{"store_statuses":["2x"]}"#,
            "idempotency.store_statuses[0]",
        ),
        (r#"{"max_entries":1}"#, "idempotency.max_entries"),
        (r#"{"lease_ms":1}"#, "idempotency.lease_ms"),
        (r#"{"header":"bad header"}"#, "idempotency.header"),
        (r#"{"store":"redis"}"#, "idempotency.redis"),
        (r#"{"redis":{"target":"webdis"}}"#, "idempotency.store"),
        (
            r#"{"store":"redis","redis":{"target":""}}"#,
            "idempotency.redis.target",
        ),
    ] {
        let cfg: IdempotencyConfig = serde_json::from_str(json).unwrap();
        assert_eq!(
            Policy::compile(&cfg, "idempotency").unwrap_err().path,
            field,
            "{json}"
        );
    }
}

#[test]
fn a_bucket_rewrites_one_way_and_keeps_the_others_byte_for_byte() {
    let rec = |key: &str, owner: u64| Record {
        key: key.into(),
        facts: FP,
        owner,
        expires_ms: 42,
        state: State::InFlight,
    };
    let (a, b) = (rec("a", 1), rec("bb", 2));
    let empty = BucketBytes::parse(Vec::new(), 4);
    assert!(
        (0..empty.ways()).all(|w| empty.way(w).is_none()),
        "never written: all free"
    );
    let one = BucketBytes::parse(empty.with(1, Some(&a.view()), None), 4);
    let two_raw = one.with(3, Some(&b.view()), None);
    let two = BucketBytes::parse(two_raw.clone(), 4);
    let held: Vec<_> = (0..two.ways())
        .map(|w| (w, two.way(w).map(|r| r.owner)))
        .collect();
    assert_eq!(held, [(0, None), (1, Some(1)), (2, None), (3, Some(2))]);
    assert_eq!(two.way(3).map(|r| r.key), Some(&b"bb"[..]));
    // Rewriting way 3 with the same record gives the same bytes; freeing it leaves way 1.
    assert_eq!(two.with(3, two.way(3).as_ref(), None), two_raw);
    let freed = BucketBytes::parse(two.with(3, None, None), 4);
    assert_eq!(freed.way(1), Some(a.view()));
    assert_eq!(freed.way(3), None);
    // A length that runs past the end cuts the bucket there: that way and the rest are free,
    // as are the ways of a bucket cut short (those before the cut stay).
    let mut bad = two_raw.clone();
    bad[8] ^= 0xff; // way 1's length
    let bad = BucketBytes::parse(bad, 4);
    assert!((0..bad.ways()).all(|w| bad.way(w).is_none()));
    for cut in 0..two_raw.len() {
        let cut = BucketBytes::parse(two_raw[..cut].to_vec(), 4);
        assert!(cut.way(3).is_none() || cut.way(3) == two.way(3));
    }
    let garbage = BucketBytes::parse(b"garbage".to_vec(), 4);
    assert!((0..garbage.ways()).all(|w| garbage.way(w).is_none()));
}

/// CRC-32 (IEEE), as nginx's `ngx_crc32_long`, a byte at a time through `table`.
fn crc32(table: &[u32; 256], bytes: &[u8]) -> u32 {
    !bytes.iter().fold(!0u32, |crc, b| {
        table[usize::from(crc as u8 ^ b)] ^ (crc >> 8)
    })
}

fn crc32_table() -> [u32; 256] {
    std::array::from_fn(|i| {
        (0..8).fold(i as u32, |c, _| {
            (c >> 1) ^ (0xEDB8_8320 & (c & 1).wrapping_neg())
        })
    })
}

/// Kong's host finds a shared-data key by its CRC-32 alone (ngx_wasm_module's key-value store
/// is a tree of the keys' CRC-32s, and a lookup compares no key): two of rollsafe's names that
/// collided would be one record there. Every name the largest store uses is told apart, as the
/// zone `rollsafe` sees it (the namespace cut off) and as the default zone does.
#[test]
fn shared_data_names_never_collide_under_crc32_up_to_the_largest_store() {
    let table = crc32_table();
    let crc32 = |bytes: &[u8]| crc32(&table, bytes);
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    // Names do collide: these two would be one record on Kong's host.
    assert_eq!(crc32(b"plumless"), crc32(b"buckeroo"));
    let slots = 1_000_000;
    let names = (0..store::buckets(slots))
        .map(store::bucket_key)
        .chain((0..slots).map(store::response_key));
    let mut seen = std::collections::HashSet::new();
    let mut count = 0;
    for name in names {
        let short = name.strip_prefix(b"rollsafe/").unwrap_or(&name);
        let shown = String::from_utf8_lossy(&name);
        assert!(
            seen.insert((0, crc32(short))),
            "{shown} collides in zone rollsafe"
        );
        assert!(seen.insert((1, crc32(&name))), "{shown} collides in zone *");
        count += 1;
    }
    assert_eq!(count, 1_125_000);
}

/// Kong's host: a claim keeps the bucket it wrote, and its completion writes from it without
/// reading the bucket again; when another claim wrote the bucket meanwhile, the kept copy is
/// refused and the bucket read, so that claim is never overwritten. Envoy keeps nothing.
#[test]
fn a_completion_writes_the_bucket_its_claim_kept_unless_another_claim_wrote_it_since() {
    let claimed =
        |s: &FakeShared, key: &str, owner: u64| match claim(s, 8, key, &FP, owner, 0, 60_000) {
            Claim::Claimed { slot, kept, .. } => (slot, kept),
            other => panic!("{key}: {other:?}"),
        };
    let complete = done(stored(201, "made"), 90_000);

    let s = FakeShared::new(true);
    create_slots(&s, 8);
    let (slot, mut kept) = claimed(&s, "a", 1);
    assert!(kept.is_some());
    let reads = s.bucket_reads.get();
    assert!(store::settle(&s, slot, "a", 1, &complete, &mut kept));
    assert_eq!(
        s.bucket_reads.get(),
        reads,
        "the completion read the bucket"
    );
    assert!(matches!(
        claim(&s, 8, "a", &FP, 9, 1, 60_000),
        Claim::Done { same: true, .. }
    ));

    // (One bucket of eight ways: "c" lands beside "b".)
    let (slot, mut kept) = claimed(&s, "b", 2);
    let (_, _) = claimed(&s, "c", 3);
    let reads = s.bucket_reads.get();
    assert!(store::settle(&s, slot, "b", 2, &complete, &mut kept));
    assert_eq!(
        s.bucket_reads.get(),
        reads + 1,
        "a stale copy is read again"
    );
    assert!(matches!(
        claim(&s, 8, "b", &FP, 9, 1, 60_000),
        Claim::Done { same: true, .. }
    ));
    assert!(matches!(
        claim(&s, 8, "c", &FP, 9, 1, 60_000),
        Claim::InFlight { same: true, .. }
    ));

    let envoy = FakeShared::new(false);
    create_slots(&envoy, 8);
    assert_eq!(claimed(&envoy, "a", 1).1, None);
}

/// Kong's host: a completion writes its slot's response under the cas the bucket keeps for it
/// (or as absent, for a slot never answered), without reading the response for it. A hint gone
/// stale (the response written by someone else, or evicted) and a bucket without hints (what
/// versions that do not know them write) cost one read, and the completion still lands. Envoy
/// writes no hints: its first write of the response is its only one.
#[test]
fn a_completion_writes_its_response_under_the_cas_the_bucket_keeps() {
    // Claims slot 0 for `key` at `at` (the key before it expired then), completes it with
    // `body` until the next key's turn, checks the replay, and returns the response reads the
    // completion made.
    let round = |s: &FakeShared, key: &str, at: u64, body: &str| -> usize {
        let before = s.response_reads.get();
        let (slot, mut kept) = match claim(s, 8, key, &FP, at + 1, at, 1_000) {
            Claim::Claimed { slot, kept, .. } => (slot, kept),
            other => panic!("{key}: {other:?}"),
        };
        assert_eq!(slot, 0, "{key}");
        let complete = done(stored(201, body), at + 1_000_000);
        assert!(store::settle(s, slot, key, at + 1, &complete, &mut kept));
        let reads = s.response_reads.get() - before;
        match claim(s, 8, key, &FP, 99, at + 10, 1_000) {
            Claim::Done { stored, .. } => assert_eq!(stored.body(), body.as_bytes()),
            other => panic!("{key}: {other:?}"),
        }
        reads
    };
    let bucket = |s: &FakeShared| {
        let (raw, _) = s
            .map
            .borrow()
            .get(&*store::bucket_key(0))
            .cloned()
            .unwrap_or_default();
        raw
    };
    // (One bucket of eight ways: every key lands in it, in way 0 once the last one expired.)
    let s = FakeShared::new(true);
    create_slots(&s, 8);

    // A slot never answered: written as absent, and the cas its write left is kept.
    assert_eq!(round(&s, "a", 0, "first"), 0, "read for its cas");
    let cas = s
        .map
        .borrow()
        .get(&*store::response_key(0))
        .map(|(_, c)| *c);
    assert_eq!(BucketBytes::parse(bucket(&s), 8).response_cas(0), cas);
    // The slot again: written under the kept cas.
    assert_eq!(round(&s, "b", 1_000_000, "second"), 0, "read for its cas");
    // Someone else wrote the response since (a stale owner, another version): refused, read,
    // written.
    s.raw_set(&store::response_key(0), b"foreign");
    assert_eq!(round(&s, "c", 2_000_000, "third"), 1);
    // A bucket as a version without hints writes it, the ways alone: read, written, and the
    // hint is back.
    let raw = bucket(&s);
    let stripped = raw
        .get(..raw.len() - 4 - 4 * 8)
        .unwrap_or_default()
        .to_vec();
    assert_eq!(
        BucketBytes::parse(stripped.clone(), 8).response_cas(0),
        None
    );
    s.raw_set(&store::bucket_key(0), &stripped);
    assert_eq!(round(&s, "d", 3_000_000, "fourth"), 1);
    assert!(BucketBytes::parse(bucket(&s), 8).response_cas(0).is_some());

    let envoy = FakeShared::new(false);
    create_slots(&envoy, 8);
    assert_eq!(round(&envoy, "a", 0, "first"), 0);
    assert!(!bucket(&envoy).windows(4).any(|w| w == b"RSH1"));
}

/// A completion whose claim was taken over (its lease ran out, another request claimed the slot
/// and completed) changes nothing, on both hosts: on Kong's host its copy of the bucket still
/// names it, and its hinted write of the response is refused, which must send it back to the
/// bucket rather than overwrite the newer answer.
#[test]
fn a_completion_that_lost_its_slot_leaves_the_newer_answer() {
    for kong in [true, false] {
        let s = FakeShared::new(kong);
        create_slots(&s, 8);
        let (slot, mut stale) = match claim(&s, 8, "a", &FP, 1, 0, 1_000) {
            Claim::Claimed { slot, kept, .. } => (slot, kept),
            other => panic!("{other:?}"),
        };
        // "a" ran out of lease; "b" takes its slot and completes.
        let (b_slot, mut kept) = match claim(&s, 8, "b", &FP, 2, 2_000, 1_000) {
            Claim::Claimed { slot, kept, .. } => (slot, kept),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            b_slot, slot,
            "kong={kong}: the expired claim's slot is reused"
        );
        let b_done = done(stored(201, "b"), 1_000_000);
        assert!(store::settle(&s, b_slot, "b", 2, &b_done, &mut kept));
        // "a" completes late, from what its claim kept.
        let a_done = done(stored(201, "a"), 1_000_000);
        assert!(
            !store::settle(&s, slot, "a", 1, &a_done, &mut stale),
            "kong={kong}: not its slot any more"
        );
        match claim(&s, 8, "b", &FP, 3, 3_000, 1_000) {
            Claim::Done { stored, .. } => assert_eq!(stored.body(), b"b", "kong={kong}"),
            other => panic!("kong={kong}: b's answer lost: {other:?}"),
        }
    }
}

/// A bucket with hints reads as the same ways as without them: versions that read only the
/// ways (and stop after the last) see the same records.
#[test]
fn hints_follow_the_ways_and_change_none_of_them() {
    let rec = |key: &str| Record {
        key: key.to_string(),
        facts: FP,
        owner: 7,
        expires_ms: 9,
        state: State::Done,
    };
    let (a, b) = (rec("a"), rec("b"));
    let empty = BucketBytes::parse(Vec::new(), 4);
    let plain = BucketBytes::parse(empty.with(1, Some(&a.view()), None), 4);
    let plain = plain.with(2, Some(&b.view()), None);
    let hinted = BucketBytes::parse(plain.clone(), 4).with(2, Some(&b.view()), Some(5));
    assert_eq!(&hinted[..plain.len()], plain.as_slice());
    let read = BucketBytes::parse(hinted, 4);
    assert_eq!(read.way(1), Some(a.view()));
    assert_eq!(read.way(2), Some(b.view()));
    assert_eq!(
        (0..4).map(|w| read.response_cas(w)).collect::<Vec<_>>(),
        [None, None, Some(5), None]
    );
    // Another way's write keeps the hint; a truncated trailer is no hint.
    let kept = read.with(0, Some(&a.view()), None);
    assert_eq!(BucketBytes::parse(kept.clone(), 4).response_cas(2), Some(5));
    let cut = BucketBytes::parse(kept[..kept.len() - 1].to_vec(), 4);
    assert_eq!(cut.response_cas(2), None);
    assert_eq!(cut.way(0), Some(a.view()));
}

/// The persisted formats byte for byte (index records, buckets, stored responses): gateways of
/// two versions share them, across a Kong reload's workers and on the shared store. The bytes
/// were written by the code before fields were written in place (commit 73d4b88), with keys,
/// names and values on both sides of the short-copy limit (64 bytes).
#[test]
fn persisted_formats_are_byte_for_byte_the_earlier_ones() {
    use sha2::Digest;
    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
    let long_key = format!("{}:{}", "ab".repeat(16), "k".repeat(70));
    let rec = |key: &str, body_len, state| Record {
        key: key.to_string(),
        facts: Facts {
            fingerprint: std::array::from_fn(|i| (i * 7 + 1) as u8),
            body_len,
        },
        owner: 0x0102_0304_0506_0708,
        expires_ms: 1_700_000_000_123,
        state,
    };
    let done = rec(&long_key, Some(1024), State::Done);
    let claim = rec("s:k", None, State::InFlight);
    let bucket = BucketBytes::parse(Vec::new(), 4).with(1, Some(&done.view()), Some(7));
    let bucket2 = BucketBytes::parse(bucket.clone(), 4).with(3, Some(&claim.view()), None);
    let bucket3 = BucketBytes::parse(bucket2.clone(), 4).with(1, None, None);
    let long_value = "v".repeat(65);
    let headers = [
        ("content-type", "application/json"),
        ("x-empty", ""),
        ("x-long", long_value.as_str()),
    ];
    let body: Vec<u8> = (0..200u8).collect();
    let stored = Stored::new(0x1112_1314_1516_1718, 201, &headers, Some(&body));
    let omitted = Stored::new(9, 503, &[("retry-after", "5")], None);
    let empty = Stored::new(9, 204, &[] as &[(&str, &str)], Some(&[]));
    let got = [
        encode(&done),
        encode(&claim),
        bucket,
        bucket2,
        bucket3,
        stored.as_owned_by(0x1112_1314_1516_1718).into_owned(),
        omitted.as_owned_by(9).into_owned(),
        empty.as_owned_by(9).into_owned(),
    ]
    .map(|b| (b.len(), hex(&sha2::Sha256::digest(&b))));
    // (Length and SHA-256 of each, as the earlier code wrote them.)
    let want = [
        (
            168,
            "02c7f8e7840e9aeb38c418cd8046fd2ff706ae3016e99df310672009af2507b9",
        ),
        (
            68,
            "5786e2065b3850bbf834d3eb1404007c6cb43546f74749e8e46ba79f0a0510ac",
        ),
        (
            208,
            "3fdcac20116857ae1f766d1b069b784949629e7ffae8d46aed884b53883bf28a",
        ),
        (
            276,
            "df96af16e3561c52e8be6852c29efceb35a2858f4104a77c32849ce48071e1ed",
        ),
        (
            108,
            "f6722fbfd347f26bb56c75a47b26ff931e70cfe7972f3c7cce4a90a3ac5bd995",
        ),
        (
            353,
            "aaaaa4a9669623e252baaa2c0e5787934f9a67d113988be6b5fe380a17016f44",
        ),
        (
            43,
            "4ca736dfd741afb539e7b213c1fde8d3917db1bb5762ce960c54d98a218a64f3",
        ),
        (
            23,
            "ea49981789491a7fa93e879793b580741fa3bd4bf48953c9b263efc3588d0504",
        ),
    ];
    for (i, ((len, digest), (want_len, want_digest))) in got.iter().zip(want).enumerate() {
        assert_eq!(
            (*len, digest.as_str()),
            (want_len, want_digest),
            "value {i}"
        );
    }
}
