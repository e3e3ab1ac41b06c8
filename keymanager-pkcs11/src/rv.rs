//! PKCS#11 return values: their `CKR_*` names and what each means for the pool.

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

/// The `CKR_*` name of a return value (`PinIncorrect` → `CKR_PIN_INCORRECT`).
pub(crate) fn rv_name(rv: &RvError) -> String {
    match rv {
        RvError::VendorDefined(code) => format!("CKR_VENDOR_DEFINED+{code:#x}"),
        RvError::UnknownErrorCode(code) => format!("unknown return value {code:#x}"),
        other => format!("CKR_{}", upper_snake(&format!("{other:?}"))),
    }
}

/// The C name of a function (`Sign` → `C_Sign`).
pub(crate) fn function_name(f: &Function) -> String {
    format!("C_{f:?}")
}

fn upper_snake(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 8);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// What a failed call means for the connection to the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The token, the module or the sessions are gone, or a handle we had is no longer
    /// valid (SoftHSM2 when its token directory goes away): reconnect.
    Connection,
    /// Anything else: a permanent error of this call.
    Call,
}

pub(crate) fn classify(e: &CkError) -> Failure {
    let CkError::Pkcs11(rv, _) = e else {
        return Failure::Call;
    };
    match rv {
        RvError::DeviceError
        | RvError::DeviceRemoved
        | RvError::DeviceMemory
        | RvError::TokenNotPresent
        | RvError::TokenNotRecognized
        | RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::SessionCount
        | RvError::UserNotLoggedIn
        | RvError::CryptokiNotInitialized
        | RvError::GeneralError
        | RvError::SlotIdInvalid
        | RvError::ObjectHandleInvalid
        | RvError::KeyHandleInvalid => Failure::Connection,
        _ => Failure::Call,
    }
}

/// `C_Sign failed with CKR_DEVICE_ERROR`, or cryptoki's own message.
pub(crate) fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("{} failed with {}", function_name(f), rv_name(rv)),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(rv_name(&RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(rv_name(&RvError::DeviceRemoved), "CKR_DEVICE_REMOVED");
        assert_eq!(
            rv_name(&RvError::CryptokiNotInitialized),
            "CKR_CRYPTOKI_NOT_INITIALIZED"
        );
        assert_eq!(function_name(&Function::Sign), "C_Sign");
        assert_eq!(
            describe(&CkError::Pkcs11(
                RvError::SessionHandleInvalid,
                Function::Sign
            )),
            "C_Sign failed with CKR_SESSION_HANDLE_INVALID"
        );
    }
}
