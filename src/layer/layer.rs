use std::fmt;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;

use tower_layer::Layer;

use super::engine::MethodPeek;
use super::engine::ModelOf;
use super::{BodyLimits, Peek, RateLimit, Shared, SharedState, Step};
use crate::cost::{CostEstimator, ExtensionEstimate};
use crate::extract::{ApiKeyHeader, BearerOrApiKey, KeyExtractor, RequestView};
use crate::headers::HeaderStyle;
use crate::observe::Observer;
use crate::policy::Policy;
use crate::resolver::Resolver;
use crate::response::{DEFAULT_MAX_RETRY, OnRejection, Reason, Rejection, ResponseStyle, refused};
use crate::store::Failures;
use crate::store::{Acquired, Applied, MemoryStore, Report, Store};
use crate::usage::Admin;
use http::StatusCode;
use std::time::Duration;

/// Applies usage-plan rate limits to a service.
///
/// The layer owns the limit state (behind an `Arc`): every service it makes,
/// and every clone of those, shares one budget. This is why the state is made
/// when the layer is built, not in [`Layer::layer`]: axum calls `layer` once per
/// route, and a budget per route would multiply the limit.
///
/// ```
/// use axum::{Router, routing::get};
/// use tollgate::{ApiKey, Policy, RateLimitLayer, Throttle, UsagePlan};
///
/// let policy = Policy::builder()
///     .plan(UsagePlan::new("free").throttle(Throttle::new(2.0, 5)?))
///     .key(ApiKey::new("free-1", "demo-free-key", "free"))
///     .build()?;
/// let app: Router = Router::new()
///     .route("/v1/completions", get(|| async { "ok" }))
///     .layer(RateLimitLayer::new(policy));
/// # Ok::<(), tollgate::ConfigError>(())
/// ```
pub struct RateLimitLayer<K = ApiKeyHeader, S = MemoryStore> {
    shared: SharedState<K, S>,
}

/// How a key's limits stand ([`RateLimitLayer::standing`]).
#[derive(Debug, Clone)]
pub struct Standing {
    plan: String,
    model: Option<String>,
    limits: Vec<Applied>,
    methods: Vec<MethodStanding>,
    refused: Option<Rejection>,
}

/// How one method override of a key's stage or plan stands
/// ([`Standing::methods`]).
#[derive(Debug, Clone)]
pub struct MethodStanding {
    method: Arc<str>,
    limit: Applied,
}

impl MethodStanding {
    /// The override's methodPath as configured, wildcards as written
    /// (`"/v1/chat/completions/POST"`, `"/*/*"`).
    pub fn method(&self) -> &str {
        &self.method
    }

    /// How it stands: its kind ([`LimitKind::Method`](crate::store::LimitKind::Method)
    /// for the plan's, [`LimitKind::StageMethod`](crate::store::LimitKind::StageMethod)
    /// for the stage's, named in headers `"method"` and `"stage-method"`),
    /// size, window, what remains and when it is full again.
    pub fn limit(&self) -> &Applied {
        &self.limit
    }
}

impl Standing {
    /// The key's plan.
    pub fn plan(&self) -> &str {
        &self.plan
    }

    /// The plan's model entry whose limits the standing holds (`model`,
    /// `model-tokens-minute`, …), named as the plan names it: the model's
    /// own entry when the standing was asked for a model the plan names
    /// ([`standing_of_model`](RateLimitLayer::standing_of_model); `"big-model"`
    /// for `Big-Model:latest`, see [`UsagePlan::model`](crate::UsagePlan::model)),
    /// else `"*"` when the plan has that entry; `None` when no model limits
    /// apply.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// How each of its limits stands (its name, size, window, what remains
    /// and when it is full again), in the order the layer weighs them; only
    /// the refusing limit when [`refused`](Self::refused).
    pub fn limits(&self) -> &[Applied] {
        &self.limits
    }

    /// How each method override of the key's stage and plan stands, the
    /// stage's first, each in the order configured: every override, not
    /// only one route's (a standing has no route, so none is among
    /// [`limits`](Self::limits)). A request meets the most literal override
    /// its route matches, of the stage's and of the plan's. Each is read
    /// alone, at cost 0; one in debt shows nothing left and when it is
    /// full again, and refuses nothing else.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response};
    /// use tower::{ServiceBuilder, ServiceExt};
    /// use tollgate::{ApiKey, Policy, RateLimitLayer, Throttle, UsagePlan};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let plan = UsagePlan::new("free")
    ///     .throttle(Throttle::new(1.0, 10)?)
    ///     .method("/v1/chat/completions/POST", Throttle::new(0.1, 2)?);
    /// let policy = Policy::builder()
    ///     .plan(plan)
    ///     .key(ApiKey::new("free-1", "secret", "free"))
    ///     .build()?;
    /// let layer = RateLimitLayer::new(policy);
    /// let svc = ServiceBuilder::new()
    ///     .layer(layer.clone())
    ///     .service_fn(|_req: Request<tollgate::RequestBody<String>>| async {
    ///         Ok::<_, Infallible>(Response::new(String::new()))
    ///     });
    /// let chat = Request::post("/v1/chat/completions")
    ///     .header("x-api-key", "secret")
    ///     .body(String::new())
    ///     .unwrap();
    /// svc.oneshot(chat).await.unwrap();
    /// let standing = layer.standing(b"secret").await.unwrap();
    /// let chat = &standing.methods()[0];
    /// assert_eq!(chat.method(), "/v1/chat/completions/POST");
    /// assert_eq!(chat.limit().name(), "method");
    /// assert_eq!((chat.limit().limit(), chat.limit().remaining()), (2, 1));
    /// # Ok::<(), tollgate::ConfigError>(())
    /// # }).unwrap();
    /// ```
    pub fn methods(&self) -> &[MethodStanding] {
        &self.methods
    }

