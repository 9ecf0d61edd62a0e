//! What a cluster tells a node's engine: which shards of a model to hold, which version a first
//! load may reach, and when a staged version may become the default.
//!
//! The embedded default has no coordinator: the node holds every shard and a version becomes
//! the default as soon as it is applied. With one, every version change is two-phase: the node
//! stages the new version (readable when pinned, the old one still the default), tells the
//! coordinator through [`Coordinator::staged`], and flips only on [`Gate::Go`], so a fan-out
//! request that pins one version never mixes versions across nodes.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;

/// What a cluster tells a node's engine. The embedded default has none: every shard, versions
/// switch as soon as they are applied.
pub trait Coordinator: Send + Sync + 'static {
    /// Shards of `model` this node must hold; `None` = every shard.
    fn shards(&self, model: &str) -> Option<BTreeSet<u32>>;
    /// The highest version a first load (or a re-load for a new shard set) of `model` may
    /// reach: the version the cluster serves. `None` = the newest of the served chain.
    fn ceiling(&self, model: &str) -> Option<u64>;
    /// `version` of `model` is staged on this node (readable when pinned, not yet the default).
    /// The returned future resolves to `Gate::Go` once the node may make it the default, or
    /// `Gate::Abandon` if it should drop the staged version (it will be staged again on a later
    /// pass if still wanted). It is dropped when the engine shuts down.
    fn staged(
        &self,
        model: &str,
        version: u64,
    ) -> Pin<Box<dyn Future<Output = Gate> + Send + 'static>>;
}

/// The coordinator's answer to a staged version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Make the staged version the default.
    Go,
    /// Drop the staged version; keep serving the current one.
    Abandon,
}
