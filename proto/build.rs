//! Compiles the vendored protobuf schemas with protox (pure Rust, no `protoc` needed).
//!
//! - `onnx/onnx.proto`: the official ONNX schema (vendored from the `onnx` Python package, see
//!   `onnx/README.md`), messages only.
//! - `r1/v1/*.proto`: the public gRPC API, messages and tonic service stubs.
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    println!("cargo:rerun-if-changed=onnx");
    println!("cargo:rerun-if-changed=r1");

    // ONNX: messages only.
    let onnx = protox::compile(["onnx/onnx.proto"], [root])?;
    tonic_prost_build::configure().build_client(false).build_server(false).compile_fds(onnx)?;

    // r1.v1 service protos (every .proto under r1/v1), with client and server stubs.
    let mut api: Vec<String> = std::fs::read_dir(root.join("r1/v1"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .map(|p| p.strip_prefix(root).unwrap().to_string_lossy().into_owned())
        .collect();
    api.sort();
    if !api.is_empty() {
        let fds = protox::compile(&api, [root])?;
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
        std::fs::write(out.join("r1_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
        tonic_prost_build::configure().compile_fds(fds)?;
    }
    Ok(())
}
