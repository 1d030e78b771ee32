//! A [`CostEstimator`] for OpenAI-style JSON bodies (feature `openai`).
//!
//! [`OpenAiEstimator`] reads the body of a completion, chat completion,
//! embeddings or Responses request, once the layer has checked the caller's
//! key, and estimates its tokens as the prompt's plus the most the answer
//! may use:
//!
//! - the prompt: a completion's `prompt` (a string, an array of strings, or
//!   token ids, counted one token each), or every text of a chat's
//!   `messages[].content` (a string, or an array of content parts whose
//!   `{"type":"text","text":…}` parts count; other parts, images and audio,
//!   count [`other_part_tokens`](OpenAiEstimator::other_part_tokens) each,
//!   0 by default), or an embeddings or Responses request's `input` (a
//!   string, strings or token ids as a prompt; or a Responses request's
//!   items, counted as a chat's messages, `input_text` parts as text;
//!   never on a route ending in `/completions`, which takes none); on a
//!   route ending in `/responses`, a `prompt` may also be a reference to a
//!   prompt template (`{"id":"pmpt_…","version":…,"variables":{…}}`),
//!   counted by its variables (strings, and `input_text` parts, as text;
//!   other parts as a chat's), not by the template's own text, which only
//!   OpenAI holds; a body that has several of these counts them all,
//!   whichever the server reads; and a system prompt beside them, a
//!   Responses request's `instructions` or a Messages request's (Anthropic's
//!   shape) `system`, text or text blocks; and the tools, text the model
//!   reads (a chat template writes them into the prompt, and OpenAI counts
//!   them in `prompt_tokens`): each definition of `tools` (and of a chat's
//!   legacy `functions`) as its JSON written compactly, and each call of an
//!   assistant turn (`tool_calls`' `function` or `custom`, or a legacy
//!   `function_call`) as its `name`, `arguments` and `input`, as text; a
//!   completion's `suffix` as text too;
//! - the answer: the largest of `max_completion_tokens`, `max_tokens`,
//!   `max_output_tokens` (the Responses API's) and `n_predict` (llama.cpp's
//!   server's, which it reads before `max_tokens`; a negative one, no bound,
//!   counts as none stated) that the body states (servers read different
//!   ones, so a small one beside a large one does not lower the estimate),
//!   else
//!   [`default_max_tokens`](OpenAiEstimator::default_max_tokens) (16, as
//!   OpenAI's completions default), times `n` (default 1; a completion's
//!   `best_of` when larger, the candidates generated), times the number
//!   of prompts of a completion given several; none for a request whose
//!   route ends in `/embeddings` (its answer is vectors).
//!
//! Text is counted by default as `ceil(chars / 4)` of all the prompt's
//! characters together, OpenAI's rule of thumb for English; with the
//! `tiktoken` feature, [`tokenizer`](OpenAiEstimator::tokenizer) counts it
//! with OpenAI's own BPE instead (`Tokenizer`), and
//! [`count_tokens`](OpenAiEstimator::count_tokens) takes any function. Only
//! the texts are counted: not the few tokens a chat's format adds around
//! each message.
//!
//! The body's `model` is kept in the [`Estimate`]. A body that is JSON (or
//! says it is, or says nothing of its type, or opens as a JSON object,
//! after whitespace and a byte-order mark, whatever type it says) is
//! answered 400, charging nothing, when it is not valid JSON (llama.cpp's
//! server and Ollama read such an object whatever its type, a byte-order
//! mark, bytes that are not UTF-8 or a lone surrogate included), is cut short, names no `model` or an
//! empty one (as OpenAI's API, which requires it, except of a Responses
//! request naming a prompt template, whose template names the model; vLLM
//! serves an empty one with its default model), has a prompt template
//! on any other route, has none of `prompt`, `messages` and `input`, or
//! holds a key that differs only in case from a field the estimate reads
//! (`"Model"` or `"MAX_TOKENS"` beside the body's own, a message's
//! `"Content"`, a part's `"Text"`; `stream` and `stream_options` too): Go's
//! `encoding/json`, which Ollama's server uses, takes such a key for the
//! field (the last one wins), where the estimate, as Python's and Rust's
//! servers, reads the exact name alone, so the request would be limited as
//! one model and served as another. A
//! GET, a request with an empty body, or one whose body is not JSON, says
//! it is something else (a `multipart/form-data` upload, a form) and does
//! not open as an object is estimated from its head as
//! [`ExtensionEstimate`] does. Every
//! POST, PUT and PATCH body is read, up to the layer's
//! [`max_body_bytes`](crate::RateLimitLayerBuilder::max_body_bytes), whatever
//! its type (a server may parse it as JSON whatever it says): a larger
//! upload through a layer with this estimator is answered 413, so put the
//! estimator's layer on the routes that take completions, or raise the
//! bound.
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
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;
#[cfg(feature = "tiktoken")]
use tiktoken_rs::CoreBPE;

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
    /// A BPE, loaded once per process, counting each text.
    #[cfg(feature = "tiktoken")]
    Bpe(Tokenizer, &'static CoreBPE),
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
    ///
    /// Replaces the counter set before, [`tokenizer`](Self::tokenizer)'s
    /// too.
    #[must_use]
    pub fn count_tokens(mut self, count: impl Fn(&str) -> u32 + Send + Sync + 'static) -> Self {
        self.counter = Counter::Custom(Arc::new(count));
        self
    }

    /// Counts the tokens of each text of the prompt with `tokenizer`, OpenAI's
    /// BPE, adding the results (feature `tiktoken`). Text is encoded as
    /// ordinary text: a special token's spelling in a prompt, such as
    /// `<|endoftext|>`, counts as the tokens of its characters.
    ///
    /// The tokenizer's ranks are loaded here, once per process, and shared by
    /// every estimator (and clone) that uses them; a request never waits for
    /// them. Loading takes time and memory, so build the estimator at startup:
    /// about 30–60 ms and 25 MB for [`Tokenizer::Cl100kBase`], 80–130 ms and
    /// 45 MB for [`Tokenizer::O200kBase`] in a release build (some 5 times
    /// longer in a debug build).
    ///
    /// Counting runs on the request's task and costs far more than
    /// `ceil(chars / 4)`: in a release build, some 25–45 µs for a chat body of
    /// 1 KB and 0.6–1 ms for 16 KB (against 1 µs and 15–20 µs), and about
    /// 0.1 s for 1 MiB, the layer's default
    /// [`max_body_bytes`](crate::RateLimitLayerBuilder::max_body_bytes). Bound
    /// the body to what the models accept (the figures are the repository's
    /// `BENCHMARKS.md`).
    ///
    /// Replaces the counter set before, [`count_tokens`](Self::count_tokens)'s
    /// too.
    ///
    /// ```
    /// use tollgate::openai::{OpenAiEstimator, Tokenizer};
    ///
    /// let estimator = OpenAiEstimator::new().tokenizer(Tokenizer::O200kBase);
    /// let body = r#"{"model":"gpt-4o","messages":[
    ///     {"role":"system","content":"You are terse."},
    ///     {"role":"user","content":"Grüße aus Köln, naïve café"}
    /// ],"max_tokens":50}"#;
    /// // 4 tokens and 9, where ceil(chars / 4) would say ceil(40 / 4) = 10.
    /// let estimate = estimator.estimate_json(body.as_bytes())?;
    /// assert_eq!(estimate.tokens, 4 + 9 + 50);
    /// assert_eq!(estimate.model.as_deref(), Some("gpt-4o"));
    /// # Ok::<(), tollgate::cost::BodyError>(())
    /// ```
    #[cfg(feature = "tiktoken")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tiktoken")))]
    #[must_use]
    pub fn tokenizer(mut self, tokenizer: Tokenizer) -> Self {
        self.counter = Counter::Bpe(tokenizer, tokenizer.bpe());
        self
    }

    /// The answer's tokens when a request states none of
    /// `max_completion_tokens`, `max_tokens`, `max_output_tokens` and
    /// `n_predict`, or a negative `n_predict` (default [`DEFAULT_MAX_TOKENS`]).
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

    /// The estimate of an OpenAI-style JSON body, as the layer makes it
    /// for a body that is JSON or says it is.
    pub fn estimate_json(&self, body: &[u8]) -> Result<Estimate, BodyError> {
        self.estimate_parsed(serde_json::from_slice(body).map_err(not_json)?, Route::Any)
    }

    /// The estimate of a parsed body.
    /// Counts a prompt; the answers it asks for (one per prompt of several).
    fn prompt(&self, tally: &mut Tally<'_>, p: &Prompt) -> u64 {
        match p {
            Prompt::Text(t) => tally.text(t),
            Prompt::Texts(ts) => {
                ts.iter().for_each(|t| tally.text(t));
                return ts.len().max(1) as u64;
            }
            Prompt::Ids(ids) => tally.tokens(ids.len() as u64),
            Prompt::IdLists(lists) => {
                lists.iter().for_each(|l| tally.tokens(l.len() as u64));
                return lists.len().max(1) as u64;
            }
        }
        1
    }

    /// Counts the texts of messages (a chat's, or a Responses request's
    /// items): a string content, or its text parts; other parts count
    /// [`other_part_tokens`](Self::other_part_tokens) each.
    fn messages(&self, tally: &mut Tally<'_>, messages: &[Message]) {
        for m in messages {
            if let Some(content) = &m.content {
                self.content(tally, content);
            }
            if let Some(Value::Array(calls)) = &m.tool_calls {
                for call in calls {
                    for f in ["function", "custom"]
                        .map(|k| call.get(k))
                        .into_iter()
                        .flatten()
                    {
                        called(tally, f);
                    }
                }
            }
            if let Some(f) = &m.function_call {
                called(tally, f);
            }
        }
    }

    /// Counts a message's content: its text, or its parts.
    fn content(&self, tally: &mut Tally<'_>, content: &Content) {
        match content {
            Content::Text(t) => tally.text(t),
            Content::Parts(parts) => parts.iter().for_each(|p| self.part(tally, p)),
        }
    }

    /// Counts a content part: a text part's text, or
    /// [`other_part_tokens`](Self::other_part_tokens) for another (an
    /// image, a file, audio).
    fn part(&self, tally: &mut Tally<'_>, part: &Part) {
        match (&*part.kind, &part.text) {
            ("text" | "input_text" | "output_text", Some(t)) => tally.text(t),
            _ => tally.tokens(u64::from(self.other_part_tokens)),
        }
    }

    /// Counts a Responses request's prompt template by what the request
    /// brings to it: each variable's text, or its part as a message's part
    /// is counted. The template's own text is stored at OpenAI, out of the
    /// estimate's sight; what it adds is settled after the answer, from
    /// the `usage` the server reports.
    fn template(&self, tally: &mut Tally<'_>, template: &Template) {
        for variable in template.variables.iter().flat_map(|v| v.values()) {
            match variable {
                Variable::Text(t) => tally.text(t),
                Variable::Part(p) => self.part(tally, p),
            }
        }
    }

    /// The estimate of a parsed body sent to `route`.
    fn estimate_parsed(&self, req: Body, route: Route) -> Result<Estimate, BodyError> {
        let mut prompt = Tally::new(&self.counter);
        // A completion answers each of several prompts.
        let mut answers: u64 = 1;
        // A completion's routes take no `input`: such a body is refused
        // there, as its server would refuse it.
        let input = match route {
            Route::Completions => &None,
            _ => &req.input,
        };
        // A prompt template (an object as `prompt`) is the Responses API's:
        // a completion's prompt is text or token ids, and no other route
        // takes one, so elsewhere such a body is refused, as its server
        // would refuse it.
        let template = match &req.prompt {
            Some(PromptOf::Template(t)) if route == Route::Responses => Some(t),
            Some(PromptOf::Template(_)) => {
                return Err(BodyError::new(
                    "the request body's `prompt` is an object, a prompt template, which only the Responses API takes: \
                     a completion's `prompt` is text, texts or token ids",
                ));
            }
            _ => None,
        };
        if req.prompt.is_none() && req.messages.is_none() && input.is_none() {
            return Err(BodyError::new(
                "the request body has none of `prompt`, `messages` and `input`",
            ));
        }
        // A body with several of them is counted for each: which one the
        // server reads is its choice, not the estimate's, and counting one
        // alone would let a stray `"prompt": ""` beside a chat's long
        // `messages` pass as a request of a few tokens (past a token budget
        // it can never fit in). A client that sends one pays for that one.
        match &req.prompt {
            Some(PromptOf::Completion(p)) => answers = self.prompt(&mut prompt, p),
            Some(PromptOf::Template(t)) => self.template(&mut prompt, t),
            None => {}
        }
        if let Some(messages) = &req.messages {
            self.messages(&mut prompt, messages);
        }
        // The system message the server puts before the others.
        for system in [&req.instructions, &req.system].into_iter().flatten() {
            self.content(&mut prompt, system);
        }
        // A completion's suffix, which the model reads after the prompt.
        if let Some(suffix) = &req.suffix {
            prompt.text(suffix);
        }
        // And the tools it describes to the model.
        for tools in [&req.tools, &req.functions].into_iter().flatten() {
            defined(&mut prompt, tools);
        }
        match input {
            // An input is one answer, however many texts it holds: an
            // embeddings request's vectors, or a Responses request's reply.
            Some(Input::Prompt(p)) => {
                self.prompt(&mut prompt, p);
            }
            Some(Input::Items(items)) => self.messages(&mut prompt, items),
            None => {}
        }
        // A Responses request that names a prompt template may leave the
        // model to the template (OpenAI's own examples name none); it is
        // then limited as a model the plan does not name.
        // An empty name is none: OpenAI refuses it as it does a missing
        // one, and vLLM serves it with its default model, whichever the
        // plan's limits name.
        let model = req.model.filter(|m| !m.is_empty());
        if model.is_none() && template.is_none() {
            return Err(BodyError::new(
                "the request body names no `model`: every completion, chat, embeddings and responses request names the model it is for",
            ));
        }
        // Of several maximums, the largest: servers read different ones
        // (vLLM's completions `max_tokens` alone, its Responses
        // `max_output_tokens` alone, its chat `max_completion_tokens` unless
        // it is 0; Ollama's chat `max_tokens`; llama.cpp's `n_predict`
        // before `max_tokens`), so a small one beside a large one must not
        // pass an answer that may take the large one. A negative
        // `n_predict` is llama.cpp's "no bound": as much as none stated.
        let n_predict = req.n_predict.map(|n| {
            u32::try_from(n).unwrap_or(if n < 0 {
                self.default_max_tokens
            } else {
                u32::MAX
            })
        });
        let max = if route == Route::Embeddings {
            0
        } else {
            [
                req.max_completion_tokens,
                req.max_tokens,
                req.max_output_tokens,
                n_predict,
            ]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(self.default_max_tokens)
        };
        // `best_of` candidates are generated for each prompt, and billed,
        // `n` of them returned.
        let n = u64::from(req.n.unwrap_or(1).max(req.best_of.unwrap_or(1)).max(1));
        let tokens = prompt
            .total()
            .saturating_add(u64::from(max).saturating_mul(n).saturating_mul(answers));
        let mut estimate = Estimate::new(u32::try_from(tokens).unwrap_or(u32::MAX));
        estimate.model = model;
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
            #[cfg(feature = "tiktoken")]
            Counter::Bpe(tokenizer, _) => tokenizer.name(),
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

    /// Bodies of POST, PUT and PATCH requests are read, whatever their
    /// content type: a server may parse a body as JSON whatever it is said
    /// to be, so what a body says it is cannot spare it the estimate.
    fn reads_body(&self, req: &RequestView<'_>) -> bool {
        matches!(*req.method, Method::POST | Method::PUT | Method::PATCH)
    }

    /// An empty body, or one that is not JSON, says it is something else
    /// (`multipart/form-data`, a form, bytes) and does not open as a JSON
    /// object, is estimated from the head as
    /// [`estimate`](CostEstimator::estimate) does. A body that is JSON, or
    /// says it is (or says nothing), or opens as an object, is estimated by
    /// [`estimate_json`](OpenAiEstimator::estimate_json).
    fn estimate_body(&self, req: &RequestView<'_>, body: &[u8]) -> Result<Estimate, BodyError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Estimate::new(self.estimate(req)));
        }
        match serde_json::from_slice(body) {
            Ok(parsed) => self.estimate_parsed(parsed, Route::of(req)),
            Err(e) if e.is_data() || says_json(req) || opens_object(body) => Err(not_json(e)),
            Err(_) => Ok(Estimate::new(self.estimate(req))),
        }
    }
}

