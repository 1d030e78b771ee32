//! Never over-admit: whatever the interleaving of requests of random costs,
//! peeks, charges given back because another limit denied, token
//! reservations settled lower or higher than estimated, and a manual clock
//! moved by random steps, what the memory store admits stays within what the
//! limits allow.
//!
//! The bounds, in cost units:
//!
//! - A throttle of emission interval `T` (one unit refills every `T`) and
//!   burst `b` admits in any interval `[t0, t1]` that ends with a decision it
//!   let through at most `b + (t1 - t0) / T` units. Token settlements count
//!   as admitted cost: a request that reserved `e` and used `a <= e` counts
//!   `a` at its admission; one that used `a > e` counts `e` at its admission
//!   and the excess `a - e` (forced, into debt) when it is settled. Intervals
//!   are measured in real time, which a clock stepping backwards does not
//!   undo.
//! - A quota of `limit` admits at most `limit` units in one calendar window
//!   (the same counting for token quotas); a clock stepping back into an
//!   earlier window still counts in the latest window it reached.
//!
//! The request scenario also replays every decision on a model of the limits
//! in which peeks and denied requests never happened, and asserts that the
//! store decided each request exactly as the model does: a peek charges
//! nothing, a refunded charge leaves each bucket as it was at that instant,
//! and a new window starts from zero. Each test counts the situations its
//! cases met (refunds by each limit, renewed windows, the clock stepping
//! back, settlements low and high, late, the next day) and fails if one
//! never came up.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestCaseError, TestRunner};
use tollgate::extract::ApiKeyHeader;
use tollgate::{
    ApiKey, Clock, Date, ManualClock, MemoryStore, Period, Policy, Quota, RateLimitLayer,
    ResponseBody, Stage, Throttle, TokenBudget, UsagePlan, Weekday,
};
use tower::ServiceExt;

use crate::support::at;
use crate::support::tokens;

const S: u64 = 1_000_000_000;

