//! The cluster's shared vocabulary: what nodes, the placement controller, clients and the CLI
//! write to and read from etcd.
//!
//! - [`keys`]: where each record lives under `/hopps/<cluster>/`;
//! - [`records`]: the JSON records (node registrations, placements, readiness reports, the
//!   serving version of each model, drain requests, per-model settings);
//! - [`plan`]: the placement algorithm (pure: nodes and models in, placement out);
//! - [`mirror`]: a live, read-only copy of one cluster's records, kept current by an etcd watch
//!   and kept as last seen while etcd is unreachable;
//! - [`connect`]: an etcd client with the timeouts every user of this crate wants.
//!
//! This crate knows etcd and the records; it knows nothing of tables, engines or gRPC.
#![forbid(unsafe_code)]

pub mod error;
pub mod keys;
pub mod mirror;
pub mod plan;
pub mod records;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::{ClusterError, Result};
pub use keys::Keys;
pub use mirror::{ClusterState, Mirror};
pub use records::*;

use std::time::Duration;

/// Splits an `--etcd` value ("host:port,host:port" or URLs) into endpoints.
pub fn parse_endpoints(spec: &str) -> Result<Vec<String>> {
    let eps: Vec<String> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if eps.is_empty() {
        return Err(ClusterError::Config(format!(
            "no etcd endpoint in {spec:?}; give one or more as host:port[,host:port]"
        )));
    }
    Ok(eps)
}

/// Checks a cluster name: it becomes part of every key, so it is kept to a safe alphabet.
pub fn check_cluster_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(ClusterError::Config(format!(
            "cluster name {name:?} is not valid; use 1-64 characters of letters, digits, '-', '_' \
             or '.'"
        )));
    }
    Ok(())
}

/// Connects to etcd. Every request has a deadline, so a lost etcd shows up as an error to
/// retry rather than a hang.
pub async fn connect(endpoints: &[String]) -> Result<etcd_client::Client> {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    etcd_client::Client::connect(endpoints, Some(opts))
        .await
        .map_err(|e| {
            ClusterError::etcd(format!("connecting to etcd at {}", endpoints.join(",")), e)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_names() {
        assert_eq!(
            parse_endpoints("127.0.0.1:2379, 127.0.0.1:2380").unwrap(),
            vec!["127.0.0.1:2379", "127.0.0.1:2380"]
        );
        assert!(parse_endpoints(" , ").is_err());
        assert!(check_cluster_name("prod-eu.1").is_ok());
        assert!(check_cluster_name("a/b").is_err());
        assert!(check_cluster_name("").is_err());
    }
}
