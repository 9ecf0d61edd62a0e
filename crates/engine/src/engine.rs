//! The engine: every model this node serves, and the operations on them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use arc_swap::ArcSwap;
use hopps_format::spec::now_rfc3339;
use hopps_format::{HistoryRecord, Manifest, Repository, VersionKind};

use crate::config::EngineConfig;
use crate::coordinator::{Coordinator, Gate};
use crate::error::{EngineError, ErrorKind, Result};
use crate::lineage::{EVENT_ROLLED_BACK, EVENT_SERVED, Lineage};
use crate::loader::{
    self, WriteScratch, apply_write, build_estimate, read_delta, table_bytes_estimate,
};
use crate::model::{Model, UndoEntry, UndoLog, capture_undo, compose_undo, merge};
use crate::report::*;
use crate::rows::TableShape;
use crate::view::{RowSet, RowsOut, Shape, ShardSet, Source, Tables, View, holds, not_held};
use crate::wal::{self, Wal, WalOp};
use hopps_format::shard_of;

/// One table's part of a [`Engine::multi_lookup`].
pub struct TableLookup<'a> {
    pub table: &'a str,
    pub keys: &'a [u64],
    /// `keys.len() * dim` floats.
    pub out: &'a mut [f32],
    /// `keys.len()` flags.
    pub found: &'a mut [bool],
}

/// The models of one node. Cheap to clone; every clone is the same engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    config: EngineConfig,
    models: ArcSwap<BTreeMap<String, Arc<Model>>>,
    /// Serialises adding models to `models`.
    adding: parking_lot::Mutex<()>,
    /// Makes the watcher run a pass now (see [`Engine::wake`]).
    wake: tokio::sync::Notify,
    /// Bumped on every change of any model's view (see [`Engine::subscribe`]).
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// Turns true when the watcher shuts down: gates still waited for are abandoned.
    closing: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("repository", &self.inner.config.repository.uri())
            .field("node_id", &self.inner.config.node_id)
            .finish()
    }
}

impl Engine {
    /// Opens the engine: checks the repository and the configured models, creates the data
    /// directory. Loads nothing yet (see [`Engine::load`]).
    pub async fn open(config: EngineConfig) -> Result<Engine> {
        std::fs::create_dir_all(config.data_dir.join("wal")).map_err(|e| {
            EngineError::wal_io(
                format!("creating data directory {}", config.data_dir.display()),
                e,
            )
        })?;
        let names = match &config.models {
            Some(list) => list.clone(),
            None => config.repository.list_models().await.map_err(|e| {
                EngineError::repository(format!("listing models in {}", config.repository.uri()), e)
            })?,
        };
        let changes = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let models = names
            .into_iter()
            .map(|n| (n.clone(), Arc::new(Model::new(n, changes.clone()))))
            .collect();
        Ok(Engine {
            inner: Arc::new(Inner {
                config,
                models: ArcSwap::from_pointee(models),
                adding: parking_lot::Mutex::new(()),
                wake: tokio::sync::Notify::new(),
                changes,
                closing: tokio::sync::watch::Sender::new(false),
            }),
        })
    }

    fn repo(&self) -> &Repository {
        &self.inner.config.repository
    }

    fn model(&self, name: &str) -> Result<Arc<Model>> {
        self.inner
            .models
            .load()
            .get(name)
            .cloned()
            .ok_or_else(|| self.unknown_model(name))
    }

    fn unknown_model(&self, name: &str) -> EngineError {
        let names: Vec<String> = self.inner.models.load().keys().cloned().collect();
        EngineError::not_found(format!(
            "model {name:?} is not served by this node (it serves: {}); check the name or \
             publish the model",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        ))
    }

