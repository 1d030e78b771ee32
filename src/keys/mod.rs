//! The key registry: registered API keys by the keyed hash of their value,
//! read without a lock on every request, changed one key at a time.
//!
//! A key's entry holds all a decision needs (its plan and account, where
//! its state lives), so a registered key is decided from one lookup, with
//! no other shared state read. Changes of one key take the registry's write
//! lock and are O(1): one insertion or removal in a concurrent hash map
//! (`papaya`, whose reads are lock-free and allocation-free) and one in the
//! id index. Replacing a plan or an account re-points the entries on it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::sync::Mutex;
use hashbrown::HashTable;
use siphasher::sip128::SipHasher13;

use crate::hash::{self, BuildDigestHasher, Digest};
use crate::plan::{AccountLimits, Plan};

mod shared;

pub use self::shared::SharedRegistry;
pub(crate) use self::shared::{Applied, Edit, Item, Record, Update};

/// A registered key as the hot path sees it.
#[derive(Debug, Clone)]
pub(crate) struct KeyEntry {
    /// The public id (never the value).
    pub(crate) id: Box<str>,
    /// Where the key's state lives: the digest of its id, so that counters
    /// follow the key, not its secret (two words: see [`Key`]).
    pub(crate) state: Key,
    pub(crate) plan: Arc<Plan>,
    /// The account whose limits all its keys share, if any.
    pub(crate) account: Option<Arc<AccountLimits>>,
    pub(crate) enabled: bool,
}

impl KeyEntry {
    /// Where the key's state lives: the digest of its id.
    #[inline]
    pub(crate) fn state(&self) -> Digest {
        self.state.into()
    }

    pub(crate) fn new(
        id: &str,
        plan: Arc<Plan>,
        account: Option<Arc<AccountLimits>>,
        enabled: bool,
    ) -> Self {
        KeyEntry {
            id: id.into(),
            state: Key::from(hash::id_digest(id.as_bytes())),
            plan,
            account,
            enabled,
        }
    }
}

/// How key values are hashed before they are looked up or kept: SipHash-1-3
/// (128 bits) under a key that is random per process ([`hash::digest`]), or,
/// when the registry is shared between instances, derived from a secret
/// they share. The shared key is set once, before the first request (see
/// [`Registry::rekey`]).
pub(crate) struct ValueHasher {
    shared: OnceLock<SipHasher13>,
}

impl ValueHasher {
    /// The per-process key of [`hash::digest`].
    pub(crate) fn process() -> Self {
        ValueHasher {
            shared: OnceLock::new(),
        }
    }

    #[inline]
    pub(crate) fn digest(&self, value: &[u8]) -> Digest {
        match self.shared.get() {
            None => hash::digest(value),
            Some(h) => {
                let h = h.hash(value);
                Digest(u128::from(h.h1) << 64 | u128::from(h.h2))
            }
        }
    }
}

/// A digest as the registry keeps it: two words, so that neither an entry
/// nor the map's cell of one needs the 16-byte alignment of a `u128` (8
/// bytes saved per key).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Key(u64, u64);

impl From<Digest> for Key {
    #[inline]
    fn from(d: Digest) -> Self {
        Key((d.0 >> 64) as u64, d.0 as u64)
    }
}

impl From<Key> for Digest {
    #[inline]
    fn from(k: Key) -> Self {
        Digest(u128::from(k.0) << 64 | u128::from(k.1))
    }
}

impl std::hash::Hash for Key {
    /// The low word: the digest is already a keyed hash.
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.1);
    }
}

/// Why a change to the registry was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Clash {
    /// Another key has this id.
    Id,
    /// Another key has this value.
    Value,
}

/// The registered keys.
pub(crate) struct Registry {
    /// Entries by the digest of their value.
    keys: papaya::HashMap<Key, KeyEntry, BuildDigestHasher>,
    /// Serialises changes and finds keys by id (only changes and the admin
    /// handle read it).
    index: Mutex<Index>,
    hasher: ValueHasher,
    /// Counts the changes (bumped under the write lock, after each): a
    /// reader that found a key by id under an earlier count looks it up
    /// again (see [`place_of`](Self::place_of)).
    generation: AtomicU64,
}

/// The id index: value digests, placed by the digest of their key's id (the
/// entry's `state`), so that an id is not kept twice.
struct Index {
    by_id: HashTable<Key>,
}

