//! Every kind of bad input from the format issue: each produces a distinct typed error
//! naming where it happened, never a panic, never plaintext.
#![allow(clippy::unwrap_used)]

mod common;

use common::{flip, write_npy, Fixture};
use shardlock::primitives::chunked::{ENC_CHUNK_LEN, HEADER_LEN};
use shardlock::Keyring;
use shardlock::{pack_paths, PackOptions};
use shardlock::{verify, VerifyOptions};
use shardlock::{Error, IntegrityKind};

fn header_len(ds: &std::path::Path) -> usize {
    let b = std::fs::read(ds.join("shard-00000.slk")).unwrap();
    u16::from_le_bytes([b[10], b[11]]) as usize
}

/// Opening shard `i` fails with `kind` (and, when given, at `chunk`), naming the shard.
fn assert_open_fails(fx: &Fixture, ds: &std::path::Path, i: u32, kind: IntegrityKind) {
    let d = fx.open(ds).unwrap();
    match fx.open_shard(&d, i) {
        Err(Error::Integrity { shard, kind: k, .. }) => {
            assert_eq!(k, kind);
            assert_eq!(shard.index, Some(i));
            assert!(shard.dataset.is_some());
        }
        Err(e) => panic!("expected {kind:?}, got {e}"),
        Ok(_) => panic!("expected {kind:?}, shard opened"),
    }
}

/// Reading every record of shard `i` fails at `chunk` with ChunkAuth and leaves no
/// plaintext from that chunk in the output buffer; later reads keep failing.
fn assert_read_fails_at(fx: &Fixture, ds: &std::path::Path, i: u32, chunk: u64) {
    let d = fx.open(ds).unwrap();
    let mut r = match fx.open_shard(&d, i) {
        Ok(r) => r,
        // Chunks holding the record index are authenticated when the shard opens.
        Err(e) => {
            assert!(
                matches!(e, Error::Integrity { chunk: Some(c), kind: IntegrityKind::ChunkAuth, .. } if c == chunk),
                "{e}"
            );
            return;
        }
    };
    let plain = r.index().record_range(r.len() - 1).1;
    let mut out = vec![0u8; plain as usize];
    let e = r.read_at(0, &mut out).unwrap_err();
    assert!(matches!(e, Error::Integrity { chunk: Some(c), kind: IntegrityKind::ChunkAuth, .. } if c == chunk), "{e}");
    assert!(out.iter().all(|&b| b == 0), "plaintext released after an authentication failure");
    // Sticky: even a read of an intact region now fails.
    assert!(r.read_at(0, &mut [0u8; 4]).is_err());
    assert!(e.to_string().contains(&format!("chunk {chunk}")));
}

fn big(fx: &Fixture, name: &str, id: &str) -> std::path::PathBuf {
    // 3 shards of 64 records x 705 bytes = ~45 KB each, about 3 chunks per shard.
    let schema = shardlock::Schema::new(vec![
        shardlock::Field::tensor("x", shardlock::DType::U8, &[700]),
        shardlock::Field::bytes("tag"),
    ])
    .unwrap();
    let samples: Vec<Vec<Vec<u8>>> =
        (0..192).map(|i| vec![vec![(i % 251) as u8; 700], format!("s{i:04}").into_bytes()]).collect();
    fx.pack(name, id, schema, &samples, 64 * 705)
}

#[test]
fn roundtrip_reads_back_every_record() {
    let fx = Fixture::new();
    let (ds, samples) = fx.standard("ds", "ds1", 10);
    assert_eq!(fx.read_all(&ds).unwrap(), samples);
    let r = verify(&ds, &fx.trust, &fx.access("ds1"), &VerifyOptions::default(), &mut |_| {}).unwrap();
    assert!(r.ok);
    assert_eq!(r.shards.len(), 3);
}

#[test]
fn header_bit_flips_are_header_mismatch() {
    let fx = Fixture::new();
    let ds = big(&fx, "ds", "ds1");
    let hl = header_len(&ds);
    for off in [0, 9, 12, 13, 15, 20, 40, 70, 78, 83, hl - 1] {
        let shard = ds.join("shard-00000.slk");
        let orig = std::fs::read(&shard).unwrap();
        flip(&shard, off);
        assert_open_fails(&fx, &ds, 0, IntegrityKind::HeaderMismatch);
        std::fs::write(&shard, orig).unwrap();
    }
}

