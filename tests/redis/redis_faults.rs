//! Faults between the Redis store and a real `redis-server`: a slowed link,
//! a link that holds every byte (a blackhole), replies that come too late,
//! and a server killed and restarted with and without persistence.
//!
//! The link faults go through [`Proxy`], a TCP proxy on loopback that
//! forwards both directions and holds each chunk for an adjustable delay.
//! Requests go through the layer in an axum router (no sockets on the client
//! side), so that each request's latency is the decision's.
//!
//! What holds: every request is answered within the store's configured
//! timeout plus [`SLACK`] (the slowed link's test: wider margins, see
//! [`SLOWED_TIMEOUT`]), as the plan's failure mode says (`open`: let
//! through without rate-limit headers; `closed`: 503); decisions resume by
//! themselves; a call Redis runs after its deadline charges nothing, so a
//! quota's count after an outage is the count before it plus nothing; a call
//! Redis runs in time is charged even when its reply comes too late; with an
//! append-only file no count is lost when redis-server is killed; on a
//! Cluster, a request denied in one slot stays denied when another slot
//! cannot be read in time. The tests
//! of this file and of `redis_store.rs` run one at a time (the crate's
//! `SERIAL` lock), so that timing is not disturbed by each other.
//!
//! The pause (SIGSTOP) and kill of the gateway process, with a
//! bound on each request's latency, are in `redis_store.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tollgate::extract::ApiKeyHeader;
use tollgate::{
    Account, ApiKey, Date, FailureMode, Period, Policy, Quota, RateLimitLayer, RedisStore,
    Throttle, UsagePlan,
};
use tower::ServiceExt;

use crate::SERIAL;
use crate::support::redis::{RedisCluster, RedisServer, command, require_redis, scan};

/// The store's timeout in these tests (not the default 100 ms, so that the
/// bound is seen to be the configured one).
const TIMEOUT: Duration = Duration::from_millis(250);
/// What a loaded two-core machine may add to the store's timeout before a
/// request counts as hanging (as in `redis_store.rs`).
const SLACK: Duration = Duration::from_millis(400);
/// The store's timeout in the slowed-link test: far above the slow round
/// trip it must still decide within, so that the scheduling delays of a
/// loaded machine fit between the two (with other builds running, requests
/// took up to 1.9 s against a timeout of 250 ms, and 3 s against 1 s).
const SLOWED_TIMEOUT: Duration = Duration::from_secs(2);
/// What the slowed-link test allows a loaded machine to add to
/// [`SLOWED_TIMEOUT`]: their sum stays below [`SLOWED_ABOVE_MS`]'s round
/// trip, so a request answered within it was not waiting for Redis.
const SLOWED_SLACK: Duration = Duration::from_secs(5);
/// Each way's delay of the link slowed below the timeout: a round trip of
/// 100 ms, a twentieth of [`SLOWED_TIMEOUT`].
const SLOWED_BELOW_MS: u64 = 50;
/// Each way's delay of the link slowed above the timeout: a round trip of
/// 20 s, far above [`SLOWED_TIMEOUT`] plus [`SLOWED_SLACK`]. (It costs no
/// time: each request is answered at the timeout, and what the link holds is
/// let go at once when the delay is removed.)
const SLOWED_ABOVE_MS: u64 = 10_000;
/// The longest decisions may take to resume once Redis is reachable.
const RECOVERY: Duration = Duration::from_secs(10);
/// The daily quota of the `open` and `closed` plans.
const QUOTA: u64 = 20;

const SERVICE_UNAVAILABLE: &str = r#"{"message":"Service Unavailable"}"#;
const TOO_MANY_REQUESTS: &str = r#"{"message":"Too Many Requests"}"#;
const LIMIT_EXCEEDED: &str = r#"{"message":"Limit Exceeded"}"#;

// ---------------------------------------------------------------------------
// A delaying TCP proxy
// ---------------------------------------------------------------------------

/// A delay that never ends: the link holds every byte.
const HOLD: u64 = u64::MAX;

