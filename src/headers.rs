//! Rate-limit headers: the IETF draft `RateLimit-Policy` / `RateLimit`, and
//! the legacy `X-RateLimit-*`.

use std::fmt::{self, Write as _};

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::gcra::{NANOS_PER_SEC, Nanos};
use crate::store::Report;

const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Which rate-limit headers responses carry.
///
/// By default, the IETF draft headers (`draft-ietf-httpapi-ratelimit-headers`):
///
/// ```text
/// RateLimit-Policy: "throttle";q=5;w=3
/// RateLimit: "throttle";r=4;t=1
/// ```
///
/// `q` is the limit's size (a throttle's burst), `w` its window in seconds (the
/// time an empty bucket takes to refill), `r` the units left and `t` the seconds
/// until the limit is full again. `RateLimit-Policy` lists every limit that
/// applied; `RateLimit` shows the tightest one. The legacy
/// `X-RateLimit-Limit` / `-Remaining` / `-Reset` (seconds) can be added, and
/// all can be turned off.
///
/// ```
/// use tollgate::HeaderStyle;
///
/// let style = HeaderStyle::ietf().x_ratelimit(true);
/// assert!(style.has_ietf() && style.has_x_ratelimit());
/// assert!(!HeaderStyle::none().has_ietf());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderStyle {
    ietf: bool,
    x_ratelimit: bool,
}

impl HeaderStyle {
    /// The IETF draft `RateLimit-Policy` and `RateLimit` headers (the default).
    pub const fn ietf() -> Self {
        HeaderStyle {
            ietf: true,
            x_ratelimit: false,
        }
    }

    /// No rate-limit headers at all (`Retry-After` is still sent on rejections).
    pub const fn none() -> Self {
        HeaderStyle {
            ietf: false,
            x_ratelimit: false,
        }
    }

    /// Turns the IETF headers on or off.
    #[must_use]
    pub const fn with_ietf(mut self, on: bool) -> Self {
        self.ietf = on;
        self
    }

    /// Turns `X-RateLimit-Limit`, `-Remaining` and `-Reset` on or off.
    #[must_use]
    pub const fn x_ratelimit(mut self, on: bool) -> Self {
        self.x_ratelimit = on;
        self
    }

    /// Whether the IETF headers are sent.
    pub const fn has_ietf(&self) -> bool {
        self.ietf
    }

    /// Whether the `X-RateLimit-*` headers are sent.
    pub const fn has_x_ratelimit(&self) -> bool {
        self.x_ratelimit
    }

    /// Writes the headers for `report` into `headers`.
    pub(crate) fn write(&self, report: &Report, headers: &mut HeaderMap) {
        let Some(tight) = report.tightest() else {
            return;
        };
        if self.ietf {
            let mut buf = HeaderBuf::new();
            for (i, a) in report.items().iter().enumerate() {
                let sep = if i == 0 { "" } else { ", " };
                let _ = write!(buf, "{sep}\"{}\";q={};w={}", a.name, a.quota, a.window_secs);
            }
            if let Some(v) = buf.value() {
                headers.insert(RATELIMIT_POLICY, v);
            }
            let mut buf = HeaderBuf::new();
            let _ = write!(
                buf,
                "\"{}\";r={};t={}",
                tight.name,
                tight.remaining,
                ceil_secs(tight.reset)
            );
            if let Some(v) = buf.value() {
                headers.insert(RATELIMIT, v);
            }
        }
        if self.x_ratelimit {
            headers.insert(X_LIMIT, HeaderValue::from(tight.quota));
            headers.insert(X_REMAINING, HeaderValue::from(tight.remaining));
            headers.insert(X_RESET, HeaderValue::from(ceil_secs(tight.reset)));
        }
    }
}

impl Default for HeaderStyle {
    fn default() -> Self {
        HeaderStyle::ietf()
    }
}

pub(crate) fn ceil_secs(n: Nanos) -> u64 {
    n.div_ceil(NANOS_PER_SEC)
}

/// A small stack buffer for formatting a header value without a `String`.
struct HeaderBuf {
    buf: [u8; 256],
    len: usize,
    overflow: bool,
}

impl HeaderBuf {
    fn new() -> Self {
        HeaderBuf {
            buf: [0; 256],
            len: 0,
            overflow: false,
        }
    }

    fn value(&self) -> Option<HeaderValue> {
        if self.overflow {
            return None;
        }
        HeaderValue::from_bytes(&self.buf[..self.len]).ok()
    }
}

impl fmt::Write for HeaderBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            self.overflow = true;
            return Err(fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Applied;

    fn report(items: &[(&'static str, u64, u64, u64, Nanos)]) -> Report {
        let mut r = Report::default();
        for &(name, quota, window_secs, remaining, reset) in items {
            r.push(Applied {
                name,
                quota,
                window_secs,
                remaining,
                reset,
            });
        }
        r
    }

    #[test]
    fn ietf_headers_list_every_limit_and_show_the_tightest() {
        let r = report(&[
            ("throttle", 5, 3, 4, 500_000_000),
            ("quota", 1000, 86_400, 2, 3_600 * NANOS_PER_SEC),
        ]);
        let mut h = HeaderMap::new();
        HeaderStyle::ietf().x_ratelimit(true).write(&r, &mut h);
        assert_eq!(
            h["ratelimit-policy"],
            "\"throttle\";q=5;w=3, \"quota\";q=1000;w=86400"
        );
        assert_eq!(h["ratelimit"], "\"quota\";r=2;t=3600");
        assert_eq!(h["x-ratelimit-limit"], "1000");
        assert_eq!(h["x-ratelimit-remaining"], "2");
        assert_eq!(h["x-ratelimit-reset"], "3600");
        let mut h = HeaderMap::new();
        HeaderStyle::none().write(&r, &mut h);
        assert!(h.is_empty());
    }
}
