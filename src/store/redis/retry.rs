//! Settlements Redis did not answer, sent again once it does.
//!
//! A settlement (the tokens a response used beyond or below its estimate,
//! sent in the background as the response ends), and likewise a give-back
//! (a borrowed share's unused units, what one slot of a split decision
//! charged a request another slot refused), that finds Redis unreachable
//! (down, paused, its connection dropped, no answer in time) is not lost:
//! it waits in a queue of this instance, and one task sends the waiting
//! calls again, oldest first, after 100 ms, then twice as long each time
//! up to 2 s apart, at once when a decision of this instance needs one of
//! their keys (it waits for a settlement, as for any on its way, but not
//! for a give-back), and goes on with the next as soon as Redis answers.
//! At most [`MAX_WAITING`] calls wait: past the bound a new one is dropped
//! (its estimate stands, or what it gives back stays charged, as before),
//! counted, and the count logged, so an endless outage cannot grow memory.
//!
//! A call whose reply is lost may have run (Redis paused with it queued, or
//! the connection dropped after it ran): each settlement is therefore sent
//! "once" (its mode with `!` after it, see `script.lua`), with a marker key
//! in its slot that its first run sets for [`MARK_LIFE`]: a later run finds
//! it and changes nothing. So a settlement sent again is applied once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::Notify;

use super::call::Call;
use super::decide::Unanswered;
use super::store::Inner;
use crate::store::{FailureKind, StoreError};
use crate::sync::Mutex;

/// The most settlements of one instance that wait for Redis to answer
/// again; a call is a few hundred bytes.
pub(super) const MAX_WAITING: usize = 4096;

/// How long a settlement's marker lasts in Redis: a run of the call this
/// long after its first run would apply it again.
pub(super) const MARK_LIFE: Duration = Duration::from_secs(60);

/// The pause before the first try again; each pause after it is twice the
/// last, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The settlements waiting, and the task that sends them again.
#[derive(Default)]
pub(super) struct Retries {
    state: Mutex<State>,
    /// Wakes the task from its pause: a decision waits for a call.
    kick: Notify,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Waiting>,
    /// Whether the task that sends them runs.
    retrying: bool,
    /// Calls dropped past the bound since the queue was last empty.
    dropped: u64,
}

/// A settlement waiting, counted under its keys until sent or dropped (a
/// decision on them waits for it), unless it is a give-back no decision
/// waits for.
struct Waiting {
    call: Call,
    _unanswered: Option<Unanswered>,
}

/// Marks the task as ended when dropped before it ended by itself
/// (cancelled with its runtime, or never run): the next call waiting
/// starts another.
struct Retrying(Option<Arc<Inner>>);

impl Drop for Retrying {
    fn drop(&mut self) {
        if let Some(inner) = self.0.take() {
            inner.retries.state.lock().retrying = false;
        }
    }
}

/// The part of `key` up to its hash tag's end (`{prefix}:{tag}`): a key
/// named after it lands in the same Redis Cluster slot.
fn slot_of(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let close = open + 1 + key[open + 1..].find('}')?;
    (close > open + 1).then(|| &key[..=close])
}

impl Inner {
    /// Sends settlement `calls` in the background, each applied once
    /// however often it is sent; one Redis does not answer waits with the
    /// rest to be sent again (see the module documentation). A decision of
    /// this instance on their keys waits for them meanwhile.
    pub(super) fn settle_in_background(self: &Arc<Self>, calls: Vec<Call>) {
        self.send_in_background(calls, true);
    }

    /// Gives back in the background what was charged and not used (a
    /// borrowed share's units, a split decision's refund), each call
    /// applied once however often it is sent, as a settlement is; but a
    /// decision does not wait for it: one sent before it lands errs toward
    /// admitting less, while waiting would delay every decision on a shared
    /// bucket (a stage's) behind the refunds of the requests it denies.
    pub(super) fn give_back_in_background(self: &Arc<Self>, calls: Vec<Call>) {
        self.send_in_background(calls, false);
    }

