//! The conformance suite: one set of behaviours (throttle, burst, cost,
//! quota windows, atomic denial, usage reports, runtime plan changes, stage
//! and shadow plans) run against every store, so that the memory store and
//! the Redis store (a real `redis-server` on a free port, and a 3-node
//! Redis Cluster for a subset) provably agree. Time is a manual clock: the
//! Redis store decides on it instead of Redis `TIME` when given one.

use std::time::Duration;

use tollgate::extract::ApiKeyHeader;
use tollgate::store::Store;
use tollgate::{
    ApiKey, Date, ManualClock, Period, Policy, Quota, RateLimitLayer, Reason, RedisStore, Stage,
    Throttle, TokenBudget, UsagePlan, Weekday,
};

use crate::support;
use crate::support::at;
use crate::support::backend::{Backend, Memory, Redis, on_each_backend};
use crate::support::redis::{RedisServer, require_redis};
use crate::support::tokens;

type Layer<B> = RateLimitLayer<ApiKeyHeader, <B as Backend>::S>;

async fn layer<B: Backend>(
    b: &B,
    clock: &ManualClock,
    plans: Vec<UsagePlan>,
    keys: Vec<ApiKey>,
) -> Layer<B> {
    let mut p = Policy::builder().clock(clock.clone());
    for plan in plans {
        p = p.plan(plan);
    }
    for k in keys {
        p = p.key(k);
    }
    RateLimitLayer::builder(p.build().unwrap())
        .store(b.store(clock).await)
        .build()
}

async fn reason<S: Store>(l: &RateLimitLayer<ApiKeyHeader, S>, key: &[u8]) -> Option<Reason> {
    l.decide(key, 1).await.err().map(|r| r.reason())
}

/// How many of `n` requests of `key` pass.
async fn passed<S: Store>(l: &RateLimitLayer<ApiKeyHeader, S>, key: &[u8], n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        ok += usize::from(l.decide(key, 1).await.is_ok());
    }
    ok
}

async fn throttled_requests_do_not_consume_quota_and_quota_denied_ones_do_not_consume_throttle<
    B: Backend,
>(
    b: &B,
) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 1, 3_600));
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(1.0, 2).unwrap())
        .quota(Quota::new(4, Period::Day).unwrap());
    let l = layer(b, &clock, vec![plan], vec![ApiKey::new("k", "v", "p")]).await;
    assert_eq!(reason(&l, b"v").await, None);
    assert_eq!(reason(&l, b"v").await, None);
    // Throttled five times: none of these counts against the quota of 4.
    for _ in 0..5 {
        assert_eq!(reason(&l, b"v").await, Some(Reason::Limited));
    }
    clock.advance(Duration::from_secs(2));
    assert_eq!(reason(&l, b"v").await, None);
    assert_eq!(reason(&l, b"v").await, None);
    clock.advance(Duration::from_secs(10));
    // The quota is used up (4); the bucket is full (2).
    let r = l.decide(b"v", 1).await.unwrap_err();
    assert_eq!(r.reason(), Reason::QuotaExceeded);
    assert_eq!(r.status(), 429);
    assert_eq!(r.message(), "Limit Exceeded");
    // Retry-After is the time to the day's end: 24h - 1h - 12s.
    assert_eq!(r.retry_after_secs(), Some(86_400 - 3_600 - 12));
    // Quota-denied requests took nothing from the bucket: after a raise, two pass at once.
    for _ in 0..3 {
        assert_eq!(reason(&l, b"v").await, Some(Reason::QuotaExceeded));
    }
    l.admin().set_remaining("k", 10).await.unwrap();
    assert_eq!(reason(&l, b"v").await, None);
    assert_eq!(reason(&l, b"v").await, None);
    assert_eq!(reason(&l, b"v").await, Some(Reason::Limited));
}

async fn day_quota_resets_at_midnight_utc_not_a_nanosecond_before<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 1, 86_399));
    let plan = UsagePlan::new("p").quota(Quota::new(1, Period::Day).unwrap());
    let l = layer(b, &clock, vec![plan], vec![ApiKey::new("k", "v", "p")]).await;
    assert_eq!(reason(&l, b"v").await, None);
    clock.advance(Duration::from_nanos(999_999_999));
    let r = l.decide(b"v", 1).await.unwrap_err();
    assert_eq!(r.reason(), Reason::QuotaExceeded);
    assert_eq!(r.retry_after(), Some(Duration::from_nanos(1)));
    clock.advance(Duration::from_nanos(1));
    assert_eq!(reason(&l, b"v").await, None);
}

async fn week_quota_renews_on_the_configured_day<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    // 2024-05-04 is a Saturday.
    clock.set_wall(at(2024, 5, 4, 12 * 3_600));
    let plan = UsagePlan::new("p").quota(Quota::new(1, Period::Week(Weekday::Sunday)).unwrap());
    let l = layer(b, &clock, vec![plan], vec![ApiKey::new("k", "v", "p")]).await;
    assert_eq!(reason(&l, b"v").await, None);
    assert_eq!(reason(&l, b"v").await, Some(Reason::QuotaExceeded));
    clock.set_wall(at(2024, 5, 5, 0) - Duration::from_nanos(1));
    assert_eq!(reason(&l, b"v").await, Some(Reason::QuotaExceeded));
    clock.set_wall(at(2024, 5, 5, 0));
    assert_eq!(reason(&l, b"v").await, None);
}

async fn month_quota_renews_after_feb_29_in_a_leap_year<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 2, 1, 0));
    let plan = UsagePlan::new("p").quota(Quota::new(2, Period::Month).unwrap());
    let l = layer(b, &clock, vec![plan], vec![ApiKey::new("k", "v", "p")]).await;
    assert_eq!(reason(&l, b"v").await, None);
    clock.set_wall(at(2024, 2, 29, 86_399));
    assert_eq!(reason(&l, b"v").await, None);
    assert_eq!(reason(&l, b"v").await, Some(Reason::QuotaExceeded));
    clock.set_wall(at(2024, 3, 1, 0));
    assert_eq!(reason(&l, b"v").await, None);
}

async fn quota_offset_applies_in_the_creation_window<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 1, 100));
    let plan =
        UsagePlan::new("p").quota(Quota::new(5, Period::Day).unwrap().with_offset(3).unwrap());
    let l = layer(b, &clock, vec![plan], vec![ApiKey::new("k", "v", "p")]).await;
    let first = passed(&l, b"v", 10).await;
    assert_eq!(first, 2);
    clock.set_wall(at(2024, 5, 2, 0));
    let second = passed(&l, b"v", 10).await;
    assert_eq!(second, 5);
}

