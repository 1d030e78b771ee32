//! [`RedisStoreBuilder`]: a store's settings, checking them, and connecting.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;

use super::background::Background;
use super::cache::OverLimitCache;
use super::call::SCRIPT;
use super::conn::{Conn, TRY_AGAIN_PAUSE, redis_error};
use super::denials::RecentDenials;
use super::flights::Flights;
use super::local::Local;
use super::store::{Inner, RedisStore};
use crate::clock::Clock;
use crate::hash;
use crate::store::{Failures, StoreError};

/// The default time a decision may take before the plan's failure mode applies.
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
/// The default key prefix.
const DEFAULT_PREFIX: &str = "tollgate";
/// Entries of the over-limit cache.
const CACHE_ENTRIES: usize = 65_536;
/// How long a place under a concurrency cap lasts if never given back.
const DEFAULT_LEASE: Duration = Duration::from_secs(300);
/// The longest an over-limit cache entry answers for Redis.
const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(1);
/// The default most calls one store has in flight.
const DEFAULT_MAX_IN_FLIGHT: usize = 256;
/// The default longest a borrowed share is decided from.
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(1);
/// The default most units a share lends.
const DEFAULT_MAX_SHARE: u32 = 64;

impl RedisStore {
    /// Configures a store on one Redis server (`redis://host:port/db`,
    /// `rediss://` for TLS with the feature `redis-tls`).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            nodes: vec![url.into()],
            cluster: false,
            prefix: DEFAULT_PREFIX.to_owned(),
            naming: None,
            timeout: DEFAULT_TIMEOUT,
            clock: None,
            cache_ttl: DEFAULT_CACHE_TTL,
            lease: DEFAULT_LEASE,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_age: DEFAULT_MAX_AGE,
            max_share: DEFAULT_MAX_SHARE,
            shared_registry: true,
            given: None,
        }
    }

    /// Configures a store on a Redis Cluster, given one or more of its nodes.
    pub fn cluster_builder<I, U>(nodes: I) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = U>,
        U: Into<String>,
    {
        RedisStoreBuilder {
            nodes: nodes.into_iter().map(Into::into).collect(),
            cluster: true,
            ..RedisStore::builder(String::new())
        }
    }
}

/// The key of the hash that names state, derived from a secret: never shown.
#[derive(Clone, Copy)]
pub(super) struct NamingKey(pub(super) u64, pub(super) u64);

impl fmt::Debug for NamingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NamingKey(..)")
    }
}

/// Configures a [`RedisStore`].
#[derive(Debug)]
#[must_use]
pub struct RedisStoreBuilder {
    nodes: Vec<String>,
    cluster: bool,
    prefix: String,
    naming: Option<NamingKey>,
    timeout: Duration,
    clock: Option<Clock>,
    cache_ttl: Duration,
    lease: Duration,
    max_in_flight: usize,
    max_age: Duration,
    max_share: u32,
    shared_registry: bool,
    /// A client or connection made by the caller, used instead of `nodes`.
    given: Option<Given>,
}

