//! Commands that run a node (`hopps serve`) or talk to one over gRPC (`lookup`, `status`,
//! `model versions|rollback|history|checkpoint`, `bench lookup`).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hopps_client::{Client, ClientOptions, NodeStatus, Rows};
use hopps_server::ServerConfig;
use hopps_server::config::ClusterConfig;
use hopps_server::config::{parse_bytes, parse_duration};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::cluster_cmd::{self, Endpoint, Target};

/// Default address of a server for the client commands.
const DEFAULT_ADDR: &str = "127.0.0.1:7070";

/// `hopps serve`: flags override environment variables (`HOPPS_*`), which override the config
/// file, which overrides the defaults.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    // Boxed: the flags are many, and the CLI's command enum should stay small.
    #[command(flatten)]
    flags: Box<ServeFlags>,
}

/// The settings of `hopps serve`.
#[derive(Debug, clap::Args)]
struct ServeFlags {
    /// TOML config file (settings named like the flags, with underscores).
    #[arg(long, env = "HOPPS_CONFIG")]
    config: Option<PathBuf>,
    /// Model repository URI (path, file://, s3://bucket/prefix, hdfs://host:port/path).
    /// Default: ./hopps-data.
    #[arg(long, env = "HOPPS_REPO")]
    repo: Option<String>,
    /// gRPC address; port 0 lets the OS choose (the bound address is printed). Default: 127.0.0.1:7070.
    #[arg(long, env = "HOPPS_LISTEN")]
    listen: Option<String>,
    /// Admin HTTP address (/metrics, /healthz, /readyz, /status). Default: 127.0.0.1:7071.
    #[arg(long, env = "HOPPS_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// Models to serve, comma-separated. Default: every model of the repository.
    #[arg(long, env = "HOPPS_MODELS", value_delimiter = ',')]
    models: Option<Vec<String>>,
    /// Refuse loads that would hold more than this (e.g. 8GiB or a number of bytes).
    #[arg(long, env = "HOPPS_MEMORY_LIMIT", value_parser = parse_bytes)]
    memory_limit: Option<u64>,
    /// Node-local state (write-ahead log). Default: ./hopps-node.
    #[arg(long, env = "HOPPS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Name of this node in status and history. Default: the host name.
    #[arg(long, env = "HOPPS_NODE_ID")]
    node_id: Option<String>,
    /// How often to poll the repository for new versions (e.g. 1s, 250ms).
    #[arg(long, env = "HOPPS_POLL_INTERVAL", value_parser = parse_duration)]
    poll_interval: Option<Duration>,
    /// Memory for undo records, i.e. the instant-rollback window (e.g. 1GiB).
    #[arg(long, env = "HOPPS_UNDO_BUDGET", value_parser = parse_bytes)]
    undo_budget: Option<u64>,
    /// Durability of online writes: `always` or a group-commit interval like `10ms`.
    #[arg(long, env = "HOPPS_WAL_SYNC")]
    wal_sync: Option<hopps_server::WalSyncSetting>,
    /// Write checkpoints of serving models this often (e.g. 1h). Default: only on demand.
    #[arg(long, env = "HOPPS_CHECKPOINT_INTERVAL", value_parser = parse_duration)]
    checkpoint_interval: Option<Duration>,
    /// Checkpoints kept per model.
    #[arg(long, env = "HOPPS_CHECKPOINT_RETENTION")]
    checkpoint_retention: Option<usize>,
    /// Keys allowed in one request. Default: 100000.
    #[arg(long, env = "HOPPS_MAX_KEYS_PER_REQUEST")]
    max_keys_per_request: Option<usize>,
    /// Largest gRPC message accepted or sent (e.g. 64MiB).
    #[arg(long, env = "HOPPS_MAX_MESSAGE_BYTES", value_parser = parse_bytes)]
    max_message_bytes: Option<u64>,
    /// Time in-flight requests get after SIGTERM/SIGINT. Default: 10s.
    #[arg(long, env = "HOPPS_SHUTDOWN_GRACE", value_parser = parse_duration)]
    shutdown_grace: Option<Duration>,
    /// S3 endpoint of the repository (also AWS_ENDPOINT_URL).
    #[arg(long, env = "HOPPS_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// S3 region (also AWS_REGION).
    #[arg(long, env = "HOPPS_S3_REGION")]
    s3_region: Option<String>,
    /// Time allowed to reach the repository (e.g. 10s).
    #[arg(long, env = "HOPPS_STORAGE_TIMEOUT", value_parser = parse_duration)]
    storage_timeout: Option<Duration>,
    /// Join a cluster coordinated by the etcd at these endpoints (host:port[,host:port]).
    /// Needs --cluster. Without both, the node serves every shard on its own.
    #[arg(long, env = "HOPPS_ETCD_ENDPOINTS", value_name = "ENDPOINTS")]
    etcd: Option<String>,
    /// Name of the cluster to join (with --etcd).
    #[arg(long, env = "HOPPS_CLUSTER", value_name = "NAME")]
    cluster: Option<String>,
    /// Cluster mode: replicas per shard of models without their own setting. Default: 2.
    #[arg(long, env = "HOPPS_REPLICAS", value_parser = clap::value_parser!(u32).range(1..))]
    replicas: Option<u32>,
    /// Cluster mode: how long the node may be silent before the cluster declares it lost
    /// (at least 2s). Default: 5s.
    #[arg(long, env = "HOPPS_LEASE_TTL", value_parser = parse_duration)]
    lease_ttl: Option<Duration>,
    /// Cluster mode: the gRPC address clients dial (host:port). Default: the bound --listen
    /// address.
    #[arg(long, env = "HOPPS_ADVERTISE", value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Once listening, write {"grpc": ADDR, "admin": ADDR} to this file (for scripts and tests).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, env = "HOPPS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl ServeFlags {
    /// The config file (or defaults) with flags and environment variables applied.
    fn config(&self) -> Result<ServerConfig> {
        let mut config = match &self.config {
            Some(path) => ServerConfig::from_file(path)?,
            None => ServerConfig::default(),
        };
        macro_rules! set {
            ($field:ident) => {
                if let Some(v) = &self.$field {
                    config.$field = v.clone();
                }
            };
            ($field:ident, some) => {
                if let Some(v) = &self.$field {
                    config.$field = Some(v.clone());
                }
            };
        }
        set!(repo);
        set!(listen);
        set!(admin_listen);
        set!(models, some);
        set!(memory_limit, some);
        set!(data_dir);
        set!(node_id, some);
        set!(poll_interval);
        set!(undo_budget, some);
        set!(wal_sync);
        set!(checkpoint_interval, some);
        set!(checkpoint_retention, some);
        set!(max_keys_per_request);
        set!(max_message_bytes);
        set!(shutdown_grace);
        if let Some(v) = &self.s3_endpoint {
            config.storage.s3_endpoint = Some(v.clone());
        }
        if let Some(v) = &self.s3_region {
            config.storage.s3_region = Some(v.clone());
        }
        if let Some(v) = self.storage_timeout {
            config.storage.timeout = Some(v);
        }
        self.apply_cluster(&mut config)?;
        config.validate()?;
        Ok(config)
    }
}

