//! Clock jumps: time stepping forward by a day or back by an hour neither
//! panics nor grants capacity beyond the model.
//!
//! Forward, the model is plain: a day later every bucket is full and every
//! daily quota is in a new window. Backward, nothing new: a throttle at the
//! earlier reading admits no more than it would have at the later time (its
//! bucket only looks emptier), and a quota window already used up stays used
//! up, even when the clock goes back into the previous window, which still
//! had room.
//!
//! The same holds for weeks (whatever their first day), months and token
//! budgets, and for a jump of several windows forward and then back: the
//! latest window seen stays in force until it ends. What is charged on a
//! clock that went back counts on the latest day seen, in the usage history
//! as in the window.
//!
//! Both clocks of a [`ManualClock`] move together (`advance`, `rewind`) for
//! the memory store and for a real `redis-server` (which decides on the
//! manual clock's wall time instead of its own `TIME`). The memory store's
//! throttles run on the monotonic clock and its quotas on the wall clock,
//! which can jump alone (`set_wall`): that is covered for the memory store.

use std::time::{Duration, UNIX_EPOCH};

use tollgate::extract::ApiKeyHeader;
use tollgate::store::Store;
use tollgate::{
    AdminError, ApiKey, Date, ManualClock, Period, Policy, Quota, RateLimitLayer, Reason, Throttle,
    TokenBudget, UsagePlan, Weekday,
};

use crate::conformance::{send_tokens, token_service};
use crate::support::at;
use crate::support::backend::{Backend, Memory, Redis, on_each_backend};
use crate::support::redis::require_redis;

/// Plan `p`: one request a second in bursts of 10, and 12 a UTC day.
async fn layer<B: Backend>(b: &B, clock: &ManualClock) -> RateLimitLayer<ApiKeyHeader, B::S> {
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(1.0, 10).unwrap())
        .quota(Quota::new(12, Period::Day).unwrap());
    layer_on(b, clock, plan).await
}

/// The key `k` (value `v`) on `plan` (named `p`).
async fn layer_on<B: Backend>(
    b: &B,
    clock: &ManualClock,
    plan: UsagePlan,
) -> RateLimitLayer<ApiKeyHeader, B::S> {
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(plan)
        .key(ApiKey::new("k", "v", "p"))
        .build()
        .unwrap();
    RateLimitLayer::builder(policy)
        .store(b.store(clock).await)
        .build()
}

/// Fires `n` requests: how many passed, and why the last denied one was.
async fn fire<S: Store>(l: &RateLimitLayer<ApiKeyHeader, S>, n: usize) -> (usize, Option<Reason>) {
    let mut passed = 0;
    let mut last = None;
    for _ in 0..n {
        match l.decide(b"v", 1).await {
            Ok(()) => passed += 1,
            Err(r) => last = Some(r.reason()),
        }
    }
    (passed, last)
}

async fn a_day_forward_fills_the_bucket_and_opens_a_new_window<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 12 * 3_600));
    let l = layer(b, &clock).await;
    assert_eq!(fire(&l, 20).await, (10, Some(Reason::Limited)));
    clock.advance(Duration::from_secs(2));
    assert_eq!(fire(&l, 5).await, (2, Some(Reason::QuotaExceeded)));
    // A day later: a full bucket of 10 (not more), then 2 more of a new
    // window of 12 (not more).
    clock.advance(Duration::from_secs(86_400));
    assert_eq!(fire(&l, 20).await, (10, Some(Reason::Limited)));
    clock.advance(Duration::from_secs(2));
    assert_eq!(fire(&l, 5).await, (2, Some(Reason::QuotaExceeded)));
}

