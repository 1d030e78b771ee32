//! The layer in axum routers, served on loopback ports and driven by a real
//! HTTP client. Time-dependent tests run on a frozen manual clock.

use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use tollgate::extract::{Bearer, ClientIp, ExtensionKey, ForwardedHeader};
use tollgate::{HeaderStyle, RateLimitLayer, Rejection};

use crate::support::{
    BURST, DISABLED_KEY, KEY, OTHER_KEY, client, frozen_store, header, ip_app, ok, pass_then_429,
    per_key_policy, registered_policy, serve, serve_without_connect_info, statuses,
};

const TOO_MANY: &str = r#"{"message":"Too Many Requests"}"#;
const FORBIDDEN: &str = r#"{"message":"Forbidden"}"#;

/// A layer of the registered policy (2/s, bursts of 5) on a frozen clock.
fn registered_layer() -> (tollgate::ManualClock, RateLimitLayer) {
    let (clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(registered_policy())
        .store(store)
        .build();
    (clock, layer)
}

async fn get_with_key(c: &reqwest::Client, url: &str, key: &str) -> reqwest::Response {
    c.get(url).header("x-api-key", key).send().await.unwrap()
}

async fn assert_too_many(res: reqwest::Response) {
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "content-type"), "application/json");
    assert_eq!(res.text().await.unwrap(), TOO_MANY);
}

