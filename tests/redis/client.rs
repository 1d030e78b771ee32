//! The Redis store's connection: built from URLs or from a client or
//! connection made with redis-rs (a `Client`, a `ConnectionManager`, a
//! `ClusterClient`, a cluster connection), each deciding on the same state
//! in a real `redis-server` (or Redis Cluster); and a connection that Redis
//! dropped (`CLIENT KILL`, a restart on the same port) costing no request
//! its decision once Redis is healthy again: the next request on a
//! `FailureMode::Closed` plan is decided by Redis, not answered 503.
//!
//! The reconnection tests hold the crate's `SERIAL` lock, as the other tests
//! that kill and restart Redis do.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::AsyncCommands;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tollgate::extract::ApiKeyHeader;
use tollgate::{
    ApiKey, Date, FailureMode, Period, Policy, Quota, RateLimitLayer, Reason, RedisStore,
    RedisStoreBuilder, Throttle, UsagePlan,
};

use crate::SERIAL;
use crate::support::redis::{RedisCluster, RedisServer, command, require_redis};

/// The stores' timeout: a reconnection and the call sent again fit in it.
const TIMEOUT: Duration = Duration::from_millis(500);

type Layer = RateLimitLayer<ApiKeyHeader, RedisStore>;

/// Plan `p`, closed on a store failure: a throttle of a burst of `burst`
/// (and 1 a minute), a daily quota of 1000, a cap of 4 in flight. It does
/// not borrow: these tests count each request's call.
fn policy(burst: u32) -> Policy {
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(1.0 / 60.0, burst).unwrap())
        .quota(Quota::new(1_000, Period::Day).unwrap())
        .failure(FailureMode::Closed)
        .borrow(false);
    Policy::builder()
        .plan(plan)
        .key(ApiKey::new("k", "v", "p"))
        .build()
        .unwrap()
}

async fn layer(builder: RedisStoreBuilder, burst: u32) -> Layer {
    let store = builder
        .prefix("client")
        .timeout(TIMEOUT)
        .build()
        .await
        .unwrap();
    RateLimitLayer::builder(policy(burst)).store(store).build()
}

/// The reason a request of key `v` was refused, `None` if let through.
async fn reason(l: &Layer) -> Option<Reason> {
    l.decide(b"v", 1).await.err().map(|r| r.reason())
}

/// The reason a request of key `cv` (plan `c`) was refused, `None` if let
/// through; a future of its own, to be spawned.
fn capped(l: &Layer) -> impl Future<Output = Option<Reason>> + Send + 'static {
    let decided = l.decide(b"cv", 1);
    async move { decided.await.err().map(|r| r.reason()) }
}

/// What Redis counts of key `k`'s quota today.
async fn used(l: &Layer) -> i64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let today = Date::from_days((secs / 86_400) as i64);
    let report = l.admin().usage("p", today, today, Some("k")).await.unwrap();
    report.items["k"][0][0]
}

/// A store from a URL, a `redis::Client` and a `ConnectionManager` on one
/// server: with one prefix they share one budget, so each lets one request
/// of a burst of 3 through and the fourth, through any, is throttled.
#[tokio::test]
async fn a_store_from_a_client_or_a_connection_manager_decides_on_redis() {
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let manager = redis::aio::ConnectionManager::new(client.clone())
        .await
        .unwrap();
    let layers = [
        layer(RedisStore::builder(redis.url()), 3).await,
        layer(RedisStore::client_builder(client), 3).await,
        layer(RedisStore::connection_manager_builder(manager.clone()), 3).await,
    ];
    for l in &layers {
        assert_eq!(reason(l).await, None);
    }
    for l in &layers {
        assert_eq!(reason(l).await, Some(Reason::Limited));
    }
    assert_eq!(used(&layers[1]).await, 3);
    // The application still uses the manager it lent the store.
    let mut mine = manager;
    let () = mine.set("mine", 7).await.unwrap();
    assert_eq!(mine.get::<_, i64>("mine").await.unwrap(), 7);
}

/// A store from cluster node URLs, a `ClusterClient` and a cluster
/// connection on one Redis Cluster share one budget as well.
#[tokio::test]
async fn a_store_from_a_cluster_client_or_connection_decides_on_the_cluster() {
    if !require_redis() {
        return;
    }
    let cluster = RedisCluster::start();
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let connection = client.get_async_connection().await.unwrap();
    let layers = [
        layer(RedisStore::cluster_builder(cluster.urls()), 3).await,
        layer(RedisStore::cluster_client_builder(client), 3).await,
        layer(RedisStore::cluster_connection_builder(connection), 3).await,
    ];
    for l in &layers {
        assert_eq!(reason(l).await, None);
    }
    for l in &layers {
        assert_eq!(reason(l).await, Some(Reason::Limited));
    }
    assert_eq!(used(&layers[2]).await, 3);
}

/// One store of each single-server kind, with a wide budget.
async fn each_kind(redis: &RedisServer) -> Vec<(&'static str, Layer)> {
    let client = redis::Client::open(redis.url()).unwrap();
    let manager = redis::aio::ConnectionManager::new(client.clone())
        .await
        .unwrap();
    vec![
        ("url", layer(RedisStore::builder(redis.url()), 1_000).await),
        (
            "client",
            layer(RedisStore::client_builder(client), 1_000).await,
        ),
        (
            "manager",
            layer(RedisStore::connection_manager_builder(manager), 1_000).await,
        ),
    ]
}

