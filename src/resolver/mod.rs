//! Keys looked up where they live: a [`KeyResolver`] asked for key values
//! the policy does not hold, its answers cached.
//!
//! A key value that is not registered in the [`Policy`](crate::Policy) is
//! handed to the resolver (a database query, a call to an identity
//! service), which answers the key's id, plan, account and whether it is
//! enabled, or that the value is no key. What [`Resolver`] configures
//! around it:
//!
//! - answers are cached, keys for [`positive_ttl`](Resolver::positive_ttl)
//!   (60 s), values that are no key for [`negative_ttl`](Resolver::negative_ttl)
//!   (10 s), each kind bounded by [`capacity`](Resolver::capacity) (100 000):
//!   a client that never sends a valid key holds no more than its entries
//!   there, and values that are no key do not push out the keys in use;
//! - concurrent requests with one uncached value make one lookup, and share
//!   its answer;
//! - a lookup (and the wait for another request's) is bounded by
//!   [`timeout`](Resolver::timeout) (1 s);
//! - at most [`max_in_flight`](Resolver::max_in_flight) (32) lookups are in
//!   flight at once: past that a value to look up is answered at once as a
//!   failed lookup (never queued), so a flood of values nobody registered
//!   holds no more of the source (a database pool) than that, and keys whose
//!   answers are cached are decided as ever;
//! - a value that is not UTF-8 is never asked (the resolver takes text): it
//!   is refused as a malformed key
//!   ([`KeyError::Malformed`](crate::extract::KeyError::Malformed));
//! - a key whose plan (or account) the policy does not have is answered as a
//!   failed lookup; its answer is cached as any key's, and the plan is
//!   looked up by name on every request: once the plan is put (through
//!   [`Admin::put_plan`](crate::Admin::put_plan), or by another instance),
//!   the key is served, without waiting for its answer to expire;
//! - a lookup that fails, times out or panics is answered
//!   `503 {"message":"Service Unavailable"}` (gRPC: `UNAVAILABLE`), or as
//!   [`fallback`](Resolver::fallback) says; a failure is never cached.
//!
//! - a key whose id is a registered key's is that key (one id, one key): it
//!   is decided under the registered key's plan and account, and refused
//!   while that key is disabled, whatever its cached answer says, so that
//!   [`Admin::set_enabled`](crate::Admin::set_enabled) and
//!   [`Admin::set_plan`](crate::Admin::set_plan) of the id (through any
//!   instance, with the Redis store's shared registry) hold for it at once;
//!   once the registered key is removed
//!   ([`Admin::remove_key`](crate::Admin::remove_key)), the value's cached
//!   answer is dropped and the resolver asked again. An id only the
//!   resolver knows is no key of `Admin`'s ([`AdminError::UnknownKey`](crate::AdminError::UnknownKey)):
//!   to refuse one at once, before its answer expires, add a disabled key
//!   with its id.
//!
//! The cache is keyed by a keyed hash of the value, never the value itself.
//! A request whose value is cached is decided as a registered key is, without
//! waiting; only a miss waits for the resolver.

mod answer;
mod cache;

use std::future::Future;
use std::pin::Pin;

pub use self::answer::{Resolution, ResolveError, ResolvedKey};
pub use self::cache::{Resolver, ResolverFallback};

pub(crate) use self::cache::{Answer, Found, Lookup, Registered, Resolving};

/// The future a [`KeyResolver`] returns.
pub type ResolveFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Resolution, ResolveError>> + Send + 'a>>;

/// Finds the key that a key value nobody registered stands for.
///
/// Implemented for closures `Fn(String) -> impl Future<Output =
/// Result<Resolution, ResolveError>>`: the value is given by value so that
/// the future may own it. The layer caches the answers (see [`Resolver`]);
/// the resolver itself need not.
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Arc;
///
/// use axum::{Router, body::Body, routing::get};
/// use tollgate::{Policy, RateLimitLayer, Resolution, ResolvedKey, Resolver, Throttle, UsagePlan};
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // Stands for a table of keys in a database.
/// let table = Arc::new(HashMap::from([("s3cr3t".to_string(), ResolvedKey::new("key-1", "free"))]));
/// let lookup = move |value: String| {
///     let table = Arc::clone(&table);
///     async move {
///         Ok(match table.get(&value) {
///             Some(key) => Resolution::Found(key.clone()),
///             None => Resolution::Unknown,
///         })
///     }
/// };
///
/// let policy = Policy::builder()
///     .plan(UsagePlan::new("free").throttle(Throttle::new(1.0, 1)?))
///     .build()?;
/// let layer = RateLimitLayer::builder(policy)
///     .resolver(Resolver::new(lookup))
///     .build();
/// let app = Router::new().route("/", get(|| async { "ok" })).layer(layer);
///
/// let call = |key: &str| http::Request::get("/").header("x-api-key", key).body(Body::empty());
/// assert_eq!(app.clone().oneshot(call("s3cr3t")?).await?.status(), 200);
/// // The plan's burst of 1 is used up.
/// assert_eq!(app.clone().oneshot(call("s3cr3t")?).await?.status(), 429);
/// assert_eq!(app.oneshot(call("guess")?).await?.status(), 403);
/// # Ok(())
/// # }
/// ```
pub trait KeyResolver: Send + Sync + 'static {
    /// The key `value` stands for, [`Resolution::Unknown`] if none.
    fn resolve<'a>(&'a self, value: &'a str) -> ResolveFuture<'a>;
}

impl<F, Fut> KeyResolver for F
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Resolution, ResolveError>> + Send + 'static,
{
    fn resolve<'a>(&'a self, value: &'a str) -> ResolveFuture<'a> {
        Box::pin(self(value.to_owned()))
    }
}