impl RedisStoreBuilder {
    /// The prefix of every key (default `"tollgate"`). Stores with different
    /// prefixes on one Redis count apart.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// A secret that keys the hash naming each subject's state in Redis
    /// (every instance sharing a budget must be given the same one).
    ///
    /// Without it, key names hash (plan, subject) under a key that is in
    /// tollgate's source: a registered key is named by its public id, but a
    /// per-key limit's subject is the client's key or address, and anyone
    /// who can list Redis keys could test guesses of a low-entropy one
    /// (an IPv4 address, a short token) against the names. With a secret
    /// they cannot. Changing it starts every count over, as a new prefix
    /// does.
    ///
    /// ```
    /// # async fn run() -> Result<(), tollgate::store::StoreError> {
    /// let store = tollgate::RedisStore::builder("redis://127.0.0.1:6379/")
    ///     .key_secret(std::env::var("TOLLGATE_KEY_SECRET").unwrap_or_default())
    ///     .build()
    ///     .await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub fn key_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        let secret = secret.as_ref();
        self.naming = (!secret.is_empty()).then(|| {
            let h = hash::stable(&[b"tollgate key secret\0", secret].concat());
            NamingKey(h as u64, (h >> 64) as u64)
        });
        self
    }

    /// How long a decision may take, connecting included (default 100 ms).
    /// Past it the plan's failure mode decides the request, unless a limit
    /// has already denied it: on a Redis Cluster, where a decision is made
    /// in parts (the stage's and the account's limits in their own slots),
    /// a part that denied stands when the look at the later parts runs out
    /// of time, so that denied traffic never reaches a failure mode that
    /// would admit it.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Decides on this clock instead of Redis `TIME` when it is a
    /// [`ManualClock`](crate::ManualClock) (tests about time); any clock also
    /// dates usage reports and ages the over-limit cache. Default: the
    /// system clock, and Redis `TIME` for decisions. On a manual clock only
    /// the clock's moves change what is decided: real time spent between
    /// calls refills nothing, and state Redis would expire (on its own
    /// clock) when it runs out is kept a day at least.
    pub fn clock(mut self, clock: impl Into<Clock>) -> Self {
        self.clock = Some(clock.into());
        self
    }

    /// The longest a denial is answered locally, without asking Redis
    /// (default 1 s; `Duration::ZERO` turns the over-limit cache off). Only
    /// a used-up quota is answered locally (nothing can pass it before its
    /// window ends, so the answer is exactly Redis's), at most this long, so
    /// that a change made through another instance (a raised quota, a reset)
    /// is seen within it. Any other denial is asked of Redis.
    pub fn over_limit_cache(mut self, max: Duration) -> Self {
        self.cache_ttl = max;
        self
    }

    /// How long a request's place under a concurrency cap is held in Redis
    /// when nobody gives it back (default 5 minutes): the instance that took
    /// it crashed. While a response holds its place, the instance renews the
    /// place's lease every third of it (one call per cap with places held,
    /// whatever their number), so a response that lasts longer than the
    /// lease keeps its place until it ends. A shorter lease frees a crashed
    /// instance's places sooner, for more frequent renewals.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// The most calls this store has in flight to Redis at once (default
    /// 256). A request that would send one more sends none, and is never
    /// queued behind calls that may answer after the timeout. Traffic that
    /// the limits deny cannot push Redis into a failure mode that admits
    /// it: such a request is denied when Redis denied a request of the same
    /// key and limits within the last [timeout](Self::timeout), or denies
    /// one in a call that was in flight when it came (it waits for those
    /// calls, never past the timeout, and not once a call has failed), in
    /// a way that denies this one too: the same cost and estimated tokens,
    /// a full concurrency cap, or a throttle, token budget or quota with
    /// less left than this request costs it (so requests whose estimates
    /// differ are denied together). Only otherwise is it decided by its
    /// plan's [`FailureMode`](crate::FailureMode) (by default the local copy
    /// of its limits), at once. Past the bound a request errs toward being
    /// denied: a place freed or a throttle refilled since Redis denied it is
    /// seen by the next request the bound lets through. Requests of one
    /// subject waiting for one call count once.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n;
        self
    }

    /// The longest a borrowed share of a subject's limits is decided from
    /// locally (default 1 s); unused units then go back to Redis. Zero
    /// turns borrowing off for every plan. See
    /// [`UsagePlan::borrow`](crate::UsagePlan::borrow).
    ///
    /// What borrowing costs the others: a share is charged in Redis when it
    /// is lent, so instances together never admit more than the limits,
    /// but units held unused in a share are capacity other instances
    /// cannot use until they go back. One instance holds at most one share
    /// per subject and limits, of at most [`max_share`](Self::max_share)
    /// units, at most a quarter of what still fitted in the tightest of
    /// the request's limits when it was lent (none near a limit), and at
    /// most what the key's requests since its last call would use in half
    /// `max_age` at the same rate (none on a key's first call, little on a
    /// key seldom used), for at most `max_age`. With N instances at most N × `max_share` units of a
    /// subject, and less than what fitted, are idle at once. Limits shared
    /// by every caller (stage limits) are never lent, and neither are
    /// token budgets nor places under concurrency caps, nor anything ahead
    /// of demand to a key of an account (its share would be capacity the
    /// account's other keys could not use).
    ///
    /// A share is decided from until it is used or `max_age` old, whatever
    /// another instance changes meanwhile: after an UpdateUsage or a reset
    /// made through another instance, an instance holding a share of the
    /// key may still admit its unused units for that long (see
    /// [`Admin::set_remaining`](crate::Admin::set_remaining)).
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// The most units one borrowed share lends (default 64; 0 turns
    /// borrowing off). See [`max_age`](Self::max_age).
    pub fn max_share(mut self, units: u32) -> Self {
        self.max_share = units;
        self
    }

    /// Whether API keys, plans and accounts live in Redis too (default
    /// `true`): a change made through the [`Admin`](crate::Admin) handle of
    /// any instance on this Redis (and prefix) is written there first and
    /// reaches every instance within a second, and a store built later
    /// loads the current registry before its first request. Key values are
    /// kept only as keyed hashes ([`RedisStore::value_hash`]: give every
    /// instance the same [`key_secret`](Self::key_secret)). `false` keeps
    /// keys and plans in each process, as the memory store does.
    pub fn shared_registry(mut self, shared: bool) -> Self {
        self.shared_registry = shared;
        self
    }

    /// Builds the store. A single server is connected lazily (the store can
    /// be built while Redis is down, and connects when it is up); a cluster
    /// is asked for its slots now. A connection given to
    /// [`connection_manager_builder`](RedisStore::connection_manager_builder)
    /// or [`cluster_connection_builder`](RedisStore::cluster_connection_builder)
    /// is used as it is.
    ///
    /// Errors on a malformed URL, an empty prefix, a zero timeout, or an
    /// unreachable cluster.
    pub async fn build(mut self) -> Result<RedisStore, StoreError> {
        if self.prefix.is_empty() || self.prefix.contains(['{', '}']) {
            return Err(StoreError::new(
                "the key prefix must be non-empty and hold no braces",
            ));
        }
        if self.timeout.is_zero() {
            return Err(StoreError::new("the timeout must be above zero"));
        }
        let conn = self.connect().await?;
        let sha = redis::Script::new(SCRIPT).get_hash().to_owned();
        let ttl = u64::try_from(self.cache_ttl.as_nanos()).unwrap_or(u64::MAX);
        let store = RedisStore {
            inner: Arc::new(Inner {
                conn,
                cluster: self.cluster,
                sha,
                prefix: self.prefix,
                naming: self.naming,
                timeout: self.timeout,
                clock: self.clock.clone().unwrap_or_default(),
                cache: (ttl > 0).then(|| OverLimitCache::new(CACHE_ENTRIES, ttl)),
                offset_us: AtomicI64::new(0),
                offset_at: AtomicU64::new(0),
                members: AtomicU64::new(std::hash::BuildHasher::hash_one(
                    &std::hash::RandomState::new(),
                    0x006c_6561_7365_u64,
                )),
                lease: self.lease,
                held: Default::default(),
                background: Background::new(tokio::runtime::Handle::try_current().ok()),
                in_flight: AtomicUsize::new(0),
                max_in_flight: self.max_in_flight.max(1),
                denials: RecentDenials::new(
                    u64::try_from(self.timeout.as_nanos()).unwrap_or(u64::MAX),
                ),
                flights: Flights::default(),
                max_age: self.max_age,
                max_share: self.max_share,
                local: Local::new(self.clock.clone().unwrap_or_default()),
                numbers: Default::default(),
                unanswered: crate::sync::Mutex::default(),
                answered: tokio::sync::Notify::new(),
                retries: super::retry::Retries::default(),
                logged: crate::sync::Mutex::default(),
                failures: Failures::default(),
                shared_registry: self.shared_registry,
                registry_failing: AtomicBool::new(false),
                preloaded: crate::sync::Mutex::new(None),
            }),
        };
        if self.shared_registry {
            // The registry as it is now, for the first layer built on the
            // store to serve from its first request. Redis down: the
            // watcher loads it once Redis answers.
            match store.registry_load().await {
                Ok(loaded) => *store.inner.preloaded.lock() = Some(loaded),
                Err(e) => tracing::warn!(
                    error = %e,
                    "the shared key registry could not be loaded; it will be once Redis answers"
                ),
            }
        }
        Ok(store)
    }
}