    /// Why a request would be refused now, when a limit refuses even a
    /// request that costs nothing (a quota past its limit, a full
    /// concurrency cap).
    pub fn refused(&self) -> Option<&Rejection> {
        self.refused.as_ref()
    }
}

impl RateLimitLayer<ApiKeyHeader> {
    /// A layer for `policy`, with keys from the `x-api-key` header, the
    /// in-memory store and IETF rate-limit headers.
    pub fn new(policy: Policy) -> Self {
        Self::builder(policy).build()
    }

    /// A layer for `policy` that OpenAI's clients (and SDKs built on them)
    /// work with unchanged: keys from `Authorization: Bearer` or `x-api-key`
    /// ([`BearerOrApiKey`]), rejections in the
    /// [`OpenAi`](ResponseStyle::OpenAi) style, and OpenAI's
    /// `x-ratelimit-*-{requests,tokens}` headers beside the IETF ones. The
    /// same as [`builder`](Self::builder)`(policy).`[`openai()`](RateLimitLayerBuilder::openai)`.build()`.
    ///
    /// ```
    /// use tollgate::{ApiKey, Policy, RateLimitLayer, Throttle, UsagePlan};
    ///
    /// let policy = Policy::builder()
    ///     .plan(UsagePlan::new("free").throttle(Throttle::new(2.0, 5)?))
    ///     .key(ApiKey::new("free-1", "sk-demo", "free"))
    ///     .build()?;
    /// let layer = RateLimitLayer::openai(policy);
    /// # let _ = layer;
    /// # Ok::<(), tollgate::ConfigError>(())
    /// ```
    pub fn openai(policy: Policy) -> RateLimitLayer<BearerOrApiKey> {
        Self::builder(policy).openai().build()
    }

    /// Configures a layer for `policy`.
    pub fn builder(policy: Policy) -> RateLimitLayerBuilder<ApiKeyHeader> {
        RateLimitLayerBuilder {
            extractor: ApiKeyHeader::default(),
            policy,
            store: MemoryStore::new(),
            headers: HeaderStyle::default(),
            on_rejection: None,
            quota_status: StatusCode::TOO_MANY_REQUESTS,
            style: ResponseStyle::Aws,
            max_retry: DEFAULT_MAX_RETRY,
            estimator: Box::new(ExtensionEstimate),
            body_checks: false,
            body_limits: BodyLimits::default(),
            observer: None,
            model: None,
            resolver: None,
        }
    }
}

impl<K> RateLimitLayer<K, MemoryStore> {
    /// Decides a request of `cost` units for `key` directly, without an HTTP
    /// request: the same plan lookup and limits as the layer applies. A cost of
    /// 0 peeks without charging anything.
    ///
    /// ```
    /// use tollgate::{Policy, RateLimitLayer, Reason, Throttle, UsagePlan};
    ///
    /// let layer = RateLimitLayer::new(Policy::per_key(
    ///     UsagePlan::new("jobs").throttle(Throttle::new(1.0, 2)?),
    /// )?);
    /// assert!(layer.check(b"tenant-7", 1).is_ok());
    /// assert!(layer.check(b"tenant-7", 1).is_ok());
    /// let rejected = layer.check(b"tenant-7", 1).unwrap_err();
    /// assert_eq!(rejected.reason(), Reason::Limited);
    /// assert!(rejected.retry_after().is_some());
    /// # Ok::<(), tollgate::ConfigError>(())
    /// ```
    ///
    /// Method overrides do not apply (there is no route); stage limits and
    /// quotas do. `cost` counts requests: a token budget is charged nothing
    /// (it is only checked, as a peek checks it: a budget in debt refuses).
    /// To charge tokens without an HTTP request, send one through the layer
    /// with a [`TokenEstimate`](crate::TokenEstimate) extension, as the
    /// repository's `examples/grpc_inference.rs` does in its method.
    ///
    /// With a [resolver](RateLimitLayerBuilder::resolver), `check` never
    /// waits for it: a key value the policy does not hold is decided from the
    /// resolver's cache, and refused as unknown when it is not cached there.
    /// [`decide`](Self::decide) asks the resolver.
    ///
    /// With another store, use [`decide`](Self::decide).
    pub fn check(&self, key: &[u8], cost: u32) -> Result<(), Rejection> {
        self.shared.check(key, cost)
    }
}

impl<K, S: Store> RateLimitLayer<K, S> {
    /// Decides a request of `cost` units for `key` directly through any
    /// store, like [`check`](Self::check) does with the memory store. A store
    /// failure is decided by the plan's failure mode.
    ///
    /// ```
    /// use tollgate::{Policy, RateLimitLayer, Throttle, UsagePlan};
    ///
    /// # tokio_test_block_on(async {
    /// let layer = RateLimitLayer::new(Policy::per_key(
    ///     UsagePlan::new("jobs").throttle(Throttle::new(1.0, 1)?),
    /// )?);
    /// assert!(layer.decide(b"tenant-7", 1).await.is_ok());
    /// assert!(layer.decide(b"tenant-7", 1).await.is_err());
    /// # Ok::<(), tollgate::ConfigError>(())
    /// # }).unwrap();
    /// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    /// # }
    /// ```
    pub fn decide(
        &self,
        key: &[u8],
        cost: u32,
    ) -> impl Future<Output = Result<(), Rejection>> + Send + 'static
    where
        K: Send + Sync + 'static,
    {
        // The memory store decides here, before the future is polled: a
        // place it takes is held by `held` until the future gives it back,
        // and given back when the future is dropped first (never polled, or
        // the losing branch of a `select!`).
        let mut held = Held {
            shared: Arc::clone(&self.shared),
            report: Report::default(),
        };
        let step = self.shared.check_any(key, cost, &mut held.report);
        async move {
            let mut held = held;
            let shared = Arc::clone(&held.shared);
            let step = match step {
                Step::Resolve(lookup) => {
                    shared.check_resolved(&lookup.await, cost, &mut held.report)
                }
                step => step,
            };
            let decided = match step {
                Step::Done(d) => d.map(|()| std::mem::take(&mut held.report)),
                Step::Wait(f, failure, watch) => {
                    shared.conclude_watched(f.await, failure, watch, None)
                }
                // A resolved key is never looked up again.
                Step::Resolve(_) => Err(refused(Rejection::key(Reason::ResolverUnavailable), None)),
                // Without a request there is no body to read: never asked.
                Step::Read(_) => Ok(std::mem::take(&mut held.report)),
            };
            // Without a response to hold it through, a place under a
            // concurrency cap is given back at once.
            if let Ok(report) = &decided {
                for permit in report.permits() {
                    shared.store.release(permit);
                }
            }
            decided
                .map(|_| ())
                .map_err(|refusal| shared.styled(refusal.0))
        }
    }

