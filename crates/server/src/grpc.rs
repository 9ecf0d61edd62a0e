//! The `hopps.v1` gRPC services over the engine: `Hopps` (lookups, online writes) and `Admin`.
//!
//! Wire types stop here: requests are decoded into engine calls and engine reports are encoded
//! into responses. The lookup path reuses per-thread buffers for keys, rows and found flags, so a
//! request allocates only its response bytes, never per key.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use hopps_engine::{Engine, ModelStatus, TableLookup, TableStatus};
use hopps_proto::packed;
use hopps_proto::v1;
use hopps_proto::v1::admin_server::Admin;
use hopps_proto::v1::hopps_server::Hopps;
use tonic::{Code, Request, Response, Status};

use crate::error::status_of;
use crate::metrics::RequestMetrics;

/// Limits on one request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_keys_per_request: usize,
}

/// What both services share.
pub(crate) struct Node {
    pub engine: Engine,
    /// The cluster agent in cluster mode; `None` for the embedded single node.
    pub cluster: Option<Arc<crate::cluster::Agent>>,
    pub limits: Limits,
    pub metrics: RequestMetrics,
    pub started: Instant,
    pub repository: String,
}

impl Node {
    /// Ready to take traffic: every configured model serves (embedded), or every shard placed
    /// on this node is held (cluster).
    pub(crate) fn is_ready(&self) -> bool {
        match &self.cluster {
            None => self.engine.is_ready(),
            Some(agent) => agent.readiness(&self.engine).is_ok(),
        }
    }

    /// The status reply shared by gRPC `Status` and HTTP `/status`.
    pub(crate) fn status_view(&self) -> StatusView {
        let status = self.engine.status();
        StatusView {
            node_id: status.node_id.clone(),
            version: env!("CARGO_PKG_VERSION"),
            ready: match &self.cluster {
                None => status.ready,
                Some(_) => self.is_ready(),
            },
            cluster: self.cluster.as_ref().map(|a| ClusterView {
                name: a.cluster().to_string(),
                leader: a.is_leader(),
            }),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            repository: self.repository.clone(),
            memory_limit_bytes: status.memory_limit,
            memory_used_bytes: status.memory_used,
            wal_bytes: status.wal_bytes,
            models: status.models,
        }
    }
}

/// The node's status with what the server adds (build, uptime, repository).
#[derive(Debug, serde::Serialize)]
pub(crate) struct StatusView {
    pub node_id: String,
    pub version: &'static str,
    pub ready: bool,
    /// The cluster this node is part of; absent for the embedded single node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterView>,
    pub uptime_seconds: f64,
    pub repository: String,
    pub memory_limit_bytes: Option<u64>,
    pub memory_used_bytes: u64,
    pub wal_bytes: u64,
    pub models: Vec<ModelStatus>,
}

/// This node's place in its cluster, in `/status`.
#[derive(Debug, serde::Serialize)]
pub(crate) struct ClusterView {
    pub name: String,
    /// True on the node running the placement controller.
    pub leader: bool,
}

/// Per-thread buffers of the lookup path, kept between requests.
#[derive(Default)]
struct Scratch {
    keys: Vec<u64>,
    values: Vec<f32>,
    found: Vec<bool>,
}

/// Buffers above this many bytes are released after the request that needed them, so one huge
/// request does not pin memory in every worker thread.
const SCRATCH_KEEP_BYTES: usize = 16 << 20;

impl Scratch {
    fn trim(&mut self) {
        if self.values.capacity() * 4 > SCRATCH_KEEP_BYTES {
            self.values = Vec::new();
        }
        if self.keys.capacity() * 8 > SCRATCH_KEEP_BYTES {
            self.keys = Vec::new();
            self.found = Vec::new();
        }
    }

