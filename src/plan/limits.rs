//! The public plan values, what a user builds a policy from.
//!
//! Throttles, quotas, token budgets, failure modes, usage plans, API keys,
//! stage limits and what happens to requests without a key. `compiled` turns
//! plans and stages into the limits a store decides on.

use std::fmt;

use crate::error::ConfigError;
use crate::extract::ClientIp;
use crate::gcra::Gcra;
use crate::window::{Date, NANOS_PER_DAY, Period};

/// A throttle: a token bucket of `burst` requests refilled at `rate` per second.
///
/// A new key starts with a full bucket: `burst` requests at once pass, the next
/// one is throttled, and one more passes every `1 / rate` seconds. `rate` may be
/// fractional (`0.5` is one request every two seconds).
///
/// ```
/// use tollgate::Throttle;
///
/// let t = Throttle::new(2.0, 5).unwrap();
/// assert_eq!((t.rate(), t.burst()), (2.0, 5));
/// assert!(Throttle::new(0.0, 5).is_err());
/// assert!(Throttle::new(f64::NAN, 5).is_err());
/// assert!(Throttle::new(1.0, 0).is_err());
/// ```
#[derive(Clone, Copy, PartialEq)]
pub struct Throttle {
    rate: f64,
    gcra: Gcra,
}

impl Throttle {
    /// A throttle of `rate` requests per second with a bucket of `burst`.
    ///
    /// Errors when `rate` is not a finite number above zero, when `burst` is
    /// zero, or when the numbers are out of range (rate above 1e9/s, a bucket
    /// that takes more than ~146 years to refill).
    pub fn new(rate: f64, burst: u32) -> Result<Self, ConfigError> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(ConfigError::InvalidRate(rate));
        }
        if burst == 0 {
            return Err(ConfigError::ZeroBurst);
        }
        let gcra = Gcra::new(rate, burst).ok_or(ConfigError::SpanOutOfRange { rate, burst })?;
        Ok(Self { rate, gcra })
    }

    /// Requests (cost units) per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The bucket size.
    pub fn burst(&self) -> u32 {
        self.gcra.burst()
    }

    pub(crate) fn gcra(&self) -> &Gcra {
        &self.gcra
    }
}

impl fmt::Debug for Throttle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Throttle")
            .field("rate", &self.rate)
            .field("burst", &self.burst())
            .finish()
    }
}

/// A calendar quota: at most `limit` requests per UTC day, week or month.
///
/// `offset` (as in AWS API Gateway) is deducted from the limit in the window in
/// which the plan was created: the window holding the day given to
/// [`created_on`](Self::created_on), or without one, the window in which the
/// policy is built (each start of the process: a process restarted in a later
/// window deducts the offset there again, so give the date when it must hold
/// once).
///
/// ```
/// use tollgate::{Date, Period, Quota};
///
/// let created = Date::new(2026, 12, 6).unwrap();
/// let q = Quota::new(1000, Period::Month)?.with_offset(200)?.created_on(created);
/// assert_eq!((q.limit(), q.offset(), q.created()), (1000, 200, Some(created)));
/// assert!(Quota::new(0, Period::Month).is_err());
/// # Ok::<(), tollgate::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub(super) limit: u64,
    pub(super) period: Period,
    pub(super) offset: u64,
    pub(super) created: Option<Date>,
}

/// The largest quota limit: 2^53, so that it survives a trip through JSON.
const MAX_QUOTA: u64 = 1 << 53;

impl Quota {
    /// `limit` requests per `period`; errors when `limit` is 0 or above 2^53.
    pub fn new(limit: u64, period: Period) -> Result<Self, ConfigError> {
        if limit == 0 || limit > MAX_QUOTA {
            return Err(ConfigError::InvalidQuota(
                "limit must be between 1 and 2^53",
            ));
        }
        Ok(Quota {
            limit,
            period,
            offset: 0,
            created: None,
        })
    }

