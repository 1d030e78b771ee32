//! The Redis store's Lua script against a real `redis-server`: GCRA
//! throttles, calendar quotas and their history, all or nothing, shadows,
//! lazy rescaling, refunds and UpdateUsage, with the same arithmetic as the
//! memory store. Every call passes an explicit now, except the one that checks
//! the server's clock.

use std::time::{SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use redis::{RedisResult, Script};
use tollgate::Date;

use crate::support::redis::{RedisServer, require_redis};

const SCRIPT: &str = include_str!("../../src/store/redis/script.lua");

/// Nanoseconds per second.
const S: i64 = 1_000_000_000;
const DAY: i64 = 86_400;

/// A time as the script takes it: whole seconds and nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Now(i64, i64);

impl Now {
    /// `secs` seconds into a UTC day.
    fn on(y: i32, m: u8, d: u8, secs: i64) -> Now {
        Now(day(y, m, d) * DAY + secs, 0)
    }

    /// This instant plus `ns` nanoseconds (may be negative).
    fn plus(self, ns: i64) -> Now {
        let t = i128::from(self.0) * i128::from(S) + i128::from(self.1) + i128::from(ns);
        Now(
            t.div_euclid(i128::from(S)) as i64,
            t.rem_euclid(i128::from(S)) as i64,
        )
    }
}

/// Days since 1970-01-01.
fn day(y: i32, m: u8, d: u8) -> i64 {
    Date::new(y, m, d).expect("a valid date").days()
}

/// One throttle of a request.
#[derive(Debug, Clone, Copy)]
struct T {
    key: &'static str,
    interval: i64,
    burst: i64,
    shadow: bool,
    /// When the throttle's numbers changed (seconds, nanoseconds; 0 0 for never).
    since: (i64, i64),
    /// The changes before: "<tie>" and the earlier spans (see the script).
    before: &'static str,
}

fn throttle(key: &'static str, interval: i64, burst: i64) -> T {
    T {
        key,
        interval,
        burst,
        shadow: false,
        since: (0, 0),
        before: "",
    }
}

impl T {
    fn shadow(self) -> T {
        T {
            shadow: true,
            ..self
        }
    }

    fn since(self, s: i64, ns: i64) -> T {
        T {
            since: (s, ns),
            ..self
        }
    }

    fn before(self, before: &'static str) -> T {
        T { before, ..self }
    }
}

/// The quota of a request.
#[derive(Debug, Clone, Copy)]
struct Q {
    limit: i64,
    period: &'static str,
    week_start: i64,
    offset: i64,
    created_s: i64,
    shadow: bool,
    history_days: i64,
}

const QUOTA_KEY: &str = "q";
const HISTORY_KEY: &str = "h";

fn quota(limit: i64, period: &'static str) -> Q {
    Q {
        limit,
        period,
        week_start: 0,
        offset: 0,
        created_s: 0,
        shadow: false,
        history_days: 31,
    }
}

impl Q {
    fn args(&self) -> Vec<String> {
        vec![
            self.limit.to_string(),
            self.period.to_owned(),
            self.week_start.to_string(),
            self.offset.to_string(),
            self.created_s.to_string(),
        ]
    }
}

/// A decision as the script reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Decision {
    now: Now,
    allowed: bool,
    /// Nanoseconds each throttle's TAT was ahead of now.
    before: Vec<i64>,
    /// Window start day, end day, its limit, the count before the request.
    quota: Option<[i64; 4]>,
}

/// A server of its own for each test, and a connection to it.
struct Redis {
    _server: RedisServer,
    conn: MultiplexedConnection,
    script: Script,
}

/// `None` when Redis is not installed (outside CI).
async fn redis() -> Option<Redis> {
    if !require_redis() {
        return None;
    }
    let server = RedisServer::start();
    let conn = redis::Client::open(server.url())
        .expect("a valid url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    Some(Redis {
        _server: server,
        conn,
        script: Script::new(SCRIPT),
    })
}

impl Redis {
    /// Runs the script with raw keys and arguments.
    async fn raw(&mut self, keys: &[&str], args: &[String]) -> RedisResult<Vec<i64>> {
        let mut call = self.script.prepare_invoke();
        for key in keys {
            call.key(*key);
        }
        for arg in args {
            call.arg(arg.as_str());
        }
        call.invoke_async(&mut self.conn).await
    }

    async fn try_acquire(
        &mut self,
        now: Option<Now>,
        cost: i64,
        throttles: &[T],
        quota: Option<Q>,
    ) -> RedisResult<Decision> {
        let mut keys: Vec<&str> = throttles.iter().map(|t| t.key).collect();
        let mut args = vec!["a".to_owned()];
        args.extend(time_args(now));
        args.push(cost.to_string());
        args.push(throttles.len().to_string());
        for t in throttles {
            args.push(t.interval.to_string());
            args.push(t.burst.to_string());
            args.push(flag(t.shadow));
            args.push(t.since.0.to_string());
            args.push(t.since.1.to_string());
            args.push(cost.to_string());
            args.push(t.before.to_owned());
        }
        match quota {
            None => args.push("0".to_owned()),
            Some(q) => {
                keys.extend([QUOTA_KEY, HISTORY_KEY]);
                args.push("1".to_owned());
                args.extend(q.args());
                args.push(flag(q.shadow));
                args.push(q.history_days.to_string());
                args.push(cost.to_string());
                args.push("0".to_owned());
            }
        }
        // No concurrency cap (tested on its own).
        args.push("0".to_owned());
        let reply = self.raw(&keys, &args).await?;
        let n = throttles.len();
        assert_eq!(reply.len(), 3 + n + if quota.is_some() { 4 } else { 0 });
        assert!(reply[2] == 0 || reply[2] == 1, "{reply:?}");
        Ok(Decision {
            now: Now(reply[0], reply[1]),
            allowed: reply[2] == 1,
            before: reply[3..3 + n].to_vec(),
            quota: quota.map(|_| reply[3 + n..].try_into().expect("four numbers")),
        })
    }

    async fn acquire(
        &mut self,
        now: Now,
        cost: i64,
        throttles: &[T],
        quota: Option<Q>,
    ) -> Decision {
        let decision = self
            .try_acquire(Some(now), cost, throttles, quota)
            .await
            .expect("a decision");
        assert_eq!(decision.now, now);
        decision
    }

    /// How many of `n` requests of cost 1 pass at `now`.
    async fn admit(&mut self, now: Now, n: usize, throttles: &[T], quota: Option<Q>) -> usize {
        let mut passed = 0;
        for _ in 0..n {
            passed += usize::from(self.acquire(now, 1, throttles, quota).await.allowed);
        }
        passed
    }

    /// Refunds `cost` to each throttle, which this request set to `mine`,
    /// charged at `now` (after any reset).
    async fn refund(&mut self, now: Now, cost: i64, throttles: &[(T, Now)]) {
        self.refund_charged(now, now, cost, throttles).await;
    }

    /// Refunds `cost` to each throttle, which this request, charged at
    /// `charged`, set to `mine`.
    async fn refund_charged(&mut self, now: Now, charged: Now, cost: i64, throttles: &[(T, Now)]) {
        let marks: Vec<String> = throttles.iter().map(|(t, _)| mark(t.key)).collect();
        let mut keys: Vec<&str> = throttles.iter().map(|(t, _)| t.key).collect();
        keys.extend(marks.iter().map(String::as_str));
        let mut args = vec!["r".to_owned()];
        args.extend(time_args(Some(now)));
        args.push(cost.to_string());
        args.push(throttles.len().to_string());
        for (t, mine) in throttles {
            args.extend([t.interval, t.burst, mine.0, mine.1, cost].map(|x| x.to_string()));
        }
        args.extend([charged.0, charged.1].map(|x| x.to_string()));
        assert_eq!(
            self.raw(&keys, &args).await.expect("a refund"),
            [now.0, now.1]
        );
    }

    /// Fills the throttle at `now`, as `Admin::reset_key` does (mode "f").
    async fn fill(&mut self, now: Now, t: T) {
        let mut args = vec!["f".to_owned()];
        args.extend(time_args(Some(now)));
        args.extend([t.interval, t.burst].map(|x| x.to_string()));
        let reply = self.raw(&[t.key, &mark(t.key)], &args).await;
        assert_eq!(reply.expect("a fill"), [now.0, now.1]);
    }

    /// Sets what remains of the quota; the reply after `now`.
    async fn set_remaining(&mut self, now: Now, remaining: i64, q: Q) -> [i64; 4] {
        let mut args = vec!["s".to_owned()];
        args.extend(time_args(Some(now)));
        args.push(remaining.to_string());
        args.extend(q.args());
        args.push(q.history_days.to_string());
        let reply = self
            .raw(&[QUOTA_KEY, HISTORY_KEY], &args)
            .await
            .expect("set remaining");
        assert_eq!(reply[..2], [now.0, now.1]);
        reply[2..].try_into().expect("four numbers")
    }

    async fn get(&mut self, key: &str) -> Option<String> {
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.conn)
            .await
            .expect("GET")
    }

    async fn set(&mut self, key: &str, value: &str) {
        let () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async(&mut self.conn)
            .await
            .expect("SET");
    }

    async fn pttl(&mut self, key: &str) -> i64 {
        redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut self.conn)
            .await
            .expect("PTTL")
    }

    /// A hash as sorted `field=value` pairs.
    async fn hash(&mut self, key: &str) -> Vec<String> {
        let map: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut self.conn)
            .await
            .expect("HGETALL");
        map.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    async fn del(&mut self, keys: &[&str]) {
        let _: i64 = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut self.conn)
            .await
            .expect("DEL");
    }

    async fn dbsize(&mut self) -> i64 {
        redis::cmd("DBSIZE")
            .query_async(&mut self.conn)
            .await
            .expect("DBSIZE")
    }
}

/// The key of a throttle's reset mark, as the store names it.
fn mark(key: &str) -> String {
    format!("{key}:x")
}

