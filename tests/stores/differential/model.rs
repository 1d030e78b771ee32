//! An executable model of DESIGN.md's "Semantics (decided)", written from
//! the design alone (none of the crate's own arithmetic), for the
//! differential test in `tests/stores/differential.rs`.
//!
//! Time is exact: nanoseconds as rationals. An emission interval is the
//! exact `1/rate` rounded up to a whole nanosecond (1/0.9 s is
//! 1,111,111,112 ns), as decided so that nothing is admitted before its
//! exact time; everything after is exact. A throttle is GCRA
//! on a theoretical arrival time (TAT): interval `T = 1/rate`, tolerance
//! `burst * T`; a request of cost `n` passes iff
//! `max(tat, now) + n*T <= now + burst*T`, which admits `burst` requests at
//! once and one more every `T` after. The smallest whole-nanosecond wait
//! after which it passes is `ceil(max(tat, now) + n*T - now - burst*T)`.
//!
//! A quota counts per UTC calendar window (`DAY`, `WEEK` from its first
//! day, `MONTH`); the window holding the plan's creation has `limit -
//! offset` (AWS `offset`). Counters belong to (plan, key): a key moved to
//! another plan counts there, and finds its counters again when it comes
//! back. An account's limits are shared by its keys, the stage's by every
//! caller; one decision passes stage → account → plan, or charges nothing.
//!
//! Where DESIGN is silent, the model does what AWS API Gateway does:
//! UpdateUsage sets what remains of the key's current window under its
//! current plan (above the limit too, for that window only), and a reset
//! forgets the key's windows and fills its buckets under its current plan
//! (AWS resets the quota; DESIGN's `Admin` resets every limit of the plan)
//! but keeps the window's offset, which belongs to the plan. A cost above
//! what remains but within what a raise left is admitted: a cost no limit
//! can *ever* hold is one above the quota's `limit` (the raise is for
//! this window only, so a later window could not hold it) and above what
//! remains now.

#![allow(dead_code, unreachable_pub)]

use std::cmp::Ordering;
use std::fmt;

pub const NANOS_PER_SEC: i128 = 1_000_000_000;
pub const NANOS_PER_DAY: i128 = 86_400 * NANOS_PER_SEC;
/// The retry a full concurrency cap advertises (its place comes back at an
/// unknown time; the crate documents `Retry-After: 1`).
pub const CONCURRENCY_RETRY_NS: u64 = 1_000_000_000;

/// An exact rational number `n / d`, `d > 0`, in lowest terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Q {
    n: i128,
    d: i128,
}

fn gcd(mut a: i128, mut b: i128) -> i128 {
    a = a.abs();
    b = b.abs();
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Q {
    pub fn new(n: i128, d: i128) -> Q {
        assert!(d != 0);
        let g = gcd(n, d).max(1);
        let s = if d < 0 { -1 } else { 1 };
        Q {
            n: s * n / g,
            d: s * d / g,
        }
    }
    pub fn int(n: i128) -> Q {
        Q { n, d: 1 }
    }
    pub fn add(self, o: Q) -> Q {
        Q::new(self.n * o.d + o.n * self.d, self.d * o.d)
    }
    pub fn sub(self, o: Q) -> Q {
        Q::new(self.n * o.d - o.n * self.d, self.d * o.d)
    }
    pub fn mul(self, k: i128) -> Q {
        Q::new(self.n * k, self.d)
    }
    pub fn max(self, o: Q) -> Q {
        if self >= o { self } else { o }
    }
    pub fn min(self, o: Q) -> Q {
        if self <= o { self } else { o }
    }
    /// The smallest integer `>= self`.
    pub fn ceil(self) -> i128 {
        self.n.div_euclid(self.d) + i128::from(self.n.rem_euclid(self.d) != 0)
    }
    /// The largest integer `<= self`.
    pub fn floor(self) -> i128 {
        self.n.div_euclid(self.d)
    }
    /// `floor(self / o)` for `o > 0`.
    pub fn div_floor(self, o: Q) -> i128 {
        (self.n * o.d).div_euclid(self.d * o.n)
    }
}

impl PartialOrd for Q {
    fn partial_cmp(&self, o: &Q) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for Q {
    fn cmp(&self, o: &Q) -> Ordering {
        (self.n * o.d).cmp(&(o.n * self.d))
    }
}

/// Why a request is refused, as DESIGN names the cases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    Limited,
    QuotaExceeded,
    CostExceedsLimit,
    ConcurrencyLimited,
}

/// One answer: allowed (with what the `RateLimit` header shows, when the
/// request came through HTTP), or denied by a named limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Allowed {
        /// `(candidates for the name, r, t)` of the tightest limit: the
        /// names tied for tightest (any of them may be shown).
        header: Option<Header>,
    },
    /// Denied: by one of `limits` (those tied for holding the request
    /// longest; any of them may be named), with its reason.
    Denied {
        limits: Vec<(&'static str, Why)>,
        retry_ns: Option<u64>,
    },
    /// Refused before any limit: a disabled key (403, charging nothing).
    Forbidden,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub names: Vec<&'static str>,
    pub r: u64,
    pub t: u64,
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Allowed { header: None } => write!(f, "allowed"),
            Answer::Allowed { header: Some(h) } => {
                write!(
                    f,
                    "allowed, RateLimit {}; r={}; t={}",
                    h.names.join("|"),
                    h.r,
                    h.t
                )
            }
            Answer::Denied { limits, retry_ns } => {
                let names: Vec<String> = limits
                    .iter()
                    .map(|(name, why)| format!("{name} ({why:?})"))
                    .collect();
                write!(f, "denied by {}, retry {retry_ns:?} ns", names.join(" or "))
            }
            Answer::Forbidden => write!(f, "forbidden"),
        }
    }
}

