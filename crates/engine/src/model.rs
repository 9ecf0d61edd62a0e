//! One model on this node: its views, its locks, its undo records and its status.
//!
//! Locks, always taken in this order:
//! 1. `versions` (async): one version change at a time (load, delta apply, rollback, full
//!    reload). Reading a delta into its stage happens under it only.
//! 2. `write` (async): every change of the base tables (merges, online writes, the swap after
//!    a rebuild) and the undo log. Checkpoints hold it while they copy the tables, so a
//!    checkpoint and its WAL sequence describe one point in time.
//!
//! Readers take neither: they load the current [`View`] with one atomic load.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use hopps_table::Table;

use crate::report::LoadProgress;
use crate::view::{ABSENT, PRESENT, RowSet, Tables, View};
use crate::wal::Wal;

/// The old rows of the keys a version changed, so the version can be undone.
pub(crate) struct UndoEntry {
    /// The version this entry undoes (back to `parent`).
    pub version: u64,
    pub parent: u64,
    /// For every key the delta touched, and every key an online write touched while `version`
    /// served: its row just before (tag [`PRESENT`]) or that it had none ([`ABSENT`]).
    pub rows: Arc<RowSet>,
}

impl UndoEntry {
    pub(crate) fn bytes(&self) -> u64 {
        self.rows.bytes()
    }
}

/// The undo records of a model, oldest first; a contiguous run of the served chain ending at the
/// serving version.
#[derive(Default)]
pub(crate) struct UndoLog {
    pub entries: VecDeque<UndoEntry>,
}

impl UndoLog {
    pub(crate) fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes()).sum()
    }
}

/// Status fields that change with loads; read by `status()`.
#[derive(Default)]
pub(crate) struct Runtime {
    /// "loading", "serving" or "failed".
    pub state: &'static str,
    pub last_error: Option<String>,
    pub load: Option<LoadProgress>,
    pub load_started: Option<Instant>,
    pub newest: Option<u64>,
    /// Versions that failed to load or apply on this node; not retried until a restart.
    pub failed: BTreeSet<u64>,
    pub staged: Option<u64>,
    /// Shards being loaded for a new shard set while the current view serves (sorted).
    pub loading_shards: Vec<u32>,
    pub last_checkpoint: Option<Instant>,
    /// The model has no committed version to serve yet (created, nothing published).
    pub empty: bool,
}