    fn serving_view(&self, m: &Model) -> Result<Arc<View>> {
        m.view.load_full().ok_or_else(|| {
            let rt = m.runtime.lock();
            match &rt.last_error {
                Some(e) if rt.state == "failed" => EngineError::new(
                    ErrorKind::Unavailable,
                    format!("model {} failed to load: {e}", m.name),
                ),
                _ => EngineError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "model {} is still loading; retry when the node is ready",
                        m.name
                    ),
                ),
            }
        })
    }

    /// Loads the newest committed state of every configured model (checkpoint + deltas, WAL
    /// replay). One model failing does not stop the others: its error shows in status.
    pub async fn load(&self) -> Result<()> {
        let models: Vec<Arc<Model>> = self.inner.models.load().values().cloned().collect();
        for m in models {
            if m.view.load().is_some() {
                continue;
            }
            if let Err(e) = self.load_model(&m).await {
                m.fail(None, e.to_string());
            }
        }
        Ok(())
    }

    async fn read_lineage(
        &self,
        model: &str,
    ) -> Result<(Lineage, Vec<Manifest>, Vec<u64>, Vec<HistoryRecord>)> {
        let listing = self.repo().versions(model).await.map_err(|e| {
            EngineError::repository(format!("listing versions of model {model}"), e)
        })?;
        let history = self.repo().history(model).await.map_err(|e| {
            EngineError::repository(format!("reading the history of model {model}"), e)
        })?;
        let lineage = Lineage::compute(&listing.committed, &history);
        Ok((lineage, listing.committed, listing.aborted, history))
    }

    async fn shape(&self, model: &str) -> Result<Arc<Shape>> {
        let spec = self.repo().model(model).await.map_err(|e| {
            EngineError::repository(format!("reading model.json of model {model}"), e)
        })?;
        let tables = spec
            .tables
            .iter()
            .map(|t| TableShape::new(model, t))
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(Shape {
            model: model.to_string(),
            shards: spec.shards.max(1),
            tables,
        }))
    }

    fn memory_used(&self) -> u64 {
        self.inner
            .models
            .load()
            .values()
            .map(|m| m.memory_bytes())
            .sum()
    }

    fn check_memory(&self, model: &str, version: u64, need: u64) -> Result<()> {
        if let Some(limit) = self.inner.config.memory_limit {
            let used = self.memory_used();
            if used.saturating_add(need) > limit {
                return Err(EngineError::exhausted(format!(
                    "model {model} version {version} needs about {need} bytes but only {} of the \
                     node's {limit}-byte memory limit are free ({used} used); raise the limit, \
                     serve fewer models on this node or add shards on more nodes",
                    limit.saturating_sub(used)
                )));
            }
        }
        Ok(())
    }

    /// Builds `lineage.chain[pos]` for the shards in `held` (`None` = every shard): the newest
    /// usable checkpoint of `checkpoints` (else the chain's full version), the deltas after it
    /// and the logged writes in `records` — once the memory it needs is known to fit.
    #[allow(clippy::too_many_arguments)]
    async fn build_checked(
        &self,
        m: &Arc<Model>,
        shape: &Arc<Shape>,
        lineage: &Lineage,
        pos: usize,
        checkpoints: &[Manifest],
        records: &[wal::WalRecord],
        held: Option<&ShardSet>,
    ) -> Result<loader::Built> {
        let base = loader::pick_checkpoint(lineage, pos, checkpoints)
            .map(|(c, _)| c.clone())
            .unwrap_or_else(|| lineage.chain[0].clone());
        self.check_memory(
            &m.name,
            lineage.chain[pos].version,
            build_estimate(shape, &lineage.chain[..=pos], &base, held),
        )?;
        loader::build(
            self.repo(),
            m,
            shape,
            lineage,
            pos,
            checkpoints,
            records,
            held,
        )
        .await
    }

    /// Every record of `model`'s write-ahead log, read off the async workers (it is file I/O).
    async fn read_wal(&self, model: &str) -> Result<Vec<wal::WalRecord>> {
        let dir = self.wal_dir(model);
        tokio::task::spawn_blocking(move || wal::read_all(&dir))
            .await
            .map_err(|e| {
                EngineError::internal(format!("reading the write-ahead log of model {model}: {e}"))
            })?
    }

    fn wal_dir(&self, model: &str) -> std::path::PathBuf {
        self.inner.config.data_dir.join("wal").join(model)
    }

    fn coordinator(&self) -> Option<&Arc<dyn Coordinator>> {
        self.inner.config.coordinator.as_ref()
    }

    /// The shards of the model of `shape` this node must hold now (`None` = every shard).
    fn placement(&self, shape: &Shape) -> Result<Option<Arc<ShardSet>>> {
        let Some(c) = self.coordinator() else {
            return Ok(None);
        };
        let set = c.shards(&shape.model);
        Ok(ShardSet::from_placement(&shape.model, shape.shards, set.as_ref())?.map(Arc::new))
    }

    /// Publishes `staged` (the current version still the default, `version` readable when
    /// pinned) and waits for the coordinator's word on it. On `Abandon`, or when this future is
    /// dropped (shutdown), `current` is put back. Without a coordinator: `Go` at once.
    async fn stage_and_gate(
        &self,
        m: &Model,
        current: &Arc<View>,
        staged: Arc<View>,
        version: u64,
    ) -> Gate {
        let Some(c) = self.coordinator() else {
            return Gate::Go;
        };
        let mut restore = Unstage {
            m,
            prev: Some(current.clone()),
        };
        m.runtime.lock().staged = Some(version);
        m.publish(staged);
        let wait = c.staged(&m.name, version);
        let mut closing = self.inner.closing.subscribe();
        let gate = tokio::select! {
            g = wait => g,
            _ = closing.wait_for(|c| *c) => Gate::Abandon,
        };
        if gate == Gate::Go {
            restore.prev = None;
        } else {
            tracing::info!(model = %m.name, version, "staged version abandoned by the cluster");
        }
        gate
    }

    /// First load of a model: newest checkpoint of its chain, later deltas, WAL replay.
    async fn load_model(&self, m: &Arc<Model>) -> Result<()> {
        let _versions = m.versions.lock().await;
        if m.view.load().is_some() {
            return Ok(());
        }
        m.runtime.lock().state = "loading";
        let shape = self.shape(&m.name).await?;
        let (lineage, _, _, _) = self.read_lineage(&m.name).await?;
        m.runtime.lock().newest = lineage.tip();
        m.runtime.lock().empty = lineage.chain.is_empty();
        let Some(newest) = lineage.chain.len().checked_sub(1) else {
            return Err(EngineError::not_found(format!(
                "model {} has no committed full version to serve; publish one",
                m.name
            )));
        };
        // In a cluster a first load reaches the version the cluster serves; later versions are
        // staged behind the coordinator's gate like any other switch.
        let tip = self
            .coordinator()
            .and_then(|c| c.ceiling(&m.name))
            .and_then(|v| lineage.position(v))
            .unwrap_or(newest);
        let held = self.placement(&shape)?;
        let checkpoints = self.repo().checkpoints(&m.name).await.map_err(|e| {
            EngineError::repository(format!("listing checkpoints of model {}", m.name), e)
        })?;
        let records = match m.wal.get() {
            Some(_) => self.read_wal(&m.name).await?,
            None => {
                let (w, records) = Wal::open(&self.wal_dir(&m.name), self.inner.config.wal_sync)?;
                let _ = m.wal.set(w);
                records
            }
        };
        let started = Instant::now();
        m.runtime.lock().loading_shards = match held.as_deref() {
            Some(h) => h.list(),
            None => (0..shape.shards).collect(),
        };
        let built = self
            .build_checked(
                m,
                &shape,
                &lineage,
                tip,
                &checkpoints,
                &records,
                held.as_deref(),
            )
            .await;
        m.runtime.lock().loading_shards.clear();
        let built = match built {
            Ok(b) => b,
            Err(e) => {
                m.progress_end();
                return Err(e);
            }
        };
        let mut undo = m.write.lock().await;
        undo.entries = built.undo.into();
        m.publish(Arc::new(View::plain(
            shape,
            Arc::new(built.tables),
            built.version,
            held,
        )));
        self.enforce_undo_budget(m, &mut undo);
        drop(undo);
        {
            let mut rt = m.runtime.lock();
            rt.state = "serving";
            rt.last_error = None;
        }
        tracing::info!(
            model = %m.name,
            version = built.version,
            from = %built.detail,
            seconds = started.elapsed().as_secs_f64(),
            "model loaded"
        );
        Ok(())
    }

    fn enforce_undo_budget(&self, m: &Model, undo: &mut UndoLog) {
        let others: u64 = self
            .inner
            .models
            .load()
            .values()
            .filter(|o| o.name != m.name)
            .map(|o| o.undo_bytes.load(Ordering::Relaxed))
            .sum();
        let budget = self.inner.config.undo_budget_bytes;
        let mut mine = undo.bytes();
        while others + mine > budget && !undo.entries.is_empty() {
            if let Some(e) = undo.entries.pop_front() {
                tracing::info!(model = %m.name, version = e.version, "undo record dropped (budget)");
            }
            mine = undo.bytes();
        }
        m.undo_bytes.store(mine, Ordering::Relaxed);
    }

    /// True when every configured model serves a version.
    pub fn is_ready(&self) -> bool {
        let models = self.inner.models.load();
        // When serving every model of the repository, one created but never published does not
        // hold the node back; a model named in the configuration does.
        let all = self.inner.config.models.is_none();
        !models.is_empty()
            && models
                .values()
                .all(|m| m.view.load().is_some() || (all && m.runtime.lock().empty))
    }

    /// Makes the background watcher ([`Engine::spawn_background`]) run a pass now instead of
    /// waiting for `poll_interval`: a cluster agent calls it when the placement or the
    /// cluster's serving version changes. A wake during a pass makes another pass follow it.
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// A counter bumped every time any model's view changes (loaded, staged, flipped, rolled
    /// back, shard set changed, failed): a cluster agent republishes its readiness report on
    /// each change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// What this node holds and can serve, per model, for the cluster's readiness reports.
    pub fn cluster_report(&self) -> Vec<ModelReport> {
        self.inner
            .models
            .load()
            .values()
            .map(|m| model_report(m))
            .collect()
    }

    /// One watcher pass: picks up new models (when serving every model), loads models not yet
    /// loaded, follows rollbacks decided elsewhere, applies new versions of the served chain.
    ///
    /// The models' passes run concurrently: one waiting for its coordinator's gate does not hold
    /// the others back (the call returns when every pass is done).
    pub async fn poll_repository(&self) -> Result<()> {
        self.refresh_models().await?;
        let models: Vec<Arc<Model>> = self.inner.models.load().values().cloned().collect();
        let results =
            futures::future::join_all(models.iter().map(|m| self.poll_model_logged(m))).await;
        match results.into_iter().flatten().next() {
            Some(e) if e.kind() == ErrorKind::Unavailable => Err(e),
            _ => Ok(()),
        }
    }

    /// One model's pass; its error (kept for the caller) is logged.
    async fn poll_model_logged(&self, m: &Arc<Model>) -> Option<EngineError> {
        let e = self.poll_model(m).await.err()?;
        tracing::warn!(model = %m.name, error = %e, "repository poll failed");
        Some(e)
    }

    /// Adds the repository's new models when serving every model.
    async fn refresh_models(&self) -> Result<()> {
        if self.inner.config.models.is_none() {
            let names = self.repo().list_models().await.map_err(|e| {
                EngineError::repository(format!("listing models in {}", self.repo().uri()), e)
            })?;
            let _adding = self.inner.adding.lock();
            let current = self.inner.models.load();
            if names.iter().any(|n| !current.contains_key(n)) {
                let mut next = (**current).clone();
                for n in names {
                    next.entry(n.clone())
                        .or_insert_with(|| Arc::new(Model::new(n, self.inner.changes.clone())));
                }
                self.inner.models.store(Arc::new(next));
            }
        }
        Ok(())
    }

    async fn poll_model(&self, m: &Arc<Model>) -> Result<()> {
        if m.view.load().is_none() {
            // A failed first load is retried on every pass: the repository may have been fixed.
            if let Err(e) = self.load_model(m).await {
                m.fail(None, e.to_string());
                return Err(e);
            }
            return Ok(());
        }
        let _versions = m.versions.lock().await;
        let (lineage, _, _, history) = self.read_lineage(&m.name).await?;
        m.runtime.lock().newest = lineage.tip();
        if !lineage.skipped.is_empty() {
            tracing::debug!(model = %m.name, skipped = ?lineage.skipped, "deltas off the served chain are not applied");
        }
        let Some(serving) = m.serving() else {
            return Ok(());
        };
        // A rollback decided by another node (or the CLI through another node).
        if lineage.is_dead(serving) {
            let to = history
                .iter()
                .rev()
                .filter(|r| r.event == EVENT_ROLLED_BACK)
                .filter_map(|r| r.from_version.map(|f| (r.version, f)))
                .find(|&(to, from)| serving > to && serving <= from)
                .map(|(to, _)| to);
            if let Some(mut to) = to {
                // The target may itself have been rolled back over since.
                while lineage.is_dead(to) {
                    match lineage.chain.iter().rev().find(|c| c.version < to) {
                        Some(c) => to = c.version,
                        None => break,
                    }
                }
                tracing::info!(model = %m.name, from = serving, to, "following a rollback recorded in the repository");
                if self
                    .rollback_locked(m, &lineage, serving, to)
                    .await?
                    .is_none()
                {
                    // Abandoned by the cluster: the next pass stages it again if still wanted.
                    return Ok(());
                }
                self.secure_rollback(m, &lineage, to).await?;
            }
        }
        if let Err(e) = self.follow_placement(m, &lineage).await {
            m.fail(None, e.to_string());
            return Err(e);
        }
        let failed = m.runtime.lock().failed.clone();
        loop {
            let Some(serving) = m.serving() else {
                return Ok(());
            };
            let next = match lineage.position(serving) {
                Some(p) => lineage.chain.get(p + 1),
                // Not in the chain: a newer full version started a new one.
                None => lineage.chain.first().filter(|f| f.version > serving),
            };
            let Some(next) = next else { return Ok(()) };
            if failed.contains(&next.version) {
                return Ok(());
            }
            let outcome = match next.kind {
                VersionKind::Delta => self.apply_delta(m, next).await,
                _ => self.apply_full(m, &lineage, next).await,
            };
            match outcome {
                Ok(Switch::Done) => self.record_served(m, &history, next, serving).await,
                Ok(Switch::Abandoned) => return Ok(()),
                Err(e) => {
                    m.stage_bytes.store(0, Ordering::Relaxed);
                    m.runtime.lock().staged = None;
                    m.progress_end();
                    m.fail(Some(next.version), e.to_string());
                    return Err(e);
                }
            }
        }
    }

    /// Rebuilds the model for the shards the coordinator places on this node when they differ
    /// from the ones its view holds: the same build as a first load, at the version served now,
    /// while the current view keeps serving; then a swap (same version, so no gate). The caller
    /// holds the versions lock.
    async fn follow_placement(&self, m: &Arc<Model>, lineage: &Lineage) -> Result<()> {
        if self.coordinator().is_none() {
            return Ok(());
        }
        let view = self.serving_view(m)?;
        let want = self.placement(&view.shape)?;
        if want.as_deref() == view.held.as_deref() {
            return Ok(());
        }
        // A node that held nothing of the model (new, or drained and placed again) builds at the
        // version the cluster serves, not at what it loaded while holding nothing (which may be
        // newer, and then no client could use it until the cluster switched).
        let holds_nothing = view.held.as_deref().is_some_and(|h| h.list().is_empty());
        let serving = self
            .coordinator()
            .filter(|_| holds_nothing)
            .and_then(|c| c.ceiling(&m.name))
            .filter(|c| lineage.position(*c).is_some())
            .unwrap_or(view.default);
        let Some(pos) = lineage.position(serving) else {
            // Serving a version off the chain (a newer full version started a new one): the
            // switch to it builds for the new placement.
            tracing::debug!(model = %m.name, serving, "placement changed; waiting for the switch to the served chain");
            return Ok(());
        };
        let all = |h: Option<&ShardSet>| match h {
            Some(h) => h.list(),
            None => (0..view.shape.shards).collect::<Vec<u32>>(),
        };
        let before = all(view.held.as_deref());
        m.runtime.lock().loading_shards = all(want.as_deref())
            .into_iter()
            .filter(|s| !before.contains(s))
            .collect();
        m.changed();
        let result = self.rebuild_held(m, &view, lineage, pos, want).await;
        m.runtime.lock().loading_shards.clear();
        m.progress_end();
        m.changed();
        result
    }

    async fn rebuild_held(
        &self,
        m: &Arc<Model>,
        view: &Arc<View>,
        lineage: &Lineage,
        pos: usize,
        held: Option<Arc<ShardSet>>,
    ) -> Result<()> {
        let started = Instant::now();
        let serving = lineage.chain[pos].version;
        let wal = m.wal.get().ok_or_else(|| {
            EngineError::internal(format!(
                "model {} serves without a write-ahead log; restart the node",
                m.name
            ))
        })?;
        let checkpoints = self.repo().checkpoints(&m.name).await.map_err(|e| {
            EngineError::repository(format!("listing checkpoints of model {}", m.name), e)
        })?;
        // Online writes go on during the build: it replays the log up to `seen`, and the swap
        // below replays what came after, under the write lock, so none is lost or applied twice.
        let seen = wal.last_sequence();
        wal.wait_durable(seen).await?;
        let records: Vec<_> = self
            .read_wal(&m.name)
            .await?
            .into_iter()
            .filter(|r| r.seq <= seen)
            .collect();
        let built = self
            .build_checked(
                m,
                &view.shape,
                lineage,
                pos,
                &checkpoints,
                &records,
                held.as_deref(),
            )
            .await?;
        let mut undo_log = m.write.lock().await;
        let last = wal.last_sequence();
        if last > seen {
            wal.wait_durable(last).await?;
            let late: Vec<_> = self
                .read_wal(&m.name)
                .await?
                .into_iter()
                .filter(|r| r.seq > seen && r.seq <= last)
                .collect();
            let undo = built
                .undo
                .last()
                .filter(|u| u.version == serving)
                .map(|u| u.rows.clone());
            loader::replay(
                &view.shape,
                &built.tables,
                undo.as_deref(),
                &late,
                serving,
                0,
                &m.name,
                held.as_deref(),
            )?;
        }
        undo_log.entries = built.undo.into();
        let described = held
            .as_deref()
            .map(|h| h.describe())
            .unwrap_or_else(|| "all".to_string());
        m.publish(Arc::new(View::plain(
            view.shape.clone(),
            Arc::new(built.tables),
            serving,
            held,
        )));
        self.enforce_undo_budget(m, &mut undo_log);
        drop(undo_log);
        tracing::info!(
            model = %m.name,
            version = serving,
            shards = %described,
            seconds = started.elapsed().as_secs_f64(),
            "model rebuilt for a new shard placement"
        );
        Ok(())
    }

    async fn record_served(&self, m: &Model, history: &[HistoryRecord], v: &Manifest, from: u64) {
        let already = history
            .iter()
            .rev()
            .take_while(|r| r.event != EVENT_ROLLED_BACK)
            .any(|r| r.event == EVENT_SERVED && r.version == v.version);
        if already {
            return;
        }
        let detail = match v.parent {
            Some(p) => format!("{} (parent {p})", v.kind),
            None => v.kind.to_string(),
        };
        let rec = HistoryRecord {
            seq: 0,
            time: now_rfc3339(),
            event: EVENT_SERVED.into(),
            version: v.version,
            from_version: Some(from),
            node: self.inner.config.node_id.clone(),
            detail,
        };
        if let Err(e) = self.repo().append_history(&m.name, &rec).await {
            tracing::warn!(model = %m.name, version = v.version, error = %e, "could not record a served version in the history");
        }
    }

    /// Applies delta `d` (child of the serving version): stage, gate (in a cluster), flip, merge
    /// with undo records.
    async fn apply_delta(&self, m: &Arc<Model>, d: &Manifest) -> Result<Switch> {
        let view = self.serving_view(m)?;
        let from = view.default;
        let started = Instant::now();
        self.check_memory(&m.name, d.version, {
            let rows: Vec<u64> = view
                .shape
                .tables
                .iter()
                .map(|t| d.table(&t.name).map(|x| x.rows + x.deletes).unwrap_or(0))
                .collect();
            view.shape
                .tables
                .iter()
                .zip(rows)
                .map(|(t, r)| 3 * table_bytes_estimate(r, t.row_bytes + 1))
                .sum()
        })?;
        m.progress_start(d.version, d.rows, d.bytes());
        let stage =
            Arc::new(read_delta(self.repo(), m, &view.shape, d, view.held.as_deref()).await?);
        m.progress_end();
        m.stage_bytes.store(stage.bytes(), Ordering::Relaxed);
        m.runtime.lock().staged = Some(d.version);
        // Staged: both versions readable, the old one by default.
        let staged = Arc::new(view.with(
            from,
            vec![
                (from, Source::Base),
                (d.version, Source::Overlay(stage.clone())),
            ],
        ));
        if self.coordinator().is_some() {
            // Online writes go on while the gate is closed: they change the base tables under
            // both readable versions, as between staging and flipping without a coordinator.
            if self
                .stage_and_gate(m, &view, staged.clone(), d.version)
                .await
                == Gate::Abandon
            {
                return Ok(Switch::Abandoned);
            }
        } else {
            m.publish(staged.clone());
        }
        let mut undo_log = m.write.lock().await;
        let tables = view.tables.clone();
        let (undo, tables) = {
            let stage = stage.clone();
            tokio::task::spawn_blocking(move || (capture_undo(&tables, &stage), tables))
                .await
                .map_err(|e| {
                    EngineError::internal(format!(
                        "capturing undo records of version {}: {e}",
                        d.version
                    ))
                })?
        };
        let undo = Arc::new(undo);
        // Flip: the new version is the default; the old one stays readable through its undo
        // record while the merge changes the base tables.
        let flipped = Arc::new(view.with(
            d.version,
            vec![
                (d.version, Source::Overlay(stage.clone())),
                (from, Source::Overlay(undo.clone())),
            ],
        ));
        m.publish(flipped.clone());
        // Readers of the earlier views read the base tables without an overlay for the keys the
        // merge changes: they must be done before it starts.
        drain_readers(&[&view, &staged]).await;
        drop(staged);
        {
            let stage = stage.clone();
            tokio::task::spawn_blocking(move || merge(&tables, &stage))
                .await
                .map_err(|e| {
                    EngineError::internal(format!("merging version {}: {e}", d.version))
                })?;
        }
        m.publish(Arc::new(
            view.with(d.version, vec![(d.version, Source::Base)]),
        ));
        // Readers of the old version through its undo record finish before the base tables
        // change again (online writes, the next merge).
        drain_readers(&[&flipped]).await;
        m.stage_bytes.store(0, Ordering::Relaxed);
        m.runtime.lock().staged = None;
        // The undo log is a contiguous run of the chain ending at the serving version.
        if undo_log.entries.back().is_some_and(|e| e.version != from) {
            undo_log.entries.clear();
        }
        undo_log.entries.push_back(UndoEntry {
            version: d.version,
            parent: from,
            rows: undo,
        });
        self.enforce_undo_budget(m, &mut undo_log);
        drop(undo_log);
        tracing::info!(
            model = %m.name,
            version = d.version,
            parent = from,
            rows = d.rows,
            seconds = started.elapsed().as_secs_f64(),
            "delta applied"
        );
        Ok(Switch::Done)
    }

    /// Replaces the serving state by a newer full version (loaded beside it, staged behind the
    /// gate in a cluster, then swapped).
    async fn apply_full(&self, m: &Arc<Model>, lineage: &Lineage, f: &Manifest) -> Result<Switch> {
        let view = self.serving_view(m)?;
        let pos = lineage.position(f.version).ok_or_else(|| {
            EngineError::internal(format!("version {} is not in the chain", f.version))
        })?;
        let shape = self.shape(&m.name).await?;
        let held = self.placement(&shape)?;
        self.check_memory(
            &m.name,
            f.version,
            build_estimate(&shape, &lineage.chain[..=pos], f, held.as_deref()),
        )?;
        let built = loader::build(
            self.repo(),
            m,
            &shape,
            lineage,
            pos,
            &[],
            &[],
            held.as_deref(),
        )
        .await?;
        let tables = Arc::new(built.tables);
        if self
            .stage_beside(m, &view, &shape, &held, &tables, f.version)
            .await
            == Gate::Abandon
        {
            return Ok(Switch::Abandoned);
        }
        let mut undo = m.write.lock().await;
        undo.entries = built.undo.into();
        m.publish(Arc::new(View::plain(shape, tables, built.version, held)));
        self.enforce_undo_budget(m, &mut undo);
        tracing::info!(model = %m.name, version = f.version, replaced = view.default, "full version loaded");
        Ok(Switch::Done)
    }

    /// Stages `version`, built into `tables` beside the serving ones, and waits for the gate.
    /// It is readable when pinned while staged if the serving view can read it: same shape and
    /// same held shards (a new model.json or placement makes it visible only at the swap).
    async fn stage_beside(
        &self,
        m: &Model,
        view: &Arc<View>,
        shape: &Shape,
        held: &Option<Arc<ShardSet>>,
        tables: &Arc<Tables>,
        version: u64,
    ) -> Gate {
        if self.coordinator().is_none() {
            return Gate::Go;
        }
        let mut readable = vec![(view.default, Source::Base)];
        if same_layout(&view.shape, shape) && view.held.as_deref() == held.as_deref() {
            readable.push((version, Source::Tables(tables.clone())));
        }
        m.stage_bytes
            .store(tables.held_bytes(held.as_deref()), Ordering::Relaxed);
        let staged = Arc::new(view.with(view.default, readable));
        let gate = self.stage_and_gate(m, view, staged, version).await;
        m.stage_bytes.store(0, Ordering::Relaxed);
        m.runtime.lock().staged = None;
        gate
    }

    /// Rolls the model back to `to`, an earlier version of its served chain: instantly from undo
    /// records when they cover every version after `to`, else by rebuilding `to` from the
    /// newest checkpoint at or before it plus deltas, in the background while the current
    /// version serves. The decision is recorded in the repository's history first, so every
    /// node and a restarted one serve the same.
    pub async fn rollback(&self, model: &str, to: u64) -> Result<RollbackReport> {
        let m = self.model(model)?;
        let started = Instant::now();
        let _versions = m.versions.lock().await;
        let from = self.serving_view(&m)?.default;
        if to >= from {
            return Err(EngineError::invalid(format!(
                "model {model} serves version {from}; a rollback goes to an earlier version of its \
                 history, not to {to}"
            )));
        }
        let (current, committed, _, history) = self.read_lineage(model).await?;
        let rec = HistoryRecord {
            seq: 0,
            time: now_rfc3339(),
            event: EVENT_ROLLED_BACK.into(),
            version: to,
            from_version: Some(from),
            node: self.inner.config.node_id.clone(),
            detail: String::new(),
        };
        // The chain as it will be once the rollback is recorded: `to` must be on it (this also
        // allows rolling back across a newer full version, which started a new chain).
        let lineage = {
            let mut h = history;
            h.push(rec.clone());
            Lineage::compute(&committed, &h)
        };
        if current.position(from).is_none() || lineage.position(to).is_none() {
            let chain: Vec<String> = current
                .chain
                .iter()
                .map(|c| c.version.to_string())
                .collect();
            return Err(EngineError::precondition(format!(
                "version {to} of model {model} is not an earlier version of what it serves ({from}; \
                 served chain: {}); choose an earlier version of that history",
                chain.join(", ")
            )));
        }
        let method = self.plan_rollback(&m, &lineage, from, to).await?;
        let rec = HistoryRecord {
            detail: format!("method {method}"),
            ..rec
        };
        self.repo().append_history(model, &rec).await.map_err(|e| {
            EngineError::repository(
                format!("recording the rollback of model {model} to {to}"),
                e,
            )
        })?;
        let Some(method) = self.rollback_locked(&m, &lineage, from, to).await? else {
            return Err(EngineError::precondition(format!(
                "the rollback of model {model} from {from} to {to} is recorded, but the cluster \
                 abandoned the switch on this node; it still serves {from} and follows the \
                 recorded rollback when the cluster switches"
            )));
        };
        m.runtime.lock().newest = lineage.tip();
        self.secure_rollback(&m, &lineage, to).await?;
        Ok(RollbackReport {
            model: model.to_string(),
            from,
            to,
            method: method.to_string(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// How a rollback from `from` to `to` will run: "undo" when the undo log holds a contiguous
    /// run of records from `to` up to `from`, else "rebuild" — refused when the rebuild would
    /// silently lose online writes the WAL no longer holds.
    async fn plan_rollback(
        &self,
        m: &Model,
        lineage: &Lineage,
        from: u64,
        to: u64,
    ) -> Result<&'static str> {
        if undo_run(&*m.write.lock().await, from, to).is_some() {
            return Ok("undo");
        }
        if let Some(base) = self.log_gap(m, lineage, to).await? {
            return Err(EngineError::precondition(format!(
                "rolling model {} back to {to} means rebuilding it from {base}, but online writes \
                 made after that were already truncated from the write-ahead log by a later \
                 checkpoint; roll back to a version at or after the oldest retained checkpoint, \
                 or keep more checkpoints (checkpoint_retention)",
                m.name
            )));
        }
        Ok("rebuild")
    }

    /// When a rebuild of `to` (at restart or for a rollback) would start from a checkpoint or
    /// full version older than the oldest record the WAL still holds, names that starting
    /// point: the log alone can then not reproduce the online writes of `to`.
    async fn log_gap(&self, m: &Model, lineage: &Lineage, to: u64) -> Result<Option<String>> {
        let Some(wal) = m.wal.get() else {
            return Ok(None);
        };
        let pos = lineage.position(to).unwrap_or(0);
        let checkpoints = self.repo().checkpoints(&m.name).await.map_err(|e| {
            EngineError::repository(format!("listing checkpoints of model {}", m.name), e)
        })?;
        let base = loader::pick_checkpoint(lineage, pos, &checkpoints);
        let base_seq = base.and_then(|(c, _)| c.wal_sequence).unwrap_or(0);
        if wal.first_sequence() <= base_seq + 1 {
            return Ok(None);
        }
        Ok(Some(match base {
            Some((c, _)) => format!("checkpoint {}", c.version),
            None => format!(
                "full version {}",
                lineage.chain.first().map(|c| c.version).unwrap_or(0)
            ),
        }))
    }

    /// After a rollback: when a restart could not rebuild the new state from the repository
    /// and the WAL (a checkpoint truncated writes the target still holds), a checkpoint of the
    /// new state makes it durable. The caller holds the versions lock.
    async fn secure_rollback(&self, m: &Arc<Model>, lineage: &Lineage, to: u64) -> Result<()> {
        if self.log_gap(m, lineage, to).await?.is_some() {
            if let Some(held) = self.serving_view(m)?.held.as_deref() {
                tracing::warn!(model = %m.name, version = to, held = %held.describe(), "the rolled-back state needs a checkpoint to survive a restart, but this node holds only some shards; a node holding every shard must write it");
                return Ok(());
            }
            tracing::info!(model = %m.name, version = to, "checkpointing the rolled-back state: the WAL alone cannot rebuild it");
            self.checkpoint_locked(m).await?;
        }
        Ok(())
    }

    /// Switches the serving state from `from` to `to`; the caller holds the versions lock.
    /// Returns the method, or `None` when the cluster abandoned the staged switch.
    async fn rollback_locked(
        &self,
        m: &Arc<Model>,
        lineage: &Lineage,
        from: u64,
        to: u64,
    ) -> Result<Option<&'static str>> {
        let view = self.serving_view(m)?;
        let records: Option<Vec<_>> = {
            let undo_log = m.write.lock().await;
            undo_run(&undo_log, from, to).map(|count| {
                undo_log
                    .entries
                    .iter()
                    .rev()
                    .take(count)
                    .map(|e| e.rows.clone())
                    .collect()
            })
        };
        if let Some(records) = records {
            return self.rollback_undo(m, &view, records, from, to).await;
        }
        // Rebuild in the background of this task; the current version keeps serving.
        let pos = lineage.position(to).ok_or_else(|| {
            EngineError::precondition(format!(
                "version {to} of model {} is not in its served history",
                m.name
            ))
        })?;
        let checkpoints = self.repo().checkpoints(&m.name).await.map_err(|e| {
            EngineError::repository(format!("listing checkpoints of model {}", m.name), e)
        })?;
        let records = self.read_wal(&m.name).await?;
        let held = view.held.clone();
        let built = self
            .build_checked(
                m,
                &view.shape,
                lineage,
                pos,
                &checkpoints,
                &records,
                held.as_deref(),
            )
            .await?;
        let tables = Arc::new(built.tables);
        if self
            .stage_beside(m, &view, &view.shape, &held, &tables, to)
            .await
            == Gate::Abandon
        {
            return Ok(None);
        }
        let mut undo_log = m.write.lock().await;
        undo_log.entries = built.undo.into();
        m.publish(Arc::new(View::plain(
            view.shape.clone(),
            tables,
            built.version,
            held,
        )));
        self.enforce_undo_budget(m, &mut undo_log);
        tracing::info!(model = %m.name, from, to, method = "rebuild", from_state = %built.detail, "rolled back");
        Ok(Some("rebuild"))
    }

    /// A rollback from the newest undo records (`records`, newest first, from `from` back to
    /// `to`): stage `to` through their composition (in a cluster), gate, flip, merge.
    async fn rollback_undo(
        &self,
        m: &Arc<Model>,
        view: &Arc<View>,
        records: Vec<Arc<RowSet>>,
        from: u64,
        to: u64,
    ) -> Result<Option<&'static str>> {
        let compose = |records: Vec<Arc<RowSet>>| async move {
            tokio::task::spawn_blocking(move || compose_undo(&records))
                .await
                .map_err(|e| EngineError::internal(format!("composing the rollback to {to}: {e}")))
        };
        let count = records.len();
        let mut staged = None;
        if self.coordinator().is_some() {
            let rb = Arc::new(compose(records.clone()).await?);
            m.stage_bytes.store(rb.bytes(), Ordering::Relaxed);
            let view_staged =
                Arc::new(view.with(from, vec![(from, Source::Base), (to, Source::Overlay(rb))]));
            if self.stage_and_gate(m, view, view_staged.clone(), to).await == Gate::Abandon {
                return Ok(None);
            }
            staged = Some(view_staged);
        }
        let mut undo_log = m.write.lock().await;
        // Composed again under the write lock: online writes made while the gate was closed
        // added rows to the records.
        let rb = compose(records).await?;
        let tables = view.tables.clone();
        let (rb, forward, tables) = tokio::task::spawn_blocking(move || {
            let forward = capture_undo(&tables, &rb);
            (rb, forward, tables)
        })
        .await
        .map_err(|e| EngineError::internal(format!("composing the rollback to {to}: {e}")))?;
        let rb = Arc::new(rb);
        m.stage_bytes
            .store(rb.bytes() + forward.bytes(), Ordering::Relaxed);
        let flipped = Arc::new(view.with(
            to,
            vec![
                (to, Source::Overlay(rb.clone())),
                (from, Source::Overlay(Arc::new(forward))),
            ],
        ));
        m.publish(flipped.clone());
        // Readers of the earlier views read the base tables without an overlay for the keys
        // the merge changes: they must be done before it starts.
        match &staged {
            Some(st) => drain_readers(&[view, st]).await,
            None => drain_readers(&[view]).await,
        }
        drop(staged);
        {
            let rb = rb.clone();
            tokio::task::spawn_blocking(move || merge(&tables, &rb))
                .await
                .map_err(|e| EngineError::internal(format!("merging the rollback to {to}: {e}")))?;
        }
        m.publish(Arc::new(view.with(to, vec![(to, Source::Base)])));
        drain_readers(&[&flipped]).await;
        m.stage_bytes.store(0, Ordering::Relaxed);
        m.runtime.lock().staged = None;
        let keep = undo_log.entries.len() - count;
        undo_log.entries.truncate(keep);
        self.enforce_undo_budget(m, &mut undo_log);
        tracing::info!(model = %m.name, from, to, method = "undo", "rolled back");
        Ok(Some("undo"))
    }

    /// Spawns the watcher: polls the repository every `poll_interval` (or at once after
    /// [`Engine::wake`]) and writes scheduled checkpoints, until `shutdown` turns true.
    ///
    /// Each model's pass runs as a task of its own, and a model whose previous pass is still
    /// running (waiting for its coordinator's gate, or loading) is skipped, so no model holds
    /// the others back. At shutdown, passes waiting for a gate drop it (their staged version
    /// is abandoned); the watcher ends once every pass has.
    pub fn spawn_background(
        &self,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let engine = self.clone();
        tokio::spawn(async move {
            let every = engine.inner.config.poll_interval;
            let mut passes: BTreeMap<String, tokio::task::JoinHandle<()>> = BTreeMap::new();
            loop {
                if *shutdown.borrow() {
                    break;
                }
                if let Err(e) = engine.refresh_models().await {
                    tracing::warn!(error = %e, "repository watcher pass failed");
                }
                let models: Vec<Arc<Model>> =
                    engine.inner.models.load().values().cloned().collect();
                for m in models {
                    if passes.get(&m.name).is_some_and(|p| !p.is_finished()) {
                        continue;
                    }
                    let e = engine.clone();
                    let name = m.name.clone();
                    passes.insert(
                        name,
                        tokio::spawn(async move {
                            e.poll_model_logged(&m).await;
                            e.scheduled_checkpoint(&m).await;
                        }),
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = engine.inner.wake.notified() => {}
                    changed = shutdown.changed() => {
                        if changed.is_err() { break; }
                    }
                }
            }
            engine.inner.closing.send_replace(true);
            for (_, pass) in passes {
                let _ = pass.await;
            }
        })
    }

    /// Writes a checkpoint of `m` when one is due. Nodes holding only some shards of a model
    /// skip it: a checkpoint needs every shard.
    async fn scheduled_checkpoint(&self, m: &Arc<Model>) {
        let Some(every) = self.inner.config.checkpoint_interval else {
            return;
        };
        let Some(view) = m.view.load_full() else {
            return;
        };
        if let Some(held) = view.held.as_deref() {
            tracing::debug!(model = %m.name, held = %held.describe(), "no scheduled checkpoint: this node holds only some shards");
            return;
        }
        drop(view);
        let due = {
            let mut rt = m.runtime.lock();
            let last = *rt.last_checkpoint.get_or_insert_with(Instant::now);
            last.elapsed() >= every
        };
        if due && let Err(e) = self.checkpoint(&m.name).await {
            tracing::warn!(model = %m.name, error = %e, "scheduled checkpoint failed");
        }
    }

    /// Table facts a client needs: dim, dtype, missing-key policy, optimizer.
    pub fn table_meta(&self, model: &str, table: &str) -> Result<TableMeta> {
        let m = self.model(model)?;
        let view = self.serving_view(&m)?;
        let t = view.shape.table_index(table)?;
        let ts = &view.shape.tables[t];
        Ok(TableMeta {
            dim: ts.dim as u32,
            dtype: ts.dtype.clone(),
            missing: ts.missing_name().to_string(),
            optimizer: ts.optimizer.map(|o| o.name().to_string()),
        })
    }

    /// Rows of `keys` in one table. `out.len() == keys.len() * dim`, `found.len() == keys.len()`.
    /// Missing keys get the table's policy (zeros or the deterministic per-key init); with
    /// policy `error` the first missing key is a `NotFound` error. Returns the version served.
    pub fn lookup(
        &self,
        model: &str,
        table: &str,
        keys: &[u64],
        version: Option<u64>,
        out: &mut [f32],
        found: &mut [bool],
    ) -> Result<u64> {
        self.lookup_into(model, table, keys, version, RowsOut::Floats(out), found)
    }

    /// Like [`Engine::lookup`], but appends the rows to `out` as packed little-endian f32 (the
    /// wire format: `keys.len() * dim * 4` bytes), without a float buffer in between: an f32
    /// row is copied from the table once. For servers that send the rows on as bytes.
    pub fn lookup_packed(
        &self,
        model: &str,
        table: &str,
        keys: &[u64],
        version: Option<u64>,
        out: &mut Vec<u8>,
        found: &mut [bool],
    ) -> Result<u64> {
        let start = out.len();
        let result = self.lookup_into(model, table, keys, version, RowsOut::Packed(out), found);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn lookup_into(
        &self,
        model: &str,
        table: &str,
        keys: &[u64],
        version: Option<u64>,
        out: RowsOut<'_>,
        found: &mut [bool],
    ) -> Result<u64> {
        // Borrowed, not cloned: no shared reference count is touched per request.
        let models = self.inner.models.load();
        let m = models.get(model).ok_or_else(|| self.unknown_model(model))?;
        let guard = m.view.load();
        let view = guard.as_ref().ok_or_else(|| {
            self.serving_view(m).err().unwrap_or_else(|| {
                EngineError::new(ErrorKind::Unavailable, format!("model {model} is loading"))
            })
        })?;
        let (v, tables, overlay) = view.resolve(version)?;
        let t = view.shape.table_index(table)?;
        view.read(tables, overlay, t, keys, out, found)?;
        Ok(v)
    }

    /// Several tables of one model, all at one version (loaded once for the whole request).
    pub fn multi_lookup(
        &self,
        model: &str,
        version: Option<u64>,
        tables: &mut [TableLookup<'_>],
    ) -> Result<u64> {
        // Borrowed, not cloned: no shared reference count is touched per request.
        let models = self.inner.models.load();
        let m = models.get(model).ok_or_else(|| self.unknown_model(model))?;
        let guard = m.view.load();
        let view = guard.as_ref().ok_or_else(|| {
            self.serving_view(m).err().unwrap_or_else(|| {
                EngineError::new(ErrorKind::Unavailable, format!("model {model} is loading"))
            })
        })?;
        let (v, base, overlay) = view.resolve(version)?;
        for tl in tables.iter_mut() {
            let t = view.shape.table_index(tl.table)?;
            view.read(base, overlay, t, tl.keys, RowsOut::Floats(tl.out), tl.found)?;
        }
        Ok(v)
    }

    /// Inserts or overwrites rows; durable (in the WAL) when it returns.
    pub async fn upsert(
        &self,
        model: &str,
        table: &str,
        keys: &[u64],
        values: &[f32],
    ) -> Result<WriteAck> {
        self.write(model, table, WalOp::Upsert, keys, values).await
    }

    /// Removes rows; durable when it returns.
    pub async fn delete(&self, model: &str, table: &str, keys: &[u64]) -> Result<WriteAck> {
        self.write(model, table, WalOp::Delete, keys, &[]).await
    }

    /// Applies gradients with the table's optimizer; durable when it returns. A key without a
    /// row starts from the table's missing-key row (zeros for policy `error`).
    pub async fn push(
        &self,
        model: &str,
        table: &str,
        keys: &[u64],
        gradients: &[f32],
    ) -> Result<WriteAck> {
        self.write(model, table, WalOp::Push, keys, gradients).await
    }

    async fn write(
        &self,
        model: &str,
        table: &str,
        op: WalOp,
        keys: &[u64],
        values: &[f32],
    ) -> Result<WriteAck> {
        let m = self.model(model)?;
        let view = self.serving_view(&m)?;
        let t = view.shape.table_index(table)?;
        let ts = &view.shape.tables[t];
        let expect = if op == WalOp::Delete {
            0
        } else {
            keys.len() * ts.dim
        };
        if values.len() != expect {
            return Err(EngineError::invalid(format!(
                "model {model} table {table}: {} keys need {expect} values (dim {}), got {}",
                keys.len(),
                ts.dim,
                values.len()
            )));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(EngineError::invalid(format!(
                "model {model} table {table}: value {} for key {} is not finite; send finite numbers",
                values[i],
                keys[i / ts.dim.max(1)]
            )));
        }
        if op == WalOp::Push && ts.optimizer.is_none() {
            return Err(EngineError::precondition(format!(
                "model {model} table {table} has no optimizer; set one in model.json to accept \
                 pushes, or use upsert"
            )));
        }
        let wal = m.wal.get().ok_or_else(|| {
            EngineError::new(
                ErrorKind::Unavailable,
                format!("model {model} is still loading; retry"),
            )
        })?;
        // A merge waits for every holder of an older view before it changes the base tables;
        // holding one while waiting for the write lock it holds would deadlock.
        drop(view);
        let undo_log = m.write.lock().await;
        // The view may have changed while waiting (a merge finished, a rebuild swapped tables,
        // the held shards changed).
        let view = self.serving_view(&m)?;
        if let Some(held) = view.held.as_deref() {
            let shards = view.shape.shards;
            if let Some(&key) = keys
                .iter()
                .find(|&&k| !held.contains(shard_of(k, shards) as usize))
            {
                let shard = shard_of(key, shards) as usize;
                return Err(not_held(model, shard, key, held));
            }
        }
        let version = view.default;
        let seq = wal.append(version, op, table, keys, values)?;
        let undo = undo_log
            .entries
            .back()
            .filter(|e| e.version == version)
            .map(|e| e.rows.clone());
        let mut scratch = WriteScratch::default();
        apply_write(
            &view.shape,
            &view.tables,
            undo.as_deref(),
            t,
            op,
            keys,
            values,
            view.held.as_deref(),
            &mut scratch,
        )?;
        if undo.is_some() {
            m.undo_bytes.store(undo_log.bytes(), Ordering::Relaxed);
        }
        drop(undo_log);
        drop(view);
        wal.wait_durable(seq).await?;
        Ok(WriteAck {
            version,
            rows: keys.len() as u64,
            sequence: seq,
        })
    }

    /// Writes a checkpoint of the serving version (with the online writes applied so far) into
    /// the repository, then truncates the WAL it covers and applies the retention policy.
    /// Lookups go on; online writes and version changes wait until the tables are copied.
    pub async fn checkpoint(&self, model: &str) -> Result<CheckpointReport> {
        let m = self.model(model)?;
        let _versions = m.versions.lock().await;
        self.checkpoint_locked(&m).await
    }

    /// A checkpoint; the caller holds the model's versions lock.
    async fn checkpoint_locked(&self, m: &Arc<Model>) -> Result<CheckpointReport> {
        let model = m.name.as_str();
        let started = Instant::now();
        let view = self.serving_view(m)?;
        if let Some(held) = view.held.as_deref() {
            return Err(EngineError::precondition(format!(
                "model {model}: this node holds shards {} of {}; a checkpoint needs every shard, \
                 ask a node that holds them all",
                held.describe(),
                view.shape.shards
            )));
        }
        let version = view.default;
        let undo_log = m.write.lock().await;
        let seq = m.wal.get().map(|w| w.last_sequence()).unwrap_or(0);
        let what = || format!("writing checkpoint {version} of model {model}");
        // A second checkpoint of the same version (more online writes since) replaces the
        // first when it commits; until then the first stays usable.
        let mut writer = self
            .repo()
            .checkpoint_writer(model, version)
            .await
            .map_err(|e| EngineError::repository(what(), e))?;
        let mut rows = 0u64;
        for (t, ts) in view.shape.tables.iter().enumerate() {
            for (s, table) in view.tables.shards[t].iter().enumerate() {
                let (keys, data) = loader::snapshot_shard(table);
                rows += keys.len() as u64;
                let written = writer
                    .write_segment(
                        &ts.name,
                        s as u32,
                        &ts.dtype,
                        ts.dim as u32,
                        ts.row_bytes as u32,
                        &keys,
                        &data,
                    )
                    .await;
                if let Err(e) = written {
                    writer.abort().await;
                    return Err(EngineError::repository(what(), e));
                }
            }
        }
        let manifest = writer
            .commit(Some(seq))
            .await
            .map_err(|e| EngineError::repository(what(), e))?;
        drop(undo_log);
        m.runtime.lock().last_checkpoint = Some(Instant::now());
        let floor = self.apply_retention(model).await?;
        // The log keeps every record newer than the oldest retained checkpoint, so a rebuild
        // from any retained checkpoint (a rollback beyond the undo window) still finds the
        // online writes made after it.
        if let Some(w) = m.wal.get() {
            w.truncate_through(floor.min(seq)).await?;
        }
        let report = CheckpointReport {
            model: model.to_string(),
            version,
            rows,
            bytes: manifest.bytes(),
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(
            model,
            version,
            rows,
            bytes = report.bytes,
            seconds = report.seconds,
            "checkpoint written"
        );
        Ok(report)
    }

    /// Deletes checkpoints beyond the retention count (those of rolled-back versions first,
    /// then the oldest); returns the lowest WAL sequence a retained checkpoint includes.
    async fn apply_retention(&self, model: &str) -> Result<u64> {
        let keep = self.inner.config.checkpoint_retention.max(1);
        let mut all = self.repo().checkpoints(model).await.map_err(|e| {
            EngineError::repository(format!("listing checkpoints of model {model}"), e)
        })?;
        let (lineage, _, _, _) = self.read_lineage(model).await?;
        all.sort_by_key(|c| (!lineage.is_dead(c.version), c.version));
        let excess = all.len().saturating_sub(keep);
        for c in &all[..excess] {
            self.repo()
                .delete_checkpoint(model, c.version)
                .await
                .map_err(|e| {
                    EngineError::repository(
                        format!("deleting checkpoint {} of model {model}", c.version),
                        e,
                    )
                })?;
        }
        Ok(all[excess..]
            .iter()
            .map(|c| c.wal_sequence.unwrap_or(0))
            .min()
            .unwrap_or(0))
    }

    /// The models of this node.
    pub fn models(&self) -> Vec<ModelInfo> {
        self.inner
            .models
            .load()
            .values()
            .map(|m| {
                let view = m.view.load_full();
                ModelInfo {
                    name: m.name.clone(),
                    shards: view.as_ref().map(|v| v.shape.shards).unwrap_or(0),
                    tables: view.as_ref().map(|v| table_statuses(v)).unwrap_or_default(),
                    serving_version: view.as_ref().map(|v| v.default),
                }
            })
            .collect()
    }

    /// The node's state, for `/status`, metrics and `hopps status`.
    pub fn status(&self) -> NodeStatus {
        let models: Vec<ModelStatus> = self
            .inner
            .models
            .load()
            .values()
            .map(|m| {
                let view = m.view.load_full();
                let rt = m.runtime.lock();
                let tables = view.as_ref().map(|v| table_statuses(v)).unwrap_or_default();
                let rows = tables.iter().map(|t| t.rows).sum();
                let cap: u64 = tables.iter().map(|t| t.capacity).sum();
                ModelStatus {
                    name: m.name.clone(),
                    state: if view.is_some() { "serving" } else { rt.state }.to_string(),
                    serving_version: view.as_ref().map(|v| v.default),
                    newest_version: rt.newest,
                    load: rt.load.clone(),
                    last_error: rt.last_error.clone(),
                    load_failures: m.load_failures.load(Ordering::Relaxed),
                    rows,
                    memory_bytes: m.memory_bytes(),
                    undo_bytes: m.undo_bytes.load(Ordering::Relaxed),
                    load_factor: if cap > 0 {
                        rows as f64 / cap as f64
                    } else {
                        0.0
                    },
                    tables,
                    held_shards: view.as_ref().and_then(|v| v.held_list()),
                }
            })
            .collect();
        NodeStatus {
            node_id: self.inner.config.node_id.clone(),
            ready: self.is_ready(),
            memory_used: models.iter().map(|m| m.memory_bytes).sum(),
            memory_limit: self.inner.config.memory_limit,
            wal_bytes: self
                .inner
                .models
                .load()
                .values()
                .filter_map(|m| m.wal.get().map(|w| w.bytes()))
                .sum(),
            models,
        }
    }

    /// Every version of a model in the repository with its state on this node.
    pub async fn versions(&self, model: &str) -> Result<Vec<VersionState>> {
        let m = self.model(model)?;
        let (lineage, committed, aborted, _) = self.read_lineage(model).await?;
        let view = m.view.load_full();
        let serving = view.as_ref().map(|v| v.default);
        let (staged, failed) = {
            let rt = m.runtime.lock();
            (rt.staged, rt.failed.clone())
        };
        let mut out: Vec<VersionState> = committed
            .iter()
            .map(|c| {
                let state = if Some(c.version) == serving {
                    "serving"
                } else if Some(c.version) == staged {
                    "staged"
                } else if lineage.is_dead(c.version) {
                    "rolled_back"
                } else if failed.contains(&c.version) {
                    "failed"
                } else {
                    "committed"
                };
                VersionState {
                    version: c.version,
                    kind: c.kind.to_string(),
                    parent: c.parent,
                    rows: c.rows,
                    created: c.created.clone(),
                    source: c.source.clone(),
                    state: state.to_string(),
                }
            })
            .collect();
        out.extend(aborted.iter().map(|&v| VersionState {
            version: v,
            kind: String::new(),
            parent: None,
            rows: 0,
            created: String::new(),
            source: String::new(),
            state: "aborted".to_string(),
        }));
        out.sort_by_key(|v| v.version);
        Ok(out)
    }

    /// The model's append-only history of served versions and rollbacks.
    pub async fn history(&self, model: &str) -> Result<Vec<HistoryEvent>> {
        self.model(model)?;
        let records = self.repo().history(model).await.map_err(|e| {
            EngineError::repository(format!("reading the history of model {model}"), e)
        })?;
        Ok(records
            .into_iter()
            .map(|r| HistoryEvent {
                time: r.time,
                event: r.event,
                version: r.version,
                from_version: r.from_version,
                detail: if r.node.is_empty() {
                    r.detail
                } else {
                    format!("{} (node {})", r.detail, r.node)
                },
            })
            .collect())
    }
}

/// How many of the newest undo records undo `from` back to `to`: they must form a contiguous
/// run whose oldest record's parent is `to` and whose newest record is `from`.
fn undo_run(log: &UndoLog, from: u64, to: u64) -> Option<usize> {
    let start = log.entries.iter().rposition(|e| e.parent == to)?;
    let run: Vec<&UndoEntry> = log.entries.iter().skip(start).collect();
    let contiguous = run.windows(2).all(|w| w[1].parent == w[0].version);
    (contiguous && run.last().is_some_and(|e| e.version == from)).then_some(run.len())
}

/// Waits until no reader holds any of `views` (the caller's own handles excepted). A view
/// replaced in the model's `ArcSwap` has its outstanding read guards counted in its strong
/// count (arc-swap pays their debts on replacement), so a count of 1 means only the caller has it.
async fn drain_readers(views: &[&Arc<View>]) {
    while views.iter().any(|v| Arc::strong_count(v) > 1) {
        tokio::time::sleep(std::time::Duration::from_micros(50)).await;
    }
}

fn model_report(m: &Model) -> ModelReport {
    let view = m.view.load_full();
    let rt = m.runtime.lock();
    let (shards, held, rows) = match view.as_ref() {
        Some(v) => (
            v.shape.shards,
            v.held_list()
                .unwrap_or_else(|| (0..v.shape.shards).collect()),
            table_statuses(v).iter().map(|t| t.rows).sum(),
        ),
        None => (0, Vec::new(), 0),
    };
    let mut readable: Vec<u64> = view
        .as_ref()
        .map(|v| v.readable.iter().map(|(r, _)| *r).collect())
        .unwrap_or_default();
    readable.sort_unstable();
    ModelReport {
        model: m.name.clone(),
        shards,
        held,
        serving: view.as_ref().map(|v| v.default),
        readable,
        staged: rt.staged,
        state: if view.is_some() { "serving" } else { rt.state }.to_string(),
        loading: rt.loading_shards.clone(),
        memory_bytes: m.memory_bytes(),
        table_bytes: m.table_bytes(),
        rows,
        error: rt.last_error.clone(),
    }
}

/// Per-table figures over the shards this node holds.
fn table_statuses(view: &View) -> Vec<TableStatus> {
    view.shape
        .tables
        .iter()
        .enumerate()
        .map(|(t, ts)| {
            let shards: Vec<&hopps_table::Table> = view.tables.shards[t]
                .iter()
                .enumerate()
                .filter(|(s, _)| holds(view.held.as_deref(), *s))
                .map(|(_, table)| table)
                .collect();
            let rows: u64 = shards.iter().map(|s| s.len() as u64).sum();
            let capacity: u64 = shards.iter().map(|s| s.capacity() as u64).sum();
            TableStatus {
                name: ts.name.clone(),
                dim: ts.dim as u32,
                dtype: ts.dtype.clone(),
                missing: ts.missing_name().to_string(),
                optimizer: ts.optimizer.map(|o| o.name().to_string()),
                rows,
                capacity,
                load_factor: if capacity > 0 {
                    rows as f64 / capacity as f64
                } else {
                    0.0
                },
                bytes: shards.iter().map(|s| s.bytes_used() as u64).sum(),
            }
        })
        .collect()
}

/// How a version change ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Switch {
    /// The new version is the default.
    Done,
    /// The cluster abandoned the staged version; the old one still serves.
    Abandoned,
}

/// Puts a model's previous view back unless disarmed (`prev` taken): a staged version the
/// cluster abandoned, or a pass dropped while it waited for the gate.
struct Unstage<'a> {
    m: &'a Model,
    prev: Option<Arc<View>>,
}

impl Drop for Unstage<'_> {
    fn drop(&mut self) {
        if let Some(prev) = self.prev.take() {
            self.m.stage_bytes.store(0, Ordering::Relaxed);
            self.m.runtime.lock().staged = None;
            self.m.publish(prev);
        }
    }
}

/// Whether tables built for `b` can be read through a view of shape `a`.
fn same_layout(a: &Shape, b: &Shape) -> bool {
    a.shards == b.shards
        && a.tables.len() == b.tables.len()
        && a.tables.iter().zip(&b.tables).all(|(x, y)| {
            x.name == y.name && x.dim == y.dim && x.row_bytes == y.row_bytes && x.dtype == y.dtype
        })
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync + Clone>() {}
    is::<Engine>();
}
