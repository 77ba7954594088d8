//! The node-local store: a fixed table of slots in the host's shared data, claimed by
//! compare-and-swap.

use super::key::Facts;
use super::record::{BucketBytes, RecordRef, State, Stored, MAX_WAYS};
use crate::bytes::{equal, put};

/// Slots of one bucket: the records a key may use, read and written as one shared-data value.
pub const WAYS: u32 = MAX_WAYS as u32;
/// Claim attempts when another worker changes a bucket between read and write.
const CAS_TRIES: usize = 8;
/// The shared-data operations the store needs (the host layer maps them to proxy-wasm).
pub trait Shared {
    /// The value and its CAS token.
    fn get(&self, key: &[u8]) -> Option<(Vec<u8>, u32)>;
    /// Writes when the stored CAS still equals `cas`.
    fn set(&self, key: &[u8], value: &[u8], cas: u32) -> Result<(), SetError>;
    /// The cas a value has after a write under `cas`, where the host's rule makes it known
    /// (Kong's host counts each key's writes; Envoy numbers writes across all keys: `None`).
    /// A claim then keeps the bucket it wrote ([`Kept`]), and the claim's next write starts
    /// from it instead of reading the bucket again.
    fn cas_after_write(&self, _cas: u32) -> Option<u32> {
        None
    }
}

/// A bucket as this request's last write left it, and the cas that write gave it. The next
/// write of the same claim is made from it under that cas: when nobody wrote the bucket since,
/// it is the bucket, and one shared-data read is saved (on Kong's host every read walks a tree
/// of all the zone's entries: bench/RESULTS.md); when somebody did, the write is refused and
/// the bucket is read as before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    bytes: Vec<u8>,
    cas: u32,
}

/// Writes whatever is there, where a write must name the current CAS: read it, then write; the
/// cas written under.
fn overwrite_checked<S: Shared + ?Sized>(
    store: &S,
    key: &[u8],
    value: &[u8],
) -> Result<u32, SetError> {
    for _ in 0..CAS_TRIES {
        let cas = store.get(key).map_or(0, |(_, cas)| cas);
        match store.set(key, value, cas) {
            Err(SetError::CasMismatch) => continue,
            other => return other.map(|()| cas),
        }
    }
    Err(SetError::CasMismatch)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    /// Someone else wrote the slot since it was read.
    CasMismatch,
    /// The host refused the write (Kong: the shm zone is full).
    Refused,
}

/// The outcome of claiming a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This request owns the key; run it. `evicted`: the slot held the oldest completed record
    /// of the probe window, which made room. `in_doubt`: the key's earlier claim ran out of
    /// lease unsettled, so an earlier attempt may have executed.
    Claimed {
        slot: u32,
        evicted: bool,
        in_doubt: bool,
        /// The bucket as the claim left it, for the claim's next write (see [`Kept`]).
        kept: Option<Kept>,
    },
    /// Another request with this key is running; `same` says whether it has this fingerprint.
    InFlight { same: bool, retry_after_ms: u64 },
    /// A completed result exists.
    Done { same: bool, stored: Stored },
    /// Every slot this key may use holds a request in flight (or the host refused the write).
    Full,
}

// Two stores answer a claim with a [`Claim`]: the node-local one below (synchronous shared-data
// reads and compare-and-swap) and the shared one (the `shared_store` module, one call to Redis, whose
// answer arrives later). The key's lifecycle (`host::key`) drives either.
//
// The node-local store: a fixed table of slots in the host's shared data, created at configure
// time and claimed by compare-and-swap (exclusive on both hosts). The slots are grouped in
// buckets of [`WAYS`]: a key belongs to one bucket, whose index records are one shared-data
// value, so a claim is one read and one compare-and-swap whatever the bucket holds (each
// shared-data call costs the host a call into the VM: bench/RESULTS.md). When every slot of
// the bucket holds a completed record, the oldest completion is evicted — a request in flight
// never is, so a new key is refused only while its whole bucket is in flight.
// Memory: one bucket value (`WAYS` index records of ~0.1 KiB plus their keys) per `WAYS`
// slots, plus at most one stored response per slot.

/// The bucket of a key: FNV-1a, mixed. (A cryptographic hash buys nothing here: its output is
/// public too, so anyone can search for keys that share a bucket either way; the bucket's
/// eviction of the oldest completion, never a request in flight, is the bound.)
fn bucket_of(key: &str, slots: u32) -> u32 {
    let h = crate::routing::hash_key(key.as_bytes());
    let mut z = h ^ (h >> 33);
    z = z.wrapping_mul(0xff51_afd7_ed55_8ccd);
    z ^= z >> 33;
    (z % u64::from(buckets(slots))) as u32
}

