//! Every `unsafe` block of hopps lives here, behind three safe abstractions:
//!
//! - [`Words`]: a large zeroed array of `AtomicU32` in anonymous memory advised for transparent
//!   huge pages (random reads over gigabytes are bound by TLB misses without them);
//! - [`Shared`]: a pointer to the current bucket array that readers pin without blocking and that
//!   the single writer replaces on growth, freeing the old array only once no reader can hold it;
//! - [`prefetch`]: a cache hint.
#![allow(unsafe_code)]

use crate::sync::{AtomicPtr, AtomicU32, AtomicUsize, Ordering, fence, spin};
use crossbeam_utils::CachePadded;
use std::marker::PhantomData;
use std::ops::Deref;

/// Anonymous mappings at least this large are advised for huge pages.
#[cfg(not(loom))]
const HUGE_PAGE: usize = 2 << 20;

/// A zero-initialised array of `AtomicU32`, shared by readers and the writer through atomics only.
pub(crate) struct Words {
    #[cfg(not(loom))]
    map: Option<memmap2::MmapMut>,
    #[cfg(not(loom))]
    heap: Box<[AtomicU32]>,
    #[cfg(loom)]
    heap: Box<[AtomicU32]>,
    #[cfg(not(loom))]
    len: usize,
    huge_pages: bool,
}

impl Words {
    /// `len` words, all zero. Memory is mapped lazily: pages are touched by their first write.
    pub(crate) fn zeroed(len: usize) -> Words {
        #[cfg(not(loom))]
        {
            let bytes = len * std::mem::size_of::<AtomicU32>();
            if bytes >= HUGE_PAGE
                && let Ok(map) = memmap2::MmapMut::map_anon(bytes)
            {
                // Huge pages are an optimisation: a kernel that refuses them still gives correct
                // (slower) memory, so the error is deliberately ignored.
                let huge_pages = map.advise(memmap2::Advice::HugePage).is_ok();
                return Words {
                    map: Some(map),
                    heap: Box::new([]),
                    len,
                    huge_pages,
                };
            }
            Words {
                map: None,
                heap: (0..len).map(|_| AtomicU32::new(0)).collect(),
                len,
                huge_pages: false,
            }
        }
        #[cfg(loom)]
        Words {
            heap: (0..len).map(|_| AtomicU32::new(0)).collect(),
            huge_pages: false,
        }
    }

    #[inline(always)]
    pub(crate) fn as_slice(&self) -> &[AtomicU32] {
        #[cfg(not(loom))]
        if let Some(map) = &self.map {
            // SAFETY: the mapping is `len * 4` bytes, page-aligned (so aligned for AtomicU32),
            // zero-filled by the kernel (all-zero bytes are a valid AtomicU32), and lives as long
            // as `self`, which the returned borrow cannot outlive. AtomicU32 has the size and
            // alignment of u32, and no `&mut` to the mapping is ever created after this point,
            // so all access is through atomics.
            return unsafe {
                std::slice::from_raw_parts(map.as_ptr().cast::<AtomicU32>(), self.len)
            };
        }
        &self.heap
    }

    /// Whether the kernel accepted the huge-page advice for this array.
    pub(crate) fn huge_pages(&self) -> bool {
        self.huge_pages
    }
}

/// Hint the CPU to bring the line holding `value` into cache. Never faults.
#[inline(always)]
pub(crate) fn prefetch<T>(value: &T) {
    #[cfg(all(target_arch = "x86_64", not(loom)))]
    // SAFETY: prefetch is a hint with no architectural effect on memory; the address comes from
    // a live reference.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
            (value as *const T).cast::<i8>(),
        );
    }
    #[cfg(not(all(target_arch = "x86_64", not(loom))))]
    let _ = value;
}

/// Number of pin-counter stripes per parity.
const STRIPES: usize = if cfg!(loom) { 1 } else { 4 };

/// A pointer to the current `T` (the bucket array), read by any number of readers and replaced by
/// one writer.
///
/// Protocol (an epoch scheme with two parities):
/// - a reader reads `epoch` = e, increments `pins[e & 1]`, loads `current`, and re-reads
///   `epoch`; if it moved, it unpins and starts over. It decrements the same counter when done.
/// - the writer swaps `current`, then increments `epoch`, and keeps the old pointer as
///   [`Retired`] with parity `old_epoch & 1`. It frees it once that parity's counters read zero,
///   and always frees the previous retired array before the next swap.
///
/// A SeqCst fence between a reader's increment and its pointer load, and between the writer's
/// swap and its reading of the counters, makes "the writer saw the pin" or "the reader saw the
/// swap" always true.
///
/// Invariant: a pinned reader at parity p = e & 1 holds the array installed at epoch e or e + 1.
/// The one of epoch e is retired with parity p; the one of epoch e + 1 is retired only after the
/// writer drained parity p (as part of the swap to e + 2), which happens after the reader's
/// re-read of `epoch` saw e and hence after its increment. So no array is freed while pinned.
pub(crate) struct Shared<T> {
    current: AtomicPtr<T>,
    epoch: AtomicUsize,
    pins: [CachePadded<AtomicUsize>; 2 * STRIPES],
    /// Pairs this value with its writer token.
    id: usize,
    _owns: PhantomData<Box<T>>,
}

// SAFETY: Shared owns a `T` behind a pointer and hands out `&T` to many threads; it is Send/Sync
// exactly when `T` is (the same bounds as `Arc<T>` minus reference counting).
unsafe impl<T: Send + Sync> Send for Shared<T> {}
// SAFETY: see above.
unsafe impl<T: Send + Sync> Sync for Shared<T> {}

