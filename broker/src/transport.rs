//! Device transports: the byte streams an MQTT connection can run over.
//!
//! - Plain TCP needs nothing from here: a `TcpStream` is already a
//!   [`DeviceIo`].
//! - TLS: [`TlsAcceptor`] loads the certificate, key and (optionally) client
//!   CA once, then performs server handshakes. With a client CA, devices may
//!   authenticate with a certificate (mutual TLS) and [`TlsAcceptor::accept`]
//!   returns the subject Common Name of the verified certificate; devices
//!   without a certificate are still accepted (they log in with a password).
//! - WebSocket: [`accept_websocket`] performs the HTTP upgrade for MQTT over
//!   WebSocket and returns a byte stream whose bytes travel in binary frames.
//!
//! Neither handshake has a deadline of its own: callers wrap them in
//! `tokio::time::timeout` so that a silent peer cannot hold a task forever.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_tungstenite::tokio::TokioAdapter;
use async_tungstenite::tungstenite;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::http::{HeaderValue, StatusCode, header};
use tungstenite::protocol::WebSocketConfig;
use ws_stream_tungstenite::WsStream;

/// Any byte stream a device connection can run over (TCP, TLS, WebSocket).
pub trait DeviceIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> DeviceIo for T {}

/// A device connection's byte stream, whatever the transport.
pub type DeviceStream = Box<dyn DeviceIo>;

/// TLS settings of a listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM server certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificate(s). When set, clients MAY present a certificate signed by it (mutual TLS);
    /// clients without a certificate are still accepted (they authenticate with a password).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// Errors of loading TLS material and of the TLS and WebSocket handshakes.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A TLS file (`what` is the setting: `cert_file`, `key_file` or
    /// `client_ca_file`) cannot be read or does not hold what it should.
    #[error("TLS {what} {}: {message}", path.display())]
    Config {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    /// The TLS handshake failed (bad client certificate, protocol error,
    /// connection closed, ...).
    #[error("TLS handshake failed: {source}")]
    TlsHandshake { source: io::Error },
    /// A WebSocket upgrade asked for another path than the served one; the
    /// client was answered 404 Not Found.
    #[error("WebSocket request for path {requested:?} refused (only {expected:?} is served)")]
    WebSocketPath { requested: String, expected: String },
    /// The WebSocket (HTTP upgrade) handshake failed.
    #[error("WebSocket handshake failed: {source}")]
    WebSocketHandshake { source: Box<tungstenite::Error> },
}

fn config_error(what: &'static str, path: &Path, message: impl Into<String>) -> TransportError {
    TransportError::Config {
        what,
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|e| config_error(what, path, format!("cannot read the file: {e}")))
}

/// All certificates of a PEM file; an error when it holds none.
fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let pem = read_file(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| config_error(what, path, format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(config_error(
            what,
            path,
            "no certificate found (expected a PEM \"CERTIFICATE\" section)",
        ));
    }
    Ok(certs)
}

/// The first private key of a PEM file.
fn load_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    let pem = read_file(what, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => config_error(
            what,
            path,
            "no private key found (expected an unencrypted PEM \"PRIVATE KEY\", \
             \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\" section)",
        ),
        other => config_error(what, path, format!("invalid PEM: {other}")),
    })
}

/// Warns (does not fail) when the server certificate is outside its validity
/// period: devices will reject it, but the operator may be about to replace it.
fn warn_if_not_valid_now(cert: &CertificateDer<'_>, path: &Path) {
    if let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref())
        && !parsed.validity().is_valid()
    {
        tracing::warn!(
            cert_file = %path.display(),
            not_before = %parsed.validity().not_before,
            not_after = %parsed.validity().not_after,
            "the TLS server certificate is not valid at this time; clients will reject it"
        );
    }
}

