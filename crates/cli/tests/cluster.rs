//! End-to-end tests of cluster mode: a real etcd and several real `hopps serve` processes on
//! 127.0.0.1, one model of 8 shards with R = 2, and a `ClusterClient` looking rows up without
//! pause in background tasks while nodes die, drain, join, lose etcd or switch versions.
//!
//! Every row a lookup returns is checked against the value its key has at the version the
//! response names (values are a function of key and version), so a response that mixes
//! versions, or rows of the wrong key, counts as a failure as much as an error does. Every
//! wait polls with a deadline; a timeout panics with the cluster's records and the nodes' logs.
//!
//! The tests run one at a time (a lock): each starts etcd and three or four nodes, and two
//! clusters at once on a two-core machine would test the scheduler more than hopps.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hopps_client::{ClusterClient, Rows};
use hopps_cluster::testing::EtcdServer;
use hopps_cluster::{ClusterState, Mirror};
use hopps_format::{
    ModelSpec, PublishOptions, Repository, StorageOptions, TableArrays, TableSpec, VersionKind,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

const HOPPS: &str = env!("CARGO_BIN_EXE_hopps");
const MODEL: &str = "m";
const TABLE: &str = "t";
const DIM: u32 = 4;
const SHARDS: u32 = 8;
/// Keys `0..ROWS` exist in every version.
const ROWS: u64 = 4000;
/// Keys per background lookup: enough to touch all 8 shards in nearly every request.
const BATCH: usize = 64;
const REPLICAS: usize = 2;
const LEASE_TTL: Duration = Duration::from_secs(2);

/// The value of float `j` of `key` at `version`: exact in f32 (below 2^22 with quarter steps),
/// different for every (key, version), so a row tells which version it came from.
fn value(version: u64, key: u64, j: u32) -> f32 {
    (version * 100_000 + key) as f32 + j as f32 * 0.25
}

/// The version a row's first float was written by (inverse of [`value`]).
fn version_of(first: f32) -> u64 {
    (first as u64) / 100_000
}

fn rows_of(version: u64, keys: &[u64]) -> Vec<f32> {
    keys.iter()
        .flat_map(|&k| (0..DIM).map(move |j| value(version, k, j)))
        .collect()
}

/// One cluster test at a time (see the module comment). A panicking test poisons the lock;
/// the next one still runs.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime")
}

// --- the model --------------------------------------------------------------------------------

async fn open_repo(path: &Path) -> Repository {
    std::fs::create_dir_all(path).expect("mkdir repo");
    Repository::open(&path.to_string_lossy(), &StorageOptions::default())
        .await
        .expect("open repository")
}

/// Version 1 (full) or a delta `version` that rewrites every key with its values: after it,
/// every row of the model belongs to `version`.
async fn publish(repo: &Repository, version: u64) {
    let keys: Vec<u64> = (0..ROWS).collect();
    let values = rows_of(version, &keys);
    let (kind, create) = if version == 1 {
        (
            VersionKind::Full,
            Some(ModelSpec::new(
                MODEL,
                SHARDS,
                vec![TableSpec::new(TABLE, DIM)],
            )),
        )
    } else {
        (VersionKind::Delta, None)
    };
    let summary = repo
        .publish_arrays(
            MODEL,
            kind,
            &[TableArrays {
                table: TABLE,
                dim: DIM,
                keys: &keys,
                values: &values,
                deleted: None,
            }],
            &PublishOptions {
                create,
                source: "cluster-e2e".into(),
                ..PublishOptions::default()
            },
        )
        .await
        .expect("publish a version");
    assert_eq!(summary.version, version);
}

/// `Ok` when `rows` are exactly the rows of `keys` at `rows.version`; otherwise what differs.
fn check_rows(keys: &[u64], rows: &Rows) -> Result<(), String> {
    if rows.len() != keys.len() || rows.dim != DIM {
        return Err(format!(
            "{} keys asked, {} rows of dim {} returned",
            keys.len(),
            rows.len(),
            rows.dim
        ));
    }
    for (i, &key) in keys.iter().enumerate() {
        let row = rows.row(i).unwrap_or_default();
        let expected = rows_of(rows.version, &[key]);
        if !rows.found[i] || row != expected.as_slice() {
            return Err(format!(
                "response of version {} has key {key} (shard {}) found={} as {row:?}, which is \
                 version {}'s row; expected {expected:?}",
                rows.version,
                hopps_format::shard_of(key, SHARDS),
                rows.found[i],
                row.first().map(|&v| version_of(v)).unwrap_or(0),
            ));
        }
    }
    Ok(())
}

// --- nodes ------------------------------------------------------------------------------------

/// A running `hopps serve` in cluster mode; SIGKILLed when dropped.
struct Node {
    id: String,
    child: Child,
    grpc: String,
    admin: String,
    log: PathBuf,
}

impl Node {
    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGKILL: no shutdown, no lease revoke — a crash.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A minimal HTTP/1.1 GET; (0, "") when nothing answers.
async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let response = String::from_utf8_lossy(&response).to_string();
        let status = response.split(' ').nth(1)?.parse().ok()?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or((0, String::new()))
}

