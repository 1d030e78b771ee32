//! Usage of an account's quota, shared by all its keys.

use crate::store::Store;
use crate::window::Date;

use super::{Admin, AdminError, MAX_REMAINING, check_not_after_today};

/// Usage of an account's request quota per UTC day, as
/// [`Admin::account_usage`] reports it: all the account's keys together.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AccountUsage {
    /// The account.
    pub account: String,
    /// The first day reported.
    pub start: Date,
    /// The last day reported: the `end` asked for, or today if that is
    /// earlier; never before `start`.
    pub end: Date,
    /// `[used, remaining]` for each day from `start` to `end`, where
    /// `remaining` is what was left of the quota window at the day's end.
    pub days: Vec<[i64; 2]>,
}

impl<S: Store> Admin<S> {
    /// Usage of `account`'s quota per UTC day from `start` to `end`, all
    /// its keys together (AWS GetUsage, for an account). `end` is cut at
    /// today; `start` must lie within the kept history and not after today,
    /// as for [`usage`](Self::usage).
    ///
    /// ```
    /// use tollgate::{Account, ApiKey, Date, Period, Policy, Quota, RateLimitLayer, UsagePlan};
    ///
    /// let policy = Policy::builder()
    ///     .plan(UsagePlan::new("free"))
    ///     .account(Account::new("acme").quota(Quota::new(10, Period::Day)?))
    ///     .key(ApiKey::new("a1", "secret-1", "free").account("acme"))
    ///     .key(ApiKey::new("a2", "secret-2", "free").account("acme"))
    ///     .build()?;
    /// let layer = RateLimitLayer::new(policy);
    /// layer.check(b"secret-1", 1).unwrap();
    /// layer.check(b"secret-2", 1).unwrap();
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let admin = layer.admin();
    /// let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    /// let today = Date::from_days((now.as_secs() / 86_400) as i64);
    /// let usage = admin.account_usage("acme", today, today).await.unwrap();
    /// assert_eq!(usage.days, [[2, 8]]);
    /// # });
    /// # Ok::<(), tollgate::ConfigError>(())
    /// ```
    pub async fn account_usage(
        &self,
        account: &str,
        start: Date,
        end: Date,
    ) -> Result<AccountUsage, AdminError> {
        if start > end {
            return Err(AdminError::BadRange("start is after end"));
        }
        let days = self.policy.inner.history_days as u32;
        let today = Date::of_nanos(self.store.clock().wall_nanos());
        check_not_after_today(start, today)?;
        let end = end.min(today);
        let pending = {
            let snap = self.policy.load();
            let a = snap
                .account_named(account)
                .ok_or_else(|| AdminError::UnknownAccount(account.to_owned()))?;
            let q = a
                .request_quota(days)
                .ok_or_else(|| AdminError::NoAccountQuota(account.to_owned()))?;
            let oldest = today.days() - i64::from(days) + 1;
            if start.days() < oldest {
                return Err(AdminError::BadRange(
                    "start is before the kept usage history",
                ));
            }
            self.store.usage(&q, start, end)
        };
        let days = pending.await?;
        Ok(AccountUsage {
            account: account.to_owned(),
            start,
            end,
            days,
        })
    }

    /// Sets what remains of `account`'s quota in the current window, for all
    /// its keys together (AWS UpdateUsage, for an account); returns it. The
    /// range, and what becomes of units charged before it, are
    /// [`set_remaining`](Self::set_remaining)'s.
    pub async fn set_account_remaining(
        &self,
        account: &str,
        remaining: u64,
    ) -> Result<u64, AdminError> {
        if remaining > MAX_REMAINING {
            return Err(AdminError::RemainingOutOfRange {
                remaining,
                max: MAX_REMAINING,
            });
        }
        let pending = {
            let snap = self.policy.load();
            let a = snap
                .account_named(account)
                .ok_or_else(|| AdminError::UnknownAccount(account.to_owned()))?;
            let q = a
                .request_quota(self.policy.inner.history_days as u32)
                .ok_or_else(|| AdminError::NoAccountQuota(account.to_owned()))?;
            self.store.set_remaining(&q, remaining)
        };
        Ok(pending.await?)
    }

    /// Resets an account: its quota windows and usage history are forgotten
    /// and its buckets are full again (its keys' own limits are untouched).
    /// Tokens reserved before the reset and settled after it give nothing
    /// back to the account's limits, as [`reset_key`](Self::reset_key)
    /// tells for a key's.
    pub async fn reset_account(&self, account: &str) -> Result<(), AdminError> {
        let pending = {
            let snap = self.policy.load();
            let a = snap
                .account_named(account)
                .ok_or_else(|| AdminError::UnknownAccount(account.to_owned()))?;
            let throttles: Vec<_> = a.limits().map(|l| a.throttle_ref(l)).collect();
            let days = self.policy.inner.history_days as u32;
            let mut pending = vec![self.store.reset(&throttles, a.request_quota(days).as_ref())];
            for q in a.token_quotas().iter().flatten() {
                pending.push(self.store.reset(&[], Some(q)));
            }
            pending
        };
        for p in pending {
            p.await?;
        }
        Ok(())
    }

    /// The account with this name, as it was built.
    pub fn account(&self, name: &str) -> Option<crate::Account> {
        self.policy
            .load()
            .account_named(name)
            .map(|a| a.source.clone())
    }
}