impl ServeFlags {
    /// Fills `config.cluster` from --etcd, --cluster, --replicas, --lease-ttl and --advertise
    /// (over the config file's `[cluster]` table).
    fn apply_cluster(&self, config: &mut ServerConfig) -> Result<()> {
        let cluster_only = [
            ("--replicas", self.replicas.is_some()),
            ("--lease-ttl", self.lease_ttl.is_some()),
            ("--advertise", self.advertise.is_some()),
        ];
        // An empty value (a deployment's `HOPPS_ETCD_ENDPOINTS=`) means "not set": the
        // embedded default.
        let etcd = self.etcd.as_ref().filter(|s| !s.trim().is_empty());
        let name = self.cluster.as_ref().filter(|s| !s.trim().is_empty());
        if config.cluster.is_none() {
            match (etcd, name) {
                (Some(etcd), Some(name)) => {
                    let etcd = hopps_cluster::parse_endpoints(etcd).context("--etcd")?;
                    config.cluster = Some(ClusterConfig::new(etcd, name.clone()));
                }
                (Some(_), None) => bail!(
                    "--etcd (HOPPS_ETCD_ENDPOINTS) needs --cluster NAME (HOPPS_CLUSTER): give both \
                     to join a cluster, or neither to serve on this node alone"
                ),
                (None, Some(_)) => bail!(
                    "--cluster (HOPPS_CLUSTER) needs --etcd ENDPOINTS (HOPPS_ETCD_ENDPOINTS): give \
                     both to join a cluster, or neither to serve on this node alone"
                ),
                (None, None) => {
                    if let Some((flag, _)) = cluster_only.iter().find(|(_, given)| *given) {
                        bail!(
                            "{flag} applies to cluster mode only; give --etcd ENDPOINTS and \
                             --cluster NAME too, or drop it"
                        );
                    }
                    return Ok(());
                }
            }
        }
        let Some(cluster) = config.cluster.as_mut() else {
            return Ok(());
        };
        if let Some(etcd) = etcd {
            cluster.etcd = hopps_cluster::parse_endpoints(etcd).context("--etcd")?;
        }
        if let Some(name) = name {
            cluster.name = name.clone();
        }
        if let Some(r) = self.replicas {
            cluster.replicas = r;
        }
        if let Some(ttl) = self.lease_ttl {
            cluster.lease_ttl = ttl;
        }
        if let Some(addr) = &self.advertise {
            cluster.advertise = Some(addr.clone());
        }
        Ok(())
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for people at a terminal; files and log collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second init in one process (tests, the demo) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A shutdown channel that turns true on SIGINT or SIGTERM.
pub(crate) fn shutdown_on_signals() -> (
    tokio::sync::watch::Sender<bool>,
    tokio::sync::watch::Receiver<bool>,
) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let signal_tx = tx.clone();
    tokio::spawn(async move {
        let terminate = async {
            #[cfg(unix)]
            {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut sig) => {
                        sig.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            }
            #[cfg(not(unix))]
            std::future::pending::<()>().await;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            () = terminate => tracing::info!("SIGTERM: shutting down"),
        }
        let _ = signal_tx.send(true);
    });
    (tx, rx)
}

/// Binds a listener, naming the address and the setting on failure.
pub(crate) async fn bind(addr: &str, setting: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} ({setting}); is another process using it? choose another address or port 0")
    })
}

