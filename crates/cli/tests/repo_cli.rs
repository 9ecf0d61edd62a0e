//! The offline repository commands, run as a user runs them: the real `hopps` binary.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn hopps(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hopps"))
        .args(args)
        .output()
        .expect("run hopps")
}

fn ok(args: &[&str]) -> String {
    let out = hopps(args);
    assert!(
        out.status.success(),
        "hopps {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = hopps(args);
    assert!(!out.status.success(), "hopps {args:?} should have failed");
    String::from_utf8(out.stderr).unwrap()
}

fn csv(path: &Path, rows: &[(i64, [f32; 3])], deleted: Option<&[bool]>) {
    let mut s = String::from(if deleted.is_some() {
        "key,a,b,c,deleted\n"
    } else {
        "key,a,b,c\n"
    });
    for (i, (k, v)) in rows.iter().enumerate() {
        s.push_str(&format!("{k},{},{},{}", v[0], v[1], v[2]));
        if let Some(d) = deleted {
            s.push_str(if d[i] { ",1" } else { ",0" });
        }
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

#[test]
fn publish_versions_list_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo = repo.to_str().unwrap();
    let full = dir.path().join("full.csv");
    let rows: Vec<(i64, [f32; 3])> = (0..500).map(|k| (k, [k as f32, 1.0, 2.0])).collect();
    csv(&full, &rows, None);

    let out = ok(&[
        "model",
        "publish",
        "--repo",
        repo,
        "--model",
        "ctr",
        "--table",
        "user",
        "--dim",
        "3",
        "--input",
        full.to_str().unwrap(),
        "--shards",
        "4",
        "--json",
    ]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"model": "ctr", "version": 1, "kind": "full", "rows": 500})
    );

    let delta = dir.path().join("delta.csv");
    csv(
        &delta,
        &[(1, [9.0; 3]), (2, [0.0; 3]), (1000, [5.0; 3])],
        Some(&[false, true, false]),
    );
    let out = ok(&[
        "model",
        "publish",
        "--repo",
        repo,
        "--model",
        "ctr",
        "--table",
        "user",
        "--dim",
        "3",
        "--input",
        delta.to_str().unwrap(),
        "--delta",
        "--json",
    ]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"model": "ctr", "version": 2, "kind": "delta", "rows": 3})
    );

    let out = ok(&[
        "model", "versions", "--repo", repo, "--model", "ctr", "--json",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    for (item, (version, kind, parent, rows)) in arr.iter().zip([
        (1, "full", Value::Null, 500),
        (2, "delta", Value::from(1), 3),
    ]) {
        assert_eq!(item["version"], version);
        assert_eq!(item["kind"], kind);
        assert_eq!(item["parent"], parent);
        assert_eq!(item["rows"], rows);
    }

    // People get a table.
    let out = ok(&["model", "versions", "--repo", repo, "--model", "ctr"]);
    assert!(out.contains("VERSION") && out.contains("delta"), "{out}");
    let out = ok(&["model", "list", "--repo", repo]);
    assert!(out.contains("ctr") && out.contains("user[3 f32]"), "{out}");
    let out = ok(&["model", "list", "--repo", repo, "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["model"], "ctr");
    assert_eq!(v[0]["latest"], 2);
    assert_eq!(v[0]["shards"], 4);
}

#[test]
fn bad_input_fails_naming_the_file_and_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo = repo.to_str().unwrap();
    let good = dir.path().join("good.tsv");
    std::fs::write(&good, "1\t0.5\t0.5\n2\t1\t1\n").unwrap();
    ok(&[
        "model",
        "publish",
        "--repo",
        repo,
        "--model",
        "m",
        "--table",
        "t",
        "--dim",
        "2",
        "--input",
        good.to_str().unwrap(),
    ]);

    let nan = dir.path().join("nan.csv");
    std::fs::write(&nan, "key,a,b\n5,1,NaN\n6,inf,1\n7,1,1\n").unwrap();
    let args = [
        "model",
        "publish",
        "--repo",
        repo,
        "--model",
        "m",
        "--table",
        "t",
        "--dim",
        "2",
        "--input",
        nan.to_str().unwrap(),
    ];
    let err = fails(&args);
    assert!(
        err.contains("2 rows hold NaN or infinite values")
            && err.contains("key 5")
            && err.contains("nan.csv"),
        "{err}"
    );
    assert!(err.contains("nothing was published"), "{err}");
    let mut allowed = args.to_vec();
    allowed.push("--allow-non-finite");
    allowed.push("--json");
    let v: Value = serde_json::from_str(ok(&allowed).trim()).unwrap();
    assert_eq!(v["version"], 2);

    let wrong = dir.path().join("wrong.csv");
    std::fs::write(&wrong, "1,1,2,3\n").unwrap();
    let err = fails(&[
        "model",
        "publish",
        "--repo",
        repo,
        "--model",
        "m",
        "--table",
        "t",
        "--dim",
        "2",
        "--input",
        wrong.to_str().unwrap(),
    ]);
    assert!(err.contains("wrong.csv line 1"), "{err}");

    let err = fails(&[
        "model",
        "publish",
        "--repo",
        repo,
        "--model",
        "m",
        "--table",
        "t",
        "--dim",
        "2",
        "--input",
        "/nonexistent/x.parquet",
    ]);
    assert!(err.contains("/nonexistent/x.parquet"), "{err}");

    let err = fails(&[
        "model", "versions", "--repo", repo, "--model", "nope", "--json",
    ]);
    assert!(err.contains("model \"nope\" does not exist"), "{err}");

    let out = ok(&[
        "model", "versions", "--repo", repo, "--model", "m", "--json",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v.as_array().unwrap().len(),
        2,
        "failed publishes left nothing behind"
    );
}

#[test]
fn shard_then_publish_presharded_output() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo = repo.to_str().unwrap();
    let input = dir.path().join("train.csv");
    let rows: Vec<(i64, [f32; 3])> = (0..2000)
        .map(|k| (k * 7 - 100, [k as f32, 0.0, -1.0]))
        .collect();
    csv(&input, &rows, None);
    let out_dir = dir.path().join("sharded");
    let out = ok(&[
        "shard",
        "--input",
        input.to_str().unwrap(),
        "--dim",
        "3",
        "--shards",
        "8",
        "--table",
        "emb",
        "--output",
        out_dir.to_str().unwrap(),
        "--json",
    ]);
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["rows"], 2000);
    assert_eq!(summary["shards"], 8);
    for s in 0..8 {
        assert!(
            out_dir.join(format!("shard={s}")).is_dir(),
            "shard={s} missing"
        );
    }
    assert!(out_dir.join("_hopps_shards.json").is_file());

    let out = ok(&[
        "model",
        "publish",
        "--repo",
        repo,
        "--model",
        "big",
        "--table",
        "emb",
        "--dim",
        "3",
        "--shards",
        "8",
        "--input",
        out_dir.to_str().unwrap(),
        "--json",
    ]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["rows"], 2000);

    // The same files against a model of another shard count are refused, naming a key.
    let err = fails(&[
        "model",
        "publish",
        "--repo",
        repo,
        "--model",
        "other",
        "--table",
        "emb",
        "--dim",
        "3",
        "--shards",
        "16",
        "--input",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        err.contains("belongs to shard") && err.contains("of 16"),
        "{err}"
    );

    // One step: shard and publish.
    let out_dir2 = dir.path().join("sharded2");
    let out = ok(&[
        "shard",
        "--input",
        input.to_str().unwrap(),
        "--dim",
        "3",
        "--shards",
        "8",
        "--table",
        "emb",
        "--output",
        out_dir2.to_str().unwrap(),
        "--repo",
        repo,
        "--model",
        "big",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["published"]["version"], 2);
}

#[test]
fn unreachable_s3_repository_fails_fast_with_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t0 = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_hopps"))
        .args([
            "model",
            "list",
            "--repo",
            "s3://models/prod",
            "--storage-timeout",
            "2s",
        ])
        .args(["--s3-endpoint", &format!("http://127.0.0.1:{port}")])
        .env("AWS_ACCESS_KEY_ID", "k")
        .env("AWS_SECRET_ACCESS_KEY", "s")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t0.elapsed()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("s3://models/prod") && err.contains("reachable"),
        "{err}"
    );
}
