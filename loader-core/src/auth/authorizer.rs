//! The authorizer: runs the token's Datalog against one request.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use biscuit_auth::builder as bb;
use biscuit_auth::error::{FailedCheck, Logic, Token as TokenError};
use biscuit_auth::{AuthorizerBuilder, AuthorizerLimits};

use super::revocation::DenyList;
use super::token::{Token, GENERATION_CHECK};
use super::{DenyReason, Operation};
use crate::error::{Error, Result};
use crate::keys::TrustAnchor;

/// Source of the current time (injectable for tests).
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Authorizer settings.
#[derive(Clone)]
pub struct AuthorizerConfig {
    /// Allowed clock difference between issuer and reader, applied to the issuer's
    /// expiry and not-before (not to attenuations, which are checked strictly).
    pub skew: Duration,
    /// Deny-list file of revocation ids, re-read whenever it changes.
    pub deny_list: Option<std::path::PathBuf>,
    /// The clock.
    pub clock: Clock,
}

impl Default for AuthorizerConfig {
    fn default() -> Self {
        Self { skew: Duration::from_secs(30), deny_list: None, clock: Arc::new(SystemTime::now) }
    }
}

impl std::fmt::Debug for AuthorizerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorizerConfig").field("skew", &self.skew).field("deny_list", &self.deny_list).finish()
    }
}

enum TokenState {
    Valid(Box<Token>),
    Missing,
    Invalid(String),
}

impl TokenState {
    /// No token, or the outcome of loading one (a failure is kept as the reason to deny).
    fn of(loaded: Option<Result<Token>>) -> Self {
        match loaded {
            None => Self::Missing,
            Some(Ok(t)) => Self::Valid(Box::new(t)),
            Some(Err(Error::AccessDenied { rule, .. })) => Self::Invalid(rule),
            Some(Err(e)) => Self::Invalid(e.to_string()),
        }
    }
}

/// Longest rule text kept in an error or audit record.
const MAX_RULE: usize = 1024;

/// Wall-clock bound of one Datalog evaluation. The fact and iteration limits bound the
/// work; this only stops a pathological token, and it is generous because it is wall
/// time: on a busy machine (decrypt workers on every core) 50 ms was hit by plain tokens.
const MAX_EVAL_TIME: Duration = Duration::from_secs(1);

/// Largest accepted clock skew.
pub const MAX_SKEW: Duration = Duration::from_secs(600);

/// Printable, bounded text for errors and the audit log (token contents are chosen
/// by whoever wrote or attenuated the token).
fn bounded(s: &str) -> String {
    let mut out: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).take(MAX_RULE).collect();
    if s.chars().count() > MAX_RULE {
        out.push('…');
    }
    out
}

/// Authorizes requests for one token against one trust anchor. A missing or invalid
/// token is not an error at construction: every request is then denied (and
/// audited), so a job that starts without a usable token leaves a record.
pub struct Authorizer {
    trust: TrustAnchor,
    token: TokenState,
    deny: Option<Arc<DenyList>>,
    cfg: AuthorizerConfig,
    principal: String,
    /// The principal exactly as the token states it (for an identity comparison).
    #[cfg_attr(not(feature = "keyd"), allow(dead_code))]
    raw_principal: String,
    token_id: String,
}

/// The request-side Datalog: facts the authorizer asserts, and the checks that map
/// one-to-one to deny reasons.
const POLICY: &str = r#"
dataset({dataset}); shard({shard}); operation({op}); generation({generation});
time({now}); now_early({early}); now_late({late});
check if allowed_dataset($d), dataset($d);
check if operation($op), allowed_op($op);
check if shard($s), allowed_shards($lo, $hi), $s >= $lo, $s <= $hi;
check if expires($e), now_early($t), $t < $e;
check if not_before($n), now_late($t), $t >= $n;
allow if true;
"#;

impl Authorizer {
    /// An authorizer for `token` (if any) under `trust`.
    /// A token verified under another issuer key than `trust` is kept as invalid.
    pub fn new(trust: &TrustAnchor, token: Option<Token>, cfg: AuthorizerConfig) -> Result<Self> {
        let deny = cfg.deny_list.as_deref().map(DenyList::open).transpose()?.map(Arc::new);
        let state = match token {
            Some(t) if t.anchor == *trust => TokenState::Valid(Box::new(t)),
            Some(t) => TokenState::Invalid(format!(
                "token was issued under issuer key {}, but the trust anchor is {}",
                t.anchor.key_id(),
                trust.key_id()
            )),
            None => TokenState::Missing,
        };
        Self::with_state(*trust, state, deny, cfg)
    }

    /// An authorizer from a token file; an unreadable or invalid token is kept as a
    /// reason to deny every request rather than failing here.
    pub fn from_file(trust: &TrustAnchor, token: Option<&Path>, cfg: AuthorizerConfig) -> Result<Self> {
        let deny = cfg.deny_list.as_deref().map(DenyList::open).transpose()?.map(Arc::new);
        let state = TokenState::of(token.map(|p| Token::load(p, trust)));
        Self::with_state(*trust, state, deny, cfg)
    }

