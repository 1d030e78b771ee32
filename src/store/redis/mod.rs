//! The Redis store: one budget shared by every instance, one round trip per
//! decision.
//!
//! Every limit of a request is decided by one Lua script (`script.lua`),
//! called with `EVALSHA` (and `EVAL` once when Redis answers `NOSCRIPT`, after
//! a restart or a `SCRIPT FLUSH`). The script reads Redis `TIME`, so every
//! instance decides on one clock, and charges all limits or none.
//!
//! Keys: `{prefix}:{<tag>}:t:<limit id>` (a throttle's TAT),
//! `{prefix}:{<tag>}:q` (a quota window's count) and `{prefix}:{<tag>}:h`
//! (daily usage history), where the tag is a 128-bit hash of the plan and the
//! subject (a key's public id, a client IP, a per-key key). Every key of one
//! (plan, subject) shares the hash tag, so they land in one Redis Cluster
//! slot; no key name holds an API key's value or a client address. Throttle
//! state expires when its bucket is full again, a quota's count a day after
//! its window ends, and the history after `history_days` without use.

mod cache;

use std::fmt::{self, Write as _};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, RedisError, RedisFuture, ServerErrorKind, Value};

use self::cache::OverLimitCache;
use super::{
    Acquire, Acquired, Applied, CONCURRENCY, ConcurrencyRef, Denied, Permit, QuotaRef, Report,
    Settlement, Store, StoreError, StoreFuture, ThrottleRef, Verdict,
};
use crate::clock::Clock;
use crate::gcra::{NANOS_PER_SEC, Nanos, Outcome};
use crate::hash;
use crate::quota::DayRecord;
use crate::store::memory::applied;
use crate::window::{Date, NANOS_PER_DAY, Period};

/// The script every decision runs.
const SCRIPT: &str = include_str!("script.lua");

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
/// The origin of the relative time line on which replies are replayed: far
/// above any TAT offset, far below overflow.
const BASE: Nanos = 1 << 62;

/// A store in Redis or Redis Cluster, shared by every instance that uses it.
///
/// Clones share one connection. Decisions take one round trip; a key Redis
/// denied is answered locally until its retry time. On Redis Cluster a
/// request with stage limits takes two, since the stage's shared buckets
/// live in their own slot (plus a refund in the background when the plan
/// denies). A decision that takes
/// longer than the [timeout](RedisStoreBuilder::timeout) fails, and the plan's
/// [`FailureMode`](crate::FailureMode) decides the request; the connection
/// recovers by itself when Redis comes back.
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
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    cluster: bool,
    sha: String,
    prefix: String,
    /// The SipHash key that names subjects' state, when a secret was set.
    naming: Option<NamingKey>,
    timeout: Duration,
    clock: Clock,
    cache: Option<OverLimitCache>,
    /// Redis `TIME` minus this machine's wall time, in microseconds, as last
    /// estimated from a reply (see [`Inner::deadline`]).
    offset_us: AtomicI64,
    /// When the estimate was made (monotonic nanoseconds; 0 for never).
    offset_at: AtomicU64,
    /// The next lease id (a random start, so instances do not collide).
    members: AtomicU64,
    lease: Duration,
    /// Calls sent in the background (settlements, lease releases, stage
    /// refunds) that have not finished, for [`RedisStore::drained`].
    background: Background,
}

