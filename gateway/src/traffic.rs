//! Recent decisions, for the dashboard: how many per second by outcome, and
//! which keys were refused most, over the last few minutes.
//!
//! [`Traffic`] is an [`Observer`] the layer calls once per decision; it keeps
//! one slot per second of the last [`SECONDS`] in a ring, so its memory is
//! bounded whatever the traffic: six counters a slot, and at most
//! [`KEYS_PER_SECOND`] key ids a slot (refusals of further keys in the same
//! second are counted under the outcome only). Time is the store's clock, so
//! a manual clock makes it exact in tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::UNIX_EPOCH;

use serde_json::{Value, json};
use tollgate::Clock;
use tollgate::Reason;
use tollgate::observe::{DecisionEvent, Observer, Outcome};

/// How many seconds of decisions are kept.
pub(crate) const SECONDS: usize = 600;

/// How many distinct refused keys a second keeps.
pub(crate) const KEYS_PER_SECOND: usize = 64;

/// What a decision came to, as the dashboard groups them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Allowed,
    Throttled,
    Quota,
    Tokens,
    Concurrency,
    StoreFailure,
    /// A missing, unknown or disabled key.
    Key,
}

impl Kind {
    pub(crate) const ALL: [Kind; 7] = [
        Kind::Allowed,
        Kind::Throttled,
        Kind::Quota,
        Kind::Tokens,
        Kind::Concurrency,
        Kind::StoreFailure,
        Kind::Key,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Allowed => "allowed",
            Kind::Throttled => "throttled",
            Kind::Quota => "quota",
            Kind::Tokens => "tokens",
            Kind::Concurrency => "concurrency",
            Kind::StoreFailure => "store_failure",
            Kind::Key => "key",
        }
    }

    /// The group of a decision whose outcome is `outcome` and whose refusing
    /// limit (if any) is `limit`.
    pub(crate) fn of(outcome: Outcome, limit: Option<&str>) -> Kind {
        // Every budget counted in tokens: the plan's, the account's and the
        // model's (`LimitKind::counts_tokens`; the event names the limit).
        let tokens = matches!(
            limit,
            Some(
                "tokens-minute"
                    | "tokens-day"
                    | "tokens-month"
                    | "account-tokens-minute"
                    | "account-tokens-day"
                    | "account-tokens-month"
                    | "model-tokens-minute"
                    | "model-tokens-day"
                    | "model-tokens-month"
            )
        );
        match outcome {
            // A shadow plan's request over a limit goes through.
            Outcome::Allowed | Outcome::ShadowRejected(_) => Kind::Allowed,
            Outcome::StoreFailed(_) => Kind::StoreFailure,
            Outcome::Rejected(reason) => match reason {
                Reason::QuotaExceeded => Kind::Quota,
                Reason::CostExceedsLimit => Kind::Tokens,
                Reason::Limited if tokens => Kind::Tokens,
                Reason::Limited => Kind::Throttled,
                Reason::ConcurrencyLimited => Kind::Concurrency,
                Reason::StoreUnavailable | Reason::ResolverUnavailable => Kind::StoreFailure,
                _ => Kind::Key,
            },
            _ => Kind::StoreFailure,
        }
    }
}

/// Recent decisions, for the dashboard: an observer that counts each
/// decision by outcome in one slot per second of the last ten minutes, and
/// the keys refused in each second (at most 64 a second), so that its memory
/// is bounded whatever the traffic. Clones share the same counts.
#[derive(Clone)]
pub struct Traffic {
    clock: Clock,
    ring: Arc<Mutex<Ring>>,
}

impl std::fmt::Debug for Traffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Traffic(..)")
    }
}

struct Ring {
    slots: Vec<Slot>,
}

#[derive(Default)]
struct Slot {
    /// The second (since the epoch) the slot holds; the others are stale.
    second: i64,
    counts: [u64; Kind::ALL.len()],
    /// Refusals by key id.
    refused: HashMap<Box<str>, u64>,
}

