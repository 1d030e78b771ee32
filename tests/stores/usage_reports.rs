//! Usage reports and the admin operations on a key's counters, read as a
//! client of AWS API Gateway's GetUsage and UpdateUsage would, the same on
//! the memory store and on a real `redis-server`: days without traffic,
//! days before the key existed, days to come, window boundaries of a week
//! and a month (the 29th of February 2028 among them), a plan's offset,
//! UpdateUsage above the limit and at 0, a reset, a key moved between plans
//! of other periods, disabled, and removed and added again.

use std::time::Duration;

use tollgate::extract::ApiKeyHeader;
use tollgate::store::Store;
use tollgate::{
    AdminError, ApiKey, Date, ManualClock, Period, Policy, Quota, RateLimitLayer, Reason,
    TokenBudget, UsagePlan, Weekday,
};

use crate::support::at;
use crate::support::backend::{Backend, Memory, Redis, on_each_backend};
use crate::support::redis::require_redis;

const DAY: Duration = Duration::from_secs(86_400);

fn d(y: i32, m: u8, day: u8) -> Date {
    Date::new(y, m, day).unwrap()
}

fn plan(name: &str, limit: u64, period: Period) -> UsagePlan {
    UsagePlan::new(name)
        .quota(Quota::new(limit, period).unwrap())
        .borrow(false)
}

/// A layer of `plans` and `keys`, on `clock` set to `now` first.
async fn layer<B: Backend>(
    b: &B,
    clock: &ManualClock,
    now: std::time::SystemTime,
    plans: Vec<UsagePlan>,
    keys: Vec<ApiKey>,
) -> RateLimitLayer<ApiKeyHeader, B::S> {
    clock.set_wall(now);
    let mut policy = Policy::builder().clock(clock.clone());
    for p in plans {
        policy = policy.plan(p);
    }
    for k in keys {
        policy = policy.key(k);
    }
    let store = b.store(clock).await;
    RateLimitLayer::builder(policy.build().unwrap())
        .store(store)
        .build()
}

async fn pass<S: Store>(l: &RateLimitLayer<ApiKeyHeader, S>, value: &[u8], n: u32) {
    for i in 0..n {
        assert_eq!(
            l.decide(value, 1).await.map_err(|r| r.reason()),
            Ok(()),
            "request {i}"
        );
    }
}

async fn denied<S: Store>(l: &RateLimitLayer<ApiKeyHeader, S>, value: &[u8]) -> Option<Reason> {
    l.decide(value, 1).await.err().map(|r| r.reason())
}

async fn report<S: Store>(
    l: &RateLimitLayer<ApiKeyHeader, S>,
    plan: &str,
    first: Date,
    last: Date,
    key: &str,
) -> Vec<[i64; 2]> {
    let r = l.admin().usage(plan, first, last, Some(key)).await.unwrap();
    r.items[key].clone()
}

/// A key added at run time on a Friday, with a weekly quota: the days
/// before it existed (the plan's and before the plan's) and the days
/// without traffic report the window's whole limit or what remained at the
/// end of the day before; a new week starts whole; an end past today is
/// cut at today.
async fn a_week_with_days_before_the_key_without_traffic_and_to_come<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    // Wednesday 2024-05-01.
    let l = layer(
        b,
        &clock,
        at(2024, 5, 1, 3_600),
        vec![plan("w", 10, Period::WEEK)],
        vec![],
    )
    .await;
    let admin = l.admin();
    clock.advance(2 * DAY);
    admin.add_key(ApiKey::new("k", "v", "w")).await.unwrap();
    pass(&l, b"v", 3).await;
    // Monday the 6th: a new week.
    clock.advance(3 * DAY);
    pass(&l, b"v", 2).await;
    let days = report(&l, "w", d(2024, 4, 29), d(2024, 5, 6), "k").await;
    assert_eq!(
        days,
        [
            [0, 10],
            [0, 10],
            [0, 10],
            [0, 10],
            [3, 7],
            [0, 7],
            [0, 7],
            [2, 8]
        ]
    );
    // An end to come is cut at today.
    let r = admin
        .usage("w", d(2024, 5, 5), d(2030, 1, 1), Some("k"))
        .await
        .unwrap();
    assert_eq!(r.end, d(2024, 5, 6));
    assert_eq!(r.items["k"], [[0, 7], [2, 8]]);
    // One day.
    assert_eq!(
        report(&l, "w", d(2024, 5, 3), d(2024, 5, 3), "k").await,
        [[3, 7]]
    );
    // A range wholly to come: see
    // `a_range_that_starts_after_today_is_a_bad_range`.
    // Start after end.
    assert!(matches!(
        admin
            .usage("w", d(2024, 5, 6), d(2024, 5, 5), Some("k"))
            .await,
        Err(AdminError::BadRange(_))
    ));
    // Further back than the history kept (90 days by default).
    let oldest = Date::from_days(d(2024, 5, 6).days() - 89);
    assert!(admin.usage("w", oldest, oldest, Some("k")).await.is_ok());
    let before = Date::from_days(oldest.days() - 1);
    assert!(matches!(
        admin.usage("w", before, d(2024, 5, 6), Some("k")).await,
        Err(AdminError::BadRange(_))
    ));
}

