//! Upstream mode: `/v1/*` forwarded to an OpenAI-compatible backend (vLLM,
//! llama.cpp server, Ollama, TGI) behind the same limits as the mock; see
//! [`Upstream`].

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream::Stream;
use tollgate::TokenUsage;
use tollgate::cost::{BodyError, CostEstimator, Estimate};
use tollgate::extract::RequestView;
use tollgate::openai::OpenAiEstimator;

use crate::idle::Stall;

/// The largest request body read to ask for the usage (the layer's own
/// bound on the bodies it reads).
const MAX_REQUEST_BODY: usize = 1024 * 1024;

/// How much of a non-streamed JSON answer is kept aside whole, to read its
/// `usage` at the end.
const MAX_JSON_ANSWER: usize = 1024 * 1024;

/// Of a longer JSON answer (embeddings of many inputs), only its last bytes
/// are kept, where OpenAI-compatible servers put `usage`; the memory an
/// answer holds stays bounded, whatever its size. Without a `usage` there,
/// the estimate stands.
const JSON_TAIL: usize = 64 * 1024;

/// How long one server-sent event may grow without its blank line before it
/// is passed on unread.
const MAX_EVENT: usize = 1024 * 1024;

/// The backend `/v1/*` is forwarded to, and how.
///
/// - Answers stream back as they come, a piece at a time: nothing is read
///   from the backend faster than the client takes it, and when the client
///   goes away the backend's response is dropped, which closes its
///   connection and cancels the generation.
/// - Tokens are settled from the backend's `usage`: a non-streamed JSON
///   answer's `usage.total_tokens`, read as it passes; a stream's usage
///   chunk, which the gateway asks for (`stream_options.include_usage`) when
///   the client did not (turning vLLM's `continuous_usage_stats`, which
///   it reads only beside it, off), and then removes from what the client
///   sees, with the `"usage": null` the backend then puts on every other
///   chunk (also where a backend sends it unasked). A chunk with choices is
///   never removed, whatever it carries (older llama.cpp servers put the
///   usage on the finish chunk), nor one the client asked for; llama.cpp's
///   `timings`, which it puts on its last chunk, leave with the usage
///   chunk the gateway asked for. A stream that ends without one (the
///   client left, before the backend's first byte too, the backend failed
///   or ignores `include_usage`) is charged its prompt as the layer
///   estimated it plus one token for each chunk that carried generated
///   output (text, reasoning, a refusal, tool call arguments). Error events
///   in a stream (vLLM's and llama.cpp's `{"error":…}`, TGI's
///   `{"error":…,"error_type":…}`) pass as any other. A streamed Responses
///   API answer is settled from the usage of its `response.completed` event
///   (or its input and one token per text delta). A whole non-streamed
///   completion or chat completion without a `usage` is charged as a stream
///   without one: its prompt as the layer estimated it plus the tokens of
///   the text it generated (content, reasoning, a refusal, tool call names
///   and arguments), counted as the estimate counts a prompt. A
///   non-streamed answer whose client leaves before the backend's first
///   byte is charged its prompt as the layer estimated it (the client got
///   nothing, and what the backend generated before it was stopped is not
///   known); one left after its head is settled from the `usage` passed on
///   by then, else keeps its estimate (it was produced whole). Any other
///   success without a usage (embeddings, a body that is not JSON) keeps
///   its estimate.
/// - Completion, chat completion, Responses, embeddings and Messages bodies
///   are read before the decision, for their estimate and their model's
///   limits; one that is not JSON is refused whatever its `content-type`. A usage without `total_tokens` (the Messages API's) is its
///   input plus its output.
/// - Every other body (a file upload, an audio transcription's) streams to
///   the backend as it comes, once the request is admitted: the gateway
///   holds only what is in flight, never the whole body, so it sets no
///   bound on its length (the backend's own apply); one that sends nothing
///   for the body timeout is cut off and answered 408.
/// - The backend's errors pass through, status and body, and cost what their
///   `usage` says (nothing without one); its redirects pass through
///   unfollowed. A backend that cannot be reached is a 502, one that does
///   not answer within the timeout a 504, both with an OpenAI-style
///   `{"error":{..}}` body, and both cost no tokens.
/// - The client's key (`Authorization`, `x-api-key`) is never forwarded, nor
///   are hop-by-hop headers; the gateway sends its own credential when one
///   is configured. The backend's `ratelimit*` and `x-ratelimit-*` headers
///   are dropped: the client sees the gateway's limits.
#[derive(Clone)]
pub struct Upstream {
    /// `scheme://host[:port][/prefix]`, without a trailing `/` or `/v1`.
    base: String,
    /// `Bearer KEY`, marked sensitive.
    key: Option<HeaderValue>,
    timeout: Duration,
    connect_timeout: Duration,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.base)
            .field("key", &self.key.as_ref().map(|_| "<set>"))
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl Upstream {
    /// The backend at `url` (`http://host:port`, with or without a trailing
    /// `/v1`; a path prefix is kept), with no credential and the default
    /// timeouts. The error says what is wrong with the URL.
    pub fn new(url: &str) -> Result<Upstream, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!("`{url}`: the scheme must be http or https"));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(format!("`{url}` names no host"));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            // Not echoed: it holds a secret.
            return Err(
                "the URL carries a user or password: give the backend's key with \
                 TOLLGATE_UPSTREAM_KEY or --upstream-key instead"
                    .to_owned(),
            );
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(format!("`{url}`: a query or fragment has no place here"));
        }
        if parsed.scheme() == "https" && !cfg!(feature = "tls") {
            return Err(format!(
                "`{url}`: this build has no TLS; build it with `--features tls` \
                 (cargo install --path gateway --features tls)"
            ));
        }
        let path = parsed.path().trim_end_matches('/');
        let path = path.strip_suffix("/v1").unwrap_or(path);
        Ok(Upstream {
            base: format!("{}{path}", parsed.origin().ascii_serialization()),
            key: None,
            timeout: crate::cli::DEFAULT_UPSTREAM_TIMEOUT,
            connect_timeout: crate::cli::DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
        })
    }

    /// Sends the backend `Authorization: Bearer KEY`. The error (an empty
    /// key, or one that cannot be a header) does not repeat the key.
    pub fn key(mut self, key: &str) -> Result<Upstream, String> {
        if key.is_empty() {
            return Err("the key is empty".to_owned());
        }
        let mut value = HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| "the key must be visible ASCII characters".to_owned())?;
        value.set_sensitive(true);
        self.key = Some(value);
        Ok(self)
    }

    /// Whether a credential is set.
    pub fn has_key(&self) -> bool {
        self.key.is_some()
    }

    /// How long the backend may take to start answering (504 beyond), and to
    /// send the next piece of an answer (cut off beyond).
    pub fn timeout(mut self, timeout: Duration) -> Upstream {
        self.timeout = timeout;
        self
    }

    /// How long connecting to the backend may take (502 beyond).
    pub fn connect_timeout(mut self, timeout: Duration) -> Upstream {
        self.connect_timeout = timeout;
        self
    }

    /// Where `/v1/…` goes: this, then the request's path and query.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The forwarder the routes share.
    pub(crate) fn forwarder(&self) -> Arc<Forwarder> {
        let client = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .read_timeout(self.timeout)
            // Prompts go to the backend named, never through a proxy the
            // environment happens to set.
            .no_proxy()
            // A redirect is the backend's answer to the client, passed on
            // as any other: following it would send the request, and the
            // gateway's credential, where the client never asked.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client without system configuration to read builds");
        Arc::new(Forwarder {
            client,
            upstream: self.clone(),
            prompt: OpenAiEstimator::new().default_max_tokens(0),
        })
    }
}

