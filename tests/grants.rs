//! Issue 14: the grants beyond refresh_token — client_credentials, jwt_bearer (a Google
//! service-account key file with an RSA key; an issuer with an EC key), github_app and
//! static — each against a test endpoint that checks what it receives like the real one
//! (see `support::grants`), through the same machinery as refresh_token.
//!
//! Every behaviour is one module with one test per grant (`proactive_refresh::github_app`).

use std::path::PathBuf;

use http::StatusCode;
use serde_json::json;

use crate::support::admin::Admin;
use crate::support::ca::TestCa;
use crate::support::cli::{ConfigBuilder, Output, assert_no_secrets};
use crate::support::client;
use crate::support::grants::{APP_ID, CLIENT_ID, GrantServer, INSTALLATION_ID, ISSUER, TestKey};
use crate::support::proxy::{INTEGRATION, InProcess, ProxyOptions, Setup};

const USER_AGENT: &str = concat!("credproxy/", env!("CARGO_PKG_VERSION"));

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    ClientCredentials,
    /// jwt_bearer from a Google service-account key file (RSA, PKCS#8).
    ServiceAccount,
    /// jwt_bearer with `issuer` and an EC private key (ES256).
    IssuerEc,
    GithubApp,
    Static,
}

impl Kind {
    fn grant(self) -> &'static str {
        match self {
            Self::ClientCredentials => "client_credentials",
            Self::ServiceAccount | Self::IssuerEc => "jwt_bearer",
            Self::GithubApp => "github_app",
            Self::Static => "static",
        }
    }
}

/// The outside world for one grant: the usual setup (CA, temp dir, test API behind
/// `api.test`) plus the grant's token endpoint and key.
struct World {
    kind: Kind,
    setup: Setup,
    grants: GrantServer,
    key: TestKey,
    static_token: String,
}

impl World {
    async fn start(kind: Kind) -> Self {
        let setup = Setup::start().await;
        let key = match kind {
            Kind::IssuerEc => TestKey::ec(),
            Kind::ServiceAccount => TestKey::rsa(true),
            _ => TestKey::rsa(false),
        };
        let grants = GrantServer::start(&setup.ca, key.clone()).await;
        Self {
            kind,
            setup,
            grants,
            key,
            static_token: format!("at-SECRET-static-{:016x}", rand::random::<u64>()),
        }
    }

    fn write_private(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.setup.dir.path().join(name);
        std::fs::write(&path, contents).expect("writing a key file");
        path
    }

    /// `[integrations.demo]` for this grant.
    fn table(&self) -> String {
        let s = |value: &str| toml::Value::String(value.to_owned()).to_string();
        let path = |p: PathBuf| s(p.to_str().expect("UTF-8 temp path"));
        let mut out = format!(
            "[integrations.{INTEGRATION}]\ngrant = {}\n",
            s(self.kind.grant())
        );
        match self.kind {
            Kind::ClientCredentials => out.push_str(&format!(
                "client_id = {}\nclient_secret = {}\ntoken_url = {}\nscope = \"read write\"\naudience = \"https://api.test\"\n",
                s(CLIENT_ID),
                s(&self.grants.client_secret()),
                s(&self.grants.token_url()),
            )),
            Kind::ServiceAccount => {
                let file = json!({
                    "type": "service_account",
                    "project_id": "project",
                    "private_key_id": "kid-1",
                    "private_key": self.key.pem,
                    "client_email": ISSUER,
                    "client_id": "1234567890",
                    "token_uri": self.grants.token_url(),
                });
                let key_file = self.write_private("service-account.json", &file.to_string());
                out.push_str(&format!(
                    "service_account = {}\nscope = \"https://www.googleapis.com/auth/drive.readonly\"\n",
                    path(key_file)
                ));
            }
            Kind::IssuerEc => {
                let pem = self.write_private("ec-key.pem", &self.key.pem);
                out.push_str(&format!(
                    "issuer = {}\nprivate_key = {}\ntoken_url = {}\nscope = \"api\"\nsubject = \"svc-reports\"\n",
                    s(ISSUER),
                    path(pem),
                    s(&self.grants.token_url())
                ));
            }
            Kind::GithubApp => {
                let pem = self.write_private("app.private-key.pem", &self.key.pem);
                out.push_str(&format!(
                    "app_id = {APP_ID}\ninstallation_id = \"{INSTALLATION_ID}\"\nprivate_key = {}\napi_url = {}\n",
                    path(pem),
                    s(&self.grants.api_url())
                ));
            }
            Kind::Static => out.push_str(&format!("token = {}\n", s(&self.static_token))),
        }
        out
    }

