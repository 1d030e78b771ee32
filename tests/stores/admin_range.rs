//! UpdateUsage's range, the same on every store: `Admin::set_remaining`
//! takes 0 to 2^53 (the largest limit a quota can have) and refuses anything
//! larger with `AdminError::RemainingOutOfRange` before a store is asked, on
//! the memory store and on a real `redis-server` alike; and a store asked
//! directly for more answers the same error whichever it is.
//!
//! And what the other admin operations on a key's counters keep or forget,
//! on every store: `reset_key` forgets every limit of the key under its
//! plan (its models' too), and `put_plan` keeps the share of each bucket in
//! use for the keys the resolver answered as for the registered ones; and
//! what a usage report keeps of a window that began before the history.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tollgate::extract::ApiKeyHeader;
use tollgate::store::{Acquire, Acquired, QuotaRef, Store, StoreFuture, ThrottleRef};
use tollgate::{
    AdminError, ApiKey, Clock, Date, ManualClock, ModelLimits, Period, Policy, Quota,
    RateLimitLayer, Resolution, ResolvedKey, Resolver, Throttle, UsagePlan,
};

use crate::support::at;
use crate::support::backend::{Backend, Memory, Redis, on_each_backend};
use crate::support::redis::require_redis;

/// 2^53: the largest count accepted.
const EXACT: u64 = 1 << 53;
/// The quota's limit.
const LIMIT: u64 = 100;

async fn layer<S: Store>(clock: &ManualClock, store: S) -> RateLimitLayer<ApiKeyHeader, S> {
    // Not borrowing: the counts below are each decision's own.
    let plan = UsagePlan::new("p")
        .quota(Quota::new(LIMIT, Period::Day).unwrap())
        .borrow(false);
    layer_on(clock, plan, store)
}

/// The key `k` (value `v`) on `plan`, on `clock` set to 2024-05-01 01:00.
fn layer_on<S: Store>(
    clock: &ManualClock,
    plan: UsagePlan,
    store: S,
) -> RateLimitLayer<ApiKeyHeader, S> {
    clock.set_wall(at(2024, 5, 1, 3_600));
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(plan)
        .key(ApiKey::new("k", "v", "p"))
        .build()
        .unwrap();
    RateLimitLayer::builder(policy).store(store).build()
}

/// `[used, remaining]` of key `k` today.
async fn today<S: Store>(l: &RateLimitLayer<ApiKeyHeader, S>) -> [i64; 2] {
    let day = Date::new(2024, 5, 1).unwrap();
    let report = l.admin().usage("p", day, day, Some("k")).await.unwrap();
    report.items["k"][0]
}

async fn update_usage_takes_up_to_2_pow_53_and_refuses_more_before_the_store<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let l = layer(&clock, b.store(&clock).await).await;
    let admin = l.admin();
    l.decide(b"v", 1).await.unwrap();
    assert_eq!(today(&l).await, [1, 99]);

    for remaining in [u64::MAX, EXACT + 1, i64::MAX as u64 + 1] {
        assert_eq!(
            admin.set_remaining("k", remaining).await,
            Err(AdminError::RemainingOutOfRange {
                remaining,
                max: EXACT
            }),
            "{remaining}"
        );
        assert_eq!(today(&l).await, [1, 99], "{remaining} changed nothing");
    }
    let err = admin.set_remaining("k", u64::MAX).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "remaining 18446744073709551615 is out of range: at most 9007199254740992 \
         (2^53, the largest quota limit)"
    );

    // The range's top: exact on every store, and decided on.
    for remaining in [EXACT - 1, EXACT] {
        assert_eq!(admin.set_remaining("k", remaining).await, Ok(remaining));
        assert_eq!(today(&l).await, [1, remaining as i64]);
    }
    admin.set_remaining("k", EXACT - 1).await.unwrap();
    l.decide(b"v", 1).await.unwrap();
    assert_eq!(today(&l).await, [2, EXACT as i64 - 2]);

    // The quota's own limit, and the bottom of the range.
    assert_eq!(admin.set_remaining("k", LIMIT).await, Ok(LIMIT));
    assert_eq!(today(&l).await, [2, LIMIT as i64]);
    assert_eq!(admin.set_remaining("k", 0).await, Ok(0));
    assert!(l.decide(b"v", 1).await.is_err());
    assert_eq!(today(&l).await, [2, 0]);
}