/// What forwarding needs: the client (its connection pool) and the backend.
pub(crate) struct Forwarder {
    client: reqwest::Client,
    upstream: Upstream,
    /// The layer's estimate without the answer's allowance: a prompt's tokens.
    prompt: OpenAiEstimator,
}

/// Whether `path` may be forwarded: under `/v1/`, with no empty, `.` or
/// `..` segment, no backslash, and no percent-encoded slash, backslash,
/// control character or unreserved character (a letter, digit, `-`, `.`,
/// `_` or `~`). The backend's URL is built from the path as it came, and an
/// HTTP client or server resolves dot segments and decodes escapes before
/// it routes: `/v1/../api/delete` would reach the backend's `/api/delete`
/// with the gateway's own credential, and `/v1/x/../chat/completions`,
/// `/v1/chat/complet%69ons` or `/v1/chat/completions%0A` (Starlette's
/// route pattern ends in Python's `$`, which matches before a last newline)
/// a completion the layer did not estimate, past its route's limits.
/// Nothing needs an unreserved or a control character escaped in a path.
///
/// One encoded slash is taken: in a model's name under `/v1/models/`,
/// where OpenAI's SDKs send `org/model` (a Hugging Face name, as vLLM
/// serves them) as `org%2Fmodel`. Decoded, such a path stays under
/// `/v1/models/` as long as no part of the name between slashes, encoded
/// or not, is empty, `.` or `..`, which is checked as for the path.
fn forwardable(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/v1/") else {
        return false;
    };
    if rest.contains('\\') {
        return false;
    }
    let model = rest.starts_with("models/");
    let escaped = rest.split('%').skip(1).filter_map(|after| {
        after
            .get(..2)
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
    });
    for byte in escaped {
        if byte.is_ascii_alphanumeric()
            || byte.is_ascii_control()
            || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'\\')
            || (byte == b'/' && !model)
        {
            return false;
        }
    }
    let part = |p: &str| !p.is_empty() && p != "." && p != "..";
    rest.split('/').all(|seg| {
        if model {
            seg.split("%2F").flat_map(|p| p.split("%2f")).all(part)
        } else {
            part(seg)
        }
    })
}

/// Whether a request is a completion or chat completion, whose body is read
/// and may be asked for its usage.
fn is_completion(method: &Method, path: &str) -> bool {
    *method == Method::POST && matches!(path, "/v1/completions" | "/v1/chat/completions")
}

/// Whether a request's body is read for its estimate and its model: a
/// completion's, a chat completion's, a Responses, an embeddings or a
/// Messages request's (Anthropic's shape, which vLLM, llama.cpp's server and
/// Ollama serve beside OpenAI's): the JSON bodies that name a model.
fn is_estimated(method: &Method, path: &str) -> bool {
    is_completion(method, path)
        || (*method == Method::POST
            && matches!(path, "/v1/responses" | "/v1/embeddings" | "/v1/messages"))
}

/// The OpenAI estimate for completion, chat completion, Responses,
/// embeddings and Messages bodies, which also names the model whose limits
/// apply; other requests (models, files, …) are estimated from their head
/// (0) and settled from the answer's `usage` when it has one.
pub(crate) struct UpstreamEstimator(pub(crate) OpenAiEstimator);

impl CostEstimator for UpstreamEstimator {
    fn estimate(&self, req: &RequestView<'_>) -> u32 {
        self.0.estimate(req)
    }

    fn reads_body(&self, req: &RequestView<'_>) -> bool {
        is_estimated(req.method, req.uri.path())
    }

    /// The same bodies under every plan: such a body that is not OpenAI
    /// JSON is a 400 that costs nothing, also under a plan without a token
    /// budget, instead of a request charged and then refused by the
    /// backend; and its model's limits apply under every plan.
    fn checks_body(&self, req: &RequestView<'_>) -> bool {
        self.reads_body(req)
    }

    /// A body that is not JSON is refused whatever its `content-type`
    /// says: the OpenAI estimate reads one that says it is something else
    /// from its head (no tokens, no model), but these routes take JSON
    /// alone, and llama.cpp's server and Ollama parse their bodies as JSON
    /// whatever their type, accepting what the estimate cannot read (a
    /// byte-order mark; bytes that are not UTF-8 or a lone surrogate in a
    /// string), which would pass past the model's limits unestimated.
    fn estimate_body(&self, req: &RequestView<'_>, body: &[u8]) -> Result<Estimate, BodyError> {
        let estimate = self.0.estimate_body(req, body)?;
        // Only an estimate naming no model may be of a body read as
        // something else; a JSON one names its model (but for a Responses
        // prompt template's), so the usual body is parsed once.
        if estimate.model.is_none() && !body.iter().all(u8::is_ascii_whitespace) {
            // Every string checked, as a `Value` does and skipping does not.
            if let Err(e) = serde_json::from_slice::<Value>(body) {
                return Err(BodyError::new(format!(
                    "the request body is not valid JSON: {e}"
                )));
            }
        }
        Ok(estimate)
    }
}

/// Request headers never forwarded: the client's credentials, what the
/// client's connection to the gateway alone means, and what the gateway
/// sets itself. (`accept-encoding`: answers come back uncompressed, to be
/// read for their usage.)
const NOT_FORWARDED: [&str; 13] = [
    "authorization",
    "x-api-key",
    "proxy-authorization",
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "accept-encoding",
    "x-admin-key",
];

/// Response headers never passed back: hop-by-hop ones.
const NOT_RETURNED: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// `headers` without those in `drop`, those the `connection` header names,
/// and, with `limits`, the backend's rate limit headers.
fn filter(headers: &HeaderMap, drop: &[&str], limits: bool) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let n = name.as_str();
        if drop.contains(&n)
            || named.iter().any(|d| d == n)
            || (limits && (n.starts_with("ratelimit") || n.starts_with("x-ratelimit-")))
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// An OpenAI-style error answer of the gateway's own, which costs nothing.
/// The 400 of a path that is not forwarded (see [`forwardable`]).
fn invalid_path(usage: Option<&TokenUsage>) -> Response {
    gateway_error(
        StatusCode::BAD_REQUEST,
        "The path has an empty, `.` or `..` segment, a backslash, or an encoded slash (outside a model's name), backslash, control character, letter, digit or `-._~`.",
        "invalid_path",
        usage,
    )
}

/// Refuses a path that [`forward`] would refuse before the limit sees the
/// request, so that it costs nothing, as a 404 does: decided after the
/// limit, it was charged a request of the throttle and the quota.
pub(crate) async fn refuse_unforwardable(req: Request, next: axum::middleware::Next) -> Response {
    if forwardable(req.uri().path()) {
        next.run(req).await
    } else {
        invalid_path(None)
    }
}

