//! The node's presence in the cluster: a lease, `nodes/<id>` and `reports/<model>/<id>` under
//! it, kept alive every third of the lease's TTL.
//!
//! One *session* is one etcd connection. A session that breaks (etcd unreachable, restarted)
//! is followed by another that reuses the lease while it is still alive, so a short etcd outage
//! loses nothing; once the lease has expired (the cluster counted the node as lost) the next
//! session grants a new one and writes the record and the reports again. The data plane never
//! waits for any of this.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use hopps_cluster::keys::KeyKind;
use hopps_cluster::{ModelReport, NodeRecord, decode, encode};
use tokio::sync::oneshot;

use super::{NodeContext, etcd_error};

/// How often reports and the node record (memory figures) are compared with what etcd has.
const REFRESH_EVERY: Duration = Duration::from_secs(2);

/// Why a session ended.
enum End {
    /// etcd failed or could not be reached; retry with the same lease.
    Etcd(String),
    /// The lease expired: the cluster already counts this node as lost.
    LeaseLost,
    /// Another live node registered this id.
    Duplicate(String),
}

fn etcd(what: &str) -> impl FnOnce(etcd_client::Error) -> End + '_ {
    move |e| End::Etcd(format!("{what}: {e}"))
}

/// Keeps the node registered until shutdown, then revokes its lease (so the cluster stops
/// routing to it at once rather than after the TTL). Sends the outcome of the first
/// registration on `first`.
pub(crate) async fn run(ctx: Arc<NodeContext>, first: oneshot::Sender<Result<(), String>>) {
    let mut first = Some(first);
    let mut lease: Option<i64> = None;
    let mut backoff = Duration::from_millis(100);
    let stop = crate::signalled(ctx.shutdown.clone());
    tokio::pin!(stop);
    loop {
        let wait = tokio::select! {
            end = session(&ctx, &mut lease, &mut first, &mut backoff) => match end {
                Ok(()) => return,
                Err(End::Duplicate(message)) => {
                    if let Some(f) = first.take() {
                        let _ = f.send(Err(message));
                        return;
                    }
                    tracing::error!("{message}");
                    ctx.config.lease_ttl
                }
                Err(End::LeaseLost) => {
                    tracing::warn!(node = %ctx.agent.id(), "the node's lease expired (etcd unreachable for longer than the lease TTL?); registering again");
                    lease = None;
                    Duration::ZERO
                }
                Err(End::Etcd(message)) => {
                    etcd_error("cluster membership: etcd request failed; retrying", &message);
                    let wait = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    wait
                }
            },
            () = &mut stop => return,
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = &mut stop => return,
        }
    }
}

