//! `credproxy authorize NAME` (issue 7), driven end to end: the real binary against a
//! strict test authorization server on 127.0.0.1 (code grant with PKCE), the test playing
//! the browser — it follows the printed URL, posts the consent, follows the redirect to
//! credproxy's loopback listener. Then the stored tokens must carry `check` and proxied
//! requests with no `refresh_token` in the config; wrong `state`, refusals, PKCE failures,
//! missing offline access and timeouts must each end in one clear line; no run prints a
//! secret (every run is scanned for `-SECRET-`, and for the code verifiers the server saw).

use std::os::unix::fs::PermissionsExt;

use http::StatusCode;

use crate::support::authz::{
    AuthorizeRun, AuthzServer, Browser, DENIED_DESCRIPTION, Decision, query_param, s256,
};
use crate::support::ca::TestCa;
use crate::support::cli::{ConfigBuilder, Output, TestDir, assert_no_secrets};
use crate::support::client;
use crate::support::proxy::{INTEGRATION, InProcess, ProxyOptions, Setup};

/// An authorization server, a temp dir trusting its CA, and the browser.
struct World {
    dir: TestDir,
    authz: AuthzServer,
    browser: Browser,
}

impl World {
    async fn start() -> Self {
        let ca = TestCa::new();
        let dir = TestDir::with_ca(&ca);
        let authz = AuthzServer::start(&ca).await;
        let browser = Browser::new(&ca);
        Self {
            dir,
            authz,
            browser,
        }
    }

    /// Integration `demo` set up for `authorize` (offline access asked for), written.
    fn write_config(&self) -> ConfigBuilder {
        let builder = self.authz.configure(ConfigBuilder::new(&self.dir));
        builder.write(&self.dir);
        builder
    }

    /// `credproxy authorize demo EXTRA… -c CONFIG`, running.
    fn authorize(&self, builder: &ConfigBuilder, extra: &[&str]) -> AuthorizeRun {
        let config = self.dir.config_arg();
        let mut args = vec!["authorize", INTEGRATION];
        args.extend_from_slice(extra);
        args.extend(["-c", &config]);
        AuthorizeRun::spawn(&self.dir, &args, &builder.env())
    }

    async fn run(&self, builder: &ConfigBuilder, args: &[&str]) -> Output {
        let config = self.dir.config_arg();
        let mut all = args.to_vec();
        all.extend(["-c", &config]);
        self.dir.run(&all, &builder.env()).await
    }

    /// No code verifier the server saw, nor the client secret, in `output`.
    fn assert_no_verifier_in(&self, output: &Output) {
        let verifiers = self.authz.verifiers();
        let mut secrets: Vec<&str> = verifiers.iter().map(String::as_str).collect();
        let client_secret = self.authz.client_secret();
        secrets.push(&client_secret);
        assert_no_secrets(&output.combined(), &secrets);
    }
}

fn assert_nothing_stored(dir: &TestDir) {
    assert!(
        !dir.state_path().exists(),
        "a failed authorization wrote the state file: {}",
        String::from_utf8_lossy(&std::fs::read(dir.state_path()).unwrap_or_default())
    );
}

// === the whole flow ===

