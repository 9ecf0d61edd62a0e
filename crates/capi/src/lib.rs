//! hopps-capi: the C ABI of hopps (`libhopps`, header `include/hopps.h`), a thin layer over the
//! Rust client so that C, C++ and Go (through cgo, see `go/hopps`) get the same client code.
//!
//! The crate has two layers:
//!
//! - this safe core: [`Handle`] owns a tokio runtime and a [`hopps_client::Client`]; its
//!   methods take slices and write into caller-provided buffers. Everything that can fail
//!   returns a [`CallError`] carrying a gRPC status code and a message that says what to do;
//! - the `ffi` module: the `extern "C"` functions. It is the only place with `unsafe`
//!   (turning raw pointers into slices and strings, each block with a `// SAFETY:` note), and
//!   every function there catches panics, so no unwinding ever crosses into C.
//!
//! Architecture invariant: the C ABI adds no behaviour of its own beyond buffer handling and
//! deadlines; routing, retries and wire conversion stay in `hopps-client`.
#![deny(unsafe_code)]

pub mod ffi;

use std::future::Future;
use std::time::Duration;

use hopps_client::{Client, ClientError, ClientOptions, WriteAck};

/// gRPC status codes as the C ABI returns them (`HOPPS_*` in `hopps.h`).
pub mod code {
    /// Success.
    pub const OK: i32 = 0;
    /// The call was cancelled.
    pub const CANCELLED: i32 = 1;
    /// An error without a gRPC code.
    pub const UNKNOWN: i32 = 2;
    /// A bad argument: a null pointer, a string that is not UTF-8, a malformed address.
    pub const INVALID_ARGUMENT: i32 = 3;
    /// The caller's deadline passed before the answer came.
    pub const DEADLINE_EXCEEDED: i32 = 4;
    /// Unknown model or table (from the server).
    pub const NOT_FOUND: i32 = 5;
    /// The handle cannot serve the call in this context (e.g. from inside a tokio runtime).
    pub const FAILED_PRECONDITION: i32 = 9;
    /// A caller-provided buffer is too small; the required size is reported.
    pub const OUT_OF_RANGE: i32 = 11;
    /// A bug in hopps (e.g. a caught panic).
    pub const INTERNAL: i32 = 13;
    /// The node cannot be reached.
    pub const UNAVAILABLE: i32 = 14;
}

/// A failed call: a gRPC status code and a message for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    /// gRPC status code (never 0).
    pub code: i32,
    /// What went wrong and what to do; names the model, table or argument concerned.
    pub message: String,
}

impl CallError {
    /// An error with `code` and `message`.
    pub fn new(code: i32, message: impl Into<String>) -> CallError {
        CallError {
            code,
            message: message.into(),
        }
    }

    fn from_client(err: &ClientError) -> CallError {
        let code = err.code().map_or(code::UNKNOWN, i32::from);
        CallError::new(code, err.to_string())
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CallError {}

/// The upper-case gRPC name of a status code (`"NOT_FOUND"`), or `"UNKNOWN"`.
pub fn code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// How a [`Handle`] connects. A zero field means the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Time to establish the connection (default 5 s).
    pub connect_timeout: Option<Duration>,
    /// Deadline of a call that gives none of its own (default 60 s).
    pub request_timeout: Option<Duration>,
    /// Largest message sent or accepted (default 256 MiB).
    pub max_message_bytes: Option<usize>,
    /// Threads of the handle's runtime (default: one per core).
    pub worker_threads: Option<usize>,
}

/// Where a lookup put its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupAnswer {
    /// Floats per row.
    pub dim: u32,
    /// The version the rows were read at.
    pub version: u64,
}

/// Bytes of a found bitmap for `keys` keys (LSB first, as on the wire).
pub fn bitmap_len(keys: usize) -> usize {
    keys.div_ceil(8)
}

