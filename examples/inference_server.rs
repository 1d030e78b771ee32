//! Run with `cargo run --release --example inference_server -- [--config FILE] [--listen ADDR] [--redis URL] [--redis-timeout MS] [--drain SECS]`
//!
//! A mock OpenAI-style inference API behind tollgate: the reference server of
//! the README and of the black-box tests.
//!
//! - `POST /v1/completions` with `{"model":"m","prompt":"…","max_tokens":N,"stream":false}`
//! - `POST /v1/chat/completions` with `"messages":[{"role":"user","content":"…"}]` instead of `prompt`
//! - `GET /health`, never limited
//! - `/admin/…` usage and key administration, guarded by the `x-admin-key` header:
//!   - `GET /admin/usage?plan=NAME&start=YYYY-MM-DD&end=YYYY-MM-DD[&key=ID]` (AWS GetUsage)
//!   - `PATCH /admin/keys/ID/usage` with `{"remaining": N}` (AWS UpdateUsage)
//!   - `POST /admin/keys` with `{"id":…,"value":…,"plan":…}` adds a key; with an array of
//!     them imports them all or none (the first bad one named: `index`, `id`)
//!   - `GET /admin/keys/ID` shows a key (never its value); `DELETE /admin/keys/ID` removes it
//!   - `PATCH /admin/keys/ID` with `{"enabled": false}` or `{"plan": "pro"}`
//!   - `POST /admin/keys/ID/reset` forgets the key's usage in its current window
//!
//! With `--redis URL` the limits live in Redis, shared by every server started
//! with the same URL (several comma-separated URLs name the nodes of a Redis
//! Cluster); otherwise in this process. When `TOLLGATE_KEY_SECRET` is set,
//! it keys the names of the state in Redis (give every server the same one).
//! `--redis-timeout MS` (default 100) is how long a decision may wait for
//! Redis before the plan's `failure` mode decides it.
//!
//! It logs to stderr, filtered by `RUST_LOG` (default
//! `warn,tollgate=info,inference_server=info`): tollgate warns when the store
//! starts failing and says when it has recovered. With `--redis`, each node
//! is asked for `PING` at startup; one that does not answer within a second
//! is logged as a warning and the server serves anyway: the store keeps
//! reconnecting, and until Redis answers each plan's `failure` mode decides
//! its requests. (A Redis Cluster must answer at startup: the store asks it
//! for its slots, and the server exits 2 if it cannot.)
//!
//! On SIGTERM or Ctrl-C it stops accepting connections, lets the requests in
//! flight finish (streams to their last event), waits for the Redis store to
//! settle their tokens, and exits 0. Requests still in flight `--drain`
//! seconds after the signal (default 30) are cut off, and it exits 1.
//!
//! With no flags it listens on `127.0.0.1:3000` with the in-memory store and the
//! embedded demo configuration, `examples/inference_server.toml`: plan `free`
//! (2 requests/s, bursts of 5, 1/s and bursts of 2 on the chat route, 1000 a
//! day) with the key `demo-free-key`, plan `pro`, admin key `change-me`.
//!
//! ```text
//! curl -i -X POST localhost:3000/v1/completions -H 'Authorization: Bearer demo-free-key' \
//!      -H 'content-type: application/json' -d '{"model":"m","prompt":"hello"}'
//! ```
//!
//! The mock generates `max_tokens` tokens (default 16), or `mock_completion_tokens`
//! when the request names it, and reports `usage`; prompt tokens are
//! `ceil(prompt_chars / 4)`. With `"stream": true` it answers server-sent events,
//! one per token, `mock_token_ms` apart (default 5), the last one with the usage;
//! with `mock_fail_after: N` the stream fails after N tokens, as a broken model would.
//!
//! Token budgets: once the caller's key is checked, and only for plans with a
//! token budget, the layer reads the JSON body (at most 1 MiB, within 10 s;
//! 413 and 408 beyond) and tollgate's `OpenAiEstimator` estimates the
//! request's tokens as `ceil(prompt_chars / 4) + max_tokens`; the body is
//! then handed on to the handler unchanged. The handler reports the actual
//! `total_tokens`, which tollgate settles when the response ends: a plain
//! answer as a `UsedTokens` response extension, a stream token by token
//! through the request's `TokenUsage` handle, so that a client that goes
//! away mid-stream pays for what was produced. A body the mock cannot serve
//! is answered 400 by the estimator, before the decision: it costs nothing.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;
use tollgate::config::Config;
use tollgate::cost::{BodyError, CostEstimator, Estimate};
use tollgate::extract::{BearerOrApiKey, RequestView};
use tollgate::openai::OpenAiEstimator;
use tollgate::store::Store;
use tollgate::{
    Admin, AdminError, ApiKey, ConfigError, Date, HeaderStyle, MemoryStore, RateLimitLayer,
    RedisStore, TokenUsage, UsedTokens,
};

