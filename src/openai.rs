//! A [`CostEstimator`] for OpenAI-style JSON bodies (feature `openai`).
//!
//! [`OpenAiEstimator`] reads the body of a completion or chat completion
//! request, once the layer has checked the caller's key, and estimates its
//! tokens as the prompt's plus the most the answer may use:
//!
//! - the prompt: a completion's `prompt` (a string, an array of strings, or
//!   token ids, counted one token each), or every text of a chat's
//!   `messages[].content` (a string, or an array of content parts whose
//!   `{"type":"text","text":…}` parts count; other parts, images and audio,
//!   count [`other_part_tokens`](OpenAiEstimator::other_part_tokens) each,
//!   0 by default);
//! - the answer: `max_completion_tokens`, else `max_tokens`, else
//!   [`default_max_tokens`](OpenAiEstimator::default_max_tokens) (16, as
//!   OpenAI's completions default), times `n` (default 1), times the number
//!   of prompts of a completion given several.
//!
//! Text is counted by [`count_tokens`](OpenAiEstimator::count_tokens): by
//! default `ceil(chars / 4)` of all the prompt's characters together,
//! OpenAI's rule of thumb for English.
//!
//! The body's `model` is kept in the [`Estimate`]. A body that is not JSON,
//! is cut short, names no `model` (as OpenAI's API, which requires it), or
//! has neither a `prompt` nor `messages` is answered 400, charging nothing. A GET, or a request without a JSON body, is estimated
//! from its head as [`ExtensionEstimate`] does.
//!
//! ```
//! use axum::{Router, body::Body, routing::post};
//! use http::{Request, StatusCode};
//! use tollgate::openai::OpenAiEstimator;
//! use tollgate::{ApiKey, Policy, RateLimitLayer, TokenBudget, UsagePlan};
//! use tower::ServiceExt;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! let policy = Policy::builder()
//!     .plan(UsagePlan::new("llm").tokens(TokenBudget::new().per_minute(100)?))
//!     .key(ApiKey::new("k1", "secret", "llm"))
//!     .build()?;
//! let layer = RateLimitLayer::builder(policy)
//!     .estimator(OpenAiEstimator::new())
//!     .max_body_bytes(64 * 1024)
//!     .build();
//! let app = Router::new()
//!     .route("/v1/completions", post(|body: String| async move { body }))
//!     .layer(layer);
//!
//! // 8 characters: 2 prompt tokens, plus 60 for the answer.
//! let body = r#"{"model":"m","prompt":"abcdefgh","max_tokens":60}"#;
//! let call = || {
//!     Request::post("/v1/completions")
//!         .header("x-api-key", "secret")
//!         .header("content-type", "application/json")
//!         .body(Body::from(body))
//!         .unwrap()
//! };
//! let res = app.clone().oneshot(call()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK); // the handler got the body as sent
//! let res = app.clone().oneshot(call()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS); // 62 + 62 > 100
//! # Ok::<(), tollgate::ConfigError>(())
//! # }).unwrap();
//! ```

use std::fmt;
use std::sync::Arc;

use http::Method;
use serde::Deserialize;

use crate::cost::{BodyError, CostEstimator, Estimate, ExtensionEstimate};
use crate::extract::RequestView;

/// The answer's tokens when a request names no maximum: OpenAI's default
/// `max_tokens` for completions.
pub const DEFAULT_MAX_TOKENS: u32 = 16;

/// Estimates a request's tokens from an OpenAI-style JSON body: see the
/// [module](self).
#[derive(Clone)]
pub struct OpenAiEstimator {
    counter: Counter,
    default_max_tokens: u32,
    other_part_tokens: u32,
}

#[derive(Clone)]
enum Counter {
    /// `ceil(chars / 4)` of all the prompt's characters together.
    QuarterChars,
    /// A function called once per text, the results added.
    Custom(Arc<dyn Fn(&str) -> u32 + Send + Sync>),
}

impl OpenAiEstimator {
    /// An estimator counting `ceil(chars / 4)` tokens of prompt, with
    /// [`DEFAULT_MAX_TOKENS`] for an answer of no stated maximum.
    pub fn new() -> Self {
        OpenAiEstimator {
            counter: Counter::QuarterChars,
            default_max_tokens: DEFAULT_MAX_TOKENS,
            other_part_tokens: 0,
        }
    }

    /// Counts the tokens of each text of the prompt with `count` (a
    /// tokenizer's, say), adding the results: each message's content, each
    /// text part, each prompt string.
    #[must_use]
    pub fn count_tokens(mut self, count: impl Fn(&str) -> u32 + Send + Sync + 'static) -> Self {
        self.counter = Counter::Custom(Arc::new(count));
        self
    }

