//! The `extern "C"` functions of libhopps; `include/hopps.h` is generated from this file.
//!
//! Every function here (1) turns its raw pointers into references, slices and strings, checking
//! for NULL first, (2) calls the safe core in `lib.rs`, and (3) runs inside `catch_unwind`, so
//! a panic becomes an `HOPPS_INTERNAL` error instead of unwinding into C.
//!
//! Conventions of every call (repeated in the header):
//! - the return value is `HOPPS_OK` (0) or a gRPC status code (`HOPPS_NOT_FOUND`, ...);
//! - `err` may be NULL; when it is not, `*err` is set to NULL on success and, on failure, to a
//!   new `hopps_error` that the caller owns and frees with `hopps_error_free`;
//! - strings are NUL-terminated UTF-8, borrowed for the duration of the call;
//! - buffers are borrowed for the duration of the call; libhopps keeps no pointer after it
//!   returns. Output buffers must not overlap each other or the inputs;
//! - `timeout_ms` is the call's deadline in milliseconds; 0 uses the handle's request timeout.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use crate::{CallError, ConnectOptions, Handle, code};

/// Success.
pub const HOPPS_OK: i32 = 0;
/// The call was cancelled.
pub const HOPPS_CANCELLED: i32 = 1;
/// An error without a more precise code.
pub const HOPPS_UNKNOWN: i32 = 2;
/// A bad argument: NULL where a value is required, a string that is not UTF-8, a bad address,
/// or a request the server rejects.
pub const HOPPS_INVALID_ARGUMENT: i32 = 3;
/// The call's deadline passed before the answer came.
pub const HOPPS_DEADLINE_EXCEEDED: i32 = 4;
/// Unknown model or table.
pub const HOPPS_NOT_FOUND: i32 = 5;
/// The call cannot run in this state (e.g. from a thread that runs a tokio runtime, or a pinned
/// version the node can no longer read).
pub const HOPPS_FAILED_PRECONDITION: i32 = 9;
/// An output buffer is too small; the needed dims are reported, grow the buffer and call again.
pub const HOPPS_OUT_OF_RANGE: i32 = 11;
/// A bug in hopps; the message says where.
pub const HOPPS_INTERNAL: i32 = 13;
/// The node cannot be reached; a retry (maybe later) can succeed.
pub const HOPPS_UNAVAILABLE: i32 = 14;

/// An open connection to a hopps node (opaque).
///
/// Thread-safe: any number of threads may call functions on one handle at once. Each call blocks
/// its thread until the answer, its deadline or an error. Owned by the caller from
/// `hopps_connect` until `hopps_client_free`, which must not race with calls on the same handle.
pub struct HoppsClient {
    handle: Handle,
}

/// A failed call's error (opaque): a gRPC status code and a message.
///
/// Owned by the caller; free it with `hopps_error_free`.
pub struct HoppsError {
    code: i32,
    message: CString,
}

/// Options of `hopps_connect`. A zero field takes the default; a NULL options pointer means all
/// defaults.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct HoppsOptions {
    /// Time to establish the connection, in ms (default 5000).
    pub connect_timeout_ms: u32,
    /// Deadline of calls whose `timeout_ms` is 0, in ms (default 60000).
    pub request_timeout_ms: u32,
    /// Largest message sent or accepted, in bytes (default 256 MiB).
    pub max_message_bytes: u64,
    /// Threads that drive the handle's connections (default: one per core).
    pub worker_threads: u32,
}

/// What the node acknowledged for a write (`hopps_upsert`, `hopps_delete`, `hopps_push`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct HoppsWriteAck {
    /// The version the write was applied on top of.
    pub version: u64,
    /// Rows written.
    pub rows: u64,
    /// Write-ahead-log sequence number of the write (0 when not logged).
    pub sequence: u64,
}

// ---------------------------------------------------------------------------------------------
// Boundary plumbing: panics, errors, pointers.

