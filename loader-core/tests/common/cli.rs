//! Running the `shardlock` binary from the integration tests built with it (the `cli`
//! feature): include with `#[path = "common/cli.rs"] mod cli;`.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs `shardlock ARGS` in `dir`.
pub fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardlock")).current_dir(dir).args(args).output().unwrap()
}

/// Runs `shardlock ARGS` in `dir` and returns its stdout; a failure fails the test,
/// showing what the command printed.
pub fn ok(dir: &Path, args: &[&str]) -> String {
    let o = run(dir, args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}
