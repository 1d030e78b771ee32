//! A Redis store through an outage, against a real `redis-server`: the
//! local copy that decides a plan whose failure mode is `local` bounds what
//! one instance admits by the plan's limits, counting what it admitted
//! through Redis before the outage (the tokens its responses really used
//! included, settled there too), and charges Redis with what it admitted
//! on its own once Redis is back; the outage is logged once when it
//! starts, and its end only once Redis answers again.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use http::Request;
use tollgate::extract::ApiKeyHeader;
use tollgate::{
    ApiKey, FailureMode, Period, Policy, Quota, RateLimitLayer, RedisStore, Throttle, TokenBudget,
    TokenUsage, UsagePlan,
};
use tower::ServiceExt;

use crate::SERIAL;
use crate::support;
use crate::support::redis::{RedisCluster, RedisServer, command, require_redis};

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

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
pub(crate) struct Buffer(Arc<Mutex<Vec<u8>>>);

impl io::Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Buffer {
    pub(crate) fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// What this thread logs at INFO and above, in a buffer, while the guard
/// lives.
pub(crate) fn capture_log() -> (Buffer, tracing::subscriber::DefaultGuard) {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (buffer, tracing::subscriber::set_default(subscriber))
}

/// Units of a share borrowed before Redis went away are no answer from
/// Redis: deciding from them while Redis is still down does not log the
/// outage as over (and then as begun again), and the end is logged once
/// Redis answers again.
// The default flavour runs the store's tasks on this thread, where the
// subscriber is set.
#[tokio::test(flavor = "current_thread")]
async fn decisions_from_a_share_do_not_end_an_outage_in_the_log() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let (buffer, _guard) = capture_log();

    let mut redis = RedisServer::start();
    let store = RedisStore::builder(redis.url())
        .shared_registry(false)
        .max_age(Duration::from_secs(30))
        .build()
        .await
        .expect("a Redis store");
    let policy = Policy::builder()
        .plan(UsagePlan::new("p").throttle(Throttle::new(1000.0, 1000).unwrap()))
        .key(ApiKey::new("hot-1", "hot", "p"))
        .key(ApiKey::new("cold-1", "cold", "p"))
        .build()
        .expect("a valid policy");
    let layer = RateLimitLayer::builder(policy).store(store.clone()).build();
    // The hot key's second call borrows for the rate of the first: five
    // units for 30 s.
    for _ in 0..2 {
        layer.decide(b"hot", 1).await.expect("allowed by Redis");
    }
    redis.kill();
    layer
        .decide(b"cold", 1)
        .await
        .expect("allowed by the local copy");
    assert_eq!(store.local_decisions(), 1, "the cold key has no share");
    for _ in 0..4 {
        layer.decide(b"hot", 1).await.expect("allowed");
    }
    assert_eq!(
        store.local_decisions(),
        1,
        "the hot key decided from its share"
    );
    layer
        .decide(b"cold", 1)
        .await
        .expect("allowed by the local copy");
    assert_eq!(store.local_decisions(), 2);
    let text = buffer.text();
    assert_eq!(
        text.matches("rate-limit store failing").count(),
        1,
        "one outage, logged once: {text}"
    );
    assert!(
        !text.contains("rate-limit store recovered"),
        "Redis is still down: {text}"
    );

    redis.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !buffer.text().contains("rate-limit store recovered") {
        assert!(
            std::time::Instant::now() < deadline,
            "no recovery logged: {}",
            buffer.text()
        );
        let _ = layer.decide(b"cold", 1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = buffer.text();
    assert_eq!(
        text.matches("rate-limit store failing").count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.matches("rate-limit store recovered").count(),
        1,
        "{text}"
    );
}

/// Decisions of key `key` through `layer`, one after the other: how many
/// were allowed.
async fn allowed(layer: &RateLimitLayer<ApiKeyHeader, RedisStore>, key: &[u8], n: usize) -> usize {
    let mut allowed = 0;
    for _ in 0..n {
        match layer.decide(key, 1).await {
            Ok(()) => allowed += 1,
            Err(r) => assert_eq!(r.status(), 429, "{r:?}"),
        }
    }
    allowed
}

/// A share borrowed before Redis restarted empty was charged to a count
/// that is gone: its unused units, given back after the restart, go to no
/// count that began after they were charged. The count Redis starts again
/// admits its limit, no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_borrowed_before_a_restart_gives_nothing_to_the_new_count() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start();
    let plan = UsagePlan::new("q").quota(Quota::new(20, Period::Day).unwrap());
    let policy = || {
        Policy::builder()
            .plan(plan.clone())
            .key(ApiKey::new("k-1", "k", "q"))
            .key(ApiKey::new("other-1", "other", "q"))
            .build()
            .expect("a valid policy")
    };
    let mut layers = Vec::new();
    for _ in 0..2 {
        let store = RedisStore::builder(redis.url())
            .shared_registry(false)
            .timeout(Duration::from_secs(2))
            .max_age(Duration::from_secs(30))
            // Every denial from Redis: none answered from before the
            // give-back.
            .over_limit_cache(Duration::ZERO)
            .build()
            .await
            .expect("a Redis store");
        layers.push((
            RateLimitLayer::builder(policy())
                .store(store.clone())
                .build(),
            store,
        ));
    }
    let (a, a_store) = &layers[0];
    let (b, b_store) = &layers[1];
    // The second call borrows: units A holds, charged to the count before
    // the restart.
    assert_eq!(allowed(a, b"k", 2).await, 2);
    redis.restart();
    // A's connection is made again.
    allowed(a, b"other", 1).await;
    let mut admitted = allowed(b, b"k", 30).await;
    b_store.drained().await;
    assert_eq!(admitted, 20, "the new count admits its limit");
    a_store.drained().await;
    admitted += allowed(b, b"k", 10).await;
    assert_eq!(admitted, 20, "units charged before the restart came back");
}

/// The shared key registry, read every 200 ms, stops being read when Redis
/// goes away: that is logged once when it starts, not on every read, and
/// once when the registry is read again.
#[tokio::test(flavor = "current_thread")]
async fn the_registry_logs_an_outage_once_when_it_starts_and_once_when_it_ends() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let (buffer, _guard) = capture_log();

