//! WebSockets to a routed host through credproxy: interception (CONNECT + TLS, and plain
//! text inside a tunnel), the plain-HTTP forward path, a sidecar, and h2's extended
//! CONNECT. The test API's `/ws` accepts only a token the test token endpoint issued, so
//! every 101 here proves the integration's token was injected; `Seen` proves the
//! client's own `Authorization` never reached it. Then the upgraded connection behaves
//! as a tunnel: messages up to 1 MiB echo in order, a close on either side closes the
//! other, it is counted, logged, idle-timed-out and stopped with the proxy.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::support::admin::Admin;
use crate::support::client;
use crate::support::proxy::{InProcess, ProxyOptions, Setup};
use crate::support::upstream::ws::{DROP, FLOOD, FLOOD_MESSAGE, SINK};
use crate::support::websocket::{self, CLIENT_TOKEN, Opened};

const TUNNELS: &str = "credproxy_tunnels";
/// How soon a close on one side must reach the other.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

/// A WebSocket to `/ws` through CONNECT api.test:443 and TLS (ALPN http/1.1).
async fn open_intercepted(
    setup: &Setup,
    proxy: &InProcess,
) -> Opened<TlsStream<TokioIo<Upgraded>>> {
    let tls = setup.intercepted_tls(proxy.proxy_addr, b"http/1.1").await;
    websocket::open(tls, "wss://api.test/ws").await
}

/// The last `/ws` handshake the API saw came over TLS with the integration's current
/// token only; no request ever carried the client's own.
fn assert_upstream_saw_our_token(setup: &Setup) {
    let seen = setup.api.last();
    assert_eq!(seen.path, "/ws");
    assert!(seen.tls, "credentials travel to the API over TLS");
    // The API offers h2, which the pool uses; an upgrade needs its own HTTP/1.1 connection.
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(
        seen.authorization(),
        [format!("Bearer {}", setup.current_token())]
    );
    for request in setup.api.seen() {
        assert!(
            !request.authorization().iter().any(|a| a == CLIENT_TOKEN),
            "the client's own token reached the API"
        );
    }
}

/// A proxy with `options`; `open` makes the handshake through it, which must reach the
/// API with our token; then messages up to 1 MiB echo in order.
async fn handshake_gets_our_token_and_echoes<S>(
    options: ProxyOptions,
    open: impl AsyncFnOnce(&Setup, &InProcess) -> Opened<S>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&options).await;
    let mut ws = open(&setup, &proxy).await.open();
    assert_upstream_saw_our_token(&setup);
    websocket::echo_up_to_1_mib(&mut ws).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_connect_and_tls_the_handshake_gets_our_token_and_messages_up_to_1_mib_echo() {
    handshake_gets_our_token_and_echoes(ProxyOptions::default(), open_intercepted).await;
}

