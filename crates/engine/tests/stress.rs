//! Readers never see a mixed version: every row is stamped with the version that wrote it, and
//! every delta rewrites every key, so a response is correct only if all its rows carry the
//! version the response names.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;
use hopps_engine::ErrorKind;

const N: u64 = 20_000;

fn stamped(k: u64, v: u64) -> Vec<f32> {
    // version, key, and a checksum of both; all exact in f32.
    vec![
        v as f32,
        k as f32,
        ((v * 31 + k) % 65_521) as f32,
        -(v as f32),
    ]
}

fn check(keys: &[u64], out: &[f32], found: &[bool], v: u64) -> Result<(), String> {
    for (i, &k) in keys.iter().enumerate() {
        if !found[i] {
            return Err(format!("key {k} missing at version {v}"));
        }
        let row = &out[i * DIM..(i + 1) * DIM];
        if row != stamped(k, v).as_slice() {
            return Err(format!("key {k}: row {row:?} served as version {v}"));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_a_mixed_version_across_delta_switches() {
    let fx = Fixture::new().await;
    let all: Vec<u64> = (0..N).collect();
    let v1 = publish_full(
        &fx.repo,
        &spec(4),
        &all.iter().map(|&k| (k, stamped(k, 1))).collect(),
    )
    .await;
    assert_eq!(v1, 1);
    let engine = fx.engine().await;
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let pinned_ok = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for r in 0..2u64 {
        let (engine, stop, reads, pinned_ok) = (
            engine.clone(),
            stop.clone(),
            reads.clone(),
            pinned_ok.clone(),
        );
        readers.push(std::thread::spawn(
            move || -> Result<BTreeSet<u64>, String> {
                let mut seen = BTreeSet::new();
                let mut keys = vec![0u64; 512];
                let mut out = vec![0f32; keys.len() * DIM];
                let mut found = vec![false; keys.len()];
                let mut x = 0x1234_5678u64 + r;
                while !stop.load(Ordering::Relaxed) {
                    for k in keys.iter_mut() {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        *k = x % N;
                    }
                    let v = engine
                        .lookup(MODEL, TABLE, &keys, None, &mut out, &mut found)
                        .map_err(|e| e.to_string())?;
                    check(&keys, &out, &found, v)?;
                    seen.insert(v);
                    // The previous version, pinned: either still readable and exactly it, or refused.
                    if v > 1 {
                        match engine.lookup(MODEL, TABLE, &keys, Some(v - 1), &mut out, &mut found)
                        {
                            Ok(pv) => {
                                check(&keys, &out, &found, pv)?;
                                pinned_ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) if e.kind() == ErrorKind::FailedPrecondition => {}
                            Err(e) => return Err(e.to_string()),
                        }
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                Ok(seen)
            },
        ));
    }
    let mut parent = v1;
    for v in 2..=6u64 {
        let rows: Rows = all.iter().map(|&k| (k, stamped(k, v))).collect();
        parent = publish_delta(&fx.repo, parent, &rows, &[]).await;
        assert_eq!(parent, v);
        let before = reads.load(Ordering::Relaxed);
        engine.poll_repository().await.unwrap();
        // Let the readers run against each new version before the next switch.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while reads.load(Ordering::Relaxed) < before + 20 {
            assert!(std::time::Instant::now() < deadline, "readers stalled");
            tokio::task::yield_now().await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut seen = BTreeSet::new();
    for r in readers {
        seen.extend(r.join().unwrap().unwrap());
    }
    assert!(seen.len() >= 3, "readers saw versions {seen:?}");
    assert!(reads.load(Ordering::Relaxed) > 100);
    // After the switches, the served state is exactly the last version.
    let mut out = vec![0f32; all.len() * DIM];
    let mut found = vec![false; all.len()];
    let v = engine
        .lookup(MODEL, TABLE, &all, None, &mut out, &mut found)
        .unwrap();
    assert_eq!(v, 6);
    check(&all, &out, &found, 6).unwrap();
    // Rolling back under readers is just as clean.
    engine.rollback(MODEL, 3).await.unwrap();
    let v = engine
        .lookup(MODEL, TABLE, &all, None, &mut out, &mut found)
        .unwrap();
    assert_eq!(v, 3);
    check(&all, &out, &found, 3).unwrap();
}
