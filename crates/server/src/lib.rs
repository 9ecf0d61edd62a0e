//! hopps-server: one hopps node on the network.
//!
//! - gRPC `hopps.v1` (`Hopps`: lookups and online writes; `Admin`: models, versions, status,
//!   rollback, history, checkpoint) plus standard gRPC health checking;
//! - admin HTTP on its own port: `/metrics`, `/healthz`, `/readyz`, `/status`, `/`.
//!
//! The caller owns the listeners and the shutdown signal (bind `127.0.0.1:0` in tests, read the
//! bound address back from the listener), as in mini-redis:
//!
//! ```no_run
//! # async fn example(engine: hopps_engine::Engine) -> Result<(), hopps_server::ServerError> {
//! let config = hopps_server::ServerConfig::default();
//! let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let (_stop, shutdown) = tokio::sync::watch::channel(false);
//! hopps_server::Server::new(engine, &config)?.run(grpc, admin, shutdown).await
//! # }
//! ```
//!
//! Architecture invariants: only this crate speaks HTTP and the Prometheus format; wire types
//! are converted at the edge (`grpc`); engine errors become gRPC codes in one place (`error`).
#![forbid(unsafe_code)]

pub mod cluster;
pub mod config;
mod error;
mod grpc;
mod http;
mod metrics;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hopps_engine::{Engine, EngineConfig, WalSync};
use hopps_format::{Repository, StorageOptions};
use hopps_proto::v1::admin_server::AdminServer;
use hopps_proto::v1::hopps_server::HoppsServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

pub use cluster::Agent;
pub use config::{ClusterConfig, ConfigError, ServerConfig, StorageConfig, WalSyncSetting};
pub use error::{ServerError, code_label, code_of, status_of};
pub use metrics::install_exporter;

use crate::grpc::{AdminService, HoppsService, Limits, Node};

/// The repository storage options a config asks for (unset ones keep the format crate's
/// defaults, which read the usual AWS_* environment variables).
pub fn storage_options(config: &StorageConfig) -> StorageOptions {
    let mut options = StorageOptions::default();
    if let Some(v) = &config.s3_endpoint {
        options.s3_endpoint = Some(v.clone());
    }
    if let Some(v) = &config.s3_region {
        options.s3_region = Some(v.clone());
    }
    if let Some(v) = &config.s3_access_key_id {
        options.s3_access_key_id = Some(v.clone());
    }
    if let Some(v) = &config.s3_secret_access_key {
        options.s3_secret_access_key = Some(v.clone());
    }
    if let Some(timeout) = config.timeout {
        options.timeout = timeout;
    }
    options
}

/// Opens the model repository a config names; an unreachable one fails within the storage
/// timeout with an error that names it.
pub async fn open_repository(config: &ServerConfig) -> Result<Repository, ServerError> {
    Repository::open(&config.repo, &storage_options(&config.storage))
        .await
        .map_err(|source| ServerError::Repository {
            uri: config.repo.clone(),
            source,
        })
}

/// The engine configuration a server config asks for.
///
/// In cluster mode (`config.cluster` set) this makes the node's cluster [`Agent`] and sets it as
/// the engine's coordinator; [`Server::new`] picks the same agent up from `config`, so build the
/// engine from this config and hand the server the same config.
pub fn engine_config(config: &ServerConfig, repository: Repository) -> EngineConfig {
    let mut engine = EngineConfig::new(repository, config.data_dir.clone());
    engine.models = config.models.clone();
    engine.memory_limit = config.memory_limit;
    engine.poll_interval = config.poll_interval;
    engine.wal_sync = match config.wal_sync {
        WalSyncSetting::Always => WalSync::Always,
        WalSyncSetting::Interval(d) => WalSync::Interval(d),
    };
    engine.checkpoint_interval = config.checkpoint_interval;
    if let Some(budget) = config.undo_budget {
        engine.undo_budget_bytes = budget;
    }
    if let Some(retention) = config.checkpoint_retention {
        engine.checkpoint_retention = retention;
    }
    if let Some(node_id) = &config.node_id {
        engine.node_id = node_id.clone();
    }
    if let Some(cluster) = &config.cluster {
        let agent = Arc::new(Agent::new(engine.node_id.clone(), &cluster.name));
        cluster.agent.set(Arc::clone(&agent));
        engine.coordinator = Some(agent);
    }
    engine
}

/// A hopps node ready to serve an engine.
pub struct Server {
    node: Arc<Node>,
    max_message_bytes: usize,
    shutdown_grace: Duration,
    exporter: metrics_exporter_prometheus::PrometheusHandle,
    config: ServerConfig,
}

