"""The one place that imports the native extension."""

from shardlock._native import (  # noqa: F401
    AccessDenied,
    AuditError,
    BatchOwner,
    FormatError,
    IntegrityError,
    InvalidToken,
    KeyUnavailable,
    MemoryLockError,
    NativeLoader,
    NativeWriter,
    OutOfScope,
    ShardlockError,
    TokenExpired,
    TokenRevoked,
    __version__,
    attenuate_token,
    create_issuer_key,
    create_keyring,
    issue_token,
    revoke_token,
)
