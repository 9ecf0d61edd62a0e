//! Starting and stopping what the suites compare: a `hopps serve` process and a `redis-server`
//! process, both on 127.0.0.1, both stopped when their handle is dropped (also on error paths).
//!
//! Readiness is polled with a deadline (PING for Redis, the status call for hopps), never
//! waited for with a sleep.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::net::TcpStream;

use crate::resp::RespConnection;

/// Flags every side-by-side suite shares.
#[derive(Debug, Clone, clap::Args)]
pub struct SystemArgs {
    /// The `hopps` binary to start. Default: the one beside this harness, built first with cargo.
    #[arg(long)]
    pub hopps_bin: Option<PathBuf>,
    /// Do not run cargo to build the `hopps` binary beside this harness first.
    #[arg(long)]
    pub no_build: bool,
    /// The `redis-server` binary. Default: the first on PATH (bench/setup.sh installs it).
    #[arg(long)]
    pub redis_bin: Option<PathBuf>,
    /// Rounds per side, alternating hopps and Redis (A B A B ...); at least 5 mean something.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Shards per hopps table.
    #[arg(long, default_value_t = 16)]
    pub shards: u32,
}

/// The two systems a suite compares, resolved once per run.
#[derive(Debug, Clone)]
pub struct Sides {
    pub hopps_bin: PathBuf,
    pub redis_bin: PathBuf,
    pub rounds: usize,
    pub shards: u32,
    pub quick: bool,
    pub report: crate::report::Report,
}

impl Sides {
    /// Finds (and builds, unless told not to) the binaries.
    pub fn resolve(args: &SystemArgs, quick: bool, json: bool) -> anyhow::Result<Sides> {
        anyhow::ensure!(
            args.rounds >= 1,
            "--rounds must be at least 1 (5 or more for figures that mean anything)"
        );
        anyhow::ensure!(
            args.shards >= 1 && args.shards.is_power_of_two(),
            "--shards {} is not a power of two; use 1, 2, 4, 8, ...",
            args.shards
        );
        Ok(Sides {
            hopps_bin: hopps_binary(args.hopps_bin.as_deref(), !args.no_build)?,
            redis_bin: redis_binary(args.redis_bin.as_deref())?,
            rounds: args.rounds,
            shards: args.shards,
            quick,
            report: crate::report::Report { json },
        })
    }

    /// Options of a Redis without persistence.
    pub fn redis(&self) -> RedisOptions {
        RedisOptions {
            binary: self.redis_bin.clone(),
            fsync_always: false,
            dir: None,
        }
    }

    /// Options of a hopps node on `repo`, polling for new versions every 10 ms.
    pub fn hopps(&self, repo: &Path, data_dir: &Path) -> HoppsOptions {
        HoppsOptions {
            binary: self.hopps_bin.clone(),
            repo: repo.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            poll_interval: Duration::from_millis(10),
            wal_sync: "10ms".to_string(),
            extra_args: Vec::new(),
        }
    }
}

/// The client side's async runtime: two worker threads, as many as the test machines have
/// cores, so that two client connections can run in parallel.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the client's async runtime")
}

/// How long a server may take to answer its first request.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Pause between readiness probes: short, so that start-up time is measured to ~10 ms.
const PROBE_INTERVAL: Duration = Duration::from_millis(10);

/// A free port on 127.0.0.1 as the OS chose it. Another process can take it before the server
/// binds it; callers retry the start when that happens.
fn free_port() -> anyhow::Result<u16> {
    let listener =
        TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 to find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// `{"grpc": ADDR, "admin": ADDR}` as `hopps serve --ready-file` writes it.
fn parse_ready_file(text: &str) -> Option<(String, String)> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    Some((
        value.get("grpc")?.as_str()?.to_string(),
        value.get("admin")?.as_str()?.to_string(),
    ))
}

