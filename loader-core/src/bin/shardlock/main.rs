//! The `shardlock` command-line tool: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use shardlock::audit::AuditLog;
use shardlock::auth::{self, Access, Authorizer, AuthorizerConfig, Operation, ShardSet, Token, TokenSpec};
use shardlock::dataset::{self, VerifyOptions};
use shardlock::keys::{self, IssuerKey, Keyring, TrustAnchor};
use shardlock::pack::{self, PackOptions};
use shardlock::remote::RemoteOptions;
use shardlock::{Backend, Error};
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "shardlock", version, about = "Encrypted, authenticated dataset shards for training", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create keys: a keyring with one KEK, or an Ed25519 issuer key pair.
    #[command(subcommand)]
    Keygen(Keygen),
    /// Pack .npy files (one per field) or a directory of files into an encrypted dataset.
    Pack(PackArgs),
    /// Summarise a dataset's manifest without any key.
    Inspect(InspectArgs),
    /// Check the manifest signature and authenticate every chunk of every shard.
    Verify(VerifyArgs),
    /// Rewrap every DEK under another provider's KEK (keyring file or HSM) and re-sign the manifest.
    Rotate(RotateArgs),
    /// Stream a dataset through the loader and report throughput, latency, CPU and memory.
    Bench(BenchArgs),
    /// Issue, attenuate, inspect and revoke access tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Check the audit log's hash chain.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Upload a packed dataset directory to s3://bucket/prefix (shards first, manifest last).
    Upload(UploadArgs),
}

/// Where to find an `s3://` dataset and where to cache it. Credentials come only from
/// the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), never
/// from the command line, where other users could read them.
#[derive(Args, Default)]
struct RemoteArgs {
    /// S3 endpoint URL (default: AWS_ENDPOINT_URL / AWS_ENDPOINT, else AWS).
    #[arg(long)]
    s3_endpoint: Option<String>,
    /// S3 region (default: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1).
    #[arg(long)]
    s3_region: Option<String>,
    /// Allow a plain http:// endpoint (implied for 127.0.0.1 / localhost).
    #[arg(long)]
    s3_allow_http: bool,
    /// Give up on one object after this long, retries included (e.g. 120s).
    #[arg(long)]
    s3_timeout: Option<String>,
    /// Ciphertext cache directory (default: $SHARDLOCK_CACHE_DIR, else ~/.cache/shardlock).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Bytes of shards to keep in the cache before evicting ones the plan is done with.
    #[arg(long, value_parser = parse_size)]
    cache_bytes: Option<u64>,
    /// Ranged GETs of just the needed chunks instead of whole shards: auto (for
    /// global shuffle when the shards do not fit in --cache-bytes), always, never.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    range_reads: String,
}

impl RemoteArgs {
    fn options(&self) -> Result<RemoteOptions, Error> {
        let mut o =
            RemoteOptions { cache_dir: self.cache_dir.clone(), cache_bytes: self.cache_bytes, ..Default::default() };
        o.endpoint.clone_from(&self.s3_endpoint);
        o.region.clone_from(&self.s3_region);
        if self.s3_allow_http {
            o.allow_http = Some(true);
        }
        if let Some(t) = &self.s3_timeout {
            o.set("timeout", t)?;
        }
        o.set("range_reads", &self.range_reads)?;
        Ok(o)
    }
}

