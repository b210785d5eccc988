//! Opening one upstream connection: TCP from the [`Dialer`] (`upstream.resolve`,
//! the connect timeout, the egress policy), TLS verified against the system
//! roots + `extra_ca` with ALPN offering h2 and http/1.1, then the HTTP
//! handshake for whatever the upstream picked. The connection's driver is returned, not spawned, so
//! the pool decides what happens when it ends.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;

use super::Key;
use crate::body::ProxyBody;
use crate::config::UpstreamConfig;
use crate::proxy::dial::Dialer;
use crate::tls::{self, TlsError};

/// Pings on an idle h2 connection find an upstream that vanished without
/// closing before a request is sent on it.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("TLS handshake timed out after {0:?}")]
    Timeout(Duration),
    /// TCP: refused, unreachable, timed out, or refused by the egress policy.
    #[error("cannot connect")]
    Tcp(#[source] io::Error),
    #[error("TLS handshake failed")]
    Tls(#[source] io::Error),
    #[error("HTTP handshake failed")]
    Handshake(#[source] hyper::Error),
}

/// The request side of a new connection.
pub enum Sender {
    Http1(http1::SendRequest<ProxyBody>),
    Http2 {
        sender: http2::SendRequest<ProxyBody>,
        /// The upstream's SETTINGS_MAX_CONCURRENT_STREAMS, as last seen.
        max_streams: Arc<AtomicUsize>,
    },
}

/// A new connection: its sender, and the future that drives it until it closes.
pub struct Dialed {
    pub sender: Sender,
    pub driver: Pin<Box<dyn Future<Output = ()> + Send>>,
}

pub struct Connector {
    tcp: Dialer,
    tls: TlsConnector,
    /// Bounds the TLS handshake as `connect_timeout` bounds TCP's.
    handshake_timeout: Duration,
}

impl Connector {
    pub fn new(config: &UpstreamConfig, tcp: Dialer) -> Result<Self, TlsError> {
        let tls = tls::client_config(config, &[b"h2", b"http/1.1"])?;
        Ok(Self {
            tcp,
            tls: TlsConnector::from(Arc::new(tls)),
            handshake_timeout: config.connect_timeout,
        })
    }

    pub fn dialer(&self) -> &Dialer {
        &self.tcp
    }

    /// Opens a connection to `key`: HTTP/1.1 for `http`, h2 or HTTP/1.1 by
    /// ALPN for `https`.
    pub async fn dial(&self, key: &Key) -> Result<Dialed, ConnectError> {
        let tcp = self
            .tcp
            .connect(&key.host, key.port)
            .await
            .map_err(ConnectError::Tcp)?;
        if !key.https {
            return http1_handshake(tcp).await;
        }
        let host = key.host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned()).map_err(|e| {
            ConnectError::Tls(io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
        })?;
        let handshake = self.tls.connect(name, tcp);
        let tls = tokio::time::timeout(self.handshake_timeout, handshake)
            .await
            .map_err(|_| ConnectError::Timeout(self.handshake_timeout))?
            .map_err(ConnectError::Tls)?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        if h2 {
            http2_handshake(tls).await
        } else {
            http1_handshake(tls).await
        }
    }
}

async fn http1_handshake<S>(io: S) -> Result<Dialed, ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(ConnectError::Handshake)?;
    Ok(Dialed {
        sender: Sender::Http1(sender),
        driver: Box::pin(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream HTTP/1.1 connection closed with an error");
            }
        }),
    })
}

async fn http2_handshake<S>(io: S) -> Result<Dialed, ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(ConnectError::Handshake)?;
    let max_streams = Arc::new(AtomicUsize::new(connection.current_max_send_streams()));
    let driver = StreamLimit {
        connection: Box::pin(connection),
        max_streams: max_streams.clone(),
    };
    Ok(Dialed {
        sender: Sender::Http2 {
            sender,
            max_streams,
        },
        driver: Box::pin(async move {
            if let Err(error) = driver.await {
                tracing::debug!(%error, "upstream h2 connection closed with an error");
            }
        }),
    })
}

/// Drives an h2 connection and publishes the upstream's stream limit, which
/// its SETTINGS frames may change at any time.
struct StreamLimit<C> {
    connection: Pin<Box<C>>,
    max_streams: Arc<AtomicUsize>,
}

impl<T> Future for StreamLimit<http2::Connection<TokioIo<T>, ProxyBody, TokioExecutor>>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Output = hyper::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let poll = self.connection.as_mut().poll(cx);
        let limit = self.connection.current_max_send_streams();
        self.max_streams.store(limit, Ordering::Relaxed);
        poll
    }
}
