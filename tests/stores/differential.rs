//! Differential test: generated sequences of operations run on the memory
//! store, on the Redis store (a real `redis-server` on a free port) and on an
//! executable model of DESIGN.md's semantics (`differential/model.rs`,
//! written from the design, not from the crate's code), and every answer
//! must agree between them: allowed or denied, the limit named, the reason,
//! the exact retry, and what the `RateLimit` header shows as remaining.
//!
//! The operations: requests of various costs through `decide` and `check`
//! (cost 0 is a peek), HTTP requests through the layer as a tower service
//! (token estimates whose actual usage is settled when the response ends,
//! responses held open to keep a concurrency place, requests on the route
//! of a method override, or on routes that overrides with wildcard routes
//! and methods match, the plan's and the stage's, HEAD requests among them,
//! the most specific applying), ending held responses,
//! and manual-clock steps: small, exactly to the retry a denial gave (and one nanosecond short of
//! it), to just around UTC midnight or the quota window's end (a week from
//! Monday or another day, a month), hours and days long. Calendar sequences
//! start in May 2024 or around the leap day 2028-02-29 and the end of March
//! 2028 (31 days, then April's 30), close to a window's end. Between requests,
//! admin operations through the layer's `Admin`: UpdateUsage (what remains,
//! from nothing to past the limit), a reset, disabling and enabling the
//! key, and moving it to another plan and back; and usage reports (AWS
//! GetUsage) of the plans and the account, which the memory and Redis stores must answer
//! alike (the model keeps no history). With `DIFF_PLAN_CHANGES` set,
//! calendar and admin sequences put the plan anew with a quota of another
//! limit and period (DAY, WEEK from any day, MONTH), which a key's count
//! survives only in the window of the new period holding its last change,
//! and token sequences with another per-minute budget (the plan's, its
//! named model's, or the account's while its keys' settlements are
//! pending), on buckets in debt
//! after settlements too, and with responses held across the change (their
//! settlement converted to the new numbers). Plans carry quotas of every
//! period with an AWS `offset`; an account's limits (a throttle, a quota, a
//! token budget whose estimates are settled as the plan's are) are shared
//! by two keys, and a stage throttle and method override by every caller;
//! a named model's limits (a throttle, a quota, a token budget per minute
//! and per day, a concurrency cap) apply besides the plan's to the requests
//! that name it, and the plan's `"*"` entry's (a throttle, perhaps a quota
//! and a token budget) to those naming another model or none, direct
//! decisions included. A plan's token budget may hold a `per_month` quota too,
//! from starts close to the month's end. A shadow plan's limits (a
//! throttle, a method override, a token budget, a quota, a cap, and its
//! named model's and `"*"` entry's) decide,
//! count and report but never reject, while an account's and the stage's
//! still do. One kind stacks every request limit in one decision (stage,
//! account, plan, method override, the named model's throttle, calendar
//! quota with an offset and concurrency cap, the `"*"` entry), or names the
//! model with no limits (`{}`, which keeps the `"*"` entry off it). Between
//! requests, a key's standing (a peek at cost 0) must show what each limit
//! has left and when it is full again, a cap's free places included, or
//! the refusal a full cap, a used-up quota or a bucket in debt gives.
//!
//! The conformance suite checks chosen sequences; this one checks the rules
//! across limits (one atomic decision, the longest-holding limit named, a
//! cost no limit can ever hold refused without retry, peeks charging
//! nothing, emission intervals rounded up) on sequences nobody chose.
//!
//! Run: `cargo test --all-features --test stores differential`. The Redis tests need
//! `redis-server` on PATH; with `CI` set they fail without it.

mod model;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tokio::sync::oneshot;
use tollgate::extract::{ApiKeyHeader, ClientIp, RequestView};
use tollgate::store::Store;
use tollgate::{
    Account, AdminError, Anonymous, ApiKey, ManualClock, MemoryStore, ModelLimits, Period, Policy,
    Quota, RateLimitLayer, Reason, RedisStore, Rejection, ResponseBody, Stage, Throttle,
    TokenBudget, UsagePlan, Weekday,
};
use tower::{Layer, ServiceExt};

use self::model::{
    Answer, Ask, Bucket, CalendarQuota, Header, Limits, Model, NANOS_PER_DAY, Reservation, Why,
    window,
};
use crate::support::redis::{RedisCluster, RedisServer, require_redis};

/// The route of the method override (`"/v1/completions/POST"`).
const ROUTE: &str = "/v1/completions";
/// What HTTP requests ask for: another route, the override's, and routes
/// that method overrides with wildcards match or not, HEAD requests among
/// them (which a GET override holds, a HEAD one more specifically).
const ROUTES: [(&str, &str); 8] = [
    ("GET", "/other"),
    ("POST", ROUTE),
    ("GET", ROUTE),
    ("POST", "/v1/models"),
    ("POST", "/v2/completions"),
    ("HEAD", "/v1/models"),
    ("HEAD", ROUTE),
    ("GET", "/v1/models"),
];
/// Method overrides with wildcards, no two of them tied for a request
/// of [`ROUTES`] (AWS: the most specific one applies).
const PATTERNS: [&str; 9] = [
    "/v1/completions/POST",
    "/v1/completions/*",
    "/v1/*/POST",
    "/v1/*/*",
    "/*/POST",
    "/*/*",
    "/other/GET",
    "/v1/models/GET",
    "/v1/*/HEAD",
];
/// 2024-05-01T00:00:00Z in nanoseconds since the Unix epoch.
const MAY_1: i128 = 1_714_521_600 * 1_000_000_000;

// ---------------------------------------------------------------- plans

/// The plans under test, kept simple: one concern (or one pair) each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A throttle alone.
    Throttle,
    /// A throttle and a DAY quota.
    ThrottleQuota,
    /// A throttle and a method override on [`ROUTE`] (POST).
    Method,
    /// A shadow plan (perhaps a throttle, a method override, a token
    /// budget, a calendar quota, a concurrency cap, a named model's
    /// throttle, DAY quota, token budget and cap, a `"*"` entry's throttle,
    /// quota and budget), three keys of which two of an account
    /// with perhaps a throttle, perhaps under a stage throttle: the plan's
    /// limits never reject, the account's and the stage's do.
    Shadow,
    /// Perhaps a throttle, and method overrides of several [`PATTERNS`]
    /// (wildcard routes and methods), each with its own throttle, on the
    /// plan and on the stage (a stage override is one bucket for both
    /// keys); requests for several [`ROUTES`], HEAD among them (a GET
    /// override holds it, a HEAD one more specifically): on each, the most
    /// specific match applies.
    Wildcards,
    /// A token budget: per minute, perhaps per day and per month.
    Tokens,
    /// A concurrency cap, with or without a throttle.
    Concurrency,
    /// A quota of any period (a week from Monday or from another day, a
    /// month) with an AWS `offset`, with or without a throttle.
    Calendar,
    /// A calendar quota (with an offset), a throttle, a concurrency cap or a
    /// token budget, perhaps a `"*"` model entry (a throttle, perhaps a DAY
    /// quota) that every request passes, and admin operations between
    /// requests: UpdateUsage, a reset (of the `"*"` entry's limits too),
    /// disabling and enabling the key, moving it to plan `"q"` (which has
    /// no `"*"` entry) and back (with responses in flight, settled under
    /// the plan that admitted them).
    Admin,
    /// Three keys, two of them of an account (a throttle, a calendar
    /// quota), all under a stage throttle and a stage method override, on
    /// a plan of a throttle or a DAY quota; admin operations on each key,
    /// moves to plan `"q"` among them (a key keeps its account on any
    /// plan).
    Shared,
    /// Three keys, two of them of an account with a token budget (per
    /// minute, perhaps per day) and perhaps a throttle, on a plan with or
    /// without a token budget of its own and a concurrency cap, perhaps
    /// under a stage throttle: estimates settled on the account's budget
    /// and the plan's alike, responses held across others' requests.
    AccountTokens,
    /// A named model with a throttle (perhaps a DAY quota), a token budget
    /// per minute (perhaps per day) and perhaps a concurrency cap of its
    /// own, on a plan with or without a budget and a cap, two of three keys
    /// of an account with perhaps a token budget: requests name the model
    /// in several spellings, so that some pass the model's limits and some
    /// do not; perhaps a `"*"` entry, which the others share.
    ModelTokens,
    /// Registered keys (two of an account) and anonymous clients (by IP)
    /// together under a stage throttle, a plan with a named model's
    /// throttle and quota that requests name in several spellings, perhaps
    /// a `"*"` entry (a throttle, perhaps a quota) of the others, and the
    /// plan put anew with other numbers (the `"*"` entry's too) between
    /// requests, among admin operations: a reset (the `"*"` entry's limits
    /// with the plan's), UpdateUsage, moves to plan `"q"`, which has no
    /// `"*"` entry, and back.
    Mixed,
    /// Every kind of request limit in one decision: perhaps a stage
    /// throttle and method override, an account (perhaps a throttle, a
    /// calendar quota with an offset) of two of three keys, a plan with
    /// perhaps a throttle, a method override, a calendar quota and a
    /// concurrency cap, its named model with a throttle, a calendar quota
    /// (a week from any day, a month, with an offset) and a concurrency
    /// cap of its own, or named with no limits at all (`{}`, which keeps
    /// the `"*"` entry off it), or not named; perhaps a `"*"` entry (a
    /// throttle, perhaps a quota); admin operations between requests.
    Stack,
}

/// A rate of `num/den` per second and a burst.
#[derive(Clone, Copy, Debug)]
struct Rate {
    num: u32,
    den: u32,
    burst: u32,
}

impl Rate {
    fn throttle(self) -> Throttle {
        Throttle::new(f64::from(self.num) / f64::from(self.den), self.burst).unwrap()
    }
}

/// A calendar quota: `limit` per `period`, `offset` fewer in the window of
/// the plan's creation.
#[derive(Clone, Copy, Debug)]
struct QuotaSpec {
    limit: u64,
    period: model::Period,
    offset: u64,
}

impl QuotaSpec {
    fn day(limit: u64) -> QuotaSpec {
        QuotaSpec {
            limit,
            period: model::Period::Day,
            offset: 0,
        }
    }

    fn quota(self) -> Quota {
        const DAYS: [Weekday; 7] = [
            Weekday::Monday,
            Weekday::Tuesday,
            Weekday::Wednesday,
            Weekday::Thursday,
            Weekday::Friday,
            Weekday::Saturday,
            Weekday::Sunday,
        ];
        let period = match self.period {
            model::Period::Day => Period::Day,
            model::Period::Week(0) => Period::WEEK,
            model::Period::Week(d) => Period::Week(DAYS[d as usize]),
            model::Period::Month => Period::Month,
        };
        let q = Quota::new(self.limit, period).unwrap();
        match self.offset {
            0 => q,
            o => q.with_offset(o).unwrap(),
        }
    }

    fn model(self, name: &'static str, created: i128) -> CalendarQuota {
        CalendarQuota {
            offset: self.offset,
            created,
            ..CalendarQuota::new(name, self.limit, self.period)
        }
    }
}

