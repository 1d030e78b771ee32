//! The bodies the layer hands on: the request's, as it came or as an
//! estimator read it, and the response's, the inner service's or a
//! rejection's.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use std::sync::Arc;

use crate::cost::{TokenUsage, UsedTokens};
use crate::hash::Digest;
use crate::plan::{AccountLimits, Plan};
use crate::store::{Permit, Reservation, Store, Subject};

pin_project! {
    /// The body of a response that went through [`RateLimit`](crate::RateLimit):
    /// the inner service's body when the request passed, the rejection's when
    /// it did not.
    ///
    /// When the request holds places under concurrency caps (its plan's,
    /// its model's), the body gives them back when it ends, fails, or is dropped (the client went
    /// away): a streamed answer holds its place to its last event. When it
    /// reserved tokens, they are settled then too.
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    // At most one pointer more than `B`, often nothing more (when `B` has a
    // niche, the pointer fits beside it): a response is moved whole through
    // every service of a stack, and above 128 bytes each move is a `memcpy`
    // call. Most responses are the inner service's body alone; the others
    // (a guarded body, a rejection's) are made where the request has
    // allocated already.
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Other { other: Pin<Box<Other<B>>> },
    }
}

pin_project! {
    #[project = OtherProj]
    #[derive(Debug)]
    enum Other<B> {
        // The inner service's body of a request that holds places or
        // tokens until the body ends.
        Guarded {
            #[pin]
            body: B,
            guard: Option<Guard>,
        },
        // A rejection's body.
        Full { data: Option<Bytes> },
    }
}

/// Ends a request's hold on its limits when dropped: gives back its place
/// under a concurrency cap and settles its tokens.
///
/// One pointer to what is held, so that a response future carries 16 bytes
/// for it (`None` for most requests).
pub(crate) struct Guard(Box<dyn Hold>);

/// What a [`Guard`] holds, whatever its store.
trait Hold: Send + Sync {
    /// Where the handler reports the tokens used, when the request reserved some.
    fn usage(&self) -> Option<&TokenUsage>;
}

/// A request's places and reservation in `S`: given back and settled when
/// dropped.
struct Held<S: Store> {
    store: S,
    permits: [Option<Permit>; 2],
    reservation: Option<Box<Unsettled>>,
    usage: Option<TokenUsage>,
}

impl<S: Store> Hold for Held<S> {
    fn usage(&self) -> Option<&TokenUsage> {
        self.usage.as_ref()
    }
}

impl<S: Store> Drop for Held<S> {
    fn drop(&mut self) {
        if let Some(r) = self.reservation.take() {
            r.settle(&self.store);
        }
        for p in self.permits.into_iter().flatten() {
            self.store.release(p);
        }
    }
}

impl Guard {
    /// A guard for what an allowed request holds, if it holds anything.
    fn new<S: Store>(
        store: &S,
        permits: [Option<Permit>; 2],
        reservation: Option<Box<Unsettled>>,
    ) -> Option<Self> {
        if permits == [None, None] && reservation.is_none() {
            return None;
        }
        let usage = reservation.as_ref().map(|r| r.usage.clone());
        Some(Guard(Box::new(Held {
            store: store.clone(),
            permits,
            reservation,
            usage,
        })))
    }

    /// The guard of an allowed request, which goes to the inner service as
    /// `req`: its place under a concurrency cap and its token reservation.
    /// A request that reserved finds its [`TokenUsage`] handle in its
    /// extensions. So does one a failed store let through unchecked, which
    /// reserved nothing: its handler's report settles nothing, but a handler
    /// that takes the handle still finds it.
    #[inline]
    pub(crate) fn hold<S: Store, B>(
        store: &S,
        report: &crate::store::Report,
        reservation: Option<Box<Unsettled>>,
        req: &mut http::Request<B>,
    ) -> Option<Self> {
        // Most requests hold nothing: they pay for this test alone.
        if reservation.is_none() && report.permits().next().is_none() {
            return None;
        }
        Self::hold_some(store, report, reservation, req)
    }

