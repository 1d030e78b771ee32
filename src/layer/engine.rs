//! The engine every clone of a layer shares: from a request's key to its
//! plan, to the limits that apply, to one decision by the store.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use crate::body::Unsettled;
use crate::cost::{CostEstimator, Estimate, TokenUsage};
use crate::extract::{KeyError, KeyExtractor, RequestView};
use crate::hash;
use crate::headers::HeaderStyle;
use crate::keys::{Key, KeyEntry};
use crate::observe::{Seen, SharedObserver, Watch};
use crate::plan::{AccountLimits, FailureMode, ModelEntry, Plan, StageLimits, method_limit};
use crate::policy::{Policy, Snapshot};
use crate::resolver::{
    Answer, Found, Lookup, Registered, ResolveError, ResolverFallback, Resolving,
};
use crate::response::{
    Decision, Reason, Rejection, ResponseStyle, SharedOnRejection, is_grpc, refused,
};
use crate::store::Failures;
use crate::store::{
    Acquire, Acquired, Denied, MemoryStore, Overruns, Report, Store, Subject, ThrottleRef,
};

/// Days of usage history the quotas of a subject nobody registered keep (a
/// per-key policy's key, a client IP, a key a resolver answered whose id is
/// not registered): none but the current day's, so that a store can bound
/// their counters (the memory store forgets one once its window has ended).
/// Usage reports are of registered keys.
const TRANSIENT_HISTORY_DAYS: u32 = 1;

/// A key refused for a request is told to observers (the `TOLD` parameter
/// of the key lookups).
const TOLD: bool = true;
/// A key refused for a peek (a decision of cost 0 without a request: a
/// standing, `check` or `decide` of cost 0) is not: a peek decides nothing.
/// A parameter known when compiled, so a request's path reads no flag.
pub(crate) const PEEK: bool = false;

/// What every clone of a layer and its services share.
pub(crate) struct Shared<K, S> {
    pub(crate) extractor: K,
    pub(crate) policy: Policy,
    /// The one plan of a [`Policy::per_key`] policy, which never changes:
    /// deciding under it needs no policy snapshot.
    pub(crate) fixed: Option<Arc<Plan>>,
    pub(crate) store: S,
    pub(crate) headers: HeaderStyle,
    pub(crate) on_rejection: Option<SharedOnRejection>,
    pub(crate) quota_status: StatusCode,
    /// How rejections are answered.
    pub(crate) style: ResponseStyle,
    /// The longest retry worth waiting for.
    pub(crate) max_retry: std::time::Duration,
    /// Estimates the tokens of requests under plans with a token budget.
    pub(crate) estimator: Box<dyn CostEstimator>,
    /// Whether [`CostEstimator::checks_body`] is asked: only when an
    /// estimator was given. The default never checks a body, and a request
    /// under a plan that needs no estimate then asks nothing of it.
    pub(crate) body_checks: bool,
    /// How much of a body, and for how long, an estimator may read.
    pub(crate) body_limits: BodyLimits,
    /// The bytes the bodies being read may still take, of
    /// [`BodyLimits::max_held`] in all and of each caller's share; shared
    /// by every clone of the layer.
    pub(crate) body_memory: Arc<super::read::BodyMemory>,
    pub(crate) failures: Failures,
    pub(crate) observer: Option<SharedObserver>,
    /// Asked for key values the policy does not hold.
    pub(crate) resolver: Option<Arc<Resolving>>,
    /// Names the model a request is for, when a plan has model limits.
    pub(crate) model: Option<ModelOf>,
}

/// What names the model a request is for
/// ([`RateLimitLayerBuilder::model`](crate::RateLimitLayerBuilder::model)).
pub(crate) type ModelOf = Box<dyn for<'a> Fn(&RequestView<'a>) -> Option<&'a str> + Send + Sync>;

pub(crate) type SharedState<K, S> = Arc<Shared<K, S>>;

/// Where a decision stands after the synchronous part of a request.
///
/// Three words with the memory store: an allowed request's step is moved
/// through several frames on every request, so what is large and rare in
/// it (a refusal, an observer's watch) is boxed; an allowed request's step
/// holds nothing to allocate.
// A store's own future (`F`) may be large: it is the pending answer.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Step<F> {
    /// Decided; an allowed request's report is where the caller asked for it.
    Done(Decision<()>),
    /// The store answers later; `FailureMode` says what a failure means, and
    /// the `Watch` (only with an observer) whom the decision is about.
    Wait(F, FailureMode, Option<Box<Watch>>),
    /// The key is not registered, nor in the resolver's cache: the resolver
    /// answers later, and the request is decided then
    /// ([`Shared::decide_resolved`]).
    Resolve(Lookup),
    /// The estimator needs the request's body, whose key is good: nothing
    /// is decided yet. The request is decided again once the body is read
    /// and its [`Estimate`] is in the request's extensions. The number is
    /// the caller's (the low half of its state digest): its bodies being
    /// read hold at most its share of the memory for bodies. (The half
    /// keeps the step three words; two callers whose halves collide, about
    /// 1 in 2^64 a pair, share one share.)
    Read(u64),
}

/// How much of a request's body, and for how long, an estimator may read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimits {
    pub(crate) max_bytes: usize,
    pub(crate) timeout: Duration,
    /// The most bytes the bodies being read hold together.
    pub(crate) max_held: usize,
    /// The most bytes one caller's bodies being read hold together (`None`:
    /// see [`per_caller`](Self::per_caller)).
    pub(crate) max_held_per_caller: Option<usize>,
}