/// Counts the calls a store sends in the background.
#[derive(Default)]
struct Background {
    running: AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Counts one background call as finished when dropped: when it completes,
/// and when its task is cancelled (the runtime shuts down) too.
struct Running(Arc<Inner>);

impl Drop for Running {
    fn drop(&mut self) {
        let background = &self.0.background;
        if background.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            background.idle.notify_waiters();
        }
    }
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisStore {
    /// Configures a store on one Redis server (`redis://host:port/db`,
    /// `rediss://` for TLS when redis-rs is built with it).
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

    /// The time a decision may take.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The prefix of every key this store writes.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// Waits until no call this store sends in the background is running:
    /// token settlements, releases of places under concurrency caps, and (on
    /// Redis Cluster) stage refunds, which responses and decisions start
    /// without waiting for them.
    ///
    /// Await it before the process exits, after the server has stopped
    /// (axum's graceful shutdown returns once every response has ended), so
    /// that the last responses' tokens are settled in Redis rather than lost
    /// with the runtime. Each call is bounded by the store's
    /// [timeout](RedisStoreBuilder::timeout), so this returns within about
    /// that long once no new calls start; a call that fails leaves what it
    /// would have changed as it was (the estimate stands, the place lapses
    /// with its lease).
    ///
    /// ```no_run
    /// use tollgate::{Policy, RateLimitLayer, RedisStore, Throttle, UsagePlan};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = RedisStore::builder("redis://127.0.0.1:6379/").build().await?;
    /// let policy = Policy::per_key(UsagePlan::new("p").throttle(Throttle::new(10.0, 20)?))?;
    /// let app = axum::Router::new()
    ///     .route("/", axum::routing::get(|| async { "ok" }))
    ///     .layer(RateLimitLayer::builder(policy).store(store.clone()).build());
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    /// axum::serve(listener, app)
    ///     .with_graceful_shutdown(async { tokio::signal::ctrl_c().await.unwrap_or(()) })
    ///     .await?;
    /// // Every response has ended; their settlements may still be on their way.
    /// store.drained().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn drained(&self) {
        let background = &self.inner.background;
        loop {
            let idle = background.idle.notified();
            let mut idle = std::pin::pin!(idle);
            // Registered before the count is read: a call that finishes in
            // between still wakes this one.
            idle.as_mut().enable();
            if background.running.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
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

/// The key of the hash that names state, derived from a secret: never shown.
#[derive(Clone, Copy)]
struct NamingKey(u64, u64);

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
    /// Past it the plan's failure mode decides the request.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Decides on this clock instead of Redis `TIME` when it is a
    /// [`ManualClock`](crate::ManualClock) (tests about time); any clock also
    /// dates usage reports and ages the over-limit cache. Default: the
    /// system clock, and Redis `TIME` for decisions.
    pub fn clock(mut self, clock: impl Into<Clock>) -> Self {
        self.clock = Some(clock.into());
        self
    }

    /// The longest a denial is answered locally, without asking Redis
    /// (default 1 s; `Duration::ZERO` turns the over-limit cache off). A
    /// denied key is answered locally until its retry time, at most this
    /// long, so that a change made through another instance (a raised quota,
    /// a reset) is seen within it.
    pub fn over_limit_cache(mut self, max: Duration) -> Self {
        self.cache_ttl = max;
        self
    }

    /// How long a request's place under a concurrency cap is held in Redis
    /// when nobody gives it back (default 5 minutes): the instance that took
    /// it crashed. A response that lasts longer loses its place early, so
    /// set it above the longest stream you serve.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Builds the store. A single server is connected lazily (the store can
    /// be built while Redis is down, and connects when it is up); a cluster
    /// is asked for its slots now.
    ///
    /// Errors on a malformed URL, an empty prefix, a zero timeout, or an
    /// unreachable cluster.
    pub async fn build(self) -> Result<RedisStore, StoreError> {
        if self.prefix.is_empty() || self.prefix.contains(['{', '}']) {
            return Err(StoreError::new(
                "the key prefix must be non-empty and hold no braces",
            ));
        }
        if self.timeout.is_zero() {
            return Err(StoreError::new("the timeout must be above zero"));
        }
        let conn = if self.cluster {
            let client = redis::cluster::ClusterClientBuilder::new(self.nodes.clone())
                .connection_timeout(self.timeout)
                .response_timeout(self.timeout)
                .build()
                .map_err(|e| redis_error(&e))?;
            let connect = client.get_async_connection();
            match tokio::time::timeout(self.timeout.max(Duration::from_secs(1)), connect).await {
                Ok(Ok(c)) => Conn::Cluster(c),
                Ok(Err(e)) => return Err(redis_error(&e)),
                Err(_) => return Err(StoreError::timeout(self.timeout)),
            }
        } else {
            let [url] = self.nodes.as_slice() else {
                return Err(StoreError::new("a single-server store takes one URL"));
            };
            let client = redis::Client::open(url.as_str()).map_err(|e| redis_error(&e))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(self.timeout))
                .set_response_timeout(Some(self.timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1));
            Conn::Single(
                ConnectionManager::new_lazy_with_config(client, config)
                    .map_err(|e| redis_error(&e))?,
            )
        };
        let sha = redis::Script::new(SCRIPT).get_hash().to_owned();
        let ttl = u64::try_from(self.cache_ttl.as_nanos()).unwrap_or(u64::MAX);
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                cluster: self.cluster,
                sha,
                prefix: self.prefix,
                naming: self.naming,
                timeout: self.timeout,
                clock: self.clock.unwrap_or_default(),
                cache: (ttl > 0).then(|| OverLimitCache::new(CACHE_ENTRIES, ttl)),
                offset_us: AtomicI64::new(0),
                offset_at: AtomicU64::new(0),
                members: AtomicU64::new(std::hash::BuildHasher::hash_one(
                    &std::hash::RandomState::new(),
                    0x006c_6561_7365_u64,
                )),
                lease: self.lease,
                background: Background::default(),
            }),
        })
    }
}

/// A store error from a Redis error, without the command (which names keys).
fn redis_error(e: &RedisError) -> StoreError {
    StoreError::new(format!("redis: {}", e.kind_name()))
}

trait KindName {
    fn kind_name(&self) -> String;
}

impl KindName for RedisError {
    fn kind_name(&self) -> String {
        // The error's description carries no key names or values; the detail
        // of a server error is the script's own message.
        match (self.code(), self.detail()) {
            (Some(code), Some(detail)) => format!("{code} {detail}"),
            _ => self.to_string(),
        }
    }
}

/// One script call: keys and arguments, owned so the call can outlive the
/// request it was built from.
#[derive(Debug, Clone, Default)]
struct Call {
    keys: Vec<String>,
    args: Vec<String>,
}

impl Call {
    fn new(mode: &str, now: &Now) -> Self {
        let mut c = Call::default();
        c.arg(mode);
        match now {
            Now::Redis => {
                c.arg("");
                c.arg("");
            }
            Now::At { s, ns } => {
                c.arg(s);
                c.arg(ns);
            }
        }
        c
    }