/// A connection to one hopps node plus the runtime that drives it.
///
/// Thread-safe: every method takes `&self` and may be called from many threads at once; each
/// call blocks its thread until the answer, the call's deadline or an error.
#[derive(Debug)]
pub struct Handle {
    // Field order matters on drop: the client's connection goes before the runtime that drives it.
    client: Client,
    runtime: tokio::runtime::Runtime,
}

impl Handle {
    /// Connects to the node at `addr` (`host:port` or `http://host:port`).
    ///
    /// Cluster mode (routing by placement over many nodes) arrives with the Rust client's; until
    /// then `addr` names one node.
    pub fn connect(addr: &str, options: &ConnectOptions) -> Result<Handle, CallError> {
        // Checked first: a runtime built here could not even be dropped inside another one.
        ensure_outside_runtime()?;
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.enable_all().thread_name("hopps-client");
        if let Some(threads) = options.worker_threads.filter(|&t| t > 0) {
            builder.worker_threads(threads);
        }
        let runtime = builder.build().map_err(|err| {
            CallError::new(
                code::INTERNAL,
                format!("cannot start the hopps client's runtime threads: {err}"),
            )
        })?;
        let defaults = ClientOptions::default();
        let client_options = ClientOptions {
            connect_timeout: options.connect_timeout.unwrap_or(defaults.connect_timeout),
            request_timeout: options.request_timeout.or(defaults.request_timeout),
            max_message_bytes: options
                .max_message_bytes
                .unwrap_or(defaults.max_message_bytes),
        };
        let client = runtime
            .block_on(Client::connect_with(addr, &client_options))
            .map_err(|err| CallError::from_client(&err))?;
        Ok(Handle { client, runtime })
    }

    /// The address the handle was connected to.
    pub fn addr(&self) -> &str {
        self.client.addr()
    }

    /// Runs `call` on the runtime, bounded by `timeout` when given.
    fn run<T, F>(
        &self,
        timeout: Option<Duration>,
        what: impl FnOnce() -> String,
        call: F,
    ) -> Result<T, CallError>
    where
        F: Future<Output = Result<T, ClientError>>,
    {
        ensure_outside_runtime()?;
        let result = self.runtime.block_on(async {
            match timeout {
                // Dropping the call's future on expiry resets its HTTP/2 stream, so the node
                // stops working on an answer nobody waits for.
                Some(limit) => tokio::time::timeout(limit, call).await.ok(),
                None => Some(call.await),
            }
        });
        match result {
            Some(Ok(value)) => Ok(value),
            Some(Err(err)) => Err(CallError::from_client(&err)),
            None => Err(CallError::new(
                code::DEADLINE_EXCEEDED,
                format!(
                    "DEADLINE_EXCEEDED: {} did not finish within {} ms; give the call a longer \
                     deadline or check the node's load",
                    what(),
                    timeout.unwrap_or_default().as_millis()
                ),
            )),
        }
    }

    /// Rows of `table` for `keys` written into `values` (`keys.len() * dim` floats, row after
    /// row) and `found` (bitmap, LSB first, [`bitmap_len`] bytes).
    ///
    /// `dim_out` is set as soon as the answer arrives, also when `values` turns out too small
    /// (`OUT_OF_RANGE`), so the caller can grow the buffer and call again.
    #[allow(clippy::too_many_arguments)]
    pub fn lookup_into(
        &self,
        model: &str,
        table: &str,
        keys: &[u64],
        version: Option<u64>,
        values: &mut [f32],
        found: &mut [u8],
        dim_out: &mut u32,
        timeout: Option<Duration>,
    ) -> Result<LookupAnswer, CallError> {
        check_bitmap(found.len(), keys.len(), || {
            format!("lookup of model {model:?} table {table:?}")
        })?;
        let rows = self.run(
            timeout,
            || format!("lookup of model {model:?} table {table:?}"),
            self.client.lookup_at(model, table, keys, version),
        )?;
        *dim_out = rows.dim;
        copy_rows(&rows.values, values, || {
            format!(
                "lookup of model {model:?} table {table:?}: {} keys of dim {}",
                keys.len(),
                rows.dim
            )
        })?;
        write_bitmap(&rows.found, &mut found[..bitmap_len(keys.len())]);
        Ok(LookupAnswer {
            dim: rows.dim,
            version: rows.version,
        })
    }