fn gateway_error(
    status: StatusCode,
    message: &str,
    code: &str,
    usage: Option<&TokenUsage>,
) -> Response {
    if let Some(u) = usage {
        u.set(0);
    }
    (
        status,
        Json(json!({"error": {"message": message, "type": "upstream_error", "code": code}})),
    )
        .into_response()
}

/// What the gateway does to a body it read before it goes on: counts its
/// prompt when it may be streamed, and for a completion with
/// `"stream": true` and no `stream_options.include_usage`, asks for it.
struct Prepared {
    body: Bytes,
    /// The client did not ask for the usage chunk: remove it.
    strip_usage: bool,
    /// The prompt's estimated tokens, charged when a stream starts (of any
    /// body that names a `stream` other than `false` or `null`: the backend
    /// decides what it streams).
    prompt: u64,
    /// The body names such a `stream`.
    stream: bool,
}

fn prepare(f: &Forwarder, body: Bytes, completion: bool) -> Prepared {
    let mut prepared = Prepared {
        body,
        strip_usage: false,
        prompt: 0,
        stream: false,
    };
    let Ok(Value::Object(mut req)) = serde_json::from_slice::<Value>(&prepared.body) else {
        // Not for the gateway to judge: the backend answers it.
        return prepared;
    };
    // Not only for `"stream": true`: a backend may stream a `"true"` or `1`
    // too (vLLM's request models read them as `true`), and a stream without
    // usage is charged its prompt.
    if matches!(
        req.get("stream"),
        None | Some(Value::Null | Value::Bool(false))
    ) {
        return prepared;
    }
    prepared.stream = true;
    prepared.prompt = prompt_of(f, &req);
    // Only a completion's stream the gateway knows for one is asked for its
    // usage: a backend refuses `stream_options` beside a `stream` it reads
    // as false. (A Responses stream always ends with its usage.)
    if !completion || req.get("stream") != Some(&Value::Bool(true)) {
        return prepared;
    }
    let options = req.entry("stream_options").or_insert_with(|| json!({}));
    // `null` or another non-object: the backend would send no usage.
    if !options.is_object() {
        *options = json!({});
    }
    if let Value::Object(options) = options {
        if options.get("include_usage") != Some(&Value::Bool(true)) {
            options.insert("include_usage".to_owned(), Value::Bool(true));
            // vLLM's usage on every chunk, which it reads only beside
            // `include_usage`: asked for alone, it had no effect for the
            // client, and must keep having none.
            options.remove("continuous_usage_stats");
            prepared.strip_usage = true;
            if let Ok(body) = serde_json::to_vec(&req) {
                prepared.body = Bytes::from(body);
            } else {
                prepared.strip_usage = false;
            }
        }
    }
    prepared
}

/// The estimated tokens of the prompt of `req`, a request body: its
/// estimate without the answer's allowance.
fn prompt_of(f: &Forwarder, req: &serde_json::Map<String, Value>) -> u64 {
    let mut prompt = req.clone();
    prompt.remove("max_tokens");
    prompt.remove("max_completion_tokens");
    prompt.remove("max_output_tokens");
    prompt.remove("n_predict");
    serde_json::to_vec(&prompt)
        .ok()
        .and_then(|b| f.prompt.estimate_json(&b).ok())
        .map_or(0, |e| u64::from(e.tokens))
}

/// [`prompt_of`] a body as it came; 0 for one that is not a JSON object.
fn prompt_of_body(f: &Forwarder, body: &[u8]) -> u64 {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(req)) => prompt_of(f, &req),
        _ => 0,
    }
}

/// Forwards the request to the backend and streams its answer back.
pub(crate) async fn forward(State(f): State<Arc<Forwarder>>, req: Request) -> Response {
    let usage = req.extensions().get::<TokenUsage>().cloned();
    if !forwardable(req.uri().path()) {
        return invalid_path(usage.as_ref());
    }
    let stall = req.extensions().get::<Arc<Stall>>().cloned();
    let (parts, body) = req.into_parts();
    let target = format!(
        "{}{}",
        f.upstream.base,
        parts
            .uri
            .path_and_query()
            .map_or(parts.uri.path(), |p| p.as_str())
    );
    let mut headers = filter(&parts.headers, &NOT_FORWARDED, false);
    let mut strip_usage = false;
    let mut prompt = 0;
    let mut stream = false;
    let estimated = is_estimated(&parts.method, parts.uri.path());
    let completion = is_completion(&parts.method, parts.uri.path());
    // An estimated body as it came, to count its prompt from if its client
    // leaves before the answer.
    let mut came = Bytes::new();
    // The bodies the layer read (in memory already).
    let body = if estimated {
        let bytes = match axum::body::to_bytes(body, MAX_REQUEST_BODY).await {
            Ok(b) => b,
            Err(e) => return body_error(&e, usage.as_ref()),
        };
        came = bytes.clone();
        let p = prepare(&f, bytes, completion);
        strip_usage = p.strip_usage;
        prompt = p.prompt;
        stream = p.stream;
        headers.remove(header::CONTENT_LENGTH);
        reqwest::Body::from(p.body)
    } else {
        // As it comes, with the client's content-length when it sent one.
        reqwest::Body::wrap_stream(body.into_data_stream())
    };
    if let Some(key) = &f.upstream.key {
        headers.insert(header::AUTHORIZATION, key.clone());
    }
    let send = f
        .client
        .request(parts.method, &target)
        .headers(headers)
        .body(body)
        .send();
    // A request whose client goes away before the backend answers (this
    // future dropped) is charged its prompt, as a stream cut off after its
    // head is: a plain answer's count too, only then.
    // A completion answered in JSON without a usage is charged its prompt
    // and its text, counted from the body as it came.
    let counted = completion.then(|| Counted {
        forwarder: Arc::clone(&f),
        body: came.clone(),
    });
    let waiting = Unanswered {
        usage: usage.clone().filter(|_| estimated),
        prompt: stream.then_some(prompt),
        body: came,
        forwarder: &f,
    };
    let sent = tokio::time::timeout(f.upstream.timeout, send).await;
    waiting.answered();
    let res = match sent {
        Ok(Ok(res)) => res,
        // The client's own body stopped arriving: its 408 is the
        // server's (see `Stall`), and the backend did not fail.
        Ok(Err(_)) if stall.as_ref().is_some_and(|s| s.stalled()) => {
            return gateway_error(
                StatusCode::REQUEST_TIMEOUT,
                "the request body stopped arriving",
                "request_timeout",
                usage.as_ref(),
            );
        }
        Ok(Err(e)) => return send_error(&f.upstream, e, usage.as_ref()),
        Err(_) => {
            tracing::warn!(upstream = %f.upstream.base, timeout = ?f.upstream.timeout, "the upstream did not answer in time");
            return gateway_error(
                StatusCode::GATEWAY_TIMEOUT,
                &format!(
                    "the upstream did not answer within {} s",
                    f.upstream.timeout.as_secs_f64()
                ),
                "upstream_timeout",
                usage.as_ref(),
            );
        }
    };
    relay(res, usage, strip_usage, prompt, counted)
}

