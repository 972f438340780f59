//! The broker's knobs. Every queue, log and connection count is bounded; the
//! defaults suit a 2-core machine with a few GiB to spare.

use crate::acl::AclConfig;
use crate::spool::SpoolConfig;
use crate::transport::TlsConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// MQTT 3.1.1 over TCP.
    pub mqtt_listen: SocketAddr,
    /// MQTT over TLS (mutual TLS when `tls.client_ca_file` is set). Only
    /// started when `tls` is configured.
    pub mqtts_listen: SocketAddr,
    /// MQTT over WebSocket at `ws_path`; `None` turns it off.
    pub ws_listen: Option<SocketAddr>,
    pub ws_path: String,
    /// Server certificate, key and (for mutual TLS) the client CA.
    pub tls: Option<TlsConfig>,
    /// Let clients without credentials in, under `acl.anonymous_policy`.
    /// For development only: such messages carry no authenticated identity.
    pub allow_anonymous: bool,
    /// QoS 1/2 acknowledgements wait until the message is in the spool on
    /// disk (fsync). `false` acks on receipt: faster, and a crash loses what
    /// was acked but not yet written.
    pub durable_acks: bool,
    /// Concurrent client connections; more get CONNACK 3 (server unavailable).
    pub max_connections: usize,
    /// Largest PUBLISH payload accepted; a larger packet closes the connection.
    pub max_payload_bytes: usize,
    /// Longest topic name or filter, in bytes.
    pub max_topic_bytes: usize,
    /// Most levels (`/`-separated parts) in a topic name or filter.
    pub max_topic_levels: usize,
    /// Sustained publishes per second per connection (0: unlimited). Over
    /// it the connection is throttled (its socket is not read), never dropped.
    pub max_publish_rate: f64,
    /// Publishes a connection may send at once before the rate applies.
    pub publish_burst: u32,
    /// Time a new connection has to send CONNECT.
    pub connect_timeout_ms: u64,
    /// Once a client has sent the first byte of a packet, the rest must
    /// arrive within this time (while Sluice is reading), or the connection
    /// is closed (`packet_timeout`). Keep-alive alone does not bound a
    /// stalled packet from a client whose keep-alive is 0.
    pub packet_timeout_ms: u64,
    /// A write to a client that makes no progress for this long (the client
    /// stopped reading and its receive window is full) closes the
    /// connection (`write_timeout`) instead of holding it open for ever.
    pub write_timeout_ms: u64,
    /// How often the edge re-reads the registry entries of connected
    /// devices, closing the connections of devices disabled, deleted or
    /// given a new secret since they connected.
    pub credential_check_ms: u64,
    /// QoS 1/2 publishes from one client awaiting their acknowledgement;
    /// past it Sluice stops reading that client's socket.
    pub max_inflight: usize,
    /// Password checks (Argon2id, deliberately slow) running at once.
    pub auth_concurrency: usize,
    /// Verified credentials kept in memory, so reconnects skip the hash.
    pub auth_cache_entries: usize,
    /// A login waiting longer than this for a password check gets CONNACK 3.
    pub auth_timeout_ms: u64,
    /// Logins that may wait for a password check at once; more get
    /// CONNACK 3 at once. Each waiter holds a connection, so this keeps a
    /// flood of wrong secrets from filling `max_connections`.
    pub auth_queue: usize,
    /// The router keeps each subscription's messages in an in-memory log of
    /// `log_segment_count` segments of `log_segment_bytes`; a subscriber
    /// that falls further behind skips ahead (the pipeline does not read
    /// from the router, so this bounds only MQTT subscribers).
    pub log_segment_bytes: usize,
    pub log_segment_count: usize,
    /// Threads serving client connections.
    pub connection_threads: usize,
    /// The write-ahead spool between the edge and the pipeline.
    pub spool: SpoolConfig,
    /// Topic authorization.
    pub acl: AclConfig,
    /// Named application clients (dashboards, services), by name.
    pub applications: BTreeMap<String, ApplicationConfig>,
}

/// An application client: it connects with username = the name and
/// password = its secret, with any client id, under its own policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplicationConfig {
    /// Argon2id PHC string (`sluice secret-hash` makes one).
    pub secret_hash: String,
    /// Name of a policy in `acl.policies`.
    pub policy: String,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            mqtt_listen: "0.0.0.0:1883".parse().expect("valid address"),
            mqtts_listen: "0.0.0.0:8883".parse().expect("valid address"),
            ws_listen: Some("0.0.0.0:8083".parse().expect("valid address")),
            ws_path: "/mqtt".into(),
            tls: None,
            allow_anonymous: false,
            durable_acks: true,
            max_connections: 10_000,
            max_payload_bytes: 256 * 1024,
            max_topic_bytes: 256,
            max_topic_levels: 16,
            max_publish_rate: 1_000.0,
            publish_burst: 2_000,
            connect_timeout_ms: 5_000,
            packet_timeout_ms: 30_000,
            write_timeout_ms: 30_000,
            credential_check_ms: 5_000,
            max_inflight: 100,
            auth_concurrency: 2,
            auth_cache_entries: 100_000,
            auth_timeout_ms: 10_000,
            auth_queue: 256,
            log_segment_bytes: 16 * 1024 * 1024,
            log_segment_count: 8,
            connection_threads: 2,
            spool: SpoolConfig::default(),
            acl: AclConfig::default(),
            applications: BTreeMap::new(),
        }
    }
}

impl BrokerConfig {
    /// The largest packet a client may send: a full payload plus its topic
    /// and headers.
    pub fn max_packet_bytes(&self) -> usize {
        self.max_payload_bytes + self.max_topic_bytes + 16
    }
}
