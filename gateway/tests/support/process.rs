//! The gateway binary as a child process: [`ServerProcess`], shared with the
//! root crate's tests, started from the binary cargo builds for these tests.

use std::path::Path;

#[path = "../../../tests/support/process.rs"]
mod common;

pub use self::common::ServerProcess;

/// The gateway binary.
pub fn server_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tollgate-gateway"))
}
