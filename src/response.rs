//! Rejections and rate-limit headers.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use crate::extract::KeyError;
use crate::headers::ceil_secs;
use crate::plan::LimitKind;
use crate::store::{Applied, Denial, Denied, Report};

mod grpc;
mod style;

pub use self::style::ResponseStyle;

/// The default bound on a retry worth waiting for: a rejection whose retry
/// lies further away is answered with `x-should-retry: false`.
pub(crate) const DEFAULT_MAX_RETRY: Duration = Duration::from_secs(60);

/// Why a request was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// No usable key could be taken from the request.
    Key(KeyError),
    /// The key is not registered.
    UnknownKey,
    /// The key is registered but disabled.
    DisabledKey,
    /// A throttle has no room now.
    Limited,
    /// The quota of the current window is used up.
    QuotaExceeded,
    /// The request costs more than a limit can ever hold.
    CostExceedsLimit,
    /// The store cannot track another key until one goes idle.
    KeyCapacity,
    /// The key has as many requests in flight as its plan's concurrency cap.
    ConcurrencyLimited,
    /// The store failed (unreachable, too slow) and the plan's failure mode
    /// is [`Closed`](crate::FailureMode::Closed).
    StoreUnavailable,
    /// The key is not registered and the [`KeyResolver`](crate::KeyResolver)
    /// failed or timed out (see [`ResolverFallback`](crate::ResolverFallback)).
    ResolverUnavailable,
}

/// A rejected request: the reason, the limit that rejected it and when to retry.
///
/// | case | HTTP | gRPC (`content-type: application/grpc*`) |
/// |---|---|---|
/// | missing, malformed, unknown or disabled key | 403 `{"message":"Forbidden"}` | `grpc-status: 16` (UNAUTHENTICATED) |
/// | throttled | 429 `{"message":"Too Many Requests"}`, `Retry-After` | `grpc-status: 8` (RESOURCE_EXHAUSTED), `RetryInfo` and `QuotaFailure` details |
/// | quota used up | 429 (configurable, e.g. 403) `{"message":"Limit Exceeded"}`, `Retry-After` until the window ends | `grpc-status: 8`, `RetryInfo` until the window ends, `QuotaFailure` |
/// | cost larger than a whole limit | 429 `{"message":"Cost Exceeds Limit"}`, `x-should-retry: false` (it never fits; `Retry-After` says when the limit is full again) | `grpc-status: 8`, `QuotaFailure` only, `grpc-retry-pushback-ms: -1` |
/// | store cannot track another key | 429 `{"message":"Too Many Requests"}`, `Retry-After` | `grpc-status: 8`, `RetryInfo`, `QuotaFailure` |
/// | too many requests of the key in flight (plan's `concurrency`) | 429 `{"message":"Too Many Requests"}`, `Retry-After: 1` | `grpc-status: 8`, `RetryInfo`, `QuotaFailure` |
/// | no peer address for [`ClientIp`](crate::extract::ClientIp) | 500 with the fix in the message, `x-should-retry: false` (a configuration mistake: no retry passes) | `grpc-status: 13` (INTERNAL) |
/// | store failed, plan `failure = "closed"` | 503 `{"message":"Service Unavailable"}` | `grpc-status: 14` (UNAVAILABLE) |
/// | key resolver failed or timed out (default [`ResolverFallback`](crate::ResolverFallback)) | 503 `{"message":"Service Unavailable"}` | `grpc-status: 14` (UNAVAILABLE) |
///
/// These are the statuses and bodies of the [`ResponseStyle::Aws`] style (the
/// default); [`ResponseStyle::OpenAi`] answers OpenAI's.
///
/// In every style, a rejection that can pass later carries `Retry-After` (whole
/// seconds, rounded up) and `retry-after-ms` (milliseconds, rounded up: the
/// exact wait, which OpenAI's SDKs read first). A cost larger than a whole
/// limit carries them too, the time until that limit is full again (at
/// least 1 ms: a 429 never says `retry-after: 0`), and
/// `x-should-retry: false`: it can never pass. So does a rejection whose
/// retry lies beyond a bound (default 60 s, see
/// [`max_retry`](crate::RateLimitLayerBuilder::max_retry)): a client should
/// not sleep that long in a retry loop. So does the 500 of a configuration
/// mistake, which OpenAI's SDKs would otherwise retry; a 503 (a failed
/// store or key resolver) may pass on a retry and says nothing of it.
///
/// gRPC rejections are trailers-only: HTTP 200, an empty body, and
/// `grpc-status` / `grpc-message` in the headers. Through the layer, the
/// answer's `content-type` names the request's codec as gRPC servers do
/// (`application/grpc+proto` for `application/grpc+proto`, plain
/// `application/grpc` for a request without a `+` suffix), and gRPC-Web's
/// is the request's own. A limit's rejection also
/// carries `grpc-retry-pushback-ms`, which gRPC's own retry policies obey:
/// the wait in milliseconds, or `-1` (do not retry) where HTTP says
/// `x-should-retry: false`.
///
/// A `grpc-status: 8` rejection also carries `grpc-status-details-bin`, the
/// [richer error model] of gRPC: a `google.rpc.Status` (base64, unpadded)
/// whose details are a `google.rpc.RetryInfo` with the exact retry delay (when
/// the call can pass later) and a `google.rpc.QuotaFailure` with one violation,
/// `subject` the [limit](Self::limit) that denied (`"throttle"`, `"quota"`…)
/// and `description` the [message](Self::message). It never holds a key.
/// Clients read it with, e.g., `tonic_types::StatusExt::get_details_retry_info`.
///
/// [richer error model]: https://grpc.io/docs/guides/error/#richer-error-model
///
/// The default response is built from the rejection; a custom one can be set
/// with [`RateLimitLayerBuilder::on_rejection`](crate::RateLimitLayerBuilder::on_rejection).
/// Either way the rejection is put in the response's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    reason: Reason,
    status: StatusCode,
    limit: Option<&'static str>,
    kind: Option<LimitKind>,
    retry_after: Option<Duration>,
    /// The wait `Retry-After` says: the retry, or for a cost no limit can
    /// ever hold, the time until the limit that refused it is full again.
    wait: Option<Duration>,
    grpc: bool,
    style: ResponseStyle,
    max_retry: Duration,
}

