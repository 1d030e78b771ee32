//! Accounts: limits shared by every key of a tenant, and their compiled form.

use std::sync::Arc;

use super::compiled::{Limit, LimitKind, Tokens, quota_salt};
use super::limits::{Quota, Throttle, TokenBudget};
use crate::hash::{self, Digest};
use crate::quota::QuotaSpec;

/// An account (a tenant, a team): a throttle, a quota and a token budget
/// shared by all the keys that belong to it ([`ApiKey::account`](crate::ApiKey::account)).
///
/// A request by a key of an account must pass the account's limits and its
/// plan's in the same atomic decision, weighed in the order stage →
/// account → plan → method. A denial charges nothing anywhere: a request
/// the plan denies gives the account back what it took, one the account
/// denies costs the key nothing. The account's limits count every key of
/// the account together, whatever plan each key is on, and they are never
/// lifted by a shadow plan (like stage limits, they belong to someone other
/// than the plan).
///
/// ```
/// use tollgate::{Account, ApiKey, Period, Policy, Quota, RateLimitLayer, Throttle, UsagePlan};
///
/// let policy = Policy::builder()
///     .plan(UsagePlan::new("free").throttle(Throttle::new(10.0, 10)?))
///     .account(Account::new("acme").quota(Quota::new(3, Period::Day)?))
///     .key(ApiKey::new("acme-1", "secret-1", "free").account("acme"))
///     .key(ApiKey::new("acme-2", "secret-2", "free").account("acme"))
///     .build()?;
/// let layer = RateLimitLayer::new(policy);
/// // Each key has room in its plan, but the two share the account's 3 a day.
/// assert!(layer.check(b"secret-1", 1).is_ok());
/// assert!(layer.check(b"secret-2", 1).is_ok());
/// assert!(layer.check(b"secret-1", 1).is_ok());
/// let denied = layer.check(b"secret-2", 1).unwrap_err();
/// assert_eq!(denied.limit(), Some("account-quota"));
/// # Ok::<(), tollgate::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub(super) name: String,
    pub(super) throttle: Option<Throttle>,
    pub(super) quota: Option<Quota>,
    pub(super) tokens: Option<TokenBudget>,
}

impl Account {
    /// An account with no limits yet.
    pub fn new(name: impl Into<String>) -> Self {
        Account {
            name: name.into(),
            throttle: None,
            quota: None,
            tokens: None,
        }
    }

    /// Sets the throttle all the account's keys share.
    #[must_use]
    pub fn throttle(mut self, throttle: Throttle) -> Self {
        self.throttle = Some(throttle);
        self
    }

    /// Sets the calendar quota all the account's keys share.
    #[must_use]
    pub fn quota(mut self, quota: Quota) -> Self {
        self.quota = Some(quota);
        self
    }

    /// Sets the token budget all the account's keys share (see
    /// [`UsagePlan::tokens`](crate::UsagePlan::tokens)): requests reserve
    /// their estimate from it too, and settle it when their response ends.
    #[must_use]
    pub fn tokens(mut self, budget: TokenBudget) -> Self {
        self.tokens = Some(budget);
        self
    }

    /// The account's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The shared throttle.
    pub fn get_throttle(&self) -> Option<Throttle> {
        self.throttle
    }

    /// The shared quota.
    pub fn get_quota(&self) -> Option<Quota> {
        self.quota
    }

    /// The shared token budget.
    pub fn get_tokens(&self) -> Option<TokenBudget> {
        self.tokens
    }
}

/// The kinds of an account's token budget.
const ACCOUNT_TOKENS: [LimitKind; 3] = [
    LimitKind::AccountTokensMinute,
    LimitKind::AccountTokensDay,
    LimitKind::AccountTokensMonth,
];

/// An account compiled for deciding: its limits, salted by the account's
/// name (not its numbers), and where the memory store keeps its state.
#[derive(Debug)]
pub(crate) struct AccountLimits {
    pub(crate) name: Arc<str>,
    pub(crate) throttle: Option<Limit>,
    pub(crate) quota: Option<QuotaSpec>,
    pub(crate) tokens: Option<Tokens>,
    /// Where the memory store keeps the account's state: the digest of a
    /// prefix no key id can start with (ids are visible ASCII) and the name.
    pub(crate) digest: Digest,
    pub(crate) source: Account,
}

