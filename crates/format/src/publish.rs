//! Publishing versions: data files first, `MANIFEST.json` last.
//!
//! Rows are validated (dim, finite values, deletes only in deltas), counted (duplicates: the
//! later row wins, as readers apply rows in file order) and routed to their shard; each shard
//! gets its own Parquet files in the version directory. Only when every file is closed is the
//! manifest written, exclusively, so two publishers never both commit one version number.
//! Any failure before that deletes what was written (best effort); what cannot be deleted is
//! an aborted version directory, which readers ignore.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{
    ArrayRef, BooleanArray, FixedSizeListArray, Float32Array, RecordBatch, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::error::{ErrorKind, FormatError, Result};
use crate::repo::{Repository, describe_tables, version_name, writer_token};
use crate::rows::{CsvRows, NpyRows, ParquetRows, RowBatch};
use crate::shard::shard_of;
use crate::spec::{
    FORMAT_VERSION, FileEntry, Manifest, ManifestTable, ModelSpec, PublishSummary, TableSpec,
    VersionKind, checksum_string, now_rfc3339, validate_name,
};

/// Options of a publish.
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// The parent of a delta; `None` = the newest committed version.
    pub parent: Option<u64>,
    /// Create the model with this spec if it does not exist yet.
    pub create: Option<ModelSpec>,
    /// Accept NaN and infinite values (otherwise they are counted and the publish refused).
    pub allow_non_finite: bool,
    /// Recorded in the manifest: who or what published.
    pub source: String,
    /// Rows per data file before a shard's file is rolled over; `None` = about 256 MiB.
    pub max_rows_per_file: Option<u64>,
}

/// One table's rows in memory, for [`Repository::publish_arrays`].
#[derive(Debug, Clone, Copy)]
pub struct TableArrays<'a> {
    pub table: &'a str,
    pub dim: u32,
    pub keys: &'a [u64],
    /// `keys.len() * dim` values, row-major.
    pub values: &'a [f32],
    /// One flag per key (deltas only).
    pub deleted: Option<&'a [bool]>,
}

/// An input file of a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputFile {
    /// Parquet: `key`, `value`, optional `deleted`.
    Parquet(PathBuf),
    /// Delimited text: `key, v0..v{dim-1} [, deleted]`.
    Csv { path: PathBuf, delimiter: u8 },
    /// A pair of `.npy` arrays: keys `(n,)` uint64/int64 and values `(n, dim)` float32.
    Npy { keys: PathBuf, values: PathBuf },
    /// A Parquet file every key of which belongs to `shard` (Spark output partitioned by
    /// `pmod(xxhash64(key), S)`, or `hopps shard` output). It is checked and uploaded unchanged.
    Sharded { path: PathBuf, shard: u32 },
}

impl InputFile {
    /// Infers the format from the extension: `.parquet`/`.pq`, `.csv`, `.tsv`/`.txt`. A
    /// directory stands for the Parquet files in it (as Spark writes them), in name order.
    /// `.npy` needs its pair: use [`InputFile::Npy`].
    pub fn from_path(path: &Path) -> Result<Vec<InputFile>> {
        if path.is_dir()
            && let Some(sharded) = sharded_layout(path)?
        {
            return Ok(sharded);
        }
        if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| FormatError::local_io(path, "cannot list input directory", e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    !name.starts_with('.')
                        && !name.starts_with('_')
                        && p.is_file()
                        && (name.ends_with(".parquet") || name.ends_with(".pq"))
                })
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(FormatError::invalid(format!(
                    "input directory {} holds no .parquet files",
                    path.display()
                )));
            }
            return Ok(files.into_iter().map(InputFile::Parquet).collect());
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "parquet" | "pq" => Ok(vec![InputFile::Parquet(path.to_path_buf())]),
            "csv" => Ok(vec![InputFile::Csv {
                path: path.to_path_buf(),
                delimiter: b',',
            }]),
            "tsv" | "txt" => Ok(vec![InputFile::Csv {
                path: path.to_path_buf(),
                delimiter: b'\t',
            }]),
            "npy" => Err(FormatError::invalid(format!(
                "{} is a .npy file: give the keys and the values as a pair (--input keys.npy --values values.npy)",
                path.display()
            ))),
            _ => Err(FormatError::invalid(format!(
                "{}: unknown input format; use .parquet, .csv, .tsv, or a .npy pair",
                path.display()
            ))),
        }
    }

    fn display(&self) -> String {
        match self {
            InputFile::Parquet(p)
            | InputFile::Csv { path: p, .. }
            | InputFile::Sharded { path: p, .. } => p.display().to_string(),
            InputFile::Npy { keys, values } => format!("{} + {}", keys.display(), values.display()),
        }
    }

    /// Rows the file holds, when known without reading it (Parquet footer, npy header).
    pub fn rows_hint(&self, dim: u32) -> Option<u64> {
        match self {
            InputFile::Parquet(p) | InputFile::Sharded { path: p, .. } => {
                let f = std::fs::File::open(p).ok()?;
                let b = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
                    .ok()?;
                Some(b.metadata().file_metadata().num_rows() as u64)
            }
            InputFile::Npy { keys, values } => {
                let k = std::io::BufReader::new(std::fs::File::open(keys).ok()?);
                let v = std::io::BufReader::new(std::fs::File::open(values).ok()?);
                NpyRows::new(k, v, dim, "keys", "values")
                    .ok()
                    .map(|r| r.rows())
            }
            InputFile::Csv { .. } => None,
        }
    }

    fn open(&self, dim: u32) -> Result<Box<dyn RowSource>> {
        let open = |p: &Path| {
            std::fs::File::open(p).map_err(|e| FormatError::local_io(p, "cannot open input", e))
        };
        Ok(match self {
            InputFile::Parquet(p) | InputFile::Sharded { path: p, .. } => {
                Box::new(ParquetRows::new(open(p)?, dim, &p.display().to_string())?)
            }
            InputFile::Csv { path, delimiter } => Box::new(CsvRows::new(
                std::io::BufReader::with_capacity(1 << 20, open(path)?),
                *delimiter,
                dim,
                &path.display().to_string(),
            )),
            InputFile::Npy { keys, values } => Box::new(NpyRows::new(
                std::io::BufReader::with_capacity(1 << 20, open(keys)?),
                std::io::BufReader::with_capacity(1 << 20, open(values)?),
                dim,
                &keys.display().to_string(),
                &values.display().to_string(),
            )?),
        })
    }
}

