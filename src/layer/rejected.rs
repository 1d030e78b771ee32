//! The limits of a rejected request, for its rate-limit headers (see
//! [`HeaderStyle`]).
//!
//! A denial tells how the limit that denied stands, and nothing of the
//! request's other limits (a store stops reading their state once one
//! denies, and a remote store's answer carries the one). A rejection still
//! announces every policy of the request in `RateLimit-Policy`, as the
//! responses allowed before it did, and OpenAI's headers report each
//! family's defining limit: the limits are gathered again from the caller's
//! plan, account and the stage, with the method overrides and the model
//! entry the request's route and model select, as the decision gathered
//! them. This runs only for a rejection with headers that need it, and
//! never tells the observer anything.
//!
//! [`HeaderStyle`]: crate::HeaderStyle

use arrayvec::ArrayVec;

use crate::extract::{KeyError, KeyExtractor, RequestView};
use crate::hash::{self, Digest};
use crate::plan::{AccountLimits, Plan, StageLimits};
use crate::resolver::Answer;
use crate::store::{Acquire, Applied, MAX_LIMITS, Store, Subject};

use super::Shared;

/// The limits of a request, as policies (see [`Acquire::policies`]).
pub(crate) type Policies = ArrayVec<Applied, MAX_LIMITS>;

impl<K: KeyExtractor, S: Store> Shared<K, S> {
    /// Every limit that applies to the caller of `req`, found as the
    /// decision found its plan; none for a caller no longer found (a key
    /// removed since). `answer` is the resolver's answer the request was
    /// decided by, if it was: its key's plan is the caller's, whether the
    /// answer is cached or not (a positive TTL of 0, a cache too full to
    /// take it, an answer gone from the cache since).
    pub(crate) fn policies(&self, req: &RequestView<'_>, answer: Option<&Answer>) -> Policies {
        let mut out = Policies::new();
        // A quota is as large as its current window (its plan's first
        // holds `offset` fewer), as the responses allowed before said.
        let now = self.store.clock().wall_nanos();
        let stage = self.policy.inner.stage.as_deref();
        if let Some(plan) = &self.fixed {
            if self.extractor.extract(req).is_ok() {
                self.gather(&mut out, req, None, None, plan, now);
            }
            return out;
        }
        match self.extractor.extract(req) {
            Ok(key) => {
                let key = key.as_bytes();
                let found = self.policy.keys().with(key, |entry| {
                    entry.map(|e| {
                        let account = e.account.as_deref();
                        self.gather(&mut out, req, stage, account, &e.plan, now)
                    })
                });
                let cached;
                let answer = match (found, answer, &self.resolver) {
                    (Some(_), _, _) | (None, None, None) => None,
                    (None, Some(answer), _) => Some(answer),
                    (None, None, Some(resolving)) => {
                        cached = resolving.cached(hash::digest(key));
                        cached.as_ref()
                    }
                };
                if let Some(Answer::Found(found)) = answer {
                    let snap = self.policy.load();
                    if let Some(plan) = snap.plan_named(found.key.plan()) {
                        let account = found.key.get_account().and_then(|a| snap.account_named(a));
                        self.gather(&mut out, req, stage, account.map(|a| &**a), plan, now);
                    }
                }
            }
            Err(KeyError::Missing) => {
                if let Some(anon) = &self.policy.load().anonymous {
                    self.gather(&mut out, req, stage, None, &anon.plan, now);
                }
            }
            Err(_) => {}
        }
        out
    }
}

impl<K, S> Shared<K, S> {
    /// Puts into `out` the policy of every limit that applies to the
    /// caller of `req` under `plan` (with `account` and `stage`, and the
    /// method overrides and model entry `req` selects): the limits the
    /// decision gathered, in its order; a quota as its window at `now`
    /// holds. Whose state counts does not matter here: nothing is read.
    fn gather(
        &self,
        out: &mut Policies,
        req: &RequestView<'_>,
        stage: Option<&StageLimits>,
        account: Option<&AccountLimits>,
        plan: &Plan,
        now: i64,
    ) {
        let subject = Subject {
            plan,
            name: b"",
            digest: Digest(0),
            history_days: 0,
        };
        let model = plan.model(self.model_name(Some(req)));
        Acquire::gather(stage, account, 0, &subject, Some(req), model, 1, 0, |a| {
            for p in a.policies(now) {
                // Never full: one request has at most `MAX_LIMITS` limits.
                let _ = out.try_push(p);
            }
        });
    }
}
