//! Issue 11: 5,000 idle intercepted client connections through `credproxy run`. Each did
//! CONNECT, TLS and one GET, then stays open on keep-alive. All are answered, the proxy
//! holds them all at once, a new client is still served promptly meanwhile, every held
//! connection still works at the end, and the proxy's memory per idle connection (its
//! RSS growth over the connections, issue 16) is reported and bounded.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use http::StatusCode;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

use crate::support::admin::Admin;
use crate::support::client::{self, Answer};
use crate::support::proxy::{API_HOST, ProxyOptions, Setup};
use crate::support::rlimit;

const CONNECTIONS: usize = 5_000;
/// Connections being opened (or checked) at once.
const PARALLEL: usize = 32;
/// A new client's CONNECT, TLS handshake and GET while the others are held: generous, for
/// a debug build on a loaded 2-core CI machine (it takes milliseconds).
const PROMPT: Duration = Duration::from_secs(5);
/// The proxy's RSS growth per idle connection, at most: a regression bound above what a
/// debug build measures (the FIGURES line), not the release target.
const MAX_KIB_PER_CONNECTION: f64 = 48.0;
const OPEN: &str = "credproxy_client_connections";
const IDLE: &str = "credproxy_idle_client_connections";

type Held = TlsStream<TokioIo<Upgraded>>;

/// `CONNECT api.test:443`, TLS (HTTP/1.1), `GET /idle/N`: the answer must carry the
/// injected token; the connection is given back idle.
async fn open(setup: &Setup, proxy: SocketAddr, n: usize) -> Held {
    let tls = setup.intercepted_tls(proxy, b"http/1.1").await;
    let (answer, tls) = client::send1_keeping(tls, idle_get(n)).await;
    check(setup, &answer, n);
    tls
}

fn idle_get(n: usize) -> http::Request<client::BoxedBody> {
    client::get(&format!("/idle/{n}"), API_HOST, &[])
}

fn check(setup: &Setup, answer: &Answer, n: usize) {
    assert_eq!(answer.status, StatusCode::OK, "{n}: {}", answer.text());
    let echo = answer.json();
    assert_eq!(echo["path"], format!("/idle/{n}"));
    assert_eq!(
        echo["headers"]["authorization"],
        serde_json::json!([format!("Bearer {}", setup.current_token())])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_idle_intercepted_connections_are_answered_and_new_clients_served() {
    // The test holds one socket per connection, credproxy (which inherits the limit) one.
    rlimit::raise_open_files(CONNECTIONS as u64 + 2_000);
    let setup = Setup::start().await;
    // Keep-alive connections waiting for a request head would close after 30 s.
    let options = ProxyOptions::default().header_read_timeout("10m");
    let proxy = setup.spawn_proxy(&options).await;
    let admin = Admin::new(proxy.admin_addr);
    let addr = proxy.proxy_addr;

    // One-time costs before measuring: the token, the minted leaf, the upstream pool.
    let warm: Vec<Held> = futures_util::stream::iter(0..PARALLEL)
        .map(|n| open(&setup, addr, n))
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    drop(warm);
    admin
        .wait_for_metrics("the warm-up connections are closed", |s| {
            s.value(OPEN, &[]) == Some(0.0)
        })
        .await;

    let before = proxy.rss_kib();
    let started = Instant::now();
    let held: Vec<Held> = futures_util::stream::iter(0..CONNECTIONS)
        .map(|n| open(&setup, addr, n))
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let opening = started.elapsed();
    admin
        .wait_for_metrics("credproxy holds every connection open, idle", |s| {
            s.value(OPEN, &[]) == Some(CONNECTIONS as f64)
                && s.value(IDLE, &[]) == Some(CONNECTIONS as f64)
        })
        .await;
    let after = proxy.rss_kib();
    if std::env::var_os("PERFMEM_KILL").is_some() {
        std::process::Command::new("sh")
            .arg("-c")
            .arg("kill -9 $(pgrep -f 'credproxy run -c')")
            .status()
            .unwrap();
        panic!("killed for analysis");
    }
    assert_eq!(held.len(), CONNECTIONS);

    // A new client while all of them are held.
    let started = Instant::now();
    let fresh = open(&setup, addr, CONNECTIONS).await;
    let new_client = started.elapsed();
    drop(fresh);
    assert!(
        new_client <= PROMPT,
        "a new client took {new_client:?} with {CONNECTIONS} idle connections open (allowed {PROMPT:?})"
    );

    // Every held connection still answers.
    let setup = &setup;
    let started = Instant::now();
    let answered = futures_util::stream::iter(held.into_iter().enumerate())
        .map(|(n, tls)| async move {
            let (answer, _tls) = client::send1_keeping(tls, idle_get(n)).await;
            check(setup, &answer, n);
        })
        .buffer_unordered(PARALLEL)
        .count()
        .await;
    let rechecked = started.elapsed();
    assert_eq!(answered, CONNECTIONS);

    let per_connection = after.saturating_sub(before) as f64 / CONNECTIONS as f64;
    println!(
        "FIGURES idle_connections: {CONNECTIONS} idle intercepted TLS connections, credproxy RSS {before} KiB before, {after} KiB after, {per_connection:.1} KiB per connection; opened in {opening:.1?} ({PARALLEL} at once), a new client served in {new_client:.1?}, all re-requested in {rechecked:.1?}"
    );
    assert!(
        per_connection <= MAX_KIB_PER_CONNECTION,
        "{per_connection:.1} KiB per idle connection (at most {MAX_KIB_PER_CONNECTION})"
    );
    let exit = proxy.stop().await;
    assert_eq!(exit.code, Some(0), "credproxy run log:\n{}", exit.log);
}