/// `authorize --no-browser` prints the URL; the test approves in its "browser"; the
/// command stores refresh + access token; then, with no `refresh_token` in the config,
/// `credproxy check` refreshes from the stored chain and a proxied request carries the
/// chain's access token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_stores_tokens_that_check_and_the_proxy_then_use() {
    let setup = Setup::start().await;
    let authz = AuthzServer::start(&setup.ca).await;
    let redirect_uri = authz.redirect_uri();
    let browser = Browser::new(&setup.ca);
    let builder = authz.configure(setup.config(&ProxyOptions::default()));
    assert!(
        !builder.build().contains("refresh_token"),
        "the config must have no refresh_token:\n{}",
        builder.build()
    );
    builder.write(&setup.dir);
    let config = setup.dir.config_arg();

    let args = [
        "authorize",
        INTEGRATION,
        "--no-browser",
        "-c",
        config.as_str(),
    ];
    let run = AuthorizeRun::spawn(&setup.dir, &args, &builder.env());
    let url = run.url().await;
    let waiting = run
        .wait_for_line("the Waiting line", |l| l.starts_with("Waiting up to "))
        .await;
    assert!(
        waiting.contains(&redirect_uri),
        "the Waiting line names the redirect URI: {waiting}"
    );
    assert!(
        run.stdout()
            .starts_with("Open this URL in a browser to authorize demo:\n\n  https://"),
        "{}",
        run.stdout()
    );

    // The URL asks for the code grant with PKCE S256, state and offline access.
    assert!(url.starts_with(&authz.authorize_url()), "{url}");
    let param = |name: &str| query_param(&url, name);
    assert_eq!(param("response_type").as_deref(), Some("code"));
    assert_eq!(param("client_id"), Some(authz.client_id()));
    assert_eq!(
        param("redirect_uri").as_deref(),
        Some(redirect_uri.as_str())
    );
    assert_eq!(param("code_challenge_method").as_deref(), Some("S256"));
    assert_eq!(param("token_access_type").as_deref(), Some("offline"));
    assert!(param("state").is_some_and(|s| s.len() >= 16), "{url}");
    assert!(
        param("code_challenge").is_some_and(|c| c.len() == 43),
        "{url}"
    );

    // A stray request to the listener (a favicon) does not end the wait.
    let origin = redirect_uri.trim_end_matches("/callback");
    let stray = browser.get(&format!("{origin}/favicon.ico")).await;
    assert_eq!(stray.status, StatusCode::NOT_FOUND);

    let location = browser.authorize(&url, Decision::Approve).await;
    assert!(location.starts_with(&redirect_uri), "{location}");
    let page = browser.get(&location).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(
        page.body.contains("received the authorization code"),
        "{}",
        page.body
    );

    let out = run.finish().await;
    out.assert_code(0);
    let state_path = setup.dir.state_path();
    let last = out.stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "demo: authorized; refresh token stored in {}",
            state_path.display()
        )),
        "{}",
        out.stdout
    );
    assert_eq!(out.stderr, "", "nothing on stderr on success");

    // Exactly one code exchange, as RFC 6749 §4.1.3 + RFC 7636 §4.5 describe it.
    assert_eq!(authz.code_exchanges(), 1);
    assert_eq!(authz.token_errors(), Vec::<String>::new());
    let exchange = &authz.token_requests()[0];
    assert_eq!(exchange.field("grant_type"), Some("authorization_code"));
    assert_eq!(exchange.field("redirect_uri"), Some(redirect_uri.as_str()));
    assert_eq!(exchange.auth_scheme(), Some("Basic"));
    let verifier = exchange.field("code_verifier").expect("a code_verifier");
    assert_eq!(Some(s256(verifier)), param("code_challenge"));

    // The state file holds what the server issued, mode 0600.
    let stored = setup.dir.read_state();
    let entry = &stored["integrations"][INTEGRATION];
    let first_rt = authz
        .latest_refresh_token()
        .expect("a refresh token issued");
    assert_eq!(entry["refresh_token"].as_str(), Some(first_rt.as_str()));
    assert_eq!(
        entry["access_token"].as_str(),
        authz.latest_access_token().as_deref()
    );
    let mode = std::fs::metadata(&state_path)
        .expect("state file metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "state file mode {mode:o}");

    // `check` refreshes from the stored chain (the config has no refresh token).
    let check = setup
        .dir
        .run(&["check", "-c", &config], &builder.env())
        .await;
    check.assert_code(0);
    assert!(
        check.line().starts_with("demo: ok, expires in "),
        "{}",
        check.stdout
    );
    assert_eq!(authz.refreshes(), 1);
    let second_rt = authz.latest_refresh_token().expect("rotated");
    assert_ne!(first_rt, second_rt);
    assert_eq!(setup.dir.stored_refresh_token(INTEGRATION), second_rt);

    // The proxy starts from the stored token and injects it.
    let proxy = InProcess::start(&builder.load(&setup.dir)).await;
    proxy.wait_for_generation(1).await;
    let answer = client::proxy_get(proxy.proxy_addr, "http://api.test/hello", &[]).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let bearer = format!(
        "Bearer {}",
        authz.latest_access_token().expect("an access token")
    );
    assert_eq!(setup.api.last().authorization(), vec![bearer]);
    assert_eq!(
        authz.refreshes(),
        1,
        "the proxy used the stored, still valid token"
    );
    proxy.stop().await;

    let secrets = [verifier, authz.client_secret().as_str()].map(str::to_owned);
    for output in [&out, &check] {
        assert_no_secrets(
            &output.combined(),
            &secrets.iter().map(String::as_str).collect::<Vec<_>>(),
        );
    }
}

