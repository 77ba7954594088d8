//! Idempotency keys (IETF draft-ietf-httpapi-idempotency-key-header, Stripe-style replay):
//! key parsing, request fingerprints, and the node-local store's claim protocol. Pure: time is
//! an argument and shared data is a trait the host layer implements with proxy-wasm's. (The
//! store shared by several gateway nodes is `crate::shared_store`; both answer with a [`Claim`].)
//!
//! The node-local store is a fixed table of `max_entries` slots whose keys are created at
//! configure time (and, beside the shared store, caches its completed records).
//! A claim is a compare-and-swap on an existing slot — exclusive on both hosts (HOSTS.md: on
//! Envoy "absent, so set" lets two workers win). A request key maps to a short probe sequence
//! of slots; the full key is stored inside the record and compared, since Kong's shm tells keys
//! apart by CRC32 only. Memory is bounded by the slot count and the largest stored response.

use crate::config::ConfigError;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Slots probed for one key.
const PROBE: usize = 8;
/// Claim attempts when another worker changes a slot between read and write.
const CAS_TRIES: usize = 4;
const MAGIC: &[u8; 4] = b"RSI3";
const RESPONSE_MAGIC: &[u8; 4] = b"RSR1";

/// `idempotency` config section.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// Request header carrying the key.
    #[serde(default = "default_header")]
    #[cfg_attr(test, schemars(regex(pattern = r"^[A-Za-z0-9_-]+$")))]
    pub header: String,
    /// Methods the key applies to.
    #[serde(default = "default_methods")]
    pub methods: Vec<crate::method::Method>,
    /// A request of those methods without a key gets 400.
    #[serde(default)]
    pub required: bool,
    /// How long a completed result is replayed, seconds.
    #[serde(default = "default_ttl")]
    #[cfg_attr(test, schemars(range(min = 1, max = 604800)))]
    pub ttl_s: u64,
    /// How long a claim in flight holds the key before another try may run, ms.
    #[serde(default = "default_lease")]
    #[cfg_attr(test, schemars(range(min = 100, max = 600000)))]
    pub lease_ms: u64,
    /// What separates callers: `route` and `header:<name>` (hashed). Default: the route and the
    /// `Authorization` header, so one client cannot read another's result.
    #[serde(default = "default_scope")]
    #[cfg_attr(
        test,
        schemars(inner(regex(pattern = r"^(route|header:[!#$%&'*+.^_`|~0-9A-Za-z-]+)$")))
    )]
    pub scope: Vec<String>,
    /// Largest response body stored for replay, bytes.
    #[serde(default = "default_max_response")]
    #[cfg_attr(test, schemars(range(max = 1048576)))]
    pub max_response_bytes: u64,
    /// Records kept per node (slots created at configure time).
    #[serde(default = "default_max_entries")]
    #[cfg_attr(test, schemars(range(min = 16, max = 1000000)))]
    pub max_entries: u32,
    /// Statuses whose results are stored and replayed: classes (`2xx`) or exact codes.
    #[serde(default = "default_store_statuses")]
    #[cfg_attr(test, schemars(inner(regex(pattern = r"^([1-5]xx|[1-5][0-9][0-9])$"))))]
    pub store_statuses: Vec<String>,
    /// Statuses never stored even when their class is (the client should simply retry).
    #[serde(default = "default_skip_statuses")]
    pub skip_statuses: Vec<u16>,
    /// Response headers replayed besides the defaults (content-type, location, etag,
    /// cache-control).
    #[serde(default)]
    pub replay_headers: Vec<String>,
    /// The store has no free slot: `reject` (503 + `Retry-After`) or `pass-through` (forward the
    /// request unprotected). Logged and counted either way.
    #[serde(default)]
    pub when_full: WhenFull,
    /// Where records live: `local` (this node's shared data; every gateway node on its own)
    /// or `redis` (one store for the whole fleet, through Webdis; see `redis`).
    #[serde(default)]
    pub store: StoreKind,
    /// The shared store, with `store: redis`. `max_entries` then sizes this node's cache of
    /// completed records.
    #[serde(default)]
    pub redis: Option<crate::shared_store::RedisConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    #[default]
    Local,
    Redis,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    #[default]
    Reject,
    PassThrough,
}

