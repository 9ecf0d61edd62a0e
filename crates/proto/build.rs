fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/hopps/v1/hopps.proto");
    tonic_prost_build::configure()
        .bytes(".hopps.v1")
        .compile_protos(&["proto/hopps/v1/hopps.proto"], &["proto"])?;
    Ok(())
}
