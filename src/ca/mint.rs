//! Leaf certificates for intercepted hosts, minted on demand from the local CA
//! and cached as ready rustls `ServerConfig`s.
//!
//! One ECDSA P-256 key (generated at start, never written) serves every leaf:
//! minting then costs one signature, not a key generation. Entries live for a
//! day, well inside the leaves' 30-day validity, and the cache is bounded.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair, SanType,
};
use rustls::ServerConfig;
use rustls::server::{ServerSessionMemoryCache, StoresServerSessions};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tokio::time::Instant;

use super::Ca;
use crate::metrics::CertCacheMetrics;
use crate::tls;

const LEAF_VALIDITY: time::Duration = time::Duration::days(30);
const CACHE_TTL: Duration = Duration::from_secs(24 * 3600);
const CACHE_CAPACITY: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("cannot mint a certificate for {host}")]
    Sign {
        host: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot use the certificate minted for {host}")]
    Rustls {
        host: String,
        #[source]
        source: rustls::Error,
    },
}

pub struct LeafCache {
    ca: Ca,
    key: KeyPair,
    sessions: Arc<dyn StoresServerSessions>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    entries: Mutex<HashMap<String, (Instant, Arc<ServerConfig>)>>,
    counters: CertCacheMetrics,
}

impl LeafCache {
    pub fn new(ca: Ca, counters: CertCacheMetrics) -> Result<Self, MintError> {
        let host = || "leaf key".to_owned();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
            MintError::Sign {
                host: host(),
                source,
            }
        })?;
        // Shared by every host's config so TLS session resumption works across them.
        let ticketer =
            rustls::crypto::ring::Ticketer::new().map_err(|source| MintError::Rustls {
                host: host(),
                source,
            })?;
        Ok(Self {
            ca,
            key,
            sessions: ServerSessionMemoryCache::new(4096),
            ticketer,
            entries: Mutex::new(HashMap::new()),
            counters,
        })
    }

    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// The TLS server config presenting a leaf for `host` (ALPN h2, http/1.1).
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, MintError> {
        if let Some(config) = self.cached(host) {
            self.counters.hits.inc();
            return Ok(config);
        }
        self.counters.misses.inc();
        let config = Arc::new(self.mint(host)?);
        let mut entries = self.lock();
        if entries.len() >= CACHE_CAPACITY {
            // Evict the oldest: O(n) on a miss into a full cache only.
            if let Some(oldest) = entries
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone())
            {
                entries.remove(&oldest);
            }
        }
        entries.insert(host.to_owned(), (Instant::now(), config.clone()));
        Ok(config)
    }

    fn cached(&self, host: &str) -> Option<Arc<ServerConfig>> {
        let entries = self.lock();
        let (minted_at, config) = entries.get(host)?;
        (minted_at.elapsed() < CACHE_TTL).then(|| config.clone())
    }

    fn mint(&self, host: &str) -> Result<ServerConfig, MintError> {
        let sign_err = |source| MintError::Sign {
            host: host.to_owned(),
            source,
        };
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, host);
        params.distinguished_name = name;
        params.subject_alt_names = vec![match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.try_into().map_err(sign_err)?),
        }];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + LEAF_VALIDITY;
        let cert = params
            .signed_by(&self.key, &self.ca.issuer)
            .map_err(sign_err)?;

        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(tls::server_provider())
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_no_client_auth()
                    .with_single_cert(vec![cert.der().clone()], key)
            })
            .map_err(|source| MintError::Rustls {
                host: host.to_owned(),
                source,
            })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // Our suite order (see `tls::server_provider`), not the client's.
        config.ignore_client_order = true;
        config.session_storage = self.sessions.clone();
        config.ticketer = self.ticketer.clone();
        Ok(config)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Arc<ServerConfig>)>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::CaConfig;

    #[tokio::test]
    async fn mints_once_per_host_and_chains_to_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = super::super::load_or_create(&CaConfig {
            cert: dir.path().join("ca.pem"),
            key: dir.path().join("ca-key.pem"),
            permit: Vec::new(),
        })
        .unwrap();
        let ca_der = ca.cert_der.clone();
        let counters = CertCacheMetrics {
            hits: Default::default(),
            misses: Default::default(),
        };
        let cache = LeafCache::new(ca, counters.clone()).unwrap();
        let first = cache.server_config("api.example.test").unwrap();
        let again = cache.server_config("api.example.test").unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        let other = cache.server_config("other.example.test").unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!((counters.hits.get(), counters.misses.get()), (1, 2));

        // A client trusting only the local CA accepts the leaf for that name.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_der).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(first);
        // The task returns the stream, so it stays open until both sides finished.
        let server = tokio::spawn(async move { acceptor.accept(server_io).await });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = rustls_pki_types::ServerName::try_from("api.example.test").unwrap();
        let client = connector.connect(name, client_io).await;
        let server = server.await.unwrap();
        server.unwrap();
        client.unwrap();
    }
}
