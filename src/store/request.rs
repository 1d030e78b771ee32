//! What a store is asked: the limits of one request ([`Acquire`]), each
//! limit with whose state it is counted under ([`ThrottleRef`],
//! [`QuotaRef`], [`ConcurrencyRef`]), and the settlement of a request's
//! actual tokens ([`Settlement`]).

use std::fmt;
use std::time::Duration;

use arrayvec::ArrayVec;

use super::verdict::{Applied, Reservation, quota_applied};
use super::{MAX_ACCOUNT_QUOTAS, MAX_MODEL_QUOTAS, MAX_THROTTLES};
use crate::extract::RequestView;
use crate::gcra::Nanos;
use crate::hash::Digest;
use crate::plan::{
    AccountLimits, Concurrency, FailureMode, Limit, LimitKind, ModelEntry, Plan, StageLimits,
    method_limit,
};
use crate::quota::QuotaSpec;
use crate::window::Period;

/// Stage limits are one state for every caller.
const STAGE_KEY: Digest = Digest(1 << 127);

/// Days of usage a token budget's daily or monthly quota keeps: none but the
/// current day's (usage reports are of request quotas).
const TOKEN_HISTORY_DAYS: u32 = 1;

/// Whose limits a request is decided against: a plan, and the subject whose
/// state it counts. Every reference to a limit (for a decision, a
/// settlement, a usage report, a reset) is built here.
#[derive(Clone, Copy)]
pub(crate) struct Subject<'a> {
    pub(crate) plan: &'a Plan,
    /// What a remote store names the state by: a registered key's public
    /// id, the key a per-key policy extracted, or an anonymous client's IP.
    pub(crate) name: &'a [u8],
    /// Where the memory store keeps the state (a per-process keyed hash).
    pub(crate) digest: Digest,
    /// Days of usage history a request quota keeps.
    pub(crate) history_days: u32,
}

impl<'a> Subject<'a> {
    /// One of the plan's throttles, counted for this subject.
    #[inline]
    pub(crate) fn throttle(&self, limit: &'a Limit) -> ThrottleRef<'a> {
        ThrottleRef {
            limit,
            plan: Some(&self.plan.name),
            account: None,
            subject: self.name,
            digest: self.digest,
            shadow: self.plan.shadow,
        }
    }

    /// One of the plan's calendar quotas, counted for this subject.
    #[inline]
    pub(crate) fn quota(&self, kind: LimitKind, spec: &'a QuotaSpec) -> QuotaRef<'a> {
        QuotaRef {
            kind,
            spec,
            plan: &self.plan.name,
            account: None,
            subject: self.name,
            digest: self.digest,
            shadow: self.plan.shadow,
            history_days: if kind.counts_tokens() {
                TOKEN_HISTORY_DAYS
            } else {
                self.history_days
            },
        }
    }

    /// The plan's request quota.
    #[inline]
    pub(crate) fn request_quota(&self) -> Option<QuotaRef<'a>> {
        let spec = self.plan.quota.as_ref()?;
        Some(self.quota(LimitKind::Quota, spec))
    }

    /// The plan's daily and monthly token quotas.
    #[inline]
    pub(crate) fn token_quotas(&self) -> [Option<QuotaRef<'a>>; 2] {
        match &self.plan.tokens {
            None => [None, None],
            Some(t) => t
                .quotas()
                .map(|q| q.map(|(kind, spec)| self.quota(kind, spec))),
        }
    }

    /// The plan's per-minute token bucket.
    #[inline]
    pub(crate) fn token_throttle(&self) -> Option<ThrottleRef<'a>> {
        let limit = self.plan.tokens.as_ref()?.minute.as_ref()?;
        Some(self.throttle(limit))
    }

