//! A recurring maintenance window built from fuzzed RRULE, start time and duration: refused
//! at configure time, or a schedule that answers consistently at any instant.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rollsafe::plan::{load, HostKind};

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<12>() else {
        return;
    };
    let now = u64::from_le_bytes([head[0], head[1], head[2], head[3], head[4], head[5], 0, 0]);
    let duration = u32::from_le_bytes([head[6], head[7], head[8], head[9]]);
    let text = String::from_utf8_lossy(rest);
    let mut parts = text.splitn(2, '|');
    let rrule = parts.next().unwrap_or("");
    let start_time = parts.next().unwrap_or("02:00");
    let cfg = serde_json::json!({"maintenance": {"windows": [
        {"rrule": rrule, "start_time": start_time, "duration_s": duration}
    ]}});
    let Ok(plan) = load(cfg.to_string().as_bytes(), HostKind::Envoy) else {
        return;
    };
    let Some(policy) = plan.maintenance else {
        return;
    };
    if let Some(until) = policy.active(now) {
        assert!(until > now, "a window that is open ends after now");
    }
});
