//! End-to-end tests of `hopps serve` and the client commands: real `hopps` processes on
//! OS-chosen 127.0.0.1 ports over a temporary model repository. Every wait polls with a deadline.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hopps_format::{
    MissingPolicy, ModelSpec, PublishOptions, Repository, StorageOptions, TableArrays, TableSpec,
    VersionKind,
};
use serde_json::Value;

const HOPPS: &str = env!("CARGO_BIN_EXE_hopps");
const DIM: u32 = 4;
const ROWS: u64 = 5000;

/// The value published for `key`, float `j`, at `version` of table `t` (exact in f32).
fn value(version: u64, key: u64, j: u32) -> f32 {
    (version * 100_000 + key) as f32 + j as f32 * 0.5
}

fn rows_of(version: u64, keys: &[u64], dim: u32) -> Vec<f32> {
    keys.iter()
        .flat_map(|&k| (0..dim).map(move |j| value(version, k, j)))
        .collect()
}

/// Polls `check` every 20 ms until it returns `Some`, panicking after `timeout`.
fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
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

/// Model `m`: table `t` (dim 4, zeros), `r` (dim 2, random init), `e` (dim 2, error).
fn publish_full(rt: &tokio::runtime::Runtime, repo: &Repository) {
    let keys: Vec<u64> = (0..ROWS).collect();
    let values = rows_of(1, &keys, DIM);
    let small: Vec<u64> = (0..10).collect();
    let small_values = rows_of(1, &small, 2);
    let mut random = TableSpec::new("r", 2);
    random.missing = MissingPolicy::Random {
        seed: 3,
        scale: 0.25,
    };
    let mut strict = TableSpec::new("e", 2);
    strict.missing = MissingPolicy::Error;
    let spec = ModelSpec::new("m", 4, vec![TableSpec::new("t", DIM), random, strict]);
    let summary = rt
        .block_on(repo.publish_arrays(
            "m",
            VersionKind::Full,
            &[
                TableArrays {
                    table: "t",
                    dim: DIM,
                    keys: &keys,
                    values: &values,
                    deleted: None,
                },
                TableArrays {
                    table: "r",
                    dim: 2,
                    keys: &small,
                    values: &small_values,
                    deleted: None,
                },
                TableArrays {
                    table: "e",
                    dim: 2,
                    keys: &small,
                    values: &small_values,
                    deleted: None,
                },
            ],
            &PublishOptions {
                create: Some(spec),
                source: "e2e".into(),
                ..PublishOptions::default()
            },
        ))
        .expect("publish full version");
    assert_eq!(summary.version, 1);
}

/// Delta of table `t`: overwrites `keys` with `version` values, deletes `delete`.
fn publish_delta(
    rt: &tokio::runtime::Runtime,
    repo: &Repository,
    version: u64,
    keys: &[u64],
    delete: &[u64],
) {
    let mut all = keys.to_vec();
    all.extend_from_slice(delete);
    let values = rows_of(version, &all, DIM);
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
                source: "e2e".into(),
                ..PublishOptions::default()
            },
        ))
        .expect("publish delta");
    assert_eq!(summary.version, version);
}

/// A running `hopps serve`; killed when dropped if the test did not stop it.
struct Server {
    child: Child,
    grpc: String,
    admin: String,
    log: PathBuf,
}

