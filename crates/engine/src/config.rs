//! Engine configuration.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hopps_format::Repository;

use crate::coordinator::Coordinator;

/// When the write-ahead log is made durable (fsync) before writes are acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalSync {
    /// Every acknowledged write has been fsynced. Concurrent writes share one fsync (group
    /// commit): while one fsync runs, the next group gathers.
    Always,
    /// Writes are fsynced in groups at most this long after they are written; a write is still
    /// acknowledged only once its group is durable.
    Interval(Duration),
}

/// Everything an [`crate::Engine`] needs to run one node.
#[derive(Clone)]
pub struct EngineConfig {
    /// The model repository (source of truth for versions, checkpoints and history).
    pub repository: Repository,
    /// Models to serve; `None` = every model in the repository (new ones are picked up).
    pub models: Option<Vec<String>>,
    /// A load that would exceed this many bytes of accounted memory is refused before it starts.
    pub memory_limit: Option<u64>,
    /// Node-local state: the write-ahead logs, one directory per model under `wal/`.
    pub data_dir: PathBuf,
    /// Memory kept for undo records over all models; the oldest are dropped beyond it.
    pub undo_budget_bytes: u64,
    /// How often the repository is polled for new versions and rollback decisions.
    pub poll_interval: Duration,
    /// Durability policy of online writes.
    pub wal_sync: WalSync,
    /// Write a checkpoint of every serving model this often (`None` = only on demand).
    pub checkpoint_interval: Option<Duration>,
    /// How many checkpoints per model to keep (the newest ones; at least 1 is kept).
    pub checkpoint_retention: usize,
    /// This node's name in history records and status.
    pub node_id: String,
    /// The cluster this node belongs to; `None` (embedded): every shard, and versions switch as
    /// soon as they are applied.
    pub coordinator: Option<Arc<dyn Coordinator>>,
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineConfig")
            .field("repository", &self.repository.uri())
            .field("models", &self.models)
            .field("memory_limit", &self.memory_limit)
            .field("data_dir", &self.data_dir)
            .field("undo_budget_bytes", &self.undo_budget_bytes)
            .field("poll_interval", &self.poll_interval)
            .field("wal_sync", &self.wal_sync)
            .field("checkpoint_interval", &self.checkpoint_interval)
            .field("checkpoint_retention", &self.checkpoint_retention)
            .field("node_id", &self.node_id)
            .field("coordinator", &self.coordinator.is_some())
            .finish()
    }
}

impl EngineConfig {
    /// Defaults: every model, no memory limit, 1 GiB of undo records, polling every second,
    /// group commit every 10 ms, no scheduled checkpoints, 3 checkpoints kept.
    pub fn new(repository: Repository, data_dir: PathBuf) -> Self {
        let node_id = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "hopps-node".to_string());
        EngineConfig {
            repository,
            models: None,
            memory_limit: None,
            data_dir,
            undo_budget_bytes: 1 << 30,
            poll_interval: Duration::from_secs(1),
            wal_sync: WalSync::Interval(Duration::from_millis(10)),
            checkpoint_interval: None,
            checkpoint_retention: 3,
            node_id,
            coordinator: None,
        }
    }
}
