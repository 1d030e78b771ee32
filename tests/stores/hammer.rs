//! Hammers: many deciders at once on the same keys admit exactly what the
//! limits hold, never one more (nor fewer).
//!
//! - The memory store, from several threads of one process, with the manual
//!   clock frozen: each key admits exactly its burst, or its quota; a stage
//!   shared by every key admits exactly its burst in all; peeks fired in
//!   between charge nothing, and the charges a quota denial gives back leave
//!   the throttle exactly as charged as the admitted requests made it. Then
//!   the clock moves and exactly what refilled is admitted.
//! - The Redis store, from several processes (this test binary run again in
//!   a child role) deciding concurrently through one real `redis-server`:
//!   in all, each key admits exactly its burst or its daily quota. Redis
//!   decides on its own `TIME`, so the throttle refills one request an hour:
//!   nothing refills while the test runs.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tollgate::extract::ApiKeyHeader;
use tollgate::{
    ApiKey, FailureMode, ManualClock, MemoryStore, Period, Policy, Quota, RateLimitLayer,
    RedisStore, Stage, Throttle, UsagePlan,
};

use crate::support::at;
use crate::support::redis::{RedisServer, require_redis};

const THREADS: usize = 4;
/// Decisions per thread per round.
const REQUESTS: usize = 3_000;
const KEYS: usize = 6;

fn key(i: usize) -> String {
    format!("hammer-key-{i}")
}

/// A layer on a memory store over `clock`, with `plan` (and `stage`) for
/// keys 0..KEYS.
fn layer(clock: &ManualClock, plan: UsagePlan, stage: Option<Stage>) -> RateLimitLayer {
    let mut policy = Policy::builder().clock(clock.clone()).plan(plan);
    if let Some(stage) = stage {
        policy = policy.stage(stage);
    }
    for i in 0..KEYS {
        policy = policy.key(ApiKey::new(format!("id-{i}"), key(i), "p"));
    }
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    RateLimitLayer::builder(policy.build().unwrap())
        .store(store)
        .build()
}

/// THREADS threads, released together, each deciding REQUESTS requests of
/// cost 1 round the keys (each from its own first key), with a peek (cost
/// 0, which must always pass and charge nothing) after every third: how
/// many requests each key admitted.
fn hammer(layer: &RateLimitLayer) -> [u64; KEYS] {
    let admitted: [AtomicU64; KEYS] = Default::default();
    let start = Barrier::new(THREADS);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (layer, admitted, start) = (layer, &admitted, &start);
            s.spawn(move || {
                let keys: Vec<String> = (0..KEYS).map(key).collect();
                start.wait();
                for i in 0..REQUESTS {
                    let k = &keys[(t + i) % KEYS];
                    if layer.check(k.as_bytes(), 1).is_ok() {
                        admitted[(t + i) % KEYS].fetch_add(1, Ordering::Relaxed);
                    }
                    if i % 3 == 0 {
                        assert!(layer.check(k.as_bytes(), 0).is_ok(), "a peek always passes");
                    }
                }
            });
        }
    });
    admitted.map(AtomicU64::into_inner)
}

#[test]
fn threads_admit_exactly_each_keys_burst_then_exactly_what_refilled() {
    let clock = ManualClock::new();
    // 2 a second (one every 500 ms), bursts of 50.
    let plan = UsagePlan::new("p").throttle(Throttle::new(2.0, 50).unwrap());
    let layer = layer(&clock, plan, None);
    assert_eq!(
        hammer(&layer),
        [50; KEYS],
        "a full bucket each, frozen in time"
    );
    assert_eq!(
        hammer(&layer),
        [0; KEYS],
        "nothing refills while time stands still"
    );
    clock.advance(Duration::from_millis(5_250));
    assert_eq!(hammer(&layer), [10; KEYS], "5.25 s refill 10 each");
    clock.advance(Duration::from_secs(3_600));
    assert_eq!(
        hammer(&layer),
        [50; KEYS],
        "an hour refills a bucket, no more"
    );
}

