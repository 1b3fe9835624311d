//! `shardlock verify`: the manifest signature and every chunk of every shard.

use std::process::ExitCode;

use shardlock::Error;
use shardlock::RemoteOptions;
use shardlock::VerifyOptions;

use crate::cli::VerifyArgs;
use crate::output::{bar, print_json};

pub(crate) fn verify_cmd(a: VerifyArgs) -> Result<ExitCode, Error> {
    let (trust, access) = a.reader.access()?;
    let remote = a.remote.options()?;
    let total = total_bytes(&a.dir, &remote);
    let pb = bar(total, a.json, "verifying {bar:40} {bytes}/{total_bytes} [{elapsed_precise}, {bytes_per_sec}]");
    let opts = VerifyOptions { backend: a.backend, min_generation: a.reader.min_generation };
    let access = access.with_backend(a.backend);
    let report = shardlock::verify_at(&a.dir, &trust, &access, &opts, &remote, &mut |n| pb.inc(n))?;
    pb.finish_and_clear();
    if a.json {
        print_json(&serde_json::to_value(&report).unwrap_or_default());
    } else {
        for s in report.shards.iter().filter(|s| !s.ok) {
            println!("FAIL {}", s.error.as_deref().unwrap_or("unknown error"));
        }
        let bad = report.shards.iter().filter(|s| !s.ok).count();
        println!(
            "{}: dataset {:?} generation {}, {} shard(s), {} records, {:.1} MB authenticated{}",
            if report.ok { "OK" } else { "FAILED" },
            report.dataset,
            report.generation,
            report.shards.len(),
            report.records,
            report.bytes as f64 / 1e6,
            if bad > 0 { format!("; {bad} shard(s) failed") } else { String::new() }
        );
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn total_bytes(dir: &str, remote: &RemoteOptions) -> u64 {
    shardlock::inspect_at(dir, None, remote).map(|i| i.manifest.shards.iter().map(|s| s.file_bytes).sum()).unwrap_or(0)
}
