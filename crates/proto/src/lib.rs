//! Wire types of hopps' gRPC API (`hopps.v1`), generated from `proto/hopps/v1/hopps.proto`,
//! and the packing of keys, rows and found bitmaps inside its `bytes` fields.
//!
//! Architecture invariant: this is the only crate that knows wire types. The server and
//! the client convert to and from their own types at their edges.
#![forbid(unsafe_code)]

pub mod packed;

/// Generated types and service stubs of package `hopps.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("hopps.v1");
}

pub use packed::KEY_BYTES;

/// Fully qualified name of the data-plane service, as gRPC health checking names it.
pub const HOPPS_SERVICE: &str = "hopps.v1.Hopps";
/// Fully qualified name of the control-plane service.
pub const ADMIN_SERVICE: &str = "hopps.v1.Admin";
