//! The policy: which plan and limits apply to a request's key, changeable while serving.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::sync::Mutex;
use arc_swap::ArcSwap;

use crate::clock::Clock;
use crate::error::ConfigError;
use crate::extract::{ClientIp, DEFAULT_MAX_KEY_LEN, validate};
use crate::keys::{Applied, Clash, KeyEntry, Registry, ValueHasher};
use crate::plan::{
    Account, AccountLimits, Anonymous, ApiKey, Earlier, Limit, Plan, Stage, StageLimits, UsagePlan,
};

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
/// removed, disabled or moved, plans replaced, without losing counters.
/// Requests read it without a lock. Registered keys live in a concurrent
/// hash map: adding, removing or changing one key costs the same with ten
/// keys or ten million (see `BENCHMARKS.md`), and a key's entry takes about
/// a hundred bytes beyond its id.
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
    /// Plans, accounts and anonymous limits: few, copied on change.
    pub(crate) current: ArcSwap<Snapshot>,
    /// Limits shared by every caller (fixed when the policy is built).
    pub(crate) stage: Option<Arc<StageLimits>>,
    /// The registered keys, changed one at a time.
    pub(crate) keys: Registry,
    /// Serialises changes to the snapshot (readers never take it).
    write: Mutex<()>,
    /// Days of usage history a key's quota keeps (the store keeps them).
    pub(crate) history_days: usize,
    /// The ids and values of the keys the policy was built with, until the
    /// first layer is built on it: a layer on a store that shares the
    /// registry between instances hashes them again under the shared key
    /// ([`Policy::rekey`]). Dropped then, so that no value stays in memory.
    statics: Mutex<Option<Vec<Static>>>,
    /// Whether the registry is shared through a store already.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) attached: AtomicBool,
    /// How far the watcher has applied a shared registry, and what `Admin`
    /// applied ahead of it. Held while a change is applied, by the watcher
    /// and by `Admin` applying its own write at once, so that the two never
    /// interleave.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) applied: Mutex<Applied>,
}

/// A key of the policy as it was built: its id and value.
type Static = (Box<str>, Box<str>);

/// A plan put: compiled, with the throttles whose numbers changed (old, new).
pub(crate) type PutPlan = (Arc<Plan>, Vec<(Limit, Limit)>);

/// An account put: compiled, with the throttles whose numbers changed (old,
/// new).
pub(crate) type PutAccount = (Arc<AccountLimits>, Vec<(Limit, Limit)>);

/// One immutable version of the policy's plans and shared limits.
#[derive(Clone)]
pub(crate) struct Snapshot {
    /// `Policy::per_key`: every key is limited under this plan.
    pub(crate) per_key: Option<Arc<Plan>>,
    /// Every plan, in the order it was first put (plans are replaced,
    /// never removed).
    pub(crate) plans: Vec<Arc<Plan>>,
    /// Places in `plans` by name.
    pub(crate) plan_names: HashMap<Arc<str>, u32>,
    pub(crate) anonymous: Option<Arc<AnonymousLimits>>,
    /// Accounts, in the order each was first put: limits shared by all the
    /// keys of each.
    pub(crate) accounts: Vec<Arc<AccountLimits>>,
    /// Places in `accounts` by name.
    pub(crate) account_names: HashMap<Arc<str>, u32>,
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
    /// The plan may have quotas: they are counted per key, keeping the
    /// current day only (no usage history: reports are of registered keys).
    /// The memory store keeps at most `max_keys` such counters and reuses
    /// one whose window has ended; while every counter is live, a new key
    /// is refused (429) until one goes idle, and no live count is ever
    /// forgotten. The Redis store's counters expire with their window.
    ///
    /// Errors when the plan is invalid.
    pub fn per_key(plan: UsagePlan) -> Result<Self, ConfigError> {
        let clock = Clock::system();
        let compiled = Arc::new(Plan::compile(&plan, clock.wall_nanos())?);
        let snapshot = Snapshot {
            per_key: Some(compiled),
            plans: Vec::new(),
            plan_names: HashMap::new(),
            anonymous: None,
            accounts: Vec::new(),
            account_names: HashMap::new(),
        };
        Ok(Policy::from_parts(
            snapshot,
            None,
            Registry::new(ValueHasher::process(), 0),
            DEFAULT_HISTORY_DAYS,
            Vec::new(),
        ))
    }

