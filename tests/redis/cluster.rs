//! The Redis store on a real Redis Cluster while the cluster changes under
//! it, and several instances deciding shared limits at once: limits kept in
//! several slots are refunded exactly, a slot resharded while serving keeps
//! its counts (decisions and refunds told `TRYAGAIN` during the move are
//! sent again within the timeout), a failover to a replica keeps them (also
//! when the old master is gone and no node answers `MOVED`), and a node
//! that restarts empty, or a whole cluster re-formed, is served again.

use std::sync::Arc;
use std::time::Duration;

use tollgate::{
    Account, ApiKey, Date, FailureMode, ManualClock, Period, Policy, Quota, RateLimitLayer,
    RedisStore, Stage, Throttle, UsagePlan,
};

use crate::SERIAL;
use crate::support::at;
use crate::support::redis::{RedisCluster, command, require_redis, scan};

type Layer = RateLimitLayer<tollgate::extract::ApiKeyHeader, RedisStore>;

async fn layer(cluster: &RedisCluster, prefix: &str, clock: &ManualClock, policy: Policy) -> Layer {
    let store = RedisStore::cluster_builder(cluster.urls())
        .prefix(prefix)
        .clock(clock.clone())
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("a Redis store");
    RateLimitLayer::builder(policy).store(store).build()
}

/// How many of `n` decisions of `key` pass.
async fn passes(layer: &Layer, key: &[u8], n: usize) -> usize {
    let mut passed = 0;
    for _ in 0..n {
        passed += usize::from(layer.decide(key, 1).await.is_ok());
    }
    passed
}

/// Three instances on one Cluster, on one frozen manual clock, decide
/// bursts of 30 requests for each of three keys at once: two keys of an
/// account whose throttle (4) is tighter than their plan's (3 each), one key
/// without an account, all under a stage throttle of 20. The stage, the
/// account and each (plan, key) live in slots of their own; the stage and
/// the account are charged first and given back when a later limit denies.
/// In the end exactly the limits' requests are charged anywhere: the stage
/// has 20 - 7 left for another key, and no place under the plan's
/// concurrency cap is left taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_charge_the_stage_and_the_account_exactly_under_bursts() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let policy = || {
        Policy::builder()
            .clock(clock.clone())
            .stage(Stage::new().throttle(Throttle::new(0.001, 20).unwrap()))
            .plan(
                UsagePlan::new("p")
                    .throttle(Throttle::new(0.001, 3).unwrap())
                    .concurrency(2),
            )
            .plan(UsagePlan::new("wide").throttle(Throttle::new(0.001, 100).unwrap()))
            .account(
                Account::new("acme")
                    .throttle(Throttle::new(0.001, 4).unwrap())
                    .quota(Quota::new(100, Period::Day).unwrap()),
            )
            .key(ApiKey::new("a-1", "va1", "p").account("acme"))
            .key(ApiKey::new("a-2", "va2", "p").account("acme"))
            .key(ApiKey::new("b-1", "vb1", "p"))
            .key(ApiKey::new("w-1", "vw1", "wide"))
            .build()
            .unwrap()
    };
    let mut layers = Vec::new();
    for _ in 0..3 {
        layers.push(Arc::new(layer(&cluster, "burst", &clock, policy()).await));
    }
    let mut tasks = Vec::new();
    for layer in &layers {
        for key in [&b"va1"[..], b"va2", b"vb1"] {
            for _ in 0..10 {
                let layer = Arc::clone(layer);
                tasks.push(tokio::spawn(async move {
                    (key, layer.decide(key, 1).await.is_ok())
                }));
            }
        }
    }
    let (mut acme, mut b) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            (b"vb1", true) => b += 1,
            (_, true) => acme += 1,
            _ => {}
        }
    }
    for layer in &layers {
        layer.store().drained().await;
    }
    // A request the stage denied while refunds were on their way passes
    // now; none passes beyond the limits.
    let first = &layers[0];
    acme += passes(first, b"va1", 5).await + passes(first, b"va2", 5).await;
    b += passes(first, b"vb1", 5).await;
    assert_eq!((acme, b), (4, 3), "the account's 4 and b-1's 3");
    for layer in &layers {
        layer.store().drained().await;
    }
    let mut w = 0;
    let denied = loop {
        match first.decide(b"vw1", 1).await {
            Ok(()) => w += 1,
            Err(r) => break r,
        }
    };
    assert_eq!(w, 20 - 7, "what the stage has left: {denied:?}");
    assert_eq!(denied.limit(), Some("stage"));
    let day = Date::new(2024, 5, 6).unwrap();
    let usage = first.admin().account_usage("acme", day, day).await.unwrap();
    assert_eq!(usage.days[0], [4, 96], "the account's quota counted 4");
    let places: Vec<_> = cluster
        .addrs()
        .into_iter()
        // `}:c`: a cap's leases, not a settlement's marker (`}:s:<id>`),
        // whose id may start with a `c`.
        .flat_map(|addr| {
            scan(addr, "burst:*}:c*")
                .into_iter()
                .map(move |k| (addr, k))
        })
        .filter(|(addr, key)| command(*addr, &["ZCARD", key]).unwrap() != "0")
        .collect();
    assert!(places.is_empty(), "places left taken: {places:?}");
    let failures: u64 = layers.iter().map(|l| l.store().local_decisions()).sum();
    assert_eq!(failures, 0);
    // Key names hold hashes: no key value, id or account name.
    let names: Vec<_> = cluster
        .addrs()
        .into_iter()
        .flat_map(|addr| scan(addr, "*"))
        .collect();
    assert!(names.iter().any(|n| n.starts_with("burst:")), "{names:?}");
    for name in &names {
        for secret in [
            "va1", "va2", "vb1", "vw1", "a-1", "a-2", "b-1", "w-1", "acme",
        ] {
            assert!(!name.contains(secret), "{secret} in {name}");
        }
    }
}

