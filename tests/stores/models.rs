//! Limits per model on every store: a plan's limits for one model name (or
//! its `"*"` entry) are counted per (plan, key, model) and decided with the
//! plan's own in one decision, so a denial by either charges the other
//! nothing; a model's token budget is settled as the plan's is. On a Redis
//! Cluster a model's state lives in its key's slot. And the `[plans.models]`
//! table of a config file, with its errors.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tollgate::{
    ApiKey, Date, ManualClock, ModelLimits, Period, Policy, Quota, RateLimitLayer, ResponseBody,
    Throttle, TokenBudget, UsagePlan,
};

use crate::support::at;
use crate::support::backend::{Backend, Memory, Redis, on_each_backend};
use crate::support::redis::require_redis;
use crate::support::tokens;

type Response = http::Response<ResponseBody<Full<Bytes>>>;

/// A layer on `plan` with keys `a` (value `va`) and `b` (`vb`), whose
/// model is the `x-model` header and whose estimate is `x-estimate`, in
/// front of a service that reports `x-actual` as the tokens used.
async fn service<B: Backend>(
    b: &B,
    clock: &ManualClock,
    plan: UsagePlan,
) -> impl tower::Service<http::Request<String>, Response = Response, Error = Infallible> + Clone {
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(plan)
        .key(ApiKey::new("a", "va", "p"))
        .key(ApiKey::new("b", "vb", "p"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy)
        .store(b.store(clock).await)
        .estimator(tokens::estimate)
        .model(|r| r.headers.get("x-model")?.to_str().ok())
        .build();
    tower::ServiceBuilder::new()
        .layer(layer)
        .service_fn(tokens::report_actual)
}

/// Sends a request of `key` for `model` (none without it), estimated at
/// `estimate` tokens and using `actual`, and reads its body to the end
/// (which settles it); the status and the denying limit's name, if any.
async fn send<S>(
    svc: &mut S,
    key: &str,
    model: Option<&str>,
    estimate: u32,
    actual: Option<u64>,
) -> (u16, Option<String>)
where
    S: tower::Service<http::Request<String>, Response = Response, Error = Infallible>,
{
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let mut req = tokens::request(key, estimate, actual);
    if let Some(m) = model {
        req.headers_mut().insert("x-model", m.parse().unwrap());
    }
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    let status = res.status().as_u16();
    let limit = res
        .extensions()
        .get::<tollgate::Rejection>()
        .and_then(|r| r.limit())
        .map(str::to_owned);
    let _ = res.into_body().collect().await.unwrap();
    (status, limit)
}

/// One request of `key` for `model` that reserves no tokens.
async fn call<S>(svc: &mut S, key: &str, model: Option<&str>) -> (u16, Option<String>)
where
    S: tower::Service<http::Request<String>, Response = Response, Error = Infallible>,
{
    send(svc, key, model, 0, None).await
}

const OK: (u16, Option<String>) = (200, None);

fn denied(limit: &str) -> (u16, Option<String>) {
    (429, Some(limit.to_owned()))
}

/// Lets settlements and refunds sent in the background land.
async fn settled() {
    tokio::time::sleep(Duration::from_millis(150)).await;
}

async fn a_model_throttle_limits_one_model_while_another_passes<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(100.0, 100).unwrap())
        .model(
            "big",
            ModelLimits::new().throttle(Throttle::new(1.0, 2).unwrap()),
        );
    let mut svc = service(b, &clock, plan).await;
    assert_eq!(call(&mut svc, "va", Some("big")).await, OK);
    assert_eq!(call(&mut svc, "va", Some("big")).await, OK);
    assert_eq!(call(&mut svc, "va", Some("big")).await, denied("model"));
    // A model the plan does not name, with no "*" entry, and a request of
    // no model: the plan's limits alone.
    for _ in 0..5 {
        assert_eq!(call(&mut svc, "va", Some("small")).await, OK);
        assert_eq!(call(&mut svc, "va", None).await, OK);
    }
    // Counted per key: b has the model's whole bucket.
    assert_eq!(call(&mut svc, "vb", Some("big")).await, OK);
    assert_eq!(call(&mut svc, "vb", Some("big")).await, OK);
    assert_eq!(call(&mut svc, "vb", Some("big")).await, denied("model"));
    // A second later, one more for a.
    clock.advance(Duration::from_secs(1));
    assert_eq!(call(&mut svc, "va", Some("big")).await, OK);
    assert_eq!(call(&mut svc, "va", Some("big")).await, denied("model"));
}

