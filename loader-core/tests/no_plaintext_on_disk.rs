//! Plaintext never touches disk: a full epoch of a dataset whose plaintext carries a
//! canary runs under `strace -f`, capturing every write-family syscall with its bytes;
//! the canary must appear in none of them, and no file may appear in the writable
//! places the process could use (its cwd, HOME, TMPDIR). `make test` installs strace.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const CANARY: &[u8] = b"CANARY-c0ffee-PLAINTEXT-MUST-NOT-LEAK";

fn listing(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            out.insert(p.display().to_string());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

#[test]
fn a_full_epoch_writes_no_plaintext_anywhere() {
    let strace = Command::new("strace").arg("-V").output();
    assert!(
        strace.map(|o| o.status.success()).unwrap_or(false),
        "strace is required for this test: `apt-get install strace` (make test installs it)"
    );
    let fx = common::Fixture::new();
    let schema = shardlock::Schema::new(vec![shardlock::Field::bytes("text")]).unwrap();
    let samples: Vec<Vec<Vec<u8>>> =
        (0..400).map(|i| vec![[CANARY, format!("-{i:05}-").as_bytes(), CANARY].concat()]).collect();
    let ds = fx.pack("ds", "canary", schema, &samples, 4096);
    let token = fx.path("job.token");
    fx.token("canary").save(&token).unwrap();
    let trust = fx.path("issuer.pub");
    fx.issuer.save(&fx.path("issuer")).unwrap();
    std::fs::rename(fx.path("issuer.pub"), &trust).unwrap();

    let sandbox = tempfile::tempdir().unwrap();
    let (cwd, home, tmp) = (sandbox.path().join("cwd"), sandbox.path().join("home"), sandbox.path().join("tmp"));
    for d in [&cwd, &home, &tmp] {
        std::fs::create_dir(d).unwrap();
    }
    let trace = fx.path("trace.txt");
    let before = [listing(&cwd), listing(&home), listing(&tmp)];
    let out = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-xx",
            "-s",
            "1048576",
            "-e",
            "trace=write,pwrite64,writev,pwritev,pwritev2,sendto,sendmsg,sendfile,copy_file_range,splice",
        ])
        .arg("-o")
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_shardlock"))
        .arg("bench")
        .arg(&ds)
        .arg("--keyring")
        .arg(fx.path("keyring.json"))
        .arg("--token")
        .arg(&token)
        .arg("--trust")
        .arg(&trust)
        .arg("--audit-log")
        .arg(fx.path("audit.jsonl"))
        .args(["--epochs", "1", "--batch-size", "16", "--json"])
        .current_dir(&cwd)
        .env("HOME", &home)
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["epochs"][0]["samples"], 400, "the whole epoch was read");

    let text = std::fs::read_to_string(&trace).unwrap();
    let hex: String = CANARY.iter().map(|b| format!("\\x{b:02x}")).collect();
    let writes = text.lines().filter(|l| l.contains("write") || l.contains("send")).count();
    assert!(writes > 0, "strace captured no writes: the test would prove nothing");
    assert!(!text.contains(&hex), "the canary was written by a syscall");
    assert!(!text.contains(std::str::from_utf8(CANARY).unwrap()));
    let after = [listing(&cwd), listing(&home), listing(&tmp)];
    assert_eq!(before, after, "files appeared in cwd, HOME or TMPDIR");
    // And the positive control: the canary is in the plaintext the loader delivers.
    let mut l = shardlock::Loader::builder(&ds)
        .key_provider(fx.keyring.clone())
        .token(&token)
        .trust_anchor(fx.trust)
        .batch_size(4)
        .build()
        .unwrap();
    let b = l.next().unwrap().unwrap();
    assert!(b.bytes("text", 0).unwrap().starts_with(CANARY));
}
