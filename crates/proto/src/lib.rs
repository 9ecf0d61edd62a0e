//! Wire types of hopps' gRPC API (`hopps.v1`), generated from `proto/hopps/v1/hopps.proto`.
//!
//! Architecture invariant: this is the only crate that knows wire types. The server and
//! the client convert to and from their own types at their edges.
#![forbid(unsafe_code)]

/// Generated types and service stubs of package `hopps.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("hopps.v1");
}

/// Bytes in one packed key.
pub const KEY_BYTES: usize = 8;
