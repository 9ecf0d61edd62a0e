//! The client's error: what went wrong, with the gRPC code and the server's message.

use tonic::Code;

/// An error of a call to a hopps node.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address could not be parsed.
    #[error("invalid server address {addr:?}: {reason}; give host:port or http://host:port")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// Why it is not an address.
        reason: String,
    },
    /// No connection could be made.
    #[error(
        "cannot connect to hopps at {addr}: {source}; is `hopps serve` running and listening there?"
    )]
    Connect {
        /// The address as given.
        addr: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The server answered with an error status.
    #[error("{}: {message}", code_name(*code))]
    Status {
        /// The gRPC status code.
        code: Code,
        /// The server's message (says what to fix).
        message: String,
    },
    /// The server's answer does not follow the protocol (e.g. a short values buffer).
    #[error("malformed answer to {what}: {reason}; are client and server versions compatible?")]
    Protocol {
        /// The call.
        what: String,
        /// What is wrong with the answer.
        reason: String,
    },
    /// A cluster-mode failure: etcd unreachable, no ready replica for a shard, a deadline spent
    /// on retries. The message names the cluster, model, shard or node and what to do; `code`
    /// is the gRPC code that fits it best (the last node's code when nodes answered).
    #[error("{message}")]
    Cluster {
        /// The gRPC code of the failure.
        code: Code,
        /// What failed and what to do.
        message: String,
    },
}

impl ClientError {
    /// The gRPC code of the failure: the server's for [`ClientError::Status`], `UNAVAILABLE` for
    /// connection failures, `INVALID_ARGUMENT` for a bad address, `INTERNAL` for a malformed answer.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::InvalidAddress { .. } => Some(Code::InvalidArgument),
            ClientError::Connect { .. } => Some(Code::Unavailable),
            ClientError::Status { code, .. } => Some(*code),
            ClientError::Protocol { .. } => Some(Code::Internal),
            ClientError::Cluster { code, .. } => Some(*code),
        }
    }

    /// Whether retrying the same call (possibly on another node) can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.code(),
            Some(
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Aborted
            )
        ) && !matches!(self, ClientError::InvalidAddress { .. })
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::Status {
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

/// The canonical upper-case name of a gRPC code, as operators search for it in logs.
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_keeps_code_and_message() {
        let err = ClientError::from(tonic::Status::not_found("model \"m\" is not served"));
        assert_eq!(err.code(), Some(Code::NotFound));
        assert_eq!(err.to_string(), "NOT_FOUND: model \"m\" is not served");
        assert!(!err.is_retryable());
        assert!(ClientError::from(tonic::Status::unavailable("x")).is_retryable());
    }
}
