//! Keys, plans and accounts kept in Redis, so that every instance serves one
//! registry: a change made through one instance reaches the others through
//! a log they read, and an instance started later loads the current state.
//!
//! Redis keys (one hash tag, so one script can write them all, on Redis
//! Cluster too), under `{<prefix>:registry}:`:
//!
//! | key        | type   | holds                                              |
//! |------------|--------|----------------------------------------------------|
//! | `keys`     | hash   | key id → record (value hash, enabled, plan, account) |
//! | `values`   | hash   | value hash (32 hex digits) → key id                |
//! | `plans`    | hash   | plan name → the caller's text                      |
//! | `accounts` | hash   | account name → the caller's text                   |
//! | `removed`  | hash   | key id → the version that removed it (tombstones)  |
//! | `version`  | string | the number of changes made                         |
//! | `log`      | stream | one entry per change: `v` (its version), `c` (the change) |
//!
//! A key's value is never stored, only its keyed hash
//! ([`RedisStore::value_hash`]). Every write is one script call
//! (`script.lua`): it checks the change, writes the records, increments the
//! version and appends the change to the log (trimmed to about
//! [`LOG_LEN`] entries), or writes nothing. How instances follow the log is
//! in `watch.rs`.

mod codec;
mod watch;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::sync::LazyLock;

use redis::{Cmd, ErrorKind, FromRedisValue, ServerErrorKind};

use self::codec::Logged;
use super::builder::NamingKey;
use super::conn::{connection_lost, redis_error};
use super::store::{Inner, RedisStore};
use crate::hash;
use crate::store::StoreError;

/// The registry's script: writes, and the log's head.
const SCRIPT: &str = include_str!("script.lua");
/// Its SHA-1, for `EVALSHA`.
static SHA: LazyLock<String> = LazyLock::new(|| redis::Script::new(SCRIPT).get_hash().to_owned());
/// About how many changes the log keeps (`XADD … MAXLEN ~`). An instance
/// reads it every [`watch::POLL`]; one that falls further behind (or was
/// cut off from Redis) reads the whole registry again instead.
const LOG_LEN: usize = 256;
/// The largest change (in bytes) the log carries; a larger one (a big
/// import) is logged as "read everything again", so the log stays small.
const LARGEST_LOGGED: usize = 256 * 1024;
/// The most keys one script call imports; a larger import is staged in parts
/// of this many (see [`RedisStore::import_staged`]).
const IMPORT_PART: usize = 2_000;
/// How long a staged import waits for its next part or its commit.
const IMPORT_TTL: std::time::Duration = std::time::Duration::from_secs(60);
/// How many entries or fields one read asks for.
const PAGE: usize = 1000;
/// How long a read of the registry is asked again while Redis answers it
/// later than the store's timeout (the timeout itself, when longer). The
/// timeout bounds what a request waits for; nothing waits for these reads
/// but the registry itself, and one of the hundred pages of a large registry
/// that misses it (a machine busy with other work) would otherwise fail the
/// whole read: a new instance would start without the shared keys.
const READ_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// A registered API key as the registry keeps it: never its value, only
/// the value's keyed hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyRecord {
    /// The key's public id.
    pub(crate) id: String,
    /// [`RedisStore::value_hash`] of the key's value.
    pub(crate) value_hash: u128,
    /// The name of its usage plan.
    pub(crate) plan: String,
    /// The account it belongs to, if any.
    pub(crate) account: Option<String>,
    /// Whether requests with it are served.
    pub(crate) enabled: bool,
}

/// One change of the registry, as written and as every instance receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// Registers a key. Refused when its id or its value hash is live in
    /// Redis (a tombstoned id may be added again).
    AddKey(KeyRecord),
    /// Sets the plan, account and enabled flag of a key; its value hash
    /// stays the one stored. In the log, the key's whole record as the
    /// write left it in Redis. Written, it is a [`KeyUpdate`] of every field
    /// (see there), made with [`RedisStore::registry_update`]; an admin
    /// change names only the fields it changes.
    UpdateKey(KeyRecord),
    /// Removes a key, live in Redis or not, and leaves a tombstone, so that
    /// a key of a static configuration stays removed for instances started
    /// later. Frees its value hash.
    RemoveKey {
        /// The key's id.
        id: String,
    },
    /// Registers many keys at once, all or nothing: one entry whose id or
    /// value hash is live in Redis or repeated in the batch refuses the
    /// whole batch, naming that entry.
    Import(Vec<KeyRecord>),
    /// Sets a plan to the caller's text.
    PutPlan {
        /// The plan's name.
        name: String,
        /// The plan, encoded by the caller.
        encoded: String,
    },
    /// Sets an account to the caller's text.
    PutAccount {
        /// The account's name.
        name: String,
        /// The account, encoded by the caller.
        encoded: String,
    },
}