/// A throttle (GCRA): the plan's, a method override's, or a token budget's
/// per-minute bucket.
#[derive(Clone, Debug)]
pub struct Bucket {
    pub name: &'static str,
    /// Emission interval in nanoseconds.
    pub interval: Q,
    pub burst: u32,
    /// `None`: a key never seen, a full bucket.
    pub tat: Option<Q>,
    /// Each change of its numbers: when, and its tolerance before and
    /// after (a settlement reserved before a change is converted through
    /// it).
    pub changes: Vec<(Q, Q, Q)>,
}

impl Bucket {
    /// `rate = num/den` per second: interval `1e9 * den / num` ns.
    pub fn per_second(name: &'static str, num: u32, den: u32, burst: u32) -> Bucket {
        Bucket {
            name,
            // The issue that settled rounding decided: whole nanoseconds,
            // rounded up, so that nothing passes before its exact time.
            interval: Q::int(Q::new(NANOS_PER_SEC * i128::from(den), i128::from(num)).ceil()),
            burst,
            tat: None,
            changes: Vec::new(),
        }
    }

    /// The bucket under `new`'s numbers, keeping the share in use at `now`
    /// (debt included), rounded down to a whole nanosecond.
    fn rescale(&mut self, now: Q, new: &Bucket) {
        let (old, fresh) = (self.tolerance(), new.tolerance());
        self.tat = self.tat.map(|tat| {
            if tat <= now {
                return tat;
            }
            // A bucket in debt keeps its debt, scaled as the rest.
            let ahead = tat.sub(now);
            now.add(Q::int(ahead.mul(fresh.ceil()).div_floor(old)))
        });
        self.changes.push((now, old, fresh));
        self.interval = new.interval;
        self.burst = new.burst;
    }

    /// A settlement reserved when the bucket had seen `seen` changes of its
    /// numbers, of `shift` ns of its time line then and whose own share
    /// ended at `share_end`, converted through each change since as the
    /// share in use was: the shift scaled to the new tolerance, the end of
    /// the share as a TAT, each rounded down to a whole nanosecond.
    fn convert(&self, seen: usize, shift: Q, share_end: Q) -> (Q, Q) {
        let (mut shift, mut end) = (shift, share_end);
        for &(at, old, fresh) in &self.changes[seen..] {
            shift = Q::int(shift.mul(fresh.ceil()).div_floor(old));
            if end > at {
                end = at.add(Q::int(end.sub(at).mul(fresh.ceil()).div_floor(old)));
            }
        }
        (shift, end)
    }

    fn tolerance(&self) -> Q {
        self.interval.mul(i128::from(self.burst))
    }

    fn base(&self, now: Q) -> Q {
        self.tat.map_or(now, |t| t.max(now))
    }

    /// `Ok(new tat)`, or the exact wait, or `None` for a cost the bucket can
    /// never hold.
    fn check(&self, now: Q, cost: u32) -> Result<Q, Option<Q>> {
        if cost > self.burst {
            return Err(None);
        }
        let new = self.base(now).add(self.interval.mul(i128::from(cost)));
        let limit = now.add(self.tolerance());
        if new <= limit {
            Ok(new)
        } else {
            Err(Some(new.sub(limit)))
        }
    }

    /// `(remaining, reset ns)` after the bucket stands at `tat`.
    fn status(&self, now: Q, tat: Q) -> (u64, Q) {
        let ahead = tat.sub(now).max(Q::int(0));
        let free = self.tolerance().sub(ahead);
        let r = if free < Q::int(0) {
            0
        } else {
            free.div_floor(self.interval).min(i128::from(self.burst))
        };
        (r as u64, ahead)
    }
}

/// A quota's calendar period, as DESIGN states it: a UTC `DAY` from 00:00,
/// a `WEEK` from 00:00 of its first day (Monday by default), a `MONTH` from
/// the 1st at 00:00.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Period {
    Day,
    /// A week from this day: 0 is Monday, 6 Sunday.
    Week(u32),
    Month,
}

/// `(year, month, day)` of a day number (days since 1970-01-01), in the
/// proleptic Gregorian calendar (H. Hinnant's `civil_from_days`).
pub fn civil(days: i128) -> (i128, i128, i128) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i128::from(m <= 2), m, d)
}

/// The day number of a date (H. Hinnant's `days_from_civil`).
pub fn days(y: i128, m: i128, d: i128) -> i128 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The window of `period` holding wall time `wall` (ns since the epoch):
/// `(start, end)` in ns, `start <= wall < end`.
pub fn window(period: Period, wall: i128) -> (i128, i128) {
    let day = wall.div_euclid(NANOS_PER_DAY);
    let (first, next) = match period {
        Period::Day => (day, day + 1),
        Period::Week(from) => {
            // 1970-01-01 was a Thursday: 3 days after a Monday.
            let weekday = (day + 3).rem_euclid(7);
            let first = day - (weekday - i128::from(from)).rem_euclid(7);
            (first, first + 7)
        }
        Period::Month => {
            let (y, m, _) = civil(day);
            let next = if m == 12 {
                days(y + 1, 1, 1)
            } else {
                days(y, m + 1, 1)
            };
            (days(y, m, 1), next)
        }
    };
    (first * NANOS_PER_DAY, next * NANOS_PER_DAY)
}