    fn config(&self, options: &ProxyOptions) -> ConfigBuilder {
        self.setup.config(options).integration_table(&self.table())
    }

    async fn start_proxy(&self, options: &ProxyOptions) -> InProcess {
        let proxy = self.start_proxy_cold(options).await;
        proxy.wait_for_generation(1).await;
        proxy
    }

    async fn start_proxy_cold(&self, options: &ProxyOptions) -> InProcess {
        InProcess::start(&self.config(options).load(&self.setup.dir)).await
    }

    /// The token requests should carry now.
    fn current_token(&self) -> String {
        match self.kind {
            Kind::Static => self.static_token.clone(),
            _ => self.grants.current_token(),
        }
    }

    /// Everything that must never appear in output: the private key, the client
    /// secret, the static token and every assertion presented.
    fn secrets(&self) -> Vec<String> {
        let mut secrets = vec![
            self.key.marker.clone(),
            self.grants.client_secret(),
            self.static_token.clone(),
        ];
        secrets.extend(self.grants.jwts());
        secrets
    }

    /// Runs `credproxy ARGS -c CONFIG` on the written config.
    async fn run(&self, args: &[&str]) -> Output {
        let builder = self.config(&ProxyOptions::default());
        builder.write(&self.setup.dir);
        let config = self.setup.dir.config_arg();
        let mut all = args.to_vec();
        all.extend(["-c", config.as_str()]);
        let output = self.setup.dir.run(&all, &builder.env()).await;
        let secrets = self.secrets();
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        // `token` prints the access token by design, and nothing else.
        assert_no_secrets(&output.stderr, &secrets);
        if args.first() != Some(&"token") {
            assert_no_secrets(&output.stdout, &secrets);
        }
        output
    }

    /// A GET through the proxy to `https://api.test<path>`.
    async fn get(&self, proxy: &InProcess, path: &str) -> client::Answer {
        let url = format!("http://api.test{path}");
        client::proxy_get(proxy.proxy_addr, &url, &[]).await
    }

    /// The endpoint saw a well-formed request for this grant (and what it checked passed).
    fn assert_last_request_is_well_formed(&self) {
        let received = self.grants.received();
        let last = received.last().expect("a token request");
        assert_eq!(last.user_agent.as_deref(), Some(USER_AGENT));
        assert!(last.status.is_success(), "{last:?}");
        match self.kind {
            Kind::ClientCredentials => {
                assert_eq!(last.field("scope"), Some("read write"));
                assert_eq!(last.field("audience"), Some("https://api.test"));
            }
            Kind::ServiceAccount | Kind::IssuerEc => {
                let claims = last.claims.as_ref().expect("verified claims");
                let (scope, sub) = if self.kind == Kind::ServiceAccount {
                    ("https://www.googleapis.com/auth/drive.readonly", None)
                } else {
                    ("api", Some("svc-reports"))
                };
                assert_eq!(claims["scope"], scope, "{claims}");
                assert_eq!(claims["sub"].as_str(), sub, "{claims}");
                assert_eq!(claims["aud"], self.grants.token_url(), "{claims}");
                assert_eq!(
                    claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
                    3600
                );
            }
            Kind::GithubApp => {
                assert_eq!(
                    last.path,
                    format!("/app/installations/{INSTALLATION_ID}/access_tokens")
                );
                let claims = last.claims.as_ref().expect("verified claims");
                assert_eq!(claims["iss"], APP_ID);
                let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
                assert!(lifetime <= 600, "{claims}");
            }
            Kind::Static => unreachable!("a static token is never requested"),
        }
    }
}

/// One `#[tokio::test]` per grant for a behaviour `async fn check(kind: Kind)`;
/// `refreshed` leaves out the static token, which is never obtained.
macro_rules! per_grant {
    ($check:ident) => {
        per_grant!(refreshed $check);
        per_grant!($check: static_token = Static);
    };
    (refreshed $check:ident) => {
        per_grant!($check: client_credentials = ClientCredentials,
            jwt_bearer_service_account = ServiceAccount, jwt_bearer_ec_issuer = IssuerEc,
            github_app = GithubApp);
    };
    ($check:ident: $($name:ident = $kind:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$check(super::Kind::$kind).await;
            }
        )*
    };
}

// === a token the endpoint accepts; proxied requests carry it ===

mod proxied {
    per_grant!(proxied_requests_carry_the_grants_token);
}

