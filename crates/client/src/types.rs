//! The client's own types for what a node answers, converted from the wire types.
//! They derive `Serialize` so the CLI prints them as JSON unchanged.

use hopps_proto::packed;
use hopps_proto::v1;
use serde::Serialize;

/// Rows of one table for a batch of keys, in key order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rows {
    /// The version the rows were read at.
    pub version: u64,
    /// Floats per row.
    pub dim: u32,
    /// `keys.len() * dim` floats, row after row. Rows of missing keys follow the table's
    /// missing-key policy (zeros or a deterministic per-key init).
    pub values: Vec<f32>,
    /// Whether each key was found.
    pub found: Vec<bool>,
}

impl Rows {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.found.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    /// The row of the `i`-th key, or `None` past the end.
    pub fn row(&self, i: usize) -> Option<&[f32]> {
        let dim = self.dim as usize;
        self.values.get(i * dim..(i + 1) * dim)
    }

    pub(crate) fn from_wire(
        version: u64,
        dim: u32,
        count: u32,
        values: &[u8],
        found: &[u8],
        keys: usize,
    ) -> Result<Rows, String> {
        if count as usize != keys {
            return Err(format!("sent {keys} keys, got {count} rows"));
        }
        let mut rows = Rows {
            version,
            dim,
            values: Vec::new(),
            found: Vec::new(),
        };
        if !packed::unpack_values_into(values, &mut rows.values)
            || rows.values.len() != keys * dim as usize
        {
            return Err(format!(
                "{} value bytes for {keys} rows of dim {dim}",
                values.len()
            ));
        }
        if !packed::unpack_bitmap_into(found, keys, &mut rows.found) {
            return Err(format!("{} bitmap bytes for {keys} keys", found.len()));
        }
        Ok(rows)
    }
}

/// Rows of one table within a [`MultiRows`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableRows {
    /// The table.
    pub table: String,
    /// Its rows.
    pub rows: Rows,
}

/// Rows of several tables of one model, read at one version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MultiRows {
    /// The version every table was read at.
    pub version: u64,
    /// One entry per requested table, in request order.
    pub tables: Vec<TableRows>,
}

/// Acknowledgement of an online write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WriteAck {
    /// The version the write was applied on top of.
    pub version: u64,
    /// Rows written.
    pub rows: u64,
    /// Write-ahead-log sequence number (0 when not logged).
    pub sequence: u64,
}

impl From<v1::WriteResponse> for WriteAck {
    fn from(w: v1::WriteResponse) -> Self {
        WriteAck {
            version: w.version,
            rows: w.rows,
            sequence: w.sequence,
        }
    }
}

/// A table of a served model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableInfo {
    pub name: String,
    pub dim: u32,
    /// Storage dtype: f32, f16, bf16 or int8.
    pub dtype: String,
    /// Missing-key policy: zeros, error or random.
    pub missing: String,
    pub rows: u64,
    /// Slots of the hash tables.
    pub capacity: u64,
    /// rows / capacity.
    pub load_factor: f64,
    /// Bytes held.
    pub bytes: u64,
    /// Server-side optimizer for pushes.
    pub optimizer: Option<String>,
}

impl From<v1::TableInfo> for TableInfo {
    fn from(t: v1::TableInfo) -> Self {
        TableInfo {
            name: t.name,
            dim: t.dim,
            dtype: t.dtype,
            missing: t.missing,
            rows: t.rows,
            capacity: t.capacity,
            load_factor: t.load_factor,
            bytes: t.bytes,
            optimizer: non_empty(t.optimizer),
        }
    }
}

/// A model a node holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub shards: u32,
    pub tables: Vec<TableInfo>,
    /// The version served by default; `None` while the first load runs.
    pub serving_version: Option<u64>,
}

impl From<v1::ModelInfo> for ModelInfo {
    fn from(m: v1::ModelInfo) -> Self {
        ModelInfo {
            name: m.name,
            shards: m.shards,
            tables: m.tables.into_iter().map(TableInfo::from).collect(),
            serving_version: m.serving_version,
        }
    }
}

/// A version of a model as a node sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionInfo {
    pub version: u64,
    /// full, delta or checkpoint.
    pub kind: String,
    pub parent: Option<u64>,
    pub rows: u64,
    /// RFC 3339.
    pub created: String,
    pub source: String,
    /// serving, staged, committed, rolled_back, failed or aborted.
    pub state: String,
}

impl From<v1::VersionInfo> for VersionInfo {
    fn from(v: v1::VersionInfo) -> Self {
        VersionInfo {
            version: v.version,
            kind: v.kind,
            parent: v.parent,
            rows: v.rows,
            created: v.created,
            source: v.source,
            state: v.state,
        }
    }
}

/// Progress of a version being loaded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadProgress {
    pub version: u64,
    pub rows_done: u64,
    pub rows_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub eta_seconds: f64,
    /// Unix time of the last progress.
    pub last_progress_unix: f64,
}

