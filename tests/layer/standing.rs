//! `RateLimitLayer::standing` and `standing_by_id`: how a key's limits
//! stand, read without charging anything, on the memory store and on Redis.

use std::time::Duration;

use tollgate::{
    ApiKey, ManualClock, Period, Policy, Quota, RateLimitLayer, Reason, Throttle, TokenBudget,
    UsagePlan,
};

use crate::support::at;
use crate::support::backend::{Backend, Memory, Redis};
use crate::support::redis::require_redis;

fn policy(clock: &ManualClock) -> Policy {
    Policy::builder()
        .clock(clock.clone())
        .plan(
            UsagePlan::new("pro")
                .throttle(Throttle::new(1.0, 5).unwrap())
                .quota(Quota::new(3, Period::Day).unwrap())
                .tokens(TokenBudget::new().per_minute(1_000).unwrap())
                .concurrency(1),
        )
        .key(ApiKey::new("pro-1", "secret", "pro"))
        .key(ApiKey::new("off-1", "off", "pro").enabled(false))
        .build()
        .unwrap()
}

/// (remaining, limit) of the limit named `name`.
fn of(standing: &tollgate::Standing, name: &str) -> (u64, u64) {
    let l = standing
        .limits()
        .iter()
        .find(|l| l.name() == name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", standing.limits()));
    (l.remaining(), l.limit())
}

async fn standing_reads_without_charging<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let layer = RateLimitLayer::builder(policy(&clock))
        .store(b.store(&clock).await)
        .build();
    let fresh = layer.standing(b"secret").await.unwrap();
    assert_eq!(fresh.plan(), "pro");
    assert!(fresh.refused().is_none());
    assert_eq!(of(&fresh, "throttle"), (5, 5));
    assert_eq!(of(&fresh, "quota"), (3, 3));
    assert_eq!(of(&fresh, "tokens-minute"), (1_000, 1_000));
    assert_eq!(of(&fresh, "concurrency"), (1, 1));
    let quota = fresh.limits().iter().find(|l| l.name() == "quota").unwrap();
    assert_eq!(quota.window(), Duration::from_secs(86_400));
    assert_eq!(quota.reset(), Duration::from_secs(86_400 - 3_600));
    // Read as often as one likes: nothing is charged.
    for _ in 0..10 {
        let again = layer.standing(b"secret").await.unwrap();
        assert_eq!(of(&again, "throttle"), (5, 5));
        assert_eq!(of(&again, "quota"), (3, 3));
    }
    // `decide` gives back its place under the cap at once; on Redis the
    // removal is sent in the background.
    let decide = || async {
        layer.decide(b"secret", 1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    decide().await;
    decide().await;
    let used = layer.standing(b"secret").await.unwrap();
    assert_eq!(of(&used, "throttle"), (3, 5));
    assert_eq!(of(&used, "quota"), (1, 3));
    // Keys it does not know or that are disabled are refused as a request
    // would be.
    let unknown = layer.standing(b"nobody").await.unwrap_err();
    assert_eq!(unknown.reason(), Reason::UnknownKey);
    let off = layer.standing(b"off").await.unwrap_err();
    assert_eq!(off.reason(), Reason::DisabledKey);
    // By id, as an administrator reads it: the same limits, for a disabled
    // key too, and an id is not a value (nor a value an id).
    let by_id = layer.standing_by_id("pro-1").await.unwrap();
    assert_eq!(by_id.plan(), "pro");
    assert_eq!(of(&by_id, "throttle"), (3, 5));
    assert_eq!(of(&by_id, "quota"), (1, 3));
    let off = layer.standing_by_id("off-1").await.unwrap();
    assert_eq!(of(&off, "quota"), (3, 3));
    for not_an_id in ["secret", "nobody"] {
        let e = layer.standing_by_id(not_an_id).await.unwrap_err();
        assert_eq!(e.reason(), Reason::UnknownKey);
    }
    // The quota used up: what a peek finds still reads.
    decide().await;
    let spent = layer.standing(b"secret").await.unwrap();
    assert_eq!(of(&spent, "quota"), (0, 3));
    assert_eq!(
        of(&layer.standing_by_id("pro-1").await.unwrap(), "quota"),
        (0, 3)
    );
}

#[tokio::test]
async fn standing_on_the_memory_store() {
    standing_reads_without_charging(&Memory).await;
}

#[tokio::test]
async fn standing_on_redis() {
    if !require_redis() {
        return;
    }
    standing_reads_without_charging(&Redis::single("standing")).await;
}

/// A full concurrency cap refuses even a peek: the standing says so and
/// names the cap.
#[tokio::test]
async fn a_full_cap_is_a_refused_standing() {
    use tower::{Service, ServiceExt};
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let layer = RateLimitLayer::builder(policy(&clock)).build();
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service_fn(|_| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("streamed")))
        });
    let req = http::Request::builder()
        .header("x-api-key", "secret")
        .body(String::new())
        .unwrap();
    let held = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(held.status(), 200);
    let standing = layer.standing(b"secret").await.unwrap();
    let refused = standing.refused().expect("the cap is full");
    assert_eq!(refused.reason(), Reason::ConcurrencyLimited);
    assert_eq!(of(&standing, "concurrency"), (0, 1));
    drop(held);
    let free = layer.standing(b"secret").await.unwrap();
    assert!(free.refused().is_none());
    assert_eq!(of(&free, "concurrency"), (1, 1));
}

