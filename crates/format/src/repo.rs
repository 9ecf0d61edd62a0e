//! The model repository: layout, reads, checkpoints and history over an OpenDAL operator.
//!
//! ```text
//! <root>/<model>/model.json
//! <root>/<model>/versions/<v, 20 digits>/MANIFEST.json        (the commit record, written last)
//! <root>/<model>/versions/<v>/<table>/part-<shard>-<part>-<token>.parquet
//! <root>/<model>/checkpoints/<v>/MANIFEST.json + <table>/shard-<shard>-<token>.hps
//! <root>/<model>/history/<seq, 20 digits>.json
//! ```
//!
//! Invariant: a version (or checkpoint) exists for readers only once its `MANIFEST.json`
//! exists, and that manifest names only files that were completely written before it.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use opendal::Operator;

use crate::error::{ErrorKind, FormatError, Result};
use crate::rows::{CsvRows, ParquetRows, RowBatch};
use crate::segment::{self, Segment, SegmentHeader};
use crate::spec::{
    FileEntry, HistoryRecord, Manifest, ManifestTable, ModelSpec, VersionKind, VersionListing,
    checksum_string, now_rfc3339, parse_versioned, validate_name,
};
use crate::storage::{Location, StorageOptions};

const MANIFEST: &str = "MANIFEST.json";

/// A model repository. Cheap to clone; every clone shares one operator.
#[derive(Clone)]
pub struct Repository {
    inner: Arc<RepoInner>,
}

struct RepoInner {
    uri: String,
    op: Operator,
    /// The root directory when the repository is a local filesystem reached without layers
    /// other than ours: segments are then read straight from the file (the fast path).
    local_root: Option<PathBuf>,
    opts: StorageOptions,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("uri", &self.inner.uri)
            .finish()
    }
}

pub(crate) fn version_name(v: u64) -> String {
    format!("{v:020}")
}

fn parse_version_name(name: &str) -> Option<u64> {
    let name = name.trim_end_matches('/');
    if name.len() == 20 && name.bytes().all(|b| b.is_ascii_digit()) {
        name.parse().ok()
    } else {
        None
    }
}

/// A random-enough token that keeps two writers' file names apart.
pub(crate) fn writer_token() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let seed =
        nanos ^ (u64::from(std::process::id()) << 32) ^ COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:012x}",
        xxhash_rust::xxh64::xxh64(&seed.to_le_bytes(), 7) & 0xffff_ffff_ffff
    )
}