/// A TCP proxy on loopback in front of one upstream address. Each chunk read
/// from one side is written to the other once it has been held for the
/// direction's current delay (in milliseconds, read again while it waits, so
/// that lowering the delay releases what is held); order is kept. Dropping
/// the proxy stops accepting and closes every connection.
struct Proxy {
    addr: SocketAddr,
    /// Delay of client-to-Redis chunks (commands).
    up: Arc<AtomicU64>,
    /// Delay of Redis-to-client chunks (replies).
    down: Arc<AtomicU64>,
    /// Bumped to close every open connection.
    cut: watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let up = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicU64::new(0));
        let (cut, _) = watch::channel(0);
        let accept = tokio::spawn({
            let (up, down, cut) = (Arc::clone(&up), Arc::clone(&down), cut.subscribe());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (up, down, mut cut) = (Arc::clone(&up), Arc::clone(&down), cut.clone());
                    cut.mark_unchanged();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        // Closing both sockets (by dropping them) when cut.
                        tokio::select! {
                            _ = async {
                                tokio::join!(
                                    pipe(client_read, server_write, up),
                                    pipe(server_read, client_write, down),
                                )
                            } => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            }
        });
        Proxy {
            addr,
            up,
            down,
            cut,
            accept,
        }
    }

    /// The store's URL through the proxy.
    fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Delays both directions by `ms` milliseconds ([`HOLD`]: forever).
    fn delay(&self, ms: u64) {
        self.up.store(ms, Ordering::Relaxed);
        self.down.store(ms, Ordering::Relaxed);
    }

    /// Delays replies only.
    fn delay_replies(&self, ms: u64) {
        self.up.store(0, Ordering::Relaxed);
        self.down.store(ms, Ordering::Relaxed);
    }

    /// Closes every open connection (new ones are accepted).
    fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Forwards `from` to `to`, each chunk held for the current `delay`; what is