async fn keys_change_while_serving_without_losing_counters<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let free = UsagePlan::new("free").throttle(Throttle::new(1.0, 3).unwrap());
    let pro = UsagePlan::new("pro").throttle(Throttle::new(1.0, 10).unwrap());
    let l = layer(
        b,
        &clock,
        vec![free, pro],
        vec![ApiKey::new("k", "v", "free")],
    )
    .await;
    let admin = l.admin();
    assert_eq!(reason(&l, b"v").await, None);
    assert_eq!(reason(&l, b"v").await, None);

    // Unknown until added; disabled keys are refused; re-enabled keys keep their state.
    assert_eq!(reason(&l, b"new").await, Some(Reason::UnknownKey));
    admin
        .add_key(ApiKey::new("k2", "new", "free"))
        .await
        .unwrap();
    assert_eq!(reason(&l, b"new").await, None);
    admin.set_enabled("k", false).await.unwrap();
    assert_eq!(reason(&l, b"v").await, Some(Reason::DisabledKey));
    admin.set_enabled("k", true).await.unwrap();
    assert_eq!(reason(&l, b"v").await, None);
    assert_eq!(reason(&l, b"v").await, Some(Reason::Limited), "3 used of 3");

    // Moved to pro: a fresh pro bucket; moved back: the free bucket as it was.
    admin.set_plan("k", "pro").await.unwrap();
    assert_eq!(passed(&l, b"v", 20).await, 10);
    admin.set_plan("k", "free").await.unwrap();
    assert_eq!(reason(&l, b"v").await, Some(Reason::Limited));

    // Replacing the plan's limits keeps the key's state: the bucket is still
    // empty (not a fresh one), and refills at the new plan's rate.
    admin
        .put_plan(
            UsagePlan::new("free")
                .throttle(Throttle::new(1.0, 3).unwrap())
                .quota(Quota::new(1_000, Period::Day).unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(reason(&l, b"v").await, Some(Reason::Limited));
    clock.advance(Duration::from_secs(1));
    assert_eq!(reason(&l, b"v").await, None);
    assert_eq!(reason(&l, b"v").await, Some(Reason::Limited));
    assert!(admin.plan("free").unwrap().get_quota().is_some());

    // Errors name what is wrong.
    assert!(admin.set_plan("k", "gold").await.is_err());
    assert!(admin.set_enabled("nobody", true).await.is_err());
    assert!(
        admin
            .add_key(ApiKey::new("k", "other", "free"))
            .await
            .is_err(),
        "duplicate id"
    );
    assert!(
        admin.add_key(ApiKey::new("k3", "v", "free")).await.is_err(),
        "duplicate value"
    );
    assert_eq!(admin.key("k").unwrap().plan, "free");
    assert_eq!(admin.keys().len(), 2);
}

async fn usage_reports_match_the_traffic_and_update_usage_moves_remaining<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600)); // a Monday
    let plan = UsagePlan::new("p").quota(Quota::new(100, Period::WEEK).unwrap());
    let l = layer(
        b,
        &clock,
        vec![plan],
        vec![ApiKey::new("a", "va", "p"), ApiKey::new("b", "vb", "p")],
    )
    .await;
    let admin = l.admin();
    for _ in 0..7 {
        l.decide(b"va", 1).await.unwrap();
    }
    l.decide(b"vb", 1).await.unwrap();
    clock.advance(Duration::from_secs(86_400));
    for _ in 0..3 {
        l.decide(b"va", 1).await.unwrap();
    }
    let start = Date::new(2024, 5, 5).unwrap();
    let end = Date::new(2024, 5, 9).unwrap();
    let r = admin.usage("p", start, end, None).await.unwrap();
    assert_eq!(r.end, Date::new(2024, 5, 7).unwrap(), "cut at today");
    assert_eq!(r.items["a"], vec![[0, 100], [7, 93], [3, 90]]);
    assert_eq!(r.items["b"], vec![[0, 100], [1, 99], [0, 99]]);
    let only_b = admin.usage("p", start, end, Some("b")).await.unwrap();
    assert_eq!(only_b.items.keys().collect::<Vec<_>>(), ["b"]);

    // UpdateUsage raises, then lowers, what remains.
    assert_eq!(admin.set_remaining("a", 500).await.unwrap(), 500);
    let today = Date::new(2024, 5, 7).unwrap();
    assert_eq!(
        admin.usage("p", today, end, Some("a")).await.unwrap().items["a"],
        vec![[3, 500]]
    );
    assert_eq!(admin.set_remaining("a", 1).await.unwrap(), 1);
    l.decide(b"va", 1).await.unwrap();
    assert_eq!(reason(&l, b"va").await, Some(Reason::QuotaExceeded));

    // Reset forgets the window.
    admin.reset_key("a").await.unwrap();
    l.decide(b"va", 1).await.unwrap();

    assert!(admin.usage("p", end, start, None).await.is_err());
    assert!(admin.usage("nope", start, end, None).await.is_err());
    assert!(
        admin
            .usage("p", Date::new(2023, 1, 1).unwrap(), end, None)
            .await
            .is_err(),
        "before the history"
    );
}

async fn stage_limits_are_shared_by_every_key_and_decided_with_the_plan<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let store = b.store(&clock).await;
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(UsagePlan::new("p").throttle(Throttle::new(1.0, 2).unwrap()))
        .key(ApiKey::new("a", "va", "p"))
        .key(ApiKey::new("b", "vb", "p"))
        .key(ApiKey::new("c", "vc", "p"))
        .stage(Stage::new().throttle(Throttle::new(1.0, 5).unwrap()))
        .build()
        .unwrap();
    let l = RateLimitLayer::builder(policy).store(store).build();
    assert!(l.decide(b"va", 1).await.is_ok());
    assert!(l.decide(b"va", 1).await.is_ok());
    // a's plan bucket is empty: denied by the plan, and the stage keeps its 3.
    assert_eq!(reason(&l, b"va").await, Some(Reason::Limited));
    assert!(l.decide(b"vb", 1).await.is_ok());
    assert!(l.decide(b"vb", 1).await.is_ok());
    assert!(l.decide(b"vc", 1).await.is_ok());
    let r = l.decide(b"vc", 1).await.unwrap_err();
    assert_eq!(r.limit(), Some("stage"));
}

async fn a_shadow_plan_decides_and_counts_but_never_rejects<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 0));
    let plan = UsagePlan::new("s")
        .throttle(Throttle::new(1.0, 2).unwrap())
        .quota(Quota::new(3, Period::Day).unwrap())
        .shadow(true);
    let l = layer(b, &clock, vec![plan], vec![ApiKey::new("k", "v", "s")]).await;
    for _ in 0..10 {
        assert!(l.decide(b"v", 1).await.is_ok());
    }
    // Every request was counted against the quota, past its limit.
    let day = Date::new(2024, 5, 6).unwrap();
    let r = l.admin().usage("s", day, day, None).await.unwrap();
    assert_eq!(r.items["k"], vec![[10, 0]]);
}

async fn a_shadow_plan_never_lifts_the_stage_limit<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let store = b.store(&clock).await;
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(
            UsagePlan::new("s")
                .throttle(Throttle::new(1.0, 1).unwrap())
                .shadow(true),
        )
        .plan(UsagePlan::new("p").throttle(Throttle::new(100.0, 100).unwrap()))
        .key(ApiKey::new("shadow", "vs", "s"))
        .key(ApiKey::new("normal", "vp", "p"))
        .stage(Stage::new().throttle(Throttle::new(1.0, 2).unwrap()))
        .build()
        .unwrap();
    let l = RateLimitLayer::builder(policy).store(store).build();
    assert!(l.decide(b"vs", 1).await.is_ok());
    assert!(
        l.decide(b"vs", 1).await.is_ok(),
        "past its own limit: shadow passes"
    );
    let r = l.decide(b"vs", 1).await.unwrap_err();
    assert_eq!(
        r.limit(),
        Some("stage"),
        "the shared stage limit still holds"
    );
    assert_eq!(l.decide(b"vp", 1).await.unwrap_err().limit(), Some("stage"));
}

async fn replacing_a_throttle_keeps_the_share_of_each_bucket_in_use<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let fast = UsagePlan::new("p").throttle(Throttle::new(100.0, 10).unwrap());
    let l = layer(b, &clock, vec![fast], vec![ApiKey::new("k", "v", "p")]).await;
    assert_eq!(passed(&l, b"v", 20).await, 10);
    // Slower: the emptied bucket stays empty and refills at the new rate.
    l.admin()
        .put_plan(UsagePlan::new("p").throttle(Throttle::new(1.0, 10).unwrap()))
        .await
        .unwrap();
    assert_eq!(reason(&l, b"v").await, Some(Reason::Limited));
    clock.advance(Duration::from_millis(999));
    assert_eq!(reason(&l, b"v").await, Some(Reason::Limited));
    clock.advance(Duration::from_millis(1));
    assert_eq!(reason(&l, b"v").await, None);
    assert_eq!(reason(&l, b"v").await, Some(Reason::Limited));
    // Much faster: the lockout shrinks with the new rate.
    l.admin()
        .put_plan(UsagePlan::new("p").throttle(Throttle::new(1_000.0, 10).unwrap()))
        .await
        .unwrap();
    clock.advance(Duration::from_millis(1));
    assert_eq!(reason(&l, b"v").await, None);
}

/// Two changes of a throttle with no request between them: each converts
/// the bucket as it stands at its own instant, the time between them
/// drained under the middle numbers, and every store ends at the same
/// nanosecond, whichever store converts when.
async fn a_throttle_changed_twice_between_requests_converts_at_each_change<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let plan =
        |rate: f64, burst: u32| UsagePlan::new("p").throttle(Throttle::new(rate, burst).unwrap());
    let l = layer(
        b,
        &clock,
        vec![plan(1.0, 2)],
        vec![ApiKey::new("k", "v", "p")],
    )
    .await;
    assert_eq!(passed(&l, b"v", 3).await, 2);
    // Emptied: 2 s ahead of a 2 s span. Twice as fast, it is 1 s ahead of
    // a 1 s span; half a second drains half of it.
    l.admin().put_plan(plan(2.0, 2)).await.unwrap();
    clock.advance(Duration::from_millis(500));
    // Back to 1/s: the half second ahead doubles to a whole one.
    l.admin().put_plan(plan(1.0, 2)).await.unwrap();
    let r = l.decide(b"v", 2).await.unwrap_err();
    assert_eq!(r.retry_after(), Some(Duration::from_secs(1)));
    // Two changes at one instant round down once each: 1 s ahead of a 2 s
    // span is 1_000_000_000 ns ahead of 2_000_000_001 (3 units of
    // 666_666_667 ns), rounded down from 1_000_000_000.5, then
    // 999_999_999 ns ahead of 2 s again, rounded down from 999_999_999.5.
    l.admin().put_plan(plan(1.5, 3)).await.unwrap();
    l.admin().put_plan(plan(1.0, 2)).await.unwrap();
    let r = l.decide(b"v", 2).await.unwrap_err();
    assert_eq!(r.retry_after(), Some(Duration::from_nanos(999_999_999)));
}