/// A change of some fields of one key, as an admin handle writes it: the
/// fields named are set on the record Redis holds, in the script (one
/// atomic step), and the others stay as Redis holds them. Not the writer's
/// whole record: its copy may be older than Redis's (a change made through
/// another instance within the last poll has not reached it yet), and
/// writing it whole would silently undo that change (a disabled key moved
/// to another plan through a stale instance was enabled again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyUpdate {
    /// The key's id.
    pub(crate) id: String,
    /// The key as the writing instance holds it, if it does: the record
    /// written (with the fields below set) when Redis holds none, as for a
    /// key of a static configuration changed for the first time, unless its
    /// value hash is another key's. Otherwise unused: Redis's record is the
    /// base. With neither, or when the key was removed, the update is
    /// refused ([`RegistryError::UnknownKey`]).
    pub(crate) held: Option<KeyRecord>,
    /// The new enabled flag, if it changes.
    pub(crate) enabled: Option<bool>,
    /// The new plan's name, if it changes.
    pub(crate) plan: Option<String>,
    /// The new account (`Some(None)`: none), if it changes.
    pub(crate) account: Option<Option<String>>,
}

impl KeyUpdate {
    /// Every field of `key` (its value hash stays Redis's).
    fn whole(key: &KeyRecord) -> Self {
        KeyUpdate {
            id: key.id.clone(),
            held: Some(key.clone()),
            enabled: Some(key.enabled),
            plan: Some(key.plan.clone()),
            account: Some(key.account.clone()),
        }
    }
}

/// What a watcher delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RegistryUpdate {
    /// One change, the next after the last delivered.
    Change {
        /// The registry's version after it.
        version: u64,
        /// The change.
        change: Change,
    },
    /// The whole registry, as [`RedisStore::registry_load`] returns it:
    /// replaces what the instance had from Redis (its static configuration
    /// stays beneath).
    Reload {
        /// The registry's version.
        version: u64,
        /// Plans and accounts, then live keys, then tombstones.
        all: Vec<Change>,
    },
}

/// Why a registry write was refused or failed.
#[derive(Debug)]
#[non_exhaustive]
pub(crate) enum RegistryError {
    /// A key with this id is live.
    Duplicate {
        /// The id of the entry refused.
        id: String,
    },
    /// Another key (or an earlier entry of the batch) has this entry's value.
    DuplicateValue {
        /// The id of the entry refused.
        id: String,
    },
    /// The key was removed.
    UnknownKey {
        /// The id of the entry refused.
        id: String,
    },
    /// Redis did not answer, or not in time. Nothing was written, unless the
    /// store timed out waiting for an answer: then the change may have been
    /// made, and every instance receives it if it was.
    Store(StoreError),
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryError::Duplicate { id } => write!(f, "a key with id {id:?} exists"),
            RegistryError::DuplicateValue { id } => {
                write!(f, "the value of key {id:?} is another key's")
            }
            RegistryError::UnknownKey { id } => write!(f, "no key with id {id:?}"),
            RegistryError::Store(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for RegistryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RegistryError::Store(e) => Some(e),
            _ => None,
        }
    }
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        RegistryError::Store(e)
    }
}

impl RedisStore {
    /// The keyed 128-bit hash of an API key's value, under the store's
    /// [`key_secret`](crate::RedisStoreBuilder::key_secret): the same on
    /// every instance given the same secret. The registry in Redis keeps
    /// this hash, never the value.
    ///
    /// Without a secret the hash's key is in tollgate's source, and anyone
    /// who can read Redis could test guesses of a key value against it:
    /// harmless for random keys of 128 bits, not for short ones. Set a
    /// secret.
    pub fn value_hash(&self, value: &[u8]) -> u128 {
        let (k0, k1) = self.value_keys();
        hash::keyed(k0, k1, value)
    }

