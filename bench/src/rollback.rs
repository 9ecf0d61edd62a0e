//! `rollback`: undoing bad increments.
//!
//! A node serves a full version and then `rounds` deltas, each rewriting its own tenth of the
//! rows (at most); each round rolls the newest remaining delta back (V_k → V_{k-1}) and checks
//! that its rows read their old values. Redis has no versions: its side of a round is the best
//! a team can do there, rewriting the old rows of the same keys, which the client must have
//! kept. Passes with the default undo budget (instant rollback from undo records) and with no
//! undo budget (rebuild from the repository while the current version serves).

use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::dataset::{
    DataSet, HoppsRepo, REDIS_PREFIX, RowChange, TABLE, check_rows, f32s_of, redis_load,
    redis_write,
};
use crate::measure::{Spread, interleave};
use crate::report::Record;
use crate::servers::{HoppsServer, RedisServer, Sides, SystemArgs, runtime};

const MODEL: &str = "rollback";

/// Flags of the rollback suite.
#[derive(Debug, Clone, clap::Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub system: SystemArgs,
    /// Rows of the full version. Default: 1000000 (20000 with --quick).
    #[arg(long)]
    pub keys: Option<u64>,
    /// Row dim. Default: 16.
    #[arg(long)]
    pub dim: Option<u32>,
    /// Undo budgets of the passes (`default` keeps the node's default). Default: default,0.
    #[arg(long, value_delimiter = ',')]
    pub undo_budgets: Option<Vec<String>>,
}

/// Runs the suite as `hopps-bench rollback` does.
pub fn run(args: &RollbackArgs, options: crate::Options) -> anyhow::Result<()> {
    let sides = Sides::resolve(&args.system, options.quick, options.json)?;
    runtime()?.block_on(suite(&sides, args))
}

pub async fn suite(sides: &Sides, args: &RollbackArgs) -> anyhow::Result<()> {
    let rows = args
        .keys
        .unwrap_or(if sides.quick { 20_000 } else { 1_000_000 });
    let dim = args.dim.unwrap_or(16);
    anyhow::ensure!(dim > 0, "--dim must be at least 1");
    let deltas = sides.rounds as u64;
    anyhow::ensure!(
        rows >= deltas * 10,
        "--keys {rows} is too few for {deltas} deltas; give at least {}",
        deltas * 10
    );
    let budgets = args
        .undo_budgets
        .clone()
        .unwrap_or_else(|| vec!["default".to_string(), "0".to_string()]);
    for budget in budgets {
        let data = DataSet {
            seed: 0x400 + u64::from(dim),
            rows,
            dim,
        };
        let record = pass(sides, &data, &budget).await?;
        sides.report.emit(&record);
    }
    Ok(())
}

/// Delta `j` (from 1) rewrites rows `(j-1)*count..j*count` at generation `j`.
fn window(count: u64, j: u64) -> RowChange {
    RowChange {
        first: (j - 1) * count,
        count,
        generation: j as u32,
    }
}

async fn pass(sides: &Sides, data: &DataSet, budget: &str) -> anyhow::Result<Record> {
    let k = sides.rounds as u64;
    let count = (data.rows / 10).min(data.rows / k);
    sides.report.note(&format!(
        "rollback: undo budget {budget}: a full version of {} rows and {k} deltas of {count} rows",
        data.rows
    ));
    let repo_dir = tempfile::Builder::new()
        .prefix("hopps-bench-repo-")
        .tempdir()?;
    let node_dir = tempfile::Builder::new()
        .prefix("hopps-bench-node-")
        .tempdir()?;
    let repo = HoppsRepo::open(repo_dir.path(), MODEL, sides.shards).await?;
    let mut versions = vec![repo.publish_full(data).await?];
    let mut options = sides.hopps(repo_dir.path(), node_dir.path());
    if budget != "default" {
        options.extra_args = vec!["--undo-budget".to_string(), budget.to_string()];
    }
    let server = HoppsServer::start(&options).await?;
    let client = server.connect().await?;
    let redis = RedisServer::start(&sides.redis()).await?;
    let mut conn = redis.connect().await?;
    redis_load(&mut conn, data).await?;

    // Deltas arrive while the node serves, as in production: each leaves an undo record.
    for j in 1..=k {
        let change = window(count, j);
        let (version, _) = repo.publish_delta(data, change, None).await?;
        server
            .wait_serving(MODEL, version, Duration::from_secs(600))
            .await?;
        redis_write(&mut conn, data, change).await?;
        versions.push(version);
    }

    // Rows of window j probed after its rollback: the first and last few.
    let probe = |j: u64| -> Vec<u64> {
        let w = window(count, j);
        let n = w.count.min(8);
        (w.first..w.first + n)
            .chain(w.first + w.count - n..w.first + w.count)
            .collect()
    };
    let mut methods = Vec::new();
    let mut server_s = Vec::new();
    let (h, r) = interleave(
        sides.rounds,
        async |round| {
            let j = k - round as u64;
            let (from, to) = (versions[j as usize], versions[j as usize - 1]);
            let started = Instant::now();
            let report = client
                .rollback(MODEL, to)
                .await
                .with_context(|| format!("rolling model {MODEL:?} back from {from} to {to}"))?;
            let elapsed = started.elapsed().as_secs_f64();
            methods.push(report.method.clone());
            server_s.push(report.seconds);
            let rows = probe(j);
            let keys: Vec<u64> = rows.iter().map(|&i| data.key(i)).collect();
            let got = client.lookup(MODEL, TABLE, &keys).await?;
            anyhow::ensure!(
                got.version == to,
                "after rolling back to {to} the node serves {}",
                got.version
            );
            check_rows(data, &rows, &got.values, None, "hopps after a rollback")?;
            Ok(elapsed)
        },
        async |round| {
            let j = k - round as u64;
            let w = window(count, j);
            let started = Instant::now();
            redis_write(&mut conn, data, RowChange { generation: 0, ..w }).await?;
            let elapsed = started.elapsed().as_secs_f64();
            let rows = probe(j);
            let keys: Vec<u64> = rows.iter().map(|&i| data.key(i)).collect();
            let mut bytes = vec![0u8; keys.len() * data.dim as usize * 4];
            let mut found = vec![false; keys.len()];
            conn.mget_into(REDIS_PREFIX, &keys, &mut bytes, &mut found)
                .await?;
            let mut values = Vec::new();
            f32s_of(&bytes, &mut values);
            check_rows(data, &rows, &values, None, "redis after restoring old rows")?;
            Ok(elapsed)
        },
    )
    .await?;
    methods.sort();
    methods.dedup();
    let hopps = Spread::of(&h);
    let redis_s = Spread::of(&r);
    let mut rec = Record::new("rollback");
    rec.set("undo_budget", budget)
        .set("method", methods.join("+"))
        .set("dim", data.dim)
        .set("keys", data.rows)
        .set("delta_rows", count)
        .set("rounds", sides.rounds)
        .spread("hopps_seconds", hopps)
        .spread("hopps_server_seconds", Spread::of(&server_s))
        .spread("redis_seconds", redis_s)
        .ratio("seconds_ratio", hopps, redis_s);
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_disjoint() {
        let a = window(100, 1);
        let b = window(100, 2);
        assert_eq!((a.first, a.count, a.generation), (0, 100, 1));
        assert_eq!(b.first, a.first + a.count);
        assert_eq!(b.generation, 2);
    }
}