/// On a manual clock no time passes but the clock's: real time spent
/// between requests (a slow machine, a long round trip) refills nothing. A
/// bucket emptied at 100/s would be full again after 100 ms of real time
/// if the store let its state lapse on its own clock.
async fn a_manual_clock_standing_still_keeps_an_emptied_bucket_empty<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 1, 3_600));
    let plan = UsagePlan::new("p").throttle(Throttle::new(100.0, 10).unwrap());
    let l = layer(b, &clock, vec![plan], vec![ApiKey::new("k", "v", "p")]).await;
    assert_eq!(passed(&l, b"v", 1).await, 1);
    // More real time than the first request's 10 ms.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(passed(&l, b"v", 20).await, 9);
    // More real time than the whole bucket's 100 ms.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(reason(&l, b"v").await, Some(Reason::Limited));
    clock.advance(Duration::from_millis(10));
    assert_eq!(reason(&l, b"v").await, None);
    assert_eq!(reason(&l, b"v").await, Some(Reason::Limited));
}

async fn a_denial_names_the_limit_that_holds_the_request_longest<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let store = b.store(&clock).await;
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(
            UsagePlan::new("p")
                .throttle(Throttle::new(0.1, 1).unwrap())
                .quota(Quota::new(1, Period::Day).unwrap()),
        )
        .plan(UsagePlan::new("q").throttle(Throttle::new(0.1, 1).unwrap()))
        .key(ApiKey::new("a", "va", "p"))
        .key(ApiKey::new("b", "vb", "q"))
        .stage(Stage::new().throttle(Throttle::new(1.0, 5).unwrap()))
        .build()
        .unwrap();
    let l = RateLimitLayer::builder(policy).store(store).build();
    assert!(l.decide(b"va", 1).await.is_ok());
    // Throttle (10 s) and quota (23 h) both deny: the quota is named.
    let r = l.decide(b"va", 1).await.unwrap_err();
    assert_eq!(r.reason(), Reason::QuotaExceeded);
    assert_eq!(r.retry_after_secs(), Some(23 * 3_600));
    // Stage has room, the plan throttle waits 10 s: the 10 s is the answer.
    assert!(l.decide(b"vb", 1).await.is_ok());
    let r = l.decide(b"vb", 1).await.unwrap_err();
    assert_eq!(
        (r.limit(), r.retry_after_secs()),
        (Some("throttle"), Some(10))
    );
    assert!(
        Policy::builder().history_days(7).build().is_err(),
        "history under a month"
    );
}

async fn burst_then_one_per_interval_and_costs_count_as_units<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 1, 0));
    let plan = UsagePlan::new("p").throttle(Throttle::new(2.0, 5).unwrap());
    let keys = vec![ApiKey::new("k", "v", "p"), ApiKey::new("k2", "v2", "p")];
    let l = layer(b, &clock, vec![plan], keys).await;
    assert_eq!(passed(&l, b"v", 10).await, 5);
    let r = l.decide(b"v", 1).await.unwrap_err();
    assert_eq!(r.reason(), Reason::Limited);
    assert_eq!(r.retry_after(), Some(Duration::from_millis(500)));
    clock.advance(Duration::from_millis(499));
    assert_eq!(reason(&l, b"v").await, Some(Reason::Limited));
    clock.advance(Duration::from_millis(1));
    assert_eq!(reason(&l, b"v").await, None);
    assert_eq!(reason(&l, b"v").await, Some(Reason::Limited));
    // Another key has a bucket of its own.
    assert_eq!(passed(&l, b"v2", 10).await, 5);
    // A cost is that many units: 2 s refill 4.
    clock.advance(Duration::from_secs(2));
    assert_eq!(
        l.decide(b"v", 5).await.unwrap_err().reason(),
        Reason::Limited
    );
    assert!(l.decide(b"v", 4).await.is_ok());
    assert_eq!(reason(&l, b"v").await, Some(Reason::Limited));
    // A cost of 0 peeks: it passes on an empty bucket and charges nothing.
    assert!(l.decide(b"v", 0).await.is_ok());
    clock.advance(Duration::from_millis(500));
    assert_eq!(reason(&l, b"v").await, None);
    // A cost above the whole bucket never passes, and says so.
    let r = l.decide(b"v2", 6).await.unwrap_err();
    assert_eq!(r.reason(), Reason::CostExceedsLimit);
    assert_eq!(r.retry_after(), None);
    assert_eq!(reason(&l, b"nobody").await, Some(Reason::UnknownKey));
}

async fn per_key_policies_limit_each_key_apart<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 1, 0));
    let plan = UsagePlan::new("ip").throttle(Throttle::new(1.0, 2).unwrap());
    let l = RateLimitLayer::builder(Policy::per_key(plan).unwrap())
        .store(b.store(&clock).await)
        .build();
    assert_eq!(passed(&l, b"10.0.0.1", 5).await, 2);
    assert_eq!(passed(&l, b"10.0.0.2", 5).await, 2);
    clock.advance(Duration::from_secs(1));
    assert_eq!(passed(&l, b"10.0.0.1", 5).await, 1);
}

async fn layers_on_one_store_share_one_budget<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 1, 0));
    let store = b.store(&clock).await;
    let policy = || {
        Policy::builder()
            .clock(clock.clone())
            .plan(UsagePlan::new("p").throttle(Throttle::new(1.0, 5).unwrap()))
            .key(ApiKey::new("k", "v", "p"))
            .build()
            .unwrap()
    };
    // Two instances of one service: each has its own policy, both one store.
    let one = RateLimitLayer::builder(policy())
        .store(store.clone())
        .build();
    let two = RateLimitLayer::builder(policy()).store(store).build();
    let mut admitted = 0;
    for i in 0..20 {
        let l = if i % 2 == 0 { &one } else { &two };
        admitted += usize::from(l.decide(b"v", 1).await.is_ok());
    }
    assert_eq!(admitted, 5, "what one instance alone would admit");
}

async fn a_shadow_plan_never_names_a_denial<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(
            UsagePlan::new("s")
                .quota(Quota::new(1, Period::Day).unwrap())
                .shadow(true),
        )
        .key(ApiKey::new("k", "v", "s"))
        .stage(Stage::new().throttle(Throttle::new(1.0, 2).unwrap()))
        .build()
        .unwrap();
    let l = RateLimitLayer::builder(policy)
        .store(b.store(&clock).await)
        .build();
    assert_eq!(passed(&l, b"v", 2).await, 2, "past the shadow quota");
    // The stage denies; the shadow quota, past its limit, is not the answer.
    let r = l.decide(b"v", 1).await.unwrap_err();
    assert_eq!(
        (r.reason(), r.limit(), r.retry_after_secs()),
        (Reason::Limited, Some("stage"), Some(1))
    );
}

async fn a_used_up_quota_is_named_over_a_shorter_stage_wait<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(UsagePlan::new("p").quota(Quota::new(1, Period::Day).unwrap()))
        .key(ApiKey::new("k", "v", "p"))
        .stage(Stage::new().throttle(Throttle::new(0.1, 1).unwrap()))
        .build()
        .unwrap();
    let l = RateLimitLayer::builder(policy)
        .store(b.store(&clock).await)
        .build();
    assert!(l.decide(b"v", 1).await.is_ok());
    // Both the stage (10 s) and the quota (23 h) deny: the quota is named,
    // and nothing was charged.
    for _ in 0..2 {
        let r = l.decide(b"v", 1).await.unwrap_err();
        assert_eq!(
            (r.reason(), r.retry_after_secs()),
            (Reason::QuotaExceeded, Some(23 * 3_600))
        );
    }
    clock.advance(Duration::from_secs(10));
    assert_eq!(reason(&l, b"v").await, Some(Reason::QuotaExceeded));
}

