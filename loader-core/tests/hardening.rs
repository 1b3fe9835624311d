//! Regression tests for the findings of the external security review (issue 15): each
//! fails without its fix. Nothing here needs a server: the refusals come before any
//! request is sent (the endpoint below accepts no connection).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use common::Fixture;
use shardlock::{upload_dir, Consumed, Error, IntegrityKind, LoaderState, RemoteOptions};

/// An endpoint nothing listens on: an upload that got past its checks fails as Remote.
fn nowhere() -> RemoteOptions {
    let mut o = RemoteOptions::default();
    o.set("endpoint", "http://127.0.0.1:9").unwrap();
    o.set("access_key_id", "test").unwrap();
    o.set("secret_access_key", "test").unwrap();
    o.set("timeout", "2s").unwrap();
    o
}

/// Runs `f` on a thread and fails the test if it does not return within 20 s (instead
/// of hanging the test binary).
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("{what} did not return within 20 s"))
}

fn mkfifo(path: &Path) {
    let st = std::process::Command::new("mkfifo").arg(path).status().unwrap();
    assert!(st.success(), "mkfifo {}", path.display());
}

fn edit_manifest_unsigned(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("manifest.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

/// Finding 1 (high): `upload` took an unverified manifest's file names. A manifest
/// pointing a shard at `../keyring.json` (or an absolute path) would upload the KEK.
#[test]
fn upload_refuses_a_manifest_that_does_not_verify() {
    let fx = Fixture::new();
    let (dir, _) = fx.standard("ds", "up", 8);
    for target in ["../keyring.json", "/etc/hostname"] {
        let d = fx.path(&format!("copy-{}", target.len()));
        std::fs::create_dir(&d).unwrap();
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        edit_manifest_unsigned(&d, |v| {
            *v.pointer_mut("/body/shards/0/file").expect("envelope {format, body, signature}") =
                serde_json::Value::from(target);
        });
        match upload_dir(&d, "s3://bucket/x", &fx.trust, &nowhere()) {
            Err(Error::ManifestSignature { .. } | Error::Format { .. }) => {}
            other => panic!("{target}: an edited manifest must be refused before any upload, got {other:?}"),
        }
    }
}

/// Finding 1: only regular files that match the manifest go up: a symbolic link, a
/// FIFO or a modified shard in the directory is refused before anything is sent.
#[test]
fn upload_refuses_a_symlinked_fifo_or_modified_shard() {
    let fx = Fixture::new();
    let (dir, _) = fx.standard("ds", "up", 8);
    let shard = dir.join("shard-00000.slk");
    let keep = fx.path("shard0");
    std::fs::rename(&shard, &keep).unwrap();

    std::os::unix::fs::symlink(&keep, &shard).unwrap();
    let e = upload_dir(&dir, "s3://bucket/x", &fx.trust, &nowhere()).unwrap_err();
    assert!(matches!(&e, Error::Input { detail, .. } if detail.contains("symbolic link")), "{e}");
    std::fs::remove_file(&shard).unwrap();

    mkfifo(&shard);
    let (d, t) = (dir.clone(), fx.trust);
    let e = within("upload with a FIFO shard", move || upload_dir(&d, "s3://bucket/x", &t, &nowhere())).unwrap_err();
    assert!(matches!(&e, Error::Input { detail, .. } if detail.contains("not a regular file")), "{e}");
    std::fs::remove_file(&shard).unwrap();

    std::fs::copy(&keep, &shard).unwrap();
    common::flip(&shard, 200);
    let e = upload_dir(&dir, "s3://bucket/x", &fx.trust, &nowhere()).unwrap_err();
    assert!(
        matches!(&e, Error::Integrity { kind: IntegrityKind::DigestMismatch, shard, .. } if shard.index == Some(0)),
        "{e}"
    );
}

/// Finding 8 (low): `manifest.json` was read with no size limit.
#[test]
fn a_huge_manifest_is_refused_without_being_read() {
    let fx = Fixture::new();
    let (dir, _) = fx.standard("ds", "big", 4);
    let f = std::fs::OpenOptions::new().write(true).open(dir.join("manifest.json")).unwrap();
    f.set_len(300 << 20).unwrap(); // sparse: no disk, but 300 MiB to read
    let e = fx.open(&dir).err().unwrap();
    assert!(matches!(&e, Error::Input { detail, .. } if detail.contains("larger than")), "{e}");
}

/// Finding 8: a FIFO in place of a shard blocked a worker in `open` and hung the
/// loader (and its drop). It is now a typed error at once.
#[test]
fn a_fifo_in_place_of_a_shard_is_an_error_not_a_hang() {
    let fx = Fixture::new();
    let (dir, _) = fx.standard("ds", "fifo", 8);
    let shard = dir.join("shard-00001.slk");
    std::fs::remove_file(&shard).unwrap();
    mkfifo(&shard);
    let loader = fx.loader(&dir, "fifo").batch_size(2).workers(2).shuffle(shardlock::Shuffle::None).build().unwrap();
    // The epoch stops at its first error (and keeps failing after it).
    let first_error = within("a loader epoch over a FIFO shard", move || {
        let mut loader = loader;
        loader.by_ref().find_map(|b| b.err()).map(|e| e.to_string())
    });
    let e = first_error.expect("an epoch over a FIFO shard must fail");
    assert!(e.contains("not a regular file") && e.contains("shard-00001.slk"), "{e}");
}

/// Finding 8: a resume state with `world = u32::MAX` looped about 2^32 times.
#[test]
fn a_resume_state_with_an_absurd_world_is_refused_at_once() {
    let fx = Fixture::new();
    let (dir, _) = fx.standard("ds", "state", 8);
    let mut loader = fx.loader(&dir, "state").batch_size(2).build().unwrap();
    let state = LoaderState {
        epoch: 0,
        seed: 0,
        consumed: vec![Consumed { world: u32::MAX, per_rank: 0 }],
        worker: None,
        tokens: None,
    };
    let e = within("load_state", move || loader.load_state(&state)).unwrap_err();
    assert!(matches!(&e, Error::InvalidArgument(m) if m.contains("world size")), "{e}");
    // Nor may many segments at a large world size add up to the same (review).
    let mut loader = fx.loader(&dir, "state").batch_size(2).build().unwrap();
    let state = LoaderState {
        epoch: 0,
        seed: 0,
        consumed: vec![Consumed { world: 1 << 20, per_rank: 0 }; 100_000],
        worker: None,
        tokens: None,
    };
    let e = within("load_state", move || loader.load_state(&state)).unwrap_err();
    assert!(matches!(&e, Error::InvalidArgument(m) if m.contains("segments")), "{e}");
}

/// Finding 3: with `HOME` unset the cache fell back to a shared `/tmp/shardlock-cache`,
/// which another user could create first. There is no fallback now.
#[test]
fn no_shared_cache_fallback_without_home() {
    for k in ["SHARDLOCK_CACHE_DIR", "XDG_CACHE_HOME", "HOME"] {
        std::env::remove_var(k);
    }
    let e = RemoteOptions::default().resolved_cache_dir().unwrap_err();
    assert!(matches!(&e, Error::Remote { detail, .. } if detail.contains("no cache directory")), "{e}");
    let mut o = RemoteOptions::default();
    o.set("cache_dir", "/somewhere/mine").unwrap();
    assert_eq!(o.resolved_cache_dir().unwrap(), Path::new("/somewhere/mine"));
}

/// Finding 2 (medium): every pack wrote generation 1 and `--force` dropped the old
/// manifest, so an older pack of the same dataset that was later rotated (generation 2)
/// outranked a new pack and passed `--min-generation`. Generations now continue.
#[test]
fn a_repack_continues_the_generation_so_an_older_rotated_pack_is_refused() {
    let fx = Fixture::new();
    let (dir, _) = fx.standard("ds", "regen", 8);
    assert_eq!(fx.open(&dir).unwrap().manifest().generation, 1);
    let k2 = shardlock::Keyring::create(&fx.path("kr2.json")).unwrap();
    assert_eq!(shardlock::rotate(&dir, &*fx.keyring, &k2, &fx.issuer).unwrap().generation, 2);
    let old = fx.path("old-rotated-copy");
    std::fs::create_dir(&old).unwrap();
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), old.join(e.file_name())).unwrap();
    }
    // The owner re-packs the dataset (say, with poisoned records removed).
    let (dir2, _) = fx.standard("ds", "regen", 6);
    assert_eq!(dir2, dir);
    let new_gen = fx.open(&dir).unwrap().manifest().generation;
    assert_eq!(new_gen, 3, "a re-pack continues from the verified manifest it replaces");
    let e = fx.open(&old).unwrap().require_generation(new_gen).unwrap_err();
    assert!(matches!(e, Error::Rollback { generation: 2, min: 3, .. }), "{e}");
    // An explicit generation may not go backwards, and may start a fresh directory.
    let schema = shardlock::Schema::new(vec![shardlock::Field::bytes("b")]).unwrap();
    let mut opts = shardlock::PackOptions::new("regen");
    opts.force = true;
    opts.generation = Some(3);
    let e =
        shardlock::DatasetWriter::create(&dir, schema.clone(), opts.clone(), &*fx.keyring, &fx.issuer).err().unwrap();
    assert!(matches!(&e, Error::InvalidArgument(m) if m.contains("not above 3")), "{e}");
    opts.generation = Some(10);
    let mut w = shardlock::DatasetWriter::create(&fx.path("fresh"), schema, opts, &*fx.keyring, &fx.issuer).unwrap();
    w.write_sample(&[b"x"]).unwrap();
    assert_eq!(w.finish().unwrap().generation, 10);

    // The token side: a token that requires generation 3 opens the new pack and not
    // the old rotated copy, although both carry the same dataset id.
    let spec = shardlock::TokenSpec {
        dataset: "regen".into(),
        principal: "p".into(),
        shards: shardlock::ShardSet::All,
        ops: vec![shardlock::Operation::Read],
        expires: std::time::SystemTime::now() + std::time::Duration::from_secs(600),
        not_before: None,
        min_generation: Some(new_gen),
    };
    let token = shardlock::Token::issue(&fx.issuer, &spec).unwrap();
    let authorizer = || shardlock::Authorizer::new(&fx.trust, Some(token.clone()), Default::default()).unwrap();
    let access = shardlock::Access::new(authorizer(), fx.keyring.clone());
    assert!(access.open_shard(&fx.open(&dir).unwrap(), 0).is_ok());
    let e = access.open_shard(&fx.open(&old).unwrap(), 0).err().unwrap();
    assert!(matches!(e, Error::AccessDenied { reason: shardlock::DenyReason::StaleGeneration, .. }), "{e}");
}

