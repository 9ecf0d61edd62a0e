//! hopps-format: the model repository and the file formats of hopps.
//!
//! - [`Repository`]: models, versions, publishing, reading rows, checkpoints and history over
//!   any storage Apache OpenDAL reaches (local filesystem, S3-compatible stores, HDFS).
//! - [`spec`]: `model.json`, `MANIFEST.json` and friends.
//! - [`rows`]: streaming decoders of Parquet, CSV/TSV and NumPy `.npy` input.
//! - [`segment`]: the `.hps` checkpoint segment format.
//! - [`shard_of`]: the sharding function every part of hopps agrees on.
//! - [`fault`]: a storage layer that injects failures, for all-or-nothing tests.
//!
//! Architecture invariant: only this crate knows file formats and storage paths; it does not
//! depend on hopps-table (a segment stores opaque fixed-size rows plus a dtype tag).
#![forbid(unsafe_code)]

pub mod error;
pub mod fault;
pub mod publish;
pub mod repo;
pub mod rows;
pub mod segment;
pub mod shard;
pub mod spec;
pub mod storage;

pub use error::{ErrorKind, FormatError, Result};
pub use publish::{
    InputFile, PublishOptions, PublishProgress, PublishRequest, ShardRequest, ShardSummary,
    TableArrays, TableInput, shard_to_dir,
};
pub use repo::{CheckpointWriter, Repository, RowReader};
pub use rows::RowBatch;
pub use segment::Segment;
pub use shard::{shard_hash, shard_of};
pub use spec::{
    FileEntry, HistoryRecord, Manifest, ManifestTable, MissingPolicy, ModelSpec, OptimizerSpec,
    PublishSummary, TableSpec, VersionKind, VersionListing,
};
pub use storage::StorageOptions;