fn default_header() -> String {
    "Idempotency-Key".into()
}
fn default_methods() -> Vec<crate::method::Method> {
    use crate::method::Method;
    vec![Method::POST, Method::PATCH]
}
fn default_ttl() -> u64 {
    86_400
}
fn default_lease() -> u64 {
    30_000
}
fn default_scope() -> Vec<String> {
    vec!["route".into(), "header:authorization".into()]
}
fn default_max_response() -> u64 {
    64 * 1024
}
fn default_max_entries() -> u32 {
    16_384
}
fn default_store_statuses() -> Vec<String> {
    vec!["2xx".into(), "4xx".into()]
}
fn default_skip_statuses() -> Vec<u16> {
    vec![408, 409, 425, 429]
}

/// Where a part of the caller scope comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopePart {
    Route,
    Header(String),
}

/// The compiled section.
#[derive(Debug)]
pub struct Policy {
    pub header: String,
    methods: u8,
    pub required: bool,
    pub ttl_ms: u64,
    pub lease_ms: u64,
    pub scope: Vec<ScopePart>,
    /// The scope is the default one (the host may add to it: Kong's consumers).
    pub default_scope: bool,
    pub max_response_bytes: usize,
    pub slots: u32,
    store_classes: Vec<u16>,
    store_exact: Vec<u16>,
    skip: Vec<u16>,
    pub replay_headers: Vec<String>,
    pub when_full: WhenFull,
    /// The route's name when the host names none for a request (Envoy: the filter's root
    /// id), read once at configure time.
    pub route_fallback: Option<String>,
    /// The fleet-wide store (`store: redis`); `None`: the node-local one.
    pub shared: Option<crate::shared_store::Redis>,
}

impl Policy {
    pub fn compile(cfg: &IdempotencyConfig, at: &str) -> Result<Policy, ConfigError> {
        let err = |field: &str, reason: String| ConfigError::new(format!("{at}.{field}"), reason);
        let header = cfg.header.to_ascii_lowercase();
        if header.is_empty()
            || !header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(err(
                "header",
                format!("not a valid header name: {:?}", cfg.header),
            ));
        }
        if !(1..=604_800).contains(&cfg.ttl_s) {
            return Err(err(
                "ttl_s",
                format!("must be 1..=604800, got {}", cfg.ttl_s),
            ));
        }
        if !(100..=600_000).contains(&cfg.lease_ms) {
            return Err(err(
                "lease_ms",
                format!("must be 100..=600000, got {}", cfg.lease_ms),
            ));
        }
        if cfg.max_response_bytes > 1 << 20 {
            let got = cfg.max_response_bytes;
            return Err(err(
                "max_response_bytes",
                format!("must be 0..=1048576, got {got}"),
            ));
        }
        if !(16..=1_000_000).contains(&cfg.max_entries) {
            return Err(err(
                "max_entries",
                format!("must be 16..=1000000, got {}", cfg.max_entries),
            ));
        }
        let mut scope = Vec::new();
        for (i, s) in cfg.scope.iter().enumerate() {
            scope.push(match s.split_once(':') {
                None if s == "route" => ScopePart::Route,
                Some(("header", name)) if !name.is_empty() => {
                    ScopePart::Header(name.to_ascii_lowercase())
                }
                _ => {
                    return Err(err(
                        &format!("scope[{i}]"),
                        format!("must be \"route\" or \"header:<name>\", got {s:?}"),
                    ))
                }
            });
        }
        let shared = match (cfg.store, &cfg.redis) {
            (StoreKind::Redis, Some(r)) => Some(crate::shared_store::Redis::compile(
                r,
                &format!("{at}.redis"),
            )?),
            (StoreKind::Redis, None) => {
                return Err(err(
                    "redis",
                    "required with store: redis (at least its target: where Webdis listens)".into(),
                ))
            }
            (StoreKind::Local, Some(_)) => {
                return Err(err(
                    "store",
                    "must be redis when a redis section is given (it is local by default)".into(),
                ))
            }
            (StoreKind::Local, None) => None,
        };
        // Without the cache, the shared store keeps nothing on the node.
        let slots = match &shared {
            Some(r) if !r.cache => 0,
            _ => cfg.max_entries,
        };
        let (mut store_classes, mut store_exact) = (Vec::new(), Vec::new());
        for (i, s) in cfg.store_statuses.iter().enumerate() {
            let bad = || {
                err(
                    &format!("store_statuses[{i}]"),
                    format!("must be like \"2xx\" or \"201\", got {s:?}"),
                )
            };
            match s.strip_suffix("xx") {
                Some(c) => store_classes.push(
                    c.parse::<u16>()
                        .ok()
                        .filter(|c| (1..=5).contains(c))
                        .ok_or_else(bad)?,
                ),
                None => store_exact.push(
                    s.parse::<u16>()
                        .ok()
                        .filter(|c| (100..=599).contains(c))
                        .ok_or_else(bad)?,
                ),
            }
        }
        Ok(Policy {
            header,
            methods: crate::method::set(&cfg.methods),
            required: cfg.required,
            ttl_ms: cfg.ttl_s * 1000,
            lease_ms: cfg.lease_ms,
            scope,
            default_scope: cfg.scope == default_scope(),
            max_response_bytes: cfg.max_response_bytes as usize,
            slots,
            store_classes,
            store_exact,
            skip: cfg.skip_statuses.clone(),
            replay_headers: ["content-type", "location", "etag", "cache-control"]
                .iter()
                .map(|s| s.to_string())
                .chain(cfg.replay_headers.iter().map(|h| h.to_ascii_lowercase()))
                .collect(),
            when_full: cfg.when_full,
            route_fallback: None,
            shared,
        })
    }

    pub fn applies_to(&self, method: &str) -> bool {
        crate::method::mask(method) & self.methods != 0
    }

    /// Whether a final answer with this status completes the record (else it is released).
    pub fn stores(&self, status: u16) -> bool {
        !self.skip.contains(&status)
            && (self.store_exact.contains(&status) || self.store_classes.contains(&(status / 100)))
    }

    /// Shared-data key of slot `i`'s index record (Kong: zone `rollsafe`).
    pub fn slot_key(i: u32) -> String {
        format!("rollsafe/idem/{i}")
    }

    /// Shared-data key of slot `i`'s stored response.
    pub fn response_key(i: u32) -> String {
        format!("rollsafe/idem/{i}/r")
    }
}

