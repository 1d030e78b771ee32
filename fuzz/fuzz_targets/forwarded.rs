//! Fuzz target: see `checks/forwarded.rs`, shared with `tests/layer/fuzz_corpora.rs`.

#![no_main]

#[path = "../checks/forwarded.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
