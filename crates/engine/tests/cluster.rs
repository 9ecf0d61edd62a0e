//! Cluster mode: shard subsets, placement changes, the first-load ceiling and two-phase
//! (gated) version switches, through a test coordinator.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hopps_engine::{Coordinator, Engine, EngineConfig, ErrorKind, Gate, ModelReport};
use hopps_format::shard_of;
use tokio::sync::{mpsc, oneshot};

const SHARDS: u32 = 4;

/// A staged version and the sender of the coordinator's answer to it.
type GateCall = (u64, oneshot::Sender<Gate>);

/// A coordinator whose answers the test sets. With a gate channel, every `staged` call sends
/// the version and a sender for the answer; without one, every staged version may go at once.
#[derive(Default)]
struct TestCoordinator {
    shards: Mutex<Option<BTreeSet<u32>>>,
    ceiling: Mutex<Option<u64>>,
    gates: Mutex<Option<mpsc::UnboundedSender<GateCall>>>,
}

impl TestCoordinator {
    fn set_shards(&self, shards: &[u32]) {
        *self.shards.lock().unwrap() = Some(shards.iter().copied().collect());
    }

    /// From now on every staged version waits for an answer sent through the returned channel.
    fn gated(&self) -> mpsc::UnboundedReceiver<GateCall> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.gates.lock().unwrap() = Some(tx);
        rx
    }
}

impl Coordinator for TestCoordinator {
    fn shards(&self, _model: &str) -> Option<BTreeSet<u32>> {
        self.shards.lock().unwrap().clone()
    }

    fn ceiling(&self, _model: &str) -> Option<u64> {
        *self.ceiling.lock().unwrap()
    }

    fn staged(&self, _model: &str, version: u64) -> Pin<Box<dyn Future<Output = Gate> + Send>> {
        let Some(gates) = self.gates.lock().unwrap().clone() else {
            return Box::pin(async { Gate::Go });
        };
        let (tx, rx) = oneshot::channel();
        let _ = gates.send((version, tx));
        // A dropped answer (the test ended) abandons.
        Box::pin(async move { rx.await.unwrap_or(Gate::Abandon) })
    }
}

fn config_with(fx: &Fixture, node: &str, coordinator: Arc<TestCoordinator>) -> EngineConfig {
    let mut c = fx.config();
    c.data_dir = fx.dir.path().join(node);
    c.node_id = node.to_string();
    c.coordinator = Some(coordinator);
    c
}

fn base_rows(n: u64) -> Rows {
    (0..n).map(|k| (k, row_of(k, 1))).collect()
}

fn keys_of(shards: &[u32], n: u64) -> Vec<u64> {
    (0..n)
        .filter(|&k| shards.contains(&shard_of(k, SHARDS)))
        .collect()
}

fn only(rows: &Rows, keys: &[u64]) -> Rows {
    keys.iter()
        .filter_map(|k| rows.get(k).map(|r| (*k, r.clone())))
        .collect()
}

fn report(e: &Engine) -> ModelReport {
    e.cluster_report()
        .into_iter()
        .find(|r| r.model == MODEL)
        .expect("the model is reported")
}

fn lookup_err(e: &Engine, keys: &[u64], version: Option<u64>) -> hopps_engine::EngineError {
    let mut out = vec![0f32; keys.len() * DIM];
    let mut found = vec![false; keys.len()];
    e.lookup(MODEL, TABLE, keys, version, &mut out, &mut found)
        .unwrap_err()
}

/// Waits for the next staged version, with a deadline.
async fn next_gate(rx: &mut mpsc::UnboundedReceiver<GateCall>) -> GateCall {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("a version is staged within 30 s")
        .expect("the coordinator is alive")
}

