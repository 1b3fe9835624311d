//! Typed exceptions, created once and mapped variant by variant from
//! `shardlock::Error`.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::{BoundObject, IntoPyObject};
use shardlock::{DenyReason, Error};

/// Declares each exception once and registers all of them in the module.
macro_rules! exceptions {
    ($($name:ident($base:ty) => $doc:literal;)*) => {
        $(create_exception!(shardlock, $name, $base, $doc);)*

        pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
            let py = m.py();
            $(m.add(stringify!($name), py.get_type::<$name>())?;)*
            Ok(())
        }
    };
}

exceptions! {
    ShardlockError(PyException) => "Base class of every shardlock error.";
    AccessDenied(ShardlockError) => "Authorization denied access to a shard; no key was unwrapped.";
    TokenExpired(AccessDenied) => "The access token expired (or is not valid yet).";
    TokenRevoked(AccessDenied) => "The access token was revoked.";
    OutOfScope(AccessDenied) => "The token does not cover this dataset, shard or operation.";
    InvalidToken(AccessDenied) => "The token is missing, corrupt, forged, or from another issuer.";
    IntegrityError(ShardlockError) => "Data failed authentication (tamper, truncation, substitution).";
    KeyUnavailable(ShardlockError) => "A key could not be found, read or used.";
    FormatError(ShardlockError) => "A file or input is malformed or does not fit the schema.";
    MemoryLockError(ShardlockError) => "Batch memory could not be locked in RAM.";
    AuditError(ShardlockError) => "The audit log could not be written or does not verify.";
    DeviceUnavailable(ShardlockError) => "No usable CUDA device (no driver, no such device, or no CUDA support in this build).";
    DeviceError(ShardlockError) => "A CUDA call failed while batches were copied to or decoded on the device.";
    DecodeError(ShardlockError) => "An image field's value could not be decoded (not JPEG/PNG/WebP, corrupt, truncated, or over max_pixels); it names shard, record and field.";
    RemoteError(ShardlockError) => "An s3:// dataset could not be read: store unavailable, object missing or modified, access denied, cache full.";
}

/// A Python object for an attribute value (None if it cannot be converted).
fn obj<'py, T: IntoPyObject<'py>>(py: Python<'py>, v: T) -> Py<PyAny> {
    v.into_pyobject(py).map(|o| o.into_any().unbind()).unwrap_or_else(|_| py.None())
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
                let attrs = vec![
                    ("reason", obj(py, reason.name())),
                    ("dataset", obj(py, dataset.clone())),
                    ("shard", obj(py, *shard)),
                    ("operation", obj(py, operation.map(|o| o.name()))),
                    ("rule", obj(py, rule.clone())),
                ];
                (err, attrs)
            }
            Error::Integrity { shard, chunk, kind } => (
                IntegrityError::new_err(msg),
                vec![
                    ("kind", obj(py, kind.name())),
                    ("dataset", obj(py, shard.dataset.clone())),
                    ("shard", obj(py, shard.index)),
                    ("chunk", obj(py, *chunk)),
                ],
            ),
            Error::Decompress { shard, record, field, .. } => (
                IntegrityError::new_err(msg),
                vec![
                    ("kind", obj(py, "decompress")),
                    ("dataset", obj(py, shard.dataset.clone())),
                    ("shard", obj(py, shard.index)),
                    ("record", obj(py, *record)),
                    ("field", obj(py, field.clone())),
                ],
            ),
            Error::Decode { shard, record, field, .. } => (
                DecodeError::new_err(msg),
                vec![
                    ("dataset", obj(py, shard.dataset.clone())),
                    ("shard", obj(py, shard.index)),
                    ("record", obj(py, *record)),
                    ("field", obj(py, field.clone())),
                ],
            ),
            Error::ManifestSignature { .. } => {
                (IntegrityError::new_err(msg), vec![("kind", obj(py, "manifest_signature"))])
            }
            Error::Rollback { .. } => (IntegrityError::new_err(msg), vec![("kind", obj(py, "rollback"))]),
            Error::KeyUnavailable { .. } | Error::InsecurePermissions { .. } => (KeyUnavailable::new_err(msg), vec![]),
            Error::KeyProvider { provider, kind, .. } => (
                KeyUnavailable::new_err(msg),
                vec![("kind", obj(py, kind.name())), ("provider", obj(py, provider.clone()))],
            ),
            Error::Format { .. } | Error::Input { .. } | Error::Schema { .. } => (FormatError::new_err(msg), vec![]),
            Error::MemoryLock { .. } => (MemoryLockError::new_err(msg), vec![]),
            Error::Audit { .. } => (AuditError::new_err(msg), vec![]),
            Error::DeviceUnavailable { device, .. } => {
                (DeviceUnavailable::new_err(msg), vec![("device", obj(py, device.clone()))])
            }
            Error::Device { device, op, .. } => {
                (DeviceError::new_err(msg), vec![("device", obj(py, device.clone())), ("op", obj(py, *op))])
            }
            Error::Remote { url, shard, kind, .. } => (
                RemoteError::new_err(msg),
                vec![("kind", obj(py, kind.name())), ("url", obj(py, url.clone())), ("shard", obj(py, *shard))],
            ),
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

/// `?`-friendly conversion.
pub(crate) trait IntoPy<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for shardlock::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