#[tokio::test]
async fn registered_key_gets_its_burst_then_429_until_time_refills_it() {
    let (clock, layer) = registered_layer();
    let base = serve(Router::new().route("/", get(ok)).layer(layer)).await;
    let c = client();

    for (used, remaining) in (0..BURST).rev().enumerate() {
        let res = get_with_key(&c, &base, KEY).await;
        assert_eq!(res.status(), 200);
        assert_eq!(header(&res, "ratelimit-policy"), r#""throttle";q=5;w=3"#);
        // The bucket is full again after 0.5 s per request used, rounded up.
        let t = (used as u64 + 1).div_ceil(2);
        assert_eq!(
            header(&res, "ratelimit"),
            format!(r#""throttle";r={remaining};t={t}"#)
        );
        assert!(res.headers().get("retry-after").is_none());
        assert_eq!(res.text().await.unwrap(), "ok");
    }

    let res = get_with_key(&c, &base, KEY).await;
    assert_eq!(res.status(), 429);
    // 2 per second: the next request fits in 0.5 s, rounded up to 1.
    assert_eq!(header(&res, "retry-after"), "1");
    assert_eq!(header(&res, "ratelimit-policy"), r#""throttle";q=5;w=3"#);
    assert_eq!(header(&res, "ratelimit"), r#""throttle";r=0;t=1"#);
    assert_too_many(res).await;

    // Another key of the same plan has its own bucket.
    assert_eq!(get_with_key(&c, &base, OTHER_KEY).await.status(), 200);

    clock.advance(Duration::from_millis(499));
    assert_eq!(get_with_key(&c, &base, KEY).await.status(), 429);
    clock.advance(Duration::from_millis(1));
    let res = get_with_key(&c, &base, KEY).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "ratelimit"), r#""throttle";r=0;t=3"#);
    assert_too_many(get_with_key(&c, &base, KEY).await).await;
}

#[tokio::test]
async fn key_problems_are_403_forbidden() {
    let (_clock, layer) = registered_layer();
    let base = serve(Router::new().route("/", get(ok)).layer(layer)).await;
    let c = client();

    let long = "k".repeat(1000);
    let cases: Vec<(&str, reqwest::RequestBuilder)> = vec![
        ("missing", c.get(&base)),
        (
            "unknown",
            c.get(&base).header("x-api-key", "not-registered"),
        ),
        ("disabled", c.get(&base).header("x-api-key", DISABLED_KEY)),
        ("empty", c.get(&base).header("x-api-key", "")),
        ("oversized", c.get(&base).header("x-api-key", long.as_str())),
        (
            "non-utf-8",
            c.get(&base)
                .header("x-api-key", HeaderValue::from_bytes(&[0xff, 0xfe]).unwrap()),
        ),
        ("inner space", c.get(&base).header("x-api-key", "key one")),
        (
            "repeated",
            c.get(&base)
                .header("x-api-key", KEY)
                .header("x-api-key", OTHER_KEY),
        ),
    ];
    for (case, req) in cases {
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 403, "{case}");
        assert_eq!(header(&res, "content-type"), "application/json", "{case}");
        assert!(res.headers().get("retry-after").is_none(), "{case}");
        assert!(res.headers().get("ratelimit").is_none(), "{case}");
        assert_eq!(res.text().await.unwrap(), FORBIDDEN, "{case}");
    }

    // None of that touched the budget of the real key.
    assert_eq!(
        statuses(6, |_| c.get(&base).header("x-api-key", KEY)).await,
        pass_then_429(5, 1)
    );
}

#[tokio::test]
async fn clones_of_one_layer_share_one_budget_across_servers() {
    let (_clock, layer) = registered_layer();
    let a = serve(Router::new().route("/a", get(ok)).layer(layer.clone())).await;
    let b = serve(Router::new().route("/b", get(ok)).layer(layer)).await;
    let c = client();
    let urls = [format!("{a}/a"), format!("{b}/b")];
    let got = statuses(10, |i| c.get(&urls[i % 2]).header("x-api-key", KEY)).await;
    assert_eq!(got, pass_then_429(5, 5));
}

#[tokio::test]
async fn routes_under_one_router_layer_share_one_budget() {
    let (_clock, layer) = registered_layer();
    let base = serve(
        Router::new()
            .route("/a", get(ok))
            .route("/b", post(ok))
            .layer(layer),
    )
    .await;
    let c = client();
    let got = statuses(10, |i| {
        if i % 2 == 0 {
            c.get(format!("{base}/a"))
        } else {
            c.post(format!("{base}/b"))
        }
        .header("x-api-key", KEY)
    })
    .await;
    assert_eq!(got, pass_then_429(5, 5));
}

#[tokio::test]
async fn route_layer_limits_only_the_routes_under_it() {
    let (_clock, layer) = registered_layer();
    let base = serve(
        Router::new()
            .route("/limited", get(ok))
            .route_layer(layer)
            .route("/open", get(ok)),
    )
    .await;
    let c = client();
    let limited = format!("{base}/limited");
    let open = format!("{base}/open");

    assert_eq!(c.get(&limited).send().await.unwrap().status(), 403);
    assert_eq!(
        statuses(6, |_| c.get(&limited).header("x-api-key", KEY)).await,
        pass_then_429(5, 1)
    );
    // Without a key, and with the exhausted one: never limited.
    assert_eq!(
        statuses(10, |i| if i % 2 == 0 {
            c.get(&open)
        } else {
            c.get(&open).header("x-api-key", KEY)
        })
        .await,
        vec![StatusCode::OK; 10]
    );
    // route_layer does not wrap the fallback.
    assert_eq!(
        c.get(format!("{base}/nowhere"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test]
async fn client_ip_ignores_forwarded_headers_from_an_untrusted_peer() {
    let base = serve(ip_app(ClientIp::new())).await;
    let c = client();
    let got = statuses(8, |i| {
        let req = c.get(&base);
        match i % 4 {
            0 => req,
            1 => req.header("x-forwarded-for", format!("198.51.100.{i}")),
            2 => req.header("x-forwarded-for", format!("203.0.113.{i}, 127.0.0.1")),
            _ => req.header("forwarded", format!("for=192.0.2.{i}")),
        }
    })
    .await;
    assert_eq!(got, pass_then_429(5, 3));
}

#[tokio::test]
async fn client_ip_behind_a_trusted_proxy_keys_by_the_rightmost_untrusted_entry() {
    let base = serve(ip_app(
        ClientIp::new().trust_proxy("127.0.0.1/32".parse().unwrap()),
    ))
    .await;
    let c = client();
    let xff = |v: &'static str| c.get(&base).header("x-forwarded-for", v);

    // Different forwarded clients are different keys.
    assert_eq!(
        statuses(6, |_| xff("198.51.100.1")).await,
        pass_then_429(5, 1)
    );
    assert_eq!(
        statuses(6, |_| xff("198.51.100.2")).await,
        pass_then_429(5, 1)
    );

    // The client is the rightmost entry that is not a trusted proxy.
    assert_eq!(statuses(6, |_| xff("5.6.7.8")).await, pass_then_429(5, 1));
    // Prepending entries does not escape the budget of 5.6.7.8 ...
    for spoof in [
        "1.2.3.4, 5.6.7.8",
        "9.9.9.9,5.6.7.8",
        "1.2.3.4, 5.6.7.8, 127.0.0.1",
    ] {
        assert_eq!(xff(spoof).send().await.unwrap().status(), 429, "{spoof}");
    }
    // ... and did not charge 1.2.3.4.
    assert_eq!(statuses(6, |_| xff("1.2.3.4")).await, pass_then_429(5, 1));

    // Without a forwarded header, the trusted peer itself is the client.
    assert_eq!(statuses(6, |_| c.get(&base)).await, pass_then_429(5, 1));
}

#[tokio::test]
async fn client_ip_reads_the_configured_forwarded_header_and_groups_ipv6() {
    let trusted = || ClientIp::new().trust_proxy("127.0.0.1/32".parse().unwrap());
    let base = serve(ip_app(
        trusted().forwarded_header(ForwardedHeader::Forwarded),
    ))
    .await;
    let c = client();
    let fwd = |v: &'static str| c.get(&base).header("forwarded", v);
    assert_eq!(
        statuses(6, |_| fwd("for=198.51.100.1")).await,
        pass_then_429(5, 1)
    );
    assert_eq!(
        statuses(6, |_| fwd(r#"for="[2001:db8::1]:4711";proto=http"#)).await,
        pass_then_429(5, 1)
    );
    // X-Forwarded-For is not the configured header: the client is the peer.
    assert_eq!(
        statuses(6, |_| c
            .get(&base)
            .header("x-forwarded-for", "198.51.100.9"))
        .await,
        pass_then_429(5, 1)
    );
    assert_eq!(c.get(&base).send().await.unwrap().status(), 429);

    // IPv6 clients share the budget of their /64 by default ...
    let base = serve(ip_app(trusted())).await;
    let got = statuses(6, |i| {
        c.get(&base)
            .header("x-forwarded-for", format!("2001:db8:0:1::{}", i + 1))
    })
    .await;
    assert_eq!(got, pass_then_429(5, 1));
    // ... and each address has its own with a prefix of 128.
    let base = serve(ip_app(trusted().ipv6_prefix(128))).await;
    let got = statuses(6, |i| {
        c.get(&base)
            .header("x-forwarded-for", format!("2001:db8:0:1::{}", i + 1))
    })
    .await;
    assert_eq!(got, vec![StatusCode::OK; 6]);
}

#[tokio::test]
async fn client_ip_without_connect_info_is_a_clear_500() {
    let base = serve_without_connect_info(ip_app(ClientIp::new())).await;
    let res = client().get(&base).send().await.unwrap();
    assert_eq!(res.status(), 500);
    assert_eq!(header(&res, "content-type"), "application/json");
    assert!(res.headers().get("retry-after").is_none());
    // OpenAI's SDKs retry a 500: no retry of this one can pass.
    assert_eq!(header(&res, "x-should-retry"), "false");
    let body: serde_json::Value = res.json().await.unwrap();
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("into_make_service_with_connect_info"),
        "{message}"
    );

    // A gRPC call gets the same as INTERNAL.
    let res = client()
        .get(&base)
        .header("content-type", "application/grpc")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "grpc-status"), "13");
    assert!(header(&res, "grpc-message").contains("into_make_service_with_connect_info"));
    assert_eq!(header(&res, "x-should-retry"), "false");
}

#[tokio::test]
async fn grpc_requests_over_http1_get_trailers_only_rejections() {
    let (_clock, layer) = registered_layer();
    let base = serve(Router::new().route("/svc/Method", post(ok)).layer(layer)).await;
    let c = client();
    let call = |ct: &'static str, key: &'static str| {
        c.post(format!("{base}/svc/Method"))
            .header("content-type", ct)
            .header("x-api-key", key)
            .body(Bytes::from_static(&[0, 0, 0, 0, 0]))
    };

    let got = statuses(BURST as usize, |_| call("application/grpc", KEY)).await;
    assert_eq!(got, vec![StatusCode::OK; BURST as usize]);

    // The answer names the request's codec (its `+` suffix), as gRPC
    // servers do, without the request's parameters.
    for (ct, answered) in [
        ("application/grpc", "application/grpc"),
        ("application/grpc+proto", "application/grpc+proto"),
        ("application/grpc+json", "application/grpc+json"),
        ("Application/GRPC+JSON", "application/grpc+json"),
        (
            "application/grpc+json; charset=utf-8",
            "application/grpc+json",
        ),
        ("application/grpc;charset=utf-8", "application/grpc"),
    ] {
        let res = call(ct, KEY).send().await.unwrap();
        assert_eq!(res.status(), 200, "{ct}");
        assert_eq!(header(&res, "grpc-status"), "8", "{ct}");
        assert!(!header(&res, "grpc-message").is_empty(), "{ct}");
        assert_eq!(header(&res, "content-type"), answered, "{ct}");
        assert_eq!(header(&res, "retry-after"), "1");
        assert_eq!(header(&res, "ratelimit"), r#""throttle";r=0;t=1"#);
        assert!(res.bytes().await.unwrap().is_empty(), "{ct}");
    }

    // gRPC-Web is answered trailers-only too, in its own content type.
    for ct in [
        "application/grpc-web",
        "application/grpc-web+proto",
        "application/grpc-web-text",
    ] {
        let res = call(ct, KEY).send().await.unwrap();
        assert_eq!(res.status(), 200, "{ct}");
        assert_eq!(header(&res, "grpc-status"), "8", "{ct}");
        assert_eq!(header(&res, "content-type"), ct);
        assert!(res.bytes().await.unwrap().is_empty(), "{ct}");
    }

    let res = call("application/grpc+proto", "not-registered")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "grpc-status"), "16");
    assert_eq!(header(&res, "content-type"), "application/grpc+proto");
    assert!(!header(&res, "grpc-message").is_empty());
    assert!(res.bytes().await.unwrap().is_empty());
}

/// Copies the reason of a rejection into `x-rejection` on the way out.
async fn expose_rejection(mut res: Response) -> Response {
    let reason = res
        .extensions()
        .get::<Rejection>()
        .map(|r| format!("{:?}", r.reason()));
    if let Some(reason) = reason {
        res.headers_mut()
            .insert("x-rejection", HeaderValue::from_str(&reason).unwrap());
    }
    res
}

#[tokio::test]
async fn custom_rejections_keep_headers_and_expose_the_rejection() {
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(registered_policy())
        .store(store)
        .on_rejection(|r: &Rejection| {
            http::Response::builder()
                .status(if r.status() == 429 { 503 } else { 401 })
                .header("content-type", "text/plain")
                .body(Bytes::from(format!("custom: {r}")))
                .unwrap()
        })
        .build();
    let base = serve(
        Router::new()
            .route("/", get(ok))
            .layer(layer)
            .layer(middleware::map_response(expose_rejection)),
    )
    .await;
    let c = client();

    for _ in 0..BURST {
        let res = get_with_key(&c, &base, KEY).await;
        assert_eq!(res.status(), 200);
        assert!(res.headers().get("x-rejection").is_none());
    }
    let res = get_with_key(&c, &base, KEY).await;
    assert_eq!(res.status(), 503);
    assert_eq!(header(&res, "content-type"), "text/plain");
    assert_eq!(header(&res, "retry-after"), "1");
    assert_eq!(header(&res, "ratelimit-policy"), r#""throttle";q=5;w=3"#);
    assert_eq!(header(&res, "ratelimit"), r#""throttle";r=0;t=1"#);
    assert_eq!(header(&res, "x-rejection"), "Limited");
    assert_eq!(
        res.text().await.unwrap(),
        "custom: rejected: throttle limit reached"
    );

    let res = c.get(&base).send().await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(header(&res, "x-rejection"), "Key(Missing)");
    assert!(res.headers().get("retry-after").is_none());
    assert_eq!(
        res.text().await.unwrap(),
        "custom: rejected: no key in request"
    );

    let res = get_with_key(&c, &base, "not-registered").await;
    assert_eq!(header(&res, "x-rejection"), "UnknownKey");
}

#[tokio::test]
async fn x_ratelimit_headers_can_be_added() {
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(registered_policy())
        .store(store)
        .headers(HeaderStyle::ietf().x_ratelimit(true))
        .build();
    let base = serve(Router::new().route("/", get(ok)).layer(layer)).await;
    let c = client();
    for (used, remaining) in (0..BURST).rev().enumerate() {
        let res = get_with_key(&c, &base, KEY).await;
        assert_eq!(res.status(), 200);
        let t = (used as u64 + 1).div_ceil(2).to_string();
        assert_eq!(header(&res, "x-ratelimit-limit"), "5");
        assert_eq!(header(&res, "x-ratelimit-remaining"), remaining.to_string());
        assert_eq!(header(&res, "x-ratelimit-reset"), t);
        assert_eq!(
            header(&res, "ratelimit"),
            format!(r#""throttle";r={remaining};t={t}"#)
        );
    }
    let res = get_with_key(&c, &base, KEY).await;
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "x-ratelimit-limit"), "5");
    assert_eq!(header(&res, "x-ratelimit-remaining"), "0");
    // On a rejection the reset is the retry, as `Retry-After` says.
    assert_eq!(header(&res, "x-ratelimit-reset"), "1");
    assert_eq!(header(&res, "retry-after"), "1");
}

#[tokio::test]
async fn header_style_none_sends_no_ratelimit_headers() {
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(registered_policy())
        .store(store)
        .headers(HeaderStyle::none())
        .build();
    let base = serve(Router::new().route("/", get(ok)).layer(layer)).await;
    let c = client();
    let names = [
        "ratelimit",
        "ratelimit-policy",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    ];
    for i in 0..=BURST {
        let res = get_with_key(&c, &base, KEY).await;
        for name in names {
            assert!(res.headers().get(name).is_none(), "{name}");
        }
        if i < BURST {
            assert_eq!(res.status(), 200);
            assert!(res.headers().get("retry-after").is_none());
        } else {
            assert_eq!(header(&res, "retry-after"), "1");
            assert_too_many(res).await;
        }
    }
}

/// Stands in for an authentication layer: the `x-user` header becomes a
/// `String` extension.
async fn authenticate(mut req: Request, next: Next) -> Response {
    let user = req
        .headers()
        .get("x-user")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(user) = user {
        req.extensions_mut().insert(user);
    }
    next.run(req).await
}

#[tokio::test]
async fn extension_key_limits_by_the_upstream_identity() {
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(per_key_policy())
        .extractor(ExtensionKey::<String>::new())
        .store(store)
        .build();
    let base = serve(
        Router::new()
            .route("/", get(ok))
            .layer(layer)
            .layer(middleware::from_fn(authenticate)),
    )
    .await;
    let c = client();
    let user = |u: &'static str| c.get(&base).header("x-user", u);
    assert_eq!(statuses(6, |_| user("alice")).await, pass_then_429(5, 1));
    assert_eq!(statuses(6, |_| user("bob")).await, pass_then_429(5, 1));
    let res = c.get(&base).send().await.unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(res.text().await.unwrap(), FORBIDDEN);
}

#[tokio::test]
async fn bearer_limits_by_the_token() {
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(per_key_policy())
        .extractor(Bearer::default())
        .store(store)
        .build();
    let base = serve(Router::new().route("/", get(ok)).layer(layer)).await;
    let c = client();
    let auth = |v: &'static str| c.get(&base).header("authorization", v);
    assert_eq!(
        statuses(6, |_| auth("Bearer tok-1")).await,
        pass_then_429(5, 1)
    );
    // The scheme is case-insensitive: the same token, the same budget.
    assert_eq!(auth("bearer  tok-1").send().await.unwrap().status(), 429);
    assert_eq!(
        statuses(6, |_| auth("Bearer tok-2")).await,
        pass_then_429(5, 1)
    );
    for (case, req) in [
        ("missing", c.get(&base)),
        ("basic", auth("Basic dXNlcjpwYXNz")),
        ("no token", auth("Bearer")),
    ] {
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 403, "{case}");
        assert_eq!(res.text().await.unwrap(), FORBIDDEN, "{case}");
    }
}

/// A shadow plan decides, counts and sends headers, but never rejects: past
/// its limits requests still pass, and the headers show the limits used up.
#[tokio::test]
async fn a_shadow_plan_passes_past_its_limits_and_says_so_in_headers() {
    use tollgate::{ApiKey, Period, Policy, Quota, Throttle, UsagePlan};

    let (_clock, store) = frozen_store();
    let policy = Policy::builder()
        .plan(
            UsagePlan::new("trial")
                .throttle(Throttle::new(1.0, 2).unwrap())
                .quota(Quota::new(3, Period::Day).unwrap())
                .shadow(true),
        )
        .key(ApiKey::new("t", KEY, "trial"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy)
        .store(store)
        .headers(HeaderStyle::ietf().openai(true))
        .build();
    let base = serve(Router::new().route("/", get(ok)).layer(layer)).await;
    let c = client();
    let mut seen = Vec::new();
    for _ in 0..6 {
        let res = get_with_key(&c, &format!("{base}/"), KEY).await;
        assert_eq!(res.status(), StatusCode::OK);
        seen.push(header(&res, "ratelimit").to_owned());
        assert!(header(&res, "ratelimit-policy").contains("\"quota\";q=3;w=86400"));
    }
    // The bucket of 2 is empty from the second request on, and then stays
    // empty; the quota of 3 is used up past the third.
    assert_eq!(seen[0], "\"throttle\";r=1;t=1");
    assert!(seen[1..].iter().all(|h| h.contains(";r=0;")), "{seen:?}");
    let res = get_with_key(&c, &format!("{base}/"), KEY).await;
    assert_eq!(header(&res, "x-ratelimit-remaining-requests"), "0");
}

/// A shadow plan never rejects, even when the memory store has no room to
/// count another client: its quota and its concurrency cap let such a
/// request through uncounted, as its throttle already did, instead of
/// answering 429 "store cannot track another key".
#[tokio::test]
async fn a_shadow_plan_passes_clients_the_store_has_no_room_to_count() {
    use tollgate::{MemoryStore, Period, Policy, Quota, Throttle, UsagePlan};

    let plans = [
        (
            "quota",
            UsagePlan::new("s").quota(Quota::new(100, Period::Day).unwrap()),
        ),
        ("concurrency", UsagePlan::new("s").concurrency(5)),
    ];
    for (case, plan) in plans {
        // A throttle on a frozen clock keeps every client's slot live, and
        // a store sized for one key soon has no room for the next.
        let plan = plan.throttle(Throttle::new(1.0, 10).unwrap()).shadow(true);
        let clock = tollgate::ManualClock::new();
        let store = MemoryStore::builder()
            .max_keys(1)
            .clock(clock)
            .build()
            .unwrap();
        let layer = RateLimitLayer::builder(Policy::per_key(plan).unwrap())
            .extractor(Bearer::default())
            .store(store)
            .build();
        let base = serve(Router::new().route("/", get(ok)).layer(layer)).await;
        let c = client();
        let mut refused = 0;
        for i in 0..400 {
            let res = c
                .get(&base)
                .header("authorization", format!("Bearer client-{i}"))
                .send()
                .await
                .unwrap();
            refused += usize::from(res.status() != StatusCode::OK);
        }
        assert_eq!(refused, 0, "{case}: a shadow plan refused {refused} of 400");
    }
}

/// Plan `p`: a throttle of 1 a second in bursts of `burst`, and an override
/// of 1 a second in bursts of 2 on `POST /v1/completions`.
fn overridden_plan(burst: u32) -> tollgate::UsagePlan {
    use tollgate::{Throttle, UsagePlan};
    UsagePlan::new("p")
        .throttle(Throttle::new(1.0, burst).unwrap())
        .method("/v1/completions/POST", Throttle::new(1.0, 2).unwrap())
}

/// Serves `/v1/completions` (POST and GET) behind a layer of `plan` (named
/// `p`), with `KEY` registered on it, on a frozen clock; returns the clock
/// and the route's URL.
async fn serve_completions(plan: tollgate::UsagePlan) -> (tollgate::ManualClock, String) {
    use tollgate::{ApiKey, Policy};
    let (clock, store) = frozen_store();
    let policy = Policy::builder()
        .plan(plan)
        .key(ApiKey::new("k1", KEY, "p"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy).store(store).build();
    let app = Router::new()
        .route("/v1/completions", post(ok).get(ok))
        .layer(layer);
    let base = serve(app).await;
    (clock, format!("{base}/v1/completions"))
}

/// A plan of a throttle, a day's quota and a method override: a request
/// whose route matches the override is held to it, one whose route does not
/// is decided by the throttle and the quota alone (without gathering its
/// limits), and both count against the one quota.
#[tokio::test]
async fn a_full_plan_holds_its_override_and_counts_every_route_in_its_quota() {
    use tollgate::{Period, Quota};
    let plan = overridden_plan(10).quota(Quota::new(5, Period::Day).unwrap());
    let (clock, url) = serve_completions(plan).await;
    clock.set_wall(crate::support::at(2026, 3, 14, 12 * 3600));
    let c = client();
    let post = || c.post(&url).header("x-api-key", KEY).send();
    let get = || c.get(&url).header("x-api-key", KEY).send();

    // The override's burst of 2, then its refusal (a second's wait).
    for _ in 0..2 {
        assert_eq!(post().await.unwrap().status(), 200);
    }
    let res = post().await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "retry-after"), "1");
    // Another route is not held to the override: 3 more fill the quota.
    for _ in 0..3 {
        assert_eq!(get().await.unwrap().status(), 200);
    }
    // The quota of 5 is used: refused until the day ends (12 hours).
    let res = get().await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "retry-after"), "43200");
}

/// A plan of a throttle and a method override: a request whose route
/// matches the override is held to it and to the throttle, one whose route
/// does not is decided by the throttle alone, and both take from the
/// throttle.
#[tokio::test]
async fn a_throttle_with_an_override_holds_only_the_routes_it_names() {
    let (_clock, url) = serve_completions(overridden_plan(5)).await;
    let c = client();
    let post = || c.post(&url).header("x-api-key", KEY).send();
    let get = || c.get(&url).header("x-api-key", KEY).send();

    for _ in 0..2 {
        assert_eq!(post().await.unwrap().status(), 200);
    }
    assert_eq!(post().await.unwrap().status(), 429);
    // The throttle's burst of 5: 2 taken by the posts, 3 left for the rest.
    for _ in 0..3 {
        assert_eq!(get().await.unwrap().status(), 200);
    }
    let res = get().await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "ratelimit"), r#""throttle";r=0;t=1"#);
}

