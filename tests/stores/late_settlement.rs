//! Settling an over-estimate late never hands out tokens twice, on the
//! memory store and on a real `redis-server`.
//!
//! A request reserves its estimated tokens when it is decided and settles
//! what it used when its response ends, which for a stream may be long
//! after. By then the reservation's share of the per-minute bucket may have
//! refilled and been granted to later requests, and the daily window that
//! counted it may have ended. Giving the whole over-estimate back then
//! admitted more than the budget (found by `tests/stores/never_over_admit.rs`): the
//! bucket gets back only what of the estimate's share has not refilled yet,
//! and a quota window only what it counted itself.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tollgate::store::Store;
use tollgate::{
    ApiKey, ManualClock, MemoryStore, Policy, RateLimitLayer, RedisStore, ResponseBody,
    TokenBudget, UsagePlan,
};
use tower::ServiceExt;

use crate::support::at;
use crate::support::redis::{RedisServer, require_redis};
use crate::support::tokens;

type Response = http::Response<ResponseBody<Full<Bytes>>>;

/// A service under `budget` for key `v` whose estimate is the `x-estimate`
/// header and which reports the `x-actual` header as the tokens it used.
fn service<S: Store>(
    clock: &ManualClock,
    store: S,
    budget: TokenBudget,
) -> impl tower::Service<
    http::Request<String>,
    Response = Response,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(UsagePlan::new("p").tokens(budget))
        .key(ApiKey::new("k", "v", "p"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy)
        .store(store)
        .estimator(tokens::estimate)
        .build();
    tower::ServiceBuilder::new()
        .layer(layer)
        .service_fn(tokens::report_actual)
}

async fn send<S>(svc: &S, estimate: u32, actual: Option<u64>) -> Response
where
    S: tower::Service<http::Request<String>, Response = Response, Error = std::convert::Infallible>
        + Clone,
{
    svc.clone()
        .oneshot(tokens::request("v", estimate, actual))
        .await
        .unwrap()
}

/// Sends `estimate` until it is admitted (a remote store settles in the
/// background), within two seconds of real time; whether it was.
async fn eventually_admitted<S>(svc: &S, estimate: u32) -> bool
where
    S: tower::Service<http::Request<String>, Response = Response, Error = std::convert::Infallible>
        + Clone,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        if send(svc, estimate, None).await.status() == 200 {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// 100 tokens a minute: one refills every 600 ms. A reserves 60 at 0 s and
/// streams for 30 s; its own share refills at 36 s. B reserves 40 at 30 s.
/// A then ends having used nothing: of its 60, only the 10 whose refill was
/// still ahead come back (the other 50 had refilled, and B holds 40 of
/// them). So 60 fit after it, not 100.
async fn an_over_estimate_settled_late_gives_back_only_what_has_not_refilled<S: Store>(
    clock: &ManualClock,
    store: S,
) {
    clock.set_wall(at(2024, 5, 6, 3_600));
    let svc = service(clock, store, TokenBudget::new().per_minute(100).unwrap());
    let a = send(&svc, 60, Some(0)).await;
    assert_eq!(a.status(), 200);
    clock.advance(Duration::from_secs(30));
    assert_eq!(send(&svc, 40, None).await.status(), 200);
    // 50 in use now (A's 10 still ahead, B's 40): 60 do not fit.
    assert_eq!(send(&svc, 60, None).await.status(), 429);
    drop(a);
    assert!(
        eventually_admitted(&svc, 60).await,
        "A's 10 tokens still ahead came back"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        send(&svc, 1, None).await.status(),
        429,
        "the bucket holds 100 tokens in use: nothing of A's refilled share came back twice"
    );
}

/// 100 tokens a UTC day. A reserves 80 at 23:59 and ends at 00:01, having
/// used nothing: the new day never counted A, so it gets nothing back. B
/// used 70 of the new day: 30 are left, not 100.
async fn an_over_estimate_settled_in_a_later_window_gives_that_window_nothing<S: Store>(
    clock: &ManualClock,
    store: S,
) {
    clock.set_wall(at(2024, 5, 6, 86_400 - 60));
    let svc = service(clock, store, TokenBudget::new().per_day(100).unwrap());
    let a = send(&svc, 80, Some(0)).await;
    assert_eq!(a.status(), 200);
    clock.advance(Duration::from_secs(120));
    assert_eq!(send(&svc, 70, None).await.status(), 200);
    drop(a);
    // C reserves 20 and uses 5 in the new day: its 15 do come back.
    assert_eq!(send(&svc, 20, Some(5)).await.status(), 200);
    assert!(
        eventually_admitted(&svc, 25).await,
        "C's over-estimate came back to the window that counted it"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        send(&svc, 1, None).await.status(),
        429,
        "70 + 5 + 25 used: A's over-estimate from the day before gave the new day nothing"
    );
}

fn memory(clock: &ManualClock) -> MemoryStore {
    MemoryStore::builder().clock(clock.clone()).build().unwrap()
}

async fn redis(server: &RedisServer, clock: &ManualClock) -> RedisStore {
    RedisStore::builder(server.url())
        .timeout(Duration::from_secs(2))
        .clock(clock.clone())
        .build()
        .await
        .unwrap()
}

#[tokio::test]
async fn memory_an_over_estimate_settled_late_gives_back_only_what_has_not_refilled() {
    let clock = ManualClock::new();
    an_over_estimate_settled_late_gives_back_only_what_has_not_refilled(&clock, memory(&clock))
        .await;
}

#[tokio::test]
async fn memory_an_over_estimate_settled_in_a_later_window_gives_that_window_nothing() {
    let clock = ManualClock::new();
    an_over_estimate_settled_in_a_later_window_gives_that_window_nothing(&clock, memory(&clock))
        .await;
}

#[tokio::test]
async fn redis_an_over_estimate_settled_late_gives_back_only_what_has_not_refilled() {
    if !require_redis() {
        return;
    }
    let server = RedisServer::start();
    let clock = ManualClock::new();
    let store = redis(&server, &clock).await;
    an_over_estimate_settled_late_gives_back_only_what_has_not_refilled(&clock, store).await;
}

#[tokio::test]
async fn redis_an_over_estimate_settled_in_a_later_window_gives_that_window_nothing() {
    if !require_redis() {
        return;
    }
    let server = RedisServer::start();
    let clock = ManualClock::new();
    let store = redis(&server, &clock).await;
    an_over_estimate_settled_in_a_later_window_gives_that_window_nothing(&clock, store).await;
}
