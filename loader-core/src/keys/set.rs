//! [`ProviderSet`]: several custodies as one [`KeyProvider`], for a manifest whose shards
//! are wrapped under different custody at once (a dataset part-way through a move from
//! a keyring to KMS, say, or one assembled from parts packed by different teams).

use std::sync::Arc;

use super::{Dek, Grant, KeyProvider, ReleaseContext, Rewrap, WrapContext};
use crate::error::{Error, Result};

/// Several key providers as one. Each shard's DEK is unwrapped (or released) by the first
/// member that holds its KEK id ([`KeyProvider::holds`]); new DEKs are made and wrapped by
/// the first member, whose active KEK is the set's. A key service holds every KEK id, so
/// put it last.
pub struct ProviderSet {
    members: Vec<Arc<dyn KeyProvider>>,
}

impl std::fmt::Debug for ProviderSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.members.iter().map(|m| m.describe())).finish()
    }
}

impl ProviderSet {
    /// The set of `members`, in the order they are asked; at least one.
    pub fn new(members: Vec<Arc<dyn KeyProvider>>) -> Result<Self> {
        if members.is_empty() {
            return Err(Error::InvalidArgument(
                "no key provider given: a keyring file, or a pkcs11:, transit:, aws-kms: or https:// URI".into(),
            ));
        }
        // A key service holds every KEK id: anywhere but last it would take every shard.
        if members.iter().rev().skip(1).any(|m| m.describe().starts_with("key service")) {
            return Err(Error::InvalidArgument(
                "a key service holds every KEK id, so it goes last among the key providers".into(),
            ));
        }
        Ok(Self { members })
    }

    /// One provider as it is, several as a set (what a repeated `--keyring` or a list
    /// `keyring=` opens); an empty list is an error.
    pub fn combine(mut members: Vec<Arc<dyn KeyProvider>>) -> Result<Arc<dyn KeyProvider>> {
        if members.len() == 1 {
            return Ok(members.remove(0));
        }
        Ok(Arc::new(Self::new(members)?))
    }

    /// The members, in the order they are asked.
    pub fn members(&self) -> &[Arc<dyn KeyProvider>] {
        &self.members
    }

    fn first(&self) -> &dyn KeyProvider {
        // `new` refuses an empty set.
        &*self.members[0]
    }

    /// The member that holds the KEK `grant` names, or an error naming every member.
    fn holder(&self, grant: &Grant) -> Result<&dyn KeyProvider> {
        self.members.iter().map(|m| &**m).find(|m| m.holds(grant.kek_id())).ok_or_else(|| Error::KeyUnavailable {
            key_id: grant.kek_id().to_owned(),
            detail: format!(
                "shard {} is wrapped under {}, which none of {} holds; add the custody that holds it",
                grant.shard(),
                grant.kek_id(),
                self.describe()
            ),
        })
    }
}

impl KeyProvider for ProviderSet {
    fn describe(&self) -> String {
        self.members.iter().map(|m| m.describe()).collect::<Vec<_>>().join(" + ")
    }

    fn active_kek_id(&self) -> &str {
        self.first().active_kek_id()
    }

    fn holds(&self, kek_id: &str) -> bool {
        self.members.iter().any(|m| m.holds(kek_id))
    }

    fn wrap_dek(&self, dek: &Dek) -> Result<(String, Vec<u8>)> {
        self.first().wrap_dek(dek)
    }

    fn wrap_dek_for(&self, dek: &Dek, ctx: &WrapContext<'_>) -> Result<(String, Vec<u8>)> {
        self.first().wrap_dek_for(dek, ctx)
    }

    fn generate_dek_for(&self, ctx: &WrapContext<'_>) -> Result<(Dek, String, Vec<u8>)> {
        self.first().generate_dek_for(ctx)
    }

    fn unwrap_dek(&self, grant: Grant) -> Result<Dek> {
        self.holder(&grant)?.unwrap_dek(grant)
    }

    fn release_dek(&self, grant: Grant, ctx: &ReleaseContext<'_>) -> Result<Dek> {
        self.holder(&grant)?.release_dek(grant, ctx)
    }

