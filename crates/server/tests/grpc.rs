//! In-process server tests: a real engine over a temporary repository, a real server on
//! OS-chosen 127.0.0.1 ports, and the real client. (End-to-end tests of the `hopps` binary live
//! in the CLI crate.)

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use hopps_client::{Client, ClientError, Code};
use hopps_format::{
    MissingPolicy, ModelSpec, PublishOptions, Repository, StorageOptions, TableArrays, TableSpec,
    VersionKind,
};
use hopps_proto::v1;
use hopps_server::{Server, ServerConfig};

const DIM: u32 = 4;

fn value(version: u64, key: u64, j: u32) -> f32 {
    (version * 10_000 + key) as f32 + j as f32 * 0.25
}

fn rows_of(version: u64, keys: &[u64], dim: u32) -> Vec<f32> {
    keys.iter()
        .flat_map(|&k| (0..dim).map(move |j| value(version, k, j)))
        .collect()
}

struct Node {
    grpc: String,
    admin: String,
    repo: Repository,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), hopps_server::ServerError>>,
    _dir: tempfile::TempDir,
}

async fn publish_model(repo: &Repository) {
    let keys: Vec<u64> = (0..1000).collect();
    let values = rows_of(1, &keys, DIM);
    let small: Vec<u64> = (0..10).collect();
    let small_values = rows_of(1, &small, 2);
    let mut random = TableSpec::new("r", 2);
    random.missing = MissingPolicy::Random {
        seed: 9,
        scale: 0.5,
    };
    let mut strict = TableSpec::new("e", 2);
    strict.missing = MissingPolicy::Error;
    let spec = ModelSpec::new("m", 4, vec![TableSpec::new("t", DIM), random, strict]);
    repo.publish_arrays(
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
            source: "test".into(),
            ..PublishOptions::default()
        },
    )
    .await
    .expect("publish full version");
}

async fn start() -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo_path = dir.path().join("repo");
    std::fs::create_dir_all(&repo_path).expect("mkdir");
    let repo_uri = repo_path.to_string_lossy().into_owned();
    let repo = Repository::open(&repo_uri, &StorageOptions::default())
        .await
        .expect("open repo");
    publish_model(&repo).await;
    let config = ServerConfig {
        repo: repo_uri,
        data_dir: dir.path().join("node"),
        poll_interval: Duration::from_millis(50),
        max_keys_per_request: 2000,
        max_message_bytes: 64 << 10,
        ..ServerConfig::default()
    };
    let engine = hopps_engine::Engine::open(hopps_server::engine_config(
        &config,
        hopps_server::open_repository(&config).await.expect("repo"),
    ))
    .await
    .expect("engine");
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let grpc_addr = grpc.local_addr().expect("addr").to_string();
    let admin_addr = admin.local_addr().expect("addr").to_string();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let server = Server::new(engine, &config).expect("server");
    let task = tokio::spawn(server.run(grpc, admin, shutdown));
    let node = Node {
        grpc: grpc_addr,
        admin: admin_addr,
        repo,
        stop,
        task,
        _dir: dir,
    };
    wait_until("ready", || async {
        http_get(&node.admin, "/readyz").0 == 200
    })
    .await;
    node
}

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A minimal HTTP/1.1 GET (the admin port speaks plain HTTP/1.1).
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

