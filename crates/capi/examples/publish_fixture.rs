//! Publishes the models that the C and Go test suites look up, into a model repository.
//!
//! ```text
//! cargo run -p hopps-capi --example publish_fixture -- REPO [--bench-keys N]
//! ```
//!
//! Model `capi` (4 shards), every float exactly representable so tests compare bit for bit:
//! - table `user`, dim 4, keys 0..2000: float j of key k is `k + j / 8`;
//! - table `item`, dim 8, keys 0..500: float j of key k is `-(k) - j / 4`.
//!
//! Missing keys read as zeros. With `--bench-keys N`, also model `bench` with table `emb`
//! (dim 32, keys 0..N) for the lookup benchmark.

use hopps_format::{
    ModelSpec, PublishOptions, Repository, StorageOptions, TableArrays, TableSpec, VersionKind,
};

fn rows(keys: &[u64], dim: u32, value: impl Fn(u64, u32) -> f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(keys.len() * dim as usize);
    for &k in keys {
        out.extend((0..dim).map(|j| value(k, j)));
    }
    out
}

async fn publish(
    repo: &Repository,
    model: &str,
    shards: u32,
    tables: &[TableArrays<'_>],
) -> Result<u64, String> {
    let spec = ModelSpec::new(
        model,
        shards,
        tables
            .iter()
            .map(|t| TableSpec::new(t.table, t.dim))
            .collect(),
    );
    let summary = repo
        .publish_arrays(
            model,
            VersionKind::Full,
            tables,
            &PublishOptions {
                create: Some(spec),
                source: "hopps-capi test fixture".to_string(),
                ..PublishOptions::default()
            },
        )
        .await
        .map_err(|err| format!("publishing model {model:?}: {err}"))?;
    Ok(summary.version)
}

async fn run(repo_uri: &str, bench_keys: u64) -> Result<(), String> {
    let repo = Repository::open(repo_uri, &StorageOptions::default())
        .await
        .map_err(|err| format!("opening repository {repo_uri}: {err}"))?;

    let user_keys: Vec<u64> = (0..2000).collect();
    let user_values = rows(&user_keys, 4, |k, j| k as f32 + j as f32 / 8.0);
    let item_keys: Vec<u64> = (0..500).collect();
    let item_values = rows(&item_keys, 8, |k, j| -(k as f32) - j as f32 / 4.0);
    let version = publish(
        &repo,
        "capi",
        4,
        &[
            TableArrays {
                table: "user",
                dim: 4,
                keys: &user_keys,
                values: &user_values,
                deleted: None,
            },
            TableArrays {
                table: "item",
                dim: 8,
                keys: &item_keys,
                values: &item_values,
                deleted: None,
            },
        ],
    )
    .await?;
    println!("published model capi version {version}");

    if bench_keys > 0 {
        let keys: Vec<u64> = (0..bench_keys).collect();
        let values = rows(&keys, 32, |k, j| (k % 4096) as f32 + j as f32 / 64.0);
        let version = publish(
            &repo,
            "bench",
            8,
            &[TableArrays {
                table: "emb",
                dim: 32,
                keys: &keys,
                values: &values,
                deleted: None,
            }],
        )
        .await?;
        println!("published model bench version {version} ({bench_keys} keys, dim 32)");
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: publish_fixture REPO [--bench-keys N]";
    let (repo, bench_keys) = match args.as_slice() {
        [repo] => (repo.clone(), 0),
        [repo, flag, n] if flag == "--bench-keys" => match n.parse::<u64>() {
            Ok(n) => (repo.clone(), n),
            Err(_) => {
                eprintln!("--bench-keys takes a number of keys, not {n:?}; {usage}");
                return std::process::ExitCode::FAILURE;
            }
        },
        _ => {
            eprintln!("{usage}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start a runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&repo, bench_keys)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
