//! The idempotency store shared by every gateway node: Redis, reached over HTTP through Webdis
//! (proxy-wasm has no TCP client). Pure: this module writes the Webdis commands and reads their
//! replies; the host layer sends them with `dispatch_http_call`.
//!
//! One Redis key per idempotency key (`key_prefix` + scope + key), holding a [`value`]: its
//! state and owner up front, then the index record, then (completed) the stored response. Each
//! transition is one atomic server-side step:
//! - **claim**: `SET key value NX PX lease`; when the key is held, the same script returns what
//!   holds it and its remaining lease (`PTTL`), so a 409, a 422 or a replay is one round trip.
//! - **complete / release / extend**: a Lua script that acts only while the key still holds
//!   *this* request's in-flight claim (state and owner compared on the server). A lease that
//!   ran out and was claimed by another request can then never be overwritten by the first
//!   owner finishing late — the race a plain `SET` would lose.
//!
//! Lua scripts go through `EVAL` every time (no `SCRIPT LOAD`): a Redis that restarted or
//! failed over has an empty script cache, and `EVALSHA` would fail exactly then. Replies are
//! read in Webdis's `.raw` format (RESP), which is binary-safe; every script returns one bulk
//! string, which Webdis passes through unchanged.

use crate::bytes::{put, put_slice};
use crate::config::error::ConfigError;
use crate::idempotency::key::Facts;
use crate::idempotency::record::{self, Record, State, Stored};
use crate::idempotency::store::Claim;
use serde::Deserialize;

/// Claim. KEYS[1]: the record; ARGV[1]: the in-flight value; ARGV[2]: the lease, ms; ARGV[3]:
/// the claim's deadline (Unix ms); ARGV[4]: how long a claim is remembered, ms. Returns `C`
/// (claimed), `D` (claimed, in doubt: the key's earlier claim ran out of lease without being
/// completed or released), `H<pttl> <value>` (held) or `T` (the claim reached Redis after its
/// deadline: its sender has given up on it, so it must not land). The memory of a claim is a
/// second key, KEYS[1] with `~` appended, deleted when the claim is completed or released (so
/// one Redis, not a cluster).
pub const CLAIM_SCRIPT: &str = "local t=redis.call('TIME') \
if t[1]*1000+math.floor(t[2]/1000)>tonumber(ARGV[3]) then return 'T' end \
if redis.call('SET',KEYS[1],ARGV[1],'NX','PX',ARGV[2]) then \
local d=redis.call('EXISTS',KEYS[1]..'~') redis.call('SET',KEYS[1]..'~','1','PX',ARGV[4]) \
if d==1 then return 'D' end return 'C' end \
return 'H'..redis.call('PTTL',KEYS[1])..' '..(redis.call('GET',KEYS[1]) or '')";

/// How far a gateway node's clock may be from Redis's for a claim's deadline: a claim that
/// reaches Redis later than `timeout_ms` plus this after it was sent is refused. (A call that
/// timed out may still be queued in Webdis; landing later, it would hold the key for a whole
/// lease for a request that already got its answer.)
pub const CLOCK_SKEW_MS: u64 = 1000;

/// Settle. KEYS[1]: the record; ARGV[1]: the in-flight tag it must still start with; ARGV[2]:
/// `S` (set ARGV[4] for ARGV[3] ms), `D` (delete), `E` (lease at least ARGV[3] ms). `S` and
/// `D` settle the claim, so its memory goes too. Returns `K` (done) or `L` (the claim is no
/// longer this request's).
pub const SETTLE_SCRIPT: &str = "local v=redis.call('GET',KEYS[1]) \
if not v or string.sub(v,1,17)~=ARGV[1] then return 'L' end \
if ARGV[2]~='E' then redis.call('DEL',KEYS[1]..'~') end \
if ARGV[2]=='D' then redis.call('DEL',KEYS[1]) \
elseif ARGV[2]=='E' then if redis.call('PTTL',KEYS[1])<tonumber(ARGV[3]) then \
redis.call('PEXPIRE',KEYS[1],ARGV[3]) end \
else redis.call('SET',KEYS[1],ARGV[4],'PX',ARGV[3]) end return 'K'";

