//! hopps-engine: the models a node serves, their versions, and every way they change.
//!
//! - **Loads**: the newest committed state of each model — its newest checkpoint on the served
//!   chain plus the deltas after it, then the logged online writes — into one Hopscotch table
//!   per (table, shard).
//! - **Deltas** are staged beside the tables (both versions readable), flipped, then merged in
//!   place; the old rows of every touched key are kept as an undo record.
//! - **Rollback** to any earlier version of the served chain: instant from undo records inside
//!   the undo budget, otherwise rebuilt from a checkpoint plus deltas while the current version
//!   serves. The decision is recorded in the repository's history, which every node follows.
//! - **Checkpoints** of the serving state go to the repository as `.hps` segments.
//! - **Online writes** (upsert, delete, push with SGD/Adagrad/Adam) go through a local
//!   write-ahead log with group commit before they are acknowledged.
//!
//! - **Cluster mode**: with a [`Coordinator`], a node holds only the shards placed on it and
//!   switches versions in two phases (stage, then flip on the coordinator's go).
//!
//! Lookups are synchronous and lock-free: one atomic load of the model's current view per
//! request, keys grouped by shard in reused per-thread buffers, one batched probe per shard.
#![forbid(unsafe_code)]

mod config;
mod coordinator;
mod engine;
mod error;
mod lineage;
mod loader;
mod model;
mod report;
mod rows;
mod view;
pub mod wal;

pub use config::{EngineConfig, WalSync};
pub use coordinator::{Coordinator, Gate};
pub use engine::{Engine, TableLookup};
pub use error::{EngineError, ErrorKind, Result};
pub use report::{
    CheckpointReport, HistoryEvent, LoadProgress, ModelInfo, ModelReport, ModelStatus, NodeStatus,
    RollbackReport, TableMeta, TableStatus, VersionState, WriteAck,
};
pub use rows::random_init;
