//! Plans and stage limits compiled for deciding.
//!
//! Each limit carries its kind and the salt that places its state in the
//! store; the numbers come from the public values in `limits`.

use std::sync::Arc;

use super::limits::{FailureMode, ModelLimits, Stage, Throttle, TokenBudget, UsagePlan};
use super::method::{MethodLimit, compile_methods};
use super::model;
use crate::error::ConfigError;
use crate::gcra::{Gcra, NANOS_PER_SEC};
use crate::hash;
use crate::quota::QuotaSpec;
use crate::window::Period;

/// The kind of a limit: what it counts and how headers and rejections name
/// it. Carried with every limit and every report of one, so that nothing
/// is ever inferred from a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LimitKind {
    /// A plan's throttle (`"throttle"`).
    Throttle,
    /// A plan's method override (`"method"`).
    Method,
    /// A plan's request quota (`"quota"`).
    Quota,
    /// The stage throttle every caller shares (`"stage"`).
    Stage,
    /// A stage method override (`"stage-method"`).
    StageMethod,
    /// A token budget's per-minute bucket (`"tokens-minute"`).
    TokensMinute,
    /// A token budget's daily quota (`"tokens-day"`).
    TokensDay,
    /// A token budget's monthly quota (`"tokens-month"`).
    TokensMonth,
    /// A plan's cap on requests in flight (`"concurrency"`).
    Concurrency,
    /// An account's throttle, shared by all its keys (`"account"`).
    Account,
    /// An account's request quota (`"account-quota"`).
    AccountQuota,
    /// An account's per-minute token bucket (`"account-tokens-minute"`).
    AccountTokensMinute,
    /// An account's daily token quota (`"account-tokens-day"`).
    AccountTokensDay,
    /// An account's monthly token quota (`"account-tokens-month"`).
    AccountTokensMonth,
    /// A model's throttle within a plan (`"model"`).
    Model,
    /// A model's request quota (`"model-quota"`).
    ModelQuota,
    /// A model's per-minute token bucket (`"model-tokens-minute"`).
    ModelTokensMinute,
    /// A model's daily token quota (`"model-tokens-day"`).
    ModelTokensDay,
    /// A model's monthly token quota (`"model-tokens-month"`).
    ModelTokensMonth,
    /// A model's cap on requests in flight (`"model-concurrency"`).
    ModelConcurrency,
}

impl LimitKind {
    /// The limit's name in headers and rejections.
    pub fn name(self) -> &'static str {
        match self {
            LimitKind::Throttle => "throttle",
            LimitKind::Method => "method",
            LimitKind::Quota => "quota",
            LimitKind::Stage => "stage",
            LimitKind::StageMethod => "stage-method",
            LimitKind::TokensMinute => "tokens-minute",
            LimitKind::TokensDay => "tokens-day",
            LimitKind::TokensMonth => "tokens-month",
            LimitKind::Concurrency => "concurrency",
            LimitKind::Account => "account",
            LimitKind::AccountQuota => "account-quota",
            LimitKind::AccountTokensMinute => "account-tokens-minute",
            LimitKind::AccountTokensDay => "account-tokens-day",
            LimitKind::AccountTokensMonth => "account-tokens-month",
            LimitKind::Model => "model",
            LimitKind::ModelQuota => "model-quota",
            LimitKind::ModelTokensMinute => "model-tokens-minute",
            LimitKind::ModelTokensDay => "model-tokens-day",
            LimitKind::ModelTokensMonth => "model-tokens-month",
            LimitKind::ModelConcurrency => "model-concurrency",
        }
    }

    /// The kind named `name` (tests build reports by name).
    #[cfg(test)]
    pub(crate) fn named(name: &str) -> Self {
        use LimitKind::*;
        [
            Throttle,
            Method,
            Quota,
            Stage,
            StageMethod,
            TokensMinute,
            TokensDay,
            TokensMonth,
            Concurrency,
            Account,
            AccountQuota,
            AccountTokensMinute,
            AccountTokensDay,
            AccountTokensMonth,
            Model,
            ModelQuota,
            ModelTokensMinute,
            ModelTokensDay,
            ModelTokensMonth,
            ModelConcurrency,
        ]
        .into_iter()
        .find(|k| k.name() == name)
        .expect("a limit's name")
    }

    /// Whether the limit counts tokens (charged the request's estimate)
    /// rather than requests.
    #[inline]
    pub fn counts_tokens(self) -> bool {
        matches!(
            self,
            LimitKind::TokensMinute
                | LimitKind::TokensDay
                | LimitKind::TokensMonth
                | LimitKind::AccountTokensMinute
                | LimitKind::AccountTokensDay
                | LimitKind::AccountTokensMonth
                | LimitKind::ModelTokensMinute
                | LimitKind::ModelTokensDay
                | LimitKind::ModelTokensMonth
        )
    }

    /// Whether the limit is a model's within a plan, counted per (plan,
    /// key, model).
    #[inline]
    pub fn is_model(self) -> bool {
        matches!(
            self,
            LimitKind::Model
                | LimitKind::ModelQuota
                | LimitKind::ModelTokensMinute
                | LimitKind::ModelTokensDay
                | LimitKind::ModelTokensMonth
                | LimitKind::ModelConcurrency
        )
    }

    /// Whether the limit is a cap on requests in flight (a plan's or a
    /// model's): it has no window, and its places come back when responses
    /// end.
    #[inline]
    pub fn is_concurrency(self) -> bool {
        matches!(self, LimitKind::Concurrency | LimitKind::ModelConcurrency)
    }

    /// Whether the limit is an account's, shared by all the account's keys.
    #[inline]
    pub fn is_account(self) -> bool {
        matches!(
            self,
            LimitKind::Account
                | LimitKind::AccountQuota
                | LimitKind::AccountTokensMinute
                | LimitKind::AccountTokensDay
                | LimitKind::AccountTokensMonth
        )
    }
}

