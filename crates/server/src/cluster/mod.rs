//! One hopps node in a cluster: membership, the node agent and (on the elected node) the
//! placement controller. The protocol is the one in `docs/cluster.md`; the records and keys are
//! `hopps-cluster`'s.
//!
//! - [`Agent`]: the engine's [`Coordinator`]. It answers from a live mirror of the cluster:
//!   which shards of a model this node holds (exactly those the placement lists it on), the
//!   highest version a first load may reach (the serving record), and when a staged version may
//!   become the default (once the controller recorded it as serving).
//! - `membership`: the node's lease, its `nodes/<id>` record and its `reports/<model>/<id>`
//!   readiness reports, all under the lease, kept alive and rewritten after etcd comes back.
//! - `controller`: campaigns for leadership with the node's lease; the leader plans placements,
//!   switches serving versions in two phases and releases drained nodes. Every write is a txn
//!   guarded by the leader key, so a deposed leader writes nothing.
//!
//! Architecture invariant: while etcd is unreachable the node keeps the placement and serving
//! versions it last saw (the mirror keeps its last state); changes wait for etcd.

mod controller;
mod membership;
mod serving;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hopps_cluster::{ClusterState, Keys, Mirror};
use hopps_engine::{Coordinator, Engine, Gate};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{ClusterConfig, ServerConfig};
use crate::error::ServerError;

/// How long a staged version waits for the cluster to record it as serving when nothing else
/// happens, before the engine drops it (and stages it again on a later pass if still wanted).
/// Long on purpose: the other nodes may still be building a large full version, and dropping a
/// staged full version means building it again. A change of this node's placement or of the
/// cluster's serving version ends the wait at once.
const STAGE_PATIENCE: Duration = Duration::from_secs(600);

/// The node agent: what the cluster tells this node's engine.
pub struct Agent {
    id: String,
    cluster: String,
    keys: Keys,
    /// The newest mirror state; a default (unsynced) one until the mirror's first read, in which
    /// the node holds nothing.
    state: watch::Sender<Arc<ClusterState>>,
    leader: AtomicBool,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("id", &self.id)
            .field("cluster", &self.cluster)
            .finish()
    }
}

impl Agent {
    pub(crate) fn new(id: String, cluster: &str) -> Agent {
        Agent {
            id,
            cluster: cluster.to_string(),
            keys: Keys::new(cluster),
            state: watch::channel(Arc::new(ClusterState::default())).0,
            leader: AtomicBool::new(false),
        }
    }

    /// This node's id in the cluster.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The cluster's name.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// True while this node runs the placement controller.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// The newest cluster state this node has seen.
    pub fn state(&self) -> Arc<ClusterState> {
        self.state.borrow().clone()
    }

    /// Waits until the node has read the cluster from etcd once (placements and serving
    /// versions are known), or `shutdown` turns true.
    pub(crate) async fn synced(&self, mut shutdown: watch::Receiver<bool>) {
        let mut rx = self.state.subscribe();
        tokio::select! {
            _ = rx.wait_for(|s| s.synced) => {}
            _ = shutdown.wait_for(|stop| *stop) => {}
        }
    }

    /// Shards of each model placed on this node.
    fn placed(&self, state: &ClusterState) -> BTreeMap<String, Vec<u32>> {
        state
            .placements
            .iter()
            .map(|(m, p)| (m.clone(), p.shards_of(&self.id)))
            .filter(|(_, s)| !s.is_empty())
            .collect()
    }

