//! The bound on a Redis store's calls in flight
//! ([`max_in_flight`](tollgate::RedisStoreBuilder::max_in_flight)), from the
//! layer in an axum router on a real `redis-server`:
//!
//! - requests the limits deny never push the store past the bound into a
//!   failure mode that admits them: a burst larger than the bound, on a key
//!   whose one place under a concurrency cap is held, is denied whole under
//!   `open` and under `local`, whether Redis had denied the key before the
//!   burst or not;
//! - a Redis that does not answer still reaches the failure mode past the
//!   bound: never later than the timeout, and at once once a call has failed;
//! - a place is given back when its response ends outside any runtime.

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use axum::routing::get;
use http::Request;
use tokio::task::JoinSet;
use tollgate::{ApiKey, FailureMode, Policy, RateLimitLayer, RedisStore, TokenBudget, UsagePlan};
use tower::ServiceExt;

use crate::support::redis::{RedisServer, require_redis};
use crate::support::tokens;
use crate::{SERIAL, capped_app, capped_request};

/// Requests sent at once: more than the default bound of 256 calls in flight.
const BURST: usize = 300;
/// What a loaded two-core machine may add to the store's timeout before a
/// request counts as late (as in `redis_faults.rs`).
const SLACK: Duration = Duration::from_millis(400);
/// The store's timeout where Redis is healthy and the test is about the
/// bound, not the timeout: a burst of 300 calls on a loaded two-core machine
/// can keep one past the default 100 ms, and a call that times out is a
/// failure (its failure mode decides, as it should). Past the bound, the
/// requests are then still answered from the calls in flight and the
/// denials Redis gave, which is what these tests check.
const HEALTHY: Duration = Duration::from_secs(5);

