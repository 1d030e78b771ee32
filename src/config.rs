//! Plans and keys from a TOML file (feature `config`).
//!
//! The format, every field optional unless marked:
//!
//! ```toml
//! history_days = 90                                 # days of usage history kept per key
//! quota_status = 429                                # status of a used-up quota (e.g. 403)
//!
//! [[plans]]
//! name = "free"                                     # required
//! throttle = { rate = 2.0, burst = 5 }              # requests/s, bucket size
//! quota = { limit = 1000, period = "DAY" }          # DAY | WEEK | MONTH; optional offset, week_start
//! tokens = { per_minute = 40000 }                   # token budget (cost units); also per_day, per_month
//! concurrency = 2                                   # in-flight cap per key
//! failure = "open"                                  # open | closed (store failures)
//! shadow = false
//! [plans.methods]
//! "/v1/chat/completions/POST" = { rate = 1.0, burst = 2 }
//!
//! [[keys]]
//! id = "free-1"                                     # required: public id
//! value = "demo-free-key"                           # required: the secret clients send
//! plan = "free"                                     # required
//! enabled = true
//!
//! [stage]                                           # shared by all callers together
//! throttle = { rate = 100.0, burst = 200 }
//! [stage.methods]
//! "/v1/chat/completions/POST" = { rate = 20.0, burst = 40 }
//!
//! [anonymous]                                       # requests without a key
//! mode = "forbid"                                   # forbid (403) | ip (limit by client IP)
//! throttle = { rate = 1.0, burst = 5 }              # required with mode = "ip"
//! trusted_proxies = ["127.0.0.1/32"]
//!
//! [admin]
//! key = "change-me"                                 # the x-admin-key of admin routes
//! ```
//!
//! Unknown fields and bad values are errors that name the line, the column
//! and the field's path (`plans[0].throttle.rate`).
//!
//! ```
//! use tollgate::config::Config;
//!
//! let config = Config::from_toml(r#"
//! [[plans]]
//! name = "free"
//! throttle = { rate = 2.0, burst = 5 }
//!
//! [[keys]]
//! id = "free-1"
//! value = "demo-free-key"
//! plan = "free"
//! "#).unwrap();
//! let policy = config.policy().unwrap();
//!
//! let err = Config::from_toml("[[plans]]\nname = \"free\"\nthrottle = { rate = -1.0, burst = 5 }\n")
//!     .unwrap_err();
//! assert_eq!((err.line(), err.path()), (3, "plans[0].throttle.rate"));
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::Path;

use http::StatusCode;
use serde::Deserialize;
use toml::Spanned;

use crate::clock::Clock;
use crate::error::ConfigError;
use crate::extract::ClientIp;
use crate::plan::{
    Anonymous, ApiKey, FailureMode, MethodPath, Quota, Stage, Throttle, TokenBudget, UsagePlan,
};
use crate::policy::Policy;
use crate::window::{Period, Weekday};

/// A configuration file, checked and ready to build a [`Policy`] from.
#[derive(Clone)]
pub struct Config {
    plans: Vec<UsagePlan>,
    keys: Vec<ApiKey>,
    stage: Option<Stage>,
    anonymous: Anonymous,
    admin_key: Option<String>,
    history_days: Option<usize>,
    quota_status: StatusCode,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("plans", &self.plans)
            .field("keys", &self.keys)
            .field("stage", &self.stage)
            .field("anonymous", &self.anonymous)
            .field("admin_key", &self.admin_key.as_ref().map(|_| ".."))
            .finish_non_exhaustive()
    }
}

/// A configuration file that cannot be used: where, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFileError {
    file: Option<String>,
    line: usize,
    column: usize,
    path: String,
    message: String,
}

impl ConfigFileError {
    /// The line of the offending field, from 1 (0 when the file could not be read).
    pub fn line(&self) -> usize {
        self.line
    }

    /// The column, from 1.
    pub fn column(&self) -> usize {
        self.column
    }

