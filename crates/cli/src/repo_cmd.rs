//! Commands that work offline against a model repository: `hopps model publish | list |
//! versions` (with `--repo`) and `hopps shard`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hopps_format::{
    InputFile, MissingPolicy, ModelSpec, PublishOptions, PublishProgress, PublishRequest,
    Repository, ShardRequest, StorageOptions, TableInput, TableSpec, VersionKind,
};
use indicatif::{ProgressBar, ProgressStyle};

/// How to reach the storage of a repository. S3 settings left out fall back to the usual AWS
/// environment variables (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
/// AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN).
#[derive(Debug, Clone, clap::Args)]
pub struct StorageArgs {
    /// S3 endpoint URL for S3-compatible stores (e.g. http://127.0.0.1:9000).
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// S3 region (default us-east-1).
    #[arg(long, value_name = "REGION")]
    pub s3_region: Option<String>,
    /// S3 access key id (prefer the AWS_ACCESS_KEY_ID environment variable).
    #[arg(long, value_name = "ID")]
    pub s3_access_key_id: Option<String>,
    /// S3 secret access key (prefer the AWS_SECRET_ACCESS_KEY environment variable).
    #[arg(long, value_name = "KEY", hide_env_values = true)]
    pub s3_secret_access_key: Option<String>,
    /// Address buckets as https://BUCKET.ENDPOINT instead of https://ENDPOINT/BUCKET.
    #[arg(long)]
    pub s3_virtual_host_style: bool,
    /// Give up on any storage operation after this long (e.g. 30s, 500ms, 2m).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub storage_timeout: Duration,
}

impl StorageArgs {
    /// The library's storage options for these flags.
    pub fn options(&self) -> StorageOptions {
        StorageOptions {
            s3_endpoint: self.s3_endpoint.clone(),
            s3_region: self.s3_region.clone(),
            s3_access_key_id: self.s3_access_key_id.clone(),
            s3_secret_access_key: self.s3_secret_access_key.clone(),
            s3_virtual_host_style: self.s3_virtual_host_style,
            timeout: self.storage_timeout,
            ..StorageOptions::default()
        }
    }
}

/// `30s`, `500ms`, `2m`, `1h` or a number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 500ms or 2m"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use ms, s, m or h")),
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("{s:?} must be > 0"));
    }
    Ok(Duration::from_secs_f64(secs))
}

async fn open(repo: &str, storage: &StorageArgs) -> anyhow::Result<Repository> {
    Repository::open(repo, &storage.options())
        .await
        .with_context(|| format!("cannot open model repository {repo}"))
}

/// `hopps model publish`: publish a full version (or a delta) of one table.
#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// Model repository URI (path, file://, s3://bucket/prefix, hdfs://host:port/path).
    #[arg(long, default_value = "./hopps-data")]
    pub repo: String,
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Model name (created on its first publish).
    #[arg(long)]
    pub model: String,
    /// Table name.
    #[arg(long)]
    pub table: String,
    /// Values per row.
    #[arg(long)]
    pub dim: u32,
    /// Input: .parquet, .csv, .tsv, a directory of Parquet files, a pre-sharded directory
    /// (shard=<n>/ subdirectories), or the keys of a .npy pair (with --values). Repeatable;
    /// rows are applied in the order given (the last row of a key wins).
    #[arg(long, required = true, value_name = "FILE")]
    pub input: Vec<PathBuf>,
    /// The float32 (n, dim) values .npy matching a keys .npy --input.
    #[arg(long, value_name = "FILE")]
    pub values: Vec<PathBuf>,
    /// Publish a delta (upserts, and deletes from a `deleted` column) instead of a full version.
    #[arg(long)]
    pub delta: bool,
    /// Parent version of the delta (default: the newest committed version).
    #[arg(long, requires = "delta")]
    pub parent: Option<u64>,
    /// Shards per table when the model is created (a power of two).
    #[arg(long, default_value_t = 8)]
    pub shards: u32,
    /// Storage dtype of a new table: f32, f16, bf16 or int8.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// What a lookup of a missing key returns in a new table: zeros, error or random.
    #[arg(long, default_value = "zeros", value_parser = ["zeros", "error", "random"])]
    pub missing: String,
    /// Seed of the deterministic per-key random init (--missing random).
    #[arg(long, default_value_t = 42)]
    pub init_seed: u64,
    /// Scale of the per-key random init: values uniform in [-scale, scale].
    #[arg(long, default_value_t = 0.01)]
    pub init_scale: f32,
    /// Publish rows holding NaN or infinite values instead of refusing them.
    #[arg(long)]
    pub allow_non_finite: bool,
    /// Recorded in the manifest as the version's source.
    #[arg(long, default_value = "hopps model publish")]
    pub source: String,
    /// Print a JSON summary {"model", "version", "kind", "rows"} instead of text.
    #[arg(long)]
    pub json: bool,
}

