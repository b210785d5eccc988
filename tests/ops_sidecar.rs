//! Sidecar mode: a tool that cannot use a proxy points its base URL at
//! `http://127.0.0.1:SIDECAR`; credproxy sends its requests to the configured HTTPS
//! upstream with the route's token, retries a 401 once, prefixes the upstream URL's path,
//! and counts the requests in the route's metrics.

use std::time::Duration;

use serde_json::Value;

use crate::support::admin::Admin;
use crate::support::client;
use crate::support::proxy::{API_HOST, InProcess, ProxyOptions, Setup};

const CURL_TIMEOUT: Duration = Duration::from_secs(30);

/// `curl http://SIDECAR<path>` with `args`: the status and the API's JSON echo.
async fn curl_sidecar(sidecar: std::net::SocketAddr, path: &str, args: &[&str]) -> (String, Value) {
    let url = format!("http://{sidecar}{path}");
    let mut all = vec!["-w", "\n%{http_code}"];
    all.extend_from_slice(args);
    all.push(&url);
    let output = client::curl(&all, CURL_TIMEOUT).await;
    output.success();
    let (body, status) = output
        .stdout
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("no -w trailer in {:?}", output.stdout));
    let body = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("not the API's JSON echo ({e}): {body}"));
    (status.to_owned(), body)
}

async fn started(options: ProxyOptions) -> (Setup, InProcess) {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&options).await;
    (setup, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_client_on_the_sidecar_port_reaches_the_https_api_with_the_token() {
    let (setup, proxy) = started(ProxyOptions::default().sidecar("https://api.test")).await;
    let sidecar = proxy.sidecar_addrs[0];
    assert!(sidecar.ip().is_loopback());

    let (status, echo) = curl_sidecar(
        sidecar,
        "/echo?page=2",
        &["-H", "Authorization: Bearer the-tools-own"],
    )
    .await;
    assert_eq!(status, "200", "{echo}");
    assert_eq!(echo["path"], "/echo");
    assert_eq!(echo["tls"], true, "the API was reached over TLS: {echo}");
    let seen = setup.api.last();
    assert!(seen.tls);
    assert_eq!(
        seen.authorization(),
        [format!("Bearer {}", setup.current_token())],
        "the route's token replaces whatever the tool sent"
    );
    let host = seen
        .headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    // h2 upstream carries the host as :authority (no Host header); HTTP/1.1 as Host.
    assert!(
        host.is_none() || host.as_deref() == Some(API_HOST),
        "the upstream must see its own host, not the sidecar's address: {host:?}"
    );

    let scrape = Admin::new(proxy.admin_addr).metrics().await;
    assert_eq!(
        scrape.get(
            "credproxy_requests_total",
            &[
                ("route", API_HOST),
                ("client", "-"),
                ("status_class", "2xx")
            ]
        ),
        1.0,
        "sidecar requests count in the route's metrics"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_through_the_sidecar_is_refreshed_once_and_resent() {
    let (setup, proxy) = started(ProxyOptions::default().sidecar("https://api.test")).await;
    let sidecar = proxy.sidecar_addrs[0];
    let (status, _) = curl_sidecar(sidecar, "/echo", &[]).await;
    assert_eq!(status, "200");
    let old = setup.current_token();
    let refreshes = setup.tokens.successes();
    setup.api.revoke(&old);

    let (status, echo) = curl_sidecar(sidecar, "/echo", &["-X", "POST", "-d", "a=1"]).await;
    assert_eq!(status, "200", "the tool must not see the 401: {echo}");
    assert_eq!(echo["method"], "POST");
    assert_eq!(
        setup.tokens.successes(),
        refreshes + 1,
        "exactly one extra refresh"
    );
    assert_eq!(setup.api.unauthorized(), 1);
    let new = setup.current_token();
    assert_ne!(new, old);
    assert_eq!(setup.api.last().authorization(), [format!("Bearer {new}")]);

    let scrape = Admin::new(proxy.admin_addr).metrics().await;
    assert_eq!(
        scrape.get("credproxy_retries_401_total", &[("route", API_HOST)]),
        1.0,
        "{}",
        scrape.text()
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_upstream_path_is_prefixed_to_every_request_path() {
    let options = ProxyOptions::default()
        .sidecar("https://api.test/v2")
        .sidecar("https://api.test/base/");
    let (setup, proxy) = started(options).await;
    let cases = [
        (
            proxy.sidecar_addrs[0],
            "/files/list?cursor=abc",
            "/v2/files/list",
        ),
        (proxy.sidecar_addrs[0], "/", "/v2/"),
        (proxy.sidecar_addrs[1], "/echo", "/base/echo"),
    ];
    for (sidecar, path, expected) in cases {
        let (status, echo) = curl_sidecar(sidecar, path, &[]).await;
        assert_eq!(status, "200", "{echo}");
        assert_eq!(
            echo["path"], expected,
            "{path} on the sidecar for {sidecar}"
        );
        assert_eq!(
            setup.api.last().authorization(),
            [format!("Bearer {}", setup.current_token())]
        );
    }
    proxy.stop().await;
}
