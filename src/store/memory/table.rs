//! The memory store's table: a fixed-size, lock-free table of 16-byte slots,
//! each one key's fingerprint and one 64-bit state (a TAT, or a count of
//! requests in flight) changed together by one compare-and-swap.

use std::sync::OnceLock;

use crate::sync::Mutex;
use portable_atomic::{AtomicU128, Ordering};

use crate::gcra::Nanos;
use crate::hash::Digest;

/// Slots a key may live in, counted from its hash position.
pub(super) const WINDOW: u64 = 32;
/// Slots per lazily allocated page (4 KiB).
const PAGE_BITS: u32 = 8;
pub(super) const PAGE: u64 = 1 << PAGE_BITS;
/// Stripes of the insertion lock (taken only to add a key, never to decide).
const STRIPES: usize = 1024;

/// Where a (limit, key) lives: a nonzero fingerprint and a hash position.
#[derive(Debug, Clone, Copy)]
pub(super) struct SlotKey {
    pub(super) fp: u64,
    pub(super) pos: u64,
}

impl SlotKey {
    /// The two halves of a digest are keyed hashes already (and independent
    /// of each other), so the limit's salt is only xored in: each limit of a
    /// key gets its own slot, with no more hashing on the hot path.
    #[inline]
    pub(super) fn new(d: Digest, salt: u64) -> Self {
        let lo = d.0 as u64;
        let hi = (d.0 >> 64) as u64;
        SlotKey {
            // Bit 0 set: a fingerprint is never 0, the mark of an empty slot.
            fp: (lo ^ salt) | 1,
            pos: hi ^ salt.rotate_left(32),
        }
    }
}

#[inline]
fn pack(fp: u64, tat: Nanos) -> u128 {
    u128::from(fp) << 64 | u128::from(tat)
}

#[inline]
pub(super) fn unpack(w: u128) -> (u64, Nanos) {
    ((w >> 64) as u64, w as u64)
}

pub(super) struct Table {
    pub(super) pages: Box<[OnceLock<Box<[AtomicU128]>>]>,
    mask: u64,
    stripes: Box<[Mutex<()>]>,
}

impl Table {
    pub(super) fn new(slots: u64) -> Self {
        debug_assert!(slots.is_power_of_two() && slots >= PAGE);
        Table {
            pages: (0..slots / PAGE).map(|_| OnceLock::new()).collect(),
            mask: slots - 1,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    pub(super) fn slots(&self) -> u64 {
        self.mask + 1
    }

    /// The slot at `i` if its page exists.
    #[inline]
    fn get(&self, i: u64) -> Option<&AtomicU128> {
        let i = i & self.mask;
        let page = self.pages[(i >> PAGE_BITS) as usize].get()?;
        Some(&page[(i & (PAGE - 1)) as usize])
    }

    /// The slot at `i`, allocating its page.
    fn get_or_alloc(&self, i: u64) -> &AtomicU128 {
        let i = i & self.mask;
        let page = self.pages[(i >> PAGE_BITS) as usize]
            .get_or_init(|| (0..PAGE).map(|_| AtomicU128::new(0)).collect());
        &page[(i & (PAGE - 1)) as usize]
    }

    /// Finds the key's slot and the word it held. Keys never sit past an empty
    /// slot of their window (slots are never emptied once used), so the search
    /// stops at the first one.
    #[inline]
    fn find(&self, key: SlotKey) -> Option<(&AtomicU128, u128)> {
        for i in 0..WINDOW {
            let slot = self.get(key.pos.wrapping_add(i))?;
            let w = slot.load(Ordering::Acquire);
            let (fp, _) = unpack(w);
            if fp == key.fp {
                return Some((slot, w));
            }
            if fp == 0 {
                return None;
            }
        }
        None
    }

    /// The key's TAT (0 for a key not tracked), without changing anything.
    #[inline]
    pub(super) fn peek(&self, key: SlotKey) -> Nanos {
        self.find(key).map_or(0, |(_, w)| unpack(w).1)
    }

    /// Applies `op` to the key's TAT (0 for a key not tracked): when it returns
    /// `Some(new)`, stores `new` atomically, retrying `op` on contention.
    /// Errors with the time until a slot frees when a new key finds no room.
    #[inline(always)]
    pub(super) fn update<R>(
        &self,
        key: SlotKey,
        now: Nanos,
        mut op: impl FnMut(Nanos) -> (Option<Nanos>, R),
    ) -> Result<R, Nanos> {
        loop {
            if let Some((slot, w)) = self.find(key) {
                let (_, tat) = unpack(w);
                let (new, r) = op(tat);
                match new {
                    Some(n) if n != tat => {
                        if slot
                            .compare_exchange_weak(
                                w,
                                pack(key.fp, n),
                                Ordering::AcqRel,
                                Ordering::Acquire,
                            )
                            .is_ok()
                        {
                            return Ok(r);
                        }
                        // Another thread changed the slot (or handed it to
                        // another key): look again.
                        continue;
                    }
                    _ => return Ok(r),
                }
            }
            let (new, r) = op(0);
            let Some(n) = new.filter(|&n| n != 0) else {
                // Nothing to store: an idle key needs no slot.
                return Ok(r);
            };
            match self.insert(key, n, now) {
                Inserted::Done => return Ok(r),
                Inserted::Present => continue,
                Inserted::Full(retry) => return Err(retry),
            }
        }
    }

    /// Puts a key not found by `find` into the first empty or idle slot of its
    /// window. Inserts of one key are serialised by a stripe lock so that a key
    /// can never be placed twice; deciding on tracked keys never takes it.
    #[cold]
    fn insert(&self, key: SlotKey, tat: Nanos, now: Nanos) -> Inserted {
        let _guard = self.stripes[(key.pos as usize) & (STRIPES - 1)].lock();
        if self.find(key).is_some() {
            return Inserted::Present;
        }
        let mut soonest = Nanos::MAX;
        for i in 0..WINDOW {
            let slot = self.get_or_alloc(key.pos.wrapping_add(i));
            let mut w = slot.load(Ordering::Acquire);
            loop {
                let (fp, old_tat) = unpack(w);
                if fp != 0 && old_tat > now {
                    soonest = soonest.min(old_tat - now);
                    break;
                }
                // Empty, or idle (its bucket is full again): take it.
                match slot.compare_exchange(
                    w,
                    pack(key.fp, tat),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return Inserted::Done,
                    Err(current) => w = current,
                }
            }
        }
        Inserted::Full(soonest)
    }

    pub(super) fn allocated_pages(&self) -> usize {
        self.pages.iter().filter(|p| p.get().is_some()).count()
    }

    pub(super) fn live(&self, now: Nanos) -> usize {
        self.pages
            .iter()
            .filter_map(|p| p.get())
            .flat_map(|p| p.iter())
            .filter(|s| {
                let (fp, tat) = unpack(s.load(Ordering::Acquire));
                fp != 0 && tat > now
            })
            .count()
    }
}

enum Inserted {
    Done,
    Present,
    Full(Nanos),
}
