//! Every class of config error, through the binary: exit 2, one line on stderr naming
//! the config file, the key and the cause, nothing on stdout, and no provider call.

use crate::support::cli::{ConfigBuilder, Output};
use crate::support::fixture::Fixture;

/// Writes `config`, runs `check`, and checks the common shape of a config error;
/// returns the error line.
async fn config_error(fx: &Fixture, config: &str) -> String {
    fx.dir.write_config(config);
    let out: Output = fx.run(&["check"]).await;
    out.assert_code(2);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert_eq!(fx.server.calls(), 0);
    let error = out.error_line().to_owned();
    assert!(
        error.contains(&fx.dir.config_arg()),
        "names the file: {error}"
    );
    error
}

fn assert_mentions(error: &str, parts: &[&str]) {
    for part in parts {
        assert!(error.contains(part), "want {part:?} in {error:?}");
    }
}

#[tokio::test]
async fn unknown_key_names_the_key() {
    let fx = Fixture::start().await;
    let error = config_error(
        &fx,
        &fx.config().integration_line("refresh_tokn = \"x\"").build(),
    )
    .await;
    assert_mentions(&error, &["integrations.demo.refresh_tokn", "unknown field"]);

    let error = config_error(&fx, &fx.config().raw("[admn]\nlisten = \"x\"").build()).await;
    assert_mentions(&error, &["admn", "unknown field"]);
}

#[tokio::test]
async fn bad_duration_names_the_key() {
    let fx = Fixture::start().await;
    let error = config_error(&fx, &fx.config().refresh_skew("5 minutes").build()).await;
    assert_mentions(&error, &["integrations.demo.refresh_skew", "5 minutes"]);
}

#[tokio::test]
async fn bad_enum_names_the_key() {
    let fx = Fixture::start().await;
    let error = config_error(&fx, &fx.config().request_format("xml").build()).await;
    assert_mentions(&error, &["integrations.demo.request_format", "xml"]);
    let error = config_error(&fx, &fx.config().client_auth("digest").build()).await;
    assert_mentions(&error, &["integrations.demo.client_auth", "digest"]);
    let error = config_error(
        &fx,
        &fx.config().raw("[proxy]\nunrouted = \"drop\"").build(),
    )
    .await;
    assert_mentions(&error, &["proxy.unrouted", "drop"]);
}

#[tokio::test]
async fn bad_url_names_the_key() {
    let fx = Fixture::start().await;
    let error = config_error(&fx, &fx.config().refresh_url("not a url").build()).await;
    assert_mentions(&error, &["integrations.demo.refresh_url", "not a URL"]);
    // Plain http to a non-loopback host would carry the client secret in the clear.
    let error = config_error(
        &fx,
        &fx.config().refresh_url("http://oauth.test/token").build(),
    )
    .await;
    assert_mentions(&error, &["integrations.demo.refresh_url", "https"]);
}

#[tokio::test]
async fn unknown_integration_in_route_names_the_key() {
    let fx = Fixture::start().await;
    let route = "[[routes]]\nhost = \"api.test\"\nintegration = \"dropbx\"";
    let error = config_error(&fx, &fx.config().raw(route).build()).await;
    assert_mentions(&error, &["routes[0].integration", "dropbx"]);

    let template = "[[routes]]\nhost = \"api.test\"\nheaders = { Authorization = \"Bearer {{ $.integrations.dropbx.access_token }}\" }";
    let error = config_error(&fx, &fx.config().raw(template).build()).await;
    assert_mentions(&error, &["routes[0].headers.Authorization", "dropbx"]);
}

#[tokio::test]
async fn toml_syntax_error_names_the_line() {
    let fx = Fixture::start().await;
    let text = format!(
        "{}\n[proxy\nlisten = \"127.0.0.1:1\"\n",
        fx.config().build()
    );
    let line = text.lines().position(|l| l == "[proxy").expect("bad line") + 1;
    let error = config_error(&fx, &text).await;
    assert_mentions(&error, &["TOML syntax error", &format!("line {line}")]);
}

#[tokio::test]
async fn missing_env_var_names_the_var_and_the_key() {
    let fx = Fixture::start().await;
    fx.write_config();
    // No TEST_CLIENT_SECRET in the environment this time.
    let out = fx
        .dir
        .run(&["check", "-c", &fx.dir.config_arg()], &[])
        .await;
    out.assert_code(2);
    assert_mentions(
        out.error_line(),
        &[
            &fx.dir.config_arg(),
            ConfigBuilder::SECRET_VAR,
            "integrations.demo.client_secret",
        ],
    );
    assert_eq!(fx.server.calls(), 0);
}

#[tokio::test]
async fn missing_config_file_is_a_config_error() {
    let fx = Fixture::start().await;
    let out = fx.run(&["check"]).await;
    out.assert_code(2);
    assert_mentions(out.error_line(), &[&fx.dir.config_arg()]);
}

/// Every command loads the config the same way: `token` and `ca init` refuse it too.
#[tokio::test]
async fn every_command_rejects_a_bad_config() {
    let fx = Fixture::start().await;
    fx.config().refresh_skew("soon").write(&fx.dir);
    for args in [&["token", "demo"][..], &["ca", "init"], &["ca", "bundle"]] {
        let out = fx.run(args).await;
        out.assert_code(2);
        assert_mentions(out.error_line(), &["integrations.demo.refresh_skew"]);
    }
    assert!(!fx.dir.ca_key_path().exists());
    assert_eq!(fx.server.calls(), 0);
}
