//! What clients are told about maintenance windows before and while they happen: a
//! `Maintenance-Notice` header on responses in the `notice_s` before a window opens, and a
//! schedule path rollsafe answers itself with the coming windows as JSON. Pure: spans and the
//! time are arguments; what is built is kept per worker until the schedule changes, so a
//! request outside the notice period costs one comparison.

use crate::config::error::ConfigError;
use crate::method::Method;
use std::cell::RefCell;
use std::rc::Rc;

/// The response header announcing the next window.
pub const NOTICE_HEADER: &str = "maintenance-notice";

/// How many coming windows the schedule lists.
pub const SCHEDULE_LEN: usize = 10;

/// The compiled `notice_s` / `schedule_path` of a `maintenance` section.
#[derive(Debug, Default)]
pub struct Announce {
    pub notice_ms: u64,
    pub schedule_path: Option<String>,
    /// The methods windows turn away (empty: all), as written.
    methods: Vec<&'static str>,
    http_date: bool,
    /// The notice of the span starting at `.0`, built once.
    notice: RefCell<Option<(u64, Rc<str>)>>,
    /// The schedule document and until when it holds.
    schedule: RefCell<Option<(u64, Rc<[u8]>)>>,
}

impl Announce {
    pub fn compile(
        notice_s: u64,
        schedule_path: Option<&str>,
        methods: &[Method],
        http_date: bool,
        at: &str,
    ) -> Result<Announce, ConfigError> {
        if notice_s > 604_800 {
            return Err(ConfigError::new(
                format!("{at}.notice_s"),
                format!("must be 0..=604800 (7 days), got {notice_s}"),
            ));
        }
        if let Some(p) = schedule_path {
            if !p.starts_with('/') || p.contains('?') || p.contains('*') {
                return Err(ConfigError::new(
                    format!("{at}.schedule_path"),
                    format!("must be a path starting with '/', without a query, got {p:?}"),
                ));
            }
        }
        Ok(Announce {
            notice_ms: notice_s * 1000,
            schedule_path: schedule_path.map(str::to_string),
            methods: methods.iter().map(|m| m.as_str()).collect(),
            http_date,
            notice: RefCell::default(),
            schedule: RefCell::default(),
        })
    }

    /// The notice header's value when the span `[start, end)` opens within the notice period
    /// after `now`; `None` outside it (one comparison).
    pub fn notice(&self, now: u64, start: u64, end: impl FnOnce() -> u64) -> Option<Rc<str>> {
        if self.notice_ms == 0 || start <= now || start - now > self.notice_ms {
            return None;
        }
        let mut cached = self.notice.try_borrow_mut().ok()?;
        if let Some((s, v)) = cached.as_ref() {
            if *s == start {
                return Some(Rc::clone(v));
            }
        }
        let value: Rc<str> = notice_value(start, end(), &self.methods).into();
        *cached = Some((start, Rc::clone(&value)));
        Some(value)
    }

    /// The schedule document at `now` and how long it may be cached (s); `spans` computes the
    /// coming spans when the kept document no longer holds.
    pub fn schedule(&self, now: u64, spans: impl FnOnce() -> Vec<(u64, u64)>) -> (Rc<[u8]>, u64) {
        let kept = self
            .schedule
            .try_borrow()
            .ok()
            .and_then(|c| c.as_ref().filter(|(until, _)| now < *until).cloned());
        let (until, doc) = match kept {
            Some(k) => k,
            None => {
                let spans = spans();
                // Holds until the first listed span starts or ends.
                let until = spans
                    .first()
                    .map_or(now + 3_600_000, |&(s, e)| if s > now { s } else { e });
                let doc: Rc<[u8]> =
                    schedule_json(&spans, now, &self.methods, self.http_date).into();
                if let Ok(mut c) = self.schedule.try_borrow_mut() {
                    *c = Some((until, Rc::clone(&doc)));
                }
                (until, doc)
            }
        };
        // Cached by clients no longer than a minute, nor past the next change.
        let max_age = until.saturating_sub(now).div_ceil(1000).clamp(1, 60);
        (doc, max_age)
    }
}

/// RFC 3339, UTC, whole seconds.
fn utc(ms: u64) -> String {
    crate::dates::rfc3339(ms.div_ceil(1000))
}

fn http_date(ms: u64) -> String {
    crate::dates::http_date(ms / 1000)
}

