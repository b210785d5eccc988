//! The local certificate authority: an ECDSA P-256 CA created on first use, whose
//! certificate clients trust so credproxy can terminate their TLS. The key is
//! written with mode 0600; an existing pair is checked to belong together.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;

use crate::config::CaConfig;

pub mod mint;

pub const CA_NAME: &str = "credproxy local CA";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{}: cannot read", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: cannot write", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {detail}", path.display())]
    Invalid { path: PathBuf, detail: String },
    #[error(
        "{} exists but {} does not; restore it or remove both to create a new CA",
        present.display(),
        missing.display()
    )]
    HalfPresent { present: PathBuf, missing: PathBuf },
    #[error("cannot generate the CA")]
    Generate(#[source] rcgen::Error),
}

/// A loaded CA, able to sign leaf certificates.
pub struct Ca {
    pub cert_path: PathBuf,
    pub cert_der: CertificateDer<'static>,
    pub cert_pem: String,
    pub issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ca({})", self.cert_path.display())
    }
}

/// Loads the CA, creating it when neither file exists. Returns whether it was created.
pub fn load_or_create(config: &CaConfig) -> Result<(Ca, bool), CaError> {
    match (config.cert.exists(), config.key.exists()) {
        (true, true) => Ok((load(config)?, false)),
        (false, false) => Ok((create(config)?, true)),
        (true, false) => Err(CaError::HalfPresent {
            present: config.cert.clone(),
            missing: config.key.clone(),
        }),
        (false, true) => Err(CaError::HalfPresent {
            present: config.key.clone(),
            missing: config.cert.clone(),
        }),
    }
}

/// The parameters of a CA named `name` that signs leaves directly (path length
/// 0), valid from a day ago (slack for skewed clocks) for `validity`.
pub fn ca_params(name: &str, validity: time::Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut distinguished_name = DistinguishedName::new();
    distinguished_name.push(DnType::CommonName, name);
    distinguished_name.push(DnType::OrganizationName, "credproxy");
    params.distinguished_name = distinguished_name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + validity;
    params
}

fn create(config: &CaConfig) -> Result<Ca, CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
    let params = ca_params(CA_NAME, time::Duration::days(3650));
    let cert = params.self_signed(&key).map_err(CaError::Generate)?;

    // Key first, created exclusively with mode 0600: never readable by others,
    // not even for a moment.
    write_new(&config.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&config.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(Ca {
        cert_path: config.cert.clone(),
        cert_der: cert.der().clone(),
        cert_pem: cert.pem(),
        issuer: Issuer::new(params, key),
    })
}

fn load(config: &CaConfig) -> Result<Ca, CaError> {
    let read = |path: &Path| {
        fs::read_to_string(path).map_err(|source| CaError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let invalid = |path: &Path, detail: &str| CaError::Invalid {
        path: path.to_owned(),
        detail: detail.to_owned(),
    };
    let cert_pem = read(&config.cert)?;
    let key_pem = read(&config.key)?;
    let key =
        KeyPair::from_pem(&key_pem).map_err(|_| invalid(&config.key, "not a PEM private key"))?;
    let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|_| invalid(&config.cert, "not a PEM certificate"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
        .map_err(|_| invalid(&config.cert, "not a valid X.509 certificate"))?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(invalid(
            &config.key,
            &format!("does not match the certificate {}", config.cert.display()),
        ));
    }
    if !parsed.is_ca() {
        return Err(invalid(&config.cert, "is not a CA certificate"));
    }
    let issuer = Issuer::from_ca_cert_der(&cert_der, key)
        .map_err(|_| invalid(&config.cert, "cannot be used to sign certificates"))?;
    Ok(Ca {
        cert_path: config.cert.clone(),
        cert_der,
        cert_pem,
        issuer,
    })
}

/// Writes the system's trusted roots plus the local CA to `ca-bundle.pem` beside
/// the CA certificate, for `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`.
pub fn write_bundle(ca: &Ca) -> Result<PathBuf, CaError> {
    let path = ca
        .cert_path
        .parent()
        .unwrap_or(Path::new("."))
        .join("ca-bundle.pem");
    let mut bundle = String::new();
    for root in crate::tls::system_roots() {
        bundle.push_str(&pem_encode(root));
    }
    bundle.push_str(&format!("# {CA_NAME}\n"));
    bundle.push_str(&ca.cert_pem);
    let tmp = path.with_extension("pem.tmp");
    let write_err = |source| CaError::Write {
        path: path.clone(),
        source,
    };
    fs::write(&tmp, bundle).map_err(write_err)?;
    fs::rename(&tmp, &path).map_err(write_err)?;
    Ok(path)
}

fn pem_encode(der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let write_err = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(write_err)?;
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(write_err)?;
    file.write_all(contents).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config(dir: &Path) -> CaConfig {
        CaConfig {
            cert: dir.join("certs/ca.pem"),
            key: dir.join("certs/ca-key.pem"),
        }
    }

    #[test]
    fn creates_then_loads_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let (created, was_created) = load_or_create(&config).unwrap();
        assert!(was_created);
        let mode = fs::metadata(&config.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (loaded, was_created) = load_or_create(&config).unwrap();
        assert!(!was_created);
        assert_eq!(created.cert_der, loaded.cert_der);
        let (_, parsed) = x509_parser::parse_x509_certificate(&loaded.cert_der).unwrap();
        assert!(parsed.is_ca());
        assert!(parsed.subject().to_string().contains(CA_NAME));
    }

    #[test]
    fn mismatched_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        load_or_create(&config).unwrap();
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        fs::write(&config.key, other.serialize_pem()).unwrap();
        let err = load_or_create(&config).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
    }

    #[test]
    fn half_present_pair_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        load_or_create(&config).unwrap();
        fs::remove_file(&config.key).unwrap();
        assert!(matches!(
            load_or_create(&config),
            Err(CaError::HalfPresent { .. })
        ));
    }
}
