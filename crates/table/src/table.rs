//! The public table: growth, sizing and the writer lock around [`Buckets`].

use crate::buckets::{B, Buckets, Full, H, NOWHERE, Occupancy};
use crate::raw::{Retired, Shared, WriterToken};
use crate::sync::{AtomicUsize, Mutex, Ordering, spin};

/// Load factor a table sized by [`Table::with_capacity`] is sized for. Slots come in whole
/// buckets, so a table holding exactly the rows it was sized for sits between 0.95 and 0.96 (at
/// least 200 rows). Measured: every key family of the tests fills to 0.97 without the overflow
/// area.
pub const SIZED_LOAD: f64 = 0.96;

/// Load factor beyond which an insert of a new key grows the table first.
pub const MAX_LOAD: f64 = 0.97;

/// Keys processed per prefetch window by the batch operations: the whole window's lines are
/// requested before the first is probed. A 1000-key batch is one window.
const WINDOW: usize = 1024;

/// Keys of an `upsert_batch` sorted by home together (bounds the writer's scratch memory).
const SORT_WINDOW: usize = 1 << 16;

/// How many keys ahead `upsert_batch` prefetches.
const AHEAD: usize = 8;

fn slots_for(rows: usize) -> usize {
    ((rows as f64 / SIZED_LOAD).ceil() as usize).max(H * B)
}

/// Overflow entries a table starts with: about one per 4096 slots (the overflow area is rarely
/// used: keys reach 0.97 without it), at least one; a full area doubles or the table grows.
fn overflow_cap_for(slots: usize) -> usize {
    if cfg!(loom) {
        2
    } else {
        (slots >> 12).clamp(1, 1024)
    }
}

/// A concurrent map from `u64` key to a fixed-size row of bytes, built on Hopscotch hashing.
///
/// - Readers ([`get`](Table::get), [`lookup_batch`](Table::lookup_batch)) never take a lock and
///   never return a torn row: they validate each row against a per-segment version counter and
///   retry when the writer touched it meanwhile.
/// - Writers ([`upsert`](Table::upsert), [`upsert_batch`](Table::upsert_batch),
///   [`delete`](Table::delete), [`reserve`](Table::reserve)) take `&self` and serialise on an
///   internal lock; the engine funnels each table's writes to one task, so it is uncontended.
/// - Any `u64` is a valid key, including 0 and `u64::MAX`.
///
/// Argument lengths that do not match the row size are caller bugs: they are checked with
/// `debug_assert!` and, in release builds, the call does nothing (writes) or copies what fits
/// (reads) instead of panicking.
pub struct Table {
    row_bytes: usize,
    shared: Shared<Buckets>,
    writer: Mutex<Writer>,
    len: AtomicUsize,
    slots: AtomicUsize,
}

/// State only the writer touches.
struct Writer {
    token: WriterToken,
    occupied: Occupancy,
    retired: Option<Retired<Buckets>>,
    row: Vec<u8>,
    /// Scratch of `upsert_batch`: (home, index) of the keys, reused across calls.
    order: Vec<(usize, u32)>,
}

impl Table {
    /// An empty table of rows of `row_bytes` bytes; it grows as rows arrive.
    pub fn new(row_bytes: usize) -> Table {
        Table::with_capacity(row_bytes, 0)
    }

    /// An empty table sized so that `rows` entries fill it to load factor [`SIZED_LOAD`] (no
    /// power-of-two rounding; slots come in buckets of 7). A table is never smaller than one
    /// neighbourhood (32 buckets, 224 slots).
    pub fn with_capacity(row_bytes: usize, rows: usize) -> Table {
        let slots = slots_for(rows);
        let buckets = Buckets::new(row_bytes, slots, overflow_cap_for(slots));
        let occupied = Occupancy::new(buckets.slots());
        let slots = buckets.slots();
        let (shared, token) = Shared::new(Box::new(buckets));
        Table {
            row_bytes,
            shared,
            writer: Mutex::new(Writer {
                token,
                occupied,
                retired: None,
                row: vec![0; row_bytes],
                order: Vec::new(),
            }),
            len: AtomicUsize::new(0),
            slots: AtomicUsize::new(slots),
        }
    }

    /// Bytes of a row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of slots (not counting the small overflow area).
    pub fn capacity(&self) -> usize {
        self.slots.load(Ordering::Relaxed)
    }

    /// `len() / capacity()`.
    pub fn load_factor(&self) -> f64 {
        self.len() as f64 / self.capacity() as f64
    }

    /// Bytes of memory the table holds: slots, overflow area, version counters and the writer's
    /// occupancy bitmap. Pages of a fresh table are reserved but only touched as rows arrive.
    pub fn bytes_used(&self) -> usize {
        let b = self.shared.pin();
        b.bytes() + b.slots().div_ceil(64) * 8 + std::mem::size_of::<Table>()
    }

    /// Whether the kernel accepted the transparent-huge-page advice for the slot array (tables
    /// under 2 MiB live on the ordinary heap and report false).
    pub fn huge_pages(&self) -> bool {
        self.shared.pin().huge_pages()
    }

