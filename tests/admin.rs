//! The admin listener: liveness, readiness that follows the token endpoint's health, the
//! integration status list (no secrets) and the forced refresh.

use http::StatusCode;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::support::cli::assert_no_secret_markers;
use crate::support::client;
use crate::support::proxy::{INTEGRATION, InProcess, ProxyOptions, Setup};

/// A method, admin path and the answer: status and JSON body (checked for secrets).
async fn admin(proxy: &InProcess, method: reqwest::Method, path: &str) -> (StatusCode, Value) {
    let response = client::reqwest_direct()
        .request(method, proxy.admin_url(path))
        .send()
        .await
        .unwrap_or_else(|e| panic!("admin {path}: {e}"));
    let status = response.status();
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json"),
        "admin {path}"
    );
    let text = response.text().await.expect("admin body");
    assert_no_secret_markers(&text);
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("admin {path} is not JSON ({e}): {text}"));
    (status, body)
}

async fn get(proxy: &InProcess, path: &str) -> (StatusCode, Value) {
    admin(proxy, reqwest::Method::GET, path).await
}

async fn force_refresh(proxy: &InProcess) -> (StatusCode, Value) {
    admin(
        proxy,
        reqwest::Method::POST,
        &format!("/integrations/{INTEGRATION}/refresh"),
    )
    .await
}

/// The one integration's entry in `GET /integrations`.
async fn status(proxy: &InProcess) -> Value {
    let (code, body) = get(proxy, "/integrations").await;
    assert_eq!(code, StatusCode::OK);
    let list = body
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {body}"));
    assert_eq!(list.len(), 1, "{body}");
    list[0].clone()
}

fn timestamp(value: &Value) -> OffsetDateTime {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a timestamp: {value}"));
    OffsetDateTime::parse(text, &Rfc3339).unwrap_or_else(|e| panic!("{text} is not RFC 3339: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrations_lists_each_status_without_secrets() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;

    let (code, body) = get(&proxy, "/healthz").await;
    assert_eq!(code, StatusCode::OK, "{body}");

    let entry = status(&proxy).await;
    let mut keys: Vec<&str> = entry
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {entry}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "expires_at",
            "grant",
            "last_error",
            "last_refresh_at",
            "name",
            "recent",
            "refresh_count",
            "state"
        ]
    );
    assert_eq!(entry["name"], INTEGRATION);
    assert_eq!(entry["grant"], "refresh_token");
    assert_eq!(entry["state"], "ok");
    assert_eq!(entry["last_error"], Value::Null);
    assert_eq!(entry["refresh_count"], 1);
    assert_eq!(entry["recent"].as_array().map(Vec::len), Some(1), "{entry}");
    assert_eq!(entry["recent"][0]["ok"], true, "{entry}");
    assert_eq!(
        entry["recent"][0]["at"], entry["last_refresh_at"],
        "{entry}"
    );
    let now = OffsetDateTime::now_utc();
    assert!(timestamp(&entry["expires_at"]) > now, "{entry}");
    assert!(timestamp(&entry["last_refresh_at"]) <= now, "{entry}");
    let text = entry.to_string();
    for secret in [
        setup.current_token(),
        setup.tokens.client_secret(),
        setup.dir.stored_refresh_token(INTEGRATION),
    ] {
        assert!(!text.contains(&secret), "a secret in /integrations: {text}");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_refresh_rotates_the_refresh_token_and_has_persisted_it_when_it_returns() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;
    let before = setup.dir.stored_refresh_token(INTEGRATION);
    assert_eq!(
        setup.tokens.latest_refresh_token().as_deref(),
        Some(before.as_str())
    );
    let old_access = setup.current_token();

    let (code, body) = force_refresh(&proxy).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["name"], INTEGRATION);
    assert_eq!(body["state"], "ok");
    assert_eq!(body["refresh_count"], 2);

    // Read the moment the call returned: the state file already holds the rotated token.
    let stored = setup.dir.read_state();
    let entry = &stored["integrations"][INTEGRATION];
    let latest = setup
        .tokens
        .latest_refresh_token()
        .expect("a current refresh token");
    assert_ne!(latest, before, "the provider did not rotate");
    assert_eq!(
        entry["refresh_token"],
        latest.as_str(),
        "the state file lags behind"
    );
    let new_access = setup.current_token();
    assert_ne!(new_access, old_access);
    assert_eq!(entry["access_token"], new_access.as_str());

    // And requests through the proxy now carry the new token.
    let answer = client::proxy_get(proxy.proxy_addr, "http://api.test/echo", &[]).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        setup.api.last().authorization(),
        [format!("Bearer {new_access}")]
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_flips_when_the_token_endpoint_fails_permanently_and_back_on_recovery() {
    let setup = Setup::start().await;
    let proxy = setup.start_proxy(&ProxyOptions::default()).await;
    let (code, body) = get(&proxy, "/readyz").await;
    assert_eq!(code, StatusCode::OK, "{body}");

    // The user revoked the app: every refresh token is refused from now on.
    setup.tokens.revoke_all();
    let (code, body) = force_refresh(&proxy).await;
    assert_eq!(code, StatusCode::BAD_GATEWAY, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("invalid_grant"),
        "the provider's error is shown: {body}"
    );

    let (code, body) = get(&proxy, "/readyz").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["not_ready"], serde_json::json!([INTEGRATION]));
    let entry = status(&proxy).await;
    assert_eq!(entry["state"], "failed", "{entry}");
    assert!(
        entry["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("invalid_grant")),
        "{entry}"
    );
    let (code, _) = get(&proxy, "/healthz").await;
    assert_eq!(code, StatusCode::OK, "alive, though not ready");

    // The provider accepts the stored refresh token again (re-authorized).
    setup
        .tokens
        .reset_chain(&setup.dir.stored_refresh_token(INTEGRATION));
    let (code, body) = force_refresh(&proxy).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let (code, body) = get(&proxy, "/readyz").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let entry = status(&proxy).await;
    assert_eq!(entry["state"], "ok", "{entry}");
    assert_eq!(entry["last_error"], Value::Null, "{entry}");
    proxy.stop().await;
}