/// `crc32c:hhhhhhhh` back to its number.
pub(crate) fn parse_checksum(s: &str) -> Option<u32> {
    let hex = s.strip_prefix("crc32c:")?;
    if hex.len() != 8 {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

impl Repository {
    /// Opens the repository at `uri` (a plain path, `file://`, `s3://`, `hdfs://`).
    ///
    /// Checks that the storage answers within `opts.timeout`; an unreachable endpoint is an
    /// [`ErrorKind::Unavailable`] error, never a hang. A local directory is created if missing.
    pub async fn open(uri: &str, opts: &StorageOptions) -> Result<Repository> {
        let opts = opts.with_env_fallbacks();
        let loc = Location::parse(uri)?;
        let op = crate::storage::operator(uri, &loc, &opts)?;
        let local_root = match &loc {
            Location::Local(p) => Some(p.clone()),
            _ => None,
        };
        let probe = tokio::time::timeout(
            opts.timeout + std::time::Duration::from_millis(500),
            async {
                let mut lister = op.lister("").await?;
                lister.next().await.transpose().map(|_| ())
            },
        )
        .await;
        match probe {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.kind() == opendal::ErrorKind::NotFound => {}
            Ok(Err(e)) => {
                return Err(FormatError::storage(
                    format!("cannot open repository {uri}"),
                    e,
                ));
            }
            Err(_) => {
                return Err(FormatError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "repository {uri} did not answer within {:?}; check that the storage endpoint \
                         is reachable (address, port, network) and retry",
                        opts.timeout
                    ),
                ));
            }
        }
        Ok(Repository {
            inner: Arc::new(RepoInner {
                uri: uri.to_string(),
                op,
                local_root,
                opts,
            }),
        })
    }

    /// Wraps an operator built by the caller (extra layers, fault injection in tests).
    /// Everything goes through `op`; there is no local fast path.
    pub fn from_operator(uri: &str, op: Operator) -> Repository {
        Repository {
            inner: Arc::new(RepoInner {
                uri: uri.to_string(),
                op,
                local_root: None,
                opts: StorageOptions::default(),
            }),
        }
    }

    /// The URI this repository was opened with.
    pub fn uri(&self) -> &str {
        &self.inner.uri
    }

    /// The storage operator (for tools that need raw access).
    pub fn operator(&self) -> &Operator {
        &self.inner.op
    }

    pub(crate) fn op(&self) -> &Operator {
        &self.inner.op
    }

    /// The storage options in effect (environment fallbacks applied).
    pub fn storage_options(&self) -> &StorageOptions {
        &self.inner.opts
    }

    // ---- low-level helpers ----------------------------------------------------------------

    /// Names of the entries directly under `dir` (ending in `/` for directories).
    pub(crate) async fn list_names(&self, dir: &str) -> Result<Vec<String>> {
        let entries = match self.op().list(dir).await {
            Ok(e) => e,
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(FormatError::storage(
                    format!("{}: listing {dir}", self.uri()),
                    e,
                ));
            }
        };
        Ok(entries
            .into_iter()
            .filter(|e| e.path() != dir)
            .map(|e| e.name().to_string())
            .collect())
    }

    pub(crate) async fn read_bytes(&self, path: &str) -> Result<Option<Bytes>> {
        match self.op().read(path).await {
            Ok(b) => Ok(Some(b.to_bytes())),
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(FormatError::storage(
                format!("{}: reading {path}", self.uri()),
                e,
            )),
        }
    }

    /// Writes a small document (a manifest, model.json, a history record) so that readers see
    /// either nothing or all of it; with `exclusive`, fails with `Conflict` if it exists.
    pub(crate) async fn put(&self, path: &str, bytes: Vec<u8>, exclusive: bool) -> Result<()> {
        let conflict = || {
            FormatError::conflict(format!(
                "{}: {path} already exists; another writer committed it first, look again and retry",
                self.uri()
            ))
        };
        let storage_err = |e| FormatError::storage(format!("{}: writing {path}", self.uri()), e);
        if let Some(root) = &self.inner.local_root {
            return local_put(root, path, bytes, exclusive, self.uri()).await;
        }
        let cap = self.op().info().capability();
        if cap.rename {
            // A filesystem (HDFS, or a local one reached through extra layers) would expose a
            // half-written file: write a hidden temporary beside it and rename it into place.
            // Exclusive puts check before the rename; a window remains (docs/format.md).
            let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
            let tmp = format!(
                "{dir}{}.{name}.tmp-{}",
                if dir.is_empty() { "" } else { "/" },
                writer_token()
            );
            if exclusive && self.exists(path).await? {
                return Err(conflict());
            }
            if let Err(e) = self.op().write(&tmp, bytes).await {
                let _ = self.delete(&tmp).await;
                return Err(storage_err(e));
            }
            if exclusive && self.exists(path).await? {
                let _ = self.delete(&tmp).await;
                return Err(conflict());
            }
            if let Err(e) = self.op().rename(&tmp, path).await {
                let _ = self.delete(&tmp).await;
                return Err(storage_err(e));
            }
            return Ok(());
        }
        if exclusive {
            if cap.write_with_if_not_exists {
                // Object stores: a conditional PUT (If-None-Match: *) is atomic and exclusive.
                return match self.op().write_with(path, bytes).if_not_exists(true).await {
                    Ok(_) => Ok(()),
                    Err(e)
                        if matches!(
                            e.kind(),
                            opendal::ErrorKind::ConditionNotMatch
                                | opendal::ErrorKind::AlreadyExists
                        ) =>
                    {
                        Err(conflict())
                    }
                    Err(e) => Err(storage_err(e)),
                };
            }
            // Without conditional writes, check then write: a window remains (docs/format.md).
            if self.exists(path).await? {
                return Err(conflict());
            }
        }
        self.op()
            .write(path, bytes)
            .await
            .map(|_| ())
            .map_err(storage_err)
    }

    pub(crate) async fn exists(&self, path: &str) -> Result<bool> {
        self.op()
            .exists(path)
            .await
            .map_err(|e| FormatError::storage(format!("{}: looking up {path}", self.uri()), e))
    }

    /// Deletes a file; a missing file is not an error.
    pub(crate) async fn delete(&self, path: &str) -> Result<()> {
        match self.op().delete(path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(FormatError::storage(
                format!("{}: deleting {path}", self.uri()),
                e,
            )),
        }
    }

    // ---- models ---------------------------------------------------------------------------

    /// Names of the models in the repository (directories holding a `model.json`), sorted.
    pub async fn list_models(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for name in self.list_names("").await? {
            let Some(dir) = name.strip_suffix('/') else {
                continue;
            };
            if dir.starts_with('.') || validate_name("model", dir).is_err() {
                continue;
            }
            if self.exists(&format!("{dir}/model.json")).await? {
                out.push(dir.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    /// The spec of `model`.
    pub async fn model(&self, model: &str) -> Result<ModelSpec> {
        validate_name("model", model)?;
        let path = format!("{model}/model.json");
        let Some(bytes) = self.read_bytes(&path).await? else {
            return Err(FormatError::not_found(format!(
                "model {model:?} does not exist in repository {}; publish a first version with \
                 `hopps model publish --repo {} --model {model} --table T --dim D --input FILE`",
                self.uri(),
                self.uri()
            )));
        };
        let what = format!("{}/{path}", self.uri());
        let spec: ModelSpec = parse_versioned(&bytes, &what)?;
        if spec.name != model {
            return Err(FormatError::corrupt(format!(
                "{what} names model {:?}, not {model:?}; the directory was renamed or copied, fix the name",
                spec.name
            )));
        }
        spec.validate()?;
        Ok(spec)
    }

    /// Creates `spec.name`; if it exists, succeeds when the stored spec is equal and fails with
    /// `Conflict` when it differs.
    pub async fn create_model(&self, spec: &ModelSpec) -> Result<()> {
        spec.validate()?;
        match self.model(&spec.name).await {
            Ok(existing) if existing == *spec => return Ok(()),
            Ok(existing) => return Err(spec_conflict(self.uri(), &existing, spec)),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let bytes =
            serde_json::to_vec_pretty(spec).map_err(|e| FormatError::invalid(e.to_string()))?;
        match self
            .put(&format!("{}/model.json", spec.name), bytes, true)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::Conflict => {
                // Someone created it at the same time: fine if they agree with us.
                let existing = self.model(&spec.name).await?;
                if existing == *spec {
                    Ok(())
                } else {
                    Err(spec_conflict(self.uri(), &existing, spec))
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Adds tables to an existing model (other fields must be equal). Used when a publish
    /// names a table the model does not have yet.
    pub(crate) async fn extend_model(&self, spec: &ModelSpec) -> Result<()> {
        spec.validate()?;
        let bytes =
            serde_json::to_vec_pretty(spec).map_err(|e| FormatError::invalid(e.to_string()))?;
        self.put(&format!("{}/model.json", spec.name), bytes, false)
            .await
    }

    // ---- versions -------------------------------------------------------------------------

    fn dir_of(model: &str, kind: VersionKind, version: u64) -> String {
        let parent = if kind == VersionKind::Checkpoint {
            "checkpoints"
        } else {
            "versions"
        };
        format!("{model}/{parent}/{}/", version_name(version))
    }

    /// The directory (ending in `/`) holding the files of `manifest`.
    pub fn version_dir(manifest: &Manifest) -> String {
        Self::dir_of(&manifest.model, manifest.kind, manifest.version)
    }

    /// Committed versions ascending, plus version directories without a manifest.
    pub async fn versions(&self, model: &str) -> Result<VersionListing> {
        self.model(model).await?;
        self.listing(model, "versions").await
    }

    async fn listing(&self, model: &str, sub: &str) -> Result<VersionListing> {
        let mut numbers: Vec<u64> = self
            .list_names(&format!("{model}/{sub}/"))
            .await?
            .iter()
            .filter(|n| n.ends_with('/'))
            .filter_map(|n| parse_version_name(n))
            .collect();
        numbers.sort_unstable();
        let checkpoint = sub == "checkpoints";
        let manifests: Vec<(u64, Option<Manifest>)> = futures::stream::iter(numbers)
            .map(|v| async move {
                let m = self.try_manifest(model, v, checkpoint).await?;
                Ok::<_, FormatError>((v, m))
            })
            .buffered(16)
            .try_collect()
            .await?;
        let mut listing = VersionListing::default();
        for (v, m) in manifests {
            match m {
                Some(m) => listing.committed.push(m),
                None => listing.aborted.push(v),
            }
        }
        if !listing.aborted.is_empty() {
            tracing::debug!(model, aborted = ?listing.aborted, "version directories without a manifest are ignored");
        }
        Ok(listing)
    }

    async fn try_manifest(
        &self,
        model: &str,
        version: u64,
        checkpoint: bool,
    ) -> Result<Option<Manifest>> {
        let kind = if checkpoint {
            VersionKind::Checkpoint
        } else {
            VersionKind::Full
        };
        let path = format!("{}{MANIFEST}", Self::dir_of(model, kind, version));
        let Some(bytes) = self.read_bytes(&path).await? else {
            return Ok(None);
        };
        let what = format!("{}/{path}", self.uri());
        // A manifest cut short is a commit that never completed (a torn write on a storage
        // without atomic writes, its cleanup interrupted): the version is aborted, not damaged.
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&bytes)
            && e.is_eof()
        {
            tracing::warn!(%what, "incomplete manifest: the version is treated as aborted");
            return Ok(None);
        }
        let m: Manifest = parse_versioned(&bytes, &what)?;
        check_manifest(&m, model, version, checkpoint, &what)?;
        Ok(Some(m))
    }

    /// The manifest of committed `version` of `model`.
    pub async fn manifest(&self, model: &str, version: u64) -> Result<Manifest> {
        validate_name("model", model)?;
        match self.try_manifest(model, version, false).await? {
            Some(m) => Ok(m),
            None => Err(FormatError::not_found(format!(
                "model {model:?} has no committed version {version} in repository {}; list them \
                 with `hopps model versions --repo {} --model {model}`",
                self.uri(),
                self.uri()
            ))),
        }
    }

    // ---- reading rows ---------------------------------------------------------------------

    /// Streams the rows of `table` in `manifest`: files in manifest order, each verified
    /// (size and checksum) before any of its rows is returned; memory is about two files.
    pub async fn read_table(&self, manifest: &Manifest, table: &str) -> Result<RowReader> {
        let t = manifest.table(table).ok_or_else(|| {
            FormatError::not_found(format!(
                "version {} of model {:?} has no table {table:?} (tables: {})",
                manifest.version,
                manifest.model,
                manifest
                    .tables
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let spec = self.model(&manifest.model).await?;
        let dim = spec
            .table(table)
            .ok_or_else(|| {
                FormatError::corrupt(format!(
                    "version {} of model {:?} holds table {table:?}, which model.json does not declare",
                    manifest.version, manifest.model
                ))
            })?
            .dim;
        Ok(RowReader {
            repo: self.clone(),
            dir: Self::version_dir(manifest),
            dim,
            files: t.files.iter().cloned().collect(),
            bytes_total: t.files.iter().map(|f| f.bytes).sum(),
            bytes_read: 0,
            current: None,
            prefetch: None,
        })
    }

    /// Fetches a whole data file and checks its size and checksum against `file`.
    pub(crate) async fn fetch_verified(&self, dir: &str, file: &FileEntry) -> Result<Bytes> {
        let path = format!("{dir}{}", file.path);
        let what = format!("{}/{path}", self.uri());
        let bytes = self.read_bytes(&path).await?.ok_or_else(|| {
            FormatError::corrupt(format!(
                "{what} is named in the manifest but missing; the version is damaged, republish it \
                 (or roll back to an earlier version)"
            ))
        })?;
        verify(&bytes, file, &what)?;
        Ok(bytes)
    }

    // ---- checkpoints ----------------------------------------------------------------------

    /// Starts a checkpoint of `version` of `model`. Nothing is visible until `commit`.
    pub async fn checkpoint_writer(&self, model: &str, version: u64) -> Result<CheckpointWriter> {
        self.model(model).await?;
        Ok(CheckpointWriter {
            repo: self.clone(),
            model: model.to_string(),
            version,
            dir: Self::dir_of(model, VersionKind::Checkpoint, version),
            token: writer_token(),
            tables: Vec::new(),
            written: Vec::new(),
        })
    }

    /// Committed checkpoints of `model`, ascending by the version they snapshot.
    pub async fn checkpoints(&self, model: &str) -> Result<Vec<Manifest>> {
        validate_name("model", model)?;
        Ok(self.listing(model, "checkpoints").await?.committed)
    }

    /// Reads one `.hps` segment of `manifest`, verifying the size, every block checksum and the
    /// file checksum. Local repositories read the file directly (no copy through the storage
    /// layer); others fetch it whole.
    pub async fn read_segment(&self, manifest: &Manifest, file: &FileEntry) -> Result<Segment> {
        let dir = Self::version_dir(manifest);
        let rel = format!("{dir}{}", file.path);
        let what = format!("{}/{rel}", self.uri());
        if file.format != "hps" {
            return Err(FormatError::invalid(format!(
                "{what} is a {} file, not an .hps segment; read it with read_table",
                file.format
            )));
        }
        let want = parse_checksum(&file.checksum).ok_or_else(|| {
            FormatError::corrupt(format!(
                "{what}: manifest checksum {:?} is not crc32c:xxxxxxxx",
                file.checksum
            ))
        })?;
        if let Some(root) = &self.inner.local_root {
            let path = root.join(&rel);
            let expect_len = file.bytes;
            return tokio::task::spawn_blocking(move || {
                let f = std::fs::File::open(&path).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        FormatError::corrupt(format!(
                            "{what} is named in the manifest but missing; delete this checkpoint"
                        ))
                    } else {
                        FormatError::local_io(&path, "cannot open segment", e)
                    }
                })?;
                let len = f.metadata().map_err(|e| FormatError::local_io(&path, "cannot stat segment", e))?.len();
                if len != expect_len {
                    return Err(FormatError::corrupt(format!(
                        "{what} is {len} bytes, the manifest says {expect_len}; the file is truncated \
                         or was replaced, delete this checkpoint and write a new one"
                    )));
                }
                segment::read_segment_from(f, len, Some(want), &what)
            })
            .await
            .map_err(|e| FormatError::new(ErrorKind::Io, format!("reading {rel}: worker failed: {e}")))?;
        }
        let bytes = self.fetch_verified(&dir, file).await?;
        segment::read_segment_from(&bytes[..], bytes.len() as u64, Some(want), &what)
    }

    /// Deletes a checkpoint: the manifest first (so it stops existing at once), then its files.
    pub async fn delete_checkpoint(&self, model: &str, version: u64) -> Result<()> {
        validate_name("model", model)?;
        let dir = Self::dir_of(model, VersionKind::Checkpoint, version);
        self.delete(&format!("{dir}{MANIFEST}")).await?;
        self.op()
            .delete_with(&dir)
            .recursive(true)
            .await
            .map_err(|e| {
                FormatError::storage(format!("{}: deleting checkpoint {dir}", self.uri()), e)
            })
    }

    // ---- history --------------------------------------------------------------------------

    /// Appends `record` to the model's history and returns its sequence number (1, 2, ...).
    /// Concurrent appenders never share a number: each claims it with an exclusive write.
    pub async fn append_history(&self, model: &str, record: &HistoryRecord) -> Result<u64> {
        self.model(model).await?;
        for _attempt in 0..16 {
            let last = self
                .list_names(&format!("{model}/history/"))
                .await?
                .iter()
                .filter_map(|n| n.strip_suffix(".json").and_then(parse_version_name))
                .max()
                .unwrap_or(0);
            let seq = last + 1;
            let mut r = record.clone();
            r.seq = seq;
            if r.time.is_empty() {
                r.time = now_rfc3339();
            }
            let bytes =
                serde_json::to_vec_pretty(&r).map_err(|e| FormatError::invalid(e.to_string()))?;
            match self
                .put(
                    &format!("{model}/history/{}.json", version_name(seq)),
                    bytes,
                    true,
                )
                .await
            {
                Ok(()) => return Ok(seq),
                Err(e) if e.kind() == ErrorKind::Conflict => continue,
                Err(e) => return Err(e),
            }
        }
        Err(FormatError::conflict(format!(
            "model {model:?}: could not claim a history sequence number after 16 attempts; too many \
             concurrent writers, retry"
        )))
    }

    /// The model's history in sequence order.
    pub async fn history(&self, model: &str) -> Result<Vec<HistoryRecord>> {
        validate_name("model", model)?;
        let mut seqs: Vec<u64> = self
            .list_names(&format!("{model}/history/"))
            .await?
            .iter()
            .filter_map(|n| n.strip_suffix(".json").and_then(parse_version_name))
            .collect();
        seqs.sort_unstable();
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            let path = format!("{model}/history/{}.json", version_name(seq));
            let Some(bytes) = self.read_bytes(&path).await? else {
                continue;
            };
            let r: HistoryRecord = serde_json::from_slice(&bytes).map_err(|e| {
                FormatError::corrupt(format!(
                    "{}/{path} is not a history record ({e})",
                    self.uri()
                ))
            })?;
            out.push(r);
        }
        Ok(out)
    }
}

/// Local filesystem: write and fsync a hidden temporary file, then publish it with `link`
/// (exclusive: fails if the name exists, atomically) or `rename` (replaces), and fsync the
/// directory so that a commit survives a crash.
async fn local_put(
    root: &std::path::Path,
    path: &str,
    bytes: Vec<u8>,
    exclusive: bool,
    uri: &str,
) -> Result<()> {
    use std::io::Write;
    let target = root.join(path);
    let uri = uri.to_string();
    let path = path.to_string();
    tokio::task::spawn_blocking(move || {
        let io = |what: &str, e: std::io::Error| FormatError::local_io(&target, what, e);
        let dir = target.parent().unwrap_or(std::path::Path::new("/")).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| io("cannot create the directory of", e))?;
        let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("doc");
        let tmp = dir.join(format!(".{name}.tmp-{}", writer_token()));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp).map_err(|e| io("cannot write", e))?;
            f.write_all(&bytes).map_err(|e| io("cannot write", e))?;
            f.sync_all().map_err(|e| io("cannot sync", e))?;
            if exclusive {
                match std::fs::hard_link(&tmp, &target) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        return Err(FormatError::conflict(format!(
                            "{uri}: {path} already exists; another writer committed it first, look again and retry"
                        )));
                    }
                    Err(e) => return Err(io("cannot publish", e)),
                }
            } else {
                std::fs::rename(&tmp, &target).map_err(|e| io("cannot publish", e))?;
            }
            if let Ok(d) = std::fs::File::open(&dir) {
                let _ = d.sync_all();
            }
            Ok(())
        })();
        let _ = std::fs::remove_file(&tmp);
        result
    })
    .await
    .map_err(|e| FormatError::new(ErrorKind::Io, format!("writing a document: worker failed: {e}")))?
}