/// What a request's route tells of its body, by OpenAI's paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// `…/completions` (completions and chat completions): a `prompt` or
    /// `messages`, never an `input`.
    Completions,
    /// `…/embeddings`: an answer of vectors, which counts no tokens.
    Embeddings,
    /// `…/responses` (the Responses API): its `prompt` may be a prompt
    /// template.
    Responses,
    /// Any other, or none known.
    Any,
}

impl Route {
    fn of(req: &RequestView<'_>) -> Self {
        let path = req.uri.path().trim_end_matches('/');
        if path.ends_with("/completions") {
            Route::Completions
        } else if path.ends_with("/embeddings") {
            Route::Embeddings
        } else if path.ends_with("/responses") {
            Route::Responses
        } else {
            Route::Any
        }
    }
}

/// Counts tool definitions (`tools`, `functions`): each one's JSON, written
/// compactly, as text; a value that is not an array, as one definition.
fn defined(tally: &mut Tally<'_>, tools: &Value) {
    match tools {
        Value::Array(tools) => tools
            .iter()
            .filter(|t| !t.is_null())
            .for_each(|t| tally.text(&t.to_string())),
        Value::Null => {}
        tool => tally.text(&tool.to_string()),
    }
}

/// Counts a tool call the model made (a `tool_calls` entry's `function` or
/// `custom` object, or a legacy `function_call`): its `name`, `arguments`
/// and `input` (a custom tool's), strings as text, other values (Ollama's
/// arguments as an object) as their JSON written compactly. A call of
/// another shape counts nothing: the estimate reads it, it does not judge it.
fn called(tally: &mut Tally<'_>, call: &Value) {
    for field in ["name", "arguments", "input"] {
        match call.get(field) {
            Some(Value::String(text)) => tally.text(text),
            None | Some(Value::Null) => {}
            Some(other) => tally.text(&other.to_string()),
        }
    }
}

