//! Crash safety of a real `hopps serve` process: `kill -9` during acknowledged online writes,
//! during a delta apply and during a checkpoint write, then a restart on the same repository and
//! data directory. After the restart the node serves exact rows of one version: every
//! acknowledged write, never part of a version, never a half-written checkpoint. Every wait
//! polls with a deadline.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hopps_client::Client;
use hopps_format::{
    ModelSpec, PublishOptions, Repository, StorageOptions, TableArrays, TableSpec, VersionKind,
};

const HOPPS: &str = env!("CARGO_BIN_EXE_hopps");
const DIM: u32 = 4;
/// Rows of the large full version and of the delta over it.
const LARGE: u64 = 300_000;

/// The value published for `key`, float `j`, at `version` (exact in f32 below 2^24).
fn value(version: u64, key: u64, j: u32) -> f32 {
    ((version * 1_000_000 + key) % (1 << 22)) as f32 + j as f32 * 0.25
}

fn rows_of(version: u64, keys: &[u64]) -> Vec<f32> {
    keys.iter()
        .flat_map(|&k| (0..DIM).map(move |j| value(version, k, j)))
        .collect()
}

/// Polls `check` every 5 ms until it returns `Some`, panicking after `timeout`.
fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime")
}

fn open_repo(rt: &tokio::runtime::Runtime, path: &Path) -> Repository {
    std::fs::create_dir_all(path).expect("mkdir repo");
    rt.block_on(Repository::open(
        &path.to_string_lossy(),
        &StorageOptions::default(),
    ))
    .expect("open repository")
}

/// Model `m`, table `t` (dim 4, 4 shards): version 1 holds keys `0..rows`.
fn publish_full(rt: &tokio::runtime::Runtime, repo: &Repository, rows: u64) {
    let keys: Vec<u64> = (0..rows).collect();
    let values = rows_of(1, &keys);
    let summary = rt
        .block_on(repo.publish_arrays(
            "m",
            VersionKind::Full,
            &[TableArrays {
                table: "t",
                dim: DIM,
                keys: &keys,
                values: &values,
                deleted: None,
            }],
            &PublishOptions {
                create: Some(ModelSpec::new("m", 4, vec![TableSpec::new("t", DIM)])),
                source: "crash".into(),
                ..PublishOptions::default()
            },
        ))
        .expect("publish full version");
    assert_eq!(summary.version, 1);
}

/// Delta `version` of table `t`: overwrites `keys` with its values, deletes `delete`.
fn publish_delta(
    rt: &tokio::runtime::Runtime,
    repo: &Repository,
    version: u64,
    keys: &[u64],
    delete: &[u64],
) {
    let mut all = keys.to_vec();
    all.extend_from_slice(delete);
    let values = rows_of(version, &all);
    let mut deleted = vec![false; keys.len()];
    deleted.extend(std::iter::repeat_n(true, delete.len()));
    let summary = rt
        .block_on(repo.publish_arrays(
            "m",
            VersionKind::Delta,
            &[TableArrays {
                table: "t",
                dim: DIM,
                keys: &all,
                values: &values,
                deleted: Some(&deleted),
            }],
            &PublishOptions {
                source: "crash".into(),
                ..PublishOptions::default()
            },
        ))
        .expect("publish delta");
    assert_eq!(summary.version, version);
}

/// A running `hopps serve` over `<dir>/repo` with data directory `<dir>/node`; killed (SIGKILL)
/// when dropped.
struct Server {
    child: Child,
    grpc: String,
    admin: String,
    log: PathBuf,
}

