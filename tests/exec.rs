//! `credproxy exec -- CMD` and `credproxy env`, as a user runs them: the real binary,
//! with real curl, Python `requests`, bash and fish as the programs behind the proxy,
//! reaching the routed test API (`api.test`) with no flags of their own.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::cli::{self, Output, RUN_TIMEOUT};
use crate::support::proxy::{ProxyOptions, Setup, closed_port};

/// Every variable SPEC "`exec` and `env`" lists.
const SPEC_VARS: [&str; 14] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "AWS_CA_BUNDLE",
    "PIP_CERT",
    "NODE_EXTRA_CA_CERTS",
    "NODE_USE_ENV_PROXY",
];
/// The ones that name the CA bundle.
const BUNDLE_VARS: &[&str] = SPEC_VARS.split_at(6).1.split_at(6).0;
const REFRESH_TOKEN_VAR: &str = "TEST_REFRESH_TOKEN";
const API_KEY_VAR: &str = "TEST_API_KEY";
/// Not a secret: `exec` passes it on.
const CLIENT_ID_VAR: &str = "TEST_CLIENT_ID";

/// curl asking for the routed API, printing only the status: the API echoes the
/// request's headers, the injected token among them.
const CURL_API: &str = r#"curl -q -sS -o /dev/null -w '%{http_code}' https://api.test/echo"#;

// === Fixture ===

/// A [`Setup`] whose config reads every secret from the environment (client secret,
/// refresh token, and an API key header on a second route) and one value that is no
/// secret (the client id); no `[admin]` table; and a private `TMPDIR` for `exec`.
struct Fixture {
    setup: Setup,
    tmp: TempDir,
    api_key: String,
    env: Vec<(String, String)>,
}

impl Fixture {
    async fn start() -> Self {
        Self::start_with(ProxyOptions::default().no_admin()).await
    }

    async fn start_with(options: ProxyOptions) -> Self {
        let setup = Setup::start().await;
        let api_key = format!("ak-SECRET-{:016x}", rand::random::<u64>());
        let options = options.extra(&format!(
            "[[routes]]\nhost = \"other.test\"\nheaders = {{ X-Api-Key = \"${{{API_KEY_VAR}}}\" }}"
        ));
        let builder = setup
            .config(&options)
            .client_id(&format!("${{{CLIENT_ID_VAR}}}"))
            .refresh_token(&format!("${{{REFRESH_TOKEN_VAR}}}"));
        builder.write(&setup.dir);
        let tmp = tempfile::Builder::new()
            .prefix("credproxy-exec-tmp-")
            .tempdir()
            .expect("creating a temp dir");
        let mut env: Vec<(String, String)> = builder
            .env()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        env.extend([
            (REFRESH_TOKEN_VAR.to_owned(), setup.rt0.clone()),
            (API_KEY_VAR.to_owned(), api_key.clone()),
            (CLIENT_ID_VAR.to_owned(), setup.tokens.client_id()),
            (
                "TMPDIR".to_owned(),
                tmp.path().to_str().expect("UTF-8 path").to_owned(),
            ),
        ]);
        Self {
            setup,
            tmp,
            api_key,
            env,
        }
    }

    /// `credproxy exec -c CONFIG ARGS…`, not yet started; stdout and stderr piped.
    fn command(&self, args: &[&str]) -> Command {
        let config = self.setup.dir.config_arg();
        let mut all = vec!["exec", "-c", &config];
        all.extend_from_slice(args);
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        cli::command(self.setup.dir.path(), &all, &env)
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.command(args).spawn().expect("spawning credproxy exec")
    }

    /// Runs `credproxy exec … ARGS` to completion; its output is scanned for test secrets.
    async fn exec(&self, args: &[&str]) -> Output {
        finish(self.spawn(args)).await
    }

    /// `exec` removes its temp file (the CA bundle) whatever way the command ended.
    fn assert_no_temp_files(&self) {
        let left: Vec<_> = std::fs::read_dir(self.tmp.path())
            .expect("reading TMPDIR")
            .map(|entry| entry.expect("a TMPDIR entry").path())
            .collect();
        assert!(left.is_empty(), "exec left temp files behind: {left:?}");
    }

