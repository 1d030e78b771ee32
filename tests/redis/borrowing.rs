//! Several instances on one real `redis-server`, each a `RedisStore` of its
//! own (its own connection, calls in flight, shares and local copy), as
//! replicas are: borrowing never admits more than the limits, saves calls
//! far from them, does not starve near them, and gives back what it does
//! not use; a failure is decided by the plan's failure mode, by default
//! the local copy of its limits; calls past the bound are decided at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tollgate::extract::ApiKeyHeader;
use tollgate::{
    ApiKey, Date, FailureMode, ManualClock, Period, Policy, Quota, RateLimitLayer, RedisStore,
    Throttle, UsagePlan,
};

use crate::SERIAL;
use crate::support::at;
use crate::support::redis::{RedisCluster, RedisServer, command, require_redis};

type Layer = RateLimitLayer<ApiKeyHeader, RedisStore>;

/// An instance: its own store on `url` (set up further by `store`), one
/// key `k` under `plan`.
async fn instance(
    url: &str,
    plan: UsagePlan,
    store: impl FnOnce(tollgate::RedisStoreBuilder) -> tollgate::RedisStoreBuilder,
) -> Layer {
    let name = plan.name().to_owned();
    let policy = Policy::builder()
        .plan(plan)
        .key(ApiKey::new("k-1", "k", name))
        .build()
        .expect("a valid policy");
    // A timeout far above a loaded machine's latency: these tests are not
    // about timeouts, and a timed-out call would be decided locally.
    let store = store(RedisStore::builder(url).timeout(Duration::from_secs(2)))
        .build()
        .await
        .expect("a Redis store");
    RateLimitLayer::builder(policy).store(store).build()
}

async fn instances(redis: &RedisServer, plan: &UsagePlan, n: usize) -> Vec<Layer> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(instance(&redis.url(), plan.clone(), |b| b).await);
    }
    out
}

/// `n` decisions of key `k` through each instance at once, `concurrency`
/// at a time on each; returns how many were allowed in all.
async fn round(layers: &[Layer], n: usize, concurrency: usize) -> u64 {
    let tasks: Vec<_> = layers
        .iter()
        .map(|l| tokio::spawn(hammer(l.clone(), n, concurrency)))
        .collect();
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.expect("an instance's hammer");
    }
    allowed
}

