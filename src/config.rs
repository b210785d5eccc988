//! The validated configuration: `load(path)` reads the TOML file, expands
//! `${VAR}` and `${file:PATH}`, deserializes it and checks every value. Any problem is a
//! `ConfigError` naming the file, the key path and the cause.
//!
//! Each section has one file under `config/`: its validated type, its serde
//! mirror (every table denies unknown keys: a typo must not silently disable a
//! route), its defaults and its checks. A new key goes there.

mod ca;
pub mod duration;
mod expand;
mod integration;
mod limits;
mod proxy;
mod routes;
mod state;
pub mod template;
mod upstream;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;

pub use ca::CaConfig;
pub use integration::{
    Client, ClientAuth, ClientCredentials, GithubApp, Grant, IntegrationConfig, JwtBearer,
    RefreshTokenGrant, RequestFormat, StaticToken,
};
pub use limits::Limits;
pub use proxy::{AdminConfig, ClientRoutes, ProxyClient, ProxyConfig, Unrouted};
pub use routes::{Route, Sidecar};
pub use state::{StateConfig, StoreConfig};
pub use upstream::{ExtraCa, UpstreamConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read config file", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("{}: {key}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this config was read from, for error messages.
    pub source: PathBuf,
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub ca: CaConfig,
    pub state: StateConfig,
    pub upstream: UpstreamConfig,
    /// Sorted by name.
    pub integrations: Vec<IntegrationConfig>,
    pub routes: Vec<Route>,
    pub sidecars: Vec<Sidecar>,
    pub limits: Limits,
    /// The environment variables whose values went into secrets (see
    /// [`is_secret_key`]): `exec` keeps them from its command.
    pub secret_vars: Vec<String>,
}

// === impl Config ===

impl Config {
    pub fn integration(&self, name: &str) -> Option<&IntegrationConfig> {
        self.integrations.iter().find(|i| i.name == name)
    }
}

/// Reads and validates the config file at `path`, expanding `${VAR}` from the
/// process environment and `${file:PATH}` from the file system.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text, &|name| std::env::var(name).ok())
}

/// Validates config `text`; `path` only names the file in errors.
pub fn parse(
    path: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let syntax = |message: String| ConfigError::Syntax {
        path: path.to_owned(),
        message,
    };
    let mut value: toml::Value = toml::from_str::<toml::Table>(text)
        .map(toml::Value::Table)
        .map_err(|e| syntax(describe_toml_error(text, &e)))?;
    let substituted =
        expand::expand_all(&mut value, env).map_err(|(key, err)| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message: match err {
                expand::ExpandError::Missing(var) => {
                    format!("environment variable {var} is not set")
                }
                expand::ExpandError::Unterminated => "\"${\" without a closing \"}\"".into(),
                expand::ExpandError::File(file, reason) => format!("cannot read {file}: {reason}"),
            },
        })?;
    let raw: Result<RawConfig, _> = serde_path_to_error::deserialize(value).map_err(|e| {
        let key = e.path().to_string();
        ConfigError::Invalid {
            path: path.to_owned(),
            key: if key == "." {
                "(top level)".into()
            } else {
                key
            },
            // toml appends "in `table`" on a second line; the key path says it already.
            message: e
                .into_inner()
                .to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        }
    });
    let mut config = raw
        .and_then(|raw| Validator { path }.config(raw))
        .map_err(|error| redact(error, &substituted))?;
    // `${file:…}` reads no variable: nothing to keep from a child.
    config.secret_vars = substituted
        .into_iter()
        .filter(|s| is_secret_key(&s.key) && !s.reference.starts_with("file:"))
        .map(|s| s.reference)
        .collect();
    config.secret_vars.sort_unstable();
    config.secret_vars.dedup();
    Ok(config)
}

/// Whether the value at dotted key path `key` is a secret: a client secret,
/// refresh token, password, admin or static token, private key or service
/// account file, the state key, the state URL (it may hold the database
/// password), or a header or query value a route injects (API keys are written there).
fn is_secret_key(key: &str) -> bool {
    let leaf = key.rsplit('.').next().unwrap_or(key);
    matches!(
        leaf,
        "client_secret"
            | "refresh_token"
            | "password"
            | "token"
            | "private_key"
            | "service_account"
    ) || key == "state.key"
        || key == "state.url"
        || (key.starts_with("routes[") && (key.contains(".headers.") || key.contains(".query.")))
}

