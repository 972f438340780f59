//! The device edge: Sluice's own MQTT 3.1.1 listeners in front of the
//! rumqttd router.
//!
//! - [`auth`]: who is connecting (devices, applications, anonymous).
//! - [`connection`]: one connection's protocol handling, ACL and acks.
//! - [`presence`]: connect/disconnect messages and the `$sluice/` namespace.
//! - [`sessions`]: which connection holds each client id (takeover).
//!
//! Listeners: plain TCP (`mqtt_listen`), TLS with optional client
//! certificates (`mqtts_listen`, when `tls` is configured) and WebSocket
//! (`ws_listen`, path `ws_path`). All three lead to the same
//! [`connection::serve`]. [`revocation`] closes the connections of devices
//! disabled, deleted or rotated while connected.

pub mod auth;
pub mod connection;
mod fd_limit;
pub mod presence;
pub(crate) mod revocation;
pub mod sessions;

use crate::acl::Acl;
use crate::config::BrokerConfig;
use crate::publisher::Publisher;
use crate::spool::SpoolAppender;
use crate::transport::{TlsAcceptor, accept_websocket};
use auth::Authenticator;
use metrics::counter;
use rumqttd::local::{LinkRx, LinkTx};
use sessions::Sessions;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Builds a router link for a client id (clean session or not) and reports
/// whether the router had a session for it. A closure because rumqttd does
/// not export the type of its router channel.
pub(crate) type LinkFactory =
    Arc<dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, bool), String> + Send + Sync>;

/// What every connection shares.
pub(crate) struct EdgeShared {
    pub config: BrokerConfig,
    pub auth: Authenticator,
    pub acl: Acl,
    pub links: LinkFactory,
    pub spool: SpoolAppender,
    /// Sluice's own messages (presence, wills).
    pub publisher: Publisher,
    /// Shared links that carry client publishes into the router.
    pub ingress: Vec<Publisher>,
    pub sessions: Sessions,
    pub connections: AtomicUsize,
    /// Flips to true when the broker stops: every connection closes.
    pub shutdown: watch::Sender<bool>,
}

/// A bound listener and what runs on it.
pub(crate) enum Listener {
    Tcp(TcpListener),
    Tls(TcpListener, TlsAcceptor),
    WebSocket(TcpListener, String),
}

impl Listener {
    fn transport(&self) -> &'static str {
        match self {
            Listener::Tcp(_) => "tcp",
            Listener::Tls(..) => "tls",
            Listener::WebSocket(..) => "ws",
        }
    }

    fn socket(&self) -> &TcpListener {
        match self {
            Listener::Tcp(l) | Listener::Tls(l, _) | Listener::WebSocket(l, _) => l,
        }
    }
}

/// Accepts connections until shutdown; each one runs in its own task.
pub(crate) async fn accept_loop(shared: Arc<EdgeShared>, listener: Listener) {
    let transport = listener.transport();
    let mut shutdown = shared.shutdown.subscribe();
    if let Ok(addr) = listener.socket().local_addr() {
        info!(%addr, transport, "MQTT listener started");
    }
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => return,
            a = listener.socket().accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                warn!(error = %e, transport, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        match &listener {
            Listener::Tcp(_) => {
                tokio::spawn(connection::serve(shared, Box::new(stream), transport, None));
            }
            Listener::Tls(_, acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match handshake(&shared, acceptor.accept(stream), peer).await {
                        Some((io, cn)) => connection::serve(shared, io, transport, cn).await,
                        None => counter!("sluice_tls_handshake_failures_total").increment(1),
                    }
                });
            }
            Listener::WebSocket(_, path) => {
                let path = path.clone();
                let max = shared.config.max_packet_bytes() + 1024;
                tokio::spawn(async move {
                    if let Some(io) =
                        handshake(&shared, accept_websocket(stream, &path, max), peer).await
                    {
                        connection::serve(shared, io, transport, None).await;
                    }
                });
            }
        }
    }
}

/// A TLS or WebSocket handshake, bounded by the connect timeout.
async fn handshake<T, E: std::fmt::Display>(
    shared: &EdgeShared,
    fut: impl std::future::Future<Output = Result<T, E>>,
    peer: SocketAddr,
) -> Option<T> {
    let limit = Duration::from_millis(shared.config.connect_timeout_ms.max(1));
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(t)) => Some(t),
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "handshake failed");
            None
        }
        Err(_) => {
            debug!(%peer, "handshake timed out");
            None
        }
    }
}

/// Connections the kernel completes before the accept loop takes them.
/// std's listeners use 128: in a storm of 10,000 connects the queue
/// overflowed and the kernel dropped handshakes, which clients only retry
/// after 1 s, 3 s, and so on. The kernel caps this at `net.core.somaxconn`
/// (4,096 by default), so asking for 4,096 means "as many as allowed".
const LISTEN_BACKLOG: u32 = 4096;

/// Binds every configured listener now, so a taken port is a start-up error.
pub(crate) fn bind_listeners(config: &BrokerConfig) -> Result<Vec<Listener>, crate::BrokerError> {
    fd_limit::raise_for(config.max_connections);
    let bind = |addr: SocketAddr| -> Result<TcpListener, crate::BrokerError> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        };
        socket
            .and_then(|s| {
                // As std's bind does, so a restart finds its port free.
                s.set_reuseaddr(true)?;
                s.bind(addr)?;
                s.listen(LISTEN_BACKLOG)
            })
            .map_err(|source| crate::BrokerError::Bind { addr, source })
    };
    let mut listeners = vec![Listener::Tcp(bind(config.mqtt_listen)?)];
    if let Some(tls) = &config.tls {
        let acceptor =
            TlsAcceptor::from_config(tls).map_err(|e| crate::BrokerError::Config(e.to_string()))?;
        listeners.push(Listener::Tls(bind(config.mqtts_listen)?, acceptor));
    }
    if let Some(ws) = config.ws_listen {
        listeners.push(Listener::WebSocket(bind(ws)?, config.ws_path.clone()));
    }
    Ok(listeners)
}
