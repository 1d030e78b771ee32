use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower_service::Service;

use super::future::Parked;
use super::{ResponseFuture, Shared, SharedState, Step};
use crate::body::{Guard, RequestBody, ResponseBody};
use crate::extract::{ApiKeyHeader, KeyExtractor, RequestView};
use crate::plan::FailureMode;
use crate::response::is_grpc;
use crate::store::{MemoryStore, Report, Store};

/// A service that rate-limits requests before they reach `S`.
///
/// Made by [`RateLimitLayer`](crate::RateLimitLayer). `poll_ready` only asks the
/// inner service; the decision is made in `call`. A rejected request gets a
/// response (403, 429, 503 or a gRPC status), never an error:
/// `Error = S::Error`.
///
/// With a store that answers at once (the memory store) the inner service
/// is called from `call`. With a remote store the request waits for the
/// store's answer in the response future, holding the inner service that
/// `poll_ready` readied (and leaving a clone in its place, as tower's
/// middleware that wait before calling do): `S` must be `Clone`. A key that
/// the [resolver](crate::Resolver) must look up waits the same way.
pub struct RateLimit<S, K = ApiKeyHeader, St = MemoryStore> {
    inner: S,
    shared: SharedState<K, St>,
}

impl<S, K, St> RateLimit<S, K, St> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<K, St>>) -> Self {
        RateLimit { inner, shared }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, K, St> Clone for RateLimit<S, K, St> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, K, St> fmt::Debug for RateLimit<S, K, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("policy", &self.shared.policy)
            .finish_non_exhaustive()
    }
}

impl<S, K, St, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S, K, St>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Clone,
    K: KeyExtractor,
    St: Store,
    ReqBody: http_body::Body<Data = Bytes>,
    ResBody: http_body::Body<Data = Bytes>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, K, St>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let mut req = req.map(RequestBody::streaming);
        let mut reservation = None;
        let mut report = Report::default();
        let step = self
            .shared
            .decide(&RequestView::new(&req), &mut reservation, &mut report);
        let park = |inner: &mut S, req, failure, reservation, watch| {
            // The readied service goes with the request; a clone stays.
            let clone = inner.clone();
            Parked {
                inner: std::mem::replace(inner, clone),
                req,
                shared: Arc::clone(&self.shared),
                failure,
                reservation,
                watch,
                answer: None,
            }
        };
        match step {
            Step::Done(Ok(())) => {
                let guard = Guard::hold(&self.shared.store, &report, reservation, &mut req);
                let headers = self.shared.headers.prepared(&report);
                ResponseFuture::called(self.inner.call(req), headers, guard)
            }
            Step::Done(Err(refusal)) => {
                let (rejection, limit) = *refusal;
                // Only a rejection needs to know whether the call is gRPC.
                let rejection = rejection.with_grpc(is_grpc(req.headers()));
                ResponseFuture::rejected(self.shared.reject(
                    rejection,
                    limit,
                    &RequestView::new(&req),
                    None,
                ))
            }
            // The failure mode is set when the key's plan is known.
            Step::Resolve(lookup) => ResponseFuture::resolving(
                lookup,
                park(&mut self.inner, req, FailureMode::Closed, reservation, None),
            ),
            // The key is good and the estimator needs the body: nothing is
            // decided until it is read.
            Step::Read(caller) => ResponseFuture::reading(
                park(&mut self.inner, req, FailureMode::Closed, reservation, None),
                caller,
            ),
            Step::Wait(decision, failure, watch) => ResponseFuture::waiting(
                decision,
                park(&mut self.inner, req, failure, reservation, watch),
            ),
        }
    }
}
