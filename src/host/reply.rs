//! An answer rollsafe makes itself: status, headers, body.

use crate::problem::{self, Problem};
use serde_json::{Map, Value};

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    /// A problem+json answer (RFC 9457), with `Retry-After` when given.
    pub fn problem(
        status: u32,
        kind: &str,
        title: &str,
        detail: String,
        path: &str,
        retry_after_s: Option<u64>,
    ) -> Reply {
        Reply::problem_with(status, kind, title, detail, path, retry_after_s, Map::new())
    }

    /// A problem+json answer with extension members.
    pub fn problem_with(
        status: u32,
        kind: &str,
        title: &str,
        detail: String,
        path: &str,
        retry_after_s: Option<u64>,
        extensions: Map<String, Value>,
    ) -> Reply {
        let body = Problem {
            kind,
            title,
            status,
            detail,
            instance: Some(path),
            extensions,
        }
        .to_json();
        let mut headers = vec![(
            "content-type".to_string(),
            problem::CONTENT_TYPE.to_string(),
        )];
        if let Some(s) = retry_after_s {
            headers.push(("retry-after".into(), s.to_string()));
        }
        Reply {
            status,
            headers,
            body,
        }
    }

    /// The headers as the host calls take them.
    pub fn header_refs(&self) -> Vec<(&str, &str)> {
        self.headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}
