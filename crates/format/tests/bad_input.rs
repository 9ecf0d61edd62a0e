//! Bad input, one test each: the error names the file or version and says what to do, and
//! nothing is half-published.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{create, walk, write_npy, write_parquet, write_parquet_spark};
use hopps_format::{
    ErrorKind, InputFile, PublishOptions, PublishRequest, Repository, StorageOptions, TableArrays,
    TableInput, VersionKind,
};

async fn open(dir: &tempfile::TempDir) -> Repository {
    Repository::open(
        dir.path().join("repo").to_str().unwrap(),
        &StorageOptions::default(),
    )
    .await
    .unwrap()
}

fn req(
    model: &str,
    kind: VersionKind,
    dim: u32,
    inputs: Vec<InputFile>,
    options: PublishOptions,
) -> PublishRequest {
    PublishRequest {
        model: model.into(),
        kind,
        tables: vec![TableInput {
            table: "emb".into(),
            dim,
            inputs,
        }],
        options,
    }
}

async fn publish(
    repo: &Repository,
    r: &PublishRequest,
) -> hopps_format::Result<hopps_format::PublishSummary> {
    repo.publish(r, &|_| {}).await
}

/// A model with one committed full version (keys 0..100, dim 4).
async fn seeded(dir: &tempfile::TempDir) -> Repository {
    let repo = open(dir).await;
    let keys: Vec<u64> = (0..100).collect();
    let values = vec![0.25f32; 400];
    repo.publish_arrays(
        "m",
        VersionKind::Full,
        &[TableArrays {
            table: "emb",
            dim: 4,
            keys: &keys,
            values: &values,
            deleted: None,
        }],
        &create("m", 4, &[("emb", 4)]),
    )
    .await
    .unwrap();
    repo
}

async fn committed(repo: &Repository) -> Vec<u64> {
    repo.versions("m")
        .await
        .unwrap()
        .committed
        .iter()
        .map(|m| m.version)
        .collect()
}

/// No file or directory of any version beyond `keep` remains in the repository.
fn no_files_beyond(dir: &tempfile::TempDir, keep: u64) {
    for e in std::fs::read_dir(dir.path().join("repo/m/versions"))
        .unwrap()
        .flatten()
    {
        let v: u64 = e.file_name().to_str().unwrap().parse().unwrap();
        assert!(v <= keep, "directory left behind: {}", e.path().display());
    }
    for p in walk(&dir.path().join("repo/m/versions")) {
        let v: u64 = p
            .components()
            .filter_map(|c| {
                c.as_os_str()
                    .to_str()
                    .and_then(|s| (s.len() == 20).then(|| s.parse().ok()).flatten())
            })
            .next()
            .unwrap();
        assert!(v <= keep, "left behind: {}", p.display());
    }
}

#[tokio::test]
async fn truncated_parquet_input_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let repo = seeded(&dir).await;
    let f = dir.path().join("in.parquet");
    write_parquet(&f, 4, &[1, 2, 3], &[1.0; 12], None);
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 20]).unwrap();
    let err = publish(
        &repo,
        &req(
            "m",
            VersionKind::Full,
            4,
            vec![InputFile::Parquet(f.clone())],
            Default::default(),
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(
        err.to_string().contains("in.parquet") && err.to_string().contains("write it again"),
        "{err}"
    );
    assert_eq!(committed(&repo).await, vec![1]);
    no_files_beyond(&dir, 1);
}

#[tokio::test]
async fn corrupt_stored_file_fails_its_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let repo = seeded(&dir).await;
    let m = repo.manifest("m", 1).await.unwrap();
    let file = &m.tables[0].files[0];
    let path = dir
        .path()
        .join("repo/m/versions/00000000000000000001")
        .join(&file.path);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[40] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();
    let mut r = repo.read_table(&m, "emb").await.unwrap();
    let err = loop {
        match r.next_batch().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a damaged file was read without error"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    let msg = err.to_string();
    assert!(
        msg.contains(&file.path) && msg.contains("checksum") && msg.contains("republish"),
        "{msg}"
    );
}

#[tokio::test]
async fn truncated_stored_file_is_a_size_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let repo = seeded(&dir).await;
    let m = repo.manifest("m", 1).await.unwrap();
    let file = &m.tables[0].files[2];
    let path = dir
        .path()
        .join("repo/m/versions/00000000000000000001")
        .join(&file.path);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let mut r = repo.read_table(&m, "emb").await.unwrap();
    let err = loop {
        match r.next_batch().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a truncated file was read without error"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(
        err.to_string().contains("truncated") && err.to_string().contains(&file.path),
        "{err}"
    );

    // A manifest naming a file that is gone.
    std::fs::remove_file(&path).unwrap();
    let mut r = repo.read_table(&m, "emb").await.unwrap();
    let err = loop {
        match r.next_batch().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a missing file was not reported"),
            Err(e) => break e,
        }
    };
    assert!(err.to_string().contains("missing"), "{err}");
}