impl Rejection {
    pub(crate) fn key(reason: Reason) -> Self {
        let status = match reason {
            Reason::Key(e) if e.is_configuration() => StatusCode::INTERNAL_SERVER_ERROR,
            Reason::ResolverUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::FORBIDDEN,
        };
        Rejection {
            reason,
            status,
            limit: None,
            kind: None,
            retry_after: None,
            wait: None,
            grpc: false,
            style: ResponseStyle::Aws,
            max_retry: DEFAULT_MAX_RETRY,
        }
    }

    pub(crate) fn unavailable() -> Self {
        Rejection {
            reason: Reason::StoreUnavailable,
            status: StatusCode::SERVICE_UNAVAILABLE,
            limit: None,
            kind: None,
            retry_after: None,
            wait: None,
            grpc: false,
            style: ResponseStyle::Aws,
            max_retry: DEFAULT_MAX_RETRY,
        }
    }

    /// Answers the rejection in `style`, a retry beyond `max_retry` not
    /// worth waiting for.
    pub(crate) fn with_style(mut self, style: ResponseStyle, max_retry: Duration) -> Self {
        self.style = style;
        self.max_retry = max_retry;
        self
    }

    /// Marks the rejection as one of a gRPC call (answered trailers-only).
    pub(crate) fn with_grpc(mut self, grpc: bool) -> Self {
        self.grpc = grpc;
        self
    }

