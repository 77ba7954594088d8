//! Which repeated log lines are written. A line that every request can raise while something
//! is degraded or overloaded — the shared store down or full, its records not written, bodies
//! over the limit, calls dropped — is written at most once a period by each filter instance on
//! each worker, with how many like it were held back: a store outage or a hostile client must
//! not flood the gateway's log (a line per request is also a write per request), while the
//! counters still count every one.

/// How often each kind of line may be written.
pub const PERIOD_MS: u64 = 10_000;

/// The lines a request can raise on every request while something is degraded.
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
    /// A body over `max_body_bytes`: refused, streamed once, or forwarded without retries.
    BodyTooLarge,
    /// The host refused to send a call, an attempt or a store command (on Envoy, a target
    /// that names no cluster): a misconfigured route fails every request so.
    CallRefused,
    /// A call for the root's next tick dropped: too many waiting.
    CallDropped,
}

/// One place per kind in [`Repeats`], by its discriminant (the last kind is `CallDropped`).
const KINDS: usize = Warning::CallDropped as usize + 1;

/// Per kind: when the last was written, and how many were held back since.
#[derive(Debug, Default, Clone)]
pub struct Repeats {
    kinds: [Kind; KINDS],
}

#[derive(Debug, Default, Clone, Copy)]
struct Kind {
    last_ms: Option<u64>,
    held_back: u64,
}

impl Repeats {
    /// `Some(n)`: write this one, saying that `n` like it were held back before it; `None`:
    /// hold it back (the last was written less than a period ago, or — a clock that went
    /// back — less than a period ahead).
    pub fn admit(&mut self, warning: Warning, now_ms: u64) -> Option<u64> {
        // (A kind without a place is written every time rather than never.)
        let Some(kind) = self.kinds.get_mut(warning as usize) else {
            return Some(0);
        };
        if kind
            .last_ms
            .is_some_and(|last| last.abs_diff(now_ms) < PERIOD_MS)
        {
            kind.held_back = kind.held_back.saturating_add(1);
            return None;
        }
        kind.last_ms = Some(now_ms);
        Some(std::mem::take(&mut kind.held_back))
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
            // The clock went back less than a period: still held back.
            (Unprotected, 10_000, None),
            // More than a period: written, not silenced until the clock catches up.
            (StoreUnavailable, 500, Some(1)),
            (StoreUnavailable, 600, None),
            // A clock that reads 0 every time (its hostcall failing): the first is written.
            (BodyTooLarge, 0, Some(0)),
            (BodyTooLarge, 0, None),
            (StoreFull, u64::MAX, Some(0)),
            (StoreFull, u64::MAX, None),
            (RecordNotWritten, 7, Some(0)),
            (CallRefused, 7, Some(0)),
            (CallRefused, 8, None),
            (CallDropped, 7, Some(0)),
        ];
        for (i, (w, now, want)) in table.into_iter().enumerate() {
            assert_eq!(r.admit(w, now), want, "row {i}: {w:?} at {now}");
        }
    }
}
