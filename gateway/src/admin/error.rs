//! The admin routes' errors: JSON in the config's response style, whatever
//! refused the request (the admin key check, a route, `Admin`, or one of
//! axum's extractors).
//!
//! axum answers a path, query or body it cannot extract as plain text
//! (`Invalid URL: Invalid UTF-8 in `id``), and a route's own errors were
//! written in whichever shape its author had at hand: a client of the admin
//! API met three shapes. Every admin error is now built here, from a status
//! and a message, in the one shape of the style the layer answers its own
//! refusals in:
//!
//! - `aws`: `{"message":…}`, as API Gateway's management API answers;
//! - `openai`: `{"error":{"message":…,"type":…,"param":null,"code":…}}`,
//!   which OpenAI's SDKs decode into their error type.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use http_body::Body as _;
use serde_json::{Map, Value, json};
use tollgate::{AdminError, ConfigError, ResponseStyle};

use super::AdminState;

/// An admin error: `status` with `message` in `style`, and `details` (a
/// batch import's `index` and `id` of the entry at fault) beside the
/// message.
pub(crate) fn error(
    style: ResponseStyle,
    status: StatusCode,
    message: &str,
    details: Map<String, Value>,
) -> Response {
    let mut fields = Map::new();
    fields.insert("message".into(), message.into());
    let body = match style {
        ResponseStyle::OpenAi => {
            // OpenAI's SDKs tell a client's mistake from the server's by
            // `type`, as the layer's own 503 does (`server_error`).
            let kind = if status.is_server_error() {
                "server_error"
            } else {
                "invalid_request_error"
            };
            fields.insert("type".into(), kind.into());
            // `param` names a body field at fault in OpenAI's answers; the
            // admin messages name it themselves, so it is always null.
            fields.insert("param".into(), Value::Null);
            fields.insert("code".into(), code(status).into());
            fields.extend(details);
            json!({ "error": fields })
        }
        _ => {
            fields.extend(details);
            Value::Object(fields)
        }
    };
    (status, Json(body)).into_response()
}

/// The `code` of an OpenAI-style admin error: what went wrong, by status,
/// so that a client can branch on it without reading the message.
fn code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::FORBIDDEN => "invalid_admin_key",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::CONFLICT => "conflict",
        StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::SERVICE_UNAVAILABLE => "service_unavailable",
        s if s.is_server_error() => "server_error",
        _ => "invalid_request",
    }
}

