//! Consistent-hash routing of a user key to pod groups (one Kubernetes Service / Kong upstream
//! per group). Pure: the key, the time and group health are arguments.
//!
//! Algorithm: weighted rendezvous hashing (HRW). Each group scores `weight / -ln(u)` with `u`
//! uniform from a hash of (key, group); the highest score wins. Shares follow the weights
//! exactly in expectation, adding or removing a group moves only the keys that must move
//! (perfect monotonicity, unlike Maglev's small extra churn), there is no table to rebuild,
//! and the score order is the key's failover order. Lookup is O(groups): nothing for ≤ 16.
//! The mapping depends only on the config and the key: the same on every worker and node.

use crate::config::error::ConfigError;
use serde::Deserialize;
use std::rc::Rc;

/// `routing` config section.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Where the user key comes from, first present wins: `header:<name>` or `cookie:<name>`.
    #[serde(default = "default_key")]
    #[cfg_attr(
        test,
        schemars(inner(regex(pattern = r"^(header|cookie):[!#$%&'*+.^_`|~0-9A-Za-z-]+$")))
    )]
    pub key: Vec<String>,
    /// The pod groups (2 to 64).
    #[cfg_attr(test, schemars(length(min = 1, max = 64)))]
    pub groups: Vec<GroupConfig>,
    /// Methods that are hashed; others go to the route's normal target.
    #[serde(default = "default_methods")]
    pub methods: Vec<crate::method::Method>,
    /// A hashed request without a key: `reject` (400 problem+json), `spread` (evenly over the
    /// groups, not pinned), or `group:<name>` (that group).
    #[serde(default = "default_missing")]
    #[cfg_attr(test, schemars(regex(pattern = r"^(reject|spread|group:.+)$")))]
    pub missing_key: String,
    /// Consecutive failures (connect failures, 5xx) that mark a group down.
    #[serde(default = "default_unhealthy_after")]
    #[cfg_attr(test, schemars(range(min = 1, max = 1000)))]
    pub unhealthy_after: u32,
    /// How long a group stays down before it is tried again, ms.
    #[serde(default = "default_recover")]
    #[cfg_attr(test, schemars(range(min = 100, max = 3600000)))]
    pub recover_after_ms: u64,
    /// Request header naming the chosen group: visible to the upstream, and what an Envoy
    /// route matches to pick the group's cluster.
    #[serde(default = "default_group_header")]
    #[cfg_attr(test, schemars(regex(pattern = r"^[A-Za-z0-9_-]+$")))]
    pub group_header: String,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    #[cfg_attr(test, schemars(length(min = 1, max = 64)))]
    pub name: String,
    /// Envoy: the group's cluster; Kong: `host:port` of its Service.
    #[cfg_attr(test, schemars(length(min = 1)))]
    pub target: String,
    #[serde(default = "default_weight")]
    #[cfg_attr(test, schemars(range(min = 1, max = 1000)))]
    pub weight: u32,
}

fn default_key() -> Vec<String> {
    vec!["header:user-id".into(), "header:x-user-id".into()]
}
fn default_methods() -> Vec<crate::method::Method> {
    use crate::method::Method;
    vec![Method::POST, Method::PUT, Method::PATCH, Method::DELETE]
}
fn default_missing() -> String {
    "reject".into()
}
fn default_unhealthy_after() -> u32 {
    3
}
fn default_recover() -> u64 {
    10_000
}
fn default_group_header() -> String {
    "x-rollsafe-group".into()
}
fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Header(String),
    Cookie(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    Reject,
    Spread,
    Group(usize),
}

#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    /// (Shared with each exchange that sends there: no copy per request.)
    pub target: Rc<str>,
    weight: f64,
    seed: u64,
}

