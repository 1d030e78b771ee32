//! `Config`: a configuration file, checked and ready to build a policy from.
//!
//! Reading the file, parsing it, the checks across the whole document (unique
//! plan and account names, key ids and values, known plans and accounts, the stage, anonymous, admin
//! and global settings), and building the `Policy`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::time::Duration;

use http::StatusCode;

use super::check::Checker;
use super::document::{File, ModeFile};
use super::error::ConfigFileError;
use super::location::{line_col, path_at};
use crate::clock::Clock;
use crate::error::ConfigError;
use crate::extract::ClientIp;
use crate::plan::{Account, Anonymous, ApiKey, Stage, UsagePlan};
use crate::policy::Policy;
use crate::response::{DEFAULT_MAX_RETRY, ResponseStyle};

/// A configuration file, checked and ready to build a [`Policy`] from.
#[derive(Clone)]
pub struct Config {
    plans: Vec<UsagePlan>,
    accounts: Vec<Account>,
    keys: Vec<ApiKey>,
    stage: Option<Stage>,
    anonymous: Anonymous,
    admin_key: Option<String>,
    history_days: Option<usize>,
    quota_status: StatusCode,
    style: ResponseStyle,
    max_retry: Duration,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("plans", &self.plans)
            .field("accounts", &self.accounts)
            .field("keys", &self.keys)
            .field("stage", &self.stage)
            .field("anonymous", &self.anonymous)
            .field("admin_key", &self.admin_key.as_ref().map(|_| ".."))
            .finish_non_exhaustive()
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
                message: unshown(e.message().trim_end()),
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

