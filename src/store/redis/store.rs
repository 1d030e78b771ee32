//! [`RedisStore`] and the state its clones share.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize};
use std::time::Duration;

use tokio::sync::Notify;

use super::background::Background;
use super::builder::NamingKey;
use super::cache::OverLimitCache;
use super::conn::Conn;
use super::denials::RecentDenials;
use super::flights::Flights;
use super::held::Held;
use super::local::Local;
use crate::clock::Clock;
use crate::store::Failures;

/// A store in Redis or Redis Cluster, shared by every instance that uses it.
///
/// Clones share one connection. A decision takes at most one round trip,
/// and most take none: requests of one key on one instance wait for one
/// call together, and far from its limits a key borrows a share of them
/// to decide from locally (see [`max_age`](crate::RedisStoreBuilder::max_age)
/// for what that costs other instances); a key Redis denied for a used-up
/// quota is answered locally until its window ends. On Redis Cluster a
/// request with stage limits takes two, since the stage's shared buckets
/// live in their own slot (plus a refund in the background when the plan
/// denies). A decision that takes longer than the
/// [timeout](crate::RedisStoreBuilder::timeout) or finds Redis unreachable
/// is decided by the plan's [`FailureMode`](crate::FailureMode): by default
/// with this instance's own copy of the plan's limits. So is one that would
/// be one call more than
/// [`max_in_flight`](crate::RedisStoreBuilder::max_in_flight), unless Redis
/// denied the same request lately or denies it in a call in flight (see
/// there): traffic the limits deny is never admitted past the bound. The connection recovers
/// by itself when Redis comes back. A place under a concurrency cap is
/// removed in the background whenever no response will hold it, and its
/// lease renewed in the background while a response holds it (see
/// [`lease`](crate::RedisStoreBuilder::lease)).
///
/// Limits: a throttle whose bucket spans more than about 104 days
/// (`burst / rate`) cannot be kept exactly in the script's arithmetic, and
/// its decisions fail. Keys and plans are each instance's own (load the same
/// configuration everywhere); their counters are shared. A throttle replaced
/// while serving is converted for each key when the key is next used, as of
/// the time of the change; a key whose state expired in between starts full.
///
/// ```no_run
/// use tollgate::{Policy, RateLimitLayer, RedisStore, Throttle, UsagePlan};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::builder("redis://127.0.0.1:6379/").build().await?;
/// let policy = Policy::per_key(UsagePlan::new("p").throttle(Throttle::new(10.0, 20)?))?;
/// let layer = RateLimitLayer::builder(policy).store(store).build();
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) conn: Conn,
    pub(super) cluster: bool,
    pub(super) sha: String,
    pub(super) prefix: String,
    /// The SipHash key that names subjects' state, when a secret was set.
    pub(super) naming: Option<NamingKey>,
    pub(super) timeout: Duration,
    pub(super) clock: Clock,
    pub(super) cache: Option<OverLimitCache>,
    /// Redis `TIME` minus this machine's wall time, in microseconds, as last
    /// estimated from a reply (see [`Inner::deadline`]).
    pub(super) offset_us: AtomicI64,
    /// When the estimate was made (monotonic nanoseconds; 0 for never).
    pub(super) offset_at: AtomicU64,
    /// The next lease id (a random start, so instances do not collide).
    pub(super) members: AtomicU64,
    pub(super) lease: Duration,
    /// The places this instance's live responses hold, renewed until given back.
    pub(super) held: Held,
    /// Calls sent in the background (settlements, lease releases, stage
    /// refunds) that have not finished, for [`RedisStore::drained`].
    pub(super) background: Background,
    /// Calls in flight, and the most there may be.
    pub(super) in_flight: AtomicUsize,
    pub(super) max_in_flight: usize,
    /// Calls of each request in flight and the denials Redis gave lately:
    /// what a request past `max_in_flight` is answered from.
    pub(super) denials: RecentDenials,
    /// Calls in flight shared by requests, and the shares they brought back.
    pub(super) flights: Flights,
    /// The longest a share is decided from, and the most units it lends.
    pub(super) max_age: Duration,
    pub(super) max_share: u32,
    /// The copy of the limits a `Local` failure is decided by.
    pub(super) local: Local,
    /// The numbers in force of each token bucket changed while serving,
    /// for settlements reserved under older ones.
    pub(super) numbers: super::numbers::Numbers,
    /// Writes this instance sent in the background as a response ended (a
    /// place given back, a settlement) that Redis has not answered yet,
    /// counted by the keys they write, and a wake-up at each answer: a
    /// decision on such a key waits for them (see `Inner::answered`).
    pub(super) unanswered: crate::sync::Mutex<HashMap<String, usize>>,
    pub(super) answered: Notify,
    /// Settlements Redis did not answer, waiting to be sent again.
    pub(super) retries: super::retry::Retries,
    /// The quota numbers this instance logged before a change, by limit
    /// log, day and numbers (see `Inner::requota`): a plan put anew logs
    /// each quota once, not once per key. Cleared when it grows large.
    pub(super) logged: crate::sync::Mutex<std::collections::HashSet<(String, i64, [i64; 4])>>,
    /// Failures decided by the local copy: counted and logged.
    pub(super) failures: Failures,
    /// Whether keys, plans and accounts live in Redis too.
    pub(super) shared_registry: bool,
    /// Whether the registry's last read failed: its watcher logs when
    /// reads start failing and when they succeed again, not every read.
    pub(super) registry_failing: AtomicBool,
    /// The shared registry as loaded when the store was built.
    pub(super) preloaded: crate::sync::Mutex<Option<(u64, Vec<super::registry::Change>)>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.give_back_on_drop();
    }
}

impl RedisStore {
    /// The time a decision may take.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The prefix of every key this store writes.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// Requests this store decided with its local copy of their limits
    /// because Redis could not (plans whose failure mode is
    /// [`Local`](crate::FailureMode::Local)); failures under `Open` and
    /// `Closed` are counted by the layer
    /// ([`RateLimitLayer::store_failures`](crate::RateLimitLayer::store_failures)).
    pub fn local_decisions(&self) -> u64 {
        self.inner.failures.count()
    }

    /// Clears the over-limit cache: a plan or account from the shared
    /// registry was applied here, and a denial cached under its numbers
    /// before may not be what Redis answers now (see `cache`).
    pub(crate) fn forget_denials(&self) {
        self.inner.forget_denials();
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &self.inner.cluster)
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}
