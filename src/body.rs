//! The response body: the inner service's body, or a rejection's.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::store::{Permit, Store};

pin_project! {
    /// The body of a response that went through [`RateLimit`](crate::RateLimit):
    /// the inner service's body when the request passed, the rejection's when
    /// it did not.
    ///
    /// When the request holds a place under its plan's concurrency cap, the
    /// body gives it back when it ends, fails, or is dropped (the client went
    /// away): a streamed answer holds its place to its last event.
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
        guard: Option<Guard>,
    }
}

/// Gives back a place under a concurrency cap when dropped.
pub(crate) struct Guard(Option<Box<dyn FnOnce() + Send + Sync>>);

impl Guard {
    pub(crate) fn new<S: Store>(store: &S, permit: Permit) -> Self {
        let store = store.clone();
        Guard(Some(Box::new(move || store.release(permit))))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(release) = self.0.take() {
            release();
        }
    }
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Guard(..)")
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Full { data: Option<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B, guard: Option<Guard>) -> Self {
        ResponseBody {
            kind: Kind::Inner { body },
            guard,
        }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        ResponseBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
            guard: None,
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
        let this = self.project();
        match this.kind.project() {
            KindProj::Inner { body } => {
                let frame = body.poll_frame(cx);
                // The end of the body, or its failure, ends the request.
                if matches!(frame, Poll::Ready(None | Some(Err(_)))) {
                    this.guard.take();
                }
                frame
            }
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
