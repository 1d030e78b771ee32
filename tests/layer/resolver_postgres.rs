//! Keys that live in a real PostgreSQL database (see `support::postgres`)
//! behind the layer's resolver: what a Redis store's local copy holds for
//! them after a plan is put anew through another instance, and what a flood
//! of values nobody registered gets while the database is down.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tollgate::extract::ApiKeyHeader;
use tollgate::{
    FailureMode, KeyResolver, ManualClock, Policy, RateLimitLayer, RedisStore, Resolution,
    ResolveError, ResolvedKey, Resolver, Throttle, UsagePlan,
};

use crate::support::postgres::{require_postgres, table_name};
use crate::support::redis::{RedisServer, require_redis};
use crate::support::{client, frozen_store, ok, serve};

/// A table of API keys in the test database (values kept as they are: the
/// hashing of values is `resolver.rs`'s concern), and how many times it was
/// queried.
struct PgKeys {
    pool: PgPool,
    table: String,
    queries: Arc<AtomicUsize>,
}

impl PgKeys {
    /// A new table on `pool`, holding `rows` of (value, id, plan).
    async fn new(pool: PgPool, rows: &[(&str, &str, &str)]) -> PgKeys {
        let table = table_name("api_keys");
        sqlx::query(&format!(
            "CREATE TABLE {table} (value TEXT PRIMARY KEY, id TEXT NOT NULL, \
             plan TEXT NOT NULL, enabled BOOLEAN NOT NULL)"
        ))
        .execute(&pool)
        .await
        .unwrap();
        for (value, id, plan) in rows {
            sqlx::query(&format!("INSERT INTO {table} VALUES ($1, $2, $3, TRUE)"))
                .bind(value)
                .bind(id)
                .bind(plan)
                .execute(&pool)
                .await
                .unwrap();
        }
        PgKeys {
            pool,
            table,
            queries: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }

    /// A resolver that looks a value up in the table through `pool` (the
    /// table's own, or one on a database that is down).
    fn resolver_on(&self, pool: PgPool) -> impl KeyResolver + use<> {
        let sql = format!(
            "SELECT id, plan, enabled FROM {} WHERE value = $1",
            self.table
        );
        let queries = Arc::clone(&self.queries);
        move |value: String| {
            let (pool, sql) = (pool.clone(), sql.clone());
            queries.fetch_add(1, Ordering::SeqCst);
            async move {
                let row: Option<(String, String, bool)> = sqlx::query_as(&sql)
                    .bind(value)
                    .fetch_optional(&pool)
                    .await
                    .map_err(ResolveError::new)?;
                Ok(match row {
                    Some((id, plan, enabled)) => {
                        Resolution::Found(ResolvedKey::new(id, plan).enabled(enabled))
                    }
                    None => Resolution::Unknown,
                })
            }
        }
    }

    fn resolver(&self) -> impl KeyResolver + use<> {
        self.resolver_on(self.pool.clone())
    }

    async fn drop_table(self) {
        sqlx::query(&format!("DROP TABLE {}", self.table))
            .execute(&self.pool)
            .await
            .unwrap();
    }
}

type Layer = RateLimitLayer<ApiKeyHeader, RedisStore>;

/// The value of the key the database holds, on plan "t".
const VALUE: &[u8] = b"pg-secret-1";

/// How long a change may take to reach another instance, with room for a
/// busy machine.
const WAIT: Duration = Duration::from_millis(3000);

/// Plan "t", decided by the local copy through an outage, never lent out
/// (every decision reaches Redis, and so the copy).
fn plan(rate: f64, burst: u32) -> UsagePlan {
    UsagePlan::new("t")
        .throttle(Throttle::new(rate, burst).unwrap())
        .failure(FailureMode::Local)
        .borrow(false)
}

/// Plan "t" of 1/s and bursts of 10, and no key: the only key is the
/// database's.
fn policy(clock: &ManualClock) -> Policy {
    Policy::builder()
        .clock(clock.clone())
        .plan(plan(1.0, 10))
        .build()
        .unwrap()
}

/// A store on `redis` that shares its registry, on `clock`; a short
/// timeout, so that an outage is decided by the copy at once.
async fn store(redis: &RedisServer, clock: &ManualClock) -> RedisStore {
    RedisStore::builder(redis.url())
        .key_secret("shared-secret")
        .clock(clock.clone())
        .timeout(Duration::from_millis(300))
        .over_limit_cache(Duration::ZERO)
        .build()
        .await
        .unwrap()
}

/// How many of `n` requests of cost 1 are admitted.
async fn allowed(layer: &Layer, n: usize) -> usize {
    let mut passed = 0;
    for _ in 0..n {
        passed += usize::from(layer.decide(VALUE, 1).await.is_ok());
    }
    passed
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < WAIT, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A plan put anew through instance `a` reaches `b`, whose resolver holds
/// a database key on it, and `b`'s local copy of that key's bucket is
/// converted then, as a registered key's is: when Redis goes away
/// afterwards, `b` decides under the new numbers with the share of the
/// key's bucket in use carried over. The bucket of 10 grown to 20 at the
/// same rate, with 5 of it used: half of it is in use, 10 pass
/// (unconverted, 15); made ten times faster, half a bucket of 10 is 5 left
/// (unconverted, none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_put_through_another_instance_converts_the_local_copy_of_a_resolved_key() {
    if !require_redis() {
        return;
    }
    let Some(pool) = require_postgres().await else {
        return;
    };
    let keys = PgKeys::new(pool, &[("pg-secret-1", "pg-1", "t")]).await;
    for (new, expected) in [((1.0, 20), 10), ((10.0, 10), 5)] {
        let mut redis = RedisServer::start();
        let clock = ManualClock::new();
        let a = RateLimitLayer::builder(policy(&clock))
            .store(store(&redis, &clock).await)
            .build();
        let b_store = store(&redis, &clock).await;
        let b = RateLimitLayer::builder(policy(&clock))
            .store(b_store.clone())
            .resolver(Resolver::new(keys.resolver()))
            .build();
        let asked = keys.queries();
        assert_eq!(allowed(&b, 5).await, 5, "Redis admits 5 through b");
        assert_eq!(keys.queries() - asked, 1, "the key was looked up once");
        a.admin().put_plan(plan(new.0, new.1)).await.unwrap();
        until("the plan reaches b", || {
            b.admin().plan("t") == Some(plan(new.0, new.1))
        })
        .await;
        tokio::task::block_in_place(|| redis.kill());
        assert_eq!(
            allowed(&b, 30).await,
            expected,
            "admitted by b's copy under {new:?}, half of the bucket in use"
        );
        assert!(b_store.local_decisions() > 0, "decided by the local copy");
    }
    keys.drop_table().await;
}

/// A database that accepts connections and never answers (a server stuck,
/// or a network that drops the replies): every connection is held open,
/// and nothing is ever written to it. Ends with the test's runtime.
async fn stuck_database() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    format!("postgres://postgres@127.0.0.1:{port}/test")
}

