//! Row codecs: how a logical row of `dim` `f32` values is stored in a table's fixed-size row.
//!
//! A stored row is `value_bytes()` of encoded values followed by `extra_bytes` of opaque state
//! (optimizer moments, counters) that the table carries but never interprets. All encodings are
//! little-endian so that rows copied out of the table can go on the wire unchanged.

use half::{bf16, f16};

/// Storage dtype of a row's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// 4 bytes a value, IEEE 754 single precision.
    F32,
    /// 2 bytes a value, IEEE 754 half precision (round to nearest even).
    F16,
    /// 2 bytes a value, bfloat16 (the top half of an f32, round to nearest even).
    Bf16,
    /// 1 byte a value (`i8`, symmetric) followed by one `f32` scale for the whole row:
    /// `value = q * scale`, `scale = max(|v|) / 127`.
    Int8,
}

impl Dtype {
    /// Parses the names used in model.json and on the command line: `f32`, `f16`, `bf16`, `int8`.
    pub fn parse(s: &str) -> Option<Dtype> {
        match s {
            "f32" => Some(Dtype::F32),
            "f16" => Some(Dtype::F16),
            "bf16" => Some(Dtype::Bf16),
            "int8" => Some(Dtype::Int8),
            _ => None,
        }
    }

    /// The name `parse` accepts.
    pub fn as_str(&self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::Int8 => "int8",
        }
    }

    /// Bytes of encoded values for a row of `dim` values (the int8 scale included).
    pub fn value_bytes(&self, dim: u32) -> usize {
        let dim = dim as usize;
        match self {
            Dtype::F32 => dim * 4,
            Dtype::F16 | Dtype::Bf16 => dim * 2,
            Dtype::Int8 => dim + 4,
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a logical row (dim f32 values) is laid out in the table's fixed-size row bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowLayout {
    /// Number of logical values a row.
    pub dim: u32,
    /// How each value is stored.
    pub dtype: Dtype,
    /// Opaque bytes after the values (optimizer state).
    pub extra_bytes: u32,
}

impl RowLayout {
    pub fn new(dim: u32, dtype: Dtype, extra_bytes: u32) -> RowLayout {
        RowLayout {
            dim,
            dtype,
            extra_bytes,
        }
    }

    /// Bytes of the encoded values.
    pub fn value_bytes(&self) -> usize {
        self.dtype.value_bytes(self.dim)
    }

    /// Bytes of a whole stored row: `value_bytes() + extra_bytes`.
    pub fn row_bytes(&self) -> usize {
        self.value_bytes() + self.extra_bytes as usize
    }

    /// Writes the value part of `row` from `values`.
    ///
    /// `values.len()` must be `dim` and `row.len()` at least `value_bytes()`; both are caller
    /// bugs, checked in debug builds. In release builds only the values that fit are written
    /// (missing values encode as 0), so a bad length never reads or writes out of bounds.
    pub fn encode(&self, values: &[f32], row: &mut [u8]) {
        debug_assert_eq!(
            values.len(),
            self.dim as usize,
            "encode: values.len() != dim"
        );
        debug_assert!(
            row.len() >= self.value_bytes(),
            "encode: row shorter than value_bytes()"
        );
        let dim = self.dim as usize;
        let value = |i: usize| values.get(i).copied().unwrap_or(0.0);
        match self.dtype {
            Dtype::F32 => {
                for (i, out) in row.chunks_exact_mut(4).take(dim).enumerate() {
                    out.copy_from_slice(&value(i).to_le_bytes());
                }
            }
            Dtype::F16 => {
                for (i, out) in row.chunks_exact_mut(2).take(dim).enumerate() {
                    out.copy_from_slice(&f16::from_f32(value(i)).to_le_bytes());
                }
            }
            Dtype::Bf16 => {
                for (i, out) in row.chunks_exact_mut(2).take(dim).enumerate() {
                    out.copy_from_slice(&bf16::from_f32(value(i)).to_le_bytes());
                }
            }
            Dtype::Int8 => {
                // Non-finite values would poison the scale; they are stored as 0 so that one bad
                // value does not wipe the whole row.
                let max = values
                    .iter()
                    .take(dim)
                    .filter(|v| v.is_finite())
                    .fold(0.0f32, |m, v| m.max(v.abs()));
                let scale = if max > 0.0 { max / 127.0 } else { 0.0 };
                let n = dim.min(row.len());
                for (i, out) in row[..n].iter_mut().enumerate() {
                    let v = value(i);
                    let q = if scale > 0.0 && v.is_finite() {
                        (v / scale).round().clamp(-127.0, 127.0) as i8
                    } else {
                        0
                    };
                    *out = q as u8;
                }
                if let Some(out) = row.get_mut(dim..dim + 4) {
                    out.copy_from_slice(&scale.to_le_bytes());
                }
            }
        }
    }

    /// Reads the value part of `row` into `out`.
    ///
    /// `out.len()` must be `dim` and `row.len()` at least `value_bytes()` (caller bugs, checked in
    /// debug builds); in release builds values that `row` does not hold decode as 0.
    pub fn decode(&self, row: &[u8], out: &mut [f32]) {
        debug_assert_eq!(out.len(), self.dim as usize, "decode: out.len() != dim");
        debug_assert!(
            row.len() >= self.value_bytes(),
            "decode: row shorter than value_bytes()"
        );
        let dim = (self.dim as usize).min(out.len());
        // Values the row holds are overwritten below; only a short row's tail needs zeros
        // (filling the whole row first would be one more pass over every row read).
        let held = match self.dtype {
            Dtype::F32 => row.len() / 4,
            Dtype::F16 | Dtype::Bf16 => row.len() / 2,
            Dtype::Int8 => row.len(),
        };
        out[held.min(dim)..dim].fill(0.0);
        match self.dtype {
            Dtype::F32 => {
                for (o, b) in out[..dim].iter_mut().zip(row.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Dtype::F16 => {
                for (o, b) in out[..dim].iter_mut().zip(row.chunks_exact(2)) {
                    *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            Dtype::Bf16 => {
                for (o, b) in out[..dim].iter_mut().zip(row.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            Dtype::Int8 => {
                let scale = match row.get(self.dim as usize..self.dim as usize + 4) {
                    Some(s) => f32::from_le_bytes([s[0], s[1], s[2], s[3]]),
                    None => 0.0,
                };
                for (o, &q) in out[..dim].iter_mut().zip(row.iter()) {
                    *o = (q as i8) as f32 * scale;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_round_trip() {
        for d in [Dtype::F32, Dtype::F16, Dtype::Bf16, Dtype::Int8] {
            assert_eq!(Dtype::parse(d.as_str()), Some(d));
        }
        assert_eq!(Dtype::parse("fp32"), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(RowLayout::new(16, Dtype::F32, 0).row_bytes(), 64);
        assert_eq!(RowLayout::new(16, Dtype::F16, 8).row_bytes(), 40);
        assert_eq!(RowLayout::new(16, Dtype::Bf16, 0).value_bytes(), 32);
        assert_eq!(RowLayout::new(16, Dtype::Int8, 0).value_bytes(), 20);
    }

    fn round_trip(dtype: Dtype, tolerance: f32) {
        let values: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.37).collect();
        let layout = RowLayout::new(values.len() as u32, dtype, 5);
        let mut row = vec![0xAAu8; layout.row_bytes()];
        layout.encode(&values, &mut row);
        // The extra bytes belong to the caller and must survive encoding.
        assert!(row[layout.value_bytes()..].iter().all(|&b| b == 0xAA));
        let mut out = vec![0.0; values.len()];
        layout.decode(&row, &mut out);
        for (a, b) in values.iter().zip(&out) {
            assert!(
                (a - b).abs() <= tolerance * a.abs().max(1.0),
                "{dtype}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn f32_is_exact() {
        round_trip(Dtype::F32, 0.0);
    }

    #[test]
    fn f16_bf16_int8_are_close() {
        round_trip(Dtype::F16, 1e-3);
        round_trip(Dtype::Bf16, 1e-2);
        round_trip(Dtype::Int8, 1e-2 * 6.7);
    }

    #[test]
    fn int8_all_zero_and_non_finite() {
        let layout = RowLayout::new(3, Dtype::Int8, 0);
        let mut row = vec![0u8; layout.row_bytes()];
        layout.encode(&[0.0, f32::NAN, 0.0], &mut row);
        let mut out = [1.0f32; 3];
        layout.decode(&row, &mut out);
        assert_eq!(out, [0.0, 0.0, 0.0]);
    }
}
