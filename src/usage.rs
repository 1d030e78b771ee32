//! Changing keys and plans while serving, and usage reports (AWS GetUsage / UpdateUsage).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::error::ConfigError;
use crate::plan::{ApiKey, Limit, LimitKind, Plan, UsagePlan};
use crate::policy::{KeyEntry, Policy, Snapshot};
use crate::store::{MemoryStore, Store, StoreError, StoreFuture, Subject, ThrottleRef};
use crate::window::Date;

mod account;
pub use self::account::AccountUsage;

/// The largest count [`Admin::set_remaining`] takes: 2^53, the largest limit
/// a quota can have. A double (a number of the Redis store's script, or of a
/// JSON client) holds every integer up to it exactly, and not all above.
pub(crate) const MAX_REMAINING: u64 = 1 << 53;

/// What a store answers a count above [`MAX_REMAINING`] when asked directly
/// (through [`Store::set_remaining`], not [`Admin`], which refuses it first):
/// the same error from every store.
pub(crate) fn check_remaining(remaining: u64) -> Result<(), StoreError> {
    if remaining > MAX_REMAINING {
        return Err(StoreError::new(format!(
            "remaining {remaining} is above 2^53"
        )));
    }
    Ok(())
}

/// A handle to change a running policy and read its usage, from
/// [`RateLimitLayer::admin`](crate::RateLimitLayer::admin).
///
/// Changes take effect for the next request, without a restart; counters are
/// kept (they belong to each (plan, key), so a key moved away and back finds
/// its counters again, and a plan whose limits are replaced keeps them too).
///
/// ```
/// use tollgate::{ApiKey, Period, Policy, Quota, RateLimitLayer, Throttle, UsagePlan};
///
/// let plan = UsagePlan::new("free").quota(Quota::new(3, Period::Day)?);
/// let layer = RateLimitLayer::new(Policy::builder().plan(plan).build()?);
/// let admin = layer.admin();
///
/// admin.add_key(ApiKey::new("k1", "secret-1", "free")).unwrap();
/// assert!(layer.check(b"secret-1", 1).is_ok());
/// admin.set_enabled("k1", false).unwrap();
/// assert!(layer.check(b"secret-1", 1).is_err());
/// admin.set_enabled("k1", true).unwrap();
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// // UpdateUsage: 10 more requests in the current window.
/// assert_eq!(admin.set_remaining("k1", 10).await.unwrap(), 10);
/// # });
/// # Ok::<(), tollgate::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct Admin<S = MemoryStore> {
    pub(crate) policy: Policy,
    pub(crate) store: S,
}

/// A registered key as the admin handle shows it (never its value).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyInfo {
    /// The public id.
    pub id: String,
    /// The plan it is bound to.
    pub plan: String,
    /// Whether it is enabled.
    pub enabled: bool,
}

/// Usage per key per UTC day, as AWS GetUsage reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UsageReport {
    /// The plan.
    pub plan: String,
    /// The first day reported.
    pub start: Date,
    /// The last day reported (at most today).
    pub end: Date,
    /// By key id: `[used, remaining]` for each day from `start` to `end`,
    /// where `remaining` is what was left of the quota window at the day's end.
    pub items: BTreeMap<String, Vec<[i64; 2]>>,
}