/// An AWS methodPath: `"/v1/completions/POST"`, a `*` segment for any
/// one segment, `"/*"` for every route, a `*` method for every method.
#[derive(Clone, Debug)]
pub struct MethodPath {
    /// `None`: every route; else each segment, `None` for `*`.
    pub segments: Option<Vec<Option<&'static str>>>,
    /// `None`: every method.
    pub method: Option<&'static str>,
}

impl MethodPath {
    pub fn parse(s: &'static str) -> MethodPath {
        let (path, method) = s.rsplit_once('/').unwrap();
        MethodPath {
            segments: (path != "/*").then(|| {
                path[1..]
                    .split('/')
                    .map(|seg| (seg != "*").then_some(seg))
                    .collect()
            }),
            method: (method != "*").then_some(method),
        }
    }

    /// Whether the pattern's method takes a request of `method`: its own,
    /// and a `GET` pattern a `HEAD` request too (axum answers HEAD with the
    /// GET handler: the crate documents that a GET override holds it).
    fn serves(&self, method: &str) -> bool {
        self.method
            .is_none_or(|m| m == method || (m == "GET" && method == "HEAD"))
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        if !self.serves(method) {
            return false;
        }
        let Some(segments) = &self.segments else {
            return true;
        };
        let parts: Vec<&str> = path[1..].split('/').collect();
        parts.len() == segments.len()
            && segments
                .iter()
                .zip(&parts)
                .all(|(s, p)| s.is_none_or(|s| s == *p))
    }

    /// How specific the pattern is for a request of `method` (AWS: the
    /// most specific setting wins): a route over every route, then more
    /// literal segments, then the request's own method over `GET` (for a
    /// `HEAD` request) over `*`.
    fn rank(&self, method: &str) -> (bool, usize, u8) {
        let literal = self
            .segments
            .as_ref()
            .map_or(0, |s| s.iter().filter(|s| s.is_some()).count());
        let own = match self.method {
            Some(m) if m == method => 2,
            Some(_) => 1,
            None => 0,
        };
        (self.segments.is_some(), literal, own)
    }
}

/// A calendar quota: the request quota (a plan's or an account's) or a
/// token budget's `per_day`.
#[derive(Clone, Debug)]
pub struct CalendarQuota {
    pub name: &'static str,
    pub limit: u64,
    pub period: Period,
    /// AWS `offset`: deducted from the limit of the window holding
    /// `created`, the plan's creation.
    pub offset: u64,
    pub created: i128,
    /// `(start of the day of the last change, used in its window)`: used may exceed the limit (a settled
    /// debt), or fall below 0 (UpdateUsage raised what remains above the
    /// limit).
    pub used: Option<(i128, i128)>,
}

impl CalendarQuota {
    pub fn new(name: &'static str, limit: u64, period: Period) -> CalendarQuota {
        CalendarQuota {
            name,
            limit,
            period,
            offset: 0,
            created: 0,
            used: None,
        }
    }

    fn window(&self, wall: i128) -> (i128, i128) {
        window(self.period, wall)
    }

    /// The limit of the window holding `wall`.
    fn limit_at(&self, wall: i128) -> i128 {
        let (start, end) = self.window(wall);
        let limit = i128::from(self.limit);
        if start <= self.created && self.created < end {
            limit - i128::from(self.offset)
        } else {
            limit
        }
    }

    /// The count, if the window of the period in force at `wall` holds the
    /// day of its last change (a period changed since keeps the count in
    /// its window holding that day, and starts from 0 in a later one).
    fn used_at(&self, wall: i128) -> i128 {
        match self.used {
            Some((last, u)) if self.window(wall).0 <= last => u,
            _ => 0,
        }
    }

    fn set_used(&mut self, wall: i128, used: i128) {
        self.used = Some((wall.div_euclid(NANOS_PER_DAY) * NANOS_PER_DAY, used));
    }

    /// What remains of the window holding `wall` (never below 0).
    fn remaining_at(&self, wall: i128) -> u64 {
        (self.limit_at(wall) - self.used_at(wall)).max(0) as u64
    }

    fn to_end(&self, wall: i128) -> Q {
        Q::int(self.window(wall).1 - wall)
    }
}

/// The limits of one plan (or of an account, or of the stage: names tell
/// them apart), and the state of one subject (a key, the account, every
/// caller) under them.
#[derive(Clone, Debug, Default)]
pub struct Limits {
    /// The plan-wide throttle.
    pub throttle: Option<Bucket>,
    /// A method override's throttle, applying to requests on its route.
    pub method: Option<Bucket>,
    /// Method overrides by AWS methodPath, wildcards included: of those
    /// matching a request, the most specific one applies (its bucket
    /// besides the plan-wide throttle).
    pub overrides: Vec<(MethodPath, Bucket)>,
    /// The token budget's per-minute bucket.
    pub tokens_minute: Option<Bucket>,
    pub quota: Option<CalendarQuota>,
    pub tokens_day: Option<CalendarQuota>,
    /// The token budget's `per_month`: a calendar quota counted in tokens.
    pub tokens_month: Option<CalendarQuota>,
    /// `(cap, places held)`.
    pub concurrency: Option<(u32, u32)>,
    /// The throttle of the plan's one named model, applying to requests
    /// to that model in any spelling that names it.
    pub model: Option<Bucket>,
    /// The request quota of the plan's one named model.
    pub model_quota: Option<CalendarQuota>,
    /// These are the limits of the plan's named model (its token budget,
    /// its cap), counted per (plan, key, model), not the plan's own.
    pub named_model: bool,
    /// A shadow plan's limits (DESIGN "shadow mode"): decided, counted and
    /// reported, never rejecting. A request one of them would deny passes:
    /// a throttle that would deny is not charged (the request is decided
    /// as if enforced, so that what the shadow reports is what enforcing
    /// would do), a quota counts it past its limit, a cap takes a place
    /// past it; each is reported as it stands.
    pub shadow: bool,
}

