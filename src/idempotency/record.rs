//! What a record holds, and its bytes in shared data and in the shared store.

use super::key::Facts;
use crate::bytes::{grow, put, put_slice};

const MAGIC: &[u8; 4] = b"RSI3";
const RESPONSE_MAGIC: &[u8; 4] = b"RSR1";
const BUCKET_MAGIC: &[u8; 4] = b"RSB1";
/// After a bucket's ways: the cas of each way's stored response, where the host makes it known.
const HINTS_MAGIC: &[u8; 4] = b"RSH1";

/// A stored response, kept as the bytes it is stored in (`RSR1`, the owner tag, status, flags,
/// headers, body): encoded once when an answer is kept and read in place when it is replayed,
/// so that neither copies the body or a header again.
#[derive(Debug, Clone)]
pub struct Stored {
    bytes: Vec<u8>,
    /// Where the body starts: it runs to the end.
    body_at: usize,
}

/// Equal when they hold the same response, whoever's completion stored it.
impl PartialEq for Stored {
    fn eq(&self, other: &Stored) -> bool {
        let (a, b) = (&self.bytes, &other.bytes);
        a.get(..4) == b.get(..4) && a.get(12..) == b.get(12..)
    }
}

impl Eq for Stored {}

/// A stored response's fixed head: magic, owner, status, flags, header count.
const RESPONSE_HEAD: usize = 4 + 8 + 2 + 1 + 4;

impl Stored {
    /// `owner`'s completion: `status`, the headers kept, and the body (`None`: it was larger
    /// than `max_response_bytes` and is not kept).
    pub fn new<K: AsRef<str>, V: AsRef<str>>(
        owner: u64,
        status: u16,
        headers: &[(K, V)],
        body: Option<&[u8]>,
    ) -> Stored {
        let kept = body.unwrap_or_default();
        let size: usize = headers
            .iter()
            .map(|(k, v)| 8 + k.as_ref().len() + v.as_ref().len())
            .sum();
        // (Sized whole and written in place: each field appended was a copy through a call.)
        let mut bytes = vec![0u8; RESPONSE_HEAD + size + 4 + kept.len()];
        let buf = bytes.as_mut_slice();
        let at = &mut 0;
        put(buf, at, *RESPONSE_MAGIC);
        put(buf, at, owner.to_be_bytes());
        put(buf, at, status.to_be_bytes());
        put(buf, at, [u8::from(body.is_none())]);
        put(buf, at, (headers.len() as u32).to_be_bytes());
        for (k, v) in headers {
            put_len_and(buf, at, k.as_ref().as_bytes());
            put_len_and(buf, at, v.as_ref().as_bytes());
        }
        put_len_and(buf, at, kept);
        let body_at = bytes.len() - kept.len();
        Stored { bytes, body_at }
    }

    /// A stored response read back; `None` unless `bytes` are one, whole, its headers text.
    pub fn from_bytes(bytes: Vec<u8>) -> Option<Stored> {
        let mut r = Reader(&bytes);
        if r.take(4)? != RESPONSE_MAGIC {
            return None;
        }
        r.take(8 + 2 + 1)?;
        // (Each pair takes 8 bytes at least: a count larger than the bytes ends at once.)
        for _ in 0..r.u32()? {
            std::str::from_utf8(r.bytes()?).ok()?;
            std::str::from_utf8(r.bytes()?).ok()?;
        }
        let len = r.bytes()?.len();
        if !r.0.is_empty() {
            return None;
        }
        let body_at = bytes.len() - len;
        Some(Stored { bytes, body_at })
    }

    /// The bytes as stored, tagged with `owner` (copied only when it was another's: a
    /// completion read from the shared store, kept on this node under a claim of its own).
    pub fn as_owned_by(&self, owner: u64) -> std::borrow::Cow<'_, [u8]> {
        if self.owner() == owner {
            return std::borrow::Cow::Borrowed(&self.bytes);
        }
        let mut bytes = self.bytes.clone();
        if let Some(tag) = bytes.get_mut(4..12) {
            tag.copy_from_slice(&owner.to_be_bytes());
        }
        std::borrow::Cow::Owned(bytes)
    }

    /// The claim's owner this completion was stored by.
    pub fn owner(&self) -> u64 {
        Reader(self.bytes.get(4..).unwrap_or_default())
            .u64()
            .unwrap_or(0)
    }

    pub fn status(&self) -> u16 {
        Reader(self.bytes.get(12..).unwrap_or_default())
            .u16()
            .unwrap_or(0)
    }

    /// The body was larger than `max_response_bytes` and was not kept.
    pub fn body_omitted(&self) -> bool {
        self.bytes.get(14).is_some_and(|b| *b != 0)
    }

    /// The headers kept, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        let end = self.body_at.saturating_sub(4);
        let mut r = Reader(self.bytes.get(RESPONSE_HEAD..end).unwrap_or_default());
        // (Read as text when the bytes were made or read back.)
        fn text(b: &[u8]) -> &str {
            std::str::from_utf8(b).unwrap_or_default()
        }
        std::iter::from_fn(move || Some((text(r.bytes()?), text(r.bytes()?))))
    }

    pub fn header_count(&self) -> usize {
        Reader(self.bytes.get(15..).unwrap_or_default())
            .u32()
            .map_or(0, |n| n as usize)
    }

    pub fn body(&self) -> &[u8] {
        self.bytes.get(self.body_at..).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    InFlight,
    /// Completed: the response is kept apart, under the store's `response_key` of the slot,
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

/// `s` with its length first, written into `buf` at `at`.
fn put_len_and(buf: &mut [u8], at: &mut usize, s: &[u8]) {
    put(buf, at, (s.len() as u32).to_be_bytes());
    put_slice(buf, at, s);
}

/// [`put_len_and`] appended to a vector not sized ahead (a bucket rewritten way by way).
/// (Grown by `bytes::grow` and written in place instead, the empty ways of a fresh bucket cost an
/// owned write 1,500 instructions more: each growth is a copy out of the VM.)
fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    // (The length as an array, which is stored in place: a slice of any length is copied by a
    // call out of the VM on Kong's host, so an empty string copies nothing.)
    out.extend((s.len() as u32).to_be_bytes());
    if !s.is_empty() {
        out.extend_from_slice(s);
    }
}

