//! The sharding function against independent references: xxHash64 vectors computed with the
//! Python `xxhash` package, and (when asked for) Spark SQL itself.

mod common;

use hopps_format::{
    InputFile, PublishRequest, Repository, StorageOptions, TableInput, VersionKind, shard_hash,
    shard_of,
};

/// `xxhash.xxh64_intdigest(struct.pack("<Q", key), seed=42)`.
const VECTORS: [(u64, u64); 13] = [
    (0, 0xb71b47ebda15746c),
    (1, 0x9ed50fd59358d232),
    (2, 0xd19fe30002b9a3cd),
    (42, 0xa092f330c19ff2de),
    (255, 0xe64e25999998353a),
    (256, 0xbcf87834e6fea57b),
    (65535, 0x7692fc7cec08f4d7),
    (4294967296, 0x23b5a4a26b19d83b),
    (9223372036854775807, 0xd2f1c616ae7eb306),
    (9223372036854775808, 0x88608019c494c1f4),
    (18446744073709551615, 0x358ae035bfb46fd2),
    (123456789, 0x2f64f8f3490def3f),
    (987654321012345678, 0x3a9d183e6b60d3ab),
];

#[test]
fn hash_matches_reference_vectors() {
    for (key, hash) in VECTORS {
        assert_eq!(shard_hash(key), hash, "key {key}");
        for s in [1u32, 2, 8, 64, 1024, 1 << 16] {
            assert_eq!(
                u64::from(shard_of(key, s)),
                hash % u64::from(s),
                "key {key} shards {s}"
            );
            // Spark sees the key as a signed long and the hash as a signed long:
            // pmod(h, S) == (h as u64) % S for power-of-two S.
            let spark = (hash as i64).rem_euclid(i64::from(s)) as u64;
            assert_eq!(u64::from(shard_of(key, s)), spark);
        }
    }
}

#[test]
fn shards_are_balanced() {
    let s = 64u32;
    let mut counts = vec![0u32; s as usize];
    for k in 0..640_000u64 {
        counts[shard_of(k, s) as usize] += 1;
    }
    let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
    assert!(*min > 9_500 && *max < 10_500, "{min}..{max}");
}

/// Spark SQL's `pmod(xxhash64(key), S)` for real, and the recipe of docs/sharding.md end to end
/// (Spark writes `partitionBy("shard")` Parquet, hopps publishes it unchanged). Needs a Python
/// with PySpark and Java:
/// `HOPPS_SPARK_PYTHON=/path/to/python cargo test -p hopps-format --test sharding -- --ignored`.
#[tokio::test]
#[ignore]
async fn spark_sql_agrees_and_its_output_publishes() {
    let python = std::env::var("HOPPS_SPARK_PYTHON")
        .expect("set HOPPS_SPARK_PYTHON to a python with pyspark");
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<i64> = VECTORS
        .iter()
        .map(|(k, _)| *k as i64)
        .chain((0..2000i64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15u64 as i64)))
        .collect();
    let keys_file = dir.path().join("keys.txt");
    std::fs::write(
        &keys_file,
        keys.iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let out = dir.path().join("spark_out");
    let hashes = dir.path().join("hashes.csv");
    let script = format!(
        r#"
import sys
from pyspark.sql import SparkSession
spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
         .config("spark.driver.bindAddress", "127.0.0.1").config("spark.driver.host", "127.0.0.1").getOrCreate())
keys = [int(l) for l in open({keys:?}) if l.strip()]
df = spark.createDataFrame([(k,) for k in keys], "key long")
rows = df.selectExpr("key", "xxhash64(key) AS h", "pmod(xxhash64(key), 8) AS s8", "pmod(xxhash64(key), 1024) AS s1024").collect()
with open({hashes:?}, "w") as f:
    for r in rows:
        f.write(f"{{r.key}},{{r.h}},{{r.s8}},{{r.s1024}}\n")
# The recipe: shard with Spark, write one directory per shard.
emb = df.selectExpr("key", "array(cast(key % 100 as float), 1.0f, 2.0f) AS value")
(emb.withColumn("shard", __import__("pyspark.sql.functions", fromlist=["expr"]).expr("pmod(xxhash64(key), 8)"))
    .repartition(8, "shard").write.partitionBy("shard").parquet({out:?}))
spark.stop()
"#,
        keys = keys_file.display().to_string(),
        hashes = hashes.display().to_string(),
        out = out.display().to_string(),
    );
    // Spark binds its driver to loopback only.
    let status = std::process::Command::new(&python)
        .arg("-c")
        .arg(&script)
        .env("SPARK_LOCAL_IP", "127.0.0.1")
        .status()
        .expect("run python");
    assert!(status.success(), "the Spark job failed");
    let text = std::fs::read_to_string(&hashes).unwrap();
    let mut checked = 0;
    for line in text.lines() {
        let f: Vec<i64> = line.split(',').map(|x| x.parse().unwrap()).collect();
        let key = f[0] as u64;
        assert_eq!(shard_hash(key) as i64, f[1], "xxhash64({})", f[0]);
        assert_eq!(i64::from(shard_of(key, 8)), f[2], "pmod 8 of {}", f[0]);
        assert_eq!(
            i64::from(shard_of(key, 1024)),
            f[3],
            "pmod 1024 of {}",
            f[0]
        );
        checked += 1;
    }
    assert_eq!(checked, keys.len());

    // Spark's directory publishes as is, each file checked to hold only its shard's keys.
    let inputs = InputFile::from_path(&out).unwrap();
    assert!(
        inputs
            .iter()
            .all(|i| matches!(i, InputFile::Sharded { .. })),
        "{inputs:?}"
    );
    let repo = Repository::open(
        dir.path().join("repo").to_str().unwrap(),
        &StorageOptions::default(),
    )
    .await
    .unwrap();
    let req = PublishRequest {
        model: "spark".into(),
        kind: VersionKind::Full,
        tables: vec![TableInput {
            table: "emb".into(),
            dim: 3,
            inputs,
        }],
        options: common::create("spark", 8, &[("emb", 3)]),
    };
    let s = repo.publish(&req, &|_| {}).await.unwrap();
    assert_eq!(s.rows, keys.len() as u64);
    let m = repo.manifest("spark", 1).await.unwrap();
    let mut r = repo.read_table(&m, "emb").await.unwrap();
    let mut n = 0;
    while let Some(b) = r.next_batch().await.unwrap() {
        for (i, k) in b.keys.iter().enumerate() {
            assert_eq!(b.values[i * 3], ((*k as i64) % 100) as f32);
        }
        n += b.len();
    }
    assert_eq!(n, keys.len());
}
