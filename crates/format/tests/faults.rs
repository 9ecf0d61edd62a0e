//! A publish is all or nothing: storage that fails, writes partially or is slow at any step
//! never leaves a committed version that differs from what was published.

mod common;

use std::time::Duration;

use common::{create, walk};
use hopps_format::fault::{Fault, FaultLayer};
use hopps_format::{PublishSummary, Repository, StorageOptions, TableArrays, VersionKind};

fn faulty(dir: &tempfile::TempDir, faults: &FaultLayer) -> Repository {
    let b = opendal::services::Fs::default().root(dir.path().to_str().unwrap());
    let op = opendal::Operator::new(b).unwrap().layer(faults.clone());
    Repository::from_operator("faulty", op)
}

async fn clean(dir: &tempfile::TempDir) -> Repository {
    Repository::open(dir.path().to_str().unwrap(), &StorageOptions::default())
        .await
        .unwrap()
}

const N: usize = 20_000;

fn data(seed: f32) -> (Vec<u64>, Vec<f32>) {
    (
        (0..N as u64).collect(),
        (0..N * 8).map(|i| seed + i as f32).collect(),
    )
}

async fn publish(
    repo: &Repository,
    kind: VersionKind,
    seed: f32,
) -> hopps_format::Result<PublishSummary> {
    let (keys, values) = data(seed);
    // Small files so that a publish writes many of them.
    let mut opts = create("m", 4, &[("emb", 8)]);
    opts.max_rows_per_file = Some(1000);
    repo.publish_arrays(
        "m",
        kind,
        &[TableArrays {
            table: "emb",
            dim: 8,
            keys: &keys,
            values: &values,
            deleted: None,
        }],
        &opts,
    )
    .await
}

/// The committed versions and the sum of all values of each, read through a clean repository.
async fn state(dir: &tempfile::TempDir) -> Vec<(u64, f64, u64)> {
    let repo = clean(dir).await;
    let mut out = Vec::new();
    for m in repo.versions("m").await.unwrap().committed {
        let mut r = repo.read_table(&m, "emb").await.unwrap();
        let (mut sum, mut rows) = (0f64, 0u64);
        while let Some(b) = r.next_batch().await.unwrap() {
            sum += b.values.iter().map(|&v| f64::from(v)).sum::<f64>();
            rows += b.len() as u64;
        }
        out.push((m.version, sum, rows));
    }
    out
}

fn expected_sum(seed: f32) -> f64 {
    data(seed).1.iter().map(|&v| f64::from(v)).sum()
}

#[tokio::test]
async fn every_write_fault_leaves_only_the_previous_version() {
    let cases = [
        (
            "refused data file",
            FaultLayer::new().rule("versions/00000000000000000002/emb/part", 5, Fault::Fail),
        ),
        (
            "partial data file",
            FaultLayer::new().rule("versions/00000000000000000002/emb/part", 3, Fault::Partial),
        ),
        (
            "data file close fails",
            FaultLayer::new().rule(
                "versions/00000000000000000002/emb/part",
                7,
                Fault::FailClose,
            ),
        ),
        (
            "manifest refused",
            FaultLayer::new().rule("MANIFEST.json", 0, Fault::Fail),
        ),
        (
            "manifest partial",
            FaultLayer::new().rule("MANIFEST.json", 0, Fault::Partial),
        ),
    ];
    for (what, faults) in cases {
        let dir = tempfile::tempdir().unwrap();
        publish(&clean(&dir).await, VersionKind::Full, 1.0)
            .await
            .unwrap();
        let repo = faulty(&dir, &faults);
        let err = publish(&repo, VersionKind::Full, 2.0).await.unwrap_err();
        assert!(faults.injected() > 0, "{what}: no fault injected");
        assert!(
            err.to_string().contains("00000000000000000002"),
            "{what}: {err}"
        );
        let st = state(&dir).await;
        assert_eq!(st, vec![(1, expected_sum(1.0), N as u64)], "{what}");
        // Cleanup removed every file of the failed publish, a partly written manifest included.
        let leftovers: Vec<_> = walk(&dir.path().join("m/versions/00000000000000000002"));
        assert!(leftovers.is_empty(), "{what}: {leftovers:?}");
    }
}

