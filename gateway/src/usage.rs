//! `GET /v1/usage`: the caller's own plan and how each of its limits stands,
//! read without charging anything. A caller sees its own key's limits only:
//! the key is the one it sends, taken as the inference routes take it. A
//! caller without a key, which `[anonymous] mode = "ip"` lets in, sees the
//! anonymous throttle of its own address.

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tollgate::extract::BearerOrApiKey;
use tollgate::store::{Applied, Store};
use tollgate::{RateLimitLayer, Rejection, Standing};

/// The handler's state: the layer whose limits it reads.
pub(crate) type Limit<S> = RateLimitLayer<BearerOrApiKey, S>;

/// `GET /v1/usage`.
pub(crate) async fn usage<S: Store>(State(limit): State<Limit<S>>, req: Request) -> Response {
    match limit.standing_of(&req).await {
        Ok(standing) => {
            let mut res = Json(body(&standing)).into_response();
            res.headers_mut()
                .insert("cache-control", HeaderValue::from_static("no-store"));
            res
        }
        Err(rejection) => refused(&rejection),
    }
}

/// The answer: the plan, and per limit its name, family (`requests` or
/// `tokens`), size, window, what remains and when it is full again.
fn body(standing: &Standing) -> Value {
    let limits: Vec<Value> = standing.limits().iter().map(limit).collect();
    json!({
        "object": "usage",
        "plan": standing.plan(),
        "limits": limits,
        "refused": standing.refused().map(|r| json!({
            "limit": r.limit(),
            "message": message(r),
            "retry_after_ms": r.retry_after_ms(),
        })),
    })
}

/// What the refusal's own answer would say: its body's message, in the
/// layer's style. (`Rejection::message` is the AWS style's wording, "Too
/// Many Requests", which an OpenAI client never sees in a 429.) The body
/// is read back rather than the wording copied here, so that the two can
/// never drift apart; a body without a message (a gRPC call's, which has
/// none) gives the AWS wording.
fn message(r: &Rejection) -> String {
    let res = r.default_response();
    let body: Value = serde_json::from_slice(res.body()).unwrap_or_default();
    body.pointer("/error/message")
        .or_else(|| body.get("message"))
        .and_then(Value::as_str)
        .unwrap_or(r.message())
        .to_owned()
}

fn limit(a: &Applied) -> Value {
    let family = if a.kind().counts_tokens() {
        "tokens"
    } else {
        "requests"
    };
    let reset = a.reset();
    json!({
        "name": a.name(),
        "family": family,
        "limit": a.limit(),
        "remaining": a.remaining(),
        "window_secs": a.window().as_secs(),
        "reset_ms": u64::try_from(reset.as_millis()).unwrap_or(u64::MAX),
    })
}

/// A request without a usable key, answered as the layer answers one.
fn refused(rejection: &Rejection) -> Response {
    let res = rejection.default_response();
    let (parts, bytes) = res.into_parts();
    let mut res = Response::from_parts(parts, Body::from(bytes));
    res.headers_mut()
        .entry("cache-control")
        .or_insert(HeaderValue::from_static("no-store"));
    res
}
