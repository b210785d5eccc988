//! `[upstream]`: extra trusted CAs, `resolve` pins and timeouts for every
//! outbound connection (routed, tunnelled, refresh).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;

use super::{ConfigError, Validator};
use crate::routes;

pub(super) const DEFAULT_CONNECT_TIMEOUT: &str = "10s";
pub(super) const DEFAULT_RESPONSE_TIMEOUT: &str = "60s";
/// Below the keep-alive timeouts of common servers and load balancers (nginx
/// 75 s, AWS ALB 60 s), so the pool closes an idle connection before the
/// upstream does and a request rarely races the upstream's close.
pub(super) const DEFAULT_IDLE_TIMEOUT: &str = "30s";
pub(super) const DEFAULT_MAX_CONNECTIONS_PER_HOST: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub extra_ca: Option<ExtraCa>,
    pub connect_timeout: Duration,
    /// From sending the request until the response head arrives.
    pub response_timeout: Duration,
    /// `host:port` (host lower-cased) → address, like curl's `--resolve`.
    pub resolve: HashMap<String, SocketAddr>,
    /// A pooled connection unused this long is closed.
    pub idle_timeout: Duration,
    /// Open connections to one upstream (scheme, host, port) at most.
    pub max_connections_per_host: usize,
}

impl UpstreamConfig {
    pub fn resolve(&self, host: &str, port: u16) -> Option<SocketAddr> {
        self.resolve
            .get(&format!("{}:{port}", routes::normalize(host)))
            .copied()
    }
}

/// Certificates trusted for upstream TLS in addition to the system roots.
#[derive(Clone, PartialEq)]
pub struct ExtraCa {
    pub path: PathBuf,
    pub certs: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for ExtraCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ExtraCa({}, {} certs)",
            self.path.display(),
            self.certs.len()
        )
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) extra_ca: Option<String>,
    #[serde(default)]
    pub(super) resolve: BTreeMap<String, String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) response_timeout: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) max_connections_per_host: Option<usize>,
}

// === validation ===

impl Validator<'_> {
    pub(super) fn upstream(&self, raw: RawUpstream) -> Result<UpstreamConfig, ConfigError> {
        let extra_ca = match raw.extra_ca {
            Some(file) => Some(self.extra_ca(PathBuf::from(file))?),
            None => None,
        };
        let mut resolve = HashMap::new();
        for (target, addr) in raw.resolve {
            let key = format!("upstream.resolve.\"{target}\"");
            let (host, port) = target
                .rsplit_once(':')
                .filter(|(host, _)| !host.is_empty())
                .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
                .ok_or_else(|| self.err(&key, format!("{target:?} is not \"host:port\"")))?;
            let addr = addr.parse::<SocketAddr>().map_err(|_| {
                self.err(
                    &key,
                    format!("{addr:?} is not an address like \"127.0.0.1:8443\""),
                )
            })?;
            resolve.insert(format!("{}:{port}", routes::normalize(host)), addr);
        }
        Ok(UpstreamConfig {
            extra_ca,
            resolve,
            connect_timeout: self.duration(
                "upstream.connect_timeout",
                raw.connect_timeout,
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            response_timeout: self.duration(
                "upstream.response_timeout",
                raw.response_timeout,
                DEFAULT_RESPONSE_TIMEOUT,
            )?,
            idle_timeout: self.duration(
                "upstream.idle_timeout",
                raw.idle_timeout,
                DEFAULT_IDLE_TIMEOUT,
            )?,
            max_connections_per_host: self.count(
                "upstream.max_connections_per_host",
                raw.max_connections_per_host,
                DEFAULT_MAX_CONNECTIONS_PER_HOST,
            )?,
        })
    }

    pub(super) fn extra_ca(&self, path: PathBuf) -> Result<ExtraCa, ConfigError> {
        let key = "upstream.extra_ca";
        let bytes = std::fs::read(&path)
            .map_err(|e| self.err(key, format!("cannot read {}: {e}", path.display())))?;
        let certs = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                self.err(
                    key,
                    format!("{}: not a PEM certificate file: {e}", path.display()),
                )
            })?;
        if certs.is_empty() {
            return Err(self.err(key, format!("{} holds no PEM certificate", path.display())));
        }
        Ok(ExtraCa { path, certs })
    }
}
