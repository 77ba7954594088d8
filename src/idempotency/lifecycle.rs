//! The key's lifecycle for one request: the states a key passes through, the events that move
//! it, and the effects each transition asks for. Pure: the host layer feeds events in, carries
//! out the effects (store writes, answers, attempts) and decides nothing itself.
//!
//! ```text
//!  Absent ──ask──▶ Claiming ──won──▶ Claimed ──attempt sent whole──▶ Sent
//!    │  └──────────won (node-local)────▲  │                             │
//!    │                                    └──────── finished ───────────┤
//!    ├─ held (409/422/replay/full) ─▶ Refused                           ▼
//!    └─ full + pass-through, fail-open ─▶ Unprotected     Settling ─ack─▶ Completed | Released
//! ```
//! A client gone before any attempt was sent whole releases the key (nothing ran); after, the
//! key is left to its lease (`LeftToLease`), since the application may still be executing it;
//! so is a write whose outcome became unknown (sent, no answer).

use super::record::Stored;
use super::store::Claim;

/// Where this request's key stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Nothing decided yet.
    Absent,
    /// The shared store was asked for the claim; its answer is awaited.
    Claiming,
    /// This request holds the key; no attempt of it has been sent whole.
    Claimed,
    /// An attempt was sent whole: the application may be executing it.
    Sent,
    /// The record's completion (or release) was sent to the shared store; its word is awaited.
    Settling { completes: bool },
    /// The record holds this request's answer: replayed from now on.
    Completed,
    /// Freed: the next try with this key runs.
    Released,
    /// Left claimed until its lease ends: an attempt may still be executing.
    LeftToLease,
    /// Answered without the key being this request's (409, 422, replay, store full or down).
    Refused,
    /// Runs without the key's protection (`when_full: pass-through`, `fail-open`).
    Unprotected,
}

/// What the store said to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimAnswer {
    /// The key is this request's (`evicted`: the oldest completion made room; `in_doubt`: the
    /// key's earlier claim ran out of lease unsettled, so an earlier attempt may have run).
    Won { evicted: bool, in_doubt: bool },
    /// Another request holds the key, it is completed, or there is no room.
    Held(Claim),
    /// No usable answer. `may_land`: the claim may still reach the store (a timeout), so it
    /// must be released should it land.
    Unavailable { may_land: bool },
}

/// What happens to the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The claim went to the shared store.
    Asked,
    ClaimAnswered(ClaimAnswer),
    /// An attempt reached the upstream whole.
    AttemptSent,
    /// The exchange's final answer: `stored` when it completes the record. `awaited`: the
    /// answer waits for the store's word (the shared store, where the host can wait).
    Finished {
        stored: Option<Stored>,
        awaited: bool,
    },
    /// The shared store's word on the completion or release: `Some(true)` written, `Some(false)`
    /// the key is no longer this request's, `None` no answer.
    Acknowledged(Option<bool>),
    /// The lease must be extended to cover what the exchange can still do.
    LeaseDue,
    /// The exchange ended without knowing whether the application executed the write (a keyed
    /// write was sent and got no answer): the key stays held, for a lease from now.
    OutcomeUnknown,
    /// The client went away.
    ClientGone,
}

/// The answer a refusal gives the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 409, with `Retry-After` in seconds.
    InFlight { retry_after_s: u64 },
    /// 422: the key was used with another request.
    Mismatch,
    /// The stored answer.
    Replay(Stored),
    /// 503: no free slot.
    StoreFull,
    /// 503: the shared store cannot be reached (`fail-closed`).
    StoreUnavailable,
}

/// A write to the key's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Complete(Stored),
    Release,
    Extend,
    /// Release a claim that may land later (the claim's own answer never came).
    Abandon,
}

/// What the host layer is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Hold the request until the claim is answered.
    Hold,
    /// Start the exchange (`protected`: the key is this request's, so keyed retries are safe).
    Run { protected: bool },
    /// Tell the application, with the attempt, that an earlier attempt of this key may have
    /// executed (the `Idempotency-In-Doubt` header).
    InDoubt,
    /// Answer the client with this; no upstream is contacted.
    Answer(Refusal),
    /// Write the record: and wait for the store's word before answering (`awaited`), or not.
    Write { write: Write, awaited: bool },
    /// Keep a completed answer in this node's cache (beside the shared store).
    Cache(Stored),
    /// Count (and, for the warnings, log) what happened.
    Note(Note),
}

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    Replayed,
    InFlight,
    Mismatch,
    StoreFull,
    Evicted,
    StoreUnavailable,
    FailOpen,
    Stored,
    Released,
    /// The record was no longer this request's: left as it is.
    NotOwner,
    /// The exchange ended with the write's outcome unknown; the key is left to its lease.
    OutcomeUnknown,
    /// A claim took over a key whose earlier claim ran out of lease unsettled.
    InDoubt,
}

