//! Equality of byte strings eight bytes at a time. (Pure.)
//!
//! Why: `==` on slices and byte arrays is a call to wasi-libc's `memcmp`, which Wasmtime runs a
//! byte at a time at about 11 instructions a byte; a keyed request compares its store key
//! (33 bytes and the key) and its fingerprint (32 bytes) this way.

/// Whether `a` and `b` hold the same bytes.
pub fn equal(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (mut a, mut b) = (a, b);
    while let (Some((x, a_rest)), Some((y, b_rest))) =
        (a.split_first_chunk::<8>(), b.split_first_chunk::<8>())
    {
        if u64::from_ne_bytes(*x) != u64::from_ne_bytes(*y) {
            return false;
        }
        (a, b) = (a_rest, b_rest);
    }
    a.iter().zip(b).all(|(x, y)| x == y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_slice_equality_at_every_length_and_place() {
        let base: Vec<u8> = (0u8..40).map(|i| i.wrapping_mul(37)).collect();
        for len in 0..=base.len() {
            let a = &base[..len];
            assert!(equal(a, a));
            for at in 0..len {
                let mut b = a.to_vec();
                b[at] ^= 0x20;
                assert!(!equal(a, &b), "len {len}, differing at {at}");
            }
            if len > 0 {
                assert!(!equal(a, &base[..len - 1]), "lengths differ");
            }
        }
    }
}