    /// Starts a policy of registered API keys.
    pub fn builder() -> PolicyBuilder {
        PolicyBuilder::default()
    }

    fn from_parts(
        snapshot: Snapshot,
        stage: Option<Arc<StageLimits>>,
        keys: Registry,
        history_days: usize,
        statics: Vec<Static>,
    ) -> Self {
        Policy {
            inner: Arc::new(PolicyInner {
                current: ArcSwap::from_pointee(snapshot),
                stage,
                keys,
                write: Mutex::new(()),
                history_days,
                statics: Mutex::new(Some(statics)),
                attached: AtomicBool::new(false),
                applied: Mutex::new(Applied::default()),
            }),
        }
    }

    /// Hashes key values under the key `(k0, k1)` shared by the instances
    /// of a registry (see [`Registry::rekey`]); `false` when the policy's
    /// own keys are no longer known (a layer was built on it before).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn rekey(&self, k0: u64, k1: u64) -> bool {
        match self.inner.statics.lock().take() {
            Some(values) => {
                self.inner.keys.rekey(k0, k1, &values);
                true
            }
            None => false,
        }
    }

    /// Forgets the values of the keys the policy was built with: a layer
    /// on a store that does not share the registry never needs them.
    pub(crate) fn seal(&self) {
        self.inner.statics.lock().take();
    }

    /// The current version, for reading without a lock.
    #[inline]
    pub(crate) fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.inner.current.load()
    }

    /// The registered keys.
    #[inline]
    pub(crate) fn keys(&self) -> &Registry {
        &self.inner.keys
    }

    /// Adds `plan`, or replaces the limits of the plan with its name, dated
    /// `created` (when a plan of this name first existed; an existing plan
    /// keeps its date). Returns the plan compiled and its throttles whose
    /// numbers changed (old, new), whose state a store may convert.
    pub(crate) fn put_plan(
        &self,
        plan: &UsagePlan,
        created: i64,
        now: i64,
    ) -> Result<PutPlan, crate::AdminError> {
        // Under the registry's lock, so that no key is added with the old
        // plan between the new version and the keys re-pointed.
        self.keys().change(|w| {
            let put = self.update(|snap| Self::put_plan_in(snap, plan, created, now))?;
            let compiled = &put.0;
            w.rebind(|e| {
                (e.plan.name == compiled.name).then(|| KeyEntry {
                    plan: Arc::clone(compiled),
                    ..e.clone()
                })
            });
            Ok(put)
        })
    }

    fn put_plan_in(
        snap: &mut Snapshot,
        plan: &UsagePlan,
        created: i64,
        now: i64,
    ) -> Result<PutPlan, crate::AdminError> {
        {
            if snap.per_key.is_some() {
                return Err(crate::AdminError::NotRegistered);
            }
            let old = snap
                .plan_place(plan.name())
                .map(|at| Arc::clone(snap.plan(at)));
            let created = old
                .as_ref()
                .and_then(|p| p.quota.map(|q| q.created_at))
                .unwrap_or(created);
            let mut compiled = Plan::compile(plan, created)?;
            // A throttle whose numbers change is marked with the time, for
            // stores that convert each key's state when it is next used.
            let changed = match &old {
                Some(old) => mark_changed(|| old.limits(), compiled.limits_mut(), now),
                None => Vec::new(),
            };
            let compiled = Arc::new(compiled);
            snap.put_plan(Arc::clone(&compiled));
            Ok((compiled, changed))
        }
    }

    /// Adds `account`, or replaces the limits of the account with its name,
    /// dated `created` (an existing account keeps its date); a throttle whose
    /// numbers change is marked with `now`, as a plan's is, and returned
    /// with its old numbers.
    pub(crate) fn put_account(
        &self,
        account: &Account,
        created: i64,
        now: i64,
    ) -> Result<PutAccount, crate::AdminError> {
        self.keys().change(|w| {
            let put = self.update(|snap| Self::put_account_in(snap, account, created, now))?;
            let compiled = &put.0;
            w.rebind(|e| {
                e.account
                    .as_ref()
                    .filter(|a| a.name == compiled.name)
                    .map(|_| KeyEntry {
                        account: Some(Arc::clone(compiled)),
                        ..e.clone()
                    })
            });
            Ok(put)
        })
    }

    fn put_account_in(
        snap: &mut Snapshot,
        account: &Account,
        created: i64,
        now: i64,
    ) -> Result<PutAccount, crate::AdminError> {
        {
            if snap.per_key.is_some() {
                return Err(crate::AdminError::NotRegistered);
            }
            let old = snap.account_named(account.name()).cloned();
            let created = old
                .as_ref()
                .and_then(|a| a.quota.map(|q| q.created_at))
                .unwrap_or(created);
            let mut compiled = AccountLimits::compile(account, created);
            // The shared throttle and the per-minute token bucket, as a
            // plan's throttles (see `put_plan_in`).
            let changed = match &old {
                Some(old) => mark_changed(|| old.limits(), compiled.limits_mut(), now),
                None => Vec::new(),
            };
            let compiled = Arc::new(compiled);
            snap.put_account(Arc::clone(&compiled));
            Ok((compiled, changed))
        }
    }

    /// Applies `change` to a copy of the current plans and publishes it.
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

