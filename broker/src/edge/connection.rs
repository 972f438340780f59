//! One client connection, from CONNECT to close.
//!
//! The edge speaks MQTT 3.1.1 to the client itself (rumqttc's packet codec)
//! and uses a rumqttd router link only for what the router is good at:
//! delivering messages to subscribers, with retained messages, sessions and
//! QoS 1/2 towards them. Everything a client sends passes through here first:
//! - CONNECT is authenticated and the client's ACL is bound;
//! - a PUBLISH is checked (topic syntax, limits, ACL) and then appended to
//!   the spool, which is the pipeline's only input; its PUBACK/PUBREC goes
//!   out once the spool reports it durable;
//! - SUBSCRIBE filters are checked one by one; refused ones get 0x80 and
//!   never reach the router.
//!
//! Backpressure: the socket is read only while fewer than `max_inflight`
//! acknowledgements are outstanding, the rate limit allows, and the spool
//! accepts appends. A client that sends too fast sees slower acks, never
//! loss.

use super::EdgeShared;
use super::auth::{AuthOutcome, Credentials, Principal, REGISTRY_TIMEOUT};
use super::presence::{self, DisconnectReason, ROUTER_PREFIX};
use super::sessions::DeviceLogin;
use crate::acl::ClientAcl;
use crate::config::BrokerConfig;
use crate::limits::{TokenBucket, TopicLimits, check_topic_filter, check_topic_name};
use crate::spool::{Durable, SpoolError, SpoolRecord};
use crate::transport::DeviceStream;
use bytes::BytesMut;
use chrono::Utc;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use metrics::{counter, gauge};
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, LastWill, Packet, PubAck, PubComp, PubRec, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{self as router, Protocol};
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span, warn};

/// Origin kinds recorded with each spooled message.
pub const ORIGIN_DEVICE: u8 = 1;
pub const ORIGIN_APPLICATION: u8 = 2;
pub const ORIGIN_ANONYMOUS: u8 = 3;

/// Why the edge closed a connection, for the counter and the debug log.
#[derive(Debug, thiserror::Error)]
enum Violation {
    #[error("malformed packet: {0}")]
    Malformed(CodecError),
    /// What rumqttc's parser lets through; the text names the spec clause.
    #[error("malformed packet: {0}")]
    Protocol(&'static str),
    #[error("unsupported protocol level {0}")]
    ProtocolLevel(u8),
    #[error("the first packet was not CONNECT, or a server-only packet arrived")]
    NotConnect,
    #[error("a second CONNECT")]
    SecondConnect,
    #[error("invalid topic {0}")]
    BadTopic(String),
    #[error("publish to `{0}` is not allowed by the client's policy")]
    PublishDenied(String),
    #[error("publish to the reserved topic `{0}`")]
    ReservedTopic(String),
    #[error("the spool failed: {0}")]
    Spool(String),
}

impl Violation {
    fn label(&self) -> &'static str {
        match self {
            Violation::Malformed(CodecError::PayloadSizeLimitExceeded(_)) => "oversized",
            Violation::Malformed(_) | Violation::Protocol(_) => "malformed",
            Violation::ProtocolLevel(_) => "protocol_level",
            Violation::NotConnect => "not_connect",
            Violation::SecondConnect => "second_connect",
            Violation::BadTopic(_) => "bad_topic",
            Violation::PublishDenied(_) => "publish_denied",
            Violation::ReservedTopic(_) => "reserved_topic",
            Violation::Spool(_) => "spool_error",
        }
    }
}

/// Reads whole packets off the socket and buffers replies.
struct Wire {
    io: DeviceStream,
    read: BytesMut,
    write: BytesMut,
    max_packet: usize,
    /// When the packet now partly in `read` began to arrive (or reading
    /// resumed after a pause); `None` with no partial packet.
    partial_since: Option<Instant>,
    /// Longest a write may make no progress.
    write_timeout: Duration,
    /// Longest a packet may take to arrive once begun.
    packet_timeout: Duration,
}

enum Read {
    Packet(Packet),
    Closed,
    /// A packet begun and not finished within the packet timeout.
    Stalled,
}

impl Wire {
    fn new(io: DeviceStream, max_packet: usize, timeouts: &BrokerConfig) -> Self {
        Self {
            io,
            // Small to start: idle connections are what there are most of.
            read: BytesMut::with_capacity(512),
            write: BytesMut::new(),
            max_packet,
            partial_since: None,
            write_timeout: Duration::from_millis(timeouts.write_timeout_ms.max(1)),
            packet_timeout: Duration::from_millis(timeouts.packet_timeout_ms.max(1)),
        }
    }

    /// A packet already in the buffer, if there is a whole one.
    fn decode(&mut self) -> Result<Option<Packet>, Violation> {
        let packet = decode_packet(&mut self.read, self.max_packet)?;
        if packet.is_some() {
            // Bytes after it are the start of the next packet.
            self.partial_since = (!self.read.is_empty()).then(Instant::now);
        }
        Ok(packet)
    }

    /// Reading stopped (backpressure): time spent not reading is not the
    /// client's, so the partial packet's clock starts again on resuming.
    fn pause_packet_clock(&mut self) {
        self.partial_since = None;
    }

    /// When the packet partly read must be complete (None: no packet begun).
    fn packet_deadline(&mut self) -> Option<Instant> {
        if self.read.is_empty() {
            return None;
        }
        Some(*self.partial_since.get_or_insert_with(Instant::now) + self.packet_timeout)
    }

