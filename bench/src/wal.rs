//! `wal`: durable online writes, hopps `Upsert` (write-ahead log, group commit) against Redis
//! `MSET` with `appendonly yes` + `appendfsync always`, the Redis setting with the same promise:
//! a write is on disk before it is acknowledged.
//!
//! Per configuration (batch size, connections) both sides upsert the same precomputed batches
//! in closed loops, rounds alternating A B A B. Then both are killed (SIGKILL, a crash) and
//! restarted on their own files: the suite reports how long each takes to serve again and
//! checks that the last acknowledged batch survived with its values.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpStream;

use crate::dataset::{DataSet, HoppsRepo, REDIS_PREFIX, TABLE, f32s_of, redis_load};
use crate::measure::{Latencies, Spread, interleave};
use crate::report::Record;
use crate::resp::RespConnection;
use crate::servers::{HoppsServer, RedisOptions, RedisServer, Sides, SystemArgs, runtime};
use crate::workload::{row_bytes_of, rows_of};

const MODEL: &str = "wal";
/// Generation of every upserted row: a key read back with these values was written by the
/// suite's upserts (the loaded data is generation 0).
const GENERATION: u32 = 1000;
/// Distinct batches per configuration.
const BATCHES: usize = 64;

/// Flags of the wal suite.
#[derive(Debug, Clone, clap::Args)]
pub struct WalArgs {
    #[command(flatten)]
    pub system: SystemArgs,
    /// Rows loaded before the writes. Default: 1000000 (20000 with --quick).
    #[arg(long)]
    pub keys: Option<u64>,
    /// Row dim. Default: 16.
    #[arg(long)]
    pub dim: Option<u32>,
    /// Rows per write request. Default: 100,1000.
    #[arg(long, value_delimiter = ',')]
    pub batches: Option<Vec<usize>>,
    /// Client connections per side. Default: 1,2.
    #[arg(long, value_delimiter = ',')]
    pub connections: Option<Vec<usize>>,
    /// hopps' `--wal-sync`: `always` (fsync before each acknowledgement, shared by concurrent
    /// writes) or a group-commit interval like `10ms`. Default: always.
    #[arg(long)]
    pub wal_sync: Option<String>,
    /// Seconds per side and round. Default: 1 (0.05 with --quick).
    #[arg(long)]
    pub seconds: Option<f64>,
}

/// The writes of one configuration, in both encodings.
struct Writes {
    batch: usize,
    /// Row indexes of the data set, `BATCHES * batch` of them.
    rows: Vec<u64>,
    keys: Vec<u64>,
    values: Vec<f32>,
    bytes: Vec<u8>,
    dim: usize,
}

impl Writes {
    fn draw(data: &DataSet, batch: usize, seed: u64) -> Writes {
        let mut rng = StdRng::seed_from_u64(seed);
        let rows: Vec<u64> = (0..BATCHES * batch)
            .map(|_| rng.random_range(0..data.rows))
            .collect();
        let keys: Vec<u64> = rows.iter().map(|&i| data.key(i)).collect();
        let values = rows_of(&keys, data.dim, GENERATION);
        let mut bytes = Vec::new();
        row_bytes_of(&values, &mut bytes);
        Writes {
            batch,
            rows,
            keys,
            values,
            bytes,
            dim: data.dim as usize,
        }
    }

    fn range(&self, b: usize) -> std::ops::Range<usize> {
        let b = b % BATCHES;
        b * self.batch..(b + 1) * self.batch
    }
}

/// What one side did in one round; `last` is the batch acknowledged last.
struct Round {
    keys: u64,
    elapsed: Duration,
    latencies: Latencies,
    last: Option<usize>,
}

/// Runs the suite as `hopps-bench wal` does.
pub fn run(args: &WalArgs, options: crate::Options) -> anyhow::Result<()> {
    let sides = Sides::resolve(&args.system, options.quick, options.json)?;
    runtime()?.block_on(suite(&sides, args))
}

