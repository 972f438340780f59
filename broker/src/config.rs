//! The broker's knobs. Every queue and log is bounded; the defaults suit a
//! 2-core machine with a few GiB to spare.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// MQTT 3.1.1 over TCP.
    pub mqtt_listen: SocketAddr,
    /// Concurrent device connections.
    pub max_connections: usize,
    /// Largest PUBLISH payload accepted; larger ones close the connection.
    pub max_payload_bytes: usize,
    /// Time a new connection has to send CONNECT.
    pub connect_timeout_ms: u16,
    /// Unacknowledged QoS 1/2 messages towards one subscriber.
    pub max_inflight: usize,
    /// The router keeps each subscription's messages in an in-memory log of
    /// `log_segment_count` segments of `log_segment_bytes`. If the pipeline
    /// falls further behind than that, the router skips ahead; the consumer
    /// detects and counts it (`sluice_broker_messages_skipped_total`). The
    /// memory is held once used: this is also the broker's memory bound.
    pub log_segment_bytes: usize,
    pub log_segment_count: usize,
    /// Messages waiting between the broker and the rules pipeline.
    pub queue_messages: usize,
    /// Threads serving device connections.
    pub connection_threads: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            mqtt_listen: "0.0.0.0:1883".parse().expect("valid address"),
            max_connections: 10_000,
            max_payload_bytes: 256 * 1024,
            connect_timeout_ms: 5_000,
            max_inflight: 100,
            // 8 × 16 MiB = 128 MiB: about a second of the pipeline's top
            // rate at 1 KiB messages, several seconds at typical sizes.
            log_segment_bytes: 16 * 1024 * 1024,
            log_segment_count: 8,
            queue_messages: 16 * 1024,
            connection_threads: 1,
        }
    }
}