    /// Deducts `offset` from the limit in the window in which the plan is
    /// created; errors when `offset` is not below `limit`.
    pub fn with_offset(mut self, offset: u64) -> Result<Self, ConfigError> {
        if offset >= self.limit {
            return Err(ConfigError::InvalidQuota("offset must be below the limit"));
        }
        self.offset = offset;
        Ok(self)
    }

    /// Requests per window.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The window.
    pub fn period(&self) -> Period {
        self.period
    }

    /// Requests deducted in the plan's first window.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Dates the plan's creation (a UTC day): its offset is deducted in the
    /// window holding that day, whenever the policy is built.
    #[must_use]
    pub fn created_on(mut self, date: Date) -> Self {
        self.created = Some(date);
        self
    }

    /// The day the plan was created, when given.
    pub fn created(&self) -> Option<Date> {
        self.created
    }

    /// When the plan was created (wall nanoseconds): the day given to
    /// [`created_on`](Self::created_on), else `built`, when the policy
    /// first held the plan.
    pub(crate) fn created_at(&self, built: i64) -> i64 {
        self.created
            .map_or(built, |d| d.days().saturating_mul(NANOS_PER_DAY))
    }
}

/// A token budget: what a key may spend in cost units (an inference API's
/// tokens) per minute, per UTC day and per UTC month.
///
/// `per_minute` is a bucket of that many tokens refilled at `per_minute / 60`
/// per second (GCRA on cost units, so a key may spend a minute's tokens at
/// once); `per_day` and `per_month` are calendar quotas counted in tokens.
/// A request reserves its estimated tokens before the call (see
/// [`CostEstimator`](crate::CostEstimator)); the actual cost is settled after
/// the response (see [`TokenUsage`](crate::TokenUsage)). An under-estimate
/// puts the budget in debt: the next requests wait until it is repaid. A
/// request whose estimate exceeds a whole budget is refused at once
/// ([`Reason::CostExceedsLimit`](crate::Reason::CostExceedsLimit)).
///
/// ```
/// use tollgate::{TokenBudget, UsagePlan};
///
/// let budget = TokenBudget::new().per_minute(40_000)?.per_day(1_000_000)?;
/// let plan = UsagePlan::new("free").tokens(budget);
/// assert_eq!(plan.get_tokens().unwrap().get_per_minute(), Some(40_000));
/// assert!(TokenBudget::new().per_minute(0).is_err());
/// # Ok::<(), tollgate::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenBudget {
    pub(super) per_minute: Option<u32>,
    pub(super) per_day: Option<u64>,
    pub(super) per_month: Option<u64>,
}

impl TokenBudget {
    /// A budget with no limit yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// At most `n` tokens a minute, in bursts of up to `n`; errors when `n` is 0.
    pub fn per_minute(mut self, n: u32) -> Result<Self, ConfigError> {
        // Checks the numbers as a throttle of n/60 per second.
        Throttle::new(f64::from(n) / 60.0, n)?;
        self.per_minute = Some(n);
        Ok(self)
    }

    /// At most `n` tokens a UTC day; errors when `n` is 0 or above 2^53.
    pub fn per_day(mut self, n: u64) -> Result<Self, ConfigError> {
        Quota::new(n, Period::Day)?;
        self.per_day = Some(n);
        Ok(self)
    }

    /// At most `n` tokens a UTC month; errors when `n` is 0 or above 2^53.
    pub fn per_month(mut self, n: u64) -> Result<Self, ConfigError> {
        Quota::new(n, Period::Month)?;
        self.per_month = Some(n);
        Ok(self)
    }

    /// Tokens a minute.
    pub fn get_per_minute(&self) -> Option<u32> {
        self.per_minute
    }

    /// Tokens a UTC day.
    pub fn get_per_day(&self) -> Option<u64> {
        self.per_day
    }

    /// Tokens a UTC month.
    pub fn get_per_month(&self) -> Option<u64> {
        self.per_month
    }
}

