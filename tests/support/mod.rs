//! What the integration test crates share: policies, a frozen clock, servers
//! on loopback ports and an HTTP client here; real `redis-server` processes
//! ([`redis`]), the store a test body runs against ([`backend`]), the gateway
//! as a child process ([`server`]) and a token-metered endpoint
//! ([`tokens`]) in the submodules.
//!
//! Each test crate of a folder (`tests/<crate>/main.rs`) includes this one
//! module with
//!
//! ```ignore
//! #[path = "../support/mod.rs"]
//! mod support;
//! ```
//!
//! and uses what it needs: not every crate uses every helper. (A `#[path]`
//! because a crate root looks for its modules beside itself, in
//! `tests/<crate>/`.) `tests/alloc.rs` needs none of it.

#![allow(dead_code, unreachable_pub)]

pub(crate) mod backend;
pub(crate) mod postgres;
pub(crate) mod redis;
pub(crate) mod server;
pub(crate) mod tokens;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::routing::get;
use http::StatusCode;
use tollgate::extract::ClientIp;
use tollgate::{
    ApiKey, Date, ManualClock, MemoryStore, Policy, RateLimitLayer, Throttle, UsagePlan,
};

/// A registered, enabled key of plan `p`.
pub(crate) const KEY: &str = "key-one";
/// A second registered, enabled key of plan `p`.
pub(crate) const OTHER_KEY: &str = "key-two";
/// A registered key that is disabled.
pub(crate) const DISABLED_KEY: &str = "key-off";

/// Rate of the test plans, per second.
pub(crate) const RATE: f64 = 2.0;
/// Burst of the test plans.
pub(crate) const BURST: u32 = 5;

/// Plan `p` (2 per second, bursts of 5) with [`KEY`], [`OTHER_KEY`] and
/// the disabled [`DISABLED_KEY`].
pub(crate) fn registered_policy() -> Policy {
    Policy::builder()
        .plan(plan())
        .key(ApiKey::new("one", KEY, "p"))
        .key(ApiKey::new("two", OTHER_KEY, "p"))
        .key(ApiKey::new("off", DISABLED_KEY, "p").enabled(false))
        .build()
        .unwrap()
}

/// Every key the extractor finds limited under plan `p`.
pub(crate) fn per_key_policy() -> Policy {
    Policy::per_key(plan()).unwrap()
}

fn plan() -> UsagePlan {
    UsagePlan::new("p").throttle(Throttle::new(RATE, BURST).unwrap())
}

/// `secs` seconds into the UTC day `y`-`m`-`d`, for a manual clock's wall
/// time.
pub(crate) fn at(y: i32, m: u8, d: u8, secs: u64) -> SystemTime {
    let days = Date::new(y, m, d).unwrap().days();
    UNIX_EPOCH + Duration::from_secs(days as u64 * 86_400 + secs)
}

/// A handler that answers `ok`.
pub(crate) async fn ok() -> &'static str {
    "ok"
}

/// `GET /` with every client IP, as `extractor` finds it, limited to bursts
/// of 5 under plan `p`, on a frozen clock.
pub(crate) fn ip_app(extractor: ClientIp) -> Router {
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(per_key_policy())
        .extractor(extractor)
        .store(store)
        .build();
    Router::new().route("/", get(ok)).layer(layer)
}

/// A store on a manual clock: time stands still until the clock is advanced.
pub(crate) fn frozen_store() -> (ManualClock, MemoryStore) {
    let clock = ManualClock::new();
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    (clock, store)
}

async fn bind() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    (listener, format!("http://{addr}"))
}

/// Serves `router` with connection info on a loopback port; returns its base URL.
pub(crate) async fn serve(router: Router) -> String {
    let (listener, base) = bind().await;
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    base
}

/// Serves `router` without connection info on a loopback port; returns its base URL.
pub(crate) async fn serve_without_connect_info(router: Router) -> String {
    let (listener, base) = bind().await;
    tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    base
}

/// An HTTP/1 client that ignores proxy settings of the environment.
pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Sends `n` requests made by `req` and returns their statuses.
pub(crate) async fn statuses(
    n: usize,
    mut req: impl FnMut(usize) -> reqwest::RequestBuilder,
) -> Vec<StatusCode> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(req(i).send().await.unwrap().status());
    }
    out
}

/// `passed` 200s followed by `rejected` 429s.
pub(crate) fn pass_then_429(passed: usize, rejected: usize) -> Vec<StatusCode> {
    let mut v = vec![StatusCode::OK; passed];
    v.extend(std::iter::repeat_n(StatusCode::TOO_MANY_REQUESTS, rejected));
    v
}

/// The value of header `name` as a string; panics if it is absent.
pub(crate) fn header<'a>(res: &'a reqwest::Response, name: &str) -> &'a str {
    res.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header in {:?}", res.headers()))
        .to_str()
        .unwrap()
}
