//! A reservation made before `Admin::reset_key` and settled after it never
//! grants its over-estimate twice, on every store.
//!
//! A reset gives the key its whole budget again: every unit charged before
//! it, reserved or used, is forgiven at once. A streamed response admitted
//! before the reset may end after it, using fewer tokens than it reserved.
//! Giving that over-estimate back then hands the post-reset budget units it
//! never counted: with 1000 tokens a day, a request reserving 900 and using
//! 100, a reset, then 1000 tokens used by new requests, the refund of 800
//! would let 800 more in the same day. The reset is to a refund what the
//! start of a later window is (see `late_settlement.rs`): what was charged
//! before it is not given back after it. A reservation made after the reset
//! settles as always.

use std::time::Duration;

use tollgate::{
    Account, ManualClock, Period, PolicyBuilder, Quota, Stage, Throttle, TokenBudget, UsagePlan,
};
use tower::{Service, ServiceExt};

use crate::accounts::{self, day, policy, send};
use crate::conformance::{send_tokens, token_service};
use crate::support::at;
use crate::support::backend::{Backend, Memory, Redis, on_each_backend};
use crate::support::redis::require_redis;
use crate::support::tokens;

/// A request of key `key` of `estimate` tokens that used `actual`,
/// admitted and held open: its tokens settle when the response is dropped.
async fn hold<S>(svc: &mut S, key: &str, estimate: u32, actual: u64) -> S::Response
where
    S: Service<http::Request<String>, Error = std::convert::Infallible>,
{
    svc.ready()
        .await
        .unwrap()
        .call(tokens::request(key, estimate, Some(actual)))
        .await
        .unwrap()
}

/// Waits for a remote store's settlement (sent in the background) to land.
async fn settled() {
    tokio::time::sleep(Duration::from_millis(150)).await;
}

/// 1000 tokens a UTC day. A reserves 900 and streams; the key is reset;
/// new requests use the whole new budget; A ends having used 100. Its 800
/// were charged before the reset, which forgave them already: nothing comes
/// back, and the day stays full. A reservation made after the reset still
/// gets its over-estimate back.
async fn a_token_quota_refund_from_before_a_reset_grants_nothing<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = UsagePlan::new("p").tokens(TokenBudget::new().per_day(1_000).unwrap());
    let (mut svc, admin) = token_service(b, &clock, plan).await;
    let a = hold(&mut svc, "v", 900, 100).await;
    assert_eq!(a.status(), 200);
    clock.advance(Duration::from_secs(1));
    admin.reset_key("k").await.unwrap();
    clock.advance(Duration::from_secs(1));
    assert_eq!(send_tokens(&mut svc, 1_000, Some(1_000)).await.0, 200);
    assert_eq!(send_tokens(&mut svc, 1, None).await.0, 429);
    drop(a);
    settled().await;
    assert_eq!(
        send_tokens(&mut svc, 1, None).await.0,
        429,
        "A's over-estimate, charged before the reset, was given to the new budget"
    );

    // After another reset, a reservation made after it settles as always:
    // 500 reserved, 100 used, 400 back, so 900 more fit.
    clock.advance(Duration::from_secs(1));
    admin.reset_key("k").await.unwrap();
    clock.advance(Duration::from_secs(1));
    assert_eq!(send_tokens(&mut svc, 500, Some(100)).await.0, 200);
    settled().await;
    assert_eq!(send_tokens(&mut svc, 900, None).await.0, 200);
    assert_eq!(send_tokens(&mut svc, 1, None).await.0, 429);
}

