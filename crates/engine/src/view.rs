//! What readers see: the base tables of a model plus, while a version change is in flight, one
//! overlay per readable version.
//!
//! A [`View`] is immutable; a version change publishes a new one with a single atomic swap, so
//! a lookup loads one view per request (never per key) and reads a consistent version from it:
//!
//! | phase of applying `V+1` | default | readable (version: overlay over base) |
//! |---|---|---|
//! | serving | `V` | `V`: none |
//! | staged | `V` | `V`: none; `V+1`: staged rows |
//! | merging (after the flip) | `V+1` | `V+1`: staged rows; `V`: undo record |
//! | done | `V+1` | `V+1`: none |
//!
//! Invariant: while the base tables are being changed by a merge, every readable version has an
//! overlay that holds every key the merge touches, so what the base says about those keys is
//! never used and a reader never mixes `V` and `V+1`.

use std::cell::RefCell;
use std::sync::Arc;

use hopps_format::{MissingPolicy, shard_of};
use hopps_table::{Dtype, Table};

use crate::error::{EngineError, Result};
use crate::rows::TableShape;

/// A model's shape: shard count and tables (fixed when the model is created).
#[derive(Debug)]
pub(crate) struct Shape {
    pub model: String,
    pub shards: u32,
    pub tables: Vec<TableShape>,
}

impl Shape {
    pub(crate) fn table_index(&self, table: &str) -> Result<usize> {
        self.tables
            .iter()
            .position(|t| t.name == table)
            .ok_or_else(|| {
                let names: Vec<&str> = self.tables.iter().map(|t| t.name.as_str()).collect();
                EngineError::not_found(format!(
                    "model {} has no table {table:?}; its tables are {}",
                    self.model,
                    names.join(", ")
                ))
            })
    }
}

/// Shards loaded below this load factor are rebuilt at their exact size after a load.
pub(crate) const COMPACT_BELOW: f64 = 0.95;
/// Smaller shards are left alone: a table's smallest capacity holds a few hundred rows.
const COMPACT_MIN_ROWS: usize = 4096;

/// Tables indexed `[table][shard]`.
pub(crate) struct Tables {
    pub shards: Vec<Vec<Table>>,
}

impl Tables {
    /// Empty tables sized for `rows[t]` rows per table, spread over the shards; shards not in
    /// `held` (when given) get the smallest table, as they stay empty.
    pub(crate) fn with_rows(
        shape: &Shape,
        extra_row_bytes: usize,
        rows: &[u64],
        held: Option<&ShardSet>,
    ) -> Tables {
        let s = shape.shards as usize;
        let shards = shape
            .tables
            .iter()
            .enumerate()
            .map(|(t, ts)| {
                // Sized for the average shard: the table takes up to MAX_LOAD / SIZED_LOAD of
                // it before growing, which covers most shards of a large model; the shards that
                // grew or stayed small are rebuilt at their exact size by `compact`.
                let cap = (rows.get(t).copied().unwrap_or(0) as usize).div_ceil(s.max(1));
                (0..s)
                    .map(|sh| {
                        let cap = if holds(held, sh) { cap } else { 0 };
                        Table::with_capacity(ts.row_bytes + extra_row_bytes, cap)
                    })
                    .collect()
            })
            .collect();
        Tables { shards }
    }

    /// Rebuilds at their exact size the shards whose load factor a load left below
    /// [`COMPACT_BELOW`] (a shard that received more than its share of keys grew, and a grown
    /// table sits far from full), so a loaded model keeps memory within a few percent of its
    /// rows. Only for tables no reader can see yet: it replaces them.
    pub(crate) fn compact(&mut self) {
        const BATCH: usize = 4096;
        for table in self.shards.iter_mut().flatten() {
            if table.len() < COMPACT_MIN_ROWS || table.load_factor() >= COMPACT_BELOW {
                continue;
            }
            let row_bytes = table.row_bytes();
            let exact = Table::with_capacity(row_bytes, table.len());
            let mut keys = Vec::with_capacity(BATCH);
            let mut rows = Vec::with_capacity(BATCH * row_bytes);
            table.for_each(|key, row| {
                keys.push(key);
                rows.extend_from_slice(row);
                if keys.len() == BATCH {
                    exact.upsert_batch(&keys, &rows);
                    keys.clear();
                    rows.clear();
                }
            });
            exact.upsert_batch(&keys, &rows);
            *table = exact;
        }
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.shards
            .iter()
            .flatten()
            .map(|t| t.bytes_used() as u64)
            .sum()
    }

