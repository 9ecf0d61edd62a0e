//! Cluster mode with a real etcd and several in-process nodes (each its own engine, server,
//! data directory and OS-chosen 127.0.0.1 ports, all on one model repository): placement,
//! leadership, the two-phase version switch, drain and undrain make-before-break, re-replication
//! after a crash, and a duplicate node id.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hopps_cluster::testing::EtcdServer;
use hopps_cluster::{ClusterState, Drain, Keys, Mirror, encode};
use hopps_format::{
    ModelSpec, PublishOptions, Repository, StorageOptions, TableArrays, TableSpec, VersionKind,
};
use hopps_server::{ClusterConfig, Server, ServerConfig, ServerError};

const DIM: u32 = 4;
const SHARDS: u32 = 8;
const KEYS: u64 = 2000;
const MODEL: &str = "m";

fn value(version: u64, key: u64, j: u32) -> f32 {
    (version * 100_000 + key) as f32 + j as f32 * 0.25
}

fn rows_of(version: u64, keys: &[u64]) -> Vec<f32> {
    keys.iter()
        .flat_map(|&k| (0..DIM).map(move |j| value(version, k, j)))
        .collect()
}

/// Publishes version `version` of the model: a full version first, deltas after, every key
/// rewritten to the version's values (so a mixed response would show).
async fn publish(repo: &Repository, version: u64) {
    let keys: Vec<u64> = (0..KEYS).collect();
    let values = rows_of(version, &keys);
    let (kind, create) = if version == 1 {
        (
            VersionKind::Full,
            Some(ModelSpec::new(
                MODEL,
                SHARDS,
                vec![TableSpec::new("t", DIM)],
            )),
        )
    } else {
        (VersionKind::Delta, None)
    };
    let published = repo
        .publish_arrays(
            MODEL,
            kind,
            &[TableArrays {
                table: "t",
                dim: DIM,
                keys: &keys,
                values: &values,
                deleted: None,
            }],
            &PublishOptions {
                create,
                source: "test".into(),
                ..PublishOptions::default()
            },
        )
        .await
        .expect("publish");
    assert_eq!(published.version, version);
}

struct Fixture {
    etcd: EtcdServer,
    cluster: String,
    repo: Repository,
    repo_uri: String,
    dir: tempfile::TempDir,
    mirror: Mirror,
}

impl Fixture {
    async fn new(cluster: &str) -> Fixture {
        let etcd = EtcdServer::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let repo_path = dir.path().join("repo");
        std::fs::create_dir_all(&repo_path).expect("mkdir");
        let repo_uri = repo_path.to_string_lossy().into_owned();
        let repo = Repository::open(&repo_uri, &StorageOptions::default())
            .await
            .expect("open repo");
        let mirror = Mirror::start(vec![etcd.endpoint()], cluster);
        mirror
            .synced(Duration::from_secs(20))
            .await
            .expect("mirror");
        Fixture {
            etcd,
            cluster: cluster.to_string(),
            repo,
            repo_uri,
            dir,
            mirror,
        }
    }

    fn config(&self, id: &str) -> ServerConfig {
        let mut cluster = ClusterConfig::new(vec![self.etcd.endpoint()], &self.cluster);
        cluster.replicas = 2;
        cluster.lease_ttl = Duration::from_secs(2);
        ServerConfig {
            repo: self.repo_uri.clone(),
            data_dir: self.dir.path().join(id),
            node_id: Some(id.to_string()),
            poll_interval: Duration::from_millis(100),
            shutdown_grace: Duration::from_secs(2),
            cluster: Some(cluster),
            ..ServerConfig::default()
        }
    }

    /// Starts node `id`; returns once `Server::run` got past joining (or failed).
    async fn start(&self, id: &str) -> Node {
        let config = self.config(id);
        let engine = hopps_engine::Engine::open(hopps_server::engine_config(
            &config,
            hopps_server::open_repository(&config).await.expect("repo"),
        ))
        .await
        .expect("engine");
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let admin_addr = admin.local_addr().expect("addr").to_string();
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let server = Server::new(engine, &config).expect("server");
        let task = tokio::spawn(server.run(grpc, admin, shutdown));
        Node {
            id: id.to_string(),
            admin: admin_addr,
            stop,
            task,
        }
    }

    fn state(&self) -> Arc<ClusterState> {
        self.mirror.state()
    }
}

struct Node {
    id: String,
    admin: String,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
}

impl Node {
    /// Stops the node the way a crash does: every task gone, the lease not revoked.
    fn crash(self) {
        self.task.abort();
    }