#[tokio::test]
async fn wrong_dim_names_file_row_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let repo = seeded(&dir).await;
    // Spark-style list<float32>, one row too short.
    let f = dir.path().join("part-0.parquet");
    write_parquet_spark(
        &f,
        &[10, 11, 12],
        &[vec![1.0; 4], vec![1.0; 4], vec![1.0; 3]],
    );
    let err = publish(
        &repo,
        &req(
            "m",
            VersionKind::Delta,
            4,
            vec![InputFile::Parquet(f)],
            Default::default(),
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let msg = err.to_string();
    assert!(
        msg.contains("part-0.parquet")
            && msg.contains("row 2")
            && msg.contains("key 12")
            && msg.contains("dim is 4"),
        "{msg}"
    );

    // A fixed-size list of the wrong width.
    let f = dir.path().join("wide.parquet");
    write_parquet(&f, 8, &[1], &[0.0; 8], None);
    let err = publish(
        &repo,
        &req(
            "m",
            VersionKind::Delta,
            4,
            vec![InputFile::Parquet(f)],
            Default::default(),
        ),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("8 values per row") && err.to_string().contains("dim is 4"),
        "{err}"
    );

    // The table's dim differs from the input's declared dim.
    let keys = [1u64];
    let err = repo
        .publish_arrays(
            "m",
            VersionKind::Delta,
            &[TableArrays {
                table: "emb",
                dim: 8,
                keys: &keys,
                values: &[0.0; 8],
                deleted: None,
            }],
            &Default::default(),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("has dim 4, but the input has dim 8"),
        "{err}"
    );
    assert_eq!(committed(&repo).await, vec![1]);
    no_files_beyond(&dir, 1);
}

#[tokio::test]
async fn non_finite_values_are_counted_and_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let repo = seeded(&dir).await;
    let keys: Vec<u64> = (500..600).collect();
    let mut values = vec![1.0f32; 400];
    values[4 * 7 + 1] = f32::NAN; // key 507
    values[4 * 9] = f32::INFINITY; // key 509
    values[4 * 9 + 2] = f32::NAN; // same row: counted once
    values[4 * 50 + 3] = f32::NEG_INFINITY; // key 550
    let f = dir.path().join("nan.parquet");
    write_parquet(&f, 4, &keys, &values, None);
    let r = req(
        "m",
        VersionKind::Delta,
        4,
        vec![InputFile::Parquet(f.clone())],
        Default::default(),
    );
    let err = publish(&repo, &r).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let msg = err.to_string();
    assert!(
        msg.contains("3 rows hold NaN or infinite")
            && msg.contains("key 507")
            && msg.contains("nan.parquet"),
        "{msg}"
    );
    assert!(msg.contains("--allow-non-finite"), "{msg}");
    assert_eq!(committed(&repo).await, vec![1]);
    no_files_beyond(&dir, 1);

    let allowed = PublishOptions {
        allow_non_finite: true,
        ..Default::default()
    };
    let s = publish(
        &repo,
        &req(
            "m",
            VersionKind::Delta,
            4,
            vec![InputFile::Parquet(f)],
            allowed,
        ),
    )
    .await
    .unwrap();
    assert_eq!(s.rows, 100);
}

#[tokio::test]
async fn duplicate_keys_are_reported_and_the_last_row_wins() {
    let dir = tempfile::tempdir().unwrap();
    let repo = seeded(&dir).await;
    let f = dir.path().join("dup.csv");
    std::fs::write(
        &f,
        "key,a,b,c,d\n7,1,1,1,1\n8,2,2,2,2\n7,3,3,3,3\n7,4,4,4,4\n",
    )
    .unwrap();
    let s = publish(
        &repo,
        &req(
            "m",
            VersionKind::Delta,
            4,
            vec![InputFile::Csv {
                path: f,
                delimiter: b',',
            }],
            Default::default(),
        ),
    )
    .await
    .unwrap();
    let m = repo.manifest("m", s.version).await.unwrap();
    assert_eq!(m.tables[0].duplicates, 2);
    // Readers see the rows in input order, so applying them leaves key 7 = the last row.
    let mut r = repo.read_table(&m, "emb").await.unwrap();
    let mut last7 = None;
    while let Some(b) = r.next_batch().await.unwrap() {
        for (i, k) in b.keys.iter().enumerate() {
            if *k == 7 {
                last7 = Some(b.values[i * 4]);
            }
        }
    }
    assert_eq!(last7, Some(4.0));
}

