//! The placement controller, run by the one node elected through etcd.
//!
//! Every node campaigns with its own lease, so a leader that crashes or is partitioned loses
//! the election when its lease expires. The leader runs a pass on every change of the cluster
//! (debounced) and every second:
//! - placements: [`hopps_cluster::plan::plan`] over the repository's models and the alive
//!   nodes (make before break, drained nodes not eligible);
//! - serving versions: the two-phase rule of [`super::serving`];
//! - drains: `released` once no placement lists the node.
//!
//! Invariants: every write is one txn guarded by the create revision of the leader key, so a
//! deposed leader writes nothing; a pass decides only on a mirror that already reflects the
//! controller's own previous writes (no decision on a stale view of itself).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use hopps_cluster::plan::{Candidate, ModelDemand, plan};
use hopps_cluster::{ClusterState, Drain, Placement, Serving, encode};
use hopps_format::Repository;
use tokio::sync::watch;

use super::{NodeContext, etcd_error, serving};

/// How often the repository's model list is read again.
const MODELS_EVERY: Duration = Duration::from_secs(3);
/// Changes arriving together (a node's lease expiring deletes several keys) make one pass.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// etcd refuses a txn with more operations than this (its default `--max-txn-ops` is 128).
const MAX_TXN_OPS: usize = 100;

/// Campaigns for leadership whenever the node has a lease, and leads while elected.
pub(crate) async fn run(ctx: Arc<NodeContext>) {
    let mut lease_rx = ctx.lease.subscribe();
    let stop = crate::signalled(ctx.shutdown.clone());
    tokio::pin!(stop);
    let mut backoff = Duration::from_millis(200);
    loop {
        let lease = tokio::select! {
            l = lease_rx.wait_for(|l| l.is_some()) => match l {
                Ok(l) => l.unwrap_or_default(),
                Err(_) => return,
            },
            () = &mut stop => return,
        };
        let outcome = tokio::select! {
            r = campaign_and_lead(&ctx, lease, &mut lease_rx) => r,
            () = &mut stop => {
                // `stop` has completed: return rather than poll it again in the next round.
                if ctx.agent.leader.swap(false, Ordering::Relaxed) {
                    crate::metrics::cluster_leader(false);
                }
                return;
            }
        };
        if ctx.agent.leader.swap(false, Ordering::Relaxed) {
            crate::metrics::cluster_leader(false);
            tracing::info!(node = %ctx.agent.id(), "no longer the placement controller");
        }
        // Retries while etcd is away back off to 2 s, so an outage does not flood the log.
        let wait = match outcome {
            Ok(()) => {
                backoff = Duration::from_millis(200);
                backoff
            }
            Err(e) => {
                etcd_error(
                    "placement controller: etcd request failed; campaigning again",
                    &e,
                );
                let wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                wait
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = &mut stop => return,
        }
    }
}

async fn campaign_and_lead(
    ctx: &NodeContext,
    lease: i64,
    lease_rx: &mut watch::Receiver<Option<i64>>,
) -> Result<(), String> {
    let mut client = hopps_cluster::connect(&ctx.config.etcd)
        .await
        .map_err(|e| e.to_string())?;
    let election = ctx.agent.keys.election();
    // A campaign waits while another node leads; the client's request timeout cuts that wait
    // into rounds, and the same lease makes every round the same candidacy.
    let (leader, elected_at) = loop {
        tokio::select! {
            r = client.campaign(election.clone(), ctx.agent.id().to_string(), lease) => match r {
                Ok(resp) => match resp.leader() {
                    Some(l) => break (l.clone(), resp.header().map_or(0, |h| h.revision())),
                    None => return Err("the election answered without a leader key".into()),
                },
                Err(etcd_client::Error::GRpcStatus(s))
                    if matches!(s.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled) => continue,
                Err(e) => return Err(format!("campaigning for the placement controller: {e}")),
            },
            changed = lease_rx.changed() => {
                // A new lease: campaign again with it.
                return changed.map_err(|e| e.to_string());
            }
        }
    };
    ctx.agent.leader.store(true, Ordering::Relaxed);
    crate::metrics::cluster_leader(true);
    tracing::info!(node = %ctx.agent.id(), cluster = %ctx.agent.cluster(), "elected placement controller");
    let mut controller = Controller {
        ctx,
        client,
        leader_key: leader.key().to_vec(),
        leader_rev: leader.rev(),
        repo: None,
        models: BTreeMap::new(),
        models_read: None,
        // The previous leader's last writes are older than the election: decide nothing on a
        // mirror that has not seen them.
        seen_revision: elected_at,
        gauged: BTreeSet::new(),
    };
    controller.lead(lease_rx).await
}

struct Controller<'a> {
    ctx: &'a NodeContext,
    client: Client,
    leader_key: Vec<u8>,
    leader_rev: i64,
    repo: Option<Repository>,
    /// Models with at least one committed version, and their shard counts.
    models: BTreeMap<String, u32>,
    models_read: Option<Instant>,
    /// The revision of the controller's last write: passes wait until the mirror has it.
    seen_revision: i64,
    /// Models whose shard-health gauges this node exports (reset when it stops leading).
    gauged: BTreeSet<String>,
}

