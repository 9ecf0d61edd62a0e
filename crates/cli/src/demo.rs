//! `hopps demo`: the whole story in one command, on an embedded server.
//!
//! It publishes a model (a full version, then deltas) into a local repository, starts a node
//! in-process, looks rows up, watches each delta arrive, rolls back, and shows versions, history
//! and status. Every row it prints is also checked against the value it published, so the demo
//! fails loudly (exit code 1) if hopps ever served a wrong row.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hopps_client::{Client, Rows};
use hopps_format::{
    MissingPolicy, ModelSpec, PublishOptions, Repository, StorageOptions, TableArrays, TableSpec,
    VersionKind,
};
use hopps_server::ServerConfig;

use crate::server_cmd;

const MODEL: &str = "demo";
const USER: &str = "user";
const ITEM: &str = "item";
const ITEM_DIM: u32 = 8;
const SHARDS: u32 = 8;

/// `hopps demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Directory for the demo's repository (`repo/`) and node state (`node/`); it must be new,
    /// empty, or left by an earlier demo (which is replaced). It stays after the demo, so
    /// `hopps serve --repo DIR/repo` serves the demo model again.
    #[arg(long, default_value = "./hopps-demo")]
    dir: PathBuf,
    /// Rows of the `user` table in the full version.
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    /// Floats per `user` row.
    #[arg(long, default_value_t = 16)]
    dim: u32,
    /// Deltas to publish after the full version.
    #[arg(long, default_value_t = 3)]
    deltas: u32,
    /// Rows each delta overwrites.
    #[arg(long, default_value_t = 10_000)]
    delta_keys: u64,
    /// Keep serving at the end and print commands to try (stop with Ctrl-C).
    #[arg(long)]
    serve: bool,
    /// gRPC address. Default: 127.0.0.1:7070 with --serve, an OS-chosen port otherwise.
    #[arg(long)]
    listen: Option<String>,
    /// Admin HTTP address. Default: 127.0.0.1:7071 with --serve, an OS-chosen port otherwise.
    #[arg(long)]
    admin_listen: Option<String>,
}

/// The value the demo publishes for `key`, float `j`, in `version` of the `user` table.
/// Every float is exactly representable, so served rows compare bit for bit.
fn user_value(version: u64, key: u64, j: u32) -> f32 {
    (version * 1000 + key % 997) as f32 + j as f32 / 16.0
}

fn item_value(key: u64, j: u32) -> f32 {
    -((key % 101) as f32) - j as f32 / 8.0
}

/// Marks a directory the demo created, so a later run may replace it (and nothing else).
const MARKER: &str = "HOPPS_DEMO";

/// Where the demo lives: `repo/` (the model repository) and `node/` (the node's state).
struct DemoDir {
    root: PathBuf,
}

