//! API key values never leave the process, wherever one might look: every
//! test here sends a set of distinctive secrets (registered, disabled,
//! unknown, malformed, added at run time, per-key bearer tokens, the admin
//! key) through every kind of answer, then greps everything that could hold
//! one for each secret, its hex and its base64:
//!
//! - responses, status, headers and bodies: allowed, throttled, quota
//!   exceeded, concurrency and token-budget refusals, unknown, disabled,
//!   missing and malformed keys, gRPC rejections (their
//!   `grpc-status-details-bin` decoded), and the admin answers;
//! - logs: every `tracing` event at every level, captured by a subscriber
//!   that writes to a buffer (the decision events, and the store's failure
//!   and recovery warnings);
//! - metrics: every counter, gauge and histogram the `MetricsObserver`
//!   registers, with its labels, through a recording `metrics` recorder;
//! - `Debug` and `Display` of the public types that hold or see keys: layer,
//!   service, policy and its builder, config, `ApiKey`, `Admin` and what it
//!   answers, `Key`, `RequestView`, `Rejection`, what a store is asked and
//!   answers (`Acquire`, `Report`, `Denied`, `Settlement`, `Permit`), and
//!   the errors;
//! - Redis: every key name and every value, and every command the stores
//!   sent (`MONITOR`), with the gateway process and an in-process
//!   per-key layer on a real `redis-server`, and the server's own output.
//!
//! `tests/layer/observe.rs` already checks the observer's events and the tracing
//! and metrics observers for allowed, throttled and unknown-key decisions;
//! this file covers the other surfaces and outcomes.

use std::io::{self, BufRead, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use base64::Engine as _;
use serde_json::{Value, json};
use tollgate::config::Config;
use tollgate::extract::{ApiKeyHeader, Bearer, Key, KeyExtractor, RequestView};
use tollgate::observe::{DecisionEvent, MetricsObserver, Observer, TracingObserver};
use tollgate::store::{
    Acquire, Acquired, Permit, QuotaRef, Settlement, Store, StoreFuture, ThrottleRef,
};
use tollgate::{
    ApiKey, Clock, Date, HeaderStyle, ManualClock, MemoryStore, Policy, RateLimitLayer, RedisStore,
    Rejection, Throttle, TokenBudget, UsagePlan, UsedTokens,
};

use crate::support;
use crate::support::redis::{RedisServer, command, require_redis};
use crate::support::server::ServerProcess;

// ---------------------------------------------------------------------------
// The secrets, and the grep
// ---------------------------------------------------------------------------

/// A registered, enabled key.
const KEY: &str = "lk-7f3a9c1e-alpha";
/// A registered key that is disabled.
const DISABLED: &str = "lk-5b2d8e40-disabled";
/// A registered key of a plan with a quota of one request a day.
const QUOTA_KEY: &str = "lk-a2c4e6f8-quota";
/// A key nobody registered.
const UNKNOWN: &str = "lk-0c9e4a71-unknown";
/// A key added through the admin handle or route while serving.
const ADDED: &str = "lk-e81f6d23-added";
/// A bearer token limited as a per-key subject (its own bucket, not registered).
const BEARER: &str = "lk-93ab15c7-bearer";
/// The admin key of the gateway.
const ADMIN: &str = "lk-4d6f0b98-admin";

const SECRETS: [&str; 7] = [KEY, DISABLED, QUOTA_KEY, UNKNOWN, ADDED, BEARER, ADMIN];

/// What must never appear: each secret, its distinctive middle (a secret cut
/// short), its hex and its base64 (with and without padding).
fn needles() -> &'static [String] {
    static NEEDLES: OnceLock<Vec<String>> = OnceLock::new();
    NEEDLES.get_or_init(|| {
        let mut needles = Vec::new();
        for secret in SECRETS {
            needles.push(secret.to_owned());
            needles.push(secret[3..11].to_owned());
            needles.push(secret.bytes().map(|b| format!("{b:02x}")).collect());
            needles.push(base64::engine::general_purpose::STANDARD.encode(secret));
            needles.push(base64::engine::general_purpose::STANDARD_NO_PAD.encode(secret));
        }
        needles
    })
}

/// Fails if `text` (from `surface`) holds a secret in any form; `text` must
/// not be empty, so that a surface that captured nothing does not pass.
fn assert_clean(surface: &str, text: &str) {
    assert!(!text.trim().is_empty(), "{surface}: nothing was captured");
    let lower = text.to_ascii_lowercase();
    for needle in needles() {
        if let Some(at) = lower.find(&needle.to_ascii_lowercase()) {
            let from = lower[..at]
                .char_indices()
                .rev()
                .nth(300)
                .map_or(0, |(i, _)| i);
            let to = (at + needle.len() + 300).min(text.len());
            let to = (to..=text.len())
                .find(|&i| text.is_char_boundary(i))
                .unwrap();
            panic!("{surface} holds {needle:?}: …{}…", &text[from..to]);
        }
    }
}

