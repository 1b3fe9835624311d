//! The `shardlock` binary end to end: keygen, pack, inspect, verify, rotate.
#![allow(clippy::unwrap_used)]

#[path = "common/cli.rs"]
mod cli;
mod common;

use cli::{ok, run as shardlock};

#[test]
fn keygen_pack_inspect_verify_rotate() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    common::write_npy(&d.join("x.npy"), "<f4", &[300, 8], &(0..300 * 8 * 4).map(|i| i as u8).collect::<Vec<_>>());
    ok(d, &["keygen", "kek", "--out", "kr.json"]);
    ok(d, &["keygen", "issuer", "--out", "iss"]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(d.join("kr.json")).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(d.join("iss")).unwrap().permissions().mode() & 0o777, 0o600);
    // keygen never overwrites a key.
    assert!(!shardlock(d, &["keygen", "kek", "--out", "kr.json"]).status.success());

    ok(
        d,
        &[
            "pack",
            "--keyring",
            "kr.json",
            "--issuer-key",
            "iss",
            "--dataset-id",
            "cli",
            "--out",
            "ds",
            "--shard-size",
            "4k",
            "x.npy",
        ],
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&ok(d, &["inspect", "ds", "--json", "--trust", "iss.pub"])).unwrap();
    assert_eq!(inspect["records"], 300);
    assert_eq!(inspect["signature"], true);
    assert_eq!(inspect["schema"]["fields"][0]["dtype"], "f32");
    let shards = inspect["shards"].as_array().unwrap().len();
    assert!(shards >= 2);
    ok(
        d,
        &[
            "token",
            "issue",
            "--issuer-key",
            "iss",
            "--dataset",
            "cli",
            "--principal",
            "ci",
            "--ops",
            "read,verify",
            "--out",
            "tok",
        ],
    );
    assert_eq!(std::fs::metadata(d.join("tok")).unwrap().permissions().mode() & 0o777, 0o600);
    let report: serde_json::Value = serde_json::from_str(&ok(
        d,
        &[
            "verify",
            "ds",
            "--keyring",
            "kr.json",
            "--token",
            "tok",
            "--trust",
            "iss.pub",
            "--json",
            "--audit-log",
            "audit.jsonl",
        ],
    ))
    .unwrap();
    assert_eq!(report["ok"], true);

    // bench --ceiling: the loader and AES-256-GCM alone on as many threads, one run.
    let bench: serde_json::Value = serde_json::from_str(&ok(
        d,
        &[
            "bench",
            "ds",
            "--keyring",
            "kr.json",
            "--token",
            "tok",
            "--trust",
            "iss.pub",
            "--batch-size",
            "16",
            "--epochs",
            "2",
            "--workers",
            "2",
            "--ceiling",
            "--json",
        ],
    ))
    .unwrap();
    let c = &bench["ceiling"];
    assert_eq!(c["threads"], 2);
    let (loader, mmap) = (c["loader_gb_per_s"].as_f64().unwrap(), c["aes_gcm_mmap_gb_per_s"].as_f64().unwrap());
    assert!(loader > 0.0 && mmap > 0.0, "{c}");
    assert!((c["share_of_mmap"].as_f64().unwrap() - loader / mmap).abs() < 1e-9, "{c}");
    assert!(c["openssl_gb_per_s"].is_null() || c["openssl_gb_per_s"].as_f64().unwrap() > 0.0, "{c}");

    // Rotation: payload bytes unchanged, new keyring opens it, old keyring no longer does.
    let before: Vec<Vec<u8>> =
        (0..shards).map(|i| std::fs::read(d.join(format!("ds/shard-{i:05}.slk"))).unwrap()).collect();
    ok(d, &["keygen", "kek", "--out", "kr2.json"]);
    ok(d, &["rotate", "ds", "--keyring", "kr.json", "--new-keyring", "kr2.json", "--issuer-key", "iss"]);
    let after: Vec<Vec<u8>> =
        (0..shards).map(|i| std::fs::read(d.join(format!("ds/shard-{i:05}.slk"))).unwrap()).collect();
    assert_eq!(before, after);
    ok(d, &["verify", "ds", "--keyring", "kr2.json", "--token", "tok", "--trust", "iss.pub", "--min-generation", "2"]);
    let old = shardlock(d, &["verify", "ds", "--keyring", "kr.json", "--token", "tok", "--trust", "iss.pub"]);
    assert!(!old.status.success());
    assert!(String::from_utf8_lossy(&old.stdout).contains("key unavailable"));
    // A repeated --keyring: each DEK is unwrapped by the keyring that holds its KEK.
    ok(d, &["verify", "ds", "--keyring", "kr.json", "--keyring", "kr2.json", "--token", "tok", "--trust", "iss.pub"]);
    // No temporary manifest left behind by the atomic replace.
    assert!(std::fs::read_dir(d.join("ds")).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains(".tmp")));

    // A flipped chunk byte: non-zero exit naming dataset, shard and chunk.
    let shard = d.join("ds/shard-00001.slk");
    common::flip(&shard, 200);
    let o = shardlock(d, &["verify", "ds", "--keyring", "kr2.json", "--token", "tok", "--trust", "iss.pub"]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("dataset \"cli\"") && out.contains("shard 1") && out.contains("chunk 0"), "{out}");

    // Bad arguments are usage errors, not panics.
    let o = shardlock(
        d,
        &[
            "pack",
            "--keyring",
            "kr.json",
            "--issuer-key",
            "iss",
            "--dataset-id",
            "x",
            "--out",
            "o",
            "--shard-size",
            "12zz",
            "x.npy",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    let o = shardlock(d, &["verify", "nope", "--keyring", "kr.json", "--token", "tok", "--trust", "iss.pub"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no manifest.json"));
}

#[test]
fn token_and_audit_commands() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    common::write_npy(&d.join("x.npy"), "|u1", &[64, 1000], &vec![9u8; 64_000]);
    ok(d, &["keygen", "kek", "--out", "kr.json"]);
    ok(d, &["keygen", "issuer", "--out", "iss"]);
    ok(
        d,
        &[
            "pack",
            "--keyring",
            "kr.json",
            "--issuer-key",
            "iss",
            "--dataset-id",
            "tok",
            "--out",
            "ds",
            "--shard-size",
            "16k",
            "x.npy",
        ],
    );
    ok(
        d,
        &[
            "token",
            "issue",
            "--issuer-key",
            "iss",
            "--dataset",
            "tok",
            "--principal",
            "bob",
            "--shards",
            "0-1",
            "--ops",
            "read,verify",
            "--ttl",
            "2h",
            "--out",
            "t0",
        ],
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&ok(d, &["token", "inspect", "t0", "--trust", "iss.pub", "--json"])).unwrap();
    assert_eq!(inspect["verified"], true);
    let authority = inspect["blocks"][0].as_str().unwrap();
    assert!(authority.contains("allowed_dataset(\"tok\")") && authority.contains("principal(\"bob\")"), "{authority}");
    let token_text = std::fs::read_to_string(d.join("t0")).unwrap();
    let shown = ok(d, &["token", "inspect", "t0"]);
    assert!(!shown.contains(token_text.trim()), "inspect must not print the token");
    assert!(shown.contains("not verified"));

    // Attenuate without any key, then verify: shards outside the narrowed set are denied.
    ok(
        d,
        &[
            "token",
            "attenuate",
            "t0",
            "--trust",
            "iss.pub",
            "--shards",
            "0",
            "--ops",
            "verify",
            "--ttl",
            "10m",
            "--out",
            "t1",
        ],
    );
    let args = |tok: &'static str| -> Vec<&'static str> {
        vec![
            "verify",
            "ds",
            "--keyring",
            "kr.json",
            "--token",
            tok,
            "--trust",
            "iss.pub",
            "--audit-log",
            "audit.jsonl",
            "--json",
        ]
    };
    let o = shardlock(d, &args("t1"));
    assert_eq!(o.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["shards"][0]["ok"], true);
    assert_eq!(report["shards"][1]["failure"], "shard_out_of_scope");

    // Revoke the parent: the child is denied too, and the audit chain verifies.
    ok(d, &["token", "revoke", "t0", "--deny-list", "deny.txt"]);
    let mut a = args("t1");
    a.extend(["--deny-list", "deny.txt"]);
    let o = shardlock(d, &a);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["shards"][0]["failure"], "revoked");
    let v: serde_json::Value = serde_json::from_str(&ok(d, &["audit", "verify", "audit.jsonl", "--json"])).unwrap();
    assert_eq!(v["ok"], true);
    assert!(v["records"].as_u64().unwrap() >= 4);

    // A token that requires a newer generation than the dataset has (finding 2): denied
    // with its own reason, whether the issuer or an attenuation wrote the check.
    ok(
        d,
        &[
            "token",
            "issue",
            "--issuer-key",
            "iss",
            "--dataset",
            "tok",
            "--principal",
            "bob",
            "--ops",
            "read,verify",
            "--min-generation",
            "2",
            "--out",
            "t2",
        ],
    );
    ok(d, &["token", "attenuate", "t0", "--trust", "iss.pub", "--min-generation", "2", "--out", "t3"]);
    ok(d, &["token", "attenuate", "t0", "--trust", "iss.pub", "--min-generation", "1", "--out", "t4"]);
    for (tok, failure) in [("t2", Some("stale_generation")), ("t3", Some("stale_generation")), ("t4", None)] {
        let o = shardlock(d, &args(tok));
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        match failure {
            Some(f) => assert_eq!(report["shards"][0]["failure"], f, "{tok}: {report}"),
            None => assert_eq!(report["shards"][0]["ok"], true, "{tok}: {report}"),
        }
    }

    // An edited line is named.
    let log = std::fs::read_to_string(d.join("audit.jsonl")).unwrap();
    let edited = log.replacen("\"decision\":\"allow\"", "\"decision\":\"deny\"", 1);
    std::fs::write(d.join("audit.jsonl"), edited).unwrap();
    let o = shardlock(d, &["audit", "verify", "audit.jsonl"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("line 1"), "{}", String::from_utf8_lossy(&o.stdout));

    // Missing token: refused before any shard is read, saying what verify needs.
    let o = shardlock(d, &["verify", "ds", "--keyring", "kr.json", "--trust", "iss.pub"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("verify needs --token FILE"));
    // A token file that does not exist: every shard denied (invalid_token), exit 1.
    let o = shardlock(d, &["verify", "ds", "--keyring", "kr.json", "--token", "nope", "--trust", "iss.pub"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("invalid_token"), "{}", String::from_utf8_lossy(&o.stdout));
}

/// Every command that prints a result has `--json`; token JSON names what the token
/// grants; times are RFC 3339 and sizes human; a zero lifetime and a key file in the
/// wrong place are refused with what to do.
#[test]
fn json_everywhere_readable_times_and_sizes_and_misplaced_files() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let json = |args: &[&str]| -> serde_json::Value { serde_json::from_str(&ok(d, args)).unwrap() };
    let kek = json(&["keygen", "kek", "--out", "kr.json", "--json"]);
    assert!(kek["kek_id"].as_str().unwrap().starts_with("kek-"), "{kek}");
    let iss = json(&["keygen", "issuer", "--out", "iss", "--json"]);
    assert_eq!(iss["trust_anchor"], "iss.pub");
    assert_eq!(iss["key_id"].as_str().unwrap().len(), 16);
    common::write_npy(&d.join("x.npy"), "|u1", &[25, 1000], &vec![3u8; 25_000]);
    let pack =
        ok(d, &["pack", "--keyring", "kr.json", "--issuer-key", "iss", "--dataset-id", "j", "--out", "ds", "x.npy"]);
    assert!(pack.contains("(25.0 kB)"), "{pack}");
    let inspect = ok(d, &["inspect", "ds", "--trust", "iss.pub"]);
    assert!(inspect.contains("Z by issuer") && inspect.contains(" kB plaintext, 25."), "{inspect}");
    fn issue<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["token", "issue", "--issuer-key", "iss", "--dataset-id", "j", "--principal", "ann"];
        a.extend_from_slice(extra);
        a
    }
    let tok = json(&issue(&[
        "--shards",
        "0-3,7",
        "--ops",
        "read,verify",
        "--ttl",
        "2h",
        "--min-generation",
        "2",
        "--out",
        "t0",
        "--json",
    ]));
    let f = &tok["fields"];
    assert_eq!(f["dataset"], "j");
    assert_eq!(f["principal"], "ann");
    assert_eq!(f["operations"], serde_json::json!(["read", "verify"]));
    assert_eq!(f["shards"], serde_json::json!([[0, 3], [7, 7]]));
    assert_eq!(f["min_generation"], 2);
    let expires = humantime::parse_rfc3339(f["expires"].as_str().unwrap()).unwrap();
    let left = expires.duration_since(std::time::SystemTime::now()).unwrap().as_secs();
    assert!((7000..=7200).contains(&left), "{f}");
    let narrowed = json(&["token", "attenuate", "t0", "--trust", "iss.pub", "--ttl", "10m", "--out", "t1", "--json"]);
    let inspect = json(&["token", "inspect", "t1", "--trust", "iss.pub", "--json"]);
    assert_eq!(inspect["fields"]["expires"], narrowed["fields"]["expires"]);
    assert_eq!(inspect["fields"]["attenuations"].as_array().unwrap().len(), 1);
    let left = humantime::parse_rfc3339(inspect["fields"]["expires"].as_str().unwrap())
        .unwrap()
        .duration_since(std::time::SystemTime::now())
        .unwrap()
        .as_secs();
    assert!(left <= 600, "the attenuated expiry is the effective one: {inspect}");
    let revoked = json(&["token", "revoke", "t1", "--deny-list", "deny.txt", "--json"]);
    assert_eq!(revoked["revoked"], narrowed["revocation_id"]);
    // A zero lifetime is refused.
    let o = shardlock(d, &issue(&["--ttl", "0s", "--out", "t2"]));
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("is zero"));
    // The public key where the secret key goes: named, with the right file.
    let o = shardlock(
        d,
        &["token", "issue", "--issuer-key", "iss.pub", "--dataset", "j", "--principal", "a", "--out", "t3"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("this is the issuer's public key (the trust anchor); pass iss (the secret key) here"),
        "{err}"
    );
    assert!(!err.contains("consider the key exposed"), "{err}");
    let o = shardlock(d, &["inspect", "ds", "--trust", "iss"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("this is the issuer's secret key; pass iss.pub"), "{err}");
    // The data owner verifies with the issuer key, no token; without either, verify says what it needs.
    let v = json(&["verify", "ds", "--keyring", "kr.json", "--issuer-key", "iss", "--trust", "iss.pub", "--json"]);
    assert_eq!(v["ok"], true, "{v}");
    let o = shardlock(d, &["verify", "ds", "--keyring", "kr.json", "--trust", "iss.pub"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("verify needs --token FILE"));
    ok(d, &["keygen", "issuer", "--out", "other"]);
    let o = shardlock(d, &["verify", "ds", "--keyring", "kr.json", "--issuer-key", "other", "--trust", "iss.pub"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not the key of --trust"));
    // Subcommands list only the options they use.
    for cmd in ["upload", "inspect"] {
        let help = ok(d, &[cmd, "--help"]);
        assert!(help.contains("--s3-endpoint") && help.contains("--json") && !help.contains("--cache-dir"), "{help}");
    }
}

/// `pack --metadata`: signed with the manifest, shown by `inspect` (text and JSON);
/// a `classes` that is not a list of names is refused; an edited class name breaks the
/// signature.
#[test]
fn pack_metadata_is_signed_and_shown_by_inspect() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    common::write_npy(
        &d.join("label.npy"),
        "<i8",
        &[6],
        &(0..6i64).flat_map(|i| (i % 2).to_le_bytes()).collect::<Vec<_>>(),
    );
    ok(d, &["keygen", "kek", "--out", "kr.json"]);
    ok(d, &["keygen", "issuer", "--out", "iss"]);
    let pack = |out: &str, meta: &[&str]| {
        let mut args =
            vec!["pack", "--keyring", "kr.json", "--issuer-key", "iss", "--dataset-id", "meta", "--out", out];
        for m in meta {
            args.extend(["--metadata", m]);
        }
        args.push("label.npy");
        shardlock(d, &args)
    };
    assert!(pack("ds", &[r#"classes=["cat","dog"]"#, "source=camera trap 7"]).status.success());
    let j: serde_json::Value =
        serde_json::from_str(&ok(d, &["inspect", "ds", "--trust", "iss.pub", "--json"])).unwrap();
    assert_eq!(j["classes"], serde_json::json!(["cat", "dog"]));
    assert_eq!(j["metadata"]["source"], "camera trap 7");
    let text = ok(d, &["inspect", "ds", "--trust", "iss.pub"]);
    assert!(text.contains("classes     2: cat, dog") && text.contains("source = \"camera trap 7\""), "{text}");

    let bad = pack("bad", &["classes=3"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("list of class names"));
    assert!(!d.join("bad/manifest.json").exists());

    let m = d.join("ds/manifest.json");
    std::fs::write(&m, std::fs::read_to_string(&m).unwrap().replace("\"dog\"", "\"cow\"")).unwrap();
    let o = shardlock(d, &["inspect", "ds", "--trust", "iss.pub", "--json"]);
    assert!(!o.status.success());
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["signature"], false);
}

/// `pack --part FIRST:COUNT --trust` on two workers, then `assemble`: one dataset that
/// verifies, with no issuer secret key on the workers.
#[test]
fn pack_parts_without_the_issuer_key_then_assemble() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok(d, &["keygen", "kek", "--out", "kr.json"]);
    ok(d, &["keygen", "issuer", "--out", "iss"]);
    for (name, range) in [("a", 0..40u8), ("b", 40..70u8)] {
        let rows: Vec<u8> = range.flat_map(|i| [i; 100]).collect();
        std::fs::create_dir_all(d.join(name)).unwrap();
        common::write_npy(&d.join(format!("{name}/x.npy")), "|u1", &[rows.len() / 100, 100], &rows);
    }
    let part = |dir: &str, spec: &str| {
        shardlock(
            d,
            &[
                "pack",
                "--keyring",
                "kr.json",
                "--trust",
                "iss.pub",
                "--part",
                spec,
                "--dataset-id",
                "parts",
                "--out",
                "ds",
                "--shard-size",
                "1000",
                &format!("{dir}/x.npy"),
            ],
        )
    };
    // 40 rows of 100 bytes in 1,000-byte shards: 4 shards, so the second part starts at 4.
    let o = part("a", "0:4");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(part("b", "4").status.success());
    let v = shardlock(d, &["inspect", "ds"]);
    assert!(!v.status.success(), "not a dataset before assemble");
    let j: serde_json::Value =
        serde_json::from_str(&ok(d, &["assemble", "ds", "--issuer-key", "iss", "--keyring", "kr.json", "--json"]))
            .unwrap();
    assert_eq!((j["records"].as_u64(), j["shards"].as_u64()), (Some(70), Some(7)));
    ok(
        d,
        &[
            "token",
            "issue",
            "--issuer-key",
            "iss",
            "--dataset-id",
            "parts",
            "--principal",
            "t",
            "--ops",
            "read,verify",
            "--out",
            "tok",
        ],
    );
    ok(d, &["verify", "ds", "--keyring", "kr.json", "--token", "tok", "--trust", "iss.pub"]);
    // --part without --trust, and --part with --issuer-key, are usage errors.
    let o =
        shardlock(d, &["pack", "--keyring", "kr.json", "--part", "0", "--dataset-id", "p", "--out", "x", "a/x.npy"]);
    assert_eq!(o.status.code(), Some(2));
}

/// `pack` reads WebDataset tars (`--format wds`, `--parse cls=i64`) and image folders
/// (told from the layout; class names signed as metadata); Parquet points to Python.
#[test]
fn pack_webdataset_tars_and_image_folders() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok(d, &["keygen", "kek", "--out", "kr.json"]);
    ok(d, &["keygen", "issuer", "--out", "iss"]);
    let mut b = tar::Builder::new(std::fs::File::create(d.join("s.tar")).unwrap());
    for i in 0..10 {
        for (ext, v) in [("jpg", vec![i as u8; 100 * i]), ("cls", format!("{}", i % 3).into_bytes())] {
            let mut h = tar::Header::new_gnu();
            h.set_size(v.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, format!("{i:04}.{ext}"), &v[..]).unwrap();
        }
    }
    b.finish().unwrap();
    drop(b);
    let pack = |out: &str, extra: &[&str], input: &str| {
        let mut args = vec!["pack", "--keyring", "kr.json", "--issuer-key", "iss", "--dataset-id", out, "--out", out];
        args.extend(extra);
        args.push(input);
        shardlock(d, &args)
    };
    let o = pack("wds", &["--format", "wds", "--parse", "cls=i64", "--json"], "s.tar");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["records"], 10);
    let j: serde_json::Value =
        serde_json::from_str(&ok(d, &["inspect", "wds", "--trust", "iss.pub", "--json"])).unwrap();
    let fields: Vec<String> =
        j["schema"]["fields"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap().into()).collect();
    assert_eq!(fields, ["cls", "jpg"], "{j}");
    let bad = pack("bad", &["--parse", "cls=float"], "s.tar");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("give EXT=i64"));

    for (c, n) in [("dog", 2), ("cat", 3)] {
        std::fs::create_dir_all(d.join("imgs").join(c)).unwrap();
        for k in 0..n {
            std::fs::write(d.join(format!("imgs/{c}/{k}.jpg")), vec![k as u8; 50]).unwrap();
        }
    }
    let o = pack("imgs", &["--json"], "imgs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value =
        serde_json::from_str(&ok(d, &["inspect", "imgs", "--trust", "iss.pub", "--json"])).unwrap();
    assert_eq!(j["classes"], serde_json::json!(["cat", "dog"]));
    assert_eq!(j["records"], 5);

    let o = pack("pq", &["--format", "parquet"], "x.parquet");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("shardlock.pack"));

    // --compress: the schema says which fields are stored compressed; inspect shows it,
    // verify authenticates them, bad specs are usage errors naming the spec.
    let o = pack("wdsz", &["--format", "wds", "--compress", "jpg=zstd:5", "--json"], "s.tar");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value =
        serde_json::from_str(&ok(d, &["inspect", "wdsz", "--trust", "iss.pub", "--json"])).unwrap();
    let compress: Vec<serde_json::Value> =
        j["schema"]["fields"].as_array().unwrap().iter().map(|f| f["compress"].clone()).collect();
    assert_eq!(compress, [serde_json::Value::Null, serde_json::json!("zstd")], "{j}");
    assert!(ok(d, &["inspect", "wdsz", "--trust", "iss.pub"]).contains("(zstd per value)"));
    let size = |dir: &str| -> u64 {
        std::fs::read_dir(d.join(dir))
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "slk"))
            .map(|e| e.metadata().unwrap().len())
            .sum()
    };
    assert!(size("wdsz") < size("wds"), "{} vs {}", size("wdsz"), size("wds"));
    for (spec, want) in [
        ("nope=zstd", "no field \"nope\""),
        ("jpg=gzip", "unknown codec"),
        ("jpg=zstd:0", "out of range"),
        ("jpg", "FIELD=zstd"),
    ] {
        let o = pack("badz", &["--format", "wds", "--compress", spec], "s.tar");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{spec}: {err}");
        assert!(!d.join("badz/manifest.json").exists());
    }
}

#[test]
fn bench_decodes_an_image_folder_on_the_workers() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok(d, &["keygen", "kek", "--out", "kr.json"]);
    ok(d, &["keygen", "issuer", "--out", "iss"]);
    for (c, n) in [("cat", 3), ("dog", 4)] {
        std::fs::create_dir_all(d.join("imgs").join(c)).unwrap();
        for k in 0..n {
            let px: Vec<u8> = (0..40 * 30 * 3).map(|i| ((i + k * 17) % 256) as u8).collect();
            std::fs::write(d.join(format!("imgs/{c}/{k}.png")), common::png(40, 30, 3, &px)).unwrap();
        }
    }
    ok(d, &["pack", "--keyring", "kr.json", "--issuer-key", "iss", "--dataset-id", "imgs", "--out", "ds", "imgs"]);
    ok(d, &["token", "issue", "--issuer-key", "iss", "--dataset", "imgs", "--principal", "ci", "--out", "tok"]);
    let args = |decode: &str| -> Vec<String> {
        ["bench", "ds", "--keyring", "kr.json", "--token", "tok", "--trust", "iss.pub", "--batch-size", "7"]
            .iter()
            .map(|s| s.to_string())
            .chain(["--epochs", "1", "--json", "--decode", decode].iter().map(|s| s.to_string()))
            .collect()
    };
    let run = |decode: &str| shardlock(d, &args(decode).iter().map(String::as_str).collect::<Vec<_>>());
    let o = run("image=train:16:f32");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["epochs"][0]["samples"], 7);
    // 7 images of 3x16x16 f32 plus 7 i64 labels.
    assert_eq!(j["epochs"][0]["bytes"], 7 * 3 * 16 * 16 * 4 + 7 * 8, "{j}");
    for (spec, want) in [("image=crop:16", "expected FIELD=train:SIZE"), ("label=eval:16", "holds tensor values")] {
        let o = run(spec);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{spec}: {err}");
    }
    // --decode-on device needs --device; with one, this machine's answer is either a
    // run or DeviceUnavailable naming the device (never a crash).
    let mut on = args("image=eval:16");
    on.extend(["--decode-on", "device"].map(String::from));
    let o = shardlock(d, &on.iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("give --device cuda:N"), "{err}");
    on.extend(["--device", "cuda:0"].map(String::from));
    let o = shardlock(d, &on.iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() || err.contains("cuda:0"), "{err}");
}
