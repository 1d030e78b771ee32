//! Upstream mode: a gateway forwarding `/v1/*` to a second gateway in mock
//! mode (both in this process, on loopback ports), or to small backends
//! that fail in the ways real ones do, with a real HTTP client in front.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{any, post};
use serde_json::{Value, json};
use tollgate::config::Config;
use tollgate::{ManualClock, MemoryStore};
use tollgate_gateway::{Limits, Upstream};

/// The backend's own plan: it knows only the gateway's key, and counts the
/// tokens the gateway's requests make it produce.
const UPSTREAM_CONFIG: &str = r#"
[[plans]]
name = "backend"
throttle = { rate = 1000.0, burst = 1000 }
tokens = { per_minute = 1000 }

[[keys]]
id = "gateway"
value = "gateway-secret"
plan = "backend"

[response]
style = "openai"
"#;

/// The gateway's plan: 1000 tokens a minute for the client's key.
const FRONT_CONFIG: &str = r#"
[[plans]]
name = "llm"
throttle = { rate = 1000.0, burst = 1000 }
tokens = { per_minute = 1000 }

[[keys]]
id = "client"
value = "client-key"
plan = "llm"

[response]
style = "openai"
"#;

/// Serves `router` on a loopback port until the returned sender is dropped.
async fn serve(router: Router) -> (String, tokio::sync::oneshot::Sender<()>) {
    serve_with(router, Limits::default()).await
}

/// Serves `router` within `limits` on a loopback port until the returned
/// sender is dropped.
async fn serve_with(router: Router, limits: Limits) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tollgate_gateway::serve_with(
        listener,
        router,
        async {
            let _ = rx.await;
        },
        limits,
    ));
    (format!("http://{addr}"), tx)
}

/// A gateway in mock mode, the backend.
async fn mock_backend() -> (String, tokio::sync::oneshot::Sender<()>) {
    let config = Config::from_toml(UPSTREAM_CONFIG).unwrap();
    serve(tollgate_gateway::app(&config, MemoryStore::new()).unwrap()).await
}

struct Front {
    base: String,
    clock: ManualClock,
    client: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// The gateway in front of `upstream`.
async fn front(upstream: Upstream) -> Front {
    front_with(FRONT_CONFIG, upstream).await
}

/// The gateway with `config` in front of `upstream`.
async fn front_with(config: &str, upstream: Upstream) -> Front {
    front_limited(config, upstream, Limits::default()).await
}

/// The gateway with `config` in front of `upstream`, served within `limits`.
async fn front_limited(config: &str, upstream: Upstream, limits: Limits) -> Front {
    let clock = ManualClock::new();
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    let config = Config::from_toml(config).unwrap();
    let app = tollgate_gateway::app_with(&config, store, Some(&upstream)).unwrap();
    let (base, stop) = serve_with(app, limits).await;
    Front {
        base,
        clock,
        client: reqwest::Client::new(),
        _stop: stop,
    }
}

/// The gateway in front of a mock backend, with the backend's key.
async fn pair() -> (Front, String, tokio::sync::oneshot::Sender<()>) {
    let (backend, stop) = mock_backend().await;
    let upstream = Upstream::new(&format!("{backend}/v1"))
        .unwrap()
        .key("gateway-secret")
        .unwrap();
    (front(upstream).await, backend, stop)
}

/// A completion of an empty prompt (its estimate is `max_tokens`) of which
/// the mock produces `produced`.
fn completion(max_tokens: u32, produced: u32, stream: bool) -> Value {
    json!({
        "model": "m", "prompt": "", "max_tokens": max_tokens, "stream": stream,
        "mock_completion_tokens": produced, "mock_token_ms": 0,
    })
}

impl Front {
    async fn post(&self, route: &str, body: &Value) -> reqwest::Response {
        self.post_text(route, &body.to_string()).await
    }

    /// Posts `body` as it is, JSON or not.
    async fn post_text(&self, route: &str, body: &str) -> reqwest::Response {
        self.client
            .post(format!("{}{route}", self.base))
            .header("authorization", "Bearer client-key")
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }

    /// Polls until a completion of `max_tokens` (producing nothing) gets
    /// `status`: settlements land when the server sees a body end. Two
    /// seconds at most.
    async fn until(&self, max_tokens: u32, status: u16) -> reqwest::Response {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let res = self
                .post("/v1/completions", &completion(max_tokens, 0, false))
                .await;
            if res.status() == status || Instant::now() > deadline {
                return res;
            }
            let _ = res.bytes().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Polls the backend directly, as the gateway, until a completion of
/// `max_tokens` fits in its budget; whether it did within two seconds.
async fn backend_fits(backend: &str, max_tokens: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if backend_status(backend, max_tokens).await == 200 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The status of one completion of `max_tokens` asked of the backend
/// directly, as the gateway.
async fn backend_status(backend: &str, max_tokens: u32) -> u16 {
    reqwest::Client::new()
        .post(format!("{backend}/v1/completions"))
        .header("authorization", "Bearer gateway-secret")
        .header("content-type", "application/json")
        .body(completion(max_tokens, 0, false).to_string())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The `data:` payloads of a server-sent event stream.
fn events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn plain_answers_come_from_the_upstream_and_settle_its_usage() {
    let (s, _backend, _stop) = pair().await;
    // 900 reserved, 100 used: 800 come back.
    let res = s
        .post("/v1/completions", &completion(900, 100, false))
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "100");
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["total_tokens"], 100);
    assert_eq!(v["choices"][0]["text"], "tok ".repeat(100));
    // Exactly 100 were charged: 900 fit, and fill the budget.
    let res = s.until(900, 200).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "0");
    let _ = res.bytes().await;
    // A chat answer, and the backend's model list.
    s.clock.advance(Duration::from_secs(60));
    let chat =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let res = s.post("/v1/chat/completions", &chat).await;
    let status = res.status();
    let v: Value = res.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "tok tok ");
    let res = s
        .client
        .get(format!("{}/v1/models", s.base))
        .header("x-api-key", "client-key")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["data"][0]["id"], "mock");
    // The client sees the gateway's limits, not the backend's.
    let res = s.post("/v1/completions", &completion(10, 1, false)).await;
    assert_eq!(res.headers()["x-ratelimit-limit-tokens"], "1000");
    assert_eq!(
        res.headers()
            .get_all("x-ratelimit-limit-tokens")
            .iter()
            .count(),
        1
    );
}

#[tokio::test]
async fn a_stream_ends_without_the_usage_chunk_the_client_did_not_ask_for() {
    let (s, _backend, _stop) = pair().await;
    let res = s.post("/v1/completions", &completion(500, 50, true)).await;
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = res.text().await.unwrap();
    let events = events(&text);
    // 50 tokens, the finish, [DONE]: no usage chunk.
    assert_eq!(events.len(), 52, "{text}");
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(!text.contains("\"choices\":[]"), "{text}");
    assert!(!text.contains("total_tokens"), "{text}");
    let finish: Value = serde_json::from_str(&events[50]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    // The backend's usage (50) was settled all the same: 950 fit, exactly.
    let res = s.until(950, 200).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "0");
}

/// A backend asked for the usage chunk puts `"usage": null` on every other
/// chunk, as OpenAI's API does: a client that did not ask for the usage
/// gets chunks without it, as from the backend directly, whatever the
/// backend's spacing. They passed with `"usage":null`, which a client that
/// looks for the key (a field it never asked for) took for a usage.
#[tokio::test]
async fn a_stream_the_client_did_not_ask_the_usage_of_has_no_usage_field() {
    // The mock's compact JSON, and a backend spacing it as Python does.
    let spaced = Router::new().route(
        "/v1/chat/completions",
        post(|axum::Json(req): axum::Json<Value>| async move {
            let asked = req["stream_options"]["include_usage"] == true;
            let usage = if asked { "\"usage\": null" } else { "\"x\": 1" };
            let mut text = String::new();
            text.push_str(&format!(
                "data: {{\"object\": \"chat.completion.chunk\", {usage}, \"choices\": [{{\"index\": 0, \"delta\": {{\"content\": \"usage\"}}}}]}}\n\n"
            ));
            text.push_str(&format!(
                "data: {{{usage} , \"choices\": [{{\"index\": 0, \"delta\": {{}}, \"finish_reason\": \"stop\"}}]}}\n\n"
            ));
            if asked {
                text.push_str("data: {\"choices\": [], \"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": 1, \"total_tokens\": 4}}\n\n");
            }
            text.push_str("data: [DONE]\n\n");
            ([("content-type", "text/event-stream")], text)
        }),
    );
    let (spaced, _stop_spaced) = serve(spaced).await;
    let (s, _backend, _stop) = pair().await;
    let spaced = front(Upstream::new(&spaced).unwrap()).await;
    let chat = json!({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
        "stream": true, "mock_token_ms": 0,
    });
    for (front, chunks) in [(&s, 5), (&spaced, 2)] {
        let res = front.post("/v1/chat/completions", &chat).await;
        assert_eq!(res.status(), 200);
        let text = res.text().await.unwrap();
        let events = events(&text);
        assert_eq!(events.len(), chunks + 1, "{text}");
        assert_eq!(events.last().unwrap(), "[DONE]");
        for event in &events[..chunks] {
            let chunk: Value =
                serde_json::from_str(event).unwrap_or_else(|e| panic!("{e}: {event}"));
            assert!(chunk.get("usage").is_none(), "{text}");
            assert_eq!(chunk["choices"].as_array().unwrap().len(), 1, "{text}");
        }
    }
    // A client that asked for it gets `"usage": null` on every chunk, and
    // the usage chunk, as the backend sent them.
    let mut asked = chat.clone();
    asked["stream_options"] = json!({"include_usage": true});
    let text = s
        .post("/v1/chat/completions", &asked)
        .await
        .text()
        .await
        .unwrap();
    let events = events(&text);
    assert_eq!(events.len(), 7, "{text}");
    for event in &events[..5] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert_eq!(chunk.get("usage"), Some(&Value::Null), "{text}");
    }
}

/// vLLM's `stream_options.continuous_usage_stats` puts a usage on every
/// chunk, but only beside `include_usage`: a client that asks for it alone
/// gets no usage from vLLM, and none through the gateway either, which
/// asks for the usage chunk without turning on the client's own option.
#[tokio::test]
async fn a_continuous_usage_the_client_did_not_turn_on_stays_off() {
    let backend = Router::new().route(
        "/v1/chat/completions",
        post(|axum::Json(req): axum::Json<Value>| async move {
            let options = &req["stream_options"];
            let usage = json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5});
            let every =
                options["include_usage"] == true && options["continuous_usage_stats"] == true;
            let mut text = String::new();
            for _ in 0..2 {
                let mut chunk = json!({"object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": "tok "}}]});
                if every {
                    chunk["usage"] = usage.clone();
                }
                text.push_str(&format!("data: {chunk}\n\n"));
            }
            if options["include_usage"] == true {
                let last =
                    json!({"object": "chat.completion.chunk", "choices": [], "usage": usage});
                text.push_str(&format!("data: {last}\n\n"));
            }
            text.push_str("data: [DONE]\n\n");
            ([("content-type", "text/event-stream")], text)
        }),
    );
    let (backend, _stop) = serve(backend).await;
    let s = front(Upstream::new(&backend).unwrap()).await;
    let chat = json!({
        "model": "m", "messages": [{"role": "user", "content": "abcdefgh"}], "max_tokens": 500,
        "stream": true, "stream_options": {"continuous_usage_stats": true},
    });
    let text = s
        .post("/v1/chat/completions", &chat)
        .await
        .text()
        .await
        .unwrap();
    let events = events(&text);
    assert_eq!(events.len(), 3, "{text}");
    assert!(!text.contains("usage"), "{text}");
    // Settled from the backend's usage all the same: 5 of 1000.
    assert_eq!(s.tokens_left(995).await, 995);
}

