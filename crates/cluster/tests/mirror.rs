//! The mirror against a real etcd: it reads what is there, follows changes, sees a lease
//! expire, and keeps its last state while etcd is down.

use std::time::{Duration, Instant};

use etcd_client::PutOptions;
use hopps_cluster::testing::EtcdServer;
use hopps_cluster::{Keys, Mirror, NodeRecord, Placement, encode};

fn node(id: &str) -> NodeRecord {
    NodeRecord {
        id: id.into(),
        grpc_addr: format!("127.0.0.1:{}", 7000 + id.len()),
        admin_addr: String::new(),
        memory_limit_bytes: 0,
        memory_used_bytes: 0,
        healthy: true,
        started_unix: 0.0,
        build: "test".into(),
    }
}

async fn until(mirror: &Mirror, what: &str, f: impl Fn(&hopps_cluster::ClusterState) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut rx = mirror.subscribe();
    loop {
        if f(&rx.borrow()) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting for: {what}");
        let _ = tokio::time::timeout(left, rx.changed()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_follows_puts_deletes_leases_and_survives_an_etcd_restart() {
    let mut etcd = EtcdServer::start().await;
    let eps = vec![etcd.endpoint()];
    let keys = Keys::new("t1");
    let mut c = hopps_cluster::connect(&eps).await.unwrap();
    c.put(keys.node("a"), encode(&node("a")), None)
        .await
        .unwrap();
    // A record nobody can read is skipped, not fatal.
    c.put(keys.placement("bad"), b"{not json".to_vec(), None)
        .await
        .unwrap();

    let mirror = Mirror::start(eps.clone(), "t1");
    let s = mirror.synced(Duration::from_secs(20)).await.unwrap();
    assert!(s.nodes.contains_key("a"));
    assert!(s.placements.is_empty());

    let lease = c.lease_grant(1, None).await.unwrap().id();
    c.put(
        keys.node("b"),
        encode(&node("b")),
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    let p = Placement {
        model: "ctr".into(),
        shards: 1,
        replicas: 1,
        epoch: 1,
        assignment: vec![vec!["b".into()]],
    };
    c.put(keys.placement("ctr"), encode(&p), None)
        .await
        .unwrap();
    until(&mirror, "node b and placement ctr", |s| {
        s.nodes.contains_key("b") && s.placements.get("ctr") == Some(&p)
    })
    .await;
    // No keepalive: the lease expires and etcd deletes the node's key.
    until(&mirror, "node b's lease to expire", |s| {
        !s.nodes.contains_key("b")
    })
    .await;
    c.delete(keys.node("a"), None).await.unwrap();
    until(&mirror, "node a deleted", |s| s.nodes.is_empty()).await;

    // etcd down: the last state stays, marked disconnected.
    etcd.kill();
    until(&mirror, "disconnected", |s| !s.connected).await;
    assert_eq!(mirror.state().placements.get("ctr"), Some(&p));
    etcd.restart().await;
    until(&mirror, "reconnected", |s| s.connected).await;
    let mut c = hopps_cluster::connect(&eps).await.unwrap();
    c.put(keys.node("c"), encode(&node("c")), None)
        .await
        .unwrap();
    until(&mirror, "node c after the restart", |s| {
        s.nodes.contains_key("c")
    })
    .await;
    assert_eq!(mirror.state().placements.get("ctr"), Some(&p));
}
