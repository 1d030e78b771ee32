//! The Redis store's connection: built from URLs or from a client or
//! connection made with redis-rs (a `Client`, a `ConnectionManager`, a
//! `ClusterClient`, a cluster connection), each deciding on the same state
//! in a real `redis-server` (or Redis Cluster).

use std::time::Duration;

use redis::AsyncCommands;
use tollgate::extract::ApiKeyHeader;
use tollgate::{
    ApiKey, Date, FailureMode, Period, Policy, Quota, RateLimitLayer, Reason, RedisStore,
    RedisStoreBuilder, Throttle, UsagePlan,
};

use crate::support::redis::{RedisCluster, RedisServer, require_redis};

/// The stores' timeout: a reconnection and the call sent again fit in it.
const TIMEOUT: Duration = Duration::from_millis(500);

type Layer = RateLimitLayer<ApiKeyHeader, RedisStore>;

/// Plan `p`, closed on a store failure: a throttle of a burst of `burst`
/// (and 1 a minute), a daily quota of 1000, a cap of 4 in flight.
fn policy(burst: u32) -> Policy {
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(1.0 / 60.0, burst).unwrap())
        .quota(Quota::new(1_000, Period::Day).unwrap())
        .failure(FailureMode::Closed);
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