    /// The plan's cap on this subject's requests in flight.
    #[inline]
    pub(crate) fn concurrency(&self) -> Option<ConcurrencyRef<'a>> {
        self.cap(LimitKind::Concurrency, self.plan.concurrency.as_ref()?)
    }

    /// A cap on this subject's requests in flight, of the plan or of one of
    /// its models.
    #[inline]
    fn cap(&self, kind: LimitKind, c: &Concurrency) -> Option<ConcurrencyRef<'a>> {
        Some(ConcurrencyRef {
            kind,
            limit: c.limit,
            salt: c.salt,
            plan: &self.plan.name,
            subject: self.name,
            digest: self.digest,
            shadow: self.plan.shadow,
        })
    }

    /// A model's request quota, counted for this subject.
    #[inline]
    pub(crate) fn model_quota(&self, model: &'a ModelEntry) -> Option<QuotaRef<'a>> {
        Some(self.quota(LimitKind::ModelQuota, model.quota.as_ref()?))
    }

    /// Every calendar quota of the plan, counted for this subject: the
    /// request quota, the daily and monthly token quotas, and each model's
    /// request and token quotas (what resetting a key forgets).
    pub(crate) fn quotas(self) -> impl Iterator<Item = QuotaRef<'a>> {
        let models = self.plan.model_entries().flat_map(move |m| {
            let [day, month] = self.model_token_quotas(m);
            [self.model_quota(m), day, month]
        });
        [self.request_quota()]
            .into_iter()
            .chain(self.token_quotas())
            .chain(models)
            .flatten()
    }

    /// A model's daily and monthly token quotas, counted for this subject.
    #[inline]
    pub(crate) fn model_token_quotas(&self, model: &'a ModelEntry) -> [Option<QuotaRef<'a>>; 2] {
        match &model.tokens {
            None => [None, None],
            Some(t) => t
                .quotas()
                .map(|q| q.map(|(kind, spec)| self.quota(kind, spec))),
        }
    }

    /// A model's per-minute token bucket, counted for this subject.
    #[inline]
    pub(crate) fn model_token_throttle(&self, model: &'a ModelEntry) -> Option<ThrottleRef<'a>> {
        Some(self.throttle(model.tokens.as_ref()?.minute.as_ref()?))
    }

    /// The settlement of a request's actual tokens against a model's token
    /// limits (see [`settlement`](Self::settlement)): the per-minute bucket
    /// gets back only what of the estimate's share in the model's own
    /// bucket has not refilled.
    pub(crate) fn model_settlement(
        &self,
        model: &'a ModelEntry,
        estimate: u32,
        delta: i64,
        reserved: Reservation,
    ) -> Settlement<'a> {
        Settlement {
            throttle: self
                .model_token_throttle(model)
                .filter(|t| charged(t, reserved.model_until)),
            quotas: self.model_token_quotas(model),
            estimate,
            delta,
            reserved: Reservation {
                until: reserved.model_until,
                account_until: None,
                model_until: None,
                wall: reserved.wall,
                #[cfg(feature = "redis")]
                local: reserved.local,
            },
        }
    }

    /// The settlement of a request's actual tokens against the plan's token
    /// limits: `delta` more tokens (or fewer, when negative) than the
    /// `estimate`, which was charged as `reserved` says.
    pub(crate) fn settlement(
        &self,
        estimate: u32,
        delta: i64,
        reserved: Reservation,
    ) -> Settlement<'a> {
        Settlement {
            throttle: self.token_throttle().filter(|t| charged(t, reserved.until)),
            quotas: self.token_quotas(),
            estimate,
            delta,
            reserved,
        }
    }
}

/// Whether a decision charged the estimate to the per-minute bucket `t`,
/// `until` being when the share it reserved there refills. A shadow bucket
/// that would have denied the estimate did not charge it (the request is
/// one enforcing would have refused): its settlement, the difference
/// between the actual tokens and that estimate, has nothing to adjust
/// there, and charging it would count part of a request the bucket does
/// not count. Any other bucket charged what it allowed.
fn charged(t: &ThrottleRef<'_>, until: Option<Nanos>) -> bool {
    !t.shadow || until.is_some()
}

/// An account's limits, counted under the account's own state: the subject
/// is the account's name, under a namespace of its own (a plan or a key of
/// the same name never shares it). An account's limits are never a shadow.
impl AccountLimits {
    /// One of the account's throttles.
    #[inline]
    pub(crate) fn throttle_ref<'a>(&'a self, limit: &'a Limit) -> ThrottleRef<'a> {
        ThrottleRef {
            limit,
            plan: None,
            account: Some(&self.name),
            subject: self.name.as_bytes(),
            digest: self.digest,
            shadow: false,
        }
    }

