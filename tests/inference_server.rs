//! The reference server, served on a loopback port and driven by a real HTTP
//! client, with the demo configuration and a manual clock.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/inference_server.rs"]
mod server;

use std::net::SocketAddr;
use std::time::Duration;

use tollgate::{ManualClock, MemoryStore, RateLimitLayer};

struct Running {
    base: String,
    clock: ManualClock,
    client: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start() -> Running {
    let clock = ManualClock::new();
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    let layer = RateLimitLayer::builder(server::demo_policy().unwrap())
        .store(store)
        .build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server::serve(listener, server::router(layer), async {
        let _ = rx.await;
    }));
    Running {
        base: format!("http://{addr}"),
        clock,
        client: reqwest::Client::new(),
        _stop: tx,
    }
}

impl Running {
    async fn complete(&self, key: Option<&str>, body: &str) -> reqwest::Response {
        let mut req = self
            .client
            .post(format!("{}/v1/completions", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        req.send().await.unwrap()
    }
}

const BODY: &str = r#"{"model":"m","prompt":"hello world!","max_tokens":3}"#;

#[tokio::test]
async fn demo_key_gets_a_burst_of_five_then_two_per_second() {
    let s = start().await;
    for remaining in (0..5).rev() {
        let res = s.complete(Some("demo-free-key"), BODY).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["ratelimit-policy"], "\"throttle\";q=5;w=3");
        let rl = res.headers()["ratelimit"].to_str().unwrap().to_owned();
        assert!(
            rl.starts_with(&format!("\"throttle\";r={remaining};")),
            "{rl}"
        );
        let v: serde_json::Value = res.json().await.unwrap();
        assert_eq!(v["usage"]["prompt_tokens"], 3);
        assert_eq!(v["usage"]["completion_tokens"], 3);
        assert_eq!(v["usage"]["total_tokens"], 6);
    }
    let res = s.complete(Some("demo-free-key"), BODY).await;
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(
        res.text().await.unwrap(),
        r#"{"message":"Too Many Requests"}"#
    );

    s.clock.advance(Duration::from_millis(500));
    assert_eq!(s.complete(Some("demo-free-key"), BODY).await.status(), 200);
    assert_eq!(s.complete(Some("demo-free-key"), BODY).await.status(), 429);
}

#[tokio::test]
async fn missing_and_unknown_keys_are_forbidden_and_health_is_never_limited() {
    let s = start().await;
    for key in [None, Some("not-a-key")] {
        let res = s.complete(key, BODY).await;
        assert_eq!(res.status(), 403);
        assert_eq!(res.text().await.unwrap(), r#"{"message":"Forbidden"}"#);
    }
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
}

#[tokio::test]
async fn malformed_body_is_a_json_400() {
    let s = start().await;
    let res = s.complete(Some("demo-free-key"), "{not json").await;
    assert_eq!(res.status(), 400);
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn chat_stream_sends_one_event_per_token_then_usage() {
    let s = start().await;
    let res = s
        .client
        .post(format!("{}/v1/chat/completions", s.base))
        .header("x-api-key", "demo-free-key")
        .body(r#"{"model":"m","messages":[{"role":"user","content":"abcdefgh"}],"max_tokens":4,"stream":true,"mock_token_ms":0}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let text = res.text().await.unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.len(), 5, "{text}");
    assert_eq!(events[4], "[DONE]");
    let last: serde_json::Value = serde_json::from_str(events[3]).unwrap();
    assert_eq!(last["usage"]["prompt_tokens"], 2);
    assert_eq!(last["usage"]["total_tokens"], 6);
}
