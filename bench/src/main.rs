//! hopps-bench: the benchmark harness of hopps. Benchmarks are not tests: each suite runs hopps
//! and its baselines in the same process run, interleaved, and reports medians and ratios.
//!
//! `cargo run --release -p hopps-bench -- <suite> [flags] [--json] [--quick]`
//!
//! Adding a suite: write `bench/src/<suite>.rs` with a `clap::Args` struct and a `run` function,
//! then add its `mod` line, its `Suite` variant and its match arm below.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

mod table;

// Side-by-side suites against Redis, and what they share.
mod all;
mod dataset;
mod load;
mod lookup;
mod measure;
mod memory;
mod report;
mod resp;
mod rollback;
mod servers;
mod wal;
mod workload;
// Checkpoint (.hps) and Parquet loads from a model repository (hopps-format).
mod checkpoint;
// Cluster mode: fan-out cost and time to re-replicate, with real etcd and hopps nodes.
mod cluster;

/// Flags every suite understands.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// One JSON object per measured configuration on stdout (progress goes to stderr).
    pub json: bool,
    /// A small, fast run that proves the suite works (CI); its figures are not the goals'.
    pub quick: bool,
}

#[derive(Debug, Parser)]
#[command(name = "hopps-bench", about = "Benchmarks of hopps against baselines")]
struct Cli {
    /// Print one JSON object per measured configuration.
    #[arg(long, global = true)]
    json: bool,
    /// Small sizes and few rounds: proves the harness works in well under a minute.
    #[arg(long, global = true)]
    quick: bool,
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Debug, Subcommand)]
enum Suite {
    /// The Hopscotch table against hashbrown and against raw memory reads.
    Table(table::TableArgs),
    /// hopps Lookup against Redis MGET over loopback: keys/s, p50/p99 latency.
    Lookup(lookup::LookupArgs),
    /// Bytes per key in hopps and in Redis: accounting and process RSS.
    Memory(memory::MemoryArgs),
    /// Full loads and delta applies, hopps against Redis MSET.
    Load(load::LoadArgs),
    /// Rolling a bad delta back, hopps against rewriting old rows in Redis.
    Rollback(rollback::RollbackArgs),
    /// Durable online writes: hopps' write-ahead log against Redis with appendfsync always.
    Wal(wal::WalArgs),
    /// Every suite, one after the other.
    All(all::AllArgs),
    /// Loading a .hps checkpoint into tables against memcpy; Parquet loads of the same rows.
    Checkpoint(checkpoint::CheckpointArgs),
    /// Cluster mode: fan-out cost (3 nodes against one) and time from a node loss to full
    /// replication, with real etcd.
    Cluster(cluster::ClusterArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let options = Options {
        json: cli.json,
        quick: cli.quick,
    };
    match cli.suite {
        Suite::Table(args) => table::run(&args, options),
        Suite::Lookup(args) => lookup::run(&args, options),
        Suite::Memory(args) => memory::run(&args, options),
        Suite::Load(args) => load::run(&args, options),
        Suite::Rollback(args) => rollback::run(&args, options),
        Suite::Wal(args) => wal::run(&args, options),
        Suite::Checkpoint(args) => checkpoint::run(&args, options),
        Suite::Cluster(args) => cluster::run(&args, options),
        Suite::All(args) => all::run(&args, options),
    }
}
