use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::Response;
use pin_project_lite::pin_project;

use crate::body::ResponseBody;
use crate::response::HeaderStyle;
use crate::store::Report;

pin_project! {
    /// The future of [`RateLimit`](crate::RateLimit): the inner service's
    /// response with rate-limit headers added, or a ready rejection.
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called { #[pin] fut: F, report: Report, headers: HeaderStyle },
        Rejected { response: Option<Response<Bytes>> },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn called(fut: F, report: Report, headers: HeaderStyle) -> Self {
        ResponseFuture {
            state: State::Called {
                fut,
                report,
                headers,
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
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called {
                fut,
                report,
                headers,
            } => {
                let mut res = ready!(fut.poll(cx))?;
                headers.write(report, res.headers_mut());
                Poll::Ready(Ok(res.map(ResponseBody::inner)))
            }
            StateProj::Rejected { response } => {
                let res = response
                    .take()
                    .expect("ResponseFuture polled after completion");
                Poll::Ready(Ok(res.map(ResponseBody::full)))
            }
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "Called",
            State::Rejected { .. } => "Rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