/// Plain text inside the tunnel; the route's `upstream_tls` (default) still means TLS
/// upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_plain_text_inside_a_connect_tunnel_the_handshake_gets_our_token() {
    handshake_gets_our_token_and_echoes(ProxyOptions::default(), async |_, proxy| {
        let tunnel = client::connect(proxy.proxy_addr, "api.test:80", &[])
            .await
            .tunnel();
        websocket::open(tunnel, "ws://api.test/ws").await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_plain_http_forward_path_the_handshake_gets_our_token() {
    handshake_gets_our_token_and_echoes(ProxyOptions::default(), async |_, proxy| {
        websocket::open_via_proxy(proxy.proxy_addr, "http://api.test/ws").await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_sidecar_the_handshake_gets_our_token() {
    let options = ProxyOptions::default().sidecar("https://api.test");
    handshake_gets_our_token_and_echoes(options, async |_, proxy| {
        let sidecar = proxy.sidecar_addrs[0];
        let tcp = TcpStream::connect(sidecar)
            .await
            .expect("connect to sidecar");
        websocket::open(tcp, &format!("ws://{sidecar}/ws")).await
    })
    .await;
}

/// RFC 8441: an h2 client's extended CONNECT (`:protocol = websocket`) is bridged to an
/// HTTP/1.1 upgrade upstream, answered 200, and then carries WebSocket frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_extended_connect_is_bridged_to_an_http1_upgrade_upstream() {
    handshake_gets_our_token_and_echoes(ProxyOptions::default(), async |setup, proxy| {
        let tls = setup.intercepted_tls(proxy.proxy_addr, b"h2").await;
        let mut h2 = client::h2(tls).await;
        // One exchange first, so the proxy's SETTINGS (ENABLE_CONNECT_PROTOCOL) have arrived.
        let echo = client::get("https://api.test/echo", "", &[]);
        assert_eq!(client::send2(&mut h2, echo).await.status, StatusCode::OK);
        assert_eq!(
            setup.api.last().version,
            http::Version::HTTP_2,
            "ordinary requests reach the API over the pooled h2 connection"
        );

        let mut request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("https://api.test/ws")
            .header("sec-websocket-version", "13")
            .header("authorization", CLIENT_TOKEN)
            .body(client::empty())
            .expect("a valid request");
        request
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        let response = tokio::time::timeout(client::CLIENT_TIMEOUT, h2.send_request(request))
            .await
            .expect("no answer to the extended CONNECT in time")
            .expect("sending the extended CONNECT");
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response.headers().get("sec-websocket-accept").is_none(),
            "h2 has no accept key"
        );
        let upgraded = hyper::upgrade::on(response)
            .await
            .expect("the extended CONNECT stream");
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
        Opened::Open(Box::new(ws))
    })
    .await;
}

/// The API answers 401 to a revoked token: one forced refresh, one resend, then 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_gets_one_refresh_then_the_101() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;
    let refreshes = setup.tokens.successes();
    setup.tokens.revoke_access_tokens();

    let mut ws = open_intercepted(&setup, &proxy).await.open();
    assert_eq!(setup.tokens.successes(), refreshes + 1, "one refresh");
    assert_eq!(setup.api.unauthorized(), 1, "one 401 upstream");
    let statuses: Vec<StatusCode> = setup.api.seen().iter().map(|s| s.status).collect();
    assert_eq!(
        statuses,
        [StatusCode::UNAUTHORIZED, StatusCode::SWITCHING_PROTOCOLS]
    );
    assert_upstream_saw_our_token(&setup);
    websocket::echo(&mut ws, Message::text("after the refresh")).await;
    proxy.stop().await;
}

/// A 401 that a refresh cannot fix reaches the client as the API's 401, not a 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_401_is_passed_to_the_client() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;
    // The token endpoint keeps working, but no token it issues is ever accepted.
    setup.api.reject_all_tokens();
    match open_intercepted(&setup, &proxy).await {
        Opened::Refused(status) => assert_eq!(status, StatusCode::UNAUTHORIZED),
        Opened::Open(_) => panic!("the API accepted no token, yet the client got a 101"),
    }
    assert_eq!(setup.api.unauthorized(), 2, "the first try and one resend");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_either_end_closes_the_other_within_a_second() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;

    // The client goes away without a closing handshake: the API's side ends.
    let mut ws = open_intercepted(&setup, &proxy).await.open();
    websocket::echo(&mut ws, Message::text("before the client closes")).await;
    setup.api.wait_for_ws_opened(1).await;
    drop(ws);
    setup.api.wait_for_ws_closed(1, CLOSE_WITHIN).await;

    // The API drops its connection: the client's side ends.
    let mut ws = websocket::open_via_proxy(proxy.proxy_addr, "http://api.test/ws")
        .await
        .open();
    ws.send(Message::text(DROP)).await.expect("sending drop");
    websocket::assert_closed_within(&mut ws, CLOSE_WITHIN).await;
    setup.api.wait_for_ws_closed(2, CLOSE_WITHIN).await;
    proxy.stop().await;
}

/// `limits.tunnel_idle_timeout` closes an upgraded connection with no bytes either way,
/// and leaves one in use open past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_timeout_closes_an_idle_upgraded_connection_and_not_an_active_one() {
    let setup = Setup::start().await;
    let options = ProxyOptions::default().limit("tunnel_idle_timeout", "\"1s\"");
    let proxy = setup.start_proxy(&options).await;
    let mut idle = open_intercepted(&setup, &proxy).await.open();
    let mut active = open_intercepted(&setup, &proxy).await.open();
    setup.api.wait_for_ws_opened(2).await;

    // 2.4 s of traffic, a message every 200 ms (pacing, not synchronisation).
    for n in 0..12 {
        websocket::echo(&mut active, Message::text(format!("still here {n}"))).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    setup.api.wait_for_ws_closed(1, CLOSE_WITHIN).await;
    assert_eq!(
        setup.api.ws_closed(),
        1,
        "only the idle connection was closed"
    );
    websocket::assert_closed_within(&mut idle, CLOSE_WITHIN).await;
    websocket::echo(&mut active, Message::text("after the idle one closed")).await;
    proxy.stop().await;
}

/// While open, an upgraded connection holds its client connection's place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_counts_against_max_connections() {
    let setup = Setup::start().await;
    let proxy = setup
        .start_proxy(&ProxyOptions::default().max_connections(1))
        .await;
    let ws = websocket::open_via_proxy(proxy.proxy_addr, "http://api.test/ws")
        .await
        .open();
    let refused = client::raw_exchange(proxy.proxy_addr, b"").await;
    assert!(
        refused.starts_with("HTTP/1.1 503"),
        "a second connection while the WebSocket is open: {refused:?}"
    );
    drop(ws);
    Admin::new(proxy.admin_addr)
        .wait_for_metrics("the WebSocket's place is free again", |s| {
            s.value("credproxy_client_connections", &[]) == Some(0.0)
        })
        .await;
    let mut ws = websocket::open_via_proxy(proxy.proxy_addr, "http://api.test/ws")
        .await
        .open();
    websocket::echo(&mut ws, Message::text("admitted again")).await;
    proxy.stop().await;
}

