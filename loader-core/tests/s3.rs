//! Datasets in S3-compatible object storage, against a real server (`moto_server`):
//! streaming through the ciphertext cache, faults (server down, 503s, connections cut
//! mid-shard, stalls, objects replaced or deleted mid-run, a full cache disk), a
//! byte-budgeted cache, two readers sharing one cache directory, ranged reads of just
//! the needed chunks under `global` shuffle, and no credential or plaintext anywhere
//! it should not be.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/pki.rs"]
mod pki;
#[path = "common/s3.rs"]
mod s3;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Fixture;
use s3::{options, Fault, Proxy, S3Server, ACCESS_KEY, SECRET_KEY};
use shardlock::RemoteOptions;
use shardlock::{Error, Field, Loader, RemoteFailure, Schema, Shuffle};

const CANARY: &[u8] = b"CANARY-5ee3-PLAINTEXT-NOT-IN-CACHE";
const BUCKET: &str = "shardlock-test";

/// 8 shards of 24 records x ~3 KiB (each shard spans several 16 KiB chunks); every
/// record carries the canary and its index.
fn dataset(fx: &Fixture) -> (PathBuf, Vec<Vec<u8>>) {
    let schema = Schema::new(vec![Field::bytes("text")]).unwrap();
    let samples: Vec<Vec<u8>> = (0..192)
        .map(|i| [CANARY, format!("-{i:05}-").as_bytes(), &vec![b'a' + (i % 26) as u8; 3000], CANARY].concat())
        .collect();
    let rows: Vec<Vec<Vec<u8>>> = samples.iter().map(|s| vec![s.clone()]).collect();
    let dir = fx.pack("ds", "s3test", schema, &rows, 24 * 3100);
    assert_eq!(fx.open(&dir).unwrap().manifest().shards.len(), 8);
    (dir, samples)
}

fn trust_and_token(fx: &Fixture) -> (PathBuf, PathBuf) {
    let token = fx.path("job.token");
    if !token.exists() {
        fx.token("s3test").save(&token).unwrap();
        fx.issuer.save(&fx.path("issuer")).unwrap();
    }
    (fx.path("issuer.pub"), token)
}

fn loader(fx: &Fixture, url: &str, opts: RemoteOptions) -> shardlock::Result<Loader> {
    loader_with(fx, url, opts, |b| b)
}

fn loader_with(
    fx: &Fixture,
    url: &str,
    opts: RemoteOptions,
    f: impl FnOnce(shardlock::LoaderBuilder) -> shardlock::LoaderBuilder,
) -> shardlock::Result<Loader> {
    let (trust, token) = trust_and_token(fx);
    f(Loader::builder(url)
        .keyring(fx.path("keyring.json"))
        .token(&token)
        .trust(&trust)
        .batch_size(8)
        .shuffle(Shuffle::None)
        .workers(2)
        .audit_log(fx.path("audit.jsonl"))
        .remote_options(opts))
    .build()
}

/// Every sample of one epoch, in order, or the first error.
fn epoch(l: &mut Loader) -> shardlock::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for b in l.by_ref() {
        let b = b?;
        for i in 0..b.len() {
            out.push(b.bytes("text", i)?.to_vec());
        }
    }
    Ok(out)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Nothing under `dir` holds the canary, and only complete `.slk` files (whose bytes
/// hash to their name) and lock files are left.
fn assert_cache_clean(dir: &Path) {
    for p in files(dir) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&p).unwrap();
        assert!(!contains(&bytes, CANARY), "plaintext canary in cache file {name}");
        if let Some(stem) = name.strip_suffix(".slk") {
            assert_eq!(hex(&bytes), stem, "cache file {name} is not the verified shard");
        } else {
            assert!(name.ends_with(".lock") || name.ends_with(".partial"), "unexpected cache file {name}");
        }
    }
}

fn hex(b: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b);
    d.as_ref().iter().map(|x| format!("{x:02x}")).collect()
}

fn assert_no_credentials(what: &str, text: &str) {
    assert!(!text.contains(SECRET_KEY), "secret key in {what}: {text}");
    assert!(!text.contains("SECRETCANARY"), "secret key in {what}: {text}");
    assert!(!text.contains(ACCESS_KEY), "access key id in {what}: {text}");
}

