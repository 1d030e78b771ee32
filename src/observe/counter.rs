//! Decisions counted through the `metrics` facade.

use metrics::{Label, SharedString};

use super::{DecisionEvent, Observer};

/// The counter [`MetricsObserver`] increments once per decision.
pub const DECISIONS_TOTAL: &str = "tollgate_decisions_total";

/// Counts every decision in the counter [`DECISIONS_TOTAL`]
/// (`tollgate_decisions_total`) of the [`metrics`](https://docs.rs/metrics)
/// facade, for whichever recorder (exporter) the application installed.
///
/// | label | values |
/// |---|---|
/// | `plan` | the plan's name; `""` when the key failed before a plan was known |
/// | `route` | the route axum matched (`MatchedPath`, e.g. `/users/{id}`); `""` without one; left out with [`route_label(false)`](Self::route_label) |
/// | `outcome` | `allowed`, `shadow_rejected` (over a limit of a shadow plan, let through), `rejected`, `failed_open`, `failed_closed`, `failed_local` |
/// | `reason` | `""` unless rejected (or shadow-rejected); else `limited`, `quota_exceeded`, `concurrency_limited`, `cost_exceeds_limit`, `key_capacity`, `missing_key`, `empty_key`, `malformed_key`, `key_too_long`, `unknown_key`, `disabled_key`, `missing_peer_addr`, `store_unavailable` |
/// | `limit` | `""` unless a limit rejected (or would have, under a shadow plan); else `throttle`, `method`, `quota`, `stage`, `stage-method`, `concurrency`, `tokens-minute`, `tokens-day`, `tokens-month` |
///
/// **Cardinality.** Every label takes values from a set the application
/// fixes: the plans of its policy, the routes of its router and the short
/// lists above, so there are at most about plans × routes × 20 series (far
/// fewer in practice: a reason goes with one or two limits). The route is
/// the route *template*, never the request's path, which a client chooses:
/// a request without `MatchedPath` (hyper, tonic, an axum fallback) is
/// counted under `route=""`. Turn the route off with
/// [`route_label(false)`](Self::route_label) for fewer series. No label ever
/// holds a key: neither its value nor its id (ids are as many as customers;
/// per-key usage is what [`Admin::usage`](crate::Admin::usage) reports).
///
/// ```
/// use tollgate::observe::MetricsObserver;
/// use tollgate::{Policy, RateLimitLayer, Throttle, UsagePlan};
///
/// // metrics_exporter_prometheus::PrometheusBuilder::new().install()?; or any recorder
/// let layer = RateLimitLayer::builder(Policy::per_key(
///     UsagePlan::new("jobs").throttle(Throttle::new(1.0, 1)?),
/// )?)
/// .observer(MetricsObserver::new().route_label(false))
/// .build();
/// assert!(layer.check(b"tenant-7", 1).is_ok());
/// // tollgate_decisions_total{plan="jobs",outcome="allowed",reason="",limit=""} 1
/// # Ok::<(), tollgate::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
pub struct MetricsObserver {
    route: bool,
}

impl MetricsObserver {
    /// Counts decisions with every label, the route included.
    pub fn new() -> Self {
        MetricsObserver { route: true }
    }

    /// Whether to label by route (default `true`).
    pub fn route_label(mut self, on: bool) -> Self {
        self.route = on;
        self
    }
}

impl Default for MetricsObserver {
    fn default() -> Self {
        Self::new()
    }
}

impl Observer for MetricsObserver {
    fn on_decision(&self, event: &DecisionEvent<'_>) {
        let owned = |s: Option<&str>| SharedString::from(s.unwrap_or_default().to_owned());
        let fixed = |s: Option<&'static str>| SharedString::const_str(s.unwrap_or_default());
        let outcome = event.outcome();
        let mut labels = Vec::with_capacity(5);
        labels.push(Label::new("plan", owned(event.plan())));
        if self.route {
            labels.push(Label::new("route", owned(event.matched_route())));
        }
        labels.push(Label::new("outcome", outcome.as_str()));
        labels.push(Label::new("reason", fixed(outcome.reason())));
        labels.push(Label::new("limit", fixed(event.limit())));
        metrics::counter!(DECISIONS_TOTAL, labels).increment(1);
    }
}