        let mut account_names = HashSet::new();
        let mut accounts = Vec::with_capacity(file.accounts.len());
        for (i, a) in file.accounts.iter().enumerate() {
            let account = c.account(i, a)?;
            if !account_names.insert(account.name().to_owned()) {
                let name = &a.get_ref().name;
                return Err(c.err(
                    name.span(),
                    format!("accounts[{i}].name"),
                    format!("duplicate account name `{}`", name.get_ref()),
                ));
            }
            accounts.push(account);
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
            let mut key = ApiKey::new(
                kf.id.get_ref().clone(),
                kf.value.get_ref().clone(),
                kf.plan.get_ref().clone(),
            )
            .enabled(kf.enabled);
            if let Some(a) = &kf.account {
                if !account_names.contains(a.get_ref()) {
                    return Err(c.err(
                        a.span(),
                        format!("{path}.account"),
                        format!("unknown account `{}`", a.get_ref()),
                    ));
                }
                key = key.account(a.get_ref().clone());
            }
            keys.push(key);
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
                let throttle = af
                    .throttle
                    .as_ref()
                    .map(|t| c.throttle(t, "anonymous.throttle"))
                    .transpose()?;
                match (af.mode, throttle) {
                    (ModeFile::Forbid, _) => Anonymous::Forbid,
                    (ModeFile::Ip, Some(throttle)) => Anonymous::ByIp {
                        throttle,
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
            Some(a) => {
                let key = a.key.get_ref();
                if key.chars().count() < 8 {
                    return Err(c.err(a.key.span(), "admin.key", "must be at least 8 characters"));
                }
                // What an `x-admin-key` header can carry: HTTP trims the
                // whitespace around a value and allows no control character.
                if key.trim() != key || key.chars().any(char::is_control) {
                    return Err(c.err(
                        a.key.span(),
                        "admin.key",
                        "must not start or end with whitespace nor hold a control character (it is sent in the x-admin-key header)",
                    ));
                }
                Some(key.clone())
            }
        };

        let history_days = match &file.history_days {
            None => None,
            Some(d) => Some(
                usize::try_from(d.get_ref().0)
                    .ok()
                    .filter(|&n| (31..=3660).contains(&n))
                    .ok_or_else(|| c.err(d.span(), "history_days", "must be 31 to 3660"))?,
            ),
        };
        let quota_status = match &file.quota_status {
            None => StatusCode::TOO_MANY_REQUESTS,
            Some(s) => u16::try_from(s.get_ref().0)
                .ok()
                .and_then(|n| StatusCode::from_u16(n).ok())
                .filter(|s| s.is_client_error())
                .ok_or_else(|| c.err(s.span(), "quota_status", "must be a 4xx status code"))?,
        };

        let response = file.response.as_ref();
        let style = match response.and_then(|r| r.style.as_ref()) {
            None => ResponseStyle::Aws,
            Some(s) => ResponseStyle::from_name(s.get_ref()).ok_or_else(|| {
                c.err(s.span(), "response.style", "must be \"aws\" or \"openai\"")
            })?,
        };
        let max_retry = match response.and_then(|r| r.max_retry_secs.as_ref()) {
            None => DEFAULT_MAX_RETRY,
            Some(n) => u64::try_from(n.get_ref().0)
                .ok()
                .filter(|&n| n <= 31 * 86_400)
                .map(Duration::from_secs)
                .ok_or_else(|| {
                    c.err(
                        n.span(),
                        "response.max_retry_secs",
                        "must be 0 to 2678400 (31 days)",
                    )
                })?,
        };

        Ok(Config {
            plans,
            accounts,
            keys,
            stage,
            anonymous,
            admin_key,
            history_days,
            quota_status,
            style,
            max_retry,
        })
    }

    /// Reads, parses and checks a configuration file; errors name the file.
    ///
    /// A file with nothing in it (empty, or only blank lines and comments)
    /// is an error: it is more likely a deployment that failed to write it
    /// than a wish for no plans, no keys and no admin key. A file that is not
    /// UTF-8 is named at its first byte that is not.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigFileError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| ConfigFileError {
            file: Some(name.clone()),
            line: 0,
            column: 0,
            path: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        let src = match String::from_utf8(bytes) {
            Ok(src) => src,
            // Named where it stops being UTF-8, as any other error.
            Err(e) => {
                let valid = e.utf8_error().valid_up_to();
                let before = std::str::from_utf8(&e.as_bytes()[..valid]).unwrap_or_default();
                let (line, column) = line_col(before, valid);
                return Err(ConfigFileError {
                    file: Some(name),
                    line,
                    column,
                    path: path_at(before, valid..valid),
                    message: "not UTF-8 (a TOML file must be)".to_owned(),
                });
            }
        };
        if src.lines().all(|l| {
            let l = l.trim_start_matches('\u{feff}').trim();
            l.is_empty() || l.starts_with('#')
        }) {
            return Err(ConfigFileError {
                file: Some(name),
                line: 1,
                column: 1,
                path: String::new(),
                message: "the file is empty: it sets no plan, key or setting".to_owned(),
            });
        }
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
        for a in &self.accounts {
            b = b.account(a.clone());
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

    /// The status of a request rejected by a used-up quota (`quota_status`,
    /// default 429). [`RateLimitLayerBuilder::config`](crate::RateLimitLayerBuilder::config)
    /// gives it to the layer, with the rest of what the file says of its answers.
    pub fn quota_status(&self) -> StatusCode {
        self.quota_status
    }

    /// How rejections are answered (`[response] style`, default `"aws"`).
    /// [`RateLimitLayerBuilder::config`](crate::RateLimitLayerBuilder::config)
    /// gives it to the layer, with OpenAI's headers for `"openai"`.
    pub fn style(&self) -> ResponseStyle {
        self.style
    }

    /// The longest retry worth waiting for (`[response] max_retry_secs`,
    /// default 60).
    /// [`RateLimitLayerBuilder::config`](crate::RateLimitLayerBuilder::config)
    /// gives it to the layer.
    pub fn max_retry(&self) -> Duration {
        self.max_retry
    }

    /// The plans.
    pub fn plans(&self) -> &[UsagePlan] {
        &self.plans
    }

    /// The accounts (`[[accounts]]`).
    pub fn accounts(&self) -> &[Account] {
        &self.accounts
    }
}

/// serde's message in TOML's words and without the value it shows:
/// `invalid type: string "…", expected struct AdminFile` becomes `invalid
/// type: string, expected a table`. A value of the wrong type may be a
/// secret in the wrong place (`admin = "…"`, an API key's value written as
/// a number); the line and column point at it all the same.
fn unshown(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        let Some(rest) = message.strip_prefix(prefix) else {
            continue;
        };
        // The last one: a string shown may hold `, expected ` too.
        let Some(at) = rest.rfind(", expected ") else {
            continue;
        };
        let (shown, expected) = (&rest[..at], &rest[at + ", expected ".len()..]);
        // `string "…"`, `integer `5``, `floating point `1.5``, `boolean
        // `true``: the kind, then the value; `sequence` or `map` alone.
        let kind = match shown.find(['"', '`']) {
            Some(value) => shown[..value].trim_end(),
            None => shown,
        };
        let kind = match kind {
            "sequence" => "array",
            "map" => "table",
            "floating point" => "float",
            other => other,
        };
        let expected = match expected {
            "i64" | "u64" | "u32" | "usize" => "an integer",
            "f64" => "a number",
            "a map" => "a table",
            "a sequence" => "an array",
            // The plans, keys, throttles…
            e if e.starts_with("struct ") => "a table",
            // `period`, `failure`, `mode`, `week_start`: named in a string.
            e if e.starts_with("enum ") => "a string",
            e => e,
        };
        return format!("{prefix}{kind}, expected {expected}");
    }
    // toml's own, for a value of the wrong type where a name is wanted
    // (`period = 1`).
    if message == "wanted string or table" {
        return "invalid type, expected a string".to_owned();
    }
    message.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESIGN: &str = include_str!("../../gateway/demo.toml");

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

    /// A layer given the file answers as its `[response]` table and
    /// `quota_status` say: the style, the bound on a retry worth waiting
    /// for, the status of a used-up quota, and with `style = "openai"`
    /// OpenAI's `x-ratelimit-*` headers; a file that says nothing of them
    /// gives the defaults, whatever the builder was told before.
    #[test]
    fn a_layer_given_the_config_answers_as_the_file_says() {
        use crate::{RateLimitLayer, Reason};
        use tower::{ServiceBuilder, ServiceExt};

        let plans = "[[plans]]\nname = \"slow\"\nthrottle = { rate = 0.1, burst = 1 }\n[[plans]]\nname = \"day\"\nquota = { limit = 1, period = \"DAY\" }\n[[keys]]\nid = \"s\"\nvalue = \"slow-key\"\nplan = \"slow\"\n[[keys]]\nid = \"d\"\nvalue = \"day-key\"\nplan = \"day\"\n";
        let file = format!(
            "quota_status = 403\n[response]\nstyle = \"openai\"\nmax_retry_secs = 5\n{plans}"
        );
        let config = Config::from_toml(&file).unwrap();
        let layer = RateLimitLayer::builder(config.policy().unwrap())
            .config(&config)
            .build();
        layer.check(b"slow-key", 1).unwrap();
        let throttled = layer.check(b"slow-key", 1).unwrap_err();
        assert_eq!(throttled.style(), ResponseStyle::OpenAi);
        // 10 s away, past the file's 5 s.
        assert!(!throttled.should_retry());
        layer.check(b"day-key", 1).unwrap();
        let used_up = layer.check(b"day-key", 1).unwrap_err();
        assert_eq!(used_up.reason(), Reason::QuotaExceeded);
        assert_eq!(used_up.status(), StatusCode::FORBIDDEN);

        // OpenAI's headers, on a layer that takes keys from `x-api-key`.
        let svc = ServiceBuilder::new().layer(layer).service_fn(
            |_req: http::Request<crate::RequestBody<String>>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
            },
        );
        let req = http::Request::builder()
            .header("x-api-key", "slow-key")
            .body(String::new())
            .unwrap();
        let res = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(svc.oneshot(req))
            .unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(res.headers()["x-ratelimit-limit-requests"], "1");

        // A file without `[response]` answers in the default style.
        let config = Config::from_toml(plans).unwrap();
        let layer = RateLimitLayer::builder(config.policy().unwrap())
            .openai()
            .config(&config)
            .build();
        layer.check(b"slow-key", 1).unwrap();
        let throttled = layer.check(b"slow-key", 1).unwrap_err();
        assert_eq!(throttled.style(), ResponseStyle::Aws);
        assert!(throttled.should_retry());
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

        let e = err("[response]\nstyle = \"OpenAI\"\n");
        assert_eq!((e.line(), e.path()), (2, "response.style"));
        assert!(e.message().contains("\"openai\""), "{e}");
        let e = err("[response]\nstyle = \"aws\"\nmax_retry_secs = -1\n");
        assert_eq!((e.line(), e.path()), (3, "response.max_retry_secs"));
        let e = err("[response]\nretry = 1\n");
        assert_eq!((e.line(), e.path()), (2, "response.retry"));
        let ok =
            Config::from_toml("[response]\nstyle = \"openai\"\nmax_retry_secs = 30\n").unwrap();
        assert_eq!(ok.style(), ResponseStyle::OpenAi);
        assert_eq!(ok.max_retry(), Duration::from_secs(30));
        let default = Config::from_toml("").unwrap();
        assert_eq!(
            (default.style(), default.max_retry()),
            (ResponseStyle::Aws, DEFAULT_MAX_RETRY)
        );

        let e = err("[[plans]]\nname = \"free\"\ntokens = { per_minute = 0 }\n");
        assert_eq!((e.line(), e.path()), (3, "plans[0].tokens.per_minute"));
        let e = err("[[plans]]\nname = \"free\"\ntokens = { per_minute = 5000000000 }\n");
        assert_eq!((e.line(), e.path()), (3, "plans[0].tokens.per_minute"));
        assert!(e.message().contains("1 to 4294967295"), "{e}");
        let e = err("[[plans]]\nname = \"free\"\n\ntokens = { per_month = -1 }\n");
        assert_eq!((e.line(), e.path()), (4, "plans[0].tokens.per_month"));
        let e = err("[[plans]]\nname = \"free\"\ntokens = { per_hour = 10 }\n");
        assert_eq!((e.line(), e.path()), (3, "plans[0].tokens.per_hour"));

        let shown = err("[[keys]]\nid = \"a\"\nvalue = \"s3cr3t\"\nplan = \"x\"\n[[keys]]\nid = \"b\"\nvalue = \"s3cr3t\"\nplan = \"x\"\n").to_string();
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }

