//! The test API's WebSocket endpoint, `GET /ws`: a strict RFC 6455 server handshake
//! (`Upgrade: websocket`, `Connection: upgrade`, version 13, a key; answered with the
//! matching `Sec-WebSocket-Accept`) that accepts only `Authorization: Bearer T` for a
//! token the test token endpoint issued and has not revoked. After the 101 it echoes
//! every text and binary message in order (tokio-tungstenite does the framing); the
//! text message `"drop"` makes it drop the connection without a closing handshake.
//! For backpressure tests: `"flood N"` makes it send N binary messages of
//! [`FLOOD_MESSAGE`] bytes (counted as each send completes), and `"sink"` makes it stop
//! reading until [`TestApi::open_gate`](super::TestApi::open_gate), then count and drop
//! whatever arrives.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use http::header::{CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{self, Message};

use super::{ApiBody, Shared, bearer, json_response};
use crate::support::token::Issued;

/// The text message that makes the server drop the connection.
pub const DROP: &str = "drop";
/// `"flood N"`: N messages of this size come back.
pub const FLOOD: &str = "flood ";
pub const FLOOD_MESSAGE: usize = 1024 * 1024;
/// Stop reading until the gate opens, then count and drop.
pub const SINK: &str = "sink";

/// What `/ws` answers to a request with `headers`: 101, 400 for a request that is not
/// a WebSocket handshake, or 401 without a token `issued` vouches for.
pub(super) fn status(headers: &HeaderMap, issued: Option<&Issued>) -> StatusCode {
    let has = |name, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    let handshake = has(UPGRADE, "websocket")
        && has(CONNECTION, "upgrade")
        && has(http::header::SEC_WEBSOCKET_VERSION, "13")
        && headers.contains_key(SEC_WEBSOCKET_KEY);
    if !handshake {
        return StatusCode::BAD_REQUEST;
    }
    let authorized = bearer(headers)
        .zip(issued)
        .is_some_and(|(token, issued)| issued.is_valid(token));
    if authorized {
        StatusCode::SWITCHING_PROTOCOLS
    } else {
        StatusCode::UNAUTHORIZED
    }
}

/// The answer for `status`; on 101, the echo server starts once the connection is
/// handed over.
pub(super) fn answer(
    shared: &Arc<Shared>,
    status: StatusCode,
    headers: &HeaderMap,
    upgrade: OnUpgrade,
) -> Response<ApiBody> {
    if status != StatusCode::SWITCHING_PROTOCOLS {
        if status == StatusCode::UNAUTHORIZED {
            shared.unauthorized.send_modify(|n| *n += 1);
        }
        return json_response(status, json!({ "error": status.as_u16() }));
    }
    let key = headers
        .get(SEC_WEBSOCKET_KEY)
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    let accept = derive_accept_key(key);
    tokio::spawn(echo(Arc::clone(shared), upgrade));
    let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("a base64 accept key"),
    );
    response
}

async fn echo(shared: Arc<Shared>, upgrade: OnUpgrade) {
    let Ok(upgraded) = upgrade.await else {
        return;
    };
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
    shared.ws_opened.send_modify(|n| *n += 1);
    while let Some(Ok(message)) = ws.next().await {
        let echo = match message {
            Message::Text(text) if text.as_str() == DROP => break,
            Message::Text(text) if text.as_str() == SINK => {
                sink(&shared, &mut ws).await;
                break;
            }
            Message::Text(text) if text.as_str().starts_with(FLOOD) => {
                let count = text.as_str()[FLOOD.len()..].parse().expect("flood N");
                if flood(&shared, &mut ws, count).await.is_err() {
                    break;
                }
                continue;
            }
            Message::Text(_) | Message::Binary(_) => message,
            // Pings are answered and close frames echoed by tungstenite itself.
            _ => continue,
        };
        if ws.send(echo).await.is_err() {
            break;
        }
    }
    drop(ws);
    shared.ws_closed.send_modify(|n| *n += 1);
}

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Sends `count` numbered messages (the number in the first 8 bytes), counting the
/// bytes of each once its send completed: a client that does not read holds it up.
async fn flood(shared: &Shared, ws: &mut Ws, count: u64) -> Result<(), tungstenite::Error> {
    for n in 0..count {
        let mut payload = vec![0u8; FLOOD_MESSAGE];
        payload[..8].copy_from_slice(&n.to_le_bytes());
        ws.send(Message::Binary(payload.into())).await?;
        shared
            .ws_flooded
            .send_modify(|bytes| *bytes += FLOOD_MESSAGE as u64);
    }
    Ok(())
}

/// Reads nothing until the gate opens, then counts every message's bytes.
async fn sink(shared: &Shared, ws: &mut Ws) {
    // Err only if the API is gone, and then nobody counts.
    let _ = shared.gate.subscribe().wait_for(|open| *open).await;
    while let Some(Ok(message)) = ws.next().await {
        let n = message.len() as u64;
        shared.ws_sunk.send_modify(|bytes| *bytes += n);
    }
}
