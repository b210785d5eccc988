//! The demo API, `api.demo.test`: every request needs a bearer token the demo
//! provider issued and that has not expired, else 401 `invalid_token` (RFC 6750).
//! GET answers a small JSON greeting; `GET /bytes/N` streams N zero bytes for trying
//! downloads; POST/PUT count the body they receive for trying uploads.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use serde_json::json;

use super::API_HOST;
use super::provider::Provider;
use super::serve::{Body, json};

/// Download chunk: shared zeros, so a stream of any length allocates nothing.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

pub async fn handle(provider: Arc<Provider>, request: Request<Incoming>) -> Response<Body> {
    let Some(token) = bearer(request.headers().get(AUTHORIZATION)) else {
        return unauthorized("the request has no bearer token");
    };
    let Some(left) = provider.remaining(token) else {
        return unauthorized("the access token is unknown or has expired");
    };
    let path = request.uri().path().to_owned();
    let expires_in_s = whole_seconds(left);
    let method = request.method().clone();
    match method {
        Method::GET | Method::HEAD => match path.strip_prefix("/bytes/") {
            Some(count) => match count.parse::<u64>() {
                Ok(count) => zeros(count),
                Err(_) => json(
                    StatusCode::BAD_REQUEST,
                    &json!({
                        "error": "invalid_request",
                        "error_description": "use /bytes/N with N a whole number of bytes",
                    }),
                ),
            },
            None => json(
                StatusCode::OK,
                &json!({
                    "message": format!("hello from {API_HOST}"),
                    "path": path,
                    "token_expires_in_s": expires_in_s,
                }),
            ),
        },
        Method::POST | Method::PUT => {
            let mut body = request.into_body();
            let mut received: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        received += frame.data_ref().map_or(0, |data| data.len() as u64);
                    }
                    Err(_) => {
                        return json(
                            StatusCode::BAD_REQUEST,
                            &json!({
                                "error": "invalid_request",
                                "error_description": "the request body broke off",
                            }),
                        );
                    }
                }
            }
            json(
                StatusCode::OK,
                &json!({
                    "message": format!("hello from {API_HOST}"),
                    "path": path,
                    "received_bytes": received,
                    "token_expires_in_s": expires_in_s,
                }),
            )
        }
        _ => {
            let mut response = json(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({
                    "error": "invalid_request",
                    "error_description": "use GET, HEAD, POST or PUT",
                }),
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD, POST, PUT"));
            response
        }
    }
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(header: Option<&HeaderValue>) -> Option<&str> {
    let (scheme, token) = header?.to_str().ok()?.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Rounded up, so a token issued just now shows its full lifetime.
fn whole_seconds(left: Duration) -> u64 {
    left.as_secs() + u64::from(left.subsec_nanos() > 0)
}

fn unauthorized(description: &str) -> Response<Body> {
    let mut response = json(
        StatusCode::UNAUTHORIZED,
        &json!({ "error": "invalid_token", "error_description": description }),
    );
    response.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    response
}

fn zeros(count: u64) -> Response<Body> {
    let mut response = Response::new(Zeros { remaining: count }.boxed());
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
}

/// A body of `remaining` zero bytes, produced chunk by chunk as hyper asks for them.
struct Zeros {
    remaining: u64,
}

impl hyper::body::Body for Zeros {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let len = usize::try_from(self.remaining).map_or(ZEROS.len(), |r| r.min(ZEROS.len()));
        self.remaining -= len as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&ZEROS[..len])))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_needs_a_token() {
        let header = |v: &'static str| HeaderValue::from_static(v);
        assert_eq!(bearer(Some(&header("Bearer abc"))), Some("abc"));
        assert_eq!(bearer(Some(&header("bearer  abc "))), Some("abc"));
        assert_eq!(bearer(Some(&header("Bearer "))), None);
        assert_eq!(bearer(Some(&header("Basic abc"))), None);
        assert_eq!(bearer(None), None);
    }

    #[tokio::test]
    async fn zeros_streams_exactly_the_count_in_bounded_chunks() {
        let mut body = Zeros {
            remaining: 3 * ZEROS.len() as u64 + 5,
        };
        let mut total = 0;
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            assert!(data.len() <= ZEROS.len());
            assert!(data.iter().all(|&b| b == 0));
            total += data.len();
        }
        assert_eq!(total, 3 * ZEROS.len() + 5);
    }

    #[test]
    fn seconds_round_up() {
        assert_eq!(whole_seconds(Duration::from_millis(19_001)), 20);
        assert_eq!(whole_seconds(Duration::from_secs(20)), 20);
    }
}