/// A store that sets the count in `ask`, whatever Admin asked for: what a
/// store answers when asked directly for a count Admin never sends.
#[derive(Clone, Debug)]
struct Asks<S> {
    inner: S,
    ask: Arc<AtomicU64>,
}

impl<S: Store> Store for Asks<S> {
    type Future = S::Future;

    fn clock(&self) -> &Clock {
        self.inner.clock()
    }
    fn acquire(&self, request: &Acquire<'_>) -> Acquired<S::Future> {
        self.inner.acquire(request)
    }
    fn usage(&self, q: &QuotaRef<'_>, first: Date, last: Date) -> StoreFuture<Vec<[i64; 2]>> {
        self.inner.usage(q, first, last)
    }
    fn set_remaining(&self, q: &QuotaRef<'_>, _: u64) -> StoreFuture<u64> {
        self.inner
            .set_remaining(q, self.ask.load(Ordering::Relaxed))
    }
    fn reset(&self, t: &[ThrottleRef<'_>], q: Option<&QuotaRef<'_>>) -> StoreFuture<()> {
        self.inner.reset(t, q)
    }
}

async fn a_store_asked_for_more_than_2_pow_53_refuses_it_alike<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let ask = Arc::new(AtomicU64::new(0));
    let store = Asks {
        inner: b.store(&clock).await,
        ask: Arc::clone(&ask),
    };
    let l = layer(&clock, store).await;
    for remaining in [u64::MAX, EXACT + 1] {
        ask.store(remaining, Ordering::Relaxed);
        match l.admin().set_remaining("k", 1).await {
            Err(AdminError::Store(e)) => assert_eq!(
                e.to_string(),
                format!("store unavailable: remaining {remaining} is above 2^53")
            ),
            other => panic!("{remaining}: {other:?}"),
        }
    }
    assert_eq!(today(&l).await, [0, LIMIT as i64]);
    ask.store(EXACT, Ordering::Relaxed);
    assert_eq!(l.admin().set_remaining("k", 1).await, Ok(EXACT));
}

/// The name of the limit that denied a request of `key`, or `None` when it
/// passed.
async fn denied_by<S: Store>(l: &RateLimitLayer<ApiKeyHeader, S>, key: &[u8]) -> Option<String> {
    match l.decide(key, 1).await {
        Ok(_) => None,
        Err(r) => Some(r.limit().unwrap_or("none").to_owned()),
    }
}

async fn reset_key_forgets_the_models_limits_too<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    // A request names no model: the "*" entry's limits apply, beside the
    // plan's quota.
    let model = ModelLimits::new()
        .throttle(Throttle::new(0.001, 1).unwrap())
        .quota(Quota::new(1, Period::Day).unwrap());
    let plan = UsagePlan::new("p")
        .quota(Quota::new(LIMIT, Period::Day).unwrap())
        .model("*", model);
    let l = layer_on(&clock, plan, b.store(&clock).await);
    assert_eq!(denied_by(&l, b"v").await, None);
    assert_eq!(denied_by(&l, b"v").await.as_deref(), Some("model-quota"));
    clock.advance(std::time::Duration::from_secs(1));
    assert_eq!(denied_by(&l, b"v").await.as_deref(), Some("model-quota"));
    assert_eq!(today(&l).await, [1, LIMIT as i64 - 1]);
    // Reset: the model's quota is fresh as the plan's is, and the model's
    // bucket (a unit in 1000 s) full again.
    l.admin().reset_key("k").await.unwrap();
    assert_eq!(denied_by(&l, b"v").await, None);
    assert_eq!(today(&l).await, [1, LIMIT as i64 - 1]);
    assert_eq!(denied_by(&l, b"v").await.as_deref(), Some("model-quota"));
}