async fn the_star_entry_holds_every_model_the_plan_does_not_name<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(100.0, 100).unwrap())
        .model(
            "big",
            ModelLimits::new().throttle(Throttle::new(1.0, 1).unwrap()),
        )
        .model(
            "*",
            ModelLimits::new().throttle(Throttle::new(1.0, 3).unwrap()),
        );
    let mut svc = service(b, &clock, plan).await;
    // One bucket for all of them, however many names a client makes up,
    // and for a request that names no model.
    assert_eq!(call(&mut svc, "va", Some("x")).await, OK);
    assert_eq!(call(&mut svc, "va", Some("y")).await, OK);
    assert_eq!(call(&mut svc, "va", None).await, OK);
    assert_eq!(call(&mut svc, "va", Some("z")).await, denied("model"));
    assert_eq!(call(&mut svc, "va", None).await, denied("model"));
    // A model the plan names has its own limits, not the "*" entry's.
    assert_eq!(call(&mut svc, "va", Some("big")).await, OK);
    assert_eq!(call(&mut svc, "va", Some("big")).await, denied("model"));
}

async fn a_denial_by_the_model_charges_the_plan_nothing_and_back<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(1.0, 1).unwrap())
        .model(
            "big",
            ModelLimits::new().quota(Quota::new(2, Period::Day).unwrap()),
        );
    let mut svc = service(b, &clock, plan).await;
    assert_eq!(call(&mut svc, "va", Some("big")).await, OK);
    // The plan's bucket is empty: its denial takes nothing of the model's
    // quota, which has one left a second later.
    assert_eq!(call(&mut svc, "va", Some("big")).await, denied("throttle"));
    settled().await;
    clock.advance(Duration::from_secs(1));
    assert_eq!(call(&mut svc, "va", Some("big")).await, OK);
    // The model's quota is used up: its denial takes nothing of the plan's
    // bucket, which another model finds full.
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        call(&mut svc, "va", Some("big")).await,
        denied("model-quota")
    );
    settled().await;
    assert_eq!(call(&mut svc, "va", Some("small")).await, OK);
    assert_eq!(
        call(&mut svc, "va", Some("small")).await,
        denied("throttle")
    );
}

/// A request the model's quota denies gives the plan's quota back exactly
/// what it took, also when UpdateUsage raised what remains past the limit:
/// the denials leave the raise as it was (held at zero, they would take it).
async fn a_denial_by_the_model_leaves_a_raised_plan_quota_as_it_was<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = UsagePlan::new("p")
        .quota(Quota::new(2, Period::Day).unwrap())
        .model(
            "*",
            ModelLimits::new().quota(Quota::new(1, Period::Day).unwrap()),
        );
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(plan)
        .key(ApiKey::new("a", "va", "p"))
        .build()
        .unwrap();
    let l = RateLimitLayer::builder(policy)
        .store(b.store(&clock).await)
        .build();
    let admin = l.admin();
    assert_eq!(admin.set_remaining("a", 5).await.unwrap(), 5);
    assert!(l.decide(b"va", 1).await.is_ok());
    for _ in 0..3 {
        let r = l.decide(b"va", 1).await.unwrap_err();
        assert_eq!(r.limit(), Some("model-quota"));
        settled().await;
    }
    let day = Date::new(2024, 5, 6).unwrap();
    let usage = admin.usage("p", day, day, Some("a")).await.unwrap();
    assert_eq!(usage.items["a"], [[1, 4]]);
}