#[tokio::test]
async fn a_node_holds_and_serves_only_its_shards() {
    let fx = Fixture::new().await;
    let n = 4000;
    let rows = base_rows(n);
    publish_full(&fx.repo, &spec(SHARDS), &rows).await;
    let all = fx.engine().await;
    let coord = Arc::new(TestCoordinator::default());
    coord.set_shards(&[0, 2]);
    let part = fx
        .engine_with(config_with(&fx, "node-b", coord.clone()))
        .await;

    let held = keys_of(&[0, 2], n + 50);
    assert_rows(&part, &held, &only(&rows, &held), None);
    assert_rows(&all, &held, &only(&rows, &held), None);
    for shard in [1u32, 3] {
        let key = keys_of(&[shard], n)[0];
        let err = lookup_err(&part, &[held[0], key], None);
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        let msg = err.to_string();
        assert!(msg.contains(&format!("shard {shard}")), "{msg}");
        assert!(msg.contains("it holds 0, 2"), "{msg}");
        // Writes to it are refused before they are logged.
        let err = part
            .upsert(MODEL, TABLE, &[key], &row_of(key, 9))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    }

    let (sp, sa) = (&part.status().models[0], &all.status().models[0]);
    assert_eq!(sp.rows, keys_of(&[0, 2], n).len() as u64);
    assert_eq!(sa.rows, n);
    let ratio = sp.memory_bytes as f64 / sa.memory_bytes as f64;
    assert!((0.3..0.7).contains(&ratio), "memory ratio {ratio}");
    assert_eq!(sp.held_shards, Some(vec![0, 2]));
    assert_eq!(sa.held_shards, None);
    let r = report(&part);
    assert_eq!((r.shards, r.held.clone()), (SHARDS, vec![0, 2]));
    assert_eq!((r.serving, r.readable.clone()), (Some(1), vec![1]));
    assert_eq!(r.state, "serving");
    assert_eq!(report(&all).held, vec![0, 1, 2, 3]);

    let err = part.checkpoint(MODEL).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.to_string().contains("needs every shard"), "{err}");
}

#[tokio::test]
async fn a_new_placement_is_loaded_beside_the_serving_view_then_swapped() {
    let fx = Fixture::new().await;
    let n = 2000;
    let rows = base_rows(n);
    let v1 = publish_full(&fx.repo, &spec(SHARDS), &rows).await;
    let up: Rows = (0..n).step_by(3).map(|k| (k, row_of(k, 2))).collect();
    let v2 = publish_delta(&fx.repo, v1, &up, &[]).await;
    let mut expect = apply(&rows, &up, &[]);
    let coord = Arc::new(TestCoordinator::default());
    coord.set_shards(&[0, 2]);
    let e = fx
        .engine_with(config_with(&fx, "node-a", coord.clone()))
        .await;
    let s0 = keys_of(&[0], n);
    let s1 = keys_of(&[1], n);
    let s2 = keys_of(&[2], n);

    // An online write to a shard kept by both placements must survive the rebuild (WAL replay).
    let k2 = s2[0];
    e.upsert(MODEL, TABLE, &[k2], &row_of(k2, 7)).await.unwrap();
    expect.insert(k2, row_of(k2, 7));

    let mut changes = e.subscribe();
    changes.mark_unchanged();
    coord.set_shards(&[1, 2]);
    // Before the pass the old placement still serves.
    assert_rows(&e, &s0, &only(&expect, &s0), None);
    assert_eq!(
        lookup_err(&e, &s1, None).kind(),
        ErrorKind::FailedPrecondition
    );
    e.poll_repository().await.unwrap();
    assert!(changes.has_changed().unwrap(), "the swap is announced");

    assert_eq!(assert_rows(&e, &s1, &only(&expect, &s1), None), v2);
    assert_rows(&e, &s2, &only(&expect, &s2), None);
    let err = lookup_err(&e, &s0, None);
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.to_string().contains("shard 0"), "{err}");
    let r = report(&e);
    assert_eq!(r.held, vec![1, 2]);
    assert!(r.loading.is_empty());
    assert_eq!(r.serving, Some(v2));
    assert_eq!(e.status().models[0].rows, (s1.len() + s2.len()) as u64);

    // The undo records were rebuilt too: a rollback to v1 is instant and exact.
    let rb = e.rollback(MODEL, v1).await.unwrap();
    assert_eq!(rb.method, "undo");
    let mut v1_expect = rows.clone();
    // The online write was made while v2 served, so it is undone with v2.
    v1_expect.insert(k2, rows[&k2].clone());
    assert_rows(&e, &s1, &only(&v1_expect, &s1), None);
    assert_rows(&e, &s2, &only(&v1_expect, &s2), None);
}