/// Opens the repository and the engine of `config`.
pub(crate) async fn open_engine(config: &ServerConfig) -> Result<hopps_engine::Engine> {
    let storage_timeout = config.storage.timeout.unwrap_or(Duration::from_secs(30));
    let repository =
        tokio::time::timeout(storage_timeout + Duration::from_secs(5), hopps_server::open_repository(config))
            .await
            .with_context(|| {
            format!(
                "model repository {} did not answer within {} s; check the URI and that the storage is reachable",
                config.repo,
                storage_timeout.as_secs()
            )
        })??;
    let engine = hopps_engine::Engine::open(hopps_server::engine_config(config, repository))
        .await
        .with_context(|| format!("cannot start the engine on repository {}", config.repo))?;
    Ok(engine)
}

/// `hopps serve`.
pub async fn serve(args: ServeArgs) -> Result<()> {
    let args = args.flags;
    init_logging(args.log_format);
    let config = args.config()?;
    tracing::info!(repo = %config.repo, models = ?config.models, "opening the model repository");
    let engine = open_engine(&config).await?;
    if engine.models().is_empty() {
        tracing::warn!(
            repo = %config.repo,
            "the repository holds no models yet; the node serves them as they are published \
             (`hopps model publish --repo ...`); check --repo if you expected some"
        );
    }
    let grpc = bind(&config.listen, "--listen").await?;
    let admin = bind(&config.admin_listen, "--admin-listen").await?;
    let grpc_addr = grpc.local_addr()?;
    let admin_addr = admin.local_addr()?;
    announce(grpc_addr, admin_addr, args.ready_file.as_deref())?;
    if let Some(cluster) = &config.cluster {
        let node = engine.status().node_id;
        tracing::info!(cluster = %cluster.name, node = %node, etcd = %cluster.etcd.join(","), "joining the cluster");
        println!(
            "cluster {} node {} etcd {}",
            cluster.name,
            node,
            cluster.etcd.join(",")
        );
    }
    let (_tx, shutdown) = shutdown_on_signals();
    hopps_server::Server::new(engine, &config)?
        .run(grpc, admin, shutdown)
        .await?;
    Ok(())
}

/// Prints the bound addresses (one line on stdout that scripts can parse) and writes the ready file.
fn announce(
    grpc: SocketAddr,
    admin: SocketAddr,
    ready_file: Option<&std::path::Path>,
) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening grpc={grpc} admin={admin}")?;
    stdout.flush()?;
    if let Some(path) = ready_file {
        let json = serde_json::json!({ "grpc": grpc.to_string(), "admin": admin.to_string() });
        // Write then rename, so a reader never sees a half-written file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json.to_string())
            .with_context(|| format!("cannot write ready file {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot write ready file {}", path.display()))?;
    }
    Ok(())
}

async fn connect(addr: &str) -> Result<Client> {
    Ok(Client::connect(addr).await?)
}

/// Parses a key as u64, or as i64 reinterpreted (Spark and pandas write int64 keys).
fn parse_key(s: &str) -> Result<u64, String> {
    s.parse::<u64>()
        .or_else(|_| s.parse::<i64>().map(|k| k as u64))
        .map_err(|_| format!("{s:?} is not a key; keys are integers (u64 or i64)"))
}

