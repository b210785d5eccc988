//! `[[proxy.clients]]`: each client may use only its routes (403 `route_not_allowed` at
//! CONNECT and per plain request, before any credential is touched), bad credentials of
//! every kind get the same 407, the client's name is in the request log line and the
//! requests metric, and a reload changes permissions for new requests only.

use base64::Engine;
use base64::prelude::BASE64_STANDARD;
use http::StatusCode;
use serde_json::Value;

use crate::support::admin::Admin;
use crate::support::client::{self, Answer};
use crate::support::proxy::{API_HOST, InProcess, ProxyOptions, Setup};

const OTHER_HOST: &str = "other.test";
const EXPORT: (&str, &str) = ("export", "pw-export-SECRET-7f3a");
const OPS: (&str, &str) = ("ops", "pw-ops-SECRET-91c2");

/// A second route (`other.test`, same integration), client `export` with `export_routes`
/// (a TOML array) and client `ops` with every route.
fn options(export_routes: &str) -> ProxyOptions {
    let client = |(name, password): (&str, &str), routes: &str| {
        format!("[[proxy.clients]]\nname = {name:?}\npassword = {password:?}\nroutes = {routes}\n")
    };
    ProxyOptions::default().secret_in_file().extra(&format!(
        "[[routes]]\nhost = {OTHER_HOST:?}\nintegration = \"demo\"\n\n{}\n{}",
        client(EXPORT, export_routes),
        client(OPS, r#"["*"]"#)
    ))
}

fn basic((user, password): (&str, &str)) -> String {
    format!(
        "Basic {}",
        BASE64_STANDARD.encode(format!("{user}:{password}"))
    )
}

/// `GET http://HOST/echo` through the proxy as `who`.
async fn plain(proxy: std::net::SocketAddr, host: &str, who: (&str, &str)) -> Answer {
    let auth = basic(who);
    let url = format!("http://{host}/echo");
    client::proxy_get(proxy, &url, &[("proxy-authorization", &auth)]).await
}

/// Opens an intercepted tunnel to `host:443` as `who`: an HTTP/1.1 connection inside it,
/// or the proxy's refusal.
async fn tunnel(
    setup: &Setup,
    proxy: std::net::SocketAddr,
    host: &str,
    who: (&str, &str),
) -> Result<hyper::client::conn::http1::SendRequest<client::BoxedBody>, Answer> {
    let auth = basic(who);
    match client::connect(
        proxy,
        &format!("{host}:443"),
        &[("proxy-authorization", &auth)],
    )
    .await
    {
        client::Connected::Tunnel(io) => {
            let config = client::with_alpn(setup.credproxy_client_config(), &[b"http/1.1"]);
            Ok(client::h1(client::tls(io, host, config).await).await)
        }
        client::Connected::Refused(answer) => Err(answer),
    }
}

/// Sends `GET /echo` inside an open tunnel to `host` and expects the API's 200 with the token.
async fn echo_inside(
    setup: &Setup,
    h1: &mut hyper::client::conn::http1::SendRequest<client::BoxedBody>,
    host: &str,
) {
    let answer = client::send1(h1, client::get("/echo", host, &[])).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let bearer = format!("Bearer {}", setup.current_token());
    assert_eq!(setup.api.last().authorization(), [bearer]);
}

/// Refused with 403 `route_not_allowed`, and nothing reached the API or the token endpoint.
fn assert_route_refused(setup: &Setup, answer: &Answer, api_before: u64, tokens_before: u64) {
    answer.assert_credproxy_error(StatusCode::FORBIDDEN, "route_not_allowed");
    assert_eq!(
        setup.api.requests(),
        api_before,
        "a refused request reached the API"
    );
    assert_eq!(
        setup.tokens.calls(),
        tokens_before,
        "a refused request touched a token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_uses_only_its_routes_and_is_named_in_the_log_and_the_metric() {
    let setup = Setup::start().await;
    let proxy = setup
        .spawn_proxy_with(&options(r#"["api.test"]"#), &["--log-format", "json"], &[])
        .await;
    let admin = Admin::new(proxy.admin_addr);
    admin.wait_for_readyz(StatusCode::OK).await;
    let addr = proxy.proxy_addr;

    // export: api.test yes, other.test no — per plain request and at CONNECT.
    let answer = plain(addr, API_HOST, EXPORT).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let mut h1 = tunnel(&setup, addr, API_HOST, EXPORT).await.unwrap();
    echo_inside(&setup, &mut h1, API_HOST).await;
    let (api, tokens) = (setup.api.requests(), setup.tokens.calls());
    let refused = plain(addr, OTHER_HOST, EXPORT).await;
    assert_route_refused(&setup, &refused, api, tokens);
    let refused = tunnel(&setup, addr, OTHER_HOST, EXPORT).await.unwrap_err();
    assert_route_refused(&setup, &refused, api, tokens);

    // ops: every route.
    for host in [API_HOST, OTHER_HOST] {
        let answer = plain(addr, host, OPS).await;
        assert_eq!(answer.status, StatusCode::OK, "{host}: {}", answer.text());
        let mut h1 = tunnel(&setup, addr, host, OPS).await.unwrap();
        echo_inside(&setup, &mut h1, host).await;
    }
    // Unrouted traffic is the same for every client (and follows proxy.block).
    let refused = plain(addr, "127.0.0.1:1", EXPORT).await;
    refused.assert_credproxy_error(StatusCode::FORBIDDEN, "blocked_address");

    let scrape = admin.metrics().await;
    let requests = |route: &str, client: &str, class: &str| {
        let labels = [
            ("route", route),
            ("client", client),
            ("status_class", class),
        ];
        scrape.get("credproxy_requests_total", &labels)
    };
    assert_eq!(requests(API_HOST, "export", "2xx"), 2.0);
    assert_eq!(requests(OTHER_HOST, "export", "4xx"), 1.0);
    assert_eq!(requests(OTHER_HOST, "export", "2xx"), 0.0);
    assert_eq!(requests(API_HOST, "ops", "2xx"), 2.0);
    assert_eq!(requests(OTHER_HOST, "ops", "2xx"), 2.0);
    assert_eq!(requests("unrouted", "export", "4xx"), 1.0);

    // export 5 lines, ops 6, unrouted 1: every CONNECT has a line of its own.
    let lines = proxy.wait_for_log_count(r#""message":"request""#, 12).await;
    let named = |client: &str, route: &str, status: u16| {
        lines.iter().any(|line| {
            let event: Value = serde_json::from_str(line).unwrap();
            let f = event.get("fields").unwrap_or(&event);
            f["client"] == client && f["route"] == route && f["status"] == status
        })
    };
    assert!(named("export", API_HOST, 200), "{lines:#?}");
    assert!(named("export", OTHER_HOST, 403), "{lines:#?}");
    assert!(named("ops", OTHER_HOST, 200), "{lines:#?}");
    let exit = proxy.stop().await;
    assert_eq!(exit.code, Some(0), "{}", exit.log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_missing_or_unknown_credentials_get_the_same_407() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&options(r#"["api.test"]"#)).await;
    let wrong_password = basic((EXPORT.0, OPS.1));
    let unknown_client = basic(("nobody", EXPORT.1));
    let not_base64 = "Basic %%%".to_owned();
    let cases: [Option<&str>; 4] = [
        None,
        Some(&wrong_password),
        Some(&unknown_client),
        Some(&not_base64),
    ];
    let mut bodies = Vec::new();
    for sent in cases {
        let headers: Vec<(&str, &str)> = sent
            .map(|v| ("proxy-authorization", v))
            .into_iter()
            .collect();
        let answer = client::proxy_get(proxy.proxy_addr, "http://api.test/echo", &headers).await;
        answer.assert_credproxy_error(
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            "proxy_auth_required",
        );
        bodies.push(answer.body.clone());
        let refused = client::connect(proxy.proxy_addr, "api.test:443", &headers)
            .await
            .refused();
        refused.assert_credproxy_error(
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            "proxy_auth_required",
        );
        bodies.push(refused.body);
    }
    assert!(
        bodies.windows(2).all(|pair| pair[0] == pair[1]),
        "a 407 says which part was wrong: {bodies:?}"
    );
    assert_eq!(setup.api.requests(), 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_permissions_for_new_requests_only() {
    let setup = Setup::start().await;
    let proxy: InProcess = setup.start_proxy(&options(r#"["api.test"]"#)).await;
    let addr = proxy.proxy_addr;
    let mut open = tunnel(&setup, addr, API_HOST, EXPORT).await.unwrap();
    echo_inside(&setup, &mut open, API_HOST).await;

    // export loses api.test and gains other.test.
    setup.rewrite_config(&options(r#"["other.test"]"#));
    assert_eq!(proxy.reload().await, Ok(Vec::new()));

    let (api, tokens) = (setup.api.requests(), setup.tokens.calls());
    let refused = plain(addr, API_HOST, EXPORT).await;
    assert_route_refused(&setup, &refused, api, tokens);
    let refused = tunnel(&setup, addr, API_HOST, EXPORT).await.unwrap_err();
    assert_route_refused(&setup, &refused, api, tokens);
    let answer = plain(addr, OTHER_HOST, EXPORT).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());

    // The tunnel opened before the reload keeps the permissions it was opened with.
    echo_inside(&setup, &mut open, API_HOST).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_satisfy_the_non_loopback_listen_rule() {
    let setup = Setup::start().await;
    let proxy = setup
        .start_proxy(&options(r#"["api.test"]"#).listen("0.0.0.0:0"))
        .await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], proxy.proxy_addr.port()));
    let anonymous = client::proxy_get(addr, "http://api.test/echo", &[]).await;
    anonymous.assert_credproxy_error(
        StatusCode::PROXY_AUTHENTICATION_REQUIRED,
        "proxy_auth_required",
    );
    let answer = plain(addr, API_HOST, EXPORT).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    proxy.stop().await;
}
