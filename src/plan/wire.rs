//! Plans as text, for a registry shared between instances: one line per
//! limit, numbers exact (a rate as its IEEE bits), names length-prefixed so
//! that any character may appear in them. Decoding goes through the public
//! builders, so a plan read back is checked as one written by hand is.

// Read back only by the Redis store's shared registry.
#![cfg_attr(not(feature = "redis"), allow(dead_code))]

use std::fmt::Write as _;

use super::{Account, FailureMode, ModelLimits, Quota, Throttle, TokenBudget, UsagePlan};
use crate::window::{Date, Period, Weekday};

/// `plan` as text, with `created_at` (wall nanoseconds: when the plan first
/// existed, which quota offsets count from).
pub(crate) fn encode_plan(plan: &UsagePlan, created_at: i64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "name {}", text(&plan.name));
    let _ = writeln!(out, "created {created_at}");
    if let Some(t) = &plan.throttle {
        let _ = writeln!(out, "throttle {}", throttle(t));
    }
    if let Some(q) = &plan.quota {
        let _ = writeln!(out, "quota {} {} {}", q.limit, period(q.period), offset(q));
    }
    for (path, t) in &plan.methods {
        let _ = writeln!(out, "method {} {}", throttle(t), text(path));
    }
    if let Some(t) = &plan.tokens {
        let _ = writeln!(out, "tokens {}", tokens(t));
    }
    // A model's limits, one line each, its name last.
    for (name, m) in &plan.models {
        let name = text(name);
        let _ = writeln!(out, "model {name}");
        if let Some(t) = &m.throttle {
            let _ = writeln!(out, "model-throttle {} {name}", throttle(t));
        }
        if let Some(q) = &m.quota {
            let (l, p, o) = (q.limit, period(q.period), offset(q));
            let _ = writeln!(out, "model-quota {l} {p} {o} {name}");
        }
        if let Some(t) = &m.tokens {
            let _ = writeln!(out, "model-tokens {} {name}", tokens(t));
        }
        if let Some(c) = m.concurrency {
            let _ = writeln!(out, "model-concurrency {c} {name}");
        }
    }
    if let Some(c) = plan.concurrency {
        let _ = writeln!(out, "concurrency {c}");
    }
    let failure = match plan.failure {
        FailureMode::Local => "local",
        FailureMode::Open => "open",
        FailureMode::Closed => "closed",
    };
    let _ = writeln!(out, "failure {failure}");
    let _ = writeln!(out, "borrow {}", u8::from(plan.borrow));
    let _ = writeln!(out, "shadow {}", u8::from(plan.shadow));
    out
}

/// A plan and its creation time from [`encode_plan`]'s text.
pub(crate) fn decode_plan(s: &str) -> Result<(UsagePlan, i64), String> {
    let mut plan: Option<UsagePlan> = None;
    let mut created = None;
    for line in s.lines().filter(|l| !l.is_empty()) {
        let (field, rest) = line.split_once(' ').unwrap_or((line, ""));
        if field == "name" {
            plan = Some(UsagePlan::new(read_text(rest)?.0));
            continue;
        }
        let p = plan.take().ok_or("a plan starts with its name")?;
        let mut words = rest.split(' ');
        let mut word = || words.next().ok_or_else(|| format!("short `{field}` line"));
        plan = Some(match field {
            "created" => {
                created = Some(number::<i64>(word()?)?);
                p
            }
            "throttle" => p.throttle(read_throttle(word()?, word()?)?),
            "quota" => {
                let limit = number(word()?)?;
                let period = read_period(word()?)?;
                let q = Quota::new(limit, period).map_err(|e| e.to_string())?;
                p.quota(read_offset(q, word()?)?)
            }
            "method" => {
                let t = read_throttle(word()?, word()?)?;
                let at = rest.splitn(3, ' ').nth(2).ok_or("a method needs a path")?;
                p.method(read_text(at)?.0, t)
            }
            "tokens" => p.tokens(read_tokens(word()?, word()?, word()?)?),
            "model" => p.model(read_text(rest)?.0, ModelLimits::new()),
            "model-throttle" | "model-quota" | "model-tokens" | "model-concurrency" => {
                let n = match field {
                    "model-concurrency" => 1,
                    "model-throttle" => 2,
                    _ => 3,
                };
                let at = rest
                    .splitn(n + 1, ' ')
                    .nth(n)
                    .ok_or("a model needs its name")?;
                let name = read_text(at)?.0;
                let mut m = p
                    .get_models()
                    .find(|(n, _)| *n == name)
                    .map(|(_, m)| *m)
                    .ok_or("a model's limits follow its name")?;
                m = match field {
                    "model-throttle" => m.throttle(read_throttle(word()?, word()?)?),
                    "model-quota" => {
                        let limit = number(word()?)?;
                        let period = read_period(word()?)?;
                        let q = Quota::new(limit, period).map_err(|e| e.to_string())?;
                        m.quota(read_offset(q, word()?)?)
                    }
                    "model-concurrency" => m.concurrency(number(word()?)?),
                    _ => m.tokens(read_tokens(word()?, word()?, word()?)?),
                };
                p.model(name, m)
            }
            "concurrency" => p.concurrency(number(word()?)?),
            "failure" => p.failure(match word()? {
                "local" => FailureMode::Local,
                "open" => FailureMode::Open,
                "closed" => FailureMode::Closed,
                other => return Err(format!("unknown failure mode `{other}`")),
            }),
            "borrow" => p.borrow(word()? == "1"),
            "shadow" => p.shadow(word()? == "1"),
            other => return Err(format!("unknown field `{other}`")),
        });
    }
    let plan = plan.ok_or("no plan")?;
    Ok((plan, created.ok_or("no creation time")?))
}

