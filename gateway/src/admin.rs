//! The admin routes: usage reports and key administration, guarded by the
//! `x-admin-key` header, answering every error as JSON in the config's
//! response style ([`error`]).

mod error;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tollgate::store::Store;
use tollgate::{Admin, AdminError, ApiKey, ConfigError, Date, KeyChange, KeyInfo, ResponseStyle};

pub(crate) use self::error::{BodyDeadline, BodyLimit, Styled};
use crate::dashboard::{self, Dashboard};
use crate::usage::Limit;

/// The admin routes, working on `admin`, open to requests that carry
/// `admin_key` (to none when there is no admin key); with the dashboard's
/// page and the JSON it reads (see [`crate::dashboard`]).
pub(crate) fn routes<S: Store>(
    limit: &Limit<S>,
    admin_key: Option<&str>,
    dashboard: &Dashboard,
) -> Router {
    let state = AdminState {
        admin: limit.admin(),
        limit: limit.clone(),
        key: admin_key.map(|k| AdminKey::new(k.as_bytes())),
        dashboard: dashboard.clone(),
        style: limit.style(),
    };
    Router::new()
        .route("/admin/usage", get(usage::<S>))
        // A batch import of 100,000 keys is some 10 MB of JSON; the body is
        // read only once the admin key has been checked (the other routes'
        // bodies are bounded by `BodyLimit::DEFAULT`).
        .route(
            "/admin/keys",
            get(dashboard::keys::<S>)
                .post(add_key::<S>)
                .layer(axum::Extension(BodyLimit(ADMIN_BODY_LIMIT))),
        )
        .route(
            "/admin/keys/{id}",
            get(get_key::<S>)
                .patch(patch_key::<S>)
                .delete(remove_key::<S>),
        )
        .route("/admin/keys/{id}/usage", patch(update_usage::<S>))
        .route("/admin/keys/{id}/reset", post(reset_key::<S>))
        .merge(dashboard::routes::<S>())
        .with_state(state)
}

#[derive(Clone)]
pub(crate) struct AdminState<S> {
    pub(crate) admin: Admin<S>,
    /// The layer, whose limits of a key the dashboard reads.
    pub(crate) limit: Limit<S>,
    key: Option<AdminKey>,
    pub(crate) dashboard: Dashboard,
    /// The style of the layer's refusals, which the admin errors share.
    style: ResponseStyle,
}

impl<S> AdminState<S> {
    /// Whether the request carries the admin key in its one `x-admin-key`
    /// header; see [`AdminKey::matches`]. A request with several is
    /// refused, whatever they hold: which one is meant is not told (a
    /// proxy may have added one), as the layer refuses a repeated API key.
    fn allows(&self, headers: &HeaderMap) -> bool {
        let mut sent = headers.get_all("x-admin-key").iter();
        match (&self.key, sent.next(), sent.next()) {
            (Some(key), Some(sent), None) => key.matches(sent.as_bytes()),
            _ => false,
        }
    }

    /// An admin error: `status` with `message`, in the config's style.
    pub(crate) fn error(&self, status: StatusCode, message: &str) -> Response {
        error::error(self.style, status, message, serde_json::Map::new())
    }

    /// The answer to an [`AdminError`], in the config's style.
    pub(crate) fn admin_error(&self, e: &AdminError) -> Response {
        error::admin_error(self.style, e)
    }
}

/// The admin key, kept only as a keyed digest, so that checking a request's
/// key takes a time that says nothing about the admin key.
///
/// The key sent is hashed with SipHash-2-4 (128 bits) under a key drawn from
/// the operating system's randomness at start, and the two digests are
/// compared whole. The time taken depends on the length of the key sent,
/// which its sender knows, and on nothing else: the admin key itself is
/// never read while serving, so neither its bytes nor its length, nor how
/// long a prefix of it the sent key shares, can show in the time. And since
/// no one can compute digests without the random key, even a comparison that
/// stopped at the first differing bit would teach a sender nothing it could
/// use. It does not stop early anyway: both halves are folded into one word,
/// which is tested once.
#[derive(Clone)]
pub struct AdminKey {
    sip: (u64, u64),
    digest: [u64; 2],
}