#[test]
fn salt_and_commitment_flips_fail_the_commitment() {
    let fx = Fixture::new();
    let ds = big(&fx, "ds", "ds1");
    let hl = header_len(&ds);
    for off in [hl, hl + 23, hl + 24, hl + 55] {
        let shard = ds.join("shard-00001.slk");
        let orig = std::fs::read(&shard).unwrap();
        flip(&shard, off);
        assert_open_fails(&fx, &ds, 1, IntegrityKind::Commitment);
        std::fs::write(&shard, orig).unwrap();
    }
}

#[test]
fn chunk_body_and_tag_flips_fail_that_chunk() {
    let fx = Fixture::new();
    let ds = big(&fx, "ds", "ds1");
    let hl = header_len(&ds);
    let shard = ds.join("shard-00002.slk");
    let orig = std::fs::read(&shard).unwrap();
    // Body of chunk 1, then the tag of chunk 1 (last 16 bytes of its 16400).
    for (off, chunk) in [(hl + HEADER_LEN + ENC_CHUNK_LEN + 5, 1), (hl + HEADER_LEN + 2 * ENC_CHUNK_LEN - 1, 1)] {
        flip(&shard, off);
        assert_read_fails_at(&fx, &ds, 2, chunk);
        let r = verify(&ds, &fx.trust, &fx.access("ds1"), &VerifyOptions::default(), &mut |_| {}).unwrap();
        assert!(!r.ok);
        assert_eq!(r.shards[2].chunk, Some(chunk));
        std::fs::write(&shard, &orig).unwrap();
    }
    // The final chunk is authenticated at open (length authentication).
    let len = orig.len();
    flip(&shard, len - 3);
    let d = fx.open(&ds).unwrap();
    let e = fx.open_shard(&d, 2).err().unwrap();
    assert!(matches!(e, Error::Integrity { kind: IntegrityKind::ChunkAuth, chunk: Some(_), .. }), "{e}");
}

#[test]
fn truncation_and_trailing_bytes_are_size_mismatches() {
    let fx = Fixture::new();
    let ds = big(&fx, "ds", "ds1");
    let hl = header_len(&ds);
    let shard = ds.join("shard-00000.slk");
    let orig = std::fs::read(&shard).unwrap();
    let body = hl + HEADER_LEN;
    let mut cuts = vec![0, 10, hl, hl + 20, body];
    for k in 0..=(orig.len() - body) / ENC_CHUNK_LEN {
        let b = body + k * ENC_CHUNK_LEN;
        cuts.extend(
            [b.saturating_sub(1), b, b + 1, b + 8000, b + ENC_CHUNK_LEN - 16].into_iter().filter(|&c| c < orig.len()),
        );
    }
    cuts.push(orig.len() - 1);
    for cut in cuts {
        std::fs::write(&shard, &orig[..cut]).unwrap();
        assert_open_fails(&fx, &ds, 0, IntegrityKind::SizeMismatch);
    }
    for extra in [1usize, 16, ENC_CHUNK_LEN] {
        let mut v = orig.clone();
        v.extend(std::iter::repeat_n(0xAA, extra));
        std::fs::write(&shard, &v).unwrap();
        assert_open_fails(&fx, &ds, 0, IntegrityKind::SizeMismatch);
    }
}

#[test]
fn truncation_below_the_manifest_is_caught_by_cobblestone_too() {
    // Without the manifest's size check, every cut still fails in the payload layer.
    use shardlock::primitives::chunked::{decrypt, encrypt};
    let key = [3u8; 32];
    let pt = vec![0x5A; 3 * 16384 + 100];
    let ct = encrypt(shardlock::Backend::default(), &key, b"c", &pt).unwrap();
    for cut in 0..ct.len() {
        if cut % 97 == 0 || (cut + 16400 * 2) % 16400 < 20 || cut > ct.len() - 40 {
            assert!(decrypt(shardlock::Backend::default(), &key, b"c", &ct[..cut]).is_err(), "cut {cut}");
        }
    }
    let mut longer = ct.clone();
    longer.extend_from_slice(&[0u8; 20]);
    assert!(decrypt(shardlock::Backend::default(), &key, b"c", &longer).is_err());
}