/// Everything a client sees of a response, with a gRPC status's details
/// decoded.
async fn seen(res: reqwest::Response) -> (u16, String) {
    let status = res.status().as_u16();
    let mut text = format!("{status}\n");
    for (name, value) in res.headers() {
        text.push_str(&format!(
            "{name}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
        if name == "grpc-status-details-bin" {
            let decoded = base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(value.as_bytes())
                .expect("base64 details");
            text.push_str(&format!("details: {}\n", String::from_utf8_lossy(&decoded)));
        }
    }
    text.push_str(&String::from_utf8_lossy(&res.bytes().await.unwrap()));
    text.push('\n');
    (status, text)
}

/// Everything the client saw, response after response.
#[derive(Default)]
struct Answers(String);

impl Answers {
    /// Keeps a response, which must have status `want`.
    fn expect(&mut self, (status, text): (u16, String), want: u16, what: &str) {
        assert_eq!(status, want, "{what}:\n{text}");
        self.0.push_str(&text);
    }

    /// Sends `req` and keeps its response, which must have status `want`.
    async fn send(&mut self, req: reqwest::RequestBuilder, want: u16, what: &str) {
        let res = req.send().await.unwrap();
        self.expect(seen(res).await, want, what);
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// `req` with `key` as its `x-api-key`, if any.
fn with_key(req: reqwest::RequestBuilder, key: Option<&str>) -> reqwest::RequestBuilder {
    match key {
        Some(k) => req.header("x-api-key", k),
        None => req,
    }
}

fn today() -> Date {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    Date::from_days((secs / 86_400) as i64)
}

// ---------------------------------------------------------------------------
// Logs and metrics of the whole test binary
// ---------------------------------------------------------------------------

/// Everything every `tracing` event of this test binary wrote, at every level.
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs: &'static Mutex<Vec<u8>> = Box::leak(Box::default());
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || LogWriter(logs))
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other subscriber in this test binary");
        logs
    })
}

struct LogWriter(&'static Mutex<Vec<u8>>);

impl io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

/// A `metrics` recorder that writes down every metric registered or
/// described, with its labels and description.
#[derive(Default)]
struct MetricsLog(Mutex<String>);

impl MetricsLog {
    fn note(&self, what: String) {
        let mut log = self.0.lock().unwrap();
        log.push_str(&what);
        log.push('\n');
    }
}

impl metrics::Recorder for MetricsLog {
    fn describe_counter(
        &self,
        k: metrics::KeyName,
        u: Option<metrics::Unit>,
        d: metrics::SharedString,
    ) {
        self.note(format!("describe counter {k:?} {u:?} {d:?}"));
    }
    fn describe_gauge(
        &self,
        k: metrics::KeyName,
        u: Option<metrics::Unit>,
        d: metrics::SharedString,
    ) {
        self.note(format!("describe gauge {k:?} {u:?} {d:?}"));
    }
    fn describe_histogram(
        &self,
        k: metrics::KeyName,
        u: Option<metrics::Unit>,
        d: metrics::SharedString,
    ) {
        self.note(format!("describe histogram {k:?} {u:?} {d:?}"));
    }
    fn register_counter(&self, key: &metrics::Key, m: &metrics::Metadata<'_>) -> metrics::Counter {
        self.note(format!("counter {key:?} {m:?}"));
        metrics::Counter::noop()
    }
    fn register_gauge(&self, key: &metrics::Key, m: &metrics::Metadata<'_>) -> metrics::Gauge {
        self.note(format!("gauge {key:?} {m:?}"));
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        key: &metrics::Key,
        m: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        self.note(format!("histogram {key:?} {m:?}"));
        metrics::Histogram::noop()
    }
}

fn metrics_log() -> &'static MetricsLog {
    static METRICS: OnceLock<&'static MetricsLog> = OnceLock::new();
    METRICS.get_or_init(|| {
        let log: &'static MetricsLog = Box::leak(Box::default());
        metrics::set_global_recorder(log).expect("no other recorder in this test binary");
        log
    })
}

/// The tracing and metrics observers together, and each event's `Debug`.
fn observer(printed: Arc<Mutex<String>>) -> impl Observer {
    let _ = (logs(), metrics_log());
    let tracing = TracingObserver::new();
    let metrics = MetricsObserver::new();
    move |e: &DecisionEvent<'_>| {
        tracing.on_decision(e);
        metrics.on_decision(e);
        printed
            .lock()
            .unwrap()
            .push_str(&format!("{e:?} {}\n", e.outcome()));
    }
}

