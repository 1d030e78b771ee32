//! Store failures: counted, and logged when they start and when they end.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use super::StoreError;
use crate::clock::Clock;
use crate::gcra::{NANOS_PER_SEC, Nanos};
use crate::plan::FailureMode;

/// Store failures: counted, and logged once per failure (when the store
/// starts failing, and when it has answered [`RECOVERY_STREAK`] times in a
/// row again), never once per request.
///
/// A store that may fail in part (a Redis Cluster: a node down fails its
/// slots' requests while the other nodes answer, see
/// [`StoreError::is_in_part`]) answers runs of requests between its
/// failures. Its failure ends only once, besides, no call has failed for
/// [`QUIET`]; once it has answered between two failures, for twice the
/// longest pause between them, if that is longer (up to [`QUIET_MAX`]). So
/// the node's outage is logged once when it starts and once when the node
/// is back, not as over and begun again whenever a few requests in a row
/// reached the nodes that answer.
///
/// Failures of different kinds ([`FailureKind`](super::FailureKind)) are
/// different failures: one of another kind than the failure before it,
/// after the store answered in between, ends that failure in the log and
/// begins its own (Redis out of memory right after an outage is logged as
/// such, not folded into the outage).
#[derive(Debug, Default)]
pub(crate) struct Failures {
    count: AtomicU64,
    failing: AtomicBool,
    /// Answers in a row since the last failure.
    streak: AtomicU64,
    /// `count` when the current failure began.
    burst_start: AtomicU64,
    /// The kind of the last failure (0 before any).
    kind: AtomicU8,
    /// Whether a failure of the current one came from a store that may fail
    /// in part: only a quiet time ends it.
    in_part: AtomicBool,
    /// Whether the store answered between two failures of the current one:
    /// it fails in part, and only a longer quiet time ends it.
    mixed: AtomicBool,
    /// When the last failure came, and the longest pause between two
    /// failures of the current one with answers between them
    /// ([`Failures::clock`]'s nanoseconds).
    last_failure: AtomicU64,
    longest_gap: AtomicU64,
    /// Real time, for the quiet time alone (a test's manual clock must not
    /// hold a failure open): made at the first failure.
    clock: OnceLock<Clock>,
    /// Whether a request under a `Local` plan failed here: the store keeps
    /// no copy of the limits of its own to decide such requests by.
    local_failed: AtomicBool,
}

/// Answers in a row from the store that end a failure.
const RECOVERY_STREAK: u64 = 3;

/// The least time without a failure that ends a failure of a store that
/// may fail in part.
const QUIET: Nanos = NANOS_PER_SEC / 2;

/// The most time without a failure that a store failing in part waits for.
const QUIET_MAX: Nanos = 60 * NANOS_PER_SEC;

impl Failures {
    fn now(&self) -> Nanos {
        self.clock.get_or_init(Clock::precise).nanos()
    }

    #[cold]
    pub(crate) fn failed(&self, e: &StoreError) {
        let before = self.count.fetch_add(1, Ordering::Relaxed);
        self.note(before, e);
    }

    /// A call the store makes of its own failed (a settlement or a place
    /// given back in the background): logged as a decision's failure is
    /// (it begins a failure, or is part of the one going on), but not
    /// counted, since no request was decided by a failure mode.
    #[cold]
    #[cfg(feature = "redis")]
    pub(crate) fn failed_aside(&self, e: &StoreError) {
        self.note(self.count.load(Ordering::Relaxed), e);
    }

    /// Notes a failure `e`, the `count` before it `before`.
    fn note(&self, before: u64, e: &StoreError) {
        let answers = self.streak.swap(0, Ordering::Relaxed);
        let kind = e.kind() as u8;
        let earlier = self.kind.swap(kind, Ordering::Relaxed);
        let now = self.now();
        let last = self.last_failure.swap(now, Ordering::Relaxed);
        if !self.failing.swap(true, Ordering::AcqRel) {
            self.begin(before, e);
        } else if answers > 0 && earlier != kind {
            // The store answered since the failure before, which was of
            // another kind: that one is over, and this one begins.
            self.end(before);
            self.begin(before, e);
        } else if answers > 0 {
            self.mixed.store(true, Ordering::Relaxed);
            self.longest_gap
                .fetch_max(now.saturating_sub(last), Ordering::Relaxed);
        }
        if e.is_in_part() {
            self.in_part.store(true, Ordering::Relaxed);
        }
    }

