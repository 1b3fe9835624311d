//! The audit log: JSON Lines, one record per decision, hash-chained.
//!
//! Each line is a JSON object whose last member is `"hash"`: the SHA-256 (hex) of the
//! line's text up to (not including) `,"hash":`. Its `"prev"` member is the previous
//! line's hash (64 zeros on the first line) and `"seq"` counts from 1. Editing a line
//! breaks its own hash; deleting, inserting or reordering lines breaks the chain.
//! Cutting lines off the *end* leaves a valid shorter chain: only an anchor kept
//! elsewhere (the head hash and line count printed by `shardlock audit verify`)
//! detects that.
//!
//! Records never contain a token, a key or plaintext: only the token's revocation id,
//! key ids and shard coordinates. Appends take an exclusive file lock and use
//! `O_APPEND`, so several processes (ranks) can share one log.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use crate::crypto::sha256;
use crate::error::{Error, Result};

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const HASH_SEP: &str = ",\"hash\":\"";

/// One decision or event.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AuditEvent {
    /// "authorize", "key_release", "integrity_failure", "unlocked_memory", ...
    pub event: &'static str,
    /// The token's principal.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub principal: String,
    /// The token's revocation id (never the token).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub token_id: String,
    /// The client's identity as the service saw it (an mTLS certificate's subject, or
    /// the peer address): key service records only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Dataset id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// Shard index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<u32>,
    /// Operation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<&'static str>,
    /// "allow" or "deny".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<&'static str>,
    /// Deny reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// The failing rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Key id released.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Key provider.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Chunk of an integrity failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk: Option<u64>,
    /// Free text (an error message; never secret material).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    time: String,
    #[serde(flatten)]
    event: &'a AuditEvent,
    prev: &'a str,
}

/// An open audit log.
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<(File, u32)>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuditLog({})", self.path.display())
    }
}

fn audit_err(path: &Path, line: Option<u64>, detail: impl Into<String>) -> Error {
    Error::Audit { path: path.to_owned(), line, detail: detail.into() }
}

impl AuditLog {
    /// Opens (creating with mode 0600) the log at `path` for appending.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self { path: path.to_owned(), file: Mutex::new((open_log(path)?, std::process::id())) })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record, chained to the current last line. Fails closed: callers
    /// treat an unwritable log as a denial.
    pub fn record(&self, event: &AuditEvent) -> Result<()> {
        let mut g = self.file.lock().unwrap_or_else(|p| p.into_inner());
        // A forked child (a DataLoader worker) shares the parent's open file
        // description and so its flock: give it its own before appending.
        if g.1 != std::process::id() {
            *g = (open_log(&self.path)?, std::process::id());
        }
        let f = &mut g.0;
        f.lock().map_err(Error::io("lock audit log", &self.path))?;
        let r = self.append_locked(f, event);
        let _ = f.unlock();
        r
    }

    fn append_locked(&self, f: &mut File, event: &AuditEvent) -> Result<()> {
        let clip = |s: &Option<String>| {
            s.as_ref().map(|t| t.chars().map(|c| if c.is_control() { ' ' } else { c }).take(2048).collect::<String>())
        };
        let event = &AuditEvent { rule: clip(&event.rule), detail: clip(&event.detail), ..event.clone() };
        let (seq, prev) = last_link(f, &self.path)?;
        let line = Line {
            seq: seq + 1,
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            event,
            prev: &prev,
        };
        let mut body = serde_json::to_string(&line).map_err(|_| audit_err(&self.path, None, "cannot encode record"))?;
        body.pop(); // the closing brace; the hash covers everything before `,"hash":`
        let hash = hex::encode(sha256(body.as_bytes()));
        body.push_str(HASH_SEP);
        body.push_str(&hash);
        body.push_str("\"}\n");
        if body.len() > MAX_LINE {
            return Err(audit_err(&self.path, None, "record too long"));
        }
        f.write_all(body.as_bytes()).map_err(Error::io("append audit log", &self.path))?;
        f.sync_data().map_err(Error::io("sync audit log", &self.path))
    }
}

/// Longest record line accepted (event fields are bounded well below this).
const MAX_LINE: usize = 32 * 1024;

fn open_log(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io("open audit log", path))
}

/// Reads the last line's (seq, hash); (0, genesis) for an empty log.
fn last_link(f: &mut File, path: &Path) -> Result<(u64, String)> {
    let len = f.seek(SeekFrom::End(0)).map_err(Error::io("read audit log", path))?;
    if len == 0 {
        return Ok((0, GENESIS.to_owned()));
    }
    let take = len.min(2 * MAX_LINE as u64);
    f.seek(SeekFrom::Start(len - take)).map_err(Error::io("read audit log", path))?;
    let mut tail = Vec::with_capacity(take as usize);
    Read::by_ref(f).take(take).read_to_end(&mut tail).map_err(Error::io("read audit log", path))?;
    let text = String::from_utf8_lossy(&tail);
    let corrupt_tail =
        || audit_err(path, None, "the log does not end with a complete record; run `shardlock audit verify`");
    let body = text.strip_suffix('\n').ok_or_else(corrupt_tail)?;
    let last = body.rsplit('\n').next().unwrap_or("");
    let corrupt =
        || audit_err(path, None, "the last line is not a valid record; run `shardlock audit verify` before appending");
    let (seq, _, hash) = parse_line(last).ok_or_else(corrupt)?;
    Ok((seq, hash))
}

/// Parses a line into (seq, prev, hash) after checking its own hash.
fn parse_line(line: &str) -> Option<(u64, String, String)> {
    let at = line.rfind(HASH_SEP)?;
    let (body, rest) = line.split_at(at);
    let hash = rest.strip_prefix(HASH_SEP)?.strip_suffix("\"}")?;
    if hash != hex::encode(sha256(body.as_bytes())) {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    Some((v.get("seq")?.as_u64()?, v.get("prev")?.as_str()?.to_owned(), hash.to_owned()))
}

/// Result of [`verify_log`].
#[derive(Clone, Debug, Serialize)]
pub struct AuditSummary {
    /// Number of records.
    pub records: u64,
    /// Hash of the last record: keep it elsewhere to detect later truncation.
    pub head: String,
}

/// Checks every line's hash, the chain and the sequence; names the first bad line.
pub fn verify_log(path: &Path) -> Result<AuditSummary> {
    let text = std::fs::read_to_string(path).map_err(Error::io("read audit log", path))?;
    let mut prev = GENESIS.to_owned();
    let mut n = 0u64;
    for (i, line) in text.lines().enumerate() {
        let no = i as u64 + 1;
        let (seq, p, hash) = parse_line(line).ok_or_else(|| {
            audit_err(path, Some(no), "record was edited or is malformed (its hash does not match its content)")
        })?;
        if p != prev {
            return Err(audit_err(
                path,
                Some(no),
                "does not chain to the line before it: a line was removed, inserted or reordered",
            ));
        }
        if seq != no {
            return Err(audit_err(path, Some(no), format!("sequence number {seq}, expected {no}")));
        }
        prev = hash;
        n = no;
    }
    if !text.is_empty() && !text.ends_with('\n') {
        return Err(audit_err(path, Some(n + 1), "last line is incomplete"));
    }
    Ok(AuditSummary { records: n, head: prev })
}
