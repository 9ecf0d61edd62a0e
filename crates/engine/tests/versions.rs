//! Loads, deltas, pinned versions, rollback (undo and rebuild), history, checkpoints, restarts.

mod common;

use std::time::Duration;

use common::*;
use hopps_engine::{Engine, ErrorKind};
use hopps_format::MissingPolicy;

fn base_rows(n: u64) -> Rows {
    (0..n).map(|k| (k, row_of(k, 1))).collect()
}

fn universe(n: u64) -> Vec<u64> {
    (0..n + 20).collect()
}

#[tokio::test]
async fn loads_the_newest_version_and_applies_deltas_incrementally() {
    let fx = Fixture::new().await;
    let v1_rows = base_rows(500);
    let v1 = publish_full(&fx.repo, &spec(4), &v1_rows).await;
    let up: Rows = (400..600).map(|k| (k, row_of(k, 2))).collect();
    let v2 = publish_delta(&fx.repo, v1, &up, &[1, 2, 3]).await;
    let v2_rows = apply(&v1_rows, &up, &[1, 2, 3]);

    // A fresh node loads the full version and the delta after it.
    let e = fx.engine().await;
    assert!(e.is_ready());
    assert_eq!(assert_rows(&e, &universe(600), &v2_rows, None), v2);

    // A new delta is picked up by one watcher pass.
    let up3: Rows = (0..10).map(|k| (k, row_of(k, 3))).collect();
    let v3 = publish_delta(&fx.repo, v2, &up3, &[599]).await;
    e.poll_repository().await.unwrap();
    let v3_rows = apply(&v2_rows, &up3, &[599]);
    assert_eq!(assert_rows(&e, &universe(600), &v3_rows, None), v3);

    let st = e.status();
    assert!(st.ready);
    let ms = &st.models[0];
    assert_eq!(ms.serving_version, Some(v3));
    assert_eq!(ms.newest_version, Some(v3));
    assert_eq!(ms.rows, v3_rows.len() as u64);
    assert!(ms.undo_bytes > 0, "the delta's undo record is kept");
    let versions = e.versions(MODEL).await.unwrap();
    let states: Vec<(u64, &str)> = versions
        .iter()
        .map(|v| (v.version, v.state.as_str()))
        .collect();
    assert_eq!(
        states,
        vec![(v1, "committed"), (v2, "committed"), (v3, "serving")]
    );
    // The old version is no longer readable.
    let mut out = vec![0f32; DIM];
    let mut found = vec![false];
    let err = e
        .lookup(MODEL, TABLE, &[5], Some(v2), &mut out, &mut found)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.to_string().contains(&format!("version {v2}")), "{err}");
}

/// The packed lookup (rows as the wire's little-endian f32) equals the decoded one for every
/// dtype, found and missing keys (including the per-key random init), and fails the same way.
#[tokio::test]
async fn packed_lookups_equal_decoded_lookups_for_every_dtype() {
    for dtype in ["f32", "f16", "bf16", "int8"] {
        let fx = Fixture::new().await;
        let mut spec = spec_with(
            4,
            MissingPolicy::Random {
                seed: 3,
                scale: 0.5,
            },
            None,
        );
        spec.tables[0].dtype = dtype.to_string();
        publish_full(&fx.repo, &spec, &base_rows(50)).await;
        let e = fx.engine().await;
        let keys: Vec<u64> = (0..80).rev().chain([u64::MAX, 7, 7]).collect();
        let mut out = vec![0f32; keys.len() * DIM];
        let mut found = vec![false; keys.len()];
        let v = e
            .lookup(MODEL, TABLE, &keys, None, &mut out, &mut found)
            .unwrap();
        let mut packed = b"prefix".to_vec();
        let mut packed_found = vec![false; keys.len()];
        let pv = e
            .lookup_packed(MODEL, TABLE, &keys, None, &mut packed, &mut packed_found)
            .unwrap();
        assert_eq!((pv, &packed_found), (v, &found), "{dtype}");
        assert!(
            found.iter().any(|f| !f) && found.iter().any(|f| *f),
            "{dtype}"
        );
        let want: Vec<u8> = b"prefix"
            .iter()
            .copied()
            .chain(out.iter().flat_map(|x| x.to_le_bytes()))
            .collect();
        assert!(
            packed == want,
            "{dtype}: packed rows differ from the decoded ones"
        );
        // A failed lookup leaves the buffer as it was.
        let err = e
            .lookup_packed(MODEL, "nope", &keys, None, &mut packed, &mut packed_found)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert_eq!(packed.len(), want.len());
    }
}