/// The client's error for a body that is not the JSON of a completion.
fn not_json(e: serde_json::Error) -> BodyError {
    BodyError::new(format!("the request body is not valid JSON: {e}"))
}

/// Whether `body` opens as a JSON object: `{` after whitespace and a UTF-8
/// byte-order mark, if any. Servers that parse a body as JSON whatever its
/// type read more than serde does: llama.cpp's server skips a byte-order
/// mark, and Go's `encoding/json` (Ollama's) reads bytes that are not UTF-8
/// and lone surrogates in strings as U+FFFD. Such a body that serde cannot
/// read is refused, not estimated from its head as no completion at all.
fn opens_object(body: &[u8]) -> bool {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    body.trim_ascii_start().first() == Some(&b'{')
}

/// Whether a request says its body is JSON (`application/json`,
/// `application/*+json`, with any parameters) or says nothing of it.
fn says_json(req: &RequestView<'_>) -> bool {
    let Some(ct) = req.headers.get(http::header::CONTENT_TYPE) else {
        return true;
    };
    let ct = ct.as_bytes();
    let mime = ct.split(|&b| b == b';').next().unwrap_or(ct).trim_ascii();
    mime.eq_ignore_ascii_case(b"application/json")
        || (mime.len() >= 17
            && mime[..12].eq_ignore_ascii_case(b"application/")
            && mime[mime.len() - 5..].eq_ignore_ascii_case(b"+json"))
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
            #[cfg(feature = "tiktoken")]
            Counter::Bpe(_, bpe) => self.tokens(count_bpe(bpe, text, CHUNK)),
        }
    }

    fn tokens(&mut self, tokens: u64) {
        self.tokens = self.tokens.saturating_add(tokens);
    }

    fn total(&self) -> u64 {
        self.tokens.saturating_add(self.chars.div_ceil(4))
    }
}

