//! A mutex whose `lock` returns the guard, as the crate's locks are used.
//!
//! `std::sync::Mutex` poisons itself when a thread panics while holding it;
//! every lock of this crate guards data that stays consistent at each point
//! where a panic can happen (a map, a counter, a unit stripe), so a poisoned
//! lock is taken as it is rather than propagating an unrelated panic into
//! every later request.

use std::sync::{MutexGuard, PoisonError};

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

    /// Locks the mutex if no other thread holds it; never waits.
    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        match self.0.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}