/// A peek decides nothing: observers (and so the decision metrics) are not
/// told of it, while a decision is.
#[tokio::test]
async fn observers_are_not_told_of_a_peek() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let seen = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&seen);
    let layer = RateLimitLayer::builder(policy(&clock))
        .observer(move |_: &tollgate::observe::DecisionEvent<'_>| {
            counter.fetch_add(1, Ordering::Relaxed);
        })
        .build();
    for _ in 0..5 {
        layer.standing(b"secret").await.unwrap();
        layer.standing_by_id("pro-1").await.unwrap();
    }
    assert!(layer.check(b"secret", 0).is_ok());
    assert_eq!(seen.load(Ordering::Relaxed), 0);
    layer.decide(b"secret", 1).await.unwrap();
    assert_eq!(seen.load(Ordering::Relaxed), 1);
}

/// A request without a key stands as the layer limits it: under the
/// anonymous plan, by its client's address, when the policy has one; else
/// it is refused as the layer refuses it.
#[tokio::test]
async fn a_request_without_a_key_stands_under_the_anonymous_plan() {
    use std::net::SocketAddr;
    use tollgate::Anonymous;
    use tollgate::extract::ClientIp;
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let from = |addr: &str| {
        let mut req = http::Request::new(());
        let peer: SocketAddr = addr.parse().unwrap();
        req.extensions_mut().insert(peer);
        req
    };
    let anonymous = Anonymous::ByIp {
        throttle: Throttle::new(1.0, 3).unwrap(),
        client_ip: ClientIp::new(),
    };
    let with_anonymous = Policy::builder()
        .clock(clock.clone())
        .plan(UsagePlan::new("pro").throttle(Throttle::new(1.0, 5).unwrap()))
        .key(ApiKey::new("pro-1", "secret", "pro"))
        .anonymous(anonymous)
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(with_anonymous)
        .store(Memory.store(&clock).await)
        .build();
    let fresh = layer.standing_of(&from("192.0.2.1:5000")).await.unwrap();
    assert_eq!(fresh.plan(), "anonymous");
    assert_eq!(of(&fresh, "throttle"), (3, 3));
    // A key is still read as its own.
    let mut keyed = from("192.0.2.1:5000");
    keyed
        .headers_mut()
        .insert("x-api-key", http::HeaderValue::from_static("secret"));
    assert_eq!(layer.standing_of(&keyed).await.unwrap().plan(), "pro");
    // Without an address the request cannot be limited: refused, as the
    // layer refuses it.
    let nowhere = layer.standing_of(&http::Request::new(())).await;
    assert!(nowhere.is_err());

    // Without an anonymous plan, refused.
    let layer = RateLimitLayer::builder(policy(&clock)).build();
    let refused = layer
        .standing_of(&from("192.0.2.1:5000"))
        .await
        .unwrap_err();
    assert_eq!(
        refused.reason(),
        Reason::Key(tollgate::extract::KeyError::Missing)
    );
}

