//! The checked-in `include/hopps.h` must be what cbindgen generates from `src/ffi.rs` now.
//!
//! The header is checked in so that C and Go builds need no generator; this test is what keeps
//! it honest. After changing the ABI, regenerate it with
//! `HOPPS_BLESS=1 cargo test -p hopps-capi --test header` and review the diff.

use std::path::Path;

fn generate() -> String {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .unwrap_or_else(|err| panic!("cannot read crates/capi/cbindgen.toml: {err}"));
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/ffi.rs"))
        .generate()
        .unwrap_or_else(|err| panic!("cbindgen cannot generate hopps.h from src/ffi.rs: {err}"));
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("cbindgen writes UTF-8")
}

#[test]
fn header_matches_the_abi() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/hopps.h");
    let generated = generate();
    if std::env::var_os("HOPPS_BLESS").is_some() {
        std::fs::write(&path, &generated)
            .unwrap_or_else(|err| panic!("cannot write {}: {err}", path.display()));
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "crates/capi/include/hopps.h is out of date with src/ffi.rs; regenerate it with \
         `HOPPS_BLESS=1 cargo test -p hopps-capi --test header` and review the diff"
    );
}

#[test]
fn header_declares_every_exported_function() {
    let header = generate();
    let source = include_str!("../src/ffi.rs");
    let exported: Vec<&str> = source
        .split("extern \"C\" fn ")
        .skip(1)
        .filter_map(|rest| rest.split('(').next())
        .collect();
    assert!(exported.len() >= 12, "found only {exported:?}");
    for name in exported {
        assert!(
            header.contains(&format!("{name}(")),
            "hopps.h does not declare {name}"
        );
    }
    for opaque in [
        "typedef struct hopps_client hopps_client;",
        "typedef struct hopps_error hopps_error;",
    ] {
        assert!(header.contains(opaque), "hopps.h lacks `{opaque}`");
    }
}