#[derive(Args)]
struct UploadArgs {
    /// Packed dataset directory.
    dir: PathBuf,
    /// Destination, s3://bucket/prefix.
    dest: String,
    #[command(flatten)]
    remote: RemoteArgs,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Issue a token with the data owner's issuer key.
    Issue {
        /// Issuer secret key file.
        #[arg(long)]
        issuer_key: PathBuf,
        /// Dataset id the token is for.
        #[arg(long)]
        dataset: String,
        /// Who the token is for (recorded in the audit log).
        #[arg(long)]
        principal: String,
        /// Shards covered: "all" or a list like 0-3,7,10-12.
        #[arg(long, default_value = "all")]
        shards: String,
        /// Operations granted: read, verify.
        #[arg(long, default_value = "read")]
        ops: String,
        /// Lifetime (e.g. 90s, 30m, 1h, 7d).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Not valid before this time (RFC 3339 or Unix seconds); default now.
        #[arg(long)]
        not_before: Option<String>,
        /// Token file to write (mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Narrow a token offline (no key needed): fewer shards, fewer operations, sooner expiry.
    Attenuate {
        /// Token file to narrow.
        token: PathBuf,
        /// Issuer public key (.pub), to check the token before narrowing it.
        #[arg(long)]
        trust: PathBuf,
        /// Keep only these shards.
        #[arg(long)]
        shards: Option<String>,
        /// Keep only these operations.
        #[arg(long)]
        ops: Option<String>,
        /// Expire within this duration from now.
        #[arg(long)]
        ttl: Option<String>,
        /// Token file to write (mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Show a token's blocks, checks and revocation ids (never the token itself).
    Inspect {
        /// Token file.
        token: PathBuf,
        /// Issuer public key (.pub) to verify the signature chain.
        #[arg(long)]
        trust: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a token's revocation id to a deny list (revokes it and everything attenuated from it).
    Revoke {
        /// Token file.
        token: PathBuf,
        /// Deny-list file to append to (created if missing).
        #[arg(long)]
        deny_list: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Verify every line's hash and the chain; print the record count and head hash.
    Verify {
        /// Audit log file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Options every reader takes.
#[derive(Args)]
struct ReaderArgs {
    /// Keyring file holding the KEK the DEKs are wrapped under, or the pkcs11: URI of an
    /// HSM KEK (RFC 7512; the PIN comes from pin-source=env:VAR or file:PATH, never the URI).
    #[arg(long)]
    keyring: String,
    /// Access token file (from `shardlock token issue`).
    #[arg(long)]
    token: Option<PathBuf>,
    /// Issuer public key (.pub): the trust anchor for manifest and token.
    #[arg(long)]
    trust: PathBuf,
    /// Deny-list file of revoked token ids, re-read when it changes.
    #[arg(long)]
    deny_list: Option<PathBuf>,
    /// Append every decision to this hash-chained audit log.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Allowed clock skew for token validity (e.g. 30s).
    #[arg(long, default_value = "30s")]
    clock_skew: String,
}

impl ReaderArgs {
    fn access(&self) -> Result<(TrustAnchor, Access), Error> {
        let keys = keys::open_provider(&self.keyring)?;
        let trust = TrustAnchor::load(&self.trust)?;
        let cfg = AuthorizerConfig {
            skew: auth::parse_ttl(&self.clock_skew)?,
            deny_list: self.deny_list.clone(),
            ..Default::default()
        };
        let authorizer = Authorizer::from_file(&trust, self.token.as_deref(), cfg)?;
        let mut access = Access::new(authorizer, keys);
        if let Some(p) = &self.audit_log {
            access = access.with_audit(Arc::new(AuditLog::open(p)?));
        }
        Ok((trust, access))
    }
}

#[derive(Subcommand)]
enum Keygen {
    /// A new KEK: a keyring file (mode 0600) holding one fresh 256-bit KEK, or a
    /// non-extractable AES-256 KEK generated inside a PKCS#11 HSM.
    #[command(group(clap::ArgGroup::new("dest").required(true).args(["out", "pkcs11"])))]
    Kek {
        /// Keyring file to create (refuses to overwrite).
        #[arg(long)]
        out: Option<PathBuf>,
        /// pkcs11: URI (RFC 7512) naming the token and the new KEK's label (object=);
        /// the PIN comes from pin-source=env:VAR or file:PATH. Refuses an existing label.
        #[arg(long)]
        pkcs11: Option<String>,
    },
    /// A new Ed25519 issuer key: secret in FILE (0600), public trust anchor in FILE.pub.
    Issuer {
        /// Secret key file to create (refuses to overwrite).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct PackArgs {
    /// Keyring file whose active KEK wraps the shard DEKs, or a pkcs11: URI of an HSM KEK.
    #[arg(long)]
    keyring: String,
    /// The data owner's issuer secret key; signs the manifest.
    #[arg(long)]
    issuer_key: PathBuf,
    /// Dataset id bound into every shard ([A-Za-z0-9_.:/-], 1-255 characters).
    #[arg(long)]
    dataset_id: String,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Target plaintext bytes per shard (e.g. 268435456, 64MiB, 512k).
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    shard_size: u64,
    /// Replace a dataset already in the output directory.
    #[arg(long)]
    force: bool,
    /// AEAD backend.
    #[arg(long, default_value = "aws-lc-rs", value_parser = parse_backend)]
    backend: Backend,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    json: bool,
    /// `.npy` files (field = file stem) or one directory (one sample per file, field `data`).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

#[derive(Args)]
struct InspectArgs {
    /// Dataset directory, file:// URL or s3://bucket/prefix.
    dir: String,
    #[command(flatten)]
    remote: RemoteArgs,
    /// Issuer public key (.pub) to check the signature against.
    #[arg(long)]
    trust: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct VerifyArgs {
    /// Dataset directory, file:// URL or s3://bucket/prefix (shards are downloaded to the cache).
    dir: String,
    #[command(flatten)]
    remote: RemoteArgs,
    #[command(flatten)]
    reader: ReaderArgs,
    /// Refuse a manifest older than this generation (rollback protection).
    #[arg(long)]
    min_generation: Option<u64>,
    /// AEAD backend.
    #[arg(long, default_value = "aws-lc-rs", value_parser = parse_backend)]
    backend: Backend,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// Dataset directory, file:// URL or s3://bucket/prefix.
    dir: String,
    #[command(flatten)]
    remote: RemoteArgs,
    #[command(flatten)]
    reader: ReaderArgs,
    /// Samples per batch.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Epochs to run (the first reads from disk or page cache, later ones from page cache).
    #[arg(long, default_value_t = 2)]
    epochs: u64,
    /// Shuffle mode: none, window, global.
    #[arg(long, default_value = "window")]
    shuffle: String,
    /// Decrypt worker threads (default: cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Read only these fields (comma-separated).
    #[arg(long)]
    fields: Option<String>,
    /// In-flight batch memory budget (e.g. 512MiB).
    #[arg(long, default_value = "512MiB", value_parser = parse_size)]
    memory_budget: u64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Allow batch memory that is not locked in RAM (audited).
    #[arg(long)]
    allow_unlocked_memory: bool,
    /// Deliver batches to this GPU ("cuda:N") instead of host memory; the numbers
    /// count a batch once its copy to the device completed (needs the `cuda` feature
    /// and an NVIDIA driver).
    #[arg(long)]
    device: Option<String>,
    /// With --device: copy from pageable memory instead of registering the locked
    /// batch buffers (for confidential-computing GPUs).
    #[arg(long, requires = "device")]
    pageable: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RotateArgs {
    /// Dataset directory.
    dir: PathBuf,
    /// Current key provider: keyring file or pkcs11: URI.
    #[arg(long)]
    keyring: String,
    /// Key provider whose active KEK will wrap the DEKs: keyring file or pkcs11: URI.
    #[arg(long)]
    new_keyring: String,
    /// The issuer secret key that signed the manifest.
    #[arg(long)]
    issuer_key: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (e.g. 268435456, 64MiB, 512k)"))?;
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        u => return Err(format!("unknown size unit {u:?} (use k, MiB, GiB)")),
    };
    n.checked_mul(mul).filter(|&v| v > 0).ok_or_else(|| format!("{s:?} is out of range"))
}

fn parse_backend(s: &str) -> Result<Backend, String> {
    Backend::from_name(s).ok_or_else(|| {
        let names: Vec<_> = Backend::ALL.iter().map(|b| b.name()).collect();
        format!("unknown backend {s:?}; this build has: {}", names.join(", "))
    })
}

fn bar(len: u64, json: bool, template: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if json {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    pb
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, Error> {
    match cli.command {
        Command::Keygen(Keygen::Kek { out: Some(out), pkcs11: None }) => {
            let ring = Keyring::create(&out)?;
            let id = ring.kek_ids().next().unwrap_or_default().to_owned();
            println!("wrote keyring {} (mode 0600) with KEK {id}", out.display());
        }
        Command::Keygen(Keygen::Kek { pkcs11: Some(uri), out: None }) => keygen_pkcs11(&uri)?,
        Command::Keygen(Keygen::Kek { .. }) => {
            return Err(Error::InvalidArgument("give either --out FILE or --pkcs11 URI".into()));
        }
        Command::Keygen(Keygen::Issuer { out }) => {
            let key = IssuerKey::generate()?;
            let public = key.save(&out)?;
            println!(
                "wrote issuer secret key {} (mode 0600) and trust anchor {} (key id {})",
                out.display(),
                public.display(),
                key.trust_anchor().key_id()
            );
        }
        Command::Pack(a) => pack_cmd(a)?,
        Command::Token(t) => token_cmd(t)?,
        Command::Bench(a) => bench_cmd(a)?,
        Command::Audit(AuditCmd::Verify { file, json }) => {
            return match shardlock::audit::verify_log(&file) {
                Ok(s) => {
                    if json {
                        print_json(&serde_json::json!({"ok": true, "records": s.records, "head": s.head}));
                    } else {
                        println!("OK: {} records, chain intact; head hash {} (record it elsewhere to detect later truncation)", s.records, s.head);
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e @ Error::Audit { .. }) => {
                    if json {
                        let line = if let Error::Audit { line, .. } = &e { *line } else { None };
                        print_json(&serde_json::json!({"ok": false, "line": line, "error": e.to_string()}));
                    } else {
                        println!("FAILED: {e}");
                    }
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => Err(e),
            };
        }
        Command::Inspect(a) => return inspect_cmd(a),
        Command::Upload(a) => {
            let n = shardlock::remote::upload_dir(&a.dir, &a.dest, &a.remote.options()?)?;
            println!("uploaded {} ({:.1} MB, ciphertext as packed) to {}", a.dir.display(), n as f64 / 1e6, a.dest);
        }
        Command::Verify(a) => return verify_cmd(a),
        Command::Rotate(a) => {
            let old = keys::open_provider(&a.keyring)?;
            let new = keys::open_provider(&a.new_keyring)?;
            let issuer = IssuerKey::load(&a.issuer_key)?;
            let m = dataset::rotate(&a.dir, &*old, &*new, &issuer)?;
            if a.json {
                print_json(
                    &serde_json::json!({"dataset": m.dataset_id, "generation": m.generation, "shards": m.shards.len(), "kek_id": new.active_kek_id(), "provider": new.describe()}),
                );
            } else {
                println!(
                    "rotated {} shards of {:?} to KEK {} ({}); manifest generation {}",
                    m.shards.len(),
                    m.dataset_id,
                    new.active_kek_id(),
                    new.describe(),
                    m.generation
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "pkcs11")]
fn keygen_pkcs11(uri: &str) -> Result<(), Error> {
    let uri = keys::pkcs11::Pkcs11Uri::parse(uri)?;
    let id = keys::pkcs11::generate_kek(&uri)?;
    println!("generated non-extractable AES-256 KEK {id} as {} inside the HSM", uri.describe());
    Ok(())
}

#[cfg(not(feature = "pkcs11"))]
fn keygen_pkcs11(_uri: &str) -> Result<(), Error> {
    Err(Error::InvalidArgument("this build of shardlock has no PKCS#11 support (cargo feature `pkcs11`)".into()))
}

fn pack_cmd(a: PackArgs) -> Result<(), Error> {
    let keys = keys::open_provider(&a.keyring)?;
    let issuer = IssuerKey::load(&a.issuer_key)?;
    let src = pack::InputSource::from_paths(&a.inputs)?;
    let opts = PackOptions { dataset_id: a.dataset_id, shard_size: a.shard_size, force: a.force, backend: a.backend };
    let mut w = pack::DatasetWriter::create(&a.out, src.schema()?, opts, &*keys, &issuer)?;
    let pb = bar(src.len(), a.json, "packing {bar:40} {pos}/{len} samples [{elapsed_precise}, {per_sec}]");
    let t = std::time::Instant::now();
    src.write_into(&mut w, &mut |n| pb.set_position(n))?;
    let bytes = w.bytes_in();
    let m = w.finish()?;
    pb.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        print_json(&serde_json::json!({
            "dataset": m.dataset_id, "out": a.out, "records": m.records, "shards": m.shards.len(),
            "plaintext_bytes": bytes, "seconds": secs, "gb_per_s": bytes as f64 / secs / 1e9,
        }));
    } else {
        println!(
            "packed {} records ({:.1} MB) into {} shard(s) in {} ({:.2} GB/s); manifest signed by issuer {}",
            m.records,
            bytes as f64 / 1e6,
            m.shards.len(),
            a.out.display(),
            bytes as f64 / secs / 1e9,
            m.issuer_key_id
        );
    }
    Ok(())
}

fn inspect_cmd(a: InspectArgs) -> Result<ExitCode, Error> {
    let trust = a.trust.as_deref().map(TrustAnchor::load).transpose()?;
    let i = dataset::inspect_at(&a.dir, trust.as_ref(), &a.remote.options()?)?;
    let m = &i.manifest;
    let signature = match i.signature_valid {
        Some(true) => "valid",
        Some(false) => "INVALID",
        None => "not checked (pass --trust FILE.pub)",
    };
    let bytes: u64 = m.shards.iter().map(|s| s.file_bytes).sum();
    let plain: u64 = m.shards.iter().map(|s| s.plaintext_bytes).sum();
    if a.json {
        print_json(&serde_json::json!({
            "dataset": m.dataset_id, "generation": m.generation, "created_unix": m.created_unix,
            "issuer_key_id": m.issuer_key_id, "signature": i.signature_valid, "consistency_error": i.consistency_error,
            "schema": m.schema, "records": m.records, "plaintext_bytes": plain, "file_bytes": bytes,
            "shards": m.shards.iter().map(|s| serde_json::json!({
                "index": s.index, "file": s.file, "records": s.records, "plaintext_bytes": s.plaintext_bytes,
                "file_bytes": s.file_bytes, "sha256": s.sha256, "kek_id": s.kek_id,
            })).collect::<Vec<_>>(),
        }));
    } else {
        println!("dataset     {}", m.dataset_id);
        println!("generation  {} (signed {} by issuer {})", m.generation, m.created_unix, m.issuer_key_id);
        println!("signature   {signature}");
        if let Some(e) = &i.consistency_error {
            println!("consistency {e}");
        }
        println!(
            "records     {} in {} shard(s), {:.1} MB plaintext, {:.1} MB on disk",
            m.records,
            m.shards.len(),
            plain as f64 / 1e6,
            bytes as f64 / 1e6
        );
        println!("fields");
        for f in &m.schema.fields {
            match &f.kind {
                shardlock::format::FieldKind::Tensor { dtype, shape } => {
                    println!("  {:<16} {} {:?}", f.name, dtype.name(), shape)
                }
                shardlock::format::FieldKind::Bytes => println!("  {:<16} bytes", f.name),
            }
        }
        println!("shards");
        for s in &m.shards {
            println!(
                "  {:>5} {}  {:>9} records  {:>12} bytes  kek {}",
                s.index, s.file, s.records, s.file_bytes, s.kek_id
            );
        }
    }
    Ok(if i.signature_valid == Some(false) || i.consistency_error.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn verify_cmd(a: VerifyArgs) -> Result<ExitCode, Error> {
    let (trust, access) = a.reader.access()?;
    let remote = a.remote.options()?;
    let total = total_bytes(&a.dir, &remote);
    let pb = bar(total, a.json, "verifying {bar:40} {bytes}/{total_bytes} [{elapsed_precise}, {bytes_per_sec}]");
    let opts = VerifyOptions { backend: a.backend, min_generation: a.min_generation };
    let access = access.with_backend(a.backend);
    let report = dataset::verify_at(&a.dir, &trust, &access, &opts, &remote, &mut |n| pb.inc(n))?;
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
    dataset::inspect_at(dir, None, remote).map(|i| i.manifest.shards.iter().map(|s| s.file_bytes).sum()).unwrap_or(0)
}

fn token_cmd(t: TokenCmd) -> Result<(), Error> {
    match t {
        TokenCmd::Issue { issuer_key, dataset, principal, shards, ops, ttl, not_before, out } => {
            let issuer = IssuerKey::load(&issuer_key)?;
            let expires = auth::time_after(std::time::SystemTime::now(), auth::parse_ttl(&ttl)?)?;
            let spec = TokenSpec {
                dataset,
                principal,
                shards: ShardSet::parse(&shards)?,
                ops: Operation::parse_list(&ops)?,
                expires,
                not_before: not_before.as_deref().map(auth::parse_time).transpose()?,
            };
            let token = Token::issue(&issuer, &spec)?;
            token.save(&out)?;
            println!(
                "wrote token {} (mode 0600) for {:?} on dataset {:?}, shards {shards}, ops {ops}, expires {}; revocation id {}",
                out.display(),
                spec.principal,
                spec.dataset,
                humantime::format_rfc3339_seconds(expires),
                token.revocation_id()
            );
        }
        TokenCmd::Attenuate { token, trust, shards, ops, ttl, out } => {
            let trust = TrustAnchor::load(&trust)?;
            let t = Token::load(&token, &trust)?;
            let shards = shards.as_deref().map(ShardSet::parse).transpose()?;
            let ops = ops.as_deref().map(Operation::parse_list).transpose()?;
            let expires = ttl
                .as_deref()
                .map(auth::parse_ttl)
                .transpose()?
                .map(|d| auth::time_after(std::time::SystemTime::now(), d))
                .transpose()?;
            if shards.is_none() && ops.is_none() && expires.is_none() {
                return Err(Error::InvalidArgument("nothing to narrow: give --shards, --ops and/or --ttl".into()));
            }
            let narrowed = t.attenuate(shards.as_ref(), ops.as_deref(), expires)?;
            narrowed.save(&out)?;
            println!(
                "wrote attenuated token {} (mode 0600); revocation id {}",
                out.display(),
                narrowed.revocation_id()
            );
        }
        TokenCmd::Inspect { token, trust, json } => {
            let (blocks, ids, verified) = match trust {
                Some(tp) => {
                    let t = Token::load(&token, &TrustAnchor::load(&tp)?)?;
                    (t.blocks(), t.revocation_ids(), Some(true))
                }
                None => {
                    let (b, i) = auth::inspect_unverified(&token)?;
                    (b, i, None)
                }
            };
            if json {
                print_json(&serde_json::json!({"verified": verified, "blocks": blocks, "revocation_ids": ids}));
            } else {
                println!(
                    "signature: {}",
                    if verified.is_some() {
                        "valid (verified against the trust anchor)"
                    } else {
                        "not verified (pass --trust FILE.pub)"
                    }
                );
                for (i, (b, id)) in blocks.iter().zip(&ids).enumerate() {
                    println!("block {i} ({}) revocation id {id}", if i == 0 { "authority" } else { "attenuation" });
                    for line in b.lines().filter(|l| !l.trim().is_empty()) {
                        println!("    {line}");
                    }
                }
            }
        }
        TokenCmd::Revoke { token, deny_list } => {
            let (_, ids) = auth::inspect_unverified(&token)?;
            let id = ids.last().cloned().ok_or_else(|| Error::InvalidArgument("token has no blocks".into()))?;
            auth::DenyList::append(
                &deny_list,
                &id,
                &format!("revoked {}", humantime::format_rfc3339_seconds(std::time::SystemTime::now())),
            )?;
            println!("revoked {id} in {} (this token and every token attenuated from it)", deny_list.display());
        }
    }
    Ok(())
}

/// The loader itself, or the device stage in front of it for `--device`.
fn bench_source(
    loader: shardlock::Loader,
    a: &BenchArgs,
) -> Result<Box<dyn shardlock::pipeline::bench::Source>, Error> {
    let Some(spec) = &a.device else { return Ok(Box::new(loader)) };
    let ordinal = shardlock::device::parse_device(spec)?;
    #[cfg(feature = "cuda")]
    {
        let opts = shardlock::device::DeviceOptions { ordinal, pinned: !a.pageable, ..Default::default() };
        Ok(Box::new(shardlock::device::DeviceLoader::new(loader, opts)?))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (loader, a.pageable);
        shardlock::device::open(ordinal)?;
        Err(Error::Internal("no device stage in this build".into()))
    }
}

/// With `--device`: the bandwidth of a plain async copy of one batch-sized locked
/// buffer, the ceiling the device stage is measured against.
fn h2d_report(a: &BenchArgs, r: &shardlock::pipeline::bench::BenchReport) -> Result<Option<serde_json::Value>, Error> {
    let (Some(spec), Some(e)) = (&a.device, r.epochs.first()) else { return Ok(None) };
    let bytes = (e.bytes / e.batches.max(1)).max(1) as usize;
    #[cfg(feature = "cuda")]
    {
        let ordinal = shardlock::device::parse_device(spec)?;
        let gbps = shardlock::device::measure_h2d(ordinal, bytes, 200, !a.pageable)?;
        Ok(Some(serde_json::json!({"bytes": bytes, "gb_per_s": gbps, "pinned": !a.pageable})))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (spec, bytes);
        Ok(None)
    }
}

fn bench_cmd(a: BenchArgs) -> Result<(), Error> {
    let r = &a.reader;
    let mut b = shardlock::Loader::builder(&a.dir)
        .keyring(&r.keyring)
        .trust(&r.trust)
        .batch_size(a.batch_size)
        .shuffle(shardlock::Shuffle::parse(&a.shuffle)?)
        .seed(a.seed)
        .remote_options(a.remote.options()?)
        .memory_budget(a.memory_budget)
        .allow_unlocked_memory(a.allow_unlocked_memory)
        .authorizer_config(AuthorizerConfig {
            skew: auth::parse_ttl(&r.clock_skew)?,
            deny_list: r.deny_list.clone(),
            ..Default::default()
        });
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
    let report = shardlock::pipeline::bench::run(&mut *source, a.epochs, &mut |_, _| pb.inc(1))?;
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