async fn put_plan_keeps_a_resolved_keys_emptied_bucket_empty<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 1, 3_600));
    // Not borrowing: the counts below are each decision's own.
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(
            UsagePlan::new("p")
                .throttle(Throttle::new(100.0, 10).unwrap())
                .borrow(false),
        )
        .key(ApiKey::new("reg", "vreg", "p"))
        .build()
        .unwrap();
    // "vr" is the key "r1" on the same plan, kept outside the policy.
    let lookup = |value: String| async move {
        Ok(match value.as_str() {
            "vr" => Resolution::Found(ResolvedKey::new("r1", "p")),
            _ => Resolution::Unknown,
        })
    };
    let l = RateLimitLayer::builder(policy)
        .store(b.store(&clock).await)
        .resolver(Resolver::new(lookup).clock(clock.clone()))
        .build();
    // Passed per key (resolved, registered) out of 20 each at one instant.
    let burst = || async {
        let mut passed = (0, 0);
        for _ in 0..20 {
            passed.0 += usize::from(denied_by(&l, b"vr").await.is_none());
            passed.1 += usize::from(denied_by(&l, b"vreg").await.is_none());
        }
        passed
    };
    assert_eq!(burst().await, (10, 10));
    // Emptied at 100/s, now 1/s: both buckets stay empty, and one request
    // each passes a second later.
    let admin = l.admin();
    let slower = UsagePlan::new("p")
        .throttle(Throttle::new(1.0, 10).unwrap())
        .borrow(false);
    admin.put_plan(slower).await.unwrap();
    assert_eq!(burst().await, (0, 0));
    clock.advance(std::time::Duration::from_secs(1));
    assert_eq!(burst().await, (1, 1));
}

/// A throttle put anew while a share of it borrowed under the old numbers
/// is unused: once the share goes back, the key finds what the memory
/// store (which never borrows) leaves it, the share of the bucket in use
/// carried over (2 of 10 used at 1/s are 4 of 20). Before, a share given
/// back to a key a decision had converted already was not given back at
/// all: 4 units (its 2 at twice the span) stayed charged.
async fn a_share_borrowed_before_a_throttle_is_put_anew_goes_back_converted<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let plan = |burst| UsagePlan::new("p").throttle(Throttle::new(1.0, burst).unwrap());
    let l = layer_on(&clock, plan(10), b.store(&clock).await);
    // On Redis the second request borrows a share beside its unit.
    for _ in 0..2 {
        assert_eq!(denied_by(&l, b"v").await, None);
    }
    l.admin().put_plan(plan(20)).await.unwrap();
    // Converts the key in Redis before the share goes back.
    assert_eq!(denied_by(&l, b"v").await, None);
    b.drain(l.store()).await;
    let mut passed = 0;
    while passed < 40 && denied_by(&l, b"v").await.is_none() {
        passed += 1;
    }
    assert_eq!(
        passed,
        20 - 4 - 1,
        "4 of 20 were in use, and one more since"
    );
}

/// A key of the policy that the resolver also answers for another value
/// (a key moving between the database and the registry): the requests of
/// either value count in the one key's usage history, whichever comes first
/// each day. Deciding a request of the database's value must not cut the
/// registered key's history to the current day.
async fn a_registered_keys_history_is_kept_when_its_id_is_resolved<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 1, 3_600));
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(
            UsagePlan::new("p")
                .quota(Quota::new(LIMIT, Period::Day).unwrap())
                .borrow(false),
        )
        .key(ApiKey::new("k", "v", "p"))
        .build()
        .unwrap();
    // "vr" is the key "k" too, as the database has it.
    let lookup = |value: String| async move {
        Ok(match value.as_str() {
            "vr" => Resolution::Found(ResolvedKey::new("k", "p")),
            _ => Resolution::Unknown,
        })
    };
    let l = RateLimitLayer::builder(policy)
        .store(b.store(&clock).await)
        .resolver(Resolver::new(lookup).clock(clock.clone()))
        .build();
    // Each day the database's value first, then the registered one.
    for (resolved, registered) in [(1, 2), (2, 1), (1, 3)] {
        for _ in 0..resolved {
            l.decide(b"vr", 1).await.unwrap();
        }
        for _ in 0..registered {
            l.decide(b"v", 1).await.unwrap();
        }
        clock.advance(std::time::Duration::from_secs(86_400));
    }
    let may = |d: u8| Date::new(2024, 5, d).unwrap();
    let report = l
        .admin()
        .usage("p", may(1), may(3), Some("k"))
        .await
        .unwrap();
    assert_eq!(report.items["k"], [[3, 97], [3, 97], [4, 96]]);
}

