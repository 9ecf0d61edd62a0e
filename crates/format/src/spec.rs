//! `model.json`, `MANIFEST.json` and the other JSON documents of a model repository.
//!
//! Every document carries a `format_version`. A reader accepts exactly the versions it knows
//! ([`FORMAT_VERSION`] today) and refuses anything else with an error that says to upgrade,
//! rather than guessing at fields it does not understand.

use serde::{Deserialize, Serialize};

use crate::error::{FormatError, Result};

/// The JSON document version this build writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;

/// The only hash function hopps shards with: `xxh64(key as 8 little-endian bytes, seed 42)`.
pub const HASH_XXH64_SEED42: &str = "xxh64-seed42";

/// Storage dtypes a table may declare. Row encoding itself lives in hopps-table.
pub const DTYPES: [&str; 4] = ["f32", "f16", "bf16", "int8"];

/// A model: its tables, shard count and hash, fixed when the model is created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub format_version: u32,
    pub name: String,
    /// Shards per table, a power of two.
    pub shards: u32,
    /// Always [`HASH_XXH64_SEED42`] in format version 1.
    pub hash: String,
    pub tables: Vec<TableSpec>,
}

impl ModelSpec {
    /// A model of `shards` shards with the given tables, in the current format version.
    pub fn new(name: impl Into<String>, shards: u32, tables: Vec<TableSpec>) -> Self {
        ModelSpec {
            format_version: FORMAT_VERSION,
            name: name.into(),
            shards,
            hash: HASH_XXH64_SEED42.to_string(),
            tables,
        }
    }

    /// The table called `name`, if the model has one.
    pub fn table(&self, name: &str) -> Option<&TableSpec> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// Checks every rule a stored or new model must satisfy.
    pub fn validate(&self) -> Result<()> {
        check_format_version(
            self.format_version,
            &format!("model.json of model {:?}", self.name),
        )?;
        validate_name("model", &self.name)?;
        if self.shards == 0 || !self.shards.is_power_of_two() {
            return Err(FormatError::invalid(format!(
                "model {:?}: shard count {} is not a power of two; use 1, 2, 4, 8, ...",
                self.name, self.shards
            )));
        }
        if self.hash != HASH_XXH64_SEED42 {
            return Err(FormatError::invalid(format!(
                "model {:?}: unknown hash function {:?}; hopps shards with {HASH_XXH64_SEED42:?}",
                self.name, self.hash
            )));
        }
        if self.tables.is_empty() {
            return Err(FormatError::invalid(format!(
                "model {:?} has no tables; give at least one table with a dim",
                self.name
            )));
        }
        for (i, t) in self.tables.iter().enumerate() {
            t.validate(&self.name)?;
            if self.tables[..i].iter().any(|o| o.name == t.name) {
                return Err(FormatError::invalid(format!(
                    "model {:?} declares table {:?} twice; table names must be unique",
                    self.name, t.name
                )));
            }
        }
        Ok(())
    }
}

/// One table of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableSpec {
    pub name: String,
    /// Values per row.
    pub dim: u32,
    /// Storage dtype: one of [`DTYPES`].
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// What a lookup of an absent key returns.
    #[serde(default)]
    pub missing: MissingPolicy,
    /// Server-side optimizer for pushed gradients, if pushes are allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<OptimizerSpec>,
}

fn default_dtype() -> String {
    "f32".to_string()
}

impl TableSpec {
    /// An f32 table with zeros for missing keys and no optimizer.
    pub fn new(name: impl Into<String>, dim: u32) -> Self {
        TableSpec {
            name: name.into(),
            dim,
            dtype: default_dtype(),
            missing: MissingPolicy::Zeros,
            optimizer: None,
        }
    }

    fn validate(&self, model: &str) -> Result<()> {
        validate_name("table", &self.name)?;
        if self.dim == 0 || self.dim > 65_536 {
            return Err(FormatError::invalid(format!(
                "model {model:?} table {:?}: dim {} is out of range; use 1..=65536",
                self.name, self.dim
            )));
        }
        if !DTYPES.contains(&self.dtype.as_str()) {
            return Err(FormatError::invalid(format!(
                "model {model:?} table {:?}: unknown dtype {:?}; use one of {}",
                self.name,
                self.dtype,
                DTYPES.join(", ")
            )));
        }
        if let MissingPolicy::Random { scale, .. } = self.missing
            && !(scale.is_finite() && scale >= 0.0)
        {
            return Err(FormatError::invalid(format!(
                "model {model:?} table {:?}: random init scale {scale} must be finite and >= 0",
                self.name
            )));
        }
        if let Some(opt) = &self.optimizer {
            opt.validate(model, &self.name)?;
        }
        Ok(())
    }
}