async fn a_model_token_budget_settles<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 3_600));
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(100.0, 100).unwrap())
        .model(
            "big",
            ModelLimits::new().tokens(TokenBudget::new().per_day(100).unwrap()),
        )
        .model(
            "*",
            ModelLimits::new().tokens(TokenBudget::new().per_minute(100).unwrap()),
        );
    let mut svc = service(b, &clock, plan).await;
    // 60 reserved, 10 used: 50 come back to the model's day.
    assert_eq!(send(&mut svc, "va", Some("big"), 60, Some(10)).await, OK);
    settled().await;
    assert_eq!(send(&mut svc, "va", Some("big"), 90, Some(90)).await, OK);
    assert_eq!(
        send(&mut svc, "va", Some("big"), 1, None).await,
        denied("model-tokens-day")
    );
    // An under-estimate is charged: the next day, 10 reserved and 95
    // used leave 5.
    clock.advance(Duration::from_secs(86_400));
    assert_eq!(send(&mut svc, "va", Some("big"), 10, Some(95)).await, OK);
    settled().await;
    assert_eq!(
        send(&mut svc, "va", Some("big"), 6, None).await,
        denied("model-tokens-day")
    );
    assert_eq!(send(&mut svc, "va", Some("big"), 5, None).await, OK);
    // The "*" entry's minute bucket: 100 reserved, 20 used, 80 back.
    assert_eq!(send(&mut svc, "va", Some("x"), 100, Some(20)).await, OK);
    settled().await;
    assert_eq!(send(&mut svc, "va", Some("x"), 80, None).await, OK);
    assert_eq!(
        send(&mut svc, "va", Some("x"), 1, None).await,
        denied("model-tokens-minute")
    );
    // The plan has no token budget of its own: b is not held by a's.
    assert_eq!(send(&mut svc, "vb", Some("x"), 100, None).await, OK);
}

/// A request of `key` for `model` whose response is returned unread: its
/// places under concurrency caps are held until it is dropped.
async fn open<S>(svc: &mut S, key: &str, model: Option<&str>) -> Response
where
    S: tower::Service<http::Request<String>, Response = Response, Error = Infallible>,
{
    use tower::ServiceExt;
    let mut req = tokens::request(key, 0, None);
    if let Some(m) = model {
        req.headers_mut().insert("x-model", m.parse().unwrap());
    }
    svc.ready().await.unwrap().call(req).await.unwrap()
}

/// The status and the denying limit of a response.
fn answer(res: &Response) -> (u16, Option<String>) {
    let limit = res
        .extensions()
        .get::<tollgate::Rejection>()
        .and_then(|r| r.limit())
        .map(str::to_owned);
    (res.status().as_u16(), limit)
}

async fn a_model_concurrency_cap_holds_places_beside_the_plans<B: Backend>(b: &B) {
    let clock = ManualClock::new();
    let plan = UsagePlan::new("p")
        .throttle(Throttle::new(100.0, 100).unwrap())
        .concurrency(3)
        .model("big", ModelLimits::new().concurrency(1));
    let mut svc = service(b, &clock, plan).await;
    let big = open(&mut svc, "va", Some("big")).await;
    assert_eq!(answer(&big), OK);
    let policy = big.headers()["ratelimit-policy"].to_str().unwrap();
    assert!(
        policy.contains("\"concurrency\";q=3;qu=\"concurrent-requests\"")
            && policy.contains("\"model-concurrency\";q=1;qu=\"concurrent-requests\""),
        "{policy}"
    );
    // The model's one place is held: a second request to it is refused,
    // and gives back the plan's place it may have taken.
    for _ in 0..3 {
        let res = open(&mut svc, "va", Some("big")).await;
        assert_eq!(answer(&res), denied("model-concurrency"));
        assert_eq!(res.headers()["retry-after"], "1");
    }
    settled().await;
    // Other models take the plan's two other places, then the plan's cap
    // is full whatever the model.
    let small = open(&mut svc, "va", Some("small")).await;
    assert_eq!(answer(&small), OK);
    let none = open(&mut svc, "va", None).await;
    assert_eq!(answer(&none), OK);
    assert_eq!(
        answer(&open(&mut svc, "va", Some("small")).await),
        denied("concurrency")
    );
    // Counted per key: b has the model's place.
    let b_big = open(&mut svc, "vb", Some("big")).await;
    assert_eq!(answer(&b_big), OK);
    // A body that ends gives back its place under the plan's cap; the one
    // under the model's cap is still held by the first request.
    drop(small);
    settled().await;
    assert_eq!(
        answer(&open(&mut svc, "va", Some("big")).await),
        denied("model-concurrency")
    );
    settled().await;
    let small = open(&mut svc, "va", Some("small")).await;
    assert_eq!(answer(&small), OK);
    // The first request's body ends: both its places come back.
    drop((big, small));
    settled().await;
    let big = open(&mut svc, "va", Some("big")).await;
    assert_eq!(answer(&big), OK);
    let small = open(&mut svc, "va", Some("small")).await;
    assert_eq!(answer(&small), OK);
    assert_eq!(
        answer(&open(&mut svc, "va", Some("x")).await),
        denied("concurrency")
    );
    drop((big, small, none, b_big));
}

