//! `cluster`: what cluster mode costs and how fast it heals, with real etcd and real
//! `hopps serve` processes on 127.0.0.1.
//!
//! One model (one table) is published once. Three deployments serve it at the same time:
//!
//! - (a) one plain node (no etcd), looked up with `Client`;
//! - (b1) three nodes with R = 1 and (b2) three other nodes with R = 2, both looked up with
//!   `ClusterClient` (each request fans out by shard to the nodes and merges the answers).
//!
//! Every side gets the same precomputed batches of keys from the same number of concurrent
//! closed-loop callers, the same number of requests per round, rounds alternating a b1 b2 a b1
//! b2 ...; the suite reports medians of keys/s and p50/p99 latency per side, and the ratios
//! b/a: the cost of the fan-out on one machine (where the three nodes share the cores of one).
//!
//! (c) Failover: in the R = 2 cluster, a node other than the controller's is killed with
//! SIGKILL; the suite times how long until its lease expires (its record disappears) and until
//! every shard has two ready replicas again, then starts a replacement node and waits for the
//! cluster to settle before the next run. The figures are medians over runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hopps_client::{Client, ClusterClient};
use hopps_cluster::testing::EtcdServer;
use hopps_cluster::{ClusterState, Mirror};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::dataset::{DataSet, HoppsRepo, check_rows};
use crate::measure::{Latencies, Spread};
use crate::report::Record;
use crate::servers::{hopps_binary, runtime};

const MODEL: &str = "cluster";

/// Flags of the cluster suite.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// The `hopps` binary to start. Default: the one beside this harness
    /// (`target/<profile>/hopps`), built first with cargo unless --no-build.
    #[arg(long)]
    pub hopps_bin: Option<PathBuf>,
    /// Do not run cargo to build the `hopps` binary beside this harness first.
    #[arg(long)]
    pub no_build: bool,
    /// Rows of the model. Default: 1000000 (20000 with --quick).
    #[arg(long)]
    pub rows: Option<u64>,
    /// Floats per row.
    #[arg(long, default_value_t = 16)]
    pub dim: u32,
    /// Shards of the model (a power of two).
    #[arg(long, default_value_t = 8)]
    pub shards: u32,
    /// Keys per lookup request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Concurrent closed-loop callers per side.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Lookup requests per side and round. Default: 2000 (100 with --quick).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Rounds per side, alternating the sides. Default: 5 (2 with --quick).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Node losses timed (each: kill -9, lease expiry, re-replication, replacement). Default: 5
    /// (1 with --quick).
    #[arg(long)]
    pub failovers: Option<usize>,
    /// Lease TTL of the nodes (the lower bound of the time to notice a lost node).
    #[arg(long, default_value = "2s")]
    pub lease_ttl: String,
}

pub fn run(args: &ClusterArgs, options: crate::Options) -> anyhow::Result<()> {
    let binary = hopps_binary(args.hopps_bin.as_deref(), !args.no_build)?;
    runtime()?.block_on(suite(&binary, args, options))
}

/// Figures of one side over all rounds.
struct Side {
    name: &'static str,
    nodes: usize,
    replicas: usize,
    keys_per_s: Vec<f64>,
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
}

impl Side {
    fn new(name: &'static str, nodes: usize, replicas: usize) -> Side {
        Side {
            name,
            nodes,
            replicas,
            keys_per_s: Vec::new(),
            p50_us: Vec::new(),
            p99_us: Vec::new(),
        }
    }

    fn add(&mut self, keys: u64, elapsed: Duration, mut latencies: Latencies) {
        self.keys_per_s
            .push(keys as f64 / elapsed.as_secs_f64().max(1e-9));
        if let Some(p) = latencies.quantile_us(0.5) {
            self.p50_us.push(p);
        }
        if let Some(p) = latencies.quantile_us(0.99) {
            self.p99_us.push(p);
        }
    }
}

