//! The gateway in mock mode, served on a loopback port and driven by a real HTTP
//! client, with configs written by the tests and a manual clock.

use std::net::SocketAddr;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Value, json};
use tollgate::config::Config;
use tollgate::{Date, ManualClock, MemoryStore};

use crate::support::process::server_binary;

struct Running {
    base: String,
    clock: ManualClock,
    client: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// 2024-05-06T10:00:00Z, a Monday.
fn monday_ten() -> std::time::SystemTime {
    let days = Date::new(2024, 5, 6).unwrap().days() as u64;
    UNIX_EPOCH + Duration::from_secs(days * 86_400 + 10 * 3_600)
}

async fn start(config: &str) -> Running {
    let clock = ManualClock::new();
    clock.set_wall(monday_ten());
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    let config = Config::from_toml(config).unwrap();
    let app = tollgate_gateway::app(&config, store).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tollgate_gateway::serve(listener, app, async {
        let _ = rx.await;
    }));
    Running {
        base: format!("http://{addr}"),
        clock,
        client: reqwest::Client::new(),
        _stop: tx,
    }
}

const BODY: &str = r#"{"model":"m","prompt":"hello world!","max_tokens":3}"#;
const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":1}"#;

impl Running {
    async fn post(&self, route: &str, key: Option<&str>, body: &str) -> reqwest::Response {
        let mut req = self
            .client
            .post(format!("{}{route}", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        req.send().await.unwrap()
    }

    async fn complete(&self, key: Option<&str>) -> reqwest::Response {
        self.post("/v1/completions", key, BODY).await
    }

    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        admin_key: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("x-admin-key", admin_key);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test]
async fn demo_key_gets_a_burst_of_five_then_two_per_second() {
    let s = start(tollgate_gateway::DEMO_CONFIG).await;
    for remaining in (0..5).rev() {
        let res = s.complete(Some("demo-free-key")).await;
        assert_eq!(res.status(), 200);
        let policy = res.headers()["ratelimit-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(policy.contains("\"throttle\";q=5;w=3"), "{policy}");
        assert!(policy.contains("\"quota\";q=1000;w=86400"), "{policy}");
        assert!(policy.contains("\"stage\";q=200;w=2"), "{policy}");
        let rl = res.headers()["ratelimit"].to_str().unwrap().to_owned();
        assert!(
            rl.starts_with(&format!("\"throttle\";r={remaining};")),
            "{rl}"
        );
        // The headers OpenAI's SDKs back off on.
        assert_eq!(res.headers()["x-ratelimit-limit-requests"], "5");
        assert_eq!(
            res.headers()["x-ratelimit-remaining-requests"],
            remaining.to_string().as_str()
        );
        // One request refills in 500 ms: full again after that many.
        let reset = ["500ms", "1s", "1.5s", "2s", "2.5s"][4 - remaining];
        assert_eq!(res.headers()["x-ratelimit-reset-requests"], reset);
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["usage"]["prompt_tokens"], 3);
        assert_eq!(v["usage"]["completion_tokens"], 3);
        assert_eq!(v["usage"]["total_tokens"], 6);
    }
    let res = s.complete(Some("demo-free-key")).await;
    assert_eq!(res.status(), 429);
    // The demo answers as OpenAI does: the exact wait, the family's stable
    // limit with nothing left, and a body OpenAI's SDKs decode.
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(res.headers()["retry-after-ms"], "500");
    assert!(res.headers().get("x-should-retry").is_none());
    assert_eq!(res.headers()["x-ratelimit-limit-requests"], "5");
    assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "0");
    assert_eq!(res.headers()["x-ratelimit-reset-requests"], "500ms");
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["type"], "requests");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(v["error"]["param"].is_null());
    // OpenAI's default credential works too.
    let res = s
        .client
        .post(format!("{}/v1/completions", s.base))
        .bearer_auth("demo-free-key")
        .header("content-type", "application/json")
        .body(BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429, "a Bearer key is the same key");

    s.clock.advance(Duration::from_millis(500));
    assert_eq!(s.complete(Some("demo-free-key")).await.status(), 200);
    assert_eq!(s.complete(Some("demo-free-key")).await.status(), 429);
}

#[tokio::test]
async fn method_override_limits_one_route_while_another_still_passes() {
    let s = start(tollgate_gateway::DEMO_CONFIG).await;
    let chat = "/v1/chat/completions";
    assert_eq!(
        s.post(chat, Some("demo-free-key"), CHAT).await.status(),
        200
    );
    let res = s.post(chat, Some("demo-free-key"), CHAT).await;
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["ratelimit-policy"]
            .to_str()
            .unwrap()
            .contains("\"method\";q=2;w=2")
    );
    let res = s.post(chat, Some("demo-free-key"), CHAT).await;
    assert_eq!(res.status(), 429);
    // The IETF `t` of the denying limit is the retry, as `Retry-After` says.
    assert_eq!(res.headers()["ratelimit"], "\"method\";r=0;t=1");
    assert_eq!(res.headers()["retry-after"], "1");
    // The completions route has no override: the plan bucket (5, 2 used) still has room.
    for _ in 0..3 {
        assert_eq!(s.complete(Some("demo-free-key")).await.status(), 200);
    }
    assert_eq!(s.complete(Some("demo-free-key")).await.status(), 429);
}

const SMALL_QUOTA: &str = r#"
[[plans]]
name = "tiny"
throttle = { rate = 100.0, burst = 100 }
quota = { limit = 3, period = "DAY" }

[[keys]]
id = "t-1"
value = "tiny-key-1"
plan = "tiny"

[[keys]]
id = "t-2"
value = "tiny-key-2"
plan = "tiny"
enabled = false

[admin]
key = "admin-secret"
"#;

