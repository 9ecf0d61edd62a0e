//! Backward compatibility: files of every released format version, checked into
//! `tests/fixtures/`, must keep reading exactly, and today's writer must still produce them
//! byte for byte. Never regenerate the files of a released version; add a directory for a new
//! version instead (see docs/format.md, "Version changes").

use std::path::PathBuf;

use hopps_format::segment::{SegmentHeader, encode_segment_to_vec, read_segment_from};
use hopps_format::{
    FileEntry, Manifest, ManifestTable, MissingPolicy, ModelSpec, OptimizerSpec, Repository,
    StorageOptions, TableSpec, VersionKind,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1")
}

/// The content of the version-1 fixtures, defined once here.
struct Golden {
    name: &'static str,
    header: SegmentHeader,
    keys: Vec<u64>,
    rows: Vec<u8>,
}

fn golden_segments() -> Vec<Golden> {
    // f32 rows of dim 4, two rows per block: three blocks, the last one short.
    let keys = vec![0u64, 1, 42, u64::MAX, 1 << 63];
    let rows: Vec<u8> = keys
        .iter()
        .flat_map(|&k| (0..4).map(move |j| (k % 1000) as f32 + j as f32 * 0.25))
        .flat_map(f32::to_le_bytes)
        .collect();
    let f32_seg = Golden {
        name: "emb/shard-00000-golden.hps",
        header: SegmentHeader {
            rows: 5,
            dim: 4,
            row_bytes: 16,
            block_rows: 2,
            dtype: "f32".into(),
        },
        keys,
        rows,
    };
    // int8 rows of dim 8 with a trailing f32 scale (12 bytes), one block.
    let keys = vec![7u64, 8, 9];
    let rows: Vec<u8> = keys
        .iter()
        .flat_map(|&k| {
            let mut r: Vec<u8> = (0..8)
                .map(|j| (k as i8).wrapping_mul(j as i8) as u8)
                .collect();
            r.extend_from_slice(&(k as f32 / 127.0).to_le_bytes());
            r
        })
        .collect();
    let int8_seg = Golden {
        name: "emb/shard-00001-golden.hps",
        header: SegmentHeader {
            rows: 3,
            dim: 8,
            row_bytes: 12,
            block_rows: 1024,
            dtype: "int8".into(),
        },
        keys,
        rows,
    };
    let empty = Golden {
        name: "emb/shard-00002-golden.hps",
        header: SegmentHeader {
            rows: 0,
            dim: 4,
            row_bytes: 8,
            block_rows: 1024,
            dtype: "bf16".into(),
        },
        keys: vec![],
        rows: vec![],
    };
    vec![f32_seg, int8_seg, empty]
}

fn golden_spec() -> ModelSpec {
    ModelSpec {
        format_version: 1,
        name: "golden".into(),
        shards: 4,
        hash: "xxh64-seed42".into(),
        tables: vec![
            TableSpec::new("emb", 4),
            TableSpec {
                name: "item".into(),
                dim: 8,
                dtype: "int8".into(),
                missing: MissingPolicy::Random {
                    seed: 7,
                    scale: 0.5,
                },
                optimizer: Some(OptimizerSpec::new("adagrad", 0.05)),
            },
        ],
    }
}

fn golden_manifest(files: Vec<FileEntry>) -> Manifest {
    Manifest {
        format_version: 1,
        model: "golden".into(),
        version: 3,
        kind: VersionKind::Checkpoint,
        parent: None,
        created: "2026-01-02T03:04:05Z".into(),
        source: "hopps checkpoint".into(),
        rows: 8,
        wal_sequence: Some(99),
        tables: vec![ManifestTable {
            name: "emb".into(),
            rows: 8,
            deletes: 0,
            duplicates: 0,
            files,
        }],
    }
}

fn ckpt_dir() -> PathBuf {
    fixtures().join("golden/checkpoints/00000000000000000003")
}