trait RowSource: Send {
    fn next_batch(&mut self) -> Result<Option<RowBatch>>;
}

impl RowSource for ParquetRows {
    fn next_batch(&mut self) -> Result<Option<RowBatch>> {
        ParquetRows::next_batch(self)
    }
}
impl<R: std::io::BufRead + Send> RowSource for CsvRows<R> {
    fn next_batch(&mut self) -> Result<Option<RowBatch>> {
        CsvRows::next_batch(self)
    }
}
impl<K: std::io::Read + Send, V: std::io::Read + Send> RowSource for NpyRows<K, V> {
    fn next_batch(&mut self) -> Result<Option<RowBatch>> {
        NpyRows::next_batch(self)
    }
}

/// One table of a file publish.
#[derive(Debug, Clone)]
pub struct TableInput {
    pub table: String,
    pub dim: u32,
    pub inputs: Vec<InputFile>,
}

/// A publish from files.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub model: String,
    pub kind: VersionKind,
    pub tables: Vec<TableInput>,
    pub options: PublishOptions,
}

/// Progress of a publish, reported after every batch.
#[derive(Debug, Clone, Default)]
pub struct PublishProgress {
    pub table: String,
    /// Rows read so far (all tables).
    pub rows: u64,
    /// Rows expected in all inputs, when every input tells.
    pub rows_total: Option<u64>,
    /// Data files completely written so far.
    pub files_written: u64,
    /// Rows whose key appeared earlier in the same table (the later row wins).
    pub duplicates: u64,
}

struct Plan {
    spec: ModelSpec,
    version: u64,
    parent: Option<u64>,
}

impl Repository {
    /// Publishes a version from files: data files first, `MANIFEST.json` last.
    pub async fn publish(
        &self,
        req: &PublishRequest,
        progress: &(dyn Fn(&PublishProgress) + Send + Sync),
    ) -> Result<PublishSummary> {
        let dims: Vec<(String, u32)> = req
            .tables
            .iter()
            .map(|t| (t.table.clone(), t.dim))
            .collect();
        let plan = self.plan(&req.model, req.kind, &dims, &req.options).await?;
        let rows_total = req
            .tables
            .iter()
            .flat_map(|t| t.inputs.iter().map(move |i| i.rows_hint(t.dim)))
            .sum::<Option<u64>>();
        let mut w = VersionWriter::new(self, &plan, req.kind, &req.model, &req.options);
        let mut p = PublishProgress {
            rows_total,
            ..Default::default()
        };
        let result = async {
            for t in &req.tables {
                p.table = t.table.clone();
                w.begin_table(&t.table, t.dim);
                for input in &t.inputs {
                    match input {
                        InputFile::Sharded { path, shard } => {
                            w.copy_sharded(path, *shard, &mut p, progress).await?
                        }
                        _ => {
                            self.feed_file(&mut w, input, t.dim, &mut p, progress)
                                .await?
                        }
                    }
                }
                w.end_table().await?;
            }
            w.commit(&req.options).await
        }
        .await;
        match result {
            Ok(s) => Ok(s),
            Err(e) => {
                w.abort().await;
                Err(e)
            }
        }
    }