/// How one model's limits stand for a key: the model's own entry, found as
/// a request for the model finds it (in any spelling the backend serves it
/// by), or the plan's `"*"` entry it falls under, each named; read without
/// charging anything.
async fn a_models_standing_names_its_entry<B: Backend>(b: &B) {
    use tollgate::ModelLimits;
    use tower::ServiceExt;
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = UsagePlan::new("llm")
        .throttle(Throttle::new(1.0, 50).unwrap())
        .model(
            "big-model",
            ModelLimits::new()
                .throttle(Throttle::new(0.001, 2).unwrap())
                .tokens(TokenBudget::new().per_minute(500).unwrap())
                .concurrency(1),
        )
        .model(
            "*",
            ModelLimits::new().tokens(TokenBudget::new().per_minute(4_000).unwrap()),
        );
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(plan)
        .plan(UsagePlan::new("plain").throttle(Throttle::new(1.0, 5).unwrap()))
        .key(ApiKey::new("llm-1", "secret", "llm"))
        .key(ApiKey::new("plain-1", "plain", "plain"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy)
        .store(b.store(&clock).await)
        .model(|r| r.headers.get("x-model")?.to_str().ok())
        .build();
    let keyed = |key: &'static str| {
        http::Request::builder()
            .header("x-api-key", key)
            .body(())
            .unwrap()
    };
    let req = keyed("secret");
    // Without a model: the "*" entry's limits, named.
    let any = layer.standing_of(&req).await.unwrap();
    assert_eq!(any.model(), Some("*"));
    assert_eq!(of(&any, "model-tokens-minute"), (4_000, 4_000));
    for spelling in ["big-model", "Big-Model", "big-model:latest"] {
        let big = layer.standing_of_model(&req, spelling).await.unwrap();
        assert_eq!(big.plan(), "llm");
        assert_eq!(big.model(), Some("big-model"), "{spelling}");
        assert_eq!(of(&big, "throttle"), (50, 50));
        assert_eq!(of(&big, "model"), (2, 2));
        assert_eq!(of(&big, "model-tokens-minute"), (500, 500));
        assert_eq!(of(&big, "model-concurrency"), (1, 1));
    }
    let other = layer.standing_of_model(&req, "other").await.unwrap();
    assert_eq!(other.model(), Some("*"));
    assert_eq!(of(&other, "model-tokens-minute"), (4_000, 4_000));
    assert!(other.limits().iter().all(|l| l.name() != "model"));
    // A request for the model is charged; reading is not.
    let svc = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service_fn(|_| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
        });
    let call = http::Request::builder()
        .header("x-api-key", "secret")
        .header("x-model", "big-model")
        .body(String::new())
        .unwrap();
    let res = svc.oneshot(call).await.unwrap();
    assert_eq!(res.status(), 200);
    drop(res);
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..5 {
        let big = layer.standing_of_model(&req, "BIG-MODEL").await.unwrap();
        assert_eq!(of(&big, "model"), (1, 2));
        assert_eq!(of(&big, "throttle"), (49, 50));
        assert_eq!(of(&big, "model-concurrency"), (1, 1));
    }
    // A plan without model limits has no entry to show.
    let plain = layer
        .standing_of_model(&keyed("plain"), "big-model")
        .await
        .unwrap();
    assert_eq!(plain.model(), None);
    assert_eq!(of(&plain, "throttle"), (5, 5));
    // A key the layer does not know is refused, whatever the model.
    let e = layer
        .standing_of_model(&keyed("nobody"), "big-model")
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Reason::UnknownKey);
}

#[tokio::test]
async fn a_models_standing_on_the_memory_store() {
    a_models_standing_names_its_entry(&Memory).await;
}

#[tokio::test]
async fn a_models_standing_on_redis() {
    if !require_redis() {
        return;
    }
    a_models_standing_names_its_entry(&Redis::single("model-standing")).await;
}

/// How the method override `method` of kind `name` stands: (remaining, limit).
fn method_of(standing: &tollgate::Standing, name: &str, method: &str) -> (u64, u64) {
    let found: Vec<_> = standing
        .methods()
        .iter()
        .filter(|m| m.limit().name() == name && m.method() == method)
        .collect();
    assert_eq!(found.len(), 1, "{name} {method}: {:?}", standing.methods());
    (found[0].limit().remaining(), found[0].limit().limit())
}

