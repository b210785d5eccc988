//! The local certificate authority: an ECDSA P-256 CA created on first use, whose
//! certificate clients trust so credproxy can terminate their TLS. The key is
//! written with mode 0600; an existing pair is checked to belong together.
//!
//! Opt-in (`ca init --constrain`), the CA carries critical X.509 name
//! constraints (RFC 5280 §4.2.1.10) permitting only the routed domains: a
//! leaked key then cannot mint a certificate that clients trusting the CA
//! accept for any other host.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType, GeneralSubtree,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;

use crate::config::{CaConfig, Route};
use crate::routes::HostPattern;

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
    #[error(
        "{} exists; --constrain applies to a new CA only: remove it and {} first (clients must then trust the new CA)",
        cert.display(),
        key.display()
    )]
    Exists { cert: PathBuf, key: PathBuf },
}

/// A loaded CA, able to sign leaf certificates.
pub struct Ca {
    pub cert_path: PathBuf,
    pub cert_der: CertificateDer<'static>,
    pub cert_pem: String,
    pub issuer: Issuer<'static, KeyPair>,
    /// None: the CA may vouch for any name.
    pub constraints: Option<Constraints>,
}

/// The DNS subtrees a name-constrained CA permits: each is a name and all
/// its subdomains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraints {
    permitted: Vec<String>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ca({})", self.cert_path.display())
    }
}

/// Loads the CA, creating it (unconstrained) when neither file exists.
/// Returns whether it was created.
pub fn load_or_create(config: &CaConfig) -> Result<(Ca, bool), CaError> {
    init(config, None)
}

/// `ca init`: as [`load_or_create`], creating a CA limited to `constraints`
/// when given — which only a new CA can be.
pub fn init(config: &CaConfig, constraints: Option<Constraints>) -> Result<(Ca, bool), CaError> {
    match (config.cert.exists(), config.key.exists()) {
        (true, true) if constraints.is_some() => Err(CaError::Exists {
            cert: config.cert.clone(),
            key: config.key.clone(),
        }),
        (true, true) => Ok((load(config)?, false)),
        (false, false) => Ok((create(config, constraints)?, true)),
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

fn create(config: &CaConfig, constraints: Option<Constraints>) -> Result<Ca, CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
    let mut params = ca_params(CA_NAME, time::Duration::days(3650));
    params.name_constraints = constraints.as_ref().map(Constraints::extension);
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
        constraints,
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
    let constraints = match parsed.name_constraints() {
        Ok(found) => found.map(|ext| Constraints::from_x509(ext.value)),
        Err(_) => return Err(invalid(&config.cert, "has unreadable name constraints")),
    };
    let issuer = Issuer::from_ca_cert_der(&cert_der, key)
        .map_err(|_| invalid(&config.cert, "cannot be used to sign certificates"))?;
    Ok(Ca {
        cert_path: config.cert.clone(),
        cert_der,
        cert_pem,
        issuer,
        constraints,
    })
}

/// Logs a warning for each route the CA's name constraints leave out:
/// clients would reject the certificates minted for it.
pub fn warn_uncovered(ca: &Ca, routes: &[Route]) {
    let Some(constraints) = &ca.constraints else {
        return;
    };
    for route in routes.iter().filter(|r| !constraints.permits(&r.host)) {
        tracing::warn!(
            route = %route.host,
            ca = %ca.cert_path.display(),
            permitted = ?constraints.permitted,
            "this route falls outside the CA's name constraints: clients will reject the certificates minted for it (create a new CA with `credproxy ca init --constrain`, or add it to [ca] permit first)"
        );
    }
}

// === impl Constraints ===

impl Constraints {
    /// The fewest subtrees that cover `patterns`: a host covers itself,
    /// `*.example.com` is covered by `example.com`. None when there are none.
    pub fn covering<'a>(patterns: impl IntoIterator<Item = &'a HostPattern>) -> Option<Self> {
        let mut names: Vec<String> = patterns
            .into_iter()
            .map(|pattern| subtree_of(pattern).to_owned())
            .collect();
        names.sort();
        names.dedup();
        let permitted: Vec<String> = names
            .iter()
            .filter(|name| {
                !names
                    .iter()
                    .any(|other| under(name, other) && *name != other)
            })
            .cloned()
            .collect();
        (!permitted.is_empty()).then_some(Self { permitted })
    }

    /// Whether every host `pattern` matches lies inside a permitted subtree.
    pub fn permits(&self, pattern: &HostPattern) -> bool {
        let base = subtree_of(pattern);
        self.permitted.iter().any(|subtree| under(base, subtree))
    }

    pub fn permitted(&self) -> &[String] {
        &self.permitted
    }

    /// The critical extension: the permitted DNS subtrees, and every IP
    /// address excluded (routes are host names; an IP leaf is never minted).
    fn extension(&self) -> NameConstraints {
        NameConstraints {
            permitted_subtrees: self
                .permitted
                .iter()
                .map(|name| GeneralSubtree::DnsName(name.clone()))
                .collect(),
            excluded_subtrees: vec![
                GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
                GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
            ],
        }
    }

    fn from_x509(constraints: &x509_parser::extensions::NameConstraints<'_>) -> Self {
        let permitted = constraints
            .permitted_subtrees
            .iter()
            .flatten()
            .filter_map(|subtree| match subtree.base {
                x509_parser::extensions::GeneralName::DNSName(name) => {
                    Some(name.trim_start_matches('.').to_ascii_lowercase())
                }
                _ => None,
            })
            .collect();
        Self { permitted }
    }
}

