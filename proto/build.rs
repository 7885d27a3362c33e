//! Compiles `proto/rackscale/v1/*.proto` without a system `protoc`: `protox`
//! parses them into a descriptor set, `tonic-prost-build` generates messages,
//! clients and servers from it, and the encoded set is written next to the
//! code for gRPC reflection.

use std::path::PathBuf;

use prost::Message;

const PROTO_ROOT: &str = "proto";
const FILES: &[&str] = &[
    "rackscale/v1/common.proto",
    "rackscale/v1/registry.proto",
    "rackscale/v1/agent.proto",
    "rackscale/v1/engine.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files: Vec<PathBuf> = FILES
        .iter()
        .map(|f| PathBuf::from(PROTO_ROOT).join(f))
        .collect();
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let fds = protox::compile(&files, [PROTO_ROOT])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("rackscale_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
