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
        ConfigBuilder::for_server(&self.dir, &self.tokens)
            .refresh_token(&self.rt0)
            .raw(&options.toml(self))
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

    /// Runs `credproxy run` as a process and waits until it listens.
    pub async fn spawn_proxy(&self, options: &ProxyOptions) -> ProxyProcess {
        let builder = self.config(options);
        builder.write(&self.dir);
        let config = self.dir.config_arg();
        ProxyProcess::spawn(&self.dir, &["run", "-c", &config], &builder.env()).await
    }

    /// credproxy's own CA certificate (created on first start).
    pub fn credproxy_roots(&self) -> Vec<CertificateDer<'static>> {
        ca::load_pem_certs(&self.dir.ca_cert_path())
    }

    /// A client TLS config trusting only credproxy's CA, no ALPN.
    pub fn credproxy_client_config(&self) -> ClientConfig {
        ca::client_config_trusting(self.credproxy_roots())
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

    /// The tables after the integration: `[proxy]`, `[admin]`, `[upstream]`, `[[routes]]`.
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
        out.push_str("\n[admin]\nlisten = \"127.0.0.1:0\"\n");
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
        out.push_str(&format!(
            "\n[[routes]]\nhost = {}\nintegration = {}\n",
            s(API_HOST),
            s(INTEGRATION)
        ));
        if let Some(tls) = self.upstream_tls {
            out.push_str(&format!("upstream_tls = {tls}\n"));
        }
        out
    }
}

// === InProcess ===

/// credproxy running on the test's runtime.
pub struct InProcess {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    running: Option<credproxy::app::Running>,
}

impl InProcess {
    /// `credproxy::app::start(config)`, bounded; panics if it fails.
    pub async fn start(config: &credproxy::config::Config) -> Self {
        let running = tokio::time::timeout(WAIT, credproxy::app::start(config))
            .await
            .expect("credproxy did not start in time")
            .unwrap_or_else(|e| panic!("credproxy did not start: {}", credproxy::error::chain(&e)));
        Self {
            proxy_addr: running.proxy_addr,
            admin_addr: running.admin_addr,
            running: Some(running),
        }
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
            log,
        };
        let line = process.wait_for_log("credproxy listening").await;
        process.proxy_addr = field_addr(&line, "proxy_addr=");
        process.admin_addr = field_addr(&line, "admin_addr=");
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
        let mut lines = self.log.lines.subscribe();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            {
                let state = self.log.state();
                if let Some(line) = state.text.lines().find(|l| l.contains(needle)) {
                    return line.to_owned();
                }
                assert!(
                    !state.closed,
                    "credproxy exited without logging {needle:?}; its log:\n{}",
                    state.text
                );
            }
            let changed = tokio::time::timeout_at(deadline, lines.changed()).await;
            assert!(
                matches!(changed, Ok(Ok(()))),
                "timed out after {WAIT:?} waiting for {needle:?} in the log:\n{}",
                self.log()
            );
        }
    }

    /// The process's peak resident set size (`VmHWM` in /proc/PID/status), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let status =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmHWM in {path}:\n{status}"))
    }

    /// SIGTERM, without waiting.
    pub fn terminate(&self) {
        cli::terminate(&self.child);
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

    /// SIGTERM, then [`wait`](Self::wait).
    pub async fn stop(self) -> Exit {
        self.terminate();
        self.wait().await
    }
}

/// The address after `key` in a log line such as
/// `… credproxy listening proxy_addr=127.0.0.1:1234 admin_addr=127.0.0.1:5678`.
fn field_addr(line: &str, key: &str) -> SocketAddr {
    line.split_whitespace()
        .find_map(|field| field.strip_prefix(key))
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no {key}ADDRESS in the log line {line:?}"))
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
