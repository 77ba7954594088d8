//! Maintenance windows: decides whether a request arrives inside a planned window and, if so,
//! until when. Pure: the time is an argument (ms since the Unix epoch, UTC).
//!
//! Windows are absolute (`start`/`end`, RFC 3339) or recurring in the style of GKE maintenance
//! windows (an RRULE subset: `FREQ=DAILY` or `FREQ=WEEKLY;BYDAY=…`, optional `UNTIL`, with a
//! start time of day and a duration). Overlapping or adjacent windows count as one span, so
//! `Retry-After` always points at the moment the service is really back.

use crate::config::error::ConfigError;
use crate::method;
pub use crate::method::Method;
use serde::Deserialize;
use std::cell::Cell;

const DAY_MS: u64 = 86_400_000;
const WEEK_MS: u64 = 7 * DAY_MS;
/// Longest chain of adjacent windows followed when computing a span's end: a schedule that is
/// closed for longer than this many consecutive windows still yields a finite `Retry-After`.
const MAX_CHAIN: usize = 1_000;

/// `maintenance` config section.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct MaintenanceConfig {
    /// The planned windows (at least one). Each is either absolute (`start`, `end`) or recurring
    /// (`rrule`, `start_time`, `duration_s`).
    #[cfg_attr(test, schemars(length(min = 1)))]
    pub windows: Vec<WindowConfig>,
    /// Methods turned away during a window; empty (the default) means every method. For a
    /// read-only mode list only the writes: `["POST", "PUT", "PATCH", "DELETE"]`.
    #[serde(default)]
    pub methods: Vec<Method>,
    /// Paths that stay open during a window: exact (`/healthz`), or a prefix when ending in `*`
    /// (`/status/*`). The query string is ignored.
    #[serde(default)]
    pub allow_paths: Vec<String>,
    /// Request header carrying the operator bypass token.
    #[serde(default = "default_bypass_header")]
    pub bypass_header: String,
    /// Lower-case hex SHA-256 of the bypass token; without it there is no bypass.
    #[cfg_attr(test, schemars(regex(pattern = r"^[0-9a-f]{64}$")))]
    #[serde(default)]
    pub bypass_token_sha256: Option<String>,
    /// `Retry-After` as seconds until the window ends (`delta`, default) or as an HTTP-date.
    #[serde(default)]
    pub retry_after: RetryAfterFormat,
    /// Seconds before a window opens during which every response on the route announces it in
    /// a `Maintenance-Notice` header (0, the default: no notice).
    #[serde(default)]
    #[cfg_attr(test, schemars(range(max = 604800)))]
    pub notice_s: u64,
    /// A path rollsafe answers itself with the coming windows as JSON (e.g.
    /// `/.well-known/maintenance`), reachable during a window too; absent: none.
    #[serde(default)]
    pub schedule_path: Option<String>,
}

fn default_bypass_header() -> String {
    "x-maintenance-bypass".into()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum RetryAfterFormat {
    #[default]
    Delta,
    HttpDate,
}

/// One window as written in the config. Parsed through a flat struct so that a wrong
/// combination is reported with the field that is missing or extra, not as "no variant matched".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// Absolute window start, RFC 3339 UTC (`2026-12-05T02:00:00Z`), inclusive.
    #[serde(default)]
    pub start: Option<String>,
    /// Absolute window end, RFC 3339 UTC, exclusive.
    #[serde(default)]
    pub end: Option<String>,
    /// Recurrence, an RRULE subset: `FREQ=DAILY` or `FREQ=WEEKLY;BYDAY=SA,SU`, optionally
    /// `;UNTIL=20270101T000000Z` (no occurrence starts at or after it).
    #[serde(default)]
    pub rrule: Option<String>,
    /// Start of each recurring occurrence, `HH:MM` UTC.
    #[serde(default)]
    pub start_time: Option<String>,
    /// Length of each recurring occurrence in seconds (at most one day for `DAILY`, one week
    /// for `WEEKLY`).
    #[serde(default)]
    pub duration_s: Option<u64>,
}

#[cfg(test)]
mod window_schema {
    //! The schema Kong sees for a window: exactly one of the two shapes.
    use schemars::JsonSchema;