#[derive(Clone, Debug)]
struct Spec {
    kind: Kind,
    throttle: Option<Rate>,
    method: Option<Rate>,
    quota: Option<QuotaSpec>,
    tokens_minute: Option<u32>,
    tokens_day: Option<u64>,
    /// The plan's token budget per month.
    tokens_month: Option<u64>,
    concurrency: Option<u32>,
    /// A second plan, `"q"` (a throttle and a DAY quota), that admin
    /// operations move keys to and back.
    other: Option<(Rate, u64)>,
    /// The account `"acme"` of keys 0 and 1: a throttle, a quota.
    account: Option<(Option<Rate>, Option<QuotaSpec>)>,
    /// The account's token budget: per minute, perhaps per day.
    account_tokens: Option<(u32, Option<u64>)>,
    /// The stage throttle, shared by every caller.
    stage: Option<Rate>,
    /// The stage's method override on [`ROUTE`] (POST), shared by every
    /// caller's requests on that route.
    stage_method: Option<Rate>,
    /// The stage's method overrides: [`PATTERNS`] with their throttles,
    /// each one bucket shared by every caller.
    stage_overrides: Vec<(&'static str, Rate)>,
    /// Keys `k0`, `k1`, … (values `v0`, `v1`, …), on plan `"p"`.
    keys: usize,
    /// Seconds from 2024-05-01 00:00 UTC at the start (years on for
    /// calendar sequences: see [`ANCHOR_DAYS`]).
    start_secs: u64,
    /// Plan `"p"` is a shadow plan.
    shadow: bool,
    /// Method overrides of plan `"p"`: [`PATTERNS`] with their throttles.
    overrides: Vec<(&'static str, Rate)>,
    /// The named model of plan `"p"` ([`MODEL`]): a throttle, a DAY quota.
    model: Option<(Rate, Option<u64>)>,
    /// The named model's token budget per minute, and its concurrency cap.
    model_tokens: Option<u32>,
    /// The named model's token budget per day (beside its per-minute one).
    model_tokens_day: Option<u64>,
    model_concurrency: Option<u32>,
    /// The plan's `"*"` entry, of every model it does not name: a
    /// throttle, perhaps a DAY quota and a token budget per minute.
    star: Option<(Rate, Option<u64>, Option<u32>)>,
    /// The throttle of anonymous clients, by IP; [`Spec::anons`] of them.
    anonymous: Option<Rate>,
    /// Anonymous clients `10.0.0.<n>` for n past the keys' indexes.
    anons: usize,
    /// The period and offset of the named model's quota (a DAY without
    /// one when `None`).
    model_period: Option<(model::Period, u64)>,
    /// Plan `"p"` names [`MODEL`] with no limits (`{}`): requests to it
    /// pass the plan's limits alone, its `"*"` entry's not.
    model_empty: bool,
}

/// The account `"acme"` with these limits.
fn account(
    throttle: Option<Rate>,
    quota: Option<QuotaSpec>,
    tokens: Option<(u32, Option<u64>)>,
) -> Account {
    let mut a = Account::new("acme");
    if let Some((per_minute, per_day)) = tokens {
        let mut b = TokenBudget::new().per_minute(per_minute).unwrap();
        if let Some(n) = per_day {
            b = b.per_day(n).unwrap();
        }
        a = a.tokens(b);
    }
    if let Some(r) = throttle {
        a = a.throttle(r.throttle());
    }
    if let Some(q) = quota {
        a = a.quota(q.quota());
    }
    a
}

/// The account's quota put anew with the limit `limit` (above its offset).
fn account_quota(spec: &Spec, limit: u64) -> Option<QuotaSpec> {
    let q = spec.account.and_then(|a| a.1)?;
    Some(QuotaSpec {
        limit: limit.max(q.offset + 1),
        ..q
    })
}

/// The plan's request quota put anew with the limit `limit` (above its
/// offset) per `period`.
fn period_quota(spec: &Spec, limit: u64, period: model::Period) -> Option<QuotaSpec> {
    let q = spec.quota?;
    Some(QuotaSpec {
        limit: limit.max(q.offset + 1),
        period,
        ..q
    })
}

/// The model plan `"p"` names.
const MODEL: &str = "big-model";
/// How requests name a model: spellings of [`MODEL`] (`true`) and others.
const SPELLINGS: [(Option<&str>, bool); 9] = [
    (None, false),
    (Some("big-model"), true),
    (Some("Big-Model"), true),
    (Some("big-model:latest"), true),
    (Some("library/big-model"), true),
    (Some("REGISTRY.OLLAMA.AI/library/Big-Model:Latest"), true),
    (Some("https://big-model"), true),
    (Some("big-model:7b"), false),
    (Some("small-model"), false),
];

impl Spec {
    /// The named model's quota of `limit` (its offset kept below it).
    fn model_quota(&self, limit: u64) -> QuotaSpec {
        match self.model_period {
            Some((period, offset)) => QuotaSpec {
                limit,
                period,
                offset: offset.min(limit - 1),
            },
            None => QuotaSpec::day(limit),
        }
    }

    fn plan(&self) -> UsagePlan {
        self.plan_with(
            self.throttle,
            self.quota,
            self.model.and_then(|m| m.1),
            self.star,
        )
    }

    /// Plan `"p"` with this throttle and these quotas (its own, its
    /// model's), and this `"*"` entry.
    fn plan_with(
        &self,
        throttle: Option<Rate>,
        quota: Option<QuotaSpec>,
        model_quota: Option<u64>,
        star: Option<(Rate, Option<u64>, Option<u32>)>,
    ) -> UsagePlan {
        let mut p = UsagePlan::new("p").shadow(self.shadow);
        if let Some(r) = throttle {
            p = p.throttle(r.throttle());
        }
        if let Some(r) = self.method {
            p = p.method(format!("{ROUTE}/POST"), r.throttle());
        }
        for (pattern, r) in &self.overrides {
            p = p.method(*pattern, r.throttle());
        }
        if let Some(q) = quota {
            p = p.quota(q.quota());
        }
        if let Some((r, _)) = self.model {
            let mut m = ModelLimits::new().throttle(r.throttle());
            if let Some(l) = model_quota {
                m = m.quota(self.model_quota(l).quota());
            }
            if let Some(n) = self.model_tokens {
                let mut b = TokenBudget::new().per_minute(n).unwrap();
                if let Some(d) = self.model_tokens_day {
                    b = b.per_day(d).unwrap();
                }
                m = m.tokens(b);
            }
            if let Some(c) = self.model_concurrency {
                m = m.concurrency(c);
            }
            p = p.model(MODEL, m);
        }
        if self.model_empty {
            p = p.model(MODEL, ModelLimits::new());
        }
        if let Some((r, quota, tokens)) = star {
            let mut m = ModelLimits::new().throttle(r.throttle());
            if let Some(l) = quota {
                m = m.quota(QuotaSpec::day(l).quota());
            }
            if let Some(n) = tokens {
                m = m.tokens(TokenBudget::new().per_minute(n).unwrap());
            }
            p = p.model("*", m);
        }
        if self.tokens_minute.is_some() || self.tokens_day.is_some() || self.tokens_month.is_some()
        {
            let mut b = TokenBudget::new();
            if let Some(n) = self.tokens_minute {
                b = b.per_minute(n).unwrap();
            }
            if let Some(n) = self.tokens_day {
                b = b.per_day(n).unwrap();
            }
            if let Some(n) = self.tokens_month {
                b = b.per_month(n).unwrap();
            }
            p = p.tokens(b);
        }
        if let Some(c) = self.concurrency {
            p = p.concurrency(c);
        }
        p
    }

    fn policy(&self, clock: ManualClock) -> Policy {
        let mut policy = Policy::builder().clock(clock).plan(self.plan());
        if let Some((r, limit)) = self.other {
            let q = UsagePlan::new("q")
                .throttle(r.throttle())
                .quota(QuotaSpec::day(limit).quota());
            policy = policy.plan(q);
        }
        if let Some((throttle, quota)) = self.account {
            policy = policy.account(account(throttle, quota, self.account_tokens));
        }
        if self.stage.is_some() || self.stage_method.is_some() || !self.stage_overrides.is_empty() {
            let mut stage = Stage::new();
            if let Some(r) = self.stage {
                stage = stage.throttle(r.throttle());
            }
            if let Some(r) = self.stage_method {
                stage = stage.method(format!("{ROUTE}/POST"), r.throttle());
            }
            for (pattern, r) in &self.stage_overrides {
                stage = stage.method(*pattern, r.throttle());
            }
            policy = policy.stage(stage);
        }
        if let Some(r) = self.anonymous {
            policy = policy.anonymous(Anonymous::ByIp {
                throttle: r.throttle(),
                client_ip: ClientIp::default(),
            });
        }
        for i in 0..self.keys {
            let mut key = ApiKey::new(format!("k{i}"), format!("v{i}"), "p");
            if self.in_account(i) {
                key = key.account("acme");
            }
            policy = policy.key(key);
        }
        policy.build().unwrap()
    }

    /// Keys 0 and 1 belong to the account, any other key does not.
    fn in_account(&self, key: usize) -> bool {
        self.account.is_some() && key < 2
    }

    fn wall0(&self) -> i128 {
        MAY_1 + i128::from(self.start_secs) * 1_000_000_000
    }

    fn model(&self) -> Model {
        let bucket = |name, r: Rate| Bucket::per_second(name, r.num, r.den, r.burst);
        let created = self.wall0();
        let plan = Limits {
            throttle: self.throttle.map(|r| bucket("throttle", r)),
            method: self.method.map(|r| bucket("method", r)),
            overrides: self
                .overrides
                .iter()
                .map(|(p, r)| (model::MethodPath::parse(p), bucket("method", *r)))
                .collect(),
            tokens_minute: self
                .tokens_minute
                .map(|n| Bucket::per_second("tokens-minute", n, 60, n)),
            quota: self.quota.map(|q| q.model("quota", created)),
            tokens_day: self
                .tokens_day
                .map(|l| CalendarQuota::new("tokens-day", l, model::Period::Day)),
            tokens_month: self
                .tokens_month
                .map(|l| CalendarQuota::new("tokens-month", l, model::Period::Month)),
            concurrency: self.concurrency.map(|c| (c, 0)),
            model: self.model.map(|m| bucket("model", m.0)),
            model_quota: self
                .model
                .and_then(|m| m.1)
                .map(|l| self.model_quota(l).model("model-quota", created)),
            named_model: false,
            shadow: self.shadow,
        };
        let models = if self.model_tokens.is_some() || self.model_concurrency.is_some() {
            vec![Limits {
                tokens_minute: self
                    .model_tokens
                    .map(|n| Bucket::per_second("model-tokens-minute", n, 60, n)),
                tokens_day: self
                    .model_tokens_day
                    .map(|l| CalendarQuota::new("model-tokens-day", l, model::Period::Day)),
                concurrency: self.model_concurrency.map(|c| (c, 0)),
                named_model: true,
                shadow: self.shadow,
                ..Limits::default()
            }]
        } else {
            Vec::new()
        };
        let others: Vec<Limits> = self
            .star
            .map(|(r, quota, tokens)| Limits {
                throttle: Some(bucket("model", r)),
                quota: quota.map(|l| QuotaSpec::day(l).model("model-quota", created)),
                tokens_minute: tokens.map(|n| Bucket::per_second("model-tokens-minute", n, 60, n)),
                named_model: true,
                shadow: self.shadow,
                ..Limits::default()
            })
            .into_iter()
            .collect();
        let mut plans = vec![plan];
        if let Some((r, limit)) = self.other {
            plans.push(Limits {
                throttle: Some(bucket("throttle", r)),
                quota: Some(QuotaSpec::day(limit).model("quota", created)),
                ..Limits::default()
            });
        }
        Model {
            stage: (self.stage.is_some()
                || self.stage_method.is_some()
                || !self.stage_overrides.is_empty())
            .then(|| Limits {
                throttle: self.stage.map(|r| bucket("stage", r)),
                method: self.stage_method.map(|r| bucket("stage-method", r)),
                overrides: self
                    .stage_overrides
                    .iter()
                    .map(|(p, r)| (model::MethodPath::parse(p), bucket("stage-method", *r)))
                    .collect(),
                ..Limits::default()
            }),
            account: self.account.map(|(r, q)| Limits {
                throttle: r.map(|r| bucket("account", r)),
                quota: q.map(|q| q.model("account-quota", created)),
                tokens_minute: self
                    .account_tokens
                    .map(|(n, _)| Bucket::per_second("account-tokens-minute", n, 60, n)),
                tokens_day: self
                    .account_tokens
                    .and_then(|(_, d)| d)
                    .map(|l| CalendarQuota::new("account-tokens-day", l, model::Period::Day)),
                ..Limits::default()
            }),
            keys: (0..self.keys)
                .map(|i| model::Key {
                    anonymous: false,
                    on: 0,
                    enabled: true,
                    account: self.in_account(i),
                    plans: plans.clone(),
                    models: models.clone(),
                    others: others.clone(),
                })
                .chain((0..self.anons).map(|_| model::Key {
                    anonymous: true,
                    on: 0,
                    enabled: true,
                    account: false,
                    plans: vec![Limits {
                        throttle: self.anonymous.map(|r| bucket("throttle", r)),
                        ..Limits::default()
                    }],
                    models: Vec::new(),
                    others: Vec::new(),
                }))
                .collect(),
            wall0: self.wall0(),
            now: 0,
        }
    }

    /// Whether requests carry token estimates (and direct decisions only
    /// peek).
    fn tokens(&self) -> bool {
        self.tokens_minute.is_some()
            || self.tokens_day.is_some()
            || self.tokens_month.is_some()
            || self.account_tokens.is_some()
            || self.model_tokens.is_some()
            || self.star.is_some_and(|s| s.2.is_some())
    }

    /// The largest cost worth trying on the request limits: one past what
    /// the tightest of them can ever hold.
    fn max_cost(&self) -> u32 {
        let mut m = 0;
        let account = self.account.and_then(|a| a.0);
        let other = self.other.map(|o| o.0);
        let model = self.model.map(|m| m.0);
        let star = self.star.map(|s| s.0);
        for r in [
            self.overrides.iter().map(|o| o.1).max_by_key(|r| r.burst),
            self.stage_overrides
                .iter()
                .map(|o| o.1)
                .max_by_key(|r| r.burst),
            star,
            self.throttle,
            self.method,
            account,
            other,
            self.stage,
            self.stage_method,
            model,
        ]
        .into_iter()
        .flatten()
        {
            m = m.max(r.burst + 1);
        }
        let account = self.account.and_then(|a| a.1);
        let star = self.star.and_then(|s| s.1).map(QuotaSpec::day);
        for q in [self.quota, account, star].into_iter().flatten() {
            m = m.max(q.limit as u32 + 1);
        }
        m.max(2)
    }

    /// The largest estimate worth trying: past the whole per-minute budget.
    fn max_tokens(&self) -> u32 {
        let mut m = 0;
        if let Some(n) = self.tokens_minute {
            m = m.max(n + 2);
        }
        for n in [self.tokens_day, self.tokens_month, self.model_tokens_day]
            .into_iter()
            .flatten()
        {
            m = m.max(n as u32 + 2);
        }
        if let Some((n, d)) = self.account_tokens {
            m = m.max(n + 2).max(d.map_or(0, |d| d as u32 + 2));
        }
        for n in [self.model_tokens, self.star.and_then(|s| s.2)]
            .into_iter()
            .flatten()
        {
            m = m.max(n + 2);
        }
        m
    }
}

/// Rates whose emission interval is a whole number of nanoseconds, or (with
/// `fractional`) rates whose interval is not: 0.9/s (1,111,111,111.1 ns),
/// 3/s, 7/3 per s. Exactness is checked apart from the rules across limits,
/// so that a failure of one does not hide the other.
fn rate(fractional: bool) -> impl Strategy<Value = Rate> {
    let rates = if fractional {
        vec![(9, 10), (3, 1), (7, 3)]
    } else {
        vec![(1, 1), (2, 1), (1, 2), (4, 1)]
    };
    (prop::sample::select(rates), 1..=4u32).prop_map(|((num, den), burst)| Rate { num, den, burst })
}

/// Token budgets per minute: 30 and 100 have whole-nanosecond intervals
/// (2 s, 0.6 s), 7 and 90 do not.
fn per_minute(fractional: bool) -> impl Strategy<Value = u32> {
    prop::sample::select(if fractional {
        vec![7, 90]
    } else {
        vec![30, 100]
    })
}

/// Mostly close to midnight, so that sequences cross it.
fn start_secs() -> impl Strategy<Value = u64> {
    prop_oneof![86_400 - 30..86_400u64, 0..86_400u64]
}

/// A calendar quota: a DAY, a week from Monday or from another day, or a
/// month, with an offset in the window of the plan's creation.
fn calendar_quota(limits: std::ops::RangeInclusive<u64>) -> impl Strategy<Value = QuotaSpec> {
    let period = prop_oneof![
        Just(model::Period::Day),
        Just(model::Period::Week(0)),
        (1..7u32).prop_map(model::Period::Week),
        Just(model::Period::Month),
    ];
    (limits, period)
        .prop_flat_map(|(limit, period)| {
            let offset = prop_oneof![Just(0), 0..limit];
            (Just(limit), Just(period), offset)
        })
        .prop_map(|(limit, period, offset)| QuotaSpec {
            limit,
            period,
            offset,
        })
}

/// Days (from 2024-05-01) that calendar sequences start from: May 2024
/// (31 days, then June's 30), Monday 2028-02-28 (the day before a leap
/// day), the leap day itself (a Tuesday), and 2028-03-31 and 2028-04-10
/// (March's 31 days, then April's 30).
const ANCHOR_DAYS: [u64; 5] = [0, 1398, 1399, 1430, 1440];

/// Mostly close to the end of the quota's first window after one of
/// [`ANCHOR_DAYS`] (a day, a week from any day, a month), so that sequences
/// cross it; else anywhere in the 40 days from one of them.
fn start_in(period: model::Period) -> impl Strategy<Value = u64> {
    let anchor = prop::sample::select(ANCHOR_DAYS.to_vec());
    let near_end = anchor.prop_flat_map(move |day| {
        let from = MAY_1 + i128::from(day) * NANOS_PER_DAY;
        let end = ((window(period, from).1 - MAY_1) / 1_000_000_000) as u64;
        end - 30..end
    });
    let anywhere = prop::sample::select(ANCHOR_DAYS.to_vec())
        .prop_flat_map(|day| day * 86_400..(day + 40) * 86_400);
    prop_oneof![near_end, anywhere]
}

fn spec(kind: Kind, fractional: bool) -> BoxedStrategy<Spec> {
    let rate = move || rate(fractional);
    let base = Spec {
        kind,
        throttle: None,
        method: None,
        quota: None,
        tokens_minute: None,
        tokens_day: None,
        tokens_month: None,
        concurrency: None,
        other: None,
        account: None,
        account_tokens: None,
        stage: None,
        stage_method: None,
        stage_overrides: Vec::new(),
        keys: 1,
        start_secs: 0,
        model: None,
        model_tokens: None,
        model_tokens_day: None,
        model_concurrency: None,
        overrides: Vec::new(),
        shadow: false,
        star: None,
        anonymous: None,
        anons: 0,
        model_period: None,
        model_empty: false,
    };
    match kind {
        Kind::Throttle => (rate(), start_secs())
            .prop_map(move |(r, s)| Spec {
                throttle: Some(r),
                start_secs: s,
                ..base.clone()
            })
            .boxed(),
        Kind::ThrottleQuota => (rate(), 1..=6u64, start_secs())
            .prop_map(move |(r, q, s)| Spec {
                throttle: Some(r),
                quota: Some(QuotaSpec::day(q)),
                start_secs: s,
                ..base.clone()
            })
            .boxed(),
        Kind::Method => (rate(), rate(), start_secs())
            .prop_map(move |(r, m, s)| Spec {
                throttle: Some(r),
                method: Some(m),
                start_secs: s,
                ..base.clone()
            })
            .boxed(),
        Kind::Shadow => (
            (
                prop::option::of(rate()),
                prop::option::of(rate()),
                prop::option::of(per_minute(fractional)),
            ),
            prop::option::of(calendar_quota(1..=4)),
            prop::option::of(1..=2u32),
            (prop::option::of(rate()), prop::option::of(rate())),
            start_secs(),
            (
                prop::option::of((
                    (rate(), prop::option::of(1..=3u64)),
                    prop::option::of(per_minute(fractional)),
                    prop::option::of(1..=2u32),
                )),
                prop::option::of((
                    rate(),
                    prop::option::of(1..=3u64),
                    prop::option::of(per_minute(fractional)),
                )),
            ),
        )
            .prop_map(
                move |((r, m, t), q, c, (stage, account), s, (model, star))| Spec {
                    throttle: r,
                    method: m,
                    tokens_minute: t,
                    quota: q,
                    concurrency: c,
                    stage,
                    account: account.map(|a| (Some(a), None)),
                    keys: 3,
                    start_secs: s,
                    shadow: true,
                    model: model.map(|m| m.0),
                    model_tokens: model.and_then(|m| m.1),
                    model_concurrency: model.and_then(|m| m.2),
                    star,
                    ..base.clone()
                },
            )
            .boxed(),
        Kind::Wildcards => (
            prop::option::of(rate()),
            prop::sample::subsequence(PATTERNS.to_vec(), 0..=PATTERNS.len()),
            prop::collection::vec(rate(), PATTERNS.len()),
            prop::sample::subsequence(PATTERNS.to_vec(), 0..=3),
            prop::collection::vec(rate(), 3),
            start_secs(),
        )
            .prop_filter("some override", |(_, patterns, _, stage, _, _)| {
                !patterns.is_empty() || !stage.is_empty()
            })
            .prop_map(move |(r, patterns, rates, stage, stage_rates, s)| Spec {
                throttle: r,
                overrides: patterns.into_iter().zip(rates).collect(),
                stage_overrides: stage.into_iter().zip(stage_rates).collect(),
                keys: 2,
                start_secs: s,
                ..base.clone()
            })
            .boxed(),
        Kind::Tokens => (
            per_minute(fractional),
            prop::option::of(prop::sample::select(vec![20u64, 50, 150])),
            prop::option::of(prop::sample::select(vec![40u64, 120, 400])),
            prop_oneof![start_secs(), start_in(model::Period::Month)],
        )
            .prop_map(move |(m, d, month, s)| Spec {
                tokens_minute: Some(m),
                tokens_day: d,
                tokens_month: month,
                start_secs: s,
                ..base.clone()
            })
            .boxed(),
        Kind::Concurrency => (1..=2u32, prop::option::of(rate()), start_secs())
            .prop_map(move |(c, r, s)| Spec {
                throttle: r,
                concurrency: Some(c),
                start_secs: s,
                ..base.clone()
            })
            .boxed(),
        Kind::Calendar => (prop::option::of(rate()), calendar_quota(1..=6))
            .prop_flat_map(|(r, q)| (Just(r), Just(q), start_in(q.period)))
            .prop_map(move |(r, q, s)| Spec {
                throttle: r,
                quota: Some(q),
                start_secs: s,
                ..base.clone()
            })
            .boxed(),
        Kind::Admin => (
            prop::option::of(rate()),
            calendar_quota(1..=6),
            prop::option::of(1..=2u32),
            rate(),
            1..=4u64,
            prop::option::of((per_minute(fractional), prop::option::of(20..=60u64))),
            prop::option::of((rate(), prop::option::of(1..=4u64))),
        )
            .prop_flat_map(|(r, q, c, other, l, t, star)| {
                (Just((r, q, c, other, l, t, star)), start_in(q.period))
            })
            .prop_map(move |((r, q, c, other, l, t, star), s)| Spec {
                throttle: r,
                quota: Some(q),
                tokens_minute: t.map(|t| t.0),
                tokens_day: t.and_then(|t| t.1),
                concurrency: c,
                other: Some((other, l)),
                start_secs: s,
                star: star.map(|(r, q)| (r, q, None)),
                ..base.clone()
            })
            .boxed(),
        Kind::Shared => (
            (prop::option::of(rate()), prop::option::of(1..=6u64)),
            prop::option::of(rate()),
            calendar_quota(1..=8),
            (prop::option::of(rate()), prop::option::of(rate())),
            (rate(), 1..=4u64),
        )
            .prop_flat_map(|(plan, account, q, stage, other)| {
                (Just((plan, account, q, stage, other)), start_in(q.period))
            })
            .prop_map(move |(((r, day), account, q, stage, other), s)| Spec {
                throttle: r,
                quota: day.map(QuotaSpec::day),
                other: Some(other),
                account: Some((account, Some(q))),
                stage: stage.0,
                stage_method: stage.1,
                keys: 3,
                start_secs: s,
                ..base.clone()
            })
            .boxed(),
        Kind::AccountTokens => (
            (
                per_minute(fractional),
                prop::option::of(prop::sample::select(vec![20u64, 50, 150])),
            ),
            prop::option::of(per_minute(fractional)),
            prop::option::of(1..=2u32),
            prop::option::of(rate()),
            prop::option::of(rate()),
            start_secs(),
        )
            .prop_map(move |(tokens, plan, c, account, stage, s)| Spec {
                tokens_minute: plan,
                concurrency: c,
                account: Some((account, None)),
                account_tokens: Some(tokens),
                stage,
                keys: 3,
                start_secs: s,
                ..base.clone()
            })
            .boxed(),
        Kind::ModelTokens => (
            (
                (rate(), prop::option::of(1..=4u64), per_minute(fractional)),
                prop::option::of(prop::sample::select(vec![20u64, 50, 150])),
            ),
            prop::option::of(1..=2u32),
            (
                prop::option::of(per_minute(fractional)),
                prop::option::of(1..=2u32),
            ),
            prop::option::of(rate()),
            prop::option::of(per_minute(fractional)),
            start_secs(),
            prop::option::of((
                rate(),
                prop::option::of(1..=4u64),
                prop::option::of(per_minute(fractional)),
            )),
        )
            .prop_map(
                move |(((m, mq, mt), md), mc, (pt, pc), throttle, account, s, star)| Spec {
                    throttle,
                    tokens_minute: pt,
                    concurrency: pc,
                    account: account.map(|_| (None, None)),
                    account_tokens: account.map(|n| (n, None)),
                    keys: 3,
                    start_secs: s,
                    model: Some((m, mq)),
                    model_tokens: Some(mt),
                    model_tokens_day: md,
                    star,
                    model_concurrency: mc,
                    ..base.clone()
                },
            )
            .boxed(),
        Kind::Mixed => (
            (prop::option::of(rate()), 1..=6u64),
            (prop::option::of(rate()), calendar_quota(1..=8)),
            (prop::option::of(rate()), prop::option::of(rate())),
            (rate(), prop::option::of(1..=4u64)),
            (rate(), 1..=4u64),
            rate(),
            prop::option::of((rate(), prop::option::of(1..=4u64))),
        )
            .prop_flat_map(|(plan, account, stage, model, other, anon, star)| {
                let s = start_in(account.1.period);
                (Just((plan, account, stage, model, other, anon, star)), s)
            })
            .prop_map(
                move |(((r, day), (a, q), stage, model, other, anon, star), s)| Spec {
                    throttle: r,
                    quota: Some(QuotaSpec::day(day)),
                    other: Some(other),
                    account: Some((a, Some(q))),
                    stage: stage.0,
                    stage_method: stage.1,
                    keys: 3,
                    start_secs: s,
                    model: Some(model),
                    star: star.map(|(r, q)| (r, q, None)),
                    anonymous: Some(anon),
                    anons: 2,
                    ..base.clone()
                },
            )
            .boxed(),
        Kind::Stack => (
            (prop::option::of(rate()), prop::option::of(rate())),
            (prop::option::of(rate()), calendar_quota(1..=8)),
            (
                prop::option::of(rate()),
                prop::option::of(rate()),
                calendar_quota(1..=6),
                prop::option::of(1..=2u32),
            ),
            prop_oneof![
                2 => (rate(), calendar_quota(1..=4), 1..=2u32).prop_map(Some),
                1 => Just(None),
            ],
            any::<bool>(),
            prop::option::of((rate(), prop::option::of(1..=4u64))),
            (rate(), 1..=4u64),
        )
            .prop_flat_map(|(stage, account, plan, model, empty, star, other)| {
                let s = start_in(plan.2.period);
                (Just((stage, account, plan, model, empty, star, other)), s)
            })
            .prop_map(
                move |(
                    ((stage, stage_method), (a, aq), (r, m, q, c), model, empty, star, other),
                    s,
                )| {
                    Spec {
                        throttle: r,
                        method: m,
                        quota: Some(q),
                        concurrency: c,
                        other: Some(other),
                        account: Some((a, Some(aq))),
                        stage,
                        stage_method,
                        keys: 3,
                        start_secs: s,
                        model: model.map(|(r, mq, _)| (r, Some(mq.limit))),
                        model_period: model.map(|(_, mq, _)| (mq.period, mq.offset)),
                        model_concurrency: model.map(|(_, _, c)| c),
                        model_empty: model.is_none() && empty,
                        star: star.map(|(r, q)| (r, q, None)),
                        ..base.clone()
                    }
                },
            )
            .boxed(),
    }
}

// ---------------------------------------------------------------- operations

#[derive(Clone, Debug)]
enum Op {
    /// `decide(key, cost)`, or the memory store's `check` when `check` (on
    /// Redis, `decide`); cost 0 peeks.
    Direct { key: usize, cost: u32, check: bool },
    /// A request through the layer: on the override's route or not, with
    /// an estimate (the `x-estimate` header) and the actual tokens its
    /// response reports; `hold` keeps its response open until an `End`.
    Http {
        key: usize,
        route: usize,
        estimate: u32,
        actual: Option<u32>,
        hold: bool,
        /// How the request names a model ([`SPELLINGS`]).
        model: usize,
    },
    /// Ends the held response at this index (modulo how many are held).
    End(usize),
    /// Advances the clock by this many nanoseconds.
    Advance(u64),
    /// Advances the clock by the retry of the model's last denial, or one
    /// nanosecond less.
    ToRetry { short: bool },
    /// Advances the clock to the next UTC midnight, plus `delta` ns (a few
    /// nanoseconds either side, or up to 3 s before: a quota that renews
    /// sooner than a throttle does).
    ToMidnight { delta: i64 },
    /// Advances the clock to the start of the next window of key 0's
    /// request quota (the account's when there is one), plus `delta` ns.
    ToWindow { delta: i64 },
    /// UpdateUsage: sets what remains of the key's quota in its window (an
    /// error for a plan without one).
    SetRemaining { key: usize, remaining: u64 },
    /// Resets the key.
    Reset { key: usize },
    /// Disables or enables the key.
    Enable { key: usize, enabled: bool },
    /// Moves the key to plan `"q"`, or back to `"p"`.
    Move { key: usize },
    /// Puts plan `"p"` anew with these limits of its DAY quota and its
    /// model's, and (when it has one) this throttle; and (when it has one)
    /// its `"*"` entry with this throttle and (when it has one) quota limit.
    PutPlan {
        quota: u64,
        model_quota: u64,
        throttle: Rate,
        star_quota: u64,
        star_throttle: Rate,
    },
    /// Puts plan `"p"` anew with a token budget of this many per minute
    /// (its `per_day` kept). Held responses stay held: a reservation made
    /// before the change is settled after it, converted to the new numbers.
    /// (At [`Op::PutPeriod`] on a plan with a token budget they end first.)
    PutBudget { per_minute: u32 },
    /// Puts plan `"p"` anew with its request quota of this limit (kept
    /// above its offset) per this period.
    PutPeriod { limit: u64, period: model::Period },
    /// Puts the account anew with this quota limit (kept above its offset)
    /// and (when it has one) this throttle.
    PutAccount { quota: u64, throttle: Rate },
    /// Puts plan `"p"` anew with its named model's token budget of this
    /// many per minute (the plan's own limits kept). Held responses stay
    /// held: their settlement on the model is converted to the new numbers.
    PutModelBudget { per_minute: u32 },
    /// Puts the account anew with a token budget of this many per minute
    /// (its `per_day`, throttle and quota kept). Held responses stay held:
    /// their settlement on the account is converted to the new numbers.
    PutAccountBudget { per_minute: u32 },
    /// Usage reports (AWS GetUsage) of plans `"p"` and `"q"` and of the
    /// account, from `back` days before today (never before the first day)
    /// to today: the memory and Redis stores must report alike.
    Usage { back: u8 },
    /// How the key's limits stand (`RateLimitLayer::standing`, a peek):
    /// each limit's name, what remains (a cap's free places included) and
    /// when it is full again, or the refusal a request of cost 0 meets.
    Standing { key: usize },
}

fn ops(s: &Spec) -> impl Strategy<Value = Vec<Op>> + use<> {
    let max_cost = s.max_cost();
    let max_tokens = s.max_tokens();
    let tokens = s.tokens();
    let keys = s.keys;
    let spellings = if s.model.is_some() || s.model_empty {
        SPELLINGS.len()
    } else {
        1
    };
    // The route of the override and another, or (with method overrides
    // of every pattern) others that some patterns match and some do not.
    let routes = if s.overrides.is_empty() && s.stage_overrides.is_empty() {
        2
    } else {
        ROUTES.len()
    };
    let http = (
        0..keys + s.anons,
        0..routes,
        0..=max_tokens,
        prop::option::of(0..=max_tokens.max(1) * 2),
        any::<bool>(),
        0..spellings,
    )
        .prop_map(|(key, route, estimate, actual, hold, model)| Op::Http {
            key,
            route,
            estimate,
            actual,
            hold,
            model,
        });
    let direct = (0..keys, 0..=max_cost, any::<bool>()).prop_map(move |(key, cost, check)| {
        Op::Direct {
            key,
            // A token plan's direct decisions charge no tokens: only peeks
            // are asked of it.
            cost: if tokens { 0 } else { cost },
            check,
        }
    });
    let calendar = matches!(
        s.kind,
        Kind::Calendar | Kind::Admin | Kind::Shared | Kind::Mixed | Kind::Stack
    );
    let admin = matches!(
        s.kind,
        Kind::Admin | Kind::Shared | Kind::Mixed | Kind::Stack
    );
    let limit = s.quota.map_or(1, |q| q.limit);
    let mut op: Vec<(u32, BoxedStrategy<Op>)> = vec![
        (4, direct.boxed()),
        (4, http.boxed()),
        (2, any::<usize>().prop_map(Op::End).boxed()),
        (2, (1..2_000_000_000u64).prop_map(Op::Advance).boxed()),
        (
            1,
            (3_600_000_000_000..30 * 3_600_000_000_000u64)
                .prop_map(Op::Advance)
                .boxed(),
        ),
        (
            2,
            any::<bool>()
                .prop_map(|short| Op::ToRetry { short })
                .boxed(),
        ),
        (
            1,
            prop_oneof![-2..=2i64, -3_000_000_000..=0i64]
                .prop_map(|delta| Op::ToMidnight { delta })
                .boxed(),
        ),
    ];
    if calendar {
        // To just around the quota window's end, and days on.
        op.push((
            2,
            prop_oneof![-2..=2i64, -3_000_000_000..=0i64]
                .prop_map(|delta| Op::ToWindow { delta })
                .boxed(),
        ));
        op.push((
            1,
            (86_400_000_000_000..9 * 86_400_000_000_000u64)
                .prop_map(Op::Advance)
                .boxed(),
        ));
    }
    if admin {
        // What remains from nothing to past the limit, or the largest
        // count accepted.
        op.push((
            2,
            (0..keys, prop_oneof![0..=limit + 3, Just(1 << 53)])
                .prop_map(|(key, remaining)| Op::SetRemaining { key, remaining })
                .boxed(),
        ));
        op.push((1, (0..keys).prop_map(|key| Op::Reset { key }).boxed()));
        op.push((
            1,
            (0..keys, any::<bool>())
                .prop_map(|(key, enabled)| Op::Enable { key, enabled })
                .boxed(),
        ));
        op.push((2, (0..keys).prop_map(|key| Op::Move { key }).boxed()));
    }
    if calendar {
        op.push((2, (0..40u8).prop_map(|back| Op::Usage { back }).boxed()));
    }
    op.push((1, (0..keys).prop_map(|key| Op::Standing { key }).boxed()));

    if plan_changes()
        && (s.kind == Kind::Tokens
            || (matches!(
                s.kind,
                Kind::Admin | Kind::AccountTokens | Kind::ModelTokens
            ) && s.tokens_minute.is_some()))
    {
        op.push((
            2,
            prop::sample::select(vec![7u32, 30, 90, 100, 1000])
                .prop_map(|per_minute| Op::PutBudget { per_minute })
                .boxed(),
        ));
    }
    if plan_changes() && s.kind == Kind::ModelTokens {
        op.push((
            2,
            prop::sample::select(vec![7u32, 30, 90, 100, 1000])
                .prop_map(|per_minute| Op::PutModelBudget { per_minute })
                .boxed(),
        ));
    }
    if plan_changes() && s.kind == Kind::AccountTokens {
        op.push((
            2,
            prop::sample::select(vec![7u32, 30, 90, 100, 1000])
                .prop_map(|per_minute| Op::PutAccountBudget { per_minute })
                .boxed(),
        ));
    }
    if plan_changes() && matches!(s.kind, Kind::Calendar | Kind::Admin) {
        let period = prop_oneof![
            Just(model::Period::Day),
            Just(model::Period::Week(0)),
            (1..7u32).prop_map(model::Period::Week),
            Just(model::Period::Month),
        ];
        op.push((
            2,
            (1..=6u64, period)
                .prop_map(|(limit, period)| Op::PutPeriod { limit, period })
                .boxed(),
        ));
    }
    if s.kind == Kind::Mixed {
        op.push((
            2,
            (1..=8u64, 1..=5u64, rate(false), 1..=5u64, rate(false))
                .prop_map(
                    |(quota, model_quota, throttle, star_quota, star_throttle)| Op::PutPlan {
                        quota,
                        model_quota,
                        throttle,
                        star_quota,
                        star_throttle,
                    },
                )
                .boxed(),
        ));
        op.push((
            1,
            (1..=8u64, rate(false))
                .prop_map(|(quota, throttle)| Op::PutAccount { quota, throttle })
                .boxed(),
        ));
    }
    let op = proptest::strategy::Union::new_weighted(op);
    prop::collection::vec(op, 1..=if calendar { 40 } else { 30 })
}

/// Whether sequences put the plan anew with another token budget
/// (`Op::PutBudget`) or quota period (`Op::PutPeriod`): only with
/// `DIFF_PLAN_CHANGES` set. The sequences they found are kept in `found`.
fn plan_changes() -> bool {
    std::env::var_os("DIFF_PLAN_CHANGES").is_some()
}

fn case(kind: Kind, fractional: bool) -> impl Strategy<Value = (Spec, Vec<Op>)> {
    spec(kind, fractional).prop_flat_map(|s| {
        let ops = ops(&s);
        (Just(s), ops)
    })
}

// ---------------------------------------------------------------- the stores

/// A response body that ends when its sender is dropped.
struct Gate(Option<oneshot::Receiver<()>>);

impl Body for Gate {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let Some(rx) = self.0.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(rx).poll(cx) {
            Poll::Ready(_) => {
                self.0 = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

type Response = http::Response<ResponseBody<Gate>>;

/// A response held open, and what ends it.
struct Held {
    response: Response,
    end: oneshot::Sender<()>,
}

/// Waits for a store's background work (a Redis store settles and releases
/// in spawned tasks).
trait Drain: Store {
    fn drain(&self) -> impl Future<Output = ()>;
    /// The memory store's synchronous `check`, when there is one.
    fn check(
        layer: &RateLimitLayer<ApiKeyHeader, Self>,
        key: &[u8],
        cost: u32,
    ) -> Option<Result<(), Rejection>>;
}

impl Drain for MemoryStore {
    async fn drain(&self) {}
    fn check(
        layer: &RateLimitLayer<ApiKeyHeader, Self>,
        key: &[u8],
        cost: u32,
    ) -> Option<Result<(), Rejection>> {
        Some(layer.check(key, cost))
    }
}

impl Drain for RedisStore {
    async fn drain(&self) {
        self.drained().await;
    }
    fn check(
        _: &RateLimitLayer<ApiKeyHeader, Self>,
        _: &[u8],
        _: u32,
    ) -> Option<Result<(), Rejection>> {
        None
    }
}

/// One store under test, driven through the layer.
struct Side<S: Store> {
    name: &'static str,
    clock: ManualClock,
    layer: RateLimitLayer<ApiKeyHeader, S>,
    held: Vec<Held>,
}

fn estimate(r: &RequestView<'_>) -> u32 {
    r.headers
        .get("x-estimate")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0)
}

impl<S: Drain> Side<S> {
    fn new(name: &'static str, spec: &Spec, clock: ManualClock, store: S) -> Self {
        let layer = RateLimitLayer::builder(spec.policy(clock.clone()))
            .store(store)
            .estimator(estimate)
            .model(|r| r.headers.get("x-model")?.to_str().ok())
            .build();
        Side {
            name,
            clock,
            layer,
            held: Vec::new(),
        }
    }

    async fn direct(&mut self, key: usize, cost: u32, check: bool) -> Observed {
        let value = format!("v{key}");
        let value = value.as_bytes();
        let result = match check.then(|| S::check(&self.layer, value, cost)).flatten() {
            Some(r) => r,
            None => self.layer.decide(value, cost).await,
        };
        self.layer.store().drain().await;
        let mut observed = Observed::ok(match result {
            Ok(()) => Answer::Allowed { header: None },
            Err(r) => denied(&r),
        });
        if self.layer.store_failures() > 0 {
            // Decided by the failure mode, not by the store.
            observed.faults.push("the store failed".to_owned());
        }
        observed
    }

    /// An admin operation on key `key`: what it returned, if anything.
    async fn admin(&mut self, spec: &Spec, op: &Op) -> Result<Option<u64>, AdminError> {
        let admin = self.layer.admin();
        let out = match *op {
            Op::SetRemaining { key, remaining } => admin
                .set_remaining(&format!("k{key}"), remaining)
                .await
                .map(Some),
            Op::Reset { key } => admin.reset_key(&format!("k{key}")).await.map(|()| None),
            Op::Enable { key, enabled } => admin
                .set_enabled(&format!("k{key}"), enabled)
                .await
                .map(|()| None),
            Op::Move { key } => {
                let id = format!("k{key}");
                let to = if admin.key(&id).unwrap().plan == "p" {
                    "q"
                } else {
                    "p"
                };
                admin.set_plan(&id, to).await.map(|()| None)
            }
            Op::PutPlan {
                quota,
                model_quota,
                throttle,
                star_quota,
                star_throttle,
            } => {
                let quota = spec.quota.map(|q| QuotaSpec { limit: quota, ..q });
                let model_quota = spec.model.and_then(|m| m.1).map(|_| model_quota);
                let throttle = spec.throttle.map(|_| throttle);
                let star = spec
                    .star
                    .map(|(_, q, t)| (star_throttle, q.map(|_| star_quota), t));
                admin
                    .put_plan(spec.plan_with(throttle, quota, model_quota, star))
                    .await
                    .map(|()| None)
            }
            // `spec` is the plan as put by this operation.
            Op::PutBudget { .. } | Op::PutPeriod { .. } | Op::PutModelBudget { .. } => {
                admin.put_plan(spec.plan()).await.map(|()| None)
            }
            Op::PutAccountBudget { .. } => {
                let (throttle, quota) = spec.account.unwrap();
                admin
                    .put_account(account(throttle, quota, spec.account_tokens))
                    .await
                    .map(|()| None)
            }
            Op::PutAccount { quota, throttle } => {
                let throttle = spec.account.and_then(|a| a.0).map(|_| throttle);
                admin
                    .put_account(account(
                        throttle,
                        account_quota(spec, quota),
                        spec.account_tokens,
                    ))
                    .await
                    .map(|()| None)
            }
            _ => unreachable!(),
        };
        self.layer.store().drain().await;
        out
    }

    /// The usage reports of plans `"p"` and `"q"` and of the account
    /// `"acme"` from day `first` to day `last` (day numbers), as each
    /// answered.
    async fn usage(&mut self, first: i64, last: i64) -> Vec<String> {
        let admin = self.layer.admin();
        let (first, last) = (
            tollgate::Date::from_days(first),
            tollgate::Date::from_days(last),
        );
        let mut out = Vec::new();
        for plan in ["p", "q"] {
            let r = admin.usage(plan, first, last, None).await;
            out.push(format!("{plan}: {:?}", r.map(|r| r.items)));
        }
        let r = admin.account_usage("acme", first, last).await;
        out.push(format!("acme: {:?}", r.map(|r| r.days)));
        self.layer.store().drain().await;
        out
    }

    /// How key `key`'s limits stand, sorted by name, or its refusal.
    async fn standing(&mut self, key: usize) -> Observed<Standing> {
        let result = self.layer.standing(format!("v{key}").as_bytes()).await;
        self.layer.store().drain().await;
        let answer = match result {
            Ok(s) => match s.refused() {
                Some(r) => Err(denied(r)),
                None => {
                    let mut limits: Vec<_> = s
                        .limits()
                        .iter()
                        .map(|l| {
                            let reset = u64::try_from(l.reset().as_nanos()).unwrap();
                            (l.name(), l.remaining(), reset)
                        })
                        .collect();
                    limits.sort_unstable();
                    Ok(limits)
                }
            },
            Err(r) => Err(denied(&r)),
        };
        let mut observed = Observed::ok(answer);
        if self.layer.store_failures() > 0 {
            observed.faults.push("the store failed".to_owned());
        }
        observed
    }

    #[allow(clippy::too_many_arguments)]
    async fn http(
        &mut self,
        key: usize,
        anonymous: bool,
        model: Option<&str>,
        route: usize,
        estimate: u32,
        actual: Option<u32>,
        hold: bool,
    ) -> Observed {
        let (tx, rx) = oneshot::channel();
        // The service must be `Clone`; its one call takes the receiver.
        let rx = std::sync::Arc::new(std::sync::Mutex::new(Some(rx)));
        let inner = tower::service_fn(move |req: http::Request<tollgate::RequestBody<String>>| {
            let rx = rx.lock().unwrap().take();
            async move {
                crate::support::tokens::report_usage(&req);
                Ok::<_, Infallible>(http::Response::new(Gate(rx)))
            }
        });
        let (method, path) = ROUTES[route];
        let method = http::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("x-estimate", estimate.to_string());
        if anonymous {
            let peer = std::net::SocketAddr::from(([10, 0, 0, key as u8], 40_000));
            req = req.extension(peer);
        } else {
            req = req.header("x-api-key", format!("v{key}"));
        }
        if let Some(m) = model {
            req = req.header("x-model", m);
        }
        if let Some(a) = actual {
            req = req.header("x-actual", a.to_string());
        }
        let res: Response = self
            .layer
            .layer(inner)
            .oneshot(req.body(String::new()).unwrap())
            .await
            .unwrap();
        let mut observed = observe(&res);
        if self.layer.store_failures() > 0 {
            // Decided by the failure mode, not by the store.
            observed.faults.push("the store failed".to_owned());
        }
        if res.status() == http::StatusCode::OK {
            let held = Held {
                response: res,
                end: tx,
            };
            if hold {
                self.held.push(held);
            } else {
                finish(held).await;
            }
        }
        self.layer.store().drain().await;
        observed
    }

    async fn end(&mut self, i: usize) {
        if self.held.is_empty() {
            return;
        }
        let held = self.held.remove(i % self.held.len());
        finish(held).await;
        self.layer.store().drain().await;
    }

    fn advance(&self, ns: u64) {
        self.clock.advance(Duration::from_nanos(ns));
    }
}

/// Ends a response: its body runs to its end.
async fn finish(held: Held) {
    drop(held.end);
    let _ = held.response.into_body().collect().await;
}

/// What a store answered, and anything its response got wrong by itself
/// (headers that disagree with the rejection they carry).
struct Observed<A = Answer> {
    answer: A,
    faults: Vec<String>,
}

/// How a key's limits stand: `(name, remaining, ns to full)` of each,
/// sorted, or the refusal of a request of cost 0.
type Standing = Result<Vec<(&'static str, u64, u64)>, Answer>;

impl<A> Observed<A> {
    fn ok(answer: A) -> Self {
        Observed {
            answer,
            faults: Vec::new(),
        }
    }
}

fn why(r: Reason) -> Why {
    match r {
        Reason::Limited => Why::Limited,
        Reason::QuotaExceeded => Why::QuotaExceeded,
        Reason::CostExceedsLimit => Why::CostExceedsLimit,
        Reason::ConcurrencyLimited => Why::ConcurrencyLimited,
        other => panic!("a reason outside the limits under test: {other:?}"),
    }
}

fn denied(r: &Rejection) -> Answer {
    if r.reason() == Reason::DisabledKey {
        return Answer::Forbidden;
    }
    Answer::Denied {
        limits: vec![(r.limit().unwrap_or("(none)"), why(r.reason()))],
        retry_ns: r
            .retry_after()
            .map(|d| u64::try_from(d.as_nanos()).unwrap()),
    }
}

fn header_str<'a>(res: &'a Response, name: &str) -> Option<&'a str> {
    res.headers().get(name).map(|v| v.to_str().unwrap())
}

/// `"name";r=R;t=T`.
fn parse_ratelimit(v: &str) -> Option<(String, u64, u64)> {
    let mut parts = v.split(';');
    let name = parts.next()?.trim().trim_matches('"').to_owned();
    let (mut r, mut t) = (None, None);
    for p in parts {
        let (k, val) = p.trim().split_once('=')?;
        match k {
            "r" => r = val.parse().ok(),
            "t" => t = val.parse().ok(),
            _ => {}
        }
    }
    Some((name, r?, t?))
}

fn observe(res: &Response) -> Observed {
    if res.status() == http::StatusCode::OK {
        let header = header_str(res, "ratelimit").map(|v| {
            let (name, r, t) = parse_ratelimit(v).unwrap_or_else(|| panic!("bad RateLimit {v:?}"));
            Header {
                names: vec![leak(name)],
                r,
                t,
            }
        });
        return Observed::ok(Answer::Allowed { header });
    }
    let Some(rejection) = res.extensions().get::<Rejection>() else {
        panic!("a {} response without a Rejection extension", res.status());
    };
    let mut faults = Vec::new();
    let answer = denied(rejection);
    if answer == Answer::Forbidden {
        if res.status() != http::StatusCode::FORBIDDEN {
            faults.push(format!("status {} for a disabled key", res.status()));
        }
    } else if res.status() != http::StatusCode::TOO_MANY_REQUESTS {
        faults.push(format!("status {} for a limit", res.status()));
    }
    if let Some(retry) = rejection.retry_after() {
        let ns = retry.as_nanos();
        let secs = ns.div_ceil(1_000_000_000).max(1);
        if header_str(res, "retry-after") != Some(&secs.to_string()) {
            faults.push(format!(
                "retry-after {:?} for a retry of {ns} ns",
                header_str(res, "retry-after")
            ));
        }
        if let Some(ms) = header_str(res, "retry-after-ms") {
            if ms != ns.div_ceil(1_000_000).to_string() {
                faults.push(format!("retry-after-ms {ms} for a retry of {ns} ns"));
            }
        }
    }
    Observed { answer, faults }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Whether a store's answer is the model's: the same decision and exact
/// retry, the limit named (with its reason) among those the model finds
/// holding the request longest; on an allowed HTTP request, the
/// `RateLimit` header's remaining and reset, its name among those tied for
/// tightest.
fn agrees(model: &Answer, got: &Answer) -> bool {
    match (model, got) {
        (Answer::Allowed { header: m }, Answer::Allowed { header: g }) => match (m, g) {
            (None, None) => true,
            (Some(m), Some(g)) => m.r == g.r && m.t == g.t && m.names.contains(&g.names[0]),
            _ => false,
        },
        (
            Answer::Denied {
                limits: m,
                retry_ns: mr,
            },
            Answer::Denied {
                limits: g,
                retry_ns: gr,
            },
        ) => mr == gr && m.contains(&g[0]),
        (Answer::Forbidden, Answer::Forbidden) => true,
        _ => false,
    }
}

// ---------------------------------------------------------------- a run

struct Run {
    model: Model,
    /// Reservations of the requests the model holds, in the stores' order.
    held: Vec<(Reservation, Option<u32>)>,
    last_retry: Option<u64>,
    log: Vec<String>,
}

impl Run {
    fn fail(&self, spec: &Spec, what: String) -> TestCaseError {
        TestCaseError::fail(format!(
            "{what}\nplan: {spec:?}\nsequence so far:\n  {}",
            self.log.join("\n  ")
        ))
    }
}

/// Runs `ops` on the model, the memory store and, if given, a Redis store
/// (prefix `prefix`), comparing every answer.
async fn run(
    spec: &Spec,
    ops: &[Op],
    redis: Option<(&Remote, String)>,
) -> Result<(), TestCaseError> {
    let start = std::time::UNIX_EPOCH
        + Duration::from_nanos((MAY_1 / 1_000_000_000) as u64 * 1_000_000_000)
        + Duration::from_secs(spec.start_secs);
    let clock = ManualClock::new();
    clock.set_wall(start);
    let mut memory = Side::new(
        "memory",
        spec,
        clock.clone(),
        MemoryStore::builder().clock(clock).build().unwrap(),
    );
    let mut remote = match redis {
        Some((remote, prefix)) => {
            let clock = ManualClock::new();
            clock.set_wall(start);
            let builder = match remote {
                Remote::Single(server) => RedisStore::builder(server.url()),
                Remote::Cluster(cluster) => RedisStore::cluster_builder(cluster.urls()),
            };
            let store = builder
                .prefix(prefix)
                .timeout(Duration::from_secs(5))
                .clock(clock.clone())
                // A held place is given back by its response; the lease (for a
                // crashed instance) must outlast the longest sequence.
                .lease(Duration::from_secs(400 * 86_400))
                .build()
                .await
                .unwrap();
            Some(Side::new("redis", spec, clock, store))
        }
        None => None,
    };
    // The spec as the plan was last put (by `Op::PutBudget`, `Op::PutPeriod`).
    let mut current = spec.clone();
    let mut r = Run {
        model: spec.model(),
        held: Vec::new(),
        last_retry: None,
        log: Vec::new(),
    };
    for op in ops {
        // Clock steps.
        let step = match *op {
            Op::Advance(ns) => Some(ns),
            Op::ToRetry { short } => {
                let ns = r.last_retry.unwrap_or(1);
                Some(if short { ns.saturating_sub(1) } else { ns })
            }
            Op::ToMidnight { delta } => {
                let wall = r.model.wall();
                let mut to =
                    (wall.div_euclid(NANOS_PER_DAY) + 1) * NANOS_PER_DAY + i128::from(delta);
                if to <= wall {
                    to += NANOS_PER_DAY;
                }
                Some((to - wall) as u64)
            }
            Op::ToWindow { delta } => {
                // The account's quota when there is one, else key 0's.
                let period = spec
                    .account
                    .and_then(|a| a.1)
                    .map(|q| q.period)
                    .or_else(|| r.model.period(0))
                    .unwrap_or(model::Period::Day);
                let wall = r.model.wall();
                let (_, end) = window(period, wall);
                let mut to = end + i128::from(delta);
                if to <= wall {
                    to = window(period, end).1 + i128::from(delta);
                }
                Some((to - wall) as u64)
            }
            _ => None,
        };
        if let Some(ns) = step {
            r.model.advance(ns);
            memory.advance(ns);
            if let Some(s) = &remote {
                s.advance(ns);
            }
            r.log.push(format!(
                "advance {ns} ns (wall {})",
                wall_str(r.model.wall())
            ));
            continue;
        }
        if let Op::End(i) = *op {
            if r.held.is_empty() {
                continue;
            }
            let i = i % r.held.len();
            let (res, actual) = r.held.remove(i);
            r.model.end(res, actual);
            memory.end(i).await;
            if let Some(s) = &mut remote {
                s.end(i).await;
            }
            r.log
                .push(format!("end held response #{i} (actual {actual:?})"));
            continue;
        }
        if let Op::Usage { back } = *op {
            let last = (r.model.wall().div_euclid(NANOS_PER_DAY)) as i64;
            let first =
                (last - i64::from(back)).max((spec.wall0().div_euclid(NANOS_PER_DAY)) as i64);
            let mine = memory.usage(first, last).await;
            r.log
                .push(format!("usage from {first} to {last}: memory {mine:?}"));
            if let Some(s) = &mut remote {
                let theirs = s.usage(first, last).await;
                if theirs != mine {
                    return Err(r.fail(
                        spec,
                        format!(
                            "the stores report usage differently from day {first} to {last}:\n  memory: {mine:?}\n  redis:  {theirs:?}"
                        ),
                    ));
                }
            }
            continue;
        }
        if let Op::Standing { key } = *op {
            let expected = r.model.standing(key).map(|mut l| {
                l.sort_unstable();
                l
            });
            let mut observed = vec![(memory.name, memory.standing(key).await)];
            if let Some(s) = &mut remote {
                observed.push((s.name, s.standing(key).await));
            }
            r.log.push(format!("k{key}: standing: model {expected:?}"));
            for (name, o) in &observed {
                let agrees = match (&expected, &o.answer) {
                    (Ok(m), Ok(g)) => m == g,
                    (Err(m), Err(g)) => agrees(m, g),
                    _ => false,
                };
                if !agrees || !o.faults.is_empty() {
                    let others: Vec<String> = observed
                        .iter()
                        .map(|(n, o)| format!("{n}: {:?}{}", o.answer, faults(&o.faults)))
                        .collect();
                    return Err(r.fail(
                        spec,
                        format!(
                            "{name} disagrees with the model at `k{key}: standing`:\n  model: {expected:?}\n  {}",
                            others.join("\n  ")
                        ),
                    ));
                }
            }
            continue;
        }
        if let Op::SetRemaining { .. }
        | Op::Reset { .. }
        | Op::Enable { .. }
        | Op::Move { .. }
        | Op::PutPlan { .. }
        | Op::PutBudget { .. }
        | Op::PutPeriod { .. }
        | Op::PutAccount { .. }
        | Op::PutAccountBudget { .. }
        | Op::PutModelBudget { .. } = *op
        {
            if matches!(*op, Op::PutPeriod { .. }) && spec.tokens() {
                // Every held response ends before the change of period (a
                // budget's settlement across it is not what is tested).
                while !r.held.is_empty() {
                    let (res, actual) = r.held.remove(0);
                    r.model.end(res, actual);
                    memory.end(0).await;
                    if let Some(s) = &mut remote {
                        s.end(0).await;
                    }
                    r.log
                        .push(format!("end held response #0 (actual {actual:?})"));
                }
            }
            // What the operation returns: what remains after UpdateUsage
            // (`Err`: the key's plan has no quota), nothing for the others.
            let expected = match *op {
                Op::SetRemaining { key, remaining } => {
                    r.model.set_remaining(key, remaining).map(Some).ok_or(())
                }
                Op::Reset { key } => {
                    r.model.reset(key);
                    Ok(None)
                }
                Op::Enable { key, enabled } => {
                    r.model.set_enabled(key, enabled);
                    Ok(None)
                }
                Op::Move { key } => {
                    let to = 1 - r.model.keys[key].on;
                    r.model.set_plan(key, to);
                    Ok(None)
                }
                Op::PutPlan {
                    quota,
                    model_quota,
                    throttle: t,
                    star_quota,
                    star_throttle: st,
                } => {
                    let t = spec
                        .throttle
                        .map(|_| Bucket::per_second("throttle", t.num, t.den, t.burst));
                    let star = spec.star.map_or((None, None), |(_, q, _)| {
                        let b = Bucket::per_second("model", st.num, st.den, st.burst);
                        (Some(b), q.map(|_| star_quota))
                    });
                    r.model
                        .put_quotas(0, Some(quota), Some(model_quota), t, star);
                    Ok(None)
                }
                Op::PutBudget { per_minute } => {
                    let b = Bucket::per_second("tokens-minute", per_minute, 60, per_minute);
                    r.model.put_budget(0, &b);
                    Ok(None)
                }
                Op::PutPeriod { limit, period } => {
                    if let Some(q) = period_quota(spec, limit, period) {
                        r.model.put_period(0, q.limit, q.period);
                    }
                    Ok(None)
                }
                Op::PutModelBudget { per_minute } => {
                    let b = Bucket::per_second("model-tokens-minute", per_minute, 60, per_minute);
                    r.model.put_model_budget(0, &b);
                    Ok(None)
                }
                Op::PutAccountBudget { per_minute } => {
                    let b = Bucket::per_second("account-tokens-minute", per_minute, 60, per_minute);
                    r.model.put_account_budget(&b);
                    Ok(None)
                }
                Op::PutAccount { quota, throttle: t } => {
                    let t = spec
                        .account
                        .and_then(|a| a.0)
                        .map(|_| Bucket::per_second("account", t.num, t.den, t.burst));
                    let quota = account_quota(spec, quota).map(|q| q.limit);
                    r.model.put_account(t, quota);
                    Ok(None)
                }
                _ => unreachable!(),
            };
            match *op {
                Op::PutBudget { per_minute } => current.tokens_minute = Some(per_minute),
                Op::PutModelBudget { per_minute } => current.model_tokens = Some(per_minute),
                Op::PutAccountBudget { per_minute } => {
                    let per_day = current.account_tokens.and_then(|t| t.1);
                    current.account_tokens = Some((per_minute, per_day));
                }
                Op::PutPeriod { limit, period } => {
                    current.quota = period_quota(spec, limit, period);
                }
                _ => {}
            }
            let mut observed = vec![(memory.name, memory.admin(&current, op).await)];
            if let Some(s) = &mut remote {
                observed.push((s.name, s.admin(&current, op).await));
            }
            r.log.push(format!("admin {op:?}: model {expected:?}"));
            for (name, o) in &observed {
                let agrees = match (o, &expected) {
                    (Ok(got), Ok(e)) => got == e,
                    (Err(AdminError::NoQuota(_)), Err(())) => true,
                    _ => false,
                };
                if !agrees {
                    return Err(r.fail(
                        spec,
                        format!("{name} disagrees with the model at admin {op:?}: {observed:?}"),
                    ));
                }
            }
            continue;
        }
        let (expected, observed, what) = match *op {
            Op::Direct { key, cost, check } => {
                let ask = Ask {
                    key,
                    cost,
                    tokens: 0,
                    on_route: false,
                    method: "",
                    path: "",
                    holds: false,
                    http: false,
                    model: false,
                    // No model named: the plan's `"*"` entry applies.
                    other_model: true,
                };
                let (expected, _) = r.model.decide(ask);
                let mut observed = vec![(memory.name, memory.direct(key, cost, check).await)];
                if let Some(s) = &mut remote {
                    observed.push((s.name, s.direct(key, cost, check).await));
                }
                let verb = if check { "check" } else { "decide" };
                (expected, observed, format!("k{key}: {verb}(cost {cost})"))
            }
            Op::Http {
                key,
                route,
                estimate,
                actual,
                hold,
                model,
            } => {
                let (method, path) = ROUTES[route];
                let on_route = route == 1;
                let tokens = spec.tokens();
                let estimate = if tokens { estimate } else { 0 };
                let actual = actual.filter(|_| tokens);
                let anonymous = key >= spec.keys;
                let (model, named) = SPELLINGS[model];
                let ask = Ask {
                    key,
                    cost: 1,
                    tokens: estimate,
                    on_route,
                    method,
                    path,
                    holds: true,
                    http: true,
                    model: named,
                    other_model: !named,
                };
                let (expected, reservation) = r.model.decide(ask);
                if let Some(reservation) = reservation {
                    if hold {
                        r.held.push((reservation, actual));
                    } else {
                        r.model.end(reservation, actual);
                    }
                }
                let mut observed = vec![(
                    memory.name,
                    memory
                        .http(key, anonymous, model, route, estimate, actual, hold)
                        .await,
                )];
                if let Some(s) = &mut remote {
                    let o = s
                        .http(key, anonymous, model, route, estimate, actual, hold)
                        .await;
                    observed.push((s.name, o));
                }
                let route = format!("{method} {path}");
                let tok = if tokens {
                    format!(", estimate {estimate}, actual {actual:?}")
                } else {
                    String::new()
                };
                let hold = if hold { ", held" } else { ", ended at once" };
                let who = if anonymous {
                    format!("10.0.0.{key}")
                } else {
                    format!("k{key}")
                };
                (
                    expected,
                    observed,
                    format!("{who}: HTTP {route} model {model:?}{tok}{hold}"),
                )
            }
            _ => unreachable!(),
        };
        if let Answer::Denied { retry_ns, .. } = &expected {
            r.last_retry = *retry_ns;
        }
        r.log.push(format!("{what}: model {expected}"));
        for (name, o) in &observed {
            if !agrees(&expected, &o.answer) || !o.faults.is_empty() {
                let others: Vec<String> = observed
                    .iter()
                    .map(|(n, o)| format!("{n}: {}{}", o.answer, faults(&o.faults)))
                    .collect();
                return Err(r.fail(
                    spec,
                    format!(
                        "{name} disagrees with the model at `{what}`:\n  model: {expected}\n  {}",
                        others.join("\n  ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn faults(f: &[String]) -> String {
    if f.is_empty() {
        String::new()
    } else {
        format!(" [{}]", f.join("; "))
    }
}

fn wall_str(ns: i128) -> String {
    let (y, m, d) = model::civil(ns.div_euclid(NANOS_PER_DAY));
    let rem = ns.rem_euclid(NANOS_PER_DAY);
    format!(
        "{y}-{m:02}-{d:02} {}.{:09}s",
        rem / 1_000_000_000,
        rem % 1_000_000_000
    )
}

// ---------------------------------------------------------------- tests

const MEMORY_CASES: u32 = 96;
const REDIS_CASES: u32 = 32;

/// `DIFF_CASES=n` runs n cases per test instead (memory and Redis alike).
fn cases(default: u32) -> u32 {
    std::env::var("DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn memory(kind: Kind, fractional: bool) {
    let rt = runtime();
    let mut runner = TestRunner::new(Config {
        cases: cases(MEMORY_CASES),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case(kind, fractional), |(spec, ops)| {
        rt.block_on(run(&spec, &ops, None))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// A real Redis to run the stores on: one `redis-server`, or a cluster of
/// three (accounts and the stage in slots of their own).
enum Remote {
    Single(RedisServer),
    Cluster(RedisCluster),
}

fn redis(kind: Kind, fractional: bool) {
    if !require_redis() {
        return;
    }
    on_remote(kind, fractional, Remote::Single(RedisServer::start()));
}

fn redis_cluster(kind: Kind) {
    if !require_redis() {
        return;
    }
    on_remote(kind, false, Remote::Cluster(RedisCluster::start()));
}

fn on_remote(kind: Kind, fractional: bool, server: Remote) {
    static PREFIXES: AtomicUsize = AtomicUsize::new(0);
    let rt = runtime();
    let mut runner = TestRunner::new(Config {
        cases: cases(REDIS_CASES),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case(kind, fractional), |(spec, ops)| {
        let prefix = format!("diff{}:", PREFIXES.fetch_add(1, Ordering::Relaxed));
        rt.block_on(run(&spec, &ops, Some((&server, prefix))))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

mod memory {
    use super::{Kind, memory};

    #[test]
    fn throttle() {
        memory(Kind::Throttle, false);
    }
    #[test]
    fn throttle_and_day_quota() {
        memory(Kind::ThrottleQuota, false);
    }
    #[test]
    fn throttle_and_method_override() {
        memory(Kind::Method, false);
    }
    #[test]
    fn method_overrides_with_wildcards() {
        memory(Kind::Wildcards, false);
    }
    #[test]
    fn shadow_plan() {
        memory(Kind::Shadow, false);
    }
    #[test]
    fn shadow_plan_with_fractional_intervals() {
        memory(Kind::Shadow, true);
    }
    #[test]
    fn token_budget() {
        memory(Kind::Tokens, false);
    }
    #[test]
    fn concurrency_cap() {
        memory(Kind::Concurrency, false);
    }
    #[test]
    fn throttle_with_fractional_intervals() {
        memory(Kind::Throttle, true);
    }
    #[test]
    fn token_budget_with_fractional_intervals() {
        memory(Kind::Tokens, true);
    }
    #[test]
    fn week_and_month_quotas_with_offset() {
        memory(Kind::Calendar, false);
    }
    #[test]
    fn admin_between_requests() {
        memory(Kind::Admin, false);
    }
    #[test]
    fn account_and_stage_shared() {
        memory(Kind::Shared, false);
    }
    #[test]
    fn account_token_budget() {
        memory(Kind::AccountTokens, false);
    }
    #[test]
    fn model_token_budget_and_cap() {
        memory(Kind::ModelTokens, false);
    }
    #[test]
    fn model_token_budget_with_fractional_intervals() {
        memory(Kind::ModelTokens, true);
    }
    #[test]
    fn account_token_budget_with_fractional_intervals() {
        memory(Kind::AccountTokens, true);
    }
    #[test]
    fn anonymous_and_registered_models_and_plans_put_anew() {
        memory(Kind::Mixed, false);
    }
    #[test]
    fn every_limit_in_one_decision() {
        memory(Kind::Stack, false);
    }
}

mod redis {
    use super::{Kind, redis};

    #[test]
    fn throttle() {
        redis(Kind::Throttle, false);
    }
    #[test]
    fn throttle_and_day_quota() {
        redis(Kind::ThrottleQuota, false);
    }
    #[test]
    fn throttle_and_method_override() {
        redis(Kind::Method, false);
    }
    #[test]
    fn method_overrides_with_wildcards() {
        redis(Kind::Wildcards, false);
    }
    #[test]
    fn shadow_plan() {
        redis(Kind::Shadow, false);
    }
    #[test]
    fn shadow_plan_with_fractional_intervals() {
        redis(Kind::Shadow, true);
    }
    #[test]
    fn token_budget() {
        redis(Kind::Tokens, false);
    }
    #[test]
    fn concurrency_cap() {
        redis(Kind::Concurrency, false);
    }
    #[test]
    fn throttle_with_fractional_intervals() {
        redis(Kind::Throttle, true);
    }
    #[test]
    fn token_budget_with_fractional_intervals() {
        redis(Kind::Tokens, true);
    }
    #[test]
    fn week_and_month_quotas_with_offset() {
        redis(Kind::Calendar, false);
    }
    #[test]
    fn admin_between_requests() {
        redis(Kind::Admin, false);
    }
    #[test]
    fn account_and_stage_shared() {
        redis(Kind::Shared, false);
    }
    #[test]
    fn account_token_budget() {
        redis(Kind::AccountTokens, false);
    }
    #[test]
    fn model_token_budget_and_cap() {
        redis(Kind::ModelTokens, false);
    }
    #[test]
    fn model_token_budget_with_fractional_intervals() {
        redis(Kind::ModelTokens, true);
    }
    #[test]
    fn account_token_budget_with_fractional_intervals() {
        redis(Kind::AccountTokens, true);
    }
    #[test]
    fn anonymous_and_registered_models_and_plans_put_anew() {
        redis(Kind::Mixed, false);
    }
    #[test]
    fn every_limit_in_one_decision() {
        redis(Kind::Stack, false);
    }
}

/// On a Redis Cluster: the mixes whose limits live in several slots (an
/// account's and the stage's in their own).
mod redis_cluster {
    use super::{Kind, redis_cluster};

    #[test]
    fn admin_between_requests() {
        redis_cluster(Kind::Admin);
    }
    #[test]
    fn account_and_stage_shared() {
        redis_cluster(Kind::Shared);
    }
    #[test]
    fn shadow_plan_under_account_and_stage() {
        redis_cluster(Kind::Shadow);
    }
    #[test]
    fn method_overrides_with_wildcards_on_plan_and_stage() {
        redis_cluster(Kind::Wildcards);
    }
    #[test]
    fn account_token_budget() {
        redis_cluster(Kind::AccountTokens);
    }
    #[test]
    fn model_token_budget_and_cap() {
        redis_cluster(Kind::ModelTokens);
    }
    #[test]
    fn anonymous_and_registered_models_and_plans_put_anew() {
        redis_cluster(Kind::Mixed);
    }
    #[test]
    fn every_limit_in_one_decision() {
        redis_cluster(Kind::Stack);
    }
}

/// Sequences the generated ones found, kept as they were found.
mod found {
    use super::*;

    fn on_both(spec: Spec, ops: Vec<Op>) {
        let rt = runtime();
        if let Err(e) = rt.block_on(run(&spec, &ops, None)) {
            panic!("{e}");
        }
        if !require_redis() {
            return;
        }
        let server = Remote::Single(RedisServer::start());
        if let Err(e) = rt.block_on(run(&spec, &ops, Some((&server, "found:".to_owned())))) {
            panic!("{e}");
        }
    }

    fn admin_spec(quota: QuotaSpec, start_secs: u64) -> Spec {
        Spec {
            kind: Kind::Admin,
            throttle: None,
            method: None,
            quota: Some(quota),
            tokens_minute: None,
            tokens_day: None,
            tokens_month: None,
            concurrency: None,
            other: Some((
                Rate {
                    num: 1,
                    den: 1,
                    burst: 4,
                },
                4,
            )),
            account: None,
            account_tokens: None,
            stage: None,
            stage_method: None,
            stage_overrides: Vec::new(),
            keys: 1,
            start_secs,
            model: None,
            model_tokens: None,
            model_tokens_day: None,
            model_concurrency: None,
            overrides: Vec::new(),
            shadow: false,
            star: None,
            anonymous: None,
            anons: 0,
            model_period: None,
            model_empty: false,
        }
    }

    /// A cost above the limit that fits what UpdateUsage raised passes (it
    /// was refused as one no limit can ever hold).
    #[test]
    fn a_raise_holds_a_cost_above_the_limit() {
        let quota = QuotaSpec {
            limit: 6,
            period: model::Period::Week(4),
            offset: 0,
        };
        on_both(
            admin_spec(quota, 1_051_530),
            vec![
                Op::SetRemaining {
                    key: 0,
                    remaining: 1 << 53,
                },
                Op::Direct {
                    key: 0,
                    cost: 7,
                    check: false,
                },
            ],
        );
    }

    /// A plan put anew with another throttle converts the bucket of a key
    /// moved away from it too, as it does the buckets of the keys on it
    /// (the memory store converted only those): the key, back on the plan,
    /// finds its bucket as empty as it left it.
    #[test]
    fn a_plan_put_anew_converts_the_bucket_of_a_key_moved_away() {
        let spec = Spec {
            throttle: Some(Rate {
                num: 1,
                den: 1,
                burst: 2,
            }),
            ..admin_spec(QuotaSpec::day(5), 3_600)
        };
        let http = Op::Http {
            key: 0,
            route: 0,
            estimate: 0,
            actual: None,
            hold: false,
            model: 0,
        };
        on_both(
            spec,
            vec![
                http.clone(),
                http,
                Op::Move { key: 0 },
                Op::PutPlan {
                    quota: 5,
                    model_quota: 1,
                    throttle: Rate {
                        num: 1,
                        den: 1,
                        burst: 4,
                    },
                    star_quota: 1,
                    star_throttle: Rate {
                        num: 1,
                        den: 1,
                        burst: 1,
                    },
                },
                Op::Move { key: 0 },
                Op::Direct {
                    key: 0,
                    cost: 1,
                    check: false,
                },
            ],
        );
    }

    /// Redis gave a borrowed share back with a settlement's floor at zero,
    /// which took the raise away: the third request showed 3 remaining.
    #[test]
    fn a_raise_shows_in_the_header_of_a_borrowed_unit() {
        let quota = QuotaSpec {
            limit: 4,
            period: model::Period::Week(6),
            offset: 0,
        };
        let http = |hold| Op::Http {
            key: 0,
            route: 1,
            estimate: 0,
            actual: None,
            hold,
            model: 0,
        };
        on_both(
            admin_spec(quota, 821_691),
            vec![
                Op::Advance(46_367_068_997_606),
                Op::SetRemaining {
                    key: 0,
                    remaining: 1 << 53,
                },
                http(false),
                http(true),
                http(true),
            ],
        );
    }

    /// A request denied by the throttle charges the quota nothing, and
    /// does not count as the quota's last change either: a week moved to
    /// start on that day finds the key's count of the day before outside
    /// it, and starts from 0.
    #[test]
    fn a_period_change_after_a_denied_request_starts_afresh() {
        let spec = Spec {
            kind: Kind::Calendar,
            throttle: Some(Rate {
                num: 1,
                den: 2,
                burst: 1,
            }),
            other: None,
            ..admin_spec(
                QuotaSpec {
                    limit: 2,
                    period: model::Period::Week(0),
                    offset: 0,
                },
                86_399,
            )
        };
        let decide = Op::Direct {
            key: 0,
            cost: 1,
            check: false,
        };
        on_both(
            spec,
            vec![
                Op::Advance(500_000_000),
                decide.clone(),
                // Into Thursday: the throttle denies.
                Op::Advance(700_000_000),
                decide.clone(),
                Op::PutPeriod {
                    limit: 1,
                    period: model::Period::Week(3),
                },
                Op::Advance(3_000_000_000),
                decide,
            ],
        );
    }

    /// A quota put anew from WEEK to MONTH, a request it denies, the quota
    /// put to DAY (a request counted), then to MONTH again, all on one day:
    /// the month holds the one request of the day. The Redis store denied
    /// until the month's end, its over-limit cache answering with the
    /// denial under the first MONTH (the same numbers, so the same
    /// identity).
    #[test]
    fn redis_period_changed_back_on_the_day_of_a_denial() {
        let spec = Spec {
            kind: Kind::Calendar,
            other: None,
            // 2024-05-06, a Monday.
            ..admin_spec(
                QuotaSpec {
                    limit: 2,
                    period: model::Period::Week(0),
                    offset: 0,
                },
                5 * 86_400,
            )
        };
        let decide = |cost| Op::Direct {
            key: 0,
            cost,
            check: false,
        };
        let put = |period| Op::PutPeriod { limit: 2, period };
        on_both(
            spec,
            vec![
                decide(2),
                Op::Advance(86_400_000_000_000),
                put(model::Period::Month),
                decide(1),
                put(model::Period::Day),
                decide(1),
                put(model::Period::Month),
                decide(1),
            ],
        );
    }

    /// A budget of 7 tokens a minute put anew at 30 on a full bucket; a
    /// request of estimate 0 whose response reports 1 token: the Redis
    /// store lost that settlement (the next request showed 30 remaining,
    /// not 29), finding the key under the old numbers.
    #[test]
    fn redis_budget_put_anew_loses_a_settlement() {
        let spec = Spec {
            kind: Kind::Tokens,
            quota: None,
            other: None,
            tokens_minute: Some(7),
            ..admin_spec(QuotaSpec::day(1), 86_370)
        };
        let http = |estimate, actual| Op::Http {
            key: 0,
            route: 0,
            estimate,
            actual,
            hold: false,
            model: 0,
        };
        on_both(
            spec,
            vec![
                http(1, None),
                Op::Advance(60_000_000_000),
                Op::PutBudget { per_minute: 30 },
                http(0, Some(1)),
                http(0, None),
            ],
        );
    }

    /// A response held across a budget put anew from 30 to 7 a minute,
    /// settled at 31 tokens over an estimate of 0: the memory store
    /// charged the 31 tokens at the old interval (2 s) to a bucket kept
    /// under the new numbers, 4 ns short of the charge converted as the
    /// bucket was (the next request waited 1,999,999,996 ns, not 2 s).
    #[test]
    fn a_settlement_after_a_budget_put_anew_is_converted_to_it() {
        let spec = Spec {
            kind: Kind::Tokens,
            quota: None,
            other: None,
            tokens_minute: Some(30),
            ..admin_spec(QuotaSpec::day(1), 86_370)
        };
        on_both(
            spec,
            vec![
                Op::Http {
                    key: 0,
                    route: 0,
                    estimate: 0,
                    actual: Some(31),
                    hold: true,
                    model: 0,
                },
                Op::PutBudget { per_minute: 7 },
                Op::End(0),
                Op::Direct {
                    key: 0,
                    cost: 0,
                    check: false,
                },
            ],
        );
    }

    /// A response held across a budget put anew from 100 to 7 a minute,
    /// with a request between the change and its end: Redis converted the
    /// bucket at that request, then found it under other numbers than the
    /// reservation's and dropped the settlement (a charge of 30 tokens, or
    /// a refund of 30).
    #[test]
    fn redis_settlement_on_a_bucket_converted_since_is_applied() {
        for actual in [80, 20] {
            let spec = Spec {
                kind: Kind::Tokens,
                quota: None,
                other: None,
                tokens_minute: Some(100),
                ..admin_spec(QuotaSpec::day(1), 3_600)
            };
            let http = |estimate, actual, hold| Op::Http {
                key: 0,
                route: 0,
                estimate,
                actual,
                hold,
                model: 0,
            };
            on_both(
                spec,
                vec![
                    http(50, Some(actual), true),
                    Op::PutBudget { per_minute: 7 },
                    http(0, None, false),
                    Op::End(0),
                    http(0, None, false),
                ],
            );
        }
    }

    /// A request the token budget's `per_day` refuses (a cost it can never
    /// hold) changes nothing: the memory store charged the request quota,
    /// raised by UpdateUsage the day before, and gave it back, which left
    /// the new day as the quota's last change, so the quota put anew as a
    /// DAY found the raise on the new day (1 remaining after a request);
    /// the Redis store (and the model) start the new day from 0.
    #[test]
    fn memory_denied_request_carries_a_raise_into_a_new_period() {
        let spec = Spec {
            quota: Some(QuotaSpec {
                limit: 1,
                period: model::Period::Month,
                offset: 0,
            }),
            tokens_minute: Some(100),
            tokens_day: Some(43),
            ..admin_spec(QuotaSpec::day(1), 372_196)
        };
        let http = |estimate| Op::Http {
            key: 0,
            route: 0,
            estimate,
            actual: None,
            hold: false,
            model: 0,
        };
        on_both(
            spec,
            vec![
                Op::SetRemaining {
                    key: 0,
                    remaining: 2,
                },
                Op::Advance(86_400_000_000_000),
                http(44),
                Op::PutPeriod {
                    limit: 1,
                    period: model::Period::Day,
                },
                http(0),
            ],
        );
    }

    /// A request on the leap day 2028-02-29 under a MONTH quota (its
    /// response held into March 1, settled over the daily token budget),
    /// the quota put anew as a MONTH of 1, a peek on March 1 that the
    /// daily budget denies, then the quota put anew as a WEEK from Monday
    /// (February 28 to March 6): the week holds the day of the request,
    /// the quota's last change, so its count carries over and the next
    /// request is denied by the quota until the week's end. The memory
    /// store gave the peek's charge of nothing back to the request quota
    /// when the budget denied it, which moved the count into March's
    /// window (0 used, changed last on March 1) and lost it: 1 remained,
    /// and the request was denied by the daily budget alone.
    #[test]
    fn memory_denied_peek_keeps_the_last_change_of_a_quota() {
        let spec = Spec {
            kind: Kind::Admin,
            quota: Some(QuotaSpec {
                limit: 5,
                period: model::Period::Month,
                offset: 0,
            }),
            tokens_minute: Some(30),
            tokens_day: Some(54),
            // 2028-02-29 23:59:59 UTC.
            ..admin_spec(QuotaSpec::day(1), 1399 * 86_400 + 86_399)
        };
        let http = |estimate, actual, hold| Op::Http {
            key: 0,
            route: 0,
            estimate,
            actual,
            hold,
            model: 0,
        };
        let hour = 3_600_000_000_000;
        on_both(
            spec,
            vec![
                http(0, Some(55), true),
                Op::Advance(hour),
                Op::End(0),
                Op::PutPeriod {
                    limit: 1,
                    period: model::Period::Month,
                },
                Op::Advance(hour),
                Op::Direct {
                    key: 0,
                    cost: 0,
                    check: false,
                },
                Op::PutPeriod {
                    limit: 1,
                    period: model::Period::Week(0),
                },
                Op::Usage { back: 1 },
                http(0, None, false),
            ],
        );
    }

    /// A shadow plan's token bucket that would have denied a request's
    /// estimate did not charge it, and the request's settlement then
    /// charged the bucket the difference between its actual tokens and that
    /// estimate (18 of a request of 38): the next request showed 1 token
    /// remaining where enforcing would have left 19. Both stores did so.
    #[test]
    fn a_shadow_bucket_that_did_not_charge_an_estimate_settles_nothing() {
        let spec = Spec {
            kind: Kind::Shadow,
            quota: None,
            other: None,
            tokens_minute: Some(30),
            shadow: true,
            ..admin_spec(QuotaSpec::day(1), 3_600)
        };
        let http = |estimate, actual| Op::Http {
            key: 0,
            route: 0,
            estimate,
            actual,
            hold: false,
            model: 0,
        };
        on_both(
            spec,
            vec![http(0, Some(11)), http(20, Some(38)), http(0, None)],
        );
    }
}
