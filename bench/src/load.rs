//! `load`: how fast new data becomes servable.
//!
//! - full: hopps starts on a repository holding a full version and answers ready (process start
//!   included, so the figure is what an operator waits for); Redis receives the same rows with
//!   pipelined `MSET`s of 1000 keys over one connection (how a team fills Redis).
//! - delta: a node serving version V and a Redis holding the same rows receive one delta each
//!   round: a tenth of the rows, 90% overwrites and 10% new keys. hopps' figure is commit → served
//!   (the node polls the repository every 10 ms, so up to 10 ms of it is the wait for the poll);
//!   Redis' is the `MSET` of the same rows. Publishing itself (a training job's work) is reported
//!   apart.

use std::time::{Duration, Instant};

use crate::dataset::{
    DataSet, HoppsRepo, REDIS_PREFIX, RowChange, TABLE, check_rows, f32s_of, redis_load,
    redis_write,
};
use crate::measure::{Spread, interleave};
use crate::report::Record;
use crate::servers::{HoppsServer, RedisServer, Sides, SystemArgs, runtime};

const MODEL: &str = "load";

/// Flags of the load suite.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    #[command(flatten)]
    pub system: SystemArgs,
    /// Rows of the full version. Default: 2000000 (50000 with --quick).
    #[arg(long)]
    pub keys: Option<u64>,
    /// Row dim. Default: 16.
    #[arg(long)]
    pub dim: Option<u32>,
}

/// Runs the suite as `hopps-bench load` does.
pub fn run(args: &LoadArgs, options: crate::Options) -> anyhow::Result<()> {
    let sides = Sides::resolve(&args.system, options.quick, options.json)?;
    runtime()?.block_on(suite(&sides, args))
}

pub async fn suite(sides: &Sides, args: &LoadArgs) -> anyhow::Result<()> {
    let rows = args
        .keys
        .unwrap_or(if sides.quick { 50_000 } else { 2_000_000 });
    let dim = args.dim.unwrap_or(16);
    anyhow::ensure!(
        rows >= 10 && dim > 0,
        "--keys must be at least 10 and --dim at least 1"
    );
    let data = DataSet {
        seed: 0x300 + u64::from(dim),
        rows,
        dim,
    };
    let repo_dir = tempfile::Builder::new()
        .prefix("hopps-bench-repo-")
        .tempdir()?;
    let repo = HoppsRepo::open(repo_dir.path(), MODEL, sides.shards).await?;
    sides
        .report
        .note(&format!("load: publishing {rows} rows of dim {dim}"));
    repo.publish_full(&data).await?;

    full(sides, &data, &repo).await?;
    delta(sides, &data, &repo).await
}

async fn full(sides: &Sides, data: &DataSet, repo: &HoppsRepo) -> anyhow::Result<()> {
    let redis = RedisServer::start(&sides.redis()).await?;
    let mut conn = redis.connect().await?;
    let repo_path = repo.dir.clone();
    let (h, r) = interleave(
        sides.rounds,
        async |_| {
            let node_dir = tempfile::Builder::new()
                .prefix("hopps-bench-node-")
                .tempdir()?;
            let server = HoppsServer::start(&sides.hopps(&repo_path, node_dir.path())).await?;
            Ok(server.ready_after.as_secs_f64())
        },
        async |_| {
            conn.flushall().await?;
            let started = Instant::now();
            redis_load(&mut conn, data).await?;
            Ok(started.elapsed().as_secs_f64())
        },
    )
    .await?;
    let rows = data.rows as f64;
    let hopps = Spread::of(&h.iter().map(|s| rows / s).collect::<Vec<_>>());
    let redis_rate = Spread::of(&r.iter().map(|s| rows / s).collect::<Vec<_>>());
    let mut rec = Record::new("load");
    rec.set("kind", "full")
        .set("dim", data.dim)
        .set("keys", data.rows)
        .set("rounds", sides.rounds)
        .spread("hopps_seconds", Spread::of(&h))
        .spread("redis_seconds", Spread::of(&r))
        .spread("hopps_rows_per_s", hopps)
        .spread("redis_rows_per_s", redis_rate)
        .ratio("rows_per_s_ratio", hopps, redis_rate);
    sides.report.emit(&rec);
    Ok(())
}

