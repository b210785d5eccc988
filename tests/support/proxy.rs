//! credproxy itself, started for a test: in-process (`credproxy::app::start` on the test's
//! runtime, stopped with `stop`), or as the real `credproxy run` process, whose ports come
//! from its "credproxy listening" log line and whose peak memory comes from /proc.
//!
//! [`Setup`] is the outside world it runs against: a test CA, a temp directory, a token
//! endpoint (integration `demo`) and a test API that the route `api.test` reaches through
//! `upstream.resolve`. [`ProxyOptions`] says how the proxy is configured.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::watch;

use super::ca::{self, TestCa};
use super::cli::{self, ConfigBuilder, RUN_TIMEOUT, TestDir};
use super::client;
use super::token::{self, TokenServer, WAIT};
use super::upstream::TestApi;

/// The integration every setup configures.
pub const INTEGRATION: &str = "demo";
/// The routed host.
pub const API_HOST: &str = "api.test";

// === Setup ===

pub struct Setup {
    pub ca: TestCa,
    pub dir: TestDir,
    pub tokens: TokenServer,
    pub api: TestApi,
    /// The refresh token the config starts from.
    pub rt0: String,
}

impl Setup {
    pub async fn start() -> Self {
        let ca = TestCa::new();
        // No `with_ca`: the config's [upstream] table is written here, with `extra_ca`.
        let dir = TestDir::new();
        ca.write_pem(&dir.test_ca_path());
        let rt0 = token::new_refresh_token(0);
        let tokens = TokenServer::start(&ca, &rt0).await;
        let api = TestApi::start(&ca).await;
        api.accept_tokens(tokens.issued());
        Self {
            ca,
            dir,
            tokens,
            api,
            rt0,
        }
    }

    /// The whole config for `options`, as a builder (for `env()`, `write`, `load`).
    pub fn config(&self, options: &ProxyOptions) -> ConfigBuilder {
        let mut builder =
            ConfigBuilder::for_server(&self.dir, &self.tokens).refresh_token(&self.rt0);
        if let Some(scope) = &options.scope {
            builder = builder.scope(scope);
        }
        if options.secret_in_file {
            builder = builder.client_secret_literal(&self.tokens.client_secret());
        }
        if let Some(url) = &options.state_url {
            builder = builder.state_url(url);
        }
        builder.raw(&options.toml(self))
    }

    /// Rewrites the config file for `options` (as an operator edits it before a reload).
    pub fn rewrite_config(&self, options: &ProxyOptions) {
        self.config(options).write(&self.dir);
    }

    /// Starts credproxy in this process and waits until it holds its first token.
    pub async fn start_proxy(&self, options: &ProxyOptions) -> InProcess {
        let proxy = self.start_proxy_cold(options).await;
        proxy.wait_for_generation(1).await;
        proxy
    }

    /// Starts credproxy in this process without waiting for a token.
    pub async fn start_proxy_cold(&self, options: &ProxyOptions) -> InProcess {
        InProcess::start(&self.config(options).load(&self.dir)).await
    }

    /// Starts credproxy in this process with `resolver` answering its upstream name
    /// lookups, and waits until it holds its first token.
    pub async fn start_proxy_resolving(
        &self,
        options: &ProxyOptions,
        resolver: Arc<dyn credproxy::proxy::dial::Resolve>,
    ) -> InProcess {
        let config = self.config(options).load(&self.dir);
        let proxy = InProcess::start_with(credproxy::app::start_with(
            &config,
            Default::default(),
            resolver,
        ))
        .await;
        proxy.wait_for_generation(1).await;
        proxy
    }

    /// Runs `credproxy run` as a process and waits until it listens.
    pub async fn spawn_proxy(&self, options: &ProxyOptions) -> ProxyProcess {
        self.spawn_proxy_with(options, &[], &[]).await
    }

    /// Runs `credproxy GLOBAL_ARGS run -c CONFIG` (e.g. `["--log-format", "json"]`) with
    /// `env` added (e.g. `RUST_LOG`), and waits until it listens.
    pub async fn spawn_proxy_with(
        &self,
        options: &ProxyOptions,
        global_args: &[&str],
        env: &[(&str, &str)],
    ) -> ProxyProcess {
        let builder = self.config(options);
        builder.write(&self.dir);
        let config = self.dir.config_arg();
        let mut args = global_args.to_vec();
        args.extend(["run", "-c", &config]);
        let mut vars = builder.env();
        vars.extend_from_slice(env);
        ProxyProcess::spawn(&self.dir, &args, &vars).await
    }