fn time_args(now: Option<Now>) -> [String; 2] {
    match now {
        Some(Now(s, ns)) => [s.to_string(), ns.to_string()],
        None => [String::new(), String::new()],
    }
}

fn flag(on: bool) -> String {
    if on { "1" } else { "0" }.to_owned()
}

/// The `u:`/`r:` history fields of a day.
/// A day's history record: what it used, what remained in the window, and
/// the window's limit that was worked out under.
fn record(day: i64, used: i64, remaining: i64, limit: i64) -> [String; 3] {
    [
        format!("l:{day}={limit}"),
        format!("r:{day}={remaining}"),
        format!("u:{day}={used}"),
    ]
}

#[tokio::test]
async fn burst_then_one_per_interval() {
    let Some(mut r) = redis().await else { return };
    // 2 per second, bucket of 5.
    let t = throttle("t", S / 2, 5);
    let t0 = Now(1_000, 0);
    for i in 0..5 {
        let d = r.acquire(t0, 1, &[t], None).await;
        assert!(d.allowed);
        assert_eq!(d.before, [i * S / 2]);
    }
    let d = r.acquire(t0, 1, &[t], None).await;
    assert_eq!((d.allowed, d.before.as_slice()), (false, &[5 * S / 2][..]));
    // One nanosecond before the interval: nothing; at it: exactly one.
    assert_eq!(r.admit(t0.plus(S / 2 - 1), 3, &[t], None).await, 0);
    assert_eq!(r.admit(t0.plus(S / 2), 3, &[t], None).await, 1);
    assert_eq!(r.admit(t0.plus(S), 3, &[t], None).await, 1);
    // Ten seconds idle refill the bucket to 5, not more.
    assert_eq!(r.admit(t0.plus(11 * S), 10, &[t], None).await, 5);
    // A cost of 3 with room for 2 waits one interval, to the nanosecond.
    let t1 = t0.plus(20 * S);
    assert_eq!(r.admit(t1, 3, &[t], None).await, 3);
    assert!(!r.acquire(t1, 3, &[t], None).await.allowed);
    let d = r.acquire(t1.plus(S / 2 - 1), 3, &[t], None).await;
    assert_eq!((d.allowed, d.before.as_slice()), (false, &[S + 1][..]));
    assert!(r.acquire(t1.plus(S / 2), 3, &[t], None).await.allowed);
}

#[tokio::test]
async fn cost_above_burst_is_denied_and_writes_nothing() {
    let Some(mut r) = redis().await else { return };
    let t = throttle("t", S, 5);
    let now = Now(1_000, 0);
    assert!(!r.acquire(now, 6, &[t], None).await.allowed);
    assert_eq!(r.dbsize().await, 0);
    // A shadow throttle lets it through, uncharged.
    let d = r.acquire(now, 6, &[t.shadow()], None).await;
    assert!(d.allowed);
    assert_eq!(r.dbsize().await, 0);
    // A whole bucket fits; a peek (cost 0) passes on an empty bucket and
    // stores nothing.
    assert!(r.acquire(now, 5, &[t], None).await.allowed);
    let stored = r.get("t").await;
    let d = r.acquire(now, 0, &[t], None).await;
    assert_eq!((d.allowed, d.before.as_slice()), (true, &[5 * S][..]));
    assert_eq!(r.get("t").await, stored);
    assert!(!r.acquire(now, 1, &[t], None).await.allowed);
}

#[tokio::test]
async fn throttle_state_and_expiry() {
    let Some(mut r) = redis().await else { return };
    // The TAT's nanoseconds carry into its seconds.
    let t = throttle("t", 2_500_000_001, 5);
    let now = Now(100, 999_999_999);
    assert!(r.acquire(now, 1, &[t], None).await.allowed);
    assert_eq!(
        r.get("t").await.as_deref(),
        Some("103 500000000 12500000005 0 0 0")
    );
    // On a time the caller gives (a manual clock) the key lasts a day of
    // the server's clock: real time is not the caller's.
    let pttl = r.pttl("t").await;
    assert!(
        (DAY * 1_000 - 1_000..=DAY * 1_000).contains(&pttl),
        "pttl {pttl}"
    );
    let d = r.acquire(now.plus(1), 2, &[t], None).await;
    assert_eq!(d.before, [2_500_000_000]);
    assert_eq!(
        r.get("t").await.as_deref(),
        Some("108 500000002 12500000005 0 0 0")
    );
    // A bucket that is full again reads as full, the key still there.
    let d = r.acquire(Now(108, 500_000_002), 0, &[t], None).await;
    assert_eq!(d.before, [0]);
    let d = r.acquire(Now(108, 500_000_001), 0, &[t], None).await;
    assert_eq!(d.before, [1]);
    // On the server's clock the key expires when the bucket is full again,
    // rounded up to the ms.
    let s = throttle("s", 2_500_000_001, 5);
    let d = r
        .try_acquire(None, 1, &[s], None)
        .await
        .expect("a decision");
    assert!(d.allowed);
    let pttl = r.pttl("s").await;
    assert!((2_400..=2_501).contains(&pttl), "pttl {pttl}");
    let d = r
        .try_acquire(None, 2, &[s], None)
        .await
        .expect("a decision");
    assert!(d.allowed);
    let pttl = r.pttl("s").await;
    assert!((7_400..=7_501).contains(&pttl), "pttl {pttl}");
}

#[tokio::test]
async fn all_or_nothing_across_throttles() {
    let Some(mut r) = redis().await else { return };
    let a = throttle("a", S, 10);
    let b = throttle("b", S, 2);
    let now = Now(5_000, 0);
    assert_eq!(r.admit(now, 2, &[a, b], None).await, 2);
    let stored = (r.get("a").await, r.get("b").await);
    let d = r.acquire(now, 1, &[a, b], None).await;
    assert!(!d.allowed);
    assert_eq!(d.before, [2 * S, 2 * S]);
    assert_eq!((r.get("a").await, r.get("b").await), stored);
    // The first one denying stops the second being charged too.
    let d = r.acquire(now, 1, &[b, a], None).await;
    assert!(!d.allowed);
    assert_eq!((r.get("a").await, r.get("b").await), stored);
    // Alone, the first still has room for 8.
    assert_eq!(r.admit(now, 10, &[a], None).await, 8);
}

#[tokio::test]
async fn quota_denial_charges_no_throttle() {
    let Some(mut r) = redis().await else { return };
    let t = throttle("t", S, 10);
    let q = quota(2, "D");
    let now = Now::on(2024, 5, 1, 3_600);
    let today = day(2024, 5, 1);
    let d = r.acquire(now, 1, &[t], Some(q)).await;
    assert_eq!(d.quota, Some([today, today + 1, 2, 0]));
    assert!(r.acquire(now, 1, &[t], Some(q)).await.allowed);
    let (stored, quota_state, history) = (r.get("t").await, r.hash("q").await, r.hash("h").await);
    let d = r.acquire(now, 1, &[t], Some(q)).await;
    assert_eq!(
        d,
        Decision {
            now,
            allowed: false,
            before: vec![2 * S],
            quota: Some([today, today + 1, 2, 2]),
        }
    );
    assert_eq!(r.get("t").await, stored);
    assert_eq!(r.hash("q").await, quota_state);
    assert_eq!(r.hash("h").await, history);
    assert_eq!(
        quota_state,
        [
            format!("b={} {}", now.0, now.1),
            format!("d={today}"),
            "n=2".to_owned(),
            format!("w={today}")
        ]
    );
    // A throttle that denies leaves the quota alone too.
    let tight = throttle("t2", S, 1);
    let other = Now::on(2024, 5, 2, 0);
    assert!(r.acquire(other, 1, &[tight], Some(q)).await.allowed);
    assert!(!r.acquire(other, 1, &[tight], Some(q)).await.allowed);
    let d = r.acquire(other, 0, &[], Some(q)).await;
    assert_eq!(d.quota, Some([today + 1, today + 2, 2, 1]));
}

#[tokio::test]
async fn shadow_limits_never_deny() {
    let Some(mut r) = redis().await else { return };
    let shadow = throttle("s", S, 1).shadow();
    let real = throttle("t", S, 3);
    let now = Now(2_000, 0);
    assert_eq!(r.admit(now, 3, &[shadow, real], None).await, 3);
    // The shadow throttle was charged once, then only looked at.
    let d = r.acquire(now, 1, &[shadow, real], None).await;
    assert_eq!((d.allowed, d.before.as_slice()), (false, &[S, 3 * S][..]));
    assert_eq!(r.get("s").await.as_deref(), Some("2001 0 1000000000 0 0 0"));

    // A shadow quota counts past its limit; the history has the overage.
    let q = Q {
        shadow: true,
        ..quota(1, "D")
    };
    let now = Now::on(2024, 6, 1, 60);
    let today = day(2024, 6, 1);
    assert_eq!(r.admit(now, 3, &[], Some(q)).await, 3);
    let d = r.acquire(now, 1, &[], Some(q)).await;
    assert_eq!(d.quota, Some([today, today + 1, 1, 3]));
    assert_eq!(r.hash("h").await, record(today, 4, -3, 1));
    // A real quota on the same count denies.
    let d = r.acquire(now, 1, &[], Some(quota(1, "D"))).await;
    assert!(!d.allowed);
}

impl Redis {
    /// Resets the quota (mode "z") at `now`.
    async fn reset_quota(&mut self, now: Now, q: Q) {
        let mut args = vec!["z".to_owned()];
        args.extend(time_args(Some(now)));
        args.extend(q.args());
        let reply = self.raw(&[QUOTA_KEY, HISTORY_KEY], &args).await;
        assert_eq!(reply.expect("a reset"), [now.0, now.1]);
    }

    /// Moves the quota's count by `delta` at `now` (mode "t", or "g" when
    /// `exact`) for units charged at `charged`.
    async fn give(&mut self, exact: bool, now: Now, delta: i64, q: Q, charged: Now) {
        let mut args = vec![if exact { "g" } else { "t" }.to_owned()];
        args.extend(time_args(Some(now)));
        args.extend([delta.to_string(), "0".to_owned(), "1".to_owned()]);
        args.extend(q.args());
        args.push(q.history_days.to_string());
        args.extend([charged.0.to_string(), charged.1.to_string()]);
        let reply = self.raw(&[QUOTA_KEY, HISTORY_KEY], &args).await;
        assert_eq!(reply.expect("a settlement"), [now.0, now.1]);
    }
}

