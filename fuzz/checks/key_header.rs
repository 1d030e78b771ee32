//! API key and bearer token extraction from hostile header values.
//!
//! Shared by the `key_header` fuzz target and `tests/layer/fuzz_corpora.rs`.
//!
//! Input: byte 0 is the configured maximum key length; the rest, split on
//! `\n`, are the lines of the header (lines that are no valid header value are
//! dropped, as an HTTP server would refuse them). The same lines are sent as
//! `x-api-key` and as `authorization`.

use http::header::{AUTHORIZATION, HeaderName, HeaderValue};
use tollgate::extract::{
    ApiKeyHeader, Bearer, DEFAULT_MAX_KEY_LEN, KeyError, KeyExtractor, RequestView,
};

/// Checks both extractors, with the configured and the default maximum,
/// against what their documentation promises.
pub(crate) fn check(data: &[u8]) {
    let Some((&max, rest)) = data.split_first() else {
        return;
    };
    let max_len = usize::from(max);
    let lines: Vec<HeaderValue> = rest
        .split(|&b| b == b'\n')
        .filter_map(|line| HeaderValue::from_bytes(line).ok())
        .collect();
    let name = HeaderName::from_static("x-api-key");
    let mut req = http::Request::new(());
    for line in &lines {
        req.headers_mut().append(&name, line.clone());
        req.headers_mut().append(AUTHORIZATION, line.clone());
    }
    let view = RequestView::new(&req);
    let values: Vec<&[u8]> = req
        .headers()
        .get_all(&name)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();

    for (extractor, max_len) in [
        (ApiKeyHeader::new().max_len(max_len), max_len),
        (ApiKeyHeader::new(), DEFAULT_MAX_KEY_LEN),
    ] {
        let got = extractor.extract(&view).map(|k| k.as_bytes().to_vec());
        let expected = expected_api_key(&values, max_len).map(<[u8]>::to_vec);
        assert_eq!(got, expected, "api key, max_len {max_len}");
        if let Ok(key) = extractor.extract(&view) {
            assert_key(key.as_bytes(), max_len);
            // The key borrows the header's bytes: no copy of hostile input.
            assert_eq!(key.as_bytes().as_ptr(), values[0].as_ptr());
        }
    }

    for (extractor, max_len) in [
        (Bearer::new().max_len(max_len), max_len),
        (Bearer::new(), DEFAULT_MAX_KEY_LEN),
    ] {
        let got = extractor.extract(&view).map(|k| k.as_bytes().to_vec());
        let expected = expected_bearer(&values, max_len).map(<[u8]>::to_vec);
        assert_eq!(got, expected, "bearer, max_len {max_len}");
        if let Ok(key) = extractor.extract(&view) {
            assert_key(key.as_bytes(), max_len);
            let header = req.headers()[AUTHORIZATION].as_bytes().as_ptr_range();
            assert!(header.contains(&key.as_bytes().as_ptr()));
        }
    }
}

/// What every accepted key is: 1 to `max_len` visible ASCII bytes.
fn assert_key(key: &[u8], max_len: usize) {
    assert!(!key.is_empty());
    assert!(key.len() <= max_len, "{} > {max_len}", key.len());
    assert!(key.iter().all(|b| b.is_ascii_graphic()));
}

/// The documented rules, written out plainly.
fn expected_key(key: &[u8], max_len: usize) -> Result<&[u8], KeyError> {
    if key.is_empty() {
        Err(KeyError::Empty)
    } else if key.len() > max_len {
        Err(KeyError::TooLong)
    } else if !key.iter().all(|b| b.is_ascii_graphic()) {
        Err(KeyError::Malformed)
    } else {
        Ok(key)
    }
}

/// `x-api-key`: absent is missing, repeated is ambiguous, else the value.
fn expected_api_key<'a>(values: &[&'a [u8]], max_len: usize) -> Result<&'a [u8], KeyError> {
    match values {
        [] => Err(KeyError::Missing),
        [value] => expected_key(value, max_len),
        _ => Err(KeyError::Malformed),
    }
}

/// `Authorization: Bearer <token>`: the scheme in any case, spaces or tabs,
/// the token; another scheme is missing.
fn expected_bearer<'a>(values: &[&'a [u8]], max_len: usize) -> Result<&'a [u8], KeyError> {
    let value = match values {
        [] => return Err(KeyError::Missing),
        [value] => value.trim_ascii(),
        _ => return Err(KeyError::Malformed),
    };
    let Some((scheme, rest)) = value.split_at_checked(6) else {
        return Err(KeyError::Missing);
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(KeyError::Missing);
    }
    match rest.first() {
        None => Err(KeyError::Empty),
        Some(b' ' | b'\t') => expected_key(rest.trim_ascii_start(), max_len),
        Some(_) => Err(KeyError::Missing),
    }
}
