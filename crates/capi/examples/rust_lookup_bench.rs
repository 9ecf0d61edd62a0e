//! The Rust-client side of the Go-versus-Rust lookup benchmark (go/cmd/lookupbench runs this
//! binary in rounds interleaved with its own, then compares medians).
//!
//! ```text
//! rust_lookup_bench ADDR MODEL TABLE KEYS_PER_LOOKUP KEY_SPACE ITERATIONS SEED
//! ```
//!
//! One caller, closed loop: each lookup of KEYS_PER_LOOKUP keys (drawn by the same xorshift
//! generator as the Go side, from SEED) waits for the previous one. Prints one line:
//! `rust p50_us=.. p99_us=.. keys_per_s=..`.

use std::time::Instant;

/// xorshift64*: the Go side draws the same sequence from the same seed.
struct Keys(u64);

impl Keys {
    fn next(&mut self, space: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % space
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, name: &str) -> Result<T, String> {
    args.get(i)
        .ok_or_else(|| format!("missing {name}"))?
        .parse()
        .map_err(|_| format!("{name} {:?} is not a number", args[i]))
}

async fn run(args: &[String]) -> Result<String, String> {
    let usage =
        "usage: rust_lookup_bench ADDR MODEL TABLE KEYS_PER_LOOKUP KEY_SPACE ITERATIONS SEED";
    let [addr, model, table, ..] = args else {
        return Err(usage.to_string());
    };
    let per_lookup: usize = arg(args, 3, "KEYS_PER_LOOKUP")?;
    let space: u64 = arg(args, 4, "KEY_SPACE")?;
    let iterations: usize = arg(args, 5, "ITERATIONS")?;
    let seed: u64 = arg(args, 6, "SEED")?;
    if space == 0 || iterations == 0 {
        return Err("KEY_SPACE and ITERATIONS must be positive".to_string());
    }
    let client = hopps_client::Client::connect(addr)
        .await
        .map_err(|err| err.to_string())?;
    let mut draw = Keys(seed | 1);
    let mut keys = vec![0u64; per_lookup];
    // Warm-up: connection, server caches, allocator.
    for _ in 0..iterations / 10 + 1 {
        keys.iter_mut().for_each(|k| *k = draw.next(space));
        client
            .lookup(model, table, &keys)
            .await
            .map_err(|err| err.to_string())?;
    }
    let mut latencies = Vec::with_capacity(iterations);
    let start = Instant::now();
    for _ in 0..iterations {
        keys.iter_mut().for_each(|k| *k = draw.next(space));
        let t = Instant::now();
        let rows = client
            .lookup(model, table, &keys)
            .await
            .map_err(|err| err.to_string())?;
        latencies.push(t.elapsed());
        if rows.found.len() != per_lookup {
            return Err(format!(
                "asked {per_lookup} keys, got {} rows",
                rows.found.len()
            ));
        }
    }
    let total = start.elapsed();
    latencies.sort_unstable();
    let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    Ok(format!(
        "rust p50_us={:.1} p99_us={:.1} keys_per_s={:.0}",
        pick(0.5).as_secs_f64() * 1e6,
        pick(0.99).as_secs_f64() * 1e6,
        (iterations * per_lookup) as f64 / total.as_secs_f64()
    ))
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start a runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(line) => {
            println!("{line}");
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
