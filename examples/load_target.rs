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
use std::process::ExitCode;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use tollgate::RateLimitLayer;
use tower_governor::GovernorLayer;

#[path = "../benches/support/stack.rs"]
mod stack;

use stack::{KEY, governor_config, registered_policy};

const DEFAULT_PORT: u16 = 3100;
const USAGE: &str = "usage: load_target bare|tollgate|governor [PORT]";

fn app(mode: &str) -> Option<Router> {
    let route = Router::new().route("/", get(|| async { "ok" }));
    match mode {
        "bare" => Some(route),
        "tollgate" => Some(route.layer(RateLimitLayer::new(registered_policy()))),
        "governor" => Some(route.layer(GovernorLayer::<_, _, Body>::new(governor_config()))),
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
        eprintln!("load_target: {mode} on http://{addr}/ (send x-api-key: {KEY})");
        axum::serve(listener, app).await.expect("the server runs");
    });
    ExitCode::SUCCESS
}