on_each_backend!(
    "models":
    a_model_throttle_limits_one_model_while_another_passes,
    the_star_entry_holds_every_model_the_plan_does_not_name,
    a_denial_by_the_model_charges_the_plan_nothing_and_back,
    a_denial_by_the_model_leaves_a_raised_plan_quota_as_it_was,
    a_model_token_budget_settles,
    a_model_concurrency_cap_holds_places_beside_the_plans,
);

/// On a Redis Cluster, where a model's state lives in its key's slot: the
/// same answers.
#[tokio::test]
async fn redis_cluster_agrees_on_models() {
    if !require_redis() {
        return;
    }
    let cluster = Redis::cluster("models");
    a_model_throttle_limits_one_model_while_another_passes(&cluster).await;
    the_star_entry_holds_every_model_the_plan_does_not_name(&cluster).await;
    a_denial_by_the_model_charges_the_plan_nothing_and_back(&cluster).await;
    a_denial_by_the_model_leaves_a_raised_plan_quota_as_it_was(&cluster).await;
    a_model_token_budget_settles(&cluster).await;
    a_model_concurrency_cap_holds_places_beside_the_plans(&cluster).await;
}

/// The observer is told which model entry applied.
#[tokio::test]
async fn the_observer_names_the_model_entry() {
    use std::sync::{Arc, Mutex};
    use tower::ServiceExt;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let plan = UsagePlan::new("p").model(
        "big",
        ModelLimits::new().throttle(Throttle::new(1.0, 5).unwrap()),
    );
    let policy = Policy::builder()
        .plan(plan)
        .key(ApiKey::new("a", "va", "p"))
        .build()
        .unwrap();
    let log = Arc::clone(&seen);
    let layer = RateLimitLayer::builder(policy)
        .model(|r| r.headers.get("x-model")?.to_str().ok())
        .observer(move |e: &tollgate::observe::DecisionEvent<'_>| {
            log.lock().unwrap().push(e.model().map(str::to_owned));
        })
        .build();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service_fn(tokens::report_actual);
    for model in ["big", "small"] {
        let mut req = tokens::request("va", 0, None);
        req.headers_mut().insert("x-model", model.parse().unwrap());
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(*seen.lock().unwrap(), [Some("big".to_owned()), None]);
}