    /// credproxy's own CA certificate (created on first start).
    pub fn credproxy_roots(&self) -> Vec<CertificateDer<'static>> {
        ca::load_pem_certs(&self.dir.ca_cert_path())
    }

    /// A client TLS config trusting only credproxy's CA, no ALPN.
    pub fn credproxy_client_config(&self) -> ClientConfig {
        ca::client_config_trusting(self.credproxy_roots())
    }

    /// `CONNECT api.test:443` to the proxy at `proxy`, then TLS offering `alpn`.
    pub async fn intercepted_tls(
        &self,
        proxy: SocketAddr,
        alpn: &[u8],
    ) -> tokio_rustls::client::TlsStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>> {
        let tunnel = client::connect(proxy, &format!("{API_HOST}:443"), &[])
            .await
            .tunnel();
        let config = client::with_alpn(self.credproxy_client_config(), &[alpn]);
        client::tls(tunnel, API_HOST, config).await
    }

    /// The access token the token endpoint issued last.
    pub fn current_token(&self) -> String {
        self.tokens
            .current_access_token()
            .expect("the token endpoint has issued no access token yet")
    }

    /// `https://api.test<path>`
    pub fn api_url(&self, path: &str) -> String {
        format!("https://{API_HOST}{path}")
    }
}

// === ProxyOptions ===

/// How the proxy is configured; `default()` is a loopback proxy and admin listener on
/// ephemeral ports, `unrouted = "tunnel"`, no proxy auth, and route `api.test` → `demo`.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    listen: String,
    unrouted: &'static str,
    auth: Option<(String, String)>,
    upstream_tls: Option<bool>,
    connect_timeout: String,
    response_timeout: Option<String>,
    /// Added to (and overriding) the default `upstream.resolve` entries.
    resolve: BTreeMap<String, SocketAddr>,
    /// None: no `[admin]` table.
    admin_listen: Option<String>,
    admin_token: Option<String>,
    /// More `[proxy]` entries: key and TOML value.
    proxy: Vec<(String, String)>,
    /// More `[upstream]` entries: key and TOML value.
    upstream: Vec<(String, String)>,
    /// `[limits]` entries: key and TOML value.
    limits: Vec<(String, String)>,
    /// `[[sidecars]]` upstream URLs, each listening on 127.0.0.1:0.
    sidecars: Vec<String>,
    /// The host of the route to integration `demo`.
    route_host: String,
    /// `scope` of integration `demo`.
    scope: Option<String>,
    /// The client secret written into the file instead of `${TEST_CLIENT_SECRET}`: for
    /// in-process reloads, which read variables from the test process's environment.
    secret_in_file: bool,
    /// `[state] url` (a PostgreSQL database) instead of the state file.
    state_url: Option<String>,
    /// Raw TOML appended at the end (start it with a table header).
    extra: String,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".to_owned(),
            unrouted: "tunnel",
            auth: None,
            upstream_tls: None,
            connect_timeout: "2s".to_owned(),
            response_timeout: None,
            resolve: BTreeMap::new(),
            admin_listen: Some("127.0.0.1:0".to_owned()),
            admin_token: None,
            proxy: Vec::new(),
            upstream: Vec::new(),
            limits: Vec::new(),
            sidecars: Vec::new(),
            route_host: API_HOST.to_owned(),
            scope: None,
            secret_in_file: false,
            state_url: None,
            extra: String::new(),
        }
    }
}

impl ProxyOptions {
    pub fn listen(mut self, listen: &str) -> Self {
        listen.clone_into(&mut self.listen);
        self
    }

    /// `"tunnel"` | `"deny"`
    pub fn unrouted(mut self, unrouted: &'static str) -> Self {
        self.unrouted = unrouted;
        self
    }

    pub fn auth(mut self, username: &str, password: &str) -> Self {
        self.auth = Some((username.to_owned(), password.to_owned()));
        self
    }

