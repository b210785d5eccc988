//! Issue 11: a request never fails because of the pool. Through an h2 upstream that
//! sends GOAWAY every few streams and at random points, and an HTTP/1.1 upstream that
//! closes keep-alive connections right after responses or after very short idle
//! times, 2,080 mixed GET/POST requests from keep-alive clients all succeed, and every
//! POST reaches an upstream exactly once.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::RngExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

use credproxy::metrics::RetryReason;

use crate::support::admin::Admin;
use crate::support::client;
use crate::support::proxy::{ProxyOptions, Setup};

const CLIENTS: usize = 16;
const REQUESTS_PER_CLIENT: usize = 130;
/// The h2 upstream says GOAWAY after this many streams on a connection …
const GOAWAY_EVERY: u64 = 7;
/// … and, besides, after one stream in this many.
const GOAWAY_RANDOMLY: u32 = 13;

/// What the flaky upstreams saw.
#[derive(Default)]
struct Seen {
    /// POST body (a unique id) → times processed.
    posts: Mutex<HashMap<String, u32>>,
    requests: AtomicU64,
    goaways: AtomicU64,
    closes: AtomicU64,
}

impl Seen {
    fn record(&self, method: &str, body: &[u8]) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if method == "POST" {
            let id = String::from_utf8_lossy(body).into_owned();
            *self.posts.lock().unwrap().entry(id).or_default() += 1;
        }
    }
}

/// An h2-only TLS upstream that gracefully shuts each connection down (GOAWAY) after
/// `GOAWAY_EVERY` streams, or earlier at random.
async fn goaway_upstream(acceptor: TlsAcceptor, seen: Arc<Seen>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                // A second descriptor of the socket lets the connection close
                // lingering, as nginx does: a close while the client's frames are
                // still in flight would reset it, and the reset would discard the
                // GOAWAY the client has not read yet.
                let std = tcp.into_std().unwrap();
                let linger = TcpStream::from_std(std.try_clone().unwrap()).unwrap();
                let tcp = TcpStream::from_std(std).unwrap();
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let shutdown = Arc::new(Notify::new());
                let streams = Arc::new(AtomicU64::new(0));
                let service = {
                    let (seen, shutdown) = (seen.clone(), shutdown.clone());
                    service_fn(move |request: Request<Incoming>| {
                        let (seen, shutdown, streams) =
                            (seen.clone(), shutdown.clone(), streams.clone());
                        async move {
                            let method = request.method().to_string();
                            // A request whose body never fully arrived is not processed.
                            if let Ok(body) = request.into_body().collect().await {
                                seen.record(&method, &body.to_bytes());
                            }
                            let n = streams.fetch_add(1, Ordering::Relaxed) + 1;
                            let random = rand::rng().random_range(0..GOAWAY_RANDOMLY) == 0;
                            if n % GOAWAY_EVERY == 0 || random {
                                shutdown.notify_one();
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                        }
                    })
                };
                let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service);
                tokio::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => return,
                    () = shutdown.notified() => {}
                }
                seen.goaways.fetch_add(1, Ordering::Relaxed);
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
                linger_close(linger).await;
            });
        }
    });
    addr
}

/// Reads (and drops) what the client still sends until it closes, bounded.
async fn linger_close(mut tcp: TcpStream) {
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async { while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
}

/// A hand-written HTTP/1.1 upstream that never says `Connection: close` but closes
/// the connection right after a response (one in three) or once it idled for a random
/// 1–30 ms.
async fn closing_upstream(seen: Arc<Seen>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(serve_closing(tcp, seen.clone()));
        }
    });
    addr
}