fn code(err: &ClientError) -> Option<Code> {
    err.code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_policies_errors_and_deltas() {
    let node = start().await;
    let client = Client::connect(&node.grpc).await.expect("connect");

    // Exact rows and the found bitmap; a missing key of a zeros table is a row of zeros.
    let keys = [0u64, 7, 999, 5000];
    let rows = client.lookup("m", "t", &keys).await.expect("lookup");
    assert_eq!(rows.version, 1);
    assert_eq!(rows.dim, DIM);
    assert_eq!(rows.found, vec![true, true, true, false]);
    let mut expected = rows_of(1, &keys[..3], DIM);
    expected.extend([0.0; DIM as usize]);
    assert_eq!(rows.values, expected);

    // Random policy: not found, deterministic, within scale, not zeros.
    let a = client.lookup("m", "r", &[3, 12345]).await.expect("lookup");
    let b = client.lookup("m", "r", &[12345]).await.expect("lookup");
    assert_eq!(a.found, vec![true, false]);
    assert_eq!(a.row(1), b.row(0), "per-key init is deterministic");
    let init = a.row(1).expect("row");
    assert!(
        init.iter().all(|v| v.abs() <= 0.5) && init.iter().any(|v| *v != 0.0),
        "{init:?}"
    );

    // Error policy: NOT_FOUND naming the key.
    let err = client
        .lookup("m", "e", &[1, 777])
        .await
        .expect_err("missing key");
    assert_eq!(code(&err), Some(Code::NotFound), "{err}");
    assert!(err.to_string().contains("777"), "{err}");

    // Unknown model and table.
    let err = client
        .lookup("nope", "t", &[1])
        .await
        .expect_err("unknown model");
    assert_eq!(code(&err), Some(Code::NotFound), "{err}");
    assert!(err.to_string().contains("nope"), "{err}");
    let err = client
        .lookup("m", "nope", &[1])
        .await
        .expect_err("unknown table");
    assert_eq!(code(&err), Some(Code::NotFound), "{err}");

    // Too many keys (limit 2000) and an oversized message (limit 64 KiB).
    let many: Vec<u64> = (0..2001).collect();
    let err = client
        .lookup("m", "t", &many)
        .await
        .expect_err("too many keys");
    assert_eq!(code(&err), Some(Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("2001"), "{err}");
    let huge: Vec<u64> = (0..10_000).collect();
    let err = client.lookup("m", "t", &huge).await.expect_err("oversized");
    assert_eq!(code(&err), Some(Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("max_message_bytes"), "{err}");

    // Standard gRPC health checking: the data-plane service is SERVING once ready.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", node.grpc))
        .expect("uri")
        .connect()
        .await
        .expect("health connect");
    let health = tonic_health::pb::health_client::HealthClient::new(channel);
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    wait_until("health says SERVING", || {
        let mut health = health.clone();
        async move {
            health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: hopps_proto::HOPPS_SERVICE.to_string(),
                })
                .await
                .is_ok_and(|r| r.into_inner().status == serving)
        }
    })
    .await;

    // Keys not a multiple of 8 bytes, through the raw wire client.
    let mut raw = v1::hopps_client::HoppsClient::connect(format!("http://{}", node.grpc))
        .await
        .expect("raw connect");
    let status = raw
        .lookup(v1::LookupRequest {
            model: "m".into(),
            table: "t".into(),
            keys: bytes::Bytes::from_static(&[1, 2, 3]),
            version: None,
        })
        .await
        .expect_err("ragged keys");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("multiple of 8"),
        "{}",
        status.message()
    );

    // Multi-lookup reads several tables at one version.
    let multi = client
        .multi_lookup("m", &[("t", &[1, 2][..]), ("r", &[4][..])], None)
        .await
        .expect("multi");
    assert_eq!(multi.version, 1);
    assert_eq!(multi.tables[0].rows.values, rows_of(1, &[1, 2], DIM));
    assert_eq!(multi.tables[1].rows.values, rows_of(1, &[4], 2));

    // A delta is picked up by the watcher and applied.
    let delta_keys = [7u64, 5000];
    let deleted = [false, false];
    let values = rows_of(2, &delta_keys, DIM);
    node.repo
        .publish_arrays(
            "m",
            VersionKind::Delta,
            &[TableArrays {
                table: "t",
                dim: DIM,
                keys: &delta_keys,
                values: &values,
                deleted: Some(&deleted),
            }],
            &PublishOptions {
                source: "test".into(),
                ..PublishOptions::default()
            },
        )
        .await
        .expect("publish delta");
    wait_until("delta served", || async {
        client
            .lookup("m", "t", &[7])
            .await
            .is_ok_and(|r| r.version == 2)
    })
    .await;
    let rows = client
        .lookup("m", "t", &[7, 5000, 8])
        .await
        .expect("lookup");
    assert_eq!(rows.found, vec![true, true, true]);
    let mut expected = rows_of(2, &[7, 5000], DIM);
    expected.extend(rows_of(1, &[8], DIM));
    assert_eq!(rows.values, expected);

    // Online writes: upsert, then delete; bad lengths are INVALID_ARGUMENT.
    let ack = client
        .upsert("m", "t", &[9000, 8], &rows_of(3, &[9000, 8], DIM))
        .await
        .expect("upsert");
    assert_eq!(ack.rows, 2);
    let rows = client.lookup("m", "t", &[9000, 8]).await.expect("lookup");
    assert_eq!(rows.found, vec![true, true]);
    assert_eq!(rows.values, rows_of(3, &[9000, 8], DIM));
    client.delete("m", "t", &[9000]).await.expect("delete");
    let rows = client.lookup("m", "t", &[9000]).await.expect("lookup");
    assert_eq!(rows.found, vec![false]);
    let err = client
        .upsert("m", "t", &[1], &[1.0, 2.0])
        .await
        .expect_err("short values");
    assert_eq!(code(&err), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("dim 4"), "{err}");
    let err = client
        .push("m", "t", &[1], &[0.1; DIM as usize])
        .await
        .expect_err("table t has no optimizer");
    assert_eq!(code(&err), Some(Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("no optimizer"), "{err}");
    // Put key 8 back as published, so the checks below see version rows only.
    client
        .upsert("m", "t", &[8], &rows_of(1, &[8], DIM))
        .await
        .expect("upsert");

    // Status over gRPC and HTTP agree.
    let status = client.status().await.expect("status");
    assert!(status.ready);
    let m = status
        .models
        .iter()
        .find(|m| m.name == "m")
        .expect("model m");
    assert_eq!(m.serving_version, Some(2));
    assert_eq!(m.state, "serving");
    let (code_http, body) = http_get(&node.admin, "/status");
    assert_eq!(code_http, 200);
    let json: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    assert_eq!(json["ready"], true);
    assert_eq!(json["models"][0]["serving_version"], 2);

    // Metrics count what happened.
    let (code_http, metrics) = http_get(&node.admin, "/metrics");
    assert_eq!(code_http, 200);
    let sample = |name: &str, labels: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && labels.split(',').all(|p| l.contains(p)))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no sample {name}{{{labels}}} in\n{metrics}"))
    };
    assert!(
        sample(
            "hopps_lookup_requests_total",
            r#"model="m",table="t",code="ok""#
        ) >= 3.0
    );
    assert!(
        sample(
            "hopps_lookup_requests_total",
            r#"model="m",table="e",code="not_found""#
        ) >= 1.0
    );
    assert!(sample("hopps_lookup_misses_total", r#"model="m",table="t""#) >= 1.0);
    assert_eq!(sample("hopps_model_serving_version", r#"model="m""#), 2.0);
    assert_eq!(sample("hopps_ready", ""), 1.0);
    assert_eq!(sample("hopps_table_rows", r#"model="m",table="t""#), 1001.0);
    assert!(
        metrics.contains("hopps_lookup_duration_seconds_bucket"),
        "histogram buckets"
    );
    assert!(
        sample(
            "hopps_write_requests_total",
            r#"model="m",table="t",op="upsert",code="ok""#
        ) >= 2.0
    );
    assert!(
        sample(
            "hopps_write_requests_total",
            r#"model="m",table="t",op="upsert",code="invalid_argument""#
        ) >= 1.0
    );
    // Tables never asked for have their series at 0 already.
    assert_eq!(
        sample(
            "hopps_lookup_requests_total",
            r#"model="m",table="r",code="resource_exhausted""#
        ),
        0.0
    );

    // Graceful stop.
    node.stop.send(true).expect("stop");
    tokio::time::timeout(Duration::from_secs(15), node.task)
        .await
        .expect("stops within the grace period")
        .expect("task")
        .expect("clean stop");
}