/// A month and a day quota across the 29th of February 2028: the month's
/// remaining carries through the leap day into March's fresh window.
async fn a_month_across_the_29th_of_february_2028<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let l = layer(
        b,
        &clock,
        at(2028, 2, 28, 82_800),
        vec![plan("m", 10, Period::Month), plan("d", 5, Period::Day)],
        vec![ApiKey::new("km", "vm", "m"), ApiKey::new("kd", "vd", "d")],
    )
    .await;
    pass(&l, b"vm", 4).await;
    pass(&l, b"vd", 5).await;
    assert_eq!(denied(&l, b"vd").await, Some(Reason::QuotaExceeded));
    // The 29th, 00:30.
    clock.advance(Duration::from_secs(5_400));
    pass(&l, b"vm", 6).await;
    assert_eq!(denied(&l, b"vm").await, Some(Reason::QuotaExceeded));
    pass(&l, b"vd", 1).await;
    // March 1st.
    clock.advance(DAY);
    pass(&l, b"vm", 1).await;
    let (first, last) = (d(2028, 2, 27), d(2028, 3, 1));
    assert_eq!(
        report(&l, "m", first, last, "km").await,
        [[0, 10], [4, 6], [6, 0], [1, 9]]
    );
    assert_eq!(
        report(&l, "d", first, last, "kd").await,
        [[0, 5], [5, 0], [1, 4], [0, 5]]
    );
}

/// AWS's offset: requests deducted from the limit in the window in which
/// the plan was created, and only there; the report shows the window's
/// limit less the offset before any traffic, and the whole limit in the
/// window before and after.
async fn an_offset_shows_in_the_window_the_plan_was_created_in<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let quota = Quota::new(10, Period::Month)
        .unwrap()
        .with_offset(4)
        .unwrap();
    let p = UsagePlan::new("o").quota(quota).borrow(false);
    // Policy built (plan created) on May 20th; the key's first request on
    // the 21st.
    let l = layer(
        b,
        &clock,
        at(2024, 5, 20, 0),
        vec![p],
        vec![ApiKey::new("k", "v", "o")],
    )
    .await;
    clock.advance(DAY);
    pass(&l, b"v", 6).await;
    assert_eq!(denied(&l, b"v").await, Some(Reason::QuotaExceeded));
    // June 1st: the whole limit.
    clock.set_wall(at(2024, 6, 1, 60));
    pass(&l, b"v", 10).await;
    assert_eq!(denied(&l, b"v").await, Some(Reason::QuotaExceeded));
    let days = report(&l, "o", d(2024, 4, 30), d(2024, 6, 1), "k").await;
    let mut want = vec![[0, 10]];
    want.extend([[0, 6]; 20]);
    want.push([6, 0]);
    want.extend([[0, 0]; 10]);
    want.push([10, 0]);
    assert_eq!(days, want);
}

