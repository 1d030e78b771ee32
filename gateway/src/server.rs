//! Putting the gateway together: the layer and the routes, the listener,
//! logging, and graceful shutdown.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::header::CONTENT_TYPE;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::Semaphore;
use tollgate::observe::MetricsObserver;

use axum::routing::{MethodRouter, any, get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tollgate::config::Config;
use tollgate::extract::BearerOrApiKey;
use tollgate::openai::OpenAiEstimator;
use tollgate::store::Store;
use tollgate::{ConfigError, HeaderStyle, MemoryStore, RateLimitLayer, RedisStore, ResponseStyle};

use crate::admin::BodyDeadline;
use crate::cli::{DEFAULT_LOG, Parsed, USAGE, parse_args};
use crate::dashboard::Dashboard;
use crate::idle::{Activity, Guarded, IdleTimeoutBody, Stall, Watched};
use crate::mock::{self, MockEstimator};
use crate::traffic::{Both, Requests};
use crate::upstream::{self, Upstream, UpstreamEstimator};

/// The embedded demo configuration (`gateway/demo.toml`).
pub const DEMO_CONFIG: &str = include_str!("../demo.toml");

/// The gateway for `config` in mock mode, keeping limit state in `store`.
pub fn app<S: Store>(config: &Config, store: S) -> Result<Router, ConfigError> {
    app_with(config, store, None)
}

/// The gateway for `config`, keeping limit state in `store`: forwarding
/// `/v1/*` to `upstream` when one is given, else answering with the mock.
pub fn app_with<S: Store>(
    config: &Config,
    store: S,
    upstream: Option<&Upstream>,
) -> Result<Router, ConfigError> {
    app_with_limits(config, store, upstream, &Limits::default())
}

/// [`app_with`], reading the bodies it estimates within `limits`
/// ([`Limits::body_deadline`]); serve it within the same `limits`.
pub fn app_with_limits<S: Store>(
    config: &Config,
    store: S,
    upstream: Option<&Upstream>,
    limits: &Limits,
) -> Result<Router, ConfigError> {
    let policy = config.policy_with_clock(store.clock().clone())?;
    let dashboard = Dashboard::new(config, store.clock().clone());
    // Installed before the first decision, so that every one is counted.
    prometheus();
    // OpenAI's SDKs send `Authorization: Bearer`, wait `retry-after-ms`,
    // obey `x-should-retry` and read `code`/`type` from `{"error":{..}}`
    // bodies: keys from Bearer or `x-api-key`, and the style the config
    // names (`[response] style = "openai"` in the demo), with the rest of
    // what it says of the answers. The `x-ratelimit-*-{requests,tokens}`
    // headers are for people and dashboards, in either style.
    let builder = RateLimitLayer::builder(policy)
        .store(store)
        .extractor(BearerOrApiKey::new())
        .config(config)
        .headers(HeaderStyle::ietf().openai(true))
        .body_timeout(limits.body_deadline.min(NEVER))
        .max_body_bytes_held(limits.body_memory)
        .observer(Both(
            Requests(MetricsObserver::new()),
            dashboard.traffic().clone(),
        ));
    Ok(match upstream {
        None => {
            let layer = builder
                .estimator(MockEstimator(OpenAiEstimator::new()))
                .build();
            router(
                layer,
                config.admin_key(),
                mock::model_names(config),
                &dashboard,
            )
        }
        Some(upstream) => {
            let layer = builder
                .estimator(UpstreamEstimator(OpenAiEstimator::new()))
                .build();
            upstream_router(layer, config.admin_key(), upstream, &dashboard)
        }
    })
}

/// The gateway's routes: the inference routes behind `limit` (the mock
/// answering `models` in `GET /v1/models` and `GET /v1/models/{model}`); `/health` and the admin routes
/// (with the `dashboard`, whose traffic `limit` should observe) outside it.
///
/// Only requests that match a route and one of its methods are limited: a
/// 404 or a 405 is answered before the layer sees the request, costing
/// nothing.
pub fn router<S: Store>(
    limit: RateLimitLayer<BearerOrApiKey, S>,
    admin_key: Option<&str>,
    models: Vec<String>,
    dashboard: &Dashboard,
) -> Router {
    // Each method router's `route_layer`: neither the router's fallback (404)
    // nor a route's method fallback (405) goes through the limit, as they
    // would with `Router::layer` (both) or `Router::route_layer` (the 405).
    let limited = |route: MethodRouter| route.route_layer(limit.clone());
    let models = mock::Models::new(models);
    let routes = Router::new()
        .route("/v1/completions", limited(post(mock::completions)))
        .route(
            "/v1/chat/completions",
            limited(post(mock::chat_completions)),
        )
        .route(
            "/v1/models",
            limited(get(mock::models).with_state(models.clone())),
        )
        .route(
            "/v1/models/{*model}",
            limited(get(mock::model).with_state(models)),
        )
        .merge(always(&limit, admin_key, dashboard));
    unrouted(routes, limit.style())
}

/// The routes of upstream mode: every `/v1/…` path and method forwarded to
/// `upstream` behind `limit`; `/health` and the admin routes outside it.
///
/// `/v1/{*path}` with every method is one matched route, as an AWS proxy
/// resource (`/{proxy+}`, `ANY`) is: a request forwarded is limited and
/// counted whatever the backend answers, its 404 or 405 included. The
/// gateway cannot know the backend's routes (vLLM, llama.cpp and Ollama
/// each add their own), and a backend's 404 costs it work all the same:
/// given back, it would let a client probe the backend without limit. Its
/// tokens are settled at nothing, as any error's. Only what the gateway
/// answers itself costs nothing: a path outside `/v1/` (404) or one it
/// never forwards (400).
pub fn upstream_router<S: Store>(
    limit: RateLimitLayer<BearerOrApiKey, S>,
    admin_key: Option<&str>,
    upstream: &Upstream,
    dashboard: &Dashboard,
) -> Router {
    // Every method is forwarded (no 405), so the router's `route_layer`
    // covers exactly the matched `/v1/…` requests; the 404 fallback stays
    // outside the limit.
    let routes = Router::new()
        .route(
            "/v1/{*path}",
            any(upstream::forward).with_state(upstream.forwarder()),
        )
        .route_layer(limit.clone())
        // Outside the limit: a path that is never forwarded costs nothing.
        .route_layer(axum::middleware::from_fn(upstream::refuse_unforwardable))
        .merge(always(&limit, admin_key, dashboard));
    unrouted(routes, limit.style())
}

/// `router` answering a request no route takes (404), or whose route does
/// not take its method (405, with axum's `Allow` header), with a JSON error
/// in `style`, as the layer answers its refusals: an OpenAI client reads
/// `{"error":{"message":…}}` where it got an empty body. Neither goes
/// through the limit (the router's fallbacks are outside every
/// `route_layer`), so both still cost nothing.
///
/// Call it on the finished router: the 405 answer is set on the routes
/// already there.
///
/// Every answer, those of the fallbacks included, goes through
/// [`answer_stalled`].
fn unrouted(router: Router, style: ResponseStyle) -> Router {
    router
        .fallback(move |method: Method, uri: Uri| async move {
            unrouted_answer(style, StatusCode::NOT_FOUND, &method, &uri)
        })
        .method_not_allowed_fallback(move |method: Method, uri: Uri| async move {
            unrouted_answer(style, StatusCode::METHOD_NOT_ALLOWED, &method, &uri)
        })
        .layer(axum::middleware::from_fn_with_state(style, answer_stalled))
}

/// The answer to a request whose body was cut off for sending nothing for
/// the body timeout (`--body-timeout`, see [`Stall`]): a 408 in `style`,
/// whatever was reading the body answered. That was a 400 from the layer
/// (reading the body for its estimate, it takes any failure of the body
/// for a client's error) and from an admin route, and a 502 from upstream
/// mode (the backend's request failed with it); a body too slow is a
/// timeout, as the layer answers one that does not arrive whole within its
/// own bound. The layer charged nothing (it never decided); a body
/// streamed to the backend was admitted first, and costs no tokens.
/// The connection is closed: the rest of the body is not worth waiting for.
async fn answer_stalled(
    axum::extract::State(style): axum::extract::State<ResponseStyle>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let stall = req.extensions().get::<Arc<Stall>>().cloned();
    let res = next.run(req).await;
    match stall {
        Some(stall) if stall.stalled() => body_timed_out(style, stall.timeout),
        _ => res,
    }
}

/// The 408 of [`answer_stalled`], shaped as the layer's own 408.
fn body_timed_out(style: ResponseStyle, timeout: Duration) -> Response {
    let message = format!(
        "the request body sent nothing for {} ms",
        timeout.as_millis()
    );
    let body = match style {
        ResponseStyle::OpenAi => json!({"error": {
            "message": message,
            "type": "invalid_request_error",
            "param": null,
            "code": "request_timeout",
        }}),
        _ => json!({ "message": message }),
    };
    (
        StatusCode::REQUEST_TIMEOUT,
        [(axum::http::header::CONNECTION, "close")],
        Json(body),
    )
        .into_response()
}

/// The 404 or 405 of [`unrouted`]: in the OpenAI style OpenAI's own
/// `Invalid URL (POST /v1/x)`, in the AWS style the status's reason. The
/// path is named, never the query, which may carry what a client meant to
/// keep (a key in `?api_key=`).
fn unrouted_answer(
    style: ResponseStyle,
    status: StatusCode,
    method: &Method,
    uri: &Uri,
) -> Response {
    let body = match style {
        ResponseStyle::OpenAi => {
            let what = if status == StatusCode::NOT_FOUND {
                "Invalid URL"
            } else {
                "Invalid method for URL"
            };
            json!({"error": {
                "message": format!("{what} ({method} {})", uri.path()),
                "type": "invalid_request_error",
                "param": null,
                "code": null,
            }})
        }
        _ => json!({"message": status.canonical_reason().unwrap_or("Not Found")}),
    };
    (status, Json(body)).into_response()
}

/// The routes of both modes, never limited: `/health`, `/metrics`,
/// `/v1/usage` (which reads the caller's limits without charging them) and
/// the admin routes.
fn always<S: Store>(
    limit: &RateLimitLayer<BearerOrApiKey, S>,
    admin_key: Option<&str>,
    dashboard: &Dashboard,
) -> Router {
    Router::new()
        .route(
            "/v1/usage",
            get(crate::usage::usage::<S>).with_state(limit.clone()),
        )
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(crate::admin::routes(limit, admin_key, dashboard))
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// The process's Prometheus recorder, installed by the first call; `None`
/// when another `metrics` recorder was installed first.
fn prometheus() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok().map(|()| handle)
        })
        .as_ref()
}

