//! Values found by a 128-bit key without a guard: an insert-only index for
//! what is never removed (the quota counters that keep usage history).
//!
//! A lock-free map that removes entries (papaya) must know when no reader
//! still holds one before it frees it, so every read enters and leaves a
//! guard: an atomic swap on leaving, some 5 ns, as much as the rest of a
//! quota's decision. What is never removed needs none of that. Here,
//! values are appended to chunks that are never freed while the index
//! lives, and found through a table of 64-bit words (the key's high bits
//! and the entry's number). When the table would be more than three
//! quarters full, a table twice as large is filled and put in its place;
//! the old one is kept for the readers that may still be probing it (the
//! tables before the current one take, together, less room than it).
//!
//! A value is made first ([`push`](Kept::push), which numbers it), and found
//! by its key once [`publish`](Kept::publish) says so: the caller makes a
//! value, lets another structure decide whether it is the one for its key,
//! and publishes only the one that is. A reader of an older table misses
//! only entries published since, which the caller finds where it decided
//! them. Only `push` and `publish`, under a lock, write; a reader never
//! waits.

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

/// A chunk of entries, each set once: the key (as two words, so that an
/// entry needs no 16-byte alignment) and the value.
type Chunk<T> = Box<[OnceLock<([u64; 2], T)>]>;

/// An insert-only index from 128-bit keys to values of type `T`.
pub(super) struct Kept<T> {
    /// Table `i` has `2^(FIRST_BITS + i)` slots; `level` is the one in use.
    /// A slot is 0 (empty) or the key's high 32 bits above the entry's
    /// number plus one.
    tables: [OnceLock<Box<[AtomicU64]>>; LEVELS],
    level: AtomicUsize,
    chunks: [OnceLock<Chunk<T>>; CHUNKS],
    /// Taken by every change.
    made: Mutex<Made>,
}

/// What [`Kept`] changes under its lock.
struct Made {
    /// Entries made.
    len: usize,
    /// The numbers of the entries published, in order.
    published: Vec<u32>,
}

impl<T> Kept<T> {
    pub(super) fn new() -> Self {
        Kept {
            tables: std::array::from_fn(|_| OnceLock::new()),
            level: AtomicUsize::new(0),
            chunks: std::array::from_fn(|_| OnceLock::new()),
            made: Mutex::new(Made {
                len: 0,
                published: Vec::new(),
            }),
        }
    }

