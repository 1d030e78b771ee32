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
use http::Response;

use crate::extract::{KeyExtractor, RequestView};
use crate::hash;
use crate::plan::{Keys, Policy};
use crate::response::{HeaderStyle, Reason, Rejection, SharedOnRejection, is_grpc};
use crate::store::{Applied, MemoryStore, Report};

/// What every clone of a layer and its services share.
pub(crate) struct Shared<K> {
    pub(crate) extractor: K,
    pub(crate) policy: Policy,
    pub(crate) store: MemoryStore,
    pub(crate) headers: HeaderStyle,
    pub(crate) on_rejection: Option<SharedOnRejection>,
}

impl<K: KeyExtractor> Shared<K> {
    /// Decides one request: key, plan, then every limit of the plan at once.
    #[inline]
    pub(crate) fn decide(
        &self,
        req: &RequestView<'_>,
    ) -> Result<Report, (Rejection, Option<Applied>)> {
        let grpc = is_grpc(req.headers);
        match self.extractor.extract(req) {
            Ok(key) => self.decide_key(key.as_bytes(), 1, grpc),
            Err(e) => Err((Rejection::key(Reason::Key(e), grpc), None)),
        }
    }
}

impl<K> Shared<K> {
    /// Decides a request of `cost` units for `key`: plan lookup, then every
    /// limit of the plan at once.
    #[inline]
    pub(crate) fn decide_key(
        &self,
        key: &[u8],
        cost: u32,
        grpc: bool,
    ) -> Result<Report, (Rejection, Option<Applied>)> {
        let digest = hash::digest(key);
        let (plan, state) = match &*self.policy.keys {
            Keys::Any(plan) => (plan, digest),
            Keys::Registered(keys) => {
                let Some(entry) = keys.get(&digest) else {
                    return Err((Rejection::key(Reason::UnknownKey, grpc), None));
                };
                if !entry.enabled {
                    return Err((Rejection::key(Reason::DisabledKey, grpc), None));
                }
                (&entry.plan, entry.state)
            }
        };
        self.store
            .acquire(&plan.limits, state, cost)
            .map_err(|d| (Rejection::denied(d.denial, &d.limit, grpc), Some(d.limit)))
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

pub(crate) type SharedState<K> = Arc<Shared<K>>;
