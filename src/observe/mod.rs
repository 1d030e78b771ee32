//! Observing decisions: a hook called once per decision, with ready observers
//! for `tracing` events and (feature `metrics`) the `metrics` facade.
//!
//! An [`Observer`] set with
//! [`RateLimitLayerBuilder::observer`](crate::RateLimitLayerBuilder::observer)
//! sees every decision the layer makes, as a [`DecisionEvent`]: requests through
//! the service, [`RateLimitLayer::check`](crate::RateLimitLayer::check) and
//! [`RateLimitLayer::decide`](crate::RateLimitLayer::decide) calls. It is
//! called on the request's path (synchronously, before the response), so it
//! should be quick: count, log, or hand the event's numbers to a channel.
//!
//! An event never holds an API key's value: a registered key is named by its
//! public id ([`ApiKey::new`](crate::ApiKey::new)'s first argument), and the
//! other subjects (keys of a [`Policy::per_key`](crate::Policy::per_key)
//! policy, which may be bearer tokens, and client IPs) are not named at all.
//!
//! Without an observer, a decision costs one branch more than before, and
//! allocates nothing.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//!
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use tollgate::observe::{DecisionEvent, Outcome};
//! use tollgate::{ApiKey, Policy, RateLimitLayer, Reason, Throttle, UsagePlan};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # tokio_test_block_on(async {
//! let policy = Policy::builder()
//!     .plan(UsagePlan::new("free").throttle(Throttle::new(1.0, 1)?))
//!     .key(ApiKey::new("free-1", "demo-free-key", "free"))
//!     .build()?;
//! let rejected = Arc::new(AtomicU64::new(0));
//! let seen = Arc::clone(&rejected);
//! let layer = RateLimitLayer::builder(policy)
//!     .observer(move |event: &DecisionEvent<'_>| {
//!         if let Outcome::Rejected(Reason::Limited) = event.outcome() {
//!             assert_eq!(event.plan(), Some("free"));
//!             assert_eq!(event.key_id(), Some("free-1"));
//!             assert_eq!(event.route(), Some("/v1/completions"));
//!             assert_eq!(event.limit(), Some("throttle"));
//!             seen.fetch_add(1, Ordering::Relaxed);
//!         }
//!     })
//!     .build();
//! let svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .service(service_fn(|_req: Request<tollgate::RequestBody<String>>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<Bytes>::new()))
//!     }));
//! let request = || {
//!     Request::post("/v1/completions")
//!         .header("x-api-key", "demo-free-key")
//!         .body(String::new())
//!         .unwrap()
//! };
//! assert_eq!(svc.clone().oneshot(request()).await.unwrap().status(), 200);
//! assert_eq!(svc.clone().oneshot(request()).await.unwrap().status(), 429);
//! assert_eq!(rejected.load(Ordering::Relaxed), 1);
//! # Ok::<(), tollgate::ConfigError>(())
//! # }).unwrap();
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
//! # }
//! ```

#[cfg(feature = "metrics")]
mod counter;
mod hook;
mod trace;

#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub use self::counter::{DECISIONS_TOTAL, MetricsObserver};
pub(crate) use self::hook::{Seen, SharedObserver, Watch, outcome};
pub use self::trace::TracingObserver;

use std::fmt;

use crate::extract::{KeyError, RequestView};
use crate::plan::FailureMode;
use crate::response::Reason;

/// Sees every decision of a layer (see the [module documentation](self)).
/// A peek, which decides nothing (a cost of 0 without a request:
/// [`RateLimitLayer::standing`](crate::RateLimitLayer::standing) and the
/// other standings, `check(key, 0)`, `decide(key, 0)`), is never reported,
/// not even when its key is refused (unknown, disabled, malformed, or not
/// resolved); a missing, unknown or disabled key of any other call is
/// reported as refused.
///
/// Implemented for closures `Fn(&DecisionEvent<'_>)`. Set one with
/// [`RateLimitLayerBuilder::observer`](crate::RateLimitLayerBuilder::observer).
pub trait Observer: Send + Sync + 'static {
    /// Called once per decision, before the request goes on or is answered.
    fn on_decision(&self, event: &DecisionEvent<'_>);
}

