//! Hostile input against a real server on loopback, driven by a real HTTP
//! client: oversized and malformed key headers, forwarded headers with
//! thousands of entries, and a flood of distinct keys against a capped store.
//! Each is answered cleanly, in bounded time and memory, and none takes the
//! server down or costs a well-behaved caller its budget.

use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use http::HeaderValue;
use tollgate::extract::{Bearer, ClientIp, DEFAULT_MAX_KEY_LEN, ForwardedHeader};
use tollgate::{ManualClock, MemoryStore, Policy, RateLimitLayer, Reason, Throttle, UsagePlan};

use crate::support::{BURST, client, frozen_store, per_key_policy, serve};

const FORBIDDEN: &str = r#"{"message":"Forbidden"}"#;

/// What one hostile request may take, however large, in a debug build on a
/// loaded machine; a walk that went quadratic in its input would take minutes.
const BOUNDED: Duration = Duration::from_secs(5);

async fn ok() -> &'static str {
    "ok"
}

/// Per-key limits (bursts of 5, time frozen) keyed by `x-api-key`.
async fn api_key_server() -> String {
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(per_key_policy())
        .store(store)
        .build();
    serve(Router::new().route("/", get(ok)).layer(layer)).await
}

/// Per-key limits keyed by the bearer token.
async fn bearer_server() -> String {
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(per_key_policy())
        .extractor(Bearer::new())
        .store(store)
        .build();
    serve(Router::new().route("/", get(ok)).layer(layer)).await
}

/// Per-client limits behind a trusted proxy on loopback.
async fn ip_server(header: ForwardedHeader) -> String {
    let (_clock, store) = frozen_store();
    let extractor = ClientIp::new()
        .trust_proxies([
            "127.0.0.0/8".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ])
        .forwarded_header(header);
    let layer = RateLimitLayer::builder(per_key_policy())
        .extractor(extractor)
        .store(store)
        .build();
    serve(Router::new().route("/", get(ok)).layer(layer)).await
}

/// Sends `n` requests made by `req`; returns the statuses and the slowest time.
async fn send(n: usize, mut req: impl FnMut() -> reqwest::RequestBuilder) -> (Vec<u16>, Duration) {
    let mut statuses = Vec::with_capacity(n);
    let mut slowest = Duration::ZERO;
    for _ in 0..n {
        let start = Instant::now();
        let res = req().send().await.unwrap();
        statuses.push(res.status().as_u16());
        res.bytes().await.unwrap();
        slowest = slowest.max(start.elapsed());
    }
    (statuses, slowest)
}

/// `passed` 200s followed by `rejected` 429s.
fn pass_then_429(passed: usize, rejected: usize) -> Vec<u16> {
    let mut v = vec![200; passed];
    v.extend(std::iter::repeat_n(429, rejected));
    v
}

async fn assert_forbidden(res: reqwest::Response, case: &str) {
    assert_eq!(res.status(), 403, "{case}");
    assert!(res.headers().get("retry-after").is_none(), "{case}");
    assert_eq!(res.text().await.unwrap(), FORBIDDEN, "{case}");
}

#[tokio::test]
async fn oversized_api_keys_are_403_and_cost_nothing() {
    let base = api_key_server().await;
    let c = client();

    let at_max = "k".repeat(DEFAULT_MAX_KEY_LEN);
    let over_max = "k".repeat(DEFAULT_MAX_KEY_LEN + 1);
    let huge = "k".repeat(64 * 1024);
    let huge_prefix_of_a_key = format!("{at_max}{}", "k".repeat(64 * 1024));
    for (case, key) in [
        ("one byte over the maximum", &over_max),
        ("64 KiB", &huge),
        ("64 KiB starting with a valid key", &huge_prefix_of_a_key),
    ] {
        let start = Instant::now();
        let res = c.get(&base).header("x-api-key", key).send().await.unwrap();
        assert_forbidden(res, case).await;
        assert!(start.elapsed() < BOUNDED, "{case}: {:?}", start.elapsed());
    }

    // A key of exactly the maximum is a key like any other, with its own
    // budget: the rejected ones above, its prefixes or extensions, took none.
    let (statuses, _) = send(BURST as usize + 1, || {
        c.get(&base).header("x-api-key", &at_max)
    })
    .await;
    assert_eq!(statuses, pass_then_429(BURST as usize, 1));
}