/// The default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3000";

/// The embedded demo configuration.
pub const DEMO_CONFIG: &str = include_str!("inference_server.toml");

/// The server for `config`, keeping limit state in `store`.
pub fn app<S: Store>(config: &Config, store: S) -> Result<Router, ConfigError> {
    let policy = config.policy_with_clock(store.clock().clone())?;
    // OpenAI's SDKs send `Authorization: Bearer`, wait `retry-after-ms`,
    // obey `x-should-retry` and read `code`/`type` from `{"error":{..}}`
    // bodies: keys from Bearer or `x-api-key`, and the style the config
    // names (`[response] style = "openai"` in the demo). The
    // `x-ratelimit-*-{requests,tokens}` headers are for people and dashboards.
    let layer = RateLimitLayer::builder(policy)
        .store(store)
        .extractor(BearerOrApiKey::new())
        .estimator(MockEstimator(OpenAiEstimator::new()))
        .quota_status(config.quota_status())
        .style(config.style())
        .max_retry(config.max_retry())
        .headers(HeaderStyle::ietf().openai(true))
        .build();
    Ok(router(layer, config.admin_key()))
}

/// The server's routes: the inference routes behind `limit`; `/health` and
/// the admin routes outside it.
pub fn router<S: Store>(
    limit: RateLimitLayer<BearerOrApiKey, S>,
    admin_key: Option<&str>,
) -> Router {
    let admin = AdminState {
        admin: limit.admin(),
        key: admin_key.map(|k| AdminKey::new(k.as_bytes())),
    };
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .layer(limit)
        .route("/health", get(health))
        .route("/admin/usage", get(usage::<S>))
        // A batch import of 100,000 keys is some 10 MB of JSON; the body is
        // read only once the admin key has been checked.
        .route(
            "/admin/keys",
            post(add_key::<S>).layer(DefaultBodyLimit::max(ADMIN_BODY_LIMIT)),
        )
        .route(
            "/admin/keys/{id}",
            get(get_key::<S>)
                .patch(patch_key::<S>)
                .delete(remove_key::<S>),
        )
        .route("/admin/keys/{id}/usage", patch(update_usage::<S>))
        .route("/admin/keys/{id}/reset", post(reset_key::<S>))
        .with_state(admin)
}

/// Serves `router` on `listener` with connection info (for client-IP limits)
/// until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

struct Args {
    listen: SocketAddr,
    config: Option<String>,
    redis: Option<String>,
    /// How long a decision may wait for Redis before the plan's failure
    /// mode decides it.
    redis_timeout: Duration,
    /// How long requests in flight may take to finish after a shutdown signal.
    drain: Duration,
}

/// The default of `--drain`.
const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut listen = DEFAULT_LISTEN.to_owned();
    let mut config = None;
    let mut redis = None;
    let mut redis_timeout = DEFAULT_REDIS_TIMEOUT;
    let mut drain = DEFAULT_DRAIN;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--drain" => {
                let secs = args.next().ok_or("--drain needs a number of seconds")?;
                drain = secs
                    .parse::<f64>()
                    .ok()
                    .and_then(|s| Duration::try_from_secs_f64(s).ok())
                    .ok_or_else(|| format!("--drain `{secs}`: not a number of seconds"))?;
            }
            "--listen" => listen = args.next().ok_or("--listen needs an address")?,
            "--config" => config = Some(args.next().ok_or("--config needs a file")?),
            "--redis" => redis = Some(args.next().ok_or("--redis needs a URL")?),
            "--redis-timeout" => {
                let ms = args
                    .next()
                    .ok_or("--redis-timeout needs a number of milliseconds")?;
                redis_timeout = ms
                    .parse::<u64>()
                    .ok()
                    .filter(|&ms| ms > 0)
                    .map(Duration::from_millis)
                    .ok_or_else(|| {
                        format!("--redis-timeout `{ms}`: not a number of milliseconds above 0")
                    })?;
            }
            "-h" | "--help" => {
                return Err(
                    "usage: inference_server [--config FILE] [--listen ADDR] [--redis URL[,URL…]] [--redis-timeout MS (100)] [--drain SECS]"
                        .to_owned(),
                );
            }
            other => return Err(format!("unknown argument `{other}` (try --help)")),
        }
    }
    let listen = listen
        .parse()
        .map_err(|e| format!("--listen `{listen}`: {e}"))?;
    Ok(Args {
        listen,
        config,
        redis,
        redis_timeout,
        drain,
    })
}