/// A plan whose week changes its first day at run time (`put_plan`): a
/// week of the new calendar that began after a key's last request starts
/// from 0, as a later window does; one that holds it keeps the count (what
/// part of it came before the new week began is not known, so all of it
/// counts): a key never gets more than the limit in a week of the new
/// calendar. A key moved to a plan with another first day counts under
/// that plan's own counter, and finds its own as it left it when it comes
/// back.
async fn a_week_whose_first_day_changes_keeps_what_its_new_week_counted<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    // Monday 2024-05-06: `a` uses its week (Monday to Monday) up.
    clock.set_wall(at(2024, 5, 6, 3_600));
    // Not borrowing: the counts below are each decision's own.
    let week = |first| {
        UsagePlan::new("p")
            .quota(Quota::new(3, Period::Week(first)).unwrap())
            .borrow(false)
    };
    let other = UsagePlan::new("w")
        .quota(Quota::new(3, Period::Week(Weekday::Wednesday)).unwrap())
        .borrow(false);
    let l = layer(
        b,
        &clock,
        vec![week(Weekday::Monday), other],
        vec![
            ApiKey::new("a", "va", "p"),
            ApiKey::new("b", "vb", "p"),
            ApiKey::new("c", "vc", "p"),
        ],
    )
    .await;
    let admin = l.admin();
    assert_eq!(passed(&l, b"va", 5).await, 3);
    // Wednesday the 8th: `b` uses its week up.
    clock.set_wall(at(2024, 5, 8, 3_600));
    assert_eq!(passed(&l, b"vb", 5).await, 3);
    // Thursday the 9th, weeks now from Wednesday: `a`'s 3 were before the
    // 8th, so its new week is fresh; `b`'s 3 were in it, so it waits for
    // Wednesday the 15th, not Monday the 13th.
    clock.set_wall(at(2024, 5, 9, 3_600));
    admin.put_plan(week(Weekday::Wednesday)).await.unwrap();
    assert_eq!(passed(&l, b"va", 5).await, 3);
    assert_eq!(passed(&l, b"vb", 5).await, 0);
    let r = l.decide(b"vb", 1).await.unwrap_err();
    assert_eq!(r.reason(), Reason::QuotaExceeded);
    assert_eq!(r.retry_after_secs(), Some(6 * 86_400 - 3_600));
    clock.set_wall(at(2024, 5, 13, 3_600));
    assert_eq!(passed(&l, b"vb", 5).await, 0);
    clock.set_wall(at(2024, 5, 15, 0));
    assert_eq!(passed(&l, b"vb", 5).await, 3);
    // Friday the 17th, weeks from Monday again: `b`'s 3 on the 15th are in
    // the week from the 13th, `a`'s on the 9th were not.
    clock.set_wall(at(2024, 5, 17, 0));
    admin.put_plan(week(Weekday::Monday)).await.unwrap();
    assert_eq!(passed(&l, b"va", 5).await, 3);
    assert_eq!(passed(&l, b"vb", 5).await, 0);
    clock.set_wall(at(2024, 5, 20, 0));
    assert_eq!(passed(&l, b"vb", 5).await, 3);

    // `c` uses its week on `p` up, moves to `w` (weeks from Wednesday),
    // whose count of it is its own, and comes back to a used-up week.
    assert_eq!(passed(&l, b"vc", 5).await, 3);
    admin.set_plan("c", "w").await.unwrap();
    assert_eq!(passed(&l, b"vc", 5).await, 3);
    admin.set_plan("c", "p").await.unwrap();
    assert_eq!(passed(&l, b"vc", 5).await, 0);
}

/// A quota put anew with the same limit but another period or offset is
/// decided under its new numbers from the next request, even one right
/// after a denial under the old numbers (the Redis store's over-limit
/// cache, on by default, must not replay that denial).
async fn a_quota_put_anew_decides_under_its_new_numbers_at_once<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    // Monday 2024-05-06: the week (from Monday) is used up.
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = |period, offset| {
        let mut q = Quota::new(3, period).unwrap();
        if offset > 0 {
            q = q.with_offset(offset).unwrap();
        }
        UsagePlan::new("p").quota(q).borrow(false)
    };
    let l = layer(
        b,
        &clock,
        vec![plan(Period::WEEK, 0)],
        vec![ApiKey::new("k", "v", "p")],
    )
    .await;
    let admin = l.admin();
    assert_eq!(passed(&l, b"v", 4).await, 3);
    // Wednesday the 8th: still the used-up week, until Monday the 13th.
    clock.set_wall(at(2024, 5, 8, 3_600));
    let r = l.decide(b"v", 1).await.unwrap_err();
    assert_eq!(r.retry_after_secs(), Some(5 * 86_400 - 3_600));
    // A day of 3 from now: today's window began after Monday's requests.
    admin.put_plan(plan(Period::Day, 0)).await.unwrap();
    assert_eq!(passed(&l, b"v", 4).await, 3);
    let r = l.decide(b"v", 1).await.unwrap_err();
    assert_eq!(r.retry_after_secs(), Some(86_400 - 3_600));
    // A week again, with an offset of 1 in the window of the plan's
    // creation (this one): 3 counted today, 2 allowed; then no offset: 3.
    admin.put_plan(plan(Period::WEEK, 1)).await.unwrap();
    let r = l.decide(b"v", 1).await.unwrap_err();
    assert_eq!(r.retry_after_secs(), Some(5 * 86_400 - 3_600));
    admin.put_plan(plan(Period::WEEK, 0)).await.unwrap();
    let r = l.decide(b"v", 1).await.unwrap_err();
    assert_eq!(r.retry_after_secs(), Some(5 * 86_400 - 3_600));
    // A month whose creation window this is, with an offset of 2 (1
    // allowed, 3 counted); then the offset goes: still 3 counted of 3.
    admin.put_plan(plan(Period::Month, 2)).await.unwrap();
    let r = l.decide(b"v", 1).await.unwrap_err();
    assert_eq!(r.retry_after_secs(), Some(24 * 86_400 - 3_600));
    // In shadow, the plan counts and never rejects.
    admin
        .put_plan(plan(Period::Month, 2).shadow(true))
        .await
        .unwrap();
    assert_eq!(passed(&l, b"v", 2).await, 2);
}

/// A quota put back to numbers it had earlier the same day is decided by
/// the count as it stands, not by a denial under those numbers before:
/// the Redis store's over-limit cache, keyed by the quota's numbers, must
/// not answer with a denial given under a month that a day has replaced
/// since.
async fn a_period_put_back_is_decided_by_the_count_not_an_earlier_denial<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    // Monday 2024-05-06: the week (from Monday) is used up.
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = |period| {
        UsagePlan::new("p")
            .quota(Quota::new(2, period).unwrap())
            .borrow(false)
    };
    let l = layer(
        b,
        &clock,
        vec![plan(Period::WEEK)],
        vec![ApiKey::new("k", "v", "p")],
    )
    .await;
    let admin = l.admin();
    assert_eq!(passed(&l, b"v", 2).await, 2);
    // Tuesday: a month holds Monday's 2, and denies until the month ends.
    clock.set_wall(at(2024, 5, 7, 3_600));
    admin.put_plan(plan(Period::Month)).await.unwrap();
    let r = l.decide(b"v", 1).await.unwrap_err();
    assert_eq!(r.reason(), Reason::QuotaExceeded);
    assert_eq!(r.retry_after_secs(), Some(25 * 86_400 - 3_600));
    // A day began after Monday: one request counts in it.
    admin.put_plan(plan(Period::Day)).await.unwrap();
    assert_eq!(passed(&l, b"v", 1).await, 1);
    // The month again: it holds today's count of 1 (Monday's was left in
    // the day's window), so one more passes.
    admin.put_plan(plan(Period::Month)).await.unwrap();
    assert_eq!(passed(&l, b"v", 2).await, 1);
}

/// A request a token budget refuses outright (a cost it can never hold)
/// changes nothing, not even which day the request quota last changed on:
/// a raise by UpdateUsage stays in the day it was made, and the quota put
/// anew as a DAY starts the next day from nothing, not from the raise.
async fn a_refused_request_leaves_a_raise_on_its_own_day<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = |period| {
        UsagePlan::new("p")
            .quota(Quota::new(1, period).unwrap())
            .tokens(TokenBudget::new().per_day(43).unwrap())
            .borrow(false)
    };
    let (mut svc, admin) = token_service(b, &clock, plan(Period::Month)).await;
    // Monday: 2 remain of a month of 1.
    assert_eq!(admin.set_remaining("k", 2).await.unwrap(), 2);
    // Tuesday: 44 tokens never fit a day of 43.
    clock.set_wall(at(2024, 5, 7, 3_600));
    assert_eq!(
        send_tokens(&mut svc, 44, None).await,
        (429, Some(Reason::CostExceedsLimit))
    );
    // A day of 1 from now: Tuesday's window began after the raise.
    admin.put_plan(plan(Period::Day)).await.unwrap();
    assert_eq!(send_tokens(&mut svc, 1, Some(1)).await, (200, None));
    assert_eq!(
        send_tokens(&mut svc, 1, None).await,
        (429, Some(Reason::QuotaExceeded))
    );
}

/// A peek tells what remains of each limit after what requests used: on a
/// store that lends this instance a share of a busy key's limits, the
/// units it holds unused are not counted as used.
async fn a_peek_counts_only_what_requests_used<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(0.01, 100).unwrap())
        .quota(Quota::new(1_000, Period::Day).unwrap());
    let l = layer(b, &clock, vec![plan], vec![ApiKey::new("k", "v", "p")]).await;
    assert_eq!(passed(&l, b"v", 8).await, 8);
    let standing = l.standing(b"v").await.unwrap();
    let remaining: Vec<(&str, u64)> = standing
        .limits()
        .iter()
        .map(|a| (a.name(), a.remaining()))
        .collect();
    assert_eq!(remaining, [("throttle", 92), ("quota", 992)]);
    // The next requests are counted from there.
    assert_eq!(passed(&l, b"v", 2).await, 2);
    let standing = l.standing(b"v").await.unwrap();
    assert_eq!(standing.limits()[1].remaining(), 990);
}

