//! Problem documents (RFC 9457) with any text in them (a path, a header's name in a detail):
//! always valid JSON that carries the text intact, the query left out of `instance`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rollsafe::problem::Problem;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\u{0}');
    let title = parts.next().unwrap_or("");
    let detail = parts.next().unwrap_or("").to_string();
    let instance = parts.next();
    let mut ext = serde_json::Map::new();
    ext.insert("x_fuzz".into(), title.into());
    let body = Problem {
        kind: "fuzz",
        title,
        status: 400,
        detail: detail.clone(),
        instance,
        extensions: ext,
    }
    .to_json();
    let doc: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
    assert_eq!(doc["title"], title);
    assert_eq!(doc["detail"], detail.as_str());
    assert_eq!(doc["status"], 400);
    if let Some(i) = instance {
        let path = i.split('?').next().unwrap_or(i);
        assert_eq!(doc["instance"], path);
    }
});