    /// Bytes of the shards in `held` (`None` = all): what a node holding them accounts.
    pub(crate) fn held_bytes(&self, held: Option<&ShardSet>) -> u64 {
        self.shards
            .iter()
            .flat_map(|t| t.iter().enumerate())
            .filter(|(s, _)| holds(held, *s))
            .map(|(_, t)| t.bytes_used() as u64)
            .sum()
    }
}

/// Rows keyed like the base tables whose first byte is a tag: [`PRESENT`] then the full row, or
/// [`ABSENT`] (the key has no row in the version the set stands for). Used for staged deltas,
/// rollback deltas and undo records.
pub(crate) type RowSet = Tables;

pub(crate) const ABSENT: u8 = 0;
pub(crate) const PRESENT: u8 = 1;

/// The shards of a model this node holds, when it is not every shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ShardSet {
    /// `mask[s]`: shard `s` is held. As long as the model's shard count.
    mask: Vec<bool>,
}

impl ShardSet {
    /// The held set of a model of `shards` shards from a coordinator's answer; `None` when it
    /// names every shard (the node then behaves as if it had no coordinator for placement).
    pub(crate) fn from_placement(
        model: &str,
        shards: u32,
        set: Option<&std::collections::BTreeSet<u32>>,
    ) -> Result<Option<ShardSet>> {
        let Some(set) = set else { return Ok(None) };
        if let Some(bad) = set.iter().find(|&&s| s >= shards) {
            return Err(EngineError::invalid(format!(
                "model {model}: the cluster placed shard {bad} on this node but the model has \
                 {shards} shards (0..{shards}); fix the placement"
            )));
        }
        if set.len() == shards as usize {
            return Ok(None);
        }
        let mut mask = vec![false; shards as usize];
        for &s in set {
            mask[s as usize] = true;
        }
        Ok(Some(ShardSet { mask }))
    }

    pub(crate) fn contains(&self, shard: usize) -> bool {
        self.mask.get(shard).copied().unwrap_or(false)
    }

    pub(crate) fn list(&self) -> Vec<u32> {
        (0..self.mask.len() as u32)
            .filter(|&s| self.mask[s as usize])
            .collect()
    }

    pub(crate) fn describe(&self) -> String {
        let list: Vec<String> = self.list().iter().map(|s| s.to_string()).collect();
        if list.is_empty() {
            "none".to_string()
        } else {
            list.join(", ")
        }
    }
}

/// Whether `held` (`None` = every shard) includes `shard`.
pub(crate) fn holds(held: Option<&ShardSet>, shard: usize) -> bool {
    held.is_none_or(|h| h.contains(shard))
}

/// The error for a key of a shard this node does not hold.
pub(crate) fn not_held(model: &str, shard: usize, key: u64, held: &ShardSet) -> EngineError {
    EngineError::precondition(format!(
        "model {model} shard {shard} (key {key}) is not held by this node (it holds {}); route by \
         the cluster placement",
        held.describe()
    ))
}

/// Where a readable version's rows come from.
#[derive(Clone)]
pub(crate) enum Source {
    /// The view's base tables as they are.
    Base,
    /// The base tables with an overlay of tagged rows taking precedence.
    Overlay(Arc<RowSet>),
    /// Tables of its own (a full version or a rebuild staged beside the serving tables).
    Tables(Arc<Tables>),
}

