//! Where the layer meets its observer: what a decision is about, and the
//! calls that turn a decision into a [`DecisionEvent`].
//!
//! Every entry point checks `observer` first: without one, each costs a
//! branch and nothing else (what is about to be reported is a few references
//! that the compiler drops).

use std::sync::Arc;

use super::{DecisionEvent, Observer, Outcome};
use crate::extract::RequestView;
use crate::layer::{Decision, Shared, Unchecked};
use crate::plan::{FailureMode, Plan};
use crate::response::{Reason, Rejection};
use crate::store::{Denied, StoreError, Verdict};

pub(crate) type SharedObserver = Arc<dyn Observer>;

/// Whom a decision is about, as the layer knows it while deciding.
#[derive(Clone, Copy, Default)]
pub(crate) struct Seen<'a> {
    /// `None` until the key has led to a plan.
    pub(crate) plan: Option<&'a Plan>,
    /// A registered key's public id; never a key's value.
    pub(crate) key_id: Option<&'a Arc<str>>,
    pub(crate) req: Option<RequestView<'a>>,
}

impl<'a> Seen<'a> {
    /// A request whose key led to no plan.
    #[inline]
    pub(crate) fn request(req: &RequestView<'a>) -> Self {
        Seen {
            req: Some(*req),
            ..Seen::default()
        }
    }

    /// A request, if there is one, whose key led to no plan.
    #[inline]
    pub(crate) fn maybe(req: Option<&RequestView<'a>>) -> Self {
        Seen {
            req: req.copied(),
            ..Seen::default()
        }
    }

    fn event(&self, outcome: Outcome, limit: Option<&'static str>) -> DecisionEvent<'a> {
        DecisionEvent {
            plan: self.plan.map(|p| &*p.name),
            shadow: self.plan.is_some_and(|p| p.shadow),
            key_id: self.key_id.map(|id| &**id),
            req: self.req,
            outcome,
            limit,
        }
    }
}

/// What a request waiting for a remote store keeps of [`Seen`] for its
/// observer (the request itself travels with it). Made only when an observer
/// is set: two reference counts, no allocation.
#[derive(Debug)]
pub(crate) struct Watch {
    plan: Arc<str>,
    shadow: bool,
    key_id: Option<Arc<str>>,
}

/// The outcome of a settled decision; `failed` when the store failed (the
/// failure mode then decided).
fn outcome<R>(
    decision: &Decision<R>,
    failed: Option<FailureMode>,
) -> (Outcome, Option<&'static str>) {
    match (failed, decision) {
        (Some(mode), _) => (Outcome::StoreFailed(mode), None),
        (None, Ok(_)) => (Outcome::Allowed, None),
        (None, Err((rejection, _))) => (Outcome::Rejected(rejection.reason()), rejection.limit()),
    }
}

impl<K, S> Shared<K, S> {
    /// [`settle`](Shared::settle), then the observer, if any, sees the decision.
    #[inline]
    pub(crate) fn settle_seen<R: Unchecked>(
        &self,
        result: Result<Result<R, Denied>, StoreError>,
        failure: FailureMode,
        waited: bool,
        seen: Seen<'_>,
    ) -> Decision<R> {
        match &self.observer {
            None => self.settle(result, failure, waited),
            Some(observer) => self.settle_observed(&**observer, result, failure, waited, seen),
        }
    }

    #[inline(never)]
    fn settle_observed<R: Unchecked>(
        &self,
        observer: &dyn Observer,
        result: Result<Result<R, Denied>, StoreError>,
        failure: FailureMode,
        waited: bool,
        seen: Seen<'_>,
    ) -> Decision<R> {
        let failed = result.is_err().then_some(failure);
        let decision = self.settle(result, failure, waited);
        let (outcome, limit) = outcome(&decision, failed);
        observer.on_decision(&seen.event(outcome, limit));
        decision
    }

    /// What a request that waits for the store keeps for the observer:
    /// nothing without one.
    #[inline]
    pub(crate) fn watch(&self, seen: Seen<'_>) -> Option<Watch> {
        self.observer.as_ref()?;
        let plan = seen.plan?;
        Some(Watch {
            plan: Arc::clone(&plan.name),
            shadow: plan.shadow,
            key_id: seen.key_id.cloned(),
        })
    }

    /// [`settle`](Shared::settle) for an answer the request waited for; the
    /// observer sees it with what the request kept (`watch`) and the request.
    pub(crate) fn settle_watched(
        &self,
        result: Result<Verdict, StoreError>,
        failure: FailureMode,
        watch: Option<Watch>,
        req: Option<RequestView<'_>>,
    ) -> Decision {
        let (Some(observer), Some(watch)) = (&self.observer, watch) else {
            return self.settle(result, failure, true);
        };
        let failed = result.is_err().then_some(failure);
        let decision = self.settle(result, failure, true);
        let (outcome, limit) = outcome(&decision, failed);
        observer.on_decision(&DecisionEvent {
            plan: Some(&watch.plan),
            shadow: watch.shadow,
            key_id: watch.key_id.as_deref(),
            req,
            outcome,
            limit,
        });
        decision
    }

    /// The rejection of a key problem (decided before any store is asked),
    /// seen by the observer.
    #[inline]
    pub(crate) fn refuse(&self, reason: Reason, seen: Seen<'_>) -> Rejection {
        let rejection = Rejection::key(reason);
        if let Some(observer) = &self.observer {
            observer.on_decision(&seen.event(Outcome::Rejected(reason), None));
        }
        rejection
    }

    /// The observer, if any, sees a decision of the memory store made
    /// directly ([`check`](crate::RateLimitLayer::check)).
    #[inline]
    pub(crate) fn checked(&self, result: &Result<(), Denied>, seen: Seen<'_>) {
        if let Some(observer) = &self.observer {
            let event = match result {
                Ok(()) => seen.event(Outcome::Allowed, None),
                Err(d) => {
                    let rejection = Rejection::denied(d.denial, &d.limit, self.quota_status);
                    seen.event(Outcome::Rejected(rejection.reason()), rejection.limit())
                }
            };
            observer.on_decision(&event);
        }
    }
}
