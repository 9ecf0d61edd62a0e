//! Cluster mode: a client of a whole hopps cluster, found through etcd.
//!
//! The client keeps a live [`Mirror`] of the cluster's records. A lookup pins the model's
//! serving version (the `serving/<model>` record), splits keys by shard, sends each node one
//! RPC with the keys of the shards chosen on it, and merges the answers into the caller's key
//! order. Around that: hedged requests on a second replica when a node is slow, retries on the
//! other replicas when one fails, a circuit breaker per node, a semaphore bounding RPCs in
//! flight, and a whole-request retry with the then-serving version when a node says it cannot
//! serve the pinned version or shard (the mirror was behind).
//!
//! Invariant: every [`Rows`] returned was read at one version. Each RPC is pinned and its
//! answer's version checked; a node that answers another version counts as failed.

mod breaker;
mod route;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, join_all, try_join_all};
use hopps_cluster::{ClusterState, Mirror};
use serde::Serialize;
use tokio::sync::Semaphore;
use tonic::Code;

use crate::{
    Client, ClientError, ClientOptions, MultiRows, NodeStatus, RollbackReport, Rows, TableRows,
    WriteAck,
};
use breaker::Breaker;
use route::{Answer, Part, Split};

/// How long a request that must wait for a newer cluster state waits at most before it looks
/// again (the mirror usually changes sooner: a node's report, a new serving record).
const REDO_WAIT: Duration = Duration::from_millis(20);

/// How a [`ClusterClient`] routes, retries and hedges.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Time for the first full read of the cluster from etcd.
    pub sync_timeout: Duration,
    /// Deadline of a whole request, retries and hedges included.
    pub request_timeout: Duration,
    /// Deadline of one RPC to one node.
    pub attempt_timeout: Duration,
    /// A group not answered within this time is sent to a second replica too; the first
    /// answer wins.
    pub hedge_after: Duration,
    /// RPCs in flight per client (all clones share them).
    pub max_in_flight: usize,
    /// Consecutive failures that open a node's breaker.
    pub breaker_failures: u32,
    /// How long an open breaker keeps a node out before a trial call.
    pub breaker_cooldown: Duration,
    /// Options of the connection to each node.
    pub client: ClientOptions,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            sync_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(1),
            hedge_after: Duration::from_millis(50),
            max_in_flight: 256,
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(1),
            client: ClientOptions::default(),
        }
    }
}

/// Counters since the client connected (shared by its clones).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ClusterStats {
    /// Requests made by callers (lookups, multi-lookups, writes).
    pub requests: u64,
    /// RPCs sent to nodes, hedges and retries included.
    pub rpcs: u64,
    /// Groups sent again to another replica after a failure.
    pub retries: u64,
    /// Groups sent to a second replica because the first was slow.
    pub hedges: u64,
    /// Hedges that answered first.
    pub hedges_won: u64,
    /// Times a node's breaker opened.
    pub breaker_opens: u64,
    /// Whole requests redone with a newer cluster state (version switch, moved shard).
    pub version_retries: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    rpcs: AtomicU64,
    retries: AtomicU64,
    hedges: AtomicU64,
    hedges_won: AtomicU64,
    breaker_opens: AtomicU64,
    version_retries: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The cluster as the mirror sees it, plus each node's own status.
#[derive(Debug, Clone)]
pub struct ClusterStatus {
    /// The cluster's name.
    pub cluster: String,
    /// Records of the cluster: nodes, placements, reports, serving versions, drains.
    pub state: Arc<ClusterState>,
    /// Per live node (by id), its Status answer or why it could not be had.
    pub nodes: Vec<(String, Result<NodeStatus, String>)>,
}

impl Serialize for ClusterStatus {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct NodeOut<'a> {
            id: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            status: Option<&'a NodeStatus>,
            #[serde(skip_serializing_if = "Option::is_none")]
            error: Option<&'a str>,
        }
        #[derive(Serialize)]
        struct Out<'a> {
            cluster: &'a str,
            connected: bool,
            revision: i64,
            nodes: &'a BTreeMap<String, hopps_cluster::NodeRecord>,
            placements: &'a BTreeMap<String, hopps_cluster::Placement>,
            reports: &'a BTreeMap<String, BTreeMap<String, hopps_cluster::ModelReport>>,
            serving: &'a BTreeMap<String, hopps_cluster::Serving>,
            drains: &'a BTreeMap<String, hopps_cluster::Drain>,
            settings: &'a BTreeMap<String, hopps_cluster::ModelSettings>,
            node_status: Vec<NodeOut<'a>>,
        }
        let s = &self.state;
        Out {
            cluster: &self.cluster,
            connected: s.connected,
            revision: s.revision,
            nodes: &s.nodes,
            placements: &s.placements,
            reports: &s.reports,
            serving: &s.serving,
            drains: &s.drains,
            settings: &s.settings,
            node_status: self
                .nodes
                .iter()
                .map(|(id, r)| NodeOut {
                    id,
                    status: r.as_ref().ok(),
                    error: r.as_ref().err().map(String::as_str),
                })
                .collect(),
        }
        .serialize(serializer)
    }
}