/// What a plan does when its store fails (times out, is unreachable, or has
/// more calls in flight than it takes and has not just denied the request:
/// see [`max_in_flight`](crate::RedisStoreBuilder::max_in_flight)).
///
/// The in-memory store cannot fail; this matters with a remote store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FailureMode {
    /// Decide with this instance's own in-memory copy of the plan's limits
    /// (the default): an outage admits at most N times the limits on N
    /// instances, never unlimited traffic, and the answer carries rate-limit
    /// headers as usual. The Redis store keeps that copy; a store of your
    /// own that fails instead (answers an error) gets 503, as with
    /// [`Closed`](FailureMode::Closed).
    #[default]
    Local,
    /// Let requests through, without rate-limit headers (the AWS and Kong
    /// behaviour). Worst case: while the store fails, every request passes,
    /// however many; the limits bound nothing.
    Open,
    /// Answer 503.
    Closed,
}

/// A usage plan: the limits that apply to every key bound to it.
///
/// Throttles and quotas are counted per (plan, key), across all routes of the
/// plan, as AWS API Gateway counts them. A method override adds its own bucket
/// for the routes it matches; the plan-wide throttle and quota still apply.
///
/// ```
/// use tollgate::{Period, Quota, Throttle, UsagePlan};
///
/// let free = UsagePlan::new("free")
///     .throttle(Throttle::new(2.0, 5)?)
///     .quota(Quota::new(1000, Period::Day)?)
///     .method("/v1/chat/completions/POST", Throttle::new(1.0, 2)?);
/// assert_eq!(free.name(), "free");
/// # Ok::<(), tollgate::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct UsagePlan {
    pub(super) name: String,
    pub(super) throttle: Option<Throttle>,
    pub(super) quota: Option<Quota>,
    pub(super) methods: Vec<(String, Throttle)>,
    pub(super) tokens: Option<TokenBudget>,
    pub(super) concurrency: Option<u32>,
    pub(super) models: Vec<(String, ModelLimits)>,
    pub(super) failure: FailureMode,
    pub(super) borrow: bool,
    pub(super) shadow: bool,
}