/// Buckets for `slots` slots (at least one).
pub fn buckets(slots: u32) -> u32 {
    slots.div_ceil(WAYS).max(1)
}

/// Creates the buckets that do not exist yet (configure time, every worker).
pub fn create_slots(store: &impl Shared, slots: u32) {
    for b in 0..buckets(slots) {
        let key = bucket_key(b);
        if store.get(&key).is_none() {
            let _ = store.set(&key, &[], 0);
        }
    }
}

/// A bucket as read: its records by way and its CAS token.
struct Bucket {
    index: u32,
    /// Its key in shared data, made once for the read and the write that follows.
    name: KeyName,
    bytes: BucketBytes,
    cas: u32,
}

impl Bucket {
    /// `None` when the bucket was never created (nothing to compare-and-swap against).
    fn read(store: &impl Shared, index: u32) -> Option<Bucket> {
        let name = bucket_key(index);
        let (value, cas) = store.get(&name)?;
        Some(Bucket {
            index,
            name,
            bytes: BucketBytes::parse(value, WAYS as usize),
            cas,
        })
    }

    fn slot(&self, way: usize) -> u32 {
        self.index * WAYS + way as u32
    }

    /// Writes the bucket with `way` holding `rec` (`None`: free), if nobody wrote it since;
    /// what it wrote, kept where the host tells the cas it now has. `response_cas`: the cas the
    /// way's response has after this request wrote it.
    fn write(
        &self,
        store: &impl Shared,
        way: usize,
        rec: Option<&RecordRef<'_>>,
        response_cas: Option<u32>,
    ) -> Result<Option<Kept>, SetError> {
        let bytes = self.bytes.with(way, rec, response_cas);
        store.set(&self.name, &bytes, self.cas)?;
        Ok(store
            .cas_after_write(self.cas)
            .map(|cas| Kept { bytes, cas }))
    }

    /// The bucket `kept` says it is, or else as read now.
    fn kept_or_read(store: &impl Shared, index: u32, kept: Option<Kept>) -> Option<Bucket> {
        match kept {
            Some(Kept { bytes, cas }) => Some(Bucket {
                index,
                name: bucket_key(index),
                bytes: BucketBytes::parse(bytes, WAYS as usize),
                cas,
            }),
            None => Bucket::read(store, index),
        }
    }
}

/// Claims `key` with `facts` in the node-local table, or reports what holds it.
pub fn claim(
    store: &impl Shared,
    slots: u32,
    key: &str,
    facts: &Facts,
    owner: u64,
    now: u64,
    lease_ms: u64,
) -> Claim {
    let index = bucket_of(key, slots);
    for _ in 0..CAS_TRIES {
        let Some(bucket) = Bucket::read(store, index) else {
            return Claim::Full;
        };
        let mut free: Option<usize> = None;
        // The completed record that expires first: the oldest completion (one TTL for all).
        let mut oldest: Option<(usize, u64)> = None;
        let mut found = None;
        // This key's in-flight record whose lease ran out: its holder never settled it (the
        // outcome was unknown, or the gateway died), so the next try is in doubt.
        let mut doubt: Option<usize> = None;
        // (Ways by index, records read in place: a record is a few words, and each move of one
        // is a copy out of the VM on Kong's host.)
        for way in 0..bucket.bytes.ways() {
            match bucket.bytes.way(way) {
                Some(rec) if rec.expires_ms > now && equal(rec.key, key.as_bytes()) => {
                    found = Some(way);
                    break;
                }
                Some(rec) if rec.expires_ms > now => {
                    if rec.state == State::Done && oldest.is_none_or(|(_, e)| rec.expires_ms < e) {
                        oldest = Some((way, rec.expires_ms));
                    }
                }
                Some(rec) if rec.state == State::InFlight && equal(rec.key, key.as_bytes()) => {
                    doubt = Some(way);
                }
                // Empty, expired, or unreadable (not ours): free.
                _ => {
                    if free.is_none() {
                        free = Some(way);
                    }
                }
            }
        }
        if let Some((way, rec)) = found.and_then(|w| Some((w, bucket.bytes.way(w)?))) {
            let same = rec.facts.same_as(facts);
            return match rec.state {
                State::InFlight => Claim::InFlight {
                    same,
                    retry_after_ms: rec.expires_ms.saturating_sub(now),
                },
                State::Done => match read_response(store, bucket.slot(way), rec.owner) {
                    Some(stored) => Claim::Done { same, stored },
                    // Being replaced under us (evicted and reclaimed): try again shortly.
                    None => Claim::InFlight {
                        same,
                        retry_after_ms: 1000,
                    },
                },
            };
        }
        let (way, evicted) = match (doubt, free, oldest) {
            (Some(way), _, _) | (None, Some(way), _) => (way, false),
            (None, None, Some((way, _))) => (way, true),
            (None, None, None) => return Claim::Full,
        };
        let rec = RecordRef {
            key: key.as_bytes(),
            facts: *facts,
            owner,
            expires_ms: now + lease_ms,
            state: State::InFlight,
        };
        match bucket.write(store, way, Some(&rec), None) {
            Ok(kept) => {
                return Claim::Claimed {
                    slot: bucket.slot(way),
                    evicted,
                    in_doubt: doubt.is_some(),
                    kept,
                }
            }
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Refused) => return Claim::Full,
        }
    }
    // The bucket kept changing under us: others are busy with it.
    Claim::Full
}