/// An integration whose config refresh token the provider has revoked: `authorize`
/// starts a new chain, and from then on it is used instead of the config's token.
#[tokio::test]
async fn authorize_replaces_a_revoked_config_refresh_token() {
    let w = World::start().await;
    let builder = w
        .authz
        .configure(ConfigBuilder::new(&w.dir))
        .refresh_token("rt-SECRET-revoked-long-ago");
    builder.write(&w.dir);

    let check = w.run(&builder, &["check"]).await;
    check.assert_code(1);
    assert!(check.line().contains("invalid_grant"), "{}", check.stdout);

    let run = w.authorize(&builder, &["--no-browser"]);
    let location = w
        .browser
        .authorize(&run.url().await, Decision::Approve)
        .await;
    assert_eq!(w.browser.get(&location).await.status, StatusCode::OK);
    run.finish().await.assert_code(0);

    let check = w.run(&builder, &["check"]).await;
    check.assert_code(0);
    assert!(check.line().starts_with("demo: ok"), "{}", check.stdout);
    assert_eq!(w.authz.refreshes(), 1);
    assert_eq!(
        w.dir.stored_refresh_token(INTEGRATION),
        w.authz.latest_refresh_token().expect("a chain")
    );
}

// === the redirect ===

/// A redirect whose `state` is not the one credproxy sent is refused, even with a real
/// code: the browser is told why, the command fails with one line, the code is never
/// exchanged and nothing is stored. The same for a pasted URL in `--manual`.
#[tokio::test]
async fn a_redirect_with_a_forged_state_is_rejected() {
    let w = World::start().await;
    let builder = w.write_config();

    let run = w.authorize(&builder, &["--no-browser"]);
    let url = run.url().await;
    let location = w.browser.authorize(&url, Decision::Approve).await;
    let code = query_param(&location, "code").expect("a code");
    let forged = format!(
        "{}?code={code}&state=forged-by-someone-else",
        w.authz.redirect_uri()
    );
    let page = w.browser.get(&forged).await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST, "{}", page.body);
    assert!(page.body.contains("state does not match"), "{}", page.body);

    let out = run.finish().await;
    out.assert_code(1);
    assert_eq!(
        out.error_line(),
        "credproxy: demo: the redirect's state does not match this authorization (a stale or forged redirect); start again"
    );
    assert_eq!(w.authz.token_calls(), 0, "the code must not be exchanged");
    assert_nothing_stored(&w.dir);

    // --manual: a pasted redirect URL with the wrong state.
    let config = w.dir.config_arg();
    let args = ["authorize", INTEGRATION, "--manual", "-c", config.as_str()];
    let mut run = AuthorizeRun::spawn_with_stdin(&w.dir, &args, &builder.env());
    let location = w
        .browser
        .authorize(&run.url().await, Decision::Approve)
        .await;
    let code = query_param(&location, "code").expect("a code");
    run.paste(&format!(
        "{}?code={code}&state=forged",
        w.authz.redirect_uri()
    ))
    .await;
    let out = run.finish().await;
    out.assert_code(1);
    assert!(
        out.error_line().contains("state does not match"),
        "{}",
        out.stderr
    );
    assert_eq!(w.authz.token_calls(), 0);
    assert_nothing_stored(&w.dir);
}

