//! One bucket array of the Hopscotch table: a fixed number of buckets of `B` (7) slots, each bucket
//! holding the neighbourhood bitmap and version counter of its home, its keys and its rows, plus
//! a small overflow area.
//!
//! Layout (one array of `u32` words; `stride = 2 + 2B + B * row_words` words a bucket):
//!
//! ```text
//! bucket c: [ hop(c) | seq(c) | key 0 lo, hi | .. | key B-1 lo, hi | row 0 | .. | row B-1 ]
//! ```
//!
//! - A key's home is a bucket: `mix(key) * buckets >> 64` (range reduction: any bucket count).
//!   Buckets wrap around, so there is no tail and the slot count is `B * buckets` exactly.
//! - `hop(c)` is the neighbourhood bitmap of home `c`: bit i set means bucket `c + i` (mod the
//!   bucket count) holds at least one key whose home is `c`. The neighbourhood is `H` buckets,
//!   that is `H * B` = 224 slots.
//! - `seq(c)` is the seqlock of home `c` and the occupancy of bucket `c`:
//!   bit 0 BUSY (the writer is changing keys homed at `c`), bit 1 OVERFLOWED (a key homed at `c`
//!   went to the overflow area), bits 2..2+B which slots of bucket `c` hold a key, and a 23-bit
//!   counter above them (a reader would have to sleep through 2^23 write sections of one home
//!   mid-probe to be fooled by its wrap-around). Readers validate their key's home `seq` around a probe and retry if it moved.
//! - The overflow area holds the keys that no displacement could bring within `H` buckets of
//!   their home: `[key lo | key hi | row]` entries, guarded by their own seqlock word.
//!
//! Invariants (writer side, all upheld under the writer lock):
//! - every key is either in the overflow area or in an occupied slot of bucket `c + i`, `i < H`,
//!   of its home `c`, with bit i of `hop(c)` set; a set bit names a bucket holding at least one
//!   key of that home; a key appears once;
//! - every change to a slot holding (or about to hold) a key homed at `c`, and to `hop(c)`,
//!   happens inside a write section of `seq(c)`; a slot's occupancy bit is set (with release
//!   ordering) only after its key and row are written, so a reader that sees the bit sees them.

use crate::raw::{Words, prefetch};
use crate::sync::{AtomicU32, Ordering, fence, spin};

/// Slots a bucket. Seven: the bitmap, the version word and seven keys fill exactly one 64-byte
/// line, so a bucket's header is one cache line and, when rows are a multiple of 64 bytes (dim
/// 16, 32, 64, 128 in f32), every row starts on a line of its own (one line for a 64-byte row).
pub(crate) const B: usize = if cfg!(loom) { 1 } else { 7 };

/// Neighbourhood size in buckets: a key lives within `H` buckets (`H * B` = 224 slots) of its
/// home. 32 keeps the bitmap in one word.
pub(crate) const H: usize = if cfg!(loom) { 3 } else { 32 };

/// `locate`'s answer for a key it did not find.
pub(crate) const NOWHERE: u32 = u32::MAX;

const BUSY: u32 = 1;
const OVERFLOWED: u32 = 2;
const SEQ_STEP: u32 = 1 << (2 + B);

/// How far from its home the writer looks for a free slot before it gives up on displacement.
const MAX_SEARCH: usize = 1 << 16;