#[tokio::test]
async fn a_stream_keeps_the_usage_chunk_the_client_asked_for() {
    let (s, _backend, _stop) = pair().await;
    let chat = json!({
        "model": "m", "messages": [{"role": "user", "content": "abcdefgh"}], "max_tokens": 500,
        "stream": true, "stream_options": {"include_usage": true},
        "mock_completion_tokens": 40, "mock_token_ms": 0,
    });
    let text = s
        .post("/v1/chat/completions", &chat)
        .await
        .text()
        .await
        .unwrap();
    let events = events(&text);
    // The role, 40 tokens, the finish, the usage, [DONE].
    assert_eq!(events.len(), 44, "{text}");
    let usage: Value = serde_json::from_str(&events[42]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["total_tokens"], 42);
    // 42 used: 958 fit, exactly.
    let res = s.until(958, 200).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "0");
}

#[tokio::test]
async fn the_clients_key_never_reaches_the_upstream() {
    // The backend knows only the gateway's key. The client's `x-api-key`,
    // were it forwarded beside the gateway's Bearer, would be refused as a
    // second key; its Bearer as an unknown one.
    let (s, backend, _stop) = pair().await;
    let res = s
        .client
        .post(format!("{}/v1/completions", s.base))
        .header("x-api-key", "client-key")
        .header("content-type", "application/json")
        .body(completion(10, 1, false).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{:?}", res.text().await);
    let res = s.post("/v1/completions", &completion(10, 1, false)).await;
    assert_eq!(res.status(), 200);
    // Without a key of its own, the gateway sends none: the backend's
    // refusal passes through as it is, and costs nothing.
    let unkeyed = front(Upstream::new(&backend).unwrap()).await;
    let res = unkeyed
        .post("/v1/completions", &completion(900, 1, false))
        .await;
    assert!(matches!(res.status().as_u16(), 401 | 403), "{res:?}");
    let v: Value = res.json().await.unwrap();
    assert!(v["error"]["message"].is_string(), "{v}");
    // (Were the 900 of the first still charged, the next 900 would be a 429.)
    let res = unkeyed.until(900, 401).await;
    assert_eq!(res.status(), 401, "{:?}", res.text().await);
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_cancels_the_upstream() {
    let (s, backend, _stop) = pair().await;
    // 500 tokens, 20 ms apart: ten seconds if nobody stopped it.
    let mut body = completion(500, 500, true);
    body["mock_token_ms"] = json!(20);
    let mut stream = s.post("/v1/completions", &body).await;
    assert_eq!(stream.status(), 200);
    assert!(stream.chunk().await.unwrap().is_some());
    // The backend holds 500 tokens for it.
    assert_eq!(backend_status(&backend, 900).await, 429);
    drop(stream);
    // The backend stopped generating and gave back the rest of its 500.
    assert!(
        backend_fits(&backend, 900).await,
        "the backend kept generating"
    );
    // The gateway charged the few chunks that were sent: 900 fit.
    assert_eq!(s.until(900, 200).await.status(), 200);
}

#[tokio::test]
async fn an_upstream_failing_mid_stream_cuts_the_client_off_and_charges_what_was_sent() {
    let (s, _backend, _stop) = pair().await;
    let mut body = completion(500, 500, true);
    body["mock_fail_after"] = json!(3);
    let res = s.post("/v1/completions", &body).await;
    assert_eq!(res.status(), 200);
    assert!(res.text().await.is_err(), "the stream is cut off");
    // No usage came: the prompt (0) and one token per chunk sent (3) are
    // charged, so 997 fit, exactly.
    let res = s.until(997, 200).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "0");
}

/// Malformed completion bodies are 400s of the gateway's, never forwarded,
/// that cost nothing under a plan without a token budget too: its quota of
/// 2 still admits two completions after them.
#[tokio::test]
async fn malformed_bodies_cost_nothing_under_a_plan_without_a_token_budget() {
    const QUOTA_ONLY: &str = r#"
[[plans]]
name = "q"
quota = { limit = 2, period = "DAY" }

[[keys]]
id = "client"
value = "client-key"
plan = "q"

[response]
style = "openai"
"#;
    let (backend, _stop) = mock_backend().await;
    let upstream = Upstream::new(&format!("{backend}/v1"))
        .unwrap()
        .key("gateway-secret")
        .unwrap();
    let s = front_with(QUOTA_ONLY, upstream).await;
    for body in [r#"{"model":"#, "not json", r#"{"model":"m"}"#] {
        for route in ["/v1/completions", "/v1/chat/completions"] {
            let res = s.post_text(route, body).await;
            assert_eq!(res.status(), 400, "{route} {body}");
            let v: Value = res.json().await.unwrap();
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        }
    }
    for _ in 0..2 {
        let res = s.post("/v1/completions", &completion(1, 1, false)).await;
        assert_eq!(res.status(), 200);
    }
    let res = s.post("/v1/completions", &completion(1, 1, false)).await;
    assert_eq!(res.status(), 429);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "insufficient_quota", "{v}");
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_that_costs_nothing() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let s = front(Upstream::new(&format!("http://{addr}")).unwrap()).await;
    let res = s.post("/v1/completions", &completion(900, 0, false)).await;
    assert_eq!(res.status(), 502);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_unreachable", "{v}");
    assert_eq!(v["error"]["type"], "upstream_error");
    // The backend's address stays in the gateway's log.
    assert!(!v.to_string().contains(&addr.to_string()), "{v}");
    // 900 of 1000 each time: each is given back.
    for _ in 0..2 {
        assert_eq!(s.until(900, 502).await.status(), 502);
    }
}

#[tokio::test]
async fn a_hanging_upstream_is_a_504_after_the_timeout_that_costs_nothing() {
    let hang = Router::new().route("/v1/completions", post(std::future::pending::<()>));
    let (backend, _stop) = serve(hang).await;
    let upstream = Upstream::new(&backend)
        .unwrap()
        .timeout(Duration::from_millis(300));
    let s = front(upstream).await;
    let started = Instant::now();
    let res = s.post("/v1/completions", &completion(900, 0, false)).await;
    assert_eq!(res.status(), 504);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(started.elapsed() < Duration::from_secs(5));
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_timeout", "{v}");
    assert_eq!(s.until(900, 504).await.status(), 504);
}

#[tokio::test]
async fn answers_that_are_not_json_pass_through() {
    let odd = Router::new()
        .route(
            "/v1/completions",
            post(|| async { ([("content-type", "text/plain")], "plain words") }),
        )
        .route(
            "/v1/chat/completions",
            post(|| async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [("content-type", "text/html"), ("x-backend", "odd")],
                    "<html>overloaded</html>",
                )
            }),
        )
        .route(
            "/v1/embeddings",
            any(|| async { ([("content-type", "application/json")], "{\"usage\": nope") }),
        );
    let (backend, _stop) = serve(odd).await;
    let s = front(Upstream::new(&backend).unwrap()).await;
    let res = s.post("/v1/completions", &completion(10, 0, false)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/plain");
    assert_eq!(res.text().await.unwrap(), "plain words");
    let chat =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 900});
    let res = s.post("/v1/chat/completions", &chat).await;
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["x-backend"], "odd");
    assert_eq!(res.text().await.unwrap(), "<html>overloaded</html>");
    // The error cost nothing: 900 fit again (10 of the plain answer stand).
    assert_eq!(s.until(900, 200).await.status(), 200);
    // Any other /v1 path is forwarded, and broken JSON passes as it came.
    let res = s
        .post("/v1/embeddings", &json!({"model": "e", "input": "x"}))
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "{\"usage\": nope");
}

#[tokio::test]
async fn the_binary_takes_the_backends_key_from_the_environment_and_never_logs_it() {
    use crate::support::process::ServerProcess;

    let (backend, _stop) = mock_backend().await;
    let upstream = format!("{backend}/v1");
    let front = ServerProcess::start_with_env(
        &["--upstream", &upstream],
        &[
            ("TOLLGATE_UPSTREAM_KEY", "gateway-secret"),
            ("RUST_LOG", "debug"),
        ],
    );
    let client = reqwest::Client::new();
    let res = client
        .post(front.url("/v1/completions"))
        .header("x-api-key", "demo-free-key")
        .header("content-type", "application/json")
        .body(completion(10, 2, true).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert_eq!(events(&text).len(), 4, "{text}");
    // Unreachable is logged too; the key in neither line.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let down = format!("http://{addr}");
    let lonely = ServerProcess::start_with_env(
        &["--upstream", &down],
        &[("TOLLGATE_UPSTREAM_KEY", "gateway-secret")],
    );
    let res = client
        .post(lonely.url("/v1/completions"))
        .header("x-api-key", "demo-free-key")
        .header("content-type", "application/json")
        .body(completion(10, 2, false).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    let _ = res.bytes().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    for server in [&front, &lonely] {
        let log = server.stderr();
        assert!(log.contains("forwarding /v1/* to the upstream"), "{log}");
        assert!(!log.contains("gateway-secret"), "{log}");
    }
    assert!(lonely.stderr().contains("the upstream request failed"));
}

/// A request's query is the client's: it may carry a secret the client
/// meant for the backend (`?key=…`, as some APIs take their keys). It is
/// forwarded, but never written to the gateway's log, neither when the
/// upstream cannot be reached nor when its answer breaks off: the lines
/// name the upstream and what went wrong. reqwest's own message named the
/// whole URL, query and all.
#[tokio::test]
async fn a_failing_upstream_is_logged_without_the_requests_query() {
    use crate::support::process::ServerProcess;

    const SECRET: &str = "query-secret-4c1d";
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let down = format!("http://{addr}");
    let (backend, _stop) = mock_backend().await;
    let up = format!("{backend}/v1");
    let client = reqwest::Client::new();
    for (upstream, stream) in [(&down, false), (&up, true)] {
        let server = ServerProcess::start_with_env(
            &["--upstream", upstream],
            &[
                ("TOLLGATE_UPSTREAM_KEY", "gateway-secret"),
                ("RUST_LOG", "debug"),
            ],
        );
        let mut body = completion(10, 10, stream);
        // The backend (a gateway in mock mode) breaks its stream off.
        body["mock_fail_after"] = json!(2);
        let res = client
            .post(server.url(&format!("/v1/completions?key={SECRET}&x=1")))
            .header("x-api-key", "demo-free-key")
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), if stream { 200 } else { 502 });
        let _ = res.bytes().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let log = server.stderr();
        let failed = if stream {
            "the upstream's answer broke off"
        } else {
            "the upstream request failed"
        };
        assert!(log.contains(failed), "{log}");
        assert!(!log.contains(SECRET), "{log}");
    }
}

/// A path refused as one that would escape `/v1/` costs nothing, as a 404
/// does: it was charged a request of the throttle before it was refused.
#[tokio::test]
async fn a_path_refused_as_escaping_v1_costs_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (s, _backend, _stop) = pair().await;
    let throttle_left = || async {
        let v: Value = s
            .client
            .get(format!("{}/v1/usage", s.base))
            .header("authorization", "Bearer client-key")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["limits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == "throttle")
            .unwrap()["remaining"]
            .as_u64()
            .unwrap()
    };
    let before = throttle_left().await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    for path in [
        "/v1/../api/delete",
        "/v1/x/../chat/completions",
        "/v1//models",
    ] {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer client-key\r\nconnection: close\r\n\r\n"
        );
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains("invalid_path"), "{path}: {answer}");
    }
    // The clock is still: the throttle has refilled nothing meanwhile.
    assert_eq!(throttle_left().await, before);
}

