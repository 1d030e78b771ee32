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
        }
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

/// A calendar quota of UTC days: the request quota or a token budget's
/// `per_day`.
#[derive(Clone, Debug)]
pub struct DayQuota {
    pub name: &'static str,
    pub limit: u64,
    /// `(day number, used)`; used may exceed the limit (a settled debt).
    pub used: Option<(i128, u64)>,
}

impl DayQuota {
    fn used_on(&self, day: i128) -> u64 {
        match self.used {
            Some((d, u)) if d == day => u,
            _ => 0,
        }
    }
}

/// The limits of the plan under test, and the state of its one key.
#[derive(Clone, Debug)]
pub struct Model {
    /// The plan-wide throttle.
    pub throttle: Option<Bucket>,
    /// A method override's throttle, applying to requests on its route.
    pub method: Option<Bucket>,
    /// The token budget's per-minute bucket.
    pub tokens_minute: Option<Bucket>,
    pub quota: Option<DayQuota>,
    pub tokens_day: Option<DayQuota>,
    /// `(cap, places held)`.
    pub concurrency: Option<(u32, u32)>,
    /// Wall time (ns since the Unix epoch) at monotonic 0.
    pub wall0: i128,
    /// Nanoseconds since the start.
    pub now: i128,
}

/// What a request asks for.
#[derive(Clone, Copy, Debug)]
pub struct Ask {
    /// Units charged to request limits (throttles, method, quota).
    pub cost: u32,
    /// Tokens charged to the token budget.
    pub tokens: u32,
    /// On the route of the method override.
    pub on_route: bool,
    /// Takes a place under the concurrency cap until its response ends
    /// (a request through the layer); a direct decision gives it back at once.
    pub holds: bool,
    /// The answer shows the `RateLimit` header.
    pub http: bool,
}

/// A token reservation to settle when its response ends.
#[derive(Clone, Copy, Debug)]
pub struct Reservation {
    pub at: i128,
    pub estimate: u32,
    pub day: i128,
}

enum Denial {
    TooCostly,
    Wait(Q),
}

impl Model {
    pub fn wall(&self) -> i128 {
        self.wall0 + self.now
    }

    fn day(&self) -> i128 {
        self.wall().div_euclid(NANOS_PER_DAY)
    }

    fn to_window_end(&self) -> Q {
        Q::int((self.day() + 1) * NANOS_PER_DAY - self.wall())
    }

    pub fn advance(&mut self, by: u64) {
        self.now += i128::from(by);
    }