/// `GET /metrics`: the decision counters (`tollgate_decisions_total`) in
/// Prometheus text.
async fn metrics() -> Response {
    match prometheus() {
        Some(handle) => (
            [(CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "another metrics recorder is installed in this process\n",
        )
            .into_response(),
    }
}

/// Limits on connections and on the time clients may take.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Limits {
    /// HTTP/1: how long a request's head may take to arrive, counted from
    /// when the connection is ready for it between requests on a kept-alive
    /// one, so this also closes idle connections, and from its first byte
    /// on a new one (a connection that sends no byte for as long is
    /// dropped).
    /// Any connection (HTTP/2's too, which may answer pings for ever) with
    /// no request open for as long is closed gracefully (HTTP/2: `GOAWAY`),
    /// and dropped if it is still open, idle, as long again (a client that
    /// ignores the `GOAWAY`).
    pub header_timeout: Duration,
    /// How long a request body may send nothing before it is cut off; and
    /// how long a write of an answer may wait for the client to take a byte
    /// (it stopped reading) before its connection is dropped. On HTTP/2,
    /// where such a client opens no flow-control window and so blocks no
    /// write, how long an answer may wait to be asked for its next piece
    /// with nothing asked on the connection meanwhile.
    pub body_timeout: Duration,
    /// How long a body read for its estimate (a completion's, a chat
    /// completion's; in upstream mode a Responses, embeddings or Messages
    /// request's too) may take to arrive whole, from when the layer starts
    /// reading it, however steadily it comes: one still unfinished is
    /// answered 408 and costs nothing. Applied by [`app_with_limits`] (the
    /// other bounds here by the server). An admin request's body (with the
    /// admin key) must arrive whole within it too (408), applied by the
    /// server.
    pub body_deadline: Duration,
    /// The most bytes the bodies being read for their estimates may hold
    /// together, across every connection (`--body-memory`, default 64 MiB).
    /// Each body is bounded (1 MiB, [`body_deadline`](Self::body_deadline)),
    /// but the connections the cap admits, each with its HTTP/2 streams,
    /// could otherwise hold 1 MiB apiece for the whole deadline (some
    /// 32 GiB with the defaults), with a valid key and before any limit is
    /// charged. A body whose next piece would take the total past this is
    /// answered 503 at once, with `retry-after: 1`, costing nothing (an
    /// OpenAI client retries it); the bytes come back as soon as a body has
    /// been read. One key (or client address) holds at most a sixteenth of
    /// it, but at least one whole body, so that its slow bodies cannot take
    /// every other caller's room. Applied by [`app_with_limits`].
    pub body_memory: usize,
    /// HTTP/2: how often an idle connection is pinged; one that does not
    /// answer within as long again is closed.
    pub http2_keep_alive: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// HTTP/2: requests one connection may have open at once; a client
    /// opens the streams past it as earlier ones end. Each request may hold
    /// a body read for its estimate (up to 1 MiB), so this bounds what one
    /// connection makes the gateway hold, as HTTP/1's one request at a time
    /// does ([`body_memory`](Self::body_memory) bounds what they all hold).
    pub http2_max_streams: u32,
    /// HTTP/1: the most a connection buffers of a request's head (its
    /// request line and headers), in bytes; a larger head is answered 431
    /// and its connection closed. A head is read before any key is known,
    /// so this bounds what a client without one makes the gateway hold for
    /// a header timeout: hyper's own bound, about 400 KiB, let the
    /// connections the cap admits hold some 400 MiB. HTTP/2 bounds a
    /// request's header list at 16 KiB (hyper's default) in the same way.
    /// At least 8 KiB (a smaller value counts as 8 KiB).
    pub max_head: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_timeout: crate::cli::DEFAULT_HEADER_TIMEOUT,
            body_timeout: crate::cli::DEFAULT_BODY_TIMEOUT,
            body_deadline: crate::cli::DEFAULT_BODY_DEADLINE,
            body_memory: crate::cli::DEFAULT_BODY_MEMORY,
            http2_keep_alive: Duration::from_secs(20),
            max_connections: crate::cli::DEFAULT_MAX_CONNECTIONS,
            http2_max_streams: 32,
            max_head: 16 * 1024,
        }
    }
}