/// A key checked against a snapshot, ready to be registered.
pub(crate) struct Checked {
    pub(crate) entry: KeyEntry,
}

impl Snapshot {
    /// The plan at a place a key names.
    #[inline]
    pub(crate) fn plan(&self, place: u32) -> &Arc<Plan> {
        &self.plans[place as usize]
    }

    /// `entry` with its plan and account as this version has them (a key
    /// checked against an earlier version, registered now: a plan or an
    /// account put in between is the one it gets). Called under the
    /// registry's lock, which plan and account changes also hold.
    pub(crate) fn fresh(&self, entry: KeyEntry) -> KeyEntry {
        KeyEntry {
            plan: self
                .plan_named(&entry.plan.name)
                .map_or(entry.plan, Arc::clone),
            account: entry
                .account
                .map(|a| self.account_named(&a.name).map_or(a, Arc::clone)),
            ..entry
        }
    }

    /// The plan with this name.
    pub(crate) fn plan_named(&self, name: &str) -> Option<&Arc<Plan>> {
        Some(self.plan(self.plan_place(name)?))
    }

    /// The account with this name.
    pub(crate) fn account_named(&self, name: &str) -> Option<&Arc<AccountLimits>> {
        self.accounts.get(self.account_place(name)? as usize)
    }

    /// The place of the account with this name.
    pub(crate) fn account_place(&self, name: &str) -> Option<u32> {
        self.account_names.get(name).copied()
    }

    /// Adds an account at a new place, or replaces the one with its name.
    pub(crate) fn put_account(&mut self, account: Arc<AccountLimits>) {
        match self.account_names.get(&*account.name) {
            Some(&at) => self.accounts[at as usize] = account,
            None => {
                self.account_names
                    .insert(Arc::clone(&account.name), self.accounts.len() as u32);
                self.accounts.push(account);
            }
        }
    }

    /// The place of the plan with this name.
    pub(crate) fn plan_place(&self, name: &str) -> Option<u32> {
        self.plan_names.get(name).copied()
    }

    /// Adds a plan at a new place, or replaces the one with its name.
    pub(crate) fn put_plan(&mut self, plan: Arc<Plan>) -> Option<Arc<Plan>> {
        match self.plan_names.get(&*plan.name) {
            Some(&at) => Some(std::mem::replace(&mut self.plans[at as usize], plan)),
            None => {
                self.plan_names
                    .insert(Arc::clone(&plan.name), self.plans.len() as u32);
                self.plans.push(plan);
                None
            }
        }
    }

