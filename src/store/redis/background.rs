//! Calls a store sends in the background (token settlements, lease releases,
//! stage refunds): running them, counting them, and waiting for them to end.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::store::{Inner, RedisStore};

/// Counts the calls a store sends in the background.
#[derive(Default)]
pub(super) struct Background {
    running: AtomicUsize,
    idle: tokio::sync::Notify,
    /// The runtime the store was built on, for work started outside any
    /// runtime: a response body dropped on a plain thread still gives its
    /// place back and settles its tokens. (A connection the application
    /// made on another runtime is still driven by that one: both must be
    /// running.)
    home: Option<tokio::runtime::Handle>,
}

impl Background {
    /// Background calls run on the current runtime, or else on `home`.
    pub(super) fn new(home: Option<tokio::runtime::Handle>) -> Self {
        Background {
            home,
            ..Background::default()
        }
    }
}

/// Counts one background call as finished when dropped: when it completes,
/// and when its task is cancelled (the runtime shuts down) too.
struct Running(Arc<Inner>);

impl Drop for Running {
    fn drop(&mut self) {
        let background = &self.0.background;
        if background.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            background.idle.notify_waiters();
        }
    }
}

impl Background {
    /// The runtime the store was built on, if any.
    pub(super) fn home(&self) -> Option<tokio::runtime::Handle> {
        self.home.clone()
    }
}

impl RedisStore {
    /// Gives back every borrowed share, then waits until no call this store
    /// sends in the background is running: token settlements, releases of
    /// places under concurrency caps, returned shares, and (on Redis
    /// Cluster) stage refunds, which responses and decisions start without
    /// waiting for them. (A store whose last handle is dropped gives its
    /// shares back too, in a task nobody waits for.)
    ///
    /// Await it before the process exits, after the server has stopped
    /// (axum's graceful shutdown returns once every response has ended), so
    /// that the last responses' tokens are settled in Redis rather than lost
    /// with the runtime. Each call is bounded by the store's
    /// [timeout](crate::RedisStoreBuilder::timeout), so this returns within about
    /// that long once no new calls start; a call that fails leaves what it
    /// would have changed as it was (the estimate stands, the place lapses
    /// with its lease). Settlements and places given back that wait for an
    /// unreachable Redis to answer again are not waited for: they are sent
    /// again while the runtime runs.
    ///
    /// ```no_run
    /// use tollgate::{Policy, RateLimitLayer, RedisStore, Throttle, UsagePlan};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = RedisStore::builder("redis://127.0.0.1:6379/").build().await?;
    /// let policy = Policy::per_key(UsagePlan::new("p").throttle(Throttle::new(10.0, 20)?))?;
    /// let app = axum::Router::new()
    ///     .route("/", axum::routing::get(|| async { "ok" }))
    ///     .layer(RateLimitLayer::builder(policy).store(store.clone()).build());
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    /// axum::serve(listener, app)
    ///     .with_graceful_shutdown(async { tokio::signal::ctrl_c().await.unwrap_or(()) })
    ///     .await?;
    /// // Every response has ended; their settlements may still be on their way.
    /// store.drained().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn drained(&self) {
        // Borrowed shares go back first: they are calls in the background too.
        for share in self.inner.flights.sweep(0, true, u64::MAX) {
            self.inner.give_back(share);
        }
        let background = &self.inner.background;
        loop {
            let idle = background.idle.notified();
            let mut idle = std::pin::pin!(idle);
            // Registered before the count is read: a call that finishes in
            // between still wakes this one.
            idle.as_mut().enable();
            if background.running.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Inner {
    /// Sleeps `pause` inside a background call, not counted as running
    /// meanwhile: [`RedisStore::drained`] waits for calls, not for the
    /// pauses between a call's tries.
    pub(super) async fn pause(&self, pause: std::time::Duration) {
        self.paused(tokio::time::sleep(pause)).await;
    }

    /// Awaits `wait` inside a background call, not counted as running
    /// meanwhile (see [`pause`](Self::pause)).
    pub(super) async fn paused<T>(&self, wait: impl Future<Output = T>) -> T {
        /// Counts the call as running again when the pause ends, or when
        /// the task is dropped during it (its `Running` then ends it).
        struct Resume<'a>(&'a Background);

        impl Drop for Resume<'_> {
            fn drop(&mut self) {
                self.0.running.fetch_add(1, Ordering::AcqRel);
            }
        }

        let background = &self.background;
        if background.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            background.idle.notify_waiters();
        }
        let _resume = Resume(background);
        wait.await
    }

    /// Runs `work` in a task of its own, counted until it ends (see
    /// [`RedisStore::drained`]): on the current Tokio runtime, or, called
    /// outside any (a response body dropped on a plain thread), on the one
    /// the store was built on. A runtime shut down meanwhile drops the task
    /// (what it would have given back lapses with its lease, as when the
    /// process ends).
    pub(super) fn spawn(self: &Arc<Self>, work: impl Future<Output = ()> + Send + 'static) {
        let rt = match tokio::runtime::Handle::try_current() {
            Ok(rt) => rt,
            Err(_) => match &self.background.home {
                Some(home) => home.clone(),
                None => {
                    tracing::debug!("no Tokio runtime to run a background call on; not sent");
                    return;
                }
            },
        };
        self.background.running.fetch_add(1, Ordering::AcqRel);
        let running = Running(Arc::clone(self));
        rt.spawn(async move {
            let _running = running;
            work.await;
        });
    }
}