#[tokio::test]
async fn missing_key_policies() {
    let fx = Fixture::new().await;
    let rows = base_rows(10);
    publish_full(
        &fx.repo,
        &spec_with(
            2,
            MissingPolicy::Random {
                seed: 9,
                scale: 0.1,
            },
            None,
        ),
        &rows,
    )
    .await;
    let e = fx.engine().await;
    let keys = [3u64, 1_000_000];
    let mut out = vec![0f32; 2 * DIM];
    let mut found = vec![false; 2];
    e.lookup(MODEL, TABLE, &keys, None, &mut out, &mut found)
        .unwrap();
    assert_eq!(found, vec![true, false]);
    let mut init = vec![0f32; DIM];
    hopps_engine::random_init(9, 0.1, 1_000_000, &mut init);
    assert_eq!(&out[DIM..], &init[..]);
    assert!(init.iter().any(|v| *v != 0.0));
    let meta = e.table_meta(MODEL, TABLE).unwrap();
    assert_eq!(meta.missing, "random");
    assert_eq!(meta.dim, DIM as u32);

    let fx = Fixture::new().await;
    publish_full(&fx.repo, &spec_with(2, MissingPolicy::Error, None), &rows).await;
    let e = fx.engine().await;
    let err = e
        .lookup(MODEL, TABLE, &keys, None, &mut out, &mut found)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("1000000"), "{err}");
    // Bad buffers and unknown names are errors, not panics.
    let err = e
        .lookup(MODEL, TABLE, &keys, None, &mut out[..3], &mut found)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let err = e
        .lookup(MODEL, "nope", &keys, None, &mut out, &mut found)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let err = e
        .lookup("nope", TABLE, &keys, None, &mut out, &mut found)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn instant_rollback_is_recorded_and_honoured() {
    let fx = Fixture::new().await;
    let r1 = base_rows(300);
    let v1 = publish_full(&fx.repo, &spec(4), &r1).await;
    let e = fx.engine().await;
    let u2: Rows = (250..350).map(|k| (k, row_of(k, 2))).collect();
    let v2 = publish_delta(&fx.repo, v1, &u2, &[0, 1]).await;
    e.poll_repository().await.unwrap();
    let r2 = apply(&r1, &u2, &[0, 1]);
    let u3: Rows = (0..50).map(|k| (k, row_of(k, 3))).collect();
    let v3 = publish_delta(&fx.repo, v2, &u3, &[299]).await;
    e.poll_repository().await.unwrap();
    assert_rows(&e, &universe(350), &apply(&r2, &u3, &[299]), None);

    // Back two versions, from undo records.
    let rep = e.rollback(MODEL, v1).await.unwrap();
    assert_eq!((rep.from, rep.to, rep.method.as_str()), (v3, v1, "undo"));
    assert_eq!(assert_rows(&e, &universe(350), &r1, None), v1);

    // The watcher never applies the rolled-back deltas again.
    e.poll_repository().await.unwrap();
    assert_eq!(assert_rows(&e, &universe(350), &r1, None), v1);
    let states: Vec<(u64, String)> = e
        .versions(MODEL)
        .await
        .unwrap()
        .into_iter()
        .map(|v| (v.version, v.state))
        .collect();
    assert_eq!(
        states,
        vec![
            (v1, "serving".into()),
            (v2, "rolled_back".into()),
            (v3, "rolled_back".into())
        ]
    );

    // A later delta whose parent is the rollback target is applied; one on a dead parent is not.
    let u4: Rows = (100..110).map(|k| (k, row_of(k, 4))).collect();
    let v4 = publish_delta(&fx.repo, v1, &u4, &[]).await;
    let stale = publish_delta(&fx.repo, v3, &u4, &[]).await;
    e.poll_repository().await.unwrap();
    let r4 = apply(&r1, &u4, &[]);
    assert_eq!(assert_rows(&e, &universe(350), &r4, None), v4);

    let h = e.history(MODEL).await.unwrap();
    let events: Vec<(String, u64, Option<u64>)> = h
        .iter()
        .map(|h| (h.event.clone(), h.version, h.from_version))
        .collect();
    assert_eq!(
        events,
        vec![
            ("served".into(), v2, Some(v1)),
            ("served".into(), v3, Some(v2)),
            ("rolled_back".into(), v1, Some(v3)),
            ("served".into(), v4, Some(v1)),
        ]
    );
    assert!(h[2].detail.contains("undo"), "{}", h[2].detail);

    // A restarted node serves the same.
    drop(e);
    let e = fx.engine().await;
    assert_eq!(assert_rows(&e, &universe(350), &r4, None), v4);
    assert_ne!(stale, v4);

    // Bad rollbacks are refused.
    assert_eq!(
        e.rollback(MODEL, v4 + 5).await.unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        e.rollback(MODEL, v2).await.unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );
}

