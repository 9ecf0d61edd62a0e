//! The cluster client against a real etcd holding hand-written cluster records that point at
//! tiny in-test `Hopps` servers, each with an injected behaviour: good, always failing, slow,
//! or answering another version than the pinned one.
//!
//! End-to-end tests with real `hopps serve` nodes live with the CLI; these check the client's
//! routing, retries, hedges, breakers and version pinning against faults real nodes do not
//! produce on demand.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hopps_client::{ClientError, ClusterClient, ClusterOptions, Code};
use hopps_cluster::testing::EtcdServer;
use hopps_cluster::{Keys, ModelReport, NodeRecord, Placement, Serving, encode};
use hopps_proto::packed;
use hopps_proto::v1;
use hopps_proto::v1::hopps_server::{Hopps, HoppsServer};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

const MODEL: &str = "ctr";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Behaviour {
    Good,
    /// Every call fails with UNAVAILABLE.
    Fail,
    /// Answers correctly after this long.
    Slow(Duration),
    /// Ignores the pinned version and answers its default one (which a real node never does).
    IgnoresPin,
}

/// A fake node: the row of key k at version v is `[k, v]`.
struct Mock {
    behaviour: Behaviour,
    shards: u32,
    held: Vec<u32>,
    /// Versions a pinned lookup can read.
    readable: Mutex<Vec<u64>>,
    /// The version of unpinned lookups.
    default: Mutex<u64>,
    calls: AtomicU64,
    written: Mutex<Vec<u64>>,
}

