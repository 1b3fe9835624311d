//! Access policy: Biscuit tokens, the [`Authorizer`] that decides (dataset, shard,
//! operation, now) for one token, and the revocation deny list. Policy only: this
//! module holds no keys and opens no shards. [`crate::access::Access`] composes it with
//! key release and the audit log.

mod authorizer;
mod fuzz;
mod revocation;
mod token;

pub use authorizer::{Authorizer, AuthorizerConfig, Clock};
pub(crate) use fuzz::token as fuzz_token;
pub use revocation::DenyList;
pub use token::{inspect_unverified, Attenuation, ShardSet, Token, TokenSpec};

pub use crate::error::{DenyReason, Operation};