/// An admin operation that cannot be done.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum AdminError {
    /// The change would make the policy invalid.
    Config(ConfigError),
    /// No key has this id.
    UnknownKey(String),
    /// No plan has this name.
    UnknownPlan(String),
    /// No account has this name.
    UnknownAccount(String),
    /// The account has no quota, so there is no usage to report or set.
    NoAccountQuota(String),
    /// The plan has no quota, so there is no usage to report or set.
    NoQuota(String),
    /// The store could not be read or changed.
    Store(StoreError),
    /// The dates asked for are out of range.
    BadRange(&'static str),
    /// The policy limits every key under one plan; it has no registered keys.
    NotRegistered,
    /// A quota's remaining count above [`Admin::set_remaining`]'s range
    /// (at most 2^53, the largest limit a quota can have).
    RemainingOutOfRange {
        /// The count asked for.
        remaining: u64,
        /// The largest count accepted.
        max: u64,
    },
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminError::Config(e) => e.fmt(f),
            AdminError::UnknownKey(id) => write!(f, "unknown api key `{id}`"),
            AdminError::UnknownPlan(p) => write!(f, "unknown plan `{p}`"),
            AdminError::UnknownAccount(a) => write!(f, "unknown account `{a}`"),
            AdminError::NoAccountQuota(a) => write!(f, "account `{a}` has no quota"),
            AdminError::NoQuota(p) => write!(f, "plan `{p}` has no quota"),
            AdminError::BadRange(why) => write!(f, "bad date range: {why}"),
            AdminError::Store(e) => e.fmt(f),
            AdminError::NotRegistered => f.write_str("the policy has no registered keys"),
            AdminError::RemainingOutOfRange { remaining, max } => write!(
                f,
                "remaining {remaining} is out of range: at most {max} (2^53, the largest quota limit)"
            ),
        }
    }
}

impl std::error::Error for AdminError {}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        AdminError::Store(e)
    }
}

impl From<ConfigError> for AdminError {
    fn from(e: ConfigError) -> Self {
        AdminError::Config(e)
    }
}

impl<S: Store> Admin<S> {
    pub(crate) fn new(policy: Policy, store: S) -> Self {
        Admin { policy, store }
    }

    fn now(&self) -> i64 {
        self.store.clock().wall_nanos()
    }

    /// Adds a key.
    pub fn add_key(&self, key: ApiKey) -> Result<(), AdminError> {
        self.policy.update(|snap| {
            if snap.per_key.is_some() {
                return Err(AdminError::NotRegistered);
            }
            let entry = snap.entry(&key)?;
            Ok(snap.insert(&key.value, entry)?)
        })
    }

    /// Enables or disables a key (a disabled key is answered 403).
    pub fn set_enabled(&self, id: &str, enabled: bool) -> Result<(), AdminError> {
        self.replace_entry(id, |e, _| {
            Ok(KeyEntry {
                enabled,
                ..clone_entry(e)
            })
        })
    }

    /// Moves a key to another plan. Its counters under the old plan are kept
    /// for when it comes back; under the new plan it starts where it left off
    /// there, or fresh.
    pub fn set_plan(&self, id: &str, plan: &str) -> Result<(), AdminError> {
        self.replace_entry(id, |e, snap| {
            let plan = snap
                .plans
                .get(plan)
                .ok_or_else(|| AdminError::UnknownPlan(plan.to_owned()))?;
            Ok(KeyEntry {
                plan: Arc::clone(plan),
                ..clone_entry(e)
            })
        })
    }

    /// Adds a plan, or replaces the limits of the plan with the same name.
    /// Keys on the plan keep their counters: a throttle whose numbers change
    /// keeps the share of each key's bucket in use (an emptied bucket stays
    /// empty and refills at the new rate), quota counts carry over, and a
    /// quota's offset counts from the plan's first creation.
    pub fn put_plan(&self, plan: UsagePlan) -> Result<(), AdminError> {
        let now = self.now();
        self.policy.update(|snap| {
            if snap.per_key.is_some() {
                return Err(AdminError::NotRegistered);
            }
            let created = snap
                .plans
                .get(plan.name())
                .and_then(|p| p.quota.map(|q| q.created_at))
                .unwrap_or(now);
            let mut compiled = Plan::compile(&plan, created)?;
            // A throttle whose numbers change is marked with the time, for
            // stores that convert each key's state when it is next used.
            if let Some(old) = snap.plans.get(plan.name()) {
                for new in compiled.limits_mut() {
                    if let Some(o) = old.limits().find(|o| o.salt == new.salt) {
                        new.since = if o.gcra == new.gcra { o.since } else { now };
                    }
                }
            }
            let compiled = Arc::new(compiled);
            let previous = snap
                .plans
                .insert(Arc::clone(&compiled.name), Arc::clone(&compiled));
            // Throttles kept at the same place (salt) with new numbers: convert
            // each key's state so the share of its bucket in use carries over.
            let changed: Vec<(&Limit, &Limit)> = match &previous {
                None => Vec::new(),
                Some(old) => compiled
                    .limits()
                    .filter_map(|new| {
                        let old = old.limits().find(|o| o.salt == new.salt)?;
                        (old.gcra != new.gcra).then_some((old, new))
                    })
                    .collect(),
            };
            for entry in snap.keys.values_mut() {
                if entry.plan.name == compiled.name {
                    let subject = self.subject(&compiled, entry);
                    for (old, new) in &changed {
                        self.store
                            .rescale(&subject.throttle(old), &subject.throttle(new));
                    }
                    *entry = Arc::new(KeyEntry {
                        plan: Arc::clone(&compiled),
                        ..clone_entry(entry)
                    });
                }
            }
            Ok(())
        })
    }

