//! Closing connections that have no request open: an HTTP/2 client can
//! keep a connection with no stream alive for ever (it answers the pings),
//! holding one of the gateway's places; HTTP/1's header timeout does not
//! reach it.
//!
//! Each connection counts the requests it has open, from when the service
//! is called until the response body is done with (sent, or dropped with a
//! stream the client reset), and when the last one ended.
//!
//! It also sees a client that stops reading: the connection's socket
//! ([`Watched`]) tells when a write waits because the client's window is
//! full, and when one goes through. A write that has waited a timeout
//! without any byte taken means the client stopped reading; a client that
//! reads slowly still takes bytes, and a body waiting on the model writes
//! nothing and waits on nothing.
//!
//! On HTTP/2 a client that stops reading blocks no write: it stops opening
//! the stream's flow-control window, and the server has nothing to send.
//! There the answers' bodies ([`Guarded`]) tell instead when a piece was
//! handed over and the next one not asked for, which is what a closed
//! window does (hyper asks for the next piece once the window has room for
//! more than it holds). No body asked for anything for a timeout while one
//! waits to be asked is a client that stopped reading. (A client that
//! reads, but opens its window only after it has read half of it, as h2
//! does, must read that half within the timeout.)

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

/// How often a state that does not hold yet is looked at again, at least.
const RECHECK: Duration = Duration::from_millis(50);

/// One connection's requests: how many are open, and when the last ended.
#[derive(Debug)]
pub(crate) struct Activity {
    open: AtomicUsize,
    /// Milliseconds from `start` to when the last request ended (or the
    /// connection began).
    last: AtomicU64,
    /// A write is waiting for the client to take bytes.
    blocked: AtomicBool,
    /// Milliseconds from `start` to when the write now waiting began to.
    blocked_since: AtomicU64,
    /// Milliseconds from `start` to when the last write that had waited
    /// went through.
    unblocked: AtomicU64,
    /// HTTP/2 answers that handed over a piece and were not yet asked for
    /// the next.
    handed: AtomicUsize,
    /// Milliseconds from `start` to when an HTTP/2 answer last handed over
    /// a piece or was asked for one.
    pulled: AtomicU64,
    start: Instant,
    /// The connection's place under the server's cap, given back when the
    /// last holder of this value is dropped: the connection, and every
    /// answer it began (HTTP/2 sends each from a task of its own, which
    /// may outlive the connection by a moment). A server that waits for
    /// every place waits for every answer, and so for what their ends give
    /// back to the store.
    _place: Option<OwnedSemaphorePermit>,
}

impl Activity {
    #[cfg(test)]
    pub(crate) fn new() -> Arc<Activity> {
        Activity::holding(None)
    }

    /// A new connection's activity, holding `place` until it and every
    /// request it began are gone.
    pub(crate) fn holding(place: Option<OwnedSemaphorePermit>) -> Arc<Activity> {
        Arc::new(Activity {
            open: AtomicUsize::new(0),
            last: AtomicU64::new(0),
            blocked: AtomicBool::new(false),
            blocked_since: AtomicU64::new(0),
            unblocked: AtomicU64::new(0),
            handed: AtomicUsize::new(0),
            pulled: AtomicU64::new(0),
            start: Instant::now(),
            _place: place,
        })
    }