/// UpdateUsage above the limit raises the window's allowance; the next
/// days of the window show what remained, used 0; 0 stops the key; a
/// disabled key's remaining can be set; a plan without a request quota
/// (a token quota alone) has none to set or report.
async fn update_usage_above_the_limit_at_0_and_for_a_disabled_key<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let tokens = UsagePlan::new("t").tokens(TokenBudget::new().per_day(100).unwrap());
    let l = layer(
        b,
        &clock,
        at(2024, 5, 6, 3_600),
        vec![plan("w", 10, Period::WEEK), tokens],
        vec![ApiKey::new("k", "v", "w"), ApiKey::new("t", "vt", "t")],
    )
    .await;
    let admin = l.admin();
    pass(&l, b"v", 4).await;
    assert_eq!(admin.set_remaining("k", 25).await.unwrap(), 25);
    assert_eq!(
        report(&l, "w", d(2024, 5, 6), d(2024, 5, 6), "k").await,
        [[4, 25]]
    );
    clock.advance(DAY);
    pass(&l, b"v", 20).await;
    clock.advance(DAY);
    assert_eq!(
        report(&l, "w", d(2024, 5, 6), d(2024, 5, 8), "k").await,
        [[4, 25], [20, 5], [0, 5]]
    );
    admin.set_enabled("k", false).await.unwrap();
    assert_eq!(admin.set_remaining("k", 0).await.unwrap(), 0);
    admin.set_enabled("k", true).await.unwrap();
    assert_eq!(denied(&l, b"v").await, Some(Reason::QuotaExceeded));
    assert_eq!(
        report(&l, "w", d(2024, 5, 8), d(2024, 5, 8), "k").await,
        [[0, 0]]
    );
    // Next week: whole again.
    clock.set_wall(at(2024, 5, 13, 0));
    pass(&l, b"v", 10).await;
    assert_eq!(denied(&l, b"v").await, Some(Reason::QuotaExceeded));
    // No request quota in the plan.
    assert_eq!(
        admin.set_remaining("t", 5).await,
        Err(AdminError::NoQuota("t".into()))
    );
    assert!(matches!(
        admin.usage("t", d(2024, 5, 13), d(2024, 5, 13), None).await,
        Err(AdminError::NoQuota(_))
    ));
    assert!(matches!(
        admin.set_remaining("nobody", 5).await,
        Err(AdminError::UnknownKey(_))
    ));
}

/// A reset forgets the key's history and fills its window; then it counts
/// afresh.
async fn a_reset_forgets_the_history<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let l = layer(
        b,
        &clock,
        at(2024, 5, 6, 3_600),
        vec![plan("w", 10, Period::WEEK)],
        vec![ApiKey::new("k", "v", "w")],
    )
    .await;
    pass(&l, b"v", 4).await;
    clock.advance(DAY);
    pass(&l, b"v", 6).await;
    assert_eq!(denied(&l, b"v").await, Some(Reason::QuotaExceeded));
    l.admin().reset_key("k").await.unwrap();
    assert_eq!(
        report(&l, "w", d(2024, 5, 6), d(2024, 5, 7), "k").await,
        [[0, 10], [0, 10]]
    );
    pass(&l, b"v", 3).await;
    assert_eq!(
        report(&l, "w", d(2024, 5, 6), d(2024, 5, 7), "k").await,
        [[0, 10], [3, 7]]
    );
}