#[test]
fn streams_through_a_ciphertext_only_cache_and_rereads_from_it() {
    let Some(srv) = S3Server::start("streams_through_a_ciphertext_only_cache") else { return };
    let fx = Fixture::new();
    let (dir, samples) = dataset(&fx);
    let url = srv.upload(&fx.trust, &dir, BUCKET, "datasets/one");
    let cache = fx.path("cache");
    let mut l = loader(&fx, &url, options(&srv.endpoint, Some(&cache))).unwrap();
    assert!(l.dataset().is_remote());
    assert_eq!(epoch(&mut l).unwrap(), samples, "first (cold) epoch");
    let cached = files(&cache).iter().filter(|p| p.extension().is_some_and(|e| e == "slk")).count();
    assert_eq!(cached, 8, "every shard is cached after a full epoch");
    let total: u64 = fx.open(&dir).unwrap().manifest().shards.iter().map(|s| s.file_bytes).sum();
    assert_eq!(l.dataset().remote_bytes(), total, "each shard downloaded once");
    assert_eq!(epoch(&mut l).unwrap(), samples, "second (cached) epoch");
    assert_eq!(l.dataset().remote_bytes(), total, "nothing downloaded for the cached epoch");
    drop(l);
    assert_cache_clean(&cache);
    assert!(!files(&cache).iter().any(|p| p.extension().is_some_and(|e| e == "partial")));
    // With the server gone, a new loader still needs the manifest: a typed error, not
    // a hang and not stale data.
    drop(srv);
    let t = Instant::now();
    let e = loader(&fx, &url, options("http://127.0.0.1:9", Some(&cache))).err().unwrap();
    assert!(matches!(e, Error::Remote { kind: RemoteFailure::Unavailable, .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(60), "gave up only after {:?}", t.elapsed());
    let audit = std::fs::read_to_string(fx.path("audit.jsonl")).unwrap();
    assert_no_credentials("audit log", &audit);
    assert!(!audit.contains("CANARY"));
}

/// A workload with no KEK material (no keyring, no PIN, no cloud credentials for custody)
/// streams exact epochs of an `s3://` dataset: shards from the store, each DEK from the
/// key service after the service's own authorization, audited there.
#[test]
fn a_workload_without_a_kek_streams_s3_through_the_key_service() {
    let Some(srv) = S3Server::start("a_workload_without_a_kek_streams_s3") else { return };
    let fx = Fixture::new();
    let (dir, samples) = dataset(&fx);
    let url = srv.upload(&fx.trust, &dir, BUCKET, "datasets/keyd");
    let pki = pki::Pki::new(fx.dir.path());
    let service_audit = fx.path("keyd-audit.jsonl");
    let (svc, client) = pki::serve(&pki, fx.keyring.clone(), fx.trust, |c| c.audit_log = Some(service_audit.clone()));
    let (trust, token) = trust_and_token(&fx);
    let mut l = Loader::builder(&url)
        .key_provider(client)
        .token(&token)
        .trust(&trust)
        .batch_size(8)
        .shuffle(Shuffle::None)
        .workers(2)
        .remote_options(options(&srv.endpoint, Some(&fx.path("cache"))))
        .build()
        .unwrap();
    assert!(l.dataset().is_remote());
    for e in 0..2 {
        assert_eq!(epoch(&mut l).unwrap(), samples, "epoch {e}");
    }
    drop(l);
    svc.shutdown().unwrap();
    let records: Vec<serde_json::Value> =
        std::fs::read_to_string(&service_audit).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let released = records.iter().filter(|r| r["event"] == "key_release" && r["decision"] == "allow").count();
    assert_eq!(released, 2 * 8, "each shard's DEK released by the service once per epoch");
}

#[test]
fn server_down_at_start_is_a_clear_error_within_the_timeout() {
    let fx = Fixture::new();
    let _ = dataset(&fx);
    let port = s3::free_port();
    let mut o = options(&format!("http://127.0.0.1:{port}"), Some(&fx.path("cache")));
    o.set("timeout", "3s").unwrap();
    let t = Instant::now();
    let e = loader(&fx, &format!("s3://{BUCKET}/x"), o).err().unwrap();
    let msg = e.to_string();
    assert!(matches!(e, Error::Remote { kind: RemoteFailure::Unavailable, .. }), "{msg}");
    assert!(msg.contains("manifest.json") && msg.contains("endpoint"), "{msg}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert_no_credentials("error", &msg);
    assert_no_credentials("debug error", &format!("{e:?}"));
}

#[test]
fn retries_503s_cut_connections_and_slow_responses() {
    let Some(srv) = S3Server::start("retries_503s_cut_connections_and_slow_responses") else { return };
    let fx = Fixture::new();
    let (dir, samples) = dataset(&fx);
    let url = srv.upload(&fx.trust, &dir, BUCKET, "faults");
    let proxy = Proxy::start(srv.port);

    proxy.set(Fault::Status503(6));
    let cache = fx.path("cache-503");
    let mut l = loader(&fx, &url, options(&proxy.endpoint, Some(&cache))).unwrap();
    assert_eq!(epoch(&mut l).unwrap(), samples);
    assert!(proxy.injected() >= 6, "503s injected: {}", proxy.injected());
    drop(l);
    assert_cache_clean(&cache);

    // Connections cut after 20 kB of response: the manifest fits, shards (75 kB) do not.
    let before = proxy.injected();
    proxy.set(Fault::CutAfter { after: 20_000, n: 6 });
    let cache = fx.path("cache-cut");
    let mut l = loader(&fx, &url, options(&proxy.endpoint, Some(&cache))).unwrap();
    assert_eq!(epoch(&mut l).unwrap(), samples, "no partial shard was used");
    assert!(proxy.injected() > before, "no connection was cut");
    drop(l);
    assert_cache_clean(&cache);

    proxy.set(Fault::Slow(Duration::from_millis(2)));
    let cache = fx.path("cache-slow");
    let mut l = loader(&fx, &url, options(&proxy.endpoint, Some(&cache))).unwrap();
    assert_eq!(epoch(&mut l).unwrap(), samples);
    drop(l);
    assert_cache_clean(&cache);
}

#[test]
fn a_stalled_server_and_a_vanished_server_fail_within_the_timeout() {
    let Some(srv) = S3Server::start("a_stalled_server_fails_within_the_timeout") else { return };
    let fx = Fixture::new();
    let (dir, _) = dataset(&fx);
    let url = srv.upload(&fx.trust, &dir, BUCKET, "stall");
    let proxy = Proxy::start(srv.port);
    let mut o = options(&proxy.endpoint, Some(&fx.path("cache")));
    o.set("timeout", "4s").unwrap();
    o.set("stall_timeout", "1s").unwrap();
    let mut l = loader(&fx, &url, o).unwrap();
    proxy.set(Fault::Blackhole);
    let t = Instant::now();
    let e = epoch(&mut l).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    let msg = e.to_string();
    assert!(matches!(e, Error::Remote { kind: RemoteFailure::Unavailable, shard: Some(_), .. }), "{msg}");
    assert!(msg.contains("shard") && msg.contains(".slk"), "names the shard: {msg}");
    assert_no_credentials("error", &msg);
    // The error is sticky for the epoch: no clean end of data.
    assert!(l.next().unwrap().is_err());
    drop(l);
    assert_cache_clean(&fx.path("cache"));

    // The server stops mid-run.
    let mut o = options(&srv.endpoint, Some(&fx.path("cache2")));
    o.set("timeout", "3s").unwrap();
    // One shard in the cache and workers one batch ahead: most shards are fetched
    // after the stop.
    o.cache_bytes = Some(fx.open(&dir).unwrap().manifest().shards[0].file_bytes + 100);
    let mut l = loader_with(&fx, &url, o, |b| b.memory_budget(60_000)).unwrap();
    let first = l.next().unwrap().unwrap();
    drop(first);
    let cached = files(&fx.path("cache2")).iter().filter(|p| p.extension().is_some_and(|e| e == "slk")).count();
    assert!(cached < 8, "the first batch waited for the whole dataset ({cached} shards cached)");
    drop(srv);
    let e = epoch(&mut l).unwrap_err();
    assert!(matches!(e, Error::Remote { kind: RemoteFailure::Unavailable, .. }), "{e}");
    drop(l);
    assert_cache_clean(&fx.path("cache2"));
}

/// Review of the hardening: `shardlock upload` had no timeout (the client's is off),
/// so a server that accepts and never answers hung it for good.
#[test]
fn an_upload_to_a_server_that_never_answers_fails_within_the_timeout() {
    let Some(srv) = S3Server::start("an_upload_to_a_server_that_never_answers_fails_within_the_timeout") else {
        return;
    };
    srv.create_bucket(BUCKET);
    let fx = Fixture::new();
    let (dir, _) = dataset(&fx);
    let proxy = Proxy::start(srv.port);
    proxy.set(Fault::Blackhole);
    let mut o = options(&proxy.endpoint, None);
    o.set("timeout", "3s").unwrap();
    let t = Instant::now();
    let e = shardlock::upload_dir(&dir, &format!("s3://{BUCKET}/hang"), &fx.trust, &o).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert!(matches!(e, Error::Remote { kind: RemoteFailure::Unavailable, .. }), "{e}");
    assert!(e.to_string().contains("hang/"), "names the object: {e}");
    assert_no_credentials("error", &e.to_string());
}

#[test]
fn a_shard_replaced_or_deleted_mid_run_is_never_used() {
    let Some(srv) = S3Server::start("a_shard_replaced_or_deleted_mid_run_is_never_used") else { return };
    let fx = Fixture::new();
    let (dir, _) = dataset(&fx);
    let url = srv.upload(&fx.trust, &dir, BUCKET, "mutable");
    let m = fx.open(&dir).unwrap().manifest().clone();

    // Replaced after the manifest was read: same size, one byte different.
    let mut o = options(&srv.endpoint, Some(&fx.path("cache")));
    o.set("timeout", "3s").unwrap();
    o.concurrency = 1;
    let mut l = loader(&fx, &url, o.clone()).unwrap();
    let victim = &m.shards[3];
    let mut bytes = std::fs::read(dir.join(&victim.file)).unwrap();
    bytes[500] ^= 1;
    srv.put(BUCKET, &format!("mutable/{}", victim.file), &bytes);
    let e = epoch(&mut l).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Remote { kind: RemoteFailure::Modified, shard: Some(3), .. }), "{msg}");
    assert!(msg.contains(&victim.file) && msg.contains("re-upload"), "{msg}");
    drop(l);
    assert!(!fx.path("cache").join(format!("{}.slk", victim.sha256)).exists());
    assert_cache_clean(&fx.path("cache"));

    // Deleted.
    let gone = &m.shards[5];
    srv.delete(BUCKET, &format!("mutable/{}", gone.file));
    let mut l = loader(&fx, &url, o).unwrap();
    let e = epoch(&mut l).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Remote { kind: RemoteFailure::NotFound | RemoteFailure::Modified, .. }), "{msg}");
}

