//! Typed exceptions, created once and mapped variant by variant from
//! `shardlock::Error`.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use shardlock::{DenyReason, Error};

create_exception!(shardlock, ShardlockError, PyException, "Base class of every shardlock error.");
create_exception!(
    shardlock,
    AccessDenied,
    ShardlockError,
    "Authorization denied access to a shard; no key was unwrapped."
);
create_exception!(shardlock, TokenExpired, AccessDenied, "The access token expired (or is not valid yet).");
create_exception!(shardlock, TokenRevoked, AccessDenied, "The access token was revoked.");
create_exception!(shardlock, OutOfScope, AccessDenied, "The token does not cover this dataset, shard or operation.");
create_exception!(
    shardlock,
    InvalidToken,
    AccessDenied,
    "The token is missing, corrupt, forged, or from another issuer."
);
create_exception!(
    shardlock,
    IntegrityError,
    ShardlockError,
    "Data failed authentication (tamper, truncation, substitution)."
);
create_exception!(shardlock, KeyUnavailable, ShardlockError, "A key could not be found, read or used.");
create_exception!(shardlock, FormatError, ShardlockError, "A file or input is malformed or does not fit the schema.");
create_exception!(shardlock, MemoryLockError, ShardlockError, "Batch memory could not be locked in RAM.");
create_exception!(shardlock, AuditError, ShardlockError, "The audit log could not be written or does not verify.");

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    for (name, ty) in [
        ("ShardlockError", py.get_type::<ShardlockError>()),
        ("AccessDenied", py.get_type::<AccessDenied>()),
        ("TokenExpired", py.get_type::<TokenExpired>()),
        ("TokenRevoked", py.get_type::<TokenRevoked>()),
        ("OutOfScope", py.get_type::<OutOfScope>()),
        ("InvalidToken", py.get_type::<InvalidToken>()),
        ("IntegrityError", py.get_type::<IntegrityError>()),
        ("KeyUnavailable", py.get_type::<KeyUnavailable>()),
        ("FormatError", py.get_type::<FormatError>()),
        ("MemoryLockError", py.get_type::<MemoryLockError>()),
        ("AuditError", py.get_type::<AuditError>()),
    ] {
        m.add(name, ty)?;
    }
    Ok(())
}

/// Converts a core error into its Python exception, with attributes naming where.
pub(crate) fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    Python::attach(|py| {
        let (err, attrs): (PyErr, Vec<(&str, Py<PyAny>)>) = match &e {
            Error::AccessDenied { dataset, shard, operation, reason, rule } => {
                let err = match reason {
                    DenyReason::TokenExpired | DenyReason::NotYetValid => TokenExpired::new_err(msg),
                    DenyReason::Revoked => TokenRevoked::new_err(msg),
                    DenyReason::WrongDataset | DenyReason::ShardOutOfScope | DenyReason::OperationNotGranted => {
                        OutOfScope::new_err(msg)
                    }
                    DenyReason::MissingToken | DenyReason::InvalidToken => InvalidToken::new_err(msg),
                    _ => AccessDenied::new_err(msg),
                };
                (
                    err,
                    vec![
                        (
                            "reason",
                            reason
                                .name()
                                .into_pyobject(py)
                                .map(|o| o.into_any().unbind())
                                .unwrap_or_else(|_| py.None()),
                        ),
                        (
                            "dataset",
                            dataset
                                .clone()
                                .into_pyobject(py)
                                .map(|o| o.into_any().unbind())
                                .unwrap_or_else(|_| py.None()),
                        ),
                        ("shard", shard.into_pyobject(py).map(|o| o.into_any().unbind()).unwrap_or_else(|_| py.None())),
                        (
                            "operation",
                            operation
                                .map(|o| o.name())
                                .into_pyobject(py)
                                .map(|o| o.into_any().unbind())
                                .unwrap_or_else(|_| py.None()),
                        ),
                        (
                            "rule",
                            rule.clone().into_pyobject(py).map(|o| o.into_any().unbind()).unwrap_or_else(|_| py.None()),
                        ),
                    ],
                )
            }
            Error::Integrity { shard, chunk, kind } => (
                IntegrityError::new_err(msg),
                vec![
                    (
                        "kind",
                        kind.name().into_pyobject(py).map(|o| o.into_any().unbind()).unwrap_or_else(|_| py.None()),
                    ),
                    (
                        "dataset",
                        shard
                            .dataset
                            .clone()
                            .into_pyobject(py)
                            .map(|o| o.into_any().unbind())
                            .unwrap_or_else(|_| py.None()),
                    ),
                    (
                        "shard",
                        shard.index.into_pyobject(py).map(|o| o.into_any().unbind()).unwrap_or_else(|_| py.None()),
                    ),
                    ("chunk", chunk.into_pyobject(py).map(|o| o.into_any().unbind()).unwrap_or_else(|_| py.None())),
                ],
            ),
            Error::ManifestSignature { .. } => {
                (IntegrityError::new_err(msg), vec![("kind", kind_obj(py, "manifest_signature"))])
            }
            Error::Rollback { .. } => (IntegrityError::new_err(msg), vec![("kind", kind_obj(py, "rollback"))]),
            Error::KeyUnavailable { .. } | Error::InsecurePermissions { .. } => (KeyUnavailable::new_err(msg), vec![]),
            Error::KeyProvider { provider, kind, .. } => (
                KeyUnavailable::new_err(msg),
                vec![("kind", kind_obj(py, kind.name())), ("provider", kind_obj(py, provider))],
            ),
            Error::Format { .. } | Error::Input { .. } | Error::Schema { .. } => (FormatError::new_err(msg), vec![]),
            Error::MemoryLock { .. } => (MemoryLockError::new_err(msg), vec![]),
            Error::Audit { .. } => (AuditError::new_err(msg), vec![]),
            Error::InvalidArgument(_) => (pyo3::exceptions::PyValueError::new_err(msg), vec![]),
            _ => (ShardlockError::new_err(msg), vec![]),
        };
        let value = err.value(py);
        for (k, v) in attrs {
            let _ = value.setattr(k, v);
        }
        err
    })
}

fn kind_obj(py: Python<'_>, s: &str) -> Py<PyAny> {
    s.into_pyobject(py).map(|o| o.into_any().unbind()).unwrap_or_else(|_| py.None())
}

/// `?`-friendly conversion.
pub(crate) trait IntoPy<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for shardlock::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
