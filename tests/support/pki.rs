//! A throw-away PKI for TLS tests: a CA, a server certificate for
//! localhost (what `sluice_env` points the broker at), and client
//! certificates on demand, all written under a temporary directory.

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::sync::Arc;

pub struct Pki {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
    pub dir: tempfile::TempDir,
}

impl Pki {
    /// A new CA with `ca.pem`, and `server.pem`/`server.key` for localhost.
    pub fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "sluice test CA");
        let ca = params.self_signed(&ca_key).unwrap();
        let pki = Self {
            ca,
            ca_key,
            dir: tempfile::tempdir().unwrap(),
        };
        pki.write("ca.pem", &pki.ca.pem());
        pki.issue_files("server", "localhost", ExtendedKeyUsagePurpose::ServerAuth);
        pki
    }

    /// The path of a file in the PKI's directory.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(name), text).unwrap();
    }

    /// A certificate for subject CN `cn`, valid for localhost, signed by the CA.
    pub fn issue(&self, cn: &str, usage: ExtendedKeyUsagePurpose) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        (cert, key)
    }

    /// Like [`Pki::issue`], written as `{name}.pem` and `{name}.key`.
    pub fn issue_files(&self, name: &str, cn: &str, usage: ExtendedKeyUsagePurpose) {
        let (cert, key) = self.issue(cn, usage);
        self.write(&format!("{name}.pem"), &cert.pem());
        self.write(&format!("{name}.key"), &key.serialize_pem());
    }

    /// The broker's TLS settings: this server certificate, client
    /// certificates checked against this CA.
    pub fn sluice_env(&self) -> Vec<(String, String)> {
        vec![
            (
                "SLUICE_BROKER__TLS__CERT_FILE".into(),
                self.path("server.pem"),
            ),
            (
                "SLUICE_BROKER__TLS__KEY_FILE".into(),
                self.path("server.key"),
            ),
            (
                "SLUICE_BROKER__TLS__CLIENT_CA_FILE".into(),
                self.path("ca.pem"),
            ),
        ]
    }

    /// Options of an authenticated server with its TLS listener on this PKI.
    pub fn authenticated_server(&self) -> super::Options {
        super::Options {
            env: self.sluice_env(),
            ..super::Options::authenticated()
        }
    }

    /// A client TLS configuration trusting the CA, with a client
    /// certificate for CN `client_cert_cn` if given.
    pub fn client(&self, client_cert_cn: Option<&str>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let config = match client_cert_cn {
            Some(cn) => {
                let (cert, key) = self.issue(cn, ExtendedKeyUsagePurpose::ClientAuth);
                let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
                builder
                    .with_client_auth_cert(vec![CertificateDer::from(cert.der().to_vec())], key)
                    .unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }
}