/// Serves `router` on `listener` with connection info (for client-IP limits)
/// and the default [`Limits`] until `shutdown` resolves; see [`serve_with`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, router, shutdown, Limits::default()).await
}

/// Serves `router` on `listener` (HTTP/1 and HTTP/2 without TLS) with
/// connection info, within `limits`, until `shutdown` resolves; then stops
/// accepting (the listening socket is closed: new connections are refused),
/// lets every request in flight finish, and returns.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    limits: Limits,
) -> std::io::Result<()> {
    serve_until(listener, router, shutdown, std::future::pending(), limits).await
}

/// [`serve_with`], whose wait for the requests in flight after `shutdown`
/// ends when `cut_off` resolves (a deadline, a second signal): every
/// connection still open is then closed and every answer still under way
/// dropped, as when its client hangs up, so that each gives back its places
/// and settles its tokens at what it produced; this returns once they are
/// gone (or a moment later), with an error of kind
/// [`TimedOut`](std::io::ErrorKind::TimedOut). `cut_off` is polled only
/// once `shutdown` has resolved.
pub async fn serve_until(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    cut_off: impl std::future::Future<Output = ()> + Send,
    limits: Limits,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use tower_service::Service as _;

    let service = router;
    // A request body that sends nothing for as long is cut off.
    let body_timeout = limits.body_timeout.min(NEVER);
    // An admin body must arrive whole within it, as an estimate's must.
    let body_deadline = limits.body_deadline.min(NEVER);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout.min(NEVER))
        // hyper's smallest bound (it panics below it).
        .max_buf_size(limits.max_head.max(8 * 1024));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.http2_keep_alive.min(NEVER))
        .keep_alive_timeout(limits.http2_keep_alive.min(NEVER))
        .max_concurrent_streams(limits.http2_max_streams);
    // Told to every connection when the server stops, and read again by
    // the ones that begin meanwhile.
    let (stopping, stop) = tokio::sync::watch::channel(false);
    // Told to every connection when the wait for them is cut off.
    let (cutting, cut) = tokio::sync::watch::channel(false);
    let max_connections =
        u32::try_from(limits.max_connections.clamp(1, Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
    let places = Arc::new(Semaphore::new(max_connections as usize));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let place = tokio::select! {
            biased;
            () = &mut shutdown => break,
            place = Arc::clone(&places).acquire_owned() => place.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        // Small writes (a stream's events) go out at once.
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let activity = Activity::holding(Some(place));
        let requests = Arc::clone(&activity);
        let service = hyper::service::service_fn(move |mut req: axum::http::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let open = requests.begin();
            let http2 = req.version() == axum::http::Version::HTTP_2;
            let stall = Stall::new(body_timeout);
            req.extensions_mut().insert(Arc::clone(&stall));
            req.extensions_mut().insert(BodyDeadline(body_deadline));
            let req = req.map(|body| IdleTimeoutBody::new(body, body_timeout, stall));
            // A `Router` is always ready.
            let answer = service.clone().call(req);
            async move {
                let res = answer.await?;
                Ok::<_, std::convert::Infallible>(res.map(|body| Guarded::body(body, open, http2)))
            }
        });
        let builder = builder.clone();
        let mut stop = stop.clone();
        let mut cut = cut.clone();
        let header_timeout = limits.header_timeout;
        let write_timeout = limits.body_timeout;
        tokio::spawn(async move {
            // Telling HTTP/1 from HTTP/2 waits for the first bytes, before
            // hyper's header timeout runs: a client that sends nothing is
            // dropped after the same time, or when the server stops.
            let mut byte = [0u8; 1];
            let first = tokio::select! {
                first = tokio::time::timeout(header_timeout, stream.peek(&mut byte)) => first,
                _ = stop.wait_for(|&stopping| stopping) => Ok(Ok(0)),
            };
            if !matches!(first, Ok(Ok(1..))) {
                return;
            }
            let socket = Watched::new(stream, Arc::clone(&activity));
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(socket), service)
                .into_owned();
            let mut conn = std::pin::pin!(conn);
            let mut closing = false;
            let mut stopped = false;
            let ended = loop {
                tokio::select! {
                    // The connection first: a head it has read begins a
                    // request before the server's stop is looked at.
                    biased;
                    ended = conn.as_mut() => break ended,
                    // Requests in flight finish; then the connection closes.
                    () = activity.idle_for(header_timeout), if !closing => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    _ = stop.wait_for(|&stopping| stopping), if !stopped => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                        stopped = true;
                    }
                    // Stopping, with no request in flight and every answer
                    // handed to the socket a moment ago: hyper keeps an
                    // HTTP/1 connection halfway through a head open until
                    // its header timeout, which would hold the drain for a
                    // request never made. (An HTTP/2 client has its GOAWAY.)
                    () = activity.quiet_for(QUIET), if stopped => break Ok(()),
                    // Closed for idleness a timeout ago, and still open: an
                    // HTTP/2 client that ignores its GOAWAY, whose closing
                    // hyper holds until an unanswered ping times out.
                    () = activity.quiet_for(header_timeout.saturating_mul(2)), if closing => {
                        break Ok(());
                    }
                    // The drain is over: what is still under way is dropped.
                    _ = cut.wait_for(|&cut| cut) => break Ok(()),
                    // A client that stopped reading an answer holds its
                    // place (and its request's) for nothing: dropped.
                    () = activity.stalled_for(write_timeout) => {
                        tracing::debug!(%peer, "the client stopped reading; connection dropped");
                        break Ok(());
                    }
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            // Its place comes back once the connection and every answer
            // it began are dropped (see `Activity::holding`).
        });
    }
    drop(listener);
    let _ = stopping.send(true);
    // Every connection holds a place until it and its answers have ended.
    let drained = tokio::select! {
        _all = places.acquire_many(max_connections) => true,
        () = cut_off => false,
    };
    if drained {
        return Ok(());
    }
    let _ = cutting.send(true);
    // Dropping a connection ends its answers at once; HTTP/2's, in tasks
    // of their own, as soon as they run next. Bounded all the same: the
    // process is stopping.
    let _ = tokio::time::timeout(CUT_WAIT, places.acquire_many(max_connections)).await;
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "requests in flight were cut off",
    ))
}

