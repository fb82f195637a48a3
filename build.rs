//! Generates the gRPC code from `proto/` without a system `protoc`: `protox`
//! parses the files in pure Rust and `tonic-prost-build` writes the code. The
//! encoded descriptor set is written beside it for server reflection.
//!
//! The ONNX protobuf (`proto/onnx/onnx.proto`, vendored from the `onnx`
//! package 1.23) is compiled the same way, as plain prost messages: the engine
//! writes its own GPT-2 graph with them and reads the weights of exports.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/batchgen/v1/generation.proto";
    let onnx = "proto/onnx/onnx.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed={onnx}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("batchgen_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    // A tensor's raw_data as `Bytes`: decoded from a `Bytes` buffer it is a
    // slice of the file read, not a second copy of every weight.
    prost_build::Config::new()
        .bytes([".onnx.TensorProto.raw_data"])
        .compile_fds(protox::compile([onnx], ["proto"])?)?;
    Ok(())
}