/// A month's earliest days stay in the usage history after the day that
/// opened the month has left it: what remained after that day's requests is
/// what remains on the days after it in the month, whatever later days
/// wrote. With 31 days of history, a month's use on January 1st and a
/// request on February 1st (whose day takes January 1st's place) leave
/// January 2nd, the oldest day kept, at 7 of 10 remaining, not at 10.
async fn a_window_older_than_the_history_still_reports_what_remained<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 1, 1, 3_600));
    let policy = Policy::builder()
        .clock(clock.clone())
        .history_days(31)
        .plan(
            UsagePlan::new("p")
                .quota(Quota::new(10, Period::Month).unwrap())
                .borrow(false),
        )
        .key(ApiKey::new("k", "v", "p"))
        .build()
        .unwrap();
    let l = RateLimitLayer::builder(policy)
        .store(b.store(&clock).await)
        .build();
    let days = |l: &RateLimitLayer<ApiKeyHeader, B::S>, first: Date, last: Date| {
        let admin = l.admin();
        async move {
            admin
                .usage("p", first, last, Some("k"))
                .await
                .unwrap()
                .items["k"]
                .clone()
        }
    };
    let jan = |d: u8| Date::new(2024, 1, d).unwrap();
    l.decide(b"v", 3).await.unwrap();
    clock.advance(std::time::Duration::from_secs(31 * 86_400));
    // February 1st, before and after its first request.
    assert_eq!(days(&l, jan(2), jan(3)).await, [[0, 7], [0, 7]]);
    l.decide(b"v", 1).await.unwrap();
    assert_eq!(days(&l, jan(2), jan(3)).await, [[0, 7], [0, 7]]);
    // February 2nd: February 1st is closed into the history.
    clock.advance(std::time::Duration::from_secs(86_400));
    l.decide(b"v", 1).await.unwrap();
    let feb = |d: u8| Date::new(2024, 2, d).unwrap();
    let mut want = vec![[0, 7]; 29];
    want.extend([[1, 9], [1, 8]]);
    assert_eq!(days(&l, jan(3), feb(2)).await, want);
}

/// A plan whose quota limit is put anew keeps what remained on the days
/// before, for the keys on it and for a key moved away (whose counters
/// under the plan are kept for its return): a past day reports what was
/// left at its end under the limit of that day, not under the new one.
async fn a_limit_put_anew_leaves_past_days_as_they_were<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let plan = |limit| {
        UsagePlan::new("p")
            .quota(Quota::new(limit, Period::Month).unwrap())
            .borrow(false)
    };
    clock.set_wall(at(2024, 5, 1, 3_600));
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(plan(10))
        .plan(UsagePlan::new("other").borrow(false))
        .key(ApiKey::new("k", "v", "p"))
        .key(ApiKey::new("away", "w", "p"))
        .build()
        .unwrap();
    let l = RateLimitLayer::builder(policy)
        .store(b.store(&clock).await)
        .build();
    let admin = l.admin();
    let may = |d: u8| Date::new(2024, 5, d).unwrap();
    l.decide(b"v", 3).await.unwrap();
    l.decide(b"w", 4).await.unwrap();
    admin.set_plan("away", "other").await.unwrap();
    // Two days later the plan's limit goes up to 20.
    clock.advance(std::time::Duration::from_secs(2 * 86_400));
    admin.put_plan(plan(20)).await.unwrap();
    l.decide(b"v", 1).await.unwrap();
    admin.set_plan("away", "p").await.unwrap();
    l.decide(b"w", 1).await.unwrap();
    let report = admin.usage("p", may(1), may(3), None).await.unwrap();
    assert_eq!(report.items["k"], [[3, 7], [0, 7], [1, 16]]);
    assert_eq!(report.items["away"], [[4, 6], [0, 6], [1, 15]]);
}

/// The key `k` (value `v`) on plan `p`, whose quota's limit `plan` sets,
/// from 2024-05-01 01:00.
async fn monthly<B: Backend>(
    b: &B,
    clock: &ManualClock,
) -> (
    impl Fn(u64) -> UsagePlan,
    RateLimitLayer<ApiKeyHeader, B::S>,
) {
    let plan = |limit| {
        UsagePlan::new("p")
            .quota(Quota::new(limit, Period::Month).unwrap())
            .borrow(false)
    };
    let l = layer_on(clock, plan(10), b.store(clock).await);
    (plan, l)
}