impl Registry {
    pub(crate) fn new(hasher: ValueHasher, capacity: usize) -> Self {
        Registry {
            keys: papaya::HashMap::builder()
                .capacity(capacity)
                .hasher(BuildDigestHasher::default())
                .build(),
            index: Mutex::new(Index {
                by_id: HashTable::with_capacity(capacity),
            }),
            hasher,
            generation: AtomicU64::new(0),
        }
    }

    /// The digest a key value is registered under.
    #[inline]
    pub(crate) fn digest(&self, value: &[u8]) -> Digest {
        self.hasher.digest(value)
    }

    /// Reads the entry of a key value, without a lock.
    #[inline]
    pub(crate) fn with<T>(&self, value: &[u8], f: impl FnOnce(Option<&KeyEntry>) -> T) -> T {
        let digest = self.digest(value);
        let keys = self.keys.pin();
        f(keys.get(&Key::from(digest)))
    }

    /// The number of registered keys.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Runs `f` holding the write lock: every change goes through here.
    pub(crate) fn change<T>(&self, f: impl FnOnce(&mut Writer<'_>) -> T) -> T {
        let mut index = self.index.lock();
        let keys = self.keys.pin();
        let mut w = Writer {
            index: &mut index,
            keys: &keys,
            hasher: &self.hasher,
        };
        let changed = f(&mut w);
        self.generation.fetch_add(1, Ordering::Release);
        changed
    }

    /// How many changes the registry has had: the place of a key found by
    /// id ([`place_of`](Self::place_of)) holds while this stays the same.
    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The place (the digest of its value) of the key with this id, if one
    /// has it, with the [`generation`](Self::generation) that holds for;
    /// `None` when `wait` is false and a change holds the write lock (an
    /// import of many keys may hold it long): the caller goes on with what
    /// it last found, and asks again later.
    pub(crate) fn place_of(&self, id: &str, wait: bool) -> Option<(u64, Option<Key>)> {
        let mut index = match wait {
            true => self.index.lock(),
            false => self.index.try_lock()?,
        };
        let keys = self.keys.pin();
        let w = Writer {
            index: &mut index,
            keys: &keys,
            hasher: &self.hasher,
        };
        let at = w.by_id(id).map(|(digest, _)| Key::from(digest));
        Some((self.generation(), at))
    }

    /// Reads the entry at `place` (from [`place_of`](Self::place_of)),
    /// without a lock.
    #[inline]
    pub(crate) fn at<T>(&self, place: Key, f: impl FnOnce(Option<&KeyEntry>) -> T) -> T {
        let keys = self.keys.pin();
        f(keys.get(&place))
    }

    /// Every entry, in no order (for reports and admin listings).
    pub(crate) fn for_each(&self, mut f: impl FnMut(&KeyEntry)) {
        for (_, e) in self.keys.pin().iter() {
            f(e);
        }
    }

    /// Hashes key values under `(k0, k1)` from now on: the key of a registry
    /// shared between instances, set when the layer is built on a store that
    /// shares it. The keys in `values` (id, value) are placed again under the
    /// new key; a key registered otherwise since the policy was built keeps
    /// its old place, where no request finds it (the layer is built before
    /// the admin handle that could add one exists).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn rekey(&self, k0: u64, k1: u64, values: &[(Box<str>, Box<str>)]) {
        self.change(|w| {
            let mut moved = Vec::with_capacity(values.len());
            for (id, value) in values {
                if let Some(entry) = w.remove(id) {
                    moved.push((value, entry));
                }
            }
            if w.hasher
                .shared
                .set(SipHasher13::new_with_keys(k0, k1))
                .is_err()
            {
                tracing::warn!("the key registry's hash key is set once; kept as it was");
            }
            for (value, entry) in moved {
                // The ids and values were unique before; they still are.
                let _ = w.add(value.as_bytes(), entry);
            }
        })
    }

    /// The entry with this id.
    pub(crate) fn by_id<T>(&self, id: &str, f: impl FnOnce(Option<&KeyEntry>) -> T) -> T {
        self.change(|w| f(w.by_id(id).map(|(_, e)| e)))
    }
}

