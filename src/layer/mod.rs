//! The tower layer, service and future.

mod future;
#[allow(clippy::module_inception)]
mod layer;
mod service;

pub use self::future::ResponseFuture;
pub use self::layer::{RateLimitLayer, RateLimitLayerBuilder};
pub use self::service::RateLimit;

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use http::{Response, StatusCode};

use crate::body::Reservation;
use crate::cost::{CostEstimator, TokenUsage};
use crate::extract::{KeyError, KeyExtractor, RequestView};
use crate::hash::{self, Digest};
use crate::headers::HeaderStyle;
use crate::observe::{Seen, SharedObserver, Watch};
use crate::plan::{FailureMode, Limit, LimitKind, MethodLimit, Plan, StageLimits, match_method};
use crate::policy::{Policy, Snapshot, TokenCells};
use crate::quota::QuotaCell;
use crate::response::{Reason, Rejection, SharedOnRejection};
use crate::store::{
    Acquire, Acquired, Applied, ConcurrencyRef, Denied, MemoryStore, QuotaRef, Report, Store,
    StoreError, ThrottleRef,
};

/// Stage limits are one state for every caller.
const STAGE_KEY: Digest = Digest(0);

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
    /// Estimates the tokens of requests under plans with a token budget.
    pub(crate) estimator: Box<dyn CostEstimator>,
    pub(crate) failures: Failures,
    pub(crate) observer: Option<SharedObserver>,
}

/// A decision's result: the report of the limits, or a rejection and how the
/// limit that rejected stands.
pub(crate) type Decision<R = Report> = Result<R, (Rejection, Option<Applied>)>;

/// What an allowed decision carries when a failed store let the request
/// through unchecked.
pub(crate) trait Unchecked {
    fn unchecked() -> Self;
}

impl Unchecked for Report {
    fn unchecked() -> Self {
        Report::unchecked()
    }
}

impl Unchecked for () {
    fn unchecked() -> Self {}
}

/// Where a decision stands after the synchronous part of a request.
// The decided variant is the memory store's hot path: boxing it would allocate.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Step<F> {
    /// Decided; an allowed request's report is where the caller asked for it.
    Done(Decision<()>),
    /// The store answers later; `FailureMode` says what a failure means, and
    /// the `Watch` (only with an observer) whom the decision is about.
    Wait(F, FailureMode, Option<Watch>),
}

/// Store failures: counted, and logged once per burst (when the store starts
/// failing, and when it has answered [`RECOVERY_STREAK`] times in a row
/// again), never once per request, and without flapping when a store fails
/// only in part (a cluster node down).
#[derive(Debug, Default)]
pub(crate) struct Failures {
    count: AtomicU64,
    failing: AtomicBool,
    /// Answers in a row since the last failure.
    streak: AtomicU64,
    /// `count` when the current burst began.
    burst_start: AtomicU64,
}

/// Answers in a row from the store that end a burst of failures.
const RECOVERY_STREAK: u64 = 3;

impl Failures {
    #[cold]
    fn failed(&self, e: &StoreError) {
        let before = self.count.fetch_add(1, Ordering::Relaxed);
        self.streak.store(0, Ordering::Relaxed);
        if !self.failing.swap(true, Ordering::AcqRel) {
            self.burst_start.store(before, Ordering::Relaxed);
            tracing::warn!(
                error = %e,
                "rate-limit store failing: each plan's failure mode applies until it recovers"
            );
        }
    }