/// Stopping credproxy closes open upgraded connections instead of waiting for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_closes_an_open_upgraded_connection() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;
    let mut ws = open_intercepted(&setup, &proxy).await.open();
    websocket::echo(&mut ws, Message::text("before the stop")).await;
    proxy.stop().await;
    websocket::assert_closed_within(&mut ws, CLOSE_WITHIN).await;
}

/// `credproxy_tunnels{kind="upgraded"}` counts the open upgraded connection, and its
/// request line is written when it closes: status 101, bytes each way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_is_counted_and_logged_with_bytes_both_ways_when_it_closes() {
    let setup = Setup::start().await;
    let proxy = setup
        .spawn_proxy_with(&ProxyOptions::default(), &["--log-format", "json"], &[])
        .await;
    let admin = Admin::new(proxy.admin_addr);
    admin.wait_for_readyz(StatusCode::OK).await;
    let mut ws = websocket::open_via_proxy(proxy.proxy_addr, "http://api.test/ws")
        .await
        .open();
    admin
        .wait_for_metrics("one upgraded tunnel is counted", |s| {
            s.value(TUNNELS, &[("kind", "upgraded")]) == Some(1.0)
        })
        .await;
    websocket::echo(&mut ws, Message::Binary(vec![7u8; 10_000].into())).await;
    assert!(
        !proxy.log().contains("\"status\":101"),
        "the line of an open upgraded connection is written when it closes"
    );
    ws.close(None).await.expect("closing the WebSocket");
    drop(ws);
    let line = proxy.wait_for_log("\"status\":101").await;
    let event: Value = serde_json::from_str(&line).expect("a JSON log line");
    let fields = event.get("fields").unwrap_or(&event);
    assert_eq!(fields["method"], "GET", "{line}");
    let down = fields["bytes"].as_u64().expect("bytes");
    let up = fields["bytes_up"].as_u64().expect("bytes_up");
    // 10,000 bytes of payload each way, plus framing (and the client's masks).
    assert!(
        (10_000..10_100).contains(&down),
        "bytes to the client: {line}"
    );
    assert!(
        (10_000..10_100).contains(&up),
        "bytes from the client: {line}"
    );
    admin
        .wait_for_metrics("the closed upgraded tunnel is no longer counted", |s| {
            s.value(TUNNELS, &[("kind", "upgraded")]) == Some(0.0)
        })
        .await;
    let exit = proxy.stop().await;
    assert_eq!(exit.code, Some(0), "{}", exit.log);
}