impl Traffic {
    /// Counts decisions at the times `clock` tells.
    pub fn new(clock: Clock) -> Traffic {
        let slots = (0..SECONDS)
            .map(|_| Slot {
                second: i64::MIN,
                ..Slot::default()
            })
            .collect();
        Traffic {
            clock,
            ring: Arc::new(Mutex::new(Ring { slots })),
        }
    }

    fn second(&self) -> i64 {
        match self.clock.wall().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(_) => 0,
        }
    }

    /// Counts one decision now.
    pub(crate) fn count(&self, kind: Kind, key_id: Option<&str>) {
        let second = self.second();
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = &mut ring.slots[second.rem_euclid(SECONDS as i64) as usize];
        if slot.second != second {
            slot.second = second;
            slot.counts = [0; Kind::ALL.len()];
            slot.refused.clear();
        }
        slot.counts[kind as usize] += 1;
        if kind == Kind::Allowed {
            return;
        }
        if let Some(id) = key_id {
            if let Some(n) = slot.refused.get_mut(id) {
                *n += 1;
            } else if slot.refused.len() < KEYS_PER_SECOND {
                slot.refused.insert(id.into(), 1);
            }
        }
    }

    /// The last `seconds` seconds (at most [`SECONDS`]) up to the current
    /// one: per outcome a count per second, oldest first, and the `top` keys
    /// refused most in that time.
    pub(crate) fn snapshot(&self, seconds: usize, top: usize) -> Value {
        let seconds = seconds.clamp(1, SECONDS);
        let now = self.second();
        let first = now - seconds as i64 + 1;
        let mut series = vec![vec![0u64; seconds]; Kind::ALL.len()];
        let mut refused: HashMap<&str, u64> = HashMap::new();
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        for slot in &ring.slots {
            if slot.second < first || slot.second > now {
                continue;
            }
            let at = (slot.second - first) as usize;
            for (kind, n) in slot.counts.iter().enumerate() {
                series[kind][at] = *n;
            }
            for (id, n) in &slot.refused {
                *refused.entry(id).or_default() += n;
            }
        }
        let mut refused: Vec<(&str, u64)> = refused.into_iter().collect();
        refused.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        refused.truncate(top);
        let top: Vec<Value> = refused
            .into_iter()
            .map(|(id, n)| json!({"id": id, "rejected": n}))
            .collect();
        drop(ring);
        let mut by_kind = serde_json::Map::new();
        let mut totals = serde_json::Map::new();
        for (kind, counts) in Kind::ALL.iter().zip(series) {
            totals.insert(kind.name().into(), counts.iter().sum::<u64>().into());
            by_kind.insert(kind.name().into(), counts.into());
        }
        json!({
            "end": now,
            "seconds": seconds,
            "outcomes": Kind::ALL.map(Kind::name),
            "series": by_kind,
            "totals": totals,
            "top_rejected": top,
        })
    }
}

impl Observer for Traffic {
    fn on_decision(&self, event: &DecisionEvent<'_>) {
        // Only requests (the layer reports no peek, such as `GET /v1/usage`
        // or the dashboard's own key list; a decision made without a
        // request, through `RateLimitLayer::decide`, is not traffic either).
        if event.method().is_none() {
            return;
        }
        self.count(Kind::of(event.outcome(), event.limit()), event.key_id());
    }
}

/// An observer told only of the decisions about requests: the layer also
/// tells of a key it refuses while peeking without one (`GET /v1/usage`
/// with an unknown or disabled key), which is no decision.
#[derive(Debug, Clone)]
pub(crate) struct Requests<O>(pub(crate) O);

impl<O: Observer> Observer for Requests<O> {
    fn on_decision(&self, event: &DecisionEvent<'_>) {
        if event.method().is_some() {
            self.0.on_decision(event);
        }
    }
}

/// Two observers, called one after the other.
#[derive(Debug, Clone)]
pub(crate) struct Both<A, B>(pub(crate) A, pub(crate) B);

