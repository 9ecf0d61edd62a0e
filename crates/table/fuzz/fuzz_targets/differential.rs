//! Drives a `Table` and a `HashMap` with the same operations decoded from the fuzz input; the
//! driver panics on the first difference. `cargo test -p hopps-table --test differential` runs
//! the same driver on stable over a fixed and a seeded random corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/common/differential.rs"]
mod differential;

fuzz_target!(|data: &[u8]| differential::run(data));
