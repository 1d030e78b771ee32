//! API-gateway usage plans as a tower layer.
//!
//! tollgate puts what an API gateway gives a service (API keys bound to usage
//! plans, throttles of rate and burst, DAY / WEEK / MONTH quotas, per-method
//! overrides, stage limits, usage reports, standard rejections and rate-limit
//! headers) into any [axum], hyper or [tonic] service, without a gateway in
//! front, with the semantics of AWS API Gateway usage plans.
//!
//! ```
//! use axum::{Router, routing::post};
//! use tollgate::{ApiKey, Policy, RateLimitLayer, Throttle, UsagePlan};
//!
//! let policy = Policy::builder()
//!     // 2 requests per second, bursts of 5, per key.
//!     .plan(UsagePlan::new("free").throttle(Throttle::new(2.0, 5)?))
//!     .key(ApiKey::new("free-1", "demo-free-key", "free"))
//!     .build()?;
//!
//! let app: Router = Router::new()
//!     .route("/v1/completions", post(|| async { "{}" }))
//!     .layer(RateLimitLayer::new(policy));
//! # Ok::<(), tollgate::ConfigError>(())
//! ```
//!
//! # How it decides
//!
//! For each request the layer takes a key ([`extract`]: the `x-api-key` header
//! by default, a bearer token, an upstream extension, the client IP…), finds
//! the key's plan in the [`Policy`] (a missing, unknown or disabled key is
//! answered `403 {"message":"Forbidden"}`), then decides every limit that
//! applies (stage throttle, plan throttle, the method override matching the
//! route, the quota) in one atomic step: all limits have room and all are
//! charged, or the request is rejected and none is. A throttled request gets
//! `429 {"message":"Too Many Requests"}` with `Retry-After` (whole seconds,
//! rounded up); a used-up quota `429 {"message":"Limit Exceeded"}` until its
//! UTC window ends; gRPC calls get a trailers-only `grpc-status: 8` with the
//! exact retry delay as a `google.rpc.RetryInfo` (see [`Rejection`]). Keys,
//! plans and accounts change while serving through [`Admin`], one key at a
//! time whatever the number of keys (a batch import is all or nothing), and
//! it reports usage per key and per [`Account`] (limits shared by a tenant's
//! keys). Keys kept elsewhere (a database) are found through a [`Resolver`],
//! whose answers are cached.
//! Allowed and rejected responses carry the IETF `RateLimit-Policy` and
//! `RateLimit` headers. For a key already tracked, a decision is one keyed
//! hash, one clock read and one compare-and-swap per throttle, with no lock
//! and no allocation; a quota adds a lookup of its counter and one
//! compare-and-swap of it, still without a lock (the counter's own short
//! lock is taken only on the first change of a day).
//!
//! Throttles are GCRA token buckets: a new key starts with a full bucket of
//! `burst`, which refills at `rate` per second.
//!
//! # Tokens, streams and concurrency
//!
//! For inference APIs a plan may also have a [`TokenBudget`] (tokens a
//! minute, a UTC day, a UTC month) and a cap on a key's requests in flight.
//! A request reserves its estimated tokens when it is decided ([`cost`]);
//! when its response body ends, fails or is dropped, the tokens the handler
//! reported are settled (an over-estimate comes back, an under-estimate is
//! charged, into debt if need be) and its place under the cap is given back,
//! so a streamed answer holds both to its last event.
//!
//! # Where state lives
//!
//! A [`store::Store`] keeps the limit state. [`MemoryStore`] (the default)
//! keeps it in this process and decides synchronously. With the `redis`
//! feature, `RedisStore` keeps it in Redis or Redis Cluster, so that every
//! instance of a service shares one budget; a decision is one round trip, and
//! a store failure is decided by the plan's [`FailureMode`]. It shares the
//! key registry too: a key, plan or account changed through any instance's
//! [`Admin`] is served by every instance within a second.
//!
//! # Observing decisions
//!
//! An [`observe::Observer`] sees every decision: plan, public key id, route,
//! outcome and the limit that decided, never a key's value.
//! [`observe::TracingObserver`] logs each as a `tracing` event; with the
//! `metrics` feature, `observe::MetricsObserver` counts them.
//!
//! # Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `axum` | yes | [`extract::ClientIp`] reads axum's `ConnectInfo<SocketAddr>`; method overrides match axum's `MatchedPath` as well as the path |
//! | `config` | no | `tollgate::config`: plans and keys from a TOML file, errors with line and field; `RateLimitLayerBuilder::config` answers as the file says |
//! | `redis` | no | `RedisStore`: limits shared by every instance through Redis or Redis Cluster, one round trip per decision |
//! | `redis-tls` | no | `redis`, and TLS to Redis and Redis Cluster (`rediss://` URLs) through redis-rs's rustls support |
//! | `openai` | no | `tollgate::openai::OpenAiEstimator`: token estimates read from OpenAI-style JSON bodies, once the key is checked |
//! | `tiktoken` | no | `openai`, and `tollgate::openai::Tokenizer`: prompts counted with OpenAI's BPE (`cl100k_base`, `o200k_base`) through `tiktoken-rs` |
//! | `metrics` | no | `observe::MetricsObserver`: a `tollgate_decisions_total` counter through the `metrics` facade |
//!
//! With `redis-tls`, rustls needs a crypto provider (without one it panics
//! on the first TLS connection): the application installs one before the
//! store first connects (for example
//! `rustls::crypto::aws_lc_rs::default_provider().install_default()`, with
//! `rustls` among its own dependencies), unless its build enables exactly
//! one of rustls's `aws_lc_rs` and `ring` features, which rustls then uses
//! by itself. tollgate picks none, so that it never adds a second provider
//! to an application that has one. Certificates are the system's roots;
//! for client certificates or custom roots, build a `redis::Client` with
//! `Client::build_with_tls` (a cluster's with `ClusterClientBuilder::certs`)
//! and hand it to `RedisStore::client_builder` (`cluster_client_builder`).
//!
//! [axum]: https://docs.rs/axum
//! [tonic]: https://docs.rs/tonic
#![cfg_attr(docsrs, feature(doc_cfg))]
// Cargo.toml denies unsafe code for every target (tests may opt out to count
// allocations); the library forbids it outright.
#![forbid(unsafe_code)]

