//! One data set, put into both systems: published as versions of a hopps model (one table),
//! and written to Redis as binary values under `t:<id>`.
//!
//! A data set is `n` rows of `dim` f32 values; row `i` has key [`key_of`]`(seed, i)`. A delta
//! rewrites a slice of the rows at a new generation and adds new rows after the last one, so
//! both systems end in the same state after the same updates.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hopps_format::{
    ModelSpec, PublishOptions, Repository, StorageOptions, TableArrays, TableSpec, VersionKind,
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::resp::RespConnection;
use crate::workload::{key_of, row_bytes_of, rows_of, value_of};

/// Key prefix in Redis: keys are `t:<id>`.
pub const REDIS_PREFIX: &str = "t";
/// The hopps table of every suite.
pub const TABLE: &str = "t";
/// Keys per `MSET` command when loading Redis.
const MSET_KEYS: usize = 1000;
/// Rows converted and sent at a time: bounds the client's memory for large data sets.
const CHUNK_ROWS: usize = 100_000;

/// What a data set is made of.
#[derive(Debug, Clone, Copy)]
pub struct DataSet {
    pub seed: u64,
    /// Rows of the full version.
    pub rows: u64,
    pub dim: u32,
}

/// A set of row changes: rows `first..first + count` get `generation`'s values (rows at or past
/// `DataSet::rows` are new keys).
#[derive(Debug, Clone, Copy)]
pub struct RowChange {
    pub first: u64,
    pub count: u64,
    pub generation: u32,
}

impl DataSet {
    pub fn key(&self, i: u64) -> u64 {
        key_of(self.seed, i)
    }

    pub fn keys(&self, first: u64, count: u64) -> Vec<u64> {
        (first..first + count).map(|i| self.key(i)).collect()
    }

    /// Raw payload of one entry: the key and the f32 row, what an ideal store would hold.
    pub fn raw_bytes_per_key(&self) -> f64 {
        8.0 + 4.0 * f64::from(self.dim)
    }

    /// The value `j` of row `i` after `change` (if it covers `i`) on top of generation 0.
    pub fn expected(&self, i: u64, j: u32, change: Option<RowChange>) -> f32 {
        let generation = change
            .filter(|c| (c.first..c.first + c.count).contains(&i))
            .map_or(0, |c| c.generation);
        value_of(self.key(i), generation, j)
    }
}

/// A hopps model repository in a local directory, holding one model of one table.
pub struct HoppsRepo {
    pub repo: Repository,
    /// The repository's directory, as `hopps serve --repo` takes it.
    pub dir: std::path::PathBuf,
    pub model: String,
    pub shards: u32,
}

impl HoppsRepo {
    pub async fn open(dir: &Path, model: &str, shards: u32) -> anyhow::Result<HoppsRepo> {
        let uri = dir.to_str().context("repository path is not UTF-8")?;
        let repo = Repository::open(uri, &StorageOptions::default())
            .await
            .with_context(|| format!("opening the model repository {}", dir.display()))?;
        Ok(HoppsRepo {
            repo,
            dir: dir.to_path_buf(),
            model: model.to_string(),
            shards,
        })
    }

    /// Publishes the full version (generation 0 of every row); returns its version number.
    pub async fn publish_full(&self, data: &DataSet) -> anyhow::Result<u64> {
        let keys = data.keys(0, data.rows);
        let values = rows_of(&keys, data.dim, 0);
        let opts = PublishOptions {
            create: Some(ModelSpec::new(
                self.model.clone(),
                self.shards,
                vec![TableSpec::new(TABLE, data.dim)],
            )),
            source: "hopps-bench".to_string(),
            ..PublishOptions::default()
        };
        let summary = self
            .repo
            .publish_arrays(
                &self.model,
                VersionKind::Full,
                &[TableArrays {
                    table: TABLE,
                    dim: data.dim,
                    keys: &keys,
                    values: &values,
                    deleted: None,
                }],
                &opts,
            )
            .await
            .with_context(|| format!("publishing the full version of model {:?}", self.model))?;
        Ok(summary.version)
    }

    /// Publishes `change` as a delta on top of `parent` (`None`: the newest committed version).
    pub async fn publish_delta(
        &self,
        data: &DataSet,
        change: RowChange,
        parent: Option<u64>,
    ) -> anyhow::Result<(u64, Duration)> {
        let keys = data.keys(change.first, change.count);
        let values = rows_of(&keys, data.dim, change.generation);
        let opts = PublishOptions {
            parent,
            source: "hopps-bench".to_string(),
            ..PublishOptions::default()
        };
        let started = Instant::now();
        let summary = self
            .repo
            .publish_arrays(
                &self.model,
                VersionKind::Delta,
                &[TableArrays {
                    table: TABLE,
                    dim: data.dim,
                    keys: &keys,
                    values: &values,
                    deleted: None,
                }],
                &opts,
            )
            .await
            .with_context(|| format!("publishing a delta of model {:?}", self.model))?;
        Ok((summary.version, started.elapsed()))
    }
}

