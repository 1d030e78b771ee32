//! Keys that live in a database: an SQLite file of hashed key values behind
//! the layer's resolver, an axum server on a loopback port, a real client.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use sha2::{Digest as _, Sha256};
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use tollgate::{
    ApiKey, KeyResolver, Policy, RateLimitLayer, Reason, Resolution, ResolveError, ResolvedKey,
    Resolver, ResolverFallback, Throttle, UsagePlan,
};

use crate::support::{client, frozen_store, header, ok, serve};

const FORBIDDEN: &str = r#"{"message":"Forbidden"}"#;
const UNAVAILABLE: &str = r#"{"message":"Service Unavailable"}"#;

/// The SHA-256 of a key value, in hex: what the table stores instead of the value.
fn sha256_hex(value: &str) -> String {
    Sha256::digest(value.as_bytes())
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// An SQLite database file of API keys, and how many times it was queried.
struct Keys {
    pool: SqlitePool,
    queries: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

impl Keys {
    async fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("keys.db"))
            .create_if_missing(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .unwrap();
        sqlx::query(
            "CREATE TABLE api_keys (
                value_hash TEXT PRIMARY KEY,
                id TEXT NOT NULL UNIQUE,
                plan TEXT NOT NULL,
                account TEXT,
                enabled BOOLEAN NOT NULL
            )",
        )
        .execute(&pool)
        .await
        .unwrap();
        for (value, id, plan, account, enabled) in [
            ("db-secret-1", "db-1", "free", Some("acme"), true),
            ("db-secret-2", "db-2", "free", None, true),
            ("db-secret-off", "db-off", "free", None, false),
            ("db-secret-pro", "db-pro", "pro", None, true),
            ("db-secret-gone", "db-gone", "no-such-plan", None, true),
            (
                "db-secret-gone-off",
                "db-gone-off",
                "no-such-plan",
                None,
                false,
            ),
        ] {
            sqlx::query("INSERT INTO api_keys VALUES (?1, ?2, ?3, ?4, ?5)")
                .bind(sha256_hex(value))
                .bind(id)
                .bind(plan)
                .bind(account)
                .bind(enabled)
                .execute(&pool)
                .await
                .unwrap();
        }
        Keys {
            pool,
            queries: Arc::new(AtomicUsize::new(0)),
            _dir: dir,
        }
    }

    fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }

    /// A resolver that finds a value's key by the hash of the value, from `table`.
    fn resolver(&self, table: &'static str) -> impl KeyResolver {
        self.slow_resolver(table, Duration::ZERO)
    }

    /// [`resolver`](Self::resolver), taking `delay` longer, as a busy
    /// database would.
    fn slow_resolver(&self, table: &'static str, delay: Duration) -> impl KeyResolver {
        let pool = self.pool.clone();
        let queries = Arc::clone(&self.queries);
        move |value: String| {
            let pool = pool.clone();
            queries.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(delay).await;
                let sql =
                    format!("SELECT id, plan, account, enabled FROM {table} WHERE value_hash = ?1");
                let row: Option<(String, String, Option<String>, bool)> = sqlx::query_as(&sql)
                    .bind(sha256_hex(&value))
                    .fetch_optional(&pool)
                    .await
                    .map_err(ResolveError::new)?;
                Ok(match row {
                    Some((id, plan, account, enabled)) => {
                        let key = ResolvedKey::new(id, plan).enabled(enabled);
                        Resolution::Found(match account {
                            Some(a) => key.account(a),
                            None => key,
                        })
                    }
                    None => Resolution::Unknown,
                })
            }
        }
    }
}

/// Plans `free` (1/s, bursts of 2) and `pro` (bursts of 1000), and one key
/// registered in the policy with the id of a database key.
fn policy() -> Policy {
    Policy::builder()
        .plan(UsagePlan::new("free").throttle(Throttle::new(1.0, 2).unwrap()))
        .plan(UsagePlan::new("pro").throttle(Throttle::new(1.0, 1000).unwrap()))
        // The account the database names for `db-1`: a key answered with an
        // account the policy does not have is a failed lookup, as a plan is.
        .account(tollgate::Account::new("acme").throttle(Throttle::new(1.0, 1000).unwrap()))
        .key(ApiKey::new("db-1", "registered-value-of-db-1", "free").account("acme"))
        .build()
        .unwrap()
}

/// Serves `GET /` behind the layer with `resolver`, on a frozen clock.
async fn serve_with(resolver: Resolver) -> String {
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(policy())
        .store(store)
        .resolver(resolver)
        .build();
    serve(Router::new().route("/", get(ok)).layer(layer)).await
}

async fn get_with_key(url: &str, key: &str) -> reqwest::Response {
    client()
        .get(url)
        .header("x-api-key", key)
        .send()
        .await
        .unwrap()
}

async fn assert_body(res: reqwest::Response, status: u16, body: &str) {
    assert_eq!(res.status(), status);
    assert_eq!(header(&res, "content-type"), "application/json");
    assert_eq!(res.text().await.unwrap(), body);
}