    /// The store answered (a round trip, not a local answer).
    #[inline]
    fn answered(&self) {
        if self.failing.load(Ordering::Relaxed)
            && self.streak.fetch_add(1, Ordering::Relaxed) + 1 >= RECOVERY_STREAK
            && self.failing.swap(false, Ordering::AcqRel)
        {
            let failures =
                self.count.load(Ordering::Relaxed) - self.burst_start.load(Ordering::Relaxed);
            tracing::info!(failures, "rate-limit store recovered");
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Whose limits a request is decided against, once its key is known.
struct Subject<'a> {
    stage: Option<&'a StageLimits>,
    plan: &'a Arc<Plan>,
    /// What the store names the state by: a registered key's id, else the key.
    name: &'a [u8],
    /// A registered key's public id, for the observer.
    id: Option<&'a Arc<str>>,
    /// Where the memory store keeps the state.
    state: Digest,
    quota: Option<&'a QuotaCell>,
    /// The counters of the daily and monthly token budgets.
    tokens: &'a TokenCells,
}

/// The token counters of a subject that has none.
const NO_TOKEN_CELLS: &TokenCells = &[None, None];

/// Where a decision puts the tokens an allowed request reserved, when the
/// caller will settle them (a request through the layer).
type Reserve<'r> = Option<&'r mut Option<Box<Reservation>>>;

impl<'a> Subject<'a> {
    /// A key of a [`Policy::per_key`] policy: no stage, no quota.
    #[inline]
    fn per_key(plan: &'a Arc<Plan>, key: &'a [u8]) -> Self {
        Subject {
            stage: None,
            plan,
            name: key,
            id: None,
            state: hash::state_digest(key),
            quota: None,
            tokens: NO_TOKEN_CELLS,
        }
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
        reserve: &mut Option<Box<Reservation>>,
        report: &mut Report,
    ) -> Step<S::Future> {
        let mut decide = |s: &Subject<'_>| {
            if let (Some(memory), Some(t)) = (self.memory(), Self::lone(s)) {
                let verdict = memory.decide_throttle(&t, 1, report);
                let seen = Seen {
                    plan: Some(s.plan),
                    key_id: s.id,
                    req: Some(*req),
                };
                return Step::Done(self.settle_seen(Ok(verdict), s.plan.failure, false, seen));
            }
            self.limits(s, Some(req), 1, Some(reserve), |a, seen| {
                self.acquire(a, seen, report)
            })
        };
        let result = if let Some(plan) = &self.fixed {
            match self.extractor.extract(req) {
                Ok(key) => Ok(decide(&Subject::per_key(plan, key.as_bytes()))),
                Err(e) => Err(self.refuse(Reason::Key(e), Seen::request(req))),
            }
        } else {
            let snap = self.policy.load();
            match (self.extractor.extract(req), &snap.anonymous) {
                (Ok(key), _) => self.registered(&snap, key.as_bytes(), Some(req), decide),
                (Err(KeyError::Missing), Some(anon)) => match anon.client_ip.extract(req) {
                    Ok(ip) => Ok(decide(&Subject {
                        stage: snap.stage.as_deref(),
                        plan: &anon.plan,
                        name: ip.as_bytes(),
                        id: None,
                        state: hash::state_digest(ip.as_bytes()),
                        quota: None,
                        tokens: NO_TOKEN_CELLS,
                    })),
                    Err(e) => Err(self.refuse(Reason::Key(e), Seen::request(req))),
                },
                (Err(e), _) => Err(self.refuse(Reason::Key(e), Seen::request(req))),
            }
        };
        result.unwrap_or_else(|rejection| Step::Done(Err((rejection, None))))
    }
}

impl<K, S: Store> Shared<K, S> {
    /// Decides a request of `cost` units for `key` without a request (no
    /// route, so no method overrides), through any store.
    pub(crate) fn check_any(&self, key: &[u8], cost: u32, report: &mut Report) -> Step<S::Future> {
        let result = match &self.fixed {
            Some(plan) => {
                let subject = Subject::per_key(plan, key);
                Ok(self.limits(&subject, None, cost, None, |a, seen| {
                    self.acquire(a, seen, report)
                }))
            }
            None => self.registered(&self.policy.load(), key, None, |s| {
                self.limits(s, None, cost, None, |a, seen| self.acquire(a, seen, report))
            }),
        };
        result.unwrap_or_else(|rejection| Step::Done(Err((rejection, None))))
    }

    /// Asks the store; an allowed request's report goes to `report`.
    #[inline]
    fn acquire(
        &self,
        acquire: &Acquire<'_>,
        seen: Seen<'_>,
        report: &mut Report,
    ) -> Step<S::Future> {
        // The memory store writes the report in place. Through `acquire` it
        // would be moved (500 bytes) through every frame up to the response
        // future.
        if let Some(memory) = self.memory() {
            let verdict = memory.decide(acquire, report);
            return Step::Done(self.settle_seen(Ok(verdict), acquire.failure, false, seen));
        }
        match self.store.acquire(acquire) {
            Acquired::Ready(result) => Step::Done(
                self.settle_seen(result, acquire.failure, false, seen)
                    .map(|r| *report = r),
            ),
            Acquired::Pending(f) => Step::Wait(f, acquire.failure, self.watch(seen)),
        }
    }
}

impl<K, S> Shared<K, S> {
    /// Turns a store's answer into a decision; a failed store lets the
    /// request through (`Open`, without rate-limit headers) or refuses it
    /// with 503 (`Closed`). `waited` tells an answer after a round trip from
    /// one given at once (the memory store, an over-limit cache).
    #[inline]
    pub(crate) fn settle<R: Unchecked>(
        &self,
        result: Result<Result<R, Denied>, StoreError>,
        failure: FailureMode,
        waited: bool,
    ) -> Decision<R> {
        if waited && result.is_ok() {
            self.failures.answered();
        }
        match result {
            Ok(Ok(report)) => Ok(report),
            Ok(Err(d)) => {
                let rejection = Rejection::denied(d.denial, &d.limit, self.quota_status);
                Err((rejection, Some(d.limit)))
            }
            Err(e) => {
                self.failures.failed(&e);
                match failure {
                    FailureMode::Open => Ok(R::unchecked()),
                    FailureMode::Closed => Err((Rejection::unavailable(), None)),
                }
            }
        }
    }

