//! Store failures: counted, and logged when they start and when they end.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::StoreError;
use crate::clock::Clock;
use crate::gcra::{NANOS_PER_SEC, Nanos};
use crate::plan::FailureMode;

/// Store failures: counted, and logged once per burst (when the store starts
/// failing, and when it has answered again), never once per request.
///
/// A burst ends when the store has answered [`RECOVERY_STREAK`] times in a
/// row and no call has failed for [`QUIET`]. A store that fails only in
/// part (a Redis Cluster node down, whose slots' requests fail while the
/// others are answered) answers such runs between its failures: the quiet
/// time keeps them from ending the burst, and once the store has answered
/// between two failures, the burst ends only after twice the longest pause
/// between its failures, if that is longer (up to [`QUIET_MAX`]). So the
/// node's outage is logged once when it starts and once when the node is
/// back, not as over and begun again whenever a few requests in a row
/// reached the nodes that answer.
#[derive(Debug, Default)]
pub(crate) struct Failures {
    count: AtomicU64,
    failing: AtomicBool,
    /// Answers in a row since the last failure.
    streak: AtomicU64,
    /// `count` when the current burst began.
    burst_start: AtomicU64,
    /// Whether the store answered between two failures of this burst: it
    /// fails in part, and only a quiet time ends the burst.
    mixed: AtomicBool,
    /// When the last failure came, and the longest pause between two
    /// failures of this burst ([`Failures::clock`]'s nanoseconds).
    last_failure: AtomicU64,
    longest_gap: AtomicU64,
    /// Real time, for the quiet time alone (a test's manual clock must not
    /// hold a burst open): made at the first failure.
    clock: OnceLock<Clock>,
    /// Whether a request under a `Local` plan failed here: the store keeps
    /// no copy of the limits of its own to decide such requests by.
    local_failed: AtomicBool,
}

/// Answers in a row from the store that end a burst of failures.
const RECOVERY_STREAK: u64 = 3;

/// The least time without a failure that ends a burst.
const QUIET: Nanos = NANOS_PER_SEC / 2;

/// The most time without a failure such a burst waits for.
const QUIET_MAX: Nanos = 60 * NANOS_PER_SEC;

impl Failures {
    fn now(&self) -> Nanos {
        self.clock.get_or_init(Clock::precise).nanos()
    }

    #[cold]
    pub(crate) fn failed(&self, e: &StoreError) {
        let before = self.count.fetch_add(1, Ordering::Relaxed);
        let answers = self.streak.swap(0, Ordering::Relaxed);
        let now = self.now();
        let last = self.last_failure.swap(now, Ordering::Relaxed);
        if !self.failing.swap(true, Ordering::AcqRel) {
            self.burst_start.store(before, Ordering::Relaxed);
            self.mixed.store(false, Ordering::Relaxed);
            self.longest_gap.store(0, Ordering::Relaxed);
            tracing::warn!(
                error = %e,
                "rate-limit store failing: each plan's failure mode applies until it recovers"
            );
        } else {
            if answers > 0 {
                self.mixed.store(true, Ordering::Relaxed);
            }
            self.longest_gap
                .fetch_max(now.saturating_sub(last), Ordering::Relaxed);
        }
    }

    /// The store answered (a round trip, not a local answer).
    #[inline]
    pub(crate) fn answered(&self) {
        if self.failing.load(Ordering::Relaxed)
            && self.streak.fetch_add(1, Ordering::Relaxed) + 1 >= RECOVERY_STREAK
        {
            self.recovered();
        }
    }

    /// Ends the burst, unless it fails in part and has not been quiet
    /// long enough.
    #[cold]
    fn recovered(&self) {
        let quiet = if self.mixed.load(Ordering::Relaxed) {
            self.longest_gap
                .load(Ordering::Relaxed)
                .saturating_mul(2)
                .clamp(QUIET, QUIET_MAX)
        } else {
            QUIET
        };
        let since = self
            .now()
            .saturating_sub(self.last_failure.load(Ordering::Relaxed));
        if since < quiet {
            return;
        }
        if self.failing.swap(false, Ordering::AcqRel) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn error() -> StoreError {
        StoreError::new("down")
    }

    fn quiet() {
        std::thread::sleep(std::time::Duration::from_nanos(QUIET + NANOS_PER_SEC / 10));
    }

    #[test]
    fn an_outage_ends_after_a_streak_of_answers_and_a_quiet_time() {
        let f = Failures::default();
        f.failed(&error());
        f.failed(&error());
        assert!(f.failing.load(Ordering::Relaxed));
        for _ in 0..5 {
            f.answered();
        }
        assert!(
            f.failing.load(Ordering::Relaxed),
            "answers right after a failure may be a part of the store's"
        );
        quiet();
        f.answered();
        assert!(!f.failing.load(Ordering::Relaxed), "quiet, and answered");
        // Quiet, but not three answers in a row yet.
        f.failed(&error());
        quiet();
        f.answered();
        f.answered();
        assert!(f.failing.load(Ordering::Relaxed));
        f.answered();
        assert!(!f.failing.load(Ordering::Relaxed), "three answers in a row");
    }

    #[test]
    fn a_store_failing_in_part_stays_failing_until_quiet() {
        let f = Failures::default();
        f.failed(&error());
        for _ in 0..10 {
            for _ in 0..5 {
                f.answered();
            }
            f.failed(&error());
        }
        for _ in 0..5 {
            f.answered();
        }
        assert!(
            f.failing.load(Ordering::Relaxed),
            "answers between failures end nothing until a quiet time"
        );
        quiet();
        f.answered();
        assert!(!f.failing.load(Ordering::Relaxed));
        // A new burst starts afresh.
        f.failed(&error());
        assert!(!f.mixed.load(Ordering::Relaxed));
    }
}
