//! A policy of registered keys, as `benches/decision.rs` and
//! `benches/memory.rs` both build one. Included by both with `#[path]`.

use tollgate::{ApiKey, Policy, UsagePlan};

/// Each of `values` registered (ids `id-0`, `id-1`…) on `plan`, which is
/// named `bench`.
pub(crate) fn registered_policy(values: &[String], plan: UsagePlan) -> Policy {
    values
        .iter()
        .enumerate()
        .fold(Policy::builder().plan(plan), |p, (i, v)| {
            p.key(ApiKey::new(format!("id-{i}"), v.as_str(), "bench"))
        })
        .build()
        .expect("a valid policy")
}