    /// Output slices of `floats` values and `keys` found flags, without clearing what a
    /// previous request left: the engine writes every row (found or per the missing-key policy).
    fn outputs(&mut self, floats: usize, keys: usize) -> (&mut [f32], &mut [bool]) {
        if self.values.len() < floats {
            self.values.resize(floats, 0.0);
        }
        if self.found.len() < keys {
            self.found.resize(keys, false);
        }
        (&mut self.values[..floats], &mut self.found[..keys])
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn keys_error(what: &str, len: usize) -> Status {
    Status::invalid_argument(format!(
        "{what}: keys are {len} bytes, not a multiple of 8; pack each key as 8 little-endian bytes (u64)"
    ))
}

fn too_many_keys(what: &str, count: usize, limit: usize) -> Status {
    Status::resource_exhausted(format!(
        "{what}: {count} keys exceed the limit of {limit} keys per request; split the batch, or raise the server's max_keys_per_request"
    ))
}

fn lookup_what(model: &str, table: &str) -> String {
    format!("lookup in model {model:?} table {table:?}")
}

/// The gRPC `Hopps` service.
#[derive(Clone)]
pub(crate) struct HoppsService {
    node: Arc<Node>,
}

impl HoppsService {
    pub(crate) fn new(node: Arc<Node>) -> HoppsService {
        HoppsService { node }
    }

    /// One lookup; returns the response and the number of misses.
    fn lookup_rows(&self, req: &v1::LookupRequest) -> Result<(v1::LookupResponse, u64), Status> {
        let node = &self.node;
        if !req.keys.len().is_multiple_of(packed::KEY_BYTES) {
            return Err(keys_error(
                &lookup_what(&req.model, &req.table),
                req.keys.len(),
            ));
        }
        let count = req.keys.len() / packed::KEY_BYTES;
        if count > node.limits.max_keys_per_request {
            return Err(too_many_keys(
                &lookup_what(&req.model, &req.table),
                count,
                node.limits.max_keys_per_request,
            ));
        }
        let meta = node
            .engine
            .table_meta(&req.model, &req.table)
            .map_err(|e| status_of(&e))?;
        let dim = meta.dim as usize;
        SCRATCH.with(|cell| {
            let mut guard = cell.borrow_mut();
            let scratch = &mut *guard;
            // Length checked above, so unpacking cannot fail.
            packed::unpack_keys_into(&req.keys, &mut scratch.keys);
            let keys = std::mem::take(&mut scratch.keys);
            let (_, found) = scratch.outputs(0, count);
            // The engine appends the rows in the wire format; the buffer becomes the reply's
            // bytes without another copy.
            let mut values = Vec::with_capacity(count * dim * packed::VALUE_BYTES);
            let result = node.engine.lookup_packed(
                &req.model,
                &req.table,
                &keys,
                req.version,
                &mut values,
                found,
            );
            let reply = result.map(|version| {
                let values = Bytes::from(values);
                let mut bitmap = BytesMut::with_capacity(packed::bitmap_len(count));
                packed::put_bitmap(&mut bitmap, found);
                let misses = found.iter().filter(|f| !**f).count() as u64;
                (
                    v1::LookupResponse {
                        version,
                        dim: meta.dim,
                        values,
                        found: bitmap.freeze(),
                        count: count as u32,
                    },
                    misses,
                )
            });
            scratch.keys = keys;
            scratch.trim();
            reply.map_err(|e| status_of(&e))
        })
    }

    /// One multi-table lookup; returns the response, keys and misses per table.
    fn multi_lookup_rows(
        &self,
        req: &v1::MultiLookupRequest,
    ) -> Result<(v1::MultiLookupResponse, Vec<(u64, u64)>), Status> {
        let node = &self.node;
        let mut total = 0usize;
        let mut dims = Vec::with_capacity(req.tables.len());
        for t in &req.tables {
            if !t.keys.len().is_multiple_of(packed::KEY_BYTES) {
                return Err(keys_error(&lookup_what(&req.model, &t.table), t.keys.len()));
            }
            total += t.keys.len() / packed::KEY_BYTES;
            let meta = node
                .engine
                .table_meta(&req.model, &t.table)
                .map_err(|e| status_of(&e))?;
            dims.push(meta.dim as usize);
        }
        if total > node.limits.max_keys_per_request {
            return Err(too_many_keys(
                &format!("multi-lookup in model {:?}", req.model),
                total,
                node.limits.max_keys_per_request,
            ));
        }
        let floats: usize = req
            .tables
            .iter()
            .zip(&dims)
            .map(|(t, dim)| t.keys.len() / packed::KEY_BYTES * dim)
            .sum();
        SCRATCH.with(|cell| {
            let mut guard = cell.borrow_mut();
            let scratch = &mut *guard;
            // All tables' keys one after the other in one buffer.
            scratch.keys.clear();
            for t in &req.tables {
                scratch
                    .keys
                    .extend(t.keys.chunks_exact(packed::KEY_BYTES).map(|c| {
                        let mut word = [0u8; packed::KEY_BYTES];
                        word.copy_from_slice(c);
                        u64::from_le_bytes(word)
                    }));
            }
            let keys = std::mem::take(&mut scratch.keys);
            let (mut out, mut found) = scratch.outputs(floats, total);
            let mut lookups = Vec::with_capacity(req.tables.len());
            let mut rest_keys = &keys[..];
            for (t, dim) in req.tables.iter().zip(&dims) {
                let n = t.keys.len() / packed::KEY_BYTES;
                let (k, rk) = rest_keys.split_at(n);
                let (o, ro) = std::mem::take(&mut out).split_at_mut(n * dim);
                let (f, rf) = std::mem::take(&mut found).split_at_mut(n);
                rest_keys = rk;
                out = ro;
                found = rf;
                lookups.push(TableLookup {
                    table: t.table.as_str(),
                    keys: k,
                    out: o,
                    found: f,
                });
            }
            let result = node
                .engine
                .multi_lookup(&req.model, req.version, &mut lookups);
            let reply = result.map(|version| {
                let mut tables = Vec::with_capacity(lookups.len());
                let mut counts = Vec::with_capacity(lookups.len());
                for (l, dim) in lookups.iter().zip(&dims) {
                    let mut values = BytesMut::with_capacity(l.out.len() * packed::VALUE_BYTES);
                    packed::put_values(&mut values, l.out);
                    let mut bitmap = BytesMut::with_capacity(packed::bitmap_len(l.keys.len()));
                    packed::put_bitmap(&mut bitmap, l.found);
                    let misses = l.found.iter().filter(|f| !**f).count() as u64;
                    counts.push((l.keys.len() as u64, misses));
                    tables.push(v1::TableRows {
                        table: l.table.to_string(),
                        dim: *dim as u32,
                        values: values.freeze(),
                        found: bitmap.freeze(),
                        count: l.keys.len() as u32,
                    });
                }
                (v1::MultiLookupResponse { version, tables }, counts)
            });
            drop(lookups);
            scratch.keys = keys;
            scratch.trim();
            reply.map_err(|e| status_of(&e))
        })
    }

    /// Decodes the keys and floats of a write, checking lengths against the table's dim.
    fn write_input(
        &self,
        what: &str,
        model: &str,
        table: &str,
        keys: &[u8],
        floats: Option<(&str, &[u8])>,
    ) -> Result<(Vec<u64>, Vec<f32>), Status> {
        let mut key_vec = Vec::new();
        if !packed::unpack_keys_into(keys, &mut key_vec) {
            return Err(keys_error(what, keys.len()));
        }
        if key_vec.len() > self.node.limits.max_keys_per_request {
            return Err(too_many_keys(
                what,
                key_vec.len(),
                self.node.limits.max_keys_per_request,
            ));
        }
        let mut values = Vec::new();
        if let Some((name, bytes)) = floats {
            let meta = self
                .node
                .engine
                .table_meta(model, table)
                .map_err(|e| status_of(&e))?;
            let expected = key_vec.len() * meta.dim as usize;
            if !packed::unpack_values_into(bytes, &mut values) || values.len() != expected {
                return Err(Status::invalid_argument(format!(
                    "{what}: {} bytes of {name} for {} keys of dim {}; send keys × dim little-endian f32 ({} bytes)",
                    bytes.len(),
                    key_vec.len(),
                    meta.dim,
                    expected * packed::VALUE_BYTES
                )));
            }
        }
        Ok((key_vec, values))
    }

    fn record_write(&self, model: &str, table: &str, op: &'static str, code: Code) {
        let engine = &self.node.engine;
        self.node
            .metrics
            .table(model, table, || engine.table_meta(model, table).is_ok())
            .write(op, code);
    }

    fn finish_write(
        &self,
        model: &str,
        table: &str,
        op: &'static str,
        result: Result<hopps_engine::WriteAck, Status>,
    ) -> Result<Response<v1::WriteResponse>, Status> {
        let code = result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
        self.record_write(model, table, op, code);
        result.map(|ack| {
            Response::new(v1::WriteResponse {
                version: ack.version,
                rows: ack.rows,
                sequence: ack.sequence,
            })
        })
    }
}

#[tonic::async_trait]
impl Hopps for HoppsService {
    async fn lookup(
        &self,
        request: Request<v1::LookupRequest>,
    ) -> Result<Response<v1::LookupResponse>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        let result = self.lookup_rows(&req);
        let engine = &self.node.engine;
        let metrics = self.node.metrics.table(&req.model, &req.table, || {
            engine.table_meta(&req.model, &req.table).is_ok()
        });
        let keys = (req.keys.len() / packed::KEY_BYTES) as u64;
        match result {
            Ok((reply, misses)) => {
                metrics.lookup(Code::Ok, keys, misses, started.elapsed());
                Ok(Response::new(reply))
            }
            Err(status) => {
                metrics.lookup(status.code(), 0, 0, started.elapsed());
                Err(status)
            }
        }
    }

    async fn multi_lookup(
        &self,
        request: Request<v1::MultiLookupRequest>,
    ) -> Result<Response<v1::MultiLookupResponse>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        let result = self.multi_lookup_rows(&req);
        let engine = &self.node.engine;
        let elapsed = started.elapsed();
        match result {
            Ok((reply, counts)) => {
                for (t, (keys, misses)) in req.tables.iter().zip(counts) {
                    self.node
                        .metrics
                        .table(&req.model, &t.table, || {
                            engine.table_meta(&req.model, &t.table).is_ok()
                        })
                        .lookup(Code::Ok, keys, misses, elapsed);
                }
                Ok(Response::new(reply))
            }
            Err(status) => {
                let table = req.tables.first().map_or("", |t| t.table.as_str());
                self.node
                    .metrics
                    .table(&req.model, table, || {
                        engine.table_meta(&req.model, table).is_ok()
                    })
                    .lookup(status.code(), 0, 0, elapsed);
                Err(status)
            }
        }
    }

