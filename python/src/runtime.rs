//! The module's tokio runtime: one per process, shared by every `Client` and `publish`.
//!
//! Calls from Python block the calling thread (with the GIL released) on a future run by this
//! runtime. The runtime's worker threads do not survive `fork()`: a child process (a PyTorch
//! DataLoader worker, a multiprocessing pool) that inherited the parent's runtime must not use
//! it. So the runtime is remembered with the process id that built it; a child builds its own,
//! and a `Client` connected in the parent refuses to work in the child with an error that says
//! to connect again there.

use std::sync::{Arc, Mutex};

use tokio::runtime::Runtime;

use crate::error::Failure;

/// The runtime and the process that built it.
struct ProcessRuntime {
    pid: u32,
    runtime: Arc<Runtime>,
}

static RUNTIME: Mutex<Option<ProcessRuntime>> = Mutex::new(None);

/// Worker threads of the runtime: network I/O and decoding only, so a few are plenty.
fn worker_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 4)
}

/// The runtime of this process, built on first use (and again in a forked child).
pub(crate) fn runtime() -> Result<(u32, Arc<Runtime>), Failure> {
    let pid = std::process::id();
    // A panic while holding this lock cannot leave the Option half-written, so a poisoned lock
    // is still consistent.
    let mut slot = RUNTIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(current) = slot.as_ref()
        && current.pid == pid
    {
        return Ok((pid, Arc::clone(&current.runtime)));
    }
    if let Some(inherited) = slot.take() {
        // Built by the parent before fork: its threads do not exist here. Dropping it would
        // wait for them forever, so the reference is leaked on purpose.
        std::mem::forget(inherited.runtime);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads())
        .thread_name("hopps-python")
        .enable_all()
        .build()
        .map_err(|err| Failure::Runtime(err.to_string()))?;
    let runtime = Arc::new(runtime);
    *slot = Some(ProcessRuntime {
        pid,
        runtime: Arc::clone(&runtime),
    });
    Ok((pid, runtime))
}

/// Fails when an object made in process `owner` is used in another (a forked child).
pub(crate) fn check_same_process(owner: u32, what: &str) -> Result<(), Failure> {
    let pid = std::process::id();
    if pid == owner {
        Ok(())
    } else {
        Err(Failure::Forked(format!(
            "{what} was created in process {owner} and cannot be used in forked process {pid}: \
             its connection belongs to the parent; create a new hopps.Client in this process \
             (for example in a DataLoader's worker_init_fn)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_is_shared_within_a_process() {
        let (pid, a) = runtime().expect("runtime");
        let (_, b) = runtime().expect("runtime");
        assert_eq!(pid, std::process::id());
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.block_on(async { 2 + 2 }), 4);
    }

    #[test]
    fn another_process_is_refused_with_advice() {
        check_same_process(std::process::id(), "this client").expect("same process");
        let err = check_same_process(std::process::id().wrapping_add(1), "hopps.Client(\"h:1\")")
            .expect_err("other process");
        let message = err.to_string();
        assert!(message.contains("hopps.Client(\"h:1\")"), "{message}");
        assert!(message.contains("create a new hopps.Client"), "{message}");
    }
}
