//! The differential driver shared by the fuzz target and `cargo test`: it decodes bytes into a
//! sequence of table operations, applies each to a `Table` and to a `HashMap`, and panics on the
//! first difference. Rows are derived from (key, write counter) so that a wrong or torn row shows.

use hopps_table::Table;
use std::collections::HashMap;

/// Row size of the driven table: 12 bytes is not a multiple of 8, and 3 words exercise the
/// word-wise copies; odd sizes are covered by `run_with_row`.
pub const ROW: usize = 12;

fn row_of(key: u64, n: u64, len: usize) -> Vec<u8> {
    let mut r = Vec::with_capacity(len);
    let mut x = key ^ n.rotate_left(29) ^ 0x5851_F42D_4C95_7F2D;
    while r.len() < len {
        x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(n);
        r.extend_from_slice(&x.to_le_bytes());
    }
    r.truncate(len);
    r
}

/// A tiny cursor over fuzz bytes; running out of bytes ends the run.
struct Bytes<'a>(&'a [u8]);
impl Bytes<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn key(&mut self, recent: &[u64]) -> Option<u64> {
        // Keys come from a small pool (so that overwrites and deletes hit), from recent keys, or
        // from the extremes; the pool is spread by shifts to hit several key families.
        let sel = self.u8()?;
        let v = self.u8()? as u64;
        Some(match sel % 7 {
            0 => v,
            1 => v << 20,
            2 => (v << 32) | (sel as u64 >> 3),
            3 => u64::MAX - v,
            4 => recent
                .get(v as usize % recent.len().max(1))
                .copied()
                .unwrap_or(v),
            // Keys whose mixes share their top 56 bits: one home in any table, so they crowd
            // one neighbourhood and spill into the overflow area.
            5 => unmix(0x8000_0000_0000_0000 | v),
            _ => v.wrapping_mul(0xD6E8_FEB8_6659_FD93),
        })
    }
}

/// Inverse of `hopps_table::mix`, to build keys with chosen hashes.
pub fn unmix(mut x: u64) -> u64 {
    fn inv_xorshift(y: u64, s: u32) -> u64 {
        let mut x = y;
        for _ in 0..64 / s {
            x = y ^ (x >> s);
        }
        x
    }
    fn inv_mul(m: u64) -> u64 {
        // Newton's iteration for the inverse modulo 2^64 of an odd number.
        let mut inv = m;
        for _ in 0..6 {
            inv = inv.wrapping_mul(2u64.wrapping_sub(m.wrapping_mul(inv)));
        }
        inv
    }
    x = inv_xorshift(x, 31);
    x = x.wrapping_mul(inv_mul(0x94D0_49BB_1331_11EB));
    x = inv_xorshift(x, 27);
    x = x.wrapping_mul(inv_mul(0xBF58_476D_1CE4_E5B9));
    x = inv_xorshift(x, 30);
    x ^ 0x9E37_79B9_7F4A_7C15
}

/// Runs the operations encoded in `data` with rows of `ROW` bytes.
pub fn run(data: &[u8]) {
    run_with_row(data, ROW);
}

/// Runs the operations encoded in `data` against a table of `row` byte rows.
pub fn run_with_row(data: &[u8], row: usize) {
    let mut bytes = Bytes(data);
    let start = bytes.u8().map_or(0, |b| b as usize * 4);
    let table = Table::with_capacity(row, start);
    let mut model: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut recent: Vec<u64> = Vec::new();
    let mut n = 0u64;
    let mut out = vec![0u8; row];
    while let Some(op) = bytes.u8() {
        n += 1;
        match op % 8 {
            0..=2 => {
                let Some(k) = bytes.key(&recent) else { break };
                let r = row_of(k, n, row);
                table.upsert(k, &r);
                model.insert(k, r);
                recent.push(k);
            }
            3 => {
                let Some(k) = bytes.key(&recent) else { break };
                assert_eq!(table.delete(k), model.remove(&k).is_some(), "delete {k}");
            }
            4 => {
                let Some(k) = bytes.key(&recent) else { break };
                let hit = table.get(k, &mut out);
                assert_eq!(hit, model.contains_key(&k), "get {k}");
                if let Some(r) = model.get(&k) {
                    assert_eq!(&out, r, "row of {k}");
                }
            }
            5 => {
                let Some(len) = bytes.u8() else { break };
                let mut keys = Vec::new();
                let mut rows = Vec::new();
                for _ in 0..len % 40 {
                    let Some(k) = bytes.key(&recent) else { break };
                    let r = row_of(k, n + keys.len() as u64, row);
                    rows.extend_from_slice(&r);
                    model.insert(k, r);
                    keys.push(k);
                }
                table.upsert_batch(&keys, &rows);
                recent.extend_from_slice(&keys);
            }
            6 => {
                let Some(len) = bytes.u8() else { break };
                let keys: Vec<u64> = (0..len % 64).map_while(|_| bytes.key(&recent)).collect();
                // A stride shorter than the row checks partial copies.
                let stride = if op & 0x80 != 0 { row / 2 } else { row };
                let mut buf = vec![0xEEu8; keys.len() * stride];
                let mut found = vec![false; keys.len()];
                let hits = table.lookup_batch(&keys, &mut buf, &mut found);
                let mut expect = 0;
                for (i, k) in keys.iter().enumerate() {
                    let got = &buf[i * stride..(i + 1) * stride];
                    match model.get(k) {
                        Some(r) => {
                            expect += 1;
                            assert!(found[i], "lookup_batch missed {k}");
                            assert_eq!(got, &r[..stride], "lookup_batch row of {k}");
                        }
                        None => {
                            assert!(!found[i], "lookup_batch found absent {k}");
                            assert!(got.iter().all(|&b| b == 0xEE), "row of absent {k} written");
                        }
                    }
                }
                assert_eq!(hits, expect);
            }
            _ => {
                let Some(extra) = bytes.u8() else { break };
                table.reserve(extra as usize * 8);
            }
        }
        if recent.len() > 256 {
            recent.drain(..128);
        }
        assert_eq!(table.len(), model.len());
    }
    table.check_invariants().expect("invariants");
    let mut seen = HashMap::new();
    table.for_each(|k, r| {
        assert!(
            seen.insert(k, r.to_vec()).is_none(),
            "for_each visited {k} twice"
        );
    });
    assert_eq!(seen, model, "for_each differs from the model");
    assert!(table.load_factor() <= 1.0);
}
