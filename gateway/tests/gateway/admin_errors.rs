//! Every error of the admin routes is JSON in the config's response style,
//! with the right status: the routes' own refusals, `Admin`'s errors, and
//! what axum's extractors reject (a path that is not UTF-8, a query that
//! does not parse, a body past the bound), which axum answers as plain text
//! unless the routes answer it themselves.

use reqwest::Method;
use serde_json::{Value, json};
use tollgate::MemoryStore;

const CONFIG: &str = r#"
[[plans]]
name = "tiny"
quota = { limit = 3, period = "DAY" }

[[keys]]
id = "t-1"
value = "tiny-key-1"
plan = "tiny"

[admin]
key = "admin-secret"
"#;

/// Serves the gateway with [`CONFIG`] in `style` until the returned sender
/// drops.
async fn serve(style: &str) -> (String, tokio::sync::oneshot::Sender<()>) {
    let toml = format!("{CONFIG}\n[response]\nstyle = \"{style}\"\n");
    crate::serve_config(&toml, MemoryStore::new()).await
}

/// A request that fails, and the status it fails with.
struct Case {
    method: Method,
    path: &'static str,
    key: Option<&'static str>,
    content_type: &'static str,
    body: String,
    status: u16,
}

fn case(method: Method, path: &'static str, body: &str, status: u16) -> Case {
    Case {
        method,
        path,
        key: Some("admin-secret"),
        content_type: "application/json",
        body: body.to_owned(),
        status,
    }
}