impl UsagePlan {
    /// A plan with no limits yet.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            throttle: None,
            quota: None,
            methods: Vec::new(),
            tokens: None,
            concurrency: None,
            models: Vec::new(),
            failure: FailureMode::Local,
            borrow: true,
            shadow: false,
        }
    }

    /// Sets the plan-wide throttle.
    #[must_use]
    pub fn throttle(mut self, throttle: Throttle) -> Self {
        self.throttle = Some(throttle);
        self
    }

    /// Sets the plan's calendar quota.
    #[must_use]
    pub fn quota(mut self, quota: Quota) -> Self {
        self.quota = Some(quota);
        self
    }

    /// Adds a throttle for the routes matching `method_path`, an AWS methodPath:
    /// the route then the method, `"/v1/completions/POST"`. A `*` segment
    /// matches any one segment, a `*` method any method, and `"/*/*"` every
    /// route. When several overrides match, the most literal one applies.
    /// An override matches a request whose path matches it (the path the
    /// client sent, percent-decoded and its dot segments resolved:
    /// `/v1/%63ompletions`, `/v1%2Fcompletions` and `/v1/x/../completions`
    /// are `/v1/completions`) or whose route as axum declared it (`MatchedPath`)
    /// does: `"/users/{id}/GET"` and `"/users/42/GET"` both match a request
    /// for `/users/42` served by the route `/users/{id}`, and
    /// `"/v1/completions/POST"` matches it served by a catch-all `/v1/{*path}`.
    /// A `GET` override holds `HEAD` requests too, which axum answers with
    /// the `GET` handler; a `HEAD` override of the same route is the more
    /// literal.
    #[must_use]
    pub fn method(mut self, method_path: impl Into<String>, throttle: Throttle) -> Self {
        self.methods.push((method_path.into(), throttle));
        self
    }

    /// Sets the plan's token budget: limits in cost units (tokens) beside the
    /// request limits, reserved before the call and settled after it.
    #[must_use]
    pub fn tokens(mut self, budget: TokenBudget) -> Self {
        self.tokens = Some(budget);
        self
    }

    /// Caps the requests of one key in flight at `n`: a request holds its
    /// place until its response body ends (or fails, or is dropped because
    /// the client went away), not merely until the handler returns, so a
    /// streamed answer holds it to its last event. Over the cap: 429.
    #[must_use]
    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = Some(n);
        self
    }

    /// Adds limits for requests to the model `name` (see [`ModelLimits`]);
    /// `"*"` is the entry of every model the plan does not name. Adding a
    /// name twice replaces its limits.
    ///
    /// The entry holds every name a backend serves as the same model:
    /// names are compared without regard to ASCII case, and a tag
    /// `:latest`, an Ollama namespace `library/`, its registry
    /// `registry.ollama.ai/` in front of a namespace and a scheme in front
    /// (`https://`, `ftp://`: what comes up to the first `://`) are left
    /// out, as Ollama reads them.
    /// `"big-model"` holds requests for `Big-Model`, `big-model:latest` and
    /// `library/big-model`, `"someone/big-model"` those for
    /// `registry.ollama.ai/someone/big-model`; `big-model:70b` and
    /// `someone/big-model` are other models than `big-model`. Two names of one plan that are the same model
    /// (`"big-model"` and `"Big-Model:latest"`) are refused when the plan
    /// is built ([`ConfigError::DuplicateModel`](crate::ConfigError::DuplicateModel)).
    #[must_use]
    pub fn model(mut self, name: impl Into<String>, limits: ModelLimits) -> Self {
        let name = name.into();
        match self.models.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = limits,
            None => self.models.push((name, limits)),
        }
        self
    }

    /// What to do when the store fails (default [`FailureMode::Local`]).
    #[must_use]
    pub fn failure(mut self, mode: FailureMode) -> Self {
        self.failure = mode;
        self
    }

    /// Whether a remote store may lend this plan's instances a share of a
    /// key's throttle and quota, to decide from locally until it is used or
    /// `max_age` old (default `true`; see
    /// [`RedisStoreBuilder::max_age`](crate::RedisStoreBuilder::max_age)
    /// with feature `redis`). Off, every request is decided in the store.
    /// The memory store ignores it.
    #[must_use]
    pub fn borrow(mut self, borrow: bool) -> Self {
        self.borrow = borrow;
        self
    }

    /// A shadow plan decides, counts and sends headers, but never rejects.
    ///
    /// What it lifts is its own limits (throttle, quota, method and model
    /// limits, token budget, concurrency cap): a request past them passes,
    /// and is counted. Who may call is not a limit: a missing, unknown or
    /// disabled key is refused under a shadow plan as under any other, and
    /// so are the limits of a [`Stage`](crate::Stage) or an
    /// [`Account`](crate::Account), which belong to someone else. A body an
    /// estimator must read is still bounded (413, 408) and a body it cannot
    /// read is still a 400, none of which charges anything.
    #[must_use]
    pub fn shadow(mut self, shadow: bool) -> Self {
        self.shadow = shadow;
        self
    }

    /// The plan's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plan-wide throttle.
    pub fn get_throttle(&self) -> Option<Throttle> {
        self.throttle
    }

    /// The quota.
    pub fn get_quota(&self) -> Option<Quota> {
        self.quota
    }

    /// The token budget.
    pub fn get_tokens(&self) -> Option<TokenBudget> {
        self.tokens
    }

    /// The cap on requests of one key in flight.
    pub fn get_concurrency(&self) -> Option<u32> {
        self.concurrency
    }

    /// The limits of the models the plan names, `"*"` included, in the
    /// order they were added.
    pub fn get_models(&self) -> impl Iterator<Item = (&str, &ModelLimits)> {
        self.models.iter().map(|(n, l)| (n.as_str(), l))
    }

    /// The failure mode.
    pub fn get_failure(&self) -> FailureMode {
        self.failure
    }

    /// Whether a remote store may lend shares of the plan's limits.
    pub fn get_borrow(&self) -> bool {
        self.borrow
    }

    /// Whether the plan is a shadow plan.
    pub fn is_shadow(&self) -> bool {
        self.shadow
    }
}

