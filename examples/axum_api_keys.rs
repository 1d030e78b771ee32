//! Run with: cargo run --example axum_api_keys --features axum [-- --listen ADDR]
//!
//! An axum API whose callers send an API key in the `x-api-key` header. Each
//! key belongs to a usage plan: `free` allows 2 requests a second in bursts
//! of 5 and 1000 a UTC day, with a slower limit on one route; `pro` allows
//! 50 a second in bursts of 100. A missing or unknown key gets 403, a key
//! over its limits 429 with `Retry-After`; every answer to a known key carries the
//! `RateLimit-Policy` and `RateLimit` headers.
//!
//! ```sh
//! for i in 1 2 3 4 5 6; do
//!   curl -s -o /dev/null -w '%{http_code}\n' localhost:3000/v1/hello -H 'x-api-key: demo-free-key'
//! done   # 200 200 200 200 200 429
//! curl -i localhost:3000/v1/hello                                  # 403: no key
//! ```

use std::net::SocketAddr;

use axum::Router;
use axum::routing::{get, post};
use tollgate::{ApiKey, Period, Policy, Quota, RateLimitLayer, Throttle, UsagePlan};

const USAGE: &str = "\
Usage: axum_api_keys [--listen ADDR]

  --listen ADDR   address to serve on [default: 127.0.0.1:3000; port 0 picks a free port]
  -h, --help      print this help

Keys: demo-free-key (plan free), demo-pro-key (plan pro), in the x-api-key header.
";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen = listen_arg();

    let policy = Policy::builder()
        .plan(
            UsagePlan::new("free")
                .throttle(Throttle::new(2.0, 5)?) // 2 a second, bursts of 5
                .quota(Quota::new(1000, Period::Day)?) // 1000 a UTC day
                // A slower limit on one route ("<matched path>/<METHOD>").
                .method("/v1/generate/POST", Throttle::new(1.0, 2)?),
        )
        .plan(UsagePlan::new("pro").throttle(Throttle::new(50.0, 100)?))
        .key(ApiKey::new("free-1", "demo-free-key", "free"))
        .key(ApiKey::new("pro-1", "demo-pro-key", "pro"))
        .build()?;
    // `RateLimitLayer::builder(policy)` sets the header the key is read from,
    // the store, the rejection bodies and more; `layer.admin()` adds, disables
    // and re-plans keys while serving, and reports usage.
    let layer = RateLimitLayer::new(policy);

    let app = Router::new()
        .route("/v1/hello", get(|| async { "hello\n" }))
        .route("/v1/generate", post(|| async { "{\"text\":\"…\"}\n" }))
        .layer(layer);

    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

/// The address of `--listen`; prints the help and exits for `--help`.
fn listen_arg() -> SocketAddr {
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 3000));
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next();
        match (arg.as_str(), value.and_then(|v| v.parse().ok())) {
            ("-h" | "--help", _) => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            ("--listen", Some(addr)) => listen = addr,
            _ => {
                eprint!("axum_api_keys: bad argument {arg:?}\n\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    listen
}
