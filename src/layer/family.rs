//! The defining limits of a rejected caller's plan, for OpenAI's
//! `x-ratelimit-*` headers on a rejection (see [`HeaderStyle`]).
//!
//! A rejection names only the limit that denied; a family's stable limit is
//! read again from the caller's plan, with the method override and the
//! model entry the request's route and model select, as the decision
//! selected them. This runs only for a rejection with OpenAI's headers on,
//! and never tells the observer anything.
//!
//! [`HeaderStyle`]: crate::HeaderStyle

use crate::extract::{KeyError, KeyExtractor, RequestView};
use crate::hash;
use crate::headers::Families;
use crate::plan::{AccountLimits, Limit, LimitKind, Plan, StageLimits, Tokens, method_limit};
use crate::quota::QuotaSpec;
use crate::resolver::Answer;
use crate::store::Store;

use super::Shared;

impl<K: KeyExtractor, S: Store> Shared<K, S> {
    /// The defining limit of each family for the caller of `req`, found as
    /// the decision found its plan; nothing for a caller no longer found.
    /// `answer` is the resolver's answer the request was decided by, if it
    /// was: its key's plan is the caller's, whether the answer is cached or
    /// not (a positive TTL of 0, a cache too full to take it, an answer
    /// gone from the cache since).
    pub(crate) fn families(&self, req: &RequestView<'_>, answer: Option<&Answer>) -> Families {
        let mut f = Families::default();
        // A quota is as large as its current window (its plan's first
        // holds `offset` fewer), as the responses allowed before said.
        let now = self.store.clock().wall_nanos();
        let stage = self.policy.inner.stage.as_deref();
        if let Some(plan) = &self.fixed {
            if self.extractor.extract(req).is_ok() {
                self.offer(&mut f, req, None, None, plan, now);
            }
            return f;
        }
        match self.extractor.extract(req) {
            Ok(key) => {
                let key = key.as_bytes();
                let found = self.policy.keys().with(key, |entry| {
                    entry
                        .map(|e| self.offer(&mut f, req, stage, e.account.as_deref(), &e.plan, now))
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
                        self.offer(&mut f, req, stage, account.map(|a| &**a), plan, now);
                    }
                }
            }
            Err(KeyError::Missing) => {
                if let Some(anon) = &self.policy.load().anonymous {
                    self.offer(&mut f, req, stage, None, &anon.plan, now);
                }
            }
            Err(_) => {}
        }
        f
    }
}

impl<K, S> Shared<K, S> {
    /// Offers every limit that applies to the caller of `req` (plan,
    /// account, stage, and the method overrides and model entry that `req`
    /// selects): the same limits the decision counted, so that a family
    /// reports the same limit on a rejection as on the responses allowed
    /// before it, whichever limit denied; a quota as its window at `now`
    /// holds.
    fn offer(
        &self,
        f: &mut Families,
        req: &RequestView<'_>,
        stage: Option<&StageLimits>,
        account: Option<&AccountLimits>,
        plan: &Plan,
        now: i64,
    ) {
        let throttle = |f: &mut Families, l: &Limit| f.offer(l.kind, u64::from(l.gcra.burst()));
        let quota = |f: &mut Families, kind, q: &QuotaSpec| f.offer(kind, q.limit_at(now));
        let tokens = |f: &mut Families, t: &Tokens| {
            if let Some(m) = &t.minute {
                throttle(f, m);
            }
            for (kind, q) in t.quotas().into_iter().flatten() {
                quota(f, kind, q);
            }
        };
        plan.throttle.iter().for_each(|t| throttle(f, t));
        if let Some(q) = &plan.quota {
            quota(f, LimitKind::Quota, q);
        }
        plan.tokens.iter().for_each(|t| tokens(f, t));
        if let Some(m) = method_limit(&plan.methods, Some(req)) {
            throttle(f, m);
        }
        if let Some(m) = plan.model(self.model_name(Some(req))) {
            m.throttle.iter().for_each(|t| throttle(f, t));
            if let Some(q) = &m.quota {
                quota(f, LimitKind::ModelQuota, q);
            }
            m.tokens.iter().for_each(|t| tokens(f, t));
        }
        if let Some(a) = account {
            a.throttle.iter().for_each(|t| throttle(f, t));
            if let Some(q) = &a.quota {
                quota(f, LimitKind::AccountQuota, q);
            }
            a.tokens.iter().for_each(|t| tokens(f, t));
        }
        if let Some(s) = stage {
            s.throttle.iter().for_each(|t| throttle(f, t));
            if let Some(m) = method_limit(&s.methods, Some(req)) {
                throttle(f, m);
            }
        }
    }
}
