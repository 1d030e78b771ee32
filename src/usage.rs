//! Changing keys and plans while serving, and usage reports (AWS GetUsage / UpdateUsage).

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;

use crate::error::ConfigError;
use crate::hash::Digest;
use crate::keys::{Clash, Edit, Item, KeyEntry, Record, SharedRegistry, Update};
use crate::plan::{ApiKey, LimitKind, Plan, UsagePlan};
use crate::policy::{Policy, clash_error};
use crate::resolver::Resolving;
use crate::store::{MemoryStore, QuotaRef, Store, StoreError, StoreFuture, Subject, ThrottleRef};
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
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// admin.add_key(ApiKey::new("k1", "secret-1", "free")).await.unwrap();
/// assert!(layer.check(b"secret-1", 1).is_ok());
/// admin.set_enabled("k1", false).await.unwrap();
/// assert!(layer.check(b"secret-1", 1).is_err());
/// admin.set_enabled("k1", true).await.unwrap();
/// // UpdateUsage: 10 more requests in the current window.
/// assert_eq!(admin.set_remaining("k1", 10).await.unwrap(), 10);
/// # });
/// # Ok::<(), tollgate::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct Admin<S = MemoryStore> {
    pub(crate) policy: Policy,
    pub(crate) store: S,
    /// The layer's resolver, whose cached keys count under the plans too.
    pub(crate) resolver: Option<Arc<Resolving>>,
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
    /// The account it belongs to, if any.
    pub account: Option<String>,
}

/// What [`Admin::update_key`] changes of a key, in one change: each field
/// left unset is kept as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyChange {
    /// Whether the key is enabled.
    pub enabled: Option<bool>,
    /// The name of the plan the key moves to.
    pub plan: Option<String>,
}

impl KeyChange {
    /// A change of nothing.
    pub fn new() -> Self {
        KeyChange::default()
    }

    /// Enables or disables the key.
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = Some(enabled);
        self
    }

    /// Moves the key to the plan named `plan`.
    pub fn plan(mut self, plan: impl Into<String>) -> Self {
        self.plan = Some(plan.into());
        self
    }
}