    /// The route's `upstream_tls`.
    pub fn upstream_tls(mut self, tls: bool) -> Self {
        self.upstream_tls = Some(tls);
        self
    }

    /// e.g. `"1s"`
    pub fn response_timeout(mut self, timeout: &str) -> Self {
        self.response_timeout = Some(timeout.to_owned());
        self
    }

    /// `upstream.resolve."target" = addr`, e.g. `("api.test:443", closed_port)`.
    pub fn resolve(mut self, target: &str, addr: SocketAddr) -> Self {
        self.resolve.insert(target.to_owned(), addr);
        self
    }

    /// `admin.listen`
    pub fn admin_listen(mut self, listen: &str) -> Self {
        self.admin_listen = Some(listen.to_owned());
        self
    }

    /// No `[admin]` table (`run` then listens on the default address; `exec` on none).
    pub fn no_admin(mut self) -> Self {
        self.admin_listen = None;
        self
    }

    /// `admin.token`
    pub fn admin_token(mut self, token: &str) -> Self {
        self.admin_token = Some(token.to_owned());
        self
    }

    /// `proxy.KEY = VALUE`, the value as TOML (`r#"["private"]"#`); replaces an earlier one.
    pub fn proxy_key(mut self, key: &str, toml_value: &str) -> Self {
        self.proxy.retain(|(k, _)| k != key);
        self.proxy.push((key.to_owned(), toml_value.to_owned()));
        self
    }

    /// `upstream.KEY = VALUE`, the value as TOML (`"4"`, `"\"1s\""`); replaces an earlier one.
    pub fn upstream_key(mut self, key: &str, toml_value: &str) -> Self {
        self.upstream.retain(|(k, _)| k != key);
        self.upstream.push((key.to_owned(), toml_value.to_owned()));
        self
    }

    /// `limits.KEY = VALUE`, the value as TOML (`"50"`, `"\"1s\""`); replaces an earlier one.
    pub fn limit(mut self, key: &str, toml_value: &str) -> Self {
        self.limits.retain(|(k, _)| k != key);
        self.limits.push((key.to_owned(), toml_value.to_owned()));
        self
    }

    pub fn max_connections(self, max: usize) -> Self {
        self.limit("max_connections", &max.to_string())
    }

    pub fn max_header_bytes(self, max: usize) -> Self {
        self.limit("max_header_bytes", &max.to_string())
    }

    pub fn max_headers(self, max: usize) -> Self {
        self.limit("max_headers", &max.to_string())
    }

    /// e.g. `"1s"`
    pub fn header_read_timeout(self, timeout: &str) -> Self {
        self.limit("header_read_timeout", &format!("{timeout:?}"))
    }

    /// A `[[sidecars]]` entry on `127.0.0.1:0` for `upstream` (e.g. `https://api.test/v2`).
    pub fn sidecar(mut self, upstream: &str) -> Self {
        self.sidecars.push(upstream.to_owned());
        self
    }

    /// The host routed to integration `demo` (default `api.test`).
    pub fn route_host(mut self, host: &str) -> Self {
        host.clone_into(&mut self.route_host);
        self
    }

    /// Integration `demo`'s `scope`.
    pub fn scope(mut self, scope: &str) -> Self {
        self.scope = Some(scope.to_owned());
        self
    }

    /// Writes the client secret into the file (see the field).
    pub fn secret_in_file(mut self) -> Self {
        self.secret_in_file = true;
        self
    }

    /// `[state] url = URL`: the PostgreSQL store.
    pub fn state_url(mut self, url: &str) -> Self {
        self.state_url = Some(url.to_owned());
        self
    }

