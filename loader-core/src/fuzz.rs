//! The read-path fuzz target's harness (`cargo fuzz run read_path`): manifest, header,
//! index and payload through [`Dataset`] and its shard reader, with a valid signature
//! and each shard's DEK (released once through [`Access`]), so that the fuzzer gets past the checks a forger cannot pass and reaches the
//! parsers and the chunk reader behind them.
//!
//! A small dataset (two shards of several chunks, a tensor field and a bytes field) is
//! packed once per process into a private temporary directory. Each input picks a mode:
//! - shard bytes: XOR edits (and an optional truncation) of one shard file; a manifest
//!   whose `file_bytes` follows the new length is re-signed, so the size check passes.
//!   Every record that still reads must equal the packed one: nothing unauthenticated
//!   is ever released.
//! - manifest fields: edits of the parsed manifest (counts, sizes, file names, shard
//!   index, ids, schema), re-signed with the issuer key, as a buggy or hostile writer
//!   holding the key could produce; reads must fail with a typed error or succeed, with
//!   every field of the declared length.
//! - manifest text: a splice into the manifest body's JSON, re-signed.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use crate::access::Access;
use crate::auth::{Authorizer, AuthorizerConfig, Operation, ShardSet, Token, TokenSpec};
use crate::crypto::aead::Backend;
use crate::dataset::{manifest_path, write_signed_manifest, Dataset};
use crate::format::{DType, Field, Manifest, Schema, SignedManifest};
use crate::keys::{Dek, IssuerKey, Keyring};
use crate::pack::{DatasetWriter, PackOptions};

struct Fixture {
    work: PathBuf,
    issuer: IssuerKey,
    /// Each shard's DEK, released once through the gate: a Biscuit evaluation per shard
    /// open would make the harness ten times slower without reaching more of the reader.
    deks: Vec<Dek>,
    manifest: Manifest,
    shards: Vec<(String, Vec<u8>)>,
    records: Vec<Vec<Vec<u8>>>,
}

const DATASET: &str = "fuzz";

