//! Sending a request upstream: to a routed host with credentials (and the 401
//! retry), or, unrouted, as a plain forward proxy would.

use std::sync::Arc;

use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::ActiveRoute;
use super::error::ProxyError;
use super::inject::{self, Injector};
use super::retry::{self, Outgoing, RequestBody};
use super::upstream::Upstream;
use crate::body::ProxyBody;
use crate::config::Route;
use crate::metrics::RouteMetrics;
use crate::tokens::{Integration, Snapshot};

/// Where a routed request goes.
#[derive(Debug, Clone)]
pub struct Target {
    pub scheme: Scheme,
    pub host: Arc<str>,
    pub port: u16,
}

impl Target {
    /// Inside an intercepted TLS tunnel: TLS to the CONNECT target.
    pub fn intercepted(host: Arc<str>, port: u16) -> Self {
        Self {
            scheme: Scheme::HTTPS,
            host,
            port,
        }
    }

    /// A plain-HTTP request to a routed host: upstream over TLS (port 443 unless
    /// the URL names another) unless the route opts out, so credentials never
    /// travel in plaintext by accident.
    pub fn plain(route: &Route, host: Arc<str>, port: Option<u16>) -> Self {
        if route.upstream_tls {
            Self {
                scheme: Scheme::HTTPS,
                host,
                port: port.filter(|&p| p != 80).unwrap_or(443),
            }
        } else {
            Self {
                scheme: Scheme::HTTP,
                host,
                port: port.unwrap_or(80),
            }
        }
    }

    /// `host`, or `host:port` when the port is not the scheme's default.
    pub fn authority(&self) -> String {
        let default = if self.scheme == Scheme::HTTPS {
            443
        } else {
            80
        };
        if self.port == default {
            self.host.to_string()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn uri(&self, path: PathAndQuery) -> Result<Uri, ProxyError> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority())
            .path_and_query(path)
            .build()
            .map_err(|e| ProxyError::BadRequest(format!("cannot build the upstream URL: {e}")))
    }
}

/// Sends `request` to `target` with the route's headers. On a 401 to a token
/// that is still current, forces one (single-flight) refresh and resends once.
pub async fn routed(
    upstream: &Upstream,
    route: &ActiveRoute,
    target: &Target,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let injector = &route.injector;
    let snapshot = current_token(injector).await?;
    let (mut parts, body) = request.into_parts();
    inject::strip_hop_by_hop(&mut parts.headers);
    // The upstream's Host comes from the target URI (RFC 9112 §3.2.2): a client's
    // Host naming another host must never travel next to the credentials.
    parts.headers.remove(http::header::HOST);
    let sent = parts.uri.path_and_query().cloned();
    let body = RequestBody::read(body).await?;
    let rendered = injector.rendered(snapshot.as_deref());
    let uri = target.uri(rendered.path(sent.as_ref())?)?;
    let mut outgoing = Outgoing::new(parts.method, uri, parts.headers, body);

    let response = timed(route, || {
        upstream.send(&mut outgoing, &rendered.headers, &route.metrics)
    })
    .await?;
    if response.status() == StatusCode::UNAUTHORIZED
        && outgoing.body.is_replayable()
        && let (Some(integration), Some(snapshot)) = (&injector.integration, &snapshot)
    {
        // Boxed: a refresh and a second send would otherwise make every
        // request's future (and each copy of it) larger.
        let resend = Resend {
            upstream,
            route,
            target,
            sent: sent.as_ref(),
        };
        return Box::pin(resend.after_401(integration, snapshot, outgoing, response)).await;
    }
    Ok(relay(response))
}

/// What resending a request after a 401 needs besides the request.
struct Resend<'a> {
    upstream: &'a Upstream,
    route: &'a ActiveRoute,
    target: &'a Target,
    /// The request target the client sent.
    sent: Option<&'a PathAndQuery>,
}

impl Resend<'_> {
    /// Forces one (single-flight) refresh of `snapshot`'s token and resends
    /// with the fresh one; rate-limited, or when the refresh failed, the client
    /// sees the API's `response`.
    async fn after_401(
        self,
        integration: &Arc<Integration>,
        snapshot: &Snapshot,
        mut outgoing: Outgoing,
        response: Response<ProxyBody>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Some(fresh) = retry::refreshed(self.route, integration, snapshot).await else {
            return Ok(relay(response));
        };
        drop(response);
        let rendered = self.route.injector.rendered(Some(&fresh));
        // A token in the query changes the URL, too.
        outgoing.uri = self.target.uri(rendered.path(self.sent)?)?;
        let again = timed(self.route, || {
            self.upstream
                .send(&mut outgoing, &rendered.headers, &self.route.metrics)
        });
        Ok(relay(again.await?))
    }
}

/// The route's current token (None for a route without an integration), or
/// 503 when its integration has none.
pub async fn current_token(injector: &Injector) -> Result<Option<Arc<Snapshot>>, ProxyError> {
    match &injector.integration {
        Some(integration) => {
            Ok(Some(integration.ready().await.map_err(|e| {
                ProxyError::NoToken(crate::report::chain(&e))
            })?))
        }
        None => Ok(None),
    }
}

/// An unrouted absolute-form request: forwarded as is, minus hop-by-hop headers.
pub async fn unrouted(
    upstream: &Upstream,
    metrics: &RouteMetrics,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (mut parts, body) = request.into_parts();
    inject::strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(http::header::HOST);
    let body = RequestBody::read(body).await?;
    let mut outgoing = Outgoing::new(parts.method, parts.uri, parts.headers, body);
    Ok(relay(upstream.send(&mut outgoing, &[], metrics).await?))
}

/// Records the time to the response head in the route's latency histogram.
/// Takes a closure, not a future: a future passed in would be held twice in
/// this one's state (argument and awaited value), and copied between them.
pub async fn timed<F: Future>(route: &ActiveRoute, send: impl FnOnce() -> F) -> F::Output {
    let start = Instant::now();
    let result = send().await;
    route
        .metrics
        .upstream_latency
        .observe(start.elapsed().as_secs_f64());
    result
}

pub fn relay(response: Response<ProxyBody>) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    inject::strip_hop_by_hop(&mut parts.headers);
    // Let hyper frame the body for the client's protocol.
    parts.headers.remove(http::header::TRANSFER_ENCODING);
    Response::from_parts(parts, body)
}
