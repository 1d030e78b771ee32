//! The gateway's admin key check: `AdminKey::matches` accepts the
//! admin key and nothing else, and every admin route refuses a wrong key of
//! any shape with 403, served on a loopback port and driven by a real HTTP
//! client.
//!
//! That the check takes no time that depends on the admin key is argued from
//! the code (see `AdminKey` in `gateway/src/admin.rs`): a timing test would be flaky.

use std::net::SocketAddr;
use tollgate_gateway::AdminKey;

use reqwest::header::HeaderValue;
use serde_json::{Value, json};
use tollgate::MemoryStore;
use tollgate::config::Config;

const ADMIN: &str = "admin-secret";

/// Every kind of key that is not `ADMIN`, as bytes: empty, prefixes,
/// extensions, each single-bit change at each position, case changes,
/// repetitions, bytes outside ASCII and a very long one.
fn wrong_keys() -> Vec<Vec<u8>> {
    let key = ADMIN.as_bytes();
    let mut wrong: Vec<Vec<u8>> = vec![Vec::new()];
    // Every proper prefix and suffix, and the key with anything appended.
    for n in 1..key.len() {
        wrong.push(key[..n].to_vec());
        wrong.push(key[n..].to_vec());
    }
    for extra in [b"x".as_slice(), b"\0", b"admin-secret", b"\xff"] {
        wrong.push([key, extra].concat());
        wrong.push([extra, key].concat());
    }
    // Every single-bit change, at every position.
    for i in 0..key.len() {
        for bit in 0..8 {
            let mut k = key.to_vec();
            k[i] ^= 1 << bit;
            wrong.push(k);
        }
    }
    wrong.push(ADMIN.to_uppercase().into_bytes());
    wrong.push(key.iter().rev().copied().collect());
    wrong.push(vec![0; key.len()]);
    wrong.push(vec![0xff; key.len()]);
    wrong.push(key.repeat(1000));
    wrong.push(b"change-me".to_vec());
    wrong
}

#[test]
fn matches_the_admin_key_and_nothing_else() {
    let admin = AdminKey::new(ADMIN.as_bytes());
    assert!(admin.matches(ADMIN.as_bytes()));
    // Again: the check keeps no state.
    assert!(admin.matches(ADMIN.as_bytes()));
    for k in wrong_keys() {
        assert_ne!(k, ADMIN.as_bytes());
        assert!(!admin.matches(&k), "{:?}", String::from_utf8_lossy(&k));
    }

    // Keys that differ only in length or trailing zero bytes.
    let empty = AdminKey::new(b"");
    assert!(empty.matches(b""));
    assert!(!empty.matches(b"\0"));
    let zero = AdminKey::new(b"\0");
    assert!(!zero.matches(b""));
    assert!(!zero.matches(b"\0\0"));

    // Two checks of one key each under its own random key agree.
    let again = AdminKey::new(ADMIN.as_bytes());
    assert!(again.matches(ADMIN.as_bytes()));
    assert!(!again.matches(b"admin-secreT"));
    // The key is not shown.
    assert_eq!(format!("{admin:?}"), "AdminKey(..)");
}

const CONFIG: &str = r#"
[[plans]]
name = "tiny"
throttle = { rate = 100.0, burst = 100 }
quota = { limit = 3, period = "DAY" }

[[keys]]
id = "t-1"
value = "tiny-key-1"
plan = "tiny"

[admin]
key = "admin-secret"
"#;

async fn start() -> String {
    let config = Config::from_toml(CONFIG).unwrap();
    let app = tollgate_gateway::app(&config, MemoryStore::new()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(tollgate_gateway::serve(
        listener,
        app,
        std::future::pending(),
    ));
    format!("http://{addr}")
}

/// Every admin route, with a body that each would accept.
fn routes() -> [(reqwest::Method, String, &'static str); 5] {
    use reqwest::Method;
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let today = tollgate::Date::from_days((secs / 86_400) as i64);
    [
        (
            Method::GET,
            format!("/admin/usage?plan=tiny&start={today}&end={today}"),
            "",
        ),
        (
            Method::POST,
            "/admin/keys".into(),
            r#"{"id":"t-9","value":"new-key-value","plan":"tiny"}"#,
        ),
        (
            Method::PATCH,
            "/admin/keys/t-1".into(),
            r#"{"enabled":true}"#,
        ),
        (
            Method::PATCH,
            "/admin/keys/t-1/usage".into(),
            r#"{"remaining":1}"#,
        ),
        (Method::POST, "/admin/keys/t-1/reset".into(), ""),
    ]
}

async fn refused(res: reqwest::Response, what: String) {
    assert_eq!(res.status(), 403, "{what}");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body, json!({"message": "Forbidden"}), "{what}");
}

#[tokio::test]
async fn every_admin_route_refuses_a_wrong_key_of_every_shape() {
    let base = start().await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut sent = 0;
    for (method, path, body) in routes() {
        let request = || {
            client
                .request(method.clone(), format!("{base}{path}"))
                .header("content-type", "application/json")
                .body(body)
        };
        let refused = |res, what: String| refused(res, format!("{method} {path} with {what}"));
        for key in wrong_keys() {
            // Header values cannot hold control bytes: those shapes are
            // refused by the client, never sent.
            let Ok(value) = HeaderValue::from_bytes(&key) else {
                continue;
            };
            let shown = String::from_utf8_lossy(&key[..key.len().min(40)]).into_owned();
            let res = request().header("x-admin-key", value).send().await.unwrap();
            refused(res, format!("x-admin-key {shown:?}")).await;
            sent += 1;
        }
        // No key, or the right key anywhere but in `x-admin-key`.
        refused(request().send().await.unwrap(), "no key".into()).await;
        let res = request().bearer_auth(ADMIN).send().await.unwrap();
        refused(res, "the key as a bearer token".into()).await;
        let res = request().header("x-api-key", ADMIN).send().await.unwrap();
        refused(res, "the key in x-api-key".into()).await;
        let res = request()
            .header("x-admin-key-", ADMIN)
            .header("admin-key", ADMIN)
            .send()
            .await
            .unwrap();
        refused(res, "the key in look-alike headers".into()).await;
        // The key beside another `x-admin-key`, before or after it, or
        // twice: which one is meant is not told, as with a repeated API key.
        for pair in [("wrong-key", ADMIN), (ADMIN, "wrong-key"), (ADMIN, ADMIN)] {
            let res = request()
                .header("x-admin-key", pair.0)
                .header("x-admin-key", pair.1)
                .send()
                .await
                .unwrap();
            refused(res, format!("two x-admin-key headers {pair:?}")).await;
        }
        let sep = if path.contains('?') { '&' } else { '?' };
        let res = client
            .request(
                method.clone(),
                format!("{base}{path}{sep}x-admin-key={ADMIN}"),
            )
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        refused(res, "the key in the query".into()).await;
    }
    assert!(sent > 5 * 100, "{sent} wrong keys sent");

    // The right key is let through on every route.
    for (method, path, body) in routes() {
        let res = client
            .request(method.clone(), format!("{base}{path}"))
            .header("x-admin-key", ADMIN)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        assert!(
            matches!(status, 200 | 201),
            "{method} {path}: {status} {}",
            res.text().await.unwrap()
        );
    }
}
