//! What a resend needs: the request's method, URL and headers, and its body
//! kept when small. A request goes again once after a 401 with a freshly
//! refreshed token, and once after a connection failure the upstream never
//! processed (`upstream.rs`).

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::error::ProxyError;
use super::{ActiveRoute, inject};
use crate::body::{self, ProxyBody};
use crate::tokens::{Integration, Reason, Snapshot};

/// Bodies up to this size are kept for a resend.
pub const MAX_REPLAY: u64 = 1024 * 1024;

/// A request on its way upstream, before the route's headers are applied.
pub struct Outgoing {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: RequestBody,
    /// Resends so far after connection failures.
    pub connection_resends: u8,
}

/// A request body as the proxy holds it: kept (replayable) or streaming (once).
pub enum RequestBody {
    Kept(Bytes),
    Streaming(Option<Incoming>),
}

impl Outgoing {
    pub fn new(method: Method, uri: Uri, headers: HeaderMap, body: RequestBody) -> Self {
        Self {
            method,
            uri,
            headers,
            body,
            connection_resends: 0,
        }
    }

    /// The next attempt, with `injected` replacing the client's headers of
    /// the same names.
    pub fn build(&mut self, injected: &[(HeaderName, HeaderValue)]) -> Request<ProxyBody> {
        let mut headers = self.headers.clone();
        inject::apply(&mut headers, injected);
        let mut request = Request::new(self.body.take());
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        // The pool picks HTTP/1.1 or h2 per upstream, whatever the client spoke.
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = headers;
        request
    }
}

impl RequestBody {
    /// Keeps the body when its exact length is known and at most
    /// `MAX_REPLAY`; a larger or unknown-length body streams and is never resent.
    pub async fn read(body: Incoming) -> Result<Self, ProxyError> {
        let size = body.size_hint().exact();
        if size.is_none_or(|n| n > MAX_REPLAY) {
            return Ok(Self::Streaming(Some(body)));
        }
        let collected = Limited::new(body, MAX_REPLAY as usize)
            .collect()
            .await
            .map_err(|e| ProxyError::BadRequest(format!("cannot read the request body: {e}")))?;
        Ok(Self::Kept(collected.to_bytes()))
    }

    pub fn is_replayable(&self) -> bool {
        matches!(self, Self::Kept(_))
    }

    /// The body for the next attempt; a streaming body can be taken once.
    fn take(&mut self) -> ProxyBody {
        match self {
            Self::Kept(bytes) => body::full(bytes.clone()),
            Self::Streaming(body) => body.take().map_or_else(body::empty, body::stream),
        }
    }
}

/// After the upstream answered 401 to `snapshot`'s token: forces one
/// (single-flight, rate-limited) refresh and returns the token to resend
/// with. None when rate-limited or the refresh failed: the client then sees
/// the API's 401.
pub async fn refreshed(
    route: &ActiveRoute,
    integration: &Arc<Integration>,
    snapshot: &Snapshot,
) -> Option<Arc<Snapshot>> {
    let reason = Reason::Rejected {
        generation: snapshot.generation,
    };
    match integration.refresh(reason).await {
        Ok(fresh) if fresh.generation != snapshot.generation => {
            tracing::info!(integration = %integration.name(), "upstream answered 401; resending with a refreshed token");
            route.metrics.retries.inc();
            Some(fresh)
        }
        _ => None,
    }
}
