//! Mock mode: a mock OpenAI-style inference API, with the token estimate the
//! layer makes of its bodies.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::Extension;
use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;
use tollgate::config::Config;
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

    /// Only the POST routes' bodies: the layer sees matched routes only,
    /// and `GET /v1/models` has no body to read.
    fn reads_body(&self, req: &RequestView<'_>) -> bool {
        *req.method == Method::POST
            && matches!(req.uri.path(), "/v1/completions" | "/v1/chat/completions")
            && self.0.reads_body(req)
    }

    /// The same bodies under every plan: one the mock cannot serve is a
    /// 400 that costs nothing, also under a plan without a token budget,
    /// whose requests would otherwise be charged before the handler saw it.
    fn checks_body(&self, req: &RequestView<'_>) -> bool {
        self.reads_body(req)
    }

    fn estimate_body(&self, req: &RequestView<'_>, body: &[u8]) -> Result<Estimate, BodyError> {
        let chat = req.uri.path() == "/v1/chat/completions";
        Job::parse(chat, body).map_err(BodyError::new)?;
        self.0.estimate_body(req, body)
    }
}

impl Job {
    /// Tokens generated, over every candidate (`best_of` of them for each
    /// prompt, `n` returned).
    fn generated(&self) -> u64 {
        u64::from(self.completion_tokens) * u64::from(self.candidates)
    }

    fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.generated()
    }

    fn usage(&self) -> Value {
        let completion = self.generated();
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

    /// Why generation stopped, as OpenAI says it: `length` when the mock
    /// produced all of `max_tokens`, `stop` when it ended sooner.
    fn finish_reason(&self) -> &'static str {
        if self.completion_tokens >= self.max_tokens {
            "length"
        } else {
            "stop"
        }
    }

    fn answer(self) -> Response {
        if self.stream {
            return self.stream_answer();
        }
        let text = "tok ".repeat(self.completion_tokens as usize);
        let choice = |index: u32| {
            if self.chat {
                json!({
                    "index": index,
                    "message": {"role": "assistant", "content": text, "refusal": null},
                    "logprobs": null,
                    "finish_reason": self.finish_reason(),
                })
            } else {
                json!({"index": index, "text": text, "logprobs": null, "finish_reason": self.finish_reason()})
            }
        };
        let id = Head::new(self.chat, &self.model, self.object());
        let mut body = id.object();
        body["choices"] = (0..self.choices).map(choice).collect();
        body["usage"] = self.usage();
        let mut res = Json(body).into_response();
        res.extensions_mut().insert(UsedTokens(self.total_tokens()));
        res
    }

    /// A streamed answer, as OpenAI streams: for chat a first chunk with
    /// the `role` delta; one chunk per token; a chunk with the
    /// `finish_reason` (each of these once per choice, with its `index`,
    /// when `n` asks for several); with `stream_options.include_usage` every chunk says
    /// `"usage": null` and one more, with no choices, carries the usage;
    /// then `data: [DONE]`.
    fn stream_answer(self) -> Response {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, std::io::Error>>(1);
        // The prompt is paid for once the stream starts; each token as it is sent.
        if let Some(u) = &self.usage {
            u.set(self.prompt_tokens);
        }
        let head = Head::new(self.chat, &self.model, self.object());
        tokio::spawn(async move {
            let chunk = |choices: Value| {
                let mut c = head.object();
                c["choices"] = choices;
                if self.include_usage {
                    c["usage"] = Value::Null;
                }
                Event::default().data(c.to_string())
            };
            let choice = |index: u32, delta: Value, finish: Option<&str>| {
                if self.chat {
                    json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}])
                } else {
                    let text = delta.get("content").cloned().unwrap_or(json!(""));
                    json!([{"index": index, "text": text, "logprobs": null, "finish_reason": finish}])
                }
            };
            // A closed channel means the client went away: stop generating.
            if self.chat {
                for index in 0..self.choices {
                    let role = chunk(choice(
                        index,
                        json!({"role": "assistant", "content": ""}),
                        None,
                    ));
                    if tx.send(Ok(role)).await.is_err() {
                        return;
                    }
                }
            }
            for i in 0..self.completion_tokens {
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
                for index in 0..self.choices {
                    let token = chunk(choice(index, json!({"content": "tok "}), None));
                    if tx.send(Ok(token)).await.is_err() {
                        return;
                    }
                    if let Some(u) = &self.usage {
                        u.add(1);
                    }
                }
            }
            for index in 0..self.choices {
                let last = chunk(choice(index, json!({}), Some(self.finish_reason())));
                if tx.send(Ok(last)).await.is_err() {
                    return;
                }
            }
            if self.include_usage {
                let mut c = head.object();
                c["choices"] = json!([]);
                c["usage"] = self.usage();
                let usage = Event::default().data(c.to_string());
                if tx.send(Ok(usage)).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
        });
        Sse::new(ReceiverStream::new(rx)).into_response()
    }
}

