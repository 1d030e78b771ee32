//! Fuzz target: see `checks/config.rs`, shared with `tests/layer/fuzz_corpora.rs`.

#![no_main]

#[path = "../checks/config.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