fn spec_conflict(uri: &str, existing: &ModelSpec, wanted: &ModelSpec) -> FormatError {
    FormatError::conflict(format!(
        "model {:?} already exists in {uri} with a different spec (stored: {} shards, tables {}; \
         requested: {} shards, tables {}); use the stored spec or another model name",
        existing.name,
        existing.shards,
        describe_tables(existing),
        wanted.shards,
        describe_tables(wanted)
    ))
}

pub(crate) fn describe_tables(spec: &ModelSpec) -> String {
    spec.tables
        .iter()
        .map(|t| format!("{}[dim {} {}]", t.name, t.dim, t.dtype))
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_manifest(
    m: &Manifest,
    model: &str,
    version: u64,
    checkpoint: bool,
    what: &str,
) -> Result<()> {
    let bad = |why: String| FormatError::corrupt(format!("{what}: {why}; the manifest is damaged"));
    if m.model != model || m.version != version {
        return Err(bad(format!(
            "it describes model {:?} version {}",
            m.model, m.version
        )));
    }
    if checkpoint != (m.kind == VersionKind::Checkpoint) {
        return Err(bad(format!("kind {} in the wrong directory", m.kind)));
    }
    if m.kind == VersionKind::Delta && m.parent.is_none() {
        return Err(bad("a delta without a parent".into()));
    }
    for t in &m.tables {
        for f in &t.files {
            let p = std::path::Path::new(&f.path);
            if f.path.is_empty()
                || p.is_absolute()
                || p.components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(bad(format!(
                    "file path {:?} leaves the version directory",
                    f.path
                )));
            }
            if !["parquet", "csv", "tsv", "hps"].contains(&f.format.as_str()) {
                return Err(bad(format!(
                    "file {:?} has unknown format {:?}",
                    f.path, f.format
                )));
            }
            if parse_checksum(&f.checksum).is_none() {
                return Err(bad(format!(
                    "file {:?} has checksum {:?}, not crc32c:xxxxxxxx",
                    f.path, f.checksum
                )));
            }
        }
    }
    Ok(())
}