    /// Raw TOML appended to the config; start it with a table header.
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push('\n');
        self.extra.push_str(toml);
        self
    }

    /// The tables after the integration: `[proxy]`, `[admin]`, `[upstream]`, `[[routes]]`,
    /// `[[sidecars]]`, `[limits]`, then `extra`.
    fn toml(&self, setup: &Setup) -> String {
        let s = |value: &str| toml::Value::String(value.to_owned()).to_string();
        let mut resolve: BTreeMap<String, SocketAddr> = BTreeMap::new();
        let https = setup.api.https_addr();
        for host in ["api.test", "other.test", "unrouted.test"] {
            resolve.insert(format!("{host}:443"), https);
        }
        resolve.insert("api.test:80".to_owned(), setup.api.http_addr());
        resolve.extend(self.resolve.clone());

        let mut out = String::from("[proxy]\n");
        out.push_str(&format!("listen = {}\n", s(&self.listen)));
        out.push_str(&format!("unrouted = {}\n", s(self.unrouted)));
        if let Some((username, password)) = &self.auth {
            out.push_str(&format!(
                "auth = {{ username = {}, password = {} }}\n",
                s(username),
                s(password)
            ));
        }
        for (key, value) in &self.proxy {
            out.push_str(&format!("{key} = {value}\n"));
        }
        if let Some(listen) = &self.admin_listen {
            out.push_str(&format!("\n[admin]\nlisten = {}\n", s(listen)));
            if let Some(token) = &self.admin_token {
                out.push_str(&format!("token = {}\n", s(token)));
            }
        }
        out.push_str("\n[upstream]\n");
        let extra_ca = setup.dir.test_ca_path();
        out.push_str(&format!(
            "extra_ca = {}\n",
            s(extra_ca.to_str().expect("temp dir paths are UTF-8"))
        ));
        out.push_str(&format!("connect_timeout = {}\n", s(&self.connect_timeout)));
        if let Some(timeout) = &self.response_timeout {
            out.push_str(&format!("response_timeout = {}\n", s(timeout)));
        }
        let entries: Vec<String> = resolve
            .iter()
            .map(|(target, addr)| format!("{} = {}", s(target), s(&addr.to_string())))
            .collect();
        out.push_str(&format!("resolve = {{ {} }}\n", entries.join(", ")));
        for (key, value) in &self.upstream {
            out.push_str(&format!("{key} = {value}\n"));
        }
        out.push_str(&format!(
            "\n[[routes]]\nhost = {}\nintegration = {}\n",
            s(&self.route_host),
            s(INTEGRATION)
        ));
        if let Some(tls) = self.upstream_tls {
            out.push_str(&format!("upstream_tls = {tls}\n"));
        }
        for upstream in &self.sidecars {
            out.push_str(&format!(
                "\n[[sidecars]]\nlisten = \"127.0.0.1:0\"\nupstream = {}\n",
                s(upstream)
            ));
        }
        if !self.limits.is_empty() {
            out.push_str("\n[limits]\n");
            for (key, value) in &self.limits {
                out.push_str(&format!("{key} = {value}\n"));
            }
        }
        out.push_str(&self.extra);
        out
    }
}

/// An `[integrations.NAME]` table for another token endpoint (its client secret written
/// into the file), for configs with more than one integration.
pub fn integration_toml(
    name: &str,
    server: &TokenServer,
    refresh_token: &str,
    scope: Option<&str>,
) -> String {
    let s = |value: &str| toml::Value::String(value.to_owned()).to_string();
    let mut out = format!(
        "[integrations.{name}]\nclient_id = {}\nclient_secret = {}\nrefresh_url = {}\nrefresh_token = {}\n",
        s(&server.client_id()),
        s(&server.client_secret()),
        s(&server.url()),
        s(refresh_token)
    );
    if let Some(scope) = scope {
        out.push_str(&format!("scope = {}\n", s(scope)));
    }
    out
}

// === InProcess ===

/// credproxy running on the test's runtime.
pub struct InProcess {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub sidecar_addrs: Vec<SocketAddr>,
    running: Option<credproxy::app::Running>,
}

impl InProcess {
    /// `credproxy::app::start(config)`, bounded; panics if it fails.
    pub async fn start(config: &credproxy::config::Config) -> Self {
        Self::start_with(credproxy::app::start(config)).await
    }

    /// Awaits `start` (an `app::start…` call), bounded; panics if it fails.
    async fn start_with(
        start: impl Future<Output = Result<credproxy::app::Running, credproxy::error::Error>>,
    ) -> Self {
        let running = tokio::time::timeout(WAIT, start)
            .await
            .expect("credproxy did not start in time")
            .unwrap_or_else(|e| {
                panic!("credproxy did not start: {}", credproxy::report::chain(&e))
            });
        Self {
            proxy_addr: running.proxy_addr,
            admin_addr: running
                .admin_addr
                .expect("`run` always has an admin listener"),
            sidecar_addrs: running.sidecar_addrs.clone(),
            running: Some(running),
        }
    }

