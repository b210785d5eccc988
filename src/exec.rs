//! `credproxy exec -- CMD`: the proxy in-process on a loopback port of its own,
//! usable only with a one-time password handed to CMD, the CA bundle in a
//! private temp file, and CMD run with every proxy and CA variable set. Signals
//! are passed on to CMD; when it exits the proxy stops (refreshes in flight are
//! committed first), the temp file is removed, and CMD's status is returned.

use std::ffi::OsString;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;

use base64::Engine;
use rustix::process::{Pid, Signal as RawSignal};
use tokio::process::{Child, Command};

use crate::app;
use crate::ca;
use crate::client_env::{self, ClientEnv};
use crate::config::{Config, ProxyClient};
use crate::error::Error;
use crate::live::Overrides;
use crate::proxy::dial::SystemResolver;
use crate::secret::Secret;
use crate::signals::{Signal, Signals};

/// The user name in the proxy URL; the password is what keeps others out.
const PROXY_USER: &str = "credproxy";

/// Runs `command` (program, then arguments) behind an in-process proxy for
/// `config`. Returns CMD's exit code, or 128 + N when signal N killed it.
/// Unless `keep_env`, the variables the config read its secrets from are not
/// passed on.
pub async fn exec(config: &Config, command: &[OsString], keep_env: bool) -> Result<u8, Error> {
    let Some((program, args)) = command.split_first() else {
        return Err(Error::Usage("exec: no command given".into()));
    };
    // Listening from the start: a signal that arrives while the proxy or the
    // child starts is passed on once the child runs, not fatal to credproxy.
    let mut signals = Signals::new()?;
    let client = ProxyClient::with_all_routes(PROXY_USER, one_time_password());
    let (ca, _) = ca::load_or_create(&config.ca)?;
    let bundle = write_private_bundle(&ca)?;
    let running = app::start_with(
        config,
        Overrides {
            proxy: Some((SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), client.clone())),
            no_admin: !config.admin.configured,
        },
        Arc::new(SystemResolver),
    )
    .await?;
    let env = ClientEnv::new(
        &client_env::proxy_url(running.proxy_addr, Some(&client)),
        bundle.path(),
        &ca.cert_path,
        client_env::inherited_no_proxy().as_deref(),
    );

    let mut child = Command::new(program);
    child
        .args(args)
        .envs(env.vars().iter().map(|(k, v)| (k, v)));
    if !keep_env {
        for var in &config.secret_vars {
            child.env_remove(var);
        }
    }
    let program = program.to_string_lossy();
    let status = match child.spawn() {
        Ok(child) => wait_forwarding(child, &mut signals)
            .await
            .map_err(|e| Error::Failed(format!("cannot wait for {program}: {e}"))),
        Err(source) => Err(Error::Spawn {
            program: program.into_owned(),
            source,
        }),
    };
    running.stop().await;
    if let Err(error) = bundle.close() {
        tracing::warn!(%error, "cannot remove the temporary CA bundle");
    }
    Ok(exit_code(status?))
}

/// 32 random bytes, URL-safe base64: it goes into the proxy URL as is.
fn one_time_password() -> Secret {
    let bytes: [u8; 32] = rand::random();
    Secret::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// The bundle in a temp file only this user can read (mode 0600), removed
/// when the returned handle is closed or dropped.
fn write_private_bundle(ca: &ca::Ca) -> Result<tempfile::NamedTempFile, Error> {
    let failed = |e: io::Error| Error::Failed(format!("cannot write the temporary CA bundle: {e}"));
    let mut file = tempfile::Builder::new()
        .prefix("credproxy-ca-bundle-")
        .suffix(".pem")
        .tempfile()
        .map_err(failed)?;
    file.write_all(ca::bundle(ca).as_bytes()).map_err(failed)?;
    file.flush().map_err(failed)?;
    Ok(file)
}

/// Waits for the child, passing on every signal credproxy receives meanwhile.
async fn wait_forwarding(mut child: Child, signals: &mut Signals) -> io::Result<ExitStatus> {
    loop {
        tokio::select! {
            status = child.wait() => return status,
            signal = signals.next() => forward(&child, signal),
        }
    }
}

fn forward(child: &Child, signal: Signal) {
    // `id()` is None once the child has been reaped: its pid may belong to
    // another process by now.
    let Some(pid) = child.id().and_then(|id| Pid::from_raw(id.try_into().ok()?)) else {
        return;
    };
    let raw = match signal {
        // The terminal's Ctrl-C went to its whole foreground group, the child
        // included: passing it on would deliver it twice.
        Signal::Interrupt if in_terminal_foreground() => return,
        Signal::Interrupt => RawSignal::INT,
        Signal::Terminate => RawSignal::TERM,
        Signal::Hangup => RawSignal::HUP,
    };
    if let Err(error) = rustix::process::kill_process(pid, raw) {
        tracing::warn!(?signal, %error, "cannot pass the signal on to the command");
    }
}

/// Whether credproxy (and so its child, which shares its process group) is in
/// the foreground process group of its controlling terminal.
fn in_terminal_foreground() -> bool {
    let Ok(tty) = std::fs::File::open("/dev/tty") else {
        return false;
    };
    rustix::termios::tcgetpgrp(&tty).is_ok_and(|group| group == rustix::process::getpgrp())
}

/// As a shell reports it: the exit code, or 128 + the signal that killed it.
fn exit_code(status: ExitStatus) -> u8 {
    let code = status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1);
    u8::try_from(code).unwrap_or(1)
}
