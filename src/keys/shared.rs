//! A registry shared by every instance through their store: each change made
//! through [`Admin`](crate::Admin) is written to the store first (one atomic
//! write, refused there when it clashes with another instance's change),
//! then applied here; every other instance receives it from the store's
//! change log and applies it too. A layer built on such a store loads the
//! current registry and follows the log from then on.

use std::collections::HashMap;
use std::fmt;

use crate::hash::Digest;
#[cfg(not(feature = "redis"))]
use crate::{policy::Policy, usage::AdminError};

/// Where a store keeps the key registry that its instances share: keys (by
/// the keyed hash of their value, never the value), plans and accounts.
/// [`Store::shared_registry`](crate::store::Store::shared_registry) gives
/// it; the Redis store shares its registry unless told not to
/// ([`RedisStoreBuilder::shared_registry`](crate::RedisStoreBuilder::shared_registry)).
#[derive(Clone)]
pub struct SharedRegistry {
    #[cfg(feature = "redis")]
    pub(crate) store: crate::RedisStore,
    _private: (),
}

impl fmt::Debug for SharedRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedRegistry").finish_non_exhaustive()
    }
}

/// A key as it is written to a shared registry.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) struct Record {
    pub(crate) id: String,
    pub(crate) digest: Digest,
    pub(crate) plan: String,
    pub(crate) account: Option<String>,
    pub(crate) enabled: bool,
}

/// A change of some fields of a key, as it is written to a shared
/// registry: only what the admin changed, set there on the key as the
/// registry holds it (this instance's copy may be older: see
/// [`SharedRegistry::update`]).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) struct Update {
    pub(crate) id: String,
    /// The key as this instance holds it, if it does.
    pub(crate) held: Option<Record>,
    pub(crate) enabled: Option<bool>,
    pub(crate) plan: Option<String>,
}

/// A change to a shared registry.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) enum Edit {
    Add(Record),
    Remove(String),
    Import(Vec<Record>),
    Plan { name: String, encoded: String },
    Account { name: String, encoded: String },
}

/// What one change to a shared registry sets whole: a key (by id), a plan
/// or an account (by name).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
#[derive(Debug)]
pub(crate) enum Item {
    Key(String),
    Plan(String),
    Account(String),
}

/// How far this instance has applied a shared registry.
///
/// The watcher applies the store's changes in version order; `Admin`
/// applies a change of its own at once, ahead of the watcher, which may
/// still be reading (or be about to deliver) earlier changes of the same
/// key, plan or account. Such an earlier change, applied after the later
/// one, would undo it until the watcher reached the later one again (a
/// poll later): a plan put back to its old numbers, a key back on the plan
/// it was moved from. So the items `Admin` applied ahead are kept here with
/// the version of their change, and the watcher leaves them alone until it
/// has passed that version.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// The version the watcher has applied, every change up to it in
    /// version order (this instance's own among them).
    version: u64,
    /// Keys (by id), plans and accounts (by name) `Admin` applied from its
    /// own writes past `version`, each with the version of its write (the
    /// latest, when several). Maps: an import applies thousands of keys.
    keys: HashMap<String, u64>,
    plans: HashMap<String, u64>,
    accounts: HashMap<String, u64>,
}

#[cfg(not(feature = "redis"))]
impl SharedRegistry {
    pub(crate) async fn write(&self, _edit: Edit) -> Result<u64, AdminError> {
        Err(AdminError::NotRegistered)
    }

    pub(crate) async fn update(&self, _policy: &Policy, _update: Update) -> Result<(), AdminError> {
        Err(AdminError::NotRegistered)
    }

    pub(crate) async fn key(&self, _id: &str) -> Result<Option<Record>, AdminError> {
        Err(AdminError::NotRegistered)
    }
}

#[cfg(not(feature = "redis"))]
impl Policy {
    pub(crate) fn attach(
        &self,
        _shared: &SharedRegistry,
        _resolver: Option<std::sync::Arc<crate::resolver::Resolving>>,
    ) {
    }

    pub(crate) fn made(&self, _version: u64, _items: impl IntoIterator<Item = Item>) -> Option<()> {
        Some(())
    }
}

