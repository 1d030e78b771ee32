//! Usage plans, API keys and the policy that maps a request's key to its limits.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::error::ConfigError;
use crate::gcra::{Gcra, NANOS_PER_SEC};
use crate::hash::{self, BuildDigestHasher, Digest};

/// A throttle: a token bucket of `burst` requests refilled at `rate` per second.
///
/// A new key starts with a full bucket: `burst` requests at once pass, the next
/// one is throttled, and one more passes every `1 / rate` seconds. `rate` may be
/// fractional (`0.5` is one request every two seconds).
///
/// ```
/// use tollgate::Throttle;
///
/// let t = Throttle::new(2.0, 5).unwrap();
/// assert_eq!((t.rate(), t.burst()), (2.0, 5));
/// assert!(Throttle::new(0.0, 5).is_err());
/// assert!(Throttle::new(f64::NAN, 5).is_err());
/// assert!(Throttle::new(1.0, 0).is_err());
/// ```
#[derive(Clone, Copy, PartialEq)]
pub struct Throttle {
    rate: f64,
    gcra: Gcra,
}

impl Throttle {
    /// A throttle of `rate` requests per second with a bucket of `burst`.
    ///
    /// Errors when `rate` is not a finite number above zero, when `burst` is
    /// zero, or when the numbers are out of range (rate above 1e9/s, a bucket
    /// that takes more than ~146 years to refill).
    pub fn new(rate: f64, burst: u32) -> Result<Self, ConfigError> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(ConfigError::InvalidRate(rate));
        }
        if burst == 0 {
            return Err(ConfigError::ZeroBurst);
        }
        let gcra = Gcra::new(rate, burst).ok_or(ConfigError::SpanOutOfRange { rate, burst })?;
        Ok(Self { rate, gcra })
    }

    /// Requests (cost units) per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The bucket size.
    pub fn burst(&self) -> u32 {
        self.gcra.burst()
    }

    pub(crate) fn gcra(&self) -> &Gcra {
        &self.gcra
    }
}

impl fmt::Debug for Throttle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Throttle")
            .field("rate", &self.rate)
            .field("burst", &self.burst())
            .finish()
    }
}

/// A usage plan: the limits that apply to every key bound to it.
///
/// Throttles are counted per (plan, key), across all routes of the plan, as
/// AWS API Gateway counts them.
///
/// ```
/// use tollgate::{Throttle, UsagePlan};
///
/// let free = UsagePlan::new("free").throttle(Throttle::new(2.0, 5).unwrap());
/// assert_eq!(free.name(), "free");
/// ```
#[derive(Debug, Clone)]
pub struct UsagePlan {
    name: String,
    throttle: Option<Throttle>,
}

impl UsagePlan {
    /// A plan with no limits yet.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            throttle: None,
        }
    }

    /// Sets the plan-wide throttle.
    #[must_use]
    pub fn throttle(mut self, throttle: Throttle) -> Self {
        self.throttle = Some(throttle);
        self
    }

    /// The plan's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// An API key: a public id, a secret value, the plan it is bound to.
///
/// The value is what clients send; it is hashed when the policy is built and
/// never printed (`Debug` shows only the id).
#[derive(Clone)]
pub struct ApiKey {
    id: String,
    value: String,
    plan: String,
    enabled: bool,
}

impl ApiKey {
    /// An enabled key `id` with secret `value`, bound to `plan`.
    pub fn new(id: impl Into<String>, value: impl Into<String>, plan: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            value: value.into(),
            plan: plan.into(),
            enabled: true,
        }
    }

    /// Enables or disables the key (a disabled key is answered 403).
    #[must_use]
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// The key's public id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("id", &self.id)
            .field("plan", &self.plan)
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