async fn an_hour_back_grants_nothing_new<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    // 23:50 on the 6th: 4 of the day's 12.
    clock.set_wall(at(2024, 5, 6, 86_400 - 600));
    let l = layer(b, &clock).await;
    assert_eq!(fire(&l, 4).await, (4, None));
    // 00:10 on the 7th: the new window's 12, used up.
    clock.advance(Duration::from_secs(1_200));
    assert_eq!(fire(&l, 20).await, (10, Some(Reason::Limited)));
    clock.advance(Duration::from_secs(2));
    assert_eq!(fire(&l, 5).await, (2, Some(Reason::QuotaExceeded)));
    // An hour back, 23:10 on the 6th, whose window had 8 left: the used-up
    // window stays used up, and the bucket is no fuller than at 00:10.
    clock.rewind(Duration::from_secs(3_600));
    assert_eq!(fire(&l, 20).await, (0, Some(Reason::QuotaExceeded)));
    // Back past 00:10 and on through the 7th: still nothing.
    clock.advance(Duration::from_secs(3_600 + 60));
    assert_eq!(fire(&l, 5).await, (0, Some(Reason::QuotaExceeded)));
    clock.advance(Duration::from_secs(20 * 3_600));
    assert_eq!(fire(&l, 5).await, (0, Some(Reason::QuotaExceeded)));
    // The 8th: a new window.
    clock.advance(Duration::from_secs(4 * 3_600));
    assert_eq!(fire(&l, 20).await, (10, Some(Reason::Limited)));
}

async fn a_throttle_stepped_back_admits_no_more_than_at_the_later_time<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 12 * 3_600));
    let l = layer(b, &clock).await;
    // 4 of the bucket's 10 used: at this time 6 more would pass.
    assert_eq!(fire(&l, 4).await, (4, None));
    // A second back the bucket looks a second emptier, not fuller: 5 pass.
    clock.rewind(Duration::from_secs(1));
    assert_eq!(fire(&l, 10).await, (5, Some(Reason::Limited)));
    // A real second later the reading is back where it was: one is left,
    // 10 in all over that second, within the bucket plus one refill.
    clock.advance(Duration::from_secs(1));
    assert_eq!(fire(&l, 10).await, (1, Some(Reason::Limited)));
    clock.advance(Duration::from_secs(1));
    assert_eq!(fire(&l, 10).await, (1, Some(Reason::Limited)));
    // An hour back: nothing.
    clock.rewind(Duration::from_secs(3_600));
    assert_eq!(fire(&l, 10).await, (0, Some(Reason::Limited)));
}

/// A week (from Monday, and from another day) and a month stepped back
/// across their start: the window used up stays used up, though the one
/// before still had room, until the later window ends.
async fn a_week_or_a_month_stepped_back_across_its_start_grants_nothing_new<B: Backend>(b: &B) {
    // 10 minutes before each window's start: a Sunday, a Tuesday, May 31st.
    for (period, eve) in [
        (Period::WEEK, at(2024, 5, 5, 86_400 - 600)),
        (
            Period::Week(Weekday::Wednesday),
            at(2024, 5, 7, 86_400 - 600),
        ),
        (Period::Month, at(2024, 5, 31, 86_400 - 600)),
    ] {
        let clock = ManualClock::new();
        clock.set_wall(eve);
        let plan = UsagePlan::new("p").quota(Quota::new(3, period).unwrap());
        let l = layer_on(b, &clock, plan).await;
        // 1 of the old window's 3; then the new window's 3, used up.
        assert_eq!(fire(&l, 1).await, (1, None), "{period}");
        clock.advance(Duration::from_secs(1_200));
        assert_eq!(
            fire(&l, 5).await,
            (3, Some(Reason::QuotaExceeded)),
            "{period}"
        );
        // An hour back, into the old window (2 left there): nothing.
        clock.rewind(Duration::from_secs(3_600));
        assert_eq!(
            fire(&l, 5).await,
            (0, Some(Reason::QuotaExceeded)),
            "{period}"
        );
        // Forward again, a day into the new window: still nothing.
        clock.advance(Duration::from_secs(86_400));
        assert_eq!(
            fire(&l, 5).await,
            (0, Some(Reason::QuotaExceeded)),
            "{period}"
        );
    }
}

/// Days forward, then back into a day between: the latest window holds.
async fn several_windows_forward_then_back_grants_nothing_new<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 12 * 3_600));
    let plan = UsagePlan::new("p").quota(Quota::new(3, Period::Day).unwrap());
    let l = layer_on(b, &clock, plan).await;
    assert_eq!(fire(&l, 1).await, (1, None));
    // Three days on, the 9th: its 3, used up.
    clock.advance(Duration::from_secs(3 * 86_400));
    assert_eq!(fire(&l, 5).await, (3, Some(Reason::QuotaExceeded)));
    // Back to the 7th, never used; back to the 6th, 2 left: nothing.
    clock.rewind(Duration::from_secs(2 * 86_400));
    assert_eq!(fire(&l, 5).await, (0, Some(Reason::QuotaExceeded)));
    clock.rewind(Duration::from_secs(86_400));
    assert_eq!(fire(&l, 5).await, (0, Some(Reason::QuotaExceeded)));
    // To the last hour of the 9th: nothing; the 10th: a new window.
    clock.set_wall(at(2024, 5, 9, 86_400 - 3_600));
    assert_eq!(fire(&l, 5).await, (0, Some(Reason::QuotaExceeded)));
    clock.set_wall(at(2024, 5, 10, 60));
    assert_eq!(fire(&l, 5).await, (3, Some(Reason::QuotaExceeded)));
}