/// `GET /v1/usage` is the gateway's own in upstream mode too: answered from
/// its limits, never forwarded (the backend does not know the client's key),
/// and charging nothing.
#[tokio::test]
async fn usage_is_answered_by_the_gateway_not_the_upstream() {
    let (s, _backend, _stop) = pair().await;
    for _ in 0..3 {
        let res = s
            .client
            .get(format!("{}/v1/usage", s.base))
            .header("authorization", "Bearer client-key")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["plan"], "llm", "{v}");
        let throttle = v["limits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == "throttle")
            .unwrap();
        assert_eq!(throttle["remaining"], 1000, "{v}");
    }
}

/// Paths that an HTTP client or server would resolve out of `/v1/` (dot
/// segments, encoded dots or slashes) are refused before anything reaches
/// the backend, which would otherwise get them with the gateway's own key.
/// Sent over a raw connection: an HTTP client library normalizes them first.
#[tokio::test]
async fn paths_that_escape_v1_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (s, _backend, _stop) = pair().await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    for path in [
        "/v1/../api/delete",
        "/v1/%2e%2e/%2e%2e/api/pull",
        "/v1/x/../chat/completions",
        "/v1/chat%2Fcompletions",
        "/v1/./models",
        "/v1//models",
        "/v1/models\\..\\x",
    ] {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let req = format!(
            "DELETE {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer client-key\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
        );
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains("invalid_path"), "{path}: {answer}");
    }
    // An ordinary path still goes through.
    let res = s
        .client
        .get(format!("{}/v1/models", s.base))
        .header("authorization", "Bearer client-key")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

impl Front {
    /// The tokens left in the client's budget, as `GET /v1/usage` reports
    /// them, once they are `expected` (settlements land when the server sees
    /// a body end); what they are after two seconds otherwise.
    async fn tokens_left(&self, expected: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let v: Value = self
                .client
                .get(format!("{}/v1/usage", self.base))
                .header("authorization", "Bearer client-key")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let left = v["limits"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["name"] == "tokens-minute")
                .and_then(|l| l["remaining"].as_u64())
                .unwrap();
            if left == expected || Instant::now() > deadline {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A streamed Responses API answer (vLLM, Ollama and llama.cpp serve
/// `/v1/responses`) reports its usage inside the `response` of its last
/// event, `response.completed`: it is settled from there, as a completion's
/// usage chunk is, not left free; and one cut off before it is charged a
/// token for each text delta sent.
#[tokio::test]
async fn a_streamed_responses_answer_is_settled_from_its_completed_event() {
    let events = |completed: bool| {
        let mut text = String::from(
            "event: response.created\n\
             data: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"status\":\"in_progress\",\"usage\":null}}\n\n",
        );
        for _ in 0..3 {
            text.push_str(
                "event: response.output_text.delta\n\
                 data: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"tok \"}\n\n",
            );
        }
        if completed {
            text.push_str(
                "event: response.completed\n\
                 data: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"status\":\"completed\",\
                 \"usage\":{\"input_tokens\":10,\"output_tokens\":500,\"total_tokens\":510}}}\n\n",
            );
        }
        text
    };
    // The backend breaks off before `response.completed` when asked to.
    let backend = Router::new().route(
        "/v1/responses",
        post(move |axum::Json(body): axum::Json<Value>| async move {
            let completed = body["user"] != "cut";
            ([("content-type", "text/event-stream")], events(completed))
        }),
    );
    let (backend, _stop) = serve(backend).await;
    let s = front(Upstream::new(&backend).unwrap()).await;
    let body = json!({"model": "m", "input": "hi", "stream": true});
    let res = s.post("/v1/responses", &body).await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    // The client gets every event, the usage too: it asked for none of them.
    assert!(text.contains("\"total_tokens\":510"), "{text}");
    assert_eq!(s.tokens_left(490).await, 490);
    // Cut off: its input as estimated (200 characters, 50 tokens) and the
    // three deltas.
    let cut = json!({"model": "m", "input": "abcd".repeat(50), "stream": true, "user": "cut"});
    let res = s.post("/v1/responses", &cut).await;
    assert_eq!(res.status(), 200);
    let _ = res.text().await.unwrap();
    assert_eq!(s.tokens_left(437).await, 437);
}

/// A backend that reads `stream` leniently, as vLLM's request models do
/// (`"true"`, `1`, …), and streams three chunks of text, with a usage chunk
/// only when `stream_options.include_usage` asks for one.
fn lenient_backend() -> Router {
    Router::new().route(
        "/v1/completions",
        post(|axum::Json(body): axum::Json<Value>| async move {
            let streams = matches!(&body["stream"], Value::Bool(true))
                || matches!(body["stream"].as_str(), Some("true" | "1" | "yes" | "on"))
                || body["stream"].as_u64() == Some(1);
            let chunk = |text: &str| {
                format!(
                    "data: {}\n\n",
                    json!({"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": null}]})
                )
            };
            let mut events = [chunk("a"), chunk("b"), chunk("c")].concat();
            if body["stream_options"]["include_usage"] == json!(true) {
                events.push_str(
                    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":500,\"completion_tokens\":3,\"total_tokens\":503}}\n\n",
                );
            }
            events.push_str("data: [DONE]\n\n");
            assert!(streams, "{body}");
            ([("content-type", "text/event-stream")], events)
        }),
    )
}

/// A completion whose `stream` is not the JSON `true` the gateway looks for
/// (`"true"`, `1`), but that a lenient backend streams all the same, is
/// charged its prompt as estimated (and a token per chunk): its long prompt
/// is not had for the three tokens of its chunks.
#[tokio::test]
async fn a_stream_asked_for_in_another_spelling_is_charged_its_prompt() {
    let (backend, _stop) = serve(lenient_backend()).await;
    let s = front(Upstream::new(&backend).unwrap()).await;
    // 2000 characters: 500 tokens.
    let prompt = "abcd".repeat(500);
    for stream in [json!("true"), json!(1)] {
        let body = json!({"model": "m", "prompt": prompt, "max_tokens": 10, "stream": stream});
        let res = s.post("/v1/completions", &body).await;
        assert_eq!(res.status(), 200);
        let text = res.text().await.unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        assert_eq!(s.tokens_left(497).await, 497, "{stream}");
        // A minute on: the budget is whole again.
        s.clock.advance(Duration::from_secs(60));
    }
    // A stream spelled `true` is asked for its usage, which settles it.
    let body = json!({"model": "m", "prompt": prompt, "max_tokens": 10, "stream": true});
    let text = s.post("/v1/completions", &body).await.text().await.unwrap();
    assert!(!text.contains("total_tokens"), "{text}");
    assert_eq!(s.tokens_left(497).await, 497);
}

/// A path that spells a letter of an estimated route percent-encoded
/// (`/v1/chat/complet%69ons`) is that route to a backend that decodes paths
/// before routing, as uvicorn (vLLM), llama.cpp's server and Go's (Ollama)
/// do, but not to the gateway: it would pass unestimated, its body
/// unchecked, past the route's method override and the model's limits.
/// So is `/v1/chat/completions%0A` to uvicorn and Starlette (vLLM's
/// server), whose route pattern's `$` matches before a last newline. Such
/// paths are refused; an escape a name needs (`%3A` for `:`) is not.
#[tokio::test]
async fn a_route_spelled_with_encoded_letters_never_reaches_the_upstream() {
    use axum::response::IntoResponse;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn decoded(path: &str) -> String {
        let b = path.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match std::str::from_utf8(b.get(i + 1..i + 3).unwrap_or_default())
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(byte) if b[i] == b'%' => {
                    out.push(byte);
                    i += 3;
                }
                _ => {
                    out.push(b[i]);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).unwrap()
    }
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&hits);
    let decoding = Router::new().fallback(move |uri: axum::http::Uri| async move {
        seen.fetch_add(1, Ordering::SeqCst);
        let path = decoded(uri.path());
        // Starlette (vLLM's server) matches a route with Python's `$`,
        // which also matches before a last newline.
        let path = path.strip_suffix('\n').unwrap_or(&path);
        let usage = json!({"prompt_tokens": 1, "completion_tokens": 4999, "total_tokens": 5000});
        match path {
            "/v1/chat/completions" | "/v1/completions" => {
                axum::Json(json!({"object": "chat.completion", "choices": [], "usage": usage}))
                    .into_response()
            }
            "/v1/models/llama3:8b" => axum::Json(json!({"id": "llama3:8b"})).into_response(),
            _ => StatusCode::NOT_FOUND.into_response(),
        }
    });
    let (backend, _stop) = serve(decoding).await;
    let s = front(Upstream::new(&backend).unwrap()).await;
    // 5000 tokens: more than the whole budget of 1000, refused at once on
    // the routes as they are spelled.
    let chat =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000});
    assert_eq!(s.post("/v1/chat/completions", &chat).await.status(), 429);
    for path in [
        "/v1/chat/complet%69ons",
        "/v1/chat/complet%69%6Fns",
        "/v1/%63hat/completions",
        "/v1/%63ompletions",
        "/v1/chat/completion%73",
        "/v1/chat/completions%0A",
        "/v1/completions%0a",
    ] {
        let res = s.post(path, &chat).await;
        assert_eq!(res.status(), 400, "{path}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_path", "{path}: {v}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the backend was reached");
    let res = s
        .client
        .get(format!("{}/v1/models/llama3%3A8b", s.base))
        .header("authorization", "Bearer client-key")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

/// A plan whose `big-model` has a burst of one, for the tests of a
/// model's limits in upstream mode.
const BIG_MODEL: &str = r#"
[[plans]]
name = "llm"
throttle = { rate = 1000.0, burst = 1000 }
tokens = { per_minute = 1000 }
[plans.models]
"big-model" = { throttle = { rate = 0.001, burst = 1 } }

[[keys]]
id = "client"
value = "client-key"
plan = "llm"

[response]
style = "openai"
"#;

/// A model's limits hold on every route that names the model in its body,
/// not only on completions: an embeddings or Responses request for
/// `big-model` is limited as a chat completion for it is, and a Responses
/// request is estimated (its input and `max_output_tokens`) before it goes.
#[tokio::test]
async fn a_models_limits_hold_on_the_embeddings_and_responses_routes() {
    const MODELS: &str = BIG_MODEL;
    let answer = || async {
        axum::Json(
            json!({"object": "list", "data": [], "usage": {"prompt_tokens": 1, "total_tokens": 1}}),
        )
    };
    let backend = Router::new()
        .route("/v1/embeddings", post(answer))
        .route("/v1/responses", post(answer));
    let (backend, _stop) = serve(backend).await;
    let s = front_with(MODELS, Upstream::new(&backend).unwrap()).await;
    for (route, body) in [
        (
            "/v1/embeddings",
            json!({"model": "big-model", "input": "hi"}),
        ),
        (
            "/v1/responses",
            json!({"model": "big-model", "input": "hi", "max_output_tokens": 10}),
        ),
    ] {
        let res = s.post(route, &body).await;
        assert_eq!(res.status(), 200, "{route}");
        let _ = res.bytes().await;
        let res = s.post(route, &body).await;
        assert_eq!(
            res.status(),
            429,
            "{route}: the model's burst of one is spent"
        );
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
        // Another model is not held back.
        let mut other = body.clone();
        other["model"] = json!("small");
        assert_eq!(s.post(route, &other).await.status(), 200, "{route}");
        s.clock.advance(Duration::from_secs(1000));
    }
    // A Responses request is estimated before it goes: more than the whole
    // budget is refused at once.
    let huge = json!({"model": "small", "input": "hi", "max_output_tokens": 5000});
    let res = s.post("/v1/responses", &huge).await;
    assert_eq!(res.status(), 429);
}

/// The Messages API that vLLM, llama.cpp's server and Ollama serve beside
/// OpenAI's (`POST /v1/messages`, Anthropic's shape) reports `input_tokens`
/// and `output_tokens` and no total: a plain answer is settled from their
/// sum, a stream from the input of its `message_start` and the output of
/// its `message_delta`; and the request is estimated (its messages and
/// `max_tokens`) before it goes.
#[tokio::test]
async fn a_messages_answer_is_estimated_and_settled_from_input_and_output_tokens() {
    use axum::response::IntoResponse;
    let backend = Router::new().route(
        "/v1/messages",
        post(|axum::Json(body): axum::Json<Value>| async move {
            if body["stream"] != json!(true) {
                let answer = json!({
                    "id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                    "content": [{"type": "text", "text": "tok"}], "stop_reason": "end_turn",
                    "usage": {"input_tokens": 10, "output_tokens": 490},
                });
                return axum::Json(answer).into_response();
            }
            let events = [
                "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"usage\":{\"input_tokens\":20,\"output_tokens\":1}}}\n\n",
                "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
                "event: ping\ndata: {\"type\":\"ping\"}\n\n",
                "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"tok\"}}\n\n",
                "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
                "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":280}}\n\n",
                "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
            ];
            ([("content-type", "text/event-stream")], events.concat()).into_response()
        }),
    );
    let (backend, _stop) = serve(backend).await;
    let s = front(Upstream::new(&backend).unwrap()).await;
    let body = |max_tokens: u32, stream: bool| {
        json!({
            "model": "m", "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        })
    };
    // More than the whole budget: refused before it goes.
    assert_eq!(
        s.post("/v1/messages", &body(5000, false)).await.status(),
        429
    );
    let res = s.post("/v1/messages", &body(900, false)).await;
    assert_eq!(res.status(), 200);
    let _ = res.bytes().await;
    assert_eq!(s.tokens_left(500).await, 500);
    s.clock.advance(Duration::from_secs(60));
    let res = s.post("/v1/messages", &body(900, true)).await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert!(text.contains("message_stop"), "{text}");
    assert_eq!(s.tokens_left(700).await, 700);
}

/// A Messages stream reports its input in `message_start`, with an output
/// of 0 or 1 that is not the answer's: it does not settle the request.
/// One cut off after some text, before the `message_delta` that reports
/// the output, is charged its input and a token for each text delta sent,
/// as other streams cut off are, not its input alone.
#[tokio::test]
async fn a_messages_stream_cut_before_its_output_is_reported_is_charged_its_deltas() {
    let backend = Router::new().route(
        "/v1/messages",
        post(|| async {
            let mut events = String::from(
                "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"usage\":{\"input_tokens\":20,\"output_tokens\":1}}}\n\n\
                 event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            );
            for _ in 0..5 {
                events.push_str(
                    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"tok \"}}\n\n",
                );
            }
            ([("content-type", "text/event-stream")], events)
        }),
    );
    let (backend, _stop) = serve(backend).await;
    let s = front(Upstream::new(&backend).unwrap()).await;
    let body = json!({
        "model": "m", "max_tokens": 900, "stream": true,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    });
    let res = s.post("/v1/messages", &body).await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert!(!text.contains("message_delta"), "{text}");
    // Its input (20) and the five deltas; not 21, as the output of 1 in
    // `message_start` would have it.
    assert_eq!(s.tokens_left(975).await, 975);
}

/// A backend's redirect is its answer, passed to the client as it came
/// (status and `Location`), as any other: the gateway does not follow it
/// with the client's request and its own credential.
#[tokio::test]
async fn a_redirect_from_the_upstream_passes_through_unfollowed() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let followed = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&followed);
    let backend = Router::new()
        .route(
            "/v1/completions",
            post(|| async { (StatusCode::TEMPORARY_REDIRECT, [("location", "/v1/moved")]) }),
        )
        .route(
            "/v1/moved",
            any(move || async move {
                seen.fetch_add(1, Ordering::SeqCst);
                axum::Json(json!({"usage": {"total_tokens": 1}}))
            }),
        );
    let (backend, _stop) = serve(backend).await;
    let s = front(
        Upstream::new(&backend)
            .unwrap()
            .key("gateway-secret")
            .unwrap(),
    )
    .await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let res = client
        .post(format!("{}/v1/completions", s.base))
        .header("authorization", "Bearer client-key")
        .header("content-type", "application/json")
        .body(completion(10, 0, false).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 307);
    assert_eq!(res.headers()["location"], "/v1/moved");
    assert_eq!(
        followed.load(Ordering::SeqCst),
        0,
        "the gateway followed it"
    );
}

