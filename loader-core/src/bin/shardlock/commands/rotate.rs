//! `shardlock rotate`: every DEK rewrapped under another provider's KEK, manifest re-signed.

use shardlock::Error;
use shardlock::IssuerKey;

use crate::cli::RotateArgs;
use crate::output::print_json;

pub(crate) fn rotate_cmd(a: RotateArgs) -> Result<(), Error> {
    let old = shardlock::open_providers(&a.keyring)?;
    let new = shardlock::open_provider(&a.new_keyring)?;
    let issuer = IssuerKey::load(&a.issuer_key)?;
    let m = shardlock::rotate(&a.dir, &*old, &*new, &issuer)?;
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
    Ok(())
}
