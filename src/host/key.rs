//! The idempotency key's lifecycle for one request: decided at request-header time (400, 409,
//! 422, replay, store full, or claimed), then extended, completed or released by the exchange.
//!
//! Everything the key alone decides is decided before the request headers go on: on Envoy the
//! route's upstream request starts as soon as they do, so a duplicate or a replay decided later
//! would reach the application as an aborted request. With the shared store the claim is a
//! call to Webdis ([`Gate::Ask`]): the exchange holds the request until [`claimed`] reads its
//! answer, and holds the final answer until its completion is written ([`Key::settle`]).

use super::headers::HeaderBlock;
use super::reply::Reply;
use super::{Host, HostKind, HostShared, Level, Metric};
use crate::idempotency::{self, Claim, Facts, KeyError, Record, Settle, State, Stored};
use crate::shared_store::{self, Claimed, Redis, WhenUnavailable};

/// The exchange's final answer as the record keeps it; `body` is `None` when it was too large
/// to keep.
pub struct Final<'a> {
    pub status: u16,
    pub headers: &'a [(String, String)],
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
    /// When the claim's lease ends, as last written.
    lease_until: u64,
    /// A completion sent to the shared store and not yet acknowledged (cached on this node once
    /// it is, or once the store turns out to be unreachable).
    completing: Option<(Stored, u64)>,
}