/// How often each situation came up over all the cases of a test, so that
/// a test can show it did exercise what it claims to.
#[derive(Debug, Default)]
struct Seen(std::cell::RefCell<BTreeMap<&'static str, u64>>);

impl Seen {
    fn note(&self, what: &'static str) {
        *self.0.borrow_mut().entry(what).or_default() += 1;
    }

    /// Asserts that each of `what` came up at least `min` times (a floor
    /// far below what a run sees: the cases are random).
    fn assert_each(&self, what: &[&'static str], min: u64) {
        let seen = self.0.borrow();
        for w in what {
            let n = seen.get(w).copied().unwrap_or(0);
            assert!(n >= min, "only {n} cases of {w:?}: {seen:?}");
        }
    }
}

/// The runner's configuration: 96 cases by default (a few seconds in a
/// debug build), `PROPTEST_CASES=n` for n; failures are saved beside this
/// file (`never_over_admit.proptest-regressions`) and replayed first.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(96),
        source_file: Some(file!()),
        // Beside this file: proptest's default would put them in
        // `tests/proptest-regressions/never_over_admit.txt`, as this file is
        // a module of the crate whose root is `tests/stores/main.rs`.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}
const NANOS_PER_DAY: i64 = 86_400 * S as i64;

/// One admitted cost against a throttle.
#[derive(Debug, Clone, Copy)]
struct Charge {
    /// Real time (nanoseconds moved forward since the start).
    at: u64,
    units: u64,
    /// Whether a decision let it through (else it was forced: a settlement).
    checked: bool,
}

/// Asserts the GCRA bound over every interval that ends with a decision let
/// through: units admitted in `[t0, t1]` never exceed `burst + (t1 - t0) /
/// interval`, i.e. `units * interval <= burst * interval + (t1 - t0)`.
fn assert_gcra_bound(
    name: &str,
    charges: &[Charge],
    interval: u64,
    burst: u64,
) -> Result<(), TestCaseError> {
    for (j, last) in charges.iter().enumerate() {
        if !last.checked {
            continue;
        }
        let mut units = 0u128;
        for first in charges[..=j].iter().rev() {
            units += u128::from(first.units);
            let allowed = u128::from(burst * interval) + u128::from(last.at - first.at);
            prop_assert!(
                units * u128::from(interval) <= allowed,
                "{name}: {units} units admitted in {} ns (burst {burst}, one unit every {interval} ns)",
                last.at - first.at
            );
        }
    }
    Ok(())
}

/// One admitted cost against a quota, in the window it counts in.
#[derive(Debug, Clone, Copy)]
struct Count {
    window: i64,
    units: u64,
    checked: bool,
}

/// Asserts that no window ever counted more than `limit` units at the time
/// of a decision let through (forced settlements may go past it; the
/// decisions after them must then deny).
fn assert_quota_bound(name: &str, counts: &[Count], limit: u64) -> Result<(), TestCaseError> {
    for (j, last) in counts.iter().enumerate() {
        if !last.checked {
            continue;
        }
        let used: u64 = counts[..=j]
            .iter()
            .filter(|c| c.window == last.window)
            .map(|c| c.units)
            .sum();
        prop_assert!(
            used <= limit,
            "{name}: {used} units admitted in window {} (limit {limit})",
            last.window
        );
    }
    Ok(())
}

/// The calendar window holding `wall` (nanoseconds since the Unix epoch), as
/// a number that grows with time: UTC days, weeks from their first day,
/// months.
fn window_of(period: Period, wall: i64) -> i64 {
    let day = wall.div_euclid(NANOS_PER_DAY);
    match period {
        Period::Day => day,
        // 1970-01-05 was a Monday.
        Period::Week(first) => (day - 4 - first.days_from_monday()).div_euclid(7),
        Period::Month => {
            let d = Date::from_days(day);
            i64::from(d.year()) * 12 + i64::from(d.month())
        }
    }
}

fn wall_nanos(clock: &ManualClock) -> i64 {
    let d = clock.wall().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(d.as_nanos()).unwrap()
}

/// A time step: mostly within a burst's refill, sometimes minutes, now and
/// then days (across quota windows).
fn step() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 0..2 * S,
        2 => 0..120 * S,
        1 => 0..3 * 86_400 * S,
    ]
}

fn period() -> impl Strategy<Value = Period> {
    prop_oneof![
        Just(Period::Day),
        Just(Period::WEEK),
        Just(Period::Week(Weekday::Sunday)),
        Just(Period::Month),
    ]
}

// ---------------------------------------------------------------------------
// Requests of random costs: a stage throttle shared by two keys, each key's
// plan throttle and quota.
// ---------------------------------------------------------------------------

/// The stage throttle: 4 a second (one unit every 250 ms), bursts of 6.
const STAGE: (f64, u32, u64) = (4.0, 6, 250_000_000);
/// The plan throttle: 2 a second (one unit every 500 ms), bursts of 4.
const OWN: (f64, u32, u64) = (2.0, 4, 500_000_000);
/// The plan quota per window.
const QUOTA: u64 = 25;
const KEYS: [&str; 2] = ["value-0", "value-1"];

#[derive(Debug, Clone)]
enum Op {
    /// `check(key, cost)`: a request of `cost` units (0 peeks; 5 is more
    /// than the plan's bucket holds).
    Check { key: usize, cost: u32 },
    /// Both clocks move forward.
    Advance(u64),
    /// Both clocks step back (at most an hour).
    Rewind(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (0..KEYS.len(), prop_oneof![3 => 1..=2u32, 1 => 0..=5u32])
            .prop_map(|(key, cost)| Op::Check { key, cost }),
        6 => step().prop_map(Op::Advance),
        1 => prop_oneof![3 => 0..10 * S, 1 => 0..3_600 * S].prop_map(Op::Rewind),
    ]
}

/// A GCRA bucket as the model keeps it.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    interval: u64,
    burst: u32,
    tat: u64,
}

impl Bucket {
    fn new((_, burst, interval): (f64, u32, u64)) -> Self {
        Bucket {
            interval,
            burst,
            tat: 0,
        }
    }