#[tokio::test]
async fn a_first_load_stops_at_the_ceiling() {
    let fx = Fixture::new().await;
    let rows = base_rows(300);
    let v1 = publish_full(&fx.repo, &spec(SHARDS), &rows).await;
    let up2: Rows = (0..50).map(|k| (k, row_of(k, 2))).collect();
    let v2 = publish_delta(&fx.repo, v1, &up2, &[7]).await;
    let up3: Rows = (0..50).map(|k| (k, row_of(k, 3))).collect();
    let v3 = publish_delta(&fx.repo, v2, &up3, &[]).await;
    let v2_rows = apply(&rows, &up2, &[7]);
    let universe: Vec<u64> = (0..320).collect();

    let coord = Arc::new(TestCoordinator::default());
    *coord.ceiling.lock().unwrap() = Some(v2);
    let e = fx
        .engine_with(config_with(&fx, "node-a", coord.clone()))
        .await;
    assert_eq!(assert_rows(&e, &universe, &v2_rows, None), v2);
    assert_eq!(report(&e).held, vec![0, 1, 2, 3]);
    // The next pass switches to 3 (this coordinator lets every staged version go).
    e.poll_repository().await.unwrap();
    let v3_rows = apply(&v2_rows, &up3, &[]);
    assert_eq!(assert_rows(&e, &universe, &v3_rows, None), v3);

    // A ceiling that is not on the chain: the newest version.
    let coord = Arc::new(TestCoordinator::default());
    *coord.ceiling.lock().unwrap() = Some(99);
    let e2 = fx.engine_with(config_with(&fx, "node-b", coord)).await;
    assert_eq!(assert_rows(&e2, &universe, &v3_rows, None), v3);
}