/// Why a key header was refused (400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    Missing,
    Repeated,
    Invalid(&'static str),
}

/// Parses the key: a Structured Field string (`"…"`) or a bare token; 1–255 visible ASCII
/// characters; exactly one header line.
pub fn parse_key<S: AsRef<str>>(values: &[S]) -> Result<String, KeyError> {
    let raw = match values {
        [] => return Err(KeyError::Missing),
        [one] => one.as_ref().trim(),
        _ => return Err(KeyError::Repeated),
    };
    let key = if let Some(inner) = raw.strip_prefix('"') {
        let inner = inner
            .strip_suffix('"')
            .ok_or(KeyError::Invalid("unterminated string"))?;
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(e @ ('"' | '\\')) => out.push(e),
                    _ => return Err(KeyError::Invalid("bad escape in string")),
                },
                '"' => return Err(KeyError::Invalid("unescaped quote in string")),
                c if (' '..='~').contains(&c) => out.push(c),
                _ => return Err(KeyError::Invalid("not printable ASCII")),
            }
        }
        out
    } else {
        if raw.is_empty() {
            return Err(KeyError::Invalid("empty"));
        }
        if !raw.chars().all(|c| ('!'..='~').contains(&c)) {
            return Err(KeyError::Invalid("not visible ASCII (use a quoted string)"));
        }
        raw.to_string()
    };
    if key.is_empty() {
        return Err(KeyError::Invalid("empty"));
    }
    if key.len() > 255 {
        return Err(KeyError::Invalid("longer than 255 characters"));
    }
    Ok(key)
}

