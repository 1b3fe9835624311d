//! The key service's counters, in the Prometheus text format (`GET /metrics`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the unwrap latency histogram.
const BUCKETS: [f64; 10] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0];

#[derive(Default)]
pub(super) struct Metrics {
    releases: AtomicU64,
    denials: Mutex<BTreeMap<&'static str, u64>>,
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    dropped: AtomicU64,
    in_flight: AtomicU64,
    unwrap_buckets: [AtomicU64; BUCKETS.len()],
    unwrap_count: AtomicU64,
    unwrap_micros: AtomicU64,
}

impl Metrics {
    pub(super) fn release(&self, took: Duration) {
        self.releases.fetch_add(1, Ordering::Relaxed);
        let s = took.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.unwrap_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.unwrap_count.fetch_add(1, Ordering::Relaxed);
        self.unwrap_micros.fetch_add(took.as_micros().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    pub(super) fn denial(&self, reason: &'static str) {
        *self.denials.lock().unwrap_or_else(|p| p.into_inner()).entry(reason).or_default() += 1;
    }

    pub(super) fn request(&self, route: &'static str, status: u16) {
        *self.requests.lock().unwrap_or_else(|p| p.into_inner()).entry((route, status)).or_default() += 1;
    }

    pub(super) fn dropped_connection(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn enter(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn leave(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// The exposition text.
    pub(super) fn render(&self, manifests: usize) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "# HELP shardlock_keyd_releases_total DEKs released after a passing authorization.");
        let _ = writeln!(o, "# TYPE shardlock_keyd_releases_total counter");
        let _ = writeln!(o, "shardlock_keyd_releases_total {}", self.releases.load(Ordering::Relaxed));
        let _ = writeln!(o, "# HELP shardlock_keyd_denials_total Shard requests denied, by reason.");
        let _ = writeln!(o, "# TYPE shardlock_keyd_denials_total counter");
        for (reason, n) in self.denials.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(o, "shardlock_keyd_denials_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(o, "# HELP shardlock_keyd_requests_total HTTP requests, by route and status.");
        let _ = writeln!(o, "# TYPE shardlock_keyd_requests_total counter");
        for ((route, status), n) in self.requests.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(o, "shardlock_keyd_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        let _ = writeln!(
            o,
            "# HELP shardlock_keyd_dropped_connections_total Connections dropped before a request: TLS handshake failed or timed out, or the address holds too many."
        );
        let _ = writeln!(o, "# TYPE shardlock_keyd_dropped_connections_total counter");
        let _ = writeln!(o, "shardlock_keyd_dropped_connections_total {}", self.dropped.load(Ordering::Relaxed));
        let _ = writeln!(
            o,
            "# HELP shardlock_keyd_unwrap_seconds Time to release one DEK: authorize, audit, unwrap, audit."
        );
        let _ = writeln!(o, "# TYPE shardlock_keyd_unwrap_seconds histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "shardlock_keyd_unwrap_seconds_bucket{{le=\"{b}\"}} {}",
                self.unwrap_buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.unwrap_count.load(Ordering::Relaxed);
        let _ = writeln!(o, "shardlock_keyd_unwrap_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            o,
            "shardlock_keyd_unwrap_seconds_sum {}",
            self.unwrap_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(o, "shardlock_keyd_unwrap_seconds_count {count}");
        let _ = writeln!(o, "# HELP shardlock_keyd_in_flight Requests being served.");
        let _ = writeln!(o, "# TYPE shardlock_keyd_in_flight gauge");
        let _ = writeln!(o, "shardlock_keyd_in_flight {}", self.in_flight.load(Ordering::Relaxed));
        let _ = writeln!(o, "# HELP shardlock_keyd_manifests Verified manifests cached.");
        let _ = writeln!(o, "# TYPE shardlock_keyd_manifests gauge");
        let _ = writeln!(o, "shardlock_keyd_manifests {manifests}");
        o
    }
}