    /// A rate far out of range is named in a few characters, as written,
    /// not as the hundreds of digits of its decimal expansion.
    #[test]
    fn a_rate_far_out_of_range_is_named_in_a_few_characters() {
        for (rate, shown) in [
            ("1e300", "1e300"),
            ("1e-300", "1e-300"),
            ("-1e300", "-1e300"),
            ("2e9", "2000000000"),
            ("1.5e-12", "1.5e-12"),
        ] {
            let e = err(&format!(
                "[[plans]]\nname = \"free\"\nthrottle = {{ rate = {rate}, burst = 5 }}\n"
            ));
            assert_eq!((e.line(), e.path()), (3, "plans[0].throttle.rate"), "{e}");
            assert!(e.message().contains(&format!("rate {shown}")), "{e}");
            assert!(e.message().len() < 120, "{rate}: {e}");
        }
    }

    /// An integer beyond 64 bits is named by the range of its field, as
    /// any other out of range: it was "invalid type: integer, expected an
    /// integer", which says nothing a user can act on.
    #[test]
    fn an_integer_beyond_64_bits_is_named_by_its_fields_range() {
        let plan = "[[plans]]\nname = \"free\"\n";
        for n in [
            "9223372036854775808",
            "18446744073709551615",
            "99999999999999999999",
            "-9223372036854775809",
            "0xffffffffffffffffff",
            "-170141183460469231731687303715884105728",
            "340282366920938463463374607431768211455",
        ] {
            for (src, line, path, message) in [
                (
                    format!("{plan}throttle = {{ rate = 1.0, burst = {n} }}\n"),
                    3,
                    "plans[0].throttle.burst",
                    "between 1 and 4294967295",
                ),
                (
                    format!("{plan}quota = {{ limit = {n}, period = \"DAY\" }}\n"),
                    3,
                    "plans[0].quota.limit",
                    if n.starts_with('-') {
                        "above zero"
                    } else {
                        "between 1 and 2^53"
                    },
                ),
                (
                    format!("history_days = {n}\n"),
                    1,
                    "history_days",
                    "31 to 3660",
                ),
                (
                    format!("quota_status = {n}\n"),
                    1,
                    "quota_status",
                    "4xx status code",
                ),
                (
                    format!("[response]\nmax_retry_secs = {n}\n"),
                    2,
                    "response.max_retry_secs",
                    "0 to 2678400",
                ),
            ] {
                let e = err(&src);
                assert_eq!((e.line(), e.path()), (line, path), "{src}: {e}");
                assert!(e.message().contains(message), "{src}: {e}");
            }
        }
    }

