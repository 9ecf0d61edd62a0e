//! Row batches and the decoders of the input formats: Parquet (arrow-rs), CSV/TSV and NumPy
//! `.npy`. Every decoder streams: it holds one batch of rows at a time, whatever the file size.

use std::io::{BufRead, Read};
use std::sync::Arc;

use arrow_array::{Array, BooleanArray, Float32Array, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::file::reader::ChunkReader;

use crate::error::{FormatError, Result};

/// Rows per batch the decoders aim for.
pub const BATCH_ROWS: usize = 16 * 1024;

/// A batch of rows of one table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowBatch {
    pub keys: Vec<u64>,
    /// `keys.len() * dim` values, row-major.
    pub values: Vec<f32>,
    /// One flag per key when the source has a `deleted` column, else empty.
    pub deleted: Vec<bool>,
}

impl RowBatch {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether row `i` is a delete.
    pub fn is_deleted(&self, i: usize) -> bool {
        self.deleted.get(i).copied().unwrap_or(false)
    }
}

// ---------------------------------------------------------------------------------------------
// Parquet

/// Streams [`RowBatch`]es out of a Parquet file with columns `key` (uint64 or int64), `value`
/// (fixed_size_list<float32>[dim] or list<float32>) and optionally `deleted` (bool).
pub struct ParquetRows {
    reader: ParquetRecordBatchReader,
    dim: usize,
    what: String,
    row: u64,
}