    /// The key with this id.
    pub fn key(&self, id: &str) -> Option<KeyInfo> {
        self.policy.load().by_id(id).ok().map(|e| info(e))
    }

    /// Every registered key, by id.
    pub fn keys(&self) -> Vec<KeyInfo> {
        let snap = self.policy.load();
        let mut keys: Vec<_> = snap.keys.values().map(|e| info(e)).collect();
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        keys
    }

    /// The plan with this name, as it was last put.
    pub fn plan(&self, name: &str) -> Option<UsagePlan> {
        self.policy.load().plans.get(name).map(|p| p.source.clone())
    }

    /// Usage of the keys of `plan` (or of one key) per UTC day from `start`
    /// to `end` (AWS GetUsage). `end` is cut at today; `start` must lie within
    /// the kept history.
    pub async fn usage(
        &self,
        plan: &str,
        start: Date,
        end: Date,
        key: Option<&str>,
    ) -> Result<UsageReport, AdminError> {
        if start > end {
            return Err(AdminError::BadRange("start is after end"));
        }
        let today = Date::of_nanos(self.now());
        let end = end.min(today);
        // The store's reads start here; the policy is not held across them.
        let mut pending: Vec<(String, Option<DaysFuture>)> = Vec::new();
        {
            let snap = self.policy.load();
            let p = snap
                .plans
                .get(plan)
                .ok_or_else(|| AdminError::UnknownPlan(plan.to_owned()))?;
            let spec = p
                .quota
                .as_ref()
                .ok_or_else(|| AdminError::NoQuota(plan.to_owned()))?;
            let oldest = today.days() - self.policy.inner.history_days as i64 + 1;
            if start.days() < oldest {
                return Err(AdminError::BadRange(
                    "start is before the kept usage history",
                ));
            }
            if let Some(id) = key.filter(|id| !snap.ids.contains_key(*id)) {
                return Err(AdminError::UnknownKey(id.to_owned()));
            }
            for entry in snap.keys.values() {
                if entry.plan.name != p.name || key.is_some_and(|k| *k != *entry.id) {
                    continue;
                }
                let days = (start <= end).then(|| {
                    let q = self.subject(p, entry).quota(LimitKind::Quota, spec);
                    self.store.usage(&q, start, end)
                });
                pending.push((entry.id.to_string(), days));
            }
        }
        let mut items = BTreeMap::new();
        for (id, days) in pending {
            let days = match days {
                Some(f) => f.await?,
                None => Vec::new(),
            };
            items.insert(id, days);
        }
        Ok(UsageReport {
            plan: plan.to_owned(),
            start,
            end,
            items,
        })
    }