impl<A: Observer, B: Observer> Observer for Both<A, B> {
    fn on_decision(&self, event: &DecisionEvent<'_>) {
        self.0.on_decision(event);
        self.1.on_decision(event);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tollgate::FailureMode;
    use tollgate::ManualClock;

    use super::*;

    fn traffic() -> (ManualClock, Traffic) {
        let manual = ManualClock::new();
        manual.set_wall(UNIX_EPOCH + Duration::from_secs(1_000_000));
        let traffic = Traffic::new(Clock::from(manual.clone()));
        (manual, traffic)
    }

    #[test]
    fn decisions_are_grouped_by_what_refused_them() {
        let of = Kind::of;
        assert_eq!(of(Outcome::Allowed, None), Kind::Allowed);
        assert_eq!(
            of(Outcome::Rejected(Reason::Limited), Some("throttle")),
            Kind::Throttled
        );
        for limit in [
            "tokens-minute",
            "account-tokens-minute",
            "model-tokens-minute",
        ] {
            assert_eq!(
                of(Outcome::Rejected(Reason::Limited), Some(limit)),
                Kind::Tokens,
                "{limit}"
            );
        }
        for limit in ["account", "model", "method", "stage"] {
            assert_eq!(
                of(Outcome::Rejected(Reason::Limited), Some(limit)),
                Kind::Throttled,
                "{limit}"
            );
        }
        assert_eq!(
            of(Outcome::Rejected(Reason::QuotaExceeded), Some("quota")),
            Kind::Quota
        );
        assert_eq!(
            of(Outcome::Rejected(Reason::ConcurrencyLimited), None),
            Kind::Concurrency
        );
        assert_eq!(
            of(Outcome::StoreFailed(FailureMode::Open), None),
            Kind::StoreFailure
        );
        assert_eq!(of(Outcome::Rejected(Reason::DisabledKey), None), Kind::Key);
        // A shadow plan's request over a limit went through.
        assert_eq!(
            of(Outcome::ShadowRejected(Reason::Limited), Some("throttle")),
            Kind::Allowed
        );
    }

    #[test]
    fn counts_per_second_and_forgets_what_is_older_than_the_window() {
        let (clock, t) = traffic();
        t.count(Kind::Allowed, Some("a"));
        t.count(Kind::Throttled, Some("a"));
        clock.advance(Duration::from_secs(1));
        clock.set_wall(UNIX_EPOCH + Duration::from_secs(1_000_001));
        t.count(Kind::Throttled, Some("b"));
        t.count(Kind::Throttled, Some("b"));
        t.count(Kind::Quota, Some("a"));
        let s = t.snapshot(3, 10);
        assert_eq!(s["series"]["allowed"], json!([0, 1, 0]));
        assert_eq!(s["series"]["throttled"], json!([0, 1, 2]));
        assert_eq!(s["totals"]["quota"], 1);
        assert_eq!(
            s["top_rejected"],
            json!([{"id": "a", "rejected": 2}, {"id": "b", "rejected": 2}])
        );
        // A whole ring later, every slot is stale.
        clock.set_wall(UNIX_EPOCH + Duration::from_secs(1_000_001 + SECONDS as u64));
        let s = t.snapshot(SECONDS, 10);
        assert_eq!(s["totals"]["throttled"], 0);
        assert_eq!(s["top_rejected"], json!([]));
    }

    #[test]
    fn a_second_keeps_a_bounded_number_of_keys() {
        let (_clock, t) = traffic();
        for i in 0..KEYS_PER_SECOND + 10 {
            t.count(Kind::Throttled, Some(&format!("k{i}")));
        }
        let s = t.snapshot(1, 1000);
        assert_eq!(s["top_rejected"].as_array().unwrap().len(), KEYS_PER_SECOND);
        assert_eq!(s["totals"]["throttled"], KEYS_PER_SECOND + 10);
    }
}