/// `n` decisions of key `k` through `layer`, `concurrency` at a time;
/// returns how many were allowed.
async fn hammer(layer: Layer, n: usize, concurrency: usize) -> u64 {
    let allowed = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (layer, allowed, next) = (layer.clone(), Arc::clone(&allowed), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n as u64 {
                match layer.decide(b"k", 1).await {
                    Ok(()) => {
                        allowed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(r) => assert_eq!(r.status(), 429, "{r:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("a hammer task");
    }
    allowed.load(Ordering::Relaxed)
}

/// The quota's count in Redis (the only quota hash of the run).
fn quota_count(redis: &RedisServer) -> i64 {
    let keys = command(redis.addr(), &["KEYS", "*:q"]).expect("KEYS");
    let key = keys.lines().next().expect("a quota key").trim().to_owned();
    command(redis.addr(), &["HGET", &key, "n"])
        .expect("HGET")
        .trim()
        .parse()
        .expect("a count")
}

/// EVALSHA calls Redis has run.
fn evalsha_calls(redis: &RedisServer) -> u64 {
    let info = command(redis.addr(), &["INFO", "commandstats"]).expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|l| l.split(',').next())
        .map_or(0, |n| n.parse().expect("a call count"))
}

/// Three instances hammering one key past its daily quota admit no more
/// than it between them; the shares they hold when the load stops go back
/// to Redis, and a second round takes exactly what remains: the quota is
/// spent exactly, and Redis's count is what was admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_together_admit_exactly_the_quota() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let plan = UsagePlan::new("q")
        .throttle(Throttle::new(1_000_000.0, 1_000_000).unwrap())
        .quota(Quota::new(300, Period::Day).unwrap());
    let layers = instances(&redis, &plan, 3).await;
    let first = round(&layers, 150, 8).await;
    assert!(first <= 300, "the first round admitted {first}");
    for l in &layers {
        l.store().drained().await;
    }
    assert_eq!(
        quota_count(&redis),
        first as i64,
        "Redis counts what was admitted"
    );
    let second = round(&layers, 150, 8).await;
    for l in &layers {
        l.store().drained().await;
    }
    assert_eq!(first + second, 300, "{first} then {second}");
    assert_eq!(quota_count(&redis), 300);
}

/// Far from its limits, a hot key is decided mostly from shares: at most
/// one Redis call per ten decisions across three instances, every
/// decision allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_from_the_limits_a_hot_key_needs_a_call_per_ten_decisions_at_most() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let plan = UsagePlan::new("hot")
        .throttle(Throttle::new(1_000_000.0, 1_000_000).unwrap())
        .quota(Quota::new(10_000_000, Period::Day).unwrap());
    let layers = instances(&redis, &plan, 3).await;
    let before = evalsha_calls(&redis);
    let allowed = round(&layers, 2_000, 16).await;
    let calls = evalsha_calls(&redis) - before;
    let local: u64 = layers.iter().map(|l| l.store().local_decisions()).sum();
    assert_eq!(local, 0, "every decision was Redis's or a share's");
    assert_eq!(allowed, 6_000);
    assert!(calls * 10 <= 6_000, "{calls} calls for 6,000 decisions");
    for l in &layers {
        l.store().drained().await;
    }
    assert_eq!(quota_count(&redis), 6_000, "the unused shares went back");
}

/// Units nobody uses go back to Redis within `max_age`, without a drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_share_goes_back_within_max_age() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let plan = UsagePlan::new("idle").quota(Quota::new(1_000, Period::Day).unwrap());
    let max_age = Duration::from_millis(300);
    let layer = instance(&redis.url(), plan, |b| b.max_age(max_age)).await;
    // A first request lends nothing (nothing is known of the key's rate);
    // the ones after it borrow for the rate they came at.
    for _ in 0..20 {
        assert!(layer.decide(b"k", 1).await.is_ok());
    }
    let held = quota_count(&redis) - 20;
    assert!(held > 0, "a share is held");
    tokio::time::sleep(max_age * 2).await;
    assert_eq!(quota_count(&redis), 20, "the share of {held} went back");
}

/// Two instances on a Redis Cluster, deciding on one manual clock, with
/// borrowing on (the default): a share one holds goes back to its slot
/// whole when unused (each throttle what has not refilled, the quota its
/// units), so the other finds exactly what was not admitted; and a share
/// borrowed before another instance reset the key gets nothing back after
/// it (the reset made the bucket and the count whole already).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_shares_go_back_but_not_across_a_reset() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = UsagePlan::new("q")
        .throttle(Throttle::new(1.0, 40).unwrap())
        .quota(Quota::new(100, Period::Day).unwrap());
    let mut layers = Vec::new();
    for _ in 0..2 {
        let policy = Policy::builder()
            .clock(clock.clone())
            .plan(plan.clone())
            .key(ApiKey::new("k-1", "k", "q"))
            .build()
            .expect("a valid policy");
        let store = RedisStore::cluster_builder(cluster.urls())
            .prefix("borrow")
            .clock(clock.clone())
            .timeout(Duration::from_secs(2))
            .build()
            .await
            .expect("a Redis store");
        layers.push(RateLimitLayer::builder(policy).store(store).build());
    }
    let (a, b) = (&layers[0], &layers[1]);
    let day = Date::new(2024, 5, 6).unwrap();
    // The key's day as Redis counts it, read through b (whose own shares
    // are taken back first): [used, remaining].
    let counted = || async {
        let usage = b.admin().usage("q", day, day, None).await.unwrap();
        usage.items["k-1"][0]
    };
    for _ in 0..10 {
        assert!(a.decide(b"k", 1).await.is_ok());
    }
    let [used, _] = counted().await;
    assert!(used > 10, "a holds a share ({used} counted)");
    a.store().drained().await;
    assert_eq!(counted().await, [10, 90], "a's unused units went back");
    // The bucket of 40 has 30 left (the clock stands still): b takes them.
    let mut passed = 0;
    while b.decide(b"k", 1).await.is_ok() {
        passed += 1;
    }
    assert_eq!(passed, 30, "a's unused units went back to the throttle");
    assert_eq!(a.store().local_decisions() + b.store().local_decisions(), 0);

    // A full bucket again; a borrows, b resets the key a millisecond later
    // (a charge at the reset's instant counts as made after it) and takes
    // the whole bucket, then a's share goes back: to nothing.
    clock.advance(Duration::from_secs(100));
    for _ in 0..10 {
        assert!(a.decide(b"k", 1).await.is_ok());
    }
    let [used, _] = counted().await;
    assert!(used > 50, "a holds a share ({used} counted)");
    clock.advance(Duration::from_millis(1));
    b.admin().reset_key("k-1").await.unwrap();
    let mut passed = 0;
    while b.decide(b"k", 1).await.is_ok() {
        passed += 1;
    }
    assert_eq!(passed, 40, "the reset filled the bucket");
    a.store().drained().await;
    b.store().drained().await;
    assert!(
        b.decide(b"k", 1).await.is_err(),
        "a's share, from before the reset, was given back to the bucket"
    );
    assert_eq!(
        counted().await,
        [40, 60],
        "a's share, from before the reset, was given back to the count"
    );
    assert_eq!(a.store().local_decisions() + b.store().local_decisions(), 0);
}