    /// Cancel-safe: the only await is `read_buf`, which reads nothing if
    /// cancelled.
    async fn read_packet(&mut self) -> Result<Read, ReadError> {
        loop {
            if let Some(p) = self.decode().map_err(ReadError::Violation)? {
                return Ok(Read::Packet(p));
            }
            self.read.reserve(1024);
            let deadline = self.packet_deadline();
            let read = self.io.read_buf(&mut self.read);
            let read = match deadline {
                Some(at) => match tokio::time::timeout_at(at, read).await {
                    Ok(read) => read,
                    Err(_) => return Ok(Read::Stalled),
                },
                None => read.await,
            };
            match read {
                Ok(0) => return Ok(Read::Closed),
                Ok(_) => {
                    self.partial_since.get_or_insert_with(Instant::now);
                }
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    fn queue(&mut self, packet: Packet) {
        // Encoding our own well-formed replies cannot fail; the size bound
        // does not apply to what the server sends.
        if let Err(e) = packet.write(&mut self.write, usize::MAX) {
            warn!(error = %e, "cannot encode a reply");
        }
    }

    fn queue_router(&mut self, packet: router::Packet) {
        if let Err(e) = router::v4::V4.write(packet, &mut self.write) {
            warn!(error = %e, "cannot encode a router packet");
        }
    }

    /// Writes what is queued. A client that stops reading fills its
    /// receive window and the write stalls: after `write_timeout` without
    /// finishing, this fails with `TimedOut` (the caller closes), so such a
    /// client cannot hold its task, its buffers and its slot for ever.
    async fn flush(&mut self) -> std::io::Result<()> {
        if self.write.is_empty() {
            return Ok(());
        }
        let write = async {
            self.io.write_all(&self.write).await?;
            self.io.flush().await
        };
        match tokio::time::timeout(self.write_timeout, write).await {
            Ok(done) => done?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client did not read what was sent",
                ));
            }
        }
        self.write.clear();
        if self.write.capacity() > 64 * 1024 {
            self.write = BytesMut::new();
        }
        Ok(())
    }

    /// Closes the sending side; bounded like a write (TLS sends a
    /// close_notify, which a client that does not read never takes).
    async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(self.write_timeout, self.io.shutdown()).await;
    }
}

enum ReadError {
    Violation(Violation),
    Io(std::io::Error),
}