/// A request whose body was estimated, waiting for the backend's answer:
/// dropped before [`answered`](Self::answered) (the client went away, and
/// the backend's request with it), the client got nothing, and its usage
/// is its prompt, as a stream cut off after its head is charged. What the
/// backend generated before it stopped is not known (a plain answer comes
/// whole or not at all), and went to nobody.
struct Unanswered<'a> {
    /// `None` once answered, or for a request that reserved no tokens.
    usage: Option<TokenUsage>,
    /// The prompt's tokens, when counted already (a stream's).
    prompt: Option<u64>,
    /// The body as it came, to count them from otherwise.
    body: Bytes,
    forwarder: &'a Forwarder,
}

impl Unanswered<'_> {
    /// The backend answered, or failed to: what follows settles the usage.
    fn answered(mut self) {
        self.usage = None;
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let Some(usage) = self.usage.take() {
            let prompt = self
                .prompt
                .unwrap_or_else(|| prompt_of_body(self.forwarder, &self.body));
            usage.set(prompt);
        }
    }
}

/// The answer when the client's body could not be read.
fn body_error(e: &axum::Error, usage: Option<&TokenUsage>) -> Response {
    use std::error::Error as _;
    let mut source = e.source();
    let mut too_large = false;
    while let Some(s) = source {
        too_large |= s.is::<http_body_util::LengthLimitError>();
        source = s.source();
    }
    if let Some(u) = usage {
        u.set(0);
    }
    let (status, message, code) = if too_large {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body is too large",
            "request_too_large",
        )
    } else {
        (
            StatusCode::BAD_REQUEST,
            "the request body could not be read",
            "invalid_request_body",
        )
    };
    (
        status,
        Json(json!({"error": {"message": message, "type": "invalid_request_error", "code": code}})),
    )
        .into_response()
}

/// The answer when the request could not be sent or its answer's head not
/// read: a 502 (a 504 for a timeout), costing nothing.
fn send_error(up: &Upstream, e: reqwest::Error, usage: Option<&TokenUsage>) -> Response {
    use std::error::Error as _;
    // The chain, for the log: reqwest's own message names only the URL,
    // and that URL is left out: its query is the client's, which may
    // carry a secret (`?key=…`). The upstream is named on its own.
    let e = e.without_url();
    let mut error = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        error.push_str(": ");
        error.push_str(&s.to_string());
        source = s.source();
    }
    tracing::warn!(upstream = %up.base, %error, "the upstream request failed");
    if e.is_timeout() && !e.is_connect() {
        return gateway_error(
            StatusCode::GATEWAY_TIMEOUT,
            &format!(
                "the upstream did not answer within {} s",
                up.timeout.as_secs_f64()
            ),
            "upstream_timeout",
            usage,
        );
    }
    let (message, code) = if e.is_connect() {
        ("the upstream cannot be reached", "upstream_unreachable")
    } else {
        ("the upstream failed to answer", "upstream_failed")
    };
    gateway_error(StatusCode::BAD_GATEWAY, message, code, usage)
}

/// The client's answer: the backend's status, headers and body, read for
/// its usage as it passes.
fn relay(
    res: reqwest::Response,
    usage: Option<TokenUsage>,
    strip_usage: bool,
    prompt: u64,
    counted: Option<Counted>,
) -> Response {
    let status = res.status();
    let mut headers = filter(res.headers(), &NOT_RETURNED, true);
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let ok = status.is_success();
    // A body the backend compressed though it was not asked to (a proxy in
    // front of it set to) cannot be read: it passes as it comes, as any
    // other body the relay does not read.
    let encoded = headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let kind = if !encoded && content_type.starts_with("text/event-stream") {
        // Events may be removed: the length changes.
        headers.remove(header::CONTENT_LENGTH);
        // A stream is charged its prompt from its start; an error streamed
        // costs what its usage says, nothing without one, as any error.
        if let Some(u) = &usage {
            u.set(if ok { prompt } else { 0 });
        }
        Kind::Sse {
            buf: Vec::new(),
            scanned: 0,
            strip_usage,
            reported: Reported::default(),
        }
    } else if !encoded
        && (content_type.starts_with("application/json") || content_type.contains("+json"))
    {
        // Without a length the server reads the body to its end, where the
        // usage is settled; with one it would stop at the last byte.
        headers.remove(header::CONTENT_LENGTH);
        Kind::Json {
            seen: Vec::new(),
            whole: true,
            ok,
            counted,
        }
    } else {
        if let Some(u) = usage.as_ref().filter(|_| !ok) {
            u.set(0);
        }
        Kind::Plain
    };
    let relay = Relay {
        body: Box::pin(res.bytes_stream()),
        kind,
        usage,
        done: false,
    };
    let mut out = Response::new(Body::from_stream(relay));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

type Upstreaming = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// The backend's answer as the client gets it, reporting tokens as it goes.
/// Dropping it drops the backend's response, closing its connection.
struct Relay {
    body: Upstreaming,
    kind: Kind,
    usage: Option<TokenUsage>,
    done: bool,
}

enum Kind {
    /// Server-sent events, read one at a time.
    Sse {
        /// The start of an event whose blank line has not come yet.
        buf: Vec<u8>,
        /// How much of `buf` was searched for the blank line already: an
        /// event sent in many small chunks is searched once, not once per
        /// chunk from its start.
        scanned: usize,
        strip_usage: bool,
        /// What the backend reported of the usage so far.
        reported: Reported,
    },
    /// A JSON answer, kept aside (up to [`MAX_JSON_ANSWER`], then its last
    /// [`JSON_TAIL`] bytes) for its usage.
    Json {
        seen: Vec<u8>,
        whole: bool,
        ok: bool,
        /// A completion's: what its text is counted with when it has no
        /// usage.
        counted: Option<Counted>,
    },
    /// Anything else, passed on as it is.
    Plain,
}

impl Stream for Relay {
    type Item = reqwest::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match ready!(this.body.as_mut().poll_next(cx)) {
                Some(Ok(chunk)) => {
                    let out = this.pass(chunk);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Some(Err(e)) => {
                    this.done = true;
                    tracing::warn!(error = %e, "the upstream's answer broke off");
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    this.done = true;
                    let rest = this.finish();
                    return Poll::Ready((!rest.is_empty()).then_some(Ok(rest)));
                }
            }
        }
    }
}

impl Drop for Relay {
    /// A plain answer the client left before its end (the backend's answer
    /// dropped with it) is settled from the `usage` already passed on, if
    /// any; an error without one costs nothing, as a whole one; a success
    /// without one keeps its estimate (it was produced whole). A stream's
    /// usage stands as its events counted it.
    fn drop(&mut self) {
        if !self.done && matches!(self.kind, Kind::Json { .. }) {
            self.finish();
        }
    }
}

