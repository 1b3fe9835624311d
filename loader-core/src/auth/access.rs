//! `Access`: the single gate between a reader and a shard's DEK.

use std::sync::Arc;

use super::{Authorizer, Operation};
use crate::audit::{AuditEvent, AuditLog};
use crate::crypto::aead::Backend;
use crate::dataset::{Dataset, ShardReader};
use crate::error::{Error, Result};
use crate::keys::{Dek, KeyProvider};

/// Authorizes, unwraps and audits, in that order, for every shard open.
pub struct Access {
    authorizer: Authorizer,
    keys: Arc<dyn KeyProvider>,
    audit: Option<Arc<AuditLog>>,
    backend: Backend,
}

impl Access {
    /// A gate over `keys` for the token held by `authorizer`.
    pub fn new(authorizer: Authorizer, keys: Arc<dyn KeyProvider>) -> Self {
        Self { authorizer, keys, audit: None, backend: Backend::default() }
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
    /// decision and the key release are audited before the DEK is returned.
    pub(crate) fn release_dek(&self, ds: &Dataset, shard: u32, op: Operation) -> Result<Dek> {
        let entry = ds.shard_entry(shard)?;
        let dataset = &ds.manifest().dataset_id;
        let grant = match self.authorizer.authorize(dataset, shard, op) {
            Ok(g) => g,
            Err(e) => {
                if let Error::AccessDenied { reason, rule, .. } = &e {
                    let mut ev = self.event("authorize", ds, shard, op);
                    ev.decision = Some("deny");
                    ev.reason = Some(reason.name());
                    ev.rule = Some(rule.clone());
                    self.record(&ev)?;
                }
                return Err(e);
            }
        };
        let mut ev = self.event("authorize", ds, shard, op);
        ev.decision = Some("allow");
        self.record(&ev)?;
        let wrapped = hex::decode(&entry.wrapped_dek).map_err(|_| Error::KeyUnavailable {
            key_id: entry.kek_id.clone(),
            detail: format!("{}: wrapped DEK in the manifest is not hex", ds.shard_ref(shard)),
        })?;
        let dek = self.keys.unwrap_dek(grant, &entry.kek_id, &wrapped);
        let mut ev = self.event("key_release", ds, shard, op);
        ev.key_id = Some(entry.kek_id.clone());
        ev.provider = Some(self.keys.describe());
        match &dek {
            Ok(_) => ev.decision = Some("allow"),
            Err(e) => {
                ev.decision = Some("deny");
                ev.detail = Some(e.to_string());
            }
        }
        self.record(&ev)?;
        dek
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

    /// Authorizes, unwraps and opens shard `shard` for `op`.
    pub fn open_shard(&self, ds: &Dataset, shard: u32, op: Operation) -> Result<ShardReader> {
        let dek = self.release_dek(ds, shard, op)?;
        ds.open_shard(shard, &dek, self.backend).inspect_err(|e| {
            let _ = self.record_failure(ds, shard, op, e);
        })
    }
}