/// A token bucket (per minute) stepped back looks emptier, never fuller;
/// a daily token budget used up stays used up stepped back into the day
/// before. (Each estimate is what the request uses: nothing is settled.)
async fn token_budgets_stepped_back_grant_nothing_new<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 12 * 3_600));
    let plan = UsagePlan::new("p").tokens(TokenBudget::new().per_minute(100).unwrap());
    let (mut svc, _) = token_service(b, &clock, plan).await;
    // 60 of 100: 40 would fit now. 10 s back the bucket looks 10 s (16
    // and two thirds tokens) emptier: 24 do not fit, 23 do.
    assert_eq!(send_tokens(&mut svc, 60, Some(60)).await, (200, None));
    clock.rewind(Duration::from_secs(10));
    assert_eq!(
        send_tokens(&mut svc, 24, Some(24)).await,
        (429, Some(Reason::Limited))
    );
    assert_eq!(send_tokens(&mut svc, 23, Some(23)).await, (200, None));
    // An hour back: not one token.
    clock.rewind(Duration::from_secs(3_600));
    assert_eq!(
        send_tokens(&mut svc, 1, Some(1)).await,
        (429, Some(Reason::Limited))
    );

    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 86_400 - 600));
    let plan = UsagePlan::new("p").tokens(TokenBudget::new().per_day(100).unwrap());
    let (mut svc, _) = token_service(b, &clock, plan).await;
    assert_eq!(send_tokens(&mut svc, 30, Some(30)).await, (200, None));
    clock.advance(Duration::from_secs(1_200));
    assert_eq!(send_tokens(&mut svc, 100, Some(100)).await, (200, None));
    clock.rewind(Duration::from_secs(3_600));
    assert_eq!(
        send_tokens(&mut svc, 1, Some(1)).await,
        (429, Some(Reason::QuotaExceeded))
    );
    clock.advance(Duration::from_secs(3_600 + 86_400));
    assert_eq!(send_tokens(&mut svc, 100, Some(100)).await, (200, None));
}

/// What is charged on a clock stepped back counts on the latest day seen,
/// in usage reports as in the window: the earlier day's record is left as
/// it closed. A report asked while the clock is back stops at its today,
/// and one that starts on a day the clock has not reached again is a bad
/// range, as any range that starts after today.
async fn usage_stepped_back_counts_on_the_latest_day<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    // 23:50 on the 6th: 4 of the day's 12; 00:10 on the 7th: 5.
    clock.set_wall(at(2024, 5, 6, 86_400 - 600));
    // Not borrowing: the counts below are each decision's own.
    let plan = UsagePlan::new("p")
        .quota(Quota::new(12, Period::Day).unwrap())
        .borrow(false);
    let l = layer_on(b, &clock, plan).await;
    assert_eq!(fire(&l, 4).await, (4, None));
    clock.advance(Duration::from_secs(1_200));
    assert_eq!(fire(&l, 5).await, (5, None));
    // 23:10 on the 6th: 2 more, of the 7th's 7 left.
    clock.rewind(Duration::from_secs(3_600));
    assert_eq!(fire(&l, 2).await, (2, None));
    let admin = l.admin();
    let (sixth, seventh) = (
        Date::new(2024, 5, 6).unwrap(),
        Date::new(2024, 5, 7).unwrap(),
    );
    let back = admin.usage("p", sixth, seventh, Some("k")).await.unwrap();
    assert_eq!(back.end, sixth, "cut at the clock's today");
    assert_eq!(back.items["k"], vec![[4, 8]]);
    assert_eq!(
        admin.usage("p", seventh, seventh, Some("k")).await,
        Err(AdminError::BadRange("start is after today (UTC)"))
    );
    // On the 7th again: the 6th as it closed, the 7th with all 7 it used.
    clock.advance(Duration::from_secs(3_600));
    let r = admin.usage("p", sixth, seventh, Some("k")).await.unwrap();
    assert_eq!(r.items["k"], vec![[4, 8], [7, 5]]);
    assert_eq!(fire(&l, 10).await, (5, Some(Reason::QuotaExceeded)));
    let r = admin.usage("p", sixth, seventh, Some("k")).await.unwrap();
    assert_eq!(r.items["k"], vec![[4, 8], [12, 0]]);
}

