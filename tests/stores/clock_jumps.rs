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
//! Both clocks of a [`ManualClock`] move together (`advance`, `rewind`) for
//! the memory store and for a real `redis-server` (which decides on the
//! manual clock's wall time instead of its own `TIME`). The memory store's
//! throttles run on the monotonic clock and its quotas on the wall clock,
//! which can jump alone (`set_wall`): that is covered for the memory store.

use std::time::{Duration, UNIX_EPOCH};

use tollgate::extract::ApiKeyHeader;
use tollgate::store::Store;
use tollgate::{
    ApiKey, ManualClock, Period, Policy, Quota, RateLimitLayer, Reason, Throttle, UsagePlan,
};

use crate::support::at;
use crate::support::backend::{Backend, Memory, Redis, on_each_backend};
use crate::support::redis::require_redis;

/// Plan `p`: one request a second in bursts of 10, and 12 a UTC day.
async fn layer<B: Backend>(b: &B, clock: &ManualClock) -> RateLimitLayer<ApiKeyHeader, B::S> {
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(
            UsagePlan::new("p")
                .throttle(Throttle::new(1.0, 10).unwrap())
                .quota(Quota::new(12, Period::Day).unwrap()),
        )
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

on_each_backend!(
    "jumps":
    a_day_forward_fills_the_bucket_and_opens_a_new_window,
    an_hour_back_grants_nothing_new,
    a_throttle_stepped_back_admits_no_more_than_at_the_later_time,
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