    /// Sets what remains of the key's quota in the current window (AWS
    /// UpdateUsage); returns it. Above the limit raises the key's allowance for
    /// this window only; 0 stops it until the window ends.
    ///
    /// `remaining` may be anything from 0 to 2^53 (9007199254740992), the
    /// largest limit a [`Quota`](crate::Quota) can have: every store counts
    /// it exactly (the Redis store's script holds integers up to 2^53), and
    /// so does a JSON client. A larger value is refused with
    /// [`AdminError::RemainingOutOfRange`] before any store is asked, the
    /// same with every store; it is a mistake of the caller (an HTTP API
    /// answers it 400), not a store failure.
    ///
    /// ```
    /// use tollgate::{AdminError, ApiKey, Period, Policy, Quota, RateLimitLayer, UsagePlan};
    ///
    /// let plan = UsagePlan::new("free").quota(Quota::new(100, Period::Day)?);
    /// let policy = Policy::builder().plan(plan).key(ApiKey::new("k1", "secret-1", "free"));
    /// let admin = RateLimitLayer::new(policy.build()?).admin();
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// assert_eq!(admin.set_remaining("k1", 1 << 53).await, Ok(1 << 53));
    /// assert!(matches!(
    ///     admin.set_remaining("k1", u64::MAX).await,
    ///     Err(AdminError::RemainingOutOfRange { .. })
    /// ));
    /// # });
    /// # Ok::<(), tollgate::ConfigError>(())
    /// ```
    pub async fn set_remaining(&self, id: &str, remaining: u64) -> Result<u64, AdminError> {
        if remaining > MAX_REMAINING {
            return Err(AdminError::RemainingOutOfRange {
                remaining,
                max: MAX_REMAINING,
            });
        }
        let pending = {
            let snap = self.policy.load();
            let entry = snap.by_id(id)?;
            let Some(q) = self.subject(&entry.plan, entry).request_quota() else {
                return Err(AdminError::NoQuota(entry.plan.name.to_string()));
            };
            self.store.set_remaining(&q, remaining)
        };
        Ok(pending.await?)
    }

    /// Resets a key: its quota window and usage history under its plan are
    /// forgotten and its buckets are full again.
    pub async fn reset_key(&self, id: &str) -> Result<(), AdminError> {
        let pending = {
            let snap = self.policy.load();
            let entry = snap.by_id(id)?;
            let subject = self.subject(&entry.plan, entry);
            let throttles: Vec<ThrottleRef<'_>> =
                entry.plan.limits().map(|l| subject.throttle(l)).collect();
            let mut pending = vec![
                self.store
                    .reset(&throttles, subject.request_quota().as_ref()),
            ];
            // The daily and monthly token budgets start afresh too.
            for q in subject.token_quotas().iter().flatten() {
                pending.push(self.store.reset(&[], Some(q)));
            }
            pending
        };
        for p in pending {
            p.await?;
        }
        Ok(())
    }

    /// A registered key under `plan`, as the store counts it.
    fn subject<'a>(&self, plan: &'a Plan, entry: &'a KeyEntry) -> Subject<'a> {
        Subject {
            plan,
            name: entry.id.as_bytes(),
            digest: entry.state,
            history_days: self.policy.inner.history_days as u32,
        }
    }

    fn replace_entry(
        &self,
        id: &str,
        f: impl FnOnce(&KeyEntry, &Snapshot) -> Result<KeyEntry, AdminError>,
    ) -> Result<(), AdminError> {
        self.policy.update(|snap| {
            let new = f(snap.by_id(id)?, snap)?;
            let digest = snap.ids[id];
            snap.keys.insert(digest, Arc::new(new));
            Ok(())
        })
    }
}

impl Snapshot {
    /// The entry of the key with this id.
    fn by_id(&self, id: &str) -> Result<&Arc<KeyEntry>, AdminError> {
        self.ids
            .get(id)
            .and_then(|d| self.keys.get(d))
            .ok_or_else(|| AdminError::UnknownKey(id.to_owned()))
    }
}

/// A key's daily usage, being read from the store.
type DaysFuture = StoreFuture<Vec<[i64; 2]>>;

fn clone_entry(e: &KeyEntry) -> KeyEntry {
    KeyEntry {
        id: Arc::clone(&e.id),
        state: e.state,
        plan: Arc::clone(&e.plan),
        enabled: e.enabled,
        account: e.account.clone(),
    }
}

fn info(e: &KeyEntry) -> KeyInfo {
    KeyInfo {
        id: e.id.to_string(),
        plan: e.plan.name.to_string(),
        enabled: e.enabled,
    }
}

impl<S> fmt::Debug for Admin<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("policy", &self.policy)
            .finish()
    }
}
