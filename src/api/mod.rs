//! The gRPC API: `sluice.v1.Telemetry` and `sluice.v1.Admin`, plus the standard health service and
//! server reflection (v1 and v1alpha, since common clients still speak the
//! latter), so `grpcurl`-style tools work without the .proto files.

mod admin;
mod auth;
mod page_token;
mod rules;
mod telemetry;

pub use auth::Authenticator;
pub use rules::deployed_rule;

use sluice_proto::v1::admin_server::AdminServer;
use sluice_proto::v1::telemetry_server::TelemetryServer;
use sluice_rules::RuleCatalog;
use sqlx::PgPool;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

pub async fn serve(
    listener: TcpListener,
    pool: PgPool,
    catalog: Arc<RuleCatalog>,
    auth: Authenticator,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<TelemetryServer<telemetry::TelemetryService>>()
        .await;

    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let pages = page_token::PageSigner::new(
        sluice_ingest::tokens::server_key(&pool, page_token::KEY_PURPOSE).await?,
    );
    info!(addr = %listener.local_addr()?, "gRPC API listening");
    tonic::transport::Server::builder()
        .layer(auth::AuthLayer(Arc::new(auth)))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(TelemetryServer::new(telemetry::TelemetryService::new(
            pool.clone(),
            pages.clone(),
        )))
        .add_service(AdminServer::new(admin::AdminService::new(
            pool, catalog, pages,
        )))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

/// Reflection over every service this server offers; built once per protocol version.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sluice_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}
