//! Usage plans, their limits, and API keys.

use std::fmt;
use std::sync::Arc;

use http::Method;

use crate::error::ConfigError;
use crate::extract::ClientIp;
use crate::gcra::{Gcra, NANOS_PER_SEC};
use crate::hash;
use crate::quota::QuotaSpec;
use crate::window::Period;

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
/// which the plan was created.
///
/// ```
/// use tollgate::{Period, Quota};
///
/// let q = Quota::new(1000, Period::Day)?.with_offset(200)?;
/// assert_eq!((q.limit(), q.offset()), (1000, 200));
/// assert!(Quota::new(0, Period::Month).is_err());
/// # Ok::<(), tollgate::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    limit: u64,
    period: Period,
    offset: u64,
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
    per_minute: Option<u32>,
    per_day: Option<u64>,
    per_month: Option<u64>,
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

/// What a plan does when its store fails (times out or is unreachable).
///
/// The in-memory store cannot fail; this matters with a remote store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FailureMode {
    /// Let requests through (the AWS and Kong default).
    #[default]
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
    name: String,
    throttle: Option<Throttle>,
    quota: Option<Quota>,
    methods: Vec<(String, Throttle)>,
    tokens: Option<TokenBudget>,
    concurrency: Option<u32>,
    failure: FailureMode,
    shadow: bool,
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
            failure: FailureMode::Open,
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
    /// The route of a request is axum's `MatchedPath` when present (so
    /// `"/users/{id}/GET"` matches the route as declared), else its path.
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

    /// What to do when the store fails (default [`FailureMode::Open`]).
    #[must_use]
    pub fn failure(mut self, mode: FailureMode) -> Self {
        self.failure = mode;
        self
    }

    /// A shadow plan decides, counts and sends headers, but never rejects.
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

    /// The failure mode.
    pub fn get_failure(&self) -> FailureMode {
        self.failure
    }

    /// Whether the plan is a shadow plan.
    pub fn is_shadow(&self) -> bool {
        self.shadow
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
}

impl ApiKey {
    /// An enabled key `id` with secret `value`, bound to `plan`.
    pub fn new(id: impl Into<String>, value: impl Into<String>, plan: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            value: value.into(),
            plan: plan.into(),
            enabled: true,
        }
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
    throttle: Option<Throttle>,
    methods: Vec<(String, Throttle)>,
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

/// The kind of a limit, named in headers and rejections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitKind {
    Throttle,
    Method,
    Quota,
    Stage,
    StageMethod,
    TokensMinute,
    TokensDay,
    TokensMonth,
}

impl LimitKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            LimitKind::Throttle => "throttle",
            LimitKind::Method => "method",
            LimitKind::Quota => "quota",
            LimitKind::Stage => "stage",
            LimitKind::StageMethod => "stage-method",
            LimitKind::TokensMinute => "tokens-minute",
            LimitKind::TokensDay => "tokens-day",
            LimitKind::TokensMonth => "tokens-month",
        }
    }

    /// Whether the limit counts tokens (charged the request's estimate)
    /// rather than requests.
    #[inline]
    pub(crate) fn counts_tokens(self) -> bool {
        matches!(
            self,
            LimitKind::TokensMinute | LimitKind::TokensDay | LimitKind::TokensMonth
        )
    }
}

/// One throttle compiled for deciding, with the salt that places its state.
#[derive(Debug, Clone)]
pub(crate) struct Limit {
    pub(crate) kind: LimitKind,
    pub(crate) gcra: Gcra,
    pub(crate) salt: u64,
    /// The `w` of the `RateLimit-Policy` item: seconds to refill the whole bucket.
    pub(crate) window_secs: u64,
    /// When the limit's numbers last changed while serving (wall nanoseconds;
    /// 0 for never): a store that converts state lazily converts it as of then.
    pub(crate) since: i64,
}

