//! Errors in the configuration of limits, plans and keys.

use std::fmt;

/// A limit, plan or key that cannot be built.
///
/// Every invalid parameter is caught here, when the configuration is built,
/// never as a panic while serving.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A throttle rate that is zero, negative, NaN, infinite or out of range.
    InvalidRate(f64),
    /// A throttle burst (bucket size) of zero.
    ZeroBurst,
    /// `burst / rate` is longer than about 146 years, or `rate` is above one per nanosecond.
    SpanOutOfRange {
        /// The rate given.
        rate: f64,
        /// The burst given.
        burst: u32,
    },
    /// Two plans share a name.
    DuplicatePlan(String),
    /// Two API keys share an id.
    DuplicateKeyId(String),
    /// Two API keys share a secret value (the value is not shown).
    DuplicateKeyValue {
        /// The id of the second key with the value.
        id: String,
    },
    /// An API key names a plan that does not exist.
    UnknownPlan {
        /// The key's id.
        key: String,
        /// The plan it names.
        plan: String,
    },
    /// An API key names an account that does not exist.
    UnknownAccount {
        /// The key's id.
        key: String,
        /// The account it names.
        account: String,
    },
    /// Two accounts share a name.
    DuplicateAccount(String),
    /// An API key's id or value is empty, too long or not visible ASCII.
    InvalidKey {
        /// The key's id (empty if the id itself is invalid).
        id: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A store parameter is out of range.
    InvalidStore(&'static str),
    /// A quota's limit or offset is out of range.
    InvalidQuota(&'static str),
    /// A method override's path is not an AWS methodPath (`"/resource/METHOD"`).
    InvalidMethodPath {
        /// The path given.
        path: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The usage history is shorter than a month (31 days) or longer than ten
    /// years (3,660 days).
    InvalidHistory(usize),
    /// A plan's concurrency cap is zero.
    InvalidConcurrency,
    /// A plan holds limits for one model under two names that a backend
    /// serves as the same model (`big-model` and `Big-Model:latest`: model
    /// names are compared as [`UsagePlan::model`](crate::UsagePlan::model)
    /// describes).
    DuplicateModel {
        /// The plan.
        plan: String,
        /// The name added first.
        first: String,
        /// The name added later, for the same model.
        second: String,
    },
}

/// A rate as a person would write it: `2`, `0.5`, and `1e300` or `1e-12`
/// for one far from 1, never the hundreds of digits of its decimal
/// expansion.
struct Rate(f64);

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        if r.is_finite() && r != 0.0 && !(1e-6..1e15).contains(&r.abs()) {
            write!(f, "{r:e}")
        } else {
            write!(f, "{r}")
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::InvalidRate(r) => {
                write!(
                    f,
                    "invalid rate {}: must be a finite number above zero",
                    Rate(*r)
                )
            }
            ConfigError::ZeroBurst => f.write_str("invalid burst 0: must be at least 1"),
            ConfigError::SpanOutOfRange { rate, burst } => write!(
                f,
                "throttle out of range: rate {} with burst {burst} (rate at most 1e9/s, burst/rate at most ~146 years)",
                Rate(*rate)
            ),
            ConfigError::DuplicatePlan(name) => write!(f, "duplicate plan name `{name}`"),
            ConfigError::DuplicateKeyId(id) => write!(f, "duplicate api key id `{id}`"),
            ConfigError::DuplicateKeyValue { id } => {
                write!(f, "api key `{id}` has the same value as another key")
            }
            ConfigError::UnknownPlan { key, plan } => {
                write!(f, "api key `{key}` names unknown plan `{plan}`")
            }
            ConfigError::UnknownAccount { key, account } => {
                write!(f, "api key `{key}` names unknown account `{account}`")
            }
            ConfigError::DuplicateAccount(name) => write!(f, "duplicate account name `{name}`"),
            ConfigError::InvalidKey { id, reason } => write!(f, "invalid api key `{id}`: {reason}"),
            ConfigError::InvalidStore(why) => write!(f, "invalid store configuration: {why}"),
            ConfigError::InvalidQuota(why) => write!(f, "invalid quota: {why}"),
            ConfigError::InvalidMethodPath { path, reason } => {
                write!(f, "invalid method path `{path}`: {reason}")
            }
            ConfigError::DuplicateModel {
                plan,
                first,
                second,
            } => write!(
                f,
                "plan `{plan}` has limits for model `{first}` twice: `{second}` is the same model"
            ),
            ConfigError::InvalidConcurrency => {
                f.write_str("invalid concurrency: the cap must be at least 1")
            }
            ConfigError::InvalidHistory(days) => {
                write!(
                    f,
                    "invalid usage history of {days} days: must be 31 to 3660"
                )
            }
        }
    }
}

impl std::error::Error for ConfigError {}