/// Errors quote bad values; a value that came from `${VAR}` may be a secret
/// (a token pasted into the wrong variable), so it is shown by name only.
fn redact(error: ConfigError, substituted: &[expand::Substitution]) -> ConfigError {
    match error {
        ConfigError::Invalid {
            path,
            key,
            mut message,
        } => {
            for value in substituted
                .iter()
                .map(|s| s.value.as_str())
                .filter(|v| v.len() >= 4)
            {
                message = message.replace(value, "[value from the environment]");
            }
            ConfigError::Invalid { path, key, message }
        }
        other => other,
    }
}

/// One line for a TOML syntax error: the message and where it is.
fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim_end_matches('\n');
    match err.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("TOML syntax error at line {line}, column {column}: {message}")
        }
        None => format!("TOML syntax error: {message}"),
    }
}

// === validation ===

struct Validator<'a> {
    path: &'a Path,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let integrations = raw
            .integrations
            .into_iter()
            .map(|(name, i)| self.integration(name, i))
            .collect::<Result<Vec<_>, _>>()?;
        let names: Vec<&str> = integrations.iter().map(|i| i.name.as_str()).collect();
        let routes = self.routes(raw.routes, &names)?;
        Ok(Config {
            source: self.path.to_owned(),
            proxy: self.proxy(raw.proxy, &routes)?,
            admin: self.admin(raw.admin)?,
            ca: self.ca(raw.ca)?,
            state: self.state(raw.state)?,
            upstream: self.upstream(raw.upstream)?,
            sidecars: self.sidecars(raw.sidecars, &routes)?,
            integrations,
            routes,
            limits: self.limits(raw.limits)?,
            secret_vars: Vec::new(),
        })
    }

    /// A non-zero duration at `key`, or `default`.
    fn duration(
        &self,
        key: &str,
        value: Option<String>,
        default: &str,
    ) -> Result<Duration, ConfigError> {
        let text = value.as_deref().unwrap_or(default);
        match duration::parse(text) {
            Ok(d) if !d.is_zero() => Ok(d),
            Ok(_) => Err(self.err(key, "must be longer than zero")),
            Err(message) => Err(self.err(key, message)),
        }
    }

    /// A count of at least 1 at `key`, or `default`.
    fn count(&self, key: &str, value: Option<usize>, default: usize) -> Result<usize, ConfigError> {
        match value {
            Some(0) => Err(self.err(key, "must be at least 1")),
            value => Ok(value.unwrap_or(default)),
        }
    }

    fn socket_addr(
        &self,
        key: &str,
        value: Option<&str>,
        default: &str,
    ) -> Result<SocketAddr, ConfigError> {
        let text = value.unwrap_or(default);
        text.parse().map_err(|_| {
            self.err(
                key,
                format!("{text:?} is not an address like \"127.0.0.1:8080\""),
            )
        })
    }

    fn url(&self, key: &str, text: &str) -> Result<Url, ConfigError> {
        let url =
            Url::parse(text).map_err(|e| self.err(key, format!("{text:?} is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(self.err(key, format!("{text:?} is not an http(s) URL")));
        }
        Ok(url)
    }
}

fn is_loopback_url(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    proxy: proxy::RawProxy,
    /// None when the file has no `[admin]` table.
    admin: Option<proxy::RawAdmin>,
    #[serde(default)]
    ca: ca::RawCa,
    #[serde(default)]
    state: state::RawState,
    #[serde(default)]
    upstream: upstream::RawUpstream,
    #[serde(default)]
    integrations: BTreeMap<String, integration::RawIntegration>,
    #[serde(default)]
    routes: Vec<routes::RawRoute>,
    #[serde(default)]
    sidecars: Vec<routes::RawSidecar>,
    #[serde(default)]
    limits: limits::RawLimits,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::integration::DEFAULT_REDIRECT_URI;
    use super::proxy::{DEFAULT_ADMIN_LISTEN, DEFAULT_PROXY_LISTEN};
    use super::state::DEFAULT_STATE_PATH;
    use super::*;

    const FULL: &str = r#"
[proxy]
listen = "127.0.0.1:8081"
unrouted = "deny"
auth = { username = "steps", password = "${PROXY_PASSWORD}" }

[admin]
listen = "127.0.0.1:9091"

[upstream]
resolve = { "API.example.test:443" = "127.0.0.1:8443" }

[integrations.dropbox]
client_id = "key"
client_secret = "${SECRET}"
refresh_url = "https://api.dropbox.com/oauth2/token"
refresh_token = "rt-SECRET"
request_format = "json"
client_auth = "body"
scope = "files.content.read"
refresh_skew = "90s"
default_expires_in = "4h"
authorize_url = "https://www.dropbox.com/oauth2/authorize"
extra_authorize_params = { token_access_type = "offline" }

[[routes]]
host = "api.dropboxapi.com"
integration = "dropbox"
headers = { "X-Type" = "{{ $.integrations.dropbox.token_type }}" }

[[routes]]
host = "*.dropboxapi.com"
headers = { Authorization = "Bearer {{ $.integrations.dropbox.access_token }}" }
upstream_tls = false

[[sidecars]]
listen = "127.0.0.1:9001"
upstream = "https://content.dropboxapi.com"
"#;

    fn env(name: &str) -> Option<String> {
        match name {
            "SECRET" => Some("cs-SECRET".into()),
            "PROXY_PASSWORD" => Some("pw-SECRET".into()),
            _ => None,
        }
    }

    fn parse_text(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("test.toml"), text, &env)
    }

    fn error_of(text: &str) -> String {
        parse_text(text).unwrap_err().to_string()
    }

    #[test]
    fn full_example_parses() {
        let config = parse_text(FULL).unwrap();
        assert_eq!(config.proxy.listen, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(config.proxy.unrouted, Unrouted::Deny);
        let dropbox = config.integration("dropbox").unwrap();
        let Grant::RefreshToken(grant) = &dropbox.grant else {
            unreachable!("refresh_token is the default grant")
        };
        assert_eq!(grant.client.client_secret.expose(), "cs-SECRET");
        assert_eq!(grant.client.request_format, RequestFormat::Json);
        assert_eq!(grant.client.client_auth, ClientAuth::Body);
        assert_eq!(dropbox.refresh_skew, Duration::from_secs(90));
        assert_eq!(dropbox.default_expires_in, Duration::from_secs(4 * 3600));
        assert_eq!(grant.redirect_uri.as_str(), DEFAULT_REDIRECT_URI);
        assert_eq!(config.routes[0].headers.len(), 2);
        assert_eq!(config.routes[1].integration.as_deref(), Some("dropbox"));
        assert!(!config.routes[1].upstream_tls);
        assert_eq!(
            config.upstream.resolve("api.example.test", 443),
            Some("127.0.0.1:8443".parse().unwrap())
        );
        assert_eq!(config.sidecars.len(), 1);
    }

    #[test]
    fn shipped_example_is_valid() {
        let example = include_str!("../config/credproxy.toml");
        let config = parse(Path::new("credproxy.toml"), example, &|_| {
            Some("from-env".into())
        })
        .unwrap();
        assert_eq!(config.integrations.len(), 1);
        assert_eq!(config.routes.len(), 2);
    }

    /// The config inside the Kubernetes example, with its secret files present.
    #[test]
    fn kubernetes_example_is_valid() {
        let yaml = include_str!("../config/deploy/kubernetes.yaml");
        let toml: String = yaml
            .lines()
            .skip_while(|line| !line.contains("credproxy.toml: |"))
            .skip(1)
            .take_while(|line| !line.starts_with("---"))
            .map(|line| format!("{}\n", line.strip_prefix("    ").unwrap_or(line)))
            .collect();
        let secrets = tempfile::tempdir().unwrap();
        for name in [
            "admin-token",
            "dropbox-app-key",
            "dropbox-app-secret",
            "dropbox-refresh-token",
        ] {
            std::fs::write(secrets.path().join(name), format!("{name}-value\n")).unwrap();
        }
        std::fs::write(
            secrets.path().join("database-url"),
            "postgres://credproxy:pw-SECRET@db.internal:5432/credproxy?sslmode=verify-full\n",
        )
        .unwrap();
        let key = crate::secret::StateKey::generate().unwrap();
        std::fs::write(
            secrets.path().join("state-key"),
            format!("{}\n", *key.to_base64()),
        )
        .unwrap();
        let toml = toml.replace("/run/secrets/credproxy", secrets.path().to_str().unwrap());
        let config = parse_text(&toml).unwrap();
        assert_eq!(config.state.key, Some(key));
        assert_eq!(
            config.state.to_string(),
            "the PostgreSQL database postgres://credproxy@db.internal:5432/credproxy"
        );
        assert!(!format!("{config:?}").contains("pw-SECRET"));
        let dropbox = config.integration("dropbox").unwrap();
        let Grant::RefreshToken(grant) = &dropbox.grant else {
            unreachable!("refresh_token is the default grant")
        };
        assert_eq!(
            grant.client.client_secret.expose(),
            "dropbox-app-secret-value"
        );
    }

    #[test]
    fn state_key_is_checked_and_never_shown() {
        let key = crate::secret::StateKey::generate().unwrap();
        let text = format!("[state]\nkey = \"{}\"", *key.to_base64());
        let config = parse_text(&text).unwrap();
        assert_eq!(config.state.key, Some(key.clone()));
        let debug = format!("{config:?}");
        assert!(!debug.contains(key.to_base64().as_str()), "{debug}");
        assert!(debug.contains("StateKey([redacted])"), "{debug}");
        for (bad, want) in [
            ("c2hvcnQ=", "is 5 bytes long, not 32"),
            ("not-base64!", "is not base64"),
        ] {
            let err = error_of(&format!("[state]\nkey = \"{bad}\""));
            assert!(err.contains(&format!("state.key: {want}")), "{err}");
            assert!(!err.contains(bad), "{err}");
        }
    }

    #[test]
    fn defaults_apply_to_an_empty_file() {
        let config = parse_text("").unwrap();
        assert_eq!(config.proxy.listen.to_string(), DEFAULT_PROXY_LISTEN);
        assert_eq!(config.admin.listen.to_string(), DEFAULT_ADMIN_LISTEN);
        assert_eq!(
            config.state.store,
            StoreConfig::File {
                path: PathBuf::from(DEFAULT_STATE_PATH)
            }
        );
        assert_eq!(config.proxy.unrouted, Unrouted::Tunnel);
    }

    #[test]
    fn admin_is_configured_only_by_an_admin_table() {
        assert!(parse_text(FULL).unwrap().admin.configured);
        assert!(!parse_text("").unwrap().admin.configured);
    }

    #[test]
    fn secret_vars_are_those_read_into_secrets() {
        let text = r#"
[proxy]
auth = { username = "${PROXY_USER}", password = "${PROXY_PASSWORD}" }

[state]
path = "${STATE_DIR}/tokens.json"
key = "${STATE_KEY}"

[admin]
token = "${ADMIN_TOKEN}"

[integrations.box]
client_id = "${CLIENT_ID}"
client_secret = "${SECRET}"
refresh_url = "https://x.test/token"
refresh_token = "${REFRESH}"

[[routes]]
host = "maps.test"
headers = { X-Api-Key = "${MAPS_KEY}" }
"#;
        let config = parse(Path::new("test.toml"), text, &|name| {
            Some(match name {
                "STATE_KEY" => format!("{}=", "A".repeat(43)),
                _ => format!("{name}-value"),
            })
        })
        .unwrap();
        assert_eq!(
            config.secret_vars,
            [
                "ADMIN_TOKEN",
                "MAPS_KEY",
                "PROXY_PASSWORD",
                "REFRESH",
                "SECRET",
                "STATE_KEY"
            ]
        );
        // The database URL may carry the password.
        let config = parse(
            Path::new("test.toml"),
            "[state]\nurl = \"${DB_URL}\"\n",
            &|_| Some("postgres://credproxy:pw@127.0.0.1/credproxy".into()),
        )
        .unwrap();
        assert_eq!(config.secret_vars, ["DB_URL"]);
    }

    #[test]
    fn debug_output_holds_no_secret() {
        let debug = format!("{:?}", parse_text(FULL).unwrap());
        for secret in ["cs-SECRET", "pw-SECRET", "rt-SECRET"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let integration = "[integrations.box]\nclient_id = \"id\"\nclient_secret = \"s\"\nrefresh_url = \"https://x.test/token\"\nrefresh_token = \"r\"\n";
        let with = |extra: &str| format!("{integration}{extra}");
        let cases = [
            (
                with("refresh_tokn = \"r\""),
                "integrations.box.refresh_tokn: unknown field",
            ),
            (
                with("refresh_skew = \"5 minutes\""),
                "integrations.box.refresh_skew",
            ),
            (
                with("request_format = \"xml\""),
                "integrations.box.request_format",
            ),
            (
                with("client_auth = \"digest\""),
                "integrations.box.client_auth",
            ),
            (
                with("redirect_uri = \"https://example.com/cb\""),
                "integrations.box.redirect_uri",
            ),
            (
                integration.replace("https://x.test/token", "http://x.test/token"),
                "integrations.box.refresh_url: must be https",
            ),
            (
                integration.replace("https://x.test/token", "not a url"),
                "integrations.box.refresh_url",
            ),
            (
                integration.replace("\"s\"", "\"${MISSING_VAR}\""),
                "integrations.box.client_secret: environment variable MISSING_VAR is not set",
            ),
            (
                with("[[routes]]\nhost = \"a.test\"\nintegration = \"bx\""),
                "routes[0].integration: no integration named \"bx\"",
            ),
            (
                with("[[routes]]\nhost = \"10.0.0.1\"\nintegration = \"box\""),
                "routes[0].host",
            ),
            (
                with("[[routes]]\nhost = \"a.test\""),
                "routes[0]: injects nothing",
            ),
            (
                with(
                    "[[routes]]\nhost = \"a.test\"\nheaders = { X = \"{{ $.integrations.box.refresh_token }}\" }",
                ),
                "routes[0].headers.X: unknown expression",
            ),
            (
                with(
                    "[[routes]]\nhost = \"a.test\"\nintegration = \"box\"\n[[routes]]\nhost = \"A.test\"\nintegration = \"box\"",
                ),
                "routes[1].host: a.test is routed twice",
            ),
            (
                with(
                    "[[sidecars]]\nlisten = \"127.0.0.1:9001\"\nupstream = \"https://nothing.test\"",
                ),
                "sidecars[0].upstream: no [[routes]] entry",
            ),
            ("[proxy]\nlisten = \"localhost\"".into(), "proxy.listen"),
            ("[proxy]\nunrouted = \"drop\"".into(), "proxy.unrouted"),
            (
                "[upstream]\nresolve = { \"nohost\" = \"127.0.0.1:1\" }".into(),
                "upstream.resolve",
            ),
            (
                "[upstream]\nextra_ca = \"/nonexistent/ca.pem\"".into(),
                "upstream.extra_ca: cannot read",
            ),
            (
                "[admn]\nlisten = \"127.0.0.1:1\"".into(),
                "unknown field `admn`",
            ),
            ("[proxy\n".into(), "TOML syntax error at line 1"),
            (
                with("refresh_skew = \"${SECRET}\""),
                "integrations.box.refresh_skew: \"[value from the environment]\" is not a duration",
            ),
        ];
        for (text, want) in cases {
            let err = error_of(&text);
            assert!(err.starts_with("test.toml: "), "{err}");
            assert!(err.contains(want), "want {want:?} in {err:?}");
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }

    mod clients_and_egress {
        use super::*;
        use crate::egress::{AddressClass, AllowEntry, Policy};
        use crate::routes::HostPattern;

        const ROUTED: &str = "[integrations.box]\nclient_id = \"id\"\nclient_secret = \"s\"\nrefresh_url = \"https://x.test/token\"\nrefresh_token = \"r\"\n\n[[routes]]\nhost = \"API.box.test\"\nintegration = \"box\"\n\n[[routes]]\nhost = \"*.box.test\"\nintegration = \"box\"\n";

        fn with(extra: &str) -> String {
            format!("{ROUTED}{extra}")
        }

        #[test]
        fn clients_name_their_routes_and_auth_is_one_client_with_all() {
            let config = parse_text(&with(
                "[[proxy.clients]]\nname = \"export\"\npassword = \"pw-SECRET\"\nroutes = [\"api.box.test\", \"*.BOX.test\"]\n\n[[proxy.clients]]\nname = \"ops.team_1\"\npassword = \"${PROXY_PASSWORD}\"\nroutes = [\"*\"]\n",
            ))
            .unwrap();
            assert_eq!(config.proxy.clients.len(), 2);
            let (export, ops) = (&config.proxy.clients[0], &config.proxy.clients[1]);
            assert_eq!(export.name, "export");
            assert_eq!(
                export.routes,
                ClientRoutes::Only(vec![
                    HostPattern::parse("api.box.test").unwrap(),
                    HostPattern::parse("*.box.test").unwrap()
                ])
            );
            assert_eq!(ops.routes, ClientRoutes::All);
            assert_eq!(ops.password.expose(), "pw-SECRET");
            assert!(!format!("{config:?}").contains("pw-SECRET"));

            let auth =
                parse_text("[proxy]\nauth = { username = \"steps\", password = \"pw\" }").unwrap();
            assert_eq!(auth.proxy.clients.len(), 1);
            let client = &auth.proxy.clients[0];
            assert_eq!(
                (client.name.as_str(), &client.routes),
                ("steps", &ClientRoutes::All)
            );
            assert!(parse_text("").unwrap().proxy.clients.is_empty());
        }

        #[test]
        fn allow_and_block_parse_with_the_documented_default() {
            assert_eq!(parse_text("").unwrap().proxy.egress, Policy::default());
            let config = parse_text(
                "[proxy]\nallow = [\"*.github.com\", \"10.20.0.0/16\"]\nblock = [\"all-private\", \"loopback\"]",
            );
            // 10.20.0.0/16 is private, and private is blocked: block wins, so it is an error.
            let err = config.unwrap_err().to_string();
            assert!(
                err.contains("proxy.allow[1]: 10.20.0.0/16 is private"),
                "{err}"
            );
            let config = parse_text(
                "[proxy]\nallow = [\"*.github.com\", \"10.20.0.0/16\"]\nblock = [\"loopback\", \"link-local\", \"loopback\"]",
            )
            .unwrap();
            let expected = Policy::new(
                vec![
                    AllowEntry::parse("*.github.com").unwrap(),
                    AllowEntry::parse("10.20.0.0/16").unwrap(),
                ],
                vec![AddressClass::Loopback, AddressClass::LinkLocal],
            );
            assert_eq!(config.proxy.egress, expected);
            let open = parse_text("[proxy]\nblock = []").unwrap();
            assert_eq!(open.proxy.egress, Policy::new(Vec::new(), Vec::new()));
        }

        #[test]
        fn errors_name_the_key() {
            let client = |name: &str, routes: &str| {
                format!(
                    "[[proxy.clients]]\nname = \"{name}\"\npassword = \"p\"\nroutes = {routes}\n"
                )
            };
            let cases = [
                (
                    with(&client("export", "[\"api.box.test\", \"box.test\"]")),
                    "proxy.clients[0].routes[1]: no [[routes]] entry has host \"box.test\"",
                ),
                (
                    with(&client("bad name", "[\"*\"]")),
                    "proxy.clients[0].name: \"bad name\" must start",
                ),
                (
                    with(&(client("a", "[\"*\"]") + &client("a", "[]"))),
                    "proxy.clients[1].name: \"a\" is used twice",
                ),
                (
                    with("[[proxy.clients]]\nname = \"a\"\npassword = \"\"\nroutes = []\n"),
                    "proxy.clients[0].password: must not be empty",
                ),
                (
                    with("[[proxy.clients]]\nname = \"a\"\npassword = \"p\"\n"),
                    "proxy.clients[0]: missing field `routes`",
                ),
                (
                    with(&format!(
                        "[proxy]\nauth = {{ username = \"u\", password = \"p\" }}\n{}",
                        client("a", "[\"*\"]")
                    )),
                    "proxy.auth: set proxy.auth or [[proxy.clients]], not both",
                ),
                (
                    "[proxy]\nblock = [\"public\"]".into(),
                    "proxy.block[0]: \"public\" is not",
                ),
                (
                    "[proxy]\nallow = [\"10.0.0.0/33\"]".into(),
                    "proxy.allow[0]: \"10.0.0.0/33\" is not a CIDR",
                ),
                (
                    "[proxy]\nallow = [\"::1\"]".into(),
                    "proxy.allow[0]: ::1/128 is loopback, which proxy.block refuses",
                ),
                ("[proxy]\nallow = [\"a b\"]".into(), "proxy.allow[0]"),
            ];
            for (text, want) in cases {
                let err = error_of(&text);
                assert!(err.contains(want), "want {want:?} in {err:?}");
                assert!(!err.contains('\n'), "one line: {err:?}");
            }
        }
    }
}
