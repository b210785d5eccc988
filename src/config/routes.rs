//! `[[routes]]` and `[[sidecars]]`: which hosts get which credentials.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use http::HeaderName;
use reqwest::Url;
use serde::Deserialize;

use super::template::Template;
use super::{ConfigError, Validator};
use crate::routes::{self, HostPattern};

#[derive(Debug, Clone)]
pub struct Route {
    pub host: HostPattern,
    /// The integration whose token the headers carry, if any.
    pub integration: Option<String>,
    pub headers: Vec<(HeaderName, Template)>,
    /// Query parameters set on every request (for APIs that take keys in the URL).
    pub query: Vec<(String, Template)>,
    pub upstream_tls: bool,
}

#[derive(Debug, Clone)]
pub struct Sidecar {
    pub listen: SocketAddr,
    pub upstream: Url,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) host: String,
    pub(super) integration: Option<String>,
    #[serde(default)]
    pub(super) headers: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) query: BTreeMap<String, String>,
    pub(super) upstream_tls: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSidecar {
    pub(super) listen: String,
    pub(super) upstream: String,
}

// === validation ===

impl Validator<'_> {
    pub(super) fn routes(
        &self,
        raw: Vec<RawRoute>,
        integrations: &[&str],
    ) -> Result<Vec<Route>, ConfigError> {
        let routes = raw
            .into_iter()
            .enumerate()
            .map(|(index, r)| self.route(index, r, integrations))
            .collect::<Result<Vec<_>, _>>()?;
        for (index, route) in routes.iter().enumerate() {
            if routes[..index].iter().any(|r| r.host == route.host) {
                return Err(self.err(
                    format!("routes[{index}].host"),
                    format!("{} is routed twice", route.host),
                ));
            }
        }
        Ok(routes)
    }

    pub(super) fn sidecars(
        &self,
        raw: Vec<RawSidecar>,
        routes: &[Route],
    ) -> Result<Vec<Sidecar>, ConfigError> {
        let table = routes::RouteTable::new(routes.iter().map(|r| &r.host));
        raw.into_iter()
            .enumerate()
            .map(|(index, s)| self.sidecar(index, s, &table))
            .collect()
    }

    fn route(
        &self,
        index: usize,
        raw: RawRoute,
        integrations: &[&str],
    ) -> Result<Route, ConfigError> {
        let key = |field: &str| format!("routes[{index}].{field}");
        let host = HostPattern::parse(&raw.host).map_err(|m| self.err(key("host"), m))?;
        let known = |field: String, name: &str| {
            if integrations.contains(&name) {
                Ok(())
            } else {
                Err(self.err(
                    field,
                    format!("no integration named {name:?} (see [integrations.*])"),
                ))
            }
        };
        let mut headers = Vec::new();
        let mut integration = raw.integration;
        if let Some(name) = &integration {
            known(key("integration"), name)?;
            headers.push((http::header::AUTHORIZATION, Template::bearer(name)));
        }
        // A route carries one integration's token, whether in a header or the query.
        let mut template = |field: &str, text: &str| {
            let template = Template::parse(text).map_err(|m| self.err(field, m))?;
            if let Some(name) = template.integration() {
                known(field.to_owned(), name)?;
                match &integration {
                    Some(existing) if existing != name => {
                        return Err(self.err(
                            field,
                            format!("refers to {name:?} but this route uses {existing:?}; a route carries one integration's token"),
                        ));
                    }
                    _ => integration = Some(name.to_owned()),
                }
            }
            Ok(template)
        };
        for (name, text) in raw.headers {
            let field = key(&format!("headers.{name}"));
            let header = HeaderName::try_from(name.as_str())
                .map_err(|_| self.err(&field, format!("{name:?} is not a valid header name")))?;
            if is_reserved_header(&header) {
                return Err(self.err(
                    &field,
                    format!("{name} is managed by the proxy and cannot be set"),
                ));
            }
            if headers.iter().any(|(existing, _)| *existing == header) {
                return Err(self.err(
                    &field,
                    format!("{name} is set twice (the integration shorthand sets Authorization)"),
                ));
            }
            headers.push((header, template(&field, &text)?));
        }
        let mut query = Vec::new();
        for (name, text) in raw.query {
            let field = key(&format!("query.{name}"));
            if name.is_empty() {
                return Err(self.err(&field, "a query parameter needs a name"));
            }
            query.push((name, template(&field, &text)?));
        }
        if headers.is_empty() && query.is_empty() {
            return Err(self.err(
                format!("routes[{index}]"),
                "injects nothing: set `integration`, `headers` or `query`",
            ));
        }
        Ok(Route {
            host,
            integration,
            headers,
            query,
            upstream_tls: raw.upstream_tls.unwrap_or(true),
        })
    }

    fn sidecar(
        &self,
        index: usize,
        raw: RawSidecar,
        table: &routes::RouteTable,
    ) -> Result<Sidecar, ConfigError> {
        let key = |field: &str| format!("sidecars[{index}].{field}");
        let listen = self.socket_addr(&key("listen"), Some(&raw.listen), "")?;
        if !listen.ip().is_loopback() {
            // A sidecar has no client authentication: its pod's loopback is the boundary.
            return Err(self.err(
                key("listen"),
                format!("{listen} is not a loopback address; sidecars listen on loopback only"),
            ));
        }
        let upstream = self.url(&key("upstream"), &raw.upstream)?;
        let host = routes::normalize(upstream.host_str().unwrap_or_default());
        if table.lookup(&host).is_none() {
            return Err(self.err(
                key("upstream"),
                format!("no [[routes]] entry matches host {host:?}"),
            ));
        }
        Ok(Sidecar { listen, upstream })
    }
}

/// Headers that describe the connection or the message framing, never a credential.
fn is_reserved_header(name: &HeaderName) -> bool {
    use http::header::*;
    [
        HOST,
        CONTENT_LENGTH,
        TRANSFER_ENCODING,
        CONNECTION,
        UPGRADE,
        TE,
        PROXY_AUTHORIZATION,
    ]
    .contains(name)
}