    async fn feed_file(
        &self,
        w: &mut VersionWriter,
        input: &InputFile,
        dim: u32,
        p: &mut PublishProgress,
        progress: &(dyn Fn(&PublishProgress) + Send + Sync),
    ) -> Result<()> {
        // Decoding runs on a blocking thread; a channel of two batches bounds memory and lets
        // reading overlap with encoding and uploading.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<RowBatch>>(2);
        let input_c = input.clone();
        let reader = tokio::task::spawn_blocking(move || {
            let mut src = match input_c.open(dim) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            };
            loop {
                let item = src.next_batch();
                let stop = !matches!(item, Ok(Some(_)));
                let sent = match item {
                    Ok(Some(b)) => tx.blocking_send(Ok(b)),
                    Ok(None) => Ok(()),
                    Err(e) => tx.blocking_send(Err(e)),
                };
                if stop || sent.is_err() {
                    return;
                }
            }
        });
        let name = input.display();
        while let Some(item) = rx.recv().await {
            let batch = item?;
            w.push(&batch, &name).await?;
            p.rows += batch.len() as u64;
            p.files_written = w.files_written;
            p.duplicates = w.duplicates_total();
            progress(p);
        }
        reader.await.map_err(|e| {
            FormatError::new(ErrorKind::Io, format!("reading {name}: worker failed: {e}"))
        })?;
        Ok(())
    }

    /// Publishes a version of one or more tables from in-memory arrays.
    pub async fn publish_arrays(
        &self,
        model: &str,
        kind: VersionKind,
        tables: &[TableArrays<'_>],
        opts: &PublishOptions,
    ) -> Result<PublishSummary> {
        for t in tables {
            let n = t.keys.len();
            if t.values.len() != n * t.dim as usize {
                return Err(FormatError::invalid(format!(
                    "model {model:?} table {:?}: {} values for {n} keys of dim {}; give keys.len() * dim values",
                    t.table,
                    t.values.len(),
                    t.dim
                )));
            }
            if let Some(d) = t.deleted
                && d.len() != n
            {
                return Err(FormatError::invalid(format!(
                    "model {model:?} table {:?}: {} deleted flags for {n} keys",
                    t.table,
                    d.len()
                )));
            }
        }
        let dims: Vec<(String, u32)> = tables
            .iter()
            .map(|t| (t.table.to_string(), t.dim))
            .collect();
        let plan = self.plan(model, kind, &dims, opts).await?;
        let mut w = VersionWriter::new(self, &plan, kind, model, opts);
        let result = async {
            for t in tables {
                w.begin_table(t.table, t.dim);
                let dim = t.dim as usize;
                let step = crate::rows::BATCH_ROWS * 4;
                let mut start = 0;
                while start < t.keys.len() {
                    let end = (start + step).min(t.keys.len());
                    let batch = RowBatch {
                        keys: t.keys[start..end].to_vec(),
                        values: t.values[start * dim..end * dim].to_vec(),
                        deleted: t
                            .deleted
                            .map(|d| d[start..end].to_vec())
                            .unwrap_or_default(),
                    };
                    w.push(&batch, &format!("arrays of table {:?}", t.table))
                        .await?;
                    start = end;
                }
                w.end_table().await?;
            }
            w.commit(opts).await
        }
        .await;
        match result {
            Ok(s) => Ok(s),
            Err(e) => {
                w.abort().await;
                Err(e)
            }
        }
    }

    /// Resolves the model spec (creating or extending it), the parent and the version number.
    async fn plan(
        &self,
        model: &str,
        kind: VersionKind,
        dims: &[(String, u32)],
        opts: &PublishOptions,
    ) -> Result<Plan> {
        validate_name("model", model)?;
        if kind == VersionKind::Checkpoint {
            return Err(FormatError::invalid(format!(
                "model {model:?}: checkpoints are written by hopps itself (checkpoint_writer), not published"
            )));
        }
        if dims.is_empty() {
            return Err(FormatError::invalid(format!(
                "model {model:?}: a publish needs at least one table"
            )));
        }
        for (i, (name, _)) in dims.iter().enumerate() {
            validate_name("table", name)?;
            if dims[..i].iter().any(|(n, _)| n == name) {
                return Err(FormatError::invalid(format!(
                    "model {model:?}: table {name:?} appears twice in one publish"
                )));
            }
        }
        let spec = match self.model(model).await {
            Ok(spec) => spec,
            Err(e) if e.kind() == ErrorKind::NotFound => match &opts.create {
                Some(create) => {
                    if create.name != model {
                        return Err(FormatError::invalid(format!(
                            "publish to model {model:?} with a create spec for model {:?}",
                            create.name
                        )));
                    }
                    self.create_model(create).await?;
                    self.model(model).await?
                }
                None => return Err(e),
            },
            Err(e) => return Err(e),
        };
        // Tables must agree with the spec; a table the model lacks is added (from the create
        // spec when it declares it, else as an f32 table), never changed.
        let mut extended = spec.clone();
        for (name, dim) in dims {
            match spec.table(name) {
                Some(t) if t.dim != *dim => {
                    return Err(FormatError::invalid(format!(
                        "model {model:?} table {name:?} has dim {}, but the input has dim {dim}; \
                         publish rows of dim {} or create a new model",
                        t.dim, t.dim
                    )));
                }
                Some(_) => {}
                None => {
                    let t = opts
                        .create
                        .as_ref()
                        .and_then(|c| c.table(name).cloned())
                        .filter(|t| t.dim == *dim)
                        .unwrap_or_else(|| TableSpec::new(name.clone(), *dim));
                    extended.tables.push(t);
                }
            }
        }
        let listing = self.listing_for_publish(model).await?;
        if kind == VersionKind::Full {
            let missing: Vec<&str> = extended
                .tables
                .iter()
                .filter(|t| !dims.iter().any(|(n, _)| *n == t.name))
                .map(|t| t.name.as_str())
                .collect();
            if !missing.is_empty() {
                return Err(FormatError::invalid(format!(
                    "model {model:?}: a full version holds every table, but this publish lacks {}; \
                     publish all tables together (tables: {}), or publish these rows as a delta",
                    missing.join(", "),
                    describe_tables(&extended)
                )));
            }
        }
        if extended != spec {
            self.extend_model(&extended).await?;
        }
        let parent = match kind {
            VersionKind::Delta => {
                let parent = match opts.parent {
                    Some(p) => p,
                    None => listing.latest().map(|m| m.version).ok_or_else(|| {
                        FormatError::not_found(format!(
                            "model {model:?} has no committed version for a delta to apply to; \
                             publish a full version first"
                        ))
                    })?,
                };
                if !listing.committed.iter().any(|m| m.version == parent) {
                    return Err(FormatError::not_found(format!(
                        "delta parent version {parent} of model {model:?} is not committed (committed: \
                         {}); name an existing parent or publish a full version",
                        summarize_versions(&listing.committed)
                    )));
                }
                Some(parent)
            }
            _ => None,
        };
        let version = listing.highest().map_or(1, |v| v + 1);
        Ok(Plan {
            spec: extended,
            version,
            parent,
        })
    }

    async fn listing_for_publish(&self, model: &str) -> Result<crate::spec::VersionListing> {
        self.versions(model).await
    }
}