    /// Logs the start of a failure: `e`, the `count` before it `before`.
    fn begin(&self, before: u64, e: &StoreError) {
        self.burst_start.store(before, Ordering::Relaxed);
        self.in_part.store(false, Ordering::Relaxed);
        self.mixed.store(false, Ordering::Relaxed);
        self.longest_gap.store(0, Ordering::Relaxed);
        tracing::warn!(
            error = %e,
            "rate-limit store failing: each plan's failure mode applies until it recovers"
        );
    }

    /// Logs the end of the failure whose last call failed at `count`
    /// `upto`.
    fn end(&self, upto: u64) {
        let failures = upto.saturating_sub(self.burst_start.load(Ordering::Relaxed));
        tracing::info!(failures, "rate-limit store recovered");
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

    /// Ends the failure, unless the store may fail in part and it has not
    /// been quiet long enough (see [`Failures`]).
    #[cold]
    fn recovered(&self) {
        if !self.in_part.load(Ordering::Relaxed) {
            if self.failing.swap(false, Ordering::AcqRel) {
                self.end(self.count.load(Ordering::Relaxed));
            }
            return;
        }
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
        if since >= quiet && self.failing.swap(false, Ordering::AcqRel) {
            self.end(self.count.load(Ordering::Relaxed));
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
    use crate::store::FailureKind;

    fn error() -> StoreError {
        StoreError::new("down").with_kind(FailureKind::Unreachable)
    }

    /// A node of a Cluster down.
    fn node_down() -> StoreError {
        error().in_part()
    }

    fn refused() -> StoreError {
        StoreError::new("OOM").with_kind(FailureKind::Refused)
    }

    fn quiet() {
        std::thread::sleep(std::time::Duration::from_nanos(QUIET + NANOS_PER_SEC / 10));
    }

    fn failing(f: &Failures) -> bool {
        f.failing.load(Ordering::Relaxed)
    }

    #[test]
    fn a_failure_ends_after_a_streak_of_answers() {
        let f = Failures::default();
        f.failed(&error());
        f.failed(&refused());
        f.answered();
        f.answered();
        assert!(failing(&f));
        f.answered();
        assert!(!failing(&f), "three answers in a row");
        f.failed(&error());
        f.answered();
        f.failed(&error());
        f.answered();
        f.answered();
        assert!(failing(&f));
        f.answered();
        assert!(!failing(&f));
    }

    #[test]
    fn a_failure_in_part_ends_after_a_streak_of_answers_and_a_quiet_time() {
        let f = Failures::default();
        f.failed(&node_down());
        f.failed(&node_down());
        assert!(failing(&f));
        for _ in 0..5 {
            f.answered();
        }
        assert!(
            failing(&f),
            "answers right after a failure may be a part of the store's"
        );
        quiet();
        f.answered();
        assert!(!failing(&f), "quiet, and answered");
        // Quiet, but not three answers in a row yet.
        f.failed(&node_down());
        quiet();
        f.answered();
        f.answered();
        assert!(failing(&f));
        f.answered();
        assert!(!failing(&f), "three answers in a row");
    }

    #[test]
    fn a_store_failing_in_part_stays_failing_until_quiet() {
        let f = Failures::default();
        f.failed(&node_down());
        for _ in 0..10 {
            for _ in 0..5 {
                f.answered();
            }
            f.failed(&node_down());
        }
        for _ in 0..5 {
            f.answered();
        }
        assert!(
            failing(&f),
            "answers between failures end nothing until a quiet time"
        );
        assert_eq!(f.burst_start.load(Ordering::Relaxed), 0, "one failure");
        quiet();
        f.answered();
        assert!(!failing(&f));
        // A new failure starts afresh.
        f.failed(&node_down());
        assert!(!f.mixed.load(Ordering::Relaxed));
    }

    #[test]
    fn a_failure_of_another_kind_after_an_answer_is_a_failure_of_its_own() {
        let f = Failures::default();
        f.failed(&error());
        f.failed(&refused());
        assert_eq!(
            f.burst_start.load(Ordering::Relaxed),
            0,
            "no answer between them: one failure"
        );
        f.answered();
        f.failed(&refused());
        assert_eq!(f.burst_start.load(Ordering::Relaxed), 0, "of one kind");
        assert!(f.mixed.load(Ordering::Relaxed));
        f.answered();
        f.failed(&error());
        assert!(failing(&f));
        assert_eq!(
            f.burst_start.load(Ordering::Relaxed),
            3,
            "another kind after an answer begins a failure of its own"
        );
        assert!(!f.mixed.load(Ordering::Relaxed));
    }
}