fn verify(bytes: &[u8], file: &FileEntry, what: &str) -> Result<()> {
    if bytes.len() as u64 != file.bytes {
        return Err(FormatError::corrupt(format!(
            "{what} is {} bytes, the manifest says {}; the file is truncated or was replaced, \
             republish this version",
            bytes.len(),
            file.bytes
        )));
    }
    let want = parse_checksum(&file.checksum).ok_or_else(|| {
        FormatError::corrupt(format!("{what}: bad manifest checksum {:?}", file.checksum))
    })?;
    let got = crc32c::crc32c(bytes);
    if got != want {
        return Err(FormatError::corrupt(format!(
            "{what}: checksum {} != {} in the manifest; the file is damaged, republish this version",
            checksum_string(got),
            file.checksum
        )));
    }
    Ok(())
}

// ---- RowReader --------------------------------------------------------------------------------

enum Decoder {
    Parquet(ParquetRows),
    Csv(CsvRows<std::io::Cursor<Bytes>>),
    Hps { seg: Segment, pos: usize },
}

struct OpenFile {
    decoder: Decoder,
    entry: FileEntry,
    what: String,
    rows: u64,
}

/// Streams the rows of one table of one version. See [`Repository::read_table`].
pub struct RowReader {
    repo: Repository,
    dir: String,
    dim: u32,
    files: VecDeque<FileEntry>,
    bytes_total: u64,
    bytes_read: u64,
    current: Option<OpenFile>,
    prefetch: Option<(FileEntry, tokio::task::JoinHandle<Result<Bytes>>)>,
}

