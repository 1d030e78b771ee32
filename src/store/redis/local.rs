//! The local copy: how a plan whose failure mode is
//! [`Local`](crate::FailureMode::Local) is decided while Redis cannot decide
//! (unreachable, too slow, or more calls in flight than the store takes for
//! a request Redis has not denied lately, see `denials`).
//!
//! It is this instance's own [`MemoryStore`], deciding the same limits of
//! the same subjects (named by the same per-process digests the memory
//! store uses) from its own state: an outage admits at most N times the
//! limits on N instances, never unlimited traffic. It counts what its
//! instance admitted through Redis (the places under concurrency caps
//! included, until their responses end), and is not merged back into Redis.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::sync::Mutex;

use super::call::{Part, Quota};
use super::store::Inner;
use crate::clock::Clock;
use crate::plan::{FailureMode, LimitKind};
use crate::store::{
    Acquire, Applied, ConcurrencyRef, Denied, MemoryStore, Permit, QuotaRef, Report, Reservation,
    Settlement, StoreError, ThrottleRef, Verdict,
};

/// The local copy of every limit, and the places it granted.
#[derive(Debug)]
pub(super) struct Local {
    store: MemoryStore,
    /// Places under concurrency caps the copy granted and that are still
    /// held, so that [`Local::release`] tells them from Redis's.
    held: Mutex<HashMap<Permit, u32>>,
    /// Places Redis granted that the copy counts too, by Redis's permit:
    /// the copy's permit, given back with Redis's.
    mirrored: Mutex<HashMap<Permit, Permit>>,
    /// How many there are of both: the common case (none) reads no lock.
    count: AtomicUsize,
}

impl Local {
    pub(super) fn new(clock: Clock) -> Self {
        // A builder with nothing but a clock cannot fail.
        let store = MemoryStore::builder()
            .clock(clock)
            .build()
            .unwrap_or_default();
        Local {
            store,
            held: Mutex::default(),
            mirrored: Mutex::default(),
            count: AtomicUsize::new(0),
        }
    }

    /// Decides a request whose limits are `parts` (a cluster's stage part
    /// first) from the local copy, as the memory store decides.
    pub(super) fn decide(&self, parts: &[&Part], failure: FailureMode) -> Verdict {
        let mut report = Report::default();
        let mut verdict = with_acquire(parts, failure, true, |a| self.store.decide(a, &mut report))
            .map(|()| report);
        if let Ok(report) = &mut verdict {
            // Its tokens are settled here (see [`Local::settle`]).
            report.reserved.local = true;
            for permit in report.permits() {
                *self.held.lock().entry(permit).or_default() += 1;
                self.count.fetch_add(1, Ordering::AcqRel);
            }
        }
        verdict
    }

    /// Charges the local copy with a request Redis (or a share of it) let
    /// through, and lowers each quota of the copy to what Redis said
    /// remains of it (`report`): should Redis fail, the copy goes on from
    /// the shared count as last seen, rather than from nothing. What the
    /// copy would deny is not charged (it never denies Redis). Each place
    /// Redis granted under a concurrency cap takes one in the copy too,
    /// until [`Local::release`] gives back Redis's: a response still held
    /// when Redis fails counts against the cap the copy then decides.
    pub(super) fn mirror(&self, parts: &[&Part], report: &Report) {
        let _ = with_acquire(parts, FailureMode::Local, false, |a| {
            self.store.decide::<()>(a, &mut ())
        });
        for item in report.items() {
            self.learn(parts, item);
        }
        for permit in report.permits() {
            self.count_place(parts, permit);
        }
    }