/// Hex of the first 16 bytes of SHA-256 over the scope parts (a part absent counts as empty),
/// taken as bytes: credentials that are not UTF-8 still tell callers apart.
pub fn scope_id(parts: &[Option<&[u8]>]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        let p = p.unwrap_or_default();
        h.update((p.len() as u32).to_be_bytes());
        h.update(p);
    }
    let digest = h.finalize();
    hex(digest.get(..16).unwrap_or_default())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        for nibble in [b >> 4, b & 0xf] {
            out.push(char::from(
                DIGITS.get(usize::from(nibble)).copied().unwrap_or(b'0'),
            ));
        }
    }
    out
}

/// What a record keeps of the request it answers, to tell a repeat from a different request
/// with the same key. Everything here is known from the request headers, so a duplicate, a
/// replay and a 422 are decided before any upstream is contacted (on Envoy the route's upstream
/// request starts as soon as the headers go on, so a body-time decision would always reach it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// SHA-256 over method, path and query, and the client's body digest (`Content-Digest` /
    /// `Repr-Digest`, RFC 9530) when it sends one. (The caller scope is part of the record's
    /// key, so it is not hashed again here.)
    pub fingerprint: [u8; 32],
    /// The declared body length (`Content-Length`); `None` when the body is chunked.
    pub body_len: Option<u64>,
}