/// Runs `call`, turning its error or panic into a return code and `*err`.
fn guarded(err: *mut *mut HoppsError, call: impl FnOnce() -> Result<(), CallError>) -> i32 {
    let outcome = catch_unwind(AssertUnwindSafe(call)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_string());
        Err(CallError::new(
            code::INTERNAL,
            format!("INTERNAL: libhopps hit a bug ({what}); please report it with this message"),
        ))
    });
    let (status, error) = match outcome {
        Ok(()) => (HOPPS_OK, std::ptr::null_mut()),
        Err(failure) => {
            let status = failure.code;
            // A message with an interior NUL would be cut short in C; such a byte carries no
            // meaning for a person, so it is replaced.
            let message = CString::new(failure.message.replace('\0', "\u{fffd}"))
                .unwrap_or_else(|_| CString::from(c"hopps error"));
            let boxed = Box::new(HoppsError {
                code: status,
                message,
            });
            (status, Box::into_raw(boxed))
        }
    };
    if err.is_null() {
        if !error.is_null() {
            // SAFETY: `error` came from `Box::into_raw` just above and was handed to nobody.
            drop(unsafe { Box::from_raw(error) });
        }
    } else {
        // SAFETY: the caller passes either NULL (handled above) or a pointer to writable
        // storage for one `hopps_error *`, as the header documents.
        unsafe { err.write(error) };
    }
    status
}

fn null(what: &str) -> CallError {
    CallError::new(
        code::INVALID_ARGUMENT,
        format!("INVALID_ARGUMENT: {what} is NULL; pass a valid pointer"),
    )
}

/// A borrowed NUL-terminated UTF-8 string.
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string that stays valid for `'a`.
unsafe fn text<'a>(ptr: *const c_char, what: &str) -> Result<&'a str, CallError> {
    if ptr.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-NULL and NUL-terminated per this function's contract.
    let raw = unsafe { CStr::from_ptr(ptr) };
    raw.to_str().map_err(|utf8| {
        CallError::new(
            code::INVALID_ARGUMENT,
            format!("INVALID_ARGUMENT: {what} is not UTF-8 ({utf8}); pass a UTF-8 name"),
        )
    })
}

/// A borrowed input array; NULL is allowed when `len` is 0.
///
/// # Safety
/// `ptr` is NULL or points to `len` initialised, aligned values that stay valid and unwritten
/// for `'a`.
unsafe fn input<'a, T>(ptr: *const T, len: usize, what: &str) -> Result<&'a [T], CallError> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-NULL, and `len` readable values per this function's contract.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// A borrowed output array; NULL is allowed when `len` is 0.
///
/// # Safety
/// `ptr` is NULL or points to `len` aligned, writable values that nothing else reads or writes
/// for `'a` (plain-old-data types only, so any previous content is a valid value).
unsafe fn output<'a, T>(ptr: *mut T, len: usize, what: &str) -> Result<&'a mut [T], CallError> {
    if len == 0 {
        return Ok(&mut []);
    }
    if ptr.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-NULL, `len` writable values, not aliased, per this function's contract.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// # Safety
/// `client` is NULL or a handle from `hopps_connect` not yet freed.
unsafe fn handle<'a>(client: *const HoppsClient) -> Result<&'a Handle, CallError> {
    // SAFETY: per this function's contract, a non-NULL `client` points to a live handle.
    match unsafe { client.as_ref() } {
        Some(client) => Ok(&client.handle),
        None => Err(null("client")),
    }
}

/// Writes `value` through `ptr` when it is not NULL.
///
/// # Safety
/// `ptr` is NULL or points to writable storage for one `T`.
unsafe fn put<T>(ptr: *mut T, value: T) {
    if !ptr.is_null() {
        // SAFETY: non-NULL and writable per this function's contract.
        unsafe { ptr.write(value) };
    }
}

fn timeout(ms: u32) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(u64::from(ms)))
}

// ---------------------------------------------------------------------------------------------
// Library and errors.

/// The version of libhopps, e.g. "0.1.0". A static string: do not free it.
#[unsafe(no_mangle)]
pub extern "C" fn hopps_version() -> *const c_char {
    const VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(version) => version,
            Err(_) => c"unknown",
        };
    VERSION.as_ptr()
}