/// `hopps lookup`.
#[derive(Debug, clap::Args)]
pub struct LookupArgs {
    #[command(flatten)]
    target: Target,
    /// Model name.
    #[arg(long)]
    model: String,
    /// Table name.
    #[arg(long)]
    table: String,
    /// Read at this version instead of the one served by default (FAILED_PRECONDITION when the
    /// node can no longer read it).
    #[arg(long = "at-version", value_name = "VERSION")]
    at_version: Option<u64>,
    /// Print JSON: {"version": V, "rows": [{"key": K, "found": true, "values": [...]}, ...]}.
    #[arg(long)]
    json: bool,
    /// Keys to look up.
    #[arg(required = true, value_parser = parse_key)]
    keys: Vec<u64>,
}

#[derive(Serialize)]
struct LookupRow<'a> {
    key: u64,
    found: bool,
    values: &'a [f32],
}

#[derive(Serialize)]
struct LookupOutput<'a> {
    model: &'a str,
    table: &'a str,
    version: u64,
    dim: u32,
    rows: Vec<LookupRow<'a>>,
}

fn lookup_output<'a>(args: &'a LookupArgs, rows: &'a Rows) -> LookupOutput<'a> {
    LookupOutput {
        model: &args.model,
        table: &args.table,
        version: rows.version,
        dim: rows.dim,
        rows: args
            .keys
            .iter()
            .enumerate()
            .map(|(i, &key)| LookupRow {
                key,
                found: rows.found[i],
                values: rows.row(i).unwrap_or(&[]),
            })
            .collect(),
    }
}

/// `hopps lookup`.
pub async fn lookup(args: LookupArgs) -> Result<()> {
    let rows = match args.target.endpoint(DEFAULT_ADDR) {
        Endpoint::Node(addr) => {
            connect(&addr)
                .await?
                .lookup_at(&args.model, &args.table, &args.keys, args.at_version)
                .await?
        }
        Endpoint::Cluster { etcd, cluster } => {
            let client = cluster_cmd::connect(&etcd, &cluster).await?;
            // The cluster pins its serving version; --at-version pins another one.
            match args.at_version {
                Some(v) => {
                    client
                        .lookup_at(&args.model, &args.table, &args.keys, v)
                        .await?
                }
                None => client.lookup(&args.model, &args.table, &args.keys).await?,
            }
        }
    };
    let out = lookup_output(&args, &rows);
    if args.json {
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    println!(
        "model {} table {} version {} dim {}",
        out.model, out.table, out.version, out.dim
    );
    let width = out
        .rows
        .iter()
        .map(|r| r.key.to_string().len())
        .max()
        .unwrap_or(1);
    for row in &out.rows {
        println!(
            "{:>width$}  {:<7}  {}",
            row.key,
            if row.found { "found" } else { "missing" },
            format_values(row.values)
        );
    }
    Ok(())
}

/// `[0.1, -2, 3.25]`: shortest round-trip representation of each value.
fn format_values(values: &[f32]) -> String {
    let mut s = String::from("[");
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&v.to_string());
    }
    s.push(']');
    s
}

/// `hopps status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    target: Target,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub(crate) fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// Prints rows as a table with columns padded to their widest cell.
pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(cell);
            if i + 1 < widths.len() {
                s.push_str(&" ".repeat(w.saturating_sub(cell.chars().count())));
            }
        }
        println!("{}", s.trim_end());
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
}