impl BodyLimits {
    /// The most bytes one caller's bodies being read hold together: as set,
    /// or a sixteenth of [`max_held`](Self::max_held) but at least one
    /// whole body, and never more than `max_held`.
    pub(crate) fn per_caller(&self) -> usize {
        self.max_held_per_caller
            .unwrap_or((self.max_held / 16).max(self.max_bytes))
            .min(self.max_held)
    }
}

impl Default for BodyLimits {
    fn default() -> Self {
        BodyLimits {
            max_bytes: 1 << 20,
            timeout: Duration::from_secs(10),
            max_held: 64 << 20,
            max_held_per_caller: None,
        }
    }
}

/// Why a key led to no caller yet: it was refused, or the resolver must be
/// asked.
pub(crate) enum Miss {
    Refused(Rejection),
    Lookup(Lookup),
}

impl From<Rejection> for Miss {
    fn from(rejection: Rejection) -> Self {
        Miss::Refused(rejection)
    }
}

impl<F> Step<F> {
    /// The step of a key found, refused, or to be looked up.
    #[inline]
    fn of(result: Result<Step<F>, Miss>) -> Self {
        match result {
            Ok(step) => step,
            Err(Miss::Refused(rejection)) => Step::Done(Err(refused(rejection, None))),
            Err(Miss::Lookup(lookup)) => Step::Resolve(lookup),
        }
    }
}

/// Who is calling, once the key is known: the stage limits over everybody,
/// the plan (shared, for a settlement that outlives the request), the
/// subject whose state counts, and a registered key's public id.
struct Caller<'a> {
    stage: Option<&'a StageLimits>,
    /// The account of a registered key that belongs to one.
    account: Option<&'a Arc<AccountLimits>>,
    plan: &'a Arc<Plan>,
    subject: Subject<'a>,
    id: Option<&'a str>,
}

/// Where a decision puts the tokens an allowed request reserved, when the
/// caller will settle them (a request through the layer).
type Reserve<'r> = Option<&'r mut Option<Box<Unsettled>>>;

impl<'a> Caller<'a> {
    /// A key or client IP limited under `plan`, without a registered id.
    #[inline]
    fn unregistered(stage: Option<&'a StageLimits>, plan: &'a Arc<Plan>, key: &'a [u8]) -> Self {
        Caller {
            stage,
            account: None,
            plan,
            subject: Subject {
                plan,
                name: key,
                digest: hash::state_digest(key),
                history_days: TRANSIENT_HISTORY_DAYS,
            },
            id: None,
        }
    }

    /// Whom the observer is told a decision is about, and which of the
    /// plan's model entries applied.
    #[inline]
    fn seen<'r>(&self, req: Option<&RequestView<'r>>, model: Option<&'a ModelEntry>) -> Seen<'r>
    where
        'a: 'r,
    {
        Seen {
            plan: Some(self.plan),
            key_id: self.id,
            req: req.copied(),
            model: model.map(|m| &*m.name),
        }
    }

    /// The plan's throttle of a caller whose plan has, besides it, only a
    /// request quota and method overrides ([`Plan::clear_throttle`]), when
    /// no stage or account limits the API. Such a request is decided without
    /// gathering its limits: by the throttle alone when no quota and no
    /// override applies (the common plan), else when they all allow it, the
    /// throttle, the override its route matches and the quota, in the order
    /// [`Acquire::gather`] gives them.
    #[inline]
    fn clear(&self) -> Option<ThrottleRef<'a>> {
        if self.stage.is_some() || self.account.is_some() {
            return None;
        }
        Some(self.subject.throttle(self.plan.clear_throttle()?))
    }

    /// The method override `req`'s route matches, if any (none without a
    /// request).
    #[inline]
    fn method(&self, req: Option<&RequestView<'_>>) -> Option<ThrottleRef<'a>> {
        method_limit(&self.plan.methods, req).map(|l| self.subject.throttle(l))
    }
}

impl<K: KeyExtractor, S: Store> Shared<K, S> {
    /// Decides one request: key, plan, then every limit that applies at once.
    /// Rejections leave `grpc` unset: the caller sets it, so that allowed
    /// requests never pay for the content-type check. The tokens a request
    /// reserves go to `reserve`, to be settled when its response ends.
    #[inline]
    pub(crate) fn decide(
        &self,
        req: &RequestView<'_>,
        reserve: &mut Option<Box<Unsettled>>,
        report: &mut Report,
    ) -> Step<S::Future> {
        // The closure holds one pointer, which goes in a register: with its
        // four captures it was copied through the stack on its way into the
        // registry's lookup, a store-forwarding stall on every request.
        let mut deciding = Deciding {
            shared: self,
            req,
            reserve,
            report,
        };
        let mut decide = |c: &Caller<'_>| deciding.decide(c);
        // The key is read where the extractor wrote it (`ref`): moved out,
        // it was copied in wider pieces than it was written, which stalls.
        let result = if let Some(plan) = &self.fixed {
            match self.extractor.extract(req) {
                Ok(ref key) => Ok(decide(&Caller::unregistered(None, plan, key.as_bytes()))),
                Err(e) => Err(self.refuse(Reason::Key(e), Seen::request(req)).into()),
            }
        } else {
            match self.extractor.extract(req) {
                // A registered key is decided from its entry alone.
                Ok(ref key) => self.registered::<TOLD, _>(key.as_bytes(), Some(req), true, decide),
                Err(KeyError::Missing) => match &self.policy.load().anonymous {
                    Some(anon) => match anon.client_ip.extract(req) {
                        Ok(ip) => {
                            let stage = self.policy.inner.stage.as_deref();
                            Ok(decide(&Caller::unregistered(
                                stage,
                                &anon.plan,
                                ip.as_bytes(),
                            )))
                        }
                        Err(e) => Err(self.refuse(Reason::Key(e), Seen::request(req)).into()),
                    },
                    None => Err(self
                        .refuse(Reason::Key(KeyError::Missing), Seen::request(req))
                        .into()),
                },
                Err(e) => Err(self.refuse(Reason::Key(e), Seen::request(req)).into()),
            }
        };
        Step::of(result)
    }
}