/// One key: the plan it is on and its state under each plan (counters
/// belong to (plan, key): a key moved away and back finds them again).
#[derive(Clone, Debug)]
pub struct Key {
    /// An anonymous client (by IP), under the anonymous plan alone.
    pub anonymous: bool,
    pub on: usize,
    pub enabled: bool,
    /// Whether it belongs to the account.
    pub account: bool,
    pub plans: Vec<Limits>,
    /// Under each plan, the limits of its named model a request to that
    /// model passes besides (a token budget, a concurrency cap); empty
    /// when there are none.
    pub models: Vec<Limits>,
    /// Under each plan, the limits of its `"*"` entry, which every model
    /// the plan does not name shares (a request naming no model
    /// included); empty when there are none.
    pub others: Vec<Limits>,
}

/// The plans, the account and the stage under test, and the state of
/// their keys.
#[derive(Clone, Debug)]
pub struct Model {
    /// Shared by every caller (DESIGN "stage limits").
    pub stage: Option<Limits>,
    /// Shared by the keys of the account (DESIGN "accounts").
    pub account: Option<Limits>,
    pub keys: Vec<Key>,
    /// Wall time (ns since the Unix epoch) at monotonic 0.
    pub wall0: i128,
    /// Nanoseconds since the start.
    pub now: i128,
}

/// What a request asks for.
#[derive(Clone, Copy, Debug)]
pub struct Ask {
    /// The key asking (its index).
    pub key: usize,
    /// Units charged to request limits (throttles, method, quota).
    pub cost: u32,
    /// Tokens charged to the token budget.
    pub tokens: u32,
    /// On the route of the method override.
    pub on_route: bool,
    /// The request's HTTP method and path (`""`: no route, a direct
    /// decision, which no method override holds).
    pub method: &'static str,
    pub path: &'static str,
    /// Takes a place under the concurrency cap until its response ends
    /// (a request through the layer); a direct decision gives it back at once.
    pub holds: bool,
    /// The answer shows the `RateLimit` header.
    pub http: bool,
    /// To the plan's named model.
    pub model: bool,
    /// To a model the plan does not name (or none): its `"*"` entry
    /// applies, if it has one.
    pub other_model: bool,
}

/// What an admitted request holds until its response ends: a place under
/// its plan's cap, and its tokens to settle, in the plan that decided it
/// (the key may have moved since).
#[derive(Clone, Copy, Debug)]
pub struct Reservation {
    pub key: usize,
    pub plan: usize,
    pub at: i128,
    pub estimate: u32,
    /// The plan's token budget as the decision found it.
    pub share: Share,
    /// The account's token budget as the decision found it, when the key
    /// belongs to the account (its tokens are settled there too).
    pub account: Option<Share>,
    /// The named model's, when the request was to it and the plan gives
    /// it a token budget or a cap (its place and tokens come back there).
    pub model: Option<Share>,
    /// The `"*"` entry's, when the request was to a model the plan does
    /// not name and the plan has that entry.
    pub other: Option<Share>,
}

/// A token budget (a plan's or an account's) as a decision found it: what
/// its settlement is weighed by.
#[derive(Clone, Copy, Debug)]
pub struct Share {
    /// The start of the token quotas' windows at the decision: the day's,
    /// the month's.
    pub window: i128,
    pub month: i128,
    /// The per-minute bucket's emission interval at the decision, and how
    /// many changes of its numbers it had seen.
    pub interval: Q,
    pub changes: usize,
    /// Whether the per-minute bucket was charged the estimate: a shadow
    /// bucket that would have denied it was not, and the settlement of a
    /// request enforcing would have refused changes nothing there.
    pub charged: bool,
}

impl Share {
    fn of(limits: &Limits, wall: i128) -> Share {
        let window = limits.tokens_day.as_ref().map_or(0, |q| q.window(wall).0);
        let month = limits.tokens_month.as_ref().map_or(0, |q| q.window(wall).0);
        let (interval, changes) = limits
            .tokens_minute
            .as_ref()
            .map_or((Q::int(0), 0), |b| (b.interval, b.changes.len()));
        Share {
            charged: true,
            window,
            month,
            interval,
            changes,
        }
    }
}

enum Denial {
    TooCostly,
    Wait(Q),
}

