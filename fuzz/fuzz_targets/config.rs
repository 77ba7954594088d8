//! Any bytes as the filter configuration, on both hosts: refused with a field path and a
//! reason, or compiled — never a panic (a panic in `on_configure` traps the VM).
#![no_main]
use libfuzzer_sys::fuzz_target;
use rollsafe::plan::{load, HostKind};

fuzz_target!(|data: &[u8]| {
    for host in [HostKind::Envoy, HostKind::Kong] {
        match load(data, host) {
            Ok(plan) => {
                // A configuration that loads once loads the same way again.
                assert!(load(data, host).is_ok());
                let _ = plan.is_pass_through();
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
});