    fn plan(&self, manifest_digest: &[u8; 32], order: &[u32]) {
        for m in &self.members {
            m.plan(manifest_digest, order);
        }
    }

    fn rewrap_for(&self, grant: Grant, target: &dyn KeyProvider) -> Result<Rewrap> {
        // A set as the target rewraps for its first member, which wraps for it.
        let target = match target.as_any().and_then(|t| t.downcast_ref::<Self>()) {
            Some(set) => set.first(),
            None => target,
        };
        self.holder(&grant)?.rewrap_for(grant, target)
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::format::ShardEntry;
    use crate::keys::Keyring;

    fn entry(kek_id: &str, wrapped: &[u8]) -> ShardEntry {
        ShardEntry {
            index: 3,
            id: "00".repeat(16),
            file: "shard-00003.slk".into(),
            records: 1,
            plaintext_bytes: 1,
            file_bytes: 1,
            sha256: "00".repeat(32),
            kek_id: kek_id.into(),
            wrapped_dek: hex::encode(wrapped),
        }
    }

    fn grant(kek_id: &str, wrapped: &[u8]) -> Grant {
        Grant::for_entry("ds", "issuer", &entry(kek_id, wrapped), None).unwrap()
    }

    #[test]
    fn each_dek_is_unwrapped_by_the_member_that_holds_its_kek() {
        let dir = tempfile::tempdir().unwrap();
        let a = Arc::new(Keyring::create(&dir.path().join("a.json")).unwrap());
        let b = Arc::new(Keyring::create(&dir.path().join("b.json")).unwrap());
        let set = ProviderSet::new(vec![a.clone(), b.clone()]).unwrap();
        assert_eq!(set.active_kek_id(), a.active_kek_id());
        let dek = Dek::generate().unwrap();
        let (id_b, wrapped_b) = b.wrap_dek(&dek).unwrap();
        assert!(set.holds(&id_b) && !a.holds(&id_b));
        assert_eq!(set.unwrap_dek(grant(&id_b, &wrapped_b)).unwrap().expose(), dek.expose());
        let (id_a, wrapped_a) = set.wrap_dek(&dek).unwrap();
        assert_eq!(id_a, a.active_kek_id());
        assert_eq!(a.unwrap_dek(grant(&id_a, &wrapped_a)).unwrap().expose(), dek.expose());
        match set.unwrap_dek(grant("kek-0000000000000000", &wrapped_a)) {
            Err(Error::KeyUnavailable { key_id, detail }) => {
                assert_eq!(key_id, "kek-0000000000000000");
                assert!(detail.contains("shard 3") && detail.contains(" + "), "{detail}");
            }
            other => panic!("expected KeyUnavailable, got {other:?}"),
        }
        assert!(ProviderSet::new(Vec::new()).is_err());
    }

    /// A provider that claims every KEK id, as a key service client does.
    struct ServiceLike;

    impl KeyProvider for ServiceLike {
        fn describe(&self) -> String {
            "key service https://keyd.test".into()
        }
        fn active_kek_id(&self) -> &str {
            ""
        }
        fn holds(&self, _: &str) -> bool {
            true
        }
        fn wrap_dek(&self, _: &Dek) -> Result<(String, Vec<u8>)> {
            Err(Error::Internal("test".into()))
        }
        fn unwrap_dek(&self, _: Grant) -> Result<Dek> {
            Err(Error::Internal("test".into()))
        }
    }

    #[test]
    fn a_key_service_goes_last_or_it_would_take_every_shard() {
        let dir = tempfile::tempdir().unwrap();
        let ring: Arc<dyn KeyProvider> = Arc::new(Keyring::create(&dir.path().join("a.json")).unwrap());
        let svc: Arc<dyn KeyProvider> = Arc::new(ServiceLike);
        let e = ProviderSet::new(vec![svc.clone(), ring.clone()]).unwrap_err().to_string();
        assert!(e.contains("goes last"), "{e}");
        assert!(ProviderSet::new(vec![ring, svc]).is_ok());
    }
}
