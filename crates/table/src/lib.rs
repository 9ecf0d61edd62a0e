//! The Hopscotch table of hopps: a concurrent map from `u64` key to a fixed-size row.
//!
//! Everything hopps serves comes out of a [`Table`]: one per (table, shard). Rows are opaque
//! bytes to the table; [`RowLayout`] encodes `dim` `f32` values as `f32`, `f16`, `bf16` or
//! `int8` with a per-row scale, followed by optional optimizer-state bytes.
//!
//! ```
//! use hopps_table::{Dtype, RowLayout, Table};
//!
//! let layout = RowLayout::new(4, Dtype::F32, 0);
//! let table = Table::with_capacity(layout.row_bytes(), 1000);
//!
//! let mut row = vec![0u8; layout.row_bytes()];
//! layout.encode(&[1.0, 2.0, 3.0, 4.0], &mut row);
//! table.upsert(42, &row);
//! table.upsert(u64::MAX, &row);
//!
//! // A batch lookup copies rows into one buffer, in key order, and says which keys were found.
//! let keys = [42, 7, u64::MAX];
//! let mut out = vec![0u8; keys.len() * layout.row_bytes()];
//! let mut found = [false; 3];
//! assert_eq!(table.lookup_batch(&keys, &mut out, &mut found), 2);
//! assert_eq!(found, [true, false, true]);
//!
//! let mut values = [0.0f32; 4];
//! layout.decode(&out[..layout.row_bytes()], &mut values);
//! assert_eq!(values, [1.0, 2.0, 3.0, 4.0]);
//!
//! assert!(table.delete(42));
//! assert!(!table.get(42, &mut row));
//! assert_eq!(table.len(), 1);
//! ```
//!
//! The layout, the concurrency protocol and the invariants are described in the crate's
//! section of ARCHITECTURE.md and on the private modules.
#![deny(unsafe_code)]
// Under loom a bucket has one slot and readers one stripe, so some `x % 1` are intended.
#![cfg_attr(loom, allow(clippy::modulo_one))]
#![warn(missing_debug_implementations)]

mod buckets;
mod layout;
mod raw;
mod sync;
mod table;

#[cfg(all(test, loom))]
mod loom_models;

pub use layout::{Dtype, RowLayout};
pub use table::{MAX_LOAD, SIZED_LOAD, Table};

#[doc(hidden)]
pub use buckets::mix;

/// Hints the CPU to bring the first cache line of `data` into cache (a no-op for an empty slice
/// and on other architectures). The table prefetches for itself; this is for code that compares
/// against it on equal terms (the benchmark's raw-memory probe).
#[inline(always)]
pub fn prefetch(data: &[u8]) {
    if let Some(b) = data.first() {
        raw::prefetch(b);
    }
}