/// A key moved between a daily plan and a weekly one keeps its counts under
/// each; a report of the plan it is not on says which it is on; and its
/// next decisions follow the plan it is on.
async fn a_key_moved_between_plans_of_other_periods_keeps_each_count<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    // Monday 2024-05-06.
    let l = layer(
        b,
        &clock,
        at(2024, 5, 6, 3_600),
        vec![plan("day", 10, Period::Day), plan("week", 5, Period::WEEK)],
        vec![ApiKey::new("k", "v", "day")],
    )
    .await;
    let admin = l.admin();
    pass(&l, b"v", 3).await;
    admin.set_plan("k", "week").await.unwrap();
    pass(&l, b"v", 2).await;
    assert!(matches!(
        admin.usage("day", d(2024, 5, 6), d(2024, 5, 6), Some("k")).await,
        Err(AdminError::KeyNotInPlan { on, .. }) if on == "week"
    ));
    assert_eq!(
        report(&l, "week", d(2024, 5, 6), d(2024, 5, 6), "k").await,
        [[2, 3]]
    );
    admin.set_plan("k", "day").await.unwrap();
    assert_eq!(
        report(&l, "day", d(2024, 5, 6), d(2024, 5, 6), "k").await,
        [[3, 7]]
    );
    pass(&l, b"v", 7).await;
    assert_eq!(denied(&l, b"v").await, Some(Reason::QuotaExceeded));
    // Tuesday: the day's quota is whole, the week's is not.
    clock.advance(DAY);
    admin.set_plan("k", "week").await.unwrap();
    pass(&l, b"v", 3).await;
    assert_eq!(denied(&l, b"v").await, Some(Reason::QuotaExceeded));
    assert_eq!(
        report(&l, "week", d(2024, 5, 6), d(2024, 5, 7), "k").await,
        [[2, 3], [3, 0]]
    );
    admin.set_plan("k", "day").await.unwrap();
    assert_eq!(
        report(&l, "day", d(2024, 5, 6), d(2024, 5, 7), "k").await,
        [[10, 0], [0, 10]]
    );
    // Disabled, then enabled: the counts stay.
    admin.set_enabled("k", false).await.unwrap();
    assert_eq!(denied(&l, b"v").await, Some(Reason::DisabledKey));
    admin.set_enabled("k", true).await.unwrap();
    pass(&l, b"v", 10).await;
    assert_eq!(denied(&l, b"v").await, Some(Reason::QuotaExceeded));
}

/// A key removed and added again with its id (another value) finds its
/// counters and history: a removal is no way around a quota (`reset_key`
/// is), on every store alike. The plan's report lists the keys registered
/// now, disabled ones included.
async fn a_key_removed_and_added_again_finds_its_counters<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let l = layer(
        b,
        &clock,
        at(2024, 5, 6, 3_600),
        vec![plan("w", 10, Period::WEEK)],
        vec![
            ApiKey::new("k", "v", "w"),
            ApiKey::new("off", "v-off", "w").enabled(false),
        ],
    )
    .await;
    let admin = l.admin();
    pass(&l, b"v", 4).await;
    admin.remove_key("k").await.unwrap();
    assert_eq!(denied(&l, b"v").await, Some(Reason::UnknownKey));
    assert!(matches!(
        admin
            .usage("w", d(2024, 5, 6), d(2024, 5, 6), Some("k"))
            .await,
        Err(AdminError::UnknownKey(_))
    ));
    let r = admin
        .usage("w", d(2024, 5, 6), d(2024, 5, 6), None)
        .await
        .unwrap();
    assert_eq!(r.items.keys().collect::<Vec<_>>(), ["off"]);
    clock.advance(DAY);
    admin.add_key(ApiKey::new("k", "v2", "w")).await.unwrap();
    pass(&l, b"v2", 6).await;
    assert_eq!(denied(&l, b"v2").await, Some(Reason::QuotaExceeded));
    assert_eq!(
        report(&l, "w", d(2024, 5, 6), d(2024, 5, 7), "k").await,
        [[4, 6], [6, 0]]
    );
    let r = admin
        .usage("w", d(2024, 5, 7), d(2024, 5, 7), None)
        .await
        .unwrap();
    assert_eq!(r.items.keys().collect::<Vec<_>>(), ["k", "off"]);
    assert_eq!(r.items["off"], [[0, 10]]);
}

/// A week that starts on another day than Monday, across its boundary.
async fn a_week_from_sunday_across_its_boundary<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    // Saturday 2024-05-11.
    let l = layer(
        b,
        &clock,
        at(2024, 5, 11, 86_399),
        vec![plan("s", 10, Period::Week(Weekday::Sunday))],
        vec![ApiKey::new("k", "v", "s")],
    )
    .await;
    pass(&l, b"v", 10).await;
    assert_eq!(denied(&l, b"v").await, Some(Reason::QuotaExceeded));
    // Sunday 00:00:00.
    clock.advance(Duration::from_secs(1));
    pass(&l, b"v", 1).await;
    assert_eq!(
        report(&l, "s", d(2024, 5, 10), d(2024, 5, 12), "k").await,
        [[0, 10], [10, 0], [1, 9]]
    );
}

