//! Test fixtures: a temporary repository, publishing helpers and a reference model.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use hopps_engine::{Engine, EngineConfig, WalSync};
use hopps_format::{
    MissingPolicy, ModelSpec, OptimizerSpec, PublishOptions, Repository, StorageOptions,
    TableArrays, TableSpec, VersionKind,
};

pub const MODEL: &str = "m";
pub const TABLE: &str = "emb";
pub const DIM: usize = 4;

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub repo: Repository,
}

impl Fixture {
    pub async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("repo")).unwrap();
        let repo = Repository::open(
            dir.path().join("repo").to_str().unwrap(),
            &StorageOptions::default(),
        )
        .await
        .unwrap();
        Fixture { dir, repo }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("node")
    }

    pub fn config(&self) -> EngineConfig {
        let mut c = EngineConfig::new(self.repo.clone(), self.data_dir());
        c.node_id = "test-node".into();
        c.wal_sync = WalSync::Interval(Duration::from_millis(2));
        c.poll_interval = Duration::from_millis(50);
        c
    }

    pub async fn engine(&self) -> Engine {
        self.engine_with(self.config()).await
    }

    pub async fn engine_with(&self, c: EngineConfig) -> Engine {
        let e = Engine::open(c).await.unwrap();
        e.load().await.unwrap();
        e
    }
}

pub fn spec(shards: u32) -> ModelSpec {
    spec_with(shards, MissingPolicy::Zeros, None)
}

pub fn spec_with(shards: u32, missing: MissingPolicy, optimizer: Option<&str>) -> ModelSpec {
    let mut t = TableSpec::new(TABLE, DIM as u32);
    t.missing = missing;
    t.optimizer = optimizer.map(|k| OptimizerSpec::new(k, 0.5));
    ModelSpec::new(MODEL, shards, vec![t])
}

/// Rows of a version as the test expects them: key -> values.
pub type Rows = BTreeMap<u64, Vec<f32>>;

pub fn row_of(key: u64, salt: u64) -> Vec<f32> {
    (0..DIM)
        .map(|j| (key as f32) * 0.5 + (salt as f32) * 1000.0 + j as f32 * 0.25)
        .collect()
}

pub async fn publish_full(repo: &Repository, spec: &ModelSpec, rows: &Rows) -> u64 {
    let keys: Vec<u64> = rows.keys().copied().collect();
    let values: Vec<f32> = rows.values().flatten().copied().collect();
    let t = TableArrays {
        table: TABLE,
        dim: DIM as u32,
        keys: &keys,
        values: &values,
        deleted: None,
    };
    let opts = PublishOptions {
        create: Some(spec.clone()),
        source: "test".into(),
        ..PublishOptions::default()
    };
    repo.publish_arrays(MODEL, VersionKind::Full, &[t], &opts)
        .await
        .unwrap()
        .version
}

/// Publishes a delta with `upserts` and `deletes` on top of `parent`; returns its version.
pub async fn publish_delta(repo: &Repository, parent: u64, upserts: &Rows, deletes: &[u64]) -> u64 {
    let mut keys: Vec<u64> = upserts.keys().copied().collect();
    let mut values: Vec<f32> = upserts.values().flatten().copied().collect();
    let mut deleted = vec![false; keys.len()];
    for &k in deletes {
        keys.push(k);
        values.extend(std::iter::repeat_n(0.0, DIM));
        deleted.push(true);
    }
    let t = TableArrays {
        table: TABLE,
        dim: DIM as u32,
        keys: &keys,
        values: &values,
        deleted: Some(&deleted),
    };
    let opts = PublishOptions {
        parent: Some(parent),
        source: "test".into(),
        ..PublishOptions::default()
    };
    repo.publish_arrays(MODEL, VersionKind::Delta, &[t], &opts)
        .await
        .unwrap()
        .version
}

/// Looks every key of `universe` up and compares with `expect`, bit for bit.
pub fn assert_rows(engine: &Engine, universe: &[u64], expect: &Rows, version: Option<u64>) -> u64 {
    let mut out = vec![0f32; universe.len() * DIM];
    let mut found = vec![false; universe.len()];
    let v = engine
        .lookup(MODEL, TABLE, universe, version, &mut out, &mut found)
        .unwrap();
    // The packed (wire-format) lookup answers the same, bit for bit.
    let mut packed = Vec::new();
    let mut packed_found = vec![false; universe.len()];
    let pv = engine
        .lookup_packed(
            MODEL,
            TABLE,
            universe,
            version,
            &mut packed,
            &mut packed_found,
        )
        .unwrap();
    assert_eq!(
        (pv, &packed_found),
        (v, &found),
        "packed lookup: version and found flags"
    );
    let want: Vec<u8> = out.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert!(
        packed == want,
        "packed lookup at version {v}: rows differ from the decoded ones"
    );
    for (i, k) in universe.iter().enumerate() {
        match expect.get(k) {
            Some(row) => {
                assert!(found[i], "key {k} should be found at version {v}");
                let got = &out[i * DIM..(i + 1) * DIM];
                let same = got.iter().zip(row).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "key {k} at version {v}: got {got:?}, want {row:?}");
            }
            None => assert!(!found[i], "key {k} should be missing at version {v}"),
        }
    }
    v
}

pub fn apply(rows: &Rows, upserts: &Rows, deletes: &[u64]) -> Rows {
    let mut r = rows.clone();
    for (k, v) in upserts {
        r.insert(*k, v.clone());
    }
    for k in deletes {
        r.remove(k);
    }
    r
}
