//! Which failed sends may go again: only what the upstream provably did not
//! process, whatever the method (an HTTP/2 stream it refused or that a
//! GOAWAY's last stream id left out, a request never written to a pooled
//! connection that had closed), and an idempotent request whose reused
//! connection closed before any response byte (RFC 9110 §9.2.2).

use std::io;

use http::Method;

use crate::metrics::RetryReason;

/// Why a send that failed may be resent, or None when it must not be.
pub fn retry_reason(
    error: &hyper::Error,
    unsent: bool,
    method: &Method,
    reused: bool,
) -> Option<RetryReason> {
    if unsent {
        return Some(RetryReason::ClosedBeforeWrite);
    }
    if let Some(h2) = source::<h2::Error>(error).filter(|e| e.is_remote()) {
        if h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
            return Some(RetryReason::RefusedStream);
        }
        // h2 fails a stream with the peer's GOAWAY only when the stream is
        // above its last stream id, or was opened after it: never processed.
        if h2.is_go_away() {
            return Some(RetryReason::GoAway);
        }
    }
    (reused && idempotent(method) && connection_lost(error))
        .then_some(RetryReason::ClosedBeforeResponse)
}

/// Resends after connection failures, per request, at most: the fresh
/// connection a resend rides on may itself be GOAWAY'd before it takes the
/// stream (an upstream that rotates connections every few streams), and a
/// request the upstream never processed may safely go again.
const MAX_UNPROCESSED_RESENDS: u8 = 2;

/// Whether a request already resent `resends` times may go again for `reason`:
/// what the upstream provably did not process, up to twice; an idempotent
/// request that may have been processed, only as the first resend.
pub fn may_resend(reason: RetryReason, resends: u8) -> bool {
    match reason {
        RetryReason::ClosedBeforeResponse => resends == 0,
        _ => resends < MAX_UNPROCESSED_RESENDS,
    }
}

pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

/// The connection went away while the request waited for its response head.
fn connection_lost(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() || error.is_canceled() || error.is_closed() {
        return true;
    }
    source::<io::Error>(error).is_some_and(|e| {
        matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
        )
    }) || source::<h2::Error>(error).is_some_and(|e| e.is_io())
}

/// The first error of type `E` in `error`'s source chain.
fn source<E: std::error::Error + 'static>(error: &hyper::Error) -> Option<&E> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = next {
        if let Some(found) = current.downcast_ref::<E>() {
            return Some(found);
        }
        next = current.source();
    }
    None
}