/// The user clicks "deny": the provider redirects with `error=access_denied`; the
/// command says so in one line and exits 1.
#[tokio::test]
async fn a_refused_consent_is_one_clear_line() {
    let w = World::start().await;
    let builder = w.write_config();

    let run = w.authorize(&builder, &["--no-browser"]);
    let location = w.browser.authorize(&run.url().await, Decision::Deny).await;
    assert_eq!(
        query_param(&location, "error").as_deref(),
        Some("access_denied")
    );
    let page = w.browser.get(&location).await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST, "{}", page.body);
    assert!(page.body.contains("access_denied"), "{}", page.body);

    let out = run.finish().await;
    out.assert_code(1);
    assert_eq!(
        out.error_line(),
        format!(
            "credproxy: demo: the provider refused the authorization: access_denied ({DENIED_DESCRIPTION})"
        )
    );
    assert_eq!(w.authz.token_calls(), 0);
    assert_nothing_stored(&w.dir);
}

/// Nobody completes the sign-in: `--timeout 1s` ends the wait with a message that
/// names the timeout and what to do.
#[tokio::test]
async fn authorize_times_out_with_a_clear_message() {
    let w = World::start().await;
    let builder = w.write_config();

    let run = w.authorize(&builder, &["--no-browser", "--timeout", "1s"]);
    run.url().await;
    let waiting = run
        .wait_for_line("the Waiting line", |l| l.starts_with("Waiting up to "))
        .await;
    assert!(waiting.starts_with("Waiting up to 1s "), "{waiting}");

    let out = run.finish().await;
    out.assert_code(1);
    let line = out.error_line();
    assert!(
        line.starts_with("credproxy: demo: no redirect arrived within 1s")
            && line.contains("credproxy authorize demo"),
        "{line}"
    );
    assert_eq!(w.authz.authorization_requests().len(), 0);
    assert_eq!(w.authz.token_calls(), 0);
    assert_nothing_stored(&w.dir);
}

// === the exchange ===

/// An authorization URL for `w.authz` built by hand (state `s1`, offline access).
fn hand_made_authorize_url(w: &World, challenge: &str, method: &str) -> String {
    let mut url = url::Url::parse(&w.authz.authorize_url()).expect("URL");
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &w.authz.client_id())
        .append_pair("redirect_uri", &w.authz.redirect_uri())
        .append_pair("state", "s1")
        .append_pair("code_challenge", challenge)
        .append_pair("code_challenge_method", method)
        .append_pair("token_access_type", "offline");
    url.to_string()
}

/// A fresh code for the challenge of `verifier`.
async fn hand_made_code(w: &World, verifier: &str) -> String {
    let url = hand_made_authorize_url(w, &s256(verifier), "S256");
    let location = w.browser.authorize(&url, Decision::Approve).await;
    assert_eq!(query_param(&location, "state").as_deref(), Some("s1"));
    query_param(&location, "code").expect("a code")
}

/// `grant_type=authorization_code` sent by hand: the status and the `error` if any.
async fn hand_made_exchange(
    w: &World,
    code: &str,
    verifier: &str,
    redirect_uri: &str,
    client_secret: &str,
) -> (StatusCode, serde_json::Value) {
    let fields = [
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", redirect_uri),
        ("code_verifier", verifier),
    ];
    w.browser.token(&w.authz, &fields, client_secret).await
}