    let mut redis = RedisServer::start();
    // A read of a Redis that is down fails at once (the connection is
    // refused); the long timeout keeps a read of a Redis that is back but
    // slow on a loaded machine from counting as a second outage.
    let store = RedisStore::builder(redis.url())
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("a Redis store");
    let policy = Policy::builder()
        .plan(UsagePlan::new("p").throttle(Throttle::new(1000.0, 1000).unwrap()))
        .key(ApiKey::new("k-1", "k", "p"))
        .build()
        .expect("a valid policy");
    let layer = RateLimitLayer::builder(policy).store(store).build();
    layer.decide(b"k", 1).await.expect("allowed by Redis");
    redis.kill();
    // Five reads of the registry a second, each failing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = buffer.text();
    let warnings = text.lines().filter(|l| l.contains(" WARN ")).count();
    assert_eq!(warnings, 1, "one outage, one warning: {text}");

    redis.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !buffer.text().lines().any(|l| l.contains(" INFO ")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the end of the outage is not logged: {}",
            buffer.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = buffer.text();
    assert_eq!(
        text.lines().filter(|l| l.contains(" WARN ")).count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.contains(" INFO ")).count(),
        1,
        "{text}"
    );
    drop(layer);
}

/// Plans of either failure mode on one store through one outage: an `open`
/// plan's failures are logged by the layer, a `local` plan's by the store
/// (its copy decides them); neither takes the other's decisions for
/// answers from Redis. So each logs the outage once, and its end once
/// Redis answers again, rather than the `local` plan's decisions from the
/// copy ending in the layer's log an outage the `open` plan still sees.
#[tokio::test(flavor = "current_thread")]
async fn plans_of_both_failure_modes_log_one_outage_once() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let (buffer, _guard) = capture_log();

    let mut redis = RedisServer::start();
    let store = RedisStore::builder(redis.url())
        .shared_registry(false)
        .build()
        .await
        .expect("a Redis store");
    let throttle = Throttle::new(1000.0, 1000).unwrap();
    let policy = Policy::builder()
        .plan(
            UsagePlan::new("o")
                .throttle(throttle)
                .failure(FailureMode::Open),
        )
        .plan(UsagePlan::new("l").throttle(throttle))
        .key(ApiKey::new("o-1", "o", "o"))
        .key(ApiKey::new("l-1", "l", "l"))
        .build()
        .expect("a valid policy");
    let layer = RateLimitLayer::builder(policy).store(store.clone()).build();
    layer.decide(b"o", 1).await.expect("allowed by Redis");
    layer.decide(b"l", 1).await.expect("allowed by Redis");
    redis.kill();
    for _ in 0..3 {
        layer.decide(b"o", 1).await.expect("let through");
        for _ in 0..4 {
            layer
                .decide(b"l", 1)
                .await
                .expect("allowed by the local copy");
        }
    }
    assert_eq!(layer.store_failures(), 3, "the open plan's");
    assert_eq!(store.local_decisions(), 12, "the local plan's");
    let text = buffer.text();
    assert_eq!(
        text.matches("rate-limit store failing").count(),
        2,
        "once by the layer, once by the store: {text}"
    );
    assert!(
        !text.contains("rate-limit store recovered"),
        "Redis is still down: {text}"
    );

    redis.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while buffer.text().matches("rate-limit store recovered").count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no recovery logged: {}",
            buffer.text()
        );
        let _ = layer.decide(b"o", 1).await;
        let _ = layer.decide(b"l", 1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = buffer.text();
    assert_eq!(
        text.matches("rate-limit store failing").count(),
        2,
        "{text}"
    );
}

/// A plan with a token budget that fails open lets requests through while
/// Redis is down, and its handlers still find the `TokenUsage` handle the
/// docs promise every request under such a plan: a handler that takes it,
/// as the README's does, answers as usual instead of failing for want of an
/// extension.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_let_through_open_still_finds_its_token_usage() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start();
    let store = RedisStore::builder(redis.url())
        .shared_registry(false)
        .timeout(Duration::from_millis(200))
        .build()
        .await
        .expect("a Redis store");
    let policy = Policy::builder()
        .plan(
            UsagePlan::new("llm")
                .tokens(TokenBudget::new().per_minute(1_000).unwrap())
                .failure(FailureMode::Open),
        )
        .key(ApiKey::new("k1", "llm-key", "llm"))
        .build()
        .expect("a valid policy");
    let layer = RateLimitLayer::builder(policy)
        .store(store)
        .estimator(|_: &tollgate::extract::RequestView<'_>| 10)
        .build();
    let handler = |Extension(used): Extension<TokenUsage>| async move {
        used.set(4);
        "done"
    };
    let base = support::serve(Router::new().route("/", post(handler)).layer(layer)).await;
    let http = support::client();
    let send = || {
        http.post(format!("{base}/"))
            .header("x-api-key", "llm-key")
            .send()
    };
    let res = send().await.unwrap();
    assert_eq!(res.status(), 200, "decided by Redis");
    assert!(res.headers().contains_key("ratelimit"));
    redis.kill();
    let res = send().await.unwrap();
    assert!(
        !res.headers().contains_key("ratelimit"),
        "let through unchecked: {:?}",
        res.headers()
    );
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "done");
}