/// An index record read in place, its key not copied: a claim compares keys and expiries of a
/// whole bucket, and only the way it rewrites is encoded again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub key: &'a [u8],
    pub facts: Facts,
    pub owner: u64,
    pub expires_ms: u64,
    pub state: State,
}

impl Record {
    pub fn view(&self) -> RecordRef<'_> {
        RecordRef {
            key: self.key.as_bytes(),
            facts: self.facts,
            owner: self.owner,
            expires_ms: self.expires_ms,
            state: self.state,
        }
    }
}

/// Bytes of an index record besides its key.
const RECORD_FIXED: usize = 4 + 8 + 8 + 32 + 8 + 1 + 4;

/// The index record as bytes: `RSI3`, then fixed fields and the key.
pub fn encode(rec: &Record) -> Vec<u8> {
    let rec = rec.view();
    let mut out = vec![0u8; RECORD_FIXED + rec.key.len()];
    put_record(&mut out, &mut 0, &rec);
    out
}

/// The index record written into `buf` at `at` (sized for it: [`RECORD_FIXED`] and the key).
fn put_record(buf: &mut [u8], at: &mut usize, rec: &RecordRef<'_>) {
    put(buf, at, *MAGIC);
    put(buf, at, rec.expires_ms.to_be_bytes());
    put(buf, at, rec.owner.to_be_bytes());
    put(buf, at, rec.facts.fingerprint);
    put(
        buf,
        at,
        rec.facts.body_len.map_or(u64::MAX, |n| n).to_be_bytes(),
    );
    put(
        buf,
        at,
        [match rec.state {
            State::InFlight => 0,
            State::Done => 1,
        }],
    );
    put(buf, at, (rec.key.len() as u32).to_be_bytes());
    put_slice(buf, at, rec.key);
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
}

/// Decodes an index record; `None` for an empty slot or anything that is not a whole record.
pub fn decode(value: &[u8]) -> Option<Record> {
    let r = decode_ref(value)?;
    Some(Record {
        key: String::from_utf8(r.key.to_vec()).ok()?,
        facts: r.facts,
        owner: r.owner,
        expires_ms: r.expires_ms,
        state: r.state,
    })
}