/// A reset forgets the key's counts under the plan it is on only; a
/// remaining set under one plan is still there after a move away and back.
async fn a_reset_and_an_update_usage_belong_to_the_plan_the_key_is_on<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    // Monday 2024-05-06.
    let l = layer(
        b,
        &clock,
        at(2024, 5, 6, 3_600),
        vec![plan("a", 10, Period::WEEK), plan("b", 5, Period::Month)],
        vec![ApiKey::new("k", "v", "a")],
    )
    .await;
    let admin = l.admin();
    pass(&l, b"v", 4).await;
    admin.set_plan("k", "b").await.unwrap();
    pass(&l, b"v", 2).await;
    admin.set_remaining("k", 1).await.unwrap();
    admin.set_plan("k", "a").await.unwrap();
    admin.reset_key("k").await.unwrap();
    clock.advance(DAY);
    admin.set_plan("k", "b").await.unwrap();
    assert_eq!(
        report(&l, "b", d(2024, 5, 6), d(2024, 5, 7), "k").await,
        [[2, 1], [0, 1]]
    );
    pass(&l, b"v", 1).await;
    assert_eq!(denied(&l, b"v").await, Some(Reason::QuotaExceeded));
    admin.set_plan("k", "a").await.unwrap();
    assert_eq!(
        report(&l, "a", d(2024, 5, 6), d(2024, 5, 7), "k").await,
        [[0, 10], [0, 10]]
    );
    pass(&l, b"v", 10).await;
    assert_eq!(denied(&l, b"v").await, Some(Reason::QuotaExceeded));
}

/// An account's usage: all its keys together, a denial by the account
/// leaving no trace in the key's report nor a denial by the key's plan in
/// the account's; UpdateUsage and reset of the account; the same range
/// checks as a plan's report.
async fn an_accounts_usage_and_its_keys<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(plan("p", 3, Period::Day))
        .account(tollgate::Account::new("acme").quota(Quota::new(5, Period::WEEK).unwrap()))
        .key(ApiKey::new("a", "va", "p").account("acme"))
        .key(ApiKey::new("c", "vc", "p").account("acme"))
        .build()
        .unwrap();
    let l = RateLimitLayer::builder(policy)
        .store(b.store(&clock).await)
        .build();
    let admin = l.admin();
    pass(&l, b"va", 3).await;
    assert_eq!(denied(&l, b"va").await, Some(Reason::QuotaExceeded));
    pass(&l, b"vc", 2).await;
    assert_eq!(denied(&l, b"vc").await, Some(Reason::QuotaExceeded));
    let today = d(2024, 5, 6);
    assert_eq!(report(&l, "p", today, today, "a").await, [[3, 0]]);
    assert_eq!(report(&l, "p", today, today, "c").await, [[2, 1]]);
    let acme = |first, last| {
        let admin = admin.clone();
        async move { admin.account_usage("acme", first, last).await.unwrap().days }
    };
    assert_eq!(acme(today, today).await, [[5, 0]]);
    clock.advance(DAY);
    assert_eq!(denied(&l, b"va").await, Some(Reason::QuotaExceeded));
    assert_eq!(admin.set_account_remaining("acme", 2).await.unwrap(), 2);
    pass(&l, b"va", 2).await;
    assert_eq!(denied(&l, b"vc").await, Some(Reason::QuotaExceeded));
    assert_eq!(
        acme(d(2024, 5, 5), d(2024, 5, 9)).await,
        [[0, 5], [5, 0], [2, 0]]
    );
    assert_eq!(
        report(&l, "p", d(2024, 5, 6), d(2024, 5, 7), "a").await,
        [[3, 0], [2, 1]]
    );
    admin.reset_account("acme").await.unwrap();
    assert_eq!(acme(d(2024, 5, 6), d(2024, 5, 7)).await, [[0, 5], [0, 5]]);
    assert!(matches!(
        admin
            .account_usage("acme", d(2024, 5, 7), d(2024, 5, 6))
            .await,
        Err(AdminError::BadRange(_))
    ));
    assert!(matches!(
        admin
            .account_usage("acme", d(2024, 1, 1), d(2024, 5, 6))
            .await,
        Err(AdminError::BadRange(_))
    ));
    assert!(matches!(
        admin.account_usage("nobody", today, today).await,
        Err(AdminError::UnknownAccount(_))
    ));
    // A range to come has no day to report.
    assert_eq!(
        admin
            .account_usage("acme", d(2024, 5, 8), d(2024, 5, 9))
            .await,
        Err(AdminError::BadRange("start is after today (UTC)"))
    );
}