/// What a lookup of a key the table does not hold returns.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MissingPolicy {
    /// A row of zeros (reported as not found).
    #[default]
    Zeros,
    /// The lookup fails naming the key.
    Error,
    /// A deterministic per-key random row: uniform in `[-scale, scale]` seeded by `(seed, key)`.
    Random { seed: u64, scale: f32 },
}

/// A server-side optimizer for gradient pushes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerSpec {
    /// `sgd`, `adagrad` or `adam`.
    pub kind: String,
    pub learning_rate: f32,
    #[serde(default = "default_beta1")]
    pub beta1: f32,
    #[serde(default = "default_beta2")]
    pub beta2: f32,
    #[serde(default = "default_epsilon")]
    pub epsilon: f32,
    #[serde(default)]
    pub initial_accumulator: f32,
}

fn default_beta1() -> f32 {
    0.9
}
fn default_beta2() -> f32 {
    0.999
}
fn default_epsilon() -> f32 {
    1e-8
}

impl OptimizerSpec {
    /// An optimizer of `kind` with the usual defaults.
    pub fn new(kind: impl Into<String>, learning_rate: f32) -> Self {
        OptimizerSpec {
            kind: kind.into(),
            learning_rate,
            beta1: default_beta1(),
            beta2: default_beta2(),
            epsilon: default_epsilon(),
            initial_accumulator: 0.0,
        }
    }

    fn validate(&self, model: &str, table: &str) -> Result<()> {
        if !["sgd", "adagrad", "adam"].contains(&self.kind.as_str()) {
            return Err(FormatError::invalid(format!(
                "model {model:?} table {table:?}: unknown optimizer {:?}; use sgd, adagrad or adam",
                self.kind
            )));
        }
        let all = [
            self.learning_rate,
            self.beta1,
            self.beta2,
            self.epsilon,
            self.initial_accumulator,
        ];
        if all.iter().any(|v| !v.is_finite()) || self.learning_rate <= 0.0 {
            return Err(FormatError::invalid(format!(
                "model {model:?} table {table:?}: optimizer parameters must be finite and the \
                 learning rate > 0"
            )));
        }
        Ok(())
    }
}

/// Kind of a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionKind {
    /// All rows of every table.
    Full,
    /// Upserts and deletes relative to `parent`.
    Delta,
    /// A full snapshot hopps wrote of a version it served.
    Checkpoint,
}

impl VersionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionKind::Full => "full",
            VersionKind::Delta => "delta",
            VersionKind::Checkpoint => "checkpoint",
        }
    }
}

impl std::fmt::Display for VersionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `MANIFEST.json`: the commit record of one version (or checkpoint).
///
/// Invariant: every file it names exists with exactly `bytes` bytes and `checksum`; a reader
/// verifies both before it hands out a row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub model: String,
    pub version: u64,
    pub kind: VersionKind,
    /// The version a delta applies to (None for full versions and checkpoints).
    pub parent: Option<u64>,
    /// RFC 3339 UTC time of the commit.
    pub created: String,
    /// Free text: who or what published it (a job name, `hopps model publish`, ...).
    pub source: String,
    /// Rows stored in all files of all tables, deletes included.
    pub rows: u64,
    /// For checkpoints: the write-ahead-log sequence the snapshot includes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_sequence: Option<u64>,
    pub tables: Vec<ManifestTable>,
}

impl Manifest {
    /// The table called `name` in this version.
    pub fn table(&self, name: &str) -> Option<&ManifestTable> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// Bytes of all files of this version.
    pub fn bytes(&self) -> u64 {
        self.tables
            .iter()
            .flat_map(|t| &t.files)
            .map(|f| f.bytes)
            .sum()
    }
}

/// One table in a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestTable {
    pub name: String,
    /// Upsert rows stored (rows not marked deleted), duplicates included.
    pub rows: u64,
    /// Rows marked deleted (deltas only).
    #[serde(default)]
    pub deletes: u64,
    /// Rows whose key already appeared earlier in this table of this version (the later row wins).
    #[serde(default)]
    pub duplicates: u64,
    pub files: Vec<FileEntry>,
}

/// One data file of a version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the version directory, `/`-separated.
    pub path: String,
    /// `parquet`, `csv` or `hps`.
    pub format: String,
    /// The shard every key of the file belongs to, if the file is sharded.
    #[serde(default)]
    pub shard: Option<u32>,
    pub rows: u64,
    pub bytes: u64,
    /// `crc32c:` and 8 lowercase hex digits of the CRC-32C of the whole file.
    pub checksum: String,
}

