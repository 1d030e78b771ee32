//! Floods of distinct clients against a memory store with a small cap,
//! through a real server on loopback and a real client, on the manual
//! clock: what is answered at the cap, and that places held by clients
//! gone idle are taken by new ones, day after day.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use tollgate::{ManualClock, MemoryStore, Period, Policy, Quota, RateLimitLayer, UsagePlan};

use crate::support::{at, client, ok, serve};

/// Quota counters the store keeps for subjects nobody registered.
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
