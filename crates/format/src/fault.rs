//! A storage layer that injects faults into writes and deletes: failed, slow and partial
//! writes, failed closes. Tests wrap a real operator with it to show that a publish or a
//! checkpoint is all or nothing whatever step the storage fails at.
//!
//! ```no_run
//! # use hopps_format::fault::{Fault, FaultLayer};
//! # fn f(op: opendal::Operator) {
//! let faults = FaultLayer::new().rule("MANIFEST.json", 0, Fault::Fail);
//! let op = op.layer(faults.clone());
//! # }
//! ```

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opendal::raw::*;
use opendal::*;

/// What happens to a matching write.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Opening the writer fails; no byte reaches storage.
    Fail,
    /// The first write hands half of its bytes to storage, then fails.
    Partial,
    /// Every byte is written but closing the file fails.
    FailClose,
    /// Every write waits this long first (the storage is slow, not broken).
    Slow(Duration),
    /// Deleting a matching path fails (cleanup after an abort cannot finish).
    FailDelete,
}

/// One rule: the `(skip + 1)`-th and later operations on paths containing `path_contains`
/// get `fault`.
#[derive(Debug)]
pub struct FaultRule {
    pub path_contains: String,
    pub skip: u64,
    pub fault: Fault,
    seen: AtomicU64,
}

/// The layer. Clones share rules and counters.
#[derive(Debug, Clone, Default)]
pub struct FaultLayer {
    rules: Arc<Vec<FaultRule>>,
    injected: Arc<AtomicU64>,
}

impl FaultLayer {
    /// A layer with no rules (passes everything through).
    pub fn new() -> FaultLayer {
        FaultLayer::default()
    }

    /// Adds a rule; see [`FaultRule`].
    pub fn rule(self, path_contains: &str, skip: u64, fault: Fault) -> FaultLayer {
        let mut rules: Vec<FaultRule> = Arc::try_unwrap(self.rules).unwrap_or_else(|shared| {
            shared
                .iter()
                .map(|r| FaultRule {
                    path_contains: r.path_contains.clone(),
                    skip: r.skip,
                    fault: r.fault.clone(),
                    seen: AtomicU64::new(r.seen.load(Ordering::Relaxed)),
                })
                .collect()
        });
        rules.push(FaultRule {
            path_contains: path_contains.to_string(),
            skip,
            fault,
            seen: AtomicU64::new(0),
        });
        FaultLayer {
            rules: Arc::new(rules),
            injected: self.injected,
        }
    }

    /// How many faults were injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// The fault for an operation on `path`, counting it against the rules.
    fn fault_for(&self, path: &str, delete: bool) -> Option<Fault> {
        for r in self.rules.iter() {
            let is_delete_rule = r.fault == Fault::FailDelete;
            if is_delete_rule != delete || !path.contains(&r.path_contains) {
                continue;
            }
            let n = r.seen.fetch_add(1, Ordering::Relaxed);
            if n >= r.skip {
                self.injected.fetch_add(1, Ordering::Relaxed);
                return Some(r.fault.clone());
            }
        }
        None
    }
}

fn injected(what: &str, path: &str) -> Error {
    Error::new(ErrorKind::Unexpected, format!("injected fault: {what}"))
        .with_context("path", path)
        .set_permanent()
}

impl Layer for FaultLayer {
    fn apply_service(&self, inner: Servicer) -> Servicer {
        Arc::new(FaultService {
            inner,
            layer: self.clone(),
        })
    }
}

#[doc(hidden)]
#[derive(Debug)]
pub struct FaultService {
    inner: Servicer,
    layer: FaultLayer,
}

impl Service for FaultService {
    type Reader = oio::Reader;
    type Writer = FaultWriter;
    type Lister = oio::Lister;
    type Deleter = FaultDeleter;
    type Copier = oio::Copier;
    type Composer = oio::Composer;

    fn info(&self) -> ServiceInfo {
        self.inner.info()
    }

    fn capability(&self) -> Capability {
        self.inner.capability()
    }

    async fn create_dir(
        &self,
        ctx: &OperationContext,
        path: &str,
        args: OpCreateDir,
    ) -> Result<RpCreateDir> {
        self.inner.create_dir(ctx, path, args).await
    }

    async fn stat(&self, ctx: &OperationContext, path: &str, args: OpStat) -> Result<RpStat> {
        self.inner.stat(ctx, path, args).await
    }

    fn read(&self, ctx: &OperationContext, path: &str, args: OpRead) -> Result<Self::Reader> {
        self.inner.read(ctx, path, args)
    }

    fn write(&self, ctx: &OperationContext, path: &str, args: OpWrite) -> Result<Self::Writer> {
        let fault = self.layer.fault_for(path, false);
        if fault == Some(Fault::Fail) {
            return Err(injected("write refused", path));
        }
        let inner = self.inner.write(ctx, path, args)?;
        Ok(FaultWriter {
            inner,
            fault,
            path: path.to_string(),
            wrote: false,
        })
    }

    fn delete(&self, ctx: &OperationContext) -> Result<Self::Deleter> {
        Ok(FaultDeleter {
            inner: self.inner.delete(ctx)?,
            layer: self.layer.clone(),
        })
    }

    fn list(&self, ctx: &OperationContext, path: &str, args: OpList) -> Result<Self::Lister> {
        self.inner.list(ctx, path, args)
    }

    fn copy(
        &self,
        ctx: &OperationContext,
        from: &str,
        to: &str,
        args: OpCopy,
    ) -> Result<Self::Copier> {
        self.inner.copy(ctx, from, to, args)
    }

    async fn rename(
        &self,
        ctx: &OperationContext,
        from: &str,
        to: &str,
        args: OpRename,
    ) -> Result<RpRename> {
        self.inner.rename(ctx, from, to, args).await
    }

    async fn presign(
        &self,
        ctx: &OperationContext,
        path: &str,
        args: OpPresign,
    ) -> Result<RpPresign> {
        self.inner.presign(ctx, path, args).await
    }
}

#[doc(hidden)]
pub struct FaultWriter {
    inner: oio::Writer,
    fault: Option<Fault>,
    path: String,
    wrote: bool,
}

impl oio::Write for FaultWriter {
    async fn write(&mut self, bs: Buffer) -> Result<()> {
        match &self.fault {
            Some(Fault::Slow(d)) => tokio::time::sleep(*d).await,
            Some(Fault::Partial) if !self.wrote => {
                self.wrote = true;
                let half = bs.slice(0..bs.len() / 2);
                self.inner.write(half).await?;
                // Flush what reached the store so the partial file is really there.
                let _ = self.inner.close().await;
                return Err(injected("partial write", &self.path));
            }
            _ => {}
        }
        self.wrote = true;
        self.inner.write(bs).await
    }

    async fn close(&mut self) -> Result<Metadata> {
        match &self.fault {
            Some(Fault::FailClose) => Err(injected("close failed", &self.path)),
            Some(Fault::Partial) => Err(injected("partial write", &self.path)),
            _ => self.inner.close().await,
        }
    }

    async fn abort(&mut self) -> Result<()> {
        self.inner.abort().await
    }
}

#[doc(hidden)]
pub struct FaultDeleter {
    inner: oio::Deleter,
    layer: FaultLayer,
}

impl oio::Delete for FaultDeleter {
    async fn delete(&mut self, path: &str, args: OpDelete) -> Result<()> {
        if self.layer.fault_for(path, true).is_some() {
            return Err(injected("delete failed", path));
        }
        self.inner.delete(path, args).await
    }

    async fn close(&mut self) -> Result<()> {
        self.inner.close().await
    }
}