pub async fn suite(sides: &Sides, args: &WalArgs) -> anyhow::Result<()> {
    let quick = sides.quick;
    let rows = args.keys.unwrap_or(if quick { 20_000 } else { 1_000_000 });
    let dim = args.dim.unwrap_or(16);
    let batches = args.batches.clone().unwrap_or_else(|| vec![100, 1000]);
    let connections = args.connections.clone().unwrap_or_else(|| vec![1, 2]);
    let wal_sync = args
        .wal_sync
        .clone()
        .unwrap_or_else(|| "always".to_string());
    let seconds = args.seconds.unwrap_or(if quick { 0.05 } else { 1.0 });
    anyhow::ensure!(rows > 0 && dim > 0, "--keys and --dim must be at least 1");
    anyhow::ensure!(
        batches.iter().all(|&b| b > 0) && connections.iter().all(|&c| c > 0),
        "batches and connections must be at least 1"
    );
    anyhow::ensure!(
        seconds > 0.0 && seconds.is_finite(),
        "--seconds must be a positive number"
    );
    let duration = Duration::from_secs_f64(seconds);
    let data = DataSet {
        seed: 0x500 + u64::from(dim),
        rows,
        dim,
    };

    let repo_dir = tempfile::Builder::new()
        .prefix("hopps-bench-repo-")
        .tempdir()?;
    let node_dir = tempfile::Builder::new()
        .prefix("hopps-bench-node-")
        .tempdir()?;
    let redis_dir = tempfile::Builder::new()
        .prefix("hopps-bench-redis-")
        .tempdir()?;
    sides.report.note(&format!(
        "wal: {rows} rows of dim {dim}; hopps --wal-sync {wal_sync}, redis appendfsync always"
    ));
    let repo = HoppsRepo::open(repo_dir.path(), MODEL, sides.shards).await?;
    repo.publish_full(&data).await?;
    let mut hopps_options = sides.hopps(repo_dir.path(), node_dir.path());
    hopps_options.wal_sync = wal_sync.clone();
    let redis_options = RedisOptions {
        fsync_always: true,
        dir: Some(redis_dir.path().to_path_buf()),
        ..sides.redis()
    };
    let hopps = HoppsServer::start(&hopps_options).await?;
    let redis = RedisServer::start(&redis_options).await?;
    {
        let mut conn = redis.connect().await?;
        redis_load(&mut conn, &data).await?;
    }

    // Each side's last acknowledged batch (the sides do not get through the same batches).
    let mut hopps_last: Option<(Arc<Writes>, usize)> = None;
    let mut redis_last: Option<(Arc<Writes>, usize)> = None;
    for &batch in &batches {
        for &conns in &connections {
            let writes = Arc::new(Writes::draw(
                &data,
                batch,
                (batch as u64) << 8 | conns as u64,
            ));
            let mut clients = Vec::with_capacity(conns);
            let mut redis_conns = Vec::with_capacity(conns);
            for _ in 0..conns {
                clients.push(hopps.connect().await?);
                redis_conns.push(Some(redis.connect().await?));
            }
            let warm = duration.mul_f64(0.5).max(Duration::from_millis(20));
            hopps_round(&clients, &writes, warm).await?;
            redis_round(&mut redis_conns, &writes, warm).await?;
            let (mut h, mut r) = interleave(
                sides.rounds,
                async |_| hopps_round(&clients, &writes, duration).await,
                async |_| redis_round(&mut redis_conns, &writes, duration).await,
            )
            .await?;
            if let Some(b) = h.last().and_then(|r| r.last) {
                hopps_last = Some((Arc::clone(&writes), b));
            }
            if let Some(b) = r.last().and_then(|r| r.last) {
                redis_last = Some((Arc::clone(&writes), b));
            }
            let hf = figures(&mut h);
            let rf = figures(&mut r);
            let mut rec = Record::new("wal");
            rec.set("dim", dim)
                .set("batch", batch)
                .set("connections", conns)
                .set("wal_sync", wal_sync.as_str())
                .set("redis_appendfsync", "always")
                .set("rounds", sides.rounds)
                .num("seconds_per_round", seconds)
                .spread("hopps_keys_per_s", hf.0)
                .spread("redis_keys_per_s", rf.0)
                .ratio("keys_per_s_ratio", hf.0, rf.0)
                .spread("hopps_p50_us", hf.1)
                .spread("redis_p50_us", rf.1)
                .ratio("p50_ratio", hf.1, rf.1)
                .spread("hopps_p99_us", hf.2)
                .spread("redis_p99_us", rf.2)
                .ratio("p99_ratio", hf.2, rf.2);
            sides.report.emit(&rec);
        }
    }

    let wal_bytes = hopps.connect().await?.status().await?.wal_bytes;
    let hopps_last = hopps_last.context("hopps acknowledged no write")?;
    let redis_last = redis_last.context("redis acknowledged no write")?;
    // A crash: both processes are killed without warning, then restarted on their files.
    drop(hopps);
    drop(redis);
    let hopps = HoppsServer::start(&hopps_options).await?;
    let started = Instant::now();
    let redis = RedisServer::start(&redis_options).await?;
    let redis_restart = started.elapsed();

    let (writes, last) = hopps_last;
    let range = writes.range(last);
    let got = hopps
        .connect()
        .await?
        .lookup(MODEL, TABLE, &writes.keys[range.clone()])
        .await?;
    check_written(
        &data,
        &writes.rows[range],
        &got.values,
        "hopps after a crash",
    )?;

    let (writes, last) = redis_last;
    let range = writes.range(last);
    let keys = &writes.keys[range.clone()];
    let mut conn = redis.connect().await?;
    let mut bytes = vec![0u8; keys.len() * writes.dim * 4];
    let mut found = vec![false; keys.len()];
    conn.mget_into(REDIS_PREFIX, keys, &mut bytes, &mut found)
        .await?;
    let mut values = Vec::new();
    f32s_of(&bytes, &mut values);
    check_written(&data, &writes.rows[range], &values, "redis after a crash")?;

    let mut rec = Record::new("wal");
    rec.set("kind", "restart")
        .set("dim", dim)
        .set("keys", rows)
        .set("wal_sync", wal_sync.as_str())
        .set("hopps_wal_bytes", wal_bytes)
        .num("hopps_restart_seconds", hopps.ready_after.as_secs_f64())
        .num("redis_restart_seconds", redis_restart.as_secs_f64())
        .set("last_acknowledged_batch_survived", true);
    sides.report.emit(&rec);
    Ok(())
}