#[tokio::test]
async fn a_header_section_past_the_server_limit_is_431_and_the_server_lives() {
    let base = api_key_server().await;
    let c = client();

    // Past hyper's default buffer (about 400 KiB): refused before any
    // handler or layer runs.
    let res = c
        .get(&base)
        .header("x-api-key", "k".repeat(1024 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 431);

    let (statuses, _) = send(2, || c.get(&base).header("x-api-key", "after")).await;
    assert_eq!(statuses, [200, 200]);
}

#[tokio::test]
async fn oversized_bearer_tokens_are_403() {
    let base = bearer_server().await;
    let c = client();

    for (case, value) in [
        (
            "one byte over the maximum",
            format!("Bearer {}", "t".repeat(DEFAULT_MAX_KEY_LEN + 1)),
        ),
        ("64 KiB", format!("Bearer {}", "t".repeat(64 * 1024))),
        (
            "64 KiB of spaces, no token",
            format!("Bearer{}", " ".repeat(64 * 1024)),
        ),
    ] {
        let res = c
            .get(&base)
            .header("authorization", value)
            .send()
            .await
            .unwrap();
        assert_forbidden(res, case).await;
    }
    let at_max = format!("Bearer {}", "t".repeat(DEFAULT_MAX_KEY_LEN));
    let (statuses, _) = send(1, || c.get(&base).header("authorization", &at_max)).await;
    assert_eq!(statuses, [200]);

    // Any run of spaces separates the scheme from the token: 64 KiB of them
    // are read once, and the token is the key.
    let spaced = format!("Bearer{}t", " ".repeat(64 * 1024));
    let (statuses, slowest) = send(BURST as usize, || {
        c.get(&base).header("authorization", &spaced)
    })
    .await;
    assert_eq!(statuses, pass_then_429(BURST as usize, 0));
    assert!(slowest < BOUNDED, "{slowest:?}");
    // They used the budget of `t`.
    let (statuses, _) = send(1, || c.get(&base).header("authorization", "Bearer t")).await;
    assert_eq!(statuses, [429]);
}

#[tokio::test]
async fn keys_that_are_not_utf8_are_403() {
    let api_key = api_key_server().await;
    let bearer = bearer_server().await;
    let c = client();

    let cases: [(&str, &[u8]); 5] = [
        ("lone continuation byte", b"key\x80"),
        ("truncated sequence", b"\xc3"),
        ("overlong encoding", b"\xc0\xaf"),
        ("surrogate half", b"\xed\xa0\x80"),
        ("Latin-1", b"cl\xe9"),
    ];
    for (case, bytes) in cases {
        let value = HeaderValue::from_bytes(bytes).unwrap();
        let res = c
            .get(&api_key)
            .header("x-api-key", value)
            .send()
            .await
            .unwrap();
        assert_forbidden(res, case).await;

        let value = HeaderValue::from_bytes(&[b"Bearer ", bytes].concat()).unwrap();
        let res = c
            .get(&bearer)
            .header("authorization", value)
            .send()
            .await
            .unwrap();
        assert_forbidden(res, case).await;
    }

    // The same bytes as valid UTF-8 are still no key: keys are visible ASCII.
    let res = c
        .get(&api_key)
        .header("x-api-key", "clé")
        .send()
        .await
        .unwrap();
    assert_forbidden(res, "UTF-8 outside ASCII").await;
}

/// `n` comma-separated entries, `entry(i)` from the left.
fn list(n: usize, entry: impl Fn(usize) -> String) -> String {
    (0..n).map(entry).collect::<Vec<_>>().join(", ")
}

#[tokio::test]
async fn ten_thousand_forwarded_for_entries_are_answered_in_bounded_time() {
    let base = ip_server(ForwardedHeader::XForwardedFor).await;
    let c = client();

    // 10,000 client-written entries, then the client the proxy saw.
    let spoofed = list(10_000, |i| format!("198.51.{}.{}", i / 256 % 256, i % 256));
    let header = format!("{spoofed}, 203.0.113.7");
    assert!(header.len() > 100_000);
    let (statuses, slowest) = send(BURST as usize + 1, || {
        c.get(&base).header("x-forwarded-for", &header)
    })
    .await;
    assert_eq!(statuses, pass_then_429(BURST as usize, 1));
    assert!(slowest < BOUNDED, "{slowest:?}");
    // The client is the rightmost untrusted entry, not one the client wrote.
    let (statuses, _) = send(1, || c.get(&base).header("x-forwarded-for", "203.0.113.7")).await;
    assert_eq!(statuses, [429]);
    let (statuses, _) = send(1, || c.get(&base).header("x-forwarded-for", "198.51.0.0")).await;
    assert_eq!(statuses, [200]);

    // 10,000 trusted hops: only the rightmost 32 are examined; the walk
    // stops at the last one, wherever the list ends.
    let hops = list(10_000, |i| format!("10.{}.{}.1", i / 256 % 256, i % 256));
    let (statuses, slowest) = send(1, || c.get(&base).header("x-forwarded-for", &hops)).await;
    assert_eq!(statuses, [200]);
    assert!(slowest < BOUNDED, "{slowest:?}");

    // 10,000 entries spread over 50 header lines, garbage and empty ones
    // among them.
    let (statuses, slowest) = send(1, || {
        (0..50).fold(c.get(&base), |req, line| {
            req.header(
                "x-forwarded-for",
                list(200, |i| match i % 3 {
                    0 => String::new(),
                    1 => format!("garbage-{line}-{i}"),
                    _ => format!("[2001:db8::{i:x}]:{line}"),
                }),
            )
        })
    })
    .await;
    assert_eq!(statuses, [200]);
    assert!(slowest < BOUNDED, "{slowest:?}");
}

#[tokio::test]
async fn ten_thousand_forwarded_elements_and_runs_of_escapes_are_answered_in_bounded_time() {
    let base = ip_server(ForwardedHeader::Forwarded).await;
    let c = client();

    let elements = list(10_000, |i| format!("for=\"[2001:db8::{i:x}]:1\""));
    // Within hyper's limit on the header section (about 400 KiB).
    assert!((200_000..400_000).contains(&elements.len()));
    let header = format!("{elements}, for=203.0.113.8");
    let (statuses, slowest) = send(BURST as usize + 1, || {
        c.get(&base).header("forwarded", &header)
    })
    .await;
    assert_eq!(statuses, pass_then_429(BURST as usize, 1));
    assert!(slowest < BOUNDED, "{slowest:?}");
    let (statuses, _) = send(1, || c.get(&base).header("forwarded", "for=203.0.113.8")).await;
    assert_eq!(statuses, [429]);

    // Quoted strings full of escaped quotes and commas: splitting from the
    // right must not rescan them for every quote.
    for value in [
        format!("for=\"{}\", for=203.0.113.9", "\\\"".repeat(50_000)),
        format!("for=\"{}\"", "\\\\\\\",".repeat(25_000)),
        "\"".repeat(100_000),
        "\\".repeat(100_000) + "\"",
    ] {
        let (statuses, slowest) = send(1, || c.get(&base).header("forwarded", &value)).await;
        assert_eq!(statuses, [200], "{}", &value[..40]);
        assert!(slowest < BOUNDED, "{slowest:?}");
    }
}

/// A million distinct keys a second against a store capped at `MAX_KEYS`:
/// every one is decided without a panic, memory stays within the table the
/// cap sizes, and keys already tracked keep their state (none is evicted to
/// make room, which would hand it a fresh burst).
#[test]
fn a_flood_of_distinct_keys_stays_within_the_store_cap() {
    const MAX_KEYS: usize = 10_000;
    // About 4 s in a debug build, a fraction of that in release.
    let keys: u64 = 1_000_000;
    let clock = ManualClock::new();
    let store = MemoryStore::builder()
        .max_keys(MAX_KEYS)
        .clock(clock.clone())
        .build()
        .unwrap();
    let slots = (2 * MAX_KEYS).next_power_of_two();
    assert_eq!(store.capacity(), slots);
    let bound = slots * 16;
    // A key is live for 2 s after one request: none goes idle during the flood.
    let plan = UsagePlan::new("p").throttle(Throttle::new(0.5, 3).unwrap());
    let layer = RateLimitLayer::builder(Policy::per_key(plan).unwrap())
        .store(store.clone())
        .build();

    let first = b"first-key";
    assert!(layer.check(first, 1).is_ok());

    let start = Instant::now();
    let (mut allowed, mut refused) = (0u64, 0u64);
    for i in 0..keys {
        // A million keys a second of the store's time.
        clock.advance(Duration::from_micros(1));
        match layer.check(&i.to_le_bytes(), 1) {
            Ok(()) => allowed += 1,
            Err(r) => {
                assert_eq!(r.reason(), Reason::KeyCapacity, "key {i}");
                assert!(r.retry_after().is_some_and(|d| d <= Duration::from_secs(2)));
                refused += 1;
            }
        }
        if i % 65_536 == 0 {
            assert!(store.allocated_bytes() <= bound, "key {i}");
            assert!(store.tracked_keys() <= slots, "key {i}");
        }
    }
    let elapsed = start.elapsed();

    assert_eq!(allowed + refused, keys);
    assert!(store.allocated_bytes() <= bound);
    let tracked = store.tracked_keys();
    assert!(tracked <= slots);
    // The cap admits at least the keys it is sized for, then refuses.
    assert!(allowed >= MAX_KEYS as u64, "{allowed}");
    assert!(refused >= keys - slots as u64, "{refused}");
    // The first key was charged once and kept: 2 more pass, then it is limited.
    let after: Vec<bool> = (0..3).map(|_| layer.check(first, 1).is_ok()).collect();
    assert_eq!(after, [true, true, false]);
    // Bounded time too: a few microseconds per key in debug, with room for
    // a loaded machine.
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
}
