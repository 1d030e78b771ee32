//! `PATCH /admin/keys/ID/usage` of the gateway with counts at and
//! past the edge of UpdateUsage's range (2^53), on the memory store and on a
//! real `redis-server`: the same status and body from both, a 400 with a
//! clear message for a count out of range, never a 503 that blames the store.
//! And `GET /admin/usage` for a key on another plan than the one asked and
//! for a range after today, and `PATCH /admin/keys/ID` of a plan and
//! `enabled` together.

use serde_json::{Value, json};
use tollgate::store::Store;
use tollgate::{ManualClock, MemoryStore, RedisStore};

use crate::support::at;
use crate::support::redis::{RedisServer, require_redis};

const CONFIG: &str = r#"
[[plans]]
name = "tiny"
quota = { limit = 3, period = "DAY" }

[[plans]]
name = "big"
quota = { limit = 300, period = "DAY" }

[[keys]]
id = "t-1"
value = "tiny-key-1"
plan = "tiny"

[admin]
key = "admin-secret"
"#;

/// Serves the gateway on `store` until the returned sender drops.
async fn serve<S: Store>(store: S) -> (String, tokio::sync::oneshot::Sender<()>) {
    crate::serve_config(CONFIG, store).await
}

/// Status and JSON body of `PATCH /admin/keys/t-1/usage` with `body`.
async fn patch(base: &str, body: &str) -> (u16, Value) {
    let res = reqwest::Client::new()
        .patch(format!("{base}/admin/keys/t-1/usage"))
        .header("x-admin-key", "admin-secret")
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// What the server answers each count, in order.
async fn answers<S: Store>(store: S) -> Vec<(u16, Value)> {
    let (base, _stop) = serve(store).await;
    let mut out = Vec::new();
    for n in [
        "18446744073709551615", // u64::MAX
        "9007199254740993",     // 2^53 + 1
        "9007199254740991",     // 2^53 - 1
        "9007199254740992",     // 2^53
        "3",                    // the limit
        "18446744073709551616", // not a u64
        "-1",
    ] {
        out.push(patch(&base, &format!(r#"{{"remaining": {n}}}"#)).await);
    }
    out
}

fn expected() -> Vec<(u16, Value)> {
    let out_of_range = |n: &str| {
        json!({"message": format!(
            "remaining {n} is out of range: at most 9007199254740992 (2^53, the largest quota limit)"
        )})
    };
    let ok = |n: u64| json!({"id": "t-1", "remaining": n});
    vec![
        (400, out_of_range("18446744073709551615")),
        (400, out_of_range("9007199254740993")),
        (200, ok((1 << 53) - 1)),
        (200, ok(1 << 53)),
        (200, ok(3)),
    ]
}

fn check(answers: &[(u16, Value)]) {
    assert_eq!(answers[..5], expected()[..]);
    // Not a count at all: refused by the route before Admin is asked, in
    // the same style as Admin's refusals.
    for (status, body) in &answers[5..] {
        assert_eq!(*status, 400, "{body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.starts_with("invalid request body"), "{body}");
    }
}

#[tokio::test]
async fn update_usage_out_of_range_is_a_400_on_the_memory_store() {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 36_000));
    let store = MemoryStore::builder().clock(clock).build().unwrap();
    check(&answers(store).await);
}

#[tokio::test]
async fn update_usage_out_of_range_is_the_same_400_on_the_redis_store() {
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start();
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 36_000));
    let store = RedisStore::builder(redis.url())
        .clock(clock.clone())
        .build()
        .await
        .unwrap();
    let on_redis = answers(store).await;
    check(&on_redis);
    let memory = MemoryStore::builder().clock(clock).build().unwrap();
    assert_eq!(on_redis, answers(memory).await);
}

/// `GET /admin/usage?plan=big&key=t-1` of a key on plan `tiny`: a 404 that
/// names the plan the key is on, as AWS GetUsage reports only the keys of
/// the plan asked, never a 200 whose empty `items` reads as "no such usage"
/// (or, to a client that looks the key up in it, as a missing key).
#[tokio::test]
async fn usage_of_a_key_on_another_plan_says_which_plan_it_is_on() {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 36_000));
    let store = MemoryStore::builder().clock(clock).build().unwrap();
    let (base, _stop) = serve(store).await;
    let get = |query: &'static str| {
        let base = base.clone();
        async move {
            let res = reqwest::Client::new()
                .get(format!("{base}/admin/usage?{query}"))
                .header("x-admin-key", "admin-secret")
                .send()
                .await
                .unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = get("plan=big&start=2024-05-06&end=2024-05-06&key=t-1").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(
        body,
        json!({"message": "api key `t-1` is on plan `tiny`, not `big`"})
    );
    // On its own plan, and the whole plan without `key`, as before.
    let (status, body) = get("plan=tiny&start=2024-05-06&end=2024-05-06&key=t-1").await;
    assert_eq!((status, &body["items"]), (200, &json!({"t-1": [[0, 3]]})));
    let (status, body) = get("plan=big&start=2024-05-06&end=2024-05-06").await;
    assert_eq!((status, &body["items"]), (200, &json!({})));
}

