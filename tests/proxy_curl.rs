//! The system `curl` through credproxy, as a user would run it: `-x` the proxy, `--cacert`
//! credproxy's CA, no credentials of its own (or wrong ones).

use std::time::Duration;

use serde_json::Value;

use crate::support::client::{self, CurlOutput};
use crate::support::proxy::{InProcess, ProxyOptions, Setup};

const CURL_TIMEOUT: Duration = Duration::from_secs(30);

/// What curl printed: the body, then (via `-w`) the status and the HTTP version it spoke
/// with its peer (the proxy's MITM, for https:// URLs).
struct Fetched {
    body: Value,
    status: String,
    version: String,
}

async fn curl_via(setup: &Setup, proxy: &InProcess, args: &[&str]) -> Fetched {
    let proxy_url = format!("http://{}", proxy.proxy_addr);
    let ca = setup.dir.ca_cert_path();
    let ca = ca.to_str().expect("temp dir paths are UTF-8");
    let mut all = vec![
        "-x",
        &proxy_url,
        "--cacert",
        ca,
        "-w",
        "\n%{http_code} %{http_version}",
    ];
    all.extend_from_slice(args);
    let output = client::curl(&all, CURL_TIMEOUT).await;
    parse(&output)
}

fn parse(output: &CurlOutput) -> Fetched {
    output.success();
    let (body, trailer) = output
        .stdout
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("no -w trailer in curl's output: {}", output.stdout));
    let (status, version) = trailer
        .split_once(' ')
        .unwrap_or_else(|| panic!("unexpected -w trailer {trailer:?}"));
    let body = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("curl's body is not the API's JSON echo ({e}): {body}"));
    Fetched {
        body,
        status: status.to_owned(),
        version: version.to_owned(),
    }
}

/// The API saw exactly one `Authorization`, the current token, on its last request.
fn assert_api_saw_current_token(setup: &Setup) {
    let token = setup.current_token();
    assert!(setup.tokens.is_valid_access_token(&token));
    let seen = setup.api.last();
    assert_eq!(
        seen.authorization(),
        [format!("Bearer {token}")],
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_https_gets_the_current_token_injected() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;

    let plain = curl_via(&setup, &proxy, &[&setup.api_url("/echo")]).await;
    assert_eq!(plain.status, "200");
    assert_eq!(plain.body["path"], "/echo");
    assert_eq!(plain.body["tls"], true);
    assert_api_saw_current_token(&setup);

    let wrong = curl_via(
        &setup,
        &proxy,
        &["-H", "Authorization: Bearer wrong", &setup.api_url("/echo")],
    )
    .await;
    assert_eq!(wrong.status, "200");
    assert_api_saw_current_token(&setup);
    assert_eq!(setup.api.requests(), 2);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_http2_negotiates_h2_with_the_proxy() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;

    let fetched = curl_via(
        &setup,
        &proxy,
        &[
            "--http2",
            "-H",
            "Authorization: Bearer wrong",
            &setup.api_url("/echo"),
        ],
    )
    .await;
    assert_eq!(fetched.status, "200");
    assert_eq!(fetched.version, "2", "curl did not speak h2 to the proxy");
    assert_api_saw_current_token(&setup);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_plain_http_to_a_routed_host_goes_upstream_over_tls() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;

    let fetched = curl_via(&setup, &proxy, &["http://api.test/echo?x=1"]).await;
    assert_eq!(fetched.status, "200");
    let seen = setup.api.last();
    assert!(
        seen.tls,
        "a credential went upstream in plaintext: {seen:?}"
    );
    assert_eq!(seen.path, "/echo");
    assert_api_saw_current_token(&setup);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_plain_http_with_upstream_tls_false_goes_upstream_plain() {
    let setup = Setup::start().await;
    let proxy = setup
        .start_proxy(&ProxyOptions::default().upstream_tls(false))
        .await;

    let fetched = curl_via(&setup, &proxy, &["http://api.test/echo"]).await;
    assert_eq!(fetched.status, "200");
    let seen = setup.api.last();
    assert!(
        !seen.tls,
        "upstream_tls = false must reach the API over plain HTTP: {seen:?}"
    );
    assert_api_saw_current_token(&setup);
    proxy.stop().await;
}
