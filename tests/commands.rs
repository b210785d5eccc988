//! The one-shot commands as a user sees them: `check`'s one line per integration and
//! exit code, `token`'s usage error, the refresh request as configured reaching the
//! provider, and `ca init` / `ca bundle` (key mode 0600).

use std::os::unix::fs::PermissionsExt;

use crate::support::ca::load_pem_certs;
use crate::support::cli::{ConfigBuilder, TestDir};
use crate::support::fixture::Fixture;
use crate::support::token::{self, BodyFormat, CLIENT_ID, Failure, TokenServer};

// === check ===

/// Two integrations (`alpha` on one provider, `beta` on another): one stdout line each,
/// in name order; exit 0 only while both succeed.
#[tokio::test]
async fn check_prints_one_line_per_integration_and_fails_if_any_fails() {
    let fx = Fixture::start().await;
    let beta_rt = token::new_refresh_token(0);
    let beta = TokenServer::start(&fx.ca, &beta_rt).await;
    let beta_table = ConfigBuilder::for_server(&fx.dir, &beta)
        .integration("beta")
        .client_secret_literal(&beta.client_secret())
        .build();
    let beta_table = &beta_table[beta_table.find("[integrations.beta]").expect("table")..];
    // `beta` first in the file: the output is in name order all the same.
    fx.config()
        .integration("alpha")
        .raw(beta_table)
        .write(&fx.dir);

    let out = fx.run(&["check"]).await;
    out.assert_code(0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", out.stdout);
    assert!(
        lines[0].starts_with("alpha: ok, expires in "),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("beta: ok, expires in "),
        "{}",
        lines[1]
    );
    assert!(
        lines.iter().all(|l| l.contains("59m") || l.contains("1h")),
        "expires in about an hour: {lines:?}"
    );
    assert_eq!((fx.server.calls(), beta.calls()), (1, 1));

    beta.revoke_all();
    let out = fx.run(&["check"]).await;
    out.assert_code(1);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", out.stdout);
    assert!(
        lines[0].starts_with("alpha: ok, expires in "),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("beta: error: ") && lines[1].contains("invalid_grant"),
        "{}",
        lines[1]
    );

    fx.server.fail_next(1, Failure::Status500);
    let out = fx.run(&["check"]).await;
    out.assert_code(1);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", out.stdout);
    assert!(
        lines[0].starts_with("alpha: error: ") && lines[0].contains("500"),
        "{}",
        lines[0]
    );
    assert!(lines[1].starts_with("beta: error: "), "{}", lines[1]);
    assert_eq!(fx.server.invalid_grant_count(), 0);
}

/// `check` refreshes even when the stored token is still valid (it proves the
/// credentials work), and reports the provider's lifetime.
#[tokio::test]
async fn check_always_calls_the_provider() {
    let fx = Fixture::start().await;
    fx.write_config();
    fx.server.set_expires_in(90);
    for calls in 1..=2 {
        let out = fx.run(&["check"]).await;
        out.assert_code(0);
        assert!(
            out.line().starts_with("demo: ok, expires in 1m")
                || out.line() == "demo: ok, expires in 1m30s",
            "{}",
            out.stdout
        );
        assert_eq!(fx.server.calls(), calls);
    }
}

/// The config path comes from `-c`, else `CREDPROXY_CONFIG`, else
/// `config/credproxy.toml`; a missing default is a config error naming that path.
#[tokio::test]
async fn config_path_from_env_or_default() {
    let fx = Fixture::start().await;
    fx.write_config();
    let config = fx.dir.config_arg();
    let env = [
        ("CREDPROXY_CONFIG", config.as_str()),
        (ConfigBuilder::SECRET_VAR, fx.client_secret.as_str()),
    ];
    let out = fx.dir.run(&["check"], &env).await;
    out.assert_code(0);
    assert!(out.line().starts_with("demo: ok"), "{}", out.stdout);

    let out = fx.dir.run(&["check"], &env[1..]).await;
    out.assert_code(2);
    assert!(
        out.error_line().contains("config/credproxy.toml"),
        "{}",
        out.stderr
    );

    let default = fx.dir.path().join("config");
    std::fs::create_dir_all(&default).expect("config dir");
    std::fs::copy(&config, default.join("credproxy.toml")).expect("copy config");
    fx.dir.run(&["check"], &env[1..]).await.assert_code(0);
    assert_eq!(fx.server.calls(), 2);
}

/// A provider that cannot be reached, or whose certificate is not trusted (no
/// `extra_ca`): `check` says so on the integration's line and exits 1, promptly.
#[tokio::test]
async fn unreachable_or_untrusted_provider_is_a_check_error() {
    let fx = Fixture::start().await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    fx.config()
        .refresh_url(&format!("https://{closed}/token"))
        .write(&fx.dir);
    let out = fx.run(&["check"]).await;
    out.assert_code(1);
    assert!(
        out.line().starts_with("demo: error: ") && out.line().contains("unreachable"),
        "{}",
        out.stdout
    );

    let untrusting = TestDir::new();
    ConfigBuilder::for_server(&untrusting, &fx.server)
        .refresh_token(&fx.rt0)
        .write(&untrusting);
    let secret = fx.server.client_secret();
    let out = untrusting
        .run(
            &["check", "-c", &untrusting.config_arg()],
            &[(ConfigBuilder::SECRET_VAR, &secret)],
        )
        .await;
    out.assert_code(1);
    assert!(
        out.line().starts_with("demo: error: ") && out.line().contains("certificate"),
        "{}",
        out.stdout
    );
    assert_eq!(fx.server.successes(), 0);
}

// === token ===

#[tokio::test]
async fn token_with_unknown_name_is_a_usage_error() {
    let fx = Fixture::start().await;
    fx.write_config();
    let out = fx.run(&["token", "nosuch"]).await;
    out.assert_code(2);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    let error = out.error_line();
    assert!(error.contains("nosuch"), "{error}");
    assert_eq!(fx.server.calls(), 0);
}

// === the refresh request ===

/// The default request: a form body with grant_type and refresh_token, Basic client auth
/// (each half form-urlencoded first, RFC 6749 §2.3.1), no scope, no secret in the body.
#[tokio::test]
async fn default_request_is_a_form_with_basic_auth() {
    let fx = Fixture::start().await;
    // Credentials that need urlencoding: a client that skips it fails here.
    let secret = "cs-SECRET-a b:c/d+e%";
    fx.server.set_client("client 1", secret);
    fx.config()
        .client_id("client 1")
        .client_secret_literal(secret)
        .write(&fx.dir);
    fx.run(&["check"]).await.assert_code(0);

    let request = fx.server.last_request().expect("a request");
    assert_eq!(request.format, BodyFormat::Form);
    assert_eq!(
        request.content_type(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(request.auth_scheme(), Some("Basic"));
    assert_eq!(
        request.basic_credentials(),
        Some(("client 1".to_owned(), secret.to_owned()))
    );
    assert_eq!(request.field("grant_type"), Some("refresh_token"));
    assert_eq!(request.field("refresh_token"), Some(fx.rt0.as_str()));
    assert_eq!(request.field("scope"), None);
    assert_eq!(request.field("client_secret"), None);
    assert_eq!(fx.server.successes(), 1);
}

/// `request_format = "json"`, `client_auth = "body"` and `scope` reach the provider as
/// configured.
#[tokio::test]
async fn json_body_auth_and_scope_reach_the_provider() {
    let fx = Fixture::start().await;
    fx.config()
        .request_format("json")
        .client_auth("body")
        .scope("files.read offline")
        .write(&fx.dir);
    fx.run(&["check"]).await.assert_code(0);

    let request = fx.server.last_request().expect("a request");
    assert_eq!(request.format, BodyFormat::Json);
    assert_eq!(request.content_type(), Some("application/json"));
    assert_eq!(request.auth_scheme(), None);
    assert_eq!(request.field("client_id"), Some(CLIENT_ID));
    assert_eq!(
        request.field("client_secret"),
        Some(fx.server.client_secret().as_str())
    );
    assert_eq!(request.field("grant_type"), Some("refresh_token"));
    assert_eq!(request.field("refresh_token"), Some(fx.rt0.as_str()));
    assert_eq!(request.field("scope"), Some("files.read offline"));
    assert_eq!(fx.server.successes(), 1);
}

/// A form request with body client auth and a scope.
#[tokio::test]
async fn form_body_auth_sends_client_fields() {
    let fx = Fixture::start().await;
    fx.config().client_auth("body").scope("a b").write(&fx.dir);
    fx.run(&["check"]).await.assert_code(0);
    let request = fx.server.last_request().expect("a request");
    assert_eq!(request.format, BodyFormat::Form);
    assert_eq!(request.auth_scheme(), None);
    assert_eq!(request.field("client_id"), Some(CLIENT_ID));
    assert_eq!(request.field("scope"), Some("a b"));
    assert_eq!(fx.server.successes(), 1);
}

// === ca ===

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// `ca init` creates an ECDSA CA named "credproxy local CA", key mode 0600, prints the
/// certificate's path, and leaves an existing CA as it is.
#[tokio::test]
async fn ca_init_creates_a_private_key_once() {
    let fx = Fixture::start().await;
    fx.write_config();
    let cert_path = fx.dir.ca_cert_path();
    let key_path = fx.dir.ca_key_path();

    let out = fx.run(&["ca", "init"]).await;
    out.assert_code(0);
    assert_eq!(out.line(), cert_path.to_str().expect("utf-8"));
    assert_eq!(mode(&key_path), 0o600);
    let key = std::fs::read(&key_path).expect("key");
    assert!(String::from_utf8_lossy(&key).contains("PRIVATE KEY"));
    let cert = std::fs::read(&cert_path).expect("cert");
    let certs = load_pem_certs(&cert_path);
    assert_eq!(certs.len(), 1);
    let (_, parsed) = x509_parser::parse_x509_certificate(&certs[0]).expect("X.509");
    assert!(parsed.is_ca());
    assert!(
        parsed.subject().to_string().contains("credproxy local CA"),
        "{}",
        parsed.subject()
    );

    let again = fx.run(&["ca", "init"]).await;
    again.assert_code(0);
    assert_eq!(again.line(), out.line());
    assert_eq!(std::fs::read(&key_path).expect("key"), key);
    assert_eq!(std::fs::read(&cert_path).expect("cert"), cert);
    assert_eq!(mode(&key_path), 0o600);
}

/// `ca bundle` (with no CA yet: it creates one, key 0600) writes the system roots plus
/// the local CA certificate, never the key, and prints the bundle's path.
#[tokio::test]
async fn ca_bundle_holds_the_local_ca() {
    let fx = Fixture::start().await;
    fx.write_config();
    let out = fx.run(&["ca", "bundle"]).await;
    out.assert_code(0);
    let bundle_path = std::path::PathBuf::from(out.line());
    assert!(bundle_path.is_absolute() || bundle_path.exists());
    let bundle = std::fs::read_to_string(fx.dir.path().join(&bundle_path)).expect("bundle");
    assert_eq!(mode(&fx.dir.ca_key_path()), 0o600);
    let ca_pem = std::fs::read_to_string(fx.dir.ca_cert_path()).expect("CA cert");
    assert!(
        bundle.contains(ca_pem.trim()),
        "the local CA is in the bundle"
    );
    assert!(!bundle.contains("PRIVATE KEY"));
    let certs = load_pem_certs(&fx.dir.path().join(&bundle_path));
    let ca_der = load_pem_certs(&fx.dir.ca_cert_path());
    assert!(certs.contains(&ca_der[0]));

    // Again: the same CA, the bundle rewritten.
    let again = fx.run(&["ca", "bundle"]).await;
    again.assert_code(0);
    assert_eq!(again.line(), out.line());
    assert_eq!(
        std::fs::read_to_string(fx.dir.ca_cert_path()).expect("CA cert"),
        ca_pem
    );
}