/// Status and JSON body of `GET {path}` with the admin key.
async fn get(base: &str, path: &str) -> (u16, Value) {
    let res = reqwest::Client::new()
        .get(format!("{base}{path}"))
        .header("x-admin-key", "admin-secret")
        .send()
        .await
        .unwrap();
    (
        res.status().as_u16(),
        res.json().await.unwrap_or(Value::Null),
    )
}

/// What `GET /admin/usage` answers ranges around today (2024-05-06 by the
/// store's clock), one key's and the plan's.
async fn ranges<S: Store>(store: S) -> Vec<(u16, Value)> {
    let (base, _stop) = serve(store).await;
    let mut out = Vec::new();
    for query in [
        "plan=tiny&start=2024-05-07&end=2024-05-07&key=t-1",
        "plan=tiny&start=2024-05-07&end=2024-06-01",
        "plan=tiny&start=2024-05-06&end=2024-06-01",
        "plan=tiny&start=2024-05-06&end=2024-05-05",
    ] {
        out.push(get(&base, &format!("/admin/usage?{query}")).await);
    }
    out
}

/// A range that starts after today (UTC) is a 400, as one whose end comes
/// before its start is, never a 200 whose `end` (cut at today) comes before
/// its `start`: a client counting the days from `start` to `end` would
/// count a negative number. The same on the memory store and on a real
/// `redis-server`.
#[tokio::test]
async fn usage_of_a_range_after_today_is_a_400_on_both_stores() {
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 36_000));
    let memory = ranges(MemoryStore::builder().clock(clock.clone()).build().unwrap()).await;
    let after_today = json!({"message": "bad date range: start is after today (UTC)"});
    assert_eq!(memory[0], (400, after_today.clone()));
    assert_eq!(memory[1], (400, after_today));
    assert_eq!(
        memory[2],
        (
            200,
            json!({"plan": "tiny", "start": "2024-05-06", "end": "2024-05-06",
                   "items": {"t-1": [[0, 3]]}})
        )
    );
    assert_eq!(
        memory[3],
        (
            400,
            json!({"message": "bad date range: start is after end"})
        )
    );
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start();
    let store = RedisStore::builder(redis.url())
        .clock(clock)
        .build()
        .await
        .unwrap();
    assert_eq!(ranges(store).await, memory);
}

