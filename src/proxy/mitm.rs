//! Interception inside a CONNECT tunnel to a routed host: tell TLS from plain
//! HTTP by the first byte, terminate TLS with a leaf minted for the CONNECT
//! host, and serve the requests inside: HTTP/1.1 keep-alive or h2, as ALPN
//! agreed, or as the first bytes show when there was none.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio_rustls::TlsAcceptor;

use super::clients::Client;
use super::forward::Target;
use super::prefixed::Prefixed;
use super::{Proxy, Routing, answering};
use crate::config::Limits;
use crate::server::{self, Slot};

/// A TLS record starts with content type 22 (handshake).
const TLS_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const H2_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// What an h2 client sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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
        return serve_http(proxy, opened, tunnel, io, None).await;
    }
    let config = match proxy.leaves.server_config(&host) {
        Ok(config) => config,
        Err(error) => {
            tracing::warn!(error = %crate::report::chain(&error), "cannot intercept");
            return;
        }
    };
    // The handshake and then the session boxed: this task lives as long as the
    // tunnel at the size of its largest state, and an inline session took room
    // in each future it passed through.
    let handshake = Box::pin(TlsAcceptor::from(config).accept(io));
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(tls)) => {
            let tls = Box::new(tls);
            let alpn = match tls.get_ref().1.alpn_protocol() {
                Some(b"h2") => Some(Protocol::Http2),
                Some(_) => Some(Protocol::Http1),
                None => None,
            };
            let target = Target::intercepted(host.into(), port);
            let tunnel = Tunnel { port, target, slot };
            serve_http(proxy, opened, tunnel, tls, alpn).await;
        }
        Ok(Err(error)) => tracing::debug!(%host, %error, "client TLS handshake failed"),
        Err(_) => tracing::debug!(%host, "client TLS handshake timed out"),
    }
}

#[derive(Clone, Copy)]
enum Protocol {
    Http1,
    Http2,
}

/// Serves the requests inside a tunnel in `alpn`'s protocol; without one (plain
/// HTTP, or a TLS client that offered none), in the one its first bytes show.
async fn serve_http<S>(
    proxy: Arc<Proxy>,
    opened: Intercepted,
    tunnel: Tunnel,
    io: S,
    alpn: Option<Protocol>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (protocol, io) = match alpn {
        Some(protocol) => (protocol, Prefixed::new(Bytes::new(), io)),
        None => match tokio::time::timeout(proxy.limits.header_read_timeout, sniff(io)).await {
            Ok(Ok(sniffed)) => sniffed,
            _ => return,
        },
    };
    let (tunnel, opened) = (Arc::new(tunnel), Arc::new(opened));
    let service = {
        let proxy = proxy.clone();
        answering(move |request| {
            let (proxy, opened, tunnel) = (proxy.clone(), opened.clone(), tunnel.clone());
            async move {
                let Intercepted {
                    routing,
                    client,
                    route,
                } = &*opened;
                proxy
                    .intercepted(routing, client, *route, &tunnel, request)
                    .await
            }
        })
    };
    let result = match protocol {
        Protocol::Http1 => proxy.serve_http1(io, service).await,
        Protocol::Http2 => {
            let connection =
                http2_builder(&proxy.limits).serve_connection(TokioIo::new(io), service);
            // Boxed: an HTTP/1.1 connection need not carry room for an h2 one.
            let signal = proxy.shutdown.signal();
            Box::pin(server::until_shutdown(connection, signal, |c| {
                c.graceful_shutdown();
            }))
            .await
        }
    };
    if let Err(error) = result {
        tracing::debug!(error = %error, "intercepted connection closed with an error");
    }
}

fn http2_builder(limits: &Limits) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Pings find peers that vanished without closing.
        .keep_alive_interval(Some(H2_KEEP_ALIVE))
        .keep_alive_timeout(H2_KEEP_ALIVE)
        // RFC 8441: WebSockets over h2 (bridged to HTTP/1.1 upstream).
        .enable_connect_protocol();
    builder
}

/// Reads until the bytes read are, or cannot become, the h2 connection preface,
/// and puts them back in front of `io`.
async fn sniff<S: AsyncRead + Unpin>(mut io: S) -> std::io::Result<(Protocol, Prefixed<S>)> {
    let mut read = [0u8; H2_PREFACE.len()];
    let mut n = 0;
    while n < read.len() && read[..n] == H2_PREFACE[..n] {
        match io.read(&mut read[n..]).await? {
            0 => break,
            more => n += more,
        }
    }
    let protocol = if read[..n] == *H2_PREFACE {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    Ok((
        protocol,
        Prefixed::new(Bytes::copy_from_slice(&read[..n]), io),
    ))
}