/// `idempotency.redis`: the shared store.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Where Webdis listens: an Envoy cluster name, or on Kong `host:port` (for example a
    /// Kubernetes Service `webdis.infra.svc.cluster.local:7379`).
    pub target: String,
    /// `:authority` of the calls to Webdis.
    #[serde(default = "default_authority")]
    pub authority: String,
    /// Prefix of every Redis key rollsafe writes (one Redis may serve several fleets).
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// The most one call to Webdis may take, ms; past it the store counts as unavailable.
    #[serde(default = "default_timeout")]
    #[cfg_attr(test, schemars(range(min = 10, max = 10000)))]
    pub timeout_ms: u64,
    /// The store is unreachable, slow or answers with an error: `fail-closed` (503 +
    /// `Retry-After` for keyed requests, no upstream contacted) or `fail-open` (run the request
    /// unprotected, once, counted and logged).
    #[serde(default)]
    pub when_unavailable: WhenUnavailable,
    /// Keep completed records in this node's shared data too (`max_entries` of them): a
    /// replay on this node then needs no call to Redis. Requests in flight are never cached.
    #[serde(default = "default_cache")]
    pub cache: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum WhenUnavailable {
    #[default]
    #[serde(alias = "fail_closed")]
    FailClosed,
    #[serde(alias = "fail_open")]
    FailOpen,
}

fn default_authority() -> String {
    "webdis".into()
}
fn default_prefix() -> String {
    "rollsafe:".into()
}
fn default_timeout() -> u64 {
    250
}
fn default_cache() -> bool {
    true
}

/// The compiled section.
#[derive(Debug, Clone)]
pub struct Redis {
    pub target: String,
    pub authority: String,
    pub key_prefix: String,
    pub timeout_ms: u64,
    pub when_unavailable: WhenUnavailable,
    pub cache: bool,
    /// `EVAL/<script>/1/<key_prefix>` of each script, encoded once here rather than per call.
    claim_head: Vec<u8>,
    settle_head: Vec<u8>,
}

/// `EVAL/<script>/1/<key_prefix>`, encoded.
fn eval_head(script: &str, key_prefix: &str) -> Vec<u8> {
    let mut out = vec![0; 8 + 3 * (script.len() + key_prefix.len())];
    let at = &mut 0;
    put_slice(&mut out, at, b"EVAL/");
    percent_encode(&mut out, at, script.as_bytes());
    put_slice(&mut out, at, b"/1/");
    percent_encode(&mut out, at, key_prefix.as_bytes());
    out.truncate(*at);
    out
}

impl Redis {
    pub fn compile(cfg: &RedisConfig, at: &str) -> Result<Redis, ConfigError> {
        let err = |field: &str, reason: String| ConfigError::new(format!("{at}.{field}"), reason);
        if cfg.target.trim().is_empty() {
            return Err(err("target", "must name where Webdis listens".into()));
        }
        if !(10..=10_000).contains(&cfg.timeout_ms) {
            return Err(err(
                "timeout_ms",
                format!("must be 10..=10000, got {}", cfg.timeout_ms),
            ));
        }
        if cfg.authority.is_empty() || cfg.authority.bytes().any(|b| b <= b' ') {
            return Err(err(
                "authority",
                format!("not a valid authority: {:?}", cfg.authority),
            ));
        }
        Ok(Redis {
            target: cfg.target.clone(),
            authority: cfg.authority.clone(),
            key_prefix: cfg.key_prefix.clone(),
            timeout_ms: cfg.timeout_ms,
            when_unavailable: cfg.when_unavailable,
            cache: cfg.cache,
            claim_head: eval_head(CLAIM_SCRIPT, &cfg.key_prefix),
            settle_head: eval_head(SETTLE_SCRIPT, &cfg.key_prefix),
        })
    }

    /// The Webdis command (the body of a `POST /`) that claims `store_key` for `rec`'s owner,
    /// sent at `now`; an unsettled claim is remembered `memory_ms` (a later claim is then in
    /// doubt).
    pub fn claim(
        &self,
        store_key: &str,
        rec: &Record,
        lease_ms: u64,
        memory_ms: u64,
        now: u64,
    ) -> Vec<u8> {
        let value = value(rec, None);
        let lease = lease_ms.to_string();
        let deadline = (now + self.timeout_ms + CLOCK_SKEW_MS).to_string();
        let memory = memory_ms.max(lease_ms).to_string();
        self.eval(
            &self.claim_head,
            store_key,
            &[
                &value,
                lease.as_bytes(),
                deadline.as_bytes(),
                memory.as_bytes(),
            ],
        )
    }