/// read before `from` ends is still delivered, as a network would.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<AtomicU64>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let write = async move {
        while let Some((received, chunk)) = rx.recv().await {
            loop {
                let ms = delay.load(Ordering::Relaxed);
                let due = received.checked_add(Duration::from_millis(ms));
                let left = due.map_or(Duration::MAX, |due| due - Instant::now().min(due));
                if left.is_zero() {
                    break;
                }
                tokio::time::sleep(left.min(Duration::from_millis(5))).await;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

// ---------------------------------------------------------------------------
// The layer on the Redis store
// ---------------------------------------------------------------------------

/// A quota of `quota` a day, `open` and `closed`; a throttle of a burst of
/// 10 (closed); and `probe`, a wide throttle to tell whether Redis decides
/// without spending anything that is counted. No plan borrows: these tests
/// count each request's call (borrowing has its own, in `borrowing.rs`).
fn policy(quota: u64) -> Policy {
    let daily = || Quota::new(quota, Period::Day).expect("a valid quota");
    Policy::builder()
        .plan(
            UsagePlan::new("open")
                .quota(daily())
                .failure(FailureMode::Open)
                .borrow(false),
        )
        .plan(
            UsagePlan::new("closed")
                .quota(daily())
                .failure(FailureMode::Closed)
                .borrow(false),
        )
        .plan(
            UsagePlan::new("tight")
                .throttle(Throttle::new(0.01, 10).expect("a valid throttle"))
                .failure(FailureMode::Closed)
                .borrow(false),
        )
        .plan(
            UsagePlan::new("probe")
                .throttle(Throttle::new(100_000.0, 100_000).expect("a valid throttle"))
                .failure(FailureMode::Closed)
                .borrow(false),
        )
        .key(ApiKey::new("open-1", "open-key", "open"))
        .key(ApiKey::new("closed-1", "closed-key", "closed"))
        .key(ApiKey::new("tight-1", "tight-key", "tight"))
        .key(ApiKey::new("probe-1", "probe-key", "probe"))
        .build()
        .expect("a valid policy")
}

/// The layer on a Redis store at `url`, in a router.
struct Gate {
    layer: RateLimitLayer<ApiKeyHeader, RedisStore>,
    router: Router,
    /// The store's timeout.
    timeout: Duration,
    /// What a request may take beyond `timeout` before it counts as hanging.
    slack: Duration,
}

/// What a test needs of one response.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Whether it carries a `RateLimit` header: Redis decided it.
    decided: bool,
    body: String,
    took: Duration,
}

impl Gate {
    /// With the store's timeout [`TIMEOUT`] and [`SLACK`].
    async fn new(url: &str, quota: u64) -> Gate {
        Gate::with_timeout(url, quota, TIMEOUT, SLACK).await
    }

    async fn with_timeout(url: &str, quota: u64, timeout: Duration, slack: Duration) -> Gate {
        let store = RedisStore::builder(url)
            .timeout(timeout)
            .build()
            .await
            .expect("a Redis store");
        assert_eq!(store.timeout(), timeout);
        let layer = RateLimitLayer::builder(policy(quota)).store(store).build();
        let router = Router::new()
            .route("/", post(|| async { "ok" }))
            .layer(layer.clone());
        Gate {
            layer,
            router,
            timeout,
            slack,
        }
    }

    async fn send(&self, key: &str) -> Answer {
        let request = http::Request::post("/")
            .header("x-api-key", key)
            .body(Body::empty())
            .expect("a request");
        let start = Instant::now();
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("the router never fails");
        let status = response.status().as_u16();
        let decided = response.headers().contains_key("ratelimit");
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("the body");
        Answer {
            status,
            decided,
            body: String::from_utf8_lossy(&body).into_owned(),
            took: start.elapsed(),
        }
    }

    /// What Redis counts of `id`'s quota today (`plan` holds the key).
    async fn used(&self, plan: &str, id: &str) -> i64 {
        let day = today();
        let report = self
            .layer
            .admin()
            .usage(plan, day, day, Some(id))
            .await
            .unwrap_or_else(|e| panic!("usage of {id}: {e:?}"));
        report.items[id].first().map_or(0, |[used, _]| *used)
    }

    /// `n` requests of `key`, each decided by Redis and let through.
    async fn spend(&self, key: &str, n: usize, what: &str) {
        for i in 0..n {
            let ans = self.send(key).await;
            assert!(
                ans.status == 200 && ans.decided,
                "{key}, request {i} {what}: {ans:?}"
            );
            assert!(
                ans.took < self.timeout,
                "{key}, request {i} {what}: {ans:?}"
            );
        }
    }

    /// `n` requests of each of `open-key` and `closed-key`, each decided by
    /// Redis and let through.
    async fn spend_both(&self, n: usize, what: &str) {
        self.spend("open-key", n, what).await;
        self.spend("closed-key", n, what).await;
    }

    /// Sends `n` requests of `key`; every one is decided by Redis, those let
    /// through come first and the rest are denied with `denial`. Returns how
    /// many were let through.
    async fn admitted(&self, key: &str, n: usize, denial: &str) -> usize {
        let mut answers = Vec::new();
        for _ in 0..n {
            answers.push(self.send(key).await);
        }
        let admitted = answers.iter().take_while(|a| a.status == 200).count();
        for (i, ans) in answers.iter().enumerate() {
            if i < admitted {
                assert!(ans.decided, "{key}, request {i}: {ans:?}");
            } else {
                assert_eq!(
                    (ans.status, ans.body.as_str()),
                    (429, denial),
                    "{key}, request {i} after {admitted} let through: {ans:?}"
                );
            }
        }
        admitted
    }

    /// While Redis cannot answer: `n` requests of each of `open-key` and
    /// `closed-key`, interleaved; every one answered by its plan's failure
    /// mode within the timeout plus slack. Returns the slowest.
    async fn outage(&self, n: usize, what: &str) -> Duration {
        let mut slowest = Duration::ZERO;
        for i in 0..n {
            let open = self.send("open-key").await;
            assert!(
                open.status == 200 && !open.decided,
                "open plan, request {i} while Redis is {what}: {open:?}"
            );
            let closed = self.send("closed-key").await;
            assert_eq!(
                (closed.status, closed.body.as_str(), closed.decided),
                (503, SERVICE_UNAVAILABLE, false),
                "closed plan, request {i} while Redis is {what}: {closed:?}"
            );
            for ans in [&open, &closed] {
                assert!(
                    ans.took < self.timeout + self.slack,
                    "request {i} while Redis is {what} took {:?}",
                    ans.took
                );
                slowest = slowest.max(ans.took);
            }
        }
        slowest
    }

    /// Polls with the probe key until Redis decides again; every probe is
    /// answered within the timeout plus slack. Returns how long it took.
    async fn wait_for_decisions(&self, what: &str) -> Duration {
        let start = Instant::now();
        loop {
            let ans = self.send("probe-key").await;
            assert!(
                ans.took < self.timeout + self.slack,
                "a probe after Redis {what} took {:?}",
                ans.took
            );
            if ans.status == 200 && ans.decided {
                return start.elapsed();
            }
            assert_eq!(ans.status, 503, "a probe after Redis {what}: {ans:?}");
            assert!(
                start.elapsed() < RECOVERY,
                "decisions did not resume within {RECOVERY:?} after Redis {what}: {ans:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Today, UTC.
fn today() -> Date {
    Date::from_days((unix_secs() / 86_400) as i64)
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs()
}

/// Waits past midnight UTC when it is less than two minutes away, so that
/// the daily quotas of a test stay in one window.
async fn away_from_midnight() {
    let left = 86_400 - unix_secs() % 86_400;
    if left < 120 {
        tokio::time::sleep(Duration::from_secs(left + 1)).await;
    }
}

/// A `redis-server` behind a [`Proxy`], and a [`Gate`] with quotas of
/// `quota` a day on the proxied store, deciding. Waits past midnight first
/// (see [`away_from_midnight`]).
async fn behind_a_proxy(quota: u64) -> (RedisServer, Proxy, Gate) {
    behind_a_proxy_within(quota, TIMEOUT, SLACK).await
}

/// As [`behind_a_proxy`], with the store's timeout `timeout` and `slack`.
async fn behind_a_proxy_within(
    quota: u64,
    timeout: Duration,
    slack: Duration,
) -> (RedisServer, Proxy, Gate) {
    away_from_midnight().await;
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr()).await;
    let gate = Gate::with_timeout(&proxy.url(), quota, timeout, slack).await;
    gate.wait_for_decisions("started").await;
    (redis, proxy, gate)
}

// ---------------------------------------------------------------------------
// 1. A slowed link
// ---------------------------------------------------------------------------

/// A link slowed below the store's timeout: every decision is still made by
/// Redis (and is seen to wait for the delay). Slowed above it: every request
/// is answered by its plan's failure mode within the timeout plus slack, well
/// before Redis's reply could come, and the calls Redis runs late (after
/// their deadline) charge nothing. The delay removed, decisions resume by
/// themselves.
///
/// The margins are wide so that they hold on a loaded machine, where a
/// request can wait seconds for a worker: the slow round trip below the
/// timeout is a twentieth of it ([`SLOWED_BELOW_MS`] each way against
/// [`SLOWED_TIMEOUT`]), and the one above it is longer than the timeout plus
/// [`SLOWED_SLACK`] ([`SLOWED_ABOVE_MS`] each way), so an answer within the
/// bound cannot have waited for Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowed_redis_decides_below_the_timeout_and_fails_by_the_plan_above_it() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let (_redis, proxy, gate) = behind_a_proxy_within(1_000, SLOWED_TIMEOUT, SLOWED_SLACK).await;
    const { assert!(SLOWED_BELOW_MS * 2 * 20 <= SLOWED_TIMEOUT.as_millis() as u64) };
    const {
        assert!(
            SLOWED_ABOVE_MS * 2
                > SLOWED_TIMEOUT.as_millis() as u64 + SLOWED_SLACK.as_millis() as u64
        )
    };

    gate.spend_both(10, "on a fast link").await;

    // A round trip of 100 ms, a twentieth of the timeout: decided by Redis.
    proxy.delay(SLOWED_BELOW_MS);
    let round_trip = Duration::from_millis(2 * SLOWED_BELOW_MS);
    for key in ["open-key", "closed-key"] {
        for i in 0..10 {
            let ans = gate.send(key).await;
            assert!(
                ans.status == 200 && ans.decided,
                "{key}, request {i} on a link slowed below the timeout: {ans:?}"
            );
            assert!(
                ans.took >= round_trip && ans.took < SLOWED_TIMEOUT + SLOWED_SLACK,
                "{key}, request {i} on a link slowed to {round_trip:?} a round trip took {:?}",
                ans.took
            );
        }
    }

    // A round trip of 20 s: every call reaches Redis after its deadline, and
    // each request is answered by the failure mode long before the reply.
    proxy.delay(SLOWED_ABOVE_MS);
    let slowest = gate.outage(4, "slowed above the timeout").await;

    proxy.delay(0);
    let resumed = gate.wait_for_decisions("slowed").await;
    gate.spend_both(10, "after the link is fast again").await;
    // Let the calls sent while slowed reach Redis, if they were to count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        gate.used("open", "open-1").await,
        30,
        "the open plan's count is its 30 requests Redis decided: the 4 let through \
         unchecked while the link was slow are not charged when Redis runs them late"
    );
    assert_eq!(
        gate.used("closed", "closed-1").await,
        30,
        "the closed plan's count is its 30 requests Redis decided: the 4 refused \
         while the link was slow are not charged when Redis runs them late"
    );
    eprintln!(
        "slowed: slowest request {slowest:?} above the timeout of {SLOWED_TIMEOUT:?}; \
         decisions resumed {resumed:?} after the delay was removed"
    );
}

// ---------------------------------------------------------------------------
// 2. Quotas across an outage
// ---------------------------------------------------------------------------

/// A quota of 20, 8 used; then the link holds every byte (Redis itself runs
/// on, with the counts). The open plan lets the outage's requests through
/// unchecked, the closed plan refuses them, each within the timeout plus
/// slack. When the link is back, the calls held through the outage reach
/// Redis past their deadlines and charge nothing. A second outage cuts the
/// connection as well, and the store reconnects into a link that holds.
/// Through both, Redis still counts 8 and then lets exactly 12 more through,
/// for each plan (and the throttle exactly what remained of its burst):
/// what Redis let through in the day is never above the quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_redis_lets_through_exactly_what_remains_of_a_quota() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let (_redis, proxy, gate) = behind_a_proxy(QUOTA).await;
    gate.spend_both(8, "before the outage").await;
    gate.spend("tight-key", 4, "before the outage").await;

    // Held on the live connection, then let go: what was held is written to
    // Redis at once, each call past its deadline.
    proxy.delay(HOLD);
    let held = gate.outage(6, "held on the live connection").await;
    for i in 0..3 {
        let ans = gate.send("tight-key").await;
        assert_eq!(ans.status, 503, "tight, request {i} in the outage: {ans:?}");
    }
    proxy.delay(0);
    let resumed = gate.wait_for_decisions("held").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        gate.used("open", "open-1").await,
        8,
        "open, after the outage"
    );
    assert_eq!(
        gate.used("closed", "closed-1").await,
        8,
        "closed, after the outage"
    );

    // Held, and the connection cut: the store reconnects into the hold.
    proxy.delay(HOLD);
    proxy.cut();
    let reconnecting = gate.outage(6, "held on new connections").await;
    proxy.delay(0);
    let reconnected = gate.wait_for_decisions("held on new connections").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert_eq!(
        gate.admitted("open-key", 15, LIMIT_EXCEEDED).await,
        12,
        "open: what Redis lets through after the outages is what remained"
    );
    assert_eq!(
        gate.admitted("closed-key", 15, LIMIT_EXCEEDED).await,
        12,
        "closed: what Redis lets through after the outages is what remained"
    );
    assert_eq!(
        gate.admitted("tight-key", 8, TOO_MANY_REQUESTS).await,
        6,
        "a throttle of a burst of 10, 4 used before the outages"
    );
    assert_eq!(gate.used("open", "open-1").await, 20);
    assert_eq!(gate.used("closed", "closed-1").await, 20);
    eprintln!(
        "held: slowest request {held:?} on the live connection, {reconnecting:?} \
         while reconnecting; decisions resumed {resumed:?} and {reconnected:?} after \
         the link was back"
    );
}