/// A response that ends while Redis is unreachable for longer than a few
/// seconds (a restart, a network partition) still gives its place under a
/// concurrency cap back once Redis answers again: the place was Redis's, no
/// response holds it, and left behind it refused the key's every request
/// until its lease lapsed (5 minutes by default). Redis keeps its places
/// across the restart (an append-only file), as a partitioned Redis keeps
/// them while other instances go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_given_back_during_a_long_outage_is_removed_when_redis_returns() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let store = RedisStore::builder(redis.url())
        .timeout(Duration::from_millis(500))
        .shared_registry(false)
        .build()
        .await
        .expect("a Redis store");
    let app = capped_app(store.clone());
    let held = app.clone().oneshot(capped_request()).await.unwrap();
    assert_eq!(held.status(), 200, "Redis admits the first");
    assert_eq!(store.local_decisions(), 0, "decided by Redis");

    tokio::task::block_in_place(|| redis.kill());
    // The response ends while Redis is down, and stays down a while.
    drop(held);
    tokio::time::sleep(Duration::from_secs(6)).await;
    tokio::task::block_in_place(|| redis.restart());

    // Within seconds (not the lease's minutes), Redis (not the local copy)
    // finds the place free.
    let start = std::time::Instant::now();
    loop {
        let before = store.local_decisions();
        let res = app.clone().oneshot(capped_request()).await.unwrap();
        if store.local_decisions() == before && res.status() == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the place of the response that ended during the outage is still taken: {}",
            res.status()
        );
        drop(res);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `ZREM` calls Redis has run since it started.
fn zrem_calls(redis: &RedisServer) -> u64 {
    let info = command(redis.addr(), &["INFO", "commandstats"]).expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_zrem:calls="))
        .and_then(|l| l.split(',').next())
        .map_or(0, |n| n.parse().expect("a call count"))
}

/// A request decided by the local copy because its call never reached
/// Redis (nothing listening: the connection refused) took no place there,
/// so it leaves nothing to remove: a flood of such requests during an
/// outage leaves no removal behind, sent again and again for the lease's
/// minutes and all at once when Redis is back. Before, each left a task
/// retrying its `ZREM` until its lease would have lapsed (5 minutes by
/// default): a flood of denied requests during an outage grew the
/// process by one task per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_never_reached_redis_leaves_no_place_to_remove() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start();
    let store = RedisStore::builder(redis.url())
        .timeout(Duration::from_secs(2))
        .shared_registry(false)
        .build()
        .await
        .expect("a Redis store");
    let app = capped_app(store.clone());
    let held = app.clone().oneshot(capped_request()).await.unwrap();
    assert_eq!(held.status(), 200, "Redis admits the first");
    assert_eq!(store.local_decisions(), 0, "decided by Redis");

    tokio::task::block_in_place(|| redis.kill());
    // The cap's one place is held: the copy denies every one of these
    // (each waits for a refused reconnection or two, some 300 ms).
    for _ in 0..30 {
        let res = app.clone().oneshot(capped_request()).await.unwrap();
        assert_eq!(res.status(), 429, "the copy counts the held place");
    }
    assert!(store.local_decisions() >= 30, "decided by the local copy");
    tokio::task::block_in_place(|| redis.restart());
    // Removals waiting would all be sent within 2 s of Redis answering.
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let zrem = zrem_calls(&redis);
    assert!(
        zrem <= 1,
        "{zrem} places removed that no call of this store could have taken"
    );
    drop(held);
}

/// A plan with a token budget whose failure mode is `local`, on one
/// instance while Redis is down: the local copy decides, and what the
/// responses really used is settled there. With the default estimate (0
/// tokens: the actual cost is all charged after the response) or any
/// under-estimate, a copy that saw only the estimates would admit tokens
/// without bound through the outage, where DESIGN allows one instance at
/// most the plan's limits. An over-estimate goes back to the copy that
/// charged it, and never to Redis, which charged nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_used_during_an_outage_are_settled_in_the_local_copy() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start();
    let store = RedisStore::builder(redis.url())
        .shared_registry(false)
        .timeout(Duration::from_millis(200))
        .build()
        .await
        .expect("a Redis store");
    let policy = Policy::builder()
        .plan(
            UsagePlan::new("llm")
                .tokens(TokenBudget::new().per_minute(100).unwrap())
                .failure(FailureMode::Local),
        )
        .key(ApiKey::new("k1", "llm-key", "llm"))
        .build()
        .expect("a valid policy");
    let layer = RateLimitLayer::builder(policy)
        .store(store.clone())
        .estimator(|req: &tollgate::extract::RequestView<'_>| {
            req.headers
                .get("x-estimate")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(0)
        })
        .build();
    let handler = |Extension(used): Extension<TokenUsage>, headers: http::HeaderMap| async move {
        let n = headers
            .get("x-used")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        used.set(n);
        "done"
    };
    let base = support::serve(Router::new().route("/", post(handler)).layer(layer)).await;
    let http = support::client();
    let send = |estimate: u32, used: u64| {
        http.post(format!("{base}/"))
            .header("x-api-key", "llm-key")
            .header("x-estimate", estimate.to_string())
            .header("x-used", used.to_string())
            .send()
    };
    // Redis decides the first: estimated at nothing, it used 60 of the 100
    // a minute.
    let res = send(0, 60).await.unwrap();
    assert!(res.headers().contains_key("ratelimit"), "decided by Redis");
    assert_eq!(res.text().await.unwrap(), "done");
    tokio::time::sleep(Duration::from_millis(50)).await;
    tokio::task::block_in_place(|| redis.kill());

    // The copy has 40 left: one more request of 60 passes, into debt.
    let mut admitted = 0;
    for _ in 0..10 {
        let res = send(0, 60).await.unwrap();
        if res.status() == 200 {
            admitted += 1;
        }
        let _ = res.text().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(store.local_decisions() >= 1, "decided by the local copy");
    assert_eq!(
        admitted, 1,
        "requests of 60 tokens admitted in a second under 100 tokens a minute, \
         60 used through Redis"
    );
}