    fn arg(&mut self, a: impl fmt::Display) {
        self.args.push(a.to_string());
    }

    /// `EVALSHA sha …`, or `EVAL script …` (which also loads it) when `sha` is `None`.
    fn cmd(&self, sha: Option<&str>) -> Cmd {
        let mut cmd = match sha {
            Some(sha) => redis::cmd("EVALSHA").arg(sha).clone(),
            None => redis::cmd("EVAL").arg(SCRIPT).clone(),
        };
        cmd.arg(self.keys.len()).arg(&self.keys).arg(&self.args);
        cmd
    }
}

/// The time a call decides at.
#[derive(Debug, Clone, Copy)]
enum Now {
    /// Redis `TIME`.
    Redis,
    /// A manual clock's wall time.
    At { s: i64, ns: i64 },
}

impl Inner {
    fn now(&self) -> Now {
        if self.clock.is_manual() {
            let t = self.clock.wall_nanos();
            Now::At {
                s: t.div_euclid(NANOS_PER_SEC as i64),
                ns: t.rem_euclid(NANOS_PER_SEC as i64),
            }
        } else {
            Now::Redis
        }
    }

    /// The time the over-limit cache ages on: with a manual clock its wall
    /// time (what decisions are made on), else the monotonic clock.
    fn local_now(&self) -> Nanos {
        if self.clock.is_manual() {
            u64::try_from(self.clock.wall_nanos()).unwrap_or(0)
        } else {
            self.clock.nanos()
        }
    }

    /// The hash tag of a (plan, subject): every key of it lands in one slot.
    fn tag(&self, plan: Option<&str>, subject: &[u8]) -> String {
        format!("{}:{{{:032x}}}", self.prefix, self.scope(plan, subject))
    }

    /// The hash of a (plan, subject), which names its keys.
    fn scope(&self, plan: Option<&str>, subject: &[u8]) -> u128 {
        let scope = match plan {
            Some(p) => [b"p\0", p.as_bytes(), b"\0", subject].concat(),
            None => b"stage".to_vec(),
        };
        match self.naming {
            Some(NamingKey(k0, k1)) => hash::keyed(k0, k1, &scope),
            None => hash::stable(&scope),
        }
    }

    /// The sorted set of leases of a (plan, subject)'s requests in flight.
    fn cap_key(&self, place: u128) -> String {
        format!("{}:{{{place:032x}}}:c", self.prefix)
    }

    /// The count and history keys of a quota (a token budget's carry its name).
    fn quota_keys(&self, q: &QuotaRef<'_>) -> [String; 2] {
        let tag = self.tag(Some(q.plan), q.subject);
        if q.counts_tokens() {
            let name = q.name();
            [format!("{tag}:q:{name}"), format!("{tag}:h:{name}")]
        } else {
            [format!("{tag}:q"), format!("{tag}:h")]
        }
    }

    fn throttle_key(&self, t: &ThrottleRef<'_>) -> String {
        let mut k = self.tag(t.plan, t.subject);
        let _ = write!(k, ":t:{:016x}", t.limit.salt);
        k
    }