// ---------------------------------------------------------------------------
// A store that writes down what it is asked and what it answers
// ---------------------------------------------------------------------------

/// Delegates to `inner` and keeps the `Debug` of every request, answer,
/// settlement and permit that passes through.
#[derive(Clone)]
struct Recording<S> {
    inner: S,
    log: Arc<Mutex<String>>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Recording<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recording")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> Recording<S> {
    fn note(&self, what: String) {
        let mut log = self.log.lock().unwrap();
        log.push_str(&what);
        log.push('\n');
    }
}

impl<S: Store> Store for Recording<S>
where
    S::Future: std::fmt::Debug,
{
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<tollgate::store::Verdict, tollgate::store::StoreError>,
                > + Send,
        >,
    >;

    fn clock(&self) -> &Clock {
        self.inner.clock()
    }

    fn acquire(&self, request: &Acquire<'_>) -> Acquired<Self::Future> {
        self.note(format!("acquire {request:?}"));
        for t in request.throttles() {
            self.note(format!("throttle {t:?}"));
        }
        for q in request.quotas() {
            self.note(format!("quota {q:?}"));
        }
        match self.inner.acquire(request) {
            Acquired::Ready(answer) => {
                self.note(format!("answer {answer:?}"));
                if let Ok(Ok(report)) = &answer {
                    for item in report.items() {
                        self.note(format!("applied {item:?}"));
                    }
                }
                Acquired::Ready(answer)
            }
            Acquired::Pending(f) => {
                let log = Arc::clone(&self.log);
                Acquired::Pending(Box::pin(async move {
                    let answer = f.await;
                    log.lock()
                        .unwrap()
                        .push_str(&format!("answer later {answer:?}\n"));
                    answer
                }))
            }
        }
    }

    fn usage(&self, q: &QuotaRef<'_>, first: Date, last: Date) -> StoreFuture<Vec<[i64; 2]>> {
        self.note(format!("usage {q:?} {first} {last}"));
        self.inner.usage(q, first, last)
    }

    fn set_remaining(&self, q: &QuotaRef<'_>, remaining: u64) -> StoreFuture<u64> {
        self.note(format!("set_remaining {q:?} {remaining}"));
        self.inner.set_remaining(q, remaining)
    }

    fn reset(&self, t: &[ThrottleRef<'_>], q: Option<&QuotaRef<'_>>) -> StoreFuture<()> {
        self.note(format!("reset {t:?} {q:?}"));
        self.inner.reset(t, q)
    }

    fn release(&self, permit: Permit) {
        self.note(format!("release {permit:?}"));
        self.inner.release(permit)
    }

    fn settle(&self, settlement: &Settlement<'_>) {
        self.note(format!("settle {settlement:?}"));
        self.inner.settle(settlement)
    }

    fn rescale(&self, old: &ThrottleRef<'_>, new: &ThrottleRef<'_>) {
        self.note(format!("rescale {old:?} {new:?}"));
        self.inner.rescale(old, new)
    }
}

// ---------------------------------------------------------------------------
// In process, with the memory store
// ---------------------------------------------------------------------------

fn config_toml() -> String {
    with_keys(
        r#"
[[plans]]
name = "metered"
throttle = { rate = 1.0, burst = 3 }
quota = { limit = 1000, period = "DAY" }
tokens = { per_minute = 100 }
concurrency = 1
[plans.methods]
"/v1/completions/POST" = { rate = 1.0, burst = 3 }
"#,
        "",
    )
}

/// A config of the plan `metered` (TOML, first), a plan `small` of one
/// request a day, the registered keys, a stage throttle, `extra` tables and
/// the admin key.
fn with_keys(metered: &str, extra: &str) -> String {
    format!(
        r#"{metered}
[[plans]]
name = "small"
throttle = {{ rate = 100.0, burst = 100 }}
quota = {{ limit = 1, period = "DAY" }}

[[keys]]
id = "alpha"
value = "{KEY}"
plan = "metered"

[[keys]]
id = "off"
value = "{DISABLED}"
plan = "metered"
enabled = false

[[keys]]
id = "quota"
value = "{QUOTA_KEY}"
plan = "small"

[stage]
throttle = {{ rate = 1000.0, burst = 1000 }}
{extra}
[admin]
key = "{ADMIN}"
"#
    )
}

/// A per-key layer on `store` for bearer tokens (the subject is the secret
/// itself): one request a second in bursts of 2, 50 tokens a minute, failing open, and
/// `concurrency` in flight if given; its events go to `printed`.
fn bearer_layer<S: tollgate::store::Store>(
    store: S,
    concurrency: Option<u32>,
    printed: &Arc<Mutex<String>>,
) -> RateLimitLayer<Bearer, S> {
    let mut plan = UsagePlan::new("open")
        .throttle(Throttle::new(1.0, 2).unwrap())
        .tokens(TokenBudget::new().per_minute(50).unwrap())
        .failure(tollgate::FailureMode::Open);
    if let Some(n) = concurrency {
        plan = plan.concurrency(n);
    }
    RateLimitLayer::builder(Policy::per_key(plan).unwrap())
        .extractor(Bearer::new())
        .store(store)
        .estimator(estimate)
        .observer(observer(Arc::clone(printed)))
        .build()
}

/// Keeps the `Debug` and `Display` of the `Rejection` of every response.
async fn keep_rejection(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    if let Some(r) = res.extensions().get::<Rejection>() {
        rejections()
            .lock()
            .unwrap()
            .push_str(&format!("{r:?} {r}\n"));
    }
    res
}

/// The estimate: an `x-estimate` header, else 10 tokens.
fn estimate(req: &RequestView<'_>) -> u32 {
    req.headers
        .get("x-estimate")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_responses_logs_metrics_and_debug_hold_no_key() {
    let printed = Arc::new(Mutex::new(String::new()));
    let store_log = Arc::new(Mutex::new(String::new()));
    let clock = ManualClock::new();
    // Today, for the usage report.
    clock.set_wall(SystemTime::now());
    let config = Config::from_toml(&config_toml()).unwrap();
    let store = Recording {
        inner: MemoryStore::builder().clock(clock.clone()).build().unwrap(),
        log: Arc::clone(&store_log),
    };
    let layer = RateLimitLayer::builder(config.policy_with_clock(clock.clone()).unwrap())
        .store(store.clone())
        .headers(HeaderStyle::ietf().x_ratelimit(true).openai(true))
        .estimator(estimate)
        .observer(observer(Arc::clone(&printed)))
        .build();
    let per_key = bearer_layer(store.clone(), None, &printed);

    // A stream the test ends, to hold the key's one place in flight.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, io::Error>>(4);
    let held = Arc::new(Mutex::new(Some(rx)));
    let stream = move || {
        let rx = held.lock().unwrap().take();
        async move {
            let rx = rx.expect("one stream");
            Response::new(Body::from_stream(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
        }
    };
    let completion = || async {
        let mut res = Response::new(Body::from("{\"usage\":{\"total_tokens\":4}}"));
        res.extensions_mut().insert(UsedTokens(4));
        res
    };
    let app = Router::new()
        .route("/v1/completions", post(completion))
        .route("/v1/stream", get(stream))
        .layer(layer.clone())
        .merge(
            Router::new()
                .route("/open", post(completion))
                .layer(per_key.clone()),
        )
        .layer(middleware::from_fn(keep_rejection));
    let base = support::serve(app).await;
    let http = client();
    let post = |path: &str, key: Option<&str>| with_key(http.post(format!("{base}{path}")), key);
    let mut answers = Answers::default();

    // Allowed, with a token settlement (estimated 10, used 4).
    answers
        .send(post("/v1/completions", Some(KEY)), 200, "allowed")
        .await;
    // A stream holds the key's one place: the next request is refused.
    tx.send(Ok(Bytes::from_static(b"data: 1\n\n")))
        .await
        .unwrap();
    let mut open = http
        .get(format!("{base}/v1/stream"))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 200);
    assert!(open.chunk().await.unwrap().is_some());
    answers
        .send(post("/v1/completions", Some(KEY)), 429, "concurrency")
        .await;
    drop(tx);
    while open.chunk().await.unwrap().is_some() {}
    // More tokens than the whole budget.
    let big = post("/v1/completions", Some(KEY)).header("x-estimate", "1000");
    answers.send(big, 429, "cost above the budget").await;
    // Throttled, over HTTP and gRPC.
    answers
        .send(post("/v1/completions", Some(KEY)), 200, "allowed")
        .await;
    answers
        .send(post("/v1/completions", Some(KEY)), 429, "throttled")
        .await;
    let grpc = post("/v1/completions", Some(KEY)).header("content-type", "application/grpc");
    answers.send(grpc, 200, "throttled, gRPC").await;
    // The quota of one a day.
    answers
        .send(post("/v1/completions", Some(QUOTA_KEY)), 200, "quota")
        .await;
    answers
        .send(
            post("/v1/completions", Some(QUOTA_KEY)),
            429,
            "quota exceeded",
        )
        .await;
    // Key failures, over HTTP and gRPC.
    answers
        .send(post("/v1/completions", Some(UNKNOWN)), 403, "unknown")
        .await;
    let grpc = post("/v1/completions", Some(UNKNOWN)).header("content-type", "application/grpc");
    answers.send(grpc, 200, "unknown, gRPC").await;
    answers
        .send(post("/v1/completions", Some(DISABLED)), 403, "disabled")
        .await;
    answers
        .send(post("/v1/completions", None), 403, "missing")
        .await;
    let malformed = format!("{UNKNOWN} {KEY}");
    answers
        .send(post("/v1/completions", Some(&malformed)), 403, "malformed")
        .await;
    let long = KEY.repeat(20);
    answers
        .send(post("/v1/completions", Some(&long)), 403, "too long")
        .await;
    // A per-key bearer token: allowed, throttled, over its token budget.
    let open_req = || http.post(format!("{base}/open")).bearer_auth(BEARER);
    answers.send(open_req(), 200, "per-key").await;
    answers
        .send(open_req().header("x-estimate", "60"), 429, "per-key cost")
        .await;
    answers.send(open_req(), 200, "per-key").await;
    answers.send(open_req(), 429, "per-key throttled").await;

    // Admin: a key added while serving, used, disabled; usage; errors.
    let admin = layer.admin();
    admin
        .add_key(ApiKey::new("added", ADDED, "metered"))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(60));
    answers
        .send(post("/v1/completions", Some(ADDED)), 200, "added")
        .await;
    admin.set_enabled("added", false).await.unwrap();
    answers
        .send(post("/v1/completions", Some(ADDED)), 403, "added, disabled")
        .await;
    let duplicate = admin
        .add_key(ApiKey::new("again", KEY, "small"))
        .await
        .unwrap_err();
    let unknown_plan = admin
        .add_key(ApiKey::new("lost", UNKNOWN, "gold"))
        .await
        .unwrap_err();
    let bad_value = admin
        .add_key(ApiKey::new("spaced", format!("{UNKNOWN} x"), "small"))
        .await
        .unwrap_err();
    let usage = admin
        .usage("metered", today(), today(), None)
        .await
        .unwrap();
    assert!(usage.items.contains_key("alpha"), "{usage:?}");
    let remaining = admin.set_remaining("alpha", 5).await.unwrap();
    admin.reset_key("quota").await.unwrap();
    let mut debug = format!(
        "{layer:?}\n{per_key:?}\n{admin:?}\n{usage:?}\n{remaining}\n{:?}\n{:?}\n",
        admin.keys(),
        admin.key("added"),
    );
    for e in [&duplicate, &unknown_plan, &bad_value] {
        debug.push_str(&format!("{e:?} {e}\n"));
    }

    // The decision without a request (the bucket may have refilled meanwhile).
    let mut decided = Vec::new();
    for _ in 0..3 {
        decided.push(per_key.decide(BEARER.as_bytes(), 1).await);
    }
    let rejected = decided.last().unwrap().as_ref().unwrap_err();
    debug.push_str(&format!("{decided:?} {rejected}\n"));
    let rejected = layer.decide(UNKNOWN.as_bytes(), 1).await.unwrap_err();
    debug.push_str(&format!("{rejected:?} {rejected}\n"));

    // Policies, configs and their errors.
    let builder = Policy::builder()
        .plan(UsagePlan::new("p").throttle(Throttle::new(1.0, 1).unwrap()))
        .key(ApiKey::new("a", KEY, "p"))
        .key(ApiKey::new("b", DISABLED, "p").enabled(false));
    debug.push_str(&format!("{builder:?}\n{:?}\n", builder_policy()));
    debug.push_str(&format!("{config:?}\n{:?}\n", ApiKey::new("a", KEY, "p")));
    for e in [
        Policy::builder()
            .plan(UsagePlan::new("p"))
            .key(ApiKey::new("a", KEY, "p"))
            .key(ApiKey::new("b", KEY, "p"))
            .build()
            .unwrap_err(),
        Policy::builder()
            .plan(UsagePlan::new("p"))
            .key(ApiKey::new("a", format!("{KEY}\n"), "p"))
            .build()
            .unwrap_err(),
        Policy::builder()
            .plan(UsagePlan::new("p"))
            .key(ApiKey::new("a", KEY.repeat(40), "p"))
            .build()
            .unwrap_err(),
        Policy::builder()
            .key(ApiKey::new("a", KEY, "nowhere"))
            .build()
            .unwrap_err(),
    ] {
        debug.push_str(&format!("{e:?} {e}\n"));
    }
    let toml_errors = [
        config_toml().replace(
            &format!("value = \"{DISABLED}\""),
            &format!("value = \"{KEY}\""),
        ),
        config_toml().replace(
            &format!("value = \"{DISABLED}\""),
            &format!("value = \"{DISABLED} x\""),
        ),
        config_toml().replace("plan = \"small\"", "plan = \"gold\""),
        config_toml().replace(&format!("value = \"{KEY}\""), &format!("valeu = \"{KEY}\"")),
        config_toml().replace(
            &format!("key = \"{ADMIN}\""),
            &format!("key = \"{ADMIN}\"\nkye = \"{ADMIN}\""),
        ),
    ];
    for src in toml_errors {
        let e = Config::from_toml(&src).unwrap_err();
        debug.push_str(&format!("{e:?} {e}\n"));
    }

    // What extractors see and make of a request.
    let req = http::Request::builder()
        .header("x-api-key", KEY)
        .header("authorization", format!("Bearer {BEARER}"))
        .body(String::new())
        .unwrap();
    let view = RequestView::new(&req);
    let key = ApiKeyHeader::new().extract(&view).unwrap();
    let bearer = Bearer::new().extract(&view).unwrap();
    assert_eq!(key.as_bytes(), KEY.as_bytes());
    debug.push_str(&format!(
        "{view:?}\n{key:?}\n{bearer:?}\n{:?}\n",
        Key::borrowed(ADMIN.as_bytes())
    ));
    let mut bad = http::Request::builder()
        .header("x-api-key", malformed.as_str())
        .body(String::new())
        .unwrap();
    let e = ApiKeyHeader::new()
        .extract(&RequestView::new(&bad))
        .unwrap_err();
    debug.push_str(&format!("{e:?} {e}\n"));
    bad.headers_mut().insert("x-api-key", long.parse().unwrap());
    let e = ApiKeyHeader::new()
        .extract(&RequestView::new(&bad))
        .unwrap_err();
    debug.push_str(&format!("{e:?} {e}\n"));

    // The service itself.
    let svc = tower::Layer::layer(&layer, Inner);
    debug.push_str(&format!("{svc:?}\n{:?}\n", store.inner));

    assert_clean("responses", &answers.0);
    assert_clean("rejections", &rejections().lock().unwrap());
    assert_clean("observer events", &printed.lock().unwrap());
    assert_clean("store calls", &store_log.lock().unwrap());
    assert_clean("Debug and Display", &debug);
    assert_clean("logs", &log_text());
    assert_clean("metrics", &metrics_log().0.lock().unwrap());
    // The captures saw what they should: not a vacuous pass.
    let logs = log_text();
    for outcome in ["allowed", "rejected"] {
        assert!(
            logs.contains(outcome),
            "no {outcome} event in the logs:\n{logs}"
        );
    }
    let store_log = store_log.lock().unwrap();
    for call in [
        "acquire",
        "settle",
        "release",
        "usage",
        "set_remaining",
        "reset",
    ] {
        assert!(
            store_log.contains(call),
            "the store saw no {call}:\n{store_log}"
        );
    }
    let rejections = rejections().lock().unwrap().clone();
    for reason in [
        "Limited",
        "QuotaExceeded",
        "Concurrency",
        "CostExceedsLimit",
        "UnknownKey",
        "DisabledKey",
    ] {
        assert!(
            rejections.contains(reason),
            "no {reason} rejection:\n{rejections}"
        );
    }
}

/// The rejections [`keep_rejection`] kept (one test uses it).
fn rejections() -> &'static Mutex<String> {
    static REJECTIONS: Mutex<String> = Mutex::new(String::new());
    &REJECTIONS
}

fn builder_policy() -> Policy {
    Policy::builder()
        .plan(UsagePlan::new("p").throttle(Throttle::new(1.0, 1).unwrap()))
        .key(ApiKey::new("a", KEY, "p"))
        .build()
        .unwrap()
}

/// An inner service for the layer's `Debug`.
#[derive(Debug, Clone)]
struct Inner;

// ---------------------------------------------------------------------------
// Redis: the gateway, a per-key layer, and what Redis holds and saw
// ---------------------------------------------------------------------------

/// Every command Redis receives while it runs (`MONITOR`).
struct Monitor {
    stream: TcpStream,
    seen: Arc<Mutex<String>>,
    thread: std::thread::JoinHandle<()>,
}

impl Monitor {
    fn start(addr: SocketAddr) -> Monitor {
        let mut stream = TcpStream::connect(addr).expect("connect for MONITOR");
        stream.write_all(b"*1\r\n$7\r\nMONITOR\r\n").unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut ok = String::new();
        reader.read_line(&mut ok).unwrap();
        assert_eq!(ok.trim(), "+OK");
        let seen = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&seen);
        let thread = std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                let mut seen = sink.lock().unwrap();
                seen.push_str(&line);
                seen.push('\n');
            }
        });
        Monitor {
            stream,
            seen,
            thread,
        }
    }

    fn stop(self) -> String {
        // Give the last replies' commands time to arrive, then hang up.
        std::thread::sleep(Duration::from_millis(100));
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.thread.join().unwrap();
        self.seen.lock().unwrap().clone()
    }
}

