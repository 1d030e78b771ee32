//! What the stores decide: the conformance suite run on the memory store and
//! on a real `redis-server` (and Redis Cluster), stores written outside the
//! crate, a differential test against a model of DESIGN, calendar quotas and
//! usage reports against a second model of it, clock jumps, late
//! settlement, the property tests that nothing is
//! ever over-admitted, hammers of concurrent deciders, and what a Redis
//! store's local copy holds after a change made through another instance.
//!
//! `hammer` runs this test binary again in a child role, and
//! `never_over_admit` keeps its proptest regressions beside its file.

#[path = "../support/mod.rs"]
mod support;

mod accounts;
mod admin_range;
mod calendar;
mod clock_jumps;
mod conformance;
mod differential;
mod hammer;
mod late_settlement;
mod models;
mod never_over_admit;
mod per_key_quotas;
mod redis_registry;
mod reset_settlement;
mod store;
mod usage_reports;