/// The test server itself: the code grant is only honoured with the verifier whose S256
/// was the challenge, the same redirect_uri, the client's credentials, and only once;
/// only S256 challenges are taken. (credproxy's own exchanges pass these checks in the
/// other tests, so they show its verifier, redirect_uri and client auth are right.)
#[tokio::test]
async fn the_test_server_enforces_pkce_and_the_code_grant_rules() {
    let w = World::start().await;
    let redirect_uri = w.authz.redirect_uri();
    let secret = w.authz.client_secret();
    let verifier = format!("{}-correct-horse", "v".repeat(43));
    let error = |answer: &(StatusCode, serde_json::Value)| {
        (answer.0, answer.1["error"].as_str().map(str::to_owned))
    };
    let invalid_grant = (StatusCode::BAD_REQUEST, Some("invalid_grant".to_owned()));

    // Only S256: a plain challenge goes back as invalid_request.
    let plain = w
        .browser
        .get(&hand_made_authorize_url(&w, &verifier, "plain"))
        .await;
    assert_eq!(plain.status, StatusCode::FOUND);
    let location = plain.location.expect("a redirect");
    assert!(location.starts_with(&redirect_uri), "{location}");
    assert_eq!(
        query_param(&location, "error").as_deref(),
        Some("invalid_request")
    );
    assert_eq!(query_param(&location, "code"), None);

    let wrong_verifier = format!("{}-wrong-battery", "w".repeat(43));
    let code = hand_made_code(&w, &verifier).await;
    let answer = hand_made_exchange(&w, &code, &wrong_verifier, &redirect_uri, &secret).await;
    assert_eq!(error(&answer), invalid_grant, "wrong verifier");

    let code = hand_made_code(&w, &verifier).await;
    let other_uri = format!("{redirect_uri}/other");
    let answer = hand_made_exchange(&w, &code, &verifier, &other_uri, &secret).await;
    assert_eq!(error(&answer), invalid_grant, "other redirect_uri");

    let code = hand_made_code(&w, &verifier).await;
    let answer = hand_made_exchange(&w, &code, &verifier, &redirect_uri, "cs-SECRET-no").await;
    assert_eq!(
        error(&answer),
        (StatusCode::UNAUTHORIZED, Some("invalid_client".to_owned()))
    );

    let code = hand_made_code(&w, &verifier).await;
    let (status, body) = hand_made_exchange(&w, &code, &verifier, &redirect_uri, &secret).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body["refresh_token"]
            .as_str()
            .is_some_and(|t| t.starts_with("rt-SECRET-")),
        "{body}"
    );
    assert!(
        body["access_token"]
            .as_str()
            .is_some_and(|t| t.starts_with("at-SECRET-")),
        "{body}"
    );

    let answer = hand_made_exchange(&w, &code, &verifier, &redirect_uri, &secret).await;
    assert_eq!(error(&answer), invalid_grant, "a code is good once");
    assert_eq!(w.authz.code_exchanges(), 1);
}

/// The provider rejects the exchange (here: the PKCE check fails, and its error text
/// quotes the code, the verifier and the client secret): one line naming the status and
/// `invalid_grant`, none of those secrets, nothing stored.
#[tokio::test]
async fn a_rejected_exchange_is_one_clear_line_without_secrets() {
    let w = World::start().await;
    let builder = w.write_config();
    w.authz.corrupt_challenges();
    w.authz.echo_secrets();

    let run = w.authorize(&builder, &["--no-browser"]);
    let location = w
        .browser
        .authorize(&run.url().await, Decision::Approve)
        .await;
    w.browser.get(&location).await;

    let out = run.finish().await;
    out.assert_code(1);
    let line = out.error_line();
    assert!(
        line.starts_with("credproxy: demo: ")
            && line.contains("400")
            && line.contains("invalid_grant"),
        "{line}"
    );
    assert_eq!(w.authz.token_errors(), vec!["invalid_grant".to_owned()]);
    assert_eq!(w.authz.verifiers().len(), 1);
    w.assert_no_verifier_in(&out);
    assert_nothing_stored(&w.dir);
}

