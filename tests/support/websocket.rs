//! WebSocket clients through credproxy, framed by tokio-tungstenite: its own client
//! handshake over any stream (a TLS or plain tunnel, a sidecar connection), or an
//! absolute-form upgrade to the forward proxy, which tungstenite cannot write, made
//! with hyper and checked against RFC 6455 by hand. Plus the checks tests share.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use http::{Request, StatusCode};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{self, Message};

use super::client::{self, CLIENT_TIMEOUT};

/// A client-sent token the upstream must never see.
pub const CLIENT_TOKEN: &str = "Bearer client-SECRET-must-be-replaced";

/// What a handshake ended with: a connection, or the HTTP answer that refused it.
pub enum Opened<S> {
    Open(Box<WebSocketStream<S>>),
    Refused(StatusCode),
}

impl<S> Opened<S> {
    pub fn open(self) -> WebSocketStream<S> {
        match self {
            Self::Open(ws) => *ws,
            Self::Refused(status) => panic!("the WebSocket handshake was answered {status}"),
        }
    }
}

/// tungstenite's client handshake for `url` over `io`, sending `Authorization:
/// CLIENT_TOKEN` (credproxy must replace it).
pub async fn open<S>(io: S, url: &str) -> Opened<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut request = url.into_client_request().expect("a valid WebSocket URL");
    request.headers_mut().insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_static(CLIENT_TOKEN),
    );
    let handshake =
        tokio::time::timeout(CLIENT_TIMEOUT, tokio_tungstenite::client_async(request, io))
            .await
            .expect("the WebSocket handshake did not finish in time");
    match handshake {
        Ok((ws, response)) => {
            assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
            Opened::Open(Box::new(ws))
        }
        Err(tungstenite::Error::Http(response)) => Opened::Refused(response.status()),
        Err(error) => panic!("WebSocket handshake with {url}: {error}"),
    }
}

/// `GET url` (absolute-form, e.g. `http://api.test/ws`) to the forward proxy as a
/// WebSocket handshake, with `Authorization: CLIENT_TOKEN`.
pub async fn open_via_proxy(proxy: SocketAddr, url: &str) -> Opened<TokioIo<Upgraded>> {
    let tcp = TcpStream::connect(proxy)
        .await
        .unwrap_or_else(|e| panic!("connecting to the proxy at {proxy}: {e}"));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("HTTP/1.1 handshake with the proxy");
    tokio::spawn(connection.with_upgrades());
    let host = url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .expect("a URL with a host");
    let key = generate_key();
    let request = Request::get(url)
        .header("host", host)
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "Upgrade")
        .header("sec-websocket-version", "13")
        .header(SEC_WEBSOCKET_KEY, &key)
        .header(http::header::AUTHORIZATION, CLIENT_TOKEN)
        .body(client::empty())
        .expect("a valid request");
    let response = tokio::time::timeout(CLIENT_TIMEOUT, sender.send_request(request))
        .await
        .expect("the proxy did not answer the handshake in time")
        .expect("sending the handshake");
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Opened::Refused(response.status());
    }
    let header = |name| {
        response
            .headers()
            .get(name)
            .and_then(|v: &http::HeaderValue| v.to_str().ok())
            .map(str::to_ascii_lowercase)
    };
    assert_eq!(header(UPGRADE).as_deref(), Some("websocket"));
    assert_eq!(header(CONNECTION).as_deref(), Some("upgrade"));
    assert_eq!(
        response
            .headers()
            .get(SEC_WEBSOCKET_ACCEPT)
            .map(|v| v.as_bytes()),
        Some(derive_accept_key(key.as_bytes()).as_bytes()),
        "Sec-WebSocket-Accept must answer the key the client sent"
    );
    let upgraded = hyper::upgrade::on(response)
        .await
        .expect("taking over the upgraded connection");
    let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    Opened::Open(Box::new(ws))
}

/// Sends `message` and asserts the same message comes back next.
pub async fn echo<S>(ws: &mut WebSocketStream<S>, message: Message)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(message.clone()).await.expect("sending a message");
    let back = tokio::time::timeout(CLIENT_TIMEOUT, ws.next())
        .await
        .expect("no echo in time")
        .expect("the connection closed before the echo")
        .expect("reading the echo");
    assert!(back == message, "the echo differs from what was sent");
}

/// Messages of 1 byte up to 1 MiB, text and binary, each echoed in order.
pub async fn echo_up_to_1_mib<S>(ws: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    echo(ws, Message::text("hello through credproxy")).await;
    for size in [1usize, 125, 126, 65_535, 65_536, 1024 * 1024] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        echo(ws, Message::Binary(Bytes::from(payload))).await;
    }
    // Several in flight at once come back in the order they were sent.
    for n in 0..20 {
        ws.send(Message::text(format!("burst {n}")))
            .await
            .expect("sending a burst message");
    }
    for n in 0..20 {
        let back = ws.next().await.expect("an echo").expect("reading an echo");
        assert_eq!(back, Message::text(format!("burst {n}")));
    }
}

/// Asserts the connection ends (closed, reset or a close frame) within `within`.
pub async fn assert_closed_within<S>(ws: &mut WebSocketStream<S>, within: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ended = tokio::time::timeout(within, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the WebSocket was still open after {within:?}"
    );
}