#[cfg(feature = "redis")]
mod redis_registry {
    use std::collections::{HashMap, HashSet};
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use super::{Applied, Edit, Item, Record, SharedRegistry, Update};
    use crate::error::ConfigError;
    use crate::hash::Digest;
    use crate::keys::{KeyEntry, Writer};
    use crate::plan::wire;
    use crate::policy::{Policy, Snapshot};
    use crate::resolver::Resolving;
    use crate::store::Store;
    use crate::store::redis::registry::{
        Change, KeyRecord, KeyUpdate, RegistryError, RegistryUpdate,
    };
    use crate::usage::AdminError;
    use crate::usage::{rescale_account, rescale_plan};
    use std::sync::MutexGuard;

    impl SharedRegistry {
        pub(crate) fn new(store: crate::RedisStore) -> Self {
            SharedRegistry {
                store,
                _private: (),
            }
        }

        /// Writes `edit` to the store; returns the registry's new version.
        pub(crate) async fn write(&self, edit: Edit) -> Result<u64, AdminError> {
            let change = match edit {
                Edit::Add(r) => Change::AddKey(record(r)),
                Edit::Remove(id) => Change::RemoveKey { id },
                Edit::Import(rs) => Change::Import(rs.into_iter().map(record).collect()),
                Edit::Plan { name, encoded } => Change::PutPlan { name, encoded },
                Edit::Account { name, encoded } => Change::PutAccount { name, encoded },
            };
            self.store
                .registry_write(&change)
                .await
                .map_err(admin_error)
        }

        /// Sets the fields `update` names on the key as the store holds it,
        /// then applies the key as the store answered it to `policy` at
        /// once, unless the watcher applied that change (and maybe a later
        /// one of the same key) first.
        ///
        /// Only the fields changed are written: this instance's copy of the
        /// key may lag the store's by up to a poll of the log (a change made
        /// through another instance that has not arrived yet), and the
        /// fields it did not change are taken from the store, so that such
        /// a change is kept, not undone. For the same reason the key as the
        /// store answers it, both changes in it, is what is applied here,
        /// not this instance's copy with its one change. A key this instance
        /// has not received yet (added through another one moments ago) is
        /// changed all the same, and applied here with the change; the
        /// store refuses only a key it does not hold either
        /// ([`AdminError::UnknownKey`]), unless this instance holds it (a
        /// key of its static configuration, changed for the first time:
        /// this instance's copy, changed, is written).
        pub(crate) async fn update(
            &self,
            policy: &Policy,
            update: Update,
        ) -> Result<(), AdminError> {
            let update = KeyUpdate {
                id: update.id,
                held: update.held.map(record),
                enabled: update.enabled,
                plan: update.plan,
                account: None,
            };
            let (version, key) = self
                .store
                .registry_update(&update)
                .await
                .map_err(admin_error)?;
            if let Some(_applied) = policy.made(version, [Item::Key(key.id.clone())]) {
                policy.apply(Change::UpdateKey(key), &self.store, None);
            }
            Ok(())
        }

        /// The key with this id as the store holds it now, `None` when the
        /// store holds no live key of that id (never added, or removed).
        ///
        /// For a key this instance has not received yet (added through
        /// another instance within the last poll of the log): the store's
        /// record says that it exists, and on which plan. Only read, never
        /// applied here: the watcher applies the key in the log's order,
        /// and a later removal applied first would be undone.
        pub(crate) async fn key(&self, id: &str) -> Result<Option<Record>, AdminError> {
            let key = self.store.registry_key(id).await?;
            Ok(key.map(from_store))
        }
    }

    /// A key as the store holds it.
    fn from_store(k: KeyRecord) -> Record {
        Record {
            id: k.id,
            digest: Digest(k.value_hash),
            plan: k.plan,
            account: k.account,
            enabled: k.enabled,
        }
    }

    /// A key as the store writes it.
    fn record(r: Record) -> KeyRecord {
        KeyRecord {
            id: r.id,
            value_hash: r.digest.0,
            plan: r.plan,
            account: r.account,
            enabled: r.enabled,
        }
    }