    async fn upsert(
        &self,
        request: Request<v1::UpsertRequest>,
    ) -> Result<Response<v1::WriteResponse>, Status> {
        let req = request.into_inner();
        let what = format!("upsert to model {:?} table {:?}", req.model, req.table);
        let result = match self.write_input(
            &what,
            &req.model,
            &req.table,
            &req.keys,
            Some(("values", &req.values)),
        ) {
            Ok((keys, values)) => self
                .node
                .engine
                .upsert(&req.model, &req.table, &keys, &values)
                .await
                .map_err(|e| status_of(&e)),
            Err(status) => Err(status),
        };
        self.finish_write(&req.model, &req.table, "upsert", result)
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::WriteResponse>, Status> {
        let req = request.into_inner();
        let what = format!("delete in model {:?} table {:?}", req.model, req.table);
        let result = match self.write_input(&what, &req.model, &req.table, &req.keys, None) {
            Ok((keys, _)) => self
                .node
                .engine
                .delete(&req.model, &req.table, &keys)
                .await
                .map_err(|e| status_of(&e)),
            Err(status) => Err(status),
        };
        self.finish_write(&req.model, &req.table, "delete", result)
    }

    async fn push(
        &self,
        request: Request<v1::PushRequest>,
    ) -> Result<Response<v1::WriteResponse>, Status> {
        let req = request.into_inner();
        let what = format!("push to model {:?} table {:?}", req.model, req.table);
        let result = match self.write_input(
            &what,
            &req.model,
            &req.table,
            &req.keys,
            Some(("gradients", &req.gradients)),
        ) {
            Ok((keys, gradients)) => self
                .node
                .engine
                .push(&req.model, &req.table, &keys, &gradients)
                .await
                .map_err(|e| status_of(&e)),
            Err(status) => Err(status),
        };
        self.finish_write(&req.model, &req.table, "push", result)
    }
}

fn table_info(t: &TableStatus) -> v1::TableInfo {
    v1::TableInfo {
        name: t.name.clone(),
        dim: t.dim,
        dtype: t.dtype.clone(),
        missing: t.missing.clone(),
        rows: t.rows,
        capacity: t.capacity,
        load_factor: t.load_factor,
        bytes: t.bytes,
        optimizer: t.optimizer.clone().unwrap_or_default(),
    }
}

fn model_status(m: &ModelStatus) -> v1::ModelStatus {
    v1::ModelStatus {
        name: m.name.clone(),
        state: m.state.clone(),
        serving_version: m.serving_version,
        newest_version: m.newest_version,
        load: m.load.as_ref().map(|l| v1::LoadProgress {
            version: l.version,
            rows_done: l.rows_done,
            rows_total: l.rows_total,
            bytes_done: l.bytes_done,
            bytes_total: l.bytes_total,
            eta_seconds: l.eta_seconds,
            last_progress_unix: l.last_progress_unix,
        }),
        last_error: m.last_error.clone().unwrap_or_default(),
        rows: m.rows,
        memory_bytes: m.memory_bytes,
        load_factor: m.load_factor,
        tables: m.tables.iter().map(table_info).collect(),
        undo_bytes: m.undo_bytes,
        load_failures: m.load_failures,
    }
}

fn require_model(model: &str) -> Result<(), Status> {
    if model.is_empty() {
        return Err(Status::invalid_argument(
            "no model named in the request; give the model's name",
        ));
    }
    Ok(())
}

/// The gRPC `Admin` service.
#[derive(Clone)]
pub(crate) struct AdminService {
    node: Arc<Node>,
}

impl AdminService {
    pub(crate) fn new(node: Arc<Node>) -> AdminService {
        AdminService { node }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_models(
        &self,
        _request: Request<v1::ListModelsRequest>,
    ) -> Result<Response<v1::ListModelsResponse>, Status> {
        let models = self
            .node
            .engine
            .models()
            .iter()
            .map(|m| v1::ModelInfo {
                name: m.name.clone(),
                shards: m.shards,
                tables: m.tables.iter().map(table_info).collect(),
                serving_version: m.serving_version,
            })
            .collect();
        Ok(Response::new(v1::ListModelsResponse { models }))
    }

    async fn versions(
        &self,
        request: Request<v1::VersionsRequest>,
    ) -> Result<Response<v1::VersionsResponse>, Status> {
        let req = request.into_inner();
        require_model(&req.model)?;
        let versions = self
            .node
            .engine
            .versions(&req.model)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(v1::VersionsResponse {
            model: req.model,
            versions: versions
                .into_iter()
                .map(|v| v1::VersionInfo {
                    version: v.version,
                    kind: v.kind,
                    parent: v.parent,
                    rows: v.rows,
                    created: v.created,
                    source: v.source,
                    state: v.state,
                })
                .collect(),
        }))
    }

