//! The `openai` style as OpenAI's clients meet it: `async-openai` against an
//! axum service that answers chat and text completions (streamed too) on a
//! loopback port, each rejection decoding into the client's error type with
//! the right `code` and `type`; then the retry headers, black-box over HTTP
//! on a frozen clock: `retry-after-ms` exact, `x-should-retry: false` where
//! waiting cannot help, and `x-ratelimit-*` that stay put across routes and
//! limits.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::{ApiErrorResponse, OpenAIError};
use async_openai::middleware::ReqwestService;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessage, CreateChatCompletionRequest, CreateChatCompletionRequestArgs,
    FinishReason, Role,
};
use async_openai::types::completions::CreateCompletionRequestArgs;
use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_stream::StreamExt;
use tollgate::extract::BearerOrApiKey;
use tollgate::openai::OpenAiEstimator;
use tollgate::{
    ApiKey, ManualClock, MemoryStore, ModelLimits, Period, Policy, Quota, RateLimitLayer, Throttle,
    TokenBudget, UsagePlan,
};

use crate::support::backend::{Backend, Memory, Redis};
use crate::support::{at, client, frozen_store, header, serve};

const KEY: &str = "sk-test-openai";
const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

/// A policy with the one key [`KEY`] on `plan`.
fn policy(plan: UsagePlan) -> Policy {
    let name = plan.name().to_owned();
    Policy::builder()
        .plan(plan)
        .key(ApiKey::new("k1", KEY, name))
        .build()
        .unwrap()
}

/// A plan that lets through anything these tests send.
fn roomy() -> UsagePlan {
    UsagePlan::new("roomy").throttle(Throttle::new(100.0, 100).unwrap())
}

/// The chunks of a streamed chat answer: the role, the content in pieces,
/// then the finish reason with an empty delta.
const STREAMED: [&str; 3] = ["Hel", "lo, ", "world"];