    /// `state.reload()`: re-reads the config file; the changes that need a restart, or
    /// the error as one line.
    pub async fn reload(&self) -> Result<Vec<String>, String> {
        self.running
            .as_ref()
            .expect("credproxy is still running")
            .state
            .reload()
            .await
            .map_err(|e| credproxy::report::chain(&e))
    }

    pub fn tokens(&self) -> Arc<credproxy::tokens::Tokens> {
        self.running
            .as_ref()
            .expect("credproxy is still running")
            .tokens()
    }

    pub fn integration(&self) -> Arc<credproxy::tokens::Integration> {
        self.tokens()
            .get(INTEGRATION)
            .expect("the setup's integration exists")
            .clone()
    }

    /// Waits until token generation `n` (1 = the first token) has been published.
    pub async fn wait_for_generation(&self, n: u64) {
        let mut published = self.integration().subscribe();
        let reached = tokio::time::timeout(WAIT, published.wait_for(|g| *g >= n)).await;
        assert!(
            matches!(reached, Ok(Ok(_))),
            "timed out after {WAIT:?} waiting for token generation {n}; status: {:?}",
            self.integration().status()
        );
    }

    /// `http://ADMIN<path>`
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// Stops gracefully (bounded).
    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            tokio::time::timeout(RUN_TIMEOUT, running.stop())
                .await
                .expect("credproxy did not stop in time");
        }
    }
}

// === ProxyProcess ===

/// A `credproxy run` child (killed on drop), its stderr collected line by line.
pub struct ProxyProcess {
    child: Child,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub sidecar_addrs: Vec<SocketAddr>,
    log: Arc<Log>,
}

struct Log {
    state: Mutex<LogState>,
    /// Lines read so far; also bumped once at end of stream.
    lines: watch::Sender<u64>,
}

#[derive(Default)]
struct LogState {
    text: String,
    closed: bool,
}

impl Log {
    fn state(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, line: &str) {
        {
            let mut state = self.state();
            state.text.push_str(line);
            state.text.push('\n');
        }
        self.lines.send_modify(|n| *n += 1);
    }

    fn close(&self) {
        self.state().closed = true;
        self.lines.send_modify(|n| *n += 1);
    }
}

/// What `credproxy run` left behind.
#[derive(Debug)]
pub struct Exit {
    /// `None` when killed by a signal.
    pub code: Option<i32>,
    pub log: String,
}