    /// The SipHash key of [`value_hash`](Self::value_hash): derived from the
    /// secret (or the fixed key without one) under a label of its own, so
    /// that it is no other hash's key.
    pub(crate) fn value_keys(&self) -> (u64, u64) {
        const LABEL: &[u8] = b"tollgate key value";
        let h = match self.inner.naming {
            Some(NamingKey(k0, k1)) => hash::keyed(k0, k1, LABEL),
            None => hash::stable(LABEL),
        };
        (h as u64, (h >> 64) as u64)
    }

    /// The registry as loaded when the store was built (once; later layers
    /// follow the log).
    pub(crate) fn take_preloaded(&self) -> Option<(u64, Vec<Change>)> {
        self.inner.preloaded.lock().take()
    }

    /// Makes `change` in Redis in one script call: checks it, writes the
    /// records, increments the version and logs the change, or writes
    /// nothing. Returns the new version. Bounded by the store's timeout.
    pub(crate) async fn registry_write(&self, change: &Change) -> Result<u64, RegistryError> {
        let inner = &self.inner;
        let mut args = vec![
            "w".to_owned(),
            LOG_LEN.to_string(),
            LARGEST_LOGGED.to_string(),
        ];
        let key = |args: &mut Vec<String>, k: &KeyRecord| {
            args.push(k.id.clone());
            args.push(codec::record(k));
        };
        match change {
            Change::AddKey(k) => {
                args.push("A".to_owned());
                key(&mut args, k);
            }
            Change::UpdateKey(k) => {
                let (version, _) = self.registry_update(&KeyUpdate::whole(k)).await?;
                return Ok(version);
            }
            Change::Import(keys) if keys.len() > IMPORT_PART => {
                return self.import_staged(keys).await;
            }
            Change::Import(keys) => {
                args.push("I".to_owned());
                for k in keys {
                    key(&mut args, k);
                }
            }
            Change::RemoveKey { id } => args.extend(["D".to_owned(), id.clone()]),
            Change::PutPlan { name, encoded } => {
                args.extend(["P".to_owned(), name.clone(), encoded.clone()]);
            }
            Change::PutAccount { name, encoded } => {
                args.extend(["C".to_owned(), name.clone(), encoded.clone()]);
            }
        }
        // Sent again when the connection was lost before the reply (Redis
        // dropped it, or restarted: redis-rs has begun a new one), as the
        // decisions are, rather than failing a change Redis is up to make.
        // A removal, a plan or an account run twice sets the same again. An
        // add or an import is sent again as such ('W'): keys Redis holds
        // exactly as sent are its first run's, not a clash.
        let mut again = args.clone();
        if matches!(change, Change::AddKey(_) | Change::Import(_)) {
            again[0] = "W".to_owned();
        }
        let reply: Vec<String> = inner
            .within(inner.registry_eval(&args, Some(&again)))
            .await?;
        written(reply)
    }

    /// Sets the fields `update` names on the key's record in Redis, in one
    /// script call that reads the record, sets them, bumps the version and
    /// logs the record as written (so that every instance, the writer too,
    /// ends with it), or writes nothing. Returns the new version and the
    /// record. Bounded by the store's timeout.
    pub(crate) async fn registry_update(
        &self,
        update: &KeyUpdate,
    ) -> Result<(u64, KeyRecord), RegistryError> {
        let inner = &self.inner;
        let mut args = vec![
            "w".to_owned(),
            LOG_LEN.to_string(),
            LARGEST_LOGGED.to_string(),
            "U".to_owned(),
            update.id.clone(),
            update.held.as_ref().map(codec::record).unwrap_or_default(),
        ];
        if let Some(enabled) = update.enabled {
            args.extend(["enabled".to_owned(), u8::from(enabled).to_string()]);
        }
        if let Some(plan) = &update.plan {
            args.extend(["plan".to_owned(), plan.clone()]);
        }
        if let Some(account) = &update.account {
            args.extend(["account".to_owned(), codec::account(account.as_deref())]);
        }
        // Sent again when the connection was lost before the reply, as
        // other writes: run twice, it sets the same fields again.
        let reply: Vec<String> = inner
            .within(inner.registry_eval(&args, Some(&args)))
            .await?;
        match <[String; 3]>::try_from(reply) {
            Ok([status, version, record]) if status == "ok" => {
                let version = version.parse().map_err(|_| bad_reply())?;
                let record = codec::parse_record(&update.id, &record).ok_or_else(bad_reply)?;
                Ok((version, record))
            }
            Ok(_) => Err(bad_reply().into()),
            // Refused: `{reason, id}`.
            Err(reply) => Err(written(reply).err().unwrap_or_else(|| bad_reply().into())),
        }
    }