/// A client that sends its next request as soon as its response ended
/// finds its place under a cap of one free again: the place is given back
/// before the next decision under the cap is made, whatever the store.
async fn a_place_given_back_is_free_for_the_next_request_at_once<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let plan = UsagePlan::new("p").concurrency(1);
    let (mut svc, _admin) = token_service(b, &clock, plan).await;
    for i in 0..20 {
        assert_eq!(
            send_tokens(&mut svc, 0, None).await,
            (200, None),
            "request {i}"
        );
    }
}

/// A client that sends its next request as soon as its response ended
/// finds that response's tokens settled: an under-estimate's debt holds
/// the next request back, an over-estimate's refund lets it in, whatever
/// the store.
async fn a_settlement_counts_for_the_next_request_at_once<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 0));
    let plan = UsagePlan::new("p").tokens(
        TokenBudget::new()
            .per_minute(100)
            .unwrap()
            .per_day(1_000)
            .unwrap(),
    );
    let (mut svc, _admin) = token_service(b, &clock, plan).await;
    // 5 reserved, 190 used: the bucket is 114 s ahead, past its minute.
    assert_eq!(send_tokens(&mut svc, 5, Some(190)).await, (200, None));
    assert_eq!(
        send_tokens(&mut svc, 1, None).await,
        (429, Some(Reason::Limited))
    );
    // Repaid; 100 reserved, 10 used: 90 come back at once.
    clock.advance(Duration::from_secs(120));
    assert_eq!(send_tokens(&mut svc, 100, Some(10)).await, (200, None));
    assert_eq!(send_tokens(&mut svc, 90, None).await, (200, None));
}

/// A token budget in debt (settled above its estimate, the bucket past its
/// minute) keeps its debt when its plan is put anew with another budget:
/// a change of numbers forgives nothing the next requests owe, whether the
/// span changes (7 a minute: 8_571_428_572 ns a token, a span 4 ns over the
/// minute) or not (200 a minute), and whenever the store converts it.
async fn a_budget_in_debt_keeps_its_debt_through_a_plan_put_anew<B: Backend>(b: &B) {
    use http_body_util::BodyExt;
    use tower::{Service, ServiceExt};
    for (per_minute, wait_ns) in [
        // 104 s ahead: 104_000_000_007 ns at the new span (rounded down
        // from 114 s scaled, less the 10 s since), plus one token, less
        // the span.
        (7, 104_000_000_007 + 8_571_428_572 - 60_000_000_004u64),
        (200, 104_000_000_000 + 300_000_000 - 60_000_000_000),
    ] {
        let clock = ManualClock::new();
        clock.set_wall(at(2024, 5, 6, 0));
        let budget = |n: u32| UsagePlan::new("p").tokens(TokenBudget::new().per_minute(n).unwrap());
        let (mut svc, admin) = token_service(b, &clock, budget(100)).await;
        // 5 reserved, 190 used: the bucket is 114 s ahead, 54 s past its minute.
        assert_eq!(send_tokens(&mut svc, 5, Some(190)).await, (200, None));
        admin.put_plan(budget(per_minute)).await.unwrap();
        clock.advance(Duration::from_secs(10));
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(tokens::request("v", 1, None))
            .await
            .unwrap();
        let ms = res
            .headers()
            .get("retry-after-ms")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(res.status(), 429, "{per_minute} a minute");
        assert_eq!(
            ms,
            Some(wait_ns.div_ceil(1_000_000).to_string()),
            "{per_minute} a minute"
        );
        let _ = res.into_body().collect().await.unwrap();
    }
}

/// A reservation made under a budget's old numbers and settled after the
/// budget was put anew is converted to the numbers in force first, as the
/// bucket's own share was at the change, then applied, whether or not the
/// bucket was used under the new numbers in between: 50 of 100 reserved
/// (30 s of the minute's span), the budget put at 3,999,999,999 a minute
/// (16 ns a token, a span of 63.999999984 s: the share becomes
/// 31.999999992 s), then settled at 80 (18 s more, scaled as the share:
/// 19.199999995 s) or at 20 (as much back, within the reservation's own
/// share). With the budget put back at 100 on the way, the share comes
/// back to 30 s and the settlement, rounded down at each change, to
/// 17.999999999 s: 20 tokens remain after the charge, 79 after the refund
/// (a refund never gives back more than the reservation weighed).
async fn a_settlement_after_a_budget_put_anew_is_converted_to_the_new_numbers<B: Backend>(b: &B) {
    use http_body_util::BodyExt;
    use tower::{Service, ServiceExt};
    // Whether the budget is put back, whether a request of the key comes
    // between the change and the settlement (Redis converts its bucket
    // then), the tokens used, what remains.
    for (back, between, actual, remaining) in [
        (false, false, 80, 799_999_999),
        (false, false, 20, 3_199_999_999u64),
        (true, false, 80, 20),
        (true, false, 20, 79),
        (false, true, 80, 799_999_999),
        (false, true, 20, 3_199_999_999),
        (true, true, 20, 79),
    ] {
        let clock = ManualClock::new();
        clock.set_wall(at(2024, 5, 6, 0));
        let budget = |n: u32| UsagePlan::new("p").tokens(TokenBudget::new().per_minute(n).unwrap());
        let (mut svc, admin) = token_service(b, &clock, budget(100)).await;
        let held = svc
            .ready()
            .await
            .unwrap()
            .call(tokens::request("v", 50, Some(actual)))
            .await
            .unwrap();
        assert_eq!(held.status(), 200);
        admin.put_plan(budget(3_999_999_999)).await.unwrap();
        if back {
            admin.put_plan(budget(100)).await.unwrap();
        }
        if between {
            assert_eq!(send_tokens(&mut svc, 0, None).await, (200, None));
        }
        let _ = held.into_body().collect().await.unwrap();
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(tokens::request("v", 0, None))
            .await
            .unwrap();
        let header = res
            .headers()
            .get("ratelimit")
            .map(|v| v.to_str().unwrap().to_owned());
        let what = format!("settled at {actual}, put back: {back}, between: {between}");
        assert_eq!(res.status(), 200, "{what}");
        assert!(
            header
                .as_deref()
                .is_some_and(|h| h.contains(&format!(";r={remaining};"))),
            "{what}: {header:?}"
        );
        let _ = res.into_body().collect().await.unwrap();
    }
}

on_each_backend!(
    "conformance":
    burst_then_one_per_interval_and_costs_count_as_units,
    per_key_policies_limit_each_key_apart,
    layers_on_one_store_share_one_budget,
    throttled_requests_do_not_consume_quota_and_quota_denied_ones_do_not_consume_throttle,
    day_quota_resets_at_midnight_utc_not_a_nanosecond_before,
    week_quota_renews_on_the_configured_day,
    month_quota_renews_after_feb_29_in_a_leap_year,
    quota_offset_applies_in_the_creation_window,
    keys_change_while_serving_without_losing_counters,
    usage_reports_match_the_traffic_and_update_usage_moves_remaining,
    stage_limits_are_shared_by_every_key_and_decided_with_the_plan,
    a_shadow_plan_decides_and_counts_but_never_rejects,
    a_shadow_plan_never_lifts_the_stage_limit,
    replacing_a_throttle_keeps_the_share_of_each_bucket_in_use,
    a_throttle_changed_twice_between_requests_converts_at_each_change,
    a_manual_clock_standing_still_keeps_an_emptied_bucket_empty,
    a_denial_names_the_limit_that_holds_the_request_longest,
    a_shadow_plan_never_names_a_denial,
    a_used_up_quota_is_named_over_a_shorter_stage_wait,
    a_concurrency_cap_holds_places_until_bodies_end,
    a_token_bucket_reserves_estimates_and_settles_actual_costs,
    daily_token_budgets_count_settled_tokens,
    a_body_that_fails_mid_stream_gives_back_its_place_and_settles,
    a_full_concurrency_cap_denies_a_peek_and_a_peek_takes_no_place,
    a_cost_above_a_whole_quota_is_refused_with_no_retry,
    the_longest_wait_is_named_whichever_limit_asks_it,
    nothing_is_admitted_before_its_exact_time,
    a_denial_is_never_replayed_after_a_request_passed,
    a_week_whose_first_day_changes_keeps_what_its_new_week_counted,
    a_quota_put_anew_decides_under_its_new_numbers_at_once,
    a_period_put_back_is_decided_by_the_count_not_an_earlier_denial,
    a_refused_request_leaves_a_raise_on_its_own_day,
    a_peek_counts_only_what_requests_used,
    a_place_given_back_is_free_for_the_next_request_at_once,
    a_settlement_counts_for_the_next_request_at_once,
    a_budget_in_debt_keeps_its_debt_through_a_plan_put_anew,
    a_settlement_after_a_budget_put_anew_is_converted_to_the_new_numbers,
);