/// The next whole packet in `buf` (taken out of it), `Ok(None)` while the
/// packet is incomplete (nothing taken), or why the connection closes.
fn decode_packet(buf: &mut BytesMut, max_packet: usize) -> Result<Option<Packet>, Violation> {
    precheck(buf, max_packet)?;
    match Packet::read(buf, max_packet) {
        Ok(p) => Ok(Some(p)),
        Err(CodecError::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(Violation::Malformed(e)),
    }
}

/// [`decode_packet`] for the fuzz targets (`fuzz/`), which feed it what a
/// client could send, without a socket; the error is the close reason's
/// label (as counted in `sluice_connections_closed_total`) and its text.
#[doc(hidden)]
pub fn decode_client_bytes(
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<Option<Packet>, (&'static str, String)> {
    decode_packet(buf, max_packet).map_err(|v| (v.label(), v.to_string()))
}

/// Checks on the raw bytes of the next packet what rumqttc's parser does
/// not (it ignores these bits); Ok while the packet is still incomplete.
fn precheck(buf: &[u8], max_packet: usize) -> Result<(), Violation> {
    let Some(&byte1) = buf.first() else {
        return Ok(());
    };
    // [MQTT-2.2.2-2]: the fixed-header flags are reserved except for
    // PUBLISH (whose QoS 3 the parser refuses, [MQTT-3.3.1-4]); PUBREL,
    // SUBSCRIBE and UNSUBSCRIBE need 0b0010 [MQTT-3.6.1-1] [MQTT-3.8.1-1]
    // [MQTT-3.10.1-1], every other packet 0.
    let packet_type = byte1 >> 4;
    let flags = match packet_type {
        3 => None,
        6 | 8 | 10 => Some(0b0010),
        _ => Some(0),
    };
    if flags.is_some_and(|f| byte1 & 0x0f != f) {
        return Err(Violation::Protocol(
            "reserved fixed-header flags [MQTT-2.2.2-2]",
        ));
    }
    if packet_type != 1 && packet_type != 8 {
        return Ok(());
    }
    // The variable header and payload, once the whole packet is here (the
    // parser reports framing errors itself).
    let Ok(header) = rumqttc::mqttbytes::check(buf.iter(), max_packet) else {
        return Ok(());
    };
    let start = 1 + buf[1..].iter().take_while(|b| *b & 0x80 != 0).count() + 1;
    let body = &buf[start.min(header.frame_length())..header.frame_length()];
    if packet_type == 1 {
        check_connect(body)
    } else {
        check_subscribe(body)
    }
}

/// CONNECT's protocol level and flags (§3.1.2).
fn check_connect(body: &[u8]) -> Result<(), Violation> {
    let Some(name_len) = body
        .get(..2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    else {
        return Ok(());
    };
    let (Some(name), Some(&level), Some(&flags)) = (
        body.get(2..2 + name_len),
        body.get(2 + name_len),
        body.get(3 + name_len),
    ) else {
        return Ok(());
    };
    // A wrong protocol name is refused by the parser [MQTT-3.1.2-1].
    if name == b"MQTT" && level != 4 {
        // [MQTT-3.1.2-2]: CONNACK 0x01, then close.
        return Err(Violation::ProtocolLevel(level));
    }
    if flags & 0x01 != 0 {
        return Err(Violation::Protocol(
            "CONNECT reserved flag set [MQTT-3.1.2-3]",
        ));
    }
    if flags & 0x40 != 0 && flags & 0x80 == 0 {
        return Err(Violation::Protocol(
            "CONNECT password flag without user name flag [MQTT-3.1.2-22]",
        ));
    }
    // Will QoS/retain without the will flag, and will QoS 3, are refused
    // by the parser [MQTT-3.1.2-11] [MQTT-3.1.2-13] [MQTT-3.1.2-14] [MQTT-3.1.2-15].
    Ok(())
}

/// The reserved bits of each requested QoS byte (§3.8.3).
fn check_subscribe(body: &[u8]) -> Result<(), Violation> {
    let mut at = 2; // packet identifier
    while let Some(len) = body.get(at..at + 2) {
        let options_at = at + 2 + usize::from(u16::from_be_bytes([len[0], len[1]]));
        match body.get(options_at) {
            // [MQTT-3.8.3-4]: reserved bits non-zero is malformed.
            Some(options) if options & 0xfc != 0 => {
                return Err(Violation::Protocol(
                    "SUBSCRIBE options reserved bits set [MQTT-3.8.3-4]",
                ));
            }
            Some(_) => at = options_at + 1,
            None => return Ok(()),
        }
    }
    Ok(())
}

type AckFuture = Pin<Box<dyn Future<Output = (u16, QoS, Result<u64, SpoolError>)> + Send>>;

/// Serves one accepted connection to its end.
pub(crate) async fn serve(
    shared: Arc<EdgeShared>,
    io: DeviceStream,
    transport: &'static str,
    certificate_cn: Option<String>,
) {
    let _count = ConnectionCount::new(&shared, transport);
    let mut wire = Wire::new(io, shared.config.max_packet_bytes(), &shared.config);
    let connect_timeout = Duration::from_millis(shared.config.connect_timeout_ms.max(1));
    let connect = match tokio::time::timeout(connect_timeout, wire.read_packet()).await {
        Ok(Ok(Read::Packet(Packet::Connect(c)))) => c,
        Ok(Ok(Read::Packet(_))) => return close(Violation::NotConnect, transport),
        Ok(Ok(Read::Closed)) | Ok(Err(ReadError::Io(_))) => return,
        Ok(Err(ReadError::Violation(Violation::ProtocolLevel(level)))) => {
            // [MQTT-3.1.2-2]: refuse with CONNACK 0x01, then close.
            close(Violation::ProtocolLevel(level), transport);
            return refuse(&mut wire, ConnectReturnCode::RefusedProtocolVersion).await;
        }
        Ok(Err(ReadError::Violation(v))) => return close(v, transport),
        Ok(Ok(Read::Stalled)) | Err(_) => {
            counter!("sluice_connect_timeouts_total").increment(1);
            debug!(transport, "no CONNECT in time; closed");
            return;
        }
    };

    let span = debug_span!("mqtt_connection", client_id = %connect.client_id, transport);
    async move {
        if _count.over_limit {
            counter!("sluice_connections_refused_total", "reason" => "max_connections")
                .increment(1);
            return refuse(&mut wire, ConnectReturnCode::ServiceUnavailable).await;
        }
        let login = connect.login.as_ref();
        let outcome = shared
            .auth
            .authenticate(Credentials {
                client_id: &connect.client_id,
                username: login.map(|l| l.username.as_str()),
                password: login.map(|l| l.password.as_str()),
                certificate_cn: certificate_cn.as_deref(),
            })
            .await;
        let (principal, policy, secret_hash) = match outcome {
            AuthOutcome::Accepted {
                principal,
                policy,
                secret_hash,
            } => (principal, policy, secret_hash),
            AuthOutcome::Refused { code, reason } => {
                debug!(reason, ?code, "login refused");
                return refuse(&mut wire, code).await;
            }
        };
        let principal = match assign_client_id(principal, connect.clean_session) {
            Some(p) => p,
            None => return refuse(&mut wire, ConnectReturnCode::BadClientId).await,
        };
        let Some(acl) = shared
            .acl
            .bind(&policy, principal.client_id(), principal.username())
        else {
            debug!(policy, "policy refuses this client id");
            return refuse(&mut wire, ConnectReturnCode::NotAuthorized).await;
        };
        if let Some(will) = &connect.last_will
            && (check_topic_name(&will.topic, shared.topic_limits()).is_err()
                || !acl.may_publish(&will.topic)
                || will.topic.starts_with(ROUTER_PREFIX))
        {
            counter!("sluice_acl_denied_total", "action" => "will").increment(1);
            debug!(topic = %will.topic, "will topic not allowed");
            return refuse(&mut wire, ConnectReturnCode::NotAuthorized).await;
        }

        let router_id = principal.router_client_id();
        let clean = connect.clean_session;
        // A persistent session may hold subscriptions and messages in the
        // router, so it needs its link now; a clean one gets a link only
        // when it subscribes.
        let (link, session_present) = if clean {
            (None, false)
        } else {
            match build_link(&shared, &router_id, false).await {
                Ok((link, present)) => (Some(link), present),
                Err(e) => {
                    warn!(error = %e, "the router refused the session");
                    return refuse(&mut wire, ConnectReturnCode::ServiceUnavailable).await;
                }
            }
        };
        // Devices are re-checked against the registry while connected
        // (`revocation`), against what they logged in with.
        let login = match &principal {
            Principal::Device { id } => Some(DeviceLogin {
                device_id: id.clone(),
                secret_hash,
            }),
            _ => None,
        };
        let claim = shared.sessions.claim(&router_id, login);

        let connected_at = Utc::now();
        if let Principal::Device { id } = &principal {
            let update =
                shared
                    .auth
                    .registry()
                    .record_presence(id, true, connected_at, connected_at);
            match tokio::time::timeout(REGISTRY_TIMEOUT, update).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "cannot record the connect in the registry"),
                Err(_) => warn!("the registry did not record the connect in time"),
            }
            presence::publish(&shared.publisher, id, true, connected_at, "connected");
        }
        wire.queue(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            session_present,
        )));
        counter!("sluice_connections_accepted_total", "kind" => principal.kind()).increment(1);
        debug!(kind = principal.kind(), "client connected");

        let ingress = ingress_index(&router_id, shared.ingress.len());
        let mut session = Session {
            shared: shared.clone(),
            principal,
            router_id,
            clean,
            acl,
            link,
            ingress,
            closed: claim.closed,
            wire,
            pending: FuturesOrdered::new(),
            awaiting_release: HashSet::new(),
            presence_filters: Vec::new(),
            dropped_qos2: HashSet::new(),
            router_queue: Vec::new(),
            ingress_queue: Vec::new(),
            bucket: TokenBucket::new(
                shared.config.max_publish_rate,
                shared.config.publish_burst.max(1),
                std::time::Instant::now(),
            ),
            throttled_until: None,
            keep_alive: (connect.keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500)),
            will: connect.last_will,
        };
        let reason = session.run().await;
        session.finish(reason, claim.generation, connected_at).await;
    }
    .instrument(span)
    .await
}

