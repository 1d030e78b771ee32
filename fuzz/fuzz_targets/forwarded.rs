//! Fuzz target: see `checks/forwarded.rs`, shared with `tests/fuzz_corpora.rs`.

#![no_main]

#[path = "../checks/forwarded.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
