//! A live, read-only copy of one cluster's records.
//!
//! The mirror reads every key under the cluster's root, then follows an etcd watch from the
//! revision it read. When etcd cannot be reached the last state stays (with `connected`
//! false): nodes keep the placement they have and clients keep routing by it; the mirror
//! reconnects and reads everything again in the background.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::sync::watch;

use crate::error::{ClusterError, Result};
use crate::keys::{KeyKind, Keys};
use crate::records::*;

/// Every record of one cluster, as of `revision`.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    pub nodes: BTreeMap<String, NodeRecord>,
    pub placements: BTreeMap<String, Placement>,
    /// `reports[model][node]`.
    pub reports: BTreeMap<String, BTreeMap<String, ModelReport>>,
    pub serving: BTreeMap<String, Serving>,
    pub drains: BTreeMap<String, Drain>,
    pub settings: BTreeMap<String, ModelSettings>,
    /// The etcd revision this state reflects.
    pub revision: i64,
    /// False while etcd cannot be reached: the state is the last one seen.
    pub connected: bool,
    /// True once a first full read succeeded.
    pub synced: bool,
}

impl ClusterState {
    /// Applies a put of `key`. A record that does not decode is logged and ignored: one bad
    /// key must not take the cluster's view down.
    pub fn put(&mut self, keys: &Keys, key: &str, value: &[u8]) {
        fn read<T: for<'de> serde::Deserialize<'de>>(key: &str, value: &[u8]) -> Option<T> {
            decode(key, value)
                .map_err(|e| tracing::warn!(error = %e, "ignoring a cluster record"))
                .ok()
        }
        match keys.kind(key) {
            KeyKind::Node(n) => {
                if let Some(r) = read(key, value) {
                    self.nodes.insert(n, r);
                }
            }
            KeyKind::Report { model, node } => {
                if let Some(r) = read(key, value) {
                    self.reports.entry(model).or_default().insert(node, r);
                }
            }
            KeyKind::Placement(m) => {
                if let Some(r) = read(key, value) {
                    self.placements.insert(m, r);
                }
            }
            KeyKind::Serving(m) => {
                if let Some(r) = read(key, value) {
                    self.serving.insert(m, r);
                }
            }
            KeyKind::Drain(n) => {
                if let Some(r) = read(key, value) {
                    self.drains.insert(n, r);
                }
            }
            KeyKind::Settings(m) => {
                if let Some(r) = read(key, value) {
                    self.settings.insert(m, r);
                }
            }
            KeyKind::Other => {}
        }
    }

    /// Applies a delete of `key` (an expired lease deletes the node's keys this way).
    pub fn delete(&mut self, keys: &Keys, key: &str) {
        match keys.kind(key) {
            KeyKind::Node(n) => {
                self.nodes.remove(&n);
            }
            KeyKind::Report { model, node } => {
                if let Some(m) = self.reports.get_mut(&model) {
                    m.remove(&node);
                    if m.is_empty() {
                        self.reports.remove(&model);
                    }
                }
            }
            KeyKind::Placement(m) => {
                self.placements.remove(&m);
            }
            KeyKind::Serving(m) => {
                self.serving.remove(&m);
            }
            KeyKind::Drain(n) => {
                self.drains.remove(&n);
            }
            KeyKind::Settings(m) => {
                self.settings.remove(&m);
            }
            KeyKind::Other => {}
        }
    }

    /// The report of `node` about `model`, if the node is alive and reported.
    pub fn report(&self, model: &str, node: &str) -> Option<&ModelReport> {
        if !self.nodes.contains_key(node) {
            return None;
        }
        self.reports.get(model)?.get(node)
    }

    /// The version clients pin for `model` (None before the cluster first served it).
    pub fn serving_version(&self, model: &str) -> Option<u64> {
        self.serving.get(model).map(|s| s.version)
    }