/// The subject Common Name of a DER X.509 certificate.
///
/// `None` when the certificate cannot be parsed, has no CN, has several CN
/// attributes (ambiguous as an identity), or the CN is not a string type.
pub fn client_cert_common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names = cert.subject().iter_common_name();
    let first = names.next()?;
    if names.next().is_some() {
        return None;
    }
    first.as_str().ok().map(str::to_owned)
}

/// Server side of TLS for device listeners. Cheap to clone.
#[derive(Clone)]
pub struct TlsAcceptor {
    inner: tokio_rustls::TlsAcceptor,
    client_auth: bool,
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    /// Loads and checks the files once at start; a bad file is a clear error naming it.
    pub fn from_config(config: &TlsConfig) -> Result<Self, TransportError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let certs = load_certs("cert_file", &config.cert_file)?;
        warn_if_not_valid_now(&certs[0], &config.cert_file);
        let key = load_key("key_file", &config.key_file)?;
        provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| {
                config_error(
                    "key_file",
                    &config.key_file,
                    format!("unusable private key: {e}"),
                )
            })?;

        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| {
                // Only possible if the ring provider lacked every safe protocol version.
                config_error(
                    "cert_file",
                    &config.cert_file,
                    format!("TLS setup failed: {e}"),
                )
            })?;

        let builder = match &config.client_ca_file {
            Some(ca_path) => {
                let roots = load_client_roots(ca_path)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| {
                            config_error(
                                "client_ca_file",
                                ca_path,
                                format!("cannot verify clients with it: {e}"),
                            )
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };

        let server_config = builder.with_single_cert(certs, key).map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => config_error(
                "key_file",
                &config.key_file,
                format!(
                    "the private key does not match the certificate in {}",
                    config.cert_file.display()
                ),
            ),
            other => config_error(
                "cert_file",
                &config.cert_file,
                format!("unusable certificate: {other}"),
            ),
        })?;

        Ok(Self {
            inner: tokio_rustls::TlsAcceptor::from(Arc::new(server_config)),
            client_auth: config.client_ca_file.is_some(),
        })
    }

    /// Whether clients may authenticate with a certificate (a client CA is configured).
    pub fn client_auth(&self) -> bool {
        self.client_auth
    }

    /// TLS handshake. Returns the stream and, when the client presented a certificate that verified against
    /// client_ca_file, the subject Common Name of its end-entity certificate (None otherwise, or if the cert has no CN).
    pub async fn accept<S>(
        &self,
        stream: S,
    ) -> Result<(DeviceStream, Option<String>), TransportError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let tls = self
            .inner
            .accept(stream)
            .await
            .map_err(|source| TransportError::TlsHandshake { source })?;
        // The verifier has already checked any presented chain against the
        // client CA (a bad one fails the handshake), so a certificate here is
        // a verified one. Without a client CA no certificate is requested.
        let common_name = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|end_entity| client_cert_common_name(end_entity.as_ref()));
        Ok((Box::new(tls), common_name))
    }
}

fn load_client_roots(path: &Path) -> Result<RootCertStore, TransportError> {
    let mut roots = RootCertStore::empty();
    for (index, cert) in load_certs("client_ca_file", path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            config_error(
                "client_ca_file",
                path,
                format!(
                    "certificate #{} is not a usable CA certificate: {e}",
                    index + 1
                ),
            )
        })?;
    }
    Ok(roots)
}

/// The MQTT WebSocket subprotocols we answer, as the client spelled the first
/// one it offered (in its order of preference).
fn choose_subprotocol(request: &Request) -> Option<HeaderValue> {
    request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|list| list.split(','))
        .map(str::trim)
        .find(|offered| {
            offered.eq_ignore_ascii_case("mqtt") || offered.eq_ignore_ascii_case("mqttv3.1")
        })
        .and_then(|offered| HeaderValue::from_str(offered).ok())
}

