//! `[state] url`: a libpq-style `postgres://` URL, and the TLS its `sslmode`
//! asks for. tokio-postgres parses the URL; `sslmode` and `sslrootcert` are
//! taken out first because it knows only disable/prefer/require and no root
//! file, while libpq users write `verify-ca`, `verify-full` and
//! `sslrootcert=/path/ca.pem`.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::UpstreamConfig;
use crate::secret::Secret;
use crate::tls::{self, TlsError};

/// How long establishing a connection may take (TCP, TLS, authentication).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// libpq's `sslmode` values (`allow` is not offered: it prefers plaintext).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslChoice {
    Disable,
    /// libpq's default: TLS when the server offers it, no certificate check.
    Prefer,
    /// TLS, no certificate check (libpq: encryption only).
    Require,
    /// TLS, the certificate chain checked against the trusted roots.
    VerifyCa,
    /// TLS, the chain checked and the certificate issued for the host.
    VerifyFull,
}

/// A parsed database URL. The password lives only inside `config` and `text`;
/// `Display` and `Debug` show the URL without it.
#[derive(Clone)]
pub struct DatabaseUrl {
    config: tokio_postgres::Config,
    ssl: SslChoice,
    /// `sslrootcert=FILE`: the only roots `verify-ca`/`verify-full` trust (libpq's
    /// meaning); `None`: the system roots + `upstream.extra_ca`.
    roots: Option<Vec<CertificateDer<'static>>>,
    redacted: String,
    /// The URL as written, to tell whether a reload changed it.
    text: Secret,
}

impl DatabaseUrl {
    /// Parses a `postgres://` or `postgresql://` URL; the error is one sentence
    /// that never quotes the URL (it may hold a password).
    pub fn parse(text: &str) -> Result<Self, String> {
        if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
            return Err("must be a postgres:// URL (postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?sslmode=…])".into());
        }
        let (base, query) = text.split_once('?').unwrap_or((text, ""));
        let mut ssl = SslChoice::Prefer;
        let mut roots = None;
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sslrootcert", file)) => {
                    // Percent-decoded, as libpq decodes URL parameters (`+` stays).
                    let file = percent_encoding::percent_decode_str(file)
                        .decode_utf8()
                        .map_err(|_| "sslrootcert is not UTF-8 once percent-decoded")?;
                    // libpq's `system`: the system's roots, as without the parameter.
                    if file != "system" {
                        roots = Some(read_roots(Path::new(&*file))?);
                    }
                }
                Some(("sslmode", mode)) => {
                    ssl = match mode {
                        "disable" => SslChoice::Disable,
                        "prefer" => SslChoice::Prefer,
                        "require" => SslChoice::Require,
                        "verify-ca" => SslChoice::VerifyCa,
                        "verify-full" => SslChoice::VerifyFull,
                        _ => {
                            return Err(format!(
                                "sslmode {mode:?} is not one of disable, prefer, require, verify-ca, verify-full"
                            ));
                        }
                    }
                }
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e| format!("not a valid PostgreSQL URL: {e}"))?;
        let Some(user) = config.get_user().map(str::to_owned) else {
            return Err("names no user (postgres://USER@HOST/DATABASE)".into());
        };
        if config.get_hosts().is_empty() {
            return Err("names no host (postgres://USER@HOST/DATABASE)".into());
        }
        config.ssl_mode(match ssl {
            SslChoice::Disable => SslMode::Disable,
            SslChoice::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        config.connect_timeout(CONNECT_TIMEOUT);
        // A peer that vanished without closing (a partition) is noticed by
        // the kernel, not after the default two hours.
        config.keepalives_idle(Duration::from_secs(10));
        config.tcp_user_timeout(Duration::from_secs(15));
        if config.get_application_name().is_none() {
            config.application_name("credproxy");
        }
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
            .map(|(host, port)| match host {
                Host::Tcp(name) if name.contains(':') => format!("[{name}]:{port}"),
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(dir) => dir.display().to_string(),
            })
            .collect();
        let dbname = config.get_dbname().unwrap_or(&user).to_owned();
        let redacted = format!("postgres://{user}@{}/{dbname}", hosts.join(","));
        Ok(Self {
            config,
            ssl,
            roots,
            redacted,
            text: Secret::new(text),
        })
    }

    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    pub fn ssl(&self) -> SslChoice {
        self.ssl
    }

    /// The TLS connector for this URL's `sslmode`: certificates checked against
    /// the `sslrootcert` file, else the system roots plus `upstream.extra_ca`, for
    /// `verify-ca`/`verify-full`.
    pub fn tls(&self, upstream: &UpstreamConfig) -> Result<MakeRustlsConnect, TlsError> {
        let provider = tls::provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let roots = || match &self.roots {
            Some(certs) => {
                let mut roots = RootCertStore::empty();
                for cert in certs {
                    roots.add(cert.clone())?;
                }
                Ok(roots)
            }
            None => tls::root_store(upstream),
        };
        let chain = match self.ssl {
            SslChoice::VerifyFull => {
                let config = builder
                    .with_root_certificates(roots()?)
                    .with_no_client_auth();
                return Ok(MakeRustlsConnect::new(config));
            }
            SslChoice::VerifyCa => Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots()?), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?,
            ),
            SslChoice::Disable | SslChoice::Prefer | SslChoice::Require => None,
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Libpq { chain, provider }))
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }
}

