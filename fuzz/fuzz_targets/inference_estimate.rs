//! Fuzz target: see `checks/inference_estimate.rs`, shared with `tests/layer/fuzz_corpora.rs`.

#![no_main]

/// The gateway's body parsing, the same file its mock mode includes.
#[allow(dead_code)]
#[path = "../../gateway/src/mock/estimate.rs"]
mod estimate;

#[path = "../checks/inference_estimate.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