/// A standing lists every method override of the key's stage and plan,
/// each read alone at cost 0 as the requests its routes match count it (a
/// stage's for every caller, a plan's per key): on every store alike, on
/// a Redis Cluster (where the stage lives in its own slot) and under a
/// plan whose Redis limits are lent to the instance in shares.
async fn a_standing_lists_method_overrides<B: Backend>(b: &B) {
    use tollgate::Stage;
    use tower::ServiceExt;
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let chat = "/v1/chat/completions/POST";
    let slow = |burst| Throttle::new(0.001, burst).unwrap();
    let policy = Policy::builder()
        .clock(clock.clone())
        .stage(Stage::new().throttle(slow(100)).method(chat, slow(10)))
        .plan(
            UsagePlan::new("staged")
                .throttle(slow(50))
                .method(chat, slow(4))
                .method("/*/*", slow(20)),
        )
        .key(ApiKey::new("s-1", "staged", "staged"))
        .build()
        .unwrap();
    let store = b.store(&clock).await;
    let layer = RateLimitLayer::builder(policy).store(store.clone()).build();
    // A second policy without a stage, on the same store: its plan's limits
    // may be lent in shares on Redis.
    let lent = Policy::builder()
        .clock(clock.clone())
        .plan(
            UsagePlan::new("lent")
                .throttle(slow(50))
                .method(chat, slow(4)),
        )
        .key(ApiKey::new("l-1", "lent", "lent"))
        .build()
        .unwrap();
    let lent = RateLimitLayer::builder(lent).store(store.clone()).build();
    let fresh = layer.standing(b"staged").await.unwrap();
    assert_eq!(method_of(&fresh, "stage-method", chat), (10, 10));
    assert_eq!(method_of(&fresh, "method", chat), (4, 4));
    assert_eq!(method_of(&fresh, "method", "/*/*"), (20, 20));
    let names: Vec<_> = fresh.methods().iter().map(|m| m.limit().name()).collect();
    assert_eq!(names, ["stage-method", "method", "method"]);
    // No override is among the route-less limits.
    assert!(fresh.limits().iter().all(|l| !l.name().contains("method")));
    let call = |layer: &RateLimitLayer<_, B::S>, key: &'static str, path: &'static str| {
        let svc = tower::ServiceBuilder::new()
            .layer(layer.clone())
            .service_fn(|_| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
            });
        let req = http::Request::post(path)
            .header("x-api-key", key)
            .body(String::new())
            .unwrap();
        async move { svc.oneshot(req).await.unwrap().status().as_u16() }
    };
    for path in ["/v1/chat/completions", "/v1/chat/completions", "/v1/models"] {
        assert_eq!(call(&layer, "staged", path).await, 200, "{path}");
    }
    for _ in 0..3 {
        assert_eq!(call(&lent, "lent", "/v1/chat/completions").await, 200);
    }
    for _ in 0..3 {
        let used = layer.standing(b"staged").await.unwrap();
        assert_eq!(method_of(&used, "stage-method", chat), (8, 10));
        assert_eq!(method_of(&used, "method", chat), (2, 4));
        assert_eq!(method_of(&used, "method", "/*/*"), (19, 20));
        assert_eq!(of(&used, "stage"), (97, 100));
        assert_eq!(of(&used, "throttle"), (47, 50));
        let by_id = layer.standing_by_id("s-1").await.unwrap();
        assert_eq!(method_of(&by_id, "method", chat), (2, 4));
        let lent = lent.standing(b"lent").await.unwrap();
        assert_eq!(method_of(&lent, "method", chat), (1, 4));
        assert_eq!(of(&lent, "throttle"), (47, 50));
    }
    // Past the override, the route is refused; the standing reads it empty
    // and is refused by nothing.
    for _ in 0..2 {
        assert_eq!(call(&layer, "staged", "/v1/chat/completions").await, 200);
    }
    assert_eq!(call(&layer, "staged", "/v1/chat/completions").await, 429);
    // On a cluster the stage's slot, charged first, is refunded in the
    // background when the plan denies.
    b.drain(&store).await;
    let empty = layer.standing(b"staged").await.unwrap();
    assert!(empty.refused().is_none());
    assert_eq!(method_of(&empty, "method", chat), (0, 4));
    assert_eq!(method_of(&empty, "stage-method", chat), (6, 10));
    // A key refused shows nothing.
    let e = layer.standing(b"nobody").await.unwrap_err();
    assert_eq!(e.reason(), Reason::UnknownKey);
}

#[tokio::test]
async fn method_overrides_stand_on_the_memory_store() {
    a_standing_lists_method_overrides(&Memory).await;
}

#[tokio::test]
async fn method_overrides_stand_on_redis() {
    if !require_redis() {
        return;
    }
    a_standing_lists_method_overrides(&Redis::single("method-standing")).await;
}

#[tokio::test]
async fn method_overrides_stand_on_a_redis_cluster() {
    if !require_redis() {
        return;
    }
    a_standing_lists_method_overrides(&Redis::cluster("method-standing-cluster")).await;
}
