//! The configuration file parser (`tollgate::config`) on hostile TOML.
//!
//! Shared by the `config` fuzz target and `tests/layer/fuzz_corpora.rs`.
//!
//! Input: the file's bytes (input that is not UTF-8 is no file to parse).

use tollgate::ManualClock;
use tollgate::config::Config;

/// Checks that a refused file gets an error that names a line and column
/// inside the file (and, for a missing field, the table it is missing
/// from), and that an accepted one builds its policy.
pub(crate) fn check(data: &[u8]) {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(src) {
        Ok(config) => {
            if let Err(e) = config.policy_with_clock(ManualClock::new()) {
                panic!("a checked configuration does not build: {e}");
            }
        }
        Err(e) => {
            let lines = src.bytes().filter(|&b| b == b'\n').count() + 1;
            assert!(
                (1..=lines).contains(&e.line()),
                "line {} of {lines}: {e}",
                e.line()
            );
            let line = src.split('\n').nth(e.line() - 1).unwrap();
            assert!(
                (1..=line.chars().count() + 1).contains(&e.column()),
                "column {} of {:?}: {e}",
                e.column(),
                line
            );
            assert!(!e.message().is_empty());
            // A field missing from a table is named with the table's path;
            // reported at the table's header, the path starts with the
            // header's first key, not with the table above it.
            if e.message().contains("missing field") {
                assert!(!e.path().is_empty(), "no path: {e}");
                let at: String = line.chars().skip(e.column() - 1).collect();
                if let Some(header) = at.strip_prefix('[') {
                    let first = header.trim_start_matches('[').split(['.', ']']).next();
                    let first = first.unwrap_or_default().trim();
                    let bare = first
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if bare && !first.is_empty() {
                        let named = e.path().split(['.', '[']).next().unwrap_or_default();
                        assert_eq!(named, first, "the table of {line:?}: {e}");
                    }
                }
            }
            let shown = e.to_string();
            assert!(
                shown.starts_with(&format!("{}:{}: ", e.line(), e.column())),
                "{shown}"
            );
        }
    }
}