/// Writes rows `first..first + count` at `generation` to Redis with pipelined `MSET`s.
pub async fn redis_write<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut RespConnection<S>,
    data: &DataSet,
    change: RowChange,
) -> anyhow::Result<()> {
    let mut bytes = Vec::new();
    let end = change.first + change.count;
    let mut start = change.first;
    while start < end {
        let n = (end - start).min(CHUNK_ROWS as u64);
        let keys = data.keys(start, n);
        row_bytes_of(&rows_of(&keys, data.dim, change.generation), &mut bytes);
        conn.mset(REDIS_PREFIX, &keys, &bytes, MSET_KEYS)
            .await
            .with_context(|| format!("writing rows {start}..{} to redis", start + n))?;
        start += n;
    }
    Ok(())
}

/// Writes the full data set (generation 0) to Redis.
pub async fn redis_load<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut RespConnection<S>,
    data: &DataSet,
) -> anyhow::Result<()> {
    redis_write(
        conn,
        data,
        RowChange {
            first: 0,
            count: data.rows,
            generation: 0,
        },
    )
    .await
}

/// Checks that `values` (as a client returned them for rows `rows`) match the data set after
/// `change`; the error names the first key that differs.
pub fn check_rows(
    data: &DataSet,
    rows: &[u64],
    values: &[f32],
    change: Option<RowChange>,
    what: &str,
) -> anyhow::Result<()> {
    let dim = data.dim as usize;
    anyhow::ensure!(
        values.len() == rows.len() * dim,
        "{what}: {} values for {} rows of dim {dim}",
        values.len(),
        rows.len()
    );
    for (r, &i) in rows.iter().enumerate() {
        for j in 0..data.dim {
            let want = data.expected(i, j, change);
            let got = values[r * dim + j as usize];
            anyhow::ensure!(
                got == want,
                "{what}: key {} value {j} is {got}, expected {want}; the system does not hold the rows the suite wrote",
                data.key(i)
            );
        }
    }
    Ok(())
}

/// Decodes packed little-endian f32 rows (as Redis returns them).
pub fn f32s_of(bytes: &[u8], out: &mut Vec<f32>) {
    out.clear();
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_values_follow_the_change() {
        let data = DataSet {
            seed: 1,
            rows: 10,
            dim: 2,
        };
        let change = RowChange {
            first: 8,
            count: 4,
            generation: 3,
        };
        assert_eq!(
            data.expected(1, 0, Some(change)),
            value_of(data.key(1), 0, 0)
        );
        assert_eq!(
            data.expected(9, 1, Some(change)),
            value_of(data.key(9), 3, 1)
        );
        assert_eq!(
            data.expected(11, 1, Some(change)),
            value_of(data.key(11), 3, 1),
            "a new row"
        );
        assert_eq!(data.raw_bytes_per_key(), 16.0);
    }

    #[test]
    fn check_rows_names_the_wrong_key() {
        let data = DataSet {
            seed: 1,
            rows: 4,
            dim: 2,
        };
        let keys = data.keys(0, 4);
        let mut values = rows_of(&keys, 2, 0);
        check_rows(&data, &[0, 1, 2, 3], &values, None, "t").expect("same rows");
        values[5] += 1.0;
        let err = check_rows(&data, &[0, 1, 2, 3], &values, None, "t").expect_err("changed");
        assert!(err.to_string().contains(&data.key(2).to_string()), "{err}");
        let mut bytes = Vec::new();
        row_bytes_of(&values, &mut bytes);
        let mut back = Vec::new();
        f32s_of(&bytes, &mut back);
        assert_eq!(back, values);
    }

    #[tokio::test]
    async fn a_published_data_set_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = HoppsRepo::open(dir.path(), "bench", 2).await.expect("open");
        let data = DataSet {
            seed: 5,
            rows: 100,
            dim: 4,
        };
        let full = repo.publish_full(&data).await.expect("full");
        let change = RowChange {
            first: 90,
            count: 20,
            generation: 1,
        };
        let (delta, _) = repo
            .publish_delta(&data, change, None)
            .await
            .expect("delta");
        assert!(delta > full, "{delta} > {full}");
        let versions = repo.repo.versions("bench").await.expect("versions");
        let latest = versions.latest().expect("a committed version");
        assert_eq!(latest.version, delta);
        assert_eq!(latest.rows, 20);
    }
}