/// Resident set size of process `pid`, from `/proc/<pid>/status` (Linux).
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_rss(&text).with_context(|| format!("no VmRSS line in {path}"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A child process killed and reaped on drop.
struct Process {
    name: &'static str,
    child: Child,
}

impl Process {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Err` with the exit status when the process already ended.
    fn check_running(&mut self, log: &Path) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{} exited with {status} before it was ready; its log {} ends with:\n{}",
                self.name,
                log.display(),
                tail.join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SIGKILL: the suites keep nothing of a server once they drop it, so there is nothing
        // to shut down gracefully.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where `redis-server` comes from and how durable it is.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub binary: PathBuf,
    /// `appendonly yes` + `appendfsync always`: every write durable before its reply, the
    /// guarantee hopps' write-ahead log gives; otherwise no persistence at all.
    pub fsync_always: bool,
    /// Working directory (append-only file); `None`: a fresh temporary one. Giving the same
    /// directory to a restarted server makes it reload what the previous one wrote.
    pub dir: Option<PathBuf>,
}

/// A `redis-server` on 127.0.0.1 with persistence off (or AOF with fsync on every write).
pub struct RedisServer {
    process: Process,
    port: u16,
    _dir: Option<tempfile::TempDir>,
}

impl RedisServer {
    pub async fn start(options: &RedisOptions) -> anyhow::Result<RedisServer> {
        let mut last_err = None;
        // The free port can be taken between our probe and Redis' bind: try a few ports.
        for _ in 0..3 {
            match RedisServer::start_once(options).await {
                Ok(server) => return Ok(server),
                Err(err) => last_err = Some(err),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    async fn start_once(options: &RedisOptions) -> anyhow::Result<RedisServer> {
        let temp = match &options.dir {
            Some(_) => None,
            None => Some(
                tempfile::Builder::new()
                    .prefix("hopps-bench-redis-")
                    .tempdir()
                    .context("creating a directory for redis-server")?,
            ),
        };
        let dir: &Path = match (&options.dir, &temp) {
            (Some(d), _) => d,
            (None, Some(t)) => t.path(),
            (None, None) => bail!("no directory for redis-server"),
        };
        let port = free_port()?;
        let log = dir.join("redis.log");
        let mut cmd = Command::new(&options.binary);
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--daemonize", "no", "--protected-mode", "yes"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(&log);
        if options.fsync_always {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "starting {}; install Redis with bench/setup.sh or give --redis-bin",
                    options.binary.display()
                )
            })?;
        let mut process = Process {
            name: "redis-server",
            child,
        };
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            process.check_running(&log)?;
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)).await {
                let mut conn = RespConnection::new(stream);
                // Redis answers LOADING errors while it starts; only PONG means ready.
                if conn.ping().await.is_ok() {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "redis-server on 127.0.0.1:{port} did not answer PING within {START_DEADLINE:?}; see {}",
                    log.display()
                );
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
        Ok(RedisServer {
            process,
            port,
            _dir: temp,
        })
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// A new connection (TCP_NODELAY, as every latency-minded client sets).
    pub async fn connect(&self) -> anyhow::Result<RespConnection<TcpStream>> {
        let stream = TcpStream::connect(("127.0.0.1", self.port))
            .await
            .with_context(|| format!("connecting to redis-server at {}", self.addr()))?;
        stream.set_nodelay(true)?;
        Ok(RespConnection::new(stream))
    }
}

/// How to run `hopps serve`.
#[derive(Debug, Clone)]
pub struct HoppsOptions {
    pub binary: PathBuf,
    /// Model repository (a local directory).
    pub repo: PathBuf,
    /// Node-local state (write-ahead log); kept across restarts of the same node.
    pub data_dir: PathBuf,
    /// How often the node looks for new versions; short, so that the load suite measures the
    /// apply and not the wait.
    pub poll_interval: Duration,
    /// `always` or an interval like `10ms`.
    pub wal_sync: String,
    /// Further `hopps serve` flags (e.g. `--undo-budget 1GiB`).
    pub extra_args: Vec<String>,
}

/// A `hopps serve` process on 127.0.0.1.
pub struct HoppsServer {
    process: Process,
    addr: String,
    /// Time from spawn until the node answered ready.
    pub ready_after: Duration,
    _logs: tempfile::TempDir,
}

impl HoppsServer {
    /// Starts a node and waits until it reports ready (every model of the repository loaded).
    pub async fn start(options: &HoppsOptions) -> anyhow::Result<HoppsServer> {
        let logs = tempfile::Builder::new()
            .prefix("hopps-bench-serve-")
            .tempdir()
            .context("creating a directory for the server's log")?;
        let log = logs.path().join("hopps.log");
        let ready_file = logs.path().join("listening.json");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let started = Instant::now();
        let child = Command::new(&options.binary)
            .arg("serve")
            .arg("--repo")
            .arg(&options.repo)
            .arg("--data-dir")
            .arg(&options.data_dir)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--poll-interval")
            .arg(format!("{}ms", options.poll_interval.as_millis().max(1)))
            .args(["--wal-sync", &options.wal_sync])
            .args(options.extra_args.iter())
            .arg("--ready-file")
            .arg(&ready_file)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {}; build it with `cargo build --release -p hopps-cli` or give --hopps-bin",
                    options.binary.display()
                )
            })?;
        let mut process = Process {
            name: "hopps serve",
            child,
        };
        // Loading a large model takes a while; the deadline only guards against a hang.
        let limit = START_DEADLINE * 20;
        let deadline = started + limit;
        let mut addrs: Option<(String, String)> = None;
        let mut client = None;
        loop {
            process.check_running(&log)?;
            if addrs.is_none() {
                // The file is written then renamed into place: it is whole once it exists.
                addrs = std::fs::read_to_string(&ready_file)
                    .ok()
                    .and_then(|text| parse_ready_file(&text));
            }
            if let Some((grpc, _)) = &addrs {
                if client.is_none() {
                    client = hopps_client::Client::connect(grpc).await.ok();
                }
                if let Some(c) = &client
                    && let Ok(status) = c.status().await
                    && status.ready
                {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "hopps serve was not ready within {limit:?}; see {}",
                    log.display()
                );
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
        let (addr, _admin) = addrs.context("ready without addresses")?;
        Ok(HoppsServer {
            process,
            addr,
            ready_after: started.elapsed(),
            _logs: logs,
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// A new client with its own connection.
    pub async fn connect(&self) -> anyhow::Result<hopps_client::Client> {
        hopps_client::Client::connect(&self.addr)
            .await
            .with_context(|| format!("connecting to hopps at {}", self.addr))
    }

    /// Waits until `model` serves `version` (or a later one), polling status with a deadline.
    /// Returns the time it took.
    pub async fn wait_serving(
        &self,
        model: &str,
        version: u64,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let client = self.connect().await?;
        let started = Instant::now();
        loop {
            let status = client.status().await.context("status of hopps")?;
            if let Some(m) = status.models.iter().find(|m| m.name == model) {
                if m.serving_version.is_some_and(|v| v >= version) {
                    return Ok(started.elapsed());
                }
                if let Some(err) = &m.last_error
                    && !err.is_empty()
                    && m.load_failures > 0
                {
                    bail!("hopps failed to apply version {version} of model {model:?}: {err}");
                }
            }
            if started.elapsed() > timeout {
                bail!("model {model:?} did not serve version {version} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// The `hopps` binary: the one given, or the one beside this harness (same build profile),
/// built first with cargo when the harness runs from a cargo target directory.
pub fn hopps_binary(given: Option<&Path>, build: bool) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_path_buf());
    }
    let exe = std::env::current_exe().context("locating the harness binary")?;
    let dir = exe
        .parent()
        .context("the harness binary has no parent directory")?
        .to_path_buf();
    let candidate = dir.join("hopps");
    if build {
        let profile = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("release");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "hopps-cli", "--bin", "hopps"]);
        match profile {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        // The target directory of this harness is the one to build into.
        if let Some(target) = dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        let status = cmd
            .stdout(Stdio::null())
            .status()
            .context("running cargo to build the hopps binary; give --hopps-bin to skip")?;
        if !status.success() {
            bail!(
                "`cargo build -p hopps-cli` failed ({status}); fix the build or give --hopps-bin"
            );
        }
    }
    if !candidate.exists() {
        bail!(
            "no hopps binary at {}; build it with `cargo build --release -p hopps-cli` or give --hopps-bin",
            candidate.display()
        );
    }
    Ok(candidate)
}

/// The `redis-server` binary: the one given, or the first on `PATH`.
pub fn redis_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file())
        .context("redis-server is not installed; run `bash bench/setup.sh` (installs Debian's redis-server) or give --redis-bin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_file_parses() {
        let parsed = parse_ready_file(r#"{"grpc":"127.0.0.1:5","admin":"127.0.0.1:6"}"#);
        assert_eq!(
            parsed,
            Some(("127.0.0.1:5".to_string(), "127.0.0.1:6".to_string()))
        );
        assert_eq!(parse_ready_file(r#"{"grpc":"127.0.0.1:5"}"#), None);
        assert_eq!(parse_ready_file("{"), None);
    }

    #[test]
    fn vm_rss_parses() {
        let status = "Name:\tredis-server\nVmPeak:\t  100 kB\nVmRSS:\t    2048 kB\nThreads: 4\n";
        assert_eq!(parse_vm_rss(status), Some(2 << 20));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }

    #[test]
    fn own_rss_is_readable() {
        let rss = rss_bytes(std::process::id()).expect("own status");
        assert!(rss > 1 << 20, "{rss}");
    }

    /// Starts a real Redis when one is installed; CI machines without it run the scripted
    /// protocol tests of `resp` instead.
    #[tokio::test]
    #[ignore = "needs redis-server (bash bench/setup.sh); run with --ignored"]
    async fn redis_round_trip() {
        let binary = redis_binary(None).expect("redis-server installed");
        let server = RedisServer::start(&RedisOptions {
            binary,
            fsync_always: false,
            dir: None,
        })
        .await
        .expect("redis starts");
        let mut conn = server.connect().await.expect("connect");
        let keys = [1u64, 2, 3];
        let rows: Vec<u8> = (0..12u8).collect();
        conn.mset("t", &keys, &rows, 2).await.expect("mset");
        assert_eq!(conn.dbsize().await.expect("dbsize"), 3);
        let mut out = [0u8; 16];
        let mut found = [false; 4];
        let hits = conn
            .mget_into("t", &[3, 9, 1, 2], &mut out, &mut found)
            .await
            .expect("mget");
        assert_eq!(hits, 3);
        assert_eq!(found, [true, false, true, true]);
        assert_eq!(&out[..4], &rows[8..12]);
        assert_eq!(&out[8..12], &rows[..4]);
        assert!(conn.info_u64("memory", "used_memory").await.expect("info") > 0);
        assert!(rss_bytes(server.pid()).expect("rss") > 0);
    }
}