/// `PATCH /admin/keys/ID` with a plan and `enabled` together is one change
/// of the key, as a PATCH is applied whole: on the Redis store's shared
/// registry it is one entry of the log, so no instance ever serves the key
/// with one field changed and not the other (here, enabled on `big`, which
/// the body asked to disable). A body whose plan is unknown changes nothing.
#[tokio::test]
async fn patch_of_plan_and_enabled_is_one_change() {
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start();
    let store = RedisStore::builder(redis.url()).build().await.unwrap();
    let (base, _stop) = serve(store).await;
    let log_len = || {
        crate::support::redis::command(redis.addr(), &["XLEN", "{tollgate:registry}:log"])
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let patch = |body: Value| {
        let base = base.clone();
        async move {
            let res = reqwest::Client::new()
                .patch(format!("{base}/admin/keys/t-1"))
                .header("x-admin-key", "admin-secret")
                .json(&body)
                .send()
                .await
                .unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    let before = log_len();
    let (status, body) = patch(json!({"plan": "big", "enabled": false})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["plan"], &body["enabled"]),
        (&json!("big"), &json!(false))
    );
    assert_eq!(log_len(), before + 1, "one entry for both fields");
    let (status, _) = patch(json!({"plan": "nope", "enabled": true})).await;
    assert_eq!(status, 409);
    assert_eq!(log_len(), before + 1, "nothing written");
    let (_, body) = get(&base, "/admin/keys/t-1").await;
    assert_eq!(
        (&body["plan"], &body["enabled"]),
        (&json!("big"), &json!(false))
    );
}

/// `GET /admin/usage` in pages, as AWS GetUsage's `limit` and `position`:
/// a client that asks for no page gets the whole report in the shape it
/// always had (no `position`); one that asks gets at most `limit` keys and
/// a `position` to pass back while keys remain, on both stores alike. A
/// `limit` that is not a whole number from 1 to 500 (AWS's largest page)
/// is a 400 that says so.
#[tokio::test]
async fn usage_in_pages_on_both_stores() {
    const MANY: &str = r#"
[[plans]]
name = "tiny"
quota = { limit = 3, period = "DAY" }

[[keys]]
id = "a"
value = "key-a"
plan = "tiny"

[[keys]]
id = "b"
value = "key-b"
plan = "tiny"

[[keys]]
id = "c"
value = "key-c"
plan = "tiny"

[admin]
key = "admin-secret"
"#;
    async fn pages<S: Store>(store: S) -> Vec<(u16, Value)> {
        let (base, _stop) = crate::serve_config(MANY, store).await;
        let range = "plan=tiny&start=2024-05-06&end=2024-05-06";
        let mut out = Vec::new();
        for query in [
            String::new(),
            "&limit=2".into(),
            "&limit=2&position=b".into(),
            "&position=a".into(),
            "&limit=3".into(),
            "&limit=2&key=b".into(),
            "&limit=0".into(),
            "&limit=501".into(),
            "&limit=two".into(),
        ] {
            out.push(get(&base, &format!("/admin/usage?{range}{query}")).await);
        }
        out
    }
    let clock = ManualClock::new();
    clock.set_wall(at(2024, 5, 6, 36_000));
    let memory = pages(MemoryStore::builder().clock(clock.clone()).build().unwrap()).await;
    let report = |items: Value| json!({"plan": "tiny", "start": "2024-05-06", "end": "2024-05-06", "items": items});
    let day = json!([[0, 3]]);
    let mut first = report(json!({"a": day, "b": day}));
    first["position"] = json!("b");
    let bad_limit = json!({"message": "limit must be a whole number from 1 to 500"});
    assert_eq!(
        memory,
        vec![
            (200, report(json!({"a": day, "b": day, "c": day}))),
            (200, first),
            (200, report(json!({"c": day}))),
            (200, report(json!({"b": day, "c": day}))),
            (200, report(json!({"a": day, "b": day, "c": day}))),
            (200, report(json!({"b": day}))),
            (400, bad_limit.clone()),
            (400, bad_limit.clone()),
            (400, bad_limit),
        ]
    );
    if !require_redis() {
        return;
    }
    let redis = RedisServer::start();
    let store = RedisStore::builder(redis.url())
        .clock(clock)
        .build()
        .await
        .unwrap();
    assert_eq!(pages(store).await, memory);
}
