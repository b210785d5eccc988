//! CONNECT: a routed host is intercepted (TLS terminated with a minted leaf),
//! anything else follows `proxy.unrouted`: a blind tunnel or 403.

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::body::{self, ProxyBody};
use super::error::ProxyError;
use super::{Proxy, mitm, tunnel};
use crate::config::Unrouted;
use crate::routes;

pub async fn handle(
    proxy: Arc<Proxy>,
    request: Request<Incoming>,
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

    // Routes match host names only, so a CONNECT to an IP address is unrouted.
    if let Some(route) = proxy.routes.lookup(&host) {
        let upgrade = hyper::upgrade::on(request);
        let shutdown = proxy.shutdown.clone();
        shutdown.spawn(async move {
            match upgrade.await {
                Ok(upgraded) => mitm::serve(proxy, route, host, port, TokioIo::new(upgraded)).await,
                Err(error) => tracing::debug!(%error, "CONNECT upgrade failed"),
            }
        });
        return Ok(Response::new(body::empty()));
    }
    if proxy.unrouted == Unrouted::Deny {
        return Err(ProxyError::Denied(format!(
            "{host} has no route and proxy.unrouted is \"deny\""
        )));
    }
    let upstream = proxy.upstream.connect_tcp(&host, port).await?;
    let upgrade = hyper::upgrade::on(request);
    let signal = proxy.shutdown.signal();
    proxy.shutdown.spawn(async move {
        match upgrade.await {
            Ok(upgraded) => tunnel::relay(TokioIo::new(upgraded), upstream, signal).await,
            Err(error) => tracing::debug!(%error, "CONNECT upgrade failed"),
        }
    });
    Ok(Response::new(body::empty()))
}