    /// One of the account's calendar quotas; a request quota keeps
    /// `history_days` of usage.
    #[inline]
    pub(crate) fn quota_ref<'a>(
        &'a self,
        kind: LimitKind,
        spec: &'a QuotaSpec,
        history_days: u32,
    ) -> QuotaRef<'a> {
        QuotaRef {
            kind,
            spec,
            plan: "",
            account: Some(&self.name),
            subject: self.name.as_bytes(),
            digest: self.digest,
            shadow: false,
            history_days: if kind.counts_tokens() {
                TOKEN_HISTORY_DAYS
            } else {
                history_days
            },
        }
    }

    /// The account's request quota.
    #[inline]
    pub(crate) fn request_quota(&self, history_days: u32) -> Option<QuotaRef<'_>> {
        let spec = self.quota.as_ref()?;
        Some(self.quota_ref(LimitKind::AccountQuota, spec, history_days))
    }

    /// The account's daily and monthly token quotas.
    #[inline]
    pub(crate) fn token_quotas(&self) -> [Option<QuotaRef<'_>>; 2] {
        match &self.tokens {
            None => [None, None],
            Some(t) => t
                .quotas()
                .map(|q| q.map(|(kind, spec)| self.quota_ref(kind, spec, 0))),
        }
    }

    /// The account's per-minute token bucket.
    #[inline]
    pub(crate) fn token_throttle(&self) -> Option<ThrottleRef<'_>> {
        let limit = self.tokens.as_ref()?.minute.as_ref()?;
        Some(self.throttle_ref(limit))
    }

    /// The settlement of a request's actual tokens against the account's
    /// token limits (see [`Subject::settlement`]): the per-minute bucket
    /// gets back only what of the estimate's share in the account's own
    /// bucket has not refilled.
    pub(crate) fn settlement(
        &self,
        estimate: u32,
        delta: i64,
        reserved: Reservation,
    ) -> Settlement<'_> {
        Settlement {
            throttle: self.token_throttle(),
            quotas: self.token_quotas(),
            estimate,
            delta,
            reserved: Reservation {
                until: reserved.account_until,
                account_until: None,
                model_until: None,
                wall: reserved.wall,
                #[cfg(feature = "redis")]
                local: reserved.local,
            },
        }
    }
}

