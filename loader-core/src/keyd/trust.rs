//! The key service's trust anchors: fixed ones ([`crate::KeydConfig::trust`]) and
//! watched files or URLs ([`crate::KeydConfig::trust_sources`]), re-read when they change
//! by the same mechanism as the deny list (`crate::watch`). A trust file that cannot be
//! read or parsed after start keeps its last good anchors.

use std::path::Path;
use std::sync::Arc;

use crate::error::Result;
use crate::keys::TrustAnchor;
use crate::watch::{Document, OnError, Reporter, Source, Watched};

/// The anchors of one trust file: one `.pub`, or a JSON array of them.
pub(super) struct Anchors(Vec<TrustAnchor>);

impl Document for Anchors {
    const WHAT: &'static str = "trust anchors";
    const READ: &'static str = "read trust anchors";
    const MAX_LEN: u64 = 1 << 20;
    const WRITABLE_RISK: &'static str =
        "anyone could add an issuer whose manifests and tokens the service would honour";

    fn parse(bytes: &[u8], origin: &Path) -> Result<Self> {
        TrustAnchor::parse_all(bytes, origin).map(Self)
    }

    fn entries(&self) -> usize {
        self.0.len()
    }
}

/// Every trust anchor the service honours now.
pub(super) struct TrustSet {
    fixed: Vec<TrustAnchor>,
    watched: Vec<Watched<Anchors>>,
}

impl TrustSet {
    /// Reads every source now (any failure is an error naming it).
    pub(super) fn open(
        fixed: &[TrustAnchor],
        sources: &[Source],
        ca: Option<&Path>,
        report: &Reporter,
    ) -> Result<Arc<Self>> {
        let watched = sources
            .iter()
            .map(|s| Watched::open(s, OnError::KeepLast, ca, Some(report.clone())))
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(Self { fixed: fixed.to_vec(), watched }))
    }

    /// The anchors now, each once, after re-reading the files that changed.
    pub(super) fn current(&self) -> Vec<TrustAnchor> {
        let mut all = self.fixed.clone();
        for w in &self.watched {
            // Kept-last sources do not fail after start.
            for a in w.current().map(|a| a.0.clone()).unwrap_or_default() {
                if !all.contains(&a) {
                    all.push(a);
                }
            }
        }
        all
    }

    /// True while `anchor` is one of [`TrustSet::current`].
    pub(super) fn trusts(&self, anchor: &TrustAnchor) -> bool {
        self.current().contains(anchor)
    }

    /// What the watched sources are, for the start line.
    pub(super) fn sources(&self) -> Vec<String> {
        self.watched.iter().map(|w| w.name().display().to_string()).collect()
    }

    /// True when a source is to be polled (any watched one: files are also checked at
    /// each use).
    pub(super) fn watches(&self) -> bool {
        !self.watched.is_empty()
    }

    /// Fetches the URL sources and checks the files now.
    pub(super) fn poll(&self) {
        for w in &self.watched {
            w.poll();
        }
    }
}