#[tokio::test]
async fn delta_without_an_existing_parent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(&dir).await;
    let keys = [1u64];
    let t = [TableArrays {
        table: "emb",
        dim: 1,
        keys: &keys,
        values: &[1.0],
        deleted: None,
    }];
    // No version at all yet.
    let err = repo
        .publish_arrays("m", VersionKind::Delta, &t, &create("m", 1, &[("emb", 1)]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(
        err.to_string().contains("publish a full version first"),
        "{err}"
    );
    repo.publish_arrays("m", VersionKind::Full, &t, &PublishOptions::default())
        .await
        .unwrap();
    // A parent that does not exist.
    let err = repo
        .publish_arrays(
            "m",
            VersionKind::Delta,
            &t,
            &PublishOptions {
                parent: Some(9),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(
        err.to_string().contains("parent version 9") && err.to_string().contains("committed: 1"),
        "{err}"
    );
    assert_eq!(repo.versions("m").await.unwrap().committed.len(), 1);
}

#[tokio::test]
async fn unknown_format_version_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let repo = seeded(&dir).await;
    let mpath = dir
        .path()
        .join("repo/m/versions/00000000000000000001/MANIFEST.json");
    let text = std::fs::read_to_string(&mpath)
        .unwrap()
        .replace("\"format_version\": 1", "\"format_version\": 99");
    std::fs::write(&mpath, text).unwrap();
    let err = repo.versions("m").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let msg = err.to_string();
    assert!(
        msg.contains("00000000000000000001/MANIFEST.json")
            && msg.contains("format_version 99")
            && msg.contains("upgrade hopps"),
        "{msg}"
    );

    let spath = dir.path().join("repo/m/model.json");
    let text = std::fs::read_to_string(&spath)
        .unwrap()
        .replace("\"format_version\": 1", "\"format_version\": 2");
    std::fs::write(&spath, text).unwrap();
    let err = repo.model("m").await.unwrap_err();
    assert!(
        err.to_string().contains("model.json") && err.to_string().contains("format_version 2"),
        "{err}"
    );
}

#[tokio::test]
async fn unreachable_s3_endpoint_fails_within_the_timeout() {
    // A port that was free a moment ago: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let opts = StorageOptions {
        s3_endpoint: Some(format!("http://127.0.0.1:{port}")),
        s3_region: Some("us-east-1".into()),
        s3_access_key_id: Some("k".into()),
        s3_secret_access_key: Some("s".into()),
        timeout: Duration::from_secs(2),
        retries: 1,
        ..Default::default()
    };
    let t0 = Instant::now();
    let err = Repository::open("s3://bucket/models", &opts)
        .await
        .unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t0.elapsed()
    );
    assert!(
        matches!(err.kind(), ErrorKind::Unavailable | ErrorKind::Io),
        "{err:?}"
    );
    let msg = format!("{err}");
    assert!(
        msg.contains("s3://bucket/models") && msg.contains("reachable"),
        "{msg}"
    );

    // A listener that accepts and never answers: the timeout, not the OS, ends the wait.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let opts = StorageOptions {
        s3_endpoint: Some(format!("http://{}", silent.local_addr().unwrap())),
        ..opts
    };
    let t0 = Instant::now();
    let err = Repository::open("s3://bucket/models", &opts)
        .await
        .unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err:?}");
    assert!(err.is_retryable());
    drop(silent);
}

#[tokio::test]
async fn npy_pair_and_bad_npy_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let repo = seeded(&dir).await;
    let k: Vec<u8> = [1u64, 2, 3].iter().flat_map(|k| k.to_le_bytes()).collect();
    let v: Vec<u8> = (0..12).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let (kp, vp) = (dir.path().join("k.npy"), dir.path().join("v.npy"));
    write_npy(&kp, "<u8", "(3,)", &k);
    write_npy(&vp, "<f4", "(3, 4)", &v);
    let npy = || InputFile::Npy {
        keys: kp.clone(),
        values: vp.clone(),
    };
    let s = publish(
        &repo,
        &req("m", VersionKind::Delta, 4, vec![npy()], Default::default()),
    )
    .await
    .unwrap();
    assert_eq!(s.rows, 3);
    // float64 values are refused with the fix.
    write_npy(&vp, "<f8", "(3, 4)", &[0u8; 96]);
    let err = publish(
        &repo,
        &req("m", VersionKind::Delta, 4, vec![npy()], Default::default()),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("astype(np.float32)"), "{err}");
    // Truncated values.
    write_npy(&vp, "<f4", "(3, 4)", &v[..40]);
    let err = publish(
        &repo,
        &req("m", VersionKind::Delta, 4, vec![npy()], Default::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(
        err.to_string().contains("v.npy") && err.to_string().contains("truncated"),
        "{err}"
    );
    assert_eq!(committed(&repo).await, vec![1, 2]);
}

#[tokio::test]
async fn deletes_in_a_full_version_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let repo = seeded(&dir).await;
    let f: PathBuf = dir.path().join("d.parquet");
    write_parquet(&f, 4, &[1, 2], &[0.0; 8], Some(&[false, true]));
    let err = publish(
        &repo,
        &req(
            "m",
            VersionKind::Full,
            4,
            vec![InputFile::Parquet(f)],
            Default::default(),
        ),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("key 2 is marked deleted") && err.to_string().contains("--delta"),
        "{err}"
    );
    assert_eq!(committed(&repo).await, vec![1]);
    no_files_beyond(&dir, 1);
}