/// A client's own link to the router: its subscriptions and deliveries.
struct RouterLink {
    tx: LinkTx,
    rx: LinkRx,
}

/// Registers `router_id` with the router (blocking, so off the async
/// threads); reports whether the router had a session for it.
async fn build_link(
    shared: &Arc<EdgeShared>,
    router_id: &str,
    clean: bool,
) -> Result<(RouterLink, bool), String> {
    let links = shared.links.clone();
    let id = router_id.to_owned();
    match tokio::task::spawn_blocking(move || links(&id, clean)).await {
        Ok(Ok((tx, rx, present))) => Ok((RouterLink { tx, rx }, present && !clean)),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(e.to_string()),
    }
}

/// The shared ingress link a client's publishes use: always the same one
/// for a client, so its messages reach the router in order.
fn ingress_index(router_id: &str, links: usize) -> usize {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(router_id);
    (hash % links.max(1) as u64) as usize
}

async fn next_notification(
    link: &mut Option<RouterLink>,
) -> Result<Option<Notification>, rumqttd::local::LinkError> {
    match link {
        Some(l) => l.rx.next().await,
        None => std::future::pending().await,
    }
}

/// Sends a refusing CONNACK and closes (MQTT 3.1.1 §3.2.2.3).
async fn refuse(wire: &mut Wire, code: ConnectReturnCode) {
    wire.queue(Packet::ConnAck(ConnAck::new(code, false)));
    let _ = wire.flush().await;
    wire.shutdown().await;
}

fn close(violation: Violation, transport: &'static str) {
    counter!("sluice_connections_closed_total", "reason" => violation.label()).increment(1);
    debug!(transport, %violation, "connection closed");
}