async fn proxied_requests_carry_the_grants_token(kind: Kind) {
    let world = World::start(kind).await;
    let proxy = world.start_proxy(&ProxyOptions::default()).await;
    let answer = world.get(&proxy, "/echo").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let token = world.current_token();
    assert_eq!(
        world.setup.api.last().authorization(),
        [format!("Bearer {token}")]
    );
    if kind == Kind::Static {
        assert_eq!(world.grants.calls(), 0, "a static token is never requested");
    } else {
        assert_eq!(world.grants.issued(), 1);
        world.assert_last_request_is_well_formed();
    }

    let admin = Admin::new(proxy.admin_addr);
    let status = admin.integration(INTEGRATION).await;
    assert_eq!(status["grant"], kind.grant(), "{status}");
    assert_eq!(status["state"], "ok", "{status}");
    assert_eq!(
        status["expires_at"].is_null(),
        kind == Kind::Static,
        "only a static token never expires: {status}"
    );
    let scrape = admin.metrics().await;
    let info = [("integration", INTEGRATION), ("grant", kind.grant())];
    assert_eq!(
        scrape.get("credproxy_integration_info", &info),
        1.0,
        "{}",
        scrape.text()
    );
    let text = format!("{}{}", scrape.text(), status);
    let secrets = world.secrets();
    assert_no_secrets(
        &text,
        &secrets.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    proxy.stop().await;
}

// === proactive refresh over several lifetimes ===

mod proactive_refresh {
    per_grant!(refreshed proactive_refresh_over_several_lifetimes);
}

/// Tokens live 2 s; the refresher replaces each before it expires, with no request
/// asking, and every request in between carries a valid token. For jwt_bearer every
/// assertion had a fresh `jti` (the endpoint refuses a reused one).
async fn proactive_refresh_over_several_lifetimes(kind: Kind) {
    const LIFETIMES: u64 = 4;
    let world = World::start(kind).await;
    world.grants.set_expires_in(2);
    let proxy = world.start_proxy(&ProxyOptions::default()).await;
    for n in 1..=LIFETIMES {
        world.grants.wait_for_issued(n + 1).await;
        let answer = world.get(&proxy, "/echo").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        let sent = world.setup.api.last().authorization();
        let token = sent[0].trim_start_matches("Bearer ");
        assert!(
            world.grants.is_valid(token),
            "request {n} carried an expired token"
        );
    }
    let received = world.grants.received();
    assert!(
        received.iter().all(|r| r.status.is_success()),
        "every token request was accepted: {received:?}"
    );
    world.assert_last_request_is_well_formed();
    proxy.stop().await;
}

// === the 401 path ===

mod revoked {
    per_grant!(a_revoked_token_is_replaced_once_and_the_request_resent);
}

/// The API revokes the token in use: one new token, one resend, the client sees 200. A
/// static token cannot be replaced: the 401 passes through and nothing is requested.
async fn a_revoked_token_is_replaced_once_and_the_request_resent(kind: Kind) {
    let world = World::start(kind).await;
    let proxy = world.start_proxy(&ProxyOptions::default()).await;
    let old = world.current_token();
    let issued = world.grants.issued();
    world.setup.api.revoke(&old);

    let answer = world.get(&proxy, "/echo").await;
    assert_eq!(world.setup.api.unauthorized(), 1);
    if kind == Kind::Static {
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.text());
        assert_eq!(world.grants.calls(), 0);
        proxy.stop().await;
        return;
    }
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(world.grants.issued(), issued + 1, "exactly one new token");
    let new = world.current_token();
    assert_eq!(
        world.setup.api.last_answers(2),
        [
            (StatusCode::UNAUTHORIZED, vec![format!("Bearer {old}")]),
            (StatusCode::OK, vec![format!("Bearer {new}")]),
        ]
    );
    proxy.stop().await;
}

// === a permanently rejected key ===

mod rejected {
    per_grant!(refreshed a_rejected_key_fails_the_integration_without_hammering);
}

