//! Costs read from the body, after the key: an unknown key's body is never
//! read; an authenticated one is read within bounds (413, 408, 400 for a
//! body the estimator cannot read, none of them charged) and handed on byte
//! for byte; requests whose plan or estimator needs no body stream as they
//! came; and the slow-body attack over real TCP connections.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tollgate::openai::OpenAiEstimator;
use tollgate::{
    ApiKey, Estimate, Policy, RateLimitLayer, RequestBody, Throttle, TokenBudget, UsagePlan,
};
use tower::{Service, ServiceBuilder, ServiceExt};

const KEY: &str = "body-key";

/// A policy with one key on a plan of `tokens` per minute (none: no budget).
fn policy(tokens: Option<u32>) -> Policy {
    let mut plan = UsagePlan::new("llm").throttle(Throttle::new(100.0, 100).unwrap());
    if let Some(n) = tokens {
        plan = plan.tokens(TokenBudget::new().per_minute(n).unwrap());
    }
    Policy::builder()
        .plan(plan)
        .key(ApiKey::new("k1", KEY, "llm"))
        .build()
        .unwrap()
}

fn layer(tokens: Option<u32>) -> RateLimitLayer {
    RateLimitLayer::builder(policy(tokens))
        .estimator(OpenAiEstimator::new())
        .max_body_bytes(1024)
        .body_timeout(Duration::from_millis(300))
        .build()
}

/// A body that counts the times it is polled, and yields `chunks` then, if
/// `stall`, never ends.
struct Probe {
    polls: Arc<AtomicUsize>,
    chunks: Vec<Bytes>,
    stall: bool,
}

impl Probe {
    fn new(chunks: &[&[u8]], stall: bool) -> (Self, Arc<AtomicUsize>) {
        let polls = Arc::new(AtomicUsize::new(0));
        let probe = Probe {
            polls: Arc::clone(&polls),
            chunks: chunks
                .iter()
                .rev()
                .map(|c| Bytes::copy_from_slice(c))
                .collect(),
            stall,
        };
        (probe, polls)
    }
}

impl Body for Probe {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        match self.chunks.pop() {
            Some(c) => Poll::Ready(Some(Ok(Frame::data(c)))),
            None if self.stall => Poll::Pending,
            None => Poll::Ready(None),
        }
    }
}

/// The layer over a service that answers with the body it got, and says
/// in `x-read` whether the layer read it first.
fn echo<B>(
    layer: &RateLimitLayer,
) -> impl Service<
    Request<B>,
    Response = Response<tollgate::ResponseBody<Full<Bytes>>>,
    Error = Infallible,
> + Clone
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    ServiceBuilder::new().layer(layer.clone()).service_fn(
        |req: Request<RequestBody<B>>| async move {
            let read = req.body().is_read();
            let estimate = req.extensions().get::<Estimate>().cloned();
            let bytes = req.into_body().collect().await.unwrap().to_bytes();
            let mut res = Response::new(Full::new(bytes));
            res.headers_mut()
                .insert("x-read", if read { "yes" } else { "no" }.parse().unwrap());
            if let Some(e) = estimate {
                res.headers_mut()
                    .insert("x-estimate", e.tokens.to_string().parse().unwrap());
                if let Some(m) = e.model {
                    res.headers_mut().insert("x-model", m.parse().unwrap());
                }
            }
            Ok::<_, Infallible>(res)
        },
    )
}

fn post<B>(key: Option<&str>, body: B) -> Request<B> {
    let mut req = Request::post("/v1/chat/completions").header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    req.body(body).unwrap()
}

/// `body` posted to `route` with the key, through `layer` over [`echo`].
async fn post_to(
    layer: &RateLimitLayer,
    route: &'static str,
    body: &'static str,
) -> Result<Response<tollgate::ResponseBody<Full<Bytes>>>, Infallible> {
    let mut req = post(Some(KEY), Full::new(Bytes::from_static(body.as_bytes())));
    *req.uri_mut() = route.parse().unwrap();
    echo(layer).oneshot(req).await
}

