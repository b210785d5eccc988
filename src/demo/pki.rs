//! The demo's upstream PKI: a throw-away CA minted in memory at start and one server
//! leaf for the demo hosts, turned into rustls server configs. Only the CA
//! certificate ever reaches the disk (for `upstream.extra_ca`); the keys die with
//! the process.

use std::sync::Arc;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use super::{API_HOST, DemoError, OAUTH_HOST};

pub const CA_NAME: &str = "credproxy demo upstream CA";

/// The CA certificate (PEM, for clients) and the leaf both demo servers present.
pub struct DemoPki {
    pub ca_pem: String,
    leaf: CertificateDer<'static>,
    leaf_key: PrivatePkcs8KeyDer<'static>,
}

impl DemoPki {
    pub fn generate() -> Result<Self, DemoError> {
        let now = OffsetDateTime::now_utc();
        // A day of slack either side of "now" keeps a skewed clock from failing the demo.
        let not_before = now - time::Duration::days(1);

        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let ca = crate::ca::ca_params(CA_NAME, time::Duration::days(30));
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut leaf = CertificateParams::new(vec![API_HOST.to_owned(), OAUTH_HOST.to_owned()])?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, API_HOST);
        leaf.distinguished_name = name;
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.not_before = not_before;
        leaf.not_after = now + time::Duration::days(7);
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;

        Ok(Self {
            ca_pem: ca_cert.pem(),
            leaf: leaf_cert.der().clone(),
            leaf_key: PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
        })
    }

    /// A server config presenting the demo leaf and offering `alpn`.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, DemoError> {
        let mut config = ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![self.leaf.clone()],
                PrivateKeyDer::Pkcs8(self.leaf_key.clone_key()),
            )?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}