impl Drop for RowReader {
    fn drop(&mut self) {
        if let Some((_, h)) = self.prefetch.take() {
            h.abort();
        }
    }
}

impl RowReader {
    /// Bytes of all files of the table.
    pub fn bytes_total(&self) -> u64 {
        self.bytes_total
    }

    /// Bytes of the files fetched and verified so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Values per row.
    pub fn dim(&self) -> u32 {
        self.dim
    }

    /// The next batch of rows, or `None` after the last file.
    pub async fn next_batch(&mut self) -> Result<Option<RowBatch>> {
        loop {
            if let Some(open) = &mut self.current {
                let batch = match &mut open.decoder {
                    Decoder::Parquet(p) => p.next_batch()?,
                    Decoder::Csv(c) => c.next_batch()?,
                    Decoder::Hps { seg, pos } => hps_batch(seg, pos, self.dim, &open.what)?,
                };
                match batch {
                    Some(b) => {
                        open.rows += b.len() as u64;
                        if open.rows > open.entry.rows {
                            return Err(row_count_error(open));
                        }
                        return Ok(Some(b));
                    }
                    None => {
                        if open.rows != open.entry.rows {
                            return Err(row_count_error(open));
                        }
                        self.current = None;
                    }
                }
            }
            let bytes_and_entry = match self.prefetch.take() {
                Some((entry, handle)) => {
                    let bytes = handle.await.map_err(|e| {
                        FormatError::new(
                            ErrorKind::Io,
                            format!("fetching {}: worker failed: {e}", entry.path),
                        )
                    })??;
                    Some((entry, bytes))
                }
                None => match self.files.pop_front() {
                    Some(entry) => {
                        let bytes = self.repo.fetch_verified(&self.dir, &entry).await?;
                        Some((entry, bytes))
                    }
                    None => None,
                },
            };
            let Some((entry, bytes)) = bytes_and_entry else {
                return Ok(None);
            };
            // Overlap the next file's transfer with decoding this one.
            if let Some(next) = self.files.pop_front() {
                let repo = self.repo.clone();
                let dir = self.dir.clone();
                let e = next.clone();
                let handle = tokio::spawn(async move { repo.fetch_verified(&dir, &e).await });
                self.prefetch = Some((next, handle));
            }
            self.bytes_read += entry.bytes;
            let what = format!("{}/{}{}", self.repo.uri(), self.dir, entry.path);
            let decoder = match entry.format.as_str() {
                "parquet" => Decoder::Parquet(ParquetRows::new(bytes, self.dim, &what)?),
                "csv" => Decoder::Csv(CsvRows::new(
                    std::io::Cursor::new(bytes),
                    b',',
                    self.dim,
                    &what,
                )),
                "tsv" => Decoder::Csv(CsvRows::new(
                    std::io::Cursor::new(bytes),
                    b'\t',
                    self.dim,
                    &what,
                )),
                "hps" => {
                    let seg =
                        segment::read_segment_from(&bytes[..], bytes.len() as u64, None, &what)?;
                    Decoder::Hps { seg, pos: 0 }
                }
                other => {
                    return Err(FormatError::invalid(format!(
                        "{what}: format {other:?} cannot be read as rows; use parquet, csv, tsv or hps"
                    )));
                }
            };
            self.current = Some(OpenFile {
                decoder,
                entry,
                what,
                rows: 0,
            });
        }
    }
}

