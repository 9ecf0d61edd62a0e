//! Checkpoint and version loads from a local model repository.
//!
//! Goal (issue 3): reading a ~1 GB `.hps` checkpoint into tables runs at >= 0.5x the rate of
//! copying the same bytes into freshly allocated memory, measured in the same run. Parquet
//! loads of the same rows are reported as rows/s and as a ratio to the `.hps` load.
//!
//! Every round measures, interleaved: the memory-copy baseline, the segment read alone, the
//! segment read plus inserting every row into a `hopps_table::Table`, and the Parquet read of
//! the same rows. Files are read right after being written, so they come from the page cache:
//! the figures are the software's cost, not a disk's.

use std::time::Instant;

use hopps_format::{
    PublishOptions, Repository, StorageOptions, TableArrays, TableSpec, VersionKind,
};

use crate::Options;
use crate::measure::{Spread, ratio};
use crate::report::{Record, Report};

#[derive(Debug, clap::Args)]
pub struct CheckpointArgs {
    /// Bytes of keys and rows in the checkpoint (default 1 GiB; --quick: 64 MiB).
    #[arg(long)]
    pub bytes: Option<u64>,
    /// Values per row (f32 rows, as a table of dtype f32 stores them).
    #[arg(long, default_value_t = 64)]
    pub dim: u32,
    /// Shards of the model: one segment per shard.
    #[arg(long, default_value_t = 8)]
    pub shards: u32,
    /// Measured rounds (median reported).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
}

pub fn run(args: &CheckpointArgs, options: Options) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(args, options))
}

