//! Sluice's gRPC API: the Protocol Buffers definitions under `sluice/v1/` and
//! the Rust code tonic generates from them, plus the one thing every client
//! needs besides (the bearer-token interceptor), so clients (tests, the
//! simulator, the CLI, other programs) can depend on this crate alone.
//! It also holds the server's page-token codec ([`page_token`]): the tokens
//! are part of the API's contract, and a library crate is what the fuzz
//! targets under `fuzz/` can link.

use tonic::metadata::errors::InvalidMetadataValue;
use tonic::metadata::{Ascii, MetadataValue};

pub mod page_token;

pub mod v1 {
    tonic::include_proto!("sluice.v1");
}

/// The encoded `FileDescriptorSet` of every Sluice proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sluice_descriptor");

/// A client interceptor adding `authorization: Bearer <token>` to every
/// call, or nothing without a token (a server with anonymous access).
#[derive(Debug, Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// Fails if the token holds characters an HTTP header cannot.
    pub fn new(token: Option<&str>) -> Result<Self, InvalidMetadataValue> {
        token
            .map(|t| format!("Bearer {t}").parse())
            .transpose()
            .map(Self)
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}
