//! The keyring file: KEKs with ids, JSON, mode 0600.
//!
//! ```json
//! {"format": "shardlock-keyring/1", "active": "kek-...", "keys": [{"id": "kek-...", "key": "<64 hex>"}]}
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::Grant;
use super::{Dek, Kek, KeyProvider};
use crate::error::{Error, Result};

pub(crate) const FORMAT: &str = "shardlock-keyring/1";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    format: String,
    active: String,
    keys: Vec<KeyEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: String,
    key: String,
}

impl Drop for KeyEntry {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

/// KEKs loaded from a keyring file.
#[derive(Debug)]
pub struct Keyring {
    path: PathBuf,
    active: String,
    keks: Vec<Kek>,
}

impl Keyring {
    /// A new keyring holding one fresh KEK, written to `path` (0600; refuses to
    /// overwrite).
    pub fn create(path: &Path) -> Result<Self> {
        let kek = Kek::generate()?;
        let ring = Self { path: path.to_owned(), active: kek.id.clone(), keks: vec![kek] };
        let bytes = ring.encode();
        crate::fs::write_new_file(path, &bytes, 0o600)?;
        Ok(ring)
    }

    fn encode(&self) -> Zeroizing<Vec<u8>> {
        let f = KeyringFile {
            format: FORMAT.into(),
            active: self.active.clone(),
            keys: self.keks.iter().map(|k| KeyEntry { id: k.id.clone(), key: hex::encode(&k.key[..]) }).collect(),
        };
        let mut v = Zeroizing::new(serde_json::to_vec_pretty(&f).unwrap_or_default());
        v.push(b'\n');
        v
    }

    /// Loads a keyring file. Refuses files readable by group or others, and names
    /// the file and what is wrong for a corrupted one (never printing key bytes).
    pub fn load(path: &Path) -> Result<Self> {
        if let Some(k @ (super::KeyFile::IssuerSecret | super::KeyFile::IssuerPublic)) = super::KeyFile::at(path) {
            let hint = "pass the KEK keyring (keyring.json, from `shardlock keygen kek`) here";
            return Err(k.misplaced(path, "keyring", hint));
        }
        let bytes = crate::fs::read_secret_file(path)?;
        let bad = |detail: String| Error::Format { what: "keyring", path: path.to_owned(), detail };
        let f: KeyringFile = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("not a shardlock keyring (line {}, column {})", e.line(), e.column())))?;
        if f.format != FORMAT {
            return Err(bad(format!("format {:?}, expected {FORMAT:?}", f.format)));
        }
        let mut keks = Vec::with_capacity(f.keys.len());
        for e in &f.keys {
            let mut key = crate::memory::KeySlot::new();
            hex::decode_to_slice(e.key.as_bytes(), &mut key[..])
                .map_err(|_| bad(format!("key {:?} is not 64 hex digits", e.id)))?;
            if keks.iter().any(|k: &Kek| k.id == e.id) {
                return Err(bad(format!("duplicate key id {:?}", e.id)));
            }
            keks.push(Kek { id: e.id.clone(), key });
        }
        if !keks.iter().any(|k| k.id == f.active) {
            return Err(bad(format!("active key {:?} is not in the keyring", f.active)));
        }
        Ok(Self { path: path.to_owned(), active: f.active.clone(), keks })
    }

    /// The file this keyring came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Ids of all KEKs.
    pub fn kek_ids(&self) -> impl Iterator<Item = &str> {
        self.keks.iter().map(|k| k.id.as_str())
    }

    fn kek(&self, id: &str) -> Result<&Kek> {
        self.keks.iter().find(|k| k.id == id).ok_or_else(|| Error::KeyUnavailable {
            key_id: id.to_owned(),
            detail: format!(
                "keyring {} has no such KEK; use the keyring the dataset was packed or rotated with",
                self.path.display()
            ),
        })
    }
}

impl KeyProvider for Keyring {
    fn describe(&self) -> String {
        format!("keyring {}", self.path.display())
    }

    fn active_kek_id(&self) -> &str {
        &self.active
    }

    fn holds(&self, kek_id: &str) -> bool {
        self.kek_ids().any(|id| id == kek_id)
    }

    fn wrap_dek(&self, dek: &Dek) -> Result<(String, Vec<u8>)> {
        let kek = self.kek(&self.active)?;
        Ok((kek.id.clone(), kek.wrap(dek)?))
    }

    fn unwrap_dek(&self, grant: Grant) -> Result<Dek> {
        self.kek(grant.kek_id())?.unwrap(grant.wrapped_dek())
    }
}