#[test]
fn swapped_and_transplanted_chunks_fail_authentication() {
    let fx = Fixture::new();
    let ds = big(&fx, "ds", "ds1");
    let hl = header_len(&ds);
    let body = hl + HEADER_LEN;
    let s0 = ds.join("shard-00000.slk");
    let s1 = ds.join("shard-00001.slk");
    let orig0 = std::fs::read(&s0).unwrap();
    let orig1 = std::fs::read(&s1).unwrap();
    // Swap chunks 0 and 1 of shard 0.
    let mut v = orig0.clone();
    let (a, b) = (body..body + ENC_CHUNK_LEN, body + ENC_CHUNK_LEN..body + 2 * ENC_CHUNK_LEN);
    let c0 = v[a.clone()].to_vec();
    let c1 = v[b.clone()].to_vec();
    v[a].copy_from_slice(&c1);
    v[b].copy_from_slice(&c0);
    std::fs::write(&s0, &v).unwrap();
    assert_read_fails_at(&fx, &ds, 0, 0);
    // Chunk 1 of shard 1 moved into shard 0 at the same position.
    let mut v = orig0.clone();
    let r = body + ENC_CHUNK_LEN..body + 2 * ENC_CHUNK_LEN;
    v[r.clone()].copy_from_slice(&orig1[r]);
    std::fs::write(&s0, &v).unwrap();
    assert_read_fails_at(&fx, &ds, 0, 1);
}

#[test]
fn shard_files_swapped_within_or_across_datasets_are_header_mismatches() {
    let fx = Fixture::new();
    let ds = big(&fx, "ds", "ds1");
    let other = big(&fx, "other", "ds2");
    let s0 = ds.join("shard-00000.slk");
    let s1 = ds.join("shard-00001.slk");
    let orig0 = std::fs::read(&s0).unwrap();
    std::fs::copy(&s1, &s0).unwrap();
    assert_open_fails(&fx, &ds, 0, IntegrityKind::HeaderMismatch);
    std::fs::copy(other.join("shard-00000.slk"), &s0).unwrap();
    // Dataset id "ds2" has the same length as "ds1", so sizes match and the header decides.
    assert_open_fails(&fx, &ds, 0, IntegrityKind::HeaderMismatch);
    std::fs::write(&s0, orig0).unwrap();
    assert!(fx.read_all(&ds).is_ok());
}

