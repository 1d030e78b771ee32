//! The policy: which plan and limits apply to a request's key, changeable while serving.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::clock::Clock;
use crate::error::ConfigError;
use crate::extract::{ClientIp, DEFAULT_MAX_KEY_LEN, validate};
use crate::hash::{self, BuildDigestHasher, Digest};
use crate::plan::{Account, AccountLimits, Anonymous, ApiKey, Plan, Stage, StageLimits, UsagePlan};

/// Days of usage history kept per key by default.
pub const DEFAULT_HISTORY_DAYS: usize = 90;
const MAX_HISTORY_DAYS: usize = 3_660;
/// The shortest history: a whole month, so that reports over a MONTH quota
/// window know what was used earlier in the window.
const MIN_HISTORY_DAYS: usize = 31;

/// Which limits apply to which keys.
///
/// - [`Policy::per_key`]: every key the extractor finds is limited under one
///   plan (a throttle per client IP, per tenant…).
/// - [`Policy::builder`]: API keys registered in advance, each bound to a plan;
///   a missing, unknown or disabled key is answered 403 `{"message":"Forbidden"}`.
///
/// A policy can be changed while serving (through
/// [`RateLimitLayer::admin`](crate::RateLimitLayer::admin)): keys added,
/// disabled or moved, plans replaced, without losing counters. Requests read
/// it without a lock.
///
/// ```
/// use tollgate::{ApiKey, Period, Policy, Quota, Throttle, UsagePlan};
///
/// let policy = Policy::builder()
///     .plan(
///         UsagePlan::new("free")
///             .throttle(Throttle::new(2.0, 5)?)
///             .quota(Quota::new(1000, Period::Day)?),
///     )
///     .key(ApiKey::new("free-1", "demo-free-key", "free"))
///     .build()?;
/// # Ok::<(), tollgate::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct Policy {
    pub(crate) inner: Arc<PolicyInner>,
}

pub(crate) struct PolicyInner {
    pub(crate) current: ArcSwap<Snapshot>,
    /// Serialises changes (readers never take it).
    write: Mutex<()>,
    /// Days of usage history a key's quota keeps (the store keeps them).
    pub(crate) history_days: usize,
}

/// One immutable version of the policy.
#[derive(Clone)]
pub(crate) struct Snapshot {
    /// `Policy::per_key`: every key is limited under this plan.
    pub(crate) per_key: Option<Arc<Plan>>,
    pub(crate) plans: HashMap<Arc<str>, Arc<Plan>>,
    /// Registered keys, by the digest of their value.
    pub(crate) keys: HashMap<Digest, Arc<KeyEntry>, BuildDigestHasher>,
    /// Value digest by key id.
    pub(crate) ids: HashMap<Arc<str>, Digest>,
    pub(crate) stage: Option<Arc<StageLimits>>,
    pub(crate) anonymous: Option<Arc<AnonymousLimits>>,
    /// Accounts, by name: limits shared by all the keys of each.
    pub(crate) accounts: HashMap<Arc<str>, Arc<AccountLimits>>,
}

/// A key as the hot path sees it.
#[derive(Debug)]
pub(crate) struct KeyEntry {
    pub(crate) id: Arc<str>,
    /// Where the key's state lives: the digest of its id, so that counters
    /// follow the key, not its secret.
    pub(crate) state: Digest,
    pub(crate) plan: Arc<Plan>,
    pub(crate) enabled: bool,
    /// The account the key belongs to, whose limits all its keys share.
    pub(crate) account: Option<Arc<AccountLimits>>,
}

/// Limits for requests without a key.
#[derive(Debug)]
pub(crate) struct AnonymousLimits {
    pub(crate) plan: Arc<Plan>,
    pub(crate) client_ip: ClientIp,
}

impl Policy {
    /// Limits every key the extractor finds under `plan`.
    ///
    /// Errors when the plan is invalid, or has a quota: quotas are counted per
    /// registered key (see [`Policy::builder`]), since counters for arbitrary
    /// keys could not be kept for a whole window in bounded memory.
    pub fn per_key(plan: UsagePlan) -> Result<Self, ConfigError> {
        let token_quota = plan
            .get_tokens()
            .is_some_and(|t| t.get_per_day().is_some() || t.get_per_month().is_some());
        if plan.get_quota().is_some() || token_quota {
            return Err(ConfigError::QuotaNeedsKeys(plan.name().to_owned()));
        }
        let clock = Clock::system();
        let compiled = Arc::new(Plan::compile(&plan, clock.wall_nanos())?);
        let snapshot = Snapshot {
            per_key: Some(compiled),
            plans: HashMap::new(),
            keys: HashMap::default(),
            ids: HashMap::new(),
            stage: None,
            anonymous: None,
            accounts: HashMap::new(),
        };
        Ok(Policy::from_snapshot(snapshot, DEFAULT_HISTORY_DAYS))
    }

