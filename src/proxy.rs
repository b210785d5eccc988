//! The forward proxy: one entry point per request. It checks proxy
//! authentication (407) and the client's routes (403), then dispatches: CONNECT to `connect`, absolute-form
//! plain HTTP to `forward` (or `upgrade`, for a WebSocket or other upgrade to
//! a routed host). Everything else is a 400.
//!
//! What a reload may change (routes, credentials, proxy settings, upstream
//! trust) lives in one `Routing`, swapped whole; each request and each tunnel
//! keeps the `Routing` it started with until it finishes.

pub mod access_log;
mod clients;
mod connect;
pub mod dial;
pub mod error;
mod forward;
mod inject;
mod mitm;
mod observe;
mod park;
mod prefixed;
mod retry;
pub mod sidecar;
mod tunnel;
mod upgrade;
pub mod upstream;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::uri::Scheme;
use http::{Method, Request, Response, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use clients::{Client, Clients};
use dial::{Dialer, Resolve};
use error::ProxyError;
use forward::Target;
use inject::Injector;
pub use observe::Observed;
use prefixed::Prefixed;
use upstream::Upstream;

use crate::body::ProxyBody;
use crate::ca::{self, mint::LeafCache};
use crate::config::{Config, Limits, Route, Unrouted, UpstreamConfig};
use crate::egress::Policy;
use crate::metrics::{self, Metrics, RouteMetrics};
use crate::routes::{self, RouteTable};
use crate::server::{Shutdown, Slot};
use crate::tls::TlsError;
use crate::tokens::Tokens;

pub struct Proxy {
    routing: ArcSwap<Routing>,
    leaves: LeafCache,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
    limits: Limits,
    resolver: Arc<dyn Resolve>,
}

/// Everything a reload replaces.
pub struct Routing {
    table: RouteTable,
    routes: Vec<ActiveRoute>,
    unrouted: Unrouted,
    /// Upstream retries of requests without a route.
    unrouted_metrics: RouteMetrics,
    /// The route shown in logs for requests without one.
    unrouted_name: Arc<str>,
    clients: Clients,
    /// Routed requests.
    upstream: Arc<Upstream>,
    /// Unrouted requests and tunnels: `proxy.allow` and `proxy.block` apply.
    /// A pool of its own, so no connection opened for a route (exempt) is
    /// ever reused for unrouted traffic.
    egress: Arc<Upstream>,
    /// Dedicated HTTP/1.1 connections for upgrades.
    upgrades: upgrade::Dialer,
    upstream_config: UpstreamConfig,
    policy: Policy,
}

/// A route at run time: its config, its credentials and its counters.
pub struct ActiveRoute {
    pub config: Route,
    /// The route's host pattern, for logs and metric labels.
    pub name: Arc<str>,
    injector: Injector,
    metrics: RouteMetrics,
}

impl Routing {
    /// Builds the table for `config`; keeps `previous`'s upstream pool when the
    /// upstream settings did not change.
    fn new(
        config: &Config,
        tokens: &Tokens,
        metrics: &Metrics,
        resolver: &Arc<dyn Resolve>,
        previous: Option<&Routing>,
    ) -> Result<Self, TlsError> {
        let same_upstream = previous.filter(|p| p.upstream_config == config.upstream);
        let upstream = match same_upstream {
            Some(previous) => previous.upstream.clone(),
            None => {
                let dialer = Dialer::new(&config.upstream, resolver.clone(), None);
                Arc::new(Upstream::new(&config.upstream, dialer)?)
            }
        };
        // Connections checked under another policy are not reused.
        let egress = match same_upstream.filter(|p| p.policy == config.proxy.egress) {
            Some(previous) => previous.egress.clone(),
            None => {
                let policy = Arc::new(config.proxy.egress.clone());
                let dialer = Dialer::new(&config.upstream, resolver.clone(), Some(policy));
                Arc::new(Upstream::new(&config.upstream, dialer)?)
            }
        };
        let routes = config
            .routes
            .iter()
            .map(|route| {
                let name: Arc<str> = route.host.to_string().into();
                let integration = route
                    .integration
                    .as_deref()
                    .and_then(|n| tokens.get(n))
                    .cloned();
                ActiveRoute {
                    config: route.clone(),
                    injector: Injector::new(route, integration),
                    metrics: metrics.route(&name),
                    name,
                }
            })
            .collect();
        Ok(Self {
            table: RouteTable::new(config.routes.iter().map(|r| &r.host)),
            routes,
            unrouted: config.proxy.unrouted,
            unrouted_metrics: metrics.route(metrics::UNROUTED),
            unrouted_name: Arc::from("-"),
            clients: Clients::new(&config.proxy.clients, &config.routes, metrics),
            upstream,
            egress,
            upgrades: upgrade::Dialer::new(&config.upstream)?,
            upstream_config: config.upstream.clone(),
            policy: config.proxy.egress.clone(),
        })
    }

    /// The route for `host` (normalized) and its index.
    fn lookup(&self, host: &str) -> Option<(usize, &ActiveRoute)> {
        self.table
            .lookup(host)
            .map(|index| (index, &self.routes[index]))
    }
}

impl Proxy {
    /// `resolver` answers every name lookup upstream (tests inject their own).
    pub fn new(
        config: &Config,
        tokens: &Tokens,
        leaves: LeafCache,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
        resolver: Arc<dyn Resolve>,
    ) -> Result<Self, TlsError> {
        let routing = Routing::new(config, tokens, &metrics, &resolver, None)?;
        ca::warn_uncovered(leaves.ca(), &config.routes);
        Ok(Self {
            routing: ArcSwap::from_pointee(routing),
            leaves,
            shutdown,
            metrics,
            limits: config.limits.clone(),
            resolver,
        })
    }

    /// Swaps in the routes and settings of `config`; requests in flight, and
    /// open tunnels, finish on the table (and permissions) they started with.
    pub fn reload(&self, config: &Config, tokens: &Tokens) -> Result<(), TlsError> {
        let previous = self.routing.load();
        let routing = Routing::new(
            config,
            tokens,
            &self.metrics,
            &self.resolver,
            Some(&previous),
        )?;
        self.routing.store(Arc::new(routing));
        ca::warn_uncovered(self.leaves.ca(), &config.routes);
        Ok(())
    }

    /// The routes in effect: each one's name (its host pattern, also its metrics
    /// label) and integration, for the status page.
    pub fn routes(&self) -> Vec<(Arc<str>, Option<String>)> {
        self.routing
            .load()
            .routes
            .iter()
            .map(|route| (route.name.clone(), route.config.integration.clone()))
            .collect()
    }

    /// Serves one client connection (HTTP/1.1, with CONNECT upgrades). A
    /// tunnel keeps the connection's `slot` until it closes.
    pub async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        slot: Slot,
    ) {
        let proxy = self.clone();
        let service = answering(move |request| {
            let (proxy, slot) = (proxy.clone(), slot.clone());
            async move { proxy.handle(request, peer, slot).await }
        });
        let io = Prefixed::new(Bytes::new(), stream);
        if let Err(error) = self.serve_http1(io, service).await {
            tracing::debug!(%peer, %error, "client connection closed with an error");
        }
    }

    /// Serves HTTP/1.1 on a client connection (see `park`).
    async fn serve_http1<I, S>(&self, io: Prefixed<I>, service: S) -> Result<(), hyper::Error>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::Service<
                Request<Incoming>,
                Response = Response<Observed>,
                Error = Infallible,
                Future = Answer,
            > + Unpin
            + Send
            + 'static,
    {
        park::serve(
            io,
            service,
            &self.limits,
            self.shutdown.signal(),
            &self.metrics.idle_client_connections,
        )
        .await
    }

    async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
        slot: Slot,
    ) -> Response<Observed> {
        let start = Instant::now();
        let routing = self.routing.load_full();
        let method = request.method().clone();
        let host = request
            .uri()
            .host()
            .map(routes::normalize)
            .unwrap_or_default();
        let found = routing.lookup(&host);
        let (index, route) = (found.map(|(i, _)| i), found.map(|(_, r)| r));
        let (client, result) = match routing.clients.authenticate(request.headers()) {
            Ok(client) => {
                let allowed = match index {
                    Some(index) => client.check_route(index, &host),
                    None => Ok(()),
                };
                let result = match allowed {
                    Ok(()) => self.dispatch(&routing, &client, route, request, slot).await,
                    Err(error) => Err(error),
                };
                (client, result)
            }
            Err(error) => (routing.clients.anonymous().clone(), Err(error)),
        };
        let response = result.unwrap_or_else(ProxyError::into_response);
        // A CONNECT opens a tunnel (counted as one); the requests inside count.
        if method != Method::CONNECT {
            client.record(index, response.status());
        }
        let name = route.map_or(&routing.unrouted_name, |route| &route.name);
        let line = observe::Line::new(
            method,
            host.into(),
            name.clone(),
            client.name.clone(),
            start,
            Some(peer),
        );
        Observed::new(response, line)
    }

    async fn dispatch(
        self: &Arc<Self>,
        routing: &Arc<Routing>,
        client: &Arc<Client>,
        route: Option<&ActiveRoute>,
        request: Request<Incoming>,
        slot: Slot,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if request.method() == Method::CONNECT {
            let (proxy, routing, client) = (self.clone(), routing.clone(), client.clone());
            return connect::handle(proxy, routing, client, request, slot).await;
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
        match route {
            Some(route) => {
                let target = Target::plain(
                    &route.config,
                    routes::normalize(host).into(),
                    uri.port_u16(),
                );
                self.routed(routing, route, &target, request, slot).await
            }
            None if routing.unrouted == Unrouted::Deny => Err(ProxyError::Denied(format!(
                "{} has no route and proxy.unrouted is \"deny\"",
                routes::normalize(host)
            ))),
            None => forward::unrouted(&routing.egress, &routing.unrouted_metrics, request).await,
        }
    }

    /// A request to a routed host: an upgrade goes over its own connection and
    /// becomes a tunnel holding `slot`; anything else is forwarded.
    async fn routed(
        &self,
        routing: &Routing,
        route: &ActiveRoute,
        target: &Target,
        request: Request<Incoming>,
        slot: Slot,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        match upgrade::asked(&request) {
            // Boxed, so the (far larger) upgrade future does not size every request's.
            Some(asked) => {
                Box::pin(upgrade::routed(
                    self, routing, slot, route, target, request, asked,
                ))
                .await
            }
            None => forward::routed(&routing.upstream, route, target, request).await,
        }
    }

    /// A request inside an intercepted tunnel to `host:port`, on the routing
    /// table and with the client the tunnel was opened with.
    async fn intercepted(
        &self,
        routing: &Routing,
        client: &Client,
        index: usize,
        tunnel: &mitm::Tunnel,
        request: Request<Incoming>,
    ) -> Response<Observed> {
        let start = Instant::now();
        let method = request.method().clone();
        let route = &routing.routes[index];
        let result = match check_tunnel_host(&request, &tunnel.target.host, tunnel.port) {
            Ok(()) => {
                let slot = tunnel.slot.clone();
                self.routed(routing, route, &tunnel.target, request, slot)
                    .await
            }
            Err(error) => Err(error),
        };
        let response = result.unwrap_or_else(ProxyError::into_response);
        client.record(Some(index), response.status());
        // The CONNECT line named the peer.
        let line = observe::Line::new(
            method,
            tunnel.target.host.clone(),
            route.name.clone(),
            client.name.clone(),
            start,
            None,
        );
        Observed::new(response, line)
    }
}

/// The future answering one request on a client connection.
type Answer = Pin<Box<dyn Future<Output = Result<Response<Observed>, Infallible>> + Send>>;

/// A client connection's service: `handle` answers each request, its future
/// boxed. hyper keeps a slot the size of the service's future for every
/// connection, idle or not; the whole request path inline is kilobytes, a box
/// is a pointer, allocated only while a request is in flight.
fn answering<F, Fut>(
    handle: F,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Observed>,
    Error = Infallible,
    Future = Answer,
>
where
    F: Fn(Request<Incoming>) -> Fut,
    Fut: Future<Output = Response<Observed>> + Send + 'static,
{
    service_fn(move |request| -> Answer {
        let answer = handle(request);
        Box::pin(async move { Ok(answer.await) })
    })
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