/// The default of `--redis-timeout`: the store's own default.
const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(100);

/// The log filter when `RUST_LOG` is not set.
const DEFAULT_LOG: &str = "warn,tollgate=info,inference_server=info";

/// Logs to stderr, filtered by `RUST_LOG` (or [`DEFAULT_LOG`]).
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// How long the startup check waits for each Redis node.
const PING_WAIT: Duration = Duration::from_secs(1);

/// Asks each Redis node for `PING`, and logs a warning for each that does
/// not answer within [`PING_WAIT`]. Never fails: the store connects lazily
/// and keeps retrying, so the server serves either way. (The store has no
/// ping of its own, so this asks Redis directly.)
async fn ping_redis(urls: &[&str]) {
    for url in urls {
        // A malformed URL is reported by the store's builder.
        let Ok(client) = redis::Client::open(*url) else {
            continue;
        };
        // The address only: a URL may carry a password.
        let node = client.get_connection_info().addr().to_string();
        let pong = async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        let error = match tokio::time::timeout(PING_WAIT, pong).await {
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {PING_WAIT:?}"),
        };
        tracing::warn!(
            redis = %node,
            %error,
            "Redis cannot be reached; serving anyway: the store keeps retrying, and until \
             Redis answers each plan's failure mode decides its requests"
        );
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    init_logging();
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return std::process::ExitCode::from(2);
        }
    };
    let config = match &args.config {
        Some(path) => Config::load(path),
        None => Config::from_toml(DEMO_CONFIG),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // The Redis store, kept to wait for its last settlements at exit.
    let mut redis = None;
    let app = match &args.redis {
        None => app(&config, MemoryStore::new()),
        Some(urls) => {
            let urls: Vec<&str> = urls.split(',').map(str::trim).collect();
            ping_redis(&urls).await;
            let builder = match urls.as_slice() {
                [url] => RedisStore::builder(*url),
                nodes => RedisStore::cluster_builder(nodes.iter().copied()),
            };
            let secret = std::env::var("TOLLGATE_KEY_SECRET").unwrap_or_default();
            match builder
                .key_secret(secret)
                .timeout(args.redis_timeout)
                .build()
                .await
            {
                Ok(store) => app(&config, redis.insert(store).clone()),
                Err(e) => {
                    eprintln!("--redis: {e}");
                    return std::process::ExitCode::from(2);
                }
            }
        }
    };
    let app = match app {
        Ok(app) => app,
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {}: {e}", args.listen);
            return std::process::ExitCode::FAILURE;
        }
    };
    // Listening for the signals before saying so: a signal sent as soon as
    // the address is printed stops the server gracefully too.
    let shutdown = match shutdown_signal() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot listen for shutdown signals: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!(
        "inference_server listening on http://{}",
        listener.local_addr().map_or(args.listen, |a| a)
    );
    // The drain deadline starts with the signal.
    let (stopping, stopped) = tokio::sync::oneshot::channel();
    let shutdown = async move {
        shutdown.await;
        let _ = stopping.send(());
    };
    let deadline = async move {
        match stopped.await {
            Ok(()) => tokio::time::sleep(args.drain).await,
            Err(_) => std::future::pending().await,
        }
    };
    let served = tokio::select! {
        served = serve(listener, app, shutdown) => served,
        () = deadline => {
            // They end with the runtime: with Redis, what they reserved
            // stays charged (their settlement is not waited for).
            eprintln!("requests still in flight {:?} after the signal: cut off", args.drain);
            Err(std::io::Error::other("drain deadline passed"))
        }
    };
    // Every response has ended; the Redis store may still be settling the
    // last ones' tokens in the background.
    if let Some(store) = redis {
        store.drained().await;
    }
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("server error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM (what `kill`, systemd, Docker and Kubernetes send) or
/// SIGINT (Ctrl-C). The handlers are installed now, not when first polled.
///
/// On either, [`serve`] stops accepting connections (the listening socket is
/// closed: new connections are refused) and lets every request in flight
/// finish, streams to their last event, so their tokens are settled.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
        eprintln!("inference_server: shutting down, finishing the requests in flight");
    })
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    Ok(async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No handler: run until killed rather than stop at once.
            std::future::pending::<()>().await;
        }
        eprintln!("inference_server: shutting down, finishing the requests in flight");
    })
}