/// The files of a pre-sharded directory: `shard=<n>/*.parquet` subdirectories (as Spark's
/// `partitionBy("shard")` and `hopps shard` write them), in shard then name order. `None` when
/// the directory has no `shard=` subdirectory.
pub fn sharded_layout(dir: &Path) -> Result<Option<Vec<InputFile>>> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir)
        .map_err(|e| FormatError::local_io(dir, "cannot list input directory", e))?;
    let mut shard_dirs: Vec<(u32, PathBuf)> = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name.strip_prefix("shard=")
            && e.path().is_dir()
        {
            let shard = n.parse::<u32>().map_err(|_| {
                FormatError::invalid(format!("{}: {name:?} is not shard=<number>", dir.display()))
            })?;
            shard_dirs.push((shard, e.path()));
        }
    }
    if shard_dirs.is_empty() {
        return Ok(None);
    }
    shard_dirs.sort();
    for (shard, d) in shard_dirs {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&d)
            .map_err(|e| FormatError::local_io(&d, "cannot list shard directory", e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                p.is_file()
                    && !name.starts_with('.')
                    && !name.starts_with('_')
                    && (name.ends_with(".parquet") || name.ends_with(".pq"))
            })
            .collect();
        files.sort();
        out.extend(
            files
                .into_iter()
                .map(|path| InputFile::Sharded { path, shard }),
        );
    }
    Ok(Some(out))
}

/// What `hopps shard` should do.
#[derive(Debug, Clone)]
pub struct ShardRequest {
    pub table: String,
    pub dim: u32,
    /// A power of two: the shard count of the model the output will be published to.
    pub shards: u32,
    pub kind: VersionKind,
    pub inputs: Vec<InputFile>,
    pub allow_non_finite: bool,
    pub max_rows_per_file: Option<u64>,
}

/// `_hopps_shards.json`, written beside the per-shard files by [`shard_to_dir`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardSummary {
    pub format_version: u32,
    pub table: String,
    pub dim: u32,
    pub shards: u32,
    pub hash: String,
    pub kind: VersionKind,
    pub rows: u64,
    pub deletes: u64,
    pub duplicates: u64,
    /// Paths relative to the output directory.
    pub files: Vec<FileEntry>,
}

/// Name of the summary [`shard_to_dir`] writes.
pub const SHARD_SUMMARY: &str = "_hopps_shards.json";

/// Splits unsharded input into per-shard Parquet files under `out` (`shard=<s>/part-*.parquet`,
/// the layout Spark's `partitionBy("shard")` writes) plus `_hopps_shards.json`. Publish the
/// directory with `hopps model publish --input <out>`, which uploads the files unchanged.
pub async fn shard_to_dir(
    req: &ShardRequest,
    out: &Path,
    progress: &(dyn Fn(&PublishProgress) + Send + Sync),
) -> Result<ShardSummary> {
    validate_name("table", &req.table)?;
    let spec = ModelSpec::new(
        "sharding",
        req.shards,
        vec![TableSpec::new(req.table.clone(), req.dim)],
    );
    spec.validate()?;
    if let Ok(mut rd) = std::fs::read_dir(out)
        && rd.next().is_some()
    {
        return Err(FormatError::invalid(format!(
            "output directory {} is not empty; give a new or empty directory",
            out.display()
        )));
    }
    let uri = out.display().to_string();
    let repo = Repository::open(&uri, &crate::StorageOptions::default()).await?;
    let opts = PublishOptions {
        allow_non_finite: req.allow_non_finite,
        max_rows_per_file: req.max_rows_per_file,
        ..Default::default()
    };
    let plan = Plan {
        spec,
        version: 0,
        parent: None,
    };
    let mut w = VersionWriter::new(&repo, &plan, req.kind, "sharding", &opts);
    w.dir = String::new();
    w.shard_dirs = true;
    let rows_total = req
        .inputs
        .iter()
        .map(|i| i.rows_hint(req.dim))
        .sum::<Option<u64>>();
    let mut p = PublishProgress {
        table: req.table.clone(),
        rows_total,
        ..Default::default()
    };
    let result = async {
        w.begin_table(&req.table, req.dim);
        for input in &req.inputs {
            if let InputFile::Sharded { path, .. } = input {
                return Err(FormatError::invalid(format!(
                    "{} is already sharded; publish it directly",
                    path.display()
                )));
            }
            repo.feed_file(&mut w, input, req.dim, &mut p, progress)
                .await?;
        }
        w.end_table().await?;
        let t = w
            .done
            .pop()
            .ok_or_else(|| FormatError::invalid("no table was written"))?;
        let summary = ShardSummary {
            format_version: FORMAT_VERSION,
            table: t.name,
            dim: req.dim,
            shards: req.shards,
            hash: crate::spec::HASH_XXH64_SEED42.to_string(),
            kind: req.kind,
            rows: t.rows,
            deletes: t.deletes,
            duplicates: t.duplicates,
            files: t.files,
        };
        let bytes =
            serde_json::to_vec_pretty(&summary).map_err(|e| FormatError::invalid(e.to_string()))?;
        repo.put(SHARD_SUMMARY, bytes, false).await?;
        Ok(summary)
    }
    .await;
    if result.is_err() {
        w.abort().await;
    }
    result
}