/// axum answers `HEAD` with a route's `GET` handler, so a `GET` override
/// holds a `HEAD` request too: the handler a client calls cannot be run
/// past the override by asking for the head alone. A `HEAD` override, when
/// the plan names one, is the more literal.
#[tokio::test]
async fn a_get_override_holds_head_requests_too() {
    use tollgate::{Throttle, UsagePlan};
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(1.0, 100).unwrap())
        .method("/v1/completions/GET", Throttle::new(1.0, 2).unwrap());
    let (_clock, url) = serve_completions(plan).await;
    let c = client();
    let head = || c.head(&url).header("x-api-key", KEY).send();
    let get = || c.get(&url).header("x-api-key", KEY).send();
    assert_eq!(get().await.unwrap().status(), 200);
    assert_eq!(head().await.unwrap().status(), 200);
    assert_eq!(head().await.unwrap().status(), 429);
    assert_eq!(get().await.unwrap().status(), 429);

    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(1.0, 100).unwrap())
        .method("/v1/completions/GET", Throttle::new(1.0, 1).unwrap())
        .method("/v1/completions/HEAD", Throttle::new(1.0, 3).unwrap());
    let (_clock, url) = serve_completions(plan).await;
    let head = || c.head(&url).header("x-api-key", KEY).send();
    for _ in 0..3 {
        assert_eq!(head().await.unwrap().status(), 200);
    }
    assert_eq!(head().await.unwrap().status(), 429);
}