    /// Starts a policy of registered API keys.
    pub fn builder() -> PolicyBuilder {
        PolicyBuilder::default()
    }

    fn from_snapshot(snapshot: Snapshot, history_days: usize) -> Self {
        Policy {
            inner: Arc::new(PolicyInner {
                current: ArcSwap::from_pointee(snapshot),
                write: Mutex::new(()),
                history_days,
            }),
        }
    }

    /// The current version, for reading without a lock.
    #[inline]
    pub(crate) fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.inner.current.load()
    }

    /// Applies `change` to a copy of the current version and publishes it.
    pub(crate) fn update<R>(
        &self,
        change: impl FnOnce(&mut Snapshot) -> Result<R, crate::AdminError>,
    ) -> Result<R, crate::AdminError> {
        let _guard = self.inner.write.lock();
        let mut next = Snapshot::clone(&self.inner.current.load());
        let r = change(&mut next)?;
        self.inner.current.store(Arc::new(next));
        Ok(r)
    }
}

impl Snapshot {
    /// Builds the entry for `key`, checking it against this version.
    pub(crate) fn entry(&self, key: &ApiKey) -> Result<KeyEntry, ConfigError> {
        if validate(key.id.as_bytes(), DEFAULT_MAX_KEY_LEN).is_err() {
            return Err(ConfigError::InvalidKey {
                id: String::new(),
                reason: "id must be 1 to 256 visible ASCII characters",
            });
        }
        if validate(key.value.as_bytes(), DEFAULT_MAX_KEY_LEN).is_err() {
            return Err(ConfigError::InvalidKey {
                id: key.id.clone(),
                reason: "value must be 1 to 256 visible ASCII characters",
            });
        }
        let plan = self
            .plans
            .get(key.plan.as_str())
            .ok_or_else(|| ConfigError::UnknownPlan {
                key: key.id.clone(),
                plan: key.plan.clone(),
            })?;
        let account = match &key.account {
            None => None,
            Some(name) => Some(Arc::clone(self.accounts.get(name.as_str()).ok_or_else(
                || ConfigError::UnknownAccount {
                    key: key.id.clone(),
                    account: name.clone(),
                },
            )?)),
        };
        Ok(KeyEntry {
            id: key.id.as_str().into(),
            state: hash::digest(key.id.as_bytes()),
            plan: Arc::clone(plan),
            enabled: key.enabled,
            account,
        })
    }

    /// Adds a key built by [`entry`](Self::entry).
    pub(crate) fn insert(&mut self, value: &str, entry: KeyEntry) -> Result<(), ConfigError> {
        if self.ids.contains_key(&*entry.id) {
            return Err(ConfigError::DuplicateKeyId(entry.id.to_string()));
        }
        let digest = hash::digest(value.as_bytes());
        if self.keys.contains_key(&digest) {
            return Err(ConfigError::DuplicateKeyValue {
                id: entry.id.to_string(),
            });
        }
        self.ids.insert(Arc::clone(&entry.id), digest);
        self.keys.insert(digest, Arc::new(entry));
        Ok(())
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snap = self.load();
        match &snap.per_key {
            Some(plan) => f.debug_tuple("Policy::PerKey").field(&plan.name).finish(),
            None => f
                .debug_struct("Policy")
                .field("plans", &snap.plans.len())
                .field("keys", &snap.keys.len())
                .finish_non_exhaustive(),
        }
    }
}

/// Builds a [`Policy`] of plans and registered API keys.
#[derive(Debug, Default)]
#[must_use]
pub struct PolicyBuilder {
    plans: Vec<UsagePlan>,
    keys: Vec<ApiKey>,
    accounts: Vec<Account>,
    stage: Option<Stage>,
    anonymous: Anonymous,
    history_days: Option<usize>,
    clock: Option<Clock>,
}

impl PolicyBuilder {
    /// Adds a plan.
    pub fn plan(mut self, plan: UsagePlan) -> Self {
        self.plans.push(plan);
        self
    }

