//! The dashboard's routes on the memory store with a manual clock: the page
//! and its content security policy, the admin JSON it reads (guarded like
//! every admin route, exact counts after a known sequence of requests), keys
//! added with a generated value, and ids that look like markup.

use std::net::SocketAddr;

use reqwest::Method;
use serde_json::{Value, json};
use tollgate::config::Config;
use tollgate::{ManualClock, MemoryStore};

use crate::support::at;

pub(crate) const CONFIG: &str = r#"
[[plans]]
name = "free"
throttle = { rate = 0.001, burst = 3 }
quota = { limit = 1000, period = "DAY" }
tokens = { per_minute = 40000 }

[[plans]]
name = "pro"
throttle = { rate = 1000.0, burst = 1000 }
quota = { limit = 100000, period = "MONTH" }
concurrency = 4

[[accounts]]
name = "acme"
quota = { limit = 50000, period = "MONTH" }

[[keys]]
id = "free-1"
value = "free-key-1"
plan = "free"
account = "acme"

[[keys]]
id = "pro-1"
value = "pro-key-1"
plan = "pro"

[admin]
key = "admin-secret"
"#;

const ADMIN: &str = "admin-secret";

/// Serves the gateway at 10:00 UTC on 2026-12-06 until the sender drops.
async fn serve() -> (String, ManualClock, tokio::sync::oneshot::Sender<()>) {
    let clock = ManualClock::new();
    clock.set_wall(at(2026, 12, 6, 36_000));
    let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
    let config = Config::from_toml(CONFIG).unwrap();
    let app = tollgate_gateway::app(&config, store).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tollgate_gateway::serve(listener, app, async {
        let _ = rx.await;
    }));
    (format!("http://{addr}"), clock, tx)
}