impl Relay {
    /// What of `chunk` goes on to the client now.
    fn pass(&mut self, chunk: Bytes) -> Bytes {
        match &mut self.kind {
            Kind::Plain => chunk,
            Kind::Json { seen, whole, .. } => {
                if *whole && seen.len() + chunk.len() > MAX_JSON_ANSWER {
                    // Too long to keep whole: from now on its tail only,
                    // in a buffer of the tail's size.
                    *whole = false;
                    let mut tail = Vec::with_capacity(3 * JSON_TAIL);
                    tail.extend_from_slice(&seen[seen.len().saturating_sub(JSON_TAIL)..]);
                    *seen = tail;
                }
                if *whole {
                    seen.extend_from_slice(&chunk);
                } else {
                    seen.extend_from_slice(&chunk[chunk.len().saturating_sub(JSON_TAIL)..]);
                    // Cut back to the tail once it is twice as long, so
                    // that each byte is moved about once.
                    if seen.len() > 2 * JSON_TAIL {
                        seen.drain(..seen.len() - JSON_TAIL);
                    }
                }
                chunk
            }
            Kind::Sse {
                buf,
                scanned,
                strip_usage,
                reported,
            } => {
                buf.extend_from_slice(&chunk);
                let mut out = Vec::new();
                let mut start = 0;
                // A blank line may straddle what was searched and the new
                // chunk by at most 3 bytes (`\r\n\r\n`).
                let mut from = scanned.saturating_sub(3);
                while let Some(len) = event_end(&buf[start..], from - start, false) {
                    let event = &buf[start..start + len];
                    if read_event(event, self.usage.as_ref(), *strip_usage, reported) {
                        pass_event(&mut out, event, *strip_usage);
                    }
                    start += len;
                    from = start;
                }
                buf.drain(..start);
                *scanned = buf.len();
                if buf.len() > MAX_EVENT {
                    out.append(buf);
                    *scanned = 0;
                }
                Bytes::from(out)
            }
        }
    }

    /// At the end of the backend's answer: the usage is reported (before
    /// the layer sees the end and settles), and what is left goes on.
    fn finish(&mut self) -> Bytes {
        match &mut self.kind {
            Kind::Plain => Bytes::new(),
            Kind::Json {
                seen,
                whole,
                ok,
                counted,
            } => {
                let total = if *whole {
                    serde_json::from_slice::<Answer>(seen)
                        .ok()
                        .and_then(|a| a.usage?.total(None))
                        // An answer that is not an object of its own (an
                        // object then bytes?) is read as its tail would be.
                        .or_else(|| usage_in_tail(seen))
                        // A whole completion without one: its prompt and
                        // its text, as a stream without one is charged.
                        .or_else(|| {
                            let c = counted.as_ref().filter(|_| *ok)?;
                            c.produced(seen)
                        })
                } else {
                    usage_in_tail(seen)
                };
                if let Some(u) = &self.usage {
                    match total {
                        Some(n) => u.set(n),
                        // An error without usage costs nothing; a success
                        // without one keeps its estimate.
                        None if !*ok => u.set(0),
                        None => {}
                    }
                }
                Bytes::new()
            }
            Kind::Sse {
                buf,
                strip_usage,
                reported,
                ..
            } => {
                // The last events, a CR at the very end ending a line now.
                let mut out = Vec::new();
                let mut start = 0;
                while let Some(len) = event_end(&buf[start..], 0, true) {
                    let event = &buf[start..start + len];
                    if read_event(event, self.usage.as_ref(), *strip_usage, reported) {
                        pass_event(&mut out, event, *strip_usage);
                    }
                    start += len;
                }
                out.extend_from_slice(&buf[start..]);
                buf.clear();
                Bytes::from(out)
            }
        }
    }
}

/// The length of the first whole event at the start of `b`, blank line
/// included, searching from `from` (`b` holds no blank line that ends
/// before `from`). A blank line is a line ending right after another, and
/// a line ends with CRLF, LF or CR, as the server-sent events format has
/// it. A CR at the end of `b` may be the start of a CRLF: it ends a line
/// only `at_end` of the stream.
fn event_end(b: &[u8], from: usize, at_end: bool) -> Option<usize> {
    // Where the line ending just read ended: a second one starting there
    // ends the event.
    let mut ended = None;
    let mut i = from;
    while let Some(&c) = b.get(i) {
        let len = match c {
            b'\n' => 1,
            b'\r' => match b.get(i + 1) {
                Some(b'\n') => 2,
                Some(_) => 1,
                None if at_end => 1,
                None => return None,
            },
            _ => {
                ended = None;
                i += 1;
                continue;
            }
        };
        if ended == Some(i) {
            return Some(i + len);
        }
        i += len;
        ended = Some(i);
    }
    None
}

/// Appends `event` to `out`; with `strip_usage` (the client did not ask for
/// the usage), without the `"usage": null` that a backend asked for the
/// usage chunk puts on every other chunk, as OpenAI's API does: the client
/// gets the chunks it would have got from the backend directly.
fn pass_event(out: &mut Vec<u8>, event: &[u8], strip_usage: bool) {
    match null_usage(event).filter(|_| strip_usage) {
        Some(span) => {
            out.extend_from_slice(&event[..span.start]);
            out.extend_from_slice(&event[span.end..]);
        }
        None => out.extend_from_slice(event),
    }
}

/// The bytes of the first member `"usage": null` in `event`, one comma
/// beside it included, so that what is left is the same JSON without it.
/// A `"usage"` inside a string is never one: a string's quotes are escaped.
fn null_usage(event: &[u8]) -> Option<std::ops::Range<usize>> {
    const KEY: &[u8] = b"\"usage\"";
    let space = |b: &u8| b.is_ascii_whitespace();
    let mut from = 0;
    while let Some(at) = event[from..].windows(KEY.len()).position(|w| w == KEY) {
        let key = from + at;
        from = key + KEY.len();
        // `: null`, spaced or not.
        let rest = &event[from..];
        let colon = rest.iter().position(|b| !space(b))?;
        if rest[colon] != b':' {
            continue;
        }
        let value = colon + 1 + rest[colon + 1..].iter().position(|b| !space(b))?;
        if !rest[value..].starts_with(b"null") {
            continue;
        }
        let end = from + value + 4;
        // The comma after it, else the one before it.
        let after = event[end..].iter().position(|b| !space(b)).map(|i| end + i);
        if let Some(comma) = after.filter(|&i| event[i] == b',') {
            return Some(key..comma + 1);
        }
        let before = event[..key].iter().rposition(|b| !space(b))?;
        return (event[before] == b',').then_some(before..end);
    }
    None
}

/// What a completion answered without a usage is charged from: the request
/// body as it came (its prompt) and the estimate's way of counting text.
pub(crate) struct Counted {
    forwarder: Arc<Forwarder>,
    body: Bytes,
}