    /// The bucket after a request of `cost` at `now`, if it fits: the
    /// theoretical arrival time moves `cost` intervals past the later of
    /// itself and now, and may run at most a whole bucket ahead of now.
    fn admit(&self, now: u64, cost: u32) -> Option<Bucket> {
        if cost > self.burst {
            return None;
        }
        let tat = self.tat.max(now) + u64::from(cost) * self.interval;
        (tat <= now + u64::from(self.burst) * self.interval).then_some(Bucket {
            tat: if cost == 0 { self.tat } else { tat },
            ..*self
        })
    }
}

/// A quota counter as the model keeps it: the latest window reached and what
/// it counted.
#[derive(Debug, Clone, Copy, Default)]
struct Counter {
    window: i64,
    used: u64,
}

impl Counter {
    /// Moves to `window` if it is a later one (an earlier one keeps counting
    /// in the latest window).
    fn roll(&mut self, window: i64) {
        if window > self.window {
            *self = Counter { window, used: 0 };
        }
    }
}

fn request_layer(clock: &ManualClock, period: Period) -> RateLimitLayer<ApiKeyHeader> {
    let policy = Policy::builder()
        .clock(clock.clone())
        .stage(Stage::new().throttle(Throttle::new(STAGE.0, STAGE.1).unwrap()))
        .plan(
            UsagePlan::new("p")
                .throttle(Throttle::new(OWN.0, OWN.1).unwrap())
                .quota(Quota::new(QUOTA, period).unwrap()),
        )
        .key(ApiKey::new("k0", KEYS[0], "p"))
        .key(ApiKey::new("k1", KEYS[1], "p"))
        .build()
        .unwrap();
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    RateLimitLayer::builder(policy).store(store).build()
}