/// A limit put anew on the day of the key's last request shows in what
/// remains today at once, before the key's next request.
async fn a_limit_put_anew_shows_today_at_once<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let (plan, l) = monthly(b, &clock).await;
    let admin = l.admin();
    let may1 = Date::new(2024, 5, 1).unwrap();
    l.decide(b"v", 3).await.unwrap();
    admin.put_plan(plan(20)).await.unwrap();
    assert_eq!(
        admin.usage("p", may1, may1, None).await.unwrap().items["k"],
        [[3, 17]]
    );
    admin.put_plan(plan(5)).await.unwrap();
    assert_eq!(
        admin.usage("p", may1, may1, None).await.unwrap().items["k"],
        [[3, 2]]
    );
    l.decide(b"v", 1).await.unwrap();
    assert_eq!(
        admin.usage("p", may1, may1, None).await.unwrap().items["k"],
        [[4, 1]]
    );
}

/// A limit put anew days after the key's last request: the days before the
/// change keep what remained under the old limit, the day of the change
/// reports it under the new one before the key's next request.
async fn a_limit_put_anew_between_requests_shows_from_its_day<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let (plan, l) = monthly(b, &clock).await;
    let admin = l.admin();
    let may = |d: u8| Date::new(2024, 5, d).unwrap();
    l.decide(b"v", 3).await.unwrap();
    clock.advance(std::time::Duration::from_secs(2 * 86_400));
    admin.put_plan(plan(20)).await.unwrap();
    let report = admin.usage("p", may(1), may(3), None).await.unwrap();
    assert_eq!(report.items["k"], [[3, 7], [0, 7], [0, 17]]);
    l.decide(b"v", 1).await.unwrap();
    let report = admin.usage("p", may(1), may(3), None).await.unwrap();
    assert_eq!(report.items["k"], [[3, 7], [0, 7], [1, 16]]);
}

/// A quota whose period is put anew keeps the key's count in the window of
/// the new period that holds its last request: what remains today in a
/// usage report is what the next request finds, before that request and
/// after it, whether the period changes on the day of the last request or
/// days later.
async fn a_period_put_anew_reports_today_what_the_next_request_finds<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let plan = |limit, period| {
        UsagePlan::new("p")
            .quota(Quota::new(limit, period).unwrap())
            .borrow(false)
    };
    // Wednesday 2024-05-01.
    let l = layer_on(&clock, plan(10, Period::Day), b.store(&clock).await);
    let admin = l.admin();
    let today = |d: u8| {
        let admin = admin.clone();
        async move {
            let day = Date::new(2024, 5, d).unwrap();
            admin.usage("p", day, day, Some("k")).await.unwrap().items["k"][0]
        }
    };
    l.decide(b"v", 3).await.unwrap();
    admin.put_plan(plan(20, Period::WEEK)).await.unwrap();
    assert_eq!(today(1).await, [3, 17]);
    l.decide(b"v", 1).await.unwrap();
    assert_eq!(today(1).await, [4, 16]);
    // Friday the 3rd: a month of 30, whose window holds the 1st.
    clock.advance(std::time::Duration::from_secs(2 * 86_400));
    admin.put_plan(plan(30, Period::Month)).await.unwrap();
    assert_eq!(today(3).await, [0, 26]);
    l.decide(b"v", 1).await.unwrap();
    assert_eq!(today(3).await, [1, 25]);
    // A day of 6: today's window holds the last request, and the whole
    // count (5) is taken to be in it.
    admin.put_plan(plan(6, Period::Day)).await.unwrap();
    assert_eq!(today(3).await, [1, 1]);
    l.decide(b"v", 1).await.unwrap();
    assert_eq!(today(3).await, [2, 0]);
    assert!(l.decide(b"v", 1).await.is_err());
    // Saturday the 4th, weeks of 8 from Saturday: a new window.
    clock.advance(std::time::Duration::from_secs(86_400));
    admin
        .put_plan(plan(8, Period::Week(tollgate::Weekday::Saturday)))
        .await
        .unwrap();
    assert_eq!(today(4).await, [0, 8]);
    l.decide(b"v", 1).await.unwrap();
    assert_eq!(today(4).await, [1, 7]);
}

