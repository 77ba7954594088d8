//! Carries out the key's lifecycle (`idempotency::lifecycle`) for one request: reads the key
//! and the request's facts, asks the store, and does the writes and answers the lifecycle's
//! transitions ask for. It decides nothing itself.
//!
//! A keyed request with a body is decided once the body is whole (the fingerprint covers it);
//! one without a body at its headers. With the shared store the claim is a call to Webdis
//! ([`Gate::Ask`]): the exchange holds the request until [`claimed`] reads its answer, and
//! holds the final answer until its completion is written ([`Key::settle`]).

use super::headers::HeaderBlock;
use super::reply::Reply;
use super::{Host, HostKind, HostShared, Level, Metric, Warning};
use crate::idempotency::lifecycle::{
    self, ClaimAnswer, Effect, Event, Note, Phase, Refusal, Rules, Write,
};
use crate::idempotency::{self, Claim, Facts, KeyError, Record, Settle, State, Stored};
use crate::shared_store::{self, Claimed, Redis, WhenUnavailable};
use std::borrow::Cow;

/// The exchange's final answer as the record keeps it: the headers a replay repeats
/// (`replay_headers`), and `body` `None` when it was too large to keep.
pub struct Final<'a> {
    pub status: u16,
    /// The headers a record keeps (`replay_headers`), borrowed where the answer is at hand.
    pub headers: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    pub body: Option<&'a [u8]>,
}

/// Where a claim is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// A slot of the node-local table.
    Slot(u32),
    /// The shared store's record.
    Shared,
}

/// A key this request holds (or, with `held: None`, a key it could not claim and runs without).
pub struct Key {
    /// Caller scope and key: what the store is keyed by.
    store_key: String,
    owner: u64,
    facts: Facts,
    /// Where the claim is, while this request owns the key.
    held: Option<Held>,
    /// The claim's bucket as this request last wrote it (node-local store, Kong's host).
    kept: Option<idempotency::Kept>,
    /// Where the key stands in its lifecycle.
    phase: Phase,
    /// An earlier claim of this key ran out of lease unsettled: the attempt says so.
    in_doubt: bool,
    /// When the claim's lease ends, as last written.
    lease_until: u64,
    /// The host: its shared data's write rules (see `HostShared`).
    kind: HostKind,
    /// A completion sent to the shared store and not yet acknowledged (cached on this node once
    /// it is, or once the store turns out to be unreachable).
    completing: Option<(Stored, u64)>,
}

/// What the key decided (at the body's end, or at the headers of a request without one).
pub enum Gate {
    /// No key applies (or the store is full and `when_full: pass-through`): run unprotected.
    Unkeyed,
    /// The key is claimed for this request.
    Claimed(Key),
    /// Answer with this, without contacting any upstream.
    Answer(Reply),
    /// The shared store decides: send it this claim (see [`send`]), then [`claimed`] reads
    /// the answer.
    Ask(Key, Vec<u8>),
}

/// Sends a command to Webdis: `POST /` with the command as the body. `None` (logged): the host
/// refused the call (on Envoy, a target that names no cluster).
pub fn send(redis: &Redis, host: &impl Host, command: &[u8]) -> Option<u32> {
    let headers = webdis_headers(redis);
    match host.dispatch(&redis.target, headers.to_vec(), command, redis.timeout_ms) {
        Ok(token) => Some(token),
        Err(e) => {
            super::log_limited(host, Level::Error, Warning::CallRefused, &|| {
                format!(
                    "rollsafe: cannot call the idempotency store at {:?}: {e}",
                    redis.target
                )
            });
            None
        }
    }
}

/// Sends a command to Webdis from the root context, answer unread.
fn send_later(redis: &Redis, host: &impl Host, command: Vec<u8>) {
    let headers = webdis_headers(redis);
    host.dispatch_later(&redis.target, &headers, command, redis.timeout_ms);
}

fn webdis_headers(redis: &Redis) -> [(&str, &str); 4] {
    [
        (":method", "POST"),
        (":path", "/"),
        (":authority", &redis.authority),
        ("content-type", "text/plain"),
    ]
}