/// The upper-case gRPC name of `code` ("NOT_FOUND"), or "UNKNOWN". A static string: do not free
/// it.
#[unsafe(no_mangle)]
pub extern "C" fn hopps_code_name(code: i32) -> *const c_char {
    const NAMES: [&CStr; 17] = [
        c"OK",
        c"CANCELLED",
        c"UNKNOWN",
        c"INVALID_ARGUMENT",
        c"DEADLINE_EXCEEDED",
        c"NOT_FOUND",
        c"ALREADY_EXISTS",
        c"PERMISSION_DENIED",
        c"RESOURCE_EXHAUSTED",
        c"FAILED_PRECONDITION",
        c"ABORTED",
        c"OUT_OF_RANGE",
        c"UNIMPLEMENTED",
        c"INTERNAL",
        c"UNAVAILABLE",
        c"DATA_LOSS",
        c"UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or(c"UNKNOWN")
        .as_ptr()
}

/// The status code of `err` (never `HOPPS_OK`); `HOPPS_INVALID_ARGUMENT` when `err` is NULL.
///
/// # Safety
/// `err` is NULL or an error from libhopps not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hopps_error_code(err: *const HoppsError) -> i32 {
    // SAFETY: per the contract, a non-NULL `err` points to a live `HoppsError`.
    match unsafe { err.as_ref() } {
        Some(err) => err.code,
        None => HOPPS_INVALID_ARGUMENT,
    }
}

/// The message of `err`: NUL-terminated UTF-8 that names the model, table or argument and says
/// what to do. Owned by `err`: valid until `hopps_error_free(err)`, do not free it yourself.
/// An empty string when `err` is NULL.
///
/// # Safety
/// `err` is NULL or an error from libhopps not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hopps_error_message(err: *const HoppsError) -> *const c_char {
    // SAFETY: per the contract, a non-NULL `err` points to a live `HoppsError`.
    match unsafe { err.as_ref() } {
        Some(err) => err.message.as_ptr(),
        None => c"".as_ptr(),
    }
}

/// Frees an error. NULL is ignored.
///
/// # Safety
/// `err` is NULL or an error from libhopps not yet freed; it must not be used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hopps_error_free(err: *mut HoppsError) {
    if err.is_null() {
        return;
    }
    // SAFETY: a non-NULL `err` came from `Box::into_raw` in `guarded` and is freed once, per the
    // contract. Dropping a CString cannot panic.
    drop(unsafe { Box::from_raw(err) });
}

// ---------------------------------------------------------------------------------------------
// Connections.

/// Connects to the hopps node at `addr` ("host:port" or "http://host:port") and sets `*out` to
/// a new handle that the caller owns (free it with `hopps_client_free`). On failure `*out` is
/// set to NULL. `options` may be NULL (all defaults).
///
/// Cluster mode (routing over many nodes by placement) comes with the Rust client's; `addr`
/// names one node until then.
///
/// # Safety
/// `addr` is a NUL-terminated string; `options` is NULL or points to a `hopps_options`; `out`
/// points to writable storage for one `hopps_client *`; `err` follows the conventions at the top of this header.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hopps_connect(
    addr: *const c_char,
    options: *const HoppsOptions,
    out: *mut *mut HoppsClient,
    err: *mut *mut HoppsError,
) -> i32 {
    guarded(err, || {
        if out.is_null() {
            return Err(null("out"));
        }
        // SAFETY: `out` is non-NULL and writable per the contract; cleared first so a failure
        // never leaves a stale handle there.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: NUL-terminated per the contract.
        let addr = unsafe { text(addr, "addr") }?;
        // SAFETY: NULL or a valid `HoppsOptions` per the contract; copied out at once.
        let options = unsafe { options.as_ref() }.copied().unwrap_or_default();
        let options = ConnectOptions {
            connect_timeout: timeout(options.connect_timeout_ms),
            request_timeout: timeout(options.request_timeout_ms),
            max_message_bytes: usize::try_from(options.max_message_bytes)
                .ok()
                .filter(|&b| b > 0),
            worker_threads: usize::try_from(options.worker_threads)
                .ok()
                .filter(|&t| t > 0),
        };
        let handle = Handle::connect(addr, &options)?;
        let client = Box::into_raw(Box::new(HoppsClient { handle }));
        // SAFETY: as above; the handle's ownership passes to the caller.
        unsafe { out.write(client) };
        Ok(())
    })
}