impl<F> Observer for F
where
    F: Fn(&DecisionEvent<'_>) + Send + Sync + 'static,
{
    fn on_decision(&self, event: &DecisionEvent<'_>) {
        self(event)
    }
}

/// What was decided, about whom, where.
///
/// It borrows from the request and the policy: copy out what must outlive
/// the call. `Debug` prints the route, never the request's headers.
#[derive(Clone, Copy)]
pub struct DecisionEvent<'a> {
    plan: Option<&'a str>,
    shadow: bool,
    key_id: Option<&'a str>,
    req: Option<RequestView<'a>>,
    model: Option<&'a str>,
    outcome: Outcome,
    limit: Option<&'static str>,
}

impl<'a> DecisionEvent<'a> {
    /// The name of the plan the request was decided under; `None` when the
    /// key failed before a plan was known (missing, malformed or unknown key).
    pub fn plan(&self) -> Option<&'a str> {
        self.plan
    }

    /// Whether the plan is a shadow plan (it decides and counts, but never
    /// rejects: an over-limit request of a shadow plan goes on, as
    /// [`Outcome::ShadowRejected`]).
    pub fn is_shadow(&self) -> bool {
        self.shadow
    }

    /// The public id of the registered API key the request carried (also for
    /// a disabled key). `None` for a missing or unknown key, for keys of a
    /// [`Policy::per_key`](crate::Policy::per_key) policy (the key itself may be
    /// a secret) and for requests limited by client IP.
    pub fn key_id(&self) -> Option<&'a str> {
        self.key_id
    }

    /// The model entry of the plan whose limits applied to the request: the
    /// model's name as the plan names it, or `"*"` for a model it does not
    /// name (one of a bounded set, fit for a metric label). `None` when the
    /// plan has no limits for the request's model.
    pub fn model(&self) -> Option<&'a str> {
        self.model
    }

    /// The request's route: axum's `MatchedPath` (such as `"/users/{id}"`)
    /// when present, else the URI's path. `None` for decisions without a
    /// request ([`check`](crate::RateLimitLayer::check) and
    /// [`decide`](crate::RateLimitLayer::decide)).
    ///
    /// The path is what the client sent: use [`matched_route`](Self::matched_route)
    /// where the number of distinct values must stay bounded.
    pub fn route(&self) -> Option<&'a str> {
        self.req.as_ref().map(crate::plan::route_of)
    }

    /// The route template axum matched (`MatchedPath`), if any: one of the
    /// routes the application declared, never a path a client made up.
    /// Always `None` without the `axum` feature, and outside axum routers.
    pub fn matched_route(&self) -> Option<&'a str> {
        #[cfg(feature = "axum")]
        if let Some(req) = &self.req {
            return req
                .extensions
                .get::<axum::extract::MatchedPath>()
                .map(|m| m.as_str());
        }
        None
    }

    /// The request's method, when there is a request.
    pub fn method(&self) -> Option<&'a http::Method> {
        self.req.map(|r| r.method)
    }

    /// What was decided.
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// The limit that rejected the request (or, under a shadow plan, would
    /// have: [`Outcome::ShadowRejected`]), as [`Rejection::limit`](crate::Rejection::limit)
    /// names it (`"throttle"`, `"method"`, `"quota"`, `"stage"`,
    /// `"stage-method"`, `"concurrency"`, `"tokens-minute"`, `"tokens-day"`,
    /// `"tokens-month"`); `None` when the request was
    /// allowed within its limits or no limit decided (key problems, store
    /// failures).
    pub fn limit(&self) -> Option<&'static str> {
        self.limit
    }
}

impl fmt::Debug for DecisionEvent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecisionEvent")
            .field("plan", &self.plan)
            .field("shadow", &self.shadow)
            .field("key_id", &self.key_id)
            .field("route", &self.route())
            .field("outcome", &self.outcome)
            .field("limit", &self.limit)
            .finish()
    }
}

/// What a decision came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The request goes on, within its limits.
    Allowed,
    /// The request goes on, over a limit of its shadow plan: it would have
    /// been rejected for this reason, were the plan not a shadow. The event's
    /// [`limit`](DecisionEvent::limit) names the limit, as a rejection's
    /// would. Counting these is what a shadow plan is for: how many requests
    /// its limits would turn away.
    ShadowRejected(Reason),
    /// The request was answered with a rejection, for this reason.
    Rejected(Reason),
    /// The store failed (unreachable, too slow) and the plan's failure mode
    /// decided: [`Open`](FailureMode::Open) let the request through,
    /// [`Closed`](FailureMode::Closed) answered 503, and so did
    /// [`Local`](FailureMode::Local) for a store that keeps no local copy
    /// (the Redis store decides a `Local` failure itself, with its copy,
    /// and reports an ordinary decision).
    StoreFailed(FailureMode),
}