/// GCRA over the given arrival times: what one exact limiter admits.
fn exact_admits(arrivals: &[Instant], rate: f64, burst: u32) -> u64 {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let tolerance = interval * burst;
    let Some(&t0) = arrivals.first() else {
        return 0;
    };
    let mut tat = t0;
    let mut admitted = 0;
    for &t in arrivals {
        let base = tat.max(t);
        if base + interval <= t + tolerance {
            tat = base + interval;
            admitted += 1;
        }
    }
    admitted
}

/// Three instances under a steady load at twice a throttle's rate admit
/// together at least 95% of what one exact limiter admits for the same
/// arrivals and never more, first with the load spread evenly, then with
/// all of it moved to one instance after the others have borrowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn borrowing_near_the_limit_does_not_starve() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let (rate, burst) = (100.0, 20);
    let plan = UsagePlan::new("steady").throttle(Throttle::new(rate, burst).unwrap());
    let layers = instances(&redis, &plan, 3).await;
    // Far from the limit first, so that every instance holds a share.
    for l in &layers {
        assert!(l.decide(b"k", 1).await.is_ok());
    }
    // The run's length: 3 s, or TOLLGATE_STARVE_SECS (the 30 s).
    let secs: f64 = std::env::var("TOLLGATE_STARVE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let total = (secs * 2.0 * rate) as u32;
    let mut arrivals = Vec::new();
    let mut admitted = 0;
    let every = Duration::from_secs_f64(1.0 / (2.0 * rate));
    let start = Instant::now();
    let mut pending = Vec::new();
    for i in 0..total {
        // Half the run spread over the three, then on the first alone.
        let layer = if i < total / 2 {
            &layers[i as usize % 3]
        } else {
            &layers[0]
        };
        let due = start + every * i;
        tokio::time::sleep_until(due.into()).await;
        arrivals.push(Instant::now());
        pending.push(tokio::spawn(layer.decide(b"k", 1)));
    }
    for p in pending {
        if p.await.expect("a decision").is_ok() {
            admitted += 1;
        }
    }
    // The three first requests came before, from a full bucket.
    let exact = exact_admits(&arrivals, rate, burst - 3);
    assert!(
        admitted as f64 >= 0.95 * exact as f64,
        "admitted {admitted}, an exact limiter {exact}"
    );
    // Redis decides on its own clock, a little after each arrival.
    assert!(
        admitted <= exact + 2,
        "admitted {admitted}, an exact limiter {exact}"
    );
    eprintln!("{secs} s at twice the rate: admitted {admitted}, an exact limiter {exact}");
}