#[tokio::test]
async fn version_1_fixtures_read_exactly() {
    let repo = Repository::open(fixtures().to_str().unwrap(), &StorageOptions::default())
        .await
        .unwrap();
    assert_eq!(repo.model("golden").await.unwrap(), golden_spec());
    let cps = repo.checkpoints("golden").await.unwrap();
    assert_eq!(cps.len(), 1);
    let m = &cps[0];
    let golden = golden_segments();
    assert_eq!(m.tables[0].files.len(), golden.len());
    for (g, f) in golden.iter().zip(&m.tables[0].files) {
        assert_eq!(f.path, g.name);
        let seg = repo.read_segment(m, f).await.unwrap();
        assert_eq!(seg.keys, g.keys, "{}", g.name);
        assert_eq!(seg.rows, g.rows, "{}", g.name);
        assert_eq!(
            (seg.dtype.as_str(), seg.dim, seg.row_bytes),
            (g.header.dtype.as_str(), g.header.dim, g.header.row_bytes)
        );
    }
}

#[test]
fn todays_writer_reproduces_version_1_byte_for_byte() {
    let mut files = Vec::new();
    for g in golden_segments() {
        let bytes = encode_segment_to_vec(&g.header, &g.keys, &g.rows).unwrap();
        let stored = std::fs::read(ckpt_dir().join(g.name)).unwrap();
        assert_eq!(
            bytes, stored,
            "{} changed: a format change needs a new format version",
            g.name
        );
        let seg = read_segment_from(
            &stored[..],
            stored.len() as u64,
            Some(crc32c::crc32c(&stored)),
            g.name,
        )
        .unwrap();
        assert_eq!(seg.keys, g.keys);
        files.push(FileEntry {
            path: g.name.into(),
            format: "hps".into(),
            shard: Some(files.len() as u32),
            rows: g.keys.len() as u64,
            bytes: stored.len() as u64,
            checksum: format!("crc32c:{:08x}", crc32c::crc32c(&stored)),
        });
    }
    let manifest = serde_json::to_vec_pretty(&golden_manifest(files)).unwrap();
    assert_eq!(
        manifest,
        std::fs::read(ckpt_dir().join("MANIFEST.json")).unwrap(),
        "MANIFEST.json changed"
    );
    let spec = serde_json::to_vec_pretty(&golden_spec()).unwrap();
    assert_eq!(
        spec,
        std::fs::read(fixtures().join("golden/model.json")).unwrap(),
        "model.json changed"
    );
}

/// Writes the version-1 fixtures. Run once when the version was introduced:
/// `HOPPS_WRITE_GOLDEN=1 cargo test -p hopps-format --test golden -- --ignored`.
/// Never for a released version.
#[test]
#[ignore]
fn write_golden_fixtures() {
    if std::env::var("HOPPS_WRITE_GOLDEN").as_deref() != Ok("1") {
        return;
    }
    std::fs::create_dir_all(ckpt_dir().join("emb")).unwrap();
    let mut files = Vec::new();
    for g in golden_segments() {
        let bytes = encode_segment_to_vec(&g.header, &g.keys, &g.rows).unwrap();
        std::fs::write(ckpt_dir().join(g.name), &bytes).unwrap();
        files.push(FileEntry {
            path: g.name.into(),
            format: "hps".into(),
            shard: Some(files.len() as u32),
            rows: g.keys.len() as u64,
            bytes: bytes.len() as u64,
            checksum: format!("crc32c:{:08x}", crc32c::crc32c(&bytes)),
        });
    }
    std::fs::write(
        ckpt_dir().join("MANIFEST.json"),
        serde_json::to_vec_pretty(&golden_manifest(files)).unwrap(),
    )
    .unwrap();
    std::fs::write(
        fixtures().join("golden/model.json"),
        serde_json::to_vec_pretty(&golden_spec()).unwrap(),
    )
    .unwrap();
}
