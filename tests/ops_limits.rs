//! Limits under abuse, against a running `credproxy run`: connections over
//! `limits.max_connections` are refused cleanly (a JSON 503, then close) while the proxy
//! keeps serving; a slowloris client is cut after `limits.header_read_timeout`; a request
//! head over `limits.max_header_bytes` or `limits.max_headers` gets an error status.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::support::admin::Admin;
use crate::support::client;
use crate::support::proxy::{ProxyOptions, ProxyProcess, Setup};
use crate::support::rlimit;
use crate::support::token::WAIT;

const REFUSED: &str = "credproxy_refused_connections_total";
const CONNECTIONS: &str = "credproxy_client_connections";

async fn started(options: &ProxyOptions) -> (Setup, ProxyProcess, Admin) {
    let setup = Setup::start().await;
    let proxy = setup.spawn_proxy(options).await;
    let admin = Admin::new(proxy.admin_addr);
    admin.wait_for_readyz(StatusCode::OK).await;
    (setup, proxy, admin)
}

async fn stop(proxy: ProxyProcess) {
    let exit = proxy.stop().await;
    assert_eq!(exit.code, Some(0), "credproxy run log:\n{}", exit.log);
}

/// How a connection the proxy closed ended, from the client's side.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// The whole `503 too_many_connections` JSON response, then end of stream.
    Refused503,
    /// End of stream without a byte.
    Closed,
    Other(String),
}

fn ending(read: std::io::Result<usize>, bytes: &[u8]) -> Ending {
    let text = String::from_utf8_lossy(bytes);
    match read {
        Err(e) => Ending::Other(format!("read error {e} after {text:?}")),
        Ok(_) if bytes.is_empty() => Ending::Closed,
        Ok(_) => {
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let head = head.to_ascii_lowercase();
            let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            if head.starts_with("http/1.1 503")
                && head.contains("x-credproxy-error: too_many_connections")
                && json["error"] == "too_many_connections"
            {
                Ending::Refused503
            } else {
                Ending::Other(text.into_owned())
            }
        }
    }
}

/// 2,000 idle connections against `max_connections = 50`: the first 50 are admitted and
/// held, the other 1,950 are refused at once (they read the JSON 503, or at worst a clean
/// close), `credproxy_refused_connections_total` counts exactly them, and once a few held
/// connections close the proxy serves requests again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_refused_cleanly_and_the_proxy_keeps_serving() {
    const MAX: usize = 50;
    const TOTAL: usize = 2_000;
    const EXCESS: usize = TOTAL - MAX;
    rlimit::raise_open_files((TOTAL + 500) as u64);
    let (_setup, proxy, admin) = started(&ProxyOptions::default().max_connections(MAX)).await;
    let addr = proxy.proxy_addr;

    // Each connection sends nothing and reads until the proxy closes it. They are opened
    // in batches, each waited for, so the listen backlog never overflows (a dropped SYN
    // would cost a one-second retransmit).
    const BATCH: usize = 250;
    let (ended, mut endings) = mpsc::unbounded_channel();
    let mut readers = Vec::with_capacity(TOTAL);
    let mut refused = Vec::with_capacity(EXCESS);
    while readers.len() < TOTAL {
        for _ in 0..BATCH {
            let index = readers.len();
            let mut tcp = TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("connection {index}: {e}"));
            let ended = ended.clone();
            readers.push(tokio::spawn(async move {
                let mut bytes = Vec::new();
                let read = tcp.read_to_end(&mut bytes).await;
                let _ = ended.send((index, ending(read, &bytes)));
            }));
        }
        // Everything past the first MAX ends without the test doing anything.
        let expected = readers.len().saturating_sub(MAX);
        let deadline = Instant::now() + WAIT;
        while refused.len() < expected {
            match tokio::time::timeout_at(deadline, endings.recv()).await {
                Ok(Some(end)) => refused.push(end),
                _ => panic!(
                    "after {WAIT:?} only {} of the first {expected} excess connections were refused",
                    refused.len()
                ),
            }
        }
    }
    let scrape = admin
        .wait_for_metrics("the refusals and the held connections are counted", |s| {
            s.value(REFUSED, &[]) == Some(EXCESS as f64)
                && s.value(CONNECTIONS, &[]) == Some(MAX as f64)
        })
        .await;
    assert!(
        endings.try_recv().is_err(),
        "an admitted connection was closed: {}",
        scrape.text()
    );
    let with_503 = refused
        .iter()
        .filter(|(_, e)| *e == Ending::Refused503)
        .count();
    let closed = refused.iter().filter(|(_, e)| *e == Ending::Closed).count();
    let unclean: Vec<_> = refused
        .iter()
        .filter(|(_, e)| !matches!(e, Ending::Refused503 | Ending::Closed))
        .take(5)
        .collect();
    assert!(
        unclean.is_empty(),
        "{with_503} got the 503, {closed} a clean close, others did not: {unclean:?}"
    );
    assert!(
        with_503 > 0,
        "no refused connection read the 503 ({closed} closed)"
    );

    // Ten held connections go away: the proxy has room again and serves a request.
    let refused_indices: std::collections::HashSet<usize> =
        refused.iter().map(|(index, _)| *index).collect();
    let mut held: Vec<_> = readers
        .into_iter()
        .enumerate()
        .filter(|(index, _)| !refused_indices.contains(index))
        .map(|(_, reader)| reader)
        .collect();
    assert_eq!(held.len(), MAX);
    for reader in held.drain(..10) {
        reader.abort();
    }
    admin
        .wait_for_metrics("the 10 closed connections free their places", |s| {
            s.value(CONNECTIONS, &[]) == Some((MAX - 10) as f64)
        })
        .await;
    let answer = client::proxy_get(addr, "http://api.test/echo", &[]).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let scrape = admin.metrics().await;
    assert_eq!(
        scrape.get(REFUSED, &[]),
        EXCESS as f64,
        "only the excess was refused"
    );

    for reader in held {
        reader.abort();
    }
    admin
        .wait_for_metrics("every connection is closed", |s| {
            s.value(CONNECTIONS, &[]) == Some(0.0)
        })
        .await;
    stop(proxy).await;
}

