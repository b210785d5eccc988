//! `credproxy run` stops on SIGTERM: it stops accepting, lets requests in flight finish
//! (in a plain forward and inside an intercepted tunnel), then exits 0.

use http::StatusCode;

use crate::support::client;
use crate::support::proxy::{ProxyOptions, Setup};
use crate::support::wait;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_in_flight_finish_then_exits_0() {
    let setup = Setup::start().await;
    let proxy = setup.spawn_proxy(&ProxyOptions::default()).await;
    let addr = proxy.proxy_addr;

    // Two requests parked at the API: one intercepted (CONNECT), one plain forward.
    let http = client::reqwest_via(addr, setup.credproxy_roots());
    let intercepted = tokio::spawn(http.get(setup.api_url("/gate")).send());
    let plain = tokio::spawn(client::proxy_get(addr, "http://api.test/gate", &[]));
    setup.api.wait_for_parked(2).await;

    proxy.terminate();
    proxy.wait_for_log("stopping").await;
    // Stopped accepting: new connections are refused while the two are still in flight.
    wait::until("credproxy refuses new connections after SIGTERM", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    assert!(!intercepted.is_finished() && !plain.is_finished());

    setup.api.open_gate();
    let response = intercepted
        .await
        .expect("request task")
        .expect("the intercepted request in flight must complete");
    assert_eq!(response.status(), StatusCode::OK);
    let answer = plain.await.expect("request task");
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());

    let exit = proxy.wait().await;
    assert_eq!(exit.code, Some(0), "credproxy run log:\n{}", exit.log);
}