/// Prints a node status for people.
pub(crate) fn print_status(status: &NodeStatus) {
    println!(
        "node {}  {}  hopps {}  up {:.0} s  repository {}",
        status.node_id,
        if status.ready { "ready" } else { "NOT READY" },
        status.version,
        status.uptime_seconds,
        status.repository
    );
    println!(
        "memory {} of {}  WAL {}",
        human_bytes(status.memory_used_bytes),
        status
            .memory_limit_bytes
            .map_or_else(|| "no limit".to_string(), human_bytes),
        human_bytes(status.wal_bytes)
    );
    println!();
    let rows: Vec<Vec<String>> = status
        .models
        .iter()
        .map(|m| {
            let lag = match (m.newest_version, m.serving_version) {
                (Some(n), Some(s)) => n.saturating_sub(s).to_string(),
                _ => "-".to_string(),
            };
            let load = m.load.as_ref().map_or_else(String::new, |l| {
                let pct = if l.rows_total == 0 {
                    0.0
                } else {
                    100.0 * l.rows_done as f64 / l.rows_total as f64
                };
                format!("v{} {pct:.0}% ETA {:.0}s", l.version, l.eta_seconds)
            });
            vec![
                m.name.clone(),
                m.state.clone(),
                opt(m.serving_version),
                opt(m.newest_version),
                lag,
                m.rows.to_string(),
                human_bytes(m.memory_bytes),
                format!("{:.3}", m.load_factor),
                load,
                m.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        &[
            "MODEL",
            "STATE",
            "SERVING",
            "NEWEST",
            "LAG",
            "ROWS",
            "MEMORY",
            "LOAD-FACTOR",
            "LOADING",
            "ERROR",
        ],
        &rows,
    );
    let tables: Vec<Vec<String>> = status
        .models
        .iter()
        .flat_map(|m| {
            m.tables.iter().map(move |t| {
                vec![
                    m.name.clone(),
                    t.name.clone(),
                    t.dim.to_string(),
                    t.dtype.clone(),
                    t.missing.clone(),
                    t.rows.to_string(),
                    format!("{:.3}", t.load_factor),
                    human_bytes(t.bytes),
                    if t.rows == 0 {
                        "-".to_string()
                    } else {
                        format!("{:.1}", t.bytes as f64 / t.rows as f64)
                    },
                ]
            })
        })
        .collect();
    if !tables.is_empty() {
        println!();
        print_table(
            &[
                "MODEL",
                "TABLE",
                "DIM",
                "DTYPE",
                "MISSING",
                "ROWS",
                "LOAD-FACTOR",
                "BYTES",
                "BYTES/ROW",
            ],
            &tables,
        );
    }
}

/// `hopps status`.
pub async fn status(args: StatusArgs) -> Result<()> {
    let addr = match args.target.endpoint(DEFAULT_ADDR) {
        Endpoint::Node(addr) => addr,
        Endpoint::Cluster { etcd, cluster } => {
            return cluster_cmd::cluster_status(&etcd, &cluster, args.json).await;
        }
    };
    let client = connect(&addr).await?;
    let status = client.status().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_status(&status);
    }
    Ok(())
}

/// Prints versions for people.
pub(crate) fn print_versions(versions: &[hopps_client::VersionInfo]) {
    let rows: Vec<Vec<String>> = versions
        .iter()
        .map(|v| {
            vec![
                v.version.to_string(),
                v.kind.clone(),
                opt(v.parent),
                v.rows.to_string(),
                v.state.clone(),
                v.created.clone(),
                v.source.clone(),
            ]
        })
        .collect();
    print_table(
        &[
            "VERSION", "KIND", "PARENT", "ROWS", "STATE", "CREATED", "SOURCE",
        ],
        &rows,
    );
}

/// `hopps model versions --addr`.
pub async fn versions(addr: &str, model: &str, json: bool) -> Result<()> {
    let client = connect(addr).await?;
    let versions = client.versions(model).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&versions)?);
    } else {
        print_versions(&versions);
    }
    Ok(())
}

/// `hopps model rollback`.
#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    target: Target,
    /// Model name.
    #[arg(long)]
    model: String,
    /// The earlier version to serve.
    #[arg(long)]
    to: u64,
    /// With --etcd: how long to wait for the cluster to serve the version (e.g. 60s).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `hopps model rollback`.
pub async fn rollback(args: RollbackArgs) -> Result<()> {
    let addr = match args.target.endpoint(DEFAULT_ADDR) {
        Endpoint::Node(addr) => addr,
        Endpoint::Cluster { etcd, cluster } => {
            return cluster_cmd::cluster_rollback(
                &etcd,
                &cluster,
                &args.model,
                args.to,
                args.timeout,
                args.json,
            )
            .await;
        }
    };
    let client = connect(&addr).await?;
    let report = client.rollback(&args.model, args.to).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "model {} rolled back from version {} to {} ({}, {:.3} s)",
            report.model, report.from, report.to, report.method, report.seconds
        );
    }
    Ok(())
}

/// `hopps model history`.
#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    /// Server address (host:port).
    #[arg(long, env = "HOPPS_ADDR", default_value = DEFAULT_ADDR)]
    addr: String,
    /// Model name.
    #[arg(long)]
    model: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Prints history for people.
pub(crate) fn print_history(events: &[hopps_client::HistoryEvent]) {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                e.time.clone(),
                e.event.clone(),
                e.version.to_string(),
                opt(e.from_version),
                e.detail.clone(),
            ]
        })
        .collect();
    print_table(&["TIME", "EVENT", "VERSION", "FROM", "DETAIL"], &rows);
}

/// `hopps model history`.
pub async fn history(args: HistoryArgs) -> Result<()> {
    let client = connect(&args.addr).await?;
    let events = client.history(&args.model).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&events)?);
    } else {
        print_history(&events);
    }
    Ok(())
}