#[tokio::test]
async fn quota_exhaustion_then_renewal_at_midnight() {
    let s = start(SMALL_QUOTA).await;
    for _ in 0..3 {
        assert_eq!(s.complete(Some("tiny-key-1")).await.status(), 200);
    }
    let res = s.complete(Some("tiny-key-1")).await;
    assert_eq!(res.status(), 429);
    // 10:00 on a Monday: 14 hours to the window's end.
    assert_eq!(res.headers()["retry-after"], (14 * 3_600).to_string());
    assert_eq!(res.text().await.unwrap(), r#"{"message":"Limit Exceeded"}"#);
    s.clock.advance(Duration::from_secs(14 * 3_600));
    assert_eq!(s.complete(Some("tiny-key-1")).await.status(), 200);
}

#[tokio::test]
async fn forbidden_cases_and_a_key_disabled_and_enabled_while_serving() {
    let s = start(SMALL_QUOTA).await;
    for key in [None, Some("not-a-key"), Some("tiny-key-2")] {
        let res = s.complete(key).await;
        assert_eq!(res.status(), 403, "{key:?}");
        assert_eq!(res.text().await.unwrap(), r#"{"message":"Forbidden"}"#);
    }
    let patch = reqwest::Method::PATCH;
    let (status, v) = s
        .admin(
            patch.clone(),
            "/admin/keys/t-2",
            "admin-secret",
            Some(json!({"enabled": true})),
        )
        .await;
    assert_eq!((status, &v["enabled"]), (200, &json!(true)));
    assert_eq!(s.complete(Some("tiny-key-2")).await.status(), 200);
    let (status, _) = s
        .admin(
            patch.clone(),
            "/admin/keys/t-2",
            "admin-secret",
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(s.complete(Some("tiny-key-2")).await.status(), 403);

    // The admin routes refuse a wrong or missing admin key.
    let (status, _) = s
        .admin(
            patch.clone(),
            "/admin/keys/t-2",
            "wrong-secret",
            Some(json!({"enabled": true})),
        )
        .await;
    assert_eq!(status, 403);
    let res = s
        .client
        .get(format!(
            "{}/admin/usage?plan=tiny&start=2024-05-06&end=2024-05-06",
            s.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(
        s.complete(Some("tiny-key-2")).await.status(),
        403,
        "still disabled"
    );

    // A key added at run time works at once; the value never comes back.
    let (status, v) = s
        .admin(
            reqwest::Method::POST,
            "/admin/keys",
            "admin-secret",
            Some(json!({"id": "t-3", "value": "tiny-key-3", "plan": "tiny"})),
        )
        .await;
    assert_eq!(status, 201);
    assert!(!v.to_string().contains("tiny-key-3"));
    assert_eq!(s.complete(Some("tiny-key-3")).await.status(), 200);
    let (status, _) = s
        .admin(
            reqwest::Method::POST,
            "/admin/keys",
            "admin-secret",
            Some(json!({"id": "t-4", "value": "x", "plan": "gold"})),
        )
        .await;
    assert_eq!(status, 409);
}

#[tokio::test]
async fn every_admin_route_refuses_a_missing_or_wrong_admin_key() {
    let s = start(SMALL_QUOTA).await;
    let routes = [
        (
            reqwest::Method::GET,
            "/admin/usage?plan=tiny&start=2024-05-06&end=2024-05-06",
        ),
        (reqwest::Method::POST, "/admin/keys"),
        (reqwest::Method::PATCH, "/admin/keys/t-1"),
        (reqwest::Method::PATCH, "/admin/keys/t-1/usage"),
        (reqwest::Method::POST, "/admin/keys/t-1/reset"),
    ];
    for (method, path) in routes {
        for key in [
            None,
            Some("admin-secreT"),
            Some("admin-secret-longer"),
            Some(""),
        ] {
            let mut req = s
                .client
                .request(method.clone(), format!("{}{path}", s.base));
            if let Some(k) = key {
                req = req.header("x-admin-key", k);
            }
            let res = req
                .body(r#"{"enabled":true,"remaining":1}"#)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 403, "{method} {path} with {key:?}");
        }
    }
    // The right key gets through (the reset answers with the key).
    let (status, v) = s
        .admin(
            reqwest::Method::POST,
            "/admin/keys/t-1/reset",
            "admin-secret",
            None,
        )
        .await;
    assert_eq!((status, &v["id"]), (200, &json!("t-1")));
}

#[tokio::test]
async fn get_usage_matches_the_traffic_and_update_usage_raises_and_lowers() {
    let s = start(SMALL_QUOTA).await;
    assert_eq!(s.complete(Some("tiny-key-1")).await.status(), 200);
    s.clock.advance(Duration::from_secs(86_400));
    assert_eq!(s.complete(Some("tiny-key-1")).await.status(), 200);
    assert_eq!(s.complete(Some("tiny-key-1")).await.status(), 200);
    let get = reqwest::Method::GET;
    let (status, v) = s
        .admin(
            get.clone(),
            "/admin/usage?plan=tiny&start=2024-05-05&end=2024-05-07",
            "admin-secret",
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        v,
        json!({"plan": "tiny", "start": "2024-05-05", "end": "2024-05-07", "items": {
            "t-1": [[0, 3], [1, 2], [2, 1]],
            "t-2": [[0, 3], [0, 3], [0, 3]],
        }})
    );
    let (_, v) = s
        .admin(
            get.clone(),
            "/admin/usage?plan=tiny&start=2024-05-07&end=2024-05-07&key=t-1",
            "admin-secret",
            None,
        )
        .await;
    assert_eq!(v["items"], json!({"t-1": [[2, 1]]}));

    let patch = reqwest::Method::PATCH;
    let (status, v) = s
        .admin(
            patch.clone(),
            "/admin/keys/t-1/usage",
            "admin-secret",
            Some(json!({"remaining": 5})),
        )
        .await;
    assert_eq!((status, &v["remaining"]), (200, &json!(5)));
    for _ in 0..5 {
        assert_eq!(s.complete(Some("tiny-key-1")).await.status(), 200);
    }
    assert_eq!(s.complete(Some("tiny-key-1")).await.status(), 429);
    let (status, _) = s
        .admin(
            patch.clone(),
            "/admin/keys/t-1/usage",
            "admin-secret",
            Some(json!({"remaining": 0})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(s.complete(Some("tiny-key-1")).await.status(), 429);

    let (status, _) = s
        .admin(
            get.clone(),
            "/admin/usage?plan=tiny&start=bad&end=2024-05-07",
            "admin-secret",
            None,
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = s
        .admin(
            get,
            "/admin/usage?plan=gold&start=2024-05-07&end=2024-05-07",
            "admin-secret",
            None,
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn anonymous_requests_limited_by_client_ip() {
    let s = start(
        r#"
[[plans]]
name = "free"
[anonymous]
mode = "ip"
throttle = { rate = 1.0, burst = 2 }
"#,
    )
    .await;
    assert_eq!(s.complete(None).await.status(), 200);
    assert_eq!(s.complete(None).await.status(), 200);
    let res = s
        .client
        .post(format!("{}/v1/completions", s.base))
        .header("x-forwarded-for", "203.0.113.9")
        .body(BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        429,
        "an untrusted peer cannot pick its identity"
    );
}

#[tokio::test]
async fn health_is_never_limited_and_malformed_bodies_are_json_400s() {
    let s = start(tollgate_gateway::DEMO_CONFIG).await;
    for _ in 0..50 {
        let res = s
            .client
            .get(format!("{}/health", s.base))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers().get("ratelimit").is_none());
    }
    let res = s
        .post("/v1/completions", Some("demo-free-key"), "{not json")
        .await;
    assert_eq!(res.status(), 400);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    // Malformed bodies cost nothing: after many, the whole burst of 5 still
    // passes, and the day's usage counts only those 5.
    for body in [
        "{not json",
        r#"{"model":"m"}"#,
        r#"{"model":"m","prompt":"hi","max_tokens":-1}"#,
        r#"{"model":"m","prompt":"hi","max_tokens":100001}"#,
    ] {
        for route in ["/v1/completions", "/v1/chat/completions"] {
            let res = s.post(route, Some("demo-free-key"), body).await;
            assert_eq!(res.status(), 400, "{route} {body}");
            assert!(res.headers().get("ratelimit").is_none());
        }
    }
    for _ in 0..5 {
        assert_eq!(s.complete(Some("demo-free-key")).await.status(), 200);
    }
    assert_eq!(s.complete(Some("demo-free-key")).await.status(), 429);
    let today = "2024-05-06";
    let (status, usage) = s
        .admin(
            reqwest::Method::GET,
            &format!("/admin/usage?plan=free&start={today}&end={today}"),
            "change-me",
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(usage["items"]["free-1"], json!([[5, 995]]));
}

/// A plan with a quota and no token budget: its requests need no estimate.
const QUOTA_ONLY: &str = r#"
[[plans]]
name = "q"
quota = { limit = 2, period = "DAY" }

[[keys]]
id = "q-1"
value = "key-q-12345"
plan = "q"

[admin]
key = "admin-secret"
"#;

/// Malformed bodies are 400s that cost nothing under a plan without a token
/// budget too, whose requests the layer decides without an estimate: the
/// quota of 2 still admits two requests after them.
#[tokio::test]
async fn malformed_bodies_cost_nothing_under_a_plan_without_a_token_budget() {
    let s = start(QUOTA_ONLY).await;
    for body in [r#"{"model":"#, "not json", r#"{"model":"m"}"#] {
        for route in ["/v1/completions", "/v1/chat/completions"] {
            let res = s.post(route, Some("key-q-12345"), body).await;
            assert_eq!(res.status(), 400, "{route} {body}");
            // A JSON error in the config's (default, AWS) style.
            let v: Value = res.json().await.unwrap();
            assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        }
    }
    // An unknown key is still refused before its body is looked at.
    assert_eq!(
        s.post("/v1/completions", Some("nope-nope"), "not json")
            .await
            .status(),
        403
    );
    for _ in 0..2 {
        assert_eq!(s.complete(Some("key-q-12345")).await.status(), 200);
    }
    assert_eq!(s.complete(Some("key-q-12345")).await.status(), 429);
    let (status, usage) = s
        .admin(
            reqwest::Method::GET,
            "/admin/usage?plan=q&start=2024-05-06&end=2024-05-06",
            "admin-secret",
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(usage["items"]["q-1"], json!([[2, 0]]));
}

/// The `data:` payloads of a server-sent event stream, in order.
fn sse_events(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect()
}

/// Asserts that every chunk of a stream carries the same `id`, `object`,
/// `created` and `model` as OpenAI's chunks do, `object` being `object`.
fn assert_one_head(chunks: &[Value], object: &str, id_prefix: &str) {
    let first = &chunks[0];
    assert!(
        first["id"].as_str().unwrap().starts_with(id_prefix),
        "{first}"
    );
    assert_eq!(first["object"], object, "{first}");
    assert_eq!(first["model"], "m", "{first}");
    assert!(
        first["created"].as_u64().unwrap() > 1_700_000_000,
        "{first}"
    );
    for c in chunks {
        for field in ["id", "object", "created", "model"] {
            assert_eq!(c[field], first[field], "{field} of {c}");
        }
    }
}

#[tokio::test]
async fn chat_stream_sends_one_event_per_token_then_usage() {
    let s = start(tollgate_gateway::DEMO_CONFIG).await;
    let res = s
        .post(
            "/v1/chat/completions",
            Some("demo-free-key"),
            r#"{"model":"m","messages":[{"role":"user","content":"abcdefgh"}],"max_tokens":4,"stream":true,"stream_options":{"include_usage":true},"mock_token_ms":0}"#,
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let text = res.text().await.unwrap();
    let events = sse_events(&text);
    // The role, 4 tokens, the finish, the usage, [DONE].
    assert_eq!(events.len(), 8, "{text}");
    assert_eq!(events[7], "[DONE]");
    let chunks: Vec<Value> = events[..7]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_one_head(&chunks, "chat.completion.chunk", "chatcmpl-");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["choices"][0]["finish_reason"], Value::Null);
    for c in &chunks[1..5] {
        assert_eq!(c["choices"][0]["delta"]["content"], "tok ", "{c}");
        assert_eq!(c["choices"][0]["finish_reason"], Value::Null, "{c}");
    }
    // Every chunk before the last says `"usage": null`, as OpenAI's do
    // when the usage is asked for.
    for c in &chunks[..6] {
        assert_eq!(c.get("usage"), Some(&Value::Null), "{c}");
    }
    // All 4 tokens of max_tokens were produced: `length`.
    assert_eq!(chunks[5]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[5]["choices"][0]["finish_reason"], "length");
    let last = &chunks[6];
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"], 2);
    assert_eq!(last["usage"]["completion_tokens"], 4);
    assert_eq!(last["usage"]["total_tokens"], 6);
}

/// `n` choices, as OpenAI answers them: that many choices, each with its
/// `index` (streamed: each chunk one choice's), and the usage counting every
/// choice's tokens. An `n` out of 1..=128 is a 400.
#[tokio::test]
async fn n_choices_are_answered_and_counted() {
    let s = start(tollgate_gateway::DEMO_CONFIG).await;
    let res = s
        .post(
            "/v1/chat/completions",
            Some("demo-free-key"),
            r#"{"model":"m","messages":[{"role":"user","content":"abcdefgh"}],"max_tokens":2,"n":3,"mock_token_ms":0}"#,
        )
        .await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{body}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i, "{c}");
        assert_eq!(c["message"]["content"], "tok tok ", "{c}");
        assert_eq!(c["finish_reason"], "length", "{c}");
    }
    assert_eq!(body["usage"]["completion_tokens"], 6);
    assert_eq!(body["usage"]["total_tokens"], 8);

    let res = s
        .post(
            "/v1/completions",
            Some("demo-free-key"),
            r#"{"model":"m","prompt":"abcdefgh","max_tokens":2,"n":2,"stream":true,"stream_options":{"include_usage":true},"mock_token_ms":0}"#,
        )
        .await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let events = sse_events(&text);
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let mut texts = [String::new(), String::new()];
    let mut finished = [0, 0];
    for c in &chunks {
        for choice in c["choices"].as_array().unwrap() {
            let i = choice["index"].as_u64().unwrap() as usize;
            texts[i].push_str(choice["text"].as_str().unwrap());
            finished[i] += usize::from(!choice["finish_reason"].is_null());
        }
    }
    assert_eq!(texts, ["tok tok ", "tok tok "], "{text}");
    assert_eq!(finished, [1, 1], "{text}");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 4, "{text}");

    for n in [0, 129] {
        let body = format!(r#"{{"model":"m","prompt":"hi","n":{n}}}"#);
        let res = s
            .post("/v1/completions", Some("demo-free-key"), &body)
            .await;
        assert_eq!(res.status(), 400, "n = {n}");
    }
}

#[tokio::test]
async fn a_stream_without_include_usage_has_no_usage_and_ends_with_a_finish_reason() {
    let s = start(tollgate_gateway::DEMO_CONFIG).await;
    // Chat: 2 of 5 tokens produced, so the model stopped by itself.
    let res = s
        .post(
            "/v1/chat/completions",
            Some("demo-free-key"),
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"mock_completion_tokens":2,"stream":true,"mock_token_ms":0}"#,
        )
        .await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let events = sse_events(&text);
    // The role, 2 tokens, the finish, [DONE].
    assert_eq!(events.len(), 5, "{text}");
    assert_eq!(events[4], "[DONE]");
    let chunks: Vec<Value> = events[..4]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_one_head(&chunks, "chat.completion.chunk", "chatcmpl-");
    for c in &chunks {
        assert!(c.get("usage").is_none(), "{c}");
        assert_eq!(c["choices"].as_array().unwrap().len(), 1, "{c}");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");

    // A completion streams text chunks (no role), then the finish.
    let res = s
        .post(
            "/v1/completions",
            Some("demo-free-key"),
            r#"{"model":"m","prompt":"hi","max_tokens":3,"stream":true,"mock_token_ms":0}"#,
        )
        .await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let events = sse_events(&text);
    assert_eq!(events.len(), 5, "{text}");
    assert_eq!(events[4], "[DONE]");
    let chunks: Vec<Value> = events[..4]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_one_head(&chunks, "text_completion", "cmpl-");
    for c in &chunks[..3] {
        assert_eq!(c["choices"][0]["text"], "tok ", "{c}");
        assert_eq!(c["choices"][0]["finish_reason"], Value::Null, "{c}");
    }
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "length");
    // Two answers never share an id.
    let res = s
        .post(
            "/v1/completions",
            Some("demo-free-key"),
            r#"{"model":"m","prompt":"hi","max_tokens":3,"stream":true,"mock_token_ms":0}"#,
        )
        .await;
    let text = res.text().await.unwrap();
    let other: Value = serde_json::from_str(sse_events(&text)[0]).unwrap();
    assert_ne!(other["id"], chunks[0]["id"]);
}

#[tokio::test]
async fn plain_answers_have_openais_fields() {
    let s = start(tollgate_gateway::DEMO_CONFIG).await;
    let v: Value = s
        .complete(Some("demo-free-key"))
        .await
        .json()
        .await
        .unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"), "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "m");
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000, "{v}");
    assert_eq!(v["choices"][0]["text"], "tok tok tok ");
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["choices"][0]["logprobs"], Value::Null);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["total_tokens"], 6);

    let res = s
        .post(
            "/v1/chat/completions",
            Some("demo-free-key"),
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":4,"mock_completion_tokens":1}"#,
        )
        .await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"), "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "m");
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "tok ");
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})
    );
}