/// While the database is down (it takes connections and never answers), a
/// flood of distinct values nobody registered, and a key of the database
/// among them, are each answered 503 within the resolver's timeout, never
/// a hang; at most the bound of lookups is ever in flight; and no failure
/// is cached: once the database is back, the key is served at once and a
/// value of the flood is asked again (and found to be no key).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_unknown_values_while_the_database_is_down_is_503_within_the_timeout() {
    let Some(pool) = require_postgres().await else {
        return;
    };
    let keys = PgKeys::new(pool, &[("pg-secret-1", "pg-1", "t")]).await;
    let down = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(30))
        .connect_lazy(&stuck_database().await)
        .unwrap();
    let is_down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let resolver = {
        let (up, down) = (Arc::new(keys.resolver()), Arc::new(keys.resolver_on(down)));
        let is_down = Arc::clone(&is_down);
        let (now, most) = (Arc::clone(&now), Arc::clone(&most));
        move |value: String| {
            let source = match is_down.load(Ordering::SeqCst) {
                true => Arc::clone(&down) as Arc<dyn KeyResolver>,
                false => Arc::clone(&up) as Arc<dyn KeyResolver>,
            };
            let (now, most) = (Arc::clone(&now), Arc::clone(&most));
            async move {
                /// Counts the lookup out however it ends (answered, or
                /// dropped at the timeout).
                struct Out(Arc<AtomicUsize>);
                impl Drop for Out {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                most.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                let _out = Out(now);
                source.resolve(&value).await
            }
        }
    };
    let timeout = Duration::from_millis(300);
    let (_clock, store) = frozen_store();
    let policy = Policy::builder().plan(plan(1.0, 1000)).build().unwrap();
    let layer = RateLimitLayer::builder(policy)
        .store(store)
        .resolver(Resolver::new(resolver).timeout(timeout).max_in_flight(8))
        .build();
    let base = serve(Router::new().route("/", get(ok)).layer(layer)).await;

    let c = client();
    let start = Instant::now();
    let flood: Vec<_> = (0..400)
        .map(|i| {
            let value = match i {
                200 => "pg-secret-1".to_owned(),
                _ => format!("guess-{i}"),
            };
            let req = c.get(&base).header("x-api-key", value).send();
            tokio::spawn(async move {
                let res = req.await.unwrap();
                let status = res.status().as_u16();
                (status, res.text().await.unwrap(), start.elapsed())
            })
        })
        .collect();
    for f in flood {
        let (status, body, took) = f.await.unwrap();
        assert_eq!(status, 503);
        assert_eq!(body, r#"{"message":"Service Unavailable"}"#);
        // Within the timeout, with room for a busy machine: not the
        // database pool's wait for a connection (30 s).
        assert!(took < timeout + Duration::from_secs(2), "{took:?}");
    }
    assert!(
        most.load(Ordering::SeqCst) <= 8,
        "{}",
        most.load(Ordering::SeqCst)
    );
    let asked = keys.queries();
    assert!(asked >= 8, "{asked}");

    // The database is back: nothing of the outage was cached.
    is_down.store(false, Ordering::SeqCst);
    let get = |value: &'static str| c.get(&base).header("x-api-key", value).send();
    assert_eq!(get("pg-secret-1").await.unwrap().status(), 200);
    assert_eq!(get("guess-7").await.unwrap().status(), 403);
    assert_eq!(keys.queries() - asked, 2);
    keys.drop_table().await;
}