/// The same on the per-minute bucket of 1000 tokens: A's share of the
/// bucket, reserved before the reset, refilled with the reset, so settling
/// A gives the full bucket the new requests emptied nothing back.
async fn a_token_bucket_refund_from_before_a_reset_grants_nothing<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = UsagePlan::new("p").tokens(TokenBudget::new().per_minute(1_000).unwrap());
    let (mut svc, admin) = token_service(b, &clock, plan).await;
    let a = hold(&mut svc, "v", 900, 100).await;
    assert_eq!(a.status(), 200);
    clock.advance(Duration::from_millis(10));
    admin.reset_key("k").await.unwrap();
    clock.advance(Duration::from_millis(10));
    assert_eq!(send_tokens(&mut svc, 1_000, Some(1_000)).await.0, 200);
    assert_eq!(send_tokens(&mut svc, 1, None).await.0, 429);
    drop(a);
    settled().await;
    // A token refills every 60 ms: within the next 50 ms none has.
    clock.advance(Duration::from_millis(50));
    assert_eq!(
        send_tokens(&mut svc, 1, None).await.0,
        429,
        "A's share, refilled by the reset, was given back to the bucket"
    );

    // A reservation made after a reset gets back what of its share has
    // not refilled: 500 reserved, 100 used, 400 back.
    clock.advance(Duration::from_millis(10));
    admin.reset_key("k").await.unwrap();
    clock.advance(Duration::from_millis(10));
    assert_eq!(send_tokens(&mut svc, 500, Some(100)).await.0, 200);
    settled().await;
    assert_eq!(send_tokens(&mut svc, 900, None).await.0, 200);
    assert_eq!(send_tokens(&mut svc, 1, None).await.0, 429);
}

/// Key `a` (value `va`) of account `acme`, and `b` (`vb`) of it too, on
/// plan `p`, under a stage throttle: each with a throttle and a request
/// quota, the plan and the account each with the token `budget` made for
/// its size. On a Redis Cluster the stage, the account and each key live
/// in slots of their own: a decision is made in three parts, each
/// settlement and each reset reaches one slot at a time.
fn key_and_account(clock: &ManualClock, budget: impl Fn(u32) -> TokenBudget) -> PolicyBuilder {
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(100.0, 100).unwrap())
        .quota(Quota::new(100, Period::Day).unwrap())
        .tokens(budget(1_000));
    let account = Account::new("acme")
        .throttle(Throttle::new(100.0, 100).unwrap())
        .quota(Quota::new(100, Period::Day).unwrap())
        .tokens(budget(1_500));
    let stage = Stage::new().throttle(Throttle::new(100.0, 100).unwrap());
    policy(clock, plan, account).stage(stage)
}

/// `(429, limit)`: a denial by the limit named.
fn denied(limit: &str) -> (u16, Option<String>) {
    (429, Some(limit.to_owned()))
}

/// A key of an account, with day token quotas of 1000 (the key's) and 1500
/// (the account's). A reserves 900 and streams; `reset_key` and
/// `reset_account` make every limit whole again, which the key and the
/// account then use up; A ends having used 100 and its 800 go back to
/// neither. A reservation made with no reset since gets its 800 back from
/// both.
async fn a_reset_key_and_account_forgive_day_tokens_reserved_before<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let budget = |n: u32| TokenBudget::new().per_day(u64::from(n)).unwrap();
    let (mut svc, admin) =
        accounts::token_service(b, &clock, key_and_account(&clock, budget)).await;
    let a = hold(&mut svc, "va", 900, 100).await;
    assert_eq!(a.status(), 200);
    clock.advance(Duration::from_millis(1));
    admin.reset_key("a").await.unwrap();
    admin.reset_account("acme").await.unwrap();
    clock.advance(Duration::from_millis(1));
    // Whole again: a's 1000, then b finds the account's last 500.
    assert_eq!(send(&mut svc, "va", 1_000, Some(1_000)).await, (200, None));
    assert_eq!(send(&mut svc, "vb", 500, Some(500)).await, (200, None));
    assert_eq!(
        send(&mut svc, "vb", 1, None).await,
        denied("account-tokens-day")
    );
    // The request quotas were reset too: only what came since counts.
    let keys = admin.usage("p", day(), day(), Some("a")).await.unwrap();
    assert_eq!(keys.items["a"], [[1, 99]]);
    let usage = admin.account_usage("acme", day(), day()).await.unwrap();
    assert_eq!(usage.days, [[2, 98]]);

    drop(a);
    settled().await;
    assert_eq!(
        send(&mut svc, "vb", 1, None).await,
        denied("account-tokens-day"),
        "A's over-estimate, charged before the reset, was given to the account"
    );
    // The account out of the way, a's own day shows the same.
    admin.reset_account("acme").await.unwrap();
    assert_eq!(
        send(&mut svc, "va", 1, None).await,
        denied("tokens-day"),
        "A's over-estimate, charged before the reset, was given to the key"
    );

    // A day later, with no reset since: 900 reserved, 100 used, 800 back
    // to the key (900 more fit its 1000) and to the account (500 more fit
    // its 1500).
    clock.advance(Duration::from_secs(86_400));
    let a = hold(&mut svc, "va", 900, 100).await;
    assert_eq!(a.status(), 200);
    drop(a);
    settled().await;
    assert_eq!(send(&mut svc, "va", 900, None).await, (200, None));
    assert_eq!(send(&mut svc, "va", 1, None).await, denied("tokens-day"));
    // (On a cluster the account gives that denial's charge back after it.)
    settled().await;
    assert_eq!(send(&mut svc, "vb", 500, None).await, (200, None));
    assert_eq!(
        send(&mut svc, "vb", 1, None).await,
        denied("account-tokens-day")
    );
}

