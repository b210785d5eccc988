//! Requests to the real APIs: the connection pool, the response timeout, and
//! resends on a fresh connection when a pooled connection failed in a way the
//! upstream provably did not process (see `upstream/failure.rs`).
//! TCP connections come from a [`Dialer`] (`upstream.resolve`, the egress
//! policy), tunnels' included.

mod connection;
mod failure;
mod pool;

use std::fmt;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use self::connection::{ConnectError, Connector};
use self::pool::{Leased, Pool};
use super::dial::{self, Dialer};
use super::error::ProxyError;
use super::retry::Outgoing;
use crate::body::{self, ProxyBody};
use crate::config::UpstreamConfig;
use crate::metrics::RouteMetrics;
use crate::tls::TlsError;

pub struct Upstream {
    pool: Pool,
    response_timeout: std::time::Duration,
}

/// Where a pooled connection goes: scheme, host and port.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key {
    https: bool,
    host: Arc<str>,
    port: u16,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, dialer: Dialer) -> Result<Self, TlsError> {
        Ok(Self {
            pool: Pool::new(
                Connector::new(config, dialer)?,
                config.idle_timeout,
                config.max_connections_per_host,
                config.response_timeout,
            ),
            response_timeout: config.response_timeout,
        })
    }

    /// Sends `outgoing` with the `injected` headers and waits for the response
    /// head; the body then streams. A failure the upstream provably did not
    /// process is resent on a fresh connection (as `failure::may_resend`
    /// allows) and counted in `metrics`; the connection it failed on, if it
    /// takes no more, leaves the pool.
    pub async fn send(
        &self,
        outgoing: &mut Outgoing,
        injected: &[(header::HeaderName, HeaderValue)],
        metrics: &RouteMetrics,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let key = Key::of(&outgoing.uri)?;
        let mut request = outgoing.build(injected);
        // An HTTP/1.1 connection that sat idle may be closing as a request is
        // written to it: only a request that may be resent rides on one.
        let mut fresh = !failure::idempotent(&outgoing.method);
        let mut avoid = None;
        loop {
            let lease = self.pool.checkout(&key, fresh, avoid).await?;
            let reused = lease.reused;
            avoid = Some(lease.id);
            let (error, unsent) = match self.exchange(&key, lease.conn, request).await {
                Ok(response) => return Ok(response),
                Err(Failed::Final(error)) => return Err(error),
                Err(Failed::Connection { error, unsent }) => (error, unsent),
            };
            if failure::takes_no_more(&error, unsent.is_some()) {
                self.pool.retire(&key, lease.id);
            }
            let reason = failure::retry_reason(&error, unsent.is_some(), &outgoing.method, reused)
                .filter(|reason| failure::may_resend(*reason, outgoing.connection_resends));
            request = match (reason, unsent) {
                (Some(_), Some(unsent)) => *unsent,
                (Some(_), None) if outgoing.body.is_replayable() => outgoing.build(injected),
                _ => return Err(connection_error(&key, &error)),
            };
            if let Some(reason) = reason {
                outgoing.connection_resends += 1;
                metrics.retried(reason);
                tracing::debug!(upstream = %key, reason = reason.as_str(), error = %crate::report::chain(&error), "resending on a fresh connection");
            }
            fresh = true;
        }
    }

    /// One try on `conn`. The response timeout starts once the request body
    /// is sent, so a slow upload is not cut short.
    async fn exchange(
        &self,
        key: &Key,
        conn: Leased,
        request: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, Failed> {
        let (sent, body_done) = oneshot::channel::<()>();
        // The body tells when hyper is done with it by dropping `sent`.
        let request = request.map(|b| body::holding(b, sent));
        let deadline = async {
            // Resolves when hyper drops the body: fully sent, or abandoned.
            let _ = body_done.await;
            tokio::time::sleep(self.response_timeout).await;
        };
        let timeout = || {
            Failed::Final(ProxyError::Timeout(format!(
                "{key} did not answer within {:?}",
                self.response_timeout
            )))
        };
        match conn {
            Leased::Http1 { sender, home } => {
                let (result, sender) = tokio::select! {
                    sent = home.send(sender, http1_form(request)) => sent,
                    () = deadline => return Err(timeout()),
                };
                let response = result.map_err(Failed::from)?;
                if let Some(sender) = sender {
                    home.release(sender);
                }
                Ok(response.map(crate::body::stream))
            }
            Leased::Http2 { mut sender, stream } => {
                let sent = sender.try_send_request(request);
                // Not held while waiting: a request queued as the connection
                // ends comes back unsent once its last sender is gone (the
                // pool drops its own then; see `Home::send`).
                drop(sender);
                let response = tokio::select! {
                    result = sent => result.map_err(Failed::from)?,
                    () = deadline => return Err(timeout()),
                };
                Ok(response.map(|b| body::holding(body::stream(b), stream)))
            }
        }
    }

    /// A raw TCP connection, for blind tunnels and upgrades.
    pub async fn connect_tcp(&self, host: &str, port: u16) -> Result<TcpStream, ProxyError> {
        self.pool
            .connector()
            .dialer()
            .connect(host, port)
            .await
            .map_err(|e| connect_error(&format!("{host}:{port}"), &ConnectError::Tcp(e)))
    }
}

/// How one try failed: for good, or with the connection (maybe retryable).
enum Failed {
    Final(ProxyError),
    Connection {
        error: hyper::Error,
        /// The request, when hyper never started writing it.
        unsent: Option<Box<Request<ProxyBody>>>,
    },
}

impl From<hyper::client::conn::TrySendError<Request<ProxyBody>>> for Failed {
    fn from(mut error: hyper::client::conn::TrySendError<Request<ProxyBody>>) -> Self {
        let unsent = error.take_message().map(Box::new);
        Self::Connection {
            error: error.into_error(),
            unsent,
        }
    }
}

fn connection_error(key: &Key, error: &hyper::Error) -> ProxyError {
    ProxyError::Unreachable(format!("{key}: {}", crate::report::chain(error)))
}

/// 403 for the egress policy's refusal, 504 for a timeout, else 502.
fn connect_error(target: &str, error: &ConnectError) -> ProxyError {
    if let Some(refusal) = dial::refusal(error) {
        return refusal.clone().into();
    }
    let timed_out = match error {
        ConnectError::Timeout(_) => true,
        ConnectError::Tcp(e) => e.kind() == std::io::ErrorKind::TimedOut,
        _ => false,
    };
    let text = format!("{target}: {}", crate::report::chain(error));
    if timed_out {
        ProxyError::Timeout(text)
    } else {
        ProxyError::Unreachable(text)
    }
}

/// HTTP/1.1 wants origin-form and a `Host` header; h2 takes the absolute URI
/// as `:scheme` and `:authority`.
fn http1_form(mut request: Request<ProxyBody>) -> Request<ProxyBody> {
    let path = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    if let Some(authority) = request.uri().authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        request.headers_mut().insert(header::HOST, host);
    }
    *request.uri_mut() = Uri::from(path);
    *request.version_mut() = Version::HTTP_11;
    request
}

// === impl Key ===

impl Key {
    fn of(uri: &Uri) -> Result<Self, ProxyError> {
        let https = uri.scheme() == Some(&Scheme::HTTPS);
        let authority: &Authority = uri
            .authority()
            .ok_or_else(|| ProxyError::BadRequest("the upstream URL has no host".into()))?;
        Ok(Self {
            https,
            host: authority.host().into(),
            port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
        })
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}
