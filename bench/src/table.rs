//! `table`: the Hopscotch table (hopps-table) against `hashbrown::HashMap<u64, [f32; dim]>` and
//! against raw memory.
//!
//! Per configuration (keys, dim), in one process run:
//! - bulk load: a hopps table sized for the keys, loaded with `upsert_batch`, against hashbrown
//!   inserting into an empty map (it grows as it goes), rounds alternating hopps / hashbrown;
//! - batch lookup, per key distribution (uniform, Zipf 0.99): hopps `lookup_batch` on batches
//!   of `--batch` keys, hashbrown `get` key by key, and a raw probe doing the same number of
//!   prefetched random reads of the same row size over an array as large as the hopps table
//!   (the memory system's ceiling), rounds alternating the three;
//! - one reader with and without one writer applying updates (90% overwrites, 10% new keys);
//! - memory: bytes per entry against the raw bytes (8 + 4 * dim).
//!
//! `--sweep` instead measures bytes per entry over a sweep of table sizes.

use anyhow::{Result, bail};
use hashbrown::HashMap;
use hopps_table::{Table, mix, prefetch};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::Options;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dist {
    Uniform,
    Zipf,
}

impl Dist {
    fn name(self) -> &'static str {
        match self {
            Dist::Uniform => "uniform",
            Dist::Zipf => "zipf",
        }
    }
}

/// Flags of the table suite.
#[derive(Debug, Clone, clap::Args)]
pub struct TableArgs {
    /// Keys in the table. Default: 50000000 (1000000 with --quick).
    #[arg(long)]
    pub keys: Option<usize>,
    /// Row dim (f32 values); the baseline is compiled for 4, 8, 16, 32, 64, 128 and 256.
    #[arg(long, default_value_t = 16)]
    pub dim: usize,
    /// Key distribution of the lookups. Default: both.
    #[arg(long, value_enum)]
    pub dist: Option<Dist>,
    /// Rounds per figure; figures are medians. Default: 5 (3 with --quick).
    #[arg(long)]
    pub runs: Option<usize>,
    /// Keys per lookup batch.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Lookups per round and side. Default: 10000000 (1000000 with --quick).
    #[arg(long)]
    pub lookups: Option<usize>,
    /// Seconds per round of the reader/writer measurement. Default: 1 (0.2 with --quick).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Measure bytes per entry over a sweep of table sizes up to --keys instead.
    #[arg(long)]
    pub sweep: bool,
    /// Skip the bulk-load comparison (it rebuilds both tables every round).
    #[arg(long)]
    pub no_load: bool,
}

pub fn run(args: &TableArgs, options: Options) -> Result<()> {
    match args.dim {
        4 => run_dim::<4>(args, options),
        8 => run_dim::<8>(args, options),
        16 => run_dim::<16>(args, options),
        32 => run_dim::<32>(args, options),
        64 => run_dim::<64>(args, options),
        128 => run_dim::<128>(args, options),
        256 => run_dim::<256>(args, options),
        d => bail!(
            "--dim {d}: the hashbrown baseline is compiled for dims 4, 8, 16, 32, 64, 128 and 256; pick one"
        ),
    }
}

fn note(text: impl AsRef<str>) {
    eprintln!("[table] {}", text.as_ref());
}

