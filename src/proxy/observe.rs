//! One log line per request, written when its response body is done (or the
//! client went away), so it can say how many bytes went back and how long the
//! whole exchange took. Never the path or query: they can carry secrets.
//! An upgraded connection's line waits until the connection closes: the
//! response carries a [`Handoff`] that takes the line over from the body.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::access_log;
use super::tunnel::Transferred;
use crate::body::{BoxError, ProxyBody};

/// What the log line says about a request.
pub struct Line {
    method: Method,
    host: Arc<str>,
    route: Arc<str>,
    /// The proxy client's name (from the config), `-` for none.
    client: Arc<str>,
    start: Instant,
    /// None inside an intercepted tunnel: its CONNECT line named the peer.
    peer: Option<SocketAddr>,
    status: StatusCode,
}

impl Line {
    pub fn new(
        method: Method,
        host: Arc<str>,
        route: Arc<str>,
        client: Arc<str>,
        start: Instant,
        peer: Option<SocketAddr>,
    ) -> Self {
        Self {
            method,
            host,
            route,
            client,
            start,
            peer,
            status: StatusCode::OK,
        }
    }

    /// `bytes` went back to the client; `bytes_up` came from it, for an
    /// upgraded connection (a request body is not counted).
    fn write(&self, bytes: u64, bytes_up: Option<u64>) {
        access_log::Fields {
            method: &self.method,
            host: &self.host,
            route: &self.route,
            status: self.status.as_u16(),
            bytes,
            bytes_up,
            latency: self.start.elapsed(),
            client: &self.client,
            peer: self.peer,
        }
        .log();
    }

    /// The line of an upgraded connection, once it has closed.
    pub fn write_upgraded(&self, transferred: Transferred) {
        self.write(transferred.from_upstream, Some(transferred.from_client));
    }
}

/// Put in a response's extensions by an upgrade: the response's log line is
/// sent here instead of being written when the (empty) body is done.
/// Extensions must be `Clone`; the first taker gets the sender.
#[derive(Clone)]
pub struct Handoff(Arc<Mutex<Option<oneshot::Sender<Line>>>>);

impl Handoff {
    pub fn new(to: oneshot::Sender<Line>) -> Self {
        Self(Arc::new(Mutex::new(Some(to))))
    }

    fn take(&self) -> Option<oneshot::Sender<Line>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// A response body that counts what it streams and logs the request's line
/// when dropped.
pub struct Observed {
    inner: ProxyBody,
    bytes: u64,
    /// Taken when the body drops.
    line: Option<Line>,
    handoff: Option<oneshot::Sender<Line>>,
}

impl Observed {
    pub fn new(mut response: Response<ProxyBody>, mut line: Line) -> Response<Self> {
        line.status = response.status();
        let handoff = response
            .extensions_mut()
            .remove::<Handoff>()
            .and_then(|handoff| handoff.take());
        response.map(|inner| Self {
            inner,
            bytes: 0,
            line: Some(line),
            handoff,
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
        let Some(line) = self.line.take() else { return };
        match self.handoff.take() {
            // The upgrade never happened (its task is gone): log what there is.
            Some(to) => {
                if let Err(line) = to.send(line) {
                    line.write(self.bytes, None);
                }
            }
            None => line.write(self.bytes, None),
        }
    }
}
