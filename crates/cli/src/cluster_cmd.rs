//! Commands about a cluster as a whole: `hopps node list|drain|undrain`, `hopps model replicas`,
//! and the cluster forms of `hopps status|lookup|model rollback` (`--etcd E --cluster C` in place
//! of `--addr`).
//!
//! Writes go straight to etcd through hopps-cluster (the records and keys every node reads);
//! reads go through a [`Mirror`] (or the [`ClusterClient`], which keeps one), so what these
//! commands show is what nodes and clients route by.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hopps_client::{ClusterClient, NodeStatus};
use hopps_cluster::{ClusterState, Drain, Keys, Mirror, ModelSettings};
use hopps_server::config::parse_duration;
use serde::Serialize;

use crate::server_cmd::{human_bytes, opt, print_table};

/// Time allowed for the first read of the cluster from etcd.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a client command sends its requests: one node (`--addr`) or a cluster (`--etcd` and
/// `--cluster`). Neither given means the default node address.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// Server address (host:port). Default: 127.0.0.1:7070.
    #[arg(long, env = "HOPPS_ADDR", conflicts_with = "etcd")]
    pub addr: Option<String>,
    /// etcd endpoints of a cluster (host:port[,host:port]), in place of --addr; needs --cluster.
    #[arg(long, value_name = "ENDPOINTS", requires = "cluster")]
    pub etcd: Option<String>,
    /// Name of the cluster (with --etcd).
    #[arg(long, value_name = "NAME", requires = "etcd")]
    pub cluster: Option<String>,
}

/// A resolved [`Target`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Node(String),
    Cluster { etcd: String, cluster: String },
}

impl Target {
    pub fn endpoint(&self, default_addr: &str) -> Endpoint {
        match (&self.addr, &self.etcd, &self.cluster) {
            (_, Some(etcd), Some(cluster)) => Endpoint::Cluster {
                etcd: etcd.clone(),
                cluster: cluster.clone(),
            },
            (Some(addr), _, _) => Endpoint::Node(addr.clone()),
            // clap rejects --etcd without --cluster and the reverse.
            _ => Endpoint::Node(default_addr.to_string()),
        }
    }
}

/// `--etcd` and `--cluster` of the commands that only make sense for a cluster.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterFlags {
    /// etcd endpoints of the cluster (host:port[,host:port]).
    #[arg(long, env = "HOPPS_ETCD_ENDPOINTS", value_name = "ENDPOINTS")]
    pub etcd: String,
    /// Name of the cluster.
    #[arg(long, env = "HOPPS_CLUSTER", value_name = "NAME")]
    pub cluster: String,
}

impl ClusterFlags {
    fn endpoints(&self) -> Result<Vec<String>> {
        hopps_cluster::check_cluster_name(&self.cluster)?;
        Ok(hopps_cluster::parse_endpoints(&self.etcd)?)
    }

    /// A mirror of the cluster after its first full read.
    async fn mirror(&self) -> Result<(Mirror, std::sync::Arc<ClusterState>)> {
        let mirror = Mirror::start(self.endpoints()?, &self.cluster);
        let state = mirror.synced(SYNC_TIMEOUT).await?;
        Ok((mirror, state))
    }

    async fn etcd(&self) -> Result<etcd_client::Client> {
        Ok(hopps_cluster::connect(&self.endpoints()?).await?)
    }
}

/// Connects a cluster client, naming the cluster and etcd on failure.
pub async fn connect(etcd: &str, cluster: &str) -> Result<ClusterClient> {
    hopps_cluster::check_cluster_name(cluster)?;
    ClusterClient::connect(etcd, cluster)
        .await
        .with_context(|| format!("cannot read cluster {cluster:?} from etcd at {etcd}"))
}

// ---------------------------------------------------------------------------------------------
// Views: what the commands print, computed from a cluster state (pure, so tested without etcd).

