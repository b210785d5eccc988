//! Issue 11: the upstream pool, seen from the upstream. An h2 stream the upstream refuses
//! is resent once, on a fresh connection, and counted; a burst of first requests to an h2
//! upstream makes one connection (one TLS and h2 handshake) that carries them all; a
//! burst of HTTP/1.1 requests never holds more than `upstream.max_connections_per_host`
//! connections; a connection that said GOAWAY is never lent again, though it stays open
//! for the streams it still carries; and a connection unused for `upstream.idle_timeout`
//! is closed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use credproxy::metrics::RetryReason;
use http::{Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::support::admin::Admin;
use crate::support::client;
use crate::support::h2_frames;
use crate::support::proxy::{InProcess, ProxyOptions, Setup};
use crate::support::relay::Relay;
use crate::support::serve;
use crate::support::token::WAIT;
use crate::support::wait;

/// Resends of `route` by reason, in `RetryReason::ALL`'s order.
async fn resends(proxy: &InProcess, route: &str) -> Vec<(&'static str, f64)> {
    let scrape = Admin::new(proxy.admin_addr).metrics().await;
    RetryReason::ALL
        .iter()
        .map(|reason| {
            let labels = [("route", route), ("reason", reason.as_str())];
            (
                reason.as_str(),
                scrape.get("credproxy_upstream_retries_total", &labels),
            )
        })
        .collect()
}

/// What the refusing upstream saw: per connection (in accept order), the bodies of the
/// requests it processed, and how many streams it refused.
#[derive(Default)]
struct Refusing {
    connections: Mutex<Vec<Vec<String>>>,
    refused: AtomicUsize,
}

/// An h2-only TLS upstream that refuses (RST_STREAM REFUSED_STREAM) the first stream of
/// its first connection, unread, and answers every other stream "ok".
async fn refusing_upstream(acceptor: TlsAcceptor, seen: Arc<Refusing>) -> std::net::SocketAddr {
    let listener = serve::bind("refusing upstream").await;
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let index = {
                let mut connections = seen.connections.lock().unwrap();
                connections.push(Vec::new());
                connections.len() - 1
            };
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let tls = acceptor.accept(tcp).await.unwrap();
                let mut connection = h2::server::handshake(tls).await.unwrap();
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    if index == 0 && seen.refused.fetch_add(1, Ordering::SeqCst) == 0 {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let mut body = request.into_body();
                        let mut text = Vec::new();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            text.extend_from_slice(&chunk);
                        }
                        let text = String::from_utf8_lossy(&text).into_owned();
                        seen.connections.lock().unwrap()[index].push(text);
                        let mut stream = respond.send_response(Response::new(()), false).unwrap();
                        let _ = stream.send_data(Bytes::from_static(b"ok"), true);
                    });
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_resent_once_on_a_fresh_connection_and_counted() {
    let setup = Setup::start().await;
    let seen = Arc::new(Refusing::default());
    let upstream =
        refusing_upstream(setup.ca.h2_only_acceptor_for(&["api.test"]), seen.clone()).await;
    let proxy = setup
        .start_proxy(&ProxyOptions::default().resolve("api.test:443", upstream))
        .await;

    // A POST: what the upstream refused it did not process, whatever the method.
    let http = client::reqwest_via(proxy.proxy_addr, setup.credproxy_roots());
    let response = http
        .post("https://api.test/refused")
        .body("the one post")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "ok");

    assert_eq!(seen.refused.load(Ordering::SeqCst), 1);
    assert_eq!(
        *seen.connections.lock().unwrap(),
        [vec![], vec!["the one post".to_owned()]],
        "processed once, on a second connection"
    );
    let counted = resends(&proxy, "api.test").await;
    assert_eq!(
        counted,
        [
            ("refused_stream", 1.0),
            ("goaway", 0.0),
            ("closed_before_write", 0.0),
            ("closed_before_response", 0.0)
        ]
    );
    proxy.stop().await;
}

/// What the scripted upstream saw: per connection (in accept order), the ids of the
/// streams whose HEADERS arrived.
#[derive(Default)]
struct Scripted {
    streams: Mutex<Vec<Vec<u32>>>,
}