/// A method override names a route the client calls, though upstream mode
/// serves every `/v1/…` path through one catch-all route: a plan's
/// `"/v1/completions/POST"` throttle holds for `/v1/completions` (a
/// spelling with encoded letters is refused before it), and for no other
/// path.
#[tokio::test]
async fn method_overrides_apply_to_the_forwarded_paths() {
    let (backend, _stop) = mock_backend().await;
    let upstream = Upstream::new(&format!("{backend}/v1"))
        .unwrap()
        .key("gateway-secret")
        .unwrap();
    let config = r#"
[[plans]]
name = "llm"
throttle = { rate = 1000.0, burst = 1000 }
[plans.methods]
"/v1/completions/POST" = { rate = 1.0, burst = 1 }

[[keys]]
id = "client"
value = "client-key"
plan = "llm"

[response]
style = "openai"
"#;
    let s = front_with(config, upstream).await;
    let res = s.post("/v1/completions", &completion(1, 1, false)).await;
    assert_eq!(res.status(), 200);
    let res = s.post("/v1/completions", &completion(1, 1, false)).await;
    assert_eq!(res.status(), 429);
    // Spelled with an encoded letter, it is never forwarded: refused before
    // the limit, whose override it would not have escaped either.
    let res = s.post("/v1/%63ompletions", &completion(1, 1, false)).await;
    assert_eq!(res.status(), 400);
    // Another route is not under the override.
    let chat =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
    for _ in 0..3 {
        let res = s.post("/v1/chat/completions", &chat).await;
        assert_eq!(res.status(), 200);
    }
}

/// A path that names a completion route with encoded letters
/// (`/v1/chat/%63ompletions`) is refused before anything reaches the
/// backend: a backend that decodes paths before routing (uvicorn, behind
/// vLLM) would serve it as a completion the gateway neither read nor
/// estimated, and a stream of it would settle no tokens at all.
#[tokio::test]
async fn paths_with_encoded_letters_are_refused() {
    let (s, _backend, _stop) = pair().await;
    for path in [
        "/v1/chat/%63ompletions",
        "/v1/%63ompletions",
        "/v1/chat/completion%73",
        "/v1/chat/completions%7E",
        "/v1/%2Dx",
    ] {
        let res = s.post(path, &completion(10, 10, true)).await;
        assert_eq!(res.status(), 400, "{path}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_path", "{path}: {v}");
    }
    // What a path may need encoded still goes through to the backend.
    let res = s.post("/v1/x%20y", &completion(1, 1, false)).await;
    assert_eq!(res.status(), 404);
}

/// A backend that ignores `include_usage` (as older Ollama and llama.cpp
/// servers do) and streams five chunks of what `user` names: text, tool
/// call arguments or reasoning, in the chat completion's shapes or the
/// Messages API's.
fn five_deltas_backend() -> Router {
    let chat = |axum::Json(body): axum::Json<Value>| async move {
        let delta = match body["user"].as_str() {
            Some("tools") => {
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":"}}]})
            }
            Some("reasoning") => json!({"reasoning_content": "hmm "}),
            Some("refusal") => json!({"refusal": "no "}),
            _ => json!({"content": "tok "}),
        };
        let chunk = json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": null}]});
        let events = format!("data: {chunk}\n\n").repeat(5) + "data: [DONE]\n\n";
        ([("content-type", "text/event-stream")], events)
    };
    let messages = |axum::Json(body): axum::Json<Value>| async move {
        let delta = match body["metadata"]["user_id"].as_str() {
            Some("tools") => json!({"type": "input_json_delta", "partial_json": "{\"a\":"}),
            Some("thinking") => json!({"type": "thinking_delta", "thinking": "hmm "}),
            _ => json!({"type": "text_delta", "text": "tok "}),
        };
        let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"usage\":{\"input_tokens\":20,\"output_tokens\":1}}}\n\n";
        let chunk = json!({"type": "content_block_delta", "index": 0, "delta": delta});
        let events = format!("event: content_block_delta\ndata: {chunk}\n\n").repeat(5);
        (
            [("content-type", "text/event-stream")],
            format!("{start}{events}"),
        )
    };
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/messages", post(messages))
}

/// A stream without a usage is charged a token for each chunk that carried
/// generated output: tool call arguments, reasoning and refusals are
/// generated as text is, so a client cannot have them for its prompt alone.
#[tokio::test]
async fn a_stream_without_usage_is_charged_its_tool_call_and_reasoning_chunks() {
    let (backend, _stop) = serve(five_deltas_backend()).await;
    let s = front(Upstream::new(&backend).unwrap()).await;
    let chat = |user: &str| {
        json!({"model": "m", "stream": true, "max_tokens": 100, "user": user,
               "messages": [{"role": "user", "content": "hi"}]})
    };
    // The prompt's estimate and the five chunks of text.
    let res = s.post("/v1/chat/completions", &chat("text")).await;
    assert_eq!(res.status(), 200);
    let _ = res.text().await.unwrap();
    let left = s.tokens_left(0).await;
    assert!(left <= 995, "{left}");
    for user in ["tools", "reasoning", "refusal"] {
        s.clock.advance(Duration::from_secs(60));
        let res = s.post("/v1/chat/completions", &chat(user)).await;
        assert_eq!(res.status(), 200);
        let text = res.text().await.unwrap();
        assert_eq!(events(&text).len(), 6, "{text}");
        assert_eq!(s.tokens_left(left).await, left, "{user}");
    }
    // Messages: the input of `message_start` (20) and the five deltas.
    for user in ["text", "tools", "thinking"] {
        s.clock.advance(Duration::from_secs(60));
        let body = json!({
            "model": "m", "max_tokens": 100, "stream": true, "metadata": {"user_id": user},
            "messages": [{"role": "user", "content": "hi"}],
        });
        let res = s.post("/v1/messages", &body).await;
        assert_eq!(res.status(), 200);
        let _ = res.text().await.unwrap();
        assert_eq!(s.tokens_left(975).await, 975, "{user}");
    }
}

/// A backend that compresses its stream though it was not asked to (a
/// proxy in front of it set to): the gateway cannot read the events, so
/// it passes each piece on as it comes, not held back until the end in
/// search of a blank line that compressed bytes never hold, and keeps the
/// layer's estimate (the prompt and `max_tokens`), not the prompt alone.
#[tokio::test]
async fn a_compressed_stream_passes_as_it_comes_and_keeps_its_estimate() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // `data: {…"a"…}\n\n`, flushed, then `data: {…"b"…}\n\ndata: [DONE]\n\n`.
    const FIRST: [u8; 72] = [
        31, 139, 8, 0, 0, 0, 0, 0, 2, 3, 74, 73, 44, 73, 180, 82, 168, 86, 74, 206, 200, 207, 76,
        78, 45, 86, 178, 138, 174, 86, 202, 204, 75, 73, 173, 80, 178, 50, 208, 81, 74, 73, 205,
        41, 73, 84, 178, 2, 74, 231, 231, 149, 164, 230, 149, 40, 89, 41, 37, 42, 213, 214, 198,
        214, 114, 113, 1, 0, 0, 0, 255, 255,
    ];
    const REST: [u8; 24] = [
        75, 33, 85, 99, 18, 138, 198, 104, 23, 127, 63, 215, 88, 46, 46, 0, 229, 160, 234, 16, 128,
        0, 0, 0,
    ];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = format!("http://{}", listener.local_addr().unwrap());
    let (first_seen_tx, first_seen_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).ends_with('}') {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0);
            seen.extend_from_slice(&buf[..n]);
        }
        let chunk = |b: &[u8]| [format!("{:x}\r\n", b.len()).as_bytes(), b, b"\r\n"].concat();
        conn.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
              content-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
        conn.write_all(&chunk(&FIRST)).await.unwrap();
        // The rest only once the client has the first piece (or after 3 s).
        let _ = tokio::time::timeout(Duration::from_secs(3), first_seen_rx).await;
        conn.write_all(&[chunk(&REST), b"0\r\n\r\n".to_vec()].concat())
            .await
            .unwrap();
    });
    let s = front(Upstream::new(&backend).unwrap()).await;
    let body = json!({"model": "m", "stream": true, "max_tokens": 100,
                      "messages": [{"role": "user", "content": "hi"}]});
    let started = Instant::now();
    let mut res = s.post("/v1/chat/completions", &body).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-encoding"], "gzip");
    let first = res.chunk().await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the first piece was held back"
    );
    let _ = first_seen_tx.send(());
    let mut got = first.to_vec();
    while let Some(c) = res.chunk().await.unwrap() {
        got.extend_from_slice(&c);
    }
    assert_eq!(got, [&FIRST[..], &REST[..]].concat());
    // The estimate: the prompt's token and `max_tokens`.
    assert_eq!(s.tokens_left(899).await, 899);
}