/// What a lookup goes through.
#[derive(Clone)]
enum Target {
    // Boxed: a `Client` is a few hundred bytes, a `ClusterClient` one pointer.
    Node(Box<Client>),
    Cluster(ClusterClient),
}

impl Target {
    /// The cluster client's counters (`None` for a plain node).
    fn stats(&self) -> Option<hopps_client::ClusterStats> {
        match self {
            Target::Node(_) => None,
            Target::Cluster(c) => Some(c.stats()),
        }
    }

    async fn lookup(&self, keys: &[u64]) -> anyhow::Result<hopps_client::Rows> {
        Ok(match self {
            Target::Node(c) => c.lookup(MODEL, crate::dataset::TABLE, keys).await?,
            Target::Cluster(c) => c.lookup(MODEL, crate::dataset::TABLE, keys).await?,
        })
    }
}

/// Request batches: row indexes (to check answers) and their keys.
struct Work {
    data: DataSet,
    batch: usize,
    indexes: Vec<u64>,
    keys: Vec<u64>,
}

impl Work {
    fn draw(data: DataSet, batch: usize, count: usize) -> Work {
        let mut rng = StdRng::seed_from_u64(0xc1u64);
        let indexes: Vec<u64> = (0..batch * count)
            .map(|_| rng.random_range(0..data.rows))
            .collect();
        let keys = indexes.iter().map(|&i| data.key(i)).collect();
        Work {
            data,
            batch,
            indexes,
            keys,
        }
    }

    fn count(&self) -> usize {
        self.keys.len() / self.batch
    }

    fn keys(&self, b: usize) -> &[u64] {
        &self.keys[b * self.batch..(b + 1) * self.batch]
    }

    fn indexes(&self, b: usize) -> &[u64] {
        &self.indexes[b * self.batch..(b + 1) * self.batch]
    }
}

/// One round of one side: every batch once, spread over `concurrency` closed-loop callers.
/// The first answer of each caller is checked value by value; every answer must find all keys.
async fn round(
    target: &Target,
    work: &Arc<Work>,
    concurrency: usize,
    what: &str,
) -> anyhow::Result<(u64, Duration, Latencies)> {
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for caller in 0..concurrency {
        let target = target.clone();
        let work = work.clone();
        let what = what.to_string();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Latencies::with_capacity(work.count() / concurrency + 1);
            let mut keys = 0u64;
            for (n, b) in (caller..work.count()).step_by(concurrency).enumerate() {
                let sent = Instant::now();
                let rows = target
                    .lookup(work.keys(b))
                    .await
                    .with_context(|| format!("{what}: lookup"))?;
                latencies.record(sent.elapsed());
                anyhow::ensure!(
                    rows.found.iter().all(|&f| f),
                    "{what}: a lookup did not find keys of the model"
                );
                if n == 0 {
                    check_rows(&work.data, work.indexes(b), &rows.values, None, &what)?;
                }
                keys += work.batch as u64;
            }
            anyhow::Ok((keys, latencies))
        }));
    }
    let mut keys = 0;
    let mut all = Latencies::default();
    for t in tasks {
        let (k, l) = t.await.context("a lookup caller panicked")??;
        keys += k;
        all.merge(l);
    }
    Ok((keys, started.elapsed(), all))
}

/// A `hopps serve` process; SIGKILLed when dropped.
struct Node {
    id: String,
    child: Child,
    grpc: String,
    admin: String,
    log: PathBuf,
}