impl AdminKey {
    /// Keeps the digest of `key` under a new random key.
    pub fn new(key: &[u8]) -> AdminKey {
        use std::hash::BuildHasher;
        // std's RandomState is seeded from the operating system's randomness.
        let seed = std::hash::RandomState::new();
        let sip = (
            seed.hash_one(0x0061_646d_696e_u64),
            seed.hash_one(0x006b_6579_u64),
        );
        AdminKey {
            sip,
            digest: admin_digest(sip, key),
        }
    }

    /// Whether `sent` is the admin key, in a time that depends only on
    /// `sent.len()`.
    pub fn matches(&self, sent: &[u8]) -> bool {
        let [a, b] = admin_digest(self.sip, sent);
        let diff = (a ^ self.digest[0]) | (b ^ self.digest[1]);
        std::hint::black_box(diff) == 0
    }
}

/// The SipHash-2-4 128-bit digest of `bytes` under `key`.
fn admin_digest(key: (u64, u64), bytes: &[u8]) -> [u64; 2] {
    use siphasher::sip128::{Hasher128, SipHasher24};
    use std::hash::Hasher;
    let mut h = SipHasher24::new_with_keys(key.0, key.1);
    h.write(bytes);
    let h = h.finish128();
    [h.h1, h.h2]
}

impl std::fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminKey(..)")
    }
}

/// A request that carries the admin key; any other is answered 403.
pub(crate) struct Authorized;

impl<S: Send + Sync> FromRequestParts<AdminState<S>> for Authorized {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &AdminState<S>) -> Result<Self, Response> {
        if s.allows(&parts.headers) {
            Ok(Authorized)
        } else {
            Err(s.error(StatusCode::FORBIDDEN, "Forbidden"))
        }
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid request body: {}", unquoted(&e)))
}

/// serde's message for a body that does not parse, without the value it
/// quotes from the body. serde names what it found where it expected
/// something else with the value itself (`invalid type: string "tg-…",
/// expected a boolean`), and the value in an admin body may be a key's:
/// it would be handed back in the answer, and to any log or proxy that
/// keeps answers. The kind of value stays (`invalid type: string,
/// expected a boolean at line 1 column 82`), and so do the names of
/// fields, which come from the routes' types.
fn unquoted(e: &serde_json::Error) -> String {
    let message = e.to_string();
    let Some((prefix, rest)) = ["invalid type: ", "invalid value: "]
        .iter()
        .find_map(|p| message.strip_prefix(p).map(|rest| (p, rest)))
    else {
        return message;
    };
    // serde writes a string with `{:?}` (quoted, `"` and `\` escaped),
    // and every other value it quotes (a number, a boolean, a character)
    // between backticks.
    let (kind, after) = if let Some(s) = rest.strip_prefix("string \"") {
        let mut escaped = false;
        let end = s.char_indices().find_map(|(i, c)| match (escaped, c) {
            (false, '"') => Some(i),
            (false, '\\') => {
                escaped = true;
                None
            }
            _ => {
                escaped = false;
                None
            }
        });
        match end {
            Some(end) => ("string", &s[end + 1..]),
            None => return format!("{prefix}string"),
        }
    } else {
        match rest.split_once(" `") {
            Some((kind, quoted)) if !kind.contains(',') => match quoted.split_once('`') {
                Some((_, after)) => (kind, after),
                None => return format!("{prefix}{kind}"),
            },
            _ => return message,
        }
    };
    format!("{prefix}{kind}{after}")
}