/// `hopps model checkpoint`.
#[derive(Debug, clap::Args)]
pub struct CheckpointArgs {
    /// Server address (host:port).
    #[arg(long, env = "HOPPS_ADDR", default_value = DEFAULT_ADDR)]
    addr: String,
    /// Model name.
    #[arg(long)]
    model: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `hopps model checkpoint`.
pub async fn checkpoint(args: CheckpointArgs) -> Result<()> {
    let client = connect(&args.addr).await?;
    let report = client.checkpoint(&args.model).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "model {}: checkpoint of version {} written ({} rows, {}, {:.3} s)",
            report.model,
            report.version,
            report.rows,
            human_bytes(report.bytes),
            report.seconds
        );
    }
    Ok(())
}

/// Key distribution of `hopps bench lookup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyDist {
    Uniform,
    Zipf,
}

/// `hopps bench lookup`: closed loop, each in-flight request waits for its answer before the next.
#[derive(Debug, clap::Args)]
pub struct BenchLookupArgs {
    /// Server address (host:port).
    #[arg(long, env = "HOPPS_ADDR", default_value = DEFAULT_ADDR)]
    addr: String,
    /// Model name.
    #[arg(long)]
    model: String,
    /// Table name.
    #[arg(long)]
    table: String,
    /// Keys per request.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// gRPC connections (HTTP/2 each).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 2)]
    inflight: usize,
    /// Measured time (e.g. 10s).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured warm-up before it.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Key distribution.
    #[arg(long, value_enum, default_value_t = KeyDist::Uniform)]
    dist: KeyDist,
    /// Zipf exponent.
    #[arg(long, default_value_t = 0.99)]
    zipf_exponent: f64,
    /// Keys are drawn from [key_min, key_min + key_space). Default key space: the table's rows.
    #[arg(long)]
    key_space: Option<u64>,
    /// Smallest key.
    #[arg(long, default_value_t = 0)]
    key_min: u64,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Draws keys from a key space, uniformly or Zipf-distributed.
#[derive(Clone)]
enum KeySource {
    Uniform {
        min: u64,
        space: u64,
    },
    /// Cumulative probabilities of ranks; rank r maps to a key scattered over the space, so hot
    /// keys land on all shards.
    Zipf {
        min: u64,
        space: u64,
        cdf: std::sync::Arc<Vec<f64>>,
    },
}

/// Largest key space a Zipf CDF is built for (8 bytes each).
const ZIPF_MAX_SPACE: u64 = 1 << 24;

impl KeySource {
    fn new(dist: KeyDist, min: u64, space: u64, exponent: f64) -> Result<KeySource> {
        if space == 0 {
            bail!("the key space is empty; publish rows first or pass --key-space");
        }
        Ok(match dist {
            KeyDist::Uniform => KeySource::Uniform { min, space },
            KeyDist::Zipf => {
                if space > ZIPF_MAX_SPACE {
                    bail!(
                        "--dist zipf supports key spaces up to {ZIPF_MAX_SPACE}; pass a smaller --key-space"
                    );
                }
                let mut cdf = Vec::with_capacity(space as usize);
                let mut total = 0.0;
                for rank in 1..=space {
                    total += 1.0 / (rank as f64).powf(exponent);
                    cdf.push(total);
                }
                for p in &mut cdf {
                    *p /= total;
                }
                KeySource::Zipf {
                    min,
                    space,
                    cdf: std::sync::Arc::new(cdf),
                }
            }
        })
    }

