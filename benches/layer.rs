//! One HTTP request through a `tower::ServiceBuilder` stack: the bare service,
//! the same service behind tollgate's layer, and behind tower_governor's.
//!
//! The inner service is a trivial `service_fn` that answers 200 with a two-byte
//! body. Every variant is called the same way: the request is built once and
//! cloned per iteration, the service is cloned per iteration (as axum and hyper
//! do per request) and driven with `ServiceExt::oneshot` on a current-thread
//! tokio runtime. Key extraction and response headers are included:
//!
//! - `tollgate`: the `x-api-key` header, a policy of 10,000 registered keys,
//!   IETF `RateLimit-Policy` / `RateLimit` response headers (the defaults);
//! - `tollgate_no_headers`: `tollgate` with `HeaderStyle::none()`, to show what
//!   the response headers cost;
//! - `tollgate_per_key`: the same header as the key under `Policy::per_key`;
//! - `tower_governor`: a key extractor reading the same `x-api-key` header,
//!   `use_headers()` (`x-ratelimit-limit` / `-remaining` response headers).
//!
//! tower_governor's service needs `http::Response<B>: From<GovernorError>`,
//! which it provides for axum's body only, so every variant answers with
//! `axum::body::Body`. The limits are one request per second with a bucket of
//! `u32::MAX`: every request passes (asserted on each response).

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use criterion::Criterion;
use http::{Request, Response, StatusCode};
use tollgate::{HeaderStyle, Policy, RateLimitLayer, UsagePlan};
use tower::{ServiceBuilder, ServiceExt};

#[path = "support/stack.rs"]
mod stack;

use stack::{KEY, X_API_KEY, governor_config, registered_policy, throttle};

async fn ok<B>(_req: Request<B>) -> Result<Response<Body>, Infallible> {
    Ok(Response::new(Body::from(Bytes::from_static(b"ok"))))
}

fn layer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a tokio runtime");
    let req = Request::builder()
        .method("POST")
        .uri("/v1/completions")
        .header(X_API_KEY, KEY)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(String::new())
        .expect("a valid request");

    let bare = ServiceBuilder::new().service_fn(ok);
    let tollgate = ServiceBuilder::new()
        .layer(RateLimitLayer::new(registered_policy()))
        .service_fn(ok);
    // The same without rate-limit headers: what the headers cost.
    let tollgate_no_headers = ServiceBuilder::new()
        .layer(
            RateLimitLayer::builder(registered_policy())
                .headers(HeaderStyle::none())
                .build(),
        )
        .service_fn(ok);
    let tollgate_per_key = ServiceBuilder::new()
        .layer(RateLimitLayer::new(
            Policy::per_key(UsagePlan::new("bench").throttle(throttle())).unwrap(),
        ))
        .service_fn(ok);
    let config = governor_config();
    let governor = ServiceBuilder::new()
        .layer(tower_governor::GovernorLayer::<_, _, Body>::new(config))
        .service_fn(ok);

    // Every variant passes, and the rate-limited ones send their headers.
    rt.block_on(async {
        let res = bare.oneshot(req.clone()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        for res in [
            tollgate.clone().oneshot(req.clone()).await.unwrap(),
            tollgate_per_key.clone().oneshot(req.clone()).await.unwrap(),
        ] {
            assert_eq!(res.status(), StatusCode::OK);
            assert!(res.headers().contains_key("ratelimit"), "{res:?}");
        }
        let res = governor.clone().oneshot(req.clone()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(
            res.headers().contains_key("x-ratelimit-remaining"),
            "{res:?}"
        );
    });

    let mut group = c.benchmark_group("layer");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_secs(1));
    group.bench_function("bare", |b| {
        b.to_async(&rt).iter(|| async {
            let res = bare.oneshot(req.clone()).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            res
        })
    });
    group.bench_function("tollgate", |b| {
        b.to_async(&rt).iter(|| async {
            let res = tollgate.clone().oneshot(req.clone()).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            res
        })
    });
    group.bench_function("tollgate_no_headers", |b| {
        b.to_async(&rt).iter(|| async {
            let res = tollgate_no_headers
                .clone()
                .oneshot(req.clone())
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            res
        })
    });
    group.bench_function("tollgate_per_key", |b| {
        b.to_async(&rt).iter(|| async {
            let res = tollgate_per_key.clone().oneshot(req.clone()).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            res
        })
    });
    group.bench_function("tower_governor", |b| {
        b.to_async(&rt).iter(|| async {
            let res = governor.clone().oneshot(req.clone()).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            res
        })
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    layer(&mut c);
    c.final_summary();
}
