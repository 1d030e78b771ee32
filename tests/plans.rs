//! Usage plans, quotas and runtime changes, decided through the public API
//! with a manual clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tollgate::{
    ApiKey, Date, ManualClock, MemoryStore, Period, Policy, Quota, RateLimitLayer, Reason, Stage,
    Throttle, UsagePlan, Weekday,
};

/// The answer of a memory-store admin future, which is ready at once.
fn ready<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("the memory store answers at once"),
    }
}

fn at(y: i32, m: u8, d: u8, secs: u64) -> SystemTime {
    let days = Date::new(y, m, d).unwrap().days();
    UNIX_EPOCH + Duration::from_secs(days as u64 * 86_400 + secs)
}

fn layer(clock: &ManualClock, plans: Vec<UsagePlan>, keys: Vec<ApiKey>) -> RateLimitLayer {
    let mut b = Policy::builder().clock(clock.clone());
    for p in plans {
        b = b.plan(p);
    }
    for k in keys {
        b = b.key(k);
    }
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    RateLimitLayer::builder(b.build().unwrap())
        .store(store)
        .build()
}

fn reason(l: &RateLimitLayer, key: &[u8]) -> Option<Reason> {
    l.check(key, 1).err().map(|r| r.reason())
}

#[test]
fn throttled_requests_do_not_consume_quota_and_quota_denied_ones_do_not_consume_throttle() {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 1, 3_600));
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(1.0, 2).unwrap())
        .quota(Quota::new(4, Period::Day).unwrap());
    let l = layer(&clock, vec![plan], vec![ApiKey::new("k", "v", "p")]);
    assert_eq!(reason(&l, b"v"), None);
    assert_eq!(reason(&l, b"v"), None);
    // Throttled five times: none of these counts against the quota of 4.
    for _ in 0..5 {
        assert_eq!(reason(&l, b"v"), Some(Reason::Limited));
    }
    clock.advance(Duration::from_secs(2));
    assert_eq!(reason(&l, b"v"), None);
    assert_eq!(reason(&l, b"v"), None);
    clock.advance(Duration::from_secs(10));
    // The quota is used up (4); the bucket is full (2).
    let r = l.check(b"v", 1).unwrap_err();
    assert_eq!(r.reason(), Reason::QuotaExceeded);
    assert_eq!(r.status(), 429);
    assert_eq!(r.message(), "Limit Exceeded");
    // Retry-After is the time to the day's end: 24h - 1h - 12s.
    assert_eq!(r.retry_after_secs(), Some(86_400 - 3_600 - 12));
    // Quota-denied requests took nothing from the bucket: after a raise, two pass at once.
    for _ in 0..3 {
        assert_eq!(reason(&l, b"v"), Some(Reason::QuotaExceeded));
    }
    ready(l.admin().set_remaining("k", 10)).unwrap();
    assert_eq!(reason(&l, b"v"), None);
    assert_eq!(reason(&l, b"v"), None);
    assert_eq!(reason(&l, b"v"), Some(Reason::Limited));
}

#[test]
fn day_quota_resets_at_midnight_utc_not_a_nanosecond_before() {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 1, 86_399));
    let plan = UsagePlan::new("p").quota(Quota::new(1, Period::Day).unwrap());
    let l = layer(&clock, vec![plan], vec![ApiKey::new("k", "v", "p")]);
    assert_eq!(reason(&l, b"v"), None);
    clock.advance(Duration::from_nanos(999_999_999));
    let r = l.check(b"v", 1).unwrap_err();
    assert_eq!(r.reason(), Reason::QuotaExceeded);
    assert_eq!(r.retry_after(), Some(Duration::from_nanos(1)));
    clock.advance(Duration::from_nanos(1));
    assert_eq!(reason(&l, b"v"), None);
}

#[test]
fn week_quota_renews_on_the_configured_day() {
    let clock = ManualClock::new();
    // 2024-05-04 is a Saturday.
    clock.set_wall(at(2024, 5, 4, 12 * 3_600));
    let plan = UsagePlan::new("p").quota(Quota::new(1, Period::Week(Weekday::Sunday)).unwrap());
    let l = layer(&clock, vec![plan], vec![ApiKey::new("k", "v", "p")]);
    assert_eq!(reason(&l, b"v"), None);
    assert_eq!(reason(&l, b"v"), Some(Reason::QuotaExceeded));
    clock.set_wall(at(2024, 5, 5, 0) - Duration::from_nanos(1));
    assert_eq!(reason(&l, b"v"), Some(Reason::QuotaExceeded));
    clock.set_wall(at(2024, 5, 5, 0));
    assert_eq!(reason(&l, b"v"), None);
}

#[test]
fn month_quota_renews_after_feb_29_in_a_leap_year() {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 2, 1, 0));
    let plan = UsagePlan::new("p").quota(Quota::new(2, Period::Month).unwrap());
    let l = layer(&clock, vec![plan], vec![ApiKey::new("k", "v", "p")]);
    assert_eq!(reason(&l, b"v"), None);
    clock.set_wall(at(2024, 2, 29, 86_399));
    assert_eq!(reason(&l, b"v"), None);
    assert_eq!(reason(&l, b"v"), Some(Reason::QuotaExceeded));
    clock.set_wall(at(2024, 3, 1, 0));
    assert_eq!(reason(&l, b"v"), None);
}

