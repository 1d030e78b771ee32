//! One call of the Lua script: its keys and arguments, sending it, and the
//! verdict its reply makes.
//!
//! Every limit of a request is decided by one Lua script (`script.lua`),
//! called with `EVALSHA` (and `EVAL` once when Redis answers `NOSCRIPT`, after
//! a restart or a `SCRIPT FLUSH`). The script reads Redis `TIME`, so every
//! instance decides on one clock, and charges all limits or none.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::{Cmd, ErrorKind, ServerErrorKind};

use super::conn::{TRY_AGAIN_PAUSE, redis_error};
use super::store::Inner;
use super::time::Now;
use crate::gcra::{NANOS_PER_SEC, Nanos, Outcome};
use crate::hash::Digest;
use crate::quota::QuotaSpec;
use crate::store::verdict::{Tally, applied, cap_has_room, ever_fits};
use crate::store::{
    Applied, ConcurrencyRef, Denied, LimitKind, Permit, QuotaRef, Report, StoreError, ThrottleRef,
    Verdict,
};
use crate::window::{NANOS_PER_DAY, Period};

/// The script every decision runs.
pub(super) const SCRIPT: &str = include_str!("script.lua");
/// The origin of the relative time line on which replies are replayed: far
/// above any TAT offset, far below overflow.
const BASE: Nanos = 1 << 62;

/// One script call: keys and arguments, owned so the call can outlive the
/// request it was built from.
#[derive(Debug, Clone, Default)]
pub(super) struct Call {
    pub(super) keys: Vec<String>,
    pub(super) args: Vec<String>,
}

impl Call {
    pub(super) fn new(mode: &str, now: &Now) -> Self {
        let mut c = Call::default();
        c.arg(mode);
        match now {
            Now::Redis => {
                c.arg("");
                c.arg("");
            }
            Now::At { s, ns } => {
                c.arg(s);
                c.arg(ns);
            }
        }
        c
    }

    pub(super) fn arg(&mut self, a: impl fmt::Display) {
        self.args.push(a.to_string());
    }

    /// `EVALSHA sha …`, or `EVAL script …` (which also loads it) when `sha` is `None`.
    fn cmd(&self, sha: Option<&str>) -> Cmd {
        let mut cmd = match sha {
            Some(sha) => redis::cmd("EVALSHA").arg(sha).clone(),
            None => redis::cmd("EVAL").arg(SCRIPT).clone(),
        };
        cmd.arg(self.keys.len()).arg(&self.keys).arg(&self.args);
        cmd
    }
}

impl Call {
    /// Sends the call on `conn` with no store around it (its last handle
    /// is gone: see `Inner::give_back_on_drop`), loading the script when
    /// Redis lost it; never sent again.
    pub(super) async fn send_alone(self, mut conn: super::conn::Conn, sha: String) {
        let reply: Result<redis::Value, _> = match self.cmd(Some(&sha)).query_async(&mut conn).await
        {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.cmd(None).query_async(&mut conn).await
            }
            r => r,
        };
        if let Err(e) = reply {
            tracing::debug!(error = %redis_error(&e), "share not given back; it stays charged");
        }
    }
}