/// A limit put anew on the day of the key's last request, read on a later
/// day: that day ends under the new limit, so it reports what remained
/// under it, and so do the days after it in the window. (The Redis store
/// kept the day as its last request had written it, under the old limit:
/// `[[3, 7], [0, 17]]`.)
async fn a_limit_put_anew_on_the_day_of_the_last_request_holds_on_later_days<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let (plan, l) = monthly(b, &clock).await;
    let admin = l.admin();
    let may = |d: u8| Date::new(2024, 5, d).unwrap();
    l.decide(b"v", 3).await.unwrap();
    admin.put_plan(plan(20)).await.unwrap();
    clock.advance(std::time::Duration::from_secs(86_400));
    let report = admin.usage("p", may(1), may(2), None).await.unwrap();
    assert_eq!(report.items["k"], [[3, 17], [0, 17]]);
    // Put twice on one day: the day ends under the second.
    admin.put_plan(plan(30)).await.unwrap();
    admin.put_plan(plan(25)).await.unwrap();
    clock.advance(std::time::Duration::from_secs(2 * 86_400));
    let report = admin.usage("p", may(1), may(4), None).await.unwrap();
    assert_eq!(report.items["k"], [[3, 17], [0, 22], [0, 22], [0, 22]]);
}

/// Limits put anew on days without requests, read days later: each day
/// reports what remained at its end under the limit in force then, the
/// days before the first change under the old limit, the days from each
/// change under its limit. (The Redis store reported every day after the
/// last request under the old limit but today.)
async fn limits_put_anew_between_requests_hold_on_later_days<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let (plan, l) = monthly(b, &clock).await;
    let admin = l.admin();
    let may = |d: u8| Date::new(2024, 5, d).unwrap();
    let day = std::time::Duration::from_secs(86_400);
    l.decide(b"v", 3).await.unwrap();
    clock.advance(2 * day);
    admin.put_plan(plan(20)).await.unwrap();
    clock.advance(2 * day);
    admin.put_plan(plan(30)).await.unwrap();
    clock.advance(2 * day);
    let report = admin.usage("p", may(1), may(7), None).await.unwrap();
    assert_eq!(
        report.items["k"],
        [[3, 7], [0, 7], [0, 17], [0, 17], [0, 27], [0, 27], [0, 27]]
    );
    // A request after them changes only its own day.
    l.decide(b"v", 2).await.unwrap();
    clock.advance(day);
    let report = admin.usage("p", may(1), may(8), None).await.unwrap();
    assert_eq!(
        report.items["k"],
        [
            [3, 7],
            [0, 7],
            [0, 17],
            [0, 17],
            [0, 27],
            [0, 27],
            [2, 25],
            [0, 25]
        ]
    );
}

/// A limit put anew after the window of the key's last request ended: the
/// days from the change report the limit put then, with nothing used in
/// the new window, though a later change moved it again.
async fn a_limit_put_anew_in_a_later_window_holds_from_its_day<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let (plan, l) = monthly(b, &clock).await;
    let admin = l.admin();
    let day = std::time::Duration::from_secs(86_400);
    l.decide(b"v", 3).await.unwrap();
    // June 3, then June 5.
    clock.advance(33 * day);
    admin.put_plan(plan(20)).await.unwrap();
    clock.advance(2 * day);
    admin.put_plan(plan(30)).await.unwrap();
    clock.advance(day);
    let june = |d: u8| Date::new(2024, 6, d).unwrap();
    let report = admin.usage("p", june(3), june(6), None).await.unwrap();
    assert_eq!(report.items["k"], [[0, 20], [0, 20], [0, 30], [0, 30]]);
}

/// A peek (a decision of cost 0) charges nothing and leaves no record of
/// its day: after a limit put anew, the day reports the window's limit in
/// force at its end, as a day nobody used does, and the days from the
/// change the new one.
async fn a_peek_leaves_no_record_of_its_day<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let (plan, l) = monthly(b, &clock).await;
    let admin = l.admin();
    let may = |d: u8| Date::new(2024, 5, d).unwrap();
    let day = std::time::Duration::from_secs(86_400);
    l.decide(b"v", 0).await.unwrap();
    clock.advance(day);
    admin.put_plan(plan(20)).await.unwrap();
    clock.advance(day);
    let report = admin.usage("p", may(1), may(3), None).await.unwrap();
    assert_eq!(report.items["k"], [[0, 10], [0, 20], [0, 20]]);
}

