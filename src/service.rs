//! Kong's route Service as the attempt target: Kong 3.6 and later give a filter the Service
//! entity, JSON-encoded, as the property `kong.router.service` (its `protocol`, `host`,
//! `port`, timeouts, …). Where neither `retry.target` nor `routing` names a target, attempts
//! go to that Service's `host:port`, so the Service's URL is not repeated in the filter's
//! configuration. Pure: the host layer reads the property and carries out what this decides.

use serde::Deserialize;

/// The Service entity's fields rollsafe reads (Kong's schema has more; unknown ones are fine).
#[derive(Debug, Deserialize)]
struct Entity {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    connect_timeout: Option<u64>,
    #[serde(default)]
    read_timeout: Option<u64>,
}

/// The route's Service, as a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// `host:port`, as Kong's dispatch takes it.
    pub target: String,
    /// The Service's name (or its host), for log lines.
    pub name: String,
    pub connect_timeout_ms: Option<u64>,
    pub read_timeout_ms: Option<u64>,
}

/// Why the route's Service cannot be the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    /// No `kong.router.service` property: Kong 3.4–3.5, or a bare ngx_wasm_module host.
    Absent,
    /// The property is not a Service entity rollsafe can read.
    Unreadable(String),
    /// An `https` (or other non-`http`) Service: Kong's dispatch would send it plain text.
    Protocol(String),
}

impl Unusable {
    /// The log line's reason, naming what to do.
    pub fn reason(&self) -> String {
        match self {
            Unusable::Absent => "this host gives no kong.router.service property (Kong 3.4 and \
                                 3.5 do not; it came with Kong 3.6): set retry.target (host:port)"
                .into(),
            Unusable::Unreadable(why) => {
                format!("kong.router.service could not be read ({why}): set retry.target")
            }
            Unusable::Protocol(p) => format!(
                "the route's Service speaks {p}, and attempts rollsafe sends itself are plain \
                 HTTP: set retry.target to a plain-HTTP host:port of the same pods"
            ),
        }
    }
}

/// The target in the property's value (`None`: no such property).
pub fn from_property(value: Option<&[u8]>) -> Result<Service, Unusable> {
    let bytes = value.filter(|v| !v.is_empty()).ok_or(Unusable::Absent)?;
    let e: Entity =
        serde_json::from_slice(bytes).map_err(|e| Unusable::Unreadable(e.to_string()))?;
    let protocol = e.protocol.as_deref().unwrap_or("http");
    if protocol != "http" {
        return Err(Unusable::Protocol(protocol.to_string()));
    }
    let host = e
        .host
        .filter(|h| !h.is_empty())
        .ok_or_else(|| Unusable::Unreadable("no host".into()))?;
    let port = e.port.unwrap_or(80);
    Ok(Service {
        target: format!("{host}:{port}"),
        name: e.name.unwrap_or_else(|| host.clone()),
        connect_timeout_ms: e.connect_timeout,
        read_timeout_ms: e.read_timeout,
    })
}

impl Service {
    /// A warning when the Service's own timeouts would cut what rollsafe lets an attempt take:
    /// Kong's proxying (which carries some attempts) stops at `read_timeout`; a keyed write's
    /// attempt waits up to `deadline_ms`.
    pub fn timeouts_disagree(&self, per_try_ms: u64, deadline_ms: u64) -> Option<String> {
        let read = self.read_timeout_ms?;
        (read < deadline_ms).then(|| {
            format!(
                "the route's Service {} has read_timeout {read} ms, shorter than retry.deadline_ms \
                 {deadline_ms} (per_try_timeout_ms {per_try_ms}): an attempt Kong's proxying \
                 carries is cut there; keep read_timeout at least the deadline",
                self.name
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_services_host_and_port_become_the_target() {
        let json = br#"{"id":"5f1c","name":"orders","protocol":"http","host":"orders.shop.svc.cluster.local","port":8080,"path":null,"connect_timeout":60000,"read_timeout":60000,"write_timeout":60000,"retries":5,"tags":null}"#;
        let s = from_property(Some(json)).unwrap();
        assert_eq!(s.target, "orders.shop.svc.cluster.local:8080");
        assert_eq!(s.name, "orders");
        assert_eq!(s.read_timeout_ms, Some(60_000));
        assert_eq!(s.timeouts_disagree(5_000, 15_000), None);
        let short = Service {
            read_timeout_ms: Some(2_000),
            ..s
        };
        assert!(short
            .timeouts_disagree(1_000, 6_000)
            .unwrap()
            .contains("read_timeout 2000 ms, shorter than retry.deadline_ms 6000"));
    }

    #[test]
    fn what_cannot_be_a_target_says_why() {
        let cases: [(Option<&[u8]>, Unusable); 4] = [
            (None, Unusable::Absent),
            (Some(b""), Unusable::Absent),
            (
                Some(br#"{"protocol":"https","host":"orders","port":443}"#),
                Unusable::Protocol("https".into()),
            ),
            (
                Some(br#"{"protocol":"http","port":80}"#),
                Unusable::Unreadable("no host".into()),
            ),
        ];
        for (value, want) in cases {
            assert_eq!(from_property(value), Err(want));
        }
        assert!(matches!(
            from_property(Some(b"not json")),
            Err(Unusable::Unreadable(_))
        ));
        assert!(Unusable::Absent.reason().contains("Kong 3.6"));
        // A Service without a port is on 80 (Kong's default for http).
        assert_eq!(
            from_property(Some(br#"{"host":"a"}"#)).unwrap().target,
            "a:80"
        );
    }
}