    /// Runs a script call; loads the script when Redis lost it. The caller
    /// bounds the whole decision by the timeout.
    async fn run(self: Arc<Self>, call: Call) -> Result<Vec<i64>, StoreError> {
        let mut conn = self.conn.clone();
        let reply = match call.cmd(Some(&self.sha)).query_async(&mut conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                call.cmd(None).query_async(&mut conn).await
            }
            r => r,
        };
        let reply: Vec<i64> = reply.map_err(|e| {
            if e.to_string().contains("tollgate: expired") || e.detail() == Some("expired") {
                self.forget_offset();
            }
            redis_error(&e)
        })?;
        if let [s, ns, ..] = reply[..] {
            self.observe(s, ns);
        }
        Ok(reply)
    }

    /// This machine's wall time in microseconds.
    fn wall_us() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
    }

    /// Learns how Redis `TIME` stands to this machine's clock from a reply
    /// dated `s`, `ns` by Redis. A reply is dated before it is read, so a
    /// sample is never above the true offset, and one read late (a busy
    /// runtime) is below it: a higher sample is taken at once, a lower one
    /// lowers the estimate by at most a millisecond per ten seconds (clock
    /// drift), so that one late reply cannot make deadlines early. A clock
    /// that steps is caught by the script answering "expired", which makes
    /// the estimate unknown until the next reply ([`Inner::forget_offset`]).
    fn observe(&self, s: i64, ns: i64) {
        if self.clock.is_manual() {
            return;
        }
        let sample = s
            .saturating_mul(1_000_000)
            .saturating_add(ns / 1_000)
            .saturating_sub(Self::wall_us());
        let now = self.clock.nanos().max(1);
        let at = self.offset_at.load(Ordering::Relaxed);
        let current = self.offset_us.load(Ordering::Relaxed);
        let next = if at == 0 || sample > current {
            sample
        } else if now.saturating_sub(at) > 10 * NANOS_PER_SEC {
            sample.max(current - 1_000)
        } else {
            return;
        };
        self.offset_us.store(next, Ordering::Relaxed);
        self.offset_at.store(now, Ordering::Relaxed);
    }

    /// Forgets the offset (a call was declined as expired: the clocks
    /// stepped); calls go without a deadline until a reply dates Redis's clock.
    fn forget_offset(&self) {
        self.offset_at.store(0, Ordering::Relaxed);
    }

    /// The deadline of a decision sent now, in microseconds of Redis `TIME`:
    /// a call Redis runs after it (Redis stalled with the call queued) was
    /// given up by the layer, which answered the request without it, so the
    /// script decides nothing rather than charging a request that was
    /// refused or let through unmetered. None until a reply dated Redis's
    /// clock (or with a manual clock, where no real time passes).
    fn deadline(&self) -> Option<i64> {
        if self.clock.is_manual() || self.offset_at.load(Ordering::Relaxed) == 0 {
            return None;
        }
        // The offset is estimated low (by a reply's latency), so the deadline
        // errs early: a call run just before the layer gives up may find it
        // passed and fail, but no call is charged after the layer gave up.
        let timeout = i64::try_from(self.timeout.as_micros()).unwrap_or(i64::MAX);
        Some(
            Self::wall_us()
                .saturating_add(self.offset_us.load(Ordering::Relaxed))
                .saturating_add(timeout),
        )
    }

    /// `work` within the timeout: however many round trips it takes and
    /// whatever Redis does, it answers by then.
    /// Runs `work` in a task of its own, counted until it ends (see
    /// [`RedisStore::drained`]); outside a Tokio runtime, not at all.
    fn spawn(self: &Arc<Self>, work: impl Future<Output = ()> + Send + 'static) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.background.running.fetch_add(1, Ordering::AcqRel);
        let running = Running(Arc::clone(self));
        rt.spawn(async move {
            let _running = running;
            work.await;
        });
    }

    async fn within<T>(
        &self,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::timeout(self.timeout)),
        }
    }

    /// Runs a plain command within the timeout.
    async fn command<T: redis::FromRedisValue>(&self, cmd: Cmd) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        self.within(async {
            cmd.query_async(&mut conn)
                .await
                .map_err(|e| redis_error(&e))
        })
        .await
    }
}

/// A throttle as a decision needs it after the call: its compiled limit.
#[derive(Debug, Clone)]
struct Throttle {
    limit: crate::plan::Limit,
    shadow: bool,
    /// What it is charged: requests, or tokens.
    cost: u32,
    /// Whether it counts tokens (the per-minute token bucket).
    tokens: bool,
}

/// A quota as a decision needs it after the call.
#[derive(Debug, Clone)]
struct Quota {
    name: &'static str,
    /// The whole limit: a cost above it never fits, in any window.
    whole: u64,
    shadow: bool,
    cost: u32,
    tokens: bool,
    /// Its arguments to the script.
    args: Vec<String>,
}

/// One script call's limits and what to make of its reply.
#[derive(Debug, Clone, Default)]
struct Part {
    call: Call,
    throttles: Vec<Throttle>,
    quotas: Vec<Quota>,
    cap: Option<Cap>,
}

/// A concurrency cap as a decision needs it after the call.
#[derive(Debug, Clone, Copy)]
struct Cap {
    limit: u32,
    shadow: bool,
    /// The permit a request let in holds.
    permit: Permit,
}

impl Part {
    fn new(now: &Now, cost: u32) -> Self {
        let mut call = Call::new("a", now);
        call.arg(cost);
        Part {
            call,
            throttles: Vec::new(),
            quotas: Vec::new(),
            cap: None,
        }
    }

    fn push_throttle(&mut self, inner: &Inner, t: &ThrottleRef<'_>, cost: u32) {
        self.call.keys.push(inner.throttle_key(t));
        self.throttles.push(Throttle {
            limit: t.limit.clone(),
            shadow: t.shadow,
            cost,
            tokens: t.counts_tokens(),
        });
    }

    fn push_quota(&mut self, inner: &Inner, q: &QuotaRef<'_>, cost: u32) {
        let [key, hist] = inner.quota_keys(q);
        self.call.keys.push(key);
        self.call.keys.push(hist);
        let mut args = Call::default();
        quota_args(&mut args, q);
        args.arg(u8::from(q.shadow));
        args.arg(q.history_days);
        args.arg(cost);
        args.arg(u8::from(q.counts_tokens()));
        self.quotas.push(Quota {
            name: q.name(),
            whole: q.spec.limit,
            shadow: q.shadow,
            cost,
            tokens: q.counts_tokens(),
            args: args.args,
        });
    }

    fn push_cap(&mut self, inner: &Inner, c: &ConcurrencyRef<'_>) {
        let place = inner.scope(Some(c.plan), c.subject);
        self.call.keys.push(inner.cap_key(place));
        let id = inner.members.fetch_add(1, Ordering::Relaxed);
        self.cap = Some(Cap {
            limit: c.limit,
            shadow: c.shadow,
            permit: Permit::new(place, id),
        });
    }