/// The status of an [`AdminError`].
fn status(e: &AdminError) -> StatusCode {
    match e {
        // A batch import fails as its entry at fault would alone; which
        // entry, the answer says beside the message.
        AdminError::Import { error, .. } => status(error),
        // What the path or the query names is not there: the key, the plan
        // or the account whose usage is asked, or the key's usage in the
        // plan asked (it is on another).
        AdminError::UnknownKey(_)
        | AdminError::UnknownPlan(_)
        | AdminError::UnknownAccount(_)
        | AdminError::KeyNotInPlan { .. } => StatusCode::NOT_FOUND,
        // What the request names clashes with what is there: an id or a
        // value taken, a plan or an account the gateway does not have.
        AdminError::Config(
            ConfigError::DuplicateKeyId(_)
            | ConfigError::DuplicateKeyValue { .. }
            | ConfigError::DuplicatePlan(_)
            | ConfigError::DuplicateAccount(_)
            | ConfigError::UnknownPlan { .. }
            | ConfigError::UnknownAccount { .. },
        ) => StatusCode::CONFLICT,
        // Anything else is wrong in itself (an id or a value that is empty,
        // too long or not visible ASCII): 400, whatever the gateway holds.
        AdminError::Config(_) => StatusCode::BAD_REQUEST,
        AdminError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        // A value the request got wrong (`{"remaining": N}` above 2^53, a
        // date range), the same with every store.
        AdminError::RemainingOutOfRange { .. } | AdminError::BadRange(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// The answer to an [`AdminError`] in `style`: a batch import's names the
/// entry at fault (`index`, `id`) beside the message.
pub(crate) fn admin_error(style: ResponseStyle, e: &AdminError) -> Response {
    let mut details = Map::new();
    if let AdminError::Import { index, id, .. } = e {
        details.insert("index".into(), json!(index));
        details.insert("id".into(), json!(id));
    }
    error(style, status(e), &e.to_string(), details)
}

/// An axum extractor `E` whose rejection is answered as every admin error
/// is ([`error`]), in the style of the routes' state, instead of axum's
/// plain text: `Styled<Path<String>>`, `Styled<Query<T>>`, `Styled<Bytes>`.
///
/// Put it after [`Authorized`](super::Authorized) in a handler's
/// arguments: extractors run in order, so a request without the admin key
/// is answered 403 before its path, query or body is looked at.
pub(crate) struct Styled<E>(pub(crate) E);

/// An axum rejection, told by its status and its plain-text message.
pub(crate) trait Rejected {
    fn status(&self) -> StatusCode;
    fn message(&self) -> String;
}

macro_rules! rejected {
    ($($t:ty),*) => {$(
        impl Rejected for $t {
            fn status(&self) -> StatusCode {
                <$t>::status(self)
            }
            fn message(&self) -> String {
                self.body_text()
            }
        }
    )*};
}

rejected!(PathRejection, QueryRejection);

impl<S, E> FromRequestParts<AdminState<S>> for Styled<E>
where
    S: Send + Sync,
    E: FromRequestParts<AdminState<S>>,
    E::Rejection: Rejected,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &AdminState<S>) -> Result<Self, Response> {
        match E::from_request_parts(parts, s).await {
            Ok(e) => Ok(Styled(e)),
            Err(r) => Err(s.error(r.status(), &r.message())),
        }
    }
}

/// How long a request's body may take to arrive whole (`--body-deadline`),
/// set on each request by the server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyDeadline(pub(crate) std::time::Duration);

/// The bound on an admin route's body, set on the route as an
/// [`Extension`](axum::Extension); [`BodyLimit::DEFAULT`] where none is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimit(pub(crate) usize);

impl BodyLimit {
    /// The bound of a route that sets none: 2 MiB, axum's default, which
    /// the admin routes had before they read their bodies themselves.
    pub(crate) const DEFAULT: BodyLimit = BodyLimit(2 << 20);
}

/// Why a body was not read whole.
enum Unread {
    /// It passed the route's bound.
    TooLarge,
    /// The connection failed while it was being read.
    Failed(axum::Error),
}

/// The body, read up to the route's [`BodyLimit`] (413 past it) and within
/// the request's [`BodyDeadline`] (408 past it, the connection closed), as a
/// body read for an estimate is: an admin body is the admin's, but a
/// trickle of one still holds a connection and what it sent.
///
/// A body whose `content-length` (or whose size hint) says it is larger
/// than the bound is refused before a byte of it is asked for: no `100
/// Continue` invites it, and a client sending it slowly is answered at once
/// rather than at the deadline. One without a length is refused as soon as
/// it passes the bound, having held no more than the bound.
impl<S> FromRequest<AdminState<S>> for Styled<Bytes>
where
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: Request, s: &AdminState<S>) -> Result<Self, Response> {
        let deadline = req
            .extensions()
            .get::<BodyDeadline>()
            .map_or(crate::cli::DEFAULT_BODY_DEADLINE, |d| d.0);
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .copied()
            .unwrap_or(BodyLimit::DEFAULT)
            .0;
        let announced = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let body = req.into_body();
        let bound = u64::try_from(limit).unwrap_or(u64::MAX);
        if announced.max(body.size_hint().lower()) > bound {
            return Err(too_large(s, limit));
        }
        match tokio::time::timeout(deadline, read(body, limit)).await {
            Ok(Ok(b)) => Ok(Styled(b)),
            Ok(Err(Unread::TooLarge)) => Err(too_large(s, limit)),
            Ok(Err(Unread::Failed(e))) => Err(s.error(
                StatusCode::BAD_REQUEST,
                &format!("the request body could not be read: {e}"),
            )),
            Err(_) => {
                let message = format!(
                    "the request body did not arrive within {} ms",
                    deadline.as_millis()
                );
                Err(closing(s.error(StatusCode::REQUEST_TIMEOUT, &message)))
            }
        }
    }
}

/// The answer to a body larger than `limit` bytes: 413, the connection
/// closed (the rest of the body is not worth waiting for).
fn too_large<S>(s: &AdminState<S>, limit: usize) -> Response {
    let message = format!("the request body is larger than {limit} bytes");
    closing(s.error(StatusCode::PAYLOAD_TOO_LARGE, &message))
}

/// `res`, closing its connection after it.
fn closing(mut res: Response) -> Response {
    res.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    res
}

/// `body` whole, if it holds at most `limit` bytes. What is kept never
/// passes `limit`: a frame that would pass it is refused before it is
/// copied, and the buffer grows to the announced length at most, or by
/// doubling up to `limit`.
async fn read(mut body: axum::body::Body, limit: usize) -> Result<Bytes, Unread> {
    use http_body_util::BodyExt;
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Unread::Failed)?;
        // Trailers are not part of the body.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let needed = buf.len() + data.len();
        if needed > limit {
            return Err(Unread::TooLarge);
        }
        if needed > buf.capacity() {
            // The rest a length announced: reserved at once, up to the
            // bound it was checked against.
            let rest = usize::try_from(body.size_hint().lower()).unwrap_or(limit);
            let want = needed
                .saturating_add(rest)
                .max(buf.capacity() * 2)
                .min(limit);
            buf.reserve_exact(want - buf.len());
        }
        buf.extend_from_slice(&data);
    }
    Ok(Bytes::from(buf))
}