/// The slot of the one (plan, key) whose keys match `pattern`, and the node
/// that serves it.
fn slot_of(cluster: &RedisCluster, pattern: &str) -> (u16, usize) {
    let keys: Vec<_> = cluster
        .addrs()
        .into_iter()
        .flat_map(|addr| scan(addr, pattern))
        .collect();
    assert!(!keys.is_empty(), "no key matches {pattern}");
    let slots: Vec<u16> = keys
        .iter()
        .map(|k| {
            command(cluster.addrs()[0], &["CLUSTER", "KEYSLOT", k])
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(slots.iter().all(|s| *s == slots[0]), "one slot: {keys:?}");
    (slots[0], cluster.owner_of(slots[0]))
}

/// A plan of a throttle (burst 30) and a daily quota (40), `closed` on a
/// store failure, so that a decision Redis did not make is a 503.
fn resharded_policy(clock: &ManualClock) -> Policy {
    Policy::builder()
        .clock(clock.clone())
        .plan(
            UsagePlan::new("p")
                .throttle(Throttle::new(0.001, 30).unwrap())
                .quota(Quota::new(40, Period::Day).unwrap())
                .failure(FailureMode::Closed)
                .borrow(false),
        )
        .key(ApiKey::new("k-1", "vk", "p"))
        .build()
        .unwrap()
}

/// A key's slot moved to another node while requests keep coming (the
/// client sees `ASK` and `TRYAGAIN` while its keys are split between the
/// nodes, then `MOVED`): every request is decided by Redis, and the burst
/// and the quota count carry over to the new node exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_resharded_while_serving_keeps_its_counts() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let layer = layer(&cluster, "reshard", &clock, resharded_policy(&clock)).await;
    assert_eq!(passes(&layer, b"vk", 10).await, 10);
    let (slot, from) = slot_of(&cluster, "reshard:*");
    let to = (from + 1) % 3;
    let handle = tokio::runtime::Handle::current();
    let mut during = Vec::new();
    tokio::task::block_in_place(|| {
        cluster.move_slot(slot, from, to, |moved, total| {
            // Not while the key's keys are split between the nodes: Redis
            // answers TRYAGAIN until the migration goes on, and it waits.
            if moved == 0 || moved == total {
                during.push(handle.block_on(layer.decide(b"vk", 1)));
            }
        });
    });
    let passed = during.iter().filter(|r| r.is_ok()).count();
    for r in during.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.status().as_u16(), 429, "decided by Redis: {r:?}");
    }
    assert_eq!(cluster.owner_of(slot), to);
    let after = passes(&layer, b"vk", 40).await;
    assert_eq!(10 + passed + after, 30, "the burst, exactly");
    let day = Date::new(2024, 5, 6).unwrap();
    let usage = layer.admin().usage("p", day, day, None).await.unwrap();
    assert_eq!(usage.items["k-1"][0], [30, 10]);
    assert_eq!(layer.store_failures(), 0);
}

