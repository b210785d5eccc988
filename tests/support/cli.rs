//! Running the real `credproxy` binary: a temp directory with a config written by
//! [`ConfigBuilder`], bounded runs capturing output, and leak checks on that output: every
//! run (and every spawned child collected with [`collect`]) is scanned for test secrets.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tempfile::TempDir;
use tokio::process::{Child, Command};

use super::ca::TestCa;
use super::token::TokenServer;

/// Upper bound for one CLI run; a hung command fails the test instead of the CI job.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// Variables that would change what the binary does behind the test's back
/// (a proxy for its refresh calls, another config, other trust roots, log noise).
pub const SCRUBBED_ENV: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "CREDPROXY_CONFIG",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "RUST_LOG",
];

/// The binary under test: cargo's, or `CREDPROXY_BIN` (CI points it at the static
/// musl build that the container image ships, to run the CLI tests against it).
pub fn bin() -> PathBuf {
    std::env::var_os("CREDPROXY_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_credproxy")),
        PathBuf::from,
    )
}

// === TestDir ===

/// A temp directory laid out as tests expect: `credproxy.toml`, `state/tokens.json`,
/// `certs/ca.pem`, `certs/ca-key.pem`, and `test-ca.pem` (the test CA, for `extra_ca`).
/// Only the config and `test-ca.pem` are written here; `state/` and `certs/` are left
/// for credproxy to create, as a real first run would.
pub struct TestDir {
    dir: TempDir,
    has_test_ca: bool,
}