#[tokio::test]
async fn a_database_key_is_admitted_and_limited_under_its_plan() {
    let keys = Keys::new().await;
    let base = serve_with(Resolver::new(keys.resolver("api_keys"))).await;

    let res = get_with_key(&base, "db-secret-2").await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "ratelimit-policy"), r#""throttle";q=2;w=2"#);
    assert_eq!(res.text().await.unwrap(), "ok");
    assert_eq!(get_with_key(&base, "db-secret-2").await.status(), 200);
    let res = get_with_key(&base, "db-secret-2").await;
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "retry-after"), "1");
    // One query; the later requests were decided from the cache.
    assert_eq!(keys.queries(), 1);

    // Another database key has its own bucket.
    assert_eq!(get_with_key(&base, "db-secret-pro").await.status(), 200);
    assert_eq!(keys.queries(), 2);
}

#[tokio::test]
async fn a_resolved_key_shares_its_counters_with_the_registered_key_of_its_id() {
    let keys = Keys::new().await;
    let base = serve_with(Resolver::new(keys.resolver("api_keys"))).await;

    assert_eq!(get_with_key(&base, "db-secret-1").await.status(), 200);
    assert_eq!(
        get_with_key(&base, "registered-value-of-db-1")
            .await
            .status(),
        200
    );
    // Bursts of 2 for the id `db-1`, whichever value is sent.
    assert_eq!(get_with_key(&base, "db-secret-1").await.status(), 429);
    assert_eq!(
        get_with_key(&base, "registered-value-of-db-1")
            .await
            .status(),
        429
    );
    // The registered value never reaches the database.
    assert_eq!(keys.queries(), 1);
}

#[tokio::test]
async fn an_unknown_value_is_403_and_asked_once() {
    let keys = Keys::new().await;
    let base = serve_with(Resolver::new(keys.resolver("api_keys"))).await;

    for _ in 0..3 {
        assert_body(get_with_key(&base, "not-a-key").await, 403, FORBIDDEN).await;
    }
    // The negative cache answered the second and third.
    assert_eq!(keys.queries(), 1);
}

#[tokio::test]
async fn a_disabled_database_key_is_403() {
    let keys = Keys::new().await;
    let base = serve_with(Resolver::new(keys.resolver("api_keys"))).await;
    assert_body(get_with_key(&base, "db-secret-off").await, 403, FORBIDDEN).await;
    assert_body(get_with_key(&base, "db-secret-off").await, 403, FORBIDDEN).await;
    assert_eq!(keys.queries(), 1);
}

#[tokio::test]
async fn a_key_of_a_plan_the_policy_does_not_have_is_a_failed_lookup() {
    let keys = Keys::new().await;
    let base = serve_with(Resolver::new(keys.resolver("api_keys"))).await;
    assert_body(
        get_with_key(&base, "db-secret-gone").await,
        503,
        UNAVAILABLE,
    )
    .await;
}

/// A key the database says is disabled is refused as one, whatever plan
/// it names: not a failed lookup (503, gRPC `UNAVAILABLE`), which a client
/// retries, as if it could pass later.
#[tokio::test]
async fn a_disabled_database_key_of_a_plan_the_policy_does_not_have_is_403() {
    let keys = Keys::new().await;
    let base = serve_with(Resolver::new(keys.resolver("api_keys"))).await;
    for _ in 0..2 {
        assert_body(
            get_with_key(&base, "db-secret-gone-off").await,
            403,
            FORBIDDEN,
        )
        .await;
    }
    let res = client()
        .get(&base)
        .header("x-api-key", "db-secret-gone-off")
        .header("content-type", "application/grpc")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "grpc-status"), "16");
    assert_eq!(keys.queries(), 1);
}

#[tokio::test]
async fn a_hanging_resolver_is_503_within_the_timeout() {
    let hang = |_: String| std::future::pending::<Result<Resolution, ResolveError>>();
    let timeout = Duration::from_millis(300);
    let base = serve_with(Resolver::new(hang).timeout(timeout)).await;

    let start = Instant::now();
    let res = get_with_key(&base, "db-secret-1").await;
    let took = start.elapsed();
    assert_body(res, 503, UNAVAILABLE).await;
    assert!(took >= timeout, "{took:?}");
    assert!(took < timeout + Duration::from_secs(1), "{took:?}");
}

