//! `lookup`: batch lookups over loopback, hopps `Lookup` against Redis `MGET`.
//!
//! Per dim, one hopps node and one Redis hold the same rows. Per configuration (batch size,
//! key distribution, connections) both get the same precomputed batches from the same number
//! of connections, each connection in a closed loop (next request when the previous answer
//! is decoded), for the same time per round, rounds alternating A B A B. Every answer is
//! checked: all keys found, and the first answer of each round compared value by value.
//!
//! At large dims both are limited by how fast loopback TCP moves bytes, so the suite also
//! measures one TCP stream's loopback bandwidth and reports which fraction of it each side's
//! responses use.

use std::io::{Read as _, Write as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::net::TcpStream;

use crate::dataset::{DataSet, HoppsRepo, REDIS_PREFIX, TABLE, check_rows, f32s_of, redis_load};
use crate::measure::{Latencies, Spread, interleave};
use crate::report::Record;
use crate::resp::RespConnection;
use crate::servers::{HoppsServer, RedisServer, Sides, SystemArgs, runtime};
use crate::workload::{Batches, Dist};

const MODEL: &str = "lookup";

/// Flags of the lookup suite (lists are comma-separated).
#[derive(Debug, Clone, clap::Args)]
pub struct LookupArgs {
    #[command(flatten)]
    pub system: SystemArgs,
    /// Rows per table. Default: 1000000 (20000 with --quick).
    #[arg(long)]
    pub keys: Option<u64>,
    /// Row dims. Default: 16,64,128.
    #[arg(long, value_delimiter = ',')]
    pub dims: Option<Vec<u32>>,
    /// Keys per request. Default: 100,1000,10000.
    #[arg(long, value_delimiter = ',')]
    pub batches: Option<Vec<usize>>,
    /// Client connections per side. Default: 1,2.
    #[arg(long, value_delimiter = ',')]
    pub connections: Option<Vec<usize>>,
    /// Key distributions: uniform, zipf. Default: both.
    #[arg(long, value_delimiter = ',')]
    pub dists: Option<Vec<String>>,
    /// Seconds per side and round. Default: 1 (0.05 with --quick).
    #[arg(long)]
    pub seconds: Option<f64>,
}

/// One measured configuration.
#[derive(Debug, Clone, Copy)]
struct Config {
    dim: u32,
    batch: usize,
    connections: usize,
    dist: Dist,
}

/// What one side did in one round.
struct Round {
    keys: u64,
    elapsed: Duration,
    latencies: Latencies,
}

impl Round {
    fn keys_per_s(&self) -> f64 {
        self.keys as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Merges the connections of one round: keys add up, the round lasts as long as the
    /// slowest connection.
    fn merge(parts: Vec<Round>) -> Round {
        let mut out = Round {
            keys: 0,
            elapsed: Duration::ZERO,
            latencies: Latencies::default(),
        };
        for p in parts {
            out.keys += p.keys;
            out.elapsed = out.elapsed.max(p.elapsed);
            out.latencies.merge(p.latencies);
        }
        out
    }
}

/// Figures of one side over all rounds.
struct SideFigures {
    keys_per_s: Option<Spread>,
    p50_us: Option<Spread>,
    p99_us: Option<Spread>,
}

fn figures(rounds: &mut [Round]) -> SideFigures {
    let kps: Vec<f64> = rounds.iter().map(Round::keys_per_s).collect();
    let p50: Vec<f64> = rounds
        .iter_mut()
        .filter_map(|r| r.latencies.quantile_us(0.50))
        .collect();
    let p99: Vec<f64> = rounds
        .iter_mut()
        .filter_map(|r| r.latencies.quantile_us(0.99))
        .collect();
    SideFigures {
        keys_per_s: Spread::of(&kps),
        p50_us: Spread::of(&p50),
        p99_us: Spread::of(&p99),
    }
}

/// Runs the suite as `hopps-bench lookup` does.
pub fn run(args: &LookupArgs, options: crate::Options) -> anyhow::Result<()> {
    let sides = Sides::resolve(&args.system, options.quick, options.json)?;
    runtime()?.block_on(suite(&sides, args))
}

pub async fn suite(sides: &Sides, args: &LookupArgs) -> anyhow::Result<()> {
    let quick = sides.quick;
    let rows = args.keys.unwrap_or(if quick { 20_000 } else { 1_000_000 });
    let dims = args.dims.clone().unwrap_or_else(|| vec![16, 64, 128]);
    let batches = args
        .batches
        .clone()
        .unwrap_or_else(|| vec![100, 1000, 10_000]);
    let connections = args.connections.clone().unwrap_or_else(|| vec![1, 2]);
    let dists: Vec<Dist> = match &args.dists {
        None => vec![Dist::Uniform, Dist::Zipf],
        Some(names) => names
            .iter()
            .map(|n| {
                Dist::parse(n)
                    .with_context(|| format!("unknown distribution {n:?}; use uniform or zipf"))
            })
            .collect::<anyhow::Result<_>>()?,
    };
    let seconds = args.seconds.unwrap_or(if quick { 0.05 } else { 1.0 });
    anyhow::ensure!(rows > 0, "--keys must be at least 1");
    anyhow::ensure!(
        seconds > 0.0 && seconds.is_finite(),
        "--seconds must be a positive number"
    );
    anyhow::ensure!(
        dims.iter().all(|&d| d > 0)
            && batches.iter().all(|&b| b > 0)
            && connections.iter().all(|&c| c > 0),
        "dims, batches and connections must be at least 1"
    );
    let duration = Duration::from_secs_f64(seconds);

    let probe = if quick {
        Duration::from_millis(50)
    } else {
        Duration::from_millis(300)
    };
    let loopback = loopback_bandwidth(probe, 5).await?;
    sides.report.note(&format!(
        "loopback TCP, one stream: {:.2} GB/s (median of 5)",
        loopback.median / 1e9
    ));

    for &dim in &dims {
        let data = DataSet {
            seed: 0x100 + u64::from(dim),
            rows,
            dim,
        };
        let repo_dir = tempfile::Builder::new()
            .prefix("hopps-bench-repo-")
            .tempdir()?;
        let node_dir = tempfile::Builder::new()
            .prefix("hopps-bench-node-")
            .tempdir()?;
        sides.report.note(&format!(
            "lookup: dim {dim}: publishing {rows} rows and loading both systems"
        ));
        let repo = HoppsRepo::open(repo_dir.path(), MODEL, sides.shards).await?;
        repo.publish_full(&data).await?;
        let hopps = HoppsServer::start(&sides.hopps(repo_dir.path(), node_dir.path())).await?;
        let redis = RedisServer::start(&sides.redis()).await?;
        {
            let mut conn = redis.connect().await?;
            redis_load(&mut conn, &data).await?;
        }
        for &dist in &dists {
            for &batch in &batches {
                for &conns in &connections {
                    let config = Config {
                        dim,
                        batch,
                        connections: conns,
                        dist,
                    };
                    let record =
                        measure(sides, &hopps, &redis, &data, config, duration, loopback).await?;
                    sides.report.emit(&record);
                }
            }
        }
    }
    Ok(())
}

async fn measure(
    sides: &Sides,
    hopps: &HoppsServer,
    redis: &RedisServer,
    data: &DataSet,
    config: Config,
    duration: Duration,
    loopback: Spread,
) -> anyhow::Result<Record> {
    // Enough distinct batches that a round does not replay a handful of them, capped at a
    // million keys of client memory.
    let count = (1_000_000 / config.batch).clamp(16, 1000);
    let rng_seed =
        u64::from(config.dim) << 32 | (config.batch as u64) << 8 | config.connections as u64;
    let batches = Arc::new(Batches::draw(
        data.seed,
        data.rows,
        config.dist,
        config.batch,
        count,
        rng_seed ^ config.dist as u64,
    ));
    // Row indexes of the first batch, to check values (keys map back through the data set).
    let mut hopps_clients = Vec::with_capacity(config.connections);
    let mut redis_conns = Vec::with_capacity(config.connections);
    for _ in 0..config.connections {
        hopps_clients.push(hopps.connect().await?);
        redis_conns.push(Some(redis.connect().await?));
    }
    verify_first_batch(data, &hopps_clients[0], redis, &batches).await?;

    // Warm-up: connections established, caches and branch predictors primed on both sides.
    let warm = duration.mul_f64(0.5).max(Duration::from_millis(20));
    hopps_round(&hopps_clients, &batches, warm).await?;
    redis_round(&mut redis_conns, &batches, data.dim, warm).await?;

    let (mut h, mut r) = interleave(
        sides.rounds,
        async |_| hopps_round(&hopps_clients, &batches, duration).await,
        async |_| redis_round(&mut redis_conns, &batches, data.dim, duration).await,
    )
    .await?;
    let hf = figures(&mut h);
    let rf = figures(&mut r);

    let mut rec = Record::new("lookup");
    rec.set("dim", config.dim)
        .set("batch", config.batch)
        .set("connections", config.connections)
        .set("dist", config.dist.as_str())
        .set("keys", data.rows)
        .set("rounds", sides.rounds)
        .num("seconds_per_round", duration.as_secs_f64());
    rec.spread("hopps_keys_per_s", hf.keys_per_s)
        .spread("redis_keys_per_s", rf.keys_per_s)
        .ratio("keys_per_s_ratio", hf.keys_per_s, rf.keys_per_s)
        .spread("hopps_p50_us", hf.p50_us)
        .spread("redis_p50_us", rf.p50_us)
        .ratio("p50_ratio", hf.p50_us, rf.p50_us)
        .spread("hopps_p99_us", hf.p99_us)
        .spread("redis_p99_us", rf.p99_us)
        .ratio("p99_ratio", hf.p99_us, rf.p99_us);
    // Response payload per key: hopps sends the row plus one bit of the found bitmap; Redis
    // sends `$<len>\r\n<row>\r\n`.
    let row = 4.0 * f64::from(config.dim);
    let hopps_bytes = row + 0.125;
    let redis_bytes = row + 5.0 + (row as u64).to_string().len() as f64;
    rec.num("loopback_bytes_per_s", loopback.median);
    if let Some(k) = hf.keys_per_s {
        rec.num(
            "hopps_loopback_fraction",
            k.median * hopps_bytes / loopback.median,
        );
    }
    if let Some(k) = rf.keys_per_s {
        rec.num(
            "redis_loopback_fraction",
            k.median * redis_bytes / loopback.median,
        );
    }
    Ok(rec)
}

/// Both sides return the rows that were loaded for the first batch, value for value.
async fn verify_first_batch(
    data: &DataSet,
    hopps: &hopps_client::Client,
    redis: &RedisServer,
    batches: &Batches,
) -> anyhow::Result<()> {
    let keys = batches.get(0);
    // Map keys back to row indexes through a lookup table of the data set (small batches only
    // are checked this way: the first batch).
    let index: std::collections::HashMap<u64, u64> =
        (0..data.rows).map(|i| (data.key(i), i)).collect();
    let rows: Vec<u64> = keys
        .iter()
        .map(|k| {
            index
                .get(k)
                .copied()
                .context("batch key not in the data set")
        })
        .collect::<anyhow::Result<_>>()?;
    let got = hopps
        .lookup(MODEL, TABLE, keys)
        .await
        .context("hopps lookup")?;
    anyhow::ensure!(
        got.found.iter().all(|&f| f),
        "hopps did not find every key of the data set"
    );
    check_rows(data, &rows, &got.values, None, "hopps lookup")?;
    let mut conn = redis.connect().await?;
    let mut bytes = vec![0u8; keys.len() * data.dim as usize * 4];
    let mut found = vec![false; keys.len()];
    conn.mget_into(REDIS_PREFIX, keys, &mut bytes, &mut found)
        .await?;
    anyhow::ensure!(
        found.iter().all(|&f| f),
        "redis did not find every key of the data set"
    );
    let mut values = Vec::new();
    f32s_of(&bytes, &mut values);
    check_rows(data, &rows, &values, None, "redis MGET")
}

/// One round of hopps: each client in a closed loop for `duration`.
async fn hopps_round(
    clients: &[hopps_client::Client],
    batches: &Arc<Batches>,
    duration: Duration,
) -> anyhow::Result<Round> {
    let mut tasks = Vec::with_capacity(clients.len());
    for (c, client) in clients.iter().enumerate() {
        let client = client.clone();
        let batches = Arc::clone(batches);
        // Connections start at different batches so that they do not ask the same keys at
        // the same moment.
        let offset = c * batches.count() / clients.len();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Latencies::with_capacity(1 << 14);
            let mut keys = 0u64;
            let mut b = offset;
            let started = Instant::now();
            while started.elapsed() < duration {
                let batch = batches.get(b);
                b += 1;
                let t = Instant::now();
                let rows = client
                    .lookup(MODEL, TABLE, batch)
                    .await
                    .context("hopps lookup")?;
                latencies.record(t.elapsed());
                anyhow::ensure!(
                    rows.found.len() == batch.len() && rows.found.iter().all(|&f| f),
                    "hopps lost keys of the data set"
                );
                keys += batch.len() as u64;
            }
            Ok(Round {
                keys,
                elapsed: started.elapsed(),
                latencies,
            })
        }));
    }
    let mut parts = Vec::with_capacity(tasks.len());
    for t in tasks {
        parts.push(t.await.context("hopps lookup task")??);
    }
    Ok(Round::merge(parts))
}