/// On a Redis Cluster: the behaviours that touch several slots (stage limits
/// in their own slot, keys of many subjects), on one cluster.
#[tokio::test]
async fn redis_cluster_agrees() {
    if !require_redis() {
        return;
    }
    let cluster = Redis::cluster("conformance");
    burst_then_one_per_interval_and_costs_count_as_units(&cluster).await;
    throttled_requests_do_not_consume_quota_and_quota_denied_ones_do_not_consume_throttle(&cluster)
        .await;
    usage_reports_match_the_traffic_and_update_usage_moves_remaining(&cluster).await;
    stage_limits_are_shared_by_every_key_and_decided_with_the_plan(&cluster).await;
    a_shadow_plan_never_lifts_the_stage_limit(&cluster).await;
    a_denial_names_the_limit_that_holds_the_request_longest(&cluster).await;
    a_shadow_plan_never_names_a_denial(&cluster).await;
    a_used_up_quota_is_named_over_a_shorter_stage_wait(&cluster).await;
    a_concurrency_cap_holds_places_until_bodies_end(&cluster).await;
    a_token_bucket_reserves_estimates_and_settles_actual_costs(&cluster).await;
    daily_token_budgets_count_settled_tokens(&cluster).await;
    a_full_concurrency_cap_denies_a_peek_and_a_peek_takes_no_place(&cluster).await;
    the_longest_wait_is_named_whichever_limit_asks_it(&cluster).await;
    a_peek_counts_only_what_requests_used(&cluster).await;
    a_place_given_back_is_free_for_the_next_request_at_once(&cluster).await;
    a_settlement_counts_for_the_next_request_at_once(&cluster).await;
}

/// The over-limit cache answers a denied key locally with the answer Redis
/// gives: compared at several instants with a store that always asks Redis.
#[tokio::test]
async fn redis_over_limit_cache_answers_as_redis_would() {
    if !require_redis() {
        return;
    }
    let server = RedisServer::start();
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 1, 3_600));
    let store = |cache: Duration| {
        RedisStore::builder(server.url())
            .prefix("cache")
            .clock(clock.clone())
            .over_limit_cache(cache)
            .build()
    };
    let policy = || {
        Policy::builder()
            .clock(clock.clone())
            .plan(
                UsagePlan::new("p")
                    .throttle(Throttle::new(2.0, 3).unwrap())
                    .quota(Quota::new(10, Period::Day).unwrap()),
            )
            .key(ApiKey::new("k", "v", "p"))
            .build()
            .unwrap()
    };
    let cached = RateLimitLayer::builder(policy())
        .store(store(Duration::from_secs(60)).await.unwrap())
        .build();
    let direct = RateLimitLayer::builder(policy())
        .store(store(Duration::ZERO).await.unwrap())
        .build();
    // Throttle denials, while the wait shrinks.
    assert_eq!(passed(&cached, b"v", 3).await, 3);
    for step in [0, 100, 200, 150, 49] {
        clock.advance(Duration::from_millis(step));
        let a = cached.decide(b"v", 1).await.unwrap_err();
        let b = direct.decide(b"v", 1).await.unwrap_err();
        assert_eq!(a, b, "{step} ms on");
    }
    clock.advance(Duration::from_millis(1));
    assert!(
        cached.decide(b"v", 1).await.is_ok(),
        "not past the retry time"
    );
    // Quota denials: the same answer until the window ends.
    for _ in 0..6 {
        clock.advance(Duration::from_secs(1));
        assert!(cached.decide(b"v", 1).await.is_ok());
    }
    clock.advance(Duration::from_secs(60));
    for step in [0, 1_000, 30_000] {
        clock.advance(Duration::from_millis(step));
        let a = cached.decide(b"v", 1).await.unwrap_err();
        let b = direct.decide(b"v", 1).await.unwrap_err();
        assert_eq!(a.reason(), Reason::QuotaExceeded);
        assert_eq!(a, b, "{step} ms on");
    }
    // An admin change through the caching instance is seen at once.
    cached.admin().set_remaining("k", 1).await.unwrap();
    assert!(cached.decide(b"v", 1).await.is_ok());
}

/// Redis holds hashes, never a key's value, id or a client address; and a
/// script that Redis lost (`SCRIPT FLUSH`, a restart) is loaded again by
/// itself.
#[tokio::test]
async fn redis_key_names_hold_no_secrets_and_a_lost_script_reloads() {
    if !require_redis() {
        return;
    }
    // Keys per process: only decisions send scripts.
    let redis = Redis::single("conformance").without_shared_registry();
    let addr = redis.server().addr();
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 1, 0));
    // Not borrowing: every decision below is one call.
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(1.0, 5).unwrap())
        .method("/v1/completions/POST", Throttle::new(1.0, 2).unwrap())
        .quota(Quota::new(100, Period::Day).unwrap())
        .borrow(false);
    let secret = "sk-very-secret-value";
    let l = layer(
        &redis,
        &clock,
        vec![plan],
        vec![ApiKey::new("tenant-42", secret, "p")],
    )
    .await;
    let per_ip = RateLimitLayer::builder(
        Policy::per_key(UsagePlan::new("ip").throttle(Throttle::new(1.0, 5).unwrap())).unwrap(),
    )
    .store(redis.store(&clock).await)
    .build();
    assert!(l.decide(secret.as_bytes(), 1).await.is_ok());
    assert!(per_ip.decide(b"203.0.113.9", 1).await.is_ok());
    let keys = support::redis::command(addr, &["KEYS", "*"]).unwrap();
    assert!(
        keys.contains(":t:") && keys.contains(":q") && keys.contains(":h"),
        "{keys}"
    );
    for clear in [secret, "tenant-42", "203.0.113.9", "sk-"] {
        assert!(!keys.contains(clear), "{clear} in {keys}");
    }
    support::redis::command(addr, &["SCRIPT", "FLUSH"]).unwrap();
    assert!(l.decide(secret.as_bytes(), 1).await.is_ok());
    assert!(l.decide(secret.as_bytes(), 1).await.is_ok());
    let info = support::redis::command(addr, &["INFO", "commandstats"]).unwrap();
    // Four decisions, four EVALSHAs. Two found no script (the first on this
    // new server, the first after the flush) and were followed by an EVAL,
    // which loads it.
    let evalsha = info
        .lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .unwrap_or_default();
    assert!(evalsha.starts_with("cmdstat_evalsha:calls=4,"), "{info}");
    assert!(evalsha.trim_end().ends_with("failed_calls=2"), "{info}");
    assert!(info.contains("cmdstat_eval:calls=2,"), "{info}");
}

/// With a naming secret, a per-key subject's Redis key names come from a
/// hash nobody without the secret can compute: instances given the same
/// secret share the budget, one given another (or none) counts apart, and
/// the secret shows nowhere (names, `Debug`).
#[tokio::test]
async fn a_naming_secret_keys_redis_names_and_instances_with_it_share_a_budget() {
    if !require_redis() {
        return;
    }
    let server = RedisServer::start();
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 1, 0));
    let layer = |store: RedisStore| {
        RateLimitLayer::builder(
            Policy::per_key(UsagePlan::new("ip").throttle(Throttle::new(1.0, 3).unwrap())).unwrap(),
        )
        .store(store)
        .build()
    };
    let store = |secret: Option<&str>| {
        let mut b = RedisStore::builder(server.url()).clock(clock.clone());
        if let Some(s) = secret {
            b = b.key_secret(s);
        }
        assert!(!format!("{b:?}").contains("hunter2"), "{b:?}");
        b.build()
    };
    let (a, b) = (
        layer(store(Some("hunter2")).await.unwrap()),
        layer(store(Some("hunter2")).await.unwrap()),
    );
    let other = layer(store(Some("another")).await.unwrap());
    let plain = layer(store(None).await.unwrap());
    let ip = b"198.51.100.7".as_slice();
    // Three shared between the two instances with the same secret.
    assert!(a.decide(ip, 1).await.is_ok());
    assert!(b.decide(ip, 1).await.is_ok());
    assert!(a.decide(ip, 1).await.is_ok());
    assert!(b.decide(ip, 1).await.is_err());
    // Another secret, or none, names other state: a full bucket each.
    for l in [&other, &plain] {
        for _ in 0..3 {
            assert!(l.decide(ip, 1).await.is_ok());
        }
        assert!(l.decide(ip, 1).await.is_err());
    }
    let keys = support::redis::command(server.addr(), &["KEYS", "*"]).unwrap();
    assert_eq!(keys.matches(":t").count(), 3, "{keys}");
    for clear in ["198.51.100.7", "hunter2", "another"] {
        assert!(!keys.contains(clear), "{clear} in {keys}");
    }
}