    /// The arguments after the cost: throttles, the quotas, the cap.
    fn finish(&mut self, lease: Duration) {
        let call = &mut self.call;
        call.arg(self.throttles.len());
        for t in &self.throttles {
            call.arg(t.limit.gcra.interval());
            call.arg(t.limit.gcra.burst());
            call.arg(u8::from(t.shadow));
            let since = t.limit.since.max(0);
            call.arg(since / NANOS_PER_SEC as i64);
            call.arg(since % NANOS_PER_SEC as i64);
            call.arg(t.cost);
        }
        call.arg(self.quotas.len());
        for q in &self.quotas {
            call.args.extend(q.args.iter().cloned());
        }
        match self.cap {
            Some(c) => {
                call.arg(1);
                call.arg(c.limit);
                call.arg(lease.as_millis().max(1));
                call.arg(format_args!("{:016x}", c.permit.id));
                call.arg(u8::from(c.shadow));
            }
            None => call.arg(0),
        }
    }

    /// Makes the verdict of a reply, as the memory store would have decided
    /// on the same state: the script returns each throttle's TAT offset
    /// before the request and the quota's window and count, and the limits
    /// are replayed here on a relative time line.
    fn verdict(&self, reply: &[i64], cost: u32) -> Result<(Verdict, Charged), StoreError> {
        let bad = || StoreError::new("redis: unexpected script reply");
        let n = self.throttles.len();
        let head = reply.get(..3 + n).ok_or_else(bad)?;
        let (now_s, now_ns, allowed) = (head[0], head[1], head[2] == 1);
        let mut report = Report::default();
        let mut denied: Option<Denied> = None;
        let mut charged = Charged {
            now_s,
            now_ns,
            tats: Vec::new(),
        };
        for (t, &before) in self.throttles.iter().zip(&head[3..]) {
            let before = u64::try_from(before).map_err(|_| bad())?;
            let limit = &t.limit;
            match limit.gcra.decide(BASE + before, BASE, t.cost) {
                Outcome::Allow { after, .. } => {
                    report.push(applied(limit, after, BASE));
                    charged.tats.push(Some(after - BASE));
                    if t.tokens {
                        // When the estimate's share refills, in nanoseconds
                        // of the call's time.
                        let span = u64::from(t.cost) * limit.gcra.interval();
                        report.reserved.until = u64::try_from(now_s).ok().and_then(|s| {
                            (s.checked_mul(NANOS_PER_SEC)?)
                                .checked_add(u64::try_from(now_ns).ok()?)?
                                .checked_add(span)
                        });
                    }
                }
                o => {
                    charged.tats.push(None);
                    let d = throttle_denial(limit, o);
                    if t.shadow {
                        report.push(d.limit);
                    } else {
                        denied = Some(Denied::longest(denied, d));
                    }
                }
            }
        }
        for (i, q) in self.quotas.iter().enumerate() {
            let at = 3 + n + 4 * i;
            let rest = reply.get(at..at + 4).ok_or_else(bad)?;
            let (start_day, end_day, limit, used) = (rest[0], rest[1], rest[2], rest[3]);
            let now = now_s
                .saturating_mul(NANOS_PER_SEC as i64)
                .saturating_add(now_ns);
            let reset = end_day
                .saturating_mul(NANOS_PER_DAY)
                .saturating_sub(now)
                .max(0) as u64;
            let window_secs = (end_day - start_day).max(0) as u64 * 86_400;
            let cost = i64::from(q.cost);
            let item = |used: i64| Applied {
                name: q.name,
                quota: u64::try_from(limit).unwrap_or(0),
                window_secs,
                remaining: limit.saturating_sub(used).max(0) as u64,
                reset,
            };
            if u64::from(q.cost) > q.whole && !q.shadow {
                denied = Some(Denied::longest(denied, Denied::too_costly(item(used))));
            } else if used.saturating_add(cost) > limit && !q.shadow {
                let d = Denied::quota(item(used), Duration::from_nanos(reset.max(1)));
                denied = Some(Denied::longest(denied, d));
            } else {
                report.push(item(used.saturating_add(cost)));
                if q.tokens {
                    report.reserved.wall = Some(now);
                }
            }
        }
        if let Some(c) = self.cap {
            let at = 3 + n + 4 * self.quotas.len();
            let in_flight = *reply.get(at).ok_or_else(bad)?;
            let in_flight = u64::try_from(in_flight).map_err(|_| bad())?;
            let item = |n: u64| Applied {
                name: CONCURRENCY,
                quota: u64::from(c.limit),
                window_secs: 0,
                remaining: u64::from(c.limit).saturating_sub(n),
                reset: 0,
            };
            if in_flight >= u64::from(c.limit) && !c.shadow {
                denied = Some(Denied::longest(
                    denied,
                    Denied::concurrency(item(in_flight)),
                ));
            } else if cost > 0 {
                report.push(item(in_flight + 1));
                report.set_permit(c.permit);
            } else {
                // A peek takes no place: the report shows the free ones.
                report.push(item(in_flight));
            }
        }
        match (allowed, denied) {
            (true, None) => Ok((Ok(report), charged)),
            (false, Some(d)) => Ok((Err(d), charged)),
            _ => Err(StoreError::new(
                "redis: the script's decision differs from the plan's limits (is the script of another version?)",
            )),
        }
    }
}