impl Limit {
    /// The salt derives from the plan and the limit's place in it, not from
    /// its numbers: replacing a plan's rate keeps every key's state.
    pub(crate) fn new(kind: LimitKind, t: &Throttle, owner: &str, path: &str) -> Self {
        let id = [
            owner.as_bytes(),
            b"\0",
            kind.name().as_bytes(),
            b"\0",
            path.as_bytes(),
        ]
        .concat();
        Self {
            kind,
            gcra: *t.gcra(),
            salt: hash::stable(&id) as u64,
            window_secs: t.gcra().span().div_ceil(NANOS_PER_SEC),
            since: 0,
        }
    }
}

/// An AWS methodPath compiled for matching: `"/v1/completions/POST"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MethodPath {
    /// `None`: every route (`/*`).
    segments: Option<Box<[Segment]>>,
    /// `None`: every method.
    method: Option<Method>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    Any,
}

impl MethodPath {
    pub(crate) fn parse(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: &'static str| ConfigError::InvalidMethodPath {
            path: s.to_owned(),
            reason: why,
        };
        if !s.starts_with('/') {
            return Err(bad("must start with `/`"));
        }
        let (path, method) = s
            .rsplit_once('/')
            .ok_or_else(|| bad("must end with `/METHOD`"))?;
        let method = match method {
            "*" => None,
            "" => return Err(bad("must end with `/METHOD`")),
            m => Some(
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| bad("the method is not a valid HTTP method"))?,
            ),
        };
        let segments = match path {
            "/*" => None,
            "" | "/" => Some(Box::default()),
            p => Some(
                p.trim_start_matches('/')
                    .split('/')
                    .map(|seg| match seg {
                        "*" => Ok(Segment::Any),
                        "" => Err(bad("empty path segment")),
                        lit => Ok(Segment::Literal(lit.into())),
                    })
                    .collect::<Result<Box<[_]>, _>>()?,
            ),
        };
        Ok(MethodPath { segments, method })
    }

    /// How literal the pattern is: more literal patterns win.
    fn specificity(&self) -> usize {
        let segs = self.segments.as_ref().map_or(0, |s| {
            1 + 2 * s
                .iter()
                .filter(|s| matches!(s, Segment::Literal(_)))
                .count()
                + s.len()
        });
        2 * segs + usize::from(self.method.is_some())
    }

    fn matches(&self, route: &str, method: &Method) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        let Some(segments) = &self.segments else {
            return true;
        };
        // Empty parts are ignored: "/v1/completions/" is "/v1/completions".
        let mut parts = route.split('/').filter(|p| !p.is_empty());
        for seg in segments.iter() {
            match (seg, parts.next()) {
                (_, None) => return false,
                (Segment::Literal(lit), Some(part)) if **lit != *part => return false,
                _ => {}
            }
        }
        parts.next().is_none()
    }
}

/// A method override compiled for deciding.
#[derive(Debug, Clone)]
pub(crate) struct MethodLimit {
    pub(crate) path: MethodPath,
    pub(crate) limit: Limit,
}

/// The most literal override matching `route` and `method`.
pub(crate) fn match_method<'a>(
    methods: &'a [MethodLimit],
    route: &str,
    method: &Method,
) -> Option<&'a Limit> {
    let mut best: Option<(&MethodLimit, usize)> = None;
    for m in methods {
        if m.path.matches(route, method) {
            let s = m.path.specificity();
            if best.is_none_or(|(_, b)| s > b) {
                best = Some((m, s));
            }
        }
    }
    best.map(|(m, _)| &m.limit)
}

fn compile_methods(
    methods: &[(String, Throttle)],
    kind: LimitKind,
    owner: &str,
) -> Result<Box<[MethodLimit]>, ConfigError> {
    let mut seen = std::collections::HashSet::new();
    methods
        .iter()
        .map(|(path, t)| {
            if !seen.insert(path.as_str()) {
                return Err(ConfigError::InvalidMethodPath {
                    path: path.clone(),
                    reason: "listed twice",
                });
            }
            Ok(MethodLimit {
                path: MethodPath::parse(path)?,
                limit: Limit::new(kind, t, owner, path),
            })
        })
        .collect()
}

/// A plan's cap on requests of one key in flight, compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Concurrency {
    pub(crate) limit: u32,
    /// Where the count lives, beside the key's throttles.
    pub(crate) salt: u64,
}