/// A plan's concurrency cap holds a place per request until its response
/// body ends or is dropped, not until the handler returns.
async fn a_concurrency_cap_holds_places_until_bodies_end<B: Backend>(b: &B) {
    use http_body_util::BodyExt;
    use tower::{Service, ServiceExt};

    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 0));
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(100.0, 100).unwrap())
        .concurrency(2);
    let l = layer(b, &clock, vec![plan], vec![ApiKey::new("k", "v", "p")]).await;
    let mut svc = tower::ServiceBuilder::new()
        .layer(l.clone())
        .service_fn(|_| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                bytes::Bytes::from_static(b"streamed"),
            )))
        });
    let request = || {
        http::Request::builder()
            .header("x-api-key", "v")
            .body(String::new())
            .unwrap()
    };
    let first = svc.ready().await.unwrap().call(request()).await.unwrap();
    assert_eq!(first.status(), 200);
    let policy = first.headers()["ratelimit-policy"].to_str().unwrap();
    assert!(
        policy.contains("\"concurrency\";q=2;qu=\"concurrent-requests\""),
        "{policy}"
    );
    let second = svc.ready().await.unwrap().call(request()).await.unwrap();
    assert_eq!(second.status(), 200);
    // Both handlers have returned, but their bodies are not done: full.
    let third = svc.ready().await.unwrap().call(request()).await.unwrap();
    assert_eq!(third.status(), 429);
    assert_eq!(third.headers()["retry-after"], "1");
    let rejection = third.extensions().get::<tollgate::Rejection>().unwrap();
    assert_eq!(rejection.reason(), Reason::ConcurrencyLimited);
    // A body read to its end gives its place back; so does a dropped one.
    let body = second.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"streamed");
    let admitted = eventually_admitted(&mut svc, request).await;
    drop(first);
    let again = eventually_admitted(&mut svc, request).await;
    drop((admitted, again));
    // Nothing leaked: two places again.
    let a = eventually_admitted(&mut svc, request).await;
    let b2 = eventually_admitted(&mut svc, request).await;
    let full = svc.ready().await.unwrap().call(request()).await.unwrap();
    assert_eq!(full.status(), 429);
    drop((a, b2, full));
}

/// A layer whose estimate is the `x-estimate` header, in front of a service
/// that reports the `x-actual` header as the tokens used (none without it).
pub(crate) async fn token_service<B: Backend>(
    b: &B,
    clock: &ManualClock,
    plan: UsagePlan,
) -> (
    impl tower::Service<
        http::Request<String>,
        Response = http::Response<tollgate::ResponseBody<http_body_util::Full<bytes::Bytes>>>,
        Error = std::convert::Infallible,
    > + Clone,
    tollgate::Admin<B::S>,
) {
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(plan)
        .key(ApiKey::new("k", "v", "p"));
    crate::accounts::token_service(b, clock, policy).await
}

/// Sends a request and reads its body to the end (which settles it); the
/// status and the rejection, if any.
pub(crate) async fn send_tokens<S>(
    svc: &mut S,
    estimate: u32,
    actual: Option<u64>,
) -> (u16, Option<Reason>)
where
    S: tower::Service<
            http::Request<String>,
            Response = http::Response<tollgate::ResponseBody<http_body_util::Full<bytes::Bytes>>>,
            Error = std::convert::Infallible,
        >,
{
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(tokens::request("v", estimate, actual))
        .await
        .unwrap();
    let status = res.status().as_u16();
    let reason = res
        .extensions()
        .get::<tollgate::Rejection>()
        .map(|r| r.reason());
    let _ = res.into_body().collect().await.unwrap();
    (status, reason)
}

/// Retries a request until it gets `status` (a remote store settles in the
/// background), within two seconds of real time; what it got last.
async fn until_status<S>(svc: &mut S, estimate: u32, status: u16) -> (u16, Option<Reason>)
where
    S: tower::Service<
            http::Request<String>,
            Response = http::Response<tollgate::ResponseBody<http_body_util::Full<bytes::Bytes>>>,
            Error = std::convert::Infallible,
        >,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let got = send_tokens(svc, estimate, None).await;
        if got.0 == status || std::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn a_token_bucket_reserves_estimates_and_settles_actual_costs<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 0));
    let plan = UsagePlan::new("p").tokens(TokenBudget::new().per_minute(100).unwrap());
    let (mut svc, admin) = token_service(b, &clock, plan).await;
    // 60 of 100 tokens reserved and used; 60 more do not fit now.
    assert_eq!(send_tokens(&mut svc, 60, Some(60)).await, (200, None));
    assert_eq!(
        send_tokens(&mut svc, 60, None).await,
        (429, Some(Reason::Limited))
    );
    // An estimate above the whole budget is refused at once, with its reason.
    assert_eq!(
        send_tokens(&mut svc, 101, None).await,
        (429, Some(Reason::CostExceedsLimit))
    );
    // A minute later the bucket is full. An over-estimate (100 reserved, 10
    // used) gives 90 back: the next 80 fit without waiting.
    clock.advance(Duration::from_secs(60));
    assert_eq!(send_tokens(&mut svc, 100, Some(10)).await.0, 200);
    assert_eq!(until_status(&mut svc, 80, 200).await, (200, None));
    // An under-estimate (5 reserved, 190 used) is charged: the bucket is 90
    // tokens in debt and even a 1-token request waits.
    clock.advance(Duration::from_secs(60));
    assert_eq!(send_tokens(&mut svc, 5, Some(190)).await.0, 200);
    // (A remote store settles in the background: a request let in before
    // the settlement lands would be charged on top.)
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        send_tokens(&mut svc, 1, None).await,
        (429, Some(Reason::Limited))
    );
    // The debt is repaid at the bucket's rate (100 a minute): 91 tokens take
    // 54.6 s to come back.
    clock.advance(Duration::from_secs(54));
    assert_eq!(send_tokens(&mut svc, 1, None).await.0, 429);
    clock.advance(Duration::from_secs(1));
    assert_eq!(send_tokens(&mut svc, 1, None).await.0, 200);
    // A request that reports nothing keeps its estimate.
    clock.advance(Duration::from_secs(60));
    assert_eq!(send_tokens(&mut svc, 100, None).await.0, 200);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(send_tokens(&mut svc, 1, None).await.0, 429);
    // Resetting the key fills its bucket.
    admin.reset_key("k").await.unwrap();
    assert_eq!(send_tokens(&mut svc, 100, None).await.0, 200);
    // An absurd report is charged as far as the store can hold: the key
    // waits (for months), and nothing fails.
    admin.reset_key("k").await.unwrap();
    assert_eq!(send_tokens(&mut svc, 1, Some(u64::MAX)).await.0, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        send_tokens(&mut svc, 1, None).await,
        (429, Some(Reason::Limited))
    );
    admin.reset_key("k").await.unwrap();
    assert_eq!(send_tokens(&mut svc, 100, None).await.0, 200);
}

async fn daily_token_budgets_count_settled_tokens<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(100.0, 100).unwrap())
        .tokens(TokenBudget::new().per_day(100).unwrap());
    let (mut svc, admin) = token_service(b, &clock, plan).await;
    assert_eq!(send_tokens(&mut svc, 60, Some(60)).await, (200, None));
    assert_eq!(
        send_tokens(&mut svc, 50, None).await,
        (429, Some(Reason::QuotaExceeded))
    );
    assert_eq!(
        send_tokens(&mut svc, 101, None).await,
        (429, Some(Reason::CostExceedsLimit))
    );
    // 30 reserved, 10 used: 20 come back, so 30 fit again (60 + 10 + 30).
    assert_eq!(send_tokens(&mut svc, 30, Some(10)).await.0, 200);
    assert_eq!(until_status(&mut svc, 30, 200).await, (200, None));
    assert_eq!(
        send_tokens(&mut svc, 1, None).await,
        (429, Some(Reason::QuotaExceeded))
    );
    // Resetting the key gives it its whole day again.
    admin.reset_key("k").await.unwrap();
    assert_eq!(send_tokens(&mut svc, 100, Some(100)).await.0, 200);
    assert_eq!(send_tokens(&mut svc, 1, None).await.0, 429);
    // The next UTC day starts afresh.
    clock.advance(Duration::from_secs(23 * 3_600));
    assert_eq!(send_tokens(&mut svc, 100, Some(100)).await.0, 200);
}