    /// The answer's tokens when a request states no `max_completion_tokens`
    /// nor `max_tokens` (default [`DEFAULT_MAX_TOKENS`]).
    #[must_use]
    pub fn default_max_tokens(mut self, tokens: u32) -> Self {
        self.default_max_tokens = tokens;
        self
    }

    /// The tokens counted for each content part that is not text (an image,
    /// audio, a file; default 0).
    #[must_use]
    pub fn other_part_tokens(mut self, tokens: u32) -> Self {
        self.other_part_tokens = tokens;
        self
    }

    /// The estimate of an OpenAI-style JSON body, as the layer makes it.
    pub fn estimate_json(&self, body: &[u8]) -> Result<Estimate, BodyError> {
        let req: Body = serde_json::from_slice(body)
            .map_err(|e| BodyError::new(format!("the request body is not valid JSON: {e}")))?;
        let mut prompt = Tally::new(&self.counter);
        // A completion answers each of several prompts.
        let mut answers: u64 = 1;
        match (&req.prompt, &req.messages) {
            (Some(p), _) => match p {
                Prompt::Text(t) => prompt.text(t),
                Prompt::Texts(ts) => {
                    answers = ts.len().max(1) as u64;
                    ts.iter().for_each(|t| prompt.text(t));
                }
                Prompt::Ids(ids) => prompt.tokens(ids.len() as u64),
                Prompt::IdLists(lists) => {
                    answers = lists.len().max(1) as u64;
                    lists.iter().for_each(|l| prompt.tokens(l.len() as u64));
                }
            },
            (None, Some(messages)) => {
                for m in messages {
                    match &m.content {
                        Some(Content::Text(t)) => prompt.text(t),
                        Some(Content::Parts(parts)) => {
                            for part in parts {
                                match (&*part.kind, &part.text) {
                                    ("text", Some(t)) => prompt.text(t),
                                    _ => prompt.tokens(u64::from(self.other_part_tokens)),
                                }
                            }
                        }
                        None => {}
                    }
                }
            }
            (None, None) => {
                return Err(BodyError::new(
                    "the request body has neither `prompt` nor `messages`",
                ));
            }
        }
        if req.model.is_none() {
            return Err(BodyError::new(
                "the request body names no `model`: every completion and chat request names the model it is for",
            ));
        }
        let max = req
            .max_completion_tokens
            .or(req.max_tokens)
            .unwrap_or(self.default_max_tokens);
        let n = u64::from(req.n.unwrap_or(1).max(1));
        let tokens = prompt
            .total()
            .saturating_add(u64::from(max).saturating_mul(n).saturating_mul(answers));
        let mut estimate = Estimate::new(u32::try_from(tokens).unwrap_or(u32::MAX));
        estimate.model = req.model;
        Ok(estimate)
    }
}

impl Default for OpenAiEstimator {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for OpenAiEstimator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counter = match self.counter {
            Counter::QuarterChars => "ceil(chars / 4)",
            Counter::Custom(_) => "custom",
        };
        f.debug_struct("OpenAiEstimator")
            .field("counter", &counter)
            .field("default_max_tokens", &self.default_max_tokens)
            .field("other_part_tokens", &self.other_part_tokens)
            .finish()
    }
}

impl CostEstimator for OpenAiEstimator {
    /// A request whose body is not read: its [`TokenEstimate`](crate::TokenEstimate)
    /// extension, or 0.
    fn estimate(&self, req: &RequestView<'_>) -> u32 {
        ExtensionEstimate.estimate(req)
    }

    /// Bodies of POST, PUT and PATCH requests are read.
    fn reads_body(&self, req: &RequestView<'_>) -> bool {
        matches!(*req.method, Method::POST | Method::PUT | Method::PATCH)
    }

    fn estimate_body(&self, _: &RequestView<'_>, body: &[u8]) -> Result<Estimate, BodyError> {
        self.estimate_json(body)
    }
}

/// Adds up a prompt's tokens.
struct Tally<'c> {
    counter: &'c Counter,
    chars: u64,
    tokens: u64,
}

impl<'c> Tally<'c> {
    fn new(counter: &'c Counter) -> Self {
        Tally {
            counter,
            chars: 0,
            tokens: 0,
        }
    }

    fn text(&mut self, text: &str) {
        match self.counter {
            Counter::QuarterChars => self.chars += text.chars().count() as u64,
            Counter::Custom(count) => self.tokens(u64::from(count(text))),
        }
    }

