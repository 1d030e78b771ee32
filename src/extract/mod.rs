//! Key extractors: which caller a request belongs to.
//!
//! A [`KeyExtractor`] looks at a request and returns the [`Key`] its limits are
//! counted under, or a [`KeyError`] that the layer turns into a clean rejection
//! (403 for key problems, 500 with an explanation for a configuration mistake
//! such as a missing peer address). Extractors never allocate for the common
//! cases: a header key borrows the header's bytes, a client IP is kept inline.
//!
//! | extractor | key |
//! |---|---|
//! | [`ApiKeyHeader`] | the `x-api-key` header (name configurable) |
//! | [`Bearer`] | the token of `Authorization: Bearer <token>` |
//! | [`BearerOrApiKey`] | either of them, as OpenAI's clients send keys |
//! | [`ExtensionKey`] | a request extension set by an upstream auth layer |
//! | [`ClientIp`] | the peer address, through trusted proxies only |
//! | [`GlobalKey`] | one key shared by every request |
//! | any `Fn(&RequestView<'_>) -> Result<Key<'static>, KeyError>` | whatever the closure returns |

mod extension;
mod header;
mod ip;

use std::fmt;

use http::{Extensions, HeaderMap, Method, Uri};

pub use self::extension::ExtensionKey;
pub use self::header::{ApiKeyHeader, Bearer, BearerOrApiKey};
pub use self::ip::{ClientIp, ForwardedHeader};

/// The longest key accepted by the built-in extractors unless configured otherwise, in bytes.
pub const DEFAULT_MAX_KEY_LEN: usize = 256;

/// A borrowed view of the parts of a request an extractor may read.
///
/// It is built from a `&http::Request<B>` without copying anything, so that
/// extractors (and closures) need not be generic over the body type.
///
/// Its `Debug` shows the method, the path and the names of the headers,
/// never header values or the query, which may hold keys.
#[derive(Clone, Copy)]
#[non_exhaustive]
pub struct RequestView<'a> {
    /// The request method.
    pub method: &'a Method,
    /// The request URI.
    pub uri: &'a Uri,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The request extensions (peer address, upstream auth results, matched path).
    pub extensions: &'a Extensions,
}

impl fmt::Debug for RequestView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Names<'h>(&'h HeaderMap);
        impl fmt::Debug for Names<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list().entries(self.0.keys()).finish()
            }
        }
        f.debug_struct("RequestView")
            .field("method", self.method)
            .field("path", &self.uri.path())
            .field("headers", &Names(self.headers))
            .finish_non_exhaustive()
    }
}

impl<'a> RequestView<'a> {
    /// Borrows the parts of `req` that extractors read.
    pub fn new<B>(req: &'a http::Request<B>) -> Self {
        Self {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            extensions: req.extensions(),
        }
    }
}

const INLINE: usize = 17;

#[derive(Clone)]
enum Repr<'a> {
    Borrowed(&'a [u8]),
    Inline { len: u8, buf: [u8; INLINE] },
    Owned(Box<[u8]>),
}

/// The identity a request is limited under: opaque bytes.
///
/// Keys are compared by their bytes. The bytes are hashed with a keyed
/// (DoS-resistant) hash before they reach a store, and never appear in a
/// response, a debug print or a log line: `Debug` prints only the length.
#[derive(Clone)]
pub struct Key<'a> {
    repr: Repr<'a>,
}

impl<'a> Key<'a> {
    /// A key that borrows its bytes, e.g. from a header value.
    pub const fn borrowed(bytes: &'a [u8]) -> Self {
        Self {
            repr: Repr::Borrowed(bytes),
        }
    }

    /// The bytes of the key.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        match &self.repr {
            Repr::Borrowed(b) => b,
            Repr::Inline { len, buf } => &buf[..usize::from(*len)],
            Repr::Owned(b) => b,
        }
    }

    /// Turns the key into one that owns its bytes.
    pub fn into_owned(self) -> Key<'static> {
        match self.repr {
            Repr::Borrowed(b) => Key::owned(b.to_vec()),
            Repr::Inline { len, buf } => Key {
                repr: Repr::Inline { len, buf },
            },
            Repr::Owned(b) => Key {
                repr: Repr::Owned(b),
            },
        }
    }
}