/// Everything a store needs to decide one request: its throttles, its quota
/// and its cost.
#[derive(Clone)]
pub struct Acquire<'a> {
    /// Left unwritten past the throttles pushed: a request with one
    /// throttle (the common plan) pays for no room it does not use.
    throttles: ArrayVec<ThrottleRef<'a>, MAX_THROTTLES>,
    pub(crate) quota: Option<QuotaRef<'a>>,
    /// The daily and monthly token budgets.
    pub(crate) token_quotas: [Option<QuotaRef<'a>>; 2],
    /// The account's request quota and its daily and monthly token budgets.
    pub(crate) account_quotas: [Option<QuotaRef<'a>>; MAX_ACCOUNT_QUOTAS],
    /// The model's request quota and its daily and monthly token budgets.
    pub(crate) model_quotas: [Option<QuotaRef<'a>>; MAX_MODEL_QUOTAS],
    pub(crate) concurrency: Option<ConcurrencyRef<'a>>,
    /// The model's cap on the subject's requests to it in flight.
    pub(crate) model_concurrency: Option<ConcurrencyRef<'a>>,
    pub(crate) cost: u32,
    pub(crate) tokens: u32,
    pub(crate) failure: FailureMode,
    /// Whether a remote store may lend a share of these limits.
    pub(crate) borrow: bool,
}

impl<'a> Acquire<'a> {
    pub(crate) fn new(cost: u32, failure: FailureMode) -> Self {
        Acquire {
            throttles: ArrayVec::new_const(),
            quota: None,
            token_quotas: [None; 2],
            account_quotas: [None; MAX_ACCOUNT_QUOTAS],
            model_quotas: [None; MAX_MODEL_QUOTAS],
            concurrency: None,
            model_concurrency: None,
            cost,
            tokens: 0,
            failure,
            borrow: false,
        }
    }

    /// Every limit that applies to a request of `cost` units (and `tokens`
    /// estimated tokens) by `subject`, handed to `run`: the stage's shared
    /// limits, the account's (when the key belongs to one), the plan's
    /// throttle, the method overrides matching the request's route (none
    /// without a request), the token budget, the quotas and the concurrency
    /// cap, in the order every store weighs them. The account's request
    /// quota keeps `account_history` days of usage, the policy's, whatever
    /// `subject` keeps: a key the resolver answered keeps none of its own,
    /// and would cut the history of the account it shares.
    /// Built where `run` reads it: returned, the description (some 600
    /// bytes) would be copied on every request.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gather<T>(
        stage: Option<&'a StageLimits>,
        account: Option<&'a AccountLimits>,
        account_history: u32,
        subject: &Subject<'a>,
        req: Option<&RequestView<'_>>,
        model: Option<&'a ModelEntry>,
        cost: u32,
        tokens: u32,
        run: impl FnOnce(&Acquire<'a>) -> T,
    ) -> T {
        let plan = subject.plan;
        let mut acquire = Acquire::new(cost, plan.failure);
        acquire.borrow = plan.borrow;
        // Stage limits protect the backend's total capacity: a shadow plan
        // never lifts them.
        if let Some(stage) = stage {
            if let Some(l) = &stage.throttle {
                acquire.push(ThrottleRef::stage(l));
            }
            if let Some(l) = method_limit(&stage.methods, req) {
                acquire.push(ThrottleRef::stage(l));
            }
        }
        // An account's limits are the account's, not the plan's: a shadow
        // plan never lifts them either.
        if let Some(account) = account {
            if let Some(l) = &account.throttle {
                acquire.push(account.throttle_ref(l));
            }
            if let Some(t) = account.token_throttle() {
                acquire.tokens = tokens;
                acquire.push(t);
            }
            acquire.account_quotas = [account.request_quota(account_history), None, None];
            if account.tokens.is_some() {
                acquire.tokens = tokens;
                let [day, month] = account.token_quotas();
                acquire.account_quotas[1] = day;
                acquire.account_quotas[2] = month;
            }
        }
        if let Some(l) = &plan.throttle {
            acquire.push(subject.throttle(l));
        }
        if let Some(l) = method_limit(&plan.methods, req) {
            acquire.push(subject.throttle(l));
        }
        if plan.tokens.is_some() {
            acquire.tokens = tokens;
            if let Some(t) = subject.token_throttle() {
                acquire.push(t);
            }
            acquire.token_quotas = subject.token_quotas();
        }
        if let Some(m) = model {
            acquire.add_model(subject, m, tokens);
        }
        acquire.quota = subject.request_quota();
        acquire.concurrency = subject.concurrency();
        run(&acquire)
    }

    /// A request of `cost` units whose one limit is the throttle `t` of
    /// `plan`, handed to `run`.
    #[inline(always)]
    pub(crate) fn lone<T>(
        t: ThrottleRef<'a>,
        cost: u32,
        plan: &Plan,
        run: impl FnOnce(&Acquire<'a>) -> T,
    ) -> T {
        let mut acquire = Acquire::new(cost, plan.failure);
        acquire.borrow = plan.borrow;
        acquire.push(t);
        run(&acquire)
    }

    /// Adds a model's limits, counted per (plan, subject, model).
    #[inline(never)]
    fn add_model(&mut self, subject: &Subject<'a>, m: &'a ModelEntry, tokens: u32) {
        if let Some(l) = &m.throttle {
            self.push(subject.throttle(l));
        }
        if let Some(q) = subject.model_quota(m) {
            self.model_quotas[0] = Some(q);
        }
        if m.tokens.is_some() {
            self.tokens = tokens;
            if let Some(t) = subject.model_token_throttle(m) {
                self.push(t);
            }
            let [day, month] = subject.model_token_quotas(m);
            self.model_quotas[1] = day;
            self.model_quotas[2] = month;
        }
        if let Some(c) = &m.concurrency {
            self.model_concurrency = subject.cap(LimitKind::ModelConcurrency, c);
        }
    }

    /// Every limit of the request as a policy, its size and window (what
    /// `RateLimit-Policy` announces), in the order a store reports how each
    /// stands: the throttles, the calendar quotas (each sized as its window
    /// at `wall` holds), the caps. Nothing of their state is read: units
    /// left and resets are 0. A denial tells how the limit that denied
    /// stands, and nothing of the others; a rejection announces them all
    /// from here.
    pub(crate) fn policies(&self, wall: i64) -> impl Iterator<Item = Applied> + '_ {
        let throttles = self.throttles().map(|t| Applied {
            kind: t.limit.kind,
            quota: u64::from(t.limit.gcra.burst()),
            window_secs: t.limit.window_secs,
            remaining: 0,
            reset: 0,
        });
        let quotas = self
            .quotas()
            .map(move |q| quota_applied(q.kind, &q.spec.unused_at(wall)))
            .map(|a| Applied {
                remaining: 0,
                reset: 0,
                ..a
            });
        let caps = self.caps().map(|c| c.applied(u64::from(c.limit)));
        throttles.chain(quotas).chain(caps)
    }

    #[inline]
    pub(crate) fn push(&mut self, throttle: ThrottleRef<'a>) {
        let _ = self.throttles.try_push(throttle);
    }

    /// The throttles (GCRA token buckets), shared stage limits first.
    #[inline]
    pub fn throttles(&self) -> impl Iterator<Item = &ThrottleRef<'a>> + '_ {
        self.throttles.iter()
    }

    /// The request's throttle when it is its only limit (no quota, token
    /// budget, concurrency cap or shadow): the common plan, which the memory
    /// store decides without gathering several limits.
    #[inline]
    pub(crate) fn lone_throttle(&self) -> Option<&ThrottleRef<'a>> {
        match &self.throttles[..] {
            [t] if !t.shadow
                && self.quota.is_none()
                && !self.has_caps()
                && self.token_quotas.iter().all(Option::is_none)
                && self.account_quotas.iter().all(Option::is_none)
                && self.model_quotas.iter().all(Option::is_none) =>
            {
                Some(t)
            }
            _ => None,
        }
    }

    /// The quota, when the plan has one.
    pub fn quota(&self) -> Option<&QuotaRef<'a>> {
        self.quota.as_ref()
    }

    /// Every calendar quota: the account's (its request quota, its daily and
    /// monthly token budgets) when the key belongs to one, then the plan's
    /// request quota, then its daily and monthly token budgets (which
    /// [count tokens](QuotaRef::counts_tokens)), then the model's request
    /// quota and token budgets.
    #[inline]
    pub fn quotas(&self) -> impl Iterator<Item = &QuotaRef<'a>> + '_ {
        self.account_quotas
            .iter()
            .flatten()
            .chain(&self.quota)
            .chain(self.token_quotas.iter().flatten())
            .chain(self.model_quotas.iter().flatten())
    }

    /// Whether the request is decided against an account's limits too.
    pub fn has_account(&self) -> bool {
        self.throttles().any(|t| t.account.is_some())
            || self.account_quotas.iter().any(Option::is_some)
    }

    /// The request's estimated cost in tokens, charged to the limits that
    /// count tokens (0 when neither its plan nor its account has a token
    /// budget).
    pub fn tokens(&self) -> u32 {
        self.tokens
    }

    /// What a limit is charged: the request's [`tokens`](Self::tokens) for
    /// a limit that counts tokens, else its [`cost`](Self::cost).
    #[inline]
    pub fn cost_for(&self, counts_tokens: bool) -> u32 {
        if counts_tokens {
            self.tokens
        } else {
            self.cost
        }
    }

    /// The plan's cap on requests of this key in flight, when it has one:
    /// an allowed request takes a place ([`Report::set_permit`](super::Report::set_permit)).
    /// See [`caps`](Self::caps) for every cap of the request.
    pub fn concurrency(&self) -> Option<&ConcurrencyRef<'a>> {
        self.concurrency.as_ref()
    }

    /// The model's cap on requests of this key to the model in flight, when
    /// the request's model has one within its plan.
    pub fn model_concurrency(&self) -> Option<&ConcurrencyRef<'a>> {
        self.model_concurrency.as_ref()
    }

    /// Every cap on requests in flight the request is decided against: the
    /// plan's, then the model's. An allowed request takes a place under each
    /// (one permit per cap, [`Report::permits`](super::Report::permits)); a
    /// request denied by any limit takes none.
    pub fn caps(&self) -> impl Iterator<Item = &ConcurrencyRef<'a>> + '_ {
        self.concurrency.iter().chain(&self.model_concurrency)
    }

    /// Whether the request has a cap on requests in flight.
    #[inline]
    pub fn has_caps(&self) -> bool {
        self.concurrency.is_some() || self.model_concurrency.is_some()
    }

    /// The request's cost in units (0 peeks: nothing is charged).
    pub fn cost(&self) -> u32 {
        self.cost
    }

    /// What the layer does with the request when the store fails.
    pub fn failure_mode(&self) -> FailureMode {
        self.failure
    }

    /// Whether the plan lets a remote store lend this instance a share of
    /// its limits ([`UsagePlan::borrow`](crate::UsagePlan::borrow)).
    pub fn may_borrow(&self) -> bool {
        self.borrow
    }
}

