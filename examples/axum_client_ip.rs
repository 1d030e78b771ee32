//! Run with: cargo run --example axum_client_ip --features axum [-- --listen ADDR] [--trust-proxy CIDR]...
//!
//! An axum service without API keys, limited per client address: 5 requests
//! a second in bursts of 10 for each client. Behind a reverse proxy or load
//! balancer every connection comes from the proxy, so the client is read from
//! `X-Forwarded-For`, but only from proxies listed with `--trust-proxy`: a
//! client that sends its own `X-Forwarded-For` straight to the service is
//! keyed by its real address, and the addresses a trusted proxy appends are
//! read from the right, so a client cannot claim another's address. IPv6
//! clients are grouped by /64.
//!
//! With the default `--trust-proxy 127.0.0.1/32`, curl on this machine plays
//! the proxy:
//!
//! ```sh
//! for i in $(seq 11); do
//!   curl -s -o /dev/null -w '%{http_code} ' localhost:3000/ -H 'x-forwarded-for: 203.0.113.7'
//! done   # ten 200, then 429
//! curl -s -o /dev/null -w '%{http_code}\n' localhost:3000/ -H 'x-forwarded-for: 203.0.113.8'
//! # 200: another client has its own budget
//! ```
//!
//! In production, list your proxies' addresses (`--trust-proxy 10.0.0.0/8`).

use std::net::SocketAddr;

use axum::Router;
use axum::routing::get;
use tollgate::extract::ClientIp;
use tollgate::{Policy, RateLimitLayer, Throttle, UsagePlan};

const USAGE: &str = "\
Usage: axum_client_ip [--listen ADDR] [--trust-proxy CIDR]...

  --listen ADDR        address to serve on [default: 127.0.0.1:3000; port 0 picks a free port]
  --trust-proxy CIDR   a proxy network trusted to set X-Forwarded-For, repeatable
                       [default: 127.0.0.1/32]
  -h, --help           print this help
";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 3000));
    let mut proxies = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_default();
        match arg.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(());
            }
            "--listen" => listen = value.parse().unwrap_or_else(|_| usage_error(&value)),
            "--trust-proxy" => proxies.push(value.parse().unwrap_or_else(|_| usage_error(&value))),
            _ => usage_error(&arg),
        }
    }
    if proxies.is_empty() {
        proxies.push("127.0.0.1/32".parse()?);
    }

    // One plan for every client; `Policy::builder().anonymous(..)` would
    // instead limit the requests without a key beside keyed plans.
    let policy = Policy::per_key(UsagePlan::new("per-ip").throttle(Throttle::new(5.0, 10)?))?;
    let layer = RateLimitLayer::builder(policy)
        .extractor(ClientIp::new().trust_proxies(proxies))
        .build();

    let app = Router::new()
        .route("/", get(|| async { "hello\n" }))
        .layer(layer);

    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    // `ClientIp` reads the peer address that axum puts in `ConnectInfo`.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}

fn usage_error(arg: &str) -> ! {
    eprint!("axum_client_ip: bad argument {arg:?}\n\n{USAGE}");
    std::process::exit(2);
}
