//! Configuration of `hopps serve`: a TOML file, overridden by environment variables and flags
//! (the CLI applies those; this module knows the file and the defaults).
//!
//! ```toml
//! repo = "./hopps-data"
//! listen = "127.0.0.1:7070"
//! admin_listen = "127.0.0.1:7071"
//! models = ["ctr"]              # absent: every model in the repository
//! memory_limit = "8GiB"         # or a number of bytes
//! data_dir = "./hopps-node"
//! poll_interval = "1s"
//! wal_sync = "10ms"             # or "always"
//! checkpoint_interval = "1h"    # absent: checkpoints only on demand
//! max_keys_per_request = 100000
//! max_message_bytes = "64MiB"
//!
//! [storage]                     # S3 settings; AWS_* environment variables also work
//! s3_endpoint = "http://127.0.0.1:9000"
//! s3_region = "us-east-1"
//!
//! [cluster]                     # absent: the embedded single node, no etcd
//! etcd = "127.0.0.1:2379"       # comma list (or an array) of endpoints
//! name = "prod"
//! replicas = 2                  # default replicas per shard (per model: `hopps model replicas`)
//! lease_ttl = "5s"              # a node silent this long is lost; at least 2s
//! advertise = "10.0.0.5:7070"   # address clients reach; default: the bound gRPC address
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Default gRPC address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// Default admin HTTP address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7071";
/// Default model repository.
pub const DEFAULT_REPO: &str = "./hopps-data";
/// Default node-local state directory.
pub const DEFAULT_DATA_DIR: &str = "./hopps-node";

/// An error in the configuration; names the file or the setting and what is expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A setting has an unusable value.
    #[error("setting {setting}: {message}")]
    Invalid {
        setting: &'static str,
        message: String,
    },
}

/// S3 settings of the repository (all optional; AWS_* environment variables fill the gaps).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<String>,
    /// Time allowed to reach the repository before it counts as unreachable.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub timeout: Option<Duration>,
}

/// Everything `hopps serve` is configured with.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Model repository URI (path, file://, s3://bucket/prefix, hdfs://host:port/path).
    pub repo: String,
    /// gRPC address; port 0 lets the OS choose.
    pub listen: String,
    /// Admin HTTP address (/metrics, /healthz, /readyz, /status).
    pub admin_listen: String,
    /// Models to serve; `None` serves every model of the repository.
    pub models: Option<Vec<String>>,
    /// Loads that would exceed this many bytes are refused before they start.
    #[serde(deserialize_with = "de_opt_bytes")]
    pub memory_limit: Option<u64>,
    /// Node-local state (write-ahead log).
    pub data_dir: PathBuf,
    /// Name of this node in status and history; default: the host name.
    pub node_id: Option<String>,
    /// How often the repository is polled for new versions.
    #[serde(deserialize_with = "de_duration")]
    pub poll_interval: Duration,
    /// Memory kept for undo records (instant rollback).
    #[serde(deserialize_with = "de_opt_bytes")]
    pub undo_budget: Option<u64>,
    /// Durability of online writes: `always` (fsync every write) or an interval like `10ms`.
    pub wal_sync: WalSyncSetting,
    /// Scheduled checkpoints; `None`: only on demand.
    #[serde(deserialize_with = "de_opt_duration")]
    pub checkpoint_interval: Option<Duration>,
    /// Checkpoints kept per model.
    pub checkpoint_retention: Option<usize>,
    /// Keys allowed in one lookup or write request (over all tables of a multi-lookup).
    pub max_keys_per_request: usize,
    /// Largest gRPC message accepted or sent.
    #[serde(deserialize_with = "de_bytes")]
    pub max_message_bytes: u64,
    /// Time given to in-flight requests after SIGTERM/SIGINT.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
    /// Repository storage settings.
    pub storage: StorageConfig,
    /// Cluster membership; `None`: the embedded single node.
    pub cluster: Option<ClusterConfig>,
}

/// Default replicas per shard in a cluster.
pub const DEFAULT_REPLICAS: u32 = 2;
/// Default lease of a node's registration.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);
/// Shortest lease allowed: keepalives go every third of it, and etcd rounds to seconds.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