pub(crate) struct Model {
    pub name: String,
    pub view: ArcSwapOption<View>,
    pub versions: tokio::sync::Mutex<()>,
    pub write: tokio::sync::Mutex<UndoLog>,
    pub runtime: parking_lot::Mutex<Runtime>,
    pub wal: std::sync::OnceLock<Wal>,
    pub load_failures: AtomicU64,
    pub undo_bytes: AtomicU64,
    pub stage_bytes: AtomicU64,
    /// The engine's change counter, bumped whenever this model's view or state changes.
    pub changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Model {
    pub(crate) fn new(name: String, changes: Arc<tokio::sync::watch::Sender<u64>>) -> Model {
        Model {
            name,
            view: ArcSwapOption::empty(),
            versions: tokio::sync::Mutex::new(()),
            write: tokio::sync::Mutex::new(UndoLog::default()),
            runtime: parking_lot::Mutex::new(Runtime {
                state: "loading",
                ..Runtime::default()
            }),
            wal: std::sync::OnceLock::new(),
            load_failures: AtomicU64::new(0),
            undo_bytes: AtomicU64::new(0),
            stage_bytes: AtomicU64::new(0),
            changes,
        }
    }

    /// Tells subscribers that this model's view or state changed.
    pub(crate) fn changed(&self) {
        self.changes.send_modify(|c| *c = c.wrapping_add(1));
    }

    /// Makes `view` the one readers see.
    pub(crate) fn publish(&self, view: Arc<View>) {
        self.view.store(Some(view));
        self.changed();
    }

    pub(crate) fn serving(&self) -> Option<u64> {
        self.view.load().as_ref().map(|v| v.default)
    }

    /// Bytes of the base tables, staged rows and undo records.
    pub(crate) fn memory_bytes(&self) -> u64 {
        self.table_bytes()
            + self.undo_bytes.load(Ordering::Relaxed)
            + self.stage_bytes.load(Ordering::Relaxed)
    }

    /// Bytes of the held shards' tables alone (no stage, no undo records).
    pub(crate) fn table_bytes(&self) -> u64 {
        self.view
            .load()
            .as_ref()
            .map(|v| v.tables.held_bytes(v.held.as_deref()))
            .unwrap_or(0)
    }

    pub(crate) fn fail(&self, version: Option<u64>, message: String) {
        self.load_failures.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("hopps_model_load_failures_total", "model" => self.name.clone())
            .increment(1);
        let mut rt = self.runtime.lock();
        if let Some(v) = version {
            rt.failed.insert(v);
        }
        tracing::error!(model = %self.name, version = ?version, error = %message, "version failed");
        rt.last_error = Some(message);
        rt.load = None;
        if self.view.load().is_none() {
            rt.state = "failed";
        }
        drop(rt);
        self.changed();
    }

    pub(crate) fn progress_start(&self, version: u64, rows_total: u64, bytes_total: u64) {
        let mut rt = self.runtime.lock();
        rt.load_started = Some(Instant::now());
        rt.load = Some(LoadProgress {
            version,
            rows_done: 0,
            rows_total,
            bytes_done: 0,
            bytes_total,
            eta_seconds: 0.0,
            last_progress_unix: unix_now(),
        });
    }

    pub(crate) fn progress_add(&self, rows: u64, bytes: u64) {
        let mut rt = self.runtime.lock();
        let started = rt.load_started;
        if let Some(p) = rt.load.as_mut() {
            p.rows_done += rows;
            p.bytes_done += bytes;
            p.last_progress_unix = unix_now();
            if let Some(s) = started {
                let el = s.elapsed().as_secs_f64();
                let frac = if p.bytes_total > 0 {
                    p.bytes_done as f64 / p.bytes_total as f64
                } else if p.rows_total > 0 {
                    p.rows_done as f64 / p.rows_total as f64
                } else {
                    0.0
                };
                p.eta_seconds = if frac > 0.0 {
                    (el / frac - el).max(0.0)
                } else {
                    0.0
                };
            }
        }
    }

    pub(crate) fn progress_end(&self) {
        let mut rt = self.runtime.lock();
        rt.load = None;
        rt.load_started = None;
    }
}

pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// For every key of `changes`, the row `base` holds for it now (or that it holds none): what
/// undoes `changes` once they are merged. Runs while no one else changes `base`.
pub(crate) fn capture_undo(base: &Tables, changes: &RowSet) -> RowSet {
    let shards = changes
        .shards
        .iter()
        .zip(&base.shards)
        .map(|(ct, bt)| {
            ct.iter()
                .zip(bt)
                .map(|(c, b)| {
                    let tb = c.row_bytes();
                    let mut keys = Vec::with_capacity(c.len());
                    let mut rows = Vec::with_capacity(c.len() * tb);
                    c.for_each(|key, _| {
                        keys.push(key);
                        let at = rows.len();
                        rows.resize(at + tb, 0);
                        let tagged = &mut rows[at..];
                        tagged[0] = if b.get(key, &mut tagged[1..]) {
                            PRESENT
                        } else {
                            ABSENT
                        };
                    });
                    let undo = Table::with_capacity(tb, keys.len());
                    undo.upsert_batch(&keys, &rows);
                    undo
                })
                .collect()
        })
        .collect();
    Tables { shards }
}

/// Applies tagged rows to `base` in place: upserts in one batch per shard (a bucket-ordered
/// sweep under one writer-lock acquisition), then deletes.
pub(crate) fn merge(base: &Tables, changes: &RowSet) {
    for (ct, bt) in changes.shards.iter().zip(&base.shards) {
        for (c, b) in ct.iter().zip(bt) {
            let rb = b.row_bytes();
            let mut keys = Vec::with_capacity(c.len());
            let mut rows = Vec::with_capacity(c.len() * rb);
            let mut deletes = Vec::new();
            c.for_each(|key, tagged| {
                if tagged[0] == PRESENT {
                    keys.push(key);
                    rows.extend_from_slice(&tagged[1..]);
                } else {
                    deletes.push(key);
                }
            });
            b.reserve(keys.len());
            b.upsert_batch(&keys, &rows);
            for key in deletes {
                b.delete(key);
            }
        }
    }
}

/// One change set equal to undoing `newest_first` in that order: the oldest record of a key
/// wins, as it holds the key's row before all of them.
pub(crate) fn compose_undo(newest_first: &[Arc<RowSet>]) -> RowSet {
    let first = &newest_first[0];
    let shards = first
        .shards
        .iter()
        .enumerate()
        .map(|(t, tt)| {
            tt.iter()
                .enumerate()
                .map(|(s, st)| {
                    let rows: usize = newest_first.iter().map(|u| u.shards[t][s].len()).sum();
                    let out = Table::with_capacity(st.row_bytes(), rows);
                    for u in newest_first {
                        u.shards[t][s].for_each(|key, tagged| out.upsert(key, tagged));
                    }
                    out
                })
                .collect()
        })
        .collect();
    Tables { shards }
}