    /// A number above its field's range names the bound, as one below it
    /// does: "is too large" left the user guessing how large is allowed.
    #[test]
    fn a_number_too_large_names_its_bound() {
        let plan = "[[plans]]\nname = \"free\"\n";
        for (src, path) in [
            (
                format!("{plan}concurrency = 4294967296\n"),
                "plans[0].concurrency",
            ),
            (
                format!("{plan}tokens = {{ per_minute = 5000000000 }}\n"),
                "plans[0].tokens.per_minute",
            ),
            (
                "[[accounts]]\nname = \"a\"\ntokens = { per_minute = 9223372036854775807 }\n"
                    .to_owned(),
                "accounts[0].tokens.per_minute",
            ),
        ] {
            let e = err(&src);
            assert_eq!((e.line(), e.path()), (3, path), "{src}: {e}");
            assert!(e.message().contains("1 to 4294967295"), "{src}: {e}");
        }
        let e = err(&format!(
            "{plan}[plans.models]\n\"m\" = {{ concurrency = 99999999999 }}\n"
        ));
        assert_eq!(
            (e.line(), e.path()),
            (4, "plans[0].models.\"m\".concurrency"),
            "{e}"
        );
        assert!(e.message().contains("1 to 4294967295"), "{e}");
    }

    /// The path of a syntax error is read from the text, which may be
    /// anything: a control character in it is written escaped (a raw ESC
    /// or NUL reached the terminal), and a path of thousands of keys is
    /// shortened in its middle (a header of 100,000 dotted keys made an
    /// error of 200 KB).
    #[test]
    fn a_path_read_from_the_text_is_printable_and_short() {
        for src in [
            "[admin]\nkey = \"change-me\"\n\u{1b}[2J = 1\n".to_owned(),
            "[response]\nstyle = \"aws\"\n\0\n".to_owned(),
            "[\"a\u{7f}b\"]\nx = 1\n".to_owned(),
            "\u{1b}]0;title\u{7}x = 1\n".to_owned(),
            format!("[{}]\n", vec!["a"; 100_000].join(".")),
            format!("x = {}1\n", "{a=".repeat(100_000)),
        ] {
            let e = err(&src);
            let shown = e.to_string();
            assert!(!shown.chars().any(char::is_control), "{shown:?}");
            assert!(
                shown.len() < 400,
                "{} bytes: {}",
                shown.len(),
                &shown[..400]
            );
        }
        let e = err("[admin]\nkey = \"change-me\"\n\u{1b}[2J = 1\n");
        assert_eq!(e.line(), 3, "{e}");
        assert!(e.to_string().contains(" admin.\\u{1b}"), "{e}");
        // The checks' own errors, which name what the file holds.
        let e = err(
            "[[plans]]\nname = \"p\"\n[[keys]]\nid = \"k\"\nvalue = \"v\"\nplan = \"p\\u001b[2J\"\n",
        );
        assert_eq!((e.line(), e.path()), (6, "keys[0].plan"), "{e}");
        assert!(e.to_string().ends_with("unknown plan `p\\u{1b}[2J`"), "{e}");
        let e = err("[[plans]]\nname = \"p\"\n[plans.methods]\n\"/\\u0000/GET\" = 5\n");
        assert!(!e.to_string().chars().any(char::is_control), "{e:?}");
    }

    /// Every field's bad values not tried elsewhere: each names its line and
    /// its field, and says what is wrong in the user's words.
    #[test]
    fn each_bad_value_names_its_line_and_field() {
        let plan = "[[plans]]\nname = \"free\"\n";
        let key = "[[keys]]\nid = \"k\"\nvalue = \"v\"\nplan = \"free\"\n";
        for (src, line, path, message) in [
            (
                format!("{plan}{plan}"),
                4,
                "plans[1].name",
                "duplicate plan name `free`",
            ),
            (
                format!("{plan}{key}{}", key.replace("\"v\"", "\"w\"")),
                8,
                "keys[1].id",
                "duplicate api key id `k`",
            ),
            (
                format!("{plan}quota = {{ limit = 5, period = \"DAY\", offset = -1 }}\n"),
                3,
                "plans[0].quota.offset",
                "must not be negative",
            ),
            (
                format!("{plan}quota = {{ limit = 5, period = \"DAY\", offset = 5 }}\n"),
                3,
                "plans[0].quota.offset",
                "offset must be below the limit",
            ),
            (
                format!("{plan}quota = {{ limit = 5, period = \"DAY\", week_start = \"SUNDAY\" }}\n"),
                3,
                "plans[0].quota.week_start",
                "only a WEEK quota has a start day",
            ),
            (
                format!("{plan}tokens = {{ per_day = 9007199254740993 }}\n"),
                3,
                "plans[0].tokens.per_day",
                "between 1 and 2^53",
            ),
            (
                format!("{plan}throttle = {{ rate = nan, burst = 5 }}\n"),
                3,
                "plans[0].throttle.rate",
                "finite number above zero",
            ),
            (
                format!("{plan}throttle = {{ rate = inf, burst = 5 }}\n"),
                3,
                "plans[0].throttle.rate",
                "finite number above zero",
            ),
            (
                format!("{plan}throttle = {{ rate = -inf, burst = 5 }}\n"),
                3,
                "plans[0].throttle.rate",
                "finite number above zero",
            ),
            (
                format!("{plan}failure = \"fail\"\n"),
                3,
                "plans[0].failure",
                "expected one of `local`, `open`, `closed`",
            ),
            (
                "[anonymous]\nmode = \"allow\"\n".to_owned(),
                2,
                "anonymous.mode",
                "expected `forbid` or `ip`",
            ),
            (
                "[anonymous]\nmode = \"forbid\"\ntrusted_proxies = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n"
                    .to_owned(),
                3,
                "anonymous.trusted_proxies[1]",
                "is not an IP address or CIDR",
            ),
            (
                "history_days = 30\n".to_owned(),
                1,
                "history_days",
                "must be 31 to 3660",
            ),
            (
                "quota_status = 600\n".to_owned(),
                1,
                "quota_status",
                "must be a 4xx status code",
            ),
            (
                format!("{plan}[plans.models]\n\"m\" = {{ failure = \"open\" }}\n"),
                4,
                "plans[0].models.\"m\".failure",
                "unknown field `failure`",
            ),
            (
                format!("{plan}[plans.methods]\n\"/v1/x\" = {{ rate = 1.0, burst = 1 }}\n"),
                4,
                "plans[0].methods.\"/v1/x\"",
                "must end with `/METHOD`",
            ),
        ] {
            let e = err(&src);
            assert_eq!((e.line(), e.path()), (line, path), "{src}: {e}");
            assert!(e.message().contains(message), "{src}: {e}");
        }
    }

