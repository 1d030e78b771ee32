//! When each per-minute token bucket was last reset, for the settlements
//! that arrive after it.
//!
//! `Admin::reset_key` fills a key's buckets: whatever a request reserved
//! before it is forgiven, refilled at once. A stream admitted before the
//! reset may settle after it, having used fewer tokens than it reserved,
//! and the refund rule ([`Gcra::refund`](crate::gcra::Gcra::refund)) gives
//! back what of the estimate's own share has not refilled yet: shortly
//! after a reset, nearly all of it, though the reset refilled it already.
//! Given back, those tokens would be granted twice. So a reset leaves a
//! mark here, and a settlement of a reservation made before the mark gives
//! the bucket nothing back.
//!
//! Only the reset writes and only a settlement reads: a decision never
//! looks here, so the hot path pays nothing for it. The map stays small:
//! a mark is needed only while a reservation made before it could still
//! get something back, which is at most the bucket's span (an estimate's
//! share refills within it, and what has refilled is never given back), so
//! each reset first drops the marks older than their bucket's span.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::table::SlotKey;
use crate::gcra::Nanos;
use crate::sync::Mutex;

/// The marks, by the bucket's slot key.
#[derive(Debug, Default)]
pub(super) struct Resets {
    marks: Mutex<HashMap<(u64, u64), Mark>>,
    /// The latest reset's time, read without the lock: a reservation made
    /// at or after it is older than no mark, so its settlement (one per
    /// response that used fewer tokens than it reserved, the common case)
    /// takes no lock shared by every request. Only a reservation made
    /// before some reset, which is rare, looks in the map.
    latest: AtomicU64,
}

/// One bucket's last reset.
#[derive(Debug, Clone, Copy)]
struct Mark {
    /// When it was reset (the store's monotonic nanoseconds).
    at: Nanos,
    /// When the mark stops mattering: `at` plus the bucket's span. By then
    /// every share reserved before `at` has refilled, and gets nothing back
    /// with or without the mark.
    lapses: Nanos,
}

impl Resets {
    /// Marks the bucket in `slot`, of span `span`, reset at `now`; drops
    /// the marks that have lapsed.
    pub(super) fn mark(&self, slot: SlotKey, now: Nanos, span: Nanos) {
        let mut marks = self.marks.lock();
        marks.retain(|_, m| m.lapses > now);
        let lapses = now.saturating_add(span);
        let m = marks.entry(key(slot)).or_insert(Mark { at: now, lapses });
        // Never earlier than a reset before it: a clock gone back does not
        // make shares forgiven then come back.
        m.at = m.at.max(now);
        m.lapses = m.lapses.max(lapses);
        self.latest.fetch_max(now, Ordering::Release);
    }

    /// Whether the bucket in `slot` was reset after `at`, the time a
    /// reservation charged it: its share was refilled by the reset, and a
    /// settlement gives nothing back. A reservation at the reset's very
    /// instant is taken as made after it, as a quota's reset takes a charge
    /// at that instant.
    pub(super) fn since(&self, slot: SlotKey, at: Nanos) -> bool {
        if at >= self.latest.load(Ordering::Acquire) {
            return false;
        }
        self.marks.lock().get(&key(slot)).is_some_and(|m| at < m.at)
    }

    /// How many marks are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.marks.lock().len()
    }
}

fn key(slot: SlotKey) -> (u64, u64) {
    (slot.fp, slot.pos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::digest;

    fn slot(n: u64) -> SlotKey {
        SlotKey::new(digest(&n.to_le_bytes()), 7)
    }

    /// A reservation before the mark is forgiven, one at or after it is
    /// not; another bucket is not marked.
    #[test]
    fn tells_a_reservation_before_the_reset() {
        let r = Resets::default();
        r.mark(slot(1), 1_000, 500);
        assert!(r.since(slot(1), 999));
        assert!(!r.since(slot(1), 1_000));
        assert!(!r.since(slot(1), 1_001));
        assert!(!r.since(slot(2), 0));
    }

    /// A later reset moves the mark on; a reset at an earlier time (a
    /// clock gone back) does not move it back.
    #[test]
    fn a_mark_never_moves_back() {
        let r = Resets::default();
        r.mark(slot(1), 1_000, 500);
        r.mark(slot(1), 1_200, 500);
        assert!(r.since(slot(1), 1_100));
        r.mark(slot(1), 900, 500);
        assert!(r.since(slot(1), 1_100));
    }

    /// Marks older than their bucket's span are dropped by the next reset:
    /// the map holds only the resets of the last span.
    #[test]
    fn lapsed_marks_are_dropped() {
        let r = Resets::default();
        for n in 0..100 {
            r.mark(slot(n), n * 10, 50);
        }
        assert!(r.len() <= 6, "{}", r.len());
        r.mark(slot(1_000), 10_000, 50);
        assert_eq!(r.len(), 1);
    }
}
