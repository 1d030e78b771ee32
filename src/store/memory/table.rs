//! The memory store's table: a lock-free table of 16-byte slots, each one
//! key's fingerprint and one 64-bit state (a TAT, or a count of requests in
//! flight), changed by a 64-bit compare-and-swap. It grows with its keys up
//! to a size fixed when it is made (see [`Table`]).
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

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::sync::Mutex;

use crate::gcra::Nanos;
use crate::hash::Digest;

/// Slots a key may live in, counted from its hash position.
pub(super) const WINDOW: u64 = 32;
/// Slots per lazily allocated page (64 KiB; a table smaller than that is
/// one page of its own size). Large enough that the page pointers of the
/// largest table fit in a few cache lines (1,024 of them for 4M slots):
/// with 4 KiB pages, a decision among a million keys missed the cache on
/// its page's pointer before it missed on the slot.
const PAGE_BITS: u32 = 12;
const PAGE: u64 = 1 << PAGE_BITS;
/// The fewest slots a table has (4 KiB), whatever its cap.
pub(super) const MIN_SLOTS: u64 = 256;
/// Stripes of the insertion lock (taken only to add or move a key, never to
/// decide).
const STRIPES: usize = 1024;
/// The slots a table starts with (log2) when its cap allows more: 16,384
/// slots, 256 KiB once all touched.
const FIRST_BITS: u32 = 14;
/// The tag a key leaves in the slot it moved out of: a key's (bit 0 set), so
/// the slot is taken and keeps the searches of the keys after it going, and
/// idle (its state is 0), so the next new key that needs it takes it. No
/// key's fingerprint is 3 but with the chance of two keys sharing one.
const MOVED: u64 = 3;
/// Slots each insert sweeps after a doubling: the sweep covers the slots in
/// use before it (`2^bits`) in `2^bits / 8` inserts, while doubling again
/// takes `2^bits / 2` more slots used, of which the keys moved take about
/// `2^bits / 4` (half the keys of a table half used): about `2^bits / 4`
/// inserts, twice the sweep's.
const SWEEP_PER_INSERT: u32 = 8;
/// One move begun, in [`Table::moves`].
const MOVE_BEGUN: u64 = 1 << 32;
/// Stray TATs kept at most (see [`Table::keep_stray`]).
const STRAYS: usize = 256;

/// Where a (limit, key) lives: a fingerprint (bit 0 set, so never 0, the
/// tag of an empty slot) and a hash position.
#[derive(Debug, Clone, Copy)]
pub(super) struct SlotKey {
    pub(super) fp: u64,
    pub(super) pos: u64,
}

impl SlotKey {
    /// A digest's low half is a keyed hash already (and the only half a
    /// slot uses), so the limit's salt is only xored in: each limit of a
    /// key gets its own slot, with no more hashing on the hot path.
    #[inline]
    pub(super) fn new(d: Digest, salt: u64) -> Self {
        let lo = d.0 as u64;
        Self::of((lo ^ salt) | 1)
    }

    /// The key whose fingerprint is `fp`: its position is the fingerprint's
    /// halves swapped, so a slot's tag alone tells where its key belongs
    /// under any bits, which moving keys as the table grows needs.
    #[inline]
    fn of(fp: u64) -> Self {
        SlotKey {
            fp,
            pos: fp.rotate_left(32),
        }
    }