/// A response the local copy admitted while Redis was down, and that ends
/// once Redis is back (a long stream, the client going away), used fewer
/// tokens than it reserved: the reservation was charged to the copy alone,
/// so the rest goes back there. Sent to Redis, which had not counted it, it
/// would free tokens that other requests used since, and Redis would admit
/// more than the day's budget. (The reservation is charged to Redis once it
/// is back, as all the copy admitted; what was not used of a reservation
/// already charged there stays charged, erring toward admitting less.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_estimate_the_local_copy_admitted_gives_redis_nothing() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    // Redis keeps its counts across the restart (an append-only file), as a
    // partitioned Redis keeps them while this instance cannot reach it.
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let store = RedisStore::builder(redis.url())
        .shared_registry(false)
        .timeout(Duration::from_millis(200))
        .build()
        .await
        .expect("a Redis store");
    let policy = Policy::builder()
        .plan(
            UsagePlan::new("llm")
                .tokens(TokenBudget::new().per_day(100).unwrap())
                .failure(FailureMode::Local),
        )
        .key(ApiKey::new("k1", "llm-key", "llm"))
        .build()
        .expect("a valid policy");
    let layer = RateLimitLayer::builder(policy)
        .store(store.clone())
        .estimator(|req: &tollgate::extract::RequestView<'_>| {
            req.headers
                .get("x-estimate")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(0)
        })
        .build();
    // Reports what `x-used` says; streams without end when `x-stream` is set.
    let handler = |Extension(used): Extension<TokenUsage>, headers: http::HeaderMap| async move {
        let n = headers
            .get("x-used")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        used.set(n);
        if headers.contains_key("x-stream") {
            let ticks = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(
                    Duration::from_millis(20),
                )),
                |_| Ok::<_, std::convert::Infallible>(bytes::Bytes::from_static(b"x\n")),
            );
            Body::from_stream(ticks)
        } else {
            Body::from("done")
        }
    };
    let base = support::serve(Router::new().route("/", post(handler)).layer(layer)).await;
    let http = support::client();
    let send = |estimate: u32, used: u64, stream: bool| {
        let req = http
            .post(format!("{base}/"))
            .header("x-api-key", "llm-key")
            .header("x-estimate", estimate.to_string())
            .header("x-used", used.to_string());
        if stream {
            req.header("x-stream", "1")
        } else {
            req
        }
        .send()
    };

    // Redis counts a first request of 10 tokens.
    let res = send(10, 10, false).await.unwrap();
    assert!(res.headers().contains_key("ratelimit"), "decided by Redis");
    assert_eq!(res.text().await.unwrap(), "done");

    tokio::task::block_in_place(|| redis.kill());
    // The copy admits a stream that reserves 80 and will use none.
    let mut held = send(80, 0, true).await.unwrap();
    assert_eq!(held.status(), 200);
    assert!(store.local_decisions() >= 1, "decided by the local copy");
    assert!(held.chunk().await.unwrap().is_some(), "the stream runs");

    // Redis comes back with its count of 10, and is charged the 80 the
    // copy reserved for the stream (see
    // `quota_units_the_local_copy_admitted_are_charged_to_redis_once_it_is_back`).
    tokio::task::block_in_place(|| redis.restart());
    let start = std::time::Instant::now();
    loop {
        let before = store.local_decisions();
        let res = send(0, 0, false).await.unwrap();
        let by_redis = store.local_decisions() == before;
        let status = res.status();
        let _ = res.text().await;
        if by_redis && status == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "Redis never decided: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 10 + 80 of the day's 100 are counted: Redis denies 90 and admits 10.
    let res = send(90, 90, false).await.unwrap();
    assert_eq!(res.status(), 429, "Redis admitted 90 past the copy's 80");
    let res = send(10, 10, false).await.unwrap();
    assert_eq!(res.status(), 200, "the day's last 10 tokens");
    let _ = res.text().await;

    // The client of the stream goes away: its 80 unused tokens settle.
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    store.drained().await;

    let before = store.local_decisions();
    let res = send(80, 80, false).await.unwrap();
    assert_eq!(store.local_decisions(), before, "decided by Redis");
    assert_eq!(
        res.status(),
        429,
        "Redis admitted 80 tokens more after the day's 100 were counted (10 + 80 + 10)"
    );
}

/// A layer of one key, `k`, under a daily quota of 10 and the `local`
/// failure mode, on a Redis store at `url`, both on `clock`. Borrowing is
/// off: every request Redis decides is charged there one by one.
async fn day_quota_layer(
    url: String,
    clock: &tollgate::ManualClock,
) -> (RateLimitLayer<ApiKeyHeader, RedisStore>, RedisStore) {
    let store = RedisStore::builder(url)
        .shared_registry(false)
        .clock(clock.clone())
        .timeout(Duration::from_millis(300))
        .over_limit_cache(Duration::ZERO)
        .build()
        .await
        .expect("a Redis store");
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(
            UsagePlan::new("q")
                .quota(Quota::new(10, Period::Day).unwrap())
                .failure(FailureMode::Local)
                .borrow(false),
        )
        .key(ApiKey::new("k-1", "k", "q"))
        .build()
        .expect("a valid policy");
    (
        RateLimitLayer::builder(policy).store(store.clone()).build(),
        store,
    )
}