/// A client of a hopps cluster. Cheap to clone; clones share connections, breakers, the
/// in-flight limit and the counters.
#[derive(Clone)]
pub struct ClusterClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ClusterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterClient")
            .field("cluster", &self.inner.cluster)
            .finish_non_exhaustive()
    }
}

struct Inner {
    cluster: String,
    mirror: Mirror,
    options: ClusterOptions,
    /// One client per node id; replaced when the node's address changes, dropped when the
    /// node leaves the cluster.
    conns: Mutex<HashMap<String, Client>>,
    breakers: Mutex<HashMap<String, Breaker>>,
    permits: Semaphore,
    /// Per-request seed of the replica ranking.
    seed: AtomicU64,
    counters: Counters,
}

impl Inner {
    fn prune(&self, state: &ClusterState) {
        lock(&self.conns)
            .retain(|id, c| state.nodes.get(id).is_some_and(|n| n.grpc_addr == c.addr()));
        lock(&self.breakers).retain(|id, _| state.nodes.contains_key(id));
    }
}

/// A poisoned lock only means another thread panicked while holding it; the maps stay usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What to do after a node's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The node failed (down, slow, broken answer): try another replica; counts for its breaker.
    NodeFailure,
    /// The node is fine but does not have what the (stale) mirror said: another replica or a
    /// newer cluster state may.
    Stale,
    /// The request itself is wrong (unknown table, bad argument): every replica says the same.
    Fatal,
}

fn classify(e: &ClientError) -> Verdict {
    match e.code() {
        Some(Code::FailedPrecondition) => Verdict::Stale,
        Some(
            Code::InvalidArgument
            | Code::NotFound
            | Code::OutOfRange
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Unimplemented
            | Code::AlreadyExists,
        ) => Verdict::Fatal,
        _ => Verdict::NodeFailure,
    }
}

enum Failure {
    /// No replica could answer with this cluster state: redo the whole request with a newer one.
    Redo(ClientError),
    /// The request is wrong: return the error.
    Fatal(ClientError),
}

/// One read request being routed.
struct Req<'a> {
    model: &'a str,
    tables: Vec<&'a str>,
    /// MultiLookup RPCs (one Lookup when false).
    multi: bool,
    split: Split,
    state: Arc<ClusterState>,
    deadline: Instant,
    seed: u64,
    what: String,
}

#[derive(Debug, Clone, Copy)]
enum WriteOp {
    Upsert,
    Delete,
    Push,
}

impl WriteOp {
    fn name(self) -> &'static str {
        match self {
            WriteOp::Upsert => "upsert",
            WriteOp::Delete => "delete",
            WriteOp::Push => "push",
        }
    }
}

impl ClusterClient {
    /// Connects to cluster `cluster` through etcd at `etcd` (`host:port[,host:port]`) with
    /// default options.
    pub async fn connect(etcd: &str, cluster: &str) -> Result<ClusterClient, ClientError> {
        ClusterClient::connect_with(etcd, cluster, ClusterOptions::default()).await
    }