/// One of OpenAI's BPE tokenizers, whose ranks `tiktoken-rs` builds into the
/// program (feature `tiktoken`; no file or network is read): for
/// [`OpenAiEstimator::tokenizer`].
///
/// ```
/// use tollgate::openai::Tokenizer;
///
/// assert_eq!(Tokenizer::Cl100kBase.count("hello world"), 2);
/// assert_eq!(Tokenizer::O200kBase.count("tiktoken is great!"), 6);
/// assert_eq!(Tokenizer::O200kBase.name(), "o200k_base");
/// ```
#[cfg(feature = "tiktoken")]
#[cfg_attr(docsrs, doc(cfg(feature = "tiktoken")))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Tokenizer {
    /// `cl100k_base`: GPT-4, GPT-3.5 Turbo, `text-embedding-3-*`.
    Cl100kBase,
    /// `o200k_base`: GPT-4o, GPT-4.1, GPT-5 and the `o` series (o1, o3, o4).
    O200kBase,
}

#[cfg(feature = "tiktoken")]
impl Tokenizer {
    /// The encoding's name, as OpenAI's `tiktoken` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Tokenizer::Cl100kBase => "cl100k_base",
            Tokenizer::O200kBase => "o200k_base",
        }
    }

    /// The tokens of `text` as ordinary text: a special token's spelling
    /// counts as the tokens of its characters, as in
    /// [`OpenAiEstimator::tokenizer`]. The first call in a process loads the
    /// ranks (see there).
    pub fn count(self, text: &str) -> u64 {
        count_bpe(self.bpe(), text, CHUNK)
    }

    /// The BPE, loaded on the first call in the process.
    fn bpe(self) -> &'static CoreBPE {
        match self {
            Tokenizer::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
            Tokenizer::O200kBase => tiktoken_rs::o200k_base_singleton(),
        }
    }
}

/// The most bytes of text encoded at once. The BPE's split pattern runs a
/// backtracking regex that fails (and `tiktoken-rs` panics) on a run of some
/// million whitespace characters, which a body within the default
/// `max_body_bytes` can hold; long texts are therefore encoded in pieces.
#[cfg(feature = "tiktoken")]
const CHUNK: usize = 8 * 1024;

/// The tokens of `text` as ordinary text, encoded in pieces of at most
/// `chunk` bytes (at least 4) cut by [`cut`].
#[cfg(feature = "tiktoken")]
fn count_bpe(bpe: &CoreBPE, text: &str, chunk: usize) -> u64 {
    let mut rest = text;
    let mut tokens = 0u64;
    while rest.len() > chunk {
        let at = cut(rest, chunk);
        tokens += bpe.encode_ordinary(&rest[..at]).len() as u64;
        rest = &rest[at..];
    }
    tokens + bpe.encode_ordinary(rest).len() as u64
}

/// Where to cut `text`, longer than `max` bytes (at least 4), at most `max`
/// bytes in: before the last space that follows a character other than
/// whitespace. Both encodings' split patterns always end a piece there (no
/// piece runs from a character other than whitespace into a space, and none
/// looks behind or past the end of the whitespace it takes), so the count is
/// the same as without the cut. A text with no such space in `max` bytes (a
/// run of letters or of whitespace, say) is cut at the last character
/// boundary, which may change its count by a token or so.
#[cfg(feature = "tiktoken")]
fn cut(text: &str, max: usize) -> usize {
    let bytes = text.as_bytes();
    (1..=max)
        .rev()
        .find(|&i| {
            // A space is one byte, so `i` is a character boundary.
            bytes[i] == b' '
                && text[..i]
                    .chars()
                    .next_back()
                    .is_some_and(|c| !c.is_whitespace())
        })
        .or_else(|| (1..=max).rev().find(|&i| text.is_char_boundary(i)))
        .unwrap_or(text.len())
}

/// The fields of a request body the estimate reads; the others are skipped.
#[derive(Default)]
struct Body {
    model: Option<String>,
    prompt: Option<PromptOf>,
    messages: Option<Vec<Message>>,
    /// An embeddings request's input, or a Responses request's.
    input: Option<Input>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    /// The Responses API's bound on the answer.
    max_output_tokens: Option<u32>,
    n: Option<u32>,
    /// llama.cpp's server's bound on the answer, which it reads before
    /// `max_tokens`; a negative one bounds it by the context alone.
    n_predict: Option<i64>,
    /// A Responses request's system message.
    instructions: Option<Content>,
    /// A Messages request's (Anthropic's shape) system prompt: text, or
    /// text blocks.
    system: Option<Content>,
    /// The tools the model may call (chat, Responses and Messages
    /// requests): each definition is text the model reads.
    tools: Option<Value>,
    /// A chat's legacy function definitions, as `tools`.
    functions: Option<Value>,
    /// A completion's text after the insertion, which the model reads.
    suffix: Option<String>,
    /// A completion's candidates generated for each prompt, `n` of them
    /// returned.
    best_of: Option<u32>,
}

/// The keys of a body's top level the estimate reads or a server's answer
/// depends on (`stream`, `stream_options`: whether it streams, and with its
/// usage), in [`Body`]'s order.
const BODY_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "input",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "n_predict",
    "instructions",
    "system",
    "tools",
    "functions",
    "suffix",
    "best_of",
    "stream",
    "stream_options",
];

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = Body;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a request body object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Body, A::Error> {
                let mut body = Body::default();
                let mut keys = Keys::new(BODY_FIELDS);
                while let Some(field) = keys.next(&mut map)? {
                    match field {
                        Some(0) => body.model = map.next_value()?,
                        Some(1) => body.prompt = map.next_value()?,
                        Some(2) => body.messages = map.next_value()?,
                        Some(3) => body.input = map.next_value()?,
                        Some(4) => body.max_tokens = map.next_value()?,
                        Some(5) => body.max_completion_tokens = map.next_value()?,
                        Some(6) => body.max_output_tokens = map.next_value()?,
                        Some(7) => body.n = map.next_value()?,
                        Some(8) => body.n_predict = map.next_value()?,
                        Some(9) => body.instructions = map.next_value()?,
                        Some(10) => body.system = map.next_value()?,
                        Some(11) => body.tools = map.next_value()?,
                        Some(12) => body.functions = map.next_value()?,
                        Some(13) => body.suffix = map.next_value()?,
                        Some(14) => body.best_of = map.next_value()?,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(body)
            }
        }
        d.deserialize_map(Fields)
    }
}

