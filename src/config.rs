//! The filter configuration: one JSON object per filter instance (per route in Kong's filter
//! chain, per `envoy.filters.http.wasm` in Envoy).
//!
//! These types are the single source of truth: `kong/rollsafe.meta.json` is generated from them
//! (see the `schema` test) and every example config is checked against both.

use serde::Deserialize;

pub mod error;
mod path;

pub use error::ConfigError;

/// The whole filter configuration. Every section is optional; an absent section turns that
/// capability off, so `{}` (or no configuration at all) is a transparent pass-through.
#[derive(Debug, Default, Clone, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
#[cfg_attr(test, schemars(title = "rollsafe filter configuration"))]
pub struct Config {
    /// Scheduled maintenance windows: matching requests get 503 + `Retry-After` + problem+json.
    #[serde(default)]
    pub maintenance: Option<crate::maintenance::MaintenanceConfig>,
    /// Consistent-hash routing of a user key to pod groups, with failover.
    #[serde(default)]
    pub routing: Option<crate::routing::RoutingConfig>,
    /// Retries with backoff on 502/503/504, connect failure, reset and timeout (RFC 9110 safe).
    #[serde(default)]
    pub retry: Option<crate::retry::RetryConfig>,
    /// Idempotency keys: replay, 400/409/422, per-caller scope, bounded node-local store.
    #[serde(default)]
    pub idempotency: Option<crate::idempotency::IdempotencyConfig>,
}

/// Parses (syntax and shape; `plan::load` adds the semantic checks) the configuration bytes the host hands to `on_configure`.
///
/// Accepts a JSON object (Envoy's `configuration` string, Kong >= 3.5 JSON-encoding its `config`
/// object), a JSON string that itself holds the object (Kong 3.4 `config` strings that were
/// quoted once more), and empty input (all capabilities off).
pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
    let text = bytes.trim_ascii();
    if text.is_empty() {
        return Ok(Config::default());
    }
    if text.first() == Some(&b'"') {
        let inner: String = decode(text)?;
        let inner = inner.as_bytes().trim_ascii();
        if inner.is_empty() {
            return Ok(Config::default());
        }
        return decode(object(inner)?);
    }
    decode(object(text)?)
}

/// serde would also build a struct from a JSON array; the configuration must be an object.
fn object(text: &[u8]) -> Result<&[u8], ConfigError> {
    if text.first() == Some(&b'{') {
        Ok(text)
    } else {
        Err(ConfigError::new("config", "must be a JSON object"))
    }
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ConfigError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = T::deserialize(&mut de).map_err(|e| {
        let unknown_field = e.to_string().starts_with("unknown field");
        let path = display_path(&path::at(bytes, e.line(), e.column(), unknown_field));
        if e.is_data() {
            ConfigError::new(path, without_position(&e))
        } else {
            // Malformed JSON (or a value serde_json rejects as such): the position helps.
            ConfigError::new(path, format!("invalid JSON: {e}"))
        }
    })?;
    de.end()
        .map_err(|e| ConfigError::new("config", without_position(&e)))?;
    Ok(value)
}

fn display_path(path: &str) -> String {
    if path.is_empty() || path == "." || path == "?" {
        "config".to_string()
    } else {
        path.to_string()
    }
}

/// serde_json appends " at line L column C"; for one-line host configs the field path says more.
fn without_position(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    match msg.rfind(" at line ") {
        Some(i) => msg.get(..i).unwrap_or(&msg).to_string(),
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_input_is_pass_through() {
        for input in ["", "  \n", "{}", "\"\"", "\"{}\""] {
            assert!(parse(input.as_bytes()).is_ok(), "{input:?}");
        }
    }

    #[test]
    fn unknown_field_is_named() {
        let e = parse(br#"{"retyr": {}}"#).unwrap_err();
        assert!(e.to_string().contains("retyr"), "{e}");
        assert!(!e.reason.contains("line 1"), "{e}");
    }

    /// The path read back from the error's position is the one a deserializer tracking
    /// every field names (`serde_path_to_error`, a dev-dependency for this comparison).
    #[test]
    fn error_paths_agree_with_a_tracking_deserializer() {
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(include_str!("../tests/configs/invalid.json")).unwrap();
        let mut texts: Vec<String> = cases
            .iter()
            .map(|c| serde_json::to_string(&c["config"]).unwrap())
            .collect();
        for c in &cases {
            // The same, pretty-printed over several lines.
            texts.push(serde_json::to_string_pretty(&c["config"]).unwrap());
        }
        texts.extend(
            [
                r#"{"routing":{"groups":[{"name":"a","target":"t"},{"name":"b"}]}}"#,
                r#"{"routing":{"groups":[{"name":"a","target":"t"},{"name":"b","target":"t","weight":"x"}]}}"#,
                r#"{"retry":{"attempts":3,"backoff":{"base_ms":true}}}"#,
                r#"{"retry":{"attempts":3,"backoff":{"bogus":1}}}"#,
                r#"{"maintenance":{"windows":[{"start":"2020-01-01T00:00:00Z","end":1}]}}"#,
                r#"{"maintenance":{"methods":["GET",7]}}"#,
                r#"{ "idempotency" : { "max_entries" : -1 } }"#,
                r#"{"idempotency":{"header":5}}"#,
                r#"{"retry":{"target":"a\"b","attempts":"3"}}"#,
            ]
            .map(String::from),
        );
        // (Not an object: refused before any field is read.)
        for text in texts.iter().filter(|t| t.starts_with('{')) {
            let mut de = serde_json::Deserializer::from_str(text);
            let Err(tracked) = serde_path_to_error::deserialize::<_, Config>(&mut de) else {
                continue; // valid in shape; refused later, by the sections' own checks
            };
            if tracked.inner().is_syntax() {
                continue; // (a tracked path there is `?` segments: nothing to agree with)
            }
            let tracked = display_path(&tracked.path().to_string());
            let read_back = parse(text.as_bytes()).err().map(|e| e.path);
            assert_eq!(read_back.as_deref(), Some(tracked.as_str()), "{text}");
        }
    }

    #[test]
    fn not_an_object_is_refused() {
        assert!(parse(b"[1]").is_err());
        assert!(parse(b"42").is_err());
        assert!(parse(b"{} trailing").is_err());
        let e = parse(b"{").unwrap_err();
        assert_eq!(e.path, "config");
        assert!(e.reason.starts_with("invalid JSON"), "{e}");
    }
}

#[cfg(test)]
pub mod schema;