/// One key on a plan roomy enough for a few requests in a row.
const ROOMY_CONFIG: &str = r#"
[[plans]]
name = "roomy"
throttle = { rate = 10.0, burst = 10 }

[[keys]]
id = "r"
value = "roomy-key"
plan = "roomy"

[response]
style = "openai"
"#;

/// What the official `openai` package and LiteLLM send: the chat API's
/// `max_completion_tokens` (which wins over `max_tokens`), content as an
/// array of parts, and an assistant turn with no content that only called a
/// tool. The mock answers them as OpenAI does, counting what the gateway's
/// estimate counts: only the text parts, and the larger maximum ignored.
#[tokio::test]
async fn chat_bodies_of_real_clients_are_answered() {
    let s = start(ROOMY_CONFIG).await;
    let chat = |body: Value| {
        let s = &s;
        async move {
            let res = s
                .post("/v1/chat/completions", Some("roomy-key"), &body.to_string())
                .await;
            assert_eq!(res.status(), 200);
            res.json::<Value>().await.unwrap()
        }
    };

    let v = chat(json!({
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 3,
        "max_tokens": 50,
    }))
    .await;
    assert_eq!(v["choices"][0]["message"]["content"], "tok tok tok ");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4})
    );

    // 8 + 4 characters of text (3 tokens); the image counts nothing.
    let v = chat(json!({
        "model": "m",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ]},
        ],
        "max_completion_tokens": 2,
    }))
    .await;
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    );

    // A tool call's turn: the assistant's content is null (or absent).
    let v = chat(json!({
        "model": "m",
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}},
            ]},
            {"role": "assistant", "tool_calls": []},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ],
        "max_tokens": 1,
    }))
    .await;
    // "weather?", the call's "w" and "{}", and "sunny": 16 characters,
    // 4 tokens.
    assert_eq!(v["usage"]["prompt_tokens"], 4, "{v}");

    // A streamed answer honours max_completion_tokens too.
    let res = s
        .post(
            "/v1/chat/completions",
            Some("roomy-key"),
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_completion_tokens":2,"stream":true,"stream_options":{"include_usage":true},"mock_token_ms":0}"#,
        )
        .await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    let events = sse_events(&text);
    let usage: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
    );

    // A message whose content is neither text, parts nor null is still a 400.
    let res = s
        .post(
            "/v1/chat/completions",
            Some("roomy-key"),
            r#"{"model":"m","messages":[{"role":"user","content":7}]}"#,
        )
        .await;
    assert_eq!(res.status(), 400);
}