    /// The field's path, such as `plans[0].throttle.rate` (empty when unknown).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What is wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file}:")?;
        }
        if self.line > 0 {
            write!(f, "{}:{}: ", self.line, self.column)?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigFileError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    plans: Vec<Spanned<PlanFile>>,
    #[serde(default)]
    keys: Vec<Spanned<KeyFile>>,
    stage: Option<StageFile>,
    anonymous: Option<Spanned<AnonymousFile>>,
    admin: Option<AdminFile>,
    history_days: Option<Spanned<i64>>,
    quota_status: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    name: Spanned<String>,
    throttle: Option<Spanned<ThrottleFile>>,
    quota: Option<Spanned<QuotaFile>>,
    tokens: Option<Spanned<TokensFile>>,
    concurrency: Option<Spanned<i64>>,
    #[serde(default)]
    failure: FailureFile,
    #[serde(default)]
    shadow: bool,
    #[serde(default)]
    methods: BTreeMap<Spanned<String>, Spanned<ThrottleFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ThrottleFile {
    rate: Spanned<f64>,
    burst: Spanned<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaFile {
    limit: Spanned<i64>,
    period: PeriodFile,
    #[serde(default)]
    offset: Option<Spanned<i64>>,
    week_start: Option<Weekday>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    per_minute: Option<Spanned<i64>>,
    per_day: Option<Spanned<i64>>,
    per_month: Option<Spanned<i64>>,
}

#[derive(Deserialize, Clone, Copy)]
enum PeriodFile {
    #[serde(rename = "DAY")]
    Day,
    #[serde(rename = "WEEK")]
    Week,
    #[serde(rename = "MONTH")]
    Month,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum FailureFile {
    #[default]
    Open,
    Closed,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    id: Spanned<String>,
    value: Spanned<String>,
    plan: Spanned<String>,
    #[serde(default = "yes")]
    enabled: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StageFile {
    throttle: Option<Spanned<ThrottleFile>>,
    #[serde(default)]
    methods: BTreeMap<Spanned<String>, Spanned<ThrottleFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnonymousFile {
    mode: ModeFile,
    throttle: Option<Spanned<ThrottleFile>>,
    #[serde(default)]
    trusted_proxies: Vec<Spanned<String>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum ModeFile {
    Forbid,
    Ip,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    key: Spanned<String>,
}

/// Turns semantic errors into located ones.
struct Checker<'a> {
    src: &'a str,
}

impl Checker<'_> {
    fn err(
        &self,
        span: Range<usize>,
        path: impl Into<String>,
        message: impl fmt::Display,
    ) -> ConfigFileError {
        let (line, column) = line_col(self.src, span.start);
        ConfigFileError {
            file: None,
            line,
            column,
            path: path.into(),
            message: message.to_string(),
        }
    }

    fn throttle(&self, t: &Spanned<ThrottleFile>, path: &str) -> Result<Throttle, ConfigFileError> {
        let v = t.get_ref();
        let burst = u32::try_from(*v.burst.get_ref()).map_err(|_| {
            self.err(
                v.burst.span(),
                format!("{path}.burst"),
                "burst must be between 1 and 4294967295",
            )
        })?;
        Throttle::new(*v.rate.get_ref(), burst).map_err(|e| {
            let (span, field) = match e {
                ConfigError::ZeroBurst => (v.burst.span(), "burst"),
                _ => (v.rate.span(), "rate"),
            };
            self.err(span, format!("{path}.{field}"), e)
        })
    }

    fn positive(&self, n: &Spanned<i64>, path: String) -> Result<u64, ConfigFileError> {
        u64::try_from(*n.get_ref())
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| self.err(n.span(), path, "must be a whole number above zero"))
    }

    fn methods(
        &self,
        methods: &BTreeMap<Spanned<String>, Spanned<ThrottleFile>>,
        path: &str,
    ) -> Result<Vec<(String, Throttle)>, ConfigFileError> {
        methods
            .iter()
            .map(|(k, v)| {
                let p = format!("{path}.methods.\"{}\"", k.get_ref());
                MethodPath::parse(k.get_ref()).map_err(|e| self.err(k.span(), p.clone(), e))?;
                Ok((k.get_ref().clone(), self.throttle(v, &p)?))
            })
            .collect()
    }

    fn plan(&self, i: usize, p: &Spanned<PlanFile>) -> Result<UsagePlan, ConfigFileError> {
        let path = format!("plans[{i}]");
        let f = p.get_ref();
        let name = f.name.get_ref();
        if name.trim().is_empty() {
            return Err(self.err(f.name.span(), format!("{path}.name"), "must not be empty"));
        }
        let mut plan = UsagePlan::new(name.clone())
            .failure(match f.failure {
                FailureFile::Open => FailureMode::Open,
                FailureFile::Closed => FailureMode::Closed,
            })
            .shadow(f.shadow);
        if let Some(t) = &f.throttle {
            plan = plan.throttle(self.throttle(t, &format!("{path}.throttle"))?);
        }
        if let Some(q) = &f.quota {
            let qp = format!("{path}.quota");
            let qf = q.get_ref();
            let period = match (qf.period, qf.week_start) {
                (PeriodFile::Day, None) => Period::Day,
                (PeriodFile::Month, None) => Period::Month,
                (PeriodFile::Week, day) => Period::Week(day.unwrap_or_default()),
                (_, Some(_)) => {
                    return Err(self.err(
                        q.span(),
                        format!("{qp}.week_start"),
                        "only a WEEK quota has a start day",
                    ));
                }
            };
            let limit = self.positive(&qf.limit, format!("{qp}.limit"))?;
            let mut quota = Quota::new(limit, period)
                .map_err(|e| self.err(qf.limit.span(), format!("{qp}.limit"), e))?;
            if let Some(offset) = &qf.offset {
                let o = u64::try_from(*offset.get_ref()).map_err(|_| {
                    self.err(
                        offset.span(),
                        format!("{qp}.offset"),
                        "must not be negative",
                    )
                })?;
                quota = quota
                    .with_offset(o)
                    .map_err(|e| self.err(offset.span(), format!("{qp}.offset"), e))?;
            }
            plan = plan.quota(quota);
        }
        if let Some(t) = &f.tokens {
            let tf = t.get_ref();
            let mut budget = TokenBudget::new();
            if let Some(v) = &tf.per_minute {
                let field = format!("{path}.tokens.per_minute");
                let n = self.positive(v, field.clone())?;
                let n = u32::try_from(n)
                    .map_err(|_| self.err(v.span(), field.clone(), "is too large"))?;
                budget = budget
                    .per_minute(n)
                    .map_err(|e| self.err(v.span(), field, e))?;
            }
            for (name, v, set) in [
                (
                    "per_day",
                    &tf.per_day,
                    TokenBudget::per_day as fn(TokenBudget, u64) -> _,
                ),
                ("per_month", &tf.per_month, TokenBudget::per_month),
            ] {
                if let Some(v) = v {
                    let field = format!("{path}.tokens.{name}");
                    let n = self.positive(v, field.clone())?;
                    budget = set(budget, n).map_err(|e| self.err(v.span(), field, e))?;
                }
            }
            plan = plan.tokens(budget);
        }
        if let Some(c) = &f.concurrency {
            let n = self.positive(c, format!("{path}.concurrency"))?;
            let n = u32::try_from(n)
                .map_err(|_| self.err(c.span(), format!("{path}.concurrency"), "is too large"))?;
            plan = plan.concurrency(n);
        }
        for (mp, t) in self.methods(&f.methods, &path)? {
            plan = plan.method(mp, t);
        }
        Ok(plan)
    }
}

impl Config {
    /// Parses and checks a configuration.
    pub fn from_toml(src: &str) -> Result<Config, ConfigFileError> {
        let file: File = toml::from_str(src).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let (line, column) = line_col(src, span.start);
            ConfigFileError {
                file: None,
                line,
                column,
                path: path_at(src, span),
                message: e.message().trim_end().to_owned(),
            }
        })?;
        let c = Checker { src };

        let mut names = HashSet::new();
        let mut plans = Vec::with_capacity(file.plans.len());
        for (i, p) in file.plans.iter().enumerate() {
            let plan = c.plan(i, p)?;
            if !names.insert(plan.name().to_owned()) {
                let name = &p.get_ref().name;
                return Err(c.err(
                    name.span(),
                    format!("plans[{i}].name"),
                    format!("duplicate plan name `{}`", name.get_ref()),
                ));
            }
            plans.push(plan);
        }

        let mut ids = HashSet::new();
        let mut values: HashMap<&str, usize> = HashMap::new();
        let mut keys = Vec::with_capacity(file.keys.len());
        for (i, k) in file.keys.iter().enumerate() {
            let kf = k.get_ref();
            let path = format!("keys[{i}]");
            for (field, v) in [("id", &kf.id), ("value", &kf.value)] {
                if crate::extract::validate(
                    v.get_ref().as_bytes(),
                    crate::extract::DEFAULT_MAX_KEY_LEN,
                )
                .is_err()
                {
                    return Err(c.err(
                        v.span(),
                        format!("{path}.{field}"),
                        "must be 1 to 256 visible ASCII characters",
                    ));
                }
            }
            if !ids.insert(kf.id.get_ref().as_str()) {
                return Err(c.err(
                    kf.id.span(),
                    format!("{path}.id"),
                    format!("duplicate api key id `{}`", kf.id.get_ref()),
                ));
            }
            if let Some(first) = values.insert(kf.value.get_ref().as_str(), i) {
                return Err(c.err(
                    kf.value.span(),
                    format!("{path}.value"),
                    format!("same value as keys[{first}] (values must be unique)"),
                ));
            }
            if !names.contains(kf.plan.get_ref()) {
                return Err(c.err(
                    kf.plan.span(),
                    format!("{path}.plan"),
                    format!("unknown plan `{}`", kf.plan.get_ref()),
                ));
            }
            keys.push(
                ApiKey::new(
                    kf.id.get_ref().clone(),
                    kf.value.get_ref().clone(),
                    kf.plan.get_ref().clone(),
                )
                .enabled(kf.enabled),
            );
        }

        let stage = match &file.stage {
            None => None,
            Some(s) => {
                let mut stage = Stage::new();
                if let Some(t) = &s.throttle {
                    stage = stage.throttle(c.throttle(t, "stage.throttle")?);
                }
                for (mp, t) in c.methods(&s.methods, "stage")? {
                    stage = stage.method(mp, t);
                }
                Some(stage)
            }
        };

        let anonymous = match &file.anonymous {
            None => Anonymous::Forbid,
            Some(a) => {
                let af = a.get_ref();
                let mut nets = Vec::with_capacity(af.trusted_proxies.len());
                for (i, p) in af.trusted_proxies.iter().enumerate() {
                    let s = p.get_ref();
                    let net = s
                        .parse::<ipnet::IpNet>()
                        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                        .map_err(|_| {
                            c.err(
                                p.span(),
                                format!("anonymous.trusted_proxies[{i}]"),
                                format!("`{s}` is not an IP address or CIDR"),
                            )
                        })?;
                    nets.push(net);
                }
                match (af.mode, &af.throttle) {
                    (ModeFile::Forbid, _) => Anonymous::Forbid,
                    (ModeFile::Ip, Some(t)) => Anonymous::ByIp {
                        throttle: c.throttle(t, "anonymous.throttle")?,
                        client_ip: ClientIp::new().trust_proxies(nets),
                    },
                    (ModeFile::Ip, None) => {
                        return Err(c.err(
                            a.span(),
                            "anonymous.throttle",
                            "mode = \"ip\" needs a throttle",
                        ));
                    }
                }
            }
        };

        let admin_key = match &file.admin {
            None => None,
            Some(a) if a.key.get_ref().len() < 8 => {
                return Err(c.err(a.key.span(), "admin.key", "must be at least 8 characters"));
            }
            Some(a) => Some(a.key.get_ref().clone()),
        };

        let history_days = match &file.history_days {
            None => None,
            Some(d) => Some(
                usize::try_from(*d.get_ref())
                    .ok()
                    .filter(|&n| (31..=3660).contains(&n))
                    .ok_or_else(|| c.err(d.span(), "history_days", "must be 31 to 3660"))?,
            ),
        };
        let quota_status = match &file.quota_status {
            None => StatusCode::TOO_MANY_REQUESTS,
            Some(s) => u16::try_from(*s.get_ref())
                .ok()
                .and_then(|n| StatusCode::from_u16(n).ok())
                .filter(|s| s.is_client_error())
                .ok_or_else(|| c.err(s.span(), "quota_status", "must be a 4xx status code"))?,
        };

        Ok(Config {
            plans,
            keys,
            stage,
            anonymous,
            admin_key,
            history_days,
            quota_status,
        })
    }

    /// Reads, parses and checks a configuration file; errors name the file.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigFileError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|e| ConfigFileError {
            file: Some(name.clone()),
            line: 0,
            column: 0,
            path: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Config::from_toml(&src).map_err(|mut e| {
            e.file = Some(name);
            e
        })
    }

    /// Builds the policy, dating plan creation (for quota offsets) by the system clock.
    pub fn policy(&self) -> Result<Policy, ConfigError> {
        self.policy_with_clock(Clock::system())
    }

    /// Builds the policy, dating plan creation by `clock`.
    pub fn policy_with_clock(&self, clock: impl Into<Clock>) -> Result<Policy, ConfigError> {
        let mut b = Policy::builder()
            .clock(clock)
            .anonymous(self.anonymous.clone());
        for p in &self.plans {
            b = b.plan(p.clone());
        }
        for k in &self.keys {
            b = b.key(k.clone());
        }
        if let Some(s) = &self.stage {
            b = b.stage(s.clone());
        }
        if let Some(d) = self.history_days {
            b = b.history_days(d);
        }
        b.build()
    }

    /// The admin key (`[admin] key`), if any.
    pub fn admin_key(&self) -> Option<&str> {
        self.admin_key.as_deref()
    }

    /// The status of a request rejected by a used-up quota.
    pub fn quota_status(&self) -> StatusCode {
        self.quota_status
    }

    /// The plans.
    pub fn plans(&self) -> &[UsagePlan] {
        &self.plans
    }
}