/// A denial found by one limit: `(name, reason, outcome)`.
type Found = (&'static str, Why, Denial);

/// A header item: `(name, remaining, reset, is a rate limit)`.
type Item = (&'static str, u64, Q, bool);

impl Limits {
    /// The buckets a request asks for, with their slot and cost.
    fn buckets(&self, ask: &Ask) -> [(usize, Option<&Bucket>, u32); 5] {
        let chosen = self.chosen(ask);
        [
            (0, self.throttle.as_ref(), ask.cost),
            (1, self.method.as_ref().filter(|_| ask.on_route), ask.cost),
            (2, self.tokens_minute.as_ref(), ask.tokens),
            (3, self.model.as_ref().filter(|_| ask.model), ask.cost),
            (
                4 + chosen.unwrap_or(0),
                chosen.map(|i| &self.overrides[i].1),
                ask.cost,
            ),
        ]
    }

    /// The override that applies to the request: the most specific of
    /// those matching it.
    fn chosen(&self, ask: &Ask) -> Option<usize> {
        if ask.path.is_empty() {
            return None;
        }
        let matching = self
            .overrides
            .iter()
            .enumerate()
            .filter(|(_, (p, _))| p.matches(ask.method, ask.path));
        let best = matching
            .clone()
            .map(|(_, (p, _))| p.rank(ask.method))
            .max()?;
        let mut ties = matching.filter(|(_, (p, _))| p.rank(ask.method) == best);
        let first = ties.next().map(|(i, _)| i);
        assert!(ties.next().is_none(), "overrides tied for a request");
        first
    }

    /// Checks every limit; returns the new TATs of the buckets that pass.
    fn check(&self, now: Q, wall: i128, ask: &Ask, denials: &mut Vec<Found>) -> Vec<(usize, Q)> {
        let mut tats = Vec::new();
        for (i, b, cost) in self.buckets(ask) {
            let Some(b) = b else { continue };
            match b.check(now, cost) {
                Ok(t) => tats.push((i, t)),
                Err(None) => denials.push((b.name, Why::CostExceedsLimit, Denial::TooCostly)),
                Err(Some(w)) => denials.push((b.name, Why::Limited, Denial::Wait(w))),
            }
        }
        let model_quota = self.model_quota.as_ref().filter(|_| ask.model);
        for (q, cost) in [
            (self.quota.as_ref(), ask.cost),
            (self.tokens_day.as_ref(), ask.tokens),
            (self.tokens_month.as_ref(), ask.tokens),
            (model_quota, ask.cost),
        ] {
            let Some(q) = q else { continue };
            let cost = i128::from(cost);
            if q.used_at(wall) + cost <= q.limit_at(wall) {
                // Fits what remains now (above the limit after a raise by
                // UpdateUsage included).
            } else if cost > i128::from(q.limit) {
                // No window's limit holds it: only the window of the plan's
                // creation has another, lower one (the offset).
                denials.push((q.name, Why::CostExceedsLimit, Denial::TooCostly));
            } else {
                denials.push((q.name, Why::QuotaExceeded, Denial::Wait(q.to_end(wall))));
            }
        }
        if let Some((cap, held)) = self.concurrency {
            if held >= cap {
                denials.push((
                    self.cap_name(),
                    Why::ConcurrencyLimited,
                    Denial::Wait(Q::int(i128::from(CONCURRENCY_RETRY_NS))),
                ));
            }
        }
        tats
    }

    /// Charges an admitted request (a peek charges nothing: its new TAT is
    /// max(tat, now) and nothing is stored); pushes how each limit stands.
    fn charge(
        &mut self,
        now: Q,
        wall: i128,
        ask: &Ask,
        tats: &[(usize, Q)],
        items: &mut Vec<Item>,
    ) {
        let cap_name = self.cap_name();
        if self.shadow {
            // A shadow throttle that would deny is not charged: reported
            // as it stands.
            for (i, b, _) in self.buckets(ask) {
                let Some(b) = b else { continue };
                if tats.iter().all(|&(j, _)| j != i) {
                    let (r, reset) = b.status(now, b.base(now));
                    items.push((b.name, r, reset, true));
                }
            }
        }
        for &(i, t) in tats {
            let cost = if i == 2 { ask.tokens } else { ask.cost };
            let b = match i {
                0 => self.throttle.as_mut(),
                1 => self.method.as_mut(),
                2 => self.tokens_minute.as_mut(),
                3 => self.model.as_mut(),
                i => Some(&mut self.overrides[i - 4].1),
            }
            .unwrap();
            if cost > 0 {
                b.tat = Some(t);
            }
            let (r, reset) = b.status(now, t);
            items.push((b.name, r, reset, true));
        }
        let model_quota = self.model_quota.as_mut().filter(|_| ask.model);
        for (q, cost) in [
            (self.quota.as_mut(), ask.cost),
            (self.tokens_day.as_mut(), ask.tokens),
            (self.tokens_month.as_mut(), ask.tokens),
            (model_quota, ask.cost),
        ] {
            let Some(q) = q else { continue };
            if cost > 0 {
                let used = q.used_at(wall) + i128::from(cost);
                q.set_used(wall, used);
            }
            // A window's reset is its end (the IETF draft's `t` of a
            // quota: when it resets), used or not.
            items.push((q.name, q.remaining_at(wall), q.to_end(wall), true));
        }
        if let Some((cap, held)) = &mut self.concurrency {
            let after = if ask.holds { *held + 1 } else { *held };
            if ask.holds {
                *held = after;
            }
            // Past a shadow cap, none remain.
            items.push((
                cap_name,
                u64::from(cap.saturating_sub(after)),
                Q::int(0),
                false,
            ));
        }
    }

    fn cap_name(&self) -> &'static str {
        if self.named_model {
            "model-concurrency"
        } else {
            "concurrency"
        }
    }

    fn budget(&self) -> bool {
        self.tokens_minute.is_some() || self.tokens_day.is_some() || self.tokens_month.is_some()
    }

    /// A response ends: its tokens are settled at `actual` (none reported:
    /// the estimate stands), as `share` weighs them.
    fn settle(
        &mut self,
        now: Q,
        wall: i128,
        res: &Reservation,
        share: &Share,
        actual: Option<u32>,
    ) {
        let Some(actual) = actual.filter(|_| self.budget()) else {
            return;
        };
        let delta = i128::from(actual) - i128::from(res.estimate);
        // The settlement as the reservation's numbers weigh it, converted
        // to the numbers in force (a plan put anew since): the difference
        // on the bucket's time line, and the end of the estimate's share.
        let converted = self
            .tokens_minute
            .as_ref()
            .filter(|_| share.charged)
            .map(|b| {
                let shift = share.interval.mul(delta.abs());
                let share_end = Q::int(res.at).add(share.interval.mul(i128::from(res.estimate)));
                b.convert(share.changes, shift, share_end)
            });
        if delta > 0 {
            // An under-estimate is charged past the limit: a debt.
            if let (Some(b), Some((shift, _))) = (&mut self.tokens_minute, converted) {
                let base = b.base(now);
                b.tat = Some(base.add(shift));
            }
            for q in [&mut self.tokens_day, &mut self.tokens_month]
                .into_iter()
                .flatten()
            {
                let used = q.used_at(wall) + delta;
                q.set_used(wall, used);
            }
        } else if delta < 0 {
            let refund = -delta;
            // Only the estimate's own share not yet refilled comes back
            // (what refilled since may have been granted again), and never
            // beyond a full bucket.
            if let (Some(b), Some((shift, share_end))) = (&mut self.tokens_minute, converted) {
                if let Some(tat) = b.tat {
                    let give = shift.min(share_end.sub(now).max(Q::int(0)));
                    b.tat = Some(tat.sub(give).max(now.min(tat)));
                }
            }
            // A quota gets back only what its own window counted, never
            // below nothing.
            for (q, window) in [
                (&mut self.tokens_day, share.window),
                (&mut self.tokens_month, share.month),
            ] {
                let Some(q) = q else { continue };
                if q.window(wall).0 == window {
                    let used = (q.used_at(wall) - refund).max(0);
                    q.set_used(wall, used);
                }
            }
        }
    }

    /// AWS UpdateUsage: what remains of the current window becomes
    /// `remaining` (above the limit too: a raise for this window only).
    fn set_remaining(&mut self, wall: i128, remaining: u64) -> Option<u64> {
        let q = self.quota.as_mut()?;
        let used = q.limit_at(wall) - i128::from(remaining);
        q.set_used(wall, used);
        Some(remaining)
    }

    /// A reset key: its windows forgotten, its buckets full; places in
    /// flight stay held.
    fn reset(&mut self) {
        for b in [
            &mut self.throttle,
            &mut self.method,
            &mut self.tokens_minute,
            &mut self.model,
        ]
        .into_iter()
        .flatten()
        {
            b.tat = None;
        }
        for (_, b) in &mut self.overrides {
            b.tat = None;
        }
        for q in [
            &mut self.quota,
            &mut self.tokens_day,
            &mut self.tokens_month,
            &mut self.model_quota,
        ]
        .into_iter()
        .flatten()
        {
            q.used = None;
        }
    }
}

impl Model {
    pub fn wall(&self) -> i128 {
        self.wall0 + self.now
    }

    pub fn advance(&mut self, by: u64) {
        self.now += i128::from(by);
    }

    /// The limits a request of `key` must pass, in decision order: stage →
    /// account → plan → model (the method override and the key's own
    /// limits are the plan's; the named model's budget and cap apply to a
    /// request to it).
    fn parts(&mut self, key: usize, model: bool, other: bool) -> Vec<&mut Limits> {
        let Model {
            stage,
            account,
            keys,
            ..
        } = self;
        let k = &mut keys[key];
        let mut parts: Vec<&mut Limits> = stage.iter_mut().collect();
        if k.account {
            parts.extend(account.iter_mut());
        }
        parts.push(&mut k.plans[k.on]);
        if model {
            parts.extend(k.models.get_mut(k.on));
        }
        if other {
            parts.extend(k.others.get_mut(k.on));
        }
        parts
    }

    /// One decision over every limit, atomically.
    pub fn decide(&mut self, ask: Ask) -> (Answer, Option<Reservation>) {
        let (answer, reservation, _) = self.decide_standing(ask);
        (answer, reservation)
    }

    /// How `key`'s limits stand (DESIGN "peek": a decision of cost 0
    /// through no route, naming no model, so that its plan's `"*"` entry
    /// applies): `Ok` with each limit's `(name, remaining, ns to full)`,
    /// the cap's free places included, or the refusal of a request of
    /// cost 0 (a full cap, a quota used up, a bucket in debt).
    pub fn standing(&mut self, key: usize) -> Result<Vec<(&'static str, u64, u64)>, Answer> {
        let ask = Ask {
            key,
            cost: 0,
            tokens: 0,
            on_route: false,
            method: "",
            path: "",
            holds: false,
            http: false,
            model: false,
            other_model: true,
        };
        match self.decide_standing(ask) {
            (Answer::Allowed { .. }, _, items) => Ok(items
                .iter()
                .map(|&(name, r, reset, _)| (name, r, reset.ceil().max(0) as u64))
                .collect()),
            (answer, _, _) => Err(answer),
        }
    }

    /// [`decide`](Self::decide), with how each limit stands after it.
    fn decide_standing(&mut self, ask: Ask) -> (Answer, Option<Reservation>, Vec<Item>) {
        if !self.keys[ask.key].enabled {
            // A disabled key is refused before any limit is asked.
            return (Answer::Forbidden, None, Vec::new());
        }
        let now = Q::int(self.now);
        let wall = self.wall();
        let mut denials: Vec<Found> = Vec::new();
        let k = &self.keys[ask.key];
        // A shadow token bucket that would deny the estimate is not
        // charged it (the plan's, its named model's, its `"*"` entry's).
        let charges = |l: Option<&Limits>| {
            !l.is_some_and(|l| {
                l.shadow
                    && l.tokens_minute
                        .as_ref()
                        .is_some_and(|b| b.check(now, ask.tokens).is_err())
            })
        };
        let charged = [
            charges(Some(&k.plans[k.on])),
            charges(k.models.get(k.on)),
            charges(k.others.get(k.on)),
        ];
        let mut parts = self.parts(ask.key, ask.model, ask.other_model);
        let tats: Vec<Vec<(usize, Q)>> = parts
            .iter()
            .map(|p| {
                // A shadow limit never denies, nor names a denial.
                let mut unheard = Vec::new();
                let denials = if p.shadow { &mut unheard } else { &mut denials };
                p.check(now, wall, &ask, denials)
            })
            .collect();
        if !denials.is_empty() {
            // A cost no limit can ever hold wins, with no retry; else the
            // longest wait (in whole nanoseconds, rounded up). Limits tied
            // for it are equally right to name.
            let costly: Vec<_> = denials
                .iter()
                .filter(|d| matches!(d.2, Denial::TooCostly))
                .map(|d| (d.0, d.1))
                .collect();
            if !costly.is_empty() {
                return (
                    Answer::Denied {
                        limits: costly,
                        retry_ns: None,
                    },
                    None,
                    Vec::new(),
                );
            }
            let wait = |d: &Denial| match d {
                Denial::Wait(w) => w.ceil(),
                Denial::TooCostly => unreachable!(),
            };
            let longest = denials.iter().map(|d| wait(&d.2)).max().unwrap();
            let limits = denials
                .iter()
                .filter(|d| wait(&d.2) == longest)
                .map(|d| (d.0, d.1))
                .collect();
            return (
                Answer::Denied {
                    limits,
                    retry_ns: Some(longest as u64),
                },
                None,
                Vec::new(),
            );
        }
        // Allowed: charge everything.
        let mut items: Vec<Item> = Vec::new();
        for (p, tats) in parts.iter_mut().zip(&tats) {
            p.charge(now, wall, &ask, tats, &mut items);
        }
        let header = ask.http.then(|| tightest(&items)).flatten();
        let k = &self.keys[ask.key];
        let account = match &self.account {
            Some(a) if k.account => Some(Share::of(a, wall)),
            _ => None,
        };
        let reservation = ask.holds.then_some(Reservation {
            key: ask.key,
            plan: k.on,
            at: self.now,
            estimate: ask.tokens,
            share: Share {
                charged: charged[0],
                ..Share::of(&k.plans[k.on], wall)
            },
            account,
            model: k.models.get(k.on).filter(|_| ask.model).map(|m| Share {
                charged: charged[1],
                ..Share::of(m, wall)
            }),
            other: k
                .others
                .get(k.on)
                .filter(|_| ask.other_model)
                .map(|m| Share {
                    charged: charged[2],
                    ..Share::of(m, wall)
                }),
        });
        (Answer::Allowed { header }, reservation, items)
    }

    /// A response ends: its place under the cap of the plan that admitted
    /// it comes back and its tokens are settled there at `actual` (none
    /// reported: the estimate stands).
    pub fn end(&mut self, res: Reservation, actual: Option<u32>) {
        let now = Q::int(self.now);
        let wall = self.wall();
        let plan = &mut self.keys[res.key].plans[res.plan];
        if let Some((_, held)) = &mut plan.concurrency {
            *held -= 1;
        }
        plan.settle(now, wall, &res, &res.share, actual);
        if let (Some(a), Some(share)) = (&mut self.account, &res.account) {
            a.settle(now, wall, &res, share, actual);
        }
        if let Some(share) = &res.model {
            let m = &mut self.keys[res.key].models[res.plan];
            if let Some((_, held)) = &mut m.concurrency {
                *held -= 1;
            }
            m.settle(now, wall, &res, share, actual);
        }
        if let Some(share) = &res.other {
            let m = &mut self.keys[res.key].others[res.plan];
            if let Some((_, held)) = &mut m.concurrency {
                *held -= 1;
            }
            m.settle(now, wall, &res, share, actual);
        }
    }

    /// UpdateUsage on `key`'s current plan: `None` when it has no quota.
    pub fn set_remaining(&mut self, key: usize, remaining: u64) -> Option<u64> {
        let wall = self.wall();
        let k = &mut self.keys[key];
        k.plans[k.on].set_remaining(wall, remaining)
    }

    /// Resets `key` under its current plan: the plan's own limits, its
    /// named model's and its `"*"` entry's (every limit of the plan).
    pub fn reset(&mut self, key: usize) {
        let k = &mut self.keys[key];
        k.plans[k.on].reset();
        for m in [k.models.get_mut(k.on), k.others.get_mut(k.on)]
            .into_iter()
            .flatten()
        {
            m.reset();
        }
    }

    pub fn set_enabled(&mut self, key: usize, enabled: bool) {
        self.keys[key].enabled = enabled;
    }

    pub fn set_plan(&mut self, key: usize, plan: usize) {
        self.keys[key].on = plan;
    }

    /// Plan `plan` is put anew with other quota limits (the plan's request
    /// quota and its model's): every key's counts carry over, read under
    /// the new limits, and the offset still counts from the plan's first
    /// creation.
    /// With `throttle`, its throttle's numbers change too: a bucket keeps
    /// the share of it in use at the change (an emptied bucket stays empty
    /// and refills at the new rate, a full one stays full), rounded down to
    /// a whole nanosecond. `star` is its `"*"` entry's throttle and quota
    /// limit, changed alike.
    pub fn put_quotas(
        &mut self,
        plan: usize,
        quota: Option<u64>,
        model_quota: Option<u64>,
        throttle: Option<Bucket>,
        star: (Option<Bucket>, Option<u64>),
    ) {
        let now = Q::int(self.now);
        for k in &mut self.keys {
            if k.anonymous {
                continue;
            }
            if let Some(o) = k.others.get_mut(plan) {
                if let (Some(b), Some(new)) = (&mut o.throttle, &star.0) {
                    b.rescale(now, new);
                }
                if let (Some(q), Some(l)) = (&mut o.quota, star.1) {
                    q.limit = l;
                }
            }
            let Some(p) = k.plans.get_mut(plan) else {
                continue;
            };
            if let (Some(b), Some(new)) = (&mut p.throttle, &throttle) {
                b.rescale(now, new);
            }
            if let (Some(q), Some(l)) = (&mut p.quota, quota) {
                q.limit = l;
            }
            if let (Some(q), Some(l)) = (&mut p.model_quota, model_quota) {
                q.limit = l;
            }
        }
    }

    /// Plan `plan` is put anew with a token budget of `per_minute`: each
    /// key's per-minute bucket keeps the share in use (a debt included),
    /// as a throttle does.
    pub fn put_budget(&mut self, plan: usize, per_minute: &Bucket) {
        let now = Q::int(self.now);
        for k in &mut self.keys {
            if let Some(b) = k.plans.get_mut(plan).and_then(|p| p.tokens_minute.as_mut()) {
                b.rescale(now, per_minute);
            }
        }
    }

    /// Plan `plan` is put anew with its named model's token budget of
    /// `per_minute`: each key's bucket for the model keeps the share in use
    /// (a debt included), as the plan's own does.
    pub fn put_model_budget(&mut self, plan: usize, per_minute: &Bucket) {
        let now = Q::int(self.now);
        for k in &mut self.keys {
            if let Some(b) = k
                .models
                .get_mut(plan)
                .and_then(|m| m.tokens_minute.as_mut())
            {
                b.rescale(now, per_minute);
            }
        }
    }

    /// Plan `plan` is put anew with a request quota of `limit` per
    /// `period` (its offset kept, counting from the plan's creation): a
    /// count carries over into the window of the new period that holds
    /// its last change, a later window starts from 0.
    pub fn put_period(&mut self, plan: usize, limit: u64, period: Period) {
        for k in &mut self.keys {
            if let Some(q) = k.plans.get_mut(plan).and_then(|p| p.quota.as_mut()) {
                q.limit = limit;
                q.period = period;
            }
        }
    }

    /// The account is put anew: its throttle (if it has one) with `throttle`'s
    /// numbers, keeping the share in use, its quota with `quota` as limit,
    /// its count carried over.
    pub fn put_account(&mut self, throttle: Option<Bucket>, quota: Option<u64>) {
        let now = Q::int(self.now);
        let Some(a) = &mut self.account else { return };
        if let (Some(b), Some(new)) = (&mut a.throttle, &throttle) {
            b.rescale(now, new);
        }
        if let (Some(q), Some(l)) = (&mut a.quota, quota) {
            q.limit = l;
        }
    }

    /// The account is put anew with a token budget of `per_minute`: its
    /// per-minute bucket keeps the share in use (a debt included), as a
    /// plan's does, and settlements reserved before are converted.
    pub fn put_account_budget(&mut self, per_minute: &Bucket) {
        let now = Q::int(self.now);
        if let Some(b) = self.account.as_mut().and_then(|a| a.tokens_minute.as_mut()) {
            b.rescale(now, per_minute);
        }
    }

    /// The period of the request quota `key` is counted under now.
    pub fn period(&self, key: usize) -> Option<Period> {
        let k = &self.keys[key];
        k.plans[k.on].quota.as_ref().map(|q| q.period)
    }
}

/// The limit closest to denying: fewest units left, then longest to reset;
/// a concurrency cap only when there is no rate limit.
fn tightest(items: &[(&'static str, u64, Q, bool)]) -> Option<Header> {
    let rates: Vec<_> = items.iter().filter(|i| i.3).collect();
    let pool: Vec<_> = if rates.is_empty() {
        items.iter().collect()
    } else {
        rates
    };
    let best = pool
        .iter()
        .min_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)))?;
    let names = pool
        .iter()
        .filter(|i| i.1 == best.1 && i.2 == best.2)
        .map(|i| i.0)
        .collect();
    // The header's numbers are Structured Fields integers, which stop at
    // 999,999,999,999,999: a larger count (a quota of 2^53) is sent as that.
    Some(Header {
        names,
        r: best.1.min(SF_INT_MAX),
        t: ceil_secs(best.2).min(SF_INT_MAX),
    })
}

/// The largest integer a Structured Field holds (RFC 9651, section 3.3.1).
const SF_INT_MAX: u64 = 999_999_999_999_999;

fn ceil_secs(ns: Q) -> u64 {
    let s = Q::new(ns.n, ns.d * NANOS_PER_SEC);
    s.ceil().max(0) as u64
}
