//! The generic cell rate algorithm: a token bucket kept as one number.
//!
//! A throttle of `rate` units per second and bucket size `burst` is kept per key
//! as a *theoretical arrival time* (TAT, nanoseconds on the store's monotonic
//! time line). The bucket is full when `tat <= now`; each unit of cost moves the
//! TAT forward by the emission interval `t = 1/rate`; a request of cost `n` passes
//! when the moved TAT stays within `burst * t` of now. Everything here is a pure
//! function of `(state, now, cost)`: no clock is read and nothing is stored.
//!
//! Time that goes backwards (a `now` earlier than a previous one) only makes the
//! bucket look emptier, never fuller: the TAT never moves back.

/// Nanoseconds on a monotonic time line.
pub(crate) type Nanos = u64;

/// Nanoseconds per second.
pub(crate) const NANOS_PER_SEC: u64 = 1_000_000_000;

/// The largest bucket span (`burst / rate`) accepted, so that all arithmetic
/// stays far from `u64` overflow: about 146 years.
pub(crate) const MAX_SPAN: Nanos = 1 << 62;

/// The parameters of one throttle, in the units the algorithm works in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gcra {
    /// Emission interval: nanoseconds one unit of cost takes to refill (>= 1).
    interval: Nanos,
    /// Bucket size in units (>= 1).
    burst: u32,
    /// `interval * burst`: how far ahead of now the TAT may run.
    tolerance: Nanos,
}

/// What a decision found. It carries TATs only: what is left of the bucket
/// ([`Gcra::status`]) costs a division, paid only when headers need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The request fits: store `tat`; the bucket then stands at `after`
    /// (`tat` and `after` differ only for a peek, which stores nothing new).
    Allow {
        /// The TAT to store.
        tat: Nanos,
        /// The TAT the bucket stands at after the request.
        after: Nanos,
    },
    /// The bucket lacks capacity now; the request passes after `retry_after`.
    Deny {
        /// The TAT the bucket stands at (unchanged by the request).
        at: Nanos,
        /// How long until the request's cost fits.
        retry_after: Nanos,
    },
    /// The cost is larger than the whole bucket: it will never pass.
    TooCostly {
        /// The TAT the bucket stands at.
        at: Nanos,
    },
}

/// How a bucket stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Snapshot {
    /// Whole units left in the bucket.
    pub(crate) remaining: u32,
    /// Time until the bucket is full again.
    pub(crate) reset: Nanos,
}

/// The emission interval of `rate` units per second: `1e9 / rate`
/// nanoseconds, rounded **up**, so that no unit is ever admitted before its
/// exact time (0.9/s refills one unit every 1,111,111,111.1 ns: the interval
/// is 1,111,111,112). The quotient is the correctly rounded `f64` one, so a
/// rate meant to give whole nanoseconds gives them (`1.0 / 3.0` per second is
/// 3 s, not 3 s and 1 ns for the last bit the `f64` lacks). `None` for a rate
/// that is not finite and positive.
pub(crate) fn interval_of(rate: f64) -> Option<Nanos> {
    if !(rate.is_finite() && rate > 0.0) {
        return None;
    }
    // `as` saturates: a quotient beyond u64 is u64::MAX, out of range anyway.
    Some((NANOS_PER_SEC as f64 / rate).ceil() as Nanos)
}

impl Gcra {
    /// Builds the parameters; the caller has validated that `rate` is finite and
    /// positive and `burst >= 1`. Returns `None` when the numbers are out of the
    /// representable range (rate above one per nanosecond, span above [`MAX_SPAN`]).
    pub(crate) fn new(rate: f64, burst: u32) -> Option<Self> {
        if !(rate.is_finite() && rate > 0.0 && rate <= NANOS_PER_SEC as f64) || burst == 0 {
            return None;
        }
        let interval = interval_of(rate)?;
        if !(1..=MAX_SPAN).contains(&interval) {
            return None;
        }
        let tolerance = interval.checked_mul(u64::from(burst))?;
        if tolerance > MAX_SPAN {
            return None;
        }
        Some(Self {
            interval,
            burst,
            tolerance,
        })
    }