impl Facts {
    /// Whether a request with `other` facts is the same request. An unknown length on either
    /// side compares equal: a chunked body is told apart by method, path and scope alone.
    pub fn same_as(&self, other: &Facts) -> bool {
        self.fingerprint == other.fingerprint
            && match (self.body_len, other.body_len) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// SHA-256 over method, path and query, scope and body digest (length-prefixed, so parts can't
/// blur).
pub fn fingerprint(method: &str, path: &str, digest: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [method.as_bytes(), path.as_bytes(), digest.as_bytes()] {
        h.update((part.len() as u32).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// A stored response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body was larger than `max_response_bytes` and was not kept.
    pub body_omitted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    InFlight,
    /// Completed: the response is kept apart, under [`Policy::response_key`] of the slot,
    /// tagged with the claim's owner.
    Done,
}

/// One slot's index record: small, so a claim that reads a probe window stays cheap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub facts: Facts,
    /// The claim's owner (a random token per request): only it may complete, release or extend
    /// the claim, so a holder whose lease ran out can never overwrite a newer claim.
    pub owner: u64,
    pub expires_ms: u64,
    pub state: State,
}

/// The shared-data operations the store needs (the host layer maps them to proxy-wasm).
pub trait Shared {
    /// The value and its CAS token.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes when the stored CAS still equals `cas`.
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError>;
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
    /// of the probe window, which made room.
    Claimed { slot: u32, evicted: bool },
    /// Another request with this key is running; `same` says whether it has this fingerprint.
    InFlight { same: bool, retry_after_ms: u64 },
    /// A completed result exists.
    Done { same: bool, stored: Stored },
    /// Every slot this key may use holds a request in flight (or the host refused the write).
    Full,
}

// Two stores answer a claim with a [`Claim`]: the node-local one below (synchronous shared-data
// reads and compare-and-swap) and the shared one (`crate::shared_store`, one call to Redis, whose
// answer arrives later). The key's lifecycle (`host::key`) drives either.
//
// The node-local store: a fixed table of slots in the host's shared data, created at configure
// time and claimed by compare-and-swap (exclusive on both hosts). A key may use the slots of its
// probe window; when all of them hold completed records, the oldest completion is evicted — a
// request in flight never is, so a new key is refused only while its whole window is in flight.
// Memory: `slots` index records (key, facts, times; ~0.4 KiB) plus at most one stored response
// per slot.

/// Where a key's probe window starts: FNV-1a, mixed. (A cryptographic hash buys nothing here:
/// its output is public too, so anyone can search for keys that share a window either way;
/// the window's eviction of the oldest completion, never a request in flight, is the bound.)
fn probe_start(key: &str, slots: u32) -> u32 {
    let h = crate::routing::hash_key(key.as_bytes());
    let mut z = h ^ (h >> 33);
    z = z.wrapping_mul(0xff51_afd7_ed55_8ccd);
    z ^= z >> 33;
    (z % u64::from(slots.max(1))) as u32
}

/// Creates the slots that do not exist yet (configure time, every worker).
pub fn create_slots(store: &impl Shared, slots: u32) {
    for i in 0..slots {
        let key = Policy::slot_key(i);
        if store.get(&key).is_none() {
            let _ = store.set(&key, &[], 0);
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
    let start = probe_start(key, slots);
    for _ in 0..CAS_TRIES {
        let mut free: Option<(u32, u32)> = None;
        // The completed record that expires first: the oldest completion (one TTL for all).
        let mut oldest: Option<(u32, u32, u64)> = None;
        let mut found = None;
        for i in 0..PROBE.min(slots as usize) as u32 {
            let slot = (start + i) % slots;
            let Some((value, cas)) = store.get(&Policy::slot_key(slot)) else {
                continue;
            };
            match decode(&value) {
                Some(rec) if rec.key == key && rec.expires_ms > now => {
                    found = Some((slot, rec));
                    break;
                }
                Some(rec) if rec.expires_ms > now => {
                    if rec.state == State::Done && oldest.is_none_or(|(_, _, e)| rec.expires_ms < e)
                    {
                        oldest = Some((slot, cas, rec.expires_ms));
                    }
                }
                // Empty, expired, or unreadable (not ours): free.
                _ => {
                    if free.is_none() {
                        free = Some((slot, cas));
                    }
                }
            }
        }
        if let Some((slot, rec)) = found {
            let same = rec.facts.same_as(facts);
            return match rec.state {
                State::InFlight => Claim::InFlight {
                    same,
                    retry_after_ms: rec.expires_ms.saturating_sub(now),
                },
                State::Done => match read_response(store, slot, rec.owner) {
                    Some(stored) => Claim::Done { same, stored },
                    // Being replaced under us (evicted and reclaimed): try again shortly.
                    None => Claim::InFlight {
                        same,
                        retry_after_ms: 1000,
                    },
                },
            };
        }
        let (slot, cas, evicted) = match (free, oldest) {
            (Some((slot, cas)), _) => (slot, cas, false),
            (None, Some((slot, cas, _))) => (slot, cas, true),
            (None, None) => return Claim::Full,
        };
        let rec = Record {
            key: key.to_string(),
            facts: *facts,
            owner,
            expires_ms: now + lease_ms,
            state: State::InFlight,
        };
        match store.set(&Policy::slot_key(slot), &encode(&rec), cas) {
            Ok(()) => return Claim::Claimed { slot, evicted },
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Refused) => return Claim::Full,
        }
    }
    // The slots kept changing under us: someone else is busy with them.
    Claim::Full
}

/// How a claim ends or goes on.
#[derive(Debug, Clone)]
pub enum Settle {
    /// Completed: replayed until `expires_ms` (unless evicted). `body_len` is the length
    /// actually received (known now even for a chunked body).
    Complete {
        stored: Stored,
        expires_ms: u64,
        body_len: Option<u64>,
    },
    /// Freed, so the client's next try runs.
    Release,
    /// Still in flight: the lease now runs until `expires_ms`.
    Extend { expires_ms: u64 },
}

/// Applies `settle` to this request's in-flight record in `slot`. Only a record still held by
/// `owner` under `key` is touched (compare-and-swap), so a stale owner changes nothing; returns
/// whether the write happened. A completion writes the response first, then flips the index.
pub fn settle(store: &impl Shared, slot: u32, key: &str, owner: u64, settle: &Settle) -> bool {
    let slot_key = Policy::slot_key(slot);
    let mut response_written = false;
    for _ in 0..CAS_TRIES {
        let Some((value, cas)) = store.get(&slot_key) else {
            return false;
        };
        let Some(mut rec) = decode(&value) else {
            return false;
        };
        if rec.key != key || rec.owner != owner || rec.state != State::InFlight {
            return false;
        }
        let value = match settle {
            Settle::Complete {
                stored,
                expires_ms,
                body_len,
            } => {
                if !response_written {
                    if write_response(store, slot, owner, stored).is_err() {
                        // Too large for what is left of the zone: free the slot rather than
                        // leave it claimed until the lease runs out.
                        let _ = store.set(&slot_key, &[], cas);
                        return false;
                    }
                    response_written = true;
                }
                rec.state = State::Done;
                rec.expires_ms = *expires_ms;
                if body_len.is_some() {
                    rec.facts.body_len = *body_len;
                }
                encode(&rec)
            }
            Settle::Release => Vec::new(),
            Settle::Extend { expires_ms } => {
                rec.expires_ms = rec.expires_ms.max(*expires_ms);
                encode(&rec)
            }
        };
        match store.set(&slot_key, &value, cas) {
            Ok(()) => return true,
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Refused) => {
                if matches!(settle, Settle::Complete { .. }) {
                    let _ = store.set(&slot_key, &[], cas);
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
    let start = probe_start(key, slots);
    for i in 0..PROBE.min(slots as usize) as u32 {
        let slot = (start + i) % slots;
        let Some((value, _)) = store.get(&Policy::slot_key(slot)) else {
            continue;
        };
        if let Some(rec) = decode(&value).filter(|r| r.key == key && r.expires_ms > now) {
            return match rec.state {
                State::Done => read_response(store, slot, rec.owner).map(|s| (rec.facts, s)),
                State::InFlight => None,
            };
        }
    }
    None
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
    let Claim::Claimed { slot, .. } = claim(store, slots, key, facts, owner, now, 1_000) else {
        return false;
    };
    let done = Settle::Complete {
        stored: stored.clone(),
        expires_ms,
        body_len: facts.body_len,
    };
    settle(store, slot, key, owner, &done)
}

/// Writes the slot's response, whatever was there (the index CAS is what guards the slot).
fn write_response(
    store: &impl Shared,
    slot: u32,
    owner: u64,
    stored: &Stored,
) -> Result<(), SetError> {
    let key = Policy::response_key(slot);
    let value = encode_response(owner, stored);
    for _ in 0..CAS_TRIES {
        let cas = store.get(&key).map_or(0, |(_, cas)| cas);
        match store.set(&key, &value, cas) {
            Err(SetError::CasMismatch) => continue,
            other => return other,
        }
    }
    Err(SetError::CasMismatch)
}

/// The slot's response, when it belongs to `owner`'s completion.
fn read_response(store: &impl Shared, slot: u32, owner: u64) -> Option<Stored> {
    let (value, _) = store.get(&Policy::response_key(slot))?;
    let (tag, stored) = decode_response(&value)?;
    (tag == owner).then_some(stored)
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// The index record as bytes: `RSI3`, then fixed fields and the key.
pub fn encode(rec: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + rec.key.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&rec.expires_ms.to_be_bytes());
    out.extend_from_slice(&rec.owner.to_be_bytes());
    out.extend_from_slice(&rec.facts.fingerprint);
    out.extend_from_slice(&rec.facts.body_len.map_or(u64::MAX, |n| n).to_be_bytes());
    out.push(match rec.state {
        State::InFlight => 0,
        State::Done => 1,
    });
    put_str(&mut out, rec.key.as_bytes());
    out
}

/// A stored response as bytes: `RSR1`, the owner tag, status, flags, headers, body.
pub fn encode_response(owner: u64, s: &Stored) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + s.body.len());
    out.extend_from_slice(RESPONSE_MAGIC);
    out.extend_from_slice(&owner.to_be_bytes());
    out.extend_from_slice(&s.status.to_be_bytes());
    out.push(u8::from(s.body_omitted));
    out.extend_from_slice(&(s.headers.len() as u32).to_be_bytes());
    for (k, v) in &s.headers {
        put_str(&mut out, k.as_bytes());
        put_str(&mut out, v.as_bytes());
    }
    put_str(&mut out, &s.body);
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
}

/// Decodes an index record; `None` for an empty slot or anything that is not a whole record.
pub fn decode(value: &[u8]) -> Option<Record> {
    let mut r = Reader(value);
    if r.take(4)? != MAGIC {
        return None;
    }
    let expires_ms = r.u64()?;
    let owner = r.u64()?;
    let fingerprint: [u8; 32] = r.take(32)?.try_into().ok()?;
    let body_len = Some(r.u64()?).filter(|n| *n != u64::MAX);
    let state = match r.u8()? {
        0 => State::InFlight,
        1 => State::Done,
        _ => return None,
    };
    let key = r.string()?;
    if !r.0.is_empty() {
        return None;
    }
    Some(Record {
        key,
        facts: Facts {
            fingerprint,
            body_len,
        },
        owner,
        expires_ms,
        state,
    })
}

/// Decodes a stored response and its owner tag.
pub fn decode_response(value: &[u8]) -> Option<(u64, Stored)> {
    let mut r = Reader(value);
    if r.take(4)? != RESPONSE_MAGIC {
        return None;
    }
    let owner = r.u64()?;
    let status = r.u16()?;
    let body_omitted = r.u8()? != 0;
    let n = r.u32()? as usize;
    let mut headers = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        headers.push((r.string()?, r.string()?));
    }
    let body = r.bytes()?.to_vec();
    if !r.0.is_empty() {
        return None;
    }
    Some((
        owner,
        Stored {
            status,
            headers,
            body,
            body_omitted,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// Shared data with each host's CAS rules (HOSTS.md): on Kong a write succeeds only when the
    /// given cas equals the stored one (absent = 0); on Envoy cas 0 means "no check" and an
    /// absent key is inserted whatever the cas.
    type Interleaved = Box<dyn FnOnce(&FakeShared)>;

    struct FakeShared {
        kong: bool,
        map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        /// Runs once just before the next write: another worker's interleaved write.
        interleave: RefCell<Option<Interleaved>>,
        capacity: usize,
    }

    impl FakeShared {
        fn new(kong: bool) -> Self {
            FakeShared {
                kong,
                map: RefCell::default(),
                interleave: RefCell::new(None),
                capacity: usize::MAX,
            }
        }
        fn raw_set(&self, key: &str, value: &[u8]) {
            let mut m = self.map.borrow_mut();
            let cas = m.get(key).map_or(0, |(_, c)| *c) + 1;
            m.insert(key.to_string(), (value.to_vec(), cas));
        }
    }

    impl Shared for FakeShared {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.map.borrow().get(key).cloned()
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
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
    }

    fn stored(status: u16, body: &str) -> Stored {
        Stored {
            status,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: body.into(),
            body_omitted: false,
        }
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
        Settle::Complete {
            stored,
            expires_ms,
            body_len: None,
        }
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
            if let Claim::Claimed { slot, evicted } =
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
        let Claim::Claimed { evicted: true, .. } = claim(&s, 16, "late", &FP, OWNER, 1, 60_000)
        else {
            panic!("a completed record makes room")
        };
        let oldest = &held[0].1;
        assert!(
            matches!(
                claim(&s, 16, oldest, &FP, OWNER, 2, 60_000),
                Claim::Claimed { .. }
            ),
            "the oldest completion was the one evicted"
        );
        assert!(matches!(
            claim(&s, 16, &held[15].1, &FP, OWNER, 2, 60_000),
            Claim::Done { .. }
        ));
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
            let Claim::Claimed { slot, evicted: e } = claim(&s, slots, &key, &FP, i, i, 30_000)
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
            assert_eq!(got.body, format!("{{\"id\":{i}}}").into_bytes());
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
        s.raw_set(&Policy::slot_key((slot + 1) % 16), b"garbage");
        assert!(matches!(
            claim(&s, 16, "b", &FP, OWNER, 0, 60_000),
            Claim::Claimed { .. }
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
        let resp = encode_response(OWNER, &stored(201, "b"));
        assert_eq!(decode_response(&resp), Some((OWNER, stored(201, "b"))));
        for cut in 0..resp.len() {
            assert_eq!(decode_response(&resp[..cut]), None);
        }
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
        ] {
            assert!(
                matches!(parse_key(&[bad]), Err(KeyError::Invalid(_))),
                "{bad:?}"
            );
        }
        assert!(parse_key(&[&"k".repeat(256)]).is_err());
    }

    #[test]
    fn fingerprint_covers_method_path_and_digest_and_facts_compare_the_length() {
        let base = fingerprint("POST", "/o?x=1", "");
        assert_ne!(base, fingerprint("PATCH", "/o?x=1", ""));
        assert_ne!(base, fingerprint("POST", "/o?x=2", ""));
        assert_ne!(base, fingerprint("POST", "/o?x=1", "sha-256=:x:"));
        assert_ne!(
            fingerprint("POST", "/ab", ""),
            fingerprint("POST", "/a", "b")
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
}
