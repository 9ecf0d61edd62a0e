//! Reading versions from the repository into tables: full versions, checkpoints, delta stages,
//! and replaying the write-ahead log in between.
//!
//! Invariant: rebuilding a version (at start, or for a rollback beyond the undo window) is
//! "newest checkpoint of the served chain at or before the target, then every later delta of the
//! chain in order, each followed by the logged online writes made while it served". A restart
//! and a rebuild run this same code, so they agree row for row.

use std::sync::Arc;

use hopps_format::{Manifest, Repository, VersionKind, shard_of};
use hopps_table::Table;

use crate::error::{EngineError, Result};
use crate::lineage::Lineage;
use crate::model::{Model, UndoEntry, capture_undo, merge};
use crate::rows::TableShape;
use crate::view::{ABSENT, PRESENT, RowSet, Shape, ShardSet, Tables, holds};
use crate::wal::{WalOp, WalRecord};

/// Rows of a version, in tables ready to serve, and the undo records of the deltas applied.
pub(crate) struct Built {
    pub tables: Tables,
    pub version: u64,
    pub undo: Vec<UndoEntry>,
    /// What the state was built from, for logs and history ("checkpoint 12 + 3 deltas").
    pub detail: String,
}

/// Bytes a table of `rows` rows of `row_bytes` takes, with the table's slack.
pub(crate) fn table_bytes_estimate(rows: u64, row_bytes: usize) -> u64 {
    // Key + row per slot at load factor >= 0.95, plus per-bucket metadata: 12% covers both.
    (rows * (row_bytes as u64 + 8)) * 112 / 100
}

/// Rows per table a version (or chain of versions) will hold, in shape order.
fn manifest_rows(shape: &Shape, m: &Manifest) -> Vec<u64> {
    shape
        .tables
        .iter()
        .map(|t| m.table(&t.name).map(|mt| mt.rows).unwrap_or(0))
        .collect()
}

/// Memory a build up to `upto` in `chain` needs, starting from `base`, for the shards in
/// `held` (`None` = all; keys spread evenly over the shards).
pub(crate) fn build_estimate(
    shape: &Shape,
    chain: &[Manifest],
    base: &Manifest,
    held: Option<&ShardSet>,
) -> u64 {
    let mut rows = manifest_rows(shape, base);
    for m in chain
        .iter()
        .filter(|m| m.kind == VersionKind::Delta && m.version > base.version)
    {
        for (r, add) in rows.iter_mut().zip(manifest_rows(shape, m)) {
            // A delta's upserts may all be new keys, and its undo record holds as many rows.
            *r += 2 * add;
        }
    }
    let all: u64 = shape
        .tables
        .iter()
        .zip(rows)
        .map(|(t, r)| table_bytes_estimate(r, t.row_bytes))
        .sum();
    match held {
        Some(h) => all * h.list().len() as u64 / u64::from(shape.shards.max(1)),
        None => all,
    }
}

/// The newest checkpoint of the chain at or before `chain[upto]`.
pub(crate) fn pick_checkpoint<'a>(
    lineage: &Lineage,
    upto: usize,
    checkpoints: &'a [Manifest],
) -> Option<(&'a Manifest, usize)> {
    checkpoints
        .iter()
        .filter_map(|c| {
            let pos = lineage.position(c.version)?;
            (pos <= upto && !lineage.is_dead(c.version)).then_some((c, pos))
        })
        .max_by_key(|(c, _)| c.version)
}