async fn run_async(args: &CheckpointArgs, options: Options) -> anyhow::Result<()> {
    let report = Report { json: options.json };
    let target = args
        .bytes
        .unwrap_or(if options.quick { 64 << 20 } else { 1 << 30 });
    let rounds = if options.quick { 2 } else { args.rounds.max(1) };
    let dim = args.dim as usize;
    let row_bytes = dim * 4;
    let rows = (target / (8 + row_bytes as u64)) as usize;
    let shards = args.shards.max(1);

    let dir = tempfile::tempdir()?;
    let repo = Repository::open(
        dir.path().to_str().unwrap_or("."),
        &StorageOptions::default(),
    )
    .await?;

    // The rows: keys spread over the whole u64 range, values a cheap function of key and column.
    report.note(&format!(
        "generating {rows} rows of dim {dim} ({:.0} MiB)",
        (rows * (8 + row_bytes)) as f64 / 1048576.0
    ));
    let keys: Vec<u64> = (0..rows as u64)
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        .collect();
    let values: Vec<f32> = (0..rows * dim).map(|i| (i % 1000) as f32 * 0.001).collect();

    report.note("publishing the rows as a Parquet version");
    let create = create_options(shards, args.dim);
    repo.publish_arrays(
        "bench",
        VersionKind::Full,
        &[TableArrays {
            table: "emb",
            dim: args.dim,
            keys: &keys,
            values: &values,
            deleted: None,
        }],
        &create,
    )
    .await?;
    let version = repo.manifest("bench", 1).await?;

    report.note("writing the checkpoint: one .hps segment per shard");
    let mut per_shard: Vec<(Vec<u64>, Vec<u8>)> =
        (0..shards).map(|_| (Vec::new(), Vec::new())).collect();
    for (i, &k) in keys.iter().enumerate() {
        let s = &mut per_shard[hopps_format::shard_of(k, shards) as usize];
        s.0.push(k);
        for v in &values[i * dim..(i + 1) * dim] {
            s.1.extend_from_slice(&v.to_le_bytes());
        }
    }
    drop(values);
    let mut w = repo.checkpoint_writer("bench", 1).await?;
    for (s, (k, r)) in per_shard.iter().enumerate() {
        w.write_segment("emb", s as u32, "f32", args.dim, row_bytes as u32, k, r)
            .await?;
    }
    let checkpoint = w.commit(None).await?;
    drop(per_shard);
    let files = checkpoint.tables[0].files.clone();
    let file_bytes: u64 = files.iter().map(|f| f.bytes).sum();
    let payload = (rows * (8 + row_bytes)) as u64;

    // The baseline's source: the same bytes, already in memory.
    let seg_dir = dir.path().join(Repository::version_dir(&checkpoint));
    let sources: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(seg_dir.join(&f.path)))
        .collect::<Result<_, _>>()?;

    let (mut copy, mut read, mut into_table, mut parquet) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        report.note(&format!("round {}/{rounds}", round + 1));
        // Baseline: copy the segment bytes into freshly allocated memory.
        let t = Instant::now();
        let mut sink = 0usize;
        for src in &sources {
            let mut dst = Vec::with_capacity(src.len());
            dst.extend_from_slice(src);
            sink = sink.wrapping_add(dst[dst.len() / 2] as usize);
        }
        copy.push(file_bytes as f64 / t.elapsed().as_secs_f64());
        std::hint::black_box(sink);

        // The segments alone: fetch, verify every checksum, split into keys and rows.
        let t = Instant::now();
        let mut n = 0usize;
        for f in &files {
            n += repo.read_segment(&checkpoint, f).await?.len();
        }
        read.push(file_bytes as f64 / t.elapsed().as_secs_f64());
        anyhow::ensure!(n == rows, "read {n} rows, wrote {rows}");

        // Into tables: what a restart does, one table per shard sized from the segment.
        let t = Instant::now();
        let mut tables = Vec::with_capacity(files.len());
        for f in &files {
            let seg = repo.read_segment(&checkpoint, f).await?;
            let table = hopps_table::Table::with_capacity(row_bytes, seg.len());
            table.upsert_batch(&seg.keys, &seg.rows);
            tables.push(table);
        }
        into_table.push(file_bytes as f64 / t.elapsed().as_secs_f64());
        anyhow::ensure!(
            tables.iter().map(|t| t.len()).sum::<usize>() == rows,
            "rows lost loading tables"
        );
        drop(tables);

        // The same rows from the Parquet version, decoded to f32 batches.
        let t = Instant::now();
        let mut reader = repo.read_table(&version, "emb").await?;
        let mut n = 0usize;
        while let Some(b) = reader.next_batch().await? {
            n += b.len();
        }
        parquet.push(rows as f64 / t.elapsed().as_secs_f64());
        anyhow::ensure!(n == rows, "parquet: read {n} rows, wrote {rows}");
    }

    let med = |v: &[f64]| Spread::of(v).map(|s| s.median).unwrap_or(0.0);
    let (copy_bps, read_bps, table_bps, pq_rows) =
        (med(&copy), med(&read), med(&into_table), med(&parquet));
    let hps_rows = table_bps / file_bytes as f64 * rows as f64;
    let mut r = Record::new("checkpoint");
    r.set("rows", rows as u64)
        .set("dim", args.dim)
        .set("segments", files.len() as u64)
        .set("payload_mib", payload as f64 / 1048576.0)
        .set("file_mib", file_bytes as f64 / 1048576.0)
        .set("memcpy_gib_s", copy_bps / 1073741824.0)
        .set("hps_read_gib_s", read_bps / 1073741824.0)
        .set("hps_into_table_gib_s", table_bps / 1073741824.0)
        .set(
            "hps_read_vs_memcpy",
            ratio(read_bps, copy_bps).unwrap_or(0.0),
        )
        .set(
            "hps_into_table_vs_memcpy",
            ratio(table_bps, copy_bps).unwrap_or(0.0),
        )
        .set("hps_into_table_rows_s", hps_rows)
        .set("parquet_rows_s", pq_rows)
        .set(
            "parquet_vs_hps_into_table",
            ratio(pq_rows, hps_rows).unwrap_or(0.0),
        )
        .set("goal_hps_into_table_vs_memcpy", 0.5);
    report.emit(&r);
    Ok(())
}

fn create_options(shards: u32, dim: u32) -> PublishOptions {
    PublishOptions {
        create: Some(hopps_format::ModelSpec::new(
            "bench",
            shards,
            vec![TableSpec::new("emb", dim)],
        )),
        source: "hopps-bench checkpoint".into(),
        ..Default::default()
    }
}