/// The HTTP status of Webdis's answer (`None`: no answer at all).
pub fn status_of(resp: &super::CallResponse) -> Option<u16> {
    resp.headers
        .get(":status")
        .and_then(|s| s.trim().parse().ok())
}

/// What the store is keyed by: the caller scope (route and hashed headers, as configured) and
/// the key.
fn store_key(
    ip: &idempotency::Policy,
    kind: HostKind,
    host: &impl Host,
    headers: &HeaderBlock,
    key: &str,
) -> String {
    // Each host names the route its own way (an unnamed Envoy route: the filter's root id,
    // read at configure time).
    let path = match kind {
        HostKind::Envoy => super::ROUTE_NAME,
        HostKind::Kong => super::KONG_ROUTE_ID,
    };
    let route = ip
        .scope
        .contains(&idempotency::ScopePart::Route)
        .then(|| host.property(path).filter(|v| !v.is_empty()))
        .flatten();
    let fallback = ip.route_fallback.as_deref().map(str::as_bytes);
    let parts = ip.scope.iter().map(|p| match p {
        idempotency::ScopePart::Route => route.as_deref().or(fallback),
        idempotency::ScopePart::Header(name) => headers.get_bytes(name),
    });
    ip.scopes.borrow_mut().store_key(parts, key)
}

/// The body a key is decided on.
#[derive(Debug, Clone, Copy)]
pub enum Body<'a> {
    /// Held whole (empty for a request without one): the fingerprint covers it.
    Whole(&'a [u8]),
    /// Too large to hold, streamed to the application once: compared on its declared length.
    Streamed(Option<u64>),
}

/// Checks the request's key against the store and claims it when it is new. Called once the
/// body is whole, or when it turns out too large to hold. (`method`: as the exchange read it.)
pub fn gate(
    ip: &idempotency::Policy,
    kind: HostKind,
    host: &impl Host,
    headers: &HeaderBlock,
    method: &str,
    body: Body<'_>,
    now: u64,
) -> Gate {
    let path = headers.get(":path").unwrap_or("/");
    // Read lossily: a key that is not UTF-8 is then not ASCII either, and refused as such.
    let (one, more) = headers.value_and_more(&ip.header);
    let parsed = match (&one, more) {
        (None, _) => idempotency::parse_key::<&str>(&[]),
        (Some(one), false) => idempotency::parse_key(std::slice::from_ref(one)),
        (Some(_), true) => Err(KeyError::Repeated),
    };
    let key = match parsed {
        Ok(key) => key,
        Err(KeyError::Missing) if !ip.required => return Gate::Unkeyed,
        Err(e) => {
            host.count(Metric::IdemBadKey);
            let detail = match e {
                KeyError::Missing => format!("This request needs an {} header.", ip.header),
                KeyError::Repeated => format!("The {} header appears more than once.", ip.header),
                KeyError::Invalid(why) => format!("The {} header is invalid: {why}.", ip.header),
            };
            return Gate::Answer(Reply::problem(
                400,
                "idempotency-key-invalid",
                "Invalid idempotency key",
                detail,
                path,
                None,
            ));
        }
    };
    let store_key = store_key(ip, kind, host, headers, &key);
    let digest = headers
        .get("content-digest")
        .or_else(|| headers.get("repr-digest"))
        .unwrap_or("");
    let facts = match body {
        Body::Whole(body) => Facts {
            fingerprint: idempotency::fingerprint(method, path, digest, body),
            body_len: Some(body.len() as u64),
        },
        Body::Streamed(len) => Facts {
            fingerprint: idempotency::fingerprint_streamed(method, path, digest),
            body_len: len,
        },
    };
    let mut k = Key {
        store_key,
        owner: host.random(),
        facts,
        held: None,
        kept: None,
        phase: Phase::Absent,
        in_doubt: false,
        lease_until: now + ip.lease_ms,
        completing: None,
        kind,
    };
    let store = HostShared(host, kind);
    if let Some(redis) = &ip.shared {
        if let Some((cached, stored)) = idempotency::cached(&store, ip.slots, &k.store_key, now) {
            host.count(Metric::IdemCacheHit);
            let same = cached.same_as(&k.facts);
            let answer = ClaimAnswer::Held(Claim::Done { same, stored });
            // (Already in this node's cache: not cached again.)
            return k.decide(ip, host, Event::ClaimAnswered(answer), path);
        }
        let rec = k.record(now + ip.lease_ms);
        let command = redis.claim(&k.store_key, &rec, ip.lease_ms, ip.ttl_ms, now);
        k.apply(ip, host, Event::Asked);
        return Gate::Ask(k, command);
    }
    let mut claim = idempotency::claim(
        &store,
        ip.slots,
        &k.store_key,
        &k.facts,
        k.owner,
        now,
        ip.lease_ms,
    );
    if let Claim::Claimed { slot, kept, .. } = &mut claim {
        k.held = Some(Held::Slot(*slot));
        k.kept = kept.take();
    }
    k.decide(
        ip,
        host,
        Event::ClaimAnswered(ClaimAnswer::Held(claim)),
        path,
    )
}