    fn fill(&self, rng: &mut SmallRng, keys: &mut [u64]) {
        match self {
            KeySource::Uniform { min, space } => {
                for k in keys {
                    *k = min + rng.random_range(0..*space);
                }
            }
            KeySource::Zipf { min, space, cdf } => {
                for k in keys {
                    let u: f64 = rng.random();
                    let rank = cdf.partition_point(|p| *p < u) as u64;
                    // An odd multiplier is a bijection modulo a power of two; for other spaces it
                    // still scatters ranks (a few collide, which only flattens the head).
                    *k = min + rank.wrapping_mul(0x9E37_79B9_7F4A_7C15) % space;
                }
            }
        }
    }
}

/// Result of a lookup benchmark.
#[derive(Debug, Serialize)]
pub(crate) struct BenchReport {
    pub addr: String,
    pub model: String,
    pub table: String,
    pub batch: usize,
    pub connections: usize,
    pub inflight: usize,
    pub dist: KeyDist,
    pub key_space: u64,
    pub seconds: f64,
    pub requests: u64,
    pub keys: u64,
    pub errors: u64,
    pub keys_per_second: f64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

fn percentile(sorted_micros: &[u32], q: f64) -> f64 {
    if sorted_micros.is_empty() {
        return 0.0;
    }
    let idx = ((sorted_micros.len() as f64 - 1.0) * q).round() as usize;
    f64::from(sorted_micros[idx.min(sorted_micros.len() - 1)]) / 1000.0
}

/// `hopps bench lookup`.
pub async fn bench_lookup(args: BenchLookupArgs) -> Result<()> {
    if args.batch == 0 || args.connections == 0 || args.inflight == 0 {
        bail!("--batch, --connections and --inflight must be at least 1");
    }
    let first = connect(&args.addr).await?;
    let key_space = match args.key_space {
        Some(space) => space,
        None => {
            let models = first.list_models().await?;
            let model = models
                .iter()
                .find(|m| m.name == args.model)
                .with_context(|| {
                    format!(
                        "the server at {} does not serve model {:?}",
                        args.addr, args.model
                    )
                })?;
            let table = model
                .tables
                .iter()
                .find(|t| t.name == args.table)
                .with_context(|| format!("model {:?} has no table {:?}", args.model, args.table))?;
            table.rows
        }
    };
    let source = KeySource::new(args.dist, args.key_min, key_space, args.zipf_exponent)?;
    let options = ClientOptions::default();
    let mut clients = vec![first];
    for _ in 1..args.connections {
        clients.push(Client::connect_with(&args.addr, &options).await?);
    }
    let report = run_bench(&args, &clients, &source, key_space).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} keys/s  {} requests/s  p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  ({} requests of {} keys, {} connections × {} in flight, {:?}, {} errors)",
            report.keys_per_second.round(),
            report.requests_per_second.round(),
            report.p50_ms,
            report.p99_ms,
            report.p999_ms,
            report.requests,
            report.batch,
            report.connections,
            report.inflight,
            report.dist,
            report.errors
        );
    }
    if report.requests == 0 {
        bail!("no request succeeded; {} errors", report.errors);
    }
    Ok(())
}

/// Key batches each benchmark task draws in advance and cycles through.
const BATCH_POOL: usize = 64;

