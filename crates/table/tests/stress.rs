//! A writer rewrites rows whose content is derived from (key, generation), inserts new keys (so
//! the table grows under the readers) and deletes some, while reader threads check every row
//! they get. Zero torn rows allowed.
//!
//! Scale with `HOPPS_STRESS_KEYS` (default 20 000, 8 000 unoptimised) and
//! `HOPPS_STRESS_GENERATIONS` (default 30, 12 unoptimised).

use hopps_table::Table;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

const ROW: usize = 64;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// 16 words: key low/high, generation, then words derived from all three.
fn row(key: u64, generation: u32) -> [u8; ROW] {
    let mut r = [0u8; ROW];
    let mut x = key ^ ((generation as u64) << 40) ^ 0x2545_F491_4F6C_DD1D;
    r[0..4].copy_from_slice(&(key as u32).to_le_bytes());
    r[4..8].copy_from_slice(&((key >> 32) as u32).to_le_bytes());
    r[8..12].copy_from_slice(&generation.to_le_bytes());
    for chunk in r[12..].chunks_exact_mut(4) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&(x as u32).to_le_bytes());
    }
    r
}

/// The generation of a whole row of `key`, or None if the row is torn or belongs to another key.
fn check(key: u64, r: &[u8]) -> Option<u32> {
    let generation = u32::from_le_bytes([r[8], r[9], r[10], r[11]]);
    (row(key, generation)[..] == r[..]).then_some(generation)
}

#[test]
fn readers_never_see_torn_rows() {
    // Smaller by default in unoptimised builds (CI's `cargo test`).
    let debug = cfg!(debug_assertions);
    let keys = env("HOPPS_STRESS_KEYS", if debug { 8_000 } else { 20_000 });
    let generations = env("HOPPS_STRESS_GENERATIONS", if debug { 12 } else { 30 }) as u32;
    // Sized for half the keys: the second half arrives during the run and grows the table.
    let table = Table::with_capacity(ROW, keys as usize / 2);
    for k in 0..keys / 2 {
        table.upsert(k, &row(k, 0));
    }
    let start_capacity = table.capacity();
    let done = AtomicBool::new(false);
    let checked = AtomicU64::new(0);
    let newer = AtomicU64::new(0);
    thread::scope(|s| {
        for reader in 0..3u64 {
            let (table, done, checked, newer) = (&table, &done, &checked, &newer);
            s.spawn(move || {
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ reader;
                let batch = 256;
                let mut ks = vec![0u64; batch];
                let mut out = vec![0u8; batch * ROW];
                let mut found = vec![false; batch];
                let mut one = [0u8; ROW];
                let (mut n, mut later) = (0u64, 0u64);
                while !done.load(Ordering::Relaxed) {
                    for k in ks.iter_mut() {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        *k = x % keys;
                    }
                    table.lookup_batch(&ks, &mut out, &mut found);
                    for (i, &k) in ks.iter().enumerate() {
                        if found[i] {
                            let g = check(k, &out[i * ROW..(i + 1) * ROW])
                                .unwrap_or_else(|| panic!("torn or foreign row for key {k}"));
                            later += (g > 0) as u64;
                            n += 1;
                        }
                    }
                    let k = x % keys;
                    if table.get(k, &mut one) {
                        check(k, &one).unwrap_or_else(|| panic!("torn row from get for key {k}"));
                        n += 1;
                    }
                }
                checked.fetch_add(n, Ordering::Relaxed);
                newer.fetch_add(later, Ordering::Relaxed);
            });
        }
        let table = &table;
        let done = &done;
        s.spawn(move || {
            let mut batch_keys = Vec::new();
            let mut batch_rows = Vec::new();
            for g in 1..=generations {
                // The new keys of this generation: the table grows while readers run.
                let upto = keys / 2 + (keys / 2) * g as u64 / generations as u64;
                for k in 0..upto {
                    if k % 64 == g as u64 % 64 {
                        // Some keys go away and come back next generation.
                        table.delete(k);
                        continue;
                    }
                    if k % 2 == 0 {
                        table.upsert(k, &row(k, g));
                    } else {
                        batch_keys.push(k);
                        batch_rows.extend_from_slice(&row(k, g));
                        if batch_keys.len() == 100 {
                            table.upsert_batch(&batch_keys, &batch_rows);
                            batch_keys.clear();
                            batch_rows.clear();
                        }
                    }
                }
                table.upsert_batch(&batch_keys, &batch_rows);
                batch_keys.clear();
                batch_rows.clear();
            }
            done.store(true, Ordering::Relaxed);
        });
    });
    assert!(
        checked.load(Ordering::Relaxed) > 0,
        "readers checked no rows"
    );
    assert!(
        newer.load(Ordering::Relaxed) > 0,
        "readers never saw a rewritten row"
    );
    assert!(
        table.capacity() > start_capacity,
        "the table never grew under the readers"
    );
    table.check_invariants().unwrap();
    let mut out = [0u8; ROW];
    for k in 0..keys {
        if table.get(k, &mut out) {
            assert_eq!(
                check(k, &out),
                Some(generations),
                "key {k} has a stale row at the end"
            );
        }
    }
}