/// What the local copy admitted during an outage, on its own, is charged
/// to Redis once Redis is back (with its data): with a daily quota of 10 on
/// one instance, 5 through Redis, 5 by the copy while Redis is down, and
/// after the restart the day is used up. Before, Redis never learnt of the
/// copy's 5 and admitted 5 more: 15 in a day under a quota of 10 on one
/// instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_units_the_local_copy_admitted_are_charged_to_redis_once_it_is_back() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let clock = tollgate::ManualClock::new();
    clock.set_wall(crate::support::at(2024, 5, 6, 3_600));
    let (layer, store) = day_quota_layer(redis.url(), &clock).await;
    assert_eq!(allowed(&layer, b"k", 5).await, 5, "Redis admits 5");
    assert_eq!(store.local_decisions(), 0);

    tokio::task::block_in_place(|| redis.kill());
    assert_eq!(
        allowed(&layer, b"k", 5).await,
        5,
        "the copy admits the rest"
    );
    assert_eq!(store.local_decisions(), 5, "decided by the local copy");

    tokio::task::block_in_place(|| redis.restart());
    // Once Redis decides again, the day's 10 are used on this instance.
    let start = std::time::Instant::now();
    let admitted = loop {
        let before = store.local_decisions();
        let admitted = allowed(&layer, b"k", 1).await;
        if store.local_decisions() == before {
            break admitted;
        }
        assert_eq!(admitted, 0, "the copy admitted past its 10");
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "Redis never decided"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(admitted, 0, "Redis admitted an 11th request of the day");
    assert_eq!(
        allowed(&layer, b"k", 10).await,
        0,
        "Redis admitted past the day's 10"
    );
    store.drained().await;

    // Charged once: the next day admits its 10.
    clock.advance(Duration::from_secs(86_400));
    assert_eq!(allowed(&layer, b"k", 12).await, 10, "the next day's 10");
    assert_eq!(store.local_decisions(), 5, "decided by Redis");
}

/// What the local copy admitted during an outage to a throttle whose bucket
/// refills slowly is charged to Redis once it is back too: with a burst of
/// 10 an hour on one instance, the clock standing still, 5 through Redis
/// and 5 by the copy, Redis admits nothing more after its restart. Before,
/// Redis never learnt of the copy's 5 and admitted 5 more: 15 under a
/// burst of 10 on one instance, within the hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_units_the_local_copy_admitted_are_charged_to_redis_once_it_is_back() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let clock = tollgate::ManualClock::new();
    clock.set_wall(crate::support::at(2024, 5, 6, 3_600));
    let store = RedisStore::builder(redis.url())
        .shared_registry(false)
        .clock(clock.clone())
        .timeout(Duration::from_millis(300))
        .over_limit_cache(Duration::ZERO)
        .build()
        .await
        .expect("a Redis store");
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(
            UsagePlan::new("t")
                .throttle(Throttle::new(10.0 / 3_600.0, 10).unwrap())
                .failure(FailureMode::Local)
                .borrow(false),
        )
        .key(ApiKey::new("k-1", "k", "t"))
        .build()
        .expect("a valid policy");
    let layer = RateLimitLayer::builder(policy).store(store.clone()).build();
    assert_eq!(allowed(&layer, b"k", 5).await, 5, "Redis admits 5");
    assert_eq!(store.local_decisions(), 0);

    tokio::task::block_in_place(|| redis.kill());
    assert_eq!(
        allowed(&layer, b"k", 5).await,
        5,
        "the copy admits the rest of the burst"
    );
    assert_eq!(store.local_decisions(), 5, "decided by the local copy");

    tokio::task::block_in_place(|| redis.restart());
    let start = std::time::Instant::now();
    let mut admitted = 0;
    loop {
        let before = store.local_decisions();
        let n = allowed(&layer, b"k", 1).await;
        if store.local_decisions() == before {
            admitted += n;
            break;
        }
        assert_eq!(n, 0, "the copy admitted past the burst");
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "Redis never decided"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    admitted += allowed(&layer, b"k", 10).await;
    assert_eq!(
        admitted, 0,
        "Redis admitted past the burst of 10 on one instance"
    );
    store.drained().await;

    // Charged as of when the copy admitted them: an hour later, the bucket
    // is full again.
    clock.advance(Duration::from_secs(3_600));
    assert_eq!(allowed(&layer, b"k", 12).await, 10, "a full bucket");
}