impl ParquetRows {
    /// Opens `source` (a local file or bytes in memory); `what` names it in errors.
    pub fn new<R: ChunkReader + 'static>(source: R, dim: u32, what: &str) -> Result<ParquetRows> {
        let corrupt = |e: parquet::errors::ParquetError| {
            FormatError::corrupt(format!(
                "{what} is not a readable Parquet file ({e}); it is truncated or damaged, write it again"
            ))
        };
        let builder = ParquetRecordBatchReaderBuilder::try_new(source).map_err(corrupt)?;
        let schema = builder.schema().clone();
        let mut roots = Vec::new();
        for name in ["key", "value", "deleted"] {
            match schema.index_of(name) {
                Ok(i) => roots.push(i),
                Err(_) if name == "deleted" => {}
                Err(_) => {
                    return Err(FormatError::invalid(format!(
                        "{what} has no column {name:?} (columns: {}); hopps reads `key` (uint64 or \
                         int64), `value` (list of float32) and optional `deleted` (bool)",
                        schema
                            .fields()
                            .iter()
                            .map(|f| f.name().as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            }
        }
        let key_type = schema.field(roots[0]).data_type();
        if !matches!(key_type, DataType::UInt64 | DataType::Int64) {
            return Err(FormatError::invalid(format!(
                "{what}: column `key` has type {key_type}; cast it to uint64 or int64"
            )));
        }
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(corrupt)?;
        Ok(ParquetRows {
            reader,
            dim: dim as usize,
            what: what.to_string(),
            row: 0,
        })
    }

    /// The next batch, or `None` at the end of the file.
    pub fn next_batch(&mut self) -> Result<Option<RowBatch>> {
        let Some(rb) = self.reader.next() else {
            return Ok(None);
        };
        let rb = rb.map_err(|e| {
            FormatError::corrupt(format!(
                "{} cannot be decoded after row {} ({e}); the file is damaged, write it again",
                self.what, self.row
            ))
        })?;
        let out = record_batch_rows(&rb, self.dim, &self.what, self.row)?;
        self.row += rb.num_rows() as u64;
        Ok(Some(out))
    }
}

/// Converts one Arrow record batch into a [`RowBatch`]; `first_row` numbers rows in errors.
pub fn record_batch_rows(
    rb: &RecordBatch,
    dim: usize,
    what: &str,
    first_row: u64,
) -> Result<RowBatch> {
    let n = rb.num_rows();
    let col = |name: &str| {
        rb.schema()
            .index_of(name)
            .ok()
            .map(|i| rb.column(i).clone())
    };
    let key_col =
        col("key").ok_or_else(|| FormatError::invalid(format!("{what} has no `key` column")))?;
    if key_col.null_count() > 0 {
        return Err(FormatError::invalid(format!(
            "{what}: column `key` has {} null values; every row needs a key",
            key_col.null_count()
        )));
    }
    let keys: Vec<u64> = match key_col.data_type() {
        DataType::UInt64 => key_col
            .as_any()
            .downcast_ref::<arrow_array::UInt64Array>()
            .map(|a| a.values().to_vec()),
        // Spark and pandas write signed longs; the bits are the key (so -1 is u64::MAX),
        // which is also how Spark's xxhash64 sees them.
        DataType::Int64 => key_col
            .as_any()
            .downcast_ref::<arrow_array::Int64Array>()
            .map(|a| a.values().iter().map(|&k| k as u64).collect()),
        _ => None,
    }
    .ok_or_else(|| {
        FormatError::invalid(format!(
            "{what}: column `key` has type {}; cast it to uint64 or int64",
            key_col.data_type()
        ))
    })?;

    let deleted: Vec<bool> = match col("deleted") {
        None => Vec::new(),
        Some(c) => {
            let b = c.as_any().downcast_ref::<BooleanArray>().ok_or_else(|| {
                FormatError::invalid(format!(
                    "{what}: column `deleted` has type {}; it must be bool",
                    c.data_type()
                ))
            })?;
            // A null flag means "not deleted": writers that add the column only for deletes
            // leave it null elsewhere.
            (0..n).map(|i| b.is_valid(i) && b.value(i)).collect()
        }
    };

    let value_col = col("value")
        .ok_or_else(|| FormatError::invalid(format!("{what} has no `value` column")))?;
    let mut values = vec![0f32; n * dim];
    let row_err = |i: usize, msg: &str| {
        FormatError::invalid(format!(
            "{what}: row {} (key {}): {msg}",
            first_row + i as u64,
            keys[i]
        ))
    };
    let child_f32 = |child: &Arc<dyn Array>| -> Result<Float32Array> {
        child.as_any().downcast_ref::<Float32Array>().cloned().ok_or_else(|| {
            FormatError::invalid(format!(
                "{what}: column `value` holds {} items; write float32 (cast the embedding to float32)",
                child.data_type()
            ))
        })
    };
    match value_col.data_type() {
        DataType::FixedSizeList(_, len) => {
            let list = value_col
                .as_any()
                .downcast_ref::<arrow_array::FixedSizeListArray>()
                .ok_or_else(|| FormatError::invalid(format!("{what}: bad `value` column")))?;
            if *len as usize != dim {
                return Err(FormatError::invalid(format!(
                    "{what}: column `value` has {len} values per row, but the table's dim is {dim}; \
                     publish to a table of dim {len} or fix the training output"
                )));
            }
            let child = child_f32(list.values())?;
            for i in 0..n {
                if list.is_null(i) {
                    if deleted.get(i).copied().unwrap_or(false) {
                        continue;
                    }
                    return Err(row_err(
                        i,
                        "`value` is null; only deleted rows may omit the value",
                    ));
                }
                let start = list.value_offset_at(i);
                if child.null_count() > 0 && (start..start + dim).any(|j| child.is_null(j)) {
                    return Err(row_err(i, "`value` holds a null number"));
                }
                values[i * dim..(i + 1) * dim].copy_from_slice(&child.values()[start..start + dim]);
            }
        }
        DataType::List(_) | DataType::LargeList(_) => {
            let (offsets, child, nulls): (Vec<usize>, _, _) =
                if let Some(l) = value_col.as_any().downcast_ref::<arrow_array::ListArray>() {
                    (
                        l.value_offsets().iter().map(|&o| o as usize).collect(),
                        child_f32(l.values())?,
                        l.nulls().cloned(),
                    )
                } else if let Some(l) = value_col
                    .as_any()
                    .downcast_ref::<arrow_array::LargeListArray>()
                {
                    (
                        l.value_offsets().iter().map(|&o| o as usize).collect(),
                        child_f32(l.values())?,
                        l.nulls().cloned(),
                    )
                } else {
                    return Err(FormatError::invalid(format!("{what}: bad `value` column")));
                };
            for i in 0..n {
                if nulls.as_ref().is_some_and(|nb| nb.is_null(i)) {
                    if deleted.get(i).copied().unwrap_or(false) {
                        continue;
                    }
                    return Err(row_err(
                        i,
                        "`value` is null; only deleted rows may omit the value",
                    ));
                }
                let (start, end) = (offsets[i], offsets[i + 1]);
                if end - start != dim {
                    if end == start && deleted.get(i).copied().unwrap_or(false) {
                        continue;
                    }
                    return Err(row_err(
                        i,
                        &format!(
                            "`value` has {} numbers, but the table's dim is {dim}; fix the training \
                             output or publish to a table of that dim",
                            end - start
                        ),
                    ));
                }
                if child.null_count() > 0 && (start..end).any(|j| child.is_null(j)) {
                    return Err(row_err(i, "`value` holds a null number"));
                }
                values[i * dim..(i + 1) * dim].copy_from_slice(&child.values()[start..end]);
            }
        }
        other => {
            return Err(FormatError::invalid(format!(
                "{what}: column `value` has type {other}; write fixed_size_list<float32>[{dim}] or \
                 list<float32>"
            )));
        }
    }
    Ok(RowBatch {
        keys,
        values,
        deleted,
    })
}

// ---------------------------------------------------------------------------------------------
// CSV / TSV

/// Streams rows of a delimited text file: `key, v0, ..., v{dim-1} [, deleted]`.
///
/// A first line whose first field is not an integer is a header; a header naming a `deleted`
/// column (or `dim + 2` fields per line) turns on delete flags (`1`/`true` = deleted).
pub struct CsvRows<R> {
    input: R,
    delimiter: u8,
    dim: usize,
    what: String,
    line_no: u64,
    has_deleted: Option<bool>,
    line: String,
    done: bool,
}

impl<R: BufRead> CsvRows<R> {
    pub fn new(input: R, delimiter: u8, dim: u32, what: &str) -> CsvRows<R> {
        CsvRows {
            input,
            delimiter,
            dim: dim as usize,
            what: what.to_string(),
            line_no: 0,
            has_deleted: None,
            line: String::new(),
            done: false,
        }
    }

    pub fn next_batch(&mut self) -> Result<Option<RowBatch>> {
        if self.done {
            return Ok(None);
        }
        let mut batch = RowBatch::default();
        let delim = self.delimiter as char;
        while batch.keys.len() < BATCH_ROWS {
            self.line.clear();
            let read = self.input.read_line(&mut self.line).map_err(|e| {
                FormatError::corrupt(format!(
                    "{} cannot be read after line {} ({e}); it must be UTF-8 text",
                    self.what, self.line_no
                ))
            })?;
            if read == 0 {
                self.done = true;
                break;
            }
            self.line_no += 1;
            let line = self.line.trim_end_matches(['\n', '\r']);
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split(delim).map(str::trim);
            let first = fields.next().unwrap_or("");
            let key = match parse_key(first) {
                Some(k) => k,
                None if self.line_no == 1
                    || self.has_deleted.is_none() && batch.keys.is_empty() =>
                {
                    // A header line.
                    self.has_deleted = Some(line.split(delim).any(|f| f.trim() == "deleted"));
                    continue;
                }
                None => {
                    return Err(FormatError::invalid(format!(
                        "{} line {}: key {first:?} is not an integer; keys are uint64 (or int64)",
                        self.what, self.line_no
                    )));
                }
            };
            let start = batch.values.len();
            let mut count = 0usize;
            let mut flag = None;
            for f in fields {
                if count == self.dim {
                    if flag.is_some() {
                        count += 1;
                        break;
                    }
                    flag = Some(parse_flag(f).ok_or_else(|| {
                        FormatError::invalid(format!(
                            "{} line {}: {} values for dim {}, or a `deleted` flag {f:?} that is \
                             not 0/1/true/false",
                            self.what,
                            self.line_no,
                            self.dim + 1,
                            self.dim
                        ))
                    })?);
                    continue;
                }
                let v: f32 = f.parse().map_err(|_| {
                    FormatError::invalid(format!(
                        "{} line {} (key {key}): value {f:?} is not a number",
                        self.what, self.line_no
                    ))
                })?;
                batch.values.push(v);
                count += 1;
            }
            if count != self.dim {
                batch.values.truncate(start);
                return Err(FormatError::invalid(format!(
                    "{} line {} (key {key}): {} values, but the table's dim is {}; fix the file or \
                     publish to a table of that dim",
                    self.what,
                    self.line_no,
                    if count > self.dim {
                        "more than dim + 1".to_string()
                    } else {
                        count.to_string()
                    },
                    self.dim
                )));
            }
            if self.has_deleted == Some(true) && flag.is_none() {
                return Err(FormatError::invalid(format!(
                    "{} line {} (key {key}): the header names a `deleted` column but the line has none",
                    self.what, self.line_no
                )));
            }
            if let Some(d) = flag {
                if batch.deleted.len() < batch.keys.len() {
                    batch.deleted.resize(batch.keys.len(), false);
                }
                batch.deleted.push(d);
            } else if !batch.deleted.is_empty() {
                batch.deleted.push(false);
            }
            batch.keys.push(key);
        }
        if batch.is_empty() && self.done {
            return Ok(None);
        }
        Ok(Some(batch))
    }
}

fn parse_key(s: &str) -> Option<u64> {
    s.parse::<u64>()
        .ok()
        .or_else(|| s.parse::<i64>().ok().map(|k| k as u64))
}

fn parse_flag(s: &str) -> Option<bool> {
    match s {
        "1" | "true" | "True" | "TRUE" => Some(true),
        "0" | "false" | "False" | "FALSE" | "" => Some(false),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// NumPy .npy

/// Element type and shape of an `.npy` array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    /// NumPy dtype string, e.g. `<u8`, `<i8`, `<f4`.
    pub descr: String,
    pub shape: Vec<u64>,
    /// Bytes before the data.
    pub data_offset: u64,
}

/// Reads and checks the header of an `.npy` file (versions 1.0, 2.0 and 3.0).
pub fn read_npy_header<R: Read>(r: &mut R, what: &str) -> Result<NpyHeader> {
    let bad = |why: &str| FormatError::corrupt(format!("{what} is not a NumPy .npy file: {why}"));
    let mut pre = [0u8; 10];
    r.read_exact(&mut pre)
        .map_err(|_| bad("shorter than the 10-byte preamble"))?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err(bad("bad magic"));
    }
    let (hlen, pre_len) = match pre[6] {
        1 => (u64::from(u16::from_le_bytes([pre[8], pre[9]])), 10u64),
        2 | 3 => {
            let mut more = [0u8; 2];
            r.read_exact(&mut more)
                .map_err(|_| bad("truncated header"))?;
            (
                u64::from(u32::from_le_bytes([pre[8], pre[9], more[0], more[1]])),
                12,
            )
        }
        v => return Err(bad(&format!("unknown .npy version {v}"))),
    };
    if hlen > 1 << 20 {
        return Err(bad("header longer than 1 MiB"));
    }
    let mut header = vec![0u8; hlen as usize];
    r.read_exact(&mut header)
        .map_err(|_| bad("truncated header"))?;
    let header = String::from_utf8_lossy(&header);
    let field = |name: &str| -> Option<&str> {
        let at = header.find(&format!("'{name}'"))?;
        let rest = &header[at + name.len() + 2..];
        let rest = rest.trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr")
        .and_then(|s| s.strip_prefix('\''))
        .and_then(|s| s.split('\'').next())
        .ok_or_else(|| bad("no 'descr'"))?
        .to_string();
    if field("fortran_order").is_some_and(|s| s.starts_with("True")) {
        return Err(FormatError::invalid(format!(
            "{what} is stored in Fortran order; save it with np.ascontiguousarray(a) first"
        )));
    }
    let shape_s = field("shape")
        .and_then(|s| s.strip_prefix('('))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no 'shape'"))?;
    let mut shape = Vec::new();
    for part in shape_s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        shape.push(
            part.trim_end_matches('L')
                .parse::<u64>()
                .map_err(|_| bad("bad shape"))?,
        );
    }
    Ok(NpyHeader {
        descr,
        shape,
        data_offset: pre_len + hlen,
    })
}

/// Streams rows from a pair of `.npy` files: keys (`<u8` or `<i8`, shape `(n,)`) and values
/// (`<f4`, shape `(n, dim)`).
pub struct NpyRows<K, V> {
    keys: K,
    values: V,
    signed: bool,
    rows: u64,
    done: u64,
    dim: usize,
    what: String,
    buf: Vec<u8>,
}

impl<K: Read, V: Read> NpyRows<K, V> {
    /// Reads both headers and checks that they agree with each other and with `dim`.
    pub fn new(
        mut keys: K,
        mut values: V,
        dim: u32,
        keys_what: &str,
        values_what: &str,
    ) -> Result<Self> {
        let kh = read_npy_header(&mut keys, keys_what)?;
        let vh = read_npy_header(&mut values, values_what)?;
        let signed = match kh.descr.as_str() {
            "<u8" | "|u8" => false,
            "<i8" | "|i8" => true,
            d => {
                return Err(FormatError::invalid(format!(
                    "{keys_what} holds dtype {d:?}; keys must be uint64 (or int64): use keys.astype(np.uint64)"
                )));
            }
        };
        if kh.shape.len() != 1 {
            return Err(FormatError::invalid(format!(
                "{keys_what} has shape {:?}; keys must be a vector (n,)",
                kh.shape
            )));
        }
        if vh.descr != "<f4" {
            return Err(FormatError::invalid(format!(
                "{values_what} holds dtype {:?}; values must be float32: use values.astype(np.float32)",
                vh.descr
            )));
        }
        let n = kh.shape[0];
        let shape_ok = match vh.shape.as_slice() {
            [r, d] => *r == n && *d == u64::from(dim),
            [r] => dim == 1 && *r == n,
            _ => false,
        };
        if !shape_ok {
            return Err(FormatError::invalid(format!(
                "{values_what} has shape {:?}, but {keys_what} holds {n} keys and the table's dim is \
                 {dim}; the values must have shape ({n}, {dim})",
                vh.shape
            )));
        }
        Ok(NpyRows {
            keys,
            values,
            signed,
            rows: n,
            done: 0,
            dim: dim as usize,
            what: format!("{keys_what} + {values_what}"),
            buf: Vec::new(),
        })
    }

    /// Rows declared by the headers.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn next_batch(&mut self) -> Result<Option<RowBatch>> {
        let n = (self.rows - self.done).min(BATCH_ROWS as u64) as usize;
        if n == 0 {
            return Ok(None);
        }
        let truncated = |e: std::io::Error| {
            FormatError::corrupt(format!(
                "{}: data ends before the {} rows its header declares ({e}); the file is truncated",
                self.what, self.rows
            ))
        };
        self.buf.resize(n * 8, 0);
        self.keys.read_exact(&mut self.buf).map_err(truncated)?;
        let keys: Vec<u64> = self
            .buf
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let _ = self.signed; // int64 keys are the same bits as uint64 keys
        self.buf.resize(n * self.dim * 4, 0);
        self.values.read_exact(&mut self.buf).map_err(truncated)?;
        let values: Vec<f32> = self
            .buf
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        self.done += n as u64;
        Ok(Some(RowBatch {
            keys,
            values,
            deleted: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_header_and_deletes() {
        let text = "key,v0,v1,deleted\n1,0.5,1.5,0\n2,,,1\n-1,3,4,false\n";
        // Row 2 has empty values: reject (values are required even for deletes in CSV).
        let mut r = CsvRows::new(text.as_bytes(), b',', 2, "t.csv");
        assert!(r.next_batch().is_err());
        let text = "key,v0,v1,deleted\n1,0.5,1.5,0\n2,0,0,1\n-1,3,4,false\n";
        let mut r = CsvRows::new(text.as_bytes(), b',', 2, "t.csv");
        let b = r.next_batch().unwrap().unwrap();
        assert_eq!(b.keys, vec![1, 2, u64::MAX]);
        assert_eq!(b.values, vec![0.5, 1.5, 0.0, 0.0, 3.0, 4.0]);
        assert_eq!(b.deleted, vec![false, true, false]);
        assert!(r.next_batch().unwrap().is_none());
    }

    #[test]
    fn csv_wrong_dim_names_line() {
        let text = "1\t0.5\t1.5\n2\t0.5\n";
        let mut r = CsvRows::new(text.as_bytes(), b'\t', 2, "t.tsv");
        let err = r.next_batch().unwrap_err();
        assert!(err.to_string().contains("t.tsv line 2"), "{err}");
        assert!(err.to_string().contains("dim is 2"), "{err}");
    }

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn npy_pair_roundtrip_and_truncation() {
        let keys: Vec<u8> = [5u64, 6].iter().flat_map(|k| k.to_le_bytes()).collect();
        let vals: Vec<u8> = [1f32, 2., 3., 4.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let k = npy("<u8", "(2,)", &keys);
        let v = npy("<f4", "(2, 2)", &vals);
        let mut r = NpyRows::new(&k[..], &v[..], 2, "k.npy", "v.npy").unwrap();
        let b = r.next_batch().unwrap().unwrap();
        assert_eq!(b.keys, vec![5, 6]);
        assert_eq!(b.values, vec![1., 2., 3., 4.]);
        assert!(r.next_batch().unwrap().is_none());

        let err = NpyRows::new(&k[..], &v[..], 3, "k.npy", "v.npy")
            .err()
            .unwrap();
        assert!(err.to_string().contains("shape (2, 3)"), "{err}");

        let short = &v[..v.len() - 3];
        let mut r = NpyRows::new(&k[..], short, 2, "k.npy", "v.npy").unwrap();
        let err = r.next_batch().unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}