fn inputs(args_input: &[PathBuf], values: &[PathBuf]) -> anyhow::Result<Vec<InputFile>> {
    let mut out = Vec::new();
    let mut values = values.iter();
    for p in args_input {
        if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy")) {
            let Some(v) = values.next() else {
                bail!(
                    "{} is a .npy file: give its float32 values with --values FILE",
                    p.display()
                );
            };
            out.push(InputFile::Npy {
                keys: p.clone(),
                values: v.clone(),
            });
        } else {
            out.extend(InputFile::from_path(p)?);
        }
    }
    if values.next().is_some() {
        bail!("more --values files than .npy --input files; give them in pairs");
    }
    Ok(out)
}

fn progress_bar(hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {pos}/{len} rows ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb
}

fn report(pb: &ProgressBar, p: &PublishProgress) {
    if let Some(total) = p.rows_total {
        pb.set_length(total);
    } else {
        pb.set_length(p.rows.max(pb.length().unwrap_or(0)));
    }
    pb.set_position(p.rows);
    pb.set_message(format!("{} ({} files)", p.table, p.files_written));
}

pub async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let inputs = inputs(&args.input, &args.values)?;
    let missing = match args.missing.as_str() {
        "error" => MissingPolicy::Error,
        "random" => MissingPolicy::Random {
            seed: args.init_seed,
            scale: args.init_scale,
        },
        _ => MissingPolicy::Zeros,
    };
    let table = TableSpec {
        dtype: args.dtype.clone(),
        missing,
        ..TableSpec::new(args.table.clone(), args.dim)
    };
    let kind = if args.delta {
        VersionKind::Delta
    } else {
        VersionKind::Full
    };
    let req = PublishRequest {
        model: args.model.clone(),
        kind,
        tables: vec![TableInput {
            table: args.table.clone(),
            dim: args.dim,
            inputs,
        }],
        options: PublishOptions {
            parent: args.parent,
            create: Some(ModelSpec::new(args.model.clone(), args.shards, vec![table])),
            allow_non_finite: args.allow_non_finite,
            source: args.source.clone(),
            max_rows_per_file: None,
        },
    };
    let repo = open(&args.repo, &args.storage).await?;
    let pb = progress_bar(args.json);
    let t0 = Instant::now();
    let pb2 = pb.clone();
    let summary = repo
        .publish(&req, &move |p: &PublishProgress| report(&pb2, p))
        .await
        .with_context(|| {
            format!(
                "publishing model {} to {}: nothing was published",
                args.model, args.repo
            )
        });
    pb.finish_and_clear();
    let summary = summary?;
    let manifest = repo.manifest(&summary.model, summary.version).await?;
    let dups: u64 = manifest.tables.iter().map(|t| t.duplicates).sum();
    if dups > 0 {
        eprintln!(
            "warning: {dups} rows repeat a key seen earlier in this version; the later row of each key wins"
        );
    }
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        let files: usize = manifest.tables.iter().map(|t| t.files.len()).sum();
        println!(
            "published model {} version {} ({}{}, {} rows, {} files, {}) in {:.1} s",
            summary.model,
            summary.version,
            summary.kind,
            manifest
                .parent
                .map(|p| format!(" of {p}"))
                .unwrap_or_default(),
            summary.rows,
            files,
            human_bytes(manifest.bytes()),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// `hopps model list --repo URI`: the models of a repository.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Model repository URI (path, file://, s3://bucket/prefix, hdfs://host:port/path).
    #[arg(long, default_value = "./hopps-data")]
    pub repo: String,
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn list(args: ListArgs) -> anyhow::Result<()> {
    let repo = open(&args.repo, &args.storage).await?;
    let mut rows = Vec::new();
    for name in repo.list_models().await? {
        let spec = repo.model(&name).await?;
        let listing = repo.versions(&name).await?;
        rows.push(serde_json::json!({
            "model": name,
            "shards": spec.shards,
            "tables": spec.tables.iter().map(|t| serde_json::json!({
                "name": t.name, "dim": t.dim, "dtype": t.dtype,
            })).collect::<Vec<_>>(),
            "latest": listing.latest().map(|m| m.version),
            "versions": listing.committed.len(),
            "aborted": listing.aborted,
        }));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no models in {}", args.repo);
        return Ok(());
    }
    println!(
        "{:<24} {:>6} {:>8} {:>8}  TABLES",
        "MODEL", "SHARDS", "LATEST", "VERSIONS"
    );
    for r in &rows {
        let tables: Vec<String> = r["tables"]
            .as_array()
            .map(|ts| {
                ts.iter()
                    .map(|t| {
                        format!(
                            "{}[{} {}]",
                            t["name"].as_str().unwrap_or(""),
                            t["dim"],
                            t["dtype"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<24} {:>6} {:>8} {:>8}  {}",
            r["model"].as_str().unwrap_or(""),
            r["shards"],
            r["latest"]
                .as_u64()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into()),
            r["versions"],
            tables.join(", ")
        );
    }
    Ok(())
}

/// `hopps model versions --repo URI --model M`.
pub async fn versions(
    repo: &str,
    storage: &StorageArgs,
    model: &str,
    json: bool,
) -> anyhow::Result<()> {
    let r = open(repo, storage).await?;
    let listing = r.versions(model).await?;
    if !listing.aborted.is_empty() {
        eprintln!(
            "note: ignored version directories without a manifest (aborted publishes): {}",
            listing
                .aborted
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if json {
        let out: Vec<_> = listing
            .committed
            .iter()
            .map(|m| {
                serde_json::json!({
                    "version": m.version,
                    "kind": m.kind,
                    "parent": m.parent,
                    "rows": m.rows,
                    "created": m.created,
                    "source": m.source,
                    "bytes": m.bytes(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if listing.committed.is_empty() {
        println!("model {model} has no committed versions");
        return Ok(());
    }
    println!(
        "{:>8} {:<6} {:>8} {:>12} {:>10}  {:<20}  SOURCE",
        "VERSION", "KIND", "PARENT", "ROWS", "SIZE", "CREATED"
    );
    for m in &listing.committed {
        println!(
            "{:>8} {:<6} {:>8} {:>12} {:>10}  {:<20}  {}",
            m.version,
            m.kind.as_str(),
            m.parent
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            m.rows,
            human_bytes(m.bytes()),
            m.created,
            m.source
        );
    }
    Ok(())
}

/// `hopps shard`: split unsharded training output into per-shard Parquet files.
#[derive(Debug, clap::Args)]
pub struct ShardArgs {
    /// Input: .parquet, .csv, .tsv, a directory of Parquet files, or the keys of a .npy pair
    /// (with --values). Repeatable.
    #[arg(long, required = true, value_name = "FILE")]
    pub input: Vec<PathBuf>,
    /// The float32 (n, dim) values .npy matching a keys .npy --input.
    #[arg(long, value_name = "FILE")]
    pub values: Vec<PathBuf>,
    /// Output directory (new or empty): shard=<n>/part-*.parquet and _hopps_shards.json.
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// Table name (recorded in the summary).
    #[arg(long, default_value = "default")]
    pub table: String,
    /// Values per row.
    #[arg(long)]
    pub dim: u32,
    /// Shard count of the model the output is for (a power of two).
    #[arg(long)]
    pub shards: u32,
    /// The input is a delta (may hold a `deleted` column).
    #[arg(long)]
    pub delta: bool,
    /// Keep rows holding NaN or infinite values instead of refusing them.
    #[arg(long)]
    pub allow_non_finite: bool,
    /// At most this many rows per output file.
    #[arg(long)]
    pub max_rows_per_file: Option<u64>,
    /// Then publish the output to this repository (with --model).
    #[arg(long, requires = "model")]
    pub repo: Option<String>,
    /// Model to publish to (with --repo); created with --shards shards if it does not exist.
    #[arg(long, requires = "repo")]
    pub model: Option<String>,
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn shard(args: ShardArgs) -> anyhow::Result<()> {
    let inputs = inputs(&args.input, &args.values)?;
    let kind = if args.delta {
        VersionKind::Delta
    } else {
        VersionKind::Full
    };
    let req = ShardRequest {
        table: args.table.clone(),
        dim: args.dim,
        shards: args.shards,
        kind,
        inputs,
        allow_non_finite: args.allow_non_finite,
        max_rows_per_file: args.max_rows_per_file,
    };
    let pb = progress_bar(args.json);
    let pb2 = pb.clone();
    let t0 = Instant::now();
    let summary = hopps_format::shard_to_dir(&req, &args.output, &move |p: &PublishProgress| {
        report(&pb2, p)
    })
    .await
    .with_context(|| format!("sharding into {}", args.output.display()));
    pb.finish_and_clear();
    let summary = summary?;
    let published = match (&args.repo, &args.model) {
        (Some(repo_uri), Some(model)) => {
            let repo = open(repo_uri, &args.storage).await?;
            let preq = PublishRequest {
                model: model.clone(),
                kind,
                tables: vec![TableInput {
                    table: args.table.clone(),
                    dim: args.dim,
                    inputs: InputFile::from_path(&args.output)?,
                }],
                options: PublishOptions {
                    create: Some(ModelSpec::new(
                        model.clone(),
                        args.shards,
                        vec![TableSpec::new(args.table.clone(), args.dim)],
                    )),
                    allow_non_finite: args.allow_non_finite,
                    source: "hopps shard".into(),
                    ..Default::default()
                },
            };
            Some(repo.publish(&preq, &|_| {}).await.with_context(|| {
                format!(
                    "publishing the shards to model {model} in {repo_uri}: nothing was published"
                )
            })?)
        }
        _ => None,
    };
    if args.json {
        let mut v = serde_json::to_value(&summary)?;
        if let Some(p) = &published {
            v["published"] = serde_json::to_value(p)?;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let non_empty = summary
            .files
            .iter()
            .filter_map(|f| f.shard)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        println!(
            "sharded {} rows of table {} into {} files over {}/{} shards in {} ({:.1} s)",
            summary.rows + summary.deletes,
            summary.table,
            summary.files.len(),
            non_empty,
            summary.shards,
            args.output.display(),
            t0.elapsed().as_secs_f64()
        );
        if summary.duplicates > 0 {
            eprintln!(
                "warning: {} rows repeat an earlier key; the later row wins",
                summary.duplicates
            );
        }
        if let Some(p) = published {
            println!(
                "published model {} version {} ({}, {} rows)",
                p.model, p.version, p.kind, p.rows
            );
        }
    }
    Ok(())
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("0s").is_err());
    }
}