impl ProxyProcess {
    /// Starts the binary in `dir` with `args` (e.g. `["run", "-c", path]`) and waits for
    /// its "credproxy listening … proxy_addr=… admin_addr=…" log line.
    pub async fn spawn(dir: &TestDir, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = dir.spawn(args, env);
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Log {
            state: Mutex::new(LogState::default()),
            lines: watch::Sender::new(0),
        });
        let reader = Arc::clone(&log);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                reader.push(&line);
            }
            reader.close();
        });
        let mut process = Self {
            child,
            proxy_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            sidecar_addrs: Vec::new(),
            log,
        };
        let line = process.wait_for_log("credproxy listening").await;
        let listening = Listening::parse(&line);
        process.proxy_addr = listening.proxy_addr;
        process.admin_addr = listening.admin_addr;
        process.sidecar_addrs = listening.sidecar_addrs;
        process
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("credproxy has not been reaped yet")
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.state().text.clone()
    }

    /// Waits for a log line containing `needle` and returns it; panics (showing the log)
    /// after [`WAIT`] or when the process closes stderr first.
    pub async fn wait_for_log(&self, needle: &str) -> String {
        let mut lines = self.wait_for_log_count(needle, 1).await;
        lines.swap_remove(0)
    }

    /// Waits until `n` log lines contain `needle` and returns them all, oldest first.
    pub async fn wait_for_log_count(&self, needle: &str, n: usize) -> Vec<String> {
        let mut lines = self.log.lines.subscribe();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            {
                let state = self.log.state();
                let found: Vec<String> = state
                    .text
                    .lines()
                    .filter(|l| l.contains(needle))
                    .map(str::to_owned)
                    .collect();
                if found.len() >= n {
                    return found;
                }
                assert!(
                    !state.closed,
                    "credproxy exited without logging {needle:?} {n} times; its log:\n{}",
                    state.text
                );
            }
            let changed = tokio::time::timeout_at(deadline, lines.changed()).await;
            assert!(
                matches!(changed, Ok(Ok(()))),
                "timed out after {WAIT:?} waiting for {needle:?} {n} times in the log:\n{}",
                self.log()
            );
        }
    }

    /// The process's peak resident set size (`VmHWM` in /proc/PID/status), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM")
    }

    /// The process's resident set size now (`VmRSS` in /proc/PID/status), in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let status =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {path}:\n{status}"))
    }

    /// SIGTERM, without waiting.
    pub fn terminate(&self) {
        cli::terminate(&self.child);
    }

    /// SIGHUP (reload the config), without waiting.
    pub fn hangup(&self) {
        let pid = self.pid();
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("running kill(1)");
        assert!(status.success(), "kill -HUP {pid} failed: {status}");
    }

    /// Waits (bounded) for the process to exit after [`terminate`](Self::terminate) and
    /// for its log to end; checks the log for leaked test secrets.
    pub async fn wait(mut self) -> Exit {
        let status = tokio::time::timeout(RUN_TIMEOUT, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "credproxy did not exit within {RUN_TIMEOUT:?}; log:\n{}",
                    self.log()
                )
            })
            .expect("waiting for credproxy");
        let mut lines = self.log.lines.subscribe();
        let closed = tokio::time::timeout(WAIT, async {
            while !self.log.state().closed {
                if lines.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "credproxy's stderr stayed open after it exited"
        );
        let log = self.log();
        cli::assert_no_secret_markers(&log);
        Exit {
            code: status.code(),
            log,
        }
    }

    /// SIGKILL, as the OOM killer or a node failure ends a process: no clean-up at all.
    /// Then [`wait`](Self::wait).
    pub async fn kill(mut self) -> Exit {
        self.child
            .start_kill()
            .unwrap_or_else(|e| panic!("credproxy exited before the kill: {e}"));
        self.wait().await
    }

    /// SIGTERM, then [`wait`](Self::wait).
    pub async fn stop(self) -> Exit {
        self.terminate();
        self.wait().await
    }
}

/// The addresses in the "credproxy listening" line, as text
/// (`… credproxy listening proxy_addr=127.0.0.1:1234 admin_addr=127.0.0.1:5678 sidecars=[…]`)
/// or as a JSON object (`--log-format json`: `{"fields": {"proxy_addr": "…", …}}`).
struct Listening {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    sidecar_addrs: Vec<SocketAddr>,
}

impl Listening {
    fn parse(line: &str) -> Self {
        let field = |key: &str| -> Option<String> {
            if line.trim_start().starts_with('{') {
                let value: serde_json::Value = serde_json::from_str(line).ok()?;
                let fields = value.get("fields").unwrap_or(&value);
                Some(fields.get(key)?.as_str()?.to_owned())
            } else {
                let prefix = format!("{key}=");
                let start = line.find(&prefix)? + prefix.len();
                let rest = &line[start..];
                let end = if rest.starts_with('[') {
                    rest.find(']')? + 1
                } else {
                    rest.find(char::is_whitespace).unwrap_or(rest.len())
                };
                Some(rest[..end].to_owned())
            }
        };
        let addr = |key: &str| -> SocketAddr {
            field(key)
                .and_then(|addr| addr.trim_matches('"').parse().ok())
                .unwrap_or_else(|| panic!("no {key}=ADDRESS in the log line {line:?}"))
        };
        let sidecar_addrs = field("sidecars")
            .map(|list| {
                list.trim_matches(|c| c == '[' || c == ']')
                    .split(',')
                    .map(str::trim)
                    .filter(|a| !a.is_empty())
                    .map(|a| {
                        a.parse()
                            .unwrap_or_else(|_| panic!("bad sidecar address {a:?} in {line:?}"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            proxy_addr: addr("proxy_addr"),
            admin_addr: addr("admin_addr"),
            sidecar_addrs,
        }
    }
}

/// A loopback port nothing listens on: bound, then released.
pub async fn closed_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding 127.0.0.1:0");
    let addr = listener.local_addr().expect("local_addr");
    drop(listener);
    addr
}

/// How long the streaming tests may take per transfer.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);