/// One throttle compiled for deciding, with the salt that places its state.
#[derive(Debug, Clone)]
pub(crate) struct Limit {
    pub(crate) kind: LimitKind,
    pub(crate) gcra: Gcra,
    pub(crate) salt: u64,
    /// The `w` of the `RateLimit-Policy` item: seconds to refill the whole bucket.
    pub(crate) window_secs: u64,
    /// When the limit's numbers last changed while serving (wall nanoseconds;
    /// 0 for never): a store that converts state lazily converts it as of then.
    pub(crate) since: i64,
    /// The numbers in force before `since` (the last changes): a store
    /// that converts lazily replays each change a key missed in turn, as a
    /// store that converts at once did at each.
    pub(crate) before: Option<Arc<Earlier>>,
}

impl Limit {
    /// The salt derives from the plan and the limit's place in it, not from
    /// its numbers: replacing a plan's rate keeps every key's state.
    pub(crate) fn new(kind: LimitKind, t: &Throttle, owner: &str, path: &str) -> Self {
        let id = [
            owner.as_bytes(),
            b"\0",
            kind.name().as_bytes(),
            b"\0",
            path.as_bytes(),
        ]
        .concat();
        Self {
            kind,
            gcra: *t.gcra(),
            salt: hash::stable(&id) as u64,
            window_secs: t.gcra().span().div_ceil(NANOS_PER_SEC),
            since: 0,
            before: None,
        }
    }
}

/// The spans a throttle had before its latest change while serving, newest
/// first, each with the instant it came into force (wall nanoseconds; 0:
/// from the start) and how many changes came before it at that very
/// instant: a key converted when next used goes through every change it
/// missed, each rounded down where a store converting at once rounded it,
/// the time between two changes draining at the scale in force then. The
/// last [`Earlier::MAX`] are kept: a key untouched through more changes is
/// converted from its own numbers at the latest change only.
#[derive(Debug)]
pub(crate) struct Earlier {
    /// `"<tie> <span> <since_s> <since_ns> <tie> …"`: how many changes came
    /// before the current numbers at their instant, then the spans newest
    /// first. The argument the Redis script reads, made once per change
    /// rather than per call.
    encoded: Box<str>,
}

impl Earlier {
    /// How many earlier spans are kept at most. Each is a few bytes more
    /// in every call of a key on the limit, read only by a call that finds
    /// a key written under other numbers.
    pub(crate) const MAX: usize = 16;

