//! loom models of the reader/writer protocol. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p hopps-table --release --lib loom`.
//!
//! Under loom a bucket has 1 slot and a neighbourhood 3 buckets, so a handful of keys force the
//! displacements and growths the models need.

use crate::buckets::{B, H, mix};
use crate::raw::Shared;
use crate::sync::{AtomicUsize, Ordering};
use crate::table::Table;
use loom::sync::Arc;
use loom::thread;

const ROW: usize = 8;

fn row(tag: u32) -> [u8; ROW] {
    let mut r = [0u8; ROW];
    r[..4].copy_from_slice(&tag.to_le_bytes());
    r[4..].copy_from_slice(&(!tag).to_le_bytes());
    r
}

/// A row is whole when both its words come from the same write.
fn whole(r: &[u8; ROW]) -> Option<u32> {
    let a = u32::from_le_bytes([r[0], r[1], r[2], r[3]]);
    let b = u32::from_le_bytes([r[4], r[5], r[6], r[7]]);
    (a == !b).then_some(a)
}

/// The first keys (0, 1, 2, ...) whose homes in a table of `buckets` buckets are `homes`.
fn keys_with_homes(buckets: usize, homes: &[usize]) -> Vec<u64> {
    // The same range reduction as `Buckets::home`, computed outside the model (no atomics).
    let home = |k: u64| ((mix(k) as u128 * buckets as u128) >> 64) as usize;
    let mut out = Vec::new();
    let mut next = 0u64;
    for &h in homes {
        while home(next) != h {
            next += 1;
        }
        out.push(next);
        next += 1;
    }
    out
}

fn loom_model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

#[test]
fn loom_probe_during_overwrite() {
    assert_eq!((B, H), (1, 3), "the models assume loom's small buckets");
    loom_model(|| {
        let table = Arc::new(Table::with_capacity(ROW, 4));
        table.upsert(7, &row(1));
        let writer = {
            let table = table.clone();
            thread::spawn(move || table.upsert(7, &row(2)))
        };
        let mut out = [0u8; ROW];
        assert!(table.get(7, &mut out), "key vanished during an overwrite");
        let tag = whole(&out).expect("torn row");
        assert!(tag == 1 || tag == 2);
        writer.join().unwrap();
        assert!(table.get(7, &mut out));
        assert_eq!(whole(&out), Some(2));
    });
}

#[test]
fn loom_probe_during_displacement() {
    // 5 buckets; A (home 0) in 0, B and C (home 1) in 1 and 2. D (home 0) finds buckets 0..2
    // full and bucket 3 free but 3 away from its home: B moves from bucket 1 to 3, D takes 1.
    let keys = keys_with_homes(5, &[0, 1, 1, 0]);
    let (a, b, c, d) = (keys[0], keys[1], keys[2], keys[3]);
    loom_model(move || {
        let table = Arc::new(Table::with_capacity(ROW, 4));
        table.upsert(a, &row(10));
        table.upsert(b, &row(11));
        table.upsert(c, &row(12));
        let reader = {
            let table = table.clone();
            thread::spawn(move || {
                let mut out = [0u8; ROW];
                assert!(table.get(b, &mut out), "displaced key missed");
                assert_eq!(whole(&out), Some(11), "displaced key read torn or wrong");
            })
        };
        table.upsert(d, &row(13));
        reader.join().unwrap();
        assert_eq!(
            table.capacity(),
            5,
            "the model expected a displacement, not a growth"
        );
        assert_eq!(table.overflow_len(), 0, "the model expected a displacement");
        table.check_invariants().unwrap();
        let mut out = [0u8; ROW];
        for (k, t) in [(a, 10), (b, 11), (c, 12), (d, 13)] {
            assert!(table.get(k, &mut out));
            assert_eq!(whole(&out), Some(t));
        }
    });
}

#[test]
fn loom_probe_during_growth() {
    loom_model(|| {
        let table = Arc::new(Table::with_capacity(ROW, 3));
        let cap = table.capacity();
        for k in 0..3u64 {
            table.upsert(k, &row(k as u32));
        }
        let reader = {
            let table = table.clone();
            thread::spawn(move || {
                let mut out = [0u8; ROW];
                for k in [0u64, 2] {
                    assert!(table.get(k, &mut out), "key {k} missed during growth");
                    assert_eq!(whole(&out), Some(k as u32));
                }
            })
        };
        // The fourth key exceeds the maximum load: the table grows.
        table.upsert(3, &row(3));
        // Also overwrite a key in the new array while the reader may still hold the old one.
        table.upsert(2, &row(2));
        reader.join().unwrap();
        assert!(table.capacity() > cap);
        let mut out = [0u8; ROW];
        assert!(table.get(3, &mut out));
        table.reclaim_now();
    });
}

/// The array behind a reader's pin is never freed while pinned, across two replacements.
#[test]
fn loom_reclamation() {
    struct Value {
        id: usize,
        freed: Arc<[AtomicUsize; 3]>,
    }
    impl Drop for Value {
        fn drop(&mut self) {
            self.freed[self.id].store(1, Ordering::SeqCst);
        }
    }
    loom_model(|| {
        let freed: Arc<[AtomicUsize; 3]> = Arc::new(std::array::from_fn(|_| AtomicUsize::new(0)));
        let value = |id| {
            Box::new(Value {
                id,
                freed: freed.clone(),
            })
        };
        let (shared, mut token) = Shared::new(value(0));
        let shared = Arc::new(shared);
        let reader = {
            let shared = shared.clone();
            let freed = freed.clone();
            thread::spawn(move || {
                for _ in 0..2 {
                    let g = shared.pin();
                    let id = g.id;
                    assert_eq!(
                        freed[id].load(Ordering::SeqCst),
                        0,
                        "value {id} freed while pinned"
                    );
                    thread::yield_now();
                    assert_eq!(
                        freed[id].load(Ordering::SeqCst),
                        0,
                        "value {id} freed while pinned"
                    );
                }
            })
        };
        let retired = shared.replace(&mut token, None, value(1));
        let retired = shared.try_reclaim(&token, retired);
        let retired = shared.replace(&mut token, retired, value(2));
        reader.join().unwrap();
        // With the reader gone, the last retired value must be reclaimable.
        assert!(shared.try_reclaim(&token, retired).is_none());
        assert_eq!(freed[0].load(Ordering::SeqCst), 1);
        assert_eq!(freed[1].load(Ordering::SeqCst), 1);
    });
}