    /// One decision over every limit, atomically.
    pub fn decide(&mut self, ask: Ask) -> (Answer, Option<Reservation>) {
        let now = Q::int(self.now);
        let day = self.day();
        // Each limit in decision order: (name, reason, outcome).
        let mut denials: Vec<(&'static str, Why, Denial)> = Vec::new();
        let mut new_tats: Vec<(usize, Q)> = Vec::new();
        let method_applies = ask.on_route;
        let buckets = [
            (0, self.throttle.as_ref(), ask.cost),
            (1, self.method.as_ref().filter(|_| method_applies), ask.cost),
            (2, self.tokens_minute.as_ref(), ask.tokens),
        ];
        for (i, b, cost) in buckets {
            let Some(b) = b else { continue };
            match b.check(now, cost) {
                Ok(t) => new_tats.push((i, t)),
                Err(None) => denials.push((b.name, Why::CostExceedsLimit, Denial::TooCostly)),
                Err(Some(w)) => denials.push((b.name, Why::Limited, Denial::Wait(w))),
            }
        }
        for (q, cost) in [(&self.quota, ask.cost), (&self.tokens_day, ask.tokens)] {
            let Some(q) = q else { continue };
            if u64::from(cost) > q.limit {
                denials.push((q.name, Why::CostExceedsLimit, Denial::TooCostly));
            } else if q.used_on(day) + u64::from(cost) > q.limit {
                denials.push((
                    q.name,
                    Why::QuotaExceeded,
                    Denial::Wait(self.to_window_end()),
                ));
            }
        }
        if let Some((cap, held)) = self.concurrency {
            if held >= cap {
                denials.push((
                    "concurrency",
                    Why::ConcurrencyLimited,
                    Denial::Wait(Q::int(i128::from(CONCURRENCY_RETRY_NS))),
                ));
            }
        }
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
            );
        }
        // Allowed: charge everything (a peek charges nothing: its new TAT is
        // max(tat, now) and nothing is stored).
        let mut items: Vec<(&'static str, u64, Q, bool)> = Vec::new();
        for (i, t) in new_tats {
            let cost = if i == 2 { ask.tokens } else { ask.cost };
            let b = match i {
                0 => self.throttle.as_mut(),
                1 => self.method.as_mut(),
                _ => self.tokens_minute.as_mut(),
            }
            .unwrap();
            if cost > 0 {
                b.tat = Some(t);
            }
            let (r, reset) = b.status(now, t);
            items.push((b.name, r, reset, true));
        }
        let to_end = self.to_window_end();
        for (q, cost) in [
            (&mut self.quota, ask.cost),
            (&mut self.tokens_day, ask.tokens),
        ] {
            let Some(q) = q else { continue };
            let used = q.used_on(day) + u64::from(cost);
            if cost > 0 {
                q.used = Some((day, used));
            }
            // A window's reset is its end (the IETF draft's `t` of a
            // quota: when it resets), used or not.
            items.push((q.name, q.limit.saturating_sub(used), to_end, true));
        }
        if let Some((cap, held)) = &mut self.concurrency {
            let after = if ask.holds { *held + 1 } else { *held };
            if ask.holds {
                *held = after;
            }
            items.push(("concurrency", u64::from(*cap - after), Q::int(0), false));
        }
        let header = ask.http.then(|| tightest(&items)).flatten();
        let budget = self.tokens_minute.is_some() || self.tokens_day.is_some();
        let reservation = (ask.holds && budget).then_some(Reservation {
            at: self.now,
            estimate: ask.tokens,
            day,
        });
        (Answer::Allowed { header }, reservation)
    }

    /// A response ends: its place under the cap comes back and its tokens
    /// are settled at `actual` (none reported: the estimate stands).
    pub fn end(&mut self, reservation: Option<Reservation>, actual: Option<u32>) {
        if let Some((_, held)) = &mut self.concurrency {
            *held -= 1;
        }
        let (Some(res), Some(actual)) = (reservation, actual) else {
            return;
        };
        let now = Q::int(self.now);
        let day = self.day();
        let delta = i128::from(actual) - i128::from(res.estimate);
        if delta > 0 {
            // An under-estimate is charged past the limit: a debt.
            if let Some(b) = &mut self.tokens_minute {
                let base = b.base(now);
                b.tat = Some(base.add(b.interval.mul(delta)));
            }
            if let Some(q) = &mut self.tokens_day {
                let used = q.used_on(day) + delta as u64;
                q.used = Some((day, used));
            }
        } else if delta < 0 {
            let refund = -delta;
            // Only the estimate's own share not yet refilled comes back
            // (what refilled since may have been granted again), and never
            // beyond a full bucket.
            if let Some(b) = &mut self.tokens_minute {
                if let Some(tat) = b.tat {
                    let share_end = Q::int(res.at).add(b.interval.mul(i128::from(res.estimate)));
                    let give = b
                        .interval
                        .mul(refund)
                        .min(share_end.sub(now).max(Q::int(0)));
                    b.tat = Some(tat.sub(give).max(now.min(tat)));
                }
            }
            // A quota gets back only what its own window counted.
            if let Some(q) = &mut self.tokens_day {
                if res.day == day {
                    let used = q.used_on(day).saturating_sub(refund as u64);
                    q.used = Some((day, used));
                }
            }
        }
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
    Some(Header {
        names,
        r: best.1,
        t: ceil_secs(best.2),
    })
}

fn ceil_secs(ns: Q) -> u64 {
    let s = Q::new(ns.n, ns.d * NANOS_PER_SEC);
    s.ceil().max(0) as u64
}