/// An empty client id is allowed only for a clean session of an anonymous
/// client (§3.1.3.1); the server then makes one up.
fn assign_client_id(principal: Principal, clean_session: bool) -> Option<Principal> {
    match principal {
        Principal::Anonymous { client_id } if client_id.is_empty() => {
            clean_session.then(|| Principal::Anonymous {
                client_id: format!("auto-{:016x}", rand_u64()),
            })
        }
        p if p.client_id().is_empty() => None,
        p => Some(p),
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::UNIX_EPOCH
            .elapsed()
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Counts live connections per transport; knows whether this one is over
/// the limit.
struct ConnectionCount {
    shared: Arc<EdgeShared>,
    transport: &'static str,
    over_limit: bool,
}

impl ConnectionCount {
    fn new(shared: &Arc<EdgeShared>, transport: &'static str) -> Self {
        use std::sync::atomic::Ordering;
        let now = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
        gauge!("sluice_connections", "transport" => transport).increment(1.0);
        Self {
            shared: shared.clone(),
            transport,
            over_limit: now > shared.config.max_connections,
        }
    }
}

impl Drop for ConnectionCount {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        self.shared.connections.fetch_sub(1, Ordering::SeqCst);
        gauge!("sluice_connections", "transport" => self.transport).decrement(1.0);
    }
}

struct Session {
    shared: Arc<EdgeShared>,
    principal: Principal,
    /// The client's id inside the router (see `Principal::router_client_id`).
    router_id: String,
    clean: bool,
    acl: ClientAcl,
    /// Created at the first SUBSCRIBE (or at CONNECT for a persistent
    /// session); publish-only clients never need one.
    link: Option<RouterLink>,
    /// Index of the shared link in `EdgeShared::ingress` for publishes.
    ingress: usize,
    /// Resolves when the edge closes this connection from outside: a
    /// takeover, or the device's credentials revoked.
    closed: tokio::sync::oneshot::Receiver<DisconnectReason>,
    wire: Wire,
    /// Publishes waiting for the spool, in arrival order (the spool reports
    /// durability in append order, so acks leave in order too).
    pending: FuturesOrdered<AckFuture>,
    /// QoS 2 packet ids stored and PUBREC'd, waiting for PUBREL: a
    /// retransmitted PUBLISH with one of these ids is not stored twice.
    awaiting_release: HashSet<u16>,
    /// `$sluice/…` filters this client holds, for deliveries from the
    /// router's `@sluice/…` namespace.
    presence_filters: Vec<String>,
    /// Router QoS 2 deliveries the edge withheld; their PUBREL is answered
    /// here.
    dropped_qos2: HashSet<u16>,
    /// Packets for the client's own link not yet handed over (see `flush_router`).
    router_queue: Vec<router::Packet>,
    /// Publishes for the shared ingress link, likewise.
    ingress_queue: Vec<router::Packet>,
    bucket: TokenBucket,
    throttled_until: Option<Instant>,
    keep_alive: Option<Duration>,
    will: Option<LastWill>,
}

impl Session {
    async fn run(&mut self) -> DisconnectReason {
        let mut shutdown = self.shared.shutdown.subscribe();
        let mut last_heard = Instant::now();
        let mut paused = false;
        loop {
            self.flush_router().await;
            if let Err(e) = self.wire.flush().await {
                debug!(error = %e, "write failed");
                return match e.kind() {
                    std::io::ErrorKind::TimedOut => DisconnectReason::WriteTimeout,
                    _ => DisconnectReason::ConnectionLost,
                };
            }
            let can_read = self.below_inflight_limit()
                && self.throttled_until.is_none_or(|t| Instant::now() >= t);
            let throttle = self.throttled_until.filter(|_| !can_read);
            // While Sluice does not read (backpressure, rate limit) the
            // client's silence is Sluice's doing: neither the keep-alive
            // nor a partial packet's clock runs, and both start afresh
            // when reading resumes.
            if !can_read {
                paused = true;
                self.wire.pause_packet_clock();
            } else if std::mem::take(&mut paused) {
                last_heard = Instant::now();
            }
            let keep_alive = self.keep_alive.filter(|_| can_read).map(|k| last_heard + k);
            tokio::select! {
                _ = shutdown.changed() => {
                    self.drain_pending().await;
                    return DisconnectReason::ServerShutdown;
                }
                Some((pkid, qos, result)) = self.pending.next(), if !self.pending.is_empty() => {
                    if let Err(v) = self.acknowledge(pkid, qos, result) {
                        return self.violation(v);
                    }
                    // One group commit makes many of this client's messages
                    // durable at once: send all their acks in one write.
                    if let Err(v) = self.acknowledge_ready() {
                        return self.violation(v);
                    }
                }
                Ok(reason) = &mut self.closed => return reason,
                notification = next_notification(&mut self.link) => match notification {
                    Ok(Some(n)) => {
                        if let Some(reason) = self.deliver(n).await {
                            return reason;
                        }
                    }
                    Ok(None) => {}
                    Err(_) => return DisconnectReason::TakenOver,
                },
                read = self.wire.read_packet(), if can_read => {
                    last_heard = Instant::now();
                    match read {
                        Ok(Read::Packet(p)) => {
                            if let Some(reason) = self.handle_and_drain(p).await {
                                return reason;
                            }
                        }
                        Ok(Read::Closed) => return DisconnectReason::ConnectionLost,
                        Ok(Read::Stalled) => return DisconnectReason::PacketTimeout,
                        Err(ReadError::Io(e)) => {
                            debug!(error = %e, "read failed");
                            return DisconnectReason::ConnectionLost;
                        }
                        Err(ReadError::Violation(v)) => return self.violation(v),
                    }
                }
                _ = sleep_until(throttle), if throttle.is_some() => {
                    self.throttled_until = None;
                }
                _ = sleep_until(keep_alive), if keep_alive.is_some() => {
                    return DisconnectReason::KeepAliveTimeout;
                }
            }
        }
    }

    /// Handles a packet, then any more already buffered, while reading is allowed.
    async fn handle_and_drain(&mut self, first: Packet) -> Option<DisconnectReason> {
        let mut next = Some(first);
        while let Some(packet) = next.take() {
            match self.handle(packet).await {
                Ok(Some(reason)) => return Some(reason),
                Ok(None) => {}
                Err(v) => return Some(self.violation(v)),
            }
            let can_read = self.below_inflight_limit() && self.throttled_until.is_none();
            if can_read {
                match self.wire.decode() {
                    Ok(p) => next = p,
                    Err(v) => return Some(self.violation(v)),
                }
            }
        }
        // Acks that are already durable go out with this write.
        if let Err(v) = self.acknowledge_ready() {
            return Some(self.violation(v));
        }
        None
    }

    /// Queues the acks of every publish that is durable by now.
    fn acknowledge_ready(&mut self) -> Result<(), Violation> {
        while let Some(Some((pkid, qos, result))) =
            futures_util::FutureExt::now_or_never(self.pending.next())
        {
            self.acknowledge(pkid, qos, result)?;
        }
        Ok(())
    }

    /// The socket is read only while fewer acks than `max_inflight` wait.
    fn below_inflight_limit(&self) -> bool {
        self.pending.len() < self.shared.config.max_inflight.max(1)
    }

    fn violation(&self, v: Violation) -> DisconnectReason {
        counter!("sluice_connections_closed_total", "reason" => v.label()).increment(1);
        debug!(violation = %v, "closing the connection");
        DisconnectReason::ProtocolViolation
    }

    async fn handle(&mut self, packet: Packet) -> Result<Option<DisconnectReason>, Violation> {
        match packet {
            Packet::Publish(p) => self.publish(p).await.map(|_| None),
            Packet::PubAck(a) => {
                self.queue_for_router(router_puback(a.pkid));
                Ok(None)
            }
            Packet::PubRec(r) => {
                self.queue_for_router(router_pubrec(r.pkid));
                Ok(None)
            }
            Packet::PubComp(c) => {
                self.queue_for_router(router_pubcomp(c.pkid));
                Ok(None)
            }
            Packet::PubRel(r) => {
                // Answer even an unknown id: the client may be retrying after
                // a reconnect, and PUBCOMP is what lets it move on.
                self.awaiting_release.remove(&r.pkid);
                self.wire.queue(Packet::PubComp(PubComp::new(r.pkid)));
                Ok(None)
            }
            Packet::Subscribe(s) => {
                self.subscribe(s).await;
                Ok(None)
            }
            // [MQTT-3.10.3-2]: at least one topic filter (the parser
            // accepts none).
            Packet::Unsubscribe(u) if u.topics.is_empty() => Err(Violation::Protocol(
                "UNSUBSCRIBE without a topic filter [MQTT-3.10.3-2]",
            )),
            Packet::Unsubscribe(u) => {
                self.unsubscribe(u).await;
                Ok(None)
            }
            Packet::PingReq => {
                self.wire.queue(Packet::PingResp);
                Ok(None)
            }
            Packet::Disconnect => Ok(Some(DisconnectReason::ClientDisconnect)),
            Packet::Connect(_) => Err(Violation::SecondConnect),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                Err(Violation::NotConnect)
            }
        }
    }

    async fn publish(&mut self, p: Publish) -> Result<(), Violation> {
        if let Err(e) = check_topic_name(&p.topic, self.shared.topic_limits()) {
            return Err(Violation::BadTopic(format!("{}: {e}", p.topic)));
        }
        if p.topic.starts_with(ROUTER_PREFIX) || p.topic.starts_with(presence::CLIENT_PREFIX) {
            return Err(Violation::ReservedTopic(p.topic));
        }
        if !self.acl.may_publish(&p.topic) {
            counter!("sluice_acl_denied_total", "action" => "publish").increment(1);
            return Err(Violation::PublishDenied(p.topic));
        }
        if p.qos == QoS::ExactlyOnce && self.awaiting_release.contains(&p.pkid) {
            // A retransmission of a message already stored: acknowledge again.
            self.wire.queue(Packet::PubRec(PubRec::new(p.pkid)));
            return Ok(());
        }
        if let Some(wait) = self.bucket.take(std::time::Instant::now()) {
            counter!("sluice_publish_throttled_total").increment(1);
            self.throttled_until = Some(Instant::now() + wait);
        }

        let durable = store(
            &self.shared,
            &self.principal,
            &p.topic,
            &p.payload,
            p.qos,
            p.retain,
        )
        .await?;
        // Subscribers get the message as soon as it is accepted; the router
        // stamps the delivery QoS from each subscription.
        self.ingress_queue.push(router::Packet::Publish(
            router::Publish::new(
                bytes::Bytes::from(p.topic.into_bytes()),
                p.payload,
                p.retain,
            ),
            None,
        ));
        counter!("sluice_messages_received_total", "qos" => qos_label(p.qos)).increment(1);

        if p.qos == QoS::AtMostOnce {
            return Ok(());
        }
        if p.qos == QoS::ExactlyOnce {
            self.awaiting_release.insert(p.pkid);
        }
        let (pkid, qos) = (p.pkid, p.qos);
        if self.shared.config.durable_acks {
            self.pending
                .push_back(Box::pin(async move { (pkid, qos, durable.await) }));
        } else {
            self.pending
                .push_back(Box::pin(async move { (pkid, qos, Ok(0)) }));
            tokio::spawn(async move {
                let _ = durable.await;
            });
        }
        Ok(())
    }
}