/// llama.cpp's server and Ollama parse a completion's body as JSON whatever
/// its `content-type` says, and accept what the estimate cannot read: a
/// byte-order mark before it (llama.cpp), bytes that are not UTF-8 or a lone
/// surrogate escape in a string (Go, Ollama's). Labelled `text/plain`, such
/// a body was estimated from its head (no tokens, no model) and forwarded,
/// past its model's limits and the token budget. On the routes whose bodies
/// the gateway reads, a body that is not JSON is refused whatever its type,
/// never forwarded, and costs nothing.
#[tokio::test]
async fn a_body_that_is_not_json_is_refused_whatever_its_content_type() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const MODELS: &str = BIG_MODEL;
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&hits);
    // Reads the body as JSON whatever its type, after a byte-order mark.
    let backend = Router::new().route(
        "/v1/chat/completions",
        post(move |body: axum::body::Bytes| {
            seen.fetch_add(1, Ordering::SeqCst);
            let body = body.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&body).to_vec();
            let text = String::from_utf8_lossy(&body).replace("\\ud800", "");
            let parsed: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            async move {
                axum::Json(json!({
                    "model": parsed["model"],
                    "choices": [],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }))
            }
        }),
    );
    let (backend, _stop) = serve(backend).await;
    let s = front_with(MODELS, Upstream::new(&backend).unwrap()).await;
    let chat = |content: &str| {
        format!(
            r#"{{"model":"big-model","messages":[{{"role":"user","content":"{content}"}}],"max_tokens":5000}}"#
        )
        .into_bytes()
    };
    let bom = [b"\xef\xbb\xbf".as_slice(), &chat("hi")].concat();
    let not_utf8 = chat("hi \u{0}")
        .into_iter()
        .map(|b| if b == 0 { 0xff } else { b })
        .collect();
    for (ct, body) in [
        ("text/plain", bom.clone()),
        ("application/octet-stream", not_utf8),
        ("text/plain", chat("\\ud800")),
        ("application/json", bom),
    ] {
        let res = s
            .client
            .post(format!("{}/v1/chat/completions", s.base))
            .header("authorization", "Bearer client-key")
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "{ct}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing was forwarded");
    // The model's burst of one is still whole.
    let ok = json!({"model": "big-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5});
    let res = s.post("/v1/chat/completions", &ok).await;
    assert_eq!(res.status(), 200);
    let _ = res.bytes().await;
    assert_eq!(s.post("/v1/chat/completions", &ok).await.status(), 429);
}

/// A completion whose client goes away before the backend has sent a byte
/// (a backend still queueing, reading the prompt or generating a plain
/// answer) cancels the backend's request and is charged its prompt, as a
/// stream cut off after its head is, plus what the client got: nothing.
/// Its whole `max_tokens`, never delivered, is not kept, streamed or not: a
/// plain one kept its whole estimate.
#[tokio::test]
async fn a_completion_whose_client_leaves_before_the_head_is_charged_its_prompt() {
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (dropped_tx, mut dropped) = tokio::sync::mpsc::unbounded_channel::<()>();
    struct Dropped(tokio::sync::mpsc::UnboundedSender<()>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }
    let slow = Router::new().route(
        "/v1/completions",
        post(move || {
            let (started, dropped) = (started_tx.clone(), dropped_tx.clone());
            async move {
                let _dropped = Dropped(dropped);
                let _ = started.send(());
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        }),
    );
    let (backend, _stop) = serve(slow).await;
    let s = front(Upstream::new(&backend).unwrap()).await;
    // 400 characters: 100 tokens of prompt, and 800 that are never produced.
    let prompt = "abcd".repeat(100);
    for stream in [true, false] {
        let body = json!({"model": "m", "prompt": prompt, "max_tokens": 800, "stream": stream});
        let client = s.client.clone();
        let url = format!("{}/v1/completions", s.base);
        let call = tokio::spawn(async move {
            client
                .post(url)
                .header("authorization", "Bearer client-key")
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
        });
        tokio::time::timeout(Duration::from_secs(5), started.recv())
            .await
            .unwrap();
        call.abort();
        let _ = call.await;
        tokio::time::timeout(Duration::from_secs(5), dropped.recv())
            .await
            .expect("the backend's request was cancelled");
        assert_eq!(s.tokens_left(900).await, 900, "stream: {stream}");
        s.clock.advance(Duration::from_secs(60));
    }
}

/// Go's `encoding/json` (Ollama's server) matches an object's keys to a
/// struct's fields case-insensitively (folding the Kelvin sign `K` to `k`
/// and the long `ſ` to `s` as well), the last match winning: a body
/// `{"model":"small","Model":"big-model"}` is `big-model` to it. The
/// gateway read such a body as its exactly spelled fields, so the request
/// was limited as `small` (and its `"Max_tokens"` or a message's
/// `"Content"` estimated as absent) and served as `big-model`. A body with
/// a key that differs from a field the estimate reads only in case, at any
/// level, is refused, never forwarded, and costs nothing.
#[tokio::test]
async fn a_key_spelled_in_another_case_is_refused_not_forwarded() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const MODELS: &str = BIG_MODEL;
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&hits);
    // Answers with the model it would serve, as Go would decode it.
    let backend = Router::new().fallback(post(move |axum::Json(body): axum::Json<Value>| {
        seen.fetch_add(1, Ordering::SeqCst);
        let folded = |k: &str| {
            k.chars()
                .map(|c| match c {
                    '\u{212A}' => 'k',
                    '\u{17F}' => 's',
                    c => c.to_ascii_lowercase(),
                })
                .collect::<String>()
        };
        let model = body
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| folded(k) == "model")
            .map(|(_, v)| v.clone())
            .next_back();
        async move {
            axum::Json(json!({
                "model": model,
                "choices": [],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }))
        }
    }));
    let (backend, _stop) = serve(backend).await;
    let s = front_with(MODELS, Upstream::new(&backend).unwrap()).await;
    let long = "abcd".repeat(1000);
    for (route, body) in [
        (
            "/v1/chat/completions",
            json!({"model": "small", "Model": "big-model", "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "small", "MODEL": "big-model", "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/completions",
            json!({"model": "small", "prompt": "hi", "max_tokens": 1, "Max_Tokens": 5000}),
        ),
        (
            "/v1/completions",
            json!({"model": "small", "prompt": "hi", "max_tokens": 1, "max_to\u{212A}ens": 5000}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "small", "messages": [{"role": "user", "content": "hi"}], "Messages": [{"role": "user", "content": long}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "small", "messages": [{"role": "user", "content": "hi", "Content": long}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "small", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "Text": long}]}]}),
        ),
        (
            "/v1/completions",
            json!({"model": "small", "prompt": "hi", "\u{17F}tream": true}),
        ),
        (
            "/v1/embeddings",
            json!({"model": "small", "input": "hi", "Input": long}),
        ),
        (
            "/v1/responses",
            json!({"model": "small", "input": [{"role": "user", "CONTENT": long}]}),
        ),
    ] {
        let res = s.post(route, &body).await;
        assert_eq!(res.status(), 400, "{route} {body}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing was forwarded");
    assert_eq!(s.tokens_left(1000).await, 1000);
    // Keys of other objects (a tool's parameters) are the client's own.
    let tool = json!({"model": "small", "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"Model": {"type": "string"}, "N": {"type": "integer"}}}}}]});
    let res = s.post("/v1/chat/completions", &tool).await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["model"], "small");
    // The model's burst of one is still whole.
    let ok = json!({"model": "big-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5});
    let res = s.post("/v1/chat/completions", &ok).await;
    assert_eq!(res.status(), 200);
    let _ = res.bytes().await;
    assert_eq!(s.post("/v1/chat/completions", &ok).await.status(), 429);
}

/// Ollama serves `Big-Model`, `big-model:latest` and `library/big-model` as
/// `big-model`: a model's limits hold for every such spelling, whatever the
/// plan's `"*"` entry allows, and the backend is never reached past them.
#[tokio::test]
async fn a_models_limits_hold_for_every_spelling_the_backend_serves_it_by() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const MODELS: &str = r#"
[[plans]]
name = "llm"
throttle = { rate = 1000.0, burst = 1000 }
[plans.models]
"big-model" = { throttle = { rate = 0.001, burst = 1 } }
"*" = { throttle = { rate = 1000.0, burst = 1000 } }

[[keys]]
id = "client"
value = "client-key"
plan = "llm"

[response]
style = "openai"
"#;
    let big = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&big);
    // Ollama's reading of a model name: ASCII case aside, the default
    // registry and namespace and the `latest` tag filled in.
    let backend = Router::new().route(
        "/v1/chat/completions",
        post(move |axum::Json(body): axum::Json<Value>| {
            let seen = Arc::clone(&seen);
            async move {
                let name = body["model"].as_str().unwrap().to_ascii_lowercase();
                let name = name.trim_start_matches("registry.ollama.ai/");
                let name = name.trim_start_matches("library/");
                let name = name.strip_suffix(":latest").unwrap_or(name);
                if name == "big-model" {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
                let usage = json!({"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2});
                axum::Json(json!({"object": "chat.completion", "choices": [], "usage": usage}))
            }
        }),
    );
    let (backend, _stop) = serve(backend).await;
    let s = front_with(MODELS, Upstream::new(&backend).unwrap()).await;
    let chat = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
    let res = s.post("/v1/chat/completions", &chat("big-model")).await;
    assert_eq!(res.status(), 200);
    let _ = res.bytes().await;
    for spelling in [
        "Big-Model",
        "BIG-MODEL",
        "big-model:latest",
        "big-model:LATEST",
        "library/big-model",
        "registry.ollama.ai/library/Big-Model:latest",
    ] {
        let res = s.post("/v1/chat/completions", &chat(spelling)).await;
        assert_eq!(res.status(), 429, "{spelling}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{spelling}: {v}");
    }
    assert_eq!(
        big.load(Ordering::SeqCst),
        1,
        "the backend served big-model past its limit"
    );
    // Another model passes.
    let res = s.post("/v1/chat/completions", &chat("small")).await;
    assert_eq!(res.status(), 200);
}

/// A model whose name holds a `/` (a Hugging Face name, as vLLM serves
/// them) is retrieved as OpenAI's SDKs send it, the slash encoded
/// (`GET /v1/models/meta-llama%2FLlama-3.1-8B`): it reaches the backend as
/// it came, while an encoded slash that would resolve out of the model's
/// name, or one anywhere else, is still refused.
#[tokio::test]
async fn a_model_named_with_a_slash_is_retrieved_from_the_upstream() {
    let backend = Router::new().fallback(|uri: axum::http::Uri| async move {
        axum::Json(json!({"id": uri.path(), "object": "model"}))
    });
    let (backend, _stop) = serve(backend).await;
    let s = front(Upstream::new(&backend).unwrap()).await;
    let get = |path: &'static str| {
        s.client
            .get(format!("{}{path}", s.base))
            .header("authorization", "Bearer client-key")
            .send()
    };
    for path in [
        "/v1/models/meta-llama%2FLlama-3.1-8B",
        "/v1/models/hf.co%2Fbartowski%2Fm-GGUF%3AQ4_K_M",
    ] {
        let res = get(path).await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["id"], path);
    }
    for path in [
        "/v1/models/x%2F..%2Fchat%2Fcompletions",
        "/v1/models/..%2Fx",
        "/v1/models/%2Fx",
        "/v1/models/x%2F",
        "/v1/models/x%2F.",
        "/v1/models%2Fx",
        "/v1/files/a%2Fb",
        "/v1/models/a%5Cb",
    ] {
        let res = get(path).await.unwrap();
        assert_eq!(res.status(), 400, "{path}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_path", "{path}: {v}");
    }
}

/// An `async-openai` client of the gateway at `base` with the client's key,
/// without the client's own retries.
fn openai_client(
    base: &str,
    key: &str,
) -> async_openai::Client<async_openai::config::OpenAIConfig> {
    let config = async_openai::config::OpenAIConfig::new()
        .with_api_base(format!("{base}/v1"))
        .with_api_key(key);
    let http = reqwest013::Client::builder().no_proxy().build().unwrap();
    async_openai::Client::with_config(config)
        .with_http_service(async_openai::middleware::ReqwestService::new(http))
}

/// The API error a call failed with; panics on success or any other error.
fn api_error<T: std::fmt::Debug>(
    result: Result<T, async_openai::error::OpenAIError>,
) -> async_openai::error::ApiErrorResponse {
    match result {
        Err(async_openai::error::OpenAIError::ApiError(e)) => e,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// `async-openai`, as a Rust application calls the gateway in front of a
/// backend: answers plain and streamed, the usage chunk only when asked
/// for, the backend's models, a bad key, and every answer settled from the
/// usage the backend reported.
#[tokio::test]
async fn async_openai_through_upstream_mode() {
    use async_openai::types::chat::{
        ChatCompletionRequestUserMessage, ChatCompletionStreamOptions,
        CreateChatCompletionRequestArgs, FinishReason, Role,
    };
    use async_openai::types::completions::CreateCompletionRequestArgs;
    use tokio_stream::StreamExt;

    let (s, _backend, _stop) = pair().await;
    let c = openai_client(&s.base, "client-key");
    // "Say hello, gateway." is 19 characters: 5 prompt tokens.
    let chat = |max_tokens: u32, usage: Option<bool>| {
        let mut args = CreateChatCompletionRequestArgs::default();
        args.model("m")
            .max_tokens(max_tokens)
            .messages([ChatCompletionRequestUserMessage::from("Say hello, gateway.").into()]);
        if let Some(include) = usage {
            args.stream_options(ChatCompletionStreamOptions {
                include_usage: Some(include),
                include_obfuscation: None,
            });
        }
        args.build().unwrap()
    };
    let mut spent = 0;

    let answer = c.chat().create(chat(4, None)).await.unwrap();
    assert_eq!(answer.object, "chat.completion");
    assert_eq!(
        answer.choices[0].message.content.as_deref(),
        Some("tok tok tok tok ")
    );
    assert_eq!(answer.choices[0].finish_reason, Some(FinishReason::Length));
    assert_eq!(answer.usage.as_ref().unwrap().total_tokens, 9);
    spent += 9;
    assert_eq!(s.tokens_left(1000 - spent).await, 1000 - spent);

    let text = c
        .completions()
        .create(
            CreateCompletionRequestArgs::default()
                .model("m")
                .prompt("Say hello, gateway.")
                .max_tokens(3u32)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(text.object, "text_completion");
    assert_eq!(text.choices[0].text, "tok tok tok ");
    assert_eq!(text.usage.unwrap().total_tokens, 8);
    spent += 8;
    assert_eq!(s.tokens_left(1000 - spent).await, 1000 - spent);

    // Streamed: the usage chunk the gateway asked for reaches the client
    // only when it asked for it too (and `include_usage: false` is not
    // asking); each stream is settled from it either way.
    for usage in [None, Some(false), Some(true)] {
        let mut stream = c.chat().create_stream(chat(6, usage)).await.unwrap();
        let mut chunks = Vec::new();
        while let Some(chunk) = stream.next().await {
            chunks.push(chunk.unwrap());
        }
        if usage == Some(true) {
            let last = chunks.pop().unwrap();
            assert!(last.choices.is_empty(), "{last:?}");
            assert_eq!(last.usage.unwrap().total_tokens, 11);
        }
        assert!(
            chunks
                .iter()
                .all(|c| c.usage.is_none() && c.choices.len() == 1),
            "{usage:?}: {chunks:?}"
        );
        assert_eq!(chunks[0].choices[0].delta.role, Some(Role::Assistant));
        let content: String = chunks
            .iter()
            .filter_map(|c| c.choices[0].delta.content.as_deref())
            .collect();
        assert_eq!(content, "tok ".repeat(6), "{usage:?}");
        assert_eq!(
            chunks.last().unwrap().choices[0].finish_reason,
            Some(FinishReason::Length)
        );
        spent += 11;
        assert_eq!(s.tokens_left(1000 - spent).await, 1000 - spent, "{usage:?}");
    }

    let mut stream = c
        .completions()
        .create_stream(
            CreateCompletionRequestArgs::default()
                .model("m")
                .prompt("Say hello, gateway.")
                .max_tokens(2u32)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert!(
            chunk.usage.is_none() && chunk.choices.len() == 1,
            "{chunk:?}"
        );
        text.push_str(&chunk.choices[0].text);
    }
    assert_eq!(text, "tok tok ");
    spent += 7;
    assert_eq!(s.tokens_left(1000 - spent).await, 1000 - spent);

    // The backend's models, and its 404 for one it does not serve.
    let models = c.models().list().await.unwrap();
    assert_eq!(models.object, "list");
    assert!(models.data.iter().any(|m| m.id == "mock"), "{models:?}");
    assert_eq!(c.models().retrieve("mock").await.unwrap().id, "mock");
    let e = api_error(c.models().retrieve("no-such-model").await);
    assert_eq!(e.status_code, 404);
    assert_eq!(e.api_error.code.as_deref(), Some("model_not_found"));

    // A key the gateway does not know never reaches the backend.
    let e = api_error(
        openai_client(&s.base, "not-a-key")
            .chat()
            .create(chat(1, None))
            .await,
    );
    assert_eq!(e.status_code, 401);
    assert_eq!(e.api_error.code.as_deref(), Some("invalid_api_key"));
    assert_eq!(s.tokens_left(1000 - spent).await, 1000 - spent);
}

/// A body streamed to the backend (a route whose body is not read for an
/// estimate) that stops sending mid-way is cut off by the body timeout and
/// answered 408, as a body read for an estimate is: it was a 502, the
/// backend's request having failed with it, and logged as the backend's
/// failure.
#[tokio::test]
async fn a_streamed_body_that_stops_sending_is_a_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let backend = Router::new().route(
        "/v1/files",
        post(|body: axum::body::Bytes| async move { format!("{} bytes", body.len()) }),
    );
    let (backend, _stop) = serve(backend).await;
    let mut limits = Limits::default();
    limits.body_timeout = Duration::from_millis(300);
    let s = front_limited(FRONT_CONFIG, Upstream::new(&backend).unwrap(), limits).await;
    let addr = s.base.strip_prefix("http://").unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"POST /v1/files HTTP/1.1\r\nhost: x\r\nauthorization: Bearer client-key\r\n\
              content-type: application/octet-stream\r\ncontent-length: 100\r\n\r\nsome of it",
        )
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("an answer, and the connection closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// A body the gateway does not read for an estimate (a file upload, an
/// audio transcription) is streamed to the backend as it comes, never
/// gathered first, and has no bound in bytes of the gateway's (the
/// backend's own bounds apply): the backend has the first piece while the
/// client still holds back the rest, and 4 MiB (four times an estimated
/// body's bound) arrive whole, byte for byte. What the gateway holds of
/// such a body is what is in flight, whatever its length.
#[tokio::test]
async fn a_body_not_estimated_streams_to_the_upstream_unbounded_and_unbuffered() {
    use axum::body::Bytes;
    use http_body_util::BodyExt;
    use tokio_stream::wrappers::ReceiverStream;

    const PIECE: usize = 64 * 1024;
    const PIECES: usize = 64;
    let (got_tx, mut got) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let backend = Router::new().route(
        "/v1/files",
        post(move |body: axum::body::Body| {
            let got = got_tx.clone();
            async move {
                let mut body = body;
                let (mut len, mut sum) = (0usize, 0u64);
                while let Some(frame) = body.frame().await {
                    let Ok(data) = frame.unwrap().into_data() else {
                        continue;
                    };
                    len += data.len();
                    sum = data
                        .iter()
                        .fold(sum, |s, &b| s.wrapping_mul(31).wrapping_add(u64::from(b)));
                    let _ = got.send(len);
                }
                format!("{len} {sum}")
            }
        }),
    );
    let (backend, _stop) = serve(backend).await;
    let s = front(Upstream::new(&backend).unwrap()).await;
    let piece =
        |i: usize| -> Vec<u8> { (0..PIECE).map(|j| ((i * 7 + j * 13) % 251) as u8).collect() };
    let expected = (0..PIECES).fold(0u64, |s, i| {
        piece(i)
            .iter()
            .fold(s, |s, &b| s.wrapping_mul(31).wrapping_add(u64::from(b)))
    });
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let client = s.client.clone();
    let url = format!("{}/v1/files", s.base);
    let call = tokio::spawn(async move {
        client
            .post(url)
            .header("authorization", "Bearer client-key")
            .header("content-type", "application/octet-stream")
            .body(reqwest::Body::wrap_stream(ReceiverStream::new(rx)))
            .send()
            .await
            .unwrap()
    });
    tx.send(Ok(Bytes::from(piece(0)))).await.unwrap();
    // The first piece reaches the backend before the rest is sent.
    let first = tokio::time::timeout(Duration::from_secs(3), got.recv())
        .await
        .expect("the backend got nothing of the body before its end");
    assert!(first.is_some_and(|n| n > 0));
    for i in 1..PIECES {
        tx.send(Ok(Bytes::from(piece(i)))).await.unwrap();
    }
    drop(tx);
    let res = call.await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.text().await.unwrap(),
        format!("{} {expected}", PIECE * PIECES)
    );
}

/// A plain answer whose client goes away after its head, with its `usage`
/// already passed on, is settled from that usage, and the backend's
/// answer is dropped; before, its whole estimate was kept.
#[tokio::test]
async fn a_plain_answer_left_after_its_usage_is_settled_from_it() {
    let (dropped_tx, mut dropped) = tokio::sync::mpsc::unbounded_channel::<()>();
    struct Dropped(tokio::sync::mpsc::UnboundedSender<()>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }
    let backend = Router::new().route(
        "/v1/completions",
        post(move || {
            let dropped = Dropped(dropped_tx.clone());
            async move {
                let first = r#"{"object":"text_completion","usage":{"prompt_tokens":100,"completion_tokens":20,"total_tokens":120},"choices":["#;
                // The rest never comes.
                let rest = never_ending(dropped);
                let body = tokio_stream::StreamExt::chain(
                    tokio_stream::once(Ok::<_, std::io::Error>(axum::body::Bytes::from(first))),
                    rest,
                );
                (
                    [("content-type", "application/json")],
                    axum::body::Body::from_stream(body),
                )
            }
        }),
    );
    /// A stream that never yields, holding `guard` until it is dropped.
    fn never_ending(
        guard: Dropped,
    ) -> impl tokio_stream::Stream<Item = Result<axum::body::Bytes, std::io::Error>> {
        tokio_stream::StreamExt::map(tokio_stream::pending(), move |piece| {
            let _held = &guard;
            piece
        })
    }
    let (backend, _stop) = serve(backend).await;
    let s = front(Upstream::new(&backend).unwrap()).await;
    // 100 tokens of prompt and 800 of answer reserved.
    let body = json!({"model": "m", "prompt": "abcd".repeat(100), "max_tokens": 800});
    let mut res = s.post("/v1/completions", &body).await;
    assert_eq!(res.status(), 200);
    let first = res.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("total_tokens"));
    drop(res);
    tokio::time::timeout(Duration::from_secs(5), dropped.recv())
        .await
        .expect("the backend's answer was dropped");
    assert_eq!(s.tokens_left(880).await, 880);
}

/// A backend error answered as server-sent events (an overloaded server
/// refusing a stream in its own shape) passes through, status and body,
/// and costs what its usage says: nothing without one, as an error in JSON
/// does. It was charged the stream's prompt.
#[tokio::test]
async fn an_error_answered_as_a_stream_passes_through_and_costs_nothing() {
    let backend = Router::new().route(
        "/v1/completions",
        post(|| async {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [("content-type", "text/event-stream")],
                "data: {\"error\":{\"message\":\"overloaded\",\"code\":503}}\n\n",
            )
        }),
    );
    let (backend, _stop) = serve(backend).await;
    let s = front(Upstream::new(&backend).unwrap()).await;
    // 100 tokens of prompt.
    let body =
        json!({"model": "m", "prompt": "abcd".repeat(100), "max_tokens": 800, "stream": true});
    let res = s.post("/v1/completions", &body).await;
    assert_eq!(res.status(), 503);
    let text = res.text().await.unwrap();
    assert!(text.contains("overloaded"), "{text}");
    assert_eq!(s.tokens_left(1000).await, 1000);
}

/// Upstream mode forwards every `/v1/…` path and method, as an AWS proxy
/// resource (`/{proxy+}`, `ANY`) does: the gateway's route is matched, the
/// request reaches the backend, and it counts against the throttle and
/// quota whatever the backend answers, its 404 and 405 included (each costs
/// the backend work, so not counting them would let a client probe it
/// without limit). A path the gateway itself answers 404 (outside `/v1/`)
/// or refuses before forwarding costs nothing.
#[tokio::test]
async fn a_backends_404_counts_as_a_request_and_the_gateways_own_does_not() {
    let config = FRONT_CONFIG.replace(
        "tokens = { per_minute = 1000 }",
        "tokens = { per_minute = 1000 }\nquota = { limit = 3, period = \"DAY\" }",
    );
    let (backend, _stop) = mock_backend().await;
    let upstream = Upstream::new(&format!("{backend}/v1"))
        .unwrap()
        .key("gateway-secret")
        .unwrap();
    let s = front_with(&config, upstream).await;
    let get = |path: &str| {
        s.client
            .get(format!("{}{path}", s.base))
            .header("authorization", "Bearer client-key")
            .send()
    };
    // The gateway's own 404s, free however many.
    for _ in 0..5 {
        assert_eq!(get("/nope").await.unwrap().status(), 404);
        assert_eq!(get("/v1/chat%2Fcompletions").await.unwrap().status(), 400);
    }
    // The backend's 404s, passed through and counted: 2 of the 3.
    for _ in 0..2 {
        let res = get("/v1/nope").await.unwrap();
        assert_eq!(res.status(), 404);
        assert!(res.headers().contains_key("ratelimit"), "{res:?}");
    }
    let res = s.post("/v1/completions", &completion(1, 1, false)).await;
    assert_eq!(res.status(), 200);
    let res = s.post("/v1/completions", &completion(1, 1, false)).await;
    assert_eq!(res.status(), 429);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "insufficient_quota", "{v}");
}

/// A plain completion answered without a `usage` (a server that reports
/// none) is settled as a stream without one is: its prompt as estimated
/// and the tokens of what it generated (its text, counted as the estimate
/// counts a prompt: a token for every four characters), whatever the
/// request reserved. It kept the estimate: a client that named no
/// `max_tokens` had any length of answer for its prompt and 16 tokens, and
/// one that named a large one paid all of it for a short answer.
#[tokio::test]
async fn a_plain_completion_without_usage_is_charged_its_prompt_and_its_text() {
    let backend = Router::new()
        .route(
            "/v1/chat/completions",
            post(|axum::Json(req): axum::Json<Value>| async move {
                let chars = req["user"].as_str().unwrap().parse::<usize>().unwrap();
                axum::Json(json!({
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                    "choices": [{"index": 0, "finish_reason": "stop",
                        "message": {"role": "assistant", "content": "x".repeat(chars)}}],
                }))
            }),
        )
        .route(
            "/v1/completions",
            post(|| async {
                axum::Json(json!({"object": "text_completion", "choices": [
                    {"index": 0, "text": "y".repeat(40), "finish_reason": "stop"},
                    {"index": 1, "text": "z".repeat(40), "finish_reason": "stop"},
                ], "usage": null}))
            }),
        );
    let (backend, _stop) = serve(backend).await;
    let s = front(Upstream::new(&backend).unwrap()).await;
    // 100 tokens of prompt, no `max_tokens` (16 reserved), 2000 characters
    // of answer: 100 + 500.
    let chat = |chars: usize, max_tokens: Option<u32>| {
        let mut c = json!({"model": "m", "user": chars.to_string(),
            "messages": [{"role": "user", "content": "abcd".repeat(100)}]});
        if let Some(m) = max_tokens {
            c["max_tokens"] = json!(m);
        }
        c
    };
    let res = s.post("/v1/chat/completions", &chat(2000, None)).await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "x".repeat(2000));
    assert_eq!(s.tokens_left(400).await, 400);
    // 800 reserved, 40 characters of answer: 100 + 10.
    s.clock.advance(Duration::from_secs(60));
    let res = s.post("/v1/chat/completions", &chat(40, Some(800))).await;
    assert_eq!(res.status(), 200);
    let _ = res.text().await.unwrap();
    assert_eq!(s.tokens_left(890).await, 890);
    // A completion of two choices and `"usage": null`: 10 + 10, and its
    // prompt (2).
    s.clock.advance(Duration::from_secs(60));
    let body = json!({"model": "m", "prompt": "abcdefgh", "max_tokens": 300, "n": 2});
    let res = s.post("/v1/completions", &body).await;
    assert_eq!(res.status(), 200);
    let _ = res.text().await.unwrap();
    assert_eq!(s.tokens_left(978).await, 978);
}

