//! Observers see every decision, served on loopback ports and driven by a real
//! HTTP client: plan, public key id, route, outcome and the limit that
//! decided, and never a key's value, whether the decision is made at once
//! (memory store), after waiting (a remote store), or by a store failure.
//! The ready observers write `tracing` events and `metrics` counters.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::Router;
use axum::routing::get;
use http::StatusCode;
use tollgate::extract::Bearer;
use tollgate::observe::{DecisionEvent, MetricsObserver, Observer, Outcome, TracingObserver};
use tollgate::store::{
    Acquire, Acquired, QuotaRef, Store, StoreError, StoreFuture, ThrottleRef, Verdict,
};
use tollgate::{
    ApiKey, Clock, Date, FailureMode, MemoryStore, Policy, RateLimitLayer, Reason, Resolution,
    ResolveError, Resolver, Throttle, UsagePlan,
};

use crate::support::{
    BURST, DISABLED_KEY, KEY, OTHER_KEY, client, frozen_store, per_key_policy, registered_policy,
    serve,
};

/// Every API key value and secret the tests send: none may reach an observer.
const SECRETS: [&str; 5] = [KEY, OTHER_KEY, DISABLED_KEY, "not-registered", BEARER];
const BEARER: &str = "sk-live-secret-token-123";

/// What an observer was told, copied out of the event.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    plan: Option<String>,
    key_id: Option<String>,
    route: Option<String>,
    matched: Option<String>,
    outcome: Outcome,
    limit: Option<&'static str>,
}

/// An observer that keeps every event (and each event's `Debug` print).
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Seen>>>,
    printed: Arc<Mutex<String>>,
}

impl Recorder {
    fn observer(&self) -> impl Observer {
        let this = self.clone();
        move |e: &DecisionEvent<'_>| {
            this.seen.lock().unwrap().push(Seen {
                plan: e.plan().map(str::to_owned),
                key_id: e.key_id().map(str::to_owned),
                route: e.route().map(str::to_owned),
                matched: e.matched_route().map(str::to_owned),
                outcome: e.outcome(),
                limit: e.limit(),
            });
            let mut printed = this.printed.lock().unwrap();
            printed.push_str(&format!("{e:?}\n"));
        }
    }

    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }

    /// Fails if any event, field or print, holds a secret.
    fn assert_no_secret(&self) {
        let printed = self.printed.lock().unwrap();
        assert!(!printed.is_empty());
        assert_no_secret_in(&printed);
    }
}

fn assert_no_secret_in(text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{secret:?} in {text}");
    }
}

fn seen(
    plan: Option<&str>,
    key_id: Option<&str>,
    route: &str,
    outcome: Outcome,
    limit: Option<&'static str>,
) -> Seen {
    Seen {
        plan: plan.map(str::to_owned),
        key_id: key_id.map(str::to_owned),
        route: Some(route.to_owned()),
        matched: Some(route.to_owned()),
        outcome,
        limit,
    }
}

async fn ok() -> &'static str {
    "ok"
}

fn router(layer: RateLimitLayer<impl tollgate::extract::KeyExtractor, impl Store>) -> Router {
    Router::new()
        .route("/v1/items/{id}", get(ok))
        .route("/health", get(ok))
        .layer(layer)
}

async fn send(c: &reqwest::Client, url: String, key: Option<&str>) -> reqwest::StatusCode {
    let mut req = c.get(url);
    if let Some(key) = key {
        req = req.header("x-api-key", key);
    }
    req.send().await.unwrap().status()
}

