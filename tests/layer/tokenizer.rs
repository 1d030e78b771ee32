//! `OpenAiEstimator` with a real tokenizer (feature `tiktoken`) in front of an
//! axum service: a chat is charged its prompt's true tokens plus its maximum,
//! special tokens' spellings and non-ASCII text are ordinary text, and a
//! prompt of a million spaces, on which tiktoken-rs alone panics, is counted
//! and served.

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tollgate::openai::{OpenAiEstimator, Tokenizer};
use tollgate::{ApiKey, Estimate, Policy, RateLimitLayer, TokenBudget, UsagePlan};
use tower::ServiceExt;

const KEY: &str = "tok-key";

/// A router whose handler answers with the tokens the layer estimated,
/// behind a plan of `budget` tokens a minute counted with `estimator`.
fn router(budget: u32, estimator: OpenAiEstimator) -> Router {
    let policy = Policy::builder()
        .plan(UsagePlan::new("llm").tokens(TokenBudget::new().per_minute(budget).unwrap()))
        .key(ApiKey::new("k1", KEY, "llm"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy)
        .estimator(estimator)
        .max_body_bytes(2 << 20)
        .build();
    Router::new()
        .route(
            "/v1/chat/completions",
            post(|req: Request<Body>| async move {
                let e = req.extensions().get::<Estimate>().cloned().unwrap();
                e.tokens.to_string()
            }),
        )
        .layer(layer)
}

/// A chat completion's status and, when served, the tokens estimated.
async fn chat(app: &Router, body: String) -> (StatusCode, Option<u32>) {
    let req = Request::post("/v1/chat/completions")
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let tokens =
        (status == StatusCode::OK).then(|| std::str::from_utf8(&bytes).unwrap().parse().unwrap());
    (status, tokens)
}

fn chat_body(messages: &[(&str, &str)], max_tokens: u32) -> String {
    let messages: Vec<_> = messages
        .iter()
        .map(|(role, content)| serde_json::json!({ "role": role, "content": content }))
        .collect();
    serde_json::json!({ "model": "gpt-4o", "messages": messages, "max_tokens": max_tokens })
        .to_string()
}

#[tokio::test]
async fn a_chat_is_charged_its_prompts_tokens_and_its_maximum() {
    let texts = [
        ("system", "You are terse."),
        ("user", "Write a haiku about rate limits."),
        ("assistant", "Rate limits keep services fair."),
        ("user", "Grüße aus Köln, naïve café"),
    ];
    let body = chat_body(&texts, 40);
    for (tokenizer, prompt) in [
        (Tokenizer::Cl100kBase, 4 + 8 + 6 + 10),
        (Tokenizer::O200kBase, 4 + 8 + 6 + 9),
    ] {
        let counted: u64 = texts.iter().map(|(_, t)| tokenizer.count(t)).sum();
        assert_eq!(counted, prompt, "{tokenizer:?}");
        let charge = prompt as u32 + 40;
        // Room for exactly two such chats.
        let app = router(2 * charge, OpenAiEstimator::new().tokenizer(tokenizer));
        assert_eq!(
            chat(&app, body.clone()).await,
            (StatusCode::OK, Some(charge))
        );
        assert_eq!(
            chat(&app, body.clone()).await,
            (StatusCode::OK, Some(charge))
        );
        assert_eq!(
            chat(&app, body.clone()).await.0,
            StatusCode::TOO_MANY_REQUESTS
        );
    }
    // ceil(chars / 4), as before: ceil(103 / 4) = 26.
    let app = router(1000, OpenAiEstimator::new());
    assert_eq!(chat(&app, body).await, (StatusCode::OK, Some(26 + 40)));
}

#[tokio::test]
async fn special_tokens_and_non_ascii_text_are_counted_as_text() {
    let app = router(
        1000,
        OpenAiEstimator::new().tokenizer(Tokenizer::Cl100kBase),
    );
    // A special token's spelling is the tokens of its characters, not the one
    // special token, and does not end the prompt.
    let body = chat_body(
        &[
            ("user", "<|endoftext|>"),
            ("user", "Say hi <|endoftext|> twice"),
        ],
        0,
    );
    assert_eq!(chat(&app, body).await, (StatusCode::OK, Some(7 + 9)));
    // Chinese: 6 tokens where ceil(5 / 4) says 2; two crabs: 6 where it says 1.
    let body = chat_body(&[("user", "你好，世界"), ("user", "🦀🦀")], 0);
    assert_eq!(
        chat(&app, body.clone()).await,
        (StatusCode::OK, Some(6 + 6))
    );
    let quarter = router(1000, OpenAiEstimator::new());
    assert_eq!(chat(&quarter, body).await, (StatusCode::OK, Some(2)));
}

#[tokio::test]
async fn a_million_spaces_are_counted_and_served() {
    // tiktoken-rs alone panics on this run; the estimator counts it in pieces.
    let spaces = " ".repeat(1_000_000) + "x";
    let app = router(
        u32::MAX,
        OpenAiEstimator::new().tokenizer(Tokenizer::O200kBase),
    );
    let (status, tokens) = chat(&app, chat_body(&[("user", &spaces)], 0)).await;
    assert_eq!(status, StatusCode::OK);
    assert!((7_813..=7_820).contains(&tokens.unwrap()), "{tokens:?}");
}