/// After a failed `accept`: a connection the client gave up on is nothing;
/// anything else (out of file descriptors) is logged and waited out, so the
/// loop does not spin.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "cannot accept connections; retrying in a second");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Logs to stderr, filtered by `RUST_LOG` (or [`DEFAULT_LOG`] when it is
/// unset or empty). With `json`, one JSON object a line. A `RUST_LOG` that
/// does not parse is an error, as a bad flag is: replaced by the default,
/// or by nothing, it would hide what the operator asked to see.
fn init_logging(json: bool) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Err(std::env::VarError::NotPresent) => EnvFilter::new(DEFAULT_LOG),
        Err(std::env::VarError::NotUnicode(_)) => return Err("RUST_LOG is not UTF-8".to_owned()),
        Ok(v) if v.trim().is_empty() => EnvFilter::new(DEFAULT_LOG),
        Ok(v) => EnvFilter::builder()
            .parse(&v)
            .map_err(|e| format!("RUST_LOG `{v}`: {e}"))?,
    };
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        log.json().init();
    } else {
        log.init();
    }
    Ok(())
}

/// How long the startup check waits for each Redis node.
const PING_WAIT: Duration = Duration::from_secs(1);

/// How long a connection, once the gateway is stopping, must have had no
/// request open and no answer waiting on the socket before it is closed:
/// long enough for hyper to hand the last answer's bytes to the socket.
const QUIET: Duration = Duration::from_millis(50);