    fn tokens(&mut self, tokens: u64) {
        self.tokens = self.tokens.saturating_add(tokens);
    }

    fn total(&self) -> u64 {
        self.tokens.saturating_add(self.chars.div_ceil(4))
    }
}

/// The fields of a request body the estimate reads; the others are skipped.
#[derive(Deserialize)]
struct Body {
    model: Option<String>,
    prompt: Option<Prompt>,
    messages: Option<Vec<Message>>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    n: Option<u32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The estimate of `body` with `"model":"m"` added first.
    fn tokens(body: &str) -> u32 {
        OpenAiEstimator::new()
            .estimate_json(with_model(body).as_bytes())
            .unwrap()
            .tokens
    }

    fn with_model(body: &str) -> String {
        body.replacen('{', r#"{"model":"m","#, 1)
    }

    #[test]
    fn a_completion_is_its_prompt_and_its_maximum() {
        assert_eq!(tokens(r#"{"prompt":"abcde","max_tokens":10}"#), 2 + 10);
        assert_eq!(tokens(r#"{"prompt":"abcd"}"#), 1 + DEFAULT_MAX_TOKENS);
        assert_eq!(tokens(r#"{"prompt":""}"#), DEFAULT_MAX_TOKENS);
        // Each prompt of several gets its own answers.
        assert_eq!(
            tokens(r#"{"prompt":["abcd","efgh"],"max_tokens":5,"n":2}"#),
            2 + 20
        );
        assert_eq!(tokens(r#"{"prompt":[1,2,3],"max_tokens":1}"#), 3 + 1);
        assert_eq!(tokens(r#"{"prompt":[[1,2],[3]],"max_tokens":1}"#), 3 + 2);
    }

    #[test]
    fn a_chat_counts_every_text() {
        let body = r#"{"model":"gpt-x","messages":[
            {"role":"system","content":"abcd"},
            {"role":"user","content":[{"type":"text","text":"efgh"},{"type":"image_url","image_url":{"url":"x"}}]},
            {"role":"assistant","content":null,"tool_calls":[]}
        ],"max_completion_tokens":7,"max_tokens":100,"n":3}"#;
        let e = OpenAiEstimator::new()
            .estimate_json(body.as_bytes())
            .unwrap();
        assert_eq!(
            e.tokens,
            2 + 7 * 3,
            "max_completion_tokens wins over max_tokens"
        );
        assert_eq!(e.model.as_deref(), Some("gpt-x"));
        let images = OpenAiEstimator::new().other_part_tokens(85);
        assert_eq!(
            images.estimate_json(body.as_bytes()).unwrap().tokens,
            2 + 85 + 21
        );
    }

    #[test]
    fn characters_are_counted_together_or_by_the_given_counter() {
        // 3 + 3 characters: ceil(6 / 4) = 2, not 1 + 1.
        let body = r#"{"messages":[{"content":"abc"},{"content":"déf"}],"max_tokens":0}"#;
        assert_eq!(tokens(body), 2);
        let words = OpenAiEstimator::new().count_tokens(|s| s.split_whitespace().count() as u32);
        let body = with_model(r#"{"prompt":["one two","three"],"max_tokens":0}"#);
        assert_eq!(words.estimate_json(body.as_bytes()).unwrap().tokens, 3);
    }

    #[test]
    fn huge_requests_saturate() {
        let body = format!(
            r#"{{"prompt":"a","max_tokens":{},"n":{}}}"#,
            u32::MAX,
            u32::MAX
        );
        assert_eq!(tokens(&body), u32::MAX);
    }

    #[test]
    fn unusable_bodies_are_refused_with_a_reason() {
        let e = OpenAiEstimator::new();
        for body in [
            &b"not json"[..],
            br#"{"prompt":"abc"#,
            br#"{"model":"m"}"#,
            br#"[1,2]"#,
            br#"{"prompt":{"a":1}}"#,
            br#"{"model":"m","messages":"hi"}"#,
            br#"{"prompt":"abc","max_tokens":5}"#,
            br#"{"model":null,"prompt":"abc"}"#,
            br#"{"model":7,"prompt":"abc"}"#,
            b"\xff\xfe",
        ] {
            let err = e.estimate_json(body).unwrap_err();
            assert!(!err.message().is_empty());
        }
        assert!(
            e.estimate_json(br#"{"model":"m"}"#)
                .unwrap_err()
                .message()
                .contains("neither")
        );
        assert!(
            e.estimate_json(br#"{"prompt":"abc"}"#)
                .unwrap_err()
                .message()
                .contains("`model`")
        );
    }
}