/// A reset forgives what was charged before it, as a new window does: once
/// later decisions charged the count again, a refund ("t") or give-back
/// ("g") of a charge from before the reset still gets nothing (it would
/// grant the new count units twice); one of a charge at the reset's instant
/// or after it comes back as always. The mark lasts as the window's count.
#[tokio::test]
async fn a_charge_from_before_a_reset_comes_back_to_no_later_count() {
    let Some(mut r) = redis().await else { return };
    let q = quota(10, "D");
    let before = Now::on(2024, 5, 1, 10);
    let reset = Now::on(2024, 5, 1, 11);
    let after = Now::on(2024, 5, 1, 12);
    assert!(r.acquire(before, 9, &[], Some(q)).await.allowed);
    r.reset_quota(reset, q).await;
    assert_eq!(r.hash("h").await, Vec::<String>::new());
    let pttl = r.pttl("q").await;
    assert!(
        (DAY * 1_000..=2 * DAY * 1_000).contains(&pttl),
        "pttl {pttl}"
    );
    // Not charged since the reset: nothing to give back to.
    r.give(true, after, -1, q, reset).await;
    assert_eq!(
        r.acquire(reset, 10, &[], Some(q)).await.quota.unwrap()[3],
        0
    );
    r.give(true, after, -1, q, before).await;
    r.give(false, after, -8, q, before).await;
    assert_eq!(
        r.acquire(after, 0, &[], Some(q)).await.quota.unwrap()[3],
        10
    );
    r.give(false, after, -4, q, after).await;
    assert_eq!(r.acquire(after, 0, &[], Some(q)).await.quota.unwrap()[3], 6);
    r.give(true, after, -1, q, reset).await;
    assert_eq!(r.acquire(after, 0, &[], Some(q)).await.quota.unwrap()[3], 5);
    // An under-estimate is charged whenever it was reserved.
    r.give(false, after, 4, q, before).await;
    assert_eq!(r.acquire(after, 0, &[], Some(q)).await.quota.unwrap()[3], 9);
}

/// A count lost with Redis's data (a restart without persistence, a
/// failover) and made again by later decisions never counted what was
/// charged before it was made: a refund ("t") or give-back ("g") of such a
/// charge gets nothing, where it would grant the new count units twice;
/// one of a charge at its making or after it comes back as always.
#[tokio::test]
async fn a_charge_from_before_the_count_was_made_comes_back_to_nothing() {
    let Some(mut r) = redis().await else { return };
    let q = quota(10, "D");
    let before = Now::on(2024, 5, 1, 10);
    let made = Now::on(2024, 5, 1, 11);
    let after = Now::on(2024, 5, 1, 12);
    assert!(r.acquire(before, 5, &[], Some(q)).await.allowed);
    // The data is lost; the count is made again.
    r.del(&["q", "h"]).await;
    assert!(r.acquire(made, 10, &[], Some(q)).await.allowed);
    r.give(true, after, -5, q, before).await;
    r.give(false, after, -5, q, before).await;
    assert_eq!(
        r.acquire(after, 0, &[], Some(q)).await.quota.unwrap()[3],
        10
    );
    r.give(true, after, -1, q, made).await;
    assert_eq!(r.acquire(after, 0, &[], Some(q)).await.quota.unwrap()[3], 9);
    r.give(false, after, -2, q, after.plus(-1)).await;
    assert_eq!(r.acquire(after, 0, &[], Some(q)).await.quota.unwrap()[3], 7);
}

/// UpdateUsage ("s") marks the count as a reset does: units charged
/// before it are in what was set, so a give-back or refund of them later
/// (a share another instance held, a late settlement) gets nothing, where
/// it would raise what remains past what was set. Units charged after it
/// come back as always.
#[tokio::test]
async fn a_charge_from_before_an_update_usage_comes_back_to_nothing() {
    let Some(mut r) = redis().await else { return };
    let q = quota(10, "D");
    let before = Now::on(2024, 5, 1, 10);
    let set = Now::on(2024, 5, 1, 11);
    let after = Now::on(2024, 5, 1, 12);
    assert!(r.acquire(before, 6, &[], Some(q)).await.allowed);
    assert_eq!(r.set_remaining(set, 1, q).await[3], 9);
    r.give(true, after, -5, q, before).await;
    r.give(false, after, -5, q, before).await;
    let d = r.acquire(after, 0, &[], Some(q)).await;
    assert_eq!(d.quota.unwrap()[3], 9, "given back past what was set");
    assert!(r.acquire(after, 1, &[], Some(q)).await.allowed);
    assert!(!r.acquire(after, 1, &[], Some(q)).await.allowed);
    // A charge after the set comes back.
    r.give(true, after, -1, q, after).await;
    assert_eq!(r.acquire(after, 0, &[], Some(q)).await.quota.unwrap()[3], 9);
}

/// A reset on a clock that went back keeps the mark of the later reset
/// before it, as the memory store keeps its latest reset time: a charge
/// that reset forgave stays forgiven, and a refund or give-back of it gets
/// nothing from the count begun after (it would grant units twice).
#[tokio::test]
async fn a_reset_on_a_clock_gone_back_keeps_the_later_mark() {
    let Some(mut r) = redis().await else { return };
    let q = quota(10, "D");
    let charged = Now::on(2024, 5, 1, 10 * 3600);
    let reset = Now::on(2024, 5, 1, 11 * 3600);
    let back = Now::on(2024, 5, 1, 9 * 3600);
    assert!(r.acquire(charged, 9, &[], Some(q)).await.allowed);
    r.reset_quota(reset, q).await;
    // Redis's clock steps back an hour before the charge: a second reset.
    r.reset_quota(back, q).await;
    let later = back.plus(60 * S);
    assert!(r.acquire(later, 10, &[], Some(q)).await.allowed);
    r.give(true, later, -1, q, charged).await;
    r.give(false, later, -8, q, charged).await;
    let d = r.acquire(later, 0, &[], Some(q)).await;
    assert_eq!(d.quota.unwrap()[3], 10, "the forgiven charge came back");
    assert!(!r.acquire(later, 1, &[], Some(q)).await.allowed);
}

/// A share's give-back ("g") reaches every quota its call charged: as many
/// as a decision ("a") takes, nine (an account's, the plan's and a model's,
/// each a request quota and a day's and a month's tokens; a split decision
/// gives back one part at a time, a settlement at most two token quotas).
#[tokio::test]
async fn a_give_back_reaches_nine_quotas() {
    let Some(mut r) = redis().await else { return };
    let now = Now::on(2024, 5, 1, 3600);
    const N: usize = 9;
    let names: Vec<String> = (1..=N)
        .flat_map(|i| [format!("q{i}"), format!("h{i}")])
        .collect();
    let keys: Vec<&str> = names.iter().map(String::as_str).collect();
    let q = quota(10, "D");
    let mut args = vec!["a".to_owned()];
    args.extend(time_args(Some(now)));
    args.extend(["4", "0", &N.to_string()].map(str::to_owned));
    for _ in 0..N {
        args.extend(q.args());
        args.extend(["0", "31", "4", "0"].map(str::to_owned));
    }
    args.push("0".to_owned());
    let reply = r.raw(&keys, &args).await.expect("a decision");
    assert_eq!(reply[2], 1, "{reply:?}");
    let mut args = vec!["g".to_owned()];
    args.extend(time_args(Some(now.plus(S))));
    args.extend(["-3", "0", &N.to_string()].map(str::to_owned));
    for _ in 0..N {
        args.extend(q.args());
        args.push("31".to_owned());
    }
    args.extend([now.0.to_string(), now.1.to_string()]);
    let reply = r
        .raw(&keys, &args)
        .await
        .expect("a give-back of nine quotas");
    assert_eq!(reply, [now.0 + 1, now.1]);
    for i in 1..=N {
        let key = format!("q{i}");
        assert!(r.hash(&key).await.contains(&"n=1".to_owned()), "{key}");
    }
}

#[tokio::test]
async fn day_quota_resets_at_midnight_and_not_a_nanosecond_before() {
    let Some(mut r) = redis().await else { return };
    let q = quota(3, "D");
    let morning = Now::on(2024, 5, 1, 8 * 3_600);
    assert_eq!(r.admit(morning, 5, &[], Some(q)).await, 3);
    let midnight = Now::on(2024, 5, 2, 0);
    let d = r.acquire(midnight.plus(-1), 1, &[], Some(q)).await;
    assert!(!d.allowed);
    assert_eq!(d.quota, Some([day(2024, 5, 1), day(2024, 5, 2), 3, 3]));
    let d = r.acquire(midnight, 1, &[], Some(q)).await;
    assert!(d.allowed);
    assert_eq!(d.quota, Some([day(2024, 5, 2), day(2024, 5, 3), 3, 0]));
    // The quota key lives until a day after its window ends.
    let pttl = r.pttl("q").await;
    assert!(
        (2 * DAY * 1_000 - 1_000..=2 * DAY * 1_000).contains(&pttl),
        "pttl {pttl}"
    );
}

