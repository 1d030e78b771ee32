//! The defining limits of a rejected caller's plan, for OpenAI's
//! `x-ratelimit-*` headers on a rejection (see [`HeaderStyle`]).
//!
//! A rejection names only the limit that denied; a family's stable limit is
//! read again from the caller's plan. This runs only for a rejection with
//! OpenAI's headers on, and never tells the observer anything.
//!
//! [`HeaderStyle`]: crate::HeaderStyle

use crate::extract::{KeyError, KeyExtractor, RequestView};
use crate::hash;
use crate::headers::Families;
use crate::plan::{AccountLimits, LimitKind, Plan, StageLimits};
use crate::resolver::Answer;

use super::Shared;

impl<K: KeyExtractor, S> Shared<K, S> {
    /// The defining limit of each family for the caller of `req`, found as
    /// the decision found its plan; nothing for a caller no longer found.
    pub(crate) fn families(&self, req: &RequestView<'_>) -> Families {
        let mut f = Families::default();
        let stage = self.policy.inner.stage.as_deref();
        if let Some(plan) = &self.fixed {
            if self.extractor.extract(req).is_ok() {
                offer(&mut f, None, None, plan);
            }
            return f;
        }
        match self.extractor.extract(req) {
            Ok(key) => {
                let key = key.as_bytes();
                let found = self.policy.keys().with(key, |entry| {
                    entry.map(|e| offer(&mut f, stage, e.account.as_deref(), &e.plan))
                });
                if found.is_none()
                    && let Some(resolving) = &self.resolver
                    && let Some(Answer::Found(found)) = resolving.cached(hash::digest(key))
                {
                    let snap = self.policy.load();
                    if let Some(plan) = snap.plan_named(found.key.plan()) {
                        let account = found.key.get_account().and_then(|a| snap.account_named(a));
                        offer(&mut f, stage, account.map(|a| &**a), plan);
                    }
                }
            }
            Err(KeyError::Missing) => {
                if let Some(anon) = &self.policy.load().anonymous {
                    offer(&mut f, stage, None, &anon.plan);
                }
            }
            Err(_) => {}
        }
        f
    }
}

/// Offers every limit of a caller (plan, account, stage) whose size does
/// not depend on the route. A method override is not offered: a family
/// defined by one alone reports the limit that denied, the override itself.
fn offer(
    f: &mut Families,
    stage: Option<&StageLimits>,
    account: Option<&AccountLimits>,
    plan: &Plan,
) {
    let throttle = |f: &mut Families, l: &crate::plan::Limit| {
        f.offer(l.kind, u64::from(l.gcra.burst()));
    };
    if let Some(t) = &plan.throttle {
        throttle(f, t);
    }
    if let Some(q) = &plan.quota {
        f.offer(LimitKind::Quota, q.limit);
    }
    if let Some(tokens) = &plan.tokens {
        if let Some(m) = &tokens.minute {
            throttle(f, m);
        }
        for (kind, q) in tokens.quotas().into_iter().flatten() {
            f.offer(kind, q.limit);
        }
    }
    if let Some(a) = account {
        if let Some(t) = &a.throttle {
            throttle(f, t);
        }
        if let Some(q) = &a.quota {
            f.offer(LimitKind::AccountQuota, q.limit);
        }
        if let Some(tokens) = &a.tokens {
            if let Some(m) = &tokens.minute {
                throttle(f, m);
            }
            for (kind, q) in tokens.quotas().into_iter().flatten() {
                f.offer(kind, q.limit);
            }
        }
    }
    if let Some(t) = stage.and_then(|s| s.throttle.as_ref()) {
        throttle(f, t);
    }
}
