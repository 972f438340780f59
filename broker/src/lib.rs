//! The embedded MQTT broker: rumqttd's router and MQTT 3.1.1 listener inside
//! the Sluice process, plus the in-process consumer that hands every
//! published message to the pipeline.
//!
//! - [`config`]: listener address and every limit, with defaults.
//! - [`consumer`]: the `#` subscriber that feeds the pipeline's channel.
//! - [`publisher`]: sends rule outputs back through the router.
//!
//! The listener and all device connections run on a dedicated tokio runtime,
//! so stopping it ([`Broker::stop_accepting`]) closes every device connection
//! at once, before the pipeline drains.

pub mod config;
pub mod consumer;
pub mod publisher;

pub use config::BrokerConfig;
pub use consumer::InboundMessage;
pub use publisher::Publisher;

use rumqttd::local::LinkBuilder;
use rumqttd::protocol::v4::V4;
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{error, info};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen for MQTT on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the broker's router refused a local link: {0}")]
    Link(String),
    #[error("cannot start the broker runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

pub struct Broker {
    /// Runs the listener and every device connection; dropping it closes them all.
    connections: Option<tokio::runtime::Runtime>,
    consumer: consumer::ConsumerHandle,
    publisher: Publisher,
}

impl Broker {
    /// Starts the router, the consumer and the MQTT listener. Returns the
    /// broker and the channel every accepted message arrives on.
    pub fn start(
        config: &BrokerConfig,
    ) -> Result<(Self, mpsc::Receiver<InboundMessage>), BrokerError> {
        // rumqttd's listener logs a bind failure and carries on; check first
        // so a taken port is an error the operator sees.
        let listen = config.mqtt_listen;
        TcpListener::bind(listen).map_err(|source| BrokerError::Bind {
            addr: listen,
            source,
        })?;

        let router_tx = Router::new(0, router_config(config)).spawn();
        let hops = Arc::new(publisher::HopLedger::default());
        let (tx, rx) = mpsc::channel(config.queue_messages.max(1));
        let link = |client_id: &str| {
            LinkBuilder::new(client_id, router_tx.clone())
                .clean_session(true)
                .build()
                .map(|(tx, rx, _connack)| (tx, rx))
                .map_err(|e| BrokerError::Link(e.to_string()))
        };
        // Local links share the client-id namespace with devices, and rumqttd
        // forbids `$` in ids; a random suffix keeps a device from taking over
        // (and so disconnecting) Sluice's own links.
        let nonce = local_link_nonce();
        let consumer =
            consumer::spawn(link(&format!("sluice-pipeline-{nonce}"))?, tx, hops.clone())?;

        let connections = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.connection_threads.max(1))
            .thread_name("mqtt-conn")
            .enable_all()
            .build()?;
        let publisher = Publisher::new(link(&format!("sluice-rules-{nonce}"))?, hops)?;

        let mut server = Server::new(server_settings(config), router_tx, V4);
        connections.spawn(async move {
            if let Err(e) = server.start(LinkType::Remote).await {
                error!(error = %e, "MQTT listener stopped");
            }
        });
        info!(%listen, "MQTT 3.1.1 listener started");
        Ok((
            Self {
                connections: Some(connections),
                consumer,
                publisher,
            },
            rx,
        ))
    }

    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// Stops the listener and closes every device connection.
    pub fn stop_accepting(&mut self) {
        if let Some(rt) = self.connections.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
            info!("MQTT listener and device connections closed");
        }
    }

    /// Stops accepting, then lets the consumer forward what the router still
    /// holds until it has been idle for a moment, and closes the channel.
    pub fn shutdown(mut self) {
        self.stop_accepting();
        self.consumer.drain_and_stop();
    }
}

fn local_link_nonce() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::UNIX_EPOCH
            .elapsed()
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{:016x}", h.finish())
}

fn router_config(c: &BrokerConfig) -> RouterConfig {
    RouterConfig {
        max_connections: c.max_connections + 16, // room for Sluice's own local links
        max_outgoing_packet_count: 200,
        max_segment_size: c.log_segment_bytes,
        max_segment_count: c.log_segment_count,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

fn server_settings(c: &BrokerConfig) -> ServerSettings {
    ServerSettings {
        name: "mqtt".into(),
        listen: c.mqtt_listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: c.connect_timeout_ms,
            max_payload_size: c.max_payload_bytes,
            max_inflight_count: c.max_inflight,
            auth: None::<HashMap<String, String>>,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}