/// What the local copy admitted in a quota window that has ended when
/// Redis is back is not charged to the window Redis then counts: the new
/// day admits its 10 in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_units_the_local_copy_admitted_in_an_ended_window_are_dropped() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let clock = tollgate::ManualClock::new();
    clock.set_wall(crate::support::at(2024, 5, 6, 86_000));
    let (layer, store) = day_quota_layer(redis.url(), &clock).await;
    assert_eq!(allowed(&layer, b"k", 5).await, 5, "Redis admits 5");

    tokio::task::block_in_place(|| redis.kill());
    assert_eq!(
        allowed(&layer, b"k", 5).await,
        5,
        "the copy admits the rest"
    );
    assert_eq!(store.local_decisions(), 5, "decided by the local copy");

    // Redis is back on the next day.
    clock.advance(Duration::from_secs(1_000));
    tokio::task::block_in_place(|| redis.restart());
    let start = std::time::Instant::now();
    let mut admitted = 0;
    loop {
        let before = store.local_decisions();
        let n = allowed(&layer, b"k", 1).await;
        if store.local_decisions() == before {
            admitted += n;
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "Redis never decided"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    admitted += allowed(&layer, b"k", 12).await;
    assert_eq!(
        admitted, 10,
        "the new day's 10, none taken by the last day's"
    );
}

/// A response the local copy admitted, and that ended during the outage
/// using fewer tokens than it reserved, is charged to Redis, once it is
/// back, for what it used: with 10 of a daily 100 used through Redis and
/// 20 of a reservation of 80 used during the outage, Redis admits 70 more
/// and no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_the_local_copy_admitted_are_charged_to_redis_as_used() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let store = RedisStore::builder(redis.url())
        .shared_registry(false)
        .timeout(Duration::from_millis(200))
        .build()
        .await
        .expect("a Redis store");
    let policy = Policy::builder()
        .plan(
            UsagePlan::new("llm")
                .tokens(TokenBudget::new().per_day(100).unwrap())
                .failure(FailureMode::Local),
        )
        .key(ApiKey::new("k1", "llm-key", "llm"))
        .build()
        .expect("a valid policy");
    let layer = RateLimitLayer::builder(policy)
        .store(store.clone())
        .estimator(|req: &tollgate::extract::RequestView<'_>| {
            req.headers
                .get("x-estimate")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(0)
        })
        .build();
    let handler = |Extension(used): Extension<TokenUsage>, headers: http::HeaderMap| async move {
        let n = headers
            .get("x-used")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        used.set(n);
        "done"
    };
    let base = support::serve(Router::new().route("/", post(handler)).layer(layer)).await;
    let http = support::client();
    let send = |estimate: u32, used: u64| {
        http.post(format!("{base}/"))
            .header("x-api-key", "llm-key")
            .header("x-estimate", estimate.to_string())
            .header("x-used", used.to_string())
            .send()
    };
    let res = send(10, 10).await.unwrap();
    assert!(res.headers().contains_key("ratelimit"), "decided by Redis");
    let _ = res.text().await;
    store.drained().await;

    tokio::task::block_in_place(|| redis.kill());
    let res = send(80, 20).await.unwrap();
    assert_eq!(res.status(), 200);
    let _ = res.text().await;
    assert_eq!(store.local_decisions(), 1, "decided by the local copy");
    tokio::time::sleep(Duration::from_millis(300)).await;

    tokio::task::block_in_place(|| redis.restart());
    let start = std::time::Instant::now();
    loop {
        let before = store.local_decisions();
        let res = send(0, 0).await.unwrap();
        let _ = res.text().await;
        if store.local_decisions() == before {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "Redis never decided"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.drained().await;
    let res = send(71, 71).await.unwrap();
    assert_eq!(res.status(), 429, "Redis admitted past 10 + 20 + 71");
    let res = send(70, 70).await.unwrap();
    assert_eq!(
        res.status(),
        200,
        "Redis counts the 20 used, not the 80 reserved"
    );
}

/// A Redis Cluster with one node down fails the requests of the keys whose
/// slots that node serves, and answers the others: one failure that lasts
/// until the node is back. It is logged once when it starts and once when
/// it ends, not as over whenever a few requests in a row reached the nodes
/// that answer, and then as begun again.
#[tokio::test(flavor = "current_thread")]
async fn a_cluster_node_down_is_one_failure_in_the_log() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let (buffer, _guard) = capture_log();

    let mut cluster = RedisCluster::start();
    let store = RedisStore::cluster_builder(cluster.urls())
        .shared_registry(false)
        .timeout(Duration::from_millis(300))
        .build()
        .await
        .expect("a Redis store");
    let mut policy = Policy::builder().plan(
        UsagePlan::new("p")
            .throttle(Throttle::new(1000.0, 1000).unwrap())
            .failure(FailureMode::Closed)
            .borrow(false),
    );
    let keys: Vec<String> = (0..12).map(|i| format!("key-{i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        policy = policy.key(ApiKey::new(format!("id-{i}"), k.clone(), "p"));
    }
    let layer = RateLimitLayer::builder(policy.build().expect("a valid policy"))
        .store(store)
        .build();
    for k in &keys {
        layer
            .decide(k.as_bytes(), 1)
            .await
            .expect("allowed by Redis");
    }
    cluster.node_mut(1).kill();
    let (mut failed, mut answered) = (0, 0);
    for _ in 0..4 {
        for k in &keys {
            match layer.decide(k.as_bytes(), 1).await {
                Ok(()) => answered += 1,
                Err(r) => {
                    assert_eq!(r.status(), 503, "{r:?}");
                    failed += 1;
                }
            }
        }
    }
    assert!(
        failed > 0 && answered > 0,
        "{failed} failed, {answered} answered"
    );
    let text = buffer.text();
    assert_eq!(
        text.matches("rate-limit store failing").count(),
        1,
        "one outage of one node, logged once: {text}"
    );
    assert!(
        !text.contains("rate-limit store recovered"),
        "the node is still down: {text}"
    );

    cluster.node_mut(1).restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let mut all = true;
        for k in &keys {
            all &= layer.decide(k.as_bytes(), 1).await.is_ok();
        }
        if all && buffer.text().contains("rate-limit store recovered") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not served again: {}",
            buffer.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = buffer.text();
    assert_eq!(
        text.matches("rate-limit store failing").count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.matches("rate-limit store recovered").count(),
        1,
        "{text}"
    );
}

/// A place the local copy granted while Redis was down is one Redis never
/// counted: once Redis is back (here with the data it had, an append-only
/// file), a response the copy admitted and that still runs holds the one
/// place of a cap of 1 on this instance, and a second request is refused,
/// as it was during the outage. Once that response ends, Redis admits the
/// next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_the_local_copy_granted_still_counts_once_redis_is_back() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let store = RedisStore::builder(redis.url())
        .shared_registry(false)
        .timeout(Duration::from_millis(300))
        .build()
        .await
        .expect("a Redis store");
    // The capped key's plan, and a probe's that answers 503 unless Redis
    // decides.
    let policy = Policy::builder()
        .plan(
            UsagePlan::new("capped")
                .concurrency(1)
                .failure(FailureMode::Local),
        )
        .plan(
            UsagePlan::new("probe")
                .throttle(Throttle::new(1000.0, 1000).unwrap())
                .failure(FailureMode::Closed)
                .borrow(false),
        )
        .key(ApiKey::new("k1", "capped-key", "capped"))
        .key(ApiKey::new("p1", "probe-key", "probe"))
        .build()
        .expect("a valid policy");
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(RateLimitLayer::builder(policy).store(store.clone()).build());
    let first = app.clone().oneshot(capped_request()).await.unwrap();
    assert_eq!(first.status(), 200, "Redis admits the first");
    drop(first);
    store.drained().await;

    tokio::task::block_in_place(|| redis.kill());
    let held = app.clone().oneshot(capped_request()).await.unwrap();
    assert_eq!(held.status(), 200, "the local copy admits one");
    assert_eq!(store.local_decisions(), 1, "decided by the local copy");

    tokio::task::block_in_place(|| redis.restart());
    let probe = || {
        Request::get("/")
            .header("x-api-key", "probe-key")
            .body(Body::empty())
            .unwrap()
    };
    let start = std::time::Instant::now();
    while app.clone().oneshot(probe()).await.unwrap().status() != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "Redis never decided"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = app.clone().oneshot(capped_request()).await.unwrap();
    assert_eq!(
        second.status(),
        429,
        "a second request in flight under a cap of 1 on one instance"
    );
    drop(second);

    drop(held);
    let next = app.clone().oneshot(capped_request()).await.unwrap();
    assert_eq!(next.status(), 200, "the copy's place was given back");
    assert!(next.headers().contains_key("ratelimit"));
    assert_eq!(store.local_decisions(), 1, "decided by Redis");
}