/// Where [`View::read`] puts the rows it reads.
pub(crate) enum RowsOut<'a> {
    /// Decoded floats, `keys.len() * dim`, in request order.
    Floats(&'a mut [f32]),
    /// Appended as packed little-endian f32 (the wire format), `keys.len() * dim * 4` bytes.
    Packed(&'a mut Vec<u8>),
}

/// One immutable state of a model for readers.
pub(crate) struct View {
    pub shape: Arc<Shape>,
    pub tables: Arc<Tables>,
    /// The version served when a request pins none.
    pub default: u64,
    /// Readable versions and where each one is read from.
    pub readable: Vec<(u64, Source)>,
    /// Shards held by this node (`None` = every shard); the others' tables are empty.
    pub held: Option<Arc<ShardSet>>,
}

impl View {
    pub(crate) fn plain(
        shape: Arc<Shape>,
        tables: Arc<Tables>,
        version: u64,
        held: Option<Arc<ShardSet>>,
    ) -> View {
        View {
            shape,
            tables,
            default: version,
            readable: vec![(version, Source::Base)],
            held,
        }
    }

    pub(crate) fn with(&self, default: u64, readable: Vec<(u64, Source)>) -> View {
        View {
            shape: self.shape.clone(),
            tables: self.tables.clone(),
            default,
            readable,
            held: self.held.clone(),
        }
    }

    /// The held shards, sorted; `None` when every shard is held.
    pub(crate) fn held_list(&self) -> Option<Vec<u32>> {
        self.held.as_ref().map(|h| h.list())
    }

    /// The version to read, its tables and its overlay.
    pub(crate) fn resolve(&self, version: Option<u64>) -> Result<(u64, &Tables, Option<&RowSet>)> {
        let v = version.unwrap_or(self.default);
        match self.readable.iter().find(|(rv, _)| *rv == v) {
            Some((_, source)) => Ok(match source {
                Source::Base => (v, &*self.tables, None),
                Source::Overlay(o) => (v, &*self.tables, Some(&**o)),
                Source::Tables(t) => (v, &**t, None),
            }),
            None => {
                let list: Vec<String> = self.readable.iter().map(|(v, _)| v.to_string()).collect();
                Err(EngineError::precondition(format!(
                    "model {}: version {v} is not readable on this node (readable now: {}); pin \
                     one of those or send no version to get the served one ({})",
                    self.shape.model,
                    list.join(", "),
                    self.default
                )))
            }
        }
    }

    /// Reads the rows of `keys` in table `t` at the resolved version into `out` (decoded,
    /// `keys.len() * dim` floats), applying the missing-key policy; `found[i]` says whether
    /// key `i` has a row. No allocation once the thread's scratch buffers have grown.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn read(
        &self,
        tables: &Tables,
        overlay: Option<&RowSet>,
        t: usize,
        keys: &[u64],
        mut out: RowsOut<'_>,
        found: &mut [bool],
    ) -> Result<()> {
        let shape = &self.shape.tables[t];
        let dim = shape.dim;
        let floats_ok = match &out {
            RowsOut::Floats(out) => out.len() == keys.len() * dim,
            RowsOut::Packed(_) => true,
        };
        if !floats_ok || found.len() != keys.len() {
            return Err(EngineError::invalid(format!(
                "model {} table {}: {} keys need an output of {} floats (dim {dim}) and {} found \
                 flags, got {} and {}",
                self.shape.model,
                shape.name,
                keys.len(),
                keys.len() * dim,
                keys.len(),
                match &out {
                    RowsOut::Floats(out) => out.len(),
                    RowsOut::Packed(_) => keys.len() * dim,
                },
                found.len()
            )));
        }
        SCRATCH.with(|cell| {
            let mut guard = cell.borrow_mut();
            let s = &mut *guard;
            s.group(keys, self.shape.shards);
            let n = keys.len();
            let vb = shape.value_bytes;
            s.rows.resize(n * vb, 0);
            s.hits.clear();
            s.hits.resize(n, false);
            let ob = vb + 1;
            if overlay.is_some() {
                s.orows.resize(n * ob, 0);
                s.ohits.clear();
                s.ohits.resize(n, false);
            }
            let shard_count = self.shape.shards as usize;
            if let Some(held) = self.held.as_deref() {
                // One check per shard of the request, not per key.
                for shard in 0..shard_count {
                    if s.starts[shard] != s.starts[shard + 1] && !held.contains(shard) {
                        let key = s.skeys[s.starts[shard] as usize];
                        return Err(not_held(&self.shape.model, shard, key, held));
                    }
                }
            }
            for shard in 0..shard_count {
                let (a, b) = (s.starts[shard] as usize, s.starts[shard + 1] as usize);
                if a == b {
                    continue;
                }
                let skeys = &s.skeys[a..b];
                tables.shards[t][shard].lookup_batch(
                    skeys,
                    &mut s.rows[a * vb..b * vb],
                    &mut s.hits[a..b],
                );
                if let Some(ov) = overlay {
                    ov.shards[t][shard].lookup_batch(
                        skeys,
                        &mut s.orows[a * ob..b * ob],
                        &mut s.ohits[a..b],
                    );
                }
            }
            // The row of grouped position `j`: the overlay's when it has the key (present, or
            // absent in that version), else the base table's.
            let row_at = |j: usize| -> Option<&[u8]> {
                if overlay.is_some() && s.ohits[j] {
                    let r = &s.orows[j * ob..(j + 1) * ob];
                    (r[0] == PRESENT).then_some(&r[1..])
                } else if s.hits[j] {
                    Some(&s.rows[j * vb..(j + 1) * vb])
                } else {
                    None
                }
            };
            match &mut out {
                RowsOut::Floats(out) => {
                    for j in 0..n {
                        let i = s.idx[j] as usize;
                        let dst = &mut out[i * dim..(i + 1) * dim];
                        match row_at(j) {
                            Some(row) => {
                                found[i] = true;
                                shape.layout.decode(row, dst);
                            }
                            None => {
                                found[i] = false;
                                shape.fill_missing(keys[i], dst);
                            }
                        }
                    }
                }
                RowsOut::Packed(buf) => {
                    // In request order, appended: no zero-filled buffer, and an f32 row's stored
                    // bytes are already the wire's little-endian floats, so they are copied once.
                    let raw_f32 = shape.layout.dtype == Dtype::F32;
                    buf.reserve(n * dim * 4);
                    let mut tmp = std::mem::take(&mut s.floats);
                    tmp.resize(dim, 0.0);
                    for (i, &j) in s.pos[..n].iter().enumerate() {
                        match row_at(j as usize) {
                            Some(row) if raw_f32 => {
                                found[i] = true;
                                buf.extend_from_slice(&row[..dim * 4]);
                            }
                            Some(row) => {
                                found[i] = true;
                                shape.layout.decode(row, &mut tmp);
                                tmp.iter()
                                    .for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
                            }
                            None => {
                                found[i] = false;
                                shape.fill_missing(keys[i], &mut tmp);
                                tmp.iter()
                                    .for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
                            }
                        }
                    }
                    s.floats = tmp;
                }
            }
            Ok::<(), EngineError>(())
        })?;
        if matches!(shape.missing, MissingPolicy::Error)
            && let Some(i) = found.iter().position(|f| !f)
        {
            return Err(EngineError::not_found(format!(
                "model {} table {}: key {} (index {i} of the request) has no row and the table's \
                 missing-key policy is \"error\"; look up only existing keys or change the policy",
                self.shape.model, shape.name, keys[i]
            )));
        }
        Ok(())
    }
}

