//! PKCS#11 return values: short names for messages, and which errors mean a dead session or a stale handle.

use cryptoki::error::{Error as CkError, RvError};

/// Short PKCS#11 return-value name for error messages (`CKR_...`-like).
pub(super) fn ck_name(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("{rv:?} in {f:?}"),
        other => other.to_string(),
    }
}

pub(super) fn rv(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// Errors after which a session (and probably every session of the token) is dead.
pub(super) fn is_fatal(e: &CkError) -> bool {
    matches!(
        rv(e),
        Some(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::DeviceMemory
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::CryptokiNotInitialized
                | RvError::UserNotLoggedIn
                | RvError::SlotIdInvalid
        )
    ) || matches!(e, CkError::LibraryLoading(_) | CkError::NullFunctionPointer)
}

pub(super) fn is_handle_invalid(e: &CkError) -> bool {
    matches!(
        rv(e),
        Some(
            RvError::KeyHandleInvalid
                | RvError::UnwrappingKeyHandleInvalid
                | RvError::WrappingKeyHandleInvalid
                | RvError::ObjectHandleInvalid
        )
    )
}