/// A change of a key that is not there is refused for the key, whatever
/// the change names: moving an unknown key to an unknown plan is
/// `UnknownKey` (a gateway's 404 for the key of its path, as AWS answers
/// NotFound), not `UnknownPlan` (a 409 that reads as if the key existed).
/// A key that is there, moved to an unknown plan, is `UnknownPlan`.
async fn an_unknown_key_moved_to_an_unknown_plan_is_an_unknown_key<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let l = layer(
        b,
        &clock,
        at(2024, 5, 6, 3_600),
        vec![plan("w", 10, Period::WEEK)],
        vec![ApiKey::new("k", "v", "w")],
    )
    .await;
    let admin = l.admin();
    assert_eq!(
        admin.set_plan("nobody", "nope").await,
        Err(AdminError::UnknownKey("nobody".into()))
    );
    assert_eq!(
        admin.set_plan("nobody", "w").await,
        Err(AdminError::UnknownKey("nobody".into()))
    );
    assert_eq!(
        admin.set_plan("k", "nope").await,
        Err(AdminError::UnknownPlan("nope".into()))
    );
}

/// A range that starts after today (UTC, by the store's clock) has no day
/// to report: it is refused as a bad range, for a plan's keys and for an
/// account, rather than answered with an `end` (cut at today) before its
/// `start`, which a client counting days from `start` to `end` reads as a
/// negative number of days. A range that starts today is answered, and an
/// end to come is cut at today, as before.
async fn a_range_that_starts_after_today_is_a_bad_range<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(plan("w", 10, Period::WEEK))
        .account(tollgate::Account::new("acme").quota(Quota::new(5, Period::Day).unwrap()))
        .key(ApiKey::new("k", "v", "w").account("acme"))
        .key(ApiKey::new("k2", "v2", "w"));
    clock.set_wall(at(2024, 5, 6, 3_600));
    let store = b.store(&clock).await;
    let l = RateLimitLayer::builder(policy.build().unwrap())
        .store(store)
        .build();
    pass(&l, b"v", 2).await;
    let admin = l.admin();
    let today = d(2024, 5, 6);
    let tomorrow = d(2024, 5, 7);
    for key in [Some("k"), None] {
        for (start, end) in [(tomorrow, tomorrow), (tomorrow, d(2024, 6, 1))] {
            assert_eq!(
                admin.usage("w", start, end, key).await,
                Err(AdminError::BadRange("start is after today (UTC)")),
                "{start}..{end} of {key:?}"
            );
        }
    }
    assert_eq!(
        admin.account_usage("acme", tomorrow, tomorrow).await,
        Err(AdminError::BadRange("start is after today (UTC)"))
    );
    // From today on: today alone, never an end before the start.
    let r = admin.usage("w", today, d(2024, 6, 1), None).await.unwrap();
    assert_eq!((r.start, r.end), (today, today));
    assert_eq!(r.items["k"], [[2, 8]]);
    assert_eq!(r.items["k2"], [[0, 10]]);
    let a = admin.account_usage("acme", today, tomorrow).await.unwrap();
    assert_eq!((a.start, a.end, a.days), (today, today, vec![[2, 3]]));
    // The day after, what was tomorrow is today.
    clock.advance(DAY);
    let r = admin
        .usage("w", tomorrow, tomorrow, Some("k"))
        .await
        .unwrap();
    assert_eq!(r.items["k"], [[0, 8]]);
}