fn row_count_error(open: &OpenFile) -> FormatError {
    FormatError::corrupt(format!(
        "{} holds more or fewer rows than the {} the manifest names (read {} so far); republish \
         this version",
        open.what, open.entry.rows, open.rows
    ))
}

fn hps_batch(seg: &Segment, pos: &mut usize, dim: u32, what: &str) -> Result<Option<RowBatch>> {
    if seg.dtype != "f32" || seg.row_bytes != dim * 4 || seg.dim != dim {
        return Err(FormatError::invalid(format!(
            "{what} holds {} rows of dim {} ({} bytes); versions can hold f32 segments of the \
             table's dim {dim} only",
            seg.dtype, seg.dim, seg.row_bytes
        )));
    }
    if *pos >= seg.len() {
        return Ok(None);
    }
    let end = (*pos + crate::rows::BATCH_ROWS).min(seg.len());
    let keys = seg.keys[*pos..end].to_vec();
    let rb = seg.row_bytes as usize;
    let values = seg.rows[*pos * rb..end * rb]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    *pos = end;
    Ok(Some(RowBatch {
        keys,
        values,
        deleted: Vec::new(),
    }))
}

// ---- CheckpointWriter -------------------------------------------------------------------------

/// Writes the `.hps` segments of one checkpoint, then commits its manifest.
pub struct CheckpointWriter {
    repo: Repository,
    model: String,
    version: u64,
    dir: String,
    token: String,
    tables: Vec<ManifestTable>,
    written: Vec<String>,
}