/// Builds the state of `lineage.chain[upto]` from the repository and `wal` (all records of the
/// model's log, ascending), holding only the shards in `held` (`None` = all): rows of other
/// shards are skipped while reading and their tables stay empty.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn build(
    repo: &Repository,
    model: &Model,
    shape: &Arc<Shape>,
    lineage: &Lineage,
    upto: usize,
    checkpoints: &[Manifest],
    wal: &[WalRecord],
    held: Option<&ShardSet>,
) -> Result<Built> {
    let target = &lineage.chain[upto];
    let (base, start, wal_floor) = match pick_checkpoint(lineage, upto, checkpoints) {
        Some((c, pos)) => (c.clone(), pos, c.wal_sequence.unwrap_or(0)),
        None => (lineage.chain[0].clone(), 0, 0),
    };
    let rows_total: u64 = lineage.chain[start..=upto].iter().map(|m| m.rows).sum();
    let bytes_total: u64 = lineage.chain[start + 1..=upto]
        .iter()
        .map(|m| m.bytes())
        .sum::<u64>()
        + base.bytes();
    model.progress_start(target.version, rows_total, bytes_total);
    let mut tables = Tables::with_rows(shape, 0, &manifest_rows(shape, &base), held);
    if base.kind == VersionKind::Checkpoint {
        load_checkpoint(repo, model, shape, &base, &tables, held).await?;
    } else {
        load_full(repo, model, shape, &base, &tables, held).await?;
    }
    let mut undo = Vec::new();
    replay(
        shape,
        &tables,
        None,
        wal,
        base.version,
        wal_floor,
        &model.name,
        held,
    )?;
    for m in &lineage.chain[start + 1..=upto] {
        let stage = read_delta(repo, model, shape, m, held).await?;
        let rows = Arc::new(capture_undo(&tables, &stage));
        merge(&tables, &stage);
        replay(
            shape,
            &tables,
            Some(&rows),
            wal,
            m.version,
            wal_floor,
            &model.name,
            held,
        )?;
        undo.push(UndoEntry {
            version: m.version,
            parent: m.parent.unwrap_or(0),
            rows,
        });
    }
    tables.compact();
    model.progress_end();
    let detail = if base.kind == VersionKind::Checkpoint {
        format!("checkpoint of {} + {} deltas", base.version, upto - start)
    } else {
        format!("full {} + {} deltas", base.version, upto - start)
    };
    Ok(Built {
        tables,
        version: target.version,
        undo,
        detail,
    })
}

/// Applies the logged writes made while `version` served, after the checkpoint floor, to the
/// shards in `held`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn replay(
    shape: &Shape,
    tables: &Tables,
    undo: Option<&RowSet>,
    wal: &[WalRecord],
    version: u64,
    floor: u64,
    model: &str,
    held: Option<&ShardSet>,
) -> Result<()> {
    let mut scratch = WriteScratch::default();
    for r in wal.iter().filter(|r| r.version == version && r.seq > floor) {
        let t = shape.table_index(&r.table).map_err(|e| {
            EngineError::internal(format!(
                "write-ahead log record {} of model {model} names table {:?}: {e}",
                r.seq, r.table
            ))
        })?;
        apply_write(
            shape,
            tables,
            undo,
            t,
            r.op,
            &r.keys,
            &r.values,
            held,
            &mut scratch,
        )?;
    }
    Ok(())
}

/// Buffers reused across the keys of one write.
#[derive(Default)]
pub(crate) struct WriteScratch {
    row: Vec<u8>,
    tagged: Vec<u8>,
    floats: Vec<f32>,
}

/// Applies one online write to `tables`, first recording in `undo` (when given) the old row of
/// every key it has no record for yet. Keys of shards not in `held` are skipped (a replay of
/// the log on a node holding some shards; online writes to them are refused before logging).
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply_write(
    shape: &Shape,
    tables: &Tables,
    undo: Option<&RowSet>,
    t: usize,
    op: WalOp,
    keys: &[u64],
    values: &[f32],
    held: Option<&ShardSet>,
    s: &mut WriteScratch,
) -> Result<()> {
    let ts = &shape.tables[t];
    let dim = ts.dim;
    s.row.resize(ts.row_bytes, 0);
    s.tagged.resize(ts.row_bytes + 1, 0);
    s.floats.resize(dim, 0.0);
    let shards = shape.shards;
    for (i, &key) in keys.iter().enumerate() {
        let sh = shard_of(key, shards) as usize;
        if !holds(held, sh) {
            continue;
        }
        let base = &tables.shards[t][sh];
        if let Some(u) = undo {
            let u = &u.shards[t][sh];
            if !u.get(key, &mut s.tagged[..1]) {
                let present = base.get(key, &mut s.tagged[1..]);
                s.tagged[0] = if present { PRESENT } else { ABSENT };
                if !present {
                    s.tagged[1..].fill(0);
                }
                u.upsert(key, &s.tagged);
            }
        }
        match op {
            WalOp::Upsert => {
                ts.encode_fresh(&values[i * dim..(i + 1) * dim], &mut s.row);
                base.upsert(key, &s.row);
            }
            WalOp::Delete => {
                base.delete(key);
            }
            WalOp::Push => {
                if !base.get(key, &mut s.row) {
                    ts.fill_missing(key, &mut s.floats);
                    let init = std::mem::take(&mut s.floats);
                    ts.encode_fresh(&init, &mut s.row);
                    s.floats = init;
                }
                ts.apply_gradient(&mut s.row, &values[i * dim..(i + 1) * dim], &mut s.floats)?;
                base.upsert(key, &s.row);
            }
        }
    }
    Ok(())
}

