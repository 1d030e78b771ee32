//! Closing connections that have no request open: an HTTP/2 client can
//! keep a connection with no stream alive for ever (it answers the pings),
//! holding one of the gateway's places; HTTP/1's header timeout does not
//! reach it.
//!
//! Each connection counts the requests it has open, from when the service
//! is called until the response body is done with (sent, or dropped with a
//! stream the client reset), and when the last one ended.
//!
//! It also sees a client that stops reading: a response body hands the
//! server a piece, and the server asks for the next only once that piece is
//! written. A connection whose bodies have pieces handed out and none asked
//! for since a timeout is stalled on its client (a body waiting on the
//! model is not: it has been asked, and has nothing yet).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body::{Frame, SizeHint};
use tokio::time::Instant;

/// One connection's requests: how many are open, and when the last ended.
#[derive(Debug)]
pub(crate) struct Activity {
    open: AtomicUsize,
    /// Milliseconds from `start` to when the last request ended (or the
    /// connection began).
    last: AtomicU64,
    /// Bodies that handed the server a piece it has not yet written (it has
    /// not asked for the next).
    handed: AtomicUsize,
    /// Milliseconds from `start` to when the server last asked a body for a
    /// piece.
    asked: AtomicU64,
    start: Instant,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            open: AtomicUsize::new(0),
            last: AtomicU64::new(0),
            handed: AtomicUsize::new(0),
            asked: AtomicU64::new(0),
            start: Instant::now(),
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
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX).max(1);
        loop {
            // The time is read before the count: a request that ends in
            // between moves `last` past it, and is seen on the next turn.
            let now = self.millis();
            if self.open.load(Ordering::Acquire) > 0 {
                tokio::time::sleep(idle).await;
                continue;
            }
            let since = now.saturating_sub(self.last.load(Ordering::Acquire));
            if since >= idle_ms {
                return;
            }
            tokio::time::sleep(Duration::from_millis(idle_ms - since)).await;
        }
    }
}

impl Activity {
    /// Resolves once the connection has had a piece of a response waiting
    /// to be written, and nothing written, for `timeout`: its client stopped
    /// reading.
    pub(crate) async fn stalled_for(&self, timeout: Duration) {
        let timeout_ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        loop {
            let now = self.millis();
            if self.handed.load(Ordering::Acquire) == 0 {
                tokio::time::sleep(timeout).await;
                continue;
            }
            let since = now.saturating_sub(self.asked.load(Ordering::Acquire));
            if since >= timeout_ms {
                return;
            }
            tokio::time::sleep(Duration::from_millis(timeout_ms - since)).await;
        }
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

/// A response body that keeps its request open until it is done with, and
/// tells when the server takes its pieces.
pub(crate) struct Guarded {
    body: Body,
    open: Open,
    /// A piece was handed to the server and it has not asked for the next.
    handed: bool,
}

impl Guarded {
    pub(crate) fn body(body: Body, open: Open) -> Body {
        Body::new(Guarded {
            body,
            open,
            handed: false,
        })
    }

    fn taken(&mut self) {
        let activity = &self.open.0;
        activity.asked.store(activity.millis(), Ordering::Release);
        if self.handed {
            self.handed = false;
            activity.handed.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.taken();
    }
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        // Asked again: what was handed before is written.
        self.taken();
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            self.handed = true;
            self.open.0.handed.fetch_add(1, Ordering::AcqRel);
        }
        polled
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
    async fn a_connection_is_stalled_only_while_a_piece_waits_to_be_written() {
        use http_body_util::BodyExt;
        let a = Activity::new();
        let timeout = Duration::from_secs(5);
        let body = Guarded::body(Body::from("piece"), a.begin());
        let mut body = std::pin::pin!(body);
        // Nothing handed yet (a model thinking): not stalled.
        let waited = tokio::time::timeout(Duration::from_secs(60), a.stalled_for(timeout)).await;
        assert!(waited.is_err());
        // A piece handed and never followed by the next ask: stalled.
        let piece = body.frame().await.unwrap().unwrap();
        assert_eq!(piece.into_data().unwrap(), "piece");
        let before = Instant::now();
        a.stalled_for(timeout).await;
        assert_eq!(before.elapsed(), timeout);
        // Asked again (the piece was written): no longer.
        assert!(body.frame().await.is_none());
        let waited = tokio::time::timeout(Duration::from_secs(60), a.stalled_for(timeout)).await;
        assert!(waited.is_err());
    }
}
