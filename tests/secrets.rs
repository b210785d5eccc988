//! No secret (client secret, refresh token, access token) in any output: every CLI run
//! goes through `support::cli`, which scans stdout and stderr for the `-SECRET-` marker
//! all test secrets carry (only `credproxy token`'s stdout may hold the access token).
//! Here the runs that matter most: every failure path, with debug logging on, a provider
//! that echoes secrets back, and the Debug/status output of the library's values.

use credproxy::secret::Secret;
use credproxy::state::{FileStore, StateStore};

use crate::support::cli::{ConfigBuilder, assert_no_secret_markers};
use crate::support::fixture::Fixture;
use crate::support::token::{self, CLIENT_ID, Failure};

const DEBUG: [(&str, &str); 1] = [("RUST_LOG", "debug")];

/// Each injected failure through `check` and `token`, with `RUST_LOG=debug` (and a few
/// runs with `trace`, which adds what TLS and HTTP libraries log); then the
/// permanent failures (wrong client secret, revoked grant), a corrupt state file holding
/// a token, and a config syntax error on the line holding a literal secret.
#[tokio::test]
async fn no_secret_in_any_command_output_with_debug_logs() {
    let fx = Fixture::start().await;
    fx.write_config();
    let run = |args: &'static [&'static str]| fx.run_with(args, &DEBUG);

    // The stored access token expires at once, so every `token` run refreshes too.
    fx.server.set_expires_in(0);
    let out = run(&["check"]).await;
    out.assert_code(0);
    assert!(
        out.stderr.contains("refreshed"),
        "debug logging is on: {}",
        out.stderr
    );
    run(&["ca", "init"]).await.assert_code(0);
    run(&["ca", "bundle"]).await.assert_code(0);

    let failures = [
        (Failure::Status500, "500"),
        (
            Failure::Status429 {
                retry_after_secs: 1,
            },
            "429",
        ),
        (Failure::Garbage, "JSON"),
        (Failure::EmptyToken, "access_token"),
        (Failure::EchoSecrets, "invalid_request"),
        (Failure::InvalidGrant, "invalid_grant"),
    ];
    for (failure, mentioning) in failures {
        fx.server.fail_next(1, failure.clone());
        let out = run(&["check"]).await;
        out.assert_code(1);
        assert!(
            out.line().starts_with("demo: error: ") && out.line().contains(mentioning),
            "{failure:?}: {}",
            out.stdout
        );
        fx.server.fail_next(1, failure.clone());
        let out = run(&["token", "demo"]).await;
        out.assert_code(1);
        assert!(out.stdout.is_empty(), "{failure:?}: {}", out.stdout);
        assert!(
            out.stderr.contains(mentioning),
            "{failure:?}: {}",
            out.stderr
        );
    }
    fx.server.set_expires_in(token::DEFAULT_EXPIRES_IN);
    let out = run(&["token", "demo"]).await;
    out.assert_code(0);
    assert!(fx.server.is_valid_access_token(out.line()));

    // Everything the dependencies log too (TLS, HTTP), on success and on failure.
    let trace = [("RUST_LOG", "trace")];
    fx.server.set_expires_in(0);
    let out = fx.run_with(&["check"], &trace).await;
    out.assert_code(0);
    assert!(out.stderr.contains("TRACE"), "trace logging is on");
    fx.server.fail_next(1, Failure::EchoSecrets);
    fx.run_with(&["token", "demo"], &trace).await.assert_code(1);
    fx.server.set_expires_in(token::DEFAULT_EXPIRES_IN);
    fx.run_with(&["token", "demo"], &trace).await.assert_code(0);

    // The provider no longer knows our client secret.
    let secret = fx.server.client_secret();
    fx.server.set_client(CLIENT_ID, &token::new_client_secret());
    let out = run(&["check"]).await;
    out.assert_code(1);
    assert!(out.line().contains("invalid_client"), "{}", out.stdout);
    fx.server.set_client(CLIENT_ID, &secret);

    // The grant is revoked: `check` fails; `token` still has a valid stored token.
    fx.server.revoke_all();
    let out = run(&["check"]).await;
    out.assert_code(1);
    assert!(out.line().contains("invalid_grant"), "{}", out.stdout);
    run(&["token", "demo"]).await.assert_code(0);

    // A damaged state file that still holds tokens.
    let mut state = fx.dir.state_bytes();
    state.truncate(state.len() / 2);
    fx.dir.write_state(&state);
    run(&["check"]).await.assert_code(1);

    // A config whose literal client secret sits on a line with a syntax error.
    let literal = token::new_client_secret();
    let text = fx
        .config()
        .client_secret_literal(&literal)
        .build()
        .replace(&format!("\"{literal}\""), &format!("\"{literal}"));
    fx.dir.write_config(&text);
    run(&["check"]).await.assert_code(2);
}

