use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::read::{Reading, refuse_body, refuse_unread};
use super::{Shared, Step};
use crate::body::{Guard, RequestBody, ResponseBody, Unsettled};
use crate::extract::{KeyExtractor, RequestView};
use crate::headers::Prepared;
use crate::observe::Watch;
use crate::plan::FailureMode;
use crate::resolver::{Answer, Lookup};
use crate::response::{Reason, Rejection, is_grpc};
use crate::store::{Report, Store};

pin_project! {
    /// The future of [`RateLimit`](crate::RateLimit): the store's answer when
    /// it must be waited for, then the inner service's response with
    /// rate-limit headers added, or a rejection.
    pub struct ResponseFuture<S, B, K, St>
    where
        S: Service<Request<RequestBody<B>>>,
        St: Store,
    {
        #[pin]
        state: State<S, B, K, St>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, K, St>
    where
        S: Service<Request<RequestBody<B>>>,
        St: Store,
    {
        // The key is not registered: the resolver is asked, then the
        // request is decided as `call` decides a registered key's.
        Resolving {
            lookup: Lookup,
            parked: Option<Box<Parked<S, B, K, St>>>,
        },
        // The key is good and the estimator needs the body: it is read,
        // then the request is decided as `call` decides one.
        Reading {
            read: Pin<Box<Reading<B>>>,
            parked: Option<Box<Parked<S, B, K, St>>>,
        },
        Waiting {
            #[pin]
            decision: St::Future,
            // Boxed: a request is 200-odd bytes, and every response future
            // of the memory store, which never waits, would carry its room.
            parked: Option<Box<Parked<S, B, K, St>>>,
        },
        Called {
            #[pin]
            fut: S::Future,
            // `None` when the layer sends no rate-limit headers.
            headers: Option<Prepared>,
            guard: Option<Guard>,
        },
        Rejected { response: Option<Response<Bytes>> },
    }
}

/// What a request waiting for a remote store's answer holds until then.
pub(crate) struct Parked<S, B, K, St> {
    pub(crate) inner: S,
    pub(crate) req: Request<RequestBody<B>>,
    pub(crate) shared: Arc<Shared<K, St>>,
    pub(crate) failure: FailureMode,
    pub(crate) reservation: Option<Box<Unsettled>>,
    pub(crate) watch: Option<Box<Watch>>,
    /// The resolver's answer for the request's key, once it has one: a
    /// request decided again after its body is read is decided with it,
    /// not looked up a second time (the answer may have left the cache
    /// meanwhile, or never entered it).
    pub(crate) answer: Option<Answer>,
}

impl<S, B, K, St> ResponseFuture<S, B, K, St>
where
    S: Service<Request<RequestBody<B>>>,
    St: Store,
{
    /// The future of a request allowed at once. `call` passes the inner
    /// service's future straight from the inner `call` (a future moved is a
    /// copy of all of it, and every copy saved is measurable on this path):
    /// made inside a closure called here, with the headers prepared before
    /// it, it was copied once more.
    #[inline(always)]
    pub(crate) fn called(fut: S::Future, headers: Option<Prepared>, guard: Option<Guard>) -> Self {
        ResponseFuture {
            state: State::Called {
                fut,
                headers,
                guard,
            },
        }
    }

    pub(crate) fn rejected(response: Response<Bytes>) -> Self {
        ResponseFuture {
            state: State::Rejected {
                response: Some(response),
            },
        }
    }

    pub(crate) fn resolving(lookup: Lookup, parked: Parked<S, B, K, St>) -> Self {
        ResponseFuture {
            state: State::Resolving {
                lookup,
                parked: Some(Box::new(parked)),
            },
        }
    }

    /// Reads the parked request's body (still the request's own), then
    /// decides it.
    pub(crate) fn reading(mut parked: Parked<S, B, K, St>, caller: u64) -> Self {
        ResponseFuture {
            state: State::Reading {
                read: read_body(&mut parked, caller),
                parked: Some(Box::new(parked)),
            },
        }
    }

    pub(crate) fn waiting(decision: St::Future, parked: Parked<S, B, K, St>) -> Self {
        ResponseFuture {
            state: State::Waiting {
                decision,
                parked: Some(Box::new(parked)),
            },
        }
    }
}

/// Takes the parked request's own body out to be read; a read body takes its
/// place once it has ended.
fn read_body<S, B, K, St>(parked: &mut Parked<S, B, K, St>, caller: u64) -> Pin<Box<Reading<B>>> {
    let body = std::mem::replace(parked.req.body_mut(), RequestBody::read(Bytes::new(), None));
    let body = body
        .into_streaming()
        .expect("a parked request's body is read once");
    Box::pin(Reading::new(
        body,
        parked.shared.body_limits,
        Arc::clone(&parked.shared.body_memory),
        caller,
    ))
}

impl<S, B, K, St> State<S, B, K, St>
where
    S: Service<Request<RequestBody<B>>>,
    K: KeyExtractor,
    St: Store,
{
    /// Where a parked request goes after a step of its decision.
    fn after(
        step: Step<St::Future>,
        mut parked: Box<Parked<S, B, K, St>>,
        report: &Report,
    ) -> Self {
        let shared = Arc::clone(&parked.shared);
        match step {
            Step::Done(Ok(())) => {
                let Parked {
                    inner: mut svc,
                    mut req,
                    reservation,
                    ..
                } = *parked;
                State::Called {
                    guard: Guard::hold(&shared.store, report, reservation, &mut req),
                    fut: svc.call(req),
                    headers: shared.headers.prepared(report),
                }
            }
            Step::Done(Err(refusal)) => {
                let (rejection, limit) = *refusal;
                let rejection = rejection.with_grpc(is_grpc(parked.req.headers()));
                State::Rejected {
                    response: Some(shared.reject(
                        rejection,
                        limit,
                        &RequestView::new(&parked.req),
                        parked.answer.as_ref(),
                    )),
                }
            }
            Step::Wait(decision, failure, watch) => {
                parked.failure = failure;
                parked.watch = watch;
                State::Waiting {
                    decision,
                    parked: Some(parked),
                }
            }
            Step::Resolve(lookup) => State::Resolving {
                lookup,
                parked: Some(parked),
            },
            // Only a request whose body is still its own is read (a read one
            // has its estimate, and is never asked for its body again).
            Step::Read(caller) if !parked.req.body().is_read() => State::Reading {
                read: read_body(&mut parked, caller),
                parked: Some(parked),
            },
            Step::Read(_) => State::Rejected {
                response: Some(refuse_body(
                    shared.style,
                    http::StatusCode::INTERNAL_SERVER_ERROR,
                    "the request body was asked for twice",
                    "internal_error",
                )),
            },
        }
    }
}

impl<S, B, K, St, ResBody> Future for ResponseFuture<S, B, K, St>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResBody>>,
    B: http_body::Body<Data = Bytes>,
    K: KeyExtractor,
    St: Store,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut state = self.as_mut().project().state;
            let next = match state.as_mut().project() {
                StateProj::Resolving { lookup, parked } => {
                    let answer = ready!(lookup.as_mut().poll(cx));
                    let Some(mut parked) = parked.take() else {
                        panic!("ResponseFuture polled after completion");
                    };
                    let mut report = Report::default();
                    let shared = Arc::clone(&parked.shared);
                    let step = shared.decide_resolved(
                        &answer,
                        &RequestView::new(&parked.req),
                        &mut parked.reservation,
                        &mut report,
                    );
                    parked.answer = Some(answer);
                    match step {
                        // A resolved key is never looked up again.
                        Step::Resolve(_) => {
                            let rejection = Rejection::key(Reason::ResolverUnavailable)
                                .with_grpc(is_grpc(parked.req.headers()));
                            State::Rejected {
                                response: Some(shared.reject(
                                    rejection,
                                    None,
                                    &RequestView::new(&parked.req),
                                    None,
                                )),
                            }
                        }
                        step => State::after(step, parked, &report),
                    }
                }
                StateProj::Reading { read, parked } => {
                    let read = ready!(read.as_mut().poll_read(cx));
                    let Some(mut parked) = parked.take() else {
                        panic!("ResponseFuture polled after completion");
                    };
                    let shared = Arc::clone(&parked.shared);
                    let (data, trailers) = match read {
                        Ok(read) => read,
                        Err(why) => {
                            return Poll::Ready(Ok(refuse_unread(
                                shared.style,
                                why,
                                shared.body_limits,
                            )
                            .map(ResponseBody::full)));
                        }
                    };
                    let estimate = shared
                        .estimator
                        .estimate_body(&RequestView::new(&parked.req), &data);
                    match estimate {
                        Ok(estimate) => {
                            parked.req.extensions_mut().insert(estimate);
                            *parked.req.body_mut() = RequestBody::read(data, trailers);
                            let mut report = Report::default();
                            let view = RequestView::new(&parked.req);
                            let reservation = &mut parked.reservation;
                            let step = match &parked.answer {
                                // A key the resolver answered: by that answer.
                                Some(answer) => {
                                    shared.decide_resolved(answer, &view, reservation, &mut report)
                                }
                                None => shared.decide(&view, reservation, &mut report),
                            };
                            State::after(step, parked, &report)
                        }
                        Err(e) => State::Rejected {
                            response: Some(refuse_body(
                                shared.style,
                                http::StatusCode::BAD_REQUEST,
                                e.message(),
                                "invalid_body",
                            )),
                        },
                    }
                }
                StateProj::Waiting { decision, parked } => {
                    let result = ready!(decision.poll(cx));
                    let Some(parked) = parked.take() else {
                        panic!("ResponseFuture polled after completion");
                    };
                    let Parked {
                        inner: mut svc,
                        mut req,
                        shared,
                        failure,
                        reservation,
                        watch,
                        answer,
                    } = *parked;
                    let view = Some(RequestView::new(&req));
                    match shared.conclude_watched(result, failure, watch, view) {
                        Ok(report) => State::Called {
                            guard: Guard::hold(&shared.store, &report, reservation, &mut req),
                            fut: svc.call(req),
                            headers: shared.headers.prepared(&report),
                        },
                        Err(refusal) => {
                            let (rejection, limit) = *refusal;
                            let rejection = rejection.with_grpc(is_grpc(req.headers()));
                            State::Rejected {
                                response: Some(shared.reject(
                                    rejection,
                                    limit,
                                    &RequestView::new(&req),
                                    answer.as_ref(),
                                )),
                            }
                        }
                    }
                }
                StateProj::Called {
                    fut,
                    headers,
                    guard,
                } => {
                    let mut res = ready!(fut.poll(cx))?;
                    if let Some(headers) = headers.take() {
                        headers.write(res.headers_mut());
                    }
                    let guard = guard.take();
                    if let Some(g) = &guard {
                        g.read_response(&res);
                    }
                    return Poll::Ready(Ok(res.map(|body| ResponseBody::inner(body, guard))));
                }
                StateProj::Rejected { response } => {
                    let res = response
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(Ok(res.map(ResponseBody::full)));
                }
            };
            state.set(next);
        }
    }
}

