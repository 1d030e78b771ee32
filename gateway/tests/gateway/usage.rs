//! `GET /v1/usage`: a caller reads its own plan and limits, with the key it
//! sends to every route, without being charged; other keys' limits are not
//! shown, and a request without a usable key is refused as a route would.

use std::net::SocketAddr;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::Value;
use tollgate::config::Config;
use tollgate::{Date, ManualClock, MemoryStore};

use crate::support::process::ServerProcess;

const CONFIG: &str = r#"
[[plans]]
name = "free"
throttle = { rate = 1.0, burst = 5 }
quota = { limit = 10, period = "DAY" }
tokens = { per_minute = 1000 }

[[plans]]
name = "pro"
throttle = { rate = 10.0, burst = 50 }

[[keys]]
id = "free-1"
value = "free-secret"
plan = "free"

[[keys]]
id = "pro-1"
value = "pro-secret"
plan = "pro"

[response]
style = "openai"
"#;

const BODY: &str = r#"{"model":"m","prompt":"abcdefgh","max_tokens":10}"#;

async fn start() -> (String, tokio::sync::oneshot::Sender<()>) {
    let clock = ManualClock::new();
    let days = Date::new(2024, 5, 6).unwrap().days() as u64;
    clock.set_wall(UNIX_EPOCH + Duration::from_secs(days * 86_400 + 10 * 3_600));
    let store = MemoryStore::builder().clock(clock).build().unwrap();
    let app = tollgate_gateway::app(&Config::from_toml(CONFIG).unwrap(), store).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tollgate_gateway::serve(listener, app, async {
        let _ = rx.await;
    }));
    (format!("http://{addr}"), tx)
}

async fn usage(base: &str, auth: Option<(&str, &str)>) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(format!("{base}/v1/usage"));
    if let Some((name, value)) = auth {
        req = req.header(name, value);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap())
}