    /// What a limit changing from `old`'s numbers at `now` keeps.
    pub(crate) fn after(old: &Limit, now: i64) -> Arc<Self> {
        use std::fmt::Write as _;
        let mut words = old.before.as_ref().map(|e| e.encoded.split(' '));
        let old_tie: u64 = words
            .as_mut()
            .and_then(|w| w.next()?.parse().ok())
            .unwrap_or(0);
        let tie = if old.since == now { old_tie + 1 } else { 0 };
        let sec = NANOS_PER_SEC as i64;
        let since = old.since.max(0);
        let mut encoded = format!(
            "{tie} {} {} {} {old_tie}",
            old.gcra.span(),
            since / sec,
            since % sec
        );
        // Whole entries of the older ones, the oldest dropped.
        for _ in 1..Self::MAX {
            let Some(w) = words.as_mut() else { break };
            let (Some(span), Some(s), Some(ns), Some(t)) = (w.next(), w.next(), w.next(), w.next())
            else {
                break;
            };
            let _ = write!(encoded, " {span} {s} {ns} {t}");
        }
        Arc::new(Self {
            encoded: encoded.into_boxed_str(),
        })
    }

    /// How many changes came before the current numbers at their instant
    /// (with the instant, what tells two sets of numbers in force one
    /// after the other apart).
    pub(crate) fn tie(&self) -> u64 {
        let word = self.encoded.split(' ').next();
        word.and_then(|w| w.parse().ok()).unwrap_or(0)
    }

    /// How many spans it holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.encoded.split(' ').count() / 4
    }

    /// The Redis script's argument.
    #[cfg(any(feature = "redis", test))]
    pub(crate) fn encoded(&self) -> &str {
        &self.encoded
    }
}

/// The salt of a plan's quota of `kind`: from the plan and the kind, not the
/// numbers, so that a replaced plan keeps every key's count.
pub(super) fn quota_salt(owner: &str, kind: LimitKind) -> u64 {
    hash::stable(format!("{owner}\0{}", kind.name()).as_bytes()) as u64
}

/// A plan's cap on requests of one key in flight, compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Concurrency {
    pub(crate) limit: u32,
    /// Where the count lives, beside the key's throttles.
    pub(crate) salt: u64,
}

impl Concurrency {
    /// The cap of `limit` requests owned by `owner` (a plan, or a model
    /// within one); a cap of 0 would refuse everything.
    fn compile(limit: Option<u32>, owner: &str) -> Result<Option<Self>, ConfigError> {
        match limit {
            None => Ok(None),
            Some(0) => Err(ConfigError::InvalidConcurrency),
            Some(limit) => Ok(Some(Concurrency {
                limit,
                salt: hash::stable(format!("{owner}\0concurrency").as_bytes()) as u64,
            })),
        }
    }
}

/// A plan's token budget, compiled.
#[derive(Debug, Clone)]
pub(crate) struct Tokens {
    /// `per_minute`: GCRA on cost units.
    pub(crate) minute: Option<Limit>,
    /// `per_day` and `per_month`: calendar quotas counted in tokens.
    pub(crate) day: Option<QuotaSpec>,
    pub(crate) month: Option<QuotaSpec>,
    /// The kinds of its limits (per minute, day, month): a plan's or an account's.
    kinds: TokenKinds,
}

/// The kinds of a token budget's limits: a plan's, or an account's.
pub(super) type TokenKinds = [LimitKind; 3];

/// The kinds of a plan's token budget.
const PLAN_TOKENS: TokenKinds = [
    LimitKind::TokensMinute,
    LimitKind::TokensDay,
    LimitKind::TokensMonth,
];

impl Tokens {
    fn compile(t: &TokenBudget, owner: &str, created_at: i64) -> Self {
        Self::compile_as(t, owner, created_at, PLAN_TOKENS)
    }

    /// Compiles a budget whose limits are of `kinds` (per minute, day, month).
    pub(super) fn compile_as(
        t: &TokenBudget,
        owner: &str,
        created_at: i64,
        [minute, day, month]: TokenKinds,
    ) -> Self {
        let spec = |limit, period, kind| QuotaSpec {
            limit,
            period,
            offset: 0,
            created_at,
            salt: quota_salt(owner, kind),
        };
        Tokens {
            minute: t.per_minute.map(|n| {
                let throttle = Throttle::new(f64::from(n) / 60.0, n)
                    .expect("checked by TokenBudget::per_minute");
                Limit::new(minute, &throttle, owner, "")
            }),
            day: t.per_day.map(|n| spec(n, Period::Day, day)),
            month: t.per_month.map(|n| spec(n, Period::Month, month)),
            kinds: [minute, day, month],
        }
    }

    /// The calendar quotas in tokens, with their names.
    pub(crate) fn quotas(&self) -> [Option<(LimitKind, &QuotaSpec)>; 2] {
        [
            self.day.as_ref().map(|q| (self.kinds[1], q)),
            self.month.as_ref().map(|q| (self.kinds[2], q)),
        ]
    }
}