#[tokio::test]
async fn a_delta_waits_for_the_gate_and_an_abandoned_one_is_staged_again() {
    let fx = Fixture::new().await;
    let rows = base_rows(400);
    let v1 = publish_full(&fx.repo, &spec(SHARDS), &rows).await;
    let up2: Rows = (0..40).map(|k| (k, row_of(k, 2))).collect();
    let v2 = publish_delta(&fx.repo, v1, &up2, &[]).await;
    let up3: Rows = (40..80).map(|k| (k, row_of(k, 3))).collect();
    let v3 = publish_delta(&fx.repo, v2, &up3, &[]).await;
    let v3_rows = apply(&apply(&rows, &up2, &[]), &up3, &[]);
    let universe: Vec<u64> = (0..420).collect();

    let coord = Arc::new(TestCoordinator::default());
    let e = fx
        .engine_with(config_with(&fx, "node-a", coord.clone()))
        .await;
    assert_eq!(assert_rows(&e, &universe, &v3_rows, None), v3);
    let mut gates = coord.gated();

    let up4: Rows = (0..10).map(|k| (k, row_of(k, 4))).collect();
    let v4 = publish_delta(&fx.repo, v3, &up4, &[100, 101]).await;
    let v4_rows = apply(&v3_rows, &up4, &[100, 101]);
    let pass = tokio::spawn({
        let e = e.clone();
        async move { e.poll_repository().await }
    });
    let (staged, go) = next_gate(&mut gates).await;
    assert_eq!(staged, v4);
    // Staged: the old version by default, the new one when pinned.
    assert_eq!(assert_rows(&e, &universe, &v3_rows, None), v3);
    assert_eq!(assert_rows(&e, &universe, &v4_rows, Some(v4)), v4);
    let r = report(&e);
    assert_eq!((r.serving, r.staged), (Some(v3), Some(v4)));
    assert_eq!(r.readable, vec![v3, v4]);
    go.send(Gate::Go).unwrap();
    pass.await.unwrap().unwrap();
    assert_eq!(assert_rows(&e, &universe, &v4_rows, None), v4);
    let r = report(&e);
    assert_eq!(
        (r.serving, r.staged, r.readable),
        (Some(v4), None, vec![v4])
    );

    // Abandoned: still v4, nothing staged; a later pass stages it again.
    let up5: Rows = (200..210).map(|k| (k, row_of(k, 5))).collect();
    let v5 = publish_delta(&fx.repo, v4, &up5, &[]).await;
    let v5_rows = apply(&v4_rows, &up5, &[]);
    let pass = tokio::spawn({
        let e = e.clone();
        async move { e.poll_repository().await }
    });
    let (staged, answer) = next_gate(&mut gates).await;
    assert_eq!(staged, v5);
    answer.send(Gate::Abandon).unwrap();
    pass.await.unwrap().unwrap();
    let r = report(&e);
    assert_eq!(
        (r.serving, r.staged, r.readable),
        (Some(v4), None, vec![v4])
    );
    assert_eq!(assert_rows(&e, &universe, &v4_rows, None), v4);
    assert_eq!(
        lookup_err(&e, &[1], Some(v5)).kind(),
        ErrorKind::FailedPrecondition
    );
    let pass = tokio::spawn({
        let e = e.clone();
        async move { e.poll_repository().await }
    });
    let (staged, go) = next_gate(&mut gates).await;
    assert_eq!(staged, v5);
    go.send(Gate::Go).unwrap();
    pass.await.unwrap().unwrap();
    assert_eq!(assert_rows(&e, &universe, &v5_rows, None), v5);
}

#[tokio::test]
async fn a_staged_full_version_is_readable_pinned_before_the_swap() {
    let fx = Fixture::new().await;
    let rows = base_rows(300);
    let v1 = publish_full(&fx.repo, &spec(SHARDS), &rows).await;
    let coord = Arc::new(TestCoordinator::default());
    coord.set_shards(&[1, 3]);
    let e = fx
        .engine_with(config_with(&fx, "node-a", coord.clone()))
        .await;
    let held = keys_of(&[1, 3], 400);
    assert_eq!(assert_rows(&e, &held, &only(&rows, &held), None), v1);
    let mut gates = coord.gated();

    let new_rows: Rows = (100..400).map(|k| (k, row_of(k, 6))).collect();
    let v2 = publish_full(&fx.repo, &spec(SHARDS), &new_rows).await;
    let pass = tokio::spawn({
        let e = e.clone();
        async move { e.poll_repository().await }
    });
    let (staged, go) = next_gate(&mut gates).await;
    assert_eq!(staged, v2);
    assert_eq!(assert_rows(&e, &held, &only(&rows, &held), None), v1);
    assert_eq!(
        assert_rows(&e, &held, &only(&new_rows, &held), Some(v2)),
        v2
    );
    let r = report(&e);
    assert_eq!((r.staged, r.readable.clone()), (Some(v2), vec![v1, v2]));
    assert!(
        r.memory_bytes > e.status().models[0].tables[0].bytes,
        "staged tables are counted"
    );
    go.send(Gate::Go).unwrap();
    pass.await.unwrap().unwrap();
    assert_eq!(assert_rows(&e, &held, &only(&new_rows, &held), None), v2);
    let r = report(&e);
    assert_eq!((r.serving, r.staged, r.held), (Some(v2), None, vec![1, 3]));
}