/// A streamed body that fails after a few tokens ends its request: its
/// concurrency place comes back and the tokens it reported are settled.
async fn a_body_that_fails_mid_stream_gives_back_its_place_and_settles<B: Backend>(b: &B) {
    use http_body_util::BodyExt;
    use tower::{Service, ServiceExt};

    type Chunk = Result<http_body::Frame<bytes::Bytes>, std::io::Error>;
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 0));
    let plan = UsagePlan::new("p")
        .tokens(TokenBudget::new().per_minute(100).unwrap())
        .concurrency(1);
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(plan)
        .key(ApiKey::new("k", "v", "p"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy)
        .store(b.store(&clock).await)
        .estimator(|_: &tollgate::extract::RequestView<'_>| 90)
        .build();
    // Each response streams 3 tokens, counting each, then fails.
    let mut svc = tower::ServiceBuilder::new().layer(layer).service_fn(
        |req: http::Request<tollgate::RequestBody<String>>| async move {
            let usage = req
                .extensions()
                .get::<tollgate::TokenUsage>()
                .cloned()
                .unwrap();
            let chunks = (0..4).map(move |i| -> Chunk {
                if i < 3 {
                    usage.add(1);
                    Ok(http_body::Frame::data(bytes::Bytes::from_static(b"tok ")))
                } else {
                    Err(std::io::Error::other("the model failed"))
                }
            });
            let body = http_body_util::StreamBody::new(tokio_stream::iter(chunks));
            Ok::<_, std::convert::Infallible>(http::Response::new(body))
        },
    );
    let request = || {
        http::Request::builder()
            .header("x-api-key", "v")
            .body(String::new())
            .unwrap()
    };
    let first = svc.ready().await.unwrap().call(request()).await.unwrap();
    assert_eq!(first.status(), 200);
    // In flight: the cap is full, and 90 of 100 tokens are reserved.
    let busy = svc.ready().await.unwrap().call(request()).await.unwrap();
    assert_eq!(busy.status(), 429);
    let error = first.into_body().collect().await.unwrap_err();
    assert_eq!(error.to_string(), "the model failed");
    // The failure ended the request: 3 tokens used, 87 back, the place free.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let second = loop {
        let res = svc.ready().await.unwrap().call(request()).await.unwrap();
        if res.status() == 200 || std::time::Instant::now() > deadline {
            break res;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(second.status(), 200);
    assert_eq!(second.headers()["ratelimit"], "\"tokens-minute\";r=7;t=56");
}

/// The response of the first request admitted within two seconds (a remote
/// store gives places back in the background).
async fn eventually_admitted<S, F>(svc: &mut S, request: F) -> S::Response
where
    S: tower::Service<
            http::Request<String>,
            Response = http::Response<tollgate::ResponseBody<http_body_util::Full<bytes::Bytes>>>,
        >,
    S::Error: std::fmt::Debug,
    F: Fn() -> http::Request<String>,
{
    use tower::ServiceExt;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let res = svc.ready().await.unwrap().call(request()).await.unwrap();
        if res.status() == 200 {
            return res;
        }
        assert!(std::time::Instant::now() < deadline, "no place came back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// The rules across limits, as DESIGN decides them. Each test below is the
// regression test of a disagreement once found between the stores and a
// model of DESIGN's semantics.

async fn denied<S: Store>(l: &RateLimitLayer<ApiKeyHeader, S>, cost: u32) -> tollgate::Rejection {
    l.decide(b"v", cost).await.expect_err("denied")
}

/// A request through the layer whose response (and so its place under the
/// concurrency cap) is held until dropped.
async fn held<S: Store>(
    l: &RateLimitLayer<ApiKeyHeader, S>,
) -> http::Response<tollgate::ResponseBody<http_body_util::Full<bytes::Bytes>>> {
    use tower::{Service, ServiceExt};
    let mut svc = tower::ServiceBuilder::new()
        .layer(l.clone())
        .service_fn(|_| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                bytes::Bytes::from_static(b"x"),
            )))
        });
    let req = http::Request::builder()
        .header("x-api-key", "v")
        .body(String::new())
        .unwrap();
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), 200);
    res
}

/// A peek (cost 0) while the cap is full is denied and takes no place;
/// on a free cap it passes and still takes none.
async fn a_full_concurrency_cap_denies_a_peek_and_a_peek_takes_no_place<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 0));
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(1.0, 5).unwrap())
        .concurrency(1);
    let l = layer(b, &clock, vec![plan], vec![ApiKey::new("k", "v", "p")]).await;
    // A free cap: the peek passes, and a real request still finds its place.
    l.decide(b"v", 0).await.unwrap();
    let first = held(&l).await;
    let peek = denied(&l, 0).await;
    assert_eq!(peek.reason(), Reason::ConcurrencyLimited);
    assert_eq!(peek.limit(), Some("concurrency"));
    let request = denied(&l, 1).await;
    assert_eq!(request.reason(), Reason::ConcurrencyLimited);
    drop(first);
    // A remote store is given the place back in the background.
    let mut freed = false;
    for _ in 0..200 {
        if l.decide(b"v", 0).await.is_ok() {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(freed, "the place came back");
    // Peeks charged nothing: of the burst of 5, one request was charged.
    // (Each `decide` gives its place back at once; a remote store in the
    // background, so a place may still be held for a moment.)
    let next = async || {
        for _ in 0..200 {
            match l.decide(b"v", 1).await {
                Err(r) if r.reason() == Reason::ConcurrencyLimited => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                other => return other,
            }
        }
        panic!("a place never came back")
    };
    for _ in 0..4 {
        next().await.unwrap();
    }
    assert_eq!(next().await.unwrap_err().reason(), Reason::Limited);
}

/// A cost above a quota's whole limit can never pass, in any window: it is
/// refused with no retry, as a throttle's or a token budget's is.
async fn a_cost_above_a_whole_quota_is_refused_with_no_retry<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3600));
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(100.0, 100).unwrap())
        .quota(Quota::new(2, Period::WEEK).unwrap());
    let l = layer(b, &clock, vec![plan], vec![ApiKey::new("k", "v", "p")]).await;
    let r = denied(&l, 4).await;
    assert_eq!(r.reason(), Reason::CostExceedsLimit);
    assert_eq!(r.limit(), Some("quota"));
    assert_eq!(r.retry_after(), None);
    // It charged nothing: the whole quota is still there.
    l.decide(b"v", 2).await.unwrap();
    let r = denied(&l, 1).await;
    assert_eq!(r.reason(), Reason::QuotaExceeded);
    assert!(r.retry_after().is_some());
}

/// With a throttle and a quota both denying, the denial names the one that
/// holds the request longest: a throttle needing 10 s over a DAY quota
/// whose window ends in 1 s.
async fn the_longest_wait_is_named_whichever_limit_asks_it<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 86_399));
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(0.1, 1).unwrap())
        .quota(Quota::new(1, Period::Day).unwrap());
    let l = layer(b, &clock, vec![plan], vec![ApiKey::new("k", "v", "p")]).await;
    l.decide(b"v", 1).await.unwrap();
    let r = denied(&l, 1).await;
    assert_eq!(r.reason(), Reason::Limited);
    assert_eq!(r.limit(), Some("throttle"));
    assert_eq!(r.retry_after(), Some(Duration::from_secs(10)));
    // Past midnight the quota has renewed; the throttle still holds.
    clock.advance(Duration::from_secs(2));
    let r = denied(&l, 1).await;
    assert_eq!(r.limit(), Some("throttle"));
    assert_eq!(r.retry_after(), Some(Duration::from_secs(8)));
}

/// 0.9 requests a second refill one every 1,111,111,111.1 ns: nothing is
/// admitted at 1,111,111,111 ns, one is at 1,111,111,112 ns.
async fn nothing_is_admitted_before_its_exact_time<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 0));
    let plan = UsagePlan::new("p").throttle(Throttle::new(0.9, 1).unwrap());
    let l = layer(b, &clock, vec![plan], vec![ApiKey::new("k", "v", "p")]).await;
    l.decide(b"v", 1).await.unwrap();
    clock.advance(Duration::from_nanos(1_111_111_111));
    let r = denied(&l, 1).await;
    assert_eq!(r.retry_after(), Some(Duration::from_nanos(1)));
    clock.advance(Duration::from_nanos(1));
    l.decide(b"v", 1).await.unwrap();
}

/// A denial is never answered with a wait that has since grown: after a
/// cheaper request passed, the same costly one waits longer (the Redis
/// store's over-limit cache, on by default, must not replay the first
/// answer).
async fn a_denial_is_never_replayed_after_a_request_passed<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 0));
    let plan = UsagePlan::new("p").throttle(Throttle::new(1.0 / 3.0, 3).unwrap());
    let l = layer(b, &clock, vec![plan], vec![ApiKey::new("k", "v", "p")]).await;
    l.decide(b"v", 3).await.unwrap();
    clock.advance(Duration::from_nanos(3_000_000_002));
    let first = denied(&l, 2).await;
    assert_eq!(
        first.retry_after(),
        Some(Duration::from_nanos(2_999_999_998))
    );
    l.decide(b"v", 1).await.unwrap();
    let again = denied(&l, 2).await;
    assert_eq!(
        again.retry_after(),
        Some(Duration::from_nanos(5_999_999_998))
    );
}

/// `check`, the memory store's direct decision, answers as `decide` does
/// when a concurrency cap is full: it is denied, and takes no place.
#[tokio::test]
async fn check_is_denied_by_a_full_concurrency_cap() {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 0));
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(1.0, 5).unwrap())
        .concurrency(1);
    let l = layer(
        &Memory,
        &clock,
        vec![plan],
        vec![ApiKey::new("k", "v", "p")],
    )
    .await;
    assert!(l.check(b"v", 1).is_ok());
    let first = held(&l).await;
    let r = l.check(b"v", 1).unwrap_err();
    assert_eq!(r.reason(), Reason::ConcurrencyLimited);
    assert_eq!(
        l.check(b"v", 0).unwrap_err().reason(),
        Reason::ConcurrencyLimited
    );
    drop(first);
    assert!(l.check(b"v", 1).is_ok());
    // check took no place: a request through the layer still finds one.
    drop(held(&l).await);
}