    /// Ready when the cluster was read once and every model placed on this node holds every
    /// shard placed on it (a node with nothing placed is ready). Returns what is missing.
    pub(crate) fn readiness(&self, engine: &Engine) -> Result<(), Vec<String>> {
        let state = self.state();
        if !state.synced {
            return Err(vec![format!(
                "cluster {}: not read from etcd yet",
                self.cluster
            )]);
        }
        let reports: BTreeMap<String, hopps_engine::ModelReport> = engine
            .cluster_report()
            .into_iter()
            .map(|r| (r.model.clone(), r))
            .collect();
        let mut missing = Vec::new();
        for (model, shards) in self.placed(&state) {
            let held: BTreeSet<u32> = reports
                .get(&model)
                .map(|r| r.held.iter().copied().collect())
                .unwrap_or_default();
            let absent: Vec<u32> = shards.into_iter().filter(|s| !held.contains(s)).collect();
            if !absent.is_empty() {
                missing.push(format!(
                    "{model}: shards {absent:?} placed here, not held yet"
                ));
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing)
        }
    }
}

impl Coordinator for Agent {
    fn shards(&self, model: &str) -> Option<BTreeSet<u32>> {
        let state = self.state.borrow();
        Some(
            state
                .placements
                .get(model)
                .map(|p| p.shards_of(&self.id).into_iter().collect())
                .unwrap_or_default(),
        )
    }

    fn ceiling(&self, model: &str) -> Option<u64> {
        self.state.borrow().serving_version(model)
    }

    fn staged(
        &self,
        model: &str,
        version: u64,
    ) -> Pin<Box<dyn Future<Output = Gate> + Send + 'static>> {
        let mut rx = self.state.subscribe();
        let model = model.to_string();
        let id = self.id.clone();
        // The wait holds the model's version lock in the engine, so it must also end when the
        // node has other work for the model: a new placement (shards to load or drop, e.g.
        // after another node died) or a serving switch to some other version (a rollback
        // decided meanwhile). The engine then drops the staged version, follows the change, and
        // stages again if the version is still wanted.
        let (placed_then, serving_then) = {
            let s = rx.borrow();
            (placed_on(&s, &model, &id), s.serving_version(&model))
        };
        Box::pin(async move {
            let wait = rx.wait_for(|s| {
                let serving = s.serving_version(&model);
                serving == Some(version)
                    || serving != serving_then
                    || placed_on(s, &model, &id) != placed_then
            });
            match tokio::time::timeout(STAGE_PATIENCE, wait).await {
                Ok(Ok(s)) if s.serving_version(&model) == Some(version) => Gate::Go,
                Ok(Ok(_)) => {
                    tracing::info!(model = %model, version, "placement or serving version changed while a version was staged; dropping it to follow the change");
                    Gate::Abandon
                }
                Ok(Err(_)) => Gate::Abandon,
                Err(_) => {
                    tracing::info!(model = %model, version, seconds = STAGE_PATIENCE.as_secs(), "the cluster did not switch to the staged version; dropping it for now");
                    Gate::Abandon
                }
            }
        })
    }
}

/// The shards of `model` the placement puts on `node` (`None`: the model is not placed).
fn placed_on(state: &ClusterState, model: &str, node: &str) -> Option<Vec<u32>> {
    state.placements.get(model).map(|p| p.shards_of(node))
}

/// Where [`crate::engine_config`] leaves the agent it made for [`crate::Server`] to find.
/// Clones share the slot; it never takes part in comparing configs.
#[derive(Clone, Default)]
pub(crate) struct AgentSlot(Arc<std::sync::Mutex<Option<Arc<Agent>>>>);

impl AgentSlot {
    pub(crate) fn set(&self, agent: Arc<Agent>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(agent);
    }
    pub(crate) fn get(&self) -> Option<Arc<Agent>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl PartialEq for AgentSlot {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for AgentSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentSlot")
    }
}

/// The background tasks of a node in a cluster; dropping this stops them all at once (without
/// revoking the lease: a dropped server is lost to the cluster only when its lease expires,
/// like a crashed one).
pub(crate) struct ClusterTasks {
    tasks: Vec<JoinHandle<()>>,
    membership: Option<JoinHandle<()>>,
}

impl ClusterTasks {
    /// Waits for membership to revoke the lease after shutdown, at most `grace`.
    pub(crate) async fn finish(mut self, grace: Duration) {
        if let Some(m) = self.membership.take()
            && tokio::time::timeout(grace, m).await.is_err()
        {
            tracing::warn!("the cluster membership did not stop within the grace period");
        }
    }
}

