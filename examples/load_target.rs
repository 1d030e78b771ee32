//! Run with `cargo run --release --example load_target -- bare|tollgate|governor [PORT]`
//!
//! The server `benches/load.sh` sends load to: an axum server on
//! `127.0.0.1:PORT` (default 3100) with one route, `GET /`, answering `ok`,
//! in one of three modes:
//!
//! - `bare`: the route alone;
//! - `tollgate`: behind `RateLimitLayer` with the default `x-api-key` extractor,
//!   a policy of 10,000 registered keys on one plan and the default IETF
//!   `RateLimit-Policy` / `RateLimit` response headers;
//! - `governor`: behind tower_governor's `GovernorLayer`, keyed by the same
//!   `x-api-key` header, with `use_headers()` (`x-ratelimit-limit` /
//!   `-remaining` response headers).
//!
//! Both limits are one request per second with a bucket of `u32::MAX`, the
//! same as in `benches/layer.rs`, so no request is ever refused during a load
//! run. Requests should carry `x-api-key: key-00004242`, one of the registered
//! keys.
//!
//! ```text
//! curl -i localhost:3100/ -H 'x-api-key: key-00004242'
//! ```
//!
//! The runtime has one worker thread: the load script pins the server to one
//! core and the load generator to the other, and more workers than cores would
//! only add switches between them.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::process::ExitCode;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request};
use axum::routing::get;
use tollgate::{ApiKey, Policy, RateLimitLayer, Throttle, UsagePlan};
use tower_governor::GovernorError;
use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;

/// Registered keys in the tollgate policy.
const KEYS: usize = 10_000;
const DEFAULT_PORT: u16 = 3100;
const USAGE: &str = "usage: load_target bare|tollgate|governor [PORT]";

/// tower_governor key extractor: the `x-api-key` header value.
#[derive(Debug, Clone, Copy)]
struct ApiKeyHeader;

impl KeyExtractor for ApiKeyHeader {
    type Key = HeaderValue;

    fn extract<T>(&self, req: &Request<T>) -> Result<Self::Key, GovernorError> {
        req.headers()
            .get("x-api-key")
            .cloned()
            .ok_or(GovernorError::UnableToExtractKey)
    }
}

/// One request per second with a bucket no load run can empty.
fn throttle() -> Throttle {
    Throttle::new(1.0, u32::MAX).expect("a valid throttle")
}

fn registered_policy() -> Policy {
    (0..KEYS)
        .fold(
            Policy::builder().plan(UsagePlan::new("load").throttle(throttle())),
            |p, i| {
                p.key(ApiKey::new(
                    format!("id-{i}"),
                    format!("key-{i:08}"),
                    "load",
                ))
            },
        )
        .build()
        .expect("a valid policy")
}

fn app(mode: &str) -> Option<Router> {
    let route = Router::new().route("/", get(|| async { "ok" }));
    match mode {
        "bare" => Some(route),
        "tollgate" => Some(route.layer(RateLimitLayer::new(registered_policy()))),
        "governor" => {
            let config = GovernorConfigBuilder::default()
                .period(Duration::from_secs(1))
                .burst_size(NonZeroU32::MAX.get())
                .key_extractor(ApiKeyHeader)
                .use_headers()
                .finish()
                .expect("a valid governor config");
            Some(route.layer(GovernorLayer::<_, _, Body>::new(config)))
        }
        _ => None,
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_default();
    let port = match args.next().map(|p| p.parse::<u16>()) {
        None => DEFAULT_PORT,
        Some(Ok(port)) => port,
        Some(Err(e)) => {
            eprintln!("{USAGE}: bad port: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(app) = app(&mode) else {
        eprintln!("{USAGE}");
        return ExitCode::FAILURE;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"));
        eprintln!("load_target: {mode} on http://{addr}/");
        axum::serve(listener, app).await.expect("the server runs");
    });
    ExitCode::SUCCESS
}
