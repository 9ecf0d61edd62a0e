//! The native half of the `hopps` Python package, imported as `hopps._hopps`.
//!
//! One implementation of the protocol: every call goes through `hopps-client` (and publishing
//! through `hopps-format`), run on a tokio runtime inside the module with the GIL released while
//! the call waits. The pure-Python half (`python/hopps/`) re-exports these items, defines the
//! exception classes and converts pandas/pyarrow input for `publish`.
//!
//! API boundary: Python sees `Client`, `Rows`, `publish` and the exceptions of
//! `hopps._errors`; nothing of tonic or the wire types leaks through. Errors become exceptions in
//! one place, `error.rs`.
#![forbid(unsafe_code)]

mod arrays;
mod client;
mod error;
mod publish;
mod pyobj;
mod runtime;

use pyo3::prelude::*;

/// The native module. Its classes and functions are documented on the items themselves and in
/// `hopps/__init__.pyi`.
#[pymodule]
fn _hopps(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<client::Client>()?;
    m.add_class::<client::Rows>()?;
    m.add_function(wrap_pyfunction!(publish::publish, m)?)?;
    m.add_function(wrap_pyfunction!(client::rust_lookup_latencies, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
