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

/// Whether the connection a request failed on takes no more requests: it
/// said GOAWAY, or closed. An h2 connection that said GOAWAY still looks open
/// to hyper while other streams finish on it, so the pool would lend it again.
pub fn takes_no_more(error: &hyper::Error, unsent: bool) -> bool {
    unsent
        || source::<h2::Error>(error).is_some_and(h2::Error::is_go_away)
        || connection_lost(error)
}

/// Resends after connection failures, per request, at most: the fresh
/// connection a resend rides on may itself be GOAWAY'd before it takes the
/// stream (an upstream that rotates connections every few streams, under a
/// crowd of requests that all move to the next connection at once), and a
/// request the upstream never processed may safely go again. Each resend
/// rides a connection no earlier try used; Go's HTTP/2 client allows six.
const MAX_UNPROCESSED_RESENDS: u8 = 3;

/// Whether a request already resent `resends` times may go again for `reason`:
/// what the upstream provably did not process, up to three times; an idempotent
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

/// Raw h2 frames, shared with the integration tests' hand-written upstreams.
#[cfg(test)]
#[allow(dead_code, clippy::expect_used)]
#[path = "../../../tests/support/h2_frames.rs"]
mod h2_frames;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! Real hyper errors, from hyper's client on an in-memory connection to a
    //! hand-written server, so the classification is checked against what
    //! hyper and h2 actually report.

    use std::time::Duration;

    use bytes::Bytes;
    use http::{Method, Request, StatusCode};
    use http_body_util::Empty;
    use hyper::client::conn::{http1, http2};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::h2_frames::{self, HEADERS, INTERNAL_ERROR, REFUSED_STREAM};
    use super::*;
    use crate::proxy::error::ProxyError;
    use crate::proxy::upstream::connection::ConnectError;
    use crate::proxy::upstream::{Key, connect_error, connection_error};

    const POST: Method = Method::POST;
    const GET: Method = Method::GET;

    /// What the server does once the first request's HEADERS arrive.
    #[derive(Clone, Copy)]
    enum Then {
        /// RST_STREAM with this code.
        Reset(u32),
        /// GOAWAY naming this last stream id, with NO_ERROR.
        GoAway(u32),
        /// GOAWAY covering the stream, then hang up without answering.
        GoAwayAndClose,
    }

    /// A minimal h2 server: SETTINGS and their ACKs, then `then` on the first stream.
    async fn h2_server(mut io: DuplexStream, then: Then) {
        if !h2_frames::accept(&mut io).await {
            return;
        }
        while let Some(frame) = h2_frames::read(&mut io).await {
            let reply = match (frame.ack(), frame.kind, then) {
                (Some(ack), _, _) => ack,
                (None, HEADERS, Then::Reset(code)) => h2_frames::reset(frame.stream, code),
                (None, HEADERS, Then::GoAway(last)) => h2_frames::goaway(last),
                (None, HEADERS, Then::GoAwayAndClose) => {
                    let _ = io.write_all(&h2_frames::goaway(frame.stream)).await;
                    return;
                }
                _ => continue,
            };
            let _ = io.write_all(&reply).await;
        }
    }

    fn request() -> Request<Empty<Bytes>> {
        Request::get("https://api.test/")
            .body(Empty::new())
            .unwrap()
    }

    /// The error hyper's h2 client reports for a request the server treats with `then`.
    async fn h2_error(then: Then) -> hyper::Error {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(h2_server(server, then));
        let (mut sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(client))
            .await
            .unwrap();
        tokio::spawn(connection);
        sender.send_request(request()).await.unwrap_err()
    }

    /// The error hyper's HTTP/1.1 client reports when the server reads the request,
    /// then writes `answer` and hangs up.
    async fn h1_error(answer: &'static [u8]) -> hyper::Error {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0; 1];
                if server.read_exact(&mut byte).await.is_err() {
                    return;
                }
                head.push(byte[0]);
            }
            let _ = server.write_all(answer).await;
        });
        let (mut sender, connection) = http1::handshake(TokioIo::new(client)).await.unwrap();
        tokio::spawn(connection);
        let request = Request::get("/").body(Empty::<Bytes>::new()).unwrap();
        sender.send_request(request).await.unwrap_err()
    }

    /// The reason for every (method, reused) combination, in the order
    /// (POST fresh, POST reused, GET fresh, GET reused).
    fn reasons(error: &hyper::Error, unsent: bool) -> [Option<RetryReason>; 4] {
        [(&POST, false), (&POST, true), (&GET, false), (&GET, true)]
            .map(|(method, reused)| retry_reason(error, unsent, method, reused))
    }

    #[tokio::test]
    async fn a_refused_stream_is_resent_whatever_the_method() {
        let error = h2_error(Then::Reset(REFUSED_STREAM)).await;
        assert_eq!(
            reasons(&error, false),
            [Some(RetryReason::RefusedStream); 4],
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_stream_above_a_goaways_last_stream_id_is_resent_whatever_the_method() {
        let error = h2_error(Then::GoAway(0)).await;
        assert_eq!(
            reasons(&error, false),
            [Some(RetryReason::GoAway); 4],
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_stream_the_upstream_reset_otherwise_is_not_resent() {
        let error = h2_error(Then::Reset(INTERNAL_ERROR)).await;
        assert_eq!(reasons(&error, false), [None; 4], "{error:?}");
    }

    #[tokio::test]
    async fn an_h2_connection_lost_after_the_request_resends_only_a_reused_idempotent_one() {
        let error = h2_error(Then::GoAwayAndClose).await;
        let again = Some(RetryReason::ClosedBeforeResponse);
        assert_eq!(
            reasons(&error, false),
            [None, None, None, again],
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn an_http1_connection_closed_before_the_response_resends_only_a_reused_idempotent_one() {
        let error = h1_error(b"").await;
        assert!(error.is_incomplete_message(), "{error:?}");
        let again = Some(RetryReason::ClosedBeforeResponse);
        assert_eq!(reasons(&error, false), [None, None, None, again]);
    }

    #[tokio::test]
    async fn a_malformed_response_is_not_resent() {
        let error = h1_error(b"HTTP/1.1 abc\r\n\r\n").await;
        assert!(error.is_parse(), "{error:?}");
        assert_eq!(reasons(&error, false), [None; 4]);
    }

    #[tokio::test]
    async fn a_request_hyper_never_wrote_is_resent_whatever_the_error() {
        for error in [
            h1_error(b"").await,
            h2_error(Then::Reset(INTERNAL_ERROR)).await,
        ] {
            assert_eq!(
                reasons(&error, true),
                [Some(RetryReason::ClosedBeforeWrite); 4]
            );
        }
    }

    #[test]
    fn what_was_not_processed_goes_three_times_what_may_have_been_once() {
        for reason in [
            RetryReason::RefusedStream,
            RetryReason::GoAway,
            RetryReason::ClosedBeforeWrite,
        ] {
            assert_eq!(
                [0, 1, 2, 3].map(|n| may_resend(reason, n)),
                [true, true, true, false],
                "{reason:?}"
            );
        }
        let maybe = RetryReason::ClosedBeforeResponse;
        assert_eq!(
            [0, 1, 2, 3].map(|n| may_resend(maybe, n)),
            [true, false, false, false]
        );
    }

    #[tokio::test]
    async fn a_connection_that_said_goaway_or_closed_takes_no_more_one_that_reset_a_stream_does() {
        let refused = h2_error(Then::Reset(REFUSED_STREAM)).await;
        let reset = h2_error(Then::Reset(INTERNAL_ERROR)).await;
        let goaway = h2_error(Then::GoAway(0)).await;
        let lost = h2_error(Then::GoAwayAndClose).await;
        let closed = h1_error(b"").await;
        assert_eq!(
            [&refused, &reset, &goaway, &lost, &closed].map(|e| takes_no_more(e, false)),
            [false, false, true, true, true]
        );
        assert!(
            takes_no_more(&reset, true),
            "a request that came back unsent"
        );
    }

    #[test]
    fn only_get_head_options_put_and_delete_are_idempotent() {
        let expected = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"];
        for method in [
            "GET", "HEAD", "OPTIONS", "PUT", "DELETE", "POST", "PATCH", "CONNECT", "PURGE",
        ] {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            assert_eq!(
                idempotent(&method),
                expected.contains(&method.as_str()),
                "{method}"
            );
        }
    }

    fn key() -> Key {
        Key::of(&"https://api.test/".parse().unwrap()).unwrap()
    }

    /// Status, code and the cause the warning logs.
    fn seen(error: &ProxyError) -> (StatusCode, &'static str, String) {
        (error.status(), error.code(), error.to_string())
    }

    #[tokio::test]
    async fn a_send_that_is_not_resent_is_a_502_naming_the_upstream_and_the_cause() {
        let reset = connection_error(&key(), &h2_error(Then::Reset(INTERNAL_ERROR)).await);
        let (status, code, cause) = seen(&reset);
        assert_eq!(
            (status, code),
            (StatusCode::BAD_GATEWAY, "upstream_unreachable")
        );
        assert_eq!(
            cause,
            "api.test:443: http2 error: stream error received: unexpected internal error encountered"
        );
        let goaway = connection_error(&key(), &h2_error(Then::GoAway(0)).await);
        assert_eq!(
            seen(&goaway).2,
            "api.test:443: http2 error: connection error received: not a result of an error"
        );
        let closed = connection_error(&key(), &h1_error(b"").await);
        assert_eq!(
            seen(&closed).2,
            "api.test:443: connection closed before message completed"
        );
    }

    #[test]
    fn connect_failures_are_a_504_when_they_timed_out_else_a_502() {
        let io = |kind, text: &str| io::Error::new(kind, text.to_owned());
        let cases = [
            (
                ConnectError::Tcp(io(
                    io::ErrorKind::ConnectionRefused,
                    "Connection refused (os error 111)",
                )),
                StatusCode::BAD_GATEWAY,
                "api.test:443: cannot connect: Connection refused (os error 111)",
            ),
            (
                ConnectError::Tcp(io(
                    io::ErrorKind::TimedOut,
                    "connecting to 192.0.2.1:443 timed out",
                )),
                StatusCode::GATEWAY_TIMEOUT,
                "api.test:443: cannot connect: connecting to 192.0.2.1:443 timed out",
            ),
            (
                ConnectError::Timeout(Duration::from_secs(10)),
                StatusCode::GATEWAY_TIMEOUT,
                "api.test:443: TLS handshake timed out after 10s",
            ),
            (
                ConnectError::Tls(io(
                    io::ErrorKind::InvalidData,
                    "invalid peer certificate: UnknownIssuer",
                )),
                StatusCode::BAD_GATEWAY,
                "api.test:443: TLS handshake failed: invalid peer certificate: UnknownIssuer",
            ),
        ];
        for (error, status, cause) in cases {
            let error = connect_error("api.test:443", &error);
            assert_eq!(
                (error.status(), error.to_string().as_str()),
                (status, cause)
            );
        }
    }
}
