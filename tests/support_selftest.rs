//! The helpers in `support` tested against themselves, so a failing credproxy test points
//! at credproxy and not at its test harness.

use base64::prelude::{BASE64_STANDARD, Engine};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use serde_json::Value;

use crate::support::ca::TestCa;
use crate::support::token::{self, TokenServer};

/// A client trusting only the test CA, as credproxy does with `upstream.extra_ca`.
fn client(ca: &TestCa) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(ca.client_config())
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("building reqwest client")
}

async fn started() -> (TestCa, TokenServer, reqwest::Client, String) {
    let ca = TestCa::new();
    let rt0 = token::new_refresh_token(0);
    let server = TokenServer::start(&ca, &rt0).await;
    let client = client(&ca);
    (ca, server, client, rt0)
}

/// A form refresh with Basic client auth, as SPEC.md describes the default request.
async fn refresh(client: &reqwest::Client, server: &TokenServer, rt: &str) -> (StatusCode, Value) {
    let response = client
        .post(server.url())
        .basic_auth(server.client_id(), Some(server.client_secret()))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", rt)])
        .send()
        .await
        .expect("POST to token server");
    let status = response.status();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

fn refresh_token_of(body: &Value) -> String {
    body["refresh_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no refresh_token in {body}"))
        .to_owned()
}

mod token_server {
    use super::*;
    use crate::support::token::{BodyFormat, Failure};

    #[tokio::test]
    async fn refresh_returns_tokens_and_records_request() {
        let (_ca, server, client, rt0) = started().await;
        let (status, body) = refresh(&client, &server, &rt0).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let at = body["access_token"].as_str().expect("access_token");
        assert!(at.starts_with("at-SECRET-1-"), "{at}");
        assert_eq!(body["token_type"], "bearer");
        assert_eq!(body["expires_in"], token::DEFAULT_EXPIRES_IN);
        let rt1 = refresh_token_of(&body);
        assert!(rt1.starts_with("rt-SECRET-1-"), "{rt1}");
        assert!(server.is_valid_access_token(at));
        assert!(!server.is_valid_access_token("at-SECRET-1-forged"));
        assert_eq!(server.current_access_token().as_deref(), Some(at));
        assert_eq!(server.latest_refresh_token(), Some(rt1));
        assert_eq!((server.calls(), server.successes()), (1, 1));

        let req = server.last_request().expect("recorded");
        assert_eq!(req.format, BodyFormat::Form);
        assert_eq!(
            req.content_type(),
            Some("application/x-www-form-urlencoded")
        );
        assert_eq!(req.auth_scheme(), Some("Basic"));
        assert_eq!(req.field("grant_type"), Some("refresh_token"));
        assert_eq!(req.field("scope"), None);
        let (id, secret) = req.basic_credentials().expect("basic credentials");
        assert_eq!((id, secret), (server.client_id(), server.client_secret()));
    }

    #[tokio::test]
    async fn old_token_stays_valid_until_successor_is_used() {
        let (_ca, server, client, rt0) = started().await;
        let rt1 = refresh_token_of(&refresh(&client, &server, &rt0).await.1);

        // The client "lost" rt1: retrying with rt0 works and discards rt1.
        let (status, body) = refresh(&client, &server, &rt0).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let rt2 = refresh_token_of(&body);
        assert_eq!(server.grace_redemptions(), 1);
        let (status, body) = refresh(&client, &server, &rt1).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "invalid_grant");

