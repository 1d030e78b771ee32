//! Response styles: the statuses and bodies of rejections, as AWS API
//! Gateway answers them or as OpenAI's API does.

use std::fmt::Write;

use http::StatusCode;

use super::{Reason, Rejection};
use crate::extract::KeyError;
use crate::headers::Family;

/// How rejections are answered: their statuses and bodies.
///
/// | case | [`Aws`](Self::Aws) (the default) | [`OpenAi`](Self::OpenAi) |
/// |---|---|---|
/// | missing, malformed, unknown or disabled key | 403 `{"message":"Forbidden"}` | 401, `type` `invalid_request_error`, `code` `invalid_api_key`, and a `WWW-Authenticate: Bearer` challenge (with `error="invalid_token"` when a key was sent, `error="invalid_request"` for two different keys) |
/// | throttle, token budget, concurrency cap | 429 `{"message":"Too Many Requests"}` | 429, `type` `requests` or `tokens` (the family of the limit that denied), `code` `rate_limit_exceeded` |
/// | cost above a whole limit | 429 `{"message":"Cost Exceeds Limit"}` | as a throttle's, with `x-should-retry: false` |
/// | quota used up (requests or tokens) | 429 (configurable) `{"message":"Limit Exceeded"}` | the same status, `type` and `code` `insufficient_quota` |
/// | store or key resolver unavailable | 503 `{"message":"Service Unavailable"}` | 503, `type` `server_error`, `code` `service_unavailable` |
/// | no peer address (a configuration mistake) | 500 with the fix in the message, `x-should-retry: false` | 500, `type` `server_error`, `code` `configuration_error`, `x-should-retry: false` |
///
/// An OpenAI-style body is what OpenAI's SDKs decode into their error type:
///
/// ```json
/// {"error":{"message":"Rate limit reached for requests (throttle)","type":"requests","param":null,"code":"rate_limit_exceeded"}}
/// ```
///
/// so that a client can tell a rate limit, which passes after a wait, from a
/// used-up quota, which does not until its window renews. gRPC calls are
/// answered trailers-only in either style (see [`Rejection`]).
///
/// ```
/// use tollgate::{Policy, RateLimitLayer, ResponseStyle, Throttle, UsagePlan};
///
/// let policy = Policy::per_key(UsagePlan::new("p").throttle(Throttle::new(1.0, 1)?))?;
/// let layer = RateLimitLayer::builder(policy)
///     .style(ResponseStyle::OpenAi)
///     .build();
/// # Ok::<(), tollgate::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResponseStyle {
    /// AWS API Gateway's statuses and `{"message":…}` bodies.
    #[default]
    Aws,
    /// OpenAI's statuses and `{"error":{…}}` bodies.
    OpenAi,
}

impl ResponseStyle {
    /// The style's name in configuration: `"aws"` or `"openai"`.
    pub fn name(self) -> &'static str {
        match self {
            ResponseStyle::Aws => "aws",
            ResponseStyle::OpenAi => "openai",
        }
    }

    /// The style named `name` (`"aws"`, `"openai"`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "aws" => Some(ResponseStyle::Aws),
            "openai" => Some(ResponseStyle::OpenAi),
            _ => None,
        }
    }
}

/// The OpenAI-style status of `r`: 401 for key problems, otherwise the status
/// of the AWS style.
pub(super) fn openai_status(r: &Rejection) -> StatusCode {
    match r.reason {
        Reason::Key(e) if e.is_configuration() => StatusCode::INTERNAL_SERVER_ERROR,
        Reason::Key(_) | Reason::UnknownKey | Reason::DisabledKey => StatusCode::UNAUTHORIZED,
        _ => r.status,
    }
}

/// The OpenAI-style body of `r`.
pub(super) fn openai_body(r: &Rejection) -> String {
    let family = match r.kind.map(Family::of) {
        Some(Family::Tokens) => "tokens",
        _ => "requests",
    };
    let limit = r.limit.unwrap_or("key");
    let mut message = String::with_capacity(96);
    let (kind, code) = match r.reason {
        Reason::Key(KeyError::MissingPeerAddr) => {
            message.push_str(r.message());
            ("server_error", "configuration_error")
        }
        Reason::Key(KeyError::Missing) => {
            message.push_str("You didn't provide an API key. Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.");
            ("invalid_request_error", "invalid_api_key")
        }
        Reason::Key(KeyError::Conflicting) => {
            message.push_str("Two different API keys were provided ('Authorization: Bearer' and 'x-api-key'). Send one.");
            ("invalid_request_error", "invalid_api_key")
        }
        Reason::Key(_) => {
            message.push_str("Malformed API key provided.");
            ("invalid_request_error", "invalid_api_key")
        }
        Reason::UnknownKey => {
            message.push_str("Incorrect API key provided.");
            ("invalid_request_error", "invalid_api_key")
        }
        Reason::DisabledKey => {
            message.push_str("This API key is disabled.");
            ("invalid_request_error", "invalid_api_key")
        }
        Reason::Limited | Reason::KeyCapacity => {
            let _ = write!(message, "Rate limit reached for {family} ({limit}).");
            (family, "rate_limit_exceeded")
        }
        Reason::ConcurrencyLimited => {
            let _ = write!(
                message,
                "Too many requests of this key in flight ({limit})."
            );
            (family, "rate_limit_exceeded")
        }
        Reason::CostExceedsLimit => {
            let _ = write!(
                message,
                "Request too large: it costs more {family} than the whole {limit} limit holds."
            );
            (family, "rate_limit_exceeded")
        }
        Reason::QuotaExceeded => {
            let _ = write!(
                message,
                "You exceeded your current quota of {family} ({limit})."
            );
            ("insufficient_quota", "insufficient_quota")
        }
        Reason::StoreUnavailable | Reason::ResolverUnavailable => {
            message.push_str("The service is temporarily unavailable. Retry later.");
            ("server_error", "service_unavailable")
        }
    };
    let mut body = String::with_capacity(message.len() + 80);
    body.push_str("{\"error\":{\"message\":");
    json_string(&mut body, &message);
    body.push_str(",\"type\":\"");
    body.push_str(kind);
    body.push_str("\",\"param\":null,\"code\":\"");
    body.push_str(code);
    body.push_str("\"}}");
    body
}

/// Appends `s` as a JSON string.
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in [ResponseStyle::Aws, ResponseStyle::OpenAi] {
            assert_eq!(ResponseStyle::from_name(s.name()), Some(s));
        }
        assert_eq!(ResponseStyle::from_name("OpenAI"), None);
        assert_eq!(ResponseStyle::default(), ResponseStyle::Aws);
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut out = String::new();
        json_string(&mut out, "a\"b\\c\n");
        assert_eq!(out, r#""a\"b\\c\u000a""#);
    }
}
