//! The binary: parse the command line, run the command, print, exit with its code.
//! The only place that prints.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use credproxy::cli::{CaCommand, Cli, Command, LogFormat, StateCommand};
use credproxy::error::Error;
use credproxy::proxy::access_log;
use credproxy::report;
use credproxy::signals::{Signal, Signals};
use credproxy::{app, commands, config, exec, log_writer};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = match init_logging(&cli.command, cli.log_format) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("credproxy: cannot start the log writer thread: {e}");
            return ExitCode::from(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("credproxy: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(run(cli));
    // Queued log lines first, so the error below is the last line.
    drop(logs);
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("credproxy: {}", report::chain(&e));
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, Error> {
    let load = || config::load(&cli.config);
    match cli.command {
        Command::Demo {
            listen,
            admin_listen,
        } => demo(listen, admin_listen).await,
        Command::Run => {
            let running = app::start(&load()?).await?;
            let mut signals = Signals::new()?;
            while signals.next().await == Signal::Hangup {
                running.state.reload_logged().await;
            }
            tracing::info!("stopping: letting in-flight requests finish");
            running.stop().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let report = commands::check(&load()?).await?;
            for line in &report.lines {
                println!("{line}");
            }
            Ok(if report.all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Token { name } => {
            let token = commands::token(&load()?, &name).await?;
            // The one place a token is printed on purpose: this command's job.
            println!("{}", token.expose());
            Ok(ExitCode::SUCCESS)
        }
        Command::Authorize {
            name,
            no_browser,
            manual,
            timeout,
        } => authorize(&load()?, &name, !no_browser, manual, timeout).await,
        Command::Exec { keep_env, command } => Ok(ExitCode::from(
            exec::exec(&load()?, &command, keep_env).await?,
        )),
        Command::Env { format } => {
            print!("{}", commands::env(&load()?)?.render(format));
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCommand::Init { constrain }) => {
            let (ca, created) = commands::ca_init(&load()?, constrain)?;
            if created {
                eprintln!(
                    "created {} (\"{}\")",
                    ca.cert_path.display(),
                    credproxy::ca::CA_NAME
                );
                if let Some(constraints) = &ca.constraints {
                    eprintln!(
                        "it may vouch only for: {}",
                        constraints.permitted().join(", ")
                    );
                }
            }
            println!("{}", ca.cert_path.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::State(StateCommand::Show) => {
            let config = load()?;
            let lines = commands::state_show(&config).await?;
            if lines.is_empty() {
                eprintln!("{}: no entries", config.state);
            }
            for line in &lines {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::State(StateCommand::Import { file, force }) => {
            for line in commands::state_import(&load()?, &file, force).await? {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCommand::Bundle) => {
            println!("{}", commands::ca_bundle(&load()?)?.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::State(StateCommand::Keygen) => {
            // Printed on purpose: this command's job. It needs no config.
            println!("{}", *commands::state_keygen()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::State(StateCommand::Rekey { new_key }) => {
            println!("{}", commands::state_rekey(&load()?, &new_key).await?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `credproxy demo`: the real proxy, with demo servers standing in for the
/// outside world, and a temporary directory for its CA and state.
async fn demo(listen: SocketAddr, admin_listen: SocketAddr) -> Result<ExitCode, Error> {
    let dir = tempfile::Builder::new()
        .prefix("credproxy-demo-")
        .tempdir()
        .map_err(|e| Error::Failed(format!("cannot create a temporary directory: {e}")))?;
    let world = credproxy::demo::DemoWorld::start(dir.path())
        .await
        .map_err(|e| Error::Failed(report::chain(&e)))?;
    // The file is for `credproxy exec` beside the demo: the same world, no
    // admin listener of its own.
    let config_path = dir.path().join("credproxy-demo.toml");
    std::fs::write(&config_path, world.config_toml(listen, None))
        .map_err(|e| Error::Failed(format!("cannot write {}: {e}", config_path.display())))?;
    let config = config::parse(
        &config_path,
        &world.config_toml(listen, Some(admin_listen)),
        &|_| None,
    )?;
    let running = app::start(&config).await?;
    println!(
        "credproxy demo is running: proxy http://{}, admin http://{}",
        running.proxy_addr,
        running
            .admin_addr
            .map_or_else(|| "none".to_owned(), |addr| addr.to_string())
    );
    println!(
        "The demo API answers 401 without a valid token; credproxy adds one. Try, in another terminal:"
    );
    println!();
    println!(
        "  curl -x http://{} --cacert {} https://api.demo.test/hello",
        running.proxy_addr,
        config.ca.cert.display()
    );
    println!();
    println!("Or let credproxy set up the proxy, the CA and the variables for one command:");
    println!();
    println!(
        "  {} -c {} exec -- curl https://api.demo.test/hello",
        std::env::current_exe()
            .map_or_else(|_| "credproxy".into(), |exe| exe.display().to_string()),
        config_path.display()
    );
    println!();
    println!("Demo tokens expire after 20 s; watch the refreshes below. Ctrl-C stops the demo.");
    let mut signals = Signals::new()?;
    while signals.next().await == Signal::Hangup {
        tracing::info!("the demo has no config file to reload");
    }
    running.stop().await;
    drop(world);
    Ok(ExitCode::SUCCESS)
}

/// `credproxy authorize`: show the URL, get the code (redirect or pasted),
/// exchange it, store the tokens.
async fn authorize(
    config: &config::Config,
    name: &str,
    open_browser: bool,
    manual: bool,
    timeout: std::time::Duration,
) -> Result<ExitCode, Error> {
    let flow = credproxy::authorize::Flow::new(config, name)?;
    let code = if manual {
        println!(
            "Open this URL in a browser and approve:\n\n  {}\n",
            flow.url()
        );
        println!(
            "Then paste the URL the browser was redirected to (or just the code) and press Enter:"
        );
        let line = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map(|_| line)
        })
        .await
        .map_err(|e| Error::Failed(format!("cannot read the pasted URL: {e}")))?
        .map_err(|e| Error::Failed(format!("cannot read the pasted URL: {e}")))?;
        flow.read_pasted(&line)?
    } else {
        // Listen first, so the redirect cannot arrive before anyone waits for it.
        let listener = flow.listen().await?;
        println!(
            "Open this URL in a browser to authorize {name}:\n\n  {}\n",
            flow.url()
        );
        if open_browser {
            try_open_browser(flow.url().as_str());
        }
        println!(
            "Waiting up to {} for the redirect to {} …",
            commands::human_duration(timeout.try_into().unwrap_or_default()),
            flow.redirect_uri()
        );
        flow.wait_for_redirect(listener, timeout).await?
    };
    let expires_at = flow.complete(config, &code).await?;
    println!(
        "{name}: authorized; refresh token stored in {} (access token expires in {}). `credproxy check` and `credproxy run` use it from now on.",
        config.state,
        commands::human_duration(expires_at - time::OffsetDateTime::now_utc())
    );
    Ok(ExitCode::SUCCESS)
}

/// Opens `url` in the desktop's browser when there is a desktop; the URL is
/// printed either way.
fn try_open_browser(url: &str) {
    let opener = if cfg!(target_os = "macos") {
        Some("open")
    } else if std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some()
    {
        Some("xdg-open")
    } else {
        None
    };
    if let Some(opener) = opener {
        let _ = std::process::Command::new(opener)
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
}

/// Logs go to stderr. One-shot commands log errors only: what failed is their
/// result, printed once; `RUST_LOG` overrides.
/// Lines are written by a background thread: a request never waits for stderr
/// (a slow pipe or terminal would otherwise stall the proxy). The returned guard
/// flushes what is queued when `main` ends.
fn init_logging(command: &Command, format: LogFormat) -> std::io::Result<log_writer::FlushGuard> {
    let default = match command {
        Command::Run | Command::Demo { .. } => "info",
        // Its stderr is the command's too: only what needs attention.
        Command::Exec { .. } => "warn",
        Command::Check
        | Command::Token { .. }
        | Command::Authorize { .. }
        | Command::Env { .. }
        | Command::Ca(_)
        | Command::State(_) => "error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let (writer, guard) = log_writer::spawn(std::io::stderr())?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Request lines skip the general-purpose formatter (same bytes); with
    // colours on a terminal they go through it.
    match format {
        LogFormat::Text if !ansi => access_log::install(access_log::Format::Text, writer.clone()),
        LogFormat::Text => {}
        LogFormat::Json => access_log::install(access_log::Format::Json, writer.clone()),
    }
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false);
    match format {
        LogFormat::Text => logs.with_ansi(ansi).init(),
        LogFormat::Json => logs.json().init(),
    }
    Ok(guard)
}
