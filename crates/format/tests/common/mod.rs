//! Helpers shared by the integration tests: input files in every format.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use arrow_array::{
    ArrayRef, BooleanArray, FixedSizeListArray, Float32Array, Int64Array, ListArray, RecordBatch,
    UInt64Array,
};
use arrow_schema::{DataType, Field, Schema};
use hopps_format::{ModelSpec, PublishOptions, TableSpec};

pub fn create(model: &str, shards: u32, tables: &[(&str, u32)]) -> PublishOptions {
    PublishOptions {
        create: Some(ModelSpec::new(
            model,
            shards,
            tables.iter().map(|(n, d)| TableSpec::new(*n, *d)).collect(),
        )),
        source: "test".into(),
        ..Default::default()
    }
}

/// Writes a Parquet file the way pyarrow does: `key` uint64, `value` fixed_size_list<float32>.
pub fn write_parquet(
    path: &Path,
    dim: i32,
    keys: &[u64],
    values: &[f32],
    deleted: Option<&[bool]>,
) {
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let list = FixedSizeListArray::try_new(
        item.clone(),
        dim,
        Arc::new(Float32Array::from(values.to_vec())),
        None,
    )
    .unwrap();
    let mut fields = vec![
        Field::new("key", DataType::UInt64, false),
        Field::new("value", DataType::FixedSizeList(item, dim), true),
    ];
    let mut cols: Vec<ArrayRef> = vec![Arc::new(UInt64Array::from(keys.to_vec())), Arc::new(list)];
    if let Some(d) = deleted {
        fields.push(Field::new("deleted", DataType::Boolean, true));
        cols.push(Arc::new(BooleanArray::from(d.to_vec())));
    }
    write_batch(
        path,
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap(),
    );
}

/// Writes a Parquet file the way Spark does: `key` int64, `value` list<float32> (variable length).
pub fn write_parquet_spark(path: &Path, keys: &[i64], rows: &[Vec<f32>]) {
    let item = Arc::new(Field::new("element", DataType::Float32, true));
    let mut offsets = vec![0i32];
    let mut flat = Vec::new();
    for r in rows {
        flat.extend_from_slice(r);
        offsets.push(flat.len() as i32);
    }
    let list = ListArray::try_new(
        item.clone(),
        arrow_buffer::OffsetBuffer::new(offsets.into()),
        Arc::new(Float32Array::from(flat)),
        None,
    )
    .unwrap();
    let schema = Schema::new(vec![
        Field::new("key", DataType::Int64, true),
        Field::new("value", DataType::List(item), true),
    ]);
    let cols: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(keys.to_vec())), Arc::new(list)];
    write_batch(path, RecordBatch::try_new(Arc::new(schema), cols).unwrap());
}

fn write_batch(path: &Path, batch: RecordBatch) {
    let f = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// Writes an `.npy` file with the given dtype descriptor and shape.
pub fn write_npy(path: &Path, descr: &str, shape: &str, data: &[u8]) {
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

/// Every file under `dir`, recursively.
pub fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}
