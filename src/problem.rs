//! RFC 9457 problem details for every answer rollsafe makes itself.

use serde_json::{Map, Value};

pub const CONTENT_TYPE: &str = "application/problem+json";

/// A problem document. `kind` becomes the `type` URI `urn:problem-type:rollsafe:<kind>`, which
/// clients can match on without parsing `title` or `detail`.
pub struct Problem<'a> {
    pub kind: &'a str,
    pub title: &'a str,
    pub status: u32,
    pub detail: String,
    pub instance: Option<&'a str>,
    pub extensions: Map<String, Value>,
}

impl Problem<'_> {
    pub fn to_json(&self) -> Vec<u8> {
        let mut doc = Map::new();
        doc.insert(
            "type".into(),
            Value::String(format!("urn:problem-type:rollsafe:{}", self.kind)),
        );
        doc.insert("title".into(), Value::String(self.title.into()));
        doc.insert("status".into(), Value::from(self.status));
        doc.insert("detail".into(), Value::String(self.detail.clone()));
        if let Some(instance) = self.instance {
            // The path without its query: queries may carry secrets.
            let path = instance.split('?').next().unwrap_or(instance);
            doc.insert("instance".into(), Value::String(path.into()));
        }
        for (k, v) in &self.extensions {
            doc.insert(k.clone(), v.clone());
        }
        serde_json::to_vec(&Value::Object(doc)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_has_the_rfc9457_members() {
        let mut ext = Map::new();
        ext.insert("retry_after".into(), Value::from(7));
        let body = Problem {
            kind: "maintenance",
            title: "Service under maintenance",
            status: 503,
            detail: "back soon".into(),
            instance: Some("/orders?token=secret"),
            extensions: ext,
        }
        .to_json();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["type"], "urn:problem-type:rollsafe:maintenance");
        assert_eq!(v["status"], 503);
        assert_eq!(v["instance"], "/orders");
        assert_eq!(v["retry_after"], 7);
    }
}