/// Replies held past the timeout while commands go through at once: Redis
/// runs each call in time and charges it; the request, whose reply came too
/// late, was answered by the failure mode (open: let through, closed:
/// refused). A call's outcome cannot be known without its reply, so the
/// store errs toward counting it: the quota is never exceeded, and the closed
/// plan loses what its refused requests were charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_reply_comes_too_late_is_charged_and_the_quota_holds() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let (_redis, proxy, gate) = behind_a_proxy(QUOTA).await;
    gate.spend_both(8, "before the fault").await;

    proxy.delay_replies(600);
    gate.outage(5, "late to reply").await;

    proxy.delay(0);
    gate.wait_for_decisions("late to reply").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Each call is sent at once and dated with a deadline of the timeout: on
    // a loaded machine a call may stall past it before Redis runs it, and
    // Redis then declines it (the request was answered without it). So each
    // plan counts the 5 calls less any that stalled, never more, and what
    // Redis lets through afterwards is exactly what remains.
    for (plan, key, what) in [
        ("open", "open-key", "let through"),
        ("closed", "closed-key", "refused"),
    ] {
        let used = gate.used(plan, &format!("{plan}-1")).await;
        assert!(
            (11..=13).contains(&used),
            "{plan}: the 5 {what} while replies were late are counted: {used}"
        );
        assert_eq!(
            gate.admitted(key, 10, LIMIT_EXCEEDED).await,
            (20 - used) as usize,
            "{plan}: after {used} counted"
        );
        assert_eq!(gate.used(plan, &format!("{plan}-1")).await, 20);
    }
}

