//! Token costs: estimated before the call, settled after the response.
//!
//! A plan with a [`TokenBudget`](crate::TokenBudget) charges each request its
//! estimated tokens when it is decided: a [`CostEstimator`] reads the
//! estimate from the request (by default a [`TokenEstimate`] extension that
//! an earlier layer or middleware put there, for instance after reading the
//! JSON body). The handler then reports what the request really cost, either
//! as a [`UsedTokens`] response extension or through the [`TokenUsage`]
//! handle found in the request's extensions (the form for streams: it can be
//! moved into the body and counted as tokens are produced). When the
//! response body ends, fails or is dropped, the difference is settled: an
//! over-estimate is given back as far as it still holds (not what the
//! per-minute bucket has refilled since the request was decided, nor to a
//! quota window that began after it: nothing is granted twice), an
//! under-estimate is charged even past the limit, so that the key's next
//! requests wait until the debt is repaid. A request that never reports
//! keeps its estimate.
//!
//! ```
//! use axum::{Extension, Router, routing::post};
//! use tollgate::{Policy, RateLimitLayer, TokenBudget, TokenUsage, UsagePlan};
//!
//! let plan = UsagePlan::new("llm").tokens(TokenBudget::new().per_minute(10_000)?);
//! let layer = RateLimitLayer::builder(Policy::per_key(plan)?)
//!     // 16 tokens for every request, whatever it asks for.
//!     .estimator(|_: &tollgate::extract::RequestView<'_>| 16)
//!     .build();
//! let app: Router = Router::new()
//!     .route(
//!         "/v1/completions",
//!         post(|Extension(usage): Extension<TokenUsage>| async move {
//!             usage.set(12); // the completion used 12 tokens: 4 go back
//!             "{}"
//!         }),
//!     )
//!     .layer(layer);
//! # Ok::<(), tollgate::ConfigError>(())
//! ```

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::extract::RequestView;

/// Estimates a request's cost in tokens before it is decided.
///
/// Called only for requests whose plan has a token budget. Implemented for
/// closures `Fn(&RequestView<'_>) -> u32`; the default,
/// [`ExtensionEstimate`], reads a [`TokenEstimate`] extension.
///
/// # Estimating from the body
///
/// An estimator that needs the request's body says so in
/// [`reads_body`](Self::reads_body). The layer asks only once the key is
/// known to be good (a missing, unknown or disabled key is rejected before a
/// byte of the body is read) and the caller's plan has a token budget, and
/// never for a gRPC request (`content-type: application/grpc*`). It then
/// reads the body whole, bounded in bytes
/// ([`max_body_bytes`](crate::RateLimitLayerBuilder::max_body_bytes), 413
/// beyond) and in time ([`body_timeout`](crate::RateLimitLayerBuilder::body_timeout),
/// 408 beyond), calls [`estimate_body`](Self::estimate_body), decides, and
/// hands the inner service a [`RequestBody`](crate::RequestBody) with the
/// same bytes. The [`Estimate`] goes into the request's extensions, where
/// the decision and the handler find it (its [`model`](Estimate::model)
/// included). A body the estimator cannot read is answered 400. None of
/// these answers charges any limit. [`OpenAiEstimator`](crate::openai::OpenAiEstimator)
/// (feature `openai`) is a ready one.
///
/// Under a plan without a token budget the body is not read, and a body the
/// estimator would refuse reaches the inner service, its request already
/// charged. An estimator whose bodies must be valid under every plan (a
/// server whose answer to a malformed body should cost nothing) says so in
/// [`checks_body`](Self::checks_body): such a body is then read and checked
/// before the decision under every plan.
///
/// ```
/// use tollgate::cost::{BodyError, CostEstimator, Estimate};
/// use tollgate::extract::RequestView;
///
/// /// One token per 4 bytes of body, at least one.
/// struct BodyBytes;
///
/// impl CostEstimator for BodyBytes {
///     fn estimate(&self, _: &RequestView<'_>) -> u32 {
///         1
///     }
///     fn reads_body(&self, req: &RequestView<'_>) -> bool {
///         req.method == http::Method::POST
///     }
///     fn estimate_body(&self, _: &RequestView<'_>, body: &[u8]) -> Result<Estimate, BodyError> {
///         let tokens = u32::try_from(body.len().div_ceil(4)).unwrap_or(u32::MAX);
///         Ok(Estimate::new(tokens.max(1)))
///     }
/// }
/// ```
pub trait CostEstimator: Send + Sync + 'static {
    /// The request's estimated tokens (say prompt tokens plus `max_tokens`),
    /// from its head.
    fn estimate(&self, req: &RequestView<'_>) -> u32;

    /// Whether to read this request's body and estimate from it
    /// ([`estimate_body`](Self::estimate_body)) instead of
    /// [`estimate`](Self::estimate). Default: never.
    fn reads_body(&self, req: &RequestView<'_>) -> bool {
        let _ = req;
        false
    }

    /// Whether this request's body must be read and checked with
    /// [`estimate_body`](Self::estimate_body) before the request is decided,
    /// whatever the caller's plan: also when it has no token budget, and so
    /// needs no estimate. A body the estimator refuses is then answered 400
    /// under every plan, and charges nothing, instead of reaching the inner
    /// service after its request has been charged. It is asked, as
    /// [`reads_body`](Self::reads_body) is, only once the key is known to be
    /// good, and never for a gRPC request; the body is read within the same
    /// bounds. Default: never, so that a request whose plan needs no
    /// estimate goes on with its body unread.
    fn checks_body(&self, req: &RequestView<'_>) -> bool {
        let _ = req;
        false
    }

    /// The request's estimate from its whole body, when
    /// [`reads_body`](Self::reads_body) or [`checks_body`](Self::checks_body)
    /// asked for it. An error is answered 400 with its message, and costs
    /// nothing. Default: [`estimate`](Self::estimate).
    fn estimate_body(&self, req: &RequestView<'_>, body: &[u8]) -> Result<Estimate, BodyError> {
        let _ = body;
        Ok(Estimate::new(self.estimate(req)))
    }
}