#[derive(Clone)]
struct AdminState<S> {
    admin: Admin<S>,
    key: Option<AdminKey>,
}

impl<S> AdminState<S> {
    /// Whether the request carries the admin key (in its first `x-admin-key`
    /// header); see [`AdminKey::matches`].
    fn allows(&self, headers: &HeaderMap) -> bool {
        match (&self.key, headers.get("x-admin-key")) {
            (Some(key), Some(sent)) => key.matches(sent.as_bytes()),
            _ => false,
        }
    }
}

/// The admin key, kept only as a keyed digest, so that checking a request's
/// key takes a time that says nothing about the admin key.
///
/// The key sent is hashed with SipHash-2-4 (128 bits) under a key drawn from
/// the operating system's randomness at start, and the two digests are
/// compared whole. The time taken depends on the length of the key sent,
/// which its sender knows, and on nothing else: the admin key itself is
/// never read while serving, so neither its bytes nor its length, nor how
/// long a prefix of it the sent key shares, can show in the time. And since
/// no one can compute digests without the random key, even a comparison that
/// stopped at the first differing bit would teach a sender nothing it could
/// use. It does not stop early anyway: both halves are folded into one word,
/// which is tested once.
#[derive(Clone)]
pub struct AdminKey {
    sip: (u64, u64),
    digest: [u64; 2],
}

impl AdminKey {
    /// Keeps the digest of `key` under a new random key.
    pub fn new(key: &[u8]) -> AdminKey {
        use std::hash::BuildHasher;
        // std's RandomState is seeded from the operating system's randomness.
        let seed = std::hash::RandomState::new();
        let sip = (
            seed.hash_one(0x0061_646d_696e_u64),
            seed.hash_one(0x006b_6579_u64),
        );
        AdminKey {
            sip,
            digest: admin_digest(sip, key),
        }
    }

    /// Whether `sent` is the admin key, in a time that depends only on
    /// `sent.len()`.
    pub fn matches(&self, sent: &[u8]) -> bool {
        let [a, b] = admin_digest(self.sip, sent);
        let diff = (a ^ self.digest[0]) | (b ^ self.digest[1]);
        std::hint::black_box(diff) == 0
    }
}

/// The SipHash-2-4 128-bit digest of `bytes` under `key`.
fn admin_digest(key: (u64, u64), bytes: &[u8]) -> [u64; 2] {
    use siphasher::sip128::{Hasher128, SipHasher24};
    use std::hash::Hasher;
    let mut h = SipHasher24::new_with_keys(key.0, key.1);
    h.write(bytes);
    let h = h.finish128();
    [h.h1, h.h2]
}

impl std::fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminKey(..)")
    }
}

/// A request that carries the admin key; any other is answered 403.
struct Authorized;

impl<S: Sync> FromRequestParts<AdminState<S>> for Authorized {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &AdminState<S>) -> Result<Self, Response> {
        if s.allows(&parts.headers) {
            Ok(Authorized)
        } else {
            Err((StatusCode::FORBIDDEN, Json(json!({"message": "Forbidden"}))).into_response())
        }
    }
}

fn admin_error(e: AdminError) -> Response {
    if let AdminError::Import { index, id, error } = &e {
        let status = admin_error((**error).clone()).status();
        let body = json!({"message": e.to_string(), "index": index, "id": id});
        return (status, Json(body)).into_response();
    }
    let status = match e {
        AdminError::UnknownKey(_) | AdminError::UnknownPlan(_) => StatusCode::NOT_FOUND,
        AdminError::Config(_) => StatusCode::CONFLICT,
        AdminError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        // A value the request got wrong (`{"remaining": N}` above 2^53, a
        // date range), the same with every store.
        AdminError::RemainingOutOfRange { .. } | AdminError::BadRange(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_REQUEST,
    };
    (status, Json(json!({"message": e.to_string()}))).into_response()
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))
}