/// While Redis cannot be reached, a plan's failure mode decides: `local`
/// (the default) by the instance's own copy of the limits, with rate-limit
/// headers and the burst cut where it would be; `open` lets everything
/// through; `closed` refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_is_decided_by_the_local_copy_by_default() {
    // A port where nothing listens.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("its address")
        .port();
    let url = format!("redis://127.0.0.1:{port}/");
    let throttle = Throttle::new(0.01, 3).unwrap();
    let local = instance(&url, UsagePlan::new("l").throttle(throttle), |b| b).await;
    let mut local_results = Vec::new();
    for _ in 0..5 {
        local_results.push(local.decide(b"k", 1).await.map_err(|r| r.status().as_u16()));
    }
    assert_eq!(local_results, [Ok(()), Ok(()), Ok(()), Err(429), Err(429)]);
    let open = instance(
        &url,
        UsagePlan::new("o")
            .throttle(throttle)
            .failure(FailureMode::Open),
        |b| b,
    )
    .await;
    for _ in 0..5 {
        assert!(open.decide(b"k", 1).await.is_ok());
    }
    let closed = instance(
        &url,
        UsagePlan::new("c")
            .throttle(throttle)
            .failure(FailureMode::Closed),
        |b| b,
    )
    .await;
    let refused = closed.decide(b"k", 1).await.expect_err("refused");
    assert_eq!(refused.status(), 503);
}

/// With Redis stalled, the calls in flight are bounded: past the bound a
/// request is decided at once by the local copy instead of waiting for the
/// timeout behind calls Redis will not answer in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_bound_on_calls_in_flight_the_failure_mode_decides_at_once() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let timeout = Duration::from_millis(500);
    let policy = {
        let mut b = Policy::builder().plan(
            UsagePlan::new("p")
                .throttle(Throttle::new(10.0, 10).unwrap())
                .borrow(false),
        );
        for i in 0..20 {
            b = b.key(ApiKey::new(format!("k-{i}"), format!("v-{i}"), "p"));
        }
        b.build().expect("a valid policy")
    };
    let store = RedisStore::builder(redis.url())
        .timeout(timeout)
        .max_in_flight(2)
        .build()
        .await
        .expect("a Redis store");
    let layer = RateLimitLayer::builder(policy).store(store).build();
    assert!(layer.decide(b"v-0", 1).await.is_ok(), "Redis answers");
    tokio::task::block_in_place(|| redis.pause());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let layer = layer.clone();
        tasks.push(tokio::spawn(async move {
            let r = layer.decide(format!("v-{i}").as_bytes(), 1).await;
            (r.is_ok(), started.elapsed())
        }));
    }
    let mut quick = 0;
    for t in tasks {
        let (ok, took) = t.await.expect("a decision");
        assert!(ok, "decided by the local copy");
        if took < timeout / 2 {
            quick += 1;
        }
    }
    tokio::task::block_in_place(|| redis.resume());
    assert!(quick >= 18, "{quick} of 20 decided before half the timeout");
}

/// Admitted of `n` decisions of key `k` through `layer`, one at a time.
async fn admitted(layer: &Layer, n: usize) -> usize {
    let mut passed = 0;
    for _ in 0..n {
        passed += usize::from(layer.decide(b"k", 1).await.is_ok());
    }
    passed
}

/// A share borrowed half a second before midnight is not used after it: its
/// units were counted in the day that ended, and the new day admits exactly
/// its quota. As for the plan's quota, so for a model's (here the plan's
/// `"*"` entry, which a decision without a model gets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_is_not_used_past_the_end_of_a_model_quota_window() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let plan_quota = UsagePlan::new("plan").quota(Quota::new(100, Period::Day).unwrap());
    let model_quota = UsagePlan::new("model").model(
        "*",
        tollgate::ModelLimits::new().quota(Quota::new(100, Period::Day).unwrap()),
    );
    for (prefix, plan) in [("plan", plan_quota), ("model", model_quota)] {
        let clock = ManualClock::new();
        clock.set_wall(at(2024, 5, 6, 86_400) - Duration::from_millis(500));
        let layer = instance(&redis.url(), plan, |b| {
            b.prefix(prefix).clock(clock.clone())
        })
        .await;
        // Two decisions: the second lends a share beyond its own unit.
        assert_eq!(admitted(&layer, 2).await, 2, "{prefix}");
        // Midnight passes while the share is younger than `max_age`.
        clock.advance(Duration::from_millis(600));
        assert_eq!(
            admitted(&layer, 150).await,
            100,
            "{prefix}: the new day's quota, and no unit of the last day's share"
        );
    }
}