impl fmt::Debug for Acquire<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acquire")
            .field("throttles", &self.throttles().collect::<Vec<_>>())
            .field("quotas", &self.quotas().collect::<Vec<_>>())
            .field("cost", &self.cost)
            .field("tokens", &self.tokens)
            .finish()
    }
}

/// One throttle of a request, and whose state it is counted under.
#[derive(Clone, Copy)]
pub struct ThrottleRef<'a> {
    pub(crate) limit: &'a Limit,
    pub(crate) plan: Option<&'a str>,
    /// The account whose limit this is (then `plan` is `None`).
    pub(crate) account: Option<&'a str>,
    pub(crate) subject: &'a [u8],
    /// Where the memory store keeps the state (a per-process keyed hash).
    pub(crate) digest: Digest,
    pub(crate) shadow: bool,
}

impl<'a> ThrottleRef<'a> {
    /// A stage limit: one state shared by every caller, never a shadow.
    #[inline]
    pub(crate) fn stage(limit: &'a Limit) -> Self {
        ThrottleRef {
            limit,
            plan: None,
            account: None,
            subject: b"",
            digest: STAGE_KEY,
            shadow: false,
        }
    }

    /// What kind of throttle it is (a plan's, a method override's, the
    /// stage's, a token budget's per-minute bucket).
    pub fn kind(&self) -> LimitKind {
        self.limit.kind
    }