#[test]
fn threads_admit_exactly_each_keys_quota_and_denied_requests_charge_no_throttle() {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 12 * 3_600));
    // The quota (50 a day) denies before the bucket (80) is empty: every
    // request it denies was charged to the bucket first and given back.
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(1.0, 80).unwrap())
        .quota(Quota::new(50, Period::Day).unwrap());
    let layer = layer(&clock, plan, None);
    assert_eq!(hammer(&layer), [50; KEYS], "the day's quota each");
    // The next day on the wall clock only: the monotonic clock stands still,
    // so the bucket has not refilled. Exactly the 30 that the 50 admitted
    // requests left are there: none of the thousands of denied ones kept a
    // charge.
    clock.set_wall(at(2024, 5, 7, 12 * 3_600));
    assert_eq!(
        hammer(&layer),
        [30; KEYS],
        "what the admitted requests left"
    );
    // An hour later the bucket is full; 20 of the day's quota are left.
    clock.advance(Duration::from_secs(3_600));
    assert_eq!(hammer(&layer), [20; KEYS], "the rest of the day's quota");
    clock.advance(Duration::from_secs(86_400));
    assert_eq!(hammer(&layer), [50; KEYS], "a new day");
}

#[test]
fn a_stage_shared_by_every_key_admits_exactly_its_burst_in_all() {
    let clock = ManualClock::new();
    // The stage (4 a second, bursts of 120) binds long before any key's own
    // bucket (bursts of 50, 300 in all) is empty.
    let plan = UsagePlan::new("p").throttle(Throttle::new(1.0, 50).unwrap());
    let stage = Stage::new().throttle(Throttle::new(4.0, 120).unwrap());
    let layer = layer(&clock, plan, Some(stage));
    let first = hammer(&layer);
    assert_eq!(first.iter().sum::<u64>(), 120, "{first:?}");
    assert!(first.iter().all(|&n| n <= 50), "{first:?}");
    clock.advance(Duration::from_secs(10));
    let second = hammer(&layer);
    assert_eq!(second.iter().sum::<u64>(), 40, "10 s refill 40: {second:?}");
}

// ---------------------------------------------------------------------------
// Redis, from several processes
// ---------------------------------------------------------------------------

/// The child role: set to the Redis URL in the processes this test starts.
const CHILD_ENV: &str = "TOLLGATE_HAMMER_REDIS";
/// When the children start firing (milliseconds since the Unix epoch).
const START_ENV: &str = "TOLLGATE_HAMMER_START_MS";
const PROCESSES: usize = 3;
/// Concurrent deciders in each process.
const TASKS: usize = 8;
/// Decisions per task.
const TASK_REQUESTS: usize = 100;
/// Keys of the plan `burst` (one request an hour, bursts of 25) and of the
/// plan `quota` (20 a day under a throttle that never binds).
const REDIS_KEYS: [(&str, &str); 4] = [
    ("burst-0", "burst"),
    ("burst-1", "burst"),
    ("quota-0", "quota"),
    ("quota-1", "quota"),
];
const BURST: u64 = 25;
const DAILY: u64 = 20;
/// What a child prints for the parent, per key: `<prefix> <key> <admitted>`.
const REPORT: &str = "hammer-admitted";

fn redis_policy() -> Policy {
    let mut policy = Policy::builder()
        .plan(
            UsagePlan::new("burst")
                .throttle(Throttle::new(1.0 / 3_600.0, BURST as u32).unwrap())
                .failure(FailureMode::Closed),
        )
        .plan(
            UsagePlan::new("quota")
                .throttle(Throttle::new(1_000.0, 1_000).unwrap())
                .quota(Quota::new(DAILY, Period::Day).unwrap())
                .failure(FailureMode::Closed),
        );
    for (k, plan) in REDIS_KEYS {
        policy = policy.key(ApiKey::new(k, k, plan));
    }
    policy.build().unwrap()
}

