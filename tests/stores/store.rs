//! Stores written outside the crate, through the public `Store` trait: a
//! store that answers later is awaited before the inner service is called,
//! and a failing store is decided by each plan's failure mode (open: through
//! without rate-limit headers; closed: 503, or gRPC UNAVAILABLE), counted,
//! and logged once per burst of failures.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing;
use reqwest::StatusCode;
use tollgate::store::{
    Acquire, Acquired, QuotaRef, Settlement, Store, StoreError, StoreFuture, ThrottleRef, Verdict,
};
use tollgate::{
    ApiKey, Clock, Date, FailureMode, MemoryStore, Policy, RateLimitLayer, Throttle, TokenBudget,
    UsagePlan, UsedTokens,
};

use crate::support;

/// A memory store behind a delay, that fails while `down` is set.
#[derive(Clone, Debug, Default)]
struct Remote {
    inner: MemoryStore,
    down: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    /// Token deltas settled.
    settled: Arc<std::sync::Mutex<Vec<i64>>>,
}

type Pending = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Verdict, StoreError>> + Send + 'static>,
>;

impl Store for Remote {
    type Future = Pending;

    fn clock(&self) -> &Clock {
        self.inner.clock()
    }

    fn acquire(&self, request: &Acquire<'_>) -> Acquired<Pending> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.down.load(Ordering::Relaxed) {
            return Acquired::Ready(Err(StoreError::new("down for the test")));
        }
        // Decided now, answered after a round trip's worth of waiting.
        let decided = match self.inner.acquire(request) {
            Acquired::Ready(r) => r,
            Acquired::Pending(_) => unreachable!("the memory store answers at once"),
        };
        Acquired::Pending(Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            decided
        }))
    }

    fn usage(&self, q: &QuotaRef<'_>, first: Date, last: Date) -> StoreFuture<Vec<[i64; 2]>> {
        self.inner.usage(q, first, last)
    }

    fn set_remaining(&self, q: &QuotaRef<'_>, remaining: u64) -> StoreFuture<u64> {
        self.inner.set_remaining(q, remaining)
    }

    fn reset(&self, t: &[ThrottleRef<'_>], q: Option<&QuotaRef<'_>>) -> StoreFuture<()> {
        self.inner.reset(t, q)
    }

    fn settle(&self, settlement: &Settlement<'_>) {
        self.settled.lock().unwrap().push(settlement.delta());
        self.inner.settle(settlement);
    }
}

fn policy() -> Policy {
    let throttle = Throttle::new(0.01, 2).unwrap();
    Policy::builder()
        .plan(
            UsagePlan::new("open")
                .throttle(throttle)
                .failure(FailureMode::Open),
        )
        .plan(
            UsagePlan::new("closed")
                .throttle(throttle)
                .failure(FailureMode::Closed),
        )
        // The default: a store that keeps no local copy of the limits (this
        // one) cannot decide locally, so the request is refused.
        .plan(UsagePlan::new("local").throttle(throttle))
        .key(ApiKey::new("o", "open-key", "open"))
        .key(ApiKey::new("c", "closed-key", "closed"))
        .key(ApiKey::new("l", "local-key", "local"))
        .build()
        .unwrap()
}

async fn server(
    store: Remote,
) -> (
    String,
    RateLimitLayer<tollgate::extract::ApiKeyHeader, Remote>,
) {
    let layer = RateLimitLayer::builder(policy()).store(store).build();
    let app = Router::new()
        .route("/", routing::any(|| async { "ok" }))
        .layer(layer.clone());
    (support::serve(app).await, layer)
}

async fn get(c: &reqwest::Client, base: &str, key: &str) -> reqwest::Response {
    c.get(format!("{base}/"))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_store_that_answers_later_is_awaited_before_the_call() {
    let store = Remote::default();
    let (base, _) = server(store.clone()).await;
    let c = support::client();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let res = get(&c, &base, "open-key").await;
        statuses.push(res.status());
        if res.status() == StatusCode::OK {
            assert!(res.headers().contains_key("ratelimit"));
            assert_eq!(res.text().await.unwrap(), "ok");
        } else {
            assert!(res.headers().contains_key("retry-after"));
        }
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert_eq!(store.calls.load(Ordering::Relaxed), 4);
}

#[tokio::test]
async fn a_failing_store_is_decided_by_each_plans_failure_mode() {
    let store = Remote::default();
    let (base, layer) = server(store.clone()).await;
    let c = support::client();
    store.down.store(true, Ordering::Relaxed);
    for _ in 0..5 {
        // Open: through, without rate-limit headers (nothing was decided).
        let res = get(&c, &base, "open-key").await;
        assert_eq!(res.status(), StatusCode::OK);
        assert!(!res.headers().contains_key("ratelimit"));
        // Closed, and Local without a local copy: 503 with a JSON body.
        for key in ["closed-key", "local-key"] {
            let res = get(&c, &base, key).await;
            assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{key}");
            assert_eq!(
                res.text().await.unwrap(),
                r#"{"message":"Service Unavailable"}"#
            );
        }
    }
    // gRPC callers get UNAVAILABLE, trailers-only.
    let res = c
        .post(format!("{base}/"))
        .header("x-api-key", "closed-key")
        .header("content-type", "application/grpc")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["grpc-status"], "14");
    assert_eq!(layer.store_failures(), 16);
    // Back up: decided again, nothing of the outage was charged.
    store.down.store(false, Ordering::Relaxed);
    assert!(
        get(&c, &base, "closed-key")
            .await
            .headers()
            .contains_key("ratelimit")
    );
    assert_eq!(layer.store_failures(), 16);
}

