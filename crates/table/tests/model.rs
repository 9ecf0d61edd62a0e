//! Property tests: random sequences of upserts, deletes, lookups and growth against
//! `std::collections::HashMap`, plus the overflow area driven by keys built to share one home.

use hopps_table::{Table, mix};
use proptest::prelude::*;
use std::collections::HashMap;

#[derive(Clone, Debug)]
enum Op {
    Upsert(u64, u8),
    Delete(u64),
    Get(u64),
    Batch(Vec<u64>),
    Reserve(u16),
}

fn key() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..300,
        (0u64..300).prop_map(|k| k << 32),
        (0u64..300).prop_map(|k| u64::MAX - k),
        any::<u64>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (key(), any::<u8>()).prop_map(|(k, v)| Op::Upsert(k, v)),
        2 => key().prop_map(Op::Delete),
        2 => key().prop_map(Op::Get),
        1 => prop::collection::vec(key(), 0..50).prop_map(Op::Batch),
        1 => any::<u16>().prop_map(Op::Reserve),
    ]
}

fn row(k: u64, v: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (k as u8) ^ v.wrapping_add(i as u8))
        .collect()
}

proptest! {
    // Fewer cases in unoptimised builds (CI's `cargo test`), more with `--release`.
    #![proptest_config(ProptestConfig { cases: if cfg!(debug_assertions) { 48 } else { 256 }, ..ProptestConfig::default() })]

    #[test]
    fn behaves_like_a_hashmap(ops in prop::collection::vec(op(), 1..600), row_len in 1usize..40) {
        let table = Table::new(row_len);
        let mut model: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut out = vec![0u8; row_len];
        for op in ops {
            match op {
                Op::Upsert(k, v) => {
                    let r = row(k, v, row_len);
                    table.upsert(k, &r);
                    model.insert(k, r);
                }
                Op::Delete(k) => prop_assert_eq!(table.delete(k), model.remove(&k).is_some()),
                Op::Get(k) => {
                    prop_assert_eq!(table.get(k, &mut out), model.contains_key(&k));
                    if let Some(r) = model.get(&k) {
                        prop_assert_eq!(&out, r);
                    }
                }
                Op::Batch(keys) => {
                    let mut buf = vec![0u8; keys.len() * row_len];
                    let mut found = vec![false; keys.len()];
                    let n = table.lookup_batch(&keys, &mut buf, &mut found);
                    prop_assert_eq!(n, keys.iter().filter(|k| model.contains_key(k)).count());
                    for (i, k) in keys.iter().enumerate() {
                        prop_assert_eq!(found[i], model.contains_key(k));
                        if let Some(r) = model.get(k) {
                            prop_assert_eq!(&buf[i * row_len..(i + 1) * row_len], &r[..]);
                        }
                    }
                }
                Op::Reserve(n) => table.reserve(n as usize),
            }
            prop_assert_eq!(table.len(), model.len());
        }
        table.check_invariants().map_err(TestCaseError::fail)?;
        let mut seen = HashMap::new();
        table.for_each(|k, r| { seen.insert(k, r.to_vec()); });
        prop_assert_eq!(seen, model);
    }
}

#[path = "common/differential.rs"]
#[allow(dead_code)]
mod differential_driver;
use differential_driver::unmix;

#[test]
fn unmix_inverts_mix() {
    for k in [0, 1, 42, u64::MAX, 1 << 40] {
        assert_eq!(unmix(mix(k)), k);
        assert_eq!(mix(unmix(k)), k);
    }
}

/// Keys that all share one home: 224 fit its neighbourhood, the rest must go to the overflow
/// area, which grows (the table does not need more slots) until every key fits.
#[test]
fn crowded_home_uses_the_overflow_area() {
    let table = Table::with_capacity(8, 1000);
    // Homes are buckets of 7 slots; hashes this close together share one home.
    let buckets = table.capacity() as u128 / 7;
    let home = 100u128;
    let base = (home << 64).div_ceil(buckets);
    let keys: Vec<u64> = (0..300u64)
        .map(|i| unmix((base + i as u128) as u64))
        .collect();
    for &k in &keys {
        table.upsert(k, &k.to_le_bytes());
    }
    // Ordinary keys around them still work.
    for k in 0..500u64 {
        table.upsert(k, &(!k).to_le_bytes());
    }
    // A neighbourhood is 32 buckets of 7 slots: at most 224 of them fit there.
    assert!(
        table.overflow_len() >= 300 - 224,
        "overflow holds {}",
        table.overflow_len()
    );
    assert_eq!(table.len(), 800);
    table.check_invariants().unwrap();
    let mut out = [0u8; 8];
    for &k in &keys {
        assert!(table.get(k, &mut out), "crowded key {k} lost");
        assert_eq!(out, k.to_le_bytes());
    }
    let mut buf = vec![0u8; keys.len() * 8];
    let mut found = vec![false; keys.len()];
    assert_eq!(table.lookup_batch(&keys, &mut buf, &mut found), keys.len());
    // Deleting from the middle of the overflow area moves its last entry; all stay findable.
    for &k in keys.iter().step_by(3) {
        assert!(table.delete(k));
    }
    for (i, &k) in keys.iter().enumerate() {
        assert_eq!(table.get(k, &mut out), i % 3 != 0, "key {i}");
    }
    for k in 0..500u64 {
        assert!(table.get(k, &mut out));
        assert_eq!(out, (!k).to_le_bytes());
    }
    table.check_invariants().unwrap();
}
