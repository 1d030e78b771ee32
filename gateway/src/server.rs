//! Putting the gateway together: the layer and the routes, the listener,
//! logging, and graceful shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tollgate::config::Config;
use tollgate::extract::BearerOrApiKey;
use tollgate::openai::OpenAiEstimator;
use tollgate::store::Store;
use tollgate::{ConfigError, HeaderStyle, MemoryStore, RateLimitLayer, RedisStore};

use crate::cli::{DEFAULT_LOG, Parsed, USAGE, parse_args};
use crate::mock::{self, MockEstimator};

/// The embedded demo configuration (`gateway/demo.toml`).
pub const DEMO_CONFIG: &str = include_str!("../demo.toml");

/// The gateway for `config`, keeping limit state in `store`.
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
    Ok(router(layer, config.admin_key(), mock::model_names(config)))
}

/// The gateway's routes: the inference routes behind `limit` (the mock
/// answering `models` in `GET /v1/models`); `/health` and the admin routes
/// outside it.
///
/// Only requests that match a route and one of its methods are limited: a
/// 404 or a 405 is answered before the layer sees the request, costing
/// nothing.
pub fn router<S: Store>(
    limit: RateLimitLayer<BearerOrApiKey, S>,
    admin_key: Option<&str>,
    models: Vec<String>,
) -> Router {
    let admin = crate::admin::routes(limit.admin(), admin_key);
    // Each method router's `route_layer`: neither the router's fallback (404)
    // nor a route's method fallback (405) goes through the limit, as they
    // would with `Router::layer` (both) or `Router::route_layer` (the 405).
    let limited = |route: MethodRouter| route.route_layer(limit.clone());
    Router::new()
        .route("/v1/completions", limited(post(mock::completions)))
        .route(
            "/v1/chat/completions",
            limited(post(mock::chat_completions)),
        )
        .route(
            "/v1/models",
            limited(get(mock::models).with_state(mock::Models::new(models))),
        )
        .route("/health", get(health))
        .merge(admin)
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
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

/// Runs the gateway as the command line asks (see `--help`), until a
/// shutdown signal; the process's exit code: 0 after a graceful shutdown, 1
/// when it could not serve or the drain was cut short, 2 for bad flags or
/// configuration.
pub fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(run())
}

async fn run() -> std::process::ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Parsed::Run(a)) => a,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return std::process::ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("tollgate-gateway: {msg}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logging();
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
        "tollgate-gateway listening on http://{}",
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
        eprintln!("tollgate-gateway: shutting down, finishing the requests in flight");
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
        eprintln!("tollgate-gateway: shutting down, finishing the requests in flight");
    })
}