impl Drop for Controller<'_> {
    fn drop(&mut self) {
        // Only the controller's node reports shard health; a former one must not keep alerting.
        for model in &self.gauged {
            crate::metrics::cluster_shard_health(model, 0, 0);
        }
    }
}

impl Controller<'_> {
    async fn lead(&mut self, lease_rx: &mut watch::Receiver<Option<i64>>) -> Result<(), String> {
        let mut states = self.ctx.agent.state.subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = states.changed() => {
                    changed.map_err(|e| e.to_string())?;
                    tokio::time::sleep(DEBOUNCE).await;
                }
                _ = lease_rx.changed() => return Ok(()),
            }
            if !self.still_leader().await? {
                tracing::info!(node = %self.ctx.agent.id(), "lost the placement controller's election key");
                return Ok(());
            }
            let state = self.ctx.agent.state();
            if !state.synced || !state.connected || state.revision < self.seen_revision {
                continue;
            }
            self.export_shard_health(&state);
            if self.models_read.is_none_or(|t| t.elapsed() >= MODELS_EVERY) {
                self.read_models().await;
            }
            let ops = self.pass(&state);
            if ops.is_empty() {
                continue;
            }
            for chunk in ops.chunks(MAX_TXN_OPS) {
                let txn = Txn::new()
                    .when([Compare::create_revision(
                        self.leader_key.clone(),
                        CompareOp::Equal,
                        self.leader_rev,
                    )])
                    .and_then(chunk.to_vec());
                let resp = self
                    .client
                    .txn(txn)
                    .await
                    .map_err(|e| format!("writing the controller's decisions: {e}"))?;
                if !resp.succeeded() {
                    tracing::info!(node = %self.ctx.agent.id(), "deposed while writing; the new leader decides");
                    return Ok(());
                }
                if let Some(h) = resp.header() {
                    self.seen_revision = self.seen_revision.max(h.revision());
                }
            }
        }
    }

    async fn still_leader(&mut self) -> Result<bool, String> {
        let resp = self
            .client
            .get(self.leader_key.clone(), None)
            .await
            .map_err(|e| format!("reading the controller's election key: {e}"))?;
        Ok(resp
            .kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == self.leader_rev))
    }

    /// Reads the repository's models; on failure the previous list stays.
    async fn read_models(&mut self) {
        self.models_read = Some(Instant::now());
        if self.repo.is_none() {
            match crate::open_repository(&self.ctx.server).await {
                Ok(r) => self.repo = Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "placement controller: cannot open the model repository; keeping the models it knows");
                    return;
                }
            }
        }
        let Some(repo) = &self.repo else { return };
        let names = match repo.list_models().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "placement controller: cannot list the repository's models; keeping the models it knows");
                return;
            }
        };
        for name in names {
            if self.models.contains_key(&name) {
                continue;
            }
            // A model created but never published has nothing to load: placing it would keep
            // its nodes from ever being ready.
            let spec = repo.model(&name).await;
            let versions = repo.versions(&name).await;
            match (spec, versions) {
                (Ok(spec), Ok(v)) if v.latest().is_some() => {
                    self.models.insert(name, spec.shards);
                }
                (Ok(_), Ok(_)) => {}
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(model = %name, error = %e, "placement controller: cannot read the model; not placing it yet")
                }
            }
        }
    }

    /// One pass: the etcd operations that bring the cluster where it should be.
    /// Sets the shard-health gauges: per model, shards with fewer ready replicas (alive, shard
    /// held, serving version readable) than the placement asks for, capped at the nodes that
    /// can take one, and shards with none.
    fn export_shard_health(&mut self, state: &ClusterState) {
        let eligible = state
            .nodes
            .values()
            .filter(|n| n.healthy && !state.drains.contains_key(&n.id))
            .count();
        for (model, p) in &state.placements {
            let want = (p.replicas as usize).min(eligible).max(1);
            let serving = state.serving_version(model);
            let (mut under, mut unavailable) = (0, 0);
            for shard in 0..p.shards {
                match state.replicas(model, shard, serving).len() {
                    0 => unavailable += 1,
                    n if n < want => under += 1,
                    _ => {}
                }
            }
            crate::metrics::cluster_shard_health(model, under, unavailable);
            self.gauged.insert(model.clone());
        }
    }

    fn pass(&self, state: &ClusterState) -> Vec<TxnOp> {
        let keys = &self.ctx.agent.keys;
        let mut ops = Vec::new();
        let demands: Vec<ModelDemand> = self
            .models
            .iter()
            .map(|(m, shards)| ModelDemand {
                model: m.clone(),
                shards: *shards,
                replicas: state
                    .settings
                    .get(m)
                    .map(|s| s.replicas)
                    .unwrap_or(self.ctx.config.replicas)
                    .max(1),
                shard_bytes: shard_bytes(state, m),
            })
            .collect();
        let candidates: Vec<Candidate> = state
            .nodes
            .values()
            .map(|n| Candidate {
                id: n.id.clone(),
                capacity_bytes: n.memory_limit_bytes,
                draining: !n.healthy || state.drains.contains_key(&n.id),
            })
            .collect();
        // A replica counts as held when a pinned lookup of the serving version can go to it:
        // only then may the replica it replaces leave.
        let held = |model: &str, shard: u32, node: &str| {
            state
                .report(model, node)
                .is_some_and(|r| r.serves(shard, state.serving_version(model)))
        };
        let planned = plan(&demands, &candidates, &state.placements, &held);
        let mut after: BTreeMap<&str, &Placement> = state
            .placements
            .iter()
            .map(|(m, p)| (m.as_str(), p))
            .collect();
        for (model, p) in &planned {
            if state.placements.get(model) == Some(p) {
                continue;
            }
            log_change(state.placements.get(model), p);
            ops.push(TxnOp::put(keys.placement(model), encode(p), None));
            after.insert(model, p);
        }
        for model in state.placements.keys() {
            let Some(version) = serving::decide(state, model) else {
                continue;
            };
            let previous = state.serving_version(model);
            tracing::info!(model = %model, version, previous = ?previous, "serving version switched: every placed node has it");
            let record = Serving {
                model: model.clone(),
                version,
                previous,
                time: hopps_format::spec::now_rfc3339(),
            };
            ops.push(TxnOp::put(keys.serving(model), encode(&record), None));
        }
        for (node, drain) in &state.drains {
            if drain.released {
                continue;
            }
            let listed = after
                .values()
                .any(|p| p.assignment.iter().flatten().any(|n| n == node));
            if !listed {
                tracing::info!(node = %node, "drained node released: no placement lists it");
                let record = Drain {
                    released: true,
                    ..drain.clone()
                };
                ops.push(TxnOp::put(keys.drain(node), encode(&record), None));
            }
        }
        ops
    }
}

