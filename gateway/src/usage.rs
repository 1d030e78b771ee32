//! `GET /v1/usage`: the caller's own plan and how each of its limits stands,
//! read without charging anything. A caller sees its own key's limits only:
//! the key is the one it sends, taken as the inference routes take it. A
//! caller without a key, which `[anonymous] mode = "ip"` lets in, sees the
//! anonymous throttle of its own address.
//!
//! `GET /v1/usage?model=NAME` reads the limits a request for the model
//! `NAME` would be decided under: the model's own entry in the plan's
//! `[plans.models]` (found as a request's model is: `Big-Model:latest`
//! finds `"big-model"`), else the plan's `"*"` entry. The answer's `model`
//! names the entry whose limits it shows (`"big-model"`, `"*"`, or `null`
//! when no model limits apply), and so does each model limit's own `model`.
//! Without `model`, the `"*"` entry's limits are shown, named so. No query
//! reads another key's limits: other parameters are ignored.
//!
//! After those limits come the method overrides of the caller's stage
//! (`[stage.methods]`, named `"stage-method"`) and plan (`[plans.methods]`,
//! named `"method"`), as the rate-limit headers name them, each with its
//! methodPath as configured in `method` (`"/v1/chat/completions/POST"`,
//! `"/*/*"`): every override, since a request meets only the most literal
//! one its route matches of each. Each is read alone, at cost 0.

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tollgate::extract::BearerOrApiKey;
use tollgate::store::{Applied, Store};
use tollgate::{RateLimitLayer, Rejection, ResponseStyle, Standing};

/// The handler's state: the layer whose limits it reads.
pub(crate) type Limit<S> = RateLimitLayer<BearerOrApiKey, S>;

/// The query `GET /v1/usage` reads.
#[derive(Deserialize)]
struct UsageQuery {
    /// The model whose limits to show.
    model: Option<String>,
}

/// `GET /v1/usage`.
pub(crate) async fn usage<S: Store>(State(limit): State<Limit<S>>, req: Request) -> Response {
    let model = match Query::<UsageQuery>::try_from_uri(req.uri()) {
        Ok(Query(UsageQuery { model: Some(m) })) if m.is_empty() => Err(()),
        Ok(Query(q)) => Ok(q.model),
        // A `model` given twice, or not UTF-8.
        Err(_) => Err(()),
    };
    let standing = match &model {
        Ok(Some(model)) => limit.standing_of_model(&req, model).await,
        // The key is checked first: a caller without a usable one learns
        // nothing else.
        Ok(None) | Err(()) => limit.standing_of(&req).await,
    };
    match (standing, model) {
        (Err(rejection), _) => refused(&rejection),
        (Ok(_), Err(())) => bad_query(limit.style()),
        (Ok(standing), Ok(_)) => {
            let mut res = Json(body(&standing)).into_response();
            res.headers_mut()
                .insert("cache-control", HeaderValue::from_static("no-store"));
            res
        }
    }
}

/// A `model` that is not one model's name: 400, in the layer's style.
fn bad_query(style: ResponseStyle) -> Response {
    const MESSAGE: &str = "`model` must name one model: GET /v1/usage?model=NAME";
    let body = match style {
        ResponseStyle::OpenAi => json!({"error": {
            "message": MESSAGE,
            "type": "invalid_request_error",
            "param": "model",
            "code": null,
        }}),
        _ => json!({ "message": MESSAGE }),
    };
    let mut res = (StatusCode::BAD_REQUEST, Json(body)).into_response();
    res.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    res
}

/// The answer: the plan, and per limit its name, family (`requests` or
/// `tokens`), size, window, what remains and when it is full again; then
/// each method override of the stage and the plan, named as the headers
/// name it (`stage-method`, `method`), with its methodPath (`method`).
fn body(standing: &Standing) -> Value {
    let model = standing.model();
    let mut limits: Vec<Value> = standing.limits().iter().map(|a| limit(a, model)).collect();
    limits.extend(standing.methods().iter().map(|m| {
        let mut v = limit(m.limit(), model);
        v["method"] = json!(m.method());
        v
    }));
    json!({
        "object": "usage",
        "plan": standing.plan(),
        "model": model,
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

/// A limit of the answer; a model's limit also names the model entry
/// (`model`) it belongs to.
fn limit(a: &Applied, model: Option<&str>) -> Value {
    let family = if a.kind().counts_tokens() {
        "tokens"
    } else {
        "requests"
    };
    let reset = a.reset();
    let mut v = json!({
        "name": a.name(),
        "family": family,
        "limit": a.limit(),
        "remaining": a.remaining(),
        "window_secs": a.window().as_secs(),
        "reset_ms": u64::try_from(reset.as_millis()).unwrap_or(u64::MAX),
    });
    if a.kind().is_model() {
        v["model"] = json!(model);
    }
    v
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
