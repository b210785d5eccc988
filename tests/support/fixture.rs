//! The usual set-up in one value: a test CA, a temp directory trusting it, and a token
//! endpoint whose chain starts at a fresh refresh token.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::ca::TestCa;
use super::cli::{ConfigBuilder, Output, TestDir};
use super::token::{self, TokenServer};

pub struct Fixture {
    pub ca: TestCa,
    pub dir: TestDir,
    pub server: TokenServer,
    /// The refresh token the chain started from (what the config holds at first).
    pub rt0: String,
    /// The client secret the config's `${TEST_CLIENT_SECRET}` gets, fixed at start: a
    /// test may change what the server accepts (`set_client`), not what we send.
    pub client_secret: String,
}

impl Fixture {
    pub async fn start() -> Self {
        let ca = TestCa::new();
        let dir = TestDir::with_ca(&ca);
        let rt0 = token::new_refresh_token(0);
        let server = TokenServer::start(&ca, &rt0).await;
        let client_secret = server.client_secret();
        Self {
            ca,
            dir,
            server,
            rt0,
            client_secret,
        }
    }

    /// A builder for integration `demo` against the server, seeded with `rt0`.
    pub fn config(&self) -> ConfigBuilder {
        ConfigBuilder::for_server(&self.dir, &self.server)
            .client_secret_env(ConfigBuilder::SECRET_VAR, &self.client_secret)
            .refresh_token(&self.rt0)
    }

    /// Writes the default [`config`](Self::config) and returns it.
    pub fn write_config(&self) -> ConfigBuilder {
        let builder = self.config();
        builder.write(&self.dir);
        builder
    }

    /// The arguments `args` plus `-c <config>`.
    pub fn args<'a>(&'a self, args: &[&'a str], config: &'a str) -> Vec<&'a str> {
        let mut all = args.to_vec();
        all.extend(["-c", config]);
        all
    }

    /// Runs `credproxy ARGS -c <config>` with the client secret in the environment.
    pub async fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, &[]).await
    }

    /// As [`run`](Self::run), with extra environment variables.
    pub async fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let config = self.dir.config_arg();
        let mut vars = vec![(ConfigBuilder::SECRET_VAR, self.client_secret.as_str())];
        vars.extend_from_slice(env);
        self.dir.run(&self.args(args, &config), &vars).await
    }

    /// Starts `credproxy ARGS -c <config>` without waiting; finish with `cli::collect`.
    pub fn spawn(&self, args: &[&str]) -> tokio::process::Child {
        let config = self.dir.config_arg();
        self.dir.spawn(
            &self.args(args, &config),
            &[(ConfigBuilder::SECRET_VAR, self.client_secret.as_str())],
        )
    }
}

/// A state-file entry as an earlier run would have written it.
pub struct Seed<'a> {
    pub refresh_token: &'a str,
    pub access_token: &'a str,
    pub issued_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
    /// The config refresh token the chain grew from; `None` as after `credproxy authorize`.
    pub seeded_from: Option<&'a str>,
}

impl Fixture {
    /// Writes a state file (the SPEC's format) holding `seed` for integration `demo`.
    pub fn seed_state(&self, seed: &Seed<'_>) {
        let time = |t: OffsetDateTime| t.format(&Rfc3339).expect("RFC 3339 timestamp");
        let fingerprint = seed
            .seeded_from
            .map(|token| credproxy::state::fingerprint(&credproxy::secret::Secret::new(token)));
        let state = serde_json::json!({
            "version": 1,
            "integrations": {
                "demo": {
                    "refresh_token": seed.refresh_token,
                    "access_token": seed.access_token,
                    "token_type": "bearer",
                    "expires_at": time(seed.expires_at),
                    "seed_fingerprint": fingerprint,
                    "updated_at": time(seed.issued_at),
                }
            }
        });
        self.dir.write_state(state.to_string().as_bytes());
    }
}