/// [`decode`] in place. (A key that is not UTF-8 never equals a request's key, which is.)
pub fn decode_ref(value: &[u8]) -> Option<RecordRef<'_>> {
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
    let key = r.bytes()?;
    if !r.0.is_empty() {
        return None;
    }
    Some(RecordRef {
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

/// A bucket's bytes as read (`RSB1`, then per way its record's length, 0 when free, and the
/// record) and where each way's bytes lie: records are read in place when asked for, and a
/// write copies the ways it does not change as they are.
///
/// After the ways a bucket may carry `RSH1` and, per way, the cas its slot's stored response
/// had after its last write (0: not known). On Kong's host a write must name the current cas,
/// and the hint saves reading the response (its bytes, and a walk of the zone's tree) only to
/// learn it; a hint gone stale is refused by the host like any other stale cas. Versions that
/// do not know the trailer read the ways and ignore it, and drop it when they write the bucket:
/// their writes cost the next completion a read, never a wrong record.
/// The most ways a bucket has (the store's buckets have exactly this many).
pub const MAX_WAYS: usize = 8;

#[derive(Debug, Clone)]
pub struct BucketBytes {
    raw: Vec<u8>,
    /// Per way, the byte range it holds (`None`: past the end of what was read), held inline:
    /// a keyed request parses two buckets.
    spans: [Option<(usize, usize)>; MAX_WAYS],
    /// How many of `spans` are the bucket's ways.
    ways: usize,
    /// Where the ways' response hints start, when the bucket carries them.
    hints_at: Option<usize>,
}

impl BucketBytes {
    /// A bucket of `ways` ways (at most [`MAX_WAYS`]). A way that is not a whole record reads as
    /// free, and a value that is not a bucket at all (never written, or foreign bytes) is all
    /// free.
    pub fn parse(raw: Vec<u8>, ways: usize) -> BucketBytes {
        let ways = ways.min(MAX_WAYS);
        let mut spans = [None; MAX_WAYS];
        let mut hints_at = None;
        let mut r = Reader(&raw);
        if r.take(4) == Some(BUCKET_MAGIC.as_slice()) {
            let mut whole = true;
            for span in spans.iter_mut().take(ways) {
                let Some(bytes) = r.bytes() else {
                    whole = false;
                    break;
                };
                let end = raw.len() - r.0.len();
                *span = Some((end - bytes.len(), end));
            }
            if whole && r.take(4) == Some(HINTS_MAGIC.as_slice()) && r.0.len() >= 4 * ways {
                hints_at = Some(raw.len() - r.0.len());
            }
        }
        BucketBytes {
            raw,
            spans,
            ways,
            hints_at,
        }
    }

    /// Way `way`'s record, read in place (`None`: free, or not a record).
    pub fn way(&self, way: usize) -> Option<RecordRef<'_>> {
        let (start, end) = (*self.spans.get(way)?)?;
        decode_ref(self.raw.get(start..end)?)
    }

    /// How many ways the bucket has ([`BucketBytes::way`] reads each).
    pub fn ways(&self) -> usize {
        self.ways
    }

    /// The cas way `way`'s stored response had after its last write, if the bucket knows it.
    pub fn response_cas(&self, way: usize) -> Option<u32> {
        let at = self.hints_at?.checked_add(way.checked_mul(4)?)?;
        let b: [u8; 4] = self.raw.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(u32::from_be_bytes(b)).filter(|c| *c != 0)
    }

    /// The bucket's bytes with way `way` holding `rec` (`None`: free), the other ways as they
    /// were; `response_cas`: the cas way `way`'s response now has, when it was just written
    /// (the other ways' hints are kept).
    pub fn with(
        &self,
        way: usize,
        rec: Option<&RecordRef<'_>>,
        response_cas: Option<u32>,
    ) -> Vec<u8> {
        let extra = rec.map_or(0, |r| RECORD_FIXED + r.key.len());
        let hints = response_cas.is_some() || self.hints_at.is_some();
        let trailer = if hints { 4 + 4 * self.ways } else { 0 };
        // (The magic counted apart: a bucket created empty has none yet, and its first claim
        // then outgrew the estimate and moved.)
        let size = BUCKET_MAGIC.len() + self.raw.len() + extra + 4 * self.ways + trailer;
        let mut out = Vec::with_capacity(size);
        out.extend_from_slice(BUCKET_MAGIC);
        match self.around(way) {
            // (Two copies, not a length and a record per way: each append is a call.)
            Some((before, after)) => {
                out.extend_from_slice(before);
                Self::put_way(&mut out, rec);
                out.extend_from_slice(after);
            }
            None => {
                for (w, span) in self.spans.iter().take(self.ways).enumerate() {
                    if w == way {
                        Self::put_way(&mut out, rec);
                    } else {
                        let kept = span.and_then(|(start, end)| self.raw.get(start..end));
                        put_str(&mut out, kept.unwrap_or_default());
                    }
                }
            }
        }
        if hints {
            let mut cas_bytes = [0u8; 4 + 4 * MAX_WAYS];
            let at = &mut 0;
            put(&mut cas_bytes, at, *HINTS_MAGIC);
            for w in 0..self.ways {
                let cas = match response_cas {
                    Some(cas) if w == way => Some(cas),
                    _ => self.response_cas(w),
                };
                put(&mut cas_bytes, at, cas.unwrap_or(0).to_be_bytes());
            }
            out.extend_from_slice(cas_bytes.get(..*at).unwrap_or_default());
        }
        out
    }

    /// Way `way` written as `rec` (`None`: free), its length first.
    fn put_way(out: &mut Vec<u8>, rec: Option<&RecordRef<'_>>) {
        match rec {
            Some(rec) => {
                // (Grown once and written in place: one call, not one per field.)
                let len = RECORD_FIXED + rec.key.len();
                let buf = grow(out, 4 + len);
                let at = &mut 0;
                put(buf, at, (len as u32).to_be_bytes());
                put_record(buf, at, rec);
            }
            None => put_str(out, &[]),
        }
    }

    /// In a bucket read whole, the bytes of the ways before `way` and of those after it, each
    /// way with its length, as they lie in the value; `None` when a way was not read (the
    /// bucket is then written way by way).
    fn around(&self, way: usize) -> Option<(&[u8], &[u8])> {
        let ways = self.spans.get(..self.ways)?;
        if !ways.iter().all(Option::is_some) {
            return None;
        }
        let (start, end) = (*ways.get(way)?)?;
        let (_, last) = (*ways.last()?)?;
        // (A way's length lies in the 4 bytes before it; the first way's, after the magic.)
        Some((
            self.raw.get(4..start.checked_sub(4)?)?,
            self.raw.get(end..last)?,
        ))
    }
}