/// The endpoint refuses the credentials for good (`invalid_client`, `invalid_grant`,
/// GitHub's 401): the integration is `failed`, its route answers 503, and however many
/// requests follow, the endpoint is asked once.
async fn a_rejected_key_fails_the_integration_without_hammering(kind: Kind) {
    let world = World::start(kind).await;
    world.grants.reject_all();
    let proxy = world.start_proxy_cold(&ProxyOptions::default()).await;
    for _ in 0..5 {
        let answer = world.get(&proxy, "/echo").await;
        answer.assert_credproxy_error(StatusCode::SERVICE_UNAVAILABLE, "no_token");
    }
    let admin = Admin::new(proxy.admin_addr);
    let status = admin.integration(INTEGRATION).await;
    assert_eq!(status["state"], "failed", "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("401") || e.contains("400")),
        "{status}"
    );
    assert_eq!(
        admin.get("/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(world.grants.calls(), 1, "the rejected key was sent again");
    assert_eq!(world.setup.api.requests(), 0);
    proxy.stop().await;
}

// === `check` and `token` ===

mod commands {
    per_grant!(check_and_token_work);
}

async fn check_and_token_work(kind: Kind) {
    let world = World::start(kind).await;
    let check = world.run(&["check"]).await;
    check.assert_code(0);
    let line = check.line();
    if kind == Kind::Static {
        assert_eq!(line, "demo: ok, static token (never expires)");
    } else {
        assert!(line.starts_with("demo: ok, expires in 59m"), "{line}");
        world.assert_last_request_is_well_formed();
    }

    let token = world.run(&["token", INTEGRATION]).await;
    token.assert_code(0);
    assert_eq!(token.line(), world.current_token());

    if kind != Kind::Static {
        world.grants.reject_all();
        let check = world.run(&["check"]).await;
        check.assert_code(1);
        assert!(
            check.line().starts_with("demo: error: "),
            "{}",
            check.line()
        );
    }
}

// === authorize ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_is_a_usage_error_for_other_grants() {
    let world = World::start(Kind::ClientCredentials).await;
    let out = world.run(&["authorize", INTEGRATION, "--no-browser"]).await;
    out.assert_code(2);
    let error = out.error_line();
    assert!(
        error.contains("client_credentials") && error.contains("refresh_token"),
        "{error}"
    );
}

// === secrets in no output of a running process ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_tokens_and_assertions_appear_in_no_output() {
    for kind in [Kind::ServiceAccount, Kind::GithubApp, Kind::Static] {
        let world = World::start(kind).await;
        world.grants.set_expires_in(2);
        let builder = world.config(&ProxyOptions::default());
        builder.write(&world.setup.dir);
        let config = world.setup.dir.config_arg();
        let process = crate::support::proxy::ProxyProcess::spawn(
            &world.setup.dir,
            &["run", "-c", &config],
            &[("RUST_LOG", "debug")],
        )
        .await;
        if kind != Kind::Static {
            // A few proactive refreshes, so assertions were made and logged about.
            world.grants.wait_for_issued(3).await;
        }
        let answer = client::proxy_get(process.proxy_addr, "http://api.test/echo", &[]).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        let admin = Admin::new(process.admin_addr);
        let pages = [
            admin.get("/integrations").await.text,
            admin.get("/metrics").await.text,
            admin.get("/").await.text,
            admin.force_refresh(INTEGRATION).await.text,
        ]
        .concat();
        process.terminate();
        let exit = process.wait().await;
        let secrets = world.secrets();
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        assert_no_secrets(&format!("{pages}{}", exit.log), &secrets);

        let loaded = builder.load(&world.setup.dir);
        assert_no_secrets(&format!("{loaded:?}"), &secrets);
    }
}

