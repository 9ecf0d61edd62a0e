//! The one error type of hopps-format.
//!
//! Errors carry a [`ErrorKind`] and whether a retry can help, so callers (the engine's loader,
//! the CLI, the server's status mapping) decide on data, not on message text. The message always
//! names the model, version, table or file concerned and says what to do about it.

use std::fmt;

/// What went wrong, coarse enough to map to gRPC codes and exit statuses in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A model, version, table or file does not exist.
    NotFound,
    /// The caller gave something unusable: a bad URI, a wrong dim, NaN values, a bad name.
    InvalidInput,
    /// Stored bytes are damaged: checksum or size mismatch, truncated file, bad magic.
    Corrupt,
    /// Storage could not be reached (timeout, connection refused); a retry may help.
    Unavailable,
    /// Someone else got there first (a version number taken, a model with another spec).
    Conflict,
    /// Any other storage or local I/O failure.
    Io,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Corrupt => "corrupt data",
            ErrorKind::Unavailable => "storage unavailable",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Io => "I/O error",
        })
    }
}

/// An error of the model repository or of a file format.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct FormatError {
    kind: ErrorKind,
    message: String,
    retryable: bool,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl FormatError {
    /// A new error of `kind`; `message` names the object and says what to do.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        FormatError {
            kind,
            message: message.into(),
            retryable: kind == ErrorKind::Unavailable,
            source: None,
        }
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    pub(crate) fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }

    pub(crate) fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }

    /// Attach the underlying cause (shown by `{:#}` in anyhow and by `source()`).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// A local file error (publish inputs, fast segment reads).
    pub(crate) fn local_io(path: &std::path::Path, what: &str, err: std::io::Error) -> Self {
        let kind = match err.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::UnexpectedEof => ErrorKind::Corrupt,
            _ => ErrorKind::Io,
        };
        let hint = match kind {
            ErrorKind::NotFound => "check the path",
            ErrorKind::Corrupt => "the file is truncated; write it again",
            _ => "check permissions and free space",
        };
        let msg = format!("{what} {}: {err}; {hint}", path.display());
        Self::new(kind, msg).with_source(err)
    }

    /// A storage error while doing `what` (which names the path in the repository).
    pub(crate) fn storage(what: impl fmt::Display, err: opendal::Error) -> Self {
        use opendal::ErrorKind as K;
        let (kind, hint) = match err.kind() {
            K::NotFound => (
                ErrorKind::NotFound,
                "check the repository URI, model and version",
            ),
            K::PermissionDenied => (
                ErrorKind::InvalidInput,
                "check the storage credentials and their permissions",
            ),
            K::ConfigInvalid => (
                ErrorKind::InvalidInput,
                "check the repository URI and storage options",
            ),
            K::ConditionNotMatch | K::AlreadyExists => (
                ErrorKind::Conflict,
                "another writer got there first; list the versions and retry",
            ),
            K::RateLimited => (
                ErrorKind::Unavailable,
                "the store throttles requests; retry later",
            ),
            _ if err.is_temporary() => (
                ErrorKind::Unavailable,
                "the storage endpoint did not answer in time; check that it is reachable and retry",
            ),
            _ => (
                ErrorKind::Io,
                "check that the storage endpoint is reachable and writable",
            ),
        };
        let mut e = Self::new(kind, format!("{what}: {}; {hint}", err.kind()));
        e.retryable = kind == ErrorKind::Unavailable || err.is_temporary();
        e.with_source(err)
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether the same call may succeed if retried later (timeouts, throttling).
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The message alone, without the source chain.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Short for results of this crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;