/// Rolls `e` back to `to` through the gate: while staged, the current version serves by default
/// and `to` reads `to_rows` when pinned; after `Go`, `to` serves. Returns the method.
async fn gated_rollback(
    e: &Engine,
    gates: &mut mpsc::UnboundedReceiver<GateCall>,
    universe: &[u64],
    from: (u64, &Rows),
    to: (u64, &Rows),
) -> String {
    let rollback = tokio::spawn({
        let e = e.clone();
        let to = to.0;
        async move { e.rollback(MODEL, to).await }
    });
    let (staged, go) = next_gate(gates).await;
    assert_eq!(staged, to.0);
    assert_eq!(assert_rows(e, universe, from.1, None), from.0);
    assert_eq!(assert_rows(e, universe, to.1, Some(to.0)), to.0);
    let r = report(e);
    assert_eq!((r.serving, r.staged), (Some(from.0), Some(to.0)));
    go.send(Gate::Go).unwrap();
    let report = rollback.await.unwrap().unwrap();
    assert_eq!(assert_rows(e, universe, to.1, None), to.0);
    assert_eq!(self::report(e).readable, vec![to.0]);
    report.method
}

#[tokio::test]
async fn rollbacks_by_undo_and_by_rebuild_go_through_the_gate() {
    let fx = Fixture::new().await;
    let rows = base_rows(300);
    let v1 = publish_full(&fx.repo, &spec(SHARDS), &rows).await;
    let up2: Rows = (0..30).map(|k| (k, row_of(k, 2))).collect();
    let v2 = publish_delta(&fx.repo, v1, &up2, &[50]).await;
    let up3: Rows = (20..60).map(|k| (k, row_of(k, 3))).collect();
    let v3 = publish_delta(&fx.repo, v2, &up3, &[]).await;
    let v2_rows = apply(&rows, &up2, &[50]);
    let v3_rows = apply(&v2_rows, &up3, &[]);
    let universe: Vec<u64> = (0..320).collect();

    // Undo: the node applied 2 and 3 itself, so it holds their undo records.
    let coord = Arc::new(TestCoordinator::default());
    *coord.ceiling.lock().unwrap() = Some(v1);
    let e = fx
        .engine_with(config_with(&fx, "node-a", coord.clone()))
        .await;
    e.poll_repository().await.unwrap();
    assert_eq!(assert_rows(&e, &universe, &v3_rows, None), v3);
    let mut gates = coord.gated();
    let method = gated_rollback(&e, &mut gates, &universe, (v3, &v3_rows), (v2, &v2_rows)).await;
    assert_eq!(method, "undo");

    // Rebuild: without undo records (no budget), the target is built beside the serving tables.
    let coord = Arc::new(TestCoordinator::default());
    let mut c = config_with(&fx, "node-b", coord.clone());
    c.undo_budget_bytes = 0;
    let e = fx.engine_with(c).await;
    assert_eq!(assert_rows(&e, &universe, &v2_rows, None), v2);
    let mut gates = coord.gated();
    let method = gated_rollback(&e, &mut gates, &universe, (v2, &v2_rows), (v1, &rows)).await;
    assert_eq!(method, "rebuild");
}

#[tokio::test]
async fn a_gate_still_waited_for_at_shutdown_is_abandoned() {
    let fx = Fixture::new().await;
    let rows = base_rows(100);
    let v1 = publish_full(&fx.repo, &spec(SHARDS), &rows).await;
    let coord = Arc::new(TestCoordinator::default());
    let e = fx
        .engine_with(config_with(&fx, "node-a", coord.clone()))
        .await;
    let mut gates = coord.gated();
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let watcher = e.spawn_background(shutdown_rx);

    let up: Rows = (0..10).map(|k| (k, row_of(k, 2))).collect();
    let v2 = publish_delta(&fx.repo, v1, &up, &[]).await;
    e.wake();
    let (staged, answer) = next_gate(&mut gates).await;
    assert_eq!(staged, v2);
    // Shutdown while waiting: the gate is dropped, the staged version abandoned.
    shutdown_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(30), watcher)
        .await
        .expect("the watcher ends at shutdown")
        .unwrap();
    drop(answer);
    let r = report(&e);
    assert_eq!(
        (r.serving, r.staged, r.readable),
        (Some(v1), None, vec![v1])
    );
}
