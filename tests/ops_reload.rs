//! Live reload: the operator edits the config file and sends SIGHUP to `credproxy run`
//! (or `POST /reload` to the admin API). Routes and integrations are swapped; an
//! integration whose settings did not change keeps its token (no refresh), one whose scope
//! changed gets a token for the new scope; an invalid file changes nothing, and the error
//! is logged (and answered, for POST); listener changes are reported as needing a restart.

use http::StatusCode;

use crate::support::admin::Admin;
use crate::support::client;
use crate::support::proxy::{
    INTEGRATION, ProxyOptions, ProxyProcess, Setup, closed_port, integration_toml,
};
use crate::support::token::{self, TokenServer};

const SECOND: &str = "second";

/// Both test hosts also answer plain HTTP on :80 (where unrouted plain requests go).
fn base(setup: &Setup) -> ProxyOptions {
    ProxyOptions::default()
        .resolve("api.test:80", setup.api.http_addr())
        .resolve("other.test:80", setup.api.http_addr())
}

/// `GET http://HOST/echo` through the proxy: 200, and what the API saw (TLS, Authorization).
async fn fetch(setup: &Setup, proxy: std::net::SocketAddr, host: &str) -> (bool, Vec<String>) {
    let before = setup.api.requests();
    let answer = client::proxy_get(proxy, &format!("http://{host}/echo"), &[]).await;
    assert_eq!(answer.status, StatusCode::OK, "{host}: {}", answer.text());
    assert_eq!(setup.api.requests(), before + 1);
    let seen = setup.api.last();
    (seen.tls, seen.authorization())
}

/// `host` is routed: its requests go upstream over TLS with the current token.
async fn assert_routed(setup: &Setup, proxy: std::net::SocketAddr, host: &str) {
    let expected = format!("Bearer {}", setup.current_token());
    assert_eq!(
        fetch(setup, proxy, host).await,
        (true, vec![expected]),
        "{host} is routed with the token"
    );
}

/// `host` is not routed: its plain request is forwarded as is, with no credential.
async fn assert_unrouted(setup: &Setup, proxy: std::net::SocketAddr, host: &str) {
    assert_eq!(
        fetch(setup, proxy, host).await,
        (false, Vec::new()),
        "{host} is unrouted: forwarded in plain HTTP without a credential"
    );
}

