//! Byte strings compared and written a word at a time. (Pure.)
//!
//! Why: `==` on slices and byte arrays is a call to wasi-libc's `memcmp`, which Wasmtime runs a
//! byte at a time at about 11 instructions a byte; a keyed request compares its store key
//! (33 bytes and the key) and its fingerprint (32 bytes) this way. And a slice copied
//! (`copy_from_slice`, `extend_from_slice`) is `memory.copy`, which Wasmtime runs as a call out
//! of the VM, about 100 instructions however short the slice; most a keyed request writes
//! (header names and values, keys, record fields) are short.

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

/// Writes a fixed-size field into `buf` at `at` (moved past it); nothing if it does not fit.
/// (An array assigned, not a slice copied: a copy of a known small size is a few stores.)
#[inline(always)]
pub fn put<const N: usize>(buf: &mut [u8], at: &mut usize, field: [u8; N]) {
    let dst = buf
        .get_mut(*at..*at + N)
        .and_then(|s| <&mut [u8; N]>::try_from(s).ok());
    if let Some(dst) = dst {
        *dst = field;
        *at += N;
    }
}

/// Slices up to this long are written as two overlapping copies of a fixed size.
const SHORT: usize = 64;

/// Writes `s` into `buf` at `at` (moved past it), a short slice in fixed-size copies; nothing
/// if it does not fit.
pub fn put_slice(buf: &mut [u8], at: &mut usize, s: &[u8]) {
    let Some(dst) = buf.get_mut(*at..*at + s.len()) else {
        return;
    };
    *at += s.len();
    fn ends<const N: usize>(dst: &mut [u8], s: &[u8]) {
        if let (Some(d), Some(s)) = (dst.first_chunk_mut::<N>(), s.first_chunk::<N>()) {
            *d = *s;
        }
        if let (Some(d), Some(s)) = (dst.last_chunk_mut::<N>(), s.last_chunk::<N>()) {
            *d = *s;
        }
    }
    match s.len() {
        0 => {}
        // (1 and 3 bytes: the first and last below, the middle one as well.)
        1..4 => {
            ends::<1>(dst, s);
            if let (Some(d), Some(b)) = (dst.get_mut(1), s.get(1)) {
                *d = *b;
            }
        }
        4..8 => ends::<4>(dst, s),
        8..16 => ends::<8>(dst, s),
        16..32 => ends::<16>(dst, s),
        32..=SHORT => ends::<32>(dst, s),
        _ => dst.copy_from_slice(s),
    }
}

/// Zeros to grow a buffer by: one copy of them is one call, where `Vec::resize` writes a byte
/// at a time.
static ZEROS: [u8; 256] = [0; 256];

/// Grows `out` by `n` zero bytes and returns them, to be written in place.
pub fn grow(out: &mut Vec<u8>, n: usize) -> &mut [u8] {
    let start = out.len();
    let mut left = n;
    while left > 0 {
        let chunk = left.min(ZEROS.len());
        out.extend_from_slice(ZEROS.get(..chunk).unwrap_or_default());
        left -= chunk;
    }
    out.get_mut(start..).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_adds_zeros_of_any_length() {
        for n in [0, 1, 255, 256, 257, 700] {
            let mut out = vec![7u8; 3];
            let tail = grow(&mut out, n);
            assert_eq!(tail.len(), n);
            tail.fill(9);
            assert_eq!(out.len(), 3 + n);
            assert!(out[..3].iter().all(|b| *b == 7) && out[3..].iter().all(|b| *b == 9));
        }
    }

    #[test]
    fn put_slice_writes_every_length_in_place_and_nothing_that_does_not_fit() {
        let src: Vec<u8> = (0u8..100)
            .map(|i| i.wrapping_mul(53).wrapping_add(7))
            .collect();
        for len in 0..=src.len() {
            let mut buf = vec![0xee; len + 5];
            let at = &mut 2;
            put_slice(&mut buf, at, &src[..len]);
            assert_eq!(*at, 2 + len);
            assert_eq!(&buf[2..2 + len], &src[..len], "len {len}");
            assert_eq!(&buf[..2], &[0xee; 2]);
            assert_eq!(&buf[2 + len..], &[0xee; 3]);
            // One byte too many for what is left: nothing written, `at` kept.
            let at = &mut (buf.len() - len + 1).min(buf.len());
            let before = (buf.clone(), *at);
            if len > 0 {
                put_slice(&mut buf, at, &src[..len]);
                assert_eq!((buf.clone(), *at), before, "len {len} past the end");
            }
        }
    }

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