/// Messages of the flood and sink tests; far more than socket buffers hold.
const BACKLOG: u64 = 64;
const MIB: u64 = 1024 * 1024;

/// Waits until `progress` has not moved for half a second (a writer held up cannot be
/// awaited: it is the absence of an event) and returns its value then.
async fn when_stalled(mut progress: impl FnMut() -> u64) -> u64 {
    const QUIET: Duration = Duration::from_millis(500);
    let deadline = tokio::time::Instant::now() + crate::support::token::WAIT;
    let mut last = progress();
    loop {
        tokio::time::sleep(QUIET).await;
        let now = progress();
        if now == last {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the writer never stalled ({now} bytes so far)"
        );
        last = now;
    }
}

/// Backpressure both ways: a side that stops reading holds up the writer on the other
/// side after a bounded amount (socket buffers, not credproxy memory), and once it reads
/// again everything arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_side_that_stops_reading_holds_up_the_writer_on_the_other_side() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;
    let mut ws = websocket::open_via_proxy(proxy.proxy_addr, "http://api.test/ws")
        .await
        .open();

    // The API floods a client that does not read.
    ws.send(Message::text(format!("{FLOOD}{BACKLOG}")))
        .await
        .expect("asking for a flood");
    let held = when_stalled(|| setup.api.ws_flooded()).await;
    println!(
        "upstream → client: the API was held up after {} MiB",
        held / MIB
    );
    assert!(
        held < BACKLOG * MIB / 2,
        "{held} bytes were taken from the API"
    );
    for n in 0..BACKLOG {
        let message = tokio::time::timeout(client::CLIENT_TIMEOUT, ws.next())
            .await
            .expect("a flood message in time")
            .expect("the flood goes on")
            .expect("reading the flood");
        assert_eq!(message.len(), FLOOD_MESSAGE);
        assert_eq!(
            message.into_data()[..8],
            n.to_le_bytes(),
            "message {n} in order"
        );
    }
    assert_eq!(setup.api.ws_flooded(), BACKLOG * MIB);

    // The client writes to an API that does not read.
    ws.send(Message::text(SINK))
        .await
        .expect("asking for a sink");
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = sent.clone();
    let writer = tokio::spawn(async move {
        for _ in 0..BACKLOG {
            ws.send(Message::binary(vec![1u8; FLOOD_MESSAGE]))
                .await
                .expect("sending to the sink");
            counted.fetch_add(FLOOD_MESSAGE as u64, std::sync::atomic::Ordering::Relaxed);
        }
        ws
    });
    let held = when_stalled(|| sent.load(std::sync::atomic::Ordering::Relaxed)).await;
    println!(
        "client → upstream: the client was held up after {} MiB",
        held / MIB
    );
    assert!(
        held < BACKLOG * MIB / 2,
        "{held} bytes were taken from the client"
    );
    assert_eq!(setup.api.ws_sunk(), 0, "the API has not read yet");
    setup.api.open_gate();
    setup.api.wait_for_ws_sunk(BACKLOG * MIB).await;
    drop(writer.await.expect("the writer"));
    proxy.stop().await;
}