fn emit(options: Options, record: Value) {
    if options.json {
        println!("{record}");
    } else if let Value::Object(fields) = record {
        let line: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("{}", line.join(" "));
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn spread(values: &[f64]) -> Value {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({ "median": round(median(values)), "min": round(min), "max": round(max) })
}

fn round(x: f64) -> f64 {
    if x.abs() >= 100.0 {
        x.round()
    } else {
        (x * 10_000.0).round() / 10_000.0
    }
}

/// splitmix64: the benchmark's keys and choices, reproducible from a seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        ((self.next() as u128 * n as u128) >> 64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf(s) over ranks 1..=n by rejection inversion (Hörmann and Derflinger), O(1) memory.
struct Zipf {
    n: f64,
    s: f64,
    h_x1: f64,
    h_n: f64,
    cut: f64,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut z = Zipf {
            n: n as f64,
            s,
            h_x1: 0.0,
            h_n: 0.0,
            cut: 0.0,
        };
        z.h_x1 = z.h_integral(1.5) - 1.0;
        z.h_n = z.h_integral(z.n + 0.5);
        z.cut = 2.0 - z.h_integral_inv(z.h_integral(2.5) - z.h(2.0));
        z
    }
    fn h(&self, x: f64) -> f64 {
        (-self.s * x.ln()).exp()
    }
    fn h_integral(&self, x: f64) -> f64 {
        let l = x.ln();
        let t = (1.0 - self.s) * l;
        let helper = if t.abs() > 1e-8 {
            t.exp_m1() / t
        } else {
            1.0 + t / 2.0
        };
        helper * l
    }
    fn h_integral_inv(&self, x: f64) -> f64 {
        let t = (x * (1.0 - self.s)).max(-1.0);
        let helper = if t.abs() > 1e-8 {
            t.ln_1p() / t
        } else {
            1.0 - t / 2.0
        };
        (helper * x).exp()
    }
    /// A rank in 1..=n.
    fn sample(&self, rng: &mut Rng) -> usize {
        loop {
            let u = self.h_n + rng.unit() * (self.h_x1 - self.h_n);
            let x = self.h_integral_inv(u);
            let k = (x + 0.5).floor().clamp(1.0, self.n);
            if k - x <= self.cut || u >= self.h_integral(k + 0.5) - self.h(k) {
                return k as usize;
            }
        }
    }
}

/// Values of key `k`'s row (both sides store the same numbers).
fn fill_row<const D: usize>(k: u64, out: &mut [f32; D]) {
    for (j, v) in out.iter_mut().enumerate() {
        *v = (k as u32).wrapping_add(j as u32) as f32;
    }
}

fn row_bytes_of<const D: usize>(row: &[f32; D], out: &mut [u8]) {
    for (c, v) in out.chunks_exact_mut(4).zip(row) {
        c.copy_from_slice(&v.to_le_bytes());
    }
}

const CHUNK: usize = 1 << 16;

/// Loads `keys` into a hopps table sized for them; returns the table and the rows per second
/// of the timed part (the `upsert_batch` calls; row generation is not timed).
fn load_hopps<const D: usize>(keys: &[u64]) -> (Table, f64) {
    let rb = 4 * D;
    let table = Table::with_capacity(rb, keys.len());
    let mut rows = vec![0u8; CHUNK * rb];
    let mut r = [0f32; D];
    let mut timed = Duration::ZERO;
    for chunk in keys.chunks(CHUNK) {
        for (i, &k) in chunk.iter().enumerate() {
            fill_row(k, &mut r);
            row_bytes_of(&r, &mut rows[i * rb..(i + 1) * rb]);
        }
        let t = Instant::now();
        table.upsert_batch(chunk, &rows[..chunk.len() * rb]);
        timed += t.elapsed();
    }
    (table, keys.len() as f64 / timed.as_secs_f64())
}

/// Inserts `keys` into an empty hashbrown map (it grows as it goes), same timing rule.
fn load_hashbrown<const D: usize>(keys: &[u64]) -> (HashMap<u64, [f32; D]>, f64) {
    let mut map = HashMap::new();
    // On the heap: up to 64 MiB at dim 256.
    let mut rows: Vec<[f32; D]> = std::iter::repeat_n([0f32; D], CHUNK).collect();
    let mut timed = Duration::ZERO;
    for chunk in keys.chunks(CHUNK) {
        for (i, &k) in chunk.iter().enumerate() {
            fill_row(k, &mut rows[i]);
        }
        let t = Instant::now();
        for (i, &k) in chunk.iter().enumerate() {
            map.insert(k, rows[i]);
        }
        timed += t.elapsed();
    }
    (map, keys.len() as f64 / timed.as_secs_f64())
}

/// An array of `bytes` bytes in anonymous memory advised for huge pages, touched once.
fn probe_array(bytes: usize) -> Result<memmap2::MmapMut> {
    let mut map = memmap2::MmapMut::map_anon(bytes.max(1))?;
    // As for the table: huge pages where the kernel gives them, ordinary pages otherwise.
    let _ = map.advise(memmap2::Advice::HugePage);
    for (i, page) in map.chunks_mut(4096).enumerate() {
        page[0] = i as u8;
    }
    Ok(map)
}

fn lookup_hopps(table: &Table, stream: &[u64], batch: usize, rb: usize) -> (f64, usize) {
    let mut out = vec![0u8; batch * rb];
    let mut found = vec![false; batch];
    let mut hits = 0;
    let t = Instant::now();
    for keys in stream.chunks(batch) {
        hits += table.lookup_batch(keys, &mut out[..keys.len() * rb], &mut found[..keys.len()]);
    }
    let secs = t.elapsed().as_secs_f64();
    std::hint::black_box(&out);
    (stream.len() as f64 / secs, hits)
}

fn lookup_hashbrown<const D: usize>(
    map: &HashMap<u64, [f32; D]>,
    stream: &[u64],
    batch: usize,
) -> (f64, usize) {
    let mut out = vec![[0f32; D]; batch];
    let mut hits = 0;
    let t = Instant::now();
    for keys in stream.chunks(batch) {
        for (i, k) in keys.iter().enumerate() {
            if let Some(v) = map.get(k) {
                out[i] = *v;
                hits += 1;
            }
        }
        std::hint::black_box(&out);
    }
    (stream.len() as f64 / t.elapsed().as_secs_f64(), hits)
}

/// The memory ceiling: per batch, prefetch every line of one random row per key, then copy the
/// rows out. The row index comes from the same key mix the table uses.
fn probe_reads(array: &[u8], stream: &[u64], batch: usize, rb: usize) -> f64 {
    let rows = array.len() / rb;
    let mut out = vec![0u8; batch * rb];
    let at = |k: u64| ((mix(k) as u128 * rows as u128) >> 64) as usize * rb;
    let t = Instant::now();
    for keys in stream.chunks(batch) {
        for &k in keys {
            let row = &array[at(k)..at(k) + rb];
            for line in row.chunks(64) {
                prefetch(line);
            }
        }
        for (i, &k) in keys.iter().enumerate() {
            out[i * rb..(i + 1) * rb].copy_from_slice(&array[at(k)..at(k) + rb]);
        }
        std::hint::black_box(&out);
    }
    stream.len() as f64 / t.elapsed().as_secs_f64()
}

fn stream_of(keys: &[u64], dist: Dist, n: usize, seed: u64) -> Vec<u64> {
    let mut rng = Rng(seed);
    match dist {
        Dist::Uniform => (0..n).map(|_| keys[rng.below(keys.len())]).collect(),
        Dist::Zipf => {
            let z = Zipf::new(keys.len(), 0.99);
            // Rank r is keys[r - 1]: the keys are random, so hot keys sit anywhere in the table.
            (0..n).map(|_| keys[z.sample(&mut rng) - 1]).collect()
        }
    }
}

fn run_dim<const D: usize>(args: &TableArgs, options: Options) -> Result<()> {
    if args.sweep {
        return sweep::<D>(args, options);
    }
    let quick = options.quick;
    let n = args
        .keys
        .unwrap_or(if quick { 1_000_000 } else { 50_000_000 });
    let runs = args.runs.unwrap_or(if quick { 3 } else { 5 }).max(1);
    let lookups = args
        .lookups
        .unwrap_or(if quick { 1_000_000 } else { 10_000_000 });
    let seconds = args.seconds.unwrap_or(if quick { 0.2 } else { 1.0 });
    let batch = args.batch.max(1);
    if n == 0 {
        bail!("--keys 0: the table suite needs at least one key");
    }
    let rb = 4 * D;
    let raw = (8 + rb) as f64;
    let mut rng = Rng(0x5EED);
    let keys: Vec<u64> = (0..n).map(|_| rng.next()).collect();
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .ok()
        .and_then(|s| {
            s.split('[')
                .nth(1)
                .and_then(|t| t.split(']').next())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into());

    // Bulk load, alternating; the last table of each side stays for the lookups.
    let (mut hopps_rates, mut hb_rates) = (Vec::new(), Vec::new());
    let load_runs = if args.no_load { 1 } else { runs };
    let mut table = None;
    let mut map = None;
    for r in 0..load_runs {
        // The previous round's table goes before the next is built: one of each at a time.
        drop(table.take());
        let (t, rate) = load_hopps::<D>(&keys);
        note(format!("load round {r}: hopps {:.2} M rows/s", rate / 1e6));
        hopps_rates.push(rate);
        table = Some(t);
        drop(map.take());
        let (m, rate) = load_hashbrown::<D>(&keys);
        note(format!(
            "load round {r}: hashbrown {:.2} M rows/s",
            rate / 1e6
        ));
        hb_rates.push(rate);
        map = Some(m);
    }
    let (table, map) = (table.expect("loaded"), map.expect("loaded"));
    if table.len() != map.len() {
        bail!(
            "hopps holds {} keys, hashbrown {}: the load lost keys",
            table.len(),
            map.len()
        );
    }
    let bytes = table.bytes_used();
    let array = probe_array(bytes)?;
    let memory = json!({
        "bytes_per_entry": round(bytes as f64 / table.len() as f64),
        "raw_bytes_per_entry": raw,
        "bytes_ratio": round(bytes as f64 / table.len() as f64 / raw),
        "hashbrown_bytes_per_entry": round(map.allocation_size() as f64 / map.len() as f64),
        "load_factor": round(table.load_factor()),
        "overflow_keys": table.overflow_len(),
        "huge_pages": table.huge_pages(),
        "thp_setting": thp,
    });

    let dists: Vec<Dist> = match args.dist {
        Some(d) => vec![d],
        None => vec![Dist::Uniform, Dist::Zipf],
    };
    for dist in dists {
        let stream = stream_of(&keys, dist, lookups, 0xD157 + dist as u64);
        let (mut h, mut b, mut p) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..runs {
            let (rate, hits) = lookup_hopps(&table, &stream, batch, rb);
            if hits != stream.len() {
                bail!("hopps found {hits} of {} present keys", stream.len());
            }
            h.push(rate);
            let (rate, hits) = lookup_hashbrown(&map, &stream, batch);
            if hits != stream.len() {
                bail!("hashbrown found {hits} of {} present keys", stream.len());
            }
            b.push(rate);
            p.push(probe_reads(&array, &stream, batch, rb));
            note(format!(
                "{} round {r}: hopps {:.1} M/s, hashbrown {:.1} M/s, probe {:.1} M/s",
                dist.name(),
                h[r] / 1e6,
                b[r] / 1e6,
                p[r] / 1e6
            ));
        }
        let mut record = json!({
            "suite": "table",
            "keys": keys.len(),
            "dim": D,
            "dist": dist.name(),
            "batch": batch,
            "runs": runs,
            "lookups_per_s": round(median(&h)),
            "hashbrown_lookups_per_s": round(median(&b)),
            "probe_reads_per_s": round(median(&p)),
            "lookup_vs_hashbrown": round(median(&h) / median(&b)),
            "lookup_vs_probe": round(median(&h) / median(&p)),
            "bulk_load_rows_per_s": round(median(&hopps_rates)),
            "hashbrown_insert_rows_per_s": round(median(&hb_rates)),
            "bulk_load_vs_hashbrown": round(median(&hopps_rates) / median(&hb_rates)),
            "spread": {
                "lookups_per_s": spread(&h),
                "hashbrown_lookups_per_s": spread(&b),
                "probe_reads_per_s": spread(&p),
                "bulk_load_rows_per_s": spread(&hopps_rates),
                "hashbrown_insert_rows_per_s": spread(&hb_rates),
            },
        });
        merge(&mut record, &memory);
        if dist == Dist::Uniform {
            merge(
                &mut record,
                &under_writes(&table, &keys, batch, rb, runs, seconds),
            );
        }
        emit(options, record);
    }
    Ok(())
}

fn merge(into: &mut Value, from: &Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, from) {
        for (k, v) in b {
            a.insert(k.clone(), v.clone());
        }
    }
}

/// One reader alone, then one reader beside one writer applying updates (90% overwrites of
/// random present keys, 10% new keys, in batches of 1000), alternating; each round `seconds`
/// long. New keys stop when the table would have to grow (a growth of a table this size is a
/// separate event, not the steady state measured here).
fn under_writes(
    table: &Table,
    keys: &[u64],
    batch: usize,
    rb: usize,
    runs: usize,
    seconds: f64,
) -> Value {
    let window = Duration::from_secs_f64(seconds);
    let room = ((table.capacity() as f64 * (hopps_table::MAX_LOAD - 0.005)) as usize)
        .saturating_sub(table.len());
    let new_keys = AtomicU64::new(0);
    let mut new_rng = Rng(0xAE5);
    let (mut alone, mut beside, mut writes) = (Vec::new(), Vec::new(), Vec::new());
    let reader = |stop: &AtomicBool, seed: u64| -> f64 {
        let mut rng = Rng(seed);
        let mut ks = vec![0u64; batch];
        let mut out = vec![0u8; batch * rb];
        let mut found = vec![false; batch];
        let mut n = 0usize;
        let t = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            for k in ks.iter_mut() {
                *k = keys[rng.below(keys.len())];
            }
            table.lookup_batch(&ks, &mut out, &mut found);
            n += batch;
        }
        n as f64 / t.elapsed().as_secs_f64()
    };
    for r in 0..runs {
        let stop = AtomicBool::new(false);
        let rate = std::thread::scope(|s| {
            let h = s.spawn(|| reader(&stop, r as u64));
            std::thread::sleep(window);
            stop.store(true, Ordering::Relaxed);
            h.join().expect("reader")
        });
        alone.push(rate);
        let stop = AtomicBool::new(false);
        let written = AtomicU64::new(0);
        let rate = std::thread::scope(|s| {
            let h = s.spawn(|| reader(&stop, 100 + r as u64));
            let (stop, written, new_keys) = (&stop, &written, &new_keys);
            let mut rng = Rng(r as u64 ^ 0x3333);
            let mut seed = new_rng.next();
            s.spawn(move || {
                let mut ks = Vec::with_capacity(1000);
                let rows = vec![7u8; 1000 * rb];
                while !stop.load(Ordering::Relaxed) {
                    ks.clear();
                    for _ in 0..1000 {
                        if rng.below(10) == 0 && (new_keys.load(Ordering::Relaxed) as usize) < room
                        {
                            seed = seed.wrapping_add(1);
                            ks.push(mix(seed ^ 0xF00D_F00D));
                            new_keys.fetch_add(1, Ordering::Relaxed);
                        } else {
                            ks.push(keys[rng.below(keys.len())]);
                        }
                    }
                    table.upsert_batch(&ks, &rows);
                    written.fetch_add(ks.len() as u64, Ordering::Relaxed);
                }
            });
            let t = Instant::now();
            std::thread::sleep(window);
            stop.store(true, Ordering::Relaxed);
            let rate = h.join().expect("reader");
            writes.push(written.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64());
            rate
        });
        beside.push(rate);
        note(format!(
            "reader/writer round {r}: alone {:.1} M/s, beside a writer {:.1} M/s (writer {:.2} M updates/s)",
            alone[r] / 1e6,
            beside[r] / 1e6,
            writes[r] / 1e6
        ));
    }
    json!({
        "read_only_lookups_per_s": round(median(&alone)),
        "lookups_beside_writer_per_s": round(median(&beside)),
        "reader_kept_under_writes": round(median(&beside) / median(&alone)),
        "writer_updates_per_s": round(median(&writes)),
        "writer_new_keys": new_keys.load(Ordering::Relaxed),
    })
}

