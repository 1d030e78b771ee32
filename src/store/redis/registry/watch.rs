//! Following the registry's log: every change made through any instance,
//! delivered to this one in version order, each once.
//!
//! The watcher reads the log with `XRANGE` every [`POLL`] on the store's own
//! connection, starting at the entry it read last. Polling rather than a
//! blocking `XREAD`: a blocking read needs a connection of its own, which a
//! store built on a caller's connection or cluster connection cannot make,
//! and would hold up every decision sent behind it on a shared one; a poll
//! is one small command, answered at once, and five of them a second bound
//! the delay well within the second a change may take to arrive. When the
//! log cannot continue from where the watcher is (the entry it read last is
//! gone: trimmed, or Redis restarted empty or failed over; a version is
//! missing or went back), the watcher reads the whole registry again and
//! delivers it as [`RegistryUpdate::Reload`]. A read that fails (Redis did
//! not answer, or not in time) leaves the watcher where it was: the log
//! itself tells, on the next read, whether it still goes on from there, and
//! reading the whole of a large registry again takes longer than the second
//! a change may take, with no change arriving meanwhile.
//!
//! The watcher keeps the registry as it last read it from Redis. When Redis
//! holds no registry at all (no version: it restarted empty, or was
//! flushed) while this instance holds one, the instance writes it back
//! before it reads everything again, so that it keeps serving its keys and
//! every instance, a new one included, loads them again; one instance
//! writes back, the others wait for it (see [`Inner::registry_restore`]).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::codec::Logged;
use super::{Change, Cursor, RegistryUpdate, Restore, State};
use crate::store::StoreError;
use crate::store::redis::store::{Inner, RedisStore};

/// How often the log is read.
pub(super) const POLL: Duration = Duration::from_millis(200);

/// Where a watcher is.
#[derive(Debug)]
pub(super) enum Position {
    /// Told to start after this version, not yet read.
    Start(u64),
    At(Cursor),
    /// Lost (the log cannot continue from where the watcher was, or a full
    /// read failed): read everything.
    Lost,
}

impl RedisStore {
    /// Delivers to `on`, in a Tokio task, every change made to the registry
    /// after `from_version` (the version [`registry_load`](Self::registry_load)
    /// returned), within about [`POLL`] of its write; a full
    /// [`RegistryUpdate::Reload`] instead when changes may have been missed.
    /// `on` is called from one task, one update at a time, and should not
    /// block. The task ends when the last clone of the store is dropped.
    /// Outside a Tokio runtime, nothing is watched. `loaded` is the registry
    /// as of `from_version`: what the instance writes back should Redis
    /// lose the registry before the watcher has read it again.
    pub(crate) fn registry_watch(
        &self,
        on: Arc<dyn Fn(RegistryUpdate) + Send + Sync>,
        from_version: u64,
        loaded: &[Change],
    ) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("the key registry is not watched: no Tokio runtime");
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        let mut held = Held {
            state: State::default(),
            version: from_version,
        };
        loaded.iter().for_each(|c| held.state.apply(c.clone()));
        rt.spawn(watch(weak, on, held));
    }
}

/// The registry as the watcher last read it from Redis, and its version.
#[derive(Debug)]
pub(super) struct Held {
    state: State,
    version: u64,
}

impl Held {
    /// Nothing held yet, at `version`.
    #[cfg(test)]
    pub(super) fn at(version: u64) -> Self {
        Held {
            state: State::default(),
            version,
        }
    }
}

/// The watcher's loop: holds the store only while it reads.
async fn watch(weak: Weak<Inner>, on: Arc<dyn Fn(RegistryUpdate) + Send + Sync>, mut held: Held) {
    let mut position = Position::Start(held.version);
    loop {
        let Some(inner) = weak.upgrade() else {
            return;
        };
        position = inner.registry_step(position, &mut held, &*on).await;
        drop(inner);
        tokio::time::sleep(POLL).await;
    }
}

impl Inner {
    /// One read of the log from `position`: delivers what it finds, and
    /// returns where the watcher is then: where it was, when a read failed.
    pub(super) async fn registry_step(
        &self,
        position: Position,
        held: &mut Held,
        on: &(dyn Fn(RegistryUpdate) + Send + Sync),
    ) -> Position {
        match self.registry_try(position, held, on).await {
            Ok(position) => {
                if !matches!(position, Position::Lost)
                    && self.registry_failing.swap(false, Ordering::AcqRel)
                {
                    tracing::info!("the key registry is read again");
                }
                position
            }
            Err((kept, e)) => self.lost(&e, kept),
        }
    }