/// OpenAI's API takes `null` for any optional field, as its absence (the
/// spec marks `stream`, `stream_options.include_usage`, `n` and the
/// maxima "or null"); clients built from that spec send them so.
#[tokio::test]
async fn null_optional_fields_are_taken_as_absent() {
    let s = start(ROOMY_CONFIG).await;
    for (route, body) in [
        (
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":null,"stream_options":null,"n":null,"max_tokens":null,"max_completion_tokens":2}"#,
        ),
        (
            "/v1/completions",
            r#"{"model":"m","prompt":"hi","stream":null,"max_tokens":2}"#,
        ),
    ] {
        let res = s.post(route, Some("roomy-key"), body).await;
        let status = res.status();
        let v: Value = res.json().await.unwrap();
        assert_eq!(status, 200, "{route}: {v}");
        assert_eq!(v["usage"]["completion_tokens"], 2, "{v}");
    }
    // `include_usage: null` is no request for the usage chunk.
    let res = s
        .post(
            "/v1/chat/completions",
            Some("roomy-key"),
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":2,"stream":true,"stream_options":{"include_usage":null},"mock_token_ms":0}"#,
        )
        .await;
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert!(!text.contains("total_tokens"), "{text}");
    assert_eq!(sse_events(&text).last(), Some(&"[DONE]"), "{text}");
}

/// A config whose plans name models (listed by `GET /v1/models`).
const MODELS_CONFIG: &str = r#"
[[plans]]
name = "p"
throttle = { rate = 1.0, burst = 3 }
[plans.models]
"small" = { throttle = { rate = 1.0, burst = 3 } }
"*" = { throttle = { rate = 1.0, burst = 3 } }

[[plans]]
name = "q"
throttle = { rate = 1.0, burst = 3 }
[plans.models]
"big" = { throttle = { rate = 1.0, burst = 3 } }
"small" = { throttle = { rate = 1.0, burst = 3 } }

[[keys]]
id = "k"
value = "models-key"
plan = "p"

[response]
style = "openai"
"#;

#[tokio::test]
async fn models_are_listed_as_openai_lists_them_and_the_get_is_limited_not_refused() {
    let s = start(MODELS_CONFIG).await;
    let get = || {
        s.client
            .get(format!("{}/v1/models", s.base))
            .header("authorization", "Bearer models-key")
            .send()
    };
    let res = get().await.unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["big", "small"]);
    for m in v["data"].as_array().unwrap() {
        assert_eq!(m["object"], "model", "{m}");
        assert!(m["created"].is_u64(), "{m}");
        assert!(m["owned_by"].is_string(), "{m}");
    }
    // A GET is limited like any matched route (bursts of 3), never a 400.
    assert_eq!(get().await.unwrap().status(), 200);
    assert_eq!(get().await.unwrap().status(), 200);
    assert_eq!(get().await.unwrap().status(), 429);
    // Without a key: refused as a key problem.
    let res = s
        .client
        .get(format!("{}/v1/models", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    // A config that names no model lists the mock's own.
    let demo = start(tollgate_gateway::DEMO_CONFIG).await;
    let v: Value = demo
        .client
        .get(format!("{}/v1/models", demo.base))
        .header("x-api-key", "demo-free-key")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["id"], "mock", "{v}");
}

/// Hugging Face style names (`org/name`), as OpenAI SDKs put them in the
/// retrieve path, unescaped.
const HF_MODELS_CONFIG: &str = r#"
[[plans]]
name = "p"
throttle = { rate = 1.0, burst = 3 }
[plans.models]
"meta-llama/Llama-3.1-8B" = { throttle = { rate = 1.0, burst = 3 } }
"small" = { throttle = { rate = 1.0, burst = 3 } }

[[keys]]
id = "k"
value = "models-key"
plan = "p"

[response]
style = "openai"
"#;

