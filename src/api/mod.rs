//! The gRPC API: `sluice.v1.Telemetry` and `sluice.v1.Admin`, plus the standard health service and
//! server reflection (v1 and v1alpha, since common clients still speak the
//! latter), so `grpcurl`-style tools work without the .proto files.

mod admin;
mod auth;
mod cancel;
mod deferred;
mod page_token;
mod rules;
mod telemetry;

pub use auth::Authenticator;
pub use rules::deployed_rule;

use crate::config::ApiConfig;
use anyhow::Context;
use sluice_broker::transport::TlsConfig;
use sluice_ingest::WriterConfig;
use sluice_ingest::live::LiveFeed;
use sluice_proto::v1::admin_server::AdminServer;
use sluice_proto::v1::telemetry_server::TelemetryServer;
use sluice_rules::RuleCatalog;
use sqlx::PgPool;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tracing::{info, warn};

/// What the API serves once the database is reachable.
pub struct ApiContext {
    pub pool: PgPool,
    pub catalog: Arc<RuleCatalog>,
    /// The writer's feed of committed batches, for `Subscribe`.
    pub live: LiveFeed,
    /// The writer's settings (which rollups exist).
    pub writer: WriterConfig,
}

/// How long to wait before reading the page-token key again after a failure.
const KEY_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves health and reflection at once, and Telemetry and Admin once
/// `ready` delivers what they need: until then the health service reports
/// the Telemetry service NOT_SERVING and their calls are `UNAVAILABLE`
/// (the database is not reachable yet, see `serve.rs`). If `ready` is
/// dropped instead, they stay so until shutdown.
pub async fn serve(
    listener: TcpListener,
    auth: Authenticator,
    config: ApiConfig,
    ready: tokio::sync::oneshot::Receiver<ApiContext>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_not_serving::<TelemetryServer<telemetry::TelemetryService>>()
        .await;

    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    // Streams watch this to end when the server stops; tonic's graceful
    // shutdown waits for every open call, and a subscription never ends.
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let telemetry = deferred::Deferred::new();
    let admin = deferred::Deferred::new();
    let limits = telemetry::Limits {
        max_scan_rows: config.max_scan_rows,
        max_subscribers: config.max_subscribers,
    };
    let becoming_ready = tokio::spawn({
        let (telemetry, admin) = (telemetry.clone(), admin.clone());
        async move {
            let Ok(cx) = ready.await else {
                return;
            };
            let pages = page_signer(&cx.pool).await;
            telemetry.set(TelemetryServer::new(telemetry::TelemetryService::new(
                cx.pool.clone(),
                pages.clone(),
                limits,
                cx.live,
                cx.writer,
                stopping,
            )));
            admin.set(AdminServer::new(admin::AdminService::new(
                cx.pool, cx.catalog, pages,
            )));
            health_reporter
                .set_serving::<TelemetryServer<telemetry::TelemetryService>>()
                .await;
            info!("gRPC Telemetry and Admin serving");
        }
    });
    let shutdown = async move {
        shutdown.await;
        becoming_ready.abort();
        let _ = stopping_tx.send(true);
    };
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        server = server
            .tls_config(tls_config(tls)?)
            .context("gRPC TLS settings")?;
    }
    info!(addr = %listener.local_addr()?, tls = config.tls.is_some(), "gRPC API listening");
    // TCP_NODELAY: tonic sets it only on listeners it binds itself. Without
    // it, Nagle's algorithm holds a response's last small frame until the
    // client acknowledges the previous one, which a delayed ACK stretches
    // to 40 ms (measured: every AggregatePoints call took 56 ms instead of
    // about 15).
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(std::time::Duration::from_secs(60)));
    server
        .layer(auth::AuthLayer(Arc::new(auth)))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(telemetry)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// The page-token signer with the key every server on this database
/// shares; the database was just reached, but may go again: retried.
async fn page_signer(pool: &PgPool) -> page_token::PageSigner {
    loop {
        match sluice_ingest::tokens::server_key(pool, page_token::KEY_PURPOSE).await {
            Ok(key) => return page_token::PageSigner::new(key),
            Err(e) => {
                warn!(error = %e, retry_in_ms = KEY_RETRY.as_millis() as u64,
                    "cannot read the page-token key; the API waits for it");
                tokio::time::sleep(KEY_RETRY).await;
            }
        }
    }
}

/// The listener's certificate and key, and the CA whose client
/// certificates it accepts (optional: clients authenticate with tokens).
fn tls_config(tls: &TlsConfig) -> anyhow::Result<ServerTlsConfig> {
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("api.tls.{what} {}", path.display()))
    };
    let identity = Identity::from_pem(
        read("cert_file", &tls.cert_file)?,
        read("key_file", &tls.key_file)?,
    );
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca_file {
        config = config
            .client_ca_root(Certificate::from_pem(read("client_ca_file", ca)?))
            .client_auth_optional(true);
    }
    Ok(config)
}

/// Reflection over every service this server offers; built once per protocol version.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sluice_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}
