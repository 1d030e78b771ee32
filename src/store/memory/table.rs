//! The memory store's table: a fixed-size, lock-free table of 16-byte slots,
//! each one key's fingerprint and one 64-bit state (a TAT, or a count of
//! requests in flight), changed by a 64-bit compare-and-swap.
//!
//! A slot is two words: its `tag` (the fingerprint of the key that owns it;
//! 0 while empty) and its `word` (the state xored with that fingerprint).
//! Deciding for a key reads the tag, the word and the tag again, and swaps
//! the word: a plain 64-bit compare-and-swap, where a slot of one 128-bit
//! word needed `cmpxchg16b` (more than a third of a one-key decision, on
//! the machines measured).
//!
//! The xor is what keeps a decision in its own key's slot. A slot is handed
//! to another key only once its state is idle; a decision that read the old
//! key's word just before must then fail its swap. It does, because the
//! word it expects is `state ^ old fingerprint`, and the new key's words are
//! `state ^ new fingerprint`: fingerprints are keyed hashes (random, and
//! unknown to clients), so the two coincide with a chance of one in 2^64,
//! the chance of two keys sharing a fingerprint, which the table already
//! accepts. The same key handed its own slot back writes words that mean
//! the same state to it, so a swap that succeeds there is still right.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sync::Mutex;

use crate::gcra::Nanos;
use crate::hash::Digest;

/// Slots a key may live in, counted from its hash position.
pub(super) const WINDOW: u64 = 32;
/// Slots per lazily allocated page (4 KiB).
const PAGE_BITS: u32 = 8;
pub(super) const PAGE: u64 = 1 << PAGE_BITS;
/// Stripes of the insertion lock (taken only to add a key, never to decide).
const STRIPES: usize = 1024;

/// Where a (limit, key) lives: a fingerprint (bit 0 set, so never 0, the
/// tag of an empty slot) and a hash position.
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
            fp: (lo ^ salt) | 1,
            pos: hi ^ salt.rotate_left(32),
        }
    }
}

/// The tag of a slot being handed over by the key whose fingerprint is `fp`:
/// bit 0 clear, so no key's; never 0, so not empty. That key's decisions
/// wait the few instructions it lasts (the handover may yet fail, and give
/// the slot back); other keys' pass it by as taken.
#[inline]
fn handing_over(fp: u64) -> u64 {
    (fp & !1) | 2
}

/// Whether a tag is a key's (not empty, not being handed over).
#[inline]
fn owned(tag: u64) -> bool {
    tag & 1 == 1
}

/// One slot: 16 bytes, aligned so that no slot straddles two cache lines.
#[repr(C, align(16))]
pub(super) struct Slot {
    tag: AtomicU64,
    word: AtomicU64,
}

impl Slot {
    const fn empty() -> Self {
        Slot {
            tag: AtomicU64::new(0),
            word: AtomicU64::new(0),
        }
    }

    /// The slot's tag and state, read consistently (the tag did not change
    /// while the word was read), for scans that do not decide.
    #[inline]
    fn read(&self) -> (u64, Nanos) {
        loop {
            let tag = self.tag.load(Ordering::Acquire);
            let word = self.word.load(Ordering::Acquire);
            if self.tag.load(Ordering::Acquire) == tag {
                return (tag, if owned(tag) { word ^ tag } else { 0 });
            }
        }
    }
}

/// A key's slot as `find` read it.
struct Found<'t> {
    slot: &'t Slot,
    /// The word read, which a swap expects.
    word: u64,
}

pub(super) struct Table {
    pages: Box<[OnceLock<Box<[Slot]>>]>,
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
    fn get(&self, i: u64) -> Option<&Slot> {
        let i = i & self.mask;
        let page = self.pages[(i >> PAGE_BITS) as usize].get()?;
        Some(&page[(i & (PAGE - 1)) as usize])
    }

    /// The slot at `i`, allocating its page.
    fn get_or_alloc(&self, i: u64) -> &Slot {
        let i = i & self.mask;
        let page = self.pages[(i >> PAGE_BITS) as usize]
            .get_or_init(|| (0..PAGE).map(|_| Slot::empty()).collect());
        &page[(i & (PAGE - 1)) as usize]
    }