    /// What a refused or failed write tells the admin.
    fn admin_error(e: RegistryError) -> AdminError {
        match e {
            RegistryError::Duplicate { id } => ConfigError::DuplicateKeyId(id).into(),
            RegistryError::DuplicateValue { id } => ConfigError::DuplicateKeyValue { id }.into(),
            RegistryError::UnknownKey { id } => AdminError::UnknownKey(id),
            RegistryError::Store(e) => AdminError::Store(e),
        }
    }

    impl Policy {
        /// Shares this policy's registry through `shared`: hashes key values
        /// under the shared key, applies what the store holds, and follows
        /// its changes. Done once per policy; a second layer built on the
        /// same policy shares the first one's. A plan put anew converts the
        /// state of the keys `resolver` holds on it too, as `Admin` does.
        pub(crate) fn attach(&self, shared: &SharedRegistry, resolver: Option<Arc<Resolving>>) {
            if self.inner.attached.swap(true, Ordering::AcqRel) {
                return;
            }
            // A per-key policy has no registry to share.
            if self.load().per_key.is_some() {
                self.seal();
                return;
            }
            let (k0, k1) = shared.store.value_keys();
            if !self.rekey(k0, k1) {
                tracing::warn!(
                    "the policy was used by a layer before one on a store that shares keys: \
                     its own keys are not found by their values"
                );
            }
            // The static configuration as built (under the shared hash
            // key): what a reload starts from, as a new instance does.
            let statics = self.keys().change(|w| w.entries());
            let (version, all) = shared.store.take_preloaded().unwrap_or_default();
            // The watcher keeps the registry as loaded: what it writes back
            // should Redis lose it.
            let loaded = all.clone();
            self.apply_all(all, None, &[], &shared.store, resolver.as_deref());
            self.inner.applied.lock().version = version;
            let policy = self.clone();
            let store = shared.store.clone();
            shared.store.registry_watch(
                Arc::new(move |update| {
                    policy.follow(update, &statics, &store, resolver.as_deref())
                }),
                version,
                &loaded,
            );
        }

        /// Applies what the watcher delivers: every change in version
        /// order, this instance's own too (applying one again changes
        /// nothing), so that the last applied is the one of the highest
        /// version, as in Redis, though an older change of another instance
        /// arrived after this instance applied its own. A key, plan or
        /// account this instance applied ahead of the watcher from a write
        /// of its own is left as it is until the watcher passes that write
        /// (see [`Applied`]). A plan or account put anew converts the state
        /// `store` keeps under it (see [`rescale_plan`]), `resolver`'s keys
        /// included.
        pub(crate) fn follow(
            &self,
            update: RegistryUpdate,
            statics: &[(Digest, KeyEntry)],
            store: &crate::RedisStore,
            resolver: Option<&Resolving>,
        ) {
            let mut applied = self.inner.applied.lock();
            match update {
                RegistryUpdate::Change { version, change } => {
                    let limits =
                        matches!(change, Change::PutPlan { .. } | Change::PutAccount { .. });
                    if let Some(change) = applied.behind(change, version) {
                        self.apply(change, store, resolver);
                    }
                    applied.passed(version);
                    // A plan put back to numbers it had is the same
                    // identity in the over-limit cache, not the same
                    // count: a denial cached before is forgotten.
                    if limits {
                        store.forget_denials();
                    }
                }
                RegistryUpdate::Reload { version, all } => {
                    let all = all
                        .into_iter()
                        .filter_map(|c| applied.behind(c, version))
                        .collect();
                    // Keys applied ahead stay as they are: neither removed
                    // nor put back as configured.
                    let kept: Vec<&str> = applied
                        .keys
                        .iter()
                        .filter(|(_, v)| **v > version)
                        .map(|(id, _)| id.as_str())
                        .collect();
                    self.apply_all(all, Some(statics), &kept, store, resolver);
                    applied.passed(version);
                    store.forget_denials();
                }
            }
        }