/// The shared store's answer to a claim (`status: None`: no answer): `Ok(Some)` the key is
/// this request's, `Ok(None)` the store is unavailable and the request runs unprotected
/// (`fail-open`), `Err` the answer to send.
// (The answer is moved straight into the reply sent: boxing it would cost a shared-store
// replay an allocation.)
#[allow(clippy::result_large_err)]
pub fn claimed(
    mut k: Key,
    ip: &idempotency::Policy,
    host: &impl Host,
    status: Option<u16>,
    body: &[u8],
    path: &str,
) -> Result<Option<Key>, Reply> {
    let answer = match shared_store::read_claim(status, body, &k.store_key, &k.facts) {
        Ok(Claimed::Won { in_doubt }) => {
            k.held = Some(Held::Shared);
            ClaimAnswer::Won {
                evicted: false,
                in_doubt,
            }
        }
        Ok(Claimed::Held(claim)) => ClaimAnswer::Held(claim),
        Err(why) => {
            let open = ip
                .shared
                .as_ref()
                .is_some_and(|r| r.when_unavailable == WhenUnavailable::FailOpen);
            super::log_limited(host, Level::Warn, Warning::StoreUnavailable, &|| {
                format!(
                    "rollsafe: idempotency store unavailable ({}); {}",
                    why.0,
                    if open {
                        "running the request unprotected (fail-open)"
                    } else {
                        "answered 503"
                    }
                )
            });
            // A claim without an answer (a timeout: Envoy's is a 504) may yet land, before its
            // deadline: released, should it. (Webdis's own errors mean it did not.)
            ClaimAnswer::Unavailable {
                may_land: matches!(status, None | Some(504)),
            }
        }
    };
    match k.decide(ip, host, Event::ClaimAnswered(answer), path) {
        Gate::Claimed(k) => Ok(Some(k)),
        Gate::Unkeyed => Ok(None),
        Gate::Answer(reply) => Err(reply),
        Gate::Ask(..) => Ok(None),
    }
}

/// The answer a refusal gives.
fn refusal_reply(refusal: Refusal, path: &str) -> Reply {
    match refusal {
        Refusal::InFlight { retry_after_s } => Reply::problem(
            409,
            "idempotency-key-in-flight",
            "Request in progress",
            "A request with this idempotency key is still being processed.".into(),
            path,
            Some(retry_after_s),
        ),
        Refusal::Mismatch => Reply::problem(
            422,
            "idempotency-key-reused",
            "Idempotency key reused",
            "This idempotency key was used with a different request.".into(),
            path,
            None,
        ),
        Refusal::Replay(stored) => replay(stored),
        Refusal::StoreFull => Reply::problem(
            503,
            "idempotency-store-full",
            "Idempotency store full",
            "The idempotency store is full; try again shortly.".into(),
            path,
            Some(1),
        ),
        Refusal::StoreUnavailable => Reply::problem(
            503,
            "idempotency-store-unavailable",
            "Idempotency store unavailable",
            "The idempotency store cannot be reached; the request was not run. Try again shortly."
                .into(),
            path,
            Some(1),
        ),
    }
}