#[test]
fn quota_offset_applies_in_the_creation_window() {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 1, 100));
    let plan =
        UsagePlan::new("p").quota(Quota::new(5, Period::Day).unwrap().with_offset(3).unwrap());
    let l = layer(&clock, vec![plan], vec![ApiKey::new("k", "v", "p")]);
    let passed = (0..10).filter(|_| l.check(b"v", 1).is_ok()).count();
    assert_eq!(passed, 2);
    clock.set_wall(at(2024, 5, 2, 0));
    let passed = (0..10).filter(|_| l.check(b"v", 1).is_ok()).count();
    assert_eq!(passed, 5);
}

#[test]
fn keys_change_while_serving_without_losing_counters() {
    let clock = ManualClock::new();
    let free = UsagePlan::new("free").throttle(Throttle::new(1.0, 3).unwrap());
    let pro = UsagePlan::new("pro").throttle(Throttle::new(1.0, 10).unwrap());
    let l = layer(&clock, vec![free, pro], vec![ApiKey::new("k", "v", "free")]);
    let admin = l.admin();
    assert_eq!(reason(&l, b"v"), None);
    assert_eq!(reason(&l, b"v"), None);

    // Unknown until added; disabled keys are refused; re-enabled keys keep their state.
    assert_eq!(reason(&l, b"new"), Some(Reason::UnknownKey));
    admin.add_key(ApiKey::new("k2", "new", "free")).unwrap();
    assert_eq!(reason(&l, b"new"), None);
    admin.set_enabled("k", false).unwrap();
    assert_eq!(reason(&l, b"v"), Some(Reason::DisabledKey));
    admin.set_enabled("k", true).unwrap();
    assert_eq!(reason(&l, b"v"), None);
    assert_eq!(reason(&l, b"v"), Some(Reason::Limited), "3 used of 3");

    // Moved to pro: a fresh pro bucket; moved back: the free bucket as it was.
    admin.set_plan("k", "pro").unwrap();
    assert_eq!((0..20).filter(|_| l.check(b"v", 1).is_ok()).count(), 10);
    admin.set_plan("k", "free").unwrap();
    assert_eq!(reason(&l, b"v"), Some(Reason::Limited));

    // Replacing the plan's limits keeps the key's state: the bucket is still
    // empty (not a fresh one), and refills at the new plan's rate.
    admin
        .put_plan(
            UsagePlan::new("free")
                .throttle(Throttle::new(1.0, 3).unwrap())
                .quota(Quota::new(1_000, Period::Day).unwrap()),
        )
        .unwrap();
    assert_eq!(reason(&l, b"v"), Some(Reason::Limited));
    clock.advance(Duration::from_secs(1));
    assert_eq!(reason(&l, b"v"), None);
    assert_eq!(reason(&l, b"v"), Some(Reason::Limited));
    assert!(admin.plan("free").unwrap().get_quota().is_some());

    // Errors name what is wrong.
    assert!(admin.set_plan("k", "gold").is_err());
    assert!(admin.set_enabled("nobody", true).is_err());
    assert!(
        admin.add_key(ApiKey::new("k", "other", "free")).is_err(),
        "duplicate id"
    );
    assert!(
        admin.add_key(ApiKey::new("k3", "v", "free")).is_err(),
        "duplicate value"
    );
    assert_eq!(admin.key("k").unwrap().plan, "free");
    assert_eq!(admin.keys().len(), 2);
}

#[test]
fn usage_reports_match_the_traffic_and_update_usage_moves_remaining() {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600)); // a Monday
    let plan = UsagePlan::new("p").quota(Quota::new(100, Period::WEEK).unwrap());
    let l = layer(
        &clock,
        vec![plan],
        vec![ApiKey::new("a", "va", "p"), ApiKey::new("b", "vb", "p")],
    );
    let admin = l.admin();
    for _ in 0..7 {
        l.check(b"va", 1).unwrap();
    }
    l.check(b"vb", 1).unwrap();
    clock.advance(Duration::from_secs(86_400));
    for _ in 0..3 {
        l.check(b"va", 1).unwrap();
    }
    let start = Date::new(2024, 5, 5).unwrap();
    let end = Date::new(2024, 5, 9).unwrap();
    let r = ready(admin.usage("p", start, end, None)).unwrap();
    assert_eq!(r.end, Date::new(2024, 5, 7).unwrap(), "cut at today");
    assert_eq!(r.items["a"], vec![[0, 100], [7, 93], [3, 90]]);
    assert_eq!(r.items["b"], vec![[0, 100], [1, 99], [0, 99]]);
    let only_b = ready(admin.usage("p", start, end, Some("b"))).unwrap();
    assert_eq!(only_b.items.keys().collect::<Vec<_>>(), ["b"]);

    // UpdateUsage raises, then lowers, what remains.
    assert_eq!(ready(admin.set_remaining("a", 500)).unwrap(), 500);
    let today = Date::new(2024, 5, 7).unwrap();
    assert_eq!(
        ready(admin.usage("p", today, end, Some("a")))
            .unwrap()
            .items["a"],
        vec![[3, 500]]
    );
    assert_eq!(ready(admin.set_remaining("a", 1)).unwrap(), 1);
    l.check(b"va", 1).unwrap();
    assert_eq!(reason(&l, b"va"), Some(Reason::QuotaExceeded));

    // Reset forgets the window.
    ready(admin.reset_key("a")).unwrap();
    l.check(b"va", 1).unwrap();

    assert!(ready(admin.usage("p", end, start, None)).is_err());
    assert!(ready(admin.usage("nope", start, end, None)).is_err());
    assert!(
        ready(admin.usage("p", Date::new(2023, 1, 1).unwrap(), end, None)).is_err(),
        "before the history"
    );
}