on_each_backend!(
    "jumps":
    a_day_forward_fills_the_bucket_and_opens_a_new_window,
    an_hour_back_grants_nothing_new,
    a_throttle_stepped_back_admits_no_more_than_at_the_later_time,
    a_week_or_a_month_stepped_back_across_its_start_grants_nothing_new,
    several_windows_forward_then_back_grants_nothing_new,
    token_budgets_stepped_back_grant_nothing_new,
    usage_stepped_back_counts_on_the_latest_day,
);

/// The memory store's quotas read the wall clock, its throttles the
/// monotonic one: a wall clock jumping alone (NTP, a VM resumed) opens or
/// keeps quota windows, and moves no bucket.
#[tokio::test]
async fn the_wall_clock_jumping_alone_moves_quotas_not_buckets() {
    let clock = ManualClock::new();
    // 23:30 on the 6th: 10 of the day's 12 (2 left).
    clock.set_wall(at(2024, 5, 6, 86_400 - 1_800));
    let l = layer(&Memory, &clock).await;
    assert_eq!(fire(&l, 20).await, (10, Some(Reason::Limited)));
    // An hour forward on the wall only, into the 7th: a new window, but
    // the bucket has not refilled.
    clock.set_wall(at(2024, 5, 7, 1_800));
    assert_eq!(fire(&l, 5).await, (0, Some(Reason::Limited)));
    // The 7th's 12, used up.
    clock.advance(Duration::from_secs(12));
    assert_eq!(fire(&l, 20).await, (10, Some(Reason::Limited)));
    clock.advance(Duration::from_secs(2));
    assert_eq!(fire(&l, 5).await, (2, Some(Reason::QuotaExceeded)));
    // Three seconds on (3 in the bucket), an hour back on the wall only,
    // into the 6th, whose window had 2 left: the 7th's stays in force.
    clock.advance(Duration::from_secs(3));
    clock.set_wall(at(2024, 5, 6, 86_400 - 1_800 + 17));
    assert_eq!(fire(&l, 5).await, (0, Some(Reason::QuotaExceeded)));
    // Years back, before 1970: no panic, and no window reopens.
    clock.set_wall(UNIX_EPOCH - Duration::from_secs(86_400 * 400));
    assert_eq!(fire(&l, 5).await, (0, Some(Reason::QuotaExceeded)));
    // A day forward on the wall only, into the 8th: a new window, and only
    // the 3 the bucket holds.
    clock.set_wall(at(2024, 5, 8, 1_800));
    assert_eq!(fire(&l, 20).await, (3, Some(Reason::Limited)));
}

/// Jumps far out of the ordinary: a decade forward, the monotonic clock
/// back past its start (it stops at zero), and forward again. Nothing
/// panics, and no jump grants more than a full bucket.
#[tokio::test]
async fn extreme_jumps_neither_panic_nor_overfill() {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 12 * 3_600));
    let l = layer(&Memory, &clock).await;
    assert_eq!(fire(&l, 20).await, (10, Some(Reason::Limited)));
    clock.advance(Duration::from_secs(10 * 366 * 86_400));
    assert_eq!(fire(&l, 20).await, (10, Some(Reason::Limited)));
    // Back 20 years: the monotonic clock stops at zero (the bucket looks
    // empty), the wall clock is in 2014, which counts in the latest window
    // (2 of 12 left).
    clock.rewind(Duration::from_secs(20 * 366 * 86_400));
    assert_eq!(fire(&l, 20).await, (0, Some(Reason::Limited)));
    // Forward 20 years: a full bucket, and the same day's window, so 2.
    clock.advance(Duration::from_secs(20 * 366 * 86_400));
    assert_eq!(fire(&l, 20).await, (2, Some(Reason::QuotaExceeded)));
}