/// One model as one node sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeModelView {
    pub model: String,
    /// Shards the placement lists the node on.
    pub placed: Vec<u32>,
    /// Shards the node reports held.
    pub held: Vec<u32>,
    /// Shards the node reports loading.
    pub loading: Vec<u32>,
    /// The node's default version of the model.
    pub serving: Option<u64>,
    /// A version staged, waiting for the cluster's switch.
    pub staged: Option<u64>,
    /// The node's report state ("loading", "serving", "failed"), empty before it reported.
    pub state: String,
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeView {
    pub id: String,
    pub grpc_addr: String,
    pub admin_addr: String,
    /// Registered under a live lease. A node that is only named by a placement is not alive.
    pub alive: bool,
    /// Runs the placement controller; `None` when the leader could not be read.
    pub leader: Option<bool>,
    pub healthy: bool,
    pub draining: bool,
    /// The controller released the drained node: it can be stopped.
    pub released: bool,
    pub memory_used_bytes: u64,
    /// 0: no limit.
    pub memory_limit_bytes: u64,
    pub build: String,
    pub models: Vec<NodeModelView>,
}

/// Every node the cluster knows of: registered ones, and those a placement or a drain still
/// names (shown as not alive).
pub fn node_views(state: &ClusterState, leader: Option<&str>) -> Vec<NodeView> {
    let mut ids: BTreeSet<&str> = state.nodes.keys().map(String::as_str).collect();
    for p in state.placements.values() {
        ids.extend(p.assignment.iter().flatten().map(String::as_str));
    }
    ids.extend(state.drains.keys().map(String::as_str));
    let models = model_names(state);
    ids.into_iter()
        .map(|id| {
            let record = state.nodes.get(id);
            let drain = state.drains.get(id);
            let models = models
                .iter()
                .filter_map(|m| {
                    let placed = state
                        .placements
                        .get(m)
                        .map(|p| p.shards_of(id))
                        .unwrap_or_default();
                    let report = state.report(m, id);
                    if placed.is_empty() && report.is_none() {
                        return None;
                    }
                    Some(NodeModelView {
                        model: m.clone(),
                        placed,
                        held: report.map(|r| r.held.clone()).unwrap_or_default(),
                        loading: report.map(|r| r.loading.clone()).unwrap_or_default(),
                        serving: report.and_then(|r| r.serving),
                        staged: report.and_then(|r| r.staged),
                        state: report.map(|r| r.state.clone()).unwrap_or_default(),
                    })
                })
                .collect();
            NodeView {
                id: id.to_string(),
                grpc_addr: record.map(|r| r.grpc_addr.clone()).unwrap_or_default(),
                admin_addr: record.map(|r| r.admin_addr.clone()).unwrap_or_default(),
                alive: record.is_some(),
                leader: leader.map(|l| l == id),
                healthy: record.is_some_and(|r| r.healthy),
                draining: drain.is_some(),
                released: drain.is_some_and(|d| d.released),
                memory_used_bytes: record.map_or(0, |r| r.memory_used_bytes),
                memory_limit_bytes: record.map_or(0, |r| r.memory_limit_bytes),
                build: record.map(|r| r.build.clone()).unwrap_or_default(),
                models,
            }
        })
        .collect()
}

/// Models named by any placement, serving record or report.
fn model_names(state: &ClusterState) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = state.placements.keys().cloned().collect();
    names.extend(state.serving.keys().cloned());
    names.extend(state.reports.keys().cloned());
    names
}

/// One replica of one shard.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaView {
    pub node: String,
    /// "held" (reported held), "loading", "placed" (not reported yet) or "lost" (the node's
    /// lease is gone).
    pub state: String,
    /// A lookup pinned to the serving version may go there now.
    pub routable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardView {
    pub shard: u32,
    pub replicas: Vec<ReplicaView>,
}

/// What one node reports about one model, with its load progress when the node answered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelNodeView {
    pub node: String,
    pub alive: bool,
    pub state: String,
    pub serving: Option<u64>,
    pub staged: Option<u64>,
    pub readable: Vec<u64>,
    pub held: Vec<u32>,
    pub loading: Vec<u32>,
    pub rows: u64,
    pub memory_bytes: u64,
    /// From the node's Status RPC: the version being loaded and how far it got.
    pub load: Option<hopps_client::LoadProgress>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelView {
    pub model: String,
    /// Shard count (0 before the controller placed the model).
    pub shards: u32,
    pub replicas: u32,
    pub epoch: u64,
    /// The version the cluster serves (clients pin it); `None` before the first switch.
    pub serving_version: Option<u64>,
    pub previous_version: Option<u64>,
    /// RFC 3339 time of the last switch.
    pub switched: Option<String>,
    pub placement: Vec<ShardView>,
    pub nodes: Vec<ModelNodeView>,
}

