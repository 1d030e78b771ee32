//! The Redis store against real `redis-server` processes: its Lua script, the
//! store from the outside (gateway processes sharing one Redis),
//! faults between the store and Redis, and the test harness that starts the
//! servers.

#[path = "../support/mod.rs"]
mod support;

mod borrowing;
mod client;
mod cluster;
mod in_flight;
mod lease;
mod outage;
mod overload;
mod redis_faults;
mod redis_harness;
mod redis_script;
mod redis_store;
mod shared_registry;

/// The tests that time requests (`redis_faults` and `redis_store`), one at a
/// time: they pause, kill and slow down Redis, and each would disturb the
/// other's latency bounds.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A router whose one key, `capped-key`, may have one request in flight
/// (and a throttle far from its limit), under `failure`, on `store`.
fn capped_app(store: tollgate::RedisStore, failure: tollgate::FailureMode) -> axum::Router {
    use tollgate::{ApiKey, Policy, RateLimitLayer, Throttle, UsagePlan};
    let policy = Policy::builder()
        .plan(
            UsagePlan::new("capped")
                .throttle(Throttle::new(1_000_000.0, 1_000_000).unwrap())
                .concurrency(1)
                .failure(failure),
        )
        .key(ApiKey::new("k1", "capped-key", "capped"))
        .build()
        .expect("a valid policy");
    let layer = RateLimitLayer::builder(policy).store(store).build();
    axum::Router::new()
        .route("/", axum::routing::get(|| async { "ok" }))
        .layer(layer)
}

/// A request of [`capped_app`]'s key.
fn capped_request() -> http::Request<axum::body::Body> {
    http::Request::get("/")
        .header("x-api-key", "capped-key")
        .body(axum::body::Body::empty())
        .unwrap()
}
