//! Run with: cargo run --example redis_shared --features axum,redis [-- --redis URL]
//!
//! Two instances of one service share a budget through Redis: each has its
//! own `RateLimitLayer` over its own `RedisStore`, as two processes would,
//! and both name the same Redis (`--redis URL`, else `REDIS_URL`, else
//! `redis://127.0.0.1:6379/`; several comma-separated URLs name the nodes of
//! a Redis Cluster). The plan allows a burst of 5 then 1 request a second per
//! key, and the demo sends 8 requests with one key, alternating between the
//! instances: 5 pass in all, not 5 on each.
//!
//! ```sh
//! redis-server --port 6379 --save '' &   # or any Redis you can reach
//! cargo run --example redis_shared --features axum,redis
//! # request 1 on instance a: 200 … request 6 on instance b: 429 … 5 of 8 passed
//! ```

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::Request;
use tollgate::{ApiKey, Policy, RateLimitLayer, RedisStore, Throttle, UsagePlan};
use tower::ServiceExt;

const USAGE: &str = "\
Usage: redis_shared [--redis URL]

  --redis URL   the Redis both instances share; comma-separated URLs name the
                nodes of a Redis Cluster [default: $REDIS_URL, else redis://127.0.0.1:6379/]
  -h, --help    print this help
";

/// What every instance must agree on to share one budget: the plans and
/// keys, and the secret that keys the names of their state in Redis.
const KEY_SECRET: &str = "change me: the same secret on every instance";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut url = std::env::var("REDIS_URL").unwrap_or("redis://127.0.0.1:6379/".to_owned());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--redis", Some(value)) => url = value,
            ("-h" | "--help", _) => {
                print!("{USAGE}");
                return Ok(());
            }
            _ => {
                eprint!("redis_shared: bad argument {arg:?}\n\n{USAGE}");
                std::process::exit(2);
            }
        }
    }

    let a = instance(&url).await?;
    let b = instance(&url).await?;
    let mut passed = 0;
    for i in 1..=8 {
        let (name, app) = if i % 2 == 1 { ("a", &a) } else { ("b", &b) };
        let request = Request::get("/v1/hello")
            .header("x-api-key", "demo-key")
            .body(Body::empty())?;
        let response = app.clone().oneshot(request).await?;
        let remaining = response
            .headers()
            .get("ratelimit")
            .and_then(|value| value.to_str().ok())
            .unwrap_or("-");
        println!(
            "request {i} on instance {name}: {} (RateLimit: {remaining})",
            response.status().as_u16()
        );
        passed += usize::from(response.status().is_success());
    }
    println!("{passed} of 8 passed");
    Ok(())
}

/// One instance of the service: its own store and layer over the shared Redis.
async fn instance(url: &str) -> Result<Router, Box<dyn std::error::Error>> {
    let store = if url.contains(',') {
        RedisStore::cluster_builder(url.split(','))
    } else {
        RedisStore::builder(url)
    }
    .key_secret(KEY_SECRET)
    .timeout(Duration::from_millis(200))
    .build()
    .await?;
    let policy = Policy::builder()
        .plan(UsagePlan::new("shared").throttle(Throttle::new(1.0, 5)?))
        .key(ApiKey::new("demo", "demo-key", "shared"))
        .build()?;
    let layer = RateLimitLayer::builder(policy).store(store).build();
    Ok(Router::new()
        .route("/v1/hello", get(|| async { "hello\n" }))
        .layer(layer))
}
