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
//! The places it granted itself, whose responses outlast the outage, still
//! count on this instance once Redis decides again: a request under the
//! same cap takes its place in the copy too before Redis is asked.

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
        self.charge(parts, report);
        for permit in report.permits() {
            self.count_place(parts, permit);
        }
    }

    /// [`mirror`](Self::mirror) but for the places.
    fn charge(&self, parts: &[&Part], report: &Report) {
        let _ = with_acquire(parts, FailureMode::Local, false, |a| {
            self.store.decide::<()>(a, &mut ())
        });
        for item in report.items() {
            self.learn(parts, item);
        }
    }

    /// [`mirror`](Self::mirror) for a request whose places in the copy
    /// were taken before Redis was asked (`reserved`): each is counted as
    /// the copy's place for Redis's, given back with it.
    pub(super) fn mirror_reserved(&self, parts: &[&Part], report: &Report, reserved: Reserved) {
        self.charge(parts, report);
        let mut places = reserved.take();
        for redis in report.permits() {
            match places.iter().position(|(r, _)| *r == redis) {
                Some(i) => {
                    let (_, mine) = places.swap_remove(i);
                    self.mirrored.lock().insert(redis, mine);
                    self.count.fetch_add(1, Ordering::AcqRel);
                }
                None => self.count_place(parts, redis),
            }
        }
        self.give_back(places);
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
        if let Ok(Some(mine)) = self.take_place(cap, 1) {
            self.mirrored.lock().insert(redis, mine);
            self.count.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Takes a place under `cap` in the copy (none for a peek, `cost` 0,
    /// which is only checked), or the copy's denial when it has none free.
    fn take_place(&self, cap: &super::call::Cap, cost: u32) -> Result<Option<Permit>, Denied> {
        let alone = Part {
            cost,
            caps: vec![*cap],
            ..Part::default()
        };
        let mut report = Report::default();
        with_acquire(&[&alone], FailureMode::Local, true, |a| {
            self.store.decide(a, &mut report)
        })?;
        Ok(report.permits().next())
    }

    /// Whether the copy holds places it granted itself (while Redis could
    /// not decide) whose responses have not ended: places Redis never
    /// counted.
    fn holds_its_own(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0 && !self.held.lock().is_empty()
    }

    /// Before Redis decides a request with concurrency caps (`parts`): while
    /// the copy holds places it granted itself, which Redis never counted
    /// (responses admitted during an outage that outlast it), the request
    /// takes its places in the copy first, and is denied when the copy has
    /// none free. Otherwise one instance would hold, once Redis is back,
    /// its outage's places and as many again from Redis: more than the cap
    /// on one instance. `None` when there is nothing to take (the usual
    /// case: no place of the copy's own, or no cap).
    pub(super) fn reserve(&self, parts: &[&Part]) -> Result<Option<Vec<(Permit, Permit)>>, Denied> {
        if parts.iter().all(|p| p.caps.is_empty()) || !self.holds_its_own() {
            return Ok(None);
        }
        let mut places = Vec::new();
        for part in parts {
            for cap in &part.caps {
                match self.take_place(cap, part.cost) {
                    Ok(Some(mine)) => places.push((cap.permit, mine)),
                    Ok(None) => {}
                    Err(denied) => {
                        self.give_back(places);
                        return Err(denied);
                    }
                }
            }
        }
        Ok(Some(places))
    }

    /// Gives back places the copy took for a request that holds none.
    pub(super) fn give_back(&self, places: Vec<(Permit, Permit)>) {
        use crate::store::Store as _;
        for (_, mine) in places {
            self.store.release(mine);
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

/// Places the copy took for a request before Redis decides it (see
/// [`Local::reserve`]): given back when dropped, unless Redis granted the
/// request and they became the copy's places for Redis's
/// ([`Local::mirror_reserved`]).
pub(super) struct Reserved {
    inner: std::sync::Arc<Inner>,
    places: Vec<(Permit, Permit)>,
}

impl Reserved {
    pub(super) fn new(inner: &std::sync::Arc<Inner>, places: Vec<(Permit, Permit)>) -> Self {
        Reserved {
            inner: std::sync::Arc::clone(inner),
            places,
        }
    }

    fn take(mut self) -> Vec<(Permit, Permit)> {
        std::mem::take(&mut self.places)
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if !self.places.is_empty() {
            self.inner.local.give_back(std::mem::take(&mut self.places));
        }
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
