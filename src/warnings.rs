//! Which warnings are written. A warning that every request can raise while something is
//! degraded — the shared store down or full, its records not written, bodies over the limit —
//! is written at most once a period on each worker, with how many like it were held back: a
//! store outage or a hostile client must not flood the gateway's log (a line per request is
//! also a write per request), while the counters still count every one.

/// How often each kind of warning may be written, per worker.
pub const PERIOD_MS: u64 = 10_000;

/// The warnings a request can raise on every request while something is degraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Warning {
    /// The shared store did not answer a claim.
    StoreUnavailable,
    /// No slot for a new key in the node-local store.
    StoreFull,
    /// The shared store did not take a completion or a release.
    RecordNotWritten,
    /// A keyed request runs without holding its key.
    Unprotected,
    /// A body over `max_body_bytes`, refused or forwarded without retries.
    BodyTooLarge,
}

const KINDS: usize = 5;

/// Per kind: when the next may be written, and how many were held back since the last.
#[derive(Debug, Default, Clone)]
pub struct Repeats {
    next_ms: [u64; KINDS],
    held_back: [u64; KINDS],
}

impl Repeats {
    /// `Some(n)`: write this one, saying that `n` like it were held back before it; `None`:
    /// hold it back. A clock that went back more than a period opens the gate again rather
    /// than silencing the warning until it catches up.
    pub fn admit(&mut self, warning: Warning, now_ms: u64) -> Option<u64> {
        let i = warning as usize;
        let (next, held) = (self.next_ms.get_mut(i)?, self.held_back.get_mut(i)?);
        if now_ms < *next && *next <= now_ms.saturating_add(PERIOD_MS) {
            *held = held.saturating_add(1);
            return None;
        }
        *next = now_ms.saturating_add(PERIOD_MS);
        Some(std::mem::take(held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_a_period_per_kind_with_the_count_held_back() {
        use Warning::*;
        let mut r = Repeats::default();
        // (warning, now, expected)
        let table = [
            (StoreUnavailable, 1_000, Some(0)),
            (StoreUnavailable, 1_001, None),
            (StoreUnavailable, 10_999, None),
            // Another kind has its own period.
            (Unprotected, 5_000, Some(0)),
            (StoreUnavailable, 11_000, Some(2)),
            (StoreUnavailable, 11_500, None),
            (Unprotected, 14_999, None),
            (Unprotected, 15_000, Some(1)),
            // The clock went back more than a period: written, not silenced for the gap.
            (StoreUnavailable, 500, Some(1)),
            (StoreUnavailable, 600, None),
            (BodyTooLarge, 0, Some(0)),
            (StoreFull, u64::MAX - 5, Some(0)),
            (StoreFull, u64::MAX - 4, None),
            (RecordNotWritten, 7, Some(0)),
        ];
        for (i, (w, now, want)) in table.into_iter().enumerate() {
            assert_eq!(r.admit(w, now), want, "row {i}: {w:?} at {now}");
        }
    }
}
