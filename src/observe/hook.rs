//! What an observer is told a decision is about ([`Seen`], and [`Watch`] for
//! a request that waits for its store), and a decision's [`Outcome`]. The
//! engine calls the observer; nothing here knows the engine.

use std::sync::Arc;

use super::{DecisionEvent, Observer, Outcome};
use crate::extract::RequestView;
use crate::plan::{FailureMode, Plan};
use http::StatusCode;

use crate::response::{Decision, Rejection, Unchecked};

pub(crate) type SharedObserver = Arc<dyn Observer>;

/// Whom a decision is about, as the layer knows it while deciding.
#[derive(Clone, Copy, Default)]
pub(crate) struct Seen<'a> {
    /// `None` until the key has led to a plan.
    pub(crate) plan: Option<&'a Plan>,
    /// A registered key's public id; never a key's value.
    pub(crate) key_id: Option<&'a str>,
    pub(crate) req: Option<RequestView<'a>>,
    /// The plan's model entry whose limits applied, if any.
    pub(crate) model: Option<&'a str>,
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

    pub(crate) fn event(&self, outcome: Outcome, limit: Option<&'static str>) -> DecisionEvent<'a> {
        DecisionEvent {
            plan: self.plan.map(|p| &*p.name),
            shadow: self.plan.is_some_and(|p| p.shadow),
            key_id: self.key_id,
            req: self.req,
            model: self.model,
            outcome,
            limit,
        }
    }
}

/// What a request waiting for a remote store keeps of [`Seen`] for its
/// observer (the request itself travels with it). Made only when an observer
/// is set: a reference count and, for a registered key, a copy of its id.
#[derive(Debug)]
pub(crate) struct Watch {
    plan: Arc<str>,
    shadow: bool,
    key_id: Option<Arc<str>>,
    model: Option<Arc<str>>,
}

impl Watch {
    /// What to keep of `seen`; nothing before the key has led to a plan.
    pub(crate) fn new(seen: &Seen<'_>) -> Option<Self> {
        let plan = seen.plan?;
        Some(Watch {
            plan: Arc::clone(&plan.name),
            shadow: plan.shadow,
            key_id: seen.key_id.map(Arc::from),
            model: seen.model.map(Arc::from),
        })
    }

    /// The event of the decision the request waited for.
    pub(crate) fn event<'a>(
        &'a self,
        req: Option<RequestView<'a>>,
        outcome: Outcome,
        limit: Option<&'static str>,
    ) -> DecisionEvent<'a> {
        DecisionEvent {
            plan: Some(&self.plan),
            shadow: self.shadow,
            key_id: self.key_id.as_deref(),
            req,
            model: self.model.as_deref(),
            outcome,
            limit,
        }
    }
}

/// The outcome of a settled decision; `failed` when the store failed (the
/// failure mode then decided).
pub(crate) fn outcome<R: Unchecked>(
    decision: &Decision<R>,
    failed: Option<FailureMode>,
) -> (Outcome, Option<&'static str>) {
    match (failed, decision) {
        (Some(mode), _) => (Outcome::StoreFailed(mode), None),
        (None, Ok(report)) => match report.shadow_denied() {
            None => (Outcome::Allowed, None),
            Some(d) => {
                let rejection =
                    Rejection::denied(d.denial, &d.limit, StatusCode::TOO_MANY_REQUESTS);
                (
                    Outcome::ShadowRejected(rejection.reason()),
                    rejection.limit(),
                )
            }
        },
        (None, Err(refusal)) => {
            let (rejection, _) = &**refusal;
            (Outcome::Rejected(rejection.reason()), rejection.limit())
        }
    }
}