/// Appends to the spool; waits while the spool is full (backpressure).
/// A free function: the session itself is not `Sync` (its socket is not).
async fn store(
    shared: &EdgeShared,
    principal: &Principal,
    topic: &str,
    payload: &bytes::Bytes,
    qos: QoS,
    retain: bool,
) -> Result<Durable, Violation> {
    let (origin_kind, origin_id) = match principal {
        Principal::Device { id } => (ORIGIN_DEVICE, id.clone()),
        Principal::Application { name, .. } => (ORIGIN_APPLICATION, name.clone()),
        Principal::Anonymous { client_id } => (ORIGIN_ANONYMOUS, client_id.clone()),
    };
    let record = SpoolRecord {
        seq: 0,
        received_at_us: Utc::now().timestamp_micros(),
        origin_kind,
        origin_id,
        topic: topic.to_owned(),
        payload: payload.clone(),
        qos: qos as u8,
        retain,
        hops: 0,
    };
    shared
        .spool
        .append(record)
        .await
        .map_err(|e| Violation::Spool(e.to_string()))
}

impl Session {
    fn acknowledge(
        &mut self,
        pkid: u16,
        qos: QoS,
        result: Result<u64, SpoolError>,
    ) -> Result<(), Violation> {
        if let Err(e) = result {
            // Not durable: no ack, so the client will send it again.
            return Err(Violation::Spool(e.to_string()));
        }
        match qos {
            QoS::AtLeastOnce => self.wire.queue(Packet::PubAck(PubAck::new(pkid))),
            QoS::ExactlyOnce => self.wire.queue(Packet::PubRec(PubRec::new(pkid))),
            QoS::AtMostOnce => {}
        }
        Ok(())
    }

    /// At shutdown, the acks of what is already being written still go out.
    async fn drain_pending(&mut self) {
        while let Some((pkid, qos, result)) = self.pending.next().await {
            if self.acknowledge(pkid, qos, result).is_err() {
                break;
            }
        }
        let _ = self.wire.flush().await;
    }

