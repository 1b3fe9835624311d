//! `shardlock pack`: `.npy` files, a directory of files, WebDataset tars or an image folder into an encrypted dataset.

use shardlock::Error;
use shardlock::IssuerKey;
use shardlock::PackOptions;

use crate::cli::PackArgs;
use crate::output::{bar, print_json};

pub(crate) fn pack_cmd(a: PackArgs) -> Result<(), Error> {
    let keys = shardlock::open_provider(&a.keyring)?;
    let src = open_inputs(&a)?;
    let mut opts = PackOptions {
        dataset_id: a.dataset_id,
        shard_size: a.shard_size,
        force: a.force,
        backend: a.backend,
        generation: a.generation,
        threads: a.threads.map_or_else(shardlock::default_pack_threads, usize::from),
        metadata: a
            .metadata
            .iter()
            .map(|kv| {
                let (k, v) = kv.split_once('=').ok_or_else(|| {
                    Error::InvalidArgument(format!("--metadata {kv:?}: give NAME=VALUE (VALUE as JSON or text)"))
                })?;
                let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_owned()));
                Ok((k.to_owned(), value))
            })
            .collect::<Result<_, Error>>()?,
        zstd_levels: Default::default(),
    };
    let mut schema = src.schema()?;
    shardlock::apply_compression(&mut schema, &mut opts, &a.compress)?;
    for (k, v) in src.metadata() {
        if opts.metadata.contains_key(&k) {
            return Err(Error::InvalidArgument(format!(
                "--metadata {k}=...: the input sets {k:?} itself (an image folder's class names); leave it out"
            )));
        }
        opts.metadata.insert(k, v);
    }
    if a.part.is_none() && a.out.to_str().is_some_and(|o| o.contains("://")) {
        return Err(Error::InvalidArgument(format!(
            "--out {}: only a part (--part) is packed straight to object storage; pack the dataset into a directory, \
             then `shardlock upload` it",
            a.out.display()
        )));
    }
    let issuer;
    let mut w = match (&a.part, &a.trust, &a.issuer_key) {
        (Some(part), Some(trust), _) => {
            let part = parse_part(part)?;
            let trust = shardlock::TrustAnchor::load(trust)?;
            let out = a.out.to_str().ok_or_else(|| Error::InvalidArgument("--out is not UTF-8".into()))?;
            let remote = a.store.options()?;
            shardlock::DatasetWriter::create_part_at(out, schema, opts, &*keys, &trust, part, &remote)?
        }
        (None, _, Some(key)) => {
            issuer = IssuerKey::load(key)?;
            shardlock::DatasetWriter::create(&a.out, schema, opts, &*keys, &issuer)?
        }
        _ => return Err(Error::InvalidArgument("give --issuer-key, or --part with --trust".into())),
    };
    let pb = match src.samples() {
        Some(n) => bar(n, a.json, "packing {bar:40} {pos}/{len} samples [{elapsed_precise}, {per_sec}]"),
        None => bar(0, a.json, "packing {spinner} {pos} samples [{elapsed_precise}, {per_sec}]"),
    };
    let t = std::time::Instant::now();
    src.write_into(&mut w, &mut |n| pb.set_position(n))?;
    let bytes = w.bytes_in();
    let m = w.finish()?;
    pb.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        print_json(&serde_json::json!({
            "dataset": m.dataset_id, "generation": m.generation, "out": a.out, "records": m.records, "shards": m.shards.len(),
            "plaintext_bytes": bytes, "seconds": secs, "gb_per_s": bytes as f64 / secs / 1e9,
        }));
    } else if a.part.is_some() {
        println!(
            "packed part {} of {} records ({}) into {} shard(s) in {} ({:.2} GB/s); run `shardlock assemble` once every part is in",
            m.shards.first().map_or(0, |s| s.index),
            m.records,
            crate::output::bytes(bytes),
            m.shards.len(),
            a.out.display(),
            bytes as f64 / secs / 1e9,
        );
    } else {
        println!(
            "packed {} records ({}) into {} shard(s) in {} ({:.2} GB/s); manifest generation {} signed by issuer {}",
            m.records,
            crate::output::bytes(bytes),
            m.shards.len(),
            a.out.display(),
            bytes as f64 / secs / 1e9,
            m.generation,
            m.issuer_key_id
        );
    }
    Ok(())
}

/// The inputs as `--format` and `--parse` say.
fn open_inputs(a: &PackArgs) -> Result<shardlock::InputSource, Error> {
    use crate::cli::PackFormat;
    use shardlock::InputFormat;
    let format = match a.format {
        PackFormat::Auto => InputFormat::Auto,
        PackFormat::Npy => InputFormat::Npy,
        PackFormat::Files => InputFormat::Files,
        PackFormat::Wds => InputFormat::WebDataset,
        PackFormat::Imagefolder => InputFormat::ImageFolder,
        PackFormat::Parquet | PackFormat::Arrow => {
            return Err(Error::InvalidArgument(
                "the CLI does not read Parquet or Arrow yet: pack them from Python with shardlock.pack(path, out,                  keyring=..., issuer_key=..., dataset_id=...) (pip install pyarrow)"
                    .into(),
            ))
        }
    };
    let parse = a
        .parse
        .iter()
        .map(|p| match p.split_once('=') {
            Some((ext, "i64")) if !ext.is_empty() => Ok(ext.to_owned()),
            _ => Err(Error::InvalidArgument(format!("--parse {p:?}: give EXT=i64 (e.g. cls=i64)"))),
        })
        .collect::<Result<Vec<_>, Error>>()?;
    shardlock::InputSource::open(&a.inputs, format, &parse)
}

/// `FIRST[:COUNT]` of `--part`.
fn parse_part(s: &str) -> Result<shardlock::Part, Error> {
    let bad = || Error::InvalidArgument(format!("--part {s:?}: give FIRST or FIRST:COUNT (shard indices, COUNT >= 1)"));
    let (first, count) = match s.split_once(':') {
        Some((f, c)) => (f, Some(c)),
        None => (s, None),
    };
    let first_shard = first.parse().map_err(|_| bad())?;
    let max_shards = count.map(|c| c.parse::<u32>().ok().filter(|&c| c >= 1).ok_or_else(bad)).transpose()?;
    Ok(shardlock::Part { first_shard, max_shards })
}

/// `shardlock assemble`: verifies every part and signs the manifest.
pub(crate) fn assemble_cmd(a: crate::cli::AssembleArgs) -> Result<(), Error> {
    let issuer = IssuerKey::load(&a.issuer_key)?;
    let keys = shardlock::open_providers(&a.keyring)?;
    let at = a.dir.to_str().ok_or_else(|| Error::InvalidArgument("the location is not UTF-8".into()))?;
    let m = shardlock::assemble_at(at, &issuer, &*keys, a.generation, &a.store.options()?)?;
    if a.json {
        print_json(&serde_json::json!({
            "dataset": m.dataset_id, "generation": m.generation, "dir": a.dir, "records": m.records, "shards": m.shards.len(),
        }));
    } else {
        println!(
            "assembled {} records in {} shard(s) in {}; manifest generation {} signed by issuer {}",
            m.records,
            m.shards.len(),
            a.dir.display(),
            m.generation,
            m.issuer_key_id
        );
    }
    Ok(())
}
