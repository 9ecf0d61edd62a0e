//! The one place where errors become gRPC status codes and metric labels.

use hopps_engine::{EngineError, ErrorKind};
use tonic::{Code, Status};

/// An error of the server itself (listeners, metrics exporter), as opposed to a request's.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The gRPC listener failed.
    #[error("gRPC server on {addr}: {source}")]
    Grpc {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The admin HTTP listener failed.
    #[error("admin HTTP server on {addr}: {source}")]
    Admin {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The model repository could not be opened.
    #[error("model repository {uri}: {source}")]
    Repository {
        uri: String,
        #[source]
        source: hopps_format::FormatError,
    },
    /// The engine could not be opened.
    #[error("{0}")]
    Engine(#[from] EngineError),
    /// The Prometheus exporter could not be set up.
    #[error("metrics exporter: {0}")]
    Metrics(String),
    /// The node cannot join its cluster (its id is taken, the engine has no cluster agent).
    #[error("{0}")]
    Cluster(String),
}

/// The gRPC code of an engine error kind.
pub fn code_of(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
    }
}

/// The gRPC status of an engine error: its code and its message (which says what to do).
pub fn status_of(err: &EngineError) -> Status {
    Status::new(code_of(err.kind()), err.to_string())
}

/// The `code` label of request metrics.
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_code() {
        let cases = [
            (ErrorKind::InvalidArgument, Code::InvalidArgument),
            (ErrorKind::NotFound, Code::NotFound),
            (ErrorKind::FailedPrecondition, Code::FailedPrecondition),
            (ErrorKind::ResourceExhausted, Code::ResourceExhausted),
            (ErrorKind::Unavailable, Code::Unavailable),
            (ErrorKind::Internal, Code::Internal),
        ];
        for (kind, code) in cases {
            let status = status_of(&EngineError::new(kind, "model \"m\": what to do"));
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), "model \"m\": what to do");
        }
    }
}
