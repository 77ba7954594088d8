//! The idempotency key's lifecycle for one request: decided at request-header time (400, 409,
//! 422, replay, store full, or claimed), then extended, completed or released by the exchange.
//!
//! Everything the key alone decides is decided before the request headers go on: on Envoy the
//! route's upstream request starts as soon as they do, so a duplicate or a replay decided later
//! would reach the application as an aborted request.

use super::headers::HeaderBlock;
use super::reply::Reply;
use super::{Host, HostKind, HostShared, Level, Metric};
use crate::idempotency::{self, Claim, Facts, KeyError, Settle, Stored};

/// The exchange's final answer as the record keeps it; `body` is `None` when it was too large
/// to keep.
pub struct Final<'a> {
    pub status: u16,
    pub headers: &'a [(String, String)],
    pub body: Option<&'a [u8]>,
}

/// A key this request holds (or, with `slot: None`, a key it could not claim and runs without).
pub struct Key {
    /// Caller scope and key: what the store is keyed by.
    store_key: String,
    owner: u64,
    /// The claimed slot, while this request owns the key.
    slot: Option<u32>,
    /// When the claim's lease ends, as last written.
    lease_until: u64,
}

/// What the key decided at request-header time.
pub enum Gate {
    /// No key applies (or the store is full and `when_full: pass-through`): run unprotected.
    Unkeyed,
    /// The key is claimed for this request.
    Claimed(Key),
    /// Answer with this, without contacting any upstream.
    Answer(Reply),
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
    match idempotency::claim(
        &store,
        ip.slots,
        &store_key,
        &facts,
        owner,
        now,
        ip.lease_ms,
    ) {
        Claim::Claimed { slot, evicted } => {
            if evicted {
                host.count(Metric::IdemEvicted);
            }
            Gate::Claimed(Key {
                store_key,
                owner,
                slot: Some(slot),
                lease_until: now + ip.lease_ms,
            })
        }
        Claim::InFlight {
            same: true,
            retry_after_ms,
        } => {
            host.count(Metric::IdemInFlight);
            Gate::Answer(Reply::problem(
                409,
                "idempotency-key-in-flight",
                "Request in progress",
                "A request with this idempotency key is still being processed.".into(),
                path,
                Some(retry_after_ms.div_ceil(1000).max(1)),
            ))
        }
        // 422 wins over 409 when both apply.
        Claim::InFlight { same: false, .. } | Claim::Done { same: false, .. } => {
            host.count(Metric::IdemMismatch);
            Gate::Answer(Reply::problem(
                422,
                "idempotency-key-reused",
                "Idempotency key reused",
                "This idempotency key was used with a different request.".into(),
                path,
                None,
            ))
        }
        Claim::Done { same: true, stored } => {
            host.count(Metric::IdemReplayed);
            Gate::Answer(replay(stored))
        }
        Claim::Full => {
            host.count(Metric::IdemStoreFull);
            host.log(Level::Warn, "rollsafe: idempotency store full");
            match ip.when_full {
                idempotency::WhenFull::Reject => Gate::Answer(Reply::problem(
                    503,
                    "idempotency-store-full",
                    "Idempotency store full",
                    "The idempotency store is full; try again shortly.".into(),
                    path,
                    Some(1),
                )),
                // Unprotected: the request runs once, under the plain retry rules.
                idempotency::WhenFull::PassThrough => Gate::Unkeyed,
            }
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
        self.slot.is_some()
    }

    /// When the claim's lease ends, while this request holds the key.
    pub fn lease_until(&self) -> Option<u64> {
        self.slot.map(|_| self.lease_until)
    }

    /// An attempt starts: the lease must last at least until `until` (the longest the exchange
    /// can still take). Written only when the claim's lease would end earlier — a body that
    /// took long to arrive.
    pub fn cover(&mut self, host: &impl Host, until: u64) {
        let Some(slot) = self.slot else {
            return;
        };
        if self.lease_until >= until {
            return;
        }
        let extend = Settle::Extend { expires_ms: until };
        if idempotency::settle(
            &HostShared(host),
            slot,
            &self.store_key,
            self.owner,
            &extend,
        ) {
            self.lease_until = until;
        } else {
            // Someone else holds the key now: this request must not be retried as keyed.
            host.log(
                Level::Warn,
                "rollsafe: idempotency lease lost before the attempt started",
            );
            self.slot = None;
        }
    }

    /// The exchange ended: a storable answer completes the record, anything else (5xx, no
    /// answer, a request that never reached the application) releases it.
    pub fn settle(
        &mut self,
        ip: &idempotency::Policy,
        host: &impl Host,
        answer: Option<Final<'_>>,
        body_len: Option<u64>,
    ) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        let settle = match answer.filter(|a| ip.stores(a.status)) {
            Some(Final {
                status,
                headers,
                body,
            }) => {
                let body = body.filter(|b| b.len() <= ip.max_response_bytes);
                let keep = body.is_some();
                Settle::Complete {
                    stored: Stored {
                        status,
                        headers: headers
                            .iter()
                            .filter(|(k, _)| {
                                ip.replay_headers.iter().any(|h| k.eq_ignore_ascii_case(h))
                            })
                            .cloned()
                            .collect(),
                        body: body.map(<[u8]>::to_vec).unwrap_or_default(),
                        body_omitted: !keep,
                    },
                    expires_ms: host.now_ms() + ip.ttl_ms,
                    body_len,
                }
            }
            None => Settle::Release,
        };
        let stored = matches!(settle, Settle::Complete { .. });
        if idempotency::settle(
            &HostShared(host),
            slot,
            &self.store_key,
            self.owner,
            &settle,
        ) {
            host.count(if stored {
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
}
