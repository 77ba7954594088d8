//! Generates Kong's `rollsafe.meta.json` from the config types, so the schema Kong validates
//! against can never drift from what the filter parses.
//!
//! Kong checks `config_schema` with a JSON Schema draft-4 validator; schemars emits draft-07, so
//! the few keywords that differ are rewritten and non-standard `format`s are dropped.

use serde_json::{json, Map, Value};

const META_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/kong/rollsafe.meta.json");
const README_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");

/// The `config_schema` document (draft-4).
pub fn config_schema() -> Value {
    let generator = schemars::generate::SchemaSettings::draft07()
        .with(|s| {
            s.inline_subschemas = true;
        })
        .into_generator();
    let root = generator.into_root_schema_for::<super::Config>();
    let mut value = serde_json::to_value(root).expect("schema serialises");
    to_draft4(&mut value);
    if let Value::Object(map) = &mut value {
        map.insert(
            "$schema".into(),
            json!("http://json-schema.org/draft-04/schema#"),
        );
    }
    value
}

fn to_draft4(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for key in [
                "$defs",
                "definitions",
                "examples",
                "deprecated",
                "readOnly",
                "writeOnly",
            ] {
                map.remove(key);
            }
            if let Some(c) = map.remove("const") {
                map.insert("enum".into(), Value::Array(vec![c]));
            }
            for (excl, bound) in [
                ("exclusiveMinimum", "minimum"),
                ("exclusiveMaximum", "maximum"),
            ] {
                if let Some(n) = map.get(excl).filter(|n| n.is_number()).cloned() {
                    map.insert(bound.into(), n);
                    map.insert(excl.into(), Value::Bool(true));
                }
            }
            let standard = ["date-time", "email", "hostname", "ipv4", "ipv6", "uri"];
            if let Some(Value::String(f)) = map.get("format") {
                if !standard.contains(&f.as_str()) {
                    map.remove("format");
                }
            }
            // draft-4 `additionalProperties` and `items` may not be `true`/`false` in every
            // validator Kong has shipped; `{}` means the same as `true`.
            for key in ["additionalProperties", "items"] {
                if map.get(key) == Some(&Value::Bool(true)) {
                    map.insert(key.into(), json!({}));
                }
            }
            for (_, child) in map.iter_mut() {
                to_draft4(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(to_draft4),
        _ => {}
    }
}

/// The whole `rollsafe.meta.json` file.
pub fn meta_json() -> String {
    let mut meta = Map::new();
    meta.insert("config_schema".into(), config_schema());
    let mut text = serde_json::to_string_pretty(&Value::Object(meta)).expect("meta serialises");
    text.push('\n');
    text
}

/// Every property path in the schema, dotted, arrays as `[]` (`maintenance.windows[].start`).
pub fn field_paths(schema: &Value) -> Vec<String> {
    fn walk(v: &Value, prefix: &str, out: &mut Vec<String>) {
        if let Some(props) = v.get("properties").and_then(Value::as_object) {
            for (name, child) in props {
                let path = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                out.push(path.clone());
                walk(child, &path, out);
            }
        }
        if let Some(items) = v.get("items") {
            walk(items, &format!("{prefix}[]"), out);
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            if let Some(alts) = v.get(key).and_then(Value::as_array) {
                for alt in alts {
                    walk(alt, prefix, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(schema, "", &mut out);
    out.sort();
    out.dedup();
    out
}

#[test]
fn meta_json_is_generated_from_the_config_types() {
    let want = meta_json();
    if std::env::var_os("ROLLSAFE_WRITE_SCHEMA").is_some() {
        std::fs::write(META_PATH, &want).expect("write meta.json");
    }
    let have = std::fs::read_to_string(META_PATH).unwrap_or_default();
    assert!(
        have == want,
        "kong/rollsafe.meta.json is stale: run `make schema` and commit it"
    );
}

#[test]
fn readme_documents_every_config_field() {
    let readme = std::fs::read_to_string(README_PATH).expect("README.md");
    let missing: Vec<String> = field_paths(&config_schema())
        .into_iter()
        .filter(|p| !readme.contains(&format!("`{p}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md's configuration reference lacks: {missing:?}"
    );
}
