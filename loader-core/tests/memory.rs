//! Anonymous memory stays under the configured budget (+64 MiB) while streaming a
//! dataset four times larger than the budget. One test per binary: RssAnon is
//! process-wide.
#![allow(clippy::unwrap_used)]

mod common;

#[test]
fn rss_anon_stays_under_budget_for_a_dataset_four_times_larger() {
    const BUDGET: u64 = 16 << 20;
    let fx = common::Fixture::new();
    let schema = shardlock::Schema::new(vec![shardlock::Field::tensor("x", shardlock::DType::U8, &[8192])]).unwrap();
    let dir = fx.path("big");
    let mut opts = shardlock::PackOptions::new("mem");
    opts.shard_size = 8 << 20;
    let mut w = shardlock::DatasetWriter::create(&dir, schema, opts, &*fx.keyring, &fx.issuer).unwrap();
    let row = vec![0x5Au8; 8192];
    let n = (4 * BUDGET / 8192) as usize + 1024;
    for _ in 0..n {
        w.write_sample(&[&row]).unwrap();
    }
    w.finish().unwrap();
    let mut loader = fx
        .loader(&dir, "mem")
        .batch_size(64)
        .memory_budget(BUDGET)
        .shuffle(shardlock::Shuffle::Window)
        .build()
        .unwrap();
    let report = shardlock::run_bench(&mut loader, 1, &mut |_, _| {}).unwrap();
    assert_eq!(report.epochs[0].samples, (n / 64 * 64) as u64);
    assert!(report.epochs[0].bytes > 4 * BUDGET);
    let grown = report.peak_rss_anon.saturating_sub(report.baseline_rss_anon);
    assert!(report.peak_rss_anon > 0, "RssAnon not readable");
    assert!(grown < BUDGET + (64 << 20), "RssAnon grew by {grown} bytes with a budget of {BUDGET}");
}