#[test]
fn a_byte_budget_bounds_the_cache_and_two_readers_share_it() {
    let Some(srv) = S3Server::start("a_byte_budget_bounds_the_cache") else { return };
    let fx = Fixture::new();
    let (dir, samples) = dataset(&fx);
    let url = srv.upload(&fx.trust, &dir, BUCKET, "budget");
    let shard_bytes = fx.open(&dir).unwrap().manifest().shards[0].file_bytes;

    let cache = fx.path("small-cache");
    let mut o = options(&srv.endpoint, Some(&cache));
    o.cache_bytes = Some(2 * shard_bytes);
    // Workers one batch ahead, so that on-demand fetches do not run far past the plan.
    let mut l = loader_with(&fx, &url, o.clone(), |b| b.memory_budget(60_000)).unwrap();
    assert_eq!(epoch(&mut l).unwrap(), samples);
    let held = files(&cache).iter().filter(|p| p.extension().is_some_and(|e| e == "slk")).count();
    assert!(held <= 2, "{held} shards cached with a budget of 2");
    assert_eq!(epoch(&mut l).unwrap(), samples, "evicted shards are fetched again");
    drop(l);
    assert_cache_clean(&cache);

    let too_small = RemoteOptions { cache_bytes: Some(shard_bytes / 2), ..o };
    assert!(matches!(loader(&fx, &url, too_small), Err(Error::InvalidArgument(_))));

    // Two readers (separate datasets, separate lock descriptors) on one cache dir.
    let shared = fx.path("shared-cache");
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let (url, o) = (url.clone(), options(&srv.endpoint, Some(&shared)));
            let fx = &fx;
            let mut l = loader(fx, &url, o).unwrap();
            std::thread::spawn(move || epoch(&mut l))
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().unwrap(), samples);
    }
    assert_cache_clean(&shared);
}