/// `account` as text: the lines of a plan with its name and limits.
pub(crate) fn encode_account(account: &Account, created_at: i64) -> String {
    let mut plan = UsagePlan::new(account.name());
    plan.throttle = account.get_throttle();
    plan.quota = account.get_quota();
    plan.tokens = account.get_tokens();
    encode_plan(&plan, created_at)
}

/// An account and its creation time from [`encode_account`]'s text.
pub(crate) fn decode_account(s: &str) -> Result<(Account, i64), String> {
    let (plan, created) = decode_plan(s)?;
    let mut account = Account::new(plan.name());
    if let Some(t) = plan.get_throttle() {
        account = account.throttle(t);
    }
    if let Some(q) = plan.get_quota() {
        account = account.quota(q);
    }
    if let Some(t) = plan.get_tokens() {
        account = account.tokens(t);
    }
    Ok((account, created))
}

/// A name or path: its length in bytes, a colon, then itself.
fn text(s: &str) -> String {
    format!("{}:{s}", s.len())
}

/// A [`text`] at the start of `s`; returns it and what follows.
fn read_text(s: &str) -> Result<(String, &str), String> {
    let (len, rest) = s.split_once(':').ok_or("a name needs its length")?;
    let len: usize = number(len)?;
    let name = rest.get(..len).ok_or("a name is cut short")?;
    Ok((name.to_owned(), &rest[len..]))
}

fn throttle(t: &Throttle) -> String {
    format!("{:016x} {}", t.rate().to_bits(), t.burst())
}

/// A token budget's per minute, day and month, `-` for none.
fn tokens(t: &TokenBudget) -> String {
    let n = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    format!(
        "{} {} {}",
        n(t.get_per_minute().map(u64::from)),
        n(t.get_per_day()),
        n(t.get_per_month())
    )
}

fn read_tokens(m: &str, d: &str, mo: &str) -> Result<TokenBudget, String> {
    let mut b = TokenBudget::new();
    if m != "-" {
        b = b.per_minute(number(m)?).map_err(|e| e.to_string())?;
    }
    if d != "-" {
        b = b.per_day(number(d)?).map_err(|e| e.to_string())?;
    }
    if mo != "-" {
        b = b.per_month(number(mo)?).map_err(|e| e.to_string())?;
    }
    Ok(b)
}

fn read_throttle(rate: &str, burst: &str) -> Result<Throttle, String> {
    let bits = u64::from_str_radix(rate, 16).map_err(|_| format!("bad rate `{rate}`"))?;
    Throttle::new(f64::from_bits(bits), number(burst)?).map_err(|e| e.to_string())
}

/// A quota's offset, and the day of its plan's creation when given:
/// `200`, or `200@20428` (days since 1970-01-01).
fn offset(q: &Quota) -> String {
    match q.created() {
        Some(d) => format!("{}@{}", q.offset(), d.days()),
        None => q.offset().to_string(),
    }
}