/// Requests decided while their slot moves, with a timeout of 400 ms: a
/// plan with a concurrency cap passes the script a key that does not exist
/// between requests (the set of leases), so from the moment the slot is
/// `MIGRATING` until `SETSLOT … NODE` Redis answers every decision of the
/// key `TRYAGAIN` (on the source, some keys are there and one is not; on
/// the target, after `ASK`, a key is missing). Each is sent again until the
/// migration ends, within the timeout: none is decided by the failure mode
/// (`closed`: a 503), none admitted beyond the limits, and the burst of 30
/// and the quota's count carry over exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_during_a_slot_migration_are_decided_by_redis_within_the_timeout() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let timeout = Duration::from_millis(400);
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(
            UsagePlan::new("p")
                .throttle(Throttle::new(0.001, 30).unwrap())
                .quota(Quota::new(40, Period::Day).unwrap())
                .concurrency(16)
                .failure(FailureMode::Closed)
                .borrow(false),
        )
        .key(ApiKey::new("k-1", "vk", "p"))
        .build()
        .unwrap();
    let store = RedisStore::cluster_builder(cluster.urls())
        .prefix("migrating")
        .clock(clock.clone())
        .timeout(timeout)
        .build()
        .await
        .expect("a Redis store");
    let layer = Arc::new(RateLimitLayer::builder(policy).store(store).build());
    assert_eq!(passes(&layer, b"vk", 10).await, 10);
    layer.store().drained().await;
    let (slot, from) = slot_of(&cluster, "migrating:*");
    let to = (from + 1) % 3;
    let handle = tokio::runtime::Handle::current();
    let mut tasks = Vec::new();
    tokio::task::block_in_place(|| {
        cluster.move_slot(slot, from, to, |moved, total| {
            if moved < total {
                for _ in 0..3 {
                    let layer = Arc::clone(&layer);
                    tasks.push(handle.spawn(async move {
                        let started = std::time::Instant::now();
                        (layer.decide(b"vk", 1).await, started.elapsed())
                    }));
                }
                // The decisions reach Redis and are told to try again.
                std::thread::sleep(Duration::from_millis(30));
            }
        });
    });
    assert_eq!(cluster.owner_of(slot), to);
    let mut passed = 0;
    for task in tasks {
        let (decided, took) = task.await.unwrap();
        assert!(took < timeout + Duration::from_millis(200), "{took:?}");
        match decided {
            Ok(()) => passed += 1,
            Err(r) => assert_eq!(r.status().as_u16(), 429, "decided by Redis: {r:?}"),
        }
    }
    assert_eq!(passed, 9, "every request during the move passed");
    assert_eq!(layer.store_failures(), 0);
    let after = passes(&layer, b"vk", 40).await;
    assert_eq!(10 + passed + after, 30, "the burst, exactly");
    let day = Date::new(2024, 5, 6).unwrap();
    let usage = layer.admin().usage("p", day, day, None).await.unwrap();
    assert_eq!(usage.items["k-1"][0], [30, 10]);
}

