//! `shardlock bench`: a dataset streamed through the loader (or the device stage), with
//! throughput, latency, CPU and memory.

use shardlock::AuthorizerConfig;
use shardlock::{device, Error, Loader, Shuffle};
use shardlock::{run_bench, BenchReport, BenchSource as Source};

use crate::cli::BenchArgs;
use crate::output::{bar, print_json};

/// The loader itself, or the device stage in front of it for `--device`.
fn bench_source(loader: Loader, a: &BenchArgs) -> Result<Box<dyn Source>, Error> {
    let Some(spec) = &a.device else { return Ok(Box::new(loader)) };
    let ordinal = device::parse_device(spec)?;
    let opts = device::DeviceOptions { ordinal, pinned: !a.pageable, ..Default::default() };
    Ok(Box::new(device::DeviceLoader::new(loader, opts)?))
}

/// With `--device`: the bandwidth of a plain async copy of one batch-sized locked
/// buffer, the ceiling the device stage is measured against.
fn h2d_report(a: &BenchArgs, r: &BenchReport) -> Result<Option<serde_json::Value>, Error> {
    let (Some(spec), Some(e)) = (&a.device, r.epochs.first()) else { return Ok(None) };
    let bytes = (e.bytes / e.batches.max(1)).max(1) as usize;
    let ordinal = device::parse_device(spec)?;
    let gbps = device::measure_h2d(ordinal, bytes, 200, !a.pageable)?;
    Ok(Some(serde_json::json!({"bytes": bytes, "gb_per_s": gbps, "pinned": !a.pageable})))
}

pub(crate) fn bench_cmd(a: BenchArgs) -> Result<(), Error> {
    let r = &a.reader;
    let mut b = Loader::builder(&a.dir)
        .key_provider(r.keys()?)
        .trust(&r.trust)
        .batch_size(a.batch_size)
        .shuffle(Shuffle::parse(&a.shuffle)?)
        .seed(a.seed)
        .remote_options(a.remote.options()?)
        .memory_budget(a.memory_budget)
        .allow_unlocked_memory(a.allow_unlocked_memory)
        .authorizer_config(AuthorizerConfig {
            skew: shardlock::parse_ttl(&r.clock_skew)?,
            deny_list: r.deny_list.clone(),
            ..Default::default()
        });
    if let Some(g) = r.min_generation {
        b = b.min_generation(g);
    }
    if let Some(t) = &r.token {
        b = b.token(t);
    }
    if let Some(p) = &r.audit_log {
        b = b.audit_log(p);
    }
    if let Some(w) = a.workers {
        b = b.workers(w);
    }
    if let Some(f) = &a.fields {
        b = b.fields(f.split(',').map(str::trim).filter(|s| !s.is_empty()));
    }
    let loader = b.build()?;
    let per_epoch = loader.len()? as u64;
    let mut source = bench_source(loader, &a)?;
    let pb = bar(per_epoch * a.epochs, a.json, "streaming {bar:40} {pos}/{len} batches [{elapsed_precise}]");
    let report = run_bench(&mut *source, a.epochs, &mut |_, _| pb.inc(1))?;
    pb.finish_and_clear();
    drop(source);
    let h2d = h2d_report(&a, &report)?;
    if a.json {
        let mut v = serde_json::to_value(&report).unwrap_or_default();
        if let (Some(h), Some(obj)) = (&h2d, v.as_object_mut()) {
            obj.insert("h2d".into(), h.clone());
        }
        print_json(&v);
        return Ok(());
    }
    if let Some(h) = &h2d {
        println!("raw H2D copy of one batch-sized locked buffer: {:.2} GB/s ({} bytes)", h["gb_per_s"], h["bytes"]);
    }
    println!(
        "{:>5} {:>8} {:>9} {:>9} {:>12} {:>9} {:>9} {:>9} {:>6}",
        "epoch", "batches", "GB", "GB/s", "samples/s", "first ms", "p50 ms", "p99 ms", "cpu"
    );
    for e in &report.epochs {
        println!(
            "{:>5} {:>8} {:>9.3} {:>9.2} {:>12.0} {:>9.2} {:>9.3} {:>9.3} {:>6.2}",
            e.epoch,
            e.batches,
            e.bytes as f64 / 1e9,
            e.gb_per_s,
            e.samples_per_s,
            e.first_batch_ms,
            e.p50_batch_ms,
            e.p99_batch_ms,
            e.cpu_utilisation
        );
    }
    for e in report.epochs.iter().filter(|e| e.remote_bytes > 0) {
        println!("epoch {}: {:.3} GB received from object storage", e.epoch, e.remote_bytes as f64 / 1e9);
    }
    println!(
        "peak RssAnon {:.1} MiB (baseline {:.1} MiB); {} batch buffers allocated",
        report.peak_rss_anon as f64 / 1048576.0,
        report.baseline_rss_anon as f64 / 1048576.0,
        report.buffers_allocated
    );
    Ok(())
}