    /// How the limits of `key` stand, read without charging anything: for a
    /// route that shows a caller its own usage (the gateway's
    /// `GET /v1/usage`). It is decided as [`decide`](Self::decide) decides a
    /// request of cost 0 (a peek: no route, so no method override among
    /// its limits; no model, so a model's limits only through the plan's
    /// `"*"` entry, which [`Standing::model`] names; one model's limits are
    /// [`standing_of_model`](Self::standing_of_model)'s): a
    /// missing, unknown or disabled key is an `Err`; a peek that a limit
    /// refuses (a quota past its limit, a full concurrency cap) is a
    /// standing whose [`refused`](Standing::refused) says so, holding that
    /// limit. Every method override of the key's stage and plan is read
    /// besides, each alone at cost 0 ([`Standing::methods`]); with a
    /// remote store, its calls are in flight together with the peek's.
    ///
    /// ```
    /// use tollgate::{ApiKey, Period, Policy, Quota, RateLimitLayer, Throttle, UsagePlan};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let policy = Policy::builder()
    ///     .plan(
    ///         UsagePlan::new("free")
    ///             .throttle(Throttle::new(1.0, 5)?)
    ///             .quota(Quota::new(100, Period::Day)?),
    ///     )
    ///     .key(ApiKey::new("free-1", "secret", "free"))
    ///     .build()?;
    /// let layer = RateLimitLayer::new(policy);
    /// layer.decide(b"secret", 1).await.unwrap();
    /// let standing = layer.standing(b"secret").await.unwrap();
    /// assert_eq!(standing.plan(), "free");
    /// let quota = standing.limits().iter().find(|l| l.name() == "quota").unwrap();
    /// assert_eq!((quota.limit(), quota.remaining()), (100, 99));
    /// assert!(layer.standing(b"nobody").await.is_err());
    /// # Ok::<(), tollgate::ConfigError>(())
    /// # }).unwrap();
    /// ```
    pub fn standing(
        &self,
        key: &[u8],
    ) -> impl Future<Output = Result<Standing, Rejection>> + Send + 'static + use<K, S>
    where
        K: Send + Sync + 'static,
    {
        let mut report = Report::default();
        let mut peek = Peek::default();
        let step = self.shared.peek_any(key, &mut report, &mut peek);
        stand(Arc::clone(&self.shared), step, report, peek.found(), None)
    }

