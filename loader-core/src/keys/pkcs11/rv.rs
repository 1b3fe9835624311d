//! PKCS#11 return values: short names for messages, and which errors mean a dead session or a stale handle.

use cryptoki::error::{Error as CkError, RvError};

/// Short PKCS#11 return-value name for error messages: the return value and the function
/// (`PinIncorrect in Login`), not cryptoki's long description of the return value.
pub(super) fn ck_name(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("{rv:?} in {f:?}"),
        other => other.to_string(),
    }
}

/// The PKCS#11 return value of `e`, if the module returned one.
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

/// Errors that mean an object handle is stale (the token was re-inserted) or the object
/// is gone.
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