impl Node {
    /// Starts a node and waits for its ready file (bound addresses), not for its models.
    async fn start(
        binary: &Path,
        dir: &Path,
        repo: &Path,
        id: &str,
        cluster: &[String],
    ) -> anyhow::Result<Node> {
        let log = dir.join(format!("{id}.log"));
        let ready = dir.join(format!("{id}.ready.json"));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(binary)
            .arg("serve")
            .arg("--repo")
            .arg(repo)
            .arg("--data-dir")
            .arg(dir.join(format!("{id}-data")))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--node-id", id, "--poll-interval", "100ms"])
            .args(cluster)
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {}; build it with `cargo build --release -p hopps-cli` or give \
                     --hopps-bin",
                    binary.display()
                )
            })?;
        let mut node = Node {
            id: id.to_string(),
            child,
            grpc: String::new(),
            admin: String::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                let v: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("ready file of {id}: {text}"))?;
                node.grpc = v["grpc"].as_str().context("grpc in the ready file")?.into();
                node.admin = v["admin"]
                    .as_str()
                    .context("admin in the ready file")?
                    .into();
                return Ok(node);
            }
            if let Some(status) = node.child.try_wait()? {
                bail!(
                    "hopps serve {id} exited with {status} before listening; see {}",
                    node.log.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "hopps serve {id} did not listen within 60 s; see {}",
                    node.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL, as a crash.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether its `hopps_cluster_leader` gauge is 1.
    async fn is_leader(&self) -> bool {
        let body = http_get(&self.admin, "/metrics").await.unwrap_or_default();
        body.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["hopps_cluster_leader", "1"])
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

async fn http_get(addr: &str, path: &str) -> Option<String> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response).to_string();
        Some(text.split_once("\r\n\r\n")?.1.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
}

/// Waits until `check` accepts the mirrored state, at most `timeout`.
async fn wait_state(
    mirror: &Mirror,
    what: &str,
    timeout: Duration,
    check: impl Fn(&ClusterState) -> Result<(), String>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut rx = mirror.subscribe();
    loop {
        let reason = match check(&mirror.state()) {
            Ok(()) => return Ok(()),
            Err(reason) => reason,
        };
        let now = Instant::now();
        if now >= deadline {
            bail!("{what}: not within {timeout:?} ({reason})");
        }
        let step = (deadline - now).min(Duration::from_millis(20));
        let _ = tokio::time::timeout(step, rx.changed()).await;
    }
}

/// Every shard has `r` alive replicas that hold it and read the serving version.
fn replicated(s: &ClusterState, shards: u32, r: usize) -> Result<(), String> {
    let serving = s.serving_version(MODEL).ok_or("no serving record")?;
    let p = s.placements.get(MODEL).ok_or("no placement")?;
    if p.shards != shards {
        return Err(format!("placement has {} shards", p.shards));
    }
    for shard in 0..shards {
        let n = s.replicas(MODEL, shard, Some(serving)).len();
        if n < r {
            return Err(format!("shard {shard} has {n} ready replicas"));
        }
    }
    Ok(())
}

/// Replicated and settled: no shard mid-move (exactly `r` nodes placed) and nothing loading.
fn settled(s: &ClusterState, shards: u32, r: usize) -> Result<(), String> {
    replicated(s, shards, r)?;
    let p = s.placements.get(MODEL).ok_or("no placement")?;
    if let Some((shard, nodes)) = p.assignment.iter().enumerate().find(|(_, n)| n.len() != r) {
        return Err(format!("shard {shard} placed on {nodes:?}"));
    }
    if let Some(rs) = s.reports.get(MODEL)
        && let Some((node, _)) = rs.iter().find(|(_, r)| !r.loading.is_empty())
    {
        return Err(format!("{node} is loading"));
    }
    Ok(())
}

/// A cluster of `hopps serve` nodes with a mirror of its records.
struct Cluster {
    name: String,
    flags: Vec<String>,
    nodes: Vec<Node>,
    mirror: Mirror,
    started: usize,
}

impl Cluster {
    async fn start(
        binary: &Path,
        dir: &Path,
        repo: &Path,
        etcd: &str,
        name: &str,
        replicas: usize,
        lease_ttl: &str,
    ) -> anyhow::Result<Cluster> {
        let flags: Vec<String> = [
            "--etcd",
            etcd,
            "--cluster",
            name,
            "--replicas",
            &replicas.to_string(),
            "--lease-ttl",
            lease_ttl,
        ]
        .map(String::from)
        .to_vec();
        let mirror = Mirror::start(vec![etcd.to_string()], name);
        mirror.synced(Duration::from_secs(10)).await?;
        let mut c = Cluster {
            name: name.to_string(),
            flags,
            nodes: Vec::new(),
            mirror,
            started: 0,
        };
        for _ in 0..3 {
            c.add(binary, dir, repo).await?;
        }
        Ok(c)
    }

    async fn add(&mut self, binary: &Path, dir: &Path, repo: &Path) -> anyhow::Result<()> {
        self.started += 1;
        let id = format!("{}-n{}", self.name, self.started);
        self.nodes
            .push(Node::start(binary, dir, repo, &id, &self.flags).await?);
        Ok(())
    }

    async fn wait_settled(&self, shards: u32, r: usize, timeout: Duration) -> anyhow::Result<()> {
        let alive = self.nodes.len();
        wait_state(
            &self.mirror,
            &format!("cluster {} settles with {r} replicas per shard", self.name),
            timeout,
            |s| {
                if s.nodes.len() != alive {
                    return Err(format!("{} of {alive} nodes registered", s.nodes.len()));
                }
                settled(s, shards, r)
            },
        )
        .await
    }
}

/// Fails with a clear message when the `etcd` binary is missing.
fn check_etcd() -> anyhow::Result<()> {
    if let Some(p) = std::env::var_os("HOPPS_TEST_ETCD") {
        anyhow::ensure!(
            Path::new(&p).is_file(),
            "HOPPS_TEST_ETCD={} is not a file",
            Path::new(&p).display()
        );
        return Ok(());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|d| d.join("etcd").is_file()) {
        return Ok(());
    }
    bail!(
        "etcd is not installed; install Debian's etcd-server (`apt-get install -y etcd-server`, as \
         scripts/test.sh does) or set HOPPS_TEST_ETCD to an etcd binary"
    )
}

pub async fn suite(
    binary: &Path,
    args: &ClusterArgs,
    options: crate::Options,
) -> anyhow::Result<()> {
    let quick = options.quick;
    let report = crate::report::Report { json: options.json };
    let rows = args.rows.unwrap_or(if quick { 20_000 } else { 1_000_000 });
    let requests = args.requests.unwrap_or(if quick { 100 } else { 2000 });
    let rounds = args.rounds.unwrap_or(if quick { 2 } else { 5 });
    let failovers = args.failovers.unwrap_or(if quick { 1 } else { 5 });
    anyhow::ensure!(
        rows > 0 && args.dim > 0,
        "--rows and --dim must be at least 1"
    );
    anyhow::ensure!(
        args.shards >= 1 && args.shards.is_power_of_two(),
        "--shards {} is not a power of two; use 1, 2, 4, 8, ...",
        args.shards
    );
    anyhow::ensure!(
        args.batch > 0 && args.concurrency > 0 && requests >= args.concurrency && rounds > 0,
        "--batch, --concurrency and --rounds must be at least 1, and --requests at least \
         --concurrency"
    );
    check_etcd()?;

    let dir = tempfile::Builder::new()
        .prefix("hopps-bench-cluster-")
        .tempdir()?;
    let repo_dir = dir.path().join("repo");
    std::fs::create_dir_all(&repo_dir)?;
    let data = DataSet {
        seed: 0xc105,
        rows,
        dim: args.dim,
    };
    report.note(&format!(
        "cluster: publishing {rows} rows of dim {} in {} shards",
        args.dim, args.shards
    ));
    let repo = HoppsRepo::open(&repo_dir, MODEL, args.shards).await?;
    repo.publish_full(&data).await?;

    let etcd = EtcdServer::start().await;
    let endpoint = etcd.endpoint();
    let ready_within = Duration::from_secs(if quick { 60 } else { 600 });

    report.note("cluster: starting one plain node and two clusters of three (R = 1, R = 2)");
    let single = Node::start(binary, dir.path(), &repo_dir, "single", &[]).await?;
    let mut r1 = Cluster::start(
        binary,
        dir.path(),
        &repo_dir,
        &endpoint,
        "bench-r1",
        1,
        &args.lease_ttl,
    )
    .await?;
    let mut r2 = Cluster::start(
        binary,
        dir.path(),
        &repo_dir,
        &endpoint,
        "bench-r2",
        2,
        &args.lease_ttl,
    )
    .await?;
    let single_client = Client::connect(&single.grpc).await?;
    wait_node_serving(&single_client, ready_within).await?;
    r1.wait_settled(args.shards, 1, ready_within).await?;
    r2.wait_settled(args.shards, 2, ready_within).await?;

    // (a) against (b1), (b2).
    let work = Arc::new(Work::draw(data, args.batch, requests));
    let targets = [
        Target::Node(Box::new(single_client)),
        Target::Cluster(ClusterClient::connect(&endpoint, &r1.name).await?),
        Target::Cluster(ClusterClient::connect(&endpoint, &r2.name).await?),
    ];
    let mut sides = [
        Side::new("one node", 1, 1),
        Side::new("3 nodes R=1", 3, 1),
        Side::new("3 nodes R=2", 3, 2),
    ];
    // One unmeasured round per side: connections, the clients' first cluster reads.
    for (t, s) in targets.iter().zip(&sides) {
        round(t, &work, args.concurrency, s.name).await?;
    }
    let stats_before: Vec<_> = targets.iter().map(Target::stats).collect();
    for r in 0..rounds {
        for (t, s) in targets.iter().zip(sides.iter_mut()) {
            let (keys, elapsed, lat) = round(t, &work, args.concurrency, s.name).await?;
            s.add(keys, elapsed, lat);
        }
        report.note(&format!("cluster: fan-out round {} of {rounds}", r + 1));
    }
    let base = [
        Spread::of(&sides[0].keys_per_s),
        Spread::of(&sides[0].p50_us),
        Spread::of(&sides[0].p99_us),
    ];
    let measured = (rounds * work.count()) as f64;
    for ((s, t), before) in sides.iter().zip(&targets).zip(&stats_before) {
        let mut rec = Record::new("cluster");
        rec.set("measure", "fanout")
            .set("side", s.name)
            .set("nodes", s.nodes as u64)
            .set("replicas", s.replicas as u64)
            .set("rows", rows)
            .set("dim", args.dim)
            .set("shards", args.shards)
            .set("batch", args.batch as u64)
            .set("concurrency", args.concurrency as u64)
            .set("requests", requests as u64)
            .set("rounds", rounds as u64);
        let kps = Spread::of(&s.keys_per_s);
        let p50 = Spread::of(&s.p50_us);
        let p99 = Spread::of(&s.p99_us);
        rec.spread("keys_per_s", kps)
            .spread("p50_us", p50)
            .spread("p99_us", p99)
            .ratio("keys_per_s_vs_one_node", kps, base[0])
            .ratio("p50_vs_one_node", p50, base[1])
            .ratio("p99_vs_one_node", p99, base[2]);
        // How the cluster client spent the requests: RPCs per request (the fan-out), and the
        // hedges and retries among them.
        if let (Some(b), Some(a)) = (before, t.stats()) {
            rec.num("rpcs_per_request", (a.rpcs - b.rpcs) as f64 / measured)
                .set("hedges", a.hedges - b.hedges)
                .set("retries", a.retries - b.retries);
        }
        report.emit(&rec);
    }
    drop(targets);
    drop(single);
    r1.nodes.clear();

    // (c) node loss to full replication, in the R = 2 cluster.
    let mut expiry = Vec::new();
    let mut reload = Vec::new();
    let mut total = Vec::new();
    for run in 0..failovers {
        let mut victim = r2.nodes.len() - 1;
        for (i, n) in r2.nodes.iter().enumerate() {
            if !n.is_leader().await {
                victim = i;
                break;
            }
        }
        let mut node = r2.nodes.remove(victim);
        let id = node.id.clone();
        let killed = Instant::now();
        node.kill9();
        let gone = id.clone();
        wait_state(
            &r2.mirror,
            "the lease of the killed node expires",
            ready_within,
            |s| {
                if s.nodes.contains_key(&gone) {
                    Err(format!("nodes/{gone} still there"))
                } else {
                    Ok(())
                }
            },
        )
        .await?;
        let expired = killed.elapsed();
        let shards = args.shards;
        wait_state(
            &r2.mirror,
            "every shard has 2 ready replicas again",
            ready_within,
            |s| replicated(s, shards, 2),
        )
        .await?;
        let healed = killed.elapsed();
        drop(node);
        report.note(&format!(
            "cluster: failover {} of {failovers}: {id} killed; lease expired after {:.2} s, two \
             replicas again after {:.2} s",
            run + 1,
            expired.as_secs_f64(),
            healed.as_secs_f64()
        ));
        expiry.push(expired.as_secs_f64());
        reload.push((healed - expired).as_secs_f64());
        total.push(healed.as_secs_f64());
        if run + 1 < failovers {
            r2.add(binary, dir.path(), &repo_dir).await?;
            r2.wait_settled(args.shards, 2, ready_within).await?;
        }
    }
    let mut rec = Record::new("cluster");
    rec.set("measure", "failover")
        .set("nodes", 3u64)
        .set("replicas", 2u64)
        .set("rows", rows)
        .set("dim", args.dim)
        .set("shards", args.shards)
        .set("lease_ttl", args.lease_ttl.as_str())
        .set("runs", failovers as u64)
        .spread("lease_expiry_s", Spread::of(&expiry))
        .spread("reload_s", Spread::of(&reload))
        .spread("total_s", Spread::of(&total));
    report.emit(&rec);
    Ok(())
}

/// Waits until a plain node serves the model.
async fn wait_node_serving(client: &Client, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = client.status().await.context("status of the plain node")?;
        if status.ready
            && status
                .models
                .iter()
                .any(|m| m.name == MODEL && m.serving_version.is_some())
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the plain node did not serve model {MODEL:?} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_batches_cover_their_keys() {
        let data = DataSet {
            seed: 1,
            rows: 100,
            dim: 2,
        };
        let w = Work::draw(data, 10, 5);
        assert_eq!(w.count(), 5);
        for b in 0..5 {
            assert_eq!(w.keys(b).len(), 10);
            for (k, i) in w.keys(b).iter().zip(w.indexes(b)) {
                assert_eq!(*k, data.key(*i));
                assert!(*i < 100);
            }
        }
    }

    #[test]
    fn settled_needs_exact_replicas_and_no_loading() {
        let mut s = ClusterState::default();
        assert!(replicated(&s, 2, 1).is_err());
        let keys = hopps_cluster::Keys::new("c");
        s.put(
            &keys,
            &keys.serving(MODEL),
            br#"{"model":"cluster","version":1}"#,
        );
        s.put(
            &keys,
            &keys.placement(MODEL),
            br#"{"model":"cluster","shards":2,"replicas":1,"epoch":1,"assignment":[["a"],["a","b"]]}"#,
        );
        s.put(&keys, &keys.node("a"), br#"{"id":"a","grpc_addr":"x"}"#);
        s.put(
            &keys,
            &keys.report(MODEL, "a"),
            br#"{"node":"a","model":"cluster","held":[0,1],"readable":[1]}"#,
        );
        assert_eq!(replicated(&s, 2, 1), Ok(()));
        assert!(replicated(&s, 2, 2).is_err());
        // Shard 1 is still moving (two nodes placed for R = 1).
        assert!(settled(&s, 2, 1).is_err());
    }
}
