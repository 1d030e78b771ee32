//! Changing keys and plans while serving, and usage reports (AWS GetUsage / UpdateUsage).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::error::ConfigError;
use crate::plan::{ApiKey, Limit, Plan, UsagePlan};
use crate::policy::{KeyEntry, Policy, wall_nanos};
use crate::store::MemoryStore;
use crate::window::Date;

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
/// // UpdateUsage: 10 more requests in the current window.
/// assert_eq!(admin.set_remaining("k1", 10).unwrap(), 10);
/// # Ok::<(), tollgate::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct Admin {
    policy: Policy,
    store: MemoryStore,
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
    /// The plan has no quota, so there is no usage to report or set.
    NoQuota(String),
    /// The dates asked for are out of range.
    BadRange(&'static str),
    /// The policy limits every key under one plan; it has no registered keys.
    NotRegistered,
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminError::Config(e) => e.fmt(f),
            AdminError::UnknownKey(id) => write!(f, "unknown api key `{id}`"),
            AdminError::UnknownPlan(p) => write!(f, "unknown plan `{p}`"),
            AdminError::NoQuota(p) => write!(f, "plan `{p}` has no quota"),
            AdminError::BadRange(why) => write!(f, "bad date range: {why}"),
            AdminError::NotRegistered => f.write_str("the policy has no registered keys"),
        }
    }
}

impl std::error::Error for AdminError {}

impl From<ConfigError> for AdminError {
    fn from(e: ConfigError) -> Self {
        AdminError::Config(e)
    }
}

impl Admin {
    pub(crate) fn new(policy: Policy, store: MemoryStore) -> Self {
        Admin { policy, store }
    }

    fn now(&self) -> i64 {
        wall_nanos(self.store.clock())
    }

    /// Adds a key.
    pub fn add_key(&self, key: ApiKey) -> Result<(), AdminError> {
        self.policy.update(|snap, inner| {
            if snap.per_key.is_some() {
                return Err(AdminError::NotRegistered);
            }
            let entry = snap.entry(&key, inner)?;
            Ok(snap.insert(&key.value, entry)?)
        })
    }

    /// Enables or disables a key (a disabled key is answered 403).
    pub fn set_enabled(&self, id: &str, enabled: bool) -> Result<(), AdminError> {
        self.replace_entry(id, |e, _, _| {
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
        self.replace_entry(id, |e, snap, inner| {
            let plan = snap
                .plans
                .get(plan)
                .ok_or_else(|| AdminError::UnknownPlan(plan.to_owned()))?;
            Ok(KeyEntry {
                plan: Arc::clone(plan),
                quota: inner.cell(plan, e.state),
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
        self.policy.update(|snap, inner| {
            if snap.per_key.is_some() {
                return Err(AdminError::NotRegistered);
            }
            let created = snap
                .plans
                .get(plan.name())
                .and_then(|p| p.quota.map(|q| q.created_at))
                .unwrap_or(now);
            let compiled = Arc::new(Plan::compile(&plan, created)?);
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
                    for (old, new) in &changed {
                        self.store.rescale(old, new, entry.state);
                    }
                    *entry = Arc::new(KeyEntry {
                        plan: Arc::clone(&compiled),
                        quota: inner.cell(&compiled, entry.state),
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
    pub fn usage(
        &self,
        plan: &str,
        start: Date,
        end: Date,
        key: Option<&str>,
    ) -> Result<UsageReport, AdminError> {
        if start > end {
            return Err(AdminError::BadRange("start is after end"));
        }
        let snap = self.policy.load();
        let p = snap
            .plans
            .get(plan)
            .ok_or_else(|| AdminError::UnknownPlan(plan.to_owned()))?;
        let spec = p
            .quota
            .ok_or_else(|| AdminError::NoQuota(plan.to_owned()))?;
        let today = Date::of_nanos(self.now());
        let end = end.min(today);
        let oldest = today.days() - self.policy.inner.history_days as i64 + 1;
        if start.days() < oldest {
            return Err(AdminError::BadRange(
                "start is before the kept usage history",
            ));
        }
        if let Some(id) = key.filter(|id| !snap.ids.contains_key(*id)) {
            return Err(AdminError::UnknownKey(id.to_owned()));
        }
        let mut items = BTreeMap::new();
        for entry in snap.keys.values() {
            if entry.plan.name != p.name || key.is_some_and(|k| *k != *entry.id) {
                continue;
            }
            let days = match (&entry.quota, start <= end) {
                (Some(cell), true) => cell.report(&spec, start.days(), end.days()),
                _ => Vec::new(),
            };
            items.insert(entry.id.to_string(), days);
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
    pub fn set_remaining(&self, id: &str, remaining: u64) -> Result<u64, AdminError> {
        let snap = self.policy.load();
        let entry = snap.by_id(id)?;
        let (Some(spec), Some(cell)) = (entry.plan.quota, &entry.quota) else {
            return Err(AdminError::NoQuota(entry.plan.name.to_string()));
        };
        let remaining = i64::try_from(remaining).unwrap_or(i64::MAX);
        Ok(cell.set_remaining(&spec, self.now(), remaining).remaining)
    }

    /// Resets a key: its quota window and usage history under its plan are
    /// forgotten and its buckets are full again.
    pub fn reset_key(&self, id: &str) -> Result<(), AdminError> {
        let snap = self.policy.load();
        let entry = snap.by_id(id)?;
        if let Some(cell) = &entry.quota {
            cell.reset();
        }
        for limit in entry.plan.limits() {
            self.store.reset(limit, entry.state);
        }
        Ok(())
    }

    fn replace_entry(
        &self,
        id: &str,
        f: impl FnOnce(
            &KeyEntry,
            &crate::policy::Snapshot,
            &crate::policy::PolicyInner,
        ) -> Result<KeyEntry, AdminError>,
    ) -> Result<(), AdminError> {
        self.policy.update(|snap, inner| {
            let new = f(snap.by_id(id)?, snap, inner)?;
            let digest = snap.ids[id];
            snap.keys.insert(digest, Arc::new(new));
            Ok(())
        })
    }
}

impl crate::policy::Snapshot {
    /// The entry of the key with this id.
    fn by_id(&self, id: &str) -> Result<&Arc<KeyEntry>, AdminError> {
        self.ids
            .get(id)
            .and_then(|d| self.keys.get(d))
            .ok_or_else(|| AdminError::UnknownKey(id.to_owned()))
    }
}

fn clone_entry(e: &KeyEntry) -> KeyEntry {
    KeyEntry {
        id: Arc::clone(&e.id),
        state: e.state,
        plan: Arc::clone(&e.plan),
        enabled: e.enabled,
        quota: e.quota.clone(),
    }
}

fn info(e: &KeyEntry) -> KeyInfo {
    KeyInfo {
        id: e.id.to_string(),
        plan: e.plan.name.to_string(),
        enabled: e.enabled,
    }
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("policy", &self.policy)
            .finish()
    }
}
