//! Adversarial key families reach load factor >= 0.95 without the overflow area: the mix spreads
//! sequential IDs, keys with only high bits, packed (id << 32 | small) keys and random keys alike.

use hopps_table::Table;
use rand::{Rng, SeedableRng, rngs::StdRng};

fn families(n: u64) -> Vec<(&'static str, Vec<u64>)> {
    let mut rng = StdRng::seed_from_u64(7);
    vec![
        ("sequential", (0..n).collect()),
        ("i << 20", (0..n).map(|i| i << 20).collect()),
        (
            "i << 32 | small",
            (0..n).map(|i| (i / 16) << 32 | (i % 16)).collect(),
        ),
        ("i << 44", (0..n).map(|i| i << 44).collect()),
        ("random", (0..n).map(|_| rng.random()).collect()),
    ]
}

fn fill(keys: &[u64]) -> Table {
    let table = Table::with_capacity(4, keys.len());
    let rows: Vec<u8> = keys
        .iter()
        .flat_map(|&k| (k as u32).to_le_bytes())
        .collect();
    table.upsert_batch(keys, &rows);
    table
}

#[test]
fn key_families_fill_to_095_without_overflow() {
    // Sizes on and off powers of two.
    // The largest size only with `--release` (unoptimised builds are ~20x slower).
    let sizes: &[u64] = if cfg!(debug_assertions) {
        &[1000, 4096, 65_537]
    } else {
        &[1000, 4096, 65_537, 300_000]
    };
    for &n in sizes {
        for (name, keys) in families(n) {
            let table = fill(&keys);
            assert_eq!(table.len(), keys.len(), "{name} n={n}");
            assert!(
                table.load_factor() >= 0.95,
                "{name} n={n}: load factor {}",
                table.load_factor()
            );
            assert_eq!(
                table.overflow_len(),
                0,
                "{name} n={n}: keys in the overflow area"
            );
            let mut out = [0u8; 4];
            for &k in keys.iter().step_by(97) {
                assert!(table.get(k, &mut out), "{name}: lost {k}");
                assert_eq!(out, (k as u32).to_le_bytes());
            }
        }
    }
}

#[test]
fn sized_table_does_not_grow_when_filled() {
    let keys: Vec<u64> = (0..100_000).collect();
    let table = Table::with_capacity(4, keys.len());
    let capacity = table.capacity();
    for &k in &keys {
        table.upsert(k, &[1, 2, 3, 4]);
    }
    assert_eq!(
        table.capacity(),
        capacity,
        "a table sized for N grew while loading N"
    );
}