/// `q` with the offset (and creation day) of an [`offset`] word.
fn read_offset(q: Quota, s: &str) -> Result<Quota, String> {
    let (offset, created) = match s.split_once('@') {
        Some((o, d)) => (o, Some(Date::from_days(number(d)?))),
        None => (s, None),
    };
    let q = q.with_offset(number(offset)?).map_err(|e| e.to_string())?;
    Ok(match created {
        Some(d) => q.created_on(d),
        None => q,
    })
}

fn period(p: Period) -> String {
    match p {
        Period::Day => "DAY".to_owned(),
        Period::Month => "MONTH".to_owned(),
        Period::Week(d) => format!("WEEK-{}", d.days_from_monday()),
    }
}

fn read_period(s: &str) -> Result<Period, String> {
    Ok(match s {
        "DAY" => Period::Day,
        "MONTH" => Period::Month,
        _ => {
            let n: i64 = s
                .strip_prefix("WEEK-")
                .and_then(|n| n.parse().ok())
                .filter(|n| (0..7).contains(n))
                .ok_or_else(|| format!("bad period `{s}`"))?;
            Period::Week(Weekday::from_days_from_monday(n))
        }
    })
}

fn number<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("bad number `{s}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_comes_back_as_it_was_written() {
        let plan = UsagePlan::new("pro plan: 2 ☃")
            .throttle(Throttle::new(0.1 + 0.2, 7).unwrap())
            .quota(
                Quota::new(1_000, Period::Week(Weekday::Thursday))
                    .unwrap()
                    .with_offset(5)
                    .unwrap(),
            )
            .method("/v1/chat completions/POST", Throttle::new(1.5, 2).unwrap())
            .method("/*/*", Throttle::new(3.0, 4).unwrap())
            .tokens(
                TokenBudget::new()
                    .per_minute(100)
                    .unwrap()
                    .per_month(9)
                    .unwrap(),
            )
            .concurrency(3)
            .model(
                "big model: ☃",
                ModelLimits::new()
                    .throttle(Throttle::new(0.5, 2).unwrap())
                    .quota(
                        Quota::new(10, Period::Day)
                            .unwrap()
                            .with_offset(3)
                            .unwrap()
                            .created_on(Date::new(2026, 12, 6).unwrap()),
                    )
                    .tokens(TokenBudget::new().per_day(5).unwrap())
                    .concurrency(2),
            )
            .model(
                "*",
                ModelLimits::new().throttle(Throttle::new(9.0, 9).unwrap()),
            )
            .failure(FailureMode::Closed)
            .borrow(false)
            .shadow(true);
        let text = encode_plan(&plan, -42);
        let (back, created) = decode_plan(&text).unwrap();
        assert_eq!(created, -42);
        assert_eq!(encode_plan(&back, -42), text);
        assert_eq!(back.get_throttle().unwrap().rate(), 0.1 + 0.2);
        assert_eq!(back.name(), "pro plan: 2 ☃");
        let (_, big) = back.get_models().next().unwrap();
        assert_eq!(big.get_concurrency(), Some(2));
        let bare = UsagePlan::new("b");
        assert_eq!(
            encode_plan(&decode_plan(&encode_plan(&bare, 1)).unwrap().0, 1),
            encode_plan(&bare, 1)
        );
    }

    #[test]
    fn an_account_comes_back_as_it_was_written() {
        let account = Account::new("acme")
            .throttle(Throttle::new(2.5, 4).unwrap())
            .quota(Quota::new(50, Period::Month).unwrap())
            .tokens(TokenBudget::new().per_day(1_000).unwrap());
        let text = encode_account(&account, 9);
        let (back, created) = decode_account(&text).unwrap();
        assert_eq!((encode_account(&back, 9), created), (text, 9));
    }

    #[test]
    fn bad_text_is_an_error_not_a_panic() {
        for bad in [
            "",
            "throttle 1 2",
            "name 99:x",
            "name 1:x\nquota 0 DAY 0",
            "name 1:x\nquota 5 WEEK-9 0",
            "name 1:x\nthrottle zz 1",
            "name 1:x\nmethod 3ff0000000000000 1",
            "name 1:x\ncreated 1\nwhat 1",
            "name 1:x\nfailure maybe",
        ] {
            assert!(decode_plan(bad).is_err(), "{bad:?}");
        }
    }
}