/// A provider that grants no offline access without being asked (Dropbox without
/// `token_access_type=offline`) returns no refresh_token: the error says what to add.
#[tokio::test]
async fn no_refresh_token_in_the_exchange_names_offline_access() {
    let w = World::start().await;
    let builder = w.authz.configure_online(ConfigBuilder::new(&w.dir));
    builder.write(&w.dir);

    let run = w.authorize(&builder, &["--no-browser"]);
    let url = run.url().await;
    assert_eq!(query_param(&url, "token_access_type"), None);
    let location = w.browser.authorize(&url, Decision::Approve).await;
    w.browser.get(&location).await;

    let out = run.finish().await;
    out.assert_code(1);
    let line = out.error_line();
    assert!(
        line.starts_with("credproxy: demo: ")
            && line.contains("no refresh_token")
            && line.contains("offline")
            && line.contains("extra_authorize_params"),
        "{line}"
    );
    assert_eq!(w.authz.code_exchanges(), 1, "the exchange itself succeeded");
    w.assert_no_verifier_in(&out);
    assert_nothing_stored(&w.dir);
}

// === --manual ===

/// `--manual`: no listener; the user pastes the URL the browser ended on (or just the
/// code) and the tokens are stored all the same.
#[tokio::test]
async fn manual_mode_accepts_the_pasted_redirect_url_or_code() {
    for paste_code_only in [false, true] {
        let w = World::start().await;
        let builder = w.write_config();
        let config = w.dir.config_arg();
        let args = ["authorize", INTEGRATION, "--manual", "-c", config.as_str()];
        let mut run = AuthorizeRun::spawn_with_stdin(&w.dir, &args, &builder.env());
        let url = run.url().await;
        run.wait_for_line("the paste prompt", |l| l.contains("paste"))
            .await;
        let location = w.browser.authorize(&url, Decision::Approve).await;
        let pasted = if paste_code_only {
            query_param(&location, "code").expect("a code")
        } else {
            location
        };
        run.paste(&pasted).await;

        let out = run.finish().await;
        out.assert_code(0);
        assert!(
            out.stdout
                .contains("demo: authorized; refresh token stored in"),
            "{}",
            out.stdout
        );
        assert_eq!(w.authz.code_exchanges(), 1);
        assert_eq!(
            w.dir.stored_refresh_token(INTEGRATION),
            w.authz.latest_refresh_token().expect("issued")
        );
        w.assert_no_verifier_in(&out);

        let check = w.run(&builder, &["check"]).await;
        check.assert_code(0);
    }
}

// === before authorize ===

/// Neither a config refresh token nor a stored one: `check` says "not authorized yet"
/// and how to fix it; `run` starts, reports the same in its status, and answers 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_integration_never_authorized_says_so_with_the_hint() {
    let w = World::start().await;
    let builder = w.write_config();

    let check = w.run(&builder, &["check"]).await;
    check.assert_code(1);
    assert_eq!(
        check.line(),
        "demo: error: not authorized yet: no refresh token in the config or the state file (run `credproxy authorize demo`)"
    );
    assert_eq!(w.authz.token_calls(), 0);

    let token = w.run(&builder, &["token", INTEGRATION]).await;
    token.assert_code(1);
    assert!(
        token.error_line().contains("credproxy authorize demo"),
        "{}",
        token.stderr
    );

    // `run`, in process: starts, and tells whoever asks.
    let setup = Setup::start().await;
    let authz = AuthzServer::start(&setup.ca).await;
    let builder = authz.configure(setup.config(&ProxyOptions::default()));
    let proxy = InProcess::start(&builder.load(&setup.dir)).await;
    let answer = client::proxy_get(proxy.proxy_addr, "http://api.test/hello", &[]).await;
    answer.assert_credproxy_error(StatusCode::SERVICE_UNAVAILABLE, "no_token");
    assert_eq!(setup.api.requests(), 0);
    let status: serde_json::Value = client::reqwest_direct()
        .get(proxy.admin_url("/integrations"))
        .send()
        .await
        .expect("admin /integrations")
        .json()
        .await
        .expect("JSON");
    let entry = &status[0];
    assert_eq!(entry["state"], "failed", "{status}");
    assert!(
        entry["last_error"].as_str().is_some_and(
            |e| e.contains("not authorized yet") && e.contains("credproxy authorize demo")
        ),
        "{status}"
    );
    assert_eq!(authz.token_calls(), 0);
    proxy.stop().await;
}

