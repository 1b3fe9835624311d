//! `shardlock token`: issue, attenuate, inspect and revoke access tokens.

use shardlock::Error;
use shardlock::{Attenuation, Operation, ShardSet, Token, TokenSpec};
use shardlock::{IssuerKey, TrustAnchor};

use crate::cli::TokenCmd;
use crate::output::print_json;

pub(crate) fn token_cmd(t: TokenCmd) -> Result<(), Error> {
    match t {
        TokenCmd::Issue { issuer_key, dataset, principal, shards, ops, ttl, not_before, min_generation, out } => {
            let issuer = IssuerKey::load(&issuer_key)?;
            let expires = shardlock::time_after(std::time::SystemTime::now(), shardlock::parse_ttl(&ttl)?)?;
            let spec = TokenSpec {
                dataset,
                principal,
                shards: ShardSet::parse(&shards)?,
                ops: Operation::parse_list(&ops)?,
                expires,
                not_before: not_before.as_deref().map(shardlock::parse_time).transpose()?,
                min_generation,
            };
            let token = Token::issue(&issuer, &spec)?;
            token.save(&out)?;
            println!(
                "wrote token {} (mode 0600) for {:?} on dataset {:?}, shards {shards}, ops {ops}{}, expires {}; revocation id {}",
                out.display(),
                spec.principal,
                spec.dataset,
                min_generation.map(|g| format!(", generation >= {g}")).unwrap_or_default(),
                humantime::format_rfc3339_seconds(expires),
                token.revocation_id()
            );
        }
        TokenCmd::Attenuate { token, trust, shards, ops, ttl, min_generation, out } => {
            let trust = TrustAnchor::load(&trust)?;
            let t = Token::load(&token, &trust)?;
            let shards = shards.as_deref().map(ShardSet::parse).transpose()?;
            let ops = ops.as_deref().map(Operation::parse_list).transpose()?;
            let expires = ttl
                .as_deref()
                .map(shardlock::parse_ttl)
                .transpose()?
                .map(|d| shardlock::time_after(std::time::SystemTime::now(), d))
                .transpose()?;
            let narrow = Attenuation { shards, ops, expires, min_generation };
            if narrow.is_empty() {
                return Err(Error::InvalidArgument(
                    "nothing to narrow: give --shards, --ops, --ttl and/or --min-generation".into(),
                ));
            }
            let narrowed = t.attenuate(&narrow)?;
            narrowed.save(&out)?;
            println!(
                "wrote attenuated token {} (mode 0600); revocation id {}",
                out.display(),
                narrowed.revocation_id()
            );
        }
        TokenCmd::Inspect { token, trust, json } => {
            let (blocks, ids, verified) = match trust {
                Some(tp) => {
                    let t = Token::load(&token, &TrustAnchor::load(&tp)?)?;
                    (t.blocks(), t.revocation_ids(), Some(true))
                }
                None => {
                    let (b, i) = shardlock::inspect_unverified(&token)?;
                    (b, i, None)
                }
            };
            if json {
                print_json(&serde_json::json!({"verified": verified, "blocks": blocks, "revocation_ids": ids}));
            } else {
                println!(
                    "signature: {}",
                    if verified.is_some() {
                        "valid (verified against the trust anchor)"
                    } else {
                        "not verified (pass --trust FILE.pub)"
                    }
                );
                for (i, (b, id)) in blocks.iter().zip(&ids).enumerate() {
                    println!("block {i} ({}) revocation id {id}", if i == 0 { "authority" } else { "attenuation" });
                    for line in b.lines().filter(|l| !l.trim().is_empty()) {
                        println!("    {line}");
                    }
                }
            }
        }
        TokenCmd::Revoke { token, deny_list } => {
            let (_, ids) = shardlock::inspect_unverified(&token)?;
            let id = ids.last().cloned().ok_or_else(|| Error::InvalidArgument("token has no blocks".into()))?;
            shardlock::DenyList::append(
                &deny_list,
                &id,
                &format!("revoked {}", humantime::format_rfc3339_seconds(std::time::SystemTime::now())),
            )?;
            println!("revoked {id} in {} (this token and every token attenuated from it)", deny_list.display());
        }
    }
    Ok(())
}
