//! A loader dropped early stops its worker threads, and steady state reuses its buffers.
//! In a test binary of its own: it counts the process's threads, which the other
//! loader tests would change while running beside it.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::Fixture;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn early_drop_stops_workers_and_steady_state_does_not_allocate() {
    let fx = Fixture::new();
    let (dir, _) = fx.standard("ds", "threads", 96);
    let builder = || fx.loader(&dir, "threads").batch_size(16);
    let before = threads();
    {
        // A small budget keeps the workers waiting on the consumer, so they are alive
        // (not finished) when counted.
        let mut l = builder().workers(3).memory_budget(16 * 1024).build().unwrap();
        let b = l.next().unwrap().unwrap();
        assert_eq!(b.len(), 16);
        assert!(threads() > before);
    }
    let t = std::time::Instant::now();
    while threads() > before && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(threads() <= before, "worker threads leaked");
    let mut l = builder().workers(2).memory_budget(16 * 1024).build().unwrap();
    for _ in 0..3 {
        for b in l.by_ref() {
            drop(b.unwrap());
        }
    }
    assert!(l.buffers_allocated() <= 8, "allocated {} buffers over 3 epochs", l.buffers_allocated());
}