/// How a node joins a cluster (the `[cluster]` table; the CLI fills it from `--etcd`,
/// `--cluster`, `--replicas`, `--lease-ttl`, `--advertise`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// etcd endpoints (`host:port`).
    #[serde(deserialize_with = "de_endpoints")]
    pub etcd: Vec<String>,
    /// The cluster's name: every key lives under `/hopps/<name>/`.
    pub name: String,
    /// Replicas per shard when the model has no setting of its own (used by the controller).
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// The lease of this node's registration: lost after this long without etcd.
    #[serde(default = "default_lease_ttl", deserialize_with = "de_duration")]
    pub lease_ttl: Duration,
    /// `host:port` clients use to reach this node's gRPC port; default: the bound address.
    #[serde(default)]
    pub advertise: Option<String>,
    /// The agent [`crate::engine_config`] made for this node, picked up by [`crate::Server`].
    #[serde(skip)]
    pub(crate) agent: crate::cluster::AgentSlot,
}

fn default_replicas() -> u32 {
    DEFAULT_REPLICAS
}

fn default_lease_ttl() -> Duration {
    DEFAULT_LEASE_TTL
}

impl ClusterConfig {
    /// A cluster config with the default replicas, lease and advertised address.
    pub fn new(etcd: Vec<String>, name: impl Into<String>) -> ClusterConfig {
        ClusterConfig {
            etcd,
            name: name.into(),
            replicas: DEFAULT_REPLICAS,
            lease_ttl: DEFAULT_LEASE_TTL,
            advertise: None,
            agent: Default::default(),
        }
    }

    /// Checks settings that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.etcd.iter().all(|e| e.trim().is_empty()) {
            return Err(ConfigError::Invalid {
                setting: "cluster.etcd",
                message: "no etcd endpoint; give one or more as host:port[,host:port]".into(),
            });
        }
        hopps_cluster::check_cluster_name(&self.name).map_err(|e| ConfigError::Invalid {
            setting: "cluster.name",
            message: e.to_string(),
        })?;
        if self.replicas == 0 {
            return Err(ConfigError::Invalid {
                setting: "cluster.replicas",
                message:
                    "must be at least 1 (2 or more keeps every shard served when a node is lost)"
                        .into(),
            });
        }
        if self.lease_ttl < MIN_LEASE_TTL {
            return Err(ConfigError::Invalid {
                setting: "cluster.lease_ttl",
                message: format!(
                    "{:?} is too short; give at least 2s (keepalives go every third of it)",
                    self.lease_ttl
                ),
            });
        }
        if let Some(a) = &self.advertise
            && (a.trim().is_empty() || !a.contains(':'))
        {
            return Err(ConfigError::Invalid {
                setting: "cluster.advertise",
                message: format!("{a:?} is not host:port; give the address clients reach"),
            });
        }
        Ok(())
    }
}

/// Endpoints are a comma list (as on the command line) or a TOML array.
fn de_endpoints<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Endpoints {
        List(Vec<String>),
        Text(String),
    }
    let text = match Endpoints::deserialize(d)? {
        Endpoints::List(v) => v.join(","),
        Endpoints::Text(s) => s,
    };
    hopps_cluster::parse_endpoints(&text).map_err(serde::de::Error::custom)
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            repo: DEFAULT_REPO.to_string(),
            listen: DEFAULT_LISTEN.to_string(),
            admin_listen: DEFAULT_ADMIN_LISTEN.to_string(),
            models: None,
            memory_limit: None,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            node_id: None,
            poll_interval: Duration::from_secs(1),
            undo_budget: None,
            wal_sync: WalSyncSetting::Interval(Duration::from_millis(10)),
            checkpoint_interval: None,
            checkpoint_retention: None,
            max_keys_per_request: 100_000,
            max_message_bytes: 64 << 20,
            shutdown_grace: Duration::from_secs(10),
            storage: StorageConfig::default(),
            cluster: None,
        }
    }
}