impl Inner {
    /// Runs a script call; loads the script when Redis lost it. The caller
    /// bounds the whole decision by the timeout.
    ///
    /// A call whose connection turns out to be lost (Redis restarted, the
    /// connection killed or reset: redis-rs notices only when a call fails)
    /// is sent once more, on the connection redis-rs makes at once, within
    /// the same timeout: with Redis healthy again, no request is decided by
    /// the failure mode. Whether the first try ran before the connection
    /// went is unknown, so only a call that can safely run twice is sent
    /// again. A decision ("a") run twice charges its limits twice at worst
    /// (a request counted double, or refused by its own first charge),
    /// never admits a request unmetered: the reply is the second run's, made
    /// on Redis's counts. Its place under a concurrency cap carries the same
    /// lease id both times, so a second `ZADD` only renews the first; when
    /// the second run is refused, the place the first may have taken is
    /// given back, since no response will hold it. A decision that borrows
    /// ("b") run twice at worst charges its grant twice: units lost to
    /// every instance until their day or window ends, never admitted
    /// twice. A peek ("p") charges
    /// nothing, setting what remains ("s") sets the same value, and a
    /// settlement that charges ("t", delta >= 0) at worst charges twice, and
    /// a renewal of leases ("l") renews them again. A
    /// refund (mode "r", "g", or "t" with a negative delta) is not sent again:
    /// run twice it would give back twice, which could admit more than the
    /// limits; failing, it leaves the request charged. A call sent once
    /// (its mode with `!` after it, a settlement: see `retry`) is sent
    /// again whatever it does, since a second run changes nothing.
    pub(super) async fn run(self: Arc<Self>, call: Call) -> Result<Vec<i64>, StoreError> {
        let repeatable = match call.args.first().map(String::as_str) {
            Some("a" | "b" | "p" | "s" | "l") => true,
            // Applied once however often it is sent (see `retry`).
            Some(m) if m.ends_with('!') => true,
            Some("t") => call.args.get(3).is_some_and(|d| !d.starts_with('-')),
            _ => false,
        };
        let mut retried = false;
        // Whether a try may have run: each failed try that Redis certainly
        // did not run (see `conn::unrun`) leaves it unknown, so a failure
        // of the call says whether it changed nothing. A Cluster's client
        // sends a call again by itself after errors (a lost connection
        // among them) and tells only the last try's: any of them may have.
        let mut ran = self.cluster;
        let mut pause = Duration::from_millis(1);
        let reply = loop {
            let mut conn = self.conn.clone();
            let reply = match call.cmd(Some(&self.sha)).query_async(&mut conn).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    call.cmd(None).query_async(&mut conn).await
                }
                r => r,
            };
            if let Err(e) = &reply {
                ran |= !super::conn::unrun(e);
            }
            match reply {
                // Redis ran the call nowhere: its keys are split between two
                // nodes while their slot migrates (or, on the target, one of
                // them does not exist yet), until the migration goes on. Any
                // call, a refund too, is sent again after a short pause, as
                // long as the caller's timeout lets it.
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::TryAgain) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(TRY_AGAIN_PAUSE);
                }
                Err(e) if repeatable && !retried && super::conn::connection_lost(&e) => {
                    let error = redis_error(&e);
                    tracing::debug!(error = %error, "connection lost; the call is sent again");
                    retried = true;
                }
                r => break r,
            }
        };
        let reply: Vec<i64> = reply.map_err(|e| {
            if e.to_string().contains("tollgate: expired") || e.detail() == Some("expired") {
                self.forget_offset();
            }
            let error = redis_error(&e);
            if ran { error } else { error.unrun() }
        })?;
        if let [s, ns, ..] = reply[..] {
            self.observe(s, ns);
        }
        if retried && call.args.first().is_some_and(|m| m == "a") && reply.get(2) == Some(&0) {
            // The leases of a decision ("a"): the caps' keys are the last
            // keys, and their arguments follow the throttles' (7 each) and
            // quotas' (9 each) as c, then c times (cap, lease_ms, member,
            // shadow).
            let a = &call.args;
            let leases = || -> Option<Vec<(String, String)>> {
                let n: usize = a.get(4)?.parse().ok()?;
                let m: usize = a.get(5 + 7 * n)?.parse().ok()?;
                let at = 5 + 7 * n + 1 + 9 * m;
                let c: usize = a.get(at)?.parse().ok()?;
                let first = call.keys.len().checked_sub(c)?;
                (0..c)
                    .map(|i| {
                        Some((
                            call.keys.get(first + i)?.clone(),
                            a.get(at + 3 + 4 * i)?.clone(),
                        ))
                    })
                    .collect()
            };
            for (key, member) in leases().unwrap_or_default() {
                self.remove_lease(key, member);
            }
        }
        Ok(reply)
    }
}