/// A stored answer, replayed with `Idempotent-Replayed: true`.
fn replay(stored: Stored) -> Reply {
    Reply {
        status: u32::from(stored.status()),
        passed: HeaderBlock::default(),
        headers: Vec::new(),
        fixed: if stored.body_omitted() {
            &[
                ("idempotent-replayed", "true"),
                ("idempotent-replay-body", "omitted"),
            ]
        } else {
            &[("idempotent-replayed", "true")]
        },
        body: Vec::new(),
        stored: Some(stored),
    }
}

fn note(host: &impl Host, n: Note) {
    let metric = match n {
        Note::Replayed => Metric::IdemReplayed,
        Note::InFlight => Metric::IdemInFlight,
        Note::Mismatch => Metric::IdemMismatch,
        Note::StoreFull => {
            super::log_limited(host, Level::Warn, Warning::StoreFull, &|| {
                "rollsafe: idempotency store full".into()
            });
            Metric::IdemStoreFull
        }
        Note::Evicted => Metric::IdemEvicted,
        Note::StoreUnavailable => Metric::IdemStoreUnavailable,
        Note::FailOpen => Metric::IdemFailOpen,
        Note::Stored => Metric::IdemStored,
        Note::Released => Metric::IdemReleased,
        Note::OutcomeUnknown => Metric::IdemOutcomeUnknown,
        Note::InDoubt => {
            host.log(
                Level::Warn,
                "rollsafe: idempotency key in doubt: its earlier claim ran out of lease with the outcome unknown; the attempt carries Idempotency-In-Doubt",
            );
            Metric::IdemInDoubt
        }
        Note::NotOwner => {
            host.log(
                Level::Warn,
                "rollsafe: idempotency record no longer held by this request; left as it is",
            );
            return;
        }
    };
    host.count(metric);
}

impl Key {
    /// Whether this request holds the key (and so may be retried as if idempotent).
    pub fn enforced(&self) -> bool {
        matches!(self.phase, Phase::Claimed | Phase::Sent) && self.held.is_some()
    }

    /// When the claim's lease ends, while this request holds the key.
    pub fn lease_until(&self) -> Option<u64> {
        self.enforced().then_some(self.lease_until)
    }

    /// Where the key stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether an earlier attempt of this key may have executed (its claim ran out of lease
    /// with the outcome unknown): the attempt tells the application so.
    pub fn in_doubt(&self) -> bool {
        self.in_doubt
    }

    /// This request's in-flight record.
    fn record(&self, expires_ms: u64) -> Record {
        Record {
            key: self.store_key.clone(),
            facts: self.facts,
            owner: self.owner,
            expires_ms,
            state: State::InFlight,
        }
    }

    fn rules(ip: &idempotency::Policy) -> Rules {
        Rules {
            run_when_full: ip.when_full == idempotency::WhenFull::PassThrough,
            run_when_unavailable: ip
                .shared
                .as_ref()
                .is_some_and(|r| r.when_unavailable == WhenUnavailable::FailOpen),
        }
    }

    /// Feeds `event` to the lifecycle and carries out the effects that are writes and notes;
    /// returns the rest for the caller.
    fn apply(&mut self, ip: &idempotency::Policy, host: &impl Host, event: Event) -> Vec<Effect> {
        let (phase, effects) = lifecycle::step(self.phase, event, Self::rules(ip));
        self.phase = phase;
        let mut rest = Vec::new();
        for effect in effects {
            match effect {
                Effect::Note(n) => note(host, n),
                Effect::Write {
                    write,
                    awaited: false,
                } => self.write_now(ip, host, write),
                other => rest.push(other),
            }
        }
        rest
    }

