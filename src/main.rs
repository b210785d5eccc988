//! The binary: parse the command line, run the command, print, exit with its code.
//! The only place that prints.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;

use clap::Parser;
use credproxy::cli::{CaCommand, Cli, Command};
use credproxy::error::{self, Error};
use credproxy::{commands, config};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.command);
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
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("credproxy: {}", error::chain(&e));
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, Error> {
    let config = config::load(&cli.config)?;
    match cli.command {
        Command::Check => {
            let report = commands::check(&config).await?;
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
            let token = commands::token(&config, &name).await?;
            // The one place a token is printed on purpose: this command's job.
            println!("{}", token.expose());
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCommand::Init) => {
            let (path, created) = commands::ca_init(&config)?;
            if created {
                eprintln!(
                    "created {} (\"{}\")",
                    path.display(),
                    credproxy::ca::CA_NAME
                );
            }
            println!("{}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCommand::Bundle) => {
            println!("{}", commands::ca_bundle(&config)?.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Logs go to stderr. One-shot commands log warnings only, so their stdout and
/// stderr stay readable; `RUST_LOG` overrides.
fn init_logging(command: &Command) {
    let default = match command {
        Command::Check | Command::Token { .. } | Command::Ca(_) => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
