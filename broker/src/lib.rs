//! The MQTT side of Sluice: the device edge, the rumqttd router behind it,
//! and the write-ahead spool that feeds the pipeline.
//!
//! - [`edge`]: Sluice's own listeners (TCP, TLS, WebSocket). They
//!   authenticate every client, enforce its ACL and limits, append each
//!   accepted publish to the spool and acknowledge it once durable.
//! - [`spool`]: the durable queue between the edge and the pipeline.
//! - rumqttd's router delivers messages to MQTT subscribers (retained
//!   messages, sessions, QoS towards subscribers); [`publisher`] puts
//!   Sluice's own messages (rule outputs, presence) into it.
//! - [`acl`], [`limits`], [`transport`]: policies, rate and topic limits,
//!   TLS and WebSocket.
//!
//! Connections run on a dedicated tokio runtime so that stopping the broker
//! closes all of them at once, before the pipeline drains the spool.

pub mod acl;
pub mod config;
pub mod edge;
pub mod limits;
pub mod publisher;
pub mod spool;
pub mod transport;

pub use config::{ApplicationConfig, BrokerConfig};
pub use edge::auth::{BoxFuture, DeviceCredential, DeviceRegistry, Principal};
pub use edge::connection::{ORIGIN_ANONYMOUS, ORIGIN_APPLICATION, ORIGIN_DEVICE};
pub use publisher::Publisher;
pub use spool::{SpoolCheckpoint, SpoolConfig, SpoolReader, SpoolRecord};

use edge::{EdgeShared, LinkFactory, Listener};
use rumqttd::local::LinkBuilder;
use rumqttd::{Router, RouterConfig};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tracing::info;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen for MQTT on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("broker configuration: {0}")]
    Config(String),
    #[error("the broker's router refused a local link: {0}")]
    Link(String),
    #[error("spool: {0}")]
    Spool(#[from] spool::SpoolError),
    #[error("cannot start the broker runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// What the pipeline reads: the spool's records, and where it reports what
/// has been stored.
pub struct SpoolOutput {
    pub reader: SpoolReader,
    pub checkpoint: SpoolCheckpoint,
}

pub struct Broker {
    /// Runs the listeners and every connection; dropping it closes them all.
    connections: Option<tokio::runtime::Runtime>,
    shared: Option<Arc<EdgeShared>>,
    listeners: Vec<Listener>,
    publisher: Publisher,
}

impl Broker {
    /// Opens the spool, starts the router and binds the listeners (so a
    /// taken port fails here), but accepts no connection until
    /// [`Broker::accept`]: the caller first lets the pipeline replay what
    /// the spool held from before.
    pub fn start(
        config: &BrokerConfig,
        registry: Arc<dyn DeviceRegistry>,
        spool_dir: &Path,
    ) -> Result<(Self, SpoolOutput), BrokerError> {
        let acl = acl::Acl::new(&config.acl).map_err(|e| BrokerError::Config(e.to_string()))?;
        for (name, app) in &config.applications {
            if !acl.has_policy(&app.policy) {
                return Err(BrokerError::Config(format!(
                    "application `{name}` uses policy `{}`, which acl.policies does not define",
                    app.policy
                )));
            }
        }
        let spool_dir = config.spool.dir.as_deref().unwrap_or(spool_dir);
        let (appender, reader, checkpoint) = spool::open(&config.spool, spool_dir)?;

        let router_tx = Router::new(0, router_config(config)).spawn();
        let links: LinkFactory = Arc::new(move |client_id: &str, clean: bool| {
            let (tx, rx, ack) = LinkBuilder::new(client_id, router_tx.clone())
                .clean_session(clean)
                .dynamic_filters(true)
                .build()
                .map_err(|e| e.to_string())?;
            let session_present = match Option::<rumqttd::protocol::Packet>::from(ack) {
                Some(rumqttd::protocol::Packet::ConnAck(a, _)) => a.session_present,
                _ => false,
            };
            Ok((tx, rx, session_present))
        });
        // Sluice's own links share the client-id namespace with clients;
        // the edge prefixes every client's id (`d:`, `a:`, `x:`), so no
        // client can take these over.
        let (ptx, prx, _) = links("sluice-publisher", true).map_err(BrokerError::Link)?;
        let publisher = Publisher::new((ptx, prx))?;
        let ingress = (0..config.connection_threads.max(1))
            .map(|i| {
                let (tx, rx, _) =
                    links(&format!("sluice-ingress-{i}"), true).map_err(BrokerError::Link)?;
                Publisher::new((tx, rx))
            })
            .collect::<Result<Vec<_>, _>>()?;

        let connections = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.connection_threads.max(1))
            .thread_name("mqtt-conn")
            .enable_all()
            .build()?;
        let listeners = {
            let _runtime = connections.enter();
            edge::bind_listeners(config)?
        };
        let auth = edge::auth::Authenticator::new(config, registry);
        let shared = Arc::new(EdgeShared {
            config: config.clone(),
            auth,
            acl,
            links,
            spool: appender,
            publisher: publisher.clone(),
            ingress,
            sessions: Default::default(),
            connections: AtomicUsize::new(0),
            shutdown: tokio::sync::watch::channel(false).0,
        });
        Ok((
            Self {
                connections: Some(connections),
                shared: Some(shared),
                listeners,
                publisher,
            },
            SpoolOutput { reader, checkpoint },
        ))
    }

    /// Starts accepting connections on every listener.
    pub fn accept(&mut self) {
        let (Some(rt), Some(shared)) = (&self.connections, &self.shared) else {
            return;
        };
        for listener in self.listeners.drain(..) {
            rt.spawn(edge::accept_loop(shared.clone(), listener));
        }
        rt.spawn(edge::revocation::run(shared.clone()));
    }

    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// Stops the listeners and closes every connection, after sending the
    /// acks of what is already durable. Dropping the edge then closes the
    /// spool, and the pipeline drains it.
    pub fn shutdown(mut self) {
        if let Some(shared) = self.shared.take() {
            let _ = shared.shutdown.send(true);
            let deadline = Instant::now() + Duration::from_secs(5);
            while shared.connections.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.listeners.clear();
        if let Some(rt) = self.connections.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
            info!("MQTT listeners and client connections closed");
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // Dropping a runtime from async code panics; an early-error path
        // may drop the broker there, so never block here.
        if let Some(rt) = self.connections.take() {
            rt.shutdown_background();
        }
    }
}

fn router_config(c: &BrokerConfig) -> RouterConfig {
    RouterConfig {
        // Room for Sluice's own links (publisher, ingress).
        max_connections: c.max_connections + c.connection_threads + 16,
        max_outgoing_packet_count: 200,
        max_segment_size: c.log_segment_bytes,
        max_segment_count: c.log_segment_count,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}
