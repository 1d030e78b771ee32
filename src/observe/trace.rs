//! Decisions as `tracing` events.

use super::{DecisionEvent, Observer, Outcome};

/// Logs every decision as one `tracing` event with target `tollgate::decision`:
/// `DEBUG` for a request let through, `INFO` for one rejected or decided by a
/// store failure.
///
/// Fields: `plan`, `key_id` (a registered key's public id), `route`,
/// `method`, `outcome` (`allowed`, `rejected`, `failed_open`,
/// `failed_closed`, `failed_local`), `reason` (`limited`, `unknown_key`…), `limit`
/// (`throttle`, `quota`…) and `shadow`; a field that does not apply is left
/// out. A key's value is never logged. The store's own failures are also
/// logged once per burst (a warning), whatever the observer.
///
/// Fields are only computed when a subscriber wants the event.
///
/// ```
/// use tollgate::observe::TracingObserver;
/// use tollgate::{Policy, RateLimitLayer, Throttle, UsagePlan};
///
/// let layer = RateLimitLayer::builder(Policy::per_key(
///     UsagePlan::new("jobs").throttle(Throttle::new(1.0, 1)?),
/// )?)
/// .observer(TracingObserver::new())
/// .build();
/// assert!(layer.check(b"tenant-7", 1).is_ok());
/// // DEBUG tollgate::decision: rate-limit decision plan="jobs" outcome="allowed" shadow=false
/// assert!(layer.check(b"tenant-7", 1).is_err());
/// // INFO tollgate::decision: rate-limit decision plan="jobs" outcome="rejected" reason="limited" limit="throttle" shadow=false
/// # Ok::<(), tollgate::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct TracingObserver;

impl TracingObserver {
    /// An observer that logs every decision.
    pub fn new() -> Self {
        TracingObserver
    }
}

/// One event at a level chosen at compile time (`tracing` callsites are static).
macro_rules! decision_event {
    ($level:expr, $e:expr) => {
        tracing::event!(
            target: "tollgate::decision",
            $level,
            plan = $e.plan(),
            key_id = $e.key_id(),
            route = $e.route(),
            method = $e.method().map(http::Method::as_str),
            outcome = $e.outcome().as_str(),
            reason = $e.outcome().reason(),
            limit = $e.limit(),
            shadow = $e.is_shadow(),
            "rate-limit decision"
        )
    };
}

impl Observer for TracingObserver {
    fn on_decision(&self, event: &DecisionEvent<'_>) {
        match event.outcome() {
            Outcome::Allowed => decision_event!(tracing::Level::DEBUG, event),
            _ => decision_event!(tracing::Level::INFO, event),
        }
    }
}
