//! Sluice's gRPC API: the Protocol Buffers definitions under `sluice/v1/` and
//! the Rust code tonic generates from them. Nothing else lives here, so clients
//! (tests, the simulator, other programs) can depend on this crate alone.

pub mod v1 {
    tonic::include_proto!("sluice.v1");
}

/// The encoded `FileDescriptorSet` of every Sluice proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sluice_descriptor");
