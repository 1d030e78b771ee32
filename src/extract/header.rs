//! Keys taken from request headers: [`ApiKeyHeader`], [`Bearer`] and
//! [`BearerOrApiKey`].

use http::HeaderMap;
use http::header::{AUTHORIZATION, HeaderName, HeaderValue};

use super::{DEFAULT_MAX_KEY_LEN, Key, KeyError, KeyExtractor, RequestView, validate};

/// The default header read by [`ApiKeyHeader`].
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The most headers [`single`] compares one by one rather than looks up.
const SCANNED: usize = 6;

/// Returns the only value of `name`, or an error if it is absent or repeated.
///
/// A repeated header is ambiguous (which value is the key?), so it is
/// rejected as malformed rather than resolved by picking one.
fn single<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<&'a HeaderValue, KeyError> {
    // A few names, none repeated, are compared in order: `get` hashes the
    // name byte by byte first, which costs more than comparing a few
    // (another name's length, or a standard name's tag, differs at once).
    if headers.len() <= SCANNED && headers.len() == headers.keys_len() {
        return match headers.iter().find(|&(n, _)| n == name) {
            Some((_, value)) => Ok(value),
            None => Err(KeyError::Missing),
        };
    }
    let value = headers.get(name).ok_or(KeyError::Missing)?;
    // A map with as many values as names repeats no header: the usual
    // request is answered without walking this name's values.
    if headers.len() != headers.keys_len() && headers.get_all(name).iter().nth(1).is_some() {
        return Err(KeyError::Malformed);
    }
    Ok(value)
}

/// Uses an API key header as the key: `x-api-key` unless configured otherwise.
///
/// The key borrows the header value's bytes. A request without the header is
/// rejected with [`KeyError::Missing`], one that repeats it with
/// [`KeyError::Malformed`]. The value must be non-empty, at most
/// [`max_len`](Self::max_len) bytes ([`DEFAULT_MAX_KEY_LEN`] by default) and
/// visible ASCII only.
///
/// ```
/// use tollgate::extract::{ApiKeyHeader, KeyExtractor, RequestView};
///
/// let extractor = ApiKeyHeader::new();
/// let req = http::Request::builder()
///     .header("x-api-key", "k-123")
///     .body(())
///     .unwrap();
/// let key = extractor.extract(&RequestView::new(&req)).unwrap();
/// assert_eq!(key.as_bytes(), b"k-123");
/// ```
#[derive(Debug, Clone)]
pub struct ApiKeyHeader {
    name: HeaderName,
    max_len: usize,
}

impl ApiKeyHeader {
    /// Reads the `x-api-key` header.
    #[must_use]
    pub fn new() -> Self {
        Self::with_name(X_API_KEY)
    }

    /// Reads the header `name` instead of `x-api-key`.
    ///
    /// ```
    /// use http::HeaderName;
    /// use tollgate::extract::ApiKeyHeader;
    ///
    /// let extractor = ApiKeyHeader::with_name(HeaderName::from_static("x-client-id"));
    /// # let _ = extractor;
    /// ```
    #[must_use]
    pub fn with_name(name: HeaderName) -> Self {
        Self {
            name,
            max_len: DEFAULT_MAX_KEY_LEN,
        }
    }

    /// Sets the longest accepted key, in bytes; longer keys are rejected with
    /// [`KeyError::TooLong`].
    #[must_use]
    pub fn max_len(mut self, max_len: usize) -> Self {
        self.max_len = max_len;
        self
    }

    /// The header this extractor reads.
    pub fn name(&self) -> &HeaderName {
        &self.name
    }
}

impl Default for ApiKeyHeader {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyExtractor for ApiKeyHeader {
    fn extract<'r>(&self, req: &RequestView<'r>) -> Result<Key<'r>, KeyError> {
        let value = single(req.headers, &self.name)?;
        validate(value.as_bytes(), self.max_len).map(Key::borrowed)
    }
}

