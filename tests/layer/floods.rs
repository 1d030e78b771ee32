//! Floods of distinct clients against a memory store with a small cap,
//! through a real server on loopback and a real client, on the manual
//! clock: places held by clients gone idle are taken by new ones, day
//! after day, and a charge settled while the table is full is not lost.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use tokio::sync::oneshot;
use tokio_stream::wrappers::ReceiverStream;
use tollgate::{
    ManualClock, MemoryStore, Period, Policy, Quota, RateLimitLayer, TokenBudget, UsagePlan,
};

use crate::support::{at, client, ok, serve};

/// The store's cap: 64 quota counters, and the table's fewest slots (256).
const MAX_KEYS: usize = 64;

/// Each day a flood of new keys fills every place the cap leaves for
/// their daily quotas; the next day, when every window has ended, new keys
/// take those places again, and a key past the cap is told to come back
/// when they go idle (at midnight), never later. This failed from the
/// second day: the store had noted, when it freed the places, that no
/// counter left would ever go idle, and refused every new key from then on
/// with a wait of centuries.
#[tokio::test]
async fn places_of_idle_quota_counters_are_taken_day_after_day() {
    let clock = ManualClock::new();
    clock.set_wall(at(2026, 3, 2, 3_600));
    let store = MemoryStore::builder()
        .max_keys(MAX_KEYS)
        .clock(clock.clone())
        .build()
        .unwrap();
    let plan = UsagePlan::new("per-key").quota(Quota::new(100, Period::Day).unwrap());
    let layer = RateLimitLayer::builder(Policy::per_key(plan).unwrap())
        .store(store.clone())
        .build();
    let base = serve(Router::new().route("/", get(ok)).layer(layer)).await;
    let c = client();

    for day in 0..4 {
        for i in 0..MAX_KEYS {
            let res = c
                .get(&base)
                .header("x-api-key", format!("day{day}-key{i}"))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200, "day {day}, key {i}");
        }
        assert_eq!(store.quota_counters(), MAX_KEYS, "day {day}");
        let res = c
            .get(&base)
            .header("x-api-key", format!("day{day}-one-more"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 429, "day {day}");
        // 23 hours to midnight.
        let retry: u64 = res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=23 * 3_600).contains(&retry), "day {day}: {retry}");
        clock.advance(Duration::from_secs(86_400));
    }
}

/// A response that ends when `release` fires, having used the tokens its
/// request's `x-actual` header names.
async fn held(
    gate: Arc<Mutex<Option<oneshot::Receiver<()>>>>,
    req: axum::extract::Request,
) -> axum::body::Body {
    crate::support::tokens::report_usage(&req);
    let release = gate.lock().unwrap().take();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(1);
    tokio::spawn(async move {
        if let Some(release) = release {
            let _ = release.await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"done"))).await;
    });
    axum::body::Body::from_stream(ReceiverStream::new(rx))
}