    /// The bucket size in units.
    pub(crate) fn burst(&self) -> u32 {
        self.burst
    }

    /// Nanoseconds one unit takes to refill.
    pub(crate) fn interval(&self) -> Nanos {
        self.interval
    }

    /// Time for an empty bucket to refill completely.
    pub(crate) fn span(&self) -> Nanos {
        self.tolerance
    }

    /// Decides a request of `cost` units against the stored `tat` at `now`.
    ///
    /// `tat == 0` is a key never seen (a full bucket). A cost of 0 is a peek:
    /// it always "passes" and reports the state without changing it.
    #[inline]
    pub(crate) fn decide(&self, tat: Nanos, now: Nanos, cost: u32) -> Outcome {
        let base = tat.max(now);
        if cost > self.burst {
            return Outcome::TooCostly { at: base };
        }
        // cost <= burst, so cost * interval <= tolerance <= MAX_SPAN: no overflow.
        let new_tat = base + u64::from(cost) * self.interval;
        let limit = now.saturating_add(self.tolerance);
        if new_tat <= limit {
            // A peek stores nothing: keep the old TAT so that a peek never moves state.
            let stored = if cost == 0 { tat } else { new_tat };
            Outcome::Allow {
                tat: stored,
                after: new_tat,
            }
        } else {
            Outcome::Deny {
                at: base,
                retry_after: new_tat - limit,
            }
        }
    }

    /// Gives back a request's `cost` units to a bucket whose TAT is now `tat`,
    /// where the request itself stored `mine`. Only what is still ahead of
    /// `now` of `mine` returns: capacity that has refilled since, and that
    /// later requests may have been granted, is not handed out twice. The TAT
    /// never moves below `now`, so a refund never overfills the bucket.
    pub(crate) fn refund(&self, tat: Nanos, now: Nanos, mine: Nanos, cost: u32) -> Nanos {
        Self::refund_span(tat, now, mine, u64::from(cost) * self.interval)
    }

    /// The TAT under `new` parameters that keeps the share of the bucket in
    /// use: an emptied bucket stays empty, a full one stays full, and one in
    /// debt (settled above its estimate, the TAT past the span) keeps its
    /// debt, scaled as the rest: a change of numbers forgives nothing the
    /// next requests owe.
    pub(crate) fn rescale(&self, tat: Nanos, now: Nanos, new: &Gcra) -> Nanos {
        if tat <= now {
            return tat;
        }
        let ahead = u128::from(tat - now);
        let scaled = ahead * u128::from(new.tolerance) / u128::from(self.tolerance);
        now.saturating_add(Nanos::try_from(scaled).unwrap_or(Nanos::MAX))
    }

    /// A stretch of a bucket's time line (a settlement's share, in
    /// nanoseconds under these numbers) under `new` parameters, scaled as
    /// [`rescale`](Self::rescale) scales the share in use (a debt
    /// included), rounded down: a settlement made after a change weighs
    /// what it would have weighed in the bucket converted at the change.
    pub(crate) fn rescale_span(&self, span: Nanos, new: &Gcra) -> Nanos {
        let scaled = u128::from(span) * u128::from(new.tolerance) / u128::from(self.tolerance);
        Nanos::try_from(scaled).unwrap_or(Nanos::MAX)
    }

    /// [`refund`](Self::refund) of a share of `give` nanoseconds rather
    /// than of a cost in units: what of `mine` is still ahead of `now`
    /// bounds it, and the TAT never moves below `now`.
    pub(crate) fn refund_span(tat: Nanos, now: Nanos, mine: Nanos, give: Nanos) -> Nanos {
        let give = give.min(mine.saturating_sub(now));
        tat.saturating_sub(give).max(now.min(tat))
    }