/// Uses the token of an `Authorization: Bearer <token>` header as the key.
///
/// The scheme is matched case-insensitively, one or more spaces or tabs may
/// separate it from the token, and whitespace around the credentials is
/// ignored. (A tab is taken as a separator, not as part of another scheme,
/// because many servers split the header on any whitespace: the service
/// behind the layer must not read a token the layer did not limit.) A
/// request without an `Authorization` header, or with another scheme (such as
/// `Basic`), is rejected with [`KeyError::Missing`]; `Bearer` without a token
/// with [`KeyError::Empty`]; several `Authorization` headers with
/// [`KeyError::Malformed`]. The token must be at most
/// [`max_len`](Self::max_len) bytes ([`DEFAULT_MAX_KEY_LEN`] by default) and
/// visible ASCII only. The key borrows the header value's bytes.
///
/// ```
/// use tollgate::extract::{Bearer, KeyExtractor, RequestView};
///
/// let extractor = Bearer::new();
/// let req = http::Request::builder()
///     .header("authorization", "Bearer abc.def")
///     .body(())
///     .unwrap();
/// let key = extractor.extract(&RequestView::new(&req)).unwrap();
/// assert_eq!(key.as_bytes(), b"abc.def");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Bearer {
    max_len: usize,
}

impl Bearer {
    /// Reads bearer tokens of at most [`DEFAULT_MAX_KEY_LEN`] bytes.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            max_len: DEFAULT_MAX_KEY_LEN,
        }
    }

    /// Sets the longest accepted token, in bytes; longer tokens are rejected
    /// with [`KeyError::TooLong`].
    #[must_use]
    pub const fn max_len(mut self, max_len: usize) -> Self {
        self.max_len = max_len;
        self
    }
}

impl Default for Bearer {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyExtractor for Bearer {
    fn extract<'r>(&self, req: &RequestView<'r>) -> Result<Key<'r>, KeyError> {
        let value = single(req.headers, &AUTHORIZATION)?;
        let token = bearer_token(value.as_bytes()).ok_or(KeyError::Missing)?;
        validate(token, self.max_len).map(Key::borrowed)
    }
}

/// Takes the key from `Authorization: Bearer <key>` or from `x-api-key`,
/// as OpenAI's clients (and Anthropic's, and most others) send it.
///
/// Either header alone gives the key, each read as [`Bearer`] and
/// [`ApiKeyHeader`] read it. An `Authorization` header of another scheme
/// (`Basic`, meant for a proxy) is left alone. When both carry a key:
///
/// - the same key: that key;
/// - different keys: [`KeyError::Conflicting`], answered as an invalid key;
/// - one unusable (empty, too long, repeated): its error, as either alone.
///
/// Different keys are refused rather than one preferred: two credentials
/// that disagree are a client's mistake (a stale environment variable
/// beside a new header, a proxy that adds its own), and choosing either
/// would charge, or let in, a caller the client may not have meant. The
/// request is refused and the client told why.
///
/// ```
/// use tollgate::extract::{BearerOrApiKey, KeyError, KeyExtractor, RequestView};
///
/// let extractor = BearerOrApiKey::new();
/// let bearer = http::Request::builder()
///     .header("authorization", "Bearer sk-123")
///     .body(())
///     .unwrap();
/// assert_eq!(extractor.extract(&RequestView::new(&bearer)).unwrap().as_bytes(), b"sk-123");
///
/// let both = http::Request::builder()
///     .header("authorization", "Bearer sk-123")
///     .header("x-api-key", "sk-456")
///     .body(())
///     .unwrap();
/// assert_eq!(
///     extractor.extract(&RequestView::new(&both)).unwrap_err(),
///     KeyError::Conflicting
/// );
/// ```
#[derive(Debug, Clone)]
pub struct BearerOrApiKey {
    bearer: Bearer,
    header: ApiKeyHeader,
}