/// What a peek is asked and tells besides its report: the model whose
/// limits it reads, the plan and model entry it read them under, and how
/// the method overrides of the caller's stage and plan stand.
pub(crate) struct Peek<'m, F> {
    /// The model a request would be for (`None`: one the plan does not
    /// name, whose limits are the plan's `"*"` entry).
    pub(crate) model: Option<&'m str>,
    /// The caller's plan.
    pub(crate) plan: Option<Arc<str>>,
    /// The plan's model entry whose limits apply, as the plan names it.
    pub(crate) entry: Option<Arc<str>>,
    /// Each method override of the caller's stage, then of its plan, peeked
    /// at alone (a peek has no route: none is among its limits).
    pub(crate) methods: Vec<MethodPeek<F>>,
}

impl<F> Default for Peek<'_, F> {
    fn default() -> Self {
        Peek {
            model: None,
            plan: None,
            entry: None,
            methods: Vec::new(),
        }
    }
}

impl<F> Peek<'_, F> {
    /// What the peek found (the plan, the model entry, the method
    /// overrides), without the model it was asked for.
    pub(crate) fn found(self) -> Peek<'static, F> {
        Peek {
            model: None,
            plan: self.plan,
            entry: self.entry,
            methods: self.methods,
        }
    }
}

/// A method override peeked at: its methodPath as configured, and the
/// store's answer, now or to come.
pub(crate) struct MethodPeek<F> {
    pub(crate) written: Arc<str>,
    pub(crate) failure: FailureMode,
    pub(crate) answer: Acquired<F>,
}

/// What [`Shared::decide`] decides a caller's request with.
struct Deciding<'s, 'r, 'v, K, S> {
    shared: &'s Shared<K, S>,
    req: &'r RequestView<'v>,
    reserve: &'r mut Option<Box<Unsettled>>,
    report: &'r mut Report,
}

impl<K, S: Store> Deciding<'_, '_, '_, K, S> {
    #[inline(always)]
    fn decide(&mut self, c: &Caller<'_>) -> Step<S::Future> {
        let reserve = Some(&mut *self.reserve);
        self.shared
            .acquire(c, Some(self.req), 1, reserve, self.report)
    }
}

impl<K, S: Store> Shared<K, S> {
    /// Decides a request of `cost` units for `key` without a request (no
    /// route, so no method overrides), through any store.
    pub(crate) fn check_any(&self, key: &[u8], cost: u32, report: &mut Report) -> Step<S::Future> {
        let result = match &self.fixed {
            Some(plan) => {
                let caller = Caller::unregistered(None, plan, key);
                Ok(self.acquire(&caller, None, cost, None, report))
            }
            // A peek (cost 0) decides nothing: a key it refuses is not
            // told to observers either.
            None if cost == 0 => self.registered::<PEEK, _>(key, None, true, |c| {
                self.acquire(c, None, cost, None, report)
            }),
            None => self.registered::<TOLD, _>(key, None, true, |c| {
                self.acquire(c, None, cost, None, report)
            }),
        };
        Step::of(result)
    }

    /// [`check_any`](Self::check_any) at cost 0 (a peek: nothing is
    /// charged), which also tells the caller's plan.
    pub(crate) fn peek_any(
        &self,
        key: &[u8],
        report: &mut Report,
        peek: &mut Peek<'_, S::Future>,
    ) -> Step<S::Future> {
        let result = match &self.fixed {
            Some(p) => {
                let caller = Caller::unregistered(None, p, key);
                Ok(self.peek(&caller, report, peek))
            }
            None => self.registered::<PEEK, _>(key, None, true, |c| self.peek(c, report, peek)),
        };
        Step::of(result)
    }

    /// Peeks at `c`'s limits for [`peek`](Peek)'s model, and tells it the
    /// caller's plan and the model entry that applies.
    fn peek(
        &self,
        c: &Caller<'_>,
        report: &mut Report,
        peek: &mut Peek<'_, S::Future>,
    ) -> Step<S::Future> {
        peek.plan = Some(c.plan.name.clone());
        peek.entry = c.plan.model(peek.model).map(|e| Arc::clone(&e.name));
        self.peek_methods(c, &mut peek.methods);
        self.acquire_for(c, None, peek.model, 0, None, report)
    }

