//! The data and the requests both systems get: the same keys, the same rows, the same batches.
//!
//! Keys are what recommendation features look like after hashing: 64-bit values spread over
//! the whole range. They are derived from their index by a bijective mix, so they are distinct
//! without a set to deduplicate them, and any suite can recompute row `i` without storing it.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// splitmix64's finalizer: a bijection on u64, so distinct inputs give distinct keys.
pub fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The key of row `i` of a data set with `seed`.
pub fn key_of(seed: u64, i: u64) -> u64 {
    mix(i.wrapping_add(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

/// Value `j` of the row of `key` at `generation`: deterministic, finite, in [-0.5, 0.5).
/// A later generation of the same key differs, so a suite can tell which version it reads.
pub fn value_of(key: u64, generation: u32, j: u32) -> f32 {
    let h = mix(key ^ (u64::from(generation) << 32 | u64::from(j)));
    ((h >> 40) as f32) / (1u64 << 24) as f32 - 0.5
}

/// `keys.len() * dim` values, row after row, for `generation`.
pub fn rows_of(keys: &[u64], dim: u32, generation: u32) -> Vec<f32> {
    let mut values = Vec::with_capacity(keys.len() * dim as usize);
    for &key in keys {
        values.extend((0..dim).map(|j| value_of(key, generation, j)));
    }
    values
}

/// Rows as packed little-endian f32 bytes: what a team stores in Redis, what hopps sends.
pub fn row_bytes_of(values: &[f32], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// How lookup keys are drawn from the data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dist {
    Uniform,
    /// Zipf with exponent 0.99: a few keys are very hot, as feature IDs are.
    Zipf,
}

impl Dist {
    pub fn as_str(self) -> &'static str {
        match self {
            Dist::Uniform => "uniform",
            Dist::Zipf => "zipf",
        }
    }

    pub fn parse(s: &str) -> Option<Dist> {
        match s {
            "uniform" => Some(Dist::Uniform),
            "zipf" => Some(Dist::Zipf),
            _ => None,
        }
    }
}

/// Exponent of the Zipf distribution the suites use.
pub const ZIPF_EXPONENT: f64 = 0.99;

/// Draws ranks `0..n` with probability proportional to `1 / (rank + 1)^s`, by inverting a
/// cumulative table (exact, and fast enough for the few million draws a suite makes).
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0f64;
        for rank in 0..n {
            total += 1.0 / ((rank + 1) as f64).powf(s);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Zipf { cdf }
    }

    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        let u: f64 = rng.random();
        self.cdf
            .partition_point(|&c| c < u)
            .min(self.cdf.len().saturating_sub(1))
    }
}

/// Request batches, flat: batch `b` is `keys[b * batch..(b + 1) * batch]`.
pub struct Batches {
    pub batch: usize,
    pub keys: Vec<u64>,
}

impl Batches {
    /// `count` batches of `batch` keys of the data set `(seed, n)`, drawn by `dist`.
    /// Zipf ranks map to row indexes through a mix, so the hot keys are spread over shards.
    pub fn draw(
        seed: u64,
        n: u64,
        dist: Dist,
        batch: usize,
        count: usize,
        rng_seed: u64,
    ) -> Batches {
        let mut rng = StdRng::seed_from_u64(rng_seed);
        let total = batch * count;
        let mut keys = Vec::with_capacity(total);
        match dist {
            Dist::Uniform => {
                for _ in 0..total {
                    keys.push(key_of(seed, rng.random_range(0..n)));
                }
            }
            Dist::Zipf => {
                let zipf = Zipf::new(n as usize, ZIPF_EXPONENT);
                for _ in 0..total {
                    let rank = zipf.sample(&mut rng) as u64;
                    keys.push(key_of(seed, mix(rank) % n));
                }
            }
        }
        Batches { batch, keys }
    }

    pub fn count(&self) -> usize {
        self.keys.len() / self.batch.max(1)
    }

    pub fn get(&self, b: usize) -> &[u64] {
        let b = b % self.count().max(1);
        &self.keys[b * self.batch..(b + 1) * self.batch]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_distinct_and_reproducible() {
        let keys: std::collections::HashSet<u64> = (0..100_000).map(|i| key_of(7, i)).collect();
        assert_eq!(keys.len(), 100_000);
        assert_eq!(key_of(7, 5), key_of(7, 5));
        assert_ne!(key_of(7, 5), key_of(8, 5));
    }

    #[test]
    fn generations_change_values() {
        let a = rows_of(&[1, 2], 4, 0);
        let b = rows_of(&[1, 2], 4, 1);
        assert_eq!(a.len(), 8);
        assert_ne!(a, b);
        assert!(a.iter().all(|v| (-0.5..0.5).contains(v)));
        let mut bytes = Vec::new();
        row_bytes_of(&a, &mut bytes);
        assert_eq!(bytes.len(), 32);
        assert_eq!(
            f32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")),
            a[1]
        );
    }

    #[test]
    fn zipf_is_skewed_towards_low_ranks() {
        let zipf = Zipf::new(10_000, ZIPF_EXPONENT);
        let mut rng = StdRng::seed_from_u64(1);
        let draws: Vec<usize> = (0..100_000).map(|_| zipf.sample(&mut rng)).collect();
        let rank0 = draws.iter().filter(|&&r| r == 0).count();
        let top100 = draws.iter().filter(|&&r| r < 100).count();
        // With s = 0.99 over 10k ranks, rank 0 has ~10% of the mass and the top 1% about half.
        assert!((7_000..13_000).contains(&rank0), "{rank0}");
        assert!((40_000..65_000).contains(&top100), "{top100}");
        assert!(draws.iter().all(|&r| r < 10_000));
    }

    #[test]
    fn batches_only_hold_keys_of_the_data_set() {
        let n = 1000;
        let all: std::collections::HashSet<u64> = (0..n).map(|i| key_of(3, i)).collect();
        for dist in [Dist::Uniform, Dist::Zipf] {
            let b = Batches::draw(3, n, dist, 100, 5, 9);
            assert_eq!(b.count(), 5);
            assert_eq!(b.get(6).len(), 100, "indexes wrap around");
            assert!(b.keys.iter().all(|k| all.contains(k)), "{dist:?}");
        }
        assert_eq!(Dist::parse("zipf"), Some(Dist::Zipf));
        assert_eq!(Dist::parse("pareto"), None);
    }
}