// The wire behaviour of the servers upstream mode is made for: vLLM,
// llama.cpp's `llama-server`, Ollama's `/v1` layer and TGI, each answered as
// the server itself does (shapes taken from their serializers), and the
// framing an SSE library may add (CRLF line ends, `: ping` comments).

/// How one real server frames a chat completion stream.
#[derive(Clone, Copy, Debug)]
struct Wire {
    name: &'static str,
    /// What ends an event (`\n\n`, or sse-starlette's `\r\n\r\n`).
    end: &'static str,
    /// `data: `, or `data:` without the space (axum 0.6's `json_data`,
    /// TGI's).
    data: &'static str,
    /// `"usage": null` on every chunk once the usage is asked for (Ollama,
    /// OpenAI); TGI serializes it always.
    null_usage: Usage0,
    /// llama.cpp's `timings`, on the last chunk it sends.
    timings: bool,
    /// A `: ping` comment event between chunks (sse-starlette's keep-alive).
    ping: bool,
    /// The usage on the finish chunk, asked for or not, and no usage chunk
    /// (llama.cpp's server before late 2025).
    usage_on_finish: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Usage0 {
    Never,
    WhenAsked,
    Always,
}

const WIRES: [Wire; 6] = [
    Wire {
        name: "vllm",
        end: "\n\n",
        data: "data: ",
        null_usage: Usage0::Never,
        timings: false,
        ping: false,
        usage_on_finish: false,
    },
    Wire {
        name: "llama.cpp",
        end: "\n\n",
        data: "data: ",
        null_usage: Usage0::Never,
        timings: true,
        ping: false,
        usage_on_finish: false,
    },
    Wire {
        name: "llama.cpp-2025",
        end: "\n\n",
        data: "data: ",
        null_usage: Usage0::Never,
        timings: true,
        ping: false,
        usage_on_finish: true,
    },
    Wire {
        name: "ollama",
        end: "\n\n",
        data: "data: ",
        null_usage: Usage0::WhenAsked,
        timings: false,
        ping: false,
        usage_on_finish: false,
    },
    Wire {
        name: "tgi",
        end: "\n\n",
        data: "data:",
        null_usage: Usage0::Always,
        timings: false,
        ping: false,
        usage_on_finish: false,
    },
    Wire {
        name: "sse-starlette",
        end: "\r\n\r\n",
        data: "data: ",
        null_usage: Usage0::Never,
        timings: false,
        ping: true,
        usage_on_finish: false,
    },
];

/// The events of a chat completion stream of three pieces of text, as
/// `wire` sends them, the usage chunk only when `asked`: a role chunk, the
/// text, the finish, the usage (10 prompt tokens, 3 generated), `[DONE]`.
fn wire_events(wire: Wire, asked: bool) -> Vec<String> {
    let usage = json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13});
    let timings = json!({"prompt_n": 10, "prompt_ms": 5.5, "predicted_n": 3, "predicted_ms": 30.1});
    let chunk = |choices: Value| {
        let mut c = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk",
            "created": 1, "model": "m", "choices": choices});
        if wire.null_usage == Usage0::Always || (asked && wire.null_usage == Usage0::WhenAsked) {
            c["usage"] = Value::Null;
        }
        c
    };
    let mut chunks = vec![chunk(
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
    )];
    for text in ["Hel", "lo", "!"] {
        chunks.push(chunk(
            json!([{"index": 0, "delta": {"content": text}, "finish_reason": null}]),
        ));
    }
    chunks.push(chunk(
        json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
    ));
    if wire.usage_on_finish {
        chunks.last_mut().unwrap()["usage"] = usage;
    } else if asked {
        let mut last = chunk(json!([]));
        last["usage"] = usage;
        chunks.push(last);
    }
    if wire.timings {
        chunks.last_mut().unwrap()["timings"] = timings;
    }
    let mut events: Vec<String> = chunks
        .iter()
        .map(|c| format!("{}{c}{}", wire.data, wire.end))
        .collect();
    events.push(format!("{}[DONE]{}", wire.data, wire.end));
    if wire.ping {
        let ping = format!(": ping - 2025-01-01 00:00:00.000000+00:00{}", wire.end);
        events = events.into_iter().flat_map(|e| [ping.clone(), e]).collect();
    }
    events
}