/// A plan's model limits are looked up as a backend reads model names
/// (ASCII case aside, `name:latest` as `name`, `library/name` as `name`),
/// so a plan that names one model twice in two spellings cannot be decided
/// and is refused when built and when put while serving; the plan already
/// in place goes on deciding.
#[tokio::test]
async fn a_plan_naming_one_model_twice_is_refused() {
    let m = ModelLimits::new().throttle(Throttle::new(1.0, 1).unwrap());
    let twice = |a: &str, b: &str| UsagePlan::new("p").model(a, m).model(b, m);
    for (a, b) in [
        ("big", "BIG"),
        ("big", "big:latest"),
        ("Big:Latest", "library/big"),
        ("registry.ollama.ai/library/big", "big"),
    ] {
        let e = Policy::builder().plan(twice(a, b)).build().unwrap_err();
        assert!(
            matches!(&e, tollgate::ConfigError::DuplicateModel { plan, .. } if plan == "p"),
            "{a} {b}: {e:?}"
        );
        let shown = e.to_string();
        assert!(shown.contains(a) && shown.contains(b), "{shown}");
    }
    // Other tags and namespaces name other models.
    Policy::builder()
        .plan(twice("big", "big:7b").model("me/big", m).model("*", m))
        .build()
        .unwrap();
    let policy = Policy::builder()
        .plan(UsagePlan::new("p").model("big", m))
        .key(ApiKey::new("a", "va", "p"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::new(policy);
    let e = layer
        .admin()
        .put_plan(twice("big", "Big"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("Big"), "{e}");
    let plan = layer.admin().plan("p").unwrap();
    assert_eq!(plan.get_models().count(), 1);
}

#[cfg(feature = "config")]
mod config {
    use tollgate::config::Config;
    use tollgate::{ModelLimits, Period, Quota, Throttle, TokenBudget};

    const PLAN: &str = r#"
[[plans]]
name = "pro"
throttle = { rate = 10, burst = 20 }

[plans.models]
"big-model" = { throttle = { rate = 0.5, burst = 2 }, tokens = { per_minute = 10000 } }
"small" = { quota = { limit = 100, period = "DAY" }, concurrency = 3 }
"*" = { tokens = { per_minute = 40000, per_day = 1000000 } }
"#;

    #[test]
    fn models_are_read_from_the_plan() {
        let config = Config::from_toml(PLAN).unwrap();
        let plan = &config.plans()[0];
        let mut models: Vec<_> = plan.get_models().map(|(n, m)| (n.to_owned(), *m)).collect();
        models.sort_by(|a, b| a.0.cmp(&b.0));
        let big = ModelLimits::new()
            .throttle(Throttle::new(0.5, 2).unwrap())
            .tokens(TokenBudget::new().per_minute(10_000).unwrap());
        let small = ModelLimits::new()
            .quota(Quota::new(100, Period::Day).unwrap())
            .concurrency(3);
        let other = ModelLimits::new().tokens(
            TokenBudget::new()
                .per_minute(40_000)
                .unwrap()
                .per_day(1_000_000)
                .unwrap(),
        );
        assert_eq!(
            models,
            [
                ("*".to_owned(), other),
                ("big-model".to_owned(), big),
                ("small".to_owned(), small),
            ]
        );
        config.policy().unwrap();
    }

    #[test]
    fn errors_name_the_line_and_the_field() {
        let cases = [
            (
                PLAN.replace("rate = 0.5", "rate = -1"),
                7,
                "plans[0].models.\"big-model\".throttle.rate",
            ),
            (
                PLAN.replace("per_minute = 10000", "per_minute = 0"),
                7,
                "plans[0].models.\"big-model\".tokens.per_minute",
            ),
            (
                PLAN.replace("limit = 100", "limit = -5"),
                8,
                "plans[0].models.\"small\".quota.limit",
            ),
            (PLAN.replace("\"small\"", "\"\""), 8, "plans[0].models.\"\""),
            (
                PLAN.replace("concurrency = 3", "concurrency = 0"),
                8,
                "plans[0].models.\"small\".concurrency",
            ),
            (
                PLAN.replace("concurrency = 3", "concurrency = 5000000000"),
                8,
                "plans[0].models.\"small\".concurrency",
            ),
            (
                PLAN.replace("quota = {", "qouta = {"),
                8,
                "plans[0].models.\"small\".qouta",
            ),
        ];
        for (src, line, path) in cases {
            let e = Config::from_toml(&src).unwrap_err();
            assert_eq!((e.line(), e.path()), (line, path), "{e}");
        }
    }
}