/// Reads the keys of an object the estimate reads: each of `names` at most
/// once, and none that differs from one of them only in case.
///
/// Go's `encoding/json` (Ollama's server, and other Go servers) matches an
/// object's keys to a struct's fields without regard to case, the last
/// match winning, and folds the Kelvin sign `K` (U+212A) to `k` and the
/// long `ſ` (U+017F) to `s` as well: to it `{"model":"a","Model":"b"}`
/// names `b`. Python's and Rust's servers read the exact names alone. A
/// key that one server reads as a field and another skips is refused, so
/// that every server reads the fields the estimate read.
struct Keys {
    names: &'static [&'static str],
    /// The fields seen so far, a bit each.
    seen: u32,
}

impl Keys {
    fn new(names: &'static [&'static str]) -> Self {
        debug_assert!(names.len() <= 32);
        Keys { names, seen: 0 }
    }

    /// The next key of `map`: `Some(Some(i))` for `names[i]`, `Some(None)`
    /// for another, whose value the caller skips; `None` at the object's
    /// end.
    fn next<'de, A: MapAccess<'de>>(
        &mut self,
        map: &mut A,
    ) -> Result<Option<Option<usize>>, A::Error> {
        let key = map.next_key_seed(KeyOf(self.names))?;
        if let Some(Some(i)) = key {
            if self.seen & (1 << i) != 0 {
                return Err(<A::Error as de::Error>::duplicate_field(self.names[i]));
            }
            self.seen |= 1 << i;
        }
        Ok(key)
    }

    /// Whether `names[i]` was seen.
    fn has(&self, i: usize) -> bool {
        self.seen & (1 << i) != 0
    }
}

/// Reads a key as the index of the name in the slice it is, without
/// keeping the key: `None` for a key that is none of them.
struct KeyOf(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeyOf {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeyOf {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        if let Some(i) = self.0.iter().position(|&name| name == key) {
            return Ok(Some(i));
        }
        match self.0.iter().find(|&&name| folds_to(key, name)) {
            Some(name) => Err(E::custom(format_args!(
                "the request body's key `{key}` differs from `{name}` only in case, \
                 and servers disagree on whether it is `{name}`: spell it `{name}`"
            ))),
            None => Ok(None),
        }
    }
}

/// Whether Go's `encoding/json` takes `key` for the field `name` (ASCII,
/// lower case): the same letters whatever their case, with the Kelvin sign
/// for `k` and the long `ſ` for `s` (the only characters outside ASCII
/// that Unicode's simple case folding maps to an ASCII letter).
fn folds_to(key: &str, name: &str) -> bool {
    let mut name = name.bytes();
    for c in key.chars() {
        let c = match c {
            '\u{212A}' => 'k',
            '\u{17F}' => 's',
            c => c.to_ascii_lowercase(),
        };
        if name.next().map(char::from) != Some(c) {
            return false;
        }
    }
    name.next().is_none()
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    /// Text, texts or token ids, as a completion's prompt.
    Prompt(Prompt),
    /// A Responses request's items: messages, whose content is text or
    /// parts.
    Items(Vec<Message>),
}

/// A body's `prompt`.
#[derive(Deserialize)]
#[serde(untagged)]
enum PromptOf {
    /// A completion's: text, texts or token ids.
    Completion(Prompt),
    /// The Responses API's: a reference to a prompt template.
    Template(Template),
}

/// A prompt template stored at OpenAI, by its `id` (and `version`), with
/// the `variables` that fill it in.
struct Template {
    variables: Option<std::collections::BTreeMap<String, Variable>>,
}

impl<'de> Deserialize<'de> for Template {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = Template;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a prompt template")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Template, A::Error> {
                let mut template = Template { variables: None };
                let mut keys = Keys::new(&["id", "variables"]);
                while let Some(field) = keys.next(&mut map)? {
                    match field {
                        Some(1) => template.variables = map.next_value()?,
                        // The id, required as OpenAI requires it, of no
                        // use to the estimate; or another field.
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                if !keys.has(0) {
                    return Err(<A::Error as de::Error>::missing_field("id"));
                }
                Ok(template)
            }
        }
        d.deserialize_map(Fields)
    }
}

/// A template variable's value: text, or an input part (`input_text`,
/// `input_image`, `input_file`).
#[derive(Deserialize)]
#[serde(untagged)]
enum Variable {
    Text(String),
    Part(Part),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// A chat's message, or a Responses request's item.
struct Message {
    content: Option<Content>,
    /// An assistant turn's calls of tools (`tool_calls`), each read as
    /// the model wrote it: `{"function":{"name":…,"arguments":…}}`.
    tool_calls: Option<Value>,
    /// An assistant turn's legacy call (`{"name":…,"arguments":…}`).
    function_call: Option<Value>,
}

impl<'de> Deserialize<'de> for Message {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = Message;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message, A::Error> {
                let mut message = Message {
                    content: None,
                    tool_calls: None,
                    function_call: None,
                };
                let mut keys = Keys::new(&["content", "tool_calls", "function_call"]);
                while let Some(field) = keys.next(&mut map)? {
                    match field {
                        Some(0) => message.content = map.next_value()?,
                        Some(1) => message.tool_calls = map.next_value()?,
                        Some(_) => message.function_call = map.next_value()?,
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(message)
            }
        }
        d.deserialize_map(Fields)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// A content part: its `type` and, of a text part, its `text`.
struct Part {
    kind: String,
    text: Option<String>,
}

impl<'de> Deserialize<'de> for Part {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = Part;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a content part")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Part, A::Error> {
                let (mut kind, mut text) = (None, None);
                let mut keys = Keys::new(&["type", "text"]);
                while let Some(field) = keys.next(&mut map)? {
                    match field {
                        Some(0) => kind = Some(map.next_value::<String>()?),
                        Some(_) => text = map.next_value()?,
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                let kind = kind.ok_or_else(|| <A::Error as de::Error>::missing_field("type"))?;
                Ok(Part { kind, text })
            }
        }
        d.deserialize_map(Fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The estimate of `body` (see [`with_model`]).
    fn tokens(body: &str) -> u32 {
        OpenAiEstimator::new()
            .estimate_json(with_model(body).as_bytes())
            .unwrap()
            .tokens
    }

    /// `body` with `"model":"m"` first, unless it names a model.
    fn with_model(body: &str) -> String {
        if body.contains(r#""model""#) {
            return body.to_owned();
        }
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
            2 + 100 * 3,
            "the larger of max_completion_tokens and max_tokens"
        );
        assert_eq!(e.model.as_deref(), Some("gpt-x"));
        let images = OpenAiEstimator::new().other_part_tokens(85);
        assert_eq!(
            images.estimate_json(body.as_bytes()).unwrap().tokens,
            2 + 85 + 300
        );
    }