    /// The record of the key with id `id` as Redis holds it now, `None`
    /// when Redis holds no live key of that id (never added, or removed: a
    /// tombstone is no record). One `HGET` of the keys hash, bounded by the
    /// store's timeout; read, not written, so it may be sent again when its
    /// connection drops.
    ///
    /// For an admin handle asked about a key its instance has not received
    /// yet (added through another instance within the last poll of the
    /// log): what Redis holds says whether the key exists, and on which
    /// plan.
    pub(crate) async fn registry_key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let [keys, ..] = self.inner.registry_keys();
        let cmd = redis::cmd("HGET").arg(keys).arg(id).clone();
        let stored: Option<Vec<u8>> = self.inner.command(cmd).await?;
        let Some(stored) = stored else {
            return Ok(None);
        };
        // A record edited by hand into something unreadable is an error,
        // as the write script answers it, not a key that does not exist.
        let record = String::from_utf8(stored)
            .ok()
            .and_then(|text| codec::parse_record(id, &text));
        match record {
            Some(record) => Ok(Some(record)),
            None => Err(StoreError::new(format!(
                "redis: the record of key {id:?} in the key registry cannot be read"
            ))),
        }
    }

    /// An import too large for one script call (which would hold Redis,
    /// and every decision waiting on it, for about 9 µs per key): staged in
    /// parts of [`IMPORT_PART`] keys, each checked against the live keys and
    /// the parts before it, then moved live part by part, and made visible
    /// to the instances by one version bump at the end (their watchers read
    /// the registry again). No other write is made meanwhile (they are
    /// refused as busy), so nothing clashes between the checks and the
    /// commit. A refused part, a failure while staging, or a writer that
    /// goes away while staging leaves nothing live (a staged import is
    /// forgotten after [`IMPORT_TTL`] without news). A writer that dies
    /// between the first and the last move (some 5 ms of Redis time per
    /// part) leaves the moved parts in Redis, unannounced: instances that
    /// read the whole registry later see them.
    async fn import_staged(&self, keys: &[KeyRecord]) -> Result<u64, RegistryError> {
        let inner = &self.inner;
        let staged = inner.staged();
        let call = |op: &str, more: &[String]| staged.args(op, more);
        let ttl = IMPORT_TTL.as_millis().to_string();
        let result = async {
            for part in keys.chunks(IMPORT_PART) {
                let mut args = call("S", std::slice::from_ref(&ttl));
                for k in part {
                    args.push(k.id.clone());
                    args.push(codec::record(k));
                }
                let reply: Vec<String> = inner.within(inner.registry_eval(&args, None)).await?;
                written(reply)?;
            }
            let mut cursor = "0".to_owned();
            loop {
                let args = call("K", &[cursor, IMPORT_PART.to_string(), ttl.clone()]);
                let reply: Vec<String> = inner.within(inner.registry_eval(&args, None)).await?;
                match <[String; 2]>::try_from(reply) {
                    Ok([status, next]) if status == "more" => cursor = next,
                    Ok(reply) => return written(reply.into()),
                    Err(_) => return Err(bad_reply().into()),
                }
            }
        }
        .await;
        if result.is_err() {
            // A refused part forgot the import already; after a failure
            // this forgets what was staged (or, Redis unreachable, the
            // import expires).
            let abort = call("X", &[]);
            let _ = inner
                .within(inner.registry_eval::<Vec<String>>(&abort, Some(&abort)))
                .await;
        }
        result
    }

    /// The registry as Redis holds it, and its version: every plan and
    /// account, then every tombstone (as [`Change::RemoveKey`]), then every
    /// live key (as [`Change::AddKey`]; a key in Redis replaces one of the
    /// same id in a static configuration), to apply over a static
    /// configuration in this order: the tombstones first, so that a value
    /// hash a removed static key held is free for the live key that has it.
    ///
    /// Read in pages, each bounded by the store's timeout (and asked again
    /// while Redis answers it late, for up to [`READ_PATIENCE`]), so Redis
    /// is never held up by a large registry; changes made meanwhile are read from the
    /// log and applied, so the result is the registry as of the version
    /// returned.
    pub(crate) async fn registry_load(&self) -> Result<(u64, Vec<Change>), StoreError> {
        let snapshot = self.inner.registry_snapshot().await?;
        Ok((snapshot.cursor.version, snapshot.state.into_changes()))
    }
}