/// The plan `p` with a quota of `limit` per `period`, not borrowing.
fn plan_of(limit: u64, period: Period) -> UsagePlan {
    UsagePlan::new("p")
        .quota(Quota::new(limit, period).unwrap())
        .borrow(false)
}

/// Key `k`'s `[used, remaining]` on May `d` 2024, as a report reads it now.
async fn on_may<S: Store>(l: &RateLimitLayer<ApiKeyHeader, S>, d: u8) -> [i64; 2] {
    let day = Date::new(2024, 5, d).unwrap();
    l.admin()
        .usage("p", day, day, Some("k"))
        .await
        .unwrap()
        .items["k"][0]
}

/// Key `k`'s days from May 1st to May `last` 2024, as a report reads them
/// now.
async fn may_until<S: Store>(l: &RateLimitLayer<ApiKeyHeader, S>, last: u8) -> Vec<[i64; 2]> {
    let (first, last) = (
        Date::new(2024, 5, 1).unwrap(),
        Date::new(2024, 5, last).unwrap(),
    );
    let report = l.admin().usage("p", first, last, Some("k")).await;
    report.unwrap().items["k"].clone()
}

/// Periods put anew days after the key's last request, one after another
/// with no request between them: each past day reads as a report read it
/// at its end, under the period and limit then (the day of the last request
/// under the old period, the days of each change under the new one, the
/// count carried where the new window holds the last request), and the
/// next request finds what the last day reported.
async fn periods_put_anew_between_requests_leave_past_days_as_they_were<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let day = std::time::Duration::from_secs(86_400);
    // Wednesday 2024-05-01.
    let l = layer_on(&clock, plan_of(10, Period::Day), b.store(&clock).await);
    let admin = l.admin();
    let mut then = Vec::new();
    l.decide(b"v", 3).await.unwrap();
    then.push(on_may(&l, 1).await);
    clock.advance(day);
    then.push(on_may(&l, 2).await);
    // Friday the 3rd: a month of 30, which holds the 1st.
    clock.advance(day);
    admin.put_plan(plan_of(30, Period::Month)).await.unwrap();
    then.push(on_may(&l, 3).await);
    clock.advance(day);
    then.push(on_may(&l, 4).await);
    // Sunday the 5th: weeks of 8 from Monday, the first of which holds the
    // 1st; then on the same day weeks of 9 from Sunday, which do not.
    clock.advance(day);
    admin.put_plan(plan_of(8, Period::WEEK)).await.unwrap();
    assert_eq!(on_may(&l, 5).await, [0, 5]);
    admin
        .put_plan(plan_of(9, Period::Week(tollgate::Weekday::Sunday)))
        .await
        .unwrap();
    then.push(on_may(&l, 5).await);
    clock.advance(day);
    then.push(on_may(&l, 6).await);
    assert_eq!(then, [[3, 7], [0, 10], [0, 27], [0, 27], [0, 9], [0, 9]]);
    assert_eq!(may_until(&l, 6).await, then);
    // Days later, and after a request (whose week began on the 5th).
    clock.advance(2 * day);
    l.decide(b"v", 2).await.unwrap();
    then.extend([[0, 9], [2, 7]]);
    assert_eq!(may_until(&l, 8).await, then);
}