fn fixture() -> &'static Fixture {
    static FX: OnceLock<Fixture> = OnceLock::new();
    FX.get_or_init(|| {
        // One private directory per fuzz process (tmpfs where there is one), kept for
        // the process's life.
        let shm = std::path::Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        // libFuzzer ends with exit(), so nothing drops it: remove those of dead processes.
        if let Ok(entries) = std::fs::read_dir(&base) {
            for e in entries.flatten() {
                let name = e.file_name();
                let pid = name.to_str().and_then(|n| n.strip_prefix("shardlock-fuzz-"));
                if pid.is_some_and(|p| !std::path::Path::new("/proc").join(p).exists()) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let root = base.join(format!("shardlock-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::DirBuilder::new().mode(0o700).create(&root).expect("fuzz directory");
        let keyring = Arc::new(Keyring::create(&root.join("keyring.json")).expect("keyring"));
        let issuer = IssuerKey::generate().expect("issuer key");
        let schema = Schema::new(vec![Field::tensor("x", DType::U8, &[3000]), Field::bytes("tag")]).expect("schema");
        let records: Vec<Vec<Vec<u8>>> = (0..14)
            .map(|i| {
                let x = (0..3000).map(|j| ((i * 31 + j) % 253) as u8).collect();
                vec![x, format!("record-{i}-{}", "t".repeat(i * 97)).into_bytes()]
            })
            .collect();
        let packed = root.join("packed");
        let mut opts = PackOptions::new(DATASET);
        opts.shard_size = 7 * 3000;
        let mut w = DatasetWriter::create(&packed, schema, opts, &*keyring, &issuer).expect("writer");
        for r in &records {
            w.write_sample(&[&r[0], &r[1]]).expect("record");
        }
        let manifest = w.finish().expect("finish");
        let shards = manifest
            .shards
            .iter()
            .map(|e| (e.file.clone(), std::fs::read(packed.join(&e.file)).expect("shard")))
            .collect();
        let spec = TokenSpec {
            dataset: DATASET.into(),
            principal: "fuzz".into(),
            shards: ShardSet::All,
            ops: vec![Operation::Read, Operation::Verify],
            expires: std::time::SystemTime::now() + std::time::Duration::from_secs(365 * 86400),
            not_before: None,
            min_generation: None,
        };
        let token = Token::issue(&issuer, &spec).expect("token");
        let authorizer =
            Authorizer::new(&issuer.trust_anchor(), Some(token), AuthorizerConfig::default()).expect("authorizer");
        let access = Access::new(authorizer, keyring);
        let ds = Dataset::open(&packed, &issuer.trust_anchor()).expect("packed dataset");
        let deks = (0..manifest.shards.len() as u32)
            .map(|i| access.release_dek(&ds, i, Operation::Read).expect("DEK"))
            .collect();
        let work = root.join("work");
        std::fs::create_dir(&work).expect("work directory");
        Fixture { work, issuer, deks, manifest, shards, records }
    })
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn rest(&mut self) -> &[u8] {
        std::mem::take(&mut self.0)
    }
}

fn write_shards(fx: &Fixture, edited: Option<(usize, &[u8])>) {
    for (i, (file, bytes)) in fx.shards.iter().enumerate() {
        let bytes = match edited {
            Some((j, b)) if j == i => b,
            _ => bytes,
        };
        std::fs::write(fx.work.join(file), bytes).expect("write shard");
    }
}

/// A small interesting value for a numeric manifest field.
fn number(c: &mut Cursor<'_>, orig: u64) -> u64 {
    match c.u8() % 6 {
        0 => orig.wrapping_add(1),
        1 => orig.wrapping_sub(1),
        2 => 0,
        3 => u64::MAX,
        4 => orig.wrapping_mul(2),
        _ => c.u64(),
    }
}

fn edit_manifest(c: &mut Cursor<'_>, m: &mut Manifest) {
    let n = m.shards.len();
    while !c.is_empty() {
        let s = usize::from(c.u8()) % n;
        match c.u8() % 12 {
            0 => m.records = number(c, m.records),
            1 => m.shards[s].records = number(c, m.shards[s].records),
            2 => m.shards[s].plaintext_bytes = number(c, m.shards[s].plaintext_bytes),
            3 => m.shards[s].file_bytes = number(c, m.shards[s].file_bytes),
            4 => m.shards[s].index = number(c, u64::from(m.shards[s].index)) as u32,
            5 => m.shards.swap(0, n - 1),
            6 => {
                m.shards[s].file =
                    ["../keyring.json", "/etc/passwd", "", "a/b", "x.shard"][usize::from(c.u8()) % 5].into()
            }
            7 => m.shards[s].id = m.shards[(s + 1) % n].id.clone(),
            8 => {
                let dup = m.shards[s].clone();
                m.shards.push(dup);
            }
            9 => {
                m.shards.truncate(1);
                return;
            }
            10 => m.generation = number(c, m.generation),
            _ => {
                // Another field layout over the same bytes.
                let dtypes = [DType::U8, DType::U16, DType::F32, DType::F64];
                let dims = [3000 / (1 + u64::from(c.u8() % 8)), 1];
                if let Ok(schema) = Schema::new(vec![
                    Field::tensor("x", dtypes[usize::from(c.u8()) % 4], &dims[..1 + usize::from(c.u8() % 2)]),
                    Field::bytes("tag"),
                ]) {
                    m.schema = schema;
                }
            }
        }
    }
}

/// (shard, record, fields) of a record that read.
type ReadRecord = (u32, u64, Vec<Vec<u8>>);

/// Opens the work directory and reads every record of every shard through the gate;
/// returns (shard, record, fields) for each record that read (None: the dataset did
/// not open).
fn read_all(fx: &Fixture) -> Option<Vec<ReadRecord>> {
    let ds = Dataset::open(&fx.work, &fx.issuer.trust_anchor()).ok()?;
    let mut out = Vec::new();
    for shard in 0..ds.manifest().shards.len() as u32 {
        let Some(dek) = fx.deks.get(shard as usize) else { continue };
        let Ok(mut reader) = ds.open_shard(shard, dek, Backend::default()) else { continue };
        for r in 0..reader.len().min(64) {
            let fields = (0..ds.manifest().schema.fields.len()).map(|f| reader.field_len(r, f)).collect::<Vec<_>>();
            if let Ok(rec) = reader.read_record(r) {
                for (v, len) in rec.iter().zip(&fields) {
                    assert_eq!(v.len() as u64, *len, "field length differs from the index");
                }
                out.push((shard, r, rec.iter().map(|v| v.to_vec()).collect()));
            }
        }
    }
    Some(out)
}

/// The harness; see the module documentation.
pub(crate) fn read_path(data: &[u8]) {
    let fx = fixture();
    let mut c = Cursor(data);
    match c.u8() % 3 {
        0 => {
            let s = usize::from(c.u8()) % fx.shards.len();
            let mut bytes = fx.shards[s].1.clone();
            let truncate = c.u8();
            while !c.is_empty() && !bytes.is_empty() {
                let at = c.u32() as usize % bytes.len();
                bytes[at] ^= c.u8().max(1);
            }
            if truncate & 0x80 != 0 && !bytes.is_empty() {
                let keep = (usize::from(truncate & 0x7f) * 131) % bytes.len();
                bytes.truncate(keep);
            }
            write_shards(fx, Some((s, &bytes)));
            let mut m = fx.manifest.clone();
            m.shards[s].file_bytes = bytes.len() as u64;
            write_signed_manifest(&fx.work, &m, &fx.issuer).expect("write manifest");
            // The manifest is the packed one (but for the size): every record that
            // authenticates is the packed record at its place.
            let first: Vec<u64> = fx
                .manifest
                .shards
                .iter()
                .scan(0, |n, e| {
                    let at = *n;
                    *n += e.records;
                    Some(at)
                })
                .collect();
            for (shard, r, got) in read_all(fx).unwrap_or_default() {
                let want = &fx.records[(first[shard as usize] + r) as usize];
                assert_eq!(
                    &got, want,
                    "shard {shard} record {r} read from a tampered shard differs from the packed one"
                );
            }
        }
        1 => {
            write_shards(fx, None);
            let mut m = fx.manifest.clone();
            edit_manifest(&mut c, &mut m);
            if write_signed_manifest(&fx.work, &m, &fx.issuer).is_ok() {
                let _ = read_all(fx);
            }
        }
        _ => {
            write_shards(fx, None);
            let body = serde_json::to_vec_pretty(&fx.manifest).expect("manifest body");
            let at = c.u32() as usize % (body.len() + 1);
            let cut = usize::from(c.u8() % 32);
            let mut edited = body[..at].to_vec();
            edited.extend_from_slice(c.rest());
            edited.extend_from_slice(&body[(at + cut).min(body.len())..]);
            let Ok(sig) = fx.issuer.sign(&SignedManifest::signed_message(&edited)) else { return };
            let Ok(file) = SignedManifest::encode(&edited, &sig) else { return };
            std::fs::write(manifest_path(&fx.work), file).expect("write manifest");
            let _ = read_all(fx);
        }
    }
}