/// Closes the connection and frees the handle. NULL is ignored.
///
/// # Safety
/// `client` is NULL or a handle from `hopps_connect` not yet freed, with no call on it in flight
/// on any thread; it must not be used afterwards. Must not be called from a thread that runs a
/// tokio runtime.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hopps_client_free(client: *mut HoppsClient) {
    if client.is_null() {
        return;
    }
    // Dropping the runtime joins its threads; a panic there must not unwind into C.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: a non-NULL `client` came from `Box::into_raw` in `hopps_connect` and is freed
        // once, with no call in flight, per the contract.
        drop(unsafe { Box::from_raw(client) });
    }));
}

// ---------------------------------------------------------------------------------------------
// Lookups.

/// Looks up `n_keys` keys of `table` in `model`.
///
/// Writes, on success:
/// - `values`: `n_keys * dim` floats, row after row in key order (`values_len` is the buffer's
///   capacity in floats). Rows of keys not found follow the table's missing-key policy;
/// - `found`: a bitmap, LSB first (key i is bit i % 8 of byte i / 8), `(n_keys + 7) / 8` bytes
///   (`found_len` is the buffer's size in bytes);
/// - `*dim_out`: floats per row; `*version_out`: the version the rows were read at.
///
/// `version` is NULL for the version the node serves, or points to a version to pin.
/// When `values` is too small the call fails with `HOPPS_OUT_OF_RANGE` and still sets
/// `*dim_out`: grow the buffer to `n_keys * dim` and call again (or learn the dim first with
/// `hopps_table_dim`). `dim_out` and `version_out` may be NULL.
///
/// # Safety
/// `client` is a live handle; `model` and `table` are NUL-terminated strings; `keys` points to
/// `n_keys` keys (NULL if 0); `values` to `values_len` writable floats and `found` to
/// `found_len` writable bytes (NULL if 0), neither overlapping the other or `keys`; `version`,
/// `dim_out`, `version_out` are NULL or valid; `err` follows the conventions at the top of this header.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hopps_lookup(
    client: *const HoppsClient,
    model: *const c_char,
    table: *const c_char,
    keys: *const u64,
    n_keys: usize,
    version: *const u64,
    values: *mut f32,
    values_len: usize,
    found: *mut u8,
    found_len: usize,
    dim_out: *mut u32,
    version_out: *mut u64,
    timeout_ms: u32,
    err: *mut *mut HoppsError,
) -> i32 {
    guarded(err, || {
        // SAFETY (all five): the pointers and lengths follow this function's contract.
        let handle = unsafe { handle(client) }?;
        let model = unsafe { text(model, "model") }?;
        let table = unsafe { text(table, "table") }?;
        let keys = unsafe { input(keys, n_keys, "keys") }?;
        let values = unsafe { output(values, values_len, "values") }?;
        let found = unsafe { output(found, found_len, "found") }?;
        // SAFETY: NULL or a readable u64 per the contract.
        let version = unsafe { version.as_ref() }.copied();
        let mut dim = 0u32;
        let result = handle.lookup_into(
            model,
            table,
            keys,
            version,
            values,
            found,
            &mut dim,
            timeout(timeout_ms),
        );
        // SAFETY: NULL or writable per the contract; the dim is reported also on OUT_OF_RANGE.
        unsafe { put(dim_out, dim) };
        let answer = result?;
        // SAFETY: NULL or writable per the contract.
        unsafe { put(version_out, answer.version) };
        Ok(())
    })
}

