//! The model repository on the local filesystem: publish, list, read back, checkpoints, history.

use hopps_format::{
    ErrorKind, HistoryRecord, ModelSpec, PublishOptions, Repository, StorageOptions, TableArrays,
    TableSpec, VersionKind, shard_of,
};

async fn repo(dir: &tempfile::TempDir) -> Repository {
    Repository::open(dir.path().to_str().unwrap(), &StorageOptions::default())
        .await
        .unwrap()
}

fn create(model: &str, shards: u32, tables: &[(&str, u32)]) -> PublishOptions {
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

/// Reads every row of a table of a version into (key, values, deleted) in file order.
async fn read_all(
    repo: &Repository,
    model: &str,
    version: u64,
    table: &str,
) -> Vec<(u64, Vec<f32>, bool)> {
    let m = repo.manifest(model, version).await.unwrap();
    let mut r = repo.read_table(&m, table).await.unwrap();
    let dim = r.dim() as usize;
    let mut out = Vec::new();
    while let Some(b) = r.next_batch().await.unwrap() {
        for i in 0..b.len() {
            out.push((
                b.keys[i],
                b.values[i * dim..(i + 1) * dim].to_vec(),
                b.is_deleted(i),
            ));
        }
    }
    assert_eq!(r.bytes_read(), r.bytes_total());
    out
}

#[tokio::test]
async fn publish_arrays_full_and_delta_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(&dir).await;
    let keys: Vec<u64> = (0..10_000).collect();
    let values: Vec<f32> = (0..10_000 * 4).map(|i| i as f32 * 0.5).collect();
    let s = repo
        .publish_arrays(
            "ctr",
            VersionKind::Full,
            &[TableArrays {
                table: "user",
                dim: 4,
                keys: &keys,
                values: &values,
                deleted: None,
            }],
            &create("ctr", 4, &[("user", 4)]),
        )
        .await
        .unwrap();
    assert_eq!((s.version, s.rows, s.kind), (1, 10_000, VersionKind::Full));
    assert_eq!(repo.list_models().await.unwrap(), vec!["ctr".to_string()]);
    let spec = repo.model("ctr").await.unwrap();
    assert_eq!(spec.shards, 4);

    let m = repo.manifest("ctr", 1).await.unwrap();
    let t = m.table("user").unwrap();
    assert_eq!(t.rows, 10_000);
    assert_eq!(t.files.len(), 4, "one file per shard");
    let mut rows = read_all(&repo, "ctr", 1, "user").await;
    rows.sort_by_key(|r| r.0);
    assert_eq!(rows.len(), 10_000);
    for (i, (k, v, d)) in rows.iter().enumerate() {
        assert_eq!(*k, i as u64);
        assert_eq!(v, &values[i * 4..i * 4 + 4]);
        assert!(!d);
    }
    // Every file holds keys of its shard only.
    for f in &t.files {
        let shard = f.shard.unwrap();
        let mm = repo.manifest("ctr", 1).await.unwrap();
        let mut only = mm.clone();
        only.tables[0].files = vec![f.clone()];
        let mut r = repo.read_table(&only, "user").await.unwrap();
        while let Some(b) = r.next_batch().await.unwrap() {
            assert!(b.keys.iter().all(|&k| shard_of(k, 4) == shard));
        }
    }

    let dk = [3u64, 5, 20_000];
    let dv = [9f32; 12];
    let del = [false, true, false];
    let s = repo
        .publish_arrays(
            "ctr",
            VersionKind::Delta,
            &[TableArrays {
                table: "user",
                dim: 4,
                keys: &dk,
                values: &dv,
                deleted: Some(&del),
            }],
            &PublishOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!((s.version, s.kind, s.rows), (2, VersionKind::Delta, 3));
    let m2 = repo.manifest("ctr", 2).await.unwrap();
    assert_eq!(m2.parent, Some(1));
    assert_eq!((m2.tables[0].rows, m2.tables[0].deletes), (2, 1));
    let mut rows = read_all(&repo, "ctr", 2, "user").await;
    rows.sort_by_key(|r| r.0);
    assert_eq!(
        rows,
        vec![
            (3, vec![9.0; 4], false),
            (5, vec![0.0; 4], true),
            (20_000, vec![9.0; 4], false)
        ]
    );

    let listing = repo.versions("ctr").await.unwrap();
    assert_eq!(
        listing
            .committed
            .iter()
            .map(|m| m.version)
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(listing.aborted.is_empty());
}

#[tokio::test]
async fn aborted_version_directory_is_ignored_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(&dir).await;
    let keys = [1u64, 2];
    let values = [1f32, 2.];
    let t = [TableArrays {
        table: "t",
        dim: 1,
        keys: &keys,
        values: &values,
        deleted: None,
    }];
    repo.publish_arrays("m", VersionKind::Full, &t, &create("m", 1, &[("t", 1)]))
        .await
        .unwrap();
    // A publisher that died after writing data files, before its manifest.
    let v2 = dir.path().join("m/versions/00000000000000000002/t");
    std::fs::create_dir_all(&v2).unwrap();
    std::fs::write(v2.join("part-00000-0000-dead.parquet"), b"partial").unwrap();
    let listing = repo.versions("m").await.unwrap();
    assert_eq!(listing.committed.len(), 1);
    assert_eq!(listing.aborted, vec![2]);
    let s = repo
        .publish_arrays("m", VersionKind::Full, &t, &PublishOptions::default())
        .await
        .unwrap();
    assert_eq!(
        s.version, 3,
        "a version number is never reused, even by an aborted publish"
    );
}

#[tokio::test]
async fn checkpoints_roundtrip_and_replace() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(&dir).await;
    let t = [TableArrays {
        table: "t",
        dim: 2,
        keys: &[1],
        values: &[1.0, 2.0],
        deleted: None,
    }];
    repo.publish_arrays("m", VersionKind::Full, &t, &create("m", 2, &[("t", 2)]))
        .await
        .unwrap();

    let keys: Vec<u64> = (0..50_000).collect();
    let rows: Vec<u8> = (0..50_000 * 6).map(|i| (i % 256) as u8).collect();
    let mut w = repo.checkpoint_writer("m", 1).await.unwrap();
    w.write_segment("t", 0, "f16", 2, 6, &keys[..20_000], &rows[..20_000 * 6])
        .await
        .unwrap();
    w.write_segment("t", 1, "f16", 2, 6, &keys[20_000..], &rows[20_000 * 6..])
        .await
        .unwrap();
    let m = w.commit(Some(77)).await.unwrap();
    assert_eq!(
        (m.kind, m.version, m.rows, m.wal_sequence),
        (VersionKind::Checkpoint, 1, 50_000, Some(77))
    );

    let cps = repo.checkpoints("m").await.unwrap();
    assert_eq!(cps.len(), 1);
    let seg = repo
        .read_segment(&cps[0], &cps[0].tables[0].files[1])
        .await
        .unwrap();
    assert_eq!((seg.dtype.as_str(), seg.dim, seg.row_bytes), ("f16", 2, 6));
    assert_eq!(seg.keys, &keys[20_000..]);
    assert_eq!(seg.rows, &rows[20_000 * 6..]);

    // A second checkpoint of the same version replaces the first and removes its files.
    let mut w = repo.checkpoint_writer("m", 1).await.unwrap();
    w.write_segment("t", 0, "f32", 2, 8, &[42], &[7u8; 8])
        .await
        .unwrap();
    let m = w.commit(Some(78)).await.unwrap();
    let cps = repo.checkpoints("m").await.unwrap();
    assert_eq!(cps, vec![m.clone()]);
    let seg = repo.read_segment(&m, &m.tables[0].files[0]).await.unwrap();
    assert_eq!(seg.keys, vec![42]);
    let files: Vec<_> = walk(&dir.path().join("m/checkpoints"))
        .into_iter()
        .filter(|p| p.ends_with(".hps"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");

    repo.delete_checkpoint("m", 1).await.unwrap();
    assert!(repo.checkpoints("m").await.unwrap().is_empty());
}

fn walk(p: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

#[tokio::test]
async fn history_appends_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(&dir).await;
    let t = [TableArrays {
        table: "t",
        dim: 1,
        keys: &[1],
        values: &[1.0],
        deleted: None,
    }];
    repo.publish_arrays("m", VersionKind::Full, &t, &create("m", 1, &[("t", 1)]))
        .await
        .unwrap();
    let rec = |event: &str, v| HistoryRecord {
        seq: 0,
        time: String::new(),
        event: event.into(),
        version: v,
        from_version: Some(9),
        node: "n1".into(),
        detail: "why".into(),
    };
    assert_eq!(
        repo.append_history("m", &rec("rollback", 1)).await.unwrap(),
        1
    );
    assert_eq!(repo.append_history("m", &rec("serve", 2)).await.unwrap(), 2);
    let h = repo.history("m").await.unwrap();
    assert_eq!(
        h.iter()
            .map(|r| (r.seq, r.event.as_str(), r.version))
            .collect::<Vec<_>>(),
        vec![(1, "rollback", 1), (2, "serve", 2)]
    );
    assert!(h[0].time.ends_with('Z'));
    let err = repo.append_history("nope", &rec("x", 1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}