    fn send_in_background(self: &Arc<Self>, calls: Vec<Call>, waited: bool) {
        let calls: Vec<(Call, Option<Unanswered>)> = calls
            .into_iter()
            .map(|mut call| {
                let unanswered = waited.then(|| Unanswered::new(self, call.keys.clone()));
                self.once(&mut call);
                (call, unanswered)
            })
            .collect();
        let task = Arc::clone(self);
        self.spawn(async move {
            let mut calls = calls.into_iter();
            while let Some((call, unanswered)) = calls.next() {
                match task.within(Arc::clone(&task).run(call.clone())).await {
                    Ok(_) => task.failures.answered(),
                    Err(e) => {
                        task.failures.failed_aside(&e);
                        if !unreached(&e) {
                            tracing::debug!(error = %e, "not settled nor given back");
                            continue;
                        }
                        task.wait_for_redis(call, unanswered);
                        for (call, unanswered) in calls.by_ref() {
                            task.wait_for_redis(call, unanswered);
                        }
                    }
                }
            }
        });
    }

    /// Makes `call` one that Redis applies once however often it is sent:
    /// a marker key in the slot of its keys, set by its first run.
    fn once(&self, call: &mut Call) {
        let Some(slot) = call.keys.first().and_then(|k| slot_of(k)) else {
            return;
        };
        let id = self.members.fetch_add(1, Ordering::Relaxed);
        let marker = format!("{slot}:s:{id:016x}");
        call.keys.push(marker);
        if let Some(mode) = call.args.first_mut() {
            mode.push('!');
        }
        call.arg(MARK_LIFE.as_millis());
    }

    /// Queues `call` to be sent again once Redis answers, within the bound.
    fn wait_for_redis(self: &Arc<Self>, call: Call, unanswered: Option<Unanswered>) {
        let mut state = self.retries.state.lock();
        if state.queue.len() >= MAX_WAITING {
            state.dropped += 1;
            if state.dropped == 1 {
                tracing::warn!(
                    waiting = MAX_WAITING,
                    "rate-limit store: too many settlements wait for Redis; \
                     new ones are dropped and their estimates stand"
                );
            }
            return;
        }
        state.queue.push_back(Waiting {
            call,
            _unanswered: unanswered,
        });
        if state.retrying {
            return;
        }
        state.retrying = true;
        drop(state);
        let retrying = Retrying(Some(Arc::clone(self)));
        let task = Arc::clone(self);
        self.spawn(async move { task.retry(retrying).await });
    }

    /// Sends the waiting settlements again, oldest first, until none waits.
    async fn retry(self: Arc<Self>, mut retrying: Retrying) {
        let mut pause = RETRY_FIRST;
        loop {
            // Until the pause ends, or a decision needs a waiting call.
            let kicked = self.retries.kick.notified();
            let _ = self.paused(tokio::time::timeout(pause, kicked)).await;
            loop {
                let call = {
                    let mut state = self.retries.state.lock();
                    match state.queue.front() {
                        Some(waiting) => waiting.call.clone(),
                        None => {
                            state.retrying = false;
                            retrying.0 = None;
                            let dropped = std::mem::take(&mut state.dropped);
                            if dropped > 0 {
                                tracing::warn!(
                                    dropped,
                                    "rate-limit store: settlements dropped while Redis \
                                     did not answer; their estimates stand"
                                );
                            }
                            return;
                        }
                    }
                };
                match self.within(Arc::clone(&self).run(call)).await {
                    Ok(_) => {
                        self.failures.answered();
                        self.retries.state.lock().queue.pop_front();
                        pause = RETRY_FIRST;
                    }
                    Err(e) if unreached(&e) => {
                        self.failures.failed_aside(&e);
                        pause = (pause * 2).min(RETRY_MAX);
                        break;
                    }
                    Err(e) => {
                        // Redis answered it with an error: sent again, it
                        // would be answered so again.
                        self.failures.failed_aside(&e);
                        tracing::debug!(error = %e, "not settled nor given back");
                        self.retries.state.lock().queue.pop_front();
                    }
                }
            }
        }
    }

    /// Wakes the task that sends waiting settlements again: a decision
    /// waits for one of them.
    pub(super) fn retry_now(&self) {
        self.retries.kick.notify_one();
    }
}

/// Whether Redis did not answer the call (down, paused, its connection
/// lost, too slow, or a Cluster node not serving): sent again later, it
/// may be.
fn unreached(e: &StoreError) -> bool {
    e.kind() == FailureKind::Unreachable
}

#[cfg(test)]
mod tests {
    use super::slot_of;

    #[test]
    fn a_marker_is_named_in_its_keys_slot() {
        assert_eq!(slot_of("tg:{abc}:q:tokens"), Some("tg:{abc}"));
        assert_eq!(slot_of("tg:{}:{abc}:q"), None, "an empty tag is no tag");
        assert_eq!(slot_of("tg:q"), None);
    }
}