        // Using rt2 ends rt0's grace.
        let (status, body) = refresh(&client, &server, &rt2).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, body) = refresh(&client, &server, &rt0).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "invalid_grant");
        assert_eq!(body["error_description"], "refresh token reused or revoked");
        // rt2 is now the grace token: still accepted once more.
        assert_eq!(refresh(&client, &server, &rt2).await.0, StatusCode::OK);

        let (status, _) = refresh(&client, &server, "rt-SECRET-9-unknown").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(server.invalid_grant_count(), 3);
        assert_eq!((server.calls(), server.successes()), (7, 4));
    }

    #[tokio::test]
    async fn revoke_all_then_reset_chain() {
        let (_ca, server, client, rt0) = started().await;
        server.revoke_all();
        assert_eq!(server.latest_refresh_token(), None);
        let (status, body) = refresh(&client, &server, &rt0).await;
        assert_eq!(
            (status, &body["error"]),
            (StatusCode::BAD_REQUEST, &"invalid_grant".into())
        );

        let fresh = token::new_refresh_token(0);
        server.reset_chain(&fresh);
        assert_eq!(refresh(&client, &server, &fresh).await.0, StatusCode::OK);
        assert_eq!(
            refresh(&client, &server, &rt0).await.0,
            StatusCode::BAD_REQUEST
        );
    }

    #[tokio::test]
    async fn without_rotation_the_token_is_kept() {
        let (_ca, server, client, rt0) = started().await;
        server.set_rotation(false);
        for _ in 0..2 {
            let (status, body) = refresh(&client, &server, &rt0).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert!(body.get("refresh_token").is_none(), "{body}");
        }
        assert_eq!(server.latest_refresh_token(), Some(rt0));
    }

    #[tokio::test]
    async fn expires_in_knobs() {
        let (_ca, server, client, rt0) = started().await;
        server.set_expires_in(0);
        server.set_send_expires_in(false);
        let (_, body) = refresh(&client, &server, &rt0).await;
        assert!(body.get("expires_in").is_none(), "{body}");
        let at = body["access_token"].as_str().expect("access_token");
        assert!(!server.is_valid_access_token(at), "expired at issue");

        server.set_expires_in(60);
        let (_, body) = refresh(&client, &server, &refresh_token_of(&body)).await;
        let at = body["access_token"].as_str().expect("access_token");
        assert!(server.is_valid_access_token(at));
        server.revoke_access_tokens();
        assert!(!server.is_valid_access_token(at));
    }

    #[tokio::test]
    async fn json_body_with_body_client_auth() {
        let (_ca, server, client, rt0) = started().await;
        let response = client
            .post(server.url())
            .json(&serde_json::json!({
                "grant_type": "refresh_token",
                "refresh_token": rt0,
                "client_id": server.client_id(),
                "client_secret": server.client_secret(),
                "scope": "files.read",
            }))
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status(), StatusCode::OK);
        let req = server.last_request().expect("recorded");
        assert_eq!(req.format, BodyFormat::Json);
        assert_eq!(req.content_type(), Some("application/json"));
        assert_eq!(req.auth_scheme(), None);
        assert_eq!(req.field("scope"), Some("files.read"));
    }

    #[tokio::test]
    async fn client_authentication_is_strict() {
        let (_ca, server, client, rt0) = started().await;
        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", rt0.as_str()),
        ];

        let wrong = client
            .post(server.url())
            .basic_auth(server.client_id(), Some("cs-SECRET-wrong"))
            .form(&form)
            .send()
            .await
            .expect("POST");
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
        let body: Value = wrong.json().await.expect("JSON error");
        assert_eq!(body["error"], "invalid_client");

        let none = client
            .post(server.url())
            .form(&form)
            .send()
            .await
            .expect("POST");
        assert_eq!(none.status(), StatusCode::UNAUTHORIZED);

        let mut both = form.to_vec();
        let secret = server.client_secret();
        both.push(("client_secret", &secret));
        let both = client
            .post(server.url())
            .basic_auth(server.client_id(), Some(server.client_secret()))
            .form(&both)
            .send()
            .await
            .expect("POST");
        assert_eq!(both.status(), StatusCode::BAD_REQUEST);

        // RFC 6749 §2.3.1: each half is form-urlencoded before base64.
        server.set_client("client 1", "cs-SECRET-a b:c/d+e%");
        let basic = BASE64_STANDARD.encode("client+1:cs-SECRET-a+b%3Ac%2Fd%2Be%25");
        let encoded = client
            .post(server.url())
            .header(AUTHORIZATION, format!("Basic {basic}"))
            .form(&form)
            .send()
            .await
            .expect("POST");
        assert_eq!(encoded.status(), StatusCode::OK);
        assert_eq!(
            server.successes(),
            1,
            "failed auth must not touch the chain"
        );
    }

    #[tokio::test]
    async fn injected_failures_then_recovery() {
        let (_ca, server, client, rt0) = started().await;
        server.fail_next(1, Failure::Status500);
        server.fail_next(
            1,
            Failure::Status429 {
                retry_after_secs: 7,
            },
        );
        server.fail_next(1, Failure::Garbage);
        server.fail_next(1, Failure::EmptyToken);
        server.fail_next(1, Failure::InvalidGrant);

        let (status, body) = refresh(&client, &server, &rt0).await;
        assert_eq!(
            (status, &body["error"]),
            (StatusCode::INTERNAL_SERVER_ERROR, &"server_error".into())
        );

        let limited = client
            .post(server.url())
            .basic_auth(server.client_id(), Some(server.client_secret()))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", rt0.as_str()),
            ])
            .send()
            .await
            .expect("POST");
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(limited.headers()[RETRY_AFTER], "7");

        let (status, body) = refresh(&client, &server, &rt0).await;
        assert_eq!(
            (status, body),
            (StatusCode::OK, Value::Null),
            "garbage is not JSON"
        );
        let (status, body) = refresh(&client, &server, &rt0).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.get("access_token").is_none(), "{body}");
        let (status, body) = refresh(&client, &server, &rt0).await;
        assert_eq!(
            (status, &body["error"]),
            (StatusCode::BAD_REQUEST, &"invalid_grant".into())
        );
        assert_eq!(server.invalid_grant_count(), 1);

        // Injected failures never consumed rt0.
        assert_eq!(refresh(&client, &server, &rt0).await.0, StatusCode::OK);
        assert_eq!((server.calls(), server.successes()), (6, 1));
    }

    /// One refresh as a task, so the test can watch the server while it is in flight.
    fn spawn_refresh(
        client: &reqwest::Client,
        server: &TokenServer,
        rt: &str,
    ) -> tokio::task::JoinHandle<StatusCode> {
        let (client, url, rt) = (client.clone(), server.url(), rt.to_owned());
        let (id, secret) = (server.client_id(), server.client_secret());
        tokio::spawn(async move {
            let form = [("grant_type", "refresh_token"), ("refresh_token", &rt)];
            let request = client.post(url).basic_auth(id, Some(secret)).form(&form);
            request.send().await.expect("POST").status()
        })
    }

    #[tokio::test]
    async fn events_report_arrival_before_the_held_response() {
        let (_ca, server, client, rt0) = started().await;
        server.hold_responses();
        let request = spawn_refresh(&client, &server, &rt0);
        server.wait_for_calls(1).await;
        assert_eq!(server.responses(), 0, "response is held");
        // The grant already took effect: the chain moved on before the response went out.
        assert_eq!(server.successes(), 1);
        server.release_responses();
        server.wait_for_responses(1).await;
        assert_eq!(request.await.expect("request task"), StatusCode::OK);
        assert_eq!(server.max_in_flight(), 1);
    }

    #[tokio::test]
    async fn overlapping_requests_are_visible() {
        let (_ca, server, client, rt0) = started().await;
        server.hold_responses();
        let requests: Vec<_> = (0..3)
            .map(|_| spawn_refresh(&client, &server, &rt0))
            .collect();
        server.wait_for_calls(3).await;
        assert_eq!(server.max_in_flight(), 3);
        server.release_responses();
        for request in requests {
            request.await.expect("request task");
        }
        server.wait_for_responses(3).await;
    }

    #[tokio::test]
    async fn delay_holds_the_response() {
        let (_ca, server, client, rt0) = started().await;
        server.set_delay(std::time::Duration::from_millis(50));
        let request = spawn_refresh(&client, &server, &rt0);
        server.wait_for_calls(1).await;
        assert_eq!(request.await.expect("request task"), StatusCode::OK);
        assert_eq!(server.responses(), 1);
    }

    #[tokio::test]
    #[should_panic(expected = "timed out after")]
    async fn waiting_for_a_call_that_never_comes_panics() {
        let (_ca, server, _client, _rt0) = started().await;
        tokio::time::pause(); // the 10 s timeout elapses at once; nothing else runs
        server.wait_for_calls(1).await;
    }

    #[tokio::test]
    async fn unsupported_body_and_grant() {
        let (_ca, server, client, _rt0) = started().await;
        let text = client
            .post(server.url())
            .basic_auth(server.client_id(), Some(server.client_secret()))
            .header(CONTENT_TYPE, "text/plain")
            .body("grant_type=refresh_token")
            .send()
            .await
            .expect("POST");
        assert_eq!(text.status(), StatusCode::BAD_REQUEST);
        let code = client
            .post(server.url())
            .basic_auth(server.client_id(), Some(server.client_secret()))
            .form(&[("grant_type", "authorization_code")])
            .send()
            .await
            .expect("POST");
        let body: Value = code.json().await.expect("JSON error");
        assert_eq!(body["error"], "unsupported_grant_type");
    }
}