/// Looks up keys in several tables of `model` in one call; all tables are read at one version.
///
/// Table `i` is named `tables[i]` and takes `key_counts[i]` keys from `keys`, which holds the
/// keys of all tables one table after the other. On success:
/// - `values` holds the rows of table 0, then of table 1, ... (table `i` takes
///   `key_counts[i] * dims_out[i]` floats);
/// - `found` is one bitmap (LSB first) over all keys in the same order;
/// - `dims_out[i]` is table `i`'s dim (`dims_out` has `n_tables` entries);
/// - `*version_out` is the version every table was read at.
///
/// When `values` is too small the call fails with `HOPPS_OUT_OF_RANGE` and still fills
/// `dims_out`: grow the buffer and call again.
///
/// # Safety
/// `client` is a live handle; `model` and each `tables[i]` are NUL-terminated strings;
/// `tables` and `key_counts` point to `n_tables` entries; `keys` to the sum of `key_counts`
/// keys; `values`, `found`, `dims_out` to `values_len` floats, `found_len` bytes and
/// `n_tables` u32 (all writable, none overlapping another buffer); `version` and `version_out`
/// NULL or valid; `err` follows the conventions at the top of this header.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hopps_multi_lookup(
    client: *const HoppsClient,
    model: *const c_char,
    tables: *const *const c_char,
    key_counts: *const usize,
    n_tables: usize,
    keys: *const u64,
    version: *const u64,
    values: *mut f32,
    values_len: usize,
    found: *mut u8,
    found_len: usize,
    dims_out: *mut u32,
    version_out: *mut u64,
    timeout_ms: u32,
    err: *mut *mut HoppsError,
) -> i32 {
    guarded(err, || {
        // SAFETY (all four): the pointers and lengths follow this function's contract.
        let handle = unsafe { handle(client) }?;
        let model = unsafe { text(model, "model") }?;
        let names = unsafe { input(tables, n_tables, "tables") }?;
        let counts = unsafe { input(key_counts, n_tables, "key_counts") }?;
        let total = counts.iter().try_fold(0usize, |sum, &n| sum.checked_add(n));
        let total = total.ok_or_else(|| {
            CallError::new(
                code::INVALID_ARGUMENT,
                format!("INVALID_ARGUMENT: key_counts of model {model:?} overflow; check them"),
            )
        })?;
        // SAFETY: `keys` holds the sum of `key_counts` keys per the contract.
        let all_keys = unsafe { input(keys, total, "keys") }?;
        let mut requests: Vec<(&str, &[u64])> = Vec::with_capacity(n_tables);
        let mut at = 0usize;
        for (i, (&name, &count)) in names.iter().zip(counts).enumerate() {
            // SAFETY: each `tables[i]` is a NUL-terminated string per the contract.
            let name = unsafe { text(name, &format!("tables[{i}]")) }?;
            requests.push((name, &all_keys[at..at + count]));
            at += count;
        }
        // SAFETY (all three): writable, non-overlapping buffers per the contract.
        let values = unsafe { output(values, values_len, "values") }?;
        let found = unsafe { output(found, found_len, "found") }?;
        let dims = unsafe { output(dims_out, n_tables, "dims_out") }?;
        // SAFETY: NULL or a readable u64 per the contract.
        let version = unsafe { version.as_ref() }.copied();
        let read_at = handle.multi_lookup_into(
            model,
            &requests,
            version,
            values,
            found,
            dims,
            timeout(timeout_ms),
        )?;
        // SAFETY: NULL or writable per the contract.
        unsafe { put(version_out, read_at) };
        Ok(())
    })
}