impl Mock {
    fn new(behaviour: Behaviour, shards: u32, held: &[u32], readable: &[u64]) -> Arc<Mock> {
        Arc::new(Mock {
            behaviour,
            shards,
            held: held.to_vec(),
            readable: Mutex::new(readable.to_vec()),
            default: Mutex::new(readable.iter().copied().max().unwrap_or(0)),
            calls: AtomicU64::new(0),
            written: Mutex::new(Vec::new()),
        })
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    async fn enter(&self) -> Result<(), Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match self.behaviour {
            Behaviour::Fail => Err(Status::unavailable("injected failure")),
            Behaviour::Slow(d) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn keys(&self, packed_keys: &[u8]) -> Result<Vec<u64>, Status> {
        let mut keys = Vec::new();
        if !packed::unpack_keys_into(packed_keys, &mut keys) {
            return Err(Status::invalid_argument("bad keys"));
        }
        for &k in &keys {
            let s = hopps_format::shard_of(k, self.shards);
            if !self.held.contains(&s) {
                return Err(Status::failed_precondition(format!(
                    "shard {s} is not held here"
                )));
            }
        }
        Ok(keys)
    }

    fn version(&self, pin: Option<u64>) -> Result<u64, Status> {
        let default = *self.default.lock().unwrap();
        match pin {
            _ if self.behaviour == Behaviour::IgnoresPin => Ok(default),
            None => Ok(default),
            Some(v) if self.readable.lock().unwrap().contains(&v) => Ok(v),
            Some(v) => Err(Status::failed_precondition(format!(
                "version {v} is not readable here"
            ))),
        }
    }

    fn rows(keys: &[u64], version: u64) -> (bytes::Bytes, bytes::Bytes) {
        let values: Vec<f32> = keys
            .iter()
            .flat_map(|&k| [k as f32, version as f32])
            .collect();
        let mut found = BytesMut::new();
        packed::put_bitmap(&mut found, &vec![true; keys.len()]);
        (packed::pack_values(&values), found.freeze())
    }

    async fn write(&self, packed_keys: &[u8]) -> Result<Response<v1::WriteResponse>, Status> {
        self.enter().await?;
        let keys = self.keys(packed_keys)?;
        let n = keys.len() as u64;
        self.written.lock().unwrap().extend(keys);
        Ok(Response::new(v1::WriteResponse {
            version: *self.default.lock().unwrap(),
            rows: n,
            sequence: 1,
        }))
    }
}

/// The gRPC face of a [`Mock`].
struct Node(Arc<Mock>);

impl std::ops::Deref for Node {
    type Target = Mock;
    fn deref(&self) -> &Mock {
        &self.0
    }
}

#[tonic::async_trait]
impl Hopps for Node {
    async fn lookup(
        &self,
        request: Request<v1::LookupRequest>,
    ) -> Result<Response<v1::LookupResponse>, Status> {
        self.enter().await?;
        let r = request.into_inner();
        let keys = self.keys(&r.keys)?;
        let version = self.version(r.version)?;
        let (values, found) = Mock::rows(&keys, version);
        Ok(Response::new(v1::LookupResponse {
            version,
            dim: 2,
            values,
            found,
            count: keys.len() as u32,
        }))
    }

    async fn multi_lookup(
        &self,
        request: Request<v1::MultiLookupRequest>,
    ) -> Result<Response<v1::MultiLookupResponse>, Status> {
        self.enter().await?;
        let r = request.into_inner();
        let version = self.version(r.version)?;
        let mut tables = Vec::new();
        for t in r.tables {
            let keys = self.keys(&t.keys)?;
            let (values, found) = Mock::rows(&keys, version);
            tables.push(v1::TableRows {
                table: t.table,
                dim: 2,
                values,
                found,
                count: keys.len() as u32,
            });
        }
        Ok(Response::new(v1::MultiLookupResponse { version, tables }))
    }

    async fn upsert(
        &self,
        request: Request<v1::UpsertRequest>,
    ) -> Result<Response<v1::WriteResponse>, Status> {
        self.write(&request.into_inner().keys).await
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::WriteResponse>, Status> {
        self.write(&request.into_inner().keys).await
    }

    async fn push(
        &self,
        request: Request<v1::PushRequest>,
    ) -> Result<Response<v1::WriteResponse>, Status> {
        self.write(&request.into_inner().keys).await
    }
}

/// Serves `mock` on 127.0.0.1 (a port the OS chose); returns the address.
async fn serve(mock: Arc<Mock>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    // Without TCP_NODELAY, small answers wait for delayed ACKs (~40 ms): longer than the
    // hedge delay of the tests.
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        s.and_then(|s| {
            s.set_nodelay(true)?;
            Ok(s)
        })
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(HoppsServer::new(Node(mock)))
            .serve_with_incoming(incoming),
    );
    addr
}

/// A test cluster: etcd plus the records the test writes.
struct Cluster {
    etcd: EtcdServer,
    kv: etcd_client::Client,
    keys: Keys,
    name: String,
}

impl Cluster {
    async fn start(name: &str) -> Cluster {
        let etcd = EtcdServer::start().await;
        let kv = hopps_cluster::connect(&[etcd.endpoint()]).await.unwrap();
        Cluster {
            etcd,
            kv,
            keys: Keys::new(name),
            name: name.to_string(),
        }
    }

    async fn put(&self, key: String, value: Vec<u8>) {
        self.kv.clone().put(key, value, None).await.unwrap();
    }

    /// Registers node `id` at `addr`, reporting `held` shards and `readable` versions.
    async fn node(&self, id: &str, addr: &str, held: &[u32], readable: &[u64]) {
        let record = NodeRecord {
            id: id.into(),
            grpc_addr: addr.into(),
            admin_addr: String::new(),
            memory_limit_bytes: 0,
            memory_used_bytes: 0,
            healthy: true,
            started_unix: 0.0,
            build: "test".into(),
        };
        self.put(self.keys.node(id), encode(&record)).await;
        self.report(id, held, readable).await;
    }

    async fn report(&self, id: &str, held: &[u32], readable: &[u64]) {
        let report = ModelReport {
            node: id.into(),
            model: MODEL.into(),
            shards: 0,
            held: held.to_vec(),
            loading: vec![],
            serving: readable.iter().copied().max(),
            readable: readable.to_vec(),
            staged: None,
            state: "serving".into(),
            error: None,
            memory_bytes: 0,
            table_bytes: 0,
            rows: 0,
        };
        self.put(self.keys.report(MODEL, id), encode(&report)).await;
    }

    async fn placement(&self, shards: u32, assignment: &[&[&str]]) {
        let p = Placement {
            model: MODEL.into(),
            shards,
            replicas: 2,
            epoch: 1,
            assignment: assignment
                .iter()
                .map(|nodes| nodes.iter().map(|n| n.to_string()).collect())
                .collect(),
        };
        self.put(self.keys.placement(MODEL), encode(&p)).await;
    }

    async fn serving(&self, version: u64) {
        let s = Serving {
            model: MODEL.into(),
            version,
            previous: None,
            time: String::new(),
        };
        self.put(self.keys.serving(MODEL), encode(&s)).await;
    }

    async fn client(&self, options: ClusterOptions) -> ClusterClient {
        ClusterClient::connect_with(&self.etcd.endpoint(), &self.name, options)
            .await
            .unwrap()
    }
}

fn keys(n: u64) -> Vec<u64> {
    (0..n).map(|i| i * 7919 + 3).collect()
}

/// Every row is the key's at `version`, in the caller's order.
fn check_rows(rows: &hopps_client::Rows, keys: &[u64], version: u64) {
    assert_eq!(rows.version, version);
    assert_eq!(rows.dim, 2);
    assert_eq!(rows.len(), keys.len());
    for (i, &k) in keys.iter().enumerate() {
        assert_eq!(
            rows.row(i),
            Some(&[k as f32, version as f32][..]),
            "key {k}"
        );
        assert!(rows.found[i]);
    }
}

/// Waits until the client's mirror satisfies `f`.
async fn until(client: &ClusterClient, f: impl Fn(&hopps_cluster::ClusterState) -> bool) {
    client
        .wait_for("test records", Duration::from_secs(10), f)
        .await
        .unwrap();
}

#[tokio::test]
async fn failing_node_is_retried_elsewhere_then_its_breaker_keeps_it_out() {
    let c = Cluster::start("retry").await;
    let all = [0, 1, 2, 3];
    let bad = Mock::new(Behaviour::Fail, 4, &all, &[5]);
    let a = Mock::new(Behaviour::Good, 4, &[0, 1], &[5]);
    let b = Mock::new(Behaviour::Good, 4, &[2, 3], &[5]);
    c.node("bad", &serve(bad.clone()).await, &all, &[5]).await;
    c.node("a", &serve(a.clone()).await, &[0, 1], &[5]).await;
    c.node("b", &serve(b.clone()).await, &[2, 3], &[5]).await;
    c.placement(
        4,
        &[&["bad", "a"], &["bad", "a"], &["bad", "b"], &["bad", "b"]],
    )
    .await;
    c.serving(5).await;
    let client = c
        .client(ClusterOptions {
            hedge_after: Duration::from_secs(10),
            breaker_failures: 2,
            breaker_cooldown: Duration::from_secs(60),
            ..ClusterOptions::default()
        })
        .await;
    let ks = keys(1000);
    for _ in 0..30 {
        let rows = client.lookup(MODEL, "user", &ks).await.unwrap();
        check_rows(&rows, &ks, 5);
    }
    let stats = client.stats();
    assert_eq!(stats.requests, 30);
    assert_eq!(
        bad.calls(),
        2,
        "the breaker opens after 2 failures: {stats:?}"
    );
    assert_eq!(stats.breaker_opens, 1, "{stats:?}");
    assert_eq!(stats.retries, 2, "{stats:?}");
    assert_eq!(stats.version_retries, 0, "{stats:?}");
    assert!(
        a.calls() >= 30 && b.calls() >= 30,
        "every request needs both"
    );

    // Writes go to every replica of each key's shard; a failing replica fails the write and
    // is named.
    let err = client
        .upsert(MODEL, "user", &ks[..10], &[0.5; 20])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("bad:"), "{err}");
    assert!(err.to_string().contains("retry"), "{err}");
    let written: BTreeSet<u64> = a.written.lock().unwrap().iter().copied().collect();
    let written_b: BTreeSet<u64> = b.written.lock().unwrap().iter().copied().collect();
    let expected: BTreeSet<u64> = ks[..10].iter().copied().collect();
    assert_eq!(
        written.union(&written_b).copied().collect::<BTreeSet<_>>(),
        expected
    );
    assert!(
        written.is_disjoint(&written_b),
        "a shard has one good replica"
    );
}

#[tokio::test]
async fn slow_node_is_hedged_and_the_fast_answer_wins() {
    let c = Cluster::start("hedge").await;
    let slow = Mock::new(
        Behaviour::Slow(Duration::from_millis(800)),
        2,
        &[0, 1],
        &[5],
    );
    let fast = Mock::new(Behaviour::Good, 2, &[0, 1], &[5]);
    c.node("slow", &serve(slow.clone()).await, &[0, 1], &[5])
        .await;
    c.node("fast", &serve(fast.clone()).await, &[0, 1], &[5])
        .await;
    c.placement(2, &[&["slow", "fast"], &["slow", "fast"]])
        .await;
    c.serving(5).await;
    let client = c
        .client(ClusterOptions {
            hedge_after: Duration::from_millis(30),
            attempt_timeout: Duration::from_secs(3),
            ..ClusterOptions::default()
        })
        .await;
    let ks = keys(500);
    for _ in 0..20 {
        let start = Instant::now();
        let rows = client.lookup(MODEL, "user", &ks).await.unwrap();
        check_rows(&rows, &ks, 5);
        assert!(
            start.elapsed() < Duration::from_millis(600),
            "a hedge answered, not the slow node: {:?}",
            start.elapsed()
        );
    }
    let stats = client.stats();
    assert!(
        slow.calls() >= 1,
        "the ranking sent some requests to the slow node"
    );
    // Each request the slow node was asked first would have taken 800 ms: the hedge won
    // those. (A fast first answer may also be hedged on a loaded machine, so no equality.)
    assert!(stats.hedges_won >= 1, "{stats:?}");
    assert!(stats.hedges >= stats.hedges_won, "{stats:?}");
    assert_eq!(
        stats.breaker_opens, 0,
        "a cancelled slow call is no failure"
    );
}

#[tokio::test]
async fn a_node_answering_another_version_is_never_merged() {
    let c = Cluster::start("pin").await;
    // "liar" says it reads version 5 but answers 6 whatever is pinned.
    let liar = Mock::new(Behaviour::IgnoresPin, 4, &[0, 1, 2, 3], &[6]);
    let good = Mock::new(Behaviour::Good, 4, &[0, 1, 2, 3], &[5, 6]);
    c.node("liar", &serve(liar.clone()).await, &[0, 1, 2, 3], &[5, 6])
        .await;
    c.node("good", &serve(good.clone()).await, &[0, 1, 2, 3], &[5, 6])
        .await;
    c.placement(4, &[&["liar", "good"][..]; 4]).await;
    c.serving(5).await;
    let client = c
        .client(ClusterOptions {
            hedge_after: Duration::from_secs(10),
            breaker_failures: 1000,
            ..ClusterOptions::default()
        })
        .await;
    let ks = keys(300);
    for _ in 0..20 {
        let rows = client.lookup(MODEL, "user", &ks).await.unwrap();
        check_rows(&rows, &ks, 5);
    }
    assert!(liar.calls() >= 1);
    assert_eq!(client.stats().retries, liar.calls());
    // Pinned explicitly to 6, both answer 6.
    let rows = client.lookup_at(MODEL, "user", &ks, 6).await.unwrap();
    check_rows(&rows, &ks, 6);
    // A version no replica can read fails as the nodes would: FAILED_PRECONDITION, naming it.
    let start = Instant::now();
    let err = client.lookup_at(MODEL, "user", &ks, 4).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("cannot read version 4"), "{err}");
    assert!(start.elapsed() >= ClusterOptions::default().request_timeout);
}

