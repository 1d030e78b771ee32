//! Values found by a 128-bit key without a guard: an insert-only index for
//! what is never removed (the quota counters that keep usage history).
//!
//! A lock-free map that removes entries (papaya) must know when no reader
//! still holds one before it frees it, so every read enters and leaves a
//! guard: an atomic swap on leaving, some 5 ns, as much as the rest of a
//! quota's decision. What is never removed needs none of that. Here,
//! entries are appended to chunks that are never freed while the index
//! lives, and found through a table of 64-bit words (the key's high bits
//! and the entry's number). When the table would be more than three
//! quarters full, a table twice as large is filled and put in its place;
//! the old one is kept for the readers that may still be probing it (the
//! tables before the current one take, together, less room than it). A
//! reader of an older table misses only entries added since, which the
//! caller looks for where they were made. Only [`insert`](Kept::insert),
//! under a lock, writes; a reader never waits.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::sync::Mutex;

/// Slots of the first table (log2).
const FIRST_BITS: u32 = 6;
/// Tables made at most: the last has 2^(6 + 31) slots, more than memory.
const LEVELS: usize = 32;
/// Entries of the first chunk (log2); chunk `i` holds `2^(6 + i)`.
const CHUNK_BITS: u32 = 6;
/// Chunks at most: together they hold more than the 2^32 - 2 entries a
/// table word can number.
const CHUNKS: usize = 27;

/// A chunk of entries, each set once.
type Chunk<T> = Box<[OnceLock<([u64; 2], T)>]>;

/// An insert-only index from 128-bit keys to values of type `T`.
pub(super) struct Kept<T> {
    /// Table `i` has `2^(FIRST_BITS + i)` slots; `level` is the one in use.
    /// A slot is 0 (empty) or the key's high 32 bits above the entry's
    /// number plus one.
    tables: [OnceLock<Box<[AtomicU64]>>; LEVELS],
    level: AtomicUsize,
    chunks: [OnceLock<Chunk<T>>; CHUNKS],
    /// Entries made; taken by every insertion.
    len: Mutex<usize>,
}

impl<T> Kept<T> {
    pub(super) fn new() -> Self {
        Kept {
            tables: std::array::from_fn(|_| OnceLock::new()),
            level: AtomicUsize::new(0),
            chunks: std::array::from_fn(|_| OnceLock::new()),
            len: Mutex::new(0),
        }
    }