    /// [`standing`](Self::standing) of the registered key with this public
    /// id, enabled or not (an administrator's view: the key's value is not
    /// needed); refused as an unknown key when no key has this id.
    ///
    /// ```
    /// use tollgate::{ApiKey, Policy, RateLimitLayer, Throttle, UsagePlan};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let policy = Policy::builder()
    ///     .plan(UsagePlan::new("free").throttle(Throttle::new(1.0, 5)?))
    ///     .key(ApiKey::new("free-1", "secret", "free").enabled(false))
    ///     .build()?;
    /// let layer = RateLimitLayer::new(policy);
    /// let standing = layer.standing_by_id("free-1").await.unwrap();
    /// assert_eq!(standing.plan(), "free");
    /// assert_eq!(standing.limits()[0].remaining(), 5);
    /// assert!(layer.standing_by_id("secret").await.is_err());
    /// # Ok::<(), tollgate::ConfigError>(())
    /// # }).unwrap();
    /// ```
    pub fn standing_by_id(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Standing, Rejection>> + Send + 'static + use<K, S>
    where
        K: Send + Sync + 'static,
    {
        let mut report = Report::default();
        let mut peek = Peek::default();
        let step = self
            .shared
            .peek_id(id, &mut report, &mut peek)
            .unwrap_or_else(|| Step::Done(Err(refused(Rejection::key(Reason::UnknownKey), None))));
        stand(Arc::clone(&self.shared), step, report, peek.found(), None)
    }

    /// [`standing`](Self::standing) of the key the layer's extractor takes
    /// from `req`: a route that shows callers their own usage, with the key
    /// they send to every other route. A request without a key is read as
    /// the layer limits it: under the policy's anonymous plan, by its
    /// client's address, when the policy has one
    /// ([`PolicyBuilder::anonymous`](crate::PolicyBuilder::anonymous)); a
    /// request without a usable key is otherwise refused as the layer
    /// refuses it (in its response style).
    ///
    /// ```
    /// use tollgate::{ApiKey, Policy, RateLimitLayer, Throttle, UsagePlan};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let policy = Policy::builder()
    ///     .plan(UsagePlan::new("free").throttle(Throttle::new(1.0, 5)?))
    ///     .key(ApiKey::new("free-1", "secret", "free"))
    ///     .build()?;
    /// let layer = RateLimitLayer::openai(policy);
    /// let req = http::Request::builder()
    ///     .header("authorization", "Bearer secret")
    ///     .body(())
    ///     .unwrap();
    /// assert_eq!(layer.standing_of(&req).await.unwrap().plan(), "free");
    /// let anonymous = http::Request::new(());
    /// assert_eq!(layer.standing_of(&anonymous).await.unwrap_err().status(), 401);
    /// # Ok::<(), tollgate::ConfigError>(())
    /// # }).unwrap();
    /// ```
    pub fn standing_of<B>(
        &self,
        req: &http::Request<B>,
    ) -> impl Future<Output = Result<Standing, Rejection>> + Send + 'static
    where
        K: KeyExtractor,
    {
        self.standing_for(req, None)
    }

    /// [`standing_of`](Self::standing_of) for a request to `model`: the
    /// limits that a request for `model` would be decided under, the
    /// model's own (found as a request's model is: `Big-Model:latest` finds
    /// the entry `"big-model"`, see [`UsagePlan::model`](crate::UsagePlan::model))
    /// or else the plan's `"*"` entry, which [`Standing::model`] names.
    /// Read without charging anything, for the key the request carries.
    ///
    /// ```
    /// use tollgate::{ApiKey, ModelLimits, Policy, RateLimitLayer, Throttle, UsagePlan};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let plan = UsagePlan::new("pro")
    ///     .throttle(Throttle::new(10.0, 20)?)
    ///     .model("big-model", ModelLimits::new().throttle(Throttle::new(0.5, 2)?))
    ///     .model("*", ModelLimits::new().throttle(Throttle::new(5.0, 10)?));
    /// let policy = Policy::builder()
    ///     .plan(plan)
    ///     .key(ApiKey::new("pro-1", "secret", "pro"))
    ///     .build()?;
    /// let layer = RateLimitLayer::openai(policy);
    /// let req = http::Request::builder()
    ///     .header("authorization", "Bearer secret")
    ///     .body(())
    ///     .unwrap();
    /// let big = layer.standing_of_model(&req, "Big-Model").await.unwrap();
    /// assert_eq!(big.model(), Some("big-model"));
    /// let model = big.limits().iter().find(|l| l.name() == "model").unwrap();
    /// assert_eq!(model.limit(), 2);
    /// let other = layer.standing_of_model(&req, "small").await.unwrap();
    /// assert_eq!(other.model(), Some("*"));
    /// # Ok::<(), tollgate::ConfigError>(())
    /// # }).unwrap();
    /// ```
    pub fn standing_of_model<B>(
        &self,
        req: &http::Request<B>,
        model: &str,
    ) -> impl Future<Output = Result<Standing, Rejection>> + Send + 'static
    where
        K: KeyExtractor,
    {
        self.standing_for(req, Some(model))
    }

    /// [`standing_of`](Self::standing_of) for a request to `model`, if any.
    fn standing_for<B>(
        &self,
        req: &http::Request<B>,
        model: Option<&str>,
    ) -> impl Future<Output = Result<Standing, Rejection>> + Send + 'static
    where
        K: KeyExtractor,
    {
        let view = RequestView::new(req);
        let mut report = Report::default();
        let mut peek = Peek {
            model,
            ..Peek::default()
        };
        let step = match self.shared.extractor.extract(&view) {
            Ok(key) => self.shared.peek_any(key.as_bytes(), &mut report, &mut peek),
            Err(e) => self.shared.peek_keyless(&view, e, &mut report, &mut peek),
        };
        stand(
            Arc::clone(&self.shared),
            step,
            report,
            peek.found(),
            model.map(str::to_owned),
        )
    }

    /// A handle to change keys and plans while serving and to read usage
    /// (see [`Admin`]).
    pub fn admin(&self) -> Admin<S> {
        Admin::new(
            self.shared.policy.clone(),
            self.shared.store.clone(),
            self.shared.resolver.clone(),
        )
    }

    /// The style the layer answers in ([`style`](RateLimitLayerBuilder::style)),
    /// for the other answers of a server that should look the same (its 404s,
    /// say).
    pub fn style(&self) -> ResponseStyle {
        self.shared.style
    }

    /// The store that holds this layer's limit state.
    pub fn store(&self) -> &S {
        &self.shared.store
    }

    /// How many times the store failed to decide (unreachable, timed out).
    /// Each failure was decided by the plan's failure mode; a burst of
    /// failures is logged once (a `tracing` warning), and its end once.
    pub fn store_failures(&self) -> u64 {
        self.shared.failures.count()
    }
}

/// How a key stands after a peek's first `step` (the rest of
/// [`RateLimitLayer::standing`]); `found` is what the peek found.
async fn stand<K, S: Store>(
    shared: SharedState<K, S>,
    step: Step<S::Future>,
    mut report: Report,
    found: Peek<'static, S::Future>,
    model: Option<String>,
) -> Result<Standing, Rejection> {
    // A key the resolver is asked about is read after the lookup, for the
    // same model.
    let mut peek = Peek {
        model: model.as_deref(),
        ..found
    };
    let step = match step {
        Step::Resolve(lookup) => shared.peek_resolved(&lookup.await, &mut report, &mut peek),
        step => step,
    };
    let decided = async {
        match step {
            Step::Done(d) => d.map(|()| report),
            Step::Wait(f, failure, watch) => shared.conclude_watched(f.await, failure, watch, None),
            Step::Resolve(_) => Err(refused(Rejection::key(Reason::ResolverUnavailable), None)),
            Step::Read(_) => Ok(report),
        }
    };
    // The method overrides are read while the peek's own answer is awaited:
    // with a remote store, every call is in flight at once.
    let methods = methods(&shared, std::mem::take(&mut peek.methods));
    let (decided, methods) = both(decided, methods).await;
    // A peek takes no place; a store that took one anyway gets it back.
    if let Ok(report) = &decided {
        for permit in report.permits() {
            shared.store.release(permit);
        }
    }
    let methods = match (&decided, methods) {
        (_, Ok(methods)) => methods,
        // A key refused is refused as such, whatever the store answered.
        (Err(refusal), Err(_)) if refusal.1.is_none() => Vec::new(),
        (_, Err(rejection)) => return Err(shared.styled(rejection)),
    };
    let plan = peek.plan.map(|p| p.to_string()).unwrap_or_default();
    let model = peek.entry.map(|e| e.to_string());
    match decided {
        Ok(report) => Ok(Standing {
            plan,
            model,
            limits: report.items().to_vec(),
            methods,
            refused: None,
        }),
        Err(refusal) => match *refusal {
            (rejection, Some(limit)) => Ok(Standing {
                plan,
                model,
                limits: vec![limit],
                methods,
                refused: Some(shared.styled(rejection)),
            }),
            (rejection, None) => Err(shared.styled(rejection)),
        },
    }
}

/// How the method overrides peeked at stand, their stores' answers awaited
/// together (with a remote store, the calls are in flight at once). A
/// failed store is answered as the peek's own failure is, by the plan's
/// failure mode: an override a failure let through unchecked is left out,
/// one it refused refuses the standing.
async fn methods<K, S: Store>(
    shared: &Shared<K, S>,
    peeked: Vec<MethodPeek<S::Future>>,
) -> Result<Vec<MethodStanding>, Rejection> {
    let mut methods = Vec::with_capacity(peeked.len());
    let mut answers = Vec::with_capacity(peeked.len());
    let mut pending = Vec::with_capacity(peeked.len());
    for m in peeked {
        match m.answer {
            Acquired::Ready(result) => answers.push(Some((result, false))),
            Acquired::Pending(f) => {
                answers.push(None);
                pending.push((answers.len() - 1, Box::pin(f)));
            }
        }
        methods.push((m.written, m.failure));
    }
    std::future::poll_fn(|cx| {
        pending.retain_mut(|(i, f)| match f.as_mut().poll(cx) {
            Poll::Ready(result) => {
                answers[*i] = Some((result, true));
                false
            }
            Poll::Pending => true,
        });
        if pending.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    let mut standing = Vec::with_capacity(methods.len());
    for ((method, failure), answer) in methods.into_iter().zip(answers) {
        let Some((result, waited)) = answer else {
            continue;
        };
        let limit = match shared.conclude(result, failure, waited) {
            Ok(report) => report.items().first().copied(),
            Err(refusal) => match *refusal {
                (_, Some(limit)) => Some(limit),
                (rejection, None) => return Err(rejection),
            },
        };
        if let Some(limit) = limit {
            standing.push(MethodStanding { method, limit });
        }
    }
    Ok(standing)
}

/// Both futures' outputs, the two polled in turn until both are ready.
async fn both<A: Future, B: Future>(a: A, b: B) -> (A::Output, B::Output) {
    let (mut a, mut b) = (pin!(a), pin!(b));
    let (mut out_a, mut out_b) = (None, None);
    std::future::poll_fn(|cx| {
        if out_a.is_none() {
            if let Poll::Ready(v) = a.as_mut().poll(cx) {
                out_a = Some(v);
            }
        }
        if out_b.is_none() {
            if let Poll::Ready(v) = b.as_mut().poll(cx) {
                out_b = Some(v);
            }
        }
        match (out_a.take(), out_b.take()) {
            (Some(a), Some(b)) => Poll::Ready((a, b)),
            (a, b) => {
                (out_a, out_b) = (a, b);
                Poll::Pending
            }
        }
    })
    .await
}

impl<K, S> Clone for RateLimitLayer<K, S> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<K, S: fmt::Debug> fmt::Debug for RateLimitLayer<K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("policy", &self.shared.policy)
            .field("store", &self.shared.store)
            .field("headers", &self.shared.headers)
            .finish_non_exhaustive()
    }
}

impl<Svc, K, S> Layer<Svc> for RateLimitLayer<K, S> {
    type Service = RateLimit<Svc, K, S>;