    /// Rows of several tables of `model`, read at one version (returned).
    ///
    /// `values` receives the tables' rows one table after the other (table `i` takes
    /// `keys_i * dim_i` floats); `found` is one bitmap over all keys in the same order;
    /// `dims_out[i]` is set to table `i`'s dim as soon as the answer arrives, also when `values`
    /// turns out too small (`OUT_OF_RANGE`).
    #[allow(clippy::too_many_arguments)]
    pub fn multi_lookup_into(
        &self,
        model: &str,
        tables: &[(&str, &[u64])],
        version: Option<u64>,
        values: &mut [f32],
        found: &mut [u8],
        dims_out: &mut [u32],
        timeout: Option<Duration>,
    ) -> Result<u64, CallError> {
        let total_keys: usize = tables.iter().map(|(_, keys)| keys.len()).sum();
        check_bitmap(found.len(), total_keys, || {
            format!("multi-lookup of model {model:?}")
        })?;
        if dims_out.len() < tables.len() {
            return Err(CallError::new(
                code::INVALID_ARGUMENT,
                format!(
                    "multi-lookup of model {model:?}: dims buffer holds {} entries for {} tables; \
                     pass one entry per table",
                    dims_out.len(),
                    tables.len()
                ),
            ));
        }
        let answer = self.run(
            timeout,
            || format!("multi-lookup of model {model:?}"),
            self.client.multi_lookup(model, tables, version),
        )?;
        let mut needed = 0usize;
        for (dim_out, table) in dims_out.iter_mut().zip(&answer.tables) {
            *dim_out = table.rows.dim;
            needed += table.rows.values.len();
        }
        if values.len() < needed {
            return Err(CallError::new(
                code::OUT_OF_RANGE,
                format!(
                    "multi-lookup of model {model:?}: the values buffer holds {} floats and the \
                     answer needs {needed}; size it as the sum of keys times dim over the tables \
                     (dims are reported) and call again",
                    values.len()
                ),
            ));
        }
        // Bits past the last key read as zero, as in a single-table lookup.
        found[..bitmap_len(total_keys)].fill(0);
        let mut value_at = 0usize;
        let mut key_at = 0usize;
        for table in &answer.tables {
            let rows = &table.rows;
            values[value_at..value_at + rows.values.len()].copy_from_slice(&rows.values);
            value_at += rows.values.len();
            set_bits(&rows.found, found, key_at);
            key_at += rows.found.len();
        }
        Ok(answer.version)
    }

    /// The dim of `table` in `model`, as the node reports it.
    pub fn table_dim(
        &self,
        model: &str,
        table: &str,
        timeout: Option<Duration>,
    ) -> Result<u32, CallError> {
        let models = self.run(
            timeout,
            || format!("listing the models of {}", self.addr()),
            self.client.list_models(),
        )?;
        let Some(served) = models.iter().find(|m| m.name == model) else {
            let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
            return Err(CallError::new(
                code::NOT_FOUND,
                format!(
                    "NOT_FOUND: model {model:?} is not served by {} (it serves {names:?}); \
                     publish it to the node's repository or check the name",
                    self.addr()
                ),
            ));
        };
        served
            .tables
            .iter()
            .find(|t| t.name == table)
            .map(|t| t.dim)
            .ok_or_else(|| {
                let names: Vec<&str> = served.tables.iter().map(|t| t.name.as_str()).collect();
                CallError::new(
                    code::NOT_FOUND,
                    format!(
                        "NOT_FOUND: model {model:?} has no table {table:?} (its tables: \
                         {names:?}); check the name"
                    ),
                )
            })
    }