impl Drop for ClusterTasks {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(m) = &self.membership {
            m.abort();
        }
    }
}

/// What the node's cluster tasks share.
pub(crate) struct NodeContext {
    pub agent: Arc<Agent>,
    pub engine: Engine,
    pub config: ClusterConfig,
    pub server: ServerConfig,
    pub grpc_addr: String,
    pub admin_addr: String,
    pub started_unix: f64,
    /// The node's current lease (None until granted, and while re-granting).
    pub lease: watch::Sender<Option<i64>>,
    pub shutdown: watch::Receiver<bool>,
}

/// Joins the cluster: mirrors it into the agent, registers the node, follows placement changes
/// and campaigns for the controller. Fails when another live node has this node's id.
pub(crate) async fn start(
    agent: Arc<Agent>,
    engine: Engine,
    server: &ServerConfig,
    config: &ClusterConfig,
    grpc_addr: String,
    admin_addr: String,
    shutdown: watch::Receiver<bool>,
) -> Result<ClusterTasks, ServerError> {
    crate::metrics::cluster_leader(false);
    // Exported from the start (at 0), so dashboards and alerts see the series before an error.
    crate::metrics::cluster_etcd_errors_registered();
    let advertised = config
        .advertise
        .clone()
        .unwrap_or_else(|| grpc_addr.clone());
    if advertised.starts_with("0.0.0.0") || advertised.starts_with("[::]") {
        tracing::warn!(addr = %advertised, "the gRPC address is a wildcard; clients cannot reach it: give --advertise HOST:PORT");
    }
    let ctx = Arc::new(NodeContext {
        agent: agent.clone(),
        engine: engine.clone(),
        config: config.clone(),
        server: server.clone(),
        grpc_addr: advertised,
        admin_addr,
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
        lease: watch::channel(None).0,
        shutdown,
    });
    let mut tasks = Vec::new();
    let mirror = Mirror::start(config.etcd.clone(), &config.name);
    tasks.push(tokio::spawn(follow(mirror, ctx.clone())));
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let membership = tokio::spawn(membership::run(ctx.clone(), first_tx));
    tasks.push(tokio::spawn(controller::run(ctx.clone())));
    let cluster_tasks = ClusterTasks {
        tasks,
        membership: Some(membership),
    };
    // A node whose id is taken by a live node must not start; an unreachable etcd must not keep
    // it from serving (it registers when etcd answers).
    let patience = config.lease_ttl * 2 + Duration::from_secs(5);
    match tokio::time::timeout(patience, first_rx).await {
        Ok(Ok(Err(message))) => return Err(ServerError::Cluster(message)),
        Ok(Ok(Ok(()))) => {
            tracing::info!(node = %agent.id(), cluster = %agent.cluster(), "registered in the cluster")
        }
        Ok(Err(_)) => {}
        Err(_) => tracing::warn!(
            cluster = %agent.cluster(),
            etcd = %config.etcd.join(","),
            "not registered in the cluster yet (etcd unreachable?); serving nothing until it is, retrying"
        ),
    }
    Ok(cluster_tasks)
}

/// What the engine acts on, per model: the shards placed on this node and the serving version.
type NodeView = BTreeMap<String, (Vec<u32>, Option<u64>)>;

