//! Generates the gRPC code from `proto/` without a system `protoc`: `protox`
//! parses the files in pure Rust and `tonic-prost-build` writes the code. The
//! encoded descriptor set is written beside it for server reflection.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/batchgen/v1/generation.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("batchgen_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
