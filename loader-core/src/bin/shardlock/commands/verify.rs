//! `shardlock verify`: the manifest signature and every chunk of every shard.

use std::process::ExitCode;

use shardlock::Error;
use shardlock::RemoteOptions;
use shardlock::VerifyOptions;

use crate::cli::VerifyArgs;
use crate::output::{bar, print_json};

pub(crate) fn verify_cmd(a: VerifyArgs) -> Result<ExitCode, Error> {
    let remote = a.remote.options()?;
    let owner_token = a.issuer_key.as_deref().map(|p| owner_token(p, &a.dir, &a.reader.trust, &remote)).transpose()?;
    let no_token = owner_token.is_none() && a.reader.token.is_none();
    // The key provider is checked first (a refused URI says so before anything else).
    let (trust, access) = a.reader.access(owner_token)?;
    if no_token {
        return Err(Error::InvalidArgument(
            "verify needs --token FILE (a token granting verify), or the data owner's --issuer-key FILE".into(),
        ));
    }
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
            "{}: dataset {:?} generation {}, {} shard(s), {} records, {} authenticated{}",
            if report.ok { "OK" } else { "FAILED" },
            report.dataset,
            report.generation,
            report.shards.len(),
            report.records,
            crate::output::bytes(report.bytes),
            if bad > 0 { format!("; {bad} shard(s) failed") } else { String::new() }
        );
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The data owner's own verify token: the issuer key at `issuer_key` (whose public key
/// must be the trust anchor) grants itself `verify` on every shard of the dataset at
/// `dir` for 10 minutes. It stays in memory.
fn owner_token(
    issuer_key: &std::path::Path,
    dir: &str,
    trust: &std::path::Path,
    remote: &RemoteOptions,
) -> Result<shardlock::Token, Error> {
    let key = shardlock::IssuerKey::load(issuer_key)?;
    let anchor = shardlock::TrustAnchor::load(trust)?;
    if key.trust_anchor() != anchor {
        return Err(Error::InvalidArgument(format!(
            "--issuer-key {} (key id {}) is not the key of --trust {} (key id {})",
            issuer_key.display(),
            key.trust_anchor().key_id(),
            trust.display(),
            anchor.key_id()
        )));
    }
    let dataset = shardlock::inspect_at(dir, Some(&anchor), remote)?.manifest.dataset_id;
    let spec = shardlock::TokenSpec {
        dataset,
        principal: format!("owner:{}", anchor.key_id()),
        shards: shardlock::ShardSet::parse("all")?,
        ops: vec![shardlock::Operation::Verify],
        expires: shardlock::time_after(std::time::SystemTime::now(), std::time::Duration::from_secs(600))?,
        not_before: None,
        min_generation: None,
    };
    shardlock::Token::issue(&key, &spec)
}

fn total_bytes(dir: &str, remote: &RemoteOptions) -> u64 {
    shardlock::inspect_at(dir, None, remote).map(|i| i.manifest.shards.iter().map(|s| s.file_bytes).sum()).unwrap_or(0)
}
