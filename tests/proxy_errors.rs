//! What credproxy answers when it cannot or must not forward: 407 (proxy auth), 502
//! (upstream unreachable), 503 (no valid token), 504 (upstream timeout), 400 (malformed
//! request), each a JSON error with `x-credproxy-error`; and its refusal to start open to
//! the network without proxy auth.

use std::net::SocketAddr;
use std::time::Duration;

use base64::prelude::{BASE64_STANDARD, Engine};
use http::StatusCode;

use crate::support::ca::TestCa;
use crate::support::cli::assert_no_secret_markers;
use crate::support::client;
use crate::support::proxy::{self, ProxyOptions, Setup};
use crate::support::upstream::TestApi;

const USER: &str = "steps";
const PASSWORD: &str = "pass word:1";

/// GETs `path` on the routed API through the proxy at `proxy_addr` (so the request is
/// intercepted inside a CONNECT tunnel) and asserts credproxy answered `status` with
/// `x-credproxy-error: error`; returns the response for the body checks.
async fn intercepted_error(
    setup: &Setup,
    proxy_addr: SocketAddr,
    path: &str,
    status: StatusCode,
    error: &str,
) -> reqwest::Response {
    let http = client::reqwest_via(proxy_addr, setup.credproxy_roots());
    let response = http.get(setup.api_url(path)).send().await.expect("request");
    assert_eq!(response.status(), status);
    assert_eq!(
        response
            .headers()
            .get("x-credproxy-error")
            .and_then(|v| v.to_str().ok()),
        Some(error)
    );
    response
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        BASE64_STANDARD.encode(format!("{user}:{password}"))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_auth_answers_407_without_or_with_wrong_credentials() {
    let setup = Setup::start().await;
    let proxy = setup
        .start_proxy(&ProxyOptions::default().auth(USER, PASSWORD))
        .await;
    let wrong = basic(USER, "wrong");
    let right = basic(USER, PASSWORD);

    for sent in [None, Some(wrong.as_str()), Some("Bearer nonsense")] {
        let headers: Vec<(&str, &str)> = sent
            .map(|v| ("proxy-authorization", v))
            .into_iter()
            .collect();
        let plain = client::proxy_get(proxy.proxy_addr, "http://api.test/echo", &headers).await;
        plain.assert_credproxy_error(
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            "proxy_auth_required",
        );
        assert!(
            plain
                .header("proxy-authenticate")
                .is_some_and(|v| v.starts_with("Basic")),
            "407 without a Basic Proxy-Authenticate: {:?}",
            plain.headers
        );
        let tunnel = client::connect(proxy.proxy_addr, "api.test:443", &headers)
            .await
            .refused();
        tunnel.assert_credproxy_error(
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            "proxy_auth_required",
        );
        assert!(
            tunnel
                .header("proxy-authenticate")
                .is_some_and(|v| v.starts_with("Basic"))
        );
    }
    assert_eq!(
        setup.api.requests(),
        0,
        "an unauthenticated request reached the API"
    );

    // The right credentials: plain and CONNECT, and the API never sees them.
    let plain = client::proxy_get(
        proxy.proxy_addr,
        "http://api.test/echo",
        &[("proxy-authorization", &right)],
    )
    .await;
    assert_eq!(plain.status, StatusCode::OK, "{}", plain.text());
    let tunnel = client::connect(
        proxy.proxy_addr,
        "api.test:443",
        &[("proxy-authorization", &right)],
    )
    .await
    .tunnel();
    let config = client::with_alpn(setup.credproxy_client_config(), &[b"http/1.1"]);
    let mut h1 = client::h1(client::tls(tunnel, "api.test", config).await).await;
    let answer = client::send1(&mut h1, client::get("/echo", "api.test", &[])).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    // And curl's own way of sending them (`-x http://user:pass@host:port`).
    let proxy_url = format!(
        "http://{USER}:{}@{}",
        PASSWORD.replace(' ', "%20").replace(':', "%3A"),
        proxy.proxy_addr
    );
    let ca = setup.dir.ca_cert_path();
    let output = client::curl(
        &[
            "-x",
            &proxy_url,
            "--cacert",
            ca.to_str().expect("UTF-8 path"),
            "-w",
            "%{http_code}",
            "-o",
            "/dev/null",
            "https://api.test/echo",
        ],
        Duration::from_secs(30),
    )
    .await;
    output.success();
    assert_eq!(output.stdout, "200");

    let seen = setup.api.seen();
    assert_eq!(seen.len(), 3);
    for request in &seen {
        assert!(
            !request.headers.contains_key("proxy-authorization"),
            "Proxy-Authorization reached the API: {request:?}"
        );
        assert_eq!(
            request.authorization(),
            [format!("Bearer {}", setup.current_token())]
        );
    }
    proxy.stop().await;
}

/// RFC 9110 §11.1: the authentication scheme is case-insensitive (`basic` is `Basic`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_auth_accepts_the_scheme_in_any_case() {
    let setup = Setup::start().await;
    let proxy = setup
        .start_proxy(&ProxyOptions::default().auth(USER, PASSWORD))
        .await;
    let credentials = BASE64_STANDARD.encode(format!("{USER}:{PASSWORD}"));
    for scheme in ["Basic", "basic", "BASIC"] {
        let value = format!("{scheme} {credentials}");
        let answer = client::proxy_get(
            proxy.proxy_addr,
            "http://api.test/echo",
            &[("proxy-authorization", &value)],
        )
        .await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "scheme {scheme:?}: {}",
            answer.text()
        );
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_a_non_loopback_listen_without_proxy_auth() {
    let setup = Setup::start().await;
    let builder = setup.config(&ProxyOptions::default().listen("0.0.0.0:0"));
    builder.write(&setup.dir);
    let config = setup.dir.config_arg();
    let output = setup.dir.run(&["run", "-c", &config], &builder.env()).await;
    output.assert_code(2);
    let line = output.error_line();
    assert!(
        line.contains("proxy.auth"),
        "the error must name proxy.auth: {line}"
    );
    assert!(
        line.contains("credproxy.toml"),
        "the error must name the file: {line}"
    );
    assert_eq!(
        setup.tokens.calls(),
        0,
        "it refreshed before refusing to start"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_502() {
    let setup = Setup::start().await;
    let closed = proxy::closed_port().await;
    let options = ProxyOptions::default()
        .resolve("api.test:443", closed)
        .resolve("unrouted.test:443", closed);
    let proxy = setup.start_proxy(&options).await;

    // Intercepted (CONNECT to the routed host, the 502 comes inside the tunnel) …
    let response = intercepted_error(
        &setup,
        proxy.proxy_addr,
        "/echo",
        StatusCode::BAD_GATEWAY,
        "upstream_unreachable",
    )
    .await;
    let body: serde_json::Value = response.json().await.expect("JSON error body");
    assert_eq!(body["error"], "upstream_unreachable");
    assert_no_secret_markers(&body.to_string());

    // … plain HTTP to the routed host, and a blind tunnel's CONNECT.
    let plain = client::proxy_get(proxy.proxy_addr, "http://api.test/echo", &[]).await;
    plain.assert_credproxy_error(StatusCode::BAD_GATEWAY, "upstream_unreachable");
    let tunnel = client::connect(proxy.proxy_addr, "unrouted.test:443", &[])
        .await
        .refused();
    tunnel.assert_credproxy_error(StatusCode::BAD_GATEWAY, "upstream_unreachable");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_with_an_untrusted_certificate_is_502() {
    let setup = Setup::start().await;
    // An API whose certificate comes from a CA credproxy does not trust.
    let impostor = TestApi::start(&TestCa::new()).await;
    let options = ProxyOptions::default().resolve("api.test:443", impostor.https_addr());
    let proxy = setup.start_proxy(&options).await;

    let _response = intercepted_error(
        &setup,
        proxy.proxy_addr,
        "/echo",
        StatusCode::BAD_GATEWAY,
        "upstream_unreachable",
    )
    .await;
    let plain = client::proxy_get(proxy.proxy_addr, "http://api.test/echo", &[]).await;
    plain.assert_credproxy_error(StatusCode::BAD_GATEWAY, "upstream_unreachable");
    assert_eq!(
        impostor.requests(),
        0,
        "a request (and its token) went to an untrusted server"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_valid_token_is_503() {
    let setup = Setup::start().await;
    // The provider refuses every refresh (invalid_grant) from the start.
    setup.tokens.revoke_all();
    let proxy = setup.start_proxy_cold(&ProxyOptions::default()).await;

    let response = intercepted_error(
        &setup,
        proxy.proxy_addr,
        "/echo",
        StatusCode::SERVICE_UNAVAILABLE,
        "no_token",
    )
    .await;
    let body: serde_json::Value = response.json().await.expect("JSON error body");
    assert_eq!(body["error"], "no_token");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("demo"),
        "the message names the integration: {message}"
    );
    assert_no_secret_markers(message);

    let plain = client::proxy_get(proxy.proxy_addr, "http://api.test/echo", &[]).await;
    plain.assert_credproxy_error(StatusCode::SERVICE_UNAVAILABLE, "no_token");
    assert_eq!(
        setup.api.requests(),
        0,
        "a request went upstream without a token"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_does_not_answer_in_time_is_504() {
    let setup = Setup::start().await;
    let proxy = setup
        .start_proxy(&ProxyOptions::default().response_timeout("1s"))
        .await;

    let response = intercepted_error(
        &setup,
        proxy.proxy_addr,
        "/hang",
        StatusCode::GATEWAY_TIMEOUT,
        "upstream_timeout",
    )
    .await;
    let body: serde_json::Value = response.json().await.expect("JSON error body");
    assert_eq!(body["error"], "upstream_timeout");
    setup.api.wait_for_parked(1).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_gets_400_and_the_proxy_keeps_serving() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;

    let answer = client::raw_exchange(proxy.proxy_addr, b"GARBAGE\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "a malformed request line must get 400, got {answer:?}"
    );

    // A well-formed request that is not a proxy request (origin-form) is a 400 too.
    let tcp = tokio::net::TcpStream::connect(proxy.proxy_addr)
        .await
        .expect("connect");
    let mut h1 = client::h1(tcp).await;
    let answer = client::send1(&mut h1, client::get("/echo", "api.test", &[])).await;
    answer.assert_credproxy_error(StatusCode::BAD_REQUEST, "bad_request");

    // The next request, on a new connection, still works.
    let answer = client::proxy_get(proxy.proxy_addr, "http://api.test/echo", &[]).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(setup.api.requests(), 1);
    proxy.stop().await;
}