    pub(crate) fn denied(denial: Denial, limit: &Applied, quota_status: StatusCode) -> Self {
        let (reason, retry) = match denial {
            Denial::Limited { retry_after } => (Reason::Limited, Some(retry_after)),
            Denial::Quota { retry_after } => (Reason::QuotaExceeded, Some(retry_after)),
            Denial::TooCostly => (Reason::CostExceedsLimit, None),
            Denial::Capacity { retry_after } => (Reason::KeyCapacity, Some(retry_after)),
            Denial::Concurrency => (
                Reason::ConcurrencyLimited,
                Some(crate::store::CONCURRENCY_RETRY.as_nanos() as u64),
            ),
        };
        let status = match reason {
            Reason::QuotaExceeded => quota_status,
            _ => StatusCode::TOO_MANY_REQUESTS,
        };
        // Never 0, not even for a limit already full: a 429 that says
        // "retry at once" sends a client that reads only `Retry-After`
        // round in a tight loop.
        let wait = retry.unwrap_or(limit.reset).max(1);
        Rejection {
            reason,
            status,
            limit: Some(limit.name()),
            kind: Some(limit.kind()),
            retry_after: retry.map(Duration::from_nanos),
            wait: Some(Duration::from_nanos(wait)),
            grpc: false,
            style: ResponseStyle::Aws,
            max_retry: DEFAULT_MAX_RETRY,
        }
    }