#[tokio::test]
async fn a_stale_view_waits_for_the_next_state_and_redoes_the_request() {
    let c = Cluster::start("switch").await;
    // The node reports version 5 but can only read 6 now: its answer (FAILED_PRECONDITION)
    // is newer than the records the client sees.
    let n = Mock::new(Behaviour::Good, 2, &[0, 1], &[6]);
    c.node("n", &serve(n.clone()).await, &[0, 1], &[5]).await;
    c.placement(2, &[&["n"], &["n"]]).await;
    c.serving(5).await;
    let client = c.client(ClusterOptions::default()).await;
    until(&client, |s| s.serving_version(MODEL) == Some(5)).await;
    let ks = keys(100);
    let lookup = {
        let client = client.clone();
        let ks = ks.clone();
        tokio::spawn(async move { client.lookup(MODEL, "user", &ks).await })
    };
    let deadline = Instant::now() + Duration::from_secs(4);
    while client.stats().version_retries == 0 {
        assert!(Instant::now() < deadline, "the lookup never redid");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The switch lands: the report and the serving record name 6.
    c.report("n", &[0, 1], &[6]).await;
    c.serving(6).await;
    let rows = lookup.await.unwrap().unwrap();
    check_rows(&rows, &ks, 6);
    assert!(client.stats().version_retries >= 1);
}

#[tokio::test]
async fn without_a_serving_record_one_version_is_chosen_and_errors_say_what_to_do() {
    let c = Cluster::start("first").await;
    let a = Mock::new(Behaviour::Good, 4, &[0, 1, 2, 3], &[3]);
    let b = Mock::new(Behaviour::Good, 4, &[0, 1, 2, 3], &[3]);
    c.node("a", &serve(a.clone()).await, &[0, 1, 2, 3], &[3])
        .await;
    c.node("b", &serve(b).await, &[0, 1, 2, 3], &[3]).await;
    c.placement(4, &[&["a", "b"][..]; 4]).await;
    let client = c
        .client(ClusterOptions {
            request_timeout: Duration::from_millis(500),
            ..ClusterOptions::default()
        })
        .await;
    let ks = keys(200);
    let other = keys(17);
    let multi = client
        .multi_lookup(MODEL, &[("user", &ks), ("item", &other), ("empty", &[])])
        .await
        .unwrap();
    assert_eq!(multi.version, 3);
    check_rows(&multi.tables[0].rows, &ks, 3);
    check_rows(&multi.tables[1].rows, &other, 3);
    assert!(multi.tables[2].rows.is_empty());
    assert_eq!(multi.tables[1].table, "item");

    // A model nobody placed.
    let err = client.lookup("nope", "user", &ks).await.unwrap_err();
    assert!(err.to_string().contains("\"nope\""), "{err}");
    assert!(err.to_string().contains("no placement"), "{err}");

    // Both replicas gone: the error names the shard and why each replica is out.
    c.kv.clone().delete(c.keys.node("a"), None).await.unwrap();
    c.report("b", &[], &[3]).await;
    until(&client, |s| {
        !s.nodes.contains_key("a") && s.report(MODEL, "b").is_some_and(|r| r.held.is_empty())
    })
    .await;
    let err = client.lookup(MODEL, "user", &ks).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("model ctr shard"), "{text}");
    assert!(text.contains("a is not alive"), "{text}");
    assert!(text.contains("b has not loaded it yet"), "{text}");
    assert!(text.contains("hopps node list"), "{text}");
    assert_eq!(err.code(), Some(Code::Unavailable));
    assert!(matches!(err, ClientError::Cluster { .. }));
}
