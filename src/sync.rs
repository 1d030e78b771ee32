//! A mutex whose `lock` returns the guard, as the crate's locks are used.
//!
//! `std::sync::Mutex` poisons itself when a thread panics while holding it;
//! every lock of this crate guards data that stays consistent at each point
//! where a panic can happen (a map, a counter, a unit stripe), so a poisoned
//! lock is taken as it is rather than propagating an unrelated panic into
//! every later request.

use std::sync::{Arc, MutexGuard, OnceLock, PoisonError};

/// `std::sync::Mutex` without lock poisoning.
#[derive(Debug, Default)]
pub(crate) struct Mutex<T: ?Sized>(std::sync::Mutex<T>);

impl<T> Mutex<T> {
    /// A new unlocked mutex holding `value`.
    pub(crate) const fn new(value: T) -> Self {
        Self(std::sync::Mutex::new(value))
    }
}

impl<T: ?Sized> Mutex<T> {
    /// Locks the mutex, waiting while another thread holds it.
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The process's one collector of the memory freed by tollgate's lock-free
/// maps (the key registry, the memory store's quota counters).
///
/// A map read without a lock holds a guard of its collector while it reads;
/// entering one costs a store, leaving one an atomic swap (about 5 ns
/// each time). Maps sharing one collector share their guards: a decision
/// that reads the registry and then a quota counter enters once, and the
/// counter's map only counts itself in on the guard already held.
pub(crate) fn collector() -> Arc<seize::Collector> {
    static COLLECTOR: OnceLock<Arc<seize::Collector>> = OnceLock::new();
    Arc::clone(COLLECTOR.get_or_init(|| Arc::new(seize::Collector::new())))
}