    /// serde reports a field missing from a table at the table's header
    /// (or its inline table, or its dotted key): the path names that table,
    /// not the one above it.
    #[test]
    fn a_missing_field_is_named_in_the_table_it_is_missing_from() {
        let missing = |src: &str| {
            let e = err(src);
            assert!(e.message().contains("missing field"), "{e}");
            (e.line(), e.column(), e.path().to_owned())
        };
        let keys = "[[plans]]\nname = \"free\"\n\n[[keys]]\nid = \"a\"\nvalue = \"aaaaaaaa\"\nplan = \"free\"\n\n[[keys]]\nid = \"b\"\nvalue = \"bbbbbbbb\"\n";
        assert_eq!(missing(keys), (9, 1, "keys[1]".into()));
        let account = "[admin]\nkey = \"0123456789\"\n[[accounts]]\nquota = { limit = 5, period = \"DAY\" }\n";
        assert_eq!(missing(account), (3, 1, "accounts[0]".into()));
        let anonymous =
            "[[plans]]\nname = \"free\"\n[anonymous]\nthrottle = { rate = 1.0, burst = 1 }\n";
        assert_eq!(missing(anonymous), (3, 1, "anonymous".into()));
        let first = "[[plans]]\nthrottle = { rate = 2.0, burst = 5 }\n";
        assert_eq!(missing(first), (1, 1, "plans[0]".into()));

        // Dotted headers, inline tables and dotted keys.
        let header = "[[plans]]\nname = \"a\"\n[[plans]]\nname = \"b\"\n[plans.quota]\nlimit = 3\n";
        assert_eq!(missing(header), (5, 1, "plans[1].quota".into()));
        let inline = "[[plans]]\nname = \"free\"\nthrottle = { rate = 1.0 }\n";
        assert_eq!(missing(inline), (3, 12, "plans[0].throttle".into()));
        let nested =
            "[[plans]]\nname = \"free\"\n[plans.models]\n\"big\" = { throttle = { rate = 1.0 } }\n";
        assert_eq!(
            missing(nested),
            (4, 22, "plans[0].models.\"big\".throttle".into())
        );
        let dotted = "[[plans]]\nname = \"free\"\nthrottle.rate = 1.0\n";
        assert_eq!(missing(dotted), (3, 1, "plans[0].throttle".into()));
        let dotted = "[[plans]]\nname = \"a\"\nmodels.\"x\".throttle = { rate = 1.0 }\n";
        assert_eq!(
            missing(dotted),
            (3, 23, "plans[0].models.\"x\".throttle".into())
        );
        let stage = "[stage.throttle]\nburst = 1\n";
        assert_eq!(missing(stage), (1, 1, "stage.throttle".into()));

        // Arrays of inline tables, on one line or several.
        let array = "plans = [{ name = \"a\" }, { throttle = { rate = 1.0, burst = 1 } }]\n";
        assert_eq!(missing(array), (1, 26, "plans[1]".into()));
        let lines =
            "plans = [\n  { name = \"a\" },\n  { throttle = { rate = 1.0, burst = 1 } },\n]\n";
        assert_eq!(missing(lines), (3, 3, "plans[1]".into()));
    }

