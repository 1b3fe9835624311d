//! What commands print: progress bars on stderr and pretty JSON on stdout.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub(crate) fn bar(len: u64, json: bool, template: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if json {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    pb
}

/// A byte count for people: `25.3 kB`, `1.2 MB`, `3.41 GB` (decimal units, three
/// significant digits or so), `512 B` below a kilobyte.
pub(crate) fn bytes(n: u64) -> String {
    let v = n as f64;
    match n {
        0..=999 => format!("{n} B"),
        1_000..=999_999 => format!("{:.1} kB", v / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} MB", v / 1e6),
        _ => format!("{:.2} GB", v / 1e9),
    }
}

/// A Unix time in seconds as RFC 3339 (`2026-11-26T10:00:00Z`).
pub(crate) fn rfc3339(unix: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix.min(253_402_300_799));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Prints `v` as pretty JSON. A reader that closed the pipe early (`| head`, a script
/// that stopped reading) is not an error worth a panic: the output is just dropped.
pub(crate) fn print_json(v: &serde_json::Value) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{}", serde_json::to_string_pretty(v).unwrap_or_default());
}