    /// Peeks at each method override of `c`'s stage and plan alone, at cost
    /// 0, as the requests its routes match are counted (the stage's shared
    /// by every caller, the plan's per caller): the answers go to
    /// `methods`, to be read after the peek's own. Apart, because the
    /// overrides of one plan are many (a request meets one) and one that
    /// refused a peek (a bucket in debt) would hide how the others stand.
    fn peek_methods(&self, c: &Caller<'_>, methods: &mut Vec<MethodPeek<S::Future>>) {
        let stage = c.stage.map_or(&[][..], |s| &s.methods[..]);
        let stage = stage.iter().map(|m| (m, ThrottleRef::stage(&m.limit)));
        let plan = c.plan.methods.iter();
        let plan = plan.map(|m| (m, c.subject.throttle(&m.limit)));
        for (m, throttle) in stage.chain(plan) {
            let answer = Acquire::lone(throttle, 0, c.plan, |a| {
                let mut report = Report::default();
                match self.store.decide_now(a, &mut report) {
                    Some(verdict) => Acquired::Ready(Ok(verdict.map(|()| report))),
                    None => self.store.acquire(a),
                }
            });
            methods.push(MethodPeek {
                written: Arc::clone(&m.written),
                failure: c.plan.failure,
                answer,
            });
        }
    }

    /// [`peek_any`](Self::peek_any) for a request whose key the extractor
    /// could not take (`error`): a request without one is limited by its
    /// client's address under the policy's anonymous plan, as
    /// [`decide`](Self::decide) limits it, when the policy has one; any
    /// other is refused as the layer refuses it.
    pub(crate) fn peek_keyless(
        &self,
        req: &RequestView<'_>,
        error: KeyError,
        report: &mut Report,
        peek: &mut Peek<'_, S::Future>,
    ) -> Step<S::Future> {
        let refuse = |e| Step::Done(Err(refused(Rejection::key(Reason::Key(e)), None)));
        let snap = self.policy.load();
        let anon = match (&self.fixed, &snap.anonymous, error) {
            (None, Some(anon), KeyError::Missing) => anon,
            (_, _, error) => return refuse(error),
        };
        match anon.client_ip.extract(req) {
            Ok(ip) => {
                let stage = self.policy.inner.stage.as_deref();
                let caller = Caller::unregistered(stage, &anon.plan, ip.as_bytes());
                self.peek(&caller, report, peek)
            }
            Err(e) => refuse(e),
        }
    }

    /// [`peek_any`](Self::peek_any) for the registered key with this public
    /// id, enabled or not; `None` when no key has it.
    pub(crate) fn peek_id(
        &self,
        id: &str,
        report: &mut Report,
        peek: &mut Peek<'_, S::Future>,
    ) -> Option<Step<S::Future>> {
        self.policy.keys().by_id(id, |entry| {
            let entry = entry?;
            let caller = Caller {
                stage: self.policy.inner.stage.as_deref(),
                account: entry.account.as_ref(),
                plan: &entry.plan,
                subject: Subject {
                    plan: &entry.plan,
                    name: entry.id.as_bytes(),
                    digest: entry.state(),
                    history_days: self.history_days(),
                },
                id: Some(&entry.id),
            };
            Some(self.peek(&caller, report, peek))
        })
    }

    /// [`peek_any`](Self::peek_any) for a key the resolver has answered.
    pub(crate) fn peek_resolved(
        &self,
        answer: &Answer,
        report: &mut Report,
        peek: &mut Peek<'_, S::Future>,
    ) -> Step<S::Future> {
        let decide = |c: &Caller<'_>| self.peek(c, report, peek);
        let result = self.resolved::<PEEK, _>(&self.policy.load(), answer, None, true, decide);
        result.unwrap_or_else(|rejection| Step::Done(Err(refused(rejection, None))))
    }

    /// Decides a request whose key the resolver has answered (after
    /// [`Step::Resolve`]), as [`decide`](Self::decide) does a registered key.
    pub(crate) fn decide_resolved(
        &self,
        answer: &Answer,
        req: &RequestView<'_>,
        reserve: &mut Option<Box<Unsettled>>,
        report: &mut Report,
    ) -> Step<S::Future> {
        let decide = |c: &Caller<'_>| self.acquire(c, Some(req), 1, Some(reserve), report);
        let result = self.resolved::<TOLD, _>(&self.policy.load(), answer, Some(req), true, decide);
        result.unwrap_or_else(|rejection| Step::Done(Err(refused(rejection, None))))
    }

    /// [`check_any`](Self::check_any) for a key the resolver has answered.
    pub(crate) fn check_resolved(
        &self,
        answer: &Answer,
        cost: u32,
        report: &mut Report,
    ) -> Step<S::Future> {
        let decide = |c: &Caller<'_>| self.acquire(c, None, cost, None, report);
        let result = match cost {
            0 => self.resolved::<PEEK, _>(&self.policy.load(), answer, None, true, decide),
            _ => self.resolved::<TOLD, _>(&self.policy.load(), answer, None, true, decide),
        };
        result.unwrap_or_else(|rejection| Step::Done(Err(refused(rejection, None))))
    }

    /// Gathers the caller's limits and asks the store; an allowed request's
    /// report goes to `report`. A store that answers at once
    /// ([`Store::decide_now`]) writes the report in place: through `acquire`
    /// it would be moved (500 bytes) through every frame up to the response
    /// future.
    #[inline]
    fn acquire(
        &self,
        c: &Caller<'_>,
        req: Option<&RequestView<'_>>,
        cost: u32,
        reserve: Reserve<'_>,
        report: &mut Report,
    ) -> Step<S::Future> {
        self.acquire_for(c, req, None, cost, reserve, report)
    }