/// A throttle as a decision needs it after the call: its compiled limit
/// (and, for the local copy, where the memory store keeps its state).
#[derive(Debug, Clone)]
pub(super) struct Throttle {
    pub(super) limit: crate::plan::Limit,
    pub(super) shadow: bool,
    /// The stage's, shared by every caller.
    pub(super) stage: bool,
    /// An account's, shared by all its keys.
    pub(super) account: bool,
    pub(super) digest: Digest,
    /// What it is charged: requests, or tokens.
    pub(super) cost: u32,
    /// Whether it counts tokens (the per-minute token bucket).
    tokens: bool,
}

/// A quota as a decision needs it after the call.
#[derive(Debug, Clone)]
pub(super) struct Quota {
    pub(super) kind: LimitKind,
    /// The whole limit: a cost above it fits no window's limit (only what a
    /// raise by UpdateUsage left in the current one).
    whole: u64,
    pub(super) shadow: bool,
    pub(super) spec: QuotaSpec,
    pub(super) digest: Digest,
    pub(super) history_days: u32,
    /// What it is charged: requests, or tokens.
    pub(super) cost: u32,
    tokens: bool,
    /// Its arguments to the script.
    pub(super) args: Vec<String>,
    /// Where its key and its history's are in its part's call's keys.
    pub(super) key_at: usize,
}

/// One script call's limits and what to make of its reply.
#[derive(Debug, Clone, Default)]
pub(super) struct Part {
    pub(super) call: Call,
    /// The request's cost in requests, and its estimated tokens.
    pub(super) cost: u32,
    pub(super) tokens: u32,
    pub(super) throttles: Vec<Throttle>,
    pub(super) quotas: Vec<Quota>,
    /// Its concurrency caps: the plan's, the model's.
    pub(super) caps: Vec<Cap>,
}

/// A concurrency cap as a decision needs it after the call.
#[derive(Debug, Clone, Copy)]
pub(super) struct Cap {
    pub(super) kind: LimitKind,
    pub(super) limit: u32,
    pub(super) shadow: bool,
    /// The permit a request let in holds.
    pub(super) permit: Permit,
    pub(super) salt: u64,
    pub(super) digest: Digest,
    /// Places under this cap the local copy granted on its own while Redis
    /// could not decide, whose responses have not ended: Redis never
    /// counted them, and the request's call counts them beside Redis's
    /// (see [`Local::held_under`](super::local::Local::held_under)).
    pub(super) local: u32,
}

impl Cap {
    /// The places held under the cap, Redis's (`in_flight`) and the local
    /// copy's own.
    fn in_flight(&self, in_flight: u64) -> u64 {
        in_flight.saturating_add(u64::from(self.local))
    }
}

impl Part {
    /// Whether the part has no limit to decide.
    pub(super) fn is_empty(&self) -> bool {
        self.throttles.is_empty() && self.quotas.is_empty() && self.caps.is_empty()
    }

    pub(super) fn new(now: &Now, cost: u32) -> Self {
        let mut call = Call::new("a", now);
        call.arg(cost);
        Part {
            call,
            cost,
            tokens: 0,
            throttles: Vec::new(),
            quotas: Vec::new(),
            caps: Vec::new(),
        }
    }

    pub(super) fn push_throttle(&mut self, inner: &Inner, t: &ThrottleRef<'_>, cost: u32) {
        self.call.keys.push(inner.throttle_key(t));
        // Numbers changed while serving: the ones a later settlement of a
        // reservation under older ones (or a give-back of a share borrowed
        // under them) is converted to.
        if t.limit.before.is_some() {
            inner.numbers.note(t.limit);
        }
        self.throttles.push(Throttle {
            limit: t.limit.clone(),
            shadow: t.shadow,
            stage: t.is_stage(),
            account: t.account.is_some(),
            digest: t.digest,
            cost,
            tokens: t.counts_tokens(),
        });
    }