/// Bytes per entry over table sizes from 1000 to --keys (a geometric sweep with points just
/// below and above powers of two), each table sized for and filled with exactly its keys.
fn sweep<const D: usize>(args: &TableArgs, options: Options) -> Result<()> {
    let max = args
        .keys
        .unwrap_or(if options.quick { 200_000 } else { 20_000_000 });
    let rb = 4 * D;
    let raw = (8 + rb) as f64;
    let mut sizes = Vec::new();
    let mut n = 1000f64;
    while (n as usize) <= max {
        sizes.push(n as usize);
        n *= 1.7;
    }
    let mut p = 1usize << 10;
    while p <= max {
        sizes.extend([p - 1, p + 1].into_iter().filter(|&s| s <= max));
        p <<= 3;
    }
    sizes.sort_unstable();
    sizes.dedup();
    let mut rng = Rng(0x5EE9);
    let mut worst: f64 = 0.0;
    for n in sizes {
        let keys: Vec<u64> = (0..n).map(|_| rng.next()).collect();
        let (table, _) = load_hopps::<D>(&keys);
        let bpe = table.bytes_used() as f64 / table.len() as f64;
        worst = worst.max(bpe / raw);
        // hashbrown grown from empty to n keys has the buckets of `with_capacity(n)`; the
        // allocation is not touched, so this costs no memory.
        let hb = HashMap::<u64, [f32; D]>::with_capacity(n).allocation_size() as f64 / n as f64;
        emit(
            options,
            json!({
                "suite": "table-sweep",
                "keys": n,
                "dim": D,
                "bytes_per_entry": round(bpe),
                "raw_bytes_per_entry": raw,
                "bytes_ratio": round(bpe / raw),
                "load_factor": round(table.load_factor()),
                "overflow_keys": table.overflow_len(),
                "hashbrown_bytes_per_entry": round(hb),
                "hashbrown_bytes_ratio": round(hb / raw),
            }),
        );
    }
    note(format!(
        "dim {D}: worst bytes ratio over the sweep {worst:.4}"
    ));
    Ok(())
}