    /// Why the request was rejected.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// The name of the limit that rejected the request (`"throttle"`), if a limit did.
    pub fn limit(&self) -> Option<&'static str> {
        self.limit
    }

    /// The kind of the limit that rejected the request, if a limit did.
    pub fn kind(&self) -> Option<LimitKind> {
        self.kind
    }

    /// How long until the request would pass, if it ever will.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Whether a client should retry: a limit rejected the request, it can
    /// pass later, and no later than the layer's bound on a retry worth
    /// waiting for (default 60 s). The default responses say
    /// `x-should-retry: false` (gRPC: `grpc-retry-pushback-ms: -1`) when a
    /// limit rejected and this is false, and `x-should-retry: false` for a
    /// configuration mistake (a 500 no retry passes).
    ///
    /// ```
    /// use tollgate::{Policy, RateLimitLayer, Throttle, UsagePlan};
    ///
    /// let layer = RateLimitLayer::new(Policy::per_key(
    ///     UsagePlan::new("p").throttle(Throttle::new(1.0, 1)?),
    /// )?);
    /// layer.check(b"k", 1).unwrap();
    /// assert!(layer.check(b"k", 1).unwrap_err().should_retry());
    /// assert!(!layer.check(b"k", 2).unwrap_err().should_retry()); // never fits
    /// # Ok::<(), tollgate::ConfigError>(())
    /// ```
    pub fn should_retry(&self) -> bool {
        self.retry_after.is_some_and(|d| d <= self.max_retry)
    }

    /// Whether the answer says `x-should-retry: false`: no retry can pass
    /// (a configuration mistake, a cost no limit holds) or the retry lies
    /// beyond the bound on one worth waiting for. A failed store or key
    /// resolver (503) may pass on a retry: it says nothing.
    pub(crate) fn says_do_not_retry(&self) -> bool {
        match self.reason {
            Reason::Key(e) => e.is_configuration(),
            _ => self.limit.is_some() && !self.should_retry(),
        }
    }

    /// The wait `Retry-After` says (see [`retry_after_secs`](Self::retry_after_secs)).
    pub(crate) fn wait(&self) -> Option<Duration> {
        self.wait
    }

    /// The style the default response is answered in.
    pub fn style(&self) -> ResponseStyle {
        self.style
    }

    /// Whether the request was a gRPC call.
    pub fn is_grpc(&self) -> bool {
        self.grpc
    }

    /// The HTTP status of the default (non-gRPC) response: 403 for key
    /// problems (401 in the [`OpenAi`](ResponseStyle::OpenAi) style), 429 for
    /// limits (a quota's status is configurable), 500 for a configuration
    /// mistake, 503 for a failed store or key resolver.
    pub fn status(&self) -> StatusCode {
        match self.style {
            ResponseStyle::Aws => self.status,
            ResponseStyle::OpenAi => style::openai_status(self),
        }
    }

    /// The message of the default gRPC response and of the
    /// [`Aws`](ResponseStyle::Aws) style's body.
    pub fn message(&self) -> &'static str {
        match self.reason {
            Reason::Key(KeyError::MissingPeerAddr) => {
                "rate limit misconfigured: peer address unavailable; serve with into_make_service_with_connect_info::<SocketAddr>() or insert the peer SocketAddr as a request extension"
            }
            Reason::Key(_) | Reason::UnknownKey | Reason::DisabledKey => "Forbidden",
            Reason::Limited | Reason::KeyCapacity | Reason::ConcurrencyLimited => {
                "Too Many Requests"
            }
            Reason::QuotaExceeded => "Limit Exceeded",
            Reason::CostExceedsLimit => "Cost Exceeds Limit",
            Reason::StoreUnavailable | Reason::ResolverUnavailable => "Service Unavailable",
        }
    }

    /// The gRPC status code of the default gRPC response.
    pub fn grpc_status(&self) -> u16 {
        match self.reason {
            Reason::Key(e) if e.is_configuration() => 13,
            Reason::Key(_) | Reason::UnknownKey | Reason::DisabledKey => 16,
            Reason::Limited
            | Reason::QuotaExceeded
            | Reason::CostExceedsLimit
            | Reason::KeyCapacity
            | Reason::ConcurrencyLimited => 8,
            Reason::StoreUnavailable | Reason::ResolverUnavailable => 14,
        }
    }

    /// `Retry-After` in whole seconds, rounded up: the
    /// [retry](Self::retry_after), or for a cost larger than a whole limit,
    /// which never passes, the time until that limit is full again.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.wait
            .map(|d| ceil_secs(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)).max(1))
    }

    /// `retry-after-ms`: the wait of [`retry_after_secs`](Self::retry_after_secs)
    /// in milliseconds, rounded up.
    pub fn retry_after_ms(&self) -> Option<u64> {
        self.wait.map(|d| {
            u64::try_from(d.as_nanos().div_ceil(1_000_000))
                .unwrap_or(u64::MAX)
                .max(1)
        })
    }

    /// The default response: JSON in the rejection's [style](ResponseStyle)
    /// for HTTP, trailers-only for gRPC (with `grpc-status-details-bin` and
    /// `grpc-retry-pushback-ms` for limits), `Retry-After` and
    /// `retry-after-ms` when the request can pass later, `WWW-Authenticate`
    /// on a 401 (the [`OpenAi`](ResponseStyle::OpenAi) style's key problems), and
    /// `x-should-retry: false` when a limit rejected it and it
    /// [should not be retried](Self::should_retry) or it is a configuration
    /// mistake (a 500 that no retry passes).
    pub fn default_response(&self) -> Response<Bytes> {
        let mut res = if self.grpc {
            let mut res = Response::new(Bytes::new());
            let h = res.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert(GRPC_STATUS, HeaderValue::from(self.grpc_status()));
            // grpc-message is percent-encoded; our messages are plain ASCII without '%'.
            h.insert(GRPC_MESSAGE, HeaderValue::from_static(self.message()));
            if self.grpc_status() == 8 {
                let details = grpc::details_header(
                    self.grpc_status(),
                    self.message(),
                    self.retry_after,
                    self.limit,
                );
                h.insert(GRPC_STATUS_DETAILS, details);
                h.insert(GRPC_RETRY_PUSHBACK, self.pushback());
            }
            res
        } else {
            let body = match self.style {
                ResponseStyle::Aws => {
                    let mut body = String::with_capacity(self.message().len() + 16);
                    body.push_str("{\"message\":\"");
                    body.push_str(self.message());
                    body.push_str("\"}");
                    body
                }
                ResponseStyle::OpenAi => style::openai_body(self),
            };
            let mut res = Response::new(Bytes::from(body));
            *res.status_mut() = self.status();
            res.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            if res.status() == StatusCode::UNAUTHORIZED {
                res.headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static(self.challenge()));
            }
            res
        };
        let h = res.headers_mut();
        if let (Some(secs), Some(ms)) = (self.retry_after_secs(), self.retry_after_ms()) {
            h.insert(RETRY_AFTER, HeaderValue::from(secs));
            h.insert(RETRY_AFTER_MS, HeaderValue::from(ms));
        }
        if self.says_do_not_retry() {
            h.insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
        }
        res
    }

    /// The `WWW-Authenticate` challenge of a 401, which RFC 9110 requires:
    /// `Bearer` for a request without a key, with RFC 6750's error code for
    /// one whose key is there but cannot be used (two different keys: the
    /// request is malformed; any other: the key is).
    fn challenge(&self) -> &'static str {
        match self.reason {
            Reason::Key(KeyError::Missing) => "Bearer",
            Reason::Key(KeyError::Conflicting) => r#"Bearer error="invalid_request""#,
            _ => r#"Bearer error="invalid_token""#,
        }
    }

    /// `grpc-retry-pushback-ms`: the wait, or `-1` (do not retry).
    fn pushback(&self) -> HeaderValue {
        match self.retry_after_ms() {
            Some(ms) if self.should_retry() => HeaderValue::from(ms),
            _ => HeaderValue::from_static("-1"),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            Reason::Key(e) => write!(f, "rejected: {e}"),
            Reason::UnknownKey => f.write_str("rejected: unknown key"),
            Reason::DisabledKey => f.write_str("rejected: disabled key"),
            Reason::Limited => write!(f, "rejected: {} limit reached", self.limit.unwrap_or("a")),
            Reason::CostExceedsLimit => write!(
                f,
                "rejected: cost exceeds the whole {} limit",
                self.limit.unwrap_or("")
            ),
            Reason::KeyCapacity => f.write_str("rejected: store cannot track another key now"),
            Reason::QuotaExceeded => f.write_str("rejected: quota exceeded"),
            Reason::StoreUnavailable => f.write_str("rejected: rate-limit store unavailable"),
            Reason::ResolverUnavailable => f.write_str("rejected: key resolver unavailable"),
            Reason::ConcurrencyLimited => {
                f.write_str("rejected: too many requests of this key in flight")
            }
        }
    }
}

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const GRPC_STATUS_DETAILS: HeaderName = HeaderName::from_static("grpc-status-details-bin");
const GRPC_RETRY_PUSHBACK: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");
pub(crate) const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
pub(crate) const X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// Builds rejection responses in place of the default one.
///
/// Implemented for closures `Fn(&Rejection) -> http::Response<Bytes>`.
/// Rate-limit headers (and `Retry-After`, unless the closure set it) are added
/// to whatever it returns.
pub trait OnRejection: Send + Sync + 'static {
    /// The response for `rejection`.
    fn response(&self, rejection: &Rejection) -> Response<Bytes>;
}