#[tokio::test]
async fn a_model_is_retrieved_as_openai_answers_it_and_an_unknown_one_is_model_not_found() {
    let s = start(HF_MODELS_CONFIG).await;
    let get = |path: &str| {
        s.client
            .get(format!("{}/v1/models/{path}", s.base))
            .header("authorization", "Bearer models-key")
            .send()
    };
    for name in ["small", "meta-llama/Llama-3.1-8B"] {
        let res = get(name).await.unwrap();
        assert_eq!(res.status(), 200, "{name}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["id"], name, "{v}");
        assert_eq!(v["object"], "model", "{v}");
        assert!(v["created"].is_u64(), "{v}");
        assert!(v["owned_by"].is_string(), "{v}");
    }
    let res = get("nope").await.unwrap();
    assert_eq!(res.status(), 404);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_found", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert_eq!(v["error"]["param"], "model", "{v}");
    // Limited like the list (a burst of 3 used above): the fourth is a 429.
    assert_eq!(get("small").await.unwrap().status(), 429);
    // Without a key, refused as a key problem, not answered.
    let res = s
        .client
        .get(format!("{}/v1/models/small", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
}

/// A retrieve path whose name is not UTF-8 once decoded (`%FF`) names no
/// model the list holds: OpenAI's 404 `model_not_found`, as JSON. Before,
/// axum's path extractor answered it with a plain-text 400 that no OpenAI
/// client reads as an error object.
#[tokio::test]
async fn a_model_name_that_is_not_utf8_is_model_not_found_as_json() {
    let s = start(HF_MODELS_CONFIG).await;
    for path in ["%FF", "org%2F%C3"] {
        let res = s
            .client
            .get(format!("{}/v1/models/{path}", s.base))
            .header("authorization", "Bearer models-key")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 404, "{path}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["code"], "model_not_found", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    }
}

/// A 404 and a 405 are JSON errors in the config's style, as the layer's
/// refusals are (an OpenAI client reads their message), naming the path but
/// never the query; a 405 keeps its `Allow` header.
#[tokio::test]
async fn unmatched_routes_and_methods_answer_json_errors_in_the_configs_style() {
    let s = start(tollgate_gateway::DEMO_CONFIG).await;
    let res = s
        .post(
            "/v1/nothing-here?api_key=sk-secret",
            Some("demo-free-key"),
            BODY,
        )
        .await;
    assert_eq!(res.status(), 404);
    assert_eq!(res.headers()["content-type"], "application/json");
    let v: Value = res.json().await.unwrap();
    assert_eq!(
        v,
        json!({"error": {
            "message": "Invalid URL (POST /v1/nothing-here)",
            "type": "invalid_request_error",
            "param": null,
            "code": null,
        }})
    );
    for (method, path, allow) in [
        (reqwest::Method::GET, "/v1/completions", "POST"),
        (reqwest::Method::DELETE, "/health", "GET,HEAD"),
    ] {
        let res = s
            .client
            .request(method.clone(), format!("{}{path}", s.base))
            .header("x-api-key", "demo-free-key")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 405, "{method} {path}");
        assert_eq!(res.headers()["allow"], allow, "{method} {path}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(
            v["error"]["message"],
            format!("Invalid method for URL ({method} {path})")
        );
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    // The AWS style (the default) answers as API Gateway words its errors.
    let s = start(TOKENS_CONFIG).await;
    let res = s.post("/v1/nothing-here", Some("big-key"), BODY).await;
    assert_eq!(res.status(), 404);
    assert_eq!(res.text().await.unwrap(), r#"{"message":"Not Found"}"#);
    let res = s
        .client
        .get(format!("{}/v1/completions", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    assert_eq!(
        res.text().await.unwrap(),
        r#"{"message":"Method Not Allowed"}"#
    );
}

#[tokio::test]
async fn unmatched_routes_and_methods_cost_nothing() {
    let s = start(tollgate_gateway::DEMO_CONFIG).await;
    for _ in 0..10 {
        let res = s
            .post("/v1/nothing-here", Some("demo-free-key"), BODY)
            .await;
        assert_eq!(res.status(), 404);
        let res = s
            .client
            .get(format!("{}/v1/completions", s.base))
            .header("x-api-key", "demo-free-key")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 405);
        let res = s
            .client
            .delete(format!("{}/v1/models", s.base))
            .header("x-api-key", "demo-free-key")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 405);
    }
    // The whole burst of 5 is still there, and the day's usage holds only it.
    for i in 0..5 {
        assert_eq!(s.complete(Some("demo-free-key")).await.status(), 200, "{i}");
    }
    assert_eq!(s.complete(Some("demo-free-key")).await.status(), 429);
    let (status, usage) = s
        .admin(
            reqwest::Method::GET,
            "/admin/usage?plan=free&start=2024-05-06&end=2024-05-06",
            "change-me",
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(usage["items"]["free-1"], json!([[5, 995]]));
}

#[test]
fn a_bad_config_names_the_field_and_the_server_refuses_to_start() {
    let dir = std::env::temp_dir().join(format!("tollgate-bad-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "[[plans]]\nname = \"free\"\nthrottle = { rate = -2.0, burst = 5 }\n",
            "3:",
            "plans[0].throttle.rate",
        ),
        (
            "[[plans]]\nname = \"free\"\ncolour = \"blue\"\n",
            "3:",
            "plans[0].colour",
        ),
        (
            "[[plans]]\nname = \"free\"\n[[keys]]\nid = \"k\"\nvalue = \"v\"\nplan = \"pro\"\n",
            "6:",
            "keys[0].plan",
        ),
        (
            "[[plans]]\nname = \"free\"\nquota = { limit = 5, period = \"FORTNIGHT\" }\n",
            "3:",
            "plans[0].quota.period",
        ),
    ];
    for (i, (src, line, path)) in cases.iter().enumerate() {
        let file = dir.join(format!("bad-{i}.toml"));
        std::fs::write(&file, src).unwrap();
        let out = std::process::Command::new(server_binary())
            .args([
                "--config",
                file.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "case {i}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("bad-{i}.toml:{line}")) && err.contains(path),
            "case {i}: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

const STREAM: &str =
    r#"{"model":"m","prompt":"hi","max_tokens":40,"stream":true,"mock_token_ms":20}"#;

/// Requests in flight admitted now: each is answered 200 or 429 at once.
async fn admitted_now(s: &Running) -> bool {
    s.complete(Some("demo-free-key")).await.status() == 200
}

/// Polls until a request is admitted again (a place given back), for two
/// seconds at most.
async fn place_comes_back(s: &Running) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        // Keep the throttle out of the way: only the cap is under test.
        s.clock.advance(Duration::from_secs(10));
        if admitted_now(s).await {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the place never came back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_stream_holds_its_concurrency_place_to_its_last_event() {
    use futures_util_free::next_chunk;

    // The demo plan `free` allows 2 requests of a key in flight.
    let s = start(tollgate_gateway::DEMO_CONFIG).await;
    let mut one = s
        .post("/v1/completions", Some("demo-free-key"), STREAM)
        .await;
    let mut two = s
        .post("/v1/completions", Some("demo-free-key"), STREAM)
        .await;
    assert_eq!((one.status().as_u16(), two.status().as_u16()), (200, 200));
    // Both handlers returned and both streams are under way: full.
    assert!(next_chunk(&mut one).await.is_some());
    assert!(next_chunk(&mut two).await.is_some());
    let res = s.complete(Some("demo-free-key")).await;
    assert_eq!(res.status(), 429);
    // `t` agrees with `Retry-After`: a place is guessed back within 1 s.
    assert_eq!(res.headers()["ratelimit"], "\"concurrency\";r=0;t=1");
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(res.headers()["retry-after-ms"], "1000");
    assert!(
        res.headers()["ratelimit-policy"]
            .to_str()
            .unwrap()
            .contains("qu=\"concurrent-requests\"")
    );

    // Stream one, read to its last event, gives its place back.
    let mut events = 1;
    while let Some(chunk) = next_chunk(&mut one).await {
        events += chunk.matches("data:").count();
    }
    assert!(events >= 40, "{events} events");
    place_comes_back(&s).await;

    // Stream two's client goes away mid-stream: its place comes back too.
    drop(two);
    place_comes_back(&s).await;
    // Both places are free: two streams again, and a third is refused.
    s.clock.advance(Duration::from_secs(10));
    let a = s
        .post("/v1/completions", Some("demo-free-key"), STREAM)
        .await;
    let b = s
        .post("/v1/completions", Some("demo-free-key"), STREAM)
        .await;
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    assert_eq!(s.complete(Some("demo-free-key")).await.status(), 429);
}

const FAILING_STREAM: &str = r#"{"model":"m","prompt":"hi","max_tokens":40,"stream":true,"mock_token_ms":5,"mock_fail_after":3}"#;

#[tokio::test]
async fn places_all_come_back_after_a_mixed_storm() {
    let s = std::sync::Arc::new(start(tollgate_gateway::DEMO_CONFIG).await);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = std::sync::Arc::clone(&s);
        tasks.push(tokio::spawn(async move {
            s.clock.advance(Duration::from_secs(1));
            match i % 4 {
                // Completed streams.
                0 => {
                    let res = s
                        .post("/v1/completions", Some("demo-free-key"), STREAM)
                        .await;
                    let _ = res.text().await;
                }
                // Streams abandoned after their first event.
                1 => {
                    let mut res = s
                        .post("/v1/completions", Some("demo-free-key"), STREAM)
                        .await;
                    let _ = futures_util_free::next_chunk(&mut res).await;
                }
                // Streams whose model fails mid-way (the body errors).
                2 => {
                    let res = s
                        .post("/v1/completions", Some("demo-free-key"), FAILING_STREAM)
                        .await;
                    let _ = res.text().await;
                }
                // Plain requests.
                _ => {
                    let _ = s.complete(Some("demo-free-key")).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Every place came back: two at once again, and no more.
    place_comes_back(&s).await;
    s.clock.advance(Duration::from_secs(10));
    let a = s
        .post("/v1/completions", Some("demo-free-key"), STREAM)
        .await;
    let b = s
        .post("/v1/completions", Some("demo-free-key"), STREAM)
        .await;
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    assert_eq!(s.complete(Some("demo-free-key")).await.status(), 429);
}

/// Reading a streamed body one chunk at a time with reqwest alone.
mod futures_util_free {
    /// The next chunk of `res` as text, or `None` at the end.
    pub(super) async fn next_chunk(res: &mut reqwest::Response) -> Option<String> {
        let chunk = res.chunk().await.ok()??;
        Some(String::from_utf8_lossy(&chunk).into_owned())
    }
}

/// Two keys on a plan of 1000 tokens a minute (and room for many requests).
const TOKENS_CONFIG: &str = r#"
[[plans]]
name = "llm"
throttle = { rate = 100.0, burst = 100 }
tokens = { per_minute = 1000 }

[[keys]]
id = "big"
value = "big-key"
plan = "llm"

[[keys]]
id = "small"
value = "small-key"
plan = "llm"
"#;

/// A completion of an empty prompt: its estimate is `max_tokens`.
fn completion(max_tokens: u32, produced: Option<u32>, stream: bool) -> String {
    let mut body = json!({"model": "m", "prompt": "", "max_tokens": max_tokens, "stream": stream});
    if let Some(n) = produced {
        body["mock_completion_tokens"] = json!(n);
    }
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    if stream {
        body["mock_token_ms"] = json!(20);
    }
    body.to_string()
}

impl Running {
    async fn tokens(&self, key: &str, max_tokens: u32, produced: Option<u32>) -> reqwest::Response {
        self.post(
            "/v1/completions",
            Some(key),
            &completion(max_tokens, produced, false),
        )
        .await
    }

    /// Polls until a request of `max_tokens` from `key` gets `status` (the
    /// settlement of a dropped stream lands when the server notices), for two
    /// seconds at most.
    async fn until(&self, key: &str, max_tokens: u32, status: u16) -> reqwest::Response {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let res = self.tokens(key, max_tokens, Some(0)).await;
            if res.status() == status || std::time::Instant::now() > deadline {
                return res;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test]
async fn a_token_budget_spent_by_large_requests_leaves_other_keys_alone() {
    let s = start(TOKENS_CONFIG).await;
    // Two requests of 400 tokens fit in 1000; a third does not.
    for left in [600, 200] {
        let res = s.tokens("big-key", 400, None).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-ratelimit-limit-tokens"], "1000");
        assert_eq!(
            res.headers()["x-ratelimit-remaining-tokens"],
            left.to_string().as_str()
        );
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["usage"]["total_tokens"], 400);
    }
    let res = s.tokens("big-key", 400, None).await;
    assert_eq!(res.status(), 429);
    // 200 more tokens take 12 s to come back at 1000 a minute.
    assert_eq!(res.headers()["retry-after"], "12");
    assert_eq!(res.headers()["retry-after-ms"], "12000");
    // Nothing this request can use now; usable again with the retry.
    assert_eq!(res.headers()["ratelimit"], "\"tokens-minute\";r=0;t=12");
    // Small requests of another key pass meanwhile.
    for _ in 0..5 {
        assert_eq!(s.tokens("small-key", 10, None).await.status(), 200);
    }
    // A request larger than the whole budget is refused at once, and says so.
    let res = s.tokens("small-key", 1001, None).await;
    assert_eq!(res.status(), 429);
    // It never passes: clients are told not to retry.
    assert_eq!(res.headers()["x-should-retry"], "false");
    assert_eq!(
        res.text().await.unwrap(),
        r#"{"message":"Cost Exceeds Limit"}"#
    );
    // The budget refills: 12 s later the 400 fit.
    s.clock.advance(Duration::from_secs(12));
    assert_eq!(s.tokens("big-key", 400, None).await.status(), 200);
}

/// A chat whose body also carries a `prompt` is not one of no tokens: a
/// stray `"prompt": ""` does not make a request larger than the whole
/// budget pass (the mock, as a chat server, would answer the messages,
/// which would then be charged after the fact). The estimate counts the
/// messages too, and the mock refuses the stray field, as OpenAI does.
#[tokio::test]
async fn a_stray_prompt_does_not_hide_a_chats_messages_from_the_estimate() {
    let s = start(TOKENS_CONFIG).await;
    // 4,004 characters: 1,001 tokens, more than the 1,000 a minute.
    let messages = json!([{"role": "user", "content": "a".repeat(4004)}]);
    let body = json!({"model": "m", "messages": messages, "max_tokens": 0});
    let res = s
        .post("/v1/chat/completions", Some("big-key"), &body.to_string())
        .await;
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["x-should-retry"], "false");
    assert_eq!(
        res.text().await.unwrap(),
        r#"{"message":"Cost Exceeds Limit"}"#
    );
    let body = json!({"model": "m", "prompt": "", "messages": messages, "max_tokens": 0});
    let res = s
        .post("/v1/chat/completions", Some("big-key"), &body.to_string())
        .await;
    assert_eq!(res.status(), 400);
    let v: Value = res.json().await.unwrap();
    assert_eq!(
        v["message"], "Unrecognized request argument supplied: prompt",
        "{v}"
    );
    // Neither was charged: the whole budget is still there.
    assert_eq!(s.tokens("big-key", 1000, Some(0)).await.status(), 200);
}

#[tokio::test]
async fn settlement_refunds_an_over_estimate_and_charges_an_under_estimate() {
    let s = start(TOKENS_CONFIG).await;
    // 900 reserved, 100 used: 800 come back, so 900 fit again at once.
    let res = s.tokens("big-key", 900, Some(100)).await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["usage"]["total_tokens"], 100);
    assert_eq!(s.tokens("big-key", 900, Some(0)).await.status(), 200);
    // (900 + 100 used: a minute to refill.)
    s.clock.advance(Duration::from_secs(60));
    // 100 reserved, 1000 used: 900 more are charged, and the next request,
    // of only 100, waits.
    let res = s.tokens("big-key", 100, Some(1000)).await;
    assert_eq!(res.status(), 200);
    let _ = res.text().await;
    let res = s.tokens("big-key", 100, None).await;
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "6");
    // Without the charge the same request would have passed: another key's does.
    assert_eq!(s.tokens("small-key", 100, None).await.status(), 200);
}

#[tokio::test]
async fn a_dropped_stream_settles_the_tokens_it_produced() {
    use futures_util_free::next_chunk;

    let s = start(TOKENS_CONFIG).await;
    // A stream of up to 500 tokens reserves 500: 900 more do not fit.
    let mut stream = s
        .post(
            "/v1/completions",
            Some("big-key"),
            &completion(500, None, true),
        )
        .await;
    assert_eq!(stream.status(), 200);
    assert!(next_chunk(&mut stream).await.is_some());
    assert_eq!(s.tokens("big-key", 900, Some(0)).await.status(), 429);
    // The client goes away after a few tokens: what was produced is settled,
    // the rest of the reservation comes back, and 900 fit.
    drop(stream);
    assert_eq!(s.until("big-key", 900, 200).await.status(), 200);
    // A stream whose model fails after 3 tokens is charged those 3: the
    // rest of its 500 come back.
    s.clock.advance(Duration::from_secs(60));
    let body = json!({"model": "m", "prompt": "", "max_tokens": 500, "stream": true, "mock_token_ms": 5, "mock_fail_after": 3});
    let res = s
        .post("/v1/completions", Some("big-key"), &body.to_string())
        .await;
    assert_eq!(res.status(), 200);
    assert!(res.text().await.is_err(), "the stream is cut off");
    assert_eq!(s.until("big-key", 997, 200).await.status(), 200);
    // (That probe used nothing and is refunded too.) 997 more fill the
    // bucket exactly: the failed stream was charged its 3 tokens, no more
    // and no fewer.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let res = s.tokens("big-key", 997, Some(997)).await;
    assert_eq!(res.status(), 200);
    let _ = res.text().await;
    let res = s.tokens("big-key", 1, Some(1)).await;
    assert_eq!(res.status(), 429);
    // One token comes back in 60 ms.
    assert_eq!(res.headers()["retry-after-ms"], "60");
    assert_eq!(res.headers()["ratelimit"], "\"tokens-minute\";r=0;t=1");
    // A stream read to its end is charged all it produced.
    s.clock.advance(Duration::from_secs(60));
    let res = s
        .post(
            "/v1/completions",
            Some("big-key"),
            &completion(500, Some(50), true),
        )
        .await;
    let text = res.text().await.unwrap();
    assert!(text.contains("\"total_tokens\":50"), "{text}");
    // 50 used: 950 left, so 950 fit; 951 do not.
    assert_eq!(s.until("big-key", 951, 429).await.status(), 429);
    assert_eq!(s.tokens("big-key", 950, Some(0)).await.status(), 200);
}

/// A plan with a token budget of 1000 a minute and room for many requests.
const PROMPTS_CONFIG: &str = r#"
[[plans]]
name = "llm"
throttle = { rate = 100.0, burst = 100 }
tokens = { per_minute = 1000 }

[[keys]]
id = "k"
value = "prompts-key"
plan = "llm"

[response]
style = "openai"
"#;

/// A completion's `prompt` in every shape OpenAI's completions take: a
/// string, strings, token ids, lists of token ids. Each prompt is answered
/// `n` times (choice `index` = prompt × n + j), the usage counts the
/// prompt's characters (`ceil(chars / 4)`, all together) and its token ids
/// (one each), and the estimate charged before the call is that prompt plus
/// `max_tokens` for every choice.
#[tokio::test]
async fn a_completions_prompt_in_every_openai_shape_is_answered_and_counted() {
    let s = start(PROMPTS_CONFIG).await;
    // (prompt, n, choices, prompt tokens); max_tokens 2, produced 1.
    let cases = [
        (json!("abcdefgh"), 1, 1, 2),
        (json!(["abcd", "éfgh", "i"]), 1, 3, 3),
        (json!(["abcd", "efgh"]), 2, 4, 2),
        (json!([1, 2, 3]), 2, 2, 3),
        (json!([[1, 2], [3], []]), 1, 3, 3),
        (json!([[1, 2], [3]]), 3, 6, 3),
    ];
    let mut used = 0;
    for (prompt, n, choices, prompt_tokens) in cases {
        let body = json!({"model": "m", "prompt": prompt, "max_tokens": 2, "n": n,
            "mock_completion_tokens": 1});
        let res = s
            .post("/v1/completions", Some("prompts-key"), &body.to_string())
            .await;
        assert_eq!(res.status(), 200, "{body}");
        let remaining: u64 = res.headers()["x-ratelimit-remaining-tokens"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let answer: Value = res.json().await.unwrap();
        let estimate = prompt_tokens + 2 * choices;
        assert_eq!(1000 - used - remaining, estimate, "estimate of {body}");
        let got = answer["choices"].as_array().unwrap();
        assert_eq!(got.len() as u64, choices, "{answer}");
        for (i, c) in got.iter().enumerate() {
            assert_eq!(c["index"], i, "{c}");
            assert_eq!(c["text"], "tok ", "{c}");
        }
        let usage = &answer["usage"];
        assert_eq!(usage["prompt_tokens"], prompt_tokens, "{body}");
        assert_eq!(usage["completion_tokens"], choices, "{body}");
        assert_eq!(usage["total_tokens"], prompt_tokens + choices, "{body}");
        used += prompt_tokens + choices;
    }
    // An empty list of prompts, or a list of mixed shapes, is no prompt:
    // a 400 that costs nothing.
    for prompt in [json!([]), json!(["a", 1]), json!([["a"]])] {
        let body = json!({"model": "m", "prompt": prompt}).to_string();
        let res = s.post("/v1/completions", Some("prompts-key"), &body).await;
        assert_eq!(res.status(), 400, "{body}");
    }
    let res = s
        .post(
            "/v1/completions",
            Some("prompts-key"),
            &completion(0, Some(0), false),
        )
        .await;
    let remaining = &res.headers()["x-ratelimit-remaining-tokens"];
    assert_eq!(remaining.to_str().unwrap(), (1000 - used).to_string());
}

/// The estimate the gateway charges before the call and the usage the mock
/// answers count the same prompt: for every body the mock serves, what the
/// token budget lost at once is the answer's `prompt_tokens` plus
/// `max_tokens` (the mock generates all of it). A body with text the
/// estimate would count and the mock would not (a Responses API text part
/// in a chat message, a Messages request's `system`, the other route's
/// prompt) or a maximum the mock would not honour is refused instead, as
/// OpenAI refuses it: a 400 in OpenAI's shape that costs nothing.
#[tokio::test]
async fn the_estimate_and_the_mocks_usage_count_the_same_prompt() {
    let s = start(PROMPTS_CONFIG).await;
    let user = |content: Value| json!([{"role": "user", "content": content}]);
    let bodies = [
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": user(json!("abcdefgh")), "max_tokens": 2}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "max_tokens": 2, "messages":
                user(json!([{"type": "input_text", "text": "abcdefgh"}]))}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "max_tokens": 2, "messages":
                user(json!([{"type": "output_text", "text": "abcdefgh"}]))}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "max_tokens": 2, "messages": user(json!("ab")),
                "system": "be brief, be kind"}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "max_tokens": 2, "messages": user(json!("ab")),
                "instructions": "be brief, be kind"}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "max_tokens": 2, "messages": user(json!("ab")),
                "prompt": "abcdefghijklmnop"}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "max_tokens": 2, "messages": user(json!("ab")),
                "max_output_tokens": 50}),
        ),
        (
            "/v1/completions",
            json!({"model": "m", "max_tokens": 2, "prompt": "ab", "n_predict": 50}),
        ),
        (
            "/v1/completions",
            json!({"model": "m", "max_tokens": 2, "prompt": "ab",
                "messages": user(json!("abcdefghijklmnop"))}),
        ),
        // `null` is absence, as everywhere in OpenAI's API.
        (
            "/v1/completions",
            json!({"model": "m", "max_tokens": 2, "prompt": "abcd", "system": null,
                "messages": null, "n_predict": null}),
        ),
    ];
    let mut used = 0;
    let mut served = 0;
    for (route, body) in bodies {
        let res = s.post(route, Some("prompts-key"), &body.to_string()).await;
        let status = res.status();
        let remaining: Option<u64> = res
            .headers()
            .get("x-ratelimit-remaining-tokens")
            .map(|v| v.to_str().unwrap().parse().unwrap());
        let answer: Value = res.json().await.unwrap();
        if status == 200 {
            served += 1;
            let remaining = remaining.unwrap();
            let prompt = answer["usage"]["prompt_tokens"].as_u64().unwrap();
            assert_eq!(answer["usage"]["completion_tokens"], 2, "{answer}");
            assert_eq!(1000 - used - remaining, prompt + 2, "{route} {body}");
            used += prompt + 2;
        } else {
            // Costing nothing: the next body served finds all of `used`.
            assert_eq!(status, 400, "{route} {body}: {answer}");
            let error = &answer["error"];
            assert_eq!(error["type"], "invalid_request_error", "{answer}");
            assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }
    assert_eq!(served, 2, "the plain chat and the completion with nulls");
}

/// Posts `body` to `route` with the prompts key: the status, the tokens the
/// budget lost at once (from `x-ratelimit-remaining-tokens`, given what
/// was `used` before), and the answer.
async fn charged(s: &Running, route: &str, body: &Value, used: u64) -> (u16, Option<u64>, Value) {
    let res = s.post(route, Some("prompts-key"), &body.to_string()).await;
    let status = res.status().as_u16();
    let reserved = res
        .headers()
        .get("x-ratelimit-remaining-tokens")
        .map(|v| 1000 - used - v.to_str().unwrap().parse::<u64>().unwrap());
    let answer = if status == 200 && body["stream"] == true {
        let text = res.text().await.unwrap();
        let events = sse_events(&text);
        serde_json::from_str(events[events.len() - 2]).unwrap()
    } else {
        res.json().await.unwrap()
    };
    (status, reserved, answer)
}

/// Tools are prompt text the model reads: OpenAI counts their definitions
/// in `prompt_tokens`, and a chat template writes them into the prompt. A
/// chat's `tools` (and legacy `functions`) count each definition's JSON,
/// written compactly, and an assistant turn's calls their names and
/// arguments: the gateway's estimate and the mock's usage alike, streamed
/// or not. A completion, which takes no tools, is refused them, costing
/// nothing.
#[tokio::test]
async fn tool_definitions_and_calls_are_prompt_tokens_estimated_and_answered() {
    let s = start(PROMPTS_CONFIG).await;
    let tool = json!({"type": "function", "function": {"name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}});
    let tool_chars = tool.to_string().chars().count() as u64;
    let user = json!({"role": "user", "content": "weather?"});
    let call = json!({"role": "assistant", "content": null, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]});
    let legacy = json!({"role": "assistant", "content": null,
        "function_call": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}});
    let answer = json!({"role": "tool", "tool_call_id": "c1", "content": "sunny"});
    // (body, prompt characters)
    let cases = [
        (
            json!({"model": "m", "messages": [user], "tools": [tool, tool],
                "tool_choice": "auto", "parallel_tool_calls": false, "max_tokens": 2}),
            8 + 2 * tool_chars,
        ),
        (
            json!({"model": "m", "messages": [user], "functions": [tool["function"]],
                "function_call": "auto", "max_tokens": 2}),
            8 + tool["function"].to_string().chars().count() as u64,
        ),
        // "get_weather" and `{"city":"Paris"}`: 11 + 16; "sunny": 5.
        (
            json!({"model": "m", "messages": [user, call, answer], "tools": [tool],
                "max_tokens": 2, "stream": true, "stream_options": {"include_usage": true},
                "mock_token_ms": 0}),
            8 + 27 + 5 + tool_chars,
        ),
        // "get_weather" and `{"city":"Rome"}`: 11 + 15.
        (
            json!({"model": "m", "messages": [user, legacy], "max_tokens": 2}),
            8 + 26,
        ),
    ];
    let mut used = 0;
    for (body, chars) in cases {
        let (status, reserved, answer) = charged(&s, "/v1/chat/completions", &body, used).await;
        assert_eq!(status, 200, "{body}: {answer}");
        let prompt = chars.div_ceil(4);
        assert_eq!(answer["usage"]["prompt_tokens"], prompt, "{body}: {answer}");
        assert_eq!(reserved, Some(prompt + 2), "{body}");
        used += prompt + 2;
    }
    for tools in [
        json!({"tools": [tool]}),
        json!({"functions": [tool["function"]]}),
    ] {
        let mut body = json!({"model": "m", "prompt": "ab", "max_tokens": 2});
        body.as_object_mut()
            .unwrap()
            .extend(tools.as_object().unwrap().clone());
        let (status, _, answer) = charged(&s, "/v1/completions", &body, used).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Unrecognized")
        );
    }
    let body = json!({"model": "m", "prompt": "", "max_tokens": 0});
    assert_eq!(charged(&s, "/v1/completions", &body, used).await.1, Some(0));
}

/// A completion's `suffix` is prompt text, and its `best_of` candidates are
/// generated and billed for each prompt, `n` of them returned, as OpenAI
/// does: the estimate and the mock's usage count both alike. What OpenAI
/// refuses (`best_of` below `n`, or streamed beyond `n`; either field on a
/// chat) is a 400 costing nothing.
#[tokio::test]
async fn a_completions_suffix_and_best_of_are_estimated_and_answered() {
    let s = start(PROMPTS_CONFIG).await;
    // (body, prompt tokens, choices returned, candidates generated)
    let cases = [
        (
            json!({"model": "m", "prompt": "abcd", "suffix": "efghijkl", "max_tokens": 2}),
            3,
            1,
            1,
        ),
        (
            json!({"model": "m", "prompt": "abcd", "best_of": 3, "max_tokens": 2}),
            1,
            1,
            3,
        ),
        (
            json!({"model": "m", "prompt": ["abcd", "efgh"], "best_of": 3, "n": 2,
                "echo": true, "logprobs": 1, "max_tokens": 2}),
            2,
            4,
            6,
        ),
        (
            json!({"model": "m", "prompt": "abcd", "best_of": 2, "n": 2, "stream": true,
                "stream_options": {"include_usage": true}, "mock_token_ms": 0, "max_tokens": 2}),
            1,
            2,
            2,
        ),
    ];
    let mut used = 0;
    for (body, prompt, choices, candidates) in cases {
        let (status, reserved, answer) = charged(&s, "/v1/completions", &body, used).await;
        assert_eq!(status, 200, "{body}: {answer}");
        assert_eq!(reserved, Some(prompt + 2 * candidates), "{body}");
        let usage = &answer["usage"];
        assert_eq!(usage["prompt_tokens"], prompt, "{body}: {answer}");
        assert_eq!(
            usage["completion_tokens"],
            2 * candidates,
            "{body}: {answer}"
        );
        if body["stream"] != true {
            assert_eq!(answer["choices"].as_array().unwrap().len() as u64, choices);
        }
        used += prompt + 2 * candidates;
    }
    let refused = [
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "ab", "best_of": 1, "n": 2}),
        ),
        (
            "/v1/completions",
            json!({"model": "m", "prompt": "ab", "best_of": 2, "stream": true}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "ab"}], "suffix": "cd"}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "ab"}], "best_of": 2}),
        ),
    ];
    for (route, body) in refused {
        let (status, _, answer) = charged(&s, route, &body, used).await;
        assert_eq!(status, 400, "{body}: {answer}");
    }
    let body = json!({"model": "m", "prompt": "", "max_tokens": 0});
    assert_eq!(charged(&s, "/v1/completions", &body, used).await.1, Some(0));
}