    /// Finds a registered `key`'s plan and hands the key as a subject to
    /// `decide`; `req` is the request, when there is one (for the observer
    /// of a refused key). A per-key policy never gets here: it is decided
    /// through `fixed`.
    #[inline]
    fn registered<T>(
        &self,
        snap: &Snapshot,
        key: &[u8],
        req: Option<&RequestView<'_>>,
        decide: impl FnOnce(&Subject<'_>) -> T,
    ) -> Result<T, Rejection> {
        let Some(entry) = snap.keys.get(&hash::digest(key)) else {
            return Err(self.refuse(Reason::UnknownKey, Seen::maybe(req)));
        };
        if !entry.enabled {
            let seen = Seen {
                plan: Some(&entry.plan),
                key_id: Some(&entry.id),
                req: req.copied(),
            };
            return Err(self.refuse(Reason::DisabledKey, seen));
        }
        let subject = Subject {
            stage: snap.stage.as_deref(),
            plan: &entry.plan,
            name: entry.id.as_bytes(),
            id: Some(&entry.id),
            state: entry.state,
            quota: entry.quota.as_deref(),
            tokens: &entry.tokens,
        };
        Ok(decide(&subject))
    }

    /// The subject's one throttle, when it is all that applies to it: its
    /// plan has nothing else ([`Plan::lone_throttle`]) and no stage limits
    /// the API. Such a request is decided without gathering its limits.
    #[inline]
    fn lone<'s>(s: &'s Subject<'_>) -> Option<ThrottleRef<'s>> {
        if s.stage.is_some() {
            return None;
        }
        Some(ThrottleRef {
            limit: s.plan.lone_throttle()?,
            plan: Some(&s.plan.name),
            subject: s.name,
            digest: s.state,
            shadow: false,
        })
    }

    /// The memory store, when it is this layer's: it is decided in place.
    /// The type test is decided when the layer is compiled.
    #[inline]
    fn memory(&self) -> Option<&MemoryStore>
    where
        S: 'static,
    {
        (&self.store as &dyn Any).downcast_ref::<MemoryStore>()
    }

    /// Gathers every limit that applies (stage, plan, method overrides,
    /// token budget, quota) and hands them to `run`, which decides them in
    /// one step.
    #[inline]
    fn limits<T>(
        &self,
        s: &Subject<'_>,
        req: Option<&RequestView<'_>>,
        cost: u32,
        reserve: Reserve<'_>,
        run: impl FnOnce(&Acquire<'_>, Seen<'_>) -> T,
    ) -> T {
        let plan = s.plan;
        let mut acquire = Acquire::new(cost, plan.failure);
        // Stage limits protect the backend's total capacity: a shadow plan
        // never lifts them.
        if let Some(stage) = s.stage {
            let shared = |limit| ThrottleRef {
                limit,
                plan: None,
                subject: b"",
                digest: STAGE_KEY,
                shadow: false,
            };
            if let Some(l) = &stage.throttle {
                acquire.push(shared(l));
            }
            if let Some(l) = method_limit(&stage.methods, req) {
                acquire.push(shared(l));
            }
        }
        let own = |limit| ThrottleRef {
            limit,
            plan: Some(&plan.name),
            subject: s.name,
            digest: s.state,
            shadow: plan.shadow,
        };
        if let Some(l) = &plan.throttle {
            acquire.push(own(l));
        }
        if let Some(l) = method_limit(&plan.methods, req) {
            acquire.push(own(l));
        }
        acquire.concurrency = plan.concurrency.map(|c| ConcurrencyRef {
            limit: c.limit,
            salt: c.salt,
            plan: &plan.name,
            subject: s.name,
            digest: s.state,
            shadow: plan.shadow,
        });
        let quota = |kind, spec, cell, history_days| QuotaRef {
            kind,
            spec,
            plan: &plan.name,
            subject: s.name,
            cell,
            shadow: plan.shadow,
            history_days,
        };
        let history_days = self.policy.inner.history_days as u32;
        acquire.quota = plan
            .quota
            .as_ref()
            .map(|spec| quota(LimitKind::Quota, spec, s.quota, history_days));
        if let Some(tokens) = &plan.tokens {
            // Only requests (not `check` calls) are estimated and reserve.
            if let (Some(req), Some(reserve)) = (req, reserve) {
                acquire.tokens = self.estimator.estimate(req);
                *reserve = Some(Box::new(Reservation {
                    plan: Arc::clone(plan),
                    subject: s.name.into(),
                    digest: s.state,
                    cells: s.tokens.clone(),
                    estimate: acquire.tokens,
                    usage: TokenUsage::new(),
                    reserved: Default::default(),
                }));
            }
            if let Some(l) = &tokens.minute {
                acquire.push(own(l));
            }
            for (i, q) in tokens.quotas().into_iter().enumerate() {
                acquire.token_quotas[i] =
                    q.map(|(kind, spec)| quota(kind, spec, s.tokens[i].as_deref(), 1));
            }
        }
        let seen = Seen {
            plan: Some(plan),
            key_id: s.id,
            req: req.copied(),
        };
        run(&acquire, seen)
    }
}

impl<K> Shared<K, MemoryStore> {
    /// Decides a request of `cost` units for `key` in the memory store,
    /// without a request and without a report.
    #[inline]
    pub(crate) fn check(&self, key: &[u8], cost: u32) -> Result<(), Rejection> {
        let result = match &self.fixed {
            Some(plan) => self.check_subject(&Subject::per_key(plan, key), cost),
            None => self.registered(&self.policy.load(), key, None, |s| {
                self.check_subject(s, cost)
            })?,
        };
        result.map_err(|d| Rejection::denied(d.denial, &d.limit, self.quota_status))
    }