#[tokio::test]
async fn a_failing_database_is_503_or_the_configured_403() {
    let keys = Keys::new().await;
    // A table that does not exist: every query fails.
    let base = serve_with(Resolver::new(keys.resolver("missing_table"))).await;
    assert_body(get_with_key(&base, "db-secret-1").await, 503, UNAVAILABLE).await;
    // A failure is not cached: the next request asks again.
    assert_body(get_with_key(&base, "db-secret-1").await, 503, UNAVAILABLE).await;
    assert_eq!(keys.queries(), 2);
    // A gRPC call is told UNAVAILABLE, trailers-only.
    let res = client()
        .get(&base)
        .header("x-api-key", "db-secret-1")
        .header("content-type", "application/grpc")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "grpc-status"), "14");
    assert_eq!(header(&res, "grpc-message"), "Service Unavailable");

    let fallback =
        Resolver::new(keys.resolver("missing_table")).fallback(ResolverFallback::UnknownKey);
    let base = serve_with(fallback).await;
    assert_body(get_with_key(&base, "db-secret-1").await, 403, FORBIDDEN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_first_requests_make_one_query() {
    let keys = Keys::new().await;
    // Slow enough that the requests arrive while the first one's query runs.
    let slow = keys.slow_resolver("api_keys", Duration::from_millis(200));
    let base = serve_with(Resolver::new(slow)).await;
    let c = client();
    let requests: Vec<_> = (0..100)
        .map(|_| {
            let req = c.get(&base).header("x-api-key", "db-secret-pro").send();
            tokio::spawn(async move { req.await.unwrap().status() })
        })
        .collect();
    for r in requests {
        assert_eq!(r.await.unwrap(), 200);
    }
    assert_eq!(keys.queries(), 1);
}

#[test]
fn check_consults_only_the_cache() {
    let never = |_: String| async { Ok(Resolution::Found(ResolvedKey::new("db-2", "free"))) };
    let layer = RateLimitLayer::builder(policy())
        .resolver(Resolver::new(never))
        .build();
    let rejected = layer.check(b"db-secret-2", 1).unwrap_err();
    assert_eq!(rejected.reason(), Reason::UnknownKey);
    // A registered key is decided as before.
    assert!(layer.check(b"registered-value-of-db-1", 1).is_ok());
}

#[tokio::test]
async fn decide_asks_the_resolver_then_check_finds_the_key_cached() {
    let keys = Keys::new().await;
    let layer = RateLimitLayer::builder(policy())
        .resolver(Resolver::new(keys.resolver("api_keys")))
        .build();
    assert!(layer.decide(b"db-secret-2", 1).await.is_ok());
    assert!(layer.check(b"db-secret-2", 1).is_ok());
    assert_eq!(
        layer.check(b"db-secret-2", 1).unwrap_err().reason(),
        Reason::Limited
    );
    assert_eq!(
        layer
            .decide(b"db-secret-off", 1)
            .await
            .unwrap_err()
            .reason(),
        Reason::DisabledKey
    );
    assert_eq!(keys.queries(), 2);
}

/// A flood of values that are no key, each sent twice so that the cache
/// sees it used again, must not make the database be asked again for the
/// keys in use: their answers stay cached while guesses come and go.
#[tokio::test]
async fn a_flood_of_unknown_values_does_not_push_out_the_keys_in_use() {
    let keys = Keys::new().await;
    let mut good = Vec::new();
    for i in 0..50 {
        let value = format!("good-secret-{i}");
        sqlx::query("INSERT INTO api_keys VALUES (?1, ?2, 'pro', NULL, TRUE)")
            .bind(sha256_hex(&value))
            .bind(format!("good-{i}"))
            .execute(&keys.pool)
            .await
            .unwrap();
        good.push(value);
    }
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(policy())
        .store(store)
        .resolver(Resolver::new(keys.resolver("api_keys")).capacity(1_000))
        .build();
    for v in &good {
        assert!(layer.decide(v.as_bytes(), 1).await.is_ok());
    }
    assert_eq!(keys.queries(), 50);
    // Rounds of twice the cache's capacity in guesses, the keys in use
    // between them.
    let (rounds, guesses) = (3, 2_000);
    for round in 0..rounds {
        for i in 0..guesses {
            let guess = format!("guess-{round}-{i}");
            for _ in 0..2 {
                let refused = layer.decide(guess.as_bytes(), 1).await.unwrap_err();
                assert_eq!(refused.reason(), Reason::UnknownKey);
            }
        }
        for v in &good {
            assert!(layer.decide(v.as_bytes(), 1).await.is_ok());
        }
    }
    // One query per guess (its second sending answered from the cache), and
    // none more for the keys in use.
    assert_eq!(keys.queries(), 50 + rounds * guesses);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_lookup_holds_up_no_other_key() {
    let keys = Keys::new().await;
    /// The database answers one value only after 3 s (a lock, a slow
    /// index), the others at once.
    struct OneSlow<F, S>(F, S);
    impl<F: KeyResolver, S: KeyResolver> KeyResolver for OneSlow<F, S> {
        fn resolve<'a>(&'a self, value: &'a str) -> tollgate::ResolveFuture<'a> {
            match value {
                "db-secret-1" => self.1.resolve(value),
                _ => self.0.resolve(value),
            }
        }
    }
    let either = OneSlow(
        keys.resolver("api_keys"),
        keys.slow_resolver("api_keys", Duration::from_secs(3)),
    );
    let base = serve_with(Resolver::new(either).timeout(Duration::from_secs(5))).await;
    let stuck = {
        let base = base.clone();
        tokio::spawn(async move { get_with_key(&base, "db-secret-1").await.status() })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    assert_eq!(get_with_key(&base, "db-secret-2").await.status(), 200);
    assert_eq!(
        get_with_key(&base, "registered-value-of-db-1")
            .await
            .status(),
        200
    );
    assert_body(get_with_key(&base, "not-a-key").await, 403, FORBIDDEN).await;
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(!stuck.is_finished());
    assert_eq!(stuck.await.unwrap(), 200);
}

/// A key disabled, then removed in the database is refused once its cached
/// answer is older than the positive TTL, and not before.
#[tokio::test]
async fn a_key_disabled_then_removed_in_the_database_is_refused_after_the_ttl() {
    let keys = Keys::new().await;
    let clock = tollgate::ManualClock::new();
    let resolver = Resolver::new(keys.resolver("api_keys"))
        .positive_ttl(Duration::from_secs(60))
        .negative_ttl(Duration::from_secs(10))
        .clock(clock.clone());
    let base = serve_with(resolver).await;
    assert_eq!(get_with_key(&base, "db-secret-pro").await.status(), 200);

    sqlx::query("UPDATE api_keys SET enabled = FALSE WHERE id = 'db-pro'")
        .execute(&keys.pool)
        .await
        .unwrap();
    clock.advance(Duration::from_millis(59_999));
    assert_eq!(get_with_key(&base, "db-secret-pro").await.status(), 200);
    clock.advance(Duration::from_millis(1));
    assert_body(get_with_key(&base, "db-secret-pro").await, 403, FORBIDDEN).await;

    sqlx::query("DELETE FROM api_keys WHERE id = 'db-pro'")
        .execute(&keys.pool)
        .await
        .unwrap();
    clock.advance(Duration::from_secs(60));
    assert_body(get_with_key(&base, "db-secret-pro").await, 403, FORBIDDEN).await;
    // Now a value that is no key: cached for the negative TTL.
    assert_body(get_with_key(&base, "db-secret-pro").await, 403, FORBIDDEN).await;
    assert_eq!(keys.queries(), 3);
}

/// The request whose lookup others wait for goes away (its client hung up):
/// a waiting request takes the lookup over, and is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_whose_request_goes_away_is_taken_over_by_a_waiting_one() {
    let keys = Keys::new().await;
    let slow = keys.slow_resolver("api_keys", Duration::from_millis(400));
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(policy())
        .store(store)
        .resolver(Resolver::new(slow).timeout(Duration::from_secs(5)))
        .build();
    let first = {
        let layer = layer.clone();
        tokio::spawn(async move { layer.decide(b"db-secret-pro", 1).await.is_ok() })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = {
        let layer = layer.clone();
        tokio::spawn(async move { layer.decide(b"db-secret-pro", 1).await.is_ok() })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    first.abort();
    let start = Instant::now();
    assert!(second.await.unwrap());
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(keys.queries(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolver_that_panics_is_a_failed_lookup() {
    // Panics inside its future, and (for the second value) before it makes one.
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let panics = move |value: String| {
        counted.fetch_add(1, Ordering::SeqCst);
        assert_ne!(value, "panics-at-once", "resolver bug");
        async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            panic!("resolver bug for a value of {} bytes", value.len());
        }
    };
    let base = serve_with(Resolver::new(panics)).await;
    // Concurrent requests with one value share the one lookup's failure.
    let waiting: Vec<_> = (0..5)
        .map(|_| {
            let base = base.clone();
            tokio::spawn(async move { get_with_key(&base, "panics-later").await })
        })
        .collect();
    for w in waiting {
        assert_body(w.await.unwrap(), 503, UNAVAILABLE).await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_body(
        get_with_key(&base, "panics-at-once").await,
        503,
        UNAVAILABLE,
    )
    .await;
    // Nothing was cached: the next request asks again.
    assert_body(get_with_key(&base, "panics-later").await, 503, UNAVAILABLE).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    let fallback = Resolver::new(|_: String| async { panic!("resolver bug") })
        .fallback(ResolverFallback::UnknownKey);
    let base = serve_with(fallback).await;
    assert_body(get_with_key(&base, "db-secret-1").await, 403, FORBIDDEN).await;
}

/// A database key on a plan with a token budget, whose requests' bodies the
/// estimator reads once the key is found: one query per request, the
/// answer it got deciding the request after the body is read. Found keys
/// are not cached here (a positive TTL of 0), so that a second lookup
/// would be a second query.
#[tokio::test]
async fn a_key_whose_body_is_read_is_looked_up_once() {
    let keys = Keys::new().await;
    sqlx::query("INSERT INTO api_keys VALUES (?1, 'db-llm', 'llm', NULL, TRUE)")
        .bind(sha256_hex("db-secret-llm"))
        .execute(&keys.pool)
        .await
        .unwrap();
    let policy = Policy::builder()
        .plan(
            UsagePlan::new("llm")
                .throttle(Throttle::new(1.0, 100).unwrap())
                .tokens(tollgate::TokenBudget::new().per_minute(1_000).unwrap()),
        )
        .build()
        .unwrap();
    let (_clock, store) = frozen_store();
    let resolver = Resolver::new(keys.resolver("api_keys")).positive_ttl(Duration::ZERO);
    let layer = RateLimitLayer::builder(policy)
        .store(store)
        .estimator(tollgate::openai::OpenAiEstimator::new())
        .resolver(resolver)
        .build();
    let base = serve(
        Router::new()
            .route("/v1/completions", axum::routing::post(ok))
            .layer(layer),
    )
    .await;
    for n in 1..=2 {
        let res = client()
            .post(format!("{base}/v1/completions"))
            .header("x-api-key", "db-secret-llm")
            .json(&serde_json::json!({"model": "m", "prompt": "hello", "max_tokens": 10}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.text().await.unwrap(), "ok");
        assert_eq!(keys.queries(), n);
    }
}

/// A key value that is not UTF-8 (from an extractor that takes any bytes)
/// cannot be asked of the resolver, which takes text: it is refused as a
/// malformed key, at once, not as a key the database does not hold.
#[tokio::test]
async fn a_key_that_is_not_utf8_is_malformed_and_never_asked() {
    let keys = Keys::new().await;
    let layer = RateLimitLayer::builder(policy())
        .resolver(Resolver::new(keys.resolver("api_keys")))
        .build();
    let malformed = Reason::Key(tollgate::extract::KeyError::Malformed);
    for value in [&b"db-secret-\xff"[..], b"\xc3", b"cl\xe9"] {
        let refused = layer.decide(value, 1).await.unwrap_err();
        assert_eq!(refused.reason(), malformed);
        assert_eq!(refused.status(), 403);
        assert_eq!(layer.check(value, 1).unwrap_err().reason(), malformed);
    }
    assert_eq!(keys.queries(), 0);
    // Valid UTF-8 is asked as before.
    assert_eq!(
        layer.decide(b"not-a-key", 1).await.unwrap_err().reason(),
        Reason::UnknownKey
    );
    assert_eq!(keys.queries(), 1);
}

/// Two instances on one Redis, each with its own resolver over the one
/// database: a key found through either counts in the one state of its id,
/// so the instances together admit its plan's burst once, and its
/// registered value on either instance counts there too.
#[tokio::test]
async fn resolved_keys_share_their_state_between_instances_through_redis() {
    if !crate::support::redis::require_redis() {
        return;
    }
    let server = crate::support::redis::RedisServer::start();
    let keys = Keys::new().await;
    let clock = tollgate::ManualClock::new();
    let mut instances = Vec::new();
    for _ in 0..2 {
        let store = tollgate::RedisStore::builder(server.url())
            .prefix("resolved")
            .clock(clock.clone())
            .build()
            .await
            .unwrap();
        let layer = RateLimitLayer::builder(policy())
            .store(store)
            .resolver(Resolver::new(keys.resolver("api_keys")))
            .build();
        instances.push(layer);
    }
    // `db-2` (bursts of 2), found on both instances.
    let mut passed = 0;
    for _ in 0..3 {
        for layer in &instances {
            passed += usize::from(layer.decide(b"db-secret-2", 1).await.is_ok());
        }
    }
    assert_eq!(passed, 2);
    assert_eq!(keys.queries(), 2);
    // `db-1`: found on one instance, registered on the other.
    let mut passed = 0;
    for _ in 0..3 {
        passed += usize::from(instances[0].decide(b"db-secret-1", 1).await.is_ok());
        passed += usize::from(
            instances[1]
                .decide(b"registered-value-of-db-1", 1)
                .await
                .is_ok(),
        );
    }
    assert_eq!(passed, 2);
    // A second later one more passes, on whichever instance.
    clock.advance(Duration::from_secs(1));
    assert!(instances[1].decide(b"db-secret-2", 1).await.is_ok());
    assert!(instances[0].decide(b"db-secret-2", 1).await.is_err());
}

/// The OpenAI headers of a response, in order: limit, remaining, reset of
/// each family, `-` for one that is missing.
fn openai_headers(res: &reqwest::Response) -> Vec<String> {
    ["requests", "tokens"]
        .iter()
        .flat_map(|family| {
            ["limit", "remaining", "reset"].map(|what| {
                let name = format!("x-ratelimit-{what}-{family}");
                res.headers()
                    .get(&name)
                    .map_or("-".to_owned(), |v| v.to_str().unwrap().to_owned())
            })
        })
        .collect()
}

/// With OpenAI's headers, a resolved key's first request (its answer just
/// looked up) is answered with the `x-ratelimit-*` headers its later ones
/// carry, allowed or rejected, and so is every request of a key whose
/// answer is not cached (a positive TTL of 0, a cache too small to hold
/// it). A rejection by the quota reports the family's defining limit, the
/// plan's throttle, as the allowed responses before it did.
#[tokio::test]
async fn the_first_request_of_a_resolved_key_carries_the_openai_headers() {
    let keys = Keys::new().await;
    let pro = UsagePlan::new("pro")
        .throttle(Throttle::new(1.0, 100).unwrap())
        .quota(tollgate::Quota::new(2, tollgate::Period::Day).unwrap());
    let policy = || {
        Policy::builder()
            .plan(pro.clone())
            .key(ApiKey::new("db-pro", "registered-value-of-db-pro", "pro"))
            .build()
            .unwrap()
    };
    for ttl in [Duration::from_secs(60), Duration::ZERO] {
        // A request of the key's registered value, then one of its
        // database value (its first), rejected by the quota; and one of the
        // database value alone, allowed, whose headers the rejection
        // repeats.
        let (_clock, store) = frozen_store();
        let layer = RateLimitLayer::builder(policy())
            .openai()
            .store(store)
            .resolver(Resolver::new(keys.resolver("api_keys")).positive_ttl(ttl))
            .build();
        let base = serve(Router::new().route("/", get(ok)).layer(layer)).await;
        let res = get_with_key(&base, "db-secret-pro").await;
        assert_eq!(res.status(), 200);
        assert_eq!(openai_headers(&res)[..2], ["100", "99"], "ttl {ttl:?}");
        assert_eq!(
            get_with_key(&base, "registered-value-of-db-pro")
                .await
                .status(),
            200
        );
        let later = get_with_key(&base, "registered-value-of-db-pro").await;
        assert_eq!(later.status(), 429);
        assert_eq!(openai_headers(&later)[..2], ["100", "0"]);

        let (_clock, store) = frozen_store();
        let layer = RateLimitLayer::builder(policy())
            .openai()
            .store(store)
            .resolver(Resolver::new(keys.resolver("api_keys")).positive_ttl(ttl))
            .build();
        let base = serve(Router::new().route("/", get(ok)).layer(layer)).await;
        for _ in 0..2 {
            let res = get_with_key(&base, "registered-value-of-db-pro").await;
            assert_eq!(res.status(), 200);
        }
        let first = get_with_key(&base, "db-secret-pro").await;
        assert_eq!(first.status(), 429);
        assert_eq!(
            openai_headers(&first),
            openai_headers(&later),
            "ttl {ttl:?}"
        );
    }
}
/// A key whose answer names a plan the policy does not have yet is a
/// failed lookup; once the plan is put, the key is served at once, not
/// only after its answer's positive TTL.
#[tokio::test]
async fn a_key_of_a_plan_put_later_is_served_once_the_plan_is_there() {
    let keys = Keys::new().await;
    let clock = tollgate::ManualClock::new();
    let resolver = Resolver::new(keys.resolver("api_keys"))
        .positive_ttl(Duration::from_secs(60))
        .clock(clock.clone());
    let (_store_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(policy())
        .store(store)
        .resolver(resolver)
        .build();
    let admin = layer.admin();
    let base = serve(Router::new().route("/", get(ok)).layer(layer)).await;
    assert_body(
        get_with_key(&base, "db-secret-gone").await,
        503,
        UNAVAILABLE,
    )
    .await;
    admin
        .put_plan(UsagePlan::new("no-such-plan").throttle(Throttle::new(1.0, 5).unwrap()))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(1));
    let res = get_with_key(&base, "db-secret-gone").await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "ratelimit-policy"), r#""throttle";q=5;w=5"#);

    // An account the policy does not have yet, likewise.
    sqlx::query("INSERT INTO api_keys VALUES (?1, 'db-later', 'free', 'later', TRUE)")
        .bind(sha256_hex("db-secret-later"))
        .execute(&keys.pool)
        .await
        .unwrap();
    assert_body(
        get_with_key(&base, "db-secret-later").await,
        503,
        UNAVAILABLE,
    )
    .await;
    admin
        .put_account(tollgate::Account::new("later").throttle(Throttle::new(1.0, 1).unwrap()))
        .await
        .unwrap();
    assert_eq!(get_with_key(&base, "db-secret-later").await.status(), 200);
    // The account's bucket of 1 is used up.
    assert_eq!(get_with_key(&base, "db-secret-later").await.status(), 429);
    // Each answer was asked for once.
    assert_eq!(keys.queries(), 2);
}

/// A database that answers after `delay`, and counts the lookups it is
/// answering at once: the most there ever were.
struct Busy {
    keys: Keys,
    now: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

impl Busy {
    async fn new() -> Busy {
        Busy {
            keys: Keys::new().await,
            now: Arc::new(AtomicUsize::new(0)),
            most: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn resolver(&self, delay: Duration) -> impl KeyResolver {
        let inner = Arc::new(self.keys.slow_resolver("api_keys", delay));
        let (now, most) = (Arc::clone(&self.now), Arc::clone(&self.most));
        move |value: String| {
            let (inner, now, most) = (Arc::clone(&inner), Arc::clone(&now), Arc::clone(&most));
            async move {
                /// Counts the lookup out however it ends (answered, or
                /// dropped at the timeout).
                struct Out(Arc<AtomicUsize>);
                impl Drop for Out {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                let _out = Out(now);
                most.fetch_max(n, Ordering::SeqCst);
                inner.resolve(&value).await
            }
        }
    }
}

/// A flood of values that are no key, each a fresh lookup of a slow
/// database, holds at most the resolver's bound of lookups in flight; past
/// it a value is answered at once as a failed lookup is (503, or the
/// fallback), not queued; and a key whose answer is cached is served
/// throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_unknown_values_holds_at_most_the_bound_of_lookups() {
    let busy = Busy::new().await;
    let resolver = Resolver::new(busy.resolver(Duration::from_millis(300)))
        .max_in_flight(4)
        .timeout(Duration::from_secs(2));
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(policy())
        .store(store)
        .resolver(resolver)
        .build();
    // `db-pro` is looked up, and cached.
    assert!(layer.decide(b"db-secret-pro", 1).await.is_ok());
    assert_eq!(busy.keys.queries(), 1);
    let base = serve(Router::new().route("/", get(ok)).layer(layer)).await;

    let c = client();
    let start = Instant::now();
    let flood: Vec<_> = (0..200)
        .map(|i| {
            let req = c
                .get(&base)
                .header("x-api-key", format!("guess-{i}"))
                .send();
            tokio::spawn(async move {
                let res = req.await.unwrap();
                (res.status().as_u16(), Instant::now())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The cached key is served while the flood is on, at once.
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(get_with_key(&base, "db-secret-pro").await.status(), 200);
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
    }
    let (mut forbidden, mut unavailable) = (0, 0);
    for f in flood {
        let (status, at) = f.await.unwrap();
        match status {
            403 => forbidden += 1,
            503 => {
                unavailable += 1;
                // Answered at once, not after waiting for a lookup.
                assert!(at - start < Duration::from_millis(250), "{:?}", at - start);
            }
            other => panic!("{other}"),
        }
    }
    assert!(
        busy.most.load(Ordering::SeqCst) <= 4,
        "{}",
        busy.most.load(Ordering::SeqCst)
    );
    assert!(forbidden >= 4, "{forbidden}");
    assert!(unavailable >= 100, "{unavailable}");
    assert_eq!(busy.keys.queries(), 1 + forbidden);
    // Once the flood is over, lookups go on.
    assert_body(get_with_key(&base, "guess-again").await, 403, FORBIDDEN).await;
    assert_eq!(get_with_key(&base, "db-secret-2").await.status(), 200);
}

/// Past the bound, a lookup is answered as the configured fallback says;
/// requests that wait for a lookup in flight of their own value are no
/// lookup of their own, and are answered with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_bound_of_lookups_the_fallback_answers_and_waiters_share_a_lookup() {
    let busy = Busy::new().await;
    let resolver = Resolver::new(busy.resolver(Duration::from_millis(300)))
        .max_in_flight(1)
        .fallback(ResolverFallback::UnknownKey);
    let base = serve_with(resolver).await;
    // Ten requests of one key: one lookup, which all of them wait for.
    let waiting: Vec<_> = (0..10)
        .map(|_| {
            let base = base.clone();
            tokio::spawn(async move { get_with_key(&base, "db-secret-pro").await.status() })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Another value finds the one lookup the bound allows taken.
    let t = Instant::now();
    assert_body(get_with_key(&base, "db-secret-2").await, 403, FORBIDDEN).await;
    assert!(
        t.elapsed() < Duration::from_millis(150),
        "{:?}",
        t.elapsed()
    );
    for w in waiting {
        assert_eq!(w.await.unwrap(), 200);
    }
    assert_eq!(busy.keys.queries(), 1);
    assert_eq!(busy.most.load(Ordering::SeqCst), 1);
    // The refused value was not cached as no key: it is asked now.
    assert_eq!(get_with_key(&base, "db-secret-2").await.status(), 200);
    assert_eq!(busy.keys.queries(), 2);
}

/// A 429 for a key the resolver found announces the policies its allowed
/// responses did: its account's and its plan's, not only the one that
/// denied.
#[tokio::test]
async fn a_resolved_keys_rejection_announces_the_policies_of_its_answers() {
    let keys = Keys::new().await;
    let base = serve_with(Resolver::new(keys.resolver("api_keys"))).await;
    let want = r#""account";q=1000;w=1000, "throttle";q=2;w=2"#;
    for _ in 0..2 {
        let res = get_with_key(&base, "db-secret-1").await;
        assert_eq!(res.status(), 200);
        assert_eq!(header(&res, "ratelimit-policy"), want);
    }
    let res = get_with_key(&base, "db-secret-1").await;
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "ratelimit-policy"), want);
    assert_eq!(header(&res, "ratelimit"), r#""throttle";r=0;t=1"#);
}

/// A value the resolver answers with the id of a registered key is that
/// key: what `Admin` does to the id applies to the value's cached answer at
/// once. Disabled, it is refused; enabled again, admitted; moved, decided
/// under the new plan. Removed, the id is no registered key any more: the
/// value's cached answer is dropped and the database asked again.
#[tokio::test]
async fn admin_changes_of_a_registered_id_apply_to_its_resolved_values_at_once() {
    let keys = Keys::new().await;
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(policy())
        .store(store)
        .resolver(Resolver::new(keys.resolver("api_keys")))
        .build();
    let admin = layer.admin();
    let base = serve(Router::new().route("/", get(ok)).layer(layer)).await;
    assert_eq!(get_with_key(&base, "db-secret-1").await.status(), 200);

    admin.set_enabled("db-1", false).await.unwrap();
    assert_body(get_with_key(&base, "db-secret-1").await, 403, FORBIDDEN).await;
    assert_body(
        get_with_key(&base, "registered-value-of-db-1").await,
        403,
        FORBIDDEN,
    )
    .await;

    admin.set_enabled("db-1", true).await.unwrap();
    let res = get_with_key(&base, "db-secret-1").await;
    assert_eq!(res.status(), 200);
    // Both values of `db-1` used up its burst of 2 under `free`.
    assert_eq!(get_with_key(&base, "db-secret-1").await.status(), 429);

    // Moved to `pro` (bursts of 1000): the database still says `free`, the
    // registry's word for the id holds.
    admin.set_plan("db-1", "pro").await.unwrap();
    let res = get_with_key(&base, "db-secret-1").await;
    assert_eq!(res.status(), 200);
    assert!(
        header(&res, "ratelimit-policy").contains("q=1000"),
        "{}",
        header(&res, "ratelimit-policy")
    );
    assert_eq!(keys.queries(), 1);

    admin.remove_key("db-1").await.unwrap();
    // Asked again, and decided under the database's answer (`free`, whose
    // burst `db-1` used up).
    assert_eq!(get_with_key(&base, "db-secret-1").await.status(), 429);
    assert_eq!(keys.queries(), 2);
    assert_body(
        get_with_key(&base, "registered-value-of-db-1").await,
        403,
        FORBIDDEN,
    )
    .await;

    // An id only the resolver knows is no key of the registry; a disabled
    // key added with its id refuses every value of it at once.
    assert_eq!(get_with_key(&base, "db-secret-pro").await.status(), 200);
    assert!(matches!(
        admin.set_enabled("db-pro", false).await,
        Err(tollgate::AdminError::UnknownKey(_))
    ));
    admin
        .add_key(ApiKey::new("db-pro", "blocked-value-of-db-pro", "pro").enabled(false))
        .await
        .unwrap();
    assert_body(get_with_key(&base, "db-secret-pro").await, 403, FORBIDDEN).await;
    // `db-1`'s two values after its removal, and `db-pro`'s once.
    assert_eq!(keys.queries(), 4);
}

/// With the Redis store's shared registry, a registered id disabled, moved
/// or removed through one instance applies within a second to its values
/// another instance resolved and cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_through_another_instance_apply_to_cached_resolved_values() {
    if !crate::support::redis::require_redis() {
        return;
    }
    let server = crate::support::redis::RedisServer::start();
    let keys = Keys::new().await;
    let clock = tollgate::ManualClock::new();
    let mut instances = Vec::new();
    for _ in 0..2 {
        let store = tollgate::RedisStore::builder(server.url())
            .key_secret("shared-secret")
            .clock(clock.clone())
            .build()
            .await
            .unwrap();
        let layer = RateLimitLayer::builder(policy())
            .store(store)
            .resolver(Resolver::new(keys.resolver("api_keys")))
            .build();
        instances.push(layer);
    }
    let (a, b) = (&instances[0], &instances[1]);
    assert!(b.decide(b"db-secret-1", 1).await.is_ok());

    let until = async |what: &str, ok: bool| {
        let t = Instant::now();
        while b.decide(b"db-secret-1", 0).await.is_ok() != ok {
            assert!(t.elapsed() < Duration::from_secs(3), "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    a.admin().set_enabled("db-1", false).await.unwrap();
    until("disabled through a reaches b", false).await;
    let refused = b.decide(b"db-secret-1", 1).await.unwrap_err();
    assert_eq!(refused.reason(), Reason::DisabledKey);

    a.admin().set_enabled("db-1", true).await.unwrap();
    until("enabled through a reaches b", true).await;
    a.admin().set_plan("db-1", "pro").await.unwrap();
    let t = Instant::now();
    while b.standing(b"db-secret-1").await.unwrap().plan() != "pro" {
        assert!(t.elapsed() < Duration::from_secs(3), "moved through a");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(keys.queries(), 1);

    a.admin().remove_key("db-1").await.unwrap();
    let t = Instant::now();
    while keys.queries() < 2 {
        assert!(t.elapsed() < Duration::from_secs(3), "removed through a");
        let _ = b.decide(b"db-secret-1", 0).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b.standing(b"db-secret-1").await.unwrap().plan(), "free");
}