    /// A claim's answer, decided: what the exchange does next (a replay from the shared store
    /// is kept on this node, as the lifecycle asks).
    fn decide(
        mut self,
        ip: &idempotency::Policy,
        host: &impl Host,
        event: Event,
        path: &str,
    ) -> Gate {
        let mut reply = None;
        let mut protected = false;
        for effect in self.apply(ip, host, event) {
            match effect {
                Effect::Cache(stored) if ip.shared.is_some() => {
                    self.completing = Some((stored, host.now_ms() + ip.ttl_ms));
                    self.keep_on_node(ip, host);
                }
                Effect::Answer(refusal) => reply = Some(refusal_reply(refusal, path)),
                Effect::Run { protected: true } => protected = true,
                Effect::InDoubt => self.in_doubt = true,
                Effect::Run { protected: false } => {
                    super::log_limited(host, Level::Warn, Warning::Unprotected, &|| {
                        "rollsafe: idempotency key not held; the request runs unprotected".into()
                    })
                }
                _ => {}
            }
        }
        match (reply, protected) {
            (Some(reply), _) => Gate::Answer(reply),
            (None, true) => Gate::Claimed(self),
            (None, false) => Gate::Unkeyed,
        }
    }

    /// Carries out a write nobody waits for: at once in the node-local store, from the root's
    /// next tick in the shared one.
    fn write_now(&mut self, ip: &idempotency::Policy, host: &impl Host, write: Write) {
        match (self.held, &ip.shared) {
            (Some(Held::Slot(slot)), _) => {
                let (settle, completes) = match write {
                    Write::Complete(stored) => (
                        Settle::Complete {
                            stored,
                            expires_ms: host.now_ms() + ip.ttl_ms,
                        },
                        Some(true),
                    ),
                    Write::Release | Write::Abandon => (Settle::Release, Some(false)),
                    Write::Extend => (
                        Settle::Extend {
                            expires_ms: self.lease_until,
                        },
                        None,
                    ),
                };
                let store = HostShared(host, self.kind);
                let done = idempotency::settle(
                    &store,
                    slot,
                    &self.store_key,
                    self.owner,
                    &settle,
                    &mut self.kept,
                );
                match (done, completes) {
                    (true, Some(true)) => note(host, Note::Stored),
                    (true, Some(false)) => note(host, Note::Released),
                    (true, None) => {}
                    (false, Some(_)) => note(host, Note::NotOwner),
                    (false, None) => {
                        // Someone else holds the key now: not retried as keyed from here on.
                        host.log(
                            Level::Warn,
                            "rollsafe: idempotency lease lost before the attempt started",
                        );
                        self.held = None;
                    }
                }
            }
            (Some(Held::Shared), Some(redis)) | (None, Some(redis)) => {
                let command = self.shared_command(ip, redis, host, &write);
                send_later(redis, host, command);
                self.keep_on_node(ip, host);
            }
            (_, None) => {}
        }
    }

    /// The shared store's command for `write`; a completion is remembered, to be cached on this
    /// node once written.
    fn shared_command(
        &mut self,
        ip: &idempotency::Policy,
        redis: &Redis,
        host: &impl Host,
        write: &Write,
    ) -> Vec<u8> {
        let rec = self.record(0);
        match write {
            Write::Complete(stored) => {
                self.completing = Some((stored.clone(), host.now_ms() + ip.ttl_ms));
                redis.settle(
                    &self.store_key,
                    &rec,
                    &shared_store::Settle::Complete {
                        stored,
                        ttl_ms: ip.ttl_ms,
                    },
                )
            }
            Write::Release | Write::Abandon => {
                redis.settle(&self.store_key, &rec, &shared_store::Settle::Release)
            }
            Write::Extend => {
                let lease_ms = self.lease_until.saturating_sub(host.now_ms());
                redis.settle(
                    &self.store_key,
                    &rec,
                    &shared_store::Settle::Extend { lease_ms },
                )
            }
        }
    }

