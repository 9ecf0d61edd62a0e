//! Plain data the engine reports: status, versions, history, acknowledgements.
//!
//! Every struct here derives `serde::Serialize`; the server prints them as JSON as they are.

use serde::Serialize;

/// Acknowledgement of an online write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WriteAck {
    /// The version the write was applied on top of.
    pub version: u64,
    /// Rows written.
    pub rows: u64,
    /// Write-ahead-log sequence number; durable when acknowledged.
    pub sequence: u64,
}

/// What a client needs to know about a table to size its buffers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableMeta {
    pub dim: u32,
    pub dtype: String,
    /// "zeros", "error" or "random".
    pub missing: String,
    pub optimizer: Option<String>,
}

/// One table of a model on this node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableStatus {
    pub name: String,
    pub dim: u32,
    pub dtype: String,
    pub missing: String,
    pub optimizer: Option<String>,
    pub rows: u64,
    pub capacity: u64,
    pub load_factor: f64,
    pub bytes: u64,
}

/// A model served (or being loaded) by this node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub shards: u32,
    pub tables: Vec<TableStatus>,
    pub serving_version: Option<u64>,
}

/// Progress of the load in flight.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadProgress {
    pub version: u64,
    pub rows_done: u64,
    pub rows_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub eta_seconds: f64,
    /// Unix time of the last progress (for stall detection).
    pub last_progress_unix: f64,
}

/// One model's state on this node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelStatus {
    pub name: String,
    /// "loading", "serving" or "failed".
    pub state: String,
    pub serving_version: Option<u64>,
    /// The newest committed version this node would serve: the tip of the served chain, so
    /// versions rolled back over and deltas off the chain are not counted as pending.
    pub newest_version: Option<u64>,
    pub load: Option<LoadProgress>,
    pub last_error: Option<String>,
    pub load_failures: u64,
    pub rows: u64,
    /// Tables, staged rows and undo records.
    pub memory_bytes: u64,
    pub undo_bytes: u64,
    pub load_factor: f64,
    pub tables: Vec<TableStatus>,
    /// Shards this node holds (sorted); `None` when it holds every shard.
    pub held_shards: Option<Vec<u32>>,
}

/// This node's state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeStatus {
    pub node_id: String,
    pub ready: bool,
    pub memory_used: u64,
    pub memory_limit: Option<u64>,
    pub wal_bytes: u64,
    pub models: Vec<ModelStatus>,
}

/// A version of a model as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionState {
    pub version: u64,
    /// "full", "delta" or "checkpoint".
    pub kind: String,
    pub parent: Option<u64>,
    pub rows: u64,
    pub created: String,
    pub source: String,
    /// "serving", "staged", "committed", "rolled_back", "failed" or "aborted".
    pub state: String,
}

/// The outcome of a rollback.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RollbackReport {
    pub model: String,
    pub from: u64,
    pub to: u64,
    /// "undo" (instant, from undo records) or "rebuild" (checkpoint + deltas).
    pub method: String,
    pub seconds: f64,
}

/// One entry of a model's append-only history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryEvent {
    /// RFC 3339.
    pub time: String,
    /// "served" or "rolled_back".
    pub event: String,
    pub version: u64,
    pub from_version: Option<u64>,
    pub detail: String,
}

/// The outcome of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointReport {
    pub model: String,
    pub version: u64,
    pub rows: u64,
    pub bytes: u64,
    pub seconds: f64,
}

/// One model as a cluster sees it on this node: what it holds and which versions it can serve.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelReport {
    pub model: String,
    /// The model's shard count (0 when not known yet).
    pub shards: u32,
    /// Shards whose rows this node holds and serves (sorted).
    pub held: Vec<u32>,
    /// The default version.
    pub serving: Option<u64>,
    /// Every version a pinned lookup can read now (including a staged one), ascending.
    pub readable: Vec<u64>,
    /// A version staged and waiting for `Gate::Go`.
    pub staged: Option<u64>,
    /// "loading", "serving" or "failed".
    pub state: String,
    /// Shards being loaded (a re-load for a new shard set), sorted.
    pub loading: Vec<u32>,
    /// Tables, staged rows and undo records.
    pub memory_bytes: u64,
    /// The held shards' tables alone: what a replica of them costs on another node.
    pub table_bytes: u64,
    pub rows: u64,
    pub error: Option<String>,
}