    /// Decides `cost` units for a subject, without a request.
    #[inline(always)]
    fn check_subject(&self, s: &Subject<'_>, cost: u32) -> Result<(), Denied> {
        match Self::lone(s) {
            // The common plan, a throttle alone, skips gathering limits.
            Some(t) => {
                let result = self.store.decide_throttle(&t, cost, &mut ());
                let seen = Seen {
                    plan: Some(s.plan),
                    key_id: s.id,
                    req: None,
                };
                self.checked(&result, seen);
                result
            }
            None => self.limits(s, None, cost, None, |a, seen| {
                let result = self.store.decide::<()>(a, &mut ());
                self.checked(&result, seen);
                result
            }),
        }
    }
}

impl<K, S> Shared<K, S> {
    /// The response for a rejected request.
    #[cold]
    pub(crate) fn reject(&self, rejection: Rejection, limit: Option<Applied>) -> Response<Bytes> {
        let mut res = match &self.on_rejection {
            Some(f) => f.response(&rejection),
            None => rejection.default_response(),
        };
        let headers = res.headers_mut();
        if let Some(secs) = rejection.retry_after_secs() {
            headers
                .entry(http::header::RETRY_AFTER)
                .or_insert_with(|| http::HeaderValue::from(secs));
        }
        if let Some(limit) = limit {
            let mut report = Report::default();
            report.push(limit);
            self.headers.write(&report, headers);
        }
        res.extensions_mut().insert(rejection);
        res
    }
}

/// The override among `methods` for the request's route and method. The
/// route is looked up only when there are overrides to match.
#[inline]
fn method_limit<'m>(
    methods: &'m [MethodLimit],
    req: Option<&RequestView<'_>>,
) -> Option<&'m Limit> {
    if methods.is_empty() {
        return None;
    }
    let req = req?;
    match_method(methods, route_of(req), req.method)
}

/// The route of a request: axum's `MatchedPath` when present, else the path.
#[inline]
pub(crate) fn route_of<'a>(req: &RequestView<'a>) -> &'a str {
    #[cfg(feature = "axum")]
    if let Some(m) = req.extensions.get::<axum::extract::MatchedPath>() {
        return m.as_str();
    }
    req.uri.path()
}

pub(crate) type SharedState<K, S> = Arc<Shared<K, S>>;