    /// The published value of `key`, if any (while it is being published,
    /// perhaps not yet).
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
                if let Some((k, v)) = self.entry(word as u32 - 1) {
                    if *k == halves(key) {
                        return Some(v);
                    }
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// The value numbered `n` by [`push`](Self::push), published or not.
    #[inline]
    pub(super) fn value(&self, n: u32) -> Option<&T> {
        self.entry(n).map(|(_, v)| v)
    }

    /// Makes an entry of `value` for `key`, which [`get`](Self::get) does
    /// not find until it is published; returns its number, or `value` back
    /// when no more can be numbered.
    pub(super) fn push(&self, key: u128, value: T) -> Result<u32, T> {
        let mut made = self.made.lock();
        let n = made.len;
        let (c, at) = chunk_of(n);
        let Some(chunk) = self.chunks.get(c).filter(|_| n < u32::MAX as usize - 1) else {
            return Err(value);
        };
        let chunk = chunk.get_or_init(|| {
            (0..1usize << (CHUNK_BITS + c as u32))
                .map(|_| OnceLock::new())
                .collect()
        });
        chunk[at].set((halves(key), value)).map_err(|(_, v)| v)?;
        made.len = n + 1;
        Ok(n as u32)
    }

    /// Publishes entry `n`: [`get`](Self::get) finds it by its key from
    /// now on, unless another entry of the key was published first.
    pub(super) fn publish(&self, n: u32) {
        let mut made = self.made.lock();
        let Some(&(k, _)) = self.entry(n) else {
            return;
        };
        let key = whole(k);
        if self.get(key).is_some() {
            return;
        }
        let Some(table) = self.table_for(&made.published) else {
            return;
        };
        place(table, key, n);
        made.published.push(n);
    }

    /// Entries made, and entries published.
    #[cfg(test)]
    pub(super) fn counts(&self) -> (usize, usize) {
        let made = self.made.lock();
        (made.len, made.published.len())
    }

    /// The table to hold one more entry than `published`, made (holding
    /// those) when the one in use would be more than three quarters full.
    /// Under the lock.
    fn table_for(&self, published: &[u32]) -> Option<&[AtomicU64]> {
        let level = self.level.load(Ordering::Relaxed);
        let next = match self.tables[level].get() {
            Some(t) if (published.len() + 1) * 4 <= t.len() * 3 => return Some(t),
            Some(_) => level + 1,
            None => level,
        };
        let slots = 1usize.checked_shl(FIRST_BITS + next as u32)?;
        let table: Box<[AtomicU64]> = (0..slots).map(|_| AtomicU64::new(0)).collect();
        for &n in published {
            let (k, _) = self.entry(n)?;
            place(&table, whole(*k), n);
        }
        let _ = self.tables.get(next)?.set(table);
        self.level.store(next, Ordering::Release);
        self.tables[next].get().map(|t| &**t)
    }

    /// Entry `n`, if it was made.
    #[inline]
    fn entry(&self, n: u32) -> Option<&([u64; 2], T)> {
        let (c, at) = chunk_of(n as usize);
        self.chunks.get(c)?.get()?.get(at)?.get()
    }
}

/// The key as two words.
#[inline]
fn halves(key: u128) -> [u64; 2] {
    [(key >> 64) as u64, key as u64]
}

/// The key [`halves`] split.
#[inline]
fn whole(k: [u64; 2]) -> u128 {
    u128::from(k[0]) << 64 | u128::from(k[1])
}

/// The chunk of entry `n` and its place in it.
#[inline]
fn chunk_of(n: usize) -> (usize, usize) {
    let j = n + (1 << CHUNK_BITS);
    let c = (usize::BITS - 1 - j.leading_zeros()) - CHUNK_BITS;
    (c as usize, j - (1 << (CHUNK_BITS + c)))
}

/// Writes entry `n`'s number into `key`'s first free slot of `table`.
fn place(table: &[AtomicU64], key: u128, n: u32) {
    let mask = table.len() - 1;
    let word = ((key >> 96) as u64) << 32 | (u64::from(n) + 1);
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

    /// Pushes and publishes `v` for `k`; the number it got.
    fn insert<T>(kept: &Kept<T>, k: u128, v: T) -> u32 {
        let n = kept.push(k, v).ok().unwrap();
        kept.publish(n);
        n
    }

    /// An entry is found by its key only once published; a key's first
    /// published entry is the one found, whatever is published after it.
    #[test]
    fn an_entry_is_found_once_published_and_a_key_has_one() {
        let kept = Kept::new();
        let a = kept.push(7, "a").unwrap();
        assert!(kept.get(7).is_none());
        assert_eq!(kept.value(a), Some(&"a"));
        let b = kept.push(7, "b").unwrap();
        kept.publish(b);
        kept.publish(a);
        assert_eq!(kept.get(7), Some(&"b"));
        assert_eq!(kept.value(a), Some(&"a"));
        assert!(kept.value(b + 1).is_none());
        assert_eq!(kept.counts(), (2, 1));
    }

    /// Keys that share their high bits and their first slot, and keys that
    /// differ only in one half, are told apart.
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
            insert(&kept, k, n);
            assert_eq!(kept.get(k), Some(&n));
        }
        for (n, &k) in keys.iter().enumerate() {
            assert_eq!(kept.get(k), Some(&n), "{k:x}");
        }
        assert_eq!(kept.counts(), (keys.len(), keys.len()));
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
            insert(&kept, k, n);
            done.store(n as usize + 1, Ordering::Release);
        }
        for r in readers {
            r.join().unwrap();
        }
    }
}