fn check_batch(
    model: &str,
    m: &Manifest,
    ts: &TableShape,
    keys: usize,
    values: usize,
    deleted: usize,
) -> Result<()> {
    if values != keys * ts.dim || (deleted != 0 && deleted != keys) {
        return Err(EngineError::internal(format!(
            "model {model} version {} table {}: a batch of {keys} keys came with {values} values \
             and {deleted} delete flags (dim {}); the version's files do not match model.json — \
             republish it",
            m.version, ts.name, ts.dim
        )));
    }
    Ok(())
}

/// Streams a full version's rows into empty `tables`.
async fn load_full(
    repo: &Repository,
    model: &Model,
    shape: &Shape,
    m: &Manifest,
    tables: &Tables,
    held: Option<&ShardSet>,
) -> Result<()> {
    stream_version(repo, model, shape, m, "version", tables, RowTag::None, held).await
}

/// How [`stream_version`] writes a row into its target tables.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RowTag {
    /// Plain rows; deleted keys are skipped (a full version).
    None,
    /// A leading [`PRESENT`] / [`ABSENT`] byte, so a delete is a row too (a change set).
    Leading,
}

/// The one read loop of full loads and deltas: streams every table of version `m`, checks each
/// batch, encodes its rows of the shards in `held` grouped by shard into `into`, and reports
/// load progress.
#[allow(clippy::too_many_arguments)]
async fn stream_version(
    repo: &Repository,
    model: &Model,
    shape: &Shape,
    m: &Manifest,
    noun: &str,
    into: &Tables,
    tag: RowTag,
    held: Option<&ShardSet>,
) -> Result<()> {
    let tag_bytes = usize::from(tag == RowTag::Leading);
    for (t, ts) in shape.tables.iter().enumerate() {
        if m.table(&ts.name).is_none() {
            continue;
        }
        let what = || {
            format!(
                "reading model {} {noun} {} table {}",
                model.name, m.version, ts.name
            )
        };
        let mut reader = repo
            .read_table(m, &ts.name)
            .await
            .map_err(|e| EngineError::repository(what(), e))?;
        let mut grouped = ShardBatches::new(shape.shards as usize);
        let mut last_bytes = 0;
        while let Some(batch) = reader
            .next_batch()
            .await
            .map_err(|e| EngineError::repository(what(), e))?
        {
            check_batch(
                &model.name,
                m,
                ts,
                batch.keys.len(),
                batch.values.len(),
                batch.deleted.len(),
            )?;
            for (i, &key) in batch.keys.iter().enumerate() {
                let deleted = batch.deleted.get(i).copied().unwrap_or(false);
                if deleted && tag == RowTag::None {
                    continue;
                }
                let shard = shard_of(key, shape.shards) as usize;
                if !holds(held, shard) {
                    continue;
                }
                let row = grouped.push(shard, key, ts.row_bytes + tag_bytes);
                let values = &batch.values[i * ts.dim..(i + 1) * ts.dim];
                match (tag, deleted) {
                    (RowTag::None, _) => ts.encode_fresh(values, row),
                    (RowTag::Leading, true) => row[0] = ABSENT,
                    (RowTag::Leading, false) => {
                        row[0] = PRESENT;
                        ts.encode_fresh(values, &mut row[1..]);
                    }
                }
            }
            // Input order is kept per shard, so a later row of a key still wins.
            grouped.flush(&into.shards[t]);
            let read = reader.bytes_read();
            model.progress_add(batch.keys.len() as u64, read.saturating_sub(last_bytes));
            last_bytes = read;
        }
    }
    Ok(())
}