    /// The limit's name in headers: `"throttle"`, `"method"`, `"stage"`,
    /// `"stage-method"`, `"tokens-minute"`, `"account"`,
    /// `"account-tokens-minute"`, `"model"` or `"model-tokens-minute"`.
    pub fn name(&self) -> &'static str {
        self.limit.kind.name()
    }

    /// Whether the throttle counts tokens (a token budget's per-minute
    /// bucket): it is charged [`Acquire::tokens`], not [`Acquire::cost`].
    #[inline]
    pub fn counts_tokens(&self) -> bool {
        self.limit.kind.counts_tokens()
    }

    /// A stable id of the limit within its plan (the same in every process,
    /// and kept when the limit's numbers change). A model's limits have ids
    /// of their own per model.
    pub fn id(&self) -> u64 {
        self.limit.salt
    }

    /// The plan whose limit this is; `None` for stage limits, which every
    /// caller shares, and for an account's, which all its keys share.
    pub fn plan(&self) -> Option<&'a str> {
        self.plan
    }

    /// The account whose limit this is, shared by all the account's keys.
    pub fn account(&self) -> Option<&'a str> {
        self.account
    }

    /// Whether the limit is the stage's, one state for every caller.
    #[inline]
    pub fn is_stage(&self) -> bool {
        self.plan.is_none() && self.account.is_none()
    }

    /// Whose state it is: a registered key's public id, the key a per-key
    /// policy extracted, the client IP of an anonymous request, or an
    /// account's name (see [`account`](Self::account)); empty for stage
    /// limits. Hash it before it names anything.
    pub fn subject(&self) -> &'a [u8] {
        self.subject
    }

    /// Requests (units) per second.
    pub fn rate(&self) -> f64 {
        1e9 / self.limit.gcra.interval() as f64
    }

    /// The bucket size in units.
    pub fn burst(&self) -> u32 {
        self.limit.gcra.burst()
    }

    /// Time one unit takes to refill (the GCRA emission interval).
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.limit.gcra.interval())
    }

    /// Whether the limit only observes (a shadow plan's): it is charged when
    /// it has room and never denies.
    pub fn is_shadow(&self) -> bool {
        self.shadow
    }
}

impl fmt::Debug for ThrottleRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThrottleRef")
            .field("name", &self.name())
            .field("plan", &self.plan)
            .field("account", &self.account)
            .field("rate", &self.rate())
            .field("burst", &self.burst())
            .field("shadow", &self.shadow)
            .finish_non_exhaustive()
    }
}