    fn with_state(
        trust: TrustAnchor,
        token: TokenState,
        deny: Option<Arc<DenyList>>,
        cfg: AuthorizerConfig,
    ) -> Result<Self> {
        if cfg.skew > MAX_SKEW {
            return Err(Error::InvalidArgument(format!(
                "clock skew {:?} is larger than the maximum {:?}",
                cfg.skew, MAX_SKEW
            )));
        }
        let (raw_principal, token_id) = match &token {
            TokenState::Valid(t) => (principal_of(t), t.revocation_id()),
            _ => (String::new(), String::new()),
        };
        let principal = bounded(&raw_principal);
        Ok(Self { trust, token, deny, cfg, principal, raw_principal, token_id })
    }

    /// The trust anchor tokens are checked against.
    pub fn trust_anchor(&self) -> &TrustAnchor {
        &self.trust
    }

    /// The token's principal ("" without a valid token).
    pub fn principal(&self) -> &str {
        &self.principal
    }

    /// The token's base64 text, if it is valid: what a key service is sent as the
    /// bearer. A secret: never log it.
    pub(crate) fn bearer(&self) -> Option<zeroize::Zeroizing<String>> {
        match &self.token {
            TokenState::Valid(t) => t.to_base64().ok(),
            _ => None,
        }
    }

    /// An authorizer for a token given as text (a bearer header); like
    /// [`Authorizer::from_file`], a missing or invalid token denies every request.
    pub fn from_text(trust: &TrustAnchor, token: Option<&str>, cfg: AuthorizerConfig) -> Result<Self> {
        let deny = cfg.deny_list.as_deref().map(DenyList::open).transpose()?.map(Arc::new);
        Self::from_text_with(trust, token, cfg, deny)
    }

    /// [`Authorizer::from_text`] with a deny list already open and shared (a key service
    /// keeps one for all requests; `cfg.deny_list` is then ignored).
    pub(crate) fn from_text_with(
        trust: &TrustAnchor,
        token: Option<&str>,
        cfg: AuthorizerConfig,
        deny: Option<Arc<DenyList>>,
    ) -> Result<Self> {
        let state = TokenState::of(token.map(|t| Token::from_base64(t, trust)));
        Self::with_state(*trust, state, deny, cfg)
    }

    /// The principal exactly as the token states it, unbounded and uncleaned ("" without
    /// a valid token): what an identity must equal, never what is printed.
    #[cfg(feature = "keyd")]
    pub(crate) fn raw_principal(&self) -> &str {
        &self.raw_principal
    }

    /// True when a token was given and verified under the trust anchor.
    #[cfg(feature = "keyd")]
    pub(crate) fn has_valid_token(&self) -> bool {
        matches!(self.token, TokenState::Valid(_))
    }

    /// The token's revocation id ("" without a valid token). Safe to log.
    pub fn token_id(&self) -> &str {
        &self.token_id
    }

    /// Authorizes one request at the current time; on failure `Error::AccessDenied`
    /// naming the dataset, shard, operation, reason and failing rule. `generation` is
    /// the verified manifest's generation, which a token may require a minimum of.
    /// Only [`crate::Access`] turns a success into a key-releasing [`crate::Grant`].
    pub fn authorize(&self, dataset: &str, shard: u32, op: Operation, generation: u64) -> Result<()> {
        let deny = |reason: DenyReason, rule: String| Error::AccessDenied {
            dataset: Some(dataset.to_owned()),
            shard: Some(shard),
            operation: Some(op),
            reason,
            rule: bounded(&rule),
        };
        let token = match &self.token {
            TokenState::Valid(t) => t,
            TokenState::Missing => return Err(deny(DenyReason::MissingToken, "no token given".into())),
            TokenState::Invalid(why) => return Err(deny(DenyReason::InvalidToken, why.clone())),
        };
        if let Some(list) = &self.deny {
            if let Some(id) = list.find_any(&token.revocation_ids())? {
                return Err(deny(
                    DenyReason::Revoked,
                    format!("revocation id {id} is on deny list {}", list.path().display()),
                ));
            }
        }
        let now = (self.cfg.clock)();
        let mut params = HashMap::new();
        params.insert("dataset".to_owned(), bb::string(dataset));
        params.insert("shard".to_owned(), bb::int(shard.into()));
        params.insert("op".to_owned(), bb::string(op.name()));
        // Generations past i64::MAX cannot be written by `pack` or `rotate`; saturate
        // rather than fail so such a manifest still meets any minimum.
        params.insert("generation".to_owned(), bb::int(i64::try_from(generation).unwrap_or(i64::MAX)));
        params.insert("now".to_owned(), bb::date(&now));
        params.insert("early".to_owned(), bb::date(&now.checked_sub(self.cfg.skew).unwrap_or(SystemTime::UNIX_EPOCH)));
        params.insert("late".to_owned(), bb::date(&now.checked_add(self.cfg.skew).unwrap_or(now)));
        let limits = AuthorizerLimits { max_facts: 1000, max_iterations: 100, max_time: MAX_EVAL_TIME };
        let built = AuthorizerBuilder::new()
            .code_with_params(POLICY, params, HashMap::new())
            .map(|b| b.set_limits(limits))
            .and_then(|b| b.build(&token.biscuit));
        let mut authorizer = match built {
            Ok(a) => a,
            Err(e) => return Err(deny(DenyReason::InvalidToken, format!("token cannot be evaluated: {e}"))),
        };
        match authorizer.authorize() {
            Ok(_) => Ok(()),
            Err(TokenError::FailedLogic(Logic::Unauthorized { checks, .. } | Logic::NoMatchingPolicy { checks })) => {
                let (reason, rule) = classify(&checks);
                let rule = validity_rule(token, reason, now, self.cfg.skew).unwrap_or(rule);
                Err(deny(reason, rule))
            }
            Err(e) => Err(deny(DenyReason::InvalidToken, format!("token evaluation failed: {e}"))),
        }
    }
}