/// A provider error whose description quotes the refresh token and the client secret
/// (form and Basic auth, then JSON and body auth): neither appears in what credproxy
/// reports, on the command line or in-process.
#[tokio::test]
async fn provider_echoing_secrets_is_redacted() {
    let fx = Fixture::start().await;
    for builder in [
        fx.config(),
        fx.config().request_format("json").client_auth("body"),
    ] {
        builder.write(&fx.dir);
        fx.server.fail_next(1, Failure::EchoSecrets);
        let out = fx.run(&["check"]).await;
        out.assert_code(1);
        assert!(
            out.line().contains("is malformed for client secret"),
            "the description is kept, without the secrets: {}",
            out.stdout
        );
        let echoed = fx
            .server
            .requests()
            .last()
            .and_then(|r| r.field("refresh_token").map(str::to_owned))
            .expect("refresh token sent");
        assert!(!out.combined().contains(&echoed));

        let config = builder.load(&fx.dir);
        let tokens = credproxy::commands::open_tokens(&config)
            .await
            .expect("token store");
        let integration = tokens.get("demo").expect("demo").clone();
        fx.server.fail_next(1, Failure::EchoSecrets);
        let error = integration.ready().await.expect_err("the provider refused");
        assert_no_secret_markers(&credproxy::report::chain(&error));
        assert_no_secret_markers(&format!("{error:?}"));
        let status = integration.status();
        assert_no_secret_markers(&format!("{status:?}"));
        assert_no_secret_markers(&serde_json::to_string(&status).expect("status JSON"));
    }
    assert_eq!(fx.server.successes(), 0);
}

/// Debug output of the config (client secret, refresh token, proxy password), of a
/// published token, of a stored entry and of the status shows no secret.
#[tokio::test]
async fn debug_and_status_output_hold_no_secret() {
    let fx = Fixture::start().await;
    let builder = fx.config().raw(
        "[proxy]\nauth = { username = \"steps\", password = \"pw-SECRET-proxy\" }\n\n[[routes]]\nhost = \"api.test\"\nintegration = \"demo\"",
    );
    let config = builder.load(&fx.dir);
    for debug in [format!("{config:?}"), format!("{config:#?}")] {
        assert_no_secret_markers(&debug);
        assert!(debug.contains("demo"), "Debug still describes: {debug}");
    }
    let literal = ConfigBuilder::for_server(&fx.dir, &fx.server)
        .client_secret_literal(&fx.server.client_secret())
        .load(&fx.dir);
    assert_no_secret_markers(&format!("{literal:?}"));

    let tokens = credproxy::commands::open_tokens(&config)
        .await
        .expect("token store");
    let integration = tokens.get("demo").expect("demo").clone();
    let snapshot = integration.ready().await.expect("a token");
    assert_no_secret_markers(&format!("{snapshot:?}"));
    assert_no_secret_markers(&format!("{}", snapshot.access_token));
    let status = integration.status();
    assert_no_secret_markers(&format!("{status:?}"));
    assert_no_secret_markers(&serde_json::to_string(&status).expect("status JSON"));

    let store = FileStore::open(&fx.dir.state_path()).expect("state store");
    let entry = store
        .load("demo")
        .await
        .expect("load")
        .expect("stored entry");
    assert_no_secret_markers(&format!("{entry:?}"));
    assert_no_secret_markers(&format!("{:?}", Secret::new(fx.rt0.as_str())));
}
