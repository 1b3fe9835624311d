//! `shardlock bench`: a dataset streamed through the loader (or the device stage), with
//! throughput, latency, CPU and memory.

use shardlock::AuthorizerConfig;
use shardlock::{device, Error, Loader, Shuffle};
use shardlock::{run_bench, BenchReport, BenchSource as Source};

use crate::cli::BenchArgs;
use crate::output::{bar, print_json};

/// The loader itself, or the device stage in front of it for `--device`.
fn bench_source(
    loader: Loader,
    a: &BenchArgs,
    decode: Vec<(String, shardlock::ImageDecode)>,
) -> Result<Box<dyn Source>, Error> {
    let Some(spec) = &a.device else { return Ok(Box::new(loader)) };
    let ordinal = device::parse_device(spec)?;
    let opts = device::DeviceOptions { ordinal, pinned: !a.pageable, decode, ..Default::default() };
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

/// `--decode FIELD=MODE:SIZE[:DTYPE]` as the loader's decode setting.
fn decode_arg(s: &str) -> Result<(String, shardlock::ImageDecode), Error> {
    let bad = || {
        Error::InvalidArgument(format!(
            "--decode {s:?}: expected FIELD=train:SIZE or FIELD=eval:SIZE, optionally :f32, :f16 or :bf16 \
             (e.g. image=train:224:f32)"
        ))
    };
    let (field, spec) = s.split_once('=').ok_or_else(bad)?;
    let mut parts = spec.split(':');
    let mode = parts.next().ok_or_else(bad)?;
    let size: u32 = parts.next().and_then(|n| n.parse().ok()).ok_or_else(bad)?;
    let mut d = match mode {
        "train" => shardlock::ImageDecode::train(size),
        "eval" => shardlock::ImageDecode::eval(size),
        _ => return Err(bad()),
    };
    if let Some(t) = parts.next() {
        d.dtype = match t {
            "u8" => shardlock::DType::U8,
            "f32" | "f16" | "bf16" => shardlock::DType::from_name(t).ok_or_else(bad)?,
            _ => return Err(bad()),
        };
    }
    if parts.next().is_some() || field.is_empty() {
        return Err(bad());
    }
    Ok((field.to_owned(), d))
}

/// `openssl speed -evp aes-256-gcm -decrypt -bytes 16384 -multi N` in GB/s, if
/// openssl runs here (its last line is `AES-256-GCM <thousands of bytes/s>k`).
fn openssl_ceiling(threads: usize) -> Option<f64> {
    let out = std::process::Command::new("openssl")
        .args(["speed", "-evp", "aes-256-gcm", "-decrypt", "-bytes", "16384", "-seconds", "3", "-multi"])
        .arg(threads.to_string())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().rev().find(|l| l.to_ascii_lowercase().contains("aes-256-gcm") || l.starts_with("evp"))?;
    let k: f64 = last.split_whitespace().last()?.strip_suffix('k')?.parse().ok()?;
    Some(k * 1000.0 / 1e9)
}

/// With `--ceiling`: the ceilings measured right after the loader, and its share of each
/// (the loader's median GB/s over the epochs after the first, or the only one).
fn ceiling_report(a: &BenchArgs, r: &BenchReport, threads: usize) -> Result<Option<serde_json::Value>, Error> {
    if !a.ceiling {
        return Ok(None);
    }
    let mut rates: Vec<f64> = r.epochs.iter().skip(usize::from(r.epochs.len() > 1)).map(|e| e.gb_per_s).collect();
    rates.sort_by(f64::total_cmp);
    let loader = rates.get(rates.len() / 2).copied().unwrap_or(0.0);
    let mmap = shardlock::aes_gcm_ceiling(threads, 512 << 20, 3)?;
    let openssl = openssl_ceiling(threads);
    Ok(Some(serde_json::json!({
        "threads": threads,
        "loader_gb_per_s": loader,
        "aes_gcm_mmap_gb_per_s": mmap,
        "openssl_gb_per_s": openssl,
        "share_of_mmap": loader / mmap,
        "share_of_openssl": openssl.map(|o| loader / o),
    })))
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
    let on_device = match a.decode_on.as_str() {
        "workers" => false,
        "device" if a.device.is_some() => true,
        "device" => {
            return Err(Error::InvalidArgument("--decode-on device decodes on the GPU: give --device cuda:N".into()))
        }
        other => return Err(Error::InvalidArgument(format!("--decode-on {other:?}: use workers or device"))),
    };
    let mut on_gpu = Vec::new();
    for d in &a.decode {
        let (field, spec) = decode_arg(d)?;
        if on_device {
            on_gpu.push((field, spec));
        } else {
            b = b.decode(field, spec);
        }
    }
    if a.skip_bad_images {
        b = b.on_decode_error(shardlock::OnDecodeError::Skip);
    }
    let loader = b.build()?;
    let per_epoch = loader.len()? as u64;
    let mut source = bench_source(loader, &a, on_gpu)?;
    let pb = bar(per_epoch * a.epochs, a.json, "streaming {bar:40} {pos}/{len} batches [{elapsed_precise}]");
    let report = run_bench(&mut *source, a.epochs, &mut |_, _| pb.inc(1))?;
    pb.finish_and_clear();
    drop(source);
    let h2d = h2d_report(&a, &report)?;
    let threads = a.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let ceiling = ceiling_report(&a, &report, threads)?;
    if a.json {
        let mut v = serde_json::to_value(&report).unwrap_or_default();
        if let (Some(h), Some(obj)) = (&h2d, v.as_object_mut()) {
            obj.insert("h2d".into(), h.clone());
        }
        if let (Some(c), Some(obj)) = (&ceiling, v.as_object_mut()) {
            obj.insert("ceiling".into(), c.clone());
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
    if let Some(c) = &ceiling {
        let f = |k: &str| c[k].as_f64().unwrap_or(f64::NAN);
        println!("ceiling, {} threads, measured after the loader in this run:", c["threads"]);
        println!(
            "  AES-256-GCM alone, page-cached mmap, 16 KiB chunks: {:.2} GB/s; loader {:.2} GB/s = {:.2} of it",
            f("aes_gcm_mmap_gb_per_s"),
            f("loader_gb_per_s"),
            f("share_of_mmap")
        );
        match c["openssl_gb_per_s"].as_f64() {
            Some(o) => println!(
                "  openssl speed -evp aes-256-gcm -decrypt -bytes 16384 -multi {}: {o:.2} GB/s; loader = {:.2} of it",
                c["threads"],
                f("share_of_openssl")
            ),
            None => println!("  openssl speed: not run (no `openssl` on PATH, or its output did not parse)"),
        }
    }
    Ok(())
}