    /// [`registry_step`](Self::registry_step), with a failed read's error
    /// and the position to keep: the one it started from, unless it had to
    /// read the whole registry.
    async fn registry_try(
        &self,
        position: Position,
        held: &mut Held,
        on: &(dyn Fn(RegistryUpdate) + Send + Sync),
    ) -> Result<Position, (Position, StoreError)> {
        let mut cursor = match position {
            Position::At(cursor) => cursor,
            Position::Start(version) => match self.registry_head().await {
                // Started behind: the log goes on from the version given.
                Ok(head) if head.version > version => Cursor {
                    version,
                    last: None,
                },
                Ok(head) if head.version == version => head.cursor(),
                // Behind the version given: Redis lost changes.
                Ok(_) => return self.registry_reload(held, on).await,
                Err(e) => return Err((Position::Start(version), e)),
            },
            Position::Lost => return self.registry_reload(held, on).await,
        };
        // Read from a copy: a read that fails after some pages delivers
        // none of them, and the next goes on from here again.
        let from = cursor.clone();
        match self.registry_read(&mut cursor).await {
            Ok(Some(entries)) => {
                for e in entries {
                    match e.logged {
                        Logged::Change(change) => {
                            held.state.apply(change.clone());
                            held.version = e.version;
                            on(RegistryUpdate::Change {
                                version: e.version,
                                change,
                            });
                        }
                        Logged::Reload => return self.registry_reload(held, on).await,
                    }
                }
                Ok(Position::At(cursor))
            }
            Ok(None) => {
                tracing::info!("the key registry's log has a gap; reading it all again");
                self.registry_reload(held, on).await
            }
            Err(e) => Err((Position::At(from), e)),
        }
    }

    /// Reads the whole registry and delivers it; first writes back the
    /// registry this instance holds when Redis holds none (it lost it), or
    /// waits while another instance writes it back.
    async fn registry_reload(
        &self,
        held: &mut Held,
        on: &(dyn Fn(RegistryUpdate) + Send + Sync),
    ) -> Result<Position, (Position, StoreError)> {
        if held.version > 0 && !held.state.is_empty() {
            match self.registry_restore(&held.state, held.version).await {
                Ok(Restore::Present) => {}
                Ok(Restore::Busy) => {
                    // Another instance writes it back (or imports): this one
                    // keeps serving what it holds and looks again next poll.
                    tracing::debug!("the key registry is being written back to Redis; waiting");
                    return Ok(Position::Lost);
                }
                Ok(Restore::Written(version)) => tracing::warn!(
                    keys = held.state.keys.len(),
                    plans = held.state.plans.len(),
                    accounts = held.state.accounts.len(),
                    removed = held.state.removed.len(),
                    version,
                    "Redis held no key registry (restarted empty, or flushed): \
                     the registry this instance holds was written back"
                ),
                Err(super::RegistryError::Store(e)) => return Err((Position::Lost, e)),
                Err(e) => tracing::warn!(
                    error = %e,
                    "Redis holds no key registry, and the one this instance holds \
                     could not be written back: reading what Redis holds"
                ),
            }
        }
        match self.registry_snapshot().await {
            Ok(snapshot) => {
                held.state = snapshot.state.clone();
                held.version = snapshot.cursor.version;
                on(RegistryUpdate::Reload {
                    version: snapshot.cursor.version,
                    all: snapshot.state.into_changes(),
                });
                Ok(Position::At(snapshot.cursor))
            }
            Err(e) => Err((Position::Lost, e)),
        }
    }

    /// A read failed: logged when reads start failing (Redis is down), not
    /// on each of those that follow every [`POLL`] until one succeeds.
    /// Returns `kept`, where the next read starts.
    fn lost(&self, e: &StoreError, kept: Position) -> Position {
        if self.registry_failing.swap(true, Ordering::AcqRel) {
            tracing::debug!(error = %e, "the key registry could not be read");
        } else {
            tracing::warn!(
                error = %e,
                "the key registry could not be read; it will be read again when Redis answers"
            );
        }
        kept
    }
}
