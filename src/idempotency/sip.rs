//! SipHash-1-3 with a 128-bit output, byte for byte what the `siphasher` crate's `SipHasher13`
//! gives (a test holds the two equal: the fingerprint is kept in records).
//!
//! Why not the crate: its `write` is generic, so it is compiled at rollsafe's opt-level "z",
//! where each word's round is a call and the state goes through memory; Wasmtime inlines
//! nothing, so over a 1 KiB body that was about 7,500 instructions. Here the round is inlined
//! into one loop over the words, with the state in locals.

#[derive(Clone, Copy)]
struct State {
    v0: u64,
    v1: u64,
    v2: u64,
    v3: u64,
}

impl State {
    #[inline(always)]
    fn round(&mut self) {
        self.v0 = self.v0.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(13) ^ self.v0;
        self.v0 = self.v0.rotate_left(32);
        self.v2 = self.v2.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(16) ^ self.v2;
        self.v0 = self.v0.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(21) ^ self.v0;
        self.v2 = self.v2.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(17) ^ self.v2;
        self.v2 = self.v2.rotate_left(32);
    }

    /// One message word: one compression round (the "1" of 1-3).
    #[inline(always)]
    fn word(&mut self, m: u64) {
        self.v3 ^= m;
        self.round();
        self.v0 ^= m;
    }

    fn xor(&self) -> u64 {
        self.v0 ^ self.v1 ^ self.v2 ^ self.v3
    }
}

pub struct Sip13 {
    state: State,
    /// Bytes written so far (only the low byte is hashed).
    length: usize,
    /// The last bytes that did not yet make a word, little-endian, and how many.
    tail: u64,
    ntail: usize,
}

/// Up to 7 bytes as a little-endian word.
fn partial(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .rev()
        .fold(0, |word, b| word << 8 | u64::from(*b))
}

impl Sip13 {
    pub fn new(k0: u64, k1: u64) -> Sip13 {
        Sip13 {
            state: State {
                v0: k0 ^ 0x736f_6d65_7073_6575,
                // (0xee folded in: the 128-bit variant.)
                v1: k1 ^ 0x646f_7261_6e64_6f83,
                v2: k0 ^ 0x6c79_6765_6e65_7261,
                v3: k1 ^ 0x7465_6462_7974_6573,
            },
            length: 0,
            tail: 0,
            ntail: 0,
        }
    }

    pub fn write(&mut self, msg: &[u8]) {
        self.length = self.length.wrapping_add(msg.len());
        let mut rest = msg;
        if self.ntail != 0 {
            let needed = 8 - self.ntail;
            let (head, after) = rest.split_at(needed.min(rest.len()));
            self.tail |= partial(head) << (8 * self.ntail);
            if after.is_empty() && head.len() < needed {
                self.ntail += head.len();
                return;
            }
            self.state.word(self.tail);
            self.ntail = 0;
            rest = after;
        }
        let mut state = self.state;
        while let Some((w, after)) = rest.split_first_chunk::<8>() {
            state.word(u64::from_le_bytes(*w));
            rest = after;
        }
        self.state = state;
        self.tail = partial(rest);
        self.ntail = rest.len();
    }

    /// The 128-bit hash: `h1` then `h2`, each little-endian (`siphasher`'s `Hash128::as_bytes`).
    pub fn finish128(&self) -> [u8; 16] {
        let mut s = self.state;
        s.word(((self.length as u64 & 0xff) << 56) | self.tail);
        s.v2 ^= 0xee;
        s.round();
        s.round();
        s.round();
        let h1 = s.xor();
        s.v1 ^= 0xdd;
        s.round();
        s.round();
        s.round();
        let h2 = s.xor();
        (u128::from(h2) << 64 | u128::from(h1)).to_le_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use siphasher::sip128::{Hasher128, SipHasher13};
    use std::hash::Hasher;

    /// Inputs of every length to 80 bytes, written whole and cut into parts at every split
    /// pattern of a deterministic walk, under several keys: equal to the crate's.
    #[test]
    fn equals_the_siphasher_crate_byte_for_byte() {
        let data: Vec<u8> = (0u32..300)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let keys = [
            (0, 0),
            (0x726f_6c6c_7361_6665, 0x626f_6479_2d66_7031),
            (u64::MAX, 1),
        ];
        for (k0, k1) in keys {
            for len in 0..=80 {
                for cut in 0..=9usize {
                    let msg = &data[..len];
                    let mut ours = Sip13::new(k0, k1);
                    let mut theirs = SipHasher13::new_with_keys(k0, k1);
                    // Parts of cut, cut+1, … bytes (whole when cut is 0).
                    let mut at = 0;
                    let mut size = cut;
                    while at < len {
                        let end = if cut == 0 { len } else { (at + size).min(len) };
                        ours.write(&msg[at..end]);
                        theirs.write(&msg[at..end]);
                        at = end;
                        size += 1;
                    }
                    assert_eq!(
                        ours.finish128(),
                        theirs.finish128().as_bytes(),
                        "keys {k0:x},{k1:x} len {len} cut {cut}"
                    );
                }
            }
            // A long message, as a body is.
            let mut ours = Sip13::new(k0, k1);
            let mut theirs = SipHasher13::new_with_keys(k0, k1);
            // (An empty part while a tail is pending, as an empty digest after its length is.)
            for part in [
                &data[..3],
                &[][..],
                &data[3..],
                &data[..],
                &[][..],
                &data[..7],
            ] {
                ours.write(part);
                theirs.write(part);
            }
            assert_eq!(ours.finish128(), theirs.finish128().as_bytes());
        }
    }
}
