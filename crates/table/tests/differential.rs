//! Runs the fuzz target's differential driver on stable: a fixed corpus of edge cases and a few
//! thousand seeded random inputs.

use rand::{Rng, SeedableRng, rngs::StdRng};

#[path = "common/differential.rs"]
#[allow(dead_code)]
mod differential_driver;

#[test]
fn fixed_corpus() {
    let corpus: &[&[u8]] = &[
        &[],
        &[0],
        &[0, 0, 0, 0],
        &[0, 0, 3, 255, 1, 0, 3, 255],
        &[1, 0, 3, 0, 4, 3, 3, 0, 4, 3, 3, 0],
        &[
            0, 5, 200, 1, 1, 1, 2, 1, 3, 1, 4, 1, 5, 6, 10, 1, 1, 1, 2, 1, 3,
        ],
    ];
    for data in corpus {
        differential_driver::run(data);
    }
}

#[test]
fn random_inputs() {
    let mut rng = StdRng::seed_from_u64(0x1234);
    // Fewer inputs in unoptimised builds (CI's `cargo test`), more with `--release`.
    let inputs = if cfg!(debug_assertions) { 500 } else { 3000 };
    for i in 0..inputs {
        let len = rng.random_range(0..2000);
        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        differential_driver::run(&data);
        // Odd row sizes exercise partial words.
        if i % 10 == 0 {
            differential_driver::run_with_row(&data, 1 + i % 13);
        }
    }
}
