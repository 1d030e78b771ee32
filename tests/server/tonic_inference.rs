//! The example's gRPC inference service (`examples/grpc_inference.rs`) on a
//! loopback port, called by a tonic client that reads the rejections'
//! `google.rpc` details with `tonic_types`, as a gRPC client would: from the
//! layer in `Server::builder().layer(..)`, from the token check in a method,
//! and from the interceptor form.

#[allow(dead_code)]
#[path = "../../examples/grpc_inference.rs"]
mod grpc_inference;

use std::net::SocketAddr;
use std::time::Duration;

use grpc_inference::{
    COMPLETE, Inference, MetadataKeyLimit, complete, connect, serve_intercepted, serve_layered,
};
use tokio::net::TcpListener;
use tollgate::{ApiKey, Policy, RateLimitLayer, Throttle, TokenBudget, UsagePlan};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::support::{BURST, DISABLED_KEY, KEY, OTHER_KEY, RATE, frozen_store, registered_policy};

/// The wait for one more call after a burst: one emission interval.
fn interval() -> Duration {
    Duration::from_secs_f64(1.0 / RATE)
}

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Serves `inference` behind `layer`; returns a client channel.
async fn layered(layer: RateLimitLayer, inference: Inference) -> Channel {
    let (listener, addr) = bind().await;
    tokio::spawn(serve_layered(listener, layer, inference));
    connect(addr).await.unwrap()
}

/// Serves `inference` with `limit` as its interceptor; returns a client channel.
async fn intercepted(limit: MetadataKeyLimit, inference: Inference) -> Channel {
    let (listener, addr) = bind().await;
    tokio::spawn(serve_intercepted(listener, limit, inference));
    connect(addr).await.unwrap()
}

/// Calls `Complete` with `key`, asking for 4 tokens.
async fn call(channel: &Channel, key: Option<&str>) -> Result<(), Status> {
    let reply = complete(channel, key, "Hi!", 4).await?;
    assert_eq!(reply.usage.unwrap().total_tokens, 1 + 4);
    Ok(())
}

/// Makes `n` calls that must pass.
async fn calls_pass(channel: &Channel, key: &str, n: u32) {
    for i in 0..n {
        call(channel, Some(key))
            .await
            .unwrap_or_else(|s| panic!("call {i}: {s:?}"));
    }
}

/// The retry delay of a RESOURCE_EXHAUSTED status, and the limit that denied
/// (its one `QuotaFailure` violation), read through `tonic_types`.
fn exhausted(status: &Status) -> (Duration, String) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // Every detail decodes (the `get_details_*` helpers hide decode errors).
    let details = status.check_error_details().expect("details decode");
    let retry = status.get_details_retry_info().expect("a RetryInfo");
    assert_eq!(
        details.retry_info().map(|r| r.retry_delay),
        Some(retry.retry_delay)
    );
    let mut violations = status.get_details_quota_failure().unwrap().violations;
    assert_eq!(violations.len(), 1, "{violations:?}");
    let violation = violations.pop().unwrap();
    assert_eq!(violation.description, status.message());
    (retry.retry_delay.expect("a delay"), violation.subject)
}

/// A key failure: UNAUTHENTICATED, and no details at all.
fn assert_unauthenticated(status: &Status) {
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.get_details_retry_info().is_none());
    assert!(status.details().is_empty(), "{:?}", status.details());
}

#[tokio::test]
async fn layer_rejection_has_a_retry_delay_within_the_gcra_wait() {
    // The real clock: the delay is what is left of one interval.
    let channel = layered(
        RateLimitLayer::new(registered_policy()),
        Inference::default(),
    )
    .await;
    calls_pass(&channel, KEY, BURST).await;

    let status = call(&channel, Some(KEY)).await.unwrap_err();
    let (delay, limit) = exhausted(&status);
    assert!(delay > Duration::ZERO && delay <= interval(), "{delay:?}");
    assert_eq!(limit, "throttle");
    assert_eq!(status.message(), "Too Many Requests");
    // The details never hold the key.
    let raw = String::from_utf8_lossy(status.details());
    assert!(
        !raw.contains(KEY) && raw.contains("google.rpc.RetryInfo"),
        "{raw}"
    );
}

