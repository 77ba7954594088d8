//! Checks rollsafe filter configurations exactly as `on_configure` does, without a proxy.
//!
//!     cargo run --example check_config -- my-config.json   # prints `ok` or `path: reason`
//!     check_config --lines < configs.jsonl                  # one JSON result per input line
//!
//! `--lines` reads one configuration per line (each line a JSON string holding the config text)
//! and is what the schema-agreement tests use.

use std::io::{self, BufRead, Read, Write};

/// `ROLLSAFE_HOST=kong` checks as Kong's host would (e.g. refuses `retry.exchange: native`; a
/// missing `retry.target` is fine there: attempts then go to the route's Service).
fn host_kind() -> rollsafe::plan::HostKind {
    match std::env::var("ROLLSAFE_HOST").as_deref() {
        Ok("kong") => rollsafe::plan::HostKind::Kong,
        _ => rollsafe::plan::HostKind::Envoy,
    }
}

fn check(text: &[u8]) -> serde_json::Value {
    match rollsafe::plan::load(text, host_kind()) {
        Ok(_) => serde_json::json!({"ok": true}),
        Err(e) => serde_json::json!({"ok": false, "path": e.path, "reason": e.reason}),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut failed = false;
    if args.first().map(String::as_str) == Some("--lines") {
        let stdout = io::stdout();
        let mut out = stdout.lock();
        for line in io::stdin().lock().lines().map_while(Result::ok) {
            let result = match serde_json::from_str::<String>(&line) {
                Ok(text) => check(text.as_bytes()),
                Err(e) => {
                    serde_json::json!({"ok": false, "path": "input", "reason": e.to_string()})
                }
            };
            let _ = writeln!(out, "{result}");
        }
        return;
    }
    for path in &args {
        let text = if path == "-" {
            let mut buf = Vec::new();
            let _ = io::stdin().read_to_end(&mut buf);
            buf
        } else {
            match std::fs::read(path) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("{path}: {e}");
                    failed = true;
                    continue;
                }
            }
        };
        match rollsafe::plan::load(&text, host_kind()) {
            Ok(_) => println!("{path}: ok"),
            Err(e) => {
                println!("{path}: {e}");
                failed = true;
            }
        }
    }
    std::process::exit(i32::from(failed));
}
