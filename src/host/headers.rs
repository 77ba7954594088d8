//! A header map kept as the host serialised it (proxy-wasm's pairs format: a count, the
//! lengths, then each name and value NUL-terminated): a request's, or a dispatched attempt's
//! answer's. A request that might be retried keeps its headers, because Envoy shows none in the
//! response phase; a lookup copies nothing, the pairs a retry replays are built only when one
//! is due, and an answer's headers are passed on to the client without a copy each.

use crate::bytes::{put, put_slice};
use std::borrow::Cow;

/// Whether header name `name` is `wanted`, in any case. Lengths and last bytes are compared
/// here, inline: a request's headers are searched for a dozen names, and at opt-level "z" the
/// comparison of the bytes is a call (on Kong's host, Wasmtime's compiled code inlines none:
/// bench/RESULTS.md).
#[inline(always)]
pub fn name_is(name: impl AsRef<[u8]>, wanted: impl AsRef<[u8]>) -> bool {
    let (name, wanted) = (name.as_ref(), wanted.as_ref());
    // (Equal names have last bytes equal but for ASCII case, which `| 0x20` folds: names of
    // one length mostly differ there, pseudo-headers and `content-*` alike.)
    name.len() == wanted.len()
        && name.last().map(|b| b | 0x20) == wanted.last().map(|b| b | 0x20)
        && same_but_case(name, wanted)
}

/// Whether `a` and `b` are equal but for ASCII case, eight bytes at a time (the last word
/// overlapping the one before): Kong's host gives names as the client spelled them, so a name
/// looked up in lower case mostly differs from the one found in case alone, and a byte at a
/// time that cost about 150 instructions a name under Wasmtime.
fn same_but_case(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    if a.len() < 4 {
        return a
            .iter()
            .zip(b)
            .all(|(&x, &y)| x == y || (x ^ y == 0x20 && (x | 0x20).wrapping_sub(b'a') < 26));
    }
    if a.len() < 8 {
        // (Pseudo-headers and the like: two halves, overlapping, each widened to a word.)
        let half = |s: &[u8], at: usize| {
            s.get(at..at + 4)
                .and_then(|w| <[u8; 4]>::try_from(w).ok())
                .map_or(0, |w| u64::from(u32::from_le_bytes(w)))
        };
        let last = a.len() - 4;
        return words_same_but_case(half(a, 0), half(b, 0))
            && words_same_but_case(half(a, last), half(b, last));
    }
    let word = |s: &[u8], at: usize| {
        s.get(at..at + 8)
            .and_then(|w| <[u8; 8]>::try_from(w).ok())
            .map_or(0, u64::from_le_bytes)
    };
    let last = a.len() - 8;
    let mut at = 0;
    loop {
        let at_now = at.min(last);
        if !words_same_but_case(word(a, at_now), word(b, at_now)) {
            return false;
        }
        if at_now == last {
            return true;
        }
        at += 8;
    }
}