    /// The Webdis command that completes, releases or extends `rec`'s claim (its owner's).
    pub fn settle(&self, store_key: &str, rec: &Record, settle: &Settle<'_>) -> Vec<u8> {
        let tag = tag(State::InFlight, rec.owner);
        match settle {
            Settle::Complete { stored, ttl_ms } => {
                let done = Record {
                    state: State::Done,
                    ..rec.clone()
                };
                let value = value(&done, Some(stored));
                let ttl = ttl_ms.max(&1).to_string();
                self.eval(
                    &self.settle_head,
                    store_key,
                    &[&tag, b"S", ttl.as_bytes(), &value],
                )
            }
            Settle::Release => self.eval(&self.settle_head, store_key, &[&tag, b"D", b"0", b""]),
            Settle::Extend { lease_ms } => {
                let lease = lease_ms.to_string();
                self.eval(
                    &self.settle_head,
                    store_key,
                    &[&tag, b"E", lease.as_bytes(), b""],
                )
            }
        }
    }

    /// `EVAL/<script>/1/<key>/<args…>/0.raw`, every part percent-encoded. The last argument is
    /// a fixed `0` carrying the `.raw` extension (Webdis reads a format from the last part).
    /// (`head`: the script's `EVAL/<script>/1/<key_prefix>`, from `compile`.)
    fn eval(&self, head: &[u8], store_key: &str, args: &[&[u8]]) -> Vec<u8> {
        const TAIL: &[u8] = b"/0.raw";
        let size = store_key.len() + args.iter().map(|a| a.len()).sum::<usize>();
        // (Room for the worst case, zeroed at once, written in place and cut to what was
        // written: each piece appended to a list was a copy through a call on Kong's host.)
        let mut out = vec![0; head.len() + size * 3 + args.len() + TAIL.len()];
        let at = &mut 0;
        put_slice(&mut out, at, head);
        percent_encode(&mut out, at, store_key.as_bytes());
        for a in args {
            put(&mut out, at, [b'/']);
            percent_encode(&mut out, at, a);
        }
        put_slice(&mut out, at, TAIL);
        out.truncate(*at);
        out
    }
}

/// How a claim ends or goes on, as the shared store takes it.
#[derive(Debug, Clone)]
pub enum Settle<'a> {
    Complete {
        stored: &'a Stored,
        ttl_ms: u64,
    },
    Release,
    /// The lease runs at least `lease_ms` from now.
    Extend {
        lease_ms: u64,
    },
}

/// Why the store gave no answer rollsafe can use: the policy (`when_unavailable`) decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

/// Every byte but unreserved ones as `%XX` (a dot too: Webdis reads an extension after one).
///
/// Written into `buf` at `at` (moved past it), which has room for the worst case, three bytes
/// for each, a byte at a time in place: a completion encodes the whole stored response, and
/// appending each run and each escape to a list, a copy through a call out of the VM apiece
/// on Kong's host, was most of rollsafe's own work on a keyed write to the shared store.
/// (Eight bytes checked and stored at once cost more instructions there, not fewer.)
fn percent_encode(buf: &mut [u8], at: &mut usize, bytes: &[u8]) {
    // A table: with range tests, a keyed write on the shared store took 5% more instructions
    // on Envoy (callgrind).
    #[allow(clippy::indexing_slicing)] // evaluated when compiling
    const PLAIN: [bool; 256] = {
        let mut t = [false; 256];
        let mut b = 0;
        while b < 256 {
            let c = b as u8;
            t[b] = c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'~';
            b += 1;
        }
        t
    };
    let hex = |n: u8| if n < 10 { b'0' + n } else { b'A' + n - 10 };
    let mut i = *at;
    for &b in bytes {
        if PLAIN.get(usize::from(b)).copied().unwrap_or(false) {
            if let Some(d) = buf.get_mut(i) {
                *d = b;
            }
            i += 1;
        } else {
            if let Some([p, h, l]) = buf
                .get_mut(i..i + 3)
                .and_then(|s| <&mut [u8; 3]>::try_from(s).ok())
            {
                (*p, *h, *l) = (b'%', hex(b >> 4), hex(b & 15));
            }
            i += 3;
        }
    }
    *at = i;
}

