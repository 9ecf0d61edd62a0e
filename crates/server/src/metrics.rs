//! Prometheus metrics. Names and labels are the contract written down in `docs/metrics.md`.
//!
//! Architecture invariant: only this crate knows the Prometheus exposition format. Other crates
//! (the engine's WAL) record through the `metrics` facade; the recorder installed here renders
//! everything at `/metrics`.
//!
//! Request metrics use handles made once per (model, table) and cached, so a lookup costs one
//! read-locked map probe per request (never per key). Gauges that describe state (versions,
//! rows, load progress) are derived from `Engine::status()` when `/metrics` is scraped.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use hopps_engine::NodeStatus;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tonic::Code;

use crate::error::{ServerError, code_label};

/// Buckets of the request latency histograms, seconds: 25 µs .. 2.5 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5,
];

/// Label value for a model or table the node does not know: request metrics must not grow a
/// series per name a client mistyped.
const UNKNOWN: &str = "unknown";

static EXPORTER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle).
///
/// The recorder has no HTTP listener of its own: the admin server renders it at `/metrics`.
pub fn install_exporter() -> Result<PrometheusHandle, ServerError> {
    if let Some(handle) = EXPORTER.get() {
        return Ok(handle.clone());
    }
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_duration_seconds".to_string()),
            &LATENCY_BUCKETS,
        )
        .map_err(|err| ServerError::Metrics(err.to_string()))?;
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    // Another thread may have won the race; then its recorder is the global one and ours is
    // dropped unused.
    match metrics::set_global_recorder(recorder) {
        Ok(()) => {
            let _ = EXPORTER.set(handle.clone());
            metrics::gauge!("hopps_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            Ok(handle)
        }
        Err(_) => EXPORTER.get().cloned().ok_or_else(|| {
            ServerError::Metrics(
                "another metrics recorder is already installed in this process".into(),
            )
        }),
    }
}

/// Drains histogram buckets periodically so memory stays bounded when nobody scrapes.
pub fn spawn_upkeep(handle: PrometheusHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    })
}

/// Codes a request can end with, in the order of [`TableMetrics::requests`].
const CODES: [Code; 7] = [
    Code::Ok,
    Code::InvalidArgument,
    Code::NotFound,
    Code::FailedPrecondition,
    Code::ResourceExhausted,
    Code::Unavailable,
    Code::Internal,
];

fn code_index(code: Code) -> usize {
    CODES
        .iter()
        .position(|c| *c == code)
        .unwrap_or(CODES.len() - 1)
}

/// Request metrics of one (model, table).
pub(crate) struct TableMetrics {
    model: String,
    table: String,
    requests: [Counter; CODES.len()],
    keys: Counter,
    misses: Counter,
    duration: Histogram,
}

impl TableMetrics {
    fn new(model: &str, table: &str) -> TableMetrics {
        let labels = |code: Code| {
            [
                ("model", model.to_string()),
                ("table", table.to_string()),
                ("code", code_label(code).to_string()),
            ]
        };
        let requests =
            CODES.map(|code| metrics::counter!("hopps_lookup_requests_total", &labels(code)));
        // Successful writes exist from the start (at 0), so rates and dashboards have a series.
        for op in ["upsert", "delete", "push"] {
            metrics::counter!(
                "hopps_write_requests_total",
                "model" => model.to_string(),
                "table" => table.to_string(),
                "op" => op,
                "code" => code_label(Code::Ok),
            )
            .increment(0);
        }
        let pair = [("model", model.to_string()), ("table", table.to_string())];
        TableMetrics {
            model: model.to_string(),
            table: table.to_string(),
            requests,
            keys: metrics::counter!("hopps_lookup_keys_total", &pair),
            misses: metrics::counter!("hopps_lookup_misses_total", &pair),
            duration: metrics::histogram!("hopps_lookup_duration_seconds", &pair),
        }
    }

    /// Records one lookup request.
    pub(crate) fn lookup(&self, code: Code, keys: u64, misses: u64, elapsed: Duration) {
        self.requests[code_index(code)].increment(1);
        if keys > 0 {
            self.keys.increment(keys);
        }
        if misses > 0 {
            self.misses.increment(misses);
        }
        self.duration.record(elapsed.as_secs_f64());
    }

    /// Records one write request (writes are not the hot path: handles are looked up each time).
    pub(crate) fn write(&self, op: &'static str, code: Code) {
        metrics::counter!(
            "hopps_write_requests_total",
            "model" => self.model.clone(),
            "table" => self.table.clone(),
            "op" => op,
            "code" => code_label(code),
        )
        .increment(1);
    }
}

/// Per-(model, table) request metrics, made on first use for tables the engine knows.
pub(crate) struct RequestMetrics {
    tables: RwLock<HashMap<String, HashMap<String, Arc<TableMetrics>>>>,
    unknown: Arc<TableMetrics>,
}

impl RequestMetrics {
    pub(crate) fn new() -> RequestMetrics {
        RequestMetrics {
            tables: RwLock::new(HashMap::new()),
            unknown: Arc::new(TableMetrics::new(UNKNOWN, UNKNOWN)),
        }
    }