/// Every store lets `n` requests through, each decided by Redis.
async fn decided(layers: &[(&str, Layer)], n: usize, what: &str) {
    for (kind, l) in layers {
        for i in 0..n {
            assert_eq!(reason(l).await, None, "{kind}, request {i} {what}");
        }
    }
}

/// `CLIENT KILL TYPE normal` drops every store's connection while it is
/// idle; the next request through each is decided by Redis (a closed plan
/// would answer 503 otherwise), and charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_client_kill_the_next_request_is_decided_by_redis() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let layers = each_kind(&redis).await;
    decided(&layers, 2, "before the kill").await;
    for round in 0..3 {
        let killed = command(redis.addr(), &["CLIENT", "KILL", "TYPE", "normal"]).unwrap();
        assert!(killed.parse::<u32>().unwrap() >= 3, "killed {killed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        decided(&layers, 1, &format!("after kill {round}")).await;
    }
    // The layers share a prefix: 3 stores × (2 + 3) requests, each once.
    assert_eq!(used(&layers[0].1).await, 15);
}

/// redis-server killed and started again on the same port (its counts and
/// scripts gone): the next request through each store is decided by the new
/// server, not answered 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_next_request_is_decided_by_redis() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start();
    let layers = each_kind(&redis).await;
    decided(&layers, 2, "before the restart").await;
    tokio::task::block_in_place(|| redis.restart());
    decided(&layers, 1, "after the restart").await;
    assert_eq!(
        used(&layers[0].1).await,
        3,
        "counted anew after the restart"
    );
    tokio::task::block_in_place(|| redis.restart());
    decided(&layers, 1, "after a second restart").await;
    assert_eq!(used(&layers[0].1).await, 3);
}

/// A plan with a concurrency cap of one, closed on failure: after each
/// kill the next request is decided by Redis and takes the one place (the
/// call sent again renews the lease of the first, if that one ran), which
/// is given back when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_plan_is_decided_after_a_kill_and_keeps_its_places() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let plan = UsagePlan::new("c")
        .concurrency(1)
        .failure(FailureMode::Closed);
    let policy = Policy::builder()
        .plan(plan)
        .key(ApiKey::new("c", "cv", "c"))
        .build()
        .unwrap();
    let store = RedisStore::builder(redis.url())
        .prefix("capped")
        .timeout(TIMEOUT)
        .build()
        .await
        .unwrap();
    let l = RateLimitLayer::builder(policy).store(store.clone()).build();
    for round in 0..3 {
        // The last request's place is given back (in the background) first.
        store.drained().await;
        command(redis.addr(), &["CLIENT", "KILL", "TYPE", "normal"]).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // One place of one: let through, nothing left behind by the kill.
        assert_eq!(capped(&l).await, None, "round {round}");
    }
}

/// A TCP proxy on loopback in front of Redis that can hold Redis's replies
/// and cut every connection: a call Redis ran whose reply never arrives.
struct Proxy {
    addr: std::net::SocketAddr,
    hold: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = Arc::new(AtomicBool::new(false));
        let (cut, _) = tokio::sync::watch::channel(0);
        let accept = tokio::spawn({
            let (hold, cut) = (Arc::clone(&hold), cut.subscribe());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (hold, mut cut) = (Arc::clone(&hold), cut.clone());
                    cut.mark_unchanged();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let (mut client_read, mut client_write) = client.into_split();
                        let (mut server_read, mut server_write) = server.into_split();
                        let up = tokio::io::copy(&mut client_read, &mut server_write);
                        let down = async {
                            let mut buf = vec![0; 16 * 1024];
                            while let Ok(n @ 1..) = server_read.read(&mut buf).await {
                                while hold.load(Ordering::Relaxed) {
                                    tokio::time::sleep(Duration::from_millis(2)).await;
                                }
                                if client_write.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        };
                        // Both sockets close when cut (dropped with this task's futures).
                        tokio::select! {
                            _ = async { tokio::join!(up, down) } => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            }
        });
        Proxy {
            addr,
            hold,
            cut,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut.send_modify(|n| *n += 1);
    }
}

/// A decision Redis ran (taking the one place under a cap of one) whose
/// reply is lost with its connection is sent again; the second run finds
/// the first one's place and is refused, and the place is given back: no
/// response will hold it, so it does not wait for its lease to lapse, and
/// the next request is let through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_taken_by_a_call_whose_reply_was_lost_is_given_back() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr()).await;
    let plan = UsagePlan::new("c")
        .concurrency(1)
        .failure(FailureMode::Closed);
    let policy = Policy::builder()
        .plan(plan)
        .key(ApiKey::new("c", "cv", "c"))
        .build()
        .unwrap();
    let store = RedisStore::builder(proxy.url())
        .prefix("lost")
        .timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let l = RateLimitLayer::builder(policy).store(store.clone()).build();
    assert_eq!(capped(&l).await, None, "connected, the script loaded");
    store.drained().await;

    proxy.hold.store(true, Ordering::Relaxed);
    let lost = tokio::spawn(capped(&l));
    // Redis runs the call at once; its reply waits in the proxy.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Cut, and only once the cut connection is gone lift the hold (for the
    // call sent again on a new one): lifted at once, the held reply could
    // slip through before the proxy closes the connection.
    proxy.cut.send_modify(|n| *n += 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy.hold.store(false, Ordering::Relaxed);
    assert_eq!(
        lost.await.unwrap(),
        Some(Reason::ConcurrencyLimited),
        "sent again, the call finds the place its first run took"
    );
    store.drained().await;
    assert_eq!(capped(&l).await, None, "the place was given back");
}