/// WebSocket server handshake for MQTT over WebSocket: the request path must equal `path` (else reply 404 and error);
/// if the client offers the `mqtt` subprotocol (or `mqttv3.1`), answer with it in Sec-WebSocket-Protocol (MQTT clients
/// like paho and mqtt.js require that). Returns a byte stream: MQTT bytes travel in binary frames.
///
/// `max_message_bytes` bounds both an incoming WebSocket message (and frame)
/// and every outgoing message: a larger write is sent as several messages,
/// which MQTT over WebSocket allows. A text message from the client ends the
/// stream with an error.
pub async fn accept_websocket<S>(
    stream: S,
    path: &str,
    max_message_bytes: usize,
) -> Result<DeviceStream, TransportError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let max_message_bytes = max_message_bytes.max(1);
    let mut refused_path: Option<String> = None;
    // The error type is tungstenite's, not ours to shrink.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        let requested = request.uri().path();
        if requested != path {
            refused_path = Some(requested.to_owned());
            let mut not_found = ErrorResponse::new(Some("Not Found".to_owned()));
            *not_found.status_mut() = StatusCode::NOT_FOUND;
            return Err(not_found);
        }
        if let Some(protocol) = choose_subprotocol(request) {
            response
                .headers_mut()
                .insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
        }
        Ok(response)
    };

    let config = WebSocketConfig {
        max_message_size: Some(max_message_bytes),
        max_frame_size: Some(max_message_bytes),
        ..WebSocketConfig::default()
    };

    let result =
        async_tungstenite::tokio::accept_hdr_async_with_config(stream, callback, Some(config))
            .await;
    match result {
        Ok(socket) => Ok(Box::new(WsByteStream {
            inner: WsStream::new(socket),
            max_write: max_message_bytes,
        })),
        Err(source) => match refused_path {
            Some(requested) => {
                tracing::debug!(
                    requested,
                    expected = path,
                    "WebSocket request for an unserved path"
                );
                Err(TransportError::WebSocketPath {
                    requested,
                    expected: path.to_owned(),
                })
            }
            None => Err(TransportError::WebSocketHandshake {
                source: Box::new(source),
            }),
        },
    }
}

/// The WebSocket byte stream: `WsStream`'s tokio implementation, with every
/// write capped at the message limit (its tokio `poll_write` would otherwise
/// send the whole buffer as one message, however large).
struct WsByteStream<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    inner: WsStream<TokioAdapter<S>>,
    max_write: usize,
}

impl<S> AsyncRead for WsByteStream<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        AsyncRead::poll_read(Pin::new(&mut self.inner), cx, buf)
    }
}

