//! The forward proxy: one entry point per request. It checks proxy
//! authentication (407), then dispatches: CONNECT to `connect`, absolute-form
//! plain HTTP to `forward`. Everything else is a 400.

pub mod body;
mod connect;
pub mod error;
mod forward;
mod inject;
mod mitm;
mod prefixed;
mod retry;
mod tunnel;
pub mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use http::uri::Scheme;
use http::{Method, Request, Response, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

pub use body::ProxyBody;
use error::ProxyError;
use forward::Target;
use inject::Injector;
use upstream::Upstream;

use crate::ca::mint::LeafCache;
use crate::config::{Config, Route, Unrouted};
use crate::routes::{self, RouteTable};
use crate::server::{self, Shutdown};
use crate::tokens::Tokens;

pub struct Proxy {
    routes: RouteTable,
    route_configs: Vec<Route>,
    injectors: Vec<Injector>,
    unrouted: Unrouted,
    /// The base64 credentials clients must send with `Proxy-Authorization: Basic`.
    auth: Option<String>,
    upstream: Upstream,
    leaves: LeafCache,
    shutdown: Shutdown,
}

impl Proxy {
    pub fn new(
        config: &Config,
        tokens: &Tokens,
        upstream: Upstream,
        leaves: LeafCache,
        shutdown: Shutdown,
    ) -> Self {
        let injectors = config
            .routes
            .iter()
            .map(|route| {
                let integration = route
                    .integration
                    .as_deref()
                    .and_then(|name| tokens.get(name))
                    .cloned();
                Injector::new(route, integration)
            })
            .collect();
        let auth = config.proxy.auth.as_ref().map(|auth| {
            let pair = format!("{}:{}", auth.username, auth.password.expose());
            base64::engine::general_purpose::STANDARD.encode(pair)
        });
        Self {
            routes: RouteTable::new(config.routes.iter().map(|r| &r.host)),
            route_configs: config.routes.clone(),
            injectors,
            unrouted: config.proxy.unrouted,
            auth,
            upstream,
            leaves,
            shutdown,
        }
    }

    fn route(&self, index: usize) -> &Route {
        &self.route_configs[index]
    }

    /// Serves one client connection (HTTP/1.1, with CONNECT upgrades).
    pub async fn serve_connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let signal = self.shutdown.signal();
        let service = service_fn(move |request| {
            let proxy = self.clone();
            async move { Ok::<_, Infallible>(proxy.handle(request, peer).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(server::HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        if let Err(error) =
            server::until_shutdown(connection, signal, |c| c.graceful_shutdown()).await
        {
            tracing::debug!(%peer, %error, "client connection closed with an error");
        }
    }

    async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let method = request.method().clone();
        let host = request
            .uri()
            .host()
            .map(routes::normalize)
            .unwrap_or_default();
        let response = self
            .dispatch(request)
            .await
            .unwrap_or_else(ProxyError::into_response);
        let route = self
            .routes
            .lookup(&host)
            .map(|i| self.route(i).host.to_string());
        log_request(
            &method,
            &host,
            route.as_deref(),
            response.status(),
            start,
            Some(peer),
        );
        response
    }

    async fn dispatch(
        self: &Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.authorize(&request)?;
        if request.method() == Method::CONNECT {
            return connect::handle(self.clone(), request).await;
        }
        let uri = request.uri();
        let (Some(scheme), Some(host)) = (uri.scheme(), uri.host()) else {
            return Err(ProxyError::BadRequest(
                "not a proxy request: send an absolute URL (GET http://host/path) or CONNECT"
                    .into(),
            ));
        };
        if *scheme != Scheme::HTTP {
            return Err(ProxyError::BadRequest(format!(
                "only http:// URLs can be forwarded; use CONNECT for {scheme}://"
            )));
        }
        let host = routes::normalize(host);
        match self.routes.lookup(&host) {
            Some(index) => {
                let target = Target::plain(self.route(index), host, uri.port_u16());
                forward::routed(&self.upstream, &self.injectors[index], &target, request).await
            }
            None if self.unrouted == Unrouted::Deny => Err(ProxyError::Denied(format!(
                "{host} has no route and proxy.unrouted is \"deny\""
            ))),
            None => forward::unrouted(&self.upstream, request).await,
        }
    }

    /// A request inside an intercepted tunnel to `host:port`.
    async fn intercepted(
        &self,
        route: usize,
        host: &str,
        port: u16,
        target: &Target,
        request: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let method = request.method().clone();
        let result = match check_tunnel_host(&request, host, port) {
            Ok(()) => {
                forward::routed(&self.upstream, &self.injectors[route], target, request).await
            }
            Err(error) => Err(error),
        };
        let response = result.unwrap_or_else(ProxyError::into_response);
        let route_name = self.route(route).host.to_string();
        log_request(
            &method,
            host,
            Some(&route_name),
            response.status(),
            start,
            None,
        );
        response
    }

    fn authorize(&self, request: &Request<Incoming>) -> Result<(), ProxyError> {
        let Some(expected) = &self.auth else {
            return Ok(());
        };
        // The scheme is case-insensitive (RFC 9110 §11.1); the credentials are not.
        let credentials = request
            .headers()
            .get(header::PROXY_AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
            .map(|(_, credentials)| credentials.trim());
        match credentials {
            Some(sent) if constant_time_eq(sent.as_bytes(), expected.as_bytes()) => Ok(()),
            _ => Err(ProxyError::AuthRequired),
        }
    }
}

/// Every host a request inside a tunnel names (`:authority`/absolute-form and
/// `Host`) must be the CONNECT host: credentials are bound to it.
fn check_tunnel_host(request: &Request<Incoming>, host: &str, port: u16) -> Result<(), ProxyError> {
    let from_uri = request.uri().authority().map(|a| a.as_str());
    let from_header = request
        .headers()
        .get(header::HOST)
        .map(|v| v.to_str().unwrap_or("\u{fffd}"));
    if from_uri.is_none() && from_header.is_none() {
        return Err(ProxyError::BadRequest(
            "request without a Host header".into(),
        ));
    }
    for named in from_uri.into_iter().chain(from_header) {
        let matches = named
            .parse::<http::uri::Authority>()
            .is_ok_and(|authority| {
                routes::normalize(authority.host()) == host
                    && authority.port_u16().is_none_or(|p| p == port)
            });
        if !matches {
            return Err(ProxyError::HostMismatch(format!(
                "this tunnel is for {host}:{port}, not {named}; open a new CONNECT"
            )));
        }
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn log_request(
    method: &Method,
    host: &str,
    route: Option<&str>,
    status: http::StatusCode,
    start: Instant,
    peer: Option<SocketAddr>,
) {
    // Never the path or query: they can carry secrets.
    let latency = format_args!("{:.1}ms", start.elapsed().as_secs_f64() * 1000.0);
    let route = route.unwrap_or("-");
    let status = status.as_u16();
    match peer {
        Some(client) => tracing::info!(%method, host, route, status, %latency, %client, "request"),
        // Inside an intercepted tunnel: the CONNECT line already named the client.
        None => tracing::info!(%method, host, route, status, %latency, "request"),
    }
}
