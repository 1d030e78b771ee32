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

use tollgate::{ManualClock, TokenBudget, UsagePlan};
use tower::{Service, ServiceExt};

use crate::conformance::{send_tokens, token_service};
use crate::support::at;
use crate::support::backend::{Backend, Memory, Redis, on_each_backend};
use crate::support::redis::require_redis;
use crate::support::tokens;

/// A request of `estimate` tokens that used `actual`, admitted and held
/// open: its tokens settle when the response is dropped.
async fn hold<S>(svc: &mut S, estimate: u32, actual: u64) -> S::Response
where
    S: Service<http::Request<String>, Error = std::convert::Infallible>,
{
    svc.ready()
        .await
        .unwrap()
        .call(tokens::request("v", estimate, Some(actual)))
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
    let a = hold(&mut svc, 900, 100).await;
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
    let a = hold(&mut svc, 900, 100).await;
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

on_each_backend!(
    "reset_settlement":
    a_token_quota_refund_from_before_a_reset_grants_nothing,
);

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