impl CheckpointWriter {
    /// Writes the segment of (`table`, `shard`): `keys.len()` rows of `row_bytes` opaque bytes
    /// each, tagged with `dtype` and `dim`.
    #[allow(clippy::too_many_arguments)]
    pub async fn write_segment(
        &mut self,
        table: &str,
        shard: u32,
        dtype: &str,
        dim: u32,
        row_bytes: u32,
        keys: &[u64],
        rows: &[u8],
    ) -> Result<()> {
        validate_name("table", table)?;
        let header = SegmentHeader::new(dtype, dim, row_bytes, keys.len() as u64)?;
        let rel = format!("{table}/shard-{shard:05}-{}.hps", self.token);
        let path = format!("{}{rel}", self.dir);
        let storage_err = |e| {
            FormatError::storage(
                format!("{}: writing checkpoint segment {path}", self.repo.uri()),
                e,
            )
        };
        let rb = row_bytes as usize;
        if rows.len() != keys.len() * rb {
            return Err(FormatError::invalid(format!(
                "checkpoint of model {:?} version {} table {table:?} shard {shard}: {} row bytes for \
                 {} keys of {row_bytes} bytes",
                self.model,
                self.version,
                rows.len(),
                keys.len()
            )));
        }
        let mut enc = segment::SegmentEncoder::new(&header, keys, rows, 8 << 20)?;
        let mut writer = self
            .repo
            .op()
            .writer_with(&path)
            .chunk(8 << 20)
            .await
            .map_err(storage_err)?;
        self.written.push(path.clone());
        let mut bytes = 0u64;
        // One encoded chunk in memory at a time, whatever the segment size.
        while let Some(chunk) = enc.next_chunk() {
            bytes += chunk.len() as u64;
            if let Err(e) = writer.write(chunk).await {
                let _ = writer.abort().await;
                return Err(storage_err(e));
            }
        }
        writer.close().await.map_err(storage_err)?;
        let crc = enc.crc();
        let entry = FileEntry {
            path: rel,
            format: "hps".to_string(),
            shard: Some(shard),
            rows: keys.len() as u64,
            bytes,
            checksum: checksum_string(crc),
        };
        match self.tables.iter_mut().find(|t| t.name == table) {
            Some(t) => {
                t.rows += entry.rows;
                t.files.push(entry);
            }
            None => self.tables.push(ManifestTable {
                name: table.to_string(),
                rows: entry.rows,
                deletes: 0,
                duplicates: 0,
                files: vec![entry],
            }),
        }
        Ok(())
    }

