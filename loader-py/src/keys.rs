//! Keys and tokens: the one-call set-up helpers (mirrors `shardlock keygen` / `token`).

use std::path::PathBuf;

use pyo3::prelude::*;
use shardlock::{pkcs11, IssuerKey, Keyring, TrustAnchor};
use shardlock::{Operation, ShardSet, Token, TokenSpec};

use crate::errors::IntoPy;

/// Creates a keyring file (mode 0600) with one fresh KEK; returns the KEK id.
#[pyfunction]
fn create_keyring(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    py.detach(|| Keyring::create(&path).map(|k| shardlock::KeyProvider::active_kek_id(&k).to_owned())).py()
}

/// Generates a non-extractable AES-256 KEK inside the PKCS#11 token the URI names
/// (`pkcs11:token=...;object=LABEL?module-path=...&pin-source=env:VAR`); returns the KEK
/// id. Refuses a label that already exists.
#[pyfunction]
fn create_hsm_kek(py: Python<'_>, uri: &str) -> PyResult<String> {
    py.detach(|| pkcs11::Pkcs11Uri::parse(uri).and_then(|u| pkcs11::generate_kek(&u))).py()
}

/// Creates an Ed25519 issuer key (mode 0600) and its trust anchor `path.pub`;
/// returns the path of the trust anchor.
#[pyfunction]
fn create_issuer_key(path: PathBuf) -> PyResult<PathBuf> {
    IssuerKey::generate().and_then(|k| k.save(&path)).py()
}

/// Issues an access token file (mode 0600); returns its revocation id.
#[pyfunction]
#[pyo3(signature = (issuer_key, out, *, dataset, principal, shards="all", ops="read", ttl="1h", not_before=None, min_generation=None))]
#[allow(clippy::too_many_arguments)]
fn issue_token(
    issuer_key: PathBuf,
    out: PathBuf,
    dataset: String,
    principal: String,
    shards: &str,
    ops: &str,
    ttl: &str,
    not_before: Option<&str>,
    min_generation: Option<u64>,
) -> PyResult<String> {
    let issuer = IssuerKey::load(&issuer_key).py()?;
    let spec = TokenSpec {
        dataset,
        principal,
        shards: ShardSet::parse(shards).py()?,
        ops: Operation::parse_list(ops).py()?,
        expires: shardlock::time_after(std::time::SystemTime::now(), shardlock::parse_lifetime(ttl).py()?).py()?,
        not_before: not_before.map(shardlock::parse_time).transpose().py()?,
        min_generation,
    };
    let t = Token::issue(&issuer, &spec).py()?;
    t.save(&out).py()?;
    Ok(t.revocation_id())
}

/// Narrows a token offline; returns the new token's revocation id.
#[pyfunction]
#[pyo3(signature = (token, trust, out, *, shards=None, ops=None, ttl=None, min_generation=None))]
fn attenuate_token(
    token: PathBuf,
    trust: PathBuf,
    out: PathBuf,
    shards: Option<&str>,
    ops: Option<&str>,
    ttl: Option<&str>,
    min_generation: Option<u64>,
) -> PyResult<String> {
    let trust = TrustAnchor::load(&trust).py()?;
    let t = Token::load(&token, &trust).py()?;
    let shards = shards.map(ShardSet::parse).transpose().py()?;
    let ops = ops.map(Operation::parse_list).transpose().py()?;
    let expires = ttl
        .map(|s| shardlock::parse_lifetime(s).and_then(|d| shardlock::time_after(std::time::SystemTime::now(), d)))
        .transpose()
        .py()?;
    let n = t.attenuate(&shardlock::Attenuation { shards, ops, expires, min_generation }).py()?;
    n.save(&out).py()?;
    Ok(n.revocation_id())
}

/// Adds the token's revocation id to a deny list (revoking it and its attenuations).
#[pyfunction]
fn revoke_token(token: PathBuf, deny_list: PathBuf) -> PyResult<String> {
    let (_, ids) = shardlock::inspect_unverified(&token).py()?;
    let id = ids.last().cloned().unwrap_or_default();
    shardlock::DenyList::append(&deny_list, &id, "revoked from Python").py()?;
    Ok(id)
}

/// The streams steps `start..start + count` of a mix with `seed` and `weights` read
/// (`shardlock::Mix::choose`, the one definition both languages use).
#[pyfunction]
fn mix_choices(seed: u64, weights: Vec<f64>, start: u64, count: u64) -> PyResult<Vec<usize>> {
    (start..start.saturating_add(count)).map(|t| shardlock::Mix::choose(seed, t, &weights).py()).collect()
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(mix_choices, m)?)?;
    m.add_function(wrap_pyfunction!(create_keyring, m)?)?;
    m.add_function(wrap_pyfunction!(create_issuer_key, m)?)?;
    m.add_function(wrap_pyfunction!(create_hsm_kek, m)?)?;
    m.add_function(wrap_pyfunction!(issue_token, m)?)?;
    m.add_function(wrap_pyfunction!(attenuate_token, m)?)?;
    m.add_function(wrap_pyfunction!(revoke_token, m)?)?;
    Ok(())
}
