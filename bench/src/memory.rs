//! `memory`: bytes per key of the same rows in hopps and in Redis.
//!
//! Two figures per side, because they answer different questions:
//! - accounting: what the system says it holds (hopps: the model's `memory_bytes` in status;
//!   Redis: growth of `used_memory` in `INFO memory`), which is what capacity planning reads;
//! - RSS: growth of the process' resident set, which is what the machine pays, allocator
//!   slack and load-time buffers included.
//!
//! hopps' RSS growth is measured against a node serving the same model with a tiny version
//! (runtime, threads and per-shard minimums cancel out); Redis' against itself before the load.

use anyhow::Context as _;

use crate::dataset::{DataSet, HoppsRepo, redis_load};
use crate::measure::ratio;
use crate::report::Record;
use crate::servers::{HoppsServer, RedisServer, Sides, SystemArgs, rss_bytes, runtime};

const MODEL: &str = "memory";
/// Rows of the baseline node.
const BASELINE_ROWS: u64 = 1000;

/// Flags of the memory suite.
#[derive(Debug, Clone, clap::Args)]
pub struct MemoryArgs {
    #[command(flatten)]
    pub system: SystemArgs,
    /// Rows per measurement. Default: 2000000 (100000 with --quick).
    #[arg(long)]
    pub keys: Option<u64>,
    /// Row dims. Default: 16,64,128 (16 with --quick).
    #[arg(long, value_delimiter = ',')]
    pub dims: Option<Vec<u32>>,
}

/// Runs the suite as `hopps-bench memory` does.
pub fn run(args: &MemoryArgs, options: crate::Options) -> anyhow::Result<()> {
    let sides = Sides::resolve(&args.system, options.quick, options.json)?;
    runtime()?.block_on(suite(&sides, args))
}

pub async fn suite(sides: &Sides, args: &MemoryArgs) -> anyhow::Result<()> {
    let rows = args
        .keys
        .unwrap_or(if sides.quick { 100_000 } else { 2_000_000 });
    anyhow::ensure!(
        rows > BASELINE_ROWS,
        "--keys must be more than {BASELINE_ROWS} (the baseline node's rows)"
    );
    let dims = args.dims.clone().unwrap_or_else(|| {
        if sides.quick {
            vec![16]
        } else {
            vec![16, 64, 128]
        }
    });
    for dim in dims {
        anyhow::ensure!(dim > 0, "dims must be at least 1");
        let record = measure(sides, rows, dim).await?;
        sides.report.emit(&record);
    }
    Ok(())
}

/// Starts a node on a fresh repository holding `data`; returns it with its repository dirs.
async fn node_with(
    sides: &Sides,
    data: &DataSet,
) -> anyhow::Result<(HoppsServer, tempfile::TempDir, tempfile::TempDir)> {
    let repo_dir = tempfile::Builder::new()
        .prefix("hopps-bench-repo-")
        .tempdir()?;
    let node_dir = tempfile::Builder::new()
        .prefix("hopps-bench-node-")
        .tempdir()?;
    let repo = HoppsRepo::open(repo_dir.path(), MODEL, sides.shards).await?;
    repo.publish_full(data).await?;
    let server = HoppsServer::start(&sides.hopps(repo_dir.path(), node_dir.path())).await?;
    Ok((server, repo_dir, node_dir))
}

async fn measure(sides: &Sides, rows: u64, dim: u32) -> anyhow::Result<Record> {
    let data = DataSet {
        seed: 0x200 + u64::from(dim),
        rows,
        dim,
    };
    sides.report.note(&format!(
        "memory: dim {dim}: {rows} rows into hopps and Redis"
    ));

    let small = DataSet {
        rows: BASELINE_ROWS,
        ..data
    };
    let baseline_rss = {
        let (server, _repo, _node) = node_with(sides, &small).await?;
        rss_bytes(server.pid())?
    };
    let (hopps_bytes, hopps_rss, load_factor) = {
        let (server, _repo, _node) = node_with(sides, &data).await?;
        let rss = rss_bytes(server.pid())?;
        let status = server
            .connect()
            .await?
            .status()
            .await
            .context("status of hopps")?;
        let model = status
            .models
            .iter()
            .find(|m| m.name == MODEL)
            .with_context(|| format!("hopps does not report model {MODEL:?} in its status"))?;
        anyhow::ensure!(
            model.rows == rows,
            "hopps reports {} rows of model {MODEL:?}, the suite published {rows}",
            model.rows
        );
        (model.memory_bytes, rss, model.load_factor)
    };

    let (redis_used, redis_rss) = {
        let redis = RedisServer::start(&sides.redis()).await?;
        let mut conn = redis.connect().await?;
        let used0 = conn.info_u64("memory", "used_memory").await?;
        let rss0 = rss_bytes(redis.pid())?;
        redis_load(&mut conn, &data).await?;
        let keys = conn.dbsize().await?;
        anyhow::ensure!(
            keys == rows,
            "redis holds {keys} keys, the suite wrote {rows}"
        );
        let used1 = conn.info_u64("memory", "used_memory").await?;
        let rss1 = rss_bytes(redis.pid())?;
        (used1.saturating_sub(used0), rss1.saturating_sub(rss0))
    };

    let n = rows as f64;
    let hopps_per_key = hopps_bytes as f64 / n;
    let hopps_rss_per_key =
        hopps_rss.saturating_sub(baseline_rss) as f64 / (rows - BASELINE_ROWS) as f64;
    let redis_per_key = redis_used as f64 / n;
    let redis_rss_per_key = redis_rss as f64 / n;
    let mut rec = Record::new("memory");
    rec.set("dim", dim)
        .set("keys", rows)
        .num("raw_bytes_per_key", data.raw_bytes_per_key())
        .num("hopps_bytes_per_key", hopps_per_key)
        .num("redis_bytes_per_key", redis_per_key)
        .num(
            "bytes_per_key_ratio",
            ratio(hopps_per_key, redis_per_key).unwrap_or(f64::NAN),
        )
        .num("hopps_rss_bytes_per_key", hopps_rss_per_key)
        .set("hopps_rss_bytes", hopps_rss)
        .set("hopps_baseline_rss_bytes", baseline_rss)
        .num("redis_rss_bytes_per_key", redis_rss_per_key)
        .num(
            "rss_ratio",
            ratio(hopps_rss_per_key, redis_rss_per_key).unwrap_or(f64::NAN),
        )
        .num(
            "hopps_overhead",
            ratio(hopps_per_key, data.raw_bytes_per_key()).unwrap_or(f64::NAN),
        )
        .num("hopps_load_factor", load_factor);
    Ok(rec)
}
