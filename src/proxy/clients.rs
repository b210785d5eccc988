//! Who is asking, and which routes they may use: `Proxy-Authorization: Basic`
//! checked against `[[proxy.clients]]` (or `proxy.auth`, the one-client form)
//! in constant time. A client's request counters live here, resolved once per
//! routing table, so the hot path increments atomics and allocates nothing.

use std::sync::Arc;

use base64::Engine;
use http::{HeaderMap, StatusCode, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ProxyError;
use crate::config::{ClientRoutes, ProxyClient, Route};
use crate::metrics::{self, Metrics, RequestCounters};

/// The name in logs and metrics when no client is named: no client is
/// configured, authentication failed, or the request came through a sidecar.
pub const ANONYMOUS: &str = "-";

pub struct Client {
    pub name: Arc<str>,
    /// SHA-256 of `name:password`: comparing digests takes the same time
    /// whatever was sent, and keeps no password in clear.
    digest: [u8; 32],
    /// Indexed by route.
    may_use: Vec<bool>,
    /// Indexed by route; the last one counts unrouted requests.
    counters: Vec<RequestCounters>,
}

pub struct Clients {
    configured: Vec<Arc<Client>>,
    anonymous: Arc<Client>,
}

impl Clients {
    pub fn new(config: &[ProxyClient], routes: &[Route], metrics: &Metrics) -> Self {
        let anonymous = Client::new(ANONYMOUS, &[], &ClientRoutes::All, routes, metrics);
        let configured = config
            .iter()
            .map(|c| {
                let pair = format!("{}:{}", c.name, c.password.expose());
                let client = Client::new(&c.name, pair.as_bytes(), &c.routes, routes, metrics);
                Arc::new(client)
            })
            .collect();
        Self {
            configured,
            anonymous: Arc::new(anonymous),
        }
    }

    /// The client whose credentials `headers` carry; anyone when no client is
    /// configured. A failure says nothing about which part was wrong.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Client>, ProxyError> {
        if self.configured.is_empty() {
            return Ok(self.anonymous.clone());
        }
        // The scheme is case-insensitive (RFC 9110 §11.1); the credentials are not.
        let sent = headers
            .get(header::PROXY_AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
            .and_then(|(_, credentials)| {
                base64::engine::general_purpose::STANDARD
                    .decode(credentials.trim())
                    .ok()
            })
            .ok_or(ProxyError::AuthRequired)?;
        let digest: [u8; 32] = Sha256::digest(&sent).into();
        // Every client is compared, so the time does not say which one matched.
        let mut found = None;
        for client in &self.configured {
            if bool::from(client.digest[..].ct_eq(&digest[..])) {
                found = Some(client.clone());
            }
        }
        found.ok_or(ProxyError::AuthRequired)
    }

    pub fn anonymous(&self) -> &Arc<Client> {
        &self.anonymous
    }
}

impl Client {
    fn new(
        name: &str,
        credentials: &[u8],
        grant: &ClientRoutes,
        routes: &[Route],
        metrics: &Metrics,
    ) -> Self {
        let may_use = routes
            .iter()
            .map(|route| match grant {
                ClientRoutes::All => true,
                ClientRoutes::Only(hosts) => hosts.contains(&route.host),
            })
            .collect();
        let counters = routes
            .iter()
            .map(|route| route.host.to_string())
            .chain([metrics::UNROUTED.to_owned()])
            .map(|route| metrics.requests(&route, name))
            .collect();
        Self {
            name: name.into(),
            digest: Sha256::digest(credentials).into(),
            may_use,
            counters,
        }
    }

    /// Refuses a route this client was not given, before any credential is touched.
    pub fn check_route(&self, route: usize, host: &str) -> Result<(), ProxyError> {
        if self.may_use.get(route).copied().unwrap_or(false) {
            Ok(())
        } else {
            Err(ProxyError::RouteNotAllowed(format!(
                "client {} may not use the route for {host}",
                self.name
            )))
        }
    }

    /// Counts a response to a request for `route` (None: unrouted).
    pub fn record(&self, route: Option<usize>, status: StatusCode) {
        let index = route.unwrap_or(self.counters.len() - 1);
        if let Some(counters) = self.counters.get(index) {
            counters.record(status);
        }
    }
}