    fn assert_api_saw_current_token(&self) {
        assert_api_saw_current_token(&self.setup);
    }
}

/// Waits (bounded) for a spawned `credproxy exec` and scans its output for test secrets.
async fn finish(child: Child) -> Output {
    tokio::time::timeout(RUN_TIMEOUT, cli::collect(child, &["exec"]))
        .await
        .expect("credproxy exec did not exit in time")
}

/// The API's last request was for `/echo` and carried exactly the current token.
fn assert_api_saw_current_token(setup: &Setup) {
    let seen = setup.api.last();
    assert_eq!(seen.path, "/echo");
    let token = setup.current_token();
    assert_eq!(seen.authorization(), [format!("Bearer {token}")]);
}

/// `NAME=value` lines (as `env` prints them) as a map.
fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

// === exec: programs reach the API ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_the_routed_api_with_the_injected_token() {
    let fx = Fixture::start().await;
    let out = fx.exec(&["--", "sh", "-c", CURL_API]).await;
    out.assert_code(0);
    assert_eq!(out.stdout, "200");
    fx.assert_api_saw_current_token();
    fx.assert_no_temp_files();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_reaches_the_routed_api_with_the_injected_token() {
    let fx = Fixture::start().await;
    let script = "import requests\n\
                  print(requests.get('https://api.test/echo', timeout=30).status_code)";
    let out = fx.exec(&["python3", "-c", script]).await;
    out.assert_code(0);
    assert_eq!(out.stdout, "200\n");
    fx.assert_api_saw_current_token();
}