/// The message for a query axum could not read: `needs`, what the route
/// needs, rather than axum's wording of serde's first complaint; and a
/// parameter given twice (`key=a&key=b`) is named, since the query has
/// everything `needs` lists.
pub(crate) fn query_message(e: &axum::extract::rejection::QueryRejection, needs: &str) -> String {
    let text = e.body_text();
    // serde's `duplicate field `key``: the name comes from the route's type.
    let twice = text
        .split_once("duplicate field `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(name, _)| name);
    match twice {
        Some(name) => format!("`{name}` given twice; {needs}"),
        None => needs.to_owned(),
    }
}

/// The largest admin request body: a batch of keys to import.
const ADMIN_BODY_LIMIT: usize = 64 << 20;

#[derive(Deserialize)]
struct UsageQuery {
    plan: String,
    start: String,
    end: String,
    key: Option<String>,
    /// At most this many keys (AWS GetUsage's `limit`); all without it.
    limit: Option<String>,
    /// Where the page starts (AWS GetUsage's `position`), as the page
    /// before answered it.
    position: Option<String>,
}

/// AWS GetUsage's largest page.
const MAX_USAGE_PAGE: usize = 500;

/// `limit`, a whole number from 1 to [`MAX_USAGE_PAGE`].
fn usage_limit(limit: &str) -> Option<std::num::NonZeroUsize> {
    limit
        .parse()
        .ok()
        .filter(|n: &std::num::NonZeroUsize| n.get() <= MAX_USAGE_PAGE)
}

async fn usage<S: Store>(
    _: Authorized,
    State(s): State<AdminState<S>>,
    q: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => {
            let why = query_message(&e, "usage needs plan, start and end (YYYY-MM-DD)");
            return s.error(StatusCode::BAD_REQUEST, &why);
        }
    };
    let (Some(start), Some(end)) = (Date::parse(&q.start), Date::parse(&q.end)) else {
        return s.error(
            StatusCode::BAD_REQUEST,
            "start and end must be dates as YYYY-MM-DD",
        );
    };
    let limit = match q.limit.as_deref().map(usage_limit) {
        None => None,
        Some(Some(limit)) => Some(limit),
        Some(None) => {
            let why = format!("limit must be a whole number from 1 to {MAX_USAGE_PAGE}");
            return s.error(StatusCode::BAD_REQUEST, &why);
        }
    };
    let key = q.key.as_deref();
    let report = match (limit, q.position.as_deref()) {
        (None, None) => s.admin.usage(&q.plan, start, end, key).await,
        // A position without a limit: the rest of the report, whole.
        (limit, position) => {
            let limit = limit.unwrap_or(std::num::NonZeroUsize::MAX);
            let admin = &s.admin;
            admin
                .usage_page(&q.plan, start, end, key, limit, position)
                .await
        }
    };
    match report {
        Ok(r) => {
            let mut body = json!({
                "plan": r.plan,
                "start": r.start.to_string(),
                "end": r.end.to_string(),
                "items": r.items,
            });
            // Only while keys remain after the page, as AWS answers it: a
            // client that asks for no page sees the shape it always had.
            if let Some(position) = r.position {
                body["position"] = position.into();
            }
            Json(body).into_response()
        }
        Err(e) => s.admin_error(&e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    id: String,
    /// Generated (and answered once) when absent.
    value: Option<String>,
    plan: String,
    #[serde(default = "yes")]
    enabled: bool,
    account: Option<String>,
}

fn yes() -> bool {
    true
}

fn key_json<S: Store>(s: &AdminState<S>, id: &str) -> Response {
    match s.admin.key(id) {
        Some(k) => Json(key_info_json(&k)).into_response(),
        None => s.admin_error(&AdminError::UnknownKey(id.to_owned())),
    }
}

/// A key as the admin routes show it: never its value.
pub(crate) fn key_info_json(k: &KeyInfo) -> serde_json::Value {
    json!({"id": k.id, "plan": k.plan, "enabled": k.enabled, "account": k.account})
}

/// One key, or a batch of them (imported all or nothing).
enum NewKeys {
    One(NewKey),
    Many(Vec<NewKey>),
}

impl NewKeys {
    /// A batch when the body is a JSON array, else one key. Told apart by
    /// the first character, not as an untagged enum, whose error for a body
    /// that is neither says only that it "did not match any variant": this
    /// way a bad key is refused with serde's message, which names the field
    /// and its line.
    fn parse(body: &Bytes) -> Result<NewKeys, String> {
        if body.trim_ascii_start().starts_with(b"[") {
            parse_json(body).map(NewKeys::Many)
        } else {
            parse_json(body).map(NewKeys::One)
        }
    }
}

fn new_key(k: NewKey, value: String) -> ApiKey {
    let key = ApiKey::new(k.id, value, k.plan).enabled(k.enabled);
    match k.account {
        Some(account) => key.account(account),
        None => key,
    }
}

async fn add_key<S: Store>(
    _: Authorized,
    State(s): State<AdminState<S>>,
    Styled(body): Styled<Bytes>,
) -> Response {
    let keys = match NewKeys::parse(&body) {
        Ok(k) => k,
        Err(msg) => return s.error(StatusCode::BAD_REQUEST, &msg),
    };
    match keys {
        NewKeys::One(mut k) => {
            let id = k.id.clone();
            let (value, generated) = match k.value.take() {
                Some(v) => (v, false),
                None => match generate_value() {
                    Ok(v) => (v, true),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot draw a key value from the system's randomness");
                        return s.error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "cannot generate a key value",
                        );
                    }
                },
            };
            let shown = generated.then(|| value.clone());
            if let Err(e) = s.admin.add_key(new_key(k, value)).await {
                return s.admin_error(&e);
            }
            let Some(info) = s.admin.key(&id) else {
                return s.admin_error(&AdminError::UnknownKey(id));
            };
            let mut body = key_info_json(&info);
            let mut res = match shown {
                // Answered this once: only the value's hash is kept.
                Some(value) => {
                    body["value"] = value.into();
                    (StatusCode::CREATED, Json(body)).into_response()
                }
                None => (StatusCode::CREATED, Json(body)).into_response(),
            };
            res.headers_mut()
                .insert("cache-control", HeaderValue::from_static("no-store"));
            res
        }
        NewKeys::Many(keys) => {
            if let Some(index) = keys.iter().position(|k| k.value.is_none()) {
                return s.error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "key {index} of the batch has no value; a batch is imported with the values it gives \
                         (add keys one at a time to have values generated)"
                    ),
                );
            }
            let keys = keys.into_iter().map(|mut k| {
                let value = k.value.take().unwrap_or_default();
                new_key(k, value)
            });
            match s.admin.import_keys(keys).await {
                Ok(n) => (StatusCode::CREATED, Json(json!({"imported": n}))).into_response(),
                Err(e) => s.admin_error(&e),
            }
        }
    }
}

