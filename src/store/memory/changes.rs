//! The changes of each token bucket's numbers while serving, for the
//! settlements that arrive after them.
//!
//! A plan put anew with another token budget converts every key's bucket at
//! once ([`Gcra::rescale`]): the share in use carries over, scaled to the
//! new span. A request reserved under the old numbers may settle after the
//! change: its settlement (a charge past the estimate, or a refund of what
//! it did not use) is worked out under the numbers it was reserved under,
//! and must be converted to the numbers in force, as the bucket's own share
//! was at each change, before it is applied: applied as it is, it would
//! weigh under the old numbers on a bucket kept under the new ones. So each
//! change of a token bucket's numbers is logged here, by its limit (not by
//! key: one change converts every key of the limit), and a settlement
//! follows the changes from its own numbers to the current ones.
//!
//! Only a change writes and only a settlement reads: a decision never looks
//! here. A limit keeps its last [`MAX`] changes, as the Redis store replays
//! the last ones a key missed; a settlement of numbers older than those is
//! converted from them to the current ones at the latest change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::gcra::{Gcra, Nanos};
use crate::plan::Limit;
use crate::sync::Mutex;

/// How many changes of one limit are kept.
const MAX: usize = 16;

/// The changes, by the limit's salt.
#[derive(Debug, Default)]
pub(super) struct Changes {
    log: Mutex<HashMap<u64, Vec<Change>>>,
    /// Whether any change was logged: the common case (none) takes no lock.
    any: AtomicBool,
}

/// One change of a limit's numbers.
#[derive(Debug, Clone, Copy)]
struct Change {
    /// The numbers before it, and when and after how many changes at that
    /// instant they came into force.
    from: (Gcra, i64, u64),
    /// The numbers after it, likewise.
    to: (Gcra, i64, u64),
    /// When the store converted its buckets (monotonic nanoseconds).
    at: Nanos,
}

/// A limit's numbers as a settlement names them.
fn numbers(limit: &Limit) -> (Gcra, i64, u64) {
    let tie = limit.before.as_ref().map_or(0, |e| e.tie());
    (limit.gcra, limit.since, tie)
}

/// A settlement converted to the numbers in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Converted {
    /// The current numbers.
    gcra: Gcra,
    /// The settlement's share of the bucket, in nanoseconds under them.
    pub(super) shift: Nanos,
    /// When the reservation's own share refills, under them.
    pub(super) until: Option<Nanos>,
}

impl Changes {
    /// Logs the change of `old`'s numbers to `new`'s, converted at `now`
    /// (once per limit, though every key of it is converted).
    pub(super) fn log(&self, salt: u64, old: &Limit, new: &Limit, now: Nanos) {
        let (from, to) = (numbers(old), numbers(new));
        let mut log = self.log.lock();
        let changes = log.entry(salt).or_default();
        if changes.last().is_some_and(|c| c.to == to) {
            return;
        }
        if changes.len() == MAX {
            changes.remove(0);
        }
        changes.push(Change { from, to, at: now });
        self.any.store(true, Ordering::Release);
    }

    /// A settlement of `shift` nanoseconds under `limit`'s numbers (the
    /// reservation's), whose own share refills at `until`, converted
    /// through each change since to the numbers in force: each change
    /// scales the shift as it scaled the share in use, and converts
    /// `until` as it converted a TAT. `None` when the numbers have not
    /// changed since.
    pub(super) fn convert(
        &self,
        salt: u64,
        limit: &Limit,
        shift: Nanos,
        until: Option<Nanos>,
    ) -> Option<Converted> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let log = self.log.lock();
        let changes = log.get(&salt)?;
        let mine = numbers(limit);
        let latest = changes.last()?;
        if latest.to == mine {
            return None;
        }
        let mut out = Converted {
            gcra: limit.gcra,
            shift,
            until,
        };
        let step = |out: &mut Converted, c: &Change| {
            out.shift = out.gcra.rescale_span(out.shift, &c.to.0);
            out.until = out.until.map(|u| out.gcra.rescale(u, c.at, &c.to.0));
            out.gcra = c.to.0;
        };
        match changes.iter().position(|c| c.from == mine) {
            Some(first) => changes[first..].iter().for_each(|c| step(&mut out, c)),
            // Older than the changes kept: from its numbers to the
            // current ones at the latest change.
            None => step(&mut out, latest),
        }
        Some(out)
    }
}
