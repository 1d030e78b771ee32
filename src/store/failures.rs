//! Store failures: counted, and logged when they start and when they end.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::StoreError;
use crate::plan::FailureMode;

/// Store failures: counted, and logged once per burst (when the store starts
/// failing, and when it has answered [`RECOVERY_STREAK`] times in a row
/// again), never once per request, and without flapping when a store fails
/// only in part (a cluster node down).
#[derive(Debug, Default)]
pub(crate) struct Failures {
    count: AtomicU64,
    failing: AtomicBool,
    /// Answers in a row since the last failure.
    streak: AtomicU64,
    /// `count` when the current burst began.
    burst_start: AtomicU64,
    /// Whether a request under a `Local` plan failed here: the store keeps
    /// no copy of the limits of its own to decide such requests by.
    local_failed: AtomicBool,
}

/// Answers in a row from the store that end a burst of failures.
const RECOVERY_STREAK: u64 = 3;

impl Failures {
    #[cold]
    pub(crate) fn failed(&self, e: &StoreError) {
        let before = self.count.fetch_add(1, Ordering::Relaxed);
        self.streak.store(0, Ordering::Relaxed);
        if !self.failing.swap(true, Ordering::AcqRel) {
            self.burst_start.store(before, Ordering::Relaxed);
            tracing::warn!(
                error = %e,
                "rate-limit store failing: each plan's failure mode applies until it recovers"
            );
        }
    }

    /// The store answered (a round trip, not a local answer).
    #[inline]
    pub(crate) fn answered(&self) {
        if self.failing.load(Ordering::Relaxed)
            && self.streak.fetch_add(1, Ordering::Relaxed) + 1 >= RECOVERY_STREAK
            && self.failing.swap(false, Ordering::AcqRel)
        {
            let failures =
                self.count.load(Ordering::Relaxed) - self.burst_start.load(Ordering::Relaxed);
            tracing::info!(failures, "rate-limit store recovered");
        }
    }

    /// A request under a plan of failure mode `failure` failed.
    #[cold]
    pub(crate) fn failed_under(&self, e: &StoreError, failure: FailureMode) {
        if failure == FailureMode::Local {
            self.local_failed.store(true, Ordering::Relaxed);
        }
        self.failed(e);
    }

    /// The store answered a request under a plan of failure mode `failure`
    /// after a wait. A store that keeps a copy of the limits of its own (the
    /// Redis store) answers `Local` plans from it while it fails, and logs
    /// those failures itself: such an answer is no sign that the store
    /// recovered, unless `Local` requests have failed here (a store that
    /// keeps no copy).
    #[inline]
    pub(crate) fn answered_under(&self, failure: FailureMode) {
        if failure != FailureMode::Local || self.local_failed.load(Ordering::Relaxed) {
            self.answered();
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}