impl Server {
    /// Starts the node and returns once it prints its listening line (not waiting for ready).
    fn spawn(dir: &Path, run: &str) -> Server {
        let log = dir.join(format!("serve-{run}.log"));
        let stderr = std::fs::File::create(&log).expect("log file");
        let mut child = Command::new(HOPPS)
            .arg("serve")
            .arg("--repo")
            .arg(dir.join("repo"))
            .arg("--data-dir")
            .arg(dir.join("node"))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--poll-interval", "50ms", "--node-id", "crash"])
            .args(["--wal-sync", "always"])
            .env_remove("HOPPS_ADDR")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn hopps serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the listening line");
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_string)
                .unwrap_or_else(|| {
                    panic!(
                        "no {name} in {line:?}; log:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    )
                })
        };
        Server {
            grpc: field("grpc="),
            admin: field("admin="),
            child,
            log,
        }
    }

    /// Starts the node and waits until `/readyz` answers 200.
    fn start(dir: &Path, run: &str) -> Server {
        let server = Server::spawn(dir, run);
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        wait_for("/readyz answers 200", Duration::from_secs(60), || {
            (http_status(&self.admin, "/readyz") == 200).then_some(())
        });
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log once it reports the model loaded (the line may follow readiness by a moment).
    fn loaded(&self) -> String {
        wait_for("the model-loaded log line", Duration::from_secs(10), || {
            let log = self.log();
            log.contains("model loaded").then_some(log)
        })
    }

    /// `kill -9`, then reap the process.
    fn kill(mut self) {
        self.child.kill().expect("SIGKILL hopps serve");
        let status = self.child.wait().expect("wait for hopps serve");
        assert!(!status.success(), "killed process exited cleanly: {status}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The status code of a minimal HTTP/1.1 GET; 0 when nothing answers.
fn http_status(addr: &str, path: &str) -> u16 {
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return 0;
    }
    let mut response = String::new();
    if stream.read_to_string(&mut response).is_err() {
        return 0;
    }
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Expected rows of table `t`: key → row (absent keys are not found).
type Expected = HashMap<u64, Vec<f32>>;

/// Looks up `keys` in batches; every batch must name `version` and match `expected` exactly.
async fn assert_rows(client: &Client, keys: &[u64], expected: &Expected, version: u64) {
    for chunk in keys.chunks(20_000) {
        let rows = client.lookup("m", "t", chunk).await.expect("lookup");
        assert_eq!(rows.version, version, "lookup names another version");
        for (i, &k) in chunk.iter().enumerate() {
            match expected.get(&k) {
                Some(row) => {
                    assert!(rows.found[i], "key {k} missing at version {version}");
                    assert_eq!(rows.row(i).expect("row"), &row[..], "key {k} at {version}");
                }
                None => assert!(!rows.found[i], "key {k} should be absent at {version}"),
            }
        }
    }
}

fn version_rows(version: u64, keys: impl Iterator<Item = u64>) -> Expected {
    keys.map(|k| (k, rows_of(version, &[k]))).collect()
}

/// (a) `kill -9` in the middle of a stream of acknowledged upserts from concurrent writers:
/// after the restart every acknowledged write is there with its exact value.
#[test]
fn acknowledged_writes_survive_kill_9() {
    const WRITERS: u64 = 4;
    const BATCH: u64 = 8;
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = open_repo(&rt, &dir.path().join("repo"));
    publish_full(&rt, &repo, 1000);
    let server = Server::start(dir.path(), "a1");
    let client = rt.block_on(Client::connect(&server.grpc)).expect("connect");

    // Writer w owns keys 1_000_000 * (w + 1) + i. Batch b writes BATCH new keys and rewrites
    // BATCH keys of earlier batches, with values unique to (writer, batch). Each writer keeps
    // the last acknowledged value per key and the batch in flight when the node died.
    let acked = Arc::new(AtomicU64::new(0));
    type Log = (HashMap<u64, Vec<f32>>, Option<Vec<(u64, Vec<f32>)>>);
    let writers: Vec<tokio::task::JoinHandle<Log>> = (0..WRITERS)
        .map(|w| {
            let client = client.clone();
            let acked = acked.clone();
            rt.spawn(async move {
                let mut last: HashMap<u64, Vec<f32>> = HashMap::new();
                let base = 1_000_000 * (w + 1);
                for b in 0u64.. {
                    let mut keys: Vec<u64> = (0..BATCH).map(|i| base + b * BATCH + i).collect();
                    if b > 0 {
                        keys.extend((0..BATCH).map(|i| base + (b * 7 + i * 3) % (b * BATCH)));
                    }
                    keys.sort_unstable();
                    keys.dedup();
                    let batch: Vec<(u64, Vec<f32>)> = keys
                        .iter()
                        .map(|&k| {
                            let tag = (w * 100_000 + b) as f32;
                            (k, (0..DIM).map(|j| tag + j as f32 * 0.5).collect())
                        })
                        .collect();
                    let values: Vec<f32> = batch.iter().flat_map(|(_, r)| r.clone()).collect();
                    match client.upsert("m", "t", &keys, &values).await {
                        Ok(ack) => {
                            assert_eq!(ack.rows, keys.len() as u64);
                            last.extend(batch);
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => return (last, Some(batch)),
                    }
                }
                unreachable!("writers stop at the first failed write")
            })
        })
        .collect();

    // Kill mid-stream, once a good number of writes were acknowledged.
    wait_for("200 acknowledged upserts", Duration::from_secs(30), || {
        (acked.load(Ordering::SeqCst) >= 200).then_some(())
    });
    server.kill();
    let logs: Vec<Log> = writers
        .into_iter()
        .map(|t| rt.block_on(t).expect("writer task"))
        .collect();
    let total = acked.load(Ordering::SeqCst);
    let in_flight = logs.iter().filter(|(_, b)| b.is_some()).count();
    eprintln!("killed after {total} acknowledged upserts, {in_flight} in flight");
    assert!(total >= 200, "{total} acknowledged writes");

    let server = Server::start(dir.path(), "a2");
    let client = rt.block_on(Client::connect(&server.grpc)).expect("connect");
    let mut checked = 0;
    for (last, in_flight) in &logs {
        let keys: Vec<u64> = last.keys().copied().collect();
        let rows = rt
            .block_on(client.lookup("m", "t", &keys))
            .expect("lookup after restart");
        assert_eq!(rows.version, 1);
        let pending: HashMap<u64, &Vec<f32>> =
            in_flight.iter().flatten().map(|(k, r)| (*k, r)).collect();
        for (i, k) in keys.iter().enumerate() {
            assert!(
                rows.found[i],
                "acknowledged key {k} lost; log:\n{}",
                server.log()
            );
            let got = rows.row(i).expect("row");
            // The unacknowledged batch in flight at the kill may or may not have been logged.
            let ok = got == &last[k][..] || pending.get(k).is_some_and(|r| got == &r[..]);
            assert!(ok, "key {k}: {got:?}, acknowledged {:?}", last[k]);
            checked += 1;
        }
    }
    assert!(checked >= 200 * BATCH as usize, "{checked} keys checked");
    // The published rows are untouched.
    let base: Vec<u64> = (0..1000).collect();
    rt.block_on(assert_rows(
        &client,
        &base,
        &version_rows(1, base.iter().copied()),
        1,
    ));
}

/// Restarts the node and polls lookups until it serves `target`: every response, from before
/// and after the switch, must be exactly the rows of the version it names (`expected`). Then
/// checks every key of `universe` at `target`.
fn restart_until_serving(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    run: &str,
    expected: &HashMap<u64, &Expected>,
    target: u64,
    universe: &[u64],
) -> Server {
    let server = Server::spawn(dir, run);
    let client = wait_for("connect after restart", Duration::from_secs(30), || {
        rt.block_on(Client::connect(&server.grpc)).ok()
    });
    let probe = &universe[..universe.len().min(5000)];
    wait_for("the target version served", Duration::from_secs(60), || {
        // A loading model answers UNAVAILABLE: poll again.
        let rows = rt.block_on(client.lookup("m", "t", probe)).ok()?;
        let expect = expected
            .get(&rows.version)
            .unwrap_or_else(|| panic!("served version {} after restart", rows.version));
        for (i, k) in probe.iter().enumerate() {
            match expect.get(k) {
                Some(row) => {
                    assert_eq!(rows.row(i), Some(&row[..]), "key {k} at {}", rows.version)
                }
                None => assert!(!rows.found[i], "key {k} present at {}", rows.version),
            }
        }
        (rows.version == target).then_some(())
    });
    server.wait_ready();
    rt.block_on(assert_rows(&client, universe, expected[&target], target));
    server
}

/// `rows` with delta `version` applied: `upserts` get that version's values, `deletes` go.
fn with_delta(rows: &Expected, version: u64, upserts: &[u64], deletes: &[u64]) -> Expected {
    let mut out = rows.clone();
    out.extend(version_rows(version, upserts.iter().copied()));
    for k in deletes {
        out.remove(k);
    }
    out
}

/// The status of model `m`, once `ready` holds for it.
fn status_when(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    what: &str,
    ready: impl Fn(&hopps_client::ModelStatus) -> bool,
) -> hopps_client::ModelStatus {
    wait_for(what, Duration::from_secs(30), || {
        let st = rt.block_on(client.status()).ok()?;
        st.models.into_iter().find(|m| m.name == "m" && ready(m))
    })
}

/// (b) `kill -9` while the node applies a large delta, once as soon as it notices the commit
/// (before the switch) and once after the switch while it merges: after each restart no
/// partial version is served; every response's rows are exactly those of the version it names,
/// and the node ends up serving the delta.
#[test]
fn a_delta_apply_killed_midway_is_never_served_in_part() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = open_repo(&rt, &dir.path().join("repo"));
    publish_full(&rt, &repo, LARGE);
    let server = Server::start(dir.path(), "b1");
    let client = rt.block_on(Client::connect(&server.grpc)).expect("connect");
    let universe: Vec<u64> = (0..50_000 + LARGE + 10).collect();

    // Delta 2: LARGE rows, 50K..350K overwritten or new; 0..1000 deleted.
    let up2: Vec<u64> = (50_000..50_000 + LARGE).collect();
    let del2: Vec<u64> = (0..1000).collect();
    publish_delta(&rt, &repo, 2, &up2, &del2);
    let v1 = version_rows(1, 0..LARGE);
    let v2 = with_delta(&v1, 2, &up2, &del2);

    // Status names version 2 the newest as soon as the watcher notices it; from then on the
    // node reads, stages, switches to and merges the delta.
    let seen = status_when(&rt, &client, "the delta noticed", |m| {
        m.newest_version == Some(2) || m.load.as_ref().is_some_and(|l| l.version == 2)
    });
    server.kill();
    eprintln!("killed at: {seen:?}");
    assert!(
        seen.serving_version != Some(2) || seen.rows != v2.len() as u64,
        "killed only after the delta was fully applied; make it larger: {seen:?}"
    );
    let expected = HashMap::from([(1, &v1), (2, &v2)]);
    let server = restart_until_serving(&rt, dir.path(), "b2", &expected, 2, &universe);
    let client = rt.block_on(Client::connect(&server.grpc)).expect("connect");

    // Delta 3 over all keys: kill once the node serves it, while it merges it into its tables
    // (the base tables still hold version 2's row count, which differs from version 3's) or, at
    // worst, just after.
    let up3: Vec<u64> = (0..LARGE).collect();
    let del3: Vec<u64> = (50_000 + LARGE - 5000..50_000 + LARGE).collect();
    publish_delta(&rt, &repo, 3, &up3, &del3);
    let v3 = with_delta(&v2, 3, &up3, &del3);
    let seen = status_when(&rt, &client, "the switch to delta 3", |m| {
        m.serving_version == Some(3)
    });
    server.kill();
    eprintln!(
        "killed at: {seen:?} (merging: {})",
        seen.rows != v3.len() as u64
    );
    let expected = HashMap::from([(2, &v2), (3, &v3)]);
    restart_until_serving(&rt, dir.path(), "b3", &expected, 3, &universe);
}

/// (c) `kill -9` while a checkpoint is being written: the half-written checkpoint (segments, no
/// manifest) is ignored after the restart, which serves exact rows, online writes included; a
/// later checkpoint of the same version commits and is used.
#[test]
fn a_half_written_checkpoint_is_ignored() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo_path = dir.path().join("repo");
    let repo = open_repo(&rt, &repo_path);
    publish_full(&rt, &repo, LARGE);
    let server = Server::start(dir.path(), "c1");
    let client = rt.block_on(Client::connect(&server.grpc)).expect("connect");

    // Online writes before the checkpoint: they must survive through the WAL.
    let mut expected = version_rows(1, 0..LARGE);
    let written: Vec<u64> = (0..100)
        .map(|i| i * 1000)
        .chain(LARGE..LARGE + 100)
        .collect();
    let values = rows_of(7, &written);
    rt.block_on(client.upsert("m", "t", &written, &values))
        .expect("upsert");
    expected.extend(version_rows(7, written.iter().copied()));

    let checkpoint_dir = repo_path
        .join("m")
        .join("checkpoints")
        .join(format!("{:020}", 1));
    assert!(!checkpoint_dir.exists());
    let task = {
        let client = client.clone();
        rt.spawn(async move { client.checkpoint("m").await })
    };
    // Kill once its first segment exists and its manifest does not.
    wait_for(
        "a checkpoint segment is written",
        Duration::from_secs(30),
        || {
            let segment = files_under(&checkpoint_dir)
                .iter()
                .any(|f| f.extension().is_some_and(|e| e == "hps"));
            (segment || task.is_finished()).then_some(())
        },
    );
    server.kill();
    eprintln!("killed with {:?}", files_under(&checkpoint_dir));
    let _ = rt.block_on(task);
    assert!(
        !checkpoint_dir.join("MANIFEST.json").exists(),
        "the checkpoint committed before the kill; make the model larger"
    );
    assert!(rt.block_on(repo.checkpoints("m")).expect("list").is_empty());

    let server = Server::start(dir.path(), "c2");
    let loaded = server.loaded();
    assert!(
        loaded.contains("full 1 + 0 deltas") && !loaded.contains("checkpoint of"),
        "the restart must load the full version, not the half-written checkpoint:\n{loaded}"
    );
    let client = rt.block_on(Client::connect(&server.grpc)).expect("connect");
    let universe: Vec<u64> = (0..LARGE + 200).collect();
    rt.block_on(assert_rows(&client, &universe, &expected, 1));

    // The leftover segments do not disturb a later checkpoint of the same version.
    let report = rt
        .block_on(client.checkpoint("m"))
        .expect("checkpoint after restart");
    assert_eq!((report.version, report.rows), (1, expected.len() as u64));
    server.kill();
    let server = Server::start(dir.path(), "c3");
    let loaded = server.loaded();
    assert!(
        loaded.contains("checkpoint of 1 + 0 deltas"),
        "the committed checkpoint is used:\n{loaded}"
    );
    let client = rt.block_on(Client::connect(&server.grpc)).expect("connect");
    rt.block_on(assert_rows(&client, &universe, &expected, 1));
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