/// The registry under its write lock.
pub(crate) struct Writer<'r> {
    index: &'r mut Index,
    keys: &'r papaya::HashMapRef<'r, Key, KeyEntry, BuildDigestHasher, papaya::LocalGuard<'r>>,
    hasher: &'r ValueHasher,
}

impl Writer<'_> {
    /// The value digest and entry of the key with this id.
    pub(crate) fn by_id(&self, id: &str) -> Option<(Digest, &KeyEntry)> {
        let state = Key::from(hash::id_digest(id.as_bytes()));
        let keys = self.keys;
        let value = self
            .index
            .by_id
            .find(state.1, |v| {
                keys.get(v)
                    .is_some_and(|e| e.state == state && *e.id == *id)
            })
            .copied()?;
        Some((value.into(), keys.get(&value)?))
    }

    /// Whether a key with this id and value digest could be added.
    pub(crate) fn free(&self, id: &str, digest: Digest) -> Result<(), Clash> {
        if self.by_id(id).is_some() {
            return Err(Clash::Id);
        }
        if self.keys.contains_key(&Key::from(digest)) {
            return Err(Clash::Value);
        }
        Ok(())
    }

    /// Adds a key with this value; refused when its id or value is taken.
    pub(crate) fn add(&mut self, value: &[u8], entry: KeyEntry) -> Result<(), Clash> {
        let digest = self.hasher.digest(value);
        self.add_digest(digest, entry)
    }

    /// Adds a key by the digest of its value (a key another instance added).
    pub(crate) fn add_digest(&mut self, digest: Digest, entry: KeyEntry) -> Result<(), Clash> {
        self.free(&entry.id, digest)?;
        let (state, key) = (entry.state, Key::from(digest));
        self.keys.insert(key, entry);
        let keys = self.keys;
        self.index
            .by_id
            .insert_unique(state.1, key, |v| keys.get(v).map_or(0, |e| e.state.1));
        Ok(())
    }

    /// Adds or replaces the key with `entry`'s id at `digest` (a change
    /// the shared registry accepted, applied here whether or not an earlier
    /// copy of it was). Refused only when another id has this value.
    pub(crate) fn put(&mut self, digest: Digest, entry: KeyEntry) -> Result<(), Clash> {
        if let Some((at, _)) = self.by_id(&entry.id) {
            if at == digest {
                self.keys.insert(Key::from(digest), entry);
                return Ok(());
            }
            let id = entry.id.clone();
            self.remove(&id);
        }
        self.add_digest(digest, entry)
    }

    /// Replaces every entry `f` returns a new version of (a plan or an
    /// account replaced: O(keys), a rare change).
    pub(crate) fn rebind(&mut self, mut f: impl FnMut(&KeyEntry) -> Option<KeyEntry>) {
        let changed: Vec<(Key, KeyEntry)> = self
            .keys
            .iter()
            .filter_map(|(d, e)| f(e).map(|n| (*d, n)))
            .collect();
        for (d, e) in changed {
            self.keys.insert(d, e);
        }
    }

    /// Replaces the entry of the key with `entry`'s id; the old entry's
    /// value digest is kept. Returns whether the key existed.
    pub(crate) fn replace(&mut self, entry: KeyEntry) -> bool {
        match self.by_id(&entry.id) {
            Some((digest, _)) => {
                self.keys.insert(Key::from(digest), entry);
                true
            }
            None => false,
        }
    }

    /// The value digest and entry of every key, in no order.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn entries(&self) -> Vec<(Digest, KeyEntry)> {
        (self.keys.iter())
            .map(|(d, e)| (Digest::from(*d), e.clone()))
            .collect()
    }

    /// Removes the key with this id; returns its entry.
    pub(crate) fn remove(&mut self, id: &str) -> Option<KeyEntry> {
        let state = Key::from(hash::id_digest(id.as_bytes()));
        let keys = self.keys;
        let Ok(found) = self.index.by_id.find_entry(state.1, |v| {
            keys.get(v)
                .is_some_and(|e| e.state == state && *e.id == *id)
        }) else {
            return None;
        };
        let (digest, _) = found.remove();
        keys.remove(&digest).cloned()
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("keys", &self.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(n: u32) -> Arc<Plan> {
        let p = crate::UsagePlan::new(format!("p{n}"));
        Arc::new(Plan::compile(&p, 0).unwrap())
    }

    #[test]
    fn add_find_replace_remove() {
        let r = Registry::new(ValueHasher::process(), 0);
        r.change(|w| {
            w.add(b"v1", KeyEntry::new("k1", plan(0), None, true))
                .unwrap();
            w.add(b"v2", KeyEntry::new("k2", plan(1), None, true))
                .unwrap();
            assert_eq!(
                w.add(b"v3", KeyEntry::new("k1", plan(0), None, true)),
                Err(Clash::Id)
            );
            assert_eq!(
                w.add(b"v2", KeyEntry::new("k3", plan(0), None, true)),
                Err(Clash::Value)
            );
        });
        assert_eq!(r.len(), 2);
        assert_eq!(
            r.with(b"v2", |e| e.map(|e| e.plan.name.to_string())),
            Some("p1".into())
        );
        assert!(r.with(b"v3", |e| e.is_none()));
        r.change(|w| assert!(w.replace(KeyEntry::new("k2", plan(5), None, false))));
        assert_eq!(
            r.with(b"v2", |e| e.map(|e| (e.plan.name.to_string(), e.enabled))),
            Some(("p5".into(), false))
        );
        assert_eq!(
            r.by_id("k2", |e| e.map(|e| e.plan.name.to_string())),
            Some("p5".into())
        );
        let removed = r.change(|w| w.remove("k1")).unwrap();
        assert_eq!(&*removed.id, "k1");
        assert!(r.with(b"v1", |e| e.is_none()));
        assert!(r.by_id("k1", |e| e.is_none()));
        // The id and value are free again.
        r.change(|w| {
            w.add(b"v1", KeyEntry::new("k1", plan(0), None, true))
                .unwrap()
        });
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn many_keys_stay_findable_by_id() {
        let r = Registry::new(ValueHasher::process(), 0);
        r.change(|w| {
            for i in 0..5_000 {
                let v = format!("value-{i}");
                w.add(
                    v.as_bytes(),
                    KeyEntry::new(&format!("id-{i}"), plan(0), None, true),
                )
                .unwrap();
            }
        });
        for i in (0..5_000).step_by(7) {
            assert!(r.by_id(&format!("id-{i}"), |e| e.is_some()));
        }
        r.change(|w| {
            for i in (0..5_000).step_by(2) {
                assert!(w.remove(&format!("id-{i}")).is_some());
            }
        });
        assert_eq!(r.len(), 2_500);
        assert!(r.by_id("id-1", |e| e.is_some()));
        assert!(r.by_id("id-2", |e| e.is_none()));
    }

    /// Entries removed from the registry are freed while it lives (once no
    /// thread's guard can still read them): at most the entries of this
    /// thread's unfinished batch of the registry's collector stay.
    #[test]
    fn removed_entries_are_freed_while_the_registry_lives() {
        let r = Registry::new(ValueHasher::process(), 0);
        let p = plan(0);
        r.change(|w| {
            for i in 0..2_000 {
                let v = format!("value-{i}");
                let e = KeyEntry::new(&format!("id-{i}"), Arc::clone(&p), None, true);
                w.add(v.as_bytes(), e).unwrap();
            }
        });
        assert_eq!(Arc::strong_count(&p), 2_001);
        r.change(|w| {
            for i in 0..2_000 {
                assert!(w.remove(&format!("id-{i}")).is_some());
            }
        });
        assert_eq!(r.len(), 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while Arc::strong_count(&p) > 1 + 32 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(Arc::strong_count(&p) <= 1 + 32, "{}", Arc::strong_count(&p));
    }

    #[test]
    fn rekeyed_keys_are_found_under_the_new_key_only() {
        let r = Registry::new(ValueHasher::process(), 0);
        r.change(|w| {
            w.add(b"v1", KeyEntry::new("k1", plan(3), None, true))
                .unwrap()
        });
        let before = r.digest(b"v1");
        r.rekey(
            7,
            11,
            &[("k1".into(), "v1".into()), ("gone".into(), "v9".into())],
        );
        assert_ne!(r.digest(b"v1"), before);
        assert_eq!(
            r.with(b"v1", |e| e.map(|e| e.plan.name.to_string())),
            Some("p3".into())
        );
        assert_eq!(r.len(), 1);
        assert!(r.by_id("k1", |e| e.is_some()));
    }
}