async fn serve_closing(mut tcp: TcpStream, seen: Arc<Seen>) {
    let mut buffer = Vec::new();
    let mut served = 0;
    loop {
        // A connection that served a request waits a random 1–30 ms for the next one.
        let idle = if served == 0 {
            Duration::from_secs(60)
        } else {
            Duration::from_millis(rand::rng().random_range(1..=30))
        };
        let head_end = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            // The first byte of a request may take at most `idle`; then we hang up.
            let read = if buffer.is_empty() {
                match tokio::time::timeout(idle, tcp.read(&mut chunk)).await {
                    Ok(read) => read,
                    Err(_) => {
                        seen.closes.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            } else {
                tcp.read(&mut chunk).await
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let method = head.split(' ').next().unwrap_or_default().to_owned();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buffer.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        seen.record(&method, &buffer[head_end..head_end + length]);
        served += 1;
        buffer.drain(..head_end + length);
        if tcp
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .is_err()
        {
            return;
        }
        if rand::rng().random_range(0..3) == 0 {
            seen.closes.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
}

/// Every other pair of requests is POSTs: both upstreams get both methods.
fn is_post(i: usize) -> bool {
    (i / 2).is_multiple_of(2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_and_closed_keep_alive_connections_never_fail_a_request() {
    let setup = Setup::start().await;
    let seen = Arc::new(Seen::default());
    let h2 = goaway_upstream(setup.ca.h2_only_acceptor_for(&["api.test"]), seen.clone()).await;
    let h1 = closing_upstream(seen.clone()).await;
    let options = ProxyOptions::default()
        .resolve("api.test:443", h2)
        .resolve("h1.test:80", h1)
        .extra("[[routes]]\nhost = \"h1.test\"\nintegration = \"demo\"\nupstream_tls = false\n");
    let proxy = setup.start_proxy(&options).await;

    let mut clients = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let http = client::reqwest_via(proxy.proxy_addr, setup.credproxy_roots());
        clients.spawn(async move {
            let mut failures = Vec::new();
            for i in 0..REQUESTS_PER_CLIENT {
                let url = if i % 2 == 0 {
                    "https://api.test/resend"
                } else {
                    "http://h1.test/resend"
                };
                let method = if is_post(i) {
                    Method::POST
                } else {
                    Method::GET
                };
                let mut request = http.request(method.clone(), url);
                if method == Method::POST {
                    request = request.body(format!("post-{c}-{i}"));
                }
                match request.send().await {
                    Ok(response) => {
                        let status = response.status();
                        let error = response.headers().get("x-credproxy-error").cloned();
                        let body = response.text().await.unwrap_or_default();
                        if status != StatusCode::OK || error.is_some() || body != "ok" {
                            failures.push(format!("{method} {url}: {status} {error:?} {body}"));
                        }
                    }
                    Err(error) => failures.push(format!("{method} {url}: {error}")),
                }
            }
            failures
        });
    }
    let mut failures = Vec::new();
    while let Some(result) = clients.join_next().await {
        failures.extend(result.unwrap());
    }
    let scrape = Admin::new(proxy.admin_addr).metrics().await;
    let resends: Vec<String> = ["api.test", "h1.test"]
        .into_iter()
        .flat_map(|route| RetryReason::ALL.map(move |reason| (route, reason.as_str())))
        .map(|(route, reason)| {
            let labels = [("route", route), ("reason", reason)];
            let n = scrape.get("credproxy_upstream_retries_total", &labels);
            format!("{route}/{reason}={n}")
        })
        .collect();
    println!(
        "FIGURES upstream_resend: {} requests, {} reached an upstream, {} GOAWAYs, {} closes; resends {}",
        CLIENTS * REQUESTS_PER_CLIENT,
        seen.requests.load(Ordering::Relaxed),
        seen.goaways.load(Ordering::Relaxed),
        seen.closes.load(Ordering::Relaxed),
        resends.join(" "),
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {failures:#?}",
        failures.len(),
        CLIENTS * REQUESTS_PER_CLIENT
    );
    {
        let posts = seen.posts.lock().unwrap();
        let sent = (0..CLIENTS)
            .flat_map(|c| (0..REQUESTS_PER_CLIENT).map(move |i| (c, i)))
            .filter(|(_, i)| is_post(*i))
            .count();
        assert_eq!(
            posts.len(),
            sent,
            "POSTs that never arrived: {:?}",
            posts
                .keys()
                .filter(|k| !k.starts_with("post-"))
                .collect::<Vec<_>>()
        );
        let twice: Vec<_> = posts.iter().filter(|(_, n)| **n != 1).collect();
        assert!(
            twice.is_empty(),
            "POSTs processed more than once: {twice:?}"
        );
        assert!(seen.goaways.load(Ordering::Relaxed) > 0);
        assert!(seen.closes.load(Ordering::Relaxed) > 0);
    }
    proxy.stop().await;
}