#[test]
fn a_full_cache_disk_is_a_typed_error() {
    let Some(srv) = S3Server::start("a_full_cache_disk_is_a_typed_error") else { return };
    let fx = Fixture::new();
    let (dir, _) = dataset(&fx);
    let url = srv.upload(&fx.trust, &dir, BUCKET, "full");
    let mnt = fx.path("tiny");
    std::fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("SHARDLOCK_REQUIRE_S3").as_deref() != Ok("1") || !is_root(),
            "cannot mount a tmpfs as root"
        );
        eprintln!("SKIPPED a_full_cache_disk_is_a_typed_error: mounting a small tmpfs needs root");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(mnt.clone());
    let mut o = options(&srv.endpoint, Some(&mnt));
    o.set("timeout", "3s").unwrap();
    let mut l = loader(&fx, &url, o).unwrap();
    let e = epoch(&mut l).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Remote { kind: RemoteFailure::CacheFull, shard: Some(_), .. }), "{msg}");
    assert!(msg.contains("free space"), "{msg}");
    drop(l);
    for p in files(&mnt) {
        assert!(!p.to_string_lossy().ends_with(".slk"), "a partial shard got a final name: {}", p.display());
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

#[test]
fn cli_inspects_verifies_and_benches_s3_without_leaking_credentials() {
    let Some(srv) = S3Server::start("cli_inspects_verifies_and_benches_s3") else { return };
    let fx = Fixture::new();
    let (dir, _) = dataset(&fx);
    let (trust, token) = trust_and_token(&fx);
    let bin = env!("CARGO_BIN_EXE_shardlock");
    let run = |args: &[&str], endpoint: &str| {
        let out = std::process::Command::new(bin)
            .args(args)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL", endpoint)
            .env("SHARDLOCK_CACHE_DIR", fx.path("cli-cache"))
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_no_credentials("CLI output", &text);
        (out.status.success(), text)
    };
    srv.create_bucket(BUCKET);
    let url = format!("s3://{BUCKET}/cli");
    let (ok, text) = run(&["upload", dir.to_str().unwrap(), &url, "--trust", trust.to_str().unwrap()], &srv.endpoint);
    assert!(ok, "{text}");
    let (ok, text) = run(&["inspect", &url, "--trust", trust.to_str().unwrap()], &srv.endpoint);
    assert!(ok && text.contains("signature   valid"), "{text}");
    let reader = ["--keyring", fx.path("keyring.json").to_str().unwrap().to_owned().leak() as &str];
    let common: Vec<&str> = reader
        .iter()
        .copied()
        .chain(["--token", token.to_str().unwrap(), "--trust", trust.to_str().unwrap()])
        .collect();
    let mut args = vec!["verify", &url];
    args.extend(&common);
    let (ok, text) = run(&args, &srv.endpoint);
    assert!(ok && text.contains("OK"), "{text}");
    let mut args = vec!["bench", &url, "--epochs", "2", "--batch-size", "8", "--json"];
    args.extend(&common);
    let (ok, text) = run(&args, &srv.endpoint);
    assert!(ok, "{text}");
    let dead = format!("http://127.0.0.1:{}", s3::free_port());
    let mut args = vec!["bench", "s3://shardlock-test/nothing", "--s3-timeout", "2s", "--cache-dir"];
    let other = fx.path("other-cache");
    args.push(other.to_str().unwrap());
    args.extend(&common);
    let (ok, text) = run(&args, &dead);
    assert!(!ok && text.contains("unavailable"), "{text}");
    assert_cache_clean(&fx.path("cli-cache"));

    // Parts packed straight to s3:// by two workers, assembled there, then verified.
    let parts = format!("s3://{BUCKET}/cli-parts");
    let kr = fx.path("keyring.json");
    for (k, (first, range)) in [("0:1", 0..30), ("1", 30..64)].iter().enumerate() {
        let input = fx.path(&format!("in-{k}"));
        std::fs::create_dir_all(&input).unwrap();
        for i in range.clone() {
            std::fs::write(input.join(format!("{i:03}.txt")), format!("record {i} ").repeat(50)).unwrap();
        }
        let pack = [
            "pack",
            "--keyring",
            kr.to_str().unwrap(),
            "--trust",
            trust.to_str().unwrap(),
            "--part",
            first,
            "--dataset-id",
            "s3test",
            "--shard-size",
            "1048576",
            "--out",
            &parts,
            input.to_str().unwrap(),
        ];
        let (ok, text) = run(&pack, &srv.endpoint);
        assert!(ok, "{text}");
    }
    let issuer = fx.path("issuer");
    let assemble = ["assemble", &parts, "--issuer-key", issuer.to_str().unwrap(), "--keyring", kr.to_str().unwrap()];
    let (ok, text) = run(&assemble, &srv.endpoint);
    assert!(ok && text.contains("assembled 64 records in 2 shard(s)"), "{text}");
    let mut args = vec!["verify", &parts];
    args.extend(&common);
    let (ok, text) = run(&args, &srv.endpoint);
    assert!(ok && text.contains("OK"), "{text}");
    let in0 = fx.path("in-0");
    let whole = [
        "pack",
        "--keyring",
        kr.to_str().unwrap(),
        "--issuer-key",
        issuer.to_str().unwrap(),
        "--dataset-id",
        "x",
        "--out",
        &parts,
        in0.to_str().unwrap(),
    ];
    let (ok, text) = run(&whole, &srv.endpoint);
    assert!(!ok && text.contains("only a part (--part)"), "{text}");
}

/// Every sample of one epoch of the local dataset at `dir`, with `f` applied to the
/// builder: the reference a remote loader must match.
fn local_epoch(
    fx: &Fixture,
    dir: &Path,
    f: impl Fn(shardlock::LoaderBuilder) -> shardlock::LoaderBuilder,
    epochs: usize,
) -> Vec<Vec<Vec<u8>>> {
    let mut l = loader_with(fx, dir.to_str().unwrap(), RemoteOptions::default(), f).unwrap();
    (0..epochs).map(|_| epoch(&mut l).unwrap()).collect()
}

fn slk_files(dir: &Path) -> usize {
    if !dir.exists() {
        return 0;
    }
    files(dir).iter().filter(|p| p.extension().is_some_and(|e| e == "slk")).count()
}

#[test]
fn global_shuffle_reads_just_the_needed_chunks_by_ranges() {
    let Some(srv) = S3Server::start("global_shuffle_reads_just_the_needed_chunks_by_ranges") else { return };
    let fx = Fixture::new();
    let (dir, _) = dataset(&fx);
    let url = srv.upload(&fx.trust, &dir, BUCKET, "ranged");
    let proxy = Proxy::start(srv.port);
    let shard_bytes = fx.open(&dir).unwrap().manifest().shards[0].file_bytes;
    let global = |b: shardlock::LoaderBuilder| b.shuffle(Shuffle::Global).seed(3);
    let want = local_epoch(&fx, &dir, global, 3);

    // A cache budget of two of the eight shards: whole-shard downloads could not keep
    // it under global shuffle, so `auto` reads ranges and caches nothing.
    let cache = fx.path("cache-ranged");
    let mut o = options(&proxy.endpoint, Some(&cache));
    o.cache_bytes = Some(2 * shard_bytes);
    let mut l = loader_with(&fx, &url, o.clone(), global).unwrap();
    assert_eq!(epoch(&mut l).unwrap(), want[0], "epoch 0 by ranges equals the local epoch");
    assert_eq!(l.dataset().ranged_shards(), (0..8).collect::<Vec<u32>>());
    assert_eq!(slk_files(&cache), 0, "ranged reads put nothing in the cache");

    // 503s and connections cut mid-response are retried; the batches stay exact.
    proxy.set(Fault::Status503(5));
    assert_eq!(epoch(&mut l).unwrap(), want[1], "epoch 1 through 503s");
    assert!(proxy.injected() >= 5);
    let before = proxy.injected();
    proxy.set(Fault::CutAfter { after: 9_000, n: 4 });
    assert_eq!(epoch(&mut l).unwrap(), want[2], "epoch 2 through cut connections");
    assert!(proxy.injected() > before, "no connection was cut");
    drop(l);
    assert_cache_clean(&cache);

    // `never` downloads whole shards even so; `always` reads ranges for any shuffle.
    let mut never = o.clone();
    never.set("range_reads", "never").unwrap();
    never.cache_dir = Some(fx.path("cache-never"));
    let mut l = loader_with(&fx, &url, never, global).unwrap();
    assert_eq!(epoch(&mut l).unwrap(), want[0]);
    assert!(l.dataset().ranged_shards().is_empty());
    drop(l);
    assert!(slk_files(&fx.path("cache-never")) > 0, "whole shards were cached");
    let mut always = options(&srv.endpoint, Some(&fx.path("cache-always")));
    always.set("range_reads", "always").unwrap();
    let (_, samples) = dataset(&Fixture::new());
    let mut l = loader(&fx, &url, always).unwrap();
    assert_eq!(epoch(&mut l).unwrap(), samples, "sequential epoch by ranges");
    assert_eq!(l.dataset().ranged_shards().len(), 8);
    drop(l);
    assert_eq!(slk_files(&fx.path("cache-always")), 0);
}

#[test]
fn a_rank_reading_part_of_a_dataset_moves_only_its_chunks() {
    let Some(srv) = S3Server::start("a_rank_reading_part_of_a_dataset_moves_only_its_chunks") else { return };
    let fx = Fixture::new();
    // 8 shards of 8 records x 40 KiB: each sample spans three or four chunks.
    let schema = Schema::new(vec![Field::bytes("text")]).unwrap();
    let rows: Vec<Vec<Vec<u8>>> =
        (0..64u32).map(|i| vec![[CANARY, &i.to_le_bytes()[..], &vec![(i % 251) as u8; 40 << 10]].concat()]).collect();
    let dir = fx.pack("big", "s3test", schema, &rows, 8 * (41 << 10));
    let total: u64 = fx.open(&dir).unwrap().manifest().shards.iter().map(|s| s.file_bytes).sum();
    assert_eq!(fx.open(&dir).unwrap().manifest().shards.len(), 8);
    let url = srv.upload(&fx.trust, &dir, BUCKET, "big");
    let proxy = Proxy::start(srv.port);
    let rank = |b: shardlock::LoaderBuilder| b.shuffle(Shuffle::Global).seed(5).rank(0, 8).batch_size(2);
    let want = local_epoch(&fx, &dir, rank, 1);
    let mut o = options(&proxy.endpoint, Some(&fx.path("cache")));
    o.set("range_reads", "always").unwrap();
    let mut l = loader_with(&fx, &url, o, rank).unwrap();
    let before = proxy.forwarded();
    assert_eq!(epoch(&mut l).unwrap(), want[0]);
    let moved = (proxy.forwarded() - before) as u64;
    // 8 samples of ~40 KiB + per shard its header, index chunk and final chunk: well
    // under half of the 2.6 MB a whole-shard download of every shard would move.
    assert!(moved < total / 2, "{moved} bytes moved for a rank's eighth of {total}");
    assert!(moved > 8 * (40 << 10), "{moved} bytes cannot hold 8 samples");
    let counted = l.dataset().remote_bytes();
    assert!(counted <= moved && counted > 8 * (40 << 10), "remote_bytes {counted}, {moved} through the proxy");
    drop(l);
    assert_eq!(slk_files(&fx.path("cache")), 0);
}

#[test]
fn a_shard_replaced_during_ranged_reads_is_never_mixed_in() {
    let Some(srv) = S3Server::start("a_shard_replaced_during_ranged_reads_is_never_mixed_in") else { return };
    let fx = Fixture::new();
    let (dir, samples) = dataset(&fx);
    let url = srv.upload(&fx.trust, &dir, BUCKET, "swap");
    let m = fx.open(&dir).unwrap().manifest().clone();
    let mut o = options(&srv.endpoint, Some(&fx.path("cache")));
    o.set("range_reads", "always").unwrap();
    o.set("timeout", "3s").unwrap();
    // Sequential order, three batches per shard: shard 0 is opened by batch 0 and read
    // again by batches 1 and 2. Workers run at most one batch ahead.
    let mut l = loader_with(&fx, &url, o, |b| b.memory_budget(60_000)).unwrap();
    let first = l.next().unwrap().unwrap();
    assert_eq!(first.bytes("text", 0).unwrap(), &samples[0][..]);
    let victim = &m.shards[0];
    let mut bytes = std::fs::read(dir.join(&victim.file)).unwrap();
    let last = bytes.len() - 100;
    bytes[last] ^= 1;
    srv.put(BUCKET, &format!("swap/{}", victim.file), &bytes);
    let mut got = Vec::new();
    let err = loop {
        match l.next() {
            Some(Ok(b)) => (0..b.len()).for_each(|i| got.push(b.bytes("text", i).unwrap().to_vec())),
            Some(Err(e)) => break e,
            None => panic!("the epoch ended although shard 0 was replaced"),
        }
    };
    let msg = err.to_string();
    // Later ranges of an object are If-Match requests on the ETag its first range saw.
    assert!(matches!(err, Error::Remote { kind: RemoteFailure::Modified, shard: Some(0), .. }), "{msg}");
    assert!(msg.contains(&victim.file), "{msg}");
    // Whatever came before the error was exact.
    assert_eq!(got[..], samples[8..8 + got.len()]);
}

#[test]
fn a_shard_reader_reads_records_and_chunks_by_ranges() {
    let Some(srv) = S3Server::start("a_shard_reader_reads_records_and_chunks_by_ranges") else { return };
    let fx = Fixture::new();
    let (dir, samples) = dataset(&fx);
    let url = srv.upload(&fx.trust, &dir, BUCKET, "reader");
    let mut o = options(&srv.endpoint, Some(&fx.path("cache")));
    o.set("range_reads", "always").unwrap();
    let ds = shardlock::Dataset::open_at(&url, &fx.trust, &o).unwrap();
    ds.plan_shards(&[2, 5], false);
    assert_eq!(ds.ranged_shards(), vec![2, 5]);
    let local = fx.open(&dir).unwrap();
    for shard in [2u32, 5] {
        let mut r = fx.open_shard(&ds, shard).unwrap();
        let mut l = fx.open_shard(&local, shard).unwrap();
        assert!(r.shared().is_ranged() && !l.shared().is_ranged());
        for rec in (0..r.len()).rev() {
            let want = &samples[(shard * 24) as usize + rec as usize];
            assert_eq!(&r.read_record(rec).unwrap()[0][..], &want[..], "shard {shard} record {rec}");
        }
        // Whole chunks, the final one included, and the tail of the plaintext.
        let (mut a, mut b) = (vec![0u8; 16 << 10], vec![0u8; 16 << 10]);
        for k in 0..r.shared().chunk_count() {
            let n = r.shared().decrypt_chunk(k, &mut a).unwrap();
            assert_eq!(n, l.shared().decrypt_chunk(k, &mut b).unwrap());
            assert_eq!(a[..n], b[..n], "chunk {k}");
        }
        let len = r.index().field_range(r.len() - 1, 0).1;
        let (mut ta, mut tb) = (vec![0u8; 100], vec![0u8; 100]);
        r.read_at(len - 100, &mut ta).unwrap();
        l.read_at(len - 100, &mut tb).unwrap();
        assert_eq!(ta, tb);
        assert!(r.read_at(len, &mut ta).is_err(), "a read past the end is refused");
    }
    assert_eq!(slk_files(&fx.path("cache")), 0);
}

/// Security review finding 3: an existing cache directory was accepted whatever its
/// owner and mode. One that group or others may write is refused, saying how to fix it.
#[test]
fn a_cache_dir_others_can_write_is_refused() {
    let Some(srv) = S3Server::start("a_cache_dir_others_can_write_is_refused") else { return };
    let fx = Fixture::new();
    let (dir, samples) = dataset(&fx);
    let url = srv.upload(&fx.trust, &dir, BUCKET, "perm");
    let cache = fx.path("cache");
    std::fs::create_dir(&cache).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o770)).unwrap();
    let e = loader(&fx, &url, options(&srv.endpoint, Some(&cache))).err().unwrap();
    assert!(matches!(&e, Error::Input { detail, .. } if detail.contains("chmod 700")), "{e}");
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut l = loader(&fx, &url, options(&srv.endpoint, Some(&cache))).unwrap();
    assert_eq!(epoch(&mut l).unwrap(), samples);
}

