//! Quotas for subjects nobody registered (a per-key policy's keys, client
//! IPs): counted exactly, in bounded memory on the memory store (a counter
//! is forgotten only once its window has ended; while every counter is
//! live a new subject waits; a peek takes no counter), and across
//! instances on a real Redis.

use std::time::Duration;

use tollgate::{
    ManualClock, MemoryStore, Period, Policy, Quota, RateLimitLayer, Reason, RedisStore, Throttle,
    UsagePlan,
};

use crate::support::at;
use crate::support::redis::{RedisServer, require_redis};

fn plan() -> UsagePlan {
    UsagePlan::new("per-ip")
        .throttle(Throttle::new(1_000.0, 1_000).unwrap())
        .quota(Quota::new(3, Period::Day).unwrap())
}

fn reason(r: Result<(), tollgate::Rejection>) -> Option<Reason> {
    r.err().map(|r| r.reason())
}

#[test]
fn a_per_key_quota_counts_each_key_and_is_bounded_by_the_stores_cap() {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 1, 0));
    let store = MemoryStore::builder()
        .clock(clock.clone())
        .max_keys(640)
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(Policy::per_key(plan()).unwrap())
        .store(store.clone())
        .build();

    // Each key has its own quota of 3 a day.
    for _ in 0..3 {
        assert_eq!(reason(layer.check(b"10.0.0.1", 1)), None);
    }
    assert_eq!(
        reason(layer.check(b"10.0.0.1", 1)),
        Some(Reason::QuotaExceeded)
    );
    assert_eq!(reason(layer.check(b"10.0.0.2", 1)), None);

    // A flood of new keys: the counters stay within the cap (640), and
    // keys past it wait instead of being counted.
    let mut refused = 0;
    for i in 0..20_000u32 {
        match reason(layer.check(format!("flood-{i}").as_bytes(), 1)) {
            None => {}
            Some(Reason::KeyCapacity) => refused += 1,
            other => panic!("flood key {i}: {other:?}"),
        }
    }
    assert!(store.quota_counters() <= 640, "{}", store.quota_counters());
    assert!(refused >= 20_000 - 640, "{refused} refused");
    // No live count was forgotten to make room.
    assert_eq!(
        reason(layer.check(b"10.0.0.1", 1)),
        Some(Reason::QuotaExceeded)
    );
    let wait = layer.check(b"one-more", 1).unwrap_err();
    if wait.reason() == Reason::KeyCapacity {
        let retry = wait.retry_after().unwrap();
        assert!(retry <= Duration::from_secs(86_400), "{retry:?}");
    }

    // The next day every counter is idle: new keys are counted again (a
    // hundred: well within the cap), and the old ones start a fresh window.
    clock.advance(Duration::from_secs(86_400));
    for i in 0..100u32 {
        assert_eq!(
            reason(layer.check(format!("day2-{i}").as_bytes(), 1)),
            None,
            "{i}"
        );
    }
    assert_eq!(reason(layer.check(b"10.0.0.1", 1)), None);
    assert!(store.quota_counters() <= 640);
}

#[tokio::test]
async fn a_per_key_quota_is_shared_by_instances_on_redis() {
    if !require_redis() {
        return;
    }
    let server = RedisServer::start();
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 1, 0));
    let layer = || async {
        let store = RedisStore::builder(server.url())
            .clock(clock.clone())
            .timeout(Duration::from_secs(2))
            .build()
            .await
            .unwrap();
        RateLimitLayer::builder(Policy::per_key(plan().borrow(false)).unwrap())
            .store(store)
            .build()
    };
    let (a, b) = (layer().await, layer().await);
    let mut passed = 0;
    for l in [&a, &b, &a, &b, &a] {
        passed += usize::from(l.decide(b"203.0.113.7", 1).await.is_ok());
    }
    assert_eq!(passed, 3, "one quota of 3 for the key on both instances");
    assert!(a.decide(b"203.0.113.8", 1).await.is_ok(), "another key");
    // The counters expire by themselves: every quota key has a time to live.
    let keys = crate::support::redis::scan(server.addr(), "*:q*");
    assert!(!keys.is_empty());
    for key in keys {
        let ttl = crate::support::redis::command(server.addr(), &["TTL", &key]).unwrap();
        let ttl: i64 = ttl.trim().parse().unwrap();
        assert!(ttl > 0, "{key} has no expiry ({ttl})");
    }
}

/// A peek (a decision of cost 0) of a subject never seen takes no counter
/// on the memory store: it answers as a fresh subject's would, with the
/// whole quota, also when every place under the cap is taken, and peeks of
/// many subjects leave the places to the requests that need them.
#[tokio::test]
async fn a_peek_takes_no_counter_and_answers_as_a_fresh_subject_at_the_cap() {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 1, 0));
    let store = MemoryStore::builder()
        .clock(clock.clone())
        .max_keys(64)
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(Policy::per_key(plan()).unwrap())
        .store(store.clone())
        .build();
    for i in 0..1_000u32 {
        assert_eq!(reason(layer.check(format!("peek-{i}").as_bytes(), 0)), None);
    }
    assert_eq!(store.quota_counters(), 0, "peeks made counters");
    // The places are the requests': 64 new subjects are each counted, and
    // the 65th waits.
    for i in 0..64u32 {
        assert_eq!(
            reason(layer.check(format!("real-{i}").as_bytes(), 1)),
            None,
            "{i}"
        );
    }
    assert_eq!(
        reason(layer.check(b"one-more", 1)),
        Some(Reason::KeyCapacity)
    );
    // A peek of it is not refused for want of a place: a fresh subject has
    // its whole quota, and nothing is taken.
    assert_eq!(reason(layer.check(b"one-more", 0)), None);
    let standing = layer.standing(b"one-more").await.unwrap();
    assert!(standing.refused().is_none());
    let quota = standing
        .limits()
        .iter()
        .find(|l| l.name() == "quota")
        .unwrap();
    assert_eq!((quota.limit(), quota.remaining()), (3, 3));
    assert_eq!(store.quota_counters(), 64);
}
