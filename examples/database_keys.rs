//! Run with: cargo run --example database_keys
//!
//! API keys that live in a database, not in the policy: the layer asks a
//! [`Resolver`] for every key value it does not hold, and caches the answer
//! (found keys 60 s, unknown values 10 s; one query for concurrent requests
//! with one value; a failed or slow query answered 503).
//!
//! The table stores the SHA-256 of each key value, never the value: a leak
//! of the table gives no working key. The resolver hashes the value it is
//! given and looks the hash up. (A high-entropy generated key needs no slow
//! password hash; a short human-chosen secret would.)
//!
//! The demo makes an SQLite file in a temporary folder, serves on a loopback
//! port, sends a few requests and prints what they got.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use sha2::{Digest, Sha256};
use sqlx::SqlitePool;
use sqlx::sqlite::SqliteConnectOptions;
use tollgate::{
    Account, Period, Policy, Quota, RateLimitLayer, Resolution, ResolveError, ResolvedKey,
    Resolver, Throttle, UsagePlan,
};

/// The hex SHA-256 of a key value: what the table stores.
fn value_hash(value: &str) -> String {
    Sha256::digest(value.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The key a value stands for, looked up by the value's hash.
async fn find_key(pool: SqlitePool, value: String) -> Result<Resolution, ResolveError> {
    let row: Option<(String, String, Option<String>, bool)> =
        sqlx::query_as("SELECT id, plan, account, enabled FROM api_keys WHERE value_hash = ?1")
            .bind(value_hash(&value))
            .fetch_optional(&pool)
            .await
            .map_err(ResolveError::new)?;
    Ok(match row {
        None => Resolution::Unknown,
        Some((id, plan, account, enabled)) => {
            let key = ResolvedKey::new(id, plan).enabled(enabled);
            Resolution::Found(match account {
                Some(account) => key.account(account),
                None => key,
            })
        }
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("keys.db"))
        .create_if_missing(true);
    let pool = SqlitePool::connect_with(options).await?;
    sqlx::query(
        "CREATE TABLE api_keys (value_hash TEXT PRIMARY KEY, id TEXT NOT NULL UNIQUE,
         plan TEXT NOT NULL, account TEXT, enabled BOOLEAN NOT NULL)",
    )
    .execute(&pool)
    .await?;
    // Issuing a key: show the value to its owner once, store only its hash.
    sqlx::query("INSERT INTO api_keys VALUES (?1, 'key-1', 'free', 'acme', TRUE)")
        .bind(value_hash("demo-db-key"))
        .execute(&pool)
        .await?;

    // The plans and accounts live in the policy, the keys in the database: a
    // key whose plan or account the policy does not have is answered 503.
    let policy = Policy::builder()
        .plan(UsagePlan::new("free").throttle(Throttle::new(1.0, 2)?))
        .account(Account::new("acme").quota(Quota::new(10_000, Period::Day)?))
        .build()?;
    // At most 4 lookups at once: a flood of guessed values leaves the pool's
    // other connections (of its default 10) to the rest of the application.
    let lookups = pool.clone();
    let resolver = Resolver::new(move |value| find_key(lookups.clone(), value))
        .timeout(Duration::from_millis(500))
        .max_in_flight(4);
    let layer = RateLimitLayer::builder(policy).resolver(resolver).build();
    let app = Router::new()
        .route("/", get(|| async { "hello\n" }))
        .layer(layer);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(listener, app).await
    });

    let client = reqwest::Client::builder().no_proxy().build()?;
    for key in ["demo-db-key", "demo-db-key", "demo-db-key", "not-a-key"] {
        let res = client
            .get(format!("http://{addr}/"))
            .header("x-api-key", key)
            .send()
            .await?;
        println!("{key}: {} {}", res.status(), res.text().await?.trim());
    }
    Ok(())
}