    #[allow(dead_code)]
    #[derive(JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct Absolute {
        /// Window start, RFC 3339 UTC (`2026-12-05T02:00:00Z`), inclusive.
        #[schemars(regex(pattern = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|\+00:00)$"))]
        start: String,
        /// Window end, RFC 3339 UTC, exclusive.
        #[schemars(regex(pattern = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|\+00:00)$"))]
        end: String,
    }

    #[allow(dead_code)]
    #[derive(JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct Recurring {
        /// RRULE subset: `FREQ=DAILY` or `FREQ=WEEKLY;BYDAY=SA,SU`, optionally `;UNTIL=…`.
        #[schemars(regex(
            pattern = r"^(RRULE:)?(FREQ=(DAILY|WEEKLY)|BYDAY=[A-Z]{2}(,[A-Z]{2})*|UNTIL=[0-9]{8}(T[0-9]{6}Z)?)(;(FREQ=(DAILY|WEEKLY)|BYDAY=[A-Z]{2}(,[A-Z]{2})*|UNTIL=[0-9]{8}(T[0-9]{6}Z)?))*$"
        ))]
        rrule: String,
        /// Start of each occurrence, `HH:MM` UTC.
        #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
        start_time: String,
        /// Length of each occurrence in seconds.
        #[schemars(range(min = 1, max = 604800))]
        duration_s: u64,
    }

    #[allow(dead_code)]
    #[derive(JsonSchema)]
    #[serde(untagged)]
    pub enum Window {
        Absolute(Absolute),
        Recurring(Recurring),
    }
}

#[cfg(test)]
impl schemars::JsonSchema for WindowConfig {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Window".into()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        window_schema::Window::json_schema(generator)
    }
}

/// A compiled window.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Window {
    Absolute {
        start: u64,
        end: u64,
    },
    Recurring {
        /// Bit d set: occurrences start on weekday d (0 = Monday). All bits for DAILY.
        days: u8,
        /// Offset of each occurrence's start into its UTC day.
        offset: u64,
        duration: u64,
        until: Option<u64>,
    },
}

/// 1970-01-01 was a Thursday (weekday 3 counting from Monday = 0).
fn weekday(day: u64) -> u8 {
    ((day + 3) % 7) as u8
}

impl Window {
    fn occurrence_on(&self, day: u64) -> Option<(u64, u64)> {
        match *self {
            Window::Absolute { .. } => None,
            Window::Recurring {
                days,
                offset,
                duration,
                until,
            } => {
                let start = day.checked_mul(DAY_MS)?.checked_add(offset)?;
                let on_day = days & (1 << weekday(day)) != 0;
                let before_until = until.is_none_or(|u| start < u);
                (on_day && before_until).then(|| (start, start.saturating_add(duration)))
            }
        }
    }

    /// The occurrence `[start, end)` that contains `t`.
    fn containing(&self, t: u64) -> Option<(u64, u64)> {
        match *self {
            Window::Absolute { start, end } => (start <= t && t < end).then_some((start, end)),
            Window::Recurring { .. } => {
                let today = t / DAY_MS;
                // An occurrence lasts at most a week, so it started within the last 8 days.
                (today.saturating_sub(8)..=today)
                    .filter_map(|d| self.occurrence_on(d))
                    .filter(|&(s, e)| s <= t && t < e)
                    .max_by_key(|&(_, e)| e)
            }
        }
    }

    /// The first occurrence start strictly after `t`.
    fn next_start_after(&self, t: u64) -> Option<u64> {
        match *self {
            Window::Absolute { start, .. } => (start > t).then_some(start),
            Window::Recurring { .. } => {
                let today = t / DAY_MS;
                (today..=today + 8)
                    .filter_map(|d| self.occurrence_on(d))
                    .map(|(s, _)| s)
                    .find(|&s| s > t)
            }
        }
    }
}

/// Whether requests are turned away at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Open; the next window starts at `next_start` (if any).
    Open { next_start: Option<u64> },
    /// Inside a maintenance span that ends at `until` (exclusive).
    Closed { until: u64 },
}

