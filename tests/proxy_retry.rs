//! The 401 path: the API rejects the token credproxy sent (revoked at the provider), so
//! credproxy refreshes once, single-flight, and resends the request once.

use http::StatusCode;

use crate::support::client;
use crate::support::proxy::{InProcess, ProxyOptions, Setup};

/// A first request, so the token in use is known and the initial refresh is done.
async fn warm_up(setup: &Setup, http: &reqwest::Client) -> String {
    let response = http
        .get(setup.api_url("/echo"))
        .send()
        .await
        .expect("warm-up request");
    assert_eq!(response.status(), StatusCode::OK);
    let token = setup.current_token();
    assert_eq!(
        setup.api.last().authorization(),
        [format!("Bearer {token}")]
    );
    token
}

async fn started() -> (Setup, InProcess, reqwest::Client) {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;
    let http = client::reqwest_via(proxy.proxy_addr, setup.credproxy_roots());
    (setup, proxy, http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refreshed_once_and_the_request_resent_with_its_body() {
    let (setup, proxy, http) = started().await;
    let old = warm_up(&setup, &http).await;
    let refreshes = setup.tokens.successes();
    setup.api.revoke(&old);

    let response = http
        .post(setup.api_url("/upload"))
        .body(vec![1u8; 1000])
        .send()
        .await
        .expect("request through the proxy");
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the client must not see the 401"
    );
    let body: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(body["received"], 1000, "the resent request lost its body");

    assert_eq!(
        setup.tokens.successes(),
        refreshes + 1,
        "exactly one extra refresh"
    );
    assert_eq!(setup.api.unauthorized(), 1);
    let new = setup.current_token();
    assert_ne!(new, old);
    assert_eq!(
        setup.api.last_answers(2),
        [
            (StatusCode::UNAUTHORIZED, vec![format!("Bearer {old}")]),
            (StatusCode::OK, vec![format!("Bearer {new}")]),
        ]
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_on_an_h2_stream_is_retried_too() {
    let (setup, proxy, http) = started().await;
    let old = warm_up(&setup, &http).await;
    let refreshes = setup.tokens.successes();
    setup.api.revoke(&old);

    let tunnel = client::connect(proxy.proxy_addr, "api.test:443", &[])
        .await
        .tunnel();
    let config = client::with_alpn(setup.credproxy_client_config(), &[b"h2"]);
    let mut h2 = client::h2(client::tls(tunnel, "api.test", config).await).await;
    let answer = client::send2(&mut h2, client::get("https://api.test/echo", "", &[])).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(setup.tokens.successes(), refreshes + 1);
    assert_eq!(setup.api.unauthorized(), 1);
    assert_eq!(
        setup.api.last().authorization(),
        [format!("Bearer {}", setup.current_token())]
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_401s_cause_one_refresh() {
    const N: u64 = 50;
    let (setup, proxy, http) = started().await;
    let old = warm_up(&setup, &http).await;
    let calls = setup.tokens.calls();
    setup.api.revoke(&old);

    // The refresh is held until all 50 requests have had their 401, so they overlap.
    setup.tokens.hold_responses();
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..N {
        let request = http.get(setup.api_url("/echo")).send();
        requests.spawn(async move { request.await.map(|r| r.status()) });
    }
    setup.api.wait_for_unauthorized(N).await;
    setup.tokens.wait_for_calls(calls + 1).await;
    setup.tokens.release_responses();

    while let Some(status) = requests.join_next().await {
        let status = status
            .expect("request task")
            .expect("request through the proxy");
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(
        setup.tokens.calls(),
        calls + 1,
        "50 concurrent 401s must cause one refresh"
    );
    assert_eq!(setup.api.unauthorized(), N);
    let new = format!("Bearer {}", setup.current_token());
    let retried = setup
        .api
        .seen()
        .iter()
        .filter(|s| s.status == StatusCode::OK && s.authorization() == [new.clone()])
        .count();
    assert_eq!(
        retried as u64, N,
        "every request was resent with the new token"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_1_mib_is_not_resent_and_the_401_passes_through() {
    let (setup, proxy, http) = started().await;
    let old = warm_up(&setup, &http).await;
    setup.api.revoke(&old);

    let response = http
        .post(setup.api_url("/upload"))
        .body(vec![1u8; 2 * 1024 * 1024])
        .send()
        .await
        .expect("request through the proxy");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        response
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer error=\"invalid_token\""),
        "the API's own 401 reaches the client"
    );
    assert_eq!(setup.api.requests(), 2, "a large body is never resent");
    proxy.stop().await;
}

/// The state file announces nothing, so a running proxy does not learn that another process
/// (`credproxy check`) refreshed into it. A 401 to its token, right after a 401 made it
/// refresh (the forced-refresh rate limit holds), re-reads the file and resends with the
/// token there, without a refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_on_a_token_another_process_replaced_uses_the_state_files_token() {
    let (setup, proxy, http) = started().await;
    let first = warm_up(&setup, &http).await;
    setup.api.revoke(&first);
    let response = http
        .get(setup.api_url("/echo"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let old = setup.current_token();

    let config = setup.config(&ProxyOptions::default());
    let out = setup
        .dir
        .run(&["check", "-c", &setup.dir.config_arg()], &config.env())
        .await;
    out.assert_code(0);
    let new = setup.current_token();
    assert_ne!(new, old);
    let refreshes = setup.tokens.successes();

    setup.api.revoke(&old);
    let response = http
        .get(setup.api_url("/echo"))
        .send()
        .await
        .expect("request");
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the client must not see the 401"
    );
    assert_eq!(
        setup.api.last_answers(2),
        [
            (StatusCode::UNAUTHORIZED, vec![format!("Bearer {old}")]),
            (StatusCode::OK, vec![format!("Bearer {new}")]),
        ]
    );
    assert_eq!(setup.tokens.successes(), refreshes, "no refresh");
    proxy.stop().await;
}