/// The largest admin request body: a batch of keys to import.
const ADMIN_BODY_LIMIT: usize = 64 << 20;

#[derive(Deserialize)]
struct UsageQuery {
    plan: String,
    start: String,
    end: String,
    key: Option<String>,
}

async fn usage<S: Store>(
    _: Authorized,
    State(s): State<AdminState<S>>,
    q: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return bad_request("usage needs plan, start and end (YYYY-MM-DD)");
    };
    let (Some(start), Some(end)) = (Date::parse(&q.start), Date::parse(&q.end)) else {
        return bad_request("start and end must be dates as YYYY-MM-DD");
    };
    match s.admin.usage(&q.plan, start, end, q.key.as_deref()).await {
        Ok(r) => Json(json!({
            "plan": r.plan,
            "start": r.start.to_string(),
            "end": r.end.to_string(),
            "items": r.items,
        }))
        .into_response(),
        Err(e) => admin_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    id: String,
    value: String,
    plan: String,
    #[serde(default = "yes")]
    enabled: bool,
    account: Option<String>,
}

fn yes() -> bool {
    true
}

fn key_json<S: Store>(s: &AdminState<S>, id: &str) -> Response {
    match s.admin.key(id) {
        Some(k) => {
            Json(json!({"id": k.id, "plan": k.plan, "enabled": k.enabled, "account": k.account}))
                .into_response()
        }
        None => admin_error(AdminError::UnknownKey(id.to_owned())),
    }
}

/// One key, or a batch of them (imported all or nothing).
#[derive(Deserialize)]
#[serde(untagged)]
enum NewKeys {
    One(NewKey),
    Many(Vec<NewKey>),
}

fn new_key(k: NewKey) -> ApiKey {
    let key = ApiKey::new(k.id, k.value, k.plan).enabled(k.enabled);
    match k.account {
        Some(account) => key.account(account),
        None => key,
    }
}

async fn add_key<S: Store>(_: Authorized, State(s): State<AdminState<S>>, body: Bytes) -> Response {
    let keys: NewKeys = match parse_json(&body) {
        Ok(k) => k,
        Err(msg) => return bad_request(&msg),
    };
    match keys {
        NewKeys::One(k) => {
            let id = k.id.clone();
            match s.admin.add_key(new_key(k)).await {
                Ok(()) => (StatusCode::CREATED, key_json(&s, &id)).into_response(),
                Err(e) => admin_error(e),
            }
        }
        NewKeys::Many(keys) => match s.admin.import_keys(keys.into_iter().map(new_key)).await {
            Ok(n) => (StatusCode::CREATED, Json(json!({"imported": n}))).into_response(),
            Err(e) => admin_error(e),
        },
    }
}

async fn get_key<S: Store>(
    _: Authorized,
    State(s): State<AdminState<S>>,
    Path(id): Path<String>,
) -> Response {
    key_json(&s, &id)
}