async fn run_bench(
    args: &BenchLookupArgs,
    clients: &[Client],
    source: &KeySource,
    key_space: u64,
) -> Result<BenchReport> {
    // Key batches are drawn before the clock starts and reused in turn, so the generator's cost
    // (a Zipf draw is a binary search) stays out of the figures.
    let mut pools = Vec::new();
    for c in 0..clients.len() {
        for i in 0..args.inflight {
            let mut rng = SmallRng::seed_from_u64(args.seed ^ ((c as u64) << 32 | i as u64));
            let pool: Vec<Vec<u64>> = (0..BATCH_POOL)
                .map(|_| {
                    let mut keys = vec![0u64; args.batch];
                    source.fill(&mut rng, &mut keys);
                    keys
                })
                .collect();
            pools.push((c, pool));
        }
    }
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let mut tasks = Vec::new();
    for (c, pool) in pools {
        let client = clients[c].clone();
        let model = args.model.clone();
        let table = args.table.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies: Vec<u32> = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            for keys in pool.iter().cycle() {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let sent = Instant::now();
                let result = client.lookup(&model, &table, keys).await;
                let done = Instant::now();
                if sent < measure_from {
                    continue;
                }
                match result {
                    Ok(_) => latencies.push(
                        u32::try_from(done.duration_since(sent).as_micros()).unwrap_or(u32::MAX),
                    ),
                    Err(err) => {
                        errors += 1;
                        if first_error.is_none() {
                            first_error = Some(err.to_string());
                        }
                    }
                }
            }
            (latencies, errors, first_error)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for task in tasks {
        let (l, e, f) = task.await.context("a benchmark task failed")?;
        latencies.extend(l);
        errors += e;
        first_error = first_error.or(f);
    }
    if let Some(err) = &first_error {
        eprintln!("warning: {errors} requests failed; first error: {err}");
    }
    let seconds = Instant::now()
        .saturating_duration_since(measure_from)
        .as_secs_f64()
        .max(1e-9);
    latencies.sort_unstable();
    let requests = latencies.len() as u64;
    let keys = requests * args.batch as u64;
    Ok(BenchReport {
        addr: args.addr.clone(),
        model: args.model.clone(),
        table: args.table.clone(),
        batch: args.batch,
        connections: clients.len(),
        inflight: args.inflight,
        dist: args.dist,
        key_space,
        seconds,
        requests,
        keys,
        errors,
        keys_per_second: keys as f64 / seconds,
        requests_per_second: requests as f64 / seconds,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        p999_ms: percentile(&latencies, 0.999),
        max_ms: latencies.last().map_or(0.0, |m| f64::from(*m) / 1000.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argument_definitions_are_consistent() {
        use clap::{Args, Command};
        // As the CLI builds them: --version propagated to every subcommand.
        let cli = Command::new("hopps")
            .version("0")
            .propagate_version(true)
            .subcommand(ServeArgs::augment_args(Command::new("serve")))
            .subcommand(LookupArgs::augment_args(Command::new("lookup")))
            .subcommand(StatusArgs::augment_args(Command::new("status")))
            .subcommand(RollbackArgs::augment_args(Command::new("rollback")))
            .subcommand(HistoryArgs::augment_args(Command::new("history")))
            .subcommand(CheckpointArgs::augment_args(Command::new("checkpoint")))
            .subcommand(BenchLookupArgs::augment_args(Command::new("bench")));
        cli.debug_assert();
    }

    fn serve_flags(args: &[&str]) -> ServeFlags {
        use clap::{Args, FromArgMatches};
        let cmd = ServeArgs::augment_args(clap::Command::new("serve"));
        let matches = cmd
            .try_get_matches_from(std::iter::once("serve").chain(args.iter().copied()))
            .expect("serve flags parse");
        *ServeArgs::from_arg_matches(&matches)
            .expect("serve args")
            .flags
    }

    fn cluster_of(args: &[&str]) -> Result<Option<ClusterConfig>> {
        let mut config = ServerConfig::default();
        serve_flags(args).apply_cluster(&mut config)?;
        Ok(config.cluster)
    }

    #[test]
    fn serve_joins_a_cluster_only_with_etcd_and_cluster() {
        assert!(cluster_of(&[]).expect("embedded").is_none());
        // A deployment's empty HOPPS_ETCD_ENDPOINTS= / HOPPS_CLUSTER= mean the embedded default.
        assert!(
            cluster_of(&["--etcd", "", "--cluster", ""])
                .expect("empty is unset")
                .is_none()
        );
        let c = cluster_of(&[
            "--etcd",
            "127.0.0.1:2379, 127.0.0.1:2380",
            "--cluster",
            "prod",
            "--replicas",
            "3",
            "--lease-ttl",
            "2s",
            "--advertise",
            "10.0.0.1:7070",
        ])
        .expect("cluster flags")
        .expect("cluster mode");
        assert_eq!(c.etcd, ["127.0.0.1:2379", "127.0.0.1:2380"]);
        assert_eq!(c.name, "prod");
        assert_eq!(c.replicas, 3);
        assert_eq!(c.lease_ttl, Duration::from_secs(2));
        assert_eq!(c.advertise.as_deref(), Some("10.0.0.1:7070"));
        // Defaults of what is not given.
        let c = cluster_of(&["--etcd", "e:1", "--cluster", "c"])
            .expect("cluster flags")
            .expect("cluster mode");
        assert_eq!(c.replicas, hopps_server::config::DEFAULT_REPLICAS);
        assert_eq!(c.advertise, None);

        for (args, names) in [
            (&["--etcd", "e:1"][..], ["--etcd", "--cluster"]),
            (&["--cluster", "c"][..], ["--cluster", "--etcd"]),
            (&["--replicas", "2"][..], ["--replicas", "--etcd"]),
            (&["--advertise", "h:1"][..], ["--advertise", "--cluster"]),
        ] {
            let err = format!("{:#}", cluster_of(args).expect_err("incomplete"));
            assert!(names.iter().all(|n| err.contains(n)), "{args:?}: {err}");
        }
        let err = format!(
            "{:#}",
            cluster_of(&["--etcd", " , ", "--cluster", "c"]).unwrap_err()
        );
        assert!(err.contains("--etcd") && err.contains("endpoint"), "{err}");
    }

    #[test]
    fn keys_parse_as_u64_or_i64() {
        assert_eq!(parse_key("42"), Ok(42));
        assert_eq!(parse_key("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_key("-1"), Ok(u64::MAX));
        assert!(parse_key("x1").is_err());
    }

    #[test]
    fn zipf_keys_stay_in_space_and_favour_the_head() {
        let source = KeySource::new(KeyDist::Zipf, 100, 1000, 1.1).expect("space");
        let mut rng = SmallRng::seed_from_u64(1);
        let mut keys = vec![0u64; 20_000];
        source.fill(&mut rng, &mut keys);
        assert!(keys.iter().all(|k| (100..1100).contains(k)));
        // Rank 0 maps to key_min; it is the most frequent key by far.
        let head = keys.iter().filter(|k| **k == 100).count();
        assert!(head > 20_000 / 20, "head drawn {head} times");
        assert!(KeySource::new(KeyDist::Uniform, 0, 0, 1.0).is_err());
    }

    #[test]
    fn percentiles_pick_the_right_rank() {
        let data: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&data, 0.5), 0.501);
        assert_eq!(percentile(&data, 0.999), 0.999);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