#[tokio::test]
async fn week_quota_starting_on_sunday() {
    let Some(mut r) = redis().await else { return };
    // 2024-01-03 is a Wednesday.
    let wed = Now::on(2024, 1, 3, 12 * 3_600);
    let d = r.acquire(wed, 0, &[], Some(quota(5, "W"))).await;
    assert_eq!(d.quota, Some([day(2024, 1, 1), day(2024, 1, 8), 5, 0]));
    let q = Q {
        week_start: 6,
        ..quota(2, "W")
    };
    r.del(&["q", "h"]).await;
    let d = r.acquire(wed, 2, &[], Some(q)).await;
    assert_eq!(d.quota, Some([day(2023, 12, 31), day(2024, 1, 7), 2, 0]));
    let sunday = Now::on(2024, 1, 7, 0);
    assert!(!r.acquire(sunday.plus(-1), 1, &[], Some(q)).await.allowed);
    let d = r.acquire(sunday, 2, &[], Some(q)).await;
    assert!(d.allowed);
    assert_eq!(d.quota, Some([day(2024, 1, 7), day(2024, 1, 14), 2, 0]));
    // Every start day, across a year end.
    let thu = Now::on(2026, 1, 1, 0);
    for start in 0..7 {
        let q = Q {
            week_start: start,
            ..quota(5, "W")
        };
        r.del(&["q", "h"]).await;
        let [first, end, ..] = r.acquire(thu, 0, &[], Some(q)).await.quota.unwrap();
        assert_eq!(end - first, 7);
        assert!(first <= day(2026, 1, 1) && day(2026, 1, 1) < end);
        // Day 0 (1970-01-01) was a Thursday: Monday is 0.
        assert_eq!((first + 3).rem_euclid(7), start, "start {start}");
    }
}

#[tokio::test]
async fn month_quota_across_feb_29_and_year_end() {
    let Some(mut r) = redis().await else { return };
    let q = quota(1, "M");
    let d = r.acquire(Now::on(2024, 2, 29, 0), 1, &[], Some(q)).await;
    assert!(d.allowed);
    assert_eq!(d.quota, Some([day(2024, 2, 1), day(2024, 3, 1), 1, 0]));
    let last = Now::on(2024, 3, 1, 0).plus(-1);
    assert!(!r.acquire(last, 1, &[], Some(q)).await.allowed);
    let d = r.acquire(Now::on(2024, 3, 1, 0), 1, &[], Some(q)).await;
    assert_eq!(d.quota, Some([day(2024, 3, 1), day(2024, 4, 1), 1, 0]));
    let d = r
        .acquire(Now::on(2024, 12, 31, 86_399), 1, &[], Some(q))
        .await;
    assert!(d.allowed);
    assert_eq!(d.quota, Some([day(2024, 12, 1), day(2025, 1, 1), 1, 0]));
    let d = r.acquire(Now::on(2025, 1, 1, 0), 1, &[], Some(q)).await;
    assert!(d.allowed);
    assert_eq!(d.quota, Some([day(2025, 1, 1), day(2025, 2, 1), 1, 0]));
    // February's length: 2023 28 days, 2000 29 (every 400 years), 2100 28.
    for (y, len) in [(2023, 28), (2000, 29), (2100, 28), (2400, 29)] {
        // A window earlier than the stored one would keep the stored one.
        r.del(&["q", "h"]).await;
        let peek = r.acquire(Now::on(y, 2, 15, 0), 0, &[], Some(quota(1, "M")));
        let [first, end, ..] = peek.await.quota.unwrap();
        assert_eq!((first, end - first), (day(y, 2, 1), len), "{y}");
    }
    // Every month of a year, against the crate's calendar.
    r.del(&["q", "h"]).await;
    for m in 1..=12u8 {
        let [first, end, ..] = r
            .acquire(Now::on(2031, m, 28, 0), 0, &[], Some(quota(1, "M")))
            .await
            .quota
            .unwrap();
        let next = if m == 12 {
            day(2032, 1, 1)
        } else {
            day(2031, m + 1, 1)
        };
        assert_eq!((first, end), (day(2031, m, 1), next), "month {m}");
    }
}

#[tokio::test]
async fn offset_applies_to_the_creation_window_only() {
    let Some(mut r) = redis().await else { return };
    let created = Now::on(2024, 5, 1, 100);
    let q = Q {
        offset: 3,
        created_s: created.0,
        ..quota(5, "D")
    };
    assert_eq!(r.admit(Now::on(2024, 5, 1, 200), 10, &[], Some(q)).await, 2);
    let d = r.acquire(Now::on(2024, 5, 1, 200), 0, &[], Some(q)).await;
    assert_eq!(d.quota.unwrap()[2], 2);
    assert_eq!(r.admit(Now::on(2024, 5, 2, 0), 10, &[], Some(q)).await, 5);
    // An offset above the limit leaves a negative limit: nothing passes.
    let q = Q {
        offset: 9,
        created_s: Now::on(2024, 5, 3, 0).0,
        ..q
    };
    let d = r.acquire(Now::on(2024, 5, 3, 1), 0, &[], Some(q)).await;
    assert_eq!(d.quota, Some([day(2024, 5, 3), day(2024, 5, 4), -4, 0]));
    assert!(!d.allowed, "not even a peek fits");
}

#[tokio::test]
async fn clock_going_back_keeps_the_count() {
    let Some(mut r) = redis().await else { return };
    let q = quota(2, "D");
    assert!(
        r.acquire(Now::on(2024, 5, 2, 10), 2, &[], Some(q))
            .await
            .allowed
    );
    let d = r
        .acquire(Now::on(2024, 5, 1, 86_000), 1, &[], Some(q))
        .await;
    assert!(!d.allowed);
    // The later window is kept, with its count and the day of its last
    // change (what is charged on the earlier day counts on that one).
    assert_eq!(d.quota, Some([day(2024, 5, 2), day(2024, 5, 3), 2, 2]));
    let later = day(2024, 5, 2);
    let made = Now::on(2024, 5, 2, 10);
    assert_eq!(
        r.hash("q").await,
        [
            format!("b={} {}", made.0, made.1),
            format!("d={later}"),
            "n=2".to_owned(),
            format!("w={later}")
        ]
    );
}

#[tokio::test]
async fn history_records_days_and_prunes_old_ones() {
    let Some(mut r) = redis().await else { return };
    let q = Q {
        history_days: 3,
        ..quota(10, "W")
    };
    // 2024-05-06 is a Monday.
    let mon = day(2024, 5, 6);
    assert!(
        r.acquire(Now::on(2024, 5, 6, 10), 3, &[], Some(q))
            .await
            .allowed
    );
    assert!(
        r.acquire(Now::on(2024, 5, 6, 20), 1, &[], Some(q))
            .await
            .allowed
    );
    assert_eq!(r.hash("h").await, record(mon, 4, 6, 10));
    assert!(
        r.acquire(Now::on(2024, 5, 7, 10), 2, &[], Some(q))
            .await
            .allowed
    );
    let two = [record(mon, 4, 6, 10), record(mon + 1, 2, 4, 10)].concat();
    // A decision of cost 0 charges nothing and records nothing.
    assert!(
        r.acquire(Now::on(2024, 5, 8, 10), 0, &[], Some(q))
            .await
            .allowed
    );
    let mut sorted = two.clone();
    sorted.sort();
    assert_eq!(r.hash("h").await, sorted);
    assert!(
        r.acquire(Now::on(2024, 5, 8, 10), 1, &[], Some(q))
            .await
            .allowed
    );
    let mut three = [two, record(mon + 2, 1, 3, 10).to_vec()].concat();
    three.sort();
    assert_eq!(r.hash("h").await, three);
    // Kept a month (31 days) past the history.
    let pttl = r.pttl("h").await;
    assert!((34 * DAY * 1_000 - 1_000..=34 * DAY * 1_000).contains(&pttl));
    // A fourth day drops the first, but for what remained after it: the
    // days after it in its week remain as much until they change it.
    assert!(
        r.acquire(Now::on(2024, 5, 9, 10), 1, &[], Some(q))
            .await
            .allowed
    );
    let mut three = [
        record(mon + 1, 2, 4, 10),
        record(mon + 2, 1, 3, 10),
        record(mon + 3, 1, 2, 10),
    ]
    .concat();
    three.push(format!("r:{mon}=6"));
    three.push(format!("l:{mon}=10"));
    three.sort();
    assert_eq!(r.hash("h").await, three);
    // A week later, only the new day is left, and what remained after the
    // latest day dropped.
    assert!(
        r.acquire(Now::on(2024, 5, 16, 10), 1, &[], Some(q))
            .await
            .allowed
    );
    let mut left = record(mon + 10, 1, 9, 10).to_vec();
    left.push(format!("r:{}=2", mon + 3));
    left.push(format!("l:{}=10", mon + 3));
    left.sort();
    assert_eq!(r.hash("h").await, left);
    // A denied request records nothing.
    let q1 = Q { limit: 1, ..q };
    assert!(
        !r.acquire(Now::on(2024, 5, 17, 10), 1, &[], Some(q1))
            .await
            .allowed
    );
    assert_eq!(r.hash("h").await, left);
}

#[tokio::test]
async fn a_conversion_is_made_as_of_the_change() {
    let Some(mut r) = redis().await else { return };
    // 10 of 10 used at 1/s (10 s ahead) at t = 100 s; at t = 101 s the bucket
    // becomes 1000/s (a 10 ms span), and the key is next used at 101.001 s.
    let slow = throttle("t", S, 10);
    assert_eq!(r.admit(Now(100, 0), 10, &[slow], None).await, 10);
    let fast = throttle("t", S / 1000, 10).since(101, 0);
    // As of the change: 9 s of 10 ahead, so 9 ms of 10; 1 ms later, 8 ms.
    let d = r.acquire(Now(101, 1_000_000), 1, &[fast], None).await;
    assert!(d.allowed);
    assert_eq!(d.before, [8 * S / 1000]);
    // A key whose bucket had refilled before the change is not converted.
    let other = throttle("o", S, 10);
    assert!(r.acquire(Now(100, 0), 1, &[other], None).await.allowed);
    let d = r
        .acquire(
            Now(200, 0),
            0,
            &[throttle("o", S / 1000, 10).since(150, 0)],
            None,
        )
        .await;
    assert_eq!(d.before, [0]);
    // A change time ahead of now (another instance's clock) converts at now.
    let late = throttle("l", S, 10);
    assert_eq!(r.admit(Now(300, 0), 10, &[late], None).await, 10);
    let d = r
        .acquire(
            Now(300, 0),
            0,
            &[throttle("l", S / 1000, 10).since(400, 0)],
            None,
        )
        .await;
    assert_eq!(d.before, [10 * S / 1000]);
    // A key written after the change (by an instance still on the old
    // numbers) cannot be told from one in debt at the change: it converts
    // as of the change, 110 s ahead of it, 220 s at twice the span, less
    // the 100 s since.
    let old = throttle("w", S, 10);
    assert_eq!(r.admit(Now(500, 0), 10, &[old], None).await, 10);
    let new = throttle("w", S, 20).since(400, 0);
    let d = r.acquire(Now(500, 0), 1, &[new], None).await;
    assert_eq!((d.allowed, d.before.as_slice()), (false, &[120 * S][..]));
}