mod body;
mod clock;
#[cfg(feature = "config")]
#[cfg_attr(docsrs, doc(cfg(feature = "config")))]
pub mod config;
pub mod cost;
mod error;
pub mod extract;
mod gcra;
mod hash;
mod headers;
mod keys;
mod layer;
pub mod observe;
#[cfg(feature = "openai")]
#[cfg_attr(docsrs, doc(cfg(feature = "openai")))]
pub mod openai;
mod plan;
mod policy;
mod quota;
mod resolver;
mod response;
pub mod store;
mod sync;
mod usage;
mod window;

pub use crate::body::{RequestBody, ResponseBody};
pub use crate::clock::{Clock, ManualClock};
pub use crate::cost::{BodyError, CostEstimator, Estimate, TokenEstimate, TokenUsage, UsedTokens};
pub use crate::error::ConfigError;
pub use crate::headers::HeaderStyle;
pub use crate::keys::SharedRegistry;
pub use crate::layer::{
    MethodStanding, RateLimit, RateLimitLayer, RateLimitLayerBuilder, ResponseFuture, Standing,
};
pub use crate::plan::{
    Account, Anonymous, ApiKey, FailureMode, ModelLimits, Quota, Stage, Throttle, TokenBudget,
    UsagePlan,
};
pub use crate::policy::{DEFAULT_HISTORY_DAYS, Policy, PolicyBuilder};
pub use crate::resolver::{
    KeyResolver, Resolution, ResolveError, ResolveFuture, ResolvedKey, Resolver, ResolverFallback,
};
pub use crate::response::{DefaultOnRejection, OnRejection, Reason, Rejection, ResponseStyle};
pub use crate::store::{MemoryStore, MemoryStoreBuilder};
#[cfg(feature = "redis")]
pub use crate::store::{RedisStore, RedisStoreBuilder};
pub use crate::usage::{AccountUsage, Admin, AdminError, KeyChange, KeyInfo, UsageReport};
pub use crate::window::{Date, Period, Weekday};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