/// The kinds of a model's token budget.
const MODEL_TOKENS: TokenKinds = [
    LimitKind::ModelTokensMinute,
    LimitKind::ModelTokensDay,
    LimitKind::ModelTokensMonth,
];

/// One model's limits within a plan, compiled: their salts derive from the
/// plan and the model's name (`"*"` for the entry of the models the plan
/// does not name), so their state never meets the plan's or another
/// model's.
#[derive(Debug)]
pub(crate) struct ModelEntry {
    pub(crate) name: Arc<str>,
    /// What tells the name apart from other models' ([`model::core`]),
    /// compared without regard to ASCII case.
    core: Box<str>,
    pub(crate) throttle: Option<Limit>,
    pub(crate) quota: Option<QuotaSpec>,
    pub(crate) tokens: Option<Tokens>,
    pub(crate) concurrency: Option<Concurrency>,
}

impl ModelEntry {
    fn compile(
        plan: &str,
        name: &str,
        m: &ModelLimits,
        created_at: i64,
    ) -> Result<Self, ConfigError> {
        let owner = format!("plan\0{plan}\0model\0{name}");
        Ok(ModelEntry {
            name: name.into(),
            core: model::core(name).into(),
            throttle: m
                .throttle
                .as_ref()
                .map(|t| Limit::new(LimitKind::Model, t, &owner, "")),
            quota: m.quota.map(|q| QuotaSpec {
                limit: q.limit,
                period: q.period,
                offset: q.offset,
                created_at: q.created_at(created_at),
                salt: quota_salt(&owner, LimitKind::ModelQuota),
            }),
            tokens: m
                .tokens
                .as_ref()
                .map(|t| Tokens::compile_as(t, &owner, created_at, MODEL_TOKENS)),
            concurrency: Concurrency::compile(m.concurrency, &owner)?,
        })
    }
}

/// A plan's limits per model: the models it names, and the `"*"` entry of
/// those it does not.
#[derive(Debug, Default)]
pub(crate) struct Models {
    pub(crate) named: Box<[ModelEntry]>,
    pub(crate) other: Option<ModelEntry>,
}

impl Models {
    /// The limits of a request to `model` (`None`: not known): its own
    /// entry, else the `"*"` one, if any.
    ///
    /// An entry holds every name a backend serves as the model it names
    /// ([`model::core`]): `Big-Model`, `big-model:latest` and
    /// `library/big-model` find the entry `"big-model"`, so that no
    /// spelling of a model escapes its limits. No two entries of a plan
    /// name the same model (refused when the plan is compiled), so the
    /// entry found is the only one. Nothing is allocated.
    #[inline]
    pub(crate) fn get(&self, model: Option<&str>) -> Option<&ModelEntry> {
        model
            .map(model::core)
            .and_then(|m| self.named.iter().find(|e| e.core.eq_ignore_ascii_case(m)))
            .or(self.other.as_ref())
    }

    /// The entry of a model by its exact name in the plan (`"*"` included).
    pub(crate) fn entry(&self, name: &str) -> Option<&ModelEntry> {
        self.named
            .iter()
            .chain(&self.other)
            .find(|e| &*e.name == name)
    }
}

/// A plan compiled for deciding.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) name: Arc<str>,
    pub(crate) throttle: Option<Limit>,
    pub(crate) methods: Box<[MethodLimit]>,
    pub(crate) quota: Option<QuotaSpec>,
    pub(crate) tokens: Option<Tokens>,
    pub(crate) concurrency: Option<Concurrency>,
    /// Limits per model; `None` when the plan has none (nothing is looked up).
    pub(crate) models: Option<Box<Models>>,
    pub(crate) shadow: bool,
    pub(crate) failure: FailureMode,
    /// Whether a remote store may lend shares of its limits.
    pub(crate) borrow: bool,
    pub(crate) source: UsagePlan,
}

impl Plan {
    /// Every throttle of the plan: the plan-wide one, the method overrides,
    /// the per-minute token budget, and each model's.
    pub(crate) fn limits(&self) -> impl Iterator<Item = &Limit> {
        self.throttle
            .iter()
            .chain(self.methods.iter().map(|m| &m.limit))
            .chain(self.tokens.iter().flat_map(|t| t.minute.as_ref()))
            .chain(self.model_entries().flat_map(|m| {
                m.throttle
                    .iter()
                    .chain(m.tokens.iter().flat_map(|t| t.minute.as_ref()))
            }))
    }

