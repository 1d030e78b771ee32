//! The configuration file's document as serde reads it, before any check.
//!
//! Values keep their place in the text (`Spanned`) where a check needs it to
//! name the line and column of an error.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use toml::Spanned;

use crate::window::Weekday;

/// A TOML integer, however large: one beyond 64 bits (TOML allows any,
/// the parser reads up to 128) is read as the nearest `i64`, so that the
/// field's own check names its range, as it does for any other number
/// out of it. Read as an `i64`, it was "invalid type: integer, expected
/// an integer".
#[derive(Clone, Copy)]
pub(super) struct Int(pub(super) i64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Int, D::Error> {
        struct IntVisitor;

        impl Visitor<'_> for IntVisitor {
            type Value = Int;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an integer")
            }

            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Int, E> {
                Ok(Int(n))
            }

            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Int, E> {
                Ok(Int(i64::try_from(n).unwrap_or(i64::MAX)))
            }

            fn visit_i128<E: de::Error>(self, n: i128) -> Result<Int, E> {
                let n = n.clamp(i128::from(i64::MIN), i128::from(i64::MAX));
                Ok(Int(i64::try_from(n).unwrap_or_default()))
            }

            fn visit_u128<E: de::Error>(self, n: u128) -> Result<Int, E> {
                Ok(Int(i64::try_from(n).unwrap_or(i64::MAX)))
            }
        }

        deserializer.deserialize_i64(IntVisitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    #[serde(default)]
    pub(super) plans: Vec<Spanned<PlanFile>>,
    #[serde(default)]
    pub(super) keys: Vec<Spanned<KeyFile>>,
    #[serde(default)]
    pub(super) accounts: Vec<Spanned<AccountFile>>,
    pub(super) stage: Option<StageFile>,
    pub(super) anonymous: Option<Spanned<AnonymousFile>>,
    pub(super) admin: Option<AdminFile>,
    pub(super) history_days: Option<Spanned<Int>>,
    pub(super) quota_status: Option<Spanned<Int>>,
    pub(super) response: Option<ResponseFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResponseFile {
    pub(super) style: Option<Spanned<String>>,
    pub(super) max_retry_secs: Option<Spanned<Int>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PlanFile {
    pub(super) name: Spanned<String>,
    pub(super) throttle: Option<Spanned<ThrottleFile>>,
    pub(super) quota: Option<Spanned<QuotaFile>>,
    pub(super) tokens: Option<Spanned<TokensFile>>,
    pub(super) concurrency: Option<Spanned<Int>>,
    #[serde(default)]
    pub(super) failure: FailureFile,
    #[serde(default = "yes")]
    pub(super) borrow: bool,
    #[serde(default)]
    pub(super) shadow: bool,
    #[serde(default)]
    pub(super) methods: BTreeMap<Spanned<String>, Spanned<ThrottleFile>>,
    /// Limits per model name (`"*"`: every model the plan does not name).
    #[serde(default)]
    pub(super) models: BTreeMap<Spanned<String>, Spanned<ModelFile>>,
}

/// One model's limits within a plan.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ModelFile {
    pub(super) throttle: Option<Spanned<ThrottleFile>>,
    pub(super) quota: Option<Spanned<QuotaFile>>,
    pub(super) tokens: Option<Spanned<TokensFile>>,
    pub(super) concurrency: Option<Spanned<Int>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ThrottleFile {
    pub(super) rate: Spanned<f64>,
    pub(super) burst: Spanned<Int>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct QuotaFile {
    pub(super) limit: Spanned<Int>,
    pub(super) period: PeriodFile,
    #[serde(default)]
    pub(super) offset: Option<Spanned<Int>>,
    /// The day the plan was created: the offset's window.
    pub(super) created: Option<Spanned<toml::value::Datetime>>,
    pub(super) week_start: Option<Weekday>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TokensFile {
    pub(super) per_minute: Option<Spanned<Int>>,
    pub(super) per_day: Option<Spanned<Int>>,
    pub(super) per_month: Option<Spanned<Int>>,
}

#[derive(Deserialize, Clone, Copy)]
pub(super) enum PeriodFile {
    #[serde(rename = "DAY")]
    Day,
    #[serde(rename = "WEEK")]
    Week,
    #[serde(rename = "MONTH")]
    Month,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum FailureFile {
    #[default]
    Local,
    Open,
    Closed,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeyFile {
    pub(super) id: Spanned<String>,
    pub(super) value: Spanned<String>,
    pub(super) plan: Spanned<String>,
    #[serde(default = "yes")]
    pub(super) enabled: bool,
    pub(super) account: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AccountFile {
    pub(super) name: Spanned<String>,
    pub(super) throttle: Option<Spanned<ThrottleFile>>,
    pub(super) quota: Option<Spanned<QuotaFile>>,
    pub(super) tokens: Option<Spanned<TokensFile>>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StageFile {
    pub(super) throttle: Option<Spanned<ThrottleFile>>,
    #[serde(default)]
    pub(super) methods: BTreeMap<Spanned<String>, Spanned<ThrottleFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AnonymousFile {
    pub(super) mode: ModeFile,
    pub(super) throttle: Option<Spanned<ThrottleFile>>,
    #[serde(default)]
    pub(super) trusted_proxies: Vec<Spanned<String>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum ModeFile {
    Forbid,
    Ip,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AdminFile {
    pub(super) key: Spanned<String>,
}