async fn remove_key<S: Store>(
    _: Authorized,
    State(s): State<AdminState<S>>,
    Path(id): Path<String>,
) -> Response {
    match s.admin.remove_key(&id).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => admin_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyPatch {
    enabled: Option<bool>,
    plan: Option<String>,
}

async fn patch_key<S: Store>(
    _: Authorized,
    State(s): State<AdminState<S>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let p: KeyPatch = match parse_json(&body) {
        Ok(p) => p,
        Err(msg) => return bad_request(&msg),
    };
    if let Some(plan) = &p.plan {
        if let Err(e) = s.admin.set_plan(&id, plan).await {
            return admin_error(e);
        }
    }
    if let Some(enabled) = p.enabled {
        if let Err(e) = s.admin.set_enabled(&id, enabled).await {
            return admin_error(e);
        }
    }
    key_json(&s, &id)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsagePatch {
    remaining: u64,
}

async fn update_usage<S: Store>(
    _: Authorized,
    State(s): State<AdminState<S>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let p: UsagePatch = match parse_json(&body) {
        Ok(p) => p,
        Err(msg) => return bad_request(&msg),
    };
    match s.admin.set_remaining(&id, p.remaining).await {
        Ok(remaining) => Json(json!({"id": id, "remaining": remaining})).into_response(),
        Err(e) => admin_error(e),
    }
}

async fn reset_key<S: Store>(
    _: Authorized,
    State(s): State<AdminState<S>>,
    Path(id): Path<String>,
) -> Response {
    match s.admin.reset_key(&id).await {
        Ok(()) => key_json(&s, &id),
        Err(e) => admin_error(e),
    }
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// The OpenAI estimate, for bodies the mock can serve: any other is answered
/// 400 before the decision, costing nothing.
struct MockEstimator(OpenAiEstimator);

impl CostEstimator for MockEstimator {
    fn estimate(&self, req: &RequestView<'_>) -> u32 {
        self.0.estimate(req)
    }

    fn reads_body(&self, req: &RequestView<'_>) -> bool {
        self.0.reads_body(req)
    }

    fn estimate_body(&self, req: &RequestView<'_>, body: &[u8]) -> Result<Estimate, BodyError> {
        let chat = req.uri.path() == "/v1/chat/completions";
        Job::parse(chat, body).map_err(BodyError::new)?;
        self.0.estimate_body(req, body)
    }
}

#[path = "support/estimate.rs"]
mod estimate;

use estimate::Job;

impl Job {
    fn total_tokens(&self) -> u64 {
        self.prompt_tokens + u64::from(self.completion_tokens)
    }

    fn usage(&self) -> Value {
        let completion = u64::from(self.completion_tokens);
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    fn object(&self) -> &'static str {
        match (self.chat, self.stream) {
            (true, false) => "chat.completion",
            (true, true) => "chat.completion.chunk",
            (false, _) => "text_completion",
        }
    }

    fn answer(self) -> Response {
        if self.stream {
            return self.stream_answer();
        }
        let text = "tok ".repeat(self.completion_tokens as usize);
        let choice = if self.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            json!({"index": 0, "text": text, "finish_reason": "length"})
        };
        let mut res = Json(json!({
            "id": "mock-1",
            "object": self.object(),
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(),
        }))
        .into_response();
        res.extensions_mut().insert(UsedTokens(self.total_tokens()));
        res
    }

    fn stream_answer(self) -> Response {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, std::io::Error>>(1);
        // The prompt is paid for once the stream starts; each token as it is sent.
        if let Some(u) = &self.usage {
            u.set(self.prompt_tokens);
        }
        tokio::spawn(async move {
            let n = self.completion_tokens;
            for i in 0..n {
                if self.token_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(self.token_ms)).await;
                }
                if self.fail_after == Some(i) {
                    // The body fails: the client sees the stream cut off.
                    let _ = tx
                        .send(Err(std::io::Error::other("mock model failure")))
                        .await;
                    return;
                }
                let choice = if self.chat {
                    json!({"index": 0, "delta": {"content": "tok "}})
                } else {
                    json!({"index": 0, "text": "tok "})
                };
                let mut chunk = json!({
                    "id": "mock-1",
                    "object": self.object(),
                    "model": self.model,
                    "choices": [choice],
                });
                if i + 1 == n {
                    chunk["usage"] = self.usage();
                }
                // A closed channel means the client went away: stop generating.
                if tx
                    .send(Ok(Event::default().data(chunk.to_string())))
                    .await
                    .is_err()
                {
                    return;
                }
                if let Some(u) = &self.usage {
                    u.add(1);
                }
            }
            if n == 0 {
                let chunk = json!({"id": "mock-1", "object": self.object(), "model": self.model, "choices": [], "usage": self.usage()});
                let _ = tx.send(Ok(Event::default().data(chunk.to_string()))).await;
            }
            let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
        });
        Sse::new(ReceiverStream::new(rx)).into_response()
    }
}

type Usage = Option<Extension<TokenUsage>>;

async fn completions(usage: Usage, body: Bytes) -> Response {
    answer(Job::parse(false, &body), usage)
}

async fn chat_completions(usage: Usage, body: Bytes) -> Response {
    answer(Job::parse(true, &body), usage)
}

fn answer(job: Result<Job, String>, usage: Usage) -> Response {
    match job {
        Ok(mut job) => {
            job.usage = usage.map(|Extension(u)| u);
            job.answer()
        }
        Err(msg) => bad_request(&msg),
    }
}

/// A 400 with a JSON error. The middleware answers bad bodies before the
/// rate limit; one that reaches a handler (served without the middleware)
/// reports that it used no tokens.
fn bad_request(message: &str) -> Response {
    let mut res = (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": {"message": message, "type": "invalid_request_error"}})),
    )
        .into_response();
    res.extensions_mut().insert(UsedTokens(0));
    res
}