/// Every model of the cluster. `statuses` are the nodes' own Status answers (for load progress).
pub fn model_views(
    state: &ClusterState,
    statuses: &BTreeMap<String, NodeStatus>,
) -> Vec<ModelView> {
    model_names(state)
        .into_iter()
        .map(|m| {
            let placement = state.placements.get(&m);
            let serving = state.serving.get(&m);
            let pinned = serving.map(|s| s.version);
            let shards = placement
                .map(|p| {
                    p.assignment
                        .iter()
                        .enumerate()
                        .map(|(s, nodes)| {
                            let s = s as u32;
                            ShardView {
                                shard: s,
                                replicas: nodes
                                    .iter()
                                    .map(|n| {
                                        let report = state.report(&m, n);
                                        let held = report.is_some_and(|r| r.serves(s, None));
                                        let st = if !state.nodes.contains_key(n) {
                                            "lost"
                                        } else if held {
                                            "held"
                                        } else if report.is_some_and(|r| r.loading.contains(&s)) {
                                            "loading"
                                        } else {
                                            "placed"
                                        };
                                        ReplicaView {
                                            node: n.clone(),
                                            state: st.to_string(),
                                            routable: report.is_some_and(|r| r.serves(s, pinned)),
                                        }
                                    })
                                    .collect(),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut node_ids: BTreeSet<&str> = placement
                .map(|p| p.assignment.iter().flatten().map(String::as_str).collect())
                .unwrap_or_default();
            if let Some(reports) = state.reports.get(&m) {
                node_ids.extend(reports.keys().map(String::as_str));
            }
            let nodes = node_ids
                .into_iter()
                .map(|n| {
                    let report = state.report(&m, n);
                    let status = statuses
                        .get(n)
                        .and_then(|s| s.models.iter().find(|ms| ms.name == m));
                    ModelNodeView {
                        node: n.to_string(),
                        alive: state.nodes.contains_key(n),
                        state: report.map(|r| r.state.clone()).unwrap_or_default(),
                        serving: report.and_then(|r| r.serving),
                        staged: report.and_then(|r| r.staged),
                        readable: report.map(|r| r.readable.clone()).unwrap_or_default(),
                        held: report.map(|r| r.held.clone()).unwrap_or_default(),
                        loading: report.map(|r| r.loading.clone()).unwrap_or_default(),
                        rows: report.map_or(0, |r| r.rows),
                        memory_bytes: report.map_or(0, |r| r.memory_bytes),
                        load: status.and_then(|s| s.load.clone()),
                        error: report
                            .and_then(|r| r.error.clone())
                            .or_else(|| status.and_then(|s| s.last_error.clone())),
                    }
                })
                .collect();
            ModelView {
                shards: placement.map_or(0, |p| p.shards),
                replicas: placement.map_or(0, |p| p.replicas),
                epoch: placement.map_or(0, |p| p.epoch),
                serving_version: pinned,
                previous_version: serving.and_then(|s| s.previous),
                switched: serving.map(|s| s.time.clone()).filter(|t| !t.is_empty()),
                placement: shards,
                nodes,
                model: m,
            }
        })
        .collect()
}

/// Shards still placed on `node`, per model (the progress of a drain).
fn placed_on(state: &ClusterState, node: &str) -> BTreeMap<String, Vec<u32>> {
    state
        .placements
        .iter()
        .map(|(m, p)| (m.clone(), p.shards_of(node)))
        .filter(|(_, shards)| !shards.is_empty())
        .collect()
}

fn describe_placed(placed: &BTreeMap<String, Vec<u32>>) -> String {
    if placed.is_empty() {
        return "no shard".to_string();
    }
    placed
        .iter()
        .map(|(m, s)| format!("{m}: {}", shard_list(s)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `0,1,5` (or `-` for none).
fn shard_list(shards: &[u32]) -> String {
    if shards.is_empty() {
        return "-".to_string();
    }
    shards
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn memory(used: u64, limit: u64) -> String {
    if limit == 0 {
        format!("{} / no limit", human_bytes(used))
    } else {
        format!("{} / {}", human_bytes(used), human_bytes(limit))
    }
}

fn yes_no(v: bool) -> String {
    if v { "yes" } else { "no" }.to_string()
}

/// The node id the controller's election names, if etcd says. The election value is the
/// campaigning node's id.
async fn leader(flags_etcd: &[String], cluster: &str) -> Option<String> {
    let mut client = hopps_cluster::connect(flags_etcd).await.ok()?;
    let resp = client.leader(Keys::new(cluster).election()).await.ok()?;
    let kv = resp.kv()?;
    kv.value_str().ok().map(str::to_string)
}

fn print_nodes(nodes: &[NodeView], ready: &BTreeMap<String, Result<bool, String>>) {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let drain = match (n.draining, n.released) {
                (true, true) => "released",
                (true, false) => "draining",
                _ => "-",
            };
            let models = n
                .models
                .iter()
                .map(|m| {
                    format!(
                        "{} placed {} held {} v{}",
                        m.model,
                        shard_list(&m.placed),
                        shard_list(&m.held),
                        opt(m.serving)
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            let mut row = vec![
                n.id.clone(),
                if n.grpc_addr.is_empty() {
                    "-".to_string()
                } else {
                    n.grpc_addr.clone()
                },
                yes_no(n.alive),
                n.leader.map_or_else(|| "?".to_string(), yes_no),
                drain.to_string(),
            ];
            if !ready.is_empty() {
                row.push(match ready.get(&n.id) {
                    Some(Ok(r)) => yes_no(*r),
                    Some(Err(_)) => "unreachable".to_string(),
                    None => "-".to_string(),
                });
            }
            row.push(if n.alive {
                memory(n.memory_used_bytes, n.memory_limit_bytes)
            } else {
                "-".to_string()
            });
            row.push(models);
            row
        })
        .collect();
    let mut header = vec!["NODE", "ADDRESS", "ALIVE", "LEADER", "DRAIN"];
    if !ready.is_empty() {
        header.push("READY");
    }
    header.extend(["MEMORY", "MODELS (shards placed / held, serving version)"]);
    print_table(&header, &rows);
}

// ---------------------------------------------------------------------------------------------
// hopps node list

/// `hopps node list`.
#[derive(Debug, clap::Args)]
pub struct NodeListArgs {
    #[command(flatten)]
    cluster: ClusterFlags,
    /// Print JSON: a list of nodes.
    #[arg(long)]
    json: bool,
}

pub async fn node_list(args: NodeListArgs) -> Result<()> {
    let (_mirror, state) = args.cluster.mirror().await?;
    let leader = leader(&args.cluster.endpoints()?, &args.cluster.cluster).await;
    let nodes = node_views(&state, leader.as_deref());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
    } else if nodes.is_empty() {
        println!(
            "cluster {} has no nodes; start some with `hopps serve --etcd {} --cluster {}`",
            args.cluster.cluster, args.cluster.etcd, args.cluster.cluster
        );
    } else {
        print_nodes(&nodes, &BTreeMap::new());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// hopps node drain / undrain

/// `hopps node drain ID`.
#[derive(Debug, clap::Args)]
pub struct NodeDrainArgs {
    /// The node to empty (its --node-id).
    id: String,
    #[command(flatten)]
    cluster: ClusterFlags,
    /// Return once the request is recorded, without waiting for the node's release.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for the release (e.g. 5m, 30s).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    timeout: Duration,
    /// Print the outcome as JSON (progress goes to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct DrainOutcome<'a> {
    node: &'a str,
    cluster: &'a str,
    requested: String,
    released: bool,
    /// Seconds this command waited.
    seconds: f64,
    /// Shards still placed on the node.
    placed: BTreeMap<String, Vec<u32>>,
}

pub async fn node_drain(args: NodeDrainArgs) -> Result<()> {
    let flags = &args.cluster;
    let id = args.id.as_str();
    let (mirror, state) = flags.mirror().await?;
    let known: BTreeSet<&str> = state
        .nodes
        .keys()
        .chain(
            state
                .placements
                .values()
                .flat_map(|p| p.assignment.iter().flatten()),
        )
        .map(String::as_str)
        .collect();
    if !known.contains(id) {
        let list = if known.is_empty() {
            "it has no nodes".to_string()
        } else {
            format!(
                "its nodes are {}",
                known.iter().copied().collect::<Vec<_>>().join(", ")
            )
        };
        bail!(
            "node {id:?} is not a node of cluster {} ({list}); check the id with `hopps node list`",
            flags.cluster
        );
    }
    let keys = Keys::new(&flags.cluster);
    let key = keys.drain(id);
    let record = Drain {
        node: id.to_string(),
        requested: hopps_format::spec::now_rfc3339(),
        released: false,
    };
    let mut etcd = flags.etcd().await?;
    // Only if absent: a drain in progress keeps its request time, and a release the controller
    // already recorded is not undone.
    let txn = etcd_client::Txn::new()
        .when([etcd_client::Compare::version(
            key.clone(),
            etcd_client::CompareOp::Equal,
            0,
        )])
        .and_then([etcd_client::TxnOp::put(
            key.clone(),
            hopps_cluster::encode(&record),
            None,
        )]);
    let created = etcd
        .txn(txn)
        .await
        .with_context(|| format!("cannot write {key} to etcd at {}", flags.etcd))?
        .succeeded();
    let requested = if created {
        record.requested.clone()
    } else {
        let current = mirror
            .state()
            .drains
            .get(id)
            .map(|d| d.requested.clone())
            .unwrap_or_default();
        eprintln!(
            "node {id} already has a drain request (since {current}){}",
            if args.no_wait {
                ""
            } else {
                "; waiting for its release"
            }
        );
        current
    };
    let start = Instant::now();
    let outcome = |released: bool, placed| DrainOutcome {
        node: id,
        cluster: &flags.cluster,
        requested: requested.clone(),
        released,
        seconds: start.elapsed().as_secs_f64(),
        placed,
    };
    if args.no_wait {
        let state = mirror.state();
        let placed = placed_on(&state, id);
        let released = state.drains.get(id).is_some_and(|d| d.released);
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&outcome(released, placed))?
            );
        } else {
            println!(
                "node {id}: drain requested; the controller moves its replicas ({}) and then \
                 releases it; follow with `hopps node list`",
                describe_placed(&placed)
            );
        }
        return Ok(());
    }
    let deadline = start + args.timeout;
    let mut rx = mirror.subscribe();
    let mut next_report = start;
    loop {
        let state = rx.borrow_and_update().clone();
        let placed = placed_on(&state, id);
        if state.drains.get(id).is_some_and(|d| d.released) {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&outcome(true, placed))?);
            } else {
                println!(
                    "node {id} released after {:.1} s: no shard is placed on it; it can be stopped",
                    start.elapsed().as_secs_f64()
                );
            }
            return Ok(());
        }
        if !state.drains.contains_key(id) && state.synced {
            bail!(
                "the drain request of node {id} was removed (by `hopps node undrain {id}`?) \
                 before the node was released"
            );
        }
        let now = Instant::now();
        if now >= deadline {
            bail!(
                "node {id} was not released within {:?}: still placed there: {}; the controller \
                 moves shards once other nodes have room and report them held (see `hopps status \
                 --etcd {} --cluster {}`); run the command again to keep waiting, or `hopps node \
                 undrain {id}` to cancel",
                args.timeout,
                describe_placed(&placed),
                flags.etcd,
                flags.cluster
            );
        }
        if now >= next_report {
            let line = format!(
                "node {id}: draining, {:.0} s, still placed: {}{}",
                start.elapsed().as_secs_f64(),
                describe_placed(&placed),
                if state.connected {
                    ""
                } else {
                    " (etcd unreachable; retrying)"
                }
            );
            if args.json {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
            next_report = now + Duration::from_secs(1);
        }
        let wait = next_report
            .min(deadline)
            .saturating_duration_since(Instant::now());
        // A change of the cluster or the next progress line, whichever comes first.
        let _ = tokio::time::timeout(wait, rx.changed()).await;
    }
}

/// `hopps node undrain ID`.
#[derive(Debug, clap::Args)]
pub struct NodeUndrainArgs {
    /// The node to take back into placement.
    id: String,
    #[command(flatten)]
    cluster: ClusterFlags,
}

pub async fn node_undrain(args: NodeUndrainArgs) -> Result<()> {
    let flags = &args.cluster;
    let key = Keys::new(&flags.cluster).drain(&args.id);
    let mut etcd = flags.etcd().await?;
    let deleted = etcd
        .delete(key.clone(), None)
        .await
        .with_context(|| format!("cannot delete {key} in etcd at {}", flags.etcd))?
        .deleted();
    if deleted == 0 {
        println!(
            "node {} had no drain request in cluster {}; nothing to do",
            args.id, flags.cluster
        );
    } else {
        println!(
            "node {}: drain request removed; the controller may place shards on it again",
            args.id
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// hopps model replicas

/// `hopps model replicas`.
#[derive(Debug, clap::Args)]
pub struct ReplicasArgs {
    #[command(flatten)]
    cluster: ClusterFlags,
    /// Model name.
    #[arg(long)]
    model: String,
    /// Replicas per shard (at least 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    replicas: u32,
}

pub async fn model_replicas(args: ReplicasArgs) -> Result<()> {
    let flags = &args.cluster;
    hopps_format::spec::validate_name("model", &args.model)?;
    let (_mirror, state) = flags.mirror().await?;
    let before = state.settings.get(&args.model).map(|s| s.replicas);
    let key = Keys::new(&flags.cluster).settings(&args.model);
    let mut etcd = flags.etcd().await?;
    etcd.put(
        key.clone(),
        hopps_cluster::encode(&ModelSettings {
            replicas: args.replicas,
        }),
        None,
    )
    .await
    .with_context(|| format!("cannot write {key} to etcd at {}", flags.etcd))?;
    let alive = state.nodes.len();
    println!(
        "model {}: {} replicas per shard in cluster {} (was {})",
        args.model,
        args.replicas,
        flags.cluster,
        before.map_or_else(|| "the cluster's default".to_string(), |r| r.to_string())
    );
    if !state.placements.contains_key(&args.model) {
        println!(
            "note: model {} is not placed yet; the setting applies once it is published and placed",
            args.model
        );
    }
    if (args.replicas as usize) > alive {
        println!(
            "note: the cluster has {alive} live nodes; each shard gets at most that many replicas \
             until more nodes join"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// hopps status --etcd --cluster

#[derive(Debug, Serialize)]
struct StatusNode {
    #[serde(flatten)]
    node: NodeView,
    /// The node answered its Status RPC and says every placed shard is loaded.
    ready: Option<bool>,
    /// Why the Status RPC failed.
    status_error: Option<String>,
    uptime_seconds: Option<f64>,
}

#[derive(Debug, Serialize)]
struct ClusterStatusView {
    cluster: String,
    /// etcd answered (false: the state shown is the last one read).
    connected: bool,
    revision: i64,
    leader: Option<String>,
    nodes: Vec<StatusNode>,
    models: Vec<ModelView>,
}

pub async fn cluster_status(etcd: &str, cluster: &str, json: bool) -> Result<()> {
    let client = connect(etcd, cluster).await?;
    let status = client.status().await?;
    let endpoints = hopps_cluster::parse_endpoints(etcd)?;
    let leader = leader(&endpoints, cluster).await;
    let statuses: BTreeMap<String, NodeStatus> = status
        .nodes
        .iter()
        .filter_map(|(id, s)| s.as_ref().ok().map(|s| (id.clone(), s.clone())))
        .collect();
    let ready: BTreeMap<String, Result<bool, String>> = status
        .nodes
        .iter()
        .map(|(id, s)| {
            (
                id.clone(),
                s.as_ref().map(|s| s.ready).map_err(Clone::clone),
            )
        })
        .collect();
    let state = &status.state;
    let view = ClusterStatusView {
        cluster: cluster.to_string(),
        connected: state.connected,
        revision: state.revision,
        leader: leader.clone(),
        nodes: node_views(state, leader.as_deref())
            .into_iter()
            .map(|node| StatusNode {
                ready: statuses.get(&node.id).map(|s| s.ready),
                status_error: ready.get(&node.id).and_then(|r| r.clone().err()),
                uptime_seconds: statuses.get(&node.id).map(|s| s.uptime_seconds),
                node,
            })
            .collect(),
        models: model_views(state, &statuses),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    println!(
        "cluster {}  etcd {}  revision {}  leader {}  {} nodes alive",
        view.cluster,
        if view.connected {
            "connected"
        } else {
            "UNREACHABLE (last state shown)"
        },
        view.revision,
        view.leader.as_deref().unwrap_or("unknown"),
        state.nodes.len()
    );
    println!();
    let nodes: Vec<NodeView> = view.nodes.iter().map(|n| n.node.clone()).collect();
    print_nodes(&nodes, &ready);
    for (id, err) in ready
        .iter()
        .filter_map(|(id, r)| r.as_ref().err().map(|e| (id, e)))
    {
        println!("node {id}: status unavailable: {err}");
    }
    for m in &view.models {
        println!();
        println!(
            "model {}  serving {}{}  shards {}  replicas {}  epoch {}",
            m.model,
            m.serving_version
                .map_or_else(|| "none yet".to_string(), |v| format!("v{v}")),
            match (&m.previous_version, &m.switched) {
                (Some(p), Some(t)) => format!(" (from v{p} at {t})"),
                (None, Some(t)) => format!(" (since {t})"),
                _ => String::new(),
            },
            m.shards,
            m.replicas,
            m.epoch
        );
        let shards: Vec<Vec<String>> = m
            .placement
            .iter()
            .map(|s| {
                vec![
                    s.shard.to_string(),
                    s.replicas
                        .iter()
                        .map(|r| {
                            format!(
                                "{} ({}{})",
                                r.node,
                                r.state,
                                if r.routable { ", routed" } else { "" }
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("  "),
                ]
            })
            .collect();
        if shards.is_empty() {
            println!("not placed yet");
        } else {
            print_table(&["SHARD", "REPLICAS"], &shards);
        }
        let rows: Vec<Vec<String>> = m
            .nodes
            .iter()
            .map(|n| {
                let load = n.load.as_ref().map_or_else(String::new, |l| {
                    let pct = if l.rows_total == 0 {
                        0.0
                    } else {
                        100.0 * l.rows_done as f64 / l.rows_total as f64
                    };
                    format!("v{} {pct:.0}% ETA {:.0}s", l.version, l.eta_seconds)
                });
                vec![
                    n.node.clone(),
                    if n.alive {
                        n.state.clone()
                    } else {
                        "lost".to_string()
                    },
                    opt(n.serving),
                    opt(n.staged),
                    n.readable
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    shard_list(&n.held),
                    shard_list(&n.loading),
                    n.rows.to_string(),
                    human_bytes(n.memory_bytes),
                    load,
                    n.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        println!();
        print_table(
            &[
                "NODE",
                "STATE",
                "SERVING",
                "STAGED",
                "READABLE",
                "HELD",
                "LOADING",
                "ROWS",
                "MEMORY",
                "LOADING-VERSION",
                "ERROR",
            ],
            &rows,
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// hopps model rollback --etcd --cluster

pub async fn cluster_rollback(
    etcd: &str,
    cluster: &str,
    model: &str,
    to: u64,
    timeout: Duration,
    json: bool,
) -> Result<()> {
    let client = connect(etcd, cluster).await?;
    let report = client.rollback(model, to, timeout).await.with_context(|| {
        format!("rollback of model {model:?} to version {to} in cluster {cluster:?}")
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "model {} rolled back from version {} to {} ({}, {:.3} s); cluster {} now serves \
             version {}",
            report.model, report.from, report.to, report.method, report.seconds, cluster, report.to
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hopps_cluster::{ModelReport, NodeRecord, Placement, Serving};

    fn node(id: &str) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            grpc_addr: format!("{id}:7070"),
            admin_addr: String::new(),
            memory_limit_bytes: 0,
            memory_used_bytes: 10,
            healthy: true,
            started_unix: 0.0,
            build: "0.1.0".into(),
        }
    }

    fn report(node: &str, held: Vec<u32>, loading: Vec<u32>, readable: Vec<u64>) -> ModelReport {
        ModelReport {
            node: node.into(),
            model: "ctr".into(),
            shards: 2,
            held,
            loading,
            serving: readable.last().copied(),
            readable,
            staged: None,
            state: "serving".into(),
            error: None,
            memory_bytes: 0,
            table_bytes: 0,
            rows: 0,
        }
    }

    /// a and b alive, c placed but lost; a drains; b loads shard 1.
    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        s.nodes.insert("a".into(), node("a"));
        s.nodes.insert("b".into(), node("b"));
        s.placements.insert(
            "ctr".into(),
            Placement {
                model: "ctr".into(),
                shards: 2,
                replicas: 2,
                epoch: 4,
                assignment: vec![vec!["a".into(), "b".into()], vec!["c".into(), "b".into()]],
            },
        );
        let mut reports = BTreeMap::new();
        reports.insert("a".to_string(), report("a", vec![0], vec![], vec![3]));
        reports.insert("b".to_string(), report("b", vec![0], vec![1], vec![2]));
        s.reports.insert("ctr".into(), reports);
        s.serving.insert(
            "ctr".into(),
            Serving {
                model: "ctr".into(),
                version: 3,
                previous: Some(2),
                time: "t".into(),
            },
        );
        s.drains.insert(
            "a".into(),
            Drain {
                node: "a".into(),
                requested: "t".into(),
                released: false,
            },
        );
        s
    }

    #[test]
    fn nodes_include_lost_ones_a_placement_still_names() {
        let views = node_views(&state(), Some("b"));
        let ids: Vec<&str> = views.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        let (a, b, c) = (&views[0], &views[1], &views[2]);
        assert!(a.alive && a.draining && !a.released);
        assert_eq!(a.leader, Some(false));
        assert_eq!(b.leader, Some(true));
        assert!(!c.alive && c.grpc_addr.is_empty());
        assert_eq!(b.models[0].placed, [0, 1]);
        assert_eq!(b.models[0].held, [0]);
        assert_eq!(b.models[0].loading, [1]);
        assert_eq!(c.models[0].placed, [1]);
        assert!(c.models[0].held.is_empty());
        assert_eq!(node_views(&state(), None)[0].leader, None);
    }

    #[test]
    fn replicas_show_held_loading_lost_and_routing_at_the_serving_version() {
        let views = model_views(&state(), &BTreeMap::new());
        assert_eq!(views.len(), 1);
        let m = &views[0];
        assert_eq!((m.serving_version, m.previous_version), (Some(3), Some(2)));
        assert_eq!((m.shards, m.replicas, m.epoch), (2, 2, 4));
        let s0 = &m.placement[0].replicas;
        // b holds shard 0 but cannot read version 3: not routed.
        assert_eq!(
            s0.iter()
                .map(|r| (r.node.as_str(), r.state.as_str(), r.routable))
                .collect::<Vec<_>>(),
            [("a", "held", true), ("b", "held", false)]
        );
        let s1 = &m.placement[1].replicas;
        assert_eq!(
            s1.iter()
                .map(|r| (r.node.as_str(), r.state.as_str()))
                .collect::<Vec<_>>(),
            [("c", "lost"), ("b", "loading")]
        );
        let lost = m.nodes.iter().find(|n| n.node == "c").expect("c listed");
        assert!(!lost.alive);
    }

    #[test]
    fn drain_progress_names_the_shards_left() {
        let s = state();
        let placed = placed_on(&s, "b");
        assert_eq!(describe_placed(&placed), "ctr: 0,1");
        assert_eq!(describe_placed(&placed_on(&s, "zz")), "no shard");
    }

    #[test]
    fn the_target_resolves_to_a_node_or_a_cluster() {
        let t = Target {
            addr: None,
            etcd: None,
            cluster: None,
        };
        assert_eq!(t.endpoint("h:1"), Endpoint::Node("h:1".into()));
        let t = Target {
            addr: None,
            etcd: Some("e:2379".into()),
            cluster: Some("prod".into()),
        };
        assert_eq!(
            t.endpoint("h:1"),
            Endpoint::Cluster {
                etcd: "e:2379".into(),
                cluster: "prod".into()
            }
        );
    }
}
