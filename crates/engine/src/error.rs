//! The one error type of hopps-engine.
//!
//! An [`EngineError`] carries an [`ErrorKind`] that the server maps to a gRPC status code in one
//! place, and a message that names the model, table, version or key concerned and says what to do.

use std::fmt;

/// What went wrong, one variant per gRPC status code the server answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request itself is unusable (lengths, unknown optimizer, rollback forward).
    InvalidArgument,
    /// A model, table, version or key does not exist.
    NotFound,
    /// The request is valid but the state does not allow it (a pinned version no longer readable,
    /// a model still loading, a rollback target outside the served history).
    FailedPrecondition,
    /// Memory limit or budget exceeded.
    ResourceExhausted,
    /// The repository or local disk could not be reached; a retry may help.
    Unavailable,
    /// A bug or damaged state; the message says what was being done.
    Internal,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::NotFound => "not found",
            ErrorKind::FailedPrecondition => "failed precondition",
            ErrorKind::ResourceExhausted => "resource exhausted",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        })
    }
}

/// An error of the engine.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct EngineError {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl EngineError {
    /// A new error of `kind`; `message` names the object and says what to do.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        EngineError {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub(crate) fn precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, message)
    }

    pub(crate) fn exhausted(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::ResourceExhausted, message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// A repository error met while doing `what` (which names the model and version).
    pub(crate) fn repository(what: impl fmt::Display, err: hopps_format::FormatError) -> Self {
        use hopps_format::ErrorKind as K;
        let kind = match err.kind() {
            K::NotFound => ErrorKind::NotFound,
            K::InvalidInput => ErrorKind::InvalidArgument,
            K::Corrupt => ErrorKind::Internal,
            K::Unavailable => ErrorKind::Unavailable,
            K::Conflict => ErrorKind::FailedPrecondition,
            K::Io => ErrorKind::Unavailable,
        };
        EngineError {
            kind,
            message: format!("{what}: {err}"),
            source: Some(Box::new(err)),
        }
    }

    /// A local file error of the write-ahead log.
    pub(crate) fn wal_io(what: impl fmt::Display, err: std::io::Error) -> Self {
        EngineError {
            kind: ErrorKind::Unavailable,
            message: format!(
                "{what}: {err}; check that the data directory is writable and has free space"
            ),
            source: Some(Box::new(err)),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message alone, without the source chain.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Short for results of this crate.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