impl BearerOrApiKey {
    /// Reads `Authorization: Bearer` and `x-api-key`, keys of at most
    /// [`DEFAULT_MAX_KEY_LEN`] bytes.
    #[must_use]
    pub fn new() -> Self {
        Self {
            bearer: Bearer::new(),
            header: ApiKeyHeader::new(),
        }
    }

    /// Reads the header `name` instead of `x-api-key`.
    #[must_use]
    pub fn with_name(mut self, name: HeaderName) -> Self {
        self.header = ApiKeyHeader::with_name(name).max_len(self.bearer.max_len);
        self
    }

    /// Sets the longest accepted key, in bytes; longer keys are rejected with
    /// [`KeyError::TooLong`].
    #[must_use]
    pub fn max_len(mut self, max_len: usize) -> Self {
        self.bearer = self.bearer.max_len(max_len);
        self.header = self.header.max_len(max_len);
        self
    }
}

impl Default for BearerOrApiKey {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyExtractor for BearerOrApiKey {
    fn extract<'r>(&self, req: &RequestView<'r>) -> Result<Key<'r>, KeyError> {
        let bearer = match self.bearer.extract(req) {
            // No `Authorization`, or one of another scheme.
            Err(KeyError::Missing) => None,
            other => Some(other),
        };
        let header = match self.header.extract(req) {
            Err(KeyError::Missing) => None,
            other => Some(other),
        };
        match (bearer, header) {
            // A credential present but unusable is refused even beside a
            // good one: the client may have meant either.
            (Some(Err(e)), _) | (_, Some(Err(e))) => Err(e),
            (Some(Ok(a)), Some(Ok(b))) if a.as_bytes() != b.as_bytes() => {
                Err(KeyError::Conflicting)
            }
            (Some(key), _) | (None, Some(key)) => key,
            (None, None) => Err(KeyError::Missing),
        }
    }
}