    async fn shut_down(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }

    fn status(&self) -> serde_json::Value {
        let (code, body) = http_get(&self.admin, "/status");
        if code != 200 {
            return serde_json::Value::Null;
        }
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
    }

    fn is_leader(&self) -> bool {
        self.status()["cluster"]["leader"].as_bool() == Some(true)
    }

    fn ready(&self) -> bool {
        http_get(&self.admin, "/readyz").0 == 200
    }
}

async fn wait_until<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A minimal HTTP/1.1 GET (the admin port speaks plain HTTP/1.1).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut response = String::new();
    if stream.read_to_string(&mut response).is_err() {
        return (0, String::new());
    }
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// True when every shard has `replicas` distinct alive replicas that hold it at the serving
/// version, none of them in `excluded`.
/// Waits until the cluster's serving record and every node of `nodes` serve `version`.
async fn wait_serving(fx: &Fixture, nodes: &[Node], version: u64, what: &str) {
    wait_until(what, Duration::from_secs(60), || async {
        let s = fx.state();
        s.serving_version(MODEL) == Some(version)
            && nodes.iter().all(|n| {
                s.report(MODEL, &n.id)
                    .is_some_and(|r| r.serving == Some(version))
            })
    })
    .await;
}

fn fully_replicated(state: &ClusterState, replicas: usize, excluded: &[&str]) -> bool {
    let Some(p) = state.placements.get(MODEL) else {
        return false;
    };
    let version = state.serving_version(MODEL);
    version.is_some()
        && p.shards == SHARDS
        && (0..SHARDS).all(|s| {
            let ready: BTreeSet<&str> = state
                .replicas(MODEL, s, version)
                .iter()
                .map(|n| n.id.as_str())
                .collect();
            ready.len() == replicas
                && p.assignment[s as usize].len() == replicas
                && excluded.iter().all(|x| !ready.contains(x))
        })
}