/// Failures of different kinds are different failures: Redis killed (its
/// connection refused) and, once it answered again, out of memory (every
/// call refused with `OOM`) are two, each logged when it starts and when it
/// ends, even though Redis answered only once between them.
#[tokio::test(flavor = "current_thread")]
async fn a_different_failure_after_an_answer_is_logged_as_its_own() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let (buffer, _guard) = capture_log();

    let mut redis = RedisServer::start();
    let store = RedisStore::builder(redis.url())
        .shared_registry(false)
        .timeout(Duration::from_millis(300))
        .build()
        .await
        .expect("a Redis store");
    let policy = Policy::builder()
        .plan(
            UsagePlan::new("p")
                .throttle(Throttle::new(1000.0, 1000).unwrap())
                .failure(FailureMode::Local)
                .borrow(false),
        )
        .key(ApiKey::new("k-1", "key", "p"))
        .build()
        .expect("a valid policy");
    let layer = RateLimitLayer::builder(policy).store(store.clone()).build();
    layer.decide(b"key", 1).await.expect("allowed by Redis");
    assert_eq!(store.local_decisions(), 0);

    redis.kill();
    layer
        .decide(b"key", 1)
        .await
        .expect("allowed by the local copy");
    assert_eq!(store.local_decisions(), 1);
    redis.restart();
    // Until Redis decides one.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let before = store.local_decisions();
        layer.decide(b"key", 1).await.expect("allowed");
        if store.local_decisions() == before {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "Redis never decided");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Out of memory: Redis holds 2 MiB more than it may, and evicts nothing.
    let addr = redis.addr();
    let filler = "x".repeat(2 << 20);
    command(addr, &["SET", "filler", &filler]).expect("SET filler");
    command(addr, &["CONFIG", "SET", "maxmemory-policy", "noeviction"]).expect("CONFIG SET");
    command(addr, &["CONFIG", "SET", "maxmemory", "1mb"]).expect("CONFIG SET maxmemory");
    let before = store.local_decisions();
    layer
        .decide(b"key", 1)
        .await
        .expect("allowed by the local copy");
    assert_eq!(
        store.local_decisions(),
        before + 1,
        "Redis refused the call"
    );
    let text = buffer.text();
    let failing: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("rate-limit store failing"))
        .collect();
    assert_eq!(
        failing.len(),
        2,
        "out of memory after the outage is a failure of its own: {text}"
    );
    assert!(failing[1].contains("OOM"), "{text}");
    assert_eq!(
        text.matches("rate-limit store recovered").count(),
        1,
        "the outage ended when Redis answered: {text}"
    );

    command(addr, &["CONFIG", "SET", "maxmemory", "0"]).expect("CONFIG SET maxmemory 0");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while buffer.text().matches("rate-limit store recovered").count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no recovery logged: {}",
            buffer.text()
        );
        let _ = layer.decide(b"key", 1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = buffer.text();
    assert_eq!(
        text.matches("rate-limit store failing").count(),
        2,
        "{text}"
    );
}

/// A stream Redis admitted ends while Redis is down: its settlement (it
/// used 70 tokens of a daily 100, estimated at 10: 60 more to charge) and
/// the give-back of its place under a cap of 1 cannot reach Redis then.
/// Once Redis is back (with its data: an append-only file, as a
/// partitioned Redis keeps it), both are there within seconds: the place is
/// free, and Redis counts 70 tokens, so it admits 30 more and denies the
/// next one. The failure is logged once when it starts (no request came
/// during the outage: the settlement's failure begins it) and once when it
/// ends. Before, the settlement was tried once and lost: Redis counted 10
/// and admitted 60 tokens past the day's 100, and nothing was logged.
// The default flavour runs the store's tasks on this thread, where the
// subscriber is set.
#[tokio::test(flavor = "current_thread")]
async fn a_settlement_made_during_an_outage_reaches_redis_once_it_is_back() {
    settled_through(Outage::Killed).await;
}

/// As [`a_settlement_made_during_an_outage_reaches_redis_once_it_is_back`],
/// Redis paused (SIGSTOP) instead: the settlement and each try again wait
/// unanswered in its connection, and all run once it goes on. The
/// settlement is applied once: Redis counts 70 tokens, not 70 more per try.
#[tokio::test(flavor = "current_thread")]
async fn a_settlement_sent_again_to_a_paused_redis_is_applied_once() {
    settled_through(Outage::Paused).await;
}

/// How Redis is away.
#[derive(Clone, Copy)]
enum Outage {
    Killed,
    Paused,
}