    /// The limits of a request to `model` (`None`: not known): the model's
    /// entry, else the `"*"` one, else none. A plan without model limits
    /// looks nothing up.
    #[inline]
    pub(crate) fn model(&self, model: Option<&str>) -> Option<&ModelEntry> {
        self.models.as_deref()?.get(model)
    }

    /// Every model's entry, `"*"` included.
    pub(crate) fn model_entries(&self) -> impl Iterator<Item = &ModelEntry> {
        self.models
            .iter()
            .flat_map(|m| m.named.iter().chain(&m.other))
    }

    /// The plan's throttle when its only other limits are a request quota
    /// and method overrides (no token budget, concurrency cap or model
    /// limits) and the plan is not a shadow: the common full plan, whose
    /// requests are decided without gathering their limits when all allow.
    #[inline]
    pub(crate) fn clear_throttle(&self) -> Option<&Limit> {
        match &self.throttle {
            Some(l)
                if self.tokens.is_none()
                    && self.concurrency.is_none()
                    && self.models.is_none()
                    && !self.shadow =>
            {
                Some(l)
            }
            _ => None,
        }
    }

    /// Every throttle of the plan, mutably.
    pub(crate) fn limits_mut(&mut self) -> impl Iterator<Item = &mut Limit> {
        let models = self
            .models
            .iter_mut()
            .flat_map(|m| m.named.iter_mut().chain(&mut m.other))
            .flat_map(|m| {
                m.throttle
                    .iter_mut()
                    .chain(m.tokens.iter_mut().flat_map(|t| t.minute.as_mut()))
            });
        self.throttle
            .iter_mut()
            .chain(self.methods.iter_mut().map(|m| &mut m.limit))
            .chain(self.tokens.iter_mut().flat_map(|t| t.minute.as_mut()))
            .chain(models)
    }

    /// Compiles `plan`; `created_at` is when the plan first existed (wall nanoseconds).
    pub(crate) fn compile(plan: &UsagePlan, created_at: i64) -> Result<Self, ConfigError> {
        let owner = format!("plan\0{}", plan.name);
        Ok(Plan {
            name: plan.name.as_str().into(),
            throttle: plan
                .throttle
                .as_ref()
                .map(|t| Limit::new(LimitKind::Throttle, t, &owner, "")),
            methods: compile_methods(&plan.methods, LimitKind::Method, &owner)?,
            quota: plan.quota.map(|q| QuotaSpec {
                limit: q.limit,
                period: q.period,
                offset: q.offset,
                created_at: q.created_at(created_at),
                salt: quota_salt(&owner, LimitKind::Quota),
            }),
            tokens: plan
                .tokens
                .as_ref()
                .map(|t| Tokens::compile(t, &owner, created_at)),
            concurrency: Concurrency::compile(plan.concurrency, &owner)?,
            models: compile_models(plan, created_at)?,
            shadow: plan.shadow,
            failure: plan.failure,
            borrow: plan.borrow,
            source: plan.clone(),
        })
    }

    /// A plan of one throttle for keys that are not registered.
    pub(crate) fn anonymous(name: &str, throttle: &Throttle) -> Self {
        Plan {
            name: name.into(),
            throttle: Some(Limit::new(LimitKind::Throttle, throttle, name, "")),
            methods: Box::default(),
            quota: None,
            tokens: None,
            concurrency: None,
            models: None,
            shadow: false,
            failure: FailureMode::Local,
            borrow: true,
            source: UsagePlan::new(name).throttle(*throttle),
        }
    }
}

/// A plan's model limits, compiled; `None` when it has none.
fn compile_models(plan: &UsagePlan, created_at: i64) -> Result<Option<Box<Models>>, ConfigError> {
    if plan.models.is_empty() {
        return Ok(None);
    }
    // Two entries that name one model would leave it to the order of the
    // entries which one holds it.
    for (i, (second, _)) in plan.models.iter().enumerate() {
        if let Some((first, _)) = plan.models[..i]
            .iter()
            .find(|(first, _)| model::same_model(first, second))
        {
            return Err(ConfigError::DuplicateModel {
                plan: plan.name.clone(),
                first: first.clone(),
                second: second.clone(),
            });
        }
    }
    let mut models = Models::default();
    let mut named = Vec::new();
    for (name, limits) in &plan.models {
        let entry = ModelEntry::compile(&plan.name, name, limits, created_at)?;
        if name == "*" {
            models.other = Some(entry);
        } else {
            named.push(entry);
        }
    }
    models.named = named.into();
    Ok(Some(Box::new(models)))
}