impl Counted {
    /// The prompt as estimated plus the tokens of the text `answer` (a
    /// whole completion or chat completion) generated, counted as the
    /// estimate counts a prompt; `None` for an answer that has no
    /// `choices`.
    fn produced(&self, answer: &[u8]) -> Option<u64> {
        let answer: Value = serde_json::from_slice(answer).ok()?;
        let choices = answer.get("choices")?.as_array()?;
        let mut text = String::new();
        let mut add = |v: Option<&Value>| {
            if let Some(t) = v.and_then(Value::as_str) {
                text.push_str(t);
            }
        };
        for choice in choices {
            add(choice.get("text"));
            let Some(m) = choice.get("message") else {
                continue;
            };
            for k in ["content", "reasoning_content", "reasoning", "refusal"] {
                add(m.get(k));
            }
            // Content given as parts.
            for part in m
                .get("content")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                add(part.get("text"));
            }
            let calls = m.get("tool_calls").and_then(Value::as_array);
            let functions = calls
                .into_iter()
                .flatten()
                .filter_map(|c| c.get("function"))
                .chain(m.get("function_call"));
            for f in functions {
                add(f.get("name"));
                add(f.get("arguments"));
            }
        }
        let f = &self.forwarder;
        let generated = f
            .prompt
            // The estimate of a completion of that text alone, its own way
            // of counting (a model named only to make it one).
            .estimate_json(
                json!({ "model": "-", "prompt": text })
                    .to_string()
                    .as_bytes(),
            )
            .map_or(0, |e| u64::from(e.tokens));
        Some(prompt_of_body(f, &self.body).saturating_add(generated))
    }
}

/// What a stream's events reported of its usage so far.
#[derive(Default)]
struct Reported {
    /// A usage that settles the stream came (not the input alone of a
    /// Messages stream's `message_start`): chunks are no longer counted.
    any: bool,
    /// The input tokens, which a Messages stream reports in its first event
    /// and its output tokens in a later one.
    input: Option<u64>,
}

/// Reads one event for its tokens; whether it goes on to the client (not
/// the usage chunk the client did not ask for).
fn read_event(
    event: &[u8],
    usage: Option<&TokenUsage>,
    strip_usage: bool,
    reported: &mut Reported,
) -> bool {
    let Ok(text) = std::str::from_utf8(event) else {
        return true;
    };
    let mut data = String::new();
    // Lines end with CRLF, LF or CR (a CRLF leaves an empty line between).
    for line in text.split(['\r', '\n']) {
        if let Some(d) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(d.strip_prefix(' ').unwrap_or(d));
        }
    }
    let Ok(chunk) = serde_json::from_str::<Chunk>(&data) else {
        return true;
    };
    let texts = chunk.texts();
    let choices = chunk.choices.unwrap_or_default();
    // A Messages stream reports its input in the `message` of its first
    // event (`message_start`), with an output of 0 or 1 that is not the
    // answer's: the input is kept, and replaces its estimate, but the
    // deltas are still counted until `message_delta` reports the output.
    if let Some(input) = chunk.message.and_then(|m| m.usage?.input()) {
        reported.input = Some(input);
        if let Some(u) = usage.filter(|_| !reported.any) {
            u.set(input);
        }
        return true;
    }
    // A Responses API stream reports its usage in the `response` of its
    // last event (`response.completed`, `.incomplete` or `.failed`); a
    // Messages stream its output in `message_delta`'s own.
    let reported_usage = chunk.usage.or(chunk.response.and_then(|r| r.usage));
    if let Some(found) = reported_usage {
        reported.input = found.input().or(reported.input);
        if let Some(total) = found.total(reported.input) {
            reported.any = true;
            if let Some(u) = usage {
                u.set(total);
            }
            return !(strip_usage && choices.is_empty());
        }
    }
    if let Some(u) = usage.filter(|_| !reported.any) {
        u.add(texts as u64);
    }
    true
}

/// What the relay reads of a chunk of a stream: a completion's or chat
/// completion's chunk, or an event of the Responses or Messages API.
#[derive(Deserialize)]
struct Chunk {
    choices: Option<Vec<Choice>>,
    usage: Option<Usage>,
    /// The event type of the Responses API (`response.output_text.delta`,
    /// …) or the Messages API (`content_block_delta`, …).
    #[serde(rename = "type")]
    kind: Option<String>,
    /// A delta event's text: a Responses delta's string, a Messages delta's
    /// object (`{"type":"text_delta","text":…}`).
    delta: Option<Value>,
    /// The response a Responses API event is about, with its usage once
    /// it has ended.
    response: Option<Answer>,
    /// The message a Messages API `message_start` begins, with its usage.
    message: Option<Answer>,
}

impl Chunk {
    /// The pieces of generated text this chunk carries: one per choice
    /// with text, or one for a Responses or Messages delta event with text.
    fn texts(&self) -> usize {
        let choices = self.choices.as_deref().unwrap_or_default();
        let delta = self
            .kind
            .as_deref()
            .is_some_and(|k| k.ends_with(".delta") || k == "content_block_delta")
            // A Responses delta is a string; a Messages delta an object
            // with its text, tool input (`partial_json`) or thinking.
            && self.delta.as_ref().is_some_and(|d| {
                has_text(Some(d))
                    || ["text", "partial_json", "thinking"]
                        .iter()
                        .any(|k| has_text(d.get(k)))
            });
        choices.iter().filter(|c| c.has_text()).count() + usize::from(delta)
    }
}

#[derive(Deserialize)]
struct Choice {
    /// A chat completion chunk's; read as any JSON, so that a field of an
    /// unexpected shape does not keep the chunk (and its usage) unread.
    delta: Option<Value>,
    text: Option<Value>,
}

impl Choice {
    /// Whether the choice carries generated output: text, or a chat
    /// delta's reasoning (`reasoning_content`, as vLLM and llama.cpp's
    /// server stream it, or Ollama's `reasoning`), refusal, or tool call
    /// (a function's name or arguments), which are generated as text is.
    fn has_text(&self) -> bool {
        let call = |c: &Value| ["name", "arguments"].iter().any(|k| has_text(c.get(k)));
        has_text(self.text.as_ref())
            || self.delta.as_ref().is_some_and(|d| {
                ["content", "reasoning_content", "reasoning", "refusal"]
                    .iter()
                    .any(|k| has_text(d.get(k)))
                    || d.get("function_call").is_some_and(call)
                    || d.get("tool_calls")
                        .and_then(Value::as_array)
                        .is_some_and(|calls| {
                            calls.iter().filter_map(|c| c.get("function")).any(call)
                        })
            })
    }
}

/// Whether `v` is a string that is not empty.
fn has_text(v: Option<&Value>) -> bool {
    v.and_then(Value::as_str).is_some_and(|t| !t.is_empty())
}

/// A usage as OpenAI reports it (`prompt_tokens`, `completion_tokens`,
/// `total_tokens`) or as the Messages API does (`input_tokens`,
/// `output_tokens`, no total).
#[derive(Deserialize)]
struct Usage {
    total_tokens: Option<u64>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

impl Usage {
    /// The input tokens, by either name.
    fn input(&self) -> Option<u64> {
        self.prompt_tokens.or(self.input_tokens)
    }