#[tokio::test]
async fn layer_retry_delay_is_exact_where_retry_after_rounds_up() {
    let (clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(registered_policy())
        .store(store)
        .build();
    let channel = layered(layer, Inference::default()).await;
    calls_pass(&channel, KEY, BURST).await;

    let status = call(&channel, Some(KEY)).await.unwrap_err();
    assert_eq!(exhausted(&status).0, interval());
    clock.advance(Duration::from_millis(200));
    let status = call(&channel, Some(KEY)).await.unwrap_err();
    assert_eq!(
        exhausted(&status).0,
        interval() - Duration::from_millis(200)
    );
    assert_eq!(status.metadata().get("retry-after").unwrap(), "1");
    // gRPC's own retry policies read the exact wait.
    let ms = (interval() - Duration::from_millis(200))
        .as_millis()
        .to_string();
    assert_eq!(
        status.metadata().get("grpc-retry-pushback-ms").unwrap(),
        ms.as_str()
    );

    clock.advance(Duration::from_millis(300));
    calls_pass(&channel, KEY, 1).await;
    calls_pass(&channel, OTHER_KEY, BURST).await;
}

#[tokio::test]
async fn layer_key_failures_are_unauthenticated_without_retry_info() {
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(registered_policy())
        .store(store)
        .build();
    let channel = layered(layer, Inference::default()).await;

    for key in [None, Some("not-registered"), Some(DISABLED_KEY)] {
        let status = call(&channel, key).await.unwrap_err();
        assert_unauthenticated(&status);
    }
    calls_pass(&channel, KEY, 1).await;
}

#[tokio::test]
async fn layer_limits_a_grpc_method_by_its_method_path() {
    let (clock, store) = frozen_store();
    let policy = Policy::builder()
        .plan(
            UsagePlan::new("p")
                .throttle(Throttle::new(RATE, BURST).unwrap())
                .method(format!("{COMPLETE}/POST"), Throttle::new(1.0, 2).unwrap()),
        )
        .key(ApiKey::new("one", KEY, "p"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy).store(store).build();
    let channel = layered(layer, Inference::default()).await;

    calls_pass(&channel, KEY, 2).await;
    let status = call(&channel, Some(KEY)).await.unwrap_err();
    assert_eq!(
        exhausted(&status),
        (Duration::from_secs(1), "method".into())
    );
    clock.advance(Duration::from_secs(1));
    calls_pass(&channel, KEY, 1).await;
}

#[tokio::test]
async fn method_charges_tokens_and_tells_when_they_suffice() {
    let (_clock, store) = frozen_store();
    // 120 tokens at once, refilled at 2 per second.
    let tokens = Policy::builder()
        .plan(UsagePlan::new("tokens").tokens(TokenBudget::new().per_minute(120).unwrap()))
        .key(ApiKey::new("one", KEY, "tokens"))
        .build()
        .unwrap();
    let tokens = RateLimitLayer::builder(tokens).store(store).build();
    let inference = Inference::default().limit_tokens(tokens);
    let channel = layered(RateLimitLayer::new(registered_policy()), inference).await;

    // ceil(4 chars / 4) + 40 = 41 tokens a call.
    for _ in 0..2 {
        let reply = complete(&channel, Some(KEY), "abcd", 40).await.unwrap();
        assert_eq!(reply.usage.unwrap().total_tokens, 41);
        assert_eq!(reply.text.split(' ').count(), 40);
    }
    // 38 tokens left, 41 asked: 3 more come in 1.5 s. The denial names
    // the token limit and carries the trailers the layer sends.
    let status = complete(&channel, Some(KEY), "abcd", 40).await.unwrap_err();
    assert_eq!(
        exhausted(&status),
        (Duration::from_millis(1500), "tokens-minute".into())
    );
    let trailer = |name: &str| {
        status
            .metadata()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    assert_eq!(trailer("retry-after").as_deref(), Some("2"));
    assert_eq!(trailer("retry-after-ms").as_deref(), Some("1500"));
    assert_eq!(trailer("grpc-retry-pushback-ms").as_deref(), Some("1500"));
    // A smaller request still fits.
    let reply = complete(&channel, Some(KEY), "abcd", 37).await.unwrap();
    assert_eq!(reply.usage.unwrap().total_tokens, 38);
}

#[tokio::test]
async fn interceptor_rejects_like_the_layer() {
    let (clock, store) = frozen_store();
    let limit = MetadataKeyLimit {
        limit: RateLimitLayer::builder(registered_policy())
            .store(store)
            .build(),
        cost: 1,
    };
    let channel = intercepted(limit, Inference::default()).await;

    calls_pass(&channel, KEY, BURST).await;
    let status = call(&channel, Some(KEY)).await.unwrap_err();
    assert_eq!(exhausted(&status), (interval(), "throttle".into()));
    assert_eq!(status.message(), "Too Many Requests");
    // The retry metadata the layer sends, gRPC's own retry pushback first.
    let trailer = |name: &str| {
        status
            .metadata()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let ms = interval().as_millis().to_string();
    assert_eq!(trailer("grpc-retry-pushback-ms"), Some(ms.clone()));
    assert_eq!(trailer("retry-after").as_deref(), Some("1"));
    assert_eq!(trailer("retry-after-ms"), Some(ms));
    assert_eq!(trailer("x-should-retry"), None);

    for key in [None, Some("not-registered"), Some(DISABLED_KEY)] {
        let status = call(&channel, key).await.unwrap_err();
        assert_unauthenticated(&status);
    }
    calls_pass(&channel, OTHER_KEY, BURST).await;
    clock.advance(interval());
    calls_pass(&channel, KEY, 1).await;
}

#[tokio::test]
async fn method_charges_tokens_as_a_grpc_call_of_its_path() {
    let (clock, store) = frozen_store();
    // A budget far from used up, and an override of `Complete` (a gRPC
    // call is a POST) that allows one call a second.
    let tokens = Policy::builder()
        .plan(
            UsagePlan::new("tokens")
                .tokens(TokenBudget::new().per_minute(10_000).unwrap())
                .method(format!("{COMPLETE}/POST"), Throttle::new(1.0, 1).unwrap()),
        )
        .key(ApiKey::new("one", KEY, "tokens"))
        .build()
        .unwrap();
    let tokens = RateLimitLayer::builder(tokens).store(store).build();
    let inference = Inference::default().limit_tokens(tokens);
    let channel = layered(RateLimitLayer::new(registered_policy()), inference).await;

    calls_pass(&channel, KEY, 1).await;
    let status = call(&channel, Some(KEY)).await.unwrap_err();
    assert_eq!(
        exhausted(&status),
        (Duration::from_secs(1), "method".into())
    );
    clock.advance(Duration::from_secs(1));
    calls_pass(&channel, KEY, 1).await;
}