/// The key mix: a bijection on u64 with full avalanche (the splitmix64 finaliser), so sequential
/// keys, keys with only high bits set, and random keys all spread evenly.
#[inline(always)]
pub fn mix(key: u64) -> u64 {
    let mut x = key ^ 0x9E37_79B9_7F4A_7C15;
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Where the writer found a key.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Place {
    Slot(At),
    Overflow { index: usize },
}

/// Why an insert did not fit: the caller grows the table (or its overflow area) and retries.
#[derive(Debug)]
pub(crate) struct Full;

/// The writer's record of which slots are occupied, one bit a slot. Readers never need it: they
/// go through the bitmaps.
pub(crate) struct Occupancy {
    bits: Vec<u64>,
}

impl Occupancy {
    pub(crate) fn new(slots: usize) -> Occupancy {
        Occupancy {
            bits: vec![0; slots.div_ceil(64)],
        }
    }
    #[inline]
    fn set(&mut self, s: usize) {
        self.bits[s / 64] |= 1 << (s % 64);
    }
    #[inline]
    fn clear(&mut self, s: usize) {
        self.bits[s / 64] &= !(1 << (s % 64));
    }
    #[inline]
    pub(crate) fn is_set(&self, s: usize) -> bool {
        self.bits[s / 64] & (1 << (s % 64)) != 0
    }
    /// Prefetches the word holding `slot`'s bit.
    #[inline(always)]
    pub(crate) fn prefetch(&self, slot: usize) {
        if let Some(w) = self.bits.get(slot / 64) {
            prefetch(w);
        }
    }

    /// The first free slot of `bucket`, if any (where a new key of that home most likely goes).
    #[inline(always)]
    pub(crate) fn first_free(&self, bucket: usize) -> Option<usize> {
        (0..B).find(|j| !self.is_set(bucket * B + j))
    }

    /// First free slot at distance `< limit` from `from`, wrapping; returns the distance.
    fn free_distance(&self, from: usize, slots: usize, limit: usize) -> Option<usize> {
        let limit = limit.min(slots);
        let mut d = 0;
        while d < limit {
            let s = (from + d) % slots;
            let word = s / 64;
            let bit = s % 64;
            // Bits past `slots` in the last word are never set, so mask them as occupied.
            let mut free = !self.bits[word] >> bit;
            let valid = (slots - word * 64).min(64) - bit;
            if valid < 64 {
                free &= (1u64 << valid) - 1;
            }
            if free != 0 {
                let dd = d + free.trailing_zeros() as usize;
                return (dd < limit).then_some(dd);
            }
            d += valid;
        }
        None
    }
}

pub(crate) struct Buckets {
    words: Words,
    buckets: usize,
    stride: usize,
    row_words: usize,
    overflow_seq: AtomicU32,
    overflow_len: AtomicU32,
    overflow_cap: usize,
    overflow_base: usize,
}

const HOP: usize = 0;
const SEQ: usize = 1;
const KEYS: usize = 2;
const ROWS: usize = 2 + 2 * B;
const OCC_SHIFT: u32 = 2;
const OCC_ALL: u32 = ((1 << B) - 1) << OCC_SHIFT;

/// A located key: its home, the bucket holding it and the slot in that bucket.
#[derive(Clone, Copy, Debug)]
pub(crate) struct At {
    home: usize,
    bucket: usize,
    slot: usize,
}

impl Buckets {
    /// `slots` is rounded up to whole buckets and to at least `H` buckets (so that a
    /// neighbourhood never covers a bucket twice).
    pub(crate) fn new(row_bytes: usize, slots: usize, overflow_cap: usize) -> Buckets {
        let buckets = slots.div_ceil(B).max(H);
        let row_words = row_bytes.div_ceil(4);
        let stride = ROWS + B * row_words;
        let overflow_base = buckets * stride;
        let words = Words::zeroed(overflow_base + overflow_cap * (2 + row_words));
        Buckets {
            words,
            buckets,
            stride,
            row_words,
            overflow_seq: AtomicU32::new(0),
            overflow_len: AtomicU32::new(0),
            overflow_cap,
            overflow_base,
        }
    }

    pub(crate) fn slots(&self) -> usize {
        self.buckets * B
    }
    pub(crate) fn overflow_cap(&self) -> usize {
        self.overflow_cap
    }
    pub(crate) fn overflow_len(&self) -> usize {
        self.overflow_len.load(Ordering::Relaxed) as usize
    }
    pub(crate) fn huge_pages(&self) -> bool {
        self.words.huge_pages()
    }
    pub(crate) fn bytes(&self) -> usize {
        self.words.as_slice().len() * 4
    }

    #[inline(always)]
    pub(crate) fn home(&self, key: u64) -> usize {
        ((mix(key) as u128 * self.buckets as u128) >> 64) as usize
    }

    #[inline(always)]
    fn wrap(&self, c: usize) -> usize {
        if c >= self.buckets {
            c - self.buckets
        } else {
            c
        }
    }

    #[inline(always)]
    fn bucket(&self, c: usize) -> &[AtomicU32] {
        &self.words.as_slice()[c * self.stride..(c + 1) * self.stride]
    }

    #[inline(always)]
    fn row<'a>(&self, bucket: &'a [AtomicU32], slot: usize) -> &'a [AtomicU32] {
        let at = ROWS + slot * self.row_words;
        &bucket[at..at + self.row_words]
    }

    #[inline(always)]
    fn overflow_entry(&self, i: usize) -> &[AtomicU32] {
        let n = 2 + self.row_words;
        let base = self.overflow_base + i * n;
        &self.words.as_slice()[base..base + n]
    }

    #[inline(always)]
    fn key_at(bucket: &[AtomicU32], slot: usize) -> u64 {
        bucket[KEYS + 2 * slot].load(Ordering::Relaxed) as u64
            | (bucket[KEYS + 2 * slot + 1].load(Ordering::Relaxed) as u64) << 32
    }

    /// The slot of `bucket` holding `key`, if any, given the bucket's `seq` word.
    #[inline(always)]
    fn slot_of(bucket: &[AtomicU32], seq: u32, key: u64) -> Option<usize> {
        // Compare the low words of all slots without branches (the match position is random,
        // so a compare-and-branch loop mispredicts), then confirm the high word of the matches.
        let lo = key as u32;
        let mut hits = 0u32;
        for j in 0..B {
            hits |= ((bucket[KEYS + 2 * j].load(Ordering::Relaxed) == lo) as u32) << j;
        }
        hits &= (seq & OCC_ALL) >> OCC_SHIFT;
        let hi = (key >> 32) as u32;
        while hits != 0 {
            let j = hits.trailing_zeros() as usize;
            hits &= hits - 1;
            if bucket[KEYS + 2 * j + 1].load(Ordering::Relaxed) == hi {
                return Some(j);
            }
        }
        None
    }

    /// Where `key` is, read without validation: a hint for prefetching and for `read`.
    /// Encoded as `bucket offset << 8 | slot`, or `NOWHERE`.
    #[inline(always)]
    pub(crate) fn locate(&self, key: u64, home: usize) -> u32 {
        let hb = self.bucket(home);
        let mut hop = hb[HOP].load(Ordering::Relaxed);
        while hop != 0 {
            let i = hop.trailing_zeros() as usize;
            hop &= hop - 1;
            let b = self.bucket(self.wrap(home + i));
            if let Some(j) = Self::slot_of(b, b[SEQ].load(Ordering::Relaxed), key) {
                return ((i as u32) << 8) | j as u32;
            }
        }
        NOWHERE
    }

    // ---- reading (any thread) ----

    /// Prefetches the home bucket's header: bitmap, version, occupancy and keys.
    #[inline(always)]
    pub(crate) fn prefetch_home(&self, home: usize) {
        let b = self.bucket(home);
        prefetch(&b[HOP]);
        prefetch(&b[ROWS - 1]);
    }

    /// Prefetches every line of the row of slot `slot` of bucket `bucket`.
    #[inline(always)]
    pub(crate) fn prefetch_slot_row(&self, bucket: usize, slot: usize) {
        let row = self.row(self.bucket(bucket), slot);
        for w in row.iter().step_by(16) {
            prefetch(w);
        }
        if let Some(last) = row.last() {
            prefetch(last);
        }
    }

    /// Prefetches the headers of the other buckets the home's bitmap names.
    #[inline(always)]
    pub(crate) fn prefetch_candidates(&self, home: usize) {
        let mut hop = self.bucket(home)[HOP].load(Ordering::Relaxed) & !1;
        while hop != 0 {
            let i = hop.trailing_zeros() as usize;
            hop &= hop - 1;
            let b = self.bucket(self.wrap(home + i));
            prefetch(&b[HOP]);
            prefetch(&b[ROWS - 1]);
        }
    }

    /// Prefetches the row a `locate` hint names.
    #[inline(always)]
    pub(crate) fn prefetch_row(&self, home: usize, hint: u32) {
        if hint == NOWHERE {
            return;
        }
        self.prefetch_slot_row(
            self.wrap(home + (hint >> 8) as usize),
            (hint & 0xFF) as usize,
        );
    }

    /// Copies the first `out.len()` (<= row_bytes) bytes of `key`'s row into `out`; never returns
    /// a torn row: the copy is validated against the home's seqlock and retried.
    #[inline]
    pub(crate) fn read(&self, key: u64, home: usize, hint: u32, out: &mut [u8]) -> bool {
        let hb = self.bucket(home);
        loop {
            let v1 = hb[SEQ].load(Ordering::Acquire);
            if v1 & BUSY != 0 {
                spin();
                continue;
            }
            let hop = hb[HOP].load(Ordering::Relaxed);
            let mut found = false;
            // The hint (from `locate`) is only a guess: it counts if the home's bitmap names its
            // bucket and the slot is occupied by the key, all inside this validated read.
            if hint != NOWHERE && hop & (1 << (hint >> 8)) != 0 {
                let i = (hint >> 8) as usize;
                let j = (hint & 0xFF) as usize;
                let (b, seq) = if i == 0 {
                    (hb, v1)
                } else {
                    let b = self.bucket(self.wrap(home + i));
                    (b, b[SEQ].load(Ordering::Acquire))
                };
                if seq & (1 << (OCC_SHIFT as usize + j)) != 0 && Self::key_at(b, j) == key {
                    copy_out(self.row(b, j), out);
                    found = true;
                }
            }
            let mut rest = if found { 0 } else { hop };
            while rest != 0 {
                let i = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                let (b, seq) = if i == 0 {
                    (hb, v1)
                } else {
                    let b = self.bucket(self.wrap(home + i));
                    (b, b[SEQ].load(Ordering::Acquire))
                };
                if let Some(j) = Self::slot_of(b, seq, key) {
                    copy_out(self.row(b, j), out);
                    found = true;
                    break;
                }
            }
            if !found && v1 & OVERFLOWED != 0 {
                match self.read_overflow(key, out) {
                    Some(f) => found = f,
                    None => {
                        spin();
                        continue;
                    }
                }
            }
            fence(Ordering::Acquire);
            if hb[SEQ].load(Ordering::Relaxed) == v1 {
                return found;
            }
            spin();
        }
    }

    /// One validated scan of the overflow area; None if the writer changed it meanwhile.
    fn read_overflow(&self, key: u64, out: &mut [u8]) -> Option<bool> {
        let o1 = self.overflow_seq.load(Ordering::Acquire);
        if o1 & BUSY != 0 {
            return None;
        }
        let n = (self.overflow_len.load(Ordering::Relaxed) as usize).min(self.overflow_cap);
        let mut found = false;
        for i in 0..n {
            let e = self.overflow_entry(i);
            if overflow_key(e) == key {
                copy_out(&e[2..], out);
                found = true;
                break;
            }
        }
        fence(Ordering::Acquire);
        (self.overflow_seq.load(Ordering::Relaxed) == o1).then_some(found)
    }

    // ---- writing (the writer only) ----

    /// Where `key` is. Reads without validation: only the writer calls this, and it is the only
    /// thread that changes the array.
    pub(crate) fn find(&self, key: u64) -> Option<Place> {
        let home = self.home(key);
        let mut hop = self.bucket(home)[HOP].load(Ordering::Relaxed);
        while hop != 0 {
            let i = hop.trailing_zeros() as usize;
            hop &= hop - 1;
            let bucket = self.wrap(home + i);
            let b = self.bucket(bucket);
            if let Some(slot) = Self::slot_of(b, b[SEQ].load(Ordering::Relaxed), key) {
                return Some(Place::Slot(At { home, bucket, slot }));
            }
        }
        if self.bucket(home)[SEQ].load(Ordering::Relaxed) & OVERFLOWED != 0 {
            let n = self.overflow_len.load(Ordering::Relaxed) as usize;
            for index in 0..n {
                if overflow_key(self.overflow_entry(index)) == key {
                    return Some(Place::Overflow { index });
                }
            }
        }
        None
    }

    /// Opens a write section on a seqlock word: readers validating it will retry.
    #[inline(always)]
    fn begin(seq: &AtomicU32) {
        let v = seq.load(Ordering::Relaxed);
        debug_assert_eq!(v & BUSY, 0, "nested write section");
        seq.store(v | BUSY, Ordering::Relaxed);
        // Orders the BUSY store before every data store of the section (seqlock writer side).
        fence(Ordering::Release);
    }

    /// Closes a write section, adding `flags`. Occupancy bits changed inside the section are
    /// kept: the word is re-read, not restored.
    #[inline(always)]
    fn end(seq: &AtomicU32, flags: u32) {
        let v = seq.load(Ordering::Relaxed);
        seq.store(
            (v & !BUSY).wrapping_add(SEQ_STEP) | flags,
            Ordering::Release,
        );
    }

    /// Marks a slot occupied (release: its key and row, written before, become visible with
    /// the bit) or free.
    #[inline(always)]
    fn set_occupied(bucket: &[AtomicU32], slot: usize, occupied: bool) {
        let bit = 1 << (OCC_SHIFT as usize + slot);
        let v = bucket[SEQ].load(Ordering::Relaxed);
        let v = if occupied { v | bit } else { v & !bit };
        bucket[SEQ].store(v, Ordering::Release);
    }

    /// Whether bucket `c` holds a key of home `home` other than in `except`.
    fn holds_home(&self, c: usize, home: usize, except: usize) -> bool {
        let b = self.bucket(c);
        let mut occ = (b[SEQ].load(Ordering::Relaxed) & OCC_ALL) >> OCC_SHIFT;
        occ &= !(1 << except);
        while occ != 0 {
            let j = occ.trailing_zeros() as usize;
            occ &= occ - 1;
            if self.home(Self::key_at(b, j)) == home {
                return true;
            }
        }
        false
    }

    /// Overwrites the row of a key at `place` (found by `find`).
    pub(crate) fn overwrite(&self, place: Place, row: &[u8]) {
        match place {
            Place::Slot(at) => {
                let hb = self.bucket(at.home);
                Self::begin(&hb[SEQ]);
                copy_in(self.row(self.bucket(at.bucket), at.slot), row);
                Self::end(&hb[SEQ], 0);
            }
            Place::Overflow { index } => {
                Self::begin(&self.overflow_seq);
                copy_in(&self.overflow_entry(index)[2..], row);
                Self::end(&self.overflow_seq, 0);
            }
        }
    }

    /// Removes the key at `place` (found by `find`).
    pub(crate) fn remove(&self, place: Place, occupied: &mut Occupancy) {
        match place {
            Place::Slot(at) => {
                let hb = self.bucket(at.home);
                let keep_bit = self.holds_home(at.bucket, at.home, at.slot);
                Self::begin(&hb[SEQ]);
                Self::set_occupied(self.bucket(at.bucket), at.slot, false);
                if !keep_bit {
                    let i = (at.bucket + self.buckets - at.home) % self.buckets;
                    hb[HOP].store(
                        hb[HOP].load(Ordering::Relaxed) & !(1 << i),
                        Ordering::Relaxed,
                    );
                }
                Self::end(&hb[SEQ], 0);
                occupied.clear(at.bucket * B + at.slot);
            }
            Place::Overflow { index } => {
                // The last entry moves into the hole; readers of its key validate the overflow
                // seqlock, so they retry instead of missing it.
                Self::begin(&self.overflow_seq);
                let last = self.overflow_len.load(Ordering::Relaxed) as usize - 1;
                if index != last {
                    let (from, to) = (self.overflow_entry(last), self.overflow_entry(index));
                    for (t, f) in to.iter().zip(from) {
                        t.store(f.load(Ordering::Relaxed), Ordering::Relaxed);
                    }
                }
                self.overflow_len.store(last as u32, Ordering::Relaxed);
                Self::end(&self.overflow_seq, 0);
            }
        }
    }

    /// Inserts a key known to be absent. Fails only when neither a displacement nor the
    /// overflow area can take it.
    pub(crate) fn insert_new(
        &self,
        key: u64,
        row: &[u8],
        occupied: &mut Occupancy,
    ) -> Result<(), Full> {
        let home = self.home(key);
        let hb = self.bucket(home);
        if let Some((bucket, slot)) = self.make_room(home, occupied) {
            let b = self.bucket(bucket);
            Self::begin(&hb[SEQ]);
            b[KEYS + 2 * slot].store(key as u32, Ordering::Relaxed);
            b[KEYS + 2 * slot + 1].store((key >> 32) as u32, Ordering::Relaxed);
            copy_in(self.row(b, slot), row);
            Self::set_occupied(b, slot, true);
            let i = (bucket + self.buckets - home) % self.buckets;
            hb[HOP].store(
                hb[HOP].load(Ordering::Relaxed) | (1 << i),
                Ordering::Relaxed,
            );
            Self::end(&hb[SEQ], 0);
            occupied.set(bucket * B + slot);
            return Ok(());
        }
        let n = self.overflow_len.load(Ordering::Relaxed) as usize;
        if n >= self.overflow_cap {
            return Err(Full);
        }
        // The home's flag goes up with the entry, in one section of the home, so a reader that
        // validates its home sees neither or both.
        Self::begin(&hb[SEQ]);
        Self::begin(&self.overflow_seq);
        let e = self.overflow_entry(n);
        e[0].store(key as u32, Ordering::Relaxed);
        e[1].store((key >> 32) as u32, Ordering::Relaxed);
        copy_in(&e[2..], row);
        self.overflow_len.store(n as u32 + 1, Ordering::Relaxed);
        Self::end(&self.overflow_seq, 0);
        Self::end(&hb[SEQ], OVERFLOWED);
        Ok(())
    }

    /// Finds a free slot within `H` buckets of `home`, displacing keys towards free slots further
    /// on (Hopscotch). Each move keeps the moved key inside its own neighbourhood, so a chain
    /// that gets stuck leaves a valid table, and the search goes on from the next free slot.
    /// None when no free slot in reach can be brought close enough.
    fn make_room(&self, home: usize, occupied: &mut Occupancy) -> Option<(usize, usize)> {
        let slots = self.buckets * B;
        let mut from = 0;
        while from < MAX_SEARCH.min(slots) {
            let d = from
                + occupied.free_distance((home * B + from) % slots, slots, MAX_SEARCH - from)?;
            if let Some(at) = self.bring_close((home * B + d) % slots, d / B, occupied) {
                return Some(at);
            }
            from = d + 1;
        }
        None
    }

    /// Moves the free slot `free`, `dist` buckets from its home, to within `H` buckets of it.
    fn bring_close(
        &self,
        mut free: usize,
        mut dist: usize,
        occupied: &mut Occupancy,
    ) -> Option<(usize, usize)> {
        while dist >= H {
            let f = free / B;
            // The move that brings the free slot closest to home: for each home b before the
            // free bucket, its first bucket holding one of its keys.
            let mut best: Option<(usize, usize, usize)> = None;
            for back in (1..H).rev() {
                let b = (f + self.buckets - back) % self.buckets;
                let hop = self.bucket(b)[HOP].load(Ordering::Relaxed) & ((1u32 << back) - 1);
                if hop != 0 {
                    let i = hop.trailing_zeros() as usize;
                    if best.is_none_or(|(_, bb, bi)| back - i > bb - bi) {
                        best = Some((b, back, i));
                    }
                    if i == 0 {
                        break;
                    }
                }
            }
            let (b, back, i) = best?;
            let c = self.wrap(b + i);
            let cb = self.bucket(c);
            let mut occ = (cb[SEQ].load(Ordering::Relaxed) & OCC_ALL) >> OCC_SHIFT;
            let mut moved = false;
            while occ != 0 {
                let j = occ.trailing_zeros() as usize;
                occ &= occ - 1;
                if self.home(Self::key_at(cb, j)) == b {
                    self.relocate(b, (c, j), (f, free % B), back, i);
                    occupied.set(free);
                    occupied.clear(c * B + j);
                    free = c * B + j;
                    dist -= back - i;
                    moved = true;
                    break;
                }
            }
            debug_assert!(
                moved,
                "hop bit of home {b} names bucket {c} without its key"
            );
            if !moved {
                return None;
            }
        }
        Some((free / B, free % B))
    }

    /// Moves a key of home `b` from `(bucket, slot)` `from` (bucket bit `i`) to the free
    /// `to` (bucket bit `k`).
    fn relocate(&self, b: usize, from: (usize, usize), to: (usize, usize), k: usize, i: usize) {
        let keep_bit = self.holds_home(from.0, b, from.1);
        let hb = self.bucket(b);
        let (src, dst) = (self.bucket(from.0), self.bucket(to.0));
        Self::begin(&hb[SEQ]);
        for w in 0..2 {
            dst[KEYS + 2 * to.1 + w].store(
                src[KEYS + 2 * from.1 + w].load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
        }
        for (d, s) in self.row(dst, to.1).iter().zip(self.row(src, from.1)) {
            d.store(s.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        Self::set_occupied(dst, to.1, true);
        Self::set_occupied(src, from.1, false);
        let mut hop = hb[HOP].load(Ordering::Relaxed) | (1 << k);
        if !keep_bit {
            hop &= !(1 << i);
        }
        hb[HOP].store(hop, Ordering::Relaxed);
        Self::end(&hb[SEQ], 0);
    }

    /// Every (key, row) of the array, for the writer (growth, iteration under the writer lock).
    pub(crate) fn for_each_entry(
        &self,
        occupied: &Occupancy,
        row: &mut [u8],
        mut f: impl FnMut(u64, &[u8]),
    ) {
        for c in 0..self.buckets {
            let b = self.bucket(c);
            for j in 0..B {
                if occupied.is_set(c * B + j) {
                    copy_out(self.row(b, j), row);
                    f(Self::key_at(b, j), row);
                }
            }
        }
        for i in 0..self.overflow_len() {
            let e = self.overflow_entry(i);
            copy_out(&e[2..], row);
            f(overflow_key(e), row);
        }
    }

    /// Checks the structural invariants (tests and debugging); returns the number of keys.
    pub(crate) fn check(&self, occupied: &Occupancy) -> Result<usize, String> {
        let mut n = 0;
        for c in 0..self.buckets {
            let b = self.bucket(c);
            let seq = b[SEQ].load(Ordering::Relaxed);
            if seq & BUSY != 0 {
                return Err(format!("bucket {c} left busy"));
            }
            for j in 0..B {
                let bit = seq & (1 << (OCC_SHIFT as usize + j)) != 0;
                if bit != occupied.is_set(c * B + j) {
                    return Err(format!(
                        "bucket {c} slot {j}: occupancy bit and writer record differ"
                    ));
                }
                if !bit {
                    continue;
                }
                n += 1;
                let key = Self::key_at(b, j);
                let home = self.home(key);
                let i = (c + self.buckets - home) % self.buckets;
                if i >= H {
                    return Err(format!(
                        "key {key} in bucket {c} is {i} buckets from its home {home}"
                    ));
                }
                if self.bucket(home)[HOP].load(Ordering::Relaxed) & (1 << i) == 0 {
                    return Err(format!(
                        "key {key} in bucket {c}: bit {i} of home {home} clear"
                    ));
                }
            }
        }
        for home in 0..self.buckets {
            let mut hop = self.bucket(home)[HOP].load(Ordering::Relaxed);
            while hop != 0 {
                let i = hop.trailing_zeros() as usize;
                hop &= hop - 1;
                if !self.holds_home(self.wrap(home + i), home, B) {
                    return Err(format!(
                        "home {home} bit {i}: bucket holds no key of this home"
                    ));
                }
            }
        }
        Ok(n + self.overflow_len())
    }
}

/// The key of an overflow entry (`[lo, hi, row..]`).
#[inline(always)]
fn overflow_key(entry: &[AtomicU32]) -> u64 {
    entry[0].load(Ordering::Relaxed) as u64 | (entry[1].load(Ordering::Relaxed) as u64) << 32
}

/// Copies row words into `out` (its first `out.len()` bytes; little-endian word order).
#[inline(always)]
fn copy_out(words: &[AtomicU32], out: &mut [u8]) {
    let whole = out.len() / 4;
    let mut chunks = out.chunks_exact_mut(4);
    for (c, w) in (&mut chunks).zip(words) {
        c.copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let n = tail.len();
        if let Some(w) = words.get(whole) {
            tail.copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes()[..n]);
        }
    }
}

/// Stores `row` into row words, zero-padding the last word.
#[inline(always)]
fn copy_in(words: &[AtomicU32], row: &[u8]) {
    let mut chunks = row.chunks_exact(4);
    for (w, c) in words.iter().zip(&mut chunks) {
        w.store(
            u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            Ordering::Relaxed,
        );
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let mut b = [0u8; 4];
        b[..tail.len()].copy_from_slice(tail);
        if let Some(w) = words.get(row.len() / 4) {
            w.store(u32::from_le_bytes(b), Ordering::Relaxed);
        }
    }
}