    /// Keys in the overflow area (those no displacement could bring near their home).
    pub fn overflow_len(&self) -> usize {
        self.shared.pin().overflow_len()
    }

    /// Copies the first `out.len()` bytes (<= row_bytes) of `key`'s row into `out`. Returns
    /// whether the key was present; `out` is untouched when it was not.
    pub fn get(&self, key: u64, out: &mut [u8]) -> bool {
        debug_assert!(out.len() <= self.row_bytes, "get: out longer than a row");
        let n = out.len().min(self.row_bytes);
        let b = self.shared.pin();
        let home = b.home(key);
        b.read(key, home, NOWHERE, &mut out[..n])
    }

    /// Batch lookup. `stride = out.len() / keys.len()` bytes (<= row_bytes) are copied per key,
    /// in key order; `found[i]` is set per key (`found.len() >= keys.len()`); rows of missing
    /// keys are left untouched. Returns the number found.
    ///
    /// The home buckets of a whole window of keys (up to 1024) are prefetched, then the buckets
    /// their bitmaps name, then the rows, and only then are keys probed and copied, so the memory system works on many misses at
    /// once. No allocation, no lock.
    pub fn lookup_batch(&self, keys: &[u64], out: &mut [u8], found: &mut [bool]) -> usize {
        if keys.is_empty() {
            return 0;
        }
        let stride = out.len() / keys.len();
        debug_assert!(
            stride <= self.row_bytes,
            "lookup_batch: stride longer than a row"
        );
        debug_assert!(
            found.len() >= keys.len(),
            "lookup_batch: found shorter than keys"
        );
        let copy = stride.min(self.row_bytes);
        let b = self.shared.pin();
        let mut n = 0;
        // Homes and located slots of the window, computed once (on the stack: no allocation).
        let mut homes = [0usize; WINDOW];
        let mut hints = [NOWHERE; WINDOW];
        for (w, window) in keys.chunks(WINDOW).enumerate() {
            let homes = &mut homes[..window.len()];
            let hints = &mut hints[..window.len()];
            for (h, &k) in homes.iter_mut().zip(window) {
                *h = b.home(k);
                b.prefetch_home(*h);
            }
            for &h in homes.iter() {
                b.prefetch_candidates(h);
            }
            for ((hint, &h), &k) in hints.iter_mut().zip(homes.iter()).zip(window) {
                *hint = b.locate(k, h);
                b.prefetch_row(h, *hint);
            }
            for (j, ((&h, &hint), &k)) in homes.iter().zip(hints.iter()).zip(window).enumerate() {
                let i = w * WINDOW + j;
                let at = i * stride;
                let hit = b.read(k, h, hint, &mut out[at..at + copy]);
                if let Some(f) = found.get_mut(i) {
                    *f = hit;
                }
                n += hit as usize;
            }
        }
        n
    }

    /// Inserts or overwrites `key`'s row (`row.len() == row_bytes`), growing the table if needed.
    pub fn upsert(&self, key: u64, row: &[u8]) {
        debug_assert_eq!(row.len(), self.row_bytes, "upsert: row length != row_bytes");
        if row.len() != self.row_bytes {
            return;
        }
        let mut w = self.writer.lock();
        self.reclaim(&mut w);
        self.upsert_one(&mut w, key, row);
    }

    /// Upserts `keys[i]` with `rows[i * row_bytes..][..row_bytes]`, in order (a later duplicate
    /// wins). `rows.len()` must be `keys.len() * row_bytes`.
    pub fn upsert_batch(&self, keys: &[u64], rows: &[u8]) {
        debug_assert_eq!(
            rows.len(),
            keys.len() * self.row_bytes,
            "upsert_batch: rows length"
        );
        if rows.len() != keys.len() * self.row_bytes {
            return;
        }
        let mut w = self.writer.lock();
        self.reclaim(&mut w);
        // No growth up front: most batches of a running table are overwrites. Bulk loads size
        // the table first (`with_capacity` or `reserve`).
        //
        // Keys are applied in order of their home bucket (a stable order for equal homes, so a
        // later duplicate still wins): the writes sweep the array instead of jumping around it,
        // and the next keys' buckets are prefetched while one is written.
        let mut order = std::mem::take(&mut w.order);
        let rb = self.row_bytes;
        for (base, window) in keys.chunks(SORT_WINDOW).enumerate() {
            let base = base * SORT_WINDOW;
            {
                let b = self.shared.current(&w.token);
                order.clear();
                order.extend(
                    window
                        .iter()
                        .enumerate()
                        .map(|(i, &k)| (b.home(k), (base + i) as u32)),
                );
            }
            order.sort_unstable();
            for (pos, &(_, i)) in order.iter().enumerate() {
                if let Some(&(h, _)) = order.get(pos + AHEAD) {
                    let b = self.shared.current(&w.token);
                    b.prefetch_home(h);
                    w.occupied.prefetch(h * B);
                    if let Some(j) = w.occupied.first_free(h) {
                        b.prefetch_slot_row(h, j);
                    }
                }
                let i = i as usize;
                self.upsert_one(&mut w, keys[i], &rows[i * rb..(i + 1) * rb]);
            }
        }
        w.order = order;
    }