/// A stream that used far more tokens than it reserved ends after its
/// key's slot went idle and was taken by a flood of new keys that holds
/// the table full: the extra tokens are still charged, and the key waits
/// for them as it would have with room in the table. They were lost: the
/// key's next request passed at once.
#[tokio::test]
async fn tokens_settled_when_the_table_is_full_are_still_charged() {
    let clock = ManualClock::new();
    let store = MemoryStore::builder()
        .max_keys(MAX_KEYS)
        .clock(clock.clone())
        .build()
        .unwrap();
    // 600 tokens a minute: 10 a second.
    let plan = UsagePlan::new("tokens").tokens(TokenBudget::new().per_minute(600).unwrap());
    let layer = RateLimitLayer::builder(Policy::per_key(plan).unwrap())
        .estimator(crate::support::tokens::estimate)
        .store(store.clone())
        .build();
    let gate = Arc::new(Mutex::new(None));
    let handler_gate = Arc::clone(&gate);
    let app = Router::new().route("/", get(move |req| held(Arc::clone(&handler_gate), req)));
    let base = serve(app.layer(layer)).await;
    let c = client();
    let request = |key: String, estimate: u32| {
        c.get(&base)
            .header("x-api-key", key)
            .header("x-estimate", estimate.to_string())
    };

    // Estimated at 10 tokens, it will have used 2,000: 199 s of refill more
    // than the minute the bucket holds.
    let (release, waiting) = oneshot::channel();
    *gate.lock().unwrap() = Some(waiting);
    let stream = request("streamer".into(), 10)
        .header("x-actual", "2000")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    // Its reservation has refilled: its slot is idle, free for a new key.
    clock.advance(Duration::from_secs(10));
    let mut flood = 0;
    while store.tracked_keys() < store.capacity() {
        for _ in 0..64 {
            let res = request(format!("flood-{flood}"), 10).send().await.unwrap();
            assert!([200, 429].contains(&res.status().as_u16()));
            flood += 1;
        }
        assert!(flood < 10_000, "the table never filled");
    }
    release.send(()).unwrap();
    assert_eq!(stream.bytes().await.unwrap(), "done");

    // The flood has gone idle; the streamer owes 199 s of tokens.
    clock.advance(Duration::from_secs(2));
    let res = request("streamer".into(), 10).send().await.unwrap();
    assert_eq!(res.status(), 429);
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((130..=140).contains(&retry), "{retry}");
}

/// A flood of anonymous clients (one per address, behind a trusted proxy)
/// fills every slot the cap leaves them, and is refused past it; a
/// registered key that was idle meanwhile (so it held no slot) is still
/// served, as are a second registered key and the account they share: the
/// flood cannot lock paying clients out. It did: anonymous addresses and
/// registered keys took slots of one table, and the keys were refused with
/// the flood.
#[tokio::test]
async fn an_anonymous_flood_that_fills_the_table_does_not_lock_registered_keys_out() {
    let config = tollgate::config::Config::from_toml(
        r#"
[[plans]]
name = "paid"
throttle = { rate = 1.0, burst = 5 }
concurrency = 4

[[accounts]]
name = "acme"
throttle = { rate = 1.0, burst = 50 }

[[keys]]
id = "one"
value = "paid-key-one"
plan = "paid"
account = "acme"

[[keys]]
id = "two"
value = "paid-key-two"
plan = "paid"

[stage]
throttle = { rate = 1.0, burst = 100000 }

[anonymous]
mode = "ip"
throttle = { rate = 0.001, burst = 5 }
trusted_proxies = ["127.0.0.1/32"]
"#,
    )
    .unwrap();
    let clock = ManualClock::new();
    let store = MemoryStore::builder()
        .max_keys(MAX_KEYS)
        .clock(clock.clone())
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(config.policy_with_clock(clock.clone()).unwrap())
        .store(store.clone())
        .build();
    let base = serve(Router::new().route("/", get(ok)).layer(layer)).await;
    let c = client();
    let mut refused = 0;
    for i in 0..2_000u32 {
        let res = c
            .get(&base)
            .header("x-forwarded-for", format!("10.{}.{}.1", i / 256, i % 256))
            .send()
            .await
            .unwrap();
        match res.status().as_u16() {
            200 => {}
            429 => refused += 1,
            s => panic!("anonymous {i}: {s}"),
        }
    }
    assert!(refused > 1_000, "the flood was never refused: {refused}");
    for key in ["paid-key-one", "paid-key-two"] {
        for n in 0..5 {
            let res = c.get(&base).header("x-api-key", key).send().await.unwrap();
            assert_eq!(res.status(), 200, "{key}, request {n}");
        }
        let res = c.get(&base).header("x-api-key", key).send().await.unwrap();
        assert_eq!(res.status(), 429, "{key}: its burst is 5");
    }
    // The flood is still refused: the keys took none of its room.
    let res = c
        .get(&base)
        .header("x-forwarded-for", "192.0.2.1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
}