/// Finding 3: `<sha256>.partial` was created following symlinks, so a planted link
/// made the download overwrite its target (and the link became the cache entry); and a
/// file of the right size under a final name was adopted without its hash being checked.
#[test]
fn planted_cache_files_are_neither_followed_nor_adopted() {
    let Some(srv) = S3Server::start("planted_cache_files_are_neither_followed_nor_adopted") else { return };
    let fx = Fixture::new();
    let (dir, samples) = dataset(&fx);
    let url = srv.upload(&fx.trust, &dir, BUCKET, "planted");
    let m = fx.open(&dir).unwrap().manifest().clone();
    let cache = fx.path("cache");
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700).create(&cache).unwrap();
    let victim = fx.path("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, cache.join(format!("{}.partial", m.shards[0].sha256))).unwrap();
    // Shard 2's ciphertext (the same size) under shard 1's final name.
    assert_eq!(m.shards[1].file_bytes, m.shards[2].file_bytes);
    std::fs::copy(dir.join(&m.shards[2].file), cache.join(format!("{}.slk", m.shards[1].sha256))).unwrap();
    let mut l = loader(&fx, &url, options(&srv.endpoint, Some(&cache))).unwrap();
    assert_eq!(epoch(&mut l).unwrap(), samples, "every shard read as signed");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "the planted link's target is untouched");
    for e in &m.shards[..2] {
        let p = cache.join(format!("{}.slk", e.sha256));
        assert!(!std::fs::symlink_metadata(&p).unwrap().file_type().is_symlink(), "{}", p.display());
        assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(dir.join(&e.file)).unwrap(), "{}", p.display());
    }
}

