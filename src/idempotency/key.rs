//! The key header (parsed or refused with the reason) and what tells one request from another
//! under the same key: the caller scope and the request's fingerprint.

use super::sip::Sip13;
use crate::bytes::equal;
use sha2::{Digest, Sha256};
use std::borrow::Cow;

/// Why a key header was refused (400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    Missing,
    Repeated,
    Invalid(&'static str),
}

/// Parses the key: a Structured Field string (`"…"`) or a bare token; 1–255 visible ASCII
/// characters; exactly one header line. Borrowed from the header unless it had escapes.
pub fn parse_key<S: AsRef<str>>(values: &[S]) -> Result<Cow<'_, str>, KeyError> {
    let raw = match values {
        [] => return Err(KeyError::Missing),
        [one] => one.as_ref().trim(),
        _ => return Err(KeyError::Repeated),
    };
    let key = if let Some(inner) = raw.strip_prefix('"') {
        let inner = inner
            .strip_suffix('"')
            .ok_or(KeyError::Invalid("unterminated string"))?;
        // Taken whole when it is plain (every key a client generates); else read a character
        // at a time below, which unescapes it or says what is wrong.
        if inner
            .bytes()
            .all(|b| b != b'\\' && b != b'"' && (b' '..=b'~').contains(&b))
        {
            return checked(Cow::Borrowed(inner));
        }
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
        Cow::Owned(out)
    } else {
        if raw.is_empty() {
            return Err(KeyError::Invalid("empty"));
        }
        if !raw.chars().all(|c| ('!'..='~').contains(&c)) {
            return Err(KeyError::Invalid("not visible ASCII (use a quoted string)"));
        }
        Cow::Borrowed(raw)
    };
    checked(key)
}

/// A key as parsed, if its length is one the store takes.
fn checked(key: Cow<'_, str>) -> Result<Cow<'_, str>, KeyError> {
    if key.is_empty() {
        return Err(KeyError::Invalid("empty"));
    }
    if key.len() > 255 {
        return Err(KeyError::Invalid("longer than 255 characters"));
    }
    Ok(key)
}

/// What the store is keyed by: hex of the first 16 bytes of SHA-256 over the scope parts (a
/// part absent counts as empty), taken as bytes so that credentials that are not UTF-8 still
/// tell callers apart, then `:` and the key.
pub fn store_key<'a>(parts: impl IntoIterator<Item = Option<&'a [u8]>>, key: &str) -> String {
    keyed(&scope_digest(parts), key)
}

/// The first 16 bytes of SHA-256 over the length-prefixed scope parts.
fn scope_digest<'a>(parts: impl IntoIterator<Item = Option<&'a [u8]>>) -> [u8; 16] {
    let mut h = Sha256::new();
    for p in parts {
        let p = p.unwrap_or_default();
        h.update((p.len() as u32).to_be_bytes());
        h.update(p);
    }
    let mut out = [0u8; 16];
    if let Some(head) = h.finalize().get(..16) {
        out.copy_from_slice(head);
    }
    out
}

/// `{hex of digest}:{key}`.
fn keyed(digest: &[u8; 16], key: &str) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = [0u8; 32];
    for (pair, b) in hex.chunks_exact_mut(2).zip(digest) {
        if let [hi, lo] = pair {
            *hi = DIGITS.get(usize::from(b >> 4)).copied().unwrap_or(b'0');
            *lo = DIGITS.get(usize::from(b & 0xf)).copied().unwrap_or(b'0');
        }
    }
    let mut out = String::with_capacity(33 + key.len());
    out.push_str(std::str::from_utf8(&hex).unwrap_or_default());
    out.push(':');
    out.push_str(key);
    out
}

/// The scope digests of the callers seen lately, so that a caller's SHA-256 is computed once
/// rather than on every keyed request (it was the larger part of rollsafe's own instructions
/// on a replay). A caller is recognised by a 128-bit SipHash of its scope parts under keys
/// drawn from the host's entropy when the memo is made: no credential is kept, and nobody
/// can make two callers' tags collide without the keys. A way holds the last caller whose
/// tag falls to it; a caller who finds another there computes the digest as before, so the
/// store key is the same with the memo or without it. Memory: 64 ways of 32 bytes.
pub struct ScopeMemo {
    keys: (u64, u64),
    ways: Vec<([u8; 16], [u8; 16])>,
}

const MEMO_WAYS: usize = 64;

impl ScopeMemo {
    pub fn new() -> ScopeMemo {
        use std::hash::{BuildHasher, Hasher};
        let state = std::hash::RandomState::new();
        let draw = |salt: u64| {
            let mut h = state.build_hasher();
            h.write_u64(salt);
            h.finish()
        };
        ScopeMemo {
            keys: (draw(1), draw(2)),
            ways: Vec::new(),
        }
    }

