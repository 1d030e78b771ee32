//! The time a call decides at (Redis `TIME`, or a manual clock's), and the
//! estimate of how Redis `TIME` stands to this machine's clock, which dates
//! each call's deadline.

use std::sync::atomic::Ordering;

use super::store::Inner;
use crate::clock::system_wall_micros;
use crate::gcra::{NANOS_PER_SEC, Nanos};

/// The time a call decides at.
#[derive(Debug, Clone, Copy)]
pub(super) enum Now {
    /// Redis `TIME`.
    Redis,
    /// A manual clock's wall time.
    At { s: i64, ns: i64 },
}

impl Inner {
    pub(super) fn now(&self) -> Now {
        if self.clock.is_manual() {
            let t = self.clock.wall_nanos();
            Now::At {
                s: t.div_euclid(NANOS_PER_SEC as i64),
                ns: t.rem_euclid(NANOS_PER_SEC as i64),
            }
        } else {
            Now::Redis
        }
    }

    /// The time the over-limit cache ages on: with a manual clock its wall
    /// time (what decisions are made on), else the monotonic clock.
    pub(super) fn local_now(&self) -> Nanos {
        if self.clock.is_manual() {
            u64::try_from(self.clock.wall_nanos()).unwrap_or(0)
        } else {
            self.clock.nanos()
        }
    }

    /// Learns how Redis `TIME` stands to this machine's clock from a reply
    /// dated `s`, `ns` by Redis. A reply is dated before it is read, so a
    /// sample is never above the true offset, and one read late (a busy
    /// runtime) is below it: a higher sample is taken at once, a lower one
    /// lowers the estimate by at most a millisecond per ten seconds (clock
    /// drift), so that one late reply cannot make deadlines early. A clock
    /// that steps is caught by the script answering "expired", which makes
    /// the estimate unknown until the next reply ([`Inner::forget_offset`]).
    pub(super) fn observe(&self, s: i64, ns: i64) {
        if self.clock.is_manual() {
            return;
        }
        let sample = s
            .saturating_mul(1_000_000)
            .saturating_add(ns / 1_000)
            .saturating_sub(system_wall_micros());
        let now = self.clock.nanos().max(1);
        let at = self.offset_at.load(Ordering::Relaxed);
        let current = self.offset_us.load(Ordering::Relaxed);
        let next = if at == 0 || sample > current {
            sample
        } else if now.saturating_sub(at) > 10 * NANOS_PER_SEC {
            sample.max(current - 1_000)
        } else {
            return;
        };
        self.offset_us.store(next, Ordering::Relaxed);
        self.offset_at.store(now, Ordering::Relaxed);
    }

    /// Forgets the offset (a call was declined as expired: the clocks
    /// stepped); calls go without a deadline until a reply dates Redis's clock.
    pub(super) fn forget_offset(&self) {
        self.offset_at.store(0, Ordering::Relaxed);
    }

    /// The deadline of a decision sent now, in microseconds of Redis `TIME`:
    /// a call Redis runs after it (Redis stalled with the call queued) was
    /// given up by the layer, which answered the request without it, so the
    /// script decides nothing rather than charging a request that was
    /// refused or let through unmetered. None until a reply dated Redis's
    /// clock (or with a manual clock, where no real time passes).
    pub(super) fn deadline(&self) -> Option<i64> {
        if self.clock.is_manual() || self.offset_at.load(Ordering::Relaxed) == 0 {
            return None;
        }
        // The offset is estimated low (by a reply's latency), so the deadline
        // errs early: a call run just before the layer gives up may find it
        // passed and fail, but no call is charged after the layer gave up.
        let timeout = i64::try_from(self.timeout.as_micros()).unwrap_or(i64::MAX);
        Some(
            system_wall_micros()
                .saturating_add(self.offset_us.load(Ordering::Relaxed))
                .saturating_add(timeout),
        )
    }
}