/// Partitioned packing straight to object storage: two workers send their parts to
/// `s3://` (no issuer secret, nothing left on local disk), `assemble_at` verifies them
/// there and uploads the signed manifest last; the dataset then streams exactly as the
/// samples were packed. Before that it does not read as a dataset; a second assemble, a
/// gap (a part never written) and a shard object replaced after its part was written
/// are refused, and nothing is signed.
#[test]
fn parts_packed_straight_to_s3_assemble_there() {
    use shardlock::{assemble_at, DatasetWriter, PackOptions, Part};
    let Some(srv) = S3Server::start("parts_packed_straight_to_s3_assemble_there") else { return };
    srv.create_bucket(BUCKET);
    let fx = Fixture::new();
    let schema = Schema::new(vec![Field::bytes("text")]).unwrap();
    let samples: Vec<Vec<u8>> = (0..96).map(|i| format!("sample-{i:04}-").repeat(200).into_bytes()).collect();
    let opts = options(&srv.endpoint, None);
    let pack = |url: &str, range: std::ops::Range<usize>, part: Part| {
        let mut po = PackOptions::new("s3test");
        po.shard_size = 24 * 2800;
        let mut w = DatasetWriter::create_part_at(url, schema.clone(), po, &*fx.keyring, &fx.trust, part, &opts)?;
        for s in &samples[range] {
            w.write_sample(&[s.as_slice()])?;
        }
        w.finish()
    };
    let url = format!("s3://{BUCKET}/parts/ok");
    let a = pack(&url, 0..48, Part { first_shard: 0, max_shards: Some(2) }).unwrap();
    let b = pack(&url, 48..96, Part { first_shard: 2, max_shards: None }).unwrap();
    assert_eq!((a.shards.len(), b.shards.len()), (2, 2));
    assert!(loader(&fx, &url, options(&srv.endpoint, Some(&fx.path("c0")))).is_err(), "no manifest before assemble");
    let m = assemble_at(&url, &fx.issuer, &*fx.keyring, None, &opts).unwrap();
    assert_eq!((m.records, m.shards.len()), (96, 4));
    let mut l =
        loader_with(&fx, &url, options(&srv.endpoint, Some(&fx.path("c1"))), |b| b.shuffle(Shuffle::None)).unwrap();
    assert_eq!(epoch(&mut l).unwrap(), samples, "every sample once, in packing order");
    let e = assemble_at(&url, &fx.issuer, &*fx.keyring, None, &opts).unwrap_err();
    assert!(e.to_string().contains("assembled"), "{e}");

    // A gap: the second worker never ran.
    let gap = format!("s3://{BUCKET}/parts/gap");
    pack(&gap, 48..96, Part { first_shard: 2, max_shards: None }).unwrap();
    let e = assemble_at(&gap, &fx.issuer, &*fx.keyring, None, &opts).unwrap_err().to_string();
    assert!(e.contains("no part has shard 0"), "{e}");
    // A shard object replaced after its part file was written (a retried worker).
    let swapped = format!("s3://{BUCKET}/parts/swapped");
    pack(&swapped, 0..48, Part { first_shard: 0, max_shards: Some(2) }).unwrap();
    pack(&swapped, 48..96, Part { first_shard: 2, max_shards: None }).unwrap();
    srv.put(BUCKET, "parts/swapped/shard-00001.slk", b"not the shard the part lists");
    let e = assemble_at(&swapped, &fx.issuer, &*fx.keyring, None, &opts).unwrap_err().to_string();
    assert!(e.contains("shard 1"), "{e}");
    for u in [&gap, &swapped] {
        assert!(loader(&fx, u, options(&srv.endpoint, Some(&fx.path("c2")))).is_err(), "{u} was signed");
    }
    // The staging directories of the parts and of assemble are gone.
    let mine = format!("-{}-", std::process::id());
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| (n.starts_with("shardlock-part-") || n.starts_with("shardlock-assemble-")) && n.contains(&mine))
        .collect();
    assert!(left.is_empty(), "staging left behind: {left:?}");
}