async fn text(res: Response<tollgate::ResponseBody<Full<Bytes>>>) -> String {
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn an_unknown_or_missing_key_is_refused_before_the_body_is_polled() {
    let layer = layer(Some(10_000));
    for key in [Some("not-a-key"), None] {
        let (probe, polls) = Probe::new(&[br#"{"prompt":"x"}"#], false);
        let res = echo(&layer).oneshot(post(key, probe)).await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert_eq!(polls.load(Ordering::SeqCst), 0, "the body was never polled");
    }
}

#[tokio::test]
async fn an_authenticated_body_reaches_the_handler_byte_for_byte() {
    let layer = layer(Some(10_000));
    // A body in two chunks comes out as the one it was.
    let body: &[u8] =
        br#"{"model":"m1","messages":[{"role":"user","content":"abcdefgh"}],"max_tokens":3}"#;
    let (a, b) = body.split_at(17);
    let (probe, _) = Probe::new(&[a, b], false);
    let res = echo(&layer).oneshot(post(Some(KEY), probe)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-read"], "yes");
    assert_eq!(res.headers()["x-estimate"], "5");
    assert_eq!(res.headers()["x-model"], "m1");
    assert_eq!(text(res).await.as_bytes(), body);
}

/// Accepts any body and charges 10 tokens: bytes that are not UTF-8 pass.
struct Ten;

impl tollgate::CostEstimator for Ten {
    fn estimate(&self, _: &tollgate::extract::RequestView<'_>) -> u32 {
        10
    }
    fn reads_body(&self, _: &tollgate::extract::RequestView<'_>) -> bool {
        true
    }
    fn estimate_body(
        &self,
        _: &tollgate::extract::RequestView<'_>,
        body: &[u8],
    ) -> Result<Estimate, tollgate::BodyError> {
        assert_eq!(body, b"\xff\x00\xfe-binary");
        Ok(Estimate::new(10))
    }
}

#[tokio::test]
async fn bytes_that_are_not_utf8_are_handed_on_unchanged() {
    let layer = RateLimitLayer::builder(policy(Some(100)))
        .estimator(Ten)
        .build();
    let (probe, _) = Probe::new(&[b"\xff\x00", b"\xfe-binary"], false);
    let res = echo(&layer).oneshot(post(Some(KEY), probe)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&bytes[..], b"\xff\x00\xfe-binary");
}

/// A request that costs `tokens` passes, to show the budget was untouched.
async fn budget_is_whole(layer: &RateLimitLayer, tokens: u32) {
    let body = format!(r#"{{"model":"m","prompt":"","max_tokens":{tokens}}}"#);
    let res = echo(layer)
        .oneshot(post(Some(KEY), Full::new(Bytes::from(body))))
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "the whole budget is still there"
    );
}

#[tokio::test]
async fn an_oversize_body_is_413_and_costs_nothing() {
    let layer = layer(Some(100));
    let big = format!(r#"{{"prompt":"{}","max_tokens":100}}"#, "a".repeat(2000));
    // Announced by its length, and streamed without one.
    let res = echo(&layer)
        .oneshot(post(Some(KEY), Full::new(Bytes::from(big.clone()))))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // The default (AWS) style's shape.
    let json: serde_json::Value = serde_json::from_str(&text(res).await).unwrap();
    assert!(
        json["message"]
            .as_str()
            .unwrap()
            .contains("larger than 1024 bytes")
    );
    let (probe, _) = Probe::new(&[&big.as_bytes()[..600], &big.as_bytes()[600..]], false);
    let res = echo(&layer).oneshot(post(Some(KEY), probe)).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    budget_is_whole(&layer, 100).await;
}

#[tokio::test]
async fn a_slow_body_is_408_within_the_timeout_and_costs_nothing() {
    let layer = layer(Some(100));
    let (probe, _) = Probe::new(&[br#"{"prompt":"#], true);
    let start = Instant::now();
    let res = echo(&layer).oneshot(post(Some(KEY), probe)).await.unwrap();
    let took = start.elapsed();
    assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(text(res).await.contains("did not arrive within 300 ms"));
    budget_is_whole(&layer, 100).await;
}

#[tokio::test]
async fn a_body_the_estimator_cannot_read_is_400_and_costs_nothing() {
    // In the OpenAI style, OpenAI's error shape.
    let layer = RateLimitLayer::builder(policy(Some(100)))
        .estimator(OpenAiEstimator::new())
        .style(tollgate::ResponseStyle::OpenAi)
        .build();
    for body in [
        &b"not json"[..],
        br#"{"prompt":"cut sh"#,
        br#"{"model":"m"}"#,
        br#"{"prompt":"no model","max_tokens":1}"#,
    ] {
        let res = echo(&layer)
            .oneshot(post(Some(KEY), Full::new(Bytes::from_static(body))))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        assert_eq!(res.headers()["content-type"], "application/json");
        let json: serde_json::Value = serde_json::from_str(&text(res).await).unwrap();
        assert_eq!(json["error"]["type"], "invalid_request_error");
        assert!(!json["error"]["message"].as_str().unwrap().is_empty());
    }
    budget_is_whole(&layer, 100).await;
}

#[tokio::test]
async fn an_empty_or_non_json_body_that_says_so_is_estimated_from_its_head() {
    // OpenAI's cancel calls are bodiless POSTs; audio and file uploads are
    // multipart: none is a completion's JSON, and each passes, charged the
    // head's estimate (0 tokens), its body handed on as it came.
    let layer = layer(Some(100));
    let multipart =
        "--b\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--b--\r\n";
    for (content_type, body) in [
        (Some("application/json"), ""),
        (None, ""),
        (None, " \r\n"),
        (Some("multipart/form-data; boundary=b"), multipart),
        (Some("application/x-www-form-urlencoded"), "a=1&b=2"),
        (Some("application/octet-stream"), "\u{1}\u{2}"),
    ] {
        let mut req = post(Some(KEY), Full::new(Bytes::from(body)));
        req.headers_mut().remove("content-type");
        if let Some(ct) = content_type {
            req.headers_mut()
                .insert("content-type", ct.parse().unwrap());
        }
        let res = echo(&layer).oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{content_type:?} {body:?}");
        assert_eq!(res.headers()["x-estimate"], "0", "{content_type:?}");
        assert_eq!(text(res).await, body);
    }
    budget_is_whole(&layer, 100).await;
}

#[tokio::test]
async fn a_json_body_that_says_it_is_something_else_is_still_estimated() {
    // A server may parse a body as JSON whatever its content type says:
    // a completion sent as text is estimated, and one the estimator cannot
    // read is refused as it would be as JSON.
    let layer = layer(Some(100));
    let send = |ct: &'static str, body: &'static str| {
        let mut req = post(Some(KEY), Full::new(Bytes::from_static(body.as_bytes())));
        req.headers_mut()
            .insert("content-type", ct.parse().unwrap());
        echo(&layer).oneshot(req)
    };
    let res = send(
        "text/plain",
        r#"{"model":"m","prompt":"abcd","max_tokens":9}"#,
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-estimate"], "10");
    for (ct, body) in [
        ("text/plain", r#"{"prompt":"no model","max_tokens":1}"#),
        ("multipart/form-data; boundary=b", r#"{"model":"m"}"#),
        ("application/vnd.api+json", "not json"),
        ("Application/JSON; charset=utf-8", "not json"),
    ] {
        let res = send(ct, body).await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{ct} {body}");
    }
}

#[tokio::test]
async fn an_embeddings_input_is_its_prompt_and_no_answer() {
    let layer = layer(Some(100));
    let call = |route: &'static str, body: &'static str| post_to(&layer, route, body);
    // 8 characters: 2 tokens, and an embedding answers none.
    let body = r#"{"model":"e","input":"abcdefgh"}"#;
    let res = call("/v1/embeddings", body).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-estimate"], "2");
    assert_eq!(res.headers()["x-model"], "e");
    // A Responses request's input, and its bound on the answer.
    let body = r#"{"model":"r","input":[{"role":"user","content":[{"type":"input_text","text":"abcd"}]}],"max_output_tokens":10}"#;
    let res = call("/v1/responses", body).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-estimate"], "11");
    // One naming a prompt template: its variables' text ("abcd"), and the
    // bound; the model is the template's.
    let body = r#"{"prompt":{"id":"pmpt_1","version":"2","variables":{"name":"abcd"}},"max_output_tokens":5}"#;
    let res = call("/v1/responses", body).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-estimate"], "6");
    // A completion's routes take no `input`.
    let body = r#"{"model":"e","input":"abcdefgh"}"#;
    for route in ["/v1/completions", "/v1/chat/completions"] {
        let res = call(route, body).await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{route}");
    }
    // A template is the Responses API's alone.
    let body = r#"{"model":"m","prompt":{"id":"pmpt_1"}}"#;
    let res = call("/v1/completions", body).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    budget_is_whole(&layer, 100 - 2 - 11 - 6).await;
}

/// Servers read different maximums of the answer: vLLM's completions
/// take `max_tokens` alone, its Responses `max_output_tokens` alone, and
/// its chat reads `max_completion_tokens` only when it is not 0 (Python's
/// `or`); Ollama's chat reads `max_tokens`. A body that states several is
/// estimated at the largest, so that a small one beside a large one does
/// not pass a request whose answer may take the large one.
#[tokio::test]
async fn an_answer_is_estimated_at_the_largest_maximum_the_body_states() {
    let layer = layer(Some(1_000));
    let call = |route: &'static str, body: &'static str| post_to(&layer, route, body);
    for (route, body, want) in [
        (
            "/v1/completions",
            r#"{"model":"m","prompt":"abcd","max_completion_tokens":1,"max_tokens":50}"#,
            "51",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"user","content":"abcd"}],"max_completion_tokens":0,"max_tokens":30}"#,
            "31",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"user","content":"abcd"}],"max_tokens":2,"max_completion_tokens":20,"n":2}"#,
            "41",
        ),
        (
            "/v1/responses",
            r#"{"model":"m","input":"abcd","max_tokens":1,"max_output_tokens":40}"#,
            "41",
        ),
    ] {
        let res = call(route, body).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{body}");
        assert_eq!(res.headers()["x-estimate"], want, "{body}");
    }
}

#[tokio::test]
async fn the_estimate_from_the_body_is_charged() {
    let layer = layer(Some(100));
    // 2 prompt tokens + 30 * n=2: 62 of 100.
    let body = r#"{"model":"m","prompt":"abcdefgh","max_completion_tokens":30,"n":2}"#;
    let call = || post(Some(KEY), Full::new(Bytes::from_static(body.as_bytes())));
    let res = echo(&layer).oneshot(call()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-estimate"], "62");
    let res = echo(&layer).oneshot(call()).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn without_a_budget_or_for_grpc_the_body_streams_as_it_came() {
    // No token budget: the body is not read, even a stalled one.
    let layer_free = layer(None);
    let (probe, polls) = Probe::new(&[b"{"], true);
    let mut svc = ServiceBuilder::new().layer(layer_free).service_fn(
        |req: Request<RequestBody<Probe>>| async move {
            assert!(!req.body().is_read());
            let probe = req.into_body().into_streaming().expect("the original body");
            assert_eq!(probe.polls.load(Ordering::SeqCst), 0);
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        },
    );
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(post(Some(KEY), probe))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(polls.load(Ordering::SeqCst), 0);

    // A budget, but a gRPC call: never read.
    let layer = layer(Some(100));
    let (probe, polls) = Probe::new(&[b"\0\0\0\0\x05hello"], true);
    let mut req = post(Some(KEY), probe);
    req.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    let mut svc = ServiceBuilder::new().layer(layer).service_fn(
        |req: Request<RequestBody<Probe>>| async move {
            assert!(!req.body().is_read());
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        },
    );
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(polls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_get_is_not_read_by_the_openai_estimator() {
    let layer = layer(Some(100));
    let (probe, polls) = Probe::new(&[], true);
    let mut req = post(Some(KEY), probe);
    *req.method_mut() = http::Method::GET;
    let mut svc = ServiceBuilder::new().layer(layer).service_fn(
        |req: Request<RequestBody<Probe>>| async move {
            assert!(!req.body().is_read());
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        },
    );
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(polls.load(Ordering::SeqCst), 0);
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Opens `n` connections to `addr` that each send a head announcing a
/// megabyte of body with `key`, then a few bytes of it, and nothing more;
/// returns how long each waited for its status line, and the status.
async fn slow_bodies(addr: std::net::SocketAddr, n: usize, key: &str) -> Vec<(Duration, u16)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{{\"prompt\":\"",
            1 << 20
        );
        tasks.spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let start = Instant::now();
            stream.write_all(head.as_bytes()).await.unwrap();
            let mut buf = [0u8; 12];
            stream.read_exact(&mut buf).await.unwrap();
            let took = start.elapsed();
            let status = std::str::from_utf8(&buf[9..12]).unwrap().parse().unwrap();
            // Held open until every connection has its answer.
            (took, status, stream)
        });
    }
    let mut out = Vec::new();
    let mut streams = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (took, status, stream) = done.unwrap();
        out.push((took, status));
        streams.push(stream);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_slow_bodies_cost_no_memory() {
    use axum::{Router, routing::post as route_post};
    const N: usize = 500;
    let timeout = Duration::from_millis(1500);
    let layer = RateLimitLayer::builder(policy(Some(10_000_000)))
        .estimator(OpenAiEstimator::new())
        .body_timeout(timeout)
        .build();
    let app = Router::new()
        .route(
            "/v1/completions",
            route_post(|body: Bytes| async move { body }),
        )
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // Warm up the runtime, the server and the allocator, and load the
    // tokenizers other tests of this binary load at the same time: their
    // tens of megabytes, shared by the process, would count here.
    for t in [
        tollgate::openai::Tokenizer::Cl100kBase,
        tollgate::openai::Tokenizer::O200kBase,
    ] {
        assert!(t.count("warm") > 0);
    }
    slow_bodies(addr, 20, "nobody").await;
    let before = rss();

    // Unknown keys: answered 403 at once, their bodies never read.
    let answers = slow_bodies(addr, N, "nobody").await;
    assert!(answers.iter().all(|&(_, s)| s == 403), "{answers:?}");
    let slowest = answers.iter().map(|a| a.0).max().unwrap();
    assert!(slowest < timeout, "403s waited for nothing: {slowest:?}");

    // A valid key: each read until the timeout, then 408.
    let answers = slow_bodies(addr, N, KEY).await;
    assert!(
        answers.iter().all(|&(_, s)| s == 408),
        "{:?}",
        &answers[..5]
    );
    for &(took, _) in &answers {
        assert!(took >= timeout - Duration::from_millis(50), "{took:?}");
        assert!(took < timeout + Duration::from_secs(3), "{took:?}");
    }

    let after = rss();
    let grown = after.saturating_sub(before);
    // A megabyte buffered per connection would be 500 MB; the connections
    // themselves take some tens of kilobytes each.
    assert!(grown < 64 << 20, "grew {} MB", grown >> 20);
}

/// A plan with limits per model and no function naming the model reads the
/// body's `model` (after the key is checked) and decides that model's
/// limits: one model is held while another passes, and a model the plan
/// does not name gets its `"*"` entry.
#[tokio::test]
async fn the_body_names_the_model_whose_limits_apply() {
    use tollgate::ModelLimits;
    let one = |burst| ModelLimits::new().throttle(Throttle::new(0.001, burst).unwrap());
    let plan = UsagePlan::new("llm")
        .throttle(Throttle::new(100.0, 100).unwrap())
        .model("big", one(1))
        .model("*", one(2));
    let policy = Policy::builder()
        .plan(plan)
        .key(ApiKey::new("k1", KEY, "llm"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy)
        .estimator(OpenAiEstimator::new())
        .build();
    let call = |model: &str| {
        let body = format!(r#"{{"model":"{model}","prompt":"hi","max_tokens":1}}"#);
        post(Some(KEY), Full::new(Bytes::from(body)))
    };
    let status = |res: &Response<_>| res.status().as_u16();
    let limit = |res: &Response<_>| {
        res.extensions()
            .get::<tollgate::Rejection>()
            .and_then(|r| r.limit())
            .map(str::to_owned)
    };
    let res = echo(&layer).oneshot(call("big")).await.unwrap();
    assert_eq!(status(&res), 200);
    assert_eq!(
        res.headers()["x-model"],
        "big",
        "the handler sees the estimate"
    );
    let res = echo(&layer).oneshot(call("big")).await.unwrap();
    assert_eq!((status(&res), limit(&res).as_deref()), (429, Some("model")));
    // Another model: the "*" entry, two requests for every unnamed model.
    for model in ["small", "tiny"] {
        let res = echo(&layer).oneshot(call(model)).await.unwrap();
        assert_eq!(status(&res), 200, "{model}");
    }
    let res = echo(&layer).oneshot(call("other")).await.unwrap();
    assert_eq!((status(&res), limit(&res).as_deref()), (429, Some("model")));
}

/// An empty `model` names no model: OpenAI refuses it as it refuses a
/// missing one, and vLLM serves it with its default model, which may be the
/// one the plan limits. It is refused as a body naming no model is, and
/// costs nothing, rather than decided as a model the plan does not name.
#[tokio::test]
async fn an_empty_model_is_no_model() {
    use tollgate::ModelLimits;
    let plan = UsagePlan::new("llm")
        .throttle(Throttle::new(100.0, 100).unwrap())
        .model(
            "big",
            ModelLimits::new().throttle(Throttle::new(0.001, 1).unwrap()),
        );
    let policy = Policy::builder()
        .plan(plan)
        .key(ApiKey::new("k1", KEY, "llm"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy)
        .estimator(OpenAiEstimator::new())
        .build();
    let call = |model: &str| {
        let body = format!(r#"{{"model":"{model}","prompt":"hi","max_tokens":1}}"#);
        post(Some(KEY), Full::new(Bytes::from(body)))
    };
    for _ in 0..3 {
        let res = echo(&layer).oneshot(call("")).await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    }
    let res = echo(&layer).oneshot(call("big")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

/// OpenAI's estimate, with its bodies checked under every plan.
struct Checked(OpenAiEstimator);

impl tollgate::CostEstimator for Checked {
    fn estimate(&self, req: &tollgate::extract::RequestView<'_>) -> u32 {
        self.0.estimate(req)
    }
    fn reads_body(&self, req: &tollgate::extract::RequestView<'_>) -> bool {
        self.0.reads_body(req)
    }
    fn checks_body(&self, req: &tollgate::extract::RequestView<'_>) -> bool {
        self.0.reads_body(req)
    }
    fn estimate_body(
        &self,
        req: &tollgate::extract::RequestView<'_>,
        body: &[u8],
    ) -> Result<Estimate, tollgate::BodyError> {
        self.0.estimate_body(req, body)
    }
}

/// An estimator that checks bodies under every plan has them read, after
/// the key, under a plan without a token budget too: one it refuses is a
/// 400 that charges nothing (here two requests a plan allows stay whole),
/// one it accepts reaches the handler byte for byte; a GET is not read.
#[tokio::test]
async fn a_body_checked_under_every_plan_is_400_and_costs_nothing_without_a_budget() {
    let policy = Policy::builder()
        .plan(UsagePlan::new("two").throttle(Throttle::new(0.001, 2).unwrap()))
        .key(ApiKey::new("k1", KEY, "two"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy)
        .estimator(Checked(OpenAiEstimator::new()))
        .build();
    // The key is still checked before a byte of the body is read.
    let (probe, polls) = Probe::new(&[b"not json"], false);
    let res = echo(&layer)
        .oneshot(post(Some("not-a-key"), probe))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(polls.load(Ordering::SeqCst), 0, "the body was never polled");
    for body in [&br#"{"model":"#[..], b"not json", br#"{"model":"m"}"#] {
        let res = echo(&layer)
            .oneshot(post(Some(KEY), Full::new(Bytes::from_static(body))))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        assert!(res.headers().get("ratelimit").is_none());
    }
    // A GET is not read, and is charged as before.
    let (probe, polls) = Probe::new(&[], true);
    let mut get = post(Some(KEY), probe);
    *get.method_mut() = http::Method::GET;
    let mut svc = ServiceBuilder::new().layer(layer.clone()).service_fn(
        |req: Request<RequestBody<Probe>>| async move {
            assert!(!req.body().is_read());
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        },
    );
    let res = svc.ready().await.unwrap().call(get).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(polls.load(Ordering::SeqCst), 0);
    let body = r#"{"model":"m","prompt":"hi","max_tokens":1}"#;
    let call = || post(Some(KEY), Full::new(Bytes::from_static(body.as_bytes())));
    let res = echo(&layer).oneshot(call()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "the plan's second request");
    assert_eq!(res.headers()["x-read"], "yes");
    assert_eq!(text(res).await, body);
    let res = echo(&layer).oneshot(call()).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
}

/// Go's `encoding/json` (Ollama's server) takes a key for a struct's field
/// whatever its case (the Kelvin sign for `k` and the long `ſ` for `s`
/// too), the last one winning: `{"model":"small","Model":"big"}` is `big`
/// to it, and a message's `"Content"` its content. A body holding a key that
/// differs from a field the estimate reads only in case, at any level, is
/// refused with the reason, and costs nothing; keys of the objects the
/// estimate does not read (a tool's parameters, metadata) are the client's.
#[tokio::test]
async fn a_key_that_differs_from_a_field_only_in_case_is_refused() {
    let layer = RateLimitLayer::builder(policy(Some(100)))
        .estimator(OpenAiEstimator::new())
        .style(tollgate::ResponseStyle::OpenAi)
        .build();
    let call = |route: &str, body: &str| {
        let mut req = post(Some(KEY), Full::new(Bytes::from(body.to_owned())));
        *req.uri_mut() = route.parse().unwrap();
        echo(&layer).oneshot(req)
    };
    for (route, body, key) in [
        (
            "/v1/chat/completions",
            r#"{"model":"small","Model":"big","messages":[{"role":"user","content":"hi"}],"max_tokens":1}"#,
            "Model",
        ),
        (
            "/v1/completions",
            r#"{"model":"m","prompt":"hi","max_tokens":1,"MAX_TOKENS":500}"#,
            "MAX_TOKENS",
        ),
        (
            "/v1/completions",
            "{\"model\":\"m\",\"prompt\":\"hi\",\"max_tokens\":1,\"max_to\u{212A}ens\":500}",
            "max_to\u{212A}ens",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"Max_Completion_Tokens":500,"max_tokens":1}"#,
            "Max_Completion_Tokens",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":1,"N":8}"#,
            "N",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"user","content":"hi","Content":"a long text"}],"max_tokens":1}"#,
            "Content",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m","Messages":[{"role":"user","content":"a long text"}],"messages":[],"max_tokens":1}"#,
            "Messages",
        ),
        (
            "/v1/completions",
            "{\"model\":\"m\",\"prompt\":\"hi\",\"max_tokens\":1,\"\u{17F}tream\":true}",
            "\u{17F}tream",
        ),
        (
            "/v1/completions",
            r#"{"model":"m","prompt":"hi","max_tokens":1,"stream":true,"Stream_Options":{"include_usage":false}}"#,
            "Stream_Options",
        ),
        (
            "/v1/responses",
            r#"{"model":"m","input":"hi","Max_Output_Tokens":500,"max_output_tokens":1}"#,
            "Max_Output_Tokens",
        ),
        (
            "/v1/embeddings",
            r#"{"model":"m","input":"hi","INPUT":"a long text"}"#,
            "INPUT",
        ),
    ] {
        let res = call(route, body).await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{body}");
        let json: serde_json::Value = serde_json::from_str(&text(res).await).unwrap();
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("`{key}`")), "{body}: {message}");
    }
    // Nested in content parts and Responses items, refused all the same.
    for (route, body) in [
        (
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi","TEXT":"a long text"}]}],"max_tokens":1}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"user","content":[{"Type":"text","type":"image_url","text":"a long text"}]}],"max_tokens":1}"#,
        ),
        (
            "/v1/responses",
            r#"{"model":"m","input":[{"role":"user","CONTENT":"a long text"}],"max_output_tokens":1}"#,
        ),
        (
            "/v1/responses",
            r#"{"prompt":{"id":"pmpt_1","Variables":{"a":"a long text"}},"max_output_tokens":1}"#,
        ),
    ] {
        let res = call(route, body).await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{body}");
    }
    budget_is_whole(&layer, 100).await;
    // The keys of a tool's parameters, or of metadata, are not the body's.
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":1,
        "metadata":{"Model":"x","N":"2"},
        "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object",
            "properties":{"Model":{"type":"string"},"Content":{"type":"string"}}}}}]}"#;
    let mut req = post(Some(KEY), Full::new(Bytes::from_static(body.as_bytes())));
    *req.uri_mut() = "/v1/chat/completions".parse().unwrap();
    let res = echo(&self::layer(Some(100))).oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // "hi" and the tool's definition, written compactly, are the prompt
    // (metadata is not): ceil((2 + 143) / 4) = 37, and 1 to answer.
    let tool = r#"{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"Model":{"type":"string"},"Content":{"type":"string"}}}}}"#;
    assert_eq!(tool.len(), 143);
    assert_eq!(res.headers()["x-estimate"], "38");
}

/// llama.cpp's server bounds the answer by `n_predict`, its own name, which
/// wins over `max_tokens` when both are there (a negative one bounds it by
/// nothing but the context). The estimate counts it as it counts the other
/// maximums: a `"max_tokens": 1` beside `"n_predict": 500` does not pass a
/// request whose answer may take 500 tokens as one of 1.
#[tokio::test]
async fn llama_cpps_n_predict_is_a_maximum_the_body_states() {
    let layer = layer(Some(1_000));
    let call = |route: &'static str, body: &'static str| post_to(&layer, route, body);
    for (route, body, want) in [
        (
            "/v1/completions",
            r#"{"model":"m","prompt":"abcd","max_tokens":1,"n_predict":500}"#,
            "501",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"user","content":"abcd"}],"n_predict":40}"#,
            "41",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"user","content":"abcd"}],"max_tokens":30,"n_predict":5}"#,
            "31",
        ),
        // Unbounded: at least what a body stating no maximum is estimated.
        (
            "/v1/completions",
            r#"{"model":"m","prompt":"abcd","max_tokens":1,"n_predict":-1}"#,
            "17",
        ),
        (
            "/v1/completions",
            r#"{"model":"m","prompt":"abcd","max_tokens":1,"n_predict":null}"#,
            "2",
        ),
        // An embedding's answer is vectors, whatever the body says.
        (
            "/v1/embeddings",
            r#"{"model":"m","input":"abcd","n_predict":500}"#,
            "1",
        ),
    ] {
        let res = call(route, body).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{body}");
        assert_eq!(res.headers()["x-estimate"], want, "{body}");
    }
}