/// Stage limits compiled for deciding.
#[derive(Debug)]
pub(crate) struct StageLimits {
    pub(crate) throttle: Option<Limit>,
    pub(crate) methods: Box<[MethodLimit]>,
}

impl StageLimits {
    pub(crate) fn compile(stage: &Stage) -> Result<Self, ConfigError> {
        Ok(StageLimits {
            throttle: stage
                .throttle
                .as_ref()
                .map(|t| Limit::new(LimitKind::Stage, t, "stage", "")),
            methods: compile_methods(&stage.methods, LimitKind::StageMethod, "stage")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earlier_spans_count_changes_at_one_instant_and_keep_the_last_sixteen() {
        fn change(limit: &Limit, rate: f64, now: i64) -> Limit {
            let t = Throttle::new(rate, 2).unwrap();
            let mut new = Limit::new(LimitKind::Throttle, &t, "p", "");
            new.since = now;
            new.before = Some(Earlier::after(limit, now));
            new
        }
        let encoded = |l: &Limit| l.before.as_ref().unwrap().encoded().to_owned();
        let start = Limit::new(
            LimitKind::Throttle,
            &Throttle::new(1.0, 2).unwrap(),
            "p",
            "",
        );
        let mut limit = change(&start, 2.0, 5_000_000_001);
        assert_eq!(encoded(&limit), "0 2000000000 0 0 0");
        // Two more at that instant: each is told apart by its tie.
        limit = change(&limit, 4.0, 5_000_000_001);
        limit = change(&limit, 1.0, 5_000_000_001);
        assert_eq!(
            encoded(&limit),
            "2 500000000 5 1 1 1000000000 5 1 0 2000000000 0 0 0"
        );
        limit = change(&limit, 2.0, 6_000_000_000);
        assert!(encoded(&limit).starts_with("0 2000000000 5 1 2 "));
        for i in 0..40 {
            limit = change(
                &limit,
                if i % 2 == 0 { 1.0 } else { 2.0 },
                7_000_000_000 + i,
            );
        }
        assert_eq!(limit.before.as_ref().unwrap().len(), Earlier::MAX);
    }

    #[test]
    fn salts_follow_the_plan_not_the_numbers() {
        let a = Limit::new(
            LimitKind::Throttle,
            &Throttle::new(1.0, 1).unwrap(),
            "plan\0free",
            "",
        );
        let b = Limit::new(
            LimitKind::Throttle,
            &Throttle::new(9.0, 9).unwrap(),
            "plan\0free",
            "",
        );
        let c = Limit::new(
            LimitKind::Throttle,
            &Throttle::new(1.0, 1).unwrap(),
            "plan\0pro",
            "",
        );
        assert_eq!(a.salt, b.salt);
        assert_ne!(a.salt, c.salt);
    }

    #[test]
    fn model_salts_are_their_own() {
        let t = Throttle::new(1.0, 1).unwrap();
        let q = crate::Quota::new(10, Period::Day).unwrap();
        let b = TokenBudget::new()
            .per_minute(60)
            .unwrap()
            .per_day(100)
            .unwrap();
        let m = ModelLimits::new().throttle(t).quota(q).tokens(b);
        let plan = UsagePlan::new("p")
            .throttle(t)
            .quota(q)
            .tokens(b)
            .model("a", m)
            .model("b", m)
            .model("*", m);
        let plan = Plan::compile(&plan, 0).unwrap();
        let models = plan.models.as_deref().unwrap();
        let mut salts: Vec<u64> = plan.limits().map(|l| l.salt).collect();
        let quota = |s: Option<&QuotaSpec>| s.map(|s| s.salt);
        salts.extend(quota(plan.quota.as_ref()));
        salts.extend(quota(plan.tokens.as_ref().unwrap().day.as_ref()));
        for e in models.named.iter().chain(&models.other) {
            salts.extend(quota(e.quota.as_ref()));
            salts.extend(quota(e.tokens.as_ref().unwrap().day.as_ref()));
        }
        let n = salts.len();
        assert_eq!(n, 2 + 2 + 3 * 4);
        salts.sort_unstable();
        salts.dedup();
        assert_eq!(salts.len(), n, "every limit has a salt of its own");
        assert_eq!(&*models.get(Some("a")).unwrap().name, "a");
        assert_eq!(&*models.get(Some("zzz")).unwrap().name, "*");
        assert_eq!(&*models.get(None).unwrap().name, "*");
    }
}