    /// The tokens used: `total_tokens`, else the input (this usage's, or
    /// `input` reported earlier in the stream) plus the output; `None` when
    /// it names none of them.
    fn total(&self, input: Option<u64>) -> Option<u64> {
        if let Some(total) = self.total_tokens {
            return Some(total);
        }
        let input = self.input().or(input);
        let output = self.completion_tokens.or(self.output_tokens);
        (input.is_some() || output.is_some())
            .then(|| input.unwrap_or(0).saturating_add(output.unwrap_or(0)))
    }
}

/// The tokens used of the last `"usage"` member in `tail` (the end of a
/// JSON answer too long to keep whole): the value after the last
/// `"usage":`, read as a usage object. A `"usage"` inside a string would be
/// escaped (`\"usage\"`), so the bytes found are a member's name, or a
/// string value `"usage"` (then no object follows, and nothing is read).
fn usage_in_tail(tail: &[u8]) -> Option<u64> {
    const NAME: &[u8] = b"\"usage\"";
    let at = tail.windows(NAME.len()).rposition(|w| w == NAME)?;
    let rest = tail[at + NAME.len()..].trim_ascii_start();
    let rest = rest.strip_prefix(b":")?;
    let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<Usage>();
    values.next()?.ok()?.total(None)
}

/// What the relay reads of a non-streamed answer (and of the `response` of
/// a Responses API event, the `message` of a Messages API one).
#[derive(Deserialize)]
struct Answer {
    usage: Option<Usage>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_a_trailing_v1_dropped() {
        for (url, base) in [
            ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
            ("http://localhost:11434/v1", "http://localhost:11434"),
            ("http://localhost:11434/v1/", "http://localhost:11434"),
            ("http://h/proxy/", "http://h/proxy"),
            ("http://[::1]:80/", "http://[::1]"),
        ] {
            assert_eq!(Upstream::new(url).unwrap().base(), base, "{url}");
        }
        for url in [
            "localhost:8000",
            "ftp://h/",
            "http://",
            "not a url",
            "http://h/?a=1",
            "http://u:p@h/",
        ] {
            assert!(Upstream::new(url).is_err(), "{url}");
        }
        let up = Upstream::new("http://h").unwrap();
        assert!(up.clone().key("").is_err());
        assert!(up.clone().key("a\nb").is_err());
        let up = up.key("secret").unwrap();
        assert!(!format!("{up:?}").contains("secret"));
    }

