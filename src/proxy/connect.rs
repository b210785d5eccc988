//! CONNECT: a routed host is intercepted (TLS terminated with a minted leaf),
//! anything else follows `proxy.unrouted`: a blind tunnel — to an address the
//! egress policy passed — or 403.

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::clients::Client;
use super::error::ProxyError;
use super::{Proxy, Routing, mitm, tunnel};

use crate::body::{self, ProxyBody};
use crate::config::Unrouted;
use crate::metrics::TunnelKind;
use crate::routes;
use crate::server::Slot;

/// A tunnel keeps the routing table and the client it was opened with (a
/// reload changes neither for it), and its connection slot, until it closes.
pub async fn handle(
    proxy: Arc<Proxy>,
    routing: Arc<Routing>,
    client: Arc<Client>,
    request: Request<Incoming>,
    slot: Slot,
) -> Result<Response<ProxyBody>, ProxyError> {
    let authority = request
        .uri()
        .authority()
        .ok_or_else(|| ProxyError::BadRequest("CONNECT needs a host:port target".into()))?;
    let host = routes::normalize(
        authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']'),
    );
    let port = authority
        .port_u16()
        .ok_or_else(|| ProxyError::BadRequest("CONNECT needs a host:port target".into()))?;
    let upgrade = hyper::upgrade::on(request);
    let shutdown = proxy.shutdown.clone();

    // Routes match host names only, so a CONNECT to an IP address is unrouted.
    if let Some(route) = routing.table.lookup(&host) {
        shutdown.spawn(async move {
            match upgrade.await {
                Ok(upgraded) => {
                    let _open = proxy.metrics.tunnel(TunnelKind::Intercepted);
                    let io = TokioIo::new(upgraded);
                    let opened = mitm::Intercepted {
                        routing,
                        client,
                        route,
                    };
                    mitm::serve(proxy.clone(), opened, (host, port), slot, io).await;
                }
                Err(error) => tracing::debug!(%error, "CONNECT upgrade failed"),
            }
        });
        return Ok(Response::new(body::empty()));
    }
    if routing.unrouted == Unrouted::Deny {
        return Err(ProxyError::Denied(format!(
            "{host} has no route and proxy.unrouted is \"deny\""
        )));
    }
    let upstream = routing.egress.connect_tcp(&host, port).await?;
    shutdown.spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let _place = slot;
                let _open = proxy.metrics.tunnel(TunnelKind::Blind);
                let idle = proxy.limits.tunnel_idle_timeout;
                tunnel::relay(
                    TokioIo::new(upgraded),
                    upstream,
                    idle,
                    proxy.shutdown.signal(),
                )
                .await;
            }
            Err(error) => tracing::debug!(%error, "CONNECT upgrade failed"),
        }
    });
    Ok(Response::new(body::empty()))
}
