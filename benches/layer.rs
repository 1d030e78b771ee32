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
//! - `tollgate_full_plan`: `tollgate` with each key on a full plan, the
//!   throttle, a DAY quota of 2^53 requests and a method override on the
//!   request's route (`/v1/completions/POST`, the same numbers as the
//!   throttle): three limits decided per request;
//! - `tollgate_full_plan_no_headers`: `tollgate_full_plan` with
//!   `HeaderStyle::none()`;
//! - `tower_governor`: a key extractor reading the same `x-api-key` header,
//!   `use_headers()` (`x-ratelimit-limit` / `-remaining` response headers).
//!
//! tower_governor's service needs `http::Response<B>: From<GovernorError>`,
//! which it provides for axum's body only, so every variant answers with
//! `axum::body::Body`. The limits are one request per second with a bucket of
//! `u32::MAX`: every request passes (asserted on each response).

use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use criterion::Criterion;
use http::{HeaderValue, Request, Response, StatusCode};
use tollgate::extract::ClientIp;
use tollgate::{HeaderStyle, Period, Policy, Quota, RateLimitLayer, UsagePlan};
use tower::{ServiceBuilder, ServiceExt};

#[path = "support/stack.rs"]
mod stack;

use stack::{
    KEY, X_API_KEY, governor_config, governor_default_config, governor_ip_headers_config,
    governor_key_config, registered_policy, registered_policy_on, throttle,
};

/// Whether the inner service's responses carry a `content-type`, as
/// axum's do (`TOLLGATE_CONTENT_TYPE=1`): then the response's header map
/// already has room, and a layer adding headers allocates none.
static CONTENT_TYPE: AtomicBool = AtomicBool::new(false);

async fn ok<B>(_req: Request<B>) -> Result<Response<Body>, Infallible> {
    let mut res = Response::new(Body::from(Bytes::from_static(b"ok")));
    if CONTENT_TYPE.load(Ordering::Relaxed) {
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    Ok(res)
}

/// `registered_policy`'s keys on a full plan: the throttle, a DAY quota far
/// above what a run decides, and a method override on the bench request's
/// route.
fn full_plan_policy() -> Policy {
    registered_policy_on(
        UsagePlan::new("bench")
            .throttle(throttle())
            .quota(Quota::new(1 << 53, Period::Day).expect("a valid quota"))
            .method("/v1/completions/POST", throttle()),
    )
}

/// Runs one variant: clones the service (as axum and hyper do per request),
/// sends a clone of the request, checks the answer passed.
macro_rules! variant {
    ($group:expr, $rt:expr, $req:expr, $name:literal, $svc:expr) => {
        $group.bench_function($name, |b| {
            b.to_async(&$rt).iter(|| async {
                let res = $svc.clone().oneshot($req.clone()).await.unwrap();
                assert_eq!(res.status(), StatusCode::OK);
                res
            })
        });
    };
}

/// Times `iters` requests through one variant, in ns per request.
type Runner<'a> = Box<dyn FnMut(u64) -> f64 + 'a>;

/// Adds a variant to an interleaved run.
macro_rules! timed {
    ($runs:expr, $rt:expr, $req:expr, $name:literal, $svc:expr) => {
        let (svc, req, rt) = (&$svc, &$req, &$rt);
        $runs.push((
            $name,
            Box::new(move |iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let res = svc.clone().oneshot(req.clone()).await.unwrap();
                        assert_eq!(res.status(), StatusCode::OK);
                        black_box(res);
                    }
                    start.elapsed().as_nanos() as f64 / iters as f64
                })
            }),
        ));
    };
}

