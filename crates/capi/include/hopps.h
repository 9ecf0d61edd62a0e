/*
 * hopps.h: the C ABI of hopps (libhopps), a parameter server for recommendation models.
 *
 * Link with -lhopps (libhopps.so or libhopps.a; the static library also needs -lpthread -ldl -lm).
 *
 * Conventions of every call:
 * - The return value is HOPPS_OK (0) or a gRPC status code (HOPPS_NOT_FOUND, ...; codes not
 *   listed below keep their gRPC numbers, and hopps_code_name names any of them).
 * - `err` may be NULL. When it is not, *err is set to NULL on success and, on failure, to a new
 *   hopps_error that the caller owns: read it with hopps_error_code / hopps_error_message and
 *   free it with hopps_error_free.
 * - Strings passed in are NUL-terminated UTF-8, borrowed for the duration of the call.
 * - Buffers passed in are borrowed for the duration of the call; libhopps keeps no pointer to
 *   them after it returns. Output buffers must not overlap each other or the inputs. A buffer
 *   may be NULL when its length is 0.
 * - Strings returned are owned by libhopps (static) or by the object they came from, as each
 *   function says; the caller never frees them with free().
 * - `timeout_ms` is the call's deadline in milliseconds; 0 uses the handle's request timeout.
 *   A call whose deadline passes returns HOPPS_DEADLINE_EXCEEDED and abandons the request.
 * - A hopps_client is thread-safe: any number of threads may call it at once; each call blocks
 *   its own thread. No panic or exception ever crosses this boundary.
 */


#ifndef HOPPS_H
#define HOPPS_H

