//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the
//! same checks as the fuzz targets, on the stable toolchain: every input the
//! fuzzer kept (and every crash it found, once added) is checked on each
//! `cargo test`. The checks live in `fuzz/checks/`, included here and by the
//! targets with `#[path]`.

use std::path::{Path, PathBuf};

/// The gateway's body parsing, the file its mock mode includes.
#[allow(dead_code)]
#[path = "../../gateway/src/mock/estimate.rs"]
mod estimate;

#[path = "../../fuzz/checks/config.rs"]
mod config;
#[path = "../../fuzz/checks/forwarded.rs"]
mod forwarded;
#[path = "../../fuzz/checks/inference_estimate.rs"]
mod inference_estimate;
#[path = "../../fuzz/checks/key_header.rs"]
mod key_header;

/// The fuzz targets (`fuzz/fuzz_targets/`), each replayed by a test below.
const TARGETS: [&str; 4] = ["config", "forwarded", "inference_estimate", "key_header"];

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

/// Runs every file of `target`'s corpus through `check`; returns how many.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = corpus_root().join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    for file in &files {
        let data = std::fs::read(file).unwrap();
        if let Err(panic) = std::panic::catch_unwind(|| check(&data)) {
            panic!(
                "{target}: {} fails its check: {}",
                file.display(),
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("panic")
            );
        }
    }
    files.len()
}

#[test]
fn config_corpus() {
    // On a thread with the main thread's stack (8 MiB), where a server parses
    // its configuration: in a debug build, dropping a parsed document that
    // nests tables some 60 deep recurses through the `toml` crate's frames
    // past a test thread's 2 MiB (a release build does it in under 1 MiB).
    let replayed = std::thread::Builder::new()
        .stack_size(8 << 20)
        .spawn(|| replay("config", config::check))
        .unwrap()
        .join()
        .unwrap();
    assert!(replayed > 0);
}

#[test]
fn forwarded_corpus() {
    assert!(replay("forwarded", forwarded::check) > 0);
}

#[test]
fn inference_estimate_corpus() {
    assert!(replay("inference_estimate", inference_estimate::check) > 0);
}

#[test]
fn key_header_corpus() {
    assert!(replay("key_header", key_header::check) > 0);
}

/// A corpus directory without a check here would never be replayed.
#[test]
fn every_corpus_is_replayed() {
    let mut dirs: Vec<String> = std::fs::read_dir(corpus_root())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    dirs.sort();
    assert_eq!(dirs, TARGETS);
}