impl<S, B, K, St> fmt::Debug for ResponseFuture<S, B, K, St>
where
    S: Service<Request<RequestBody<B>>>,
    St: Store,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Resolving { .. } => "Resolving",
            State::Reading { .. } => "Reading",
            State::Waiting { .. } => "Waiting",
            State::Called { .. } => "Called",
            State::Rejected { .. } => "Rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::Ready;
    use std::mem::size_of;

    use http_body_util::Empty;

    use super::*;
    use crate::extract::ApiKeyHeader;
    use crate::store::MemoryStore;

    /// An inner service whose future is its answer.
    struct Answer;

    impl Service<Request<RequestBody<Empty<Bytes>>>> for Answer {
        type Response = Response<Empty<Bytes>>;
        type Error = Infallible;
        type Future = Ready<Result<Response<Empty<Bytes>>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<RequestBody<Empty<Bytes>>>) -> Self::Future {
            std::future::ready(Ok(Response::new(Empty::new())))
        }
    }

    /// A response future is copied as it is moved (by `call`, then by the
    /// caller's `Oneshot` or the server's task): the layer adds at most 64
    /// bytes to the inner service's future, its prepared headers (40) and
    /// its guard (16), and the state's tag.
    #[test]
    fn the_response_future_adds_at_most_64_bytes() {
        type Fut = ResponseFuture<Answer, Empty<Bytes>, ApiKeyHeader, MemoryStore>;
        let (layer, inner) = (
            size_of::<Fut>(),
            size_of::<<Answer as Service<_>>::Future>(),
        );
        assert!(layer <= inner + 64, "{layer} bytes over {inner}");
        assert_eq!(size_of::<Option<Prepared>>(), 40);
        assert_eq!(size_of::<Option<Guard>>(), 16);
    }
}
