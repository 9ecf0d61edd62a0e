//! Crash safety in-process: an engine dropped in the middle of a delta apply or a checkpoint
//! write, and reopened, serves a whole version — never part of one — and keeps every
//! acknowledged online write.

mod common;

use std::time::Duration;

use common::*;

fn stamped(k: u64, v: u64) -> Vec<f32> {
    vec![v as f32, k as f32, (v * 7 + k) as f32, 1.0]
}

/// Checks that every key carries the stamp of the version the lookup names.
fn assert_whole_version(e: &hopps_engine::Engine, keys: &[u64]) -> u64 {
    let mut out = vec![0f32; keys.len() * DIM];
    let mut found = vec![false; keys.len()];
    let v = e
        .lookup(MODEL, TABLE, keys, None, &mut out, &mut found)
        .unwrap();
    for (i, &k) in keys.iter().enumerate() {
        assert!(found[i], "key {k} missing at {v}");
        assert_eq!(
            &out[i * DIM..(i + 1) * DIM],
            stamped(k, v).as_slice(),
            "key {k} at version {v}"
        );
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_mid_apply_or_mid_checkpoint_restarts_whole() {
    let fx = Fixture::new().await;
    let keys: Vec<u64> = (0..30_000).collect();
    let full: Rows = keys.iter().map(|&k| (k, stamped(k, 1))).collect();
    publish_full(&fx.repo, &spec(4), &full).await;
    let mut parent = 1;
    // Interrupt at growing delays so some runs stop while reading, staging, merging or writing.
    for (round, delay_us) in [0u64, 200, 1_000, 3_000, 10_000, 30_000]
        .into_iter()
        .enumerate()
    {
        let v = parent + 1;
        let rows: Rows = keys.iter().map(|&k| (k, stamped(k, v))).collect();
        parent = publish_delta(&fx.repo, parent, &rows, &[]).await;
        assert_eq!(parent, v);
        let e = fx.engine().await;
        let served_before = assert_whole_version(&e, &keys);
        let poll = {
            let e = e.clone();
            tokio::spawn(async move { e.poll_repository().await })
        };
        tokio::time::sleep(Duration::from_micros(delay_us)).await;
        poll.abort();
        let _ = poll.await;
        // Whatever happened, what is served now is one whole version.
        let mid = assert_whole_version(&e, &keys);
        assert!(mid == served_before || mid == v, "round {round}: {mid}");
        // A checkpoint interrupted the same way leaves no usable partial checkpoint behind.
        let ck = {
            let e = e.clone();
            tokio::spawn(async move { e.checkpoint(MODEL).await })
        };
        tokio::time::sleep(Duration::from_micros(delay_us)).await;
        ck.abort();
        let _ = ck.await;
        drop(e);
        let e = fx.engine().await;
        assert_eq!(
            assert_whole_version(&e, &keys),
            v,
            "round {round}: restart serves the newest version"
        );
        for c in fx.repo.checkpoints(MODEL).await.unwrap() {
            assert_eq!(
                c.rows,
                keys.len() as u64,
                "a committed checkpoint is complete"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_a_restart() {
    let fx = Fixture::new().await;
    publish_full(
        &fx.repo,
        &spec(4),
        &(0..10).map(|k| (k, row_of(k, 1))).collect(),
    )
    .await;
    let mut c = fx.config();
    c.wal_sync = hopps_engine::WalSync::Always;
    let e = fx.engine_with(c.clone()).await;
    // Writers race; some are cut off mid-flight. Those that returned Ok must be durable.
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let e = e.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..200u64 {
                let key = 1000 + w * 1000 + i;
                let row = row_of(key, w);
                if e.upsert(MODEL, TABLE, &[key], &row).await.is_ok() {
                    acked.push((key, row));
                }
            }
            acked
        }));
    }
    let mut acked = Rows::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert_eq!(acked.len(), 800);
    drop(e);
    let e = fx.engine_with(c).await;
    let keys: Vec<u64> = acked.keys().copied().collect();
    let mut out = vec![0f32; keys.len() * DIM];
    let mut found = vec![false; keys.len()];
    e.lookup(MODEL, TABLE, &keys, None, &mut out, &mut found)
        .unwrap();
    for (i, (k, row)) in acked.iter().enumerate() {
        assert!(found[i], "acknowledged write of key {k} lost");
        assert_eq!(&out[i * DIM..(i + 1) * DIM], row.as_slice());
    }
}