/// Proof of being the single writer of one [`Shared`]: only its holder may replace the pointer,
/// and borrows of the current value taken through it end before a replacement.
pub(crate) struct WriterToken {
    owner: usize,
}

/// An array swapped out by the writer and waiting until no reader can hold it.
pub(crate) struct Retired<T> {
    ptr: *mut T,
    parity: usize,
}

// SAFETY: a Retired is only a deferred `Box<T>` drop, owned by the writer.
unsafe impl<T: Send> Send for Retired<T> {}

/// A reader's pin: derefs to the array that was current when it was taken.
pub(crate) struct Guard<'a, T> {
    shared: &'a Shared<T>,
    value: &'a T,
    slot: usize,
}

impl<T> Shared<T> {
    pub(crate) fn new(value: Box<T>) -> (Shared<T>, WriterToken) {
        let shared = Shared {
            current: AtomicPtr::new(Box::into_raw(value)),
            epoch: AtomicUsize::new(0),
            pins: std::array::from_fn(|_| CachePadded::new(AtomicUsize::new(0))),
            id: {
                // Ids only pair a table with its token; std's atomic even under loom, since
                // this is no part of the protocol being modelled.
                static NEXT: std::sync::atomic::AtomicUsize =
                    std::sync::atomic::AtomicUsize::new(1);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
            _owns: PhantomData,
        };
        let token = WriterToken {
            owner: shared.owner_id(),
        };
        (shared, token)
    }

    fn owner_id(&self) -> usize {
        self.id
    }

    /// Pins the current value for reading. Never blocks: it retries only if the writer swapped
    /// the pointer in the few instructions between the epoch read and its re-read.
    #[inline]
    pub(crate) fn pin(&self) -> Guard<'_, T> {
        let stripe = crate::sync::stripe() % STRIPES;
        loop {
            let epoch = self.epoch.load(Ordering::SeqCst);
            let slot = (epoch & 1) * STRIPES + stripe;
            self.pins[slot].fetch_add(1, Ordering::SeqCst);
            // Store-load ordering with the writer's fence in `try_reclaim`: either the writer
            // sees this pin, or this thread sees the writer's new pointer and epoch. (SeqCst
            // accesses alone give this in C++20, but fences are what loom models.)
            fence(Ordering::SeqCst);
            let ptr = self.current.load(Ordering::SeqCst);
            if self.epoch.load(Ordering::SeqCst) == epoch {
                // SAFETY: by the invariant on `Shared`, the array behind `ptr` is not freed
                // while `pins[slot]` counts this reader, i.e. until the guard is dropped; it was
                // created from a Box and is never mutated except through atomics.
                let value = unsafe { &*ptr };
                return Guard {
                    shared: self,
                    value,
                    slot,
                };
            }
            self.pins[slot].fetch_sub(1, Ordering::SeqCst);
            spin();
        }
    }

    /// The current value, for the writer.
    pub(crate) fn current<'a>(&'a self, token: &'a WriterToken) -> &'a T {
        assert_eq!(
            token.owner,
            self.owner_id(),
            "writer token of another table"
        );
        // SAFETY: only the holder of the (unique, unclonable) token swaps and frees values, and it
        // needs `&mut` to the token to do so, which ends this shared borrow first.
        unsafe { &*self.current.load(Ordering::SeqCst) }
    }

    /// Makes `value` current. The previous retired value must have been reclaimed (it is passed
    /// in and waited for here, which only waits for readers that pinned before the last swap).
    pub(crate) fn replace(
        &self,
        token: &mut WriterToken,
        previous: Option<Retired<T>>,
        value: Box<T>,
    ) -> Retired<T> {
        assert_eq!(
            token.owner,
            self.owner_id(),
            "writer token of another table"
        );
        if let Some(mut previous) = previous {
            loop {
                match self.try_reclaim(token, previous) {
                    None => break,
                    Some(p) => previous = p,
                }
                spin();
            }
        }
        let old = self.current.swap(Box::into_raw(value), Ordering::SeqCst);
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst);
        Retired {
            ptr: old,
            parity: epoch & 1,
        }
    }

    /// Frees `retired` if no reader can still hold it; otherwise hands it back.
    pub(crate) fn try_reclaim(
        &self,
        token: &WriterToken,
        retired: Retired<T>,
    ) -> Option<Retired<T>> {
        assert_eq!(
            token.owner,
            self.owner_id(),
            "writer token of another table"
        );
        let base = retired.parity * STRIPES;
        // Pairs with the fence in `pin` (see there).
        fence(Ordering::SeqCst);
        let busy = self.pins[base..base + STRIPES]
            .iter()
            .any(|p| p.load(Ordering::SeqCst) != 0);
        if busy {
            return Some(retired);
        }
        // SAFETY: the pointer came from Box::into_raw in `new`/`replace`, was swapped out, and no
        // reader holds it (drained parity, see the invariant on `Shared`); it is freed once
        // because `retired` is consumed.
        drop(unsafe { Box::from_raw(retired.ptr) });
        None
    }

    /// Frees a retired value when the table itself is dropped (no reader can exist then).
    pub(crate) fn drop_retired(&mut self, retired: Retired<T>) {
        // SAFETY: `&mut self` proves no guard (which borrows `self`) is alive.
        drop(unsafe { Box::from_raw(retired.ptr) });
    }
}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        let ptr = self.current.load(Ordering::SeqCst);
        // SAFETY: `&mut self` proves no guard is alive; the pointer came from Box::into_raw and
        // is the current value, which `replace` never frees.
        drop(unsafe { Box::from_raw(ptr) });
    }
}

impl<T> Deref for Guard<'_, T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        self.value
    }
}

impl<T> Drop for Guard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        self.shared.pins[self.slot].fetch_sub(1, Ordering::SeqCst);
    }
}
