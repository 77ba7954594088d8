//! `make bench` (part): rendezvous routing — lookup and build time for 2–16 groups, and the
//! balance and movement tables over 100,000 user ids. Native; the numbers are relative.

// A native bench tool, not a request path.
#![allow(clippy::panic, clippy::indexing_slicing)]

use rollsafe::routing::{hash_key, GroupConfig, Policy, RoutingConfig};
use std::hint::black_box;
use std::time::Instant;

fn config(n: usize) -> RoutingConfig {
    let groups: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"name": format!("g{i}"), "target": format!("cluster-{i}")}))
        .collect();
    let cfg: RoutingConfig = serde_json::from_value(serde_json::json!({ "groups": groups }))
        .unwrap_or_else(|e| panic!("config: {e}"));
    let _: &[GroupConfig] = &cfg.groups;
    cfg
}

fn compile(n: usize) -> Policy {
    Policy::compile(&config(n), "routing").unwrap_or_else(|e| panic!("{e}"))
}

fn main() {
    let keys: Vec<u64> = (0..100_000u64)
        .map(|i| hash_key(format!("user-{i:08x}").as_bytes()))
        .collect();
    println!("rendezvous routing, 100,000 user ids");
    println!("groups  build µs  lookup ns  max/mean  min/mean  moved on +1 group  (ideal)");
    for n in [2usize, 3, 4, 6, 8, 12, 16] {
        let t = Instant::now();
        for _ in 0..1000 {
            black_box(compile(n));
        }
        let build_us = t.elapsed().as_secs_f64() * 1e6 / 1000.0;
        let p = compile(n);
        let t = Instant::now();
        let owners: Vec<usize> = keys.iter().map(|k| p.pick(black_box(*k), 0, &[])).collect();
        let lookup_ns = t.elapsed().as_secs_f64() * 1e9 / keys.len() as f64;
        let mut load = vec![0usize; n];
        for o in &owners {
            load[*o] += 1;
        }
        let mean = keys.len() as f64 / n as f64;
        let max = *load.iter().max().unwrap_or(&0) as f64 / mean;
        let min = *load.iter().min().unwrap_or(&0) as f64 / mean;
        let bigger = compile(n + 1);
        let moved = keys
            .iter()
            .zip(&owners)
            .filter(|(k, o)| bigger.groups[bigger.pick(**k, 0, &[])].name != p.groups[**o].name)
            .count() as f64
            / keys.len() as f64;
        println!(
            "{n:>6}  {build_us:>8.2}  {lookup_ns:>9.0}  {max:>8.4}  {min:>8.4}  {:>16.2}%  ({:.2}%)",
            moved * 100.0,
            100.0 / (n as f64 + 1.0)
        );
    }
}