async fn session(
    ctx: &NodeContext,
    lease: &mut Option<i64>,
    first: &mut Option<oneshot::Sender<Result<(), String>>>,
    backoff: &mut Duration,
) -> Result<(), End> {
    let mut client = hopps_cluster::connect(&ctx.config.etcd)
        .await
        .map_err(|e| End::Etcd(e.to_string()))?;
    let ttl_seconds = ctx.config.lease_ttl.as_secs().max(2) as i64;
    let id = match *lease {
        Some(id) if alive(&mut client, id).await? => id,
        _ => {
            let granted = client
                .lease_grant(ttl_seconds, None)
                .await
                .map_err(etcd("granting the node's lease"))?;
            granted.id()
        }
    };
    *lease = Some(id);
    ctx.lease.send_if_modified(|l| {
        let changed = *l != Some(id);
        *l = Some(id);
        changed
    });
    let mut record = register(&mut client, ctx, id).await?;
    if let Some(f) = first.take() {
        let _ = f.send(Ok(()));
    }
    *backoff = Duration::from_millis(100);
    tracing::info!(node = %ctx.agent.id(), lease = id, grpc = %record.grpc_addr, "node registered");

    let mut published: BTreeMap<String, ModelReport> = BTreeMap::new();
    remove_stale_reports(&mut client, ctx).await?;
    publish_reports(&mut client, ctx, id, &mut published).await?;

    let (mut keeper, mut stream) = client
        .lease_keep_alive(id)
        .await
        .map_err(etcd("keeping the node's lease alive"))?;
    let mut keep = tokio::time::interval(ctx.config.lease_ttl / 3);
    keep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refresh = tokio::time::interval(REFRESH_EVERY);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut changes = ctx.engine.subscribe();
    let stop = crate::signalled(ctx.shutdown.clone());
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = keep.tick() => {
                keeper.keep_alive().await.map_err(etcd("keeping the node's lease alive"))?;
                match tokio::time::timeout(ctx.config.lease_ttl, stream.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                    Ok(Ok(Some(_))) => return Err(End::LeaseLost),
                    Ok(Ok(None)) => return Err(End::Etcd("the lease keepalive stream ended".into())),
                    Ok(Err(e)) => return Err(etcd("keeping the node's lease alive")(e)),
                    Err(_) => return Err(End::Etcd("no keepalive answer within the lease TTL".into())),
                }
            }
            changed = changes.changed() => {
                if changed.is_err() {
                    // The engine is gone; only shutdown is left to wait for.
                    changes = ctx.engine.subscribe();
                }
                publish_reports(&mut client, ctx, id, &mut published).await?;
            }
            _ = refresh.tick() => {
                publish_reports(&mut client, ctx, id, &mut published).await?;
                let now = node_record(ctx);
                if now != record {
                    put_leased(&mut client, &ctx.agent.keys.node(ctx.agent.id()), encode(&now), id, "refreshing the node record").await?;
                    record = now;
                }
            }
            () = &mut stop => {
                // Leaving: everything under the lease goes at once.
                let revoke = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(id)).await;
                if !matches!(revoke, Ok(Ok(_))) {
                    tracing::warn!(lease = id, "could not revoke the node's lease; the cluster drops the node when it expires");
                } else {
                    tracing::info!(node = %ctx.agent.id(), "left the cluster");
                }
                return Ok(());
            }
        }
    }
}

/// True when lease `id` still lives.
async fn alive(client: &mut Client, id: i64) -> Result<bool, End> {
    let r = client
        .lease_time_to_live(id, None)
        .await
        .map_err(etcd("reading the node's lease"))?;
    Ok(r.ttl() > 0)
}