    pub(super) fn push_quota(&mut self, inner: &Inner, q: &QuotaRef<'_>, cost: u32) {
        let [key, hist] = inner.quota_keys(q);
        let key_at = self.call.keys.len();
        self.call.keys.push(key);
        self.call.keys.push(hist);
        let mut args = Call::default();
        quota_args(&mut args, q);
        args.arg(u8::from(q.shadow));
        args.arg(q.history_days);
        args.arg(cost);
        args.arg(u8::from(q.counts_tokens()));
        self.quotas.push(Quota {
            kind: q.kind,
            whole: q.spec.limit,
            shadow: q.shadow,
            spec: *q.spec,
            digest: q.digest,
            history_days: q.history_days,
            cost,
            tokens: q.counts_tokens(),
            args: args.args,
            key_at,
        });
    }

    pub(super) fn push_cap(&mut self, inner: &Inner, c: &ConcurrencyRef<'_>) {
        let place = inner.scope(Some(c.plan), c.subject);
        // The plan's cap keeps the key it always had; a model's is named by
        // its id beside it, in the same slot.
        let cap = if c.kind == LimitKind::Concurrency {
            0
        } else {
            c.salt
        };
        let permit =
            Permit::new(place, inner.members.fetch_add(1, Ordering::Relaxed)).with_cap(cap);
        self.call.keys.push(inner.cap_key(&permit));
        self.caps.push(Cap {
            kind: c.kind,
            limit: c.limit,
            shadow: c.shadow,
            permit,
            salt: c.salt,
            digest: c.digest,
            local: inner.local.held_under(c),
        });
    }

    /// The denial of a request whose cap the local copy's own places fill
    /// (see [`Cap::local`]): Redis could not let it in, so it is denied
    /// without a call. `None` in the usual case, the copy holding none.
    pub(super) fn full_here(&self) -> Option<Denied> {
        let c = self
            .caps
            .iter()
            .find(|c| !c.shadow && c.local > 0 && c.local >= c.limit)?;
        Some(Denied::concurrency(Applied {
            kind: c.kind,
            quota: u64::from(c.limit),
            window_secs: 0,
            remaining: 0,
            reset: 0,
        }))
    }

    /// The arguments after the cost: throttles, the quotas, the caps.
    pub(super) fn finish(&mut self, lease: Duration) {
        let call = &mut self.call;
        call.arg(self.throttles.len());
        for t in &self.throttles {
            call.arg(t.limit.gcra.interval());
            call.arg(t.limit.gcra.burst());
            call.arg(u8::from(t.shadow));
            let since = t.limit.since.max(0);
            call.arg(since / NANOS_PER_SEC as i64);
            call.arg(since % NANOS_PER_SEC as i64);
            call.arg(t.cost);
            call.arg(t.limit.before.as_ref().map_or("", |e| e.encoded()));
        }
        call.arg(self.quotas.len());
        for q in &self.quotas {
            call.args.extend(q.args.iter().cloned());
        }
        call.arg(self.caps.len());
        for c in &self.caps {
            // The copy's own places are taken: Redis decides the rest (a
            // cap they fill is denied before any call, see `full_here`;
            // a shadow's never denies).
            call.arg(c.limit.saturating_sub(c.local).max(1));
            call.arg(lease.as_millis().max(1));
            call.arg(format_args!("{:016x}", c.permit.id));
            call.arg(u8::from(c.shadow));
        }
    }

