//! Errors of the cluster layer.

/// What went wrong talking to etcd or reading its records.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// etcd could not be reached or refused a request; retrying may help.
    #[error("{what}: {source}")]
    Etcd {
        what: String,
        #[source]
        source: etcd_client::Error,
    },
    /// A record in etcd is not what this version of hopps writes.
    #[error("record {key}: {message}")]
    Record { key: String, message: String },
    /// A setting (endpoints, cluster name) is unusable.
    #[error("{0}")]
    Config(String),
    /// The cluster is not in a state that allows the request (no such node, nothing placed).
    #[error("{0}")]
    State(String),
}

impl ClusterError {
    pub fn etcd(what: impl Into<String>, source: etcd_client::Error) -> Self {
        ClusterError::Etcd {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = ClusterError> = std::result::Result<T, E>;