#[tokio::test]
async fn failed_cleanup_leaves_an_aborted_directory_that_readers_ignore() {
    let dir = tempfile::tempdir().unwrap();
    publish(&clean(&dir).await, VersionKind::Full, 1.0)
        .await
        .unwrap();
    let faults = FaultLayer::new()
        .rule("MANIFEST.json", 0, Fault::Fail)
        .rule("versions/00000000000000000002/", 0, Fault::FailDelete);
    let err = publish(&faulty(&dir, &faults), VersionKind::Delta, 2.0)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("MANIFEST.json"), "{err}");
    assert!(
        !walk(&dir.path().join("m/versions/00000000000000000002")).is_empty(),
        "cleanup should have failed"
    );

    let repo = clean(&dir).await;
    let listing = repo.versions("m").await.unwrap();
    assert_eq!(
        listing
            .committed
            .iter()
            .map(|m| m.version)
            .collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(listing.aborted, vec![2]);
    // The next publish takes a fresh number and is unaffected by the debris.
    let s = publish(&repo, VersionKind::Delta, 3.0).await.unwrap();
    assert_eq!(s.version, 3);
    let st = state(&dir).await;
    assert_eq!(
        st,
        vec![
            (1, expected_sum(1.0), N as u64),
            (3, expected_sum(3.0), N as u64)
        ]
    );
}

#[tokio::test]
async fn slow_storage_still_publishes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let faults = FaultLayer::new().rule("part-", 0, Fault::Slow(Duration::from_millis(20)));
    let repo = faulty(&dir, &faults);
    publish(&repo, VersionKind::Full, 1.0).await.unwrap();
    assert!(faults.injected() >= 20, "{}", faults.injected());
    assert_eq!(state(&dir).await, vec![(1, expected_sum(1.0), N as u64)]);
}

#[tokio::test]
async fn a_failed_checkpoint_is_never_visible() {
    let dir = tempfile::tempdir().unwrap();
    publish(&clean(&dir).await, VersionKind::Full, 1.0)
        .await
        .unwrap();
    let keys: Vec<u64> = (0..1000).collect();
    let rows = vec![3u8; 1000 * 16];
    for fault in [Fault::Partial, Fault::FailClose, Fault::Fail] {
        let faults = FaultLayer::new().rule("shard-00001", 0, fault.clone());
        let repo = faulty(&dir, &faults);
        let mut w = repo.checkpoint_writer("m", 1).await.unwrap();
        w.write_segment("emb", 0, "f32", 4, 16, &keys, &rows)
            .await
            .unwrap();
        let err = w
            .write_segment("emb", 1, "f32", 4, 16, &keys, &rows)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("shard-00001"), "{fault:?}: {err}");
        w.abort().await;
        assert!(
            clean(&dir).await.checkpoints("m").await.unwrap().is_empty(),
            "{fault:?}"
        );
    }
}

#[tokio::test]
async fn a_torn_manifest_reads_as_aborted() {
    // Storages that can neither rename nor write conditionally may leave a manifest cut short
    // when a publisher dies mid-write; such a version reads as aborted, not as damage.
    let dir = tempfile::tempdir().unwrap();
    publish(&clean(&dir).await, VersionKind::Full, 1.0)
        .await
        .unwrap();
    let v1 = std::fs::read(
        dir.path()
            .join("m/versions/00000000000000000001/MANIFEST.json"),
    )
    .unwrap();
    let v2 = dir.path().join("m/versions/00000000000000000002");
    std::fs::create_dir_all(&v2).unwrap();
    std::fs::write(v2.join("MANIFEST.json"), &v1[..v1.len() / 2]).unwrap();
    let listing = clean(&dir).await.versions("m").await.unwrap();
    assert_eq!(
        listing
            .committed
            .iter()
            .map(|m| m.version)
            .collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(listing.aborted, vec![2]);
    // A complete manifest that does not parse is damage, and says so.
    std::fs::write(
        v2.join("MANIFEST.json"),
        b"{\"format_version\": 1, \"model\": 5}",
    )
    .unwrap();
    let err = clean(&dir).await.versions("m").await.unwrap_err();
    assert!(
        err.to_string()
            .contains("00000000000000000002/MANIFEST.json"),
        "{err}"
    );
}