fn chunk(delta: Value, finish: Option<&str>) -> String {
    let chunk = json!({
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "gpt-test",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    format!("data: {chunk}\n\n")
}

/// `POST /v1/chat/completions`: a chat completion, or with `"stream":true`
/// the same answer as server-sent events, one write per event.
async fn chat(body: Bytes) -> Response {
    let req: Value = serde_json::from_slice(&body).unwrap();
    let model = req["model"].as_str().unwrap_or("gpt-test").to_owned();
    if req["stream"] == json!(true) {
        let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
        events.extend(STREAMED.iter().map(|c| chunk(json!({"content": c}), None)));
        events.push(chunk(json!({}), Some("stop")));
        events.push("data: [DONE]\n\n".to_owned());
        let body = Body::from_stream(tokio_stream::iter(
            events.into_iter().map(Ok::<_, Infallible>),
        ));
        return ([("content-type", "text/event-stream")], body).into_response();
    }
    axum::Json(json!({
        "id": "chatcmpl-2",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "Hello, world"},
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
    }))
    .into_response()
}

/// `POST /v1/completions`: a text completion.
async fn completions(body: Bytes) -> Response {
    let req: Value = serde_json::from_slice(&body).unwrap();
    axum::Json(json!({
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1_700_000_000,
        "model": req["model"],
        "choices": [{"text": " there", "index": 0, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }))
    .into_response()
}

/// The two OpenAI routes behind `layer`, served on a loopback port.
async fn serve_api(layer: RateLimitLayer<BearerOrApiKey>) -> String {
    serve(
        Router::new()
            .route(CHAT, post(chat))
            .route(COMPLETIONS, post(completions))
            .layer(layer),
    )
    .await
}

/// An `async-openai` client of `base` with `key`, sending it as clients do
/// (`Authorization: Bearer`), without the client's own retries: each call
/// is one request, and a 429 comes back as the error it decodes to.
fn openai_client(base: &str, key: &str) -> Client<OpenAIConfig> {
    let config = OpenAIConfig::new()
        .with_api_base(format!("{base}/v1"))
        .with_api_key(key);
    let http = reqwest013::Client::builder().no_proxy().build().unwrap();
    Client::with_config(config).with_http_service(ReqwestService::new(http))
}

fn chat_request(max_tokens: u32) -> CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model("gpt-test")
        .max_tokens(max_tokens)
        .messages([ChatCompletionRequestUserMessage::from("Say hello").into()])
        .build()
        .unwrap()
}

/// The API error a call failed with; panics on success or any other error.
fn api_error<T: std::fmt::Debug>(result: Result<T, OpenAIError>) -> ApiErrorResponse {
    match result {
        Err(OpenAIError::ApiError(e)) => e,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn bearer_keys_pass_and_a_wrong_key_is_invalid_api_key() {
    let base = serve_api(RateLimitLayer::openai(policy(roomy()))).await;

    let ok = openai_client(&base, KEY);
    let answer = ok.chat().create(chat_request(10)).await.unwrap();
    assert_eq!(answer.object, "chat.completion");
    assert_eq!(
        answer.choices[0].message.content.as_deref(),
        Some("Hello, world")
    );
    let text = ok
        .completions()
        .create(
            CreateCompletionRequestArgs::default()
                .model("gpt-test-instruct")
                .prompt("Hi")
                .max_tokens(1u32)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(text.model, "gpt-test-instruct");
    assert_eq!(text.choices[0].text, " there");

    for wrong in ["sk-not-a-key", ""] {
        let e = api_error(
            openai_client(&base, wrong)
                .chat()
                .create(chat_request(10))
                .await,
        );
        assert_eq!(e.status_code, 401, "{wrong:?}");
        assert_eq!(e.api_error.code.as_deref(), Some("invalid_api_key"));
        assert_eq!(e.api_error.r#type.as_deref(), Some("invalid_request_error"));
        assert!(!e.api_error.message.is_empty());
    }
}

#[tokio::test]
async fn a_throttled_call_is_rate_limit_exceeded_of_requests() {
    let (_clock, store) = frozen_store();
    let plan = UsagePlan::new("one").throttle(Throttle::new(1.0, 1).unwrap());
    let layer = RateLimitLayer::builder(policy(plan))
        .store(store)
        .openai()
        .build();
    let base = serve_api(layer).await;
    let c = openai_client(&base, KEY);

    c.chat().create(chat_request(10)).await.unwrap();
    let e = api_error(c.chat().create(chat_request(10)).await);
    assert_eq!(e.status_code, 429);
    assert_eq!(e.api_error.code.as_deref(), Some("rate_limit_exceeded"));
    assert_eq!(e.api_error.r#type.as_deref(), Some("requests"));
    // The throttle is the plan's, across routes.
    let e = api_error(
        c.completions()
            .create(
                CreateCompletionRequestArgs::default()
                    .model("m")
                    .prompt("Hi")
                    .build()
                    .unwrap(),
            )
            .await,
    );
    assert_eq!(e.api_error.code.as_deref(), Some("rate_limit_exceeded"));
}

/// A layer over `plan` that estimates tokens from OpenAI bodies, on a
/// frozen clock.
fn token_layer(plan: UsagePlan) -> RateLimitLayer<BearerOrApiKey> {
    let (_clock, store) = frozen_store();
    RateLimitLayer::builder(policy(plan))
        .store(store)
        .estimator(OpenAiEstimator::new())
        .openai()
        .build()
}

#[tokio::test]
async fn a_token_budget_denial_is_rate_limit_exceeded_of_tokens() {
    // 100 tokens a minute; each call costs ceil(9 / 4) = 3 of prompt + 60.
    let plan = roomy().tokens(TokenBudget::new().per_minute(100).unwrap());
    let base = serve_api(token_layer(plan)).await;
    let c = openai_client(&base, KEY);

    c.chat().create(chat_request(60)).await.unwrap();
    let e = api_error(c.chat().create(chat_request(60)).await);
    assert_eq!(e.status_code, 429);
    assert_eq!(e.api_error.code.as_deref(), Some("rate_limit_exceeded"));
    assert_eq!(e.api_error.r#type.as_deref(), Some("tokens"));
    // What is left still serves a smaller call.
    c.chat().create(chat_request(30)).await.unwrap();

    // A call bigger than the whole budget: the same code and type.
    let e = api_error(c.chat().create(chat_request(1_000)).await);
    assert_eq!(e.api_error.code.as_deref(), Some("rate_limit_exceeded"));
    assert_eq!(e.api_error.r#type.as_deref(), Some("tokens"));
}

#[tokio::test]
async fn a_used_up_quota_is_insufficient_quota() {
    let plan = roomy().quota(Quota::new(2, Period::Day).unwrap());
    let (_clock, store) = frozen_store();
    let layer = RateLimitLayer::builder(policy(plan))
        .store(store)
        .openai()
        .build();
    let base = serve_api(layer).await;
    let c = openai_client(&base, KEY);

    c.chat().create(chat_request(10)).await.unwrap();
    c.chat().create(chat_request(10)).await.unwrap();
    let e = api_error(c.chat().create(chat_request(10)).await);
    assert_eq!(e.status_code, 429);
    assert_eq!(e.api_error.code.as_deref(), Some("insufficient_quota"));
    assert_eq!(e.api_error.r#type.as_deref(), Some("insufficient_quota"));
}

#[tokio::test]
async fn a_token_quota_used_up_is_insufficient_quota_too() {
    let plan = roomy().tokens(TokenBudget::new().per_day(100).unwrap());
    let base = serve_api(token_layer(plan)).await;
    let c = openai_client(&base, KEY);

    c.chat().create(chat_request(60)).await.unwrap();
    let e = api_error(c.chat().create(chat_request(60)).await);
    assert_eq!(e.status_code, 429);
    assert_eq!(e.api_error.code.as_deref(), Some("insufficient_quota"));
    assert_eq!(e.api_error.r#type.as_deref(), Some("insufficient_quota"));
}

#[tokio::test]
async fn a_streamed_chat_passes_through_the_layer_chunk_by_chunk() {
    let plan = roomy()
        .tokens(TokenBudget::new().per_minute(1_000).unwrap())
        .concurrency(1);
    let base = serve_api(token_layer(plan)).await;
    let c = openai_client(&base, KEY);

    for _ in 0..2 {
        let mut stream = c.chat().create_stream(chat_request(50)).await.unwrap();
        let mut chunks = Vec::new();
        while let Some(chunk) = stream.next().await {
            chunks.push(chunk.unwrap());
        }
        // The role, three pieces of content, the finish; `[DONE]` ends it.
        assert_eq!(chunks.len(), 5, "{chunks:?}");
        assert_eq!(chunks[0].choices[0].delta.role, Some(Role::Assistant));
        let text: String = chunks
            .iter()
            .filter_map(|c| c.choices[0].delta.content.as_deref())
            .collect();
        assert_eq!(text, STREAMED.concat());
        let last = &chunks[4].choices[0];
        assert_eq!(last.finish_reason, Some(FinishReason::Stop));
        assert!(
            chunks[..4]
                .iter()
                .all(|c| c.choices[0].finish_reason.is_none())
        );
        assert!(chunks.iter().all(|c| c.object == "chat.completion.chunk"));
    }
    // The concurrency place was given back when each stream ended, and the
    // token budget was charged for both (2 × (3 + 50) of 1000).
    let answer = c.chat().create(chat_request(10)).await.unwrap();
    assert_eq!(answer.choices.len(), 1);
}

// Black-box over HTTP, on a frozen clock.

/// An `openai` layer over `plan` on the store of `clock`, with OpenAI
/// bodies' estimates for token budgets.
fn frozen(plan: UsagePlan, clock: &ManualClock) -> tollgate::RateLimitLayerBuilder<BearerOrApiKey> {
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    RateLimitLayer::builder(policy(plan))
        .store(store)
        .estimator(OpenAiEstimator::new())
        .openai()
}

async fn call(c: &reqwest::Client, base: &str, route: &str, max_tokens: u32) -> reqwest::Response {
    c.post(format!("{base}{route}"))
        .bearer_auth(KEY)
        .json(&json!({"model": "gpt-test", "prompt": "Hi", "max_tokens": max_tokens}))
        .send()
        .await
        .unwrap()
}

fn ms(res: &reqwest::Response) -> u64 {
    header(res, "retry-after-ms").parse().unwrap()
}

fn secs(res: &reqwest::Response) -> u64 {
    header(res, "retry-after").parse().unwrap()
}

/// The IETF `RateLimit` value's `t`.
fn ietf_t(res: &reqwest::Response) -> u64 {
    let v = header(res, "ratelimit");
    let t = v.rsplit(";t=").next().unwrap();
    t.parse()
        .unwrap_or_else(|_| panic!("no t in ratelimit: {v}"))
}

async fn error_of(res: reqwest::Response) -> (String, String) {
    let body: Value = res.json().await.unwrap();
    let e = &body["error"];
    (
        e["type"].as_str().unwrap().to_owned(),
        e["code"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn retry_after_ms_is_the_exact_time_to_capacity() {
    let clock = ManualClock::new();
    let plan = UsagePlan::new("two").throttle(Throttle::new(2.0, 1).unwrap());
    let base = serve_api(frozen(plan, &clock).build()).await;
    let c = client();

    assert_eq!(call(&c, &base, COMPLETIONS, 1).await.status(), 200);
    let res = call(&c, &base, COMPLETIONS, 1).await;
    assert_eq!(res.status(), 429);
    assert_eq!(ms(&res), 500);
    assert_eq!(secs(&res), 1);
    assert_eq!(ietf_t(&res), 1);
    assert_eq!(header(&res, "x-ratelimit-reset-requests"), "500ms");
    assert_eq!(header(&res, "x-ratelimit-remaining-requests"), "0");
    // An ordinary throttle is worth waiting for.
    assert!(res.headers().get("x-should-retry").is_none());
    assert_eq!(
        error_of(res).await,
        ("requests".into(), "rate_limit_exceeded".into())
    );

    clock.advance(Duration::from_millis(200));
    let res = call(&c, &base, COMPLETIONS, 1).await;
    assert_eq!(res.status(), 429);
    assert_eq!(ms(&res), 300);
    assert_eq!(secs(&res), 1);
    assert_eq!(header(&res, "x-ratelimit-reset-requests"), "300ms");

    // Exactly then, and not a millisecond before, it passes.
    clock.advance(Duration::from_millis(299));
    let res = call(&c, &base, COMPLETIONS, 1).await;
    assert_eq!(res.status(), 429);
    assert_eq!(ms(&res), 1);
    clock.advance(Duration::from_millis(1));
    assert_eq!(call(&c, &base, COMPLETIONS, 1).await.status(), 200);
}

#[tokio::test]
async fn retry_after_rounds_the_milliseconds_up_to_seconds() {
    // One request every 2.5 s.
    let clock = ManualClock::new();
    let plan = UsagePlan::new("slow").throttle(Throttle::new(0.4, 1).unwrap());
    let base = serve_api(frozen(plan, &clock).build()).await;
    let c = client();

    assert_eq!(call(&c, &base, CHAT, 1).await.status(), 200);
    let res = call(&c, &base, CHAT, 1).await;
    assert_eq!(res.status(), 429);
    assert_eq!(ms(&res), 2_500);
    assert_eq!(secs(&res), 3);
    assert_eq!(ietf_t(&res), 3);
    assert_eq!(header(&res, "x-ratelimit-reset-requests"), "2.5s");
    clock.advance(Duration::from_millis(1_600));
    let res = call(&c, &base, CHAT, 1).await;
    assert_eq!(ms(&res), 900);
    assert_eq!(secs(&res), 1);
}

#[tokio::test]
async fn a_cost_that_can_never_fit_says_do_not_retry() {
    let clock = ManualClock::new();
    let plan = roomy().tokens(TokenBudget::new().per_minute(100).unwrap());
    let base = serve_api(frozen(plan, &clock).build()).await;
    let c = client();

    // 1 + 1000 tokens of a budget of 100: never.
    let res = call(&c, &base, COMPLETIONS, 1_000).await;
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "x-should-retry"), "false");
    assert!(res.headers().contains_key("retry-after-ms"));
    assert_eq!(
        error_of(res).await,
        ("tokens".into(), "rate_limit_exceeded".into())
    );

    // A budget merely used up for now is worth the wait: 1 + 60, twice.
    assert_eq!(call(&c, &base, COMPLETIONS, 60).await.status(), 200);
    let res = call(&c, &base, COMPLETIONS, 60).await;
    assert_eq!(res.status(), 429);
    assert!(res.headers().get("x-should-retry").is_none());
    assert_eq!(header(&res, "x-ratelimit-limit-tokens"), "100");
    assert_eq!(header(&res, "x-ratelimit-remaining-tokens"), "0");
    // 61 - 39 = 22 tokens short, at 100 a minute: 13.2 s.
    assert_eq!(ms(&res), 13_200);
    assert_eq!(secs(&res), 14);
    assert_eq!(ietf_t(&res), 14);
}

#[tokio::test]
async fn a_day_quota_used_up_early_says_do_not_retry() {
    let clock = ManualClock::new();
    // One hour into a UTC day: the quota renews in 23 h.
    clock.set_wall(at(2025, 3, 10, 3_600));
    let plan = roomy().quota(Quota::new(1, Period::Day).unwrap());
    let base = serve_api(frozen(plan, &clock).build()).await;
    let c = client();

    assert_eq!(call(&c, &base, CHAT, 1).await.status(), 200);
    let res = call(&c, &base, CHAT, 1).await;
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "x-should-retry"), "false");
    assert_eq!(ms(&res), 23 * 3_600 * 1_000);
    assert_eq!(secs(&res), 23 * 3_600);
    assert_eq!(ietf_t(&res), 23 * 3_600);
    assert_eq!(
        error_of(res).await,
        ("insufficient_quota".into(), "insufficient_quota".into())
    );

    // 30 s before midnight the renewal is within the 60 s bound.
    clock.set_wall(at(2025, 3, 10, 86_400 - 30));
    let res = call(&c, &base, CHAT, 1).await;
    assert_eq!(res.status(), 429);
    assert!(res.headers().get("x-should-retry").is_none());
    assert_eq!(ms(&res), 30_000);
    assert_eq!(secs(&res), 30);
}

#[tokio::test]
async fn max_retry_bounds_the_wait_worth_retrying() {
    // One request every 10 s.
    let plan = || UsagePlan::new("ten").throttle(Throttle::new(0.1, 1).unwrap());
    let clock = ManualClock::new();
    let base = serve_api(
        frozen(plan(), &clock)
            .max_retry(Duration::from_secs(5))
            .build(),
    )
    .await;
    let c = client();

    assert_eq!(call(&c, &base, CHAT, 1).await.status(), 200);
    let res = call(&c, &base, CHAT, 1).await;
    assert_eq!(res.status(), 429);
    assert_eq!(ms(&res), 10_000);
    assert_eq!(header(&res, "x-should-retry"), "false");
    // 4 s away: within the bound.
    clock.advance(Duration::from_secs(6));
    let res = call(&c, &base, CHAT, 1).await;
    assert_eq!(ms(&res), 4_000);
    assert!(res.headers().get("x-should-retry").is_none());

    // The default bound, 60 s, lets a 10 s wait be retried.
    let clock = ManualClock::new();
    let base = serve_api(frozen(plan(), &clock).build()).await;
    assert_eq!(call(&c, &base, CHAT, 1).await.status(), 200);
    let res = call(&c, &base, CHAT, 1).await;
    assert_eq!(ms(&res), 10_000);
    assert!(res.headers().get("x-should-retry").is_none());
}

#[tokio::test]
async fn the_request_limit_reported_is_the_same_on_every_route() {
    // Chat has its own, tighter throttle; the plan's defines the family.
    let clock = ManualClock::new();
    let plan = UsagePlan::new("routes")
        .throttle(Throttle::new(5.0, 5).unwrap())
        .method(format!("{CHAT}/POST"), Throttle::new(1.0, 2).unwrap());
    let base = serve_api(frozen(plan, &clock).build()).await;
    let c = client();

    let mut seen = Vec::new();
    for route in [COMPLETIONS, CHAT, CHAT, COMPLETIONS, CHAT] {
        let res = call(&c, &base, route, 1).await;
        seen.push((
            route,
            res.status().as_u16(),
            header(&res, "x-ratelimit-limit-requests").to_owned(),
        ));
    }
    // The third chat call is denied by chat's own throttle, and still
    // reports the plan's.
    let want: Vec<_> = [
        (COMPLETIONS, 200),
        (CHAT, 200),
        (CHAT, 200),
        (COMPLETIONS, 200),
        (CHAT, 429),
    ]
    .into_iter()
    .map(|(r, s)| (r, s, "5".to_owned()))
    .collect();
    assert_eq!(seen, want);
}

#[tokio::test]
async fn the_request_limit_reported_stays_when_a_quota_is_tighter() {
    let clock = ManualClock::new();
    let plan = UsagePlan::new("quota")
        .throttle(Throttle::new(5.0, 5).unwrap())
        .quota(Quota::new(3, Period::Day).unwrap());
    let base = serve_api(frozen(plan, &clock).build()).await;
    let c = client();

    let mut seen = Vec::new();
    for _ in 0..4 {
        let res = call(&c, &base, CHAT, 1).await;
        seen.push((
            res.status().as_u16(),
            header(&res, "x-ratelimit-limit-requests").to_owned(),
        ));
    }
    let want: Vec<_> = [200, 200, 200, 429]
        .into_iter()
        .map(|s| (s, "5".to_owned()))
        .collect();
    assert_eq!(seen, want);
}

#[tokio::test]
async fn a_quota_with_an_offset_reports_the_same_limit_when_it_denies() {
    // A plan of a quota alone, created today with an offset: today's window
    // holds 7 requests, and its denial reports the 7 its answers did.
    let clock = ManualClock::new();
    let plan = UsagePlan::new("offset")
        .quota(Quota::new(10, Period::Day).unwrap().with_offset(3).unwrap());
    let policy = Policy::builder()
        .clock(clock.clone())
        .plan(plan)
        .key(ApiKey::new("k1", KEY, "offset"))
        .build()
        .unwrap();
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    let layer = RateLimitLayer::builder(policy)
        .store(store)
        .estimator(OpenAiEstimator::new())
        .openai()
        .build();
    let base = serve_api(layer).await;
    let c = client();

    let mut seen = Vec::new();
    for _ in 0..8 {
        let res = call(&c, &base, CHAT, 1).await;
        seen.push((
            res.status().as_u16(),
            header(&res, "x-ratelimit-limit-requests").to_owned(),
        ));
    }
    let want: Vec<_> = [200; 7]
        .into_iter()
        .chain([429])
        .map(|s| (s, "7".to_owned()))
        .collect();
    assert_eq!(seen, want);
}

/// `plan` served on a chat route whose handler answers only once released:
/// the base URL, and the handler's "entered" and "release" signals.
async fn held_api(plan: UsagePlan, clock: &ManualClock) -> (String, Arc<Notify>, Arc<Notify>) {
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let (e, r) = (Arc::clone(&entered), Arc::clone(&release));
    let slow = post(move |_: Bytes| {
        let (e, r) = (Arc::clone(&e), Arc::clone(&r));
        async move {
            e.notify_one();
            r.notified().await;
            "done"
        }
    });
    let base = serve(
        Router::new()
            .route(CHAT, slow)
            .layer(frozen(plan, clock).build()),
    )
    .await;
    (base, entered, release)
}

/// A first chat call, held in its handler: its status once released.
async fn hold_one(
    c: &reqwest::Client,
    base: &str,
    entered: &Notify,
) -> tokio::task::JoinHandle<reqwest::StatusCode> {
    let first = tokio::spawn({
        let (c, base) = (c.clone(), base.to_owned());
        async move { call(&c, &base, CHAT, 1).await.status() }
    });
    entered.notified().await;
    first
}

#[tokio::test]
async fn a_concurrency_429_carries_request_headers_and_agreeing_retry() {
    let clock = ManualClock::new();
    let (base, entered, release) = held_api(roomy().concurrency(1), &clock).await;
    let c = client();

    let first = hold_one(&c, &base, &entered).await;

    let res = call(&c, &base, CHAT, 1).await;
    assert_eq!(res.status(), 429);
    // The family's defining limit, the plan's throttle, and nothing left.
    assert_eq!(header(&res, "x-ratelimit-limit-requests"), "100");
    assert_eq!(header(&res, "x-ratelimit-remaining-requests"), "0");
    assert!(res.headers().contains_key("x-ratelimit-reset-requests"));
    assert!(header(&res, "ratelimit").starts_with("\"concurrency\";r=0;t="));
    assert_eq!(ietf_t(&res), secs(&res));
    assert_eq!(secs(&res), ms(&res).div_ceil(1_000));
    assert_eq!(
        error_of(res).await,
        ("requests".into(), "rate_limit_exceeded".into())
    );

    release.notify_one();
    assert_eq!(first.await.unwrap(), 200);
    // The place is free again.
    let again = hold_one(&c, &base, &entered).await;
    release.notify_one();
    assert_eq!(again.await.unwrap(), 200);
}

#[tokio::test]
async fn a_concurrency_429_reports_the_limit_a_route_or_model_defines() {
    // Plans whose requests family is defined by the route's override, or
    // by the model's own throttle: a concurrency rejection reports the
    // same limit as the response allowed before it, not the cap.
    let plans = [
        UsagePlan::new("route").method(format!("{CHAT}/POST"), Throttle::new(1.0, 10).unwrap()),
        UsagePlan::new("model").model(
            "gpt-test",
            ModelLimits::new().throttle(Throttle::new(1.0, 7).unwrap()),
        ),
    ];
    for (plan, want) in plans.into_iter().zip(["10", "7"]) {
        let clock = ManualClock::new();
        let (base, entered, release) = held_api(plan.concurrency(1), &clock).await;
        let c = client();
        let first = hold_one(&c, &base, &entered).await;
        let res = call(&c, &base, CHAT, 1).await;
        assert_eq!(res.status(), 429);
        assert!(header(&res, "ratelimit").starts_with("\"concurrency\";r=0;t="));
        assert_eq!(header(&res, "x-ratelimit-limit-requests"), want);
        release.notify_one();
        assert_eq!(first.await.unwrap(), 200);
        let allowed = tokio::spawn({
            let (c, base) = (c.clone(), base.clone());
            async move { call(&c, &base, CHAT, 1).await }
        });
        entered.notified().await;
        release.notify_one();
        let res = allowed.await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(header(&res, "x-ratelimit-limit-requests"), want);
    }
}

#[tokio::test]
async fn a_stream_holds_its_concurrency_place_until_its_last_event() {
    let plan = roomy()
        .tokens(TokenBudget::new().per_minute(1_000).unwrap())
        .concurrency(1);
    // The stream's events come when the test sends them.
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(8);
    let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
    let held = post(move |_: Bytes| {
        let rx = rx.lock().unwrap().take().expect("one stream");
        async move {
            let events = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Infallible>);
            (
                [("content-type", "text/event-stream")],
                Body::from_stream(events),
            )
        }
    });
    let base = serve(
        Router::new()
            .route(CHAT, held)
            .route(COMPLETIONS, post(completions))
            .layer(token_layer(plan)),
    )
    .await;
    let c = openai_client(&base, KEY);
    let text = || {
        CreateCompletionRequestArgs::default()
            .model("m")
            .prompt("Hi")
            .max_tokens(1u32)
            .build()
            .unwrap()
    };

    let mut stream = c.chat().create_stream(chat_request(10)).await.unwrap();
    tx.send(chunk(json!({"role": "assistant", "content": "Hi"}), None))
        .await
        .unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.choices[0].delta.content.as_deref(), Some("Hi"));

    // Mid-stream the key's one place is taken.
    let e = api_error(c.completions().create(text()).await);
    assert_eq!(e.status_code, 429);
    assert_eq!(e.api_error.code.as_deref(), Some("rate_limit_exceeded"));
    assert_eq!(e.api_error.r#type.as_deref(), Some("requests"));

    tx.send(chunk(json!({}), Some("stop"))).await.unwrap();
    tx.send("data: [DONE]\n\n".to_owned()).await.unwrap();
    drop(tx);
    let last = stream.next().await.unwrap().unwrap();
    assert_eq!(last.choices[0].finish_reason, Some(FinishReason::Stop));
    assert!(stream.next().await.is_none());

    // The place comes back once the body has ended.
    let mut passed = false;
    for _ in 0..50 {
        match c.completions().create(text()).await {
            Ok(_) => {
                passed = true;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    assert!(passed, "the place was never given back");
}

#[tokio::test]
async fn bearer_and_x_api_key_agree_or_are_refused() {
    let base = serve_api(RateLimitLayer::openai(policy(roomy()))).await;
    let c = client();
    let url = format!("{base}{COMPLETIONS}");
    let body = json!({"model": "m", "prompt": "Hi", "max_tokens": 1});

    let send = |bearer: Option<&str>, x: Option<&str>| {
        let mut req = c.post(&url).json(&body);
        if let Some(k) = bearer {
            req = req.bearer_auth(k);
        }
        if let Some(k) = x {
            req = req.header("x-api-key", k);
        }
        req.send()
    };
    assert_eq!(send(None, Some(KEY)).await.unwrap().status(), 200);
    assert_eq!(send(Some(KEY), Some(KEY)).await.unwrap().status(), 200);
    for (bearer, x) in [
        (Some(KEY), Some("sk-other")),
        (Some("sk-other"), Some(KEY)),
        (None, None),
    ] {
        let res = send(bearer, x).await.unwrap();
        assert_eq!(res.status(), 401, "{bearer:?} {x:?}");
        assert_eq!(
            error_of(res).await,
            ("invalid_request_error".into(), "invalid_api_key".into())
        );
    }
}

/// A bearer token separated from its scheme by a tab (or spaces and tabs)
/// is still a bearer credential: many servers split `Authorization` on any
/// whitespace and would serve the request as that key. Taken as another
/// scheme, it let a caller be limited as anonymous (by its address) or
/// under its `x-api-key` while the service behind authenticated the token.
#[tokio::test]
async fn a_bearer_token_after_a_tab_is_the_callers_key() {
    let policy = Policy::builder()
        .plan(UsagePlan::new("small").throttle(Throttle::new(1.0, 2).unwrap()))
        .key(ApiKey::new("k1", KEY, "small"))
        .key(ApiKey::new("k2", "sk-other", "small"))
        .anonymous(tollgate::Anonymous::ByIp {
            throttle: Throttle::new(100.0, 100).unwrap(),
            client_ip: tollgate::extract::ClientIp::new(),
        })
        .build()
        .unwrap();
    let (_clock, store) = frozen_store();
    let base = serve_api(
        RateLimitLayer::builder(policy)
            .openai()
            .store(store)
            .build(),
    )
    .await;
    let c = client();
    let url = format!("{base}{COMPLETIONS}");
    let body = json!({"model": "m", "prompt": "Hi", "max_tokens": 1});
    let send = |auth: String, x: Option<&str>| {
        let mut req = c.post(&url).json(&body).header("authorization", auth);
        if let Some(k) = x {
            req = req.header("x-api-key", k);
        }
        req.send()
    };

    // Limited as the key: its burst of 2, whatever the separator.
    let mut got = Vec::new();
    for sep in ["\t", " \t", "\t "] {
        got.push(
            send(format!("Bearer{sep}{KEY}"), None)
                .await
                .unwrap()
                .status(),
        );
    }
    assert_eq!(got, [200, 200, 429]);
    // Beside a different `x-api-key`: two keys, refused.
    let res = send(format!("Bearer\t{KEY}"), Some("sk-other"))
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        error_of(res).await,
        ("invalid_request_error".into(), "invalid_api_key".into())
    );
    // `x-api-key` alone still has its whole budget: nothing was charged to it.
    for _ in 0..2 {
        let res = c.post(&url).json(&body).header("x-api-key", "sk-other");
        assert_eq!(res.send().await.unwrap().status(), 200);
    }
}

/// A 401 carries a `WWW-Authenticate` challenge, as RFC 9110 requires of
/// every 401: `Bearer` for a request without a key, and RFC 6750's error
/// codes for a key that is there but unusable. (The AWS style's 403 and a
/// gRPC call's trailers-only answer carry none.)
#[tokio::test]
async fn a_401_carries_a_bearer_challenge() {
    let base = serve_api(RateLimitLayer::openai(policy(roomy()))).await;
    let c = client();
    let url = format!("{base}{COMPLETIONS}");
    let body = json!({"model": "m", "prompt": "Hi", "max_tokens": 1});

    /// A case's name, its headers and the challenge it is answered with.
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 6] = [
        ("no key", &[], "Bearer"),
        (
            "another scheme",
            &[("authorization", "Basic dXNlcg==")],
            "Bearer",
        ),
        (
            "unknown key",
            &[("authorization", "Bearer sk-not-a-key")],
            r#"Bearer error="invalid_token""#,
        ),
        (
            "empty key",
            &[("x-api-key", "")],
            r#"Bearer error="invalid_token""#,
        ),
        (
            "repeated header",
            &[("x-api-key", KEY), ("x-api-key", KEY)],
            r#"Bearer error="invalid_token""#,
        ),
        (
            "two different keys",
            &[("authorization", "Bearer sk-other"), ("x-api-key", KEY)],
            r#"Bearer error="invalid_request""#,
        ),
    ];
    for (case, headers, challenge) in cases {
        let mut req = c.post(&url).json(&body);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 401, "{case}");
        assert_eq!(header(&res, "www-authenticate"), challenge, "{case}");
        assert_eq!(
            error_of(res).await,
            ("invalid_request_error".into(), "invalid_api_key".into()),
            "{case}"
        );
    }

    // A key that passes gets no challenge, nor does the AWS style's 403.
    let res = c
        .post(&url)
        .json(&body)
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("www-authenticate").is_none());
    let aws = serve(
        Router::new()
            .route(COMPLETIONS, post(completions))
            .layer(RateLimitLayer::new(policy(roomy()))),
    )
    .await;
    let res = c
        .post(format!("{aws}{COMPLETIONS}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert!(res.headers().get("www-authenticate").is_none());
}

/// How a 429's retry headers must agree, whatever limit denied and in
/// either style: `retry-after` (whole seconds, rounded up) and
/// `retry-after-ms` (exact) are there and never 0, the IETF `t` and the
/// legacy `x-ratelimit-reset` say the seconds, OpenAI's reset the same
/// wait, and `x-should-retry: false` is there exactly when the request can
/// never pass or its wait is past 60 s.
fn assert_retry_agrees(res: &reqwest::Response, never: bool, case: &str) {
    assert_eq!(res.status(), 429, "{case}: {:?}", res.headers());
    let (secs, ms) = (secs(res), ms(res));
    assert!(secs >= 1 && ms >= 1, "{case}: retry-after {secs}, ms {ms}");
    assert_eq!(secs, ms.div_ceil(1_000), "{case}");
    assert_eq!(ietf_t(res), secs, "{case}: {}", header(res, "ratelimit"));
    assert!(header(res, "ratelimit").contains(";r=0;"), "{case}");
    assert_eq!(header(res, "x-ratelimit-reset"), secs.to_string(), "{case}");
    let family = ["requests", "tokens"]
        .into_iter()
        .find(|f| {
            res.headers()
                .contains_key(format!("x-ratelimit-reset-{f}").as_str())
        })
        .unwrap_or_else(|| panic!("{case}: no OpenAI reset in {:?}", res.headers()));
    assert_ne!(
        header(res, &format!("x-ratelimit-reset-{family}")),
        "0s",
        "{case}"
    );
    let should_retry = res.headers().get("x-should-retry");
    match never || ms > 60_000 {
        true => assert_eq!(should_retry.unwrap(), "false", "{case}"),
        false => assert!(should_retry.is_none(), "{case}"),
    }
}

/// Every kind of limit that can deny a request with a wait, and a cost too
/// large for it, full or in debt, in both styles: the retry headers agree
/// (see [`assert_retry_agrees`]).
#[tokio::test]
async fn every_429_carries_agreeing_retry_headers_in_every_style() {
    use tollgate::{Account, HeaderStyle, ResponseStyle, Stage};

    let once = || Throttle::new(1.0, 1).unwrap();
    let per_minute = || TokenBudget::new().per_minute(100).unwrap();
    let per_day = || TokenBudget::new().per_day(100).unwrap();
    let per_month = || TokenBudget::new().per_month(100).unwrap();
    let day = || Quota::new(1, Period::Day).unwrap();
    // (case, plan, account, stage, cost of the calls that fill the limit,
    // and a cost that never fits it, if one exists).
    type Case = (
        &'static str,
        UsagePlan,
        Option<Account>,
        Option<Stage>,
        u32,
        Option<u32>,
    );
    let cases: Vec<Case> = vec![
        (
            "throttle",
            roomy_plan().throttle(once()),
            None,
            None,
            1,
            None,
        ),
        ("quota", roomy().quota(day()), None, None, 1, None),
        (
            "tokens-minute",
            roomy().tokens(per_minute()),
            None,
            None,
            60,
            Some(1_000),
        ),
        (
            "tokens-day",
            roomy().tokens(per_day()),
            None,
            None,
            60,
            Some(1_000),
        ),
        (
            "tokens-month",
            roomy().tokens(per_month()),
            None,
            None,
            60,
            Some(1_000),
        ),
        (
            "method",
            roomy().method(format!("{COMPLETIONS}/POST"), once()),
            None,
            None,
            1,
            None,
        ),
        (
            "model throttle",
            roomy().model("gpt-test", ModelLimits::new().throttle(once())),
            None,
            None,
            1,
            None,
        ),
        (
            "model tokens",
            roomy().model("gpt-test", ModelLimits::new().tokens(per_minute())),
            None,
            None,
            60,
            Some(1_000),
        ),
        (
            "model quota",
            roomy().model("gpt-test", ModelLimits::new().quota(day())),
            None,
            None,
            1,
            None,
        ),
        (
            "stage",
            roomy(),
            None,
            Some(Stage::new().throttle(once())),
            1,
            None,
        ),
        (
            "stage method",
            roomy(),
            None,
            Some(Stage::new().method(format!("{COMPLETIONS}/POST"), once())),
            1,
            None,
        ),
        (
            "account throttle",
            roomy(),
            Some(Account::new("a").throttle(once())),
            None,
            1,
            None,
        ),
        (
            "account quota",
            roomy(),
            Some(Account::new("a").quota(day())),
            None,
            1,
            None,
        ),
        (
            "account tokens",
            roomy(),
            Some(Account::new("a").tokens(per_minute())),
            None,
            60,
            Some(1_000),
        ),
    ];
    let c = client();
    for style in [ResponseStyle::Aws, ResponseStyle::OpenAi] {
        for (name, plan, account, stage, fill, too_big) in &cases {
            let case = format!("{name} ({})", style.name());
            let clock = ManualClock::new();
            // Noon: a day's window renews in 12 h, a month's later.
            clock.set_wall(at(2025, 3, 10, 43_200));
            let mut policy = Policy::builder().plan(plan.clone());
            let mut key = ApiKey::new("k1", KEY, plan.name());
            if let Some(account) = account {
                policy = policy.account(account.clone());
                key = key.account("a");
            }
            if let Some(stage) = stage {
                policy = policy.stage(stage.clone());
            }
            let policy = policy.clock(clock.clone()).key(key).build().unwrap();
            let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
            let layer = RateLimitLayer::builder(policy)
                .store(store)
                .estimator(OpenAiEstimator::new())
                .openai()
                .style(style)
                .headers(HeaderStyle::ietf().x_ratelimit(true).openai(true))
                .build();
            let base = serve_api(layer).await;

            // A cost that never fits a limit still untouched.
            if let Some(big) = too_big {
                let res = call(&c, &base, COMPLETIONS, *big).await;
                assert_retry_agrees(&res, true, &format!("{case}, too big for a full limit"));
            }
            assert_eq!(
                call(&c, &base, COMPLETIONS, *fill).await.status(),
                200,
                "{case}"
            );
            let res = call(&c, &base, COMPLETIONS, *fill).await;
            assert_retry_agrees(&res, false, &case);
            // A cost that never fits a limit used up.
            if let Some(big) = too_big {
                let res = call(&c, &base, COMPLETIONS, *big).await;
                assert_retry_agrees(&res, true, &format!("{case}, too big for a used limit"));
            }
        }
    }
}

/// A plan that lets through anything these tests send, with no throttle of
/// its own (so that the one a case adds is the plan's).
fn roomy_plan() -> UsagePlan {
    UsagePlan::new("roomy")
}

/// `async-openai`'s own retry layer sleeps for `retry-after` before it
/// tries again: a throttled call passes on its retry, and a cost that never
/// fits a budget still full is retried only after a real wait (a
/// `retry-after: 0` would send every retry at once), then fails with the
/// same error.
#[tokio::test]
async fn async_openai_retries_wait_for_retry_after() {
    use async_openai::middleware::retry::OpenAIRetryLayer;
    use std::time::Instant;

    fn retrying_client(base: &str) -> Client<OpenAIConfig> {
        let config = OpenAIConfig::new()
            .with_api_base(format!("{base}/v1"))
            .with_api_key(KEY);
        let http = reqwest013::Client::builder().no_proxy().build().unwrap();
        let service = tower::ServiceBuilder::new()
            .layer(OpenAIRetryLayer::new(1))
            .service(ReqwestService::new(http));
        Client::with_config(config).with_http_service(service)
    }

    // One call a second, on the real clock: the second passes on its retry.
    let plan = UsagePlan::new("slow").throttle(Throttle::new(1.0, 1).unwrap());
    let layer = RateLimitLayer::builder(policy(plan)).openai().build();
    let c = retrying_client(&serve_api(layer).await);
    c.chat().create(chat_request(1)).await.unwrap();
    let started = Instant::now();
    c.chat().create(chat_request(1)).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );

    // 3 + 1000 tokens of a budget of 100 that nothing has used.
    let plan = roomy().tokens(TokenBudget::new().per_minute(100).unwrap());
    let c = retrying_client(&serve_api(token_layer(plan)).await);
    let started = Instant::now();
    let e = api_error(c.chat().create(chat_request(1_000)).await);
    let waited = started.elapsed();
    assert_eq!(e.status_code, 429);
    assert_eq!(e.api_error.code.as_deref(), Some("rate_limit_exceeded"));
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}");
}

/// The limits a request can be decided against, each named as the IETF
/// headers name it; [`every_limit`] makes the one named here the tight one.
const EVERY_LIMIT: [&str; 20] = [
    "stage",
    "stage-method",
    "account",
    "account-tokens-minute",
    "throttle",
    "method",
    "tokens-minute",
    "model",
    "model-tokens-minute",
    "account-quota",
    "account-tokens-day",
    "account-tokens-month",
    "quota",
    "tokens-day",
    "tokens-month",
    "model-quota",
    "model-tokens-day",
    "model-tokens-month",
    "concurrency",
    "model-concurrency",
];

/// A policy whose one key ([`KEY`], of account `acme`) is decided against
/// every kind of limit at once on the completions route: the stage's (and
/// its override of the route), the account's, the plan's (a quota with an
/// offset, the route's override, a token budget, a concurrency cap) and
/// the model `gpt-test`'s. All are roomy but `tight`: a throttle of one
/// request, a quota of one a day, a token budget of 100, a cap of one.
fn every_limit(tight: &str, clock: &ManualClock) -> Policy {
    use tollgate::{Account, Stage};

    let throttle = |name: &str, rate: f64, burst: u32| match name == tight {
        true => Throttle::new(1.0, 1).unwrap(),
        false => Throttle::new(rate, burst).unwrap(),
    };
    let quota = |name: &str, q: Quota| match name == tight {
        true => Quota::new(1, Period::Day).unwrap(),
        false => q,
    };
    let tokens = |prefix: &str| {
        let n = |what: &str, roomy: u64| match format!("{prefix}tokens-{what}") == tight {
            true => 100,
            false => roomy,
        };
        TokenBudget::new()
            .per_minute(n("minute", 100_000) as u32)
            .unwrap()
            .per_day(n("day", 1_000_000))
            .unwrap()
            .per_month(n("month", 10_000_000))
            .unwrap()
    };
    let cap = |name: &str, n: u32| if name == tight { 1 } else { n };
    let route = format!("{COMPLETIONS}/POST");
    let plan = UsagePlan::new("p")
        .throttle(throttle("throttle", 50.0, 100))
        .method(&route, throttle("method", 20.0, 40))
        .quota(quota(
            "quota",
            Quota::new(100_000, Period::Month)
                .unwrap()
                .with_offset(3)
                .unwrap(),
        ))
        .tokens(tokens(""))
        .concurrency(cap("concurrency", 8))
        .model(
            "gpt-test",
            ModelLimits::new()
                .throttle(throttle("model", 10.0, 20))
                .quota(quota(
                    "model-quota",
                    Quota::new(10_000, Period::Day).unwrap(),
                ))
                .tokens(tokens("model-"))
                .concurrency(cap("model-concurrency", 4)),
        );
    let account = Account::new("acme")
        .throttle(throttle("account", 100.0, 200))
        .quota(quota(
            "account-quota",
            Quota::new(500_000, Period::Month).unwrap(),
        ))
        .tokens(tokens("account-"));
    let stage = Stage::new()
        .throttle(throttle("stage", 1_000.0, 2_000))
        .method(&route, throttle("stage-method", 500.0, 1_000));
    Policy::builder()
        .clock(clock.clone())
        .plan(plan)
        .account(account)
        .stage(stage)
        .key(ApiKey::new("k1", KEY, "p").account("acme"))
        .build()
        .unwrap()
}

/// The completions route behind `layer`, whose handler, for a request with
/// an `x-hold` header, tells `entered` and answers only once `release` is
/// told: the base URL.
async fn holding_api(
    layer: RateLimitLayer<BearerOrApiKey, impl tollgate::store::Store>,
    entered: &Arc<Notify>,
    release: &Arc<Notify>,
) -> String {
    let (e, r) = (Arc::clone(entered), Arc::clone(release));
    let handler = post(move |req: axum::extract::Request| {
        let (e, r) = (Arc::clone(&e), Arc::clone(&r));
        async move {
            if req.headers().contains_key("x-hold") {
                e.notify_one();
                r.notified().await;
            }
            "done"
        }
    });
    serve(Router::new().route(COMPLETIONS, handler).layer(layer)).await
}

/// A completion call of `max_tokens` to `base`, held in its handler when
/// `hold`.
async fn completion(
    c: &reqwest::Client,
    base: &str,
    max_tokens: u32,
    hold: bool,
) -> reqwest::Response {
    let mut req = c
        .post(format!("{base}{COMPLETIONS}"))
        .bearer_auth(KEY)
        .json(&json!({"model": "gpt-test", "prompt": "Hi", "max_tokens": max_tokens}));
    if hold {
        req = req.header("x-hold", "1");
    }
    req.send().await.unwrap()
}

/// `RateLimit-Policy` announces the server's policies, which the IETF draft
/// says should stay the same from one response to the next: a 429 lists
/// every limit of the request, in the order and with the sizes an allowed
/// response of the same key and route lists them, whichever limit denied
/// (each kind in turn, and a cost no token budget can ever hold), in both
/// response styles. `RateLimit` names the limit that denied, with nothing
/// left and the wait `Retry-After` says; OpenAI's headers report the same
/// limit of the denied family as the allowed response did.
async fn a_rejection_announces_the_policies_an_allowed_response_does<B: Backend>(b: &B) {
    use tollgate::{HeaderStyle, ResponseStyle};

    let c = client();
    for style in [ResponseStyle::Aws, ResponseStyle::OpenAi] {
        for tight in EVERY_LIMIT {
            let case = format!("{tight} ({})", style.name());
            let clock = ManualClock::new();
            // Noon: a day's window renews in 12 h.
            clock.set_wall(at(2025, 3, 10, 43_200));
            let layer = RateLimitLayer::builder(every_limit(tight, &clock))
                .store(b.store(&clock).await)
                .extractor(BearerOrApiKey::new())
                .estimator(OpenAiEstimator::new())
                .style(style)
                .headers(HeaderStyle::ietf().openai(true))
                .build();
            let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
            let base = holding_api(layer, &entered, &release).await;
            // The first call leaves the tight limit no room for the second:
            // 60 tokens fill a token budget of 100 as one request fills a
            // throttle's burst of 1 or a quota of 1.
            let cost = if tight.contains("tokens") { 59 } else { 1 };

            let allowed = completion(&c, &base, cost, false).await;
            assert_eq!(allowed.status(), 200, "{case}");
            let policy = header(&allowed, "ratelimit-policy").to_owned();
            assert_eq!(
                policy.split(", ").count(),
                EVERY_LIMIT.len(),
                "{case}: {policy}"
            );
            let limits = |res: &reqwest::Response| {
                ["requests", "tokens"].map(|f| {
                    let name = format!("x-ratelimit-limit-{f}");
                    res.headers()
                        .get(&name)
                        .map(|v| v.to_str().unwrap().to_owned())
                })
            };
            let allowed_limits = limits(&allowed);
            drop(allowed);

            let held = tight.ends_with("concurrency").then(|| {
                let (c, base) = (c.clone(), base.clone());
                tokio::spawn(async move { completion(&c, &base, 1, true).await.status() })
            });
            if held.is_some() {
                entered.notified().await;
            }
            let mut denied = vec![(case.clone(), completion(&c, &base, cost, false).await)];
            if tight.contains("tokens") {
                let big = completion(&c, &base, 1_000, false).await;
                denied.push((format!("{case}, a cost that never fits"), big));
            }
            for (case, res) in denied {
                assert_eq!(res.status(), 429, "{case}: {:?}", res.headers());
                assert_eq!(header(&res, "ratelimit-policy"), policy, "{case}");
                let ratelimit = header(&res, "ratelimit");
                assert!(
                    ratelimit.starts_with(&format!("\"{tight}\";r=0;t=")),
                    "{case}: {ratelimit}"
                );
                assert_eq!(ietf_t(&res), secs(&res), "{case}");
                let family = usize::from(tight.contains("tokens"));
                assert_eq!(limits(&res)[family], allowed_limits[family], "{case}");
            }
            if let Some(held) = held {
                release.notify_one();
                assert_eq!(held.await.unwrap(), 200, "{case}");
            }
        }
    }
}

#[tokio::test]
async fn a_rejection_announces_the_policies_an_allowed_response_does_memory() {
    a_rejection_announces_the_policies_an_allowed_response_does(&Memory).await;
}

#[tokio::test]
async fn a_rejection_announces_the_policies_an_allowed_response_does_redis() {
    if !crate::support::redis::require_redis() {
        return;
    }
    let redis = Redis::single("policies");
    a_rejection_announces_the_policies_an_allowed_response_does(&redis).await;
}