fn cases() -> Vec<Case> {
    vec![
        // Refused by axum's extractors.
        case(Method::GET, "/admin/keys/%ff", "", 400),
        case(Method::DELETE, "/admin/keys/%ff", "", 400),
        case(Method::GET, "/admin/traffic?seconds=-1", "", 400),
        case(Method::GET, "/admin/traffic?top=many", "", 400),
        case(Method::GET, "/admin/keys?q=a&q=b", "", 400),
        case(
            Method::GET,
            "/admin/accounts/%ff/usage?start=2024-05-06&end=2024-05-06",
            "",
            400,
        ),
        // A body past the bound of 2 MiB.
        case(
            Method::PATCH,
            "/admin/keys/t-1/usage",
            &format!(r#"{{"remaining":1,"pad":"{}"}}"#, "x".repeat(3 << 20)),
            413,
        ),
        // Refused by the routes.
        case(Method::GET, "/admin/usage?plan=tiny", "", 400),
        case(
            Method::GET,
            "/admin/usage?plan=tiny&start=2024-13-01&end=2024-05-06",
            "",
            400,
        ),
        case(
            Method::GET,
            "/admin/accounts/acme/usage?start=2024-05-06&end=May",
            "",
            400,
        ),
        case(Method::PATCH, "/admin/keys/t-1", r#"{"enabled":1}"#, 400),
        case(
            Method::POST,
            "/admin/keys",
            r#"[{"id":"b-1","plan":"tiny"}]"#,
            400,
        ),
        // Refused by `Admin`.
        case(Method::GET, "/admin/keys/nobody", "", 404),
        case(Method::POST, "/admin/keys/nobody/reset", "", 404),
        case(
            Method::GET,
            "/admin/accounts/nobody/usage?start=2024-05-06&end=2024-05-06",
            "",
            404,
        ),
        case(
            Method::PATCH,
            "/admin/keys/t-1/usage",
            r#"{"remaining":9007199254740993}"#,
            400,
        ),
        case(
            Method::POST,
            "/admin/keys",
            r#"{"id":"t-2","value":"tiny-key-2","plan":"platinum"}"#,
            409,
        ),
        // A plan the gateway does not have, named by a change of plan: the
        // same conflict as when a new key names it (the key is there: 404
        // would say it is not).
        case(
            Method::PATCH,
            "/admin/keys/t-1",
            r#"{"plan":"platinum"}"#,
            409,
        ),
        // A key that is not there, whatever plan the change names: the
        // key of the path is missing (404), not a conflict that reads as if
        // it were there.
        case(
            Method::PATCH,
            "/admin/keys/nobody",
            r#"{"plan":"platinum"}"#,
            404,
        ),
        // An id that is wrong in itself is a bad request, not a conflict.
        case(
            Method::POST,
            "/admin/keys",
            r#"{"id":"t 2","value":"tiny-key-2","plan":"tiny"}"#,
            400,
        ),
        case(
            Method::POST,
            "/admin/keys",
            r#"{"id":"t-2","value":"tiny key 2","plan":"tiny"}"#,
            400,
        ),
        // And the admin key check.
        Case {
            key: None,
            ..case(Method::GET, "/admin/plans", "", 403)
        },
        Case {
            key: Some("wrong-secret"),
            ..case(Method::GET, "/admin/keys/%ff", "", 403)
        },
    ]
}

/// Sends `c`; its status, content type and JSON body (`Null` if not JSON).
async fn send(base: &str, c: &Case) -> (u16, String, Value) {
    let mut req = reqwest::Client::new()
        .request(c.method.clone(), format!("{base}{}", c.path))
        .header("content-type", c.content_type)
        .body(c.body.clone());
    if let Some(key) = c.key {
        req = req.header("x-admin-key", key);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let ct = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = res.text().await.unwrap();
    (
        status,
        ct,
        serde_json::from_str(&text).unwrap_or(json!(text)),
    )
}

#[tokio::test]
async fn every_admin_error_is_json_in_the_openai_style() {
    let (base, _stop) = serve("openai").await;
    for c in cases() {
        let what = format!("{} {}", c.method, c.path);
        let (status, ct, body) = send(&base, &c).await;
        assert_eq!(status, c.status, "{what}: {body}");
        assert_eq!(ct, "application/json", "{what}: {body}");
        let e = &body["error"];
        let fields: Vec<&str> = e
            .as_object()
            .map_or(vec![], |o| o.keys().map(String::as_str).collect());
        assert_eq!(
            fields,
            ["code", "message", "param", "type"],
            "{what}: {body}"
        );
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {body}"
        );
        assert_eq!(e["type"], "invalid_request_error", "{what}: {body}");
        assert_eq!(e["param"], Value::Null, "{what}: {body}");
        assert!(e["code"].is_string(), "{what}: {body}");
    }
}

#[tokio::test]
async fn every_admin_error_is_json_in_the_aws_style() {
    let (base, _stop) = serve("aws").await;
    for c in cases() {
        let what = format!("{} {}", c.method, c.path);
        let (status, ct, body) = send(&base, &c).await;
        assert_eq!(status, c.status, "{what}: {body}");
        assert_eq!(ct, "application/json", "{what}: {body}");
        let fields: Vec<&str> = body
            .as_object()
            .map_or(vec![], |o| o.keys().map(String::as_str).collect());
        assert_eq!(fields, ["message"], "{what}: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {body}"
        );
    }
}

#[tokio::test]
async fn a_batch_import_names_its_bad_entry_in_either_style() {
    let batch = r#"[{"id":"b-1","value":"batch-key-1","plan":"tiny"},
                    {"id":"b-2","value":"batch-key-2","plan":"platinum"}]"#;
    let c = case(Method::POST, "/admin/keys", batch, 409);
    let (base, _stop) = serve("openai").await;
    let (status, _, body) = send(&base, &c).await;
    assert_eq!(status, 409, "{body}");
    let e = &body["error"];
    assert_eq!(
        (&e["index"], &e["id"]),
        (&json!(1), &json!("b-2")),
        "{body}"
    );
    assert_eq!(e["type"], "invalid_request_error", "{body}");
    assert!(
        e["message"].as_str().unwrap().contains("platinum"),
        "{body}"
    );
    let (base, _stop) = serve("aws").await;
    let (status, _, body) = send(&base, &c).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        (&body["index"], &body["id"]),
        (&json!(1), &json!("b-2")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("platinum"),
        "{body}"
    );
}

#[tokio::test]
async fn a_json_body_is_read_whatever_content_type_it_is_sent_with() {
    // The admin routes read their bodies as JSON whatever they are said to
    // be (as `curl -d` sends them, form-encoded), so a content type is
    // never an error of its own.
    let (base, _stop) = serve("openai").await;
    let c = Case {
        content_type: "application/x-www-form-urlencoded",
        ..case(
            Method::PATCH,
            "/admin/keys/t-1",
            r#"{"enabled":false}"#,
            200,
        )
    };
    let (status, _, body) = send(&base, &c).await;
    assert_eq!((status, &body["enabled"]), (200, &json!(false)), "{body}");
}

#[tokio::test]
async fn a_key_that_does_not_parse_is_refused_saying_what_is_wrong() {
    let (base, _stop) = serve("openai").await;
    let bodies = [
        (
            r#"{"id":"k-1","value":"k-value-1","plan":"tiny","colour":"red"}"#,
            "unknown field `colour`",
        ),
        (
            r#"{"id":"k-1","value":"k-value-1"}"#,
            "missing field `plan`",
        ),
        (
            r#"[{"id":"k-1","value":"k-value-1","plan":"tiny"},
                {"id":"k-2","value":"k-value-2"}]"#,
            "missing field `plan` at line 2",
        ),
        (
            r#"[{"id":"k-1","value":"k-value-1","plan":"tiny"},
                {"id":"k-2","value":"k-value-2","plan":"tiny","enabled":"yes"}]"#,
            "expected a boolean at line 2",
        ),
    ];
    for (body, says) in bodies {
        let (status, _, answer) = send(&base, &case(Method::POST, "/admin/keys", body, 400)).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{body}: {answer}");
    }
    // Nothing was imported.
    let (status, _, answer) = send(&base, &case(Method::GET, "/admin/keys/k-1", "", 404)).await;
    assert_eq!(status, 404, "{answer}");
}