// === config errors ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_grant_settings_are_config_errors_naming_the_key() {
    let ca = TestCa::new();
    let dir = crate::support::cli::TestDir::with_ca(&ca);
    let ec = TestKey::ec();
    let rsa = TestKey::rsa(false);
    let ec_path = dir.path().join("ec.pem");
    std::fs::write(&ec_path, &ec.pem).unwrap();
    let cert_path = dir.path().join("cert.pem");
    std::fs::write(&cert_path, ca.cert_pem()).unwrap();
    let ec_path = ec_path.to_str().unwrap();
    let cert_path = cert_path.to_str().unwrap();
    let github = |key: &str| {
        format!(
            "grant = \"github_app\"\napp_id = 1\ninstallation_id = 2\nprivate_key = {}\n",
            toml::Value::String(key.to_owned())
        )
    };
    let cases = [
        (
            "grant = \"password\"\ntoken = \"x\"".to_owned(),
            "integrations.demo.grant: \"password\" is not",
        ),
        (
            github("/nonexistent/app.pem"),
            "integrations.demo.private_key: cannot read \"/nonexistent/app.pem\"",
        ),
        (
            github(cert_path),
            "integrations.demo.private_key: is not a PEM private key",
        ),
        (
            github(ec_path),
            "integrations.demo.private_key: is an EC key; GitHub Apps sign with RS256",
        ),
        (
            format!(
                "grant = \"jwt_bearer\"\nissuer = \"me\"\ntoken_url = \"https://idp.test/token\"\nalgorithm = \"RS256\"\nprivate_key = {}\n",
                toml::Value::String(ec_path.to_owned())
            ),
            "integrations.demo.algorithm: is RS256 but the private key is a P-256 EC (ES256) key",
        ),
        (
            "grant = \"jwt_bearer\"\nservice_account = \"/nonexistent/sa.json\"".to_owned(),
            "integrations.demo.service_account: cannot read",
        ),
        (
            "grant = \"static\"\ntoken = \"x\"\nrefresh_token = \"y\"".to_owned(),
            "integrations.demo.refresh_token: is not used by grant \"static\"",
        ),
        (
            "grant = \"client_credentials\"\nclient_id = \"a\"\nclient_secret = \"b\"".to_owned(),
            "integrations.demo.token_url: is required",
        ),
        (
            "grant = \"github_app\"\napp_id = \"x1\"\ninstallation_id = 2\nprivate_key = \"k\""
                .to_owned(),
            "integrations.demo.app_id: \"x1\" is not a numeric id",
        ),
    ];
    for (table, want) in cases {
        dir.write_config(&format!("[integrations.demo]\n{table}\n"));
        let out = dir.run(&["check", "-c", &dir.config_arg()], &[]).await;
        out.assert_code(2);
        let error = out.error_line();
        assert!(error.contains(want), "want {want:?} in {error:?}");
        assert!(!error.contains(&rsa.marker) && !error.contains(&ec.marker));
    }
}

// === query injection ===

/// `routes[].query` puts the token into a query parameter: the client's own parameter of
/// that name is replaced, the others arrive as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_injection_replaces_the_clients_parameter_and_keeps_the_others() {
    let world = World::start(Kind::Static).await;
    let options = ProxyOptions::default().route_host("unused.test").extra(
        "[[routes]]\nhost = \"api.test\"\nquery = { key = \"{{ $.integrations.demo.access_token }}\" }\n",
    );
    let proxy = world.start_proxy(&options).await;
    let answer = world
        .get(
            &proxy,
            "/maps/geocode?address=1%20Main%20St&key=client-key&lang=en",
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let seen = world.setup.api.last();
    assert_eq!(seen.path, "/maps/geocode");
    assert_eq!(
        seen.query.as_deref(),
        Some(format!("address=1%20Main%20St&lang=en&key={}", world.static_token).as_str())
    );
    assert!(
        seen.authorization().is_empty(),
        "only the query carries the key"
    );
    proxy.stop().await;
}

// === one machinery: single flight, the state store ===

/// Twenty requests find no token at once: one token request. Two `credproxy token`
/// processes at once, then a third: still one — the first stores the token under the
/// state file's lock, the others re-read and use it. The stored entry holds no refresh
/// token and nothing of the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_processes_share_one_token_request() {
    let world = World::start(Kind::ServiceAccount).await;
    let proxy = world.start_proxy_cold(&ProxyOptions::default()).await;
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let addr = proxy.proxy_addr;
        requests.spawn(async move { client::proxy_get(addr, "http://api.test/echo", &[]).await });
    }
    while let Some(answer) = requests.join_next().await {
        let answer = answer.expect("request task");
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    }
    assert_eq!(world.grants.calls(), 1, "in-process single flight");
    proxy.stop().await;

    let world = World::start(Kind::GithubApp).await;
    let builder = world.config(&ProxyOptions::default());
    builder.write(&world.setup.dir);
    let config = world.setup.dir.config_arg();
    let args = ["token", INTEGRATION, "-c", config.as_str()];
    let (first, second) = (
        world.setup.dir.spawn(&args, &[]),
        world.setup.dir.spawn(&args, &[]),
    );
    let (first, second) = tokio::join!(
        crate::support::cli::collect(first, &args),
        crate::support::cli::collect(second, &args)
    );
    let third = world.run(&["token", INTEGRATION]).await;
    for out in [&first, &second, &third] {
        out.assert_code(0);
        assert_eq!(out.line(), world.current_token());
    }
    assert_eq!(world.grants.calls(), 1, "cross-process single flight");

    let entry = &world.setup.dir.read_state()["integrations"][INTEGRATION];
    assert!(entry.get("refresh_token").is_none(), "{entry}");
    assert_eq!(entry["access_token"], world.current_token());
    let stored = entry.to_string();
    assert_no_secrets(&stored, &[&world.key.marker]);
}