/// The `k`-th delta (k from 1): `count` rows ending 10% past the rows that exist after `k - 1`
/// deltas, so 90% overwrite existing rows and 10% are new.
pub fn sliding_change(data: &DataSet, count: u64, k: u32) -> RowChange {
    let new = (count / 10).max(1);
    let existing = data.rows + u64::from(k - 1) * new;
    RowChange {
        first: existing + new - count,
        count,
        generation: k,
    }
}

async fn delta(sides: &Sides, data: &DataSet, repo: &HoppsRepo) -> anyhow::Result<()> {
    let count = (data.rows / 10).max(10);
    let node_dir = tempfile::Builder::new()
        .prefix("hopps-bench-node-")
        .tempdir()?;
    let server = HoppsServer::start(&sides.hopps(&repo.dir, node_dir.path())).await?;
    let client = server.connect().await?;
    let redis = RedisServer::start(&sides.redis()).await?;
    let mut conn = redis.connect().await?;
    redis_load(&mut conn, data).await?;

    let mut publish_s = Vec::new();
    let (h, r) = interleave(
        sides.rounds,
        async |round| {
            let change = sliding_change(data, count, round as u32 + 1);
            let (version, publish) = repo.publish_delta(data, change, None).await?;
            publish_s.push(publish.as_secs_f64());
            let apply = server
                .wait_serving(MODEL, version, Duration::from_secs(600))
                .await?;
            // The last rows of the delta are new keys: served with the delta's values.
            let probe: Vec<u64> =
                (change.first + change.count - 10..change.first + change.count).collect();
            let keys: Vec<u64> = probe.iter().map(|&i| data.key(i)).collect();
            let got = client.lookup(MODEL, TABLE, &keys).await?;
            anyhow::ensure!(
                got.version >= version,
                "lookup served version {} < {version}",
                got.version
            );
            check_rows(
                data,
                &probe,
                &got.values,
                Some(change),
                "hopps after a delta",
            )?;
            Ok(apply.as_secs_f64())
        },
        async |round| {
            let change = sliding_change(data, count, round as u32 + 1);
            let started = Instant::now();
            redis_write(&mut conn, data, change).await?;
            let elapsed = started.elapsed().as_secs_f64();
            let probe: Vec<u64> =
                (change.first + change.count - 10..change.first + change.count).collect();
            let keys: Vec<u64> = probe.iter().map(|&i| data.key(i)).collect();
            let mut bytes = vec![0u8; keys.len() * data.dim as usize * 4];
            let mut found = vec![false; keys.len()];
            conn.mget_into(REDIS_PREFIX, &keys, &mut bytes, &mut found)
                .await?;
            let mut values = Vec::new();
            f32s_of(&bytes, &mut values);
            check_rows(data, &probe, &values, Some(change), "redis after a delta")?;
            Ok(elapsed)
        },
    )
    .await?;
    let n = count as f64;
    let hopps = Spread::of(&h.iter().map(|s| n / s).collect::<Vec<_>>());
    let redis_rate = Spread::of(&r.iter().map(|s| n / s).collect::<Vec<_>>());
    let mut rec = Record::new("load");
    rec.set("kind", "delta")
        .set("dim", data.dim)
        .set("keys", data.rows)
        .set("delta_rows", count)
        .set("rounds", sides.rounds)
        .spread("hopps_seconds", Spread::of(&h))
        .spread("redis_seconds", Spread::of(&r))
        .spread("hopps_rows_per_s", hopps)
        .spread("redis_rows_per_s", redis_rate)
        .ratio("rows_per_s_ratio", hopps, redis_rate)
        .spread("hopps_publish_seconds", Spread::of(&publish_s));
    sides.report.emit(&rec);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_deltas_overwrite_90_percent_and_add_10() {
        let data = DataSet {
            seed: 0,
            rows: 1000,
            dim: 1,
        };
        let c1 = sliding_change(&data, 100, 1);
        assert_eq!((c1.first, c1.count), (910, 100));
        assert_eq!(c1.first + c1.count - data.rows, 10, "10 new rows");
        let c2 = sliding_change(&data, 100, 2);
        assert_eq!(
            c2.first, 920,
            "the second delta starts where the rows now end, minus 90"
        );
        assert_eq!(c2.generation, 2);
    }
}