    async fn subscribe(&mut self, s: rumqttc::mqttbytes::v4::Subscribe) {
        if self.link.is_none() {
            match build_link(&self.shared, &self.router_id, self.clean).await {
                Ok((link, _)) => self.link = Some(link),
                Err(e) => {
                    warn!(error = %e, "the router refused a link; subscription refused");
                    let codes = vec![SubscribeReasonCode::Failure; s.filters.len()];
                    self.wire.queue(Packet::SubAck(SubAck::new(s.pkid, codes)));
                    return;
                }
            }
        }
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut allowed = Vec::new();
        for f in s.filters {
            let granted = match f.qos {
                QoS::AtMostOnce => router::QoS::AtMostOnce,
                QoS::AtLeastOnce => router::QoS::AtLeastOnce,
                QoS::ExactlyOnce => router::QoS::ExactlyOnce,
            };
            match self.check_filter(&f.path) {
                Some(router_filter) => {
                    codes.push(SubscribeReasonCode::Success(f.qos));
                    if router_filter.starts_with(ROUTER_PREFIX) {
                        self.presence_filters.push(f.path.clone());
                    }
                    allowed.push(router::Filter {
                        path: router_filter,
                        qos: granted,
                        nolocal: false,
                        preserve_retain: false,
                        retain_forward_rule: router::RetainForwardRule::OnEverySubscribe,
                    });
                }
                None => codes.push(SubscribeReasonCode::Failure),
            }
        }
        // Our SUBACK goes out before the router can send retained messages
        // for the new subscriptions; the router's own SubAck is discarded.
        self.wire.queue(Packet::SubAck(SubAck::new(s.pkid, codes)));
        if !allowed.is_empty() {
            self.queue_for_router(router::Packet::Subscribe(
                router::Subscribe {
                    pkid: s.pkid,
                    filters: allowed,
                },
                None,
            ));
        }
    }

    /// The filter as the router should see it, or None if refused.
    fn check_filter(&self, filter: &str) -> Option<String> {
        // A shared subscription is judged by the filter it shares.
        let (share, inner) = match filter.strip_prefix("$share/") {
            Some(rest) => match rest.split_once('/') {
                Some((group, inner)) if !group.is_empty() => (Some(group), inner),
                _ => return self.refuse_filter(filter),
            },
            None => (None, filter),
        };
        if check_topic_filter(inner, self.shared.topic_limits()).is_err()
            || inner.starts_with(ROUTER_PREFIX)
            || !self.acl.may_subscribe(inner)
        {
            return self.refuse_filter(filter);
        }
        let translated = presence::to_router(inner).unwrap_or_else(|| inner.to_owned());
        Some(match share {
            Some(group) => format!("$share/{group}/{translated}"),
            None => translated,
        })
    }

    fn refuse_filter(&self, filter: &str) -> Option<String> {
        counter!("sluice_acl_denied_total", "action" => "subscribe").increment(1);
        debug!(filter, "subscription refused");
        None
    }

    async fn unsubscribe(&mut self, u: rumqttc::mqttbytes::v4::Unsubscribe) {
        let mut filters = Vec::with_capacity(u.topics.len());
        for t in u.topics {
            self.presence_filters.retain(|f| f != &t);
            filters.push(presence::to_router(&t).unwrap_or(t));
        }
        self.wire.queue(Packet::UnsubAck(UnsubAck::new(u.pkid)));
        self.queue_for_router(router::Packet::Unsubscribe(
            router::Unsubscribe {
                pkid: u.pkid,
                filters,
            },
            None,
        ));
    }

    /// Packets for the router wait here until [`Self::flush_router`], so a
    /// burst of publishes read at once wakes the router once, not per message.
    fn queue_for_router(&mut self, packet: router::Packet) {
        self.router_queue.push(packet);
    }

    async fn flush_router(&mut self) {
        if !self.ingress_queue.is_empty()
            && let Err(e) = self.shared.ingress[self.ingress].publish_batch(&mut self.ingress_queue)
        {
            warn!(error = %e, "cannot hand publishes to the router");
            self.ingress_queue.clear();
        }
        let Some(last) = self.router_queue.pop() else {
            return;
        };
        let Some(link) = self.link.as_mut() else {
            // Acks for deliveries only exist with a link; nothing to do.
            self.router_queue.clear();
            return;
        };
        link.tx.buffer().extend(self.router_queue.drain(..));
        // `LinkTx::send` pushes the last packet and notifies the router with
        // a channel send that blocks only while the router's inbound queue
        // (1,000 events) is full: backpressure from the router.
        if let Err(e) = link.tx.send(last).await {
            debug!(error = %e, "router link closed");
        }
    }

    /// Writes what the router sends this client. Returns a reason to close.
    async fn deliver(&mut self, n: Notification) -> Option<DisconnectReason> {
        let packet: Option<router::Packet> = match n {
            Notification::Unschedule => {
                let woken = match &self.link {
                    Some(link) => link.rx.wake().await.is_ok(),
                    None => true,
                };
                return (!woken).then_some(DisconnectReason::TakenOver);
            }
            Notification::Disconnect(..) => return Some(DisconnectReason::TakenOver),
            other => other.into(),
        };
        match packet? {
            router::Packet::Publish(p, props) => {
                if p.topic.starts_with(ROUTER_PREFIX.as_bytes()) {
                    self.deliver_reserved(router::Packet::Publish(p, props))
                        .await;
                } else {
                    self.wire.queue_router(router::Packet::Publish(p, props));
                }
            }
            router::Packet::PubRel(r, props) => {
                if self.dropped_qos2.remove(&r.pkid) {
                    self.queue_for_router(router_pubcomp(r.pkid));
                } else {
                    self.wire.queue_router(router::Packet::PubRel(r, props));
                }
            }
            // Replies to what the edge forwarded; the edge answered the
            // client itself.
            _ => {}
        }
        None
    }

