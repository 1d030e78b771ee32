//! What `benches/layer.rs` and `examples/load_target.rs` both put in front of
//! a service: the same tollgate policy and the same tower_governor
//! configuration, so that the in-process and the over-the-network figures
//! measure one setup. Included by both with `#[path]`.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::middleware::{NoOpMiddleware, StateInformationMiddleware};
use http::{HeaderName, HeaderValue, Request};
use tollgate::{ApiKey, Policy, Throttle, UsagePlan};
use tower_governor::GovernorError;
use tower_governor::governor::{GovernorConfig, GovernorConfigBuilder};
use tower_governor::key_extractor::{KeyExtractor, PeerIpKeyExtractor};

pub(crate) const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// A registered key for requests to carry.
pub(crate) const KEY: &str = "key-00004242";
/// Registered keys in the tollgate policy.
pub(crate) const KEYS: usize = 10_000;

/// tower_governor key extractor: the `x-api-key` header value.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ApiKeyHeader;

impl KeyExtractor for ApiKeyHeader {
    type Key = HeaderValue;

    fn extract<T>(&self, req: &Request<T>) -> Result<Self::Key, GovernorError> {
        req.headers()
            .get(&X_API_KEY)
            .cloned()
            .ok_or(GovernorError::UnableToExtractKey)
    }
}

/// One request per second with a bucket no run can empty: every request
/// passes.
pub(crate) fn throttle() -> Throttle {
    Throttle::new(1.0, u32::MAX).expect("a valid throttle")
}

/// `KEYS` registered keys (`key-00000000`…) on one plan of [`throttle`].
pub(crate) fn registered_policy() -> Policy {
    registered_policy_on(UsagePlan::new("bench").throttle(throttle()))
}

/// `KEYS` registered keys (`key-00000000`…) on `plan`, which is named `bench`.
pub(crate) fn registered_policy_on(plan: UsagePlan) -> Policy {
    (0..KEYS)
        .fold(Policy::builder().plan(plan), |p, i| {
            p.key(ApiKey::new(
                format!("id-{i}"),
                format!("key-{i:08}"),
                "bench",
            ))
        })
        .build()
        .expect("a valid policy")
}

/// tower_governor with the same limit, keyed by the same header, sending its
/// `x-ratelimit-*` headers.
pub(crate) fn governor_config() -> GovernorConfig<ApiKeyHeader, StateInformationMiddleware> {
    GovernorConfigBuilder::default()
        .period(Duration::from_secs(1))
        .burst_size(NonZeroU32::MAX.get())
        .key_extractor(ApiKeyHeader)
        .use_headers()
        .finish()
        .expect("a valid governor config")
}

/// tower_governor in its default configuration (keyed by the peer IP from
/// axum's `ConnectInfo`, no response headers), with the same limit.
#[allow(dead_code)]
pub(crate) fn governor_default_config() -> GovernorConfig<PeerIpKeyExtractor, NoOpMiddleware> {
    GovernorConfigBuilder::default()
        .period(Duration::from_secs(1))
        .burst_size(NonZeroU32::MAX.get())
        .finish()
        .expect("a valid governor config")
}

/// tower_governor keyed by the same header as tollgate, without headers
/// (its default middleware).
#[allow(dead_code)]
pub(crate) fn governor_key_config() -> GovernorConfig<ApiKeyHeader, NoOpMiddleware> {
    GovernorConfigBuilder::default()
        .period(Duration::from_secs(1))
        .burst_size(NonZeroU32::MAX.get())
        .key_extractor(ApiKeyHeader)
        .finish()
        .expect("a valid governor config")
}

/// tower_governor in its default key (the peer IP) sending its headers.
#[allow(dead_code)]
pub(crate) fn governor_ip_headers_config()
-> GovernorConfig<PeerIpKeyExtractor, StateInformationMiddleware> {
    GovernorConfigBuilder::default()
        .period(Duration::from_secs(1))
        .burst_size(NonZeroU32::MAX.get())
        .use_headers()
        .finish()
        .expect("a valid governor config")
}