async fn call(method: Method, url: String, key: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, url);
    if let Some(key) = key {
        req = req.header("x-admin-key", key);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn get(base: &str, path: &str) -> Value {
    let (status, body) = call(Method::GET, format!("{base}{path}"), Some(ADMIN), None).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

/// Status of a completion with `key`.
async fn complete(base: &str, key: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .header("authorization", format!("Bearer {key}"))
        .json(&json!({"model": "m", "prompt": "hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_with_a_strict_content_security_policy() {
    let (base, _clock, _stop) = serve().await;
    for (path, kind) in [
        ("/admin/ui", "text/html"),
        ("/admin/ui/app.js", "text/javascript"),
        ("/admin/ui/app.css", "text/css"),
    ] {
        let res = reqwest::get(format!("{base}{path}")).await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let h = res.headers().clone();
        assert!(
            h["content-type"].to_str().unwrap().starts_with(kind),
            "{path}"
        );
        let csp = h["content-security-policy"].to_str().unwrap();
        for part in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
        ] {
            assert!(csp.contains(part), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["referrer-policy"], "no-referrer");
        let body = res.text().await.unwrap();
        // The page carries no secret.
        assert!(!body.contains(ADMIN), "{path}");
        if path == "/admin/ui" {
            // No inline script or style, no handler attribute: every script
            // is a file of the gateway.
            assert_eq!(body.matches("<script").count(), 1);
            assert!(body.contains(r#"<script src="/admin/ui/app.js" defer></script>"#));
            assert!(!body.contains("<style"));
            assert!(!body.contains(" style="));
            assert!(!body.contains(" onclick") && !body.contains(" onload"));
            assert!(!body.contains("http://") && !body.contains("https://"));
            // No input has a name: a form sent before the script runs (CSP's
            // form-action 'none' stops it anyway) could not put the admin key
            // in a URL.
            for input in body.split("<input").skip(1) {
                let tag = &input[..input.find('>').unwrap()];
                assert!(!tag.contains(" name="), "<input{tag}>");
            }
            assert!(csp_has_form_action_none(&h));
        }
        if path == "/admin/ui/app.js" {
            assert!(!body.contains("innerHTML") && !body.contains("outerHTML"));
            assert!(!body.contains("localStorage") && !body.contains("eval("));
            assert!(body.contains("sessionStorage"));
        }
    }
}

fn csp_has_form_action_none(h: &reqwest::header::HeaderMap) -> bool {
    h["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("form-action 'none'")
}

#[tokio::test]
async fn the_dashboards_data_needs_the_admin_key() {
    let (base, _clock, _stop) = serve().await;
    let paths = [
        "/admin/plans",
        "/admin/accounts",
        "/admin/keys",
        "/admin/keys?q=free",
        "/admin/traffic",
        "/admin/accounts/acme/usage?start=2026-12-01&end=2026-12-06",
    ];
    for path in paths {
        for key in [None, Some("wrong-key"), Some("admin-secre"), Some("")] {
            let (status, body) = call(Method::GET, format!("{base}{path}"), key, None).await;
            assert_eq!(
                (status, body),
                (403, json!({"message": "Forbidden"})),
                "{path} {key:?}"
            );
        }
        get(&base, path).await;
    }
    let (status, _) = call(
        Method::POST,
        format!("{base}/admin/keys"),
        None,
        Some(json!({"id": "n", "plan": "free"})),
    )
    .await;
    assert_eq!(status, 403);
    assert!(
        get(&base, "/admin/keys").await["keys"]
            .as_array()
            .unwrap()
            .len()
            == 2
    );
}

#[tokio::test]
async fn plans_accounts_and_keys_show_their_limits_and_todays_usage() {
    let (base, _clock, _stop) = serve().await;
    // free-1: a burst of 3, then 2 throttled; pro-1: 5 allowed; one unknown key.
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(complete(&base, "free-key-1").await);
    }
    assert_eq!(seen, [200, 200, 200, 429, 429]);
    for _ in 0..5 {
        assert_eq!(complete(&base, "pro-key-1").await, 200);
    }
    assert!(complete(&base, "no-such-key").await >= 400);

    let plans = get(&base, "/admin/plans").await;
    assert_eq!(plans["now"], "2026-12-06T10:00:00Z");
    assert_eq!(
        plans["plans"][0],
        json!({
            "name": "free",
            "throttle": {"rate": 0.001, "burst": 3},
            "quota": {"limit": 1000, "period": "DAY", "next_reset": "2026-12-07T00:00:00Z"},
            "tokens": {"per_minute": 40000, "per_day": null, "per_month": null},
            "concurrency": null,
            "models": [],
            "shadow": false,
            "keys": 1,
        })
    );
    assert_eq!(
        plans["plans"][1]["quota"]["next_reset"],
        "2027-01-01T00:00:00Z"
    );
    assert_eq!(plans["plans"][1]["concurrency"], 4);

    let accounts = get(&base, "/admin/accounts").await;
    assert_eq!(
        accounts["accounts"],
        json!([{
            "name": "acme",
            "throttle": null,
            "quota": {"limit": 50000, "period": "MONTH", "next_reset": "2027-01-01T00:00:00Z"},
            "tokens": null,
            "keys": 1,
            "today": {"used": 3, "remaining": 49997},
        }])
    );

    let mut keys = get(&base, "/admin/keys").await;
    assert_eq!(keys["date"], "2026-12-06");
    // What remains of free-1's budget of tokens a minute: 3 requests of 3
    // tokens each (1 of prompt, 2 generated), on a clock that stands still.
    let free_tokens = keys["keys"][0]["tokens"].take();
    assert_eq!(free_tokens[0]["name"], "tokens-minute");
    assert_eq!(free_tokens[0]["limit"], 40000);
    assert_eq!(free_tokens[0]["remaining"], 40000 - 9);
    assert!(free_tokens[0]["reset_ms"].as_u64().unwrap() > 0);
    assert_eq!(free_tokens.as_array().unwrap().len(), 1);
    assert_eq!(keys["keys"][1]["tokens"].take(), json!([]));
    assert_eq!(
        keys["keys"],
        json!([
            {"id": "free-1", "plan": "free", "enabled": true, "account": "acme", "tokens": null,
             "quota": {"limit": 1000, "period": "DAY", "used": 3, "remaining": 997,
                       "next_reset": "2026-12-07T00:00:00Z"}},
            {"id": "pro-1", "plan": "pro", "enabled": true, "account": null, "tokens": null,
             "quota": {"limit": 100000, "period": "MONTH", "used": 5, "remaining": 99995,
                       "next_reset": "2027-01-01T00:00:00Z"}},
        ])
    );
    // Never a value.
    assert!(!keys.to_string().contains("key-1"));
    let filtered = get(&base, "/admin/keys?q=ACME").await;
    assert_eq!(filtered["keys"].as_array().unwrap().len(), 1);
    assert_eq!(filtered["keys"][0]["id"], "free-1");

    let usage = get(
        &base,
        "/admin/accounts/acme/usage?start=2026-12-05&end=2026-12-06",
    )
    .await;
    assert_eq!(
        usage,
        json!({"account": "acme", "start": "2026-12-05", "end": "2026-12-06",
               "items": {"acme": [[0, 50000], [3, 49997]]}})
    );
    let (status, _) = call(
        Method::GET,
        format!("{base}/admin/accounts/acme/usage?start=x&end=2026-12-06"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = call(
        Method::GET,
        format!("{base}/admin/accounts/nobody/usage?start=2026-12-06&end=2026-12-06"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn traffic_counts_each_decision_by_outcome_and_names_the_keys_refused_most() {
    let (base, _clock, _stop) = serve().await;
    for _ in 0..5 {
        complete(&base, "free-key-1").await;
    }
    for _ in 0..4 {
        complete(&base, "pro-key-1").await;
    }
    complete(&base, "no-such-key").await;
    // Reading limits decides nothing: neither the caller's own peek nor the
    // admin's list of keys with their token budgets is counted.
    get(&base, "/admin/keys").await;
    let own = reqwest::Client::new()
        .get(format!("{base}/v1/usage"))
        .header("authorization", "Bearer pro-key-1")
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
    let t = get(&base, "/admin/traffic?seconds=60").await;
    assert_eq!(t["seconds"], 60);
    assert_eq!(t["end"], "2026-12-06T10:00:00Z");
    assert_eq!(
        t["outcomes"],
        json!([
            "allowed",
            "throttled",
            "quota",
            "tokens",
            "concurrency",
            "store_failure",
            "key"
        ])
    );
    assert_eq!(
        t["totals"],
        json!({"allowed": 7, "throttled": 2, "quota": 0, "tokens": 0, "concurrency": 0,
               "store_failure": 0, "key": 1})
    );
    // The manual clock stands still: everything fell in the last second.
    let allowed = t["series"]["allowed"].as_array().unwrap();
    assert_eq!(allowed.len(), 60);
    assert_eq!(allowed[59], 7);
    assert_eq!(t["top_rejected"], json!([{"id": "free-1", "rejected": 2}]));
    let t = get(&base, "/admin/traffic?seconds=100000&top=0").await;
    assert_eq!(t["seconds"], 600);
    assert_eq!(t["top_rejected"], json!([]));
}

#[tokio::test]
async fn a_key_added_without_a_value_gets_a_random_one_shown_once() {
    let (base, _clock, _stop) = serve().await;
    let res = reqwest::Client::new()
        .post(format!("{base}/admin/keys"))
        .header("x-admin-key", ADMIN)
        .json(&json!({"id": "gen-1", "plan": "free", "account": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let created: Value = res.json().await.unwrap();
    let value = created["value"].as_str().unwrap().to_owned();
    assert_eq!(value.len(), 67, "{value}");
    assert!(value.starts_with("tg-"));
    assert!(value[3..].bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        created,
        json!({"id": "gen-1", "plan": "free", "enabled": true, "account": "acme", "value": value})
    );
    // It works, and is never shown again.
    assert_eq!(complete(&base, &value).await, 200);
    let shown = get(&base, "/admin/keys/gen-1").await;
    assert_eq!(
        shown,
        json!({"id": "gen-1", "plan": "free", "enabled": true, "account": "acme"})
    );
    assert!(!get(&base, "/admin/keys").await.to_string().contains(&value));

    // Another gets another value.
    let (status, other) = call(
        Method::POST,
        format!("{base}/admin/keys"),
        Some(ADMIN),
        Some(json!({"id": "gen-2", "plan": "pro"})),
    )
    .await;
    assert_eq!(status, 201);
    assert_ne!(other["value"], created["value"]);
    // A given value is never echoed.
    let (status, given) = call(
        Method::POST,
        format!("{base}/admin/keys"),
        Some(ADMIN),
        Some(json!({"id": "given-1", "value": "given-value-1", "plan": "pro"})),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(given.get("value"), None);
    assert_eq!(complete(&base, "given-value-1").await, 200);
    // A batch must bring its values.
    let (status, body) = call(
        Method::POST,
        format!("{base}/admin/keys"),
        Some(ADMIN),
        Some(json!([{"id": "b-1", "value": "batch-value-1", "plan": "pro"}, {"id": "b-2", "plan": "pro"}])),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.to_string().contains("key 1 of the batch has no value"),
        "{body}"
    );
    assert_eq!(
        call(
            Method::GET,
            format!("{base}/admin/keys/b-1"),
            Some(ADMIN),
            None
        )
        .await
        .0,
        404
    );
}

#[tokio::test]
async fn ids_that_look_like_markup_are_refused_or_kept_as_plain_text() {
    let (base, _clock, _stop) = serve().await;
    // Spaces are not visible ASCII: refused (as the policy refuses it).
    let (status, body) = call(
        Method::POST,
        format!("{base}/admin/keys"),
        Some(ADMIN),
        Some(json!({"id": "x\"><img src=x onerror=alert(1)>", "plan": "free"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("visible ASCII"),
        "{body}"
    );
    assert_eq!(
        get(&base, "/admin/keys").await["keys"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // Without spaces it is a valid id, and the JSON holds exactly those characters.
    let id = "x\"><img/src=x/onerror=alert(1)>";
    let (status, created) = call(
        Method::POST,
        format!("{base}/admin/keys"),
        Some(ADMIN),
        Some(json!({"id": id, "plan": "free"})),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(created["id"], id);
    let keys = get(&base, "/admin/keys").await;
    assert!(
        keys["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["id"] == id)
    );
    // JSON, never HTML.
    let res = reqwest::Client::new()
        .get(format!("{base}/admin/keys"))
        .header("x-admin-key", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["content-type"], "application/json");
}

#[tokio::test]
async fn traffic_counts_an_accounts_or_a_models_token_budget_as_tokens() {
    const TOKENS: &str = r#"
[[plans]]
name = "free"
throttle = { rate = 1000.0, burst = 1000 }
[plans.models]
"big" = { tokens = { per_minute = 100 } }

[[accounts]]
name = "acme"
tokens = { per_minute = 50 }

[[keys]]
id = "team-1"
value = "team-key-1"
plan = "free"
account = "acme"

[[keys]]
id = "solo-1"
value = "solo-key-1"
plan = "free"

[admin]
key = "admin-secret"
"#;
    let (base, _stop) = crate::serve_config(TOKENS, MemoryStore::new()).await;
    // 31 tokens each: the account's 50 take one, the model's 100 three.
    let complete = |key: &'static str, model: &'static str| {
        let base = base.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{base}/v1/completions"))
                .header("authorization", format!("Bearer {key}"))
                .json(&json!({"model": model, "prompt": "hi", "max_tokens": 30}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(complete("team-key-1", "small").await, 200);
    assert_eq!(complete("team-key-1", "small").await, 429);
    for _ in 0..3 {
        assert_eq!(complete("solo-key-1", "big").await, 200);
    }
    assert_eq!(complete("solo-key-1", "big").await, 429);
    let t = get(&base, "/admin/traffic?seconds=60").await;
    assert_eq!(
        t["totals"],
        json!({"allowed": 4, "throttled": 0, "quota": 0, "tokens": 2, "concurrency": 0,
               "store_failure": 0, "key": 0}),
        "{t}"
    );
}