    fn layer(&self, inner: Svc) -> Self::Service {
        RateLimit::from_shared(inner, Arc::clone(&self.shared))
    }
}

/// Configures a [`RateLimitLayer`].
///
/// ```
/// use tollgate::extract::ClientIp;
/// use tollgate::{HeaderStyle, MemoryStore, Policy, RateLimitLayer, Throttle, UsagePlan};
///
/// // 10 requests per second per client IP, bursts of 20, legacy headers too.
/// let layer = RateLimitLayer::builder(Policy::per_key(
///     UsagePlan::new("per-ip").throttle(Throttle::new(10.0, 20)?),
/// )?)
/// .extractor(ClientIp::new())
/// .store(MemoryStore::builder().max_keys(100_000).build()?)
/// .headers(HeaderStyle::ietf().x_ratelimit(true))
/// .build();
/// # Ok::<(), tollgate::ConfigError>(())
/// ```
#[must_use]
pub struct RateLimitLayerBuilder<K, S = MemoryStore> {
    extractor: K,
    policy: Policy,
    store: S,
    headers: HeaderStyle,
    on_rejection: Option<Arc<dyn OnRejection>>,
    quota_status: StatusCode,
    style: ResponseStyle,
    max_retry: Duration,
    estimator: Box<dyn CostEstimator>,
    /// An estimator was given, which may check bodies under every plan.
    body_checks: bool,
    body_limits: BodyLimits,
    observer: Option<Arc<dyn Observer>>,
    resolver: Option<Resolver>,
    model: Option<ModelOf>,
}

impl<K, S: Store> RateLimitLayerBuilder<K, S> {
    /// Where keys come from (default: [`ApiKeyHeader`], the `x-api-key` header).
    pub fn extractor<K2: KeyExtractor>(self, extractor: K2) -> RateLimitLayerBuilder<K2, S> {
        RateLimitLayerBuilder {
            extractor,
            policy: self.policy,
            store: self.store,
            headers: self.headers,
            on_rejection: self.on_rejection,
            quota_status: self.quota_status,
            style: self.style,
            max_retry: self.max_retry,
            estimator: self.estimator,
            body_checks: self.body_checks,
            body_limits: self.body_limits,
            observer: self.observer,
            resolver: self.resolver,
            model: self.model,
        }
    }