    /// Removes `key`; returns whether it was present.
    pub fn delete(&self, key: u64) -> bool {
        let mut w = self.writer.lock();
        self.reclaim(&mut w);
        let w = &mut *w;
        let b = self.shared.current(&w.token);
        match b.find(key) {
            Some(place) => {
                b.remove(place, &mut w.occupied);
                self.len.fetch_sub(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Makes room for `additional` more keys without growth at load factor [`SIZED_LOAD`].
    pub fn reserve(&self, additional: usize) {
        let mut w = self.writer.lock();
        self.reclaim(&mut w);
        let need = self.len().saturating_add(additional);
        if need as f64 > self.capacity() as f64 * SIZED_LOAD {
            self.rebuild(&mut w, slots_for(need));
        }
    }

    /// Visits every (key, row) — each row read consistently (never torn); used for checkpoints.
    ///
    /// Holds the writer lock for the whole walk, so the visit is an exact snapshot: readers go
    /// on, writers wait. `f` must not write to this table (that would deadlock).
    pub fn for_each(&self, mut f: impl FnMut(u64, &[u8])) {
        let mut w = self.writer.lock();
        let w = &mut *w;
        let b = self.shared.current(&w.token);
        b.for_each_entry(&w.occupied, &mut w.row, &mut f);
    }

    /// Checks the table's structural invariants (for tests): every bitmap bit names an occupied
    /// slot holding a key of that home, each occupied slot is named once, and the count matches.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), String> {
        let w = self.writer.lock();
        let b = self.shared.current(&w.token);
        let n = b.check(&w.occupied)?;
        if n != self.len() {
            return Err(format!("{n} keys found, len() says {}", self.len()));
        }
        Ok(())
    }

    fn upsert_one(&self, w: &mut Writer, key: u64, row: &[u8]) {
        loop {
            let b = self.shared.current(&w.token);
            if let Some(place) = b.find(key) {
                b.overwrite(place, row);
                return;
            }
            let len = self.len();
            let slots = b.slots();
            let mut overflow_full = false;
            if (len + 1) as f64 <= slots as f64 * MAX_LOAD {
                match b.insert_new(key, row, &mut w.occupied) {
                    Ok(()) => {
                        self.len.store(len + 1, Ordering::Relaxed);
                        return;
                    }
                    Err(Full) => overflow_full = true,
                }
            }
            if overflow_full && (len as f64) < slots as f64 * 0.85 {
                // The keys crowd a few neighbourhoods although the table has room: more slots
                // would not help them, a larger overflow area does.
                let cap = b.overflow_cap() * 2;
                self.rebuild_with(w, slots, cap);
            } else {
                self.rebuild(w, (slots + slots / 2).max(slots_for(len + 1)));
            }
        }
    }

    fn rebuild(&self, w: &mut Writer, slots: usize) {
        let overflow = overflow_cap_for(slots);
        self.rebuild_with(w, slots, overflow);
    }

    /// Copies every entry into a new array of `slots` slots and publishes it. Readers keep using
    /// the old array meanwhile (it does not change: only this writer changes arrays); it is freed
    /// once the last reader that could hold it is gone.
    fn rebuild_with(&self, w: &mut Writer, slots: usize, mut overflow: usize) {
        loop {
            let next = Box::new(Buckets::new(self.row_bytes, slots, overflow));
            let mut occupied = Occupancy::new(next.slots());
            let mut fits = true;
            let old = self.shared.current(&w.token);
            old.for_each_entry(&w.occupied, &mut w.row, |k, r| {
                if fits && next.insert_new(k, r, &mut occupied).is_err() {
                    fits = false;
                }
            });
            if fits {
                let slots = next.slots();
                let previous = w.retired.take();
                w.retired = Some(self.shared.replace(&mut w.token, previous, next));
                w.occupied = occupied;
                self.slots.store(slots, Ordering::Relaxed);
                return;
            }
            overflow *= 2;
        }
    }

    /// Frees the array replaced by the last growth once no reader can hold it.
    fn reclaim(&self, w: &mut Writer) {
        if let Some(r) = w.retired.take() {
            w.retired = self.shared.try_reclaim(&w.token, r);
        }
    }

    /// Waits until the array replaced by the last growth is freed (tests).
    #[doc(hidden)]
    pub fn reclaim_now(&self) {
        let mut w = self.writer.lock();
        while w.retired.is_some() {
            self.reclaim(&mut w);
            spin();
        }
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        let retired = self.writer.lock().retired.take();
        if let Some(r) = retired {
            self.shared.drop_retired(r);
        }
    }
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("row_bytes", &self.row_bytes)
            .field("len", &self.len())
            .field("capacity", &self.capacity())
            .finish()
    }
}
