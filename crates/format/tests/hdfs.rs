//! HDFS support compiles and fails cleanly on an unreachable namenode. No HDFS cluster runs on
//! our test machines, so reads and writes against a live namenode are not tested here.
#![cfg(feature = "hdfs")]

use std::time::{Duration, Instant};

use hopps_format::{ErrorKind, Repository, StorageOptions};

fn opts() -> StorageOptions {
    StorageOptions {
        timeout: Duration::from_secs(2),
        retries: 1,
        ..Default::default()
    }
}

#[tokio::test]
async fn refused_namenode_fails_within_the_timeout() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = format!("hdfs://127.0.0.1:{port}/models");
    let t0 = Instant::now();
    let err = Repository::open(&uri, &opts()).await.unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    assert!(
        matches!(
            err.kind(),
            ErrorKind::Unavailable | ErrorKind::Io | ErrorKind::InvalidInput
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains(&uri), "{err}");
}

#[tokio::test]
async fn silent_namenode_fails_within_the_timeout() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("hdfs://{}/models", silent.local_addr().unwrap());
    let t0 = Instant::now();
    let err = Repository::open(&uri, &opts()).await.unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err:?}");
    drop(silent);
}