impl Outcome {
    /// Whether the request goes on to the service.
    pub fn is_allowed(&self) -> bool {
        matches!(
            self,
            Outcome::Allowed | Outcome::ShadowRejected(_) | Outcome::StoreFailed(FailureMode::Open)
        )
    }

    /// A short name: `"allowed"`, `"shadow_rejected"`, `"rejected"`,
    /// `"failed_open"`, `"failed_closed"` or `"failed_local"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::ShadowRejected(_) => "shadow_rejected",
            Outcome::Rejected(_) => "rejected",
            Outcome::StoreFailed(FailureMode::Open) => "failed_open",
            Outcome::StoreFailed(FailureMode::Closed) => "failed_closed",
            Outcome::StoreFailed(FailureMode::Local) => "failed_local",
        }
    }

    /// Why the request was rejected (or, under a shadow plan, would have
    /// been), as a short name (`"limited"`, `"unknown_key"`…); `None` unless
    /// it was.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            Outcome::Rejected(reason) | Outcome::ShadowRejected(reason) => {
                Some(reason_name(*reason))
            }
            Outcome::StoreFailed(FailureMode::Closed | FailureMode::Local) => {
                Some(reason_name(Reason::StoreUnavailable))
            }
            _ => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejection reason as a label or field value.
fn reason_name(reason: Reason) -> &'static str {
    match reason {
        Reason::Key(KeyError::Missing) => "missing_key",
        Reason::Key(KeyError::Empty) => "empty_key",
        Reason::Key(KeyError::Malformed) => "malformed_key",
        Reason::Key(KeyError::TooLong) => "key_too_long",
        Reason::Key(KeyError::MissingPeerAddr) => "missing_peer_addr",
        Reason::Key(KeyError::Conflicting) => "conflicting_keys",
        Reason::UnknownKey => "unknown_key",
        Reason::DisabledKey => "disabled_key",
        Reason::Limited => "limited",
        Reason::QuotaExceeded => "quota_exceeded",
        Reason::CostExceedsLimit => "cost_exceeds_limit",
        Reason::KeyCapacity => "key_capacity",
        Reason::ConcurrencyLimited => "concurrency_limited",
        Reason::StoreUnavailable => "store_unavailable",
        Reason::ResolverUnavailable => "resolver_unavailable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_names() {
        assert_eq!(Outcome::Allowed.as_str(), "allowed");
        assert_eq!(Outcome::Allowed.reason(), None);
        let limited = Outcome::Rejected(Reason::Limited);
        assert_eq!(
            (limited.as_str(), limited.reason()),
            ("rejected", Some("limited"))
        );
        assert!(!limited.is_allowed());
        let open = Outcome::StoreFailed(FailureMode::Open);
        assert!(open.is_allowed());
        assert_eq!((open.as_str(), open.reason()), ("failed_open", None));
        let closed = Outcome::StoreFailed(FailureMode::Closed);
        assert!(!closed.is_allowed());
        assert_eq!(closed.reason(), Some("store_unavailable"));
        let missing = Outcome::Rejected(Reason::Key(KeyError::Missing));
        assert_eq!(missing.reason(), Some("missing_key"));
    }

    #[test]
    fn debug_shows_the_route_and_never_the_headers() {
        let req = http::Request::get("/v1/completions?x=1")
            .header("x-api-key", "very-secret-value")
            .body(())
            .unwrap();
        let event = DecisionEvent {
            plan: Some("free"),
            shadow: false,
            key_id: Some("free-1"),
            req: Some(RequestView::new(&req)),
            model: None,
            outcome: Outcome::Allowed,
            limit: None,
        };
        let debug = format!("{event:?}");
        assert!(debug.contains("\"/v1/completions\""), "{debug}");
        assert!(debug.contains("free-1"), "{debug}");
        assert!(!debug.contains("very-secret-value"), "{debug}");
        assert_eq!(event.method(), Some(&http::Method::GET));
        assert_eq!(event.matched_route(), None);
    }
}