/// A key untouched through two changes is converted at each in turn, the
/// time between them draining at the middle numbers: 1/s (burst 2) emptied
/// at 100 s, 2/s from 100 s (1 s ahead of a 1 s span), 1/s again from
/// 100.5 s (half a second ahead doubles to a whole one). Converted once,
/// from the key's span, it would be 1.5 s.
#[tokio::test]
async fn a_conversion_replays_each_change_the_key_missed() {
    let Some(mut r) = redis().await else { return };
    let now = Now(100, 0);
    assert_eq!(r.admit(now, 3, &[throttle("t", S, 2)], None).await, 2);
    let again = throttle("t", S, 2)
        .since(100, 500_000_000)
        .before("0 1000000000 100 0 0 2000000000 0 0 0");
    let d = r.acquire(now.plus(S / 2), 0, &[again], None).await;
    assert_eq!(d.before, [S]);
    assert_eq!(
        r.get("t").await.as_deref(),
        Some("101 500000000 2000000000 100 500000000 0")
    );
    // Stored under the current numbers: read as it is.
    let d = r.acquire(now.plus(S / 2), 0, &[again], None).await;
    assert_eq!(d.before, [S]);
}

#[tokio::test]
async fn lazy_rescale_keeps_the_share_in_use() {
    let Some(mut r) = redis().await else { return };
    // Emptied at 100/s, then 1/s: still empty, one more after a second.
    let fast = throttle("t", S / 100, 10);
    let slow = throttle("t", S, 10);
    let now = Now(50_000, 0);
    assert_eq!(r.admit(now, 10, &[fast], None).await, 10);
    let d = r.acquire(now, 1, &[slow], None).await;
    // ahead == old span scales to exactly the new span (1e8 * 1e10 > 2^53).
    assert_eq!((d.allowed, d.before.as_slice()), (false, &[10 * S][..]));
    // The conversion is kept even though the request was denied.
    assert_eq!(
        r.get("t").await.as_deref(),
        Some("50010 0 10000000000 0 0 0")
    );
    assert!(!r.acquire(now.plus(S - 1), 1, &[slow], None).await.allowed);
    assert_eq!(r.admit(now.plus(S), 3, &[slow], None).await, 1);
    // Converting back a second later: 9 of 10 in use carry over.
    let d = r.acquire(now.plus(2 * S), 0, &[fast], None).await;
    assert_eq!(d.before, [S / 100 * 9]);
    assert_eq!(
        r.get("t").await.as_deref(),
        Some("50002 90000000 100000000 0 0 0")
    );
    let d = r.acquire(now.plus(2 * S), 0, &[fast], None).await;
    assert_eq!(d.before, [S / 100 * 9]);

    // Locked out at 0.001/s, then 100/s: free again after 10 ms.
    let glacial = throttle("g", 1_000 * S, 1);
    let quick = throttle("g", S / 100, 1);
    assert!(r.acquire(now, 1, &[glacial], None).await.allowed);
    let d = r.acquire(now, 1, &[quick], None).await;
    assert_eq!((d.allowed, d.before.as_slice()), (false, &[S / 100][..]));
    assert!(
        !r.acquire(now.plus(S / 100 - 1), 1, &[quick], None)
            .await
            .allowed
    );
    assert!(
        r.acquire(now.plus(S / 100), 1, &[quick], None)
            .await
            .allowed
    );

    // Exact floor(ahead * new / old) where the product is far above 2^53.
    let odd = throttle("o", 333_333_333, 3);
    let big = throttle("o", 1_234_567_891, 7);
    assert!(r.acquire(now, 2, &[odd], None).await.allowed);
    let later = now.plus(123_456_789);
    let ahead = 2 * 333_333_333 - 123_456_789;
    let expected = (ahead as u128 * (7 * 1_234_567_891) / 999_999_999) as i64;
    let d = r.acquire(later, 0, &[big], None).await;
    assert_eq!(d.before, [expected]);
    // A full bucket stays full.
    let d = r
        .acquire(now.plus(10 * S), 0, &[throttle("o", S, 1)], None)
        .await;
    assert_eq!(d.before, [0]);
}

#[tokio::test]
async fn rescale_is_exact_for_any_spans() {
    let Some(mut r) = redis().await else { return };
    // A small deterministic generator (xorshift).
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |below: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % below
    };
    let now = Now(1_000_000, 123_456_789);
    for _ in 0..300 {
        let old = 1 + next((1 << 53) - 1);
        let ahead = 1 + next(old + old / 4);
        let bits = 1 + next(52);
        let interval = 1 + next(1 << bits);
        let burst = 1 + next(((1 << 53) - 1) / interval).min(u64::from(u32::MAX));
        let new = interval * burst;
        let tat = now.plus(ahead as i64);
        r.set("x", &format!("{} {} {old}", tat.0, tat.1)).await;
        let t = throttle("x", interval as i64, burst as i64);
        let d = r.acquire(now, 0, &[t], None).await;
        // Past the span (a bucket in debt) scales as the rest, up to the
        // largest TAT ahead a key holds.
        let expected = (u128::from(ahead) * u128::from(new) / u128::from(old)).min((1 << 53) - 1);
        assert_eq!(
            d.before,
            [expected as i64],
            "ahead {ahead} old {old} new {new}"
        );
    }
}

#[tokio::test]
async fn calendar_windows_match_the_crate() {
    let Some(mut r) = redis().await else { return };
    let (first, last) = (day(1970, 1, 1), day(2400, 12, 31));
    for (i, d) in (first..=last).step_by(53).enumerate() {
        let date = Date::from_days(d);
        let now = Now(d * DAY + 43_200, 0);
        r.del(&["q", "h"]).await;
        let month = r.acquire(now, 0, &[], Some(quota(1, "M"))).await;
        let (y, m) = (date.year(), date.month());
        let next = if m == 12 {
            day(y + 1, 1, 1)
        } else {
            day(y, m + 1, 1)
        };
        assert_eq!(month.quota.unwrap()[..2], [day(y, m, 1), next], "{date}");
        let start = (i % 7) as i64;
        let q = Q {
            week_start: start,
            ..quota(1, "W")
        };
        r.del(&["q", "h"]).await;
        let [begin, end, ..] = r.acquire(now, 0, &[], Some(q)).await.quota.unwrap();
        assert!(begin <= d && d < end && end - begin == 7, "{date}");
        assert_eq!((begin + 3).rem_euclid(7), start, "{date} from {start}");
    }
}

#[tokio::test]
async fn refund_gives_back_only_what_is_still_ahead() {
    let Some(mut r) = redis().await else { return };
    let t = throttle("t", S, 5);
    let now = Now(10_000, 0);
    assert!(r.acquire(now, 3, &[t], None).await.allowed);
    // A full refund restores the whole bucket: the key is gone.
    r.refund(now, 3, &[(t, now.plus(3 * S))]).await;
    assert_eq!(r.get("t").await, None);
    assert_eq!(r.admit(now, 6, &[t], None).await, 5);
    // A refund of more than was charged never overfills.
    let u = throttle("u", S, 5);
    assert!(r.acquire(now, 2, &[u], None).await.allowed);
    r.refund(now, 100, &[(u, now.plus(2 * S))]).await;
    assert_eq!(r.get("u").await, None);

    // Burst 1: A charged at 0 (TAT 1 s); B passed at 1.2 s (TAT 2.2 s); A's
    // refund at 1.5 s returns nothing, since A's share has refilled and B has it.
    let one = throttle("one", S, 1);
    let zero = Now(20_000, 0);
    assert!(r.acquire(zero, 1, &[one], None).await.allowed);
    assert!(
        r.acquire(zero.plus(1_200_000_000), 1, &[one], None)
            .await
            .allowed
    );
    let stored = r.get("one").await;
    assert_eq!(stored.as_deref(), Some("20002 200000000 1000000000 0 0 0"));
    r.refund(zero.plus(1_500_000_000), 1, &[(one, zero.plus(S))])
        .await;
    assert_eq!(r.get("one").await, stored);
    // Refunded at 0.5 s, A gives back the half second still ahead of now.
    let two = throttle("two", S, 2);
    assert!(r.acquire(zero, 1, &[two], None).await.allowed);
    assert!(r.acquire(zero, 1, &[two], None).await.allowed);
    r.refund(zero.plus(S / 2), 1, &[(two, zero.plus(S))]).await;
    assert_eq!(
        r.get("two").await.as_deref(),
        Some("20001 500000000 2000000000 0 0 0")
    );
    // Kept a day, on a time the caller gives.
    let pttl = r.pttl("two").await;
    assert!(
        (DAY * 1_000 - 1_000..=DAY * 1_000).contains(&pttl),
        "pttl {pttl}"
    );
    // A key whose span changed since is left alone.
    let other = throttle("two", S / 2, 2);
    r.refund(zero.plus(S / 2), 1, &[(other, zero.plus(S))])
        .await;
    assert_eq!(
        r.get("two").await.as_deref(),
        Some("20001 500000000 2000000000 0 0 0")
    );
    // Several keys at once; a missing one is skipped.
    r.refund(
        zero.plus(S / 2),
        1,
        &[(two, zero.plus(S)), (throttle("none", S, 1), zero)],
    )
    .await;
    assert_eq!(
        r.get("two").await.as_deref(),
        Some("20001 0 2000000000 0 0 0")
    );
    assert_eq!(r.get("none").await, None);
}