// ---------------------------------------------------------------------------
// 3. redis-server killed and restarted
// ---------------------------------------------------------------------------

/// Spends 8 of each quota of 20 and 4 of the throttle's burst of 10, kills
/// redis-server (SIGKILL), checks the failure modes and the latency of each
/// request while it is down, restarts it on the same port (with the same
/// arguments), and returns how many requests Redis lets through afterwards:
/// open, closed, throttle.
async fn across_a_restart(redis: &mut RedisServer) -> [usize; 3] {
    let gate = Gate::new(&redis.url(), QUOTA).await;
    gate.wait_for_decisions("started").await;
    gate.spend_both(8, "before the kill").await;
    gate.spend("tight-key", 4, "before the kill").await;

    tokio::task::block_in_place(|| redis.kill());
    let down = gate.outage(6, "down").await;
    tokio::task::block_in_place(|| redis.restart());
    let resumed = gate.wait_for_decisions("restarted").await;
    eprintln!("restart: slowest request {down:?} while down; decisions resumed {resumed:?} after");
    [
        gate.admitted("open-key", 25, LIMIT_EXCEEDED).await,
        gate.admitted("closed-key", 25, LIMIT_EXCEEDED).await,
        gate.admitted("tight-key", 12, TOO_MANY_REQUESTS).await,
    ]
}