/// Every serving record the mirror ever shows must name a version each placed, alive node
/// that finished loading can serve (readable or staged).
fn spawn_serving_checker(
    mirror: &Mirror,
) -> (Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    let violations = Arc::new(Mutex::new(Vec::new()));
    let found = Arc::clone(&violations);
    let mut rx = mirror.subscribe();
    let task = tokio::spawn(async move {
        loop {
            {
                let state = rx.borrow_and_update().clone();
                if let (Some(v), Some(p)) =
                    (state.serving_version(MODEL), state.placements.get(MODEL))
                {
                    let placed: BTreeSet<&String> = p.assignment.iter().flatten().collect();
                    for n in placed {
                        let Some(r) = state.report(MODEL, n) else {
                            continue;
                        };
                        if r.state == "loading" {
                            continue;
                        }
                        if !r.readable.contains(&v) && r.staged != Some(v) {
                            found.lock().unwrap().push(format!(
                                "serving {v} at revision {} but {n} has readable {:?} staged {:?}",
                                state.revision, r.readable, r.staged
                            ));
                        }
                    }
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
    (violations, task)
}

/// Every state the mirror shows must have, for each shard, at least one alive replica that
/// holds it at the serving version.
fn spawn_availability_checker(
    mirror: &Mirror,
) -> (Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    let gaps = Arc::new(Mutex::new(Vec::new()));
    let found = Arc::clone(&gaps);
    let mut rx = mirror.subscribe();
    let task = tokio::spawn(async move {
        loop {
            {
                let state = rx.borrow_and_update().clone();
                let version = state.serving_version(MODEL);
                for s in 0..SHARDS {
                    if state.replicas(MODEL, s, version).is_empty() {
                        found.lock().unwrap().push(format!(
                            "shard {s} at revision {}: placed on {:?}",
                            state.revision,
                            state
                                .placements
                                .get(MODEL)
                                .map(|p| p.assignment[s as usize].clone())
                        ));
                    }
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
    (gaps, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_place_switch_drain_and_re_replicate_after_a_crash() {
    let fx = Fixture::new("three").await;
    publish(&fx.repo, 1).await;
    let (violations, checker) = spawn_serving_checker(&fx.mirror);
    let nodes = vec![
        fx.start("n1").await,
        fx.start("n2").await,
        fx.start("n3").await,
    ];

    // Every shard gets two replicas holding it, and version 1 becomes the serving version; a
    // node that held more shards earlier (placed while it was alone) has dropped them.
    wait_until(
        "8 shards x 2 held replicas, each node holding exactly its placed shards",
        Duration::from_secs(60),
        || async {
            let state = fx.state();
            fully_replicated(&state, 2, &[])
                && nodes.iter().all(|n| {
                    state
                        .reports
                        .get(MODEL)
                        .and_then(|r| r.get(&n.id))
                        .map(|r| &r.held)
                        == Some(&state.placements[MODEL].shards_of(&n.id))
                })
        },
    )
    .await;
    let state = fx.state();
    assert_eq!(state.serving_version(MODEL), Some(1));
    assert_eq!(state.nodes.len(), 3);
    for n in &nodes {
        let rec = &state.nodes[&n.id];
        assert!(rec.grpc_addr.starts_with("127.0.0.1:"), "{rec:?}");
        assert_eq!(rec.admin_addr, n.admin);
        // Each node holds exactly the shards placed on it.
        let placed: Vec<u32> = state.placements[MODEL].shards_of(&n.id);
        assert_eq!(state.reports[MODEL][&n.id].held, placed, "{}", n.id);
    }
    // Rendezvous hashing spreads 16 replicas over 3 nodes; none is left empty.
    for n in &nodes {
        assert!(
            !state.placements[MODEL].shards_of(&n.id).is_empty(),
            "{} got nothing",
            n.id
        );
    }
    wait_until("all nodes ready", Duration::from_secs(30), || async {
        nodes.iter().all(Node::ready)
    })
    .await;
    wait_until("exactly one leader", Duration::from_secs(30), || async {
        nodes.iter().filter(|n| n.is_leader()).count() == 1
    })
    .await;

    // Lookups through the cluster client see version 1 across every shard.
    let client = hopps_client::ClusterClient::connect(&fx.etcd.endpoint(), &fx.cluster)
        .await
        .expect("cluster client");
    let keys: Vec<u64> = (0..KEYS).step_by(7).collect();
    let rows = client.lookup(MODEL, "t", &keys).await.expect("lookup");
    assert_eq!(rows.version, 1);
    assert_eq!(rows.values, rows_of(1, &keys));

    // A delta: the serving record moves to 2 only once every placed node has it.
    publish(&fx.repo, 2).await;
    wait_serving(&fx, &nodes, 2, "serving version 2 on every node").await;
    let serving = fx.state().serving[MODEL].clone();
    assert_eq!(serving.previous, Some(1));
    let rows = client.lookup(MODEL, "t", &keys).await.expect("lookup");
    assert_eq!(rows.version, 2);
    assert_eq!(rows.values, rows_of(2, &keys));

    // From here on, every state of the cluster must keep each shard readable somewhere at the
    // serving version: drains, joins and crashes move replicas make-before-break.
    let (gaps, availability) = spawn_availability_checker(&fx.mirror);

    // Drain a node that is not the leader: its replicas load elsewhere first, then the drain is
    // released and the node holds nothing.
    let drained = nodes
        .iter()
        .find(|n| !n.is_leader())
        .expect("a follower")
        .id
        .clone();
    let keys_of = Keys::new(&fx.cluster);
    let mut etcd = hopps_cluster::connect(&[fx.etcd.endpoint()])
        .await
        .expect("etcd");
    etcd.put(
        keys_of.drain(&drained),
        encode(&Drain {
            node: drained.clone(),
            requested: String::new(),
            released: false,
        }),
        None,
    )
    .await
    .expect("drain");
    wait_until("drain released", Duration::from_secs(60), || async {
        fx.state().drains.get(&drained).is_some_and(|d| d.released)
    })
    .await;
    let s = fx.state();
    assert!(s.placements[MODEL].shards_of(&drained).is_empty());
    assert!(fully_replicated(&s, 2, &[drained.as_str()]));
    let rows = client.lookup(MODEL, "t", &keys).await.expect("lookup");
    assert_eq!(rows.values, rows_of(2, &keys));

    // Undrain: the node is eligible again and shards move back onto it.
    etcd.delete(keys_of.drain(&drained), None)
        .await
        .expect("undrain");
    wait_until(
        "shards back on the undrained node",
        Duration::from_secs(60),
        || async {
            let s = fx.state();
            fully_replicated(&s, 2, &[]) && !s.placements[MODEL].shards_of(&drained).is_empty()
        },
    )
    .await;

    // Crash the leader (tasks gone, lease not revoked): after the lease TTL its replicas move
    // to the survivors, one of which takes over the controller.
    let leader = nodes.iter().position(Node::is_leader).expect("a leader");
    let mut nodes = nodes;
    let crashed = nodes.remove(leader);
    let crashed_id = crashed.id.clone();
    let crashed_shards = fx.state().placements[MODEL].shards_of(&crashed_id);
    assert!(!crashed_shards.is_empty());
    let crashed_at = Instant::now();
    crashed.crash();
    wait_until(
        "the crashed node's lease expires",
        Duration::from_secs(20),
        || async { !fx.state().nodes.contains_key(&crashed_id) },
    )
    .await;
    let lost_after = crashed_at.elapsed();
    assert!(
        lost_after >= Duration::from_secs(1),
        "the node vanished after {lost_after:?}: its lease was revoked, not expired"
    );
    wait_until(
        "re-replicated on the survivors",
        Duration::from_secs(60),
        || async { fully_replicated(&fx.state(), 2, &[crashed_id.as_str()]) },
    )
    .await;
    wait_until("a new leader", Duration::from_secs(30), || async {
        nodes.iter().filter(|n| n.is_leader()).count() == 1
    })
    .await;
    let rows = client.lookup(MODEL, "t", &keys).await.expect("lookup");
    assert_eq!(rows.values, rows_of(2, &keys));

    availability.abort();
    let seen = gaps.lock().unwrap().clone();
    assert!(seen.is_empty(), "shards with no ready replica: {seen:?}");
    checker.abort();
    let seen = violations.lock().unwrap().clone();
    assert!(
        seen.is_empty(),
        "serving records a placed node could not serve: {seen:?}"
    );
    for n in nodes {
        n.shut_down().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_id_held_by_a_live_node_is_refused() {
    let fx = Fixture::new("dup").await;
    publish(&fx.repo, 1).await;
    let first = fx.start("same").await;
    wait_until("first node registered", Duration::from_secs(20), || async {
        fx.state().nodes.contains_key("same")
    })
    .await;
    let second = fx.start("same").await;
    let result = tokio::time::timeout(Duration::from_secs(30), second.task)
        .await
        .expect("the second node gives up within the lease TTL")
        .expect("task");
    let err = result.expect_err("a duplicate id must not start");
    let text = err.to_string();
    assert!(
        text.contains("node id same is already registered in cluster dup")
            && text.contains("--node-id"),
        "{text}"
    );
    // The first node is untouched and leaves cleanly (its lease revoked: gone at once).
    assert!(fx.state().nodes.contains_key("same"));
    first.shut_down().await;
    wait_until(
        "record removed on shutdown",
        Duration::from_secs(5),
        || async { !fx.state().nodes.contains_key("same") },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_keep_serving_while_etcd_is_down_and_rejoin_after() {
    let mut fx = Fixture::new("restart").await;
    publish(&fx.repo, 1).await;
    let nodes = vec![fx.start("a").await, fx.start("b").await];
    wait_until(
        "2 held replicas per shard",
        Duration::from_secs(60),
        || async { fully_replicated(&fx.state(), 2, &[]) },
    )
    .await;
    let state = fx.state();
    let grpc: Vec<String> = nodes
        .iter()
        .map(|n| state.nodes[&n.id].grpc_addr.clone())
        .collect();
    let keys: Vec<u64> = (0..KEYS).step_by(3).collect();

    // etcd gone for longer than the lease TTL: every node keeps the placement it has and keeps
    // answering lookups of its shards the whole time.
    fx.etcd.kill();
    let mut clients = Vec::new();
    for addr in &grpc {
        clients.push(hopps_client::Client::connect(addr).await.expect("connect"));
    }
    let outage = Instant::now();
    let mut rounds = 0;
    while outage.elapsed() < Duration::from_secs(3) {
        for client in &clients {
            let rows = client
                .lookup(MODEL, "t", &keys)
                .await
                .expect("lookup without etcd");
            assert_eq!(rows.values, rows_of(1, &keys));
        }
        assert!(
            nodes.iter().all(Node::ready),
            "readiness survives an etcd outage"
        );
        rounds += 1;
    }
    assert!(rounds > 1);

    // etcd back: the nodes are still registered (same leases), a leader leads again and a new
    // version goes through the two-phase switch.
    fx.etcd.restart().await;
    wait_until("mirror reconnected", Duration::from_secs(30), || async {
        let s = fx.state();
        s.connected && s.nodes.len() == 2
    })
    .await;
    wait_until(
        "one leader after the restart",
        Duration::from_secs(30),
        || async { nodes.iter().filter(|n| n.is_leader()).count() == 1 },
    )
    .await;
    publish(&fx.repo, 2).await;
    wait_serving(&fx, &nodes, 2, "version 2 served after the restart").await;
    for n in nodes {
        n.shut_down().await;
    }
}
