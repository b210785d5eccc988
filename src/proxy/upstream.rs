//! Connections to the real APIs: pooled HTTP/1.1 keep-alive and HTTP/2 (by
//! ALPN), TLS verified against the system roots + `upstream.extra_ca`, TCP
//! connections opened by a [`Dialer`] (`upstream.resolve`, the egress policy).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::dial::{self, Dialer};
use super::error::ProxyError;

use crate::body::ProxyBody;
use crate::config::UpstreamConfig;
use crate::tls::{self, TlsError};

const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

pub struct Upstream {
    client: Client<HttpsConnector<Connector>, ProxyBody>,
    connector: Connector,
    response_timeout: Duration,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, dialer: Dialer) -> Result<Self, TlsError> {
        let connector = Connector { dialer };
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls::client_config(config, &[])?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(connector.clone());
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(https);
        Ok(Self {
            client,
            connector,
            response_timeout: config.response_timeout,
        })
    }

    /// Sends `request` (absolute URI) and waits for the response head. The
    /// response timeout starts once the request body is sent, so a slow upload
    /// is not cut short. The response body then streams.
    pub async fn send(
        &self,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let authority = request
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let (sent, body_done) = oneshot::channel::<()>();
        let request = request.map(|body| {
            SignalOnDrop {
                inner: body,
                _sent: sent,
            }
            .boxed()
        });
        let response = self.client.request(request);
        let deadline = async {
            // Resolves when hyper drops the body: fully sent, or abandoned.
            let _ = body_done.await;
            tokio::time::sleep(self.response_timeout).await;
        };
        tokio::select! {
            result = response => result.map_err(|error| classify(&authority, &error)),
            () = deadline => Err(ProxyError::Timeout(format!(
                "{authority} did not answer within {:?}",
                self.response_timeout
            ))),
        }
    }

    /// A raw TCP connection, for blind tunnels and upgrades.
    pub async fn connect_tcp(&self, host: &str, port: u16) -> Result<TcpStream, ProxyError> {
        self.connector
            .dialer
            .connect(host, port)
            .await
            .map_err(|e| connect_error(&format!("{host}:{port}"), &e))
    }
}

/// A request body that tells `send` when hyper is done with it.
struct SignalOnDrop {
    inner: ProxyBody,
    _sent: oneshot::Sender<()>,
}

impl http_body::Body for SignalOnDrop {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn classify(authority: &str, error: &hyper_util::client::legacy::Error) -> ProxyError {
    if let Some(refusal) = dial::refusal(error) {
        return refusal.clone().into();
    }
    let text = crate::report::chain(error);
    if error.is_connect() {
        // The connector reports its own timeout as TimedOut.
        let timed_out = std::error::Error::source(error)
            .and_then(|s| s.downcast_ref::<io::Error>())
            .is_some_and(|e| e.kind() == io::ErrorKind::TimedOut);
        if timed_out {
            return ProxyError::Timeout(format!("connecting to {authority} timed out"));
        }
        return ProxyError::Unreachable(format!("cannot connect to {authority}: {text}"));
    }
    ProxyError::Unreachable(format!("{authority}: {text}"))
}

fn connect_error(target: &str, error: &io::Error) -> ProxyError {
    if let Some(refusal) = dial::refusal(error) {
        return refusal.clone().into();
    }
    if error.kind() == io::ErrorKind::TimedOut {
        ProxyError::Timeout(format!("connecting to {target} timed out"))
    } else {
        ProxyError::Unreachable(format!("cannot connect to {target}: {error}"))
    }
}

// === impl Connector ===

/// The pool's TCP connector: a [`Dialer`] as a tower service.
#[derive(Clone)]
pub struct Connector {
    dialer: Dialer,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "URI without host"))?;
            let default_port = if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            };
            let stream = this
                .dialer
                .connect(host, uri.port_u16().unwrap_or(default_port))
                .await?;
            Ok(TokioIo::new(stream))
        })
    }
}