/// The version a write made, or why it was refused.
fn written(reply: Vec<String>) -> Result<u64, RegistryError> {
    match <[String; 2]>::try_from(reply) {
        Ok([status, v]) if status == "ok" => v.parse().map_err(|_| bad_reply().into()),
        Ok([status, id]) => Err(match status.as_str() {
            "duplicate" => RegistryError::Duplicate { id },
            "duplicate value" => RegistryError::DuplicateValue { id },
            "unknown" => RegistryError::UnknownKey { id },
            "unreadable" => StoreError::new(format!(
                "redis: the record of key {id:?} in the key registry cannot be read"
            ))
            .into(),
            "busy" => StoreError::new(
                "redis: a batch import is in progress on the key registry; retry when it ends",
            )
            .into(),
            "expired" => {
                StoreError::new("redis: the batch import took too long and was forgotten").into()
            }
            _ => bad_reply().into(),
        }),
        Err(_) => Err(bad_reply().into()),
    }
}

fn bad_reply() -> StoreError {
    StoreError::new("redis: unexpected registry reply")
}

/// A hash's fields and their values, as Redis holds them.
type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// A hash field and its value as text; when either is not UTF-8, the
/// field's name (lossily decoded) to name in a warning.
fn text((name, value): (Vec<u8>, Vec<u8>)) -> Result<(String, String), String> {
    match (String::from_utf8(name), String::from_utf8(value)) {
        (Ok(name), Ok(value)) => Ok((name, value)),
        (Ok(name), Err(_)) => Err(name),
        (Err(e), _) => Err(String::from_utf8_lossy(e.as_bytes()).into_owned()),
    }
}

/// A place in the log: the version applied, and the last entry read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    version: u64,
    /// The id and version of the last log entry read (it may be a duplicate
    /// skipped, older than `version`); `None` before the first.
    last: Option<(String, u64)>,
}

/// The whole registry as of `cursor`.
#[derive(Debug)]
struct Snapshot {
    cursor: Cursor,
    state: State,
}

/// What [`Inner::registry_restore`] did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Restore {
    /// Wrote the registry back; the version Redis holds now.
    Written(u64),
    /// Redis holds a registry (maybe one written back by another instance).
    Present,
    /// Another instance is writing the registry back (or importing).
    Busy,
}

/// The log's head: the version, and the last entry.
#[derive(Debug)]
struct Head {
    version: u64,
    last: Option<(String, u64)>,
}

impl Head {
    /// The place just after every change, when the last entry is the
    /// version's (it is unless the log was deleted).
    fn cursor(self) -> Cursor {
        let last = self.last.filter(|(_, v)| *v == self.version);
        Cursor {
            version: self.version,
            last,
        }
    }
}

/// One log entry.
#[derive(Debug)]
struct Entry {
    id: String,
    version: u64,
    logged: Logged,
}

/// The registry being read, or as an instance last read it: a map per kind.
#[derive(Debug, Default, Clone)]
pub(super) struct State {
    plans: BTreeMap<String, String>,
    accounts: BTreeMap<String, String>,
    keys: BTreeMap<String, KeyRecord>,
    removed: BTreeSet<String>,
}

impl State {
    /// Applies a change as the script did: each one sets the records it
    /// names, so one already seen by the scan may be applied again.
    pub(super) fn apply(&mut self, change: Change) {
        match change {
            Change::AddKey(k) | Change::UpdateKey(k) => self.put(k),
            Change::Import(keys) => keys.into_iter().for_each(|k| self.put(k)),
            Change::RemoveKey { id } => {
                self.keys.remove(&id);
                self.removed.insert(id);
            }
            Change::PutPlan { name, encoded } => {
                self.plans.insert(name, encoded);
            }
            Change::PutAccount { name, encoded } => {
                self.accounts.insert(name, encoded);
            }
        }
    }

    fn put(&mut self, k: KeyRecord) {
        self.removed.remove(&k.id);
        self.keys.insert(k.id.clone(), k);
    }

    fn is_empty(&self) -> bool {
        self.plans.is_empty()
            && self.accounts.is_empty()
            && self.keys.is_empty()
            && self.removed.is_empty()
    }