impl Server {
    /// A server for `engine` with the limits of `config`. Installs the process-wide Prometheus
    /// recorder on first use.
    ///
    /// In cluster mode the engine must have been built from [`engine_config`] of this config
    /// (it carries the node's cluster agent).
    pub fn new(engine: Engine, config: &ServerConfig) -> Result<Server, ServerError> {
        let exporter = install_exporter()?;
        let cluster = match &config.cluster {
            None => None,
            Some(c) => {
                let agent = c.agent.get().ok_or_else(|| {
                    ServerError::Cluster(format!(
                        "cluster {}: the engine was not built with hopps_server::engine_config \
                         of this config, so it has no cluster agent; build it that way",
                        c.name
                    ))
                })?;
                // The node id is part of etcd keys: an empty or odd one would make the node
                // invisible to the cluster.
                hopps_cluster::check_cluster_name(agent.id()).map_err(|_| {
                    ServerError::Cluster(format!(
                        "node id {:?} cannot name a node of cluster {}; give --node-id (or \
                         HOSTNAME) of 1-64 letters, digits, '-', '_' or '.'",
                        agent.id(),
                        c.name
                    ))
                })?;
                Some(agent)
            }
        };
        let node = Node {
            cluster,
            engine,
            limits: Limits {
                max_keys_per_request: config.max_keys_per_request,
            },
            metrics: metrics::RequestMetrics::new(),
            started: Instant::now(),
            repository: config.repo.clone(),
        };
        Ok(Server {
            node: Arc::new(node),
            max_message_bytes: config.max_message_usize(),
            shutdown_grace: config.shutdown_grace,
            exporter,
            config: config.clone(),
        })
    }

    /// Serves gRPC on `grpc` and admin HTTP on `admin`, loads the configured models, then keeps
    /// applying new versions from the repository, until `shutdown` turns true. In-flight
    /// requests then get the configured grace period to finish.
    pub async fn run(
        self,
        grpc: TcpListener,
        admin: TcpListener,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), ServerError> {
        let grpc_addr = local(&grpc);
        let admin_addr = local(&admin);
        let engine = self.node.engine.clone();
        let limit = self.max_message_bytes;

        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        reporter
            .set_service_status(hopps_proto::HOPPS_SERVICE, ServingStatus::NotServing)
            .await;
        // In a cluster, join before serving: a node whose id is taken must not start.
        let cluster = match (&self.node.cluster, &self.config.cluster) {
            (Some(agent), Some(config)) => Some(
                cluster::start(
                    Arc::clone(agent),
                    engine.clone(),
                    &self.config,
                    config,
                    grpc_addr.clone(),
                    admin_addr.clone(),
                    shutdown.clone(),
                )
                .await?,
            ),
            _ => None,
        };
        let readiness = tokio::spawn(track_readiness(
            Arc::clone(&self.node),
            reporter,
            shutdown.clone(),
        ));
        let upkeep = metrics::spawn_upkeep(self.exporter.clone());
        let loader = tokio::spawn(load_then_watch(
            engine.clone(),
            self.node.cluster.clone(),
            shutdown.clone(),
        ));

        let hopps = HoppsServer::new(HoppsService::new(Arc::clone(&self.node)))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let admin_svc = AdminServer::new(AdminService::new(Arc::clone(&self.node)))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let incoming = TcpIncoming::from(grpc).with_nodelay(Some(true));
        // Windows sized for batches (see the client): a large request is not held up by
        // window updates.
        let grpc_server = tonic::transport::Server::builder()
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .layer(tower::util::MapResponseLayer::new(oversized_is_exhausted))
            .add_service(health)
            .add_service(hopps)
            .add_service(admin_svc)
            .serve_with_incoming_shutdown(incoming, signalled(shutdown.clone()));

        let router = http::router(Arc::clone(&self.node), self.exporter.clone());
        let admin_server =
            axum::serve(admin, router).with_graceful_shutdown(signalled(shutdown.clone()));

        tracing::info!(grpc = %grpc_addr, admin = %admin_addr, "serving");
        let serve = async {
            let (grpc_result, admin_result) = tokio::join!(grpc_server, admin_server.into_future());
            grpc_result.map_err(|source| ServerError::Grpc {
                addr: grpc_addr.clone(),
                source,
            })?;
            admin_result.map_err(|source| ServerError::Admin {
                addr: admin_addr.clone(),
                source,
            })
        };
        let grace = self.shutdown_grace;
        let result = tokio::select! {
            result = serve => result,
            () = async {
                signalled(shutdown.clone()).await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(grace_seconds = grace.as_secs_f64(), "requests still in flight after the shutdown grace period; stopping anyway");
                Ok(())
            }
        };
        readiness.abort();
        upkeep.abort();
        if let Some(cluster) = cluster {
            // Leave the cluster (revoke the lease) so clients stop routing here at once.
            cluster.finish(grace).await;
        }
        // The watcher stops on the same signal; give it the grace period to finish an apply.
        if tokio::time::timeout(grace, loader).await.is_err() {
            tracing::warn!("the repository watcher did not stop within the grace period");
        }
        tracing::info!("stopped");
        result
    }
}