    /// Connects with `options`; returns once the cluster's records were read.
    pub async fn connect_with(
        etcd: &str,
        cluster: &str,
        options: ClusterOptions,
    ) -> Result<ClusterClient, ClientError> {
        let config = |e: hopps_cluster::ClusterError| ClientError::Cluster {
            code: Code::InvalidArgument,
            message: e.to_string(),
        };
        let endpoints = hopps_cluster::parse_endpoints(etcd).map_err(config)?;
        hopps_cluster::check_cluster_name(cluster).map_err(config)?;
        let mirror = Mirror::start(endpoints, cluster);
        mirror
            .synced(options.sync_timeout)
            .await
            .map_err(|e| ClientError::Cluster {
                code: Code::Unavailable,
                message: e.to_string(),
            })?;
        let inner = Arc::new(Inner {
            cluster: cluster.to_string(),
            permits: Semaphore::new(options.max_in_flight.max(1)),
            mirror,
            options,
            conns: Mutex::new(HashMap::new()),
            breakers: Mutex::new(HashMap::new()),
            seed: AtomicU64::new(0),
            counters: Counters::default(),
        });
        // Drops connections and breakers of nodes that left. Holds the client weakly: it ends
        // when the last clone is dropped (the mirror stops, the watch closes).
        let weak = Arc::downgrade(&inner);
        let mut rx = inner.mirror.subscribe();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(inner) = weak.upgrade() else { return };
                let state = rx.borrow_and_update().clone();
                inner.prune(&state);
            }
        });
        Ok(ClusterClient { inner })
    }

    /// The cluster's name.
    pub fn cluster(&self) -> &str {
        &self.inner.cluster
    }

    /// The newest cluster state (kept as last seen while etcd is unreachable).
    pub fn state(&self) -> Arc<ClusterState> {
        self.inner.mirror.state()
    }

    /// Counters since connect.
    pub fn stats(&self) -> ClusterStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClusterStats {
            requests: get(&c.requests),
            rpcs: get(&c.rpcs),
            retries: get(&c.retries),
            hedges: get(&c.hedges),
            hedges_won: get(&c.hedges_won),
            breaker_opens: get(&c.breaker_opens),
            version_retries: get(&c.version_retries),
        }
    }

    /// Rows of `table` in `model` for `keys`, all at the version the cluster serves.
    pub async fn lookup(
        &self,
        model: &str,
        table: &str,
        keys: &[u64],
    ) -> Result<Rows, ClientError> {
        let (_, mut rows) = self.read(model, &[(table, keys)], None, false).await?;
        rows.pop()
            .ok_or_else(|| internal("lookup returned no table"))
    }

    /// Rows of `table` in `model` for `keys` at `version` (which every replica involved must
    /// still be able to read; else `FAILED_PRECONDITION` once the request deadline passes).
    pub async fn lookup_at(
        &self,
        model: &str,
        table: &str,
        keys: &[u64],
        version: u64,
    ) -> Result<Rows, ClientError> {
        let (_, mut rows) = self
            .read(model, &[(table, keys)], Some(version), false)
            .await?;
        rows.pop()
            .ok_or_else(|| internal("lookup returned no table"))
    }

    /// Rows of several tables of `model`, all at one version.
    pub async fn multi_lookup(
        &self,
        model: &str,
        tables: &[(&str, &[u64])],
    ) -> Result<MultiRows, ClientError> {
        if tables.is_empty() {
            return Err(ClientError::Cluster {
                code: Code::InvalidArgument,
                message: format!(
                    "multi-lookup of model {model:?} names no table; give at least one"
                ),
            });
        }
        let (version, rows) = self.read(model, tables, None, true).await?;
        Ok(MultiRows {
            version,
            tables: tables
                .iter()
                .zip(rows)
                .map(|((table, _), rows)| TableRows {
                    table: (*table).to_string(),
                    rows,
                })
                .collect(),
        })
    }

    /// Inserts or overwrites rows on every replica of their shards; an error if any fails.
    pub async fn upsert(
        &self,
        model: &str,
        table: &str,
        keys: &[u64],
        values: &[f32],
    ) -> Result<WriteAck, ClientError> {
        self.write(WriteOp::Upsert, model, table, keys, Some(values))
            .await
    }

    /// Removes rows on every replica of their shards; an error if any fails.
    pub async fn delete(
        &self,
        model: &str,
        table: &str,
        keys: &[u64],
    ) -> Result<WriteAck, ClientError> {
        self.write(WriteOp::Delete, model, table, keys, None).await
    }

    /// Applies gradients on every replica of their shards; an error if any fails.
    pub async fn push(
        &self,
        model: &str,
        table: &str,
        keys: &[u64],
        gradients: &[f32],
    ) -> Result<WriteAck, ClientError> {
        self.write(WriteOp::Push, model, table, keys, Some(gradients))
            .await
    }

    /// Waits (up to `timeout`) until `f` holds for the cluster state; returns that state.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&ClusterState) -> bool,
    ) -> Result<Arc<ClusterState>, ClientError> {
        let mut rx = self.inner.mirror.subscribe();
        let waited = tokio::time::timeout(timeout, async {
            rx.wait_for(|s| f(s)).await.map(|s| s.clone())
        })
        .await;
        match waited {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(_)) => Err(ClientError::Cluster {
                code: Code::Unavailable,
                message: format!("the view of cluster {} stopped", self.inner.cluster),
            }),
            Err(_) => Err(ClientError::Cluster {
                code: Code::DeadlineExceeded,
                message: format!(
                    "timed out after {timeout:?} waiting for {what} in cluster {}; check `hopps \
                     status` and `hopps node list`",
                    self.inner.cluster
                ),
            }),
        }
    }

    /// A direct client to one live node (its Status, History, Checkpoint, Versions).
    pub async fn node(&self, node_id: &str) -> Result<Client, ClientError> {
        let state = self.state();
        let Some(record) = state.nodes.get(node_id) else {
            let live: Vec<&str> = state.nodes.keys().map(String::as_str).collect();
            return Err(ClientError::Cluster {
                code: Code::NotFound,
                message: format!(
                    "node {node_id:?} is not a live member of cluster {} (live: {}); check `hopps \
                     node list`",
                    self.inner.cluster,
                    if live.is_empty() {
                        "none".to_string()
                    } else {
                        live.join(", ")
                    }
                ),
            });
        };
        self.conn(node_id, &record.grpc_addr)
    }

    /// Sends Rollback to a live node placed on the model, then waits (up to `timeout`) until
    /// the cluster's serving record names `to`.
    pub async fn rollback(
        &self,
        model: &str,
        to: u64,
        timeout: Duration,
    ) -> Result<RollbackReport, ClientError> {
        let start = Instant::now();
        let state = self.state();
        let Some(placement) = state.placements.get(model) else {
            return Err(self.not_placed(model));
        };
        let mut placed: Vec<&str> = Vec::new();
        for n in placement.assignment.iter().flatten() {
            if !placed.contains(&n.as_str()) && state.nodes.contains_key(n) {
                placed.push(n);
            }
        }
        let mut errors = Vec::new();
        let mut report = None;
        for node in placed {
            let left = timeout.saturating_sub(start.elapsed());
            let r = match self.node(node).await {
                Ok(c) => match tokio::time::timeout(left, c.rollback(model, to)).await {
                    Ok(r) => r,
                    Err(_) => Err(ClientError::Cluster {
                        code: Code::DeadlineExceeded,
                        message: format!("node {node} did not answer within {left:?}"),
                    }),
                },
                Err(e) => Err(e),
            };
            match r {
                Ok(r) => {
                    report = Some(r);
                    break;
                }
                Err(e) if classify(&e) == Verdict::Fatal => return Err(e),
                Err(e) => errors.push(format!("{node}: {e}")),
            }
        }
        let Some(mut report) = report else {
            return Err(ClientError::Cluster {
                code: Code::Unavailable,
                message: format!(
                    "no live node of cluster {} placed on model {model:?} took the rollback to \
                     version {to} ({}); check `hopps node list`",
                    self.inner.cluster,
                    if errors.is_empty() {
                        "no live node is placed on it".to_string()
                    } else {
                        errors.join("; ")
                    }
                ),
            });
        };
        self.wait_for(
            &format!("model {model:?} to serve version {to} on every replica"),
            timeout.saturating_sub(start.elapsed()),
            |s| s.serving_version(model) == Some(to),
        )
        .await?;
        report.seconds = start.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Per-node Status RPCs (concurrently, each within `attempt_timeout`) plus the mirror state.
    pub async fn status(&self) -> Result<ClusterStatus, ClientError> {
        let state = self.state();
        let limit = self.inner.options.attempt_timeout;
        let asks = state.nodes.values().map(|n| async move {
            let r = async {
                let c = self.conn(&n.id, &n.grpc_addr)?;
                tokio::time::timeout(limit, c.status())
                    .await
                    .unwrap_or_else(|_| {
                        Err(ClientError::Cluster {
                            code: Code::DeadlineExceeded,
                            message: format!(
                                "node {} ({}) did not answer Status within {limit:?}",
                                n.id, n.grpc_addr
                            ),
                        })
                    })
            }
            .await;
            (n.id.clone(), r.map_err(|e| e.to_string()))
        });
        let nodes = join_all(asks).await;
        Ok(ClusterStatus {
            cluster: self.inner.cluster.clone(),
            state,
            nodes,
        })
    }

    // ---- reads -------------------------------------------------------------------------

    /// Routes a read of `tables` of `model`, redoing it with newer cluster states until it
    /// succeeds, fails for good, or the request deadline passes.
    async fn read(
        &self,
        model: &str,
        tables: &[(&str, &[u64])],
        fixed: Option<u64>,
        multi: bool,
    ) -> Result<(u64, Vec<Rows>), ClientError> {
        bump(&self.inner.counters.requests);
        let timeout = self.inner.options.request_timeout;
        let deadline = Instant::now() + timeout;
        let mut rx = self.inner.mirror.subscribe();
        loop {
            let state = rx.borrow_and_update().clone();
            let last = match self
                .read_once(model, tables, fixed, multi, state, deadline)
                .await
            {
                Ok(r) => return Ok(r),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Redo(e)) => e,
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Cluster {
                    code: last.code().unwrap_or(Code::Unavailable),
                    message: format!(
                        "{} in cluster {} did not succeed within the request timeout \
                         ({timeout:?}): {last}",
                        describe_read(model, tables),
                        self.inner.cluster
                    ),
                });
            }
            bump(&self.inner.counters.version_retries);
            let wait = (deadline - now).min(REDO_WAIT);
            match tokio::time::timeout(wait, rx.changed()).await {
                Ok(Ok(())) | Err(_) => {}
                // The mirror stopped (cannot happen while this client lives): do not spin.
                Ok(Err(_)) => tokio::time::sleep(wait).await,
            }
        }
    }

    async fn read_once(
        &self,
        model: &str,
        tables: &[(&str, &[u64])],
        fixed: Option<u64>,
        multi: bool,
        state: Arc<ClusterState>,
        deadline: Instant,
    ) -> Result<(u64, Vec<Rows>), Failure> {
        let Some(placement) = state.placements.get(model) else {
            return Err(Failure::Redo(self.not_placed(model)));
        };
        let keys: Vec<&[u64]> = tables.iter().map(|(_, k)| *k).collect();
        let req = Req {
            model,
            tables: tables.iter().map(|(t, _)| *t).collect(),
            multi,
            split: Split::new(&keys, placement.shards),
            seed: self.inner.seed.fetch_add(1, Ordering::Relaxed),
            what: describe_read(model, tables),
            state: state.clone(),
            deadline,
        };
        let shards = req.split.shards();
        let answers = match fixed.or(state.serving_version(model)) {
            Some(v) => self.fetch(&req, shards, Some(v), Vec::new(), true).await?,
            None => {
                // No serving record yet: the first shard's answer chooses the version, and
                // the rest is pinned to it, so the result still has one version.
                let (first, rest) = shards
                    .split_first()
                    .ok_or_else(|| Failure::Fatal(internal("a split without shards")))?;
                let mut answers = self
                    .fetch(&req, vec![*first], None, Vec::new(), true)
                    .await?;
                let version = answers
                    .first()
                    .map(|a| a.version)
                    .ok_or_else(|| Failure::Fatal(internal("a fetch without answers")))?;
                if !rest.is_empty() {
                    answers.extend(
                        self.fetch(&req, rest.to_vec(), Some(version), Vec::new(), true)
                            .await?,
                    );
                }
                answers
            }
        };
        let version = answers.first().map(|a| a.version).unwrap_or_default();
        let rows = route::merge(&req.split.lens, &answers).map_err(|reason| {
            Failure::Redo(ClientError::Protocol {
                what: req.what.clone(),
                reason,
            })
        })?;
        Ok((version, rows))
    }

    /// Fetches `shards` from replicas not in `tried`: chooses a node per shard, one RPC per
    /// node, concurrently.
    fn fetch<'a>(
        &'a self,
        req: &'a Req<'a>,
        shards: Vec<u32>,
        pin: Option<u64>,
        tried: Vec<(String, String)>,
        may_hedge: bool,
    ) -> BoxFuture<'a, Result<Vec<Answer>, Failure>> {
        async move {
            let groups = {
                let now = Instant::now();
                let breakers = lock(&self.inner.breakers);
                route::assign(
                    &shards,
                    |s| candidates(req, s, pin),
                    |n| tried.iter().any(|(t, _)| t == n),
                    |n| breakers.get(n).is_none_or(|b| b.available(now)),
                    req.seed,
                )
            };
            let groups =
                groups.map_err(|shard| Failure::Redo(self.no_replica(req, shard, pin, &tried)))?;
            let calls = groups.into_iter().map(|(node, shards)| {
                self.fetch_group(req, node, shards, pin, tried.clone(), may_hedge)
            });
            let answers = try_join_all(calls).await?;
            Ok(answers.into_iter().flatten().collect())
        }
        .boxed()
    }

    /// Fetches `shards` from `node`, hedging on other replicas when it is slow and retrying on
    /// them when it fails.
    async fn fetch_group(
        &self,
        req: &Req<'_>,
        node: String,
        shards: Vec<u32>,
        pin: Option<u64>,
        tried: Vec<(String, String)>,
        may_hedge: bool,
    ) -> Result<Vec<Answer>, Failure> {
        let primary = self.attempt(req, &node, &shards, pin);
        tokio::pin!(primary);
        let hedge_after = self.inner.options.hedge_after;
        let hedging = may_hedge
            && Instant::now() + hedge_after < req.deadline
            && self.has_alternatives(req, &shards, pin, &node, &tried);
        if hedging {
            tokio::select! {
                r = &mut primary => return self.after(req, &node, &shards, pin, tried, r).await,
                _ = tokio::time::sleep(hedge_after) => {}
            }
            bump(&self.inner.counters.hedges);
            let mut others = tried.clone();
            others.push((node.clone(), format!("no answer within {hedge_after:?}")));
            let mut hedge = self.fetch(req, shards.clone(), pin, others, false);
            tokio::select! {
                r = &mut primary => match r {
                    Ok(a) => Ok(vec![a]),
                    Err(e) if classify(&e) == Verdict::Fatal => Err(Failure::Fatal(e)),
                    // The hedge already covers the other replicas.
                    Err(_) => hedge.await,
                },
                r = &mut hedge => match r {
                    Ok(a) => {
                        bump(&self.inner.counters.hedges_won);
                        Ok(a)
                    }
                    Err(Failure::Fatal(e)) => Err(Failure::Fatal(e)),
                    Err(redo) => match primary.await {
                        Ok(a) => Ok(vec![a]),
                        Err(e) if classify(&e) == Verdict::Fatal => Err(Failure::Fatal(e)),
                        Err(_) => Err(redo),
                    },
                },
            }
        } else {
            let r = primary.await;
            self.after(req, &node, &shards, pin, tried, r).await
        }
    }

    async fn after(
        &self,
        req: &Req<'_>,
        node: &str,
        shards: &[u32],
        pin: Option<u64>,
        mut tried: Vec<(String, String)>,
        r: Result<Answer, ClientError>,
    ) -> Result<Vec<Answer>, Failure> {
        match r {
            Ok(a) => Ok(vec![a]),
            Err(e) if classify(&e) == Verdict::Fatal => Err(Failure::Fatal(e)),
            Err(e) => {
                bump(&self.inner.counters.retries);
                tried.push((node.to_string(), e.to_string()));
                self.fetch(req, shards.to_vec(), pin, tried, false).await
            }
        }
    }

    /// Whether every shard of the group has a replica other than `node` and the tried ones.
    fn has_alternatives(
        &self,
        req: &Req<'_>,
        shards: &[u32],
        pin: Option<u64>,
        node: &str,
        tried: &[(String, String)],
    ) -> bool {
        shards.iter().all(|&s| {
            candidates(req, s, pin)
                .iter()
                .any(|n| n != node && !tried.iter().any(|(t, _)| t == n))
        })
    }

    /// One RPC to `node` for the keys of `shards`, with the breaker's accounting.
    async fn attempt(
        &self,
        req: &Req<'_>,
        node: &str,
        shards: &[u32],
        pin: Option<u64>,
    ) -> Result<Answer, ClientError> {
        let remaining = req.deadline.saturating_duration_since(Instant::now());
        let out_of_time = || ClientError::Cluster {
            code: Code::DeadlineExceeded,
            message: format!("the request timeout passed before node {node} was asked"),
        };
        if remaining.is_zero() {
            return Err(out_of_time());
        }
        let Some(record) = req.state.nodes.get(node) else {
            return Err(ClientError::Cluster {
                code: Code::Unavailable,
                message: format!("node {node} is not alive"),
            });
        };
        let client = self.conn(node, &record.grpc_addr)?;
        let Ok(Ok(_permit)) = tokio::time::timeout(remaining, self.inner.permits.acquire()).await
        else {
            return Err(out_of_time());
        };
        lock(&self.inner.breakers)
            .entry(node.to_string())
            .or_insert_with(|| self.new_breaker())
            .on_call(Instant::now());
        bump(&self.inner.counters.rpcs);
        let parts = req.split.gather(shards);
        let limit = self
            .inner
            .options
            .attempt_timeout
            .min(req.deadline.saturating_duration_since(Instant::now()));
        let result = match tokio::time::timeout(limit, call(&client, req, &parts, pin)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Cluster {
                code: Code::DeadlineExceeded,
                message: format!(
                    "node {node} ({}) did not answer within {limit:?}",
                    record.grpc_addr
                ),
            }),
        };
        let result = result.and_then(|(version, rows)| match pin {
            Some(p) if p != version || rows.iter().any(|r| r.version != p) => {
                Err(ClientError::Protocol {
                    what: format!("{} on node {node}", req.what),
                    reason: format!("answered version {version} to a request pinned to {p}"),
                })
            }
            _ => Ok(Answer {
                node: node.to_string(),
                version,
                parts,
                rows,
            }),
        });
        let verdict = result.as_ref().err().map(classify);
        let mut breakers = lock(&self.inner.breakers);
        let b = breakers
            .entry(node.to_string())
            .or_insert_with(|| self.new_breaker());
        match verdict {
            None | Some(Verdict::Stale) | Some(Verdict::Fatal) => b.on_success(),
            Some(Verdict::NodeFailure) => {
                if b.on_failure(Instant::now()) {
                    bump(&self.inner.counters.breaker_opens);
                    tracing::warn!(node, cluster = %self.inner.cluster, "circuit breaker opened");
                }
            }
        }
        result
    }

    fn new_breaker(&self) -> Breaker {
        Breaker::new(
            self.inner.options.breaker_failures,
            self.inner.options.breaker_cooldown,
        )
    }

    fn conn(&self, node: &str, addr: &str) -> Result<Client, ClientError> {
        let mut conns = lock(&self.inner.conns);
        if let Some(c) = conns.get(node)
            && c.addr() == addr
        {
            return Ok(c.clone());
        }
        let c = Client::connect_lazy(addr, &self.inner.options.client).map_err(|e| {
            ClientError::Cluster {
                code: Code::Unavailable,
                message: format!(
                    "node {node} of cluster {} registered gRPC address {addr:?}, which is not \
                     usable ({e}); check its --advertise setting",
                    self.inner.cluster
                ),
            }
        })?;
        conns.insert(node.to_string(), c.clone());
        Ok(c)
    }

    // ---- writes ------------------------------------------------------------------------

    async fn write(
        &self,
        op: WriteOp,
        model: &str,
        table: &str,
        keys: &[u64],
        values: Option<&[f32]>,
    ) -> Result<WriteAck, ClientError> {
        bump(&self.inner.counters.requests);
        let what = format!("{} to model {model:?} table {table:?}", op.name());
        let state = self.state();
        let Some(placement) = state.placements.get(model) else {
            return Err(self.not_placed(model));
        };
        if keys.is_empty() {
            return Ok(WriteAck {
                version: state.serving_version(model).unwrap_or(0),
                rows: 0,
                sequence: 0,
            });
        }
        let dim = match values {
            Some(v) if v.len() % keys.len() != 0 => {
                return Err(ClientError::Cluster {
                    code: Code::InvalidArgument,
                    message: format!(
                        "{what}: {} floats for {} keys is not a whole number of rows; give \
                         keys.len() * dim floats",
                        v.len(),
                        keys.len()
                    ),
                });
            }
            Some(v) => v.len() / keys.len(),
            None => 0,
        };
        let split = Split::new(&[keys], placement.shards);
        let mut by_node: BTreeMap<String, (String, Vec<u32>)> = BTreeMap::new();
        for &shard in split.parts.keys() {
            let replicas = state.replicas(model, shard, None);
            if replicas.is_empty() {
                let req = Req {
                    model,
                    tables: vec![table],
                    multi: false,
                    split: Split::new(&[], 1),
                    state: state.clone(),
                    deadline: Instant::now(),
                    seed: 0,
                    what: what.clone(),
                };
                return Err(self.no_replica(&req, shard, None, &[]));
            }
            for r in replicas {
                by_node
                    .entry(r.id.clone())
                    .or_insert_with(|| (r.grpc_addr.clone(), Vec::new()))
                    .1
                    .push(shard);
            }
        }
        let deadline = Instant::now() + self.inner.options.request_timeout;
        let sends = by_node.into_iter().map(|(node, (addr, shards))| {
            let part = split.gather(&shards).pop().unwrap_or_default();
            let what = &what;
            async move {
                let rows: Vec<f32> = match values {
                    Some(v) => part
                        .positions
                        .iter()
                        .flat_map(|&p| v.get(p * dim..(p + 1) * dim).unwrap_or(&[]))
                        .copied()
                        .collect(),
                    None => Vec::new(),
                };
                let r = self
                    .write_one(op, &node, &addr, model, table, &part.keys, &rows, deadline)
                    .await;
                (node, r.map_err(|e| (e, what.clone())))
            }
        });
        let results = join_all(sends).await;
        let mut ack = WriteAck {
            version: 0,
            rows: keys.len() as u64,
            sequence: 0,
        };
        let mut failed = Vec::new();
        let mut code = None;
        let total = results.len();
        for (node, r) in results {
            match r {
                Ok(a) => {
                    ack.version = ack.version.max(a.version);
                    ack.sequence = ack.sequence.max(a.sequence);
                }
                Err((e, _)) => {
                    code.get_or_insert(e.code().unwrap_or(Code::Unavailable));
                    failed.push(format!("{node}: {e}"));
                }
            }
        }
        if failed.is_empty() {
            return Ok(ack);
        }
        let advice = match op {
            WriteOp::Push => {
                "the other replicas applied the gradients; pushing again applies them twice there"
            }
            _ => "the other replicas applied it; the write is idempotent, so retry it",
        };
        Err(ClientError::Cluster {
            code: code.unwrap_or(Code::Unavailable),
            message: format!(
                "{what} in cluster {} failed on {} of {total} replicas ({}); {advice}",
                self.inner.cluster,
                failed.len(),
                failed.join("; ")
            ),
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_one(
        &self,
        op: WriteOp,
        node: &str,
        addr: &str,
        model: &str,
        table: &str,
        keys: &[u64],
        values: &[f32],
        deadline: Instant,
    ) -> Result<WriteAck, ClientError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let timeout = || ClientError::Cluster {
            code: Code::DeadlineExceeded,
            message: format!("node {node} ({addr}) did not answer in time"),
        };
        let client = self.conn(node, addr)?;
        let Ok(Ok(_permit)) = tokio::time::timeout(remaining, self.inner.permits.acquire()).await
        else {
            return Err(timeout());
        };
        bump(&self.inner.counters.rpcs);
        let limit = self
            .inner
            .options
            .attempt_timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        let call = async {
            match op {
                WriteOp::Upsert => client.upsert(model, table, keys, values).await,
                WriteOp::Delete => client.delete(model, table, keys).await,
                WriteOp::Push => client.push(model, table, keys, values).await,
            }
        };
        let r = tokio::time::timeout(limit, call)
            .await
            .unwrap_or_else(|_| Err(timeout()));
        let mut breakers = lock(&self.inner.breakers);
        let b = breakers
            .entry(node.to_string())
            .or_insert_with(|| self.new_breaker());
        match r.as_ref().err().map(classify) {
            Some(Verdict::NodeFailure) => {
                if b.on_failure(Instant::now()) {
                    bump(&self.inner.counters.breaker_opens);
                }
            }
            _ => b.on_success(),
        }
        r
    }

    // ---- messages ----------------------------------------------------------------------

    fn not_placed(&self, model: &str) -> ClientError {
        ClientError::Cluster {
            code: Code::Unavailable,
            message: format!(
                "model {model:?} has no placement in cluster {}; check the model name, that the \
                 nodes serve a repository holding it, and `hopps status`",
                self.inner.cluster
            ),
        }
    }

    /// Why no replica is left for `shard`, node by node.
    fn no_replica(
        &self,
        req: &Req<'_>,
        shard: u32,
        pin: Option<u64>,
        tried: &[(String, String)],
    ) -> ClientError {
        let state = &req.state;
        let model = req.model;
        let placed: Vec<String> = state
            .placements
            .get(model)
            .and_then(|p| p.assignment.get(shard as usize))
            .cloned()
            .unwrap_or_default();
        let mut version_missing = false;
        let reasons: Vec<String> = placed
            .iter()
            .map(|n| {
                if let Some((_, e)) = tried.iter().find(|(t, _)| t == n) {
                    return format!("{n} failed: {e}");
                }
                if !state.nodes.contains_key(n) {
                    return format!("{n} is not alive");
                }
                let Some(r) = state.report(model, n) else {
                    return format!("{n} has not reported the model yet");
                };
                if r.held.binary_search(&shard).is_err() {
                    return if r.loading.contains(&shard) {
                        format!("{n} is still loading it")
                    } else {
                        format!("{n} has not loaded it yet")
                    };
                }
                match pin {
                    Some(v) if !r.readable.contains(&v) => {
                        version_missing = true;
                        format!("{n} cannot read version {v} (readable: {:?})", r.readable)
                    }
                    _ => format!("{n} is ready"),
                }
            })
            .collect();
        let version = pin.map(|v| format!(" at version {v}")).unwrap_or_default();
        let message = if placed.is_empty() {
            format!(
                "model {model} shard {shard} is placed on no node in cluster {}; wait for the \
                 placement controller or check `hopps node list`",
                self.inner.cluster
            )
        } else {
            format!(
                "model {model} shard {shard} has no ready replica{version} (placed on {}; {}); \
                 wait for the cluster to load or check `hopps node list`",
                placed.join(", "),
                reasons.join(", ")
            )
        };
        // A node's own answer tells more than "unavailable" (e.g. a version it cannot read).
        let code = if version_missing
            || tried
                .iter()
                .any(|(_, e)| e.starts_with("FAILED_PRECONDITION"))
        {
            Code::FailedPrecondition
        } else {
            Code::Unavailable
        };
        ClientError::Cluster { code, message }
    }
}

/// Replicas that can serve `shard` of the request's model at `pin` now, in placement order.
fn candidates(req: &Req<'_>, shard: u32, pin: Option<u64>) -> Vec<String> {
    req.state
        .replicas(req.model, shard, pin)
        .into_iter()
        .map(|n| n.id.clone())
        .collect()
}

/// One lookup RPC for `parts` (a Lookup for one table, a MultiLookup for several).
async fn call(
    client: &Client,
    req: &Req<'_>,
    parts: &[Part],
    pin: Option<u64>,
) -> Result<(u64, Vec<Rows>), ClientError> {
    if !req.multi
        && let (Some(table), Some(part)) = (req.tables.first(), parts.first())
    {
        let rows = client.lookup_at(req.model, table, &part.keys, pin).await?;
        return Ok((rows.version, vec![rows]));
    }
    let tables: Vec<(&str, &[u64])> = req
        .tables
        .iter()
        .zip(parts)
        .map(|(t, p)| (*t, p.keys.as_slice()))
        .collect();
    let m = client.multi_lookup(req.model, &tables, pin).await?;
    Ok((m.version, m.tables.into_iter().map(|t| t.rows).collect()))
}

fn describe_read(model: &str, tables: &[(&str, &[u64])]) -> String {
    match tables {
        [(table, _)] => format!("lookup of model {model:?} table {table:?}"),
        _ => format!(
            "multi-lookup of model {model:?} tables {:?}",
            tables.iter().map(|(t, _)| *t).collect::<Vec<_>>()
        ),
    }
}

fn internal(what: &str) -> ClientError {
    ClientError::Cluster {
        code: Code::Internal,
        message: format!("hopps client bug: {what}; please report it"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_for_retries() {
        let status = |c: Code| ClientError::Status {
            code: c,
            message: String::new(),
        };
        assert_eq!(classify(&status(Code::Unavailable)), Verdict::NodeFailure);
        assert_eq!(classify(&status(Code::Internal)), Verdict::NodeFailure);
        assert_eq!(classify(&status(Code::FailedPrecondition)), Verdict::Stale);
        assert_eq!(classify(&status(Code::NotFound)), Verdict::Fatal);
        assert_eq!(classify(&status(Code::InvalidArgument)), Verdict::Fatal);
        let wrong_version = ClientError::Protocol {
            what: "x".into(),
            reason: "y".into(),
        };
        assert_eq!(classify(&wrong_version), Verdict::NodeFailure);
    }
}