impl TestDir {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("credproxy-test-")
            .tempdir()
            .expect("creating a temp dir");
        Self {
            dir,
            has_test_ca: false,
        }
    }

    /// Also writes `ca`'s certificate to [`test_ca_path`](Self::test_ca_path).
    pub fn with_ca(ca: &TestCa) -> Self {
        let mut dir = Self::new();
        ca.write_pem(&dir.test_ca_path());
        dir.has_test_ca = true;
        dir
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.path().join("credproxy.toml")
    }

    /// The config path as an argument: `run(&["check", "-c", dir.config_arg()], ..)`.
    pub fn config_arg(&self) -> String {
        self.config_path()
            .to_str()
            .expect("temp dir paths are UTF-8")
            .to_owned()
    }

    pub fn state_path(&self) -> PathBuf {
        self.path().join("state/tokens.json")
    }

    pub fn ca_cert_path(&self) -> PathBuf {
        self.path().join("certs/ca.pem")
    }

    pub fn ca_key_path(&self) -> PathBuf {
        self.path().join("certs/ca-key.pem")
    }

    pub fn test_ca_path(&self) -> PathBuf {
        self.path().join("test-ca.pem")
    }

    pub fn write_config(&self, toml: &str) -> PathBuf {
        write_config(self.path(), toml)
    }

    /// The state file as JSON; panics if missing or not JSON.
    pub fn read_state(&self) -> serde_json::Value {
        let path = self.state_path();
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading state file {}: {e}", path.display()));
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("state file {} is not JSON: {e}", path.display()))
    }

    /// The state file's exact bytes; panics if missing.
    pub fn state_bytes(&self) -> Vec<u8> {
        let path = self.state_path();
        std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    /// Writes `bytes` as the state file (creating `state/`), as a previous run or a
    /// damaged disk would have left it.
    pub fn write_state(&self, bytes: &[u8]) {
        let path = self.state_path();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
        }
        std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// The `refresh_token` stored for `integration`.
    pub fn stored_refresh_token(&self, integration: &str) -> String {
        let state = self.read_state();
        state["integrations"][integration]["refresh_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no refresh_token for {integration} in {state}"))
            .to_owned()
    }

    /// Runs the binary with this directory as its working directory.
    pub async fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        run_in(self.path(), args, env, RUN_TIMEOUT).await
    }

    /// Starts the binary here without waiting; finish with [`collect`].
    pub fn spawn(&self, args: &[&str], env: &[(&str, &str)]) -> Child {
        spawn(self.path(), args, env)
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

/// Writes `dir/credproxy.toml` and returns its path.
pub fn write_config(dir: &Path, toml: &str) -> PathBuf {
    let path = dir.join("credproxy.toml");
    std::fs::write(&path, toml)
        .unwrap_or_else(|e| panic!("writing config {}: {e}", path.display()));
    path
}

// === running ===

#[derive(Debug)]
pub struct Output {
    /// `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn combined(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// stdout as one line (without the newline); panics if it is not exactly one line.
    pub fn line(&self) -> &str {
        let line = self.stdout.strip_suffix('\n').unwrap_or(&self.stdout);
        assert!(
            !line.is_empty() && !line.contains('\n'),
            "expected one line on stdout\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout,
            self.stderr
        );
        line
    }

    /// stderr as one line: errors are "one clear sentence", never a backtrace.
    pub fn error_line(&self) -> &str {
        let line = self.stderr.strip_suffix('\n').unwrap_or(&self.stderr);
        assert!(
            !line.is_empty() && !line.contains('\n'),
            "expected a one-line error on stderr\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout,
            self.stderr
        );
        line
    }

    /// The last line of stderr: the command's error, after any warnings logged on the way.
    pub fn last_error_line(&self) -> &str {
        self.stderr
            .lines()
            .last()
            .unwrap_or_else(|| panic!("no error on stderr; stdout:\n{}", self.stdout))
    }

    /// Every run goes through this: no test secret in stderr, ever, nor on stdout, except
    /// that `credproxy token` prints the access token (and nothing else) by design.
    fn assert_no_leaks(&self, args: &[&str]) {
        assert_no_secret_markers(&self.stderr);
        if subcommand(args) == Some("token") {
            let printed = self.stdout.trim_end_matches('\n');
            let only_access_token = printed.is_empty()
                || (printed.starts_with("at-SECRET-")
                    && printed.matches("-SECRET-").count() == 1
                    && !printed.contains(char::is_whitespace));
            assert!(
                only_access_token,
                "`credproxy token` printed more than its access token:\n{}",
                self.stdout
            );
        } else {
            assert_no_secret_markers(&self.stdout);
        }
    }

    /// Panics, showing both streams, unless the exit code is `code`.
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "unexpected exit status\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// A configured but unstarted command: scrubbed env plus `env`, piped output, killed on
/// drop so a failing test leaves no process behind.
pub fn command(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = program_command(bin().as_os_str(), args, env);
    // A process group of its own: were the tests run from a terminal, `exec` would
    // otherwise be in its foreground group and (rightly) not pass a SIGINT on.
    cmd.current_dir(cwd).process_group(0);
    cmd
}

/// Runs another program (a shell, a client) to completion with the same scrubbed
/// environment plus `env`, bounded; its output is scanned for test secrets too.
pub async fn run_program(program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let child = program_command(program.as_ref(), args, env)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {program} (is it installed?): {e}"));
    tokio::time::timeout(RUN_TIMEOUT, collect(child, args))
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not exit within {RUN_TIMEOUT:?}"))
}

fn program_command(program: &std::ffi::OsStr, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd
}

/// Runs the binary to completion in a fresh empty directory (so a relative default config
/// path can never pick up the repository's own `config/`).
pub async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let cwd = TempDir::new().expect("creating a temp dir");
    run_in(cwd.path(), args, env, RUN_TIMEOUT).await
}

pub async fn run_in(cwd: &Path, args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Output {
    let child = command(cwd, args, env)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", bin().display()));
    // On timeout the future (and with it the child) is dropped, which kills it.
    tokio::time::timeout(timeout, collect(child, args))
        .await
        .unwrap_or_else(|_| panic!("credproxy {args:?} did not exit within {timeout:?}"))
}

/// Waits for a child started with [`spawn`] (finished, or killed by the test) and returns
/// its output, scanned for leaked secrets like every [`run`].
pub async fn collect(child: Child, args: &[&str]) -> Output {
    let output = child
        .wait_with_output()
        .await
        .unwrap_or_else(|e| panic!("waiting for credproxy {args:?}: {e}"));
    let output = Output {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    output.assert_no_leaks(args);
    output
}

/// Starts a long-running command (e.g. `run`); stdout/stderr are piped for the test to read.
pub fn spawn(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    command(cwd, args, env)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", bin().display()))
}

/// Sends SIGTERM (via kill(1), to keep tests free of `unsafe`).
pub fn terminate(child: &Child) {
    signal(child, "TERM");
}

/// Sends signal `name` (`"TERM"`, `"INT"`, `"HUP"`) via kill(1).
pub fn signal(child: &Child, name: &str) {
    let pid = child.id().expect("child has not been reaped yet");
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("running kill(1)");
    assert!(status.success(), "kill -{name} {pid} failed: {status}");
}

// === leak checks ===

/// Panics if any of `secrets` occurs in `text`.
pub fn assert_no_secrets(text: &str, secrets: &[&str]) {
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        if let Some(at) = text.find(secret) {
            panic!("secret {secret:?} leaked at byte {at} of:\n{text}");
        }
    }
}

/// Panics if `text` contains `-SECRET-`, which every test secret carries
/// (`rt-SECRET-…`, `at-SECRET-…`, `cs-SECRET-…`): catches leaks of tokens a test never saw.
pub fn assert_no_secret_markers(text: &str) {
    if let Some(at) = text.find("-SECRET-") {
        panic!("a test secret leaked at byte {at} of:\n{text}");
    }
}

/// The subcommand of a command line such as `["-c", "x.toml", "token", "demo"]`.
fn subcommand<'a>(args: &[&'a str]) -> Option<&'a str> {
    let mut args = args.iter().copied();
    while let Some(arg) = args.next() {
        match arg {
            "-c" | "--config" => {
                args.next();
            }
            _ if arg.starts_with('-') => {}
            _ => return Some(arg),
        }
    }
    None
}