    /// A request begins; it ends when the returned value is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> Open {
        self.open.fetch_add(1, Ordering::AcqRel);
        Open(Arc::clone(self))
    }

    fn millis(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Resolves once the connection has had no request open for `idle`.
    pub(crate) async fn idle_for(&self, idle: Duration) {
        self.held_for(idle, || {
            (self.open.load(Ordering::Acquire) == 0).then(|| self.last.load(Ordering::Acquire))
        })
        .await;
    }

    /// Resolves once the connection has had no request open and no write
    /// waiting for the client for `span`: what the client was sent has gone
    /// to the socket, and what is left is at most a head not yet whole.
    pub(crate) async fn quiet_for(&self, span: Duration) {
        self.held_for(span, || {
            let open = self.open.load(Ordering::Acquire) > 0;
            (!open && !self.blocked.load(Ordering::Acquire)).then(|| {
                let last = self.last.load(Ordering::Acquire);
                last.max(self.unblocked.load(Ordering::Acquire))
            })
        })
        .await;
    }

    /// Resolves once a write has waited `timeout` for the client to take a
    /// byte, or an HTTP/2 answer has waited `timeout` to be asked for its
    /// next piece with nothing asked meanwhile: the client stopped reading.
    pub(crate) async fn stalled_for(&self, timeout: Duration) {
        self.held_for(timeout, || {
            let write = self
                .blocked
                .load(Ordering::Acquire)
                .then(|| self.blocked_since.load(Ordering::Acquire));
            let pull = (self.handed.load(Ordering::Acquire) > 0)
                .then(|| self.pulled.load(Ordering::Acquire));
            write.into_iter().chain(pull).min()
        })
        .await;
    }

    /// An HTTP/2 answer was asked for its next piece (`handed: false`) or
    /// handed one over (`true`).
    fn pull(&self, handed: bool) {
        self.pulled.store(self.millis(), Ordering::Release);
        if handed {
            self.handed.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// An HTTP/2 answer that had handed over a piece is asked for the next,
    /// or dropped.
    fn taken(&self) {
        self.handed.fetch_sub(1, Ordering::AcqRel);
    }

    /// Resolves once a state has held for `span`: `since` tells when it
    /// began (milliseconds from `start`), or `None` while it does not hold.
    async fn held_for(&self, span: Duration, since: impl Fn() -> Option<u64>) {
        let span_ms = u64::try_from(span.as_millis()).unwrap_or(u64::MAX).max(1);
        loop {
            // The time is read before the state: a change in between moves
            // `since` past it, and is seen on the next turn.
            let now = self.millis();
            let Some(began) = since() else {
                // Looked at again after a while: a span of nothing would
                // wake the connection every tick.
                tokio::time::sleep(span.max(RECHECK)).await;
                continue;
            };
            let held = now.saturating_sub(began);
            if held >= span_ms {
                return;
            }
            tokio::time::sleep(Duration::from_millis(span_ms - held)).await;
        }
    }

    /// What a write on the socket came to: waiting (the client's window is
    /// full) or through.
    fn wrote<T>(&self, result: &Poll<std::io::Result<T>>) {
        match result {
            Poll::Pending => {
                if !self.blocked.load(Ordering::Acquire) {
                    self.blocked_since.store(self.millis(), Ordering::Release);
                    self.blocked.store(true, Ordering::Release);
                }
            }
            Poll::Ready(_) => {
                if self.blocked.load(Ordering::Acquire) {
                    self.unblocked.store(self.millis(), Ordering::Release);
                    self.blocked.store(false, Ordering::Release);
                }
            }
        }
    }
}

/// A connection's socket, telling its [`Activity`] when writes wait for
/// the client and when they go through.
#[derive(Debug)]
pub(crate) struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl Watched {
    pub(crate) fn new(stream: TcpStream, activity: Arc<Activity>) -> Watched {
        Watched { stream, activity }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.activity.wrote(&written);
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.activity.wrote(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// An open request of a connection's [`Activity`].
#[derive(Debug)]
pub(crate) struct Open(Arc<Activity>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.last.store(self.0.millis(), Ordering::Release);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request open until it is done with,
/// and on HTTP/2 tells its connection's [`Activity`] when it hands over a
/// piece and when it is asked for the next.
pub(crate) struct Guarded {
    body: Body,
    open: Open,
    http2: bool,
    /// A piece was handed over and the next not asked for yet.
    handed: bool,
}

impl Guarded {
    pub(crate) fn body(body: Body, open: Open, http2: bool) -> Body {
        Body::new(Guarded {
            body,
            open,
            http2,
            handed: false,
        })
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if self.handed {
            self.open.0.taken();
        }
    }
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if !self.http2 {
            return Pin::new(&mut self.body).poll_frame(cx);
        }
        if std::mem::take(&mut self.handed) {
            self.open.0.taken();
        }
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        let handed = matches!(&polled, Poll::Ready(Some(Ok(f))) if f.is_data());
        self.handed = handed;
        self.open.0.pull(handed);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body cut off once it has sent nothing for a timeout
/// (`--body-timeout`): its next frame is then an error, and its [`Stall`]
/// (in the request's extensions) says so, so that whatever was reading
/// the body (the layer for its estimate, an admin route, the upstream's
/// request) is answered 408 (see `answer_stalled` in `server`), costing
/// nothing.
///
/// It tells its size and its end as the body it wraps does. tower-http's
/// `TimeoutBody`, used here before, told neither: a `content-length` over
/// the layer's bound no longer reached the layer, which asked for the body
/// (on HTTP/1 sending `100 Continue`) and read a megabyte of it before
/// refusing it, instead of answering 413 at once.
pub(crate) struct IdleTimeoutBody<B> {
    body: B,
    timeout: Duration,
    /// Made when the body first waits; reset each time it waits anew.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// `sleep` runs: the body has sent nothing since it was (re)set.
    armed: bool,
    /// Told when the body is cut off.
    stall: Arc<Stall>,
}

impl<B> IdleTimeoutBody<B> {
    /// `body`, cut off after `timeout` without a frame (short enough to
    /// be added to the clock's time), telling `stall` when it is.
    pub(crate) fn new(body: B, timeout: Duration, stall: Arc<Stall>) -> IdleTimeoutBody<B> {
        IdleTimeoutBody {
            body,
            timeout,
            sleep: None,
            armed: false,
            stall,
        }
    }
}

/// Whether a request's body was cut off for sending nothing for the body
/// timeout: a request extension, shared with its [`IdleTimeoutBody`].
#[derive(Debug)]
pub(crate) struct Stall {
    stalled: AtomicBool,
    /// The body timeout, for the answer's message.
    pub(crate) timeout: Duration,
}

impl Stall {
    pub(crate) fn new(timeout: Duration) -> Arc<Stall> {
        Arc::new(Stall {
            stalled: AtomicBool::new(false),
            timeout,
        })
    }

    /// Whether the body was cut off.
    pub(crate) fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Acquire)
    }
}

/// What a request body that sent nothing for the body timeout fails with.
#[derive(Debug)]
pub(crate) struct BodyTimedOut;

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body sent nothing for the body timeout")
    }
}

impl std::error::Error for BodyTimedOut {}

impl<B> http_body::Body for IdleTimeoutBody<B>
where
    B: http_body::Body + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = B::Data;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, axum::BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            this.armed = false;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if !this.armed {
            let deadline = tokio::time::Instant::now() + this.timeout;
            match &mut this.sleep {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => this.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            this.armed = true;
        }
        match &mut this.sleep {
            Some(sleep) => {
                ready!(sleep.as_mut().poll(cx));
                this.stall.stalled.store(true, Ordering::Release);
                Poll::Ready(Some(Err(BodyTimedOut.into())))
            }
            None => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_with_no_request_open_for_the_whole_time() {
        let a = Activity::new();
        let idle = Duration::from_secs(10);
        let open = a.begin();
        // Open for a minute: never idle meanwhile.
        let waited = tokio::time::timeout(Duration::from_secs(60), a.idle_for(idle)).await;
        assert!(waited.is_err());
        drop(open);
        let before = Instant::now();
        a.idle_for(idle).await;
        assert_eq!(before.elapsed(), idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_stalled_only_while_one_write_waits_the_whole_time() {
        let a = Activity::new();
        let timeout = Duration::from_secs(5);
        let written: Poll<std::io::Result<usize>> = Poll::Ready(Ok(10));
        // Writes that go through, or none: never stalled.
        a.wrote(&written);
        let waited = tokio::time::timeout(Duration::from_secs(60), a.stalled_for(timeout)).await;
        assert!(waited.is_err());
        // A write waits; four seconds later one goes through (a slow
        // reader); then another waits for good.
        a.wrote(&Poll::<std::io::Result<usize>>::Pending);
        tokio::time::sleep(Duration::from_secs(4)).await;
        a.wrote(&written);
        a.wrote(&Poll::<std::io::Result<usize>>::Pending);
        let before = Instant::now();
        // Waiting again (the same wait): counted from when it began.
        a.wrote(&Poll::<std::io::Result<usize>>::Pending);
        a.stalled_for(timeout).await;
        assert_eq!(before.elapsed(), timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_answer_is_stalled_only_while_no_piece_is_asked_for_the_whole_time() {
        let a = Activity::new();
        let timeout = Duration::from_secs(5);
        // Asked and waiting on the model (nothing handed): never stalled.
        a.pull(false);
        let waited = tokio::time::timeout(Duration::from_secs(60), a.stalled_for(timeout)).await;
        assert!(waited.is_err());
        // A piece handed over; four seconds later the next is asked for (a
        // window opened) and handed; a second answer asks meanwhile.
        a.pull(true);
        tokio::time::sleep(Duration::from_secs(4)).await;
        a.taken();
        a.pull(true);
        tokio::time::sleep(Duration::from_secs(4)).await;
        a.pull(false);
        let before = Instant::now();
        // Counted from the last time anything was asked.
        a.stalled_for(timeout).await;
        assert_eq!(before.elapsed(), timeout);
        // Taken at last, and dropped: not stalled any more.
        a.taken();
        let waited = tokio::time::timeout(Duration::from_secs(60), a.stalled_for(timeout)).await;
        assert!(waited.is_err());
    }
}
