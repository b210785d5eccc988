//! `credproxy ca init --constrain`: a CA whose critical name constraints permit only the
//! routed domains (and `[ca] permit`). Real clients — curl, Python's `ssl`, Node's `tls` —
//! accept a leaf this CA signed for a routed host and reject one the same key signed for
//! any other host (minted here, as anyone holding a leaked key could). `run` and reload
//! warn about routes outside the constraints.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Response, StatusCode};
use tokio::process::Command;

use crate::support::admin::Admin;
use crate::support::ca::TestCa;
use crate::support::cli::TestDir;
use crate::support::client;
use crate::support::proxy::{API_HOST, ProxyOptions, Setup};
use crate::support::serve::{self, ServerTask};

const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Routes `api.test` and `*.files.test`, and `[ca] permit = ["extra.test"]`.
const CONFIG: &str = r#"
[ca]
permit = ["extra.test"]

[[routes]]
host = "api.test"
headers = { X-Api-Key = "k" }

[[routes]]
host = "*.files.test"
headers = { X-Api-Key = "k" }
"#;

/// A TLS server on loopback presenting a leaf for `name` signed by `ca`.
async fn server_for(ca: &TestCa, name: &str) -> (SocketAddr, ServerTask) {
    let listener = serve::bind("TLS server").await;
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config_for(&[name]));
    let task = serve::spawn(listener, Some(acceptor), |_request| async {
        Ok::<_, Infallible>(Response::new(http_body_util::Full::new(
            bytes::Bytes::from("ok"),
        )))
    });
    (addr, task)
}

/// Whether a client trusting only `ca_file` accepts the server at `addr` as `name`;
/// Err holds the client's complaint.
type Verdict = Result<(), String>;

async fn curl(ca_file: &str, name: &str, addr: SocketAddr) -> Verdict {
    let resolve = format!("{name}:{}:127.0.0.1", addr.port());
    let url = format!("https://{name}:{}/", addr.port());
    let out = client::curl(
        &["--cacert", ca_file, "--resolve", &resolve, &url],
        CLIENT_TIMEOUT,
    )
    .await;
    match out.code {
        Some(0) => Ok(()),
        _ => Err(out.stderr),
    }
}

const PYTHON: &str = r#"
import socket, ssl, sys
cafile, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
context = ssl.create_default_context(cafile=cafile)
try:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with context.wrap_socket(raw, server_hostname=name):
            print("accepted")
except ssl.SSLCertVerificationError as error:
    print("rejected:", error.verify_message)
    sys.exit(1)
"#;

const NODE: &str = r#"
const tls = require("tls"), net = require("net"), fs = require("fs");
const [cafile, name, port] = process.argv.slice(1);
const socket = tls.connect({
  host: "127.0.0.1",
  port: Number(port),
  servername: net.isIP(name) ? undefined : name,
  checkServerIdentity: (_host, cert) => tls.checkServerIdentity(name, cert),
  ca: fs.readFileSync(cafile),
}, () => { console.log("accepted"); socket.end(); });
socket.on("error", (error) => { console.log("rejected: " + error.code + " " + error.message); process.exit(1); });
"#;