/// The quota of a request, and whose count it is.
#[derive(Clone, Copy)]
pub struct QuotaRef<'a> {
    pub(crate) kind: LimitKind,
    pub(crate) spec: &'a QuotaSpec,
    pub(crate) plan: &'a str,
    /// The account whose quota this is (then `plan` is empty).
    pub(crate) account: Option<&'a str>,
    pub(crate) subject: &'a [u8],
    /// Where the memory store keeps the counters (a per-process keyed hash
    /// of the subject).
    pub(crate) digest: Digest,
    pub(crate) shadow: bool,
    pub(crate) history_days: u32,
}

impl<'a> QuotaRef<'a> {
    /// What kind of quota it is (a request quota, a token budget's daily
    /// or monthly one).
    pub fn kind(&self) -> LimitKind {
        self.kind
    }

    /// The quota's name in headers: `"quota"`, `"tokens-day"`,
    /// `"tokens-month"`, an account's `"account-quota"`,
    /// `"account-tokens-day"` or `"account-tokens-month"`, or a model's
    /// `"model-quota"`, `"model-tokens-day"` or `"model-tokens-month"`.
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// Whether the quota counts tokens (a token budget's daily or monthly
    /// quota): it is charged [`Acquire::tokens`], not [`Acquire::cost`].
    #[inline]
    pub fn counts_tokens(&self) -> bool {
        self.kind.counts_tokens()
    }

    /// Requests (units) per window.
    pub fn limit(&self) -> u64 {
        self.spec.limit
    }

    /// The window.
    pub fn period(&self) -> Period {
        self.spec.period
    }

    /// A stable id of the quota within its plan (the same in every
    /// process): a model's quotas differ from the plan's and from every
    /// other model's by it, and must be counted apart by it.
    pub fn id(&self) -> u64 {
        self.spec.salt
    }

    /// Units deducted from the limit in the window holding
    /// [`created_at`](Self::created_at) (AWS `offset`).
    pub fn offset(&self) -> u64 {
        self.spec.offset
    }

    /// When the plan was created, in nanoseconds since the Unix epoch (UTC).
    pub fn created_at(&self) -> i64 {
        self.spec.created_at
    }

    /// The plan; empty for an account's quota.
    pub fn plan(&self) -> &'a str {
        self.plan
    }

    /// The account whose quota this is, shared by all the account's keys.
    pub fn account(&self) -> Option<&'a str> {
        self.account
    }

    /// The registered key's public id, or the account's name.
    pub fn subject(&self) -> &'a [u8] {
        self.subject
    }

    /// Whether the quota only observes (counts past its limit, never denies).
    pub fn is_shadow(&self) -> bool {
        self.shadow
    }

    /// Days of daily usage to keep for reports.
    pub fn history_days(&self) -> u32 {
        self.history_days
    }
}

impl fmt::Debug for QuotaRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaRef")
            .field("name", &self.name())
            .field("plan", &self.plan)
            .field("account", &self.account)
            .field("limit", &self.limit())
            .field("period", &self.period())
            .field("shadow", &self.shadow)
            .finish_non_exhaustive()
    }
}

/// A cap on requests of one key in flight: its plan's, or a model's within
/// the plan.
#[derive(Clone, Copy)]
pub struct ConcurrencyRef<'a> {
    /// [`LimitKind::Concurrency`] or [`LimitKind::ModelConcurrency`].
    pub(crate) kind: LimitKind,
    pub(crate) limit: u32,
    pub(crate) salt: u64,
    pub(crate) plan: &'a str,
    pub(crate) subject: &'a [u8],
    pub(crate) digest: Digest,
    pub(crate) shadow: bool,
}

impl<'a> ConcurrencyRef<'a> {
    /// Whether it is the plan's cap or a model's.
    pub fn kind(&self) -> LimitKind {
        self.kind
    }

    /// A stable id of the cap within its plan (the same in every process):
    /// a model's cap differs from the plan's and every other model's by it,
    /// and must be counted apart by it.
    pub fn id(&self) -> u64 {
        self.salt
    }