/// The rows read back are the upserted generation (duplicates in a batch carry equal values).
fn check_written(data: &DataSet, rows: &[u64], values: &[f32], what: &str) -> anyhow::Result<()> {
    let dim = data.dim as usize;
    anyhow::ensure!(
        values.len() == rows.len() * dim,
        "{what}: {} values for {} rows",
        values.len(),
        rows.len()
    );
    for (r, &i) in rows.iter().enumerate() {
        let key = data.key(i);
        let want = rows_of(&[key], data.dim, GENERATION);
        anyhow::ensure!(
            values[r * dim..(r + 1) * dim] == want[..],
            "{what}: key {key} does not hold the values of its last acknowledged write; the write was lost"
        );
    }
    Ok(())
}

type Figures = (Option<Spread>, Option<Spread>, Option<Spread>);

fn figures(rounds: &mut [Round]) -> Figures {
    let kps: Vec<f64> = rounds
        .iter()
        .map(|r| r.keys as f64 / r.elapsed.as_secs_f64().max(1e-9))
        .collect();
    let p50: Vec<f64> = rounds
        .iter_mut()
        .filter_map(|r| r.latencies.quantile_us(0.5))
        .collect();
    let p99: Vec<f64> = rounds
        .iter_mut()
        .filter_map(|r| r.latencies.quantile_us(0.99))
        .collect();
    (Spread::of(&kps), Spread::of(&p50), Spread::of(&p99))
}

fn merge(parts: Vec<Round>) -> Round {
    let mut out = Round {
        keys: 0,
        elapsed: Duration::ZERO,
        latencies: Latencies::default(),
        last: None,
    };
    for p in parts {
        out.keys += p.keys;
        out.elapsed = out.elapsed.max(p.elapsed);
        out.latencies.merge(p.latencies);
        // Any connection's last acknowledged batch will do for the durability check.
        out.last = out.last.or(p.last);
    }
    out
}

