//! `shardlock pack`: `.npy` files or a directory of files into an encrypted dataset.

use shardlock::Error;
use shardlock::IssuerKey;
use shardlock::PackOptions;

use crate::cli::PackArgs;
use crate::output::{bar, print_json};

pub(crate) fn pack_cmd(a: PackArgs) -> Result<(), Error> {
    let keys = shardlock::open_provider(&a.keyring)?;
    let issuer = IssuerKey::load(&a.issuer_key)?;
    let src = shardlock::InputSource::from_paths(&a.inputs)?;
    let opts = PackOptions {
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
    };
    let mut w = shardlock::DatasetWriter::create(&a.out, src.schema()?, opts, &*keys, &issuer)?;
    let pb = bar(src.len(), a.json, "packing {bar:40} {pos}/{len} samples [{elapsed_precise}, {per_sec}]");
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