async fn script(program: &str, args: &[&str]) -> Verdict {
    let mut command = Command::new(program);
    command
        .args(args)
        .env_remove("SSL_CERT_FILE")
        .env_remove("NODE_EXTRA_CA_CERTS")
        .env_remove("NODE_OPTIONS")
        .kill_on_drop(true);
    let output = tokio::time::timeout(CLIENT_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("{program} did not finish in time"))
        .unwrap_or_else(|e| panic!("running {program} (is it installed?): {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    match output.status.code() {
        Some(0) if stdout.trim() == "accepted" => Ok(()),
        Some(1) if stdout.starts_with("rejected:") => Err(stdout),
        _ => panic!(
            "{program} failed unexpectedly: {:?}\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

async fn python(ca_file: &str, name: &str, addr: SocketAddr) -> Verdict {
    let port = addr.port().to_string();
    script("python3", &["-c", PYTHON, ca_file, name, &port]).await
}

async fn node(ca_file: &str, name: &str, addr: SocketAddr) -> Verdict {
    let port = addr.port().to_string();
    script("node", &["-e", NODE, ca_file, name, &port]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_python_and_node_accept_only_routed_names_from_a_constrained_ca() {
    let dir = TestDir::new();
    dir.write_config(CONFIG);
    let config = dir.config_arg();
    let created = dir
        .run(&["ca", "init", "--constrain", "-c", &config], &[])
        .await;
    created.assert_code(0);
    assert_eq!(created.line(), "certs/ca.pem");
    assert!(
        created.stderr.contains("api.test, extra.test, files.test"),
        "{}",
        created.stderr
    );
    // An existing CA cannot be constrained after the fact.
    let again = dir
        .run(&["ca", "init", "--constrain", "-c", &config], &[])
        .await;
    again.assert_code(1);
    assert!(
        again
            .error_line()
            .contains("--constrain applies to a new CA only")
    );

    // Whoever holds the key can sign anything; the constraints decide what clients accept.
    let ca = TestCa::load(&dir.ca_cert_path(), &dir.ca_key_path());
    let ca_file = dir.ca_cert_path().to_str().unwrap().to_owned();
    let accepted = ["api.test", "eu.files.test", "extra.test"];
    let rejected = ["evil.test", "api.test.evil.test", "127.0.0.1"];
    let mut servers = Vec::new();
    for name in accepted.iter().chain(&rejected) {
        servers.push((*name, server_for(&ca, name).await));
    }
    for (name, (addr, _task)) in &servers {
        let want_accepted = accepted.contains(name);
        for (client, verdict) in [
            ("curl", curl(&ca_file, name, *addr).await),
            ("python", python(&ca_file, name, *addr).await),
            ("node", node(&ca_file, name, *addr).await),
        ] {
            match (want_accepted, verdict) {
                (true, Ok(())) => {}
                (false, Err(complaint)) => assert!(
                    complaint.to_ascii_lowercase().contains("subtree"),
                    "{client} rejected {name} for another reason than the name constraints: {complaint}"
                ),
                (true, Err(complaint)) => panic!("{client} rejected {name}: {complaint}"),
                (false, Ok(())) => panic!("{client} accepted a leaf for {name}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_and_reload_warn_about_routes_outside_the_constraints() {
    let setup = Setup::start().await;
    let options = ProxyOptions::default();
    setup.rewrite_config(&options);
    let config = setup.dir.config_arg();
    let builder = setup.config(&options);
    let env = builder.env();
    let init = setup
        .dir
        .run(&["ca", "init", "--constrain", "-c", &config], &env)
        .await;
    init.assert_code(0);

    let outside = ProxyOptions::default()
        .extra("[[routes]]\nhost = \"other.test\"\nintegration = \"demo\"\n")
        .resolve("other.test:443", setup.api.https_addr());
    let proxy = setup.spawn_proxy(&outside).await;
    let warning = proxy
        .wait_for_log("falls outside the CA's name constraints")
        .await;
    assert!(warning.contains("other.test"), "{warning}");
    Admin::new(proxy.admin_addr)
        .wait_for_readyz(StatusCode::OK)
        .await;

    // What the warning means: curl accepts credproxy's leaf for the routed host inside
    // the constraints and rejects the one for the route outside them.
    let ca_file = setup.dir.ca_cert_path().to_str().unwrap().to_owned();
    let proxy_url = format!("http://{}", proxy.proxy_addr);
    let through = |host: &str| {
        let url = format!("https://{host}/echo");
        let args = ["-x", &proxy_url, "--cacert", &ca_file, &url].map(str::to_owned);
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            client::curl(&args, CLIENT_TIMEOUT).await
        }
    };
    through(API_HOST).await.success();
    let refused = through("other.test").await;
    assert_ne!(refused.code, Some(0));
    assert!(refused.stderr.contains("subtree"), "{}", refused.stderr);

    // A reload adding another outside route warns again, naming it.
    let later = outside.extra("[[routes]]\nhost = \"late.test\"\nintegration = \"demo\"\n");
    setup.rewrite_config(&later);
    proxy.hangup();
    let lines = proxy
        .wait_for_log_count("falls outside the CA's name constraints", 3)
        .await;
    assert!(lines.iter().any(|l| l.contains("late.test")), "{lines:#?}");
    let exit = proxy.stop().await;
    assert_eq!(exit.code, Some(0), "{}", exit.log);
}
