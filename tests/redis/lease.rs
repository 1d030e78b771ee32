//! A place under a concurrency cap held by a live response, on a real
//! `redis-server` and on a real Redis Cluster, with a lease far shorter than
//! the response:
//!
//! - the place never lapses while the response is held: a second request
//!   under a cap of 1 is refused for several leases, by another instance
//!   too, and admitted once the first response's body has ended;
//! - a place whose process is gone (its runtime shut down with the response
//!   never ended) still lapses within about one lease.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use tollgate::{FailureMode, RedisStore};
use tower::ServiceExt;

use crate::support::redis::{RedisCluster, RedisServer, require_redis, scan};
use crate::{SERIAL, capped_app, capped_request};

/// The lease of every store here: a response outlives it several times.
const LEASE: Duration = Duration::from_millis(1_200);

/// Where the stores' state lives.
enum Server {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl Server {
    async fn store(&self, prefix: &str) -> RedisStore {
        let builder = match self {
            Server::Single(s) => RedisStore::builder(s.url()),
            Server::Cluster(c) => RedisStore::cluster_builder(c.urls()),
        };
        builder
            .prefix(prefix)
            .lease(LEASE)
            .timeout(Duration::from_secs(2))
            .shared_registry(false)
            .build()
            .await
            .expect("a Redis store")
    }

    /// How many places are taken under every cap of `prefix`, on any node.
    fn places(&self, prefix: &str) -> usize {
        let addrs = match self {
            Server::Single(s) => vec![s.addr()],
            Server::Cluster(c) => c.addrs(),
        };
        addrs
            .into_iter()
            .flat_map(|addr| {
                scan(addr, &format!("{prefix}:*}}:c*"))
                    .into_iter()
                    .map(move |key| (addr, key))
            })
            .map(|(addr, key)| {
                crate::support::redis::command(addr, &["ZCARD", &key])
                    .expect("ZCARD")
                    .trim()
                    .parse::<usize>()
                    .expect("a count")
            })
            .sum()
    }
}

/// Holds the first response's body open (unread) for four leases, on two
/// instances: every request meanwhile is refused, and the place stays in
/// Redis; once the body has been read to its end, the next is admitted and
/// no place is left.
async fn a_live_response_keeps_its_place_past_its_lease(server: Server, prefix: &str) {
    // Under `open`, a place Redis let lapse is the only way past the cap.
    let first = capped_app(server.store(prefix).await, FailureMode::Open);
    let second = capped_app(server.store(prefix).await, FailureMode::Open);
    let held = first.clone().oneshot(capped_request()).await.unwrap();
    assert_eq!(held.status(), 200, "the place is free");
    let taken = Instant::now();
    let until = taken + 4 * LEASE;
    let mut tries = 0;
    while Instant::now() < until {
        tokio::time::sleep(LEASE / 4).await;
        for app in [&first, &second] {
            let status = app
                .clone()
                .oneshot(capped_request())
                .await
                .unwrap()
                .status();
            assert_eq!(
                status,
                429,
                "admitted {:?} after the first, whose response is still held",
                taken.elapsed()
            );
            tries += 1;
        }
        assert_eq!(server.places(prefix), 1, "the held place is in Redis");
    }
    assert!(tries >= 8, "{tries} requests while the response was held");
    // The body ends: the place is given back, and the next is admitted.
    let body = held.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
    let next = first.clone().oneshot(capped_request()).await.unwrap();
    assert_eq!(next.status(), 200, "admitted once the first body ended");
    drop(next);
    first.clone().oneshot(capped_request()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while server.places(prefix) != 0 {
        assert!(Instant::now() < deadline, "a place left in Redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A response held on a runtime that is then shut down (the process that
/// held it gone, its place never given back): its place lapses within about
/// one lease, and another instance is then admitted.
async fn a_place_of_a_gone_process_lapses_with_its_lease(server: Server, prefix: &str) {
    let first = &server;
    let gone = std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let app = capped_app(first.store(prefix).await, FailureMode::Open);
                let held = app.oneshot(capped_request()).await.unwrap();
                assert_eq!(held.status(), 200, "the place is free");
                // Never ended, never dropped: as when the process crashes.
                std::mem::forget(held);
            });
            // The runtime, its tasks and its connection end here.
            drop(rt);
            Instant::now()
        })
        .join()
        .unwrap()
    });
    let other = capped_app(server.store(prefix).await, FailureMode::Open);
    let status = other
        .clone()
        .oneshot(capped_request())
        .await
        .unwrap()
        .status();
    assert_eq!(status, 429, "the place is still taken");
    loop {
        let res = other.clone().oneshot(capped_request()).await.unwrap();
        if res.status() == 200 {
            break;
        }
        assert!(
            gone.elapsed() < LEASE + Duration::from_millis(800),
            "the place of a gone process did not lapse within its lease"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_response_keeps_its_place_on_one_redis() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let server = Server::Single(RedisServer::start());
    a_live_response_keeps_its_place_past_its_lease(server, "live").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_response_keeps_its_place_on_a_cluster() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let server = Server::Cluster(RedisCluster::start());
    a_live_response_keeps_its_place_past_its_lease(server, "live").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_of_a_gone_process_lapses_on_one_redis() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let server = Server::Single(RedisServer::start());
    a_place_of_a_gone_process_lapses_with_its_lease(server, "gone").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_of_a_gone_process_lapses_on_a_cluster() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let server = Server::Cluster(RedisCluster::start());
    a_place_of_a_gone_process_lapses_with_its_lease(server, "gone").await;
}