/// How a claim ends or goes on.
#[derive(Debug, Clone)]
pub enum Settle {
    /// Completed: replayed until `expires_ms` (unless evicted). (The request's facts, its body
    /// length included, are the claim's: a key is claimed once its body is known.)
    Complete { stored: Stored, expires_ms: u64 },
    /// Freed, so the client's next try runs.
    Release,
    /// Still in flight: the lease now runs until `expires_ms`.
    Extend { expires_ms: u64 },
}

/// Applies `settle` to this request's in-flight record in `slot`. Only a record still held by
/// `owner` under `key` is touched (compare-and-swap), so a stale owner changes nothing; returns
/// whether the write happened. A completion writes the response first, then flips the index.
/// `kept`: the bucket as this claim's last write left it (taken; a successful write leaves the
/// next one).
pub fn settle(
    store: &impl Shared,
    slot: u32,
    key: &str,
    owner: u64,
    settle: &Settle,
    kept: &mut Option<Kept>,
) -> bool {
    let (index, way) = (slot / WAYS, (slot % WAYS) as usize);
    // Once the response is written: the cas it now has, where the host makes it known.
    let mut response_cas: Option<Option<u32>> = None;
    for _ in 0..CAS_TRIES {
        // A kept bucket may be stale: only a bucket read now proves the slot still ours.
        let read_now = kept.is_none();
        let Some(bucket) = Bucket::kept_or_read(store, index, kept.take()) else {
            return false;
        };
        let Some(mut rec) = bucket.bytes.way(way) else {
            return false;
        };
        if rec.owner != owner || rec.state != State::InFlight || !equal(rec.key, key.as_bytes()) {
            return false;
        }
        let value = match settle {
            Settle::Complete { stored, expires_ms } => {
                if response_cas.is_none() {
                    let hint = bucket.bytes.response_cas(way);
                    match write_response(store, slot, owner, stored, hint, read_now) {
                        Ok(cas) => response_cas = Some(cas),
                        // Refused under the kept hint: someone wrote the response since,
                        // maybe a newer claim of the slot; read the bucket before overwriting.
                        Err(SetError::CasMismatch) if !read_now => continue,
                        Err(_) => {
                            // Too large for what is left of the zone: free the slot rather than
                            // leave it claimed until the lease runs out.
                            let _ = bucket.write(store, way, None, None);
                            return false;
                        }
                    }
                }
                rec.state = State::Done;
                rec.expires_ms = *expires_ms;
                Some(rec)
            }
            Settle::Release => None,
            Settle::Extend { expires_ms } => {
                rec.expires_ms = rec.expires_ms.max(*expires_ms);
                Some(rec)
            }
        };
        match bucket.write(store, way, value.as_ref(), response_cas.flatten()) {
            Ok(next) => {
                *kept = next;
                return true;
            }
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Refused) => {
                if matches!(settle, Settle::Complete { .. }) {
                    let _ = bucket.write(store, way, None, response_cas.flatten());
                }
                return false;
            }
        }
    }
    false
}

/// The node-local cache of completed records kept beside the shared store: this node's copy
/// of `key`'s completed record, if it holds one. A record still in flight is no answer here
/// (the cache never holds claims: [`cache`] completes the one it makes at once).
pub fn cached(store: &impl Shared, slots: u32, key: &str, now: u64) -> Option<(Facts, Stored)> {
    if slots == 0 {
        return None;
    }
    let bucket = Bucket::read(store, bucket_of(key, slots))?;
    let way = (0..bucket.bytes.ways()).find(|w| {
        bucket
            .bytes
            .way(*w)
            .is_some_and(|r| r.expires_ms > now && equal(r.key, key.as_bytes()))
    })?;
    let rec = bucket.bytes.way(way)?;
    match rec.state {
        State::Done => read_response(store, bucket.slot(way), rec.owner).map(|s| (rec.facts, s)),
        State::InFlight => None,
    }
}