/// A route that forwards every `/v1/…` path (a proxy to an inference
/// server) serves `/v1/x/../completions` as the server behind reads it once
/// its HTTP client or router has resolved the dot segments: as
/// `/v1/completions`. The override of that route holds it, spelt with `.`
/// or `..` segments, plainly or percent-encoded.
#[tokio::test]
async fn dot_segments_do_not_take_a_request_out_of_its_override() {
    use crate::support::server::{exchange, post_bytes};
    use tollgate::{ApiKey, Policy, Throttle, UsagePlan};
    let (_clock, store) = frozen_store();
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(1.0, 100).unwrap())
        .method("/v1/completions/POST", Throttle::new(1.0, 2).unwrap());
    let policy = Policy::builder()
        .plan(plan)
        .key(ApiKey::new("k1", KEY, "p"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy).store(store).build();
    let app = Router::new().route("/v1/{*path}", post(ok)).layer(layer);
    let base = serve(app).await;
    let addr = base.trim_start_matches("http://").parse().unwrap();
    let status = |path: &'static str| async move {
        exchange(addr, &post_bytes(path, KEY, "{}"))
            .await
            .unwrap()
            .status
    };
    assert_eq!(status("/v1/completions").await, 200);
    assert_eq!(status("/v1/completions").await, 200);
    for path in [
        "/v1/completions",
        "/v1/./completions",
        "/v1/x/../completions",
        "/v1/x/y/../../completions/.",
        "/v1/%2e/completions",
        "/v1/x/%2E%2e/completions",
        "/v1/x/.%2E/completions",
        "/v1/chat/x/../../completions",
        "/v1/x%2F..%2Fcompletions",
    ] {
        assert_eq!(status(path).await, 429, "{path}");
    }
    // Other routes, dotted or not, are not held to it.
    for path in [
        "/v1/completions/../models",
        "/v1/x/..",
        "/v1/.../completions",
    ] {
        assert_eq!(status(path).await, 200, "{path}");
    }
}