    /// A key at position `pos` (under up to 32 bits), told apart from other
    /// keys at `pos` by `n`, for tests that aim keys at slots.
    #[cfg(test)]
    pub(super) fn at(pos: u32, n: u32) -> Self {
        Self::of(u64::from(pos) << 32 | u64::from(n) << 1 | 1)
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

/// The table grows: it is used as its first `2^bits` slots, with positions
/// taken modulo that, and doubles its `bits` (up to the cap's) when half
/// of those slots have been used or a new key finds its window full (once
/// the keys in it not yet moved since the last doubling have moved: the
/// part of the table not yet swept is as full as the whole was when it
/// doubled). Windows stay as short to search as in a table of twice the
/// cap used by half the cap, and keys stay as close together. A table
/// used far below its cap so stays on few pages: keys spread over all of
/// them would cost a TLB miss on almost every decision.
///
/// Doubling moves no key at once. A key placed under fewer bits sits in
/// its window under those bits; a decision that does not find the key under
/// the table's bits looks under each fewer in turn, and moves the key it
/// finds there to its window under the table's bits ([`Table::relocate`]).
/// Every insert after a doubling also sweeps a few of the slots in use
/// before it, moving their keys, so that the sweep ends long before the
/// next doubling (which ends it first if not): keys do not stay piled in
/// the first slots, and a search looks under fewer bits only for keys not
/// yet moved. A key's position is its fingerprint's halves swapped, so a
/// slot's tag tells where its key goes.
pub(super) struct Table {
    pages: Box<[OnceLock<Box<[Slot]>>]>,
    /// Slots per page: [`PAGE`], or every slot of a smaller table.
    page_slots: u64,
    /// Log2 of the slots in use: positions are taken modulo `2^bits`.
    bits: AtomicU32,
    /// What `bits` started at; keys may sit under any bits since.
    first_bits: u32,
    /// Log2 of every slot of the table: `bits` grows up to it.
    max_bits: u32,
    /// Moves of keys: how many ever began (high 32 bits) and how many run
    /// now (low 32 bits). A search that found nothing under the earlier
    /// bits trusts that only if no move ran when it began and none began
    /// since, since a key moving is for a moment in neither place.
    moves: AtomicU64,
    /// What inserts write, on a cache line of its own: the deciders read
    /// the fields above on every decision.
    counts: Counts,
    /// Taken to double the slots in use (before any stripe).
    growing: Mutex<()>,
    /// TATs that found no slot (a charge settled after its key's slot went
    /// idle and was taken, at the cap), by fingerprint, until the key gets
    /// a slot or the latest of them passes (one passed before counts as
    /// idle): a key not in the table starts from its stray TAT, so an extra
    /// charge is never lost for want of room (but past [`STRAYS`]).
    strays: Mutex<HashMap<u64, Nanos>>,
    /// No stray TAT is later than this (0 while there are none): once it
    /// has passed, none counts, and a key not found takes no lock.
    strays_until: AtomicU64,
    stripes: Box<[Mutex<()>]>,
}

#[repr(align(64))]
struct Counts {
    /// Slots ever used (taken while empty): slots are never emptied, so
    /// this is how full the slots in use are.
    used: AtomicU64,
    /// The next slot the sweep after the last doubling looks at, and the
    /// end of what it sweeps (the slots in use before it).
    sweep: AtomicU64,
    sweep_end: AtomicU64,
}

/// The slots `bits` addresses, as a mask of a position.
#[inline]
fn mask(bits: u32) -> u64 {
    (1u64 << bits) - 1
}

impl Table {
    pub(super) fn new(slots: u64) -> Self {
        debug_assert!(slots.is_power_of_two() && slots >= MIN_SLOTS);
        let max_bits = slots.trailing_zeros();
        let first_bits = max_bits.min(FIRST_BITS);
        let page_slots = slots.min(PAGE);
        Table {
            pages: (0..slots / page_slots).map(|_| OnceLock::new()).collect(),
            page_slots,
            bits: AtomicU32::new(first_bits),
            first_bits,
            max_bits,
            moves: AtomicU64::new(0),
            counts: Counts {
                used: AtomicU64::new(0),
                sweep: AtomicU64::new(0),
                sweep_end: AtomicU64::new(0),
            },
            growing: Mutex::new(()),
            strays: Mutex::new(HashMap::new()),
            strays_until: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Every slot the table may grow to.
    pub(super) fn slots(&self) -> u64 {
        1 << self.max_bits
    }

    /// The slot at `i` (already taken modulo the slots in use) if its page
    /// exists.
    #[inline]
    fn get(&self, i: u64) -> Option<&Slot> {
        let page = self.pages[(i >> PAGE_BITS) as usize].get()?;
        Some(&page[(i & (PAGE - 1)) as usize])
    }

    /// The slot at `i`, allocating its page.
    fn get_or_alloc(&self, i: u64) -> &Slot {
        let page = self.pages[(i >> PAGE_BITS) as usize]
            .get_or_init(|| (0..self.page_slots).map(|_| Slot::empty()).collect());
        &page[(i & (PAGE - 1)) as usize]
    }

    /// The table's bits now.
    #[inline]
    fn bits(&self) -> u32 {
        self.bits.load(Ordering::Acquire)
    }

    /// Finds the key's slot and the word it held, under the table's `bits`
    /// or, failing that, under fewer: with the bits it was found under.
    #[inline(always)]
    fn find(&self, key: SlotKey, bits: u32) -> Option<(Found<'_>, u32)> {
        let moves = self.moves.load(Ordering::Acquire);
        match self.find_under(key, bits) {
            Some(found) => Some((found, bits)),
            // No key moves before a first doubling. The bits are read again:
            // `bits` was read before `moves`, and the table may have doubled
            // (and the key moved) in between.
            None if self.bits() > self.first_bits => self.find_moving(key, bits, moves),
            None => None,
        }
    }

    /// [`find`](Self::find) for a key not under `searched`, the bits it was
    /// looked for under: under the table's bits now if they are more, under
    /// fewer, and again from the top if a key moved meanwhile (`moves` was
    /// read before the first search).
    #[cold]
    fn find_moving(&self, key: SlotKey, searched: u32, mut moves: u64) -> Option<(Found<'_>, u32)> {
        let mut bits = self.bits();
        // The table doubled after `searched` was read, perhaps before
        // `moves` was: the key may have moved under the new bits before the
        // count below could see it. Unchecked, a peek then found nothing: a
        // spent key's bucket seen fresh.
        if bits != searched
            && let Some(found) = self.find_under(key, bits)
        {
            return Some((found, bits));
        }
        let mut spins = 0u32;
        loop {
            if let Some(found) = self.find_earlier(key, bits) {
                return Some(found);
            }
            let now = self.moves.load(Ordering::Acquire);
            if now >> 32 == moves >> 32 && moves as u32 == 0 {
                return None;
            }
            spins += 1;
            if spins % 64 == 0 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
            moves = now;
            bits = self.bits();
            if let Some(found) = self.find_under(key, bits) {
                return Some((found, bits));
            }
        }
    }

    /// [`find`](Self::find) under fewer bits than `bits`, skipping those
    /// whose window is the same slots as the one searched before.
    #[cold]
    fn find_earlier(&self, key: SlotKey, bits: u32) -> Option<(Found<'_>, u32)> {
        let same = |fewer: u32, more: u32| {
            let start = key.pos & mask(fewer);
            start == key.pos & mask(more) && start + WINDOW <= mask(fewer) + 1
        };
        let mut searched = bits;
        for fewer in (self.first_bits..bits).rev() {
            if same(fewer, searched) {
                continue;
            }
            searched = fewer;
            if let Some(found) = self.find_under(key, fewer) {
                return Some((found, fewer));
            }
        }
        None
    }

    /// Finds the key's slot in its window under `bits`. Keys never sit past
    /// an empty slot of their window (slots are never emptied once used), so
    /// the search stops at the first one.
    #[inline]
    fn find_under(&self, key: SlotKey, bits: u32) -> Option<Found<'_>> {
        let waiting = handing_over(key.fp);
        let mask = mask(bits);
        let mut spins = 0u32;
        for i in 0..WINDOW {
            let slot = self.get(key.pos.wrapping_add(i) & mask)?;
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
    pub(super) fn peek(&self, key: SlotKey, now: Nanos) -> Nanos {
        self.find(key, self.bits())
            .map_or_else(|| self.stray(key, now), |(f, _)| f.word ^ key.fp)
    }

    /// Applies `op` to the key's TAT (0 for a key not tracked): when it returns
    /// `Some(new)`, stores `new` atomically, retrying `op` on contention.
    /// A key not found under the table's bits has `op` tried on 0 first,
    /// and again (on 0, or on the key's state) after the search under
    /// fewer bits: only the last call's answer is kept.
    /// Errors with the time until a slot frees when a new key finds no room.
    #[inline(always)]
    pub(super) fn update<R>(
        &self,
        key: SlotKey,
        now: Nanos,
        mut op: impl FnMut(Nanos) -> (Option<Nanos>, R),
    ) -> Result<R, Nanos> {
        // Whether a key not under the table's bits is looked for under
        // fewer. Not at first: a new key's state goes to `insert`, which
        // looks under every bits itself (under the key's stripe lock, the
        // search that counts), so a new key's windows are searched once.
        let mut thorough = false;
        loop {
            let bits = self.bits();
            let found = if thorough {
                self.find(key, bits)
            } else {
                self.find_under(key, bits).map(|f| (f, bits))
            };
            if let Some((Found { slot, word }, under)) = found {
                if under != bits && self.relocate(key, now) {
                    continue;
                }
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
            let stray = self.stray(key, now);
            let (new, r) = op(stray);
            let Some(n) = new.filter(|&n| n != 0) else {
                if !thorough {
                    // An answer on a fresh state only once the key is
                    // known not to sit under fewer bits (nor to have
                    // moved up since `bits` was read).
                    thorough = true;
                    continue;
                }
                // Nothing to store: an idle key needs no slot.
                return Ok(r);
            };
            match self.insert(key, n, now) {
                Inserted::Done => {
                    if stray != 0 {
                        self.settled(key, stray);
                    }
                    return Ok(r);
                }
                // Placed meanwhile, under fewer bits than searched, or
                // moved up since `bits` was read.
                Inserted::Present => thorough = true,
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
        // The bits under which this key's full window was swept.
        let mut swept = None;
        loop {
            let (inserted, bits) = self.insert_under_lock(key, tat, now);
            // Outside the stripe lock: sweeping and doubling take others.
            self.sweep_some(now);
            match inserted {
                // Full of keys the sweep has not moved yet, the window is
                // full only until it does: they move first, and only a
                // window still full doubles the table.
                Inserted::Full(_) if swept != Some(bits) && self.sweep_window(key, bits, now) => {
                    swept = Some(bits);
                    continue;
                }
                Inserted::Full(_) if self.grow(bits, now) => continue,
                Inserted::Done if self.counts.used.load(Ordering::Relaxed) * 2 > mask(bits) + 1 => {
                    // Half the slots in use used: twice as many.
                    self.grow(bits, now);
                }
                _ => {}
            }
            return inserted;
        }
    }

    /// [`insert`](Self::insert) under the key's stripe lock, with the bits
    /// it was placed under (or found full).
    fn insert_under_lock(&self, key: SlotKey, tat: Nanos, now: Nanos) -> (Inserted, u32) {
        let _guard = self.stripe(key).lock();
        let bits = self.bits();
        if self.find(key, bits).is_some() {
            return (Inserted::Present, bits);
        }
        match self.take(key, bits, tat, now) {
            Taken::Slot(slot) => {
                slot.tag.store(key.fp, Ordering::Release);
                (Inserted::Done, bits)
            }
            Taken::Full(retry) => (Inserted::Full(retry), bits),
        }
    }

    /// Sweeps a few slots of those in use before the last doubling, moving
    /// their keys to their windows under the table's bits.
    #[cold]
    fn sweep_some(&self, now: Nanos) {
        for _ in 0..SWEEP_PER_INSERT {
            if !self.sweep_one(now) {
                return;
            }
        }
    }

    /// Sweeps the next slot: `false` when the sweep is over.
    fn sweep_one(&self, now: Nanos) -> bool {
        if self.sweep_over() {
            return false;
        }
        let i = self.counts.sweep.fetch_add(1, Ordering::Relaxed);
        if i >= self.counts.sweep_end.load(Ordering::Acquire) {
            return false;
        }
        if let Some(slot) = self.get(i) {
            self.move_behind(slot, now);
        }
        true
    }

    /// Whether the sweep after the last doubling has taken every slot it
    /// covers (a slot taken may still be being swept).
    #[inline]
    fn sweep_over(&self) -> bool {
        self.counts.sweep.load(Ordering::Relaxed) >= self.counts.sweep_end.load(Ordering::Acquire)
    }

    /// Moves the keys of `key`'s window under `bits` that still sit under
    /// fewer bits (placed before the last doubling and not yet swept), each
    /// leaving its slot idle: `true` when one was. Half the keys of a
    /// window in the part of the table not yet swept move, so a window
    /// full of them is not taken for a full table.
    #[cold]
    fn sweep_window(&self, key: SlotKey, bits: u32, now: Nanos) -> bool {
        // Once the sweep is over, no window is worth looking through: at
        // the cap, a new key refused for a full window pays nothing more.
        if self.sweep_over() {
            return false;
        }
        let mut behind = false;
        for i in 0..WINDOW {
            if let Some(slot) = self.get(key.pos.wrapping_add(i) & mask(bits)) {
                behind |= self.move_behind(slot, now);
            }
        }
        behind
    }

    /// Moves the key in `slot` to its window under the table's bits if it
    /// sits under fewer: `true` when it did sit under fewer.
    fn move_behind(&self, slot: &Slot, now: Nanos) -> bool {
        let (tag, _) = slot.read();
        if !owned(tag) || tag == MOVED {
            return false;
        }
        // Where it is does not matter: relocate finds it.
        let key = SlotKey::of(tag);
        let bits = self.bits();
        match self.find(key, bits) {
            Some((_, under)) if under != bits => {
                self.relocate(key, now);
                true
            }
            _ => false,
        }
    }

    /// Doubles the slots in use, from `bits`, once the sweep after the last
    /// doubling is over (this thread ends it if need be): `true` when the
    /// table has more bits than `bits` now (this thread or another doubled
    /// it), `false` at the cap.
    #[cold]
    fn grow(&self, bits: u32, now: Nanos) -> bool {
        if bits >= self.max_bits {
            return false;
        }
        let _growing = self.growing.lock();
        if self.bits() == bits {
            while self.sweep_one(now) {}
            self.counts.sweep.store(0, Ordering::Relaxed);
            self.counts
                .sweep_end
                .store(mask(bits) + 1, Ordering::Release);
            self.bits.store(bits + 1, Ordering::Release);
        }
        true
    }

    /// The stripe of the insertion lock a key's inserts and moves take. It
    /// is the same under every bits (the low bits of the position are), so
    /// it serialises everything that places one key.
    #[inline]
    fn stripe(&self, key: SlotKey) -> &Mutex<()> {
        &self.stripes[(key.pos as usize) & (STRIPES - 1)]
    }

    /// Moves a key found under fewer bits than the table's to its window
    /// under the table's bits, with its state: `false` when it could not
    /// (its new window has no idle slot), and it stays where it is; `true`
    /// when the caller should look for the key again. Under the key's stripe lock,
    /// so that no insert places it meanwhile.
    ///
    /// The old slot is marked first (the key's decisions wait), its state
    /// then read and carried to a new slot taken as [`insert`](Self::insert)
    /// takes one (not yet the key's: its tag is still the mark), and the old
    /// word swapped to [`MOVED`]'s idle state, which fails any decision that
    /// read it before the mark; a decision that got in before that swap
    /// changed the state, which is read again. The new slot is then given the
    /// key's tag, and the old one [`MOVED`].
    #[cold]
    fn relocate(&self, key: SlotKey, now: Nanos) -> bool {
        let _guard = self.stripe(key).lock();
        let bits = self.bits();
        let Some((Found { slot: old, .. }, now_under)) = self.find(key, bits) else {
            // Gone meanwhile (handed to another key): the caller looks again.
            return true;
        };
        if now_under == bits {
            return true;
        }
        self.moves.fetch_add(MOVE_BEGUN | 1, Ordering::AcqRel);
        let moved = self.relocate_marked(key, old, bits, now);
        self.moves.fetch_sub(1, Ordering::AcqRel);
        moved
    }

    /// [`relocate`](Self::relocate) of the key in `old` to its window
    /// under `bits`, counted as a move.
    fn relocate_marked(&self, key: SlotKey, old: &Slot, bits: u32, now: Nanos) -> bool {
        let mark = handing_over(key.fp);
        if old
            .tag
            .compare_exchange(key.fp, mark, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Being handed over to another key (whose insert marked it
            // before this lock): the caller looks again.
            return true;
        }
        let mut word = old.word.load(Ordering::Acquire);
        let new = match self.take(key, bits, word ^ key.fp, now) {
            Taken::Slot(slot) => slot,
            Taken::Full(_) => {
                old.tag.store(key.fp, Ordering::Release);
                return false;
            }
        };
        loop {
            match old
                .word
                .compare_exchange(word, MOVED, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(current) => {
                    // Both slots hold the state xored with the key's
                    // fingerprint: the same word.
                    word = current;
                    new.word.store(word, Ordering::Release);
                }
            }
        }
        new.tag.store(key.fp, Ordering::Release);
        old.tag.store(MOVED, Ordering::Release);
        true
    }

    /// Takes the first empty or idle slot of the key's window under `bits`
    /// for the key, with the state `tat`, and leaves it marked (the caller
    /// writes the key's tag): the time until a slot frees when none is, as
    /// of `now`.
    fn take(&self, key: SlotKey, bits: u32, tat: Nanos, now: Nanos) -> Taken<'_> {
        let mask = mask(bits);
        let mut soonest = Nanos::MAX;
        for i in 0..WINDOW {
            let slot = self.get_or_alloc(key.pos.wrapping_add(i) & mask);
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
                if tag == 0 {
                    self.counts.used.fetch_add(1, Ordering::Relaxed);
                }
                return Taken::Slot(slot);
            }
        }
        Taken::Full(soonest)
    }

    pub(super) fn allocated_pages(&self) -> usize {
        self.pages.iter().filter(|p| p.get().is_some()).count()
    }

    /// Keeps `tat`, the TAT of a key that found no slot, for the key's next
    /// change. All are dropped once the latest has passed. At most
    /// [`STRAYS`] are kept: past that the earliest is dropped (a passed one
    /// first), erring toward admitting its key sooner, by what of its
    /// charge had not refilled yet.
    #[cold]
    pub(super) fn keep_stray(&self, key: SlotKey, tat: Nanos, now: Nanos) {
        if tat <= now {
            return;
        }
        let mut strays = self.strays.lock();
        let mut until = self.strays_until.load(Ordering::Relaxed);
        if now >= until {
            strays.clear();
            until = 0;
        }
        strays.insert(key.fp, tat);
        if strays.len() > STRAYS {
            let earliest = strays.iter().min_by_key(|&(_, &t)| t).map(|(&fp, _)| fp);
            if let Some(fp) = earliest {
                strays.remove(&fp);
            }
        }
        self.strays_until.store(until.max(tat), Ordering::Release);
    }

    /// The stray TAT of a key not in the table (0 if none), at `now`.
    #[inline]
    fn stray(&self, key: SlotKey, now: Nanos) -> Nanos {
        if now >= self.strays_until.load(Ordering::Acquire) {
            return 0;
        }
        self.stray_of(key)
    }

    #[cold]
    fn stray_of(&self, key: SlotKey) -> Nanos {
        self.strays.lock().get(&key.fp).copied().unwrap_or(0)
    }

    /// The key got a slot, with a state made from its stray TAT `tat`.
    #[cold]
    fn settled(&self, key: SlotKey, tat: Nanos) {
        let mut strays = self.strays.lock();
        if strays.get(&key.fp) == Some(&tat) {
            strays.remove(&key.fp);
        }
        if strays.is_empty() {
            self.strays_until.store(0, Ordering::Release);
        }
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
        self.allocated_pages() * (self.page_slots as usize) * std::mem::size_of::<Slot>()
    }

    fn slots_in_use(&self) -> impl Iterator<Item = &Slot> {
        self.pages
            .iter()
            .filter_map(|p| p.get())
            .flat_map(|p| p.iter())
    }

    /// The table's size so far, in slots.
    #[cfg(test)]
    pub(super) fn size(&self) -> u64 {
        1 << self.bits()
    }

    /// The fingerprint of every key placed.
    #[cfg(test)]
    pub(super) fn fingerprints(&self) -> Vec<u64> {
        self.slots_in_use()
            .map(|s| s.read().0)
            .filter(|&t| owned(t) && t != MOVED)
            .collect()
    }
}

enum Inserted {
    Done,
    Present,
    Full(Nanos),
}

enum Taken<'t> {
    /// Taken, and marked for the key.
    Slot(&'t Slot),
    Full(Nanos),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Once the latest stray TAT has passed, a key not found reads the bound
    /// alone (no lock), and the next stray kept clears the others.
    #[test]
    fn passed_strays_take_no_lock_and_are_cleared() {
        let t = Table::new(MIN_SLOTS);
        let (a, b) = (SlotKey::at(1, 1), SlotKey::at(2, 1));
        t.keep_stray(a, 1_000, 0);
        t.keep_stray(b, 2_000, 0);
        assert_eq!(t.strays_until.load(Ordering::Relaxed), 2_000);
        assert_eq!(t.peek(a, 500), 1_000);
        assert_eq!(t.peek(b, 1_500), 2_000);

        // While the lock is held elsewhere, a look that took it would wait.
        let t = &t;
        std::thread::scope(|s| {
            let _held = t.strays.lock();
            let (tx, rx) = std::sync::mpsc::channel();
            s.spawn(move || {
                let _ = tx.send((t.peek(a, 2_000), t.update(b, 2_000, |tat| (None, tat))));
            });
            let looked = rx.recv_timeout(std::time::Duration::from_secs(10));
            assert_eq!(
                looked,
                Ok((0, Ok(0))),
                "a look at passed strays took the lock"
            );
        });

        let c = SlotKey::at(3, 1);
        t.keep_stray(c, 3_000, 2_500);
        assert_eq!(t.strays.lock().len(), 1);
        assert_eq!(t.strays_until.load(Ordering::Relaxed), 3_000);
        assert_eq!(t.peek(c, 2_500), 3_000);
    }

    /// Past [`STRAYS`], the earliest TAT is dropped.
    #[test]
    fn strays_are_capped_dropping_the_earliest() {
        let t = Table::new(MIN_SLOTS);
        let key = |i: usize| SlotKey::at(i as u32, 1);
        for i in 0..STRAYS + 10 {
            // The 10 after the first are earlier than every other.
            let tat = if (1..=10).contains(&i) {
                100 + i
            } else {
                1_000 + i
            };
            t.keep_stray(key(i), tat as Nanos, 0);
            assert!(t.strays.lock().len() <= STRAYS);
        }
        assert_eq!(t.strays.lock().len(), STRAYS);
        for i in 1..=10 {
            assert_eq!(t.peek(key(i), 0), 0, "{i}");
        }
        assert_eq!(t.peek(key(0), 0), 1_000);
        let last = STRAYS + 9;
        assert_eq!(t.peek(key(last), 0), (1_000 + last) as Nanos);
    }
}