/// State and owner: what the settle script compares (17 bytes).
fn tag(state: State, owner: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(17);
    out.push(match state {
        State::InFlight => b'I',
        State::Done => b'D',
    });
    out.extend_from_slice(format!("{owner:016x}").as_bytes());
    out
}

/// A Redis value: tag, the index record (length-prefixed), and a completed record's response.
pub fn value(rec: &Record, stored: Option<&Stored>) -> Vec<u8> {
    let record = record::encode(rec);
    let mut out = tag(rec.state, rec.owner);
    out.extend_from_slice(&(record.len() as u32).to_be_bytes());
    out.extend_from_slice(&record);
    if let Some(s) = stored {
        out.extend_from_slice(&s.as_owned_by(rec.owner));
    }
    out
}

/// Reads a value back: the record, and the response when it is completed.
pub fn read_value(v: &[u8]) -> Option<(Record, Option<Stored>)> {
    let n = u32::from_be_bytes(v.get(17..21)?.try_into().ok()?) as usize;
    let end = n.checked_add(21)?;
    let rec = record::decode(v.get(21..end)?)?;
    if v.first() != Some(&if rec.state == State::Done { b'D' } else { b'I' }) {
        return None;
    }
    match rec.state {
        State::InFlight => Some((rec, None)),
        State::Done => {
            let stored = Stored::from_bytes(v.get(end..)?.to_vec())?;
            (stored.owner() == rec.owner).then_some((rec, Some(stored)))
        }
    }
}

/// The one bulk string a script returns, from Webdis's answer (HTTP status and body).
fn bulk(status: Option<u16>, body: &[u8]) -> Result<&[u8], Unavailable> {
    match status {
        Some(200) => {}
        Some(s) => return Err(Unavailable(format!("Webdis answered {s}"))),
        None => return Err(Unavailable("no answer from Webdis".into())),
    }
    if let Some(err) = body.strip_prefix(b"-") {
        let text = String::from_utf8_lossy(err.get(..err.len().min(200)).unwrap_or_default());
        return Err(Unavailable(format!("Redis: {}", text.trim_end())));
    }
    let bad = || Unavailable("unreadable reply from Webdis".into());
    let rest = body.strip_prefix(b"$").ok_or_else(bad)?;
    let nl = rest.iter().position(|&b| b == b'\r').ok_or_else(bad)?;
    let len: usize = std::str::from_utf8(rest.get(..nl).ok_or_else(bad)?)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let end = (nl + 2).checked_add(len).ok_or_else(bad)?;
    let data = rest.get(nl + 2..end).ok_or_else(bad)?;
    Ok(data)
}

/// What a claim did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// This request owns the key now (`in_doubt`: its earlier claim ran out of lease unsettled).
    Won { in_doubt: bool },
    /// Another request holds it: [`Claim::InFlight`] or [`Claim::Done`], as the node-local
    /// store reports them.
    Held(Claim),
}

/// What a claim found.
pub fn read_claim(
    status: Option<u16>,
    body: &[u8],
    key: &str,
    facts: &Facts,
) -> Result<Claimed, Unavailable> {
    let data = bulk(status, body)?;
    let bad = || Unavailable("unreadable record in Redis".into());
    match data.split_first() {
        Some((b'C', [])) => Ok(Claimed::Won { in_doubt: false }),
        Some((b'D', [])) => Ok(Claimed::Won { in_doubt: true }),
        Some((b'T', [])) => Err(Unavailable(
            "the claim reached Redis after its deadline (Webdis slow, or this node's clock \
             more than a second from Redis's)"
                .into(),
        )),
        Some((b'H', rest)) => {
            let sp = rest.iter().position(|&b| b == b' ').ok_or_else(bad)?;
            let pttl: i64 = std::str::from_utf8(rest.get(..sp).ok_or_else(bad)?)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad)?;
            let (rec, stored) = read_value(rest.get(sp + 1..).ok_or_else(bad)?).ok_or_else(bad)?;
            if rec.key != key {
                return Err(bad());
            }
            let same = rec.facts.same_as(facts);
            Ok(Claimed::Held(match stored {
                Some(stored) => Claim::Done { same, stored },
                None => Claim::InFlight {
                    same,
                    retry_after_ms: pttl.max(1) as u64,
                },
            }))
        }
        _ => Err(bad()),
    }
}

