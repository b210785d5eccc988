//! The secret scan: the operations scenarios — proxying (plain and intercepted, with proxy
//! auth), a sidecar, the 401 retry, refresh failures (including a provider that echoes
//! secrets back), SIGHUP and `POST /reload` with valid and invalid files, the admin API
//! with right and wrong tokens — against one `credproxy run` with `RUST_LOG=debug`; then
//! every log line, every `/metrics` scrape and every admin answer is scanned for every
//! secret: client secrets, refresh and access tokens, the proxy password, the admin token.

use base64::Engine;
use http::StatusCode;

use crate::support::admin::Admin;
use crate::support::ca;
use crate::support::cli::{assert_no_secret_markers, assert_no_secrets};
use crate::support::client::{self, CLIENT_TIMEOUT};
use crate::support::proxy::{INTEGRATION, ProxyOptions, Setup, integration_toml};
use crate::support::token::{self, Failure, TokenServer};

const USER: &str = "steps";

fn secret(kind: &str) -> String {
    format!("{kind}-SECRET-{:016x}", rand::random::<u64>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_any_log_line_metric_or_admin_answer_with_debug_logging() {
    let setup = Setup::start().await;
    let second_rt = token::new_refresh_token(0);
    let second = TokenServer::start(&setup.ca, &second_rt).await;
    let password = secret("pw");
    let admin_token = secret("adm");
    let options = |scope: &str| {
        ProxyOptions::default()
            .auth(USER, &password)
            .admin_token(&admin_token)
            .sidecar("https://api.test")
            .extra(&integration_toml(
                "second",
                &second,
                &second_rt,
                Some(scope),
            ))
    };
    let proxy = setup
        .spawn_proxy_with(&options("read"), &[], &[("RUST_LOG", "debug")])
        .await;
    let admin = Admin::with_token(proxy.admin_addr, &admin_token);
    admin.wait_for_readyz(StatusCode::OK).await;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{password}"))
    );
    let wrong_basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{}", secret("pw")))
    );
    let mut scrapes = Vec::new();

    // Proxying: plain forward with proxy auth, a wrong password, an intercepted tunnel.
    let answer = client::proxy_get(
        proxy.proxy_addr,
        "http://api.test/echo?token=q-SECRET-1",
        &[("proxy-authorization", &basic)],
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let answer = client::proxy_get(
        proxy.proxy_addr,
        "http://api.test/echo",
        &[("proxy-authorization", &wrong_basic)],
    )
    .await;
    assert_eq!(answer.status, StatusCode::PROXY_AUTHENTICATION_REQUIRED);
    assert_no_secret_markers(&answer.text());
    let https = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::all(format!("http://{}", proxy.proxy_addr))
                .expect("proxy URL")
                .basic_auth(USER, &password),
        )
        .tls_backend_preconfigured(ca::client_config_trusting(setup.credproxy_roots()))
        .timeout(CLIENT_TIMEOUT)
        .build()
        .expect("reqwest client");
    let response = https
        .get(setup.api_url("/echo"))
        .header("authorization", "Bearer client-SECRET-own")
        .send()
        .await
        .expect("intercepted request");
    assert_eq!(response.status(), StatusCode::OK);

    // The sidecar, and the 401 retry through the intercepted tunnel.
    let sidecar = format!("http://{}/echo", proxy.sidecar_addrs[0]);
    let response = client::reqwest_direct()
        .get(&sidecar)
        .send()
        .await
        .expect("sidecar");
    assert_eq!(response.status(), StatusCode::OK);
    setup.api.revoke(&setup.current_token());
    let response = https
        .get(setup.api_url("/echo"))
        .send()
        .await
        .expect("retry");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(setup.api.unauthorized(), 1);
    scrapes.push(admin.metrics().await);

    // Refresh failures, forced through the admin API, then a permanent one and recovery.
    for failure in [
        Failure::EchoSecrets,
        Failure::Status500,
        Failure::Garbage,
        Failure::EmptyToken,
    ] {
        setup.tokens.fail_next(1, failure.clone());
        let answer = admin.force_refresh(INTEGRATION).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_GATEWAY,
            "{failure:?}: {}",
            answer.text
        );
    }
    second.fail_next(1, Failure::EchoSecrets);
    let answer = admin.force_refresh("second").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.text);
    setup.tokens.revoke_all();
    let answer = admin.force_refresh(INTEGRATION).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.text);
    assert_eq!(
        admin.get("/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    admin.get("/integrations").await;
    scrapes.push(admin.metrics().await);
    setup
        .tokens
        .reset_chain(&setup.dir.stored_refresh_token(INTEGRATION));
    let answer = admin.force_refresh(INTEGRATION).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);

    // Reloads: a valid file by SIGHUP and by POST; invalid ones, one with a syntax error
    // on the line holding a literal client secret, one with an unknown key.
    setup.rewrite_config(&options("write"));
    proxy.hangup();
    proxy.wait_for_log("config reloaded").await;
    let answer = admin.post("/reload").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    let valid = setup.config(&options("write")).build();
    let literal = format!("client_secret = \"{}\"", second.client_secret());
    assert!(
        valid.contains(&literal),
        "the second integration's secret is in the file"
    );
    let broken = valid.replace(&literal, &format!("{literal} trailing garbage"));
    setup.dir.write_config(&broken);
    proxy.hangup();
    proxy.wait_for_log_count("reload failed", 1).await;
    let answer = admin.post("/reload").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text);
    let typo = valid.replace(&literal, &literal.replace("client_secret", "client_secert"));
    setup.dir.write_config(&typo);
    proxy.hangup();
    proxy.wait_for_log_count("reload failed", 3).await;
    let answer = admin.post("/reload").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text);
    setup.rewrite_config(&options("write"));
    let answer = admin.post("/reload").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    let answer = client::proxy_get(
        proxy.proxy_addr,
        "http://api.test/echo",
        &[("proxy-authorization", &basic)],
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());

    // The admin API, with the token, with a wrong one and without.
    let stranger = Admin::with_token(proxy.admin_addr, &secret("adm"));
    for path in ["/metrics", "/integrations", "/readyz", "/healthz"] {
        stranger.get(path).await;
        admin.get(path).await;
    }
    stranger.force_refresh("second").await;
    scrapes.push(admin.metrics().await);

    let exit = proxy.stop().await; // scans the whole log for `-SECRET-` too
    assert_eq!(exit.code, Some(0), "{}", exit.log);
    assert!(
        exit.log.contains(" DEBUG "),
        "RUST_LOG=debug took effect:\n{}",
        exit.log
    );

    // Every secret the test knows by value, besides the `-SECRET-` marker they all carry.
    let mut secrets = vec![
        password.clone(),
        admin_token.clone(),
        basic["Basic ".len()..].to_owned(),
        setup.tokens.client_secret(),
        second.client_secret(),
        setup.rt0.clone(),
        second_rt.clone(),
    ];
    for server in [&setup.tokens, &second] {
        for request in server.requests() {
            secrets.extend(request.field("refresh_token").map(str::to_owned));
        }
        secrets.extend(server.latest_refresh_token());
        secrets.extend(server.current_access_token());
    }
    for seen in setup.api.seen() {
        for value in seen.authorization() {
            secrets.extend(value.strip_prefix("Bearer ").map(str::to_owned));
        }
    }
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    let everything = [
        ("the log", exit.log),
        ("admin answers", admin.transcript()),
        ("admin answers to a wrong token", stranger.transcript()),
        (
            "/metrics",
            scrapes
                .iter()
                .map(|s| s.text().to_owned())
                .collect::<String>(),
        ),
    ];
    for (what, text) in &everything {
        assert!(!text.is_empty(), "{what} is empty");
        assert_no_secret_markers(text);
        assert_no_secrets(text, &secrets);
    }
}