fn summarize_versions(ms: &[Manifest]) -> String {
    if ms.is_empty() {
        return "none".to_string();
    }
    let v: Vec<String> = ms
        .iter()
        .rev()
        .take(10)
        .map(|m| m.version.to_string())
        .collect();
    let mut s = v.into_iter().rev().collect::<Vec<_>>().join(", ");
    if ms.len() > 10 {
        s = format!("..., {s}");
    }
    s
}

// ---- the writer of one version ----------------------------------------------------------------

struct OpenPart {
    rel: String,
    path: String,
    writer: opendal::Writer,
    encoder: ArrowWriter<Vec<u8>>,
    crc: u32,
    bytes: u64,
    rows: u64,
}

#[derive(Default)]
struct ShardBuf {
    keys: Vec<u64>,
    values: Vec<f32>,
    deleted: Vec<bool>,
    part: u32,
    open: Option<OpenPart>,
}

struct TableState {
    name: String,
    dim: u32,
    shards: Vec<ShardBuf>,
    seen: hashbrown::HashSet<u64>,
    rows: u64,
    deletes: u64,
    duplicates: u64,
    non_finite: u64,
    first_non_finite: Option<(u64, String)>,
    files: Vec<FileEntry>,
}

struct VersionWriter {
    repo: Repository,
    model: String,
    version: u64,
    parent: Option<u64>,
    kind: VersionKind,
    shards: u32,
    dir: String,
    token: String,
    allow_non_finite: bool,
    max_rows_per_file: Option<u64>,
    table: Option<TableState>,
    done: Vec<ManifestTable>,
    written: Vec<String>,
    /// Directories this publish may have created, deepest first after a reverse.
    dirs: Vec<String>,
    files_written: u64,
    /// Name files `shard=<s>/part-...` (the `hopps shard` output layout) instead of
    /// `<table>/part-<s>-...` (a version directory).
    shard_dirs: bool,
}

/// Total bytes of rows buffered across all shards of a table before they are encoded.
const BUFFER_BUDGET: usize = 128 << 20;
/// Target bytes of one data file.
const FILE_TARGET_BYTES: u64 = 256 << 20;

impl VersionWriter {
    fn new(
        repo: &Repository,
        plan: &Plan,
        kind: VersionKind,
        model: &str,
        opts: &PublishOptions,
    ) -> VersionWriter {
        VersionWriter {
            repo: repo.clone(),
            model: model.to_string(),
            version: plan.version,
            parent: plan.parent,
            kind,
            shards: plan.spec.shards,
            dir: format!("{model}/versions/{}/", version_name(plan.version)),
            token: writer_token(),
            allow_non_finite: opts.allow_non_finite,
            max_rows_per_file: opts.max_rows_per_file,
            table: None,
            done: Vec::new(),
            written: Vec::new(),
            dirs: Vec::new(),
            files_written: 0,
            shard_dirs: false,
        }
    }

    fn duplicates_total(&self) -> u64 {
        self.done.iter().map(|t| t.duplicates).sum::<u64>()
            + self.table.as_ref().map_or(0, |t| t.duplicates)
    }

    fn begin_table(&mut self, name: &str, dim: u32) {
        self.table = Some(TableState {
            name: name.to_string(),
            dim,
            shards: (0..self.shards).map(|_| ShardBuf::default()).collect(),
            seen: hashbrown::HashSet::new(),
            rows: 0,
            deletes: 0,
            duplicates: 0,
            non_finite: 0,
            first_non_finite: None,
            files: Vec::new(),
        });
    }

    fn row_bytes(dim: u32) -> usize {
        dim as usize * 4 + 9
    }

    fn group_rows(&self, dim: u32) -> usize {
        (BUFFER_BUDGET / self.shards as usize / Self::row_bytes(dim)).clamp(256, 64 * 1024)
    }

    fn file_rows(&self, dim: u32) -> u64 {
        self.max_rows_per_file
            .unwrap_or(FILE_TARGET_BYTES / Self::row_bytes(dim) as u64)
            .max(1)
    }

    async fn push(&mut self, batch: &RowBatch, source: &str) -> Result<()> {
        self.check_and_route(batch, source, None)?;
        let group = self.group_rows(self.table.as_ref().map_or(1, |t| t.dim));
        for s in 0..self.shards as usize {
            let full = self
                .table
                .as_ref()
                .is_some_and(|t| t.shards[s].keys.len() >= group);
            if full {
                self.flush_shard(s, false).await?;
            }
        }
        Ok(())
    }

