//! Interception inside a CONNECT tunnel to a routed host: tell TLS from plain
//! HTTP by the first byte, terminate TLS with a leaf minted for the CONNECT
//! host, and serve the requests inside (HTTP/1.1 keep-alive or h2 by ALPN).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio_rustls::TlsAcceptor;

use super::clients::Client;
use super::forward::Target;
use super::prefixed::Prefixed;
use super::{Proxy, Routing};
use crate::server::{self, Slot};

/// A TLS record starts with content type 22 (handshake).
const TLS_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const H2_KEEP_ALIVE: Duration = Duration::from_secs(30);

/// The table, client and route an intercepted tunnel was opened with: every
/// request inside uses them, whatever a reload changed since.
pub struct Intercepted {
    pub routing: Arc<Routing>,
    pub client: Arc<Client>,
    /// Index into `routing.routes`.
    pub route: usize,
}

/// The CONNECT target a tunnel is bound to.
pub struct Tunnel {
    /// The CONNECT port; `target` may differ (plain HTTP goes upstream on 443).
    pub port: u16,
    /// Its host is the CONNECT host.
    pub target: Target,
    /// The client connection's place, kept by upgrades that outlive the tunnel.
    pub slot: Slot,
}

/// Boxed as `Send` explicitly: rustc cannot prove it through hyper's nested
/// generic futures on its own.
pub fn serve<S>(
    proxy: Arc<Proxy>,
    opened: Intercepted,
    (host, port): (String, u16),
    slot: Slot,
    io: S,
) -> Pin<Box<dyn Future<Output = ()> + Send>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(intercept(proxy, opened, (host, port), slot, io))
}

async fn intercept<S>(
    proxy: Arc<Proxy>,
    opened: Intercepted,
    (host, port): (String, u16),
    slot: Slot,
    mut io: S,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, io.read(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return,
    }
    let io = Prefixed::new(Bytes::copy_from_slice(&first), io);
    if first[0] != TLS_HANDSHAKE {
        // Plain HTTP after CONNECT (some clients do this for port 80).
        let route = &opened.routing.routes[opened.route].config;
        let target = Target::plain(route, host.into(), Some(port));
        let tunnel = Tunnel { port, target, slot };
        return serve_http(proxy, opened, tunnel, io).await;
    }
    let config = match proxy.leaves.server_config(&host) {
        Ok(config) => config,
        Err(error) => {
            tracing::warn!(error = %crate::report::chain(&error), "cannot intercept");
            return;
        }
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(io)).await {
        Ok(Ok(tls)) => {
            let target = Target::intercepted(host.into(), port);
            let tunnel = Tunnel { port, target, slot };
            serve_http(proxy, opened, tunnel, tls).await;
        }
        Ok(Err(error)) => tracing::debug!(%host, %error, "client TLS handshake failed"),
        Err(_) => tracing::debug!(%host, "client TLS handshake timed out"),
    }
}

async fn serve_http<S>(proxy: Arc<Proxy>, opened: Intercepted, tunnel: Tunnel, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let signal = proxy.shutdown.signal();
    let limits = proxy.limits.clone();
    let (tunnel, opened) = (Arc::new(tunnel), Arc::new(opened));
    let service = {
        let proxy = proxy.clone();
        service_fn(move |request| {
            let (proxy, opened, tunnel) = (proxy.clone(), opened.clone(), tunnel.clone());
            async move {
                let Intercepted {
                    routing,
                    client,
                    route,
                } = &*opened;
                let response = proxy
                    .intercepted(routing, client, *route, &tunnel, request)
                    .await;
                Ok::<_, Infallible>(response)
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Pings find peers that vanished without closing.
        .keep_alive_interval(Some(H2_KEEP_ALIVE))
        .keep_alive_timeout(H2_KEEP_ALIVE)
        // RFC 8441: WebSockets over h2 (bridged to HTTP/1.1 upstream).
        .enable_connect_protocol();
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    if let Err(error) = server::until_shutdown(connection, signal, |c| c.graceful_shutdown()).await
    {
        tracing::debug!(error = %error, "intercepted connection closed with an error");
    }
}