/// Returns the (possibly empty) token of a `Bearer` credential, or `None` if
/// the credential uses another scheme.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer";
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at_checked(SCHEME.len())?;
    if !scheme.eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    match rest.first() {
        // `Bearer` alone: the scheme, without a token.
        None => Some(rest),
        // The separator is whitespace (one space by RFC 9110, but servers
        // that split on any whitespace read a tab as one too, so this must
        // be the same credential here); whatever follows is the token.
        Some(b' ' | b'\t') => Some(rest.trim_ascii_start()),
        // Another scheme that starts with `bearer`, such as `BearerX`.
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &[u8])]) -> http::Request<()> {
        let mut req = http::Request::new(());
        for (name, value) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        req
    }

    fn extract(
        extractor: &impl KeyExtractor,
        headers: &[(&str, &[u8])],
    ) -> Result<Vec<u8>, KeyError> {
        let req = request(headers);
        extractor
            .extract(&RequestView::new(&req))
            .map(|key| key.as_bytes().to_vec())
    }

    #[test]
    fn api_key_default_header() {
        let e = ApiKeyHeader::default();
        assert_eq!(e.name(), "x-api-key");
        assert_eq!(
            extract(&e, &[("x-api-key", b"secret")]),
            Ok(b"secret".to_vec())
        );
        assert_eq!(
            extract(&e, &[("X-Api-Key", b"secret")]),
            Ok(b"secret".to_vec())
        );
    }

    #[test]
    fn api_key_borrows_header_bytes() {
        let req = request(&[("x-api-key", b"secret")]);
        let key = ApiKeyHeader::new()
            .extract(&RequestView::new(&req))
            .unwrap();
        let header = req.headers().get("x-api-key").unwrap().as_bytes();
        assert_eq!(key.as_bytes().as_ptr(), header.as_ptr());
    }

    #[test]
    fn api_key_custom_header() {
        let e = ApiKeyHeader::with_name(HeaderName::from_static("x-client"));
        assert_eq!(extract(&e, &[("x-client", b"c1")]), Ok(b"c1".to_vec()));
        assert_eq!(extract(&e, &[("x-api-key", b"c1")]), Err(KeyError::Missing));
    }

    #[test]
    fn api_key_errors() {
        let e = ApiKeyHeader::new().max_len(4);
        assert_eq!(extract(&e, &[]), Err(KeyError::Missing));
        assert_eq!(extract(&e, &[("x-api-key", b"")]), Err(KeyError::Empty));
        assert_eq!(extract(&e, &[("x-api-key", b"abcd")]), Ok(b"abcd".to_vec()));
        assert_eq!(
            extract(&e, &[("x-api-key", b"abcde")]),
            Err(KeyError::TooLong)
        );
        assert_eq!(
            extract(&e, &[("x-api-key", b"a b")]),
            Err(KeyError::Malformed)
        );
        assert_eq!(
            extract(&e, &[("x-api-key", b"a\tb")]),
            Err(KeyError::Malformed)
        );
        assert_eq!(
            extract(&e, &[("x-api-key", b"\xc3\xa9")]),
            Err(KeyError::Malformed)
        );
        assert_eq!(
            extract(&e, &[("x-api-key", b"\xff")]),
            Err(KeyError::Malformed)
        );
    }

    #[test]
    fn api_key_repeated_header_is_ambiguous() {
        let e = ApiKeyHeader::new();
        let headers: &[(&str, &[u8])] = &[("x-api-key", b"a"), ("x-api-key", b"b")];
        assert_eq!(extract(&e, headers), Err(KeyError::Malformed));
        // Repeated beside other repeated headers, in either order.
        let headers: &[(&str, &[u8])] = &[
            ("accept", b"a"),
            ("x-api-key", b"a"),
            ("accept", b"b"),
            ("x-api-key", b"b"),
        ];
        assert_eq!(extract(&e, headers), Err(KeyError::Malformed));
        // Another header repeated does not make a single key ambiguous.
        let headers: &[(&str, &[u8])] = &[("accept", b"a"), ("x-api-key", b"k"), ("accept", b"b")];
        assert_eq!(extract(&e, headers), Ok(b"k".to_vec()));
    }

    #[test]
    fn api_key_found_among_few_and_many_headers() {
        // Up to `SCANNED` names are compared in order, more are looked up:
        // both find the key wherever it is, and neither takes another
        // header's value.
        let e = ApiKeyHeader::new();
        let others = [
            "accept",
            "content-type",
            "x-api-ke",
            "x-api-keys",
            "user-agent",
            "x-request-id",
            "authorization",
            "host",
            "x-forwarded-for",
            "content-length",
        ];
        for count in [0, 1, SCANNED - 1, SCANNED, others.len()] {
            for at in 0..=count {
                let mut headers: Vec<(&str, &[u8])> = others[..count]
                    .iter()
                    .map(|n| (*n, &b"other"[..]))
                    .collect();
                assert_eq!(extract(&e, &headers), Err(KeyError::Missing), "{count}");
                headers.insert(at, ("x-api-key", b"k"));
                assert_eq!(extract(&e, &headers), Ok(b"k".to_vec()), "{count} {at}");
                headers.insert(at, ("x-api-key", b"k"));
                assert_eq!(
                    extract(&e, &headers),
                    Err(KeyError::Malformed),
                    "{count} {at}"
                );
            }
        }
    }

    #[test]
    fn bearer_token_is_the_key() {
        let e = Bearer::default();
        for value in [
            &b"Bearer tok"[..],
            b"bearer tok",
            b"BEARER tok",
            b"bEaReR tok",
            b"Bearer    tok",
            b"Bearer tok  ",
            b"Bearer tok\t",
            b"  Bearer tok",
            b"Bearer\ttok",
            b"Bearer \t tok",
        ] {
            assert_eq!(
                extract(&e, &[("authorization", value)]),
                Ok(b"tok".to_vec()),
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
    }

    #[test]
    fn bearer_borrows_header_bytes() {
        let req = request(&[("authorization", b"Bearer tok")]);
        let key = Bearer::new().extract(&RequestView::new(&req)).unwrap();
        let header = req.headers().get("authorization").unwrap().as_bytes();
        assert_eq!(key.as_bytes().as_ptr(), header[7..].as_ptr());
    }

    #[test]
    fn bearer_other_schemes_are_missing() {
        let e = Bearer::new();
        assert_eq!(extract(&e, &[]), Err(KeyError::Missing));
        for value in [
            &b"Basic dXNlcjpwYXNz"[..],
            b"Bearertok",
            b"Bear tok",
            b"Digest username=x",
            b"",
            b"tok",
        ] {
            assert_eq!(
                extract(&e, &[("authorization", value)]),
                Err(KeyError::Missing),
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
    }

    #[test]
    fn bearer_errors() {
        let e = Bearer::new().max_len(3);
        assert_eq!(
            extract(&e, &[("authorization", b"Bearer")]),
            Err(KeyError::Empty)
        );
        assert_eq!(
            extract(&e, &[("authorization", b"Bearer   ")]),
            Err(KeyError::Empty)
        );
        assert_eq!(
            extract(&e, &[("authorization", b"Bearer abcd")]),
            Err(KeyError::TooLong)
        );
        assert_eq!(
            extract(&e, &[("authorization", b"Bearer a b")]),
            Err(KeyError::Malformed)
        );
        assert_eq!(
            extract(&e, &[("authorization", b"Bearer \xff")]),
            Err(KeyError::Malformed)
        );
        assert_eq!(
            extract(&e, &[("authorization", b"Bearer\ta\tb")]),
            Err(KeyError::Malformed)
        );
        assert_eq!(
            extract(&e, &[("authorization", b"Bearer\t")]),
            Err(KeyError::Empty)
        );
        let headers: &[(&str, &[u8])] = &[
            ("authorization", b"Bearer a"),
            ("authorization", b"Bearer b"),
        ];
        assert_eq!(extract(&e, headers), Err(KeyError::Malformed));
        let headers: &[(&str, &[u8])] = &[
            ("authorization", b"Basic x"),
            ("authorization", b"Bearer b"),
        ];
        assert_eq!(extract(&e, headers), Err(KeyError::Malformed));
    }

    #[test]
    fn extractors_are_send_sync_static() {
        fn check<T: KeyExtractor + Clone + std::fmt::Debug>() {}
        check::<ApiKeyHeader>();
        check::<Bearer>();
    }

    #[test]
    fn bearer_or_api_key() {
        let e = BearerOrApiKey::new();
        assert_eq!(
            extract(&e, &[("authorization", b"Bearer k1")]).unwrap(),
            b"k1"
        );
        assert_eq!(extract(&e, &[("x-api-key", b"k2")]).unwrap(), b"k2");
        assert_eq!(
            extract(&e, &[("authorization", b"Bearer k1"), ("x-api-key", b"k1")]).unwrap(),
            b"k1"
        );
        assert_eq!(
            extract(&e, &[("authorization", b"Bearer k1"), ("x-api-key", b"k2")]),
            Err(KeyError::Conflicting)
        );
        // Another scheme is meant for someone else: the header key stands.
        assert_eq!(
            extract(
                &e,
                &[("authorization", b"Basic dXNlcg=="), ("x-api-key", b"k2")]
            )
            .unwrap(),
            b"k2"
        );
        assert_eq!(extract(&e, &[]), Err(KeyError::Missing));
        assert_eq!(
            extract(&e, &[("authorization", b"Bearer")]),
            Err(KeyError::Empty)
        );
        assert_eq!(
            extract(&e, &[("authorization", b"Bearer k1"), ("x-api-key", b"")]),
            Err(KeyError::Empty)
        );
        assert_eq!(
            extract(&e.clone().max_len(2), &[("x-api-key", b"k23")]),
            Err(KeyError::TooLong)
        );
        let named = e.with_name(HeaderName::from_static("api-key"));
        assert_eq!(extract(&named, &[("api-key", b"k3")]).unwrap(), b"k3");
    }
}
