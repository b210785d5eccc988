//! Bodies stream through the real `credproxy run` process in both directions: 200 MiB
//! each way, over HTTP/1.1 and h2 between client and proxy, byte counts checked at both
//! ends, and the process's peak RSS (VmHWM) stays far below the body size. Server-sent
//! events reach the client as they are sent, each event timed from API to client.

use std::time::Duration;

use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;

use crate::support::client::{self, Answer, PacedBody};
use crate::support::proxy::{ProxyOptions, ProxyProcess, Setup, TRANSFER_TIMEOUT};
use crate::support::upstream::{ZeroBody, events};

const SIZE: u64 = 200 * 1024 * 1024;
/// Peak RSS allowed for the proxy process, in KiB: half of one body.
const MAX_PEAK_RSS_KIB: u64 = 100 * 1024;

fn assert_flat_memory(proxy: &ProxyProcess, what: &str) {
    let peak = proxy.peak_rss_kib();
    println!(
        "credproxy peak RSS after {what}: {:.1} MiB",
        peak as f64 / 1024.0
    );
    assert!(
        peak < MAX_PEAK_RSS_KIB,
        "credproxy's peak RSS was {peak} KiB after {what}: bodies are being buffered"
    );
}

fn assert_current_token_sent(setup: &Setup) {
    assert_eq!(
        setup.api.last().authorization(),
        [format!("Bearer {}", setup.current_token())]
    );
}

async fn stop(proxy: ProxyProcess) {
    let exit = proxy.stop().await;
    assert_eq!(
        exit.code,
        Some(0),
        "credproxy run did not exit cleanly:\n{}",
        exit.log
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mib_download_streams_through_with_flat_memory() {
    let setup = Setup::start().await;
    let proxy = setup.spawn_proxy(&ProxyOptions::default()).await;
    let proxy_url = format!("http://{}", proxy.proxy_addr);
    let ca = setup.dir.ca_cert_path();
    let url = setup.api_url(&format!("/bytes/{SIZE}"));

    for (n, (flag, version)) in [("--http1.1", "1.1"), ("--http2", "2")]
        .into_iter()
        .enumerate()
    {
        let output = client::curl(
            &[
                flag,
                "-x",
                &proxy_url,
                "--cacert",
                ca.to_str().expect("UTF-8 path"),
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{http_version} %{size_download}",
                &url,
            ],
            TRANSFER_TIMEOUT,
        )
        .await;
        output.success();
        assert_eq!(output.stdout, format!("200 {version} {SIZE}"));
        assert_eq!(setup.api.downloaded(), SIZE * (n as u64 + 1));
        assert_current_token_sent(&setup);
    }
    assert_flat_memory(&proxy, "200 MiB downloads over HTTP/1.1 and h2");
    stop(proxy).await;
}

fn upload() -> Request<client::BoxedBody> {
    let body = ZeroBody::new(SIZE).map_err(|never| match never {}).boxed();
    Request::builder()
        .method(Method::POST)
        .uri("https://api.test/upload")
        .body(body)
        .expect("a valid request")
}

fn assert_uploaded(setup: &Setup, answer: &Answer, total: u64) {
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["received"], SIZE);
    assert_eq!(setup.api.uploaded(), total);
    assert_current_token_sent(setup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mib_upload_streams_through_with_flat_memory() {
    let setup = Setup::start().await;
    let proxy = setup.spawn_proxy(&ProxyOptions::default()).await;

    let tunnel = client::connect(proxy.proxy_addr, "api.test:443", &[])
        .await
        .tunnel();
    let config = client::with_alpn(setup.credproxy_client_config(), &[b"http/1.1"]);
    let mut h1 = client::h1(client::tls(tunnel, "api.test", config).await).await;
    let mut request = upload();
    request
        .headers_mut()
        .insert("host", http::HeaderValue::from_static("api.test"));
    *request.uri_mut() = http::Uri::from_static("/upload");
    let answer = tokio::time::timeout(TRANSFER_TIMEOUT, client::send1(&mut h1, request))
        .await
        .expect("the HTTP/1.1 upload did not finish in time");
    assert_uploaded(&setup, &answer, SIZE);

    let tunnel = client::connect(proxy.proxy_addr, "api.test:443", &[])
        .await
        .tunnel();
    let config = client::with_alpn(setup.credproxy_client_config(), &[b"h2"]);
    let mut h2 = client::h2(client::tls(tunnel, "api.test", config).await).await;
    let answer = tokio::time::timeout(TRANSFER_TIMEOUT, client::send2(&mut h2, upload()))
        .await
        .expect("the h2 upload did not finish in time");
    assert_uploaded(&setup, &answer, 2 * SIZE);

    assert_flat_memory(&proxy, "200 MiB uploads over HTTP/1.1 and h2");
    stop(proxy).await;
}

/// `upstream.response_timeout` bounds the wait for the API's answer, not the time the
/// client takes to send its body: an upload over a slow link must not get a 504 half-way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_slower_than_the_response_timeout_still_completes() {
    let setup = Setup::start().await;
    let proxy = setup
        .start_proxy(&ProxyOptions::default().response_timeout("1s"))
        .await;

    // 17 chunks of 128 KiB, 125 ms apart: 2.1 MiB (streamed, not kept) over 2 s.
    let body = PacedBody::new(17, 128 * 1024, Duration::from_millis(125));
    let size = body.len();
    let tunnel = client::connect(proxy.proxy_addr, "api.test:443", &[])
        .await
        .tunnel();
    let config = client::with_alpn(setup.credproxy_client_config(), &[b"http/1.1"]);
    let mut h1 = client::h1(client::tls(tunnel, "api.test", config).await).await;
    let request = Request::builder()
        .method(Method::POST)
        .uri("/upload")
        .header("host", "api.test")
        .body(body.boxed())
        .expect("a valid request");
    let answer = client::send1(&mut h1, request).await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "a 2 s upload with response_timeout = 1s: {}",
        answer.text()
    );
    assert_eq!(answer.json()["received"], size);
    proxy.stop().await;
}

/// Reads `/events/NAME` on `send`'s connection; returns when each event arrived.
async fn event_arrivals<F, Fut>(send: F, name: &str) -> Vec<tokio::time::Instant>
where
    F: FnOnce(Request<client::BoxedBody>) -> Fut,
    Fut: Future<Output = http::Response<hyper::body::Incoming>>,
{
    let request = client::get(&format!("/events/{name}"), "api.test", &[]);
    let response = send(request).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"text/event-stream"[..])
    );
    let mut body = response.into_body();
    let mut text = String::new();
    let mut arrivals = Vec::new();
    while arrivals.len() < events::COUNT {
        let frame = tokio::time::timeout(client::CLIENT_TIMEOUT, body.frame())
            .await
            .expect("no event in time")
            .expect("the stream ended early")
            .expect("reading the stream");
        let now = tokio::time::Instant::now();
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).expect("UTF-8 events"));
        }
        // Every event complete in what has arrived so far arrived now.
        while text.starts_with(&events::event(arrivals.len())) {
            text.drain(..events::event(arrivals.len()).len());
            arrivals.push(now);
        }
    }
    arrivals
}