    /// The store (default: a new [`MemoryStore`]). Layers given clones of one
    /// store share the state of limits that have the same place: plans of the
    /// same name (and stage limits), as instances sharing one budget would.
    /// Give layers that must count apart their own stores or distinct plan names.
    pub fn store<S2: Store>(self, store: S2) -> RateLimitLayerBuilder<K, S2> {
        RateLimitLayerBuilder {
            extractor: self.extractor,
            policy: self.policy,
            store,
            headers: self.headers,
            on_rejection: self.on_rejection,
            quota_status: self.quota_status,
            style: self.style,
            max_retry: self.max_retry,
            estimator: self.estimator,
            body_checks: self.body_checks,
            body_limits: self.body_limits,
            observer: self.observer,
            resolver: self.resolver,
            model: self.model,
        }
    }

    /// How a request's tokens are estimated before it is decided, for plans
    /// with a [`TokenBudget`](crate::TokenBudget) (default:
    /// [`ExtensionEstimate`], the request's
    /// [`TokenEstimate`](crate::TokenEstimate) extension). A closure
    /// `Fn(&RequestView<'_>) -> u32` will do; see [`cost`](crate::cost). An
    /// estimator may also have bodies checked before the decision under
    /// every plan ([`CostEstimator::checks_body`]).
    pub fn estimator(mut self, estimator: impl CostEstimator) -> Self {
        self.estimator = Box::new(estimator);
        self.body_checks = true;
        self
    }

    /// The largest request body an estimator that
    /// [reads bodies](CostEstimator::reads_body) may read (default 1 MiB). A
    /// longer body, or a `content-length` that announces one, is answered
    /// 413 without charging any limit.
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.body_limits.max_bytes = bytes;
        self
    }