    /// Inserts or overwrites rows; `values` holds `keys.len() * dim` floats, row after row.
    pub fn upsert(
        &self,
        model: &str,
        table: &str,
        keys: &[u64],
        values: &[f32],
        timeout: Option<Duration>,
    ) -> Result<WriteAck, CallError> {
        check_row_floats(keys.len(), values.len(), || {
            format!("upsert into model {model:?} table {table:?}")
        })?;
        self.run(
            timeout,
            || format!("upsert into model {model:?} table {table:?}"),
            self.client.upsert(model, table, keys, values),
        )
    }

    /// Removes rows.
    pub fn delete(
        &self,
        model: &str,
        table: &str,
        keys: &[u64],
        timeout: Option<Duration>,
    ) -> Result<WriteAck, CallError> {
        self.run(
            timeout,
            || format!("delete from model {model:?} table {table:?}"),
            self.client.delete(model, table, keys),
        )
    }

    /// Applies gradients (`keys.len() * dim` floats) with the table's server-side optimizer.
    pub fn push(
        &self,
        model: &str,
        table: &str,
        keys: &[u64],
        gradients: &[f32],
        timeout: Option<Duration>,
    ) -> Result<WriteAck, CallError> {
        check_row_floats(keys.len(), gradients.len(), || {
            format!("push to model {model:?} table {table:?}")
        })?;
        self.run(
            timeout,
            || format!("push to model {model:?} table {table:?}"),
            self.client.push(model, table, keys, gradients),
        )
    }
}

/// `block_on` inside a tokio runtime would panic; say so as an error instead.
fn ensure_outside_runtime() -> Result<(), CallError> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(CallError::new(
            code::FAILED_PRECONDITION,
            "a libhopps call was made from a thread that runs a tokio runtime; libhopps blocks \
             the calling thread, so call it from a plain thread or use the hopps-client crate",
        ));
    }
    Ok(())
}

fn check_bitmap(have: usize, keys: usize, what: impl FnOnce() -> String) -> Result<(), CallError> {
    if have < bitmap_len(keys) {
        return Err(CallError::new(
            code::INVALID_ARGUMENT,
            format!(
                "{}: the found bitmap holds {have} bytes and {keys} keys need {}; size it as \
                 (keys + 7) / 8",
                what(),
                bitmap_len(keys)
            ),
        ));
    }
    Ok(())
}

/// Rows of values must be a whole number per key; the server checks the dim itself.
fn check_row_floats(
    keys: usize,
    floats: usize,
    what: impl FnOnce() -> String,
) -> Result<(), CallError> {
    if (keys == 0 && floats != 0) || (keys != 0 && !floats.is_multiple_of(keys)) {
        return Err(CallError::new(
            code::INVALID_ARGUMENT,
            format!(
                "{}: {floats} floats are not a whole row for each of {keys} keys; pass keys * \
                 dim floats, row after row",
                what()
            ),
        ));
    }
    Ok(())
}

fn copy_rows(
    rows: &[f32],
    out: &mut [f32],
    what: impl FnOnce() -> String,
) -> Result<(), CallError> {
    if out.len() < rows.len() {
        return Err(CallError::new(
            code::OUT_OF_RANGE,
            format!(
                "{}: the values buffer holds {} floats and the rows need {}; grow it to keys * \
                 dim floats (the dim is reported) and call again",
                what(),
                out.len(),
                rows.len()
            ),
        ));
    }
    out[..rows.len()].copy_from_slice(rows);
    Ok(())
}

/// Writes `found` as an LSB-first bitmap into `out` (exactly `bitmap_len(found.len())` bytes).
fn write_bitmap(found: &[bool], out: &mut [u8]) {
    for (byte, bits) in out.iter_mut().zip(found.chunks(8)) {
        *byte = bits
            .iter()
            .enumerate()
            .fold(0u8, |acc, (i, &hit)| acc | (u8::from(hit) << i));
    }
}