fn run_requests(
    period: Period,
    start: SystemTime,
    ops: &[Op],
    seen: &Seen,
) -> Result<(), TestCaseError> {
    let clock = ManualClock::new();
    clock.set_wall(start);
    let mono = Clock::from(clock.clone());
    let layer = request_layer(&clock, period);

    let mut stage = Bucket::new(STAGE);
    let mut own = [Bucket::new(OWN); 2];
    let mut quota = [Counter::default(); 2];
    let mut real = 0u64;
    let mut stage_charges = Vec::new();
    let mut own_charges = [Vec::new(), Vec::new()];
    let mut counts = [Vec::new(), Vec::new()];

    for (i, op) in ops.iter().enumerate() {
        match *op {
            Op::Advance(by) => {
                clock.advance(Duration::from_nanos(by));
                real += by;
            }
            Op::Rewind(by) => {
                clock.rewind(Duration::from_nanos(by));
                seen.note("clock stepped back");
            }
            Op::Check { key, cost } => {
                let now = u64::try_from(mono.now().as_nanos()).unwrap();
                let got = layer.check(KEYS[key].as_bytes(), cost);
                // Every decision moves the quota to the window of its time.
                let before = quota[key];
                quota[key].roll(window_of(period, wall_nanos(&clock)));
                if before.used > 0 && quota[key].window != before.window {
                    seen.note("a used window renewed");
                }
                let fits = (
                    stage.admit(now, cost),
                    own[key].admit(now, cost),
                    quota[key].used + u64::from(cost) <= QUOTA,
                );
                let want = matches!(fits, (Some(_), Some(_), true));
                prop_assert_eq!(
                    got.is_ok(),
                    want,
                    "op {}: check(key {}, cost {}) at {} ns: store {:?}, model {:?}",
                    i,
                    key,
                    cost,
                    now,
                    got.err().map(|r| r.reason()),
                    fits
                );
                seen.note(match fits {
                    _ if cost == 0 => "peek",
                    (Some(_), Some(_), true) => "admitted",
                    (Some(_), Some(_), false) => "denied by the quota, throttles refunded",
                    (Some(_), None, _) if cost > OWN.1 => "too costly, stage refunded",
                    (Some(_), None, _) => "denied by the plan throttle, stage refunded",
                    (None, _, _) => "denied by the stage",
                });
                match fits {
                    // A request denied by a later limit gets back what the
                    // earlier throttles charged it: each bucket is as it was
                    // at `now` (one that was full stays full from `now` on,
                    // its TAT moved up to `now`; only a clock stepping back
                    // could tell the difference).
                    (Some(_), Some(_), false) if cost > 0 => {
                        stage.tat = stage.tat.max(now);
                        own[key].tat = own[key].tat.max(now);
                    }
                    (Some(_), None, _) if cost > 0 => stage.tat = stage.tat.max(now),
                    _ => {}
                }
                if let (Some(s), Some(o), true) = fits {
                    stage = s;
                    own[key] = o;
                    quota[key].used += u64::from(cost);
                    let charge = Charge {
                        at: real,
                        units: u64::from(cost),
                        checked: true,
                    };
                    stage_charges.push(charge);
                    own_charges[key].push(charge);
                    counts[key].push(Count {
                        window: quota[key].window,
                        units: u64::from(cost),
                        checked: true,
                    });
                }
            }
        }
    }
    assert_gcra_bound("stage", &stage_charges, STAGE.2, u64::from(STAGE.1))?;
    for key in 0..KEYS.len() {
        assert_gcra_bound("plan throttle", &own_charges[key], OWN.2, u64::from(OWN.1))?;
        assert_quota_bound("quota", &counts[key], QUOTA)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Token reservations settled through the layer: a request throttle and quota
// (whose denials give token charges back), a per-minute token bucket and a
// daily token quota.
// ---------------------------------------------------------------------------

/// The request throttle: 2 a second, bursts of 4.
const REQUESTS: (f64, u32, u64) = (2.0, 4, 500_000_000);
/// Requests a day.
const REQUEST_QUOTA: u64 = 40;
/// Tokens a minute (bursts of as many; one token every 600 ms).
const TOKENS_MINUTE: (u32, u64) = (100, 600_000_000);
/// Tokens a UTC day.
const TOKENS_DAY: u64 = 800;

#[derive(Debug, Clone)]
enum TokenOp {
    /// A request that reserves `estimate` tokens and reports `actual` (or
    /// nothing: the estimate stands). Its response ends at once, or is held
    /// open (`hold`) until an `End`.
    Send {
        estimate: u32,
        actual: Option<u64>,
        hold: bool,
    },
    /// The held response at this index (modulo how many are held) ends: its
    /// tokens are settled now.
    End(usize),
    /// `check(key, cost)` without a request: no tokens reserved; 0 peeks.
    Check(u32),
    Advance(u64),
}

fn token_op() -> impl Strategy<Value = TokenOp> {
    let estimate = prop_oneof![6 => 0..=60u32, 2 => 0..=100u32, 1 => 95..=110u32];
    let actual = prop_oneof![
        1 => Just(None),
        2 => (0..=60u64).prop_map(Some),
        1 => (0..=300u64).prop_map(Some),
    ];
    prop_oneof![
        10 => (estimate, actual, any::<bool>())
            .prop_map(|(estimate, actual, hold)| TokenOp::Send { estimate, actual, hold }),
        4 => any::<usize>().prop_map(TokenOp::End),
        2 => (0..=1u32).prop_map(TokenOp::Check),
        8 => prop_oneof![
            8 => 0..2 * S,
            2 => 0..120 * S,
            1 => 0..30 * 3_600 * S,
        ]
        .prop_map(TokenOp::Advance),
    ]
}

type Response = http::Response<ResponseBody<Full<Bytes>>>;

/// An admitted request, and how its tokens were settled.
#[derive(Debug, Clone, Copy)]
struct Reserved {
    estimate: u64,
    actual: Option<u64>,
    /// When its response ended (real time and window), if it did.
    ended: Option<(u64, i64)>,
}

impl Reserved {
    /// The tokens counted at its admission: what it used, when that was no
    /// more than the estimate and has been settled; else the estimate.
    fn at_admission(&self) -> u64 {
        match (self.actual, self.ended) {
            (Some(a), Some(_)) => a.min(self.estimate),
            _ => self.estimate,
        }
    }

    /// The excess charged when it was settled (an under-estimate).
    fn at_settlement(&self) -> Option<(u64, i64, u64)> {
        match (self.actual, self.ended) {
            (Some(a), Some((at, window))) if a > self.estimate => {
                Some((at, window, a - self.estimate))
            }
            _ => None,
        }
    }
}

/// What happened, in order.
#[derive(Debug, Clone, Copy)]
enum Event {
    /// Request `id` was admitted at real time `at`, in day window `window`.
    Admitted { id: usize, at: u64, window: i64 },
    /// Request `id` ended.
    Ended { id: usize },
    /// A `check` of `cost` request units was admitted (no tokens).
    Checked { cost: u64, at: u64, window: i64 },
}

fn token_service(
    clock: &ManualClock,
) -> (
    impl tower::Service<http::Request<String>, Response = Response, Error = std::convert::Infallible>
    + Clone,
    RateLimitLayer<ApiKeyHeader>,
) {
    let plan = UsagePlan::new("t")
        .throttle(Throttle::new(REQUESTS.0, REQUESTS.1).unwrap())
        .quota(Quota::new(REQUEST_QUOTA, Period::Day).unwrap())
        .tokens(
            TokenBudget::new()
                .per_minute(TOKENS_MINUTE.0)
                .unwrap()
                .per_day(TOKENS_DAY)
                .unwrap(),
        );
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(plan)
        .key(ApiKey::new("k", "kv", "t"))
        .build()
        .unwrap();
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    let layer = RateLimitLayer::builder(policy)
        .store(store)
        .estimator(tokens::estimate)
        .build();
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service_fn(tokens::report_actual);
    (svc, layer)
}

fn run_tokens(start: SystemTime, ops: &[TokenOp], seen: &Seen) -> Result<(), TestCaseError> {
    let clock = ManualClock::new();
    clock.set_wall(start);
    let (svc, layer) = token_service(&clock);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();

    let mut real = 0u64;
    let mut reserved: Vec<Reserved> = Vec::new();
    let mut held: Vec<(usize, Response)> = Vec::new();
    let mut events = Vec::new();
    let day = |clock: &ManualClock| window_of(Period::Day, wall_nanos(clock));

    for op in ops {
        match *op {
            TokenOp::Advance(by) => {
                clock.advance(Duration::from_nanos(by));
                real += by;
            }
            TokenOp::Send {
                estimate,
                actual,
                hold,
            } => {
                let res = rt
                    .block_on(svc.clone().oneshot(tokens::request("kv", estimate, actual)))
                    .unwrap();
                if res.status() != 200 {
                    continue;
                }
                let id = reserved.len();
                reserved.push(Reserved {
                    estimate: u64::from(estimate),
                    actual,
                    ended: None,
                });
                events.push(Event::Admitted {
                    id,
                    at: real,
                    window: day(&clock),
                });
                if hold {
                    held.push((id, res));
                } else {
                    // The body ends: its tokens are settled now.
                    drop(res);
                    reserved[id].ended = Some((real, day(&clock)));
                    events.push(Event::Ended { id });
                }
            }
            TokenOp::End(i) => {
                if held.is_empty() {
                    continue;
                }
                let (id, res) = held.remove(i % held.len());
                drop(res);
                reserved[id].ended = Some((real, day(&clock)));
                events.push(Event::Ended { id });
            }
            TokenOp::Check(cost) => {
                if layer.check(b"kv", cost).is_ok() {
                    events.push(Event::Checked {
                        cost: u64::from(cost),
                        at: real,
                        window: day(&clock),
                    });
                }
            }
        }
    }

    // The admitted cost of every limit, in the order it happened.
    let mut requests = Vec::new();
    let mut request_counts = Vec::new();
    let mut tokens = Vec::new();
    let mut token_counts = Vec::new();
    for e in &events {
        match *e {
            Event::Admitted { id, at, window } => {
                requests.push(Charge {
                    at,
                    units: 1,
                    checked: true,
                });
                request_counts.push(Count {
                    window,
                    units: 1,
                    checked: true,
                });
                let units = reserved[id].at_admission();
                tokens.push(Charge {
                    at,
                    units,
                    checked: true,
                });
                token_counts.push(Count {
                    window,
                    units,
                    checked: true,
                });
            }
            Event::Ended { id } => {
                if let Some((at, window, units)) = reserved[id].at_settlement() {
                    tokens.push(Charge {
                        at,
                        units,
                        checked: false,
                    });
                    token_counts.push(Count {
                        window,
                        units,
                        checked: false,
                    });
                }
            }
            Event::Checked { cost, at, window } => {
                requests.push(Charge {
                    at,
                    units: cost,
                    checked: true,
                });
                request_counts.push(Count {
                    window,
                    units: cost,
                    checked: true,
                });
                // A check reserves no tokens, but was decided against them.
                tokens.push(Charge {
                    at,
                    units: 0,
                    checked: true,
                });
                token_counts.push(Count {
                    window,
                    units: 0,
                    checked: true,
                });
            }
        }
    }
    assert_gcra_bound(
        "request throttle",
        &requests,
        REQUESTS.2,
        u64::from(REQUESTS.1),
    )?;
    assert_quota_bound("request quota", &request_counts, REQUEST_QUOTA)?;
    assert_gcra_bound(
        "tokens a minute",
        &tokens,
        TOKENS_MINUTE.1,
        u64::from(TOKENS_MINUTE.0),
    )?;
    assert_quota_bound("tokens a day", &token_counts, TOKENS_DAY)?;
    for e in &events {
        let Event::Admitted { id, at, window } = *e else {
            continue;
        };
        let r = reserved[id];
        let (Some(actual), Some((ended, ended_in))) = (r.actual, r.ended) else {
            continue;
        };
        if actual > r.estimate {
            seen.note("under-estimate settled");
        }
        if actual < r.estimate {
            seen.note("over-estimate settled");
            if ended >= at + 10 * S {
                seen.note("over-estimate settled 10 s or more later");
            }
            if ended_in > window {
                seen.note("over-estimate settled in a later day");
            }
        }
    }
    Ok(())
}

/// A start a few hours before a window ends: 2024-02-28 22:00 UTC, a
/// Wednesday, the day before a leap day; or 2024-03-31 20:00, a Sunday,
/// the last day of a month.
fn start() -> impl Strategy<Value = SystemTime> {
    prop_oneof![
        Just(at(2024, 2, 28, 22 * 3_600)),
        Just(at(2024, 3, 31, 20 * 3_600)),
    ]
}

#[test]
fn throttles_and_quotas_admit_no_more_than_their_bounds_and_exactly_what_the_model_does() {
    let seen = Seen::default();
    let cases = (period(), start(), prop::collection::vec(op(), 1..250));
    TestRunner::new(config())
        .run(&cases, |(period, start, ops)| {
            run_requests(period, start, &ops, &seen)
        })
        .unwrap();
    seen.assert_each(
        &[
            "admitted",
            "peek",
            "denied by the stage",
            "denied by the plan throttle, stage refunded",
            "too costly, stage refunded",
            "denied by the quota, throttles refunded",
            "a used window renewed",
            "clock stepped back",
        ],
        5,
    );
}

#[test]
fn token_reservations_and_settlements_admit_no_more_than_the_bounds() {
    let seen = Seen::default();
    let cases = (start(), prop::collection::vec(token_op(), 1..250));
    TestRunner::new(config())
        .run(&cases, |(start, ops)| run_tokens(start, &ops, &seen))
        .unwrap();
    seen.assert_each(
        &[
            "over-estimate settled",
            "under-estimate settled",
            "over-estimate settled 10 s or more later",
            "over-estimate settled in a later day",
        ],
        5,
    );
}