impl<F> OnRejection for F
where
    F: Fn(&Rejection) -> Response<Bytes> + Send + Sync + 'static,
{
    fn response(&self, rejection: &Rejection) -> Response<Bytes> {
        self(rejection)
    }
}

/// The default rejection responses (see [`Rejection`] for what they are).
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultOnRejection;

impl OnRejection for DefaultOnRejection {
    fn response(&self, rejection: &Rejection) -> Response<Bytes> {
        rejection.default_response()
    }
}

pub(crate) type SharedOnRejection = Arc<dyn OnRejection>;

/// A decision's result: what an allowed request carries (its report, or
/// nothing when nobody reads it), or a refusal.
pub(crate) type Decision<R = Report> = Result<R, Refused>;

/// A refusal: the rejection, and how the limit that rejected stands when
/// one did. Boxed, so that a decision (and the layer's [`Step`]) is a word
/// or two: an allowed request's is moved through several frames, and at 96
/// bytes each move was copied in other pieces than it was written, a
/// store-forwarding stall on every request. A refusal allocates once, on a
/// path that builds a response anyway.
///
/// [`Step`]: crate::layer::Step
pub(crate) type Refused = Box<(Rejection, Option<Applied>)>;

/// A refusal of `rejection`, by `limit` when a limit refused.
#[inline]
pub(crate) fn refused(rejection: Rejection, limit: Option<Applied>) -> Refused {
    Box::new((rejection, limit))
}

/// What an allowed decision carries when a failed store let the request
/// through unchecked.
pub(crate) trait Unchecked {
    fn unchecked() -> Self;

