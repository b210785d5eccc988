//! One log line per request, written when its response body is done (or the
//! client went away), so it can say how many bytes went back and how long the
//! whole exchange took. Never the path or query: they can carry secrets.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::body::{BoxError, ProxyBody};

/// What the log line says about a request.
pub struct Line {
    method: Method,
    host: Arc<str>,
    route: Arc<str>,
    start: Instant,
    /// None inside an intercepted tunnel: its CONNECT line named the client.
    client: Option<SocketAddr>,
    status: StatusCode,
}

impl Line {
    pub fn new(
        method: Method,
        host: Arc<str>,
        route: Arc<str>,
        start: Instant,
        client: Option<SocketAddr>,
    ) -> Self {
        Self {
            method,
            host,
            route,
            start,
            client,
            status: StatusCode::OK,
        }
    }

    fn write(&self, bytes: u64) {
        let latency = format_args!("{:.1}ms", self.start.elapsed().as_secs_f64() * 1000.0);
        let (method, host, route, status) = (
            &self.method,
            &*self.host,
            &*self.route,
            self.status.as_u16(),
        );
        match self.client {
            Some(client) => {
                tracing::info!(%method, host, route, status, bytes, %latency, %client, "request")
            }
            None => tracing::info!(%method, host, route, status, bytes, %latency, "request"),
        }
    }
}

/// A response body that counts what it streams and logs the request's line
/// when dropped.
pub struct Observed {
    inner: ProxyBody,
    bytes: u64,
    line: Line,
}

impl Observed {
    pub fn new(response: Response<ProxyBody>, mut line: Line) -> Response<Self> {
        line.status = response.status();
        response.map(|inner| Self {
            inner,
            bytes: 0,
            line,
        })
    }
}

impl Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &poll
            && let Some(data) = frame.data_ref()
        {
            self.bytes += data.len() as u64;
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.line.write(self.bytes);
    }
}
