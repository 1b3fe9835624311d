//! `shardlock token`: issue, attenuate, inspect and revoke access tokens.

use shardlock::Error;
use shardlock::{Attenuation, Operation, ShardSet, Token, TokenSpec};
use shardlock::{IssuerKey, TrustAnchor};

use crate::cli::TokenCmd;
use crate::output::print_json;

pub(crate) fn token_cmd(t: TokenCmd) -> Result<(), Error> {
    match t {
        TokenCmd::Issue { issuer_key, dataset, principal, shards, ops, ttl, not_before, min_generation, out, json } => {
            let issuer = IssuerKey::load(&issuer_key)?;
            let expires = shardlock::time_after(std::time::SystemTime::now(), shardlock::parse_lifetime(&ttl)?)?;
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
            if json {
                print_json(&serde_json::json!({
                    "token": out, "revocation_id": token.revocation_id(), "fields": token_fields(&token.blocks()),
                }));
                return Ok(());
            }
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
        TokenCmd::Attenuate { token, trust, shards, ops, ttl, min_generation, out, json } => {
            let trust = TrustAnchor::load(&trust)?;
            let t = Token::load(&token, &trust)?;
            let shards = shards.as_deref().map(ShardSet::parse).transpose()?;
            let ops = ops.as_deref().map(Operation::parse_list).transpose()?;
            let expires = ttl
                .as_deref()
                .map(shardlock::parse_lifetime)
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
            if json {
                print_json(&serde_json::json!({
                    "token": out, "revocation_id": narrowed.revocation_id(), "fields": token_fields(&narrowed.blocks()),
                }));
                return Ok(());
            }
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
                print_json(&serde_json::json!({
                    "verified": verified, "fields": token_fields(&blocks), "blocks": blocks, "revocation_ids": ids,
                }));
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
        TokenCmd::Revoke { token, deny_list, json } => {
            let (_, ids) = shardlock::inspect_unverified(&token)?;
            let id = ids.last().cloned().ok_or_else(|| Error::InvalidArgument("token has no blocks".into()))?;
            shardlock::DenyList::append(
                &deny_list,
                &id,
                &format!("revoked {}", humantime::format_rfc3339_seconds(std::time::SystemTime::now())),
            )?;
            if json {
                print_json(&serde_json::json!({"revoked": id, "deny_list": deny_list}));
            } else {
                println!("revoked {id} in {} (this token and every token attenuated from it)", deny_list.display());
            }
        }
    }
    Ok(())
}

/// What a token grants, read from its blocks' Datalog: the authority block's dataset,
/// principal, operations, shard ranges, not-before, expiry and minimum generation,
/// then what each attenuation narrowed (its checks), and the effective expiry (the
/// earliest of all). Unverified unless the blocks came from a verified token.
fn token_fields(blocks: &[String]) -> serde_json::Value {
    /// The arguments of every `name(...)` fact in `block`.
    fn facts<'a>(block: &'a str, name: &str) -> Vec<&'a str> {
        let open = format!("{name}(");
        block.lines().map(str::trim).filter_map(|l| l.strip_prefix(open.as_str())?.strip_suffix(");")).collect()
    }
    let unquote = |s: &str| s.trim().trim_matches('"').to_owned();
    let Some(authority) = blocks.first() else { return serde_json::Value::Null };
    let shards: Vec<serde_json::Value> = facts(authority, "allowed_shards")
        .into_iter()
        .filter_map(|a| {
            let (lo, hi) = a.split_once(',')?;
            Some(serde_json::json!([lo.trim().parse::<u64>().ok()?, hi.trim().parse::<u64>().ok()?]))
        })
        .collect();
    let min_generation = |b: &str| {
        b.lines().find_map(|l| {
            l.trim().strip_prefix("check if generation($g), $g >= ")?.trim_end_matches(';').parse::<u64>().ok()
        })
    };
    let mut expiries: Vec<String> = facts(authority, "expires").into_iter().map(str::to_owned).collect();
    let attenuations: Vec<serde_json::Value> = blocks
        .iter()
        .skip(1)
        .map(|b| {
            let checks: Vec<&str> = b.lines().map(str::trim).filter(|l| l.starts_with("check ")).collect();
            for c in &checks {
                if let Some(t) = c.strip_prefix("check if time($t), $t < ") {
                    expiries.push(t.trim_end_matches(';').to_owned());
                }
            }
            serde_json::json!({"checks": checks, "min_generation": min_generation(b)})
        })
        .collect();
    let expires = expiries.iter().filter_map(|t| humantime::parse_rfc3339(t).ok()).min();
    serde_json::json!({
        "dataset": facts(authority, "allowed_dataset").first().map(|s| unquote(s)),
        "principal": facts(authority, "principal").first().map(|s| unquote(s)),
        "operations": facts(authority, "allowed_op").into_iter().map(unquote).collect::<Vec<_>>(),
        "shards": shards,
        "not_before": facts(authority, "not_before").first(),
        "expires": expires.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        "min_generation": min_generation(authority),
        "attenuations": attenuations,
    })
}