impl AccountLimits {
    /// Compiles `account`; `created_at` is when it first existed (wall
    /// nanoseconds), for quota offsets.
    pub(crate) fn compile(account: &Account, created_at: i64) -> Self {
        let owner = format!("account\0{}", account.name);
        AccountLimits {
            name: account.name.as_str().into(),
            throttle: account
                .throttle
                .as_ref()
                .map(|t| Limit::new(LimitKind::Account, t, &owner, "")),
            quota: account.quota.map(|q| QuotaSpec {
                limit: q.limit,
                period: q.period,
                offset: q.offset,
                created_at: q.created_at(created_at),
                salt: quota_salt(&owner, LimitKind::AccountQuota),
            }),
            tokens: account
                .tokens
                .as_ref()
                .map(|t| Tokens::compile_as(t, &owner, created_at, ACCOUNT_TOKENS)),
            digest: hash::id_digest(format!("\0account\0{}", account.name).as_bytes()),
            source: account.clone(),
        }
    }

    /// Every throttle of the account: the shared one and the per-minute
    /// token bucket.
    pub(crate) fn limits(&self) -> impl Iterator<Item = &Limit> {
        self.throttle
            .iter()
            .chain(self.tokens.iter().flat_map(|t| t.minute.as_ref()))
    }

    /// Every throttle of the account, mutably.
    pub(crate) fn limits_mut(&mut self) -> impl Iterator<Item = &mut Limit> {
        self.throttle
            .iter_mut()
            .chain(self.tokens.iter_mut().flat_map(|t| t.minute.as_mut()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::Period;

    #[test]
    fn a_policy_checks_its_accounts() {
        use crate::error::ConfigError;
        use crate::{ApiKey, Policy, UsagePlan};
        let unknown = Policy::builder()
            .plan(UsagePlan::new("p"))
            .key(ApiKey::new("k", "v", "p").account("acme"))
            .build();
        assert!(matches!(
            unknown,
            Err(ConfigError::UnknownAccount { key, account }) if key == "k" && account == "acme"
        ));
        let twice = Policy::builder()
            .account(Account::new("acme"))
            .account(Account::new("acme"))
            .build();
        assert!(matches!(twice, Err(ConfigError::DuplicateAccount(n)) if n == "acme"));
        let key = ApiKey::new("k", "v", "p").account("acme");
        assert_eq!(key.get_account(), Some("acme"));
    }

    #[test]
    fn account_limits_are_named_apart_from_plans() {
        let t = Throttle::new(1.0, 1).unwrap();
        let budget = TokenBudget::new()
            .per_minute(10)
            .unwrap()
            .per_day(100)
            .unwrap();
        let a = AccountLimits::compile(
            &Account::new("free")
                .throttle(t)
                .quota(Quota::new(5, Period::Day).unwrap())
                .tokens(budget),
            0,
        );
        let plan = super::super::compiled::Plan::compile(
            &crate::UsagePlan::new("free")
                .throttle(t)
                .quota(Quota::new(5, Period::Day).unwrap())
                .tokens(budget),
            0,
        )
        .unwrap();
        // An account and a plan of one name never share a salt.
        assert_ne!(
            a.throttle.as_ref().unwrap().salt,
            plan.throttle.unwrap().salt
        );
        assert_ne!(a.quota.unwrap().salt, plan.quota.unwrap().salt);
        assert_eq!(a.limits().count(), 2);
        let kinds: Vec<_> = a.limits().map(|l| l.kind).collect();
        assert_eq!(kinds, [LimitKind::Account, LimitKind::AccountTokensMinute]);
        let tokens = a.tokens.as_ref().unwrap();
        assert_eq!(tokens.quotas()[0].unwrap().0, LimitKind::AccountTokensDay);
        // Recompiled with other numbers, the salts stay.
        let b = AccountLimits::compile(
            &Account::new("free").throttle(Throttle::new(9.0, 9).unwrap()),
            0,
        );
        assert_eq!(a.throttle.unwrap().salt, b.throttle.unwrap().salt);
    }
}
