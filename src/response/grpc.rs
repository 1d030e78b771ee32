//! `grpc-status-details-bin`: the `google.rpc.Status` of a rate-limit
//! rejection, with a `RetryInfo` and a `QuotaFailure`, encoded by hand.
//!
//! The few protobuf fields needed are written directly (varints and
//! length-delimited fields), so the library takes no protobuf dependency for
//! one header. This runs only when a call is rejected.
//!
//! The messages, from `google/rpc/status.proto` and `error_details.proto`:
//!
//! ```text
//! Status       { int32 code = 1; string message = 2; repeated Any details = 3; }
//! Any          { string type_url = 1; bytes value = 2; }
//! RetryInfo    { Duration retry_delay = 1; }
//! Duration     { int64 seconds = 1; int32 nanos = 2; }
//! QuotaFailure { repeated Violation violations = 1; }
//! Violation    { string subject = 1; string description = 2; }
//! ```

use std::time::Duration;

use http::HeaderValue;

const RETRY_INFO: &str = "type.googleapis.com/google.rpc.RetryInfo";
const QUOTA_FAILURE: &str = "type.googleapis.com/google.rpc.QuotaFailure";

/// The largest `google.protobuf.Duration`: 10,000 years, in seconds.
const MAX_DURATION_SECS: u64 = 315_576_000_000;

/// The `grpc-status-details-bin` value: the [`status`] message in base64
/// (standard alphabet, without padding, as gRPC sends `-bin` metadata).
pub(super) fn details_header(
    code: u16,
    message: &str,
    retry_after: Option<Duration>,
    limit: Option<&str>,
) -> HeaderValue {
    let encoded = base64(&status(code, message, retry_after, limit));
    HeaderValue::try_from(encoded).expect("base64 is a valid header value")
}

/// A `google.rpc.Status` with a `RetryInfo` detail when there is a retry
/// delay, and a `QuotaFailure` naming the `limit` (described by `message`)
/// when a limit denied.
fn status(code: u16, message: &str, retry_after: Option<Duration>, limit: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    int(&mut out, 1, i64::from(code));
    string(&mut out, 2, message);
    if let Some(delay) = retry_after {
        let mut duration = Vec::with_capacity(16);
        let secs = delay.as_secs().min(MAX_DURATION_SECS);
        int(&mut duration, 1, secs as i64);
        int(&mut duration, 2, i64::from(delay.subsec_nanos()));
        let mut retry_info = Vec::with_capacity(18);
        bytes(&mut retry_info, 1, &duration);
        detail(&mut out, RETRY_INFO, &retry_info);
    }
    if let Some(subject) = limit {
        let mut violation = Vec::with_capacity(subject.len() + message.len() + 4);
        string(&mut violation, 1, subject);
        string(&mut violation, 2, message);
        let mut quota_failure = Vec::with_capacity(violation.len() + 2);
        bytes(&mut quota_failure, 1, &violation);
        detail(&mut out, QUOTA_FAILURE, &quota_failure);
    }
    out
}

/// `details` entry (field 3) of a `Status`: an `Any` of `type_url` and `value`.
fn detail(out: &mut Vec<u8>, type_url: &str, value: &[u8]) {
    let mut any = Vec::with_capacity(type_url.len() + value.len() + 4);
    string(&mut any, 1, type_url);
    bytes(&mut any, 2, value);
    bytes(out, 3, &any);
}

/// A base-128 varint, low groups first.
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A varint field (`int32`, `int64`); proto3 leaves out zero. A negative
/// value is sign-extended to 64 bits, as protobuf encodes `int32`.
fn int(out: &mut Vec<u8>, field: u8, v: i64) {
    if v != 0 {
        varint(out, u64::from(field << 3));
        varint(out, v as u64);
    }
}

/// A length-delimited field: `bytes` or an embedded message.
fn bytes(out: &mut Vec<u8>, field: u8, v: &[u8]) {
    varint(out, u64::from(field << 3 | 2));
    varint(out, v.len() as u64);
    out.extend_from_slice(v);
}

/// A `string` field; proto3 leaves out the empty string.
fn string(out: &mut Vec<u8>, field: u8, v: &str) {
    if !v.is_empty() {
        bytes(out, field, v.as_bytes());
    }
}

