//! Issue 11: every 502 credproxy makes logs one warning with the upstream's host:port and
//! the cause, and nothing of the request's path, query or header values.

use std::net::SocketAddr;

use http::StatusCode;

use crate::support::ca::TestCa;
use crate::support::client;
use crate::support::proxy::{self, ProxyOptions, Setup};
use crate::support::upstream::TestApi;

const MARKER: &str = "zq7marker";

/// Sends a request carrying `MARKER` in its path, query and a header to the routed host
/// pinned to `upstream`, checks the 502, and returns credproxy's log once the request's
/// own line is in it.
async fn log_of_a_502(upstream: SocketAddr) -> String {
    let setup = Setup::start().await;
    let options = ProxyOptions::default().resolve("api.test:443", upstream);
    let proxy = setup.spawn_proxy(&options).await;
    let url = format!("http://api.test/{MARKER}/path?q={MARKER}");
    let header = format!("{MARKER}-value");
    let answer = client::proxy_get(proxy.proxy_addr, &url, &[("x-marker", &header)]).await;
    answer.assert_credproxy_error(StatusCode::BAD_GATEWAY, "upstream_unreachable");
    proxy.wait_for_log("status=502").await;
    let exit = proxy.stop().await;
    exit.log
}

fn the_one_warning(log: &str) -> &str {
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("upstream request failed"))
        .collect();
    assert_eq!(warnings.len(), 1, "not exactly one warning:\n{log}");
    assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
    assert!(warnings[0].contains("api.test:443"), "{}", warnings[0]);
    assert!(
        !log.contains(MARKER),
        "the marker leaked into the log:\n{log}"
    );
    warnings[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_port_logs_one_warning_with_host_and_cause() {
    let log = log_of_a_502(proxy::closed_port().await).await;
    let warning = the_one_warning(&log);
    assert!(warning.contains("Connection refused"), "{warning}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_logs_one_warning_with_host_and_cause() {
    let impostor = TestApi::start(&TestCa::new()).await;
    let log = log_of_a_502(impostor.https_addr()).await;
    let warning = the_one_warning(&log);
    assert!(
        warning.contains("TLS handshake failed: invalid peer certificate"),
        "{warning}"
    );
    assert_eq!(impostor.requests(), 0);
}