/// A client or connection the caller made with redis-rs, for a store to
/// decide on instead of connecting from URLs.
enum Given {
    Client(redis::Client),
    Manager(ConnectionManager),
    ClusterClient(ClusterClient),
    Cluster(ClusterConnection),
}

impl fmt::Debug for Given {
    // Only which kind: a client's Debug shows its URL, password included.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Given::Client(_) => "Client(..)",
            Given::Manager(_) => "ConnectionManager(..)",
            Given::ClusterClient(_) => "ClusterClient(..)",
            Given::Cluster(_) => "ClusterConnection(..)",
        })
    }
}

/// Stores on a client or connection made with redis-rs (1.x, the version
/// tollgate depends on): for TLS settings, credentials, RESP3, a sentinel's
/// master or pool sizes configured the way redis-rs offers, or to share one
/// connection with the rest of an application.
impl RedisStore {
    /// Configures a store on one Redis server through a redis-rs
    /// [`Client`](redis::Client): the store makes its own
    /// [`ConnectionManager`] from it, connected lazily, with the store's
    /// [timeout](RedisStoreBuilder::timeout) for connecting and for replies,
    /// as [`builder`](RedisStore::builder) does with a URL.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
    /// let store = tollgate::RedisStore::client_builder(client)
    ///     .prefix("api")
    ///     .build()
    ///     .await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub fn client_builder(client: redis::Client) -> RedisStoreBuilder {
        RedisStore::given(Given::Client(client), false)
    }

    /// Configures a store on an existing redis-rs [`ConnectionManager`]
    /// (one server), used as it is: its own reconnection and timeout
    /// settings apply, and the store's [timeout](RedisStoreBuilder::timeout)
    /// still bounds every decision. Clones of a manager share one
    /// connection, so the store and the rest of the application may use it
    /// together.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
    /// let manager = redis::aio::ConnectionManager::new(client).await?;
    /// let store = tollgate::RedisStore::connection_manager_builder(manager.clone())
    ///     .build()
    ///     .await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub fn connection_manager_builder(manager: ConnectionManager) -> RedisStoreBuilder {
        RedisStore::given(Given::Manager(manager), false)
    }

    /// Configures a store on a Redis Cluster through a redis-rs
    /// [`ClusterClient`]: [`build`](RedisStoreBuilder::build) asks it for a
    /// connection (and the cluster for its slots) within the store's timeout
    /// (at least a second). The client's own timeouts and retries apply to
    /// each command; the store's timeout bounds every decision. Give it
    /// short retry waits, as the store's own client has (1 to 16 ms): with
    /// redis-rs's default (at least 1.28 s), a call Redis answers `TRYAGAIN`
    /// while its slot migrates waits past the store's timeout, and the
    /// plan's failure mode decides it.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::cluster::ClusterClient::builder(["redis://10.0.0.1:7000/"])
    ///     .retries(2)
    ///     .min_retry_wait(1)
    ///     .max_retry_wait(16)
    ///     .retry_wait_formula(1, 2)
    ///     .build()?;
    /// let store = tollgate::RedisStore::cluster_client_builder(client)
    ///     .build()
    ///     .await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub fn cluster_client_builder(client: ClusterClient) -> RedisStoreBuilder {
        RedisStore::given(Given::ClusterClient(client), true)
    }

    /// Configures a store on an existing redis-rs cluster connection
    /// ([`ClusterConnection`]), used as it is. Its clones share the
    /// connections to the nodes.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::cluster::ClusterClient::new(["redis://10.0.0.1:7000/"])?;
    /// let connection = client.get_async_connection().await?;
    /// let store = tollgate::RedisStore::cluster_connection_builder(connection)
    ///     .build()
    ///     .await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub fn cluster_connection_builder(connection: ClusterConnection) -> RedisStoreBuilder {
        RedisStore::given(Given::Cluster(connection), true)
    }

    fn given(given: Given, cluster: bool) -> RedisStoreBuilder {
        RedisStoreBuilder {
            nodes: Vec::new(),
            cluster,
            given: Some(given),
            ..RedisStore::builder(String::new())
        }
    }
}