/// The certificates of a `sslrootcert` PEM file; the error is one sentence naming it.
fn read_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("sslrootcert {}: cannot read: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "sslrootcert {}: not a PEM certificate file: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "sslrootcert {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

impl PartialEq for DatabaseUrl {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({}, sslmode {:?})", self.redacted, self.ssl)
    }
}

// === TLS verifier for libpq's weaker sslmodes ===

/// `sslmode=prefer|require` (no `chain`): the connection is encrypted, the
/// certificate is not checked — what libpq does. `sslmode=verify-ca`: the chain
/// must lead to a trusted root; the name on the certificate is not compared
/// with the host. Handshake signatures are verified either way.
#[derive(Debug)]
struct Libpq {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Libpq {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // webpki checks the chain first; a name mismatch means the chain was good.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn display_and_debug_hide_the_password() {
        let url = DatabaseUrl::parse(
            "postgres://credproxy:pw-SECRET@db.internal:6543/tokens?sslmode=verify-full&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(
            url.to_string(),
            "postgres://credproxy@db.internal:6543/tokens"
        );
        assert!(!format!("{url:?}").contains("pw-SECRET"));
        assert_eq!(url.ssl(), SslChoice::VerifyFull);
        assert_eq!(url.config().get_ssl_mode(), SslMode::Require);
    }

    #[test]
    fn sslrootcert_names_a_pem_file() {
        let url = DatabaseUrl::parse("postgres://app@db/app?sslrootcert=system").unwrap();
        assert!(url.roots.is_none());
        let error = DatabaseUrl::parse(
            "postgres://app:pw-SECRET@db/app?sslmode=verify-full&sslrootcert=%2Fno%2Fsuch.pem",
        )
        .unwrap_err();
        assert!(
            error.starts_with("sslrootcert /no/such.pem: cannot read: "),
            "{error}"
        );
        assert!(!error.contains("pw-SECRET"), "{error}");
    }

    #[test]
    fn defaults_follow_libpq() {
        let url = DatabaseUrl::parse("postgresql://app@127.0.0.1").unwrap();
        assert_eq!(url.to_string(), "postgres://app@127.0.0.1:5432/app");
        assert_eq!(url.ssl(), SslChoice::Prefer);
    }

    #[test]
    fn bad_urls_are_one_sentence_without_the_password() {
        for (text, expected) in [
            ("mysql://u:pw-SECRET@h/d", "must be a postgres:// URL"),
            (
                "postgres://u:pw-SECRET@h/d?sslmode=verify",
                "sslmode \"verify\"",
            ),
            ("postgres://h/d", "names no user"),
            (
                "postgres://u:pw-SECRET@h/d?bogus=1",
                "not a valid PostgreSQL URL",
            ),
        ] {
            let error = DatabaseUrl::parse(text).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
            assert!(!error.contains("pw-SECRET"), "{text}: {error}");
        }
    }
}