/// The compiled section; `down_until` is the worker's view of group health.
#[derive(Debug)]
pub struct Policy {
    pub key: Vec<KeySource>,
    pub groups: Vec<Group>,
    methods: u8,
    pub missing: Missing,
    pub unhealthy_after: u32,
    pub recover_after_ms: u64,
    pub group_header: String,
    health: std::cell::RefCell<Vec<Health>>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Health {
    failures: u32,
    down_until: u64,
}

/// 64-bit FNV-1a: hashes the key once per request.
pub fn hash_key(key: &[u8]) -> u64 {
    key.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// splitmix64's finaliser: mixes the key hash with a group's seed.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Policy {
    pub fn compile(cfg: &RoutingConfig, at: &str) -> Result<Policy, ConfigError> {
        let err = |field: String, reason: String| ConfigError::new(format!("{at}.{field}"), reason);
        if cfg.groups.is_empty() || cfg.groups.len() > 64 {
            return Err(err(
                "groups".into(),
                format!("must list 1..=64 groups, got {}", cfg.groups.len()),
            ));
        }
        let mut groups: Vec<Group> = Vec::new();
        for (i, g) in cfg.groups.iter().enumerate() {
            if g.name.is_empty() || groups.iter().any(|o| o.name == g.name) {
                return Err(err(
                    format!("groups[{i}].name"),
                    format!("must be unique and non-empty, got {:?}", g.name),
                ));
            }
            if g.target.is_empty() {
                return Err(err(
                    format!("groups[{i}].target"),
                    "must name the group's upstream".into(),
                ));
            }
            if !(1..=1000).contains(&g.weight) {
                return Err(err(
                    format!("groups[{i}].weight"),
                    format!("must be 1..=1000, got {}", g.weight),
                ));
            }
            groups.push(Group {
                name: g.name.clone(),
                target: Rc::from(g.target.as_str()),
                weight: f64::from(g.weight),
                // The group's identity is its name: renaming moves its keys, reordering does not.
                seed: mix(hash_key(g.name.as_bytes())),
            });
        }
        let mut key = Vec::new();
        for (i, k) in cfg.key.iter().enumerate() {
            key.push(match k.split_once(':') {
                Some(("header", n)) if !n.is_empty() => KeySource::Header(n.to_ascii_lowercase()),
                Some(("cookie", n)) if !n.is_empty() => KeySource::Cookie(n.to_string()),
                _ => {
                    return Err(err(
                        format!("key[{i}]"),
                        format!("must be header:<name> or cookie:<name>, got {k:?}"),
                    ))
                }
            });
        }
        if key.is_empty() {
            return Err(err(
                "key".into(),
                "at least one key source is required".into(),
            ));
        }
        let missing = match cfg.missing_key.as_str() {
            "reject" => Missing::Reject,
            "spread" => Missing::Spread,
            other => match other.strip_prefix("group:") {
                Some(name) => {
                    Missing::Group(groups.iter().position(|g| g.name == name).ok_or_else(|| {
                        err("missing_key".into(), format!("no group named {name:?}"))
                    })?)
                }
                None => {
                    return Err(err(
                        "missing_key".into(),
                        format!("must be reject, spread or group:<name>, got {other:?}"),
                    ))
                }
            },
        };
        if !(1..=1000).contains(&cfg.unhealthy_after) {
            return Err(err(
                "unhealthy_after".into(),
                format!("must be 1..=1000, got {}", cfg.unhealthy_after),
            ));
        }
        if !(100..=3_600_000).contains(&cfg.recover_after_ms) {
            let got = cfg.recover_after_ms;
            return Err(err(
                "recover_after_ms".into(),
                format!("must be 100..=3600000, got {got}"),
            ));
        }
        let header = cfg.group_header.to_ascii_lowercase();
        if header.is_empty()
            || !header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(err(
                "group_header".into(),
                format!("not a valid header name: {:?}", cfg.group_header),
            ));
        }
        let methods = crate::method::set(&cfg.methods);
        let n = groups.len();
        Ok(Policy {
            key,
            groups,
            methods,
            missing,
            unhealthy_after: cfg.unhealthy_after,
            recover_after_ms: cfg.recover_after_ms,
            group_header: header,
            health: std::cell::RefCell::new(vec![Health::default(); n]),
        })
    }

    pub fn hashes(&self, method: &str) -> bool {
        crate::method::mask(method) & self.methods != 0
    }