/// The sum of every series of `name` whose labels include all of `labels`, from Prometheus
/// text; `None` when there is no such series.
fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, v)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n != name
            || !labels
                .iter()
                .all(|(k, val)| rest.contains(&format!("{k}=\"{val}\"")))
        {
            continue;
        }
        if let Ok(v) = v.parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Lookup requests node `node` has answered for the model (any code), from its /metrics.
async fn lookups_served(node: &Node) -> f64 {
    let (status, body) = http_get(&node.admin, "/metrics").await;
    assert_eq!(status, 200, "GET /metrics of {}", node.id);
    metric_sum(&body, "hopps_lookup_requests_total", &[("model", MODEL)]).unwrap_or(0.0)
}

/// A `hopps` command with a deadline; the environment cannot point it anywhere else.
async fn hopps(args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(HOPPS);
    cmd.args(args)
        .env_remove("HOPPS_ADDR")
        .env_remove("HOPPS_ETCD_ENDPOINTS")
        .env_remove("HOPPS_CLUSTER")
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("hopps {args:?} did not exit within 120 s"))
        .expect("run hopps")
}

/// Runs a command that must succeed; returns its stdout.
async fn ok(args: &[&str]) -> String {
    let out = hopps(args).await;
    assert!(
        out.status.success(),
        "hopps {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Runs a command that must fail; returns its stderr.
async fn fails(args: &[&str]) -> String {
    let out = hopps(args).await;
    assert!(
        !out.status.success(),
        "hopps {args:?} should fail; printed {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).expect("utf-8")
}

fn json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

// --- the cluster ------------------------------------------------------------------------------

/// etcd, a model repository with version 1 of model `m`, the nodes started so far, and a mirror
/// of the cluster's records for the test's own checks.
struct Cluster {
    name: String,
    etcd: EtcdServer,
    dir: tempfile::TempDir,
    repo: Repository,
    mirror: Mirror,
    nodes: BTreeMap<String, Node>,
}

impl Cluster {
    /// A cluster of nodes n1, n2 and n3, every shard replicated `REPLICAS` times at version 1.
    async fn start_three(name: &str) -> Cluster {
        let mut c = Cluster::start(name).await;
        for id in ["n1", "n2", "n3"] {
            c.add_node(id).await;
        }
        assert_eq!(c.wait_replicated(REPLICAS, 60).await, 1);
        c
    }

    /// `workers` tasks of continuous, checked lookups through a cluster client, once they have
    /// succeeded 50 times.
    async fn load(&self, workers: usize) -> Load {
        let client = self.client().await;
        let load = Load::start(&client, workers);
        load.wait_ok(self, 50, 30).await;
        load
    }

    async fn start(name: &str) -> Cluster {
        let etcd = EtcdServer::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = open_repo(&dir.path().join("repo")).await;
        publish(&repo, 1).await;
        let mirror = Mirror::start(vec![etcd.endpoint()], name);
        mirror
            .synced(Duration::from_secs(10))
            .await
            .expect("mirror of the test cluster");
        Cluster {
            name: name.to_string(),
            etcd,
            dir,
            repo,
            mirror,
            nodes: BTreeMap::new(),
        }
    }

    fn endpoint(&self) -> String {
        self.etcd.endpoint()
    }

    /// Starts node `id` with its own data directory, talking to etcd directly.
    async fn add_node(&mut self, id: &str) {
        let etcd = self.endpoint();
        self.add_node_via(id, &etcd).await;
    }

    /// Starts node `id` talking to etcd at `etcd` (a proxy, for the partition test) and waits
    /// until it is registered.
    async fn add_node_via(&mut self, id: &str, etcd: &str) {
        let log = self.dir.path().join(format!("{id}.log"));
        let ready = self.dir.path().join(format!("{id}.ready.json"));
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(HOPPS)
            .arg("serve")
            .arg("--repo")
            .arg(self.dir.path().join("repo"))
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("{id}-data")))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--node-id", id, "--poll-interval", "100ms"])
            .args(["--etcd", etcd, "--cluster", &self.name])
            .args(["--replicas", &REPLICAS.to_string(), "--lease-ttl", "2s"])
            .arg("--ready-file")
            .arg(&ready)
            .env_remove("HOPPS_ADDR")
            .env_remove("HOPPS_ETCD_ENDPOINTS")
            .env_remove("HOPPS_CLUSTER")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .expect("spawn hopps serve");
        let mut node = Node {
            id: id.to_string(),
            child,
            grpc: String::new(),
            admin: String::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // The ready file is written then renamed into place: whole once it exists.
            if let Ok(text) = std::fs::read_to_string(&ready) {
                let v = json(&text);
                node.grpc = v["grpc"].as_str().expect("grpc address").to_string();
                node.admin = v["admin"].as_str().expect("admin address").to_string();
                break;
            }
            assert!(
                node.running(),
                "hopps serve {id} exited before listening; its log:\n{}",
                node.log_tail(40)
            );
            assert!(
                Instant::now() < deadline,
                "hopps serve {id} did not listen within 60 s; its log:\n{}",
                node.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.nodes.insert(id.to_string(), node);
        let want = id.to_string();
        self.wait(&format!("node {id} registers"), 30, move |s| {
            s.nodes
                .contains_key(&want)
                .then_some(())
                .ok_or_else(|| format!("no nodes/{want} record"))
        })
        .await;
    }

    fn node(&self, id: &str) -> &Node {
        self.nodes.get(id).unwrap_or_else(|| panic!("no node {id}"))
    }

    /// The records and the last lines of every node's log, for a failure message.
    fn dump(&self) -> String {
        let mut out = describe(&self.mirror.state());
        for node in self.nodes.values() {
            out.push_str(&format!(
                "\n--- log of {} (last 25 lines) ---\n{}",
                node.id,
                node.log_tail(25)
            ));
        }
        out
    }

    /// Waits until `check` accepts the mirrored state (polls on every change and every 100 ms),
    /// at most `secs` seconds; panics with the last reason and the cluster's records.
    async fn wait<T>(
        &self,
        what: &str,
        secs: u64,
        check: impl Fn(&ClusterState) -> Result<T, String>,
    ) -> T {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut rx = self.mirror.subscribe();
        loop {
            let state = self.mirror.state();
            let reason = match check(&state) {
                Ok(v) => return v,
                Err(reason) => reason,
            };
            let now = Instant::now();
            if now >= deadline {
                panic!("{what}: not within {secs} s ({reason})\n{}", self.dump());
            }
            let step = (deadline - now).min(Duration::from_millis(100));
            let _ = tokio::time::timeout(step, rx.changed()).await;
        }
    }

    /// Waits until every shard has `r` replicas that hold it and can read the serving version,
    /// and returns the serving version.
    async fn wait_replicated(&self, r: usize, secs: u64) -> u64 {
        self.wait(
            &format!("every shard has {r} ready replicas"),
            secs,
            move |s| replicated(s, r),
        )
        .await
    }

    /// Waits until the serving record names `version`.
    async fn wait_serving(&self, version: u64, secs: u64) -> hopps_cluster::Serving {
        self.wait(
            &format!("serving/{MODEL} = {version}"),
            secs,
            move |s| match s.serving.get(MODEL) {
                Some(r) if r.version == version => Ok(r.clone()),
                other => Err(format!("serving record {other:?}")),
            },
        )
        .await
    }

    /// The node that runs the controller: the one whose `hopps_cluster_leader` gauge is 1.
    /// Exactly one node may claim it.
    async fn leader(&self) -> String {
        let ids: Vec<String> = self.nodes.keys().cloned().collect();
        self.leader_among(&ids).await
    }

    async fn client(&self) -> ClusterClient {
        ClusterClient::connect(&self.endpoint(), &self.name)
            .await
            .unwrap_or_else(|e| panic!("ClusterClient::connect: {e}\n{}", self.dump()))
    }
}

/// `Ok(serving version)` when every shard of the model has at least `r` alive replicas that
/// hold it and can read the serving version; otherwise why not.
fn replicated(s: &ClusterState, r: usize) -> Result<u64, String> {
    let serving = s
        .serving_version(MODEL)
        .ok_or_else(|| format!("no serving/{MODEL} record"))?;
    let p = s
        .placements
        .get(MODEL)
        .ok_or_else(|| format!("no placement/{MODEL} record"))?;
    if p.shards != SHARDS {
        return Err(format!("placement has {} shards, want {SHARDS}", p.shards));
    }
    for shard in 0..SHARDS {
        let ready: Vec<&str> = s
            .replicas(MODEL, shard, Some(serving))
            .iter()
            .map(|n| n.id.as_str())
            .collect();
        if ready.len() < r {
            return Err(format!(
                "shard {shard} has ready replicas {ready:?} of {:?}",
                p.assignment.get(shard as usize)
            ));
        }
    }
    Ok(serving)
}

/// Shards `node` reports held (empty when it has no report for the model).
fn held(s: &ClusterState, node: &str) -> Vec<u32> {
    s.reports
        .get(MODEL)
        .and_then(|r| r.get(node))
        .map(|r| r.held.clone())
        .unwrap_or_default()
}

/// Whether any placement lists `node`.
fn placed_on(s: &ClusterState, node: &str) -> bool {
    s.placements
        .values()
        .any(|p| p.assignment.iter().any(|ns| ns.iter().any(|n| n == node)))
}

/// The records of a cluster in a few lines.
fn describe(s: &ClusterState) -> String {
    let mut out = format!(
        "cluster state at revision {} (connected {}):\n  nodes: {:?}\n  drains: {:?}\n  serving: \
         {:?}\n",
        s.revision,
        s.connected,
        s.nodes.keys().collect::<Vec<_>>(),
        s.drains,
        s.serving.values().collect::<Vec<_>>()
    );
    for p in s.placements.values() {
        out.push_str(&format!(
            "  placement {} epoch {} R {}: {:?}\n",
            p.model, p.epoch, p.replicas, p.assignment
        ));
    }
    for (model, reports) in &s.reports {
        for (node, r) in reports {
            out.push_str(&format!(
                "  report {model}/{node}: state {} held {:?} loading {:?} serving {:?} readable \
                 {:?} staged {:?} error {:?}\n",
                r.state, r.held, r.loading, r.serving, r.readable, r.staged, r.error
            ));
        }
    }
    out
}

// --- continuous lookups -----------------------------------------------------------------------

#[derive(Default)]
struct LoadStats {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Responses whose rows are not all the rows of the version the response names.
    mixed: AtomicU64,
    /// The version of the newest successful response.
    last_version: AtomicU64,
    /// First problems seen (errors and mixed responses), with the time since the load started.
    problems: Mutex<Vec<String>>,
    /// Successful responses per version.
    versions: Mutex<BTreeMap<u64, u64>>,
}

/// Lookups of random keys through a `ClusterClient`, in a closed loop per worker.
struct Load {
    stop: Arc<AtomicBool>,
    stats: Arc<LoadStats>,
    workers: Vec<JoinHandle<()>>,
    client: ClusterClient,
}

/// What a load did.
#[derive(Debug)]
struct LoadSummary {
    ok: u64,
    failed: u64,
    mixed: u64,
    problems: Vec<String>,
    versions: BTreeMap<u64, u64>,
}

impl LoadSummary {
    /// No failed lookup and no mixed response, and the load did run.
    fn assert_clean(&self, what: &str) {
        assert!(
            self.failed == 0 && self.mixed == 0,
            "{what}: {} failed lookups and {} mixed responses of {}; first problems:\n{}",
            self.failed,
            self.mixed,
            self.ok + self.failed + self.mixed,
            self.problems.join("\n")
        );
        assert!(self.ok > 0, "{what}: no lookup succeeded");
    }
}

impl Load {
    fn start(client: &ClusterClient, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(LoadStats::default());
        let started = Instant::now();
        let workers = (0..workers)
            .map(|w| {
                let client = client.clone();
                let stop = stop.clone();
                let stats = stats.clone();
                tokio::spawn(async move {
                    let mut rng = SmallRng::seed_from_u64(w as u64 + 1);
                    while !stop.load(Ordering::Relaxed) {
                        let keys: Vec<u64> =
                            (0..BATCH).map(|_| rng.random_range(0..ROWS)).collect();
                        let problem = match client.lookup(MODEL, TABLE, &keys).await {
                            Ok(rows) => match check_rows(&keys, &rows) {
                                Ok(()) => {
                                    stats.ok.fetch_add(1, Ordering::Relaxed);
                                    stats.last_version.store(rows.version, Ordering::Relaxed);
                                    *stats
                                        .versions
                                        .lock()
                                        .unwrap()
                                        .entry(rows.version)
                                        .or_default() += 1;
                                    None
                                }
                                Err(e) => {
                                    stats.mixed.fetch_add(1, Ordering::Relaxed);
                                    Some(format!("mixed response: {e}"))
                                }
                            },
                            Err(e) => {
                                stats.failed.fetch_add(1, Ordering::Relaxed);
                                Some(format!("failed lookup: {e}"))
                            }
                        };
                        if let Some(p) = problem {
                            let mut problems = stats.problems.lock().unwrap();
                            if problems.len() < 20 {
                                problems.push(format!(
                                    "  at {:.2} s: {p}",
                                    started.elapsed().as_secs_f64()
                                ));
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            stats,
            workers,
            client: client.clone(),
        }
    }

    fn ok(&self) -> u64 {
        self.stats.ok.load(Ordering::Relaxed)
    }

    fn problems(&self) -> u64 {
        self.stats.failed.load(Ordering::Relaxed) + self.stats.mixed.load(Ordering::Relaxed)
    }

    /// Waits until `more` further lookups succeeded (so the load demonstrably ran through
    /// whatever the test just did), at most `secs` seconds.
    async fn wait_ok(&self, cluster: &Cluster, more: u64, secs: u64) {
        let target = self.ok() + more;
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.ok() < target {
            assert!(
                Instant::now() < deadline,
                "{more} more successful lookups did not happen within {secs} s ({} ok, {} \
                 failed or mixed so far; first problems:\n{})\n{}",
                self.ok(),
                self.problems(),
                self.stats.problems.lock().unwrap().join("\n"),
                cluster.dump()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a successful response has version `version`.
    async fn wait_version(&self, cluster: &Cluster, version: u64, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.stats.last_version.load(Ordering::Relaxed) != version {
            assert!(
                Instant::now() < deadline,
                "lookups did not return version {version} within {secs} s (last {}; versions \
                 seen {:?})\n{}",
                self.stats.last_version.load(Ordering::Relaxed),
                self.stats.versions.lock().unwrap(),
                cluster.dump()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) -> LoadSummary {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.await.expect("a load worker panicked");
        }
        let s = &self.stats;
        let summary = LoadSummary {
            ok: s.ok.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            mixed: s.mixed.load(Ordering::Relaxed),
            problems: s.problems.lock().unwrap().clone(),
            versions: s.versions.lock().unwrap().clone(),
        };
        eprintln!("load: {summary:?}; client stats: {:?}", self.client.stats());
        summary
    }
}

// --- a TCP proxy that can be cut ---------------------------------------------------------------

/// Forwards TCP connections to `target` until cut: then it closes every connection and closes
/// each new one as soon as it is accepted, as a network partition would look to the node.
struct Proxy {
    addr: String,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = {
            let cut = cut.clone();
            let connections = connections.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    if cut.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let target = target.clone();
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(&target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().unwrap().push(task.abort_handle());
                }
            })
        };
        Proxy {
            addr,
            cut,
            connections,
            accept,
        }
    }

    /// Drops every connection and refuses new ones.
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Forwards new connections again.
    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

// --- tests --------------------------------------------------------------------------------------

/// Three nodes, R = 2, the controller's node killed with SIGKILL under continuous lookups: no
/// lookup fails, another node takes over the controller, and every shard has two ready
/// replicas again on the two nodes left.
#[test]
fn kill_9_of_one_node_fails_no_lookup_and_re_replicates() {
    let _serial = serial();
    runtime().block_on(async {
        let mut c = Cluster::start_three("kill9").await;
        let load = c.load(2).await;

        // Kill the leader: the harder case (the controller itself must fail over).
        let victim = c.leader().await;
        let killed_at = Instant::now();
        c.nodes.get_mut(&victim).expect("victim").kill9();
        load.wait_ok(&c, 20, 30).await;

        let v = victim.clone();
        c.wait("the killed node's lease expires", 20, move |s| {
            (!s.nodes.contains_key(&v))
                .then_some(())
                .ok_or_else(|| format!("nodes/{v} still there"))
        })
        .await;
        c.wait_replicated(REPLICAS, 45).await;
        let survivors: Vec<String> = c.nodes.keys().filter(|n| **n != victim).cloned().collect();
        let state = c.mirror.state();
        for n in &survivors {
            assert_eq!(
                held(&state, n),
                (0..SHARDS).collect::<Vec<_>>(),
                "with two nodes left and R = 2, {n} holds every shard\n{}",
                describe(&state)
            );
        }
        eprintln!(
            "re-replicated {:.2} s after kill -9 of {victim}",
            killed_at.elapsed().as_secs_f64()
        );
        let new_leader = c.leader_among(&survivors).await;
        assert_ne!(new_leader, victim);
        // The new controller's shard-health gauges (what the alerts read) settle at zero.
        let admin = c.node(&new_leader).admin.clone();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, body) = http_get(&admin, "/metrics").await;
            let gauges = [
                "hopps_cluster_shards_under_replicated",
                "hopps_cluster_shards_unavailable",
            ]
            .map(|g| metric_sum(&body, g, &[("model", MODEL)]));
            if gauges == [Some(0.0), Some(0.0)] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{new_leader} should export zero under-replicated and unavailable shards once \
                 re-replicated; it exports {gauges:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        load.wait_ok(&c, 100, 30).await;
        load.stop()
            .await
            .assert_clean(&format!("kill -9 of {victim} with R = 2"));
    });
}

impl Cluster {
    /// The leader among `ids` (the others may be dead).
    async fn leader_among(&self, ids: &[String]) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut leaders = Vec::new();
            for id in ids {
                let (_, body) = http_get(&self.node(id).admin, "/metrics").await;
                if metric_sum(&body, "hopps_cluster_leader", &[]) == Some(1.0) {
                    leaders.push(id.clone());
                }
            }
            if leaders.len() == 1 {
                return leaders.remove(0);
            }
            assert!(
                Instant::now() < deadline,
                "exactly one of {ids:?} should report hopps_cluster_leader 1 within 20 s; these \
                 do: {leaders:?}\n{}",
                self.dump()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `hopps node drain` empties a node under continuous lookups (make before break), a fourth
/// node joins and receives shards, `hopps node undrain` makes the first eligible again: no
/// lookup fails at any point.
#[test]
fn drain_and_add_nodes_under_load_fail_no_lookup() {
    let _serial = serial();
    runtime().block_on(async {
        let mut c = Cluster::start_three("drain").await;
        let load = c.load(2).await;
        assert!(
            !held(&c.mirror.state(), "n1").is_empty(),
            "n1 holds shards before the drain\n{}",
            c.dump()
        );

        // An unknown node is refused, naming the known ones.
        let etcd = c.endpoint();
        let err = fails(&[
            "node",
            "drain",
            "n9",
            "--etcd",
            &etcd,
            "--cluster",
            &c.name,
            "--no-wait",
        ])
        .await;
        assert!(err.contains("n9") && err.contains("n1"), "{err}");

        let out = ok(&[
            "node",
            "drain",
            "n1",
            "--etcd",
            &etcd,
            "--cluster",
            &c.name,
            "--timeout",
            "60s",
        ])
        .await;
        eprintln!("hopps node drain n1:\n{out}");
        // The command saw the release; the test's mirror may be a moment behind it.
        let state = c
            .wait("drain/n1 is released", 10, |s| {
                s.drains
                    .get("n1")
                    .is_some_and(|d| d.released)
                    .then(|| Arc::new(s.clone()))
                    .ok_or_else(|| format!("drain/n1 is {:?}", s.drains.get("n1")))
            })
            .await;
        // The controller releases a node only after no placement lists it, and only once the
        // replicas that replace it hold their shards (make before break).
        assert!(
            !placed_on(&state, "n1"),
            "released, yet a placement lists n1\n{}",
            describe(&state)
        );
        replicated(&state, REPLICAS).unwrap_or_else(|e| {
            panic!("after the drain: {e}\n{}", describe(&state));
        });
        c.wait("the drained node unloads its shards", 30, |s| {
            let h = held(s, "n1");
            h.is_empty().then_some(()).ok_or(format!("n1 holds {h:?}"))
        })
        .await;
        load.wait_ok(&c, 50, 30).await;

        // A fourth node joins: the placement moves shards onto it.
        c.add_node("n4").await;
        c.wait("n4 holds shards and every shard is replicated", 60, |s| {
            replicated(s, REPLICAS)?;
            let h = held(s, "n4");
            if h.is_empty() {
                return Err("n4 holds nothing".into());
            }
            if !held(s, "n1").is_empty() || placed_on(s, "n1") {
                return Err("drained n1 got shards back".into());
            }
            Ok(())
        })
        .await;
        load.wait_ok(&c, 50, 30).await;

        // Undrain: n1 is eligible again and gets shards back.
        ok(&[
            "node",
            "undrain",
            "n1",
            "--etcd",
            &etcd,
            "--cluster",
            &c.name,
        ])
        .await;
        c.wait("undrained n1 holds shards again", 60, |s| {
            if s.drains.contains_key("n1") {
                return Err("drain/n1 still there".into());
            }
            replicated(s, REPLICAS)?;
            let h = held(s, "n1");
            (!h.is_empty())
                .then_some(())
                .ok_or_else(|| "n1 holds nothing".to_string())
        })
        .await;
        load.wait_ok(&c, 50, 30).await;
        load.stop()
            .await
            .assert_clean("drain of n1, join of n4, undrain of n1");
    });
}

/// Deltas switch the cluster's version and `hopps model rollback` switches it back, under
/// continuous lookups: no response mixes versions, and the serving record follows each switch.
#[test]
fn version_switches_and_rollback_never_mix_versions() {
    let _serial = serial();
    runtime().block_on(async {
        let c = Cluster::start_three("versions").await;
        let load = c.load(3).await;

        for version in [2, 3] {
            publish(&c.repo, version).await;
            let record = c.wait_serving(version, 60).await;
            assert_eq!(record.previous, Some(version - 1), "{record:?}");
            load.wait_version(&c, version, 30).await;
            load.wait_ok(&c, 50, 30).await;
        }

        let etcd = c.endpoint();
        let out = ok(&[
            "model",
            "rollback",
            "--etcd",
            &etcd,
            "--cluster",
            &c.name,
            "--model",
            MODEL,
            "--to",
            "2",
            "--timeout",
            "60s",
        ])
        .await;
        assert!(out.contains('2'), "rollback output names the target: {out}");
        // The command returns once the cluster serves 2 (the test's mirror may be a moment
        // behind it); the record names the version it replaced.
        let record = c.wait_serving(2, 10).await;
        assert_eq!(record.previous, Some(3), "after rollback: {record:?}");
        // Every placed node flips to 2.
        c.wait("every node serves version 2", 30, |s| {
            let reports = s.reports.get(MODEL).ok_or("no reports")?;
            for (node, r) in reports {
                if s.nodes.contains_key(node) && !r.held.is_empty() && r.serving != Some(2) {
                    return Err(format!("{node} serves {:?}", r.serving));
                }
            }
            Ok(())
        })
        .await;
        load.wait_version(&c, 2, 30).await;
        load.wait_ok(&c, 100, 30).await;
        let rows = load
            .client
            .lookup(MODEL, TABLE, &[0, 1, ROWS - 1])
            .await
            .expect("lookup after the rollback");
        assert_eq!(rows.version, 2);
        check_rows(&[0, 1, ROWS - 1], &rows).expect("rows of version 2");

        let summary = load.stop().await;
        summary.assert_clean("switches 1 -> 2 -> 3 and rollback to 2");
        for v in [1, 2, 3] {
            assert!(
                summary.versions.contains_key(&v),
                "no lookup saw version {v}: {:?}",
                summary.versions
            );
        }
    });
}

/// etcd is killed and restarted under continuous lookups: the data plane keeps routing by the
/// placement it has while etcd is away (longer than the lease TTL), and the cluster is whole
/// again afterwards.
#[test]
fn lookups_continue_while_etcd_restarts() {
    let _serial = serial();
    runtime().block_on(async {
        let mut c = Cluster::start_three("etcd-restart").await;
        let load = c.load(2).await;

        c.etcd.kill();
        let down = Instant::now();
        // etcd stays away for three lease TTLs while lookups go on.
        let outage = LEASE_TTL * 3;
        let before = load.ok();
        let deadline = down + outage + Duration::from_secs(30);
        while down.elapsed() < outage || load.ok() < before + 100 {
            assert!(
                Instant::now() < deadline,
                "lookups stalled while etcd was down: {} ok since the kill, {} failed or mixed",
                load.ok() - before,
                load.problems()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            load.problems(),
            0,
            "lookups failed while etcd was down: {:?}",
            load.stats.problems.lock().unwrap()
        );
        eprintln!(
            "{} lookups succeeded in {:.1} s without etcd",
            load.ok() - before,
            down.elapsed().as_secs_f64()
        );

        c.etcd.restart().await;
        c.wait("the cluster is whole after etcd restarts", 60, |s| {
            if !s.connected {
                return Err("mirror not reconnected".into());
            }
            let alive: Vec<&String> = s.nodes.keys().collect();
            if alive.len() != 3 {
                return Err(format!("alive nodes {alive:?}"));
            }
            replicated(s, REPLICAS).map(|_| ())
        })
        .await;
        load.wait_ok(&c, 100, 30).await;
        load.stop().await.assert_clean("etcd kill and restart");
    });
}

/// A node cut off from etcd (its etcd connection goes through a proxy the test cuts) loses its
/// lease: its record disappears, clients stop routing to it (its lookup counter stays flat
/// while lookups go on), its shards get new replicas, and no lookup fails. When the partition
/// heals the node registers again.
#[test]
fn a_partitioned_node_stops_being_routed_to() {
    let _serial = serial();
    runtime().block_on(async {
        let mut c = Cluster::start("partition").await;
        let proxy = Proxy::start(c.endpoint()).await;
        c.add_node("n1").await;
        c.add_node("n2").await;
        let via = proxy.addr.clone();
        c.add_node_via("n3", &via).await;
        c.wait("every shard replicated and n3 holds shards", 60, |s| {
            replicated(s, REPLICAS)?;
            let h = held(s, "n3");
            (!h.is_empty())
                .then_some(())
                .ok_or_else(|| "n3 holds nothing".to_string())
        })
        .await;
        let client = c.client().await;
        let load = Load::start(&client, 2);
        load.wait_ok(&c, 50, 30).await;

        // n3 serves a share of the lookups before the partition.
        let start = lookups_served(c.node("n3")).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while lookups_served(c.node("n3")).await <= start {
            assert!(
                Instant::now() < deadline,
                "no lookup reached n3 in 20 s before the partition\n{}",
                c.dump()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        proxy.cut();
        let cut_at = Instant::now();
        c.wait("n3's lease expires", 20, |s| {
            (!s.nodes.contains_key("n3"))
                .then_some(())
                .ok_or_else(|| "nodes/n3 still there".to_string())
        })
        .await;
        eprintln!(
            "n3 dropped out {:.2} s after the partition",
            cut_at.elapsed().as_secs_f64()
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.state().nodes.contains_key("n3") {
            assert!(
                Instant::now() < deadline,
                "the ClusterClient still lists n3 10 s after its record went"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Requests sent just before the client saw the change may still land: let them finish.
        load.wait_ok(&c, 20, 30).await;
        let flat = lookups_served(c.node("n3")).await;
        load.wait_ok(&c, 200, 30).await;
        let after = lookups_served(c.node("n3")).await;
        assert_eq!(
            after,
            flat,
            "n3 answered {} lookups after its lease expired",
            after - flat
        );
        c.wait_replicated(REPLICAS, 45).await;
        let state = c.mirror.state();
        assert!(
            !placed_on(&state, "n3"),
            "a placement still lists the lost n3\n{}",
            describe(&state)
        );
        load.wait_ok(&c, 50, 30).await;

        // The partition heals: n3 registers again under a new lease.
        proxy.restore();
        c.wait("n3 registers again after the partition heals", 30, |s| {
            s.nodes
                .contains_key("n3")
                .then_some(())
                .ok_or_else(|| "no nodes/n3".to_string())
        })
        .await;
        c.wait_replicated(REPLICAS, 45).await;
        load.wait_ok(&c, 50, 30).await;
        load.stop()
            .await
            .assert_clean("a node partitioned from etcd, then healed");
    });
}

/// Node ids in a JSON value: an array of objects with `id`, an object with such an array under
/// `nodes`, or an object keyed by node id.
fn node_ids(v: &Value) -> BTreeSet<String> {
    match v {
        Value::Array(items) => items
            .iter()
            .filter_map(|n| n.get("id").and_then(Value::as_str).map(str::to_string))
            .collect(),
        Value::Object(map) => match map.get("nodes") {
            Some(nodes) => node_ids(nodes),
            None => map.keys().cloned().collect(),
        },
        _ => BTreeSet::new(),
    }
}

/// The cluster forms of the client commands: `node list`, `status`, `lookup`, `model replicas`;
/// and their clear errors on bad input.
#[test]
fn cli_reads_and_changes_the_cluster() {
    let _serial = serial();
    runtime().block_on(async {
        let mut c = Cluster::start("cli").await;
        for id in ["n1", "n2", "n3"] {
            c.add_node(id).await;
        }
        c.wait_replicated(REPLICAS, 60).await;
        let etcd = c.endpoint();
        let name = c.name.clone();
        let cl = ["--etcd", etcd.as_str(), "--cluster", name.as_str()];
        let want: BTreeSet<String> = ["n1", "n2", "n3"].map(String::from).into();

        let list = json(&ok(&[&["node", "list", "--json"][..], &cl[..]].concat()).await);
        assert_eq!(node_ids(&list), want, "node list --json: {list}");
        let text = ok(&[&["node", "list"][..], &cl[..]].concat()).await;
        for id in &want {
            assert!(text.contains(id.as_str()), "node list names {id}: {text}");
        }

        let status = json(&ok(&[&["status", "--json"][..], &cl[..]].concat()).await);
        assert_eq!(status["cluster"], Value::from(name.as_str()), "{status}");
        assert_eq!(node_ids(&status["nodes"]), want, "status nodes: {status}");
        let models = &status["models"];
        let has_model = match models {
            Value::Array(ms) => ms
                .iter()
                .any(|m| m.get("model").or_else(|| m.get("name")) == Some(&Value::from(MODEL))),
            Value::Object(ms) => ms.contains_key(MODEL),
            _ => false,
        };
        assert!(has_model, "status models has {MODEL}: {status}");

        let keys: Vec<u64> = vec![0, 1, 2, 17, ROWS - 1];
        let key_args: Vec<String> = keys.iter().map(u64::to_string).collect();
        let mut args: Vec<&str> = vec!["lookup", "--model", MODEL, "--table", TABLE, "--json"];
        args.extend(cl);
        args.extend(key_args.iter().map(String::as_str));
        let v = json(&ok(&args).await);
        assert_eq!(v["version"], Value::from(1), "{v}");
        let rows = v["rows"].as_array().expect("rows");
        assert_eq!(rows.len(), keys.len(), "{v}");
        for (row, &key) in rows.iter().zip(&keys) {
            assert_eq!(row["key"], Value::from(key), "{v}");
            assert_eq!(row["found"], Value::Bool(true), "{v}");
            let values: Vec<f32> = row["values"]
                .as_array()
                .expect("values")
                .iter()
                .map(|x| x.as_f64().expect("float") as f32)
                .collect();
            assert_eq!(values, rows_of(1, &[key]), "key {key}");
        }

        // Per-model replicas: R = 3 puts every shard on every node.
        ok(&[
            &["model", "replicas", "--model", MODEL, "--replicas", "3"][..],
            &cl[..],
        ]
        .concat())
        .await;
        c.wait_replicated(3, 60).await;
        let err = fails(
            &[
                &["model", "replicas", "--model", MODEL, "--replicas", "0"][..],
                &cl[..],
            ]
            .concat(),
        )
        .await;
        assert!(err.contains("replicas"), "{err}");

        // Bad input: each error names what to fix.
        let err = fails(&[
            "lookup", "--etcd", &etcd, "--model", MODEL, "--table", TABLE, "1",
        ])
        .await;
        assert!(err.contains("--cluster"), "{err}");
        let err = fails(&[
            "lookup",
            "--addr",
            "127.0.0.1:1",
            "--etcd",
            &etcd,
            "--cluster",
            &name,
            "--model",
            MODEL,
            "--table",
            TABLE,
            "1",
        ])
        .await;
        assert!(err.contains("--addr") && err.contains("--etcd"), "{err}");
        let err = fails(
            &[
                &["lookup", "--model", "nope", "--table", TABLE, "1"][..],
                &cl[..],
            ]
            .concat(),
        )
        .await;
        assert!(err.contains("nope"), "{err}");
        let err = fails(&["node", "list", "--etcd", &etcd, "--cluster", "no/such"]).await;
        assert!(err.contains("no/such"), "{err}");
        drop(c);
    });
}

/// The row check the load relies on: it accepts exactly the rows of the response's version and
/// names a row of another version (a mixed response) or of the wrong key.
#[test]
fn the_row_check_catches_mixed_versions_and_wrong_rows() {
    let keys = [5, 17, ROWS - 1];
    let good = Rows {
        version: 2,
        dim: DIM,
        values: rows_of(2, &keys),
        found: vec![true; 3],
    };
    assert_eq!(check_rows(&keys, &good), Ok(()));

    let mut mixed = good.clone();
    mixed.values[DIM as usize..2 * DIM as usize].copy_from_slice(&rows_of(3, &[17]));
    let err = check_rows(&keys, &mixed).unwrap_err();
    assert!(
        err.contains("key 17") && err.contains("version 3's row"),
        "{err}"
    );

    let mut swapped = good.clone();
    swapped.values[..DIM as usize].copy_from_slice(&rows_of(2, &[6]));
    assert!(check_rows(&keys, &swapped).is_err());

    let mut missing = good.clone();
    missing.found[2] = false;
    assert!(check_rows(&keys, &missing).is_err());

    let short = Rows {
        found: vec![true; 2],
        values: rows_of(2, &keys[..2]),
        ..good
    };
    assert!(check_rows(&keys, &short).is_err());
}

/// The partition test's proxy forwards bytes, and once cut closes open connections and every
/// new one; restored, it forwards again.
#[test]
fn the_proxy_forwards_until_cut() {
    runtime().block_on(async {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let target = echo.local_addr().expect("echo address").to_string();
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = echo.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let proxy = Proxy::start(target).await;
        async fn round_trip(addr: &str) -> std::io::Result<Vec<u8>> {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(b"ping").await?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await?;
            Ok(buf.to_vec())
        }
        assert_eq!(round_trip(&proxy.addr).await.expect("forwarded"), b"ping");

        let mut open = TcpStream::connect(&proxy.addr).await.expect("connect");
        open.write_all(b"x").await.expect("write");
        let mut one = [0u8; 1];
        open.read_exact(&mut one)
            .await
            .expect("echo before the cut");
        proxy.cut();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest))
            .await
            .expect("the open connection is closed at the cut");
        assert!(read.is_err() || rest.is_empty(), "{read:?} {rest:?}");
        assert!(
            round_trip(&proxy.addr).await.is_err(),
            "new connections fail while cut"
        );

        proxy.restore();
        assert_eq!(round_trip(&proxy.addr).await.expect("restored"), b"ping");
        server.abort();
    });
}