/// A request decided against many limits (the stage's, its account's, its
/// plan's and its model's) is told every one of them in `RateLimit-Policy`,
/// however long the value.
#[tokio::test]
async fn the_policy_header_lists_every_limit_of_a_request_with_many() {
    use tollgate::{
        Account, ApiKey, ModelLimits, Period, Policy, Quota, Stage, Throttle, TokenBudget,
        UsagePlan,
    };
    let (_clock, store) = frozen_store();
    let tokens = || {
        TokenBudget::new()
            .per_minute(100_000)
            .unwrap()
            .per_day(1_000_000)
            .unwrap()
            .per_month(10_000_000)
            .unwrap()
    };
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(50.0, 100).unwrap())
        .quota(Quota::new(100_000, Period::Month).unwrap())
        .method(
            "/v1/chat/completions/POST",
            Throttle::new(20.0, 40).unwrap(),
        )
        .tokens(tokens())
        .concurrency(8)
        .model(
            "big-model",
            ModelLimits::new()
                .throttle(Throttle::new(5.0, 10).unwrap())
                .quota(Quota::new(10_000, Period::Day).unwrap())
                .tokens(tokens())
                .concurrency(2),
        );
    let policy = Policy::builder()
        .plan(plan)
        .account(
            Account::new("acme")
                .throttle(Throttle::new(100.0, 200).unwrap())
                .quota(Quota::new(500_000, Period::Month).unwrap())
                .tokens(tokens()),
        )
        .stage(Stage::new().throttle(Throttle::new(1_000.0, 2_000).unwrap()))
        .key(ApiKey::new("k", "secret", "p").account("acme"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy)
        .store(store)
        .estimator(|_: &tollgate::extract::RequestView<'_>| 10)
        .model(|_| Some("big-model"))
        .build();
    let base = serve(
        Router::new()
            .route("/v1/chat/completions", post(ok))
            .layer(layer),
    )
    .await;
    let res = client()
        .post(format!("{base}/v1/chat/completions"))
        .header("x-api-key", "secret")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let policy = header(&res, "ratelimit-policy");
    let names: Vec<&str> = policy
        .split(", ")
        .map(|item| item.split('"').nth(1).unwrap())
        .collect();
    for name in [
        "stage",
        "account",
        "account-tokens-minute",
        "account-quota",
        "account-tokens-day",
        "account-tokens-month",
        "throttle",
        "method",
        "tokens-minute",
        "quota",
        "tokens-day",
        "tokens-month",
        "model",
        "model-tokens-minute",
        "model-quota",
        "model-tokens-day",
        "model-tokens-month",
        "concurrency",
        "model-concurrency",
    ] {
        assert!(names.contains(&name), "{name} missing from {policy}");
    }
    assert_eq!(names.len(), 19, "{policy}");
}

/// A 429 announces the policies an allowed response of the same caller and
/// route does, however the caller was found: a per-key policy's key (its
/// plan's throttle, quota and the route's override) and a client without
/// a key, limited by its address under the anonymous plan and the stage.
#[tokio::test]
async fn a_rejection_announces_the_policies_of_per_key_and_anonymous_callers() {
    use tollgate::{Anonymous, Period, Policy, Quota, Stage, Throttle, UsagePlan};

    let per_key = Policy::per_key(
        UsagePlan::new("p")
            .throttle(Throttle::new(1.0, 1).unwrap())
            .quota(Quota::new(1_000, Period::Day).unwrap())
            .method("/limited/GET", Throttle::new(5.0, 10).unwrap()),
    )
    .unwrap();
    let anonymous = Policy::builder()
        .stage(Stage::new().throttle(Throttle::new(100.0, 200).unwrap()))
        .anonymous(Anonymous::ByIp {
            throttle: Throttle::new(1.0, 1).unwrap(),
            client_ip: ClientIp::new(),
        })
        .build()
        .unwrap();
    let c = client();
    for (case, policy, want) in [
        (
            "per key",
            per_key,
            r#""throttle";q=1;w=1, "method";q=10;w=2, "quota";q=1000;w=86400"#,
        ),
        (
            "anonymous",
            anonymous,
            r#""stage";q=200;w=2, "throttle";q=1;w=1"#,
        ),
    ] {
        let (_clock, store) = frozen_store();
        let layer = RateLimitLayer::builder(policy).store(store).build();
        let base = serve(Router::new().route("/limited", get(ok)).layer(layer)).await;
        let send = || match case {
            "anonymous" => c.get(format!("{base}/limited")),
            _ => c.get(format!("{base}/limited")).header("x-api-key", KEY),
        };
        let allowed = send().send().await.unwrap();
        assert_eq!(allowed.status(), 200, "{case}");
        assert_eq!(header(&allowed, "ratelimit-policy"), want, "{case}");
        let res = send().send().await.unwrap();
        assert_eq!(res.status(), 429, "{case}");
        assert_eq!(header(&res, "ratelimit-policy"), want, "{case}");
        assert_eq!(header(&res, "ratelimit"), r#""throttle";r=0;t=1"#, "{case}");
    }
}