/// A plan's token budget, compiled.
#[derive(Debug, Clone)]
pub(crate) struct Tokens {
    /// `per_minute`: GCRA on cost units.
    pub(crate) minute: Option<Limit>,
    /// `per_day` and `per_month`: calendar quotas counted in tokens.
    pub(crate) day: Option<QuotaSpec>,
    pub(crate) month: Option<QuotaSpec>,
}

impl Tokens {
    fn compile(t: &TokenBudget, owner: &str, created_at: i64) -> Self {
        let spec = |limit, period| QuotaSpec {
            limit,
            period,
            offset: 0,
            created_at,
        };
        Tokens {
            minute: t.per_minute.map(|n| {
                let throttle = Throttle::new(f64::from(n) / 60.0, n)
                    .expect("checked by TokenBudget::per_minute");
                Limit::new(LimitKind::TokensMinute, &throttle, owner, "")
            }),
            day: t.per_day.map(|n| spec(n, Period::Day)),
            month: t.per_month.map(|n| spec(n, Period::Month)),
        }
    }

    /// The calendar quotas in tokens, with their names.
    pub(crate) fn quotas(&self) -> [Option<(LimitKind, &QuotaSpec)>; 2] {
        [
            self.day.as_ref().map(|q| (LimitKind::TokensDay, q)),
            self.month.as_ref().map(|q| (LimitKind::TokensMonth, q)),
        ]
    }
}

/// A plan compiled for deciding.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) name: Arc<str>,
    pub(crate) throttle: Option<Limit>,
    pub(crate) methods: Box<[MethodLimit]>,
    pub(crate) quota: Option<QuotaSpec>,
    pub(crate) tokens: Option<Tokens>,
    pub(crate) concurrency: Option<Concurrency>,
    pub(crate) shadow: bool,
    pub(crate) failure: FailureMode,
    pub(crate) source: UsagePlan,
}

impl Plan {
    /// Every throttle of the plan: the plan-wide one, the method overrides
    /// and the per-minute token budget.
    pub(crate) fn limits(&self) -> impl Iterator<Item = &Limit> {
        self.throttle
            .iter()
            .chain(self.methods.iter().map(|m| &m.limit))
            .chain(self.tokens.iter().flat_map(|t| t.minute.as_ref()))
    }

    /// The plan's throttle when it is the plan's only limit (no method
    /// override, quota, token budget or concurrency cap) and the plan is not
    /// a shadow: such a plan is decided without gathering its limits.
    #[inline]
    pub(crate) fn lone_throttle(&self) -> Option<&Limit> {
        match &self.throttle {
            Some(l)
                if self.methods.is_empty()
                    && self.quota.is_none()
                    && self.tokens.is_none()
                    && self.concurrency.is_none()
                    && !self.shadow =>
            {
                Some(l)
            }
            _ => None,
        }
    }

    /// Every throttle of the plan, mutably.
    pub(crate) fn limits_mut(&mut self) -> impl Iterator<Item = &mut Limit> {
        self.throttle
            .iter_mut()
            .chain(self.methods.iter_mut().map(|m| &mut m.limit))
            .chain(self.tokens.iter_mut().flat_map(|t| t.minute.as_mut()))
    }

    /// Compiles `plan`; `created_at` is when the plan first existed (wall nanoseconds).
    pub(crate) fn compile(plan: &UsagePlan, created_at: i64) -> Result<Self, ConfigError> {
        let owner = format!("plan\0{}", plan.name);
        Ok(Plan {
            name: plan.name.as_str().into(),
            throttle: plan
                .throttle
                .as_ref()
                .map(|t| Limit::new(LimitKind::Throttle, t, &owner, "")),
            methods: compile_methods(&plan.methods, LimitKind::Method, &owner)?,
            quota: plan.quota.map(|q| QuotaSpec {
                limit: q.limit,
                period: q.period,
                offset: q.offset,
                created_at,
            }),
            tokens: plan
                .tokens
                .as_ref()
                .map(|t| Tokens::compile(t, &owner, created_at)),
            concurrency: match plan.concurrency {
                None => None,
                Some(0) => return Err(ConfigError::InvalidConcurrency),
                Some(limit) => Some(Concurrency {
                    limit,
                    salt: hash::stable(format!("{owner}\0concurrency").as_bytes()) as u64,
                }),
            },
            shadow: plan.shadow,
            failure: plan.failure,
            source: plan.clone(),
        })
    }