/// The compiled schedule plus the request allowlists.
#[derive(Debug)]
pub struct Policy {
    windows: Vec<Window>,
    /// Bit per [`Method`]; 0 = every method.
    methods: u8,
    exact_paths: Vec<String>,
    prefix_paths: Vec<String>,
    pub bypass_header: String,
    bypass_token_sha256: Option<[u8; 32]>,
    pub retry_after: RetryAfterFormat,
    /// Per-worker memo of the last state and until when it holds, so requests outside a window
    /// cost one clock read and a comparison.
    memo: Cell<Option<(u64, u64, State)>>,
    /// What clients are told before and about the windows (`crate::announce`).
    pub announce: crate::announce::Announce,
}

/// What to do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Pass,
    /// Inside a window but allowlisted (path or method) — not counted as a bypass.
    Allowed,
    /// Inside a window, let through by the operator bypass token.
    Bypassed,
    /// Answer 503; the span ends at `until` (ms).
    Reject {
        until: u64,
    },
}

/// The request facts the policy looks at, read by the host layer only when a window is active.
pub struct RequestFacts<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub bypass_token: Option<&'a str>,
}

impl Policy {
    pub fn compile(cfg: &MaintenanceConfig, at: &str) -> Result<Policy, ConfigError> {
        if cfg.windows.is_empty() {
            return Err(ConfigError::new(
                format!("{at}.windows"),
                "at least one window is required",
            ));
        }
        let windows = cfg
            .windows
            .iter()
            .enumerate()
            .map(|(i, w)| compile_window(w, &format!("{at}.windows[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let methods = method::set(&cfg.methods);
        let mut exact_paths = Vec::new();
        let mut prefix_paths = Vec::new();
        for (i, p) in cfg.allow_paths.iter().enumerate() {
            if !p.starts_with('/') {
                return Err(ConfigError::new(
                    format!("{at}.allow_paths[{i}]"),
                    format!("must start with '/', got {p:?}"),
                ));
            }
            match p.strip_suffix('*') {
                Some(prefix) => prefix_paths.push(prefix.to_string()),
                None => exact_paths.push(p.clone()),
            }
        }
        let bypass_token_sha256 = match &cfg.bypass_token_sha256 {
            None => None,
            Some(hex) => Some(parse_sha256_hex(hex).ok_or_else(|| {
                ConfigError::new(
                    format!("{at}.bypass_token_sha256"),
                    "must be 64 lower-case hex digits (the SHA-256 of the token)",
                )
            })?),
        };
        let header = cfg.bypass_header.to_ascii_lowercase();
        if header.is_empty() || !header.bytes().all(is_token_char) {
            return Err(ConfigError::new(
                format!("{at}.bypass_header"),
                format!("not a valid header name: {:?}", cfg.bypass_header),
            ));
        }
        Ok(Policy {
            windows,
            methods,
            exact_paths,
            prefix_paths,
            bypass_header: header,
            bypass_token_sha256,
            retry_after: cfg.retry_after,
            memo: Cell::new(None),
            announce: crate::announce::Announce::compile(
                cfg.notice_s,
                cfg.schedule_path.as_deref(),
                &cfg.methods,
                cfg.retry_after == RetryAfterFormat::HttpDate,
                at,
            )?,
        })
    }

    /// The state at `t`, merging overlapping and adjacent windows into one span.
    pub fn state_at(&self, t: u64) -> State {
        let Some(mut until) = self
            .windows
            .iter()
            .filter_map(|w| w.containing(t))
            .map(|(_, e)| e)
            .max()
        else {
            let next_start = self
                .windows
                .iter()
                .filter_map(|w| w.next_start_after(t))
                .min();
            return State::Open { next_start };
        };
        for _ in 0..MAX_CHAIN {
            match self
                .windows
                .iter()
                .filter_map(|w| w.containing(until))
                .map(|(_, e)| e)
                .max()
            {
                Some(e) if e > until => until = e,
                _ => break,
            }
        }
        State::Closed { until }
    }

    /// [`Policy::state_at`] memoised per worker until the next change of state. A clock that
    /// goes backwards invalidates the memo.
    pub fn state_now(&self, now: u64) -> State {
        if let Some((from, valid_until, state)) = self.memo.get() {
            if from <= now && now < valid_until {
                return state;
            }
        }
        let state = self.state_at(now);
        let valid_until = match state {
            State::Open { next_start } => next_start.unwrap_or(u64::MAX),
            State::Closed { until } => until,
        };
        self.memo.set(Some((now, valid_until, state)));
        state
    }

    /// The next `n` spans `[start, end)` that end after `now` (the one `now` is in first, if any),
    /// overlapping and adjacent windows merged.
    pub fn upcoming(&self, now: u64, n: usize) -> Vec<(u64, u64)> {
        let mut spans = Vec::with_capacity(n);
        let mut t = now;
        while spans.len() < n {
            let (start, probe) = match self.state_at(t) {
                State::Closed { .. } => {
                    let start = self
                        .windows
                        .iter()
                        .filter_map(|w| w.containing(t))
                        .map(|(s, _)| s)
                        .min()
                        .unwrap_or(t);
                    (start, t)
                }
                State::Open {
                    next_start: Some(s),
                } => (s, s),
                State::Open { next_start: None } => break,
            };
            let State::Closed { until } = self.state_at(probe) else {
                break;
            };
            spans.push((start, until));
            t = until;
        }
        spans
    }

    /// The end of the span that starts at `start`.
    pub fn span_end(&self, start: u64) -> u64 {
        match self.state_at(start) {
            State::Closed { until } => until,
            State::Open { .. } => start,
        }
    }

    /// The next window's start when none is active at `now` (memoised like [`Policy::active`]).
    pub fn next_start(&self, now: u64) -> Option<u64> {
        match self.state_now(now) {
            State::Open { next_start } => next_start,
            State::Closed { .. } => None,
        }
    }

    /// Whether a window is active at `now`; only then does the host read the request.
    pub fn active(&self, now: u64) -> Option<u64> {
        match self.state_now(now) {
            State::Closed { until } => Some(until),
            State::Open { .. } => None,
        }
    }

    /// The decision for a request that arrived while the span ending at `until` is active.
    pub fn decide(&self, until: u64, req: &RequestFacts) -> Decision {
        if self.methods != 0 && self.methods & method::mask(req.method) == 0 {
            return Decision::Allowed;
        }
        let path = req.path.split('?').next().unwrap_or(req.path);
        if self.exact_paths.iter().any(|p| p == path)
            || self
                .prefix_paths
                .iter()
                .any(|p| path.starts_with(p.as_str()))
        {
            return Decision::Allowed;
        }
        if let (Some(want), Some(token)) = (&self.bypass_token_sha256, req.bypass_token) {
            use sha2::{Digest, Sha256};
            let got: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            // Compare without an early exit so the token cannot be guessed by timing.
            if got.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0 {
                return Decision::Bypassed;
            }
        }
        Decision::Reject { until }
    }
}

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn parse_sha256_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// RFC 3339 in UTC (`Z` or `+00:00`) to ms since the epoch.
pub fn parse_utc(text: &str) -> Result<u64, String> {
    let normal = match text.strip_suffix("+00:00") {
        Some(head) => format!("{head}Z"),
        None => text.to_string(),
    };
    if !normal.ends_with('Z') {
        return Err(format!(
            "must be RFC 3339 in UTC (ending in Z), got {text:?}"
        ));
    }
    let t = humantime::parse_rfc3339(&normal)
        .map_err(|e| format!("must be RFC 3339 in UTC, got {text:?}: {e}"))?;
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .map_err(|_| format!("before 1970: {text:?}"))
}

/// RFC 3339 rendering of ms since the epoch (whole seconds), for problem bodies.
pub fn format_utc(ms: u64) -> String {
    crate::dates::rfc3339(ms.div_ceil(1000))
}

fn compile_window(w: &WindowConfig, at: &str) -> Result<Window, ConfigError> {
    let err = |field: &str, reason: String| ConfigError::new(format!("{at}.{field}"), reason);
    match (&w.start, &w.end, &w.rrule) {
        (Some(start), Some(end), None) => {
            for (field, present) in [
                ("start_time", w.start_time.is_some()),
                ("duration_s", w.duration_s.is_some()),
            ] {
                if present {
                    return Err(err(field, "only for recurring windows (with rrule)".into()));
                }
            }
            let s = parse_utc(start).map_err(|r| err("start", r))?;
            let e = parse_utc(end).map_err(|r| err("end", r))?;
            if e <= s {
                return Err(err("end", format!("must be after start ({start})")));
            }
            Ok(Window::Absolute { start: s, end: e })
        }
        (None, None, Some(rrule)) => {
            let start_time = w
                .start_time
                .as_deref()
                .ok_or_else(|| err("start_time", "required with rrule (HH:MM UTC)".into()))?;
            let offset = parse_hhmm(start_time).ok_or_else(|| {
                err(
                    "start_time",
                    format!("must be HH:MM (UTC), got {start_time:?}"),
                )
            })?;
            let duration_s = w
                .duration_s
                .ok_or_else(|| err("duration_s", "required with rrule".into()))?;
            let (days, until) = parse_rrule(rrule).map_err(|r| err("rrule", r))?;
            let max = if days == 0x7f && !rrule.contains("WEEKLY") {
                DAY_MS
            } else {
                WEEK_MS
            };
            let duration = duration_s.saturating_mul(1000);
            if duration == 0 || duration > max {
                return Err(err(
                    "duration_s",
                    format!(
                        "must be 1..={} for this rrule, got {duration_s}",
                        max / 1000
                    ),
                ));
            }
            Ok(Window::Recurring {
                days,
                offset,
                duration,
                until,
            })
        }
        (_, _, Some(_)) => Err(err(
            if w.start.is_some() { "start" } else { "end" },
            "a recurring window (rrule) takes start_time and duration_s, not start/end".into(),
        )),
        (Some(_), None, None) => Err(err("end", "required with start".into())),
        (None, Some(_), None) => Err(err("start", "required with end".into())),
        (None, None, None) => Err(ConfigError::new(
            at,
            "a window needs start and end, or rrule, start_time and duration_s",
        )),
    }
}

fn parse_hhmm(s: &str) -> Option<u64> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u64, u64) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some((h * 60 + m) * 60_000)
}

/// Parses the RRULE subset; returns the weekday mask and the optional UNTIL (ms).
fn parse_rrule(rule: &str) -> Result<(u8, Option<u64>), String> {
    let rule = rule.strip_prefix("RRULE:").unwrap_or(rule);
    let mut freq = None;
    let mut days = None;
    let mut until = None;
    for part in rule.split(';') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("expected KEY=VALUE, got {part:?}"))?;
        match key {
            "FREQ" => match value {
                "DAILY" | "WEEKLY" => freq = Some(value),
                _ => return Err(format!("FREQ must be DAILY or WEEKLY, got {value:?}")),
            },
            "BYDAY" => {
                let mut mask = 0u8;
                for d in value.split(',') {
                    let i = ["MO", "TU", "WE", "TH", "FR", "SA", "SU"]
                        .iter()
                        .position(|x| *x == d)
                        .ok_or_else(|| format!("unknown BYDAY day {d:?} (MO..SU)"))?;
                    mask |= 1 << i;
                }
                days = Some(mask);
            }
            "UNTIL" => until = Some(parse_rrule_until(value)?),
            _ => return Err(format!("unsupported RRULE part {key} (FREQ, BYDAY, UNTIL)")),
        }
    }
    match (freq, days) {
        (Some("DAILY"), None) => Ok((0x7f, until)),
        (Some("DAILY"), Some(_)) => Err("BYDAY goes with FREQ=WEEKLY".into()),
        (Some(_), Some(mask)) => Ok((mask, until)),
        (Some(_), None) => Err("FREQ=WEEKLY needs BYDAY (e.g. BYDAY=SA,SU)".into()),
        (None, _) => Err("FREQ is required".into()),
    }
}