// === ConfigBuilder ===

/// Builds a minimal config (state, ca, upstream.extra_ca, one integration) for a [`TestDir`].
/// The client secret goes through `${VAR}` by default, as users are told to do; pass
/// [`env`](Self::env) to [`run`].
pub struct ConfigBuilder {
    state: PathBuf,
    /// `[state] url` instead of `path` (a PostgreSQL database).
    state_url: Option<String>,
    ca_cert: PathBuf,
    ca_key: PathBuf,
    extra_ca: Option<PathBuf>,
    name: String,
    client_id: String,
    client_secret: Secret,
    refresh_url: String,
    refresh_token: Option<String>,
    options: Vec<(&'static str, String)>,
    integration_lines: Vec<String>,
    state_lines: Vec<String>,
    /// Replaces the generated `[integrations.NAME]` table (for grants other than
    /// refresh_token).
    integration_table: Option<String>,
    raw: String,
}

enum Secret {
    Env { var: String, value: String },
    Literal(String),
}

impl ConfigBuilder {
    pub const SECRET_VAR: &'static str = "TEST_CLIENT_SECRET";

    pub fn new(dir: &TestDir) -> Self {
        Self {
            state: dir.state_path(),
            state_url: None,
            ca_cert: dir.ca_cert_path(),
            ca_key: dir.ca_key_path(),
            extra_ca: dir.has_test_ca.then(|| dir.test_ca_path()),
            name: "demo".to_owned(),
            client_id: super::token::CLIENT_ID.to_owned(),
            client_secret: Secret::Literal(String::new()),
            refresh_url: String::new(),
            refresh_token: None,
            options: Vec::new(),
            integration_lines: Vec::new(),
            state_lines: Vec::new(),
            integration_table: None,
            raw: String::new(),
        }
    }

    /// Client id, secret (via `${TEST_CLIENT_SECRET}`), refresh URL and current refresh
    /// token all taken from `server`.
    pub fn for_server(dir: &TestDir, server: &TokenServer) -> Self {
        let builder = Self::new(dir)
            .client_id(&server.client_id())
            .client_secret_env(Self::SECRET_VAR, &server.client_secret())
            .refresh_url(&server.url());
        match server.latest_refresh_token() {
            Some(token) => builder.refresh_token(&token),
            None => builder,
        }
    }

    /// `[state] url = URL` instead of the state file.
    pub fn state_url(mut self, url: &str) -> Self {
        self.state_url = Some(url.to_owned());
        self
    }

    pub fn integration(mut self, name: &str) -> Self {
        name.clone_into(&mut self.name);
        self
    }

    pub fn client_id(mut self, id: &str) -> Self {
        id.clone_into(&mut self.client_id);
        self
    }

    /// Config says `${var}`; [`env`](Self::env) supplies `var=value`.
    pub fn client_secret_env(mut self, var: &str, value: &str) -> Self {
        self.client_secret = Secret::Env {
            var: var.to_owned(),
            value: value.to_owned(),
        };
        self
    }

    pub fn client_secret_literal(mut self, secret: &str) -> Self {
        self.client_secret = Secret::Literal(secret.to_owned());
        self
    }

    pub fn refresh_url(mut self, url: &str) -> Self {
        url.clone_into(&mut self.refresh_url);
        self
    }

    pub fn refresh_token(mut self, token: &str) -> Self {
        self.refresh_token = Some(token.to_owned());
        self
    }

    /// Leaves `refresh_token` out (as after `credproxy authorize`).
    pub fn no_refresh_token(mut self) -> Self {
        self.refresh_token = None;
        self
    }