/// An h2-only TLS upstream written frame by frame, to say GOAWAY as no h2 server
/// library does on demand: its first connection holds stream 1 unanswered and
/// answers the next stream with GOAWAY (last stream id 1), staying open for stream
/// 1; its second refuses every stream; later ones answer every stream 200 "ok".
async fn scripted_upstream(acceptor: TlsAcceptor, seen: Arc<Scripted>) -> std::net::SocketAddr {
    let listener = serve::bind("scripted upstream").await;
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let index = {
                let mut streams = seen.streams.lock().unwrap();
                streams.push(Vec::new());
                streams.len() - 1
            };
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if !h2_frames::accept(&mut tls).await {
                    return;
                }
                while let Some(frame) = h2_frames::read(&mut tls).await {
                    let reply = if let Some(ack) = frame.ack() {
                        ack
                    } else if frame.kind == h2_frames::HEADERS {
                        let stream = frame.stream;
                        seen.streams.lock().unwrap()[index].push(stream);
                        match index {
                            0 if stream == 1 => continue,
                            0 => h2_frames::goaway(1),
                            1 => h2_frames::reset(stream, h2_frames::REFUSED_STREAM),
                            _ => h2_frames::ok(stream, b"ok"),
                        }
                    } else {
                        continue;
                    };
                    if tls.write_all(&reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_said_goaway_is_never_lent_again() {
    let setup = Setup::start().await;
    let seen = Arc::new(Scripted::default());
    let upstream =
        scripted_upstream(setup.ca.h2_only_acceptor_for(&["api.test"]), seen.clone()).await;
    let proxy = setup
        .start_proxy(&ProxyOptions::default().resolve("api.test:443", upstream))
        .await;

    // A long request keeps the first connection open after its GOAWAY: to hyper it
    // still looks ready for more streams.
    let http = client::reqwest_via(proxy.proxy_addr, setup.credproxy_roots());
    let held = tokio::spawn({
        let http = http.clone();
        async move { http.get("https://api.test/held").send().await }
    });
    wait::until("the upstream holds the first stream", || {
        *seen.streams.lock().unwrap() == [vec![1]]
    })
    .await;

    // GOAWAY'd on the first connection, refused on a second, the POST needs both its
    // resends: the second must go to a third connection, not back to the first.
    let response = http
        .post("https://api.test/after-goaway")
        .body("the one post")
        .send()
        .await
        .unwrap();
    let status = response.status();
    assert_eq!(
        (status, response.text().await.unwrap()),
        (StatusCode::OK, "ok".to_owned())
    );
    assert_eq!(
        *seen.streams.lock().unwrap(),
        [vec![1, 3], vec![1], vec![1]],
        "streams per upstream connection"
    );
    assert_eq!(
        resends(&proxy, "api.test").await,
        [
            ("refused_stream", 1.0),
            ("goaway", 1.0),
            ("closed_before_write", 0.0),
            ("closed_before_response", 0.0)
        ]
    );
    held.abort();
    proxy.stop().await;
}

/// First requests racing to one h2 upstream.
const COLD_START_REQUESTS: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_first_requests_to_an_h2_upstream_opens_one_connection() {
    let setup = Setup::start().await;
    // The API speaks h2 (ALPN); the relay holds the pool's first connection, TLS
    // handshake and all, until every request is in.
    let relay = Relay::gated(setup.api.https_addr()).await;
    let proxy = setup
        .start_proxy(&ProxyOptions::default().resolve("api.test:443", relay.addr()))
        .await;

    let mut clients = Vec::new();
    for i in 0..COLD_START_REQUESTS {
        let mut tcp = TcpStream::connect(proxy.proxy_addr).await.unwrap();
        let request = format!(
            "GET http://api.test/cold/{i} HTTP/1.1\r\nhost: api.test\r\nconnection: close\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        clients.push(tcp);
    }
    relay.wait_for_accepted(1).await;
    Admin::new(proxy.admin_addr)
        .wait_for_metrics("every request's connection is open", |s| {
            s.value("credproxy_client_connections", &[]) >= Some(COLD_START_REQUESTS as f64)
        })
        .await;
    relay.open();

    let mut answers = tokio::task::JoinSet::new();
    for mut tcp in clients {
        answers.spawn(async move {
            let mut answer = Vec::new();
            tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer))
                .await
                .unwrap()
                .unwrap();
            String::from_utf8_lossy(&answer).into_owned()
        });
    }
    while let Some(answer) = answers.join_next().await {
        let answer = answer.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    }
    assert_eq!(setup.api.requests(), COLD_START_REQUESTS as u64);
    assert_eq!(relay.accepted(), 1, "connections to the upstream");
    println!(
        "FIGURES upstream_pool cold start: {COLD_START_REQUESTS} concurrent first requests, {} upstream connection(s)",
        relay.accepted()
    );
    proxy.stop().await;
}

const MAX_PER_HOST: u64 = 4;
const BURST: usize = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_burst_never_holds_more_than_max_connections_per_host() {
    let setup = Setup::start().await;
    // Plain HTTP to the API's HTTP/1.1 listener, through a relay that counts.
    let relay = Relay::start(setup.api.http_addr()).await;
    let options = ProxyOptions::default()
        .upstream_tls(false)
        .resolve("api.test:80", relay.addr())
        .upstream_key("max_connections_per_host", &MAX_PER_HOST.to_string());
    let proxy = setup.start_proxy(&options).await;

    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..BURST {
        // One client per request: each its own connection to the proxy.
        let http = client::reqwest_via(proxy.proxy_addr, setup.credproxy_roots());
        burst.spawn(async move { http.get("http://api.test/gate").send().await });
    }
    // Every request is in; each upstream connection carries one, parked at the API, and
    // the rest wait for a connection.
    Admin::new(proxy.admin_addr)
        .wait_for_metrics("every request's connection is open", |s| {
            s.value("credproxy_client_connections", &[]) >= Some(BURST as f64)
        })
        .await;
    setup.api.wait_for_parked(MAX_PER_HOST).await;
    assert_eq!(relay.accepted(), MAX_PER_HOST, "connections opened");
    setup.api.open_gate();
    while let Some(response) = burst.join_next().await {
        assert_eq!(response.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(setup.api.requests(), BURST as u64);
    // The API keeps connections alive: every request rode one of the first four.
    assert_eq!(
        (relay.accepted(), relay.peak()),
        (MAX_PER_HOST, MAX_PER_HOST),
        "connections opened, and open at once"
    );
    println!(
        "FIGURES upstream_pool h1 bound: {BURST} concurrent requests, max_connections_per_host = {MAX_PER_HOST}: {} connections opened, at most {} open at once",
        relay.accepted(),
        relay.peak()
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_at_the_bound_closes_an_idle_connection_instead_of_waiting() {
    let setup = Setup::start().await;
    let relay = Relay::start(setup.api.http_addr()).await;
    // Without room, the POST would wait for a connection until the response timeout.
    let options = ProxyOptions::default()
        .upstream_tls(false)
        .resolve("api.test:80", relay.addr())
        .upstream_key("max_connections_per_host", "1")
        .response_timeout("5s");
    let proxy = setup.start_proxy(&options).await;
    let http = client::reqwest_via(proxy.proxy_addr, setup.credproxy_roots());

    let get = http.get("http://api.test/first").send().await.unwrap();
    assert_eq!(get.status(), StatusCode::OK);
    get.bytes().await.unwrap();
    // The GET's connection is idle in the pool now; a POST never rides an idle one.
    let post = http
        .post("http://api.test/second")
        .body("posted")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::OK);
    assert_eq!(relay.accepted(), 2, "connections opened");
    wait::until("the idle connection is closed", || relay.open_now() == 1).await;
    proxy.stop().await;
}

const IDLE_TIMEOUT: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let setup = Setup::start().await;
    let h2 = Relay::start(setup.api.https_addr()).await;
    let h1 = Relay::start(setup.api.http_addr()).await;
    let options = ProxyOptions::default()
        .resolve("api.test:443", h2.addr())
        .resolve("h1.test:80", h1.addr())
        .upstream_key("idle_timeout", &format!("\"{}s\"", IDLE_TIMEOUT.as_secs()))
        .extra("[[routes]]\nhost = \"h1.test\"\nintegration = \"demo\"\nupstream_tls = false\n");
    let proxy = setup.start_proxy(&options).await;
    let http = client::reqwest_via(proxy.proxy_addr, setup.credproxy_roots());

    for (relay, url) in [(&h2, "http://api.test/idle"), (&h1, "http://h1.test/idle")] {
        let sent = Instant::now();
        let response = http.get(url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{url}");
        response.bytes().await.unwrap();
        assert_eq!(relay.accepted(), 1, "{url}");
        relay.wait_for_all_closed().await;
        let idled = sent.elapsed();
        assert!(idled >= IDLE_TIMEOUT, "{url}: closed after {idled:?}");
        println!(
            "FIGURES upstream_pool idle: {url}'s connection closed {idled:?} after the request (idle_timeout {IDLE_TIMEOUT:?})"
        );

        // The next request gets a new connection.
        let response = http.get(url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{url}");
        assert_eq!(relay.accepted(), 2, "{url}");
    }
    proxy.stop().await;
}