    /// What the request's shadow limits would have denied, when the sink
    /// keeps it.
    fn shadow_denied(&self) -> Option<Denied> {
        None
    }
}

impl Unchecked for Report {
    fn unchecked() -> Self {
        Report::unchecked()
    }

    fn shadow_denied(&self) -> Option<Denied> {
        Report::shadow_denied(self)
    }
}

impl Unchecked for () {
    fn unchecked() -> Self {}
}

/// Whether a request is a gRPC call: `content-type: application/grpc*`
/// (`application/grpc`, `application/grpc+proto`, …), gRPC-Web's
/// (`application/grpc-web`, `application/grpc-web-text+proto`, …) included,
/// whose clients read a trailers-only answer's status from its headers too.
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    /// Whether `rest` ends a type there: nothing, a `+` suffix or a `;`
    /// parameter.
    fn ends(rest: &[u8]) -> bool {
        matches!(rest.first(), None | Some(b'+' | b';'))
    }
    /// `rest` with `prefix` (in any case) taken off its front.
    fn strip<'a>(rest: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
        let head = rest.get(..prefix.len())?;
        head.eq_ignore_ascii_case(prefix)
            .then(|| &rest[prefix.len()..])
    }
    headers.get(CONTENT_TYPE).is_some_and(|v| {
        let Some(rest) = strip(v.as_bytes(), b"application/grpc") else {
            return false;
        };
        // `application/grpc`, then gRPC-Web's `-web` and `-web-text`: a
        // type that only begins so (`application/grpc-webx`) is another.
        ends(rest)
            || strip(rest, b"-web")
                .is_some_and(|web| ends(web) || strip(web, b"-text").is_some_and(ends))
    })
}