/// `UNTIL=20270101` or `UNTIL=20270101T020000Z`.
fn parse_rrule_until(v: &str) -> Result<u64, String> {
    let bad = || format!("UNTIL must be YYYYMMDD or YYYYMMDDTHHMMSSZ, got {v:?}");
    let date = v.get(..8).ok_or_else(bad)?;
    let time = match v.get(8..) {
        Some("") => "000000",
        Some(t) => t
            .strip_prefix('T')
            .and_then(|t| t.strip_suffix('Z'))
            .ok_or_else(bad)?,
        None => return Err(bad()),
    };
    if time.len() != 6 || !date.bytes().chain(time.bytes()).all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let (y, mo, d) = (&date[..4], &date[4..6], &date[6..8]);
    let (h, mi, s) = (&time[..2], &time[2..4], &time[4..6]);
    parse_utc(&format!("{y}-{mo}-{d}T{h}:{mi}:{s}Z")).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> u64 {
        parse_utc(s).unwrap()
    }

    fn policy(json: &str) -> Policy {
        let cfg: MaintenanceConfig = serde_json::from_str(json).unwrap();
        Policy::compile(&cfg, "maintenance").unwrap()
    }

    fn compile_err(json: &str) -> ConfigError {
        let cfg: MaintenanceConfig = serde_json::from_str(json).unwrap();
        Policy::compile(&cfg, "maintenance").unwrap_err()
    }

    #[test]
    fn absolute_window_start_inclusive_end_exclusive() {
        let p = policy(
            r#"{"windows":[{"start":"2026-12-05T02:00:00Z","end":"2026-12-05T04:00:00Z"}]}"#,
        );
        let (s, e) = (t("2026-12-05T02:00:00Z"), t("2026-12-05T04:00:00Z"));
        assert_eq!(
            p.state_at(s - 1),
            State::Open {
                next_start: Some(s)
            }
        );
        assert_eq!(p.state_at(s), State::Closed { until: e });
        assert_eq!(p.state_at(e - 1), State::Closed { until: e });
        assert_eq!(p.state_at(e), State::Open { next_start: None });
    }

    #[test]
    fn weekly_window_wraps_from_sunday_into_monday() {
        // Sundays 22:00 for 4 h: Monday 01:59 is still inside, Monday 02:00 is not.
        let p = policy(
            r#"{"windows":[{"rrule":"FREQ=WEEKLY;BYDAY=SU","start_time":"22:00","duration_s":14400}]}"#,
        );
        let sunday = t("2026-11-22T22:00:00Z"); // 2026-11-22 is a Sunday
        let monday_end = t("2026-11-23T02:00:00Z");
        assert_eq!(p.state_at(sunday), State::Closed { until: monday_end });
        assert_eq!(
            p.state_at(monday_end - 60_000),
            State::Closed { until: monday_end }
        );
        assert_eq!(
            p.state_at(monday_end),
            State::Open {
                next_start: Some(t("2026-11-29T22:00:00Z"))
            }
        );
        // Saturday is not a window day.
        assert!(matches!(
            p.state_at(t("2026-11-28T23:00:00Z")),
            State::Open { .. }
        ));
    }

    #[test]
    fn weekend_window_like_gke() {
        let p = policy(
            r#"{"windows":[{"rrule":"FREQ=WEEKLY;BYDAY=SA,SU","start_time":"02:00","duration_s":7200}]}"#,
        );
        assert_eq!(
            p.state_at(t("2026-11-21T03:00:00Z")), // Saturday
            State::Closed {
                until: t("2026-11-21T04:00:00Z")
            }
        );
        assert!(matches!(
            p.state_at(t("2026-11-24T03:00:00Z")),
            State::Open { .. }
        )); // Tuesday
    }

    #[test]
    fn overlapping_and_adjacent_windows_are_one_span() {
        let p = policy(
            r#"{"windows":[
            {"start":"2026-12-05T02:00:00Z","end":"2026-12-05T03:00:00Z"},
            {"start":"2026-12-05T03:00:00Z","end":"2026-12-05T04:00:00Z"},
            {"start":"2026-12-05T03:30:00Z","end":"2026-12-05T05:00:00Z"},
            {"rrule":"FREQ=DAILY","start_time":"05:00","duration_s":600}]}"#,
        );
        assert_eq!(
            p.state_at(t("2026-12-05T02:10:00Z")),
            State::Closed {
                until: t("2026-12-05T05:10:00Z")
            }
        );
        // Another day: only the daily window.
        assert_eq!(
            p.state_at(t("2026-12-06T05:01:00Z")),
            State::Closed {
                until: t("2026-12-06T05:10:00Z")
            }
        );
    }

    #[test]
    fn always_closed_schedule_still_gives_a_finite_end() {
        let p = policy(
            r#"{"windows":[{"rrule":"FREQ=DAILY","start_time":"00:00","duration_s":86400}]}"#,
        );
        match p.state_at(t("2026-11-22T10:00:00Z")) {
            State::Closed { until } => assert!(until > t("2026-11-22T10:00:00Z") + 100 * DAY_MS),
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn leap_day_and_far_future_windows() {
        let p = policy(
            r#"{"windows":[
            {"start":"2028-02-28T23:00:00Z","end":"2028-03-01T01:00:00Z"},
            {"start":"2199-01-01T00:00:00Z","end":"2199-01-02T00:00:00Z"}]}"#,
        );
        assert_eq!(
            p.state_at(t("2028-02-29T12:00:00Z")),
            State::Closed {
                until: t("2028-03-01T01:00:00Z")
            }
        );
        assert_eq!(
            p.state_at(t("2028-03-01T01:00:00Z")),
            State::Open {
                next_start: Some(t("2199-01-01T00:00:00Z"))
            }
        );
        assert!(matches!(
            p.state_at(t("2199-01-01T12:00:00Z")),
            State::Closed { .. }
        ));
        // Daily window on a leap day.
        let d =
            policy(r#"{"windows":[{"rrule":"FREQ=DAILY","start_time":"12:00","duration_s":60}]}"#);
        assert!(matches!(
            d.state_at(t("2028-02-29T12:00:30Z")),
            State::Closed { .. }
        ));
    }

    #[test]
    fn rrule_until_stops_occurrences() {
        let p = policy(
            r#"{"windows":[{"rrule":"FREQ=DAILY;UNTIL=20261201","start_time":"02:00","duration_s":3600}]}"#,
        );
        assert!(matches!(
            p.state_at(t("2026-11-30T02:30:00Z")),
            State::Closed { .. }
        ));
        assert_eq!(
            p.state_at(t("2026-12-01T02:30:00Z")),
            State::Open { next_start: None }
        );
    }

    #[test]
    fn memo_follows_the_clock_both_ways() {
        let p = policy(
            r#"{"windows":[{"start":"2026-12-05T02:00:00Z","end":"2026-12-05T04:00:00Z"}]}"#,
        );
        let s = t("2026-12-05T02:00:00Z");
        assert_eq!(p.active(s - 1000), None);
        assert_eq!(p.active(s), Some(t("2026-12-05T04:00:00Z")));
        assert_eq!(p.active(s - 1), None); // clock stepped back
        assert_eq!(p.active(t("2026-12-05T04:00:00Z")), None);
    }

    #[test]
    fn allowlists_and_bypass() {
        let token_sha = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"; // "test"
        let p = policy(&format!(
            r#"{{"windows":[{{"start":"2026-12-05T02:00:00Z","end":"2026-12-05T04:00:00Z"}}],
               "methods":["POST","DELETE"], "allow_paths":["/healthz","/status/*"],
               "bypass_token_sha256":"{token_sha}"}}"#
        ));
        let until = 42;
        let d = |method, path, token| {
            p.decide(
                until,
                &RequestFacts {
                    method,
                    path,
                    bypass_token: token,
                },
            )
        };
        assert_eq!(d("POST", "/orders", None), Decision::Reject { until });
        assert_eq!(d("GET", "/orders", None), Decision::Allowed);
        assert_eq!(d("POST", "/healthz", None), Decision::Allowed);
        assert_eq!(d("POST", "/healthz?full=1", None), Decision::Allowed);
        assert_eq!(d("POST", "/healthz/deep", None), Decision::Reject { until });
        assert_eq!(d("DELETE", "/status/db", None), Decision::Allowed);
        assert_eq!(d("POST", "/orders", Some("test")), Decision::Bypassed);
        assert_eq!(
            d("POST", "/orders", Some("wrong")),
            Decision::Reject { until }
        );
        // Only the listed methods are affected.
        assert_eq!(d("PROPFIND", "/orders", None), Decision::Allowed);
        // With no methods listed, every method is.
        let all = policy(
            r#"{"windows":[{"start":"2026-12-05T02:00:00Z","end":"2026-12-05T04:00:00Z"}]}"#,
        );
        let facts = RequestFacts {
            method: "PROPFIND",
            path: "/x",
            bypass_token: None,
        };
        assert_eq!(all.decide(until, &facts), Decision::Reject { until });
        let facts = RequestFacts {
            method: "GET",
            path: "/x",
            bypass_token: Some("test"),
        };
        assert_eq!(
            all.decide(until, &facts),
            Decision::Reject { until },
            "no token configured"
        );
    }

    #[test]
    fn invalid_windows_name_the_field() {
        let cases = [
            (r#"{"windows":[]}"#, "maintenance.windows"),
            (
                r#"{"windows":[{"start":"2026-12-05T04:00:00Z","end":"2026-12-05T02:00:00Z"}]}"#,
                "maintenance.windows[0].end",
            ),
            (
                r#"{"windows":[{"start":"2026-12-05 02:00","end":"2026-12-05T04:00:00Z"}]}"#,
                "maintenance.windows[0].start",
            ),
            (
                r#"{"windows":[{"start":"2026-12-05T02:00:00+02:00","end":"2026-12-05T04:00:00Z"}]}"#,
                "maintenance.windows[0].start",
            ),
            (
                r#"{"windows":[{"start":"2026-12-05T02:00:00Z"}]}"#,
                "maintenance.windows[0].end",
            ),
            (
                r#"{"windows":[{"rrule":"FREQ=MONTHLY","start_time":"02:00","duration_s":60}]}"#,
                "maintenance.windows[0].rrule",
            ),
            (
                r#"{"windows":[{"rrule":"FREQ=WEEKLY","start_time":"02:00","duration_s":60}]}"#,
                "maintenance.windows[0].rrule",
            ),
            (
                r#"{"windows":[{"rrule":"FREQ=WEEKLY;BYDAY=XX","start_time":"02:00","duration_s":60}]}"#,
                "maintenance.windows[0].rrule",
            ),
            (
                r#"{"windows":[{"rrule":"FREQ=DAILY;INTERVAL=2","start_time":"02:00","duration_s":60}]}"#,
                "maintenance.windows[0].rrule",
            ),
            (
                r#"{"windows":[{"rrule":"FREQ=DAILY;UNTIL=2026","start_time":"02:00","duration_s":60}]}"#,
                "maintenance.windows[0].rrule",
            ),
            (
                r#"{"windows":[{"rrule":"FREQ=DAILY","start_time":"24:00","duration_s":60}]}"#,
                "maintenance.windows[0].start_time",
            ),
            (
                r#"{"windows":[{"rrule":"FREQ=DAILY","start_time":"02:00","duration_s":90000}]}"#,
                "maintenance.windows[0].duration_s",
            ),
            (
                r#"{"windows":[{"rrule":"FREQ=DAILY","duration_s":60}]}"#,
                "maintenance.windows[0].start_time",
            ),
            (
                r#"{"windows":[{"rrule":"FREQ=DAILY","start_time":"02:00"}]}"#,
                "maintenance.windows[0].duration_s",
            ),
            (r#"{"windows":[{}]}"#, "maintenance.windows[0]"),
            (
                r#"{"windows":[{"start":"2026-12-05T02:00:00Z","end":"2026-12-05T04:00:00Z"}],"allow_paths":["healthz"]}"#,
                "maintenance.allow_paths[0]",
            ),
            (
                r#"{"windows":[{"start":"2026-12-05T02:00:00Z","end":"2026-12-05T04:00:00Z"}],"bypass_token_sha256":"abc"}"#,
                "maintenance.bypass_token_sha256",
            ),
            (
                r#"{"windows":[{"start":"2026-12-05T02:00:00Z","end":"2026-12-05T04:00:00Z"}],"bypass_header":"bad header"}"#,
                "maintenance.bypass_header",
            ),
        ];
        for (json, field) in cases {
            let e = compile_err(json);
            assert_eq!(e.path, field, "{json}: {e}");
        }
    }

    #[test]
    fn format_rounds_up_to_whole_seconds() {
        assert_eq!(
            format_utc(t("2026-12-05T04:00:00Z")),
            "2026-12-05T04:00:00Z"
        );
        assert_eq!(
            format_utc(t("2026-12-05T04:00:00Z") + 1),
            "2026-12-05T04:00:01Z"
        );
    }
}