/// The versions of a model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VersionListing {
    /// Committed versions, ascending.
    pub committed: Vec<Manifest>,
    /// Version directories without a manifest: aborted or in-progress publishes, ignored.
    pub aborted: Vec<u64>,
}

impl VersionListing {
    /// The newest committed version.
    pub fn latest(&self) -> Option<&Manifest> {
        self.committed.last()
    }

    /// The highest version number present, committed or not.
    pub fn highest(&self) -> Option<u64> {
        let c = self.committed.last().map(|m| m.version);
        let a = self.aborted.iter().copied().max();
        c.max(a)
    }
}

/// One decision in a model's history (a rollback, a version served ...), appended by the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryRecord {
    /// Assigned by [`crate::Repository::append_history`]; ignored on input.
    #[serde(default)]
    pub seq: u64,
    /// RFC 3339 UTC.
    pub time: String,
    pub event: String,
    pub version: u64,
    #[serde(default)]
    pub from_version: Option<u64>,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub detail: String,
}

/// The outcome of a publish; serialises to exactly the fields `hopps model publish --json` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishSummary {
    pub model: String,
    pub version: u64,
    pub kind: VersionKind,
    pub rows: u64,
}

/// Rejects names that could escape a directory or confuse a listing.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(FormatError::invalid(format!(
            "{what} name {name:?} is not allowed; use 1 to 128 characters of A-Z a-z 0-9 _ - . \
             not starting with a dot"
        )))
    }
}

pub(crate) fn check_format_version(found: u32, what: &str) -> Result<()> {
    if found == FORMAT_VERSION {
        Ok(())
    } else {
        Err(FormatError::invalid(format!(
            "{what} has format_version {found}, but this hopps reads only format_version \
             {FORMAT_VERSION}; upgrade hopps (newer files) or republish (older files)"
        )))
    }
}

/// Parses a JSON document after checking its `format_version`, so an unknown version is
/// reported as such instead of as a missing field.
pub(crate) fn parse_versioned<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
) -> Result<T> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        FormatError::corrupt(format!(
            "{what} is not valid JSON ({e}); restore or rewrite it"
        ))
        .with_source(e)
    })?;
    match value.get("format_version").and_then(|v| v.as_u64()) {
        Some(v) => check_format_version(u32::try_from(v).unwrap_or(u32::MAX), what)?,
        None => {
            return Err(FormatError::corrupt(format!(
                "{what} has no numeric format_version; it was not written by hopps"
            )));
        }
    }
    serde_json::from_value(value).map_err(|e| {
        FormatError::corrupt(format!(
            "{what} does not match format_version {FORMAT_VERSION} ({e})"
        ))
        .with_source(e)
    })
}

/// `crc32c:` + 8 hex digits.
pub fn checksum_string(crc: u32) -> String {
    format!("crc32c:{crc:08x}")
}

/// The current time as RFC 3339 UTC with second precision.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Formats seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (H. Hinnant), valid for every date after 1970.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn spec_validation_rejects_bad_models() {
        let ok = ModelSpec::new("m", 4, vec![TableSpec::new("t", 8)]);
        ok.validate().unwrap();
        let mut bad = ok.clone();
        bad.shards = 3;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("power of two")
        );
        let mut bad = ok.clone();
        bad.tables[0].dtype = "f64".into();
        assert!(bad.validate().unwrap_err().to_string().contains("dtype"));
        let mut bad = ok.clone();
        bad.name = "../x".into();
        assert!(bad.validate().is_err());
        let mut bad = ok;
        bad.tables.push(TableSpec::new("t", 4));
        assert!(bad.validate().unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn unknown_format_version_is_named() {
        let doc = br#"{"format_version": 7, "name": "m"}"#;
        let err = parse_versioned::<ModelSpec>(doc, "model.json of model \"m\"").unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("format_version 7"), "{err}");
        assert!(err.to_string().contains("upgrade hopps"), "{err}");
    }

    #[test]
    fn missing_policy_json_shape() {
        let t = TableSpec {
            missing: MissingPolicy::Random {
                seed: 7,
                scale: 0.5,
            },
            ..TableSpec::new("t", 2)
        };
        let s = serde_json::to_string(&t).unwrap();
        assert!(
            s.contains(r#""missing":{"kind":"random","seed":7,"scale":0.5}"#),
            "{s}"
        );
        let back: TableSpec = serde_json::from_str(&s).unwrap();
        assert_eq!(back, t);
    }
}