impl ServerConfig {
    /// Reads a TOML config file; absent settings keep their defaults.
    pub fn from_file(path: &Path) -> Result<ServerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ServerConfig::from_toml(&text).map_err(|err| match err {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parses TOML text; absent settings keep their defaults.
    pub fn from_toml(text: &str) -> Result<ServerConfig, ConfigError> {
        let config: ServerConfig = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: PathBuf::from("<inline>"),
            message: err.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks settings that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.repo.trim().is_empty() {
            return Err(ConfigError::Invalid {
                setting: "repo",
                message: "is empty; give a path or a URI of a model repository".into(),
            });
        }
        if self.max_keys_per_request == 0 {
            return Err(ConfigError::Invalid {
                setting: "max_keys_per_request",
                message: "must be at least 1".into(),
            });
        }
        if self.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid {
                setting: "max_message_bytes",
                message: format!(
                    "{} bytes is too small; give at least 1KiB",
                    self.max_message_bytes
                ),
            });
        }
        if self.poll_interval.is_zero() {
            return Err(ConfigError::Invalid {
                setting: "poll_interval",
                message: "must be longer than 0s (e.g. 1s)".into(),
            });
        }
        if let Some(models) = &self.models
            && models.iter().any(|m| m.trim().is_empty())
        {
            return Err(ConfigError::Invalid {
                setting: "models",
                message: "contains an empty model name".into(),
            });
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
        }
        Ok(())
    }

    /// The message limit as tonic wants it.
    pub fn max_message_usize(&self) -> usize {
        usize::try_from(self.max_message_bytes).unwrap_or(usize::MAX)
    }
}

/// `always` or an interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalSyncSetting {
    /// fsync before every acknowledgement (group commit shares fsyncs between concurrent writes).
    Always,
    /// fsync groups of writes at this interval; a write is acknowledged once its group is durable.
    Interval(Duration),
}

impl FromStr for WalSyncSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().eq_ignore_ascii_case("always") {
            return Ok(WalSyncSetting::Always);
        }
        parse_duration(s)
            .map(WalSyncSetting::Interval)
            .map_err(|err| format!("{err}; or give `always`"))
    }
}

impl fmt::Display for WalSyncSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalSyncSetting::Always => f.write_str("always"),
            WalSyncSetting::Interval(d) => write!(f, "{}ms", d.as_millis()),
        }
    }
}