    /// [`acquire`](Self::acquire) for a request to `model` when no request
    /// names one (a peek at a model's limits); a request's own model, when
    /// it names one, comes first.
    #[inline]
    fn acquire_for(
        &self,
        c: &Caller<'_>,
        req: Option<&RequestView<'_>>,
        model: Option<&str>,
        cost: u32,
        reserve: Reserve<'_>,
        report: &mut Report,
    ) -> Step<S::Future> {
        // A body the estimator checks under every plan is read before
        // anything is decided, so that one it refuses costs nothing.
        if self.body_checks && reserve.is_some() {
            if let Some(req) = req {
                if self.checks_body(req) {
                    return Step::Read(c.subject.digest.0 as u64);
                }
            }
        }
        let failure = c.plan.failure;
        // A plan without model limits looks nothing up.
        let model = match &c.plan.models {
            None => None,
            Some(_) => c.plan.model(self.model_name(req).or(model)),
        };
        let seen = c.seen(req, model);
        // A peek (cost 0 and no request: `standing`, `check(key, 0)`)
        // decides nothing, so observers are not told of it.
        let peek = cost == 0 && req.is_none();
        let now = |verdict| {
            Step::Done(if peek {
                self.conclude(Ok(verdict), failure, false)
            } else {
                self.conclude_seen(Ok(verdict), failure, false, seen)
            })
        };
        let decide = |acquire: &Acquire<'_>, report: &mut Report| {
            if let Some(verdict) = self.store.decide_now(acquire, report) {
                if report.shadow.is_denied() && !peek {
                    return Step::Done(self.conclude_overrun(verdict, failure, report, seen));
                }
                return now(verdict);
            }
            match self.store.acquire(acquire) {
                Acquired::Ready(result) => Step::Done(
                    if peek {
                        self.conclude(result, failure, false)
                    } else {
                        self.conclude_seen(result, failure, false, seen)
                    }
                    .map(|r| *report = r),
                ),
                Acquired::Pending(f) => {
                    let watch = if peek { None } else { self.watch(seen) };
                    Step::Wait(f, failure, watch)
                }
            }
        };
        if let Some(first) = c.clear() {
            let (second, quota) = (c.method(req), c.subject.request_quota());
            if second.is_none() && quota.is_none() {
                // The common plan, a throttle alone. A request through a
                // layer that sends no headers reads nothing of its report
                // (a lone throttle holds no place and reserves no tokens):
                // the store need not write one.
                if reserve.is_some() && !self.headers.sends_any() {
                    if let Some(verdict) = self.store.decide_throttle_unreported(&first, cost) {
                        return now(verdict);
                    }
                }
                if let Some(verdict) = self.store.decide_throttle_now(&first, cost, report) {
                    return now(verdict);
                }
                return Acquire::lone(first, cost, c.plan, |a| decide(a, report));
            }
            // The common full plan, when all its limits allow; without a
            // report when nobody reads it (as for a lone throttle: a clear
            // plan holds no place and reserves no tokens).
            let (second, quota) = (second.as_ref(), quota.as_ref());
            let clear = if reserve.is_some() && !self.headers.sends_any() {
                self.store
                    .decide_clear_unreported(&first, second, quota, cost)
            } else {
                self.store
                    .decide_clear_now(&first, second, quota, cost, report)
            };
            if let Some(verdict) = clear {
                return now(verdict);
            }
        }
        let Some(tokens) = self.reserve(c, req, model, reserve) else {
            return Step::Read(c.subject.digest.0 as u64);
        };
        let account = c.account.map(|a| &**a);
        Acquire::gather(
            c.stage,
            account,
            self.history_days(),
            &c.subject,
            req,
            model,
            cost,
            tokens,
            |a| decide(a, report),
        )
    }

    /// Whether `req`'s body is still to be read and checked by an estimator
    /// that [checks bodies](CostEstimator::checks_body) under every plan:
    /// not once it has been read (its [`Estimate`] is in the extensions, put
    /// there by this layer or an earlier one), nor for a gRPC call.
    #[inline(never)]
    fn checks_body(&self, req: &RequestView<'_>) -> bool {
        self.estimator.checks_body(req)
            && req.extensions.get::<Estimate>().is_none()
            && !is_grpc(req.headers)
    }

    /// The tokens a request under a plan (or of an account) with a token
    /// budget is estimated to cost; a request through the layer (not a
    /// `check`) also gets what it takes to settle them when its response ends.
    /// `None`: the estimator must read the body first.
    #[inline]
    fn reserve(
        &self,
        c: &Caller<'_>,
        req: Option<&RequestView<'_>>,
        model: Option<&ModelEntry>,
        reserve: Reserve<'_>,
    ) -> Option<u32> {
        let model_budget = model.filter(|m| m.tokens.is_some());
        let budget = c.plan.tokens.is_some()
            || c.account.is_some_and(|a| a.tokens.is_some())
            || model_budget.is_some();
        // A plan with limits per model and no function naming the model
        // learns it from the body, when the estimator reads one.
        let body_names_model = c.plan.models.is_some() && self.model.is_none();
        let (Some(req), Some(reserve)) = (req, reserve) else {
            return Some(0);
        };
        if !budget && !body_names_model {
            return Some(0);
        }
        // An estimate read from the body (by this layer, or an earlier one)
        // stands; otherwise the estimator may ask for the body, never a
        // gRPC call's (its messages are not the estimator's to read).
        let estimate = match req.extensions.get::<Estimate>() {
            Some(e) => e.tokens,
            None if self.estimator.reads_body(req) && !is_grpc(req.headers) => return None,
            None => self.estimator.estimate(req),
        };
        if !budget {
            return Some(0);
        }
        *reserve = Some(Box::new(Unsettled {
            plan: Arc::clone(c.plan),
            account: c.account.cloned(),
            model: model_budget.map(|m| Arc::clone(&m.name)),
            subject: c.subject.name.into(),
            digest: c.subject.digest,
            history_days: c.subject.history_days,
            estimate,
            usage: TokenUsage::new(),
            reservation: Default::default(),
        }));
        Some(estimate)
    }
}