mod test_ca {
    use super::*;

    #[tokio::test]
    async fn server_cert_covers_the_test_host_names() {
        let (ca, server, _client, _rt0) = started().await;
        for host in ["localhost", "oauth.test", "api.test"] {
            let client = reqwest::Client::builder()
                .tls_backend_preconfigured(ca.client_config())
                .no_proxy()
                .resolve(host, server.addr())
                .build()
                .expect("client");
            let url = format!("https://{host}:{}/token", server.addr().port());
            let response = client.post(url).send().await;
            let status = response
                .unwrap_or_else(|e| panic!("TLS to {host}: {e:?}"))
                .status();
            // An empty body: the handler answered, so TLS to `host` worked.
            assert_eq!(status, StatusCode::BAD_REQUEST, "{host}");
        }
    }

    #[tokio::test]
    async fn another_ca_is_not_trusted() {
        let (_ca, server, _client, _rt0) = started().await;
        let stranger = client(&TestCa::new());
        assert!(stranger.post(server.url()).send().await.is_err());
    }

    #[test]
    fn writes_only_the_certificate() {
        let ca = TestCa::new();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sub/test-ca.pem");
        ca.write_pem(&path);
        let pem = std::fs::read_to_string(&path).expect("read back");
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
        assert!(!pem.contains("PRIVATE KEY"));
        let certs = crate::support::ca::load_pem_certs(&path);
        assert_eq!(certs, vec![ca.cert_der()]);
    }
}

