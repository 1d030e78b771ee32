//! The places under concurrency caps that this instance's live responses
//! hold in Redis, and the renewal of their leases: a place lapses with its
//! lease only when the process holding it is gone, never under a response
//! that outlasts the lease (a long stream, a slow client).
//!
//! A place is recorded when Redis grants it to a request let in, and
//! forgotten when it is given back (`Inner::remove_place`). While any is
//! held, one task renews them all every third of the lease: one call per
//! cap's sorted set (script mode "l"), all sent at once, each to its key's
//! slot on a Cluster. A renewal only moves the end of a lease still in
//! Redis, so one that crosses the place's removal never brings it back.
//! With two thirds of the lease left at each renewal, a renewal that fails
//! (Redis slow or away) is tried again before the place lapses.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use super::call::Call;
use super::store::Inner;
use crate::store::Permit;

/// The shortest pause between two renewals, whatever the lease.
const RENEW_MIN: Duration = Duration::from_millis(10);
/// The most renewal calls in flight at once: many caps' sets are renewed
/// a batch at a time, never flooding the connection decisions share.
const RENEW_BATCH: usize = 64;

/// The places held, and whether a task renews them.
#[derive(Default)]
pub(super) struct Held(crate::sync::Mutex<State>);

#[derive(Default)]
struct State {
    /// The lease ids held under each cap, by the cap's place and which of
    /// the place's caps it is (`Permit::place`, `Permit::cap`).
    places: HashMap<(u128, u64), HashSet<u64>>,
    /// Whether the renewal task runs: from the first place held until it
    /// finds none held, or its runtime shuts down.
    renewing: bool,
}

/// Marks the renewal task as ended when dropped before it ended by itself
/// (cancelled with its runtime, or never run): the next place held starts
/// another.
struct Renewing(Option<Arc<Inner>>);

impl Drop for Renewing {
    fn drop(&mut self) {
        if let Some(inner) = self.0.take() {
            inner.held.0.lock().renewing = false;
        }
    }
}

impl Inner {
    /// Records the places Redis granted to a request let in: their leases
    /// are renewed until [`unhold`](Self::unhold) (the response ended).
    pub(super) fn hold(self: &Arc<Self>, permits: impl Iterator<Item = Permit>) {
        let mut permits = permits.peekable();
        // Most requests hold no place: no lock for them.
        if permits.peek().is_none() {
            return;
        }
        let mut state = self.held.0.lock();
        for p in permits {
            state
                .places
                .entry((p.place, p.cap))
                .or_default()
                .insert(p.id);
        }
        if state.renewing {
            return;
        }
        state.renewing = true;
        drop(state);
        let renewing = Renewing(Some(Arc::clone(self)));
        let task = Arc::clone(self);
        self.spawn(async move { task.renew(renewing).await });
    }

    /// Stops renewing a place: it is being given back.
    pub(super) fn unhold(&self, permit: &Permit) {
        let mut state = self.held.0.lock();
        if let Some(ids) = state.places.get_mut(&(permit.place, permit.cap)) {
            ids.remove(&permit.id);
            if ids.is_empty() {
                state.places.remove(&(permit.place, permit.cap));
            }
        }
    }

    /// Renews the places held every third of the lease, until none is.
    /// Between renewals the task is no call in flight for
    /// [`RedisStore::drained`](super::RedisStore::drained).
    async fn renew(self: Arc<Self>, mut renewing: Renewing) {
        let every = (self.lease / 3).max(RENEW_MIN);
        let lease_ms = self.lease.as_millis().max(1);
        loop {
            self.pause(every).await;
            let sets: Vec<_> = {
                let mut state = self.held.0.lock();
                if state.places.is_empty() {
                    // Under the lock: a place held from now on starts a
                    // new task.
                    state.renewing = false;
                    renewing.0 = None;
                    return;
                }
                state
                    .places
                    .iter()
                    .map(|(&(place, cap), ids)| {
                        let mut call = Call::new("l", &self.now());
                        call.keys
                            .push(self.cap_key(&Permit::new(place, 0).with_cap(cap)));
                        call.arg(lease_ms);
                        for id in ids {
                            call.arg(format_args!("{id:016x}"));
                        }
                        call
                    })
                    .collect()
            };
            let mut calls = JoinSet::new();
            for call in sets {
                if calls.len() >= RENEW_BATCH {
                    calls.join_next().await;
                }
                let inner = Arc::clone(&self);
                calls.spawn(async move {
                    let renewed = inner.within(Arc::clone(&inner).run(call)).await;
                    if let Err(e) = renewed {
                        tracing::debug!(error = %e, "leases not renewed; tried again next time");
                    }
                });
            }
            while calls.join_next().await.is_some() {}
        }
    }
}
