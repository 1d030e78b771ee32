//! Reading a request's body for an estimator, bounded in bytes and in time,
//! and the answers when it cannot be read.

use crate::response::ResponseStyle;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use super::engine::BodyLimits;

pin_project! {
    /// A request body being read whole, for an estimator.
    pub(crate) struct Reading<B> {
        #[pin]
        body: B,
        // Made at the first poll, which runs inside the runtime.
        deadline: Option<Pin<Box<Sleep>>>,
        limits: BodyLimits,
        // Grown as bytes arrive, never from what `content-length` promises:
        // a client announcing a megabyte and sending nothing costs nothing.
        buf: BytesMut,
        // The first chunk alone, kept without a copy.
        first: Option<Bytes>,
        trailers: Option<HeaderMap>,
        // What every body being read may still hold (one permit a byte),
        // and this body's share of it, given back when the reading ends.
        memory: Arc<Semaphore>,
        held: Option<OwnedSemaphorePermit>,
    }
}

/// Why a body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unread {
    /// Longer than [`BodyLimits::max_bytes`] (or announced so): 413.
    TooLarge,
    /// Not finished within [`BodyLimits::timeout`]: 408.
    TimedOut,
    /// The body failed (the client reset the stream): 400.
    Failed,
    /// The bodies being read already hold
    /// [`BodyLimits::max_held`] bytes: 503.
    Busy,
}

impl<B> Reading<B> {
    pub(crate) fn new(body: B, limits: BodyLimits, memory: Arc<Semaphore>) -> Self {
        Reading {
            body,
            deadline: None,
            limits,
            buf: BytesMut::new(),
            first: None,
            trailers: None,
            memory,
            held: None,
        }
    }
}

impl<B> Reading<B>
where
    B: Body<Data = Bytes>,
{
    /// The body's bytes and trailers, once it has ended.
    pub(crate) fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(Bytes, Option<HeaderMap>), Unread>> {
        let mut this = self.project();
        if this.deadline.is_none() {
            // A body announced too long is refused before a byte is read.
            if this.body.size_hint().lower() > this.limits.max_bytes as u64 {
                return Poll::Ready(Err(Unread::TooLarge));
            }
            *this.deadline = Some(Box::pin(tokio::time::sleep(this.limits.timeout)));
        }
        loop {
            let frame = match this.body.as_mut().poll_frame(cx) {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    if let Some(deadline) = this.deadline.as_mut() {
                        ready!(deadline.as_mut().poll(cx));
                    }
                    return Poll::Ready(Err(Unread::TimedOut));
                }
            };
            let frame = match frame {
                None => break,
                Some(Err(_)) => return Poll::Ready(Err(Unread::Failed)),
                Some(Ok(frame)) => frame,
            };
            match frame.into_data() {
                Ok(data) => {
                    let held = this.buf.len() + this.first.as_ref().map_or(0, Bytes::len);
                    if held + data.len() > this.limits.max_bytes {
                        return Poll::Ready(Err(Unread::TooLarge));
                    }
                    if data.is_empty() {
                        continue;
                    }
                    // Taken before the bytes are kept, never waited for: a
                    // request that would wait holds its piece meanwhile.
                    let taken = u32::try_from(data.len())
                        .ok()
                        .and_then(|n| Arc::clone(this.memory).try_acquire_many_owned(n).ok());
                    match (taken, this.held.as_mut()) {
                        (None, _) => return Poll::Ready(Err(Unread::Busy)),
                        (Some(taken), Some(held)) => held.merge(taken),
                        (Some(taken), None) => *this.held = Some(taken),
                    }
                    if held == 0 {
                        *this.first = Some(data);
                    } else {
                        if let Some(first) = this.first.take() {
                            this.buf.extend_from_slice(&first);
                        }
                        this.buf.extend_from_slice(&data);
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        match this.trailers {
                            Some(t) => t.extend(trailers),
                            None => *this.trailers = Some(trailers),
                        }
                    }
                }
            }
        }
        let data = match this.first.take() {
            Some(first) => first,
            None => std::mem::take(this.buf).freeze(),
        };
        Poll::Ready(Ok((data, this.trailers.take())))
    }
}