/// [`same_but_case`] of two words: each byte equal, or both ASCII letters that differ in case
/// alone (the 0x20 bit).
#[inline(always)]
fn words_same_but_case(x: u64, y: u64) -> bool {
    const CASE: u64 = 0x2020_2020_2020_2020;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let d = x ^ y;
    if d == 0 {
        return true;
    }
    if d & !CASE != 0 {
        return false;
    }
    // A byte's high bit is set where `x | 0x20` (below 0x80) is at least b'a' (t1), and where
    // it is past b'z' (t2); the sums stay within each byte.
    let low = (x | CASE) & !HIGH;
    let t1 = low + 0x1f1f_1f1f_1f1f_1f1f;
    let t2 = low + 0x0505_0505_0505_0505;
    let letters = t1 & !t2 & !x & HIGH;
    // The bytes that differ (in 0x20) must all be letters.
    (d << 2) & !letters == 0
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus
/// `content-length`, which the host recomputes for the bytes it actually sends. In any case:
/// Kong's host gives names as the client spelled them.
pub fn is_hop_by_hop(name: impl AsRef<[u8]>) -> bool {
    let name = name.as_ref();
    // (By length first: most names are compared with none of these.)
    let candidates: &[&str] = match name.len() {
        2 => &["te"],
        7 => &["trailer", "upgrade"],
        10 => &["connection", "keep-alive"],
        14 => &["content-length"],
        16 => &["proxy-connection"],
        17 => &["transfer-encoding"],
        _ => return false,
    };
    candidates.iter().any(|h| name_is(name, h))
}

/// Whether an upstream answer's header is passed on to the client: not a pseudo-header, not
/// one of the connection's.
pub fn passes_on(name: &[u8]) -> bool {
    name.first() != Some(&b':') && !is_hop_by_hop(name)
}

/// Header pairs in the ABI's format, as a host call that takes a header map wants them.
pub fn serialize(pairs: &[(&str, &str)]) -> Vec<u8> {
    let size: usize = pairs.iter().map(|(k, v)| k.len() + v.len() + 10).sum();
    // (Sized whole, its NULs the zeros it starts with, and written in place: a slice appended
    // is copied by a call out of the VM.)
    let mut raw = vec![0u8; 4 + size];
    let buf = raw.as_mut_slice();
    let at = &mut 0;
    put(buf, at, (pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        put(buf, at, (k.len() as u32).to_le_bytes());
        put(buf, at, (v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        put_slice(buf, at, k.as_bytes());
        *at += 1;
        put_slice(buf, at, v.as_bytes());
        *at += 1;
    }
    raw
}

/// The serialised header map and where each entry lies in it, found in one pass when the block
/// is made: a keyed request looks up a dozen names, most of them absent, and each lookup then
/// compares lengths from a table rather than decoding the block again. Malformed input (it
/// comes from the host) reads as fewer headers, never as a trap.
#[derive(Debug, Clone)]
pub struct HeaderBlock {
    /// The names and values (the block past its count and lengths): as text when all of it is
    /// UTF-8, checked once, so that each header then reads as `&str` without a check of its
    /// own (a dispatched attempt reads every one); else as bytes, each read lossily.
    data: Result<String, Vec<u8>>,
    /// Where `data` starts in the block, which the entries' offsets count from.
    base: usize,
    entries: Vec<Entry>,
    /// The lengths its names have, a bit each ([`length_bit`]): most names a request is
    /// searched for are absent, and most of those have a length no name in it has.
    lengths: u64,
}

/// A name length's bit in [`HeaderBlock::lengths`] (lengths of 63 and over share one).
fn length_bit(len: usize) -> u64 {
    1 << len.min(63)
}

/// One header's name and value as offsets into the block.
#[derive(Debug, Clone, Copy)]
struct Entry {
    name: u32,
    name_len: u32,
    value: u32,
    value_len: u32,
}

fn u32_at(raw: &[u8], at: usize) -> Option<usize> {
    let b: [u8; 4] = raw.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(b) as usize)
}

/// The entries of a block, up to the first that does not fit, and where its names and values
/// start.
fn index(raw: &[u8]) -> (Vec<Entry>, usize) {
    // Each entry takes at least 8 length bytes: a count larger than the block is a lie.
    let count = u32_at(raw, 0).unwrap_or(0).min(raw.len() / 8);
    let mut out = Vec::with_capacity(count);
    let start = 4 + count * 8;
    let mut data = start;
    for i in 0..count {
        match entry(raw, i, &mut data) {
            Some(e) => out.push(e),
            None => break,
        }
    }
    (out, start.min(raw.len()))
}

/// Entry `i`, whose name starts at `data` (moved past its value); `None` when it runs past the
/// block or its offsets do not fit in u32.
fn entry(raw: &[u8], i: usize, data: &mut usize) -> Option<Entry> {
    let klen = u32_at(raw, 4 + i * 8)?;
    let vlen = u32_at(raw, 8 + i * 8)?;
    let value = data.checked_add(klen)?.checked_add(1)?;
    let end = value.checked_add(vlen)?;
    if end > raw.len() {
        return None;
    }
    let e = Entry {
        name: u32::try_from(*data).ok()?,
        name_len: u32::try_from(klen).ok()?,
        value: u32::try_from(value).ok()?,
        value_len: u32::try_from(vlen).ok()?,
    };
    *data = end.checked_add(1)?;
    Some(e)
}

impl Default for HeaderBlock {
    fn default() -> Self {
        HeaderBlock {
            data: Ok(String::new()),
            base: 0,
            entries: Vec::new(),
            lengths: 0,
        }
    }
}

impl HeaderBlock {
    pub fn from_raw(mut raw: Vec<u8>) -> Self {
        let (entries, base) = index(&raw);
        let lengths = entries
            .iter()
            .fold(0, |m, e| m | length_bit(e.name_len as usize));
        raw.drain(..base);
        HeaderBlock {
            data: String::from_utf8(raw).map_err(|e| e.into_bytes()),
            base,
            entries,
            lengths,
        }
    }

    /// The block a host would give for these pairs (a lossy copy of one that is not text; the
    /// fake host, tests).
    pub fn from_pairs(pairs: &[(String, String)]) -> Self {
        let refs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        HeaderBlock::from_raw(serialize(&refs))
    }

    /// Every (name, value), in the host's order; bytes that are not UTF-8 (a client may send
    /// obs-text) read as U+FFFD rather than losing the header.
    pub fn iter(&self) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
        self.entries.iter().map(|e| {
            (
                self.text(e.name, e.name_len),
                self.text(e.value, e.value_len),
            )
        })
    }

    /// The first value of a header (any case), read lossily, and whether another follows;
    /// the other headers are not decoded.
    pub fn value_and_more(&self, name: &str) -> (Option<Cow<'_, str>>, bool) {
        if self.lengths & length_bit(name.len()) == 0 {
            return (None, false);
        }
        let mut found = None;
        for e in &self.entries {
            if e.name_len as usize == name.len() && name_is(self.slice(e.name, e.name_len), name) {
                if found.is_some() {
                    return (found, true);
                }
                found = Some(self.text(e.value, e.value_len));
            }
        }
        (found, false)
    }

    /// Whether the block reads as UTF-8 throughout, so that its headers read as `&str` in
    /// place.
    pub fn is_text(&self) -> bool {
        self.data.is_ok()
    }

    /// Appends the headers `keep` accepts to `out` as `&str`, in the block's order, read in
    /// place; none when the block is not text throughout ([`HeaderBlock::is_text`]), and
    /// none that a malformed block's lengths cut inside a character.
    pub fn push_texts_where<'a>(
        &'a self,
        out: &mut Vec<(&'a str, &'a str)>,
        keep: impl Fn(&[u8]) -> bool,
    ) {
        let Ok(text) = &self.data else {
            return;
        };
        for e in &self.entries {
            if !keep(self.slice(e.name, e.name_len)) {
                continue;
            }
            let name = text.get(self.range(e.name, e.name_len));
            if let (Some(k), Some(v)) = (name, text.get(self.range(e.value, e.value_len))) {
                out.push((k, v));
            }
        }
    }

    /// How many headers the block holds.
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// A header's value as it came, bytes and all.
    pub fn get_bytes(&self, name: &str) -> Option<&[u8]> {
        self.find(name.as_bytes())
    }

    /// Where `len` bytes at `at` in the block lie in `data`.
    fn range(&self, at: u32, len: u32) -> std::ops::Range<usize> {
        let at = (at as usize).saturating_sub(self.base);
        at..at + len as usize
    }

    fn slice(&self, at: u32, len: u32) -> &[u8] {
        let bytes = match &self.data {
            Ok(text) => text.as_bytes(),
            Err(bytes) => bytes,
        };
        bytes.get(self.range(at, len)).unwrap_or_default()
    }

    /// Bytes of the block as text: borrowed when the block is UTF-8, else with U+FFFD for what
    /// is not.
    fn text(&self, at: u32, len: u32) -> Cow<'_, str> {
        let range = self.range(at, len);
        match &self.data {
            // (A malformed block's lengths may cut a character: read lossily then too.)
            Ok(text) => match text.get(range.clone()) {
                Some(s) => Cow::Borrowed(s),
                None => String::from_utf8_lossy(text.as_bytes().get(range).unwrap_or_default()),
            },
            Err(bytes) => String::from_utf8_lossy(bytes.get(range).unwrap_or_default()),
        }
    }

    /// The first value of `name` (any case): only entries whose name is as long as `name` are
    /// compared.
    fn find(&self, name: &[u8]) -> Option<&[u8]> {
        let e = self.entry(name)?;
        Some(self.slice(e.value, e.value_len))
    }

    fn entry(&self, name: &[u8]) -> Option<&Entry> {
        if self.lengths & length_bit(name.len()) == 0 {
            return None;
        }
        self.entries.iter().find(|e| {
            e.name_len as usize == name.len() && name_is(self.slice(e.name, e.name_len), name)
        })
    }

    /// A header's value by case-insensitive name (`None` when it is not UTF-8).
    pub fn get(&self, name: &str) -> Option<&str> {
        let e = self.entry(name.as_bytes())?;
        match &self.data {
            Ok(text) => text.get(self.range(e.value, e.value_len)),
            Err(bytes) => std::str::from_utf8(bytes.get(self.range(e.value, e.value_len))?).ok(),
        }
    }

    /// The headers whose names `keep` accepts, in the block's order, as text (borrowed when
    /// the block is UTF-8; the others are not decoded).
    pub fn texts_where(&self, keep: impl Fn(&[u8]) -> bool) -> Vec<(Cow<'_, str>, Cow<'_, str>)> {
        // (A loop, not a filter collected: a list of unknown length grew a push at a time;
        // sized for all, so that the first push does not grow it either.)
        let mut out = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            if keep(self.slice(e.name, e.name_len)) {
                out.push((
                    self.text(e.name, e.name_len),
                    self.text(e.value, e.value_len),
                ));
            }
        }
        out
    }

    /// [`HeaderBlock::texts_where`], copied.
    pub fn pairs_where(&self, keep: impl Fn(&[u8]) -> bool) -> Vec<(String, String)> {
        self.entries
            .iter()
            .filter(|e| keep(self.slice(e.name, e.name_len)))
            .map(|e| {
                (
                    self.text(e.name, e.name_len).into_owned(),
                    self.text(e.value, e.value_len).into_owned(),
                )
            })
            .collect()
    }

    /// The headers an answer passes on ([`passes_on`]) as `&str`, with room for `extra` more;
    /// `None` when the block does not read as text throughout (`pairs_where` then reads them
    /// lossily).
    pub fn passed_on(&self, extra: usize) -> Option<Vec<(&str, &str)>> {
        let Ok(text) = &self.data else {
            return None;
        };
        let mut out = Vec::with_capacity(self.entries.len() + extra);
        for e in &self.entries {
            if passes_on(self.slice(e.name, e.name_len)) {
                out.push((
                    text.get(self.range(e.name, e.name_len))?,
                    text.get(self.range(e.value, e.value_len))?,
                ));
            }
        }
        Some(out)
    }

    pub fn to_pairs(&self) -> Vec<(String, String)> {
        self.iter()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header map in the ABI's format, byte for byte as the code before fields were written
    /// in place wrote it (commit 73d4b88): names and values on both sides of the short-copy
    /// limit (64 bytes), an empty value, a one-byte name.
    #[test]
    fn serialized_maps_are_byte_for_byte_the_earlier_ones() {
        let long = "v".repeat(100);
        let name = format!("x-{}", "n".repeat(62));
        let pairs = [
            (":status", "200"),
            ("a", ""),
            ("content-type", "application/problem+json"),
            (name.as_str(), long.as_str()),
        ];
        let raw = serialize(&pairs);
        let hex = |b: &[u8]| -> String { b.iter().map(|b| format!("{b:02x}")).collect() };
        // The count, each name's and value's length (u32, little-endian), then each name and
        // value with a NUL after it.
        let lengths = "04000000".to_string()
            + "07000000030000000100000000000000"
            + "0c000000180000004000000064000000";
        let text =
            format!(":status\0200\0a\0\0content-type\0application/problem+json\0{name}\0{long}\0");
        assert_eq!(hex(&raw), lengths + &hex(text.as_bytes()));
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn round_trips_and_finds_by_any_case() {
        let p = pairs(&[(":method", "POST"), ("Idempotency-Key", "\"k\""), ("x", "")]);
        let b = HeaderBlock::from_pairs(&p);
        assert_eq!(b.to_pairs(), p);
        assert_eq!(b.get("idempotency-key"), Some("\"k\""));
        assert_eq!(b.get("x"), Some(""));
        assert_eq!(b.get("absent"), None);
    }

    #[test]
    fn a_header_reads_once_and_says_whether_it_repeats() {
        let b = HeaderBlock::from_pairs(&pairs(&[
            ("Idempotency-Key", "\"a\""),
            ("x", "1"),
            ("idempotency-key", "\"b\""),
            ("y", "2"),
        ]));
        assert_eq!(
            b.value_and_more("idempotency-key"),
            (Some(Cow::Borrowed("\"a\"")), true)
        );
        assert_eq!(b.value_and_more("Y"), (Some(Cow::Borrowed("2")), false));
        assert_eq!(b.value_and_more("z"), (None, false));
        assert_eq!(b.value_and_more("xx"), (None, false));
    }

    #[test]
    fn names_of_every_length_are_found_and_only_they() {
        // Names of 63 bytes and more share a length bit: each is still compared.
        let long = |n: usize| "x".repeat(n);
        let p = pairs(&[
            ("", "empty"),
            ("a", "1"),
            (&long(63), "63"),
            (&long(200), "200"),
        ]);
        let b = HeaderBlock::from_pairs(&p);
        assert_eq!(b.get(""), Some("empty"));
        assert_eq!(b.get("A"), Some("1"));
        assert_eq!(b.get(&long(63)), Some("63"));
        assert_eq!(b.get(&long(200).to_uppercase()), Some("200"));
        for absent in ["b", "ab", &long(64), &long(62), &long(199)] {
            assert_eq!(b.get(absent), None, "{absent}");
        }
        assert_eq!(HeaderBlock::default().get(""), None);
    }

    #[test]
    fn names_compare_in_any_case_and_nothing_else() {
        for (a, b, same) in [
            ("Content-Length", "content-length", true),
            ("IDEMPOTENCY-KEY", "idempotency-key", true),
            (":method", ":method", true),
            ("", "", true),
            ("content-digest", "content-length", false),
            (":method", ":scheme", false),
            ("x-a@", "x-a`", false), // equal once `| 0x20` folds them: only letters have case
            ("host", "hosts", false),
        ] {
            assert_eq!(name_is(a, b), same, "{a} {b}");
            assert_eq!(name_is(a, b), a.eq_ignore_ascii_case(b), "{a} {b}");
        }
    }

    #[test]
    fn every_pair_of_bytes_compares_as_core_does() {
        for x in 0..=255u8 {
            for y in 0..=255u8 {
                assert_eq!(
                    same_but_case(&[x], &[y]),
                    [x].eq_ignore_ascii_case(&[y]),
                    "{x} {y}"
                );
            }
        }
        // Every length around the words, a difference (of case or not) at every place.
        for len in 0..=25 {
            let a: Vec<u8> = (0..len)
                .map(|i| b"x-abcdefghijklmnopqrstuvwxyz"[i])
                .collect();
            for at in 0..len {
                for to in [b'A', b'@', b'`', a[at] ^ 0x20, a[at]] {
                    let mut b = a.clone();
                    b[at] = to;
                    assert_eq!(
                        same_but_case(&a, &b),
                        a.eq_ignore_ascii_case(&b),
                        "{a:?} {b:?}"
                    );
                }
            }
            assert!(!same_but_case(&a, &[a.as_slice(), b"a"].concat()));
        }
        // Every pair of bytes at every place of names of 4 to 17 bytes (two halves, one word,
        // a word and an overlapping one, two words and more).
        for len in 4..=17 {
            let base: Vec<u8> = (0..len).map(|i| b"Idempotency-Keyxyz"[i]).collect();
            for at in 0..len {
                for x in 0..=255u8 {
                    for y in 0..=255u8 {
                        let (mut a, mut b) = (base.clone(), base.to_ascii_lowercase());
                        a[at] = x;
                        b[at] = y;
                        assert_eq!(
                            same_but_case(&a, &b),
                            a.eq_ignore_ascii_case(&b),
                            "{a:?} {b:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn only_the_names_and_values_need_be_text() {
        // (A length of 200 is the byte 0xc8 in the block's binary head, which is no UTF-8.)
        let long = "é".repeat(100);
        let b = HeaderBlock::from_raw(serialize(&[("a", &long), ("b", "2")]));
        assert!(b.data.is_ok());
        assert_eq!(b.get("a"), Some(long.as_str()));
        assert_eq!(b.get("B"), Some("2"));
        assert_eq!(
            b.value_and_more("a"),
            (Some(Cow::Borrowed(long.as_str())), false)
        );
    }

    #[test]
    fn lengths_that_cut_a_character_read_it_lossily() {
        // One header whose name is given one byte short: the name ends inside the "é".
        let mut raw = serialize(&[("é", "v")]);
        raw[4] = 1;
        let b = HeaderBlock::from_raw(raw);
        let pairs = b.to_pairs();
        assert_eq!(pairs[0].0, "\u{fffd}");
        assert!(b.get_bytes(&pairs[0].0).is_some() || pairs[0].0.contains('\u{fffd}'));
    }

    #[test]
    fn a_malformed_block_reads_as_fewer_headers() {
        let good = serialize(&[("a", "1"), ("b", "2")]);
        for cut in 0..good.len() {
            let b = HeaderBlock::from_raw(good[..cut].to_vec());
            assert!(b.iter().count() <= 2);
        }
        let mut lying = good.clone();
        lying[0] = 0xff;
        lying[3] = 0xff;
        assert!(HeaderBlock::from_raw(lying).iter().count() <= 2);
        assert_eq!(HeaderBlock::from_raw(vec![]).iter().count(), 0);
    }
}

#[cfg(test)]
mod bytes_tests {
    use super::*;

    #[test]
    fn a_value_that_is_not_utf8_is_kept_as_bytes_and_read_lossily() {
        // count 2; lengths; "u\0" 0xff "\0" "a\0b\0"
        let mut raw = Vec::new();
        raw.extend_from_slice(&2u32.to_le_bytes());
        for (k, v) in [(1u32, 1u32), (1, 1)] {
            raw.extend_from_slice(&k.to_le_bytes());
            raw.extend_from_slice(&v.to_le_bytes());
        }
        raw.extend_from_slice(b"u\0\xff\0a\0b\0");
        let b = HeaderBlock::from_raw(raw);
        assert_eq!(b.get("u"), None, "not UTF-8: no &str");
        assert_eq!(b.get_bytes("u"), Some(&b"\xff"[..]));
        assert_eq!(b.get("a"), Some("b"), "the headers after it still read");
        assert_eq!(b.to_pairs()[0].1, "\u{fffd}");
    }
}