    /// How a bucket with TAT `tat` stands at `now`.
    pub(crate) fn status(&self, tat: Nanos, now: Nanos) -> Snapshot {
        let ahead = tat.saturating_sub(now);
        let free = self.tolerance.saturating_sub(ahead);
        Snapshot {
            remaining: (free / self.interval).min(u64::from(self.burst)) as u32,
            reset: ahead,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = NANOS_PER_SEC;

    /// Runs `n` requests of cost 1 at `now` on `tat`, returning how many passed.
    fn admit(g: &Gcra, tat: &mut Nanos, now: Nanos, n: u32) -> u32 {
        let mut passed = 0;
        for _ in 0..n {
            if let Outcome::Allow { tat: t, .. } = g.decide(*tat, now, 1) {
                *tat = t;
                passed += 1;
            }
        }
        passed
    }

    #[test]
    fn burst_then_one_per_interval() {
        let g = Gcra::new(2.0, 5).unwrap();
        let mut tat = 0;
        let t0 = 10 * S;
        assert_eq!(admit(&g, &mut tat, t0, 10), 5);
        // Just before one interval: nothing; at it: exactly one.
        assert_eq!(admit(&g, &mut tat, t0 + S / 2 - 1, 3), 0);
        assert_eq!(admit(&g, &mut tat, t0 + S / 2, 3), 1);
        assert_eq!(admit(&g, &mut tat, t0 + S, 3), 1);
        // Ten seconds idle refill the bucket to 5, not more.
        assert_eq!(admit(&g, &mut tat, t0 + 11 * S, 10), 5);
    }

    #[test]
    fn fractional_rate() {
        // One request every 4 s, bucket of 1.
        let g = Gcra::new(0.25, 1).unwrap();
        let mut tat = 0;
        assert_eq!(admit(&g, &mut tat, S, 2), 1);
        assert_eq!(admit(&g, &mut tat, 5 * S - 1, 1), 0);
        assert_eq!(admit(&g, &mut tat, 5 * S, 1), 1);
        // 3 per second: the exact interval is 333_333_333.3 ns, so a unit
        // refills at 333_333_334 ns, never earlier.
        let g = Gcra::new(3.0, 1).unwrap();
        let mut tat = 0;
        assert_eq!(admit(&g, &mut tat, S, 1), 1);
        assert_eq!(admit(&g, &mut tat, S + 333_333_333, 1), 0);
        assert_eq!(admit(&g, &mut tat, S + 333_333_334, 1), 1);
    }

    #[test]
    fn intervals_round_up_so_nothing_passes_before_its_exact_time() {
        // 0.9/s: one unit every 1_111_111_111.1 ns.
        let g = Gcra::new(0.9, 1).unwrap();
        assert_eq!(g.interval(), 1_111_111_112);
        let mut tat = 0;
        assert_eq!(admit(&g, &mut tat, S, 1), 1);
        assert_eq!(admit(&g, &mut tat, S + 1_111_111_111, 1), 0);
        assert_eq!(admit(&g, &mut tat, S + 1_111_111_112, 1), 1);
        // 0.3/s, and 7 a minute as a token budget builds it.
        assert_eq!(Gcra::new(0.3, 1).unwrap().interval(), 3_333_333_334);
        assert_eq!(Gcra::new(7.0 / 60.0, 7).unwrap().interval(), 8_571_428_572);
        // Whole intervals stay whole.
        for (rate, interval) in [
            (1.0, S),
            (2.0, S / 2),
            (0.25, 4 * S),
            (1e9, 1),
            (0.5, 2 * S),
        ] {
            assert_eq!(Gcra::new(rate, 1).unwrap().interval(), interval, "{rate}");
        }
        assert_eq!(Gcra::new(1.0 / 3.0, 3).unwrap().interval(), 3 * S);
        // Every interval is at least 1e9 / rate, and less than one more.
        for rate in [0.1, 0.7, 1.0 / 3.0, 123.456, 999_999_999.5, 3e-6] {
            let i = interval_of(rate).unwrap() as f64;
            assert!(i >= 1e9 / rate && i - 1.0 < 1e9 / rate, "{rate}: {i}");
        }
        assert_eq!(interval_of(f64::MIN_POSITIVE), Some(Nanos::MAX));
        assert_eq!(interval_of(0.0), None);
        assert_eq!(interval_of(f64::INFINITY), None);
    }

    #[test]
    fn cost_n_and_retry_after() {
        let g = Gcra::new(1.0, 10).unwrap();
        let now = 100 * S;
        let Outcome::Allow { tat, after } = g.decide(0, now, 7) else {
            panic!("7 of 10 must pass")
        };
        let st = g.status(after, now);
        assert_eq!((st.remaining, st.reset), (3, 7 * S));
        match g.decide(tat, now, 5) {
            Outcome::Deny { retry_after, at } => {
                assert_eq!(retry_after, 2 * S);
                assert_eq!(at, tat);
                assert_eq!(g.status(at, now).remaining, 3);
            }
            other => panic!("expected deny, got {other:?}"),
        }
        assert!(matches!(g.decide(tat, now, 3), Outcome::Allow { .. }));
    }

    #[test]
    fn cost_above_burst_is_its_own_reason() {
        let g = Gcra::new(100.0, 10).unwrap();
        assert!(matches!(g.decide(0, S, 11), Outcome::TooCostly { .. }));
        assert!(matches!(g.decide(0, S, 10), Outcome::Allow { .. }));
    }

    #[test]
    fn peek_changes_nothing() {
        let g = Gcra::new(1.0, 3).unwrap();
        let Outcome::Allow { tat, .. } = g.decide(0, S, 2) else {
            panic!()
        };
        let Outcome::Allow { tat: peeked, after } = g.decide(tat, S, 0) else {
            panic!("a peek always passes")
        };
        assert_eq!(peeked, tat);
        assert_eq!(g.status(after, S).remaining, 1);
        // A peek of an unseen key stores nothing either.
        let Outcome::Allow { tat, after } = g.decide(0, S, 0) else {
            panic!()
        };
        let st = g.status(after, S);
        assert_eq!((tat, st.remaining, st.reset), (0, 3, 0));
    }

    #[test]
    fn invalid_parameters() {
        for rate in [
            0.0,
            -1.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1.5e9,
            1e-30,
        ] {
            assert_eq!(Gcra::new(rate, 1), None, "rate {rate}");
        }
        assert_eq!(Gcra::new(1.0, 0), None);
        // A span above ~146 years is out of range.
        assert_eq!(Gcra::new(1e-9, u32::MAX), None);
        assert!(Gcra::new(1e9, u32::MAX).is_some());
    }

    #[test]
    fn time_going_backwards_grants_nothing() {
        let g = Gcra::new(1.0, 2).unwrap();
        let mut tat = 0;
        assert_eq!(admit(&g, &mut tat, 50 * S, 2), 2);
        // The clock steps back 10 s: the bucket looks emptier, not fuller.
        assert_eq!(admit(&g, &mut tat, 40 * S, 5), 0);
        match g.decide(tat, 40 * S, 1) {
            Outcome::Deny { retry_after, .. } => assert_eq!(retry_after, 11 * S),
            other => panic!("{other:?}"),
        }
        // And back at the old time, exactly what was owed.
        assert_eq!(admit(&g, &mut tat, 51 * S, 5), 1);
    }

    #[test]
    fn refund_never_overfills_nor_returns_granted_capacity() {
        let g = Gcra::new(1.0, 5).unwrap();
        let now = 10 * S;
        let Outcome::Allow { tat, .. } = g.decide(0, now, 3) else {
            panic!()
        };
        let back = g.refund(tat, now, tat, 3);
        assert_eq!(back, now);
        assert_eq!(g.refund(tat, now, tat, 100), now);
        // Burst 1: A charged at 0 (TAT 1 s); B passed at 1.2 s (TAT 2.2 s); A's
        // refund at 1.5 s returns nothing, since A's share has refilled and B has it.
        let g1 = Gcra::new(1.0, 1).unwrap();
        assert_eq!(g1.refund(2_200_000_000, 1_500_000_000, S, 1), 2_200_000_000);
        let Outcome::Allow { after, .. } = g.decide(back, now, 5) else {
            panic!("a full refund restores the whole bucket")
        };
        assert_eq!(g.status(after, now).remaining, 0);
    }

    #[test]
    fn a_settlement_scales_as_the_share_in_use() {
        // 100 a minute to 3,999,999,999 a minute: a span of 60 s to one of
        // 63.999999984 s; 18 s of the first weigh 19.199999995 s of the
        // second, rounded down, as a TAT 18 s ahead is converted.
        let minute = Gcra::new(100.0 / 60.0, 100).unwrap();
        let many = Gcra::new(3_999_999_999.0 / 60.0, 3_999_999_999).unwrap();
        assert_eq!(minute.rescale_span(18 * S, &many), 19_199_999_995);
        let now = 50 * S;
        assert_eq!(
            minute.rescale(now + 18 * S, now, &many) - now,
            minute.rescale_span(18 * S, &many)
        );
        // A refund of a span gives back no more than is ahead of `mine`,
        // and never moves the TAT below now.
        assert_eq!(
            Gcra::refund_span(now + 30 * S, now, now + 10 * S, 18 * S),
            now + 20 * S
        );
        assert_eq!(
            Gcra::refund_span(now + 30 * S, now, now + 40 * S, 18 * S),
            now + 12 * S
        );
        assert_eq!(
            Gcra::refund_span(now + 5 * S, now, now + 40 * S, 18 * S),
            now
        );
        assert_eq!(
            Gcra::refund_span(now - S, now, now + 40 * S, 18 * S),
            now - S
        );
    }

    #[test]
    fn rescale_keeps_the_share_in_use() {
        let fast = Gcra::new(100.0, 10).unwrap();
        let slow = Gcra::new(1.0, 10).unwrap();
        let now = 50 * S;
        let mut tat = 0;
        for _ in 0..10 {
            let Outcome::Allow { tat: t, .. } = fast.decide(tat, now, 1) else {
                panic!()
            };
            tat = t;
        }
        // Emptied at 100/s, then 1/s: still empty, one more after a second.
        let t = fast.rescale(tat, now, &slow);
        assert!(matches!(slow.decide(t, now, 1), Outcome::Deny { .. }));
        assert!(matches!(slow.decide(t, now + S, 1), Outcome::Allow { .. }));
        // Locked out at 0.001/s, then 100/s: free again after 10 ms.
        let glacial = Gcra::new(0.001, 1).unwrap();
        let Outcome::Allow { tat, .. } = glacial.decide(0, now, 1) else {
            panic!()
        };
        let quick = Gcra::new(100.0, 1).unwrap();
        let t = glacial.rescale(tat, now, &quick);
        assert!(matches!(
            quick.decide(t, now + 10_000_000, 1),
            Outcome::Allow { .. }
        ));
        // A full bucket stays full.
        assert_eq!(fast.rescale(now - 1, now, &slow), now - 1);
        // A bucket in debt (1.9 spans ahead) keeps its debt at any scale.
        let minute = Gcra::new(100.0 / 60.0, 100).unwrap();
        let more = Gcra::new(200.0 / 60.0, 200).unwrap();
        let tat = now + 114 * S;
        assert_eq!(minute.rescale(tat, now, &more), tat);
        assert_eq!(fast.rescale(now + 2 * S, now, &slow), now + 200 * S);
    }
}