    #[test]
    fn a_stream_is_asked_for_its_usage_unless_the_client_did() {
        let f = Upstream::new("http://h").unwrap().forwarder();
        let asks = |body: &str| {
            let p = prepare(&f, Bytes::from(body.to_owned()), true);
            let sent: Value = serde_json::from_slice(&p.body).unwrap();
            (
                p.strip_usage,
                sent["stream_options"]["include_usage"] == json!(true),
            )
        };
        let stream = r#"{"model":"m","prompt":"x","stream":true"#;
        assert_eq!(asks(&format!("{stream}}}")), (true, true));
        // `null`, or any other non-object, is no request for it either.
        for options in ["null", "\"yes\"", "[]", "{}", r#"{"include_usage":false}"#] {
            let body = format!(r#"{stream},"stream_options":{options}}}"#);
            assert_eq!(asks(&body), (true, true), "{options}");
        }
        let asked = format!(r#"{stream},"stream_options":{{"include_usage":true}}}}"#);
        assert_eq!(asks(&asked), (false, true));
        // vLLM's `continuous_usage_stats` is off without `include_usage`:
        // it stays off when the gateway asks for the usage chunk.
        let body = format!(r#"{stream},"stream_options":{{"continuous_usage_stats":true}}}}"#);
        let sent: Value =
            serde_json::from_slice(&prepare(&f, Bytes::from(body), true).body).unwrap();
        assert_eq!(sent["stream_options"], json!({"include_usage": true}));
        let both = r#","stream_options":{"include_usage":true,"continuous_usage_stats":true}}"#;
        let body = format!("{stream}{both}");
        let p = prepare(&f, Bytes::from(body.clone()), true);
        assert_eq!((p.body.as_ref(), p.strip_usage), (body.as_bytes(), false));
        // A `stream` that is not `true` goes on as it came, its prompt
        // counted in case the backend streams it all the same.
        let lenient = r#"{"model":"m","prompt":"abcdefgh","stream":"true","max_tokens":9}"#;
        let p = prepare(&f, Bytes::from(lenient), true);
        assert_eq!(
            (p.body.as_ref(), p.strip_usage, p.prompt),
            (lenient.as_bytes(), false, 2)
        );
        // llama.cpp's bound on the answer is no part of the prompt.
        let bounded = r#"{"model":"m","prompt":"abcdefgh","stream":"true","n_predict":500}"#;
        assert_eq!(prepare(&f, Bytes::from(bounded), true).prompt, 2);
        let plain = r#"{"model":"m","prompt":"abcdefgh","stream":false}"#;
        assert_eq!(prepare(&f, Bytes::from(plain), true).prompt, 0);
        // A Responses stream is charged its input, and goes on as it came.
        let responses = r#"{"model":"m","input":"abcdefgh","stream":true,"max_output_tokens":9}"#;
        let p = prepare(&f, Bytes::from(responses), false);
        assert_eq!(
            (p.body.as_ref(), p.strip_usage, p.prompt),
            (responses.as_bytes(), false, 2)
        );
    }

    #[test]
    fn paths_that_leave_v1_are_not_forwardable() {
        for ok in [
            "/v1/models",
            "/v1/chat/completions",
            "/v1/models/a.b-c",
            "/v1/models/llama3%3A8b",
            "/v1/files/a%20b",
            "/v1/files/%3A%40",
            "/v1/models/org%2Fmodel",
            "/v1/models/hf.co%2fuser%2Fm%3Aq4",
        ] {
            assert!(forwardable(ok), "{ok}");
        }
        for bad in [
            "/v1/../api",
            "/v1/./x",
            "/v1//x",
            "/v1/x/",
            "/v1/%2E%2E/x",
            "/v1/a%2fb",
            "/v1/files/a%2Fb",
            "/v1/models%2Fx",
            "/v1/models/a%2F..%2Fchat%2Fcompletions",
            "/v1/models/a%2F.",
            "/v1/models/%2fa",
            "/v1/models/a%2F%2Fb",
            "/v1/models/a%2F",
            "/v1/a%5Cb",
            "/v1/a\\b",
            "/v1/files/%41",
            "/v1/chat/complet%69ons",
            "/v1/%63ompletions",
            "/v1/x%5fy%7E",
            "/v1/chat/completions%0A",
            "/v1/models%00",
            "/v1/models%7f",
            "/v1/chat/%63ompletions",
            "/v1/x%5f",
            "/v1/x%7E",
            "/v2/x",
            "/v1",
        ] {
            assert!(!forwardable(bad), "{bad}");
        }
    }

    #[test]
    fn events_split_at_blank_lines() {
        assert_eq!(event_end(b"data: x\n\ndata: y", 0, false), Some(9));
        assert_eq!(event_end(b"data: x\r\n\r\n", 0, false), Some(11));
        assert_eq!(event_end(b"data: x\n", 0, false), None);
        assert_eq!(event_end(b"data: x\r\n\r\n", 6, false), Some(11));
        // CR alone ends a line too, and endings may be mixed.
        assert_eq!(event_end(b"data: x\r\rdata: y", 0, false), Some(9));
        assert_eq!(event_end(b"data: x\n\r\n", 0, false), Some(10));
        assert_eq!(event_end(b"data: x\r\n\n", 0, false), Some(10));
        // One CRLF is one line ending, not two.
        assert_eq!(event_end(b"data: x\r\ndata: y\r\n", 0, false), None);
        // A CR at the end may be a CRLF's start, until the stream ends.
        assert_eq!(event_end(b"data: x\r\r", 0, false), None);
        assert_eq!(event_end(b"data: x\r\r", 0, true), Some(9));
    }

    /// A backend that ends its lines with CR alone: events are found as
    /// they come, a byte at a time too, the unasked usage chunk left out and
    /// its usage read, the last event read at the end of the stream. Its
    /// events were held back to the end (or 1 MiB), and its usage missed.
    #[test]
    fn events_with_lines_ended_by_cr_alone_are_found() {
        let first = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\r\r";
        let usage_event = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\r\r";
        let relay = |usage: &TokenUsage| Relay {
            body: Box::pin(tokio_stream::empty()),
            kind: Kind::Sse {
                buf: Vec::new(),
                scanned: 0,
                strip_usage: true,
                reported: Reported::default(),
            },
            usage: Some(usage.clone()),
            done: false,
        };
        // A byte at a time: the first event goes out before the stream ends.
        let usage = TokenUsage::new();
        let mut r = relay(&usage);
        let mut out = Vec::new();
        for b in [first, "data: x"].concat().bytes() {
            out.extend_from_slice(&r.pass(Bytes::copy_from_slice(&[b])));
        }
        assert_eq!(String::from_utf8(out).unwrap(), first);
        // The usage event last, its final CR the stream's last byte.
        let usage = TokenUsage::new();
        let mut r = relay(&usage);
        let mut out = r.pass(Bytes::from([first, usage_event].concat())).to_vec();
        out.extend_from_slice(&r.finish());
        assert_eq!(String::from_utf8(out).unwrap(), first);
        assert_eq!(usage.get(), Some(3));
    }

    /// Events sent a byte at a time (blank lines of both kinds split across
    /// chunks) come out whole and in order, the usage chunk the client did
    /// not ask for left out, and the usage read.
    #[test]
    fn events_in_one_byte_chunks_are_found_across_chunks() {
        let first = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\r\n\r\n";
        let usage_event = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\n\n";
        let done = "data: [DONE]\n\n";
        let usage = TokenUsage::new();
        let mut relay = Relay {
            body: Box::pin(tokio_stream::empty()),
            kind: Kind::Sse {
                buf: Vec::new(),
                scanned: 0,
                strip_usage: true,
                reported: Reported::default(),
            },
            usage: Some(usage.clone()),
            done: false,
        };
        let mut out = Vec::new();
        for b in [first, usage_event, done].concat().bytes() {
            out.extend_from_slice(&relay.pass(Bytes::copy_from_slice(&[b])));
        }
        out.extend_from_slice(&relay.finish());
        assert_eq!(String::from_utf8(out).unwrap(), [first, done].concat());
        assert_eq!(usage.get(), Some(3));
    }

    /// A JSON answer too long to keep whole (embeddings of many inputs)
    /// passes unchanged, holds no more than its tail, and its usage is read
    /// from that tail.
    #[test]
    fn a_long_json_answer_keeps_its_tail_and_its_usage_is_read() {
        let usage = TokenUsage::new();
        let mut relay = Relay {
            body: Box::pin(tokio_stream::empty()),
            kind: Kind::Json {
                seen: Vec::new(),
                whole: true,
                ok: true,
                counted: None,
            },
            usage: Some(usage.clone()),
            done: false,
        };
        let row = format!(
            "{{\"object\":\"embedding\",\"embedding\":[{}]}},",
            vec!["0.125"; 256].join(",")
        );
        let mut answer = String::from("{\"object\":\"list\",\"data\":[");
        while answer.len() < 3 * MAX_JSON_ANSWER {
            answer.push_str(&row);
        }
        answer.pop();
        answer.push_str(
            "],\"model\":\"e\",\"usage\":{\"prompt_tokens\":4096,\"total_tokens\":4096}}",
        );
        let mut out = Vec::new();
        let mut held = 0;
        for piece in answer.as_bytes().chunks(16 * 1024 + 7) {
            out.extend_from_slice(&relay.pass(Bytes::copy_from_slice(piece)));
            if let Kind::Json { seen, .. } = &relay.kind {
                held = held.max(seen.capacity());
            }
        }
        out.extend_from_slice(&relay.finish());
        assert_eq!(out, answer.as_bytes());
        assert_eq!(usage.get(), Some(4096));
        // The whole first megabyte, then never more than the tail's room.
        assert!(held <= MAX_JSON_ANSWER + 64 * 1024, "{held} bytes held");
        if let Kind::Json { seen, .. } = &relay.kind {
            assert!(
                seen.capacity() <= 3 * JSON_TAIL,
                "{} bytes kept",
                seen.capacity()
            );
        }
        // A usage that is only a string value is not read as one.
        assert_eq!(usage_in_tail(br#"{"x":"usage","y":1}"#), None);
        assert_eq!(
            usage_in_tail(br#""usage" : {"total_tokens": 7} }"#),
            Some(7)
        );
    }

    #[test]
    fn a_null_usage_is_cut_with_one_comma_beside_it() {
        let cut = |e: &str| {
            let mut out = Vec::new();
            pass_event(&mut out, e.as_bytes(), true);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(cut(r#"data: {"a":1,"usage":null}"#), r#"data: {"a":1}"#);
        assert_eq!(cut(r#"data: {"usage":null,"a":1}"#), r#"data: {"a":1}"#);
        assert_eq!(
            cut(r#"data: {"a": "usage", "usage" : null , "b": 2}"#),
            r#"data: {"a": "usage",  "b": 2}"#
        );
        // Not a null usage, or a string.
        for kept in [
            r#"data: {"a":1,"usage":{"total_tokens":3}}"#,
            r#"data: {"a":"\"usage\":null"}"#,
            r#"data: {"usage":null}"#,
            "data: [DONE]",
        ] {
            assert_eq!(cut(kept), kept);
        }
        let mut out = Vec::new();
        pass_event(&mut out, br#"{"a":1,"usage":null}"#, false);
        assert_eq!(out, br#"{"a":1,"usage":null}"#);
    }

    #[test]
    fn the_usage_chunk_is_read_and_removed_when_not_asked_for() {
        let usage = TokenUsage::new();
        let mut reported = Reported::default();
        let text = br#"data: {"choices":[{"index":0,"delta":{"content":"tok "}}]}

"#;
        assert!(read_event(text, Some(&usage), true, &mut reported));
        assert_eq!(usage.get(), Some(1));
        let last = br#"data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":4,"total_tokens":6}}

"#;
        assert!(!read_event(last, Some(&usage), true, &mut reported));
        assert_eq!(usage.get(), Some(6));
        assert!(read_event(last, Some(&usage), false, &mut reported));
        assert!(read_event(
            b"data: [DONE]\n\n",
            Some(&usage),
            true,
            &mut reported
        ));
    }
}