/// Base64 with the standard alphabet and no padding.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let group = byte(0) << 16 | byte(1) << 8 | byte(2);
        // n bytes make n + 1 sextets; the bits past them are zero.
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(group >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD_NO_PAD;
    use proptest::prelude::*;

    #[test]
    fn varints() {
        for (v, bytes) in [
            (0, &[0x00][..]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (500_000_000, &[0x80, 0xca, 0xb5, 0xee, 0x01]),
            (
                u64::MAX,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ] {
            let mut out = Vec::new();
            varint(&mut out, v);
            assert_eq!(out, bytes, "{v}");
        }
        let mut out = Vec::new();
        int(&mut out, 1, -1);
        assert_eq!(out.len(), 11, "a negative int is ten bytes after its tag");
    }

    #[test]
    fn base64_of_known_strings() {
        // RFC 4648 section 10, without the padding.
        for (input, encoded) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), encoded);
        }
        assert_eq!(base64(&[0xfb, 0xff]), "+/8");
    }

    #[test]
    fn status_of_a_throttled_call() {
        let bytes = status(
            8,
            "Too Many Requests",
            Some(Duration::new(1, 500_000_000)),
            Some("throttle"),
        );
        let mut expected = vec![0x08, 0x08]; // code = 8
        expected.extend([0x12, 17]); // message
        expected.extend(b"Too Many Requests");
        // details[0]: Any { type_url, value: RetryInfo { Duration { 1 s, 500 ms } } }
        expected.extend([0x1a, 2 + 40 + 2 + 10, 0x0a, 40]);
        expected.extend(RETRY_INFO.as_bytes());
        expected.extend([
            0x12, 10, 0x0a, 8, 0x08, 0x01, 0x10, 0x80, 0xca, 0xb5, 0xee, 0x01,
        ]);
        // details[1]: Any { type_url, value: QuotaFailure { Violation { subject, description } } }
        expected.extend([0x1a, 2 + 43 + 2 + 31, 0x0a, 43]);
        expected.extend(QUOTA_FAILURE.as_bytes());
        expected.extend([0x12, 31, 0x0a, 29, 0x0a, 8]);
        expected.extend(b"throttle");
        expected.extend([0x12, 17]);
        expected.extend(b"Too Many Requests");
        assert_eq!(bytes, expected);
    }

    #[test]
    fn status_without_retry_or_limit() {
        let bytes = status(8, "Cost Exceeds Limit", None, None);
        let mut expected = vec![0x08, 0x08, 0x12, 18];
        expected.extend(b"Cost Exceeds Limit");
        assert_eq!(bytes, expected);
        // A whole number of seconds leaves `nanos` out.
        let bytes = status(8, "", Some(Duration::from_secs(3)), None);
        let mut expected = vec![0x08, 0x08, 0x1a, 2 + 40 + 6, 0x0a, 40];
        expected.extend(RETRY_INFO.as_bytes());
        expected.extend([0x12, 4, 0x0a, 2, 0x08, 0x03]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn delays_past_the_protobuf_range_are_clamped() {
        let bytes = status(8, "", Some(Duration::MAX), None);
        // Duration { seconds: 315,576,000,000, nanos: 999,999,999 }
        let duration = [
            0x08, 0x80, 0xbc, 0xae, 0xce, 0x97, 0x09, 0x10, 0xff, 0x93, 0xeb, 0xdc, 0x03,
        ];
        assert!(bytes.ends_with(&duration), "{bytes:02x?}");
    }

    #[test]
    fn header_is_the_unpadded_base64_of_the_status() {
        let header = details_header(
            8,
            "Limit Exceeded",
            Some(Duration::from_secs(60)),
            Some("quota"),
        );
        let decoded = STANDARD_NO_PAD.decode(header.as_bytes()).unwrap();
        assert_eq!(
            decoded,
            status(
                8,
                "Limit Exceeded",
                Some(Duration::from_secs(60)),
                Some("quota")
            )
        );
        assert!(!header.as_bytes().contains(&b'='));
    }

    proptest! {
        #[test]
        fn base64_matches_the_base64_crate(input in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(base64(&input), STANDARD_NO_PAD.encode(&input));
        }
    }
}
