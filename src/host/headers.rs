//! A request's header map kept as the host serialised it (proxy-wasm's pairs format: a count,
//! the lengths, then each name and value NUL-terminated). A request that might be retried keeps
//! its headers, because Envoy shows none in the response phase; looking a header up in the
//! block allocates nothing, and the pairs a retry replays are built only when one is due.

use std::borrow::Cow;

/// Header pairs in the ABI's format, as a host call that takes a header map wants them.
pub fn serialize(pairs: &[(&str, &str)]) -> Vec<u8> {
    let size: usize = pairs.iter().map(|(k, v)| k.len() + v.len() + 10).sum();
    let mut raw = Vec::with_capacity(4 + size);
    raw.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        raw.extend_from_slice(&(k.len() as u32).to_le_bytes());
        raw.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        raw.extend_from_slice(k.as_bytes());
        raw.push(0);
        raw.extend_from_slice(v.as_bytes());
        raw.push(0);
    }
    raw
}

/// The serialised header map. Malformed input (it comes from the host) reads as fewer headers,
/// never as a trap.
#[derive(Debug, Clone, Default)]
pub struct HeaderBlock {
    raw: Vec<u8>,
}

fn u32_at(raw: &[u8], at: usize) -> Option<usize> {
    let b: [u8; 4] = raw.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(b) as usize)
}

impl HeaderBlock {
    pub fn from_raw(raw: Vec<u8>) -> Self {
        HeaderBlock { raw }
    }

    /// The block a host would give for these pairs (the fake host, tests).
    pub fn from_pairs(pairs: &[(String, String)]) -> Self {
        let refs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        HeaderBlock {
            raw: serialize(&refs),
        }
    }

    /// Every (name, value), in the host's order; stops at the first entry that does not fit.
    /// Every (name, value); bytes that are not UTF-8 (a client may send obs-text) read as
    /// U+FFFD rather than losing the header.
    pub fn iter(&self) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
        self.raw_iter()
            .map(|(k, v)| (String::from_utf8_lossy(k), String::from_utf8_lossy(v)))
    }

    /// Every value of a header (any case), read lossily; the other headers are not decoded.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = Cow<'a, str>> + 'a {
        self.raw_iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| String::from_utf8_lossy(v))
    }

    /// A header's value as the client sent it, bytes and all.
    pub fn get_bytes(&self, name: &str) -> Option<&[u8]> {
        self.find(name.as_bytes())
    }

    /// The first value of `name` (any case). Walks the lengths and slices only the entries
    /// whose name is as long as `name`: a keyed request looks up a dozen names, most of them
    /// absent. (A plain loop: the crate is built for size, which keeps iterator adapters as
    /// calls.)
    fn find(&self, name: &[u8]) -> Option<&[u8]> {
        let raw = self.raw.as_slice();
        let count = u32_at(raw, 0).unwrap_or(0).min(raw.len() / 8);
        let mut data = 4 + count * 8;
        for i in 0..count {
            let klen = u32_at(raw, 4 + i * 8)?;
            let vlen = u32_at(raw, 8 + i * 8)?;
            let v = data.checked_add(klen)?.checked_add(1)?;
            if klen == name.len() && raw.get(data..v - 1)?.eq_ignore_ascii_case(name) {
                return raw.get(v..v.checked_add(vlen)?);
            }
            data = v.checked_add(vlen)?.checked_add(1)?;
        }
        None
    }

    /// Every (name, value) as bytes, unchecked: lookups compare names without validating
    /// every header's UTF-8.
    fn raw_iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let raw = self.raw.as_slice();
        let count = u32_at(raw, 0).unwrap_or(0);
        // Each entry takes at least 8 length bytes: a count larger than the block is a lie.
        let count = count.min(raw.len() / 8);
        let mut data = 4 + count * 8;
        (0..count).map_while(move |i| {
            let klen = u32_at(raw, 4 + i * 8)?;
            let vlen = u32_at(raw, 8 + i * 8)?;
            let k = raw.get(data..data.checked_add(klen)?)?;
            let vstart = data.checked_add(klen)?.checked_add(1)?;
            let v = raw.get(vstart..vstart.checked_add(vlen)?)?;
            data = vstart.checked_add(vlen)?.checked_add(1)?;
            Some((k, v))
        })
    }

    /// A header's value by case-insensitive name (`None` when it is not UTF-8).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.find(name.as_bytes())
            .and_then(|v| std::str::from_utf8(v).ok())
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
    fn a_malformed_block_reads_as_fewer_headers() {
        let good = HeaderBlock::from_pairs(&pairs(&[("a", "1"), ("b", "2")])).raw;
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