    /// `"form"` | `"json"`
    pub fn request_format(self, format: &str) -> Self {
        self.option("request_format", format)
    }

    /// `"basic"` | `"body"`
    pub fn client_auth(self, auth: &str) -> Self {
        self.option("client_auth", auth)
    }

    pub fn scope(self, scope: &str) -> Self {
        self.option("scope", scope)
    }

    /// e.g. `"60s"`
    pub fn refresh_skew(self, skew: &str) -> Self {
        self.option("refresh_skew", skew)
    }

    /// Any other string key of the integration, e.g. `("default_expires_in", "1h")`.
    pub fn option(mut self, key: &'static str, value: &str) -> Self {
        self.options.retain(|(k, _)| *k != key);
        self.options.push((key, value.to_owned()));
        self
    }

    /// A raw TOML line inside `[integrations.NAME]`, e.g. `extra_authorize_params = { a = "b" }`.
    pub fn integration_line(mut self, line: &str) -> Self {
        self.integration_lines.push(line.to_owned());
        self
    }

    /// A raw TOML line inside `[state]`, e.g. `key = "${file:/run/secrets/key}"`.
    pub fn state_line(mut self, line: &str) -> Self {
        self.state_lines.push(line.to_owned());
        self
    }

    /// The whole `[integrations.NAME]` table, written instead of the refresh_token one.
    pub fn integration_table(mut self, toml: &str) -> Self {
        self.integration_table = Some(toml.to_owned());
        self
    }

    /// Raw TOML appended after the integration; start it with a table header
    /// (`[proxy]`, `[[routes]]`, `[integrations.other]`), or its keys land in the integration.
    pub fn raw(mut self, toml: &str) -> Self {
        self.raw.push('\n');
        self.raw.push_str(toml);
        self
    }

    pub fn build(&self) -> String {
        let mut out = String::from("[state]\n");
        match &self.state_url {
            Some(url) => kv(&mut out, "url", url),
            None => kv(&mut out, "path", path_str(&self.state)),
        }
        for line in &self.state_lines {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str("\n[ca]\n");
        kv(&mut out, "cert", path_str(&self.ca_cert));
        kv(&mut out, "key", path_str(&self.ca_key));
        if let Some(extra_ca) = &self.extra_ca {
            out.push_str("\n[upstream]\n");
            kv(&mut out, "extra_ca", path_str(extra_ca));
        }
        if let Some(table) = &self.integration_table {
            out.push('\n');
            out.push_str(table);
            out.push_str(&self.raw);
            return out;
        }
        out.push_str(&format!("\n[integrations.{}]\n", self.name));
        kv(&mut out, "client_id", &self.client_id);
        let secret = match &self.client_secret {
            Secret::Env { var, .. } => format!("${{{var}}}"),
            Secret::Literal(secret) => secret.clone(),
        };
        kv(&mut out, "client_secret", &secret);
        kv(&mut out, "refresh_url", &self.refresh_url);
        if let Some(token) = &self.refresh_token {
            kv(&mut out, "refresh_token", token);
        }
        for (key, value) in &self.options {
            kv(&mut out, key, value);
        }
        for line in &self.integration_lines {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str(&self.raw);
        out
    }

    /// Environment the config needs (the `${VAR}` client secret), for [`run`].
    pub fn env(&self) -> Vec<(&str, &str)> {
        match &self.client_secret {
            Secret::Env { var, value } => vec![(var.as_str(), value.as_str())],
            Secret::Literal(_) => Vec::new(),
        }
    }

    /// Writes the config to `dir/credproxy.toml`.
    pub fn write(&self, dir: &TestDir) -> PathBuf {
        dir.write_config(&self.build())
    }

    /// Writes the config and loads it in-process, for tests that drive the library
    /// (`credproxy::commands::open_tokens`). `${VAR}`s come from [`env`](Self::env), not
    /// from the test process's environment, which parallel tests share.
    pub fn load(&self, dir: &TestDir) -> credproxy::config::Config {
        let path = self.write(dir);
        let env: Vec<(String, String)> = self
            .env()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        credproxy::config::parse(&path, &self.build(), &lookup)
            .unwrap_or_else(|e| panic!("test config does not load: {e}"))
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp dir paths are UTF-8")
}

/// `key = "value"` with the value escaped as a TOML string by the toml crate.
fn kv(out: &mut String, key: &str, value: &str) {
    let value = toml::Value::String(value.to_owned());
    out.push_str(&format!("{key} = {value}\n"));
}