/// A reset ("f") fills the throttle and marks it with its time for the
/// throttle's span: a refund ("r") of a charge made before it gets nothing
/// back, though the charge's share has not refilled by the clock (the
/// reset refilled it; given back, it would be granted twice), while one
/// charged at the reset's instant or after it comes back as always. A
/// reset at an earlier time (a clock gone back) keeps the later mark.
#[tokio::test]
async fn a_charge_from_before_a_reset_comes_back_to_no_refilled_bucket() {
    let Some(mut r) = redis().await else { return };
    let t = throttle("t", S, 5);
    let before = Now(30_000, 0);
    assert!(r.acquire(before, 3, &[t], None).await.allowed);
    let reset = before.plus(S / 10);
    r.fill(reset, t).await;
    assert_eq!(r.get("t").await, None);
    assert_eq!(r.get("t:x").await.as_deref(), Some("30000 100000000"));
    // For a day, on a time the caller gives (the span, on the server's).
    let pttl = r.pttl("t:x").await;
    assert!(
        (DAY * 1_000 - 1_000..=DAY * 1_000).contains(&pttl),
        "pttl {pttl}"
    );
    let after = reset.plus(S / 10);
    assert_eq!(r.admit(after, 6, &[t], None).await, 5);
    let full = Some("30005 200000000 5000000000 0 0 0");
    assert_eq!(r.get("t").await.as_deref(), full);
    r.refund_charged(after, before, 3, &[(t, before.plus(3 * S))])
        .await;
    assert_eq!(r.get("t").await.as_deref(), full);
    r.refund_charged(after, reset, 1, &[(t, after.plus(5 * S))])
        .await;
    assert_eq!(
        r.get("t").await.as_deref(),
        Some("30004 200000000 5000000000 0 0 0")
    );
    r.refund_charged(after, after, 1, &[(t, after.plus(5 * S))])
        .await;
    assert_eq!(
        r.get("t").await.as_deref(),
        Some("30003 200000000 5000000000 0 0 0")
    );
    // A mark that is not the script's is an error when a refund reads it.
    r.set("t:x", "garbage").await;
    let mut args: Vec<String> = ["r", "30000", "200000000", "1", "1"]
        .map(str::to_owned)
        .to_vec();
    args.extend(["1000000000", "5", "30004", "0", "1", "30000", "0"].map(str::to_owned));
    let error = r.raw(&["t", "t:x"], &args).await.unwrap_err();
    assert!(error.to_string().contains("bad throttle state"), "{error}");
    r.del(&["t:x"]).await;
    // The clock gone back: the later mark stays.
    r.fill(after, t).await;
    r.fill(before, t).await;
    assert_eq!(r.get("t:x").await.as_deref(), Some("30000 200000000"));
}

#[tokio::test]
async fn set_remaining_updates_the_count_and_history() {
    let Some(mut r) = redis().await else { return };
    let q = quota(10, "W");
    let mon = day(2024, 5, 6);
    let tue = Now::on(2024, 5, 7, 3_600);
    assert!(
        r.acquire(Now::on(2024, 5, 6, 3_600), 3, &[], Some(q))
            .await
            .allowed
    );
    assert!(r.acquire(tue, 2, &[], Some(q)).await.allowed);
    // Above the limit: a one-off raise, the count goes below 0.
    assert_eq!(r.set_remaining(tue, 20, q).await, [mon, mon + 7, 10, -10]);
    let mut history = [record(mon, 3, 7, 10), record(mon + 1, 2, 20, 10)].concat();
    history.sort();
    assert_eq!(r.hash("h").await, history);
    assert_eq!(r.admit(tue, 30, &[], Some(q)).await, 20);
    r.set_remaining(tue, 0, q).await;
    assert!(!r.acquire(tue, 1, &[], Some(q)).await.allowed);
    // On a day without use yet, the day's record starts at 0 used.
    let wed = Now::on(2024, 5, 8, 0);
    assert_eq!(r.set_remaining(wed, 4, q).await, [mon, mon + 7, 10, 6]);
    assert!(
        r.hash("h")
            .await
            .iter()
            .any(|f| f == &format!("u:{}=0", mon + 2))
    );
    assert!(
        r.hash("h")
            .await
            .iter()
            .any(|f| f == &format!("r:{}=4", mon + 2))
    );
    // In a new window, it sets the new window's count.
    let next = Now::on(2024, 5, 13, 0);
    assert_eq!(
        r.set_remaining(next, 7, q).await,
        [mon + 7, mon + 14, 10, 3]
    );
    assert_eq!(r.admit(next, 10, &[], Some(q)).await, 7);
}

#[tokio::test]
async fn server_time_when_now_is_empty() {
    let Some(mut r) = redis().await else { return };
    let t = throttle("t", S, 2);
    let d = r
        .try_acquire(None, 1, &[t], None)
        .await
        .expect("a decision");
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970");
    let reply = d.now.0 as f64 + d.now.1 as f64 / 1e9;
    assert!(
        (reply - wall.as_secs_f64()).abs() < 5.0,
        "{:?} vs {wall:?}",
        d.now
    );
    assert!((0..S).contains(&d.now.1) && d.now.1 % 1_000 == 0);
    assert!(d.allowed);
    // The key is then dated on the server's clock too.
    let d = r
        .try_acquire(None, 1, &[t], None)
        .await
        .expect("a decision");
    assert!(d.allowed && (1..=S).contains(&d.before[0]), "{d:?}");
}