/// Server-sent events are not buffered: three events 1.5 s apart each reach the client
/// within 300 ms of the API sending them, over HTTP/1.1 and h2 between client and proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_reach_the_client_as_they_are_sent_over_http1_and_h2() {
    const WITHIN: Duration = Duration::from_millis(300);
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;
    let mut h1 = client::h1(setup.intercepted_tls(proxy.proxy_addr, b"http/1.1").await).await;
    let mut h2 = client::h2(setup.intercepted_tls(proxy.proxy_addr, b"h2").await).await;
    let (over_h1, over_h2) = tokio::join!(
        event_arrivals(
            |r| async move { h1.send_request(r).await.expect("h1 request") },
            "h1"
        ),
        event_arrivals(
            |mut r| async move {
                *r.uri_mut() = http::Uri::from_static("https://api.test/events/h2");
                h2.send_request(r).await.expect("h2 request")
            },
            "h2"
        ),
    );
    for (name, arrivals) in [("h1", over_h1), ("h2", over_h2)] {
        let sent = setup.api.events_sent(name);
        assert_eq!(sent.len(), events::COUNT, "{name}: events sent");
        for (n, (sent, arrived)) in sent.iter().zip(&arrivals).enumerate() {
            let delay = arrived.saturating_duration_since(*sent);
            println!("{name}: event {n} reached the client {delay:?} after it was sent");
            assert!(
                delay <= WITHIN,
                "{name}: event {n} took {delay:?} to reach the client (allowed {WITHIN:?})"
            );
        }
    }
    proxy.stop().await;
}