/// What a call charged: its time and, per throttle, the TAT offset stored.
#[derive(Debug, Clone, Default)]
struct Charged {
    now_s: i64,
    now_ns: i64,
    tats: Vec<Option<Nanos>>,
}

/// The denial of a throttle that did not allow, on the relative time line.
fn throttle_denial(limit: &crate::plan::Limit, o: Outcome) -> Denied {
    match o {
        Outcome::Deny { at, retry_after } => {
            Denied::throttled(applied(limit, at, BASE), Duration::from_nanos(retry_after))
        }
        Outcome::TooCostly { at } | Outcome::Allow { after: at, .. } => {
            Denied::too_costly(applied(limit, at, BASE))
        }
    }
}

/// The quota's parameters, as every script mode takes them.
fn quota_args(call: &mut Call, q: &QuotaRef<'_>) {
    call.arg(q.spec.limit);
    let (period, week_start) = match q.spec.period {
        Period::Day => ("D", 0),
        Period::Week(first) => ("W", first.days_from_monday()),
        Period::Month => ("M", 0),
    };
    call.arg(period);
    call.arg(week_start);
    call.arg(q.spec.offset);
    call.arg(q.spec.created_at.div_euclid(NANOS_PER_SEC as i64));
}

/// A stable identity of a request for the over-limit cache: its limits, their
/// numbers, its subject and its cost.
fn identity(req: &Acquire<'_>) -> u64 {
    let mut bytes = Vec::with_capacity(128);
    for t in req.throttles() {
        bytes.extend_from_slice(&t.limit.salt.to_le_bytes());
        bytes.extend_from_slice(&t.limit.gcra.interval().to_le_bytes());
        bytes.extend_from_slice(&t.limit.gcra.burst().to_le_bytes());
        bytes.push(u8::from(t.shadow));
        bytes.extend_from_slice(t.plan.unwrap_or("").as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(&(t.subject.len() as u64).to_le_bytes());
        bytes.extend_from_slice(t.subject);
    }
    if let Some(q) = &req.quota {
        bytes.extend_from_slice(b"q");
        bytes.extend_from_slice(q.plan.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(q.subject);
        bytes.extend_from_slice(&q.spec.limit.to_le_bytes());
    }
    bytes.extend_from_slice(&req.cost.to_le_bytes());
    // The process's keyed hash: clients choose subjects, and must not be able
    // to aim them at one shard of the cache.
    hash::digest(&bytes).0 as u64
}

type Decided = Pin<Box<dyn Future<Output = Result<Verdict, StoreError>> + Send + 'static>>;

impl Store for RedisStore {
    type Future = Decided;

    fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    fn acquire(&self, request: &Acquire<'_>) -> Acquired<Self::Future> {
        let inner = &self.inner;
        if request.throttles().next().is_none()
            && request.quotas().next().is_none()
            && request.concurrency.is_none()
        {
            // Nothing to decide: no round trip.
            return Acquired::Ready(Ok(Ok(Report::default())));
        }
        // A denial is cached as of the time the request was sent, so that it
        // never outlasts what Redis would answer.
        let sent = inner.local_now();
        // A request with token limits is never answered from the cache: a
        // settlement may give tokens back before a cached retry time.
        let tokens = request.throttles().any(|t| t.counts_tokens())
            || request.quotas().any(|q| q.counts_tokens());
        // Nor is one with limits shared by every caller: others' requests
        // move them.
        let shared = request.throttles().any(|t| t.plan.is_none());
        let id = inner
            .cache
            .as_ref()
            .filter(|_| !tokens && !shared)
            .map(|cache| {
                let id = identity(request);
                (id, cache.get(id, sent))
            });
        if let Some((_, Some(denied))) = id {
            return Acquired::Ready(Ok(Err(denied)));
        }
        let now = inner.now();
        let cost = request.cost;
        // On a cluster the stage's shared buckets live in their own slot.
        let split = inner.cluster && request.throttles().any(|t| t.plan.is_none());
        let mut stage = Part::new(&now, cost);
        let mut own = Part::new(&now, cost);
        for t in request.throttles() {
            let cost = request.cost_for(t.counts_tokens());
            if split && t.plan.is_none() {
                stage.push_throttle(inner, t, cost);
            } else {
                own.push_throttle(inner, t, cost);
            }
        }
        for q in request.quotas() {
            own.push_quota(inner, q, request.cost_for(q.counts_tokens()));
        }
        if let Some(c) = &request.concurrency {
            own.push_cap(inner, c);
        }
        stage.finish(inner.lease);
        own.finish(inner.lease);
        if let (Now::Redis, Some(deadline)) = (now, inner.deadline()) {
            stage.call.args[2] = deadline.to_string();
            own.call.args[2] = deadline.to_string();
        }
        let inner = Arc::clone(inner);
        Acquired::Pending(Box::pin(async move {
            let work = async {
                if split {
                    decide_split(&inner, stage, own, cost).await
                } else {
                    let reply = Arc::clone(&inner).run(own.call.clone()).await?;
                    Ok(own.verdict(&reply, cost)?.0)
                }
            };
            let verdict = inner.within(work).await?;
            if let (Err(denied), Some((id, _)), Some(cache)) = (&verdict, id, &inner.cache) {
                if OverLimitCache::holds(denied) {
                    cache.insert(id, sent, *denied);
                }
            }
            Ok(verdict)
        }))
    }

    fn release(&self, permit: Permit) {
        let inner = Arc::clone(&self.inner);
        let key = inner.cap_key(permit.place);
        let member = format!("{:016x}", permit.id);
        // Never waited for: a lease that cannot be removed lapses by itself.
        let task = Arc::clone(&inner);
        inner.spawn(async move {
            let cmd = redis::cmd("ZREM").arg(key).arg(member).clone();
            if let Err(e) = task.command::<i64>(cmd).await {
                tracing::debug!(error = %e, "lease not removed; it lapses by itself");
            }
        });
    }

    /// An under-estimate is charged to every token limit. An over-estimate
    /// is given back to the token quotas in the window that counted it, and
    /// to the per-minute bucket only as far as the estimate's own share has
    /// not refilled yet (a refund, mode "r"): tokens that have refilled since
    /// may have been granted to later requests, and are not handed out twice.
    fn settle(&self, settlement: &Settlement<'_>) {
        let inner = Arc::clone(&self.inner);
        let now = inner.now();
        // The script's integers are exact below 2^53; a larger settlement
        // would be refused whole, so it is charged as the largest it takes.
        const EXACT: i64 = (1 << 53) - 1;
        let delta = settlement.delta.clamp(-EXACT, EXACT);
        let mut calls = Vec::with_capacity(2);
        let reserved = settlement.reserved;
        let throttle = settlement.throttle.as_ref().filter(|_| delta > 0);
        // An over-estimate goes back only to the quota windows that counted
        // it: the day it was charged is passed for the script to check.
        let quotas = if delta > 0 || reserved.wall.is_some() {
            settlement.quotas
        } else {
            [None, None]
        };
        let mut call = Call::new("t", &now);
        call.arg(delta);
        call.arg(usize::from(throttle.is_some()));
        if let Some(t) = throttle {
            call.keys.push(inner.throttle_key(t));
            call.arg(t.limit.gcra.interval());
            call.arg(t.limit.gcra.burst());
        }
        call.arg(quotas.iter().flatten().count());
        for q in quotas.iter().flatten() {
            call.keys.extend(inner.quota_keys(q));
            quota_args(&mut call, q);
            call.arg(q.history_days);
        }
        if let (Some(wall), true) = (reserved.wall, delta < 0) {
            call.arg(wall.div_euclid(NANOS_PER_DAY));
        }
        if !call.keys.is_empty() {
            calls.push(call);
        }
        if let (Some(t), Some(mine), true) = (&settlement.throttle, reserved.until, delta < 0) {
            let mut call = Call::new("r", &now);
            call.keys.push(inner.throttle_key(t));
            call.arg(delta.unsigned_abs());
            call.arg(1);
            call.arg(t.limit.gcra.interval());
            call.arg(t.limit.gcra.burst());
            call.arg(mine / NANOS_PER_SEC);
            call.arg(mine % NANOS_PER_SEC);
            call.arg(delta.unsigned_abs());
            calls.push(call);
        }
        if calls.is_empty() {
            return;
        }
        // Never waited for, and bounded by the timeout: a settlement that
        // fails leaves the estimate charged.
        let task = Arc::clone(&inner);
        inner.spawn(async move {
            for call in calls {
                if let Err(e) = task.within(Arc::clone(&task).run(call)).await {
                    tracing::debug!(error = %e, "tokens not settled; the estimate stands");
                }
            }
        });
    }

    fn usage(&self, quota: &QuotaRef<'_>, first: Date, last: Date) -> StoreFuture<Vec<[i64; 2]>> {
        let inner = Arc::clone(&self.inner);
        let [_, key] = inner.quota_keys(quota);
        let spec = *quota.spec;
        Box::pin(async move {
            let fields: Vec<(String, i64)> = inner
                .command(redis::cmd("HGETALL").arg(key).clone())
                .await?;
            let records = day_records(&fields);
            Ok(crate::quota::report(
                &spec,
                &records,
                first.days(),
                last.days(),
            ))
        })
    }

    fn set_remaining(&self, quota: &QuotaRef<'_>, remaining: u64) -> StoreFuture<u64> {
        let inner = Arc::clone(&self.inner);
        let mut call = Call::new("s", &inner.now());
        call.keys = inner.quota_keys(quota).to_vec();
        call.arg(remaining);
        quota_args(&mut call, quota);
        call.arg(quota.history_days);
        Box::pin(async move {
            let reply = inner.within(Arc::clone(&inner).run(call)).await?;
            if let Some(cache) = &inner.cache {
                cache.clear();
            }
            match reply.as_slice() {
                [_, _, _, _, limit, used] => Ok(limit.saturating_sub(*used).max(0) as u64),
                _ => Err(StoreError::new("redis: unexpected script reply")),
            }
        })
    }

    fn reset(
        &self,
        throttles: &[ThrottleRef<'_>],
        quota: Option<&QuotaRef<'_>>,
    ) -> StoreFuture<()> {
        let inner = Arc::clone(&self.inner);
        // Keys of one (plan, subject) share a slot; others go one command each.
        let mut groups: Vec<Vec<String>> = Vec::new();
        for t in throttles {
            groups.push(vec![inner.throttle_key(t)]);
        }
        if let Some(q) = quota {
            groups.push(inner.quota_keys(q).to_vec());
        }
        Box::pin(async move {
            for keys in groups {
                let _: i64 = inner.command(redis::cmd("DEL").arg(keys).clone()).await?;
            }
            if let Some(cache) = &inner.cache {
                cache.clear();
            }
            Ok(())
        })
    }
}

/// Decides a request whose stage limits live in another cluster slot: the
/// stage first, then the plan's limits. When the stage denies, the plan's
/// limits are peeked at (nothing charged), so that the answer names the
/// limit that holds the request longest, as one call would. When the plan
/// denies (or fails), the stage gets back what this request charged it, in
/// the background: the answer does not wait for it.
async fn decide_split(
    inner: &Arc<Inner>,
    stage: Part,
    own: Part,
    cost: u32,
) -> Result<Verdict, StoreError> {
    let reply = Arc::clone(inner).run(stage.call.clone()).await?;
    let (verdict, charged) = stage.verdict(&reply, cost)?;
    let has_own = !own.throttles.is_empty() || !own.quotas.is_empty() || own.cap.is_some();
    let stage_report = match verdict {
        Ok(report) if !has_own => return Ok(Ok(report)),
        Ok(report) => report,
        Err(d) if !has_own => return Ok(Err(d)),
        Err(d) => {
            let mut peek = own;
            peek.call.args[0] = "p".to_owned();
            let reply = Arc::clone(inner).run(peek.call.clone()).await?;
            return Ok(Err(match peek.verdict(&reply, cost)?.0 {
                Err(mine) => Denied::longest(Some(d), mine),
                Ok(_) => d,
            }));
        }
    };
    let result = match Arc::clone(inner).run(own.call.clone()).await {
        Ok(reply) => own.verdict(&reply, cost),
        Err(e) => Err(e),
    };
    match result {
        Ok((Ok(report), _)) => {
            let mut all = stage_report;
            for item in report.items() {
                all.push(*item);
            }
            if let Some(permit) = report.permit() {
                all.set_permit(permit);
            }
            all.reserved = report.reserved;
            Ok(Ok(all))
        }
        Ok((Err(d), _)) => {
            spawn_refund(inner, stage, charged, cost);
            Ok(Err(d))
        }
        Err(e) => {
            spawn_refund(inner, stage, charged, cost);
            Err(e)
        }
    }
}

/// Refunds the stage in a task of its own, within its own timeout; a refund
/// that fails leaves the stage charged (it errs toward admitting less).
fn spawn_refund(inner: &Arc<Inner>, stage: Part, charged: Charged, cost: u32) {
    let task = Arc::clone(inner);
    inner.spawn(async move {
        if let Err(e) = task.within(refund(&task, &stage, &charged, cost)).await {
            tracing::debug!(error = %e, "stage refund failed; the stage stays charged");
        }
    });
}

/// Gives the stage back what one request charged it.
async fn refund(
    inner: &Arc<Inner>,
    stage: &Part,
    charged: &Charged,
    cost: u32,
) -> Result<(), StoreError> {
    let mut call = Call::new("r", &inner.now());
    call.arg(cost);
    let mut args: Vec<String> = Vec::new();
    for ((t, tat), key) in stage
        .throttles
        .iter()
        .zip(&charged.tats)
        .zip(&stage.call.keys)
    {
        let Some(ahead) = tat else { continue };
        // The TAT stored, in seconds and nanoseconds of the charging call's time.
        let total = charged.now_ns as u64 + ahead;
        call.keys.push(key.clone());
        args.push(t.limit.gcra.interval().to_string());
        args.push(t.limit.gcra.burst().to_string());
        args.push((charged.now_s + (total / NANOS_PER_SEC) as i64).to_string());
        args.push((total % NANOS_PER_SEC).to_string());
        args.push(t.cost.to_string());
    }
    if call.keys.is_empty() {
        return Ok(());
    }
    call.arg(call.keys.len());
    call.args.extend(args);
    Arc::clone(inner).run(call).await.map(|_| ())
}

/// Day records from a history hash's fields (`u:<day>`, `r:<day>`).
fn day_records(fields: &[(String, i64)]) -> Vec<DayRecord> {
    let mut days: Vec<DayRecord> = Vec::new();
    for (field, value) in fields {
        let (kind, day) = match field.split_once(':') {
            Some((k, d)) => match d.parse::<i64>() {
                Ok(d) => (k, d),
                Err(_) => continue,
            },
            None => continue,
        };
        let i = match days.iter().position(|r| r.day == day) {
            Some(i) => i,
            None => {
                days.push(DayRecord {
                    day,
                    used: 0,
                    remaining: 0,
                });
                days.len() - 1
            }
        };
        match kind {
            "u" => days[i].used = u64::try_from(*value).unwrap_or(0),
            "r" => days[i].remaining = *value,
            _ => {}
        }
    }
    days
}