#[tokio::test]
async fn a_call_past_its_deadline_decides_nothing() {
    let Some(mut r) = redis().await else { return };
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_micros() as i64;
    // Mode a on the server's clock with a deadline; one throttle (1/s, burst
    // 2), no quota.
    let args = |deadline: i64| -> Vec<String> {
        let deadline = deadline.to_string();
        let interval = S.to_string();
        [
            "a", "", &deadline, "1", "1", &interval, "2", "0", "0", "0", "1", "", "0", "0",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let error = r
        .raw(&["t"], &args(now_us - 1_000_000))
        .await
        .expect_err("a call past its deadline fails");
    assert!(error.to_string().contains("expired"), "{error}");
    assert_eq!(r.get("t").await, None, "and charges nothing");
    let reply = r
        .raw(&["t"], &args(now_us + 60_000_000))
        .await
        .expect("a call within its deadline decides");
    assert_eq!(reply[2], 1);
    assert!(r.get("t").await.is_some());
}

#[tokio::test]
async fn concurrency_leases_cap_requests_in_flight_and_lapse() {
    let Some(mut r) = redis().await else { return };
    // Cap 2, leases of 100 ms; members a, b, c; mode a with no throttle and
    // no quota, at an explicit now.
    let args = |now_ms: i64, member: &str, mode: &str| -> Vec<String> {
        let (s, ns) = (now_ms / 1000, now_ms % 1000 * 1_000_000);
        [
            mode,
            &s.to_string(),
            &ns.to_string(),
            "1",
            "0",
            "0",
            "1",
            "2",
            "100",
            member,
            "0",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let mut admitted = Vec::new();
    for m in ["a", "b", "c"] {
        let reply = r
            .raw(&["c"], &args(1_000, m, "a"))
            .await
            .expect("a decision");
        admitted.push((reply[2], reply[3]));
    }
    // In flight before each: 0, 1, then 2 (the cap): the third is refused.
    assert_eq!(admitted, [(1, 0), (1, 1), (0, 2)]);
    // The leases lapse on the caller's time, not the server's: the set
    // lasts a day of the server's clock.
    let pttl = r.pttl("c").await;
    assert!(
        (DAY * 1_000 - 1_000..=DAY * 1_000).contains(&pttl),
        "pttl {pttl}"
    );
    // A peek charges nothing; a released lease frees its place.
    let reply = r.raw(&["c"], &args(1_000, "d", "p")).await.expect("a peek");
    assert_eq!((reply[2], reply[3]), (0, 2));
    let () = redis::cmd("ZREM")
        .arg("c")
        .arg("a")
        .query_async::<i64>(&mut r.conn)
        .await
        .map(|_| ())
        .expect("ZREM");
    let reply = r
        .raw(&["c"], &args(1_000, "c", "a"))
        .await
        .expect("a decision");
    assert_eq!((reply[2], reply[3]), (1, 1));
    // Leases lapse: 100 ms later nobody holds a place.
    let reply = r
        .raw(&["c"], &args(1_100, "e", "a"))
        .await
        .expect("a decision");
    assert_eq!((reply[2], reply[3]), (1, 0));
}

#[tokio::test]
async fn two_caps_are_taken_together_or_not_at_all() {
    let Some(mut r) = redis().await else { return };
    // A plan's cap of 3 (key caps:p) and a model's cap of 1 (key caps:m), leases of
    // 10 s, at one now.
    let args = |member: &str| -> Vec<String> {
        [
            "a", "1", "0", "1", "0", "0", "2", "3", "10000", member, "0", "1", "10000", member, "0",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let reply = r
        .raw(&["caps:p", "caps:m"], &args("a"))
        .await
        .expect("a decision");
    assert_eq!(reply[2..], [1, 0, 0]);
    // The model's cap is full: refused, and no place is taken under the
    // plan's cap either.
    for member in ["b", "c"] {
        let reply = r
            .raw(&["caps:p", "caps:m"], &args(member))
            .await
            .expect("a decision");
        assert_eq!(reply[2..], [0, 1, 1]);
    }
    let card = |key: &'static str| redis::cmd("ZCARD").arg(key).clone();
    let in_flight: (i64, i64) = redis::pipe()
        .add_command(card("caps:p"))
        .add_command(card("caps:m"))
        .query_async(&mut r.conn)
        .await
        .expect("ZCARD");
    assert_eq!(in_flight, (1, 1));
}

/// A renewal ("l") moves the end of the leases still in the set to a lease
/// from now, never sooner than it was, and never adds back one that is
/// gone (given back, or lapsed and removed by a decision): its place may
/// have been taken since.
#[tokio::test]
async fn a_renewal_extends_the_leases_still_held_and_adds_none_back() {
    let Some(mut r) = redis().await else { return };
    let args = |s: &str, lease: &str, members: &[&str]| -> Vec<String> {
        let mut a = vec![
            "l".to_owned(),
            s.to_owned(),
            "0".to_owned(),
            lease.to_owned(),
        ];
        a.extend(members.iter().map(|m| (*m).to_owned()));
        a
    };
    let take = |member: &str| -> Vec<String> {
        ["a", "1", "0", "1", "0", "0", "1", "2", "1000", member, "0"]
            .map(str::to_owned)
            .to_vec()
    };
    // Two places taken at 1 s with leases of 1 s: they lapse at 2000 ms.
    for member in ["a", "b"] {
        let reply = r.raw(&["c"], &take(member)).await.expect("a decision");
        assert_eq!(reply[2], 1, "{member} is let in");
    }
    let score = |member: &'static str| redis::cmd("ZSCORE").arg("c").arg(member).clone();
    // "b" is given back; "a" and "b" are renewed at 1.5 s for 1 s.
    let _: i64 = redis::cmd("ZREM")
        .arg("c")
        .arg("b")
        .query_async(&mut r.conn)
        .await
        .unwrap();
    let reply = r.raw(&["c"], &args("1", "1000", &["a", "b"])).await;
    assert_eq!(reply.expect("a renewal")[2], 1, "one of the two is held");
    let reply = r.raw(&["c"], &args("2", "500", &["a"])).await;
    assert_eq!(reply.expect("a renewal")[2], 1, "a shorter renewal");
    let (a, b): (Option<i64>, Option<i64>) = redis::pipe()
        .add_command(score("a"))
        .add_command(score("b"))
        .query_async(&mut r.conn)
        .await
        .unwrap();
    assert_eq!(
        (a, b),
        (Some(2500), None),
        "renewed to 2 s + 500 ms, not shortened"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg("c")
        .query_async(&mut r.conn)
        .await
        .unwrap();
    assert!(
        ttl > 900,
        "the set lasts a lease from the renewal: {ttl} ms"
    );
    // At 2.2 s "a" still holds the only place of a cap of 2 beside a new one,
    // and a third is refused.
    let at = |member: &str| -> Vec<String> {
        let mut a = take(member);
        a[1] = "2".to_owned();
        a[2] = "200000000".to_owned();
        a
    };
    assert_eq!(r.raw(&["c"], &at("c")).await.unwrap()[2], 1);
    assert_eq!(
        r.raw(&["c"], &at("d")).await.unwrap()[2],
        0,
        "a and c hold the cap"
    );
    // A renewal of members of which none is left writes nothing.
    let reply = r.raw(&["gone"], &args("3", "1000", &["x"])).await;
    assert_eq!(reply.expect("a renewal")[2], 0);
    let exists: i64 = redis::cmd("EXISTS")
        .arg("gone")
        .query_async(&mut r.conn)
        .await
        .unwrap();
    assert_eq!(exists, 0);
}

#[tokio::test]
async fn bad_arguments_answer_an_error_reply() {
    let Some(mut r) = redis().await else { return };
    // Keys, arguments ("" written as ~) and what the error says.
    let cases = [
        ("", "x 1 0", "unknown mode"),
        ("q h", "z 1 0 5 D 0 0", "wrong number"),
        ("q h", "z 1 0 5 X 0 0 0", "period"),
        ("", "", "unknown mode"),
        ("t", "a 1 0 1 1 1000 1 0 0 0 1", "wrong number"),
        ("t", "a 1 0 1 2 1000 1 0 0", "throttle count"),
        ("", "a 1 0 1 0 0 extra", "concurrency cap count"),
        ("", "a 1 0 1 0 0 3", "concurrency cap count"),
        ("c c", "a 1 0 1 0 0 2 1 100 m 0", "wrong number"),
        (
            "c c",
            "a 1 0 1 0 0 2 1 100 m 0 0 100 m 0",
            "concurrency cap",
        ),
        ("c", "a 1 0 1 0 0 2 1 100 m 0 1 100 m 0", "wrong number"),
        (
            "c c",
            "b 1 0 1 0 0 2 1 100 m 0 1 100 m 0 1 0",
            "wrong number",
        ),
        ("c", "a 1 0 1 0 0 1 0 100 m 0", "concurrency cap"),
        ("c", "a 1 0 1 0 0 1 2 100 m 0 x", "wrong number"),
        ("t", "a 1 0 1.5 1 1000 1 0 0 0 1 ~ 0 0", "cost"),
        ("t", "a 1 0 -1 1 1000 1 0 0 0 1 ~ 0 0", "cost"),
        ("t", "a 1 0 01 1 1000 1 0 0 0 1 ~ 0 0", "cost"),
        ("t", "a 1 0 1 1 1000 1 0 0 0 x ~ 0 0", "cost"),
        ("t", "a 1 1000000000 1 1 1000 1 0 0 0 1 ~ 0 0", "now"),
        ("t", "a x 0 1 1 1000 1 0 0 0 1 ~ 0 0", "now"),
        ("t", "a ~ 0 1 1 1000 1 0 0 0 1 ~ 0 0", "expired"),
        ("t", "a 1 0 1 1 0 1 0 0 0 1 ~ 0 0", "interval"),
        ("t", "a 1 0 1 1 1e3 1 0 0 0 1 ~ 0 0", "interval"),
        ("t", "a 1 0 1 1 1000 0 0 0 0 1 ~ 0 0", "burst"),
        ("t", "a 1 0 1 1 1000 1 yes 0 0 1 ~ 0 0", "shadow"),
        ("t", "a 1 0 1 1 9007199254740991 2 0 0 0 1 ~ 0 0", "2^53"),
        ("", "a 1 0 1 0 10", "quota count"),
        ("q h", "a 1 0 1 0 1 5 D 0 0 0 0 31 1 0", "wrong number"),
        ("q", "a 1 0 1 0 1 5 D 0 0 0 0 31 1 0 0", "wrong number"),
        ("q h", "a 1 0 1 0 1 5 Y 0 0 0 0 31 1 0 0", "period"),
        (
            "q h",
            "a 1 0 1 0 1 9007199254740993 D 0 0 0 0 31 1 0 0",
            "limit",
        ),
        ("q h", "a 1 0 1 0 1 5 W 7 0 0 0 31 1 0 0", "week start"),
        ("q h", "a 1 0 1 0 1 5 D 0 0 0 2 31 1 0 0", "quota shadow"),
        ("q h", "a 1 0 1 0 1 5 D 0 0 0 0 0 1 0 0", "history days"),
        (
            "q h",
            "a 1 0 1 0 1 5 D 0 0 0 0 31 1 2 0",
            "quota tokens flag",
        ),
        ("t", "r 1 0 1 1 1000 1 0", "wrong number"),
        ("t", "r 1 0 1 1 1000 1 0 0 1 0 0", "wrong number"),
        ("t x", "r 1 0 1 1 1000 1 0 0 1", "wrong number"),
        ("t x", "r 1 0 1 1 1000 1 0 -1 1 0 0", "own TAT"),
        ("t x", "r 1 0 1 1 1000 1 0 0 1 -1 0", "charge time"),
        ("t x", "r 1 0 1 1 1000 1 0 0 1 0 1000000000", "charge time"),
        ("t x", "f 1 0 1000", "wrong number"),
        ("t", "f 1 0 1000 1", "wrong number"),
        ("t x", "f 1 0 0 1", "interval"),
        ("t x", "f 1 0 1000 0", "burst"),
        ("t x", "f 1 0 9007199254740991 2", "2^53"),
        ("t", "t 1 0 5 1 1000", "wrong number"),
        ("t", "t 1 0 x 1 1000 1 0", "delta"),
        ("t", "t 1 0 5 2 1000 1 0", "throttle count"),
        ("", "t! 1 0 5 0 0 60000", "bad marker"),
        ("m", "t! 1 0 5 0 0 x", "bad marker"),
        ("m", "t!", "bad marker"),
        ("q h", "t 1 0 5 0 1 5 D 0 0 0 0", "history days"),
        ("q h", "s 1 0 5 10 D 0 0 0", "wrong number"),
        ("q h", "s 1 0 -5 10 D 0 0 0 31", "remaining"),
        ("q h", "s ~ ~ 5 10 M 0 x 0 31", "offset"),
        ("c", "l 1 0 1000", "wrong number"),
        ("c d", "l 1 0 1000 m", "wrong number"),
        ("c", "l 1 0 0 m", "lease"),
    ];
    for (keys, args, expected) in cases {
        let keys: Vec<&str> = keys.split_whitespace().collect();
        let args: Vec<String> = args
            .split_whitespace()
            .map(|a| {
                if a == "~" {
                    String::new()
                } else {
                    a.to_owned()
                }
            })
            .collect();
        let error = r
            .raw(&keys, &args)
            .await
            .expect_err(&format!("{args:?} must fail"));
        let text = error.to_string();
        assert!(
            text.contains("tollgate") && text.contains(expected),
            "{args:?}: {text}"
        );
    }
    assert_eq!(r.dbsize().await, 0, "bad input writes nothing");
    // The largest limit a quota takes, 2^53, is exact.
    let d = r
        .acquire(Now(1, 0), 1, &[], Some(quota(1 << 53, "D")))
        .await;
    assert_eq!(d.quota, Some([0, 1, 1 << 53, 0]));
    r.del(&["q", "h"]).await;
    // State that is not the script's is an error too, and left as it is.
    r.set("t", "garbage").await;
    let t = throttle("t", S, 1);
    let error = r
        .try_acquire(Some(Now(1, 0)), 1, &[t], None)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("bad throttle state"), "{error}");
    assert_eq!(r.get("t").await.as_deref(), Some("garbage"));
    // Redis' own errors (a throttle key holding a hash) come through.
    let d = r.try_acquire(Some(Now(1, 0)), 1, &[], Some(quota(1, "D")));
    assert!(d.await.expect("a decision").allowed);
    let hash = [throttle("q", S, 1)];
    let error = r
        .try_acquire(Some(Now(1, 0)), 1, &hash, None)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("WRONGTYPE"), "{error}");
}

#[tokio::test]
async fn integers_are_taken_only_as_rust_writes_them() {
    let Some(mut r) = redis().await else { return };
    // Mode a at an explicit now, one throttle "t": the request's cost and the
    // throttle's interval in turn take each spelling.
    let call = |cost: &str, interval: &str| -> Vec<String> {
        [
            "a", "100", "0", cost, "1", interval, "10", "0", "0", "0", "1", "", "0", "0",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    // Every other way tonumber reads a number is refused: signs, spaces,
    // leading zeros, fractions, exponents, hex, infinities.
    let refused = [
        "+1", " 1", "1 ", "\t1", "01", "00", "-0", "1.0", "1.", ".1e1", "1e0", "0x1", "0X1", "inf",
        "-inf", "nan", "1e309", "", "x", "1x",
    ];
    for v in refused {
        let error = r
            .raw(&["t"], &call(v, "1000"))
            .await
            .expect_err(&format!("cost {v:?} must fail"));
        assert!(error.to_string().contains("bad cost"), "{v:?}: {error}");
    }
    for v in [
        "0x3B9ACA00",
        "1E9",
        "1e9",
        "1000000000.0",
        "01000000000",
        " 1000000000",
    ] {
        let error = r
            .raw(&["t"], &call("1", v))
            .await
            .expect_err(&format!("interval {v:?} must fail"));
        assert!(error.to_string().contains("bad interval"), "{v:?}: {error}");
    }
    assert_eq!(r.dbsize().await, 0, "bad input writes nothing");
    // The same numbers written as Rust writes them are taken.
    for (cost, interval) in [("0", "1000"), ("1", "1000"), ("2", "1000000000")] {
        let reply = r.raw(&["t"], &call(cost, interval)).await.expect("taken");
        assert_eq!(reply[2], 1, "{cost} {interval}");
    }
    // Up to 2^53 - 1 a number is exact; the deadline's bound is 2^53 - 1, so
    // 2^53 (and what rounds to it) is refused.
    let deadline = |d: &str| -> Vec<String> {
        [
            "a", "", d, "0", "1", "1000", "10", "0", "0", "0", "0", "", "0", "0",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    for d in ["9007199254740992", "9007199254740993"] {
        let error = r.raw(&["t"], &deadline(d)).await.expect_err(d);
        assert!(error.to_string().contains("bad deadline"), "{d}: {error}");
    }
    let reply = r.raw(&["t"], &deadline("9007199254740991")).await;
    assert_eq!(reply.expect("a deadline far ahead")[2], 1);
}

/// A settlement sent "once" ("t!", "g!", "r!": its last key a marker, its
/// last argument the marker's life) is applied by its first run alone: sent
/// again because its reply was lost, it changes nothing while the marker
/// lasts, and another settlement (another marker) still applies.
#[tokio::test]
async fn a_settlement_sent_once_is_applied_once() {
    let Some(mut r) = redis().await else { return };
    let q = quota(10, "D");
    let now = Now::on(2024, 5, 1, 10);
    assert!(r.acquire(now, 1, &[], Some(q)).await.allowed);
    let settle = |marker: &'static str| {
        let mut args = vec!["t!".to_owned()];
        args.extend(time_args(Some(now)));
        args.extend(["4".to_owned(), "0".to_owned(), "1".to_owned()]);
        args.extend(q.args());
        args.push(q.history_days.to_string());
        args.push("60000".to_owned());
        (vec![QUOTA_KEY, HISTORY_KEY, marker], args)
    };
    for _ in 0..3 {
        let (keys, args) = settle("m1");
        let reply = r.raw(&keys, &args).await.expect("a settlement");
        assert_eq!(reply, [now.0, now.1]);
    }
    assert!((59_000..=60_000).contains(&r.pttl("m1").await));
    // 1 + 4 of 10 counted: 5 fit, the sixth does not.
    assert_eq!(r.admit(now, 6, &[], Some(q)).await, 5);
    r.del(&[QUOTA_KEY, HISTORY_KEY]).await;
    assert!(r.acquire(now, 1, &[], Some(q)).await.allowed);
    let (keys, args) = settle("m2");
    r.raw(&keys, &args).await.expect("a settlement");
    assert_eq!(
        r.admit(now, 6, &[], Some(q)).await,
        5,
        "a new marker applies"
    );
}

/// A settlement or a give-back that names as in force numbers older than
/// the key's own (sent by an instance yet to learn of a change) never
/// converts the key back to them: the key keeps its numbers, and what is
/// settled is converted to them from the reservation's, as of their coming
/// into force. Before, the key was converted back to the older span (its 3
/// s ahead of 20 halved), and the next decision under the new numbers
/// converted it forward again as of their change.
#[tokio::test]
async fn a_settlement_under_older_numbers_never_converts_the_key_back() {
    let Some(mut r) = redis().await else { return };
    // 1/s, burst 10 until 100 s, burst 20 since.
    let new = throttle("t", S, 20)
        .since(100, 0)
        .before("0 10000000000 0 0 0");
    let now = Now(101, 0);
    assert_eq!(r.admit(now, 3, &[new], None).await, 3);
    let kept = |tat: i64| Some(format!("{tat} 0 20000000000 100 0 0"));
    assert_eq!(r.get("t").await, kept(104));
    // The old numbers (interval, burst, since, tie), as reserved and as in
    // force: no earlier spans.
    let old = ["1000000000", "10", "0", "0", "0"].map(String::from);
    let in_force = |args: &mut Vec<String>| {
        args.extend(["1000000000", "10", "0", "0", ""].map(String::from));
    };
    // A charge of 1 unit under them: 1 s of 10, so 2 s of 20.
    let mut args = vec!["t".to_owned()];
    args.extend(time_args(Some(now)));
    args.extend(["1", "1"].map(String::from));
    args.extend(old.clone());
    in_force(&mut args);
    args.push("0".to_owned());
    r.raw(&["t"], &args).await.expect("a settlement");
    assert_eq!(r.get("t").await, kept(106));
    // A give-back of 1 unit charged under them (its share ending far
    // ahead): 2 s back.
    let mut args = vec!["r".to_owned()];
    args.extend(time_args(Some(now)));
    args.extend(["1", "1", "1000000000", "10", "200", "0", "1", "100", "0"].map(String::from));
    args.extend(["0", "0", "0"].map(String::from));
    in_force(&mut args);
    r.raw(&["t", &mark("t")], &args).await.expect("a give-back");
    assert_eq!(r.get("t").await, kept(104));
}

/// A decision that names numbers older than the key's own (made by an
/// instance yet to learn of a change) never converts the key back to them:
/// it is decided on the key's share in use expressed in its numbers, and
/// what it charges is converted to the key's, as the memory store decides
/// every request after the change under the new numbers. 1/s (burst 10)
/// until 100 s, 2/s since: 4 requests at 101 s leave the key 2 s ahead of
/// a 5 s span, so 6 more fit whoever decides them, and the bucket is full
/// for the new numbers too. Before, the key was converted back (4 s of
/// 10), charged 6 s there, and converted forward again as of the change
/// (11 s at 100 s, 5.5 s): half a request gained at each round trip.
#[tokio::test]
async fn a_decision_under_older_numbers_never_converts_the_key_back() {
    let Some(mut r) = redis().await else { return };
    let new = throttle("t", S / 2, 10)
        .since(100, 0)
        .before("0 10000000000 0 0 0");
    let old = throttle("t", S, 10);
    let now = Now(101, 0);
    assert_eq!(r.admit(now, 4, &[new], None).await, 4);
    let kept = |tat: i64, ns: i64| Some(format!("{tat} {ns} 5000000000 100 0 0"));
    assert_eq!(r.get("t").await, kept(103, 0));
    // The key's 2 s of 5, told as 4 s of the caller's 10; charged 0.5 s.
    let d = r.acquire(now, 1, &[old], None).await;
    assert_eq!((d.allowed, d.before.as_slice()), (true, &[4 * S][..]));
    assert_eq!(r.get("t").await, kept(103, 500_000_000));
    // A peek converts nothing either.
    let d = r.acquire(now, 0, &[old], None).await;
    assert_eq!(d.before, [5 * S]);
    assert_eq!(r.get("t").await, kept(103, 500_000_000));
    assert_eq!(r.admit(now, 10, &[old], None).await, 5);
    assert_eq!(r.get("t").await, kept(106, 0));
    assert_eq!(r.admit(now, 1, &[new], None).await, 0);
    // Half a second later, one more under either numbers.
    assert_eq!(r.admit(now.plus(S / 2), 2, &[old], None).await, 1);
    assert_eq!(r.admit(now.plus(S / 2), 1, &[new], None).await, 0);
    assert_eq!(r.get("t").await, kept(106, 500_000_000));
}

/// A decision under older numbers whose burst differs from the key's is
/// charged its share of the old bucket converted to the key's span, as a
/// settlement under them is (the key's interval is not in Redis): 1 of
/// burst 10 over 10 s is a tenth of the key's 20 s.
#[tokio::test]
async fn a_decision_under_an_older_burst_is_charged_its_share_of_the_key() {
    let Some(mut r) = redis().await else { return };
    let new = throttle("t", S, 20)
        .since(100, 0)
        .before("0 10000000000 0 0 0");
    let old = throttle("t", S, 10);
    let now = Now(101, 0);
    assert_eq!(r.admit(now, 3, &[new], None).await, 3);
    assert_eq!(
        r.get("t").await.as_deref(),
        Some("104 0 20000000000 100 0 0")
    );
    // 3 s of 20, told as 1.5 s of 10: 8 fit (1.5 + 8 <= 10), 2 s each.
    assert_eq!(r.admit(now, 10, &[old], None).await, 8);
    assert_eq!(
        r.get("t").await.as_deref(),
        Some("120 0 20000000000 100 0 0")
    );
    // The key's last second (9.5 s of 10 as told) fits one under its own.
    assert_eq!(r.admit(now, 2, &[new], None).await, 1);
}