/// A CONNECT tunnel is a client connection too: with `max_connections = 5` and five
/// tunnels open, a sixth connection is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tunnels_count_against_max_connections() {
    const MAX: usize = 5;
    let (_setup, proxy, admin) = started(&ProxyOptions::default().max_connections(MAX)).await;
    let mut tunnels = Vec::new();
    for _ in 0..MAX {
        tunnels.push(
            client::connect(proxy.proxy_addr, "unrouted.test:443", &[])
                .await
                .tunnel(),
        );
    }
    let mut sixth = TcpStream::connect(proxy.proxy_addr).await.expect("connect");
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(WAIT, sixth.read_to_end(&mut bytes)).await;
    let scrape = admin.metrics().await;
    assert!(
        matches!(&read, Ok(Ok(_))) && ending(Ok(bytes.len()), &bytes) == Ending::Refused503,
        "with {MAX} tunnels open a 6th connection must be refused; it was admitted \
         (client connections gauge: {:?}, refused: {:?})",
        scrape.value(CONNECTIONS, &[]),
        scrape.value(REFUSED, &[])
    );
    assert_eq!(scrape.get(CONNECTIONS, &[]), MAX as f64);
    drop(tunnels);
    stop(proxy).await;
}

/// One whole HTTP/1.1 response (head and `Content-Length` body) from `tcp`.
async fn read_response(tcp: &mut TcpStream) -> String {
    let mut bytes = Vec::new();
    let mut byte = [0u8; 1];
    while !bytes.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte)
            .await
            .expect("reading a response head");
        bytes.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no content-length in {head:?}"));
    let mut body = vec![0u8; length];
    tcp.read_exact(&mut body)
        .await
        .expect("reading a response body");
    bytes.extend_from_slice(&body);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// What ended a connection and when, measured from its start.
async fn time_to_close(mut read: tokio::net::tcp::OwnedReadHalf, start: Instant) -> Duration {
    let mut bytes = Vec::new();
    let outcome = tokio::time::timeout(WAIT, read.read_to_end(&mut bytes)).await;
    assert!(
        outcome.is_ok(),
        "the connection was still open after {WAIT:?}"
    );
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        bytes.is_empty() || text.starts_with("HTTP/1.1 408"),
        "a timed-out connection gets nothing or a 408: {text:?}"
    );
    start.elapsed()
}