    /// Adds an API key.
    pub fn key(mut self, key: ApiKey) -> Self {
        self.keys.push(key);
        self
    }

    /// Adds an account: limits shared by all the keys that name it
    /// ([`ApiKey::account`]).
    pub fn account(mut self, account: Account) -> Self {
        self.accounts.push(account);
        self
    }

    /// Sets limits shared by all callers together.
    pub fn stage(mut self, stage: Stage) -> Self {
        self.stage = Some(stage);
        self
    }

    /// What to do with requests that carry no key (default: 403).
    pub fn anonymous(mut self, anonymous: Anonymous) -> Self {
        self.anonymous = anonymous;
        self
    }

    /// Days of per-key usage history kept for reports: 31 (a month) to 3660,
    /// default 90.
    pub fn history_days(mut self, days: usize) -> Self {
        self.history_days = Some(days);
        self
    }

    /// The clock that dates plan creation for quota offsets (default: the
    /// system clock). Give it the store's clock in tests.
    pub fn clock(mut self, clock: impl Into<Clock>) -> Self {
        self.clock = Some(clock.into());
        self
    }

    /// Checks the plans and keys and builds the policy.
    ///
    /// Errors on invalid method paths, duplicate plan or account names,
    /// duplicate key ids or values, a key that names an unknown plan or
    /// account, and key ids or values that
    /// are empty, longer than [`DEFAULT_MAX_KEY_LEN`] bytes or not visible ASCII.
    pub fn build(self) -> Result<Policy, ConfigError> {
        let history_days = self.history_days.unwrap_or(DEFAULT_HISTORY_DAYS);
        if !(MIN_HISTORY_DAYS..=MAX_HISTORY_DAYS).contains(&history_days) {
            return Err(ConfigError::InvalidHistory(history_days));
        }
        let clock = self.clock.unwrap_or_default();
        let now = clock.wall_nanos();
        let mut snapshot = Snapshot {
            per_key: None,
            plans: HashMap::new(),
            keys: HashMap::with_capacity_and_hasher(self.keys.len(), BuildDigestHasher::default()),
            ids: HashMap::with_capacity(self.keys.len()),
            stage: self
                .stage
                .as_ref()
                .map(StageLimits::compile)
                .transpose()?
                .map(Arc::new),
            anonymous: match &self.anonymous {
                Anonymous::Forbid => None,
                Anonymous::ByIp {
                    throttle,
                    client_ip,
                } => Some(Arc::new(AnonymousLimits {
                    plan: Arc::new(Plan::anonymous("anonymous", throttle)),
                    client_ip: client_ip.clone(),
                })),
            },
            accounts: HashMap::with_capacity(self.accounts.len()),
        };
        for a in &self.accounts {
            let account = Arc::new(AccountLimits::compile(a, now));
            if snapshot
                .accounts
                .insert(Arc::clone(&account.name), account)
                .is_some()
            {
                return Err(ConfigError::DuplicateAccount(a.name().to_owned()));
            }
        }
        for p in &self.plans {
            let plan = Arc::new(Plan::compile(p, now)?);
            if snapshot
                .plans
                .insert(Arc::clone(&plan.name), plan)
                .is_some()
            {
                return Err(ConfigError::DuplicatePlan(p.name().to_owned()));
            }
        }
        for k in &self.keys {
            let entry = snapshot.entry(k)?;
            snapshot.insert(&k.value, entry)?;
        }
        Ok(Policy::from_snapshot(snapshot, history_days))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Throttle;

    fn free() -> UsagePlan {
        UsagePlan::new("free").throttle(Throttle::new(2.0, 5).unwrap())
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

        let dup_id = Policy::builder()
            .plan(free())
            .key(ApiKey::new("k1", "a", "free"))
            .key(ApiKey::new("k1", "b", "free"))
            .build();
        assert!(matches!(dup_id, Err(ConfigError::DuplicateKeyId(_))));

        let bad_value = Policy::builder()
            .plan(free())
            .key(ApiKey::new("k1", "has space", "free"))
            .build();
        assert!(matches!(bad_value, Err(ConfigError::InvalidKey { .. })));

        let quota = crate::Quota::new(5, crate::Period::Day).unwrap();
        assert!(matches!(
            Policy::per_key(free().quota(quota)),
            Err(ConfigError::QuotaNeedsKeys(_))
        ));
        assert!(matches!(
            Policy::builder().history_days(0).build(),
            Err(ConfigError::InvalidHistory(0))
        ));
    }
}