mod cli {
    use crate::support::cli::{self, ConfigBuilder, TestDir};
    use crate::support::token;

    #[tokio::test]
    async fn config_builder_emits_spec_toml() {
        let ca = crate::support::ca::TestCa::new();
        let dir = TestDir::with_ca(&ca);
        let server = token::TokenServer::start(&ca, &token::new_refresh_token(0)).await;
        let builder = ConfigBuilder::for_server(&dir, &server)
            .integration("dropbox")
            .request_format("json")
            .client_auth("body")
            .scope("a b")
            .refresh_skew("90s")
            .integration_line("default_expires_in = \"1h\"")
            .raw("[proxy]\nlisten = \"127.0.0.1:0\"");
        let text = builder.build();
        let path = builder.write(&dir);
        assert_eq!(
            std::fs::read_to_string(&path).expect("config written"),
            text
        );

        let parsed: toml::Table = text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"));
        let integration = &parsed["integrations"]["dropbox"];
        assert_eq!(
            integration["client_secret"].as_str(),
            Some("${TEST_CLIENT_SECRET}")
        );
        assert_eq!(
            integration["refresh_url"].as_str(),
            Some(server.url().as_str())
        );
        assert_eq!(integration["request_format"].as_str(), Some("json"));
        assert_eq!(integration["default_expires_in"].as_str(), Some("1h"));
        assert_eq!(
            parsed["upstream"]["extra_ca"].as_str(),
            dir.test_ca_path().to_str()
        );
        assert_eq!(parsed["proxy"]["listen"].as_str(), Some("127.0.0.1:0"));
        let secret = server.client_secret();
        assert_eq!(builder.env(), vec![("TEST_CLIENT_SECRET", secret.as_str())]);
        cli::assert_no_secrets(&text, &[&secret]);
    }

    #[test]
    fn leak_checks_catch_secrets() {
        let secret = token::new_client_secret();
        let text = format!("error: refresh failed for {secret}");
        let named = std::panic::catch_unwind(|| cli::assert_no_secrets(&text, &[&secret]));
        assert!(named.is_err());
        let marked = std::panic::catch_unwind(|| cli::assert_no_secret_markers(&text));
        assert!(marked.is_err());
        cli::assert_no_secret_markers("env var TEST_CLIENT_SECRET is not set");
    }

    #[tokio::test]
    async fn runs_the_binary() {
        let out = cli::run(&["--help"], &[]).await;
        out.assert_code(0);
    }
}