/// The smallest subtree holding every host `pattern` matches.
fn subtree_of(pattern: &HostPattern) -> &str {
    match pattern {
        HostPattern::Exact(host) => host,
        HostPattern::Wildcard(suffix) => suffix.trim_start_matches('.'),
    }
}

/// Whether `name` is `subtree` or one of its subdomains.
fn under(name: &str, subtree: &str) -> bool {
    name == subtree
        || name
            .strip_suffix(subtree)
            .is_some_and(|rest| rest.ends_with('.'))
}

/// Writes the system's trusted roots plus the local CA to `ca-bundle.pem` beside
/// the CA certificate, for `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`.
pub fn write_bundle(ca: &Ca) -> Result<PathBuf, CaError> {
    let path = bundle_path(ca);
    let tmp = path.with_extension("pem.tmp");
    let write_err = |source| CaError::Write {
        path: path.clone(),
        source,
    };
    fs::write(&tmp, bundle(ca)).map_err(write_err)?;
    fs::rename(&tmp, &path).map_err(write_err)?;
    Ok(path)
}

/// Where `write_bundle` writes: `ca-bundle.pem` beside the CA certificate.
pub fn bundle_path(ca: &Ca) -> PathBuf {
    ca.cert_path
        .parent()
        .unwrap_or(Path::new("."))
        .join("ca-bundle.pem")
}

/// The system's trusted roots plus the local CA, as PEM: what a client needs to
/// trust both the APIs it reaches directly and credproxy's minted certificates.
pub fn bundle(ca: &Ca) -> String {
    let mut bundle = String::new();
    for root in crate::tls::system_roots() {
        bundle.push_str(&pem_encode(root));
    }
    bundle.push_str(&format!("# {CA_NAME}\n"));
    bundle.push_str(&ca.cert_pem);
    bundle
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
            permit: Vec::new(),
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

    mod constraints {
        use super::*;

        fn patterns(hosts: &[&str]) -> Vec<HostPattern> {
            hosts
                .iter()
                .map(|h| HostPattern::parse(h).unwrap())
                .collect()
        }

        #[test]
        fn the_fewest_subtrees_cover_the_routes() {
            let covering = Constraints::covering(&patterns(&[
                "api.example.com",
                "*.example.com",
                "upload.files.test",
                "files.test",
                "Other.test",
            ]))
            .unwrap();
            assert_eq!(
                covering.permitted(),
                ["example.com", "files.test", "other.test"]
            );
            assert_eq!(Constraints::covering(&patterns(&[])), None);
        }

        #[test]
        fn a_route_is_permitted_only_inside_a_subtree() {
            let constraints =
                Constraints::covering(&patterns(&["api.test", "*.files.test"])).unwrap();
            for inside in [
                "api.test",
                "eu.api.test",
                "*.api.test",
                "files.test",
                "a.files.test",
                "*.b.files.test",
            ] {
                assert!(constraints.permits(&patterns(&[inside])[0]), "{inside}");
            }
            for outside in ["other.test", "xapi.test", "test", "*.test", "api.test.evil"] {
                assert!(!constraints.permits(&patterns(&[outside])[0]), "{outside}");
            }
        }

        #[test]
        fn a_constrained_ca_carries_critical_constraints_and_reloads_with_them() {
            let dir = tempfile::tempdir().unwrap();
            let config = config(dir.path());
            let wanted = Constraints::covering(&patterns(&["api.test", "*.files.test"]));
            let (created, was_created) = init(&config, wanted.clone()).unwrap();
            assert!(was_created);
            assert_eq!(created.constraints, wanted);
            let (_, parsed) = x509_parser::parse_x509_certificate(&created.cert_der).unwrap();
            let extension = parsed.name_constraints().unwrap().unwrap();
            assert!(extension.critical);
            let excluded = extension.value.excluded_subtrees.as_ref().unwrap();
            assert_eq!(excluded.len(), 2, "every IPv4 and IPv6 address is excluded");

            let (loaded, _) = load_or_create(&config).unwrap();
            assert_eq!(loaded.constraints, wanted);
            // An existing CA cannot gain constraints.
            assert!(matches!(init(&config, wanted), Err(CaError::Exists { .. })));
            // The default CA has none.
            let other = tempfile::tempdir().unwrap();
            let (plain, _) = load_or_create(&super::config(other.path())).unwrap();
            assert_eq!(plain.constraints, None);
        }
    }
}