/// Every key in Redis, with its type and its whole value.
fn dump(addr: SocketAddr) -> String {
    let keys = command(addr, &["KEYS", "*"]).expect("KEYS *");
    let mut out = String::new();
    for key in keys.lines().filter(|k| !k.is_empty()) {
        let kind = command(addr, &["TYPE", key]).expect("TYPE");
        let value = match kind.as_str() {
            "string" => command(addr, &["GET", key]),
            "hash" => command(addr, &["HGETALL", key]),
            "zset" => command(addr, &["ZRANGE", key, "0", "-1", "WITHSCORES"]),
            "set" => command(addr, &["SMEMBERS", key]),
            "list" => command(addr, &["LRANGE", key, "0", "-1"]),
            other => Ok(format!("(type {other})")),
        }
        .expect("read a key");
        out.push_str(&format!("{key} ({kind}): {}\n", value.replace('\n', " ")));
    }
    out
}

fn server_config() -> String {
    with_keys(
        r#"
[[plans]]
name = "metered"
throttle = { rate = 1.0, burst = 4 }
quota = { limit = 1000, period = "DAY" }
tokens = { per_minute = 1000, per_day = 100000 }
concurrency = 1
"#,
        r#"
[anonymous]
mode = "ip"
throttle = { rate = 1.0, burst = 2 }
"#,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_names_values_commands_and_the_gateway_hold_no_key() {
    if !require_redis() {
        return;
    }
    let printed = Arc::new(Mutex::new(String::new()));
    let redis = RedisServer::start();
    let monitor = Monitor::start(redis.addr());
    let config = redis.dir().join("leaks.toml");
    std::fs::write(&config, server_config()).unwrap();
    let mut server = ServerProcess::start(&[
        "--redis",
        &redis.url(),
        "--config",
        config.to_str().unwrap(),
    ]);
    let http = client();
    let call = |content_type: &str, key: Option<&str>, body: &Value| {
        let req = http
            .post(server.url("/v1/completions"))
            .header("content-type", content_type)
            .body(body.to_string());
        with_key(req, key)
    };
    let completion = |key: Option<&str>, body: Value| call("application/json", key, &body);
    // The mock reads the JSON body whatever the content type says.
    let grpc = |key: &str, body: &Value| call("application/grpc", Some(key), body);
    let small = json!({"model": "m", "prompt": "hi", "max_tokens": 2});
    let mut answers = Answers::default();

    // Allowed, and a stream settled for less than its estimate, which holds
    // the key's one place while it runs.
    answers
        .send(completion(Some(KEY), small.clone()), 200, "allowed")
        .await;
    let stream = json!({"model": "m", "prompt": "hi", "max_tokens": 50,
        "mock_completion_tokens": 5, "mock_token_ms": 40, "stream": true});
    let mut open = completion(Some(KEY), stream).send().await.unwrap();
    assert_eq!(open.status(), 200);
    let mut streamed = String::from_utf8_lossy(&open.chunk().await.unwrap().unwrap()).into_owned();
    answers
        .send(completion(Some(KEY), small.clone()), 429, "concurrency")
        .await;
    while let Some(chunk) = open.chunk().await.unwrap() {
        streamed.push_str(&String::from_utf8_lossy(&chunk));
    }
    answers.0.push_str(&streamed);
    // Throttled (bursts of 4), over HTTP and gRPC.
    let mut throttled = false;
    for _ in 0..6 {
        let (status, text) = seen(completion(Some(KEY), small.clone()).send().await.unwrap()).await;
        throttled |= status == 429;
        answers.0.push_str(&text);
    }
    assert!(throttled, "never throttled:\n{}", answers.0);
    let call_grpc = grpc(KEY, &small);
    answers.send(call_grpc, 200, "throttled, gRPC").await;
    // Quota, key failures, anonymous requests by IP.
    answers
        .send(completion(Some(QUOTA_KEY), small.clone()), 200, "quota")
        .await;
    answers
        .send(
            completion(Some(QUOTA_KEY), small.clone()),
            429,
            "quota exceeded",
        )
        .await;
    answers
        .send(completion(Some(UNKNOWN), small.clone()), 403, "unknown")
        .await;
    answers
        .send(completion(Some(DISABLED), small.clone()), 403, "disabled")
        .await;
    let call_grpc = grpc(UNKNOWN, &small);
    answers.send(call_grpc, 200, "unknown, gRPC").await;
    for want in [200, 200, 429] {
        answers.expect(
            seen(completion(None, small.clone()).send().await.unwrap()).await,
            want,
            "anonymous",
        );
    }

    // The admin routes, with every answer kept.
    let admin = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut req = http
            .request(method, server.url(path))
            .header("x-admin-key", ADMIN);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        req
    };
    use reqwest::Method;
    let day = today();
    let usage = format!("/admin/usage?plan=metered&start={day}&end={day}");
    answers
        .send(admin(Method::GET, &usage, None), 200, "usage")
        .await;
    let add = json!({"id": "added", "value": ADDED, "plan": "metered"});
    answers
        .send(admin(Method::POST, "/admin/keys", Some(add)), 201, "add")
        .await;
    let again = json!({"id": "again", "value": KEY, "plan": "small"});
    answers
        .send(
            admin(Method::POST, "/admin/keys", Some(again)),
            409,
            "duplicate value",
        )
        .await;
    let spaced = json!({"id": "spaced", "value": format!("{UNKNOWN} x"), "plan": "small"});
    answers
        .send(
            admin(Method::POST, "/admin/keys", Some(spaced)),
            400,
            "bad value",
        )
        .await;
    let typo = json!({"id": "typo", "valeu": ADDED, "plan": "small"});
    answers
        .send(
            admin(Method::POST, "/admin/keys", Some(typo)),
            400,
            "unknown field",
        )
        .await;
    answers
        .send(completion(Some(ADDED), small.clone()), 200, "added key")
        .await;
    let off = json!({"enabled": false});
    answers
        .send(
            admin(Method::PATCH, "/admin/keys/added", Some(off)),
            200,
            "disable",
        )
        .await;
    answers
        .send(
            completion(Some(ADDED), small.clone()),
            403,
            "added, disabled",
        )
        .await;
    let remaining = json!({"remaining": 10});
    answers
        .send(
            admin(Method::PATCH, "/admin/keys/alpha/usage", Some(remaining)),
            200,
            "update usage",
        )
        .await;
    answers
        .send(
            admin(Method::POST, "/admin/keys/quota/reset", None),
            200,
            "reset",
        )
        .await;
    answers
        .send(admin(Method::GET, &usage, None), 200, "usage")
        .await;
    answers
        .send(
            admin(Method::GET, &format!("{usage}&key=added"), None),
            200,
            "usage of a key",
        )
        .await;
    let wrong = http.get(server.url(&usage)).header("x-admin-key", KEY);
    answers.send(wrong, 403, "wrong admin key").await;

    // The server settles and exits.
    server.signal("TERM");
    assert!(
        server.wait_exit(Duration::from_secs(10)).success(),
        "{}",
        server.stderr()
    );

    // In process: a per-key layer on Redis (the subject is the secret itself),
    // with the store failing for a while and recovering.
    let _ = (logs(), metrics_log());
    let store = RedisStore::builder(redis.url()).build().await.unwrap();
    let per_key = bearer_layer(store.clone(), Some(2), &printed);
    let completion = || async {
        let mut res = Response::new(Body::from("{}"));
        res.extensions_mut().insert(UsedTokens(3));
        res
    };
    let app = Router::new()
        .route("/open", post(completion))
        .layer(per_key.clone());
    let base = support::serve(app).await;
    let open = || http.post(format!("{base}/open")).bearer_auth(BEARER);
    for want in [200, 200, 429] {
        answers.expect(
            seen(open().send().await.unwrap()).await,
            want,
            "per-key on Redis",
        );
    }
    redis.pause();
    // Failing open: let through unchecked, and logged.
    answers.send(open(), 200, "Redis paused").await;
    redis.resume();
    let mut recovered = false;
    for _ in 0..50 {
        let (_, text) = seen(open().send().await.unwrap()).await;
        answers.0.push_str(&text);
        if log_text().contains("rate-limit store recovered") {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(recovered, "the store never recovered:\n{}", log_text());
    store.drained().await;
    let debug = format!("{per_key:?}\n{store:?}\n");

    let commands = monitor.stop();
    let stored = dump(redis.addr());
    assert_clean("responses", &answers.0);
    assert_clean("server stdout", &server.stdout());
    assert_clean("server stderr", &server.stderr());
    assert_clean("Redis commands", &commands);
    assert_clean("Redis keys and values", &stored);
    assert_clean("observer events", &printed.lock().unwrap());
    assert_clean("Debug", &debug);
    assert_clean("logs", &log_text());
    assert_clean("metrics", &metrics_log().0.lock().unwrap());
    // Not vacuous: Redis holds every kind of state, and saw the decisions.
    for kind in [":t:", ":q", ":h", ":q:tokens-day", ":h:tokens-day"] {
        assert!(stored.contains(kind), "no {kind} key in Redis:\n{stored}");
    }
    assert!(commands.matches("\"EVALSHA\"").count() > 20, "{commands}");
    assert!(
        commands.contains("\"ZREM\""),
        "no lease released:\n{commands}"
    );
    assert!(
        log_text().contains("rate-limit store failing"),
        "{}",
        log_text()
    );
}