impl Key<'static> {
    /// A key that owns its bytes (short ones are kept inline, without allocating).
    pub fn owned(bytes: impl Into<Vec<u8>>) -> Self {
        let bytes = bytes.into();
        if bytes.len() <= INLINE {
            let mut buf = [0; INLINE];
            buf[..bytes.len()].copy_from_slice(&bytes);
            Key {
                repr: Repr::Inline {
                    len: bytes.len() as u8,
                    buf,
                },
            }
        } else {
            Key {
                repr: Repr::Owned(bytes.into_boxed_slice()),
            }
        }
    }

    /// A key for a client address, kept inline (4 or 16 address bytes and a tag).
    pub fn ip(addr: std::net::IpAddr) -> Self {
        let mut buf = [0; INLINE];
        let len = match addr {
            std::net::IpAddr::V4(v4) => {
                buf[0] = 4;
                buf[1..5].copy_from_slice(&v4.octets());
                5
            }
            std::net::IpAddr::V6(v6) => {
                buf[0] = 6;
                buf[1..17].copy_from_slice(&v6.octets());
                17
            }
        };
        Key {
            repr: Repr::Inline { len, buf },
        }
    }

    /// The one key shared by every request (see [`GlobalKey`]).
    pub const fn global() -> Self {
        Key {
            repr: Repr::Inline {
                len: 0,
                buf: [0; INLINE],
            },
        }
    }
}

impl fmt::Debug for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the bytes: a key may be a secret API key.
        f.debug_struct("Key")
            .field("len", &self.as_bytes().len())
            .finish_non_exhaustive()
    }
}

impl PartialEq for Key<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Key<'_> {}

/// Why no key could be taken from a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The request carries no key (no header, no extension).
    Missing,
    /// The key is present but empty.
    Empty,
    /// The key is not valid UTF-8 / visible ASCII, or is otherwise malformed.
    Malformed,
    /// The key is longer than the configured maximum.
    TooLong,
    /// The peer address is not available: the server was not started with
    /// connection info (for axum: `into_make_service_with_connect_info::<SocketAddr>()`;
    /// for hyper or tonic: insert the peer `SocketAddr` as a request extension).
    /// This is a configuration mistake, answered with a 500 that says so.
    MissingPeerAddr,
    /// The request carries two different keys (e.g. `Authorization: Bearer`
    /// and `x-api-key`, see [`BearerOrApiKey`]): answered as an invalid key
    /// rather than guessing which credential the client meant.
    Conflicting,
}

impl KeyError {
    /// Whether this error is a server configuration mistake rather than a client problem.
    pub fn is_configuration(&self) -> bool {
        matches!(self, KeyError::MissingPeerAddr)
    }
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyError::Missing => "no key in request",
            KeyError::Empty => "empty key",
            KeyError::Malformed => "malformed key",
            KeyError::TooLong => "key too long",
            KeyError::Conflicting => "two different keys in request",
            KeyError::MissingPeerAddr => {
                "peer address unavailable: serve with connect info (axum: into_make_service_with_connect_info::<SocketAddr>()) or insert the peer SocketAddr as a request extension"
            }
        })
    }
}

impl std::error::Error for KeyError {}

/// Takes the rate-limit key from a request.
///
/// Implemented by the extractors of this module and by closures
/// `Fn(&RequestView<'_>) -> Result<Key<'static>, KeyError>`.
///
/// ```
/// use tollgate::extract::{Key, KeyError, KeyExtractor, RequestView};
///
/// // Limit per tenant, taken from a header set by an upstream proxy.
/// let tenant = |req: &RequestView<'_>| -> Result<Key<'static>, KeyError> {
///     let v = req.headers.get("x-tenant").ok_or(KeyError::Missing)?;
///     Ok(Key::owned(v.as_bytes()))
/// };
/// let req = http::Request::builder().header("x-tenant", "acme").body(()).unwrap();
/// let key = tenant.extract(&RequestView::new(&req)).unwrap();
/// assert_eq!(key.as_bytes(), b"acme");
/// ```
pub trait KeyExtractor: Send + Sync + 'static {
    /// Returns the key of `req`, borrowing from it where possible.
    fn extract<'r>(&self, req: &RequestView<'r>) -> Result<Key<'r>, KeyError>;
}