    /// An attempt reached the upstream whole: from now on the application may be executing it.
    pub fn sent(&mut self, ip: &idempotency::Policy, host: &impl Host) {
        self.apply(ip, host, Event::AttemptSent);
    }

    /// An attempt starts: the lease must last at least until `until` (the longest the exchange
    /// can still take). Written only when the claim's lease would end earlier — a body that
    /// took long to arrive, or an attempt that outlives half the lease.
    pub fn cover(&mut self, ip: &idempotency::Policy, host: &impl Host, until: u64) {
        if !self.enforced() || self.lease_until >= until {
            return;
        }
        self.lease_until = until;
        self.apply(ip, host, Event::LeaseDue);
    }

    /// The exchange ended with the write's outcome unknown (sent, and no answer): the key stays
    /// held for a lease from now, so no other try runs while the application may still be
    /// executing it.
    pub fn unknown(&mut self, ip: &idempotency::Policy, host: &impl Host) {
        if !self.enforced() {
            return;
        }
        self.lease_until = self.lease_until.max(host.now_ms() + ip.lease_ms);
        self.apply(ip, host, Event::OutcomeUnknown);
    }

    /// The exchange ended: a storable answer completes the record, anything else (5xx, no
    /// answer, a request that never reached the application) releases it. With the shared
    /// store and `hold`, the command is returned for the caller to send and wait for (its
    /// answer goes to [`Key::settled`]); otherwise the write is done (or sent from the root).
    pub fn settle(
        &mut self,
        ip: &idempotency::Policy,
        host: &impl Host,
        answer: Option<Final<'_>>,
        hold: bool,
    ) -> Option<Vec<u8>> {
        if !self.enforced() {
            return None;
        }
        let stored = answer.filter(|a| ip.stores(a.status)).map(|a| {
            let body = a.body.filter(|b| b.len() <= ip.max_response_bytes);
            Stored::new(self.owner, a.status, &a.headers, body)
        });
        let awaited = hold && self.held == Some(Held::Shared);
        let event = Event::Finished { stored, awaited };
        for effect in self.apply(ip, host, event) {
            if let (
                Effect::Write {
                    write,
                    awaited: true,
                },
                Some(redis),
            ) = (effect, &ip.shared)
            {
                return Some(self.shared_command(ip, redis, host, &write));
            }
        }
        None
    }

    /// The shared store's answer to the command [`Key::settle`] returned (`status: None`: none).
    /// A completion the store could not take is still kept on this node: a retry here replays.
    pub fn settled(
        &mut self,
        ip: &idempotency::Policy,
        host: &impl Host,
        status: Option<u16>,
        body: &[u8],
    ) {
        let word = match shared_store::read_settle(status, body) {
            Ok(written) => Some(written),
            Err(why) => {
                super::log_limited(host, Level::Warn, Warning::RecordNotWritten, &|| {
                    format!(
                        "rollsafe: idempotency record not written to the shared store ({}); {}",
                        why.0,
                        if self.completing.is_some() {
                            "kept on this node only"
                        } else {
                            "the key stays claimed until its lease ends"
                        }
                    )
                });
                None
            }
        };
        if word == Some(false) {
            self.completing = None;
        }
        self.apply(ip, host, Event::Acknowledged(word));
        self.keep_on_node(ip, host);
    }

    /// Caches the completion on this node (the shared store's cache of completed records).
    fn keep_on_node(&mut self, ip: &idempotency::Policy, host: &impl Host) {
        let Some((stored, expires)) = self.completing.take() else {
            return;
        };
        idempotency::cache(
            &HostShared(host, self.kind),
            ip.slots,
            &self.store_key,
            &self.facts,
            self.owner,
            &stored,
            host.now_ms(),
            expires,
        );
    }

    /// The client went away: a claim still being asked for is released should it land, one
    /// whose attempt never reached the upstream whole is released (nothing ran), and one whose
    /// attempt did is left to its lease (the application may still be executing it).
    pub fn client_gone(&mut self, ip: &idempotency::Policy, host: &impl Host) {
        self.apply(ip, host, Event::ClientGone);
    }
}