async fn settled_through(outage: Outage) {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let (buffer, _guard) = capture_log();
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    // A second for each call: a call that a loaded machine holds past a
    // short timeout after Redis is back (it replays its append-only file
    // and syncs each write) would be a second outage in the log, which
    // this test counts. The outage itself lasts three times as long.
    let store = RedisStore::builder(redis.url())
        .shared_registry(false)
        .timeout(Duration::from_secs(1))
        .build()
        .await
        .expect("a Redis store");
    let policy = Policy::builder()
        .plan(
            UsagePlan::new("llm")
                .tokens(TokenBudget::new().per_day(100).unwrap())
                .concurrency(1)
                .failure(FailureMode::Local),
        )
        .key(ApiKey::new("k1", "llm-key", "llm"))
        .build()
        .expect("a valid policy");
    let layer = RateLimitLayer::builder(policy)
        .store(store.clone())
        .estimator(|req: &tollgate::extract::RequestView<'_>| {
            req.headers
                .get("x-estimate")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(0)
        })
        .build();
    // The stream's body: chunks sent through `tx`, ending when it is dropped.
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    let rx = Arc::new(Mutex::new(Some(rx)));
    let handler = move |Extension(used): Extension<TokenUsage>, headers: http::HeaderMap| {
        let rx = Arc::clone(&rx);
        async move {
            let n = headers
                .get("x-used")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(0);
            used.set(n);
            match headers.contains_key("x-stream") {
                true => {
                    let rx = rx.lock().unwrap().take().expect("one stream");
                    let chunks = tokio_stream::StreamExt::map(
                        tokio_stream::wrappers::ReceiverStream::new(rx),
                        Ok::<_, std::convert::Infallible>,
                    );
                    Body::from_stream(chunks)
                }
                false => Body::from("done"),
            }
        }
    };
    let app = Router::new().route("/", post(handler)).layer(layer);
    let request = |estimate: u32, used: u64, stream: bool| {
        let mut req = Request::post("/")
            .header("x-api-key", "llm-key")
            .header("x-estimate", estimate.to_string())
            .header("x-used", used.to_string());
        if stream {
            req = req.header("x-stream", "1");
        }
        req.body(Body::empty()).unwrap()
    };
    let send = |estimate: u32, used: u64| {
        let app = app.clone();
        async move {
            let res = app.oneshot(request(estimate, used, false)).await.unwrap();
            let status = res.status();
            let _ = http_body_util::BodyExt::collect(res.into_body()).await;
            status
        }
    };

    let held = app.clone().oneshot(request(10, 70, true)).await.unwrap();
    assert_eq!(held.status(), 200);
    assert_eq!(store.local_decisions(), 0, "decided by Redis");
    tx.send(bytes::Bytes::from_static(b"x")).await.unwrap();

    match outage {
        Outage::Killed => redis.kill(),
        Outage::Paused => redis.pause(),
    }
    // The stream ends while Redis is down, and Redis stays down a while.
    drop(tx);
    let body = http_body_util::BodyExt::collect(held.into_body())
        .await
        .unwrap();
    assert_eq!(&body.to_bytes()[..], b"x");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let text = buffer.text();
    assert_eq!(
        text.matches("rate-limit store failing").count(),
        1,
        "the settlement's failure begins the outage in the log: {text}"
    );
    assert!(!text.contains("rate-limit store recovered"), "{text}");
    match outage {
        Outage::Killed => redis.restart(),
        Outage::Paused => redis.resume(),
    }

    // Within seconds, Redis (not the local copy) finds the place free.
    let start = std::time::Instant::now();
    loop {
        let before = store.local_decisions();
        let status = send(0, 0).await;
        if store.local_decisions() == before && status == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the place of the stream that ended during the outage is still taken: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Redis counts the 70 tokens the stream used: 30 more fit, then none.
    let before = store.local_decisions();
    assert_eq!(send(30, 30).await, 200, "the day's last 30 tokens");
    assert_eq!(
        send(1, 1).await,
        429,
        "Redis admitted tokens past the day's 100: the settlement was lost"
    );
    assert_eq!(store.local_decisions(), before, "decided by Redis");
    let text = buffer.text();
    assert_eq!(
        text.matches("rate-limit store failing").count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.matches("rate-limit store recovered").count(),
        1,
        "{text}"
    );
}

/// A plan put anew while Redis is down: the local copy decides under the
/// new throttle as the memory store does, the share of each bucket in use
/// carried over (converted at the change). 5 of a bucket of 10 used
/// through Redis, then the bucket grown to 20 at the same rate: half of it
/// is in use, 10 pass. Read under the new numbers unconverted, the copy's
/// bucket was 5 s into a span of 20 s and admitted 15; the other way (a
/// faster throttle of 10 a second), half a bucket of 10 is 5 left, where
/// the unconverted copy admitted none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_put_anew_during_an_outage_is_decided_by_the_copy_under_its_new_numbers() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let plan = |rate: f64, burst: u32| {
        UsagePlan::new("t")
            .throttle(Throttle::new(rate, burst).unwrap())
            .failure(FailureMode::Local)
            .borrow(false)
    };
    for (new, expected) in [((1.0, 20), 10), ((10.0, 10), 5)] {
        let mut redis = RedisServer::start();
        let clock = tollgate::ManualClock::new();
        let store = RedisStore::builder(redis.url())
            .shared_registry(false)
            .clock(clock.clone())
            .timeout(Duration::from_millis(300))
            .over_limit_cache(Duration::ZERO)
            .build()
            .await
            .expect("a Redis store");
        let policy = Policy::builder()
            .clock(clock.clone())
            .plan(plan(1.0, 10))
            .key(ApiKey::new("k-1", "k", "t"))
            .build()
            .expect("a valid policy");
        let layer = RateLimitLayer::builder(policy).store(store.clone()).build();
        assert_eq!(allowed(&layer, b"k", 5).await, 5, "Redis admits 5");
        assert_eq!(store.local_decisions(), 0);
        tokio::task::block_in_place(|| redis.kill());
        layer.admin().put_plan(plan(new.0, new.1)).await.unwrap();
        assert_eq!(
            allowed(&layer, b"k", 30).await,
            expected,
            "admitted by the copy under {new:?}, half of the bucket in use"
        );
        assert!(store.local_decisions() > 0, "decided by the local copy");
    }
}
