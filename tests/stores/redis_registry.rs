//! What the local copy of a Redis store (the limits a plan whose failure
//! mode is `local` is decided by while Redis cannot answer) holds after a
//! change made through another instance, against a real `redis-server`:
//! two stores sharing one registry in one Redis are two instances. A plan
//! or account put anew reaches an instance through its registry's log (or
//! a full read of the registry after a gap in the log), and its copy is
//! converted then as it is when the instance's own `Admin` puts it: the
//! share of each bucket in use carries over to the new numbers.

use std::time::{Duration, Instant};

use tollgate::extract::ApiKeyHeader;
use tollgate::{
    Account, ApiKey, FailureMode, ManualClock, Policy, RateLimitLayer, RedisStore, Throttle,
    UsagePlan,
};

use crate::support::redis::{RedisServer, command, require_redis};

type Layer = RateLimitLayer<ApiKeyHeader, RedisStore>;

/// How long a change may take to reach another instance, with room for a
/// busy machine.
const WAIT: Duration = Duration::from_millis(3000);

/// The one key's value.
const VALUE: &[u8] = b"k-value-1";

/// Plan "t", decided by the local copy through an outage, never lent out
/// (every decision reaches Redis, and so the copy).
fn plan(rate: f64, burst: u32) -> UsagePlan {
    UsagePlan::new("t")
        .throttle(Throttle::new(rate, burst).unwrap())
        .failure(FailureMode::Local)
        .borrow(false)
}

/// Account "acme" with a throttle of `rate` and `burst`.
fn account(rate: f64, burst: u32) -> Account {
    Account::new("acme").throttle(Throttle::new(rate, burst).unwrap())
}

/// Plan "t" of `rate` and `burst` and (with `acme`) account "acme", with
/// one key on both.
fn policy(clock: &ManualClock, (rate, burst): (f64, u32), acme: Option<Account>) -> Policy {
    let mut key = ApiKey::new("k-1", std::str::from_utf8(VALUE).unwrap(), "t");
    let mut b = Policy::builder()
        .clock(clock.clone())
        .plan(plan(rate, burst));
    if let Some(acme) = acme {
        b = b.account(acme);
        key = key.account("acme");
    }
    b.key(key).build().unwrap()
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

/// The bucket of 10 grown to 20 at the same rate, with 5 of it used: half
/// of it is in use, 10 pass (unconverted, the copy's bucket read 5 s into
/// a span of 20 s and admitted 15); made ten times faster, half a bucket of
/// 10 is 5 left (unconverted, none).
const CHANGES: [((f64, u32), usize); 2] = [((1.0, 20), 10), ((10.0, 10), 5)];

/// A plan put anew through instance `a` reaches `b` through its registry's
/// log, and `b`'s local copy is converted then: when Redis goes away
/// afterwards, `b` decides under the new numbers with the share of its
/// bucket in use carried over, as if its own `Admin` had put the plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_put_through_another_instance_converts_the_local_copy() {
    if !require_redis() {
        return;
    }
    for (new, expected) in CHANGES {
        let mut redis = RedisServer::start();
        let clock = ManualClock::new();
        let a = RateLimitLayer::builder(policy(&clock, (1.0, 10), None))
            .store(store(&redis, &clock).await)
            .build();
        let b_store = store(&redis, &clock).await;
        let b = RateLimitLayer::builder(policy(&clock, (1.0, 10), None))
            .store(b_store.clone())
            .build();
        assert_eq!(allowed(&b, 5).await, 5, "Redis admits 5 through b");
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
}

/// A plan put anew through an instance's own `Admin` converts its copy
/// once: not again when the instance's watcher delivers the same change
/// from the log (converted twice, the half of the bucket in use would read
/// as all of it, and nothing would pass).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_put_through_the_instance_itself_converts_the_local_copy_once() {
    if !require_redis() {
        return;
    }
    for (new, expected) in CHANGES {
        let mut redis = RedisServer::start();
        let clock = ManualClock::new();
        let a_store = store(&redis, &clock).await;
        let a = RateLimitLayer::builder(policy(&clock, (1.0, 10), None))
            .store(a_store.clone())
            .build();
        let b = RateLimitLayer::builder(policy(&clock, (1.0, 10), None))
            .store(store(&redis, &clock).await)
            .build();
        assert_eq!(allowed(&a, 5).await, 5, "Redis admits 5 through a");
        a.admin().put_plan(plan(new.0, new.1)).await.unwrap();
        // A change put after it through b reaches a after a's own.
        let other = UsagePlan::new("other");
        b.admin().put_plan(other.clone()).await.unwrap();
        until("a's watcher passes its own change", || {
            a.admin().plan("other") == Some(other.clone())
        })
        .await;
        tokio::task::block_in_place(|| redis.kill());
        assert_eq!(
            allowed(&a, 30).await,
            expected,
            "admitted by a's copy under {new:?}, half of the bucket in use"
        );
        assert!(a_store.local_decisions() > 0, "decided by the local copy");
    }
}