impl Server {
    fn start(dir: &Path, repo: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Server {
        let log = dir.join(format!("serve-{}.log", std::process::id()));
        let stderr = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(HOPPS);
        cmd.arg("serve")
            .arg("--repo")
            .arg(repo)
            .arg("--data-dir")
            .arg(dir.join("node"))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--poll-interval", "100ms", "--node-id", "e2e"])
            .args(extra)
            .env_remove("HOPPS_ADDR")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn hopps serve");
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
        let server = Server {
            grpc: field("grpc="),
            admin: field("admin="),
            child,
            log,
        };
        wait_for("/readyz answers 200", Duration::from_secs(60), || {
            (http_get(&server.admin, "/readyz").0 == 200).then_some(())
        });
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait for a clean exit.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
        let child = &mut self.child;
        wait_for(
            "hopps serve exits after SIGTERM",
            Duration::from_secs(20),
            || child.try_wait().expect("try_wait"),
        )
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

/// A minimal HTTP/1.1 GET; (0, "") when nothing answers.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut response = String::new();
    if stream.read_to_string(&mut response).is_err() {
        return (0, String::new());
    }
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn hopps(args: &[&str]) -> Output {
    Command::new(HOPPS)
        .args(args)
        .env_remove("HOPPS_ADDR")
        .output()
        .expect("run hopps")
}

/// Runs a command that must succeed; returns its stdout.
fn ok(args: &[&str]) -> String {
    let out = hopps(args);
    assert!(
        out.status.success(),
        "hopps {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Runs a command that must fail; returns its stderr.
fn fails(args: &[&str]) -> String {
    let out = hopps(args);
    assert!(
        !out.status.success(),
        "hopps {args:?} should fail; printed {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).expect("utf-8")
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// `hopps lookup --json`, as (version, [(key, found, values)]).
fn lookup(addr: &str, table: &str, keys: &[u64]) -> (u64, Vec<(u64, bool, Vec<f32>)>) {
    let keys: Vec<String> = keys.iter().map(u64::to_string).collect();
    let mut args = vec![
        "lookup", "--addr", addr, "--model", "m", "--table", table, "--json",
    ];
    args.extend(keys.iter().map(String::as_str));
    let v = json(&ok(&args));
    let rows = v["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["key"].as_u64().expect("key"),
                r["found"].as_bool().expect("found"),
                r["values"]
                    .as_array()
                    .expect("values")
                    .iter()
                    .map(|x| x.as_f64().expect("float") as f32)
                    .collect(),
            )
        })
        .collect();
    (v["version"].as_u64().expect("version"), rows)
}

/// Prometheus text → series (`name{labels}`) → value.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The value of the series `name` whose labels include all of `labels`.
fn metric(metrics: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.iter().find_map(|(series, v)| {
        let (n, rest) = series.split_once('{').unwrap_or((series.as_str(), ""));
        (n == name
            && labels
                .iter()
                .all(|(k, val)| rest.contains(&format!("{k}=\"{val}\""))))
        .then_some(*v)
    })
}

#[test]
fn serve_lookup_deltas_status_metrics_rollback_and_shutdown() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo_path = dir.path().join("repo");
    let repo = open_repo(&rt, &repo_path);
    publish_full(&rt, &repo);
    let server = Server::start(
        dir.path(),
        &repo_path,
        &["--max-keys-per-request", "1000"],
        &[],
    );
    let addr = server.grpc.clone();

    // Exact rows; a missing key of a zeros table is zeros and not found.
    let (version, rows) = lookup(&addr, "t", &[0, 17, ROWS - 1, ROWS + 7]);
    assert_eq!(version, 1);
    for (key, found, values) in &rows[..3] {
        assert!(found, "key {key}");
        assert_eq!(values, &rows_of(1, &[*key], DIM), "key {key}");
    }
    assert_eq!(rows[3], (ROWS + 7, false, vec![0.0; DIM as usize]));

    // Human output names found and missing keys.
    let text = ok(&[
        "lookup", "--addr", &addr, "--model", "m", "--table", "t", "17", "999999",
    ]);
    assert!(text.contains("version 1"), "{text}");
    assert!(text.contains("found") && text.contains("missing"), "{text}");
    assert!(text.contains(&value(1, 17, 0).to_string()), "{text}");

    // Random init: deterministic per key, bounded by the scale, not found.
    let (_, a) = lookup(&addr, "r", &[424_242]);
    let (_, b) = lookup(&addr, "r", &[5, 424_242]);
    assert_eq!(a[0], b[1]);
    assert!(!a[0].1);
    assert!(a[0].2.iter().all(|v| v.abs() <= 0.25) && a[0].2.iter().any(|v| *v != 0.0));

    // Bad input: the error policy, unknown names, too many keys.
    let err = fails(&[
        "lookup", "--addr", &addr, "--model", "m", "--table", "e", "1", "31337",
    ]);
    assert!(err.contains("NOT_FOUND") && err.contains("31337"), "{err}");
    let err = fails(&[
        "lookup", "--addr", &addr, "--model", "nope", "--table", "t", "1",
    ]);
    assert!(err.contains("NOT_FOUND") && err.contains("nope"), "{err}");
    let err = fails(&[
        "lookup", "--addr", &addr, "--model", "m", "--table", "nope", "1",
    ]);
    assert!(err.contains("NOT_FOUND") && err.contains("nope"), "{err}");
    let many: Vec<String> = (0..1001).map(|k: u64| k.to_string()).collect();
    let mut args = vec![
        "lookup",
        "--addr",
        addr.as_str(),
        "--model",
        "m",
        "--table",
        "t",
    ];
    args.extend(many.iter().map(String::as_str));
    let err = fails(&args);
    assert!(
        err.contains("RESOURCE_EXHAUSTED") && err.contains("1001"),
        "{err}"
    );
    let err = fails(&[
        "lookup",
        "--addr",
        "127.0.0.1:1",
        "--model",
        "m",
        "--table",
        "t",
        "1",
    ]);
    assert!(err.contains("127.0.0.1:1"), "{err}");

    // A delta is served within 5 seconds of its commit; its deletes and inserts too.
    let published = Instant::now();
    publish_delta(&rt, &repo, 2, &[17, ROWS + 7], &[0]);
    let rows = wait_for("delta 2 served", Duration::from_secs(10), || {
        let (v, rows) = lookup(&addr, "t", &[17, ROWS + 7, 0, 18]);
        (v == 2).then_some(rows)
    });
    assert!(
        published.elapsed() < Duration::from_secs(5),
        "delta took {:?}",
        published.elapsed()
    );
    assert_eq!(rows[0].2, rows_of(2, &[17], DIM));
    assert_eq!(rows[1], (ROWS + 7, true, rows_of(2, &[ROWS + 7], DIM)));
    assert_eq!(rows[2], (0, false, vec![0.0; DIM as usize]));
    assert_eq!(
        rows[3].2,
        rows_of(1, &[18], DIM),
        "untouched rows keep version 1"
    );

    // A pinned version: the served one reads, one the node cannot read is FAILED_PRECONDITION.
    let pinned = json(&ok(&[
        "lookup",
        "--addr",
        &addr,
        "--model",
        "m",
        "--table",
        "t",
        "--at-version",
        "2",
        "--json",
        "17",
    ]));
    assert_eq!(pinned["version"], 2);
    let err = fails(&[
        "lookup",
        "--addr",
        &addr,
        "--model",
        "m",
        "--table",
        "t",
        "--at-version",
        "99",
        "17",
    ]);
    assert!(
        err.contains("FAILED_PRECONDITION") && err.contains("99"),
        "{err}"
    );

    // Status, as JSON and as a table.
    let status = json(&ok(&["status", "--addr", &addr, "--json"]));
    assert_eq!(status["ready"], true);
    assert_eq!(status["node_id"], "e2e");
    let model = &status["models"][0];
    assert_eq!(model["name"], "m");
    assert_eq!(model["state"], "serving");
    assert_eq!(model["serving_version"], 2);
    assert_eq!(model["newest_version"], 2);
    let t = model["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .find(|t| t["name"] == "t")
        .expect("table t");
    assert_eq!(t["rows"], ROWS, "one deleted, one inserted");
    assert_eq!(t["dim"], DIM);
    let lf = t["load_factor"].as_f64().expect("load factor");
    assert!(lf > 0.0 && lf <= 1.0, "{lf}");
    let table = ok(&["status", "--addr", &addr]);
    assert!(
        table.contains("MODEL") && table.contains("serving"),
        "{table}"
    );

    // Versions as the server sees them.
    let versions = json(&ok(&[
        "model", "versions", "--addr", &addr, "--model", "m", "--json",
    ]));
    let versions = versions.as_array().expect("array");
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[0]["version"], 1);
    assert_eq!(versions[0]["kind"], "full");
    assert_eq!(versions[1]["parent"], 1);
    assert_eq!(versions[1]["state"], "serving");

    // Metrics: counters of what happened, state gauges, histograms.
    let (code, text) = http_get(&server.admin, "/metrics");
    assert_eq!(code, 200);
    let metrics = parse_metrics(&text);
    let m = |name: &str, labels: &[(&str, &str)]| {
        metric(&metrics, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
    };
    let mt = [("model", "m"), ("table", "t")];
    assert!(
        m(
            "hopps_lookup_requests_total",
            &[("model", "m"), ("table", "t"), ("code", "ok")]
        ) >= 3.0
    );
    assert!(
        m(
            "hopps_lookup_requests_total",
            &[("model", "m"), ("table", "e"), ("code", "not_found")]
        ) >= 1.0
    );
    assert!(m("hopps_lookup_keys_total", &mt) >= 8.0);
    assert!(m("hopps_lookup_misses_total", &mt) >= 2.0);
    assert!(m("hopps_lookup_duration_seconds_count", &mt) >= 3.0);
    assert!(
        m(
            "hopps_lookup_duration_seconds_bucket",
            &[("model", "m"), ("table", "t"), ("le", "+Inf")]
        ) >= 3.0
    );
    assert_eq!(m("hopps_model_serving_version", &[("model", "m")]), 2.0);
    assert_eq!(m("hopps_model_newest_version", &[("model", "m")]), 2.0);
    assert_eq!(m("hopps_model_version_lag", &[("model", "m")]), 0.0);
    assert_eq!(m("hopps_table_rows", &mt), ROWS as f64);
    assert!(m("hopps_table_bytes_per_entry", &mt) >= (DIM * 4 + 8) as f64);
    assert_eq!(m("hopps_ready", &[]), 1.0);
    assert_eq!(m("hopps_build_info", &[]), 1.0);
    assert_eq!(m("hopps_load_in_progress", &[("model", "m")]), 0.0);

    // Health, readiness and the page for people.
    assert_eq!(http_get(&server.admin, "/healthz").0, 200);
    let (code, page) = http_get(&server.admin, "/");
    assert_eq!(code, 200);
    assert!(page.contains("<table") && page.contains(">m<"), "{page}");
    let (code, body) = http_get(&server.admin, "/status");
    assert_eq!(code, 200);
    assert_eq!(json(&body)["models"][0]["serving_version"], 2);

    // Rollback to 1: rows return to version 1, history records it.
    let report = json(&ok(&[
        "model", "rollback", "--addr", &addr, "--model", "m", "--to", "1", "--json",
    ]));
    assert_eq!(report["from"], 2);
    assert_eq!(report["to"], 1);
    let (version, rows) = lookup(&addr, "t", &[17, 0, ROWS + 7]);
    assert_eq!(version, 1);
    assert_eq!(rows[0].2, rows_of(1, &[17], DIM));
    assert_eq!(rows[1], (0, true, rows_of(1, &[0], DIM)));
    assert!(!rows[2].1, "the key delta 2 inserted is gone");
    let history = json(&ok(&[
        "model", "history", "--addr", &addr, "--model", "m", "--json",
    ]));
    let events = history.as_array().expect("array");
    let last = events.last().expect("an event");
    assert_eq!(last["event"], "rolled_back");
    assert_eq!(last["version"], 1);
    assert_eq!(last["from_version"], 2);

    // Checkpoint of the served version.
    let report = json(&ok(&[
        "model",
        "checkpoint",
        "--addr",
        &addr,
        "--model",
        "m",
        "--json",
    ]));
    assert_eq!(report["version"], 1);
    assert!(report["rows"].as_u64().expect("rows") >= ROWS);

    // Closed-loop benchmark.
    let bench = json(&ok(&[
        "bench",
        "lookup",
        "--addr",
        &addr,
        "--model",
        "m",
        "--table",
        "t",
        "--batch",
        "100",
        "--connections",
        "2",
        "--duration",
        "1s",
        "--warmup",
        "200ms",
        "--json",
    ]));
    assert!(bench["keys_per_second"].as_f64().expect("keys/s") > 0.0);
    assert_eq!(bench["errors"], 0);
    let p50 = bench["p50_ms"].as_f64().expect("p50");
    let p99 = bench["p99_ms"].as_f64().expect("p99");
    let p999 = bench["p999_ms"].as_f64().expect("p999");
    assert!(0.0 < p50 && p50 <= p99 && p99 <= p999, "{bench}");

    // SIGTERM: a clean exit.
    let log_before = server.log();
    let status = server.terminate();
    assert!(status.success(), "exit status {status}; log:\n{log_before}");
}

#[test]
fn a_version_that_fails_to_load_leaves_the_previous_one_serving() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo_path = dir.path().join("repo");
    let repo = open_repo(&rt, &repo_path);
    publish_full(&rt, &repo);
    // Version 2 is published into a copy of the repository and damaged there; then its data files
    // and, last, its manifest are copied into the served repository, as a publisher commits.
    let staging_path = dir.path().join("staging");
    copy_dir(&repo_path, &staging_path);
    let staging = open_repo(&rt, &staging_path);
    publish_delta(&rt, &staging, 2, &[1, 2, 3], &[]);

    let server = Server::start(dir.path(), &repo_path, &[], &[]);
    let addr = server.grpc.clone();
    let version_dir = Path::new("m").join("versions").join(format!("{:020}", 2));
    let source = staging_path.join(&version_dir);
    let mut damaged = 0;
    for file in files_under(&source) {
        if file.file_name().is_some_and(|n| n != "MANIFEST.json") {
            let mut bytes = std::fs::read(&file).expect("read data file");
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
            std::fs::write(&file, bytes).expect("damage data file");
            damaged += 1;
        }
    }
    assert!(damaged > 0, "no data file under {}", source.display());
    for file in files_under(&source) {
        if file.file_name().is_some_and(|n| n != "MANIFEST.json") {
            copy_file(&source, &repo_path.join(&version_dir), &file);
        }
    }
    copy_file(
        &source,
        &repo_path.join(&version_dir),
        &source.join("MANIFEST.json"),
    );

    let status = wait_for(
        "the failure shows in status",
        Duration::from_secs(10),
        || {
            let s = json(&ok(&["status", "--addr", &addr, "--json"]));
            (s["models"][0]["load_failures"].as_u64().unwrap_or(0) > 0).then_some(s)
        },
    );
    let model = &status["models"][0];
    assert_eq!(model["serving_version"], 1, "{status}");
    assert_eq!(model["newest_version"], 2, "{status}");
    assert!(
        model["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{status}"
    );
    let (version, rows) = lookup(&addr, "t", &[1]);
    assert_eq!(version, 1);
    assert_eq!(rows[0].2, rows_of(1, &[1], DIM));

    let (_, text) = http_get(&server.admin, "/metrics");
    let metrics = parse_metrics(&text);
    assert!(
        metric(
            &metrics,
            "hopps_model_load_failures_total",
            &[("model", "m")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    assert_eq!(
        metric(&metrics, "hopps_model_version_lag", &[("model", "m")]),
        Some(1.0),
        "{text}"
    );
    let log = server.log();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("version failed") && l.contains("model=m")),
        "the failure is logged:\n{log}"
    );
    assert!(server.terminate().success());
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

fn copy_file(from_root: &Path, to_root: &Path, file: &Path) {
    let rel = file.strip_prefix(from_root).expect("under root");
    let target = to_root.join(rel);
    std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
    std::fs::copy(file, &target).expect("copy");
}

fn copy_dir(from: &Path, to: &Path) {
    for file in files_under(from) {
        copy_file(from, to, &file);
    }
}

#[test]
fn config_file_and_environment_configure_the_server() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo_path = dir.path().join("repo");
    let repo = open_repo(&rt, &repo_path);
    publish_full(&rt, &repo);
    let config = dir.path().join("hopps.toml");
    std::fs::write(
        &config,
        "max_keys_per_request = 3\nmodels = [\"m\"]\nmax_message_bytes = \"1MiB\"\n",
    )
    .expect("config");
    let config_arg = config.to_string_lossy().into_owned();
    // The file says 3 keys; the environment overrides it with 4.
    let server = Server::start(
        dir.path(),
        &repo_path,
        &["--config", &config_arg],
        &[("HOPPS_MAX_KEYS_PER_REQUEST", "4")],
    );
    let addr = server.grpc.clone();
    let (_, rows) = lookup(&addr, "t", &[1, 2, 3, 4]);
    assert_eq!(rows.len(), 4);
    let err = fails(&[
        "lookup", "--addr", &addr, "--model", "m", "--table", "t", "1", "2", "3", "4", "5",
    ]);
    assert!(
        err.contains("RESOURCE_EXHAUSTED") && err.contains("limit of 4"),
        "{err}"
    );
    drop(server);

    // A bad config file is a clear error naming the file and the setting.
    std::fs::write(&config, "max_keys_per_requests = 3\n").expect("config");
    let out = hopps(&[
        "serve",
        "--config",
        &config_arg,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("hopps.toml") && err.contains("max_keys_per_requests"),
        "{err}"
    );
}

#[test]
fn an_unreachable_repository_is_a_clear_error_not_a_hang() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Nothing listens on a port we bound and released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let mut child = Command::new(HOPPS)
        .args([
            "serve",
            "--repo",
            "s3://models/prod",
            "--s3-endpoint",
            &endpoint,
        ])
        .args(["--s3-region", "us-east-1", "--storage-timeout", "2s"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("node"))
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let status = wait_for("hopps serve gives up", Duration::from_secs(30), || {
        child.try_wait().expect("try_wait")
    });
    assert!(!status.success());
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read stderr");
    assert!(err.contains("s3://models/prod"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn demo_tells_the_whole_story_and_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let demo_dir = dir.path().join("demo");
    let demo_arg = demo_dir.to_string_lossy().into_owned();
    let run = || {
        hopps(&[
            "demo",
            "--dir",
            &demo_arg,
            "--keys",
            "3000",
            "--dim",
            "8",
            "--deltas",
            "3",
            "--delta-keys",
            "200",
        ])
    };
    let out = run();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("[7/7]"), "{stdout}");
    assert!(
        stdout.contains("rolled back from version 4 to 2"),
        "{stdout}"
    );
    assert!(stdout.contains("every row served matched"), "{stdout}");
    // A second run replaces its own directory.
    assert!(run().status.success());
    // A directory the demo did not make is refused, not deleted.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).expect("mkdir");
    std::fs::write(other.join("keep.txt"), "mine").expect("write");
    let out = hopps(&["demo", "--dir", &other.to_string_lossy(), "--keys", "100"]);
    assert!(!out.status.success());
    assert!(other.join("keep.txt").exists());
}
