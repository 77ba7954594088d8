//! An answer rollsafe makes itself: status, headers, body.

use super::headers::{passes_on, HeaderBlock};
use crate::idempotency::Stored;
use crate::problem::{self, Problem};
use serde_json::{Map, Value};

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u32,
    /// An upstream answer's headers, sent on as they came (but for its pseudo-headers and those
    /// of the connection: `headers::passes_on`), not copied one by one.
    pub passed: HeaderBlock,
    /// The rest, after those: rollsafe's own, or a replay's stored headers.
    pub headers: Vec<(String, String)>,
    /// Constant headers of rollsafe's own, last (no copy made of them per answer).
    pub fixed: &'static [(&'static str, &'static str)],
    pub body: Vec<u8>,
    /// A replay's stored answer, read in place: its headers come after `passed`, and its body
    /// is the body.
    pub stored: Option<Stored>,
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
        let headers = match retry_after_s {
            Some(s) => vec![("retry-after".into(), s.to_string())],
            None => Vec::new(),
        };
        Reply {
            status,
            passed: HeaderBlock::default(),
            headers,
            fixed: &[("content-type", problem::CONTENT_TYPE)],
            body,
            stored: None,
        }
    }

    /// The headers as the host calls take them, passed then own, with room for `extra` more.
    /// (`store`: where a passed block that is not text throughout is read lossily into.)
    pub fn header_refs<'a>(
        &'a self,
        extra: usize,
        store: &'a mut Vec<(String, String)>,
    ) -> Vec<(&'a str, &'a str)> {
        let kept = self.stored.as_ref().map_or(0, Stored::header_count);
        let own = kept + self.headers.len() + self.fixed.len() + extra;
        let mut out = match self.passed.passed_on(own) {
            Some(pairs) => pairs,
            None => {
                *store = self.passed.pairs_where(passes_on);
                let mut out = Vec::with_capacity(store.len() + own);
                out.extend(store.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                out
            }
        };
        if let Some(stored) = &self.stored {
            for pair in stored.headers() {
                out.push(pair);
            }
        }
        out.extend(self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        out.extend(self.fixed.iter().copied());
        out
    }

    /// The body: a replay's stored one, or the reply's own.
    pub fn body(&self) -> &[u8] {
        match &self.stored {
            Some(stored) => stored.body(),
            None => &self.body,
        }
    }
}