/// The same on per-minute token buckets of 1000 (the key's) and 1500 (the
/// account's): a token refills every 60 ms and 40 ms, and these steps
/// take 2 ms of the manual clock.
async fn a_reset_key_and_account_forgive_minute_tokens_reserved_before<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let budget = |n: u32| TokenBudget::new().per_minute(n).unwrap();
    let (mut svc, admin) =
        accounts::token_service(b, &clock, key_and_account(&clock, budget)).await;
    let a = hold(&mut svc, "va", 900, 100).await;
    assert_eq!(a.status(), 200);
    clock.advance(Duration::from_millis(1));
    admin.reset_key("a").await.unwrap();
    admin.reset_account("acme").await.unwrap();
    clock.advance(Duration::from_millis(1));
    assert_eq!(send(&mut svc, "va", 1_000, Some(1_000)).await, (200, None));
    assert_eq!(send(&mut svc, "vb", 500, Some(500)).await, (200, None));
    assert_eq!(
        send(&mut svc, "vb", 1, None).await,
        denied("account-tokens-minute")
    );

    drop(a);
    settled().await;
    assert_eq!(
        send(&mut svc, "vb", 1, None).await,
        denied("account-tokens-minute"),
        "A's share, refilled by the reset, was given back to the account's bucket"
    );
    admin.reset_account("acme").await.unwrap();
    assert_eq!(
        send(&mut svc, "va", 1, None).await,
        denied("tokens-minute"),
        "A's share, refilled by the reset, was given back to the key's bucket"
    );

    // A minute later, every bucket full and no reset since: 900 reserved,
    // 100 used, 800 back to both buckets.
    clock.advance(Duration::from_secs(61));
    let a = hold(&mut svc, "va", 900, 100).await;
    assert_eq!(a.status(), 200);
    drop(a);
    settled().await;
    assert_eq!(send(&mut svc, "va", 900, None).await, (200, None));
    assert_eq!(send(&mut svc, "va", 1, None).await, denied("tokens-minute"));
    settled().await;
    assert_eq!(send(&mut svc, "vb", 500, None).await, (200, None));
    assert_eq!(
        send(&mut svc, "vb", 1, None).await,
        denied("account-tokens-minute")
    );
}

on_each_backend!(
    "reset_settlement":
    a_token_quota_refund_from_before_a_reset_grants_nothing,
    a_reset_key_and_account_forgive_day_tokens_reserved_before,
    a_reset_key_and_account_forgive_minute_tokens_reserved_before,
);

/// On a Redis Cluster, where every reset, settlement and refund reaches the
/// stage's, the account's and the key's slots apart: the same answers.
#[tokio::test]
async fn redis_cluster_resets_and_settles_a_key_and_its_account() {
    if !require_redis() {
        return;
    }
    let cluster = Redis::cluster("reset_settlement");
    a_reset_key_and_account_forgive_day_tokens_reserved_before(&cluster).await;
    a_reset_key_and_account_forgive_minute_tokens_reserved_before(&cluster).await;
}

/// The bucket's case, on a Redis prefix of its own.
mod bucket {
    use super::*;

    #[tokio::test]
    async fn memory_a_token_bucket_refund_from_before_a_reset_grants_nothing() {
        a_token_bucket_refund_from_before_a_reset_grants_nothing(&Memory).await;
    }

    #[tokio::test]
    async fn redis_a_token_bucket_refund_from_before_a_reset_grants_nothing() {
        if !require_redis() {
            return;
        }
        let redis = Redis::single("reset_settlement_bucket");
        a_token_bucket_refund_from_before_a_reset_grants_nothing(&redis).await;
    }
}