    /// Validates and counts the rows of `batch`. Without `copied_shard` the rows are buffered
    /// in their shard; with it, they come from a file that is copied as is, and every key must
    /// belong to that shard.
    fn check_and_route(
        &mut self,
        batch: &RowBatch,
        source: &str,
        copied_shard: Option<u32>,
    ) -> Result<()> {
        let kind = self.kind;
        let shards = self.shards;
        let t = self
            .table
            .as_mut()
            .ok_or_else(|| FormatError::invalid("push outside a table"))?;
        let dim = t.dim as usize;
        if batch.values.len() != batch.keys.len() * dim
            || !(batch.deleted.is_empty() || batch.deleted.len() == batch.keys.len())
        {
            return Err(FormatError::invalid(format!(
                "{source}: a batch of {} keys with {} values and {} delete flags does not fit dim {dim}",
                batch.keys.len(),
                batch.values.len(),
                batch.deleted.len()
            )));
        }
        for (i, &key) in batch.keys.iter().enumerate() {
            let deleted = batch.is_deleted(i);
            let row = &batch.values[i * dim..(i + 1) * dim];
            if deleted {
                if kind == VersionKind::Full {
                    return Err(FormatError::invalid(format!(
                        "{source}: key {key} is marked deleted, but a full version cannot delete; \
                         publish deletes as a delta (--delta)"
                    )));
                }
                t.deletes += 1;
            } else {
                if row.iter().any(|v| !v.is_finite()) {
                    t.non_finite += 1;
                    if t.first_non_finite.is_none() {
                        t.first_non_finite = Some((key, source.to_string()));
                    }
                }
                t.rows += 1;
            }
            if !t.seen.insert(key) {
                t.duplicates += 1;
            }
            let shard = shard_of(key, shards);
            if let Some(expected) = copied_shard {
                if shard != expected {
                    return Err(FormatError::invalid(format!(
                        "{source}: key {key} belongs to shard {shard} of {shards}, not to shard \
                         {expected}; the data was sharded with another shard count or hash \
                         (use pmod(xxhash64(key), {shards})), or publish it unsharded"
                    )));
                }
                continue;
            }
            let s = &mut t.shards[shard as usize];
            s.keys.push(key);
            if deleted {
                // A delete carries no value; store zeros so readers see a full row.
                s.values.resize(s.values.len() + dim, 0.0);
            } else {
                s.values.extend_from_slice(row);
            }
            if kind == VersionKind::Delta {
                s.deleted.push(deleted);
            }
        }
        Ok(())
    }

