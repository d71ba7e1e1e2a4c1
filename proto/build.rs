//! Generates the tonic/prost code for `lifeboat/v1/coordinator.proto` with a vendored `protoc`,
//! so building needs no system protobuf compiler; also writes the descriptor set that server
//! reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Transport (channels, TLS) is the binaries' business, not the contract's.
        .build_transport(false)
        .file_descriptor_set_path(out.join("lifeboat_v1_descriptor.bin"))
        .compile_with_config(config, &["lifeboat/v1/coordinator.proto"], &["."])?;
    println!("cargo:rerun-if-changed=lifeboat/v1/coordinator.proto");
    Ok(())
}
