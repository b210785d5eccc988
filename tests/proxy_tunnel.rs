//! CONNECT to hosts without a route (a blind tunnel, or 403 with `unrouted = "deny"`), and
//! the binding of credentials to the CONNECT host inside an intercepted tunnel.

use http::{StatusCode, Version};

use crate::support::client;
use crate::support::proxy::{ProxyOptions, Setup};

/// Through a blind tunnel the client talks TLS with the real server: it sees the server's
/// own certificate (trusting only the test CA, never credproxy's) and no credential is added.
async fn assert_blind_tunnel(
    setup: &Setup,
    proxy_addr: std::net::SocketAddr,
    target: &str,
    sni: &str,
) {
    let before = setup.api.requests();
    let tunnel = client::connect(proxy_addr, target, &[]).await.tunnel();
    let config = client::with_alpn(setup.ca.client_config(), &[b"http/1.1"]);
    let tls = client::tls(tunnel, sni, config).await;
    assert_eq!(
        client::peer_leaf(&tls),
        setup.api.leaf_cert(),
        "the client must see the real server's certificate through an unrouted tunnel"
    );
    let mut h1 = client::h1(tls).await;
    let answer = client::send1(&mut h1, client::get("/echo", sni, &[])).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(setup.api.requests(), before + 1);
    let seen = setup.api.last();
    assert!(
        seen.authorization().is_empty(),
        "a credential went into a blind tunnel: {seen:?}"
    );

    // Nothing inside is inspected or rewritten: a client's own header arrives as sent.
    let answer = client::send1(
        &mut h1,
        client::get("/echo", sni, &[("authorization", "Bearer the-clients-own")]),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(setup.api.last().authorization(), ["Bearer the-clients-own"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_connect_is_a_blind_tunnel_to_the_real_server() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;
    assert_blind_tunnel(
        &setup,
        proxy.proxy_addr,
        "unrouted.test:443",
        "unrouted.test",
    )
    .await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_an_ip_address_is_unrouted_even_when_it_is_the_apis() {
    let setup = Setup::start().await;
    // The test API listens on loopback, which the default proxy.block refuses.
    let options = ProxyOptions::default().proxy_key("block", "[]");
    let proxy = setup.start_proxy(&options).await;
    let target = setup.api.https_addr().to_string();
    assert_blind_tunnel(&setup, proxy.proxy_addr, &target, "127.0.0.1").await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_is_denied_with_403_when_configured() {
    let setup = Setup::start().await;
    let proxy = setup
        .start_proxy(&ProxyOptions::default().unrouted("deny"))
        .await;

    let refused = client::connect(proxy.proxy_addr, "unrouted.test:443", &[])
        .await
        .refused();
    refused.assert_credproxy_error(StatusCode::FORBIDDEN, "denied");

    let plain = client::proxy_get(proxy.proxy_addr, "http://unrouted.test/echo", &[]).await;
    plain.assert_credproxy_error(StatusCode::FORBIDDEN, "denied");
    assert_eq!(setup.api.requests(), 0, "a denied request reached a server");

    // The routed host still works.
    let answer = client::proxy_get(proxy.proxy_addr, "http://api.test/echo", &[]).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_another_host_inside_a_tunnel_is_refused_without_credentials() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;

    // HTTP/1.1: the Host header names another host, or another port.
    let tunnel = client::connect(proxy.proxy_addr, "api.test:443", &[])
        .await
        .tunnel();
    let config = client::with_alpn(setup.credproxy_client_config(), &[b"http/1.1"]);
    let mut h1 = client::h1(client::tls(tunnel, "api.test", config).await).await;
    for host in ["other.test", "api.test:8443"] {
        let answer = client::send1(&mut h1, client::get("/echo", host, &[])).await;
        answer.assert_credproxy_error(StatusCode::MISDIRECTED_REQUEST, "host_mismatch");
    }

    // h2: the :authority names another host.
    let tunnel = client::connect(proxy.proxy_addr, "api.test:443", &[])
        .await
        .tunnel();
    let config = client::with_alpn(setup.credproxy_client_config(), &[b"h2"]);
    let mut h2 = client::h2(client::tls(tunnel, "api.test", config).await).await;
    let answer = client::send2(&mut h2, client::get("https://other.test/echo", "", &[])).await;
    answer.assert_credproxy_error(StatusCode::MISDIRECTED_REQUEST, "host_mismatch");

    assert_eq!(
        setup.api.requests(),
        0,
        "a mismatched request reached a server: {:?}",
        setup.api.seen()
    );

    // The tunnel's own host still works on the same connection.
    let answer = client::send1(&mut h1, client::get("/echo", "api.test", &[])).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(setup.api.requests(), 1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrouted_plain_request_is_forwarded_without_credentials() {
    let setup = Setup::start().await;
    let options = ProxyOptions::default().resolve("unrouted.test:80", setup.api.http_addr());
    let proxy = setup.start_proxy(&options).await;

    let answer = client::proxy_get(
        proxy.proxy_addr,
        "http://unrouted.test/echo",
        &[("authorization", "Bearer the-clients-own")],
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let seen = setup.api.last();
    assert!(!seen.tls);
    assert_eq!(seen.authorization(), ["Bearer the-clients-own"], "{seen:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_inside_a_connect_tunnel_is_intercepted_and_sent_upstream_over_tls() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;

    // Some clients CONNECT to port 80 and then speak plain HTTP inside.
    let tunnel = client::connect(proxy.proxy_addr, "api.test:80", &[])
        .await
        .tunnel();
    let mut h1 = client::h1(tunnel).await;
    let answer = client::send1(
        &mut h1,
        client::get("/echo", "api.test", &[("authorization", "Bearer wrong")]),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let seen = setup.api.last();
    assert!(
        seen.tls,
        "the credential went upstream in plaintext: {seen:?}"
    );
    assert_eq!(
        seen.authorization(),
        [format!("Bearer {}", setup.current_token())]
    );
    proxy.stop().await;
}

/// A client that negotiated no protocol (TLS without ALPN, or plain HTTP inside the
/// tunnel) is served the one it speaks: HTTP/1.1, or h2 with prior knowledge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_alpn_the_first_bytes_choose_http1_or_h2() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;
    let expected = || [format!("Bearer {}", setup.current_token())];
    let no_alpn = || setup.credproxy_client_config();
    let tunnel = |port: u16| async move {
        client::connect(proxy.proxy_addr, &format!("api.test:{port}"), &[])
            .await
            .tunnel()
    };

    let tls = client::tls(tunnel(443).await, "api.test", no_alpn()).await;
    let answer = client::send1(
        &mut client::h1(tls).await,
        client::get("/echo", "api.test", &[]),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.version, Version::HTTP_11);
    assert_eq!(setup.api.last().authorization(), expected());

    let h2_request = || client::get("https://api.test/echo", "", &[]);
    let tls = client::tls(tunnel(443).await, "api.test", no_alpn()).await;
    let answer = client::send2(&mut client::h2(tls).await, h2_request()).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.version, Version::HTTP_2);
    assert_eq!(setup.api.last().authorization(), expected());

    let answer = client::send2(&mut client::h2(tunnel(80).await).await, {
        let mut request = h2_request();
        *request.uri_mut() = http::Uri::from_static("http://api.test/echo");
        request
    })
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.version, Version::HTTP_2);
    let seen = setup.api.last();
    assert!(
        seen.tls,
        "the credential went upstream in plaintext: {seen:?}"
    );
    assert_eq!(seen.authorization(), expected());
    assert_eq!(setup.api.requests(), 3);
    proxy.stop().await;
}

/// A `Host` header that contradicts the request target (absolute-form URL, or h2
/// `:authority`) must not travel upstream next to the credential: an HTTP/1.1 front end
/// routes by Host, so the token would reach whatever other host it serves. RFC 9112 §3.2.2:
/// a proxy replaces Host with the absolute-form target's host. Either refusing (421) or
/// rewriting Host is fine; forwarding it with the token is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_host_header_never_travels_upstream_with_credentials() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;
    let mut outcomes = Vec::new();

    // Plain forward: absolute-form `http://api.test/…`, `Host: other.test`.
    let tcp = tokio::net::TcpStream::connect(proxy.proxy_addr)
        .await
        .expect("connect");
    let mut plain = client::h1(tcp).await;
    let answer = client::send1(
        &mut plain,
        client::get("http://api.test/echo", "other.test", &[]),
    )
    .await;
    outcomes.push(("plain absolute-form", answer.status));

    // In a tunnel, HTTP/1.1 absolute-form `https://api.test/…`, `Host: other.test`.
    let tunnel = client::connect(proxy.proxy_addr, "api.test:443", &[])
        .await
        .tunnel();
    let config = client::with_alpn(setup.credproxy_client_config(), &[b"http/1.1"]);
    let mut h1 = client::h1(client::tls(tunnel, "api.test", config).await).await;
    let answer = client::send1(
        &mut h1,
        client::get("https://api.test/echo", "other.test", &[]),
    )
    .await;
    outcomes.push(("tunnel HTTP/1.1 absolute-form", answer.status));

    // In a tunnel, h2 `:authority: api.test` plus `host: other.test`.
    let tunnel = client::connect(proxy.proxy_addr, "api.test:443", &[])
        .await
        .tunnel();
    let config = client::with_alpn(setup.credproxy_client_config(), &[b"h2"]);
    let mut h2 = client::h2(client::tls(tunnel, "api.test", config).await).await;
    let answer = client::send2(
        &mut h2,
        client::get("https://api.test/echo", "other.test", &[]),
    )
    .await;
    outcomes.push(("tunnel h2 :authority + host", answer.status));

    let leaked: Vec<_> = setup
        .api
        .seen()
        .into_iter()
        .filter(|s| !s.authorization().is_empty())
        .filter(|s| s.headers.get("host").is_some_and(|h| h != "api.test"))
        .map(|s| s.headers)
        .collect();
    assert!(
        leaked.is_empty(),
        "the token went upstream with a Host naming another host ({outcomes:?}): {leaked:?}"
    );
    proxy.stop().await;
}