/// A share borrowed late in a day and given back unused after midnight
/// takes its unused units off the closed day's usage: the day reports only
/// what was admitted (as the memory store, which never borrows, reports
/// it), and the new day's count gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_given_back_after_its_day_leaves_that_day_what_was_admitted() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 86_399));
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(UsagePlan::new("q").quota(Quota::new(100, Period::Day).unwrap()))
        .key(ApiKey::new("k-1", "k", "q"))
        .build()
        .expect("a valid policy");
    let store = RedisStore::builder(redis.url())
        .clock(clock.clone())
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("a Redis store");
    let l = RateLimitLayer::builder(policy).store(store).build();
    for _ in 0..3 {
        assert!(l.decide(b"k", 1).await.is_ok());
    }
    // Past midnight, the share unused but for the three.
    clock.advance(Duration::from_secs(2));
    l.store().drained().await;
    let (may6, may7) = (
        Date::new(2024, 5, 6).unwrap(),
        Date::new(2024, 5, 7).unwrap(),
    );
    let usage = l.admin().usage("q", may6, may7, None).await.unwrap();
    assert_eq!(usage.items["k-1"], [[3, 97], [0, 100]]);
    // The new day starts whole: its count got nothing back either.
    assert!(l.decide(b"k", 1).await.is_ok());
    l.store().drained().await;
    let usage = l.admin().usage("q", may6, may7, None).await.unwrap();
    assert_eq!(usage.items["k-1"], [[3, 97], [1, 99]]);
}

/// The rate-limit headers of requests of one instance decided from a share
/// are those the memory store sends for the same requests at the same
/// times: each throttle refilled since the share was granted, each
/// quota's window end closer. A share is Redis's answer to one request
/// and its units are the next requests' answers: before, every unit showed
/// the bucket as the share's first unit left it, less the units taken
/// (after 27 requests over 0.75 s at 10/s: `r=73;t=1` where the memory
/// store sends `r=79;t=3`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_headers_of_units_of_a_share_are_the_memory_stores() {
    use tower::ServiceExt;
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let headers = tollgate::HeaderStyle::ietf().x_ratelimit(true).openai(true);
    // The throttle is the tightest, then the quota.
    let plans = [
        UsagePlan::new("t")
            .throttle(Throttle::new(10.0, 100).unwrap())
            .quota(Quota::new(1_000, Period::Day).unwrap()),
        UsagePlan::new("q")
            .throttle(Throttle::new(10.0, 100).unwrap())
            .quota(Quota::new(60, Period::Day).unwrap()),
    ];
    for plan in plans {
        let name = plan.name().to_owned();
        let policy = |clock: &ManualClock| {
            Policy::builder()
                .clock(clock.clone())
                .plan(plan.clone())
                .key(ApiKey::new("k-1", "k", name.clone()))
                .build()
                .expect("a valid policy")
        };
        // Nearly a second into an hour, so that whole seconds turn over.
        let start = at(2024, 5, 6, 3_600) + Duration::from_millis(950);
        let (on_memory, on_redis) = (ManualClock::new(), ManualClock::new());
        on_memory.set_wall(start);
        on_redis.set_wall(start);
        let memory = RateLimitLayer::builder(policy(&on_memory))
            .store(
                tollgate::MemoryStore::builder()
                    .clock(on_memory.clone())
                    .build()
                    .expect("a memory store"),
            )
            .headers(headers)
            .build();
        let store = RedisStore::builder(redis.url())
            .prefix(&name)
            .clock(on_redis.clone())
            .timeout(Duration::from_secs(2))
            .build()
            .await
            .expect("a Redis store");
        let remote = RateLimitLayer::builder(policy(&on_redis))
            .store(store.clone())
            .headers(headers)
            .build();
        let app = || axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (memory, remote) = (app().layer(memory), app().layer(remote));
        let request = || {
            http::Request::get("/")
                .header("x-api-key", "k")
                .body(axum::body::Body::empty())
                .expect("a request")
        };
        let before = evalsha_calls(&redis);
        for i in 0..40 {
            let m = memory.clone().oneshot(request()).await.expect("an answer");
            let r = remote.clone().oneshot(request()).await.expect("an answer");
            assert_eq!(m.status(), 200);
            assert_eq!(r.status(), 200);
            let limits = |res: &http::Response<axum::body::Body>| {
                let mut h: Vec<String> = res
                    .headers()
                    .iter()
                    .filter(|(k, _)| k.as_str().contains("ratelimit"))
                    .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
                    .collect();
                h.sort();
                h
            };
            assert_eq!(limits(&r), limits(&m), "{name}: request {i}");
            if i % 5 == 4 {
                on_memory.advance(Duration::from_millis(150));
                on_redis.advance(Duration::from_millis(150));
            }
        }
        let calls = evalsha_calls(&redis) - before;
        assert!(
            calls < 20,
            "{name}: most units came from shares ({calls} calls)"
        );
        assert_eq!(store.local_decisions(), 0);
    }
}