/// One round of Redis: each connection in a closed loop of `MGET`s for `duration`.
async fn redis_round(
    conns: &mut [Option<RespConnection<TcpStream>>],
    batches: &Arc<Batches>,
    dim: u32,
    duration: Duration,
) -> anyhow::Result<Round> {
    let n = conns.len();
    let mut tasks = Vec::with_capacity(n);
    for (c, slot) in conns.iter_mut().enumerate() {
        let mut conn = slot
            .take()
            .context("redis connection lost by an earlier round")?;
        let batches = Arc::clone(batches);
        let offset = c * batches.count() / n;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Latencies::with_capacity(1 << 14);
            let mut keys = 0u64;
            let mut b = offset;
            let mut out = vec![0u8; batches.batch * dim as usize * 4];
            let mut found = vec![false; batches.batch];
            let mut values = Vec::with_capacity(batches.batch * dim as usize);
            let started = Instant::now();
            while started.elapsed() < duration {
                let batch = batches.get(b);
                b += 1;
                let t = Instant::now();
                let hits = conn
                    .mget_into(REDIS_PREFIX, batch, &mut out, &mut found)
                    .await?;
                // Decode to f32 as the hopps client does, so both sides end with floats.
                f32s_of(&out, &mut values);
                latencies.record(t.elapsed());
                anyhow::ensure!(hits == batch.len(), "redis lost keys of the data set");
                keys += batch.len() as u64;
            }
            Ok((
                conn,
                Round {
                    keys,
                    elapsed: started.elapsed(),
                    latencies,
                },
            ))
        }));
    }
    let mut parts = Vec::with_capacity(n);
    for (slot, t) in conns.iter_mut().zip(tasks) {
        let (conn, round) = t.await.context("redis lookup task")??;
        *slot = Some(conn);
        parts.push(round);
    }
    Ok(Round::merge(parts))
}