    /// A message from the router's `@sluice/` namespace: delivered as
    /// `$sluice/…` to clients that asked for it, withheld (and acknowledged
    /// towards the router) from clients that only match it by a wildcard.
    async fn deliver_reserved(&mut self, packet: router::Packet) {
        // rumqttd keeps QoS and packet id private; encode, then decode with
        // the client-side codec, whose fields are public.
        let mut buf = BytesMut::new();
        if router::v4::V4.write(packet, &mut buf).is_err() {
            return;
        }
        let Ok(Packet::Publish(mut p)) = Packet::read(&mut buf, usize::MAX) else {
            return;
        };
        let Some(topic) = presence::from_router(&p.topic) else {
            return;
        };
        if self
            .presence_filters
            .iter()
            .any(|f| crate::acl::filter_matches(f, &topic))
        {
            p.topic = topic;
            self.wire.queue(Packet::Publish(p));
            return;
        }
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.queue_for_router(router_puback(p.pkid)),
            QoS::ExactlyOnce => {
                self.dropped_qos2.insert(p.pkid);
                self.queue_for_router(router_pubrec(p.pkid))
            }
        }
    }

    /// After the loop: the router, the will, presence and the registry.
    async fn finish(
        mut self,
        reason: DisconnectReason,
        generation: u64,
        connected_at: chrono::DateTime<Utc>,
    ) {
        // rumqttd forgets a connection only when told (its own listener
        // sends an internal event we cannot name); a DISCONNECT through the
        // link does the same. Not if the router already dropped the link
        // (a takeover): its connection id may then belong to the connection
        // that replaced it. The check and the send are microseconds apart,
        // and the newer connection claimed the id before building its link.
        if self.router_link_alive() {
            self.queue_for_router(router::Packet::Disconnect(
                router::Disconnect {
                    reason_code: router::DisconnectReasonCode::NormalDisconnection,
                },
                None,
            ));
        }
        self.flush_router().await;
        let _ = self.wire.flush().await;
        self.wire.shutdown().await;
        if reason.publishes_will()
            && let Some(will) = self.will.take()
        {
            self.publish_will(will).await;
        }
        counter!("sluice_disconnects_total", "reason" => reason.as_str()).increment(1);
        debug!(reason = reason.as_str(), "client disconnected");
        let current = self.shared.sessions.release(&self.router_id, generation);
        if let Principal::Device { id } = &self.principal
            && current
        {
            let at = Utc::now();
            presence::publish(&self.shared.publisher, id, false, at, reason.as_str());
            let update = self
                .shared
                .auth
                .registry()
                .record_presence(id, false, at, connected_at);
            match tokio::time::timeout(REGISTRY_TIMEOUT, update).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "cannot record the disconnect in the registry"),
                Err(_) => warn!("the registry did not record the disconnect in time"),
            }
        }
    }

    /// False once the router has dropped this link (a takeover raced with
    /// the end of the connection). Drains what the router still queued.
    fn router_link_alive(&mut self) -> bool {
        let Some(link) = self.link.as_mut() else {
            return false;
        };
        loop {
            match futures_util::FutureExt::now_or_never(link.rx.next()) {
                None => return true,
                Some(Ok(_)) => {}
                Some(Err(_)) => return false,
            }
        }
    }

    /// The will goes where any publish from this client would: the spool
    /// (so rules see it) and the router (so subscribers do).
    async fn publish_will(&mut self, will: LastWill) {
        let payload = will.message.clone();
        if let Err(v) = store(
            &self.shared,
            &self.principal,
            &will.topic,
            &payload,
            will.qos,
            will.retain,
        )
        .await
        {
            warn!(violation = %v, "cannot store the will");
            return;
        }
        counter!("sluice_wills_published_total").increment(1);
        // Through Sluice's own link: this client's link is already gone.
        if let Err(e) = self
            .shared
            .publisher
            .publish(&will.topic, payload.to_vec(), will.retain)
        {
            warn!(error = %e, "cannot deliver the will to subscribers");
        }
    }
}

/// Acknowledgements towards the router, for its deliveries to this client.
fn router_puback(pkid: u16) -> router::Packet {
    router::Packet::PubAck(
        router::PubAck {
            pkid,
            reason: router::PubAckReason::Success,
        },
        None,
    )
}

fn router_pubrec(pkid: u16) -> router::Packet {
    router::Packet::PubRec(
        router::PubRec {
            pkid,
            reason: router::PubRecReason::Success,
        },
        None,
    )
}

fn router_pubcomp(pkid: u16) -> router::Packet {
    router::Packet::PubComp(
        router::PubComp {
            pkid,
            reason: router::PubCompReason::Success,
        },
        None,
    )
}

fn qos_label(q: QoS) -> &'static str {
    match q {
        QoS::AtMostOnce => "0",
        QoS::AtLeastOnce => "1",
        QoS::ExactlyOnce => "2",
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl EdgeShared {
    pub(crate) fn topic_limits(&self) -> TopicLimits {
        TopicLimits {
            max_bytes: self.config.max_topic_bytes,
            max_levels: self.config.max_topic_levels,
        }
    }
}
