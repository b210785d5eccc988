//! TLS set-up shared by every outbound connection: one crypto provider (ring,
//! no C tool-chain beyond gcc) and one root store = system roots + `extra_ca`.

use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;

use crate::config::UpstreamConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot set up TLS")]
    Rustls(#[from] rustls::Error),
    #[error("no trusted root certificates: the system has none and upstream.extra_ca is not set")]
    NoRoots,
}

/// The process-wide crypto provider.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The provider for intercepted client connections: AES-128-GCM suites first.
/// Most clients list AES-256-GCM first, whose SHA-384 key schedule costs a
/// measurable share of a handshake; both are equally acceptable to them.
pub fn server_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = rustls::crypto::ring::default_provider();
            provider.cipher_suites.sort_by_key(|suite| {
                !matches!(
                    suite.suite(),
                    rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                        | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                )
            });
            Arc::new(provider)
        })
        .clone()
}

/// The system's trusted roots, read once per process (the read costs milliseconds).
pub fn system_roots() -> &'static [rustls_pki_types::CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<rustls_pki_types::CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::warn!(%error, "skipping unreadable system root certificates");
        }
        found.certs
    })
}

/// The system roots plus `upstream.extra_ca`.
pub fn root_store(upstream: &UpstreamConfig) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(system_roots().iter().cloned());
    if let Some(extra) = &upstream.extra_ca {
        for cert in &extra.certs {
            roots.add(cert.clone())?;
        }
    }
    if added == 0 && upstream.extra_ca.is_none() {
        return Err(TlsError::NoRoots);
    }
    Ok(roots)
}

/// Client config for upstream APIs and token endpoints, verified against the
/// system roots plus `upstream.extra_ca`.
pub fn client_config(
    upstream: &UpstreamConfig,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(root_store(upstream)?)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}