    /// The value of `key`, if it was inserted (and, when an insertion is
    /// under way, perhaps not yet).
    #[inline]
    pub(super) fn get(&self, key: u128) -> Option<&T> {
        let table = self.tables[self.level.load(Ordering::Acquire)].get()?;
        let mask = table.len() - 1;
        let high = (key >> 96) as u64;
        let mut i = key as usize & mask;
        // A table is never more than three quarters full: the probe ends.
        loop {
            let word = table[i].load(Ordering::Acquire);
            if word == 0 {
                return None;
            }
            if word >> 32 == high {
                if let Some((k, v)) = self.entry(word as u32 as usize - 1) {
                    if *k == halves(key) {
                        return Some(v);
                    }
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// Inserts `make()` under `key` unless `key` has a value; returns
    /// whether it was inserted. At the most entries a table word can number,
    /// nothing more is inserted (the caller finds it where it was made).
    pub(super) fn insert(&self, key: u128, make: impl FnOnce() -> T) -> bool {
        let mut len = self.len.lock();
        if self.get(key).is_some() || *len >= u32::MAX as usize - 1 {
            return false;
        }
        let n = *len;
        let (c, at) = chunk_of(n);
        let (Some(chunk), Some(table)) = (self.chunks.get(c), self.table_for(n + 1)) else {
            return false;
        };
        let chunk = chunk.get_or_init(|| {
            (0..1usize << (CHUNK_BITS + c as u32))
                .map(|_| OnceLock::new())
                .collect()
        });
        // Set before its number is published: a reader that finds the
        // number finds the entry.
        let _ = chunk[at].set((halves(key), make()));
        place(table, key, n);
        *len = n + 1;
        true
    }

    /// Entries made.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        *self.len.lock()
    }

    /// The table to hold `entries` entries, made (holding the first
    /// `entries - 1`) when the one in use would be more than three quarters
    /// full. Under the insertion lock.
    fn table_for(&self, entries: usize) -> Option<&[AtomicU64]> {
        let level = self.level.load(Ordering::Relaxed);
        let next = match self.tables[level].get() {
            Some(t) if entries * 4 <= t.len() * 3 => return Some(t),
            Some(_) => level + 1,
            None => level,
        };
        let slots = 1usize.checked_shl(FIRST_BITS + next as u32)?;
        let table: Box<[AtomicU64]> = (0..slots).map(|_| AtomicU64::new(0)).collect();
        for n in 0..entries - 1 {
            let (k, _) = self.entry(n)?;
            place(&table, u128::from(k[0]) << 64 | u128::from(k[1]), n);
        }
        let _ = self.tables.get(next)?.set(table);
        self.level.store(next, Ordering::Release);
        self.tables[next].get().map(|t| &**t)
    }

    /// Entry `n`, if it was set.
    #[inline]
    fn entry(&self, n: usize) -> Option<&([u64; 2], T)> {
        let (c, at) = chunk_of(n);
        self.chunks.get(c)?.get()?.get(at)?.get()
    }
}

/// The key as two words (no 16-byte alignment in an entry).
#[inline]
fn halves(key: u128) -> [u64; 2] {
    [(key >> 64) as u64, key as u64]
}

/// The chunk of entry `n` and its place in it.
#[inline]
fn chunk_of(n: usize) -> (usize, usize) {
    let j = n + (1 << CHUNK_BITS);
    let c = (usize::BITS - 1 - j.leading_zeros()) - CHUNK_BITS;
    (c as usize, j - (1 << (CHUNK_BITS + c)))
}

/// Writes entry `n`'s number into `key`'s first free slot of `table`.
fn place(table: &[AtomicU64], key: u128, n: usize) {
    let mask = table.len() - 1;
    let word = ((key >> 96) as u64) << 32 | (n as u64 + 1);
    let mut i = key as usize & mask;
    while table[i].load(Ordering::Relaxed) != 0 {
        i = (i + 1) & mask;
    }
    table[i].store(word, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn entries_are_numbered_into_doubling_chunks() {
        assert_eq!(chunk_of(0), (0, 0));
        assert_eq!(chunk_of(63), (0, 63));
        assert_eq!(chunk_of(64), (1, 0));
        assert_eq!(chunk_of(191), (1, 127));
        assert_eq!(chunk_of(192), (2, 0));
        let mut expected = (0, 0);
        for n in 0..10_000 {
            assert_eq!(chunk_of(n), expected, "{n}");
            expected.1 += 1;
            if expected.1 == 1 << (CHUNK_BITS + expected.0 as u32) {
                expected = (expected.0 + 1, 0);
            }
        }
    }

    /// Keys that share their high bits and their first slot, and keys that
    /// differ only in one half, are told apart; a key is inserted once.
    #[test]
    fn keys_are_found_through_growth_and_told_apart() {
        let kept = Kept::new();
        let keys: Vec<u128> = (0..5_000u128)
            .flat_map(|i| {
                [
                    i << 96 | 7,
                    7 << 96 | i << 8,
                    i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
                ]
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for (n, &k) in keys.iter().enumerate() {
            assert!(kept.get(k).is_none());
            assert!(kept.insert(k, || n));
            assert!(!kept.insert(k, || usize::MAX));
            assert_eq!(kept.get(k), Some(&n));
        }
        for (n, &k) in keys.iter().enumerate() {
            assert_eq!(kept.get(k), Some(&n), "{k:x}");
        }
        assert_eq!(kept.len(), keys.len());
        assert!(kept.get(1 << 100 | 3).is_none());
        // At most three quarters of the table in use, and no table twice
        // larger than needed.
        let level = kept.level.load(Ordering::Relaxed);
        let slots = kept.tables[level].get().unwrap().len();
        assert!(
            keys.len() * 4 <= slots * 3 && slots <= keys.len() * 4,
            "{slots}"
        );
    }

    /// Readers on other threads find every value inserted before they look,
    /// while tables are replaced under them; each key has one value.
    #[test]
    fn readers_find_what_was_inserted_while_it_grows() {
        let kept = Arc::new(Kept::new());
        let done = Arc::new(AtomicUsize::new(0));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (kept, done) = (Arc::clone(&kept), Arc::clone(&done));
                std::thread::spawn(move || {
                    let mut seen = 0;
                    while seen < 20_000 {
                        let upto = done.load(Ordering::Acquire);
                        for n in seen..upto {
                            let k =
                                (n as u128).wrapping_mul(0x2545_f491_4f6c_dd1d_9e37_79b9_7f4a_7c15);
                            assert_eq!(kept.get(k), Some(&(n as u64)));
                        }
                        seen = upto;
                    }
                })
            })
            .collect();
        for n in 0..20_000u64 {
            let k = u128::from(n).wrapping_mul(0x2545_f491_4f6c_dd1d_9e37_79b9_7f4a_7c15);
            assert!(kept.insert(k, || n));
            done.store(n as usize + 1, Ordering::Release);
        }
        for r in readers {
            r.join().unwrap();
        }
    }
}