    /// [`store_key`], the scope's digest taken from the memo when this caller is in it.
    pub fn store_key<'a, I>(&mut self, parts: I, key: &str) -> String
    where
        I: IntoIterator<Item = Option<&'a [u8]>> + Clone,
    {
        let mut sip = Sip13::new(self.keys.0, self.keys.1);
        for p in parts.clone() {
            let p = p.unwrap_or_default();
            sip.write(&(p.len() as u32).to_be_bytes());
            sip.write(p);
        }
        let tag = sip.finish128();
        if self.ways.is_empty() {
            self.ways = vec![([0; 16], [0; 16]); MEMO_WAYS];
        }
        let way = usize::from(tag.first().copied().unwrap_or(0)) % MEMO_WAYS;
        if let Some((t, digest)) = self.ways.get(way) {
            if equal(t, &tag) {
                return keyed(digest, key);
            }
        }
        let digest = scope_digest(parts);
        if let Some(w) = self.ways.get_mut(way) {
            *w = (tag, digest);
        }
        keyed(&digest, key)
    }
}

impl Default for ScopeMemo {
    fn default() -> Self {
        ScopeMemo::new()
    }
}

impl std::fmt::Debug for ScopeMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScopeMemo").finish_non_exhaustive()
    }
}

/// What a record keeps of the request it answers, to tell a repeat from a different request
/// with the same key. Known once the body is whole, which is when a keyed request is decided
/// (before any upstream is contacted: HOSTS.md; on Envoy with the buffer filter after rollsafe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// SipHash-1-3 (128 bits) over method, path and query, the client's body digest
    /// (`Content-Digest` / `Repr-Digest`, RFC 9530) when it sends one, and the whole body,
    /// then 16 zero bytes ([`fingerprint`]). (The caller scope is part of the record's key, so
    /// it is not hashed again here.)
    pub fingerprint: [u8; 32],
    /// The body's length; `None` in records that did not know it.
    pub body_len: Option<u64>,
}

impl Facts {
    /// Whether a request with `other` facts is the same request. An unknown length on either
    /// side compares equal: a chunked body is told apart by method, path and scope alone.
    pub fn same_as(&self, other: &Facts) -> bool {
        equal(&self.fingerprint, &other.fingerprint)
            && match (self.body_len, other.body_len) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// The fingerprint of a request whose body is streamed, not held (over `max_body_bytes`): method,
/// path and query and the client's body digest, marked as such so that it never equals a held
/// body's. Its length is compared apart ([`Facts::body_len`]).
pub fn fingerprint_streamed(method: &str, path: &str, digest: &str) -> [u8; 32] {
    fingerprint_of(method, path, digest, None)
}

/// The fingerprint of a request whose body is held whole: method, path and query, the client's
/// body digest, the body's length and its bytes.
///
/// SipHash-1-3 with 128 bits, not SHA-256: SHA-256 was the larger part of rollsafe's own
/// instructions on a keyed write (bench/RESULTS.md, "Where the instructions go"), and a
/// fingerprint only tells one request under a key from another within the key's scope:
/// whoever could make two requests collide must know the first one, and knowing it already
/// replays it. (The scope, which may hash credentials, stays SHA-256: [`store_key`].) The
/// record keeps 32 bytes, the last 16 zero, so that records of earlier versions, whose
/// fingerprint was a SHA-256, still read as records: a repeat of one gets 422, never a second
/// execution.
pub fn fingerprint(method: &str, path: &str, digest: &str, body: &[u8]) -> [u8; 32] {
    fingerprint_of(method, path, digest, Some(body))
}

fn fingerprint_of(method: &str, path: &str, digest: &str, body: Option<&[u8]>) -> [u8; 32] {
    let mut sip = Sip13::new(0x726f_6c6c_7361_6665, 0x626f_6479_2d66_7031);
    // Length-prefixed parts, so that parts cannot blur; a streamed body's length field is
    // u64::MAX, which no held body has.
    for part in [method.as_bytes(), path.as_bytes(), digest.as_bytes()] {
        sip.write(&(part.len() as u32).to_be_bytes());
        sip.write(part);
    }
    match body {
        Some(body) => {
            sip.write(&(body.len() as u64).to_be_bytes());
            sip.write(body);
        }
        None => sip.write(&u64::MAX.to_be_bytes()),
    }
    let mut out = [0u8; 32];
    if let Some(head) = out.get_mut(..16) {
        head.copy_from_slice(&sip.finish128());
    }
    out
}