    /// Commits the checkpoint: writes its manifest (replacing an earlier checkpoint of the same
    /// version), then removes files of the replaced checkpoint.
    pub async fn commit(self, wal_sequence: Option<u64>) -> Result<Manifest> {
        let manifest = Manifest {
            format_version: crate::spec::FORMAT_VERSION,
            model: self.model.clone(),
            version: self.version,
            kind: VersionKind::Checkpoint,
            parent: None,
            created: now_rfc3339(),
            source: "hopps checkpoint".to_string(),
            rows: self.tables.iter().map(|t| t.rows).sum(),
            wal_sequence,
            tables: self.tables.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| FormatError::invalid(e.to_string()))?;
        self.repo
            .put(&format!("{}{MANIFEST}", self.dir), bytes, false)
            .await?;
        // Files of an earlier checkpoint of the same version are now unreferenced.
        let keep: std::collections::HashSet<String> = manifest
            .tables
            .iter()
            .flat_map(|t| &t.files)
            .map(|f| format!("{}{}", self.dir, f.path))
            .collect();
        if let Ok(entries) = self.repo.op().list_with(&self.dir).recursive(true).await {
            for e in entries {
                let p = e.path();
                if !p.ends_with('/') && !p.ends_with(MANIFEST) && !keep.contains(p) {
                    let _ = self.repo.delete(p).await;
                }
            }
        }
        Ok(manifest)
    }

    /// Abandons the checkpoint, deleting the segments written so far (best effort).
    pub async fn abort(self) {
        for p in &self.written {
            let _ = self.repo.delete(p).await;
        }
    }
}