#[tokio::test]
async fn allowed_throttled_and_key_failures_are_seen_with_plan_key_id_and_route() {
    let recorder = Recorder::default();
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(registered_policy())
        .store(store)
        .observer(recorder.observer())
        .build();
    let base = serve(router(layer)).await;
    let c = client();
    let item = |id: u32| format!("{base}/v1/items/{id}");
    const ROUTE: &str = "/v1/items/{id}";

    for id in 0..BURST {
        assert_eq!(send(&c, item(id), Some(KEY)).await, 200);
    }
    let allowed = seen(Some("p"), Some("one"), ROUTE, Outcome::Allowed, None);
    assert_eq!(recorder.take(), vec![allowed; BURST as usize]);

    assert_eq!(send(&c, item(9), Some(KEY)).await, 429);
    let throttled = Outcome::Rejected(Reason::Limited);
    assert_eq!(
        recorder.take(),
        [seen(
            Some("p"),
            Some("one"),
            ROUTE,
            throttled,
            Some("throttle")
        )]
    );

    // Another key of the plan, on another route.
    assert_eq!(
        send(&c, format!("{base}/health"), Some(OTHER_KEY)).await,
        200
    );
    assert_eq!(
        recorder.take(),
        [seen(
            Some("p"),
            Some("two"),
            "/health",
            Outcome::Allowed,
            None
        )]
    );

    // Key failures: no plan and no key id, but for a disabled key, whose
    // plan and public id are known.
    assert_eq!(send(&c, item(1), Some("not-registered")).await, 403);
    assert_eq!(send(&c, item(2), None).await, 403);
    assert_eq!(send(&c, item(3), Some(DISABLED_KEY)).await, 403);
    assert_eq!(
        recorder.take(),
        [
            seen(
                None,
                None,
                ROUTE,
                Outcome::Rejected(Reason::UnknownKey),
                None
            ),
            seen(
                None,
                None,
                ROUTE,
                Outcome::Rejected(Reason::Key(tollgate::extract::KeyError::Missing)),
                None
            ),
            seen(
                Some("p"),
                Some("off"),
                ROUTE,
                Outcome::Rejected(Reason::DisabledKey),
                None
            ),
        ]
    );

    // No route matched (the router's fallback): the route is the path the
    // client sent, and there is no matched route.
    assert_eq!(
        send(&c, format!("{base}/made/up/path"), Some(OTHER_KEY)).await,
        404
    );
    let fallback = recorder.take();
    assert_eq!(fallback.len(), 1);
    assert_eq!(fallback[0].route.as_deref(), Some("/made/up/path"));
    assert_eq!(fallback[0].matched, None);
    assert_eq!(fallback[0].outcome, Outcome::Allowed);

    recorder.assert_no_secret();
}

#[tokio::test]
async fn per_key_subjects_are_never_named() {
    let recorder = Recorder::default();
    let layer = RateLimitLayer::builder(per_key_policy())
        .extractor(Bearer::new())
        .observer(recorder.observer())
        .build();
    let base = serve(router(layer.clone())).await;
    let c = client();
    for _ in 0..=BURST {
        c.get(format!("{base}/v1/items/1"))
            .bearer_auth(BEARER)
            .send()
            .await
            .unwrap();
    }
    let events = recorder.take();
    assert_eq!(events.len(), BURST as usize + 1);
    assert!(events.iter().all(|e| e.plan.as_deref() == Some("p")));
    assert!(events.iter().all(|e| e.key_id.is_none()));
    assert_eq!(events[BURST as usize].limit, Some("throttle"));

    // A decision without a request has no route.
    assert!(layer.check(BEARER.as_bytes(), 1).is_err());
    let checked = recorder.take();
    assert_eq!(
        checked,
        [Seen {
            plan: Some("p".into()),
            key_id: None,
            route: None,
            matched: None,
            outcome: Outcome::Rejected(Reason::Limited),
            limit: Some("throttle"),
        }]
    );
    recorder.assert_no_secret();
}

/// A memory store whose answers wait (a remote store's round trip), or that
/// fails at once or after waiting.
#[derive(Clone, Debug, Default)]
struct Remote {
    inner: MemoryStore,
    mode: Arc<AtomicU8>,
}

const UP: u8 = 0;
const FAILS_AT_ONCE: u8 = 1;
const FAILS_LATER: u8 = 2;

type Pending = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Verdict, StoreError>> + Send + 'static>,
>;

impl Store for Remote {
    type Future = Pending;

    fn clock(&self) -> &Clock {
        self.inner.clock()
    }