/// Finding 10 (low): the planner addressed records as u32 and truncated a larger count.
/// A validly signed manifest whose shard claims 2^32 records (its file made that long,
/// sparsely) is refused when the loader is built, naming the shard and the limit.
#[test]
fn a_shard_with_more_than_u32_records_is_refused_not_truncated() {
    use shardlock::primitives::{chunked::ciphertext_len, index::index_len, SignedManifest};
    let fx = Fixture::new();
    let (dir, _) = fx.standard("ds", "big", 8);
    let path = dir.join("manifest.json");
    let signed = SignedManifest::parse(&std::fs::read(&path).unwrap(), &path).unwrap();
    let mut m = signed.manifest.clone();
    let fields = m.schema.fields.len();
    let s = &mut m.shards[0];
    let records = 1u64 << 32;
    let plain = index_len(records, fields).unwrap() + 16;
    let header = s.file_bytes - ciphertext_len(s.plaintext_bytes).unwrap();
    m.records += records - s.records;
    s.records = records;
    s.plaintext_bytes = plain;
    s.file_bytes = header + ciphertext_len(plain).unwrap();
    std::fs::OpenOptions::new().write(true).open(dir.join(&s.file)).unwrap().set_len(s.file_bytes).unwrap();
    let body = serde_json::to_vec_pretty(&m).unwrap();
    let sig = fx.issuer.sign(&SignedManifest::signed_message(&body)).unwrap();
    std::fs::write(&path, SignedManifest::encode(&body, &sig).unwrap()).unwrap();
    assert!(fx.open(&dir).is_ok(), "the manifest itself is consistent and validly signed");
    let e = fx.loader(&dir, "big").build().err().unwrap();
    assert!(
        matches!(&e, Error::Format { detail, .. } if detail.contains("shard 0") && detail.contains("2^32-1")),
        "{e}"
    );
}