/// Keeps a completed record in the node-local cache (evicting the window's oldest when it must);
/// whether it was written. A key the cache already holds is left as it is.
#[allow(clippy::too_many_arguments)]
pub fn cache(
    store: &impl Shared,
    slots: u32,
    key: &str,
    facts: &Facts,
    owner: u64,
    stored: &Stored,
    now: u64,
    expires_ms: u64,
) -> bool {
    if slots == 0 {
        return false;
    }
    let Claim::Claimed { slot, mut kept, .. } = claim(store, slots, key, facts, owner, now, 1_000)
    else {
        return false;
    };
    let done = Settle::Complete {
        stored: stored.clone(),
        expires_ms,
    };
    settle(store, slot, key, owner, &done, &mut kept)
}

/// Writes the slot's response; the cas it now has, where the host makes it known. `hint`: the
/// cas the bucket says the response has. The write names it (or 0, "absent", for a slot with no
/// hint): on Envoy cas 0 is "no check", so the first write is the only one. A refusal means the
/// response changed since the hint; with `owned` (the bucket was just read and names this
/// claim: the index CAS is what guards the slot) the response is read for its cas and
/// overwritten, else the refusal is returned.
fn write_response(
    store: &impl Shared,
    slot: u32,
    owner: u64,
    stored: &Stored,
    hint: Option<u32>,
    owned: bool,
) -> Result<Option<u32>, SetError> {
    let key = response_key(slot);
    let value = stored.as_owned_by(owner);
    let guess = hint.unwrap_or(0);
    match store.set(&key, &value, guess) {
        Ok(()) => Ok(store.cas_after_write(guess)),
        Err(SetError::CasMismatch) if owned => {
            overwrite_checked(store, &key, &value).map(|cas| store.cas_after_write(cas))
        }
        Err(e) => Err(e),
    }
}

/// The slot's response, when it belongs to `owner`'s completion.
fn read_response(store: &impl Shared, slot: u32, owner: u64) -> Option<Stored> {
    let (value, _) = store.get(&response_key(slot))?;
    Stored::from_bytes(value).filter(|s| s.owner() == owner)
}

/// Shared-data key of bucket `i`'s index records (Kong: zone `rollsafe`).
pub fn bucket_key(i: u32) -> KeyName {
    KeyName::new(b"rollsafe/idem/b", i, b"")
}

/// Shared-data key of slot `i`'s stored response.
pub fn response_key(i: u32) -> KeyName {
    KeyName::new(b"rollsafe/idem/", i, b"/r")
}

/// A shared-data key, `{head}{i}{tail}`, built on the stack: every store call of a keyed
/// request names one, and the allocator is a measurable share of a request's own work in the
/// VM (bench/RESULTS.md, "Kong's host: where the worker's CPU goes").
pub struct KeyName {
    buf: [u8; KeyName::CAP],
    len: u32,
}

impl KeyName {
    /// The longest name: the longer head (15 bytes), a u32 (10 digits) and the tail (2).
    /// (With the length, 32 bytes: a value that small is moved by a few stores, a larger one
    /// by a copy out of the VM on Kong's host.)
    const CAP: usize = 28;

    /// (Head and tail as arrays, stored in place, and the digits written where they go: a
    /// slice of any length is copied by a call out of the VM on Kong's host.)
    fn new<const H: usize, const T: usize>(head: &[u8; H], i: u32, tail: &[u8; T]) -> KeyName {
        let mut name = KeyName {
            buf: [0; KeyName::CAP],
            len: 0,
        };
        let digits = {
            let (mut n, mut d) = (i / 10, 1);
            while n > 0 {
                n /= 10;
                d += 1;
            }
            d
        };
        let end = H + digits + T;
        if end > KeyName::CAP {
            return name;
        }
        let at = &mut 0;
        put(&mut name.buf, at, *head);
        let mut n = i;
        for d in (*at..*at + digits).rev() {
            if let Some(b) = name.buf.get_mut(d) {
                *b = b'0' + (n % 10) as u8;
            }
            n /= 10;
        }
        *at += digits;
        put(&mut name.buf, at, *tail);
        name.len = end as u32;
        name
    }
}

impl std::ops::Deref for KeyName {
    type Target = [u8];

    /// (Bytes, as the host takes a key: read as text, each use was a UTF-8 check.)
    fn deref(&self) -> &[u8] {
        self.buf.get(..self.len as usize).unwrap_or_default()
    }
}
