//! The one place where failures become Python exceptions.
//!
//! The exception classes are defined in Python (`hopps/_errors.py`) so that they can inherit from
//! both `hopps.HoppsError` and the built-in class a Python programmer already catches
//! (`InvalidArgument` is a `ValueError`, `NotFound` a `LookupError`, `Unavailable` a
//! `ConnectionError`, `DeadlineExceeded` a `TimeoutError`). This module only picks the class:
//! by the gRPC code for a call to a node, by the error kind for the model repository.
//!
//! Invariant: the exception's message is the server's message unchanged for an error status (it
//! already names the model, table or key and says what to fix); for failures on this side it is
//! the Rust client's or repository's message, which name the address, file or version.

use hopps_client::{ClientError, Code};
use hopps_format::{ErrorKind, FormatError};
use pyo3::PyErr;

pyo3::import_exception!(hopps._errors, HoppsError);
pyo3::import_exception!(hopps._errors, Cancelled);
pyo3::import_exception!(hopps._errors, InvalidArgument);
pyo3::import_exception!(hopps._errors, DeadlineExceeded);
pyo3::import_exception!(hopps._errors, NotFound);
pyo3::import_exception!(hopps._errors, AlreadyExists);
pyo3::import_exception!(hopps._errors, PermissionDenied);
pyo3::import_exception!(hopps._errors, ResourceExhausted);
pyo3::import_exception!(hopps._errors, FailedPrecondition);
pyo3::import_exception!(hopps._errors, Aborted);
pyo3::import_exception!(hopps._errors, OutOfRange);
pyo3::import_exception!(hopps._errors, Unimplemented);
pyo3::import_exception!(hopps._errors, Internal);
pyo3::import_exception!(hopps._errors, Unavailable);
pyo3::import_exception!(hopps._errors, DataLoss);
pyo3::import_exception!(hopps._errors, Unauthenticated);

/// Everything the binding can fail with, before it becomes a Python exception.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    /// A call to a node failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The model repository refused or failed a publish.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The caller's arguments are unusable (dtype, shape, negative key, ...). The message names
    /// the call, model and table and says what to pass instead.
    #[error("{0}")]
    Input(String),
    /// An object that belongs to a parent process was used in a forked child.
    #[error("{0}")]
    Forked(String),
    /// The async runtime of the module could not start.
    #[error("cannot start the hopps client runtime: {0}")]
    Runtime(String),
}

/// tonic's message for a call that ran past the channel's timeout.
const TONIC_TIMEOUT: &str = "Timeout expired";

/// The gRPC code a failure is reported under (and so the Python class it raises).
pub(crate) fn code_of(failure: &Failure) -> Code {
    match failure {
        // tonic reports its own per-request deadline as CANCELLED "Timeout expired" (and the
        // client keeps only code and message); to a caller it is a deadline, not a cancel.
        Failure::Client(ClientError::Status {
            code: Code::Cancelled,
            message,
        }) if message == TONIC_TIMEOUT => Code::DeadlineExceeded,
        Failure::Client(err) => err.code().unwrap_or(Code::Unknown),
        Failure::Format(err) => match err.kind() {
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::InvalidInput => Code::InvalidArgument,
            ErrorKind::Corrupt => Code::DataLoss,
            ErrorKind::Unavailable => Code::Unavailable,
            // "Someone else got there first": a version number taken, a model created with
            // another spec.
            ErrorKind::Conflict => Code::AlreadyExists,
            ErrorKind::Io => Code::Internal,
        },
        Failure::Input(_) => Code::InvalidArgument,
        Failure::Forked(_) => Code::FailedPrecondition,
        Failure::Runtime(_) => Code::Internal,
    }
}

/// The message a Python user reads.
pub(crate) fn message_of(failure: &Failure) -> String {
    match failure {
        // The server's own message, without the code prefix of `ClientError`'s Display: the
        // exception class already says the code.
        Failure::Client(ClientError::Status { message, .. }) => message.clone(),
        other => other.to_string(),
    }
}

impl From<Failure> for PyErr {
    fn from(failure: Failure) -> PyErr {
        let message = message_of(&failure);
        match code_of(&failure) {
            Code::Cancelled => Cancelled::new_err(message),
            Code::InvalidArgument => InvalidArgument::new_err(message),
            Code::DeadlineExceeded => DeadlineExceeded::new_err(message),
            Code::NotFound => NotFound::new_err(message),
            Code::AlreadyExists => AlreadyExists::new_err(message),
            Code::PermissionDenied => PermissionDenied::new_err(message),
            Code::ResourceExhausted => ResourceExhausted::new_err(message),
            Code::FailedPrecondition => FailedPrecondition::new_err(message),
            Code::Aborted => Aborted::new_err(message),
            Code::OutOfRange => OutOfRange::new_err(message),
            Code::Unimplemented => Unimplemented::new_err(message),
            Code::Internal => Internal::new_err(message),
            Code::Unavailable => Unavailable::new_err(message),
            Code::DataLoss => DataLoss::new_err(message),
            Code::Unauthenticated => Unauthenticated::new_err(message),
            Code::Ok | Code::Unknown => HoppsError::new_err(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_keeps_the_servers_message_and_code() {
        let failure = Failure::from(ClientError::Status {
            code: Code::NotFound,
            message: "model \"m\" is not served by this node".to_string(),
        });
        assert_eq!(code_of(&failure), Code::NotFound);
        // The exception class already says the code: the message is the server's alone.
        assert_eq!(
            message_of(&failure),
            "model \"m\" is not served by this node"
        );
    }

    #[test]
    fn a_client_side_timeout_is_a_deadline() {
        let failure = Failure::from(ClientError::Status {
            code: Code::Cancelled,
            message: TONIC_TIMEOUT.to_string(),
        });
        assert_eq!(code_of(&failure), Code::DeadlineExceeded);
        let cancelled = Failure::from(ClientError::Status {
            code: Code::Cancelled,
            message: "the client went away".to_string(),
        });
        assert_eq!(code_of(&cancelled), Code::Cancelled);
    }

    #[test]
    fn repository_errors_map_by_kind() {
        let cases = [
            (ErrorKind::NotFound, Code::NotFound),
            (ErrorKind::InvalidInput, Code::InvalidArgument),
            (ErrorKind::Corrupt, Code::DataLoss),
            (ErrorKind::Unavailable, Code::Unavailable),
            (ErrorKind::Conflict, Code::AlreadyExists),
            (ErrorKind::Io, Code::Internal),
        ];
        for (kind, code) in cases {
            let failure = Failure::from(FormatError::new(kind, "model \"m\": something"));
            assert_eq!(code_of(&failure), code, "{kind:?}");
            assert_eq!(message_of(&failure), "model \"m\": something");
        }
    }

    #[test]
    fn bad_input_is_invalid_argument() {
        let failure = Failure::Input("keys must be 1-D".to_string());
        assert_eq!(code_of(&failure), Code::InvalidArgument);
        assert_eq!(message_of(&failure), "keys must be 1-D");
    }
}