/// The answer to a request whose body could not be read or estimated, in
/// the layer's style: OpenAI's
/// `{"error":{"message":…,"type":"invalid_request_error","param":null,"code":…}}`,
/// or AWS API Gateway's `{"message":…}`.
pub(crate) fn refuse_body(
    style: ResponseStyle,
    status: StatusCode,
    message: &str,
    code: &str,
) -> Response<Bytes> {
    let mut body = String::with_capacity(message.len() + 96);
    match style {
        ResponseStyle::OpenAi => {
            body.push_str(r#"{"error":{"message":""#);
            escape_into(&mut body, message);
            // OpenAI's SDKs tell the server's failures from the client's
            // mistakes by `type`.
            body.push_str(if status.is_server_error() {
                r#"","type":"server_error","param":null,"code":""#
            } else {
                r#"","type":"invalid_request_error","param":null,"code":""#
            });
            escape_into(&mut body, code);
            body.push_str(r#""}}"#);
        }
        // AWS API Gateway's shape, as the style's other rejections.
        _ => {
            body.push_str(r#"{"message":""#);
            escape_into(&mut body, message);
            body.push_str(r#""}"#);
        }
    }
    let mut res = Response::new(Bytes::from(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // The rest of an unread body is not worth waiting for.
    if status != StatusCode::BAD_REQUEST {
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}

/// The answer for a body that could not be read.
pub(crate) fn refuse_unread(
    style: ResponseStyle,
    why: Unread,
    limits: BodyLimits,
) -> Response<Bytes> {
    match why {
        Unread::TooLarge => refuse_body(
            style,
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the request body is larger than {} bytes", limits.max_bytes),
            "request_too_large",
        ),
        Unread::TimedOut => refuse_body(
            style,
            StatusCode::REQUEST_TIMEOUT,
            &format!(
                "the request body did not arrive within {} ms",
                limits.timeout.as_millis()
            ),
            "request_timeout",
        ),
        Unread::Failed => refuse_body(
            style,
            StatusCode::BAD_REQUEST,
            "the request body could not be read",
            "invalid_body",
        ),
        Unread::Busy => {
            let mut res = refuse_body(
                style,
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is reading too many request bodies at once; retry shortly",
                "server_busy",
            );
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            res
        }
    }
}

/// Appends `s` as the inside of a JSON string.
fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_escaped_as_json() {
        let res = refuse_body(
            ResponseStyle::OpenAi,
            StatusCode::BAD_REQUEST,
            "a \"b\"\\\n\u{1}",
            "c",
        );
        assert_eq!(
            res.body().as_ref(),
            br#"{"error":{"message":"a \"b\"\\\n\u0001","type":"invalid_request_error","param":null,"code":"c"}}"#
        );
        assert_eq!(res.headers()[header::CONTENT_TYPE], "application/json");
    }

    type Frames = std::vec::IntoIter<Result<http_body::Frame<Bytes>, std::io::Error>>;

    /// A body of two pieces, each of `piece` bytes.
    fn two_pieces(piece: usize) -> http_body_util::StreamBody<tokio_stream::Iter<Frames>> {
        let frames = vec![
            Ok(http_body::Frame::data(Bytes::from(vec![b' '; piece]))),
            Ok(http_body::Frame::data(Bytes::from(vec![b' '; piece]))),
        ];
        http_body_util::StreamBody::new(tokio_stream::iter(frames))
    }

    /// The bodies being read hold at most `max_held` bytes together: a piece
    /// past it is refused (503), and what a body held is given back when its
    /// reading ends, whichever way.
    #[tokio::test]
    async fn the_bodies_being_read_hold_at_most_max_held_together() {
        let limits = BodyLimits {
            max_held: 10,
            ..BodyLimits::default()
        };
        let memory = Arc::new(Semaphore::new(limits.max_held));
        let read = |piece| {
            let mut reading =
                Box::pin(Reading::new(two_pieces(piece), limits, Arc::clone(&memory)));
            async move { std::future::poll_fn(|cx| reading.as_mut().poll_read(cx)).await }
        };
        // 12 bytes in all: the second piece finds 4 left.
        assert_eq!(read(6).await.unwrap_err(), Unread::Busy);
        assert_eq!(memory.available_permits(), 10);
        let (data, _) = read(5).await.unwrap();
        assert_eq!(data.len(), 10);
        assert_eq!(memory.available_permits(), 10);
        let res = refuse_unread(ResponseStyle::OpenAi, Unread::Busy, limits);
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[header::RETRY_AFTER], "1");
        assert!(
            std::str::from_utf8(res.body())
                .unwrap()
                .contains(r#""type":"server_error""#)
        );
    }
}