/// Line and column (from 1) of byte `offset` in `src`.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

/// The dotted path of the field at `span`: the table header above it, then the
/// keys of the inline tables that enclose it on its line, then the key itself
/// when the span is a key (an unknown field).
fn path_at(src: &str, span: Range<usize>) -> String {
    let start = span.start.min(src.len());
    let line_start = src[..start].rfind('\n').map_or(0, |p| p + 1);
    let mut header: Vec<String> = Vec::new();
    let mut arrays: HashMap<String, usize> = HashMap::new();
    for line in src[..line_start].lines() {
        let t = line.trim();
        let (array, name) = if let Some(n) = t.strip_prefix("[[").and_then(|r| r.split("]]").next())
        {
            (true, n)
        } else if let Some(n) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            (false, n)
        } else {
            continue;
        };
        let name = name.trim();
        if array {
            *arrays.entry(name.to_owned()).or_default() += 1;
        }
        header.clear();
        let mut prefix = String::new();
        for part in name.split('.') {
            let part = part.trim().trim_matches('"');
            if !prefix.is_empty() {
                prefix.push('.');
            }
            prefix.push_str(part);
            match arrays.get(&prefix) {
                Some(n) => header.push(format!("{part}[{}]", n - 1)),
                None => header.push(part.to_owned()),
            }
        }
    }
    // Keys of the enclosing inline tables on this line.
    let prefix = &src[line_start..start];
    let mut stack: Vec<Option<String>> = vec![None];
    let mut chars = prefix.char_indices().peekable();
    let mut token = String::new();
    while let Some((_, ch)) = chars.next() {
        match ch {
            '"' | '\'' => {
                let mut s = String::new();
                while let Some((_, c)) = chars.next() {
                    if c == '\\' && ch == '"' {
                        chars.next();
                        continue;
                    }
                    if c == ch {
                        break;
                    }
                    s.push(c);
                }
                token = format!("\"{s}\"");
            }
            '=' => {
                if let Some(top) = stack.last_mut() {
                    *top = Some(std::mem::take(&mut token));
                }
            }
            '{' => stack.push(None),
            '}' => {
                stack.pop();
                if stack.is_empty() {
                    stack.push(None);
                }
            }
            ',' => {
                if let Some(top) = stack.last_mut() {
                    *top = None;
                }
                token.clear();
            }
            c if c.is_alphanumeric() || c == '_' || c == '-' || c == '.' => token.push(c),
            _ => {
                if !token.is_empty() && !ch.is_whitespace() {
                    token.clear();
                }
            }
        }
    }
    let mut parts = header;
    parts.extend(
        stack
            .into_iter()
            .flatten()
            .map(|k| k.trim_matches('"').to_owned()),
    );
    // The span itself is a key when `=` follows it.
    let end = span.end.min(src.len()).max(start);
    if src[end..].trim_start().starts_with('=') {
        parts.push(src[start..end].trim().trim_matches('"').to_owned());
    }
    parts.join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESIGN: &str = include_str!("../examples/inference_server.toml");

    #[test]
    fn the_design_example_loads() {
        let c = Config::from_toml(DESIGN).unwrap();
        assert_eq!(c.plans().len(), 2);
        assert_eq!(c.admin_key(), Some("change-me"));
        c.policy().unwrap();
    }

    fn err(src: &str) -> ConfigFileError {
        Config::from_toml(src).unwrap_err()
    }

    #[test]
    fn errors_name_line_and_field() {
        let e = err("[[plans]]\nname = \"free\"\nthrottle = { rate = -1.0, burst = 5 }\n");
        assert_eq!((e.line(), e.path()), (3, "plans[0].throttle.rate"));
        assert!(e.message().contains("invalid rate -1"), "{e}");

        let e = err(
            "[[plans]]\nname = \"a\"\n\n[[plans]]\nname = \"b\"\nthrottle = { rate = 1.0, burst = 0 }\n",
        );
        assert_eq!((e.line(), e.path()), (6, "plans[1].throttle.burst"));

        let e = err("[[plans]]\nname = \"free\"\nthrotle = { rate = 1.0, burst = 1 }\n");
        assert_eq!((e.line(), e.path()), (3, "plans[0].throtle"));
        assert!(e.message().contains("unknown field"), "{e}");

        let e = err("[[plans]]\nname = \"free\"\nthrottle = { rate = 1.0, brust = 1 }\n");
        assert_eq!((e.line(), e.path()), (3, "plans[0].throttle.brust"));

        let e = err("[[plans]]\nname = \"free\"\nquota = { limit = 10, period = \"YEAR\" }\n");
        assert_eq!((e.line(), e.path()), (3, "plans[0].quota.period"));

        let e = err("[[plans]]\nname = \"free\"\nthrottle = { rate = 1.0, burst = -3 }\n");
        assert_eq!((e.line(), e.path()), (3, "plans[0].throttle.burst"));

        let e = err(
            "[[plans]]\nname = \"free\"\n[[keys]]\nid = \"k\"\nvalue = \"v\"\nplan = \"pro\"\n",
        );
        assert_eq!((e.line(), e.path()), (6, "keys[0].plan"));
        assert!(e.message().contains("unknown plan `pro`"));

        let e = err(
            "[[plans]]\nname = \"free\"\n[plans.methods]\n\"/v1/x/POST\" = { rate = 0.0, burst = 1 }\n",
        );
        assert_eq!(
            (e.line(), e.path()),
            (4, "plans[0].methods.\"/v1/x/POST\".rate")
        );

        let e = err(
            "[anonymous]\nmode = \"ip\"\nthrottle = { rate = 1.0, burst = 1 }\ntrusted_proxies = [\"nope\"]\n",
        );
        assert_eq!((e.line(), e.path()), (4, "anonymous.trusted_proxies[0]"));

        let e = err("[stage]\nthrottle = { rate = 1.0, burst = 1 }\nextra = 1\n");
        assert_eq!((e.line(), e.path()), (3, "stage.extra"));

        let e = err("quota_status = 200\n");
        assert_eq!((e.line(), e.path()), (1, "quota_status"));

        let e = err("[[plans]]\nname = \"free\"\ntokens = { per_minute = 0 }\n");
        assert_eq!((e.line(), e.path()), (3, "plans[0].tokens.per_minute"));
        let e = err("[[plans]]\nname = \"free\"\ntokens = { per_minute = 5000000000 }\n");
        assert_eq!((e.line(), e.path()), (3, "plans[0].tokens.per_minute"));
        assert!(e.message().contains("too large"), "{e}");
        let e = err("[[plans]]\nname = \"free\"\n\ntokens = { per_month = -1 }\n");
        assert_eq!((e.line(), e.path()), (4, "plans[0].tokens.per_month"));
        let e = err("[[plans]]\nname = \"free\"\ntokens = { per_hour = 10 }\n");
        assert_eq!((e.line(), e.path()), (3, "plans[0].tokens.per_hour"));

        let shown = err("[[keys]]\nid = \"a\"\nvalue = \"s3cr3t\"\nplan = \"x\"\n[[keys]]\nid = \"b\"\nvalue = \"s3cr3t\"\nplan = \"x\"\n").to_string();
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }

    #[test]
    fn token_budgets_are_read() {
        let c = Config::from_toml(
            "[[plans]]\nname = \"llm\"\ntokens = { per_minute = 40000, per_day = 1000000, per_month = 20000000 }\n",
        )
        .unwrap();
        let layer = crate::RateLimitLayer::new(c.policy().unwrap());
        let plan = layer.admin().plan("llm").unwrap();
        let t = plan.get_tokens().unwrap();
        assert_eq!(
            (t.get_per_minute(), t.get_per_day(), t.get_per_month()),
            (Some(40_000), Some(1_000_000), Some(20_000_000))
        );
    }

    #[test]
    fn load_names_the_file() {
        let e = Config::load("/nonexistent/tollgate.toml").unwrap_err();
        assert!(
            e.to_string().starts_with("/nonexistent/tollgate.toml:"),
            "{e}"
        );
    }

    #[test]
    fn debug_hides_secrets() {
        let c = Config::from_toml(DESIGN).unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("demo-free-key") && !shown.contains("change-me"),
            "{shown}"
        );
    }
}