    #[inline(never)]
    fn hold_some<S: Store, B>(
        store: &S,
        report: &crate::store::Report,
        reservation: Option<Box<Unsettled>>,
        req: &mut http::Request<B>,
    ) -> Option<Self> {
        if let Some(r) = &reservation {
            req.extensions_mut().insert(r.usage.clone());
        }
        let reservation = reservation.filter(|_| !report.unchecked).map(|mut r| {
            r.reservation = report.reserved;
            r
        });
        let mut permits = report.permits();
        Guard::new(store, [permits.next(), permits.next()], reservation)
    }

    /// Takes the actual tokens from a [`UsedTokens`] response extension.
    pub(crate) fn read_response<B>(&self, res: &http::Response<B>) {
        if let (Some(usage), Some(UsedTokens(n))) = (self.0.usage(), res.extensions().get()) {
            usage.set(*n);
        }
    }
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Guard(..)")
    }
}

/// The tokens an allowed request reserved, and what it takes to settle them
/// against the same limits when its response ends.
pub(crate) struct Unsettled {
    pub(crate) plan: Arc<Plan>,
    /// The key's account, whose token budget is settled too.
    pub(crate) account: Option<Arc<AccountLimits>>,
    /// The plan's model entry whose token budget is settled too.
    pub(crate) model: Option<Arc<str>>,
    /// The subject's name, digest and quota history (see [`Subject`]).
    pub(crate) subject: Box<[u8]>,
    pub(crate) digest: Digest,
    pub(crate) history_days: u32,
    pub(crate) estimate: u32,
    pub(crate) usage: TokenUsage,
    /// Where the estimate was charged, once decided.
    pub(crate) reservation: Reservation,
}

impl Unsettled {
    /// Settles the difference between what the handler reported and the
    /// estimate; nothing when it reported nothing.
    fn settle<S: Store>(&self, store: &S) {
        let Some(actual) = self.usage.get() else {
            return;
        };
        let delta = i64::try_from(actual)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::from(self.estimate));
        if delta == 0 {
            return;
        }
        let subject = Subject {
            plan: &self.plan,
            name: &self.subject,
            digest: self.digest,
            history_days: self.history_days,
        };
        if self.plan.tokens.is_some() {
            store.settle(&subject.settlement(self.estimate, delta, self.reservation));
        }
        // The model's budget is the key's (one slot on a cluster), but a
        // settlement holds one budget.
        let model = self
            .model
            .as_deref()
            .and_then(|m| self.plan.models.as_deref()?.entry(m));
        if let Some(m) = model.filter(|m| m.tokens.is_some()) {
            store.settle(&subject.model_settlement(m, self.estimate, delta, self.reservation));
        }
        // The account's budget is settled apart: on a cluster it lives in
        // a slot of its own.
        if let Some(account) = self.account.as_ref().filter(|a| a.tokens.is_some()) {
            store.settle(&account.settlement(self.estimate, delta, self.reservation));
        }
    }
}

impl fmt::Debug for Unsettled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Unsettled")
            .field("plan", &self.plan.name)
            .field("estimate", &self.estimate)
            .field("usage", &self.usage)
            .finish_non_exhaustive()
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B, guard: Option<Guard>) -> Self {
        let kind = match guard {
            None => Kind::Inner { body },
            guard => Kind::Other {
                other: Box::pin(Other::Guarded { body, guard }),
            },
        };
        ResponseBody { kind }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        ResponseBody {
            kind: Kind::Other {
                other: Box::pin(Other::Full {
                    data: (!data.is_empty()).then_some(data),
                }),
            },
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Other { other } => match other.as_mut().project() {
                OtherProj::Guarded { body, guard } => {
                    let frame = body.poll_frame(cx);
                    // The end of the body, or its failure, ends the request.
                    if matches!(frame, Poll::Ready(None | Some(Err(_)))) {
                        guard.take();
                    }
                    frame
                }
                OtherProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Other { other } => match &**other {
                Other::Guarded { body, .. } => body.is_end_stream(),
                Other::Full { data } => data.is_none(),
            },
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Other { other } => match &**other {
                Other::Guarded { body, .. } => body.size_hint(),
                Other::Full { data } => {
                    SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
                }
            },
        }
    }
}