/// With an append-only file written on every command, redis-server killed
/// (SIGKILL) and restarted loses no count: each quota of 20 with 8 used lets
/// exactly 12 more through, and the throttle with 4 of 10 used exactly 6.
/// While it is down the plans' failure modes hold, each request answered
/// within the timeout plus slack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_count_is_lost_across_a_restart_with_an_append_only_file() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    away_from_midnight().await;
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    assert_eq!(
        across_a_restart(&mut redis).await,
        [12, 12, 6],
        "after the restart, what remained of each limit"
    );
}

/// The control of the test above: without persistence a restarted
/// redis-server has lost every count, and the same limits start over. It is
/// the append-only file that keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_persistence_a_restart_starts_every_count_over() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    away_from_midnight().await;
    let mut redis = RedisServer::start();
    assert_eq!(
        across_a_restart(&mut redis).await,
        [20, 20, 10],
        "after the restart of a server without persistence, whole limits"
    );
}

/// On a Redis Cluster, a request an account's limit denies stays denied when
/// peeking at the key's own limits (in another slot, only to name the limit
/// that holds it longest) fails: the plan's failure mode (here `open`)
/// never decides a request the limits deny. The key's throttle state is
/// made unreadable, so that the peek fails every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_failed_peek_leaves_an_account_denial_standing() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    let policy = Policy::builder()
        .plan(
            UsagePlan::new("p")
                .throttle(Throttle::new(0.001, 1_000).unwrap())
                .failure(FailureMode::Open),
        )
        .account(Account::new("acme").quota(Quota::new(1, Period::Day).unwrap()))
        .key(ApiKey::new("a", "va", "p").account("acme"))
        .build()
        .unwrap();
    let store = RedisStore::cluster_builder(cluster.urls())
        .prefix("peek")
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let layer = RateLimitLayer::builder(policy).store(store).build();
    assert!(layer.decide(b"va", 1).await.is_ok());
    // The key's throttle (the only one) holds what no script reads.
    let throttles: Vec<_> = cluster
        .addrs()
        .into_iter()
        .flat_map(|addr| scan(addr, "peek:*:t:*").into_iter().map(move |k| (addr, k)))
        .collect();
    assert_eq!(throttles.len(), 1, "{throttles:?}");
    let (addr, key) = &throttles[0];
    command(*addr, &["SET", key, "unreadable"]).unwrap();
    for _ in 0..3 {
        let r = layer
            .decide(b"va", 1)
            .await
            .expect_err("the account denies");
        assert_eq!(
            (r.status().as_u16(), r.limit()),
            (429, Some("account-quota"))
        );
    }
}

