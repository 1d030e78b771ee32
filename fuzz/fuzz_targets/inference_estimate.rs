//! Fuzz target: see `checks/inference_estimate.rs`, shared with `tests/layer/fuzz_corpora.rs`.

#![no_main]

/// The reference server's body parsing, the same file the example includes.
#[allow(dead_code)]
#[path = "../../examples/support/estimate.rs"]
mod estimate;

#[path = "../checks/inference_estimate.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
