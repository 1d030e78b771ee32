//! What a call to Redis holds while it runs: a ticket among the calls in
//! flight (bounded per store), and the lease of a place it may add under a
//! concurrency cap (removed in the background unless a response holds it,
//! and then renewed while it does: see `held`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::store::Inner;
use crate::store::Permit;

/// One of the calls a store has in flight; given back when dropped.
pub(super) struct Ticket(Arc<Inner>);

impl Ticket {
    /// A ticket, or `None` when the store has as many calls in flight as
    /// it takes: the request is then never queued past the timeout, but
    /// answered from what Redis said of it lately, or by its failure mode
    /// (see `denials`).
    pub(super) fn take(inner: &Arc<Inner>) -> Option<Ticket> {
        let before = inner.in_flight.fetch_add(1, Ordering::AcqRel);
        if before >= inner.max_in_flight {
            inner.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Ticket(Arc::clone(inner)))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The places a call may add under concurrency caps. Unless
/// [`kept`](Lease::keep) (the answer reached the request: its response
/// holds the places, or Redis denied and added none), they are removed when
/// dropped, by an idempotent `ZREM` each, sent in the background: the
/// request's future was dropped before Redis answered, the timeout fired
/// after the script ran, or the connection failed mid-call. A call Redis
/// certainly never ran (its connection refused, or refused by Redis before
/// it ran: out of memory, a replica, loading) took none, and its lease is
/// kept too: nothing to remove. On one
/// connection the removal reaches Redis after the call, so it also removes
/// a place the call adds later.
pub(super) struct Lease {
    inner: Arc<Inner>,
    permits: [Option<Permit>; 2],
}

impl Lease {
    pub(super) fn new(inner: &Arc<Inner>, permits: impl Iterator<Item = Permit>) -> Self {
        let mut held = [None; 2];
        for (slot, p) in held.iter_mut().zip(permits) {
            *slot = Some(p);
        }
        Lease {
            inner: Arc::clone(inner),
            permits: held,
        }
    }

    /// The answer reached the request: nothing to remove.
    pub(super) fn keep(&mut self) {
        self.permits = [None; 2];
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        for permit in self.permits.iter_mut().filter_map(Option::take) {
            self.inner.remove_place(permit);
        }
    }
}