/// Limits of one model within a plan: a throttle, a token budget and a
/// request quota, each optional, added to the plan's own limits for
/// requests to that model ([`UsagePlan::model`]).
///
/// They are counted per (plan, key, model), apart from the plan's limits
/// and from every other model's, and decided with the plan's in one atomic
/// decision: a request denied by the model's limits charges the plan
/// nothing, and one the plan denies charges the model nothing. A model the
/// plan does not name gets the plan's `"*"` entry, whose state all such
/// models share (so that inventing model names never yields fresh limits);
/// without a `"*"` entry, only the plan's limits apply to it. A request
/// whose model cannot be determined counts as a model the plan does not
/// name. A model's entry holds each spelling a backend serves as that
/// model (`Big-Model`, `big-model:latest`: see [`UsagePlan::model`]). Where the name comes from is the layer's
/// ([`RateLimitLayerBuilder::model`](crate::RateLimitLayerBuilder::model)).
///
/// ```
/// use tollgate::{ModelLimits, Throttle, TokenBudget, UsagePlan};
///
/// let plan = UsagePlan::new("pro")
///     .throttle(Throttle::new(10.0, 20)?)
///     .model(
///         "big-model",
///         ModelLimits::new()
///             .throttle(Throttle::new(0.5, 2)?)
///             .tokens(TokenBudget::new().per_minute(10_000)?),
///     )
///     .model("*", ModelLimits::new().tokens(TokenBudget::new().per_minute(40_000)?));
/// assert_eq!(plan.get_models().count(), 2);
/// # Ok::<(), tollgate::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ModelLimits {
    pub(super) throttle: Option<Throttle>,
    pub(super) tokens: Option<TokenBudget>,
    pub(super) quota: Option<Quota>,
    pub(super) concurrency: Option<u32>,
}

impl ModelLimits {
    /// No limits yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the model's throttle.
    #[must_use]
    pub fn throttle(mut self, throttle: Throttle) -> Self {
        self.throttle = Some(throttle);
        self
    }

    /// Sets the model's token budget, charged the request's estimated
    /// tokens and settled as the plan's is.
    #[must_use]
    pub fn tokens(mut self, budget: TokenBudget) -> Self {
        self.tokens = Some(budget);
        self
    }

    /// Sets the model's calendar quota of requests.
    #[must_use]
    pub fn quota(mut self, quota: Quota) -> Self {
        self.quota = Some(quota);
        self
    }

    /// Caps this key's requests to the model in flight at once: a second
    /// cap beside the plan's [`concurrency`](UsagePlan::concurrency), held
    /// until the response ends (a stream's last byte), as the plan's is.
    /// A request takes a place under both, or under neither.
    #[must_use]
    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = Some(n);
        self
    }

    /// The model's throttle.
    pub fn get_throttle(&self) -> Option<Throttle> {
        self.throttle
    }

    /// The model's token budget.
    pub fn get_tokens(&self) -> Option<TokenBudget> {
        self.tokens
    }

    /// The model's request quota.
    pub fn get_quota(&self) -> Option<Quota> {
        self.quota
    }

    /// The model's cap on requests in flight.
    pub fn get_concurrency(&self) -> Option<u32> {
        self.concurrency
    }
}

/// An API key: a public id, a secret value, the plan it is bound to.
///
/// The value is what clients send; it is hashed when the policy is built and
/// never printed (`Debug` shows only the id).
#[derive(Clone)]
pub struct ApiKey {
    pub(crate) id: String,
    pub(crate) value: String,
    pub(crate) plan: String,
    pub(crate) enabled: bool,
    pub(crate) account: Option<String>,
}