/// `n` requests at once; every response, in the order they end. The bodies
/// are not read, so an admitted response keeps its place while it is held.
async fn burst(app: &Router, n: usize) -> Vec<(Response, Duration)> {
    let started = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..n {
        let app = app.clone();
        set.spawn(async move {
            let res = app.oneshot(capped_request()).await.unwrap();
            (res, started.elapsed())
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(res) = set.join_next().await {
        out.push(res.expect("a request's task"));
    }
    out
}

/// How many of a burst of [`BURST`] requests are admitted while one
/// response holds the key's one place, Redis healthy, default settings but
/// the timeout ([`HEALTHY`]); with `warm`, Redis denied a lone request of
/// the key just before.
async fn admitted_while_the_cap_is_full(failure: FailureMode, warm: bool) -> usize {
    let redis = RedisServer::start();
    let store = RedisStore::builder(redis.url())
        .shared_registry(false)
        .timeout(HEALTHY)
        .build()
        .await
        .expect("a Redis store");
    let app = capped_app(store, failure);
    let held = app.clone().oneshot(capped_request()).await.unwrap();
    assert_eq!(held.status(), 200, "the place is free");
    if warm {
        let lone = app.clone().oneshot(capped_request()).await.unwrap();
        assert_eq!(lone.status(), 429, "a lone request while the cap is full");
    }
    let answers = burst(&app, BURST).await;
    for (res, _) in &answers {
        assert!(
            [200, 429].contains(&res.status().as_u16()),
            "{}",
            res.status()
        );
    }
    drop(held);
    answers.iter().filter(|(r, _)| r.status() == 200).count()
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_cap_denies_a_burst_past_the_bound_under_open() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    for warm in [true, false] {
        let admitted = admitted_while_the_cap_is_full(FailureMode::Open, warm).await;
        assert_eq!(
            admitted, 0,
            "{admitted} of {BURST} admitted while the cap of 1 was full (warm: {warm})"
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_cap_denies_a_burst_past_the_bound_under_local() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    for warm in [true, false] {
        let admitted = admitted_while_the_cap_is_full(FailureMode::Local, warm).await;
        assert_eq!(
            admitted, 0,
            "{admitted} of {BURST} admitted while the cap of 1 was full (warm: {warm})"
        );
    }
}

/// A router whose one key, `capped-key`, may have one request in flight and
/// has a token budget far from its limit, under `open`, on `store`: each
/// request costs the tokens its `x-estimate` header says.
fn metered_app(store: RedisStore) -> Router {
    let policy = Policy::builder()
        .plan(
            UsagePlan::new("metered")
                .tokens(TokenBudget::new().per_minute(1_000_000_000).unwrap())
                .concurrency(1)
                .failure(FailureMode::Open),
        )
        .key(ApiKey::new("k1", "capped-key", "metered"))
        .build()
        .expect("a valid policy");
    let layer = RateLimitLayer::builder(policy)
        .store(store)
        .estimator(tokens::estimate)
        .build();
    Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(layer)
}

/// Requests of one key whose estimates all differ (prompts of their own),
/// while the key's one place is held: each is a request of its own to the
/// store, and a burst of them larger than the bound is still denied whole
/// under `open`, whether Redis denied the key just before or not: the cap
/// denies every one of them, whatever it costs.
#[tokio::test(flavor = "current_thread")]
async fn a_full_cap_denies_a_burst_of_different_estimates_past_the_bound() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    for warm in [true, false] {
        let redis = RedisServer::start();
        let store = RedisStore::builder(redis.url())
            .shared_registry(false)
            .timeout(HEALTHY)
            .build()
            .await
            .expect("a Redis store");
        let app = metered_app(store);
        let estimated = |tokens: usize| {
            Request::get("/")
                .header("x-api-key", "capped-key")
                .header("x-estimate", tokens.to_string())
                .body(Body::empty())
                .unwrap()
        };
        let held = app.clone().oneshot(estimated(1)).await.unwrap();
        assert_eq!(held.status(), 200, "the place is free");
        if warm {
            let lone = app.clone().oneshot(estimated(2)).await.unwrap();
            assert_eq!(lone.status(), 429, "a lone request while the cap is full");
        }
        let mut set = JoinSet::new();
        for i in 0..BURST {
            let app = app.clone();
            let req = estimated(10 + i);
            set.spawn(async move { app.oneshot(req).await.unwrap().status() });
        }
        let mut admitted = 0;
        while let Some(status) = set.join_next().await {
            let status = status.expect("a request's task");
            assert!([200, 429].contains(&status.as_u16()), "{status}");
            admitted += usize::from(status == 200);
        }
        assert_eq!(
            admitted, 0,
            "{admitted} of {BURST} admitted while the cap of 1 was full (warm: {warm})"
        );
        drop(held);
    }
}

/// Redis stalled (SIGSTOP) after it denied the key: requests past a bound
/// of 2 calls in flight still reach the failure mode (`open` admits them
/// without checking), none later than the timeout; once calls have failed,
/// the ones past the bound are decided at once. A denial Redis gave before
/// the stall is not taken for an answer longer than the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_still_reaches_the_failure_mode_past_the_bound() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let timeout = Duration::from_millis(250);
    let store = RedisStore::builder(redis.url())
        .shared_registry(false)
        .timeout(timeout)
        .max_in_flight(2)
        .build()
        .await
        .expect("a Redis store");
    let app = capped_app(store, FailureMode::Open);
    let held = app.clone().oneshot(capped_request()).await.unwrap();
    assert_eq!(held.status(), 200, "the place is free");
    let lone = app.clone().oneshot(capped_request()).await.unwrap();
    assert_eq!(lone.status(), 429, "a lone request while the cap is full");
    tokio::task::block_in_place(|| redis.pause());
    // The denial is older than the timeout: Redis's answer no longer.
    tokio::time::sleep(timeout * 2).await;
    let first = burst(&app, 20).await;
    let second = burst(&app, 20).await;
    tokio::task::block_in_place(|| redis.resume());
    for (res, took) in &first {
        assert_eq!(res.status(), 200, "`open` admits when Redis cannot decide");
        assert!(*took < timeout + SLACK, "answered after {took:?}");
    }
    let quick = second
        .iter()
        .filter(|(res, took)| res.status() == 200 && *took < timeout / 2)
        .count();
    assert!(
        quick >= 18,
        "{quick} of 20 admitted at once after calls failed"
    );
    drop(held);
}

/// A response whose body ends on a plain thread, outside any Tokio runtime
/// (a body handed to a thread of the application's own), gives its place
/// back at once, through the runtime the store was built on: not when its
/// lease lapses (five minutes by default), which would leave the key's cap
/// full until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_is_given_back_when_its_response_ends_outside_a_runtime() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let store = RedisStore::builder(redis.url())
        .build()
        .await
        .expect("a Redis store");
    let app = capped_app(store, FailureMode::Closed);
    let held = app.clone().oneshot(capped_request()).await.unwrap();
    assert_eq!(held.status(), 200, "the place is free");
    let lone = app.clone().oneshot(capped_request()).await.unwrap();
    assert_eq!(lone.status(), 429, "a request while the cap is full");
    std::thread::spawn(move || drop(held))
        .join()
        .expect("the thread that ends the response");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let res = app.clone().oneshot(capped_request()).await.unwrap();
        if res.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the place was not given back within 5 s of its response's end"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