    async fn status(
        &self,
        _request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let view = self.node.status_view();
        Ok(Response::new(v1::StatusResponse {
            node_id: view.node_id,
            version: view.version.to_string(),
            ready: view.ready,
            uptime_seconds: view.uptime_seconds,
            repository: view.repository,
            memory_limit_bytes: view.memory_limit_bytes.unwrap_or(0),
            memory_used_bytes: view.memory_used_bytes,
            models: view.models.iter().map(model_status).collect(),
            wal_bytes: view.wal_bytes,
        }))
    }

    async fn rollback(
        &self,
        request: Request<v1::RollbackRequest>,
    ) -> Result<Response<v1::RollbackResponse>, Status> {
        let req = request.into_inner();
        require_model(&req.model)?;
        let report = self
            .node
            .engine
            .rollback(&req.model, req.to_version)
            .await
            .map_err(|e| status_of(&e))?;
        tracing::info!(
            model = %report.model,
            from = report.from,
            to = report.to,
            method = %report.method,
            seconds = report.seconds,
            "rolled back"
        );
        Ok(Response::new(v1::RollbackResponse {
            model: report.model,
            from_version: report.from,
            to_version: report.to,
            method: report.method,
            seconds: report.seconds,
        }))
    }

    async fn history(
        &self,
        request: Request<v1::HistoryRequest>,
    ) -> Result<Response<v1::HistoryResponse>, Status> {
        let req = request.into_inner();
        require_model(&req.model)?;
        let events = self
            .node
            .engine
            .history(&req.model)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(v1::HistoryResponse {
            model: req.model,
            events: events
                .into_iter()
                .map(|e| v1::HistoryEvent {
                    time: e.time,
                    event: e.event,
                    version: e.version,
                    from_version: e.from_version,
                    detail: e.detail,
                })
                .collect(),
        }))
    }

    async fn checkpoint(
        &self,
        request: Request<v1::CheckpointRequest>,
    ) -> Result<Response<v1::CheckpointResponse>, Status> {
        let req = request.into_inner();
        require_model(&req.model)?;
        let report = self
            .node
            .engine
            .checkpoint(&req.model)
            .await
            .map_err(|e| status_of(&e))?;
        tracing::info!(
            model = %report.model,
            version = report.version,
            rows = report.rows,
            bytes = report.bytes,
            "checkpoint written"
        );
        Ok(Response::new(v1::CheckpointResponse {
            model: report.model,
            version: report.version,
            rows: report.rows,
            bytes: report.bytes,
            seconds: report.seconds,
        }))
    }
}