/// With `header_read_timeout = "1s"`: a client that sends a request head one byte at a
/// time is cut after the timeout (not when it stops sending); so is a connection that
/// never sends anything, and a keep-alive connection idle after its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_cut_after_the_header_read_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    /// Generous for a loaded 2-core machine, yet far below the trickle's 12 s.
    const SLACK: Duration = Duration::from_secs(4);
    let (setup, proxy, admin) = started(&ProxyOptions::default().header_read_timeout("1s")).await;
    let addr = proxy.proxy_addr;
    let requests = setup.api.requests();

    // Slowloris: a head that never ends, one byte every 60 ms for 12 s.
    let start = Instant::now();
    let (read, mut write) = TcpStream::connect(addr)
        .await
        .expect("connect")
        .into_split();
    let trickle = tokio::spawn(async move {
        let _ = write
            .write_all(b"GET http://api.test/echo HTTP/1.1\r\nHost: api.test\r\n")
            .await;
        let mut pace = tokio::time::interval(Duration::from_millis(60));
        for byte in b"X-Slow: 1\r\n".iter().cycle().take(200) {
            pace.tick().await;
            if write.write_all(&[*byte]).await.is_err() {
                return true; // the proxy hung up on us
            }
        }
        false
    });
    let slowloris = time_to_close(read, start);

    // Silent: connects and sends nothing.
    let silent_start = Instant::now();
    let (silent_read, _silent_write) = TcpStream::connect(addr)
        .await
        .expect("connect")
        .into_split();
    let silent = time_to_close(silent_read, silent_start);

    // Idle keep-alive: one request, then nothing.
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    idle.write_all(b"GET http://api.test/echo HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await
        .expect("writing a request");
    let response = read_response(&mut idle).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let idle_start = Instant::now();
    let (idle_read, _idle_write) = idle.into_split();
    let idle = time_to_close(idle_read, idle_start);

    let (slowloris, silent, idle) = tokio::join!(slowloris, silent, idle);
    for (what, took) in [
        ("slowloris", slowloris),
        ("silent", silent),
        ("idle keep-alive", idle),
    ] {
        assert!(
            took >= TIMEOUT.mul_f64(0.9) && took <= TIMEOUT + SLACK,
            "the {what} connection was closed after {took:?}; header_read_timeout is {TIMEOUT:?}"
        );
    }
    trickle.abort();
    assert_eq!(
        setup.api.requests(),
        requests + 1,
        "only the complete request went upstream"
    );

    let answer = client::proxy_get(addr, "http://api.test/echo", &[]).await;
    assert_eq!(answer.status, StatusCode::OK, "the proxy keeps serving");
    admin
        .wait_for_metrics("no client connection is left open", |s| {
            s.value(CONNECTIONS, &[]) == Some(0.0)
        })
        .await;
    stop(proxy).await;
}

/// The raw answer to `head` (an HTTP/1.1 request head) on a fresh connection.
async fn answer_to(addr: SocketAddr, head: &str) -> String {
    client::raw_exchange(addr, head.as_bytes()).await
}

/// `max_header_bytes = 8192`, `max_headers = 20`: a 16 KiB header, or 30 headers, get
/// 431 (or 400) before anything goes upstream; a 6 KiB header is fine; the proxy keeps
/// serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_head_gets_an_error_status_and_the_proxy_keeps_serving() {
    let options = ProxyOptions::default()
        .max_header_bytes(8192)
        .max_headers(20);
    let (setup, proxy, _admin) = started(&options).await;
    let addr = proxy.proxy_addr;
    let request = |extra: &str| {
        format!(
            "GET http://api.test/echo HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n{extra}\r\n"
        )
    };

    let big = request(&format!("X-Big: {}\r\n", "a".repeat(16 * 1024)));
    let many = request(
        &(0..30)
            .map(|i| format!("X-Header-{i}: {i}\r\n"))
            .collect::<String>(),
    );
    for (what, head) in [("a 16 KiB header", big), ("30 headers", many)] {
        let requests = setup.api.requests();
        let answer = answer_to(addr, &head).await;
        assert!(
            answer.starts_with("HTTP/1.1 431") || answer.starts_with("HTTP/1.1 400"),
            "{what}: {answer:?}"
        );
        assert_eq!(setup.api.requests(), requests, "{what} went upstream");
        let answer = client::proxy_get(addr, "http://api.test/echo", &[]).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "the proxy keeps serving after {what}"
        );
    }

    let fine = request(&format!("X-Fine: {}\r\n", "a".repeat(6 * 1024)));
    let answer = answer_to(addr, &fine).await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "a 6 KiB header is within the limit: {answer:?}"
    );
    stop(proxy).await;
}