/// What the key decided at request-header time.
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
    match host.dispatch(&redis.target, &headers, command, redis.timeout_ms) {
        Ok(token) => Some(token),
        Err(e) => {
            host.log(
                Level::Error,
                &format!(
                    "rollsafe: cannot call the idempotency store at {:?}: {e}",
                    redis.target
                ),
            );
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
    super::header(&resp.headers, ":status").and_then(|s| s.trim().parse().ok())
}

/// The caller scope: route and hashed headers, as configured.
fn scope_id(
    ip: &idempotency::Policy,
    kind: HostKind,
    host: &impl Host,
    headers: &HeaderBlock,
) -> String {
    // Each host names the route its own way (an unnamed Envoy route: the filter's root id,
    // read at configure time).
    let path: &[&str] = match kind {
        HostKind::Envoy => &["xds", "route_name"],
        HostKind::Kong => &["kong", "route_id"],
    };
    let route = ip
        .scope
        .contains(&idempotency::ScopePart::Route)
        .then(|| host.property(path).filter(|v| !v.is_empty()))
        .flatten();
    let fallback = ip.route_fallback.as_deref().map(str::as_bytes);
    let parts: Vec<Option<&[u8]>> = ip
        .scope
        .iter()
        .map(|p| match p {
            idempotency::ScopePart::Route => route.as_deref().or(fallback),
            idempotency::ScopePart::Header(name) => headers.get_bytes(name),
        })
        .collect();
    idempotency::scope_id(&parts)
}

/// Checks the request's key against the store and claims it when it is new.
pub fn gate(
    ip: &idempotency::Policy,
    kind: HostKind,
    host: &impl Host,
    headers: &HeaderBlock,
    declared_len: Option<u64>,
    now: u64,
) -> Gate {
    let method = headers.get(":method").unwrap_or("GET");
    let path = headers.get(":path").unwrap_or("/");
    // Read lossily: a key that is not UTF-8 is then not ASCII either, and refused as such.
    let values: Vec<std::borrow::Cow<'_, str>> = headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(&ip.header))
        .map(|(_, v)| v)
        .collect();
    let key = match idempotency::parse_key(&values) {
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
    let scope = scope_id(ip, kind, host, headers);
    let digest = headers
        .get("content-digest")
        .or_else(|| headers.get("repr-digest"))
        .unwrap_or("");
    let facts = Facts {
        fingerprint: idempotency::fingerprint(method, path, digest),
        body_len: declared_len,
    };
    let store_key = format!("{scope}:{key}");
    let owner = host.random();
    let store = HostShared(host);
    let mut k = Key {
        store_key,
        owner,
        facts,
        held: None,
        lease_until: now + ip.lease_ms,
        completing: None,
    };
    if let Some(redis) = &ip.shared {
        if let Some((cached, stored)) = idempotency::cached(&store, ip.slots, &k.store_key, now) {
            host.count(Metric::IdemCacheHit);
            let same = cached.same_as(&k.facts);
            return Gate::Answer(held_answer(Claim::Done { same, stored }, host, path));
        }
        let rec = k.record(now + ip.lease_ms);
        let command = redis.claim(&k.store_key, &rec, ip.lease_ms, now);
        return Gate::Ask(k, command);
    }
    let claim = idempotency::claim(
        &store,
        ip.slots,
        &k.store_key,
        &k.facts,
        owner,
        now,
        ip.lease_ms,
    );
    match claim {
        Claim::Claimed { slot, evicted } => {
            if evicted {
                host.count(Metric::IdemEvicted);
            }
            k.held = Some(Held::Slot(slot));
            Gate::Claimed(k)
        }
        Claim::Full if ip.when_full == idempotency::WhenFull::PassThrough => {
            host.count(Metric::IdemStoreFull);
            host.log(
                Level::Warn,
                "rollsafe: idempotency store full; run unprotected",
            );
            // Unprotected: the request runs once, under the plain retry rules.
            Gate::Unkeyed
        }
        other => Gate::Answer(held_answer(other, host, path)),
    }
}

/// The shared store's answer to a claim (`status: None`: no answer): `Ok(Some)` the key is
/// this request's, `Ok(None)` the store is unavailable and the request runs unprotected
/// (`fail-open`), `Err` the answer to send.
pub fn claimed(
    mut k: Key,
    ip: &idempotency::Policy,
    host: &impl Host,
    status: Option<u16>,
    body: &[u8],
    path: &str,
) -> Result<Option<Key>, Reply> {
    let Some(redis) = &ip.shared else {
        return Ok(None);
    };
    match shared_store::read_claim(status, body, &k.store_key, &k.facts) {
        Ok(Claimed::Won) => {
            k.held = Some(Held::Shared);
            Ok(Some(k))
        }
        Ok(Claimed::Held(claim)) => {
            if let Claim::Done { same: true, stored } = &claim {
                // Replays of this key on this node now need no call.
                let now = host.now_ms();
                let expires = now + ip.ttl_ms;
                idempotency::cache(
                    &HostShared(host),
                    ip.slots,
                    &k.store_key,
                    &k.facts,
                    k.owner,
                    stored,
                    now,
                    expires,
                );
            }
            Err(held_answer(claim, host, path))
        }
        Err(why) => {
            host.count(Metric::IdemStoreUnavailable);
            // A claim without an answer (a timeout: Envoy's is a 504) may yet land, before its
            // deadline: released, should it. (Webdis's own errors mean it did not.)
            if matches!(status, None | Some(504)) {
                k.abandon(ip, host);
            }
            match redis.when_unavailable {
                WhenUnavailable::FailClosed => {
                    host.log(
                        Level::Warn,
                        &format!(
                            "rollsafe: idempotency store unavailable ({}); answered 503",
                            why.0
                        ),
                    );
                    Err(Reply::problem(
                        503,
                        "idempotency-store-unavailable",
                        "Idempotency store unavailable",
                        "The idempotency store cannot be reached; the request was not run. Try again shortly.".into(),
                        path,
                        Some(1),
                    ))
                }
                WhenUnavailable::FailOpen => {
                    host.count(Metric::IdemFailOpen);
                    host.log(
                        Level::Warn,
                        &format!(
                            "rollsafe: idempotency store unavailable ({}); running the request unprotected (fail-open)",
                            why.0
                        ),
                    );
                    Ok(None)
                }
            }
        }
    }
}

/// The answer when another request holds the key (in flight or completed) or there is no room.
fn held_answer(claim: Claim, host: &impl Host, path: &str) -> Reply {
    match claim {
        Claim::InFlight {
            same: true,
            retry_after_ms,
        } => {
            host.count(Metric::IdemInFlight);
            Reply::problem(
                409,
                "idempotency-key-in-flight",
                "Request in progress",
                "A request with this idempotency key is still being processed.".into(),
                path,
                Some(retry_after_ms.div_ceil(1000).max(1)),
            )
        }
        // 422 wins over 409 when both apply.
        Claim::InFlight { same: false, .. } | Claim::Done { same: false, .. } => {
            host.count(Metric::IdemMismatch);
            Reply::problem(
                422,
                "idempotency-key-reused",
                "Idempotency key reused",
                "This idempotency key was used with a different request.".into(),
                path,
                None,
            )
        }
        Claim::Done { same: true, stored } => {
            host.count(Metric::IdemReplayed);
            replay(stored)
        }
        Claim::Full | Claim::Claimed { .. } => {
            host.count(Metric::IdemStoreFull);
            host.log(Level::Warn, "rollsafe: idempotency store full");
            Reply::problem(
                503,
                "idempotency-store-full",
                "Idempotency store full",
                "The idempotency store is full; try again shortly.".into(),
                path,
                Some(1),
            )
        }
    }
}

/// A stored answer, replayed with `Idempotent-Replayed: true`.
fn replay(stored: Stored) -> Reply {
    let mut headers = stored.headers;
    headers.push(("idempotent-replayed".into(), "true".into()));
    if stored.body_omitted {
        headers.push(("idempotent-replay-body".into(), "omitted".into()));
    }
    Reply {
        status: u32::from(stored.status),
        headers,
        body: stored.body,
    }
}

impl Key {
    /// Whether this request holds the key (and so may be retried as if idempotent).
    pub fn enforced(&self) -> bool {
        self.held.is_some()
    }

    /// When the claim's lease ends, while this request holds the key.
    pub fn lease_until(&self) -> Option<u64> {
        self.held.map(|_| self.lease_until)
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

    /// An attempt starts: the lease must last at least until `until` (the longest the exchange
    /// can still take). Written only when the claim's lease would end earlier — a body that
    /// took long to arrive.
    pub fn cover(&mut self, ip: &idempotency::Policy, host: &impl Host, until: u64) {
        let Some(held) = self.held else {
            return;
        };
        if self.lease_until >= until {
            return;
        }
        match (held, &ip.shared) {
            (Held::Slot(slot), _) => {
                let extend = Settle::Extend { expires_ms: until };
                let store = HostShared(host);
                if idempotency::settle(&store, slot, &self.store_key, self.owner, &extend) {
                    self.lease_until = until;
                } else {
                    // Someone else holds the key now: this request must not be retried as keyed.
                    host.log(
                        Level::Warn,
                        "rollsafe: idempotency lease lost before the attempt started",
                    );
                    self.held = None;
                }
            }
            (Held::Shared, Some(redis)) => {
                // Unacknowledged (sent from the root): the claim's own lease already covers the
                // longest exchange, this only adds what the body's arrival took.
                let lease_ms = until.saturating_sub(host.now_ms());
                let extend = shared_store::Settle::Extend { lease_ms };
                let command = redis.settle(&self.store_key, &self.record(0), &extend);
                send_later(redis, host, command);
                self.lease_until = until;
            }
            (Held::Shared, None) => {}
        }
    }

    /// The exchange ended: a storable answer completes the record, anything else (5xx, no
    /// answer, a request that never reached the application) releases it. With the shared
    /// store and `hold`, the command is returned for the caller to send and wait for (its
    /// answer goes to [`Key::settled`]); without `hold` it goes out from the root.
    pub fn settle(
        &mut self,
        ip: &idempotency::Policy,
        host: &impl Host,
        answer: Option<Final<'_>>,
        body_len: Option<u64>,
        hold: bool,
    ) -> Option<Vec<u8>> {
        let held = self.held.take()?;
        let stored = answer.filter(|a| ip.stores(a.status)).map(|a| {
            let body = a.body.filter(|b| b.len() <= ip.max_response_bytes);
            Stored {
                status: a.status,
                headers: a
                    .headers
                    .iter()
                    .filter(|(k, _)| ip.replay_headers.iter().any(|h| k.eq_ignore_ascii_case(h)))
                    .cloned()
                    .collect(),
                body_omitted: body.is_none(),
                body: body.map(<[u8]>::to_vec).unwrap_or_default(),
            }
        });
        // The clock is read for a completion only: a release needs no time.
        let expires_ms = || host.now_ms() + ip.ttl_ms;
        let Some(redis) = ip.shared.as_ref().filter(|_| held == Held::Shared) else {
            if let Held::Slot(slot) = held {
                self.settle_slot(host, slot, stored, expires_ms, body_len);
            }
            return None;
        };
        if body_len.is_some() {
            self.facts.body_len = body_len;
        }
        let rec = self.record(0);
        let command = match &stored {
            Some(stored) => redis.settle(
                &self.store_key,
                &rec,
                &shared_store::Settle::Complete {
                    stored,
                    ttl_ms: ip.ttl_ms,
                },
            ),
            None => redis.settle(&self.store_key, &rec, &shared_store::Settle::Release),
        };
        self.completing = stored.map(|s| (s, expires_ms()));
        if hold {
            return Some(command);
        }
        send_later(redis, host, command);
        self.keep_on_node(ip, host);
        None
    }

    fn settle_slot(
        &mut self,
        host: &impl Host,
        slot: u32,
        stored: Option<Stored>,
        expires_ms: impl FnOnce() -> u64,
        body_len: Option<u64>,
    ) {
        let completes = stored.is_some();
        let settle = match stored {
            Some(stored) => Settle::Complete {
                stored,
                expires_ms: expires_ms(),
                body_len,
            },
            None => Settle::Release,
        };
        let store = HostShared(host);
        if idempotency::settle(&store, slot, &self.store_key, self.owner, &settle) {
            host.count(if completes {
                Metric::IdemStored
            } else {
                Metric::IdemReleased
            });
        } else {
            host.log(
                Level::Warn,
                "rollsafe: idempotency record no longer held by this request; left as it is",
            );
        }
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
        let completes = self.completing.is_some();
        match shared_store::read_settle(status, body) {
            Ok(true) => host.count(if completes {
                Metric::IdemStored
            } else {
                Metric::IdemReleased
            }),
            Ok(false) => {
                self.completing = None;
                host.log(
                    Level::Warn,
                    "rollsafe: idempotency record no longer held by this request; left as it is",
                );
            }
            Err(why) => {
                host.count(Metric::IdemStoreUnavailable);
                host.log(
                    Level::Warn,
                    &format!(
                        "rollsafe: idempotency record not written to the shared store ({}); {}",
                        why.0,
                        if completes {
                            "kept on this node only"
                        } else {
                            "the key stays claimed until its lease ends"
                        }
                    ),
                );
            }
        }
        self.keep_on_node(ip, host);
    }

    /// Caches the completion on this node (the shared store's cache of completed records).
    fn keep_on_node(&mut self, ip: &idempotency::Policy, host: &impl Host) {
        let Some((stored, expires)) = self.completing.take() else {
            return;
        };
        idempotency::cache(
            &HostShared(host),
            ip.slots,
            &self.store_key,
            &self.facts,
            self.owner,
            &stored,
            host.now_ms(),
            expires,
        );
    }

    /// The client left while the claim was being asked for: release it, should it have landed
    /// (only this request's own claim can be released).
    pub fn abandon(&self, ip: &idempotency::Policy, host: &impl Host) {
        if let Some(redis) = &ip.shared {
            let command = redis.settle(
                &self.store_key,
                &self.record(0),
                &shared_store::Settle::Release,
            );
            send_later(redis, host, command);
        }
    }
}
