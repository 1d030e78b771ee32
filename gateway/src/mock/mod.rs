//! Mock mode: a mock OpenAI-style inference API, with the token estimate the
//! layer makes of its bodies.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::Extension;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;
use tollgate::cost::{BodyError, CostEstimator, Estimate};
use tollgate::extract::RequestView;
use tollgate::openai::OpenAiEstimator;
use tollgate::{TokenUsage, UsedTokens};

// The request bodies and their estimate, in a file of their own without HTTP
// that the fuzz target and the corpus replay test include with `#[path]`.
mod estimate;

use estimate::Job;

/// The OpenAI estimate, for bodies the mock can serve: any other is answered
/// 400 before the decision, costing nothing.
pub(crate) struct MockEstimator(pub(crate) OpenAiEstimator);

impl CostEstimator for MockEstimator {
    fn estimate(&self, req: &RequestView<'_>) -> u32 {
        self.0.estimate(req)
    }

    fn reads_body(&self, req: &RequestView<'_>) -> bool {
        self.0.reads_body(req)
    }

    fn estimate_body(&self, req: &RequestView<'_>, body: &[u8]) -> Result<Estimate, BodyError> {
        let chat = req.uri.path() == "/v1/chat/completions";
        Job::parse(chat, body).map_err(BodyError::new)?;
        self.0.estimate_body(req, body)
    }
}

impl Job {
    fn total_tokens(&self) -> u64 {
        self.prompt_tokens + u64::from(self.completion_tokens)
    }

    fn usage(&self) -> Value {
        let completion = u64::from(self.completion_tokens);
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    fn object(&self) -> &'static str {
        match (self.chat, self.stream) {
            (true, false) => "chat.completion",
            (true, true) => "chat.completion.chunk",
            (false, _) => "text_completion",
        }
    }

    fn answer(self) -> Response {
        if self.stream {
            return self.stream_answer();
        }
        let text = "tok ".repeat(self.completion_tokens as usize);
        let choice = if self.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            json!({"index": 0, "text": text, "finish_reason": "length"})
        };
        let mut res = Json(json!({
            "id": "mock-1",
            "object": self.object(),
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(),
        }))
        .into_response();
        res.extensions_mut().insert(UsedTokens(self.total_tokens()));
        res
    }

    fn stream_answer(self) -> Response {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, std::io::Error>>(1);
        // The prompt is paid for once the stream starts; each token as it is sent.
        if let Some(u) = &self.usage {
            u.set(self.prompt_tokens);
        }
        tokio::spawn(async move {
            let n = self.completion_tokens;
            for i in 0..n {
                if self.token_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(self.token_ms)).await;
                }
                if self.fail_after == Some(i) {
                    // The body fails: the client sees the stream cut off.
                    let _ = tx
                        .send(Err(std::io::Error::other("mock model failure")))
                        .await;
                    return;
                }
                let choice = if self.chat {
                    json!({"index": 0, "delta": {"content": "tok "}})
                } else {
                    json!({"index": 0, "text": "tok "})
                };
                let mut chunk = json!({
                    "id": "mock-1",
                    "object": self.object(),
                    "model": self.model,
                    "choices": [choice],
                });
                if i + 1 == n {
                    chunk["usage"] = self.usage();
                }
                // A closed channel means the client went away: stop generating.
                if tx
                    .send(Ok(Event::default().data(chunk.to_string())))
                    .await
                    .is_err()
                {
                    return;
                }
                if let Some(u) = &self.usage {
                    u.add(1);
                }
            }
            if n == 0 {
                let chunk = json!({"id": "mock-1", "object": self.object(), "model": self.model, "choices": [], "usage": self.usage()});
                let _ = tx.send(Ok(Event::default().data(chunk.to_string()))).await;
            }
            let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
        });
        Sse::new(ReceiverStream::new(rx)).into_response()
    }
}

type Usage = Option<Extension<TokenUsage>>;

pub(crate) async fn completions(usage: Usage, body: Bytes) -> Response {
    answer(Job::parse(false, &body), usage)
}

pub(crate) async fn chat_completions(usage: Usage, body: Bytes) -> Response {
    answer(Job::parse(true, &body), usage)
}

fn answer(job: Result<Job, String>, usage: Usage) -> Response {
    match job {
        Ok(mut job) => {
            job.usage = usage.map(|Extension(u)| u);
            job.answer()
        }
        Err(msg) => bad_request(&msg),
    }
}

/// A 400 with a JSON error. The middleware answers bad bodies before the
/// rate limit; one that reaches a handler (served without the middleware)
/// reports that it used no tokens.
pub(crate) fn bad_request(message: &str) -> Response {
    let mut res = (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": {"message": message, "type": "invalid_request_error"}})),
    )
        .into_response();
    res.extensions_mut().insert(UsedTokens(0));
    res
}