impl<'de> Deserialize<'de> for WalSyncSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses `500ms`, `2s`, `1.5s`, `5m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; write e.g. 500ms, 2s, 5m or 1h"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!("{s:?}: unknown unit {other:?}; use ms, s, m or h"));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{s:?} is out of range"))
}

/// Parses `1048576`, `64KiB`, `512MiB`, `8GiB`, `1TiB` (also `KB`/`MB`/`GB` as powers of 10).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size; write e.g. 1048576, 512MiB or 8GiB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0 * 1024.0,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        "tib" | "t" => 1024.0f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?}; use KiB, MiB, GiB or TiB"
            ));
        }
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(bytes.round() as u64)
}

/// A size is a TOML integer or a string with a unit.
#[derive(Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Number(u64),
    Text(String),
}

fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match SizeValue::deserialize(d)? {
        SizeValue::Number(n) => Ok(n),
        SizeValue::Text(s) => parse_bytes(&s).map_err(serde::de::Error::custom),
    }
}

fn de_opt_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_bytes(d).map(Some)
}

/// A duration is a TOML number of seconds or a string with a unit.
#[derive(Deserialize)]
#[serde(untagged)]
enum DurationValue {
    Seconds(f64),
    Text(String),
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match DurationValue::deserialize(d)? {
        DurationValue::Seconds(s) => Duration::try_from_secs_f64(s)
            .map_err(|_| serde::de::Error::custom(format!("{s} seconds is out of range"))),
        DurationValue::Text(s) => parse_duration(&s).map_err(serde::de::Error::custom),
    }
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("fast").is_err());
        assert_eq!(parse_bytes("8GiB"), Ok(8 << 30));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("1.5KiB"), Ok(1536));
        assert_eq!(parse_bytes("2MB"), Ok(2_000_000));
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("8 furlongs").is_err());
    }

    #[test]
    fn a_full_file_parses() {
        let config = ServerConfig::from_toml(
            r#"
            repo = "s3://bucket/models"
            listen = "127.0.0.1:0"
            models = ["ctr", "cvr"]
            memory_limit = "8GiB"
            poll_interval = "250ms"
            wal_sync = "always"
            checkpoint_interval = 3600
            max_message_bytes = 1048576
            [storage]
            s3_endpoint = "http://127.0.0.1:9000"
            timeout = "3s"
            "#,
        )
        .expect("valid");
        assert_eq!(config.repo, "s3://bucket/models");
        assert_eq!(
            config.models,
            Some(vec!["ctr".to_string(), "cvr".to_string()])
        );
        assert_eq!(config.memory_limit, Some(8 << 30));
        assert_eq!(config.poll_interval, Duration::from_millis(250));
        assert_eq!(config.wal_sync, WalSyncSetting::Always);
        assert_eq!(config.checkpoint_interval, Some(Duration::from_secs(3600)));
        assert_eq!(config.max_message_bytes, 1 << 20);
        assert_eq!(config.storage.timeout, Some(Duration::from_secs(3)));
        assert_eq!(config.admin_listen, DEFAULT_ADMIN_LISTEN, "default kept");
    }

    #[test]
    fn bad_files_name_the_setting() {
        let err = ServerConfig::from_toml("lissen = \"x\"").expect_err("typo");
        assert!(err.to_string().contains("lissen"), "{err}");
        let err = ServerConfig::from_toml("memory_limit = \"lots\"").expect_err("bad size");
        assert!(err.to_string().contains("lots"), "{err}");
        let err = ServerConfig::from_toml("max_keys_per_request = 0").expect_err("zero");
        assert!(err.to_string().contains("max_keys_per_request"), "{err}");
        let err = ServerConfig::from_toml("wal_sync = \"sometimes\"").expect_err("bad sync");
        assert!(err.to_string().contains("always"), "{err}");
    }

    #[test]
    fn cluster_table_parses_and_is_checked() {
        assert_eq!(ServerConfig::default().cluster, None, "embedded by default");
        let config = ServerConfig::from_toml(
            r#"
            [cluster]
            etcd = "127.0.0.1:2379, 127.0.0.1:22379"
            name = "prod"
            replicas = 3
            lease_ttl = "2s"
            advertise = "10.0.0.5:7070"
            "#,
        )
        .expect("valid");
        let c = config.cluster.expect("cluster");
        assert_eq!(c.etcd, vec!["127.0.0.1:2379", "127.0.0.1:22379"]);
        assert_eq!(c.name, "prod");
        assert_eq!(c.replicas, 3);
        assert_eq!(c.lease_ttl, Duration::from_secs(2));
        assert_eq!(c.advertise.as_deref(), Some("10.0.0.5:7070"));
        let c = ServerConfig::from_toml("[cluster]\netcd = [\"h:1\"]\nname = \"c\"")
            .expect("defaults")
            .cluster
            .expect("cluster");
        assert_eq!(
            (c.replicas, c.lease_ttl),
            (DEFAULT_REPLICAS, DEFAULT_LEASE_TTL)
        );

        for (toml, needle) in [
            ("[cluster]\netcd = \" , \"\nname = \"c\"", "etcd"),
            ("[cluster]\netcd = \"h:1\"\nname = \"a/b\"", "cluster.name"),
            (
                "[cluster]\netcd = \"h:1\"\nname = \"c\"\nreplicas = 0",
                "cluster.replicas",
            ),
            (
                "[cluster]\netcd = \"h:1\"\nname = \"c\"\nlease_ttl = \"500ms\"",
                "lease_ttl",
            ),
            (
                "[cluster]\netcd = \"h:1\"\nname = \"c\"\nadvertise = \"nowhere\"",
                "advertise",
            ),
            ("[cluster]\nname = \"c\"", "etcd"),
        ] {
            let err = ServerConfig::from_toml(toml).expect_err(toml);
            assert!(err.to_string().contains(needle), "{toml}: {err}");
        }
    }
}