impl<S> AsyncWrite for WsByteStream<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            // Would otherwise go out as an empty binary message.
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(self.max_write);
        AsyncWrite::poll_write(Pin::new(&mut self.inner), cx, &buf[..n])
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.inner), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.inner), cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::timeout;
    use tungstenite::Message;
    use tungstenite::client::IntoClientRequest;

    /// Hang guard only: every step below completes in milliseconds.
    const GUARD: Duration = Duration::from_secs(20);

    struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    fn make_ca(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn make_leaf(
        ca: &Ca,
        sans: Vec<String>,
        cn: Option<&str>,
        eku: ExtendedKeyUsagePurpose,
    ) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        // rcgen's default subject has a CN of its own.
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![eku];
        let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
        (cert, key)
    }

    /// CA, server certificate for localhost / 127.0.0.1, and the client side.
    struct Pki {
        dir: tempfile::TempDir,
        ca: Ca,
        config: TlsConfig,
    }

    impl Pki {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let ca = make_ca("Sluice test CA");
            let (server_cert, server_key) = make_leaf(
                &ca,
                vec!["localhost".into(), "127.0.0.1".into()],
                Some("sluice-test-server"),
                ExtendedKeyUsagePurpose::ServerAuth,
            );
            let cert_file = dir.path().join("server.pem");
            let key_file = dir.path().join("server.key");
            let client_ca_file = dir.path().join("client-ca.pem");
            std::fs::write(&cert_file, server_cert.pem()).unwrap();
            std::fs::write(&key_file, server_key.serialize_pem()).unwrap();
            std::fs::write(&client_ca_file, ca.cert.pem()).unwrap();
            let config = TlsConfig {
                cert_file,
                key_file,
                client_ca_file: Some(client_ca_file),
            };
            Pki { dir, ca, config }
        }

        fn client_config(&self, client: Option<(&Ca, &str)>) -> rustls::ClientConfig {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca.cert.der().clone()).unwrap();
            let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
            match client {
                None => builder.with_no_client_auth(),
                Some((issuer, cn)) => {
                    let (cert, key) = make_leaf(
                        issuer,
                        vec![],
                        Some(cn),
                        ExtendedKeyUsagePurpose::ClientAuth,
                    );
                    let key = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
                    builder
                        .with_client_auth_cert(vec![cert.der().clone()], key)
                        .unwrap()
                }
            }
        }
    }

    type ServerResult = Result<(DeviceStream, Option<String>), TransportError>;

    /// Accepts one TCP connection and runs the TLS handshake on it.
    async fn serve_one(acceptor: TlsAcceptor) -> (u16, tokio::task::JoinHandle<ServerResult>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(tcp).await
        });
        (port, task)
    }

    async fn connect_tls(
        port: u16,
        config: rustls::ClientConfig,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
    }

    /// Client sends "ping from device", server answers "pong from server".
    async fn round_trip(
        client: &mut tokio_rustls::client::TlsStream<TcpStream>,
        server: &mut DeviceStream,
    ) {
        client.write_all(b"ping from device").await.unwrap();
        client.flush().await.unwrap();
        let mut buf = [0u8; 16];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping from device");

        server.write_all(b"pong from server").await.unwrap();
        server.flush().await.unwrap();
        let mut buf = [0u8; 16];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong from server");
    }

    #[tokio::test]
    async fn tls_client_certificate_yields_common_name() {
        timeout(GUARD, async {
            let pki = Pki::new();
            let acceptor = TlsAcceptor::from_config(&pki.config).unwrap();
            assert!(acceptor.client_auth());
            let (port, server) = serve_one(acceptor).await;
            let mut client = connect_tls(port, pki.client_config(Some((&pki.ca, "dev-1"))))
                .await
                .unwrap();
            let (mut stream, cn) = server.await.unwrap().unwrap();
            assert_eq!(cn.as_deref(), Some("dev-1"));
            round_trip(&mut client, &mut stream).await;
        })
        .await
        .expect("test hung");
    }

    #[tokio::test]
    async fn tls_client_without_certificate_is_accepted() {
        timeout(GUARD, async {
            let pki = Pki::new();
            let acceptor = TlsAcceptor::from_config(&pki.config).unwrap();
            let (port, server) = serve_one(acceptor).await;
            let mut client = connect_tls(port, pki.client_config(None)).await.unwrap();
            let (mut stream, cn) = server.await.unwrap().unwrap();
            assert_eq!(cn, None);
            round_trip(&mut client, &mut stream).await;
        })
        .await
        .expect("test hung");
    }

    #[tokio::test]
    async fn tls_without_client_ca_ignores_client_certificates() {
        timeout(GUARD, async {
            let pki = Pki::new();
            let config = TlsConfig {
                client_ca_file: None,
                ..pki.config.clone()
            };
            let acceptor = TlsAcceptor::from_config(&config).unwrap();
            assert!(!acceptor.client_auth());
            let (port, server) = serve_one(acceptor).await;
            // The server does not ask, so the client does not send its certificate.
            let mut client = connect_tls(port, pki.client_config(Some((&pki.ca, "dev-1"))))
                .await
                .unwrap();
            let (mut stream, cn) = server.await.unwrap().unwrap();
            assert_eq!(cn, None);
            round_trip(&mut client, &mut stream).await;
        })
        .await
        .expect("test hung");
    }

    #[tokio::test]
    async fn tls_client_certificate_from_other_ca_is_refused() {
        timeout(GUARD, async {
            let pki = Pki::new();
            let acceptor = TlsAcceptor::from_config(&pki.config).unwrap();
            let (port, server) = serve_one(acceptor).await;
            let rogue_ca = make_ca("Rogue CA");
            let client_config = pki.client_config(Some((&rogue_ca, "dev-1")));

            let client = async {
                // With TLS 1.3 the client finishes its side of the handshake
                // before the server has judged its certificate; the refusal
                // arrives as an alert on the first read.
                let mut tls = connect_tls(port, client_config).await?;
                tls.write_all(b"x").await?;
                tls.flush().await?;
                let mut buf = [0u8; 1];
                match tls.read(&mut buf).await? {
                    0 => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed")),
                    _ => Ok(()),
                }
            };
            let client_result: io::Result<()> = client.await;
            assert!(client_result.is_err(), "client should see a failure");

            match server.await.unwrap() {
                Err(TransportError::TlsHandshake { source }) => {
                    let text = source.to_string();
                    assert!(
                        text.contains("certificate") || text.contains("issuer"),
                        "unexpected handshake error: {text}"
                    );
                }
                Err(other) => panic!("unexpected error: {other}"),
                Ok(_) => panic!("server accepted a certificate from another CA"),
            }
        })
        .await
        .expect("test hung");
    }

    #[test]
    fn config_errors_name_the_file() {
        let pki = Pki::new();

        let missing = pki.dir.path().join("missing.pem");
        let config = TlsConfig {
            cert_file: missing.clone(),
            ..pki.config.clone()
        };
        let err = TlsAcceptor::from_config(&config).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, TransportError::Config { what: "cert_file", path, .. } if *path == missing),
            "{text}"
        );
        assert!(
            text.contains("missing.pem") && text.contains("cannot read"),
            "{text}"
        );

        // A key file that holds only a certificate.
        let config = TlsConfig {
            key_file: pki.config.cert_file.clone(),
            ..pki.config.clone()
        };
        let err = TlsAcceptor::from_config(&config).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(
                &err,
                TransportError::Config {
                    what: "key_file",
                    ..
                }
            ),
            "{text}"
        );
        assert!(
            text.contains("server.pem") && text.contains("no private key"),
            "{text}"
        );

        // A certificate file that holds only a key.
        let config = TlsConfig {
            cert_file: pki.config.key_file.clone(),
            ..pki.config.clone()
        };
        let text = TlsAcceptor::from_config(&config).unwrap_err().to_string();
        assert!(
            text.contains("cert_file") && text.contains("server.key"),
            "{text}"
        );
        assert!(text.contains("no certificate"), "{text}");

        // A missing client CA file.
        let config = TlsConfig {
            client_ca_file: Some(missing.clone()),
            ..pki.config.clone()
        };
        let text = TlsAcceptor::from_config(&config).unwrap_err().to_string();
        assert!(
            text.contains("client_ca_file") && text.contains("missing.pem"),
            "{text}"
        );

        // Broken PEM.
        let broken = pki.dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let config = TlsConfig {
            cert_file: broken,
            ..pki.config.clone()
        };
        let text = TlsAcceptor::from_config(&config).unwrap_err().to_string();
        assert!(
            text.contains("broken.pem") && text.contains("invalid PEM"),
            "{text}"
        );

        // A key that belongs to another certificate.
        let other_key = pki.dir.path().join("other.key");
        std::fs::write(&other_key, KeyPair::generate().unwrap().serialize_pem()).unwrap();
        let config = TlsConfig {
            key_file: other_key,
            ..pki.config.clone()
        };
        let text = TlsAcceptor::from_config(&config).unwrap_err().to_string();
        assert!(
            text.contains("other.key")
                && text.contains("does not match")
                && text.contains("server.pem"),
            "{text}"
        );
    }

    /// Deserializes a TLS config from string fields (serde's own map
    /// deserializer, so no format crate is needed; it cannot express options).
    fn tls_config_from(fields: &[(&str, &str)]) -> Result<TlsConfig, serde::de::value::Error> {
        use serde::de::IntoDeserializer;
        let map: std::collections::BTreeMap<String, String> = fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        TlsConfig::deserialize(map.into_deserializer())
    }

    #[test]
    fn tls_config_deserializes_strictly() {
        let config = tls_config_from(&[("cert_file", "/a.pem"), ("key_file", "/a.key")]).unwrap();
        assert_eq!(config.cert_file, PathBuf::from("/a.pem"));
        assert_eq!(config.key_file, PathBuf::from("/a.key"));
        assert_eq!(config.client_ca_file, None);
        let err = tls_config_from(&[("cert_file", "a"), ("key_file", "b"), ("ca_file", "c")])
            .unwrap_err();
        assert!(err.to_string().contains("ca_file"), "{err}");
        assert!(tls_config_from(&[("cert_file", "a")]).is_err());
    }

    #[test]
    fn common_name_of_certificates() {
        let ca = make_ca("Some CA");
        assert_eq!(
            client_cert_common_name(ca.cert.der().as_ref()).as_deref(),
            Some("Some CA")
        );
        let (cert, _) = make_leaf(
            &ca,
            vec![],
            Some("dev-42"),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        assert_eq!(
            client_cert_common_name(cert.der().as_ref()).as_deref(),
            Some("dev-42")
        );
        let (no_cn, _) = make_leaf(
            &ca,
            vec!["dev.example".into()],
            None,
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        assert_eq!(client_cert_common_name(no_cn.der().as_ref()), None);
        assert_eq!(client_cert_common_name(b"not a certificate"), None);
        assert_eq!(client_cert_common_name(&[]), None);
    }

    /// Accepts one TCP connection and runs the WebSocket handshake on it.
    async fn serve_one_ws(
        max_message_bytes: usize,
    ) -> (
        u16,
        tokio::task::JoinHandle<Result<DeviceStream, TransportError>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            accept_websocket(tcp, "/mqtt", max_message_bytes).await
        });
        (port, task)
    }

    async fn ws_client(
        port: u16,
        path: &str,
        protocols: Option<&str>,
    ) -> Result<
        (
            async_tungstenite::WebSocketStream<TokioAdapter<TcpStream>>,
            tungstenite::handshake::client::Response,
        ),
        tungstenite::Error,
    > {
        let mut request = format!("ws://127.0.0.1:{port}{path}")
            .into_client_request()
            .unwrap();
        if let Some(protocols) = protocols {
            request.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_str(protocols).unwrap(),
            );
        }
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        async_tungstenite::tokio::client_async(request, tcp).await
    }

    #[tokio::test]
    async fn websocket_carries_bytes_in_binary_messages() {
        timeout(GUARD, async {
            let (port, server) = serve_one_ws(64 * 1024).await;
            let (mut client, response) = ws_client(port, "/mqtt", Some("mqtt")).await.unwrap();
            assert_eq!(
                response
                    .headers()
                    .get(header::SEC_WEBSOCKET_PROTOCOL)
                    .unwrap(),
                "mqtt"
            );
            let mut stream = server.await.unwrap().unwrap();

            // An MQTT CONNECT-like packet split over two messages reads as one byte stream.
            client
                .send(Message::Binary(vec![0x10, 0x02]))
                .await
                .unwrap();
            client
                .send(Message::Binary(vec![0x00, 0x3c]))
                .await
                .unwrap();
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, [0x10, 0x02, 0x00, 0x3c]);

            stream.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
            stream.flush().await.unwrap();
            match client.next().await.unwrap().unwrap() {
                Message::Binary(data) => assert_eq!(data, vec![0x20, 0x02, 0x00, 0x00]),
                other => panic!("expected a binary message, got {other:?}"),
            }

            // The client closes: the device stream ends.
            client.close(None).await.unwrap();
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        })
        .await
        .expect("test hung");
    }

    #[tokio::test]
    async fn websocket_subprotocol_choice() {
        timeout(GUARD, async {
            // The client's first MQTT protocol is echoed as it spelled it.
            let (port, server) = serve_one_ws(1024).await;
            let (_client, response) = ws_client(port, "/mqtt", Some("wamp, mqttv3.1, mqtt"))
                .await
                .unwrap();
            assert_eq!(
                response
                    .headers()
                    .get(header::SEC_WEBSOCKET_PROTOCOL)
                    .unwrap(),
                "mqttv3.1"
            );
            server.await.unwrap().unwrap();

            // No subprotocol offered: accepted, none answered.
            let (port, server) = serve_one_ws(1024).await;
            let (_client, response) = ws_client(port, "/mqtt", None).await.unwrap();
            assert!(
                response
                    .headers()
                    .get(header::SEC_WEBSOCKET_PROTOCOL)
                    .is_none()
            );
            server.await.unwrap().unwrap();
        })
        .await
        .expect("test hung");
    }

    #[tokio::test]
    async fn websocket_large_writes_are_split_and_large_messages_refused() {
        timeout(GUARD, async {
            let (port, server) = serve_one_ws(1024).await;
            let (mut client, _) = ws_client(port, "/mqtt", Some("mqtt")).await.unwrap();
            let mut stream = server.await.unwrap().unwrap();

            let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
            stream.write_all(&payload).await.unwrap();
            stream.flush().await.unwrap();
            let mut received = Vec::new();
            while received.len() < payload.len() {
                match client.next().await.unwrap().unwrap() {
                    Message::Binary(data) => {
                        assert!(data.len() <= 1024, "message of {} bytes", data.len());
                        received.extend_from_slice(&data);
                    }
                    other => panic!("expected a binary message, got {other:?}"),
                }
            }
            assert_eq!(received, payload);

            // A message over the limit ends the device stream with an error.
            client.send(Message::Binary(vec![0u8; 2048])).await.unwrap();
            let mut buf = [0u8; 16];
            let outcome = stream.read(&mut buf).await;
            assert!(
                matches!(outcome, Err(_) | Ok(0)),
                "oversized message was accepted: {outcome:?}"
            );
        })
        .await
        .expect("test hung");
    }

    #[tokio::test]
    async fn websocket_other_path_is_refused_with_404() {
        timeout(GUARD, async {
            let (port, server) = serve_one_ws(1024).await;
            match ws_client(port, "/other", Some("mqtt")).await {
                Err(tungstenite::Error::Http(response)) => {
                    assert_eq!(response.status(), StatusCode::NOT_FOUND)
                }
                Err(other) => panic!("expected an HTTP 404, got {other}"),
                Ok(_) => panic!("the handshake on /other succeeded"),
            }
            match server.await.unwrap() {
                Err(TransportError::WebSocketPath {
                    requested,
                    expected,
                }) => {
                    assert_eq!(requested, "/other");
                    assert_eq!(expected, "/mqtt");
                }
                Err(other) => panic!("unexpected error: {other}"),
                Ok(_) => panic!("server accepted /other"),
            }
        })
        .await
        .expect("test hung");
    }

    #[tokio::test]
    async fn websocket_garbage_is_a_handshake_error() {
        timeout(GUARD, async {
            let (port, server) = serve_one_ws(1024).await;
            let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            tcp.write_all(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let err = server.await.unwrap().err().expect("plain HTTP accepted");
            assert!(
                matches!(err, TransportError::WebSocketHandshake { .. }),
                "unexpected error: {err}"
            );
        })
        .await
        .expect("test hung");
    }
}
