//! Key administration through the gateway's admin routes on the
//! memory store: a 100,000-key batch import, a batch with one bad entry
//! (nothing imported, the entry named), removal while a request of the key
//! is streaming (its concurrency place still comes back), and the errors.

use std::time::Duration;

use serde_json::{Value, json};
use tollgate::MemoryStore;

const CONFIG: &str = r#"
[[plans]]
name = "basic"
throttle = { rate = 1000.0, burst = 1000 }
concurrency = 1

[[plans]]
name = "gold"
throttle = { rate = 1000.0, burst = 1000 }

[[keys]]
id = "static-1"
value = "static-key-1"
plan = "basic"

[admin]
key = "admin-secret"
"#;

async fn serve() -> (String, tokio::sync::oneshot::Sender<()>) {
    crate::serve_config(CONFIG, MemoryStore::new()).await
}

async fn admin(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, url)
        .header("x-admin-key", "admin-secret");
    if let Some(body) = body {
        req = req.json(&body);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// Status of a completion with `key`.
async fn complete(base: &str, key: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .header("x-api-key", key)
        .json(&json!({"model": "m", "prompt": "hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn batch(range: std::ops::Range<usize>, plan: &str) -> Value {
    Value::Array(
        range
            .map(|i| json!({"id": format!("b-{i}"), "value": format!("batch-key-{i:06}"), "plan": plan}))
            .collect(),
    )
}

#[tokio::test]
async fn a_hundred_thousand_keys_import_in_one_call_or_not_at_all() {
    let (base, _stop) = serve().await;
    let keys = format!("{base}/admin/keys");

    // One bad entry (a value already taken, near the end): nothing imported.
    let mut bad = batch(0..100_000, "gold");
    bad[99_000]["value"] = json!("static-key-1");
    let (status, body) = admin(reqwest::Method::POST, keys.clone(), Some(bad)).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["index"], 99_000);
    assert_eq!(body["id"], "b-99000");
    assert!(
        !body.to_string().contains("static-key-1"),
        "no value in the error: {body}"
    );
    assert_eq!(complete(&base, "batch-key-000000").await, 403);

    // An unknown plan is named as well.
    let mut lost = batch(0..10, "gold");
    lost[3]["plan"] = json!("platinum");
    let (status, body) = admin(reqwest::Method::POST, keys.clone(), Some(lost)).await;
    assert_eq!((status, body["index"].clone()), (409, json!(3)), "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("platinum"),
        "{body}"
    );

    // A duplicate within the batch.
    let mut twice = batch(0..10, "gold");
    twice[7]["id"] = json!("b-2");
    let (status, body) = admin(reqwest::Method::POST, keys.clone(), Some(twice)).await;
    assert_eq!((status, body["index"].clone()), (409, json!(7)), "{body}");

    // The whole batch.
    let started = std::time::Instant::now();
    let (status, body) = admin(
        reqwest::Method::POST,
        keys.clone(),
        Some(batch(0..100_000, "gold")),
    )
    .await;
    assert_eq!((status, body), (201, json!({"imported": 100_000})));
    eprintln!("100,000 keys imported in {:?}", started.elapsed());
    for i in [0, 1, 50_000, 99_999] {
        assert_eq!(complete(&base, &format!("batch-key-{i:06}")).await, 200);
    }
    let (status, key) = admin(
        reqwest::Method::GET,
        format!("{base}/admin/keys/b-77777"),
        None,
    )
    .await;
    assert_eq!(
        (status, key),
        (
            200,
            json!({"id": "b-77777", "plan": "gold", "enabled": true, "account": null})
        )
    );
}

#[tokio::test]
async fn a_removed_key_is_refused_and_its_streaming_request_still_gives_its_place_back() {
    let (base, _stop) = serve().await;
    let keys = format!("{base}/admin/keys");
    let new = json!({"id": "temp", "value": "temp-key-value", "plan": "basic"});
    let (status, _) = admin(reqwest::Method::POST, keys.clone(), Some(new.clone())).await;
    assert_eq!(status, 201);

    // A streamed completion holds the key's one concurrency place.
    let stream = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .header("x-api-key", "temp-key-value")
        .json(&json!({"model": "m", "prompt": "hi", "max_tokens": 20, "stream": true, "mock_token_ms": 20}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(
        complete(&base, "temp-key-value").await,
        429,
        "the place is taken"
    );

    let (status, _) = admin(reqwest::Method::DELETE, format!("{keys}/temp"), None).await;
    assert_eq!(status, 204);
    assert_eq!(complete(&base, "temp-key-value").await, 403);
    let (status, _) = admin(reqwest::Method::DELETE, format!("{keys}/temp"), None).await;
    assert_eq!(status, 404, "already removed");

    // The stream ends after the key is gone; its place comes back, so the
    // key added again (same id, same counters) is let in at once.
    let body = tokio::time::timeout(Duration::from_secs(10), stream.text())
        .await
        .unwrap()
        .unwrap();
    assert!(body.contains("[DONE]") || body.contains("usage"), "{body}");
    let (status, _) = admin(reqwest::Method::POST, keys.clone(), Some(new)).await;
    assert_eq!(status, 201);
    assert_eq!(complete(&base, "temp-key-value").await, 200);

    // Errors: unknown key, duplicate id, duplicate value.
    let (status, _) = admin(reqwest::Method::DELETE, format!("{keys}/nobody"), None).await;
    assert_eq!(status, 404);
    let dup_id = json!({"id": "temp", "value": "other-value", "plan": "basic"});
    assert_eq!(
        admin(reqwest::Method::POST, keys.clone(), Some(dup_id))
            .await
            .0,
        409
    );
    let dup_value = json!({"id": "other", "value": "static-key-1", "plan": "basic"});
    assert_eq!(
        admin(reqwest::Method::POST, keys.clone(), Some(dup_value))
            .await
            .0,
        409
    );
}
