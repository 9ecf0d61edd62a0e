//! Engine figures for BENCHMARKS.md: readers during a 1M-row delta apply, rollback vs apply
//! time, undo-record bytes vs the delta's own bytes, and WAL upserts/s with group commit.
//!
//! `cargo run --release -p hopps-engine --example apply_bench -- [BASE_ROWS] [DELTA_ROWS]`
//! (defaults 2,000,000 and 1,000,000; dim 16 f32, 8 shards, 1000-key lookups).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hopps_engine::{Engine, EngineConfig, WalSync};
use hopps_format::{
    ModelSpec, PublishOptions, Repository, StorageOptions, TableArrays, TableSpec, VersionKind,
};

const DIM: usize = 16;

fn values(keys: &[u64], salt: f32) -> Vec<f32> {
    keys.iter()
        .flat_map(|&k| (0..DIM).map(move |j| k as f32 * 0.001 + j as f32 + salt))
        .collect()
}

/// Looks up random 1000-key batches until `stop`, counting keys.
fn reader(engine: Engine, universe: u64, stop: Arc<AtomicBool>, keys_done: Arc<AtomicU64>) {
    let mut keys = vec![0u64; 1000];
    let mut out = vec![0f32; keys.len() * DIM];
    let mut found = vec![false; keys.len()];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    while !stop.load(Ordering::Relaxed) {
        for k in keys.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *k = x % universe;
        }
        engine
            .lookup("bench", "emb", &keys, None, &mut out, &mut found)
            .expect("lookup");
        keys_done.fetch_add(keys.len() as u64, Ordering::Relaxed);
    }
}

fn rate(counter: &AtomicU64, window: impl FnOnce()) -> (f64, f64) {
    let before = counter.load(Ordering::Relaxed);
    let t = Instant::now();
    window();
    let secs = t.elapsed().as_secs_f64();
    (
        (counter.load(Ordering::Relaxed) - before) as f64 / secs,
        secs,
    )
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let base_rows = args.first().copied().unwrap_or(2_000_000);
    let delta_rows = args.get(1).copied().unwrap_or(1_000_000).min(base_rows * 2);
    run(base_rows, delta_rows);
}

fn run(base_rows: u64, delta_rows: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    std::fs::create_dir_all(&repo_dir).unwrap();
    let repo: Repository = rt
        .block_on(Repository::open(
            repo_dir.to_str().unwrap(),
            &StorageOptions::default(),
        ))
        .unwrap();
    let spec = ModelSpec::new("bench", 8, vec![TableSpec::new("emb", DIM as u32)]);
    let base_keys: Vec<u64> = (0..base_rows).collect();
    rt.block_on(repo.publish_arrays(
        "bench",
        VersionKind::Full,
        &[TableArrays {
            table: "emb",
            dim: DIM as u32,
            keys: &base_keys,
            values: &values(&base_keys, 0.0),
            deleted: None,
        }],
        &PublishOptions {
            create: Some(spec),
            source: "bench".into(),
            ..PublishOptions::default()
        },
    ))
    .unwrap();
    let mut config = EngineConfig::new(repo.clone(), dir.path().join("node"));
    config.wal_sync = WalSync::Interval(Duration::from_millis(10));
    config.undo_budget_bytes = 4 << 30;
    let engine = rt.block_on(async {
        let e = Engine::open(config).await.unwrap();
        e.load().await.unwrap();
        e
    });
    assert!(engine.is_ready());
    let delta_keys: Vec<u64> = (base_rows - delta_rows / 2..base_rows + delta_rows / 2).collect();
    rt.block_on(repo.publish_arrays(
        "bench",
        VersionKind::Delta,
        &[TableArrays {
            table: "emb",
            dim: DIM as u32,
            keys: &delta_keys,
            values: &values(&delta_keys, 1.0),
            deleted: None,
        }],
        &PublishOptions {
            parent: Some(1),
            source: "bench".into(),
            ..PublishOptions::default()
        },
    ))
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let keys_done = Arc::new(AtomicU64::new(0));
    let r = {
        let (e, s, k) = (engine.clone(), stop.clone(), keys_done.clone());
        std::thread::spawn(move || reader(e, base_rows, s, k))
    };
    std::thread::sleep(Duration::from_millis(500));
    let (read_only, _) = rate(&keys_done, || std::thread::sleep(Duration::from_secs(3)));
    let (during_apply, apply_secs) = rate(&keys_done, || {
        rt.block_on(engine.poll_repository()).unwrap()
    });
    let status = engine.status();
    assert_eq!(status.models[0].serving_version, Some(2));
    let undo_bytes = status.models[0].undo_bytes;
    let (during_rollback, rollback_secs) = rate(&keys_done, || {
        let rep = rt.block_on(engine.rollback("bench", 1)).unwrap();
        assert_eq!(rep.method, "undo");
    });
    stop.store(true, Ordering::Relaxed);
    r.join().unwrap();
    let delta_bytes = delta_rows * (8 + 4 * DIM as u64);

    // WAL: many concurrent single-key upserts, group commit every 10 ms.
    let writers = 2000u64;
    let per_writer = 100u64;
    let t = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..writers {
            let e = engine.clone();
            tasks.push(tokio::spawn(async move {
                let row = [0.5f32; DIM];
                for i in 0..per_writer {
                    e.upsert("bench", "emb", &[w * per_writer + i], &row)
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let wal_secs = t.elapsed().as_secs_f64();
    let upserts_per_s = (writers * per_writer) as f64 / wal_secs;

    let report = serde_json::json!({
        "base_rows": base_rows,
        "delta_rows": delta_rows,
        "dim": DIM,
        "read_only_keys_per_s": read_only,
        "keys_per_s_during_apply": during_apply,
        "reader_ratio_during_apply": during_apply / read_only,
        "apply_seconds": apply_secs,
        "keys_per_s_during_rollback": during_rollback,
        "rollback_seconds": rollback_secs,
        "rollback_over_apply": rollback_secs / apply_secs,
        "undo_bytes": undo_bytes,
        "delta_bytes": delta_bytes,
        "undo_over_delta_bytes": undo_bytes as f64 / delta_bytes as f64,
        "wal_upserts_per_s": upserts_per_s,
        "wal_concurrent_writers": writers,
    });
    println!("{report}");
}