impl RedisStoreBuilder {
    /// The connection the store decides on: the one given, or one made from
    /// the URLs.
    async fn connect(&mut self) -> Result<Conn, StoreError> {
        match self.given.take() {
            Some(Given::Manager(manager)) => Ok(Conn::Single(manager)),
            Some(Given::Cluster(connection)) => Ok(Conn::Cluster(connection)),
            Some(Given::Client(client)) => self.manager(client),
            Some(Given::ClusterClient(client)) => self.cluster_connection(&client).await,
            None if self.cluster => {
                // redis-rs waits at least 1.28 s before it sends again a
                // call Redis answered `TRYAGAIN` (a slot migrating) or
                // `CLUSTERDOWN`: longer than the store's timeout, so every
                // decision of a migrating slot would go to the failure
                // mode. Short waits let it try again within the timeout.
                let wait = TRY_AGAIN_PAUSE.as_millis() as u64;
                let client = ClusterClientBuilder::new(self.nodes.clone())
                    .connection_timeout(self.timeout)
                    .response_timeout(self.timeout)
                    .min_retry_wait(1)
                    .max_retry_wait(wait)
                    .retry_wait_formula(1, 2)
                    .build()
                    .map_err(|e| redis_error(&e))?;
                self.cluster_connection(&client).await
            }
            None => {
                let [url] = self.nodes.as_slice() else {
                    return Err(StoreError::new("a single-server store takes one URL"));
                };
                let client = redis::Client::open(url.as_str()).map_err(|e| redis_error(&e))?;
                self.manager(client)
            }
        }
    }

    /// A connection manager on `client`, connected lazily, with the store's
    /// timeout for connecting and for replies.
    fn manager(&self, client: redis::Client) -> Result<Conn, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        ConnectionManager::new_lazy_with_config(client, config)
            .map(Conn::Single)
            .map_err(|e| redis_error(&e))
    }

    /// A connection to the cluster of `client`, within the timeout (at least
    /// a second: the slots are asked for too).
    async fn cluster_connection(&self, client: &ClusterClient) -> Result<Conn, StoreError> {
        let connect = client.get_async_connection();
        match tokio::time::timeout(self.timeout.max(Duration::from_secs(1)), connect).await {
            Ok(Ok(c)) => Ok(Conn::Cluster(c)),
            Ok(Err(e)) => Err(redis_error(&e)),
            Err(_) => Err(StoreError::timeout(self.timeout)),
        }
    }
}