    /// Uploads a pre-sharded Parquet file unchanged, after checking every row of it.
    async fn copy_sharded(
        &mut self,
        path: &Path,
        shard: u32,
        p: &mut PublishProgress,
        progress: &(dyn Fn(&PublishProgress) + Send + Sync),
    ) -> Result<()> {
        if shard >= self.shards {
            return Err(FormatError::invalid(format!(
                "{}: shard {shard} does not exist in a model of {} shards",
                path.display(),
                self.shards
            )));
        }
        let (table, dim) = match &self.table {
            Some(t) => (t.name.clone(), t.dim),
            None => return Err(FormatError::invalid("copy outside a table")),
        };
        let source = path.display().to_string();
        let rows_before = p.rows;
        let mut src = ParquetRows::new(
            std::fs::File::open(path)
                .map_err(|e| FormatError::local_io(path, "cannot open input", e))?,
            dim,
            &source,
        )?;
        while let Some(batch) = src.next_batch()? {
            self.check_and_route(&batch, &source, Some(shard))?;
            p.rows += batch.len() as u64;
            progress(p);
        }
        let uri = self.repo.uri().to_string();
        let n = self.table.as_ref().map_or(0, |t| t.files.len());
        let rel = format!("{table}/part-{shard:05}-c{n:04}-{}.parquet", self.token);
        let dest = format!("{}{rel}", self.dir);
        let storage_err = |e| FormatError::storage(format!("{uri}: writing {dest}"), e);
        let mut writer = self
            .repo
            .op()
            .writer_with(&dest)
            .chunk(8 << 20)
            .await
            .map_err(storage_err)?;
        self.written.push(dest.clone());
        if let Some((d, _)) = dest.rsplit_once('/') {
            let d = format!("{d}/");
            if !self.dirs.contains(&d) {
                self.dirs.push(d);
            }
        }
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| FormatError::local_io(path, "cannot open input", e))?;
        let (mut crc, mut bytes) = (0u32, 0u64);
        loop {
            use tokio::io::AsyncReadExt;
            let mut buf = Vec::with_capacity(8 << 20);
            let got = (&mut file)
                .take(8 << 20)
                .read_to_end(&mut buf)
                .await
                .map_err(|e| FormatError::local_io(path, "cannot read input", e))?;
            if got == 0 {
                break;
            }
            crc = crc32c::crc32c_append(crc, &buf);
            bytes += got as u64;
            if let Err(e) = writer.write(buf).await {
                let _ = writer.abort().await;
                return Err(storage_err(e));
            }
        }
        writer.close().await.map_err(storage_err)?;
        let entry = FileEntry {
            path: rel,
            format: "parquet".into(),
            shard: Some(shard),
            rows: p.rows - rows_before,
            bytes,
            checksum: checksum_string(crc),
        };
        if let Some(t) = self.table.as_mut() {
            t.files.push(entry);
        }
        self.files_written += 1;
        p.files_written = self.files_written;
        Ok(())
    }

    /// Encodes the buffered rows of shard `s` as row groups of at most `group_rows` rows,
    /// rolling to a new file whenever one reaches `file_rows`; with `close`, writes every
    /// buffered row and closes the shard's file.
    async fn flush_shard(&mut self, s: usize, close: bool) -> Result<()> {
        let dim = self.table.as_ref().map_or(1, |t| t.dim);
        let file_rows = self.file_rows(dim);
        let group = self.group_rows(dim);
        loop {
            let (buffered, in_file) = {
                let Some(t) = self.table.as_ref() else {
                    return Ok(());
                };
                let b = &t.shards[s];
                (b.keys.len(), b.open.as_ref().map_or(0, |o| o.rows))
            };
            if buffered == 0 || (!close && buffered < group) {
                break;
            }
            let n = buffered
                .min(group)
                .min((file_rows - in_file.min(file_rows - 1)) as usize)
                .max(1);
            self.write_group(s, n).await?;
            let full = self.table.as_ref().is_some_and(|t| {
                t.shards[s]
                    .open
                    .as_ref()
                    .is_some_and(|o| o.rows >= file_rows)
            });
            if full {
                self.close_part(s).await?;
            }
        }
        if close {
            self.close_part(s).await?;
        }
        Ok(())
    }

    /// Encodes the first `n` buffered rows of shard `s` as one row group of its open file.
    async fn write_group(&mut self, s: usize, n: usize) -> Result<()> {
        let uri = self.repo.uri().to_string();
        let kind = self.kind;
        let t = self
            .table
            .as_mut()
            .ok_or_else(|| FormatError::invalid("flush outside a table"))?;
        let dim = t.dim;
        let buf = &mut t.shards[s];
        if buf.open.is_none() {
            let rel = if self.shard_dirs {
                format!("shard={s}/part-{:04}-{}.parquet", buf.part, self.token)
            } else {
                format!(
                    "{}/part-{s:05}-{:04}-{}.parquet",
                    t.name, buf.part, self.token
                )
            };
            let path = format!("{}{rel}", self.dir);
            let writer = self
                .repo
                .op()
                .writer_with(&path)
                .chunk(8 << 20)
                .await
                .map_err(|e| FormatError::storage(format!("{uri}: writing {path}"), e))?;
            self.written.push(path.clone());
            if let Some((d, _)) = path.rsplit_once('/') {
                let d = format!("{d}/");
                if !self.dirs.contains(&d) {
                    self.dirs.push(d);
                }
            }
            let props = WriterProperties::builder()
                .set_compression(Compression::UNCOMPRESSED)
                .set_dictionary_enabled(false)
                .set_max_row_group_row_count(Some(1 << 20))
                .build();
            let encoder = ArrowWriter::try_new(Vec::new(), schema(dim, kind), Some(props))
                .map_err(|e| FormatError::invalid(format!("cannot encode {path}: {e}")))?;
            buf.part += 1;
            buf.open = Some(OpenPart {
                rel,
                path,
                writer,
                encoder,
                crc: 0,
                bytes: 0,
                rows: 0,
            });
        }
        let Some(open) = buf.open.as_mut() else {
            return Ok(());
        };
        let d = dim as usize;
        let keys: Vec<u64> = buf.keys.drain(..n).collect();
        let values: Vec<f32> = buf.values.drain(..n * d).collect();
        let deleted: Vec<bool> = if kind == VersionKind::Delta {
            buf.deleted.drain(..n).collect()
        } else {
            Vec::new()
        };
        let batch = record_batch(dim, kind, keys, values, deleted)?;
        let open_path = open.path.clone();
        let enc_err = |e: parquet::errors::ParquetError| {
            FormatError::invalid(format!("encoding {open_path}: {e}"))
        };
        open.encoder.write(&batch).map_err(enc_err)?;
        open.encoder.flush().map_err(enc_err)?;
        open.encoder
            .sync()
            .map_err(|e| FormatError::new(ErrorKind::Io, format!("encoding {}: {e}", open.path)))?;
        let bytes = std::mem::take(open.encoder.inner_mut());
        open.rows += n as u64;
        write_part(open, bytes, &uri).await
    }

    /// Closes the open file of shard `s`, if any, and records it.
    async fn close_part(&mut self, s: usize) -> Result<()> {
        let uri = self.repo.uri().to_string();
        let Some(t) = self.table.as_mut() else {
            return Ok(());
        };
        if let Some(open) = t.shards[s].open.take() {
            let entry = finish_part(open, s as u32, &uri).await?;
            t.files.push(entry);
            self.files_written += 1;
        }
        Ok(())
    }

    async fn end_table(&mut self) -> Result<()> {
        for s in 0..self.shards as usize {
            self.flush_shard(s, true).await?;
        }
        let Some(mut t) = self.table.take() else {
            return Ok(());
        };
        if t.non_finite > 0 && !self.allow_non_finite {
            let (key, src) = t.first_non_finite.clone().unwrap_or_default();
            return Err(FormatError::invalid(format!(
                "model {:?} table {:?}: {} rows hold NaN or infinite values (first: key {key} in {src}); \
                 fix the training output, or pass --allow-non-finite (allow_non_finite) to \
                 publish them anyway",
                self.model, t.name, t.non_finite
            )));
        }
        if t.duplicates > 0 {
            tracing::warn!(
                model = %self.model, table = %t.name, duplicates = t.duplicates,
                "duplicate keys in one version: the later row of each key wins"
            );
        }
        // Readers apply files in manifest order; keep each shard's parts in write order.
        t.files.sort_by(|a, b| a.path.cmp(&b.path));
        self.done.push(ManifestTable {
            name: t.name,
            rows: t.rows,
            deletes: t.deletes,
            duplicates: t.duplicates,
            files: t.files,
        });
        Ok(())
    }

    async fn commit(&mut self, opts: &PublishOptions) -> Result<PublishSummary> {
        let rows = self.done.iter().map(|t| t.rows + t.deletes).sum();
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            model: self.model.clone(),
            version: self.version,
            kind: self.kind,
            parent: self.parent,
            created: now_rfc3339(),
            source: if opts.source.is_empty() {
                "hopps-format".to_string()
            } else {
                opts.source.clone()
            },
            rows,
            wal_sequence: None,
            tables: self.done.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| FormatError::invalid(e.to_string()))?;
        let path = format!("{}MANIFEST.json", self.dir);
        match self.repo.put(&path, bytes, true).await {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Conflict => {
                return Err(FormatError::conflict(format!(
                    "version {} of model {:?} was committed by another publisher meanwhile; nothing \
                     of this publish is visible, publish again",
                    self.version, self.model
                )));
            }
            Err(e) => {
                // The write may have left part of a manifest; remove it so the version reads as
                // aborted. (Not after a Conflict: that manifest belongs to another publisher.)
                let _ = self.repo.delete(&path).await;
                return Err(e);
            }
        }
        self.written.clear();
        Ok(PublishSummary {
            model: self.model.clone(),
            version: self.version,
            kind: self.kind,
            rows,
        })
    }

    /// Deletes every file this publish wrote, then the version directory if it is empty.
    async fn abort(&mut self) {
        if let Some(t) = self.table.as_mut() {
            for s in &mut t.shards {
                if let Some(mut open) = s.open.take() {
                    let _ = open.writer.abort().await;
                }
            }
        }
        for p in std::mem::take(&mut self.written) {
            let _ = self.repo.delete(&p).await;
        }
        // Directories go after their files; a storage without directories ignores these.
        for d in std::mem::take(&mut self.dirs) {
            let _ = self.repo.delete(&d).await;
        }
        if !self.dir.is_empty() {
            let _ = self.repo.delete(&self.dir).await;
        }
    }
}