/// Which limits apply to which keys.
///
/// - [`Policy::per_key`]: every key the extractor finds is limited under one
///   plan (a throttle per client IP, per tenant…).
/// - [`Policy::builder`]: API keys registered in advance, each bound to a plan;
///   a missing, unknown or disabled key is answered 403 `{"message":"Forbidden"}`.
///
/// ```
/// use tollgate::{ApiKey, Policy, Throttle, UsagePlan};
///
/// let policy = Policy::builder()
///     .plan(UsagePlan::new("free").throttle(Throttle::new(2.0, 5)?))
///     .key(ApiKey::new("free-1", "demo-free-key", "free"))
///     .build()?;
/// # Ok::<(), tollgate::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct Policy {
    pub(crate) keys: Arc<Keys>,
}

pub(crate) enum Keys {
    /// Every key is limited under this plan.
    Any(Arc<Plan>),
    /// Registered keys, by the digest of their value.
    Registered(HashMap<Digest, KeyEntry, BuildDigestHasher>),
}

/// A key as the hot path sees it.
pub(crate) struct KeyEntry {
    /// Where the key's state lives: the digest of its id, so that counters follow
    /// the key, not its secret.
    pub(crate) state: Digest,
    pub(crate) plan: Arc<Plan>,
    pub(crate) enabled: bool,
}

/// A plan compiled for deciding.
#[derive(Debug)]
pub(crate) struct Plan {
    #[allow(dead_code)]
    pub(crate) name: String,
    pub(crate) limits: Box<[Limit]>,
}

/// One limit of a plan, with the salt that places its state in the store.
#[derive(Debug, Clone)]
pub(crate) struct Limit {
    pub(crate) name: &'static str,
    pub(crate) gcra: Gcra,
    pub(crate) salt: u64,
    /// The `w` of the `RateLimit-Policy` item: seconds to refill the whole bucket.
    pub(crate) window_secs: u64,
}

impl Limit {
    fn throttle(name: &'static str, t: &Throttle) -> Self {
        Self {
            name,
            gcra: *t.gcra(),
            salt: hash::random_salt(),
            window_secs: t.gcra().span().div_ceil(NANOS_PER_SEC),
        }
    }
}

impl Plan {
    fn compile(plan: &UsagePlan) -> Self {
        let limits = plan
            .throttle
            .iter()
            .map(|t| Limit::throttle("throttle", t))
            .collect();
        Plan {
            name: plan.name.clone(),
            limits,
        }
    }
}

impl Policy {
    /// Limits every key the extractor finds under `plan`.
    pub fn per_key(plan: UsagePlan) -> Self {
        Policy {
            keys: Arc::new(Keys::Any(Arc::new(Plan::compile(&plan)))),
        }
    }

    /// Starts a policy of registered API keys.
    pub fn builder() -> PolicyBuilder {
        PolicyBuilder::default()
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.keys {
            Keys::Any(plan) => f.debug_tuple("Policy::PerKey").field(&plan.name).finish(),
            Keys::Registered(keys) => f
                .debug_struct("Policy::Registered")
                .field("keys", &keys.len())
                .finish(),
        }
    }
}

/// Builds a [`Policy`] of plans and registered API keys.
#[derive(Debug, Default)]
pub struct PolicyBuilder {
    plans: Vec<UsagePlan>,
    keys: Vec<ApiKey>,
}

impl PolicyBuilder {
    /// Adds a plan.
    #[must_use]
    pub fn plan(mut self, plan: UsagePlan) -> Self {
        self.plans.push(plan);
        self
    }

    /// Adds an API key.
    #[must_use]
    pub fn key(mut self, key: ApiKey) -> Self {
        self.keys.push(key);
        self
    }