/// Feeds mirror states to the agent and wakes the engine when this node's placement or a
/// serving version changes.
async fn follow(mirror: Mirror, ctx: Arc<NodeContext>) {
    let mut rx = mirror.subscribe();
    let mut last: Option<NodeView> = None;
    let mut gauged: BTreeSet<String> = BTreeSet::new();
    loop {
        let state = rx.borrow_and_update().clone();
        ctx.agent.state.send_replace(state.clone());
        if state.synced {
            let placed = ctx.agent.placed(&state);
            let mut view = NodeView::new();
            for m in state.placements.keys().chain(state.serving.keys()) {
                view.insert(
                    m.clone(),
                    (
                        placed.get(m).cloned().unwrap_or_default(),
                        state.serving_version(m),
                    ),
                );
            }
            if last.as_ref() != Some(&view) {
                for (m, (shards, _)) in &view {
                    crate::metrics::cluster_placed_shards(m, shards.len());
                    gauged.insert(m.clone());
                }
                for m in gauged.iter().filter(|m| !view.contains_key(*m)) {
                    crate::metrics::cluster_placed_shards(m, 0);
                }
                ctx.engine.wake();
                last = Some(view);
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Counts an etcd error (the `hopps_cluster_etcd_errors_total` counter) and logs it.
pub(crate) fn etcd_error(what: &str, err: &dyn std::fmt::Display) {
    crate::metrics::cluster_etcd_error();
    tracing::warn!(error = %err, "{what}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use hopps_cluster::{Placement, Serving};

    fn state(placed_on_me: &[u32], serving: Option<u64>) -> Arc<ClusterState> {
        let mut s = ClusterState {
            synced: true,
            connected: true,
            ..ClusterState::default()
        };
        let assignment = (0..4u32)
            .map(|shard| {
                if placed_on_me.contains(&shard) {
                    vec!["me".to_string(), "other".to_string()]
                } else {
                    vec!["other".to_string()]
                }
            })
            .collect();
        s.placements.insert(
            "m".into(),
            Placement {
                model: "m".into(),
                shards: 4,
                replicas: 2,
                epoch: 1,
                assignment,
            },
        );
        if let Some(version) = serving {
            s.serving.insert(
                "m".into(),
                Serving {
                    model: "m".into(),
                    version,
                    previous: None,
                    time: String::new(),
                },
            );
        }
        Arc::new(s)
    }

    async fn settles(gate: Pin<Box<dyn Future<Output = Gate> + Send>>) -> Gate {
        tokio::time::timeout(Duration::from_secs(5), gate)
            .await
            .expect("the gate resolves once the cluster changes")
    }

    #[tokio::test]
    async fn a_staged_version_goes_when_the_cluster_serves_it() {
        let agent = Agent::new("me".into(), "c");
        agent.state.send_replace(state(&[0, 1], Some(3)));
        let mut gate = agent.staged("m", 4);
        // An unrelated change (here only the revision) does not end the wait.
        let mut unrelated = (*state(&[0, 1], Some(3))).clone();
        unrelated.revision = 7;
        agent.state.send_replace(Arc::new(unrelated));
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut gate)
                .await
                .is_err(),
            "the gate must keep waiting"
        );
        agent.state.send_replace(state(&[0, 1], Some(4)));
        assert_eq!(settles(gate).await, Gate::Go);
    }

    #[tokio::test]
    async fn a_staged_version_is_dropped_to_follow_a_new_placement() {
        let agent = Agent::new("me".into(), "c");
        agent.state.send_replace(state(&[0, 1], Some(3)));
        let gate = agent.staged("m", 4);
        // Another node died: this node gets shard 2 too and must go and load it.
        agent.state.send_replace(state(&[0, 1, 2], Some(3)));
        assert_eq!(settles(gate).await, Gate::Abandon);
    }

    #[tokio::test]
    async fn a_staged_version_is_dropped_when_the_cluster_switches_elsewhere() {
        let agent = Agent::new("me".into(), "c");
        agent.state.send_replace(state(&[0, 1], Some(3)));
        let gate = agent.staged("m", 4);
        // A rollback to 2 was decided meanwhile.
        agent.state.send_replace(state(&[0, 1], Some(2)));
        assert_eq!(settles(gate).await, Gate::Abandon);
    }

    #[tokio::test]
    async fn a_version_already_serving_goes_at_once() {
        let agent = Agent::new("me".into(), "c");
        agent.state.send_replace(state(&[0, 1], Some(4)));
        assert_eq!(settles(agent.staged("m", 4)).await, Gate::Go);
    }
}