/// A backend answering `/v1/chat/completions` streams as `wire` does, each
/// event sent in two pieces cut in the middle of its line, a few
/// milliseconds apart.
fn wire_backend(wire: Wire) -> Router {
    Router::new().route(
        "/v1/chat/completions",
        post(move |axum::Json(req): axum::Json<Value>| async move {
            let asked = req["stream_options"]["include_usage"] == true;
            let mut pieces = Vec::new();
            for event in wire_events(wire, asked) {
                let (a, b) = event.split_at(event.len() / 2);
                pieces.push(a.to_owned());
                pieces.push(b.to_owned());
            }
            let body = tokio_stream::StreamExt::then(tokio_stream::iter(pieces), |p| async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok::<_, std::io::Error>(axum::body::Bytes::from(p))
            });
            (
                [("content-type", "text/event-stream; charset=utf-8")],
                axum::body::Body::from_stream(body),
            )
        }),
    )
}

/// Through the gateway, each server's stream reaches a client that did not
/// ask for the usage as the server would have sent it without the usage
/// chunk: every event with choices, comments and `[DONE]` kept, in order and
/// byte for byte (but a `"usage": null`), and
/// the usage chunk (with llama.cpp's `timings` on it) removed; a client that
/// asked gets every event as the server sent it. Both are settled from the
/// server's usage, 13 tokens.
#[tokio::test]
async fn each_servers_stream_passes_as_it_sent_it_and_is_settled_from_its_usage() {
    for wire in WIRES {
        let (backend, _stop) = serve(wire_backend(wire)).await;
        let s = front(Upstream::new(&format!("{backend}/v1")).unwrap()).await;
        for asked in [false, true] {
            s.clock.advance(Duration::from_secs(60));
            let mut chat = json!({
                "model": "m", "messages": [{"role": "user", "content": "x".repeat(400)}],
                "max_tokens": 500, "stream": true,
            });
            if asked {
                chat["stream_options"] = json!({"include_usage": true});
            }
            let res = s.post("/v1/chat/completions", &chat).await;
            assert_eq!(res.status(), 200, "{}", wire.name);
            let text = res.text().await.unwrap();
            // A client that asked gets what the server sent. One that did not
            // gets what the server sent the gateway, which asked, without
            // the usage chunk and the `"usage": null` the asking brought (a
            // server that sends it always, as TGI, loses it too: the gateway
            // cannot tell it from one it asked for, and it means what its
            // absence does).
            let expected = if asked {
                wire_events(wire, true).concat()
            } else {
                wire_events(wire, true)
                    .into_iter()
                    .filter(|e| !e.contains("\"choices\":[]"))
                    .collect::<String>()
                    .replace(",\"usage\":null", "")
            };
            if wire.timings && !asked && !wire.usage_on_finish {
                // llama.cpp puts its `timings` on the last chunk it sends:
                // the usage chunk once the usage is asked for, and they
                // leave with it (a client without the gateway would have
                // had them on the finish chunk).
                assert!(!text.contains("timings"), "{}: {text}", wire.name);
            }
            assert_eq!(text, expected, "{} asked={asked}", wire.name);
            // The usage reaches a client that did not ask for it only on a
            // chunk with choices, which is never removed.
            assert_eq!(
                text.contains("total_tokens"),
                asked || wire.usage_on_finish,
                "{}: {text}",
                wire.name
            );
            assert_eq!(s.tokens_left(987).await, 987, "{} asked={asked}", wire.name);
        }
    }
}