impl<F> KeyExtractor for F
where
    F: Fn(&RequestView<'_>) -> Result<Key<'static>, KeyError> + Send + Sync + 'static,
{
    fn extract<'r>(&self, req: &RequestView<'r>) -> Result<Key<'r>, KeyError> {
        self(req)
    }
}

/// One key for every request: a limit shared by all callers together.
#[derive(Debug, Clone, Copy, Default)]
pub struct GlobalKey;

impl KeyExtractor for GlobalKey {
    fn extract<'r>(&self, _req: &RequestView<'r>) -> Result<Key<'r>, KeyError> {
        Ok(Key::global())
    }
}

/// Checks a key's bytes against the rules shared by the built-in extractors:
/// non-empty, at most `max_len` bytes, visible ASCII only (what HTTP header
/// values and API keys are made of).
pub(crate) fn validate(bytes: &[u8], max_len: usize) -> Result<&[u8], KeyError> {
    if bytes.is_empty() {
        return Err(KeyError::Empty);
    }
    if bytes.len() > max_len {
        return Err(KeyError::TooLong);
    }
    if !visible(bytes) {
        return Err(KeyError::Malformed);
    }
    Ok(bytes)
}

/// Whether every byte is visible ASCII (`0x21..=0x7e`).
///
/// Eight bytes at a time, in a word: keys are short (a dozen to a few
/// dozen bytes), where a vectorized loop spends more on its set-up and
/// its byte-by-byte tail than on the bytes. The last word overlaps the one
/// before it rather than leave a tail; a key shorter than a word is
/// checked byte by byte.
#[inline]
fn visible(bytes: &[u8]) -> bool {
    /// A word's bytes that are not visible ASCII, as their top bits.
    #[inline(always)]
    fn invisible(chunk: &[u8]) -> u64 {
        const LOW: u64 = 0x7f7f_7f7f_7f7f_7f7f;
        const ONES: u64 = 0x0101_0101_0101_0101;
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        // Each byte's low seven bits, so that no sum below carries into
        // the next byte.
        let low = x & LOW;
        // Top bit set: at least 0x21 in the low seven bits.
        let at_least_0x21 = low + 0x5f * ONES;
        // Top bit set: the low seven bits are 0x7f.
        let is_0x7f = low + ONES;
        // Invalid: the top bit of the byte itself (0x80 and above), below
        // 0x21, or 0x7f.
        (x | !at_least_0x21 | is_0x7f) & !LOW
    }
    let n = bytes.len();
    if n < 8 {
        return bytes.iter().all(|b| (0x21..0x7f).contains(b));
    }
    let mut bad = 0;
    let mut at = 0;
    while at + 8 < n {
        bad |= invisible(&bytes[at..at + 8]);
        at += 8;
    }
    bad |= invisible(&bytes[n - 8..]);
    bad == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte value, at every place of keys of every length up to a few
    /// words, is told visible or not as a byte-by-byte check tells it.
    #[test]
    fn visible_agrees_with_a_byte_by_byte_check() {
        let by_byte = |k: &[u8]| k.iter().all(|b| (0x21..0x7f).contains(b));
        for len in 1..=33 {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut key = vec![b'k'; len];
                    key[at] = b;
                    assert_eq!(visible(&key), by_byte(&key), "{len} {at} {b:#x}");
                }
            }
        }
        assert!(visible(b""));
        assert_eq!(validate(b"key-00004242", 256), Ok(&b"key-00004242"[..]));
        assert_eq!(validate(b"key-0000 4242", 256), Err(KeyError::Malformed));
    }

    #[test]
    fn request_view_debug_shows_no_header_value_and_no_query() {
        let req = http::Request::post("/v1/items?api_key=secret-in-query")
            .header("x-api-key", "secret-in-header")
            .header("authorization", "Bearer secret-token")
            .body(())
            .unwrap();
        let shown = format!("{:?}", RequestView::new(&req));
        assert!(!shown.contains("secret"), "{shown}");
        for part in ["POST", "/v1/items", "x-api-key", "authorization"] {
            assert!(shown.contains(part), "{part} not in {shown}");
        }
    }
}