#[tokio::test]
async fn rollback_beyond_the_undo_window_rebuilds() {
    let fx = Fixture::new().await;
    let r1 = base_rows(200);
    let v1 = publish_full(&fx.repo, &spec(2), &r1).await;
    let mut c = fx.config();
    c.undo_budget_bytes = 0;
    let e = fx.engine_with(c).await;
    let u2: Rows = (150..250).map(|k| (k, row_of(k, 2))).collect();
    let v2 = publish_delta(&fx.repo, v1, &u2, &[3]).await;
    e.poll_repository().await.unwrap();
    let r2 = apply(&r1, &u2, &[3]);
    // A checkpoint of v2, then another delta: rolling back to v2 starts from that checkpoint.
    let ck = e.checkpoint(MODEL).await.unwrap();
    assert_eq!((ck.version, ck.rows), (v2, r2.len() as u64));
    let u3: Rows = (0..20).map(|k| (k, row_of(k, 3))).collect();
    let v3 = publish_delta(&fx.repo, v2, &u3, &[]).await;
    e.poll_repository().await.unwrap();
    assert_eq!(
        e.status().models[0].undo_bytes,
        0,
        "a zero budget keeps no undo records"
    );

    let rep = e.rollback(MODEL, v2).await.unwrap();
    assert_eq!(rep.method, "rebuild");
    assert_eq!(assert_rows(&e, &universe(250), &r2, None), v2);
    let rep = e.rollback(MODEL, v1).await.unwrap();
    assert_eq!(rep.method, "rebuild");
    assert_eq!(assert_rows(&e, &universe(250), &r1, None), v1);
    assert_ne!(v3, v1);
}

#[tokio::test]
async fn another_node_follows_a_rollback() {
    let fx = Fixture::new().await;
    let r1 = base_rows(100);
    let v1 = publish_full(&fx.repo, &spec(2), &r1).await;
    let u2: Rows = (0..100).map(|k| (k, row_of(k, 2))).collect();
    let v2 = publish_delta(&fx.repo, v1, &u2, &[]).await;
    let a = fx.engine().await;
    let mut cb = fx.config();
    cb.data_dir = fx.dir.path().join("node-b");
    cb.node_id = "node-b".into();
    let b = fx.engine_with(cb).await;
    assert_eq!(assert_rows(&b, &universe(100), &u2, None), v2);
    a.rollback(MODEL, v1).await.unwrap();
    b.poll_repository().await.unwrap();
    assert_eq!(assert_rows(&b, &universe(100), &r1, None), v1);
}

#[tokio::test]
async fn restart_uses_the_newest_checkpoint_and_retention_keeps_the_newest() {
    let fx = Fixture::new().await;
    let r1 = base_rows(100);
    let v1 = publish_full(&fx.repo, &spec(2), &r1).await;
    let mut c = fx.config();
    c.checkpoint_retention = 2;
    let e = fx.engine_with(c.clone()).await;
    let mut rows = r1.clone();
    let mut parent = v1;
    for salt in 2..6u64 {
        let up: Rows = (0..30).map(|k| (k * salt, row_of(k, salt))).collect();
        parent = publish_delta(&fx.repo, parent, &up, &[]).await;
        rows = apply(&rows, &up, &[]);
        e.poll_repository().await.unwrap();
        e.checkpoint(MODEL).await.unwrap();
    }
    let cks = fx.repo.checkpoints(MODEL).await.unwrap();
    let kept: Vec<u64> = cks.iter().map(|c| c.version).collect();
    assert_eq!(kept, vec![parent - 1, parent]);
    drop(e);
    // Remove the full version's data: a restart that did not start from the checkpoint fails.
    std::fs::remove_dir_all(
        fx.dir
            .path()
            .join("repo")
            .join(MODEL)
            .join("versions")
            .join(format!("{v1:020}"))
            .join(TABLE),
    )
    .unwrap();
    let e = fx.engine_with(c).await;
    assert_eq!(assert_rows(&e, &universe(200), &rows, None), parent);
}