    #[test]
    fn an_input_is_counted_as_a_prompt_with_one_answer() {
        // Embeddings' shapes: a string, strings, token ids, lists of them.
        assert_eq!(tokens(r#"{"input":"abcdefgh","max_tokens":0}"#), 2);
        assert_eq!(
            tokens(r#"{"input":["abcd","efgh"]}"#),
            2 + DEFAULT_MAX_TOKENS
        );
        assert_eq!(tokens(r#"{"input":[[1,2],[3]],"max_tokens":0}"#), 3);
        // A Responses request: items as messages, `input_text` parts as
        // text, `max_output_tokens` for the answer.
        let body = r#"{"input":[
            {"role":"system","content":"abcd"},
            {"role":"user","content":[{"type":"input_text","text":"efgh"},{"type":"input_image","image_url":"x"}]},
            {"type":"function_call_output","call_id":"c","output":"ignored"}
        ],"max_output_tokens":9}"#;
        assert_eq!(tokens(body), 2 + 9);
        // A body with several counts them all: 2 + 8 characters.
        assert_eq!(
            tokens(r#"{"prompt":"ab","input":"abcdefgh","max_tokens":0}"#),
            3
        );
    }

    #[test]
    fn a_stray_prompt_beside_messages_does_not_hide_them() {
        // A chat server reads the messages and may ignore the `prompt`:
        // both are counted, 0 + 16 characters, so the estimate covers them.
        let body = r#"{"prompt":"","messages":[{"role":"user","content":"abcdefghijklmnop"}],"max_tokens":0}"#;
        assert_eq!(tokens(body), 4);
        // And a completion's prompts still set how many answers it asks for.
        let body = r#"{"prompt":["ab","cd"],"messages":[{"content":"efgh"}],"max_tokens":3}"#;
        assert_eq!(tokens(body), 2 + 3 * 2);
    }

    #[test]
    fn a_completions_suffix_and_best_of_are_counted() {
        // The suffix is text the model reads (after its insertion): prompt
        // "abcd" and suffix "efgh", 2 tokens.
        assert_eq!(
            tokens(r#"{"prompt":"abcd","suffix":"efgh","max_tokens":0}"#),
            2
        );
        // `best_of` candidates are generated (and billed) for each prompt,
        // `n` of them returned: the answers are the larger of the two.
        assert_eq!(
            tokens(r#"{"prompt":"abcd","best_of":3,"max_tokens":5}"#),
            1 + 15
        );
        assert_eq!(
            tokens(r#"{"prompt":["abcd","efgh"],"best_of":3,"n":2,"max_tokens":5}"#),
            2 + 2 * 15
        );
        assert_eq!(
            tokens(r#"{"prompt":"abcd","best_of":1,"n":2,"max_tokens":5}"#),
            1 + 10
        );
        assert_eq!(
            tokens(r#"{"prompt":"abcd","best_of":null,"suffix":null,"max_tokens":5}"#),
            1 + 5
        );
    }

    #[test]
    fn tool_definitions_and_calls_are_prompt_text() {
        // A tool's definition is rendered into the prompt the model reads
        // (OpenAI counts it as prompt tokens, vLLM's chat templates write it
        // out): its JSON, written compactly, counts as text, each tool's
        // apart; so do a call's name and arguments in an assistant turn.
        let tool = r#"{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}"#;
        let chars = tool.chars().count();
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":"abcd"}}],"tools":[{tool}, {tool}],"tool_choice":"auto","max_tokens":0}}"#
        );
        assert_eq!(tokens(&body) as usize, (4 + 2 * chars).div_ceil(4));
        // Pretty-printed, it counts the same.
        let pretty = body.replace(r#"{"type":"object"}"#, "{\n   \"type\" :  \"object\"\n}");
        assert_eq!(tokens(&pretty), tokens(&body));
        // The legacy `functions` are the definitions alone.
        let body = r#"{"messages":[{"role":"user","content":"abcd"}],"functions":[{"name":"f","parameters":{"type":"object"}}],"max_tokens":0}"#;
        assert_eq!(
            tokens(body) as usize,
            (4 + r#"{"name":"f","parameters":{"type":"object"}}"#.len()).div_ceil(4)
        );
        // "get" + "{\"c\":1}" (7) + "h" + "{}", beside "abcd": 17 characters.
        let body = r#"{"messages":[
            {"role":"user","content":"abcd"},
            {"role":"assistant","content":null,"tool_calls":[
                {"id":"c1","type":"function","function":{"name":"get","arguments":"{\"c\":1}"}}]},
            {"role":"assistant","content":null,"function_call":{"name":"h","arguments":"{}"}},
            {"role":"tool","tool_call_id":"c1","content":"sunny"}
        ],"max_tokens":0}"#;
        assert_eq!(tokens(body), (17 + 5_u32).div_ceil(4));
        // Shapes other servers send are counted, not refused: arguments as
        // an object (Ollama's), a custom tool's input, nulls.
        let body = r#"{"messages":[{"role":"assistant","tool_calls":[
                {"function":{"name":"get","arguments":{"c":1}}},
                {"type":"custom","custom":{"name":"sh","input":"ls"}},
                {"function":null}, 7],
            "function_call":null}],"tools":null,"functions":null,"max_tokens":0}"#;
        assert_eq!(tokens(body), (3 + 7 + 2 + 2_u32).div_ceil(4));
        // A custom counter counts each text apart.
        let words = OpenAiEstimator::new().count_tokens(|_| 1);
        let body = with_model(&format!(
            r#"{{"messages":[{{"content":"a","tool_calls":[{{"function":{{"name":"g","arguments":"{{}}"}}}}]}}],"tools":[{tool}],"max_tokens":0}}"#
        ));
        assert_eq!(words.estimate_json(body.as_bytes()).unwrap().tokens, 4);
        // A key that differs from one of these only in case is refused, as
        // for the other fields the estimate reads.
        for body in [
            r#"{"messages":[],"tools":[],"Tools":[{"a":1}]}"#,
            r#"{"messages":[{"content":"a","tool_calls":[],"Tool_Calls":[]}]}"#,
        ] {
            assert!(
                OpenAiEstimator::new()
                    .estimate_json(with_model(body).as_bytes())
                    .is_err(),
                "{body}"
            );
        }
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

    /// The estimate the layer makes of `body` posted to `path`.
    fn posted(path: &str, body: &str) -> Result<Estimate, BodyError> {
        let (method, uri) = (Method::POST, path.parse().unwrap());
        let (headers, extensions) = (http::HeaderMap::new(), http::Extensions::new());
        let req = RequestView {
            method: &method,
            uri: &uri,
            headers: &headers,
            extensions: &extensions,
        };
        OpenAiEstimator::new().estimate_body(&req, body.as_bytes())
    }

    #[test]
    fn a_responses_prompt_template_is_its_variables_input_and_answer() {
        // The template's own text is stored at OpenAI, out of sight: what
        // the request brings is counted, its string variables ("Ada",
        // "abcdefghijklm") and text parts ("wxyz"), its input ("abcd"):
        // 24 characters, 6 tokens; an image counts what other parts do
        // (0 by default); and the answer's bound, 50.
        let body = r#"{"model":"m","prompt":{"id":"pmpt_abc","version":"2","variables":{
            "name":"Ada","topic":"abcdefghijklm",
            "doc":{"type":"input_text","text":"wxyz"},
            "logo":{"type":"input_image","image_url":"https://example.com/a.png"}
        }},"input":"abcd","max_output_tokens":50}"#;
        let e = posted("/v1/responses", body).unwrap();
        assert_eq!((e.tokens, e.model.as_deref()), (6 + 50, Some("m")));
        // A template alone, without variables, and naming no model (the
        // template names one): its answer, and the plan's `"*"` limits.
        let body = r#"{"prompt":{"id":"pmpt_abc"},"max_output_tokens":20}"#;
        let e = posted("/v1/responses/", body).unwrap();
        assert_eq!((e.tokens, e.model), (20, None));
        let body = r#"{"prompt":{"id":"pmpt_abc","variables":null}}"#;
        assert_eq!(
            posted("/v1/responses", body).unwrap().tokens,
            DEFAULT_MAX_TOKENS
        );
        // A template needs its id; a variable is text or an input part.
        for body in [
            r#"{"model":"m","prompt":{"version":"2"}}"#,
            r#"{"model":"m","prompt":{"id":"pmpt_abc","variables":{"n":7}}}"#,
            r#"{"model":"m","prompt":{"id":"pmpt_abc","variables":["a"]}}"#,
        ] {
            assert!(posted("/v1/responses", body).is_err(), "{body}");
        }
        // Without a template, a Responses request still names its model.
        assert!(posted("/v1/responses", r#"{"input":"abcd"}"#).is_err());
    }

    #[test]
    fn a_prompt_template_is_refused_on_other_routes() {
        // Completions take text or token ids as `prompt`, and no other
        // route takes a template: such a body is refused, as its server
        // would refuse it.
        let body = r#"{"model":"m","prompt":{"id":"pmpt_abc","variables":{"a":"b"}}}"#;
        for path in [
            "/v1/completions",
            "/v1/chat/completions",
            "/v1/embeddings",
            "/v1/responses/resp_1/cancel",
            "/v1/other",
        ] {
            let e = posted(path, body).unwrap_err();
            assert!(
                e.message().contains("prompt template"),
                "{path}: {}",
                e.message()
            );
        }
        assert!(
            OpenAiEstimator::new()
                .estimate_json(body.as_bytes())
                .is_err()
        );
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
            br#"{"model":"","prompt":"abc"}"#,
            b"\xff\xfe",
        ] {
            let err = e.estimate_json(body).unwrap_err();
            assert!(!err.message().is_empty());
        }
        assert!(
            e.estimate_json(br#"{"model":"m"}"#)
                .unwrap_err()
                .message()
                .contains("none of `prompt`, `messages` and `input`")
        );
        assert!(
            e.estimate_json(br#"{"prompt":"abc"}"#)
                .unwrap_err()
                .message()
                .contains("`model`")
        );
    }

    /// The `tiktoken` counter: OpenAI's BPE through `tiktoken-rs`.
    #[cfg(feature = "tiktoken")]
    mod tiktoken {
        use proptest::prelude::*;
        use proptest::test_runner::Config;

        use super::super::*;

        const BOTH: [Tokenizer; 2] = [Tokenizer::Cl100kBase, Tokenizer::O200kBase];

        fn estimate(tokenizer: Tokenizer, body: &str) -> u32 {
            OpenAiEstimator::new()
                .tokenizer(tokenizer)
                .estimate_json(super::with_model(body).as_bytes())
                .unwrap()
                .tokens
        }

        #[test]
        fn the_ranks_are_openais() {
            // Token ids published with OpenAI's `tiktoken` and its cookbook.
            let cl100k = tiktoken_rs::cl100k_base_singleton();
            let o200k = tiktoken_rs::o200k_base_singleton();
            assert_eq!(cl100k.encode_ordinary("hello world"), [15339, 1917]);
            assert_eq!(o200k.encode_ordinary("hello world"), [24912, 2375]);
            assert_eq!(
                cl100k.encode_ordinary("tiktoken is great!"),
                [83, 1609, 5963, 374, 2294, 0]
            );
            for t in BOTH {
                assert_eq!(t.count("hello world"), 2, "{t:?}");
                assert_eq!(t.count("tiktoken is great!"), 6, "{t:?}");
                assert_eq!(t.count(""), 0, "{t:?}");
            }
            assert_eq!(Tokenizer::Cl100kBase.count("You are terse."), 4);
            assert_eq!(
                Tokenizer::O200kBase.count("Summarise the following in one sentence."),
                9
            );
        }

        #[test]
        fn non_ascii_text_counts_its_bytes_merges() {
            let cases = [
                ("Grüße aus Köln, naïve café", 10, 9),
                ("你好，世界", 6, 3),
                ("日本語のテキスト", 8, 6),
                // An emoji of four bytes no merge covers: three tokens each.
                ("🦀🦀", 6, 6),
            ];
            for (text, cl100k, o200k) in cases {
                assert_eq!(Tokenizer::Cl100kBase.count(text), cl100k, "{text}");
                assert_eq!(Tokenizer::O200kBase.count(text), o200k, "{text}");
            }
        }

        #[test]
        fn special_tokens_in_text_are_ordinary_text() {
            // Encoded as a special token, "<|endoftext|>" would be 1 token:
            // here it is the 7 ordinary tokens of its characters.
            let cl100k = tiktoken_rs::cl100k_base_singleton();
            assert_eq!(cl100k.encode_with_special_tokens("<|endoftext|>").len(), 1);
            for t in BOTH {
                assert_eq!(t.count("<|endoftext|>"), 7, "{t:?}");
                for special in ["<|fim_prefix|>", "<|endofprompt|>", "<|im_start|>"] {
                    assert!(t.count(special) > 1, "{t:?} {special}");
                }
            }
            let body = r#"{"prompt":"Say hi <|endoftext|> twice","max_tokens":5}"#;
            assert_eq!(estimate(Tokenizer::Cl100kBase, body), 9 + 5);
            assert_eq!(estimate(Tokenizer::O200kBase, body), 10 + 5);
        }

        #[test]
        fn a_chat_is_its_texts_tokens_and_its_maximum() {
            let body = r#"{"model":"gpt-4o","messages":[
                {"role":"system","content":"You are terse."},
                {"role":"user","content":[
                    {"type":"text","text":"Write a haiku about rate limits."},
                    {"type":"image_url","image_url":{"url":"x"}},
                    {"type":"text","text":"你好，世界"}
                ]},
                {"role":"assistant","content":"Rate limits keep services fair."},
                {"role":"assistant","content":null,"tool_calls":[]}
            ],"max_tokens":100,"n":2}"#;
            for t in BOTH {
                let texts = [
                    "You are terse.",
                    "Write a haiku about rate limits.",
                    "你好，世界",
                    "Rate limits keep services fair.",
                ];
                let prompt: u64 = texts.iter().map(|s| t.count(s)).sum();
                assert_eq!(u64::from(estimate(t, body)), prompt + 200, "{t:?}");
            }
            // Counted by hand from the token ids: 4 + 8 + 6 + 6 and 4 + 8 + 3 + 6.
            assert_eq!(estimate(Tokenizer::Cl100kBase, body), 24 + 200);
            assert_eq!(estimate(Tokenizer::O200kBase, body), 21 + 200);
            // Images still count what `other_part_tokens` says.
            let images = OpenAiEstimator::new()
                .tokenizer(Tokenizer::O200kBase)
                .other_part_tokens(85);
            assert_eq!(
                images.estimate_json(body.as_bytes()).unwrap().tokens,
                21 + 85 + 200
            );
            // A completion's prompts, each answered.
            let body = r#"{"prompt":["hello world","tiktoken is great!"],"max_tokens":3}"#;
            assert_eq!(estimate(Tokenizer::O200kBase, body), 2 + 6 + 2 * 3);
        }

        #[test]
        fn the_last_counter_set_counts() {
            let body = r#"{"model":"m","prompt":"tiktoken is great!","max_tokens":0}"#.as_bytes();
            let words = OpenAiEstimator::new()
                .tokenizer(Tokenizer::O200kBase)
                .count_tokens(|s| s.split_whitespace().count() as u32);
            assert_eq!(words.estimate_json(body).unwrap().tokens, 3);
            let bpe = words.tokenizer(Tokenizer::Cl100kBase);
            assert_eq!(bpe.estimate_json(body).unwrap().tokens, 6);
            assert!(format!("{bpe:?}").contains("cl100k_base"));
            // The default is unchanged: ceil(18 / 4).
            assert_eq!(
                OpenAiEstimator::new().estimate_json(body).unwrap().tokens,
                5
            );
        }

        #[test]
        fn a_million_spaces_are_counted_without_a_panic() {
            // Whole, tiktoken-rs's split pattern fails on a run of 999,999
            // whitespace characters (a panic); in pieces it is counted, as
            // whole it would be: 128 spaces a token, and the "x". (Some 2 s
            // in a debug build.)
            let text = " ".repeat(1_000_000) + "x";
            let n = Tokenizer::O200kBase.count(&text);
            assert!((7_813..=7_820).contains(&n), "{n}");
        }

        #[test]
        fn a_million_tabs_are_counted_without_a_panic() {
            let text = "\t".repeat(1_000_000) + "x";
            let n = Tokenizer::Cl100kBase.count(&text);
            assert!((1..=1_000_001).contains(&n), "{n}");
        }

        /// The cuts `count_bpe` makes in `text`, each with whether it is
        /// before a space that follows a character other than whitespace.
        fn cuts(text: &str, chunk: usize) -> Vec<(usize, bool)> {
            let mut out = Vec::new();
            let mut at = 0;
            while text.len() - at > chunk {
                let rest = &text[at..];
                let c = cut(rest, chunk);
                assert!(c > 0 && c <= chunk && rest.is_char_boundary(c));
                let exact = rest.as_bytes()[c] == b' '
                    && rest[..c]
                        .chars()
                        .next_back()
                        .is_some_and(|c| !c.is_whitespace());
                at += c;
                out.push((at, exact));
            }
            out
        }

        #[test]
        fn cuts_before_a_space_after_text_keep_the_count() {
            let texts = [
                "The quick brown fox jumps over the lazy dog. It's 12345 o'clock, isn't it?",
                "fn main() {\n    let x = vec![1, 2, 3];\n    println!(\"{x:?}\");\n}\n",
                r#"{"a": [1, 2.5, "three"], "b": {"c": null, "d": true}}"#,
                "Mixed  double  spaces,\ttabs\t and\r\n CRLF  \n  lines   end  ",
                "Grüße aus Köln — naïve café, 東京 と 大阪, 🦀 rust 🦀 crab",
                "a/b /c ./d '(e)' \"f\" #g @h $i %j ^k &l *m",
            ];
            for t in BOTH {
                let bpe = t.bpe();
                for text in texts {
                    let whole = bpe.encode_ordinary(text).len() as u64;
                    for chunk in [8, 13, 32] {
                        let cuts = cuts(text, chunk);
                        if cuts.iter().all(|&(_, exact)| exact) {
                            assert_eq!(
                                count_bpe(bpe, text, chunk),
                                whole,
                                "{t:?} {chunk} {text:?}"
                            );
                        }
                    }
                    // Short enough for no cut at all.
                    assert_eq!(t.count(text), whole);
                }
            }
        }

        /// Texts of words (letters, digits, punctuation, accents, CJK,
        /// emoji) between runs of whitespace, mostly single spaces.
        fn texts() -> impl Strategy<Value = String> {
            let word = "[a-zA-Z0-9.,;:'\"()/_é東京🦀-]{1,6}";
            let gap = prop_oneof![
                6 => Just(" "),
                1 => Just("  "),
                1 => Just("\t"),
                1 => Just(" \n"),
                1 => Just("\r\n "),
                1 => Just("\u{a0}"),
                1 => Just(" \u{3000}"),
                1 => Just(""),
            ];
            prop::collection::vec((word, gap), 0..30)
                .prop_map(|parts| parts.into_iter().map(|(w, g)| w + g).collect())
        }

        proptest! {
            #![proptest_config(Config { failure_persistence: None, ..Config::default() })]

            #[test]
            fn exact_cuts_never_change_the_count(text in texts(), chunk in 4usize..40) {
                for t in BOTH {
                    let bpe = t.bpe();
                    let whole = bpe.encode_ordinary(&text).len() as u64;
                    let cuts = cuts(&text, chunk);
                    let counted = count_bpe(bpe, &text, chunk);
                    let hard = cuts.iter().filter(|&&(_, exact)| !exact).count() as u64;
                    if hard == 0 {
                        prop_assert_eq!(counted, whole, "{:?} {:?}", t, cuts);
                    } else {
                        // A cut inside a piece adds a token or so.
                        prop_assert!(counted.abs_diff(whole) <= 2 * hard, "{:?} {:?}", t, cuts);
                    }
                }
            }
        }
    }
}
