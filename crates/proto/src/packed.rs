//! Packing of keys, rows and found bitmaps as the `hopps.v1` wire protocol carries them:
//! keys as little-endian u64, values as little-endian f32, `found` as an LSB-first bitmap.
//!
//! The server and the client both use these functions, so both ends agree on the layout by
//! construction.

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes in one packed key.
pub const KEY_BYTES: usize = 8;
/// Bytes in one packed value.
pub const VALUE_BYTES: usize = 4;

/// Packs keys as little-endian u64 (one allocation for the whole batch).
pub fn pack_keys(keys: &[u64]) -> Bytes {
    let mut buf = BytesMut::with_capacity(keys.len() * KEY_BYTES);
    for &key in keys {
        buf.put_u64_le(key);
    }
    buf.freeze()
}

/// Unpacks little-endian u64 keys into `out` (cleared first, capacity reused).
///
/// Returns `false` when `bytes` is not a whole number of keys; `out` is then left empty.
pub fn unpack_keys_into(bytes: &[u8], out: &mut Vec<u64>) -> bool {
    out.clear();
    if !bytes.len().is_multiple_of(KEY_BYTES) {
        return false;
    }
    out.reserve(bytes.len() / KEY_BYTES);
    out.extend(bytes.chunks_exact(KEY_BYTES).map(|chunk| {
        let mut word = [0u8; KEY_BYTES];
        word.copy_from_slice(chunk);
        u64::from_le_bytes(word)
    }));
    true
}

/// Packs f32 values as little-endian bytes (one allocation for the whole batch).
pub fn pack_values(values: &[f32]) -> Bytes {
    let mut buf = BytesMut::with_capacity(values.len() * VALUE_BYTES);
    put_values(&mut buf, values);
    buf.freeze()
}

/// Appends f32 values as little-endian bytes to `buf`.
///
/// Sized once and filled by fixed-size chunks, which compiles to a straight copy loop on
/// little-endian machines (a `put_f32_le` per value checks capacity every time).
pub fn put_values(buf: &mut BytesMut, values: &[f32]) {
    let start = buf.len();
    buf.resize(start + values.len() * VALUE_BYTES, 0);
    for (dst, value) in buf[start..].chunks_exact_mut(VALUE_BYTES).zip(values) {
        dst.copy_from_slice(&value.to_le_bytes());
    }
}

/// Unpacks little-endian f32 values into `out` (cleared first, capacity reused).
///
/// Returns `false` when `bytes` is not a whole number of values; `out` is then left empty.
pub fn unpack_values_into(bytes: &[u8], out: &mut Vec<f32>) -> bool {
    out.clear();
    if !bytes.len().is_multiple_of(VALUE_BYTES) {
        return false;
    }
    out.reserve(bytes.len() / VALUE_BYTES);
    out.extend(bytes.chunks_exact(VALUE_BYTES).map(|chunk| {
        let mut word = [0u8; VALUE_BYTES];
        word.copy_from_slice(chunk);
        f32::from_le_bytes(word)
    }));
    true
}

/// Bytes of a found bitmap for `count` keys.
pub fn bitmap_len(count: usize) -> usize {
    count.div_ceil(8)
}

/// Appends the LSB-first bitmap of `found` to `buf`.
pub fn put_bitmap(buf: &mut BytesMut, found: &[bool]) {
    buf.reserve(bitmap_len(found.len()));
    for chunk in found.chunks(8) {
        let mut byte = 0u8;
        for (bit, &hit) in chunk.iter().enumerate() {
            byte |= u8::from(hit) << bit;
        }
        buf.put_u8(byte);
    }
}

/// Unpacks an LSB-first bitmap of `count` bits into `out` (cleared first).
///
/// Returns `false` when `bytes` is shorter than `count` bits need.
pub fn unpack_bitmap_into(bytes: &[u8], count: usize, out: &mut Vec<bool>) -> bool {
    out.clear();
    if bytes.len() < bitmap_len(count) {
        return false;
    }
    out.reserve(count);
    out.extend((0..count).map(|i| bytes[i / 8] & (1 << (i % 8)) != 0));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_little_endian() {
        let keys = [0u64, 1, u64::MAX, 0x0102_0304_0506_0708];
        let packed = pack_keys(&keys);
        assert_eq!(&packed[24..32], &[8, 7, 6, 5, 4, 3, 2, 1]);
        let mut out = Vec::new();
        assert!(unpack_keys_into(&packed, &mut out));
        assert_eq!(out, keys);
    }

    #[test]
    fn ragged_keys_are_rejected() {
        let mut out = vec![7];
        assert!(!unpack_keys_into(&[1, 2, 3], &mut out));
        assert!(out.is_empty());
    }

    #[test]
    fn values_round_trip_bit_exact() {
        let values = [0.0f32, -1.5, f32::MIN_POSITIVE, 1e30];
        let packed = pack_values(&values);
        assert_eq!(&packed[4..8], &(-1.5f32).to_le_bytes());
        let mut out = Vec::new();
        assert!(unpack_values_into(&packed, &mut out));
        assert_eq!(out, values);
        assert!(!unpack_values_into(&packed[..5], &mut out));
    }

    #[test]
    fn bitmap_is_lsb_first() {
        let found = [
            true, false, false, true, false, false, false, false, false, true,
        ];
        let mut buf = BytesMut::new();
        put_bitmap(&mut buf, &found);
        assert_eq!(&buf[..], &[0b0000_1001, 0b0000_0010]);
        let mut out = Vec::new();
        assert!(unpack_bitmap_into(&buf, found.len(), &mut out));
        assert_eq!(out, found);
        assert!(!unpack_bitmap_into(&buf[..1], found.len(), &mut out));
    }
}
