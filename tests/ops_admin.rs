//! The admin listener of a running `credproxy run` process, as an operator and a probe
//! see it: readiness that follows the token endpoint, forced refreshes visible in the
//! status list and the metrics, and the bearer token that guards it all but `/healthz`.

use http::StatusCode;
use reqwest::Method;

use crate::support::admin::Admin;
use crate::support::cli::assert_no_secrets;
use crate::support::proxy::{INTEGRATION, ProxyOptions, ProxyProcess, Setup};
use crate::support::token::Failure;

const REFRESHES: &str = "credproxy_refreshes_total";
const EXPIRES_IN: &str = "credproxy_token_expires_in_seconds";

async fn stop(proxy: ProxyProcess) {
    let exit = proxy.stop().await;
    assert_eq!(exit.code, Some(0), "credproxy run log:\n{}", exit.log);
}

fn refresh_path() -> String {
    format!("/integrations/{INTEGRATION}/refresh")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_flips_to_503_on_a_permanent_token_failure_and_back_on_recovery() {
    let setup = Setup::start().await;
    let proxy = setup.spawn_proxy(&ProxyOptions::default()).await;
    let admin = Admin::new(proxy.admin_addr);
    let ready = admin.wait_for_readyz(StatusCode::OK).await;
    assert_eq!(ready.json()["ready"], true, "{}", ready.text);

    // The user revoked the app at the provider: every refresh token is refused.
    setup.tokens.revoke_all();
    let answer = admin.force_refresh(INTEGRATION).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.text);
    assert!(answer.text.contains("invalid_grant"), "{}", answer.text);
    let not_ready = admin.get("/readyz").await;
    assert_eq!(
        not_ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        not_ready.text
    );
    assert_eq!(
        not_ready.json()["not_ready"],
        serde_json::json!([INTEGRATION])
    );
    assert_eq!(admin.integration(INTEGRATION).await["state"], "failed");
    assert_eq!(
        admin.get("/healthz").await.status,
        StatusCode::OK,
        "alive, not ready"
    );

    // Re-authorized: the provider accepts the stored refresh token again.
    setup
        .tokens
        .reset_chain(&setup.dir.stored_refresh_token(INTEGRATION));
    let answer = admin.force_refresh(INTEGRATION).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    let ready = admin.get("/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text);
    let entry = admin.integration(INTEGRATION).await;
    assert_eq!(entry["state"], "ok", "{entry}");
    assert_eq!(entry["last_error"], serde_json::Value::Null, "{entry}");
    stop(proxy).await;
}

/// Without any operator action: tokens live 2 s, so the background refresher renews them
/// every second; once the provider refuses the grant, `/readyz` turns 503 by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_background_refresher_when_the_grant_is_revoked() {
    let setup = Setup::start().await;
    setup.tokens.set_expires_in(2);
    let proxy = setup.spawn_proxy(&ProxyOptions::default()).await;
    let admin = Admin::new(proxy.admin_addr);
    admin.wait_for_readyz(StatusCode::OK).await;

    setup.tokens.revoke_all();
    let not_ready = admin.wait_for_readyz(StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(
        not_ready.json()["not_ready"],
        serde_json::json!([INTEGRATION])
    );
    assert!(setup.tokens.invalid_grant_count() >= 1);
    let entry = admin.integration(INTEGRATION).await;
    assert_eq!(entry["state"], "failed", "{entry}");
    proxy.wait_for_log("invalid_grant").await;

    // Recovery: the grant works again and the operator asks for a refresh.
    setup.tokens.set_expires_in(3600);
    setup
        .tokens
        .reset_chain(&setup.dir.stored_refresh_token(INTEGRATION));
    let answer = admin.force_refresh(INTEGRATION).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    admin.wait_for_readyz(StatusCode::OK).await;
    stop(proxy).await;
}

/// Each forced refresh shows in `/integrations` (`refresh_count`) and in
/// `credproxy_refreshes_total{integration, outcome}`; a failed one as `outcome="error"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_refreshes_show_in_the_status_counts_and_the_metrics() {
    let setup = Setup::start().await;
    let proxy = setup.spawn_proxy(&ProxyOptions::default()).await;
    let admin = Admin::new(proxy.admin_addr);
    admin.wait_for_readyz(StatusCode::OK).await;
    assert_eq!(admin.integration(INTEGRATION).await["refresh_count"], 1);
    let calls = setup.tokens.calls();

    for expected in 2..=3 {
        let answer = admin.force_refresh(INTEGRATION).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        assert_eq!(answer.json()["refresh_count"], expected, "{}", answer.text);
    }
    assert_eq!(
        setup.tokens.calls(),
        calls + 2,
        "each forced refresh called the provider"
    );
    setup.tokens.fail_next(1, Failure::Status500);
    let answer = admin.force_refresh(INTEGRATION).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.text);
    let entry = admin.integration(INTEGRATION).await;
    assert_eq!(entry["refresh_count"], 3, "{entry}");
    assert!(
        entry["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("500")),
        "{entry}"
    );

    let scrape = admin.metrics().await;
    let count = |outcome: &str| {
        scrape.value(
            REFRESHES,
            &[("integration", INTEGRATION), ("outcome", outcome)],
        )
    };
    assert_eq!(
        (count("ok"), count("error")),
        (Some(3.0), Some(1.0)),
        "{REFRESHES}{{integration=\"{INTEGRATION}\", outcome}}:\n{}",
        scrape.text()
    );
    let expires_in = scrape.get(EXPIRES_IN, &[("integration", INTEGRATION)]);
    assert!(
        (3000.0..=3600.0).contains(&expires_in),
        "the token issued for 3600 s expires in {expires_in} s"
    );
    stop(proxy).await;
}