    fn acquire(&self, request: &Acquire<'_>) -> Acquired<Pending> {
        let decided = match self.mode.load(Ordering::Relaxed) {
            FAILS_AT_ONCE => return Acquired::Ready(Err(StoreError::new("down"))),
            FAILS_LATER => Err(StoreError::new("down")),
            UP => match self.inner.acquire(request) {
                Acquired::Ready(r) => r,
                Acquired::Pending(_) => unreachable!("the memory store answers at once"),
            },
            mode => unreachable!("no mode {mode}"),
        };
        Acquired::Pending(Box::pin(async move {
            tokio::task::yield_now().await;
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
}

#[tokio::test]
async fn waited_decisions_and_store_failures_are_seen() {
    let policy = Policy::builder()
        .plan(
            UsagePlan::new("open")
                .throttle(Throttle::new(1.0, 1).unwrap())
                .failure(FailureMode::Open),
        )
        .plan(
            UsagePlan::new("closed")
                .throttle(Throttle::new(1.0, 1).unwrap())
                .failure(FailureMode::Closed),
        )
        .key(ApiKey::new("one", KEY, "open"))
        .key(ApiKey::new("two", OTHER_KEY, "closed"))
        .build()
        .unwrap();
    let recorder = Recorder::default();
    let store = Remote::default();
    let layer = RateLimitLayer::builder(policy)
        .store(store.clone())
        .observer(recorder.observer())
        .build();
    let base = serve(router(layer.clone())).await;
    let c = client();
    let url = format!("{base}/v1/items/1");
    const ROUTE: &str = "/v1/items/{id}";

    // Answers after waiting: the plan and key id travel with the request.
    assert_eq!(send(&c, url.clone(), Some(KEY)).await, 200);
    assert_eq!(send(&c, url.clone(), Some(KEY)).await, 429);
    assert_eq!(
        recorder.take(),
        [
            seen(Some("open"), Some("one"), ROUTE, Outcome::Allowed, None),
            seen(
                Some("open"),
                Some("one"),
                ROUTE,
                Outcome::Rejected(Reason::Limited),
                Some("throttle")
            ),
        ]
    );

    for mode in [FAILS_AT_ONCE, FAILS_LATER] {
        store.mode.store(mode, Ordering::Relaxed);
        assert_eq!(send(&c, url.clone(), Some(KEY)).await, 200);
        assert_eq!(send(&c, url.clone(), Some(OTHER_KEY)).await, 503);
        assert_eq!(
            recorder.take(),
            [
                seen(
                    Some("open"),
                    Some("one"),
                    ROUTE,
                    Outcome::StoreFailed(FailureMode::Open),
                    None
                ),
                seen(
                    Some("closed"),
                    Some("two"),
                    ROUTE,
                    Outcome::StoreFailed(FailureMode::Closed),
                    None
                ),
            ],
            "mode {mode}"
        );
    }

    // `decide`, without a request: seen with no route.
    store.mode.store(FAILS_LATER, Ordering::Relaxed);
    assert!(layer.decide(OTHER_KEY.as_bytes(), 1).await.is_err());
    let decided = recorder.take();
    assert_eq!(decided.len(), 1);
    assert_eq!(decided[0].key_id.as_deref(), Some("two"));
    assert_eq!(decided[0].route, None);
    assert_eq!(
        decided[0].outcome,
        Outcome::StoreFailed(FailureMode::Closed)
    );

    // Back up: decided by the store again.
    store.mode.store(UP, Ordering::Relaxed);
    assert_eq!(send(&c, url.clone(), Some(OTHER_KEY)).await, 200);
    assert_eq!(
        recorder.take(),
        [seen(
            Some("closed"),
            Some("two"),
            ROUTE,
            Outcome::Allowed,
            None
        )]
    );
    recorder.assert_no_secret();
}

/// A `metrics` recorder that keeps every counter by name and labels.
#[derive(Default)]
struct Counters {
    counters: Mutex<HashMap<metrics::Key, Arc<Count>>>,
}

struct Count(AtomicU64);

impl metrics::CounterFn for Count {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

impl metrics::Recorder for Counters {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let mut counters = self.counters.lock().unwrap();
        let count = counters
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Count(AtomicU64::new(0))));
        metrics::Counter::from_arc(Arc::clone(count))
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

impl Counters {
    /// Every counter as (name, sorted labels) → value.
    fn snapshot(&self) -> HashMap<(String, Vec<(String, String)>), u64> {
        let counters = self.counters.lock().unwrap();
        counters
            .iter()
            .map(|(k, v)| {
                let mut labels: Vec<_> = k
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                labels.sort();
                ((k.name().to_owned(), labels), v.0.load(Ordering::Relaxed))
            })
            .collect()
    }
}

/// The process-wide recorder (only this test reads it).
fn counters() -> &'static Counters {
    static COUNTERS: OnceLock<&'static Counters> = OnceLock::new();
    COUNTERS.get_or_init(|| {
        let counters: &'static Counters = Box::leak(Box::default());
        metrics::set_global_recorder(counters).expect("no other recorder in this test binary");
        counters
    })
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<_> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn metrics_count_decisions_by_plan_route_outcome_and_limit_never_by_key() {
    let counters = counters();
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(registered_policy())
        .store(store)
        .observer(MetricsObserver::new())
        .build();
    let base = serve(router(layer)).await;
    let c = client();
    for id in 0..=BURST {
        send(&c, format!("{base}/v1/items/{id}"), Some(KEY)).await;
    }
    send(&c, format!("{base}/v1/items/1"), Some("not-registered")).await;
    send(&c, format!("{base}/made/up/{KEY}"), Some(OTHER_KEY)).await;

    let got = counters.snapshot();
    let count = |pairs: &[(&str, &str)]| {
        got.get(&("tollgate_decisions_total".to_owned(), labels(pairs)))
            .copied()
    };
    let item = |outcome, reason, limit| {
        count(&[
            ("plan", "p"),
            ("route", "/v1/items/{id}"),
            ("outcome", outcome),
            ("reason", reason),
            ("limit", limit),
        ])
    };
    assert_eq!(item("allowed", "", ""), Some(u64::from(BURST)), "{got:#?}");
    assert_eq!(item("rejected", "limited", "throttle"), Some(1), "{got:#?}");
    let unknown = count(&[
        ("plan", ""),
        ("route", "/v1/items/{id}"),
        ("outcome", "rejected"),
        ("reason", "unknown_key"),
        ("limit", ""),
    ]);
    assert_eq!(unknown, Some(1), "{got:#?}");
    // A path no route matched is counted without it: clients choose paths.
    let unmatched = count(&[
        ("plan", "p"),
        ("route", ""),
        ("outcome", "allowed"),
        ("reason", ""),
        ("limit", ""),
    ]);
    assert_eq!(unmatched, Some(1), "{got:#?}");
    assert_eq!(got.values().sum::<u64>(), u64::from(BURST) + 3, "{got:#?}");

    let printed = format!("{got:?}");
    assert_no_secret_in(&printed);
    assert!(!printed.contains("key_id"), "{printed}");
    // And without the route label: one series per plan, outcome, reason and limit.
    let layer = RateLimitLayer::builder(
        Policy::per_key(UsagePlan::new("jobs").throttle(Throttle::new(1.0, 1).unwrap())).unwrap(),
    )
    .observer(MetricsObserver::new().route_label(false))
    .build();
    assert!(layer.check(BEARER.as_bytes(), 1).is_ok());
    let jobs = counters.snapshot();
    let allowed = labels(&[
        ("plan", "jobs"),
        ("outcome", "allowed"),
        ("reason", ""),
        ("limit", ""),
    ]);
    assert_eq!(
        jobs.get(&("tollgate_decisions_total".to_owned(), allowed)),
        Some(&1),
        "{jobs:#?}"
    );
    assert_no_secret_in(&format!("{jobs:?}"));
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

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
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

// The default flavour runs the server's tasks on this thread, where the
// subscriber is set.
#[tokio::test(flavor = "current_thread")]
async fn tracing_events_name_plan_key_id_route_and_outcome_never_the_key() {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(registered_policy())
        .store(store)
        .observer(TracingObserver::new())
        .build();
    let base = serve(router(layer)).await;
    let c = client();
    for id in 0..=BURST {
        send(&c, format!("{base}/v1/items/{id}"), Some(KEY)).await;
    }
    assert_eq!(
        send(&c, format!("{base}/v1/items/1"), Some("not-registered")).await,
        StatusCode::FORBIDDEN
    );

    let text = buffer.text();
    let decisions: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("tollgate::decision"))
        .collect();
    assert_eq!(decisions.len(), BURST as usize + 2, "{text}");
    let allowed = decisions[0];
    assert!(allowed.contains("DEBUG"), "{allowed}");
    for field in [
        r#"plan="p""#,
        r#"key_id="one""#,
        r#"route="/v1/items/{id}""#,
        r#"method="GET""#,
        r#"outcome="allowed""#,
    ] {
        assert!(allowed.contains(field), "{field} not in {allowed}");
    }
    assert!(!allowed.contains("limit="), "{allowed}");
    let throttled = decisions[BURST as usize];
    assert!(throttled.contains(" INFO "), "{throttled}");
    for field in [
        r#"outcome="rejected""#,
        r#"reason="limited""#,
        r#"limit="throttle""#,
    ] {
        assert!(throttled.contains(field), "{field} not in {throttled}");
    }
    let unknown = decisions[BURST as usize + 1];
    assert!(unknown.contains(r#"reason="unknown_key""#), "{unknown}");
    assert!(!unknown.contains("plan="), "{unknown}");
    assert!(!unknown.contains("key_id="), "{unknown}");
    assert_no_secret_in(&text);
}

/// A shadow plan never rejects, but what it would have rejected is what it
/// is for: the observer (and so the decision metrics) sees each such request
/// as [`Outcome::ShadowRejected`], naming the limit, on every store; the
/// client gets its answer all the same.
async fn a_shadow_plans_would_be_rejections_are_seen<B: crate::support::backend::Backend>(b: &B) {
    use tower::{Service, ServiceExt};
    let clock = tollgate::ManualClock::new();
    clock.set_wall(crate::support::at(2024, 5, 6, 3_600));
    let plans = [
        UsagePlan::new("t").throttle(Throttle::new(1.0, 1).unwrap()),
        UsagePlan::new("q").quota(tollgate::Quota::new(1, tollgate::Period::Day).unwrap()),
        UsagePlan::new("c").concurrency(1),
    ];
    let mut policy = Policy::builder().clock(clock.clone());
    for plan in plans {
        let name = plan.name().to_owned();
        policy = policy
            .plan(plan.shadow(true))
            .key(ApiKey::new(name.clone(), name.clone(), name));
    }
    let recorder = Recorder::default();
    let layer = RateLimitLayer::builder(policy.build().unwrap())
        .store(b.store(&clock).await)
        .observer(recorder.observer())
        .build();
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service_fn(|_| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("held")))
        });
    let mut send = async |key: &str| {
        let req = http::Request::builder()
            .header("x-api-key", key)
            .body(String::new())
            .unwrap();
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(res.status(), 200, "a shadow plan never rejects");
        res
    };
    let outcomes = |r: &Recorder| {
        r.take()
            .into_iter()
            .map(|s| (s.plan.unwrap(), s.outcome, s.limit))
            .collect::<Vec<_>>()
    };
    let allowed = |p: &str| (p.to_owned(), Outcome::Allowed, None);
    let over =
        |p: &str, reason, limit| (p.to_owned(), Outcome::ShadowRejected(reason), Some(limit));
    for key in ["t", "q"] {
        drop(send(key).await);
        drop(send(key).await);
    }
    let held = send("c").await;
    drop(send("c").await);
    assert_eq!(
        outcomes(&recorder),
        [
            allowed("t"),
            over("t", Reason::Limited, "throttle"),
            allowed("q"),
            over("q", Reason::QuotaExceeded, "quota"),
            allowed("c"),
            over("c", Reason::ConcurrencyLimited, "concurrency"),
        ]
    );
    assert!(Outcome::ShadowRejected(Reason::Limited).is_allowed());
    assert_eq!(
        Outcome::ShadowRejected(Reason::Limited).as_str(),
        "shadow_rejected"
    );
    // Once the place is back, the cap has room again (a remote store is
    // given it back in the background).
    drop(held);
    let mut freed = false;
    for _ in 0..200 {
        drop(send("c").await);
        if outcomes(&recorder) == [allowed("c")] {
            freed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(freed, "the shadow cap's place came back");
}

mod shadow {
    use super::a_shadow_plans_would_be_rejections_are_seen as seen;
    use crate::support::backend::{Memory, Redis};
    use crate::support::redis::require_redis;

    #[tokio::test]
    async fn on_the_memory_store() {
        seen(&Memory).await;
    }

    #[tokio::test]
    async fn on_redis() {
        if require_redis() {
            seen(&Redis::single("shadow-seen")).await;
        }
    }

    #[tokio::test]
    async fn on_a_redis_cluster() {
        if require_redis() {
            seen(&Redis::cluster("shadow-seen")).await;
        }
    }
}

/// `check` (the memory store's direct decision) tells the observer of a
/// shadow plan's would-be rejections as a request through the layer does.
#[tokio::test]
async fn a_shadow_plans_would_be_rejections_are_seen_through_check() {
    let clock = tollgate::ManualClock::new();
    clock.set_wall(crate::support::at(2024, 5, 6, 3_600));
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(
            UsagePlan::new("t")
                .throttle(Throttle::new(1.0, 1).unwrap())
                .shadow(true),
        )
        .plan(
            UsagePlan::new("q")
                .quota(tollgate::Quota::new(1, tollgate::Period::Day).unwrap())
                .shadow(true),
        )
        .key(ApiKey::new("t", "t", "t"))
        .key(ApiKey::new("q", "q", "q"))
        .build()
        .unwrap();
    let recorder = Recorder::default();
    let layer = RateLimitLayer::builder(policy)
        .store(MemoryStore::builder().clock(clock).build().unwrap())
        .observer(recorder.observer())
        .build();
    for key in [b"t", b"q"] {
        assert!(layer.check(key, 1).is_ok());
        assert!(layer.check(key, 1).is_ok(), "a shadow plan never rejects");
    }
    let seen: Vec<_> = recorder
        .take()
        .into_iter()
        .map(|s| (s.plan.unwrap(), s.outcome, s.limit))
        .collect();
    let plan = |p: &str| p.to_owned();
    assert_eq!(
        seen,
        [
            (plan("t"), Outcome::Allowed, None),
            (
                plan("t"),
                Outcome::ShadowRejected(Reason::Limited),
                Some("throttle")
            ),
            (plan("q"), Outcome::Allowed, None),
            (
                plan("q"),
                Outcome::ShadowRejected(Reason::QuotaExceeded),
                Some("quota")
            ),
        ]
    );
}

/// An observer that counts the decisions it is told of.
fn counting() -> (Arc<AtomicU64>, impl Observer) {
    let count = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&count);
    (count, move |_: &DecisionEvent<'_>| {
        seen.fetch_add(1, Ordering::SeqCst);
    })
}

/// A peek (a decision of cost 0 without a request: a standing, a
/// `decide` or `check` of cost 0) decides nothing, so no observer is told
/// of it, not even when its key is refused: unknown, disabled, or answered
/// unknown by the resolver. A request with the same keys is told.
#[tokio::test]
async fn a_peek_at_a_refused_key_is_never_seen() {
    let (count, observer) = counting();
    let layer = RateLimitLayer::builder(registered_policy())
        .store(frozen_store().1)
        .observer(observer)
        .build();
    for key in [b"not-registered".as_slice(), DISABLED_KEY.as_bytes()] {
        assert!(layer.standing(key).await.is_err());
        assert!(layer.decide(key, 0).await.is_err());
        assert!(layer.check(key, 0).is_err());
    }
    let req = |key: &str| {
        http::Request::builder()
            .header("x-api-key", key)
            .body(())
            .unwrap()
    };
    assert!(layer.standing_of(&req("not-registered")).await.is_err());
    assert!(layer.standing_of(&req(DISABLED_KEY)).await.is_err());
    assert_eq!(count.load(Ordering::SeqCst), 0, "a peek is no decision");
    assert!(layer.decide(b"not-registered", 1).await.is_err());
    assert!(layer.check(DISABLED_KEY.as_bytes(), 1).is_err());
    assert_eq!(count.load(Ordering::SeqCst), 2, "a request is a decision");

    // Keys the resolver answers unknown, or cannot answer.
    let (count, observer) = counting();
    let resolver = |value: String| async move {
        match value.as_str() {
            "broken" => Err(ResolveError::new(io::Error::other("database down"))),
            _ => Ok(Resolution::Unknown),
        }
    };
    let layer = RateLimitLayer::builder(registered_policy())
        .store(frozen_store().1)
        .resolver(Resolver::new(resolver))
        .observer(observer)
        .build();
    for key in [b"nobody".as_slice(), b"broken"] {
        assert!(layer.standing(key).await.is_err());
        // Answered from the resolver's cache now.
        assert!(layer.standing(key).await.is_err());
        assert!(layer.decide(key, 0).await.is_err());
    }
    assert!(layer.standing(&[0xff, 0xfe]).await.is_err(), "malformed");
    assert_eq!(count.load(Ordering::SeqCst), 0, "a peek is no decision");
    assert!(layer.decide(b"nobody", 1).await.is_err());
    assert_eq!(count.load(Ordering::SeqCst), 1, "a request is a decision");
}
