//! The numbers in force of each throttle and token bucket, as this
//! instance last saw them, for the settlements of requests reserved under
//! older ones and the give-backs of what was charged under them (a
//! borrowed share's unused units, what one slot of a split decision
//! charged).
//!
//! A plan put anew with another throttle or token budget converts each
//! key's bucket in Redis lazily, the next time the key is used (see the script's mode "a").
//! A request reserved under the old numbers may settle after the change:
//! its settlement is worked out under the numbers it was reserved under,
//! and the script converts it to the numbers in force, as the bucket's own
//! share was at each change, before applying it (modes "t" and "r"). The
//! settlement carries the reservation's numbers only, so the numbers in
//! force come from here: noted when a change reaches this instance (its own
//! `Admin`, or the shared registry's log or a full read of it, through
//! [`Store::rescale`](crate::store::Store::rescale)) and whenever a
//! decision is made under numbers changed while serving.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::plan::Limit;
use crate::sync::Mutex;

/// The latest numbers seen of each bucket changed while serving, by the
/// limit's salt.
#[derive(Debug, Default)]
pub(super) struct Numbers {
    latest: Mutex<HashMap<u64, Limit>>,
    /// Whether any was noted: the common case (none) takes no lock.
    any: AtomicBool,
}

/// When and after how many changes at that instant `limit`'s numbers came
/// into force: later is newer.
fn order(limit: &Limit) -> (i64, u64) {
    (limit.since, limit.before.as_ref().map_or(0, |e| e.tie()))
}

impl Numbers {
    /// Notes `limit`'s numbers, when they are newer than those noted.
    pub(super) fn note(&self, limit: &Limit) {
        if limit.before.is_none() {
            return;
        }
        let mut latest = self.latest.lock();
        match latest.get_mut(&limit.salt) {
            Some(l) if order(l) >= order(limit) => {}
            Some(l) => *l = limit.clone(),
            None => {
                latest.insert(limit.salt, limit.clone());
            }
        }
        self.any.store(true, Ordering::Release);
    }

    /// The numbers in force of `limit`'s bucket, when newer than its own.
    pub(super) fn current(&self, limit: &Limit) -> Option<Limit> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let latest = self.latest.lock();
        latest
            .get(&limit.salt)
            .filter(|l| order(l) > order(limit))
            .cloned()
    }

    /// The arguments of a settlement of `limit` (the reservation's
    /// numbers) as the script's modes "t" and "r" take them after its own
    /// interval and burst: when and after how many changes its numbers
    /// came into force, then the numbers in force (interval, burst, since,
    /// the earlier spans).
    pub(super) fn args(&self, limit: &Limit) -> [String; 8] {
        const S: i64 = crate::gcra::NANOS_PER_SEC as i64;
        let current = self.current(limit);
        let c = current.as_ref().unwrap_or(limit);
        let (since, tie) = order(limit);
        let since = since.max(0);
        let c_since = c.since.max(0);
        [
            (since / S).to_string(),
            (since % S).to_string(),
            tie.to_string(),
            c.gcra.interval().to_string(),
            c.gcra.burst().to_string(),
            (c_since / S).to_string(),
            (c_since % S).to_string(),
            c.before
                .as_ref()
                .map_or_else(String::new, |e| e.encoded().to_owned()),
        ]
    }
}