#[tokio::test]
async fn a_body_that_does_not_parse_never_hands_a_key_value_back() {
    // A key value where the route expected something else: serde's own
    // message quotes what it found ("invalid type: string \"…\""), which
    // would put the value in the answer, and in any log of it.
    let secret = "tg-5eb63bbbe01eeed093cb22bb8f5acdc3";
    let bodies = [
        (
            Method::POST,
            "/admin/keys",
            format!(r#""{secret}""#),
            "expected struct",
        ),
        (
            Method::POST,
            "/admin/keys",
            format!(r#"["{secret}"]"#),
            "expected struct",
        ),
        (
            Method::POST,
            "/admin/keys",
            format!(r#"{{"id":"k-1","value":"{secret}","plan":"tiny","enabled":"{secret}"}}"#),
            "expected a boolean at line 1",
        ),
        (
            Method::POST,
            "/admin/keys",
            r#"{"id":"k-1","value":20240506123456789,"plan":"tiny"}"#.to_owned(),
            "expected a string at line 1",
        ),
        (
            Method::PATCH,
            "/admin/keys/t-1",
            // Quotes and backslashes, escaped in serde's quote of it.
            json!({"enabled": format!("\"{secret}\\\", expected \\")}).to_string(),
            "expected a boolean at line 1",
        ),
        (
            Method::PATCH,
            "/admin/keys/t-1/usage",
            format!(r#"{{"remaining":"{secret}"}}"#),
            "expected u64 at line 1",
        ),
    ];
    for style in ["openai", "aws"] {
        let (base, _stop) = serve(style).await;
        for (method, path, body, says) in &bodies {
            let c = Case {
                method: method.clone(),
                path,
                key: Some("admin-secret"),
                content_type: "application/json",
                body: body.clone(),
                status: 400,
            };
            let (status, _, answer) = send(&base, &c).await;
            assert_eq!(status, 400, "{style} {path} {body}: {answer}");
            let message = answer
                .pointer("/error/message")
                .or_else(|| answer.get("message"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            assert!(message.contains(says), "{style} {path} {body}: {answer}");
            let text = answer.to_string();
            for leak in [
                secret,
                "5eb63bbbe01eeed093cb22bb8f5acdc3",
                "20240506123456789",
            ] {
                assert!(!text.contains(leak), "{style} {path} {body}: {answer}");
            }
        }
    }
}

/// A usage query that names a parameter twice is told so: it has its plan,
/// start and end, and an answer saying it needs them sends its author
/// looking for what is there. One that lacks one is told what it needs.
#[tokio::test]
async fn a_usage_query_with_a_parameter_given_twice_says_so() {
    let (base, _stop) = serve("aws").await;
    for (path, says) in [
        (
            "/admin/usage?plan=tiny&start=2024-05-06&end=2024-05-06&key=t-1&key=t-2",
            "`key` given twice",
        ),
        (
            "/admin/usage?plan=tiny&plan=tiny&start=2024-05-06&end=2024-05-06",
            "`plan` given twice",
        ),
        (
            "/admin/accounts/acme/usage?start=2024-05-06&end=2024-05-06&end=2024-05-07",
            "`end` given twice",
        ),
        (
            "/admin/usage?plan=tiny&start=2024-05-06",
            "usage needs plan, start and end",
        ),
        (
            "/admin/accounts/acme/usage?start=2024-05-06",
            "usage needs start and end",
        ),
    ] {
        let (status, _, answer) = send(&base, &case(Method::GET, path, "", 400)).await;
        assert_eq!(status, 400, "{path}: {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{path}: {answer}");
    }
}