/* Generated from crates/capi/src/ffi.rs by cbindgen; do not edit. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

// Success.
#define HOPPS_OK 0

// The call was cancelled.
#define HOPPS_CANCELLED 1

// An error without a more precise code.
#define HOPPS_UNKNOWN 2

// A bad argument: NULL where a value is required, a string that is not UTF-8, a bad address,
// or a request the server rejects.
#define HOPPS_INVALID_ARGUMENT 3

// The call's deadline passed before the answer came.
#define HOPPS_DEADLINE_EXCEEDED 4

// Unknown model or table.
#define HOPPS_NOT_FOUND 5

// The call cannot run in this state (e.g. from a thread that runs a tokio runtime, or a pinned
// version the node can no longer read).
#define HOPPS_FAILED_PRECONDITION 9

// An output buffer is too small; the needed dims are reported, grow the buffer and call again.
#define HOPPS_OUT_OF_RANGE 11

// A bug in hopps; the message says where.
#define HOPPS_INTERNAL 13

// The node cannot be reached; a retry (maybe later) can succeed.
#define HOPPS_UNAVAILABLE 14

// An open connection to a hopps node (opaque).
//
// Thread-safe: any number of threads may call functions on one handle at once. Each call blocks
// its thread until the answer, its deadline or an error. Owned by the caller from
// `hopps_connect` until `hopps_client_free`, which must not race with calls on the same handle.
typedef struct hopps_client hopps_client;

// A failed call's error (opaque): a gRPC status code and a message.
//
// Owned by the caller; free it with `hopps_error_free`.
typedef struct hopps_error hopps_error;

// Options of `hopps_connect`. A zero field takes the default; a NULL options pointer means all
// defaults.
typedef struct {
  // Time to establish the connection, in ms (default 5000).
  uint32_t connect_timeout_ms;
  // Deadline of calls whose `timeout_ms` is 0, in ms (default 60000).
  uint32_t request_timeout_ms;
  // Largest message sent or accepted, in bytes (default 256 MiB).
  uint64_t max_message_bytes;
  // Threads that drive the handle's connections (default: one per core).
  uint32_t worker_threads;
} hopps_options;

// What the node acknowledged for a write (`hopps_upsert`, `hopps_delete`, `hopps_push`).
typedef struct {
  // The version the write was applied on top of.
  uint64_t version;
  // Rows written.
  uint64_t rows;
  // Write-ahead-log sequence number of the write (0 when not logged).
  uint64_t sequence;
} hopps_write_ack;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

// The version of libhopps, e.g. "0.1.0". A static string: do not free it.
const char *hopps_version(void);

// The upper-case gRPC name of `code` ("NOT_FOUND"), or "UNKNOWN". A static string: do not free
// it.
const char *hopps_code_name(int32_t code);

// The status code of `err` (never `HOPPS_OK`); `HOPPS_INVALID_ARGUMENT` when `err` is NULL.
//
// # Safety
// `err` is NULL or an error from libhopps not yet freed.
int32_t hopps_error_code(const hopps_error *err);

// The message of `err`: NUL-terminated UTF-8 that names the model, table or argument and says
// what to do. Owned by `err`: valid until `hopps_error_free(err)`, do not free it yourself.
// An empty string when `err` is NULL.
//
// # Safety
// `err` is NULL or an error from libhopps not yet freed.
const char *hopps_error_message(const hopps_error *err);

// Frees an error. NULL is ignored.
//
// # Safety
// `err` is NULL or an error from libhopps not yet freed; it must not be used afterwards.
void hopps_error_free(hopps_error *err);

// Connects to the hopps node at `addr` ("host:port" or "http://host:port") and sets `*out` to
// a new handle that the caller owns (free it with `hopps_client_free`). On failure `*out` is
// set to NULL. `options` may be NULL (all defaults).
//
// Cluster mode (routing over many nodes by placement) comes with the Rust client's; `addr`
// names one node until then.
//
// # Safety
// `addr` is a NUL-terminated string; `options` is NULL or points to a `hopps_options`; `out`
// points to writable storage for one `hopps_client *`; `err` follows the conventions at the top of this header.
int32_t hopps_connect(const char *addr,
                      const hopps_options *options,
                      hopps_client **out,
                      hopps_error **err);

// Closes the connection and frees the handle. NULL is ignored.
//
// # Safety
// `client` is NULL or a handle from `hopps_connect` not yet freed, with no call on it in flight
// on any thread; it must not be used afterwards. Must not be called from a thread that runs a
// tokio runtime.
void hopps_client_free(hopps_client *client);

// Looks up `n_keys` keys of `table` in `model`.
//
// Writes, on success:
// - `values`: `n_keys * dim` floats, row after row in key order (`values_len` is the buffer's
//   capacity in floats). Rows of keys not found follow the table's missing-key policy;
// - `found`: a bitmap, LSB first (key i is bit i % 8 of byte i / 8), `(n_keys + 7) / 8` bytes
//   (`found_len` is the buffer's size in bytes);
// - `*dim_out`: floats per row; `*version_out`: the version the rows were read at.
//
// `version` is NULL for the version the node serves, or points to a version to pin.
// When `values` is too small the call fails with `HOPPS_OUT_OF_RANGE` and still sets
// `*dim_out`: grow the buffer to `n_keys * dim` and call again (or learn the dim first with
// `hopps_table_dim`). `dim_out` and `version_out` may be NULL.
//
// # Safety
// `client` is a live handle; `model` and `table` are NUL-terminated strings; `keys` points to
// `n_keys` keys (NULL if 0); `values` to `values_len` writable floats and `found` to
// `found_len` writable bytes (NULL if 0), neither overlapping the other or `keys`; `version`,
// `dim_out`, `version_out` are NULL or valid; `err` follows the conventions at the top of this header.
int32_t hopps_lookup(const hopps_client *client,
                     const char *model,
                     const char *table,
                     const uint64_t *keys,
                     size_t n_keys,
                     const uint64_t *version,
                     float *values,
                     size_t values_len,
                     uint8_t *found,
                     size_t found_len,
                     uint32_t *dim_out,
                     uint64_t *version_out,
                     uint32_t timeout_ms,
                     hopps_error **err);

// Looks up keys in several tables of `model` in one call; all tables are read at one version.
//
// Table `i` is named `tables[i]` and takes `key_counts[i]` keys from `keys`, which holds the
// keys of all tables one table after the other. On success:
// - `values` holds the rows of table 0, then of table 1, ... (table `i` takes
//   `key_counts[i] * dims_out[i]` floats);
// - `found` is one bitmap (LSB first) over all keys in the same order;
// - `dims_out[i]` is table `i`'s dim (`dims_out` has `n_tables` entries);
// - `*version_out` is the version every table was read at.
//
// When `values` is too small the call fails with `HOPPS_OUT_OF_RANGE` and still fills
// `dims_out`: grow the buffer and call again.
//
// # Safety
// `client` is a live handle; `model` and each `tables[i]` are NUL-terminated strings;
// `tables` and `key_counts` point to `n_tables` entries; `keys` to the sum of `key_counts`
// keys; `values`, `found`, `dims_out` to `values_len` floats, `found_len` bytes and
// `n_tables` u32 (all writable, none overlapping another buffer); `version` and `version_out`
// NULL or valid; `err` follows the conventions at the top of this header.
int32_t hopps_multi_lookup(const hopps_client *client,
                           const char *model,
                           const char *const *tables,
                           const size_t *key_counts,
                           size_t n_tables,
                           const uint64_t *keys,
                           const uint64_t *version,
                           float *values,
                           size_t values_len,
                           uint8_t *found,
                           size_t found_len,
                           uint32_t *dims_out,
                           uint64_t *version_out,
                           uint32_t timeout_ms,
                           hopps_error **err);

// Sets `*dim_out` to the dim of `table` in `model` as the node reports it (one admin call),
// so a caller can size `hopps_lookup`'s buffer before the first lookup.
//
// # Safety
// `client` is a live handle; `model` and `table` are NUL-terminated strings; `dim_out` points
// to a writable u32; `err` follows the conventions at the top of this header.
int32_t hopps_table_dim(const hopps_client *client,
                        const char *model,
                        const char *table,
                        uint32_t *dim_out,
                        uint32_t timeout_ms,
                        hopps_error **err);

// Inserts or overwrites `n_keys` rows of `table` in `model`; `values` holds `n_values` floats
// (`n_keys * dim`, row after row). Durable on the node once acknowledged. `ack_out` may be
// NULL.
//
// # Safety
// `client` is a live handle; `model` and `table` are NUL-terminated strings; `keys` points to
// `n_keys` keys and `values` to `n_values` floats (NULL if 0); `ack_out` is NULL or writable;
// `err` follows the conventions at the top of this header.
int32_t hopps_upsert(const hopps_client *client,
                     const char *model,
                     const char *table,
                     const uint64_t *keys,
                     size_t n_keys,
                     const float *values,
                     size_t n_values,
                     hopps_write_ack *ack_out,
                     uint32_t timeout_ms,
                     hopps_error **err);

// Removes `n_keys` rows of `table` in `model`. `ack_out` may be NULL.
//
// # Safety
// As `hopps_upsert`, without values.
int32_t hopps_delete(const hopps_client *client,
                     const char *model,
                     const char *table,
                     const uint64_t *keys,
                     size_t n_keys,
                     hopps_write_ack *ack_out,
                     uint32_t timeout_ms,
                     hopps_error **err);

// Applies `n_gradients` gradient floats (`n_keys * dim`, row after row) to `table` in `model`
// with the table's server-side optimizer. `ack_out` may be NULL.
//
// # Safety
// As `hopps_upsert`, with gradients in place of values.
int32_t hopps_push(const hopps_client *client,
                   const char *model,
                   const char *table,
                   const uint64_t *keys,
                   size_t n_keys,
                   const float *gradients,
                   size_t n_gradients,
                   hopps_write_ack *ack_out,
                   uint32_t timeout_ms,
                   hopps_error **err);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* HOPPS_H */