/// In a child process: fires TASKS x TASK_REQUESTS decisions round the keys
/// at the Redis server named by CHILD_ENV, from the agreed start time, and
/// prints how many each key admitted. In the test run itself: nothing.
#[test]
fn redis_hammer_child() {
    let Ok(url) = std::env::var(CHILD_ENV) else {
        return;
    };
    let start_ms: u64 = std::env::var(START_ENV).unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store = RedisStore::builder(url)
            .timeout(Duration::from_secs(5))
            .build()
            .await
            .unwrap();
        let layer: RateLimitLayer<ApiKeyHeader, RedisStore> =
            RateLimitLayer::builder(redis_policy()).store(store).build();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        tokio::time::sleep(Duration::from_millis(start_ms.saturating_sub(now_ms))).await;
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let layer = layer.clone();
                tokio::spawn(async move {
                    let mut admitted = [0u64; REDIS_KEYS.len()];
                    for i in 0..TASK_REQUESTS {
                        let k = (t + i) % REDIS_KEYS.len();
                        if layer.decide(REDIS_KEYS[k].0.as_bytes(), 1).await.is_ok() {
                            admitted[k] += 1;
                        }
                    }
                    admitted
                })
            })
            .collect();
        let mut admitted = [0u64; REDIS_KEYS.len()];
        for t in tasks {
            for (sum, n) in admitted.iter_mut().zip(t.await.unwrap()) {
                *sum += n;
            }
        }
        assert_eq!(layer.store_failures(), 0, "every decision reached Redis");
        for (k, n) in REDIS_KEYS.iter().zip(admitted) {
            println!("{REPORT} {} {n}", k.0);
        }
    });
}

/// The name `--exact` needs to run [`redis_hammer_child`] alone: its path
/// below the root of this test crate.
fn child_test_name() -> String {
    let (_crate, module) = module_path!()
        .split_once("::")
        .expect("a module of a test crate");
    format!("{module}::redis_hammer_child")
}

/// Seconds until the next UTC midnight.
fn secs_to_midnight() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    86_400 - now.as_secs() % 86_400
}

#[test]
fn processes_sharing_one_redis_admit_exactly_each_keys_burst_and_quota() {
    if !require_redis() {
        return;
    }
    // The daily quota must not renew while the processes fire.
    if secs_to_midnight() < 60 {
        std::thread::sleep(Duration::from_secs(secs_to_midnight() + 1));
    }
    let redis = RedisServer::start();
    let exe = std::env::current_exe().unwrap();
    let child_test = child_test_name();
    let start_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 1_500;
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new(&exe)
                .args([child_test.as_str(), "--exact", "--nocapture"])
                .args(["--test-threads", "1"])
                .env(CHILD_ENV, redis.url())
                .env(START_ENV, start_ms.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    let mut each = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "a child failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut mine = BTreeMap::new();
        for line in stdout.lines() {
            // The harness may print the test's name on the same line.
            if let Some((_, rest)) = line.split_once(REPORT) {
                let (k, n) = rest.trim().split_once(' ').unwrap();
                let n: u64 = n.parse().unwrap();
                *totals.entry(k.to_owned()).or_default() += n;
                mine.insert(k.to_owned(), n);
            }
        }
        assert_eq!(mine.len(), REDIS_KEYS.len(), "a child reported: {stdout}");
        each.push(mine);
    }
    for (k, plan) in REDIS_KEYS {
        let want = if plan == "burst" { BURST } else { DAILY };
        assert_eq!(totals[k], want, "{k} across processes: {each:?}");
    }
    // The processes did compete: more than one admitted on the same key.
    let sharing = REDIS_KEYS
        .iter()
        .filter(|(k, _)| each.iter().filter(|m| m[*k] > 0).count() > 1)
        .count();
    assert!(
        sharing > 0,
        "no key was admitted by two processes: {each:?}"
    );
}
