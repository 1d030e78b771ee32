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
use http::{Method, Response, StatusCode};

use crate::extract::{KeyError, KeyExtractor, RequestView};
use crate::hash::{self, Digest};
use crate::plan::{Plan, match_method};
use crate::policy::{Policy, Snapshot};
use crate::quota::QuotaCell;
use crate::response::{HeaderStyle, Reason, Rejection, SharedOnRejection, is_grpc};
use crate::store::{Applied, MemoryStore, Report, Throttles};

/// Stage limits are one state for every caller.
const STAGE_KEY: Digest = Digest(0);

/// What every clone of a layer and its services share.
pub(crate) struct Shared<K> {
    pub(crate) extractor: K,
    pub(crate) policy: Policy,
    pub(crate) store: MemoryStore,
    pub(crate) headers: HeaderStyle,
    pub(crate) on_rejection: Option<SharedOnRejection>,
    pub(crate) quota_status: StatusCode,
}

/// A decision's result: the report of the limits, or a rejection and how the
/// limit that rejected stands.
pub(crate) type Decision = Result<Report, (Rejection, Option<Applied>)>;

impl<K: KeyExtractor> Shared<K> {
    /// Decides one request: key, plan, then every limit that applies at once.
    #[inline]
    pub(crate) fn decide(&self, req: &RequestView<'_>) -> Decision {
        let grpc = is_grpc(req.headers);
        let snap = self.policy.load();
        let route = route_of(req);
        match (self.extractor.extract(req), &snap.anonymous) {
            (Ok(key), _) => {
                self.decide_key(&snap, key.as_bytes(), Some((route, req.method)), 1, grpc)
            }
            (Err(KeyError::Missing), Some(anon)) => match anon.client_ip.extract(req) {
                Ok(ip) => self.decide_plan(
                    &snap,
                    &anon.plan,
                    hash::digest(ip.as_bytes()),
                    None,
                    Some((route, req.method)),
                    1,
                    grpc,
                ),
                Err(e) => Err((self.rejection(Reason::Key(e), grpc), None)),
            },
            (Err(e), _) => Err((self.rejection(Reason::Key(e), grpc), None)),
        }
    }
}

impl<K> Shared<K> {
    /// Decides a request of `cost` units for `key`; `route` is the matched
    /// route and method, when there is a request.
    #[inline]
    pub(crate) fn decide_key(
        &self,
        snap: &Snapshot,
        key: &[u8],
        route: Option<(&str, &Method)>,
        cost: u32,
        grpc: bool,
    ) -> Decision {
        let digest = hash::digest(key);
        if let Some(plan) = &snap.per_key {
            return self.decide_plan(snap, plan, digest, None, route, cost, grpc);
        }
        let Some(entry) = snap.keys.get(&digest) else {
            return Err((self.rejection(Reason::UnknownKey, grpc), None));
        };
        if !entry.enabled {
            return Err((self.rejection(Reason::DisabledKey, grpc), None));
        }
        self.decide_plan(
            snap,
            &entry.plan,
            entry.state,
            entry.quota.as_deref(),
            route,
            cost,
            grpc,
        )
    }

    /// Gathers every limit that applies (stage, plan, method overrides, quota)
    /// and decides them in one step.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn decide_plan(
        &self,
        snap: &Snapshot,
        plan: &Plan,
        state: Digest,
        quota: Option<&QuotaCell>,
        route: Option<(&str, &Method)>,
        cost: u32,
        grpc: bool,
    ) -> Decision {
        let mut throttles = Throttles::default();
        if let Some(stage) = &snap.stage {
            if let Some(l) = &stage.throttle {
                throttles.push(l, STAGE_KEY);
            }
            if let Some(l) = route.and_then(|(r, m)| match_method(&stage.methods, r, m)) {
                throttles.push(l, STAGE_KEY);
            }
        }
        if let Some(l) = &plan.throttle {
            throttles.push(l, state);
        }
        if let Some(l) = route.and_then(|(r, m)| match_method(&plan.methods, r, m)) {
            throttles.push(l, state);
        }
        let quota = plan.quota.as_ref().and_then(|spec| Some((quota?, spec)));
        self.store
            .acquire(&throttles, quota, cost, plan.shadow)
            .map_err(|d| {
                let rejection = Rejection::denied(d.denial, &d.limit, grpc, self.quota_status);
                (rejection, Some(d.limit))
            })
    }

    fn rejection(&self, reason: Reason, grpc: bool) -> Rejection {
        Rejection::key(reason, grpc)
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