/// What an estimator read from a request's body: its tokens and, when the
/// body names one, its model.
///
/// The layer puts it in the request's extensions before the request is
/// decided: limits that depend on the model read it there (from
/// [`RequestView::extensions`]), and so may the handler. An earlier layer may
/// put one there too; the layer then uses it and reads no body.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Estimate {
    /// The request's estimated tokens.
    pub tokens: u32,
    /// The model the request asks for (OpenAI's `model`), if any.
    pub model: Option<String>,
}

impl Estimate {
    /// An estimate of `tokens`, naming no model.
    pub fn new(tokens: u32) -> Self {
        Estimate {
            tokens,
            model: None,
        }
    }

    /// The same estimate, for `model`.
    #[must_use]
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }
}

/// Why an estimator could not read a request's body: answered 400, with the
/// message, and charged nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError {
    message: Cow<'static, str>,
}

impl BodyError {
    /// An error that tells the client `message`.
    pub fn new(message: impl Into<Cow<'static, str>>) -> Self {
        BodyError {
            message: message.into(),
        }
    }

    /// What the client is told.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BodyError {}

impl<F> CostEstimator for F
where
    F: Fn(&RequestView<'_>) -> u32 + Send + Sync + 'static,
{
    fn estimate(&self, req: &RequestView<'_>) -> u32 {
        self(req)
    }
}

/// The default estimator: the request's [`TokenEstimate`] extension, or 0
/// when there is none (the actual cost is then charged after the response).
#[derive(Debug, Clone, Copy, Default)]
pub struct ExtensionEstimate;

impl CostEstimator for ExtensionEstimate {
    fn estimate(&self, req: &RequestView<'_>) -> u32 {
        req.extensions
            .get::<TokenEstimate>()
            .map_or(0, |TokenEstimate(n)| *n)
    }
}

/// A request extension with the request's estimated tokens, for
/// [`ExtensionEstimate`]: put there by a layer that runs before the rate
/// limit (one that reads the body, say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenEstimate(pub u32);

/// A response extension with the tokens the request actually used: the
/// simplest way for a handler to report them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedTokens(pub u64);

/// Where a handler reports the tokens a request actually used.
///
/// The layer puts one in the extensions of every request whose plan has a
/// token budget. Clones share one count, so a streaming handler can move a
/// clone into its body and [`add`](Self::add) tokens as it sends them: if
/// the client goes away mid-stream, what was produced so far is settled.
/// Nothing reported means the estimate stands.
#[derive(Clone)]
pub struct TokenUsage(Arc<AtomicU64>);

/// The count of a usage nobody reported.
const UNREPORTED: u64 = u64::MAX;

impl TokenUsage {
    /// A usage with nothing reported yet.
    pub fn new() -> Self {
        TokenUsage(Arc::new(AtomicU64::new(UNREPORTED)))
    }

    /// Reports that the request used `tokens` in all.
    pub fn set(&self, tokens: u64) {
        self.0.store(tokens.min(UNREPORTED - 1), Ordering::Release);
    }

    /// Reports `tokens` more (counting from 0 if nothing was reported).
    pub fn add(&self, tokens: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                let base = if n == UNREPORTED { 0 } else { n };
                Some(base.saturating_add(tokens).min(UNREPORTED - 1))
            });
    }

    /// What was reported, if anything.
    pub fn get(&self) -> Option<u64> {
        match self.0.load(Ordering::Acquire) {
            UNREPORTED => None,
            n => Some(n),
        }
    }
}

impl Default for TokenUsage {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for TokenUsage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TokenUsage").field(&self.get()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_from_nothing_reported() {
        let u = TokenUsage::new();
        assert_eq!(u.get(), None);
        let clone = u.clone();
        clone.add(3);
        u.add(2);
        assert_eq!(u.get(), Some(5));
        u.set(40);
        assert_eq!(clone.get(), Some(40));
        u.set(u64::MAX);
        assert_eq!(u.get(), Some(u64::MAX - 1), "a huge report is not 'none'");
    }

    #[test]
    fn a_default_usage_reports_nothing() {
        assert_eq!(TokenUsage::default().get(), None);
        let u = TokenUsage::default();
        u.set(0);
        assert_eq!(u.get(), Some(0), "a reported 0 is not 'none'");
    }
}
