//! The command line (clap). Every command takes `-c/--config`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::client_env::Format;

#[derive(Debug, Parser)]
#[command(
    name = "credproxy",
    version,
    about = "Keeps OAuth access tokens fresh and injects them into API calls that pass through it",
    long_about = "credproxy keeps each integration's OAuth access token fresh with the refresh_token \
grant, persisting rotated refresh tokens, and injects `Authorization: Bearer` into requests \
that programs send through it (HTTPS_PROXY=http://127.0.0.1:8080).\n\n\
First steps:\n  credproxy run              the proxy (see config/credproxy.toml)\n  credproxy check            refresh every integration once and report\n  \
credproxy token NAME       print NAME's access token for a script\n  \
credproxy exec -- CMD      run CMD with the proxy and its CA set up for it\n  \
credproxy authorize NAME   get NAME's first refresh token (browser sign-in)\n  \
credproxy ca init          create the local CA that clients must trust",
    after_help = "Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad config."
)]
pub struct Cli {
    /// Config file (TOML).
    #[arg(
        short,
        long,
        global = true,
        env = "CREDPROXY_CONFIG",
        default_value = "config/credproxy.toml"
    )]
    pub config: PathBuf,

    /// Log format on stderr: `text` for people, `json` (one object per line) for
    /// log collectors. The filter comes from RUST_LOG (default: info for run and
    /// demo, error for one-shot commands).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The main job: token refreshers, the proxy, sidecars and the admin listener,
    /// until SIGINT/SIGTERM; SIGHUP reloads the config. Point programs at it with
    /// HTTPS_PROXY=http://127.0.0.1:8080.
    Run,
    /// Run the proxy against built-in demo OAuth and API servers, with no set-up
    /// and no accounts; prints a curl command to try from another terminal.
    Demo {
        /// Proxy address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Admin address.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: std::net::SocketAddr,
    },
    /// Validate the config, refresh every integration once (persisting any rotated
    /// refresh token) and print one line per integration; exit 0 only if all succeeded.
    Check,
    /// Print NAME's current access token on stdout, refreshing first if it is
    /// missing or about to expire. For scripts:
    /// curl -H "Authorization: Bearer $(credproxy token NAME)" …
    Token {
        /// The integration, as named in [integrations.NAME].
        name: String,
    },
    /// Obtain NAME's first refresh token: the authorization-code flow with PKCE.
    /// Prints a URL to open (and opens a browser when it can), waits for the
    /// redirect on the integration's loopback redirect_uri, exchanges the code and
    /// stores the tokens in the state file. Needs integrations.NAME.authorize_url.
    Authorize {
        /// The integration, as named in [integrations.NAME].
        name: String,
        /// Only print the URL; do not try to open a browser.
        #[arg(long)]
        no_browser: bool,
        /// For machines without a browser: paste the URL you were redirected to
        /// (or just the code) instead of waiting for the redirect.
        #[arg(long)]
        manual: bool,
        /// How long to wait for the redirect.
        #[arg(long, default_value = "5m", value_parser = crate::config::duration::parse)]
        timeout: std::time::Duration,
    },
    /// Run CMD with credproxy in front of it: the proxy in-process on a free
    /// loopback port with a one-time password, and HTTPS_PROXY, SSL_CERT_FILE and
    /// the like set for CMD (see `credproxy env`). Signals are passed on to CMD;
    /// the exit code is CMD's (128 + N when signal N killed it; 127 when it
    /// cannot be started).
    #[command(after_help = "Example: credproxy exec -- curl https://api.example.com/v1/me")]
    Exec {
        /// Pass on the environment variables the config reads secrets from
        /// (by default CMD does not see them).
        #[arg(long)]
        keep_env: bool,
        /// The command and its arguments.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<std::ffi::OsString>,
    },
    /// Print the proxy and CA variables for the configured `credproxy run`, for
    /// `eval "$(credproxy env)"` (sh) or `credproxy env --format fish | source`.
    Env {
        #[arg(long, value_enum, default_value_t = Format::Sh)]
        format: Format,
    },
    /// Manage the local certificate authority that clients trust.
    #[command(subcommand)]
    Ca(CaCommand),
    /// The state store ([state] path or url): inspect it, fill it from a state
    /// file, or manage the key that seals its tokens at rest.
    #[command(subcommand)]
    State(StateCommand),
}

#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// List each stored entry: name, grant, expiry, last update, sealed or not.
    /// Never a token.
    Show,
    /// Copy a state file's entries into the configured store (e.g. moving from
    /// [state] path to a PostgreSQL url without re-authorizing). An entry the
    /// store already has is kept unless --force.
    Import {
        /// The state file to read (e.g. state/tokens.json).
        file: PathBuf,
        /// Replace entries the store already has.
        #[arg(long)]
        force: bool,
    },
    /// Print a fresh key for `[state] key` (32 random bytes from the operating
    /// system, base64). Keep it like a password: it opens every stored token.
    Keygen,
    /// Re-seal every entry of the store under a new key, in one atomic step,
    /// holding every integration's refresh lock. The current key is the config's
    /// `[state] key` (none: the store is in clear); then set `[state] key` to the
    /// new key everywhere (a SIGHUP reloads it).
    Rekey {
        /// The environment variable holding the new key (not the key itself:
        /// command lines are visible to other users).
        #[arg(long, value_name = "ENV_VAR")]
        new_key: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the local CA (certificate + key) if missing; print the certificate's path.
    Init {
        /// Create a name-constrained CA: critical X.509 name constraints permit only
        /// the routed domains (and [ca] permit), so a leaked CA key cannot impersonate
        /// any other host to clients that trust it. Routes added later need a new CA.
        #[arg(long)]
        constrain: bool,
    },
    /// Write ca-bundle.pem beside the CA certificate: the system's trusted roots plus
    /// the local CA, for SSL_CERT_FILE, REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE.
    Bundle,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