    /// The metrics of (model, table); `known` says whether the node serves that table (asked
    /// only the first time, so unknown names share the `unknown` series).
    pub(crate) fn table(
        &self,
        model: &str,
        table: &str,
        known: impl FnOnce() -> bool,
    ) -> Arc<TableMetrics> {
        if let Ok(tables) = self.tables.read()
            && let Some(metrics) = tables.get(model).and_then(|t| t.get(table))
        {
            return Arc::clone(metrics);
        }
        if !known() {
            return Arc::clone(&self.unknown);
        }
        let mut tables = match self.tables.write() {
            Ok(tables) => tables,
            // A panic while holding the lock left the map as it was; the map itself is fine.
            Err(poisoned) => poisoned.into_inner(),
        };
        let entry = tables
            .entry(model.to_string())
            .or_default()
            .entry(table.to_string())
            .or_insert_with(|| Arc::new(TableMetrics::new(model, table)));
        Arc::clone(entry)
    }
}

/// Sets the state gauges from a status snapshot (called at scrape time).
pub(crate) fn record_status(status: &NodeStatus) {
    metrics::gauge!("hopps_ready").set(if status.ready { 1.0 } else { 0.0 });
    metrics::gauge!("hopps_memory_used_bytes").set(status.memory_used as f64);
    metrics::gauge!("hopps_memory_limit_bytes").set(status.memory_limit.unwrap_or(0) as f64);
    metrics::gauge!("hopps_wal_bytes").set(status.wal_bytes as f64);
    for model in &status.models {
        let m = [("model", model.name.clone())];
        let serving = model.serving_version.unwrap_or(0);
        let newest = model.newest_version.unwrap_or(serving);
        metrics::gauge!("hopps_model_serving_version", &m).set(serving as f64);
        metrics::gauge!("hopps_model_newest_version", &m).set(newest as f64);
        metrics::gauge!("hopps_model_version_lag", &m).set(newest.saturating_sub(serving) as f64);
        metrics::gauge!("hopps_model_rows", &m).set(model.rows as f64);
        metrics::gauge!("hopps_model_memory_bytes", &m).set(model.memory_bytes as f64);
        metrics::gauge!("hopps_model_undo_bytes", &m).set(model.undo_bytes as f64);
        metrics::counter!("hopps_model_load_failures_total", &m).absolute(model.load_failures);
        let load = model.load.as_ref();
        metrics::gauge!("hopps_load_in_progress", &m).set(if load.is_some() { 1.0 } else { 0.0 });
        metrics::gauge!("hopps_load_rows_done", &m).set(load.map_or(0.0, |l| l.rows_done as f64));
        metrics::gauge!("hopps_load_rows_total", &m).set(load.map_or(0.0, |l| l.rows_total as f64));
        metrics::gauge!("hopps_load_bytes_done", &m).set(load.map_or(0.0, |l| l.bytes_done as f64));
        metrics::gauge!("hopps_load_bytes_total", &m)
            .set(load.map_or(0.0, |l| l.bytes_total as f64));
        metrics::gauge!("hopps_load_eta_seconds", &m).set(load.map_or(0.0, |l| l.eta_seconds));
        metrics::gauge!("hopps_load_last_progress_timestamp_seconds", &m)
            .set(load.map_or(0.0, |l| l.last_progress_unix));
        for table in &model.tables {
            let t = [("model", model.name.clone()), ("table", table.name.clone())];
            metrics::gauge!("hopps_table_rows", &t).set(table.rows as f64);
            metrics::gauge!("hopps_table_capacity", &t).set(table.capacity as f64);
            metrics::gauge!("hopps_table_load_factor", &t).set(table.load_factor);
            metrics::gauge!("hopps_table_bytes", &t).set(table.bytes as f64);
            let per_entry = if table.rows == 0 {
                0.0
            } else {
                table.bytes as f64 / table.rows as f64
            };
            metrics::gauge!("hopps_table_bytes_per_entry", &t).set(per_entry);
        }
    }
}

/// `hopps_cluster_leader`: 1 while this node runs the placement controller.
pub(crate) fn cluster_leader(leader: bool) {
    metrics::gauge!("hopps_cluster_leader").set(if leader { 1.0 } else { 0.0 });
}

/// `hopps_cluster_placed_shards{model}`: shards of `model` the placement puts on this node.
pub(crate) fn cluster_placed_shards(model: &str, shards: usize) {
    metrics::gauge!("hopps_cluster_placed_shards", "model" => model.to_string()).set(shards as f64);
}

/// `hopps_cluster_shards_under_replicated{model}` / `hopps_cluster_shards_unavailable{model}`:
/// shards with fewer ready replicas than the placement asks for / with none. Exported by the
/// controller's node (0 on the others and once it stops leading).
pub(crate) fn cluster_shard_health(model: &str, under_replicated: usize, unavailable: usize) {
    metrics::gauge!("hopps_cluster_shards_under_replicated", "model" => model.to_string())
        .set(under_replicated as f64);
    metrics::gauge!("hopps_cluster_shards_unavailable", "model" => model.to_string())
        .set(unavailable as f64);
}

/// `hopps_cluster_etcd_errors_total`: failed etcd requests of membership and the controller.
pub(crate) fn cluster_etcd_errors_registered() {
    metrics::counter!("hopps_cluster_etcd_errors_total").increment(0);
}

pub(crate) fn cluster_etcd_error() {
    metrics::counter!("hopps_cluster_etcd_errors_total").increment(1);
}