    /// Finds the key's slot and the word it held. Keys never sit past an empty
    /// slot of their window (slots are never emptied once used), so the search
    /// stops at the first one.
    #[inline]
    fn find(&self, key: SlotKey) -> Option<Found<'_>> {
        let waiting = handing_over(key.fp);
        let mut spins = 0u32;
        for i in 0..WINDOW {
            let slot = self.get(key.pos.wrapping_add(i))?;
            loop {
                let tag = slot.tag.load(Ordering::Acquire);
                if tag == key.fp {
                    let word = slot.word.load(Ordering::Acquire);
                    // The word is this key's only if the tag held across
                    // the read: a handover writes the word before the tag.
                    if slot.tag.load(Ordering::Acquire) == key.fp {
                        return Some(Found { slot, word });
                    }
                    continue;
                }
                if tag == 0 {
                    return None;
                }
                if tag == waiting {
                    // This key's slot (or another's with the same mark)
                    // in the middle of a handover, which may yet fail:
                    // passing it by could place the key twice.
                    spins += 1;
                    if spins % 64 == 0 {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                    continue;
                }
                break;
            }
        }
        None
    }

    /// The key's TAT (0 for a key not tracked), without changing anything.
    #[inline]
    pub(super) fn peek(&self, key: SlotKey) -> Nanos {
        self.find(key).map_or(0, |f| f.word ^ key.fp)
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
            if let Some(Found { slot, word }) = self.find(key) {
                let tat = word ^ key.fp;
                let (new, r) = op(tat);
                match new {
                    Some(n) if n != tat => {
                        if slot
                            .word
                            .compare_exchange_weak(
                                word,
                                n ^ key.fp,
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
    ///
    /// A slot is taken by marking its tag (so that no other insert takes it,
    /// and its key's decisions wait), swapping its word from the idle state
    /// read to the new key's (so that a decision of the old key that got in
    /// first keeps it: the mark is then taken back), and then writing the
    /// new key's tag.
    #[cold]
    fn insert(&self, key: SlotKey, tat: Nanos, now: Nanos) -> Inserted {
        let _guard = self.stripes[(key.pos as usize) & (STRIPES - 1)].lock();
        if self.find(key).is_some() {
            return Inserted::Present;
        }
        let mut soonest = Nanos::MAX;
        for i in 0..WINDOW {
            let slot = self.get_or_alloc(key.pos.wrapping_add(i));
            loop {
                let tag = slot.tag.load(Ordering::Acquire);
                let word = slot.word.load(Ordering::Acquire);
                if slot.tag.load(Ordering::Acquire) != tag {
                    continue;
                }
                if tag != 0 && !owned(tag) {
                    // Another insert is taking it.
                    break;
                }
                let old = if tag == 0 { 0 } else { word ^ tag };
                if tag != 0 && old > now {
                    soonest = soonest.min(old - now);
                    break;
                }
                // Empty, or idle (its bucket is full again): take it.
                let mark = handing_over(if tag == 0 { key.fp } else { tag });
                if slot
                    .tag
                    .compare_exchange(tag, mark, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    continue;
                }
                if slot
                    .word
                    .compare_exchange(word, tat ^ key.fp, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    // The old key decided in between: it keeps the slot.
                    slot.tag.store(tag, Ordering::Release);
                    continue;
                }
                slot.tag.store(key.fp, Ordering::Release);
                return Inserted::Done;
            }
        }
        Inserted::Full(soonest)
    }

    pub(super) fn allocated_pages(&self) -> usize {
        self.pages.iter().filter(|p| p.get().is_some()).count()
    }

    pub(super) fn live(&self, now: Nanos) -> usize {
        self.slots_in_use()
            .filter(|s| {
                let (tag, tat) = s.read();
                owned(tag) && tat > now
            })
            .count()
    }

    /// Bytes of the pages allocated so far.
    pub(super) fn allocated_bytes(&self) -> usize {
        self.allocated_pages() * (PAGE as usize) * std::mem::size_of::<Slot>()
    }

    fn slots_in_use(&self) -> impl Iterator<Item = &Slot> {
        self.pages
            .iter()
            .filter_map(|p| p.get())
            .flat_map(|p| p.iter())
    }

    /// The fingerprint of every key placed.
    #[cfg(test)]
    pub(super) fn fingerprints(&self) -> Vec<u64> {
        self.slots_in_use()
            .map(|s| s.read().0)
            .filter(|&t| owned(t))
            .collect()
    }
}

enum Inserted {
    Done,
    Present,
    Full(Nanos),
}
