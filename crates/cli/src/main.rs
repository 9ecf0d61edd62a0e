//! `hopps`: the command-line interface of hopps (noun-verb).
//!
//! Commands that work offline against a model repository live in `repo_cmd`; commands that
//! talk to a running server (or run one) live in `server_cmd`; commands about a cluster (nodes,
//! drains, per-model replicas, the cluster forms of status/lookup/rollback) in `cluster_cmd`;
//! the guided tour in `demo`.
#![forbid(unsafe_code)]

mod cluster_cmd;
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
    /// Look rows up from a running server (--addr) or a cluster (--etcd --cluster).
    Lookup(server_cmd::LookupArgs),
    /// Show the status of a running server (--addr) or a whole cluster (--etcd --cluster).
    Status(server_cmd::StatusArgs),
    /// Nodes of a cluster: list, drain, undrain.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
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
    /// Set how many replicas each shard of a model gets in a cluster.
    Replicas(cluster_cmd::ReplicasArgs),
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// The cluster's nodes: address, liveness, drains, memory, shards placed and held.
    List(cluster_cmd::NodeListArgs),
    /// Move every replica off a node, then release it (waits for the release by default).
    Drain(cluster_cmd::NodeDrainArgs),
    /// Cancel a drain: the node may receive shards again.
    Undrain(cluster_cmd::NodeUndrainArgs),
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
    // Commands that print and exit end quietly when their reader goes away (`hopps status |
    // head`), as Unix tools do, instead of panicking on the write. Commands that serve keep
    // Rust's default (SIGPIPE ignored): a peer closing a socket is an error to handle there.
    if !matches!(
        cli.command,
        Command::Serve(_) | Command::Demo(_) | Command::Bench { .. }
    ) {
        sigpipe::reset();
    }
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
        Command::Node { command } => match command {
            NodeCommand::List(args) => cluster_cmd::node_list(args).await,
            NodeCommand::Drain(args) => cluster_cmd::node_drain(args).await,
            NodeCommand::Undrain(args) => cluster_cmd::node_undrain(args).await,
        },
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
            ModelCommand::Replicas(args) => cluster_cmd::model_replicas(args).await,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("hopps").chain(args.iter().copied()))
    }

    fn rejected(args: &[&str]) -> String {
        match parse(args) {
            Ok(cli) => panic!("hopps {args:?} should not parse, got {cli:?}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn client_commands_take_an_address_or_a_cluster_but_not_both() {
        for command in [
            &["lookup", "--model", "m", "--table", "t", "1"][..],
            &["status"][..],
            &["model", "rollback", "--model", "m", "--to", "1"][..],
        ] {
            let with = |extra: &[&'static str]| {
                let mut v: Vec<&str> = command.to_vec();
                v.extend_from_slice(extra);
                v
            };
            parse(&with(&["--addr", "h:1"])).expect("--addr alone");
            parse(&with(&["--etcd", "e:2379", "--cluster", "prod"])).expect("--etcd --cluster");
            parse(command).expect("neither: the default address");
            let err = rejected(&with(&[
                "--addr",
                "h:1",
                "--etcd",
                "e:2379",
                "--cluster",
                "c",
            ]));
            assert!(err.contains("--addr") && err.contains("--etcd"), "{err}");
            let err = rejected(&with(&["--etcd", "e:2379"]));
            assert!(err.contains("--cluster"), "{err}");
            let err = rejected(&with(&["--cluster", "prod"]));
            assert!(err.contains("--etcd"), "{err}");
        }
    }

    #[test]
    fn node_commands_parse() {
        let cli = parse(&[
            "node",
            "drain",
            "n2",
            "--etcd",
            "e:1",
            "--cluster",
            "c",
            "--timeout",
            "30s",
            "--no-wait",
            "--json",
        ])
        .expect("drain");
        assert!(matches!(
            cli.command,
            Command::Node {
                command: NodeCommand::Drain(_)
            }
        ));
        parse(&["node", "list", "--etcd", "e:1", "--cluster", "c", "--json"]).expect("list");
        parse(&["node", "undrain", "n2", "--etcd", "e:1", "--cluster", "c"]).expect("undrain");
        let err = rejected(&["node", "drain", "--etcd", "e:1", "--cluster", "c"]);
        assert!(err.contains("<ID>"), "{err}");
        let err = rejected(&[
            "node",
            "drain",
            "n2",
            "--etcd",
            "e:1",
            "--cluster",
            "c",
            "--timeout",
            "soon",
        ]);
        assert!(err.contains("--timeout"), "{err}");
    }

    #[test]
    fn model_replicas_needs_at_least_one() {
        let base = [
            "model",
            "replicas",
            "--etcd",
            "e:1",
            "--cluster",
            "c",
            "--model",
            "ctr",
        ];
        let mut ok = base.to_vec();
        ok.extend(["--replicas", "3"]);
        parse(&ok).expect("3 replicas");
        let mut zero = base.to_vec();
        zero.extend(["--replicas", "0"]);
        let err = rejected(&zero);
        assert!(err.contains("--replicas") && err.contains('0'), "{err}");
    }
}