    /// Requests in flight allowed at once.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The plan.
    pub fn plan(&self) -> &'a str {
        self.plan
    }

    /// Whose requests they are (see [`ThrottleRef::subject`]).
    pub fn subject(&self) -> &'a [u8] {
        self.subject
    }

    /// Whether the cap only observes (a shadow plan's).
    pub fn is_shadow(&self) -> bool {
        self.shadow
    }

    /// How the cap stands with `in_flight` requests (this one included when
    /// it was let in).
    pub fn applied(&self, in_flight: u64) -> Applied {
        Applied {
            kind: self.kind,
            quota: u64::from(self.limit),
            window_secs: 0,
            remaining: u64::from(self.limit).saturating_sub(in_flight),
            reset: 0,
        }
    }
}

impl fmt::Debug for ConcurrencyRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyRef")
            .field("name", &self.kind.name())
            .field("plan", &self.plan)
            .field("limit", &self.limit)
            .field("shadow", &self.shadow)
            .finish_non_exhaustive()
    }
}

/// A place a request holds under a concurrency cap, until its response ends.
/// What it holds is the store's business: numbers that name the place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Permit {
    pub(crate) place: u128,
    pub(crate) id: u64,
    pub(crate) cap: u64,
}

impl Permit {
    /// A permit for `place` (the store's name for the cap's state) and `id`
    /// (which of the requests in flight this is).
    pub fn new(place: u128, id: u64) -> Self {
        Permit { place, id, cap: 0 }
    }

    /// The same permit, under the cap `cap` of its place (a store that
    /// keeps several caps of one subject apart, such as a model's beside
    /// its plan's, names which; [`ConcurrencyRef::id`]).
    #[must_use]
    pub fn with_cap(mut self, cap: u64) -> Self {
        self.cap = cap;
        self
    }

    /// The place.
    pub fn place(&self) -> u128 {
        self.place
    }

    /// The request's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Which cap of the place (0 unless set with [`with_cap`](Self::with_cap)).
    pub fn cap(&self) -> u64 {
        self.cap
    }
}

/// The actual cost of a request that reserved tokens, to be settled against
/// its token limits (see [`Store::settle`](super::Store::settle)).
#[derive(Clone, Copy)]
pub struct Settlement<'a> {
    pub(crate) throttle: Option<ThrottleRef<'a>>,
    pub(crate) quotas: [Option<QuotaRef<'a>>; 2],
    /// The tokens the request reserved: what the decision charged the
    /// per-minute bucket, which with `reserved.until` tells when it did
    /// (see [`reserved_at`](Self::reserved_at)).
    pub(crate) estimate: u32,
    pub(crate) delta: i64,
    /// Where the reservation was charged: an over-estimate gives back
    /// nothing to a limit it did not charge.
    pub(crate) reserved: Reservation,
}

impl<'a> Settlement<'a> {
    /// The per-minute token bucket, when the plan has one.
    pub fn throttle(&self) -> Option<&ThrottleRef<'a>> {
        self.throttle.as_ref()
    }

    /// The daily and monthly token quotas the plan has.
    pub fn quotas(&self) -> impl Iterator<Item = &QuotaRef<'a>> + '_ {
        self.quotas.iter().flatten()
    }

    /// Tokens to charge (the request used more than it reserved) or, when
    /// negative, to give back (it used fewer).
    pub fn delta(&self) -> i64 {
        self.delta
    }

    /// When the decision charged the per-minute bucket, on the store's time
    /// line (the memory store's monotonic nanoseconds, Redis time in
    /// nanoseconds since the epoch): `reserved.until` less the estimate's
    /// share, `estimate * interval`, as the decision added it. Derived
    /// rather than carried, so that a decision writes nothing more. A store
    /// gives an over-estimate nothing back when the bucket was reset after
    /// this (see `Admin::reset_key`). `None` without a bucket or a
    /// reservation in it.
    pub(crate) fn reserved_at(&self) -> Option<Nanos> {
        let gcra = self.throttle.as_ref()?.limit.gcra;
        let span = u64::from(self.estimate).checked_mul(gcra.interval())?;
        self.reserved.until?.checked_sub(span)
    }
}

impl fmt::Debug for Settlement<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settlement")
            .field("throttle", &self.throttle)
            .field("quotas", &self.quotas().collect::<Vec<_>>())
            .field("estimate", &self.estimate)
            .field("delta", &self.delta)
            .finish()
    }
}