    /// The key's groups in preference order (highest rendezvous score first).
    pub fn preference(&self, key_hash: u64) -> Vec<usize> {
        let mut scored: Vec<(f64, usize)> = self
            .groups
            .iter()
            .enumerate()
            .map(|(i, g)| {
                // u in (0, 1]: 53 random bits, never 0, so ln(u) is finite.
                let u = ((mix(key_hash ^ g.seed) >> 11) + 1) as f64 / (1u64 << 53) as f64;
                (g.weight / -u.ln().min(-f64::MIN_POSITIVE), i)
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        scored.into_iter().map(|(_, i)| i).collect()
    }

    /// The first group in the key's preference order that is up and not excluded (groups
    /// this exchange already failed on). When every group is down, the key's own group.
    pub fn pick(&self, key_hash: u64, now: u64, exclude: &[usize]) -> usize {
        let order = self.preference(key_hash);
        let health = self.health.borrow();
        order
            .iter()
            .copied()
            .find(|i| !exclude.contains(i) && health.get(*i).is_none_or(|h| h.down_until <= now))
            .or_else(|| order.iter().copied().find(|i| !exclude.contains(i)))
            .or_else(|| order.first().copied())
            .unwrap_or(0)
    }

    /// An attempt to `group` failed (connect failure or 5xx); true when this marks it down.
    pub fn failed(&self, group: usize, now: u64) -> bool {
        let mut health = self.health.borrow_mut();
        let Some(h) = health.get_mut(group) else {
            return false;
        };
        h.failures = h.failures.saturating_add(1);
        if h.failures >= self.unhealthy_after && h.down_until <= now {
            h.down_until = now + self.recover_after_ms;
            h.failures = 0;
            return true;
        }
        false
    }

    pub fn succeeded(&self, group: usize) {
        if let Some(h) = self.health.borrow_mut().get_mut(group) {
            h.failures = 0;
        }
    }

    pub fn is_down(&self, group: usize, now: u64) -> bool {
        self.health
            .borrow()
            .get(group)
            .is_some_and(|h| h.down_until > now)
    }
}

/// A cookie's value from a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(groups: &[(&str, u32)]) -> Policy {
        let cfg = RoutingConfig {
            key: default_key(),
            groups: groups
                .iter()
                .map(|(n, w)| GroupConfig {
                    name: n.to_string(),
                    target: format!("c-{n}"),
                    weight: *w,
                })
                .collect(),
            methods: default_methods(),
            missing_key: "reject".into(),
            unhealthy_after: 3,
            recover_after_ms: 10_000,
            group_header: default_group_header(),
        };
        Policy::compile(&cfg, "routing").unwrap()
    }

    fn names(n: usize) -> Vec<(String, u32)> {
        (0..n).map(|i| (format!("g{i}"), 1)).collect()
    }

    fn refs(v: &[(String, u32)]) -> Vec<(&str, u32)> {
        v.iter().map(|(n, w)| (n.as_str(), *w)).collect()
    }