/// The content type of a trailers-only answer to a gRPC call with these
/// headers, when it is not plain `application/grpc`: gRPC-Web's own as the
/// request sent it, so that a gRPC-Web client reads the answer as its own
/// protocol; or `application/grpc+` the request's codec (`+proto`,
/// `+json`, lower-cased, parameters left out), as gRPC servers answer.
/// Built only for a rejection.
pub(crate) fn grpc_answer_type(headers: &HeaderMap) -> Option<HeaderValue> {
    const BASE: &[u8] = b"application/grpc";
    let v = headers.get(CONTENT_TYPE)?;
    let bytes = v.as_bytes();
    if bytes
        .get(..20)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"application/grpc-web"))
    {
        return Some(v.clone());
    }
    let rest = bytes
        .get(..BASE.len())
        .filter(|p| p.eq_ignore_ascii_case(BASE))
        .and_then(|_| bytes[BASE.len()..].strip_prefix(b"+"))?;
    let end = rest.iter().position(|&b| b == b';').unwrap_or(rest.len());
    let codec = rest[..end].trim_ascii();
    let token = |b: &u8| b.is_ascii_alphanumeric() || b"-._".contains(b);
    if codec.is_empty() || !codec.iter().all(token) {
        return None;
    }
    let mut out = Vec::with_capacity(BASE.len() + 1 + codec.len());
    out.extend_from_slice(BASE);
    out.push(b'+');
    out.extend(codec.iter().map(u8::to_ascii_lowercase));
    HeaderValue::from_bytes(&out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gcra::{NANOS_PER_SEC, Nanos};
    use crate::store::Report;

    fn report(items: &[(&'static str, u64, u64, u64, Nanos)]) -> Report {
        let mut r = Report::default();
        for &(name, quota, window_secs, remaining, reset) in items {
            r.push(Applied {
                kind: crate::store::LimitKind::named(name),
                quota,
                window_secs,
                remaining,
                reset,
            });
        }
        r
    }

    #[test]
    fn retry_after_rounds_up() {
        let mut r = Rejection::denied(
            Denial::Limited {
                retry_after: 1_000_000_001,
            },
            &report(&[("throttle", 5, 3, 0, 0)]).items()[0],
            StatusCode::TOO_MANY_REQUESTS,
        );
        assert_eq!(r.retry_after_secs(), Some(2));
        r.retry_after = Some(Duration::from_nanos(1));
        r.wait = r.retry_after;
        assert_eq!(r.retry_after_secs(), Some(1));
        let res = r.default_response();
        assert_eq!(res.status(), 429);
        assert_eq!(res.headers()["retry-after"], "1");
        assert_eq!(res.body(), r#"{"message":"Too Many Requests"}"#);
    }

    /// A cost no limit can ever hold is answered, by a rejection's own
    /// response as through the layer, with `Retry-After` and
    /// `retry-after-ms` saying when the limit is full again (every 429
    /// carries them) and `x-should-retry: false`; its `retry_after` stays
    /// `None`: it never passes.
    #[test]
    fn a_cost_that_never_fits_says_when_the_limit_is_full_again() {
        use crate::{ManualClock, MemoryStore, Policy, RateLimitLayer, Throttle, UsagePlan};

        let clock = ManualClock::new();
        let store = MemoryStore::builder().clock(clock.clone()).build().unwrap();
        let plan = UsagePlan::new("p").throttle(Throttle::new(0.4, 2).unwrap());
        let layer = RateLimitLayer::builder(Policy::per_key(plan).unwrap())
            .store(store)
            .build();
        // Full: 3 never fits a bucket of 2, which is full now (at least 1 ms).
        let r = layer.check(b"k", 3).unwrap_err();
        assert_eq!(r.reason(), Reason::CostExceedsLimit);
        assert_eq!(r.retry_after(), None);
        assert!(!r.should_retry());
        assert_eq!(
            (r.retry_after_secs(), r.retry_after_ms()),
            (Some(1), Some(1))
        );
        // One used: full again in 2.5 s.
        layer.check(b"k", 1).unwrap();
        let r = layer.check(b"k", 3).unwrap_err();
        assert_eq!(
            (r.retry_after_secs(), r.retry_after_ms()),
            (Some(3), Some(2_500))
        );
        for grpc in [false, true] {
            let res = r.clone().with_grpc(grpc).default_response();
            assert_eq!(res.headers()["retry-after"], "3", "grpc {grpc}");
            assert_eq!(res.headers()["retry-after-ms"], "2500", "grpc {grpc}");
            if grpc {
                assert_eq!(res.headers()["grpc-retry-pushback-ms"], "-1");
            } else {
                assert_eq!(res.status(), 429);
                assert_eq!(res.headers()["x-should-retry"], "false");
            }
        }
    }

    /// A configuration mistake (no peer address for `ClientIp`) is a 500
    /// that no retry can pass: it says `x-should-retry: false`, in every
    /// style, since OpenAI's SDKs retry a 500. A failed store or resolver
    /// (503) may pass on a retry, and says nothing of it.
    #[test]
    fn a_configuration_mistake_says_do_not_retry_and_an_outage_does_not() {
        let mistake = Rejection::key(Reason::Key(KeyError::MissingPeerAddr));
        for style in [ResponseStyle::Aws, ResponseStyle::OpenAi] {
            for grpc in [false, true] {
                let res = mistake
                    .clone()
                    .with_style(style, DEFAULT_MAX_RETRY)
                    .with_grpc(grpc)
                    .default_response();
                if !grpc {
                    assert_eq!(res.status(), 500, "{style:?}");
                }
                assert_eq!(res.headers()["x-should-retry"], "false", "{style:?} {grpc}");
            }
        }
        for outage in [
            Rejection::unavailable(),
            Rejection::key(Reason::ResolverUnavailable),
        ] {
            for style in [ResponseStyle::Aws, ResponseStyle::OpenAi] {
                let res = outage
                    .clone()
                    .with_style(style, DEFAULT_MAX_RETRY)
                    .default_response();
                assert_eq!(res.status(), 503, "{style:?}");
                assert!(res.headers().get("x-should-retry").is_none(), "{style:?}");
            }
        }
    }

    #[test]
    fn grpc_rejections_are_trailers_only() {
        let r = Rejection::denied(
            Denial::Limited {
                retry_after: NANOS_PER_SEC,
            },
            &Applied::default(),
            StatusCode::TOO_MANY_REQUESTS,
        )
        .with_grpc(true);
        let res = r.default_response();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["grpc-status"], "8");
        assert_eq!(res.headers()["content-type"], "application/grpc");
        assert!(res.body().is_empty());
        let k = Rejection::key(Reason::UnknownKey)
            .with_grpc(true)
            .default_response();
        assert_eq!(k.headers()["grpc-status"], "16");
        assert!(!k.headers().contains_key("grpc-status-details-bin"));
    }

    #[test]
    fn grpc_limit_rejections_carry_retry_info_and_the_limit() {
        use tonic_types::StatusExt;

        let r = Rejection::denied(
            Denial::Quota {
                retry_after: 90 * NANOS_PER_SEC + 250_000_000,
            },
            &report(&[("quota", 1000, 86_400, 0, 0)]).items()[0],
            StatusCode::TOO_MANY_REQUESTS,
        )
        .with_grpc(true);
        let res = r.default_response();
        assert!(!res.headers()["grpc-status-details-bin"].is_empty());
        // Read back as a tonic client reads a trailers-only response.
        let status = tonic::Status::from_header_map(res.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        let details = status.check_error_details().unwrap();
        let retry = details.retry_info().unwrap();
        assert_eq!(retry.retry_delay, Some(Duration::new(90, 250_000_000)));
        let violations = &details.quota_failure().unwrap().violations;
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].subject, "quota");
        assert_eq!(violations[0].description, "Limit Exceeded");

        // A cost that never fits has no retry delay, only the limit.
        let r = Rejection::denied(
            Denial::TooCostly,
            &report(&[("tokens-minute", 100, 60, 100, 0)]).items()[0],
            StatusCode::TOO_MANY_REQUESTS,
        )
        .with_grpc(true);
        let status = tonic::Status::from_header_map(r.default_response().headers()).unwrap();
        let details = status.check_error_details().unwrap();
        assert!(details.retry_info().is_none());
        assert_eq!(
            details.quota_failure().unwrap().violations[0].subject,
            "tokens-minute"
        );

        // Plain HTTP rejections do not carry it.
        let http = r.clone().with_grpc(false).default_response();
        assert!(!http.headers().contains_key("grpc-status-details-bin"));
    }

    #[test]
    fn grpc_answers_name_the_requests_codec() {
        let mut h = HeaderMap::new();
        for (ct, answer) in [
            ("application/grpc", None),
            ("application/grpc;charset=utf-8", None),
            ("application/grpc+", None),
            ("application/grpc+;x=1", None),
            ("application/grpc+a\"b", None),
            ("application/grpc+proto", Some("application/grpc+proto")),
            ("APPLICATION/GRPC+JSON", Some("application/grpc+json")),
            (
                "application/grpc+my-codec.v2 ; q=1",
                Some("application/grpc+my-codec.v2"),
            ),
            ("application/grpc-web", Some("application/grpc-web")),
            (
                "application/grpc-web-text+proto",
                Some("application/grpc-web-text+proto"),
            ),
            ("application/json", None),
        ] {
            h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
            let got = grpc_answer_type(&h);
            assert_eq!(got.as_ref().map(|v| v.to_str().unwrap()), answer, "{ct}");
        }
        assert_eq!(grpc_answer_type(&HeaderMap::new()), None);
    }

    #[test]
    fn grpc_detection() {
        let mut h = HeaderMap::new();
        for (ct, grpc) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("Application/GRPC", true),
            ("application/grpc-web", true),
            ("application/grpc-web+proto", true),
            ("application/grpc-web-text", true),
            ("application/grpc-web-text+proto", true),
            ("application/grpc; charset=utf-8", true),
            ("application/grpc-webx", false),
            ("application/grpc-web-textual", false),
            ("application/grpc-foo", false),
            ("application/grpc-", false),
            ("application/grpcx", false),
            ("application/grp", false),
            ("application/json", false),
        ] {
            h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(is_grpc(&h), grpc, "{ct}");
        }
    }
}
