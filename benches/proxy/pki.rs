//! The bench's own throwaway CA (the "public" PKI of the test API and its token
//! endpoint) and the rustls configs of both sides. Ring provider only.

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};

use crate::BoxError;

/// The host name the test API answers to (routed in credproxy's config).
pub const API_HOST: &str = "api.bench.test";

pub struct BenchPki {
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
    /// The API + token endpoint: `api.bench.test` and `127.0.0.1`, ALPN h2 + http/1.1.
    pub server: Arc<ServerConfig>,
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl BenchPki {
    pub fn new() -> Result<Self, BoxError> {
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "credproxy bench CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca_pem = ca_cert.pem();
        let ca_der = ca_cert.der().clone();
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        // A name that parses as an IP address becomes an IP SAN.
        let mut leaf = CertificateParams::new(vec![API_HOST.to_owned(), "127.0.0.1".to_owned()])?;
        leaf.distinguished_name.push(DnType::CommonName, API_HOST);
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.use_authority_key_identifier_extension = true;
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;

        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf_cert.der().clone()],
                PrivatePkcs8KeyDer::from(leaf_key.serialize_der()).into(),
            )?;
        // BENCH_API_ALPN=http/1.1 makes the API refuse h2 (credproxy then pools
        // HTTP/1.1 connections upstream).
        server.alpn_protocols = match std::env::var("BENCH_API_ALPN").as_deref() {
            Ok("http/1.1" | "h1") => vec![b"http/1.1".to_vec()],
            _ => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        };
        Ok(Self {
            ca_pem,
            ca_der,
            server: Arc::new(server),
        })
    }
}

/// A client config trusting only `roots`, offering `alpn`. Session resumption
/// is rustls' default (in-memory cache), as a long-lived client has it.
pub fn client_config(
    roots: &[CertificateDer<'static>],
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, BoxError> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone())?;
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Every certificate in a PEM file (credproxy's own CA, once it created it).
pub fn load_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, BoxError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("reading {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("parsing {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()).into());
    }
    Ok(certs)
}