async fn hopps_round(
    clients: &[hopps_client::Client],
    writes: &Arc<Writes>,
    duration: Duration,
) -> anyhow::Result<Round> {
    let mut tasks = Vec::with_capacity(clients.len());
    for (c, client) in clients.iter().enumerate() {
        let client = client.clone();
        let writes = Arc::clone(writes);
        let offset = c * BATCHES / clients.len();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Latencies::with_capacity(1 << 12);
            let mut keys = 0u64;
            let mut last = None;
            let mut b = offset;
            let started = Instant::now();
            while started.elapsed() < duration {
                let range = writes.range(b);
                let values = &writes.values[range.start * writes.dim..range.end * writes.dim];
                let t = Instant::now();
                let ack = client
                    .upsert(MODEL, TABLE, &writes.keys[range.clone()], values)
                    .await
                    .context("hopps upsert")?;
                latencies.record(t.elapsed());
                anyhow::ensure!(
                    ack.rows == writes.batch as u64,
                    "hopps acknowledged {} rows of a batch of {}",
                    ack.rows,
                    writes.batch
                );
                last = Some(b % BATCHES);
                keys += writes.batch as u64;
                b += 1;
            }
            Ok(Round {
                keys,
                elapsed: started.elapsed(),
                latencies,
                last,
            })
        }));
    }
    let mut parts = Vec::with_capacity(tasks.len());
    for t in tasks {
        parts.push(t.await.context("hopps upsert task")??);
    }
    Ok(merge(parts))
}

async fn redis_round(
    conns: &mut [Option<RespConnection<TcpStream>>],
    writes: &Arc<Writes>,
    duration: Duration,
) -> anyhow::Result<Round> {
    let n = conns.len();
    let mut tasks = Vec::with_capacity(n);
    for (c, slot) in conns.iter_mut().enumerate() {
        let mut conn = slot
            .take()
            .context("redis connection lost by an earlier round")?;
        let writes = Arc::clone(writes);
        let offset = c * BATCHES / n;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Latencies::with_capacity(1 << 12);
            let mut keys = 0u64;
            let mut last = None;
            let mut b = offset;
            let row_bytes = writes.dim * 4;
            let started = Instant::now();
            while started.elapsed() < duration {
                let range = writes.range(b);
                let bytes = &writes.bytes[range.start * row_bytes..range.end * row_bytes];
                let t = Instant::now();
                conn.mset(
                    REDIS_PREFIX,
                    &writes.keys[range.clone()],
                    bytes,
                    writes.batch,
                )
                .await
                .context("redis MSET")?;
                latencies.record(t.elapsed());
                last = Some(b % BATCHES);
                keys += writes.batch as u64;
                b += 1;
            }
            Ok::<_, anyhow::Error>((
                conn,
                Round {
                    keys,
                    elapsed: started.elapsed(),
                    latencies,
                    last,
                },
            ))
        }));
    }
    let mut parts = Vec::with_capacity(n);
    for (slot, t) in conns.iter_mut().zip(tasks) {
        let (conn, round) = t.await.context("redis upsert task")??;
        *slot = Some(conn);
        parts.push(round);
    }
    Ok(merge(parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_carry_the_write_generation() {
        let data = DataSet {
            seed: 1,
            rows: 500,
            dim: 3,
        };
        let w = Writes::draw(&data, 10, 7);
        assert_eq!(w.keys.len(), BATCHES * 10);
        assert_eq!(w.range(BATCHES + 1), 10..20, "batch indexes wrap");
        let r = w.range(2);
        check_written(
            &data,
            &w.rows[r.clone()],
            &w.values[r.start * 3..r.end * 3],
            "t",
        )
        .expect("own values");
        let old = rows_of(&w.keys[r.clone()], 3, 0);
        assert!(
            check_written(&data, &w.rows[r], &old, "t").is_err(),
            "generation 0 is not a write"
        );
    }
}