/// On a Redis Cluster, a request an account's limit denies stays denied when
/// peeking at the key's own limits (in another node's slot, only to name the
/// limit that holds it longest) outlasts the store's timeout: the denial
/// known when the timeout expires is the answer, in about the timeout, and
/// the plan's failure mode (here `open`) never decides it. The node that
/// holds the key's limits is paused, so that the peek gets no reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_peek_past_the_timeout_leaves_an_account_denial_standing() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut cluster = RedisCluster::start();
    // The account's quota and the key's throttle must live on two nodes,
    // so that pausing the one leaves the other answering: names are tried
    // until their slots fall apart (each is where its name hashes to).
    let holder = |pattern: &str| {
        let addrs = cluster.addrs();
        let nodes: Vec<usize> = (0..addrs.len())
            .filter(|&i| !scan(addrs[i], pattern).is_empty())
            .collect();
        assert_eq!(nodes.len(), 1, "{pattern} on {nodes:?}");
        nodes[0]
    };
    let mut apart = None;
    for i in 0..8 {
        let account = format!("acme-{i}");
        let policy = Policy::builder()
            .plan(
                UsagePlan::new("p")
                    .throttle(Throttle::new(0.001, 1_000).unwrap())
                    .failure(FailureMode::Open),
            )
            .account(Account::new(&account).quota(Quota::new(1, Period::Day).unwrap()))
            .key(ApiKey::new("a", "va", "p").account(&account))
            .build()
            .unwrap();
        let prefix = format!("slow-peek-{i}");
        let store = RedisStore::cluster_builder(cluster.urls())
            .prefix(&prefix)
            .timeout(TIMEOUT)
            .build()
            .await
            .unwrap();
        let layer = RateLimitLayer::builder(policy).store(store).build();
        assert!(layer.decide(b"va", 1).await.is_ok());
        let key = holder(&format!("{prefix}:*:t:*"));
        if holder(&format!("{prefix}:*:q")) != key {
            apart = Some((layer, key));
            break;
        }
    }
    let (layer, key) = apart.expect("an account's limits apart from its key's");
    cluster.node_mut(key).pause();
    for _ in 0..3 {
        let started = Instant::now();
        let r = layer.decide(b"va", 1).await;
        let took = started.elapsed();
        let r = r.expect_err("the account denies");
        assert_eq!(
            (r.status().as_u16(), r.limit()),
            (429, Some("account-quota"))
        );
        assert!(took < TIMEOUT + SLACK, "answered in {took:?}");
    }
    cluster.node_mut(key).resume();
    assert_eq!(layer.store_failures(), 0);
}

/// Requests of one key that share a call (a flight) are answered by it:
/// when Redis grants fewer units than the call asked for the requests
/// waiting, the ones left without a unit are denied as their own calls
/// would have been, not sent to another flight that, on a link slow enough
/// for two round trips to outlast the timeout (though one does not), ended
/// in the failure mode: `open` let a burst of 40 through a quota with 4
/// left. The burst's decisions are all made before the runtime (one thread)
/// runs the call, so that the call asks for every one of them.
#[tokio::test(flavor = "current_thread")]
async fn a_burst_sharing_a_call_on_a_slow_link_is_denied_not_let_through_open() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    away_from_midnight().await;
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr()).await;
    let policy = Policy::builder()
        .plan(
            UsagePlan::new("open")
                .quota(Quota::new(5, Period::Day).expect("a valid quota"))
                .failure(FailureMode::Open),
        )
        .key(ApiKey::new("open-1", "open-key", "open"))
        .build()
        .expect("a valid policy");
    // One round trip (200 ms through the proxy) fits the timeout with room
    // for a loaded machine; two do not, however fast the machine.
    let store = RedisStore::builder(proxy.url())
        .timeout(Duration::from_millis(350))
        .shared_registry(false)
        .build()
        .await
        .expect("a Redis store");
    let layer = RateLimitLayer::builder(policy).store(store).build();
    assert!(layer.decide(b"open-key", 1).await.is_ok(), "connected");
    proxy.delay(100);
    // Each decision joins the call when it is made.
    let burst: Vec<_> = (0..40)
        .map(|_| tokio::spawn(layer.decide(b"open-key", 1)))
        .collect();
    let mut admitted = 0;
    for request in burst {
        match request.await.expect("a request") {
            Ok(()) => admitted += 1,
            Err(r) => assert_eq!(r.status(), 429, "{r:?}"),
        }
    }
    assert_eq!(admitted, 4, "what the quota had left, and none past it");
    assert_eq!(layer.store_failures(), 0, "every request decided by Redis");
}