    /// Checks the plans and keys and builds the policy.
    ///
    /// Errors on duplicate plan names, duplicate key ids or values, a key that
    /// names an unknown plan, and key ids or values that are empty, longer than
    /// [`DEFAULT_MAX_KEY_LEN`](crate::extract::DEFAULT_MAX_KEY_LEN) bytes or not
    /// visible ASCII.
    pub fn build(self) -> Result<Policy, ConfigError> {
        let mut plans: HashMap<&str, Arc<Plan>> = HashMap::new();
        for p in &self.plans {
            if plans.insert(p.name(), Arc::new(Plan::compile(p))).is_some() {
                return Err(ConfigError::DuplicatePlan(p.name.clone()));
            }
        }
        let mut ids = std::collections::HashSet::new();
        let mut keys =
            HashMap::with_capacity_and_hasher(self.keys.len(), BuildDigestHasher::default());
        for k in &self.keys {
            let max = crate::extract::DEFAULT_MAX_KEY_LEN;
            if crate::extract::validate(k.id.as_bytes(), max).is_err() {
                return Err(ConfigError::InvalidKey {
                    id: String::new(),
                    reason: "id must be 1 to 256 visible ASCII characters",
                });
            }
            if crate::extract::validate(k.value.as_bytes(), max).is_err() {
                return Err(ConfigError::InvalidKey {
                    id: k.id.clone(),
                    reason: "value must be 1 to 256 visible ASCII characters",
                });
            }
            if !ids.insert(k.id.as_str()) {
                return Err(ConfigError::DuplicateKeyId(k.id.clone()));
            }
            let plan = plans
                .get(k.plan.as_str())
                .ok_or_else(|| ConfigError::UnknownPlan {
                    key: k.id.clone(),
                    plan: k.plan.clone(),
                })?;
            let entry = KeyEntry {
                state: hash::digest(k.id.as_bytes()),
                plan: Arc::clone(plan),
                enabled: k.enabled,
            };
            if keys
                .insert(hash::digest(k.value.as_bytes()), entry)
                .is_some()
            {
                return Err(ConfigError::DuplicateKeyValue { id: k.id.clone() });
            }
        }
        Ok(Policy {
            keys: Arc::new(Keys::Registered(keys)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free() -> UsagePlan {
        UsagePlan::new("free").throttle(Throttle::new(2.0, 5).unwrap())
    }

    #[test]
    fn invalid_throttles_are_config_errors() {
        assert_eq!(Throttle::new(0.0, 1), Err(ConfigError::InvalidRate(0.0)));
        assert_eq!(Throttle::new(-2.0, 1), Err(ConfigError::InvalidRate(-2.0)));
        assert!(matches!(
            Throttle::new(f64::NAN, 1),
            Err(ConfigError::InvalidRate(_))
        ));
        assert!(matches!(
            Throttle::new(f64::INFINITY, 1),
            Err(ConfigError::InvalidRate(_))
        ));
        assert_eq!(Throttle::new(1.0, 0), Err(ConfigError::ZeroBurst));
        assert!(matches!(
            Throttle::new(1e-12, 1000),
            Err(ConfigError::SpanOutOfRange { .. })
        ));
        assert_eq!(
            Throttle::new(0.0, 1).unwrap_err().to_string(),
            "invalid rate 0: must be a finite number above zero"
        );
    }

    #[test]
    fn policy_checks_keys_and_plans() {
        let dup_plan = Policy::builder().plan(free()).plan(free()).build();
        assert!(matches!(dup_plan, Err(ConfigError::DuplicatePlan(n)) if n == "free"));

        let unknown = Policy::builder()
            .plan(free())
            .key(ApiKey::new("k1", "v1", "pro"))
            .build();
        assert!(matches!(unknown, Err(ConfigError::UnknownPlan { plan, .. }) if plan == "pro"));

        let dup_value = Policy::builder()
            .plan(free())
            .key(ApiKey::new("k1", "s3cr3t-v4lue", "free"))
            .key(ApiKey::new("k2", "s3cr3t-v4lue", "free"))
            .build();
        let err = dup_value.unwrap_err();
        assert!(matches!(&err, ConfigError::DuplicateKeyValue { id } if id == "k2"));
        assert!(
            !err.to_string().contains("s3cr3t-v4lue"),
            "the secret must not be shown"
        );

        let bad_value = Policy::builder()
            .plan(free())
            .key(ApiKey::new("k1", "has space", "free"))
            .build();
        assert!(matches!(bad_value, Err(ConfigError::InvalidKey { .. })));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let k = ApiKey::new("free-1", "demo-free-key", "free");
        let shown = format!("{k:?}");
        assert!(
            shown.contains("free-1") && !shown.contains("demo-free-key"),
            "{shown}"
        );
    }
}