/// A time as good as never, for the timeouts hyper adds to the clock's
/// time: a longer one (`--header-timeout 1e19`, `Duration::MAX`) would
/// overflow the addition, a panic in every connection.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// How long [`serve_until`], once it has cut the requests in flight off,
/// waits for their connections and answers to be gone.
const CUT_WAIT: Duration = Duration::from_secs(1);

/// Asks each Redis node for `PING`, and logs a warning for each that does
/// not answer within [`PING_WAIT`]. Never fails: a single server's store
/// connects lazily and keeps retrying, so the server serves either way. A
/// cluster's store reads the cluster's slots when it is built, which the
/// caller reports if it fails. (The store has no ping of its own, so this
/// asks Redis directly.)
async fn ping_redis(urls: &[&str]) {
    let cluster = urls.len() > 1;
    for url in urls {
        // Every URL was checked with the flags (`cli::check_redis`).
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
        if cluster {
            tracing::warn!(redis = %node, %error, "a Redis Cluster node cannot be reached");
        } else {
            tracing::warn!(
                redis = %node,
                %error,
                "Redis cannot be reached; serving anyway: the store keeps retrying, and until \
                 Redis answers each plan's failure mode decides its requests"
            );
        }
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
    // `std::env::args` panics on an argument that is not UTF-8: such an
    // argument is bad flags, answered as any other.
    let args: Result<Vec<String>, String> = std::env::args_os()
        .skip(1)
        .map(|a| {
            a.into_string()
                .map_err(|a| format!("argument {a:?} is not UTF-8"))
        })
        .collect();
    let args = match args.and_then(|args| parse_args(args.into_iter())) {
        Ok(Parsed::Run(a)) => *a,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return std::process::ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("tollgate-gateway: {msg}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut args = args;
    if let Some(up) = args.upstream.take() {
        // The flag wins; the variable keeps the key out of `ps`.
        let up = match env_var("TOLLGATE_UPSTREAM_KEY") {
            _ if up.has_key() => up,
            Ok(Some(key)) if !key.is_empty() => match up.key(&key) {
                Ok(up) => up,
                Err(e) => {
                    eprintln!("tollgate-gateway: TOLLGATE_UPSTREAM_KEY: {e}");
                    return std::process::ExitCode::from(2);
                }
            },
            Ok(_) => up,
            Err(msg) => {
                eprintln!("tollgate-gateway: {msg}");
                return std::process::ExitCode::from(2);
            }
        };
        args.upstream = Some(up);
    }
    if let Err(msg) = init_logging(args.log_json) {
        eprintln!("tollgate-gateway: {msg}");
        return std::process::ExitCode::from(2);
    }
    let config = match &args.config {
        Some(path) => Config::load(path),
        None => {
            if args.upstream.is_some() {
                // The demo's keys and admin key are public: a real backend
                // behind them is open to anyone who has read the README.
                tracing::warn!(
                    "serving a real backend with the embedded demo config, whose keys and admin key are public: pass --config FILE"
                );
            }
            Config::from_toml(DEMO_CONFIG)
        }
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
        None => app_with_limits(
            &config,
            MemoryStore::new(),
            args.upstream.as_ref(),
            &args.limits(),
        ),
        Some(urls) => {
            let secret = match env_var("TOLLGATE_KEY_SECRET") {
                Ok(secret) => secret.unwrap_or_default(),
                Err(msg) => {
                    eprintln!("tollgate-gateway: {msg}");
                    return std::process::ExitCode::from(2);
                }
            };
            let urls: Vec<&str> = urls.split(',').map(str::trim).collect();
            ping_redis(&urls).await;
            let builder = match urls.as_slice() {
                [url] => RedisStore::builder(*url),
                nodes => RedisStore::cluster_builder(nodes.iter().copied()),
            };
            match builder
                .key_secret(secret)
                .timeout(args.redis_timeout)
                .build()
                .await
            {
                Ok(store) => app_with_limits(
                    &config,
                    redis.insert(store).clone(),
                    args.upstream.as_ref(),
                    &args.limits(),
                ),
                // A cluster's slots are read now: a cluster that cannot be
                // reached is an outage, not bad flags (exit code 1).
                Err(e)
                    if urls.len() > 1 && urls.iter().all(|u| redis::Client::open(*u).is_ok()) =>
                {
                    eprintln!(
                        "--redis: the Redis Cluster cannot be reached, and its slots are read at startup: {e}"
                    );
                    return std::process::ExitCode::from(1);
                }
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
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot listen for shutdown signals: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Some(up) = &args.upstream {
        tracing::info!(
            upstream = up.base(),
            credential = up.has_key(),
            "forwarding /v1/* to the upstream"
        );
    }
    println!(
        "tollgate-gateway listening on http://{}",
        listener.local_addr().map_or(args.listen, |a| a)
    );
    // The drain deadline starts with the first signal; a second one cuts
    // the drain short (an operator pressing Ctrl-C again).
    let (stopping, stopped) = tokio::sync::oneshot::channel();
    let shutdown = async move {
        signals.recv().await;
        tracing::info!("shutting down, finishing the requests in flight");
        let _ = stopping.send(signals);
    };
    let cut_off = async move {
        let Ok(mut signals) = stopped.await else {
            return std::future::pending().await;
        };
        // Dropped as a client that hangs up drops them: their places are
        // given back and their tokens settled at what they produced.
        tokio::select! {
            () = tokio::time::sleep(args.drain) => {
                tracing::error!(drain = ?args.drain, "requests still in flight after the signal: cut off");
            }
            () = signals.recv() => {
                tracing::error!("a second signal: the requests still in flight are cut off");
            }
        }
    };
    let served = serve_until(listener, app, shutdown, cut_off, args.limits()).await;
    // Every response has ended (or was cut off and dropped); the Redis
    // store may still be settling the last ones' tokens in the background.
    if let Some(store) = redis {
        store.drained().await;
    }
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server error");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The environment variable `name`, `None` when it is not set. One that
/// is not UTF-8 is an error, as a bad flag is: taken as unset, it would
/// quietly serve as the operator did not ask.
fn env_var(name: &str) -> Result<Option<String>, String> {
    match std::env::var(name) {
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name} is not UTF-8")),
    }
}

/// SIGTERM (what `kill`, systemd, Docker and Kubernetes send) and SIGINT
/// (Ctrl-C), listened for from when this is made.
///
/// On the first, [`serve`] stops accepting connections (the listening
/// socket is closed: new connections are refused) and lets every request
/// in flight finish, streams to their last event, so their tokens are
/// settled; on a second, or at the `--drain` deadline, the requests still
/// in flight are cut off.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    #[cfg(not(unix))]
    fn new() -> std::io::Result<Signals> {
        Ok(Signals {})
    }

    /// Resolves on the next signal.
    #[cfg(unix)]
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }

    /// Resolves on the next Ctrl-C.
    #[cfg(not(unix))]
    async fn recv(&mut self) {
        if tokio::signal::ctrl_c().await.is_err() {
            // No handler: run until killed rather than stop at once.
            std::future::pending::<()>().await;
        }
    }
}