    /// How long reading a request's body for an estimator that
    /// [reads bodies](CostEstimator::reads_body) may take, from its first
    /// poll to its end (default 10 s). A body still unfinished then is
    /// answered 408 without charging any limit.
    pub fn body_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.body_limits.timeout = timeout;
        self
    }

    /// The most bytes the bodies being read for an estimator that
    /// [reads bodies](CostEstimator::reads_body) may hold together, across
    /// every request in flight through this layer and its clones (default
    /// 64 MiB). Each body is bounded by
    /// [`max_body_bytes`](Self::max_body_bytes) and
    /// [`body_timeout`](Self::body_timeout), but many slow ones at once could
    /// hold their sum for as long: a body whose next piece would take the
    /// total past this bound is answered 503 at once, with `retry-after: 1`,
    /// without charging any limit. The bytes are counted as they arrive,
    /// never from what `content-length` announces, and given back when the
    /// body has been read (or refused). Keep it at least `max_body_bytes`,
    /// or the largest bodies are never read.
    ///
    /// One caller (a key, or a client address under an anonymous plan) holds
    /// at most its share of it: see
    /// [`max_body_bytes_held_per_caller`](Self::max_body_bytes_held_per_caller).
    pub fn max_body_bytes_held(mut self, bytes: usize) -> Self {
        self.body_limits.max_held = bytes;
        self
    }

    /// The most bytes one caller's bodies being read for an estimator may
    /// hold together, of [`max_body_bytes_held`](Self::max_body_bytes_held)
    /// (default: a sixteenth of it, but at least one whole body of
    /// [`max_body_bytes`](Self::max_body_bytes)). Bodies are read before
    /// any limit is decided, so neither a key's throttle nor its
    /// concurrency cap bounds how many it sends at once: without a share,
    /// one key (or one address) sending slow bodies could hold all the
    /// memory for bodies and have every other caller's body answered 503.
    /// A body that would take its caller past its share is answered 503 at
    /// once, with `retry-after: 1`, without charging any limit. A caller is
    /// the subject whose limits apply: a registered key's id, a per-key or
    /// client-address value.
    ///
    /// ```
    /// use tollgate::{Policy, RateLimitLayer, Throttle, UsagePlan};
    ///
    /// let policy = Policy::per_key(UsagePlan::new("p").throttle(Throttle::new(10.0, 10)?))?;
    /// let layer = RateLimitLayer::builder(policy)
    ///     .max_body_bytes_held(64 << 20)
    ///     .max_body_bytes_held_per_caller(8 << 20)
    ///     .build();
    /// # let _ = layer;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn max_body_bytes_held_per_caller(mut self, bytes: usize) -> Self {
        self.body_limits.max_held_per_caller = Some(bytes);
        self
    }

    /// Which rate-limit headers to send (default: [`HeaderStyle::ietf`]).
    pub fn headers(mut self, headers: HeaderStyle) -> Self {
        self.headers = headers;
        self
    }

    /// The status of a request rejected by a used-up quota (default 429; AWS
    /// API Gateway answers 429, some APIs prefer 403).
    pub fn quota_status(mut self, status: StatusCode) -> Self {
        self.quota_status = status;
        self
    }

    /// How rejections are answered (default: [`ResponseStyle::Aws`]).
    ///
    /// ```
    /// use tollgate::{Policy, RateLimitLayer, ResponseStyle, Throttle, UsagePlan};
    ///
    /// let policy = Policy::per_key(UsagePlan::new("p").throttle(Throttle::new(1.0, 1)?))?;
    /// let layer = RateLimitLayer::builder(policy)
    ///     .style(ResponseStyle::OpenAi)
    ///     .build();
    /// assert!(layer.check(b"k", 1).is_ok());
    /// let rejected = layer.check(b"k", 1).unwrap_err();
    /// assert_eq!(rejected.style(), ResponseStyle::OpenAi);
    /// # Ok::<(), tollgate::ConfigError>(())
    /// ```
    pub fn style(mut self, style: ResponseStyle) -> Self {
        self.style = style;
        self
    }

    /// The longest retry worth waiting for (default 60 s): a rejection whose
    /// retry lies further away (a quota that renews tomorrow) is answered
    /// with `x-should-retry: false` (gRPC: `grpc-retry-pushback-ms: -1`), so
    /// that clients' retry loops give up at once instead of sleeping.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate::{Policy, RateLimitLayer, Throttle, UsagePlan};
    ///
    /// // One request every 10 s: its retry lies beyond a 5 s bound.
    /// let policy = Policy::per_key(UsagePlan::new("p").throttle(Throttle::new(0.1, 1)?))?;
    /// let layer = RateLimitLayer::builder(policy)
    ///     .max_retry(Duration::from_secs(5))
    ///     .build();
    /// layer.check(b"k", 1).unwrap();
    /// assert!(!layer.check(b"k", 1).unwrap_err().should_retry());
    /// # Ok::<(), tollgate::ConfigError>(())
    /// ```
    pub fn max_retry(mut self, max_retry: Duration) -> Self {
        self.max_retry = max_retry;
        self
    }

    /// Answers as the configuration file says: its `quota_status`
    /// ([`quota_status`](Self::quota_status)), its `[response]` table's
    /// `style` ([`style`](Self::style)) and `max_retry_secs`
    /// ([`max_retry`](Self::max_retry)), and with `style = "openai"`
    /// OpenAI's `x-ratelimit-*-{requests,tokens}` headers added to those
    /// configured. Each is set as the file says, the default of one it
    /// leaves out included (a file without `[response]` answers in the
    /// [`Aws`](ResponseStyle::Aws) style): a builder method called after
    /// this one overrides the file.
    ///
    /// Where keys come from is not the file's to say (the extractor is a
    /// type): a file with `style = "openai"` goes with
    /// [`openai`](Self::openai) before this call, so that keys come from
    /// `Authorization: Bearer` (or `x-api-key`) as OpenAI's SDKs send them.
    ///
    /// ```
    /// use tollgate::config::Config;
    /// use tollgate::{RateLimitLayer, ResponseStyle};
    ///
    /// let config = Config::from_toml(r#"
    /// [[plans]]
    /// name = "free"
    /// throttle = { rate = 1.0, burst = 1 }
    ///
    /// [[keys]]
    /// id = "free-1"
    /// value = "sk-demo"
    /// plan = "free"
    ///
    /// [response]
    /// style = "openai"
    /// "#)?;
    /// let layer = RateLimitLayer::builder(config.policy()?)
    ///     .openai()
    ///     .config(&config)
    ///     .build();
    /// layer.check(b"sk-demo", 1).unwrap();
    /// assert_eq!(layer.check(b"sk-demo", 1).unwrap_err().style(), ResponseStyle::OpenAi);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(feature = "config")]
    #[cfg_attr(docsrs, doc(cfg(feature = "config")))]
    pub fn config(mut self, config: &crate::config::Config) -> Self {
        let style = config.style();
        if style == ResponseStyle::OpenAi {
            self.headers = self.headers.openai(true);
        }
        self.quota_status(config.quota_status())
            .style(style)
            .max_retry(config.max_retry())
    }

    /// Everything OpenAI's clients expect: keys from `Authorization: Bearer`
    /// or `x-api-key` ([`BearerOrApiKey`]), the
    /// [`OpenAi`](ResponseStyle::OpenAi) style, and OpenAI's
    /// `x-ratelimit-*-{requests,tokens}` headers added to those configured.
    /// Later calls can change any of them.
    ///
    /// ```
    /// use tollgate::{Policy, RateLimitLayer, Throttle, UsagePlan};
    ///
    /// let policy = Policy::per_key(UsagePlan::new("p").throttle(Throttle::new(1.0, 1)?))?;
    /// let layer = RateLimitLayer::builder(policy).openai().build();
    /// # let _ = layer;
    /// # Ok::<(), tollgate::ConfigError>(())
    /// ```
    pub fn openai(self) -> RateLimitLayerBuilder<BearerOrApiKey, S> {
        let headers = self.headers.openai(true);
        self.extractor(BearerOrApiKey::new())
            .style(ResponseStyle::OpenAi)
            .headers(headers)
    }

    /// Builds rejection responses with `f` instead of the defaults. Rate-limit
    /// headers and `Retry-After` are still added, and the [`Rejection`](crate::Rejection)
    /// is still put in the response extensions.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use tollgate::{Policy, RateLimitLayer, Rejection, Throttle, UsagePlan};
    ///
    /// let policy = Policy::per_key(UsagePlan::new("p").throttle(Throttle::new(1.0, 1)?))?;
    /// let layer = RateLimitLayer::builder(policy)
    ///     .on_rejection(|r: &Rejection| {
    ///         http::Response::builder()
    ///             .status(r.status())
    ///             .body(Bytes::from(format!("slow down: {r}")))
    ///             .unwrap()
    ///     })
    ///     .build();
    /// # Ok::<(), tollgate::ConfigError>(())
    /// ```
    pub fn on_rejection(mut self, f: impl OnRejection) -> Self {
        self.on_rejection = Some(Arc::new(f));
        self
    }

    /// Calls `observer` once per decision (see [`observe`](crate::observe)):
    /// [`TracingObserver`](crate::observe::TracingObserver) logs each one,
    /// `MetricsObserver` (feature `metrics`) counts them, a closure
    /// `Fn(&DecisionEvent<'_>)` does what it likes. Without an observer,
    /// deciding costs one branch more.
    ///
    /// ```
    /// use tollgate::observe::TracingObserver;
    /// use tollgate::{Policy, RateLimitLayer, Throttle, UsagePlan};
    ///
    /// let policy = Policy::per_key(UsagePlan::new("p").throttle(Throttle::new(1.0, 1)?))?;
    /// let layer = RateLimitLayer::builder(policy)
    ///     .observer(TracingObserver::new())
    ///     .build();
    /// # Ok::<(), tollgate::ConfigError>(())
    /// ```
    pub fn observer(mut self, observer: impl Observer) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// Asks `resolver` for key values the policy does not hold (a database
    /// of keys), caching its answers (see [`Resolver`] and
    /// [`KeyResolver`](crate::KeyResolver)). Registered keys are found first;
    /// a [`Policy::per_key`] policy never asks. Without a resolver, a value
    /// not registered is answered 403.
    pub fn resolver(mut self, resolver: Resolver) -> Self {
        self.resolver = Some(resolver);
        self
    }

    /// Names the model a request is for, for plans with limits per model
    /// ([`UsagePlan::model`](crate::UsagePlan::model)): from a header, a
    /// path segment, an extension a layer before this one put there. Asked
    /// only for requests whose plan has model limits. A request it names no
    /// model for (`None`) gets the plan's `"*"` entry if there is one, else
    /// only the plan's own limits.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use bytes::Bytes;
    /// use http::{Request, Response, StatusCode};
    /// use tower::{ServiceBuilder, ServiceExt};
    /// use tollgate::{ApiKey, ModelLimits, Policy, RateLimitLayer, Throttle, UsagePlan};
    ///
    /// let plan = UsagePlan::new("pro")
    ///     .model("big-model", ModelLimits::new().throttle(Throttle::new(1.0, 1)?));
    /// let policy = Policy::builder()
    ///     .plan(plan)
    ///     .key(ApiKey::new("k1", "secret-1", "pro"))
    ///     .build()?;
    /// let layer = RateLimitLayer::builder(policy)
    ///     .model(|req| req.headers.get("x-model")?.to_str().ok())
    ///     .build();
    /// let svc = ServiceBuilder::new()
    ///     .layer(layer)
    ///     .service_fn(|_req: Request<tollgate::RequestBody<String>>| async {
    ///         Ok::<_, Infallible>(Response::new(String::new()))
    ///     });
    /// let call = |model: &str| {
    ///     let req = Request::get("/")
    ///         .header("x-api-key", "secret-1")
    ///         .header("x-model", model)
    ///         .body(String::new())
    ///         .unwrap();
    ///     svc.clone().oneshot(req)
    /// };
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// assert_eq!(call("big-model").await.unwrap().status(), StatusCode::OK);
    /// // The model's bucket is empty; another model is not limited by it.
    /// assert_eq!(call("big-model").await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    /// assert_eq!(call("small-model").await.unwrap().status(), StatusCode::OK);
    /// # });
    /// # Ok::<(), tollgate::ConfigError>(())
    /// ```
    pub fn model<F>(mut self, f: F) -> Self
    where
        F: for<'a> Fn(&RequestView<'a>) -> Option<&'a str> + Send + Sync + 'static,
    {
        self.model = Some(Box::new(f));
        self
    }

    /// Builds the layer and its shared state.
    pub fn build(self) -> RateLimitLayer<K, S> {
        let resolver = self.resolver.map(|r| Arc::new(r.build()));
        match self.store.shared_registry() {
            // A plan put anew through another instance converts the state
            // of the keys the resolver holds, as one put through `Admin`.
            Some(shared) => self.policy.attach(&shared, resolver.clone()),
            None => self.policy.seal(),
        }
        RateLimitLayer {
            shared: Arc::new(Shared {
                extractor: self.extractor,
                fixed: self.policy.load().per_key.clone(),
                policy: self.policy,
                store: self.store,
                headers: self.headers,
                on_rejection: self.on_rejection,
                quota_status: self.quota_status,
                style: self.style,
                max_retry: self.max_retry,
                estimator: self.estimator,
                body_checks: self.body_checks,
                body_limits: self.body_limits,
                body_memory: Arc::new(super::read::BodyMemory::new(&self.body_limits)),
                failures: Failures::default(),
                observer: self.observer,
                resolver,
                model: self.model,
            }),
        }
    }
}

impl<K: fmt::Debug, S> fmt::Debug for RateLimitLayerBuilder<K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayerBuilder")
            .field("extractor", &self.extractor)
            .field("policy", &self.policy)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

/// What [`RateLimitLayer::decide`] decided before its future was polled:
/// the places under concurrency caps its report holds are given back when
/// it is dropped, unless the future took the report to give them back
/// itself.
struct Held<K, S: Store> {
    shared: SharedState<K, S>,
    report: Report,
}

impl<K, S: Store> Drop for Held<K, S> {
    fn drop(&mut self) {
        for permit in self.report.permits() {
            self.shared.store.release(permit);
        }
    }
}