/// Periods and limits put anew between requests and on the days of
/// requests: each past day reads as a report read it at its end, and what
/// remains today is what the next request finds.
async fn periods_put_anew_with_requests_leave_past_days_as_they_were<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let day = std::time::Duration::from_secs(86_400);
    // Wednesday 2024-05-01.
    let l = layer_on(&clock, plan_of(10, Period::Day), b.store(&clock).await);
    let admin = l.admin();
    let mut then = Vec::new();
    // The 1st: a week of 20 after the day's first requests.
    l.decide(b"v", 3).await.unwrap();
    admin.put_plan(plan_of(20, Period::WEEK)).await.unwrap();
    l.decide(b"v", 1).await.unwrap();
    assert_eq!(on_may(&l, 1).await, [4, 16]);
    then.push(on_may(&l, 1).await);
    // The 2nd: a month of 30 after a request; the count carries.
    clock.advance(day);
    l.decide(b"v", 2).await.unwrap();
    admin.put_plan(plan_of(30, Period::Month)).await.unwrap();
    then.push(on_may(&l, 2).await);
    // The 3rd: a day of 5 before a request.
    clock.advance(day);
    admin.put_plan(plan_of(5, Period::Day)).await.unwrap();
    assert_eq!(on_may(&l, 3).await, [0, 5]);
    l.decide(b"v", 1).await.unwrap();
    then.push(on_may(&l, 3).await);
    // The 4th: a month of 40, which holds the 3rd's request.
    clock.advance(day);
    admin.put_plan(plan_of(40, Period::Month)).await.unwrap();
    then.push(on_may(&l, 4).await);
    // Monday the 6th: weeks of 12, which begin after it; then 14.
    clock.advance(2 * day);
    admin.put_plan(plan_of(12, Period::WEEK)).await.unwrap();
    admin.put_plan(plan_of(14, Period::WEEK)).await.unwrap();
    then.push(on_may(&l, 6).await);
    clock.advance(day);
    assert_eq!(
        then,
        [[4, 16], [2, 24], [1, 4], [0, 39], [0, 14]],
        "as read on each day"
    );
    let mut want = then.clone();
    // The 5th, as read then: the month of 40.
    want.insert(4, [0, 39]);
    want.push([0, 14]);
    assert_eq!(may_until(&l, 7).await, want);
    // The next request finds what the 7th reports.
    l.decide(b"v", 14).await.unwrap();
    assert!(l.decide(b"v", 1).await.is_err());
}

/// A limit put anew days after the key's last request, then a period: the
/// count is carried into a window of the new period only as far as that
/// window holds the key's last request, not the day of the limit's change
/// (on every store alike), and the report reads each day as it did then.
async fn a_period_put_anew_after_a_limit_carries_from_the_last_request<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let day = std::time::Duration::from_secs(86_400);
    // Wednesday 2024-05-01.
    let l = layer_on(&clock, plan_of(10, Period::Month), b.store(&clock).await);
    let admin = l.admin();
    l.decide(b"v", 3).await.unwrap();
    // Monday the 20th, then Tuesday the 21st: weeks of 4 from Monday, which
    // begin after the 1st.
    clock.advance(19 * day);
    admin.put_plan(plan_of(20, Period::Month)).await.unwrap();
    assert_eq!(on_may(&l, 20).await, [0, 17]);
    clock.advance(day);
    admin.put_plan(plan_of(4, Period::WEEK)).await.unwrap();
    assert_eq!(on_may(&l, 21).await, [0, 4]);
    for _ in 0..4 {
        l.decide(b"v", 1).await.unwrap();
    }
    assert!(l.decide(b"v", 1).await.is_err());
    let mut want = vec![[3, 7]];
    want.extend([[0, 7]; 18]);
    want.extend([[0, 17], [4, 0]]);
    assert_eq!(may_until(&l, 21).await, want);
}

on_each_backend!(
    "range":
    update_usage_takes_up_to_2_pow_53_and_refuses_more_before_the_store,
    a_store_asked_for_more_than_2_pow_53_refuses_it_alike,
    reset_key_forgets_the_models_limits_too,
    put_plan_keeps_a_resolved_keys_emptied_bucket_empty,
    a_share_borrowed_before_a_throttle_is_put_anew_goes_back_converted,
    a_registered_keys_history_is_kept_when_its_id_is_resolved,
    a_window_older_than_the_history_still_reports_what_remained,
    a_limit_put_anew_leaves_past_days_as_they_were,
    a_limit_put_anew_shows_today_at_once,
    a_limit_put_anew_between_requests_shows_from_its_day,
    a_period_put_anew_reports_today_what_the_next_request_finds,
    a_limit_put_anew_on_the_day_of_the_last_request_holds_on_later_days,
    limits_put_anew_between_requests_hold_on_later_days,
    a_limit_put_anew_in_a_later_window_holds_from_its_day,
    a_peek_leaves_no_record_of_its_day,
    periods_put_anew_between_requests_leave_past_days_as_they_were,
    periods_put_anew_with_requests_leave_past_days_as_they_were,
    a_period_put_anew_after_a_limit_carries_from_the_last_request,
);