fn local(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string())
}

/// Resolves once `shutdown` is true (or its sender is gone).
pub(crate) async fn signalled(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Loads every configured model, then runs the repository watcher until shutdown.
async fn load_then_watch(
    engine: Engine,
    agent: Option<Arc<Agent>>,
    shutdown: watch::Receiver<bool>,
) {
    if let Some(agent) = agent {
        // In a cluster the first load needs the placement (which shards) and the serving
        // version (how far): a load before the node read them would load nothing, or a version
        // the cluster does not serve yet.
        tracing::info!("waiting for the cluster's placement before loading");
        agent.synced(shutdown.clone()).await;
        if *shutdown.borrow() {
            return;
        }
    }
    let started = Instant::now();
    tracing::info!("loading models");
    let load = engine.load();
    tokio::pin!(load);
    let mut progress = tokio::time::interval(LOAD_PROGRESS_EVERY);
    progress.tick().await;
    loop {
        tokio::select! {
            result = &mut load => {
                match result {
                    Ok(()) => log_loaded(&engine, started),
                    Err(err) => tracing::error!(error = %err, "loading models failed; the node keeps trying on each repository poll"),
                }
                break;
            }
            _ = progress.tick() => log_progress(&engine),
            () = signalled(shutdown.clone()) => return,
        }
    }
    let watcher = engine.spawn_background(shutdown);
    if let Err(err) = watcher.await {
        tracing::error!(error = %err, "the repository watcher stopped unexpectedly");
    }
}

/// How often the first load logs its progress.
const LOAD_PROGRESS_EVERY: Duration = Duration::from_secs(5);

fn log_progress(engine: &Engine) {
    for m in engine.status().models {
        if let Some(load) = &m.load {
            tracing::info!(
                model = %m.name,
                version = load.version,
                rows_done = load.rows_done,
                rows_total = load.rows_total,
                bytes_done = load.bytes_done,
                bytes_total = load.bytes_total,
                eta_seconds = load.eta_seconds,
                "loading"
            );
        }
    }
}

fn log_loaded(engine: &Engine, started: Instant) {
    let status = engine.status();
    for m in &status.models {
        match &m.last_error {
            Some(err) => {
                tracing::error!(model = %m.name, state = %m.state, error = %err, "model not loaded")
            }
            None => tracing::info!(
                model = %m.name,
                version = m.serving_version.unwrap_or_default(),
                rows = m.rows,
                memory_bytes = m.memory_bytes,
                "model loaded"
            ),
        }
    }
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        ready = status.ready,
        models = status.models.len(),
        "initial load finished"
    );
}

/// Keeps gRPC health in step with readiness: NOT_SERVING until every configured model serves
/// (in a cluster: until every shard placed on this node is held).
async fn track_readiness(
    node: Arc<Node>,
    reporter: tonic_health::server::HealthReporter,
    shutdown: watch::Receiver<bool>,
) {
    let mut last = None;
    // Readiness changes rarely; 50 ms keeps health within a blink of /readyz.
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = signalled(shutdown.clone()) => {
                reporter.set_service_status("", ServingStatus::NotServing).await;
                reporter.set_service_status(hopps_proto::HOPPS_SERVICE, ServingStatus::NotServing).await;
                return;
            }
        }
        let ready = node.is_ready();
        if last != Some(ready) {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            reporter
                .set_service_status(hopps_proto::HOPPS_SERVICE, status)
                .await;
            if ready && node.cluster.is_some() {
                tracing::info!("ready: every shard placed on this node is held");
            } else if ready {
                tracing::info!("ready: every configured model is serving");
            }
            last = Some(ready);
        }
    }
}

/// tonic answers a request larger than the decoding limit with OUT_OF_RANGE; gRPC's convention
/// (and our contract) is RESOURCE_EXHAUSTED, with a hint what to do. No handler of ours answers
/// OUT_OF_RANGE, so every such status in response headers is that decoding error.
fn oversized_is_exhausted<B>(mut response: ::http::Response<B>) -> ::http::Response<B> {
    let headers = response.headers_mut();
    if headers
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"11")
    {
        headers.insert("grpc-status", ::http::HeaderValue::from_static("8"));
        let original = headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .unwrap_or("message too large")
            .to_string();
        let message = format!(
            "{original}; split the batch into smaller requests, or raise the server's max_message_bytes"
        );
        if let Ok(value) = ::http::HeaderValue::from_str(&message) {
            headers.insert("grpc-message", value);
        }
    }
    response
}