/// The configuration the lifecycle decides with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// `when_full: pass-through`.
    pub run_when_full: bool,
    /// `when_unavailable: fail-open`.
    pub run_when_unavailable: bool,
}

/// One transition: the next phase and the effects, in order.
pub fn step(phase: Phase, event: Event, rules: Rules) -> (Phase, Vec<Effect>) {
    use Effect as E;
    use Phase as P;
    match (phase, event) {
        (P::Absent, Event::Asked) => (P::Claiming, vec![E::Hold]),
        // (An answer to a claim that was asked is the shared store's: a replay from it is kept
        // on this node. One answered here came from this node already.)
        (P::Absent, Event::ClaimAnswered(answer)) => claim_answered(answer, rules, false),
        (P::Claiming, Event::ClaimAnswered(answer)) => claim_answered(answer, rules, true),
        (P::Claimed, Event::AttemptSent) => (P::Sent, vec![]),
        (P::Claimed | P::Sent, Event::OutcomeUnknown) => (
            P::LeftToLease,
            vec![
                E::Note(Note::OutcomeUnknown),
                E::Write {
                    write: Write::Extend,
                    awaited: false,
                },
            ],
        ),
        (P::Claimed | P::Sent, Event::LeaseDue) => (
            phase,
            vec![E::Write {
                write: Write::Extend,
                awaited: false,
            }],
        ),
        (P::Claimed | P::Sent, Event::Finished { stored, awaited }) => {
            let completes = stored.is_some();
            let write = match stored {
                Some(s) => Write::Complete(s),
                None => Write::Release,
            };
            let effects = vec![E::Write { write, awaited }];
            if awaited {
                (P::Settling { completes }, effects)
            } else if completes {
                (P::Completed, effects)
            } else {
                (P::Released, effects)
            }
        }
        (P::Settling { completes }, Event::Acknowledged(word)) => match word {
            Some(true) if completes => (P::Completed, vec![E::Note(Note::Stored)]),
            Some(true) => (P::Released, vec![E::Note(Note::Released)]),
            Some(false) => (P::LeftToLease, vec![E::Note(Note::NotOwner)]),
            // The completion is kept on this node all the same (the host caches what it
            // sent); an unwritten release leaves the key to its lease.
            None if completes => (P::Completed, vec![E::Note(Note::StoreUnavailable)]),
            None => (P::LeftToLease, vec![E::Note(Note::StoreUnavailable)]),
        },
        (P::Claiming, Event::ClientGone) => (
            P::Released,
            vec![E::Write {
                write: Write::Abandon,
                awaited: false,
            }],
        ),
        (P::Claimed, Event::ClientGone) => (
            P::Released,
            vec![E::Write {
                write: Write::Release,
                awaited: false,
            }],
        ),
        (P::Sent, Event::ClientGone) => (P::LeftToLease, vec![]),
        // Anything else changes nothing: an event that no longer concerns the key.
        (phase, _) => (phase, vec![]),
    }
}

