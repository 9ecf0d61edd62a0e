//! The repository on a real S3-compatible server (s3s + s3s-fs) started by the test on
//! 127.0.0.1. These tests fail, never skip, when the server cannot start.

mod common;

use std::time::Duration;

use common::create;
use hopps_format::{
    ErrorKind, HistoryRecord, Repository, StorageOptions, TableArrays, VersionKind,
};
use hyper_util::rt::{TokioExecutor, TokioIo};

const ACCESS_KEY: &str = "hopps-test-access";
const SECRET_KEY: &str = "hopps-test-secret-key";

/// An S3 server on an OS-chosen port; dropped with the test's runtime.
struct S3Server {
    endpoint: String,
    root: tempfile::TempDir,
}

async fn start_s3(bucket: &str) -> S3Server {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join(bucket)).unwrap();
    let fs = s3s_fs::FileSystem::new(root.path()).unwrap();
    let mut b = s3s::service::S3ServiceBuilder::new(fs);
    b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
    let service = b.build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            let conn = http
                .serve_connection(TokioIo::new(socket), service.clone())
                .into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    });
    S3Server {
        endpoint: format!("http://{addr}"),
        root,
    }
}

fn opts(s3: &S3Server) -> StorageOptions {
    StorageOptions {
        s3_endpoint: Some(s3.endpoint.clone()),
        s3_region: Some("us-east-1".into()),
        s3_access_key_id: Some(ACCESS_KEY.into()),
        s3_secret_access_key: Some(SECRET_KEY.into()),
        timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_read_checkpoint_and_history_on_s3() {
    let s3 = start_s3("hopps").await;
    let repo = Repository::open("s3://hopps/models/prod", &opts(&s3))
        .await
        .expect("open S3 repository");

    let keys: Vec<u64> = (0..30_000).collect();
    let values: Vec<f32> = (0..30_000 * 8).map(|i| (i % 1000) as f32).collect();
    let mut o = create("ctr", 8, &[("user", 8)]);
    o.max_rows_per_file = Some(2000);
    let s = repo
        .publish_arrays(
            "ctr",
            VersionKind::Full,
            &[TableArrays {
                table: "user",
                dim: 8,
                keys: &keys,
                values: &values,
                deleted: None,
            }],
            &o,
        )
        .await
        .unwrap();
    assert_eq!((s.version, s.rows), (1, 30_000));
    // The objects are really in the bucket, under the prefix.
    assert!(
        s3.root
            .path()
            .join("hopps/models/prod/ctr/versions/00000000000000000001/MANIFEST.json")
            .exists()
    );

    let dk = [5u64, 6];
    let del = [true, false];
    repo.publish_arrays(
        "ctr",
        VersionKind::Delta,
        &[TableArrays {
            table: "user",
            dim: 8,
            keys: &dk,
            values: &[1.0; 16],
            deleted: Some(&del),
        }],
        &Default::default(),
    )
    .await
    .unwrap();

    assert_eq!(repo.list_models().await.unwrap(), vec!["ctr"]);
    let listing = repo.versions("ctr").await.unwrap();
    assert_eq!(
        listing
            .committed
            .iter()
            .map(|m| (m.version, m.kind))
            .collect::<Vec<_>>(),
        vec![(1, VersionKind::Full), (2, VersionKind::Delta)]
    );

    let m = repo.manifest("ctr", 1).await.unwrap();
    assert!(
        m.tables[0].files.len() >= 15,
        "{} files",
        m.tables[0].files.len()
    );
    let mut r = repo.read_table(&m, "user").await.unwrap();
    let mut got = vec![None; 30_000];
    while let Some(b) = r.next_batch().await.unwrap() {
        for (i, &k) in b.keys.iter().enumerate() {
            got[k as usize] = Some(b.values[i * 8..i * 8 + 8].to_vec());
        }
    }
    for k in 0..30_000 {
        assert_eq!(
            got[k].as_deref(),
            Some(&values[k * 8..k * 8 + 8]),
            "key {k}"
        );
    }

    let seg_keys: Vec<u64> = (0..10_000).collect();
    let rows: Vec<u8> = (0..10_000 * 18).map(|i| (i % 253) as u8).collect();
    let mut w = repo.checkpoint_writer("ctr", 2).await.unwrap();
    w.write_segment("user", 3, "int8", 8, 18, &seg_keys, &rows)
        .await
        .unwrap();
    let cp = w.commit(Some(12)).await.unwrap();
    let cps = repo.checkpoints("ctr").await.unwrap();
    assert_eq!(cps, vec![cp.clone()]);
    let seg = repo
        .read_segment(&cp, &cp.tables[0].files[0])
        .await
        .unwrap();
    assert_eq!(
        (seg.keys.as_slice(), seg.rows.as_slice()),
        (seg_keys.as_slice(), rows.as_slice())
    );
    repo.delete_checkpoint("ctr", 2).await.unwrap();
    assert!(repo.checkpoints("ctr").await.unwrap().is_empty());

    let rec = HistoryRecord {
        seq: 0,
        time: String::new(),
        event: "rollback".into(),
        version: 1,
        from_version: Some(2),
        node: "n".into(),
        detail: String::new(),
    };
    assert_eq!(repo.append_history("ctr", &rec).await.unwrap(), 1);
    assert_eq!(repo.append_history("ctr", &rec).await.unwrap(), 2);
    assert_eq!(repo.history("ctr").await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_object_and_wrong_credentials_on_s3() {
    let s3 = start_s3("hopps").await;
    let repo = Repository::open("s3://hopps/r", &opts(&s3)).await.unwrap();
    let keys: Vec<u64> = (0..100).collect();
    repo.publish_arrays(
        "m",
        VersionKind::Full,
        &[TableArrays {
            table: "t",
            dim: 2,
            keys: &keys,
            values: &[0.5; 200],
            deleted: None,
        }],
        &create("m", 1, &[("t", 2)]),
    )
    .await
    .unwrap();
    let m = repo.manifest("m", 1).await.unwrap();
    let obj = s3
        .root
        .path()
        .join("hopps/r/m/versions/00000000000000000001")
        .join(&m.tables[0].files[0].path);
    let mut bytes = std::fs::read(&obj).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&obj, &bytes).unwrap();
    let mut r = repo.read_table(&m, "t").await.unwrap();
    let err = r.next_batch().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(
        err.to_string().contains("s3://hopps/r") && err.to_string().contains("checksum"),
        "{err}"
    );

    let bad = StorageOptions {
        s3_secret_access_key: Some("wrong".into()),
        ..opts(&s3)
    };
    let err = Repository::open("s3://hopps/r", &bad).await.unwrap_err();
    assert!(err.to_string().contains("s3://hopps/r"), "{err}");
    assert!(
        !err.is_retryable(),
        "bad credentials are not retryable: {err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_overtaken_on_its_version_number_gets_a_conflict_on_s3() {
    use hopps_format::fault::{Fault, FaultLayer};
    let s3 = start_s3("hopps").await;
    let repo = Repository::open("s3://hopps/race", &opts(&s3))
        .await
        .unwrap();
    let keys: Vec<u64> = (0..10).collect();
    let t = [TableArrays {
        table: "t",
        dim: 1,
        keys: &keys,
        values: &[1.0; 10],
        deleted: None,
    }];
    repo.publish_arrays("m", VersionKind::Full, &t, &create("m", 1, &[("t", 1)]))
        .await
        .unwrap();

    // Publisher A picks version 2, then stalls on its first data file ...
    let slow = FaultLayer::new().rule("part-", 0, Fault::Slow(Duration::from_millis(1500)));
    let b = opendal::services::S3::default()
        .bucket("hopps")
        .root("/race")
        .endpoint(&s3.endpoint)
        .region("us-east-1")
        .access_key_id(ACCESS_KEY)
        .secret_access_key(SECRET_KEY);
    let slow_repo = Repository::from_operator(
        "s3://hopps/race",
        opendal::Operator::new(b).unwrap().layer(slow.clone()),
    );
    let a = tokio::spawn(async move {
        let keys: Vec<u64> = (100..110).collect();
        let t = [TableArrays {
            table: "t",
            dim: 1,
            keys: &keys,
            values: &[2.0; 10],
            deleted: None,
        }];
        slow_repo
            .publish_arrays("m", VersionKind::Delta, &t, &Default::default())
            .await
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while slow.injected() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "publisher A never started writing"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ... while B, which also sees version 1 as the newest, commits version 2 first.
    let sb = repo
        .publish_arrays("m", VersionKind::Delta, &t, &Default::default())
        .await
        .unwrap();
    assert_eq!(sb.version, 2);
    let err = a.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    assert!(
        err.to_string().contains("version 2") && err.to_string().contains("publish again"),
        "{err}"
    );
    let listing = repo.versions("m").await.unwrap();
    assert_eq!(
        listing
            .committed
            .iter()
            .map(|m| m.version)
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
    // Version 2 is B's, whole: A's files are not in it.
    let m2 = repo.manifest("m", 2).await.unwrap();
    let mut r = repo.read_table(&m2, "t").await.unwrap();
    let mut seen = Vec::new();
    while let Some(b) = r.next_batch().await.unwrap() {
        seen.extend(b.keys);
    }
    seen.sort_unstable();
    assert_eq!(seen, keys);
}