    /// Makes the verdict of a reply, as the memory store would have decided
    /// on the same state: the script returns each throttle's TAT offset
    /// before the request and the quota's window and count, and the limits
    /// are replayed here on a relative time line.
    pub(super) fn verdict(
        &self,
        reply: &[i64],
        cost: u32,
    ) -> Result<(Verdict, Charged), StoreError> {
        let bad = || StoreError::new("redis: unexpected script reply");
        let n = self.throttles.len();
        let head = reply.get(..3 + n).ok_or_else(bad)?;
        let (now_s, now_ns, allowed) = (head[0], head[1], head[2] == 1);
        let mut report = Report::default();
        let mut tally = Tally::default();
        let mut caps = Vec::new();
        let mut charged = Charged {
            now_s,
            now_ns,
            tats: Vec::new(),
        };
        for (t, &before) in self.throttles.iter().zip(&head[3..]) {
            let before = u64::try_from(before).map_err(|_| bad())?;
            let limit = &t.limit;
            match limit.gcra.decide(BASE + before, BASE, t.cost) {
                Outcome::Allow { after, .. } => {
                    report.push(applied(limit, after, BASE));
                    charged.tats.push(Some(after - BASE));
                    if t.tokens {
                        // When the estimate's share refills, in nanoseconds
                        // of the call's time.
                        let span = u64::from(t.cost) * limit.gcra.interval();
                        let until = u64::try_from(now_s).ok().and_then(|s| {
                            (s.checked_mul(NANOS_PER_SEC)?)
                                .checked_add(u64::try_from(now_ns).ok()?)?
                                .checked_add(span)
                        });
                        match limit.kind {
                            LimitKind::AccountTokensMinute => {
                                report.reserved.account_until = until;
                            }
                            LimitKind::ModelTokensMinute => report.reserved.model_until = until,
                            _ => report.reserved.until = until,
                        }
                    }
                }
                o => {
                    charged.tats.push(None);
                    let d = throttle_denial(limit, o);
                    if t.shadow {
                        report.push(d.limit);
                        report.overran(false, d);
                    } else {
                        tally.deny(d);
                    }
                }
            }
        }
        for (i, q) in self.quotas.iter().enumerate() {
            let at = 3 + n + 4 * i;
            let rest = reply.get(at..at + 4).ok_or_else(bad)?;
            let (start_day, end_day, limit, used) = (rest[0], rest[1], rest[2], rest[3]);
            let now = now_s
                .saturating_mul(NANOS_PER_SEC as i64)
                .saturating_add(now_ns);
            let reset = end_day
                .saturating_mul(NANOS_PER_DAY)
                .saturating_sub(now)
                .max(0) as u64;
            let window_secs = (end_day - start_day).max(0) as u64 * 86_400;
            let cost = i64::from(q.cost);
            let item = |used: i64| Applied {
                kind: q.kind,
                quota: u64::try_from(limit).unwrap_or(0),
                window_secs,
                remaining: limit.saturating_sub(used).max(0) as u64,
                reset,
            };
            let past = used.saturating_add(cost) > limit;
            let over = past && !q.shadow;
            // A cost above the whole limit that does not fit now fits no
            // window (one that fits what a raise by UpdateUsage left in
            // this window passes).
            if over && !ever_fits(u64::from(q.cost), q.whole) {
                tally.deny(Denied::too_costly(item(used)));
            } else if over {
                let d = Denied::quota(item(used), Duration::from_nanos(reset.max(1)));
                tally.deny(d);
            } else {
                if past {
                    // A shadow quota counts past its limit: told, as it
                    // would deny.
                    report.overran(
                        false,
                        match ever_fits(u64::from(q.cost), q.whole) {
                            true => Denied::quota(item(used), Duration::from_nanos(reset.max(1))),
                            false => Denied::too_costly(item(used)),
                        },
                    );
                }
                report.push(item(used.saturating_add(cost)));
                if q.tokens {
                    report.reserved.wall = Some(now);
                }
            }
        }
        let at = 3 + n + 4 * self.quotas.len();
        for (i, c) in self.caps.iter().enumerate() {
            let in_flight = *reply.get(at + i).ok_or_else(bad)?;
            let in_flight = c.in_flight(u64::try_from(in_flight).map_err(|_| bad())?);
            let item = |n: u64| Applied {
                kind: c.kind,
                quota: u64::from(c.limit),
                window_secs: 0,
                remaining: u64::from(c.limit).saturating_sub(n),
                reset: 0,
            };
            if !cap_has_room(in_flight, c.limit, c.shadow) {
                tally.deny_cap(Denied::concurrency(item(in_flight)));
                continue;
            }
            if in_flight >= u64::from(c.limit) {
                // Past a shadow cap: a place is taken all the same, and told.
                report.overran(true, Denied::concurrency(item(in_flight)));
            }
            if cost > 0 {
                caps.push((item(in_flight + 1), Some(c.permit)));
            } else {
                // A peek takes no place: the report shows the free ones.
                caps.push((item(in_flight), None));
            }
        }
        // A request let in holds a place under every cap; one denied holds
        // none (Redis added none).
        if !tally.is_denied() {
            for (item, permit) in caps {
                report.push(item);
                if let Some(p) = permit {
                    report.set_permit(p);
                }
            }
        }
        match (allowed, tally.verdict()) {
            (true, None) => Ok((Ok(report), charged)),
            (false, Some(d)) => Ok((Err(d), charged)),
            _ => Err(StoreError::new(
                "redis: the script's decision differs from the plan's limits (is the script of another version?)",
            )),
        }
    }
}