/// Side by side in one process: `rounds` rounds, each timing every variant
/// in turn (so that a busy moment of the machine falls on all of them), then
/// each variant's median over the rounds and what it adds to `bare`.
#[inline(never)]
fn interleave(rounds: usize, runs: &mut [(&str, Runner<'_>)]) {
    // `TOLLGATE_ITERS` makes the rounds shorter (for counting instructions
    // under valgrind).
    let iters_env = std::env::var("TOLLGATE_ITERS")
        .ok()
        .and_then(|i| i.parse().ok());
    let iters: u64 = iters_env.unwrap_or(200_000);
    let mut times = vec![Vec::with_capacity(rounds); runs.len()];
    for (_, run) in runs.iter_mut() {
        run(iters / 10);
    }
    for _ in 0..rounds {
        for ((_, run), t) in runs.iter_mut().zip(&mut times) {
            t.push(run(iters));
        }
    }
    let median = |t: &mut Vec<f64>| {
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    let medians: Vec<f64> = times.iter_mut().map(median).collect();
    let bare = medians[0];
    println!(
        "{rounds} interleaved rounds of {iters} requests; median ns per request, and what the layer adds to bare"
    );
    let fastest = times[0][0];
    for ((name, _), (m, t)) in runs.iter().zip(medians.iter().zip(&times)) {
        println!(
            "{name:<28} {m:>7.1} ns  +{:>6.1} ns  (rounds {:.0}..{:.0}; fastest +{:.1} ns over bare's fastest)",
            m - bare,
            t[0],
            t[t.len() - 1],
            t[0] - fastest,
        );
    }
}

fn layer(c: &mut Criterion) {
    CONTENT_TYPE.store(
        std::env::var_os("TOLLGATE_CONTENT_TYPE").is_some_and(|v| v == "1"),
        Ordering::Relaxed,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a tokio runtime");
    // Every variant gets the same request: the API key header and the peer
    // address axum's `serve` would have put in the extensions.
    let mut req = Request::builder()
        .method("POST")
        .uri("/v1/completions")
        .header(X_API_KEY, KEY)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(String::new())
        .expect("a valid request");
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([192, 0, 2, 7], 40_000))));

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
    let tollgate_full_plan = ServiceBuilder::new()
        .layer(RateLimitLayer::new(full_plan_policy()))
        .service_fn(ok);
    let tollgate_full_plan_no_headers = ServiceBuilder::new()
        .layer(
            RateLimitLayer::builder(full_plan_policy())
                .headers(HeaderStyle::none())
                .build(),
        )
        .service_fn(ok);
    let per_key = || Policy::per_key(UsagePlan::new("bench").throttle(throttle())).unwrap();
    let tollgate_per_key = ServiceBuilder::new()
        .layer(RateLimitLayer::new(per_key()))
        .service_fn(ok);
    let tollgate_ip = ServiceBuilder::new()
        .layer(
            RateLimitLayer::builder(per_key())
                .extractor(ClientIp::new())
                .build(),
        )
        .service_fn(ok);
    let governor_default = ServiceBuilder::new()
        .layer(tower_governor::GovernorLayer::<_, _, Body>::new(
            governor_default_config(),
        ))
        .service_fn(ok);
    let governor_key = ServiceBuilder::new()
        .layer(tower_governor::GovernorLayer::<_, _, Body>::new(
            governor_key_config(),
        ))
        .service_fn(ok);
    let governor_headers = ServiceBuilder::new()
        .layer(tower_governor::GovernorLayer::<_, _, Body>::new(
            governor_config(),
        ))
        .service_fn(ok);
    let governor_ip_headers = ServiceBuilder::new()
        .layer(tower_governor::GovernorLayer::<_, _, Body>::new(
            governor_ip_headers_config(),
        ))
        .service_fn(ok);

    // Every variant passes, and those configured to send headers send them.
    rt.block_on(async {
        let res = bare.oneshot(req.clone()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        for res in [
            tollgate.clone().oneshot(req.clone()).await.unwrap(),
            tollgate_per_key.clone().oneshot(req.clone()).await.unwrap(),
            tollgate_ip.clone().oneshot(req.clone()).await.unwrap(),
            tollgate_full_plan
                .clone()
                .oneshot(req.clone())
                .await
                .unwrap(),
        ] {
            assert_eq!(res.status(), StatusCode::OK);
            assert!(res.headers().contains_key("ratelimit"), "{res:?}");
        }
        for res in [
            tollgate_no_headers
                .clone()
                .oneshot(req.clone())
                .await
                .unwrap(),
            tollgate_full_plan_no_headers
                .clone()
                .oneshot(req.clone())
                .await
                .unwrap(),
        ] {
            assert_eq!(res.status(), StatusCode::OK);
            assert!(!res.headers().contains_key("ratelimit"), "{res:?}");
        }
        for res in [
            governor_headers.clone().oneshot(req.clone()).await.unwrap(),
            governor_ip_headers
                .clone()
                .oneshot(req.clone())
                .await
                .unwrap(),
        ] {
            assert_eq!(res.status(), StatusCode::OK);
            assert!(
                res.headers().contains_key("x-ratelimit-remaining"),
                "{res:?}"
            );
        }
        for res in [
            governor_default.clone().oneshot(req.clone()).await.unwrap(),
            governor_key.clone().oneshot(req.clone()).await.unwrap(),
        ] {
            assert_eq!(res.status(), StatusCode::OK);
            assert!(
                !res.headers().contains_key("x-ratelimit-remaining"),
                "{res:?}"
            );
        }
    });

    if let Some(rounds) = std::env::var("TOLLGATE_INTERLEAVE")
        .ok()
        .and_then(|r| r.parse::<usize>().ok())
    {
        let mut runs: Vec<(&str, Runner<'_>)> = Vec::new();
        timed!(runs, rt, req, "bare", bare);
        timed!(runs, rt, req, "tollgate", tollgate);
        timed!(runs, rt, req, "tower_governor_default", governor_default);
        timed!(runs, rt, req, "tollgate_no_headers", tollgate_no_headers);
        timed!(runs, rt, req, "tower_governor_key", governor_key);
        timed!(runs, rt, req, "tollgate_per_key", tollgate_per_key);
        timed!(runs, rt, req, "tollgate_full_plan", tollgate_full_plan);
        timed!(
            runs,
            rt,
            req,
            "tollgate_full_plan_no_headers",
            tollgate_full_plan_no_headers
        );
        timed!(
            runs,
            rt,
            req,
            "tower_governor_key_headers",
            governor_headers
        );
        timed!(runs, rt, req, "tollgate_ip", tollgate_ip);
        timed!(
            runs,
            rt,
            req,
            "tower_governor_ip_headers",
            governor_ip_headers
        );
        // `TOLLGATE_ONLY=name` times `bare` and that variant alone (for
        // counting instructions with `perf stat`).
        if let Ok(only) = std::env::var("TOLLGATE_ONLY") {
            runs.retain(|(name, _)| *name == "bare" || *name == only);
        }
        interleave(rounds, &mut runs);
        return;
    }
    let mut group = c.benchmark_group("layer");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_secs(1));
    variant!(group, rt, req, "bare", bare);
    variant!(group, rt, req, "tollgate", tollgate);
    variant!(group, rt, req, "tower_governor_default", governor_default);
    variant!(group, rt, req, "tollgate_no_headers", tollgate_no_headers);
    variant!(group, rt, req, "tower_governor_key", governor_key);
    variant!(group, rt, req, "tollgate_per_key", tollgate_per_key);
    variant!(group, rt, req, "tollgate_full_plan", tollgate_full_plan);
    variant!(
        group,
        rt,
        req,
        "tollgate_full_plan_no_headers",
        tollgate_full_plan_no_headers
    );
    variant!(
        group,
        rt,
        req,
        "tower_governor_key_headers",
        governor_headers
    );
    variant!(group, rt, req, "tollgate_ip", tollgate_ip);
    variant!(
        group,
        rt,
        req,
        "tower_governor_ip_headers",
        governor_ip_headers
    );
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    layer(&mut c);
    c.final_summary();
}