/// The user follows the hint while `credproxy run` is up: `run` says "not authorized
/// yet (run `credproxy authorize demo`)", the user runs it, and the running proxy then
/// serves with the stored token — the hint promises no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_proxy_serves_once_authorize_has_stored_a_token() {
    let setup = Setup::start().await;
    let authz = AuthzServer::start(&setup.ca).await;
    let browser = Browser::new(&setup.ca);
    let builder = authz.configure(setup.config(&ProxyOptions::default()));
    let proxy = InProcess::start(&builder.load(&setup.dir)).await;
    let answer = client::proxy_get(proxy.proxy_addr, "http://api.test/hello", &[]).await;
    answer.assert_credproxy_error(StatusCode::SERVICE_UNAVAILABLE, "no_token");

    let config = setup.dir.config_arg();
    let args = [
        "authorize",
        INTEGRATION,
        "--no-browser",
        "-c",
        config.as_str(),
    ];
    let run = AuthorizeRun::spawn(&setup.dir, &args, &builder.env());
    let location = browser.authorize(&run.url().await, Decision::Approve).await;
    assert_eq!(browser.get(&location).await.status, StatusCode::OK);
    run.finish().await.assert_code(0);

    let answer = client::proxy_get(proxy.proxy_addr, "http://api.test/hello", &[]).await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "after `credproxy authorize demo` the running proxy still answers: {}",
        answer.text()
    );
    let bearer = format!("Bearer {}", authz.latest_access_token().expect("issued"));
    assert_eq!(setup.api.last().authorization(), vec![bearer]);
    proxy.stop().await;
}

// === usage ===

/// Mistakes before any sign-in: no `authorize_url` or an unknown integration is a usage
/// error (exit 2) naming the key; a redirect port already taken is exit 1 naming it.
#[tokio::test]
async fn authorize_refuses_what_it_cannot_do_with_one_line() {
    let w = World::start().await;
    let builder = w.write_config();

    let out = w
        .run(&builder, &["authorize", "nope", "--no-browser"])
        .await;
    out.assert_code(2);
    assert!(
        out.error_line().contains("no integration named \"nope\""),
        "{}",
        out.stderr
    );

    let without_url = ConfigBuilder::new(&w.dir)
        .client_id(&w.authz.client_id())
        .client_secret_env(ConfigBuilder::SECRET_VAR, &w.authz.client_secret())
        .refresh_url(&w.authz.token_url());
    without_url.write(&w.dir);
    let out = w
        .run(&without_url, &["authorize", INTEGRATION, "--no-browser"])
        .await;
    out.assert_code(2);
    assert!(
        out.error_line()
            .contains("integrations.demo.authorize_url is not set"),
        "{}",
        out.stderr
    );

    let builder = w.write_config();
    let port = url::Url::parse(&w.authz.redirect_uri())
        .expect("URL")
        .port()
        .expect("a port");
    let _taken = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("binding the redirect port");
    let out = w
        .run(&builder, &["authorize", INTEGRATION, "--no-browser"])
        .await;
    out.assert_code(1);
    assert!(
        out.error_line().contains(&format!(
            "cannot listen on the redirect address 127.0.0.1:{port}"
        )),
        "{}",
        out.stderr
    );
    assert_nothing_stored(&w.dir);
}