impl From<v1::LoadProgress> for LoadProgress {
    fn from(l: v1::LoadProgress) -> Self {
        LoadProgress {
            version: l.version,
            rows_done: l.rows_done,
            rows_total: l.rows_total,
            bytes_done: l.bytes_done,
            bytes_total: l.bytes_total,
            eta_seconds: l.eta_seconds,
            last_progress_unix: l.last_progress_unix,
        }
    }
}

/// Status of one model on a node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelStatus {
    pub name: String,
    /// loading, serving or failed.
    pub state: String,
    pub serving_version: Option<u64>,
    /// Newest committed version in the repository.
    pub newest_version: Option<u64>,
    pub load: Option<LoadProgress>,
    pub last_error: Option<String>,
    pub load_failures: u64,
    pub rows: u64,
    pub memory_bytes: u64,
    pub undo_bytes: u64,
    pub load_factor: f64,
    pub tables: Vec<TableInfo>,
}

impl From<v1::ModelStatus> for ModelStatus {
    fn from(m: v1::ModelStatus) -> Self {
        ModelStatus {
            name: m.name,
            state: m.state,
            serving_version: m.serving_version,
            newest_version: m.newest_version,
            load: m.load.map(LoadProgress::from),
            last_error: non_empty(m.last_error),
            load_failures: m.load_failures,
            rows: m.rows,
            memory_bytes: m.memory_bytes,
            undo_bytes: m.undo_bytes,
            load_factor: m.load_factor,
            tables: m.tables.into_iter().map(TableInfo::from).collect(),
        }
    }
}

/// Status of a node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeStatus {
    pub node_id: String,
    /// hopps build version of the node.
    pub version: String,
    /// Every configured model is loaded.
    pub ready: bool,
    pub uptime_seconds: f64,
    pub repository: String,
    /// `None` when the node has no memory limit.
    pub memory_limit_bytes: Option<u64>,
    pub memory_used_bytes: u64,
    pub wal_bytes: u64,
    pub models: Vec<ModelStatus>,
}

impl From<v1::StatusResponse> for NodeStatus {
    fn from(s: v1::StatusResponse) -> Self {
        NodeStatus {
            node_id: s.node_id,
            version: s.version,
            ready: s.ready,
            uptime_seconds: s.uptime_seconds,
            repository: s.repository,
            memory_limit_bytes: (s.memory_limit_bytes > 0).then_some(s.memory_limit_bytes),
            memory_used_bytes: s.memory_used_bytes,
            wal_bytes: s.wal_bytes,
            models: s.models.into_iter().map(ModelStatus::from).collect(),
        }
    }
}

/// What a rollback did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RollbackReport {
    pub model: String,
    pub from: u64,
    pub to: u64,
    /// undo (instant, from undo records) or rebuild (checkpoint + deltas).
    pub method: String,
    pub seconds: f64,
}

impl From<v1::RollbackResponse> for RollbackReport {
    fn from(r: v1::RollbackResponse) -> Self {
        RollbackReport {
            model: r.model,
            from: r.from_version,
            to: r.to_version,
            method: r.method,
            seconds: r.seconds,
        }
    }
}

/// One entry of a model's serving history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryEvent {
    /// RFC 3339.
    pub time: String,
    /// served or rolled_back.
    pub event: String,
    pub version: u64,
    pub from_version: Option<u64>,
    pub detail: String,
}

impl From<v1::HistoryEvent> for HistoryEvent {
    fn from(h: v1::HistoryEvent) -> Self {
        HistoryEvent {
            time: h.time,
            event: h.event,
            version: h.version,
            from_version: h.from_version,
            detail: h.detail,
        }
    }
}

/// What a checkpoint wrote.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointReport {
    pub model: String,
    pub version: u64,
    pub rows: u64,
    pub bytes: u64,
    pub seconds: f64,
}

impl From<v1::CheckpointResponse> for CheckpointReport {
    fn from(c: v1::CheckpointResponse) -> Self {
        CheckpointReport {
            model: c.model,
            version: c.version,
            rows: c.rows,
            bytes: c.bytes,
            seconds: c.seconds,
        }
    }
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() { None } else { Some(s) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_from_wire_checks_lengths() {
        let values = packed::pack_values(&[1.0, 2.0, 3.0, 4.0]);
        let mut found = bytes::BytesMut::new();
        packed::put_bitmap(&mut found, &[true, false]);
        let rows = Rows::from_wire(7, 2, 2, &values, &found, 2).expect("well formed");
        assert_eq!(rows.row(1), Some(&[3.0f32, 4.0][..]));
        assert_eq!(rows.found, vec![true, false]);
        assert_eq!(rows.version, 7);
        assert!(rows.row(2).is_none());
        assert!(Rows::from_wire(7, 2, 2, &values[..12], &found, 2).is_err());
        assert!(Rows::from_wire(7, 2, 3, &values, &found, 2).is_err());
        assert!(Rows::from_wire(7, 2, 2, &values, &[], 2).is_err());
    }
}
