//! Configuring a [`MemoryStore`]: its cap on tracked keys and its clock.

use std::sync::Arc;

use super::quotas::Quotas;
use super::resets::Resets;
use super::table::{MIN_SLOTS, Table};
use super::{Inner, MemoryStore};
use crate::clock::Clock;
use crate::error::ConfigError;

/// The default cap on tracked keys.
const DEFAULT_MAX_KEYS: usize = 1_000_000;
/// The largest cap accepted (2^32 keys, 64 GiB of table).
const MAX_MAX_KEYS: usize = 1 << 32;

/// Configures a [`MemoryStore`].
#[derive(Debug)]
#[must_use]
pub struct MemoryStoreBuilder {
    max_keys: usize,
    clock: Option<Clock>,
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        MemoryStoreBuilder {
            max_keys: DEFAULT_MAX_KEYS,
            clock: None,
        }
    }
}

impl MemoryStoreBuilder {
    /// Room for `n` keys: the table may grow to `2n` slots rounded up to a
    /// power of two, 16 bytes each, allocated in 64 KiB pages as first
    /// touched. Default 1,000,000.
    ///
    /// `n` sizes the table, which bounds memory; it is not an exact count of
    /// keys. Each live limit of a key takes one slot (its throttle, each
    /// method override, its token bucket, its count of requests in flight):
    /// keys of one throttle each fit `n` with room to spare, and up to
    /// [`capacity`](MemoryStore::capacity) of them may when slots are free
    /// near their hash. A new key that finds no free slot in its window is refused
    /// (429), never given a live key's slot. Anonymous subjects (client IPs,
    /// a per-key policy's keys) and registered ones (API keys, accounts,
    /// the stage) each have a table of this size, so that clients without a
    /// key never take a registered key's room. The table starts at 16,384 slots
    /// and doubles as keys come (half of its slots used), so a store
    /// used far below `n` holds about 32 to 64 bytes per key, not the whole
    /// table (see BENCHMARKS.md, "Memory").
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n;
        self
    }

    /// The clock (default: [`Clock::system`]).
    pub fn clock(mut self, clock: impl Into<Clock>) -> Self {
        self.clock = Some(clock.into());
        self
    }

    /// Builds the store; errors when `max_keys` is 0 or above 2^32.
    pub fn build(self) -> Result<MemoryStore, ConfigError> {
        if self.max_keys == 0 {
            return Err(ConfigError::InvalidStore("max_keys must be at least 1"));
        }
        if self.max_keys > MAX_MAX_KEYS {
            return Err(ConfigError::InvalidStore("max_keys must be at most 2^32"));
        }
        let slots = (2 * self.max_keys as u64)
            .next_power_of_two()
            .max(MIN_SLOTS);
        Ok(MemoryStore {
            inner: Arc::new(Inner {
                clock: self.clock.unwrap_or_default(),
                tables: [Table::new(slots), Table::new(slots)],
                quotas: Quotas::new(self.max_keys),
                resets: Resets::default(),
                changes: Default::default(),
            }),
        })
    }
}