async fn stop(proxy: ProxyProcess) -> String {
    let exit = proxy.stop().await;
    assert_eq!(exit.code, Some(0), "credproxy run log:\n{}", exit.log);
    exit.log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_routes_and_refreshes_only_the_integration_whose_scope_changed() {
    let setup = Setup::start().await;
    let second_rt = token::new_refresh_token(0);
    let second = TokenServer::start(&setup.ca, &second_rt).await;
    let v1 = base(&setup).extra(&integration_toml(SECOND, &second, &second_rt, Some("read")));
    let proxy = setup.spawn_proxy(&v1).await;
    let admin = Admin::new(proxy.admin_addr);
    admin.wait_for_readyz(StatusCode::OK).await;
    assert_eq!(
        second
            .last_request()
            .and_then(|r| r.field("scope").map(str::to_owned)),
        Some("read".to_owned())
    );
    assert_routed(&setup, proxy.proxy_addr, "api.test").await;
    assert_unrouted(&setup, proxy.proxy_addr, "other.test").await;
    let (demo_calls, second_calls) = (setup.tokens.calls(), second.calls());

    // The route moves to other.test; the second integration asks for another scope.
    let v2 = base(&setup)
        .route_host("other.test")
        .extra(&integration_toml(
            SECOND,
            &second,
            &second_rt,
            Some("write"),
        ));
    setup.rewrite_config(&v2);
    proxy.hangup();
    let line = proxy.wait_for_log("config reloaded").await;
    assert!(!line.contains("restart"), "nothing needs a restart: {line}");

    assert_routed(&setup, proxy.proxy_addr, "other.test").await;
    assert_unrouted(&setup, proxy.proxy_addr, "api.test").await;
    assert_eq!(
        setup.tokens.calls(),
        demo_calls,
        "the unchanged integration keeps its token: no refresh"
    );
    assert_eq!(admin.integration(INTEGRATION).await["refresh_count"], 1);

    // The scope changed: the token held was granted for "read"; a token for "write" is due.
    second.wait_for_calls(second_calls + 1).await;
    let request = second.last_request().expect("a refresh request");
    assert_eq!(
        request.field("scope"),
        Some("write"),
        "the refresh asks for the new scope"
    );
    admin.wait_for_readyz(StatusCode::OK).await;
    assert_eq!(
        setup.tokens.calls(),
        demo_calls,
        "still no refresh for {INTEGRATION}"
    );
    stop(proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_on_sighup_is_logged_and_the_old_config_keeps_serving() {
    let setup = Setup::start().await;
    let v1 = base(&setup);
    let proxy = setup.spawn_proxy(&v1).await;
    let admin = Admin::new(proxy.admin_addr);
    admin.wait_for_readyz(StatusCode::OK).await;
    assert_routed(&setup, proxy.proxy_addr, "api.test").await;
    let calls = setup.tokens.calls();

    // A syntax error: the route's table header is cut short.
    let broken = setup
        .config(&v1.clone().route_host("other.test"))
        .build()
        .replace("[[routes]]", "[[routes]");
    setup.dir.write_config(&broken);
    proxy.hangup();
    let line = proxy.wait_for_log("reload failed").await;
    assert!(
        line.contains("credproxy.toml"),
        "the logged error names the file: {line}"
    );
    assert_routed(&setup, proxy.proxy_addr, "api.test").await;
    assert_unrouted(&setup, proxy.proxy_addr, "other.test").await;

    // An unknown key (a typo) in an otherwise valid file that also moves the route.
    setup.rewrite_config(
        &v1.clone()
            .route_host("other.test")
            .limit("max_conections", "5"),
    );
    proxy.hangup();
    let lines = proxy.wait_for_log_count("reload failed", 2).await;
    assert!(
        lines[1].contains("max_conections"),
        "the logged error names the unknown key: {}",
        lines[1]
    );
    assert_routed(&setup, proxy.proxy_addr, "api.test").await;
    assert_unrouted(&setup, proxy.proxy_addr, "other.test").await;
    assert_eq!(
        setup.tokens.calls(),
        calls,
        "a failed reload refreshes nothing"
    );
    assert_eq!(admin.get("/readyz").await.status, StatusCode::OK);

    // Fixed: the next SIGHUP applies it.
    setup.rewrite_config(&v1.clone().route_host("other.test"));
    proxy.hangup();
    proxy.wait_for_log("config reloaded").await;
    assert_routed(&setup, proxy.proxy_addr, "other.test").await;
    let log = stop(proxy).await;
    assert_eq!(
        log.matches("reload failed").count(),
        2,
        "one error line per failed reload:\n{log}"
    );
}

/// `POST /reload` in-process: 200 with `needs_restart` for a valid file, 400 with the
/// error for an invalid one (the old config keeps serving), and a listen-address change
/// reported as needing a restart (the old address keeps serving).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_answers_the_outcome_and_lists_what_needs_a_restart() {
    let setup = Setup::start().await;
    // In-process, `${VAR}`s would come from the test's own environment: secret in the file.
    let v1 = base(&setup).secret_in_file();
    let proxy = setup.start_proxy(&v1).await;
    let admin = Admin::new(proxy.admin_addr);
    let calls = setup.tokens.calls();

    let answer = admin.post("/reload").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(
        answer.json(),
        serde_json::json!({ "reloaded": true, "needs_restart": [] })
    );

    let v2 = v1.clone().route_host("other.test");
    setup.rewrite_config(&v2);
    let answer = admin.post("/reload").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.json()["needs_restart"], serde_json::json!([]));
    assert_routed(&setup, proxy.proxy_addr, "other.test").await;
    assert_unrouted(&setup, proxy.proxy_addr, "api.test").await;

    // Invalid: a syntax error, then an unknown key. 400 with the error; v2 keeps serving.
    let broken = setup.config(&v1).build().replace("[[routes]]", "[[routes]");
    setup.dir.write_config(&broken);
    let answer = admin.post("/reload").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text);
    let body = answer.json();
    assert_eq!(body["error"], "invalid_config", "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("credproxy.toml")),
        "{body}"
    );
    setup.rewrite_config(&v1.clone().limit("max_conections", "5"));
    let answer = admin.post("/reload").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text);
    assert!(answer.text.contains("max_conections"), "{}", answer.text);
    assert_routed(&setup, proxy.proxy_addr, "other.test").await;
    assert_unrouted(&setup, proxy.proxy_addr, "api.test").await;

    // A new listen address and new limits are taken note of, not applied.
    let moved = closed_port().await.to_string();
    setup.rewrite_config(&v2.clone().listen(&moved).max_connections(77));
    let answer = admin.post("/reload").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    let needs_restart = answer.json()["needs_restart"].clone();
    let listed: Vec<&str> = needs_restart
        .as_array()
        .map(|l| l.iter().filter_map(|k| k.as_str()).collect())
        .unwrap_or_default();
    assert!(
        listed.contains(&"proxy.listen") && listed.contains(&"limits"),
        "needs_restart: {needs_restart}"
    );
    assert_routed(&setup, proxy.proxy_addr, "other.test").await;
    assert!(
        tokio::net::TcpStream::connect(&moved).await.is_err(),
        "a reload does not bind the new address"
    );
    assert_eq!(
        setup.tokens.calls(),
        calls,
        "no reload refreshed the unchanged integration"
    );
    proxy.stop().await;
}