impl ApiKey {
    /// An enabled key `id` with secret `value`, bound to `plan`.
    pub fn new(id: impl Into<String>, value: impl Into<String>, plan: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            value: value.into(),
            plan: plan.into(),
            enabled: true,
            account: None,
        }
    }

    /// Makes the key one of the [`Account`](crate::Account) named `name`:
    /// the account's limits, shared by all its keys, apply to its requests
    /// beside its plan's.
    #[must_use]
    pub fn account(mut self, name: impl Into<String>) -> Self {
        self.account = Some(name.into());
        self
    }

    /// The account the key belongs to, if any.
    pub fn get_account(&self) -> Option<&str> {
        self.account.as_deref()
    }

    /// Enables or disables the key (a disabled key is answered 403).
    #[must_use]
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// The key's public id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The plan the key is bound to.
    pub fn plan(&self) -> &str {
        &self.plan
    }

    /// Whether the key is enabled.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("id", &self.id)
            .field("plan", &self.plan)
            .field("enabled", &self.enabled)
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

/// Limits shared by all callers together, as AWS stage throttling: one bucket
/// for every client, protecting the backend's total capacity. A request must
/// pass the stage limits and its plan's limits in the same decision.
///
/// ```
/// use tollgate::{Stage, Throttle};
///
/// let stage = Stage::new()
///     .throttle(Throttle::new(100.0, 200)?)
///     .method("/v1/chat/completions/POST", Throttle::new(20.0, 40)?);
/// # Ok::<(), tollgate::ConfigError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stage {
    pub(super) throttle: Option<Throttle>,
    pub(super) methods: Vec<(String, Throttle)>,
}

impl Stage {
    /// No stage limits yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The throttle shared by every request.
    #[must_use]
    pub fn throttle(mut self, throttle: Throttle) -> Self {
        self.throttle = Some(throttle);
        self
    }

    /// A throttle shared by every request to the routes matching `method_path`
    /// (see [`UsagePlan::method`]).
    #[must_use]
    pub fn method(mut self, method_path: impl Into<String>, throttle: Throttle) -> Self {
        self.methods.push((method_path.into(), throttle));
        self
    }
}

/// What happens to requests that carry no API key.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum Anonymous {
    /// Answer 403 `{"message":"Forbidden"}` (the default).
    #[default]
    Forbid,
    /// Limit them by client IP with this throttle.
    ByIp {
        /// The throttle per client IP.
        throttle: Throttle,
        /// How the client IP is found (trusted proxies, IPv6 grouping).
        client_ip: ClientIp,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_throttles_and_quotas_are_config_errors() {
        assert_eq!(Throttle::new(0.0, 1), Err(ConfigError::InvalidRate(0.0)));
        assert_eq!(Throttle::new(-2.0, 1), Err(ConfigError::InvalidRate(-2.0)));
        assert!(matches!(
            Throttle::new(f64::NAN, 1),
            Err(ConfigError::InvalidRate(_))
        ));
        assert!(matches!(
            Throttle::new(f64::INFINITY, 1),
            Err(ConfigError::InvalidRate(_))
        ));
        assert_eq!(Throttle::new(1.0, 0), Err(ConfigError::ZeroBurst));
        assert!(matches!(
            Throttle::new(1e-12, 1000),
            Err(ConfigError::SpanOutOfRange { .. })
        ));
        assert_eq!(
            Throttle::new(0.0, 1).unwrap_err().to_string(),
            "invalid rate 0: must be a finite number above zero"
        );
        assert!(Quota::new(0, Period::Day).is_err());
        assert!(
            Quota::new(10, Period::Day)
                .unwrap()
                .with_offset(10)
                .is_err()
        );
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let k = ApiKey::new("free-1", "demo-free-key", "free");
        let shown = format!("{k:?}");
        assert!(
            shown.contains("free-1") && !shown.contains("demo-free-key"),
            "{shown}"
        );
    }
}