/// Memory of one replica of one shard of `model`, from the nodes' reports (0 before any).
/// Tables only: staged versions and undo records come and go with switches, and counting them
/// would move shards back and forth around every switch.
fn shard_bytes(state: &ClusterState, model: &str) -> u64 {
    state
        .reports
        .get(model)
        .into_iter()
        .flat_map(|r| r.values())
        .filter(|r| !r.held.is_empty())
        .map(|r| {
            // Reports of nodes older than the `table_bytes` field carry only the total.
            let bytes = if r.table_bytes > 0 {
                r.table_bytes
            } else {
                r.memory_bytes
            };
            bytes / r.held.len() as u64
        })
        .max()
        .unwrap_or(0)
}

fn log_change(before: Option<&Placement>, after: &Placement) {
    let replicas = |p: &Placement| -> BTreeSet<(u32, String)> {
        p.assignment
            .iter()
            .enumerate()
            .flat_map(|(s, ns)| ns.iter().map(move |n| (s as u32, n.clone())))
            .collect()
    };
    let new = replicas(after);
    let old = before.map(replicas).unwrap_or_default();
    let added: Vec<String> = new
        .difference(&old)
        .map(|(s, n)| format!("{s}@{n}"))
        .collect();
    let removed: Vec<String> = old
        .difference(&new)
        .map(|(s, n)| format!("{s}@{n}"))
        .collect();
    tracing::info!(
        model = %after.model,
        epoch = after.epoch,
        replicas = after.replicas,
        added = %added.join(","),
        removed = %removed.join(","),
        "placement changed"
    );
}
