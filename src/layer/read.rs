//! Reading a request's body for an estimator, bounded in bytes and in time,
//! and the answers when it cannot be read.

use crate::response::{ResponseStyle, X_SHOULD_RETRY};
use crate::sync::Mutex;
use std::collections::HashMap;
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
        held: Option<OwnedSemaphorePermit>,
        // What this body holds of its caller's share.
        share: Share,
    }
}

/// What the bodies being read for estimates hold: in all (one permit a
/// byte), and by caller, so that one caller's slow bodies cannot take the
/// room of everyone else's.
#[derive(Debug)]
pub(crate) struct BodyMemory {
    total: Arc<Semaphore>,
    per_caller: usize,
    /// The bytes held by each caller with a body being read; a caller
    /// leaves when it holds nothing, so this holds at most one entry per
    /// body being read.
    callers: Mutex<HashMap<u64, usize>>,
}

impl BodyMemory {
    pub(crate) fn new(limits: &BodyLimits) -> Self {
        BodyMemory {
            total: Arc::new(Semaphore::new(limits.max_held.min(Semaphore::MAX_PERMITS))),
            per_caller: limits.per_caller(),
            callers: Mutex::new(HashMap::new()),
        }
    }

    /// Takes `n` bytes of `caller`'s share; `false` when it would hold more
    /// than its share.
    fn take(&self, caller: u64, n: usize) -> bool {
        let mut callers = self.callers.lock();
        let held = callers.entry(caller).or_insert(0);
        if held.saturating_add(n) > self.per_caller {
            if *held == 0 {
                callers.remove(&caller);
            }
            return false;
        }
        *held += n;
        true
    }

    /// Gives back `n` bytes `caller` held.
    fn give(&self, caller: u64, n: usize) {
        if n == 0 {
            return;
        }
        let mut callers = self.callers.lock();
        if let Some(held) = callers.get_mut(&caller) {
            *held = held.saturating_sub(n);
            if *held == 0 {
                callers.remove(&caller);
            }
        }
    }

    /// How many bytes the bodies being read may still take in all.
    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.total.available_permits()
    }

    /// How many callers hold a part of a body being read.
    #[cfg(test)]
    pub(crate) fn callers(&self) -> usize {
        self.callers.lock().len()
    }
}

/// One body's part of its caller's share, given back when the body is
/// dropped (read, refused or abandoned).
#[derive(Debug)]
struct Share {
    memory: Arc<BodyMemory>,
    caller: u64,
    bytes: usize,
}

impl Drop for Share {
    fn drop(&mut self) {
        self.memory.give(self.caller, self.bytes);
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
    /// The bodies being read already hold [`BodyLimits::max_held`]
    /// bytes, or the caller's bodies its share of them: 503.
    Busy,
}

impl<B> Reading<B> {
    /// A body of `caller` (the low half of its key's or client's state
    /// digest) to be read within `limits`, holding its bytes in `memory`.
    pub(crate) fn new(body: B, limits: BodyLimits, memory: Arc<BodyMemory>, caller: u64) -> Self {
        Reading {
            body,
            deadline: None,
            limits,
            buf: BytesMut::new(),
            first: None,
            trailers: None,
            held: None,
            share: Share {
                memory,
                caller,
                bytes: 0,
            },
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
                    // The caller's share first: a caller past it takes
                    // nothing from the others' room.
                    let share = &mut *this.share;
                    if !share.memory.take(share.caller, data.len()) {
                        return Poll::Ready(Err(Unread::Busy));
                    }
                    share.bytes += data.len();
                    let taken = u32::try_from(data.len()).ok().and_then(|n| {
                        Arc::clone(&share.memory.total)
                            .try_acquire_many_owned(n)
                            .ok()
                    });
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
    // The layer's own failure: no retry of the request passes, and
    // OpenAI's SDKs retry a 500 unless told not to.
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        res.headers_mut()
            .insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
    }
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

    /// The layer's own failure (a 500, which OpenAI's SDKs retry) says
    /// `x-should-retry: false`; a server busy reading bodies (503,
    /// `retry-after: 1`) is worth the retry and says nothing of it.
    #[test]
    fn a_500_says_do_not_retry_and_a_busy_503_does_not() {
        for style in [ResponseStyle::Aws, ResponseStyle::OpenAi] {
            let res = refuse_body(
                style,
                StatusCode::INTERNAL_SERVER_ERROR,
                "the request body was asked for twice",
                "internal_error",
            );
            assert_eq!(res.headers()["x-should-retry"], "false");
            let res = refuse_unread(style, Unread::Busy, BodyLimits::default());
            assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert!(res.headers().get("x-should-retry").is_none());
        }
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
        let memory = Arc::new(BodyMemory::new(&limits));
        let read = |piece, caller: u64| {
            let mut reading = Box::pin(Reading::new(
                two_pieces(piece),
                limits,
                Arc::clone(&memory),
                caller,
            ));
            async move { std::future::poll_fn(|cx| reading.as_mut().poll_read(cx)).await }
        };
        // 12 bytes in all: the second piece finds 4 left.
        assert_eq!(read(6, 1).await.unwrap_err(), Unread::Busy);
        assert_eq!(memory.available(), 10);
        assert_eq!(memory.callers(), 0);
        let (data, _) = read(5, 1).await.unwrap();
        assert_eq!(data.len(), 10);
        assert_eq!(memory.available(), 10);
        assert_eq!(memory.callers(), 0);
        let res = refuse_unread(ResponseStyle::OpenAi, Unread::Busy, limits);
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[header::RETRY_AFTER], "1");
        assert!(
            std::str::from_utf8(res.body())
                .unwrap()
                .contains(r#""type":"server_error""#)
        );
    }

    /// One caller's bodies being read hold at most its share of the memory
    /// for bodies: the rest stays for everyone else, and the share is given
    /// back when its bodies are dropped unread.
    #[tokio::test]
    async fn one_callers_bodies_hold_at_most_its_share() {
        let limits = BodyLimits {
            max_bytes: 8,
            max_held: 64,
            ..BodyLimits::default()
        };
        // A sixteenth of 64 is 4, less than one whole body: the share is 8.
        assert_eq!(limits.per_caller(), 8);
        let memory = Arc::new(BodyMemory::new(&limits));
        let (slow, other) = (7, 8);
        let stalled = |piece| {
            // One piece, then nothing: the body holds its piece.
            use tokio_stream::StreamExt as _;
            let frames: Frames =
                vec![Ok(http_body::Frame::data(Bytes::from(vec![b' '; piece])))].into_iter();
            let body = http_body_util::StreamBody::new(
                tokio_stream::iter(frames).chain(tokio_stream::pending()),
            );
            Box::pin(Reading::new(body, limits, Arc::clone(&memory), slow))
        };
        let poll_once = |r: &mut Pin<Box<Reading<_>>>| {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            r.as_mut().poll_read(&mut cx).is_pending()
        };
        let mut first = stalled(5);
        let mut second = stalled(5);
        assert!(poll_once(&mut first));
        assert!(!poll_once(&mut second), "past the caller's share");
        assert_eq!(memory.available(), 64 - 5);
        // Another caller's body is read whole meanwhile.
        let mut reading = Box::pin(Reading::new(
            two_pieces(4),
            limits,
            Arc::clone(&memory),
            other,
        ));
        let (data, _) = std::future::poll_fn(|cx| reading.as_mut().poll_read(cx))
            .await
            .unwrap();
        assert_eq!(data.len(), 8);
        drop(reading);
        drop(second);
        drop(first);
        assert_eq!(memory.available(), 64);
        assert_eq!(memory.callers(), 0);
    }
}
