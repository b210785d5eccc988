//! The 401 path: keep small request bodies so the request can be resent once
//! with a freshly refreshed token.

use std::sync::Arc;

use bytes::Bytes;
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::ActiveRoute;
use super::error::ProxyError;
use crate::body::{self, ProxyBody};
use crate::tokens::{Integration, Reason, Snapshot};

/// Bodies up to this size are kept for a resend after a 401.
pub const MAX_REPLAY: u64 = 1024 * 1024;

/// A request body as the proxy holds it: kept (replayable) or streaming (once).
pub enum RequestBody {
    Kept(Bytes),
    Streaming(Option<Incoming>),
}

impl RequestBody {
    /// Keeps the body when `keep` and its exact length is known and at most
    /// `MAX_REPLAY`; a larger or unknown-length body streams and is never resent.
    pub async fn read(body: Incoming, keep: bool) -> Result<Self, ProxyError> {
        let size = body.size_hint().exact();
        if !keep || size.is_none_or(|n| n > MAX_REPLAY) {
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
    pub fn take(&mut self) -> ProxyBody {
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