/// Sets `*dim_out` to the dim of `table` in `model` as the node reports it (one admin call),
/// so a caller can size `hopps_lookup`'s buffer before the first lookup.
///
/// # Safety
/// `client` is a live handle; `model` and `table` are NUL-terminated strings; `dim_out` points
/// to a writable u32; `err` follows the conventions at the top of this header.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hopps_table_dim(
    client: *const HoppsClient,
    model: *const c_char,
    table: *const c_char,
    dim_out: *mut u32,
    timeout_ms: u32,
    err: *mut *mut HoppsError,
) -> i32 {
    guarded(err, || {
        // SAFETY (all three): the pointers follow this function's contract.
        let handle = unsafe { handle(client) }?;
        let model = unsafe { text(model, "model") }?;
        let table = unsafe { text(table, "table") }?;
        if dim_out.is_null() {
            return Err(null("dim_out"));
        }
        let dim = handle.table_dim(model, table, timeout(timeout_ms))?;
        // SAFETY: non-NULL and writable per the contract.
        unsafe { put(dim_out, dim) };
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Writes.

/// Inserts or overwrites `n_keys` rows of `table` in `model`; `values` holds `n_values` floats
/// (`n_keys * dim`, row after row). Durable on the node once acknowledged. `ack_out` may be
/// NULL.
///
/// # Safety
/// `client` is a live handle; `model` and `table` are NUL-terminated strings; `keys` points to
/// `n_keys` keys and `values` to `n_values` floats (NULL if 0); `ack_out` is NULL or writable;
/// `err` follows the conventions at the top of this header.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hopps_upsert(
    client: *const HoppsClient,
    model: *const c_char,
    table: *const c_char,
    keys: *const u64,
    n_keys: usize,
    values: *const f32,
    n_values: usize,
    ack_out: *mut HoppsWriteAck,
    timeout_ms: u32,
    err: *mut *mut HoppsError,
) -> i32 {
    guarded(err, || {
        // SAFETY (all five): the pointers and lengths follow this function's contract.
        let handle = unsafe { handle(client) }?;
        let model = unsafe { text(model, "model") }?;
        let table = unsafe { text(table, "table") }?;
        let keys = unsafe { input(keys, n_keys, "keys") }?;
        let values = unsafe { input(values, n_values, "values") }?;
        let ack = handle.upsert(model, table, keys, values, timeout(timeout_ms))?;
        // SAFETY: NULL or writable per the contract.
        unsafe { put(ack_out, write_ack(ack)) };
        Ok(())
    })
}

/// Removes `n_keys` rows of `table` in `model`. `ack_out` may be NULL.
///
/// # Safety
/// As `hopps_upsert`, without values.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hopps_delete(
    client: *const HoppsClient,
    model: *const c_char,
    table: *const c_char,
    keys: *const u64,
    n_keys: usize,
    ack_out: *mut HoppsWriteAck,
    timeout_ms: u32,
    err: *mut *mut HoppsError,
) -> i32 {
    guarded(err, || {
        // SAFETY (all four): the pointers and lengths follow this function's contract.
        let handle = unsafe { handle(client) }?;
        let model = unsafe { text(model, "model") }?;
        let table = unsafe { text(table, "table") }?;
        let keys = unsafe { input(keys, n_keys, "keys") }?;
        let ack = handle.delete(model, table, keys, timeout(timeout_ms))?;
        // SAFETY: NULL or writable per the contract.
        unsafe { put(ack_out, write_ack(ack)) };
        Ok(())
    })
}

/// Applies `n_gradients` gradient floats (`n_keys * dim`, row after row) to `table` in `model`
/// with the table's server-side optimizer. `ack_out` may be NULL.
///
/// # Safety
/// As `hopps_upsert`, with gradients in place of values.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn hopps_push(
    client: *const HoppsClient,
    model: *const c_char,
    table: *const c_char,
    keys: *const u64,
    n_keys: usize,
    gradients: *const f32,
    n_gradients: usize,
    ack_out: *mut HoppsWriteAck,
    timeout_ms: u32,
    err: *mut *mut HoppsError,
) -> i32 {
    guarded(err, || {
        // SAFETY (all five): the pointers and lengths follow this function's contract.
        let handle = unsafe { handle(client) }?;
        let model = unsafe { text(model, "model") }?;
        let table = unsafe { text(table, "table") }?;
        let keys = unsafe { input(keys, n_keys, "keys") }?;
        let gradients = unsafe { input(gradients, n_gradients, "gradients") }?;
        let ack = handle.push(model, table, keys, gradients, timeout(timeout_ms))?;
        // SAFETY: NULL or writable per the contract.
        unsafe { put(ack_out, write_ack(ack)) };
        Ok(())
    })
}