    /// 100k pseudo-random user ids (a fixed LCG, so the test is deterministic).
    fn keys() -> Vec<u64> {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        (0..100_000)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                hash_key(format!("user-{x:x}").as_bytes())
            })
            .collect()
    }

    fn owners(p: &Policy, keys: &[u64]) -> Vec<usize> {
        keys.iter().map(|k| p.pick(*k, 0, &[])).collect()
    }

    /// The spread random keys would show anyway (multinomial noise): 4 sigma of a share.
    fn noise(n: usize, k: usize) -> f64 {
        4.0 * ((n as f64 - 1.0) / k as f64).sqrt()
    }

    #[test]
    fn balance_for_2_to_16_groups() {
        let keys = keys();
        for n in 2..=16 {
            let g = names(n);
            let p = policy(&refs(&g));
            let mut load = vec![0usize; n];
            for o in owners(&p, &keys) {
                load[o] += 1;
            }
            let mean = keys.len() as f64 / n as f64;
            let max = *load.iter().max().unwrap() as f64 / mean;
            // ≤ 1.01 where the sample allows it; beyond that, within what sampling alone gives.
            assert!(
                max <= 1.01_f64.max(1.0 + noise(n, keys.len())),
                "n={n}: max/mean {max:.4}"
            );
        }
    }

    #[test]
    fn weights_are_respected() {
        let keys = keys();
        let p = policy(&[("a", 1), ("b", 2), ("c", 5)]);
        let mut load = [0usize; 3];
        for o in owners(&p, &keys) {
            load[o] += 1;
        }
        for (i, w) in [1.0, 2.0, 5.0].iter().enumerate() {
            let share = load[i] as f64 / keys.len() as f64;
            assert!(
                (share - w / 8.0).abs() < 0.01,
                "group {i}: share {share:.4}"
            );
        }
    }

    #[test]
    fn adding_a_group_moves_only_its_share() {
        let keys = keys();
        for n in 2..=15 {
            let before = names(n);
            let after = names(n + 1);
            let (a, b) = (
                owners(&policy(&refs(&before)), &keys),
                owners(&policy(&refs(&after)), &keys),
            );
            let moved = a.iter().zip(&b).filter(|(x, y)| x != y).count() as f64 / keys.len() as f64;
            assert!(
                moved <= 1.0 / (n as f64 + 1.0) + 0.01,
                "n={n}: moved {moved:.4}"
            );
            // Every moved key moved to the new group.
            assert!(a.iter().zip(&b).all(|(x, y)| x == y || *y == n));
        }
    }

    #[test]
    fn removing_a_group_moves_only_its_keys() {
        let keys = keys();
        let all = names(8);
        let without: Vec<(String, u32)> = all.iter().filter(|(n, _)| n != "g3").cloned().collect();
        let (p8, p7) = (policy(&refs(&all)), policy(&refs(&without)));
        for k in &keys {
            let (o8, o7) = (p8.pick(*k, 0, &[]), p7.pick(*k, 0, &[]));
            if o8 != 3 {
                assert_eq!(p8.groups[o8].name, p7.groups[o7].name);
            }
        }
    }

    #[test]
    fn same_config_same_mapping_whatever_the_group_order() {
        let keys = keys();
        let a = policy(&[("x", 1), ("y", 1), ("z", 1)]);
        let b = policy(&[("z", 1), ("x", 1), ("y", 1)]);
        for k in keys.iter().take(5_000) {
            assert_eq!(
                a.groups[a.pick(*k, 0, &[])].name,
                b.groups[b.pick(*k, 0, &[])].name
            );
        }
    }

    #[test]
    fn failover_goes_to_the_keys_next_group_and_recovers() {
        let p = policy(&[("a", 1), ("b", 1), ("c", 1)]);
        let keys = keys();
        let first = owners(&p, &keys);
        for _ in 0..3 {
            p.failed(0, 1_000);
        }
        assert!(p.is_down(0, 1_000));
        for (k, o) in keys.iter().zip(&first).take(10_000) {
            let now = p.pick(*k, 1_000, &[]);
            if *o == 0 {
                assert_eq!(now, p.preference(*k)[1], "a's keys go to their next group");
            } else {
                assert_eq!(now, *o, "other keys stay");
            }
        }
        // After recover_after_ms the group is tried again.
        assert!(!p.is_down(0, 11_000));
        for (k, o) in keys.iter().zip(&first).take(1_000) {
            assert_eq!(
                p.pick(*k, 11_000, &[]),
                *o,
                "recovered: every key back home"
            );
        }
    }

    #[test]
    fn excluded_groups_are_skipped_within_one_exchange() {
        let p = policy(&[("a", 1), ("b", 1)]);
        let k = hash_key(b"u1");
        let first = p.pick(k, 0, &[]);
        assert_ne!(p.pick(k, 0, &[first]), first);
        assert_eq!(
            p.pick(k, 0, &[0, 1]),
            first,
            "nothing left: the key's own group"
        );
    }

    #[test]
    fn config_errors_name_the_field() {
        let base = r#"{"groups":[{"name":"a","target":"ca"}]"#;
        for (extra, field) in [
            (r#","key":["query:u"]"#, "routing.key[0]"),
            (r#","missing_key":"group:zzz""#, "routing.missing_key"),
            (r#","missing_key":"drop""#, "routing.missing_key"),
            (r#","unhealthy_after":0"#, "routing.unhealthy_after"),
        ] {
            let cfg: RoutingConfig = serde_json::from_str(&format!("{base}{extra}}}")).unwrap();
            assert_eq!(Policy::compile(&cfg, "routing").unwrap_err().path, field);
        }
        let dup: RoutingConfig = serde_json::from_str(
            r#"{"groups":[{"name":"a","target":"x"},{"name":"a","target":"y"}]}"#,
        )
        .unwrap();
        assert_eq!(
            Policy::compile(&dup, "routing").unwrap_err().path,
            "routing.groups[1].name"
        );
    }

    #[test]
    fn cookies() {
        assert_eq!(cookie("a=1; uid=42; b=2", "uid"), Some("42"));
        assert_eq!(cookie("uid2=1", "uid"), None);
    }
}
