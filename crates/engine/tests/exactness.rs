//! Exactness: after a random sequence of deltas, rollbacks, checkpoints and restarts, every row
//! the engine serves equals, bit for bit, the row recomputed from the repository from scratch
//! (committed manifests + history, folded by this test's own reading of the rules).

mod common;

use std::collections::BTreeMap;

use common::*;
use hopps_engine::Engine;
use hopps_format::{Repository, VersionKind};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Upsert `ups` keys and delete `dels` keys picked from `seed`.
    Delta {
        ups: usize,
        dels: usize,
        seed: u64,
    },
    /// Roll back `back` versions along the served chain (clamped).
    Rollback {
        back: usize,
    },
    Checkpoint,
    Restart,
    /// Online upsert of a few keys (kept by the reference as part of the serving state).
    Write {
        key: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..60, 0usize..15, any::<u64>()).prop_map(|(ups, dels, seed)| Op::Delta { ups, dels, seed }),
        2 => (1usize..4).prop_map(|back| Op::Rollback { back }),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Restart),
        1 => (0u64..KEYS).prop_map(|key| Op::Write { key }),
    ]
}

const KEYS: u64 = 150;

fn pick(seed: u64, i: usize) -> u64 {
    let mut z = seed.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (z ^ (z >> 29)) % KEYS
}

/// The served rows recomputed from the repository alone.
async fn recompute(repo: &Repository) -> (u64, Rows) {
    let listing = repo.versions(MODEL).await.unwrap();
    let history = repo.history(MODEL).await.unwrap();
    let dead: Vec<(u64, u64)> = history
        .iter()
        .filter(|h| h.event == "rolled_back")
        .map(|h| (h.version, h.from_version.unwrap()))
        .collect();
    let mut chain = Vec::new();
    for m in &listing.committed {
        if dead
            .iter()
            .any(|&(to, from)| m.version > to && m.version <= from)
        {
            continue;
        }
        match m.kind {
            VersionKind::Full => chain = vec![m.clone()],
            VersionKind::Delta
                if m.parent == chain.last().map(|c: &hopps_format::Manifest| c.version) =>
            {
                chain.push(m.clone())
            }
            _ => {}
        }
    }
    let mut rows = Rows::new();
    for m in &chain {
        let mut reader = repo.read_table(m, TABLE).await.unwrap();
        while let Some(b) = reader.next_batch().await.unwrap() {
            for (i, k) in b.keys.iter().enumerate() {
                if b.deleted.get(i).copied().unwrap_or(false) {
                    rows.remove(k);
                } else {
                    rows.insert(*k, b.values[i * DIM..(i + 1) * DIM].to_vec());
                }
            }
        }
    }
    (chain.last().unwrap().version, rows)
}

async fn run(ops: Vec<Op>, budget: u64) {
    let with_writes = ops.iter().any(|o| matches!(o, Op::Write { .. }));
    let fx = Fixture::new().await;
    let mut c = fx.config();
    c.undo_budget_bytes = budget;
    // Every checkpoint is kept, so the WAL keeps every record a rebuild could need (see the
    // retention rule in the engine's ARCHITECTURE section).
    c.checkpoint_retention = 1000;
    let base: Rows = (0..KEYS / 2).map(|k| (k, row_of(k, 1))).collect();
    let v1 = publish_full(&fx.repo, &spec(4), &base).await;
    let mut engine: Engine = fx.engine_with(c.clone()).await;
    // Reference: rows per version of the served chain, plus online writes per version.
    let mut chain: Vec<u64> = vec![v1];
    let mut rows_at: BTreeMap<u64, Rows> = BTreeMap::new();
    rows_at.insert(v1, base);
    let universe: Vec<u64> = (0..KEYS + 5).collect();
    for (step, op) in ops.into_iter().enumerate() {
        let tip = *chain.last().unwrap();
        match op {
            Op::Delta { ups, dels, seed } => {
                let up: Rows = (0..ups)
                    .map(|i| pick(seed, i))
                    .map(|k| (k, row_of(k, seed % 997 + step as u64)))
                    .collect();
                let del: Vec<u64> = (0..dels)
                    .map(|i| pick(seed ^ 0xABCD, i))
                    .filter(|k| !up.contains_key(k))
                    .collect();
                let v = publish_delta(&fx.repo, tip, &up, &del).await;
                engine.poll_repository().await.unwrap();
                rows_at.insert(v, apply(&rows_at[&tip], &up, &del));
                chain.push(v);
            }
            Op::Rollback { back } => {
                if chain.len() < 2 {
                    continue;
                }
                let back = back.min(chain.len() - 1);
                let to = chain[chain.len() - 1 - back];
                match engine.rollback(MODEL, to).await {
                    Ok(rep) => assert_eq!(rep.to, to),
                    // Only when a rebuild would lose online writes a checkpoint truncated.
                    Err(e)
                        if with_writes
                            && e.kind() == hopps_engine::ErrorKind::FailedPrecondition =>
                    {
                        assert!(e.to_string().contains("truncated"), "{e}");
                        continue;
                    }
                    Err(e) => panic!("rollback to {to}: {e}"),
                }
                chain.truncate(chain.len() - back);
            }
            Op::Checkpoint => {
                let ck = engine.checkpoint(MODEL).await.unwrap();
                assert_eq!(ck.version, tip);
            }
            Op::Restart => {
                drop(engine);
                engine = fx.engine_with(c.clone()).await;
            }
            Op::Write { key } => {
                let row = row_of(key, 5000 + step as u64);
                engine.upsert(MODEL, TABLE, &[key], &row).await.unwrap();
                rows_at.get_mut(&tip).unwrap().insert(key, row);
            }
        }
        let tip = *chain.last().unwrap();
        let v = assert_rows(&engine, &universe, &rows_at[&tip], None);
        assert_eq!(v, tip, "step {step}");
    }
    // From scratch: the rows recomputed from the repository alone equal what is served, and a
    // brand-new node (empty data directory) serves them too. With online writes the served rows
    // are the repository's plus the writes, which the reference above already checked.
    let (v, repo_rows) = recompute(&fx.repo).await;
    assert_eq!(v, *chain.last().unwrap());
    if !with_writes {
        assert_rows(&engine, &universe, &repo_rows, None);
        let mut fresh = fx.config();
        fresh.data_dir = fx.dir.path().join("fresh-node");
        let fresh_engine = fx.engine_with(fresh).await;
        assert_eq!(assert_rows(&fresh_engine, &universe, &repo_rows, None), v);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    #[test]
    fn served_rows_equal_the_repository_recomputed(ops in proptest::collection::vec(op(), 1..10), budget in prop_oneof![Just(0u64), Just(20_000u64), Just(1u64 << 30)]) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(ops, budget));
    }
}
