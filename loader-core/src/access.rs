//! [`Access`]: the single gate between a reader and a shard's DEK. It authorizes the
//! token ([`crate::auth`]), and only on a pass makes the [`Grant`] that the key
//! provider needs to unwrap the DEK, audits both decisions, and opens the shard.

use std::sync::Arc;

use crate::audit::{AuditEvent, AuditLog};
use crate::auth::Authorizer;
use crate::crypto::aead::Backend;
use crate::dataset::{Dataset, OpenShard, ShardReader};
use crate::error::{DenyReason, Error, Operation, Result};
use crate::keys::{Dek, Grant, KeyProvider, ReleaseContext};
use crate::memory::MemoryPolicy;

/// Authorizes, unwraps and audits, in that order, for every shard open.
pub struct Access {
    authorizer: Authorizer,
    keys: Arc<dyn KeyProvider>,
    audit: Option<Arc<AuditLog>>,
    backend: Backend,
    memory: MemoryPolicy,
    /// The token's text, for a key service that authorizes it itself.
    bearer: Option<zeroize::Zeroizing<String>>,
    /// Who the requests come from (a key service's client), for the audit log.
    client: Option<String>,
}

impl Access {
    /// A gate over `keys` for the token held by `authorizer`.
    pub fn new(authorizer: Authorizer, keys: Arc<dyn KeyProvider>) -> Self {
        let bearer = authorizer.bearer();
        Self {
            authorizer,
            keys,
            audit: None,
            backend: Backend::default(),
            memory: MemoryPolicy::RequireLocked,
            bearer,
            client: None,
        }
    }

    /// Records every decision in `log`.
    pub fn with_audit(mut self, log: Arc<AuditLog>) -> Self {
        self.audit = Some(log);
        self
    }

    /// Selects the AEAD backend for shards opened through this gate.
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// What to do when the scratch memory of a shard open cannot be locked (the
    /// default: fail with `Error::MemoryLock`). The loader passes its own policy
    /// (`LoaderBuilder::allow_unlocked_memory`).
    pub fn with_memory_policy(mut self, policy: MemoryPolicy) -> Self {
        self.memory = policy;
        self
    }

    /// Names the client the requests come from in every audit record (a key service
    /// sets the mTLS identity or peer address).
    pub fn with_client(mut self, client: impl Into<String>) -> Self {
        self.client = Some(client.into());
        self
    }

    /// Tells the key provider the order this epoch opens shards in (a key service
    /// releases the next ones in one request). Each call starts a new epoch.
    pub fn plan(&self, ds: &Dataset, order: &[u32]) {
        self.keys.plan(ds.manifest_digest(), order);
    }

    /// The authorizer.
    pub fn authorizer(&self) -> &Authorizer {
        &self.authorizer
    }