    /// Checks `key` (its id, value and plan) against this version.
    pub(crate) fn check(&self, key: &ApiKey) -> Result<Checked, ConfigError> {
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
            .plan_named(&key.plan)
            .ok_or_else(|| ConfigError::UnknownPlan {
                key: key.id.clone(),
                plan: key.plan.clone(),
            })?;
        let account = match &key.account {
            None => None,
            Some(name) => {
                Some(
                    self.account_named(name)
                        .ok_or_else(|| ConfigError::UnknownAccount {
                            key: key.id.clone(),
                            account: name.clone(),
                        })?,
                )
            }
        };
        Ok(Checked {
            entry: KeyEntry::new(&key.id, Arc::clone(plan), account.cloned(), key.enabled),
        })
    }
}

/// The error of a key that clashes with a registered one.
pub(crate) fn clash_error(clash: Clash, id: &str) -> ConfigError {
    match clash {
        Clash::Id => ConfigError::DuplicateKeyId(id.to_owned()),
        Clash::Value => ConfigError::DuplicateKeyValue { id: id.to_owned() },
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
                .field("keys", &self.inner.keys.len())
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
        let stage = self
            .stage
            .as_ref()
            .map(StageLimits::compile)
            .transpose()?
            .map(Arc::new);
        let mut snapshot = Snapshot {
            per_key: None,
            plans: Vec::with_capacity(self.plans.len()),
            plan_names: HashMap::with_capacity(self.plans.len()),
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
            accounts: Vec::with_capacity(self.accounts.len()),
            account_names: HashMap::with_capacity(self.accounts.len()),
        };
        for a in &self.accounts {
            if snapshot.account_place(a.name()).is_some() {
                return Err(ConfigError::DuplicateAccount(a.name().to_owned()));
            }
            snapshot.put_account(Arc::new(AccountLimits::compile(a, now)));
        }
        for p in &self.plans {
            if snapshot.plan_place(p.name()).is_some() {
                return Err(ConfigError::DuplicatePlan(p.name().to_owned()));
            }
            snapshot.put_plan(Arc::new(Plan::compile(p, now)?));
        }
        let registry = Registry::new(ValueHasher::process(), self.keys.len());
        registry.change(|w| {
            for k in &self.keys {
                let checked = snapshot.check(k)?;
                w.add(k.value.as_bytes(), checked.entry)
                    .map_err(|c| clash_error(c, &k.id))?;
            }
            Ok::<_, ConfigError>(())
        })?;
        let statics = self
            .keys
            .into_iter()
            .map(|k| (k.id.into_boxed_str(), k.value.into_boxed_str()))
            .collect();
        Ok(Policy::from_parts(
            snapshot,
            stage,
            registry,
            history_days,
            statics,
        ))
    }
}

/// Marks each limit of `new` with the time its numbers last changed: `now`
/// when they differ from the same limit (by salt) among `old`'s, else the
/// old mark; returns each changed limit with its old numbers.
fn mark_changed<'o, I: Iterator<Item = &'o Limit>>(
    old: impl Fn() -> I,
    new: impl Iterator<Item = &'o mut Limit>,
    now: i64,
) -> Vec<(Limit, Limit)> {
    let mut changed = Vec::new();
    for new in new {
        if let Some(o) = old().find(|o| o.salt == new.salt) {
            if o.gcra == new.gcra {
                new.since = o.since;
                new.before = o.before.clone();
            } else {
                new.since = now;
                new.before = Some(Earlier::after(o, now));
                changed.push((o.clone(), new.clone()));
            }
        }
    }
    changed
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

        // Per-key quotas are counted in bounded memory by the stores.
        let quota = crate::Quota::new(5, crate::Period::Day).unwrap();
        assert!(Policy::per_key(free().quota(quota)).is_ok());
        assert!(matches!(
            Policy::builder().history_days(0).build(),
            Err(ConfigError::InvalidHistory(0))
        ));
    }
}