    fn into_changes(self) -> Vec<Change> {
        let plans =
            (self.plans.into_iter()).map(|(name, encoded)| Change::PutPlan { name, encoded });
        let accounts =
            (self.accounts.into_iter()).map(|(name, encoded)| Change::PutAccount { name, encoded });
        let removed = (self.removed.into_iter()).map(|id| Change::RemoveKey { id });
        let keys = self.keys.into_values().map(Change::AddKey);
        // Tombstones before live keys: a static key removed through another
        // instance frees its value hash before a live key that has that
        // value now is put (put first, it would clash with the static key
        // still there, be skipped, and the value would be nobody's).
        plans.chain(accounts).chain(removed).chain(keys).collect()
    }
}

/// A staged write of the registry (a large import, or the write-back of a
/// registry Redis lost): its steps' script arguments carry one token.
struct Staged {
    token: String,
}

impl Staged {
    /// The arguments of step `op`, then `more`.
    fn args(&self, op: &str, more: &[String]) -> Vec<String> {
        let mut args = vec![
            "w".to_owned(),
            LOG_LEN.to_string(),
            LARGEST_LOGGED.to_string(),
            op.to_owned(),
            self.token.clone(),
        ];
        args.extend_from_slice(more);
        args
    }
}

impl Inner {
    /// A new staged write, its token unique to this instance and moment.
    fn staged(&self) -> Staged {
        Staged {
            token: format!(
                "{:016x}{:016x}",
                self.members
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                self.clock.wall_nanos()
            ),
        }
    }

    /// The registry's Redis keys, in the script's order.
    fn registry_keys(&self) -> [String; 10] {
        let tag = format!("{{{}:registry}}", self.prefix);
        [
            "keys",
            "values",
            "plans",
            "accounts",
            "removed",
            "version",
            "log",
            "staged",
            "staged-values",
            "importing",
        ]
        .map(|name| format!("{tag}:{name}"))
    }