/// Usage per key per UTC day, as AWS GetUsage reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UsageReport {
    /// The plan.
    pub plan: String,
    /// The first day reported.
    pub start: Date,
    /// The last day reported: the `end` asked for, or today if that is
    /// earlier; never before `start`.
    pub end: Date,
    /// By key id: `[used, remaining]` for each day from `start` to `end`,
    /// where `remaining` is what was left of the quota window at the day's
    /// end, under the limit in force then (see [`Admin::usage`]).
    pub items: BTreeMap<String, Vec<[i64; 2]>>,
    /// Where the next page starts, for a page of a report
    /// ([`Admin::usage_page`]) after which keys remain (AWS GetUsage's
    /// `position`); `None` for the last page and for a whole report.
    pub position: Option<String>,
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
    /// A report of one plan's usage asked for a key on another plan.
    KeyNotInPlan {
        /// The key's id.
        key: String,
        /// The plan asked for.
        plan: String,
        /// The plan the key is on.
        on: String,
    },
    /// The policy limits every key under one plan; it has no registered keys.
    NotRegistered,
    /// One key of a batch could not be imported, so none was.
    Import {
        /// Its place in the batch, from 0.
        index: usize,
        /// Its id.
        id: String,
        /// Why.
        error: Box<AdminError>,
    },
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
            AdminError::KeyNotInPlan { key, plan, on } => {
                write!(f, "api key `{key}` is on plan `{on}`, not `{plan}`")
            }
            AdminError::Store(e) => e.fmt(f),
            AdminError::NotRegistered => f.write_str("the policy has no registered keys"),
            AdminError::Import { index, id, error } => write!(
                f,
                "key {index} (`{id}`) of the batch: {error}; no key was imported"
            ),
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
    pub(crate) fn new(policy: Policy, store: S, resolver: Option<Arc<Resolving>>) -> Self {
        Admin {
            policy,
            store,
            resolver,
        }
    }

    fn now(&self) -> i64 {
        self.store.clock().wall_nanos()
    }

    /// The policy's registered keys, or [`AdminError::NotRegistered`].
    fn registered(&self) -> Result<(), AdminError> {
        if self.policy.load().per_key.is_some() {
            return Err(AdminError::NotRegistered);
        }
        Ok(())
    }

    /// The registry this policy shares with other instances through the
    /// store, if the store shares one.
    fn shared(&self) -> Option<SharedRegistry> {
        self.store.shared_registry()
    }

    /// Adds a key. Refused when its id or value is another key's, when its
    /// plan is unknown, or when its id or value is not 1 to 256 visible
    /// ASCII characters.
    ///
    /// With a store that shares the registry (the Redis store), the key is
    /// written there first: every instance serves it within a second, and
    /// an error of the store (a clear [`AdminError::Store`]) adds it
    /// nowhere.
    pub async fn add_key(&self, key: ApiKey) -> Result<(), AdminError> {
        self.registered()?;
        let checked = self.policy.load().check(&key)?;
        let keys = self.policy.keys();
        let digest = keys.digest(key.value.as_bytes());
        keys.change(|w| w.free(&key.id, digest))
            .map_err(|c| clash_error(c, &key.id))?;
        if let Some(shared) = self.shared() {
            let v = shared.write(Edit::Add(record(&key, digest))).await?;
            // Accepted for every instance: applied here at once, unless the
            // watcher applied it (and what came after it) first.
            if let Some(_applied) = self.policy.made(v, [Item::Key(key.id.clone())]) {
                keys.change(|w| w.put(digest, self.policy.load().fresh(checked.entry)))
                    .map_err(|c| clash_error(c, &key.id))?;
            }
            return Ok(());
        }
        keys.change(|w| w.add_digest(digest, self.policy.load().fresh(checked.entry)))
            .map_err(|c| clash_error(c, &key.id))?;
        Ok(())
    }

    /// Adds every key of a batch, or none: a key that could not be added
    /// alone (see [`add_key`](Self::add_key)), or whose id or value another
    /// key of the batch has, stops the import before any key is added, and
    /// the error names it ([`AdminError::Import`]). Returns how many keys
    /// were added. Each key costs what one [`add_key`](Self::add_key) costs:
    /// a million keys import in about a second (see `BENCHMARKS.md`).
    pub async fn import_keys(
        &self,
        keys: impl IntoIterator<Item = ApiKey>,
    ) -> Result<usize, AdminError> {
        self.registered()?;
        let snap = self.policy.load();
        let keys: Vec<ApiKey> = keys.into_iter().collect();
        let fail = |index: usize, id: &str, error: AdminError| AdminError::Import {
            index,
            id: id.to_owned(),
            error: Box::new(error),
        };
        let registry = self.policy.keys();
        let mut entries = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            let checked = snap.check(k).map_err(|e| fail(i, &k.id, e.into()))?;
            entries.push((registry.digest(k.value.as_bytes()), checked.entry));
        }
        // Clashes with registered keys and within the batch, before any
        // key is added.
        registry.change(|w| {
            let mut ids = std::collections::HashSet::with_capacity(keys.len());
            let mut values = std::collections::HashSet::with_capacity(keys.len());
            for (i, (k, (digest, _))) in keys.iter().zip(&entries).enumerate() {
                let clash = match w.free(&k.id, *digest) {
                    Err(c) => Some(c),
                    Ok(()) if !ids.insert(k.id.as_str()) => Some(Clash::Id),
                    Ok(()) if !values.insert(*digest) => Some(Clash::Value),
                    Ok(()) => None,
                };
                if let Some(c) = clash {
                    return Err(fail(i, &k.id, clash_error(c, &k.id).into()));
                }
            }
            Ok(())
        })?;
        let mut written = None;
        if let Some(shared) = self.shared() {
            let records = keys
                .iter()
                .zip(&entries)
                .map(|(k, (digest, _))| record(k, *digest))
                .collect();
            match shared.write(Edit::Import(records)).await {
                Ok(v) => written = Some(v),
                Err(e) => {
                    // Name the entry another instance's key clashed with.
                    let id = match &e {
                        AdminError::Config(ConfigError::DuplicateKeyId(id))
                        | AdminError::Config(ConfigError::DuplicateKeyValue { id }) => Some(id),
                        _ => None,
                    };
                    return Err(
                        match id.and_then(|id| keys.iter().position(|k| k.id == *id)) {
                            Some(i) => fail(i, &keys[i].id, e),
                            None => e,
                        },
                    );
                }
            }
        }
        let n = keys.len();
        // Applied here at once, unless the watcher applied it (and what
        // came after it) first.
        let _applied = match written.map(|v| {
            self.policy
                .made(v, keys.iter().map(|k| Item::Key(k.id.clone())))
        }) {
            Some(None) => return Ok(n),
            Some(applied) => applied,
            None => None,
        };
        let shared = self.shared().is_some();
        registry.change(|w| {
            // A key added since the check above (the lock was let go in
            // between) refuses the whole batch here, before any key of it
            // is added: an import is all or nothing. (A shared registry's
            // write above was the arbiter.)
            if !shared {
                for (i, (k, (digest, _))) in keys.iter().zip(&entries).enumerate() {
                    w.free(&k.id, *digest)
                        .map_err(|c| fail(i, &k.id, clash_error(c, &k.id).into()))?;
                }
            }
            let snap = self.policy.load();
            for (k, (digest, entry)) in keys.iter().zip(entries) {
                let entry = snap.fresh(entry);
                match shared {
                    // Accepted for every instance (see `add_key`).
                    true => w.put(digest, entry),
                    false => w.add_digest(digest, entry),
                }
                .map_err(|c| clash_error(c, &k.id))?;
            }
            Ok(n)
        })
    }

    /// Removes a key: its next request is answered as an unknown key's. A
    /// value a [`KeyResolver`](crate::KeyResolver) answered with its id has
    /// its cached answer dropped: it is asked of the resolver again.
    /// Requests it has in flight finish, and their token settlements and
    /// concurrency places are still given back. Its counters stay in the
    /// store (a key added again with its id finds them).
    ///
    /// With a store that shares the registry, a key added through another
    /// instance that has not reached this one yet (within a poll of the
    /// registry's log) is removed too: it exists when the store holds it or
    /// this instance does (a key of its static configuration, which the
    /// store may never have held). An id neither holds is
    /// [`AdminError::UnknownKey`], and nothing is written for it.
    pub async fn remove_key(&self, id: &str) -> Result<(), AdminError> {
        // Asked first, as the removal itself cannot say: it tombstones any
        // id, whether a key had it or not.
        self.key_is_there(id).await?;
        if let Some(shared) = self.shared() {
            let v = shared.write(Edit::Remove(id.to_owned())).await?;
            // Removed for every instance: here at once, unless the watcher
            // applied it (and what came after it) first.
            if let Some(_applied) = self.policy.made(v, [Item::Key(id.to_owned())]) {
                self.policy.keys().change(|w| w.remove(id));
            }
            return Ok(());
        }
        match self.policy.keys().change(|w| w.remove(id)) {
            Some(_) => Ok(()),
            None => Err(AdminError::UnknownKey(id.to_owned())),
        }
    }

    /// [`AdminError::UnknownKey`] unless a key has this id: held here (a key
    /// of the static configuration, which the store may never have held), or,
    /// with a store that shares the registry, added through another instance
    /// a moment ago and not yet received here.
    async fn key_is_there(&self, id: &str) -> Result<(), AdminError> {
        self.registered()?;
        if self.policy.keys().by_id(id, |e| e.is_some()) {
            return Ok(());
        }
        match self.shared() {
            Some(shared) if shared.key(id).await?.is_some() => Ok(()),
            _ => Err(AdminError::UnknownKey(id.to_owned())),
        }
    }

    /// Changes a key's plan and whether it is enabled in one change: every
    /// request, on this instance and (with a store that shares the
    /// registry) on every other, finds the key as it was or with all of
    /// `change` applied, never with one field changed and not the other. A
    /// change that names nothing changes nothing, once the key is found
    /// there. The fields mean what [`set_enabled`](Self::set_enabled) and
    /// [`set_plan`](Self::set_plan) make them mean, and a key that is not
    /// there is [`AdminError::UnknownKey`] whatever plan is named; a plan
    /// this instance does not know, [`AdminError::UnknownPlan`], with
    /// nothing changed.
    ///
    /// ```
    /// use tollgate::{ApiKey, KeyChange, Policy, RateLimitLayer, Throttle, UsagePlan};
    ///
    /// let plan = |name| UsagePlan::new(name).throttle(Throttle::new(1.0, 5).unwrap());
    /// let policy = Policy::builder()
    ///     .plan(plan("free"))
    ///     .plan(plan("pro"))
    ///     .key(ApiKey::new("k1", "secret-1", "free"));
    /// let admin = RateLimitLayer::new(policy.build()?).admin();
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// // Moved to `pro` and disabled at once: never enabled on `pro`.
    /// let change = KeyChange::new().plan("pro").enabled(false);
    /// admin.update_key("k1", change).await.unwrap();
    /// let k1 = admin.key("k1").unwrap();
    /// assert_eq!((k1.plan.as_str(), k1.enabled), ("pro", false));
    /// # });
    /// # Ok::<(), tollgate::ConfigError>(())
    /// ```
    pub async fn update_key(&self, id: &str, change: KeyChange) -> Result<(), AdminError> {
        if change.enabled.is_none() && change.plan.is_none() {
            // Nothing to write, to the store or here.
            return self.key_is_there(id).await;
        }
        let plan = match change.plan {
            None => None,
            Some(name) => {
                let to = self.policy.load().plan_named(&name).map(Arc::clone);
                let Some(to) = to else {
                    self.key_is_there(id).await?;
                    return Err(AdminError::UnknownPlan(name));
                };
                Some(to)
            }
        };
        let fields = KeyFields {
            enabled: change.enabled,
            plan,
        };
        self.change_key(id, fields).await
    }

    /// Enables or disables a key (a disabled key is answered 403), and so
    /// every value a [`KeyResolver`](crate::KeyResolver) answers with its
    /// id, cached or not.
    ///
    /// With a store that shares the registry, only the flag is written, on
    /// the key as the store holds it: a plan change made through another
    /// instance a moment ago, not yet received here, is kept. A key added
    /// through another instance and not yet received here is changed too.
    pub async fn set_enabled(&self, id: &str, enabled: bool) -> Result<(), AdminError> {
        self.update_key(id, KeyChange::new().enabled(enabled)).await
    }

    /// Moves a key to another plan (and with it every value a
    /// [`KeyResolver`](crate::KeyResolver) answers with its id, whatever
    /// plan the answer names). Its counters under the old plan are kept
    /// for when it comes back; under the new plan it starts where it left off
    /// there, or fresh.
    ///
    /// With a store that shares the registry, only the plan is written, as
    /// [`set_enabled`](Self::set_enabled) writes only the flag.
    ///
    /// A key that is not there is [`AdminError::UnknownKey`], whatever plan
    /// is named: what the change is about is missing first (AWS answers
    /// NotFound for it); a plan this instance does not know, for a key that
    /// is there, is [`AdminError::UnknownPlan`].
    pub async fn set_plan(&self, id: &str, plan: &str) -> Result<(), AdminError> {
        self.update_key(id, KeyChange::new().plan(plan)).await
    }

    /// Adds a plan, or replaces the limits of the plan with the same name.
    /// Keys on the plan keep their counters (and so do keys moved away from
    /// it, for when they come back): a throttle whose numbers change
    /// keeps the share of each key's bucket in use (an emptied bucket stays
    /// empty and refills at the new rate), quota counts carry over, and a
    /// quota's offset counts from the plan's first creation. That holds for
    /// the registered keys and for the keys the resolver's cache holds on
    /// the plan; a resolved key no longer cached when the plan is put (its
    /// answer evicted) keeps its state as it was, read under the new
    /// numbers, with a store that converts at once (the memory store). A
    /// key untouched through several changes ends as one converted at each
    /// (the Redis store replays the last 16 it missed), the time between
    /// them refilling at the numbers then in force. A
    /// usage report reads each past day as a report read it at the day's
    /// end: what remained then, under the limit and the period in force at
    /// that day's end (the day of the key's last request before a change
    /// on a later day under the old ones, a change on the day itself under
    /// the new ones), and shows today what the next request finds, on
    /// every store alike.
    ///
    /// A quota whose period changes (a week's first day among them) keeps a
    /// key's count in the window of the new period that holds the key's
    /// last change (a request, not a change of the plan: a limit put anew
    /// in between moves nothing), and starts from 0 in a window that began
    /// after it: a
    /// key never gets more than the limit in a window of the new period,
    /// and one that used its quota up just before may wait past the end of
    /// the old window (what it used before the new window began is not told
    /// apart). A week moved from Monday to Wednesday on a Thursday: a key
    /// whose last request was on Tuesday has a fresh week, one that used it
    /// up on Wednesday waits for the next Wednesday.
    pub async fn put_plan(&self, plan: UsagePlan) -> Result<(), AdminError> {
        self.registered()?;
        let now = self.now();
        // Checked before it is shared.
        Plan::compile(&plan, now)?;
        // Before any request decides under the new numbers (the watcher may
        // apply them as soon as they are shared).
        self.requota_plan(&plan, now)?;
        let mut written = None;
        if let Some(shared) = self.shared() {
            let snap = self.policy.load();
            let created = snap
                .plan_place(plan.name())
                .and_then(|at| snap.plan(at).quota.map(|q| q.created_at))
                .unwrap_or(now);
            let encoded = crate::plan::wire::encode_plan(&plan, created);
            let name = plan.name().to_owned();
            written = Some(shared.write(Edit::Plan { name, encoded }).await?);
        }
        // Applied here at once, unless the watcher applied it (and what came
        // after it) first, and converted the state then.
        let _applied =
            match written.map(|v| self.policy.made(v, [Item::Plan(plan.name().to_owned())])) {
                Some(None) => return Ok(()),
                Some(applied) => applied,
                None => None,
            };
        let put = self.policy.put_plan(&plan, now, now)?;
        rescale_plan(&self.policy, &self.store, self.resolver.as_deref(), &put);
        Ok(())
    }

    /// Adds an account, or replaces the limits of the account with the same
    /// name; its keys keep their counters, as a plan's do
    /// ([`put_plan`](Self::put_plan)): a throttle or per-minute token
    /// bucket whose numbers change keeps the share of the account's bucket
    /// in use. Keys join an account when they are added with
    /// [`ApiKey::account`](crate::ApiKey::account).
    pub async fn put_account(&self, account: crate::Account) -> Result<(), AdminError> {
        self.registered()?;
        let now = self.now();
        // As in `put_plan`.
        self.requota_account(&account, now);
        let mut written = None;
        if let Some(shared) = self.shared() {
            let snap = self.policy.load();
            let created = snap
                .account_named(account.name())
                .and_then(|a| a.quota.map(|q| q.created_at))
                .unwrap_or(now);
            let encoded = crate::plan::wire::encode_account(&account, created);
            let name = account.name().to_owned();
            written = Some(shared.write(Edit::Account { name, encoded }).await?);
        }
        // Applied here at once, unless the watcher applied it (and what came
        // after it) first, and converted the state then.
        let _applied = match written.map(|v| {
            self.policy
                .made(v, [Item::Account(account.name().to_owned())])
        }) {
            Some(None) => return Ok(()),
            Some(applied) => applied,
            None => None,
        };
        let put = self.policy.put_account(&account, now, now)?;
        rescale_account(&self.store, &put);
        Ok(())
    }

    /// Tells the store of each quota of the plan named as `plan` whose
    /// numbers `plan` changes (its period among them), for every registered key
    /// ([`Store::requota`]): the days closed from now on are closed
    /// under the numbers they were counted under, and a usage report keeps
    /// what remained at each past day's end.
    fn requota_plan(&self, plan: &UsagePlan, now: i64) -> Result<(), AdminError> {
        let Some(old) = self.policy.load().plan_named(plan.name()).map(Arc::clone) else {
            return Ok(());
        };
        // Dated as `Policy::put_plan` dates it.
        let created = old.quota.map_or(now, |q| q.created_at);
        let new = Plan::compile(plan, created)?;
        let changed = changed_quotas(probe(&old).quotas(), || probe(&new).quotas());
        if changed.is_empty() {
            return Ok(());
        }
        // Every key, not only those on the plan now: a key moved away keeps
        // its counters under the plan for when it comes back.
        self.policy.keys().for_each(|entry| {
            let subject = self.subject(&old, entry);
            for q in subject.quotas().filter(|q| changed.contains(&q.spec.salt)) {
                self.store.requota(&q);
            }
        });
        Ok(())
    }

    /// [`requota_plan`](Self::requota_plan) for an account's quotas, which
    /// its keys share.
    fn requota_account(&self, account: &crate::Account, now: i64) {
        let days = self.policy.inner.history_days as u32;
        let Some(old) = self.policy.load().account_named(account.name()).cloned() else {
            return;
        };
        let created = old.quota.map_or(now, |q| q.created_at);
        let new = crate::plan::AccountLimits::compile(account, created);
        fn quotas(a: &crate::plan::AccountLimits, days: u32) -> [Option<QuotaRef<'_>>; 3] {
            let [day, month] = a.token_quotas();
            [a.request_quota(days), day, month]
        }
        let old_quotas = quotas(&old, days);
        let changed = changed_quotas(old_quotas.iter().flatten().copied(), || {
            quotas(&new, days).into_iter().flatten()
        });
        for q in old_quotas.iter().flatten() {
            if changed.contains(&q.spec.salt) {
                self.store.requota(q);
            }
        }
    }

    /// The key with this id.
    pub fn key(&self, id: &str) -> Option<KeyInfo> {
        self.policy.keys().by_id(id, |e| e.map(info))
    }

    /// Every registered key, by id.
    pub fn keys(&self) -> Vec<KeyInfo> {
        let mut keys = Vec::with_capacity(self.policy.keys().len());
        self.policy.keys().for_each(|e| keys.push(info(e)));
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        keys
    }

    /// The plan with this name, as it was last put.
    pub fn plan(&self, name: &str) -> Option<UsagePlan> {
        let snap = self.policy.load();
        snap.plan_place(name).map(|at| snap.plan(at).source.clone())
    }

    /// Usage of the keys of `plan` (or of one key) per UTC day from `start`
    /// to `end` (AWS GetUsage). `end` is cut at today; `start` must lie within
    /// the kept history, and not after today: a range that starts after
    /// `end`, after today or before the kept history is
    /// [`AdminError::BadRange`] (today is the UTC day by the store's clock,
    /// which for the Redis store is Redis `TIME`). So a report always holds
    /// `end - start + 1` days for each key, the first of them `start`.
    ///
    /// A day before the key existed (or before its plan did) reads as a day
    /// without traffic: `[0, remaining]`, with what the window had left at
    /// that day's end, its whole limit when nothing counted in it yet, as
    /// AWS reports a subscriber that used none of its quota.
    ///
    /// What a report holds, by decision:
    ///
    /// - The keys registered on `plan` (in the policy, through `Admin`, or
    ///   with the Redis store in its shared registry). A removed key is in
    ///   none (asked by id, it is [`AdminError::UnknownKey`]); its counters
    ///   stay, and a key added again with its id reports them. A key only a
    ///   [`KeyResolver`](crate::KeyResolver) knows is in none either: a
    ///   resolver is asked by key value, never by id, so which ids it would
    ///   answer, and on which plan, cannot be listed, and a report of the
    ///   answers its cache happens to hold would change with the cache; and
    ///   its quota keeps no history but the current day's (so that a store
    ///   bounds what unregistered subjects hold). Its counts live under its
    ///   id, as a registered key's with that id would: registering the id on
    ///   the key's plan (with a value of its own that nobody sends, such as
    ///   a generated one) keeps them, and its history from then on, and
    ///   puts it in the reports; the resolver's values with that id are then
    ///   decided as the registered key.
    /// - The plan's request quota, as AWS GetUsage's `[used, remaining]`
    ///   pairs count requests. A plan without one is
    ///   [`AdminError::NoQuota`]. Token budgets (`per_minute`, `per_day`,
    ///   `per_month`) are not in reports, which keep AWS's shape: what
    ///   remains of them now is read with
    ///   [`RateLimitLayer::standing`](crate::RateLimitLayer::standing) (by
    ///   the key's value, a resolved key's too) or
    ///   [`standing_by_id`](crate::RateLimitLayer::standing_by_id).
    ///
    /// Each day's `remaining` is what was left of its quota window at the
    /// day's end, under the limit in force at that end: a plan put anew
    /// with another limit (or offset) on a day counts that day and the days
    /// after it under the new limit, the days before under the old, on
    /// every store alike. A key that used 3 of 10 on May 1, whose plan was
    /// put with 20 on May 1, reports `[3, 17]` for May 1 and `[0, 17]` after
    /// it; put with 20 on May 3 instead, it reports `[3, 7]`, `[0, 7]`, then
    /// `[0, 17]` from May 3. Today's shows a limit put today at once. A day
    /// of a window in which the key had used nothing before it (and no
    /// change of the limit found the key's count) reports the window's
    /// limit in force at that day's end, whether or not a request a later
    /// limit denied charged and gave back that window: a denial leaves no
    /// trace in a report, on every store alike. Only changes made through
    /// [`put_plan`](Self::put_plan) (or, for an account,
    /// [`put_account`](Self::put_account)) while the plan had registered
    /// keys are known (each store logs the numbers before each, a few bytes
    /// a day for each quota, kept as long as the history): after a plan
    /// changed by restarting with another configuration, the days before
    /// read under the numbers now in memory, and as they were counted on
    /// the Redis store.
    ///
    /// One key (`key`) on another plan than `plan` is
    /// [`AdminError::KeyNotInPlan`], which names the plan it is on: as AWS
    /// GetUsage, a report holds only the keys of the plan asked for, and a
    /// report of none would read as a key that used nothing.
    ///
    /// With a store that shares the registry, one key added through another
    /// instance that has not reached this one yet (within a poll of the
    /// registry's log) is reported too, on the plan the store's record of
    /// it names. A plan this instance does not know yet (put through
    /// another instance moments ago) is [`AdminError::UnknownPlan`].
    pub async fn usage(
        &self,
        plan: &str,
        start: Date,
        end: Date,
        key: Option<&str>,
    ) -> Result<UsageReport, AdminError> {
        self.report(plan, start, end, key, None).await
    }

    /// One page of [`usage`](Self::usage)'s report (AWS GetUsage's `limit`
    /// and `position`): at most `limit` keys of `plan`, in the order of
    /// their ids, the first of them the first whose id comes after
    /// `position` (from the first key when `None`). While keys remain
    /// after the page, its [`UsageReport::position`] is the position to ask
    /// for the next one (the page's last id); the last page has none. The
    /// pages together hold every key of the plan that was there throughout;
    /// a key added or removed between pages is in a page or not as its id
    /// falls, and a position whose key was removed still resumes after it.
    ///
    /// Only the page's keys are read from the store (a whole report reads
    /// every key of the plan); finding them sorts the ids of the plan's
    /// registered keys, for each page. One key (`key`) is reported as by
    /// [`usage`](Self::usage), when its id comes after `position`, with no
    /// position. Every refusal is [`usage`](Self::usage)'s.
    pub async fn usage_page(
        &self,
        plan: &str,
        start: Date,
        end: Date,
        key: Option<&str>,
        limit: NonZeroUsize,
        position: Option<&str>,
    ) -> Result<UsageReport, AdminError> {
        self.report(plan, start, end, key, Some((limit, position)))
            .await
    }

    /// A usage report, whole (`page` `None`) or one page of it.
    async fn report(
        &self,
        plan: &str,
        start: Date,
        end: Date,
        key: Option<&str>,
        page: Option<(NonZeroUsize, Option<&str>)>,
    ) -> Result<UsageReport, AdminError> {
        let after = page.and_then(|(_, position)| position);
        let comes = |id: &str| after.is_none_or(|after| id > after);
        if start > end {
            return Err(AdminError::BadRange("start is after end"));
        }
        let today = Date::of_nanos(self.now());
        check_not_after_today(start, today)?;
        let end = end.min(today);
        // A key this instance has not received yet, as the store holds it:
        // read before the policy is loaded, which is not held across a
        // call to the store.
        let elsewhere = match key {
            Some(id) => self.not_received(id).await?,
            None => None,
        };
        // The store's reads start here; the policy is not held across them.
        let mut pending: Vec<(String, DaysFuture)> = Vec::new();
        let mut position = None;
        {
            let snap = self.policy.load();
            let place = snap
                .plan_place(plan)
                .ok_or_else(|| AdminError::UnknownPlan(plan.to_owned()))?;
            let p = snap.plan(place);
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
            // The keys to report: each one's id and where its state lives.
            let mut found: Vec<(String, Digest)> = Vec::new();
            match key {
                // This instance's copy first, if it arrived meanwhile.
                Some(id) => self
                    .policy
                    .keys()
                    .by_id(id, |e| match e.or(elsewhere.as_ref()) {
                        Some(e) if e.plan.name != p.name => Err(AdminError::KeyNotInPlan {
                            key: id.to_owned(),
                            plan: plan.to_owned(),
                            on: e.plan.name.to_string(),
                        }),
                        Some(e) => {
                            if comes(&e.id) {
                                found.push((e.id.to_string(), e.state()));
                            }
                            Ok(())
                        }
                        None => Err(AdminError::UnknownKey(id.to_owned())),
                    })?,
                None => self.policy.keys().for_each(|e| {
                    if e.plan.name == p.name && comes(&e.id) {
                        found.push((e.id.to_string(), e.state()));
                    }
                }),
            }
            if let Some((limit, _)) = page {
                if found.len() > limit.get() {
                    found.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                    found.truncate(limit.get());
                    position = found.last().map(|(id, _)| id.clone());
                }
            }
            for (id, state) in found {
                let q = key_subject(&self.policy, p, &id, state).quota(LimitKind::Quota, spec);
                let days = self.store.usage(&q, start, end);
                pending.push((id, days));
            }
        }
        let mut items = BTreeMap::new();
        for (id, days) in pending {
            items.insert(id, days.await?);
        }
        Ok(UsageReport {
            plan: plan.to_owned(),
            start,
            end,
            items,
            position,
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
    /// What remains is what was set: units charged before it are in it. A
    /// refund or give-back of such units later (a request's charge given
    /// back when a later limit denied it, a share of the quota another
    /// instance borrowed from the Redis store and returns unused) gives
    /// nothing, as after [`reset_key`](Self::reset_key); given back, they
    /// would raise what remains past what was set. Until it goes back, such
    /// a share is still decided from: for up to the Redis store's
    /// `max_age` (`RedisStoreBuilder::max_age`) after the set, an
    /// instance holding one may admit its unused units (at most
    /// `max_share` each) beyond what was set. This instance's own shares go back before the set.
    ///
    /// With a store that shares the registry, a key added through another
    /// instance that has not reached this one yet is counted too, as
    /// [`usage`](Self::usage) reports it.
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
        // A key this instance has not received yet, as the store holds it
        // (this instance's copy first, if it arrived meanwhile).
        let elsewhere = self.not_received(id).await?;
        let pending = self.policy.keys().by_id(id, |entry| {
            let entry = (entry.or(elsewhere.as_ref()))
                .ok_or_else(|| AdminError::UnknownKey(id.to_owned()))?;
            let plan = &entry.plan;
            let Some(q) = self.subject(plan, entry).request_quota() else {
                return Err(AdminError::NoQuota(plan.name.to_string()));
            };
            Ok(self.store.set_remaining(&q, remaining))
        })?;
        Ok(pending.await?)
    }

    /// Resets a key: its quota windows and usage history under its plan are
    /// forgotten and its buckets are full again. That is every limit the
    /// plan counts for the key, its models' included: the request quota,
    /// the token budgets, each model's throttle, quota and token budgets.
    /// Its requests in flight keep their concurrency places.
    ///
    /// A request admitted before the reset whose tokens settle after it (a
    /// stream that ends later) settles against the key's counts as they are
    /// then, by one rule on every store: the reset forgave what the request
    /// reserved, so an over-estimate gives nothing back to a quota or token
    /// quota reset after the request was charged (as it gives nothing to a
    /// window that began after; given back, the units would be granted
    /// twice), nor to a per-minute token bucket the reset filled after the
    /// request's decision (the reset refilled the request's share at once,
    /// though by the clock it had not refilled yet), while an
    /// under-estimate's extra tokens are charged (erring toward admitting
    /// less). A charge at the reset's very instant counts as made after it.
    /// The same holds for a Redis store's units given back later: a share
    /// another instance borrowed before the reset, or what one part of a
    /// split decision charged. For this a reset leaves a mark beside each
    /// bucket, kept for the bucket's span (past it, no share reserved before
    /// the reset has anything left to give back): a decision never reads
    /// it, only a settlement or give-back does. Such a share is still
    /// decided from until it is used or `max_age` old: for that long the
    /// instance holding it may admit its unused units beyond the whole
    /// limits the reset gave (as [`set_remaining`](Self::set_remaining)).
    ///
    /// With a store that shares the registry, a key added through another
    /// instance that has not reached this one yet is reset too, as
    /// [`usage`](Self::usage) reports it.
    pub async fn reset_key(&self, id: &str) -> Result<(), AdminError> {
        // As in `set_remaining`.
        let elsewhere = self.not_received(id).await?;
        let pending = self.policy.keys().by_id(id, |entry| {
            let entry = (entry.or(elsewhere.as_ref()))
                .ok_or_else(|| AdminError::UnknownKey(id.to_owned()))?;
            let plan = &entry.plan;
            let subject = self.subject(plan, entry);
            // Every throttle of the plan (the models' among them), with the
            // first quota; then each other quota on its own, as a store
            // resets one quota at a time.
            let throttles: Vec<ThrottleRef<'_>> =
                plan.limits().map(|l| subject.throttle(l)).collect();
            let mut quotas = subject.quotas();
            let mut pending = vec![self.store.reset(&throttles, quotas.next().as_ref())];
            pending.extend(quotas.map(|q| self.store.reset(&[], Some(&q))));
            Ok::<_, AdminError>(pending)
        })?;
        for p in pending {
            p.await?;
        }
        Ok(())
    }

    /// The key with this id as the store that shares the registry holds
    /// it, when this instance has not received it yet (added through
    /// another instance within the last poll of the registry's log), so
    /// that it is read and counted as a key held here is. `None` when this
    /// instance holds the key, or shares no registry: the caller reads its
    /// own copy, and answers [`AdminError::UnknownKey`] when it has none.
    ///
    /// The key is built on the plan and account its record names, as this
    /// instance knows them: one it does not know is
    /// [`AdminError::UnknownPlan`] or [`AdminError::UnknownAccount`] (the
    /// watcher skips such a key too, so this instance never serves it). An
    /// id the store does not hold either is [`AdminError::UnknownKey`].
    /// The key is only read, not put into this instance's registry: the
    /// watcher puts it there in the log's order (put now, it could undo a
    /// later removal the watcher applied first).
    async fn not_received(&self, id: &str) -> Result<Option<KeyEntry>, AdminError> {
        let Some(shared) = self.shared() else {
            return Ok(None);
        };
        // A policy that limits every key under one plan registers none.
        if self.registered().is_err() || self.policy.keys().by_id(id, |e| e.is_some()) {
            return Ok(None);
        }
        let r = (shared.key(id).await?).ok_or_else(|| AdminError::UnknownKey(id.to_owned()))?;
        let snap = self.policy.load();
        let plan = snap
            .plan_named(&r.plan)
            .ok_or_else(|| AdminError::UnknownPlan(r.plan.clone()))?;
        let account = match &r.account {
            None => None,
            Some(name) => Some(Arc::clone(
                snap.account_named(name)
                    .ok_or_else(|| AdminError::UnknownAccount(name.clone()))?,
            )),
        };
        Ok(Some(KeyEntry::new(
            id,
            Arc::clone(plan),
            account,
            r.enabled,
        )))
    }

    /// A registered key under `plan`, as the store counts it.
    fn subject<'a>(&self, plan: &'a Plan, entry: &'a KeyEntry) -> Subject<'a> {
        key_subject(&self.policy, plan, &entry.id, entry.state())
    }

    /// Sets `fields` on the key with this id; its other fields stay.
    async fn change_key(&self, id: &str, fields: KeyFields) -> Result<(), AdminError> {
        self.registered()?;
        let keys = self.policy.keys();
        if let Some(shared) = self.shared() {
            // The fields changed, not this instance's whole copy of the key,
            // which may not have received another instance's change yet
            // (see `SharedRegistry::update`). Nor is a key missing here
            // unknown: it may have been added through another instance a
            // moment ago; the store says.
            let held = keys.change(|w| {
                w.by_id(id).map(|(digest, e)| Record {
                    id: id.to_owned(),
                    digest,
                    plan: e.plan.name.to_string(),
                    account: e.account.as_ref().map(|a| a.name.to_string()),
                    enabled: e.enabled,
                })
            });
            let update = Update {
                id: id.to_owned(),
                held,
                enabled: fields.enabled,
                plan: fields.plan.map(|p| p.name.to_string()),
            };
            return shared.update(&self.policy, update).await;
        }
        // Read, changed and replaced under one hold of the write lock, so
        // that two changes of one key on two threads both hold. The plan
        // and account as they are now (one may have been put meanwhile).
        keys.change(|w| {
            let (_, old) = w
                .by_id(id)
                .ok_or_else(|| AdminError::UnknownKey(id.to_owned()))?;
            let new = KeyEntry {
                enabled: fields.enabled.unwrap_or(old.enabled),
                plan: fields.plan.unwrap_or_else(|| Arc::clone(&old.plan)),
                ..old.clone()
            };
            w.replace(self.policy.load().fresh(new));
            Ok(())
        })
    }
}

/// Converts the state `store` keeps of each throttle of a plan put anew
/// (`put`: the plan compiled, and its throttles whose numbers changed,
/// old and new) kept at the same place (salt), so that the share of each
/// key's bucket in use carries over; once per state (a resolved key may
/// have a registered key's id, and two cached values may name one key).
/// Every way a plan put anew reaches an instance converts through here,
/// once: its own [`Admin`] applying its change, and the shared registry's
/// log or a full read of it applying another instance's.
pub(crate) fn rescale_plan<S: Store>(
    policy: &Policy,
    store: &S,
    resolver: Option<&Resolving>,
    put: &crate::policy::PutPlan,
) {
    let (compiled, changed) = put;
    if changed.is_empty() {
        return;
    }
    let mut done = std::collections::HashSet::new();
    let mut rescale = |id: &str, state| {
        if done.insert(state) {
            let subject = key_subject(policy, compiled, id, state);
            for (old, new) in changed {
                store.rescale(&subject.throttle(old), &subject.throttle(new));
            }
        }
    };
    // Every key, not only those on the plan now: a key moved away keeps its
    // state under the plan for when it comes back, and finds it as full or
    // as empty as it left it (a key that never was on the plan has no state
    // there: nothing is converted).
    policy
        .keys()
        .for_each(|entry| rescale(&entry.id, entry.state()));
    // Copied out of the cache first: no lock of it is held while the store
    // converts.
    let found = resolver.map_or_else(Vec::new, |r| r.found_on(&compiled.name));
    for f in found {
        rescale(&f.id, f.state);
    }
}

/// The key with public id `id` (whose state lives at `state`, the digest of
/// the id) under `plan`, as the store counts a registered key, with the
/// policy's usage history (a throttle, the only state `rescale_plan`
/// converts for a resolved key, keeps none).
fn key_subject<'a>(policy: &Policy, plan: &'a Plan, id: &'a str, state: Digest) -> Subject<'a> {
    Subject {
        plan,
        name: id.as_bytes(),
        digest: state,
        history_days: policy.inner.history_days as u32,
    }
}

/// [`rescale_plan`] for an account put anew: its state is its own, shared
/// by all its keys (whoever registered or resolved them), converted once.
pub(crate) fn rescale_account<S: Store>(store: &S, put: &crate::policy::PutAccount) {
    let (compiled, changed) = put;
    for (old, new) in changed {
        store.rescale(&compiled.throttle_ref(old), &compiled.throttle_ref(new));
    }
}

/// The fields of a key an admin change sets (`None`: kept as they are).
struct KeyFields {
    enabled: Option<bool>,
    plan: Option<Arc<Plan>>,
}

/// A key as a shared registry keeps it.
fn record(key: &ApiKey, digest: Digest) -> Record {
    Record {
        id: key.id.clone(),
        digest,
        plan: key.plan.clone(),
        account: key.account.clone(),
        enabled: key.enabled,
    }
}

/// The salts of the quotas among `old` whose numbers (or period) differ in
/// `new` (one with the same salt): those whose days a store must close
/// under the old numbers ([`Store::requota`]).
fn changed_quotas<'a, I>(old: impl Iterator<Item = QuotaRef<'a>>, new: impl Fn() -> I) -> Vec<u64>
where
    I: Iterator<Item = QuotaRef<'a>>,
{
    old.filter(|o| new().any(|n| n.spec.salt == o.spec.salt && n.spec != o.spec))
        .map(|o| o.spec.salt)
        .collect()
}

/// `plan` counted for no one: its limits, to compare with another's.
fn probe(plan: &Plan) -> Subject<'_> {
    Subject {
        plan,
        name: b"",
        digest: Digest(0),
        history_days: 0,
    }
}

/// [`AdminError::BadRange`] when `start` is after `today`: such a range
/// has no day to report, and its report's end, cut at today, would come
/// before its start.
pub(crate) fn check_not_after_today(start: Date, today: Date) -> Result<(), AdminError> {
    if start > today {
        return Err(AdminError::BadRange("start is after today (UTC)"));
    }
    Ok(())
}

/// A key's daily usage, being read from the store.
type DaysFuture = StoreFuture<Vec<[i64; 2]>>;

fn info(e: &KeyEntry) -> KeyInfo {
    KeyInfo {
        id: e.id.to_string(),
        plan: e.plan.name.to_string(),
        enabled: e.enabled,
        account: e.account.as_ref().map(|a| a.name.to_string()),
    }
}

impl<S> fmt::Debug for Admin<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("policy", &self.policy)
            .finish()
    }
}