    /// The AEAD backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn event(&self, event: &'static str, ds: &Dataset, shard: u32, op: Operation) -> AuditEvent {
        AuditEvent {
            event,
            principal: self.authorizer.principal().to_owned(),
            token_id: self.authorizer.token_id().to_owned(),
            client: self.client.clone(),
            dataset: Some(ds.manifest().dataset_id.clone()),
            shard: Some(shard),
            operation: Some(op.name()),
            ..AuditEvent::default()
        }
    }

    /// Records an event; an audit failure is a hard error (fail closed).
    pub fn record(&self, ev: &AuditEvent) -> Result<()> {
        match &self.audit {
            Some(log) => log.record(ev),
            None => Ok(()),
        }
    }

    /// Authorizes `op` on shard `shard` now, and only then unwraps its DEK. Both the
    /// decision and the key release are audited before the DEK is returned; an error
    /// writing the audit log denies (fail closed).
    pub(crate) fn release_dek(&self, ds: &Dataset, shard: u32, op: Operation) -> Result<Dek> {
        let entry = ds.shard_entry(shard)?;
        let dataset = &ds.manifest().dataset_id;
        let decision = if ds.trust_anchor() != self.authorizer.trust_anchor() {
            Err(Error::AccessDenied {
                dataset: Some(dataset.clone()),
                shard: Some(shard),
                operation: Some(op),
                reason: DenyReason::InvalidToken,
                rule: format!(
                    "the dataset was verified with issuer key {}, the token with {}",
                    ds.trust_anchor().key_id(),
                    self.authorizer.trust_anchor().key_id()
                ),
            })
        } else {
            self.authorizer.authorize(dataset, shard, op, ds.manifest().generation)
        };
        let mut ev = self.event("authorize", ds, shard, op);
        match &decision {
            Ok(()) => ev.decision = Some("allow"),
            Err(e) => {
                ev.decision = Some("deny");
                match e {
                    Error::AccessDenied { reason, rule, .. } => {
                        ev.reason = Some(reason.name());
                        ev.rule = Some(rule.clone());
                    }
                    other => ev.detail = Some(other.to_string()),
                }
            }
        }
        self.record(&ev)?;
        decision?;
        let grant = Grant::for_entry(dataset, &ds.manifest().issuer_key_id, entry, Some(op))?;
        let ctx = ReleaseContext {
            token: self.bearer.as_deref().map(String::as_str),
            manifest: ds.manifest_bytes(),
            digest: ds.manifest_digest(),
        };
        let dek = self.keys.release_dek(grant, &ctx);
        let mut ev = self.event("key_release", ds, shard, op);
        ev.key_id = Some(entry.kek_id.clone());
        ev.provider = Some(self.keys.describe());
        match &dek {
            Ok(_) => ev.decision = Some("allow"),
            Err(e) => {
                ev.decision = Some("deny");
                if let Error::AccessDenied { reason, rule, .. } = e {
                    ev.reason = Some(reason.name());
                    ev.rule = Some(rule.clone());
                }
                ev.detail = Some(e.to_string());
            }
        }
        self.record(&ev)?;
        dek
    }

    /// Denies `op` on `shard` for a reason decided outside the token (a key service's
    /// mTLS identity check): audited like any denial, and returned as the error.
    #[cfg(feature = "keyd")]
    pub(crate) fn deny(
        &self,
        ds: &Dataset,
        shard: u32,
        op: Operation,
        reason: DenyReason,
        rule: String,
    ) -> Result<Error> {
        let mut ev = self.event("authorize", ds, shard, op);
        ev.decision = Some("deny");
        ev.reason = Some(reason.name());
        ev.rule = Some(rule.clone());
        self.record(&ev)?;
        Ok(Error::AccessDenied {
            dataset: Some(ds.manifest().dataset_id.clone()),
            shard: Some(shard),
            operation: Some(op),
            reason,
            rule,
        })
    }

    /// Records an integrity failure of `shard` (shard, chunk, kind).
    pub fn record_failure(&self, ds: &Dataset, shard: u32, op: Operation, err: &Error) -> Result<()> {
        if let Error::Integrity { chunk, kind, .. } = err {
            let mut ev = self.event("integrity_failure", ds, shard, op);
            ev.chunk = *chunk;
            ev.reason = Some(kind.name());
            ev.detail = Some(kind.to_string());
            self.record(&ev)?;
        }
        Ok(())
    }

    /// Authorizes `read`, unwraps and opens shard `shard`, for sharing between
    /// pipeline workers.
    pub fn open_shared(&self, ds: &Dataset, shard: u32) -> Result<Arc<OpenShard>> {
        let op = Operation::Read;
        let dek = self.release_dek(ds, shard, op)?;
        OpenShard::open(ds, shard, &dek, self.backend, self.memory).map(Arc::new).inspect_err(|e| {
            let _ = self.record_failure(ds, shard, op, e);
        })
    }

    /// Authorizes `read`, unwraps and opens shard `shard`. (Plaintext is only ever
    /// released for `read`; `verify` authenticates without releasing it.)
    pub fn open_shard(&self, ds: &Dataset, shard: u32) -> Result<ShardReader> {
        let op = Operation::Read;
        let dek = self.release_dek(ds, shard, op)?;
        ds.open_shard_with(shard, &dek, self.backend, self.memory).inspect_err(|e| {
            let _ = self.record_failure(ds, shard, op, e);
        })
    }
}