/// A Responses request's `instructions` and a Messages request's `system`
/// are the prompt's first message to every server that serves them (vLLM,
/// llama.cpp's server, Ollama): they are counted as its text, not left out
/// of the estimate while the model reads them.
#[tokio::test]
async fn instructions_and_a_system_prompt_are_counted() {
    let layer = layer(Some(1_000));
    let call = |route: &str, body: String| {
        let mut req = post(Some(KEY), Full::new(Bytes::from(body)));
        *req.uri_mut() = route.parse().unwrap();
        echo(&layer).oneshot(req)
    };
    let long = "abcd".repeat(100);
    for (route, body, want) in [
        (
            "/v1/responses",
            format!(
                r#"{{"model":"m","input":"abcd","instructions":"{long}","max_output_tokens":5}}"#
            ),
            "106",
        ),
        (
            "/v1/messages",
            format!(
                r#"{{"model":"m","system":"{long}","messages":[{{"role":"user","content":"abcd"}}],"max_tokens":5}}"#
            ),
            "106",
        ),
        (
            "/v1/messages",
            format!(
                r#"{{"model":"m","system":[{{"type":"text","text":"{long}"}}],"messages":[{{"role":"user","content":"abcd"}}],"max_tokens":5}}"#
            ),
            "106",
        ),
        (
            "/v1/responses",
            r#"{"model":"m","input":"abcd","instructions":null,"max_output_tokens":5}"#.to_owned(),
            "6",
        ),
    ] {
        let res = call(route, body.clone()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{body}");
        assert_eq!(res.headers()["x-estimate"], want, "{body}");
    }
}

/// A backend serves one model under several spellings: Ollama reads model
/// names without regard to ASCII case, a bare name as `name:latest`, and
/// `library/name` or `registry.ollama.ai/library/name` as `name`. A model's
/// limits hold for each of them, so no spelling escapes them; a spelling
/// that names another model (another tag) is not held by them.
#[tokio::test]
async fn a_models_limits_hold_for_every_spelling_of_its_name() {
    use tollgate::ModelLimits;
    let one = |burst| ModelLimits::new().throttle(Throttle::new(0.001, burst).unwrap());
    for star in [false, true] {
        let mut plan = UsagePlan::new("llm")
            .throttle(Throttle::new(100.0, 100).unwrap())
            .model("big-model", one(1))
            .model("Small:7B", one(1));
        if star {
            plan = plan.model("*", one(50));
        }
        let policy = Policy::builder()
            .plan(plan)
            .key(ApiKey::new("k1", KEY, "llm"))
            .build()
            .unwrap();
        let layer = RateLimitLayer::builder(policy)
            .estimator(OpenAiEstimator::new())
            .build();
        let call = |model: &str| {
            let body = format!(r#"{{"model":"{model}","prompt":"hi","max_tokens":1}}"#);
            post(Some(KEY), Full::new(Bytes::from(body)))
        };
        let limit = |res: &Response<_>| {
            res.extensions()
                .get::<tollgate::Rejection>()
                .and_then(|r| r.limit())
                .map(str::to_owned)
        };
        let res = echo(&layer).oneshot(call("big-model")).await.unwrap();
        assert_eq!(res.status(), 200);
        for spelling in [
            "big-model",
            "Big-Model",
            "BIG-MODEL",
            "big-model:latest",
            "Big-Model:LATEST",
            "library/big-model",
            "registry.ollama.ai/library/big-model:latest",
            "https://registry.ollama.ai/library/Big-Model",
        ] {
            let res = echo(&layer).oneshot(call(spelling)).await.unwrap();
            assert_eq!(
                (res.status().as_u16(), limit(&res).as_deref()),
                (429, Some("model")),
                "{spelling} (with \"*\": {star})"
            );
        }
        let res = echo(&layer).oneshot(call("small:7b")).await.unwrap();
        assert_eq!(res.status(), 200);
        for spelling in ["SMALL:7b", "library/small:7B"] {
            let res = echo(&layer).oneshot(call(spelling)).await.unwrap();
            assert_eq!(res.status(), 429, "{spelling} (with \"*\": {star})");
        }
        // Other models: another tag, another namespace, another name.
        for other in ["big-model:70b", "someone/big-model", "big-model-2", "small"] {
            let res = echo(&layer).oneshot(call(other)).await.unwrap();
            assert_eq!(res.status(), 200, "{other} (with \"*\": {star})");
        }
    }
}

/// A body that opens as a JSON object is estimated as JSON whatever its
/// `content-type` says, and refused (400, costing nothing) when the
/// estimate cannot read it. llama.cpp's server and Ollama parse every body
/// as JSON whatever its type, and read what serde's parser refuses: a
/// byte-order mark before the object (llama.cpp's parser skips it), a lone
/// surrogate or bytes that are not UTF-8 in a string (Go's `encoding/json`
/// reads them as U+FFFD); and one cut short is refused as it is when it
/// says it is JSON. Such a body sent as `text/plain` was estimated
/// from its head: 0 tokens and no model, so a request for `"big"` with an
/// answer of 5,000 tokens passed under a budget of 100 tokens and past the
/// model's own limit, served by a real server on loopback.
#[tokio::test]
async fn a_body_that_opens_as_a_json_object_is_json_whatever_it_is_said_to_be() {
    use tollgate::ModelLimits;
    let plan = UsagePlan::new("llm")
        .throttle(Throttle::new(100.0, 100).unwrap())
        .tokens(TokenBudget::new().per_minute(100).unwrap())
        .model(
            "big",
            ModelLimits::new().throttle(Throttle::new(0.001, 1).unwrap()),
        );
    let policy = Policy::builder()
        .plan(plan)
        .key(ApiKey::new("k1", KEY, "llm"))
        .build()
        .unwrap();
    let layer = RateLimitLayer::builder(policy)
        .estimator(OpenAiEstimator::new())
        .build();
    let served = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&served);
    let app = axum::Router::new()
        .route(
            "/v1/chat/completions",
            axum::routing::post(move |_: Bytes| async move {
                counted.fetch_add(1, Ordering::SeqCst);
                "served"
            }),
        )
        .layer(layer);
    let base = crate::support::serve(app).await;
    let client = crate::support::client();
    let send = |content_type: &'static str, body: Vec<u8>| {
        client
            .post(format!("{base}/v1/chat/completions"))
            .header("x-api-key", KEY)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let chat = |content: &[u8]| {
        [
            br#"{"model":"big","messages":[{"role":"user","content":"hi"#.as_slice(),
            content,
            br#""}],"max_tokens":5000}"#,
        ]
        .concat()
    };
    let cases: [(&str, Vec<u8>); 4] = [
        (
            "a byte-order mark",
            [b"\xEF\xBB\xBF".as_slice(), &chat(b"")].concat(),
        ),
        ("a lone surrogate", chat(br"\ud800")),
        ("a byte that is not UTF-8", chat(b"\xFF")),
        (
            "whitespace, then a body cut short",
            [b" \r\n\t".as_slice(), &chat(b"")[..40]].concat(),
        ),
    ];
    for content_type in ["text/plain", "application/octet-stream"] {
        for (what, body) in &cases {
            let res = send(content_type, body.clone()).await.unwrap();
            assert_eq!(res.status(), 400, "{what} as {content_type}");
            assert_eq!(res.headers()["content-type"], "application/json");
            let json: serde_json::Value = res.json().await.unwrap();
            let message = json["message"].as_str().unwrap();
            assert!(message.contains("not valid JSON"), "{what}: {message}");
        }
    }
    assert_eq!(served.load(Ordering::SeqCst), 0, "none was served");
    // Nothing was charged: the whole budget, and the model's one request.
    // "hi" is 1 token: 100 in all.
    let whole = br#"{"model":"big","messages":[{"role":"user","content":"hi"}],"max_tokens":99}"#;
    let res = send("text/plain", whole.to_vec()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(served.load(Ordering::SeqCst), 1);
    // A body that does not open as an object, and says it is not JSON, is
    // still estimated from its head.
    let res = send("application/octet-stream", b"\xEF\xBB\xBF[1]".to_vec())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}
