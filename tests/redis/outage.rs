//! A Redis store through an outage, against a real `redis-server`: the
//! local copy that decides a plan whose failure mode is `local` bounds what
//! one instance admits by the plan's limits, counting what it admitted
//! through Redis before the outage.

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::Request;
use tollgate::{ApiKey, FailureMode, Policy, RateLimitLayer, RedisStore, UsagePlan};
use tower::ServiceExt;

use crate::SERIAL;
use crate::support::redis::{RedisServer, require_redis};

/// A router whose one key, `capped-key`, may have one request in flight,
/// under the default failure mode (`local`), on `store`.
fn capped_app(store: RedisStore) -> Router {
    let policy = Policy::builder()
        .plan(
            UsagePlan::new("capped")
                .concurrency(1)
                .failure(FailureMode::Local),
        )
        .key(ApiKey::new("k1", "capped-key", "capped"))
        .build()
        .expect("a valid policy");
    let layer = RateLimitLayer::builder(policy).store(store).build();
    Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(layer)
}

fn capped_request() -> Request<Body> {
    Request::get("/")
        .header("x-api-key", "capped-key")
        .body(Body::empty())
        .unwrap()
}

/// A response Redis admitted holds the one place of a cap of 1; when Redis
/// goes away, the local copy counts that place: one instance never has two
/// requests in flight under a cap of 1 (at most N times the limits on N
/// instances). Once the response ends, the copy admits the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_copy_counts_the_places_taken_through_redis() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start();
    let store = RedisStore::builder(redis.url())
        .shared_registry(false)
        .build()
        .await
        .expect("a Redis store");
    let app = capped_app(store.clone());
    let held = app.clone().oneshot(capped_request()).await.unwrap();
    assert_eq!(held.status(), 200, "Redis admits the first");
    assert!(
        held.headers().contains_key("ratelimit"),
        "decided by Redis: {:?}",
        held.headers()
    );
    redis.kill();
    let second = app.clone().oneshot(capped_request()).await.unwrap();
    assert!(store.local_decisions() >= 1, "decided by the local copy");
    assert_eq!(
        second.status(),
        429,
        "a second request in flight under a cap of 1 on one instance"
    );
    drop(held);
    let third = app.clone().oneshot(capped_request()).await.unwrap();
    assert_eq!(third.status(), 200, "the place was given back");
}
