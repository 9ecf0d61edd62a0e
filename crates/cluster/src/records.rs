//! The records kept in etcd, as JSON (so `etcdctl get --prefix /hopps/` reads as text).
//!
//! Every field a later version adds must have a serde default, so nodes of two versions can
//! share a cluster during a rolling upgrade.

use serde::{Deserialize, Serialize};

use crate::error::{ClusterError, Result};

/// A node's registration, kept under the node's lease: a node whose lease expires (crashed,
/// partitioned from etcd) disappears from the cluster and is no longer routed to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    /// Where clients send gRPC requests (`host:port`).
    pub grpc_addr: String,
    /// The admin HTTP port (`host:port`): /metrics, /healthz, /readyz, /status.
    #[serde(default)]
    pub admin_addr: String,
    /// 0 when the node has no memory limit.
    #[serde(default)]
    pub memory_limit_bytes: u64,
    #[serde(default)]
    pub memory_used_bytes: u64,
    /// False while the node cannot serve (its repository is unreachable, shutting down).
    #[serde(default)]
    pub healthy: bool,
    /// Unix time the node started.
    #[serde(default)]
    pub started_unix: f64,
    /// hopps build version of the node.
    #[serde(default)]
    pub build: String,
}

/// Where the shards of one model live. Written only by the placement controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub model: String,
    /// The model's shard count (from its model.json).
    pub shards: u32,
    /// Replicas each shard should have.
    pub replicas: u32,
    /// Bumped at every change of `assignment`.
    pub epoch: u64,
    /// `assignment[s]`: the nodes that hold or load shard `s`, preferred first. While a shard
    /// moves it lists more than `replicas` nodes: the new ones load while the old ones serve
    /// (make before break); clients route only to nodes whose report says the shard is held.
    pub assignment: Vec<Vec<String>>,
}

impl Placement {
    /// Shards placed on `node`.
    pub fn shards_of(&self, node: &str) -> Vec<u32> {
        self.assignment
            .iter()
            .enumerate()
            .filter(|(_, nodes)| nodes.iter().any(|n| n == node))
            .map(|(s, _)| s as u32)
            .collect()
    }
}

/// What one node says about one model it was placed on, under the node's lease. Mirrors the
/// engine's report of that model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelReport {
    pub node: String,
    pub model: String,
    /// The model's shard count as the node knows it (0 before the node read model.json).
    #[serde(default)]
    pub shards: u32,
    /// Shards the node holds and serves, sorted.
    #[serde(default)]
    pub held: Vec<u32>,
    /// Shards being loaded.
    #[serde(default)]
    pub loading: Vec<u32>,
    /// The node's default version of the model.
    #[serde(default)]
    pub serving: Option<u64>,
    /// Every version a lookup pinned to it can read on this node now.
    #[serde(default)]
    pub readable: Vec<u64>,
    /// A version staged and waiting for the cluster to switch to it.
    #[serde(default)]
    pub staged: Option<u64>,
    /// "loading", "serving" or "failed".
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub error: Option<String>,
    /// Tables, staged rows and undo records of the model on the node.
    #[serde(default)]
    pub memory_bytes: u64,
    /// The held shards' tables alone: what the placement plans with.
    #[serde(default)]
    pub table_bytes: u64,
    #[serde(default)]
    pub rows: u64,
}

impl ModelReport {
    /// True when a lookup of `shard` pinned to `version` can be sent to this node.
    pub fn serves(&self, shard: u32, version: Option<u64>) -> bool {
        self.held.binary_search(&shard).is_ok()
            && version.is_none_or(|v| self.readable.contains(&v))
    }
}

/// The version of a model the whole cluster serves: clients pin it, so a fan-out never mixes
/// versions. Written by the controller once every replica has the version readable (the
/// second phase of a switch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Serving {
    pub model: String,
    pub version: u64,
    /// The version served before this record (None for the first).
    #[serde(default)]
    pub previous: Option<u64>,
    /// RFC 3339 time of the switch.
    #[serde(default)]
    pub time: String,
}

/// An operator's request to empty a node. The controller moves the node's replicas elsewhere,
/// waits until they are ready, then sets `released`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    pub node: String,
    /// RFC 3339 time of the request.
    #[serde(default)]
    pub requested: String,
    /// True once no placement lists the node: it can be stopped without failing a lookup.
    #[serde(default)]
    pub released: bool,
}

/// Settings of one model in this cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSettings {
    /// Replicas per shard (overrides the controller's default).
    pub replicas: u32,
}

/// Encodes a record for etcd.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Records are plain structs of strings and numbers: serialising them cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

/// Decodes the record stored at `key`.
pub fn decode<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| ClusterError::Record {
        key: key.to_string(),
        message: format!(
            "not a record this version of hopps reads ({e}); was it written by hand or by a newer \
             hopps?"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_tolerate_missing_fields() {
        let p = Placement {
            model: "ctr".into(),
            shards: 2,
            replicas: 2,
            epoch: 3,
            assignment: vec![vec!["a".into(), "b".into()], vec!["b".into(), "c".into()]],
        };
        let back: Placement = decode("k", &encode(&p)).unwrap();
        assert_eq!(back, p);
        assert_eq!(p.shards_of("b"), vec![0, 1]);
        assert_eq!(p.shards_of("c"), vec![1]);
        let r: ModelReport = decode(
            "k",
            br#"{"node":"a","model":"ctr","held":[0,3],"readable":[4,5]}"#,
        )
        .unwrap();
        assert!(r.serves(3, Some(5)));
        assert!(r.serves(0, None));
        assert!(!r.serves(1, Some(5)));
        assert!(!r.serves(3, Some(6)));
        let e = decode::<NodeRecord>("/hopps/c/nodes/x", b"{").unwrap_err();
        assert!(e.to_string().contains("/hopps/c/nodes/x"), "{e}");
    }
}
