//! `hopps`: the command-line interface of hopps (noun-verb).
//!
//! Commands that work offline against a model repository live in `repo_cmd`; commands that
//! talk to a running server (or run one) live in `server_cmd`; the guided tour in `demo`.
#![forbid(unsafe_code)]

mod demo;
mod repo_cmd;
mod server_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// hopps: a parameter server for recommendation models.
#[derive(Debug, Parser)]
#[command(name = "hopps", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a hopps node: load models from a repository and serve them over gRPC.
    Serve(server_cmd::ServeArgs),
    /// Look rows up from a running server.
    Lookup(server_cmd::LookupArgs),
    /// Show the status of a running server.
    Status(server_cmd::StatusArgs),
    /// Models in a repository or on a server: publish, list, versions, rollback, ...
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Split unsharded training output into per-shard files and publish them.
    Shard(repo_cmd::ShardArgs),
    /// The whole story in one command: publish, serve, look up, apply deltas, roll back.
    Demo(demo::DemoArgs),
    /// Benchmarks against a running server.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Publish a full version or a delta from Parquet, npy or CSV files.
    Publish(repo_cmd::PublishArgs),
    /// List the models of a repository.
    List(repo_cmd::ListArgs),
    /// List the versions of a model (from a repository with --repo, or a server with --addr).
    Versions(VersionsArgs),
    /// Roll a served model back to an earlier version.
    Rollback(server_cmd::RollbackArgs),
    /// Show what a model served, and when: versions served and rollbacks.
    History(server_cmd::HistoryArgs),
    /// Write a checkpoint of the version a server serves.
    Checkpoint(server_cmd::CheckpointArgs),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Closed-loop lookup load against a server: keys/s and latency percentiles.
    Lookup(server_cmd::BenchLookupArgs),
}

/// `hopps model versions` reads either a repository or a server.
#[derive(Debug, clap::Args)]
struct VersionsArgs {
    /// Model repository URI (path, file://, s3://bucket/prefix, hdfs://host:port/path).
    #[arg(long, conflicts_with = "addr", required_unless_present = "addr")]
    repo: Option<String>,
    /// Address of a running server (host:port or http://host:port).
    #[arg(long)]
    addr: Option<String>,
    #[command(flatten)]
    storage: repo_cmd::StorageArgs,
    /// Model name.
    #[arg(long)]
    model: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => server_cmd::serve(args).await,
        Command::Lookup(args) => server_cmd::lookup(args).await,
        Command::Status(args) => server_cmd::status(args).await,
        Command::Shard(args) => repo_cmd::shard(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Bench { command } => match command {
            BenchCommand::Lookup(args) => server_cmd::bench_lookup(args).await,
        },
        Command::Model { command } => match command {
            ModelCommand::Publish(args) => repo_cmd::publish(args).await,
            ModelCommand::List(args) => repo_cmd::list(args).await,
            ModelCommand::Versions(args) => match (args.repo, args.addr) {
                (Some(repo), _) => {
                    repo_cmd::versions(&repo, &args.storage, &args.model, args.json).await
                }
                (None, Some(addr)) => server_cmd::versions(&addr, &args.model, args.json).await,
                (None, None) => {
                    anyhow::bail!("give --repo URI (a model repository) or --addr ADDR (a server)")
                }
            },
            ModelCommand::Rollback(args) => server_cmd::rollback(args).await,
            ModelCommand::History(args) => server_cmd::history(args).await,
            ModelCommand::Checkpoint(args) => server_cmd::checkpoint(args).await,
        },
    }
}
