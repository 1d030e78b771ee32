//! Fuzz target: see `checks/key_header.rs`, shared with `tests/layer/fuzz_corpora.rs`.

#![no_main]

#[path = "../checks/key_header.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