impl DemoDir {
    /// Creates `dir` fresh. A directory left by an earlier demo run is replaced; any other
    /// non-empty directory is refused, never deleted.
    fn new(dir: &Path) -> Result<DemoDir> {
        if dir.exists() {
            let mut entries =
                std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
            if entries.next().is_some() {
                if !dir.join(MARKER).exists() {
                    bail!(
                        "{} exists and was not made by `hopps demo`; give an empty or new directory to --dir",
                        dir.display()
                    );
                }
                std::fs::remove_dir_all(dir).with_context(|| {
                    format!("cannot remove the previous demo in {}", dir.display())
                })?;
            }
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(
            dir.join(MARKER),
            "made by `hopps demo`; the next demo run replaces this directory\n",
        )
        .with_context(|| format!("cannot write to {}", dir.display()))?;
        let root = dir
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", dir.display()))?;
        Ok(DemoDir { root })
    }

    fn repo(&self) -> PathBuf {
        self.root.join("repo")
    }

    fn node(&self) -> PathBuf {
        self.root.join("node")
    }
}

/// The demo's step counter and narrative.
struct Story {
    step: u32,
    steps: u32,
    started: Instant,
}

impl Story {
    fn step(&mut self, text: impl AsRef<str>) {
        self.step += 1;
        println!("[{}/{}] {}", self.step, self.steps, text.as_ref());
    }
}

fn seconds(since: Instant) -> String {
    format!("{:.2} s", since.elapsed().as_secs_f64())
}

/// Polls `check` until it returns `Some`, or fails after `timeout` naming `what`.
async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("{what} did not happen within {} s", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fails unless every found row equals `expected(key, j)` and found flags match.
fn check_rows(
    rows: &Rows,
    keys: &[u64],
    expect_found: impl Fn(u64) -> bool,
    expected: impl Fn(u64, u32) -> f32,
) -> Result<()> {
    for (i, &key) in keys.iter().enumerate() {
        let found = rows.found[i];
        ensure!(
            found == expect_found(key),
            "key {key}: served found={found}, published the opposite"
        );
        let row = rows.row(i).context("short answer")?;
        for (j, &v) in row.iter().enumerate() {
            let want = if found { expected(key, j as u32) } else { 0.0 };
            ensure!(
                v.to_bits() == want.to_bits(),
                "key {key} float {j}: served {v}, published {want} (version {})",
                rows.version
            );
        }
    }
    Ok(())
}

fn show_rows(rows: &Rows, keys: &[u64]) {
    for (i, key) in keys.iter().enumerate() {
        let row = rows.row(i).unwrap_or(&[]);
        let shown: Vec<String> = row.iter().take(4).map(|v| v.to_string()).collect();
        let more = if row.len() > 4 { ", ..." } else { "" };
        println!(
            "        key {key:>9}  {:<7}  [{}{more}]",
            if rows.found[i] { "found" } else { "missing" },
            shown.join(", ")
        );
    }
}

async fn publish_full(repo: &Repository, args: &DemoArgs) -> Result<u64> {
    let user_keys: Vec<u64> = (0..args.keys).collect();
    let mut user_values = Vec::with_capacity((args.keys * u64::from(args.dim)) as usize);
    for &k in &user_keys {
        user_values.extend((0..args.dim).map(|j| user_value(1, k, j)));
    }
    let item_rows = (args.keys / 10).max(1);
    let item_keys: Vec<u64> = (0..item_rows).collect();
    let mut item_values = Vec::with_capacity((item_rows * u64::from(ITEM_DIM)) as usize);
    for &k in &item_keys {
        item_values.extend((0..ITEM_DIM).map(|j| item_value(k, j)));
    }
    let mut item_spec = TableSpec::new(ITEM, ITEM_DIM);
    item_spec.missing = MissingPolicy::Random {
        seed: 7,
        scale: 0.01,
    };
    let spec = ModelSpec::new(
        MODEL,
        SHARDS,
        vec![TableSpec::new(USER, args.dim), item_spec],
    );
    let summary = repo
        .publish_arrays(
            MODEL,
            VersionKind::Full,
            &[
                TableArrays {
                    table: USER,
                    dim: args.dim,
                    keys: &user_keys,
                    values: &user_values,
                    deleted: None,
                },
                TableArrays {
                    table: ITEM,
                    dim: ITEM_DIM,
                    keys: &item_keys,
                    values: &item_values,
                    deleted: None,
                },
            ],
            &PublishOptions {
                create: Some(spec),
                source: "hopps demo".to_string(),
                ..PublishOptions::default()
            },
        )
        .await
        .context("publishing the demo's full version")?;
    Ok(summary.version)
}

/// The keys delta `d` (1-based) overwrites, deletes and inserts.
struct DeltaPlan {
    updated: std::ops::Range<u64>,
    deleted: u64,
    inserted: u64,
}

fn delta_plan(args: &DemoArgs, d: u64) -> DeltaPlan {
    let count = args.delta_keys.min(args.keys / 2).max(1);
    // Updated ranges stay below the keys the deltas delete (keys - d), so no delta names a key
    // twice.
    let span = args
        .keys
        .saturating_sub(count + u64::from(args.deltas) + 1)
        .max(1);
    let start = (d * 7919 * count) % span;
    DeltaPlan {
        updated: start..start + count,
        deleted: args.keys - d,
        inserted: args.keys + d,
    }
}

async fn publish_delta(
    repo: &Repository,
    args: &DemoArgs,
    version: u64,
    plan: &DeltaPlan,
) -> Result<u64> {
    let mut keys: Vec<u64> = plan.updated.clone().collect();
    keys.push(plan.inserted);
    keys.push(plan.deleted);
    let mut values = Vec::with_capacity(keys.len() * args.dim as usize);
    for &k in &keys {
        values.extend((0..args.dim).map(|j| user_value(version, k, j)));
    }
    let mut deleted = vec![false; keys.len()];
    if let Some(last) = deleted.last_mut() {
        *last = true;
    }
    let summary = repo
        .publish_arrays(
            MODEL,
            VersionKind::Delta,
            &[TableArrays {
                table: USER,
                dim: args.dim,
                keys: &keys,
                values: &values,
                deleted: Some(&deleted),
            }],
            &PublishOptions {
                parent: Some(version - 1),
                source: "hopps demo".to_string(),
                ..PublishOptions::default()
            },
        )
        .await
        .with_context(|| format!("publishing the demo's delta version {version}"))?;
    ensure!(
        summary.version == version,
        "the repository numbered the delta {} instead of {version}; is another publisher writing to it?",
        summary.version
    );
    Ok(summary.version)
}

/// The version each user key was last written at, and whether it exists, after `applied`
/// deltas (the demo's own model of what hopps must serve).
struct Truth {
    keys: u64,
    plans: Vec<DeltaPlan>,
}

impl Truth {
    /// (exists, version whose value the key holds) after the first `applied` deltas.
    fn at(&self, key: u64, applied: usize) -> (bool, u64) {
        let mut exists = key < self.keys;
        let mut version = 1;
        for (i, plan) in self.plans.iter().take(applied).enumerate() {
            let v = i as u64 + 2;
            if plan.updated.contains(&key) || plan.inserted == key {
                exists = true;
                version = v;
            }
            if plan.deleted == key {
                exists = false;
            }
        }
        (exists, version)
    }
}

async fn serving_version(client: &Client) -> Result<Option<u64>> {
    let status = client.status().await?;
    Ok(status
        .models
        .iter()
        .find(|m| m.name == MODEL)
        .and_then(|m| m.serving_version))
}

/// `hopps demo`.
pub async fn run(args: DemoArgs) -> Result<()> {
    ensure!(args.keys >= 16, "--keys must be at least 16");
    ensure!(args.dim >= 1, "--dim must be at least 1");
    ensure!(
        u64::from(args.deltas) <= args.keys / 4,
        "--deltas must be at most a quarter of --keys"
    );
    if std::env::var_os("RUST_LOG").is_none() {
        // The story is the output; only warnings and errors of the node are worth interleaving.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .try_init();
    } else {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let dir = DemoDir::new(&args.dir)?;
    let mut story = Story {
        step: 0,
        steps: 7,
        started: Instant::now(),
    };
    println!("hopps demo: repository {}", dir.repo().display());

    // 1. A full version.
    let repo_uri = dir.repo().to_string_lossy().into_owned();
    std::fs::create_dir_all(dir.repo())
        .with_context(|| format!("cannot create {}", dir.repo().display()))?;
    let repo = Repository::open(&repo_uri, &StorageOptions::default())
        .await
        .with_context(|| format!("cannot open the demo repository {repo_uri}"))?;
    let t = Instant::now();
    let v1 = publish_full(&repo, &args).await?;
    story.step(format!(
        "published version {v1} (full) of model {MODEL:?}: {} rows of {USER:?} (dim {}), {} rows of {ITEM:?} (dim {ITEM_DIM}, random init for missing keys), {SHARDS} shards, in {}",
        args.keys,
        args.dim,
        (args.keys / 10).max(1),
        seconds(t)
    ));

    // 2. A node, in-process.
    let (default_listen, default_admin) = if args.serve {
        ("127.0.0.1:7070", "127.0.0.1:7071")
    } else {
        ("127.0.0.1:0", "127.0.0.1:0")
    };
    let config = ServerConfig {
        repo: repo_uri.clone(),
        listen: args.listen.clone().unwrap_or_else(|| default_listen.into()),
        admin_listen: args
            .admin_listen
            .clone()
            .unwrap_or_else(|| default_admin.into()),
        data_dir: dir.node(),
        node_id: Some("demo-node".into()),
        poll_interval: Duration::from_millis(100),
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    };
    let t = Instant::now();
    let engine = server_cmd::open_engine(&config).await?;
    let grpc = server_cmd::bind(&config.listen, "--listen").await?;
    let admin = server_cmd::bind(&config.admin_listen, "--admin-listen").await?;
    let grpc_addr = grpc.local_addr()?.to_string();
    let admin_addr = admin.local_addr()?.to_string();
    let (stop, shutdown) = server_cmd::shutdown_on_signals();
    let server = hopps_server::Server::new(engine, &config)?;
    let node = tokio::spawn(server.run(grpc, admin, shutdown.clone()));
    let client = Client::connect(&grpc_addr).await?;
    poll_until(
        "loading the demo model",
        Duration::from_secs(900),
        || async {
            let status = client.status().await?;
            if let Some(m) = status.models.iter().find(|m| m.name == MODEL)
                && m.state == "failed"
            {
                bail!(
                    "the node failed to load the demo model: {}",
                    m.last_error.clone().unwrap_or_default()
                );
            }
            Ok(status.ready.then_some(()))
        },
    )
    .await?;
    let status = client.status().await?;
    story.step(format!(
        "started a node (gRPC {grpc_addr}, admin http://{admin_addr}) and loaded version {v1} in {}: {} rows, {} accounted",
        seconds(t),
        status.models.iter().map(|m| m.rows).sum::<u64>(),
        human_bytes(status.memory_used_bytes)
    ));

    // 3. Lookups, checked against what was published.
    let mut truth = Truth {
        keys: args.keys,
        plans: Vec::new(),
    };
    let probe = [0, 1, 42, args.keys - 1, args.keys + 5];
    let rows = client.lookup(MODEL, USER, &probe).await?;
    check_rows(
        &rows,
        &probe,
        |k| truth.at(k, 0).0,
        |k, j| user_value(truth.at(k, 0).1, k, j),
    )?;
    let item_probe = [3, args.keys * 10 + 1];
    let items = client.lookup(MODEL, ITEM, &item_probe).await?;
    ensure!(
        items.found == [true, false],
        "item lookup: unexpected found flags {:?}",
        items.found
    );
    let again = client.lookup(MODEL, ITEM, &item_probe).await?;
    ensure!(
        items.values == again.values,
        "the random init of a missing item key changed between two lookups"
    );
    story.step(format!(
        "looked up {USER:?} keys {probe:?} at version {} (rows match what was published; the last key is missing, so zeros):",
        rows.version
    ));
    show_rows(&rows, &probe);
    println!(
        "      and {ITEM:?} keys {item_probe:?}: a missing item key gets a deterministic per-key random row:"
    );
    show_rows(&items, &item_probe);

    // 4. Deltas, each picked up by the running node.
    let mut newest = v1;
    story.step(format!(
        "publishing {} deltas while the node serves (each overwrites {} rows, deletes one, inserts one):",
        args.deltas,
        args.delta_keys.min(args.keys / 2).max(1)
    ));
    for d in 1..=u64::from(args.deltas) {
        let version = v1 + d;
        let plan = delta_plan(&args, d);
        let t = Instant::now();
        publish_delta(&repo, &args, version, &plan).await?;
        let published = t.elapsed();
        let t = Instant::now();
        poll_until(
            &format!("serving delta version {version}"),
            Duration::from_secs(60),
            || async { Ok(serving_version(&client).await?.filter(|v| *v >= version)) },
        )
        .await?;
        truth.plans.push(plan);
        let plan = &truth.plans[truth.plans.len() - 1];
        let keys = [
            plan.updated.start,
            plan.updated.end - 1,
            plan.deleted,
            plan.inserted,
        ];
        let rows = client.lookup(MODEL, USER, &keys).await?;
        let applied = truth.plans.len();
        check_rows(
            &rows,
            &keys,
            |k| truth.at(k, applied).0,
            |k, j| user_value(truth.at(k, applied).1, k, j),
        )?;
        println!(
            "      version {version}: published in {:.2} s, served {:.2} s later; keys {}..{} hold version-{version} rows, key {} deleted, key {} inserted",
            published.as_secs_f64(),
            t.elapsed().as_secs_f64(),
            plan.updated.start,
            plan.updated.end,
            plan.deleted,
            plan.inserted
        );
        newest = version;
    }

    // 5. Versions as the node sees them.
    story.step("versions of the model, as the node sees them:");
    let versions = client.versions(MODEL).await?;
    server_cmd::print_versions(&versions);

    // 6. Roll back.
    if newest > v1 {
        let target = if newest >= v1 + 2 { v1 + 1 } else { v1 };
        let report = client.rollback(MODEL, target).await?;
        let applied = (target - v1) as usize;
        let plan = &truth.plans[truth.plans.len() - 1];
        let keys = [plan.updated.start, plan.deleted, plan.inserted];
        let rows = client.lookup(MODEL, USER, &keys).await?;
        ensure!(
            rows.version == target,
            "after the rollback the node serves version {}, not {target}",
            rows.version
        );
        check_rows(
            &rows,
            &keys,
            |k| truth.at(k, applied).0,
            |k, j| user_value(truth.at(k, applied).1, k, j),
        )?;
        story.step(format!(
            "rolled back from version {} to {} ({}, {:.3} s); the last delta's rows are gone again:",
            report.from, report.to, report.method, report.seconds
        ));
        show_rows(&rows, &keys);
        println!("      history:");
        server_cmd::print_history(&client.history(MODEL).await?);
    } else {
        story.step("no deltas published (--deltas 0), so nothing to roll back");
    }

    // 7. Status.
    story.step("status of the node:");
    server_cmd::print_status(&client.status().await?);
    println!();
    println!(
        "demo finished in {}: every row served matched what was published.",
        seconds(story.started)
    );

    if args.serve {
        println!();
        println!("hopps keeps serving the demo model. Try, in another terminal:");
        println!("  hopps lookup --addr {grpc_addr} --model {MODEL} --table {USER} 0 1 42");
        println!("  hopps lookup --addr {grpc_addr} --model {MODEL} --table {USER} --json 7");
        println!("  hopps status --addr {grpc_addr}");
        println!("  hopps model versions --addr {grpc_addr} --model {MODEL}");
        println!("  hopps model history --addr {grpc_addr} --model {MODEL}");
        println!("  hopps model rollback --addr {grpc_addr} --model {MODEL} --to {v1}");
        println!("  hopps model checkpoint --addr {grpc_addr} --model {MODEL}");
        println!("  hopps model versions --repo {repo_uri} --model {MODEL}");
        println!(
            "  hopps bench lookup --addr {grpc_addr} --model {MODEL} --table {USER} --batch 1000 --duration 5s"
        );
        println!("  curl http://{admin_addr}/metrics");
        println!("  open http://{admin_addr}/ in a browser");
        println!("Press Ctrl-C to stop.");
        let mut wait = shutdown.clone();
        let _ = wait.wait_for(|s| *s).await;
    } else {
        let _ = stop.send(true);
    }
    println!(
        "the demo repository stays in {}: `hopps serve --repo {repo_uri}` serves it again.",
        dir.root.display()
    );
    node.await
        .context("the demo node task failed")?
        .context("the demo node stopped with an error")?;
    Ok(())
}

fn human_bytes(bytes: u64) -> String {
    let mib = bytes as f64 / (1024.0 * 1024.0);
    format!("{mib:.1} MiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truth_follows_updates_deletes_and_inserts() {
        let args = DemoArgs {
            dir: PathBuf::from("unused"),
            keys: 100,
            dim: 2,
            deltas: 2,
            delta_keys: 10,
            serve: false,
            listen: None,
            admin_listen: None,
        };
        let plans = vec![delta_plan(&args, 1), delta_plan(&args, 2)];
        let first = plans[0].updated.start;
        let truth = Truth { keys: 100, plans };
        assert_eq!(truth.at(first, 0), (true, 1));
        assert_eq!(truth.at(first, 1), (true, 2));
        assert_eq!(truth.at(99, 1), (false, 1), "delta 1 deletes the last key");
        assert!(!truth.at(101, 0).0);
        assert_eq!(truth.at(101, 1), (true, 2), "delta 1 inserts key 101");
        assert!(truth.at(102, 2).0);
        // Values are exact in f32.
        assert_eq!(user_value(3, 996, 15), 3996.0 + 15.0 / 16.0);
    }
}