async fn write_part(open: &mut OpenPart, bytes: Vec<u8>, uri: &str) -> Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    open.crc = crc32c::crc32c_append(open.crc, &bytes);
    open.bytes += bytes.len() as u64;
    open.writer
        .write(bytes)
        .await
        .map_err(|e| FormatError::storage(format!("{uri}: writing {}", open.path), e))
}

async fn finish_part(mut open: OpenPart, shard: u32, uri: &str) -> Result<FileEntry> {
    let encoder = std::mem::replace(
        &mut open.encoder,
        ArrowWriter::try_new(Vec::new(), Arc::new(Schema::empty()), None)
            .map_err(|e| FormatError::invalid(format!("encoding {}: {e}", open.path)))?,
    );
    let tail = encoder
        .into_inner()
        .map_err(|e| FormatError::invalid(format!("encoding {}: {e}", open.path)))?;
    write_part(&mut open, tail, uri).await?;
    open.writer
        .close()
        .await
        .map_err(|e| FormatError::storage(format!("{uri}: closing {}", open.path), e))?;
    Ok(FileEntry {
        path: open.rel,
        format: "parquet".to_string(),
        shard: Some(shard),
        rows: open.rows,
        bytes: open.bytes,
        checksum: checksum_string(open.crc),
    })
}

/// The Arrow schema of the data files hopps writes.
pub fn schema(dim: u32, kind: VersionKind) -> Arc<Schema> {
    let mut fields = vec![
        Field::new("key", DataType::UInt64, false),
        Field::new(
            "value",
            DataType::FixedSizeList(
                Arc::new(Field::new("item", DataType::Float32, false)),
                dim as i32,
            ),
            false,
        ),
    ];
    if kind == VersionKind::Delta {
        fields.push(Field::new("deleted", DataType::Boolean, false));
    }
    Arc::new(Schema::new(fields))
}

fn record_batch(
    dim: u32,
    kind: VersionKind,
    keys: Vec<u64>,
    values: Vec<f32>,
    deleted: Vec<bool>,
) -> Result<RecordBatch> {
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let values =
        FixedSizeListArray::try_new(item, dim as i32, Arc::new(Float32Array::from(values)), None)
            .map_err(|e| FormatError::invalid(format!("building a batch: {e}")))?;
    let mut cols: Vec<ArrayRef> = vec![Arc::new(UInt64Array::from(keys)), Arc::new(values)];
    if kind == VersionKind::Delta {
        cols.push(Arc::new(BooleanArray::from(deleted)));
    }
    RecordBatch::try_new(schema(dim, kind), cols)
        .map_err(|e| FormatError::invalid(format!("building a batch: {e}")))
}