impl<K, S> Shared<K, S> {
    /// The model a request is for, as the layer's
    /// [`model`](crate::RateLimitLayerBuilder::model) function names it;
    /// `None` without a request or a function, or when it names none (then
    /// the plan's `"*"` entry applies, if it has one).
    #[inline]
    pub(crate) fn model_name<'r>(&self, req: Option<&RequestView<'r>>) -> Option<&'r str> {
        let req = req?;
        match &self.model {
            Some(name) => name(req),
            // The body's `model`, once the estimator has read it.
            None => req.extensions.get::<Estimate>()?.model.as_deref(),
        }
    }

    /// Days of usage history a registered key's quota keeps.
    #[inline]
    fn history_days(&self) -> u32 {
        self.policy.inner.history_days as u32
    }

    /// Finds a registered `key`'s plan and hands the caller to `decide`;
    /// `req` is the request, when there is one (for the observer of a
    /// refused key). A key not registered is asked of the resolver, if there
    /// is one: from its cache at once, else (when the caller can `wait`)
    /// through a [`Miss::Lookup`]. A per-key policy never gets here: it is
    /// decided through `fixed`.
    #[inline]
    fn registered<const TOLD: bool, T>(
        &self,
        key: &[u8],
        req: Option<&RequestView<'_>>,
        wait: bool,
        decide: impl FnOnce(&Caller<'_>) -> T,
    ) -> Result<T, Miss> {
        let mut decide = Some(decide);
        let registered = self.policy.keys().with(key, |entry| {
            let entry = entry?;
            Some(
                self.entry::<TOLD, T>(entry, true, req, decide.take()?)
                    .map_err(Miss::from),
            )
        });
        match (registered, decide) {
            (Some(result), _) => result,
            (None, Some(decide)) => {
                self.unregistered::<TOLD, T>(hash::digest(key), key, req, wait, decide)
            }
            (None, None) => Err(self
                .refuse_if::<TOLD>(Reason::UnknownKey, Seen::maybe(req))
                .into()),
        }
    }

    /// Hands a registered key's `entry` to `decide`, unless it is disabled
    /// or `enabled` is false (a value the resolver answered disabled, with
    /// the entry's id): that is refused. Always inlined: the registered
    /// key's decision is on every request, and a call here moved its result
    /// through memory (about 24 instructions a request, callgrind).
    #[inline(always)]
    fn entry<const TOLD: bool, T>(
        &self,
        entry: &KeyEntry,
        enabled: bool,
        req: Option<&RequestView<'_>>,
        decide: impl FnOnce(&Caller<'_>) -> T,
    ) -> Result<T, Rejection> {
        let plan = &entry.plan;
        if !(entry.enabled && enabled) {
            let seen = Seen {
                plan: Some(plan),
                key_id: Some(&entry.id),
                req: req.copied(),
                model: None,
            };
            return Err(self.refuse_if::<TOLD>(Reason::DisabledKey, seen));
        }
        let caller = Caller {
            stage: self.policy.inner.stage.as_deref(),
            account: entry.account.as_ref(),
            plan,
            subject: Subject {
                plan,
                name: entry.id.as_bytes(),
                digest: entry.state(),
                history_days: self.history_days(),
            },
            id: Some(&entry.id),
        };
        Ok(decide(&caller))
    }

    /// A key the policy does not hold: refused as unknown without a
    /// resolver, decided from the resolver's cache, or to be looked up.
    #[inline(never)]
    fn unregistered<const TOLD: bool, T>(
        &self,
        digest: hash::Digest,
        key: &[u8],
        req: Option<&RequestView<'_>>,
        wait: bool,
        decide: impl FnOnce(&Caller<'_>) -> T,
    ) -> Result<T, Miss> {
        let Some(resolving) = &self.resolver else {
            return Err(self
                .refuse_if::<TOLD>(Reason::UnknownKey, Seen::maybe(req))
                .into());
        };
        match resolving.cached(digest) {
            // Decided as the registered key of its id until that key was
            // removed: the answer is of no registered key now, and is
            // looked up again (a key the resolver alone knows is served
            // for its answer's positive TTL; one removed from the registry
            // is asked of the resolver at once).
            Some(Answer::Found(found)) if self.unregistered_since(&found) => {
                resolving.forget(digest, &found);
            }
            Some(answer) => {
                return Ok(self.resolved::<TOLD, T>(
                    &self.policy.load(),
                    &answer,
                    req,
                    false,
                    decide,
                )?);
            }
            None => {}
        }
        match std::str::from_utf8(key) {
            Ok(value) if wait => Err(Miss::Lookup(resolving.lookup(digest, value))),
            // Without waiting (`check`), a value not cached is unknown.
            Ok(_) => Err(self
                .refuse_if::<TOLD>(Reason::UnknownKey, Seen::maybe(req))
                .into()),
            // The resolver takes text: a value that is not cannot be asked,
            // and is no key it could know. Refused as malformed, which says
            // why, rather than as a key the resolver does not hold.
            Err(_) => Err(self
                .refuse_if::<TOLD>(Reason::Key(KeyError::Malformed), Seen::maybe(req))
                .into()),
        }
    }

    /// Where the registered key with `found`'s id is now, if one has it,
    /// and where it was when last asked: found in the registry's index
    /// (under its lock) when the registry has changed since it was last
    /// asked, else as it was then. The first time for an answer it waits
    /// for the lock; later, a change that holds it (an import) is not
    /// waited for: the answer is decided as it was, and the next request
    /// asks again.
    #[inline]
    fn registered_place(&self, found: &Found) -> (Option<Key>, Option<Key>) {
        let keys = self.policy.keys();
        let seen = **found.registered.load();
        if seen.generation == Some(keys.generation()) {
            return (seen.place, seen.place);
        }
        match keys.place_of(&found.id, seen.generation.is_none()) {
            Some((generation, place)) => {
                found.registered.store(Arc::new(Registered {
                    generation: Some(generation),
                    place,
                }));
                (seen.place, place)
            }
            None => (seen.place, seen.place),
        }
    }

    /// Whether `found`'s id was a registered key's when the answer was last
    /// decided, and is no longer.
    fn unregistered_since(&self, found: &Found) -> bool {
        matches!(self.registered_place(found), (Some(_), None))
    }

    /// Hands a key the resolver answered to `decide`. A key whose id is a
    /// registered key's is that key: decided by the registered entry (its
    /// plan, account, and whether it is enabled, as [`Admin`](crate::Admin)
    /// changed them on any instance), and refused too when the resolver
    /// answered it disabled. Any other is decided by the answer: its plan by
    /// name from `snap`, its state at the digest of its id. An unknown
    /// value, a disabled key, and a failed lookup are refused; a plan name
    /// the policy does not have is a failed lookup (and logged when the
    /// answer is `fresh` from the resolver), unless the key is disabled:
    /// that is refused whatever it names.
    fn resolved<const TOLD: bool, T>(
        &self,
        snap: &Snapshot,
        answer: &Answer,
        req: Option<&RequestView<'_>>,
        fresh: bool,
        decide: impl FnOnce(&Caller<'_>) -> T,
    ) -> Result<T, Rejection> {
        let found = match answer {
            Answer::Found(found) => found,
            Answer::Unknown => {
                return Err(self.refuse_if::<TOLD>(Reason::UnknownKey, Seen::maybe(req)));
            }
            Answer::Failed(e) => return Err(self.unresolved::<TOLD>(e, req)),
        };
        let mut decide = Some(decide);
        if let (_, Some(place)) = self.registered_place(found) {
            let registered = self.policy.keys().at(place, |entry| {
                // Gone (or another key's, the id's removed a moment ago):
                // decided by the answer.
                let entry = entry.filter(|e| *e.id == *found.id)?;
                Some(self.entry::<TOLD, T>(entry, found.key.is_enabled(), req, decide.take()?))
            });
            if let Some(result) = registered {
                return result;
            }
        }
        // Taken only by a registered key that decided.
        let Some(decide) = decide else {
            return Err(self.refuse_if::<TOLD>(Reason::UnknownKey, Seen::maybe(req)));
        };
        let plan = snap.plan_named(found.key.plan());
        if !found.key.is_enabled() {
            let seen = Seen {
                plan: plan.map(|p| &**p),
                key_id: Some(&found.id),
                req: req.copied(),
                model: None,
            };
            return Err(self.refuse_if::<TOLD>(Reason::DisabledKey, seen));
        }
        let Some(plan) = plan else {
            if fresh {
                tracing::warn!(
                    key_id = %found.id,
                    plan = found.key.plan(),
                    "key resolver named a plan the policy does not have"
                );
            }
            return Err(self.unresolved::<TOLD>(&ResolveError::unknown_plan(), req));
        };
        let account = match found.key.get_account() {
            None => None,
            Some(name) => match snap.account_named(name) {
                Some(account) => Some(account),
                None => {
                    if fresh {
                        tracing::warn!(
                            key_id = %found.id,
                            account = name,
                            "key resolver named an account the policy does not have"
                        );
                    }
                    return Err(self.unresolved::<TOLD>(&ResolveError::unknown_plan(), req));
                }
            },
        };
        let caller = Caller {
            stage: self.policy.inner.stage.as_deref(),
            account,
            plan,
            subject: Subject {
                plan,
                name: found.id.as_bytes(),
                digest: found.state,
                history_days: TRANSIENT_HISTORY_DAYS,
            },
            id: Some(&found.id),
        };
        Ok(decide(&caller))
    }

    /// The rejection of a key that could not be resolved: 503, or as the
    /// resolver's fallback says.
    #[cold]
    fn unresolved<const TOLD: bool>(
        &self,
        error: &ResolveError,
        req: Option<&RequestView<'_>>,
    ) -> Rejection {
        tracing::debug!(%error, "key not resolved");
        let fallback = self.resolver.as_ref().map(|r| r.fallback);
        let reason = match fallback.unwrap_or_default() {
            ResolverFallback::UnknownKey => Reason::UnknownKey,
            ResolverFallback::Unavailable => Reason::ResolverUnavailable,
        };
        self.refuse_if::<TOLD>(reason, Seen::maybe(req))
    }
}

impl<K> Shared<K, MemoryStore> {
    /// Decides a request of `cost` units for `key` in the memory store,
    /// without a request and without a report.
    #[inline]
    pub(crate) fn check(&self, key: &[u8], cost: u32) -> Result<(), Rejection> {
        // A registered key's denial is written into `checking`, and read
        // only when there is one: a result of its size, moved back through
        // the registry's lookup, cost a store-forwarding stall on every
        // decision. The closure holds one pointer, which goes in a
        // register: with three captures it was copied through the stack,
        // a stall of its own.
        if let Some(plan) = &self.fixed {
            let caller = Caller::unregistered(None, plan, key);
            let mut denied = None;
            self.check_caller(&caller, cost, &mut denied);
            return match denied {
                None => Ok(()),
                Some(d) => Err(self.check_denied(d)),
            };
        }
        let mut checking = Checking {
            shared: self,
            cost,
            denied: None,
        };
        let decide = |c: &Caller<'_>| checking.decide(c);
        let registered = match cost {
            // A peek decides nothing: a key it refuses is not told to
            // observers either.
            0 => self.registered::<PEEK, _>(key, None, false, decide),
            _ => self.registered::<TOLD, _>(key, None, false, decide),
        };
        if let Err(miss) = registered {
            return Err(self.missed(miss));
        }
        match checking.denied {
            None => Ok(()),
            Some(d) => Err(self.check_denied(d)),
        }
    }

    /// The rejection of a key `check` could not decide.
    #[cold]
    #[inline(never)]
    fn missed(&self, miss: Miss) -> Rejection {
        self.styled(match miss {
            Miss::Refused(rejection) => rejection,
            // Never asked for without waiting.
            Miss::Lookup(_) => Rejection::key(Reason::UnknownKey),
        })
    }

    /// The rejection of a request `check` denied.
    #[cold]
    #[inline(never)]
    fn check_denied(&self, d: Denied) -> Rejection {
        self.styled(Rejection::denied(d.denial, &d.limit, self.quota_status))
    }

    /// Decides `cost` units for a caller, without a request: a denial is
    /// written into `denied`. Each arm handles its own result: merged into
    /// one `Result<(), Denied>`, the allowed path also moved the denial's
    /// room (48 bytes) on every decision.
    #[inline(always)]
    fn check_caller(&self, c: &Caller<'_>, cost: u32, denied: &mut Option<Denied>) {
        // Without a request no override applies.
        if let Some(first) = c.clear() {
            let Some(quota) = c.subject.request_quota() else {
                // The common plan, a throttle alone.
                return match self.store.decide_throttle(&first, cost, &mut ()) {
                    Ok(()) => self.check_allowed(c, cost),
                    Err(d) => self.check_refused(c, cost, d, denied),
                };
            };
            // The common full plan, when both its limits allow.
            if self
                .store
                .decide_clear_of(&first, None, Some(&quota), cost, &mut ())
            {
                return self.check_allowed(c, cost);
            }
        }
        if c.plan.shadow && cost > 0 && self.observer.is_some() {
            return self.check_shadow(c, cost, denied);
        }
        let account = c.account.map(|a| &**a);
        let model = c.plan.model(None);
        let history = self.history_days();
        let result = Acquire::gather(
            c.stage,
            account,
            history,
            &c.subject,
            None,
            model,
            cost,
            0,
            |a| self.store.decide::<()>(a, &mut ()),
        );
        match result {
            Ok(()) => self.check_allowed(c, cost),
            Err(d) => self.check_refused(c, cost, d, denied),
        }
    }

    /// [`check_caller`](Self::check_caller) under a shadow plan, with an
    /// observer: it is told when the request went over a shadow limit.
    #[cold]
    #[inline(never)]
    fn check_shadow(&self, c: &Caller<'_>, cost: u32, denied: &mut Option<Denied>) {
        let mut overruns = Overruns::default();
        let result = Acquire::gather(
            c.stage,
            c.account.map(|a| &**a),
            self.history_days(),
            &c.subject,
            None,
            c.plan.model(None),
            cost,
            0,
            |a| self.store.decide(a, &mut overruns),
        );
        match (result, overruns.0.verdict()) {
            (Ok(()), Some(over)) => {
                let seen = c.seen(None, c.plan.model(None));
                self.checked_overrun(over, seen);
            }
            (Ok(()), None) => self.check_allowed(c, cost),
            (Err(d), _) => self.check_refused(c, cost, d, denied),
        }
    }

    /// The observer, if any, sees an allowed `check` (a peek decides
    /// nothing: observers are not told of it).
    #[inline(always)]
    fn check_allowed(&self, c: &Caller<'_>, cost: u32) {
        if cost > 0 && self.observer.is_some() {
            self.checked(&Ok(()), c.seen(None, c.plan.model(None)));
        }
    }

    /// A `check` denied: the observer, if any, sees it, and the denial goes
    /// to `denied`.
    #[cold]
    #[inline(never)]
    fn check_refused(&self, c: &Caller<'_>, cost: u32, d: Denied, denied: &mut Option<Denied>) {
        let result = Err(d);
        if cost > 0 {
            self.checked(&result, c.seen(None, c.plan.model(None)));
        }
        *denied = result.err();
    }
}

/// What [`Shared::check`] decides a caller with, and where a denial goes.
struct Checking<'a, K> {
    shared: &'a Shared<K, MemoryStore>,
    cost: u32,
    denied: Option<Denied>,
}

impl<K> Checking<'_, K> {
    #[inline(always)]
    fn decide(&mut self, c: &Caller<'_>) {
        self.shared.check_caller(c, self.cost, &mut self.denied);
    }
}

#[cfg(test)]
mod tests {
    use super::Step;
    use crate::store::{MemoryStore, Store};

    /// Every allowed request's step is moved through several frames; kept
    /// to three words, it is moved in registers or in pieces the size it
    /// was written in. A refusal or an observer's watch added to it unboxed
    /// would bring back the copy that stalled each request.
    #[test]
    fn a_step_is_three_words() {
        assert!(std::mem::size_of::<Step<<MemoryStore as Store>::Future>>() <= 24);
    }
}
