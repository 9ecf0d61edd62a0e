//! hopps-format (being written).
#![forbid(unsafe_code)]