#[tokio::test]
async fn a_load_beyond_the_memory_limit_is_refused_before_it_starts() {
    let fx = Fixture::new().await;
    publish_full(&fx.repo, &spec(2), &base_rows(1000)).await;
    let mut c = fx.config();
    c.memory_limit = Some(1000);
    let e = hopps_engine::Engine::open(c).await.unwrap();
    e.load().await.unwrap();
    assert!(!e.is_ready());
    let st = e.status();
    assert_eq!(st.models[0].state, "failed");
    let err = st.models[0].last_error.clone().unwrap();
    assert!(err.contains("memory limit"), "{err}");
    assert_eq!(st.models[0].load_failures, 1);
    // The watcher retries and fails the same way (and does not hang on the failed model).
    tokio::time::timeout(Duration::from_secs(10), e.poll_repository())
        .await
        .expect("poll of a failed model returns")
        .unwrap();
    assert_eq!(e.status().models[0].load_failures, 2);
    assert!(!e.is_ready());
}

#[tokio::test]
async fn background_watcher_applies_new_versions() {
    let fx = Fixture::new().await;
    let r1 = base_rows(50);
    let v1 = publish_full(&fx.repo, &spec(1), &r1).await;
    let e = fx.engine().await;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let task = e.spawn_background(rx);
    let up: Rows = (0..5).map(|k| (k, row_of(k, 2))).collect();
    let v2 = publish_delta(&fx.repo, v1, &up, &[]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while e.status().models[0].serving_version != Some(v2) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "delta not applied within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_rows(&e, &universe(50), &apply(&r1, &up, &[]), None);
    tx.send(true).unwrap();
    task.await.unwrap();
}

/// Online writes: durable, replayed on restart, truncated by checkpoints, undone by rollbacks.
#[tokio::test]
async fn online_writes_replay_and_interact_with_versions() {
    let fx = Fixture::new().await;
    let r1 = base_rows(20);
    let v1 = publish_full(
        &fx.repo,
        &spec_with(2, MissingPolicy::Zeros, Some("sgd")),
        &r1,
    )
    .await;
    let e = fx.engine().await;
    let w = vec![9.0f32; DIM];
    let ack = e.upsert(MODEL, TABLE, &[100], &w).await.unwrap();
    assert_eq!((ack.version, ack.rows, ack.sequence), (v1, 1, 1));
    e.delete(MODEL, TABLE, &[0]).await.unwrap();
    // SGD with lr 0.5: row 5 - 0.5 * 2.
    e.push(MODEL, TABLE, &[5], &[2.0; DIM]).await.unwrap();
    let mut expect = r1.clone();
    expect.insert(100, w.clone());
    expect.remove(&0);
    expect.insert(5, row_of(5, 1).iter().map(|v| v - 1.0).collect());
    assert_rows(&e, &universe(100), &expect, None);
    assert!(e.status().wal_bytes > 0);

    // Restart: the log is replayed.
    drop(e);
    let e = fx.engine().await;
    assert_rows(&e, &universe(100), &expect, None);

    // A delta, then an online write on it, then a rollback: both are undone.
    let up: Rows = [(1u64, row_of(1, 7))].into_iter().collect();
    let v2 = publish_delta(&fx.repo, v1, &up, &[]).await;
    e.poll_repository().await.unwrap();
    let ack = e
        .upsert(MODEL, TABLE, &[2, 200], &[3.0; 2 * DIM])
        .await
        .unwrap();
    assert_eq!(ack.version, v2);
    e.rollback(MODEL, v1).await.unwrap();
    assert_rows(&e, &universe(200), &expect, None);
    // And stay undone after a restart (the write was made on a rolled-back version).
    drop(e);
    let e = fx.engine().await;
    assert_rows(&e, &universe(200), &expect, None);

    // A checkpoint covers the log; the log shrinks; a restart still has every write.
    let before = e.status().wal_bytes;
    let ck = e.checkpoint(MODEL).await.unwrap();
    assert_eq!(ck.version, v1);
    assert!(
        e.status().wal_bytes < before,
        "checkpoint truncates the WAL"
    );
    e.upsert(MODEL, TABLE, &[300], &w).await.unwrap();
    expect.insert(300, w.clone());
    drop(e);
    let e = fx.engine().await;
    assert_rows(&e, &universe(300), &expect, None);

    // Bad writes are refused with a reason.
    let err = e.upsert(MODEL, TABLE, &[1], &[1.0]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let err = e
        .upsert(MODEL, TABLE, &[1], &[f32::NAN; DIM])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

#[tokio::test]
async fn push_without_optimizer_is_refused() {
    let fx = Fixture::new().await;
    publish_full(&fx.repo, &spec(1), &base_rows(3)).await;
    let e: Engine = fx.engine().await;
    let err = e.push(MODEL, TABLE, &[1], &[1.0; DIM]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
}

#[tokio::test]
async fn a_bad_full_version_can_be_rolled_back() {
    let fx = Fixture::new().await;
    let r1 = base_rows(100);
    let v1 = publish_full(&fx.repo, &spec(2), &r1).await;
    let u2: Rows = (0..10).map(|k| (k, row_of(k, 2))).collect();
    let v2 = publish_delta(&fx.repo, v1, &u2, &[]).await;
    let r2 = apply(&r1, &u2, &[]);
    let e = fx.engine().await;
    let bad: Rows = (0..50).map(|k| (k, row_of(k, 9))).collect();
    let v3 = publish_full(&fx.repo, &spec(2), &bad).await;
    e.poll_repository().await.unwrap();
    assert_eq!(assert_rows(&e, &universe(100), &bad, None), v3);
    let rep = e.rollback(MODEL, v2).await.unwrap();
    assert_eq!(rep.method, "rebuild");
    assert_eq!(assert_rows(&e, &universe(100), &r2, None), v2);
    e.poll_repository().await.unwrap();
    assert_eq!(
        assert_rows(&e, &universe(100), &r2, None),
        v2,
        "the bad full is not reloaded"
    );
}

/// Every data file of `version` (not its manifest), recursively.
fn data_files(fx: &Fixture, version: u64) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![
        fx.dir
            .path()
            .join("repo")
            .join(MODEL)
            .join("versions")
            .join(format!("{version:020}")),
    ];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.file_name().is_some_and(|n| n != "MANIFEST.json") {
                out.push(p);
            }
        }
    }
    assert!(!out.is_empty(), "no data files of version {version}");
    out
}

/// `(newest, serving)` of the one model.
fn versions_of(e: &Engine) -> (Option<u64>, Option<u64>) {
    let st = e.status();
    (st.models[0].newest_version, st.models[0].serving_version)
}

/// The newest version (and so the version lag) counts only versions the node would still serve.
#[tokio::test]
async fn newest_version_excludes_rolled_back_versions() {
    let fx = Fixture::new().await;
    let r1 = base_rows(100);
    let v1 = publish_full(&fx.repo, &spec(2), &r1).await;
    let e = fx.engine().await;
    let u2: Rows = (0..10).map(|k| (k, row_of(k, 2))).collect();
    let v2 = publish_delta(&fx.repo, v1, &u2, &[]).await;
    e.poll_repository().await.unwrap();
    assert_eq!(versions_of(&e), (Some(v2), Some(v2)));

    // After a rollback with nothing newer, nothing is pending: at once and after a watcher pass.
    e.rollback(MODEL, v1).await.unwrap();
    assert_eq!(versions_of(&e), (Some(v1), Some(v1)));
    e.poll_repository().await.unwrap();
    assert_eq!(versions_of(&e), (Some(v1), Some(v1)));

    // A delta on a rolled-back parent will never be applied: not pending either.
    let stale = publish_delta(&fx.repo, v2, &u2, &[]).await;
    e.poll_repository().await.unwrap();
    assert_eq!(versions_of(&e), (Some(v1), Some(v1)), "stale delta {stale}");

    // A delta on the rollback target is pending until applied. Its data files are damaged so
    // that this node cannot apply it (the previous version keeps serving).
    let u4: Rows = (20..30).map(|k| (k, row_of(k, 4))).collect();
    let v4 = publish_delta(&fx.repo, v1, &u4, &[]).await;
    let originals: Vec<(std::path::PathBuf, Vec<u8>)> = data_files(&fx, v4)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            let mut bad = bytes.clone();
            let mid = bad.len() / 2;
            bad[mid] ^= 0xff;
            std::fs::write(&p, bad).unwrap();
            (p, bytes)
        })
        .collect();
    assert!(e.poll_repository().await.is_ok());
    assert_eq!(versions_of(&e), (Some(v4), Some(v1)));
    assert_eq!(e.status().models[0].load_failures, 1);
    assert_eq!(assert_rows(&e, &universe(100), &r1, None), v1);

    // Repaired, a restarted node applies it: nothing pending.
    for (p, bytes) in originals {
        std::fs::write(p, bytes).unwrap();
    }
    drop(e);
    let e = fx.engine().await;
    assert_eq!(versions_of(&e), (Some(v4), Some(v4)));
    assert_eq!(
        assert_rows(&e, &universe(100), &apply(&r1, &u4, &[]), None),
        v4
    );
}