    /// A plan of one throttle for keys that are not registered.
    pub(crate) fn anonymous(name: &str, throttle: &Throttle) -> Self {
        Plan {
            name: name.into(),
            throttle: Some(Limit::new(LimitKind::Throttle, throttle, name, "")),
            methods: Box::default(),
            quota: None,
            tokens: None,
            concurrency: None,
            shadow: false,
            failure: FailureMode::Open,
            source: UsagePlan::new(name).throttle(*throttle),
        }
    }
}

/// Stage limits compiled for deciding.
#[derive(Debug)]
pub(crate) struct StageLimits {
    pub(crate) throttle: Option<Limit>,
    pub(crate) methods: Box<[MethodLimit]>,
}

impl StageLimits {
    pub(crate) fn compile(stage: &Stage) -> Result<Self, ConfigError> {
        Ok(StageLimits {
            throttle: stage
                .throttle
                .as_ref()
                .map(|t| Limit::new(LimitKind::Stage, t, "stage", "")),
            methods: compile_methods(&stage.methods, LimitKind::StageMethod, "stage")?,
        })
    }
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

    fn mp(s: &str) -> MethodPath {
        MethodPath::parse(s).unwrap()
    }

    #[test]
    fn method_paths_match_like_aws() {
        let post = Method::POST;
        assert!(mp("/v1/completions/POST").matches("/v1/completions", &post));
        assert!(!mp("/v1/completions/POST").matches("/v1/completions", &Method::GET));
        assert!(!mp("/v1/completions/POST").matches("/v1/chat/completions", &post));
        assert!(mp("/v1/*/POST").matches("/v1/completions", &post));
        assert!(!mp("/v1/*/POST").matches("/v1/chat/completions", &post));
        assert!(mp("/*/*").matches("/v1/chat/completions", &Method::DELETE));
        assert!(mp("/*/*").matches("/", &post));
        assert!(mp("//GET").matches("/", &Method::GET));
        assert!(mp("/users/{id}/get").matches("/users/{id}", &Method::GET));
        assert!(mp("/v1/completions/POST").matches("/v1/completions/", &post));
        for bad in ["v1/POST", "/v1/", "/v1//x/POST", "/v1/PO ST"] {
            assert!(MethodPath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_most_literal_override_wins() {
        let t = Throttle::new(1.0, 1).unwrap();
        let methods = compile_methods(
            &[
                ("/*/*".into(), t),
                ("/v1/*/POST".into(), t),
                ("/v1/completions/POST".into(), t),
                ("/v1/completions/*".into(), t),
            ],
            LimitKind::Method,
            "p",
        )
        .unwrap();
        let pick = |route: &str, m: &Method| {
            let l = match_method(&methods, route, m).unwrap();
            methods.iter().position(|x| x.limit.salt == l.salt).unwrap()
        };
        assert_eq!(pick("/v1/completions", &Method::POST), 2);
        assert_eq!(pick("/v1/completions", &Method::GET), 3);
        assert_eq!(pick("/v1/embeddings", &Method::POST), 1);
        assert_eq!(pick("/health", &Method::GET), 0);
        let dup = compile_methods(
            &[("/a/GET".into(), t), ("/a/GET".into(), t)],
            LimitKind::Method,
            "p",
        );
        assert!(dup.is_err());
    }

    #[test]
    fn salts_follow_the_plan_not_the_numbers() {
        let a = Limit::new(
            LimitKind::Throttle,
            &Throttle::new(1.0, 1).unwrap(),
            "plan\0free",
            "",
        );
        let b = Limit::new(
            LimitKind::Throttle,
            &Throttle::new(9.0, 9).unwrap(),
            "plan\0free",
            "",
        );
        let c = Limit::new(
            LimitKind::Throttle,
            &Throttle::new(1.0, 1).unwrap(),
            "plan\0pro",
            "",
        );
        assert_eq!(a.salt, b.salt);
        assert_ne!(a.salt, c.salt);
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