#[test]
fn removed_added_and_rolled_back_shards_are_detected() {
    let fx = Fixture::new();
    let ds = big(&fx, "ds", "ds1");
    let old = big(&fx, "old", "ds1"); // an older packing of the same dataset id
    let s1 = ds.join("shard-00001.slk");
    let orig = std::fs::read(&s1).unwrap();

    std::fs::remove_file(&s1).unwrap();
    assert_open_fails(&fx, &ds, 1, IntegrityKind::MissingShard);
    let r = verify(&ds, &fx.trust, &fx.access("ds1"), &VerifyOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(r.shards[1].failure.as_deref(), Some("missing_shard"));

    std::fs::copy(old.join("shard-00001.slk"), &s1).unwrap();
    assert_open_fails(&fx, &ds, 1, IntegrityKind::HeaderMismatch);

    std::fs::write(&s1, &orig).unwrap();
    std::fs::copy(old.join("shard-00002.slk"), ds.join("shard-00003.slk")).unwrap();
    let r = verify(&ds, &fx.trust, &fx.access("ds1"), &VerifyOptions::default(), &mut |_| {}).unwrap();
    assert!(!r.ok);
    let extra = r.shards.iter().find(|s| s.index.is_none()).unwrap();
    assert_eq!((extra.file.as_str(), extra.failure.as_deref()), ("shard-00003.slk", Some("extra_shard")));
}

#[test]
fn dot_files_are_ignored_but_unlisted_shards_are_not() {
    let fx = Fixture::new();
    let ds = big(&fx, "ds", "ds1");
    let verify_ds = || verify(&ds, &fx.trust, &fx.access("ds1"), &VerifyOptions::default(), &mut |_| {}).unwrap();
    // What a macOS copy leaves behind: AppleDouble files beside each file, .DS_Store.
    std::fs::write(ds.join("._shard-00000.slk"), b"\x00\x05\x16\x07AppleDouble").unwrap();
    std::fs::write(ds.join(".DS_Store"), b"Bud1").unwrap();
    let r = verify_ds();
    assert!(r.ok, "{:?}", r.shards);
    assert_eq!(r.shards.len(), 3);
    // An unlisted shard file is still reported, and only it.
    std::fs::copy(ds.join("shard-00002.slk"), ds.join("shard-99999.slk")).unwrap();
    let r = verify_ds();
    assert!(!r.ok);
    let extra: Vec<_> = r.shards.iter().filter(|s| s.index.is_none()).collect();
    assert_eq!(extra.len(), 1, "{extra:?}");
    assert_eq!((extra[0].file.as_str(), extra[0].failure.as_deref()), ("shard-99999.slk", Some("extra_shard")));
    // A forced pack into the directory leaves the dot-files alone and removes the old shards.
    assert_eq!(big(&fx, "ds", "ds1"), ds);
    assert!(ds.join("._shard-00000.slk").exists() && ds.join(".DS_Store").exists());
    assert!(!ds.join("shard-99999.slk").exists());
    assert!(verify_ds().ok);
}

#[test]
fn edited_or_foreign_manifests_fail_the_signature() {
    let fx = Fixture::new();
    let ds = big(&fx, "ds", "ds1");
    let mpath = ds.join("manifest.json");
    let orig = std::fs::read_to_string(&mpath).unwrap();
    // Drop a shard from the list: records no longer add up, but the signature fails first.
    let edited = orig.replacen("\"records\": 64", "\"records\": 63", 1);
    assert_ne!(edited, orig);
    std::fs::write(&mpath, &edited).unwrap();
    assert!(matches!(fx.open(&ds), Err(Error::ManifestSignature { .. })));
    std::fs::write(&mpath, &orig).unwrap();
    let stranger = shardlock::IssuerKey::generate().unwrap().trust_anchor();
    let e = shardlock::Dataset::open(&ds, &stranger).err().unwrap();
    assert!(matches!(e, Error::ManifestSignature { .. }));
    assert!(e.to_string().contains("issuer key"), "{e}");
    // Garbage manifest: a format error, not a panic.
    std::fs::write(&mpath, b"{\"format\": 1").unwrap();
    assert!(matches!(fx.open(&ds), Err(Error::Format { what: "manifest", .. })));
}

#[test]
fn wrapped_dek_must_be_80_lowercase_hex_digits() {
    let fx = Fixture::new();
    let ds = big(&fx, "ds", "ds1");
    let good = fx.open(&ds).unwrap().manifest().shards[1].wrapped_dek.clone();
    assert_eq!(good.len(), 80);
    let cases = [
        good[..64].to_owned(),        // 32 bytes: used to pass, failing only when unwrapped
        format!("{good}0000"),        // 42 bytes
        good[..79].to_owned(),        // odd
        good.to_uppercase(),          // uppercase
        format!("{}zz", &good[..78]), // not hex
        String::new(),
    ];
    for bad in cases {
        fx.resign(&ds, |m| m.shards[1].wrapped_dek = bad.clone());
        match fx.open(&ds) {
            Err(Error::Format { what: "manifest", detail, .. }) => {
                assert!(detail.contains("shard 1: wrapped_dek must be 80 lowercase hex digits"), "{bad:?}: {detail}")
            }
            Err(e) => panic!("{bad:?}: expected a manifest format error, got {e}"),
            Ok(_) => panic!("{bad:?}: a manifest with this wrapped_dek opened"),
        }
    }
    fx.resign(&ds, |m| m.shards[1].wrapped_dek = good.clone());
    assert!(fx.read_all(&ds).is_ok());
}

/// A signed manifest whose sizes overflow u64 (`plaintext_bytes` near 2^64) is a typed
/// format error, not an arithmetic panic (debug builds) or a wrapped size (release).
#[test]
fn manifest_sizes_that_overflow_are_a_format_error() {
    let fx = Fixture::new();
    let ds = big(&fx, "ds", "ds1");
    for huge in [u64::MAX, u64::MAX - 16, u64::MAX / 16 * 15] {
        fx.resign(&ds, |m| m.shards[0].plaintext_bytes = huge);
        match fx.open(&ds) {
            Err(Error::Format { what: "manifest", detail, .. }) => assert!(detail.contains("shard 0"), "{detail}"),
            Err(e) => panic!("plaintext_bytes {huge}: expected a manifest format error, got {e}"),
            Ok(_) => panic!("plaintext_bytes {huge}: the manifest opened"),
        }
    }
}

#[test]
fn rolled_back_manifest_is_refused_with_min_generation() {
    let fx = Fixture::new();
    let ds = big(&fx, "ds", "ds1");
    let old_manifest = std::fs::read(ds.join("manifest.json")).unwrap();
    let new_ring = Keyring::create(&fx.path("new.json")).unwrap();
    let m = shardlock::rotate(&ds, &*fx.keyring, &new_ring, &fx.issuer).unwrap();
    assert_eq!(m.generation, 2);
    std::fs::write(ds.join("manifest.json"), old_manifest).unwrap();
    let opts = VerifyOptions { min_generation: Some(2), ..Default::default() };
    assert!(matches!(
        verify(&ds, &fx.trust, &fx.access("ds1"), &opts, &mut |_| {}),
        Err(Error::Rollback { generation: 1, min: 2, .. })
    ));
}

#[test]
fn wrong_kek_and_bad_keyrings_are_key_errors() {
    let fx = Fixture::new();
    let ds = big(&fx, "ds", "ds1");
    let other = std::sync::Arc::new(Keyring::create(&fx.path("other.json")).unwrap());
    let e = verify(&ds, &fx.trust, &fx.access_with("ds1", other), &VerifyOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(e.shards[0].failure.as_deref(), Some("key_unavailable"));
    // Same KEK id, different key bytes: the KWP integrity check refuses the unwrap.
    let text = std::fs::read_to_string(fx.path("keyring.json")).unwrap();
    let key_hex = text.split("\"key\": \"").nth(1).unwrap()[..64].to_owned();
    let forged = text.replace(&key_hex, &"ab".repeat(32));
    let forged_path = fx.path("forged.json");
    shardlock::write_new_file(&forged_path, forged.as_bytes(), 0o600).unwrap();
    let ring = std::sync::Arc::new(Keyring::load(&forged_path).unwrap());
    let r = verify(&ds, &fx.trust, &fx.access_with("ds1", ring), &VerifyOptions::default(), &mut |_| {}).unwrap();
    assert!(r.shards.iter().all(|s| s.failure.as_deref() == Some("key_unavailable")));
    assert!(!r.shards[0].error.as_ref().unwrap().contains(&key_hex));
    // Corrupted keyring file.
    let bad = fx.path("bad.json");
    shardlock::write_new_file(&bad, b"{\"format\":\"shardlock-keyring/1\",\"active\":", 0o600).unwrap();
    assert!(matches!(Keyring::load(&bad), Err(Error::Format { what: "keyring", .. })));
    // Group-readable keyring.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(fx.path("keyring.json"), std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(matches!(Keyring::load(&fx.path("keyring.json")), Err(Error::InsecurePermissions { mode: 0o640, .. })));
}

#[test]
fn bad_pack_inputs_are_input_errors() {
    let fx = Fixture::new();
    let a = fx.path("a.npy");
    let b = fx.path("b.npy");
    write_npy(&a, "<f4", &[4, 2], &[0u8; 32]);
    write_npy(&b, "<i8", &[3], &[0u8; 24]);
    let pack = |inputs: &[std::path::PathBuf]| {
        pack_paths(&fx.path("out"), inputs, PackOptions::new("d"), &*fx.keyring, &fx.issuer, &mut |_| {})
    };
    let e = pack(&[a.clone(), b.clone()]).unwrap_err();
    assert!(matches!(&e, Error::Input { path, .. } if path == &b), "{e}");
    let c = fx.path("c.npy");
    write_npy(&c, "<c8", &[4], &[0u8; 32]);
    let e = pack(std::slice::from_ref(&c)).unwrap_err();
    assert!(e.to_string().contains("unsupported dtype"), "{e}");
    let big_endian = fx.path("be.npy");
    write_npy(&big_endian, ">f4", &[4], &[0u8; 16]);
    assert!(matches!(pack(&[big_endian]), Err(Error::Input { .. })));
    let short = fx.path("short.npy");
    write_npy(&short, "<f4", &[4], &[0u8; 15]);
    assert!(matches!(pack(&[short]), Err(Error::Input { .. })));
    std::fs::write(fx.path("junk.npy"), b"\x93NUMPY\x01").unwrap();
    assert!(matches!(pack(&[fx.path("junk.npy")]), Err(Error::Input { .. })));
    let empty = fx.path("empty.npy");
    write_npy(&empty, "<f4", &[0], &[]);
    assert!(pack(&[empty]).unwrap_err().to_string().contains("empty input"));
    std::fs::create_dir(fx.path("emptydir")).unwrap();
    assert!(pack(&[fx.path("emptydir")]).unwrap_err().to_string().contains("empty input"));
    assert!(matches!(pack(&[]), Err(Error::Input { .. })));
    // No failed pack left anything that reads as a dataset.
    assert!(fx.open(&fx.path("out")).is_err());
}

#[test]
fn existing_dataset_is_refused_unless_forced_and_failed_packs_leave_no_dataset() {
    let fx = Fixture::new();
    let a = fx.path("a.npy");
    write_npy(&a, "<u2", &[5, 3], &[7u8; 30]);
    let out = fx.path("out");
    let run = |force| {
        let mut o = PackOptions::new("d");
        o.force = force;
        pack_paths(&out, std::slice::from_ref(&a), o, &*fx.keyring, &fx.issuer, &mut |_| {})
    };
    run(false).unwrap();
    assert!(matches!(run(false), Err(Error::AlreadyExists { .. })));
    run(true).unwrap();
    assert_eq!(fx.read_all(&out).unwrap().len(), 5);

    // A pack that fails half way (a sample of the wrong size after one shard was
    // written) leaves no manifest, so nothing reads as complete.
    let schema = shardlock::Schema::new(vec![shardlock::Field::tensor("x", shardlock::DType::U8, &[4])]).unwrap();
    let mut o = PackOptions::new("d");
    o.force = true;
    o.shard_size = 8;
    let mut w = shardlock::DatasetWriter::create(&out, schema, o, &*fx.keyring, &fx.issuer).unwrap();
    for _ in 0..5 {
        w.write_sample(&[&[1, 2, 3, 4]]).unwrap();
    }
    assert!(matches!(w.write_sample(&[&[1, 2, 3]]), Err(Error::Schema { sample: 5, .. })));
    drop(w);
    assert!(std::fs::read_dir(&out).unwrap().any(|e| e.unwrap().file_name() == "shard-00000.slk"));
    let e = fx.open(&out).err().unwrap();
    assert!(e.to_string().contains("no manifest.json"), "{e}");
}

/// FORMAT.md 7.5: a `transit:` KEK id takes the hex of a Transit ciphertext, an even
/// number of 2 to 1,024 lowercase hex digits; AES-KWP ids keep exactly 80.
#[test]
fn a_transit_wrapped_dek_is_bounded_hex_and_only_for_transit_kek_ids() {
    let fx = Fixture::new();
    let ds = big(&fx, "ds", "ds1");
    let ct = hex::encode("vault:v1:c2hhcmRsb2Nr".repeat(3));
    for (kek, wrapped, ok) in [
        ("transit:transit/k", ct.clone(), true),
        ("transit:transit/k", "ab".repeat(512), true),
        ("transit:transit/k", "ab".repeat(513), false),
        ("transit:transit/k", format!("{ct}0"), false),
        ("transit:transit/k", ct.to_uppercase(), false),
        ("transit:transit/k", String::new(), false),
        ("kek-0123456789abcdef", ct.clone(), false),
    ] {
        fx.resign(&ds, |m| {
            m.shards[1].kek_id = kek.into();
            m.shards[1].wrapped_dek = wrapped.clone();
        });
        match (fx.open(&ds), ok) {
            (Ok(_), true) => {}
            (Err(Error::Format { what: "manifest", detail, .. }), false) => {
                assert!(detail.contains("shard 1: wrapped_dek"), "{kek} {}: {detail}", wrapped.len())
            }
            (r, _) => panic!("{kek} with {} hex digits: {:?}", wrapped.len(), r.map(|_| "opened")),
        }
    }
}
