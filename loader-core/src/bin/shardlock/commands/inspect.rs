//! `shardlock inspect`: a dataset's manifest, summarised without any key.

use std::process::ExitCode;

use shardlock::Error;
use shardlock::FieldKind;
use shardlock::TrustAnchor;

use crate::cli::InspectArgs;
use crate::output::print_json;

pub(crate) fn inspect_cmd(a: InspectArgs) -> Result<ExitCode, Error> {
    let trust = a.trust.as_deref().map(TrustAnchor::load).transpose()?;
    let i = shardlock::inspect_at(&a.dir, trust.as_ref(), &a.store.options()?)?;
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
            "created": crate::output::rfc3339(m.created_unix),
            "issuer_key_id": m.issuer_key_id, "signature": i.signature_valid, "consistency_error": i.consistency_error,
            "schema": m.schema, "records": m.records, "plaintext_bytes": plain, "file_bytes": bytes,
            "metadata": m.metadata, "classes": m.classes(),
            "shards": m.shards.iter().map(|s| serde_json::json!({
                "index": s.index, "file": s.file, "records": s.records, "plaintext_bytes": s.plaintext_bytes,
                "file_bytes": s.file_bytes, "sha256": s.sha256, "kek_id": s.kek_id,
            })).collect::<Vec<_>>(),
        }));
    } else {
        println!("dataset     {}", m.dataset_id);
        println!(
            "generation  {} (signed {} by issuer {})",
            m.generation,
            crate::output::rfc3339(m.created_unix),
            m.issuer_key_id
        );
        println!("signature   {signature}");
        if let Some(e) = &i.consistency_error {
            println!("consistency {e}");
        }
        println!(
            "records     {} in {} shard(s), {} plaintext, {} on disk",
            m.records,
            m.shards.len(),
            crate::output::bytes(plain),
            crate::output::bytes(bytes)
        );
        println!("fields");
        for f in &m.schema.fields {
            let stored = f.compress.map(|c| format!(" ({} per value)", c.name())).unwrap_or_default();
            match &f.kind {
                FieldKind::Tensor { dtype, shape } => {
                    println!("  {:<16} {} {:?}{stored}", f.name, dtype.name(), shape)
                }
                FieldKind::Bytes => println!("  {:<16} bytes{stored}", f.name),
                FieldKind::List { dtype } => println!("  {:<16} list<{}>{stored}", f.name, dtype.name()),
            }
        }
        // Names come from the manifest (shown even when its signature fails): no control
        // characters reach the terminal.
        let printable = |s: &str| -> String { s.chars().map(|c| if c.is_control() { '?' } else { c }).collect() };
        if let Some(c) = m.classes() {
            let shown: Vec<String> = c.iter().take(10).map(|n| printable(n)).collect();
            let more = if c.len() > 10 { format!(", … {} more", c.len() - 10) } else { String::new() };
            println!("classes     {}: {}{more}", c.len(), shown.join(", "));
        }
        for (k, v) in m.metadata.iter().filter(|(k, _)| *k != "classes") {
            let text = printable(&v.to_string());
            let text: String =
                if text.chars().count() > 120 { text.chars().take(120).collect::<String>() + "…" } else { text };
            println!("metadata    {k} = {text}");
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
