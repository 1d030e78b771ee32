//! The connection to Redis: one type over a single server's and a cluster's,
//! plain commands within the timeout, and errors that name no keys.

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, RedisError, RedisFuture, ServerErrorKind, Value};
use tokio::time::Instant;

use super::store::Inner;
use crate::store::{FailureKind, StoreError};

/// The longest pause before a call Redis Cluster answered `TRYAGAIN` is sent
/// again (the pauses start at 1 ms and double).
pub(super) const TRY_AGAIN_PAUSE: Duration = Duration::from_millis(16);

#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Whether a call failed because its connection is gone (reset, closed,
/// refused while reconnecting after a restart): redis-rs has begun making a
/// new one, and a call sent now goes on it. A timeout is not: the call may
/// still be running, and the time is spent anyway.
pub(super) fn connection_lost(e: &RedisError) -> bool {
    e.is_io_error() && !e.is_timeout()
}

/// Whether Redis certainly did not run a call that failed with `e`: the
/// connection was refused (it never reached Redis), or Redis refused the
/// call before running it (a script is declared a write, so a replica
/// answers `READONLY` and Redis out of memory `OOM` before it runs; and
/// `LOADING`, `BUSY`, `MASTERDOWN`, a Cluster's redirections and
/// `CLUSTERDOWN`, `TRYAGAIN`, `NOSCRIPT` run nothing). A call that timed
/// out, or whose connection dropped after it was sent, may have run.
pub(super) fn unrun(e: &RedisError) -> bool {
    e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::ReadOnly
                    | ServerErrorKind::BusyLoading
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::Moved
                    | ServerErrorKind::Ask
                    | ServerErrorKind::NoScript
            )
        )
        || matches!(e.code(), Some("OOM" | "BUSY"))
}

/// A store error from a Redis error, without the command (which names keys).
pub(super) fn redis_error(e: &RedisError) -> StoreError {
    let error = StoreError::new(format!("redis: {}", e.kind_name())).with_kind(failure_kind(e));
    // The connection's own timeout (the store's, for a reply): a timeout as
    // the store's `within` is.
    if e.is_timeout() {
        error.timed_out()
    } else {
        error
    }
}

/// What kind of failure a Redis error is: Redis (or the Cluster node that
/// serves the slot) not reached or not serving, or an error Redis answered.
fn failure_kind(e: &RedisError) -> FailureKind {
    match e.kind() {
        ErrorKind::Io
        | ErrorKind::ClusterConnectionNotFound
        | ErrorKind::Server(
            ServerErrorKind::ClusterDown
            | ServerErrorKind::TryAgain
            | ServerErrorKind::MasterDown
            | ServerErrorKind::BusyLoading
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask,
        ) => FailureKind::Unreachable,
        _ if e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() => {
            FailureKind::Unreachable
        }
        _ if e.code().is_some() => FailureKind::Refused,
        _ => FailureKind::Other,
    }
}

trait KindName {
    fn kind_name(&self) -> String;
}

impl KindName for RedisError {
    fn kind_name(&self) -> String {
        // The error's description carries no key names or values; the detail
        // of a server error is the script's own message.
        match (self.code(), self.detail()) {
            (Some(code), Some(detail)) => format!("{code} {detail}"),
            _ => self.to_string(),
        }
    }
}

impl Inner {
    /// `work` within the timeout: however many round trips it takes and
    /// whatever Redis does, it answers by then.
    pub(super) async fn within<T>(
        &self,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.within_since(Instant::now(), work).await
    }

    /// `work` within what remains of the timeout begun at `started`: a
    /// decision of several calls bounds each by it, so that it answers by
    /// the timeout's end and knows which call the timeout cut (see
    /// `decide_split`).
    pub(super) async fn within_since<T>(
        &self,
        started: Instant,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let left = self.timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, work).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::timeout(self.timeout)),
        }
    }

    /// Runs a plain command within the timeout. The commands sent this way
    /// (`HGETALL`, `DEL`, `ZREM`) do the same when run twice, so one whose
    /// connection was lost is sent once more, on the new connection, as
    /// [`Inner::run`] does with the calls that can be.
    pub(super) async fn command<T: redis::FromRedisValue>(
        &self,
        cmd: Cmd,
    ) -> Result<T, StoreError> {
        self.within(async {
            let mut lost = false;
            let mut pause = Duration::from_millis(1);
            loop {
                let mut conn = self.conn.clone();
                match cmd.query_async(&mut conn).await {
                    // Run nowhere while its keys' slot migrates (see
                    // `Inner::run`): sent again after a short pause.
                    Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::TryAgain) => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(TRY_AGAIN_PAUSE);
                    }
                    Err(e) if connection_lost(&e) && !lost => lost = true,
                    reply => return reply.map_err(|e| redis_error(&e)),
                }
            }
        })
        .await
    }
}
