//! The tower layer, service and future.

mod future;
#[allow(clippy::module_inception)]
mod layer;
mod service;

pub use self::future::ResponseFuture;
pub use self::layer::{RateLimitLayer, RateLimitLayerBuilder};
pub use self::service::RateLimit;

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};

use crate::extract::{KeyError, KeyExtractor, RequestView};
use crate::hash::{self, Digest};
use crate::plan::{Limit, MethodLimit, Plan, StageLimits, match_method};
use crate::policy::{Policy, Snapshot};
use crate::quota::QuotaCell;
use crate::response::{HeaderStyle, Reason, Rejection, SharedOnRejection};
use crate::store::{Applied, MemoryStore, QuotaAsk, Report, Sink, Throttles};

/// Stage limits are one state for every caller.
const STAGE_KEY: Digest = Digest(0);

/// What every clone of a layer and its services share.
pub(crate) struct Shared<K> {
    pub(crate) extractor: K,
    pub(crate) policy: Policy,
    /// The one plan of a [`Policy::per_key`] policy, which never changes:
    /// deciding under it needs no policy snapshot.
    pub(crate) fixed: Option<Arc<Plan>>,
    pub(crate) store: MemoryStore,
    pub(crate) headers: HeaderStyle,
    pub(crate) on_rejection: Option<SharedOnRejection>,
    pub(crate) quota_status: StatusCode,
}

/// A decision's result: the report of the limits, or a rejection and how the
/// limit that rejected stands.
pub(crate) type Decision<R = Report> = Result<R, (Rejection, Option<Applied>)>;

impl<K: KeyExtractor> Shared<K> {
    /// Decides one request: key, plan, then every limit that applies at once.
    /// Rejections leave `grpc` unset: the caller sets it, so that allowed
    /// requests never pay for the content-type check.
    #[inline]
    pub(crate) fn decide(&self, req: &RequestView<'_>) -> Decision {
        if let Some(plan) = &self.fixed {
            return match self.extractor.extract(req) {
                Ok(key) => {
                    let state = hash::state_digest(key.as_bytes());
                    self.decide_plan::<Report>(None, plan, state, None, Some(req), 1)
                }
                Err(e) => Err((Rejection::key(Reason::Key(e)), None)),
            };
        }
        let snap = self.policy.load();
        match (self.extractor.extract(req), &snap.anonymous) {
            (Ok(key), _) => self.decide_key::<Report>(&snap, key.as_bytes(), Some(req), 1),
            (Err(KeyError::Missing), Some(anon)) => match anon.client_ip.extract(req) {
                Ok(ip) => self.decide_plan::<Report>(
                    snap.stage.as_deref(),
                    &anon.plan,
                    hash::state_digest(ip.as_bytes()),
                    None,
                    Some(req),
                    1,
                ),
                Err(e) => Err((Rejection::key(Reason::Key(e)), None)),
            },
            (Err(e), _) => Err((Rejection::key(Reason::Key(e)), None)),
        }
    }
}

impl<K> Shared<K> {
    /// Decides a request of `cost` units for `key` without a request: no
    /// route, so no method overrides, and no report.
    #[inline]
    pub(crate) fn check(&self, key: &[u8], cost: u32) -> Decision<()> {
        match &self.fixed {
            Some(plan) => {
                self.decide_plan::<()>(None, plan, hash::state_digest(key), None, None, cost)
            }
            None => self.decide_key::<()>(&self.policy.load(), key, None, cost),
        }
    }

    /// Decides a request of `cost` units for a registered `key`; `req` is the
    /// request, when there is one (its route selects method overrides). A
    /// per-key policy never gets here: it is decided through `fixed`.
    #[inline]
    fn decide_key<R: Sink>(
        &self,
        snap: &Snapshot,
        key: &[u8],
        req: Option<&RequestView<'_>>,
        cost: u32,
    ) -> Decision<R> {
        let stage = snap.stage.as_deref();
        let Some(entry) = snap.keys.get(&hash::digest(key)) else {
            return Err((Rejection::key(Reason::UnknownKey), None));
        };
        if !entry.enabled {
            return Err((Rejection::key(Reason::DisabledKey), None));
        }
        self.decide_plan::<R>(
            stage,
            &entry.plan,
            entry.state,
            entry.quota.as_deref(),
            req,
            cost,
        )
    }

    /// Gathers every limit that applies (stage, plan, method overrides, quota)
    /// and decides them in one step.
    #[inline]
    fn decide_plan<R: Sink>(
        &self,
        stage: Option<&StageLimits>,
        plan: &Plan,
        state: Digest,
        quota: Option<&QuotaCell>,
        req: Option<&RequestView<'_>>,
        cost: u32,
    ) -> Decision<R> {
        // Stage limits protect the backend's total capacity: a shadow plan
        // never lifts them.
        let mut throttles = Throttles::default();
        if let Some(stage) = stage {
            if let Some(l) = &stage.throttle {
                throttles.push(l, STAGE_KEY, false);
            }
            if let Some(l) = method_limit(&stage.methods, req) {
                throttles.push(l, STAGE_KEY, false);
            }
        }
        if let Some(l) = &plan.throttle {
            throttles.push(l, state, plan.shadow);
        }
        if let Some(l) = method_limit(&plan.methods, req) {
            throttles.push(l, state, plan.shadow);
        }
        let quota = plan.quota.as_ref().and_then(|spec| {
            Some(QuotaAsk {
                cell: quota?,
                spec,
                shadow: plan.shadow,
            })
        });
        let mut report = R::default();
        match self.store.acquire(&throttles, quota, cost, &mut report) {
            Ok(()) => Ok(report),
            Err(d) => {
                let rejection = Rejection::denied(d.denial, &d.limit, self.quota_status);
                Err((rejection, Some(d.limit)))
            }
        }
    }

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
fn route_of<'a>(req: &RequestView<'a>) -> &'a str {
    #[cfg(feature = "axum")]
    if let Some(m) = req.extensions.get::<axum::extract::MatchedPath>() {
        return m.as_str();
    }
    req.uri.path()
}

pub(crate) type SharedState<K> = Arc<Shared<K>>;