/// A report in pages (AWS GetUsage's `limit` and `position`): at most
/// `limit` keys of the plan, by id, and the position to ask for the next
/// page while keys remain; the pages together are the whole report, and a
/// report asked without a page is whole and has no position. A position
/// whose key was removed meanwhile still resumes after it.
async fn a_report_in_pages<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let keys = ["a", "b", "c", "d", "e"]
        .map(|id| ApiKey::new(id, format!("v-{id}"), "p"))
        .into_iter()
        .chain([ApiKey::new("x", "v-x", "other")])
        .collect();
    let l = layer(
        b,
        &clock,
        at(2024, 5, 6, 3_600),
        vec![plan("p", 10, Period::Day), plan("other", 10, Period::Day)],
        keys,
    )
    .await;
    pass(&l, b"v-c", 3).await;
    let admin = l.admin();
    let today = d(2024, 5, 6);
    let whole = admin.usage("p", today, today, None).await.unwrap();
    assert_eq!(whole.position, None);
    assert_eq!(
        whole.items.keys().collect::<Vec<_>>(),
        ["a", "b", "c", "d", "e"]
    );
    let page = |limit: usize, position: Option<&'static str>| {
        let admin = admin.clone();
        async move {
            let limit = std::num::NonZeroUsize::new(limit).unwrap();
            let r = admin
                .usage_page("p", today, today, None, limit, position)
                .await
                .unwrap();
            (r.items.into_iter().collect::<Vec<_>>(), r.position)
        }
    };
    let one = |id: &str, days: [i64; 2]| (id.to_owned(), vec![days]);
    assert_eq!(
        page(2, None).await,
        (
            vec![one("a", [0, 10]), one("b", [0, 10])],
            Some("b".to_owned())
        )
    );
    assert_eq!(
        page(2, Some("b")).await,
        (
            vec![one("c", [3, 7]), one("d", [0, 10])],
            Some("d".to_owned())
        )
    );
    assert_eq!(page(2, Some("d")).await, (vec![one("e", [0, 10])], None));
    // Exactly the keys left: no position, no empty page after it.
    assert_eq!(
        page(3, Some("b")).await,
        (
            vec![one("c", [3, 7]), one("d", [0, 10]), one("e", [0, 10])],
            None
        )
    );
    assert_eq!(page(500, None).await.0.len(), 5);
    admin.remove_key("c").await.unwrap();
    assert_eq!(
        page(1, Some("c")).await,
        (vec![one("d", [0, 10])], Some("d".to_owned()))
    );
    // One key: a page of it, never a position.
    let limit = std::num::NonZeroUsize::new(1).unwrap();
    let r = admin
        .usage_page("p", today, today, Some("a"), limit, None)
        .await
        .unwrap();
    assert_eq!((r.items.len(), r.position), (1, None));
    // What a whole report refuses, a page refuses.
    assert_eq!(
        admin
            .usage_page("p", today, today, Some("x"), limit, None)
            .await,
        Err(AdminError::KeyNotInPlan {
            key: "x".into(),
            plan: "p".into(),
            on: "other".into()
        })
    );
}

on_each_backend!(
    "usage":
    a_week_with_days_before_the_key_without_traffic_and_to_come,
    a_month_across_the_29th_of_february_2028,
    an_offset_shows_in_the_window_the_plan_was_created_in,
    update_usage_above_the_limit_at_0_and_for_a_disabled_key,
    a_reset_forgets_the_history,
    a_key_moved_between_plans_of_other_periods_keeps_each_count,
    a_key_removed_and_added_again_finds_its_counters,
    a_week_from_sunday_across_its_boundary,
    a_reset_and_an_update_usage_belong_to_the_plan_the_key_is_on,
    an_accounts_usage_and_its_keys,
    an_unknown_key_moved_to_an_unknown_plan_is_an_unknown_key,
    a_range_that_starts_after_today_is_a_bad_range,
    a_report_in_pages,
);
