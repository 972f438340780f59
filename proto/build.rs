//! Generates the gRPC code from `sluice/v1/*.proto` with a vendored `protoc`,
//! so building Sluice needs no system protobuf compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("sluice_descriptor.bin"))
        .compile_protos(
            &[
                PathBuf::from("sluice/v1/telemetry.proto"),
                PathBuf::from("sluice/v1/admin.proto"),
            ],
            &[PathBuf::from("."), protoc_bin_vendored::include_path()?],
        )?;
    println!("cargo:rerun-if-changed=sluice");
    Ok(())
}