fn principal_of(t: &Token) -> String {
    let limits = AuthorizerLimits { max_facts: 1000, max_iterations: 100, max_time: MAX_EVAL_TIME };
    let Ok(mut a) = AuthorizerBuilder::new().set_limits(limits).build(&t.biscuit) else { return String::new() };
    let r: std::result::Result<Vec<(String,)>, _> = a.query("data($p) <- principal($p)");
    r.ok().and_then(|v| v.into_iter().next()).map(|(p,)| p).unwrap_or_default()
}

/// For a token outside its validity window: when it expired (or becomes valid) and
/// the time now, in RFC 3339, instead of the Datalog check that failed. The times come
/// from the token's own blocks (`expires(...)`/`not_before(...)` facts and the
/// `check if time($t), $t < ...` an attenuation writes); the earliest expiry counts.
fn validity_rule(token: &Token, reason: DenyReason, now: SystemTime, skew: Duration) -> Option<String> {
    let blocks = token.blocks();
    let dates = |prefix: &str| -> Vec<SystemTime> {
        blocks
            .iter()
            .flat_map(|b| {
                b.match_indices(prefix).filter_map(|(i, _)| {
                    let rest = &b[i + prefix.len()..];
                    let end = rest.find(|c: char| c == ')' || c == ';' || c == ',' || c.is_whitespace())?;
                    humantime::parse_rfc3339(&rest[..end]).ok()
                })
            })
            .collect()
    };
    let rfc = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let allowed = format!("clock skew allowed: {} s", skew.as_secs());
    match reason {
        DenyReason::TokenExpired => {
            let mut all = dates("expires(");
            all.extend(dates("$t < "));
            let at = all.into_iter().min()?;
            Some(format!("the token expired at {}; it is now {} ({allowed})", rfc(at), rfc(now)))
        }
        DenyReason::NotYetValid => {
            let at = dates("not_before(").into_iter().max()?;
            Some(format!("the token is not valid before {}; it is now {} ({allowed})", rfc(at), rfc(now)))
        }
        _ => None,
    }
}

/// Maps failed checks to the most specific reason, in a fixed priority order.
/// Authorizer checks are identified by their position in [`POLICY`]; block checks by
/// the exact templates [`Token::attenuate`] writes. Anything else is an
/// attenuation check.
fn classify(checks: &[FailedCheck]) -> (DenyReason, String) {
    let mut found: Vec<(DenyReason, String)> = checks
        .iter()
        .map(|c| match c {
            FailedCheck::Authorizer(a) => {
                let reason = match a.check_id {
                    0 => DenyReason::WrongDataset,
                    1 => DenyReason::OperationNotGranted,
                    2 => DenyReason::ShardOutOfScope,
                    3 => DenyReason::TokenExpired,
                    4 => DenyReason::NotYetValid,
                    _ => DenyReason::AttenuationCheck,
                };
                (reason, format!("authorizer: {}", a.rule))
            }
            FailedCheck::Block(b) => {
                let r = &b.rule;
                let reason = if r.starts_with("check if time($t), $t < ") && !r.contains(" or ") {
                    DenyReason::TokenExpired
                } else if r.starts_with("check if shard($s), $s >= ") {
                    DenyReason::ShardOutOfScope
                } else if r.starts_with("check if operation($op), [") {
                    DenyReason::OperationNotGranted
                } else if r.starts_with(GENERATION_CHECK) && !r.contains(" or ") {
                    DenyReason::StaleGeneration
                } else {
                    DenyReason::AttenuationCheck
                };
                (reason, format!("block {}: {r}", b.block_id))
            }
        })
        .collect();
    let rank = |r: &DenyReason| match r {
        DenyReason::WrongDataset => 0,
        DenyReason::OperationNotGranted => 1,
        DenyReason::ShardOutOfScope => 2,
        DenyReason::TokenExpired => 3,
        DenyReason::NotYetValid => 4,
        DenyReason::StaleGeneration => 5,
        _ => 6,
    };
    found.sort_by_key(|(r, _)| rank(r));
    let rules: Vec<String> = found.iter().map(|(_, s)| s.clone()).collect();
    match found.first() {
        Some((r, _)) => (*r, bounded(&rules.join("; "))),
        None => (DenyReason::AttenuationCheck, "no policy matched".into()),
    }
}