    /// A line inside a multi-line array or string that starts with `[` is no
    /// table header.
    #[test]
    fn a_bracket_inside_a_value_is_no_table_header() {
        let e = err("[anonymous]\nmode = \"ip\"\ntrusted_proxies = [\n[\"x\"],\n]\n");
        assert_eq!((e.line(), e.path()), (4, "anonymous.trusted_proxies[0]"));
        let e = err("[admin]\nkey = \"\"\"\n[[keys]]\n\"\"\"\nextra = 1\n");
        assert_eq!((e.line(), e.path()), (5, "admin.extra"));
        let e = err("[admin] # [[keys]]\nkey = 'a[b]c' # [plans]\nextra = 1\n");
        assert_eq!((e.line(), e.path()), (3, "admin.extra"));
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
    fn accounts_are_read_and_keys_bound_to_them() {
        let c = Config::from_toml(
            "[[plans]]\nname = \"free\"\n\n[[accounts]]\nname = \"acme\"\nthrottle = { rate = 5.0, burst = 10 }\nquota = { limit = 50000, period = \"MONTH\" }\ntokens = { per_day = 2000000 }\n\n[[keys]]\nid = \"k\"\nvalue = \"v\"\nplan = \"free\"\naccount = \"acme\"\n",
        )
        .unwrap();
        let a = &c.accounts()[0];
        assert_eq!(a.name(), "acme");
        assert_eq!(a.get_throttle().map(|t| t.burst()), Some(10));
        assert_eq!(a.get_quota().map(|q| q.limit()), Some(50_000));
        assert_eq!(
            a.get_tokens().and_then(|t| t.get_per_day()),
            Some(2_000_000)
        );
        let layer = crate::RateLimitLayer::new(c.policy().unwrap());
        assert!(layer.admin().account("acme").is_some());
    }

    #[test]
    fn account_errors_name_line_and_field() {
        let plan = "[[plans]]\nname = \"free\"\n";
        let e = err(&format!(
            "{plan}[[keys]]\nid = \"k\"\nvalue = \"v\"\nplan = \"free\"\naccount = \"nope\"\n"
        ));
        assert_eq!((e.line(), e.path()), (7, "keys[0].account"));
        assert!(e.message().contains("unknown account `nope`"), "{e}");

        let e = err("[[accounts]]\nname = \"a\"\n[[accounts]]\nname = \"a\"\n");
        assert_eq!((e.line(), e.path()), (4, "accounts[1].name"));
        assert!(e.message().contains("duplicate account name `a`"), "{e}");

        let e = err("[[accounts]]\nname = \"a\"\nthrottle = { rate = 0.0, burst = 1 }\n");
        assert_eq!((e.line(), e.path()), (3, "accounts[0].throttle.rate"));

        let e = err("[[accounts]]\nname = \"a\"\nquota = { limit = 0, period = \"DAY\" }\n");
        assert_eq!((e.line(), e.path()), (3, "accounts[0].quota.limit"));

        let e = err("[[accounts]]\nname = \"a\"\ntokens = { per_minute = 0 }\n");
        assert_eq!((e.line(), e.path()), (3, "accounts[0].tokens.per_minute"));

        let e = err("[[accounts]]\nname = \"a\"\nconcurrency = 2\n");
        assert_eq!((e.line(), e.path()), (3, "accounts[0].concurrency"));
        assert!(e.message().contains("unknown field"), "{e}");

        let e = err("[[accounts]]\nname = \" \"\n");
        assert_eq!((e.line(), e.path()), (2, "accounts[0].name"));
    }

    /// A token budget that sets no limit (`tokens = {}`), on a plan, an
    /// account or a model, and a `"*"` model entry with no limit limit
    /// nothing: whoever wrote them meant a limit, so they are errors that
    /// name the line and the field. A named model without limits of its own
    /// means something (it is not under `"*"`, and the gateway lists it):
    /// it is read.
    #[test]
    fn a_budget_or_a_star_entry_that_sets_no_limit_is_an_error() {
        for (src, line, path) in [
            (
                "[[plans]]\nname = \"p\"\ntokens = {}\n",
                3,
                "plans[0].tokens",
            ),
            (
                "[[plans]]\nname = \"p\"\n[plans.tokens]\n",
                3,
                "plans[0].tokens",
            ),
            (
                "[[accounts]]\nname = \"a\"\ntokens = {}\n",
                3,
                "accounts[0].tokens",
            ),
            (
                "[[plans]]\nname = \"p\"\n[plans.models]\n\"m\" = { tokens = {} }\n",
                4,
                "plans[0].models.\"m\".tokens",
            ),
            (
                "[[plans]]\nname = \"p\"\n[plans.models]\n\"*\" = {}\n",
                4,
                "plans[0].models.\"*\"",
            ),
        ] {
            let e = err(src);
            assert_eq!((e.line(), e.path()), (line, path), "{src}: {e}");
            assert!(e.message().contains("sets no limit"), "{e}");
        }
        let config = Config::from_toml(
            "[[plans]]\nname = \"p\"\n[plans.models]\n\"small\" = {}\n\"*\" = { concurrency = 1 }\n",
        )
        .unwrap();
        let names: Vec<_> = config.plans()[0].get_models().map(|(n, _)| n).collect();
        assert_eq!(names, ["*", "small"]);
    }

    #[test]
    fn a_method_path_listed_twice_in_another_spelling_is_an_error() {
        let e = err(
            "[[plans]]\nname = \"p\"\n[plans.methods]\n\"/v1/x/POST\" = { rate = 1.0, burst = 1 }\n\"/v1/x/post\" = { rate = 100.0, burst = 100 }\n",
        );
        assert_eq!((e.line(), e.path()), (5, "plans[0].methods.\"/v1/x/post\""));
        assert!(e.message().contains("listed twice"), "{e}");
        let e = err(
            "[stage]\n[stage.methods]\n\"/t0/GET\" = { rate = 1.0, burst = 1 }\n\"//t0/GET\" = { rate = 2.0, burst = 2 }\n",
        );
        assert!(e.message().contains("listed twice"), "{e}");
        assert!(e.path().starts_with("stage.methods."), "{e}");
    }

    /// A backend serves `Big-Model`, `big-model:latest` and
    /// `library/big-model` as one model, and the plan's model limits are
    /// looked up alike: two entries that would be the same one are refused,
    /// naming the later entry's line and the earlier one.
    #[test]
    fn a_model_listed_twice_in_another_spelling_is_an_error() {
        let e = err(
            "[[plans]]\nname = \"p\"\n[plans.models]\n\"big-model\" = { throttle = { rate = 1.0, burst = 1 } }\n\"Big-Model:latest\" = { throttle = { rate = 100.0, burst = 100 } }\n",
        );
        assert_eq!(
            (e.line(), e.path()),
            (5, "plans[0].models.\"Big-Model:latest\"")
        );
        assert!(e.message().contains("listed twice"), "{e}");
        assert!(e.message().contains("\"big-model\""), "{e}");
        let e = err(
            "[[plans]]\nname = \"p\"\n[plans.models]\n\"library/m\" = { concurrency = 1 }\n\"*\" = { concurrency = 2 }\n\"M\" = { concurrency = 3 }\n",
        );
        assert_eq!((e.line(), e.path()), (6, "plans[0].models.\"M\""));
        assert!(e.message().contains("\"library/m\""), "{e}");
        // Other tags and namespaces are other models.
        Config::from_toml(
            "[[plans]]\nname = \"p\"\n[plans.models]\n\"m\" = { concurrency = 1 }\n\"m:7b\" = { concurrency = 1 }\n\"me/m\" = { concurrency = 1 }\n\"*\" = { concurrency = 1 }\n",
        )
        .unwrap();
    }

    /// An admin key is at least 8 characters, counted as characters, and
    /// one a client can send in the `x-admin-key` header: none that HTTP
    /// trims away around a value (a key of spaces would lock the admin
    /// out) or cannot carry at all.
    #[test]
    fn an_admin_key_is_eight_characters_a_header_can_carry() {
        let admin = |key: &str| Config::from_toml(&format!("[admin]\nkey = \"{key}\"\n"));
        for bad in [
            "1234567",
            "\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}",
            "        ",
            " change-me",
            "change-me\\t",
            "change\\nme-please",
            "change\\u0000me-please",
        ] {
            let e = admin(bad).unwrap_err();
            assert_eq!((e.line(), e.path()), (2, "admin.key"), "{bad:?}");
        }
        for good in [
            "change-me",
            "change me please",
            "\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}",
        ] {
            assert_eq!(admin(good).unwrap().admin_key(), Some(good));
        }
    }

    /// The throttle of `[anonymous]` is checked as every throttle is, also
    /// while `mode = "forbid"` leaves it unused.
    #[test]
    fn an_anonymous_throttle_is_checked_in_every_mode() {
        for mode in ["forbid", "ip"] {
            let e = err(&format!(
                "[anonymous]\nmode = \"{mode}\"\nthrottle = {{ rate = 0.0, burst = 5 }}\n"
            ));
            assert_eq!(
                (e.line(), e.path()),
                (3, "anonymous.throttle.rate"),
                "{mode}"
            );
        }
    }

    /// A value of the wrong type is named by its type, never shown: it may
    /// be a secret written in the wrong place or shape (`admin = "…"` for
    /// `[admin] key`, a key's value as a number or in `enabled`, the keys
    /// as a list of values).
    #[test]
    fn a_value_of_the_wrong_type_is_never_shown() {
        let keys = "[[plans]]\nname = \"free\"\n[[keys]]\nid = \"a\"\nplan = \"free\"\n";
        for (src, secret, line, path) in [
            (
                "[admin]\nkey = 12345678901\n".to_owned(),
                "12345678901",
                2,
                "admin.key",
            ),
            (
                "admin = \"super-secret-admin\"\n".to_owned(),
                "super-secret-admin",
                1,
                "admin",
            ),
            (
                "keys = [\"sk-very-secret-1\"]\n".to_owned(),
                "sk-very-secret-1",
                1,
                "keys[0]",
            ),
            (
                format!("{keys}value = 98765432123\n"),
                "98765432123",
                6,
                "keys[0].value",
            ),
            (
                format!("{keys}value = 98765.4321\n"),
                "98765.4321",
                6,
                "keys[0].value",
            ),
            (
                format!("{keys}value = \"sk-x\"\nenabled = \"sk-y-secret, expected a string\"\n"),
                "sk-y-secret",
                7,
                "keys[0].enabled",
            ),
        ] {
            let e = err(&src);
            assert_eq!((e.line(), e.path()), (line, path), "{e}");
            assert!(e.message().starts_with("invalid type: "), "{e}");
            assert!(e.message().contains(", expected "), "{e}");
            assert!(!e.to_string().contains(secret), "{e}");
        }
    }

    /// A value of the wrong type is told in TOML's words, not in those of
    /// the Rust types it is read into (`expected i64`, `expected struct
    /// AdminFile`, `invalid type: map`).
    #[test]
    fn a_wrong_type_is_told_in_toml_words() {
        let plan = "[[plans]]\nname = \"free\"\n";
        let key = format!("{plan}[[keys]]\nid = \"a\"\nplan = \"free\"\n");
        for (src, message) in [
            (
                format!("{plan}concurrency = \"2\"\n"),
                "invalid type: string, expected an integer",
            ),
            (
                "history_days = 90.5\n".to_owned(),
                "invalid type: float, expected an integer",
            ),
            (
                format!("{plan}throttle = {{ rate = \"fast\", burst = 5 }}\n"),
                "invalid type: string, expected a number",
            ),
            (
                "admin = \"change-me\"\n".to_owned(),
                "invalid type: string, expected a table",
            ),
            (
                format!("{plan}methods = 5\n"),
                "invalid type: integer, expected a table",
            ),
            (
                format!("{plan}[plans.methods]\n\"/x/GET\" = 5\n"),
                "invalid type: integer, expected a table",
            ),
            (
                "keys = \"k\"\n".to_owned(),
                "invalid type: string, expected an array",
            ),
            (
                format!("{key}value = [\"k\"]\n"),
                "invalid type: array, expected a string",
            ),
            (
                format!("{key}value = {{ v = \"k\" }}\n"),
                "invalid type: table, expected a string",
            ),
            (
                format!("{plan}quota = {{ limit = 5, period = 1 }}\n"),
                "invalid type, expected a string",
            ),
            (
                format!("{plan}quota = {{ limit = 5, period = \"WEEK\", week_start = 1 }}\n"),
                "invalid type, expected a string",
            ),
            (
                format!("{plan}failure = true\n"),
                "invalid type, expected a string",
            ),
        ] {
            assert_eq!(err(&src).message(), message, "{src}");
        }
    }

    /// A table defined twice is named by its header: the error named no
    /// field (`[admin]` twice) or the table above it (`[plans.methods]`
    /// twice in one plan named `plans[0]`).
    #[test]
    fn a_table_defined_twice_is_named_by_its_header() {
        let key = "key = \"abcdefghij\"\n";
        for (src, line, path) in [
            (format!("[admin]\n{key}[admin]\n"), 3, "admin"),
            (format!("[admin]\n{key}\n  [ admin ]  # again\n"), 4, "admin"),
            ("[stage]\n[stage]\n".to_owned(), 2, "stage"),
            (
                "[stage]\nthrottle = { rate = 1.0, burst = 1 }\n[stage.throttle]\nrate = 2.0\n"
                    .to_owned(),
                3,
                "stage.throttle",
            ),
            (
                "[[plans]]\nname = \"a\"\n[plans.methods]\n\"/x/GET\" = { rate = 1.0, burst = 1 }\n[plans.methods]\n"
                    .to_owned(),
                5,
                "plans[0].methods",
            ),
            (
                "[[plans]]\nname = \"a\"\n[[plans]]\nname = \"b\"\n[plans.quota]\nlimit = 1\nperiod = \"DAY\"\n[plans.quota]\n"
                    .to_owned(),
                8,
                "plans[1].quota",
            ),
        ] {
            let e = err(&src);
            assert_eq!((e.line(), e.path()), (line, path), "{src}: {e}");
            assert!(e.message().contains("duplicate"), "{e}");
        }
    }

    /// A file that is not UTF-8 is named at the line, column and field of
    /// its first byte that is not, as any other error is.
    #[test]
    fn a_file_that_is_not_utf8_is_named_at_the_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latin1.toml");
        std::fs::write(&path, b"[[plans]]\nname = \"fr\xe9e\"\n").unwrap();
        let e = Config::load(&path).unwrap_err();
        assert_eq!(
            (e.line(), e.column(), e.path()),
            (2, 11, "plans[0].name"),
            "{e}"
        );
        assert!(e.message().contains("UTF-8"), "{e}");
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("{}:2:11: ", path.display())),
            "{shown}"
        );
    }

    /// A file with nothing in it (empty, blank or only comments: a
    /// deployment that failed to write it) is an error, not a gateway that
    /// refuses every request and has no admin key to change that with.
    #[test]
    fn a_file_with_nothing_in_it_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("empty.toml", ""),
            ("blank.toml", "\n  \n\t\n"),
            ("comments.toml", "# plans to come\n\n  # [[plans]]\n"),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            let e = Config::load(&path).unwrap_err();
            assert_eq!(e.line(), 1, "{name}: {e}");
            assert!(e.message().contains("empty"), "{name}: {e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("{}:1:1: ", path.display())),
                "{e}"
            );
        }
        // A file that sets anything at all is read.
        let path = dir.path().join("some.toml");
        std::fs::write(&path, "# just the style\n[response]\nstyle = \"openai\"\n").unwrap();
        assert_eq!(Config::load(&path).unwrap().style(), ResponseStyle::OpenAi);
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

    /// A quota's `offset` is deducted in the window in which the plan was
    /// created (`created`), not again in whichever window the process
    /// starts in: a gateway restarted on a later day, its counts kept in
    /// the store, serves that day's whole limit.
    #[test]
    fn an_offset_holds_in_the_window_of_the_plans_creation_only() {
        use std::time::{SystemTime, UNIX_EPOCH};

        use crate::window::Date;
        use crate::{ManualClock, MemoryStore, RateLimitLayer};

        let day = |d: u8| {
            let days = Date::new(2024, 5, d).unwrap().days() as u64;
            UNIX_EPOCH + Duration::from_secs(days * 86_400 + 100)
        };
        let src = "[[plans]]\nname = \"p\"\nquota = { limit = 5, period = \"DAY\", offset = 3, created = 2024-05-01 }\n[[keys]]\nid = \"k\"\nvalue = \"v\"\nplan = \"p\"\n";
        let config = Config::from_toml(src).unwrap();
        let clock = ManualClock::new();
        let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
        // The process (re)starts at `at`, and serves ten requests.
        let served = |at: SystemTime| {
            clock.set_wall(at);
            let policy = config.policy_with_clock(clock.clone()).unwrap();
            let layer = RateLimitLayer::builder(policy).store(store.clone()).build();
            (0..10).filter(|_| layer.check(b"v", 1).is_ok()).count()
        };
        assert_eq!(served(day(1)), 2);
        assert_eq!(served(day(2)), 5);
        // Restarted on the 3rd: the 3rd is not the plan's first window.
        assert_eq!(served(day(3)), 5);
        // A policy built on the 1st, and one first built later, agree.
        assert_eq!(served(day(1) + Duration::from_secs(3600)), 0);

        // Without a date, the plan is created when the policy is built.
        let config = Config::from_toml(&src.replace(", created = 2024-05-01", "")).unwrap();
        clock.set_wall(day(9));
        let policy = config.policy_with_clock(clock.clone()).unwrap();
        let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
        let layer = RateLimitLayer::builder(policy).store(store).build();
        assert_eq!((0..10).filter(|_| layer.check(b"v", 1).is_ok()).count(), 2);

        for bad in [
            "2024-05-01T10:00:00",
            "2024-05-01T10:00:00Z",
            "10:00:00",
            "\"2024-05-01\"",
        ] {
            let e = err(&src.replace("2024-05-01", bad));
            assert_eq!((e.line(), e.path()), (3, "plans[0].quota.created"), "{bad}");
        }
    }
}