/// The prefix of generated key values, which tells them apart in a leaked
/// log or a secret scanner's findings.
pub(crate) const GENERATED_PREFIX: &str = "tg-";

/// A new key value: [`GENERATED_PREFIX`] and 32 bytes of the operating
/// system's randomness in hex (256 bits; 67 visible ASCII characters).
pub(crate) fn generate_value() -> Result<String, getrandom::Error> {
    use std::fmt::Write;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    let mut value = String::with_capacity(GENERATED_PREFIX.len() + 64);
    value.push_str(GENERATED_PREFIX);
    for b in bytes {
        let _ = write!(value, "{b:02x}");
    }
    Ok(value)
}

async fn get_key<S: Store>(
    _: Authorized,
    State(s): State<AdminState<S>>,
    Styled(Path(id)): Styled<Path<String>>,
) -> Response {
    key_json(&s, &id)
}

async fn remove_key<S: Store>(
    _: Authorized,
    State(s): State<AdminState<S>>,
    Styled(Path(id)): Styled<Path<String>>,
) -> Response {
    match s.admin.remove_key(&id).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => s.admin_error(&e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyPatch {
    enabled: Option<bool>,
    plan: Option<String>,
}

async fn patch_key<S: Store>(
    _: Authorized,
    State(s): State<AdminState<S>>,
    Styled(Path(id)): Styled<Path<String>>,
    Styled(body): Styled<Bytes>,
) -> Response {
    let p: KeyPatch = match parse_json(&body) {
        Ok(p) => p,
        Err(msg) => return s.error(StatusCode::BAD_REQUEST, &msg),
    };
    // One change of the key, whichever fields the body names: a PATCH is
    // applied whole, and no request (on any instance) finds the key with
    // one field changed and not the other.
    let mut change = KeyChange::new();
    if let Some(plan) = p.plan {
        change = change.plan(plan);
    }
    if let Some(enabled) = p.enabled {
        change = change.enabled(enabled);
    }
    match s.admin.update_key(&id, change).await {
        Ok(()) => key_json(&s, &id),
        // A plan the gateway does not have, named in the body: the
        // conflict `POST /admin/keys` answers for it, in its words. A 404
        // here would say that the key of the path is missing.
        Err(AdminError::UnknownPlan(plan)) => {
            let e = ConfigError::UnknownPlan {
                key: id.clone(),
                plan,
            };
            s.admin_error(&AdminError::Config(e))
        }
        Err(e) => s.admin_error(&e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsagePatch {
    remaining: u64,
}

async fn update_usage<S: Store>(
    _: Authorized,
    State(s): State<AdminState<S>>,
    Styled(Path(id)): Styled<Path<String>>,
    Styled(body): Styled<Bytes>,
) -> Response {
    let p: UsagePatch = match parse_json(&body) {
        Ok(p) => p,
        Err(msg) => return s.error(StatusCode::BAD_REQUEST, &msg),
    };
    match s.admin.set_remaining(&id, p.remaining).await {
        Ok(remaining) => Json(json!({"id": id, "remaining": remaining})).into_response(),
        Err(e) => s.admin_error(&e),
    }
}

async fn reset_key<S: Store>(
    _: Authorized,
    State(s): State<AdminState<S>>,
    Styled(Path(id)): Styled<Path<String>>,
) -> Response {
    match s.admin.reset_key(&id).await {
        Ok(()) => key_json(&s, &id),
        Err(e) => s.admin_error(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message_for<T: serde::de::DeserializeOwned>(body: &str) -> String {
        parse_json::<T>(&Bytes::copy_from_slice(body.as_bytes()))
            .err()
            .unwrap()
    }

    #[test]
    fn a_parse_error_names_the_kind_of_value_never_the_value() {
        let cases = [
            (
                message_for::<UsagePatch>(r#"{"remaining":"tg-secret"}"#),
                "invalid request body: invalid type: string, expected u64",
            ),
            (
                message_for::<UsagePatch>(r#"{"remaining":-12345}"#),
                "invalid request body: invalid value: integer, expected u64",
            ),
            (
                message_for::<KeyPatch>(r#"{"enabled":"a\"b\\c"}"#),
                "invalid request body: invalid type: string, expected a boolean",
            ),
            (
                message_for::<KeyPatch>(r#"{"enabled":null,"plan":true}"#),
                "invalid request body: invalid type: boolean, expected a string",
            ),
            // Nothing quoted from the body: as serde says it.
            (
                message_for::<UsagePatch>(r#"{"remaining":null}"#),
                "invalid request body: invalid type: null, expected u64",
            ),
            (
                message_for::<UsagePatch>(r#"{"remaining":1,"colour":2}"#),
                "invalid request body: unknown field `colour`, expected `remaining`",
            ),
        ];
        for (got, want) in cases {
            // Where it went wrong is told after the message.
            assert_eq!(got.split(" at line 1").next(), Some(want), "{got}");
        }
    }
}