#[test]
fn stage_limits_are_shared_by_every_key_and_decided_with_the_plan() {
    let clock = ManualClock::new();
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
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
    assert!(l.check(b"va", 1).is_ok());
    assert!(l.check(b"va", 1).is_ok());
    // a's plan bucket is empty: denied by the plan, and the stage keeps its 3.
    assert_eq!(reason(&l, b"va"), Some(Reason::Limited));
    assert!(l.check(b"vb", 1).is_ok());
    assert!(l.check(b"vb", 1).is_ok());
    assert!(l.check(b"vc", 1).is_ok());
    let r = l.check(b"vc", 1).unwrap_err();
    assert_eq!(r.limit(), Some("stage"));
}

#[test]
fn a_shadow_plan_decides_and_counts_but_never_rejects() {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 0));
    let plan = UsagePlan::new("s")
        .throttle(Throttle::new(1.0, 2).unwrap())
        .quota(Quota::new(3, Period::Day).unwrap())
        .shadow(true);
    let l = layer(&clock, vec![plan], vec![ApiKey::new("k", "v", "s")]);
    for _ in 0..10 {
        assert!(l.check(b"v", 1).is_ok());
    }
    // Every request was counted against the quota, past its limit.
    let day = Date::new(2024, 5, 6).unwrap();
    let r = ready(l.admin().usage("s", day, day, None)).unwrap();
    assert_eq!(r.items["k"], vec![[10, 0]]);
}

#[test]
fn a_shadow_plan_never_lifts_the_stage_limit() {
    let clock = ManualClock::new();
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
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
    assert!(l.check(b"vs", 1).is_ok());
    assert!(
        l.check(b"vs", 1).is_ok(),
        "past its own limit: shadow passes"
    );
    let r = l.check(b"vs", 1).unwrap_err();
    assert_eq!(
        r.limit(),
        Some("stage"),
        "the shared stage limit still holds"
    );
    assert_eq!(l.check(b"vp", 1).unwrap_err().limit(), Some("stage"));
}

#[test]
fn replacing_a_throttle_keeps_the_share_of_each_bucket_in_use() {
    let clock = ManualClock::new();
    let fast = UsagePlan::new("p").throttle(Throttle::new(100.0, 10).unwrap());
    let l = layer(&clock, vec![fast], vec![ApiKey::new("k", "v", "p")]);
    assert_eq!((0..20).filter(|_| l.check(b"v", 1).is_ok()).count(), 10);
    // Slower: the emptied bucket stays empty and refills at the new rate.
    l.admin()
        .put_plan(UsagePlan::new("p").throttle(Throttle::new(1.0, 10).unwrap()))
        .unwrap();
    assert_eq!(reason(&l, b"v"), Some(Reason::Limited));
    clock.advance(Duration::from_millis(999));
    assert_eq!(reason(&l, b"v"), Some(Reason::Limited));
    clock.advance(Duration::from_millis(1));
    assert_eq!(reason(&l, b"v"), None);
    assert_eq!(reason(&l, b"v"), Some(Reason::Limited));
    // Much faster: the lockout shrinks with the new rate.
    l.admin()
        .put_plan(UsagePlan::new("p").throttle(Throttle::new(1_000.0, 10).unwrap()))
        .unwrap();
    clock.advance(Duration::from_millis(1));
    assert_eq!(reason(&l, b"v"), None);
}

#[test]
fn a_denial_names_the_limit_that_holds_the_request_longest() {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
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
    assert!(l.check(b"va", 1).is_ok());
    // Throttle (10 s) and quota (23 h) both deny: the quota is named.
    let r = l.check(b"va", 1).unwrap_err();
    assert_eq!(r.reason(), Reason::QuotaExceeded);
    assert_eq!(r.retry_after_secs(), Some(23 * 3_600));
    // Stage has room, the plan throttle waits 10 s: the 10 s is the answer.
    assert!(l.check(b"vb", 1).is_ok());
    let r = l.check(b"vb", 1).unwrap_err();
    assert_eq!(
        (r.limit(), r.retry_after_secs()),
        (Some("throttle"), Some(10))
    );
    assert!(
        Policy::builder().history_days(7).build().is_err(),
        "history under a month"
    );
}
