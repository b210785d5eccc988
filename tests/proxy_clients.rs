//! Programs other than curl: reqwest (proxy + credproxy's CA, as a Rust program would be
//! configured) and a hyper HTTP/2 client driving CONNECT, TLS with ALPN h2 and h2 itself.

use http::{StatusCode, Version};

use crate::support::client;
use crate::support::proxy::{ProxyOptions, Setup};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_through_the_proxy_gets_the_current_token_injected() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;
    let http = client::reqwest_via(proxy.proxy_addr, setup.credproxy_roots());

    for sent in [None, Some("Bearer wrong")] {
        let mut request = http.get(setup.api_url("/echo"));
        if let Some(value) = sent {
            request = request.header("authorization", value);
        }
        let response = request.send().await.expect("request through the proxy");
        assert_eq!(response.status(), StatusCode::OK);
        let echo: serde_json::Value = response.json().await.expect("the API's JSON echo");
        let expected = format!("Bearer {}", setup.current_token());
        assert_eq!(
            echo["headers"]["authorization"],
            serde_json::json!([expected])
        );
        assert_eq!(setup.api.last().authorization(), [expected]);
    }
    // A POST with a small body reaches the API intact.
    let response = http
        .post(setup.api_url("/upload"))
        .body(vec![7u8; 1000])
        .send()
        .await
        .expect("POST through the proxy");
    assert_eq!(response.status(), StatusCode::OK);
    let body: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(body["received"], 1000);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyper_http2_client_through_connect_gets_the_current_token_injected() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;

    let tunnel = client::connect(proxy.proxy_addr, "api.test:443", &[])
        .await
        .tunnel();
    let config = client::with_alpn(setup.credproxy_client_config(), &[b"h2"]);
    let tls = client::tls(tunnel, "api.test", config).await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "ALPN did not pick h2"
    );
    let mut h2 = client::h2(tls).await;

    // Two streams on the one connection, one with a client credential that must be replaced.
    for headers in [&[][..], &[("authorization", "Bearer wrong")][..]] {
        let answer =
            client::send2(&mut h2, client::get("https://api.test/echo", "", headers)).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(answer.version, Version::HTTP_2);
        let expected = format!("Bearer {}", setup.current_token());
        assert_eq!(
            answer.json()["headers"]["authorization"],
            serde_json::json!([expected])
        );
        assert_eq!(setup.api.last().authorization(), [expected]);
    }
    assert_eq!(setup.api.requests(), 2);
    proxy.stop().await;
}