impl Part {
    /// The denial Redis would have answered one more unit of the request in
    /// the same call, after the `units` it granted (mode "b"; `reply`
    /// without its count of units): each throttle's TAT and each quota's
    /// count moved on by those units, and the limits replayed. `None` when
    /// one more would have fitted.
    pub(super) fn beyond(&self, reply: &[i64], units: u32) -> Option<Denied> {
        let n = self.throttles.len();
        let mut after = reply.to_vec();
        *after.get_mut(2)? = 0;
        for (i, t) in self.throttles.iter().enumerate() {
            let step =
                i64::try_from(u64::from(t.cost).checked_mul(t.limit.gcra.interval())?).ok()?;
            let before = after.get_mut(3 + i)?;
            *before = before.checked_add(step.checked_mul(i64::from(units))?)?;
        }
        for (i, q) in self.quotas.iter().enumerate() {
            let used = after.get_mut(3 + n + 4 * i + 3)?;
            *used = used.checked_add(i64::from(q.cost).checked_mul(i64::from(units))?)?;
        }
        // Replayed as denied: a verdict that would allow is no denial.
        match self.verdict(&after, self.cost) {
            Ok((Err(denied), _)) => Some(denied),
            _ => None,
        }
    }
}

/// What a call charged: its time and, per throttle, the TAT offset stored.
#[derive(Debug, Clone, Default)]
pub(super) struct Charged {
    pub(super) now_s: i64,
    pub(super) now_ns: i64,
    pub(super) tats: Vec<Option<Nanos>>,
}

/// The denial of a throttle that did not allow, on the relative time line.
fn throttle_denial(limit: &crate::plan::Limit, o: Outcome) -> Denied {
    match o {
        Outcome::Deny { at, retry_after } => {
            Denied::throttled(applied(limit, at, BASE), Duration::from_nanos(retry_after))
        }
        Outcome::TooCostly { at } | Outcome::Allow { after: at, .. } => {
            Denied::too_costly(applied(limit, at, BASE))
        }
    }
}

/// The quota's parameters, as every script mode takes them.
pub(super) fn quota_args(call: &mut Call, q: &QuotaRef<'_>) {
    spec_args(call, q.spec);
}

/// A period as the script takes it: `D`, `W` with the week's first day
/// (0 for Monday), or `M`.
pub(super) fn period_arg(period: Period) -> (&'static str, i64) {
    match period {
        Period::Day => ("D", 0),
        Period::Week(first) => ("W", first.days_from_monday()),
        Period::Month => ("M", 0),
    }
}

/// A quota's parameters from its compiled numbers.
pub(super) fn spec_args(call: &mut Call, spec: &QuotaSpec) {
    call.arg(spec.limit);
    let (period, week_start) = period_arg(spec.period);
    call.arg(period);
    call.arg(week_start);
    call.arg(spec.offset);
    call.arg(spec.created_at.div_euclid(NANOS_PER_SEC as i64));
}