/// Per-thread buffers of the lookup path, grown to the largest request seen and reused.
#[derive(Default)]
struct Scratch {
    /// Shard of each request key.
    sid: Vec<u32>,
    /// `starts[s]..starts[s+1]`: the grouped positions of shard `s`.
    starts: Vec<u32>,
    /// Grouped position -> request index.
    idx: Vec<u32>,
    /// Request index -> grouped position (the inverse of `idx`).
    pos: Vec<u32>,
    /// One decoded row, for packed output of rows that are not stored as f32.
    floats: Vec<f32>,
    /// Keys in grouped order.
    skeys: Vec<u64>,
    rows: Vec<u8>,
    hits: Vec<bool>,
    orows: Vec<u8>,
    ohits: Vec<bool>,
}

impl Scratch {
    /// Groups request keys by shard (a counting sort, stable within a shard).
    fn group(&mut self, keys: &[u64], shards: u32) {
        let s = shards as usize;
        let n = keys.len();
        self.starts.clear();
        self.starts.resize(s + 1, 0);
        self.sid.clear();
        for &k in keys {
            let sh = if shards == 1 { 0 } else { shard_of(k, shards) };
            self.sid.push(sh);
            self.starts[sh as usize + 1] += 1;
        }
        for i in 0..s {
            self.starts[i + 1] += self.starts[i];
        }
        self.idx.resize(n, 0);
        self.pos.resize(n, 0);
        self.skeys.resize(n, 0);
        // `starts` is restored below: fill positions by advancing a cursor per shard.
        for (i, &sh) in self.sid.iter().enumerate() {
            let pos = &mut self.starts[sh as usize];
            self.idx[*pos as usize] = i as u32;
            self.pos[i] = *pos;
            self.skeys[*pos as usize] = keys[i];
            *pos += 1;
        }
        // Each start now equals the next shard's start; shift back by one shard.
        for i in (1..=s).rev() {
            self.starts[i] = self.starts[i - 1];
        }
        self.starts[0] = 0;
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping_is_a_stable_partition_by_shard() {
        let mut s = Scratch::default();
        let keys: Vec<u64> = (0..1000u64).map(|i| i.wrapping_mul(0x9E37_79B9)).collect();
        s.group(&keys, 8);
        assert_eq!(s.starts[0], 0);
        assert_eq!(s.starts[8] as usize, keys.len());
        let mut seen = vec![false; keys.len()];
        for sh in 0..8 {
            let (a, b) = (s.starts[sh] as usize, s.starts[sh + 1] as usize);
            let mut last = None;
            for j in a..b {
                let i = s.idx[j] as usize;
                assert_eq!(shard_of(keys[i], 8) as usize, sh);
                assert_eq!(s.skeys[j], keys[i]);
                assert!(last.is_none_or(|l| l < i), "stable within a shard");
                last = Some(i);
                seen[i] = true;
            }
        }
        assert!(seen.iter().all(|&x| x));
    }
}