/// (remaining, limit) of the limit named `name` in a usage answer.
fn of(body: &Value, name: &str) -> (u64, u64) {
    let l = body["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {body}"));
    (
        l["remaining"].as_u64().unwrap(),
        l["limit"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn a_caller_reads_its_own_limits_without_being_charged() {
    let (base, _stop) = start().await;
    let bearer = ("authorization", "Bearer free-secret");
    let (status, fresh) = usage(&base, Some(bearer)).await;
    assert_eq!(status, 200, "{fresh}");
    assert_eq!(fresh["object"], "usage");
    assert_eq!(fresh["plan"], "free");
    assert_eq!(of(&fresh, "throttle"), (5, 5));
    assert_eq!(of(&fresh, "quota"), (10, 10));
    assert_eq!(of(&fresh, "tokens-minute"), (1000, 1000));
    let quota = fresh["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "quota")
        .unwrap();
    assert_eq!(quota["family"], "requests");
    assert_eq!(quota["window_secs"], 86_400);
    assert_eq!(quota["reset_ms"], 14 * 3_600 * 1000);
    assert!(fresh["refused"].is_null());
    // Reading is free, however often.
    for _ in 0..8 {
        let (_, again) = usage(&base, Some(("x-api-key", "free-secret"))).await;
        assert_eq!(of(&again, "throttle"), (5, 5));
        assert_eq!(of(&again, "quota"), (10, 10));
    }
    // A completion of 2 prompt tokens + 10 is charged; usage shows it.
    let res = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .header("authorization", "Bearer free-secret")
        .header("content-type", "application/json")
        .body(BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let _ = res.bytes().await.unwrap();
    let (_, used) = usage(&base, Some(bearer)).await;
    assert_eq!(of(&used, "throttle"), (4, 5));
    assert_eq!(of(&used, "quota"), (9, 10));
    let (tokens_left, _) = of(&used, "tokens-minute");
    assert!(tokens_left < 1000, "{used}");
    assert_eq!(used["limits"].as_array().unwrap()[0]["name"], "throttle");
    // Another key sees its own plan only.
    let (_, pro) = usage(&base, Some(("authorization", "Bearer pro-secret"))).await;
    assert_eq!(pro["plan"], "pro");
    assert_eq!(of(&pro, "throttle"), (50, 50));
    assert!(
        pro["limits"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["name"] != "quota"),
        "{pro}"
    );
}

#[tokio::test]
async fn a_request_without_a_usable_key_is_refused_as_a_route_would() {
    let (base, _stop) = start().await;
    for auth in [
        None,
        Some(("authorization", "Bearer nobody")),
        Some(("x-api-key", "nobody")),
    ] {
        let (status, body) = usage(&base, auth).await;
        assert_eq!(status, 401, "{auth:?}: {body}");
        assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    }
    // Two different keys at once.
    let res = reqwest::Client::new()
        .get(format!("{base}/v1/usage"))
        .header("authorization", "Bearer free-secret")
        .header("x-api-key", "pro-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
}

#[tokio::test]
async fn a_refusal_is_worded_as_the_429_would_word_it() {
    let (base, _stop) = start().await;
    let bearer = ("authorization", "Bearer free-secret");
    let complete = |body: &'static str| {
        reqwest::Client::new()
            .post(format!("{base}/v1/completions"))
            .header("authorization", "Bearer free-secret")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // Estimated at 12 tokens, settled at 2 + 1500: the minute's budget of
    // 1000 is in debt, and every request waits until it is paid back.
    let res = complete(
        r#"{"model":"m","prompt":"abcdefgh","max_tokens":10,"mock_completion_tokens":1500,"mock_token_ms":0}"#,
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    let _ = res.bytes().await.unwrap();
    // The settlement lands when the server sees the body end.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let refused = loop {
        let (status, body) = usage(&base, Some(bearer)).await;
        assert_eq!(status, 200, "{body}");
        if !body["refused"].is_null() || std::time::Instant::now() > deadline {
            break body["refused"].clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(refused["limit"], "tokens-minute", "{refused}");
    let res = complete(BODY).await.unwrap();
    assert_eq!(res.status(), 429);
    let denied: Value = res.json().await.unwrap();
    // The config's style is openai: OpenAI's wording, not AWS's
    // "Too Many Requests".
    assert_eq!(
        refused["message"], denied["error"]["message"],
        "{refused} {denied}"
    );
    assert_eq!(
        refused["message"],
        "Rate limit reached for tokens (tokens-minute)."
    );
}

#[tokio::test]
async fn a_caller_without_a_key_limited_by_its_address_reads_its_own_limits() {
    // `[anonymous] mode = "ip"`: requests without a key are served under
    // the anonymous throttle, counted per client address; such a caller's
    // own plan is that throttle, as the inference routes apply it.
    let toml =
        format!("{CONFIG}\n[anonymous]\nmode = \"ip\"\nthrottle = {{ rate = 0.001, burst = 3 }}\n");
    let (base, _stop) = crate::serve_config(&toml, MemoryStore::new()).await;
    let (status, fresh) = usage(&base, None).await;
    assert_eq!(status, 200, "{fresh}");
    assert_eq!(fresh["plan"], "anonymous", "{fresh}");
    assert_eq!(of(&fresh, "throttle"), (3, 3));
    let res = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .body(BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (status, used) = usage(&base, None).await;
    assert_eq!(status, 200, "{used}");
    assert_eq!(of(&used, "throttle"), (2, 3), "{used}");
    // A key is still read as its own, and an unknown one still refused.
    let (_, free) = usage(&base, Some(("x-api-key", "free-secret"))).await;
    assert_eq!(free["plan"], "free");
    let (status, _) = usage(&base, Some(("x-api-key", "nobody"))).await;
    assert_eq!(status, 401);
}

/// `GET /v1/usage?model=NAME`: how the limits of a request for that model
/// stand for the caller's own key: the model's own entry, found as a
/// request for it finds it, or the `"*"` entry it falls under, named; read
/// without charging anything. Without `model`, the `"*"` entry is named.
#[tokio::test]
async fn a_caller_reads_a_models_limits_by_name() {
    let toml = r#"
[[plans]]
name = "llm"
throttle = { rate = 1.0, burst = 50 }
[plans.models]
"big-model" = { throttle = { rate = 0.001, burst = 2 }, tokens = { per_minute = 500 } }
"*" = { tokens = { per_minute = 4000 } }

[[plans]]
name = "plain"
throttle = { rate = 1.0, burst = 5 }

[[keys]]
id = "llm-1"
value = "llm-secret"
plan = "llm"

[[keys]]
id = "plain-1"
value = "plain-secret"
plan = "plain"

[response]
style = "openai"
"#;
    let (base, _stop) = crate::serve_config(toml, MemoryStore::new()).await;
    let bearer = ("authorization", "Bearer llm-secret");
    let read = |query: &'static str, auth: (&'static str, &'static str)| {
        let base = base.clone();
        async move {
            let res = reqwest::Client::new()
                .get(format!("{base}/v1/usage{query}"))
                .header(auth.0, auth.1)
                .send()
                .await
                .unwrap();
            let status = res.status().as_u16();
            (status, res.json::<Value>().await.unwrap())
        }
    };
    let (status, any) = read("", bearer).await;
    assert_eq!(status, 200, "{any}");
    assert_eq!(any["model"], "*", "{any}");
    assert_eq!(of(&any, "model-tokens-minute"), (4000, 4000));
    let named = |body: &Value, name: &str| {
        body["limits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap()["model"]
            .clone()
    };
    assert_eq!(named(&any, "model-tokens-minute"), "*");
    assert!(named(&any, "throttle").is_null());
    for query in [
        "?model=big-model",
        "?model=Big-Model",
        "?model=big-model%3Alatest",
        "?model=library%2Fbig-model",
    ] {
        let (status, big) = read(query, bearer).await;
        assert_eq!(status, 200, "{query}: {big}");
        assert_eq!(big["plan"], "llm");
        assert_eq!(big["model"], "big-model", "{query}: {big}");
        assert_eq!(of(&big, "throttle"), (50, 50));
        assert_eq!(of(&big, "model"), (2, 2));
        assert_eq!(of(&big, "model-tokens-minute"), (500, 500));
        assert_eq!(named(&big, "model"), "big-model");
    }
    let (_, other) = read("?model=small", bearer).await;
    assert_eq!(other["model"], "*", "{other}");
    // A request for the model is charged, reading is not.
    let res = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .header("authorization", "Bearer llm-secret")
        .header("content-type", "application/json")
        .body(r#"{"model":"big-model","prompt":"abcdefgh","max_tokens":10}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let _ = res.bytes().await.unwrap();
    for _ in 0..4 {
        let (_, big) = read("?model=big-model", bearer).await;
        assert_eq!(of(&big, "model"), (1, 2), "{big}");
        assert_eq!(of(&big, "throttle"), (49, 50), "{big}");
    }
    // Another plan has no model limits; another key is refused as ever.
    let (_, plain) = read("?model=big-model", ("x-api-key", "plain-secret")).await;
    assert_eq!(plain["plan"], "plain");
    assert!(plain["model"].is_null(), "{plain}");
    let (status, _) = read("?model=big-model", ("x-api-key", "nobody")).await;
    assert_eq!(status, 401);
    // No query shows another key's limits.
    let (_, own) = read("?key=plain-1&id=plain-1", bearer).await;
    assert_eq!(own["plan"], "llm", "{own}");
    // A model that is not one name is refused.
    for query in ["?model=", "?model=a&model=b"] {
        let (status, body) = read(query, bearer).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    }
}

/// The `tollgate_decisions_total` series of a key refused for `reason`, in
/// the Prometheus text `text`: (labels, count) of each.
fn refusals<'t>(text: &'t str, reason: &str) -> Vec<(&'t str, f64)> {
    let reason = format!(r#"reason="{reason}""#);
    text.lines()
        .filter(|l| l.starts_with("tollgate_decisions_total{") && l.contains(&reason))
        .filter_map(|l| {
            let (labels, n) = l.rsplit_once(' ')?;
            Some((labels, n.parse().ok()?))
        })
        .collect()
}

/// Reading `GET /v1/usage` is no decision, whatever key it is read with:
/// `GET /metrics` counts none for it, as for a usable key. A read with an
/// unknown or disabled key was counted as a refused request (under
/// `route=""`), while one without a key, or with a usable one, was not.
/// The gateway's binary, so that its metrics are its own.
#[tokio::test]
async fn reading_usage_with_a_refused_key_is_not_counted_as_a_decision() {
    let dir = std::env::temp_dir().join(format!("tollgate-usage-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.toml");
    let disabled =
        "\n[[keys]]\nid = \"off-1\"\nvalue = \"off-secret\"\nplan = \"free\"\nenabled = false\n";
    std::fs::write(&config, format!("{CONFIG}{disabled}")).unwrap();
    let server = ServerProcess::start(&["--config", config.to_str().unwrap()]);
    let client = reqwest::Client::new();
    for key in ["nobody", "off-secret", "free-secret"] {
        let res = client
            .get(server.url("/v1/usage"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        let want = if key == "free-secret" { 200 } else { 401 };
        assert_eq!(res.status(), want, "{key}");
    }
    let text = client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(refusals(&text, "unknown_key"), [], "{text}");
    assert_eq!(refusals(&text, "disabled_key"), [], "{text}");
    assert!(!text.contains("tollgate_decisions_total{"), "{text}");
    // A request to a limited route with the same keys is counted.
    for key in ["nobody", "off-secret"] {
        let res = client
            .get(server.url("/v1/models"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{key}");
    }
    let text = client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let route = r#"route="/v1/models""#;
    for reason in ["unknown_key", "disabled_key"] {
        let counted = refusals(&text, reason);
        assert_eq!(counted.len(), 1, "{reason}: {text}");
        assert!(counted[0].0.contains(route), "{reason}: {text}");
        assert_eq!(counted[0].1, 1.0, "{reason}: {text}");
    }
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A plan and a stage with method overrides, a model's `"*"` entry and an
/// account, for [`method_overrides_are_read_with_the_other_limits`].
const OVERRIDES: &str = r#"
[[plans]]
name = "free"
throttle = { rate = 0.01, burst = 50 }
quota = { limit = 100, period = "DAY" }
[plans.methods]
"/v1/chat/completions/POST" = { rate = 0.01, burst = 4 }
"/*/*" = { rate = 0.01, burst = 20 }
[plans.models]
"*" = { throttle = { rate = 0.01, burst = 30 } }

[[accounts]]
name = "acme"
throttle = { rate = 0.01, burst = 60 }

[[keys]]
id = "free-1"
value = "free-secret"
plan = "free"
account = "acme"

[stage]
throttle = { rate = 0.01, burst = 100 }
[stage.methods]
"/v1/chat/completions/POST" = { rate = 0.01, burst = 10 }

[response]
style = "openai"
"#;

/// The limits named `name` whose `method` is `method` in a usage answer.
fn overrides<'b>(body: &'b Value, name: &str, method: &str) -> Vec<&'b Value> {
    body["limits"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["name"] == name && l["method"] == method)
        .collect()
}

/// (remaining, limit) of the override named `name` of `method`.
fn override_of(body: &Value, name: &str, method: &str) -> (u64, u64) {
    let found = overrides(body, name, method);
    assert_eq!(found.len(), 1, "{name} {method}: {body}");
    let l = found[0];
    assert_eq!(l["family"], "requests", "{l}");
    assert!(l["window_secs"].as_u64().unwrap() > 0, "{l}");
    assert!(l["reset_ms"].is_u64(), "{l}");
    (
        l["remaining"].as_u64().unwrap(),
        l["limit"].as_u64().unwrap(),
    )
}

/// `GET /v1/usage` lists every method override of the caller's plan and
/// stage, each named as the rate-limit headers name it (`method`,
/// `stage-method`) with its methodPath as configured (`/*/*` as written),
/// beside the stage, account, plan and model limits; each shows what the
/// requests to its routes used.
async fn method_overrides_are_read_with_the_other_limits(store: impl tollgate::store::Store) {
    let app = tollgate_gateway::app(&Config::from_toml(OVERRIDES).unwrap(), store).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (_stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tollgate_gateway::serve(listener, app, async {
        let _ = rx.await;
    }));
    let bearer = ("authorization", "Bearer free-secret");
    let chat = "/v1/chat/completions/POST";
    let (status, fresh) = usage(&base, Some(bearer)).await;
    assert_eq!(status, 200, "{fresh}");
    assert_eq!(override_of(&fresh, "method", chat), (4, 4));
    assert_eq!(override_of(&fresh, "method", "/*/*"), (20, 20));
    assert_eq!(override_of(&fresh, "stage-method", chat), (10, 10));
    // Two chat completions (the chat override) and one completion (`/*/*`).
    let client = reqwest::Client::new();
    let chat_body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#;
    for (path, body) in [
        ("/v1/chat/completions", chat_body),
        ("/v1/chat/completions", chat_body),
        ("/v1/completions", BODY),
    ] {
        let res = client
            .post(format!("{base}{path}"))
            .header("authorization", "Bearer free-secret")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let _ = res.bytes().await.unwrap();
    }
    let (status, used) = usage(&base, Some(bearer)).await;
    assert_eq!(status, 200, "{used}");
    assert_eq!(override_of(&used, "method", chat), (2, 4));
    assert_eq!(override_of(&used, "method", "/*/*"), (19, 20));
    assert_eq!(override_of(&used, "stage-method", chat), (8, 10));
    // The other limits are still there, and no override is told twice.
    assert_eq!(of(&used, "stage"), (97, 100));
    assert_eq!(of(&used, "account"), (57, 60));
    assert_eq!(of(&used, "throttle"), (47, 50));
    assert_eq!(of(&used, "quota"), (97, 100));
    assert_eq!(of(&used, "model"), (27, 30));
    let named = |name: &str| {
        let limits = used["limits"].as_array().unwrap();
        limits.iter().filter(|l| l["name"] == name).count()
    };
    assert_eq!((named("method"), named("stage-method")), (2, 1), "{used}");
    // A limit that is no override has no `method`.
    let throttle = used["limits"].as_array().unwrap();
    let throttle = throttle.iter().find(|l| l["name"] == "throttle").unwrap();
    assert!(throttle.get("method").is_none(), "{throttle}");
    // Reading them charged nothing.
    let (_, again) = usage(&base, Some(bearer)).await;
    assert_eq!(override_of(&again, "method", chat), (2, 4));
    assert_eq!(override_of(&again, "stage-method", chat), (8, 10));
    // Past its chat override, a chat completion is refused by it; usage
    // shows the override empty.
    for _ in 0..2 {
        let res = client
            .post(format!("{base}/v1/chat/completions"))
            .header("authorization", "Bearer free-secret")
            .header("content-type", "application/json")
            .body(chat_body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let _ = res.bytes().await.unwrap();
    }
    let res = client
        .post(format!("{base}/v1/chat/completions"))
        .header("authorization", "Bearer free-secret")
        .header("content-type", "application/json")
        .body(chat_body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    let (_, empty) = usage(&base, Some(bearer)).await;
    assert_eq!(override_of(&empty, "method", chat), (0, 4));
    assert_eq!(override_of(&empty, "stage-method", chat), (6, 10));
    assert!(empty["refused"].is_null(), "{empty}");
}

#[tokio::test]
async fn method_overrides_are_read_on_the_memory_store() {
    let clock = ManualClock::new();
    clock.set_wall(crate::support::at(2024, 5, 6, 36_000));
    let store = MemoryStore::builder().clock(clock).build().unwrap();
    method_overrides_are_read_with_the_other_limits(store).await;
}

#[tokio::test]
async fn method_overrides_are_read_alike_on_the_redis_store() {
    if !crate::support::redis::require_redis() {
        return;
    }
    let redis = crate::support::redis::RedisServer::start();
    let store = tollgate::RedisStore::builder(redis.url())
        .build()
        .await
        .unwrap();
    method_overrides_are_read_with_the_other_limits(store).await;
}
