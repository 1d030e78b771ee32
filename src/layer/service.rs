use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower_service::Service;

use super::{ResponseFuture, Shared, SharedState};
use crate::body::ResponseBody;
use crate::extract::{ApiKeyHeader, KeyExtractor, RequestView};
use crate::response::is_grpc;

/// A service that rate-limits requests before they reach `S`.
///
/// Made by [`RateLimitLayer`](crate::RateLimitLayer). `poll_ready` only asks the
/// inner service; the decision is made in `call`. A rejected request gets a
/// response (403, 429, or a gRPC status), never an error: `Error = S::Error`.
pub struct RateLimit<S, K = ApiKeyHeader> {
    inner: S,
    shared: SharedState<K>,
}

impl<S, K> RateLimit<S, K> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<K>>) -> Self {
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

impl<S: Clone, K> Clone for RateLimit<S, K> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, K> fmt::Debug for RateLimit<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("policy", &self.shared.policy)
            .finish_non_exhaustive()
    }
}

impl<S, K, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S, K>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    K: KeyExtractor,
    ResBody: http_body::Body<Data = Bytes>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        match self.shared.decide(&RequestView::new(&req)) {
            Ok(report) => ResponseFuture::called(self.inner.call(req), report, self.shared.headers),
            Err((rejection, limit)) => {
                // Only a rejection needs to know whether the call is gRPC.
                let rejection = rejection.with_grpc(is_grpc(req.headers()));
                ResponseFuture::rejected(self.shared.reject(rejection, limit))
            }
        }
    }
}