/// A model's whole context as `max_completion_tokens` (128,000 for some of
/// OpenAI's), with a short answer asked of the mock: answered, since the
/// mock generates only `mock_completion_tokens`; the cap is on what it
/// generates, so a request that would make it generate more than 100,000
/// tokens is still a 400 that costs nothing.
#[tokio::test]
async fn a_large_max_tokens_with_a_short_mock_answer_is_answered() {
    let s = start(ROOMY_CONFIG).await;
    for field in ["max_tokens", "max_completion_tokens"] {
        let body = json!({
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            field: 128_000,
            "mock_completion_tokens": 3,
        });
        let res = s
            .post("/v1/chat/completions", Some("roomy-key"), &body.to_string())
            .await;
        assert_eq!(res.status(), 200, "{field}");
        let answer: Value = res.json().await.unwrap();
        assert_eq!(answer["usage"]["completion_tokens"], 3, "{field}");
        assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{field}");
    }
    // What the mock would generate past its cap: refused, at no cost.
    for body in [
        json!({"model": "m", "prompt": "hi", "max_tokens": 128_000}),
        json!({"model": "m", "prompt": "hi", "max_tokens": 16, "mock_completion_tokens": 100_001}),
        json!({"model": "m", "prompt": "hi", "max_tokens": 16, "mock_completion_tokens": 50_001, "n": 2}),
    ] {
        let res = s
            .post("/v1/completions", Some("roomy-key"), &body.to_string())
            .await;
        assert_eq!(res.status(), 400, "{body}");
        let error: Value = res.json().await.unwrap();
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("100000"),
            "{error}"
        );
    }
}