/// This node's record as of now.
fn node_record(ctx: &NodeContext) -> NodeRecord {
    let status = ctx.engine.status();
    NodeRecord {
        id: ctx.agent.id().to_string(),
        grpc_addr: ctx.grpc_addr.clone(),
        admin_addr: ctx.admin_addr.clone(),
        memory_limit_bytes: status.memory_limit.unwrap_or(0),
        memory_used_bytes: status.memory_used,
        healthy: true,
        started_unix: ctx.started_unix,
        build: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// Writes `nodes/<id>` under `lease`. The key may already be there under another lease: a
/// previous run of this node whose lease is still counting down (wait for it to expire), or a
/// live node with the same id (refuse, once a lease's full TTL has passed without it expiring).
async fn register(client: &mut Client, ctx: &NodeContext, lease: i64) -> Result<NodeRecord, End> {
    let key = ctx.agent.keys.node(ctx.agent.id());
    let record = node_record(ctx);
    let mut deadline: Option<Instant> = None;
    loop {
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                encode(&record),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = client
            .txn(txn)
            .await
            .map_err(etcd("registering the node"))?;
        if resp.succeeded() {
            return Ok(record);
        }
        let existing = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        });
        let Some(kv) = existing else {
            continue; // deleted between the compare and the get: try again
        };
        let holder = kv.lease();
        if holder == lease || holder == 0 {
            // Ours already (a session after an etcd hiccup), or written by hand without a
            // lease: take it over.
            put_leased(client, &key, encode(&record), lease, "registering the node").await?;
            return Ok(record);
        }
        let deadline = match deadline {
            Some(d) => d,
            None => {
                let granted = client
                    .lease_time_to_live(holder, None)
                    .await
                    .map(|r| r.granted_ttl().max(0) as u64)
                    .unwrap_or(0);
                let d = Instant::now()
                    + Duration::from_secs(granted.max(ctx.config.lease_ttl.as_secs()))
                    + Duration::from_secs(1);
                tracing::info!(node = %ctx.agent.id(), "the node id is registered under another lease; waiting for it to expire (a previous run of this node?)");
                deadline = Some(d);
                d
            }
        };
        // Our own lease must outlive the wait (the session's keepalive starts only after
        // registering).
        if let Ok((_keeper, mut stream)) = client.lease_keep_alive(lease).await {
            // Opening the stream sends one keepalive; its answer says it arrived.
            let _ = stream.message().await;
        }
        if Instant::now() > deadline {
            let other = decode::<NodeRecord>(&key, kv.value())
                .map(|r| r.grpc_addr)
                .unwrap_or_else(|_| "an unknown address".into());
            return Err(End::Duplicate(format!(
                "node id {} is already registered in cluster {} by a live node at {other}; give \
                 each node its own --node-id",
                ctx.agent.id(),
                ctx.agent.cluster()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn put_leased(
    client: &mut Client,
    key: &str,
    value: Vec<u8>,
    lease: i64,
    what: &str,
) -> Result<(), End> {
    client
        .put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await
        .map_err(etcd(what))?;
    Ok(())
}

/// The engine's reports as cluster records.
fn reports(ctx: &NodeContext) -> BTreeMap<String, ModelReport> {
    ctx.engine
        .cluster_report()
        .into_iter()
        .map(|r| {
            (
                r.model.clone(),
                ModelReport {
                    node: ctx.agent.id().to_string(),
                    model: r.model,
                    shards: r.shards,
                    held: r.held,
                    loading: r.loading,
                    serving: r.serving,
                    readable: r.readable,
                    staged: r.staged,
                    state: r.state,
                    error: r.error,
                    memory_bytes: r.memory_bytes,
                    table_bytes: r.table_bytes,
                    rows: r.rows,
                },
            )
        })
        .collect()
}

/// Writes the reports that changed since `published` and deletes those of models the engine no
/// longer has.
async fn publish_reports(
    client: &mut Client,
    ctx: &NodeContext,
    lease: i64,
    published: &mut BTreeMap<String, ModelReport>,
) -> Result<(), End> {
    let now = reports(ctx);
    for (model, report) in &now {
        if published.get(model) != Some(report) {
            let key = ctx.agent.keys.report(model, ctx.agent.id());
            put_leased(
                client,
                &key,
                encode(report),
                lease,
                "publishing a readiness report",
            )
            .await?;
            published.insert(model.clone(), report.clone());
        }
    }
    let gone: Vec<String> = published
        .keys()
        .filter(|m| !now.contains_key(*m))
        .cloned()
        .collect();
    for model in gone {
        client
            .delete(ctx.agent.keys.report(&model, ctx.agent.id()), None)
            .await
            .map_err(etcd("deleting a readiness report"))?;
        published.remove(&model);
    }
    Ok(())
}

/// Deletes reports of this node left from an earlier lease about models it no longer has.
async fn remove_stale_reports(client: &mut Client, ctx: &NodeContext) -> Result<(), End> {
    let keys = &ctx.agent.keys;
    let resp = client
        .get(
            keys.reports(),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .map_err(etcd("reading readiness reports"))?;
    let have = reports(ctx);
    for kv in resp.kvs() {
        let Ok(k) = kv.key_str() else { continue };
        if let KeyKind::Report { model, node } = keys.kind(k)
            && node == ctx.agent.id()
            && !have.contains_key(&model)
        {
            client
                .delete(k, None)
                .await
                .map_err(etcd("deleting a stale readiness report"))?;
        }
    }
    Ok(())
}