    /// Nodes a lookup of `shard` of `model` pinned to `version` can go to now: placed on the
    /// shard, alive (lease held), reporting the shard held and the version readable; in
    /// placement order.
    pub fn replicas(&self, model: &str, shard: u32, version: Option<u64>) -> Vec<&NodeRecord> {
        let Some(p) = self.placements.get(model) else {
            return Vec::new();
        };
        let Some(nodes) = p.assignment.get(shard as usize) else {
            return Vec::new();
        };
        nodes
            .iter()
            .filter(|n| {
                self.report(model, n)
                    .is_some_and(|r| r.serves(shard, version))
            })
            .filter_map(|n| self.nodes.get(n))
            .collect()
    }
}

/// A [`ClusterState`] kept current in the background. Dropping the mirror stops it.
pub struct Mirror {
    keys: Keys,
    rx: watch::Receiver<Arc<ClusterState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Mirror {
    /// Starts mirroring cluster `cluster` from etcd at `endpoints`. Returns at once; use
    /// [`Mirror::synced`] to wait for the first full read.
    pub fn start(endpoints: Vec<String>, cluster: &str) -> Mirror {
        let keys = Keys::new(cluster);
        let (tx, rx) = watch::channel(Arc::new(ClusterState::default()));
        let task = tokio::spawn(follow(endpoints, keys.clone(), tx));
        Mirror { keys, rx, task }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The newest state.
    pub fn state(&self) -> Arc<ClusterState> {
        self.rx.borrow().clone()
    }

    /// A receiver that sees every new state.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.rx.clone()
    }

    /// Waits until the first full read of the cluster, at most `timeout`.
    pub async fn synced(&self, timeout: Duration) -> Result<Arc<ClusterState>> {
        let mut rx = self.rx.clone();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|s| s.synced)).await;
        match waited {
            Ok(Ok(s)) => Ok(s.clone()),
            _ => Err(ClusterError::State(format!(
                "could not read cluster {} from etcd within {timeout:?}; check --etcd and that \
                 etcd is running",
                self.keys.root()
            ))),
        }
    }
}

async fn follow(endpoints: Vec<String>, keys: Keys, tx: watch::Sender<Arc<ClusterState>>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match follow_once(&endpoints, &keys, &tx).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => tracing::debug!(error = %e, "cluster watch interrupted; retrying"),
        }
        if tx.is_closed() {
            return;
        }
        if tx.borrow().connected {
            tx.send_modify(|s| Arc::make_mut(s).connected = false);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One connection's worth of mirroring: a full read, then the watch until it breaks.
async fn follow_once(
    endpoints: &[String],
    keys: &Keys,
    tx: &watch::Sender<Arc<ClusterState>>,
) -> Result<()> {
    let mut client = crate::connect(endpoints).await?;
    let resp = client
        .get(keys.root(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| ClusterError::etcd(format!("reading {}", keys.root()), e))?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut state = ClusterState::default();
    for kv in resp.kvs() {
        if let Ok(k) = kv.key_str() {
            state.put(keys, k, kv.value());
        }
    }
    state.revision = revision;
    state.connected = true;
    state.synced = true;
    tx.send_replace(Arc::new(state));
    let mut stream = client
        .watch(
            keys.root(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await
        .map_err(|e| ClusterError::etcd(format!("watching {}", keys.root()), e))?;
    loop {
        let msg = stream
            .message()
            .await
            .map_err(|e| ClusterError::etcd(format!("watching {}", keys.root()), e))?;
        let Some(resp) = msg else {
            return Err(ClusterError::State("the etcd watch ended".into()));
        };
        if resp.canceled() {
            return Err(ClusterError::State(format!(
                "the etcd watch was canceled ({})",
                resp.cancel_reason()
            )));
        }
        if resp.events().is_empty() {
            continue;
        }
        tx.send_modify(|s| {
            let s = Arc::make_mut(s);
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let Ok(k) = kv.key_str() else { continue };
                match ev.event_type() {
                    EventType::Put => s.put(keys, k, kv.value()),
                    EventType::Delete => s.delete(keys, k),
                }
                s.revision = s.revision.max(kv.mod_revision());
            }
        });
        if tx.is_closed() {
            return Ok(());
        }
    }
}