    /// Takes a place in the copy for the place `redis` granted, under the
    /// cap of `parts` that holds it.
    fn count_place(&self, parts: &[&Part], redis: Permit) {
        let Some(cap) = parts
            .iter()
            .flat_map(|p| &p.caps)
            .find(|c| c.permit == redis)
        else {
            return;
        };
        let alone = Part {
            cost: 1,
            caps: vec![*cap],
            ..Part::default()
        };
        let mut report = Report::default();
        let taken = with_acquire(&[&alone], FailureMode::Local, true, |a| {
            self.store.decide(a, &mut report)
        });
        if let (Ok(()), Some(mine)) = (taken, report.permits().next()) {
            self.mirrored.lock().insert(redis, mine);
            self.count.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Lowers the copy of the quota Redis denied to what remains of it.
    pub(super) fn learn_denial(&self, parts: &[&Part], denied: &Denied) {
        self.learn(parts, &denied.limit);
    }

    fn learn(&self, parts: &[&Part], item: &Applied) {
        let Some(q) = parts
            .iter()
            .flat_map(|p| &p.quotas)
            .find(|q| q.kind == item.kind)
        else {
            return;
        };
        self.store.quota_at_most(&q.local_ref(), item.remaining);
    }

    /// Settles the actual tokens of a request in the copy. An
    /// under-estimate is charged whoever decided: the copy counts what its
    /// instance admitted, and a copy that saw only estimates (0 by default,
    /// the whole cost settled after the response) would admit tokens
    /// without bound through an outage. An over-estimate goes back only
    /// when the copy decided the request: one Redis decided charged the
    /// copy as it stood then, on Redis's time line, and is left counted in
    /// full (erring toward admitting less).
    pub(super) fn settle(&self, settlement: &Settlement<'_>) {
        use crate::store::Store as _;
        if settlement.reserved.local {
            self.store.settle(settlement);
        } else if settlement.delta > 0 {
            self.store.settle(&Settlement {
                reserved: Reservation::default(),
                ..*settlement
            });
        }
    }

    /// Gives back `permit` if the local copy granted it; `false` if it is
    /// Redis's (whose place in the copy, if it took one, goes back here).
    pub(super) fn release(&self, permit: Permit) -> bool {
        use crate::store::Store as _;
        if self.count.load(Ordering::Acquire) == 0 {
            return false;
        }
        let mirrored = self.mirrored.lock().remove(&permit);
        if let Some(mine) = mirrored {
            self.count.fetch_sub(1, Ordering::AcqRel);
            self.store.release(mine);
            return false;
        }
        let mut held = self.held.lock();
        let Some(n) = held.get_mut(&permit) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            held.remove(&permit);
        }
        drop(held);
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.store.release(permit);
        true
    }
}

impl Inner {
    /// Redis could not decide a request whose limits are `parts`: under
    /// [`Local`](FailureMode::Local) the local copy decides it (and the
    /// failure is counted and logged here); under `Open` and `Closed` the
    /// error goes to the layer, which decides and logs.
    pub(super) fn fail(
        &self,
        e: StoreError,
        failure: FailureMode,
        parts: &[&Part],
    ) -> Result<Verdict, StoreError> {
        match failure {
            FailureMode::Local => {
                self.failures.failed(&e);
                Ok(self.local.decide(parts, failure))
            }
            _ => Err(e),
        }
    }
}

/// The request whose limits are `parts`, as the memory store takes it
/// (with its concurrency caps when `cap`), handed to `run`.
fn with_acquire<T>(
    parts: &[&Part],
    failure: FailureMode,
    cap: bool,
    run: impl FnOnce(&Acquire<'_>) -> T,
) -> T {
    let (cost, tokens) = parts.first().map_or((0, 0), |p| (p.cost, p.tokens));
    let mut acquire = Acquire::new(cost, failure);
    acquire.tokens = tokens;
    for t in parts.iter().flat_map(|p| &p.throttles) {
        acquire.push(ThrottleRef {
            limit: &t.limit,
            plan: if t.stage || t.account { None } else { Some("") },
            account: if t.account { Some("") } else { None },
            subject: b"",
            digest: t.digest,
            shadow: t.shadow,
        });
    }
    for q in parts.iter().flat_map(|p| &p.quotas) {
        let r = q.local_ref();
        match q.kind {
            LimitKind::TokensDay => acquire.token_quotas[0] = Some(r),
            LimitKind::TokensMonth => acquire.token_quotas[1] = Some(r),
            LimitKind::AccountQuota => acquire.account_quotas[0] = Some(r),
            LimitKind::AccountTokensDay => acquire.account_quotas[1] = Some(r),
            LimitKind::AccountTokensMonth => acquire.account_quotas[2] = Some(r),
            LimitKind::ModelQuota => acquire.model_quotas[0] = Some(r),
            LimitKind::ModelTokensDay => acquire.model_quotas[1] = Some(r),
            LimitKind::ModelTokensMonth => acquire.model_quotas[2] = Some(r),
            _ => acquire.quota = Some(r),
        }
    }
    for c in parts.iter().flat_map(|p| &p.caps).filter(|_| cap) {
        let r = ConcurrencyRef {
            kind: c.kind,
            limit: c.limit,
            salt: c.salt,
            plan: "",
            subject: b"",
            digest: c.digest,
            shadow: c.shadow,
        };
        match c.kind {
            LimitKind::ModelConcurrency => acquire.model_concurrency = Some(r),
            _ => acquire.concurrency = Some(r),
        }
    }
    run(&acquire)
}

impl Quota {
    /// The quota as the local copy counts it: by the memory store's digest.
    fn local_ref(&self) -> QuotaRef<'_> {
        QuotaRef {
            kind: self.kind,
            spec: &self.spec,
            plan: "",
            account: self.kind.is_account().then_some(""),
            subject: b"",
            digest: self.digest,
            shadow: self.shadow,
            history_days: self.history_days,
        }
    }
}