fn write_ack(ack: hopps_client::WriteAck) -> HoppsWriteAck {
    HoppsWriteAck {
        version: ack.version,
        rows: ack.rows,
        sequence: ack.sequence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_codes_are_the_cores() {
        // Spelled as literals above so that the header generator can print them.
        let pairs = [
            (HOPPS_OK, code::OK),
            (HOPPS_CANCELLED, code::CANCELLED),
            (HOPPS_UNKNOWN, code::UNKNOWN),
            (HOPPS_INVALID_ARGUMENT, code::INVALID_ARGUMENT),
            (HOPPS_DEADLINE_EXCEEDED, code::DEADLINE_EXCEEDED),
            (HOPPS_NOT_FOUND, code::NOT_FOUND),
            (HOPPS_FAILED_PRECONDITION, code::FAILED_PRECONDITION),
            (HOPPS_OUT_OF_RANGE, code::OUT_OF_RANGE),
            (HOPPS_INTERNAL, code::INTERNAL),
            (HOPPS_UNAVAILABLE, code::UNAVAILABLE),
        ];
        for (header, core) in pairs {
            assert_eq!(header, core);
        }
    }

    /// Runs a call and returns its code and message, freeing the error.
    fn outcome(call: impl FnOnce(*mut *mut HoppsError) -> i32) -> (i32, String) {
        let mut err: *mut HoppsError = std::ptr::null_mut();
        let status = call(&mut err);
        // SAFETY: `err` is NULL or a live error that the call just handed over.
        let (code, message) = unsafe {
            let code = if err.is_null() {
                HOPPS_OK
            } else {
                hopps_error_code(err)
            };
            let message = CStr::from_ptr(hopps_error_message(err))
                .to_string_lossy()
                .into_owned();
            hopps_error_free(err);
            (code, message)
        };
        assert_eq!(status, code, "return value and error code agree");
        (status, message)
    }

    #[test]
    fn a_panic_becomes_an_internal_error() {
        let (status, message) = outcome(|err| guarded(err, || panic!("boom in a test")));
        assert_eq!(status, HOPPS_INTERNAL);
        assert!(message.contains("boom in a test"), "{message}");
        // With no error out-pointer the error is freed, the code still returned.
        assert_eq!(
            guarded(std::ptr::null_mut(), || panic!("x")),
            HOPPS_INTERNAL
        );
    }

    #[test]
    fn null_arguments_are_named() {
        let (status, message) = outcome(|err| {
            // SAFETY: NULL everywhere is within the contract of the checks under test.
            unsafe {
                hopps_lookup(
                    std::ptr::null(),
                    c"m".as_ptr(),
                    c"t".as_ptr(),
                    std::ptr::null(),
                    0,
                    std::ptr::null(),
                    std::ptr::null_mut(),
                    0,
                    std::ptr::null_mut(),
                    0,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    0,
                    err,
                )
            }
        });
        assert_eq!(status, HOPPS_INVALID_ARGUMENT);
        assert!(message.contains("client is NULL"), "{message}");

        let mut client: *mut HoppsClient = std::ptr::null_mut();
        let (status, message) = outcome(|err| {
            // SAFETY: a NULL address is within the contract of the checks under test.
            unsafe { hopps_connect(std::ptr::null(), std::ptr::null(), &mut client, err) }
        });
        assert_eq!(status, HOPPS_INVALID_ARGUMENT);
        assert!(message.contains("addr is NULL"), "{message}");
        assert!(client.is_null());
    }

    #[test]
    fn connect_failure_reports_unavailable_and_no_handle() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr").port()
        };
        let addr = CString::new(format!("127.0.0.1:{port}")).expect("no NUL");
        let options = HoppsOptions {
            connect_timeout_ms: 2000,
            worker_threads: 1,
            ..HoppsOptions::default()
        };
        let mut client: *mut HoppsClient = std::ptr::NonNull::dangling().as_ptr();
        let (status, message) = outcome(|err| {
            // SAFETY: valid string, options and out-pointer.
            unsafe { hopps_connect(addr.as_ptr(), &options, &mut client, err) }
        });
        assert_eq!(status, HOPPS_UNAVAILABLE, "{message}");
        assert!(message.contains(&port.to_string()), "{message}");
        assert!(client.is_null(), "a failed connect leaves no handle");
    }

    #[test]
    fn static_strings_match_the_core() {
        for code in -1..18 {
            // SAFETY: hopps_code_name returns a static NUL-terminated string.
            let name = unsafe { CStr::from_ptr(hopps_code_name(code)) };
            assert_eq!(name.to_str().expect("ascii"), crate::code_name(code));
        }
        // SAFETY: hopps_version returns a static NUL-terminated string.
        let version = unsafe { CStr::from_ptr(hopps_version()) };
        assert_eq!(version.to_str().expect("ascii"), env!("CARGO_PKG_VERSION"));
    }
}
