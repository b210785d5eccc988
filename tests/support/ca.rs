//! A throwaway ECDSA P-256 certificate authority, minted per test run so that no key is
//! ever committed. Test servers (token endpoint, upstream APIs) present leaves issued here;
//! credproxy trusts the CA through `upstream.extra_ca`, test clients through `client_config`.

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::crypto::ring::default_provider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

/// Names every test server answers to: loopback plus the fake hosts tests route through
/// `upstream.resolve`.
pub const SERVER_NAMES: &[&str] = &["localhost", "oauth.test", "api.test", "127.0.0.1"];

pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

/// A leaf certificate (chain of one) and its private key.
pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

// === impl TestCa ===

impl TestCa {
    pub fn new() -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key generation");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, "credproxy test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-signing the test CA");
        Self {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA in `cert` and `key` (PEM), e.g. the one `credproxy ca init` wrote: the
    /// test can then mint leaves from it as anyone holding the key could.
    pub fn load(cert: &Path, key: &Path) -> Self {
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        };
        let cert_pem = read(cert);
        let key = KeyPair::from_pem(&read(key)).expect("a PEM private key");
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("a PEM cert");
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).expect("a CA certificate");
        Self {
            issuer,
            cert_der,
            cert_pem,
        }
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// Writes the CA certificate (never the key) as PEM, e.g. for `upstream.extra_ca`.
    pub fn write_pem(&self, path: &Path) {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
        }
        std::fs::write(path, &self.cert_pem)
            .unwrap_or_else(|e| panic!("writing test CA to {}: {e}", path.display()));
    }

    /// Issues a server leaf for `names`; entries that parse as IP addresses become IP SANs.
    pub fn issue(&self, names: &[&str]) -> Leaf {
        let (cert, key) = self.sign_leaf(names);
        Leaf {
            chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        }
    }

    /// As [`issue`](Self::issue), as PEM: the certificate and its private key, for a
    /// server configured with files (PostgreSQL's `ssl_cert_file`, `ssl_key_file`).
    pub fn issue_pem(&self, names: &[&str]) -> (String, String) {
        let (cert, key) = self.sign_leaf(names);
        (cert.pem(), key.serialize_pem())
    }

    fn sign_leaf(&self, names: &[&str]) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("leaf key");
        let sans: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(sans).expect("leaf params (bad SAN?)");
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).expect("signing leaf");
        (cert, key)
    }

    /// rustls server config for [`SERVER_NAMES`], ALPN h2 + http/1.1, ring provider only.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server_config_for(SERVER_NAMES)
    }

    pub fn server_config_for(&self, names: &[&str]) -> Arc<ServerConfig> {
        let leaf = self.issue(names);
        let mut config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_single_cert(leaf.chain, leaf.key)
            .expect("leaf key matches leaf cert");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.server_config())
    }

    /// An acceptor for `names` that offers h2 alone: an upstream the proxy must speak
    /// h2 to.
    pub fn h2_only_acceptor_for(&self, names: &[&str]) -> TlsAcceptor {
        let mut config = (*self.server_config_for(names)).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        TlsAcceptor::from(Arc::new(config))
    }

    /// A client config trusting only this CA, for tests that talk to test servers directly.
    pub fn client_config(&self) -> ClientConfig {
        client_config_trusting([self.cert_der()])
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

// === free helpers ===

/// rustls client config (ring only) whose sole roots are `roots`; e.g. credproxy's own
/// CA read with [`load_pem_certs`] to talk through its MITM.
pub fn client_config_trusting(
    roots: impl IntoIterator<Item = CertificateDer<'static>>,
) -> ClientConfig {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root).expect("adding a trust anchor");
    }
    ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(store)
        .with_no_client_auth()
}

/// Every certificate in a PEM file.
pub fn load_pem_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("parsing PEM in {}: {e}", path.display()))
}