/// Each server's refusals, as it sends them: vLLM's context length 400 and
/// unknown model 404 (`{"object":"error",…}`), llama.cpp's context size 400
/// and its 503 while the model loads, Ollama's 404 for a model not pulled,
/// TGI's 422 validation error and 429 when overloaded (`{"error":"…",
/// "error_type":…}`). Each reaches the client with its status, its headers
/// (`retry-after` included) and its body byte for byte, for a plain request
/// and a streamed one, and costs no tokens.
#[tokio::test]
async fn each_servers_errors_pass_through_and_cost_nothing() {
    const ERRORS: [(&str, u16, &str); 7] = [
        (
            "vllm-context",
            400,
            r#"{"object":"error","message":"This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (4000 in the messages, 1000 in the completion). Please reduce the length of the messages or completion.","type":"BadRequestError","param":null,"code":400}"#,
        ),
        (
            "vllm-model",
            404,
            r#"{"object":"error","message":"The model `nope` does not exist.","type":"NotFoundError","param":null,"code":404}"#,
        ),
        (
            "llama.cpp-context",
            400,
            r#"{"error":{"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error","n_prompt_tokens":5000,"n_ctx":4096}}"#,
        ),
        (
            "llama.cpp-loading",
            503,
            r#"{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}"#,
        ),
        (
            "ollama-model",
            404,
            r#"{"error":{"message":"model \"nope\" not found, try pulling it first","type":"api_error","param":null,"code":null}}"#,
        ),
        (
            "tgi-validation",
            422,
            r#"{"error":"Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 5000 `inputs` tokens and 16 `max_new_tokens`","error_type":"validation"}"#,
        ),
        (
            "tgi-overloaded",
            429,
            r#"{"error":"Model is overloaded","error_type":"overloaded"}"#,
        ),
    ];
    let backend = Router::new().route(
        "/v1/chat/completions",
        post(|axum::Json(req): axum::Json<Value>| async move {
            let (_, status, body) = ERRORS
                .into_iter()
                .find(|(name, ..)| req["model"] == *name)
                .unwrap();
            (
                StatusCode::from_u16(status).unwrap(),
                [
                    ("content-type", "application/json"),
                    ("retry-after", "7"),
                    ("x-backend", "real"),
                ],
                body,
            )
        }),
    );
    let (backend, _stop) = serve(backend).await;
    let s = front(Upstream::new(&backend).unwrap()).await;
    for (name, status, body) in ERRORS {
        for stream in [false, true] {
            // 100 tokens of prompt and 800 of answer reserved.
            let chat = json!({
                "model": name, "messages": [{"role": "user", "content": "abcd".repeat(100)}],
                "max_tokens": 800, "stream": stream,
            });
            let res = s.post("/v1/chat/completions", &chat).await;
            assert_eq!(res.status(), status, "{name}");
            assert_eq!(res.headers()["retry-after"], "7", "{name}");
            assert_eq!(res.headers()["x-backend"], "real", "{name}");
            assert_eq!(res.text().await.unwrap(), body, "{name}");
            assert_eq!(s.tokens_left(1000).await, 1000, "{name} stream={stream}");
        }
    }
}

/// A failure in the middle of a stream, as each server reports it: an event
/// `data: {"error":…}` (vLLM, then `[DONE]`; llama.cpp), TGI's
/// `data:{"error":"…","error_type":"generation"}`, or the `error: {…}` line
/// older llama.cpp servers wrote. The client gets every event as it came,
/// the error included, and the stream is charged what was produced: the
/// prompt as estimated and one token for each chunk of text sent before it.
#[tokio::test]
async fn an_error_in_the_middle_of_each_servers_stream_passes_and_charges_what_was_sent() {
    const FAILURES: [(&str, &str); 4] = [
        (
            "vllm",
            "data: {\"error\": {\"object\": \"error\", \"message\": \"CUDA out of memory\", \"type\": \"InternalServerError\", \"param\": null, \"code\": 500}}\n\ndata: [DONE]\n\n",
        ),
        (
            "llama.cpp",
            "data: {\"error\":{\"code\":500,\"message\":\"failed to decode the batch\",\"type\":\"server_error\"}}\n\n",
        ),
        (
            "tgi",
            "data:{\"error\":\"Request failed during generation: Server error: CUDA out of memory\",\"error_type\":\"generation\"}\n\n",
        ),
        (
            "llama.cpp-old",
            "error: {\"code\":500,\"message\":\"failed to decode the batch\",\"type\":\"server_error\"}\n\n",
        ),
    ];
    let text_chunk = |t: &str| {
        format!(
            "data: {}\n\n",
            json!({"object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": null}]})
        )
    };
    let stream_of = move |failure: &str| {
        ["a", "b", "c"]
            .iter()
            .map(|t| text_chunk(t))
            .collect::<String>()
            + failure
    };
    let backend = Router::new().route(
        "/v1/chat/completions",
        post(move |axum::Json(req): axum::Json<Value>| async move {
            let (_, failure) = FAILURES
                .into_iter()
                .find(|(name, _)| req["model"] == *name)
                .unwrap();
            ([("content-type", "text/event-stream")], stream_of(failure))
        }),
    );
    let (backend, _stop) = serve(backend).await;
    let s = front(Upstream::new(&backend).unwrap()).await;
    for (name, failure) in FAILURES {
        s.clock.advance(Duration::from_secs(60));
        // 100 tokens of prompt, 800 of answer reserved.
        let chat = json!({
            "model": name, "messages": [{"role": "user", "content": "abcd".repeat(100)}],
            "max_tokens": 800, "stream": true,
        });
        let res = s.post("/v1/chat/completions", &chat).await;
        assert_eq!(res.status(), 200, "{name}");
        assert_eq!(res.text().await.unwrap(), stream_of(failure), "{name}");
        // The prompt as estimated (100) and the three chunks of text.
        assert_eq!(s.tokens_left(897).await, 897, "{name}");
    }
}

/// A stream passes each event on as the backend sends it, never holding
/// one back for the next: the client has the backend's first chunk of text
/// while the backend still waits to send its second (as llama.cpp's server
/// and vLLM do between tokens, or while a queued request waits for its
/// prefill). And a client that goes away then, with the backend silent (no
/// write to the client to fail), still cancels the backend's request.
#[tokio::test]
async fn a_stream_passes_each_event_as_it_comes_and_a_client_leaving_a_silent_one_cancels_it() {
    let (gate_tx, gate_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let gate = std::sync::Arc::new(tokio::sync::Mutex::new(gate_rx));
    let (dropped_tx, mut dropped) = tokio::sync::mpsc::unbounded_channel::<()>();
    struct Dropped(tokio::sync::mpsc::UnboundedSender<()>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }
    let chunk = |t: &str| {
        format!(
            "data: {}\n\n",
            json!({"object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": null}]})
        )
    };
    let first = chunk("first");
    let second = chunk("second");
    let backend = Router::new().route(
        "/v1/chat/completions",
        post(move || {
            let (gate, dropped) = (gate.clone(), Dropped(dropped_tx.clone()));
            let (first, second) = (first.clone(), second.clone());
            async move {
                // The first event, then the second only once the gate opens
                // (if it ever does); the guard drops with the body.
                let body = async_body(move |tx| async move {
                    let _held = dropped;
                    let _ = tx.send(first).await;
                    if gate.lock().await.recv().await.is_some() {
                        let _ = tx.send(second).await;
                        let _ = tx.send("data: [DONE]\n\n".to_owned()).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                });
                ([("content-type", "text/event-stream")], body)
            }
        }),
    );
    /// A body fed by `feed` through a channel, dropped (and `feed` with it)
    /// when the body is.
    fn async_body<F, Fut>(feed: F) -> axum::body::Body
    where
        F: FnOnce(tokio::sync::mpsc::Sender<String>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::mpsc::channel::<String>(1);
        let task = tokio::spawn(feed(tx));
        struct Abort(tokio::task::JoinHandle<()>);
        impl Drop for Abort {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let abort = Abort(task);
        let stream = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            move |s| {
                let _held = &abort;
                Ok::<_, std::io::Error>(axum::body::Bytes::from(s))
            },
        );
        axum::body::Body::from_stream(stream)
    }
    let (backend, _stop) = serve(backend).await;
    let s = front(Upstream::new(&backend).unwrap()).await;
    let chat = json!({
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 100, "stream": true,
    });
    // The first event arrives while the backend holds the second.
    let mut res = s.post("/v1/chat/completions", &chat).await;
    assert_eq!(res.status(), 200);
    let got = tokio::time::timeout(Duration::from_secs(5), res.chunk())
        .await
        .expect("the first event was held back")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&got).contains("first"), "{got:?}");
    gate_tx.send(()).unwrap();
    let rest = res.text().await.unwrap();
    assert!(
        rest.contains("second") && rest.ends_with("[DONE]\n\n"),
        "{rest}"
    );
    tokio::time::timeout(Duration::from_secs(5), dropped.recv())
        .await
        .unwrap();
    // A client that leaves while the backend sends nothing: the backend's
    // answer is dropped all the same.
    let mut res = s.post("/v1/chat/completions", &chat).await;
    assert_eq!(res.status(), 200);
    let got = res.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&got).contains("first"), "{got:?}");
    drop(res);
    tokio::time::timeout(Duration::from_secs(5), dropped.recv())
        .await
        .expect("the backend's answer was kept after its client left");
}