// === exec: the child's environment ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_child_gets_every_variable_and_no_secret() {
    let fx = Fixture::start().await;
    // The child prints its environment after a request, so a token exists by then.
    let out = fx
        .command(&["--", "sh", "-c", &format!("{CURL_API} >/dev/null && env")])
        .env("NO_PROXY", ".corp.test")
        .spawn()
        .expect("spawning credproxy exec");
    let out = finish(out).await;
    out.assert_code(0);
    let env = parse_env(&out.stdout);

    let proxy = &env["HTTPS_PROXY"];
    let rest = proxy
        .strip_prefix("http://credproxy:")
        .unwrap_or_else(|| panic!("unexpected proxy URL {proxy}"));
    let (password, addr) = rest.split_once('@').expect("credentials@address");
    assert!(
        password.len() >= 32,
        "a guessable proxy password: {password}"
    );
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    for name in ["https_proxy", "HTTP_PROXY", "http_proxy"] {
        assert_eq!(&env[name], proxy, "{name}");
    }
    for name in ["NO_PROXY", "no_proxy"] {
        assert_eq!(env[name], ".corp.test,localhost,127.0.0.1,::1", "{name}");
    }
    let bundle = &env["SSL_CERT_FILE"];
    assert!(
        bundle.starts_with(fx.tmp.path().to_str().unwrap()),
        "{bundle}"
    );
    for &name in BUNDLE_VARS {
        assert_eq!(&env[name], bundle, "{name}");
    }
    assert_eq!(
        Path::new(&env["NODE_EXTRA_CA_CERTS"]),
        fx.setup.dir.ca_cert_path()
    );
    assert_eq!(env["NODE_USE_ENV_PROXY"], "1");
    for name in SPEC_VARS {
        assert!(env.contains_key(name), "{name} is not set");
    }

    // No secret by value (the output scan also catches any `-SECRET-` marker)…
    let secrets = [
        fx.setup.tokens.client_secret(),
        fx.setup.rt0.clone(),
        fx.setup
            .tokens
            .latest_refresh_token()
            .expect("a refresh token"),
        fx.setup.current_token(),
        fx.api_key.clone(),
    ];
    cli::assert_no_secrets(
        &out.stdout,
        &secrets.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    // …and not the variables credproxy read them from; a value that is no secret stays.
    for name in [
        cli::ConfigBuilder::SECRET_VAR,
        REFRESH_TOKEN_VAR,
        API_KEY_VAR,
    ] {
        assert!(!env.contains_key(name), "{name} reached the child");
    }
    assert_eq!(env[CLIENT_ID_VAR], fx.setup.tokens.client_id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_env_passes_the_secret_variables_on() {
    let fx = Fixture::start().await;
    let script = format!(
        "echo ${{{}:+set}} ${{{REFRESH_TOKEN_VAR}:+set}} ${{{API_KEY_VAR}:+set}}",
        cli::ConfigBuilder::SECRET_VAR
    );
    let out = fx.exec(&["--keep-env", "--", "sh", "-c", &script]).await;
    out.assert_code(0);
    assert_eq!(out.stdout, "set set set\n");
}

// === exec: the proxy is the child's alone, and gone afterwards ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_wants_the_one_time_credentials() {
    let fx = Fixture::start().await;
    let status = |proxy: &str| {
        format!(r#"curl -q -sS -o /dev/null -w '%{{http_code}}\n' {proxy} http://api.test/echo"#)
    };
    let script = [
        status(r#"-x "http://${HTTPS_PROXY##*@}""#),
        status(r#"-x "http://credproxy:wrong@${HTTPS_PROXY##*@}""#),
        status(""),
    ]
    .join("; ");
    let out = fx.exec(&["--", "sh", "-c", &script]).await;
    out.assert_code(0);
    assert_eq!(out.stdout, "407\n407\n200\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_exit_nothing_listens_and_no_temp_file_is_left() {
    let fx = Fixture::start().await;
    let script = r#"printf '%s\n' "${HTTPS_PROXY##*@}" "$SSL_CERT_FILE"; stat -c %a "$SSL_CERT_FILE"; grep -c 'BEGIN CERTIFICATE' "$SSL_CERT_FILE""#;
    let out = fx.exec(&["--", "sh", "-c", script]).await;
    out.assert_code(0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    let [addr, bundle, mode, certs] = lines[..] else {
        panic!("unexpected output {:?}", out.stdout);
    };
    assert_eq!(mode, "600", "the CA bundle is readable by others");
    let certs: usize = certs.parse().expect("a count");
    assert!(certs >= 2, "the bundle lacks the system roots: {certs}");

    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(refused.is_err(), "something still listens on {addr}");
    assert!(!Path::new(bundle).exists(), "{bundle} was left behind");
    fx.assert_no_temp_files();
}

// === exec: exit codes and signals ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_are_the_commands() {
    let fx = Fixture::start().await;
    fx.exec(&["--", "true"]).await.assert_code(0);
    fx.exec(&["sh", "-c", "exit 7"]).await.assert_code(7);

    let missing = fx.exec(&["--", "credproxy-no-such-command", "x"]).await;
    missing.assert_code(127);
    let error = missing.last_error_line();
    assert!(
        error.contains("cannot run credproxy-no-such-command") && error.contains("No such file"),
        "{error}"
    );

    // Killed by a signal: 128 + 15, as a shell reports it.
    fx.exec(&["--", "sh", "-c", "kill -TERM $$"])
        .await
        .assert_code(143);
    fx.assert_no_temp_files();
}

// The children sleep, not `signal.pause()`: a signal landing between Python's check for
// pending handlers and the pause() call would leave pause() waiting for another one.

/// A child that reports the signal it gets and exits 3.
const TRAPPING_CHILD: &str = r"
import signal, sys, time
def stop(number, frame):
    print('got', signal.Signals(number).name, flush=True)
    sys.exit(3)
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, stop)
print('ready', flush=True)
while True:
    time.sleep(0.05)
";

/// Starts `exec -- ARGS` and waits for the child's `ready` line.
async fn spawn_ready(
    fx: &Fixture,
    args: &[&str],
) -> (
    Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) {
    let mut child = fx.spawn(args);
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(RUN_TIMEOUT, lines.next_line())
        .await
        .expect("the child did not get ready in time")
        .expect("reading the child's output");
    assert_eq!(ready.as_deref(), Some("ready"));
    (child, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sigint_and_sighup_reach_the_child() {
    let fx = Fixture::start().await;
    for (signal, name) in [("TERM", "SIGTERM"), ("INT", "SIGINT"), ("HUP", "SIGHUP")] {
        let (child, mut lines) = spawn_ready(&fx, &["python3", "-c", TRAPPING_CHILD]).await;
        cli::signal(&child, signal);
        let got = tokio::time::timeout(RUN_TIMEOUT, lines.next_line())
            .await
            .expect("the child did not report the signal in time")
            .expect("reading the child's output");
        assert_eq!(got, Some(format!("got {name}")));
        finish(child).await.assert_code(3);
    }
    fx.assert_no_temp_files();
}

/// A child that counts the SIGINTs arriving within a second of the first one.
const COUNTING_CHILD: &str = r"
import signal, time
count = 0
def on_int(number, frame):
    global count
    count += 1
signal.signal(signal.SIGINT, on_int)
print('ready', flush=True)
while count == 0:
    time.sleep(0.05)
deadline = time.monotonic() + 1
while time.monotonic() < deadline:
    time.sleep(0.05)
print('SIGINT x', count, flush=True)
";

/// Runs ARGV in the foreground of a new pseudo-terminal (as a shell at a terminal
/// would), types Ctrl-C once `ready` appears, and prints all the terminal showed.
const CTRL_C_AT_A_TERMINAL: &str = r"
import os, pty, sys
pid, fd = pty.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
shown, typed = b'', False
while True:
    try:
        chunk = os.read(fd, 4096)
    except OSError:
        break
    if not chunk:
        break
    shown += chunk
    if not typed and b'ready' in shown:
        os.write(fd, b'\x03')
        typed = True
sys.stdout.buffer.write(shown)
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
";

/// Ctrl-C at a terminal reaches the child once: the terminal signals the whole
/// foreground group, so exec does not pass its own copy on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_at_a_terminal_reaches_the_child_once() {
    let fx = Fixture::start().await;
    let bin = cli::bin();
    let config = fx.setup.dir.config_arg();
    let mut args = vec![
        "-c",
        CTRL_C_AT_A_TERMINAL,
        bin.to_str().expect("UTF-8 path"),
    ];
    args.extend(["exec", "-c", &config, "python3", "-c", COUNTING_CHILD]);
    let env: Vec<(&str, &str)> = fx
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let out = cli::run_program("python3", &args, &env).await;
    out.assert_code(0);
    assert!(out.stdout.contains("SIGINT x 1"), "{}", out.stdout);
    fx.assert_no_temp_files();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_killed_by_a_forwarded_sigterm_is_143() {
    let fx = Fixture::start().await;
    let (child, _lines) = spawn_ready(&fx, &["sh", "-c", "echo ready; exec sleep 60"]).await;
    cli::terminate(&child);
    finish(child).await.assert_code(143);
    fx.assert_no_temp_files();
}

// === exec: the state store ===

/// The child exits while a refresh is in flight (a slow provider that has already
/// rotated the refresh token): exec waits for it and stores the rotated token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_in_flight_is_committed_before_exit() {
    let fx = Fixture::start().await;
    fx.setup.tokens.set_delay(Duration::from_secs(2));
    let mut child = fx
        .command(&["--", "cat"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawning credproxy exec");
    fx.setup.tokens.wait_for_calls(1).await;
    // EOF on its stdin ends the child.
    drop(child.stdin.take());
    finish(child).await.assert_code(0);
    let rotated = fx
        .setup
        .tokens
        .latest_refresh_token()
        .expect("the provider rotated");
    assert_ne!(rotated, fx.setup.rt0);
    assert_eq!(fx.setup.dir.stored_refresh_token("demo"), rotated);
}

// === exec: an [admin] table ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_admin_listener_runs_beside_the_command() {
    let admin = closed_port().await;
    let fx = Fixture::start_with(ProxyOptions::default().admin_listen(&admin.to_string())).await;
    let script = format!("curl -q -sS -w ' %{{http_code}}' http://{admin}/healthz");
    let out = fx.exec(&["--", "sh", "-c", &script]).await;
    out.assert_code(0);
    assert!(out.stdout.ends_with(" 200"), "{}", out.stdout);
}

// === env ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_prints_the_variables_of_the_configured_run() {
    let setup = Setup::start().await;
    let listen = closed_port().await.to_string();
    // A password that needs both URL encoding and shell quoting.
    let password = "p@ss w'rd:/\\x";
    let options = ProxyOptions::default()
        .listen(&listen)
        .auth("steps", password);
    let run = setup.spawn_proxy(&options).await;
    let builder = setup.config(&options);
    let config = setup.dir.config_arg();
    let bin = cli::bin();
    let mut env = builder.env();
    env.extend([
        ("CREDPROXY", bin.to_str().expect("UTF-8 path")),
        ("CONFIG", config.as_str()),
    ]);

    // `eval "$(credproxy env)"` in bash, then `script`.
    let bash_after_env = |script: String| {
        let env = env.clone();
        async move {
            let script = format!(r#"eval "$("$CREDPROXY" env -c "$CONFIG")" && {script}"#);
            cli::run_program("bash", &["-c", &script], &env).await
        }
    };

    // sh: eval'd by bash, then curl goes through the running proxy.
    let sh = bash_after_env(CURL_API.to_owned()).await;
    sh.assert_code(0);
    assert_eq!(sh.stdout, "200");
    assert_api_saw_current_token(&setup);

    // json: parses, and holds the same variables with the values bash got from sh.
    let json = setup
        .dir
        .run(&["env", "-c", &config, "--format", "json"], &builder.env())
        .await;
    json.assert_code(0);
    let json: BTreeMap<String, String> =
        serde_json::from_str(&json.stdout).expect("env --format json prints one JSON object");
    let names: Vec<&str> = json.keys().map(String::as_str).collect();
    let mut expected: Vec<&str> = SPEC_VARS.to_vec();
    expected.sort_unstable();
    assert_eq!(names, expected);
    let print_all = names
        .iter()
        .map(|name| format!(r#"printf '%s=%s\n' {name} "${name}""#))
        .collect::<Vec<_>>()
        .join("; ");
    let from_sh = bash_after_env(print_all).await;
    from_sh.assert_code(0);
    assert_eq!(parse_env(&from_sh.stdout), json);
    let url = &json["HTTPS_PROXY"];
    assert_eq!(
        url,
        &format!("http://steps:p%40ss%20w'rd%3A%2F%5Cx@{listen}")
    );
    assert_eq!(
        Path::new(&json["SSL_CERT_FILE"]),
        setup.dir.path().join("certs/ca-bundle.pem")
    );

    // fish: valid syntax, and sourcing it gives fish the same values.
    let fish_file = setup.dir.path().join("env.fish");
    let fish = setup
        .dir
        .run(&["env", "-c", &config, "--format", "fish"], &builder.env())
        .await;
    fish.assert_code(0);
    std::fs::write(&fish_file, &fish.stdout).expect("writing env.fish");
    let fish_file = fish_file.to_str().expect("UTF-8 path");
    cli::run_program("fish", &["--no-config", "-n", fish_file], &[])
        .await
        .assert_code(0);
    let fish_print = names
        .iter()
        .map(|name| format!("printf '%s=%s\\n' {name} ${name}"))
        .collect::<Vec<_>>()
        .join("; ");
    let from_fish = cli::run_program(
        "fish",
        &[
            "--no-config",
            "-c",
            &format!("source {fish_file}; {fish_print}"),
        ],
        &[],
    )
    .await;
    from_fish.assert_code(0);
    assert_eq!(parse_env(&from_fish.stdout), json);
    run.stop().await;
}