/// Sets or clears bits `first..first + found.len()` of the LSB-first bitmap `out`.
fn set_bits(found: &[bool], out: &mut [u8], first: usize) {
    for (i, &hit) in found.iter().enumerate() {
        let bit = first + i;
        let mask = 1u8 << (bit % 8);
        if hit {
            out[bit / 8] |= mask;
        } else {
            out[bit / 8] &= !mask;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hopps_client::Code;

    #[test]
    fn code_names_follow_grpc() {
        assert_eq!(code_name(code::OK), "OK");
        assert_eq!(code_name(code::NOT_FOUND), "NOT_FOUND");
        assert_eq!(code_name(code::UNAVAILABLE), "UNAVAILABLE");
        assert_eq!(code_name(16), "UNAUTHENTICATED");
        assert_eq!(code_name(17), "UNKNOWN");
        assert_eq!(code_name(-1), "UNKNOWN");
        // Our constants are the gRPC numbers, so a C caller can compare with either.
        assert_eq!(code::NOT_FOUND, i32::from(Code::NotFound));
        assert_eq!(code::DEADLINE_EXCEEDED, i32::from(Code::DeadlineExceeded));
        assert_eq!(code::OUT_OF_RANGE, i32::from(Code::OutOfRange));
        assert_eq!(
            code::FAILED_PRECONDITION,
            i32::from(Code::FailedPrecondition)
        );
    }

    #[test]
    fn bitmaps_are_lsb_first() {
        let found = [true, false, true, false, false, false, false, false, true];
        let mut out = [0xffu8; 2];
        write_bitmap(&found, &mut out);
        assert_eq!(out, [0b0000_0101, 0b0000_0001]);

        let mut all = [0u8; 2];
        set_bits(&[true, true], &mut all, 7);
        assert_eq!(all, [0b1000_0000, 0b0000_0001]);
        set_bits(&[false], &mut all, 7);
        assert_eq!(all, [0, 1]);
        assert_eq!(bitmap_len(0), 0);
        assert_eq!(bitmap_len(8), 1);
        assert_eq!(bitmap_len(9), 2);
    }

    #[test]
    fn short_buffers_are_errors_not_panics() {
        let err = copy_rows(&[1.0, 2.0], &mut [0.0], || "lookup".into()).expect_err("short");
        assert_eq!(err.code, code::OUT_OF_RANGE);
        assert!(err.message.contains("holds 1 floats"), "{err}");
        let err = check_bitmap(1, 9, || "lookup".into()).expect_err("short bitmap");
        assert_eq!(err.code, code::INVALID_ARGUMENT);
        assert!(check_bitmap(2, 9, || "lookup".into()).is_ok());
        assert!(check_row_floats(3, 7, || "upsert".into()).is_err());
        assert!(check_row_floats(0, 1, || "upsert".into()).is_err());
        assert!(check_row_floats(3, 6, || "upsert".into()).is_ok());
        assert!(check_row_floats(0, 0, || "upsert".into()).is_ok());
    }

    #[test]
    fn connecting_to_a_closed_port_is_unavailable() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr").port()
        };
        let options = ConnectOptions {
            connect_timeout: Some(Duration::from_secs(2)),
            worker_threads: Some(1),
            ..ConnectOptions::default()
        };
        let err = Handle::connect(&format!("127.0.0.1:{port}"), &options).expect_err("closed");
        assert_eq!(err.code, code::UNAVAILABLE, "{err}");
        assert!(err.message.contains(&port.to_string()), "{err}");
    }

    #[tokio::test]
    async fn calling_from_inside_a_runtime_is_an_error() {
        let err = Handle::connect("127.0.0.1:1", &ConnectOptions::default()).expect_err("inside");
        assert_eq!(err.code, code::FAILED_PRECONDITION, "{err}");
    }
}