fn claim_answered(answer: ClaimAnswer, rules: Rules, from_store: bool) -> (Phase, Vec<Effect>) {
    use Effect as E;
    match answer {
        ClaimAnswer::Won { evicted, in_doubt } => {
            let mut effects = Vec::with_capacity(3);
            if evicted {
                effects.push(E::Note(Note::Evicted));
            }
            if in_doubt {
                effects.push(E::Note(Note::InDoubt));
                effects.push(E::InDoubt);
            }
            effects.push(E::Run { protected: true });
            (Phase::Claimed, effects)
        }
        ClaimAnswer::Held(claim) => match claim {
            // 422 wins over 409 when both apply.
            Claim::InFlight { same: false, .. } | Claim::Done { same: false, .. } => (
                Phase::Refused,
                vec![E::Note(Note::Mismatch), E::Answer(Refusal::Mismatch)],
            ),
            Claim::InFlight {
                same: true,
                retry_after_ms,
            } => (
                Phase::Refused,
                vec![
                    E::Note(Note::InFlight),
                    E::Answer(Refusal::InFlight {
                        retry_after_s: retry_after_ms.div_ceil(1000).max(1),
                    }),
                ],
            ),
            Claim::Done { same: true, stored } if from_store => (
                Phase::Refused,
                vec![
                    E::Note(Note::Replayed),
                    E::Cache(stored.clone()),
                    E::Answer(Refusal::Replay(stored)),
                ],
            ),
            // (The answer is the only copy a replay needs: a stored response is a deep copy.)
            Claim::Done { same: true, stored } => (
                Phase::Refused,
                vec![E::Note(Note::Replayed), E::Answer(Refusal::Replay(stored))],
            ),
            Claim::Claimed {
                evicted, in_doubt, ..
            } => claim_answered(ClaimAnswer::Won { evicted, in_doubt }, rules, from_store),
            Claim::Full if rules.run_when_full => (
                Phase::Unprotected,
                vec![E::Note(Note::StoreFull), E::Run { protected: false }],
            ),
            Claim::Full => (
                Phase::Refused,
                vec![E::Note(Note::StoreFull), E::Answer(Refusal::StoreFull)],
            ),
        },
        ClaimAnswer::Unavailable { may_land } => {
            let mut effects = vec![E::Note(Note::StoreUnavailable)];
            if may_land {
                effects.push(E::Write {
                    write: Write::Abandon,
                    awaited: false,
                });
            }
            if rules.run_when_unavailable {
                effects.push(E::Note(Note::FailOpen));
                effects.push(E::Run { protected: false });
                (Phase::Unprotected, effects)
            } else {
                effects.push(E::Answer(Refusal::StoreUnavailable));
                (Phase::Refused, effects)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Effect as E;
    use Phase as P;

    const STRICT: Rules = Rules {
        run_when_full: false,
        run_when_unavailable: false,
    };
    const LENIENT: Rules = Rules {
        run_when_full: true,
        run_when_unavailable: true,
    };

    fn stored() -> Stored {
        Stored::new::<&str, &str>(1, 201, &[], Some(b"ok"))
    }

    fn write(write: Write, awaited: bool) -> Effect {
        E::Write { write, awaited }
    }

    #[test]
    fn the_transition_table() {
        let held = |c| Event::ClaimAnswered(ClaimAnswer::Held(c));
        let in_flight = |same| Claim::InFlight {
            same,
            retry_after_ms: 1_500,
        };
        let done = |same| Claim::Done {
            same,
            stored: stored(),
        };
        let finished = |stored: Option<Stored>, awaited| Event::Finished { stored, awaited };
        #[rustfmt::skip]
        let table: Vec<(Phase, Event, Rules, Phase, Vec<Effect>)> = vec![
            (P::Absent, Event::Asked, STRICT, P::Claiming, vec![E::Hold]),
            (P::Absent, Event::ClaimAnswered(ClaimAnswer::Won { evicted: false, in_doubt: false }), STRICT,
             P::Claimed, vec![E::Run { protected: true }]),
            (P::Absent, held(Claim::Claimed { slot: 3, evicted: true, in_doubt: false, kept: None }), STRICT,
             P::Claimed, vec![E::Note(Note::Evicted), E::Run { protected: true }]),
            (P::Absent, held(Claim::Claimed { slot: 3, evicted: false, in_doubt: true, kept: None }), STRICT,
             P::Claimed, vec![E::Note(Note::InDoubt), E::InDoubt, E::Run { protected: true }]),
            (P::Claiming, Event::ClaimAnswered(ClaimAnswer::Won { evicted: false, in_doubt: false }), STRICT,
             P::Claimed, vec![E::Run { protected: true }]),
            (P::Claiming, Event::ClaimAnswered(ClaimAnswer::Won { evicted: false, in_doubt: true }), STRICT,
             P::Claimed, vec![E::Note(Note::InDoubt), E::InDoubt, E::Run { protected: true }]),
            (P::Absent, held(in_flight(true)), STRICT, P::Refused,
             vec![E::Note(Note::InFlight), E::Answer(Refusal::InFlight { retry_after_s: 2 })]),
            (P::Absent, held(in_flight(false)), STRICT, P::Refused,
             vec![E::Note(Note::Mismatch), E::Answer(Refusal::Mismatch)]),
            (P::Claiming, held(done(false)), STRICT, P::Refused,
             vec![E::Note(Note::Mismatch), E::Answer(Refusal::Mismatch)]),
            (P::Claiming, held(done(true)), STRICT, P::Refused,
             vec![E::Note(Note::Replayed), E::Cache(stored()), E::Answer(Refusal::Replay(stored()))]),
            (P::Absent, held(done(true)), STRICT, P::Refused,
             vec![E::Note(Note::Replayed), E::Answer(Refusal::Replay(stored()))]),
            (P::Absent, held(Claim::Full), STRICT, P::Refused,
             vec![E::Note(Note::StoreFull), E::Answer(Refusal::StoreFull)]),
            (P::Absent, held(Claim::Full), LENIENT, P::Unprotected,
             vec![E::Note(Note::StoreFull), E::Run { protected: false }]),
            (P::Claiming, Event::ClaimAnswered(ClaimAnswer::Unavailable { may_land: true }), STRICT,
             P::Refused, vec![E::Note(Note::StoreUnavailable), write(Write::Abandon, false),
                              E::Answer(Refusal::StoreUnavailable)]),
            (P::Claiming, Event::ClaimAnswered(ClaimAnswer::Unavailable { may_land: false }), LENIENT,
             P::Unprotected, vec![E::Note(Note::StoreUnavailable), E::Note(Note::FailOpen),
                                  E::Run { protected: false }]),
            (P::Claimed, Event::AttemptSent, STRICT, P::Sent, vec![]),
            (P::Sent, Event::AttemptSent, STRICT, P::Sent, vec![]),
            (P::Claimed, Event::LeaseDue, STRICT, P::Claimed, vec![write(Write::Extend, false)]),
            (P::Sent, Event::LeaseDue, STRICT, P::Sent, vec![write(Write::Extend, false)]),
            (P::Sent, finished(Some(stored()), false), STRICT, P::Completed,
             vec![write(Write::Complete(stored()), false)]),
            (P::Sent, finished(None, false), STRICT, P::Released, vec![write(Write::Release, false)]),
            (P::Claimed, finished(None, false), STRICT, P::Released, vec![write(Write::Release, false)]),
            (P::Sent, finished(Some(stored()), true), STRICT, P::Settling { completes: true },
             vec![write(Write::Complete(stored()), true)]),
            (P::Sent, finished(None, true), STRICT, P::Settling { completes: false },
             vec![write(Write::Release, true)]),
            (P::Settling { completes: true }, Event::Acknowledged(Some(true)), STRICT, P::Completed,
             vec![E::Note(Note::Stored)]),
            (P::Settling { completes: false }, Event::Acknowledged(Some(true)), STRICT, P::Released,
             vec![E::Note(Note::Released)]),
            (P::Settling { completes: true }, Event::Acknowledged(Some(false)), STRICT, P::LeftToLease,
             vec![E::Note(Note::NotOwner)]),
            (P::Settling { completes: true }, Event::Acknowledged(None), STRICT, P::Completed,
             vec![E::Note(Note::StoreUnavailable)]),
            (P::Settling { completes: false }, Event::Acknowledged(None), STRICT, P::LeftToLease,
             vec![E::Note(Note::StoreUnavailable)]),
            (P::Claiming, Event::ClientGone, STRICT, P::Released, vec![write(Write::Abandon, false)]),
            (P::Claimed, Event::ClientGone, STRICT, P::Released, vec![write(Write::Release, false)]),
            (P::Sent, Event::ClientGone, STRICT, P::LeftToLease, vec![]),
            (P::Sent, Event::OutcomeUnknown, STRICT, P::LeftToLease,
             vec![E::Note(Note::OutcomeUnknown), write(Write::Extend, false)]),
            (P::Completed, Event::OutcomeUnknown, STRICT, P::Completed, vec![]),
            // Terminal phases ignore what comes late.
            (P::Completed, Event::ClientGone, STRICT, P::Completed, vec![]),
            (P::Refused, finished(Some(stored()), true), STRICT, P::Refused, vec![]),
            (P::Released, Event::LeaseDue, STRICT, P::Released, vec![]),
            (P::Unprotected, Event::AttemptSent, STRICT, P::Unprotected, vec![]),
            (P::LeftToLease, Event::Acknowledged(Some(true)), STRICT, P::LeftToLease, vec![]),
        ];
        for (from, event, rules, to, effects) in table {
            let label = format!("{from:?} + {event:?}");
            assert_eq!(step(from, event, rules), (to, effects), "{label}");
        }
    }

    #[test]
    fn only_an_unsent_claim_is_released_when_the_client_leaves() {
        let (p, _) = step(P::Claimed, Event::AttemptSent, STRICT);
        let (p, effects) = step(p, Event::ClientGone, STRICT);
        assert_eq!(p, P::LeftToLease);
        assert!(
            effects.is_empty(),
            "a sent attempt may be executing: {effects:?}"
        );
    }
}