/// What every response and every chunk of one answer carries: `id`,
/// `object`, `created` and `model`, the same on each chunk, as OpenAI sends
/// them.
struct Head {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
}

impl Head {
    fn new(chat: bool, model: &str, object: &'static str) -> Head {
        let prefix = if chat { "chatcmpl" } else { "cmpl" };
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Head {
            id: format!("{prefix}-{}", answer_id()),
            object,
            created,
            model: model.to_owned(),
        }
    }

    /// The head as a JSON object, for the fields of one response or chunk.
    fn object(&self) -> Value {
        json!({
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
        })
    }
}

/// A new id for an answer: unique in this process, and unlikely to repeat
/// across processes (the counter starts from a random offset).
fn answer_id() -> String {
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| std::hash::RandomState::new().hash_one(0u64));
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:016x}", seed.wrapping_add(n))
}

/// The models `GET /v1/models` lists.
#[derive(Clone)]
pub(crate) struct Models(Arc<Value>);

impl Models {
    /// The list of `names`, in OpenAI's shape, made once.
    pub(crate) fn new(names: Vec<String>) -> Models {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let data: Vec<Value> = names
            .iter()
            .map(|id| json!({"id": id, "object": "model", "created": created, "owned_by": "tollgate-gateway"}))
            .collect();
        Models(Arc::new(json!({"object": "list", "data": data})))
    }
}

/// The models the mock lists: every model a plan of `config` names in its
/// `[plans.models]` (not `"*"`), sorted; `mock` when none is named. (The
/// mock answers for any model name.)
pub(crate) fn model_names(config: &Config) -> Vec<String> {
    let mut names: Vec<String> = config
        .plans()
        .iter()
        .flat_map(|p| p.get_models().map(|(name, _)| name.to_owned()))
        .filter(|name| name != "*")
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        names.push("mock".to_owned());
    }
    names
}

/// `GET /v1/models`: the list, as OpenAI answers it.
pub(crate) async fn models(State(models): State<Models>) -> Json<Value> {
    Json((*models.0).clone())
}

/// `GET /v1/models/{model}` (OpenAI's "retrieve model"): the listed model's
/// object, or OpenAI's 404 `model_not_found` for a name the list does not
/// hold. The name is the whole rest of the path, so that the names of
/// Hugging Face models (`org/name`), which OpenAI SDKs put in the path as
/// they are, are found. A name that is not UTF-8 once decoded (`%FF`) is
/// no listed model's: named as it was sent.
pub(crate) async fn model(
    State(models): State<Models>,
    name: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
    uri: axum::http::Uri,
) -> Response {
    let name = match name {
        Ok(axum::extract::Path(name)) => name,
        Err(_) => uri
            .path()
            .strip_prefix("/v1/models/")
            .unwrap_or(uri.path())
            .to_owned(),
    };
    let found = models.0["data"]
        .as_array()
        .and_then(|data| data.iter().find(|m| m["id"] == name.as_str()));
    match found {
        Some(m) => Json(m.clone()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {
                "message": format!("The model '{name}' does not exist"),
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }})),
        )
            .into_response(),
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