/// Whether a settle took effect (`false`: the claim is no longer this request's).
pub fn read_settle(status: Option<u16>, body: &[u8]) -> Result<bool, Unavailable> {
    match bulk(status, body)? {
        b"K" => Ok(true),
        b"L" => Ok(false),
        _ => Err(Unavailable("unexpected reply from Webdis".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis() -> Redis {
        Redis::compile(
            &serde_json::from_str(r#"{"target":"webdis"}"#).unwrap(),
            "idempotency.redis",
        )
        .unwrap()
    }

    fn rec(owner: u64) -> Record {
        Record {
            key: "scope:k1".into(),
            facts: Facts {
                fingerprint: crate::idempotency::fingerprint("POST", "/orders", "", b"{}"),
                body_len: Some(2),
            },
            owner,
            expires_ms: 0,
            state: State::InFlight,
        }
    }

    fn decode_percent(s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < s.len() {
            if s[i] == b'%' {
                let hex = std::str::from_utf8(&s[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else {
                out.push(s[i]);
                i += 1;
            }
        }
        out
    }

    /// Splits a command the way Webdis does: on `/`, then decodes each part.
    fn parts(cmd: &[u8]) -> Vec<Vec<u8>> {
        let cmd = cmd.strip_suffix(b".raw").expect(".raw");
        cmd.split(|&b| b == b'/').map(decode_percent).collect()
    }

    #[test]
    fn commands_are_evals_whose_parts_survive_any_bytes() {
        let r = redis();
        let stored = Stored::new(
            rec(7).owner,
            201,
            &[("location", "/orders/1")],
            Some(b"a/b.c%\0\xff\r\n"),
        );
        let cmd = r.settle(
            "scope:k1",
            &rec(7),
            &Settle::Complete {
                stored: &stored,
                ttl_ms: 5000,
            },
        );
        assert!(cmd.iter().all(|b| b.is_ascii_graphic()), "URL-safe");
        let p = parts(&cmd);
        assert_eq!(p[0], b"EVAL");
        assert_eq!(p[1], SETTLE_SCRIPT.as_bytes());
        assert_eq!(p[2], b"1");
        assert_eq!(p[3], b"rollsafe:scope:k1");
        assert_eq!(p[4], b"I0000000000000007");
        assert_eq!(p[5], b"S");
        assert_eq!(p[6], b"5000");
        let (done, back) = read_value(&p[7]).unwrap();
        assert_eq!(done.state, State::Done);
        assert_eq!(back, Some(stored));
        assert_eq!(p[8], b"0");
        let claim = parts(&r.claim("scope:k1", &rec(7), 30_000, 86_400_000, 1_000));
        assert_eq!(claim[1], CLAIM_SCRIPT.as_bytes());
        assert_eq!(read_value(&claim[4]).unwrap(), (rec(7), None));
        assert_eq!(claim[5], b"30000");
        assert_eq!(claim[6], b"2250", "sent at 1000, timeout 250, skew 1000");
    }

    #[test]
    fn every_byte_is_encoded_as_webdis_reads_it_whatever_the_runs_around_it() {
        let reference = |bytes: &[u8]| -> Vec<u8> {
            bytes
                .iter()
                .flat_map(|&b| {
                    if b.is_ascii_alphanumeric() || b"-_~".contains(&b) {
                        vec![b]
                    } else {
                        format!("%{b:02X}").into_bytes()
                    }
                })
                .collect()
        };
        let all: Vec<u8> = (0..=255).collect();
        let mut inputs = vec![all.clone(), all.iter().rev().copied().collect()];
        // Runs on both sides of the 64-byte short-copy limit, between escaped bytes.
        for n in [0, 1, 3, 7, 8, 9, 63, 64, 65, 200] {
            inputs.push([vec![b'a'; n], vec![b'/'], vec![b'Z'; n], vec![0xff]].concat());
        }
        for input in inputs {
            let mut buf = vec![0; 3 * input.len()];
            let at = &mut 0;
            percent_encode(&mut buf, at, &input);
            assert_eq!(&buf[..*at], &reference(&input)[..], "{input:?}");
        }
    }

    fn raw(s: &[u8]) -> Vec<u8> {
        let mut out = format!("${}\r\n", s.len()).into_bytes();
        out.extend_from_slice(s);
        out.extend_from_slice(b"\r\n");
        out
    }

    #[test]
    fn claim_replies_become_the_same_outcomes_as_the_local_store() {
        let facts = rec(1).facts;
        let ok = Some(200);
        assert_eq!(
            read_claim(ok, &raw(b"C"), "scope:k1", &facts),
            Ok(Claimed::Won { in_doubt: false })
        );
        assert_eq!(
            read_claim(ok, &raw(b"D"), "scope:k1", &facts),
            Ok(Claimed::Won { in_doubt: true }),
            "the key's earlier claim ran out of lease unsettled"
        );
        let mut held = b"H1500 ".to_vec();
        held.extend(value(&rec(9), None));
        assert_eq!(
            read_claim(ok, &raw(&held), "scope:k1", &facts),
            Ok(Claimed::Held(Claim::InFlight {
                same: true,
                retry_after_ms: 1500
            }))
        );
        let other = Facts {
            body_len: Some(3),
            ..facts
        };
        assert_eq!(
            read_claim(ok, &raw(&held), "scope:k1", &other),
            Ok(Claimed::Held(Claim::InFlight {
                same: false,
                retry_after_ms: 1500
            }))
        );
        let done = Record {
            state: State::Done,
            ..rec(9)
        };
        let stored = Stored::new::<&str, &str>(done.owner, 200, &[], Some(b"{}"));
        let mut held = b"H86399000 ".to_vec();
        held.extend(value(&done, Some(&stored)));
        assert_eq!(
            read_claim(ok, &raw(&held), "scope:k1", &facts),
            Ok(Claimed::Held(Claim::Done { same: true, stored }))
        );
        // A record under another key (a prefix shared by mistake) is not this key's.
        assert!(read_claim(ok, &raw(&held), "scope:k2", &facts).is_err());
    }

    #[test]
    fn anything_but_a_clean_reply_is_unavailable() {
        let facts = rec(1).facts;
        for (status, body) in [
            (Some(503), b"".to_vec()),
            (None, b"".to_vec()),
            (Some(200), b"-ERR OOM command not allowed\r\n".to_vec()),
            (Some(200), b"{\"EVAL\":\"C\"}".to_vec()),
            (Some(200), b"$5\r\nC\r\n".to_vec()),
            (Some(200), raw(b"Hgarbage")),
            (Some(200), raw(b"H10 \x00\x01")),
            (Some(200), raw(b"T")),
            // A length that overflows (found by fuzz/store_reply).
            (Some(200), b"$18446744073709551615\r\n".to_vec()),
        ] {
            assert!(
                read_claim(status, &body, "scope:k1", &facts).is_err(),
                "{status:?} {body:?}"
            );
        }
        assert_eq!(read_settle(Some(200), &raw(b"K")), Ok(true));
        assert_eq!(read_settle(Some(200), &raw(b"L")), Ok(false));
        assert!(read_settle(Some(200), &raw(b"C")).is_err());
        assert!(read_settle(Some(502), &raw(b"K")).is_err());
    }

    #[test]
    fn config_errors_name_the_field() {
        let bad = |json: &str| {
            Redis::compile(&serde_json::from_str(json).unwrap(), "idempotency.redis")
                .unwrap_err()
                .path
        };
        assert_eq!(bad(r#"{"target":" "}"#), "idempotency.redis.target");
        assert_eq!(
            bad(r#"{"target":"w","timeout_ms":5}"#),
            "idempotency.redis.timeout_ms"
        );
        assert_eq!(
            bad(r#"{"target":"w","authority":"a b"}"#),
            "idempotency.redis.authority"
        );
        let r: RedisConfig =
            serde_json::from_str(r#"{"target":"w","when_unavailable":"fail_open"}"#).unwrap();
        assert_eq!(r.when_unavailable, WhenUnavailable::FailOpen);
    }
}