/// Bytes per second one TCP stream moves over 127.0.0.1 (writer and reader on their own
/// threads), median of `runs` runs of `duration`.
pub async fn loopback_bandwidth(duration: Duration, runs: usize) -> anyhow::Result<Spread> {
    let mut rates = Vec::with_capacity(runs);
    for _ in 0..runs {
        let rate = tokio::task::spawn_blocking(move || loopback_once(duration))
            .await
            .context("loopback probe task")??;
        rates.push(rate);
    }
    Spread::of(&rates).context("no loopback measurement")
}

fn loopback_once(duration: Duration) -> anyhow::Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut stream = std::net::TcpStream::connect(addr)?;
        let buf = vec![0x5au8; 1 << 20];
        let started = Instant::now();
        while started.elapsed() < duration {
            stream.write_all(&buf)?;
        }
        Ok(())
    });
    let (mut conn, _) = listener.accept().context("accepting the loopback probe")?;
    let mut buf = vec![0u8; 1 << 20];
    let mut received = 0u64;
    let started = Instant::now();
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    let elapsed = started.elapsed();
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("loopback writer thread panicked"))?
        .context("loopback writer")?;
    Ok(received as f64 / elapsed.as_secs_f64().max(1e-9))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loopback_moves_bytes() {
        let s = loopback_bandwidth(Duration::from_millis(30), 3)
            .await
            .expect("probe");
        // Even a slow virtual machine moves more than 10 MB/s over loopback.
        assert!(s.median > 1e7, "{s:?}");
        assert!(s.min <= s.median && s.median <= s.max);
    }

    #[test]
    fn rounds_merge_by_slowest_connection() {
        let mut a = Latencies::default();
        a.record(Duration::from_micros(10));
        let merged = Round::merge(vec![
            Round {
                keys: 100,
                elapsed: Duration::from_millis(10),
                latencies: a,
            },
            Round {
                keys: 300,
                elapsed: Duration::from_millis(20),
                latencies: Latencies::default(),
            },
        ]);
        assert_eq!(merged.keys, 400);
        assert_eq!(merged.elapsed, Duration::from_millis(20));
        assert_eq!(merged.latencies.len(), 1);
        assert!((merged.keys_per_s() - 20_000.0).abs() < 1e-6);
    }
}