#[tokio::test]
async fn tokens_are_settled_through_the_store_unless_it_let_the_request_through_unchecked() {
    // Time stands still: the bucket refills nothing between requests.
    let store = Remote {
        inner: MemoryStore::builder()
            .clock(tollgate::ManualClock::new())
            .build()
            .unwrap(),
        ..Remote::default()
    };
    let plan = UsagePlan::new("llm")
        .tokens(TokenBudget::new().per_minute(1_000).unwrap())
        .failure(FailureMode::Open);
    let policy = Policy::builder()
        .plan(plan)
        .key(ApiKey::new("k", "llm-key", "llm"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy)
        .store(store.clone())
        .estimator(|_: &tollgate::extract::RequestView<'_>| 50)
        .build();
    let app = Router::new()
        .route(
            "/",
            routing::any(|| async {
                let mut res = axum::response::Response::new(axum::body::Body::from("ok"));
                res.extensions_mut().insert(UsedTokens(10));
                res
            }),
        )
        .layer(layer);
    let base = support::serve(app).await;
    let c = support::client();
    // 50 reserved, 10 used: 40 given back once the body has ended.
    let res = get(&c, &base, "llm-key").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["ratelimit"], "\"tokens-minute\";r=950;t=3");
    assert_eq!(res.text().await.unwrap(), "ok");
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while store.settled.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(*store.settled.lock().unwrap(), [-40]);
    let res = get(&c, &base, "llm-key").await;
    assert_eq!(res.headers()["ratelimit"], "\"tokens-minute\";r=940;t=4");
    let _ = res.text().await;
    // Store down, plan open: through, nothing reserved, nothing settled.
    store.down.store(true, Ordering::Relaxed);
    let res = get(&c, &base, "llm-key").await;
    assert_eq!(res.status(), StatusCode::OK);
    let _ = res.text().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        store.settled.lock().unwrap().len(),
        2,
        "only the two checked requests"
    );
}

/// Counts `tracing` events by level.
#[derive(Default)]
struct Events {
    warn: AtomicUsize,
    info: AtomicUsize,
}

impl tracing::Subscriber for Events {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        match *event.metadata().level() {
            tracing::Level::WARN => self.warn.fetch_add(1, Ordering::Relaxed),
            tracing::Level::INFO => self.info.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn failures_are_logged_once_per_burst_not_per_request() {
    let events = Arc::new(Events::default());
    let store = Remote::default();
    let layer = RateLimitLayer::builder(policy())
        .store(store.clone())
        .build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    tracing::subscriber::with_default(Arc::clone(&events), || {
        rt.block_on(async {
            for burst in 1..=2 {
                store.down.store(true, Ordering::Relaxed);
                for _ in 0..50 {
                    assert!(layer.decide(b"open-key", 0).await.is_ok());
                    assert!(layer.decide(b"closed-key", 0).await.is_err());
                }
                store.down.store(false, Ordering::Relaxed);
                for _ in 0..3 {
                    assert!(layer.decide(b"open-key", 0).await.is_ok());
                }
                assert_eq!(
                    events.warn.load(Ordering::Relaxed),
                    burst,
                    "one warning per burst"
                );
                assert_eq!(
                    events.info.load(Ordering::Relaxed),
                    burst,
                    "one recovery per burst"
                );
            }
            // A store failing in part (a cluster node down) is one burst, not
            // a warning and a recovery per flip.
            for _ in 0..10 {
                store.down.store(true, Ordering::Relaxed);
                assert!(layer.decide(b"open-key", 0).await.is_ok());
                store.down.store(false, Ordering::Relaxed);
                assert!(layer.decide(b"open-key", 0).await.is_ok());
            }
            assert_eq!(events.warn.load(Ordering::Relaxed), 3);
            assert_eq!(events.info.load(Ordering::Relaxed), 2);
            for _ in 0..3 {
                assert!(layer.decide(b"open-key", 0).await.is_ok());
            }
            assert_eq!(events.info.load(Ordering::Relaxed), 3);
        });
    });
    assert_eq!(layer.store_failures(), 210);
}

/// `decide` on the memory store decides before its future is polled: a
/// place it takes under a concurrency cap is given back when the future is
/// dropped first, never polled or the losing branch of a `select!`.
#[tokio::test]
async fn a_decide_future_dropped_before_it_is_polled_gives_its_place_back() {
    let layer = RateLimitLayer::new(Policy::per_key(UsagePlan::new("p").concurrency(1)).unwrap());
    drop(layer.decide(b"k", 1));
    assert!(layer.decide(b"k", 1).await.is_ok());
    for _ in 0..3 {
        tokio::select! {
            biased;
            () = std::future::ready(()) => {}
            _ = layer.decide(b"k", 1) => panic!("the ready branch comes first"),
        }
    }
    let standing = layer.standing(b"k").await.unwrap();
    let cap = standing
        .limits()
        .iter()
        .find(|l| l.name() == "concurrency")
        .expect("the cap's standing");
    assert_eq!(cap.remaining(), 1, "{standing:?}");
    assert!(layer.decide(b"k", 1).await.is_ok());
}