/// Off loopback the admin API would hand anyone the power to read and steer the tokens:
/// `credproxy run` refuses to start without `admin.token`, naming the key (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_admin_listener_without_a_token_is_refused_with_exit_2() {
    let setup = Setup::start().await;
    let builder = setup.config(&ProxyOptions::default().admin_listen("0.0.0.0:0"));
    builder.write(&setup.dir);
    let config = setup.dir.config_arg();
    let out = setup.dir.run(&["run", "-c", &config], &builder.env()).await;
    out.assert_code(2);
    let error = out.last_error_line();
    assert!(
        error.contains("admin.token") && error.contains("credproxy.toml"),
        "the error names the file and the key: {error}"
    );
    assert_eq!(setup.tokens.calls(), 0, "nothing started");
}

/// With `admin.token` set, every endpoint but the probes (`/healthz`, `/readyz`, which
/// kubelets call without credentials) answers 401 (with `WWW-Authenticate: Bearer`) unless
/// the request carries the token; with it, 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_guards_every_endpoint_but_the_probes() {
    let token = format!("adm-SECRET-{:016x}", rand::random::<u64>());
    let setup = Setup::start().await;
    let proxy = setup
        .spawn_proxy(&ProxyOptions::default().admin_token(&token))
        .await;
    let admin = Admin::with_token(proxy.admin_addr, &token);
    admin.wait_for_readyz(StatusCode::OK).await;
    let calls = setup.tokens.calls();
    let stranger = Admin::new(proxy.admin_addr);

    for probe in ["/healthz", "/readyz"] {
        let answer = stranger.get(probe).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{probe} stays open for probes"
        );
    }

    let guarded = [
        (Method::GET, "/metrics".to_owned()),
        (Method::GET, "/integrations".to_owned()),
        (Method::POST, refresh_path()),
        (Method::POST, "/reload".to_owned()),
    ];
    let wrong = format!("adm-SECRET-{:016x}", rand::random::<u64>());
    for (method, path) in &guarded {
        for bearer in [None, Some(wrong.as_str())] {
            let answer = stranger.request_as(method.clone(), path, bearer).await;
            assert_eq!(
                answer.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {bearer:?}: {}",
                answer.text
            );
            assert_eq!(answer.www_authenticate.as_deref(), Some("Bearer"));
            assert_eq!(answer.json()["error"], "unauthorized", "{}", answer.text);
        }
    }
    assert_eq!(
        setup.tokens.calls(),
        calls,
        "an unauthorized POST must not refresh"
    );

    let scrape = admin.metrics().await;
    assert!(scrape.family("credproxy_requests_total").is_some());
    let answer = admin.get("/integrations").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    let answer = admin.post(&refresh_path()).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);

    assert_no_secrets(&stranger.transcript(), &[&token, &wrong]);
    assert_no_secrets(&admin.transcript(), &[&token]);
    stop(proxy).await;
}