/// An account put anew through `a`: `b`'s copy of the account's bucket is
/// converted when the change arrives, as a plan's is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_put_through_another_instance_converts_the_local_copy() {
    if !require_redis() {
        return;
    }
    for (new, expected) in CHANGES {
        let mut redis = RedisServer::start();
        let clock = ManualClock::new();
        let roomy = (1000.0, 1000);
        let a = RateLimitLayer::builder(policy(&clock, roomy, Some(account(1.0, 10))))
            .store(store(&redis, &clock).await)
            .build();
        let b_store = store(&redis, &clock).await;
        let b = RateLimitLayer::builder(policy(&clock, roomy, Some(account(1.0, 10))))
            .store(b_store.clone())
            .build();
        assert_eq!(allowed(&b, 5).await, 5, "Redis admits 5 through b");
        a.admin().put_account(account(new.0, new.1)).await.unwrap();
        // The log is applied in order: the plan put after the account
        // reaches b after it.
        let marker = plan(999.0, 999);
        a.admin().put_plan(marker.clone()).await.unwrap();
        until("the changes reach b", || {
            b.admin().plan("t") == Some(marker.clone())
        })
        .await;
        tokio::task::block_in_place(|| redis.kill());
        assert_eq!(
            allowed(&b, 30).await,
            expected,
            "admitted by b's copy under the account's {new:?}"
        );
        assert!(b_store.local_decisions() > 0, "decided by the local copy");
    }
}

/// An instance's registry watcher, held still: the layer was built in a
/// runtime of its own, which runs no task until [`resume`](Self::resume)
/// drives it. The store's connection lives on the test's runtime, so the
/// layer decides as usual meanwhile.
struct Paused {
    runtime: Option<tokio::runtime::Runtime>,
    /// Dropped with the test: ends the thread that drives the runtime.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Paused {
    fn resume(&mut self) {
        let runtime = self.runtime.take().expect("resumed once");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(stop);
        std::thread::spawn(move || {
            runtime.block_on(async {
                let _ = stopped.await;
            })
        });
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A plan put through `a` while `b`'s watcher is held still, and the log
/// then trimmed past it: `b` finds a gap in the log and reads the whole
/// registry again, and its copy is converted by that read as by the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_read_again_after_a_gap_in_the_log_converts_the_local_copy() {
    if !require_redis() {
        return;
    }
    for (new, expected) in CHANGES {
        let mut redis = RedisServer::start();
        let clock = ManualClock::new();
        let a = RateLimitLayer::builder(policy(&clock, (1.0, 10), None))
            .store(store(&redis, &clock).await)
            .build();
        let b_store = store(&redis, &clock).await;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let b = {
            let _entered = runtime.enter();
            RateLimitLayer::builder(policy(&clock, (1.0, 10), None))
                .store(b_store.clone())
                .build()
        };
        let mut paused = Paused {
            runtime: Some(runtime),
            stop: None,
        };
        assert_eq!(allowed(&b, 5).await, 5, "Redis admits 5 through b");
        a.admin().put_plan(plan(new.0, new.1)).await.unwrap();
        a.admin()
            .add_key(ApiKey::new("k-2", "k-value-2", "t"))
            .await
            .unwrap();
        // Only the key's entry is left: the plan's is gone from the log.
        command(
            redis.addr(),
            &["XTRIM", "{tollgate:registry}:log", "MAXLEN", "1"],
        )
        .unwrap();
        paused.resume();
        until("the plan reaches b", || {
            b.admin().plan("t") == Some(plan(new.0, new.1))
        })
        .await;
        assert!(b.admin().key("k-2").is_some(), "b read the registry again");
        tokio::task::block_in_place(|| redis.kill());
        assert_eq!(
            allowed(&b, 30).await,
            expected,
            "admitted by b's copy under {new:?}, half of the bucket in use"
        );
        assert!(b_store.local_decisions() > 0, "decided by the local copy");
    }
}
