//! A token-metered endpoint for tests of reservations and settlement: the
//! estimate is a request's `x-estimate` header, and the service reports its
//! `x-actual` header as the tokens the response used.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use tollgate::TokenUsage;
use tollgate::extract::RequestView;

/// The estimate: the `x-estimate` header, else 0 tokens.
pub fn estimate(r: &RequestView<'_>) -> u32 {
    r.headers
        .get("x-estimate")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0)
}

/// The service behind the layer: reports the `x-actual` header, if any, as
/// the tokens its response used, and answers `done`.
pub async fn report_actual(
    req: http::Request<tollgate::RequestBody<String>>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    report_usage(&req);
    Ok(http::Response::new(Full::new(Bytes::from_static(b"done"))))
}

/// Reports the request's `x-actual` header, if any, as the tokens it used,
/// as a handler does through the `TokenUsage` extension.
pub fn report_usage<B>(req: &http::Request<B>) {
    let actual = req
        .headers()
        .get("x-actual")
        .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
    if let (Some(n), Some(usage)) = (actual, req.extensions().get::<TokenUsage>()) {
        usage.set(n);
    }
}

/// A request of API key `key` estimated at `estimate` tokens that uses
/// `actual` (none reported without it).
pub fn request(key: &str, estimate: u32, actual: Option<u64>) -> http::Request<String> {
    let mut req = http::Request::builder()
        .header("x-api-key", key)
        .header("x-estimate", estimate.to_string());
    if let Some(a) = actual {
        req = req.header("x-actual", a.to_string());
    }
    req.body(String::new()).unwrap()
}
