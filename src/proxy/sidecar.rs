//! Sidecar mode: a plain-HTTP reverse proxy to one upstream, for tools that
//! cannot use a proxy at all — they change their base URL to the sidecar's.
//! Requests get the same injection, 401 retry, metrics and logs as through the
//! forward proxy, from the route that matches the upstream's host.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::error::ProxyError;
use super::forward::Target;
use super::observe::{self, Observed};
use super::prefixed::Prefixed;
use super::{Proxy, answering};
use crate::config::Sidecar;
use crate::routes;
use crate::server::Slot;

/// Where one sidecar sends its requests.
pub struct Upstream {
    /// Its host is the upstream's; its port the URL's.
    target: Target,
    /// The upstream URL's path, prefixed to every request path.
    prefix: String,
}

impl Upstream {
    pub fn new(sidecar: &Sidecar) -> Self {
        let url = &sidecar.upstream;
        let host: Arc<str> = routes::normalize(url.host_str().unwrap_or_default()).into();
        let https = url.scheme() == "https";
        let target = Target {
            scheme: if https {
                http::uri::Scheme::HTTPS
            } else {
                http::uri::Scheme::HTTP
            },
            host,
            port: url
                .port_or_known_default()
                .unwrap_or(if https { 443 } else { 80 }),
        };
        Self {
            target,
            prefix: url.path().trim_end_matches('/').to_owned(),
        }
    }
}

/// Serves one client connection; an upgraded one keeps `slot` until it closes.
pub async fn serve_connection(
    proxy: Arc<Proxy>,
    upstream: Arc<Upstream>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
) {
    let service = {
        let proxy = proxy.clone();
        answering(move |request| {
            let (proxy, upstream, slot) = (proxy.clone(), upstream.clone(), slot.clone());
            async move { handle(&proxy, &upstream, request, peer, slot).await }
        })
    };
    let io = Prefixed::new(Bytes::new(), stream);
    if let Err(error) = proxy.serve_http1(io, service).await {
        tracing::debug!(%peer, %error, "sidecar connection closed with an error");
    }
}

async fn handle(
    proxy: &Proxy,
    upstream: &Upstream,
    request: Request<Incoming>,
    peer: SocketAddr,
    slot: Slot,
) -> Response<Observed> {
    let start = Instant::now();
    let routing = proxy.routing.load_full();
    let method = request.method().clone();
    // After a reload the route may be gone: never send credentials without one.
    let found = routing.lookup(&upstream.target.host);
    let (index, route) = (found.map(|(i, _)| i), found.map(|(_, r)| r));
    let result = match route {
        Some(route) => match with_prefix(request, &upstream.prefix) {
            Ok(request) => {
                proxy
                    .routed(&routing, route, &upstream.target, request, slot)
                    .await
            }
            Err(error) => Err(error),
        },
        None => Err(ProxyError::Denied(format!(
            "no route matches {} any more",
            upstream.target.host
        ))),
    };
    let response = result.unwrap_or_else(ProxyError::into_response);
    // A sidecar has no client authentication: its requests have no client name.
    let client = routing.clients.anonymous();
    let name = match route {
        Some(route) => {
            client.record(index, response.status());
            route.name.clone()
        }
        None => routing.unrouted_name.clone(),
    };
    Observed::new(
        response,
        observe::Line::new(
            method,
            upstream.target.host.clone(),
            name,
            client.name.clone(),
            start,
            Some(peer),
        ),
    )
}

/// `/files/list` on a sidecar for `https://api.example.com/2` goes to `/2/files/list`.
fn with_prefix(
    mut request: Request<Incoming>,
    prefix: &str,
) -> Result<Request<Incoming>, ProxyError> {
    if prefix.is_empty() {
        return Ok(request);
    }
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", PathAndQuery::as_str);
    let uri: Uri = format!("{prefix}{path}")
        .parse()
        .map_err(|_| ProxyError::BadRequest(format!("invalid path {path:?}")))?;
    *request.uri_mut() = uri;
    Ok(request)
}