/// An instance dropped without [`RedisStore::drained`] (its last layer and
/// store handle gone: a layer rebuilt, a test or a task ended) gives back
/// the units of its shares it did not use, as a share past `max_age` goes
/// back: the quota counts what was admitted, and the other instances get
/// the rest. Before, the units stayed charged until the quota's window
/// ended (a whole month for a monthly quota).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_instance_gives_its_shares_back() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let plan = UsagePlan::new("gone").quota(Quota::new(100, Period::Month).unwrap());
    let mut layers = instances(&redis, &plan, 2).await;
    let (b, a) = (layers.pop().expect("b"), layers.pop().expect("a"));
    assert_eq!(admitted(&a, 10).await, 10);
    let held = quota_count(&redis) - 10;
    assert!(held > 0, "a holds a share");
    drop(a);
    let given_back = async {
        while quota_count(&redis) != 10 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(2), given_back)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the share of {held} stayed charged: {}",
                quota_count(&redis)
            )
        });
    assert_eq!(
        admitted(&b, 100).await,
        90,
        "the other instance gets the rest"
    );
}

/// What RELIABILITY.md and `Admin::set_remaining` say of a share held by
/// another instance across an UpdateUsage: it is decided from until used
/// (or `max_age` old), so its holder admits at most its unused units past
/// what was set, and the instance that set it none; nothing goes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_held_elsewhere_admits_at_most_its_units_past_an_update_usage() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = UsagePlan::new("p").quota(Quota::new(100, Period::Day).unwrap());
    let mut layers = Vec::new();
    for _ in 0..2 {
        let c = clock.clone();
        layers.push(instance(&redis.url(), plan.clone(), move |b| b.clock(c)).await);
    }
    let (b, a) = (layers.pop().expect("b"), layers.pop().expect("a"));
    assert_eq!(admitted(&a, 10).await, 10);
    let held = quota_count(&redis) - 10;
    assert!((1..=64).contains(&held), "a holds a share of {held}");
    b.admin().set_remaining("k-1", 0).await.unwrap();
    assert_eq!(admitted(&b, 10).await, 0, "nothing remains through b");
    assert_eq!(admitted(&a, 100).await as i64, held, "a's share, no more");
    a.store().drained().await;
    assert_eq!(quota_count(&redis), 100, "what was set, nothing given back");
}

/// A share given back while Redis is down goes back once Redis is up again,
/// as a settlement does: sent again from the instance's queue, applied
/// once. Before, the give-back was tried once and the units stayed charged
/// until the quota's window ended (here a month), lost to every instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_given_back_while_redis_is_down_goes_back_when_it_returns() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let plan = UsagePlan::new("down").quota(Quota::new(100, Period::Month).unwrap());
    let layer = instance(&redis.url(), plan, |b| {
        b.timeout(Duration::from_millis(300)).shared_registry(false)
    })
    .await;
    assert_eq!(admitted(&layer, 10).await, 10);
    let held = quota_count(&redis) - 10;
    assert!(held > 0, "the instance holds a share");
    tokio::task::block_in_place(|| redis.kill());
    // The share goes back while Redis is down.
    layer.store().drained().await;
    tokio::task::block_in_place(|| redis.restart());
    let given_back = async {
        while quota_count(&redis) != 10 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(6), given_back)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the share of {held} stayed charged: {}",
                quota_count(&redis)
            )
        });
}