        /// This instance wrote the change of `version`, which sets `items`:
        /// the hold under which `Admin` applies it at once, so that it is
        /// served here without waiting for the log (the items are kept as
        /// applied ahead of the watcher, see [`Applied`]). `None` when the
        /// watcher has applied that version already (and maybe a later
        /// change of the same key, which applying this one now would undo):
        /// the change is in place.
        pub(crate) fn made(
            &self,
            version: u64,
            items: impl IntoIterator<Item = Item>,
        ) -> Option<MutexGuard<'_, Applied>> {
            let mut applied = self.inner.applied.lock();
            if applied.version >= version {
                return None;
            }
            for item in items {
                let (ahead, name) = match item {
                    Item::Key(id) => (&mut applied.keys, id),
                    Item::Plan(name) => (&mut applied.plans, name),
                    Item::Account(name) => (&mut applied.accounts, name),
                };
                let v = ahead.entry(name).or_insert(version);
                *v = (*v).max(version);
            }
            Some(applied)
        }

        /// Applies a change from the log, over the static configuration.
        fn apply(&self, change: Change, store: &crate::RedisStore, resolver: Option<&Resolving>) {
            self.apply_all(vec![change], None, &[], store, resolver);
        }

        /// Applies changes (the registry as loaded, or one change): plans
        /// and accounts first, then every key under one hold of the
        /// registry's write lock. A key whose plan or account this instance
        /// does not know is skipped and logged. A plan or account changed is
        /// dated on `store`'s clock (as `Admin` dates its own changes): a
        /// throttle converted lazily is converted as of then. The state
        /// `store` keeps at once (the local copy that decides `Local`
        /// failures) is converted here, as `Admin` converts it for a change
        /// of its own: once, since a change applied already (this
        /// instance's own, or one a full read carries again) is not put
        /// again.
        ///
        /// A reload (`statics`: the static configuration's keys) is the
        /// whole registry as Redis holds it, and replaces what this instance
        /// had from Redis: a key not in the static configuration that the
        /// reload neither holds nor removes is gone from Redis (flushed, or
        /// lost in a failover) and is removed here too, and a static key
        /// the reload does not name is put back as configured (a change of
        /// it made through Redis was lost with the rest). The instance then
        /// holds what a new one with its configuration loads. Plans and
        /// accounts are never removed (keys may still name them) and stay
        /// as they are, and so do the keys a reload leaves `kept` (applied
        /// here after it was read).
        fn apply_all(
            &self,
            changes: Vec<Change>,
            statics: Option<&[(Digest, KeyEntry)]>,
            kept: &[&str],
            store: &crate::RedisStore,
            resolver: Option<&Resolving>,
        ) {
            let clock = store.clock();
            let mut keys = Vec::new();
            for change in changes {
                match change {
                    Change::PutPlan { name, encoded } => match wire::decode_plan(&encoded) {
                        // A reload carries every plan: one unchanged here is
                        // not put again (putting re-points all of its keys).
                        Ok((plan, _))
                            if self
                                .load()
                                .plan_named(&name)
                                .is_some_and(|p| p.source == plan) => {}
                        Ok((plan, created)) => {
                            let now = clock.wall_nanos();
                            match self.put_plan(&plan, created, now) {
                                Ok(put) => rescale_plan(self, store, resolver, &put),
                                Err(e) => {
                                    tracing::warn!(plan = %name, error = %e, "a shared plan was not applied")
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(plan = %name, error = %e, "a shared plan could not be read")
                        }
                    },
                    Change::PutAccount { name, encoded } => match wire::decode_account(&encoded) {
                        Ok((account, _))
                            if self
                                .load()
                                .account_named(&name)
                                .is_some_and(|a| a.source == account) => {}
                        Ok((account, created)) => {
                            let now = clock.wall_nanos();
                            match self.put_account(&account, created, now) {
                                Ok(put) => rescale_account(store, &put),
                                Err(e) => {
                                    tracing::warn!(account = %name, error = %e, "a shared account was not applied")
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(account = %name, error = %e, "a shared account could not be read")
                        }
                    },
                    other => keys.push(other),
                }
            }
            if keys.is_empty() && statics.is_none() {
                return;
            }
            self.keys().change(|w| {
                // Under the lock plan and account changes hold too.
                let snap = self.load();
                if let Some(statics) = statics {
                    restart(w, &snap, statics, &keys, kept);
                }
                for change in keys {
                    match change {
                        Change::AddKey(r) | Change::UpdateKey(r) => put(w, &snap, r),
                        Change::Import(rs) => rs.into_iter().for_each(|r| put(w, &snap, r)),
                        Change::RemoveKey { id } => {
                            w.remove(&id);
                        }
                        Change::PutPlan { .. } | Change::PutAccount { .. } => {}
                    }
                }
            });
        }
    }

    /// Brings the registry back to its static configuration before a
    /// reload's `keys` are applied: removes every key neither static nor
    /// named by the reload nor `kept`, and puts back every static key it
    /// does not name and that is not `kept`.
    fn restart(
        w: &mut Writer<'_>,
        snap: &Snapshot,
        statics: &[(Digest, KeyEntry)],
        keys: &[Change],
        kept: &[&str],
    ) {
        let mut named: HashSet<&str> = kept.iter().copied().collect();
        for change in keys {
            match change {
                Change::AddKey(r) | Change::UpdateKey(r) => {
                    named.insert(&*r.id);
                }
                Change::Import(rs) => named.extend(rs.iter().map(|r| &*r.id)),
                Change::RemoveKey { id } => {
                    named.insert(&**id);
                }
                Change::PutPlan { .. } | Change::PutAccount { .. } => {}
            }
        }
        let is_static: HashSet<&str> = statics.iter().map(|(_, e)| &*e.id).collect();
        let mut dropped = 0usize;
        for (_, e) in w.entries() {
            if !named.contains(&*e.id) && !is_static.contains(&*e.id) {
                w.remove(&e.id);
                dropped += 1;
            }
        }
        if dropped > 0 {
            // Never silent: Redis lost keys (a restart without persistence
            // or a flush, written to before any instance could write its
            // registry back; a failover that lost changes).
            tracing::warn!(
                keys = dropped,
                "the key registry in Redis no longer holds keys this instance served: \
                 they are no longer served"
            );
        }
        for (digest, entry) in statics {
            if !named.contains(&*entry.id) && w.put(*digest, snap.fresh(entry.clone())).is_err() {
                tracing::warn!(key = %entry.id, "a static key's value is another key's here: not put back");
            }
        }
    }

    impl Applied {
        /// What of `change` (of `version`) the watcher applies: `None` when
        /// it sets only items applied ahead from a later write (an import,
        /// without its keys so applied).
        fn behind(&self, change: Change, version: u64) -> Option<Change> {
            let later = |ahead: &HashMap<String, u64>, name: &str| {
                ahead.get(name).is_some_and(|v| *v > version)
            };
            match change {
                Change::AddKey(ref r) | Change::UpdateKey(ref r) if later(&self.keys, &r.id) => {
                    None
                }
                Change::RemoveKey { ref id } if later(&self.keys, id) => None,
                Change::PutPlan { ref name, .. } if later(&self.plans, name) => None,
                Change::PutAccount { ref name, .. } if later(&self.accounts, name) => None,
                Change::Import(rs) => {
                    let rs: Vec<KeyRecord> = rs
                        .into_iter()
                        .filter(|r| !later(&self.keys, &r.id))
                        .collect();
                    (!rs.is_empty()).then_some(Change::Import(rs))
                }
                other => Some(other),
            }
        }

        /// The watcher has applied every change up to `version`: the items
        /// applied ahead up to it are its own again.
        fn passed(&mut self, version: u64) {
            self.version = version;
            for ahead in [&mut self.keys, &mut self.plans, &mut self.accounts] {
                ahead.retain(|_, v| *v > version);
            }
        }
    }

    /// Registers a key another instance added or changed, by its value hash.
    fn put(w: &mut Writer<'_>, snap: &Snapshot, r: KeyRecord) {
        let Some(plan) = snap.plan_named(&r.plan) else {
            tracing::warn!(key = %r.id, plan = %r.plan, "a shared key names a plan this instance does not know: skipped");
            return;
        };
        let account = match &r.account {
            None => None,
            Some(name) => match snap.account_named(name) {
                Some(account) => Some(Arc::clone(account)),
                None => {
                    tracing::warn!(key = %r.id, account = %name, "a shared key names an account this instance does not know: skipped");
                    return;
                }
            },
        };
        let entry = KeyEntry::new(&r.id, Arc::clone(plan), account, r.enabled);
        if w.put(Digest(r.value_hash), entry).is_err() {
            tracing::warn!(key = %r.id, "a shared key's value is another key's here: skipped");
        }
    }
}