/// Reads a checkpoint's segments (already-encoded rows) of the shards in `held` into empty
/// `tables`; segments of other shards are not read at all.
async fn load_checkpoint(
    repo: &Repository,
    model: &Model,
    shape: &Shape,
    m: &Manifest,
    tables: &Tables,
    held: Option<&ShardSet>,
) -> Result<()> {
    for mt in &m.tables {
        let t = shape.table_index(&mt.name).map_err(|e| {
            EngineError::internal(format!(
                "checkpoint {} of model {}: {e}",
                m.version, model.name
            ))
        })?;
        let ts = &shape.tables[t];
        for file in &mt.files {
            if let Some(s) = file.shard
                && (s as usize) < tables.shards[t].len()
                && !holds(held, s as usize)
            {
                continue;
            }
            let what = || {
                format!(
                    "reading checkpoint {} of model {} file {}",
                    m.version, model.name, file.path
                )
            };
            let seg = repo
                .read_segment(m, file)
                .await
                .map_err(|e| EngineError::repository(what(), e))?;
            if seg.row_bytes as usize != ts.row_bytes
                || seg.dim as usize != ts.dim
                || seg.dtype != ts.dtype
            {
                return Err(EngineError::internal(format!(
                    "{}: segment holds {} rows of dim {} ({} bytes) but table {} is {} of dim {} \
                     ({} bytes); the checkpoint was written for another model.json — delete it",
                    what(),
                    seg.dtype,
                    seg.dim,
                    seg.row_bytes,
                    ts.name,
                    ts.dtype,
                    ts.dim,
                    ts.row_bytes
                )));
            }
            let rb = ts.row_bytes;
            match file.shard {
                Some(s) if (s as usize) < tables.shards[t].len() => {
                    tables.shards[t][s as usize].upsert_batch(&seg.keys, &seg.rows);
                }
                _ => {
                    for (i, &key) in seg.keys.iter().enumerate() {
                        let s = shard_of(key, shape.shards) as usize;
                        if holds(held, s) {
                            tables.shards[t][s].upsert(key, &seg.rows[i * rb..(i + 1) * rb]);
                        }
                    }
                }
            }
            model.progress_add(seg.keys.len() as u64, file.bytes);
        }
    }
    Ok(())
}

/// Reads a delta into a change set: tagged rows per (table, shard) of the shards in `held`, the
/// last row of a key wins.
pub(crate) async fn read_delta(
    repo: &Repository,
    model: &Model,
    shape: &Shape,
    m: &Manifest,
    held: Option<&ShardSet>,
) -> Result<RowSet> {
    let rows: Vec<u64> = shape
        .tables
        .iter()
        .map(|t| m.table(&t.name).map(|mt| mt.rows + mt.deletes).unwrap_or(0))
        .collect();
    let stage = Tables::with_rows(shape, 1, &rows, held);
    stream_version(
        repo,
        model,
        shape,
        m,
        "delta",
        &stage,
        RowTag::Leading,
        held,
    )
    .await?;
    Ok(stage)
}

/// Rows of one input batch grouped by shard, so each shard's table takes them in one
/// `upsert_batch` (one writer-lock acquisition and a bucket-ordered sweep, not one per key).
pub(crate) struct ShardBatches {
    keys: Vec<Vec<u64>>,
    rows: Vec<Vec<u8>>,
}

impl ShardBatches {
    pub(crate) fn new(shards: usize) -> ShardBatches {
        ShardBatches {
            keys: vec![Vec::new(); shards],
            rows: vec![Vec::new(); shards],
        }
    }

    /// Adds a row; returns its buffer to fill (`row_bytes` long).
    pub(crate) fn push(&mut self, shard: usize, key: u64, row_bytes: usize) -> &mut [u8] {
        self.keys[shard].push(key);
        let rows = &mut self.rows[shard];
        let at = rows.len();
        rows.resize(at + row_bytes, 0);
        &mut rows[at..]
    }

    /// Writes every buffered row into `tables` (one per shard) and empties the buffers.
    pub(crate) fn flush(&mut self, tables: &[Table]) {
        for ((keys, rows), table) in self.keys.iter_mut().zip(&mut self.rows).zip(tables) {
            if !keys.is_empty() {
                table.upsert_batch(keys, rows);
                keys.clear();
                rows.clear();
            }
        }
    }
}

/// Copies of one shard's rows, for a checkpoint segment.
pub(crate) fn snapshot_shard(table: &Table) -> (Vec<u64>, Vec<u8>) {
    let mut keys = Vec::with_capacity(table.len());
    let mut rows = Vec::with_capacity(table.len() * table.row_bytes());
    table.for_each(|k, r| {
        keys.push(k);
        rows.extend_from_slice(r);
    });
    (keys, rows)
}