/// `start="<HTTP-date>", end="<HTTP-date>", methods=("POST" "PUT")` (an RFC 8941 dictionary;
/// `methods=*` when every method is turned away).
fn notice_value(start: u64, end: u64, methods: &[&str]) -> String {
    let methods = if methods.is_empty() {
        "*".to_string()
    } else {
        let quoted: Vec<String> = methods.iter().map(|m| format!("\"{m}\"")).collect();
        format!("({})", quoted.join(" "))
    };
    format!(
        "start=\"{}\", end=\"{}\", methods={methods}",
        http_date(start),
        http_date(end)
    )
}

fn schedule_json(spans: &[(u64, u64)], now: u64, methods: &[&str], http_date: bool) -> Vec<u8> {
    let windows: Vec<serde_json::Value> = spans
        .iter()
        .map(|&(s, e)| {
            serde_json::json!({
                "start": utc(s),
                "end": utc(e),
                "active": s <= now && now < e,
            })
        })
        .collect();
    let methods: serde_json::Value = if methods.is_empty() {
        "all".into()
    } else {
        methods.to_vec().into()
    };
    let retry_after = if http_date {
        "the window's end as an HTTP-date"
    } else {
        "seconds until the window's end, rounded up"
    };
    let doc = serde_json::json!({
        "windows": windows,
        "methods": methods,
        "status": 503,
        "retry_after": retry_after,
    });
    let mut out = serde_json::to_vec(&doc).unwrap_or_default();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3_600_000;

    fn announce(notice_s: u64, methods: &[Method]) -> Announce {
        Announce::compile(
            notice_s,
            Some("/.well-known/maintenance"),
            methods,
            false,
            "m",
        )
        .unwrap()
    }

    #[test]
    fn the_notice_appears_only_within_the_notice_period_and_names_the_window() {
        let a = announce(600, &[Method::POST, Method::PUT]);
        let start = 1_764_900_000_000; // Fri, 05 Dec 2025 02:00:00 GMT
        assert_eq!(a.notice(start - 601_000, start, || start + 2 * H), None);
        assert_eq!(
            a.notice(start, start, || start + 2 * H),
            None,
            "open: not a notice"
        );
        let v = a.notice(start - 600_000, start, || start + 2 * H).unwrap();
        assert_eq!(
            &*v,
            "start=\"Fri, 05 Dec 2025 02:00:00 GMT\", end=\"Fri, 05 Dec 2025 04:00:00 GMT\", methods=(\"POST\" \"PUT\")"
        );
        // Built once per span.
        let again = a.notice(start - 1_000, start, || unreachable!()).unwrap();
        assert!(Rc::ptr_eq(&v, &again));
        assert!(announce(600, &[])
            .notice(start - 1, start, || start + H)
            .unwrap()
            .ends_with("methods=*"));
        assert_eq!(
            announce(0, &[]).notice(start - 1, start, || start + H),
            None
        );
    }

    #[test]
    fn the_schedule_lists_the_spans_and_is_kept_until_the_first_changes() {
        let a = announce(0, &[]);
        let now = 10 * H;
        let (doc, max_age) = a.schedule(now, || vec![(11 * H, 12 * H), (35 * H, 36 * H)]);
        let v: serde_json::Value = serde_json::from_slice(&doc).unwrap();
        assert_eq!(v["windows"].as_array().unwrap().len(), 2);
        assert_eq!(v["windows"][0]["active"], false);
        assert_eq!(v["methods"], "all");
        assert_eq!(max_age, 60);
        // Kept: not computed again before the first span starts.
        let (kept, _) = a.schedule(now + 1, || unreachable!());
        assert!(Rc::ptr_eq(&doc, &kept));
        let (_, age) = a.schedule(11 * H - 5_000, || unreachable!());
        assert_eq!(age, 5, "never cached past the next change");
        let (inside, _) = a.schedule(11 * H + 1, || vec![(11 * H, 12 * H)]);
        let v: serde_json::Value = serde_json::from_slice(&inside).unwrap();
        assert_eq!(v["windows"][0]["active"], true);
    }

    #[test]
    fn bad_settings_are_refused_naming_the_field() {
        let e = Announce::compile(604_801, None, &[], false, "maintenance").unwrap_err();
        assert_eq!(e.path, "maintenance.notice_s");
        let e = Announce::compile(0, Some("status"), &[], false, "maintenance").unwrap_err();
        assert_eq!(e.path, "maintenance.schedule_path");
    }
}