    /// Runs the registry script (loading it when Redis lost it). When the
    /// connection was lost before the reply, `again` (the call as it may
    /// run a second time, `None` for one that may not) is sent once more,
    /// on the connection redis-rs has begun in its place.
    async fn registry_eval<T: FromRedisValue>(
        &self,
        args: &[String],
        again: Option<&[String]>,
    ) -> Result<T, StoreError> {
        let keys = self.registry_keys();
        let cmd = |sha: bool, args: &[String]| -> Cmd {
            let mut cmd = if sha {
                redis::cmd("EVALSHA").arg(SHA.as_str()).clone()
            } else {
                redis::cmd("EVAL").arg(SCRIPT).clone()
            };
            cmd.arg(keys.len()).arg(&keys).arg(args);
            cmd
        };
        let mut sent = args;
        let mut retried = false;
        loop {
            let mut conn = self.conn.clone();
            let reply = match cmd(true, sent).query_async(&mut conn).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    cmd(false, sent).query_async(&mut conn).await
                }
                r => r,
            };
            match (reply, again) {
                (Err(e), Some(again)) if !retried && connection_lost(&e) => {
                    tracing::debug!(error = %redis_error(&e), "connection lost; the registry call is sent again");
                    sent = again;
                    retried = true;
                }
                (r, _) => return r.map_err(|e| redis_error(&e)),
            }
        }
    }

    /// `read` (a read of the registry, the same when sent twice), asked
    /// again when Redis does not answer it within the store's timeout,
    /// until [`READ_PATIENCE`] has passed since it was first asked.
    async fn registry_reading<T, F>(&self, read: impl Fn() -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>>,
    {
        let started = tokio::time::Instant::now();
        let patience = self.timeout.max(READ_PATIENCE);
        loop {
            match read().await {
                Err(e) if e.is_timeout() && started.elapsed() < patience => {
                    tracing::debug!(error = %e, "a read of the key registry is asked again");
                }
                reply => return reply,
            }
        }
    }

    /// Runs a plain command that reads the registry (see
    /// [`registry_reading`](Self::registry_reading)).
    async fn registry_command<T: FromRedisValue>(&self, cmd: Cmd) -> Result<T, StoreError> {
        self.registry_reading(|| self.command(cmd.clone())).await
    }

    async fn registry_head(&self) -> Result<Head, StoreError> {
        let head = ["h".to_owned()];
        let (version, id, last): (u64, String, u64) = self
            .registry_reading(|| self.within(self.registry_eval(&head, Some(&head))))
            .await?;
        Ok(Head {
            version,
            last: (!id.is_empty()).then_some((id, last)),
        })
    }

    /// Every field of the registry hash `key`, in pages, as Redis holds
    /// it: bytes, so that one field edited by hand into something that is
    /// not UTF-8 is skipped by the reader instead of failing the whole read
    /// (and with it every full read of the registry, for good).
    async fn registry_scan(&self, key: &str) -> Result<Fields, StoreError> {
        let mut all = Vec::new();
        let mut cursor = "0".to_owned();
        loop {
            let cmd = redis::cmd("HSCAN")
                .arg(key)
                .arg(&cursor)
                .arg("COUNT")
                .arg(PAGE)
                .clone();
            let (next, fields): (String, Fields) = self.registry_command(cmd).await?;
            all.extend(fields);
            if next == "0" {
                return Ok(all);
            }
            cursor = next;
        }
    }

    /// Up to `count` log entries from `start` (an entry id, inclusive, or `-`).
    async fn registry_range(&self, start: &str, count: usize) -> Result<Vec<Entry>, StoreError> {
        let [.., log, _, _, _] = self.registry_keys();
        let cmd = redis::cmd("XRANGE")
            .arg(log)
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .clone();
        let entries: Vec<(String, Vec<(String, String)>)> = self.registry_command(cmd).await?;
        Ok(entries
            .into_iter()
            .map(|(id, fields)| {
                let field = |name: &str| fields.iter().find(|(n, _)| n == name).map(|(_, v)| v);
                let version = field("v").and_then(|v| v.parse().ok()).unwrap_or(0);
                let logged = field("c").and_then(|c| codec::parse_change(c));
                Entry {
                    id,
                    version,
                    // An entry this version cannot read: read everything.
                    logged: logged.unwrap_or(Logged::Reload),
                }
            })
            .collect())
    }

    /// The changes logged after `cursor`, in version order, each once;
    /// advances `cursor` past them. `None` when the log cannot continue
    /// from `cursor`: the entry last read is gone (the log was trimmed past
    /// it, or Redis lost it: restarted empty, or failed over to a replica
    /// that had not received it), a version is missing, or the version went
    /// back. Entries of a version already applied (delivered twice) are
    /// skipped.
    async fn registry_read(&self, cursor: &mut Cursor) -> Result<Option<Vec<Entry>>, StoreError> {
        if cursor.last.is_none() {
            // No entry read yet (an empty registry): the version alone says
            // whether Redis went back. A plain `GET`, not the script, so
            // that an idle watcher adds no script call to Redis's counts.
            let [.., version, _, _, _, _] = self.registry_keys();
            let now: Option<u64> = self
                .registry_command(redis::cmd("GET").arg(version).clone())
                .await?;
            if now.unwrap_or(0) < cursor.version {
                return Ok(None);
            }
        }
        let mut out = Vec::new();
        loop {
            let (start, count) = match &cursor.last {
                Some((id, _)) => (id.clone(), PAGE + 1),
                None => ("-".to_owned(), PAGE),
            };
            let entries = self.registry_range(&start, count).await?;
            let read = entries.len();
            let mut entries = entries.into_iter();
            if let Some((id, v)) = &cursor.last {
                // The entry last read must still be there: proof that the
                // log goes on from it.
                match entries.next() {
                    Some(e) if e.id == *id && e.version == *v => {}
                    _ => return Ok(None),
                }
            }
            for e in entries {
                let at = Some((e.id.clone(), e.version));
                if e.version <= cursor.version {
                    cursor.last = at;
                    continue;
                }
                if e.version != cursor.version + 1 {
                    return Ok(None);
                }
                cursor.version = e.version;
                cursor.last = at;
                out.push(e);
            }
            if read < count {
                return Ok(Some(out));
            }
        }
    }

    /// Writes `held` (the registry as this instance last read it, as of
    /// `version`) back to Redis when Redis holds no registry: it restarted
    /// empty (without persistence) or was flushed. Claims the write first,
    /// so that one instance writes back and the others wait for it (their
    /// claims answer busy); the keys are staged and committed as a large
    /// import is, in parts, and the commit announces the registry to every
    /// instance ("read everything again") at a version past `version`.
    pub(super) async fn registry_restore(
        &self,
        held: &State,
        version: u64,
    ) -> Result<Restore, RegistryError> {
        let staged = self.staged();
        let call = |op: &str, more: &[String]| staged.args(op, more);
        let ttl = IMPORT_TTL.as_millis().to_string();
        let claim = call("E", std::slice::from_ref(&ttl));
        let reply: Vec<String> = self.within(self.registry_eval(&claim, None)).await?;
        match reply.first().map(String::as_str) {
            Some("claimed") => {}
            Some("present") => return Ok(Restore::Present),
            Some("busy") => return Ok(Restore::Busy),
            _ => return Err(bad_reply().into()),
        }
        let result = async {
            let tombstones = held
                .removed
                .iter()
                .map(|id| (id.clone(), version.to_string()));
            let parts: [(&str, Vec<(String, String)>); 3] = [
                ("P", held.plans.clone().into_iter().collect()),
                ("C", held.accounts.clone().into_iter().collect()),
                ("D", tombstones.collect()),
            ];
            for (kind, all) in parts {
                for part in all.chunks(IMPORT_PART) {
                    let mut args = call("T", &[kind.to_owned(), ttl.clone()]);
                    for (name, text) in part {
                        args.push(name.clone());
                        args.push(text.clone());
                    }
                    let reply: Vec<String> = self.within(self.registry_eval(&args, None)).await?;
                    written(reply)?;
                }
            }
            let keys: Vec<&KeyRecord> = held.keys.values().collect();
            for part in keys.chunks(IMPORT_PART) {
                let mut args = call("S", std::slice::from_ref(&ttl));
                for k in part {
                    args.push(k.id.clone());
                    args.push(codec::record(k));
                }
                let reply: Vec<String> = self.within(self.registry_eval(&args, None)).await?;
                written(reply)?;
            }
            let mut cursor = "0".to_owned();
            loop {
                let args = call(
                    "K",
                    &[
                        cursor,
                        IMPORT_PART.to_string(),
                        ttl.clone(),
                        version.to_string(),
                    ],
                );
                let reply: Vec<String> = self.within(self.registry_eval(&args, None)).await?;
                match <[String; 2]>::try_from(reply) {
                    Ok([status, next]) if status == "more" => cursor = next,
                    Ok(reply) => return written(reply.into()).map(Restore::Written),
                    Err(_) => return Err(bad_reply().into()),
                }
            }
        }
        .await;
        if result.is_err() {
            let abort = call("X", &[]);
            let _ = self
                .within(self.registry_eval::<Vec<String>>(&abort, Some(&abort)))
                .await;
        }
        result
    }

    /// The whole registry, consistent as of the cursor returned.
    async fn registry_snapshot(&self) -> Result<Snapshot, StoreError> {
        let [keys, _, plans, accounts, removed, ..] = self.registry_keys();
        // Changes made while the hashes are read are applied from the log;
        // only a log trimmed meanwhile past where the read began (hundreds of
        // changes during one read) makes it start over.
        for _ in 0..3 {
            let mut cursor = self.registry_head().await?.cursor();
            let mut state = State::default();
            for field in self.registry_scan(&plans).await? {
                match text(field) {
                    Ok((name, encoded)) => {
                        state.plans.insert(name, encoded);
                    }
                    Err(name) => tracing::warn!(name, "a plan in Redis cannot be read; skipped"),
                }
            }
            for field in self.registry_scan(&accounts).await? {
                match text(field) {
                    Ok((name, encoded)) => {
                        state.accounts.insert(name, encoded);
                    }
                    Err(name) => {
                        tracing::warn!(name, "an account in Redis cannot be read; skipped")
                    }
                }
            }
            for field in self.registry_scan(&keys).await? {
                match text(field) {
                    Ok((id, record)) => match codec::parse_record(&id, &record) {
                        Some(k) => state.put(k),
                        None => tracing::warn!(id, "a key record in Redis cannot be read; skipped"),
                    },
                    Err(id) => tracing::warn!(id, "a key record in Redis cannot be read; skipped"),
                }
            }
            for field in self.registry_scan(&removed).await? {
                match text(field) {
                    Ok((id, _)) => {
                        state.keys.remove(&id);
                        state.removed.insert(id);
                    }
                    Err(id) => tracing::warn!(id, "a tombstone in Redis cannot be read; skipped"),
                }
            }
            let Some(entries) = self.registry_read(&mut cursor).await? else {
                continue;
            };
            let mut complete = true;
            for e in entries {
                match e.logged {
                    Logged::Change(change) => state.apply(change),
                    // Too large to log: its records were read, unless it was
                    // made after the hashes were.
                    Logged::Reload => complete = false,
                }
            }
            if complete {
                return Ok(Snapshot { cursor, state });
            }
        }
        Err(StoreError::new(
            "redis: the key registry changed too fast to be read",
        ))
    }
}
