//! MQTT over TLS: trust roots, and client certificates for mutual TLS.
//!
//! Everything is loaded and checked before the first device starts, so a
//! wrong path fails the run up front instead of as thousands of handshake
//! errors. The server verifier (with its root store) is built once and
//! shared by every device's configuration: a fleet with per-device client
//! certificates would otherwise hold one copy of the system's ~150 roots
//! per device.
//!
//! Sluice's edge takes a client certificate whose subject CN is the client
//! id, so a fleet needs one certificate per device: `{id}` in `--cert` and
//! `--key` is replaced by each device's id.

use std::path::Path;
use std::sync::{Arc, Once};

use anyhow::{Context, Result, anyhow, bail};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// The placeholder for the device id in `--cert` and `--key`.
pub const ID_PLACEHOLDER: &str = "{id}";

/// The ring provider, as the rest of the workspace uses it. Installed as
/// the process default once as well, for TLS code that does not take a
/// provider explicitly (tonic's, for an `https://` gRPC URL).
fn provider() -> Arc<CryptoProvider> {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Err means another provider was installed first; that one stays.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Paths of a client certificate chain and its key, possibly with `{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertPaths {
    pub cert: String,
    pub key: String,
}

impl ClientCertPaths {
    fn per_device(&self) -> bool {
        self.cert.contains(ID_PLACEHOLDER) || self.key.contains(ID_PLACEHOLDER)
    }
}

/// Everything a device needs to open a TLS connection.
pub struct TlsSetup {
    provider: Arc<CryptoProvider>,
    verifier: Arc<WebPkiServerVerifier>,
    client_cert: Option<ClientCertPaths>,
    /// The configuration every device shares, unless certificates are per device.
    shared: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("client_cert", &self.client_cert)
            .finish_non_exhaustive()
    }
}

impl TlsSetup {
    /// Trusts the certificates of `ca_file` (PEM), or the system's roots
    /// without it. `first_device` checks that a per-device certificate
    /// template resolves to readable files.
    pub fn load(
        ca_file: Option<&Path>,
        client_cert: Option<ClientCertPaths>,
        first_device: &str,
    ) -> Result<Self> {
        let provider = provider();
        let roots = match ca_file {
            Some(path) => roots_from_file(path)?,
            None => system_roots()?,
        };
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()
                .map_err(|e| anyhow!("cannot build the TLS server verifier: {e}"))?;
        let mut setup = TlsSetup {
            provider,
            verifier,
            client_cert,
            shared: None,
        };
        let first = setup.build(first_device)?;
        if !setup.client_cert.as_ref().is_some_and(|c| c.per_device()) {
            setup.shared = Some(first);
        }
        Ok(setup)
    }

    /// The client configuration of device `id`.
    pub fn client_config(&self, id: &str) -> Result<Arc<ClientConfig>> {
        match &self.shared {
            Some(shared) => Ok(Arc::clone(shared)),
            None => self.build(id),
        }
    }

    fn build(&self, id: &str) -> Result<Arc<ClientConfig>> {
        let builder = ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow!("TLS protocol versions: {e}"))?
            .with_webpki_verifier(Arc::clone(&self.verifier));
        let config = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some(paths) => {
                let cert_path = paths.cert.replace(ID_PLACEHOLDER, id);
                let key_path = paths.key.replace(ID_PLACEHOLDER, id);
                let chain = certificates(Path::new(&cert_path), "--cert")?;
                let key = PrivateKeyDer::from_pem_file(&key_path)
                    .map_err(|e| anyhow!("--key {key_path}: no usable private key: {e}"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| anyhow!("--cert {cert_path} with --key {key_path}: {e}"))?
            }
        };
        Ok(Arc::new(config))
    }
}

/// Every certificate in a PEM file; at least one.
fn certificates(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>> {
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow!("{flag} {}: {e}", path.display()))?;
    let certs = iter
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{flag} {}: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{flag} {}: no PEM certificate found", path.display());
    }
    Ok(certs)
}

fn roots_from_file(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path, "--ca-file")? {
        roots
            .add(cert)
            .with_context(|| format!("--ca-file {}: unusable certificate", path.display()))?;
    }
    Ok(roots)
}

/// The operating system's trust roots (rustls-native-certs, which rumqttc
/// already brings into the build).
fn system_roots() -> Result<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        bail!("--tls without --ca-file found no system trust roots{why}; pass --ca-file");
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    fn self_signed(cn: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn loads_a_ca_and_per_device_client_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = self_signed("ca");
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca).unwrap();
        for id in ["d0", "d1"] {
            let (cert, key) = self_signed(id);
            std::fs::write(dir.path().join(format!("{id}.pem")), cert).unwrap();
            std::fs::write(dir.path().join(format!("{id}.key")), key).unwrap();
        }
        let template = |ext: &str| format!("{}/{{id}}.{ext}", dir.path().display());
        let paths = ClientCertPaths {
            cert: template("pem"),
            key: template("key"),
        };
        let setup = TlsSetup::load(Some(&ca_path), Some(paths), "d0").unwrap();
        assert!(setup.shared.is_none());
        let config = setup.client_config("d1").unwrap();
        assert!(config.client_auth_cert_resolver.has_certs());
        let err = setup.client_config("d2").unwrap_err().to_string();
        assert!(err.contains("d2.pem"), "{err}");

        // Without a client certificate every device shares one configuration.
        let plain = TlsSetup::load(Some(&ca_path), None, "d0").unwrap();
        let (a, b) = (
            plain.client_config("x").unwrap(),
            plain.client_config("y").unwrap(),
        );
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let err = TlsSetup::load(Some(&not_pem), None, "d0").unwrap_err();
        assert!(format!("{err:#}").contains("no PEM certificate"), "{err:#}");
        let missing = dir.path().join("missing.pem");
        let err = TlsSetup::load(Some(&missing), None, "d0").unwrap_err();
        assert!(format!("{err:#}").contains("missing.pem"), "{err:#}");
    }
}