/// The stage's slot moved while requests that their own throttle denies
/// keep coming: each charged the stage first (in its own slot) and gives it
/// back. A refund names the throttle and its reset mark, a key that does
/// not exist, so while the slot migrates Redis answers it `TRYAGAIN`; it
/// is sent again until the migration ends. No charge of a denied request
/// is lost: the stage still has exactly its burst less the one request
/// admitted, for every other caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_refunded_while_its_slot_migrates_gets_every_charge_back() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let policy = Policy::builder()
        .clock(clock.clone())
        .stage(Stage::new().throttle(Throttle::new(0.001, 10).unwrap()))
        .plan(UsagePlan::new("p").throttle(Throttle::new(0.001, 1).unwrap()))
        .plan(UsagePlan::new("wide").throttle(Throttle::new(0.001, 100).unwrap()))
        .key(ApiKey::new("k-1", "vk", "p"))
        .key(ApiKey::new("w-1", "vw", "wide"))
        .build()
        .unwrap();
    let store = RedisStore::cluster_builder(cluster.urls())
        .prefix("refunded")
        .clock(clock.clone())
        .timeout(Duration::from_millis(400))
        .build()
        .await
        .expect("a Redis store");
    let layer = Arc::new(RateLimitLayer::builder(policy).store(store).build());
    assert!(layer.decide(b"vk", 1).await.is_ok());
    layer.store().drained().await;
    // Two throttles are stored, the stage's and the key's: the stage's is
    // the one another key's request charges too.
    let throttles = |cluster: &RedisCluster| -> Vec<(String, String)> {
        let mut found: Vec<_> = cluster
            .addrs()
            .into_iter()
            .flat_map(|addr| {
                scan(addr, "refunded:*:t:*")
                    .into_iter()
                    .map(move |k| (command(addr, &["GET", &k]).unwrap(), k))
            })
            .map(|(v, k)| (k, v))
            .collect();
        found.sort();
        found
    };
    let before = throttles(&cluster);
    assert_eq!(before.len(), 2, "{before:?}");
    assert!(layer.decide(b"vw", 1).await.is_ok());
    let after = throttles(&cluster);
    let stage = before
        .iter()
        .find(|(k, v)| after.iter().any(|(k2, v2)| k2 == k && v2 != v))
        .map(|(k, _)| k.clone())
        .expect("the stage's throttle");
    let (slot, from) = slot_of(&cluster, &stage);
    let to = (from + 1) % 3;
    let handle = tokio::runtime::Handle::current();
    let mut tasks = Vec::new();
    tokio::task::block_in_place(|| {
        cluster.move_slot(slot, from, to, |moved, total| {
            if moved < total {
                for _ in 0..5 {
                    let layer = Arc::clone(&layer);
                    tasks.push(handle.spawn(async move { layer.decide(b"vk", 1).await }));
                }
                // The stage is charged, the key's throttle denies, and the
                // refunds are told to try again.
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    });
    assert_eq!(cluster.owner_of(slot), to);
    for task in tasks {
        let denied = task.await.unwrap().expect_err("k-1's throttle denies");
        assert_eq!(denied.limit(), Some("throttle"), "{denied:?}");
    }
    layer.store().drained().await;
    let mut passed = 0;
    let denied = loop {
        match layer.decide(b"vw", 1).await {
            Ok(()) => passed += 1,
            Err(r) => break r,
        }
    };
    assert_eq!(denied.limit(), Some("stage"), "{denied:?}");
    assert_eq!(
        passed,
        10 - 2,
        "the stage less k-1's and w-1's first requests"
    );
    assert_eq!(layer.store_failures(), 0);
}

/// A replica promoted by `CLUSTER FAILOVER` while serving: the store follows
/// the slot to it (the old master answers `MOVED`, the new one has no script
/// yet), and the counts it replicated carry over exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_replica_keeps_serving_with_the_counts() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut cluster = RedisCluster::start();
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let layer = layer(&cluster, "failover", &clock, resharded_policy(&clock)).await;
    assert_eq!(passes(&layer, b"vk", 10).await, 10);
    let (slot, master) = slot_of(&cluster, "failover:*");
    let replica = tokio::task::block_in_place(|| cluster.add_replica(master));
    let addr = cluster.nodes()[replica].addr();
    command(addr, &["CLUSTER", "FAILOVER"]).unwrap();
    tokio::task::block_in_place(|| {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while cluster.owner_of(slot) != replica {
            assert!(std::time::Instant::now() < deadline, "no failover");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let mut after = 0;
    for _ in 0..40 {
        match layer.decide(b"vk", 1).await {
            Ok(()) => after += 1,
            Err(r) => assert_eq!(r.status().as_u16(), 429, "decided by Redis: {r:?}"),
        }
    }
    assert_eq!(10 + after, 30, "the burst, exactly");
    assert_eq!(layer.store_failures(), 0);
}

/// The master of a key's slot killed, and its replica promoted in its place
/// (`CLUSTER FAILOVER TAKEOVER`): the slot now lives at an address the store
/// never saw serve it, and the old one refuses connections, so no node
/// answers the store `MOVED` for it. The store finds the new master within
/// a bounded time, without a new store, and the replicated counts carry
/// over exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_replaced_by_its_replica_is_found_at_its_new_address() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut cluster = RedisCluster::start();
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let layer = layer(&cluster, "takeover", &clock, resharded_policy(&clock)).await;
    assert_eq!(passes(&layer, b"vk", 10).await, 10);
    let (_, master) = slot_of(&cluster, "takeover:*");
    let replica = tokio::task::block_in_place(|| cluster.add_replica(master));
    // The replica has the counts (replication is asynchronous: WAIT).
    command(cluster.nodes()[master].addr(), &["WAIT", "1", "2000"]).unwrap();
    tokio::task::block_in_place(|| cluster.node_mut(master).kill());
    let addr = cluster.nodes()[replica].addr();
    command(addr, &["CLUSTER", "FAILOVER", "TAKEOVER"]).unwrap();
    tokio::task::block_in_place(|| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !command(addr, &["ROLE"]).is_ok_and(|r| r.starts_with("master")) {
            assert!(std::time::Instant::now() < deadline, "no takeover");
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let started = tokio::time::Instant::now();
    let mut passed = 0;
    let mut failed = 0;
    while passed == 0 {
        match layer.decide(b"vk", 1).await {
            Ok(()) => passed += 1,
            Err(r) => {
                assert_eq!(r.status().as_u16(), 503, "{r:?}");
                failed += 1;
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never served again ({failed} failures)"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    eprintln!("served again after {:?}", started.elapsed());
    passed += passes(&layer, b"vk", 40).await;
    assert_eq!(10 + passed, 30, "the burst, exactly");
}

/// The whole cluster restarted empty and re-formed (every node forgets it,
/// then `--cluster create` anew, with the slots dealt in another order, so
/// the key's slot is served by another node at another address): while
/// the nodes answer `CLUSTERDOWN`, each decision is answered by the failure
/// mode (`closed`: 503) within the timeout, never hung; once the cluster is
/// formed the store follows `MOVED` to the slot's new node and decides by
/// Redis again, with a new burst, without a new store. The outage is
/// logged once when it starts and once when it ends.
// The default flavour runs the store's tasks on this thread, where the
// subscriber is set.
#[tokio::test(flavor = "current_thread")]
async fn a_cluster_re_formed_with_its_slots_dealt_anew_is_served_again() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let (log, _guard) = crate::outage::capture_log();
    let mut cluster = RedisCluster::start();
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let timeout = Duration::from_millis(300);
    let store = RedisStore::cluster_builder(cluster.urls())
        .prefix("reformed")
        .clock(clock.clone())
        .timeout(timeout)
        .build()
        .await
        .expect("a Redis store");
    let policy = resharded_policy(&clock);
    let layer = RateLimitLayer::builder(policy).store(store).build();
    assert_eq!(passes(&layer, b"vk", 10).await, 10);
    let (slot, node) = slot_of(&cluster, "reformed:*");
    cluster.forget();
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let r = layer.decide(b"vk", 1).await.expect_err("closed");
        assert_eq!(r.status().as_u16(), 503, "{r:?}");
        let took = started.elapsed();
        assert!(took < timeout + Duration::from_millis(300), "{took:?}");
    }
    cluster.reform(&[1, 2, 0]);
    assert_ne!(cluster.owner_of(slot), node, "the slot moved");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut passed = 0;
    let mut failed = 0;
    while passed == 0 {
        match layer.decide(b"vk", 1).await {
            Ok(()) => passed += 1,
            Err(r) => {
                assert_eq!(r.status().as_u16(), 503, "{r:?}");
                failed += 1;
                assert!(tokio::time::Instant::now() < deadline, "never served again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    passed += passes(&layer, b"vk", 40).await;
    // Never more than a new burst. Less only by what errs toward admitting
    // less: a call that timed out (503) while the new cluster was forming
    // may still have run and charged its unit, and the first call on a
    // connection the re-forming reset is sent once more (`Inner::run`), so
    // its unit may be charged twice.
    assert!(passed <= 30, "{passed} passed: more than a new burst");
    assert!(
        passed + failed + 1 >= 30,
        "{passed} passed after {failed} failures: units lost beyond the calls that may have run twice"
    );
    // The store's failures, and the shared registry's watcher's reads (every
    // 200 ms): each logged once when they start and once when they end.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !log.text().contains("the key registry is read again") {
        assert!(tokio::time::Instant::now() < deadline, "{}", log.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = log.text();
    let count = |what: &str| text.lines().filter(|l| l.contains(what)).count();
    assert_eq!(count(" WARN "), 2, "{text}");
    assert_eq!(count("rate-limit store failing"), 1, "{text}");
    assert_eq!(count("rate-limit store recovered"), 1, "{text}");
    assert_eq!(count("the key registry is read again"), 1, "{text}");
}

/// A node killed and restarted empty (no persistence) on its port, with its
/// cluster configuration: while it is down its keys' requests are decided by
/// the failure mode, and once it is back they are decided by Redis again,
/// with every limit starting over, without a new store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_empty_is_served_again() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut cluster = RedisCluster::start();
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let layer = layer(&cluster, "restart", &clock, resharded_policy(&clock)).await;
    assert_eq!(passes(&layer, b"vk", 30).await, 30);
    let (slot, node) = slot_of(&cluster, "restart:*");
    tokio::task::block_in_place(|| cluster.node_mut(node).kill());
    let r = layer.decide(b"vk", 1).await.expect_err("closed");
    assert_eq!(r.status().as_u16(), 503);
    tokio::task::block_in_place(|| cluster.node_mut(node).restart());
    assert_eq!(cluster.owner_of(slot), node);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut passed = 0;
    while passed == 0 {
        match layer.decide(b"vk", 1).await {
            Ok(()) => passed += 1,
            Err(r) => {
                assert_eq!(r.status().as_u16(), 503, "{r:?}");
                assert!(tokio::time::Instant::now() < deadline, "never served again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    passed += passes(&layer, b"vk", 40).await;
    assert_eq!(passed, 30, "a new burst on the empty node");
}

/// A request whose future is dropped (its client went away) after the stage,
/// in a slot of its own, charged it, while its key's part waits on a node
/// that does not answer: the stage gets its charge back, as when a later
/// part denies or fails. Without that, a client past its own limits could
/// drain the bucket every caller shares by hanging up early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_between_its_slots_gives_the_stage_back() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut cluster = RedisCluster::start();
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    // The stage's throttle and the key's limits must live on two nodes:
    // prefixes are tried until their slots fall apart.
    let node_of = |cluster: &RedisCluster, key: &str| {
        let addrs = cluster.addrs();
        (0..addrs.len())
            .find(|&i| command(addrs[i], &["EXISTS", key]).as_deref() == Ok("1"))
            .unwrap_or_else(|| panic!("{key} is nowhere"))
    };
    let mut apart = None;
    for i in 0..16 {
        let policy = Policy::builder()
            .clock(clock.clone())
            .stage(Stage::new().throttle(Throttle::new(0.001, 10).unwrap()))
            .plan(
                UsagePlan::new("p")
                    .throttle(Throttle::new(0.001, 1).unwrap())
                    .quota(Quota::new(100, Period::Day).unwrap()),
            )
            .plan(UsagePlan::new("wide").throttle(Throttle::new(0.001, 100).unwrap()))
            .key(ApiKey::new("k-1", "vk", "p"))
            .key(ApiKey::new("w-1", "vw", "wide"))
            .build()
            .unwrap();
        let prefix = format!("dropped-{i}");
        let layer = layer(&cluster, &prefix, &clock, policy).await;
        assert!(layer.decide(b"vk", 1).await.is_ok());
        // The key's quota count names its tag; the other throttle is the stage's.
        let keys: Vec<_> = cluster
            .addrs()
            .into_iter()
            .flat_map(|addr| scan(addr, &format!("{prefix}:*")))
            .collect();
        let count = keys.iter().find(|k| k.ends_with(":q")).expect("a count");
        let tag = &count[..count.len() - 2];
        let stage = keys
            .iter()
            .find(|k| k.contains(":t:") && !k.starts_with(tag))
            .expect("the stage's throttle");
        let key = node_of(&cluster, count);
        if node_of(&cluster, stage) != key {
            apart = Some((layer, key));
            break;
        }
    }
    let (layer, key) = apart.expect("the stage's slot apart from the key's");
    let r = layer
        .decide(b"vk", 1)
        .await
        .expect_err("its throttle denies");
    assert_eq!(r.limit(), Some("throttle"));
    cluster.node_mut(key).pause();
    for _ in 0..5 {
        let gone = tokio::time::timeout(Duration::from_millis(300), layer.decide(b"vk", 1)).await;
        assert!(gone.is_err(), "the key's node is paused: {gone:?}");
    }
    cluster.node_mut(key).resume();
    layer.store().drained().await;
    let mut passed = 0;
    let denied = loop {
        match layer.decide(b"vw", 1).await {
            Ok(()) => passed += 1,
            Err(r) => break r,
        }
    };
    assert_eq!(
        passed,
        10 - 1,
        "the stage has all but k-1's one request: {denied:?}"
    );
    assert_eq!(denied.limit(), Some("stage"));
}

/// Three instances on one Cluster, borrowing shares (the default), decide
/// bursts for one key at once, 40 concurrent requests each: together they
/// admit exactly its daily quota of 20 under a throttle of 25, and once every
/// unused share is back, exactly the 5 the bucket still holds pass after
/// the day turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_borrowing_instances_admit_exactly_the_quota_under_bursts() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 86_400 - 60));
    let policy = || {
        Policy::builder()
            .clock(clock.clone())
            .plan(
                UsagePlan::new("p")
                    .throttle(Throttle::new(0.001, 25).unwrap())
                    .quota(Quota::new(20, Period::Day).unwrap()),
            )
            .key(ApiKey::new("k-1", "vk", "p"))
            .build()
            .unwrap()
    };
    let mut layers = Vec::new();
    for _ in 0..3 {
        layers.push(Arc::new(
            layer(&cluster, "borrowed", &clock, policy()).await,
        ));
    }
    let mut tasks = Vec::new();
    for layer in &layers {
        for _ in 0..40 {
            let layer = Arc::clone(layer);
            tasks.push(tokio::spawn(async move { layer.decide(b"vk", 1).await }));
        }
    }
    let mut passed = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => passed += 1,
            Err(r) => assert_eq!(r.limit(), Some("quota"), "{r:?}"),
        }
    }
    assert_eq!(passed, 20, "the day's quota, exactly");
    for layer in &layers {
        layer.store().drained().await;
    }
    clock.advance(Duration::from_secs(60));
    let mut after = 0;
    for layer in &layers {
        after += passes(layer, b"vk", 10).await;
    }
    assert_eq!(after, 5, "what the bucket of 25 holds after 20");
    let failures: u64 = layers.iter().map(|l| l.store().local_decisions()).sum();
    assert_eq!(failures, 0);
}

/// An account's throttle put anew while a request charged it under the old
/// numbers and waits on its key's slot: when that request is given up, the
/// account gets its charge back converted to the new numbers, as a
/// settlement is (the share in use scaled to the new span), and the
/// account's other keys find what they would had it never been charged.
/// Before, the refund named only the old numbers, and a bucket a later
/// decision had converted since got nothing back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_across_a_change_of_the_accounts_throttle_is_converted() {
    if !require_redis() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut cluster = RedisCluster::start();
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let acme = |burst| Account::new("acme").throttle(Throttle::new(1.0, burst).unwrap());
    let node_of = |cluster: &RedisCluster, key: &str| {
        let addrs = cluster.addrs();
        (0..addrs.len())
            .find(|&i| command(addrs[i], &["EXISTS", key]).as_deref() == Ok("1"))
            .unwrap_or_else(|| panic!("{key} is nowhere"))
    };
    // The account's throttle and k-1's own limits must live on two nodes:
    // prefixes are tried until their slots fall apart.
    let mut apart = None;
    for i in 0..16 {
        let policy = Policy::builder()
            .clock(clock.clone())
            .plan(
                UsagePlan::new("p")
                    .throttle(Throttle::new(0.001, 100).unwrap())
                    .quota(Quota::new(100, Period::Day).unwrap())
                    .failure(FailureMode::Closed),
            )
            .plan(UsagePlan::new("open").failure(FailureMode::Closed))
            .account(acme(10))
            .key(ApiKey::new("k-1", "vk", "p").account("acme"))
            .key(ApiKey::new("w-1", "vw", "open").account("acme"))
            .build()
            .unwrap();
        let prefix = format!("converted-{i}");
        let store = RedisStore::cluster_builder(cluster.urls())
            .prefix(prefix.clone())
            .clock(clock.clone())
            .timeout(Duration::from_secs(2))
            .shared_registry(false)
            .build()
            .await
            .expect("a Redis store");
        let layer = RateLimitLayer::builder(policy).store(store).build();
        assert!(layer.decide(b"vk", 1).await.is_ok());
        let keys: Vec<_> = cluster
            .addrs()
            .into_iter()
            .flat_map(|addr| scan(addr, &format!("{prefix}:*")))
            .collect();
        let count = keys.iter().find(|k| k.ends_with(":q")).expect("a count");
        let tag = &count[..count.len() - 2];
        let account = keys
            .iter()
            .find(|k| k.contains(":t:") && !k.starts_with(tag))
            .expect("the account's throttle");
        let key = node_of(&cluster, count);
        if node_of(&cluster, account) != key {
            apart = Some((Arc::new(layer), key));
            break;
        }
    }
    let (layer, key) = apart.expect("the account's slot apart from the key's");
    // 1 of 10 used. The next request of k-1 charges the account (2 of 10)
    // and waits on its key's node.
    cluster.node_mut(key).pause();
    let waiting = {
        let layer = Arc::clone(&layer);
        tokio::spawn(async move { layer.decide(b"vk", 1).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "k-1's node is paused");
    // Twice the span: 2 of 10 are 4 of 20, and w-1's request a fifth.
    layer.admin().put_account(acme(20)).await.unwrap();
    assert!(layer.decide(b"vw", 1).await.is_ok());
    // Given up: its charge (1 of 10, so 2 of 20) goes back.
    waiting.abort();
    let _ = waiting.await;
    cluster.node_mut(key).resume();
    layer.store().drained().await;
    let mut passed = 0;
    while passed < 40 && layer.decide(b"vw", 1).await.is_ok() {
        passed += 1;
    }
    assert_eq!(passed, 20 - 2 - 1, "k-1's first request and w-1's one");
}