pin_project! {
    /// The body of a request that went through [`RateLimit`](crate::RateLimit),
    /// as the inner service gets it: the request's own body, streaming as it
    /// came, or, when a [`CostEstimator`](crate::CostEstimator) read it
    /// before the request was decided, the same bytes (and trailers) read
    /// into memory.
    ///
    /// Handlers of axum and tonic take any body, so they need no change; a
    /// `hyper` service function takes `Request<RequestBody<Incoming>>` (or is
    /// generic over the body).
    #[derive(Debug)]
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestKindProj]
    #[derive(Debug)]
    enum RequestKind<B> {
        Streaming { #[pin] body: B },
        // Boxed: every request through the layer is moved in this type, and
        // most are never read; a read body is already on the heap.
        Read { read: Box<ReadBody> },
    }
}

/// A request body read whole: its data, then its trailers.
#[derive(Debug)]
struct ReadBody {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl<B> RequestBody<B> {
    /// The request's own body, not read.
    pub fn streaming(body: B) -> Self {
        RequestBody {
            kind: RequestKind::Streaming { body },
        }
    }

    /// A body read whole: `data`, then `trailers` if any.
    pub fn read(data: Bytes, trailers: Option<http::HeaderMap>) -> Self {
        RequestBody {
            kind: RequestKind::Read {
                read: Box::new(ReadBody {
                    data: (!data.is_empty()).then_some(data),
                    trailers,
                }),
            },
        }
    }

    /// Whether the body was read into memory before the request was decided.
    pub fn is_read(&self) -> bool {
        matches!(self.kind, RequestKind::Read { .. })
    }

    /// The request's own body, when it was not read.
    pub fn into_streaming(self) -> Option<B> {
        match self.kind {
            RequestKind::Streaming { body } => Some(body),
            RequestKind::Read { .. } => None,
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            RequestKindProj::Streaming { body } => body.poll_frame(cx),
            RequestKindProj::Read { read } => Poll::Ready(match read.data.take() {
                Some(d) => Some(Ok(Frame::data(d))),
                None => read.trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Streaming { body } => body.is_end_stream(),
            RequestKind::Read { read } => read.data.is_none() && read.trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Streaming { body } => body.size_hint(),
            RequestKind::Read { read } => {
                SizeHint::with_exact(read.data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};

    use super::*;

    /// A response is moved whole through every service of a stack: the
    /// layer's body adds at most one pointer to the inner service's, and
    /// nothing to a boxed body's (axum's), so that the layer's response is as
    /// large as the bare service's, and moved as cheaply.
    #[test]
    fn the_response_body_adds_at_most_a_pointer() {
        fn at_most_a_pointer<B>() {
            assert!(
                size_of::<ResponseBody<B>>() <= size_of::<B>() + size_of::<usize>(),
                "{} bytes for a body of {}",
                size_of::<ResponseBody<B>>(),
                size_of::<B>(),
            );
        }
        at_most_a_pointer::<Full<Bytes>>();
        at_most_a_pointer::<Empty<Bytes>>();
        at_most_a_pointer::<String>();
        at_most_a_pointer::<axum::body::Body>();
        assert_eq!(
            size_of::<http::Response<ResponseBody<axum::body::Body>>>(),
            size_of::<http::Response<axum::body::Body>>()
        );
        assert_eq!(size_of::<Option<Guard>>(), 2 * size_of::<usize>());
    }

    /// A rejection's body and the inner service's, guarded or not, stream
    /// what they hold and end.
    #[tokio::test]
    async fn every_kind_of_response_body_streams_what_it_holds() {
        let full = ResponseBody::<Empty<Bytes>>::full(Bytes::from_static(b"denied"));
        assert_eq!(full.size_hint().exact(), Some(6));
        assert_eq!(full.collect().await.unwrap().to_bytes(), "denied");
        let empty = ResponseBody::<Empty<Bytes>>::full(Bytes::new());
        assert!(empty.is_end_stream());
        let inner = ResponseBody::inner(Full::new(Bytes::from_static(b"ok")), None);
        assert_eq!(inner.size_hint().exact(), Some(2));
        assert_eq!(inner.collect().await.unwrap().to_bytes(), "ok");
    }
}
